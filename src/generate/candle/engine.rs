//! Batched generation over a loaded model: chat prompts in, answers out.
//!
//! Continuous batching ([`Engine::run_continuous`]): up to `batch_size` requests are in
//! flight at once. Between decode passes, requests that have arrived join the running batch
//! while it has room: they are prefilled in the same forward pass as the running sequences'
//! next decode step, so an arrival stalls no one; then every active sequence advances one
//! token per pass. A sequence that stops (end of turn, a stop
//! string, `max_new_tokens`) leaves at once and is answered, and the next waiting request
//! takes its place, so a long answer holds neither a batch nor a request that arrives while it
//! runs. [`Engine::run`] is the same loop over a list of requests known up front;
//! `candor serve` feeds it from its queue.
//! Every sequence samples with its own sampler seeded from its request, and the model computes
//! each sequence's attention on its own cache, so an answer does not depend on which other
//! requests shared its batch.

use std::time::Instant;

use candle_core::Tensor;
use candle_transformers::generation::LogitsProcessor;
use tokenizers::Tokenizer;

use super::chat::{ChatTemplate, IM_END};
use super::llama::{Cache, Model, Positions};
use crate::error::{Error, Location, Result};
use crate::generate::{FinishReason, GenRequest, Generation};

/// A model with its tokenizer and chat format, ready to answer.
#[derive(Debug, Clone)]
pub struct Engine {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub chat: ChatTemplate,
    /// Tokens that end a turn (`<|im_end|>`, the end-of-sequence token).
    pub stop_ids: Vec<u32>,
}

/// Token counts and timings of one [`Engine::run`], for throughput figures.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BatchStats {
    pub requests: usize,
    /// Prompt tokens processed by prefill passes.
    pub prefill_tokens: u64,
    pub prefill_secs: f64,
    /// Tokens processed by decode passes (one per active sequence per pass).
    pub decode_tokens: u64,
    pub decode_secs: f64,
    /// Tokens sampled, end-of-turn tokens included.
    pub generated_tokens: u64,
    pub prefill_passes: u64,
    pub decode_passes: u64,
    /// Most sequences in one decode pass.
    pub max_active: usize,
}

impl BatchStats {
    pub fn prefill_tokens_per_sec(&self) -> f64 {
        self.prefill_tokens as f64 / self.prefill_secs.max(1e-9)
    }
    pub fn decode_tokens_per_sec(&self) -> f64 {
        self.decode_tokens as f64 / self.decode_secs.max(1e-9)
    }
}

struct Seq<T> {
    /// Where the answer goes.
    reply: T,
    request: GenRequest,
    cache: Cache,
    /// Tokens to feed next: the prompt, then the last sampled token.
    input: Vec<u32>,
    prompt_tokens: usize,
    sampled: u32,
    output: Vec<u32>,
    sampler: LogitsProcessor,
    secs: f64,
}

/// A chat turn's token ids in `chat`'s format.
fn encode_chat(tokenizer: &Tokenizer, chat: &ChatTemplate, system: Option<&str>, user: &str) -> Result<Vec<u32>> {
    let text = chat.render(system, user);
    let enc = tokenizer
        .encode(text.as_str(), false)
        .map_err(|e| Error::input(Location::default().field("prompt"), format!("cannot tokenize: {e}")))?;
    Ok(enc.get_ids().to_vec())
}

/// Counts prompt tokens as the engine will ([`Engine::budget`]).
pub struct PromptBudget {
    tokenizer: Tokenizer,
    chat: ChatTemplate,
    system: Option<String>,
    context: usize,
}

impl crate::generate::TokenBudget for PromptBudget {
    fn prompt_tokens(&self, request: &GenRequest) -> Result<usize> {
        let system = request.system_prompt.as_deref().or(self.system.as_deref());
        encode_chat(&self.tokenizer, &self.chat, system, &request.prompt).map(|t| t.len())
    }
    fn context(&self) -> usize {
        self.context
    }
}

fn bad_decoding(field: &str, msg: String) -> Error {
    Error::config(format!("decoding.{field}"), msg)
}

