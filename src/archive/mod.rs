//! The archive: every stream a Delta Lake table of Parquet files, written in epochs
//! (checkpoints), checked whenever it is read.
//!
//! Layout under the archive root:
//!
//! ```text
//! <root>/candor-archive.json                 the manifest: this directory is a Candor archive
//! <root>/.candor-writer.lock                 held by the one command writing (others wait)
//! <root>/<stream>/_delta_log/<version>.json  each stream's Delta log (item, trial, response, …)
//! <root>/<stream>/part-e<epoch>-….parquet                               item, trial
//! <root>/<stream>/model=<m>/checkpoint=<c>/part-e<epoch>-….parquet      per-checkpoint streams
//! <root>/checkpoint/…                        the checkpoint registry (a Delta table too)
//! <root>/generation/log-*.arrows             the generation store (its own append logs)
//! ```
//!
//! **What it guarantees.**
//! - *Nothing half-written is ever read.* An epoch (the grid, or one checkpoint's rows of every
//!   stream) is one *write*: its data files are written and synced first, then each stream's
//!   table commits them in one Delta commit that names the write and lists every stream's row
//!   count. The epoch is committed once every stream it lists has committed exactly those rows;
//!   readers see committed epochs only. A write a crash cut short is rolled back (its files
//!   removed from the logs and deleted) by the next writer, which says so.
//! - *One writer at a time; a second waits.* Writers hold an exclusive lock on the archive; the
//!   Delta commit protocol (the next log version is created only if absent, conflicting
//!   commits fail instead of both winning) also guards every commit and the registry's epoch
//!   numbers against writers that bypass the lock.
//! - *Writes stay inside the archive.* A command writes only into a directory that holds a
//!   manifest, or that it creates (a missing or empty directory); recovery looks only at the
//!   stream tables of that archive.
//! - *Nothing counted twice.* A checkpoint's epoch is written once; rows are unique by their
//!   stream's key (`schemas/<stream>.json`), checked before commit — against the grid for an
//!   epoch's item and trial rows, against every committed row for rows appended outside an
//!   epoch (warmth scores).
//! - *One writer.* Every table row is written by this type: the dataflow's archive sink
//!   ([`Archive::write_epoch`]) and rows added later to a committed checkpoint
//!   ([`Archive::append`], `candor warmth`) share one file writer and one uniqueness rule. The
//!   generation store under `generation/` is not a table: it is the generate operator's memo of
//!   model answers, appended answer by answer so that a killed run re-pays nothing, with its
//!   own checksummed log (see [`crate::generate::store`]); what the archive's tables hold is
//!   only ever written here.
//! - *Damage is named, never read as data.* Every data file's SHA-256, size and row count are in
//!   its `add` action; every log version carries Candor's checksum of its actions (see
//!   [`log`]). A mismatch is an [`Error::Integrity`] naming the file; [`Archive::verify`] lists
//!   every damaged file without stopping at the first.
//!
//! The tables are plain Delta Lake (reader version 1, writer version 2, no partition columns,
//! no checkpoints): polars (`read_delta`), the `deltalake` Python package and Spark read them,
//! and the `model=…/checkpoint=…` directories (values percent-encoded, see
//! [`crate::identity::partition_segment`]) keep Hive-style readers working.
//!
//! ```
//! use candor::archive::{Archive, Partition};
//! use candor::records::Trial;
//! use candor::schema::Record;
//! let dir = tempfile::tempdir().unwrap();
//! let archive = Archive::open_writer(dir.path().join("study"), "doc").unwrap();
//! archive.append_epoch("trial", &Partition::All, 0, &[Trial::to_batch(&[]).unwrap()]).unwrap();
//! archive.commit_epoch(0, &serde_json::json!({})).unwrap();
//! assert!(archive.committed_epochs().unwrap().contains(&0));
//! ```

mod delta;
pub mod log;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arrow::array::{Array, ArrayRef, StringArray};
use arrow::datatypes::{DataType, Field};
use arrow::record_batch::RecordBatch;
use deltalake_core::kernel::{Action, Add, Remove};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use self::delta::{Base, Operation};
use self::log::{LoggedFile, TAG_EPOCH, TAG_ROWS, TAG_SHA256, TAG_WRITE, TableLog};
use crate::error::{Error, Location, Result};
use crate::identity::{CheckpointRef, partition_segment};
pub use crate::records::CheckpointEntry;
use crate::schema::{self, Record};

/// The manifest's file name: its presence makes a directory a Candor archive.
pub const MANIFEST: &str = "candor-archive.json";
/// The writer lock's file name.
pub const LOCK: &str = ".candor-writer.lock";
/// The archive format this Candor writes and reads.
pub const FORMAT_VERSION: u32 = 2;
/// The stream holding the checkpoint registry.
pub const REGISTRY: &str = "checkpoint";
/// Streams that are not Delta tables (the generation store keeps its own logs).
const NOT_TABLES: &[&str] = &["generation"];

/// `commitInfo` keys Candor writes.
const INFO_EPOCH: &str = "candor.epoch";
const INFO_WRITE: &str = "candor.write";
const INFO_STREAMS: &str = "candor.streams";
const INFO_KIND: &str = "candor.kind";
const INFO_RETRACT: &str = "candor.retract";
const INFO_SUMMARY: &str = "candor.summary";

/// The archive manifest (`candor-archive.json`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// Always `candor-archive`.
    pub format: String,
    pub version: u32,
    /// The Candor version that created the archive.
    pub created_by: String,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    /// The grid-defining part of the experiment the archive's trial grid was built from
    /// (see [`crate::grid::build_grid`]), once it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grid: Option<Value>,
}

/// Which part of a stream a file belongs to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Partition {
    /// Streams that do not depend on a checkpoint.
    All,
    /// One checkpoint's part of a stream.
    Checkpoint(CheckpointRef),
}

impl Partition {
    pub fn checkpoint(model: impl Into<String>, checkpoint: impl Into<String>) -> Self {
        Partition::Checkpoint(CheckpointRef::new(model, checkpoint))
    }

    /// The directory under the table, `model=<m>/checkpoint=<c>` (Hive, reversible).
    fn rel_dir(&self) -> String {
        match self {
            Partition::All => String::new(),
            Partition::Checkpoint(c) => {
                format!("{}/{}/", partition_segment("model", &c.model), partition_segment("checkpoint", &c.checkpoint))
            }
        }
    }
}

/// One committed data file of a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub path: PathBuf,
    pub stream: String,
    pub epoch: Option<u64>,
    pub rows: u64,
    pub size: u64,
    pub sha256: String,
}

/// A write that was begun and not completed (a crash, or damage to a log).
#[derive(Clone, Debug, PartialEq)]
pub struct PartialWrite {
    pub epoch: u64,
    pub write: String,
    /// What is missing, in words.
    pub missing: Vec<String>,
    /// Rows each stream still lacks (empty when the write cannot be completed).
    pub lacking: BTreeMap<String, u64>,
    /// The write's stream list and summary, as its commits give them.
    pub streams: serde_json::Map<String, Value>,
    pub summary: Value,
    /// A rollback of the write began and did not finish.
    pub rolling_back: bool,
}

/// The archive as one consistent, checked view: every table's log, the committed epochs and
/// the checkpoint registry.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub tables: BTreeMap<String, TableLog>,
    /// Committed epoch → the write that committed it.
    pub committed: BTreeMap<u64, String>,
    pub partial: Vec<PartialWrite>,
    /// The largest epoch any commit or file names (registered or not).
    pub max_epoch: u64,
    pub checkpoints: Vec<CheckpointEntry>,
    root: PathBuf,
}

