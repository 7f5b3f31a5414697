//! The paired statistics as a differential dataflow: the one computation behind every paired
//! count and answer cell that `candor sql`, the report and the stream's Kafka messages show.
//!
//! Observations are a collection of `(pair key, observed)` with signed multiplicities (a
//! retraction is a `-1`, a re-judged answer a `-1` of its old verdict and a `+1` of its new).
//! The fine-tuned side is arranged by pair key and joined with the base side; the joined pairs
//! become 2×2 tables per (model, base, checkpoint, dataset, test type, category) as they leave
//! the join ([`Four`]: one record whose difference is the table, summed over the pairs one
//! activation sees), and differential's `count` maintains each category's table; the answer
//! cells likewise per (model, checkpoint, dataset, amendment, prompt type), their four counts
//! one difference, from each epoch's observations summed per cell on the way
//! in ([`Epoch`]: a cell's change is one record, a few hundred records an
//! epoch instead of one or more per answer). The join and the counts update from the diffs alone, so
//! arrival order, batch boundaries and retractions cannot change the result; each update is one
//! logical time, and a probe says when its changes are complete.
//!
//! [`statistics`] builds the computation in any timely scope (so a long-lived command
//! dataflow can hold it with its own inputs); [`Counts`] runs it on a worker thread of its own
//! for the views that are fed batch by batch ([`crate::sql::view::PairedView`]): the thread
//! lives as long as the view, and each epoch handed over ([`Counts::send`], or
//! [`Counts::update`] which also waits for its changes) is one epoch of it.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::{Mutex, mpsc};
use std::thread::JoinHandle;

use differential_dataflow::VecCollection;
use differential_dataflow::input::Input;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// An interned string (see [`crate::sql::view::Interner`]).
pub type Sym = u32;

/// The McNemar test types: the paper's two (Normal, Sycophancy) and the neutral sentence's
/// own family (Neutral), which the paper's tables do not have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum TestType {
    Normal,
    Sycophancy,
    Neutral,
}

impl TestType {
    pub fn as_str(self) -> &'static str {
        match self {
            TestType::Normal => "Normal",
            TestType::Sycophancy => "Sycophancy",
            TestType::Neutral => "Neutral",
        }
    }

    pub fn parse(s: &str) -> Option<TestType> {
        match s {
            "Normal" => Some(TestType::Normal),
            "Sycophancy" => Some(TestType::Sycophancy),
            "Neutral" => Some(TestType::Neutral),
            _ => None,
        }
    }

    /// The test a prompt type belongs to, if any: the paper's cells (METHOD.md §4). Normal is
    /// `original` alone under every amendment, `unmodified` included; `original_neutral` is
    /// its own Neutral family.
    pub fn of(prompt_type: &str) -> Option<TestType> {
        match prompt_type {
            "original" => Some(TestType::Normal),
            "original_neutral" => Some(TestType::Neutral),
            "correct" | "incorrect" => Some(TestType::Sycophancy),
            _ => None,
        }
    }
}

/// What answers to the same question under the same condition share: model, dataset, item,
/// amendment, prompt type (interned) and sample index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PairKey {
    pub model: Sym,
    pub dataset: Sym,
    pub item: Sym,
    pub amendment: Sym,
    pub prompt_type: Sym,
    pub sample: u32,
}

/// One observation of a pair key: which checkpoint answered, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Observed {
    pub checkpoint: Sym,
    pub finetuned: bool,
    pub epoch: u64,
    pub refusal: bool,
    /// None: excluded (counted in the cells, never paired).
    pub correct: Option<bool>,
    /// The McNemar test the prompt type belongs to, if any.
    pub test: Option<TestType>,
}

/// One category (amendment) of a family: (model, base, checkpoint, dataset, test type).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PairedCategory {
    pub model: Sym,
    pub base_checkpoint: Sym,
    pub checkpoint: Sym,
    pub dataset: Sym,
    pub test_type: TestType,
    pub category: Sym,
}

/// Four counts that move together, differential's difference type for them: a paired
/// category's 2×2 table (both correct, b = base correct and fine-tuned wrong, c = the other
/// way, both wrong), or an answer cell's (responses, refusals, excluded, incorrect). One
/// record per category or cell, where one per count would make `count` keep four.
pub type Four = (i64, i64, i64, i64);

/// One (model, checkpoint, dataset, amendment, prompt type) answer cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CellKey {
    pub model: Sym,
    pub checkpoint: Sym,
    pub ft: bool,
    pub epoch: u64,
    pub dataset: Sym,
    pub amendment: Sym,
    pub prompt_type: Sym,
}