impl Engine {
    /// Token ids that end a turn in this tokenizer: `<|im_end|>` if it has one, and `eos`.
    pub fn stop_ids_for(tokenizer: &Tokenizer, eos: &[u32]) -> Vec<u32> {
        let mut ids: Vec<u32> = tokenizer.token_to_id(IM_END).into_iter().chain(eos.iter().copied()).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// The prompt's token ids; `system` overrides the template's default system prompt.
    pub fn encode_prompt(&self, system: Option<&str>, user: &str) -> Result<Vec<u32>> {
        encode_chat(&self.tokenizer, &self.chat, system, user)
    }

    /// What a server needs to check requests before they reach the model: the tokenizer and
    /// chat format, `system` for requests without their own, and the context.
    pub fn budget(&self, system: Option<String>) -> PromptBudget {
        PromptBudget {
            tokenizer: self.tokenizer.clone(),
            chat: self.chat.clone(),
            system,
            context: self.model.config().max_seq_len,
        }
    }

    fn admit<T>(&self, reply: T, request: GenRequest, system: Option<&str>) -> std::result::Result<Seq<T>, (T, Error)> {
        match self.check(&request, system) {
            Ok(prompt) => {
                let limit = self.model.config().max_seq_len;
                let d = &request.decoding;
                Ok(Seq {
                    reply,
                    // Room for the whole answer up front: the cache then grows in place, never copied.
                    cache: Cache::with_capacity(
                        self.model.config(),
                        (prompt.len() + d.max_new_tokens as usize).min(limit),
                    ),
                    prompt_tokens: prompt.len(),
                    input: prompt,
                    sampled: 0,
                    output: Vec::new(),
                    sampler: LogitsProcessor::new(d.seed, Some(d.temperature), d.top_p),
                    secs: 0.0,
                    request,
                })
            }
            Err(e) => Err((reply, e)),
        }
    }

    /// The prompt's tokens if the request can run: a valid decoding setting and a prompt that
    /// leaves room in the context.
    fn check(&self, request: &GenRequest, system: Option<&str>) -> Result<Vec<u32>> {
        let d = &request.decoding;
        if !(d.temperature >= 0.0 && d.temperature.is_finite()) {
            return Err(bad_decoding("temperature", format!("{} is not a temperature", d.temperature)));
        }
        if let Some(p) = d.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(bad_decoding("top_p", format!("{p} is not in (0, 1]")));
        }
        let prompt = self.encode_prompt(request.system_prompt.as_deref().or(system), &request.prompt)?;
        let limit = self.model.config().max_seq_len;
        if prompt.len() >= limit {
            return Err(Error::input(
                Location::default().field("prompt"),
                format!("prompt of {} tokens leaves no room in the context of {limit} tokens", prompt.len()),
            ));
        }
        Ok(prompt)
    }

    /// Samples the next token of `seq` from `logits`; returns why it stops, if it does.
    fn advance<T>(&self, seq: &mut Seq<T>, logits: &Tensor) -> Result<Option<FinishReason>> {
        let next = seq.sampler.sample(logits).map_err(|e| model_error("sampling", e))?;
        seq.sampled += 1;
        if self.stop_ids.contains(&next) && !seq.request.decoding.ignore_eos {
            return Ok(Some(FinishReason::Stop));
        }
        seq.output.push(next);
        let stops = &seq.request.decoding.stop;
        if !stops.is_empty() {
            let text = self.text(&seq.output)?;
            if stops.iter().any(|s| text.contains(s.as_str())) {
                return Ok(Some(FinishReason::Stop));
            }
        }
        if seq.sampled >= seq.request.decoding.max_new_tokens || seq.cache.len() + 1 > self.model.config().max_seq_len {
            return Ok(Some(FinishReason::Length));
        }
        seq.input = vec![next];
        Ok(None)
    }

