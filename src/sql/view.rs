//! The maintained state behind every statistic: paired counts per family category and answer
//! counts per cell, kept up to date as observations arrive or are retracted.
//!
//! The counts are computed by a differential dataflow ([`super::counts`]): each observation
//! carries a signed multiplicity (`diff`), the base and fine-tuned sides are joined by pair key
//! (model, dataset, item, amendment, prompt type, sample) and counted there, so arrival order,
//! batch boundaries and retractions cannot change the state. The view keeps what the
//! computation is fed (to refuse an observation given twice and to know what a re-judged
//! answer replaces) and the counts it outputs, and marks every family an update touched dirty,
//! so derived results are recomputed for those families only.
//!
//! Pairing (METHOD.md §4): every fine-tuned checkpoint is a candidate paired against every
//! base checkpoint (`is_finetuned = false`) of the same model, the base-checkpoint rule of
//! [`crate::identity::base_checkpoints`]. The "Normal" test takes prompt
//! type `original` only, as the paper's published tables do (its code's filter on
//! `'original neutral'` never matched the data's `original_neutral`); "Sycophancy" takes
//! `correct` and `incorrect`; "Neutral" takes `original_neutral`, the neutral sentence's own
//! effect, reported as a family of its own and never pooled into Normal. The category is the
//! amendment type. Excluded observations (`correct` null) are counted in the cells but never
//! paired.
//!
//! ```
//! use candor::records::Observation;
//! use candor::schema::Record;
//! use candor::sql::view::PairedView;
//! let obs = |ckpt: &str, ft: bool, correct: bool| Observation {
//!     response_key: format!("{ckpt}/q1"), model: "m".into(), checkpoint: ckpt.into(),
//!     checkpoint_epoch: ft as u64, is_finetuned: ft, dataset: "trivia".into(), item_key: "q1".into(),
//!     amendment_type: "unmodified".into(), amendment_group: "unmodified".into(),
//!     prompt_type: "original".into(), sample_index: 0, refusal: false,
//!     verdict: "CORRECT".into(), correct: Some(correct),
//! };
//! let mut view = PairedView::default();
//! view.apply(&Observation::to_batch(&[obs("base", false, true), obs("warm", true, false)]).unwrap(), 1).unwrap();
//! let counts = view.family_counts();
//! assert_eq!(counts.len(), 1);
//! assert_eq!(counts[0].1[0].1.b, 1); // base right, fine-tuned wrong
//! // A re-judged answer moves between cells by retraction.
//! view.upsert(&Observation::to_batch(&[obs("warm", true, true)]).unwrap()).unwrap();
//! assert_eq!(view.family_counts()[0].1[0].1.both_correct, 1);
//! ```

use std::collections::BTreeSet;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, DictionaryArray, Int32Array, Int64Array, RecordBatch, StringArray, UInt32Array,
    UInt64Array,
};
use arrow::datatypes::Int32Type;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::conditions::amendment_group;
use crate::error::{Error, Result};
use crate::stats::models::{CellTable, CodedCell};
use crate::stats::paired::PairedCounts;

use super::counts::{CellKey, Counts, Epoch, Observed, PairKey};
pub use super::counts::{Sym, TestType};

/// The view's maps and sets: keys are small integers, hashed fast (not by SipHash).
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
type HashSet<T> = std::collections::HashSet<T, foldhash::fast::RandomState>;

/// Interns the categorical strings of observations so that keys are small and hashing is cheap.
#[derive(Debug, Default, Clone)]
pub struct Interner {
    ids: HashMap<Arc<str>, Sym>,
    names: Vec<Arc<str>>,
}

impl Interner {
    pub fn intern(&mut self, s: &str) -> Sym {
        if let Some(&id) = self.ids.get(s) {
            return id;
        }
        let id = self.names.len() as Sym;
        let name: Arc<str> = Arc::from(s);
        self.names.push(name.clone());
        self.ids.insert(name, id);
        id
    }

    pub fn get(&self, s: &str) -> Option<Sym> {
        self.ids.get(s).copied()
    }

    pub fn name(&self, id: Sym) -> &str {
        &self.names[id as usize]
    }

    /// Each string's position in name order, by id: comparing ranks orders ids as their names.
    pub fn ranks(&self) -> Vec<u32> {
        let mut order: Vec<u32> = (0..self.names.len() as u32).collect();
        order.sort_unstable_by(|a, b| self.names[*a as usize].cmp(&self.names[*b as usize]));
        let mut rank = vec![0; order.len()];
        for (r, id) in order.into_iter().enumerate() {
            rank[id as usize] = r as u32;
        }
        rank
    }
}

