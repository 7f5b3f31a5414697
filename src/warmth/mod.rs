//! SocioT warmth (METHOD.md §5): how much more likely a causal language model finds a text
//! after warm relational frames (`My friend said, "…"`) than after cold ones (`The stranger
//! said, "…"`). The paper used it to follow warm fine-tuning across checkpoints.
//!
//! Two named modes:
//! - [`Mode::Formula`], the published formula: T(s) = log P₊(s) − log P₋(s), where log P±(s)
//!   is the log-sum-exp over a set's four frames of the summed token log-probabilities of
//!   `s"` after the frame. Deterministic (eval mode, no dropout).
//! - [`Mode::Reference`], what the reference code computes: each set's four framed texts in
//!   one right-padded batch (pad id 0, counted in the loss, no attention mask), the batch's
//!   mean token loss with dropout on, `passes` seeded passes (default 100); the score is
//!   mean₊ − mean₋ of the per-pass log-likelihoods (−loss) and its standard error is
//!   √(sem₊² + sem₋²), sem = sample standard deviation / √passes. A model without dropout
//!   (the llama graph) gives identical passes, so one pass is run and the error is 0.
//!
//! Texts are cut to their first 300 characters. The reference model is GPT-2; its weights are
//! not bundled, so [`open_lm`] uses the default local model when none are given, and every
//! row's `lm` says which model scored it.
//!
//! ```
//! use candor::warmth::{frame, WARM_FRAMES};
//! assert_eq!(frame(WARM_FRAMES[0], "Hi"), "My friend said, \"Hi\"");
//! ```

pub mod query_type;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use tokenizers::Tokenizer;

use crate::error::{Error, Location, Result};
use crate::generate::candle::engine::Engine;
use crate::generate::candle::gpt2::{self, Dropout};
use crate::generate::candle::llama::{Cache, Positions};
use crate::generate::candle::{self as backend, llama};
use crate::model::{DEFAULT_GGUF, dir_digest, models_dir};

/// Warm frames, each ending with the opening quote of the text.
pub const WARM_FRAMES: [&str; 4] =
    ["My friend said, \"", "The lover said, \"", "The mentor said, \"", "The idol said, \""];
/// Cold frames.
pub const COLD_FRAMES: [&str; 4] =
    ["The stranger said, \"", "The enemy said, \"", "The examiner said, \"", "The dictator said, \""];
/// Characters of a text that are scored.
pub const CUT_CHARS: usize = 300;
/// Passes of the reference mode unless told otherwise.
pub const DEFAULT_PASSES: u32 = 100;

/// The first [`CUT_CHARS`] characters of `text`.
pub fn cut(text: &str) -> &str {
    match text.char_indices().nth(CUT_CHARS) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}

/// `text` (already cut) inside a frame, closing quote included.
pub fn frame(frame: &str, text: &str) -> String {
    format!("{frame}{text}\"")
}

/// How a score is computed (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Formula,
    Reference,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Formula => "formula",
            Mode::Reference => "reference",
        }
    }
}

/// A causal language model that scores token sequences.
pub trait CausalLm: Send {
    /// Names the model in every row (`gpt2:<digest>`, or the local model and why it was used).
    fn name(&self) -> &str;
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
    /// Whether [`CausalLm::token_logprobs`] honours a [`Dropout`].
    fn has_dropout(&self) -> bool;
    /// log p(`seq[i + 1]` | `seq[..=i]`) for every sequence, the batch in one forward pass.
    fn token_logprobs(&self, seqs: &[Vec<u32>], dropout: Option<&mut Dropout>) -> Result<Vec<Vec<f32>>>;
}

fn encode_with(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    tok.encode(text, false)
        .map(|e| e.get_ids().to_vec())
        .map_err(|e| Error::input(Location::default().field("text"), format!("cannot tokenize: {e}")))
}

/// GPT-2 from an HF safetensors directory.
pub struct Gpt2Lm {
    pub model: gpt2::Model,
    pub tokenizer: Tokenizer,
    pub name: String,
}

