//! The append-only archive: every stream written as Arrow data, partitioned by stream and
//! checkpoint, and read back as a source of the same dataflow.
//!
//! Layout under the archive root:
//!
//! ```text
//! <root>/<stream>/part-e<epoch>-<seq>.parquet                        item, trial
//! <root>/<stream>/model=<m>/checkpoint=<c>/part-e<epoch>-<seq>.parquet  response, verdict, observation
//! <root>/generation/log-*.arrows                                        the generation store
//! <root>/epochs/<epoch>.json                                            one marker per committed epoch
//! <root>/checkpoints.json                                               checkpoint → epoch
//! ```
//!
//! A segment is written under a hidden temporary name, synced, and then linked into place
//! under a name that must not exist yet, so a reader never sees a half-written segment and two
//! writers never overwrite each other. The dataflow writes one segment per stream for each
//! epoch (checkpoint) once the epoch is complete and then commits the epoch with a marker;
//! Candor's readers skip segments of uncommitted epochs, and [`Archive::recover`] deletes them
//! before a resumed run, so a crash never leaves a half-written epoch looking complete. The
//! `model=…/checkpoint=…` directories follow the Hive convention, so DuckDB, polars and pyarrow
//! read a stream as one partitioned table.
//!
//! ```
//! use candor::archive::{Archive, Format, Partition};
//! use candor::records::Trial;
//! use candor::schema::Record;
//! let dir = tempfile::tempdir().unwrap();
//! let archive = Archive::open(dir.path(), Format::Parquet).unwrap();
//! let batch = Trial::to_batch(&[]).unwrap();
//! archive.append("trial", &Partition::All, &[batch]).unwrap();
//! assert_eq!(archive.segments("trial").unwrap().len(), 1);
//! ```

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde::Deserialize;

use crate::error::{Error, Location, Result};
use crate::schema;

/// How segments are encoded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Parquet (snappy): read by DuckDB, polars, pyarrow, Spark.
    #[default]
    Parquet,
    /// Arrow IPC stream files (`.arrows`): zero-copy for Arrow readers.
    Ipc,
}

impl Format {
    fn extension(self) -> &'static str {
        match self {
            Format::Parquet => "parquet",
            Format::Ipc => "arrows",
        }
    }
    fn of(path: &Path) -> Option<Format> {
        match path.extension()?.to_str()? {
            "parquet" => Some(Format::Parquet),
            "arrows" => Some(Format::Ipc),
            _ => None,
        }
    }
}

/// Which part of a stream a segment belongs to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Partition {
    /// Streams that do not depend on a checkpoint.
    All,
    /// One checkpoint's part of a stream.
    Checkpoint { model: String, checkpoint: String },
}

impl Partition {
    fn dir(&self, stream_dir: &Path) -> PathBuf {
        match self {
            Partition::All => stream_dir.to_path_buf(),
            Partition::Checkpoint { model, checkpoint } => {
                stream_dir.join(format!("model={}", escape(model))).join(format!("checkpoint={}", escape(checkpoint)))
            }
        }
    }
}

/// Keeps a checkpoint id usable as one path component.
fn escape(id: &str) -> String {
    id.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '%' }).collect()
}

/// An archive root.
#[derive(Clone, Debug)]
pub struct Archive {
    root: PathBuf,
    format: Format,
}

/// One complete segment found on disk.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Segment {
    pub path: PathBuf,
}

impl Archive {
    /// Opens (creating if needed) an archive; `format` is used for new segments, and existing
    /// segments of either format are read.
    pub fn open(root: impl AsRef<Path>, format: Format) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
        Ok(Archive { root, format })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// Appends `batches` (all of `stream`'s schema) as one new segment, visible at once, and
    /// returns its path. Nothing is written for an empty list.
    pub fn append(&self, stream: &str, partition: &Partition, batches: &[RecordBatch]) -> Result<Option<PathBuf>> {
        self.append_segment(stream, partition, None, batches)
    }

    /// Appends a segment that belongs to `epoch`: readers see it only once the epoch is
    /// committed with [`Archive::commit_epoch`], and [`Archive::recover`] removes it if the
    /// epoch never is.
    pub fn append_epoch(
        &self,
        stream: &str,
        partition: &Partition,
        epoch: u64,
        batches: &[RecordBatch],
    ) -> Result<Option<PathBuf>> {
        self.append_segment(stream, partition, Some(epoch), batches)
    }