/// One family: the categories of one (model, base checkpoint, candidate checkpoint, dataset,
/// test type).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FamilyKey {
    pub model: Sym,
    pub base_checkpoint: Sym,
    pub checkpoint: Sym,
    pub dataset: Sym,
    pub test_type: TestType,
}

/// One held observation of a pair key, with its multiplicity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Held {
    checkpoint: Sym,
    ft: bool,
    epoch: u64,
    refusal: bool,
    correct: Option<bool>,
    mult: i64,
}

/// Answer counts of one (model, checkpoint, dataset, amendment, prompt type) cell.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CellCounts {
    pub responses: i64,
    pub refusals: i64,
    /// Rows with `correct` null (refusals outside disinfo, unparseable, judge errors).
    pub excluded: i64,
    pub incorrect: i64,
}

impl CellCounts {
    fn is_empty(&self) -> bool {
        *self == CellCounts::default()
    }
}

/// How many observations that can pair [`PairedView::feed`] gathers into one epoch of the
/// counting computation: each epoch has a fixed cost there (its arrangements' batches are
/// merged, every touched count read back), so 8,192-row file batches as epochs of their own
/// cost more than they overlap.
pub const FEED_EPOCH: usize = 32_768;

/// The incrementally maintained paired counts and cells.
#[derive(Debug, Default)]
pub struct PairedView {
    strings: Interner,
    /// What the computation has been fed, by pair key: a key's answers (its base and one
    /// fine-tuned checkpoint, most often) are stored in the map's entry itself, a heap vector
    /// only for a key with more.
    held: HashMap<PairKey, smallvec::SmallVec<[Held; 2]>>,
    /// The computation: pairs joined and counted in differential dataflow.
    counts: Counts,
    /// Changes not yet fed to it.
    pending: Epoch,
    /// Batches fed to it whose counts are not taken in yet ([`PairedView::feed`]).
    in_flight: usize,
    /// Its output: family → category (amendment) → counts.
    paired: HashMap<FamilyKey, HashMap<Sym, PairedCounts>>,
    cells: HashMap<CellKey, CellCounts>,
    /// Epoch of each (model, checkpoint), for trajectories.
    epochs: HashMap<(Sym, Sym), u64>,
    /// The last (model, checkpoint, epoch) written to `epochs`: rows come in runs of one
    /// checkpoint, and a run writes it once.
    last_epoch: Option<(Sym, Sym, u64)>,
    /// The test each prompt type (by symbol) belongs to, once worked out.
    tests: Vec<Option<Option<TestType>>>,
    dirty: HashSet<FamilyKey>,
    cells_dirty: bool,
}

/// A text column of an observation batch: plain, or a dictionary of text (how
/// [`crate::sql::input::each_observation_batch`] reads a Parquet file's categorical columns).
#[derive(Clone, Copy)]
enum Text<'a> {
    Plain(&'a StringArray),
    Coded(&'a Int32Array, &'a StringArray),
}

/// Column accessors of an observation batch.
struct Columns<'a> {
    model: Text<'a>,
    checkpoint: Text<'a>,
    epoch: &'a UInt64Array,
    ft: &'a BooleanArray,
    dataset: Text<'a>,
    item: Text<'a>,
    amendment: Text<'a>,
    prompt_type: Text<'a>,
    sample: &'a UInt32Array,
    refusal: &'a BooleanArray,
    correct: &'a BooleanArray,
}

fn column<'a, T: 'static>(batch: &'a RecordBatch, name: &str) -> Result<&'a T> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| Error::schema("observation", format!("column `{name}` is missing or has the wrong type")))
}

fn text<'a>(batch: &'a RecordBatch, name: &str) -> Result<Text<'a>> {
    if let Some(dictionary) =
        batch.column_by_name(name).and_then(|c| c.as_any().downcast_ref::<DictionaryArray<Int32Type>>())
        && let Some(values) = dictionary.values().as_any().downcast_ref::<StringArray>()
    {
        // Every row must name a value: a null key, or one past the values (a damaged file
        // read without checks), is refused here rather than read as some other value.
        let keys = dictionary.keys();
        if keys.null_count() > 0 || keys.values().iter().any(|&k| k < 0 || k as usize >= values.len()) {
            return Err(Error::schema(
                "observation",
                format!("column `{name}` has a row whose dictionary key is null or names no value"),
            ));
        }
        return Ok(Text::Coded(keys, values));
    }
    column(batch, name).map(Text::Plain)
}

