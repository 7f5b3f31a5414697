//! The score stage in the dataflow: the refusal rules and the judge applied to response
//! batches ([`ScoreStage`]), and the dataflows that end in it: scoring given responses
//! ([`score_responses`], for an import or a stream), replaying or re-judging an archive
//! ([`replay`], [`rescore`]), and generating then scoring an experiment's checkpoints
//! ([`run_experiment`], `candor run`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use arrow::record_batch::RecordBatch;
use timely::dataflow::StreamVec;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::operator::Operator;
use timely::dataflow::operators::{Capability, Concat};

use super::judge::{Case, Judge, Label};
use super::refusal::RefusalRules;
use crate::archive::{Archive, read_records};
use crate::conditions::{Dataset, VerdictLabel};
use crate::dataflow::{
    Batch, Cluster, Epoch, EpochDone, GRID_EPOCH, Msg, Session, Stage, archived, dimension, dimensions, only,
    partition_by, requests, run, stream_of,
};
use crate::error::{Error, Result, StageError};
use crate::identity::CheckpointRef;
use crate::records::{Item, Observation, Response, Trial, Verdict};
use crate::schema::Record;

/// A judge shared by the workers of one process.
pub type SharedJudge = Arc<Mutex<Box<dyn Judge>>>;

/// Shares `judge` among the workers of one process.
pub fn shared_judge(judge: Box<dyn Judge>) -> SharedJudge {
    Arc::new(Mutex::new(judge))
}

/// The warmth scorer of an experiment's `[warmth]`, shared by the workers of one process and
/// opened when the first answer is scored (a stream fed only answer records with verdicts,
/// or a process whose workers answer nothing, never loads its model).
pub type SharedWarmth = Arc<Mutex<(crate::warmth::WarmthConfig, Option<crate::warmth::AnswerWarmth>)>>;

/// The shared warmth scorer of `config`, if the experiment has one.
pub fn shared_warmth(config: Option<&crate::warmth::WarmthConfig>) -> Option<SharedWarmth> {
    config.map(|c| Arc::new(Mutex::new((c.clone(), None))))
}

/// The refusal and judge operators in one stage: response batches → verdict and observation
/// batches. What a response is scored against is reference data that reaches the stage in the
/// dataflow ([`ScoreStage::absorb`]; [`crate::dataflow::dimensions`] routes it): the trials of
/// the responses this worker scores, the items a judge reads, and the verdicts responses were
/// given. A response is scored with its given verdict when it has one (an import, a replay, an
/// answer record that carries one), else by the judge when there is one; with neither it stays
/// archived unscored.
pub struct ScoreStage {
    trials: HashMap<String, Trial>,
    /// Items by (dataset, item key), for the judge.
    items: HashMap<(String, String), Item>,
    /// Given verdicts by response key, until their response is scored.
    labels: HashMap<String, Label>,
    refusal: RefusalRules,
    judge: Option<SharedJudge>,
    warmth: Option<SharedWarmth>,
}

impl ScoreStage {
    pub fn new(refusal: RefusalRules) -> Self {
        ScoreStage {
            trials: HashMap::new(),
            items: HashMap::new(),
            labels: HashMap::new(),
            refusal,
            judge: None,
            warmth: None,
        }
    }

    /// Judges responses that have no given verdict.
    pub fn with_judge(mut self, judge: Option<SharedJudge>) -> Self {
        self.judge = judge;
        self
    }

    /// Scores every response's warmth too (a `warmth` row each, archived in the same epoch).
    pub fn with_warmth(mut self, warmth: Option<SharedWarmth>) -> Self {
        self.warmth = warmth;
        self
    }