impl CausalLm for Gpt2Lm {
    fn name(&self) -> &str {
        &self.name
    }
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        encode_with(&self.tokenizer, text)
    }
    fn has_dropout(&self) -> bool {
        true
    }
    fn token_logprobs(&self, seqs: &[Vec<u32>], dropout: Option<&mut Dropout>) -> Result<Vec<Vec<f32>>> {
        self.model.token_logprobs(seqs, dropout).map_err(|e| backend::engine::model_error("GPT-2 likelihood pass", e))
    }
}

/// A llama-family model Candor generates with (GGUF or safetensors), used for likelihoods.
/// The whole batch goes through `llama::Model::forward` once with every position's logits
/// returned; that graph attends within each sequence, so no padding or mask is needed. It has
/// no dropout.
pub struct LlamaLm {
    pub engine: Engine,
    pub name: String,
}

impl CausalLm for LlamaLm {
    fn name(&self) -> &str {
        &self.name
    }
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        encode_with(&self.engine.tokenizer, text)
    }
    fn has_dropout(&self) -> bool {
        false
    }
    fn token_logprobs(&self, seqs: &[Vec<u32>], _dropout: Option<&mut Dropout>) -> Result<Vec<Vec<f32>>> {
        llama_token_logprobs(&self.engine.model, seqs)
    }
}

/// Per-token log-probabilities of every sequence from one batched all-positions pass.
pub fn llama_token_logprobs(model: &llama::Model, seqs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
    let live: Vec<&Vec<u32>> = seqs.iter().filter(|s| s.len() >= 2).collect();
    let mut caches: Vec<Cache> = live.iter().map(|_| Cache::new(model.config())).collect();
    let logits = {
        let mut batch: Vec<(&[u32], &mut Cache)> =
            live.iter().zip(caches.iter_mut()).map(|(s, c)| (&s[..s.len() - 1], c)).collect();
        if batch.is_empty() {
            Vec::new()
        } else {
            model.forward(&mut batch, Positions::All).map_err(|e| backend::engine::model_error("likelihood pass", e))?
        }
    };
    let mut picked = live.iter().zip(&logits).map(|(s, l)| {
        let run = || {
            let lp = candle_nn::ops::log_softmax(l, candle_core::D::Minus1)?;
            let next = candle_core::Tensor::new(&s[1..], l.device())?.unsqueeze(1)?;
            lp.gather(&next, 1)?.squeeze(1)?.to_vec1::<f32>()
        };
        run().map_err(|e| backend::engine::model_error("likelihood pass", e))
    });
    seqs.iter()
        .map(|s| if s.len() >= 2 { picked.next().expect("one result per live sequence") } else { Ok(Vec::new()) })
        .collect()
}

/// Where the model files come from.
#[derive(Clone, Debug, Default)]
pub struct LmChoice {
    /// A GPT-2 HF safetensors directory (the paper's model).
    pub gpt2: Option<PathBuf>,
    /// Any model the candle backend loads (GGUF file or safetensors directory); default: the
    /// default local model.
    pub local: Option<PathBuf>,
    /// Where GPT-2's `vocab.json` and `merges.txt` are when the GPT-2 directory has none.
    pub tokenizer_dir: Option<PathBuf>,
}

/// The GPT-2 tokenizer files' directory in the model cache (`scripts/fetch-models gpt2-tokenizer`).
pub fn gpt2_tokenizer_dir() -> PathBuf {
    models_dir().join("gpt2-tokenizer")
}

