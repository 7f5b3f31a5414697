//! Reading a stream's Delta log the way Candor trusts it: every `_delta_log/<version>.json`
//! from 0 on, each checked against the checksum of its actions that Candor wrote into its own
//! `commitInfo` ([`ACTIONS_SHA256`]), then replayed (`add` makes a file live, `remove` takes it
//! away). A version missing in the middle, a line that is not JSON, a commit without Candor's
//! checksum or whose actions no longer match it is an error naming the log file; so is a file
//! whose tags lack its checksum or row count. A flipped bit in a log is therefore either
//! detected here or in a field nothing reads (a timestamp).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// `commitInfo` key holding the SHA-256 of the commit's other actions (canonical JSON, one
/// per line, in order).
pub const ACTIONS_SHA256: &str = "candor.actions_sha256";
/// `add` tag: the SHA-256 of the data file's bytes.
pub const TAG_SHA256: &str = "candor.sha256";
/// `add` tag: the data file's row count (also in `stats.numRecords`; both must agree).
pub const TAG_ROWS: &str = "candor.rows";
/// `add` tag: the epoch (logical time) the file belongs to.
pub const TAG_EPOCH: &str = "candor.epoch";
/// `add` tag: the id of the write that made the file (one per epoch write).
pub const TAG_WRITE: &str = "candor.write";

/// The checksum of a commit as Candor writes and checks it: its actions but `commitInfo`
/// (canonical JSON, one per line, in order), then Candor's own `candor.*` entries of
/// `commitInfo` (but the checksum itself), so the epoch a commit belongs to is covered too.
pub fn actions_digest(
    actions: &[deltalake_core::kernel::Action],
    meta: &serde_json::Map<String, Value>,
) -> Result<String> {
    let mut values = Vec::with_capacity(actions.len());
    for a in actions {
        let v = serde_json::to_value(a).map_err(|e| Error::Internal(format!("a Delta action as JSON: {e}")))?;
        if v.get("commitInfo").is_none() {
            values.push(v);
        }
    }
    Ok(digest(&values, meta))
}

fn digest(actions: &[Value], info: &serde_json::Map<String, Value>) -> String {
    let mut h = Sha256::new();
    for v in actions {
        h.update(v.to_string().as_bytes());
        h.update(b"\n");
    }
    let own: BTreeMap<&String, &Value> =
        info.iter().filter(|(k, _)| k.starts_with("candor.") && k.as_str() != ACTIONS_SHA256).collect();
    h.update(serde_json::to_string(&own).expect("plain JSON").as_bytes());
    hex(&h.finalize())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One data file a table's log lists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedFile {
    /// Relative to the table directory, decoded.
    pub rel: String,
    pub size: u64,
    pub rows: u64,
    pub sha256: String,
    pub epoch: Option<u64>,
    pub write: Option<String>,
    /// The table version that added it.
    pub added_in: u64,
}

/// One commit's Candor metadata.
#[derive(Clone, Debug)]
pub struct Commit {
    pub version: u64,
    pub path: PathBuf,
    /// The version file's length and modification time when it was read and checked.
    pub stamp: Stamp,
    pub info: serde_json::Map<String, Value>,
    pub adds: Vec<String>,
    pub removes: Vec<String>,
}

/// A table's log, checked and replayed.
#[derive(Clone, Debug, Default)]
pub struct TableLog {
    /// Latest version (None: no log yet).
    pub version: Option<u64>,
    /// Files live at the latest version, by relative path.
    pub live: BTreeMap<String, LoggedFile>,
    /// Every file any version added (live or removed since), by relative path.
    pub ever: BTreeMap<String, LoggedFile>,
    pub commits: Vec<Commit>,
}

/// A file's length and modification time: a version file read and checked before is read
/// again if either changed (an edit or a flipped bit written back), so damage to a log is
/// named by a long-lived reader too, not only by the next process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
}

fn stamp(path: &Path) -> Result<Stamp> {
    let m = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    Ok(Stamp { len: m.len(), modified: m.modified().ok() })
}

/// The `_delta_log` version files of a table, in order; an error for a gap.
fn versions(log_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match std::fs::read_dir(log_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(log_dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io(log_dir, e))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if let Some(stem) = name.strip_suffix(".json")
            && stem.len() == 20
            && stem.bytes().all(|b| b.is_ascii_digit())
        {
            out.push((stem.parse().expect("20 digits"), path));
        }
    }
    out.sort();
    for (i, (v, path)) in out.iter().enumerate() {
        if *v != i as u64 {
            return Err(Error::integrity(path, format!("version {i} is missing from the Delta log (the next is {v})")));
        }
    }
    Ok(out)
}

fn decode_path(p: &str) -> Option<String> {
    crate::identity::percent_decode(p)
}

/// Reads and checks the log of the table in `table`.
pub fn read(table: &Path) -> Result<TableLog> {
    read_since(table, None)
}