    /// Takes in reference data: trials, items, or given verdicts (verdict rows; see
    /// [`given_verdicts`]).
    pub fn absorb(&mut self, batch: &RecordBatch) -> Result<()> {
        match stream_of(batch) {
            Trial::STREAM => {
                self.trials.extend(Trial::from_batch(batch)?.into_iter().map(|t| (t.trial_key.clone(), t)));
            }
            Item::STREAM => {
                self.items
                    .extend(Item::from_batch(batch)?.into_iter().map(|i| ((i.dataset.clone(), i.item_key.clone()), i)));
            }
            Verdict::STREAM => {
                for v in Verdict::from_batch(batch)? {
                    let verdict = VerdictLabel::parse_loose(&v.verdict).ok_or_else(|| {
                        Error::schema(
                            "verdict",
                            format!("response `{}` was given unknown verdict `{}`", v.response_key, v.verdict),
                        )
                    })?;
                    self.labels.insert(v.response_key, Label { verdict, judge: v.judge, raw: v.judge_raw });
                }
            }
            other => {
                return Err(Error::Internal(format!("the score stage takes no reference data of stream `{other}`")));
            }
        }
        Ok(())
    }
}

/// Labels for `responses` (None: left unscored): given verdicts first (each taken once),
/// then the judge's.
fn labels_for(
    given: &mut HashMap<String, Label>,
    items: &HashMap<(String, String), Item>,
    judge: Option<&SharedJudge>,
    responses: &[(Response, &Trial, Dataset)],
) -> Result<Vec<Option<Label>>> {
    let mut out: Vec<Option<Label>> = responses.iter().map(|(r, _, _)| given.remove(&r.response_key)).collect();
    let Some(judge) = judge else { return Ok(out) };
    let mut cases = Vec::new();
    let mut at = Vec::new();
    for (i, (r, t, dataset)) in responses.iter().enumerate() {
        if out[i].is_some() {
            continue;
        }
        let item = items.get(&(t.dataset.clone(), t.item_key.clone())).ok_or_else(|| {
            Error::schema(
                "trial",
                format!("trial `{}` names item `{}`, which is not in the item stream", t.trial_key, t.item_key),
            )
        })?;
        cases.push(Case { dataset: *dataset, item, output: &r.output });
        at.push(i);
    }
    if cases.is_empty() {
        return Ok(out);
    }
    let judged = judge.lock().map_err(|_| Error::Internal("the judge panicked".into()))?.judge(&cases)?;
    for (i, v) in at.into_iter().zip(judged) {
        out[i] = Some(v);
    }
    Ok(out)
}

/// The verdict row of response `r` labelled `label`, with the refusal phrase found in it.
fn verdict_row(r: &Response, label: &Label, refusal_phrase: Option<String>) -> Verdict {
    Verdict {
        response_key: r.response_key.clone(),
        trial_key: r.trial_key.clone(),
        model: r.model.clone(),
        checkpoint: r.checkpoint.clone(),
        checkpoint_epoch: r.checkpoint_epoch,
        sample_index: r.sample_index,
        refusal: refusal_phrase.is_some(),
        refusal_phrase,
        verdict: label.verdict.to_string(),
        judge: label.judge.clone(),
        judge_raw: label.raw.clone(),
    }
}

/// The verdicts `labels` give `responses`, as reference data for the score stage (verdict rows
/// marked [`crate::dataflow::dimension`], routed with their responses): None when none of
/// `responses` has one.
pub fn given_verdicts(responses: &[Response], labels: &HashMap<String, Label>) -> Result<Option<RecordBatch>> {
    let rows: Vec<Verdict> = responses
        .iter()
        .filter_map(|r| {
            // The refusal rules run when the stage scores it; a given verdict carries none.
            labels.get(&r.response_key).map(|l| verdict_row(r, l, None))
        })
        .collect();
    if rows.is_empty() {
        return Ok(None);
    }
    Ok(Some(dimension(Verdict::to_batch(&rows)?)))
}

