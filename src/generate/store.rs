//! The generation store: answers content-addressed by everything that determines them, written
//! durably before they move downstream, so re-running an experiment or resuming after a crash
//! (even `kill -9`) never pays for the same call twice.
//!
//! The store is the archive's `generation` stream (`schemas/generation.json`). Each writer
//! appends to its own Arrow IPC stream file, `generation/log-<time>-<pid>-<n>.arrows`, one
//! record batch per `put`, flushed and synced before `put` returns; then it appends one line
//! `<end offset> <batches> <sha256>` to the log's `.sums` file, covering the bytes that put
//! wrote, and syncs it. Readers check every covered byte range: a mismatch is an
//! [`Error::Integrity`] naming the log and the range, never a silently dropped or altered
//! answer. A crash can leave a torn last message that no sum covers yet; readers keep every
//! complete message. One process at a time writes a store (a lock in `generation/`; the
//! handles of one process share it), and a key is stored once. pyarrow reads a log with
//! `pyarrow.ipc.open_stream`, polars with `read_ipc_stream`.
//!
//! ```
//! use candor::generate::{Decoding, FinishReason, GenRequest, Generation};
//! use candor::generate::store::GenerationStore;
//! let dir = tempfile::tempdir().unwrap();
//! let req = GenRequest { system_prompt: None, prompt: "2+2?".into(), decoding: Decoding::open_ended(1) };
//! let key = GenerationStore::key("model-a", &req, 0);
//! let answer = Generation { output: "4".into(), finish_reason: FinishReason::Stop, prompt_tokens: 3, completion_tokens: 1, latency_ms: 5.0 };
//! let mut store = GenerationStore::open(dir.path()).unwrap();
//! store.put(&[(key.clone(), "model-a".into(), req.clone(), 0, answer.clone())]).unwrap();
//! drop(store);
//! assert_eq!(GenerationStore::open(dir.path()).unwrap().get(&key), Some(&answer));
//! ```

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use arrow::record_batch::RecordBatch;

use arrow::ipc::writer::StreamWriter;
use sha2::{Digest, Sha256};

use super::{FinishReason, GenRequest, Generation};
use crate::error::{Error, Result};
use crate::records::StoredGeneration;
use crate::schema::{self, Record};

/// A store entry to write: key, fingerprint, request, sample index, answer.
pub type Entry = (String, String, GenRequest, u32, Generation);

/// The generation store of one archive.
pub struct GenerationStore {
    dir: PathBuf,
    index: HashMap<String, Generation>,
    log: Option<StreamWriter<BufWriter<File>>>,
    log_path: Option<PathBuf>,
    sums: Option<File>,
    /// Batches written to the current log.
    batches: u64,
    /// Bytes of the current log covered by a sum.
    covered: u64,
    puts: u64,
    /// The writer lock (None: opened read-only).
    lock: Option<Arc<File>>,
}

/// The store locks this process holds, shared by its handles.
static LOCKS: Mutex<Vec<(PathBuf, Weak<File>)>> = Mutex::new(Vec::new());

/// Set in the processes of a cluster other than process 0 ([`write_as_cluster_follower`]).
static CLUSTER_FOLLOWER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Declares this process a member of a timely cluster (`-n P`) other than process 0. The
/// workers of every process of a cluster generate (and judge) their share of one run, each
/// process into its own log, at once: a follower writes without taking the store's lock,
/// which would make it wait for process 0 for the whole run. What the lock is for, one run at
/// a time, is kept by the archive's writer lock, which process 0 holds for the cluster. (Two
/// writers can at worst both store an answer to the same request; the first stored is the
/// answer, see [`GenerationStore::open`].)
pub fn write_as_cluster_follower() {
    CLUSTER_FOLLOWER.store(true, Ordering::Relaxed);
}