impl<'a> Columns<'a> {
    fn of(batch: &'a RecordBatch) -> Result<Self> {
        Ok(Columns {
            model: text(batch, "model")?,
            checkpoint: text(batch, "checkpoint")?,
            epoch: column(batch, "checkpoint_epoch")?,
            ft: column(batch, "is_finetuned")?,
            dataset: text(batch, "dataset")?,
            item: text(batch, "item_key")?,
            amendment: text(batch, "amendment_type")?,
            prompt_type: text(batch, "prompt_type")?,
            sample: column(batch, "sample_index")?,
            refusal: column(batch, "refusal")?,
            correct: column(batch, "correct")?,
        })
    }
}

/// Interns a column's values: a plain column reuses the previous row's id when the value
/// repeats (columns such as model and checkpoint are constant over long runs); a dictionary
/// column interns each dictionary value once, on first use.
struct RunInterner<'a> {
    column: Text<'a>,
    last: Option<(usize, Sym)>,
    /// A dictionary column's ids, by key.
    coded: Vec<Option<Sym>>,
}

impl<'a> RunInterner<'a> {
    fn new(column: Text<'a>) -> Self {
        let coded = match column {
            Text::Coded(_, values) => vec![None; values.len()],
            Text::Plain(_) => Vec::new(),
        };
        RunInterner { column, last: None, coded }
    }

    fn get(&mut self, strings: &mut Interner, row: usize) -> Sym {
        match self.column {
            Text::Coded(keys, values) => {
                // Every key is in range (checked by `text`).
                let key = keys.value(row) as usize;
                *self.coded[key].get_or_insert_with(|| strings.intern(values.value(key)))
            }
            Text::Plain(column) => {
                let value = column.value(row);
                if let Some((prev, id)) = self.last
                    && column.value(prev) == value
                {
                    return id;
                }
                let id = strings.intern(value);
                self.last = Some((row, id));
                id
            }
        }
    }
}

impl PairedView {
    /// Adds every observation of `batch` with multiplicity `diff` (negative retracts).
    ///
    /// An observation is counted once: adding one the view already holds (same model,
    /// checkpoint, dataset, item, amendment, prompt type and sample) is refused, the rest of
    /// the batch applied, and the first such row named in the error. Re-judged answers go
    /// through [`PairedView::upsert`].
    pub fn apply(&mut self, batch: &RecordBatch, diff: i64) -> Result<()> {
        let fed = self.feed(batch, diff);
        self.settle()?;
        fed
    }

    /// [`PairedView::apply`] without waiting for the counts: once at least [`FEED_EPOCH`]
    /// observations that can pair are pending, they are handed to the counting computation as
    /// one epoch, which counts them on its own thread while the caller reads on (the previous
    /// epoch's counts are taken in first). The families, cells and paired counts lag until
    /// [`PairedView::settle`]. For bulk loading; readers of the counts settle first.
    pub fn feed(&mut self, batch: &RecordBatch, diff: i64) -> Result<()> {
        let mut duplicate = None;
        self.each_row(batch, |view, key, held| {
            if !view.update(key, Held { mult: 0, ..held }, diff) && duplicate.is_none() {
                duplicate = Some(view.describe(&key, &held));
            }
        })?;
        if self.pending.observations() >= FEED_EPOCH {
            self.take_counts()?;
            self.send_pending()?;
        }
        match duplicate {
            Some(d) => Err(Error::schema(
                "observation",
                format!("the observation {d} is given twice; every observation is counted once"),
            )),
            None => Ok(()),
        }
    }

    /// Counts every observation fed and takes the counts in.
    pub fn settle(&mut self) -> Result<()> {
        self.send_pending()?;
        self.take_counts()
    }

    /// Takes in the counts of every epoch handed to the computation.
    fn take_counts(&mut self) -> Result<()> {
        while self.in_flight > 0 {
            let changes = self.counts.receive()?;
            self.in_flight -= 1;
            self.apply_changes(changes);
        }
        Ok(())
    }

    /// Whether counted changes moved an answer cell since the last [`PairedView::take_dirty`].
    pub fn cells_dirty(&self) -> bool {
        self.cells_dirty
    }

    /// Whether every batch fed has been counted (see [`PairedView::feed`]).
    pub fn settled(&self) -> bool {
        self.in_flight == 0 && self.pending.is_empty()
    }

