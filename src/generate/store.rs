//! The generation store: answers content-addressed by everything that determines them, written
//! durably before they move downstream, so re-running an experiment or resuming after a crash
//! (even `kill -9`) never pays for the same call twice.
//!
//! The store is the archive's `generation` stream (`schemas/generation.json`). Each writer
//! appends to its own Arrow IPC stream file, `generation/log-<time>-<pid>-<n>.arrows`, one
//! record batch per `put`, flushed and synced before `put` returns. A crash can leave a torn
//! last message; readers keep every complete message before it. pyarrow reads a log with
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

use arrow::ipc::writer::StreamWriter;
use sha2::{Digest, Sha256};

use super::{FinishReason, GenRequest, Generation};
use crate::error::{Error, Result};
use crate::schema::{self, Record};

crate::record! {
    /// One stored answer (`schemas/generation.json`).
    pub struct StoredGeneration in "generation" {
        pub key: String,
        pub fingerprint: String,
        pub system_prompt: Option<String>,
        pub prompt: String,
        pub decoding: String,
        pub sample_index: u32,
        pub output: String,
        pub finish_reason: String,
        pub prompt_tokens: u32,
        pub completion_tokens: u32,
        pub latency_ms: f64,
    }
}

/// A store entry to write: key, fingerprint, request, sample index, answer.
pub type Entry = (String, String, GenRequest, u32, Generation);

/// The generation store of one archive.
pub struct GenerationStore {
    dir: PathBuf,
    index: HashMap<String, Generation>,
    log: Option<StreamWriter<BufWriter<File>>>,
    log_path: Option<PathBuf>,
    puts: u64,
}

static LOG_COUNTER: AtomicU64 = AtomicU64::new(0);

impl GenerationStore {
    /// Opens the store under an archive root and loads every complete entry.
    pub fn open(archive_root: &Path) -> Result<Self> {
        let dir = archive_root.join(StoredGeneration::STREAM);
        fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let mut index = HashMap::new();
        let mut logs: Vec<PathBuf> = fs::read_dir(&dir)
            .map_err(|e| Error::io(&dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("log-") || n.starts_with("part-"))
            })
            .collect();
        logs.sort();
        for path in logs {
            for batch in crate::archive::read_segment(StoredGeneration::STREAM, &path)? {
                for g in StoredGeneration::from_batch(&batch)? {
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
        Ok(GenerationStore { dir, index, log: None, log_path: None, puts: 0 })
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
            File::open(&self.dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(&self.dir, e))?;
            self.log = Some(writer);
            self.log_path = Some(path);
        }
        let path = self.log_path.clone().expect("set with the log");
        let log = self.log.as_mut().expect("opened above");
        log.write(&batch).map_err(|e| Error::arrow(format!("writing {}", path.display()), e))?;
        log.flush().map_err(|e| Error::arrow(format!("writing {}", path.display()), e))?;
        log.get_mut().flush().map_err(|e| Error::io(&path, e))?;
        log.get_ref().get_ref().sync_data().map_err(|e| Error::io(&path, e))?;
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