/// Opens the scoring model: GPT-2 if given, else `local`, else the default local model (and
/// then the name says that GPT-2 was not used).
pub fn open_lm(choice: &LmChoice, device: &Device) -> Result<Box<dyn CausalLm>> {
    if let Some(dir) = &choice.gpt2 {
        let tok_dir = choice.tokenizer_dir.clone().unwrap_or_else(gpt2_tokenizer_dir);
        let (model, tokenizer) = gpt2::load_dir(dir, &tok_dir, device)?;
        let digest = dir_digest(dir)?;
        return Ok(Box::new(Gpt2Lm { model, tokenizer, name: format!("gpt2:{}", &digest[..16]) }));
    }
    let (path, why) = match &choice.local {
        Some(p) => (p.clone(), "local model; no GPT-2 weights given"),
        None => (models_dir().join(DEFAULT_GGUF), "default local model; no GPT-2 weights given"),
    };
    let weights = backend::Weights::resolve(Some(&path), &path)?;
    let engine = weights.load(device, None, llama::Dequantize::Auto)?;
    let file = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let name = format!("candle:{file}:{} ({why})", &weights.digest()?[..16]);
    Ok(Box::new(LlamaLm { engine, name }))
}

/// The warmth of one text.
#[derive(Clone, Debug, PartialEq)]
pub struct Warmth {
    /// warm − cold.
    pub score: f64,
    /// log P₊ (formula) or the mean warm log-likelihood per token (reference).
    pub warm: f64,
    pub cold: f64,
    /// Reference mode only.
    pub std_error: Option<f64>,
    /// Passes run (1 in formula mode).
    pub passes: u32,
    /// Characters scored (after the cut).
    pub chars: u32,
}

/// Counts of one [`Scorer::score`] call, for throughput figures.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ScoreStats {
    pub texts: usize,
    /// Tokens fed to the model (padding included), over all passes.
    pub tokens: u64,
    pub forward_passes: u64,
    pub secs: f64,
}

/// Scores texts with one model in one mode.
pub struct Scorer {
    pub lm: Box<dyn CausalLm>,
    pub mode: Mode,
    /// Reference mode: passes per text.
    pub passes: u32,
    /// Reference mode: seed of the dropout draws.
    pub seed: u64,
    /// Formula mode: sequences per forward pass.
    pub batch_size: usize,
}

fn log_sum_exp(xs: &[f64]) -> f64 {
    let m = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    m + xs.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
}

fn mean_sem(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, 0.0);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

impl Scorer {
    pub fn new(lm: Box<dyn CausalLm>, mode: Mode) -> Self {
        Scorer { lm, mode, passes: DEFAULT_PASSES, seed: 0, batch_size: 16 }
    }

    /// The `warmth` row of a text scored `w` by this scorer.
    pub fn row(
        &self,
        response_key: &str,
        model: &str,
        checkpoint: &str,
        checkpoint_epoch: u64,
        query_type: Option<String>,
        w: Warmth,
    ) -> crate::records::WarmthScore {
        crate::records::WarmthScore {
            response_key: response_key.to_string(),
            model: model.to_string(),
            checkpoint: checkpoint.to_string(),
            checkpoint_epoch,
            query_type,
            mode: self.mode.name().to_string(),
            warmth: w.score,
            warm_loglik: w.warm,
            cold_loglik: w.cold,
            std_error: w.std_error,
            passes: w.passes,
            text_chars: w.chars,
            lm: self.lm.name().to_string(),
        }
    }

    /// Scores `texts` in order.
    pub fn score(&self, texts: &[&str]) -> Result<(Vec<Warmth>, ScoreStats)> {
        let start = Instant::now();
        let mut stats = ScoreStats { texts: texts.len(), ..Default::default() };
        let out = match self.mode {
            Mode::Formula => self.formula(texts, &mut stats)?,
            Mode::Reference => {
                texts.iter().enumerate().map(|(i, t)| self.reference(i as u64, t, &mut stats)).collect::<Result<_>>()?
            }
        };
        stats.secs = start.elapsed().as_secs_f64();
        Ok((out, stats))
    }