    fn describe(&self, key: &PairKey, v: &Held) -> String {
        let n = |s: Sym| self.strings.name(s).to_string();
        format!(
            "(model {:?}, checkpoint {:?}, dataset {}, item {:?}, amendment {}, prompt type {}, sample {})",
            n(key.model),
            n(v.checkpoint),
            n(key.dataset),
            n(key.item),
            n(key.amendment),
            n(key.prompt_type),
            key.sample
        )
    }

    /// Inserts or replaces observations: a row replaces whatever the view holds for the same
    /// (pair key, checkpoint), by retracting it first. This is how a re-judged answer moves.
    pub fn upsert(&mut self, batch: &RecordBatch) -> Result<()> {
        self.each_row(batch, |view, key, new| {
            let old: Vec<Held> = view
                .held
                .get(&key)
                .map(|v| v.iter().filter(|h| h.checkpoint == new.checkpoint && h.ft == new.ft).copied().collect())
                .unwrap_or_default();
            if old.len() == 1 && old[0].mult == 1 && (Held { mult: 1, ..new }) == old[0] {
                return;
            }
            for h in old {
                view.update(key, Held { mult: 0, ..h }, -h.mult);
            }
            view.update(key, new, 1);
        })?;
        self.settle()
    }

    /// Hands the pending changes to the computation as one epoch, without waiting for it.
    fn send_pending(&mut self) -> Result<()> {
        if !self.pending.is_empty() {
            self.counts.send(std::mem::take(&mut self.pending))?;
            self.in_flight += 1;
        }
        Ok(())
    }

    fn apply_changes(&mut self, changes: super::counts::Changes) {
        for (cell, (both_correct, b, c, both_wrong)) in changes.paired {
            let family = FamilyKey {
                model: cell.model,
                base_checkpoint: cell.base_checkpoint,
                checkpoint: cell.checkpoint,
                dataset: cell.dataset,
                test_type: cell.test_type,
            };
            let categories = self.paired.entry(family).or_default();
            let counts = categories.entry(cell.category).or_default();
            counts.merge(&PairedCounts { both_correct, b, c, both_wrong });
            if counts.is_empty() {
                categories.remove(&cell.category);
                if categories.is_empty() {
                    self.paired.remove(&family);
                }
            }
            self.dirty.insert(family);
        }
        for (key, (responses, refusals, excluded, incorrect)) in changes.cells {
            let cell = self.cells.entry(key).or_default();
            cell.responses += responses;
            cell.refusals += refusals;
            cell.excluded += excluded;
            cell.incorrect += incorrect;
            if cell.is_empty() {
                self.cells.remove(&key);
            }
            self.cells_dirty = true;
        }
    }

    fn each_row(&mut self, batch: &RecordBatch, mut f: impl FnMut(&mut Self, PairKey, Held)) -> Result<()> {
        let c = Columns::of(batch)?;
        let mut strings = std::mem::take(&mut self.strings);
        let (mut model, mut checkpoint, mut dataset) =
            (RunInterner::new(c.model), RunInterner::new(c.checkpoint), RunInterner::new(c.dataset));
        let (mut item, mut amendment, mut prompt_type) =
            (RunInterner::new(c.item), RunInterner::new(c.amendment), RunInterner::new(c.prompt_type));
        for row in 0..batch.num_rows() {
            let key = PairKey {
                model: model.get(&mut strings, row),
                dataset: dataset.get(&mut strings, row),
                item: item.get(&mut strings, row),
                amendment: amendment.get(&mut strings, row),
                prompt_type: prompt_type.get(&mut strings, row),
                sample: c.sample.value(row),
            };
            let held = Held {
                checkpoint: checkpoint.get(&mut strings, row),
                ft: c.ft.value(row),
                epoch: c.epoch.value(row),
                refusal: c.refusal.value(row),
                correct: c.correct.is_valid(row).then(|| c.correct.value(row)),
                mult: 0,
            };
            std::mem::swap(&mut self.strings, &mut strings);
            f(self, key, held);
            std::mem::swap(&mut self.strings, &mut strings);
        }
        self.strings = strings;
        Ok(())
    }