impl Snapshot {
    /// The committed files of `stream`: unepoched ones first, then by epoch, each in path
    /// order.
    pub fn segments(&self, stream: &str) -> Vec<Segment> {
        let Some(log) = self.tables.get(stream) else { return Vec::new() };
        let mut out: Vec<Segment> = log
            .live
            .values()
            .filter(|f| self.visible(f))
            .map(|f| Segment {
                path: self.root.join(stream).join(&f.rel),
                stream: stream.to_string(),
                epoch: f.epoch,
                rows: f.rows,
                size: f.size,
                sha256: f.sha256.clone(),
            })
            .collect();
        out.sort_by(|a, b| (a.epoch, &a.path).cmp(&(b.epoch, &b.path)));
        out
    }

    fn visible(&self, f: &LoggedFile) -> bool {
        match (f.epoch, &f.write) {
            (None, _) => true,
            (Some(e), Some(w)) => self.committed.get(&e) == Some(w),
            (Some(_), None) => false,
        }
    }

    pub fn committed_epochs(&self) -> BTreeSet<u64> {
        self.committed.keys().copied().collect()
    }
}

/// An archive root.
#[derive(Clone, Debug)]
pub struct Archive {
    root: PathBuf,
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Held while this handle may write.
    writer: Option<File>,
    /// Files written for epochs not committed yet, with the id of the write they belong to.
    staged: Mutex<BTreeMap<u64, (String, Vec<Staged>)>>,
    /// Each table's log as last read and checked, so the next read reads only newer versions.
    logs: Mutex<BTreeMap<String, TableLog>>,
    /// Each table's Delta state after this handle's last commit to it, so the next commit
    /// reads only newer versions (see [`delta::commit`]).
    delta: delta::States,
    /// The checkpoints each registry file holds, by its path and SHA-256 (a committed file
    /// never changes): a snapshot reads only the files registered since the last one.
    registry: Mutex<HashMap<(PathBuf, String), Vec<CheckpointEntry>>>,
}

#[derive(Debug)]
struct Staged {
    stream: String,
    partition: Partition,
    rel: String,
    path: PathBuf,
    rows: u64,
    size: u64,
    sha256: String,
    /// The rows' keys, one set per batch written.
    keys: Vec<KeyRows>,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn now_millis() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn random_id() -> String {
    use rand::RngCore;
    let mut b = [0u8; 8];
    rand::thread_rng().fill_bytes(&mut b);
    log::hex(&b)
}

/// Streams that are Delta tables in an archive, the registry last.
fn table_streams() -> Result<Vec<String>> {
    let mut out: Vec<String> =
        schema::streams()?.into_iter().filter(|s| !NOT_TABLES.contains(&s.as_str()) && s != REGISTRY).collect();
    // A fixed commit order: the grid streams first, the statistics' stream last.
    out.sort_by_key(|s| {
        (["item", "trial", "response", "verdict", "observation"].iter().position(|x| x == s), s.clone())
    });
    out.push(REGISTRY.to_string());
    Ok(out)
}

impl Archive {
    /// Opens an existing archive to read it. A missing directory, or one without a manifest,
    /// is an input error naming it (nothing is created).
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        if !root.is_dir() {
            return Err(Error::input(
                Location::file(&root),
                "no archive here (create one with `candor trials`, `candor run` or `candor import`)",
            ));
        }
        read_manifest(&root)?;
        Ok(Archive { root, inner: Arc::new(Inner::default()) })
    }