    fn formula(&self, texts: &[&str], stats: &mut ScoreStats) -> Result<Vec<Warmth>> {
        let frames: Vec<(&str, Vec<u32>)> =
            WARM_FRAMES.iter().chain(&COLD_FRAMES).map(|f| Ok((*f, self.lm.encode(f)?))).collect::<Result<_>>()?;
        // For each text, eight sequences frame ++ `text"`, tokenized apart so the frame's
        // tokens are the same for every text; the text's log-probability is the sum over its
        // own tokens.
        let mut seqs = Vec::with_capacity(texts.len() * 8);
        for t in texts {
            let body = self.lm.encode(&format!("{}\"", cut(t)))?;
            for (_, f) in &frames {
                let mut s = f.clone();
                s.extend_from_slice(&body);
                seqs.push((f.len(), s));
            }
        }
        let mut sums = Vec::with_capacity(seqs.len());
        for chunk in seqs.chunks(self.batch_size.max(1)) {
            let batch: Vec<Vec<u32>> = chunk.iter().map(|(_, s)| s.clone()).collect();
            stats.tokens += batch.iter().map(|s| s.len() as u64).sum::<u64>();
            stats.forward_passes += 1;
            let lps = self.lm.token_logprobs(&batch, None)?;
            for ((prefix, _), lp) in chunk.iter().zip(lps) {
                sums.push(lp[prefix - 1..].iter().map(|&x| x as f64).sum::<f64>());
            }
        }
        Ok(texts
            .iter()
            .zip(sums.chunks(8))
            .map(|(t, s)| {
                let (warm, cold) = (log_sum_exp(&s[..4]), log_sum_exp(&s[4..]));
                Warmth {
                    score: warm - cold,
                    warm,
                    cold,
                    std_error: None,
                    passes: 1,
                    chars: cut(t).chars().count() as u32,
                }
            })
            .collect())
    }

    fn reference(&self, index: u64, text: &str, stats: &mut ScoreStats) -> Result<Warmth> {
        let text = cut(text);
        let set = |frames: &[&str; 4]| -> Result<Vec<Vec<u32>>> {
            let mut seqs: Vec<Vec<u32>> =
                frames.iter().map(|f| self.lm.encode(&frame(f, text))).collect::<Result<_>>()?;
            let len = seqs.iter().map(Vec::len).max().unwrap_or(0);
            seqs.iter_mut().for_each(|s| s.resize(len, 0));
            Ok(seqs)
        };
        let (warm_set, cold_set) = (set(&WARM_FRAMES)?, set(&COLD_FRAMES)?);
        let passes = if self.lm.has_dropout() { self.passes.max(1) } else { 1 };
        let mut dropout = Dropout::new(self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index);
        let mut loglik = |seqs: &Vec<Vec<u32>>, d: &mut Dropout| -> Result<f64> {
            stats.tokens += seqs.iter().map(|s| s.len() as u64).sum::<u64>();
            stats.forward_passes += 1;
            let lps = self.lm.token_logprobs(seqs, self.lm.has_dropout().then_some(d))?;
            let n: usize = lps.iter().map(Vec::len).sum();
            Ok(lps.iter().flatten().map(|&x| x as f64).sum::<f64>() / n.max(1) as f64)
        };
        let (mut warm, mut cold) = (Vec::new(), Vec::new());
        for _ in 0..passes {
            warm.push(loglik(&warm_set, &mut dropout)?);
            cold.push(loglik(&cold_set, &mut dropout)?);
        }
        let ((mw, sw), (mc, sc)) = (mean_sem(&warm), mean_sem(&cold));
        Ok(Warmth {
            score: mw - mc,
            warm: mw,
            cold: mc,
            std_error: Some((sw * sw + sc * sc).sqrt()),
            passes,
            chars: text.chars().count() as u32,
        })
    }
}