/// The score operator: scores the responses of each time once the reference data of that time
/// (`reference`, from [`crate::dataflow::dimensions`]) is complete, and sooner never: a trial
/// or a verdict fed with its responses may reach this worker after them. `responses` must be
/// routed by `trial_key`, as the reference data is.
pub fn score<'s>(
    reference: StreamVec<'s, Epoch, Msg>,
    responses: StreamVec<'s, Epoch, Msg>,
    mut stage: ScoreStage,
) -> StreamVec<'s, Epoch, Msg> {
    reference.binary_frontier(responses, Pipeline, Pipeline, "Score", move |_cap, _info| {
        let mut known: BTreeMap<Epoch, (Capability<Epoch>, Vec<RecordBatch>)> = BTreeMap::new();
        let mut waiting: BTreeMap<Epoch, (Capability<Epoch>, Vec<Msg>)> = BTreeMap::new();
        move |(reference, frontier), (input, _), output| {
            reference.for_each_stamp(|cap, data| {
                let Some(cap) = cap.retain_least(0) else { return };
                let entry = known.entry(*cap.time()).or_insert_with(|| (cap.clone(), Vec::new()));
                for msg in data.flat_map(|d| d.drain(..)) {
                    match msg {
                        Ok(b) => entry.1.push(b.0),
                        Err(e) => output.session(&cap).give(Err(e)),
                    }
                }
            });
            input.for_each_stamp(|cap, data| {
                let Some(cap) = cap.retain_least(0) else { return };
                let entry = waiting.entry(*cap.time()).or_insert_with(|| (cap.clone(), Vec::new()));
                entry.1.extend(data.flat_map(|d| d.drain(..)));
            });
            let complete = |t: &Epoch| !frontier.frontier().less_equal(t);
            while let Some(entry) = known.first_entry() {
                if !complete(entry.key()) {
                    break;
                }
                let (cap, batches) = entry.remove();
                for b in batches {
                    if let Err(e) = stage.absorb(&b) {
                        output.session(&cap).give(Err(StageError::new(stage.name(), &e)));
                    }
                }
            }
            while let Some(entry) = waiting.first_entry() {
                if !complete(entry.key()) {
                    break;
                }
                let time = *entry.key();
                let (cap, msgs) = entry.remove();
                let mut session = output.session(&cap);
                for msg in msgs {
                    match msg {
                        Ok(batch) => match stage.apply(time, &batch.0) {
                            Ok(outs) => session.give_iterator(outs.into_iter().map(|b| Ok(Batch(b)))),
                            Err(e) => session.give(Err(StageError::new(stage.name(), &e))),
                        },
                        Err(e) => session.give(Err(e)),
                    }
                }
            }
        }
    })
}

impl Stage for ScoreStage {
    fn name(&self) -> &str {
        "score"
    }
    fn apply(&mut self, _epoch: Epoch, batch: &RecordBatch) -> Result<Vec<RecordBatch>> {
        if stream_of(batch) != Response::STREAM {
            return Ok(Vec::new());
        }
        let trials = &self.trials;
        let mut rows = Vec::new();
        for r in Response::from_batch(batch)? {
            let trial = trials.get(&r.trial_key).ok_or_else(|| {
                Error::schema(
                    "response",
                    format!(
                        "response `{}` answers trial `{}`, which is not in the trial stream",
                        r.response_key, r.trial_key
                    ),
                )
            })?;
            let dataset: Dataset = trial.dataset.parse().map_err(|m: String| Error::schema("trial", m))?;
            rows.push((r, trial, dataset));
        }
        let labels = labels_for(&mut self.labels, &self.items, self.judge.as_ref(), &rows)?;
        let warmth = match &self.warmth {
            Some(shared) => {
                let mut guard = shared.lock().map_err(|_| Error::Internal("the warmth scorer panicked".into()))?;
                let (config, scorer) = &mut *guard;
                if scorer.is_none() {
                    *scorer = Some(crate::warmth::AnswerWarmth::open(config)?);
                }
                let answers: Vec<(&Response, &str)> = rows.iter().map(|(r, t, _)| (r, t.prompt.as_str())).collect();
                let scored = scorer.as_ref().expect("opened above").rows(&answers)?;
                Some(crate::records::WarmthScore::to_batch(&scored)?)
            }
            None => None,
        };
        let mut verdicts = Vec::new();
        let mut observations = Vec::new();
        for ((r, trial, dataset), label) in rows.into_iter().zip(labels) {
            // Without a label there is nothing to judge yet: the response stays archived.
            let Some(label) = label else { continue };
            let phrase = self.refusal.detect(&r.output);
            let (verdict, correct) = crate::score::observe(dataset, phrase.is_some(), label.verdict);
            verdicts.push(verdict_row(&r, &label, phrase.clone()));
            observations.push(Observation {
                response_key: r.response_key,
                model: r.model,
                checkpoint: r.checkpoint,
                checkpoint_epoch: r.checkpoint_epoch,
                is_finetuned: r.is_finetuned,
                dataset: trial.dataset.clone(),
                item_key: trial.item_key.clone(),
                amendment_type: trial.amendment_type.clone(),
                amendment_group: trial.amendment_group.clone(),
                prompt_type: trial.prompt_type.clone(),
                sample_index: r.sample_index,
                refusal: phrase.is_some(),
                verdict: verdict.to_string(),
                correct,
            });
        }
        Ok([Verdict::to_batch(&verdicts)?, Observation::to_batch(&observations)?].into_iter().chain(warmth).collect())
    }
}