    /// Opens an archive to write it, creating it where `root` does not exist or is an empty
    /// directory. A non-empty directory that is not an archive is refused (it may hold other
    /// people's data). Waits for any other writer, then rolls back what a crashed writer left
    /// (saying so on stderr).
    pub fn open_writer(root: impl AsRef<Path>, command: &str) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let root =
            if root.is_absolute() { root } else { std::env::current_dir().map_err(|e| Error::io(".", e))?.join(root) };
        if !root.join(MANIFEST).exists() {
            create(&root)?;
        }
        read_manifest(&root)?;
        let lock = lock(&root, command)?;
        let archive = Archive { root, inner: Arc::new(Inner { writer: Some(lock), ..Inner::default() }) };
        let recovered = archive.recover()?;
        if !recovered.is_empty() {
            for line in &recovered {
                eprintln!("{}: {line}", archive.root.display());
            }
        }
        Ok(archive)
    }

    /// A handle to an archive another process of a cluster writes: this process never reads
    /// or writes it (the dataflow's sink runs in the leader).
    pub fn elsewhere(root: impl AsRef<Path>) -> Self {
        Archive { root: root.as_ref().to_path_buf(), inner: Arc::new(Inner::default()) }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether this handle holds the writer lock.
    pub fn is_writer(&self) -> bool {
        self.inner.writer.is_some()
    }

    fn require_writer(&self) -> Result<()> {
        if self.is_writer() {
            Ok(())
        } else {
            Err(Error::Internal(format!("{} was opened to read, not to write", self.root.display())))
        }
    }

    pub fn manifest(&self) -> Result<Manifest> {
        read_manifest(&self.root)
    }

    /// Records the grid definition in the manifest (atomically replaced).
    pub fn set_grid(&self, grid: Value) -> Result<()> {
        self.require_writer()?;
        let mut m = self.manifest()?;
        m.grid = Some(grid);
        write_manifest(&self.root, &m)
    }

    fn table_dir(&self, stream: &str) -> PathBuf {
        self.root.join(stream)
    }

    /// Reads every table's log and works out what is committed.
    pub fn snapshot(&self) -> Result<Snapshot> {
        let mut snap = Snapshot { root: self.root.clone(), ..Default::default() };
        let mut logs = self.inner.logs.lock().unwrap_or_else(|p| p.into_inner());
        for stream in table_streams()? {
            let log = log::read_since(&self.table_dir(&stream), logs.remove(&stream))?;
            logs.insert(stream.clone(), log.clone());
            snap.tables.insert(stream, log);
        }
        drop(logs);
        epochs(&mut snap)?;
        snap.checkpoints = registry(&snap, &self.inner.registry)?;
        if !snap.partial.is_empty() && !self.is_writer() && !writer_active(&self.root) {
            warn_partial(&self.root, &snap.partial);
        }
        Ok(snap)
    }

    /// Every committed file of `stream`.
    pub fn segments(&self, stream: &str) -> Result<Vec<Segment>> {
        Ok(self.snapshot()?.segments(stream))
    }

    /// Whether the archive holds any committed file of `stream`.
    pub fn has(&self, stream: &str) -> Result<bool> {
        Ok(!self.segments(stream)?.is_empty())
    }

    /// Reads every committed batch of `stream`, each file checked.
    pub fn read(&self, stream: &str) -> Result<Vec<RecordBatch>> {
        let mut out = Vec::new();
        for seg in self.segments(stream)? {
            out.extend(read_segment(&seg)?);
        }
        Ok(out)
    }

    /// The batches of `stream` one committed epoch wrote.
    pub fn read_epoch(&self, stream: &str, epoch: u64) -> Result<Vec<RecordBatch>> {
        let mut out = Vec::new();
        for seg in self.segments(stream)?.into_iter().filter(|s| s.epoch == Some(epoch)) {
            out.extend(read_segment(&seg)?);
        }
        Ok(out)
    }

    /// Epochs whose writes are complete.
    pub fn committed_epochs(&self) -> Result<BTreeSet<u64>> {
        Ok(self.snapshot()?.committed_epochs())
    }

    /// The checkpoints registered so far, in epoch order.
    pub fn checkpoints(&self) -> Result<Vec<CheckpointEntry>> {
        Ok(self.snapshot()?.checkpoints)
    }

    /// Epoch → archive partition, for per-checkpoint streams.
    pub fn checkpoint_partitions(&self) -> Result<BTreeMap<u64, Partition>> {
        Ok(self.checkpoints()?.into_iter().map(|e| (e.epoch, Partition::Checkpoint(e.id()))).collect())
    }

    /// Gives a checkpoint its epoch: the one it has, else the next after every registered
    /// epoch (epoch 0 is the grid). Registration is its own commit to the registry table; two
    /// writers can never give two checkpoints one epoch (the loser re-reads and takes the
    /// next).
    pub fn register_checkpoint(
        &self,
        model: &str,
        checkpoint: &str,
        is_finetuned: bool,
        variant: Option<&str>,
    ) -> Result<u64> {
        self.require_writer()?;
        let id = CheckpointRef::new(model, checkpoint);
        id.validate().map_err(|m| Error::config(format!("checkpoint {id}"), m))?;
        for _attempt in 0..20 {
            let snap = self.snapshot()?;
            let all = &snap.checkpoints;
            if let Some(e) = all.iter().find(|e| e.model == model && e.checkpoint == checkpoint) {
                if e.is_finetuned != is_finetuned {
                    return Err(Error::config(
                        format!("checkpoint {id}"),
                        format!("already registered in {} with is_finetuned = {}", self.root.display(), e.is_finetuned),
                    ));
                }
                return Ok(e.epoch);
            }
            // Past every epoch any commit or file names, registered or not.
            let epoch = all.iter().map(|e| e.epoch).max().unwrap_or(0).max(snap.max_epoch) + 1;
            let row = CheckpointEntry {
                epoch,
                model: model.to_string(),
                checkpoint: checkpoint.to_string(),
                is_finetuned,
                variant: variant.map(str::to_string),
            };
            let batch = CheckpointEntry::to_batch(&[row])?;
            let file = self.write_file(REGISTRY, &format!("part-r{epoch:06}-{}.parquet", random_id()), &[batch])?;
            let mut meta = serde_json::Map::new();
            meta.insert(INFO_KIND.into(), "register".into());
            let txn = Some(("candor.registry", epoch as i64));
            // Decided on the registry as read: a registration committed since is a conflict.
            let base = Base::Read(snap.tables.get(REGISTRY).and_then(|t| t.version));
            match self.commit_table_at(REGISTRY, vec![add_action(&file, None)], Operation::Append, meta, txn, base) {
                Ok(_) => return Ok(epoch),
                Err(Error::Conflict(_)) => {
                    let _ = fs::remove_file(&file.path);
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::Conflict(format!("{}: could not register {id}: the registry kept changing", self.root.display())))
    }

    /// Appends `batches` of `stream` as one file committed at once, outside any epoch (rows
    /// that do not belong to a checkpoint's evaluation, such as warmth scores).
    pub fn append(&self, stream: &str, partition: &Partition, batches: &[RecordBatch]) -> Result<Option<PathBuf>> {
        self.require_writer()?;
        let Some(file) = self.write_stream_file(stream, partition, None, batches)? else { return Ok(None) };
        // Outside an epoch nothing else makes a key unique: every committed row is checked.
        let keys: Vec<&KeyRows> = file.keys.iter().collect();
        if let Err(e) = self.check_keys(stream, &keys, &self.snapshot()?, true) {
            let _ = fs::remove_file(&file.path);
            return Err(e);
        }
        let mut meta = serde_json::Map::new();
        meta.insert(INFO_KIND.into(), "append".into());
        self.commit_table(stream, vec![add_action(&file, None)], Operation::Append, meta, None)?;
        Ok(Some(file.path))
    }

    /// Writes `batches` of `stream` for `epoch` as one file; it becomes visible when the epoch
    /// is committed with [`Archive::commit_epoch`] (and is deleted by the next writer if it
    /// never is).
    pub fn append_epoch(
        &self,
        stream: &str,
        partition: &Partition,
        epoch: u64,
        batches: &[RecordBatch],
    ) -> Result<Option<PathBuf>> {
        self.require_writer()?;
        let write = {
            let mut staged = self.inner.staged.lock().unwrap_or_else(|p| p.into_inner());
            staged.entry(epoch).or_insert_with(|| (random_id(), Vec::new())).0.clone()
        };
        let Some(file) = self.write_stream_file(stream, partition, Some((epoch, &write)), batches)? else {
            return Ok(None);
        };
        let path = file.path.clone();
        self.inner.staged.lock().unwrap_or_else(|p| p.into_inner()).entry(epoch).or_default().1.push(file);
        Ok(Some(path))
    }

    /// Writes one epoch's rows of every stream and commits them: [`Archive::append_epoch`] for
    /// each, then [`Archive::commit_epoch`]. When a stream's file cannot be written, the files
    /// already written for the epoch, never committed, are removed (as a failed commit's are).
    pub fn write_epoch(&self, epoch: u64, parts: &[(String, Partition, RecordBatch)], summary: &Value) -> Result<()> {
        let t0 = std::time::Instant::now();
        for (stream, partition, batch) in parts {
            if let Err(e) = self.append_epoch(stream, partition, epoch, std::slice::from_ref(batch)) {
                let staged = self.inner.staged.lock().unwrap_or_else(|p| p.into_inner()).remove(&epoch);
                discard(&staged.map(|(_, files)| files).unwrap_or_default());
                return Err(e);
            }
        }
        let t1 = std::time::Instant::now();
        let committed = self.commit_epoch(epoch, summary);
        if crate::trace::stream() {
            eprintln!("  archive, epoch {epoch}: files {:?}, commit {:?}", t1 - t0, t1.elapsed());
        }
        committed
    }

    /// Commits every file staged for `epoch`: one Delta commit per stream, each naming the
    /// write and every stream's row count. Refuses an epoch already committed, rows of another
    /// checkpoint than the epoch's, and keys already present.
    pub fn commit_epoch(&self, epoch: u64, summary: &Value) -> Result<()> {
        self.require_writer()?;
        let (write, staged) = self
            .inner
            .staged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&epoch)
            .unwrap_or_else(|| (random_id(), Vec::new()));
        let result = self.commit_staged(epoch, &write, &staged, summary);
        if result.is_err() {
            discard(&staged);
        }
        result
    }

    fn commit_staged(&self, epoch: u64, write: &str, staged: &[Staged], summary: &Value) -> Result<()> {
        let t0 = std::time::Instant::now();
        let snap = self.snapshot()?;
        if crate::trace::stream() {
            eprintln!("  archive, epoch {epoch}: snapshot {:?}", t0.elapsed());
        }
        if snap.committed.contains_key(&epoch) {
            return Err(Error::Conflict(format!(
                "{}: epoch {epoch} is already committed; its rows are not written twice",
                self.root.display()
            )));
        }
        let registered = snap.checkpoints.iter().find(|c| c.epoch == epoch).map(CheckpointEntry::id);
        let mut by_stream: BTreeMap<&str, Vec<&Staged>> = BTreeMap::new();
        for f in staged {
            if let Partition::Checkpoint(c) = &f.partition
                && registered.as_ref() != Some(c)
            {
                return Err(Error::Internal(format!(
                    "epoch {epoch} is {}, but rows of {c} were written for it",
                    registered.map_or("no registered checkpoint".to_string(), |r| r.to_string())
                )));
            }
            by_stream.entry(f.stream.as_str()).or_default().push(f);
        }
        let mut manifest = serde_json::Map::new();
        for (stream, files) in &by_stream {
            let keys: Vec<&KeyRows> = files.iter().flat_map(|f| &f.keys).collect();
            self.check_keys(stream, &keys, &snap, false)?;
            manifest.insert(stream.to_string(), files.iter().map(|f| f.rows).sum::<u64>().into());
        }
        let meta = |kind: &str| epoch_meta(kind, epoch, write, &manifest, summary);
        if by_stream.is_empty() {
            // An epoch without rows still commits, as a marker in the registry's log.
            self.commit_table(REGISTRY, Vec::new(), Operation::Append, meta("epoch"), None)?;
            return Ok(());
        }
        let order = table_streams()?;
        let mut streams: Vec<&&str> = by_stream.keys().collect();
        streams.sort_by_key(|s| order.iter().position(|o| o == **s));
        for stream in streams {
            let actions = by_stream[*stream].iter().map(|f| add_action(f, Some((epoch, write)))).collect();
            self.commit_table(stream, actions, Operation::Append, meta("epoch"), None)?;
        }
        Ok(())
    }

    /// The one uniqueness rule of every write: the rows' keys are distinct, and none is
    /// committed already. An epoch's rows of a per-checkpoint stream are unique by their epoch
    /// (one per checkpoint, written once), so only the grid's streams (item, trial) are read
    /// for committed keys then; rows appended outside any epoch (`appended`) are checked
    /// against every committed row of their stream.
    fn check_keys(&self, stream: &str, keys: &[&KeyRows], snap: &Snapshot, appended: bool) -> Result<()> {
        let mut seen = HashSet::with_capacity(keys.iter().map(|k| k.rows.num_rows()).sum());
        for k in keys {
            for (i, row) in k.rows.iter().enumerate() {
                if !seen.insert(row.data()) {
                    let key = k.key(stream, i)?;
                    return Err(Error::schema(
                        stream,
                        format!("two rows share the key {key:?}; a key is archived once"),
                    ));
                }
            }
        }
        if !appended && !matches!(stream, "item" | "trial") {
            return Ok(());
        }
        let mut existing = Vec::new();
        for seg in snap.segments(stream) {
            for b in read_segment(&seg)? {
                existing.push(KeyRows::of(stream, &b)?);
            }
        }
        let existing: HashSet<&[u8]> = existing.iter().flat_map(|k| k.rows.iter().map(|r| r.data())).collect();
        for k in keys {
            if let Some(i) = k.rows.iter().position(|r| existing.contains(r.data())) {
                return Err(duplicate_key(stream, &k.key(stream, i)?));
            }
        }
        Ok(())
    }

    /// Withdraws committed epochs (before they are written again on purpose: `--replace`,
    /// `--regrid`): their files leave every table in commits that name the write, then are
    /// deleted.
    pub fn retract_epochs(&self, epochs: &BTreeSet<u64>) -> Result<()> {
        self.require_writer()?;
        let snap = self.snapshot()?;
        let writes: Vec<(u64, String)> =
            snap.committed.iter().filter(|(e, _)| epochs.contains(e)).map(|(e, w)| (*e, w.clone())).collect();
        for (epoch, write) in writes {
            self.retract_write(&snap, epoch, &write, "retract")?;
        }
        Ok(())
    }

    fn retract_write(&self, snap: &Snapshot, epoch: u64, write: &str, kind: &str) -> Result<usize> {
        let mut deleted = Vec::new();
        let mut marked = false;
        for (stream, log) in &snap.tables {
            let files: Vec<&LoggedFile> =
                log.live.values().filter(|f| f.epoch == Some(epoch) && f.write.as_deref() == Some(write)).collect();
            if files.is_empty() {
                continue;
            }
            let actions = files.iter().map(|f| remove_action(f)).collect();
            let mut meta = serde_json::Map::new();
            meta.insert(INFO_KIND.into(), kind.into());
            meta.insert(INFO_EPOCH.into(), epoch.into());
            meta.insert(INFO_RETRACT.into(), write.into());
            self.commit_table(stream, actions, Operation::Remove, meta, None)?;
            marked = true;
            deleted.extend(files.iter().map(|f| self.table_dir(stream).join(&f.rel)));
        }
        if !marked {
            let mut meta = serde_json::Map::new();
            meta.insert(INFO_KIND.into(), kind.into());
            meta.insert(INFO_EPOCH.into(), epoch.into());
            meta.insert(INFO_RETRACT.into(), write.into());
            self.commit_table(REGISTRY, Vec::new(), Operation::Append, meta, None)?;
        }
        for path in &deleted {
            remove_if_exists(path)?;
        }
        Ok(deleted.len())
    }

    /// Repairs what a crashed writer left, looking only inside this archive's stream tables:
    /// a write whose commits did not all happen is completed from its files (they are written
    /// before any commit, and carry the epoch and write in their names), or rolled back when
    /// they are gone; a registration whose commit was lost is committed; files no log lists
    /// and temporary files are deleted. Returns one line per thing it did.
    pub fn recover(&self) -> Result<Vec<String>> {
        self.require_writer()?;
        let mut done = Vec::new();
        let snap = self.snapshot()?;
        for p in &snap.partial {
            if !p.rolling_back && !p.lacking.is_empty() && self.roll_forward(&snap, p)? {
                done.push(format!("completed an interrupted write of epoch {} ({})", p.epoch, p.missing.join("; ")));
                continue;
            }
            let n = self.retract_write(&snap, p.epoch, &p.write, "rollback")?;
            done.push(format!(
                "rolled back an interrupted write of epoch {} ({} file(s); {}); evaluate it again",
                p.epoch,
                n,
                p.missing.join("; ")
            ));
        }
        let snap = if snap.partial.is_empty() { snap } else { self.snapshot()? };
        done.extend(self.recover_registrations(&snap)?);
        let snap = self.snapshot()?;
        for (stream, log) in &snap.tables {
            for path in unreferenced(&self.table_dir(stream), log)? {
                remove_if_exists(&path)?;
                done.push(format!("removed {} (written by a writer that did not commit it)", path.display()));
            }
        }
        Ok(done)
    }

    /// Commits the files an interrupted write left for the streams it lacks, when they hold
    /// exactly the rows its commits list. Returns whether the write is complete now.
    fn roll_forward(&self, snap: &Snapshot, p: &PartialWrite) -> Result<bool> {
        let mut plan = Vec::new();
        for (stream, rows) in &p.lacking {
            let Some(log) = snap.tables.get(stream) else { return Ok(false) };
            let prefix = format!("part-e{:06}-{}-", p.epoch, p.write);
            let mut found = Vec::new();
            let mut total = 0;
            for path in unreferenced(&self.table_dir(stream), log)? {
                if !path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix)) {
                    continue;
                }
                let Some(file) = self.adopt(stream, &path)? else { return Ok(false) };
                total += file.rows;
                found.push(file);
            }
            if total != *rows || found.is_empty() {
                return Ok(false);
            }
            plan.push((stream.clone(), found));
        }
        for (stream, files) in plan {
            let actions = files.iter().map(|f| add_action(f, Some((p.epoch, &p.write)))).collect();
            let meta = epoch_meta("recover", p.epoch, &p.write, &p.streams, &p.summary);
            self.commit_table(&stream, actions, Operation::Append, meta, None)?;
        }
        Ok(true)
    }

    /// A data file found on disk, described as a commit would (None when it does not decode
    /// as the stream's rows).
    fn adopt(&self, stream: &str, path: &Path) -> Result<Option<Staged>> {
        let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
        let Ok(reader) = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes.clone())) else {
            return Ok(None);
        };
        let Ok(batches) =
            reader.build().and_then(|r| r.collect::<std::result::Result<Vec<_>, _>>().map_err(Into::into))
        else {
            return Ok(None);
        };
        if batches.iter().any(|b| from_storage(stream, b).is_err()) {
            return Ok(None);
        }
        let table = self.table_dir(stream);
        let rel = path.strip_prefix(&table).map_err(|_| Error::Internal("a file outside its table".into()))?;
        Ok(Some(Staged {
            stream: stream.to_string(),
            partition: Partition::All,
            rel: rel.to_string_lossy().into_owned(),
            path: path.to_path_buf(),
            rows: batches.iter().map(|b| b.num_rows() as u64).sum(),
            size: bytes.len() as u64,
            sha256: log::hex(&Sha256::digest(&bytes)),
            keys: Vec::new(),
        }))
    }

    /// Registry files whose commit was lost: committed when neither their epoch nor their
    /// checkpoint is registered since, else left for deletion.
    fn recover_registrations(&self, snap: &Snapshot) -> Result<Vec<String>> {
        let mut done = Vec::new();
        let Some(log) = snap.tables.get(REGISTRY) else { return Ok(done) };
        let mut known = snap.checkpoints.clone();
        for path in unreferenced(&self.table_dir(REGISTRY), log)? {
            let Some(file) = self.adopt(REGISTRY, &path)? else { continue };
            let rows: Vec<CheckpointEntry> = read_segment(&Segment {
                path: path.clone(),
                stream: REGISTRY.into(),
                epoch: None,
                rows: file.rows,
                size: file.size,
                sha256: file.sha256.clone(),
            })?
            .iter()
            .map(CheckpointEntry::from_batch)
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .collect();
            let [row] = rows.as_slice() else { continue };
            if known.iter().any(|k| k.epoch == row.epoch || k.id() == row.id()) {
                continue;
            }
            let mut meta = serde_json::Map::new();
            meta.insert(INFO_KIND.into(), "register".into());
            let txn = Some(("candor.registry", row.epoch as i64));
            self.commit_table(REGISTRY, vec![add_action(&file, None)], Operation::Append, meta, txn)?;
            done.push(format!(
                "registered {} as epoch {} again (its registration was interrupted)",
                row.id(),
                row.epoch
            ));
            known.push(row.clone());
        }
        Ok(done)
    }

    /// Checks everything: every log, every committed file's size, checksum, rows and schema,
    /// the registry, the epochs, files no log lists, and the generation store. Returns every
    /// problem found (empty: the archive is sound).
    pub fn verify(&self) -> Vec<(PathBuf, String)> {
        let mut problems = Vec::new();
        let mut snap = Snapshot { root: self.root.clone(), ..Default::default() };
        let streams = match table_streams() {
            Ok(s) => s,
            Err(e) => return vec![(self.root.clone(), e.to_string())],
        };
        for stream in streams {
            match log::read(&self.table_dir(&stream)) {
                Ok(l) => {
                    snap.tables.insert(stream, l);
                }
                Err(e) => problems.push(problem(&self.table_dir(&stream), e)),
            }
        }
        if let Err(e) = epochs(&mut snap) {
            problems.push(problem(&self.root, e));
        }
        for p in &snap.partial {
            problems.push((
                self.root.clone(),
                format!("epoch {} was not completely written ({})", p.epoch, p.missing.join("; ")),
            ));
        }
        for (stream, log) in &snap.tables {
            for f in log.live.values() {
                let seg = Segment {
                    path: self.table_dir(stream).join(&f.rel),
                    stream: stream.clone(),
                    epoch: f.epoch,
                    rows: f.rows,
                    size: f.size,
                    sha256: f.sha256.clone(),
                };
                if let Err(e) = read_segment(&seg) {
                    problems.push(problem(&seg.path, e));
                }
            }
            match unreferenced(&self.table_dir(stream), log) {
                Ok(paths) => problems.extend(paths.into_iter().map(|p| (p, "no log lists this file".to_string()))),
                Err(e) => problems.push(problem(&self.table_dir(stream), e)),
            }
        }
        // Every registry file read afresh, whatever this handle remembers.
        if let Err(e) = registry(&snap, &Mutex::default()) {
            problems.push(problem(&self.table_dir(REGISTRY), e));
        }
        problems.extend(crate::generate::store::verify(&self.root));
        problems
    }

    /// Writes one data file of `stream` (not yet committed).
    fn write_stream_file(
        &self,
        stream: &str,
        partition: &Partition,
        epoch: Option<(u64, &str)>,
        batches: &[RecordBatch],
    ) -> Result<Option<Staged>> {
        if batches.is_empty() {
            return Ok(None);
        }
        let expected = schema::arrow_schema(stream)?;
        for b in batches {
            if b.schema().fields() != expected.fields() {
                return Err(Error::Internal(format!("a batch for stream `{stream}` does not carry its schema")));
            }
        }
        let mut keys = Vec::new();
        for b in batches {
            keys.push(KeyRows::of(stream, b)?);
            if let Partition::Checkpoint(c) = partition {
                check_rows_belong(stream, b, c)?;
            }
        }
        // The epoch and write are in the name too, so a file whose commit was lost can be
        // committed again by recovery.
        let name = match epoch {
            Some((e, w)) => format!("part-e{e:06}-{w}-{}.parquet", random_id()),
            None => format!("part-a-{}.parquet", random_id()),
        };
        let mut file = self.write_file(stream, &format!("{}{name}", partition.rel_dir()), batches)?;
        file.partition = partition.clone();
        file.keys = keys;
        Ok(Some(file))
    }

    /// Writes Parquet to `<root>/<stream>/<rel>`: to a temporary name, synced, then linked
    /// under its name (which must not exist), so a file is whole or absent.
    fn write_file(&self, stream: &str, rel: &str, batches: &[RecordBatch]) -> Result<Staged> {
        let schema = schema::arrow_schema(stream)?;
        let bytes = encode_parquet(stream, &schema, batches)?;
        let path = self.table_dir(stream).join(rel);
        let dir = path.parent().expect("a file under the table").to_path_buf();
        fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let tmp = dir.join(format!(".{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("part")));
        if !write_new(&path, &tmp, &bytes)? {
            return Err(Error::io(&path, std::io::Error::from(std::io::ErrorKind::AlreadyExists)));
        }
        sync_dir(&dir)?;
        Ok(Staged {
            stream: stream.to_string(),
            partition: Partition::All,
            rel: rel.to_string(),
            path,
            rows: batches.iter().map(|b| b.num_rows() as u64).sum(),
            size: bytes.len() as u64,
            sha256: log::hex(&Sha256::digest(&bytes)),
            keys: Vec::new(),
        })
    }

    fn commit_table(
        &self,
        stream: &str,
        actions: Vec<Action>,
        operation: Operation,
        meta: serde_json::Map<String, Value>,
        txn: Option<(&str, i64)>,
    ) -> Result<u64> {
        self.commit_table_at(stream, actions, operation, meta, txn, Base::Latest)
    }

    fn commit_table_at(
        &self,
        stream: &str,
        actions: Vec<Action>,
        operation: Operation,
        meta: serde_json::Map<String, Value>,
        txn: Option<(&str, i64)>,
        base: Base,
    ) -> Result<u64> {
        let schema = storage_schema(schema::arrow_schema(stream)?.as_ref());
        delta::commit(&self.inner.delta, &self.table_dir(stream), &schema, actions, operation, meta, txn, base)
    }
}

fn epoch_meta(
    kind: &str,
    epoch: u64,
    write: &str,
    manifest: &serde_json::Map<String, Value>,
    summary: &Value,
) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert(INFO_KIND.into(), kind.into());
    m.insert(INFO_EPOCH.into(), epoch.into());
    m.insert(INFO_WRITE.into(), write.into());
    m.insert(INFO_STREAMS.into(), Value::Object(manifest.clone()));
    m.insert(INFO_SUMMARY.into(), summary.clone());
    m
}