    fn text(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, true).map_err(|e| Error::Internal(format!("cannot decode generated tokens: {e}")))
    }

    fn finish<T>(&self, seq: Seq<T>, reason: FinishReason) -> (T, Result<Generation>) {
        let generation = self.generation(&seq, reason);
        (seq.reply, generation)
    }

    fn generation<T>(&self, seq: &Seq<T>, reason: FinishReason) -> Result<Generation> {
        let mut output = self.text(&seq.output)?;
        // Cut at the earliest stop string; the stop string itself is not part of the answer.
        if let Some(cut) = seq.request.decoding.stop.iter().filter_map(|s| output.find(s.as_str())).min() {
            output.truncate(cut);
        }
        Ok(Generation {
            output,
            finish_reason: reason,
            prompt_tokens: seq.prompt_tokens as u32,
            completion_tokens: seq.sampled,
            latency_ms: seq.secs * 1e3,
        })
    }

    /// Answers `requests` in order, `batch_size` at a time; `system` is used by requests
    /// without their own system prompt. A request that cannot be run (a bad decoding setting, a
    /// prompt longer than the context) gets its error in place; a failing forward pass fails
    /// the whole call.
    pub fn run(
        &self,
        requests: &[GenRequest],
        system: Option<&str>,
        batch_size: usize,
    ) -> Result<(Vec<Result<Generation>>, BatchStats)> {
        let mut results: Vec<Option<Result<Generation>>> = (0..requests.len()).map(|_| None).collect();
        let mut waiting = requests.iter().cloned().enumerate();
        let stats = self.run_continuous(
            system,
            batch_size,
            |room, _idle| waiting.by_ref().take(room).map(|(i, r)| (r, i)).collect(),
            |i, answer| results[i] = Some(answer),
            |_| true,
        )?;
        let results = results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::Internal("a request was never answered".into()))))
            .collect();
        Ok((results, stats))
    }

    /// Continuous batching. Before every forward pass, `arrivals(room, idle)` hands over up to
    /// `room` requests that have arrived, each with its reply token `T`; `idle` says nothing
    /// is running, so it may wait for one. The run ends when it returns none while idle. Every
    /// request is answered through `answer` as soon as it stops (or at once if it cannot run).
    /// A failing forward pass answers every request in flight with the error and ends the run
    /// with it. A running request for which `wanted` turns false (its client went away) is
    /// dropped from the batch unanswered.
    pub fn run_continuous<T>(
        &self,
        system: Option<&str>,
        batch_size: usize,
        mut arrivals: impl FnMut(usize, bool) -> Vec<(GenRequest, T)>,
        mut answer: impl FnMut(T, Result<Generation>),
        wanted: impl Fn(&T) -> bool,
    ) -> Result<BatchStats> {
        let batch_size = batch_size.max(1);
        let mut stats = BatchStats::default();
        let mut active: Vec<Seq<T>> = Vec::new();
        loop {
            active.retain(|s| wanted(&s.reply));
            // Admit arrived requests into free slots and prefill them together.
            let mut fresh = Vec::new();
            let room = batch_size - active.len();
            if room > 0 {
                for (request, reply) in arrivals(room, active.is_empty()) {
                    stats.requests += 1;
                    match self.admit(reply, request, system) {
                        Ok(seq) if seq.request.decoding.max_new_tokens == 0 => {
                            let (reply, generation) = self.finish(seq, FinishReason::Length);
                            answer(reply, generation);
                        }
                        Ok(seq) => fresh.push(seq),
                        Err((reply, e)) => answer(reply, Err(e)),
                    }
                }
            }
            // Arrivals are prefilled in the same forward pass as the running sequences' decode
            // step (the model takes each sequence's own input), so an arrival stalls no one.
            let joined = fresh.len();
            active.append(&mut fresh);
            if active.is_empty() {
                break;
            }
            let first_new = active.len() - joined;
            let prompt_fed: usize = active[first_new..].iter().map(|s| s.input.len()).sum();
            let decode_fed = first_new;
            let start = Instant::now();
            let logits = {
                let mut batch: Vec<(&[u32], &mut Cache)> =
                    active.iter_mut().map(|s| (s.input.as_slice(), &mut s.cache)).collect();
                self.model.forward(&mut batch, Positions::Last).map_err(|e| model_error("forward pass", e))
            };
            let stepped = logits.and_then(|logits| {
                let mut finished = Vec::new();
                for (k, (seq, logits)) in active.iter_mut().zip(&logits).enumerate() {
                    if let Some(reason) = self.advance(seq, logits)? {
                        finished.push((k, reason));
                    }
                }
                Ok(finished)
            });
            let finished = match stepped {
                Ok(f) => f,
                Err(e) => {
                    let message = e.to_string();
                    for seq in active {
                        answer(seq.reply, Err(Error::Model { context: "batch".into(), message: message.clone() }));
                    }
                    return Err(e);
                }
            };
            // The pass's time is shared equally by the sequences it served, and split between
            // prefill and decode by the tokens each took in.
            let secs = start.elapsed().as_secs_f64();
            let n = active.len();
            active.iter_mut().for_each(|s| s.secs += secs / n as f64);
            stats.generated_tokens += n as u64;
            let prefill_share = prompt_fed as f64 / (prompt_fed + decode_fed) as f64;
            if joined > 0 {
                stats.prefill_passes += 1;
                stats.prefill_tokens += prompt_fed as u64;
                stats.prefill_secs += secs * prefill_share;
            }
            if decode_fed > 0 {
                stats.decode_passes += 1;
                stats.decode_tokens += decode_fed as u64;
                stats.decode_secs += secs * (1.0 - prefill_share);
                stats.max_active = stats.max_active.max(decode_fed);
            }
            for (k, reason) in finished.into_iter().rev() {
                let seq = active.remove(k);
                let (reply, generation) = self.finish(seq, reason);
                answer(reply, generation);
            }
        }
        Ok(stats)
    }

    /// Logits `[tokens, vocab]` for every position of `tokens` in one pass (entry `i` predicts
    /// token `i + 1`): the base of per-token log-likelihood scoring.
    pub fn logits_all_positions(&self, tokens: &[u32]) -> Result<Tensor> {
        self.model.forward_all_positions(tokens).map_err(|e| model_error("forward pass", e))
    }
}

pub(crate) fn model_error(context: &str, e: candle_core::Error) -> Error {
    Error::Model { context: context.to_string(), message: e.to_string() }
}