    /// Applies one observation `v` with multiplicity `diff` (`v.mult` is ignored). Adding an
    /// observation the view already holds for the same checkpoint is refused (false).
    fn update(&mut self, key: PairKey, v: Held, diff: i64) -> bool {
        if diff == 0 {
            return true;
        }
        let slots = self.held.entry(key).or_default();
        if diff > 0 && slots.iter().any(|h| h.checkpoint == v.checkpoint && h.ft == v.ft && h.mult > 0) {
            return false;
        }
        let probe = Held { mult: 0, ..v };
        match slots.iter_mut().position(|h| Held { mult: 0, ..*h } == probe) {
            Some(i) => {
                slots[i].mult += diff;
                if slots[i].mult == 0 {
                    slots.swap_remove(i);
                }
            }
            None => slots.push(Held { mult: diff, ..v }),
        }
        if slots.is_empty() {
            self.held.remove(&key);
        }
        if self.last_epoch != Some((key.model, v.checkpoint, v.epoch)) {
            self.epochs.insert((key.model, v.checkpoint), v.epoch);
            self.last_epoch = Some((key.model, v.checkpoint, v.epoch));
        }
        let observed = Observed {
            checkpoint: v.checkpoint,
            finetuned: v.ft,
            epoch: v.epoch,
            refusal: v.refusal,
            correct: v.correct,
            test: self.test_of(key.prompt_type),
        };
        self.pending.push(key, observed, diff);
        true
    }

    /// The test a prompt type (by symbol) belongs to ([`TestType::of`]), worked out once.
    fn test_of(&mut self, prompt_type: Sym) -> Option<TestType> {
        let at = prompt_type as usize;
        if self.tests.len() <= at {
            self.tests.resize(at + 1, None);
        }
        *self.tests[at].get_or_insert_with(|| TestType::of(self.strings.name(prompt_type)))
    }

    /// The families changed since the last call, and whether the cells changed; clears both.
    pub fn take_dirty(&mut self) -> (BTreeSet<FamilyKey>, bool) {
        debug_assert!(self.settled(), "the counts are read before the batches fed are counted");
        let families = self.dirty.drain().collect();
        (families, std::mem::take(&mut self.cells_dirty))
    }

    /// Marks every family dirty (a from-scratch recomputation).
    pub fn mark_all_dirty(&mut self) {
        debug_assert!(self.settled(), "the counts are read before the batches fed are counted");
        self.dirty.extend(self.paired.keys().copied());
        self.cells_dirty = true;
    }

    pub fn strings(&self) -> &Interner {
        &self.strings
    }

    /// Number of families currently held.
    pub fn family_count(&self) -> usize {
        debug_assert!(self.settled(), "the counts are read before the batches fed are counted");
        self.paired.len()
    }

    /// Every family with its categories (amendment names) and counts, sorted by name.
    pub fn family_counts(&self) -> Vec<(FamilyKey, Vec<(String, PairedCounts)>)> {
        debug_assert!(self.settled(), "the counts are read before the batches fed are counted");
        let mut out: Vec<_> = self
            .paired
            .iter()
            .map(|(k, cats)| {
                let mut cats: Vec<_> = cats.iter().map(|(a, c)| (self.strings.name(*a).to_string(), *c)).collect();
                cats.sort_by(|a, b| a.0.cmp(&b.0));
                (*k, cats)
            })
            .collect();
        out.sort_by(|a, b| self.family_names(&a.0).cmp(&self.family_names(&b.0)));
        out
    }

    /// One family's categories (amendment names) and counts, sorted by name (empty when the
    /// family is gone, e.g. after retractions).
    pub fn family_categories(&self, f: &FamilyKey) -> Vec<(String, PairedCounts)> {
        debug_assert!(self.settled(), "the counts are read before the batches fed are counted");
        let mut cats: Vec<_> =
            self.paired.get(f).into_iter().flatten().map(|(a, c)| (self.strings.name(*a).to_string(), *c)).collect();
        cats.sort_by(|a, b| a.0.cmp(&b.0));
        cats
    }

    /// The names of a family's key fields, in key order.
    pub fn family_names(&self, f: &FamilyKey) -> (&str, &str, &str, &str, &'static str) {
        let s = &self.strings;
        (s.name(f.model), s.name(f.base_checkpoint), s.name(f.checkpoint), s.name(f.dataset), f.test_type.as_str())
    }

    /// A checkpoint's answer counts summed over its cells.
    pub fn checkpoint_counts(&self, model: &str, checkpoint: &str) -> CellCounts {
        debug_assert!(self.settled(), "the counts are read before the batches fed are counted");
        let mut total = CellCounts::default();
        let (Some(model), Some(checkpoint)) = (self.strings.get(model), self.strings.get(checkpoint)) else {
            return total;
        };
        for c in self.cells.iter().filter(|(k, _)| k.model == model && k.checkpoint == checkpoint).map(|(_, c)| c) {
            total.responses += c.responses;
            total.refusals += c.refusals;
            total.excluded += c.excluded;
            total.incorrect += c.incorrect;
        }
        total
    }

