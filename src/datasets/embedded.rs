//! The vendored data directory, embedded in the binary (`build.rs`), so an installed `candor`
//! needs no source checkout. On first use it is written to the cache
//! (`$XDG_CACHE_HOME/candor/data-<digest>/`, or `~/.cache/…`) once, complete or not at all: the
//! files go to a private temporary directory that is renamed into place, so concurrent
//! processes and a killed one never leave a half-written copy that others would read.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

mod files {
    include!(concat!(env!("OUT_DIR"), "/embedded_data.rs"));
}

pub use files::{DIGEST, FILES};

/// The embedded data directory's copy under `cache` (Candor's cache directory), written if
/// missing.
pub fn materialize(cache: &Path) -> Result<PathBuf> {
    let dir = cache.join(format!("data-{DIGEST}"));
    if dir.join(COMPLETE).is_file() {
        return Ok(dir);
    }
    let io = |path: &Path, e: std::io::Error| Error::io(path, e);
    std::fs::create_dir_all(cache).map_err(|e| io(cache, e))?;
    let tmp =
        tempfile::Builder::new().prefix(&format!(".data-{DIGEST}-")).tempdir_in(cache).map_err(|e| io(cache, e))?;
    for (rel, bytes) in FILES {
        let path = tmp.path().join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        }
        std::fs::write(&path, bytes).map_err(|e| io(&path, e))?;
    }
    std::fs::write(tmp.path().join(COMPLETE), DIGEST).map_err(|e| io(tmp.path(), e))?;
    let tmp = tmp.keep();
    let mut tries = 0;
    loop {
        match std::fs::rename(&tmp, &dir) {
            Ok(()) => return Ok(dir),
            // Another process put its complete copy in place first: use it.
            Err(_) if dir.join(COMPLETE).is_file() => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Ok(dir);
            }
            // A directory without the mark was not written by this protocol (edited by
            // hand): set it aside and put the complete copy in its place.
            Err(_) if dir.is_dir() && tries == 0 => {
                tries += 1;
                let stale = cache.join(format!(".data-{DIGEST}-stale-{}", std::process::id()));
                std::fs::rename(&dir, &stale).map_err(|e| io(&dir, e))?;
                let _ = std::fs::remove_dir_all(&stale);
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(io(&dir, e));
            }
        }
    }
}

/// Written last, inside the copy: a directory without it is not a copy.
const COMPLETE: &str = ".complete";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_copy_holds_every_file_of_the_checkout_byte_for_byte_and_is_written_once() {
        let checkout = Path::new(env!("CARGO_MANIFEST_DIR")).join("data");
        let cache = tempfile::tempdir().unwrap();
        let dirs: Vec<PathBuf> = std::thread::scope(|s| {
            let runs: Vec<_> = (0..4).map(|_| s.spawn(|| materialize(cache.path()).unwrap())).collect();
            runs.into_iter().map(|r| r.join().unwrap()).collect()
        });
        assert!(dirs.iter().all(|d| *d == dirs[0]), "{dirs:?}");
        let mut n = 0;
        for entry in walk(&checkout) {
            let rel = entry.strip_prefix(&checkout).unwrap();
            assert_eq!(std::fs::read(dirs[0].join(rel)).unwrap(), std::fs::read(&entry).unwrap(), "{rel:?}");
            n += 1;
        }
        assert_eq!(n, FILES.len());
        // Nothing half-written is left beside the copy.
        let names: Vec<_> = std::fs::read_dir(cache.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
        // A copy without its completion mark (a killed writer) is not used as is.
        std::fs::remove_file(dirs[0].join(COMPLETE)).unwrap();
        std::fs::remove_file(dirs[0].join("README.md")).unwrap();
        let again = materialize(cache.path()).unwrap();
        assert_eq!(again, dirs[0]);
        assert!(again.join("README.md").is_file() && again.join(COMPLETE).is_file());
        let names: Vec<_> = std::fs::read_dir(cache.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
        }
        out
    }
}
