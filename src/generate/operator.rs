//! The generate operator: trial batches in, response batches out, at the epoch of the
//! checkpoint that answers them.
//!
//! Model calls never run on a dataflow thread. Each worker hands its trials to a backend
//! thread that owns the [`Generator`] and the worker's handle on the generation store; the
//! thread answers from the store when it can, asks the model otherwise, stores every answer
//! durably, and only then sends it back and wakes the operator. The operator holds the epoch's
//! capability until every trial of it has come back, so "the checkpoint is complete" means
//! every answer is stored and emitted.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

/// Marks a trial batch as a request to generate its answers by the checkpoint `plan` names
/// (fed to a dataflow that also archives trials, it is not archived). The plan travels with
/// the batch, so a worker in any process knows who answers without a table of plans.
pub fn as_request(batch: RecordBatch, plan: &CheckpointPlan) -> RecordBatch {
    let plan = serde_json::to_string(plan).expect("plain data serializes");
    crate::dataflow::with_metadata(batch, META_REQUEST, &plan)
}

/// The checkpoint a request batch is to be answered by.
fn plan_of(batch: &RecordBatch) -> Result<CheckpointPlan> {
    let text = batch
        .schema_ref()
        .metadata()
        .get(META_REQUEST)
        .ok_or_else(|| crate::error::Error::Internal("a trial batch without a generation plan".into()))?;
    serde_json::from_str(text)
        .map_err(|e| crate::error::Error::Internal(format!("a generation request's plan does not parse: {e}")))
}

use arrow::record_batch::RecordBatch;
use timely::dataflow::StreamVec;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::generic::operator::Operator;

use super::store::GenerationStore;
use super::{GenRequest, GenerationConfig, Generator};
use crate::dataflow::{Batch, Epoch, Generated, META_REQUEST, Msg, is_request};
use crate::error::{Result, StageError};
use crate::model::{CheckpointConfig, ModelConfig};
use crate::records::{Response, Trial};
use crate::schema::Record;

/// Who answers a request, and the archive epoch of its answers.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct CheckpointPlan {
    pub epoch: Epoch,
    pub model: ModelConfig,
    pub checkpoint: CheckpointConfig,
}

/// What the operator needs besides its requests, the same in every process (built from the
/// experiment); who answers comes with each request ([`as_request`]).
pub struct GeneratePlan {
    pub generation: GenerationConfig,
    pub seed: u64,
    pub archive_root: PathBuf,
    /// Opens a checkpoint's generator (the backend factory; tests may pass another).
    pub open: crate::generate::OpenGenerator,
}

/// Counts shared by the workers of one process, live (the progress bar's); a run's counts
/// are its epochs' ([`crate::dataflow::EpochDone::generated`]: every process's).
#[derive(Debug, Default)]
pub struct Counters {
    /// Requests sent to a model.
    pub model_calls: AtomicU64,
    /// Answers found in the generation store.
    pub from_store: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
}

struct Job {
    /// The dataflow time (the round), under which the answers are emitted.
    time: Epoch,
    plan: CheckpointPlan,
    trials: Vec<Trial>,
}

struct Done {
    time: Epoch,
    result: std::result::Result<(Vec<Response>, Generated), StageError>,
}

/// The generate operator.
pub fn generate<'s>(
    stream: StreamVec<'s, Epoch, Msg>,
    plan: Arc<GeneratePlan>,
    counters: Arc<Counters>,
    progress: Option<indicatif::ProgressBar>,
) -> StreamVec<'s, Epoch, Msg> {
    let scope = stream.scope();
    stream.unary_frontier(Pipeline, "Generate", move |_cap, info| {
        let activator = scope.worker().sync_activator_for(info.address.to_vec());
        let (job_tx, job_rx) = mpsc::channel::<Job>();
        let (done_tx, done_rx) = mpsc::channel::<Done>();
        let thread_plan = plan.clone();
        let thread_counters = counters.clone();
        std::thread::Builder::new()
            .name("candor-generate".into())
            .spawn(move || backend_loop(thread_plan, thread_counters, progress, job_rx, done_tx, activator))
            .expect("spawning the backend thread");
        let job_tx = Mutex::new(job_tx);
        let mut pending: BTreeMap<Epoch, (Capability<Epoch>, usize)> = BTreeMap::new();
        move |(input, frontier), output| {
            input.for_each_stamp(|cap, data| {
                let Some(cap) = cap.retain_least(0) else { return };
                let epoch = *cap.time();
                for msg in data.flat_map(|d| d.drain(..)) {
                    match msg {
                        Ok(batch) if is_request(&batch.0) => {
                            match plan_of(&batch.0).and_then(|plan| Ok((plan, Trial::from_batch(&batch.0)?))) {
                                Ok((plan, trials)) if !trials.is_empty() => {
                                    pending.entry(epoch).or_insert_with(|| (cap.clone(), 0)).1 += 1;
                                    let job = Job { time: epoch, plan, trials };
                                    let _ = job_tx.lock().expect("job channel").send(job);
                                }
                                Ok(_) => {}
                                Err(e) => output.session(&cap).give(Err(StageError::new("generate", &e))),
                            }
                        }
                        Ok(_) => {}
                        Err(e) => output.session(&cap).give(Err(e)),
                    }
                }
            });
            while let Ok(done) = done_rx.try_recv() {
                let Some((cap, outstanding)) = pending.get_mut(&done.time) else { continue };
                let msg = match done.result {
                    Ok((responses, generated)) => Response::to_batch(&responses)
                        .map(|b| Batch(generated.mark(b)))
                        .map_err(|e| StageError::new("generate", &e)),
                    Err(e) => Err(e),
                };
                output.session(&*cap).give(msg);
                *outstanding -= 1;
            }
            pending.retain(|epoch, (_, outstanding)| *outstanding > 0 || frontier.frontier().less_equal(epoch));
        }
    })
}

