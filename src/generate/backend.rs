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
    let kind = match table.get("kind") {
        Some(toml::Value::String(k)) => k.as_str(),
        None => "candle",
        Some(other) => {
            return Err(Error::config(
                format!("models.{}.backend.kind", model.name),
                format!("expected a string, found {other}"),
            ));
        }
    };
    match kind {
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