    /// The paired counts of a fine-tuned checkpoint against one base over all its families
    /// (every dataset, test and category).
    pub fn checkpoint_pairs(&self, model: &str, base: &str, checkpoint: &str) -> PairedCounts {
        debug_assert!(self.settled(), "the counts are read before the batches fed are counted");
        let s = &self.strings;
        let (Some(model), Some(base), Some(checkpoint)) = (s.get(model), s.get(base), s.get(checkpoint)) else {
            return PairedCounts::default();
        };
        let mut total = PairedCounts::default();
        for (_, cats) in self
            .paired
            .iter()
            .filter(|(f, _)| f.model == model && f.base_checkpoint == base && f.checkpoint == checkpoint)
        {
            for c in cats.values() {
                total.merge(c);
            }
        }
        total
    }

    /// Looks a family up by its names.
    pub fn family_key(
        &self,
        model: &str,
        base: &str,
        checkpoint: &str,
        dataset: &str,
        test: &str,
    ) -> Option<FamilyKey> {
        let s = &self.strings;
        Some(FamilyKey {
            model: s.get(model)?,
            base_checkpoint: s.get(base)?,
            checkpoint: s.get(checkpoint)?,
            dataset: s.get(dataset)?,
            test_type: TestType::parse(test)?,
        })
    }

    /// The input of the regressions M1–M4 item by item: answer counts per (model, dataset,
    /// item, amendment, prompt type, fine-tuned), each marked with its item (dataset, item key) as
    /// cluster, over each model's base checkpoint(s) and its latest fine-tuned checkpoint
    /// (highest epoch) — the rows `queries/regression_cells.sql` sums per cell. Rows are in
    /// (dataset, item, model, amendment, prompt type, fine-tuned) name order, items numbered in
    /// that order: nothing about them depends on the order observations arrived in.
    pub fn regression_items(&self) -> CellTable {
        let mut latest: HashMap<Sym, u64> = HashMap::default();
        for held in self.held.iter().flat_map(|(k, v)| v.iter().map(move |h| (k, h))) {
            let (key, h) = held;
            if h.ft && h.mult > 0 {
                let e = latest.entry(key.model).or_insert(h.epoch);
                *e = (*e).max(h.epoch);
            }
        }
        let kept = |key: &PairKey, h: &Held| {
            h.correct.is_some() && h.mult > 0 && (!h.ft || latest.get(&key.model) == Some(&h.epoch))
        };
        // The items (clusters), numbered in (dataset, item) name order, so that neither the
        // numbering nor the rows' order depends on arrival order; and how many answers each
        // holds, for placing the rows item by item without sorting them all.
        let rank = self.strings.ranks();
        let mut items: HashMap<(Sym, Sym), u32> = HashMap::default();
        let mut sizes: Vec<u32> = Vec::new();
        for (key, slots) in &self.held {
            for _ in slots.iter().filter(|h| kept(key, h)) {
                let next = sizes.len() as u32;
                let i = *items.entry((key.dataset, key.item)).or_insert(next);
                if i == next {
                    sizes.push(0);
                }
                sizes[i as usize] += 1;
            }
        }
        let mut order: Vec<(Sym, Sym)> = items.keys().copied().collect();
        order.sort_unstable_by_key(|&(dataset, item)| (rank[dataset as usize], rank[item as usize]));
        let mut start = vec![0usize; order.len() + 1];
        for (number, k) in order.iter().enumerate() {
            let i = items.get_mut(k).expect("collected above");
            start[number + 1] = start[number] + sizes[*i as usize] as usize;
            *i = number as u32;
        }
        drop(sizes);
        // Each column's code of a name, worked out once per symbol, and the name's rank by code.
        let mut table = CellTable::new();
        let mut columns: [(Vec<u32>, Vec<u32>); 4] = Default::default();
        let mut code = |column: usize, sym: Sym, table: &mut CellTable| {
            let (codes, ranks) = &mut columns[column];
            if codes.is_empty() {
                codes.resize(rank.len(), u32::MAX);
            }
            if codes[sym as usize] == u32::MAX {
                let name = &self.strings.names[sym as usize];
                codes[sym as usize] = match column {
                    0 => table.model(name),
                    1 => table.dataset(name),
                    2 => table.amendment_type(name),
                    _ => table.prompt_type(name),
                };
                ranks.push(rank[sym as usize]);
            }
            codes[sym as usize]
        };
        let empty = CodedCell {
            model: 0,
            dataset: 0,
            amendment_type: 0,
            prompt_type: 0,
            ft: false,
            incorrect: 0,
            n: 0,
            cluster: CodedCell::NO_CLUSTER,
        };
        let mut rows = vec![empty; start[order.len()]];
        let mut next = start.clone();
        for (key, slots) in &self.held {
            for h in slots.iter().filter(|h| kept(key, h)) {
                let number = items[&(key.dataset, key.item)];
                let at = next[number as usize];
                next[number as usize] += 1;
                let answers = u32::try_from(h.mult).expect("a held answer's multiplicity fits 32 bits");
                rows[at] = CodedCell {
                    model: code(0, key.model, &mut table),
                    dataset: code(1, key.dataset, &mut table),
                    amendment_type: code(2, key.amendment, &mut table),
                    prompt_type: code(3, key.prompt_type, &mut table),
                    ft: h.ft,
                    incorrect: if h.correct == Some(false) { answers } else { 0 },
                    n: answers,
                    cluster: number,
                };
            }
        }
        drop(items);
        // Within an item: in (model, amendment, prompt type, fine-tuned) name order, the
        // answers of one cell (its samples) summed into one row.
        let [(_, model_rank), _, (_, amendment_rank), (_, prompt_rank)] = &columns;
        // The three 32-bit ranks and the side packed into one integer, compared as one; worked
        // out once per row by the sort.
        let sort_key = |r: &CodedCell| {
            let rank = |ranks: &[u32], code: u32| u128::from(ranks[code as usize]);
            (rank(model_rank, r.model) << 65)
                | (rank(amendment_rank, r.amendment_type) << 33)
                | (rank(prompt_rank, r.prompt_type) << 1)
                | u128::from(r.ft)
        };
        let mut out = 0;
        for number in 0..order.len() {
            let item = &mut rows[start[number]..start[number + 1]];
            item.sort_by_cached_key(sort_key);
            let mut cells = 0;
            for i in 0..item.len() {
                if cells > 0 && sort_key(&item[cells - 1]) == sort_key(&item[i]) {
                    let r = item[i];
                    let m = &mut item[cells - 1];
                    m.incorrect = m.incorrect.checked_add(r.incorrect).expect("an item cell's answers fit 32 bits");
                    m.n = m.n.checked_add(r.n).expect("an item cell's answers fit 32 bits");
                } else {
                    item[cells] = item[i];
                    cells += 1;
                }
            }
            // `out` never passes this item's start: rows only merge.
            rows.copy_within(start[number]..start[number] + cells, out);
            out += cells;
        }
        rows.truncate(out);
        table.with_rows(rows)
    }

