//! The stream's state: where to resume reading (offsets), the announcements registry, the
//! answers not archived yet, the epochs published, and what the archive already holds
//! (committed epochs, evaluated checkpoints, archived response keys).
//!
//! The admission rules live here: which announcements and answers are new, repeats,
//! conflicting or late, and when a checkpoint is complete. [`Ledger::save`] writes the part
//! that survives a restart ([`StreamState`], `stream-state.json`); the rest is read back from
//! the archive when the stream opens (a committed checkpoint's response keys, when an answer
//! for it comes).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::messages::{Announcement, Answer, Reject};
use crate::archive::Archive;
use crate::error::{Error, Result};
use crate::records::Response;
use crate::schema::Record;

/// The state saved with the archive: where to resume and what is not archived yet.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StreamState {
    /// Next offset to read, by `topic/partition`.
    pub offsets: BTreeMap<String, i64>,
    /// Announced checkpoints not evaluated yet, by `model/checkpoint`.
    pub announced: BTreeMap<String, Announced>,
    /// Answers not archived yet, by `model/checkpoint` and response key.
    pub pending: BTreeMap<String, PendingAnswers>,
    /// Epochs whose outputs are published.
    pub published: BTreeSet<u64>,
    /// Dead letters sent, over all runs.
    pub dead_letters: u64,
}

/// One checkpoint's answers not archived yet, by response key.
///
/// Saved as the JSON object of its answers, whose text is kept once written: a checkpoint
/// whose answers are all in does not change until its epoch is recorded, while the state is
/// saved every few hundred milliseconds (with a backlog, thousands of answers each time).
/// Any change drops the kept text.
#[derive(Clone, Debug, Default)]
pub struct PendingAnswers {
    answers: BTreeMap<String, Answer>,
    json: std::sync::OnceLock<Box<serde_json::value::RawValue>>,
}

impl PendingAnswers {
    pub fn get(&self, key: &str) -> Option<&Answer> {
        self.answers.get(key)
    }

    pub fn insert(&mut self, key: String, answer: Answer) {
        self.json = std::sync::OnceLock::new();
        self.answers.insert(key, answer);
    }

    pub fn len(&self) -> usize {
        self.answers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.answers.is_empty()
    }

    pub fn answers(&self) -> &BTreeMap<String, Answer> {
        &self.answers
    }
}

impl PartialEq for PendingAnswers {
    fn eq(&self, other: &Self) -> bool {
        self.answers == other.answers
    }
}

