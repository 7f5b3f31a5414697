//! The stream's statistics messages, from one state: the [`StatsEngine`] that `candor sql`
//! keeps (paired counts and answer cells maintained by the differential dataflow of
//! [`crate::sql::counts`]). Per checkpoint: accuracy over its answer cells and, for a
//! fine-tuned checkpoint, its paired counts against the model's base summed over its families,
//! with McNemar's test; per family: the rows `queries/family_stats.sql` gives (the paper's
//! tests, METHOD.md §4), the same numbers `candor sql` and the report show.

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Float64Type, Int64Type, UInt64Type};

use super::messages::SCHEMA_VERSION;
use super::state::Done;
use crate::archive::Archive;
use crate::error::{Error, Result};
use crate::records::Observation;
use crate::schema::Record;
use crate::sql::engine::StatsEngine;

/// The (model, checkpoint) of a [`super::state::checkpoint_key`].
fn names_of(checkpoint_key: &str) -> (String, String) {
    let mut parts = crate::identity::split_key(checkpoint_key).into_iter();
    (parts.next().unwrap_or_default(), parts.next().unwrap_or_default())
}

/// The statistics state, kept up to date as epochs are published.
pub(super) struct Statistics {
    engine: StatsEngine,
}

impl Statistics {
    /// The state from the archived observations, read once.
    pub fn load(archive: &Archive) -> Result<Self> {
        let mut engine = StatsEngine::new()?;
        for b in archive.read(Observation::STREAM)? {
            engine.upsert(&b)?;
        }
        engine.refresh_families()?;
        Ok(Statistics { engine })
    }

    /// Adds one committed epoch of `checkpoint` (its observations, as batches and as rows)
    /// and returns the statistics messages it changes, as (key, payload): the checkpoint's
    /// own, those of the fine-tuned checkpoints it pairs with when it is a base, and the
    /// per-family tests of every family it changed. `done`: the checkpoints committed, the
    /// epoch's among them.
    pub fn update(
        &mut self,
        epoch: u64,
        checkpoint: &str,
        observation_batches: &[RecordBatch],
        done: &Done,
    ) -> Result<Vec<(String, Vec<u8>)>> {
        // An upsert, so an epoch published again after a restart is not counted twice.
        for b in observation_batches {
            self.engine.upsert(b)?;
        }
        // The checkpoint's own statistics, and, when it is a base, those of the fine-tuned
        // checkpoints it pairs with.
        let (model, finetuned) = (names_of(checkpoint).0, done[checkpoint].1);
        let mut changed = vec![checkpoint.to_string()];
        if !finetuned {
            let mut others: Vec<String> =
                done.iter().filter(|(k, (_, ft))| *ft && names_of(k).0 == model).map(|(k, _)| k.clone()).collect();
            others.sort();
            changed.extend(others);
        }
        let mut statistics: Vec<(String, Vec<u8>)> = changed
            .into_iter()
            .map(|k| {
                let stats = self.checkpoint(&k, epoch, done).to_string().into_bytes();
                (k, stats)
            })
            .collect();
        // The paper's per-category tests of every family the epoch changed.
        for f in self.engine.refresh_families()? {
            let (key, stats) = family_message(&self.engine, &f, epoch)?;
            statistics.push((key, stats.to_string().into_bytes()));
        }
        Ok(statistics)
    }

