//! The hook between the dataflow and the statistics: when the archive sink reports an epoch
//! complete ([`crate::dataflow::EpochDone`]), the checkpoint's observation segment is on disk;
//! [`ArchiveFollower::poll`] applies every observation segment it has not applied yet and
//! refreshes the engine, so only the families of that checkpoint are recomputed.
//!
//! Segments are append-only and written atomically, so "not applied yet" is exactly "new".
//!
//! ```no_run
//! use candor::archive::{Archive, Format};
//! use candor::sql::{engine::StatsEngine, follow::ArchiveFollower};
//! let archive = Archive::open("runs/study", Format::Parquet).unwrap();
//! let mut engine = StatsEngine::new().unwrap();
//! let mut follower = ArchiveFollower::default();
//! // After each EpochDone:
//! let refreshed = follower.poll(&archive, &mut engine).unwrap();
//! println!("{} families recomputed", refreshed.families);
//! ```

use std::collections::BTreeSet;
use std::path::PathBuf;

use super::engine::{Refresh, StatsEngine};
use crate::archive::{Archive, read_segment};
use crate::error::Result;

/// Remembers which observation segments of an archive the engine has seen.
#[derive(Debug, Default)]
pub struct ArchiveFollower {
    applied: BTreeSet<PathBuf>,
}

impl ArchiveFollower {
    /// Applies the archive's new observation segments and refreshes the engine.
    pub fn poll(&mut self, archive: &Archive, engine: &mut StatsEngine) -> Result<Refresh> {
        for seg in archive.segments("observation")? {
            if self.applied.contains(&seg.path) {
                continue;
            }
            for batch in read_segment("observation", &seg.path)? {
                engine.apply(&batch, 1)?;
            }
            self.applied.insert(seg.path);
        }
        engine.refresh()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::{Format, Partition};
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
        let archive = Archive::open(dir.path(), Format::Parquet).unwrap();
        let mut engine = StatsEngine::new().unwrap();
        let mut follower = ArchiveFollower::default();
        let write = |model: &str, ckpt: &str, ft: bool, epoch: u64| {
            let part = Partition::Checkpoint { model: model.into(), checkpoint: ckpt.into() };
            archive
                .append("observation", &part, &[Observation::to_batch(&answers(model, ckpt, ft, epoch)).unwrap()])
                .unwrap();
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