/// Takes (or shares, within this process) the store's writer lock, waiting for another
/// process that holds it (a cluster follower only opens it, see [`write_as_cluster_follower`]).
fn store_lock(dir: &Path) -> Result<Arc<File>> {
    let mut held = LOCKS.lock().unwrap_or_else(|p| p.into_inner());
    held.retain(|(_, w)| w.strong_count() > 0);
    if let Some(lock) = held.iter().find(|(d, _)| d == dir).and_then(|(_, w)| w.upgrade()) {
        return Ok(lock);
    }
    let path = dir.join(".lock");
    let f =
        fs::OpenOptions::new().write(true).create(true).truncate(false).open(&path).map_err(|e| Error::io(&path, e))?;
    let locked = if CLUSTER_FOLLOWER.load(Ordering::Relaxed) { Ok(()) } else { f.try_lock() };
    match locked {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            eprintln!("{}: waiting for another process using this generation store", dir.display());
            f.lock().map_err(|e| Error::io(&path, e))?;
        }
        Err(fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
    }
    let lock = Arc::new(f);
    held.push((dir.to_path_buf(), Arc::downgrade(&lock)));
    Ok(lock)
}

/// The `.sums` file beside a log.
fn sums_path(log: &Path) -> PathBuf {
    log.with_extension("sums")
}

/// Reads one log, checking every range its sums cover; keeps complete messages past the last
/// sum (a put a crash cut short before its sum).
pub fn read_log(path: &Path) -> Result<Vec<RecordBatch>> {
    use arrow::ipc::reader::StreamReader;
    // The sums first: a writer appends to the log before its sum, so the log read after
    // them holds at least every byte they cover, even while a put is under way.
    let sums_file = sums_path(path);
    let sums = match fs::read(&sums_file) {
        Ok(t) => String::from_utf8(t).map_err(|_| Error::integrity(&sums_file, "not UTF-8 text"))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(Error::io(&sums_file, e)),
    };
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut start = 0usize;
    let mut confirmed = 0u64;
    // A last line without its newline was cut short by a crash: not a sum yet.
    let complete = match sums.rfind('\n') {
        Some(i) => &sums[..=i],
        None => "",
    };
    for (n, line) in complete.lines().enumerate() {
        let mut parts = line.split(' ');
        let (Some(end), Some(batches), Some(sha), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Error::integrity(&sums_file, format!("line {} is not `<end> <batches> <sha256>`", n + 1)));
        };
        let (Ok(end), Ok(batches)) = (end.parse::<usize>(), batches.parse::<u64>()) else {
            return Err(Error::integrity(&sums_file, format!("line {} is not `<end> <batches> <sha256>`", n + 1)));
        };
        if end < start || end > bytes.len() || batches < confirmed {
            return Err(Error::integrity(
                path,
                format!("{} bytes, but {} covers bytes up to {end} (line {})", bytes.len(), sums_file.display(), n + 1),
            ));
        }
        if crate::archive::log::hex(&Sha256::digest(&bytes[start..end])) != sha {
            return Err(Error::integrity(
                path,
                format!("bytes {start}..{end} differ from their checksum (line {} of {})", n + 1, sums_file.display()),
            ));
        }
        start = end;
        confirmed = batches;
    }
    let reader = match StreamReader::try_new(std::io::Cursor::new(&bytes[..]), None) {
        Ok(r) => r,
        Err(_) if confirmed == 0 => return Ok(Vec::new()),
        Err(e) => return Err(Error::integrity(path, format!("not an Arrow IPC stream: {e}"))),
    };
    let batches: Vec<RecordBatch> = reader.map_while(|b| b.ok()).collect();
    if (batches.len() as u64) < confirmed {
        return Err(Error::integrity(
            path,
            format!("{} readable batches, but {confirmed} were confirmed", batches.len()),
        ));
    }
    for b in &batches {
        schema::check_batch(StoredGeneration::STREAM, b).map_err(|e| Error::integrity(path, e.to_string()))?;
    }
    Ok(batches)
}

fn logs(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut logs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("log-") && n.ends_with(".arrows"))
        })
        .collect();
    logs.sort();
    Ok(logs)
}