/// Scores responses: `trials` (all of them, the dimension table) and `new_trials` and
/// `new_items` (the ones to archive, at `trials_epoch`) plus responses at their checkpoint
/// epochs go in; the items, trials, responses, verdicts and observations are archived. With
/// `judging`, responses without a given verdict are judged against its items.
#[allow(clippy::too_many_arguments)]
pub fn score_responses(
    cluster: &Cluster,
    archive: &Archive,
    trials: Vec<Trial>,
    new_trials: Vec<Trial>,
    new_items: Vec<Item>,
    trials_epoch: Epoch,
    responses: Vec<(Epoch, RecordBatch)>,
    labels: HashMap<String, Label>,
    refusal: RefusalRules,
    judging: Option<(Vec<Item>, Box<dyn Judge>)>,
) -> Result<Vec<EpochDone>> {
    let total: u64 = responses.iter().map(|(_, b)| b.num_rows() as u64).sum();
    // The reference data comes first, at the first time anything is fed.
    let first = responses.iter().map(|(e, _)| *e).chain([trials_epoch]).min().unwrap_or(trials_epoch);
    let mut sources: Vec<(Epoch, RecordBatch)> = Vec::new();
    let (items, judge) = match judging {
        Some((items, judge)) => (items, Some(shared_judge(judge))),
        None => (Vec::new(), None),
    };
    sources.extend(reference(&trials, &items)?.into_iter().map(|b| (first, b)));
    if !new_items.is_empty() {
        sources.push((trials_epoch, Item::to_batch(&new_items)?));
    }
    if !new_trials.is_empty() {
        sources.push((trials_epoch, Trial::to_batch(&new_trials)?));
    }
    for (epoch, batch) in responses {
        let given = if labels.is_empty() { None } else { given_verdicts(&Response::from_batch(&batch)?, &labels)? };
        sources.push((epoch, batch));
        sources.extend(given.map(|v| (epoch, v)));
    }
    // Stable: within an epoch, reference data before what it is needed for.
    sources.sort_by_key(|(e, _)| *e);
    run(cluster, archive, sources, Some(total * 3), move |input, peers| {
        let reference = dimensions(input.clone(), peers);
        scoring(input, reference, peers, ScoreStage::new(refusal.clone()).with_judge(judge.clone()))
    })
}

/// Trials and items as reference data for the score stage ([`crate::dataflow::dimension`]).
fn reference(trials: &[Trial], items: &[Item]) -> Result<Vec<RecordBatch>> {
    let mut out = Vec::new();
    for chunk in trials.chunks(4096) {
        out.push(dimension(Trial::to_batch(chunk)?));
    }
    for chunk in items.chunks(4096) {
        out.push(dimension(Item::to_batch(chunk)?));
    }
    Ok(out)
}

/// The scoring dataflow: what the input carries to archive is archived, and its responses
/// are scored by `stage` on the worker their trial is routed to, against `reference` (the
/// input's [`dimensions`]).
fn scoring<'s>(
    input: StreamVec<'s, Epoch, Msg>,
    reference: StreamVec<'s, Epoch, Msg>,
    peers: usize,
    stage: ScoreStage,
) -> StreamVec<'s, Epoch, Msg> {
    let kept = archived(input);
    let responses = partition_by(only(kept.clone(), Response::STREAM), "trial_key", peers);
    kept.concat(score(reference, responses, stage))
}

/// A judge opened at its first use.
struct LazyJudge {
    config: crate::score::judge::JudgeConfig,
    root: std::path::PathBuf,
    judge: Option<Box<dyn Judge>>,
}