fn backend_loop(
    plan: Arc<GeneratePlan>,
    counters: Arc<Counters>,
    progress: Option<indicatif::ProgressBar>,
    jobs: mpsc::Receiver<Job>,
    done: mpsc::Sender<Done>,
    activator: timely::scheduling::SyncActivator,
) {
    let mut store: Option<GenerationStore> = None;
    let mut current: Option<(Epoch, Box<dyn Generator>)> = None;
    for job in jobs {
        let result = answer(&plan, &counters, progress.as_ref(), &mut store, &mut current, &job)
            .map_err(|e| StageError::new(&format!("generate {}/{}", job.plan.model.name, job.plan.checkpoint.id), &e));
        if done.send(Done { time: job.time, result }).is_err() {
            return;
        }
        let _ = activator.activate();
    }
}

fn answer(
    plan: &GeneratePlan,
    counters: &Counters,
    progress: Option<&indicatif::ProgressBar>,
    store: &mut Option<GenerationStore>,
    current: &mut Option<(Epoch, Box<dyn Generator>)>,
    job: &Job,
) -> Result<(Vec<Response>, Generated)> {
    let cp = &job.plan;
    if store.is_none() {
        *store = Some(GenerationStore::open(&plan.archive_root)?);
    }
    let store = store.as_mut().expect("opened above");
    if current.as_ref().is_none_or(|(e, _)| *e != cp.epoch) {
        // One model at a time per worker: drop the previous one before loading the next.
        *current = None;
        *current = Some((cp.epoch, (plan.open)(&cp.model, &cp.checkpoint)?));
    }
    let generator = &mut current.as_mut().expect("set above").1;
    let fingerprint = generator.fingerprint();
    let g = &plan.generation;
    let mut wanted = Vec::new();
    for t in &job.trials {
        for sample in 0..g.samples.max(1) {
            let decoding = g.decoding(plan.seed, &t.dataset, &t.trial_key, sample);
            let request =
                GenRequest { system_prompt: cp.checkpoint.system_prompt.clone(), prompt: t.prompt.clone(), decoding };
            let key = GenerationStore::key(&fingerprint, &request, sample);
            wanted.push((t, sample, request, key));
        }
    }
    let mut responses = Vec::with_capacity(wanted.len());
    let mut missing: Vec<usize> = Vec::new();
    for (i, (_, _, _, key)) in wanted.iter().enumerate() {
        if store.get(key).is_none() {
            missing.push(i);
        }
    }
    let mut generated = Generated { from_store: (wanted.len() - missing.len()) as u64, ..Generated::default() };
    counters.from_store.fetch_add(generated.from_store, Ordering::Relaxed);
    if let Some(bar) = progress {
        bar.inc((wanted.len() - missing.len()) as u64);
    }
    for chunk in missing.chunks(g.batch_size.max(1)) {
        let requests: Vec<GenRequest> = chunk.iter().map(|&i| wanted[i].2.clone()).collect();
        counters.model_calls.fetch_add(requests.len() as u64, Ordering::Relaxed);
        generated.model_calls += requests.len() as u64;
        let answers = generator.generate(&requests)?;
        let mut entries = Vec::with_capacity(chunk.len());
        let mut first_error = None;
        for (&i, answer) in chunk.iter().zip(answers) {
            match answer {
                Ok(a) => {
                    counters.prompt_tokens.fetch_add(a.prompt_tokens as u64, Ordering::Relaxed);
                    counters.completion_tokens.fetch_add(a.completion_tokens as u64, Ordering::Relaxed);
                    generated.completion_tokens += a.completion_tokens as u64;
                    let (_, sample, request, key) = &wanted[i];
                    entries.push((key.clone(), fingerprint.clone(), request.clone(), *sample, a));
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        // Stored before anything moves downstream, even when a sibling request failed.
        store.put(&entries)?;
        if let Some(bar) = progress {
            bar.inc(entries.len() as u64);
            let done = counters.completion_tokens.load(Ordering::Relaxed) as f64;
            let secs = bar.elapsed().as_secs_f64().max(1e-3);
            bar.set_message(format!("{:.1} tok/s", done / secs));
        }
        if let Some(e) = first_error {
            return Err(e);
        }
    }
    for (t, sample, request, key) in &wanted {
        let a = store.get(key).expect("every wanted answer is stored by now");
        responses.push(Response {
            response_key: Response::key(&cp.model.name, &cp.checkpoint.id, &t.trial_key, *sample),
            trial_key: t.trial_key.clone(),
            dataset: t.dataset.clone(),
            model: cp.model.name.clone(),
            checkpoint: cp.checkpoint.id.clone(),
            checkpoint_epoch: cp.epoch,
            is_finetuned: cp.checkpoint.finetuned,
            sample_index: *sample,
            output: a.output.clone(),
            finish_reason: Some(a.finish_reason.as_str().to_string()),
            prompt_tokens: Some(a.prompt_tokens),
            completion_tokens: Some(a.completion_tokens),
            latency_ms: Some(a.latency_ms),
            generator: fingerprint.clone(),
            decoding: Some(serde_json::to_string(&request.decoding).expect("plain data")),
        });
    }
    Ok((responses, generated))
}

/// Splits trials into batches the dataflow carries.
pub fn trial_batches(trials: &[Trial], rows: usize) -> Result<Vec<RecordBatch>> {
    trials.chunks(rows.max(1)).map(Trial::to_batch).collect()
}
