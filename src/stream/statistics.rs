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

/// Statistics messages, as (key, payload).
pub(super) type Messages = Vec<(String, Vec<u8>)>;

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
    /// The state from the archived observations, read once, but those of the epochs in
    /// `unpublished`: committed before a restart and not delivered, they are published again
    /// ([`Self::update`]) and must change the state then, or the families they changed would
    /// get no message.
    pub fn load(archive: &Archive, unpublished: &std::collections::BTreeSet<u64>) -> Result<Self> {
        let mut engine = StatsEngine::new()?;
        for segment in archive.segments(Observation::STREAM)? {
            if segment.epoch.is_some_and(|e| unpublished.contains(&e)) {
                continue;
            }
            for b in crate::archive::read_segment(&segment)? {
                engine.upsert(&b)?;
            }
        }
        engine.refresh_families()?;
        Ok(Statistics { engine })
    }

    /// Adds committed epochs, each (epoch, checkpoint key, observations), and returns the
    /// statistics messages they change, epoch by epoch, as (key, payload): each checkpoint's
    /// own, those of the fine-tuned checkpoints it pairs with when it is a base, and — with
    /// the first epoch, computed once for them all — the per-family tests of every family any
    /// of them changed (carried by the first, so that a restart before every epoch is
    /// delivered publishes the rest again without losing a family: see [`Self::load`]).
    /// `done`: the checkpoints committed, these among them.
    pub fn update(&mut self, epochs: &[(u64, String, Vec<RecordBatch>)], done: &Done) -> Result<Vec<Messages>> {
        // An upsert, so an epoch published again after a restart is not counted twice.
        for (_, _, batches) in epochs {
            for b in batches {
                self.engine.upsert(b)?;
            }
        }
        let Some(last) = epochs.last().map(|e| e.0) else { return Ok(Vec::new()) };
        let mut out = Vec::with_capacity(epochs.len());
        for (epoch, checkpoint, _) in epochs {
            // The checkpoint's own statistics, and, when it is a base, those of the
            // fine-tuned checkpoints it pairs with.
            let (model, finetuned) = (names_of(checkpoint).0, done[checkpoint].1);
            let mut changed = vec![checkpoint.to_string()];
            if !finetuned {
                let mut others: Vec<String> =
                    done.iter().filter(|(k, (_, ft))| *ft && names_of(k).0 == model).map(|(k, _)| k.clone()).collect();
                others.sort();
                changed.extend(others);
            }
            out.push(
                changed
                    .into_iter()
                    .map(|k| {
                        let stats = self.checkpoint(&k, *epoch, done).to_string().into_bytes();
                        (k, stats)
                    })
                    .collect::<Vec<_>>(),
            );
        }
        // The paper's per-category tests of every family the epochs changed, as of the last.
        for f in self.engine.refresh_families()? {
            let (key, stats) = family_message(&self.engine, &f, last)?;
            out[0].push((key, stats.to_string().into_bytes()));
        }
        Ok(out)
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::archive::Partition;
    use std::collections::{BTreeSet, HashMap};

    /// Model `m`'s answer to trivia item `q<i>` (unmodified, original) at `checkpoint`.
    pub(in crate::stream) fn obs(checkpoint: &str, epoch: u64, ft: bool, i: usize, correct: bool) -> Observation {
        Observation {
            response_key: format!("m/{checkpoint}/{i}"),
            model: "m".into(),
            checkpoint: checkpoint.into(),
            checkpoint_epoch: epoch,
            is_finetuned: ft,
            dataset: "trivia".into(),
            item_key: format!("q{i}"),
            amendment_type: "unmodified".into(),
            amendment_group: "unmodified".into(),
            prompt_type: "original".into(),
            sample_index: 0,
            refusal: false,
            verdict: String::new(),
            correct: Some(correct),
        }
    }

    /// Registers `checkpoint` of model `m`, commits its answers to items `q0`…`q<n-1>` (right
    /// where `right(i)`), records it in `done`; returns (epoch, checkpoint key, batches) as
    /// [`Statistics::update`] takes them.
    pub(in crate::stream) fn commit(
        archive: &Archive,
        done: &mut Done,
        checkpoint: &str,
        ft: bool,
        right: impl Fn(usize) -> bool,
        n: usize,
    ) -> (u64, String, Vec<RecordBatch>) {
        let epoch = archive.register_checkpoint("m", checkpoint, ft, None).unwrap();
        let rows: Vec<Observation> = (0..n).map(|i| obs(checkpoint, epoch, ft, i, right(i))).collect();
        let batch = Observation::to_batch(&rows).unwrap();
        archive
            .write_epoch(
                epoch,
                &[("observation".into(), Partition::checkpoint("m", checkpoint), batch.clone())],
                &serde_json::json!({}),
            )
            .unwrap();
        let key = super::super::state::checkpoint_key("m", checkpoint);
        done.insert(key.clone(), (epoch, ft));
        (epoch, key, vec![batch])
    }

    fn families(messages: &[(String, Vec<u8>)]) -> BTreeMap<String, serde_json::Value> {
        messages
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::from_slice::<serde_json::Value>(v).unwrap()))
            .filter(|(_, v)| v["kind"] == "family")
            .map(|(k, mut v)| {
                v.as_object_mut().unwrap().remove("update_epoch");
                (k, v)
            })
            .collect()
    }

    use std::collections::BTreeMap;

    /// The bug this pins: after a restart, an epoch committed but not delivered was published
    /// again with no family message (the state had been loaded with its observations, so
    /// publishing them again changed nothing), and the families it changed were never sent.
    #[test]
    fn an_epoch_published_again_after_a_restart_sends_its_families() {
        let dir = tempfile::tempdir().unwrap();
        let archive = Archive::open_writer(dir.path(), "test").unwrap();
        let mut done: Done = HashMap::new();
        let mut batches = BTreeMap::new();
        for (checkpoint, ft, wrong) in [("base", false, 0), ("warm", true, 6), ("warmer", true, 9)] {
            let (epoch, key, b) = commit(&archive, &mut done, checkpoint, ft, |i| i >= wrong, 20);
            batches.insert(epoch, (key, b));
        }
        let group = |epochs: &[u64]| -> Vec<(u64, String, Vec<RecordBatch>)> {
            epochs.iter().map(|e| (*e, batches[e].0.clone(), batches[e].1.clone())).collect()
        };
        // Epochs 2 and 3 were committed, not delivered: published again after the restart.
        let mut restarted = Statistics::load(&archive, &BTreeSet::from([2, 3])).unwrap();
        let again = restarted.update(&group(&[2, 3]), &done).unwrap();
        assert_eq!(again.len(), 2, "one message list per epoch");
        let sent = families(&again[0]);
        assert_eq!(sent.len(), 2, "both fine-tuned checkpoints' families: {sent:?}");
        assert!(again[1].iter().all(|(_, v)| !String::from_utf8_lossy(v).contains("\"family\"")));
        // The same messages as a stream that never stopped, publishing the epochs one by one
        // (the last message of each family key wins).
        let mut live = Statistics::load(&archive, &BTreeSet::from([1, 2, 3])).unwrap();
        let mut last = BTreeMap::new();
        for e in [1, 2, 3] {
            for list in live.update(&group(&[e]), &done).unwrap() {
                last.extend(families(&list));
            }
        }
        assert_eq!(sent, last);
        // Loaded with every epoch, as before the fix: publishing again sends no family.
        let mut loaded_all = Statistics::load(&archive, &BTreeSet::new()).unwrap();
        assert!(families(&loaded_all.update(&group(&[2, 3]), &done).unwrap()[0]).is_empty());
    }
}