impl Judge for LazyJudge {
    fn judge(&mut self, cases: &[Case]) -> Result<Vec<Label>> {
        if self.judge.is_none() {
            self.judge = Some(crate::score::judge::open(&self.config, &self.root)?);
        }
        self.judge.as_mut().expect("opened above").judge(cases)
    }
}

/// The scoring dataflow of [`score_responses`], started once and fed as checkpoints complete
/// (`candor stream`): one timely computation for the life of the command, each checkpoint one
/// round of it, committed as the checkpoint's epoch ([`crate::dataflow::Session`]). A
/// checkpoint with answers is scored with the verdicts they carry; with an experiment, a
/// checkpoint announced without answers is generated in the same computation (the generate
/// operator of `candor run`, then the experiment's refusal rules and judge).
///
/// Everything the workers need travels in the dataflow (trials, items and given verdicts as
/// reference data, who answers with each request), so the workers of every process of a
/// cluster take part; the driver runs in the process that reads the sources and holds the
/// archive (process 0). The other processes start the same scorer with nothing to feed
/// ([`Scorer::start`] with `driver` false) and wait for it to end ([`Scorer::stop`]).
pub struct Scorer {
    session: Session,
    archive: Archive,
    /// The trials of the archive and of the rounds fed (what is generated for, and what a new
    /// answer's trial is checked against).
    trials: HashMap<String, Trial>,
    /// Whether checkpoints can be generated (started with an experiment).
    generation: bool,
}

impl Scorer {
    /// Starts the dataflow; `trials` are those the archive holds (none on a process that does
    /// not drive it). With `experiment`, its `[[models]]` can generate ([`Self::generate`]).
    pub fn start(
        cluster: &Cluster,
        archive: &Archive,
        trials: Vec<Trial>,
        refusal: RefusalRules,
        experiment: Option<(&crate::config::Experiment, crate::generate::OpenGenerator)>,
    ) -> Result<Scorer> {
        use crate::generate::operator::{Counters, GeneratePlan, generate};
        let mut items = Vec::new();
        let warmth = experiment.as_ref().and_then(|(exp, _)| shared_warmth(exp.warmth.as_ref()));
        let generation = match experiment {
            Some((exp, open)) => {
                let plan = Arc::new(GeneratePlan {
                    generation: exp.generation.clone(),
                    seed: exp.seed,
                    archive_root: archive.root().to_path_buf(),
                    open,
                });
                // Opened when the first generated answer is judged: a stream fed answer
                // records only never loads the judge.
                let judge = LazyJudge { config: exp.judge.clone(), root: archive.root().to_path_buf(), judge: None };
                if cluster.is_leader() {
                    items = read_records(archive)?;
                }
                Some((
                    plan,
                    Arc::new(Counters::default()),
                    RefusalRules::new(exp.refusal.mode),
                    shared_judge(Box::new(judge)),
                ))
            }
            None => None,
        };
        let preload = reference(&trials, &items)?;
        let g = generation.clone();
        let session = Session::start(cluster, archive, preload, move |input, peers| {
            // Routed once, read by both score stages.
            let reference = dimensions(input.clone(), peers);
            let mut out = scoring(input.clone(), reference.clone(), peers, ScoreStage::new(refusal.clone()));
            if let Some((plan, counters, refusal, judge)) = &g {
                let generated =
                    generate(partition_by(requests(input), "trial_key", peers), plan.clone(), counters.clone(), None);
                let judged = score(
                    reference,
                    generated.clone(),
                    ScoreStage::new(refusal.clone()).with_judge(Some(judge.clone())).with_warmth(warmth.clone()),
                );
                out = out.concat(generated).concat(judged);
            }
            out
        })?;
        Ok(Scorer {
            session,
            archive: archive.clone(),
            trials: trials.into_iter().map(|t| (t.trial_key.clone(), t)).collect(),
            generation: generation.is_some(),
        })
    }

    /// Whether the dataflow holds a trial (archived, or archived by an earlier round).
    pub fn has_trial(&self, trial_key: &str) -> bool {
        self.trials.contains_key(trial_key)
    }

