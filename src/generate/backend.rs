//! Opening the backend a model's configuration names (`[models.backend] kind = …`).

use super::Generator;
use super::openai::{Endpoint, OpenAiGenerator};
use crate::error::{Error, Result};
use crate::model::{CheckpointConfig, ModelConfig};

/// The backend kinds Candor knows.
pub const KINDS: &[&str] = &["candle", "openai"];

/// A generator opened ahead of its use ([`open_ahead`]), with what it was opened for.
type Kept = (String, Box<dyn Generator>);

/// Generators opened ahead and not yet taken, the oldest first (a few at most: a watcher
/// keeps one).
static KEPT: std::sync::Mutex<Vec<Kept>> = std::sync::Mutex::new(Vec::new());

/// How many generators opened ahead are kept at most (each holds a model's weights).
const KEEP: usize = 2;

/// What a generator is opened for, as [`KEPT`] compares it.
fn opened_for(model: &ModelConfig, checkpoint: &CheckpointConfig) -> String {
    serde_json::to_string(&(model, checkpoint)).expect("plain data serializes")
}

/// Opens the generator for `checkpoint` of `model` now and keeps it for the next [`open`] of
/// the same model and checkpoint, which takes it instead of loading the weights again:
/// `candor watch` loads a checkpoint before announcing it (a folder that cannot load is an
/// error row, never an evaluation), then the generate operator opens it. A few are kept at
/// most ([`KEEP`]); opening more ahead drops the oldest.
pub fn open_ahead(model: &ModelConfig, checkpoint: &CheckpointConfig) -> Result<()> {
    let generator = open_new(model, checkpoint)?;
    let key = opened_for(model, checkpoint);
    let mut kept = KEPT.lock().unwrap_or_else(|p| p.into_inner());
    kept.retain(|(k, _)| *k != key);
    if kept.len() >= KEEP {
        kept.remove(0);
    }
    kept.push((key, generator));
    Ok(())
}

/// Opens the generator that answers for `checkpoint` of `model` (the one [`open_ahead`] kept
/// for them, if any).
pub fn open(model: &ModelConfig, checkpoint: &CheckpointConfig) -> Result<Box<dyn Generator>> {
    let key = opened_for(model, checkpoint);
    let mut kept = KEPT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(at) = kept.iter().position(|(k, _)| *k == key) {
        return Ok(kept.remove(at).1);
    }
    drop(kept);
    open_new(model, checkpoint)
}

fn open_new(model: &ModelConfig, checkpoint: &CheckpointConfig) -> Result<Box<dyn Generator>> {
    let table = model.backend_for(checkpoint);
    match kind(model, &table)? {
        "openai" => {
            let endpoint = Endpoint::from_table(&table, &model.name)?;
            Ok(Box::new(OpenAiGenerator::new(endpoint, checkpoint.system_prompt.as_deref())?))
        }
        "candle" => Ok(Box::new(super::candle::CandleGenerator::new(model, checkpoint)?)),
        other => Err(Error::config(
            format!("models.{}.backend.kind", model.name),
            format!("unknown backend `{other}` (expected one of: {})", KINDS.join(", ")),
        )),
    }
}

/// Fixes candle's CPU thread count from the first candle backend of `models` that sets
/// `threads` (see [`super::candle::init_threads`]: only the process's first call counts, so
/// `--threads` wins). Call it at start-up, before any thread exists.
pub fn init_threads(models: &[ModelConfig]) {
    for model in models {
        for checkpoint in &model.checkpoints {
            let table = model.backend_for(checkpoint);
            // A table that does not parse is reported when its generator opens.
            if kind(model, &table).is_ok_and(|k| k == "candle")
                && let Some(t) = super::candle::CandleOptions::from_table(&table).ok().and_then(|o| o.threads)
            {
                super::candle::init_threads(t);
                return;
            }
        }
    }
}

/// The backend kind a table names (`candle` when it names none): the one reading of `kind`.
fn kind<'t>(model: &ModelConfig, table: &'t toml::Table) -> Result<&'t str> {
    match table.get("kind") {
        Some(toml::Value::String(k)) => Ok(k.as_str()),
        None => Ok("candle"),
        Some(other) => Err(Error::config(
            format!("models.{}.backend.kind", model.name),
            format!("expected a string, found {other}"),
        )),
    }
}