/// Checks every log of the generation store under an archive root; one problem per bad log.
pub fn verify(archive_root: &Path) -> Vec<(PathBuf, String)> {
    let dir = archive_root.join(StoredGeneration::STREAM);
    let mut problems = Vec::new();
    match logs(&dir) {
        Ok(logs) => {
            for path in logs {
                if let Err(e) = read_log(&path) {
                    problems.push(match e {
                        Error::Integrity { path, message } => (path, message),
                        e => (path, e.to_string()),
                    });
                }
            }
        }
        Err(e) => problems.push((dir, e.to_string())),
    }
    problems
}

static LOG_COUNTER: AtomicU64 = AtomicU64::new(0);

impl GenerationStore {
    /// Opens the store under an archive root and loads every complete entry.
    pub fn open(archive_root: &Path) -> Result<Self> {
        let dir = archive_root.join(StoredGeneration::STREAM);
        fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let lock = Some(store_lock(&dir)?);
        Self::load(dir, lock)
    }

    /// Opens the store to look up answers only: no lock is taken (a writer may be running),
    /// nothing is created, and [`GenerationStore::put`] is refused.
    pub fn read_only(archive_root: &Path) -> Result<Self> {
        Self::load(archive_root.join(StoredGeneration::STREAM), None)
    }

    fn load(dir: PathBuf, lock: Option<Arc<File>>) -> Result<Self> {
        let mut index = HashMap::new();
        for path in logs(&dir)? {
            for batch in read_log(&path)? {
                for g in StoredGeneration::from_batch(&batch)? {
                    if index.contains_key(&g.key) {
                        // The first answer stored for a key is the answer.
                        continue;
                    }
                    let finish_reason = match g.finish_reason.as_str() {
                        "length" => FinishReason::Length,
                        _ => FinishReason::Stop,
                    };
                    index.insert(
                        g.key,
                        Generation {
                            output: g.output,
                            finish_reason,
                            prompt_tokens: g.prompt_tokens,
                            completion_tokens: g.completion_tokens,
                            latency_ms: g.latency_ms,
                        },
                    );
                }
            }
        }
        Ok(GenerationStore { dir, index, log: None, log_path: None, sums: None, batches: 0, covered: 0, puts: 0, lock })
    }