    /// Whether checkpoints can be generated (the scorer was started with an experiment).
    pub fn can_generate(&self) -> bool {
        self.generation
    }

    /// Feeds the generation of a registered checkpoint's answers to every trial held (or,
    /// with `items`, to the trials of those (dataset, item key) only), as one round committed
    /// as `epoch`; [`Self::wait`] returns when it is archived and scored.
    pub fn generate(
        &mut self,
        epoch: Epoch,
        model: crate::model::ModelConfig,
        checkpoint: crate::model::CheckpointConfig,
        items: Option<&std::collections::BTreeSet<(String, String)>>,
    ) -> Result<()> {
        use crate::generate::operator::{CheckpointPlan, as_request, trial_batches};
        if !self.generation {
            return Err(Error::Internal("generation without an experiment".into()));
        }
        let mut trials: Vec<Trial> = self
            .trials
            .values()
            .filter(|t| items.is_none_or(|i| i.contains(&(t.dataset.clone(), t.item_key.clone()))))
            .cloned()
            .collect();
        trials.sort_by(|a, b| a.trial_key.cmp(&b.trial_key));
        if trials.is_empty() {
            return Err(Error::config("trials", format!("{} holds no trial grid", self.archive.root().display())));
        }
        let plan = CheckpointPlan { epoch, model, checkpoint };
        let batches = trial_batches(&trials, 256)?.into_iter().map(|b| as_request(b, &plan)).collect();
        self.session.feed(epoch, batches)
    }

    /// A seeded sample of `per_dataset` items of each dataset among the trials held (all of a
    /// dataset's items when it has no more), the same for every call with the same seed: the
    /// items a subsampled checkpoint answers.
    pub fn sample_items(&self, per_dataset: usize, seed: u64) -> Result<std::collections::BTreeSet<(String, String)>> {
        use rand::SeedableRng;
        use rand::seq::SliceRandom;
        let mut by_dataset: BTreeMap<&str, std::collections::BTreeSet<&str>> = BTreeMap::new();
        for t in self.trials.values() {
            by_dataset.entry(t.dataset.as_str()).or_default().insert(t.item_key.as_str());
        }
        let mut out = std::collections::BTreeSet::new();
        for (dataset, items) in by_dataset {
            let mut items: Vec<&str> = items.into_iter().collect();
            let mut rng =
                rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ crate::dataflow::stable_hash(dataset.as_bytes()));
            items.shuffle(&mut rng);
            out.extend(items.into_iter().take(per_dataset).map(|i| (dataset.to_string(), i.to_string())));
        }
        Ok(out)
    }

    /// Feeds responses to score as [`score_responses`] does: `new_trials` are archived with
    /// epoch `trials_epoch`, each epoch's responses are one round, with the verdicts `labels`
    /// give them (rows, so that the verdicts are built without reading a batch back).
    pub fn score(
        &mut self,
        new_trials: Vec<Trial>,
        trials_epoch: Epoch,
        responses: Vec<(Epoch, Vec<Response>)>,
        labels: HashMap<String, Label>,
    ) -> Result<()> {
        let mut rounds: BTreeMap<Epoch, Vec<RecordBatch>> = BTreeMap::new();
        if !new_trials.is_empty() {
            // Archived with the first round, and reference data for it and every later one.
            let round = rounds.entry(trials_epoch).or_default();
            round.push(Trial::to_batch(&new_trials)?);
            round.extend(reference(&new_trials, &[])?);
            self.trials.extend(new_trials.into_iter().map(|t| (t.trial_key.clone(), t)));
        }
        for (epoch, rows) in responses {
            let round = rounds.entry(epoch).or_default();
            round.push(Response::to_batch(&rows)?);
            round.extend(given_verdicts(&rows, &labels)?);
        }
        for (epoch, batches) in rounds {
            self.session.feed(epoch, batches)?;
        }
        Ok(())
    }

    /// Waits until every round fed is committed; returns the sink's reports in epoch order.
    pub fn wait(&mut self) -> Result<Vec<EpochDone>> {
        self.session.wait()
    }

    /// The reports of the rounds committed since the last call, without waiting.
    pub fn try_done(&mut self) -> Result<Vec<EpochDone>> {
        self.session.try_done()
    }

    /// Closes the input and waits until the computation ends (on a process that does not
    /// drive it: until the driving process closes it).
    pub fn stop(&mut self) -> Result<()> {
        self.session.stop()
    }
}