/// The changes of one update: how much each paired cell and each answer cell moved.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Changes {
    pub paired: Vec<(PairedCategory, Four)>,
    pub cells: Vec<(CellKey, Four)>,
}

/// The paired statistics: every paired category's 2×2 table over a collection of
/// observations, and every answer cell's four counts over a collection of answer-cell changes
/// ([`Epoch`] sums an epoch's observations per cell before they enter, so the count sees a few
/// hundred records an epoch, not one or more per answer), both maintained by `count` (outputs
/// are `(key, four counts)`, see [`Four`], with the usual `+1` new / `-1` old changes).
#[allow(clippy::type_complexity)] // the two output collections, spelled out
pub fn statistics<'s>(
    observations: VecCollection<'s, u64, (PairKey, Observed), i64>,
    cell_changes: VecCollection<'s, u64, CellKey, Four>,
) -> (VecCollection<'s, u64, (PairedCategory, Four), isize>, VecCollection<'s, u64, (CellKey, Four), isize>) {
    // Only answers with a verdict in one of the tests pair; each side is arranged by pair key
    // with only what the join needs (checkpoint, correct, test), to keep the arrangements small.
    let pairable = observations.flat_map(|(k, o): (PairKey, Observed)| match (o.correct, o.test) {
        (Some(correct), Some(test)) => Some((o.finetuned, (k, (o.checkpoint, correct, test)))),
        _ => None,
    });
    let base = pairable.clone().filter(|(ft, _)| !*ft).map(|(_, kv)| kv);
    let candidates =
        pairable.filter(|(ft, _)| *ft).map(|(_, (k, (checkpoint, correct, _)))| (k, (checkpoint, correct)));
    // The join itself, its output unsorted: `tabled` sums it by hash right after (the
    // convenience joins sort every joined pair on the way out).
    use differential_dataflow::AsCollection;
    use timely::container::{CapacityContainerBuilder, PushInto};
    type Pairs = CapacityContainerBuilder<Vec<((PairedCategory, bool, bool), u64, i64)>>;
    let paired = differential_dataflow::operators::cursor::join::join_traces::<_, _, _, _, Pairs>(
        base.arrange_by_key(),
        candidates.arrange_by_key(),
        "Pair",
        |k: &PairKey, b: &(Sym, bool, TestType), f: &(Sym, bool), time, r1: &i64, r2: &i64, out: &mut Pairs| {
            let category = PairedCategory {
                model: k.model,
                base_checkpoint: b.0,
                checkpoint: f.0,
                dataset: k.dataset,
                test_type: b.2,
                category: k.amendment,
            };
            out.push_into(((category, b.1, f.1), time, r1 * r2));
        },
    )
    .as_collection();
    (tabled(paired).count(), cell_changes.count())
}

/// The joined pairs as 2×2 tables: each (category, base correct, fine-tuned correct) update
/// becomes its category's [`Four`], and the updates of each (category, time) that one
/// activation sees are summed into one. The join emits one update per joined pair, a few
/// hundred distinct categories among them, so `count` arranges a few hundred updates instead of
/// every pair, one per category instead of one per table cell. Only equal updates are added
/// together, so the counts are those of the pairs themselves.
fn tabled<'s>(
    pairs: VecCollection<'s, u64, (PairedCategory, bool, bool), i64>,
) -> VecCollection<'s, u64, PairedCategory, Four> {
    use crate::stats::paired::PairedCounts;
    use differential_dataflow::AsCollection;
    use timely::container::CapacityContainerBuilder;
    use timely::dataflow::channels::pact::Pipeline;
    use timely::dataflow::operators::Operator;
    type Tables = std::collections::HashMap<(PairedCategory, u64), PairedCounts, foldhash::fast::FixedState>;
    pairs
        .inner
        .unary::<CapacityContainerBuilder<Vec<(PairedCategory, u64, Four)>>, _, _, _>(Pipeline, "Tabled", |_, _| {
            let mut tables = Tables::default();
            move |input, output| {
                input.for_each_stamp(|capability, containers| {
                    for container in containers {
                        for ((category, base_correct, ft_correct), time, diff) in container.drain(..) {
                            tables.entry((category, time)).or_default().add(base_correct, ft_correct, diff);
                        }
                    }
                    let tables = tables
                        .drain()
                        .filter(|(_, t)| !t.is_empty())
                        .map(|((c, time), t)| (c, time, (t.both_correct, t.b, t.c, t.both_wrong)));
                    output.session_with_builder(&capability).give_iterator(tables);
                });
            }
        })
        .as_collection()
}