    /// The content address of a request to a backend with `fingerprint`.
    pub fn key(fingerprint: &str, request: &GenRequest, sample_index: u32) -> String {
        let canonical = serde_json::json!({
            "fingerprint": fingerprint,
            "system_prompt": request.system_prompt,
            "prompt": request.prompt,
            "decoding": request.decoding,
            "sample_index": sample_index,
        });
        let digest = Sha256::digest(canonical.to_string().as_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The stored answer for `key`.
    pub fn get(&self, key: &str) -> Option<&Generation> {
        self.index.get(key)
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// How many `put` calls this handle made (each one a durable write).
    pub fn puts(&self) -> u64 {
        self.puts
    }

    /// Appends answers and returns once they are on disk.
    pub fn put(&mut self, entries: &[Entry]) -> Result<()> {
        if self.lock.is_none() {
            return Err(Error::Internal(format!("{} was opened read-only", self.dir.display())));
        }
        // A key is stored once: what this handle already has is not written again.
        let mut fresh = std::collections::HashSet::new();
        let entries: Vec<&Entry> =
            entries.iter().filter(|e| !self.index.contains_key(&e.0) && fresh.insert(e.0.clone())).collect();
        if entries.is_empty() {
            return Ok(());
        }
        let rows: Vec<StoredGeneration> = entries
            .iter()
            .map(|(key, fingerprint, req, sample_index, g)| StoredGeneration {
                key: key.clone(),
                fingerprint: fingerprint.clone(),
                system_prompt: req.system_prompt.clone(),
                prompt: req.prompt.clone(),
                decoding: serde_json::to_string(&req.decoding).expect("plain data serializes"),
                sample_index: *sample_index,
                output: g.output.clone(),
                finish_reason: g.finish_reason.as_str().to_string(),
                prompt_tokens: g.prompt_tokens,
                completion_tokens: g.completion_tokens,
                latency_ms: g.latency_ms,
            })
            .collect();
        let batch = StoredGeneration::to_batch(&rows)?;
        if self.log.is_none() {
            let nanos =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
            let n = LOG_COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = self.dir.join(format!("log-{nanos:020}-{}-{n}.arrows", std::process::id()));
            let file = File::create_new(&path).map_err(|e| Error::io(&path, e))?;
            let schema = schema::arrow_schema(StoredGeneration::STREAM)?;
            let writer = StreamWriter::try_new(BufWriter::new(file), &schema)
                .map_err(|e| Error::arrow(format!("creating {}", path.display()), e))?;
            let sums = File::create_new(sums_path(&path)).map_err(|e| Error::io(sums_path(&path), e))?;
            File::open(&self.dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(&self.dir, e))?;
            self.log = Some(writer);
            self.log_path = Some(path);
            self.sums = Some(sums);
            self.batches = 0;
            self.covered = 0;
        }
        let path = self.log_path.clone().expect("set with the log");
        let log = self.log.as_mut().expect("opened above");
        log.write(&batch).map_err(|e| Error::arrow(format!("writing {}", path.display()), e))?;
        log.flush().map_err(|e| Error::arrow(format!("writing {}", path.display()), e))?;
        log.get_mut().flush().map_err(|e| Error::io(&path, e))?;
        log.get_ref().get_ref().sync_data().map_err(|e| Error::io(&path, e))?;
        // The sum of what this put wrote: read back from the file, as a reader will see it.
        let end = log.get_ref().get_ref().metadata().map_err(|e| Error::io(&path, e))?.len();
        let written = {
            use std::io::{Read, Seek, SeekFrom};
            let mut f = File::open(&path).map_err(|e| Error::io(&path, e))?;
            f.seek(SeekFrom::Start(self.covered)).map_err(|e| Error::io(&path, e))?;
            let mut buf = Vec::with_capacity((end - self.covered) as usize);
            f.take(end - self.covered).read_to_end(&mut buf).map_err(|e| Error::io(&path, e))?;
            buf
        };
        self.batches += 1;
        let line = format!("{end} {} {}\n", self.batches, crate::archive::log::hex(&Sha256::digest(&written)));
        let sums = self.sums.as_mut().expect("opened with the log");
        sums.write_all(line.as_bytes()).and_then(|_| sums.sync_data()).map_err(|e| Error::io(sums_path(&path), e))?;
        self.covered = end;
        for (key, _, _, _, g) in entries {
            self.index.insert(key.clone(), g.clone());
        }
        self.puts += 1;
        Ok(())
    }
}

impl Drop for GenerationStore {
    fn drop(&mut self) {
        if let Some(mut log) = self.log.take() {
            let _ = log.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::Decoding;

    fn entry(i: u32) -> Entry {
        let req = GenRequest {
            system_prompt: Some("be warm".into()),
            prompt: format!("q{i}"),
            decoding: Decoding::open_ended(i as u64),
        };
        let g = Generation {
            output: format!("a{i}"),
            finish_reason: if i.is_multiple_of(2) { FinishReason::Stop } else { FinishReason::Length },
            prompt_tokens: i,
            completion_tokens: 2 * i,
            latency_ms: 1.5,
        };
        (GenerationStore::key("fp", &req, 0), "fp".into(), req, 0, g)
    }

    #[test]
    fn keys_change_with_anything_that_changes_the_answer() {
        let (_, _, req, _, _) = entry(1);
        let base = GenerationStore::key("fp", &req, 0);
        assert_eq!(base, GenerationStore::key("fp", &req.clone(), 0));
        assert_ne!(base, GenerationStore::key("fp2", &req, 0));
        assert_ne!(base, GenerationStore::key("fp", &req, 1));
        let mut r = req.clone();
        r.decoding.temperature = 0.2;
        assert_ne!(base, GenerationStore::key("fp", &r, 0));
        let mut r = req.clone();
        r.system_prompt = None;
        assert_ne!(base, GenerationStore::key("fp", &r, 0));
        let mut r = req;
        r.decoding.seed += 1;
        assert_ne!(base, GenerationStore::key("fp", &r, 0));
    }

    #[test]
    fn entries_survive_reopening_and_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = GenerationStore::open(dir.path()).unwrap();
        s.put(&[entry(1), entry(2)]).unwrap();
        s.put(&[entry(3)]).unwrap();
        // Simulate kill -9 mid-write: the handle is leaked (no clean finish) and garbage is
        // appended after the last complete message.
        let path = s.log_path.clone().unwrap();
        std::mem::forget(s);
        let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[0xff, 0xff, 0xff, 0xff, 0x10, 0x00, 0x00]).unwrap();
        drop(f);
        let s = GenerationStore::open(dir.path()).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s.get(&entry(3).0), Some(&entry(3).4));
        assert_eq!(s.get(&entry(2).0).unwrap().finish_reason, FinishReason::Stop);
    }

    /// Every bit of a finished log and its sums is covered: a flip anywhere is an error naming
    /// the log (or its sums), or lands in the end-of-stream marker and changes nothing.
    #[test]
    fn a_flipped_bit_in_a_log_is_named_never_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = GenerationStore::open(dir.path()).unwrap();
        s.put(&[entry(1), entry(2)]).unwrap();
        s.put(&[entry(3)]).unwrap();
        let path = s.log_path.clone().unwrap();
        drop(s);
        let want: Vec<_> = (1..=3).map(|i| entry(i).4).collect();
        for file in [path.clone(), sums_path(&path)] {
            let original = fs::read(&file).unwrap();
            for at in 0..original.len() {
                let mut bytes = original.clone();
                bytes[at] ^= 1 << (at % 8);
                fs::write(&file, &bytes).unwrap();
                match GenerationStore::read_only(dir.path()) {
                    Err(Error::Integrity { path: p, .. }) => assert!(p == path || p == sums_path(&path)),
                    Err(e) => panic!("byte {at} of {}: {e}", file.display()),
                    Ok(s) => {
                        let got: Vec<_> = (1..=3).map(|i| s.get(&entry(i).0).cloned()).collect();
                        assert_eq!(
                            got,
                            want.iter().cloned().map(Some).collect::<Vec<_>>(),
                            "byte {at} of {}",
                            file.display()
                        );
                    }
                }
            }
            fs::write(&file, &original).unwrap();
        }
    }

    #[test]
    fn a_key_is_stored_once_and_one_process_writes_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = GenerationStore::open(dir.path()).unwrap();
        a.put(&[entry(1), entry(1)]).unwrap();
        a.put(&[entry(1)]).unwrap();
        let rows: usize = read_log(a.log_path.as_ref().unwrap()).unwrap().iter().map(|b| b.num_rows()).sum();
        assert_eq!(rows, 1, "a key already stored is not written again");
        // The lock is shared within this process, and refused to read-only handles' puts.
        let mut b = GenerationStore::open(dir.path()).unwrap();
        b.put(&[entry(2)]).unwrap();
        assert!(GenerationStore::read_only(dir.path()).unwrap().put(&[entry(3)]).is_err());
        let held = fs::File::open(dir.path().join("generation/.lock")).unwrap();
        assert!(held.try_lock().is_err(), "another process would wait");
    }

    #[test]
    fn two_handles_write_separate_logs() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = GenerationStore::open(dir.path()).unwrap();
        let mut b = GenerationStore::open(dir.path()).unwrap();
        a.put(&[entry(1)]).unwrap();
        b.put(&[entry(2)]).unwrap();
        drop((a, b));
        assert_eq!(GenerationStore::open(dir.path()).unwrap().len(), 2);
    }
}
