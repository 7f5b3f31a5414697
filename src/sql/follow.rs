//! The one archive follower: what an archive's committed segments add and remove, stream by
//! stream, as epochs commit. `candor sql`'s live catalog follows every stream with it (its
//! tables), and the statistics engine follows the observations with it
//! ([`ArchiveFollower::poll`]): new observation segments are applied, and only the families
//! they touch are recomputed.
//!
//! Segments are written atomically under fresh names and leave the archive only as a whole
//! (a checkpoint replaced, a grid re-built), so "not seen yet" is exactly "new", and a
//! segment that disappeared is retracted (its rows applied with diff −1). Every poll reads one
//! [`Snapshot`] of the archive, so all the streams it follows are at the same commit.
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

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use arrow::record_batch::RecordBatch;

use super::engine::{Refresh, StatsEngine};
use crate::archive::{Archive, Snapshot, read_segment};
use crate::error::Result;

/// One stream's segments as the follower holds them, in the order they were first seen.
#[derive(Debug, Default)]
struct Followed {
    segments: Vec<(PathBuf, Vec<RecordBatch>)>,
}

/// What one poll changed in a stream.
#[derive(Debug, Default)]
pub struct Change {
    pub added: Vec<RecordBatch>,
    pub removed: Vec<RecordBatch>,
}

impl Change {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

/// Remembers which segments of each stream of an archive have been seen.
#[derive(Debug, Default)]
pub struct ArchiveFollower {
    streams: BTreeMap<String, Followed>,
}

impl ArchiveFollower {
    /// Brings `stream` up to `snapshot`: reads the segments not seen yet and forgets those
    /// that left; returns their rows.
    pub fn follow(&mut self, snapshot: &Snapshot, stream: &str) -> Result<Change> {
        let segments = snapshot.segments(stream);
        let followed = self.streams.entry(stream.to_string()).or_default();
        let present: BTreeSet<&PathBuf> = segments.iter().map(|s| &s.path).collect();
        let mut change = Change::default();
        followed.segments.retain_mut(|(path, batches)| {
            let keep = present.contains(path);
            if !keep {
                change.removed.append(batches);
            }
            keep
        });
        let seen: BTreeSet<PathBuf> = followed.segments.iter().map(|(p, _)| p.clone()).collect();
        for seg in segments.iter().filter(|s| !seen.contains(&s.path)) {
            let batches = read_segment(seg)?;
            change.added.extend(batches.iter().cloned());
            followed.segments.push((seg.path.clone(), batches));
        }
        Ok(change)
    }

    /// Every row of `stream` the follower holds, as batches.
    pub fn batches(&self, stream: &str) -> Vec<RecordBatch> {
        self.streams
            .get(stream)
            .map(|f| f.segments.iter().flat_map(|(_, b)| b.iter().cloned()).collect())
            .unwrap_or_default()
    }

    /// Applies the archive's new observation segments (and retracts those that left) and
    /// refreshes the engine.
    pub fn poll(&mut self, archive: &Archive, engine: &mut StatsEngine) -> Result<Refresh> {
        self.update(&archive.snapshot()?, engine)
    }

    /// [`Self::poll`] at a snapshot the caller already holds.
    pub fn update(&mut self, snapshot: &Snapshot, engine: &mut StatsEngine) -> Result<Refresh> {
        let change = self.follow(snapshot, "observation")?;
        for batch in &change.removed {
            engine.apply(batch, -1)?;
        }
        for batch in &change.added {
            engine.apply(batch, 1)?;
        }
        engine.refresh()
    }
}