impl Serialize for PendingAnswers {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::Error as _;
        if self.json.get().is_none() {
            let json = serde_json::value::to_raw_value(&self.answers).map_err(S::Error::custom)?;
            let _ = self.json.set(json);
        }
        self.json.get().expect("set above").serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for PendingAnswers {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        Ok(PendingAnswers { answers: BTreeMap::deserialize(deserializer)?, json: Default::default() })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Announced {
    pub announcement: Announcement,
    pub epoch: u64,
}

/// The state file, in the archive root.
pub const STATE_FILE: &str = "stream-state.json";

impl StreamState {
    pub fn load(root: &Path) -> Result<Self> {
        let path = root.join(STATE_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| Error::input(crate::error::Location::file(&path), e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StreamState::default()),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    /// Replaces the state file atomically (written, synced, renamed).
    pub fn save(&self, root: &Path) -> Result<()> {
        let path = root.join(STATE_FILE);
        let tmp = root.join(format!(".{STATE_FILE}.{}.tmp", std::process::id()));
        {
            // Streamed to the file (the state holds every pending answer: megabytes, never
            // built whole in memory).
            let f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
            let mut w = std::io::BufWriter::with_capacity(1 << 16, f);
            serde_json::to_writer(&mut w, self).map_err(|e| Error::io(&tmp, std::io::Error::from(e)))?;
            let f = w.into_inner().map_err(|e| Error::io(&tmp, e.into_error()))?;
            f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        }
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        std::fs::File::open(root).and_then(|d| d.sync_all()).map_err(|e| Error::io(root, e))
    }
}

pub(super) fn checkpoint_key(model: &str, checkpoint: &str) -> String {
    crate::identity::CheckpointRef::new(model, checkpoint).key()
}

/// Checkpoints whose epoch is committed: `model/checkpoint` → (epoch, is_finetuned).
pub(super) type Done = HashMap<String, (u64, bool)>;

/// A checkpoint taken off the ready queue for evaluation: its announcement and its answers
/// (which stay pending, and saved with the state, until its epoch is recorded committed).
pub(super) struct Ready<'r> {
    pub checkpoint: &'r str,
    pub announced: &'r Announced,
    pub answers: &'r BTreeMap<String, Answer>,
    /// Its epoch is committed already (evaluated before a crash, not saved since).
    pub committed: bool,
}

/// What an evaluation added to the archive, for [`Ledger::record`].
#[derive(Default)]
pub(super) struct Recorded {
    /// Every checkpoint taken for evaluation, committed before or now: (key, epoch, finetuned).
    pub finished: Vec<(String, u64, bool)>,
    /// Epochs committed by this evaluation.
    pub committed: Vec<u64>,
}

/// The stream's state, saved ([`StreamState`]) and derived from the archive.
pub(super) struct Ledger<'a> {
    archive: &'a Archive,
    state: StreamState,
    committed: BTreeSet<u64>,
    done: Done,
    /// The response keys archived for a committed checkpoint, read from the archive the first
    /// time an answer for it comes (a re-read after a restart, a repeat, or a late answer):
    /// an answer for a checkpoint not committed cannot be archived yet.
    archived_keys: HashMap<String, HashSet<String, foldhash::fast::RandomState>>,
    /// Checkpoints complete and waiting for the end of the current poll batch.
    ready: BTreeSet<String>,
    /// Checkpoints taken for evaluation and not recorded committed yet: their answers stay
    /// pending (a crash before the commit evaluates them again), and an answer beyond their
    /// count is late, as for a ready one.
    in_flight: HashSet<String, foldhash::fast::RandomState>,
    /// Changed since the last save.
    dirty: bool,
}

impl<'a> Ledger<'a> {
    pub fn open(archive: &'a Archive) -> Result<Self> {
        let committed = archive.committed_epochs()?;
        let done = archive
            .checkpoints()?
            .into_iter()
            .filter(|e| committed.contains(&e.epoch))
            .map(|e| (checkpoint_key(&e.model, &e.checkpoint), (e.epoch, e.is_finetuned)))
            .collect();
        Ok(Ledger {
            archive,
            state: StreamState::load(archive.root())?,
            committed,
            done,
            archived_keys: HashMap::new(),
            ready: BTreeSet::new(),
            in_flight: HashSet::default(),
            dirty: false,
        })
    }

    /// Checkpoints whose epoch is committed.
    pub fn done(&self) -> &Done {
        &self.done
    }

    /// Where to resume reading `topic/partition`, if it was read before.
    pub fn offset(&self, position: &str) -> Option<i64> {
        self.state.offsets.get(position).copied()
    }

    pub fn dirty(&self) -> bool {
        self.dirty
    }

    /// Drops from the state the checkpoints committed since the last save (after a crash).
    pub fn drop_committed(&mut self) {
        let finished: Vec<String> = self
            .state
            .announced
            .iter()
            .filter(|(_, a)| self.committed.contains(&a.epoch))
            .map(|(k, _)| k.clone())
            .collect();
        for k in finished {
            self.state.announced.remove(&k);
            self.state.pending.remove(&k);
        }
    }

    /// Committed epochs whose outputs are not marked published, in epoch order, with their
    /// checkpoint.
    pub fn unpublished(&self) -> Vec<(u64, String)> {
        let mut unpublished: Vec<(u64, String)> = self
            .done
            .iter()
            .filter(|(_, (e, _))| !self.state.published.contains(e))
            .map(|(k, (e, _))| (*e, k.clone()))
            .collect();
        unpublished.sort();
        unpublished
    }

    /// Queues every announced checkpoint whose answers are all in.
    pub fn queue_complete(&mut self) {
        let announced: Vec<String> = self.state.announced.keys().cloned().collect();
        for k in announced {
            self.mark_if_complete(&k);
        }
    }

    /// Moves `topic/partition` past `offset`.
    pub fn advance(&mut self, topic: &str, partition: i32, offset: i64) {
        let position = format!("{topic}/{partition}");
        match self.state.offsets.get_mut(&position) {
            Some(o) => *o = offset + 1,
            None => {
                self.state.offsets.insert(position, offset + 1);
            }
        }
        self.dirty = true;
    }

    /// Records an announcement; returns the checkpoint to look at, or None for a repeat.
    /// `can_generate` tells whether an announcement without an answer count can be generated
    /// for.
    pub fn announce(
        &mut self,
        a: Announcement,
        can_generate: impl FnOnce(&Announcement) -> bool,
    ) -> std::result::Result<Option<String>, Reject> {
        let key = checkpoint_key(&a.model, &a.checkpoint);
        if let Some(prev) = self.state.announced.get(&key) {
            if prev.announcement == a {
                return Ok(None);
            }
            return Err(Reject::new(
                "conflicting_announcement",
                format!("`{key}` was announced before with different fields"),
            ));
        }
        if self.done.contains_key(&key) {
            return Ok(None);
        }
        if a.answers.is_none() && !can_generate(&a) {
            return Err(Reject::new(
                "unknown_model",
                format!(
                    "no `answers` count, and the experiment has no [[models]] entry `{}` to generate with",
                    a.model
                ),
            ));
        }
        let epoch = self
            .archive
            .register_checkpoint(&a.model, &a.checkpoint, a.finetuned, a.variant.as_deref())
            .map_err(|e| Reject::new("conflicting_announcement", e.to_string()))?;
        self.state.announced.insert(key.clone(), Announced { announcement: a, epoch });
        self.mark_if_complete(&key);
        Ok(Some(key))
    }

    /// Records an answer; returns its checkpoint, or None for a repeat or an answer already
    /// archived. Fails only when the archive cannot be read.
    pub fn answer(&mut self, a: Answer) -> Result<std::result::Result<Option<String>, Reject>> {
        let key = a.response_key();
        let checkpoint = checkpoint_key(&a.model, &a.checkpoint);
        if let Some(&(epoch, _)) = self.done.get(&checkpoint) {
            if self.archived(&checkpoint, epoch)?.contains(&key) {
                return Ok(Ok(None));
            }
            return Ok(Err(Reject::new("late_answer", format!("checkpoint `{checkpoint}` is already evaluated"))));
        }
        Ok(self.admit(checkpoint, key, a))
    }

    /// The response keys archived for committed `checkpoint` (its `epoch`), read once.
    fn archived(&mut self, checkpoint: &str, epoch: u64) -> Result<&HashSet<String, foldhash::fast::RandomState>> {
        if !self.archived_keys.contains_key(checkpoint) {
            let mut keys = HashSet::default();
            for b in self.archive.read_epoch(Response::STREAM, epoch)? {
                keys.extend(crate::dataflow::string_column(&b, "response_key")?.iter().flatten().map(str::to_string));
            }
            self.archived_keys.insert(checkpoint.to_string(), keys);
        }
        Ok(&self.archived_keys[checkpoint])
    }

    /// An answer for a checkpoint not committed: new, a repeat, conflicting, or late.
    fn admit(&mut self, checkpoint: String, key: String, a: Answer) -> std::result::Result<Option<String>, Reject> {
        let pending = self.state.pending.entry(checkpoint.clone()).or_default();
        match pending.get(&key) {
            Some(prev) if *prev == a => Ok(None),
            Some(_) => {
                Err(Reject::new("conflicting_answer", format!("a different answer with key `{key}` came first")))
            }
            // Complete (all its announced answers are in) but not evaluated yet: an answer
            // beyond the count is late however the messages were batched, so a replay of the
            // same input decides the same.
            None if self.ready.contains(&checkpoint) || self.in_flight.contains(&checkpoint) => Err(Reject::new(
                "late_answer",
                format!("checkpoint `{checkpoint}` already has all the answers its announcement counts"),
            )),
            None => {
                pending.insert(key, a);
                self.mark_if_complete(&checkpoint);
                Ok(Some(checkpoint))
            }
        }
    }

    /// Queues a checkpoint for evaluation once it is announced and all its answers are in.
    fn mark_if_complete(&mut self, checkpoint: &str) {
        if self.in_flight.contains(checkpoint) {
            return;
        }
        let Some(announced) = self.state.announced.get(checkpoint) else { return };
        let have = self.state.pending.get(checkpoint).map_or(0, PendingAnswers::len) as u64;
        if announced.announcement.answers.is_none_or(|n| have >= n) {
            self.ready.insert(checkpoint.to_string());
        }
    }

    /// Takes the queued checkpoints for evaluation (in key order): they are in flight until
    /// [`Self::record`] finishes them; [`Self::ready`] shows each.
    pub fn take_ready(&mut self) -> Vec<String> {
        let taken: Vec<String> = std::mem::take(&mut self.ready).into_iter().collect();
        self.in_flight.extend(taken.iter().cloned());
        taken
    }

    /// A checkpoint taken by [`Self::take_ready`]: its announcement and pending answers.
    pub fn ready<'r>(&'r self, checkpoint: &'r str) -> Ready<'r> {
        const NONE: &BTreeMap<String, Answer> = &BTreeMap::new();
        let announced = self.state.announced.get(checkpoint).expect("queued when announced");
        Ready {
            checkpoint,
            announced,
            answers: self.state.pending.get(checkpoint).map_or(NONE, PendingAnswers::answers),
            committed: self.committed.contains(&announced.epoch),
        }
    }

    /// Records what an evaluation committed: its checkpoints are done, no longer announced,
    /// and their answers no longer pending.
    pub fn record(&mut self, r: &Recorded) {
        self.committed.extend(r.committed.iter().copied());
        for (checkpoint, epoch, finetuned) in &r.finished {
            self.done.insert(checkpoint.clone(), (*epoch, *finetuned));
            self.state.announced.remove(checkpoint);
            self.state.pending.remove(checkpoint);
            self.in_flight.remove(checkpoint);
        }
        if !r.finished.is_empty() {
            self.dirty = true;
        }
    }

    /// Marks an epoch's outputs delivered.
    pub fn mark_published(&mut self, epoch: u64) {
        self.state.published.insert(epoch);
        self.dirty = true;
    }

    /// Counts a dead letter sent.
    pub fn count_dead_letter(&mut self) {
        self.state.dead_letters += 1;
    }

    /// Saves the state file (the caller flushes the dead letters first: an offset is saved
    /// only once what its message produced is delivered).
    pub fn save(&mut self) -> Result<()> {
        self.state.save(self.archive.root())?;
        self.dirty = false;
        Ok(())
    }
}
