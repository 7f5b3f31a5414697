//! The score stage in the dataflow: the refusal rules and the judge applied to response
//! batches ([`ScoreStage`]), and the dataflows that end in it: scoring given responses
//! ([`score_responses`], for an import or a stream), replaying or re-judging an archive
//! ([`replay`], [`rescore`]), and generating then scoring an experiment's checkpoints
//! ([`run_experiment`], `candor run`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};

use arrow::record_batch::RecordBatch;
use timely::dataflow::operators::Concat;

use super::judge::{Case, Judge, Label};
use super::refusal::RefusalRules;
use crate::archive::{Archive, read_records};
use crate::conditions::{Dataset, VerdictLabel};
use crate::dataflow::{
    Cluster, Epoch, EpochDone, GRID_EPOCH, Session, Stage, only, partition_by, run, stage, stream_of,
};
use crate::error::{Error, Result};
use crate::identity::CheckpointRef;
use crate::records::{Item, Observation, Response, Trial, Verdict};
use crate::schema::Record;

/// A judge shared by the workers of one process, with the items it reads reference fields
/// from (keyed by dataset and item key).
#[derive(Clone)]
pub struct Judging {
    pub items: Arc<HashMap<(String, String), Item>>,
    pub judge: Arc<Mutex<Box<dyn Judge>>>,
}

impl Judging {
    pub fn new(items: Vec<Item>, judge: Box<dyn Judge>) -> Self {
        let items = items.into_iter().map(|i| ((i.dataset.clone(), i.item_key.clone()), i)).collect();
        Judging { items: Arc::new(items), judge: Arc::new(Mutex::new(judge)) }
    }
}

/// The refusal and judge operators in one stage: response batches → verdict and observation
/// batches. Trials are a dimension table every worker holds. A response is scored with its
/// label when one was given (an import, a replay), else by the judge when there is one; with
/// neither it stays archived unscored.
pub struct ScoreStage {
    trials: Shared<HashMap<String, Trial>>,
    labels: Shared<HashMap<String, Label>>,
    refusal: RefusalRules,
    judging: Option<Judging>,
}

/// A table the driver of a long-lived dataflow extends while its workers read it (the
/// trials and labels of the responses it feeds are added before the responses are).
pub type Shared<T> = Arc<RwLock<T>>;

fn shared<T>(t: T) -> Shared<T> {
    Arc::new(RwLock::new(t))
}

impl ScoreStage {
    pub fn new(
        trials: Shared<HashMap<String, Trial>>,
        labels: Shared<HashMap<String, Label>>,
        refusal: RefusalRules,
    ) -> Self {
        ScoreStage { trials, labels, refusal, judging: None }
    }

    /// Judges responses that have no label.
    pub fn with_judge(mut self, judging: Option<Judging>) -> Self {
        self.judging = judging;
        self
    }