fn four([a, b, c, d]: [i64; 4]) -> Four {
    (a, b, c, d)
}

/// An observation's answer cell, and what it adds there (responses, refusals, excluded,
/// incorrect; see [`Four`]).
pub fn cell_of(k: &PairKey, o: &Observed) -> (CellKey, [i64; 4]) {
    let key = CellKey {
        model: k.model,
        checkpoint: o.checkpoint,
        ft: o.finetuned,
        epoch: o.epoch,
        dataset: k.dataset,
        amendment: k.amendment,
        prompt_type: k.prompt_type,
    };
    (key, [1, o.refusal as i64, o.correct.is_none() as i64, (o.correct == Some(false)) as i64])
}

/// One epoch's input to [`statistics`]: the observations that can pair, and every
/// observation's answer-cell changes summed per cell.
#[derive(Debug, Default)]
pub struct Epoch {
    observations: Vec<((PairKey, Observed), i64)>,
    /// Per answer cell, the change of each of its counts (see [`Four`]).
    cells: std::collections::HashMap<CellKey, [i64; 4], foldhash::fast::FixedState>,
}

impl Epoch {
    /// Adds an observation with multiplicity `diff`.
    pub fn push(&mut self, key: PairKey, observed: Observed, diff: i64) {
        let (cell, adds) = cell_of(&key, &observed);
        let changes = self.cells.entry(cell).or_default();
        for (change, add) in changes.iter_mut().zip(adds) {
            *change += add * diff;
        }
        if observed.correct.is_some() && observed.test.is_some() {
            self.observations.push(((key, observed), diff));
        }
    }

    pub fn is_empty(&self) -> bool {
        self.observations.is_empty() && self.cells.is_empty()
    }

    /// The observations pending that can pair (those that enter the join).
    pub fn observations(&self) -> usize {
        self.observations.len()
    }
}

/// [`statistics`] on a worker thread of its own; each [`Counts::update`] is one epoch.
pub struct Counts {
    updates: Option<mpsc::Sender<Epoch>>,
    /// In a mutex only so that the view stays `Sync` (it is read from async SQL).
    changes: Mutex<mpsc::Receiver<Changes>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Counts(differential dataflow)")
    }
}

impl Default for Counts {
    fn default() -> Self {
        Counts::start()
    }
}

impl Counts {
    /// Starts the computation on its own thread.
    pub fn start() -> Counts {
        let (updates, inbox) = mpsc::channel::<Epoch>();
        let (outbox, changes) = mpsc::channel::<Changes>();
        // `execute_directly` wants a `Sync` closure; the receiver is moved out once.
        let inbox = Mutex::new(inbox);
        let thread = std::thread::Builder::new()
            .name("candor-counts".into())
            .spawn(move || {
                timely::execute_directly(move |worker| {
                    let inbox = inbox.into_inner().expect("not shared");
                    let out: Rc<RefCell<Changes>> = Rc::default();
                    let probe = timely::dataflow::operators::probe::Handle::new();
                    let (mut input, mut cell_input) = worker.dataflow::<u64, _, _>(|scope| {
                        let (input, observations) = scope.new_collection::<(PairKey, Observed), i64>();
                        let (cell_input, cell_changes) = scope.new_collection::<CellKey, Four>();
                        let (paired, cells) = statistics(observations, cell_changes);
                        let sink = out.clone();
                        paired
                            .inspect_batch(move |_, changes| sink.borrow_mut().paired.extend(moved(changes)))
                            .probe_with(&probe);
                        let sink = out.clone();
                        cells
                            .inspect_batch(move |_, changes| sink.borrow_mut().cells.extend(moved(changes)))
                            .probe_with(&probe);
                        (input, cell_input)
                    });
                    for epoch in inbox {
                        for (data, diff) in epoch.observations {
                            input.update(data, diff);
                        }
                        for (cell, changes) in epoch.cells.into_iter().filter(|(_, c)| *c != [0; 4]) {
                            cell_input.update(cell, four(changes));
                        }
                        let next = input.time() + 1;
                        input.advance_to(next);
                        input.flush();
                        cell_input.advance_to(next);
                        cell_input.flush();
                        while probe.less_than(input.time()) {
                            worker.step();
                        }
                        let changes = consolidated(std::mem::take(&mut *out.borrow_mut()));
                        if outbox.send(changes).is_err() {
                            break;
                        }
                    }
                })
            })
            .expect("spawning the statistics dataflow thread");
        Counts { updates: Some(updates), changes: Mutex::new(changes), thread: Some(thread) }
    }