fn problem(path: &Path, e: Error) -> (PathBuf, String) {
    match e {
        Error::Integrity { path, message } => (path, message),
        e => (path.to_path_buf(), e.to_string()),
    }
}

fn duplicate_key(stream: &str, key: &str) -> Error {
    Error::Conflict(format!(
        "stream `{stream}` already holds a row with key {key:?}; nothing was written (rows are never archived twice)"
    ))
}

/// Reads a whole stream of an archive as records.
pub fn read_records<R: Record>(archive: &Archive) -> Result<Vec<R>> {
    let mut out = Vec::new();
    for b in archive.read(R::STREAM)? {
        out.extend(R::from_batch(&b)?);
    }
    Ok(out)
}

/// The key of every row of a batch of `stream` (its schema's key columns, as one reversible
/// string each).
pub fn row_keys(stream: &str, batch: &RecordBatch) -> Result<Vec<String>> {
    let columns = key_columns(stream, batch)?;
    Ok((0..batch.num_rows()).map(|i| key_at(&columns, i)).collect())
}

/// A batch's key columns, as strings.
fn key_columns(stream: &str, batch: &RecordBatch) -> Result<Vec<ArrayRef>> {
    let key = &schema::stream_schema(stream)?.key;
    let mut columns: Vec<ArrayRef> = Vec::new();
    for k in key {
        let c = batch.column_by_name(k).ok_or_else(|| Error::schema(stream, format!("key column `{k}` is missing")))?;
        columns
            .push(arrow::compute::cast(c, &DataType::Utf8).map_err(|e| Error::arrow(format!("key column `{k}`"), e))?);
    }
    Ok(columns)
}