/// [`read`], reading only the versions after `known`'s (a log of this table read and checked
/// before, by this process): a log is only ever appended to. The versions are still listed
/// every time, so a version missing in the middle is still an error; a log with fewer versions
/// than `known` is read whole.
pub fn read_since(table: &Path, known: Option<TableLog>) -> Result<TableLog> {
    let all = versions(&table.join("_delta_log"))?;
    let unchanged = |k: &TableLog| -> Result<bool> {
        for c in &k.commits {
            match all.get(c.version as usize) {
                Some((_, path)) if *path == c.path && stamp(path)? == c.stamp => {}
                _ => return Ok(false),
            }
        }
        Ok(true)
    };
    let (mut log, after) = match known.and_then(|k| k.version.map(|v| (k, v))) {
        Some((k, v)) if (all.len() as u64) > v && unchanged(&k)? => (k, Some(v)),
        _ => (TableLog::default(), None),
    };
    for (version, path) in all.into_iter().filter(|(v, _)| after.is_none_or(|a| *v > a)) {
        let stamp = stamp(&path)?;
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let text = std::str::from_utf8(&bytes).map_err(|_| Error::integrity(&path, "not UTF-8 text"))?;
        let mut info = None;
        let mut actions = Vec::new();
        for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(line)
                .map_err(|e| Error::integrity(&path, format!("line {} is not JSON: {e}", n + 1)))?;
            match v.get("commitInfo") {
                Some(Value::Object(i)) => {
                    if info.replace(i.clone()).is_some() {
                        return Err(Error::integrity(&path, "two commitInfo actions"));
                    }
                }
                Some(_) => return Err(Error::integrity(&path, format!("line {}: commitInfo is not an object", n + 1))),
                None => actions.push((n + 1, v)),
            }
        }
        let info = info.ok_or_else(|| Error::integrity(&path, "no commitInfo (damaged, or not written by Candor)"))?;
        let want = info.get(ACTIONS_SHA256).and_then(Value::as_str).ok_or_else(|| {
            Error::integrity(&path, format!("commitInfo has no `{ACTIONS_SHA256}` (damaged, or not written by Candor)"))
        })?;
        let values: Vec<Value> = actions.iter().map(|(_, v)| v.clone()).collect();
        if digest(&values, &info) != want {
            return Err(Error::integrity(&path, "the commit's actions do not match their checksum"));
        }
        let mut commit = Commit { version, path: path.clone(), stamp, info, adds: Vec::new(), removes: Vec::new() };
        for (line, v) in actions {
            let Some((kind, body)) = v.as_object().and_then(|o| o.iter().next()) else {
                return Err(Error::integrity(&path, format!("line {line}: not an action")));
            };
            match kind.as_str() {
                "add" => {
                    let f =
                        logged_file(body, version).map_err(|m| Error::integrity(&path, format!("line {line}: {m}")))?;
                    commit.adds.push(f.rel.clone());
                    log.ever.insert(f.rel.clone(), f.clone());
                    log.live.insert(f.rel.clone(), f);
                }
                "remove" => {
                    let rel = body
                        .get("path")
                        .and_then(Value::as_str)
                        .and_then(decode_path)
                        .ok_or_else(|| Error::integrity(&path, format!("line {line}: remove without a path")))?;
                    if log.live.remove(&rel).is_none() {
                        return Err(Error::integrity(
                            &path,
                            format!("line {line}: removes `{rel}`, which is not in the table"),
                        ));
                    }
                    commit.removes.push(rel);
                }
                "protocol" | "metaData" | "txn" => {}
                other => {
                    return Err(Error::integrity(&path, format!("line {line}: unknown action `{other}`")));
                }
            }
        }
        log.commits.push(commit);
        log.version = Some(version);
    }
    Ok(log)
}

fn logged_file(add: &Value, version: u64) -> std::result::Result<LoggedFile, String> {
    let rel = add.get("path").and_then(Value::as_str).and_then(decode_path).ok_or("add without a valid path")?;
    if rel.starts_with('/') || rel.split('/').any(|s| s == ".." || s.is_empty()) || rel.contains("://") {
        return Err(format!("add path `{rel}` leaves the table"));
    }
    let size = add.get("size").and_then(Value::as_u64).ok_or("add without a size")?;
    let tags = add.get("tags").and_then(Value::as_object).ok_or("add without Candor's tags")?;
    let tag = |k: &str| tags.get(k).and_then(Value::as_str);
    let sha256 = tag(TAG_SHA256).ok_or("add without its checksum tag")?.to_string();
    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("add with a malformed checksum tag".into());
    }
    let rows: u64 = tag(TAG_ROWS).and_then(|r| r.parse().ok()).ok_or("add without its row-count tag")?;
    let stats: Value = add
        .get("stats")
        .and_then(Value::as_str)
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or("add without statistics")?;
    if stats.get("numRecords").and_then(Value::as_u64) != Some(rows) {
        return Err(format!("add `{rel}`: the row count in its statistics differs from its tag ({rows})"));
    }
    let epoch = match tag(TAG_EPOCH) {
        Some(e) => Some(e.parse().map_err(|_| "add with a malformed epoch tag")?),
        None => None,
    };
    Ok(LoggedFile { rel, size, rows, sha256, epoch, write: tag(TAG_WRITE).map(str::to_string), added_in: version })
}