/// Replays an archive's responses through the scoring dataflow into another archive, with the
/// labels its verdict stream holds. The result equals what the live run archived.
pub fn replay(cluster: &Cluster, source: &Archive, out: &Archive, refusal: RefusalRules) -> Result<Vec<EpochDone>> {
    replay_with(cluster, source, out, refusal, None)
}

/// Re-scores an archive's responses with `judge` into another archive, without generating
/// anything: the responses are replayed and every one is judged afresh. The judge's own
/// calls go through the source archive's generation store, so rescoring again with the same
/// judge asks no model.
pub fn rescore(
    cluster: &Cluster,
    source: &Archive,
    out: &Archive,
    refusal: RefusalRules,
    judge: Box<dyn Judge>,
) -> Result<Vec<EpochDone>> {
    let items: Vec<Item> = read_records(source)?;
    if items.is_empty() {
        return Err(Error::config(
            "rescore",
            format!("{} holds no item stream to judge against", source.root().display()),
        ));
    }
    replay_with(cluster, source, out, refusal, Some((items, judge)))
}

fn replay_with(
    cluster: &Cluster,
    source: &Archive,
    out: &Archive,
    refusal: RefusalRules,
    judging: Option<(Vec<Item>, Box<dyn Judge>)>,
) -> Result<Vec<EpochDone>> {
    let trials: Vec<Trial> = read_records(source)?;
    let mut labels = HashMap::new();
    // A rescore ignores the verdicts already archived.
    let old = if judging.is_some() { Vec::new() } else { read_records::<Verdict>(source)? };
    for v in old {
        let verdict = VerdictLabel::parse_loose(&v.verdict).ok_or_else(|| {
            Error::schema("verdict", format!("response `{}` has unknown verdict `{}`", v.response_key, v.verdict))
        })?;
        labels.insert(v.response_key, Label { verdict, judge: v.judge, raw: v.judge_raw });
    }
    let entries = source.checkpoints()?;
    for e in &entries {
        out.register_checkpoint(&e.model, &e.checkpoint, e.is_finetuned, e.variant.as_deref())?;
    }
    let out_epochs: BTreeMap<CheckpointRef, Epoch> =
        out.checkpoints()?.into_iter().map(|e| (e.id(), e.epoch)).collect();
    // A replay resumed after a crash: checkpoints already complete in `out` are not written
    // again (they must hold as many responses as the source has).
    let done = out.committed_epochs()?;
    let mut skipped: BTreeMap<Epoch, (CheckpointRef, usize)> = BTreeMap::new();
    let mut responses = Vec::new();
    for batch in source.read(Response::STREAM)? {
        // Responses keep their checkpoint; the epoch is the output archive's.
        let mut by_epoch: BTreeMap<Epoch, Vec<Response>> = BTreeMap::new();
        for mut r in Response::from_batch(&batch)? {
            let id = CheckpointRef::new(&r.model, &r.checkpoint);
            let epoch = *out_epochs.get(&id).ok_or_else(|| {
                Error::schema("response", format!("checkpoint {id} is not in the archive's checkpoint registry"))
            })?;
            if done.contains(&epoch) {
                skipped.entry(epoch).or_insert_with(|| (id, 0)).1 += 1;
                continue;
            }
            r.checkpoint_epoch = epoch;
            by_epoch.entry(epoch).or_default().push(r);
        }
        for (epoch, rows) in by_epoch {
            responses.push((epoch, Response::to_batch(&rows)?));
        }
    }
    for (epoch, (id, n)) in skipped {
        let there: usize = out.read_epoch(Response::STREAM, epoch)?.iter().map(|b| b.num_rows()).sum();
        if there != n {
            return Err(Error::input(
                crate::error::Location::file(out.root()),
                format!("already holds {there} responses of {id}, the source {n}: replay into a new archive"),
            ));
        }
    }
    let new_trials = if out.has(Trial::STREAM)? { Vec::new() } else { trials.clone() };
    // The items come along, so the new archive can be rescored in turn.
    let new_items = if out.has(Item::STREAM)? { Vec::new() } else { read_records::<Item>(source)? };
    score_responses(cluster, out, trials, new_trials, new_items, GRID_EPOCH, responses, labels, refusal, judging)
}