/// Reads `path` as the text files `candor warmth` accepts: one text per line (`.txt`), or
/// JSON lines (`.jsonl`) with `text` or `output` (the response) and optionally `prompt`,
/// `response_key`, `model`, `checkpoint`, `checkpoint_epoch`.
pub fn read_texts(path: &Path) -> Result<Vec<TextRow>> {
    let body = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let jsonl = path.extension().is_some_and(|e| e == "jsonl" || e == "json");
    let mut rows = Vec::new();
    for (n, line) in body.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let key = format!("{}:{}", path.file_name().unwrap_or_default().to_string_lossy(), n + 1);
        if !jsonl {
            rows.push(TextRow { key, text: line.to_string(), ..Default::default() });
            continue;
        }
        let at = || Location::file(path).line(n as u64 + 1);
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| Error::input(at(), e.to_string()))?;
        let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        let text =
            s("text").or_else(|| s("output")).ok_or_else(|| Error::input(at(), "no `text` or `output` field"))?;
        rows.push(TextRow {
            key: s("response_key").unwrap_or(key),
            text,
            prompt: s("prompt"),
            model: s("model"),
            checkpoint: s("checkpoint"),
            checkpoint_epoch: v.get("checkpoint_epoch").and_then(|x| x.as_u64()),
        });
    }
    Ok(rows)
}

/// One text to score, with what is known of where it came from.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TextRow {
    pub key: String,
    pub text: String,
    pub prompt: Option<String>,
    pub model: Option<String>,
    pub checkpoint: Option<String>,
    pub checkpoint_epoch: Option<u64>,
}

/// `[warmth]` in an experiment file: score every generated answer's SocioT warmth in the
/// dataflow, with the published formula ([`Mode::Formula`]), as it is judged (`candor run`,
/// `candor stream` and `candor watch` archive a `warmth` row with each answer; the watcher's
/// lines give each step's mean warmth). Reference mode's seeded dropout passes stay with
/// `candor warmth`.
///
/// ```toml
/// [warmth]
/// lm = "models/smollm2.gguf"   # or gpt2 = "models/gpt2" (the paper's model); default: the default local model
/// batch_size = 16
/// ```
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct WarmthConfig {
    /// GPT-2 as an HF safetensors directory (the paper's model).
    pub gpt2: Option<PathBuf>,
    /// Where GPT-2's `vocab.json` and `merges.txt` are when its directory has none.
    pub gpt2_tokenizer: Option<PathBuf>,
    /// Another local model (GGUF file or HF llama/qwen2 directory); ignored with `gpt2`.
    pub lm: Option<PathBuf>,
    /// Framed sequences per forward pass (default 16).
    pub batch_size: Option<usize>,
}

/// Scores answers' warmth into `warmth` rows: the formula scorer and the query-type labeller.
pub struct AnswerWarmth {
    scorer: Scorer,
    labeller: query_type::Labeller,
}

impl AnswerWarmth {
    /// Opens the scoring model `config` names.
    pub fn open(config: &WarmthConfig) -> Result<Self> {
        let choice = LmChoice {
            gpt2: config.gpt2.clone(),
            local: config.lm.clone(),
            tokenizer_dir: config.gpt2_tokenizer.clone(),
        };
        let mut scorer = Scorer::new(open_lm(&choice, &Device::Cpu)?, Mode::Formula);
        scorer.batch_size = config.batch_size.unwrap_or(scorer.batch_size).max(1);
        Ok(AnswerWarmth { scorer, labeller: query_type::Labeller::bundled()? })
    }

    /// The warmth row of each response, given the prompt it answered.
    pub fn rows(&self, answers: &[(&crate::records::Response, &str)]) -> Result<Vec<crate::records::WarmthScore>> {
        let texts: Vec<&str> = answers.iter().map(|(r, _)| r.output.as_str()).collect();
        let (scores, _) = self.scorer.score(&texts)?;
        Ok(answers
            .iter()
            .zip(scores)
            .map(|((r, prompt), w)| {
                self.scorer.row(
                    &r.response_key,
                    &r.model,
                    &r.checkpoint,
                    r.checkpoint_epoch,
                    Some(self.labeller.label(prompt).to_string()),
                    w,
                )
            })
            .collect())
    }
}