    /// Applies one batch of observation changes as the next epoch and returns how the counts
    /// moved, once the epoch is complete.
    pub fn update(&mut self, batch: Vec<((PairKey, Observed), i64)>) -> Result<Changes> {
        let mut epoch = Epoch::default();
        for ((key, observed), diff) in batch {
            epoch.push(key, observed, diff);
        }
        if epoch.is_empty() {
            return Ok(Changes::default());
        }
        self.send(epoch)?;
        self.receive()
    }

    /// Hands one epoch to the computation without waiting for it; its changes come from
    /// [`Self::receive`], one per epoch sent, in order. The caller keeps working while the
    /// computation's thread counts.
    pub fn send(&mut self, epoch: Epoch) -> Result<()> {
        self.updates.as_ref().ok_or_else(stopped)?.send(epoch).map_err(|_| stopped())
    }

    /// The changes of the oldest batch sent and not yet received, once its epoch is complete.
    pub fn receive(&mut self) -> Result<Changes> {
        self.changes.get_mut().map_err(|_| stopped())?.recv().map_err(|_| stopped())
    }
}

fn stopped() -> Error {
    Error::Internal("the statistics dataflow stopped".into())
}

/// How much each key's counts moved in a batch of `count`'s output changes: counts `n` coming
/// in (+1) or going out (−1) move its key by ±n.
fn moved<K: Copy>(changes: &[((K, Four), u64, isize)]) -> impl Iterator<Item = (K, Four)> + '_ {
    changes.iter().map(|((k, (a, b, c, d)), _, r)| {
        let r = *r as i64;
        (*k, (a * r, b * r, c * r, d * r))
    })
}

/// Sums the changes of each key and drops those that cancel.
fn consolidated(mut c: Changes) -> Changes {
    differential_dataflow::consolidation::consolidate(&mut c.paired);
    differential_dataflow::consolidation::consolidate(&mut c.cells);
    c
}

impl Drop for Counts {
    fn drop(&mut self) {
        // Closing the channel ends the worker's loop; the dataflow then drains and stops.
        self.updates.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(checkpoint: Sym, finetuned: bool, correct: Option<bool>) -> Observed {
        Observed {
            checkpoint,
            finetuned,
            epoch: finetuned as u64,
            refusal: false,
            correct,
            test: Some(TestType::Normal),
        }
    }

    const KEY: PairKey = PairKey { model: 0, dataset: 1, item: 2, amendment: 3, prompt_type: 4, sample: 0 };

    #[test]
    fn a_pair_counts_once_and_a_retraction_takes_it_back() {
        let mut counts = Counts::start();
        let changes = counts.update(vec![((KEY, obs(10, false, Some(true))), 1)]).unwrap();
        assert!(changes.paired.is_empty(), "a base answer alone pairs with nothing");
        assert_eq!(changes.cells.len(), 1);
        let changes = counts.update(vec![((KEY, obs(11, true, Some(false))), 1)]).unwrap();
        assert_eq!(changes.paired.len(), 1);
        let (category, table) = changes.paired[0];
        assert_eq!((category.base_checkpoint, category.checkpoint, table), (10, 11, (0, 1, 0, 0)));
        // Re-judged: the old verdict out, the new one in, in one epoch: b down, both correct up.
        let changes = counts
            .update(vec![((KEY, obs(11, true, Some(false))), -1), ((KEY, obs(11, true, Some(true))), 1)])
            .unwrap();
        assert_eq!(changes.paired.iter().map(|(_, t)| *t).collect::<Vec<_>>(), vec![(1, -1, 0, 0)]);
        // Excluded answers count in the cells and never pair.
        let changes = counts.update(vec![((KEY, obs(12, true, None)), 1)]).unwrap();
        assert!(changes.paired.is_empty());
        assert_eq!(changes.cells.iter().map(|(_, c)| *c).collect::<Vec<_>>(), vec![(1, 0, 1, 0)]);
        // A retraction takes its counts back.
        let changes = counts.update(vec![((KEY, obs(11, true, Some(true))), -1)]).unwrap();
        assert_eq!(changes.paired.iter().map(|(_, t)| *t).collect::<Vec<_>>(), vec![(-1, 0, 0, 0)]);
        assert_eq!(changes.cells.iter().map(|(_, c)| *c).collect::<Vec<_>>(), vec![(-1, 0, 0, 0)]);
    }
}