/// What `candor run` did.
#[derive(Debug, Default)]
pub struct RunReport {
    pub epochs: Vec<EpochDone>,
    /// Checkpoints whose epoch was already complete in the archive.
    pub skipped: Vec<String>,
    pub model_calls: u64,
    pub from_store: u64,
    pub completion_tokens: u64,
}

/// Generates (and scores, where a judge is configured) every checkpoint of the experiment whose
/// epoch is not yet complete in the archive. The trial grid must be archived already.
pub fn run_experiment(
    cluster: &Cluster,
    archive: &Archive,
    exp: &crate::config::Experiment,
    open: crate::generate::OpenGenerator,
    progress: bool,
) -> Result<RunReport> {
    use crate::generate::operator::{CheckpointPlan, Counters, GeneratePlan, as_request, generate, trial_batches};
    let mut report = RunReport::default();
    let mut checkpoints = BTreeMap::new();
    let mut sources: Vec<(Epoch, RecordBatch)> = Vec::new();
    let mut trials: Vec<Trial> = Vec::new();
    // The process that holds the archive reads it and feeds the dataflow; the others' workers
    // learn everything they need from what it feeds.
    if cluster.is_leader() {
        trials = read_records(archive)?;
        if trials.is_empty() {
            return Err(Error::config("trials", format!("{} holds no trial grid", archive.root().display())));
        }
        let committed = archive.committed_epochs()?;
        for model in &exp.models {
            for ckpt in &model.checkpoints {
                let label = ckpt.variant_label();
                let epoch = archive.register_checkpoint(&model.name, &ckpt.id, ckpt.finetuned, label.as_deref())?;
                if committed.contains(&epoch) {
                    report.skipped.push(format!("{}/{}", model.name, ckpt.id));
                    continue;
                }
                checkpoints.insert(epoch, CheckpointPlan { epoch, model: model.clone(), checkpoint: ckpt.clone() });
            }
        }
        if let Some(&first) = checkpoints.keys().next() {
            let items: Vec<Item> = read_records(archive)?;
            sources.extend(reference(&trials, &items)?.into_iter().map(|b| (first, b)));
        }
        for (epoch, plan) in &checkpoints {
            for b in trial_batches(&trials, 256)? {
                sources.push((*epoch, as_request(b, plan)));
            }
        }
    }
    let total = (checkpoints.len() * trials.len()) as u64 * exp.generation.samples.max(1) as u64;
    let plan = Arc::new(GeneratePlan {
        generation: exp.generation.clone(),
        seed: exp.seed,
        archive_root: archive.root().to_path_buf(),
        open,
    });
    let counters = Arc::new(Counters::default());
    let bar = progress.then(|| {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} generating [{bar:30}] {pos}/{len} answers, {msg}, eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar
    });
    let refusal = RefusalRules::new(exp.refusal.mode);
    let judge = shared_judge(crate::score::judge::open(&exp.judge, archive.root())?);
    let warmth = shared_warmth(exp.warmth.as_ref());
    let (c, b) = (counters.clone(), bar.clone());
    report.epochs = run(cluster, archive, sources, None, move |input, peers| {
        let responses =
            generate(partition_by(requests(input.clone()), "trial_key", peers), plan.clone(), c.clone(), b.clone());
        let scored = score(
            dimensions(input, peers),
            responses.clone(),
            ScoreStage::new(refusal.clone()).with_judge(Some(judge.clone())).with_warmth(warmth.clone()),
        );
        responses.concat(scored)
    })?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    // Every process's counts, as the answers carried them to the sink.
    let mut generated = crate::dataflow::Generated::default();
    report.epochs.iter().for_each(|e| generated.add(&e.generated));
    (report.model_calls, report.from_store, report.completion_tokens) =
        (generated.model_calls, generated.from_store, generated.completion_tokens);
    Ok(report)
}