/// The key of row `i` of key columns (as [`key_columns`] gives them).
fn key_at(columns: &[ArrayRef], i: usize) -> String {
    let strings = columns.iter().map(|c| c.as_any().downcast_ref::<StringArray>().expect("cast to utf8"));
    crate::identity::key_of(strings.map(|s| if s.is_null(i) { "\u{0}" } else { s.value(i) }))
}

/// The keys of a batch's rows in Arrow's row format: its key columns as strings, encoded so
/// that two rows' bytes are equal exactly when their keys are. Checked for uniqueness as
/// bytes; a key is spelled out ([`row_keys`]) only to name a duplicate.
struct KeyRows {
    converter: arrow::row::RowConverter,
    rows: arrow::row::Rows,
}

impl std::fmt::Debug for KeyRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyRows({} rows)", self.rows.num_rows())
    }
}

impl KeyRows {
    fn of(stream: &str, batch: &RecordBatch) -> Result<KeyRows> {
        let columns = key_columns(stream, batch)?;
        let fields = columns.iter().map(|_| arrow::row::SortField::new(DataType::Utf8)).collect();
        let converter =
            arrow::row::RowConverter::new(fields).map_err(|e| Error::arrow(format!("keys of `{stream}`"), e))?;
        let rows = converter.convert_columns(&columns).map_err(|e| Error::arrow(format!("keys of `{stream}`"), e))?;
        Ok(KeyRows { converter, rows })
    }

