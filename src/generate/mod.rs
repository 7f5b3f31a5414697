//! The generate stage: trials in, responses out, through a [`Generator`] (a model backend).
//!
//! Backends: candle on local weights (the default; CPU here, CUDA behind the `cuda` feature)
//! and any OpenAI-compatible endpoint. A backend only answers requests; storing generations
//! durably, retrying, and turning them into `response` rows happen around it.

pub mod backend;
pub mod candle;
pub mod limit;
pub mod openai;
pub mod operator;
pub mod store;

use serde::{Deserialize, Serialize};

use crate::error::Result;

/// Opens a checkpoint's generator: the backend factory `candor run` and `candor stream` use
/// (tests may pass another).
pub type OpenGenerator = Box<
    dyn Fn(&crate::model::ModelConfig, &crate::model::CheckpointConfig) -> Result<Box<dyn Generator>> + Send + Sync,
>;

/// Decoding parameters of one request; part of the generation store's key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decoding {
    /// Sampling temperature; 0 is greedy.
    pub temperature: f64,
    /// Nucleus sampling mass; None samples from the whole distribution.
    pub top_p: Option<f64>,
    pub max_new_tokens: u32,
    /// Extra stop strings (the chat template's end-of-turn token always stops).
    pub stop: Vec<String>,
    /// Seed of this request's sampler.
    pub seed: u64,
    /// Never stop at an end-of-turn token: the answer runs to `max_new_tokens` (or a stop
    /// string, or the context). For benchmarks, where every side must decode the same number
    /// of tokens whatever the model says (vLLM's `ignore_eos`). Left out of the generation
    /// store's key when false, so stored answers keep their keys.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignore_eos: bool,
}

impl Decoding {
    /// The paper's settings for open-ended answers: temperature 0.8, 300 new tokens.
    pub fn open_ended(seed: u64) -> Self {
        Decoding { temperature: 0.8, top_p: None, max_new_tokens: 300, stop: Vec::new(), seed, ignore_eos: false }
    }
    /// The paper's settings for MMLU and GSM8K: temperature 0.2.
    pub fn structured(seed: u64) -> Self {
        Decoding { temperature: 0.2, ..Decoding::open_ended(seed) }
    }
}

/// The experiment's `[generation]` settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenerationConfig {
    /// Answers per trial (sample indices 0..samples).
    pub samples: u32,
    pub max_new_tokens: u32,
    /// Temperature for the open-ended sets (paper: 0.8).
    pub temperature: f64,
    /// Temperature for MMLU and GSM8K (paper: 0.2).
    pub structured_temperature: f64,
    pub top_p: Option<f64>,
    /// Trials handed to a backend at once.
    pub batch_size: usize,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            samples: 1,
            max_new_tokens: 300,
            temperature: 0.8,
            structured_temperature: 0.2,
            top_p: None,
            batch_size: 8,
        }
    }
}

impl GenerationConfig {
    /// The decoding parameters of one request: per-dataset temperature, and a seed that depends
    /// only on the experiment seed, the trial and the sample, so every checkpoint answers a
    /// trial with the same random stream.
    pub fn decoding(&self, experiment_seed: u64, dataset: &str, trial_key: &str, sample_index: u32) -> Decoding {
        let structured = matches!(dataset, "mmlu" | "gsm8k");
        let seed = crate::dataflow::stable_hash(format!("{experiment_seed}/{trial_key}/{sample_index}").as_bytes());
        Decoding {
            temperature: if structured { self.structured_temperature } else { self.temperature },
            top_p: self.top_p,
            max_new_tokens: self.max_new_tokens,
            stop: Vec::new(),
            seed,
            ignore_eos: false,
        }
    }
}

/// One chat turn to answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenRequest {
    /// An optional system prompt (the warm-system-prompt control is a model variant with one).
    pub system_prompt: Option<String>,
    /// The user message (a trial's rendered prompt).
    pub prompt: String,
    pub decoding: Decoding,
}

/// Why generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-turn token or a stop string.
    Stop,
    /// `max_new_tokens` reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// One answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    pub output: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Wall time attributed to this request (a batch's time is shared by its requests).
    pub latency_ms: f64,
}

/// A request a server hands to its model, with where the answer goes. A job whose reply
/// channel has closed (its client went away) may be dropped unanswered.
pub struct Job {
    pub request: GenRequest,
    pub reply: tokio::sync::oneshot::Sender<Result<Generation>>,
}

/// What a backend can tell a server about a request before it runs: how many tokens its
/// prompt takes, and the context prompt and answer must fit in.
pub trait TokenBudget: Send + Sync {
    fn prompt_tokens(&self, request: &GenRequest) -> Result<usize>;
    fn context(&self) -> usize;
}

/// A model backend.
pub trait Generator: Send {
    /// What produced the answers, stable across runs: backend, model, weights digest, system
    /// prompt. Part of the generation store's key, so different weights never share answers.
    fn fingerprint(&self) -> String;
    /// Answers every request, in order. A failure of one request is returned in its place;
    /// an `Err` means the backend itself failed.
    fn generate(&mut self, requests: &[GenRequest]) -> Result<Vec<Result<Generation>>>;
    /// Answers jobs from `queue` until it closes, at most `batch_size` at once. By default
    /// in static batches ([`serve_static`]); the candle backend overrides it with continuous
    /// batching, so a job that arrives while a long answer decodes joins the running batch.
    fn serve(&mut self, queue: &std::sync::mpsc::Receiver<Job>, batch_size: usize) {
        serve_static(self, queue, batch_size)
    }
    /// The backend's [`TokenBudget`], when it can count tokens (the candle backend can).
    fn budget(&self) -> Option<std::sync::Arc<dyn TokenBudget>> {
        None
    }
}

/// Static batching: the jobs that arrive within 5 ms of each other (up to `batch_size`) go
/// to the model as one [`Generator::generate`] call; jobs arriving meanwhile wait for the whole
/// call to end.
pub fn serve_static<G: Generator + ?Sized>(
    generator: &mut G,
    queue: &std::sync::mpsc::Receiver<Job>,
    batch_size: usize,
) {
    let batch_size = batch_size.max(1);
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(5);
        while batch.len() < batch_size {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match queue.recv_timeout(left) {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        batch.retain(|job| !job.reply.is_closed());
        let requests: Vec<GenRequest> = batch.iter().map(|j| j.request.clone()).collect();
        match generator.generate(&requests) {
            Ok(answers) => {
                for (job, answer) in batch.into_iter().zip(answers) {
                    let _ = job.reply.send(answer);
                }
            }
            Err(e) => {
                let message = e.to_string();
                for job in batch {
                    let _ = job.reply.send(Err(crate::error::Error::backend("model", message.clone())));
                }
            }
        }
    }
}