    /// Labels for `responses` (None: left unscored): given labels first, then the judge's.
    fn labels_for(&self, responses: &[(Response, &Trial, Dataset)]) -> Result<Vec<Option<Label>>> {
        let given = self.labels.read().map_err(|_| Error::Internal("the labels were poisoned by a panic".into()))?;
        let mut out: Vec<Option<Label>> =
            responses.iter().map(|(r, _, _)| given.get(&r.response_key).cloned()).collect();
        drop(given);
        let Some(j) = &self.judging else { return Ok(out) };
        let mut cases = Vec::new();
        let mut at = Vec::new();
        for (i, (r, t, dataset)) in responses.iter().enumerate() {
            if out[i].is_some() {
                continue;
            }
            let item = j.items.get(&(t.dataset.clone(), t.item_key.clone())).ok_or_else(|| {
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
        let judged = j.judge.lock().map_err(|_| Error::Internal("the judge panicked".into()))?.judge(&cases)?;
        for (i, v) in at.into_iter().zip(judged) {
            out[i] = Some(v);
        }
        Ok(out)
    }
}

impl Stage for ScoreStage {
    fn name(&self) -> &str {
        "score"
    }
    fn apply(&mut self, _epoch: Epoch, batch: &RecordBatch) -> Result<Vec<RecordBatch>> {
        if stream_of(batch) != Response::STREAM {
            return Ok(Vec::new());
        }
        let trials = self.trials.read().map_err(|_| Error::Internal("the trials were poisoned by a panic".into()))?;
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
        let labels = self.labels_for(&rows)?;
        let mut verdicts = Vec::new();
        let mut observations = Vec::new();
        for ((r, trial, dataset), label) in rows.into_iter().zip(labels) {
            // Without a label there is nothing to judge yet: the response stays archived.
            let Some(label) = label else { continue };
            let phrase = self.refusal.detect(&r.output);
            let (verdict, correct) = crate::score::observe(dataset, phrase.is_some(), label.verdict);
            verdicts.push(Verdict {
                response_key: r.response_key.clone(),
                trial_key: r.trial_key.clone(),
                model: r.model.clone(),
                checkpoint: r.checkpoint.clone(),
                checkpoint_epoch: r.checkpoint_epoch,
                sample_index: r.sample_index,
                refusal: phrase.is_some(),
                refusal_phrase: phrase.clone(),
                verdict: label.verdict.to_string(),
                judge: label.judge,
                judge_raw: label.raw,
            });
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
        Ok(vec![Verdict::to_batch(&verdicts)?, Observation::to_batch(&observations)?])
    }
}

/// Scores responses: `trials` (all of them, the dimension table) and `new_trials` and
/// `new_items` (the ones to archive, at `trials_epoch`) plus responses at their checkpoint
/// epochs go in; the items, trials, responses, verdicts and observations are archived.
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
    judging: Option<Judging>,
) -> Result<Vec<EpochDone>> {
    let total: u64 = responses.iter().map(|(_, b)| b.num_rows() as u64).sum();
    let mut sources = Vec::new();
    if !new_items.is_empty() {
        sources.push((trials_epoch, Item::to_batch(&new_items)?));
    }
    if !new_trials.is_empty() {
        sources.push((trials_epoch, Trial::to_batch(&new_trials)?));
    }
    let mut responses = responses;
    responses.sort_by_key(|(e, _)| *e);
    sources.extend(responses);
    let trials = shared(trials.into_iter().map(|t| (t.trial_key.clone(), t)).collect());
    let labels = shared(labels);
    run(cluster, archive, sources, Some(total * 3), move |input, peers| {
        let scored = stage(
            partition_by(only(input.clone(), Response::STREAM), "response_key", peers),
            ScoreStage::new(trials.clone(), labels.clone(), refusal.clone()).with_judge(judging.clone()),
        );
        input.concat(scored)
    })
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
/// checkpoint with answers is scored with the labels they carry; with an experiment, a
/// checkpoint announced without answers is generated in the same computation (the generate
/// operator of `candor run`, then the experiment's refusal rules and judge).
pub struct Scorer {
    session: Session,
    archive: Archive,
    trials: Shared<HashMap<String, Trial>>,
    labels: Shared<HashMap<String, Label>>,
    generation: Option<(Arc<crate::generate::operator::GeneratePlan>, Arc<crate::generate::operator::Counters>)>,
    /// Labels of the rounds not yet committed.
    pending_labels: Vec<String>,
}

impl Scorer {
    /// Starts the dataflow; `trials` are those the archive holds. With `experiment`, its
    /// `[[models]]` can generate ([`Self::generate`]).
    pub fn start(
        cluster: &Cluster,
        archive: &Archive,
        trials: Vec<Trial>,
        refusal: RefusalRules,
        experiment: Option<(&crate::config::Experiment, crate::generate::OpenGenerator)>,
    ) -> Result<Scorer> {
        use crate::generate::operator::{Counters, GeneratePlan, generate, is_request};
        let trials = shared(trials.into_iter().map(|t| (t.trial_key.clone(), t)).collect());
        let labels = shared(HashMap::new());
        let generation = match experiment {
            Some((exp, open)) => {
                let plan = Arc::new(GeneratePlan {
                    checkpoints: RwLock::new(BTreeMap::new()),
                    generation: exp.generation.clone(),
                    seed: exp.seed,
                    archive_root: archive.root().to_path_buf(),
                    open,
                });
                // Opened when the first generated answer is judged: a stream fed answer
                // records only never loads the judge.
                let judge = LazyJudge { config: exp.judge.clone(), root: archive.root().to_path_buf(), judge: None };
                let judging = Judging::new(read_records(archive)?, Box::new(judge));
                Some((plan, Arc::new(Counters::default()), RefusalRules::new(exp.refusal.mode), judging))
            }
            None => None,
        };
        let (t, l, g) = (trials.clone(), labels.clone(), generation.clone());
        let session = Session::start(cluster, archive, move |input, peers| {
            use timely::dataflow::operators::vec::Filter;
            let requests = input.clone().filter(|m| m.as_ref().is_ok_and(|b| is_request(&b.0)));
            let archived = input.filter(|m| !m.as_ref().is_ok_and(|b| is_request(&b.0)));
            let scored = stage(
                partition_by(only(archived.clone(), Response::STREAM), "response_key", peers),
                ScoreStage::new(t.clone(), l.clone(), refusal.clone()),
            );
            let mut out = archived.concat(scored);
            if let Some((plan, counters, refusal, judging)) = &g {
                let generated = generate(
                    partition_by(only(requests, Trial::STREAM), "trial_key", peers),
                    plan.clone(),
                    counters.clone(),
                    None,
                );
                let judged = stage(
                    generated.clone(),
                    ScoreStage::new(t.clone(), shared(HashMap::new()), refusal.clone())
                        .with_judge(Some(judging.clone())),
                );
                out = out.concat(generated).concat(judged);
            }
            out
        })?;
        Ok(Scorer {
            session,
            archive: archive.clone(),
            trials,
            labels,
            generation: generation.map(|(plan, counters, _, _)| (plan, counters)),
            pending_labels: Vec::new(),
        })
    }

    /// Whether the dataflow holds a trial (archived, or archived by an earlier round).
    pub fn has_trial(&self, trial_key: &str) -> bool {
        self.trials.read().is_ok_and(|t| t.contains_key(trial_key))
    }

    /// Whether checkpoints can be generated (the scorer was started with an experiment).
    pub fn can_generate(&self) -> bool {
        self.generation.is_some()
    }

    /// Model calls made and answers the generation store already had, so far.
    pub fn generation_counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.generation.as_ref().map_or((0, 0), |(_, c)| (c.model_calls.load(Relaxed), c.from_store.load(Relaxed)))
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
        let Some((plan, _)) = &self.generation else {
            return Err(Error::Internal("generation without an experiment".into()));
        };
        let trials: Vec<Trial> = {
            let held = self.trials.read().map_err(|_| Error::Internal("the trials were poisoned by a panic".into()))?;
            let mut t: Vec<Trial> = held
                .values()
                .filter(|t| items.is_none_or(|i| i.contains(&(t.dataset.clone(), t.item_key.clone()))))
                .cloned()
                .collect();
            t.sort_by(|a, b| a.trial_key.cmp(&b.trial_key));
            t
        };
        if trials.is_empty() {
            return Err(Error::config("trials", format!("{} holds no trial grid", self.archive.root().display())));
        }
        // The plan first: the backend threads look the round up when its trials arrive.
        plan.checkpoints
            .write()
            .map_err(|_| Error::Internal("the checkpoint plans were poisoned by a panic".into()))?
            .insert(self.session.next_time(), CheckpointPlan { epoch, model, checkpoint });
        let batches = trial_batches(&trials, 256)?.into_iter().map(as_request).collect();
        self.session.feed(epoch, batches)
    }

    /// A seeded sample of `per_dataset` items of each dataset among the trials held (all of a
    /// dataset's items when it has no more), the same for every call with the same seed: the
    /// items a subsampled checkpoint answers.
    pub fn sample_items(&self, per_dataset: usize, seed: u64) -> Result<std::collections::BTreeSet<(String, String)>> {
        use rand::SeedableRng;
        use rand::seq::SliceRandom;
        let held = self.trials.read().map_err(|_| Error::Internal("the trials were poisoned by a panic".into()))?;
        let mut by_dataset: BTreeMap<&str, std::collections::BTreeSet<&str>> = BTreeMap::new();
        for t in held.values() {
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
    /// epoch `trials_epoch`, each epoch's responses are one round.
    pub fn score(
        &mut self,
        new_trials: Vec<Trial>,
        trials_epoch: Epoch,
        responses: Vec<(Epoch, RecordBatch)>,
        labels: HashMap<String, Label>,
    ) -> Result<()> {
        let poisoned = || Error::Internal("the scoring tables were poisoned by a panic".into());
        // The tables first: the workers read them when the responses arrive.
        self.pending_labels.extend(labels.keys().cloned());
        {
            let mut trials = self.trials.write().map_err(|_| poisoned())?;
            trials.extend(new_trials.iter().map(|t| (t.trial_key.clone(), t.clone())));
            self.labels.write().map_err(|_| poisoned())?.extend(labels);
        }
        let mut rounds: BTreeMap<Epoch, Vec<RecordBatch>> = BTreeMap::new();
        if !new_trials.is_empty() {
            rounds.entry(trials_epoch).or_default().push(Trial::to_batch(&new_trials)?);
        }
        for (epoch, batch) in responses {
            rounds.entry(epoch).or_default().push(batch);
        }
        for (epoch, batches) in rounds {
            self.session.feed(epoch, batches)?;
        }
        Ok(())
    }

    /// Waits until every round fed is committed; returns the sink's reports in epoch order.
    pub fn wait(&mut self) -> Result<Vec<EpochDone>> {
        let reports = self.session.wait();
        // A label is needed only while its response is scored; a generation plan likewise.
        let mut held =
            self.labels.write().map_err(|_| Error::Internal("the labels were poisoned by a panic".into()))?;
        for k in self.pending_labels.drain(..) {
            held.remove(&k);
        }
        if let Some((plan, _)) = &self.generation
            && let Ok(mut p) = plan.checkpoints.write()
        {
            p.clear();
        }
        reports
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
    replay_with(cluster, source, out, refusal, Some(Judging::new(items, judge)))
}

fn replay_with(
    cluster: &Cluster,
    source: &Archive,
    out: &Archive,
    refusal: RefusalRules,
    judging: Option<Judging>,
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
    use crate::generate::operator::{CheckpointPlan, Counters, GeneratePlan, generate, trial_batches};
    let trials: Vec<Trial> = read_records(archive)?;
    if trials.is_empty() {
        return Err(Error::config("trials", format!("{} holds no trial grid", archive.root().display())));
    }
    let committed = archive.committed_epochs()?;
    let mut report = RunReport::default();
    let mut checkpoints = BTreeMap::new();
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
    let mut sources = Vec::new();
    for epoch in checkpoints.keys() {
        for b in trial_batches(&trials, 256)? {
            sources.push((*epoch, b));
        }
    }
    let total = (checkpoints.len() * trials.len()) as u64 * exp.generation.samples.max(1) as u64;
    let plan = Arc::new(GeneratePlan {
        checkpoints: RwLock::new(checkpoints),
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
    let all_trials = shared(trials.into_iter().map(|t| (t.trial_key.clone(), t)).collect());
    let refusal = RefusalRules::new(exp.refusal.mode);
    let judging = Judging::new(read_records(archive)?, crate::score::judge::open(&exp.judge, archive.root())?);
    let (c, b) = (counters.clone(), bar.clone());
    report.epochs = run(cluster, archive, sources, None, move |input, peers| {
        let responses =
            generate(partition_by(only(input, Trial::STREAM), "trial_key", peers), plan.clone(), c.clone(), b.clone());
        let scored = stage(
            responses.clone(),
            ScoreStage::new(all_trials.clone(), shared(HashMap::new()), refusal.clone())
                .with_judge(Some(judging.clone())),
        );
        responses.concat(scored)
    })?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    report.model_calls = counters.model_calls.load(std::sync::atomic::Ordering::Relaxed);
    report.from_store = counters.from_store.load(std::sync::atomic::Ordering::Relaxed);
    report.completion_tokens = counters.completion_tokens.load(std::sync::atomic::Ordering::Relaxed);
    Ok(report)
}