    /// The `paired_counts` table (see [`paired_counts_schema`]), restricted to `only` when given,
    /// sorted by family and category.
    pub fn paired_counts_batch(&self, only: Option<&BTreeSet<FamilyKey>>) -> Result<RecordBatch> {
        debug_assert!(self.settled(), "the counts are read before the batches fed are counted");
        let mut rows: Vec<(FamilyKey, Sym, PairedCounts)> = Vec::new();
        let mut push = |k: &FamilyKey, cats: &HashMap<Sym, PairedCounts>| {
            rows.extend(cats.iter().map(|(a, c)| (*k, *a, *c)));
        };
        match only {
            Some(keys) => keys.iter().filter_map(|k| self.paired.get(k).map(|c| (k, c))).for_each(|(k, c)| push(k, c)),
            None => self.paired.iter().for_each(|(k, c)| push(k, c)),
        }
        let s = &self.strings;
        rows.sort_by(|a, b| (self.family_names(&a.0), s.name(a.1)).cmp(&(self.family_names(&b.0), s.name(b.1))));
        let strs = |v: Vec<&str>| -> ArrayRef { Arc::new(StringArray::from(v)) };
        let ints = |f: &dyn Fn(&PairedCounts) -> i64| -> ArrayRef {
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| f(&r.2))))
        };
        let epochs: ArrayRef = Arc::new(UInt64Array::from_iter_values(
            rows.iter().map(|r| self.epochs.get(&(r.0.model, r.0.checkpoint)).copied().unwrap_or(0)),
        ));
        let columns = vec![
            strs(rows.iter().map(|r| s.name(r.0.model)).collect()),
            strs(rows.iter().map(|r| s.name(r.0.base_checkpoint)).collect()),
            strs(rows.iter().map(|r| s.name(r.0.checkpoint)).collect()),
            epochs,
            strs(rows.iter().map(|r| s.name(r.0.dataset)).collect()),
            strs(rows.iter().map(|r| r.0.test_type.as_str()).collect()),
            strs(rows.iter().map(|r| s.name(r.1)).collect()),
            ints(&|c| c.both_correct),
            ints(&|c| c.b),
            ints(&|c| c.c),
            ints(&|c| c.both_wrong),
        ];
        RecordBatch::try_new(paired_counts_schema(), columns).map_err(|e| Error::arrow("paired_counts", e))
    }

    /// The `cells` table (see [`cells_schema`]), sorted.
    pub fn cells_batch(&self) -> Result<RecordBatch> {
        debug_assert!(self.settled(), "the counts are read before the batches fed are counted");
        let s = &self.strings;
        let mut rows: Vec<(&CellKey, &CellCounts)> = self.cells.iter().collect();
        let names = |k: &CellKey| {
            (
                s.name(k.model),
                k.epoch,
                s.name(k.checkpoint),
                s.name(k.dataset),
                s.name(k.amendment),
                s.name(k.prompt_type),
                k.ft,
            )
        };
        rows.sort_by(|a, b| names(a.0).cmp(&names(b.0)));
        let strs = |v: Vec<&str>| -> ArrayRef { Arc::new(StringArray::from(v)) };
        let ints = |f: &dyn Fn(&CellCounts) -> i64| -> ArrayRef {
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| f(r.1))))
        };
        let columns = vec![
            strs(
                rows.iter()
                    .map(|r| {
                        let k = r.0;
                        s.name(k.model)
                    })
                    .collect(),
            ),
            strs(
                rows.iter()
                    .map(|r| {
                        let k = r.0;
                        s.name(k.checkpoint)
                    })
                    .collect(),
            ),
            Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.0.epoch))) as ArrayRef,
            Arc::new(BooleanArray::from_iter(rows.iter().map(|r| Some(r.0.ft)))) as ArrayRef,
            strs(
                rows.iter()
                    .map(|r| {
                        let k = r.0;
                        s.name(k.dataset)
                    })
                    .collect(),
            ),
            strs(
                rows.iter()
                    .map(|r| {
                        let k = r.0;
                        s.name(k.amendment)
                    })
                    .collect(),
            ),
            strs(
                rows.iter()
                    .map(|r| {
                        let k = r.0;
                        amendment_group(s.name(k.amendment))
                    })
                    .collect(),
            ),
            strs(
                rows.iter()
                    .map(|r| {
                        let k = r.0;
                        s.name(k.prompt_type)
                    })
                    .collect(),
            ),
            ints(&|c| c.responses),
            ints(&|c| c.refusals),
            ints(&|c| c.excluded),
            ints(&|c| c.responses - c.excluded),
            ints(&|c| c.incorrect),
        ];
        RecordBatch::try_new(cells_schema(), columns).map_err(|e| Error::arrow("cells", e))
    }
}