    fn append_segment(
        &self,
        stream: &str,
        partition: &Partition,
        epoch: Option<u64>,
        batches: &[RecordBatch],
    ) -> Result<Option<PathBuf>> {
        if batches.is_empty() {
            return Ok(None);
        }
        let expected = schema::arrow_schema(stream)?;
        for b in batches {
            if b.schema().fields() != expected.fields() {
                return Err(Error::Internal(format!("a batch for stream `{stream}` does not carry its schema")));
            }
        }
        let dir = partition.dir(&self.root.join(stream));
        fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let prefix = match epoch {
            Some(e) => format!("part-e{e:06}-"),
            None => "part-".to_string(),
        };
        let mut seq = self.all_segments_in(&dir)?.iter().filter(|p| file_name(&p.path).starts_with(&prefix)).count();
        let tmp = dir.join(format!(".{prefix}{}-{seq:06}.tmp", std::process::id()));
        self.write_segment(&tmp, &expected, batches)?;
        // Link under the first free sequence number: hard_link fails if the name exists, so a
        // concurrent writer can never be overwritten.
        loop {
            let name = dir.join(format!("{prefix}{seq:06}.{}", self.format.extension()));
            match fs::hard_link(&tmp, &name) {
                Ok(()) => {
                    fs::remove_file(&tmp).map_err(|e| Error::io(&tmp, e))?;
                    sync_dir(&dir)?;
                    return Ok(Some(name));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => seq += 1,
                Err(e) => return Err(Error::io(&name, e)),
            }
        }
    }

    /// Marks every segment of `epoch` visible, recording what was written. Atomic: the marker
    /// appears whole or not at all.
    pub fn commit_epoch(&self, epoch: u64, summary: &serde_json::Value) -> Result<()> {
        let dir = self.root.join(EPOCHS_DIR);
        fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let path = dir.join(format!("{epoch:06}.json"));
        let tmp = dir.join(format!(".{epoch:06}.json.{}.tmp", std::process::id()));
        fs::write(&tmp, serde_json::to_vec_pretty(summary).expect("json")).map_err(|e| Error::io(&tmp, e))?;
        File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| Error::io(&tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        sync_dir(&dir)
    }

    /// Withdraws an epoch's marker (before its streams are rebuilt on purpose).
    pub fn uncommit_epoch(&self, epoch: u64) -> Result<()> {
        let path = self.root.join(EPOCHS_DIR).join(format!("{epoch:06}.json"));
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    /// Epochs whose segments are complete and visible.
    pub fn committed_epochs(&self) -> Result<std::collections::BTreeSet<u64>> {
        let dir = self.root.join(EPOCHS_DIR);
        let mut out = std::collections::BTreeSet::new();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(Error::io(&dir, e)),
        };
        for entry in entries {
            let path = entry.map_err(|e| Error::io(&dir, e))?.path();
            if let Some(n) = file_name(&path).strip_suffix(".json").and_then(|n| n.parse().ok()) {
                out.insert(n);
            }
        }
        Ok(out)
    }

    /// Removes what a crash left behind: temporary files and the segments of epochs that were
    /// never committed. Call before writing to an archive a previous run may have left.
    pub fn recover(&self) -> Result<usize> {
        let committed = self.committed_epochs()?;
        let mut removed = 0;
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = fs::read_dir(&dir) else { continue };
            for entry in entries {
                let path = entry.map_err(|e| Error::io(&dir, e))?.path();
                let name = file_name(&path);
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let orphan = match segment_epoch(&path) {
                    Some(e) => !committed.contains(&e),
                    None => name.starts_with(".part-") && name.ends_with(".tmp"),
                };
                if orphan {
                    fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    fn write_segment(&self, path: &Path, schema: &arrow::datatypes::SchemaRef, batches: &[RecordBatch]) -> Result<()> {
        let file = File::create(path).map_err(|e| Error::io(path, e))?;
        let ctx = || format!("writing {}", path.display());
        match self.format {
            Format::Ipc => {
                let mut w = StreamWriter::try_new(BufWriter::new(file), schema).map_err(|e| Error::arrow(ctx(), e))?;
                for b in batches {
                    w.write(b).map_err(|e| Error::arrow(ctx(), e))?;
                }
                w.finish().map_err(|e| Error::arrow(ctx(), e))?;
                let file = w.into_inner().map_err(|e| Error::arrow(ctx(), e))?;
                let file = file.into_inner().map_err(|e| Error::io(path, e.into_error()))?;
                file.sync_all().map_err(|e| Error::io(path, e))?;
            }
            Format::Parquet => {
                let props = WriterProperties::builder().set_compression(Compression::SNAPPY).build();
                let mut w = ArrowWriter::try_new(file, schema.clone(), Some(props))
                    .map_err(|e| Error::arrow(ctx(), e.into()))?;
                for b in batches {
                    w.write(b).map_err(|e| Error::arrow(ctx(), e.into()))?;
                }
                let mut file = w.into_inner().map_err(|e| Error::arrow(ctx(), e.into()))?;
                file.flush().map_err(|e| Error::io(path, e))?;
                file.sync_all().map_err(|e| Error::io(path, e))?;
            }
        }
        Ok(())
    }

    /// Segments in `dir` whose epoch (if any) is committed.
    fn segments_in(&self, dir: &Path, committed: &std::collections::BTreeSet<u64>) -> Result<Vec<Segment>> {
        let mut all = self.all_segments_in(dir)?;
        all.retain(|s| segment_epoch(&s.path).is_none_or(|e| committed.contains(&e)));
        Ok(all)
    }

    fn all_segments_in(&self, dir: &Path) -> Result<Vec<Segment>> {
        let mut out = Vec::new();
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(Error::io(dir, e)),
        };
        for entry in entries {
            let path = entry.map_err(|e| Error::io(dir, e))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if (name.starts_with("part-") || name.starts_with("log-")) && Format::of(&path).is_some() {
                out.push(Segment { path });
            }
        }
        out.sort();
        Ok(out)
    }

    /// Every complete segment of `stream`: the unpartitioned ones first, then each
    /// `key=value` partition directory in name order, segments in sequence order.
    pub fn segments(&self, stream: &str) -> Result<Vec<Segment>> {
        let committed = self.committed_epochs()?;
        let mut out = Vec::new();
        self.collect_segments(&self.root.join(stream), &committed, &mut out)?;
        Ok(out)
    }

    fn collect_segments(
        &self,
        dir: &Path,
        committed: &std::collections::BTreeSet<u64>,
        out: &mut Vec<Segment>,
    ) -> Result<()> {
        out.extend(self.segments_in(dir, committed)?);
        let mut parts = Vec::new();
        if let Ok(entries) = fs::read_dir(dir) {
            for entry in entries {
                let path = entry.map_err(|e| Error::io(dir, e))?.path();
                let is_partition = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.contains('='));
                if is_partition && path.is_dir() {
                    parts.push(path);
                }
            }
        }
        parts.sort();
        for p in parts {
            self.collect_segments(&p, committed, out)?;
        }
        Ok(())
    }

    /// Whether the archive holds any segment of `stream`.
    pub fn has(&self, stream: &str) -> Result<bool> {
        Ok(!self.segments(stream)?.is_empty())
    }

    /// Reads every batch of `stream`, checking each against the stream's schema.
    pub fn read(&self, stream: &str) -> Result<Vec<RecordBatch>> {
        let mut out = Vec::new();
        for seg in self.segments(stream)? {
            out.extend(read_segment(stream, &seg.path)?);
        }
        Ok(out)
    }

    /// Reads the batches of `stream` that belong to one committed epoch (the rows a
    /// checkpoint's evaluation wrote), in segment order.
    pub fn read_epoch(&self, stream: &str, epoch: u64) -> Result<Vec<RecordBatch>> {
        let mut out = Vec::new();
        for seg in self.segments(stream)? {
            if segment_epoch(&seg.path) == Some(epoch) {
                out.extend(read_segment(stream, &seg.path)?);
            }
        }
        Ok(out)
    }
}

/// A checkpoint known to an archive, with the epoch (logical time) it was given.
#[derive(Clone, Debug, PartialEq, serde::Serialize, Deserialize)]
pub struct CheckpointEntry {
    pub epoch: u64,
    pub model: String,
    pub checkpoint: String,
    pub is_finetuned: bool,
    pub variant: Option<String>,
}

const CHECKPOINTS_FILE: &str = "checkpoints.json";
const EPOCHS_DIR: &str = "epochs";

fn file_name(path: &Path) -> &str {
    path.file_name().and_then(|n| n.to_str()).unwrap_or("")
}

/// The epoch a segment belongs to, from its name `part-e<epoch>-<seq>.<ext>`.
fn segment_epoch(path: &Path) -> Option<u64> {
    let rest = file_name(path).strip_prefix("part-e")?;
    rest.split('-').next()?.parse().ok()
}

impl Archive {
    /// The checkpoints registered so far, in epoch order.
    pub fn checkpoints(&self) -> Result<Vec<CheckpointEntry>> {
        let path = self.root.join(CHECKPOINTS_FILE);
        match fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| Error::input(Location::file(&path), e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    /// Gives (model, checkpoint) its epoch: the one it already has, else the next one after
    /// every registered epoch (epoch 0 is the grid). The registry is replaced atomically.
    pub fn register_checkpoint(
        &self,
        model: &str,
        checkpoint: &str,
        is_finetuned: bool,
        variant: Option<&str>,
    ) -> Result<u64> {
        let mut all = self.checkpoints()?;
        if let Some(e) = all.iter().find(|e| e.model == model && e.checkpoint == checkpoint) {
            if e.is_finetuned != is_finetuned {
                return Err(Error::config(
                    format!("{model}/{checkpoint}"),
                    format!("already registered in {} with is_finetuned = {}", self.root.display(), e.is_finetuned),
                ));
            }
            return Ok(e.epoch);
        }
        let epoch = all.iter().map(|e| e.epoch).max().unwrap_or(0) + 1;
        all.push(CheckpointEntry {
            epoch,
            model: model.to_string(),
            checkpoint: checkpoint.to_string(),
            is_finetuned,
            variant: variant.map(str::to_string),
        });
        let path = self.root.join(CHECKPOINTS_FILE);
        let tmp = self.root.join(format!(".{CHECKPOINTS_FILE}.{}.tmp", std::process::id()));
        let text = serde_json::to_string_pretty(&all).expect("plain data serializes");
        fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
        File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| Error::io(&tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        sync_dir(&self.root)?;
        Ok(epoch)
    }

    /// Epoch → archive partition, for per-checkpoint streams.
    pub fn checkpoint_partitions(&self) -> Result<std::collections::BTreeMap<u64, Partition>> {
        Ok(self
            .checkpoints()?
            .into_iter()
            .map(|e| (e.epoch, Partition::Checkpoint { model: e.model, checkpoint: e.checkpoint }))
            .collect())
    }

    /// Removes a stream entirely (used when a grid is rebuilt on purpose).
    pub fn remove_stream(&self, stream: &str) -> Result<()> {
        let dir = self.root.join(stream);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(&dir, e)),
        }
    }
}

/// Reads one segment file of `stream`.
pub fn read_segment(stream: &str, path: &Path) -> Result<Vec<RecordBatch>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let bad = |m: String| Error::input(Location::file(path), m);
    // A log (the generation store) is appended to while it is read and may end in a message a
    // crash cut short: keep what precedes it.
    let is_log = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("log-"));
    let batches: Vec<RecordBatch> = match Format::of(path) {
        Some(Format::Ipc) if is_log => match StreamReader::try_new(std::io::BufReader::new(file), None) {
            Ok(reader) => reader.map_while(|b| b.ok()).collect(),
            Err(_) => Vec::new(),
        },
        Some(Format::Ipc) => StreamReader::try_new(std::io::BufReader::new(file), None)
            .map_err(|e| bad(format!("not an Arrow IPC stream: {e}")))?
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| bad(format!("corrupt Arrow IPC stream: {e}")))?,
        Some(Format::Parquet) => ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| bad(format!("not a Parquet file: {e}")))?
            .build()
            .map_err(|e| bad(format!("unreadable Parquet file: {e}")))?
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| bad(format!("corrupt Parquet file: {e}")))?,
        None => {
            return Err(bad("unknown segment extension (expected .parquet or .arrows)".into()));
        }
    };
    for b in &batches {
        schema::check_batch(stream, b).map_err(|e| bad(e.to_string()))?;
    }
    Ok(batches)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::Trial;
    use crate::schema::Record;

    fn trial(i: usize) -> Trial {
        Trial {
            trial_key: format!("trivia/q{i}/unmodified/original"),
            dataset: "trivia".into(),
            item_key: format!("q{i}"),
            amendment_type: "unmodified".into(),
            amendment_group: "unmodified".into(),
            statement_id: None,
            statement: None,
            prompt_type: "original".into(),
            belief_answer: None,
            prompt: format!("Question {i}?"),
            template_style: "clean".into(),
            seed: 1,
        }
    }

    #[test]
    fn both_formats_round_trip_and_partition_by_checkpoint() {
        for format in [Format::Parquet, Format::Ipc] {
            let dir = tempfile::tempdir().unwrap();
            let a = Archive::open(dir.path(), format).unwrap();
            let rows: Vec<Trial> = (0..5).map(trial).collect();
            a.append("trial", &Partition::All, &[Trial::to_batch(&rows[..2]).unwrap()]).unwrap();
            a.append("trial", &Partition::All, &[Trial::to_batch(&rows[2..]).unwrap()]).unwrap();
            let back: Vec<Trial> =
                a.read("trial").unwrap().iter().flat_map(|b| Trial::from_batch(b).unwrap()).collect();
            assert_eq!(back, rows);
            let part = Partition::Checkpoint { model: "smol".into(), checkpoint: "warm/epoch 2".into() };
            let seg = a.append("trial", &part, &[Trial::to_batch(&rows).unwrap()]).unwrap().unwrap();
            assert!(seg.to_string_lossy().contains("model=smol/checkpoint=warm%epoch%2"), "{}", seg.display());
            assert_eq!(a.segments("trial").unwrap().len(), 3);
        }
    }

    #[test]
    fn epoch_segments_appear_on_commit_and_recovery_removes_orphans() {
        let dir = tempfile::tempdir().unwrap();
        let a = Archive::open(dir.path(), Format::Parquet).unwrap();
        let batch = Trial::to_batch(&[trial(0), trial(1)]).unwrap();
        let part = Partition::Checkpoint { model: "m".into(), checkpoint: "c".into() };
        a.append_epoch("trial", &Partition::All, 0, std::slice::from_ref(&batch)).unwrap();
        a.commit_epoch(0, &serde_json::json!({})).unwrap();
        // Epoch 1 is written but the run dies before committing it.
        let orphan = a.append_epoch("trial", &part, 1, std::slice::from_ref(&batch)).unwrap().unwrap();
        assert_eq!(a.segments("trial").unwrap().len(), 1, "uncommitted segments are invisible");
        assert_eq!(a.recover().unwrap(), 1);
        assert!(!orphan.exists());
        a.append_epoch("trial", &part, 1, std::slice::from_ref(&batch)).unwrap();
        a.commit_epoch(1, &serde_json::json!({})).unwrap();
        assert_eq!(a.segments("trial").unwrap().len(), 2);
        assert_eq!(a.recover().unwrap(), 0, "committed segments stay");
        assert_eq!(a.committed_epochs().unwrap().into_iter().collect::<Vec<_>>(), [0, 1]);
    }

    #[test]
    fn temporary_and_foreign_files_are_not_segments() {
        let dir = tempfile::tempdir().unwrap();
        let a = Archive::open(dir.path(), Format::Ipc).unwrap();
        a.append("trial", &Partition::All, &[Trial::to_batch(&[trial(0)]).unwrap()]).unwrap();
        fs::write(dir.path().join("trial/.part-1-000001.tmp"), b"half written").unwrap();
        fs::write(dir.path().join("trial/notes.txt"), b"x").unwrap();
        assert_eq!(a.read("trial").unwrap().len(), 1);
    }

    #[test]
    fn a_corrupt_segment_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let a = Archive::open(dir.path(), Format::Parquet).unwrap();
        fs::create_dir_all(dir.path().join("trial")).unwrap();
        fs::write(dir.path().join("trial/part-000000.parquet"), b"not parquet").unwrap();
        let err = a.read("trial").unwrap_err().to_string();
        assert!(err.contains("part-000000.parquet") && err.contains("Parquet"), "{err}");
    }

    #[test]
    fn same_rows_give_byte_identical_segments() {
        for format in [Format::Parquet, Format::Ipc] {
            let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            let rows: Vec<Trial> = (0..50).map(trial).collect();
            let p1 = Archive::open(d1.path(), format).unwrap().append(
                "trial",
                &Partition::All,
                &[Trial::to_batch(&rows).unwrap()],
            );
            let p2 = Archive::open(d2.path(), format).unwrap().append(
                "trial",
                &Partition::All,
                &[Trial::to_batch(&rows).unwrap()],
            );
            assert_eq!(fs::read(p1.unwrap().unwrap()).unwrap(), fs::read(p2.unwrap().unwrap()).unwrap());
        }
    }
}
