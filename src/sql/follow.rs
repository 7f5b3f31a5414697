//! The hook between the dataflow and the statistics: when the archive sink reports an epoch
//! complete ([`crate::dataflow::EpochDone`]), the checkpoint's observation segment is on disk;
//! [`ArchiveFollower::poll`] applies every observation segment it has not applied yet and
//! refreshes the engine, so only the families of that checkpoint are recomputed.
//!
//! Segments are written atomically under fresh names and leave the archive only as a whole
//! (a checkpoint replaced, a grid re-built), so "not applied yet" is exactly "new", and a
//! segment that disappeared is retracted (its rows applied with diff −1).
//!
//! ```no_run
//! use candor::archive::Archive;
//! use candor::sql::{engine::StatsEngine, follow::ArchiveFollower};
//! let archive = Archive::open("runs/study").unwrap();
//! let mut engine = StatsEngine::new().unwrap();
//! let mut follower = ArchiveFollower::default();
//! // After each EpochDone:
//! let refreshed = follower.poll(&archive, &mut engine).unwrap();
//! println!("{} families recomputed", refreshed.families);
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;

use arrow::record_batch::RecordBatch;

use super::engine::{Refresh, StatsEngine};
use crate::archive::{Archive, read_segment};
use crate::error::Result;

/// Remembers which observation segments of an archive the engine has seen.
#[derive(Debug, Default)]
pub struct ArchiveFollower {
    applied: BTreeMap<PathBuf, Vec<RecordBatch>>,
}

impl ArchiveFollower {
    /// Applies the archive's new observation segments and refreshes the engine.
    pub fn poll(&mut self, archive: &Archive, engine: &mut StatsEngine) -> Result<Refresh> {
        let segments = archive.segments("observation")?;
        let present: std::collections::BTreeSet<&PathBuf> = segments.iter().map(|s| &s.path).collect();
        let gone: Vec<PathBuf> = self.applied.keys().filter(|p| !present.contains(p)).cloned().collect();
        for path in gone {
            for batch in self.applied.remove(&path).unwrap_or_default() {
                engine.apply(&batch, -1)?;
            }
        }
        for seg in &segments {
            if self.applied.contains_key(&seg.path) {
                continue;
            }
            let batches = read_segment(seg)?;
            for batch in &batches {
                engine.apply(batch, 1)?;
            }
            self.applied.insert(seg.path.clone(), batches);
        }
        engine.refresh()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::Partition;
    use crate::records::Observation;
    use crate::schema::Record;

    fn answers(model: &str, checkpoint: &str, ft: bool, epoch: u64) -> Vec<Observation> {
        (0..20)
            .map(|i| Observation {
                response_key: format!("{model}/{checkpoint}/{i}"),
                model: model.into(),
                checkpoint: checkpoint.into(),
                checkpoint_epoch: epoch,
                is_finetuned: ft,
                dataset: "trivia".into(),
                item_key: format!("q{i}"),
                amendment_type: if i % 2 == 0 { "unmodified" } else { "emotion:sad" }.into(),
                amendment_group: if i % 2 == 0 { "unmodified" } else { "emotion" }.into(),
                prompt_type: "original".into(),
                sample_index: 0,
                refusal: false,
                verdict: String::new(),
                correct: Some(!ft || i % 3 != 0),
            })
            .collect()
    }

    #[test]
    fn each_completed_checkpoint_recomputes_only_its_own_families() {
        let dir = tempfile::tempdir().unwrap();
        let archive = Archive::open_writer(dir.path(), "test").unwrap();
        let mut engine = StatsEngine::new().unwrap();
        let mut follower = ArchiveFollower::default();
        let write = |model: &str, ckpt: &str, ft: bool, epoch: u64| {
            assert_eq!(archive.register_checkpoint(model, ckpt, ft, None).unwrap(), epoch);
            let part = Partition::checkpoint(model, ckpt);
            let batch = Observation::to_batch(&answers(model, ckpt, ft, epoch)).unwrap();
            archive.write_epoch(epoch, &[("observation".into(), part, batch)], &serde_json::Value::Null).unwrap();
        };
        for (model, epoch) in [("a", 1), ("b", 2)] {
            write(model, "base", false, epoch);
        }
        assert_eq!(follower.poll(&archive, &mut engine).unwrap().families, 0, "no pairs without a fine-tuned side");
        write("a", "warm-e1", true, 3);
        write("b", "warm-e1", true, 4);
        assert_eq!(follower.poll(&archive, &mut engine).unwrap().families, 2);
        write("a", "warm-e2", true, 5);
        let r = follower.poll(&archive, &mut engine).unwrap();
        assert_eq!(r.families, 1, "only model a's new checkpoint");
        assert_eq!(follower.poll(&archive, &mut engine).unwrap().families, 0, "nothing new, nothing recomputed");
        assert_eq!(engine.view().family_count(), 3);
    }
}