    /// The key of row `i`, spelled out.
    fn key(&self, stream: &str, i: usize) -> Result<String> {
        let columns = self
            .converter
            .convert_rows([self.rows.row(i)])
            .map_err(|e| Error::arrow(format!("keys of `{stream}`"), e))?;
        Ok(key_at(&columns, 0))
    }
}

/// Rows written into a checkpoint's partition must name that checkpoint.
fn check_rows_belong(stream: &str, batch: &RecordBatch, c: &CheckpointRef) -> Result<()> {
    for (column, want) in [("model", &c.model), ("checkpoint", &c.checkpoint)] {
        let Some(values) = batch.column_by_name(column).and_then(|a| a.as_any().downcast_ref::<StringArray>()) else {
            continue;
        };
        if let Some(other) = values.iter().flatten().find(|v| v != want) {
            return Err(Error::Internal(format!(
                "stream `{stream}`: a row of {column} {other:?} was written into the partition of {c}"
            )));
        }
    }
    Ok(())
}

fn add_action(f: &Staged, epoch: Option<(u64, &str)>) -> Action {
    let mut tags = std::collections::HashMap::new();
    tags.insert(TAG_SHA256.to_string(), Some(f.sha256.clone()));
    tags.insert(TAG_ROWS.to_string(), Some(f.rows.to_string()));
    if let Some((e, w)) = epoch {
        tags.insert(TAG_EPOCH.to_string(), Some(e.to_string()));
        tags.insert(TAG_WRITE.to_string(), Some(w.to_string()));
    }
    Action::Add(Add {
        // Raw: the Delta library escapes paths when it writes the log.
        path: f.rel.clone(),
        partition_values: Default::default(),
        size: f.size as i64,
        modification_time: now_millis(),
        data_change: true,
        stats: Some(serde_json::json!({"numRecords": f.rows}).to_string()),
        tags: Some(tags),
        deletion_vector: None,
        base_row_id: None,
        default_row_commit_version: None,
        clustering_provider: None,
    })
}

fn remove_action(f: &LoggedFile) -> Action {
    Action::Remove(Remove {
        path: f.rel.clone(),
        data_change: true,
        deletion_timestamp: Some(now_millis()),
        extended_file_metadata: Some(true),
        partition_values: Some(Default::default()),
        size: Some(f.size as i64),
        tags: None,
        deletion_vector: None,
        base_row_id: None,
        default_row_commit_version: None,
    })
}

/// The type a column is stored as: Delta Lake has no unsigned integers, so `uint64` and
/// `uint32` columns are stored as `long` and `integer` (their values fit), which every Delta
/// reader takes as they are; Candor turns them back when it reads.
fn storage_type(t: &DataType) -> DataType {
    match t {
        DataType::UInt64 => DataType::Int64,
        DataType::UInt32 => DataType::Int32,
        t => t.clone(),
    }
}

/// A stream's schema as its files and its Delta table store it.
fn storage_schema(schema: &arrow::datatypes::Schema) -> arrow::datatypes::Schema {
    let fields: Vec<Field> =
        schema.fields().iter().map(|f| f.as_ref().clone().with_data_type(storage_type(f.data_type()))).collect();
    arrow::datatypes::Schema::new(fields).with_metadata(schema.metadata().clone())
}

/// Casts every column of `batch` to the types of `schema` (checked: a value that does not fit
/// is an error, never a wrapped number).
fn cast_to(batch: &RecordBatch, schema: &arrow::datatypes::SchemaRef) -> std::result::Result<RecordBatch, String> {
    let options = arrow::compute::CastOptions { safe: false, ..Default::default() };
    let mut columns = Vec::with_capacity(schema.fields().len());
    for f in schema.fields() {
        let c = batch.column_by_name(f.name()).ok_or_else(|| format!("column `{}` is missing", f.name()))?;
        let c = if c.data_type() == f.data_type() {
            c.clone()
        } else {
            arrow::compute::cast_with_options(c, f.data_type(), &options)
                .map_err(|e| format!("column `{}`: {e}", f.name()))?
        };
        columns.push(c);
    }
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| e.to_string())
}

/// A batch read from a file of `stream`, in the stream's own schema.
fn from_storage(stream: &str, batch: &RecordBatch) -> std::result::Result<RecordBatch, String> {
    let schema = schema::arrow_schema(stream).map_err(|e| e.to_string())?;
    for f in schema.fields() {
        match batch.schema().field_with_name(f.name()) {
            Ok(got) if storage_type(f.data_type()) == *got.data_type() || got.data_type() == f.data_type() => {}
            Ok(got) => {
                return Err(format!("column `{}` is {:?}, expected {:?}", f.name(), got.data_type(), f.data_type()));
            }
            Err(_) => return Err(format!("column `{}` is missing", f.name())),
        }
    }
    cast_to(batch, &schema)
}

/// Removes the files of a write that failed, never committed (what is left is found by
/// recovery, which deletes files no log lists).
fn discard(files: &[Staged]) {
    for f in files {
        let _ = fs::remove_file(&f.path);
    }
}

/// Columns whose values are (nearly) all distinct, written without a dictionary.
const UNIQUE_TEXT: [&str; 4] = ["response_key", "trial_key", "prompt", "output"];

