//! Opening the backend a model's configuration names (`[models.backend] kind = …`).

use super::Generator;
use super::openai::{Endpoint, OpenAiGenerator};
use crate::error::{Error, Result};
use crate::model::{CheckpointConfig, ModelConfig};

/// The backend kinds Candor knows.
pub const KINDS: &[&str] = &["candle", "openai"];

/// Opens the generator that answers for `checkpoint` of `model`.
pub fn open(model: &ModelConfig, checkpoint: &CheckpointConfig) -> Result<Box<dyn Generator>> {
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