/// Columns of the maintained `paired_counts` table: one row per family category.
pub fn paired_counts_schema() -> SchemaRef {
    let s = |n: &str| Field::new(n, DataType::Utf8, false);
    let i = |n: &str| Field::new(n, DataType::Int64, false);
    Arc::new(Schema::new(vec![
        s("model"),
        s("base_checkpoint"),
        s("checkpoint"),
        Field::new("checkpoint_epoch", DataType::UInt64, false),
        s("dataset"),
        s("test_type"),
        s("category"),
        i("both_correct"),
        i("b"),
        i("c"),
        i("both_wrong"),
    ]))
}

/// Columns of the maintained `cells` table: answer counts per (model, checkpoint, dataset,
/// amendment, prompt type); `n` counts the included answers, `incorrect` those judged wrong.
pub fn cells_schema() -> SchemaRef {
    let s = |n: &str| Field::new(n, DataType::Utf8, false);
    let i = |n: &str| Field::new(n, DataType::Int64, false);
    Arc::new(Schema::new(vec![
        s("model"),
        s("checkpoint"),
        Field::new("checkpoint_epoch", DataType::UInt64, false),
        Field::new("is_finetuned", DataType::Boolean, false),
        s("dataset"),
        s("amendment_type"),
        s("amendment_group"),
        s("prompt_type"),
        i("responses"),
        i("refusals"),
        i("excluded"),
        i("n"),
        i("incorrect"),
    ]))
}