    /// A checkpoint's statistics: accuracy over the included observations and, for a
    /// fine-tuned checkpoint whose base is evaluated, the paired counts and McNemar's test.
    fn checkpoint(&self, checkpoint: &str, update_epoch: u64, done: &Done) -> serde_json::Value {
        let view = self.engine.view();
        let (model, name) = names_of(checkpoint);
        let counts = view.checkpoint_counts(&model, &name);
        let included = counts.responses - counts.excluded;
        let correct = included - counts.incorrect;
        let (epoch, finetuned) = done[checkpoint];
        let same_model = done.iter().filter(|(k, _)| names_of(k).0 == model).map(|(k, (_, ft))| (k.as_str(), *ft));
        let base = crate::identity::base_checkpoints(same_model).first().map(|b| b.to_string());
        let paired = base.filter(|_| finetuned).map(|b| {
            let p = view.checkpoint_pairs(&model, &names_of(&b).1, &name);
            serde_json::json!({
                "base": b, "n11": p.both_correct, "n10": p.b, "n01": p.c, "n00": p.both_wrong,
                "mcnemar_exact_p": crate::stats::mcnemar::mcnemar_exact(p.b as u64, p.c as u64),
            })
        });
        serde_json::json!({
            "schema_version": SCHEMA_VERSION,
            "kind": "checkpoint",
            "key": checkpoint,
            "checkpoint_epoch": epoch,
            "update_epoch": update_epoch,
            "finetuned": finetuned,
            "observations": counts.responses,
            "included": included,
            "correct": correct,
            "accuracy": if included > 0 { Some(correct as f64 / included as f64) } else { None },
            "paired": paired,
        })
    }
}

/// The family columns of `family_stats.sql`, which the message carries once, at its top.
const FAMILY_COLUMNS: [&str; 6] =
    ["model", "base_checkpoint", "checkpoint", "checkpoint_epoch", "dataset", "test_type"];

/// A family's statistics message: its `family_stats.sql` rows, one per category (amendment
/// type), as `candor sql` and `candor analyze` give them (`p_bh` is named `p_adjusted`, as in
/// `schemas/kafka/statistics.json`). A family whose pairs were all retracted has none.
fn family_message(
    engine: &StatsEngine,
    family: &crate::sql::view::FamilyKey,
    update_epoch: u64,
) -> Result<(String, serde_json::Value)> {
    use crate::stats::paired::ALPHA;
    let (model, base, checkpoint, dataset, test) = engine.view().family_names(family);
    let rows = match engine.family_rows(family) {
        Some(batch) => json_rows(batch)?,
        None => Vec::new(),
    };
    // Escaped like every structured key (`identity::key`): names may contain `/`.
    let key = crate::identity::key(&[model, base, checkpoint, dataset, test]);
    Ok((
        key.clone(),
        serde_json::json!({
            "schema_version": SCHEMA_VERSION,
            "kind": "family",
            "key": key,
            "update_epoch": update_epoch,
            "model": model,
            "base_checkpoint": base,
            "checkpoint": checkpoint,
            "dataset": dataset,
            "test_type": test,
            "alpha": ALPHA,
            "categories": rows,
        }),
    ))
}

/// The rows of a `family_stats.sql` batch as JSON objects, without the family columns;
/// non-finite numbers as `candor analyze` writes them ("Infinity", null for NaN).
fn json_rows(batch: &RecordBatch) -> Result<Vec<serde_json::Value>> {
    let mut rows = vec![serde_json::Map::new(); batch.num_rows()];
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        let name = field.name().as_str();
        if FAMILY_COLUMNS.contains(&name) {
            continue;
        }
        let name = if name == "p_bh" { "p_adjusted" } else { name };
        for (i, row) in rows.iter_mut().enumerate() {
            let value = if column.is_null(i) {
                serde_json::Value::Null
            } else {
                match column.data_type() {
                    DataType::Utf8 => serde_json::json!(column.as_string::<i32>().value(i)),
                    DataType::Boolean => serde_json::json!(column.as_boolean().value(i)),
                    DataType::Int64 => serde_json::json!(column.as_primitive::<Int64Type>().value(i)),
                    DataType::UInt64 => serde_json::json!(column.as_primitive::<UInt64Type>().value(i)),
                    DataType::Float64 => {
                        crate::stats::effect::json_number(column.as_primitive::<Float64Type>().value(i))
                    }
                    other => {
                        return Err(Error::Internal(format!("family_stats.sql column `{name}` has type {other}")));
                    }
                }
            };
            row.insert(name.to_string(), value);
        }
    }
    Ok(rows.into_iter().map(serde_json::Value::Object).collect())
}
