//! The stream's statistics state and its messages: per checkpoint the observations'
//! correctness by pair key (accuracy, and the paired counts and McNemar's test of a
//! fine-tuned checkpoint against its base), and per family the paper's paired counts (the same
//! incremental view `candor sql` keeps) for the per-family tests.

use std::collections::HashMap;

use arrow::record_batch::RecordBatch;

use super::messages::SCHEMA_VERSION;
use super::state::{Done, checkpoint_key};
use crate::archive::Archive;
use crate::error::{Error, Result};
use crate::records::Observation;
use crate::schema::Record;

/// The model of a [`checkpoint_key`].
fn model_of(checkpoint_key: &str) -> String {
    crate::identity::split_key(checkpoint_key).into_iter().next().unwrap_or_default()
}

/// The key that pairs a fine-tuned checkpoint's observation with its base's.
fn pair_key(o: &Observation) -> String {
    crate::identity::key(&[&o.dataset, &o.item_key, &o.amendment_type, &o.prompt_type, &o.sample_index.to_string()])
}

/// Both statistics states, kept up to date as epochs are published.
pub(super) struct Statistics {
    /// Per checkpoint, pair key → correct (None: excluded).
    observations: HashMap<String, HashMap<String, Option<bool>>>,
    /// The paper's paired counts per family, maintained as epochs are published (the same
    /// incremental view `candor sql` keeps), for the per-family statistics messages.
    paired: crate::sql::view::PairedView,
}

impl Statistics {
    /// Both states from the archived observations, read once.
    pub fn load(archive: &Archive) -> Result<Self> {
        let mut observations: HashMap<String, HashMap<String, Option<bool>>> = HashMap::new();
        let mut paired = crate::sql::view::PairedView::default();
        for b in archive.read(Observation::STREAM)? {
            paired.upsert(&b)?;
            for o in Observation::from_batch(&b)? {
                observations
                    .entry(checkpoint_key(&o.model, &o.checkpoint))
                    .or_default()
                    .insert(pair_key(&o), o.correct);
            }
        }
        paired.take_dirty();
        Ok(Statistics { observations, paired })
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
        observations: &[Observation],
        done: &Done,
    ) -> Result<Vec<(String, Vec<u8>)>> {
        let cell = self.observations.entry(checkpoint.to_string()).or_default();
        for o in observations {
            cell.insert(pair_key(o), o.correct);
        }
        // The checkpoint's own statistics, and, when it is a base, those of the fine-tuned
        // checkpoints it pairs with.
        let (model, finetuned) = (model_of(checkpoint), done[checkpoint].1);
        let mut changed = vec![checkpoint.to_string()];
        if !finetuned {
            let mut others: Vec<String> =
                done.iter().filter(|(k, (_, ft))| *ft && model_of(k) == model).map(|(k, _)| k.clone()).collect();
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
        // The paper's per-category tests of every family the epoch changed. An upsert, so
        // an epoch published again after a restart is not counted twice.
        for b in observation_batches {
            self.paired.upsert(b)?;
        }
        let (dirty, _) = self.paired.take_dirty();
        let mut families: Vec<_> = dirty.into_iter().map(|f| (self.paired.family_names(&f), f)).collect();
        families.sort();
        for (names, f) in families {
            let (key, stats) = family_statistics(names, &self.paired.family_categories(&f), epoch)?;
            statistics.push((key, stats.to_string().into_bytes()));
        }
        Ok(statistics)
    }

    /// A checkpoint's statistics: accuracy over the included observations and, for a
    /// fine-tuned checkpoint whose base is evaluated, the paired counts and McNemar's test.
    fn checkpoint(&self, checkpoint: &str, update_epoch: u64, done: &Done) -> serde_json::Value {
        let empty = HashMap::new();
        let obs = self.observations.get(checkpoint).unwrap_or(&empty);
        let n = obs.len();
        let correct = obs.values().filter(|c| **c == Some(true)).count();
        let included = obs.values().filter(|c| c.is_some()).count();
        let (epoch, finetuned) = done[checkpoint];
        let model = model_of(checkpoint);
        let same_model = done.iter().filter(|(k, _)| model_of(k) == model).map(|(k, (_, ft))| (k.as_str(), *ft));
        let base = crate::identity::base_checkpoints(same_model).first().map(|b| b.to_string());
        let paired = base.filter(|_| finetuned).map(|b| {
            let base_obs = self.observations.get(&b).unwrap_or(&empty);
            let mut cells = [0u64; 4];
            for (k, c) in obs {
                if let (Some(ft), Some(Some(bc))) = (c, base_obs.get(k)) {
                    cells[match (*bc, *ft) {
                        (true, true) => 0,
                        (true, false) => 1,
                        (false, true) => 2,
                        (false, false) => 3,
                    }] += 1;
                }
            }
            serde_json::json!({
                "base": b, "n11": cells[0], "n10": cells[1], "n01": cells[2], "n00": cells[3],
                "mcnemar_exact_p": crate::stats::mcnemar::mcnemar_exact(cells[1], cells[2]),
            })
        });
        serde_json::json!({
            "schema_version": SCHEMA_VERSION,
            "kind": "checkpoint",
            "key": checkpoint,
            "checkpoint_epoch": epoch,
            "update_epoch": update_epoch,
            "finetuned": finetuned,
            "observations": n,
            "included": included,
            "correct": correct,
            "accuracy": if included > 0 { Some(correct as f64 / included as f64) } else { None },
            "paired": paired,
        })
    }
}

/// A family's statistics message: per category (amendment type) the paired counts, the
/// accuracies, the exact McNemar p, its Benjamini–Hochberg adjustment within the family and
/// the effect sizes, as `candor analyze` reports them (METHOD.md §4).
fn family_statistics(
    (model, base, checkpoint, dataset, test): (&str, &str, &str, &str, &str),
    categories: &[(String, crate::stats::paired::PairedCounts)],
    update_epoch: u64,
) -> Result<(String, serde_json::Value)> {
    use crate::stats::paired::{ALPHA, family};
    let counts: Vec<_> = categories.iter().map(|(_, c)| *c).collect();
    let stats = family(&counts, ALPHA).map_err(|e| Error::Internal(format!("family statistics: {e}")))?;
    let rows: Vec<serde_json::Value> = categories
        .iter()
        .zip(stats)
        .map(|((category, _), s)| {
            serde_json::json!({
                "category": category, "n": s.n, "both_correct": s.both_correct, "b": s.b, "c": s.c,
                "both_wrong": s.both_wrong, "acc_base_pct": s.acc_base_pct, "acc_ft_pct": s.acc_ft_pct,
                "diff_pp": s.diff_pp, "p_exact": s.p_exact, "p_adjusted": s.p_adjusted,
                "significant": s.significant, "paper_g": s.paper_g, "cohens_g": s.cohens_g,
                "odds_ratio": crate::stats::effect::json_number(s.odds_ratio),
            })
        })
        .collect();
    let key = format!("{model}/{base}/{checkpoint}/{dataset}/{test}");
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