fn encode_parquet(stream: &str, schema: &arrow::datatypes::SchemaRef, batches: &[RecordBatch]) -> Result<Vec<u8>> {
    let ctx = || format!("encoding stream `{stream}` as Parquet");
    let storage = Arc::new(storage_schema(schema));
    let mut props = WriterProperties::builder().set_compression(Compression::SNAPPY);
    // Keys and free text are (nearly) all distinct: a dictionary would only hash every value
    // before falling back to plain pages.
    for column in UNIQUE_TEXT.iter().filter(|c| schema.field_with_name(c).is_ok()) {
        props = props.set_column_dictionary_enabled(parquet::schema::types::ColumnPath::from(*column), false);
    }
    let props = props.build();
    let mut w =
        ArrowWriter::try_new(Vec::new(), storage.clone(), Some(props)).map_err(|e| Error::arrow(ctx(), e.into()))?;
    for b in batches {
        let b = cast_to(b, &storage).map_err(|m| Error::Internal(format!("stream `{stream}`: {m}")))?;
        w.write(&b).map_err(|e| Error::arrow(ctx(), e.into()))?;
    }
    w.into_inner().map_err(|e| Error::arrow(ctx(), e.into()))
}

/// Reads one committed file, checking its size, checksum, row count and schema first: damaged
/// bytes are never decoded.
pub fn read_segment(seg: &Segment) -> Result<Vec<RecordBatch>> {
    let bytes = fs::read(&seg.path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::integrity(&seg.path, "the log lists this file, but it is missing"),
        _ => Error::io(&seg.path, e),
    })?;
    if bytes.len() as u64 != seg.size {
        return Err(Error::integrity(
            &seg.path,
            format!("{} bytes, but {} were committed (truncated or overwritten)", bytes.len(), seg.size),
        ));
    }
    if log::hex(&Sha256::digest(&bytes)) != seg.sha256 {
        return Err(Error::integrity(&seg.path, "its SHA-256 differs from the one committed (the file changed)"));
    }
    let bad = |m: String| Error::integrity(&seg.path, m);
    let batches: Vec<RecordBatch> = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes))
        .map_err(|e| bad(format!("not a Parquet file: {e}")))?
        .build()
        .map_err(|e| bad(format!("unreadable Parquet file: {e}")))?
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| bad(format!("corrupt Parquet file: {e}")))?;
    let rows: u64 = batches.iter().map(|b| b.num_rows() as u64).sum();
    if rows != seg.rows {
        return Err(bad(format!("{rows} rows, but {} were committed", seg.rows)));
    }
    batches.iter().map(|b| from_storage(&seg.stream, b).map_err(bad)).collect()
}

/// Works out committed and partial epoch writes from every table's commits (see the module
/// doc).
fn epochs(snap: &mut Snapshot) -> Result<()> {
    #[derive(Default)]
    struct W {
        streams: Option<serde_json::Map<String, Value>>,
        summary: Value,
        committed_in: BTreeSet<String>,
        retracted: bool,
        live_rows: BTreeMap<String, u64>,
        first: Option<PathBuf>,
    }
    let mut writes: BTreeMap<(u64, String), W> = BTreeMap::new();
    for (stream, log) in &snap.tables {
        for c in &log.commits {
            let Some(epoch) = c.info.get(INFO_EPOCH).and_then(Value::as_u64) else { continue };
            snap.max_epoch = snap.max_epoch.max(epoch);
            if let Some(w) = c.info.get(INFO_RETRACT).and_then(Value::as_str) {
                writes.entry((epoch, w.to_string())).or_default().retracted = true;
                continue;
            }
            let Some(write) = c.info.get(INFO_WRITE).and_then(Value::as_str) else { continue };
            let streams = c
                .info
                .get(INFO_STREAMS)
                .and_then(Value::as_object)
                .ok_or_else(|| Error::integrity(&c.path, format!("an epoch commit without `{INFO_STREAMS}`")))?;
            let w = writes.entry((epoch, write.to_string())).or_default();
            match &w.streams {
                Some(s) if s != streams => {
                    return Err(Error::integrity(
                        &c.path,
                        format!(
                            "epoch {epoch}: this commit lists other streams than {} does",
                            w.first.as_ref().map(|p| p.display().to_string()).unwrap_or_default()
                        ),
                    ));
                }
                Some(_) => {}
                None => {
                    w.streams = Some(streams.clone());
                    w.summary = c.info.get(INFO_SUMMARY).cloned().unwrap_or(Value::Null);
                    w.first = Some(c.path.clone());
                }
            }
            w.committed_in.insert(stream.clone());
        }
        for f in log.ever.values() {
            snap.max_epoch = snap.max_epoch.max(f.epoch.unwrap_or(0));
        }
        for f in log.live.values() {
            if let (Some(e), Some(w)) = (f.epoch, &f.write) {
                *writes.entry((e, w.clone())).or_default().live_rows.entry(stream.clone()).or_default() += f.rows;
            }
        }
    }
    for ((epoch, write), w) in writes {
        if w.retracted {
            if !w.live_rows.is_empty() {
                snap.partial.push(PartialWrite {
                    epoch,
                    write,
                    missing: vec!["a rollback that did not finish".to_string()],
                    lacking: BTreeMap::new(),
                    streams: w.streams.clone().unwrap_or_default(),
                    summary: w.summary.clone(),
                    rolling_back: true,
                });
            }
            continue;
        }
        let Some(streams) = &w.streams else {
            // Files tagged with a write no commit describes: damage, not a crash.
            let s = w.live_rows.keys().next().cloned().unwrap_or_default();
            return Err(Error::integrity(
                snap.root.join(&s).join("_delta_log"),
                format!("files of epoch {epoch} belong to a write no commit describes"),
            ));
        };
        let mut missing = Vec::new();
        let mut lacking = BTreeMap::new();
        let mut completable = true;
        for (stream, rows) in streams {
            let want = rows.as_u64().unwrap_or(u64::MAX);
            let have = w.live_rows.get(stream).copied().unwrap_or(0);
            if !w.committed_in.contains(stream) {
                missing.push(format!("stream `{stream}` never committed"));
                lacking.insert(stream.clone(), want);
            } else if have != want {
                missing.push(format!("stream `{stream}` holds {have} of {want} rows"));
                completable &= have < want;
                lacking.insert(stream.clone(), want.saturating_sub(have));
            }
        }
        for stream in w.live_rows.keys() {
            if !streams.contains_key(stream) {
                missing.push(format!("stream `{stream}` has rows the write does not list"));
                completable = false;
            }
        }
        if !completable {
            lacking.clear();
        }
        if missing.is_empty() {
            if let Some(prev) = snap.committed.insert(epoch, write.clone()) {
                return Err(Error::integrity(
                    &snap.root,
                    format!("epoch {epoch} is committed twice (writes {prev} and {write})"),
                ));
            }
        } else {
            snap.partial.push(PartialWrite {
                epoch,
                write,
                missing,
                lacking,
                streams: streams.clone(),
                summary: w.summary.clone(),
                rolling_back: false,
            });
        }
    }
    Ok(())
}

/// The checkpoint registry, checked: each checkpoint once, each epoch once.
fn registry(
    snap: &Snapshot,
    known: &Mutex<HashMap<(PathBuf, String), Vec<CheckpointEntry>>>,
) -> Result<Vec<CheckpointEntry>> {
    let mut known = known.lock().unwrap_or_else(|p| p.into_inner());
    let mut kept = HashMap::new();
    let mut out = Vec::new();
    for seg in snap.segments(REGISTRY) {
        let key = (seg.path.clone(), seg.sha256.clone());
        let entries = match known.remove(&key) {
            Some(entries) => entries,
            None => {
                let mut entries = Vec::new();
                for b in read_segment(&seg)? {
                    entries.extend(CheckpointEntry::from_batch(&b)?);
                }
                entries
            }
        };
        out.extend(entries.iter().cloned());
        kept.insert(key, entries);
    }
    *known = kept;
    out.sort_by_key(|e| e.epoch);
    let mut ids = HashSet::new();
    for w in out.windows(2) {
        if w[0].epoch == w[1].epoch {
            return Err(Error::integrity(
                snap.root.join(REGISTRY),
                format!("epoch {} was given to both {} and {}", w[0].epoch, w[0].id(), w[1].id()),
            ));
        }
    }
    for e in &out {
        if !ids.insert(e.id()) {
            return Err(Error::integrity(snap.root.join(REGISTRY), format!("{} is registered twice", e.id())));
        }
    }
    Ok(out)
}

/// Data and temporary files under a table that no version of its log ever added.
fn unreferenced(table: &Path, log: &TableLog) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![(table.to_path_buf(), String::new(), 0)];
    while let Some((dir, rel, depth)) = stack.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(&dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            let is_dir = entry.file_type().map_err(|e| Error::io(&path, e))?.is_dir();
            if is_dir {
                // Only the partition directories Candor makes, never anything else.
                if depth < 2 && name.contains('=') && !name.starts_with('.') && !name.starts_with('_') {
                    stack.push((path, format!("{rel}{name}/"), depth + 1));
                }
                continue;
            }
            let ours = (name.starts_with("part-") && name.ends_with(".parquet"))
                || (name.starts_with(".part-") && name.ends_with(".tmp"));
            if ours && !log.ever.contains_key(&format!("{rel}{name}")) {
                out.push(path);
            }
        }
    }
    // Temporary commits the Delta library left.
    if let Ok(entries) = fs::read_dir(table.join("_delta_log")) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("_commit_") && name.ends_with(".tmp") {
                out.push(entry.path());
            }
        }
    }
    out.sort();
    Ok(out)
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path, e)),
    }
}

fn read_manifest(root: &Path) -> Result<Manifest> {
    let path = root.join(MANIFEST);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let old = root.join("checkpoints.json").exists() || root.join("epochs").is_dir();
            return Err(Error::input(
                Location::file(root),
                if old {
                    "an archive of an earlier Candor (format 1, no manifest); this Candor reads format 2: re-create it (`candor replay` of its source, or `candor import`)"
                } else {
                    "not a Candor archive (no candor-archive.json)"
                },
            ));
        }
        Err(e) => return Err(Error::io(&path, e)),
    };
    let m: Manifest =
        serde_json::from_str(&text).map_err(|e| Error::integrity(&path, format!("not a Candor manifest: {e}")))?;
    if m.format != "candor-archive" {
        return Err(Error::integrity(&path, format!("format `{}`, expected `candor-archive`", m.format)));
    }
    if m.version != FORMAT_VERSION {
        return Err(Error::input(
            Location::file(&path),
            format!("archive format {}, this Candor reads format {FORMAT_VERSION}", m.version),
        ));
    }
    Ok(m)
}

fn write_manifest(root: &Path, m: &Manifest) -> Result<()> {
    let path = root.join(MANIFEST);
    let tmp = root.join(manifest_in_progress());
    let text = serde_json::to_string_pretty(m).expect("plain data serializes");
    {
        let mut f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(text.as_bytes()).and_then(|_| f.sync_all()).map_err(|e| Error::io(&tmp, e))?;
    }
    fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    sync_dir(root)
}

/// Makes `root` an archive: it must not exist or be an empty directory.
///
/// Two writers may create one archive at once: the manifest is written whole under a name of
/// this process's, then linked under its own name, which only one of them can take. So a
/// reader never sees a manifest half written, and another writer's file in progress does not
/// make the directory "not empty".
fn create(root: &Path) -> Result<()> {
    match fs::read_dir(root) {
        Ok(entries) => {
            for entry in entries {
                let name = entry.map_err(|e| Error::io(root, e))?.file_name();
                if name == MANIFEST {
                    return Ok(());
                }
                if is_manifest_in_progress(&name.to_string_lossy()) {
                    continue;
                }
                return Err(Error::input(
                    Location::file(root),
                    format!(
                        "not a Candor archive (no {MANIFEST}) and not empty (it holds {name:?}, …): Candor writes only into an archive or a new or empty directory; choose another --out"
                    ),
                ));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            return Err(Error::input(Location::file(root), "is a file, not an archive directory"));
        }
        Err(e) => return Err(Error::io(root, e)),
    }
    let m = Manifest {
        format: "candor-archive".into(),
        version: FORMAT_VERSION,
        created_by: format!("candor {}", env!("CARGO_PKG_VERSION")),
        created_at: now_secs(),
        grid: None,
    };
    let path = root.join(MANIFEST);
    let tmp = root.join(manifest_in_progress());
    let text = serde_json::to_string_pretty(&m).expect("plain data serializes");
    // Of two writers creating one archive, one links the manifest; the other finds it there.
    write_new(&path, &tmp, text.as_bytes())?;
    sync_dir(root)
}

/// Writes `bytes` as `path`, which must not exist: whole under `tmp` (synced), then linked
/// under `path`, so a reader finds the file whole or not at all and of two writers only one
/// takes the name. `tmp` is removed either way; the directory is not synced. Returns false
/// when `path` was taken already.
fn write_new(path: &Path, tmp: &Path, bytes: &[u8]) -> Result<bool> {
    {
        let mut f = File::create(tmp).map_err(|e| Error::io(tmp, e))?;
        f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| Error::io(tmp, e))?;
    }
    let linked = match fs::hard_link(tmp, path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(Error::io(path, e)),
    };
    remove_if_exists(tmp)?;
    linked
}

/// A name of this process's (and call's) to write a manifest under before it takes its place.
fn manifest_in_progress() -> String {
    format!(".{MANIFEST}.{}.{}.tmp", std::process::id(), random_id())
}

/// Whether a file name is a manifest being written (by [`create`] or [`write_manifest`]).
fn is_manifest_in_progress(name: &str) -> bool {
    name.strip_prefix(&format!(".{MANIFEST}.")).is_some_and(|rest| rest.ends_with(".tmp"))
}

/// Takes the archive's writer lock, waiting (and saying so once) while another holds it.
fn lock(root: &Path, command: &str) -> Result<File> {
    let path = root.join(LOCK);
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let holder = fs::read_to_string(&path).unwrap_or_default();
            eprintln!(
                "{}: waiting for another writer to finish ({})",
                root.display(),
                if holder.trim().is_empty() { "unknown" } else { holder.trim() }
            );
            f.lock().map_err(|e| Error::io(&path, e))?;
        }
        Err(fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
    }
    f.set_len(0).map_err(|e| Error::io(&path, e))?;
    let _ = writeln!(f, "pid {} (candor {command})", std::process::id());
    Ok(f)
}

/// Whether some process holds the writer lock now.
fn writer_active(root: &Path) -> bool {
    let Ok(f) = File::open(root.join(LOCK)) else { return false };
    match f.try_lock_shared() {
        Ok(()) => {
            let _ = f.unlock();
            false
        }
        Err(_) => true,
    }
}

fn warn_partial(root: &Path, partial: &[PartialWrite]) {
    static WARNED: Mutex<BTreeSet<(PathBuf, u64)>> = Mutex::new(BTreeSet::new());
    let mut warned = WARNED.lock().unwrap_or_else(|p| p.into_inner());
    for p in partial {
        if warned.insert((root.to_path_buf(), p.epoch)) {
            eprintln!(
                "warning: {}: epoch {} was not completely written ({}); it is left out of every result until a writer rolls it back",
                root.display(),
                p.epoch,
                p.missing.join("; ")
            );
        }
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(dir, e))
}

#[cfg(test)]
mod tests;
