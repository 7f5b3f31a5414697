//! Kafka captures: the stream's input topics saved as JSON lines, so a live run can be
//! replayed later without a broker (`candor capture`, then `candor replay --capture`).
//!
//! One line per message: `topic`, `partition`, `offset`, `timestamp` (ms; kcat's `ts` is
//! read too), `key`, and `payload` as text, or `payload_base64` when the bytes are not UTF-8
//! (so a malformed message replays byte for byte). kcat's `-J` output has the same fields.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Topics;
use super::kafka::{self, Connection};
use crate::error::{Error, Location, Result};

/// One captured message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Captured {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    #[serde(default, alias = "ts", skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<i64>,
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub payload: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_base64: Option<String>,
}

impl Captured {
    fn of(topic: &str, r: kafka::Record) -> Captured {
        let (payload, payload_base64) = match r.payload {
            None => (None, None),
            Some(b) => match String::from_utf8(b) {
                Ok(s) => (Some(s), None),
                Err(e) => (None, Some(super::messages::base64(e.as_bytes()))),
            },
        };
        Captured {
            topic: topic.to_string(),
            partition: r.partition,
            offset: r.offset,
            timestamp: r.timestamp,
            key: r.key.map(|k| String::from_utf8_lossy(&k).into_owned()),
            payload,
            payload_base64,
        }
    }

    /// The message's bytes as they were on the topic.
    pub fn bytes(&self) -> std::result::Result<Option<Vec<u8>>, String> {
        match (&self.payload, &self.payload_base64) {
            (_, Some(b)) => decode(b).map(Some),
            (Some(s), None) => Ok(Some(s.clone().into_bytes())),
            (None, None) => Ok(None),
        }
    }
}

/// A `payload_base64` field's bytes.
fn decode(b: &str) -> std::result::Result<Vec<u8>, String> {
    base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b)
        .map_err(|e| format!("`payload_base64` is not base64: {e}"))
}

/// Reads the stream's two input topics from the beginning into `out` (JSON lines); returns
/// how many messages were written. Stops once no message came for `idle`.
pub fn capture(conn: &Connection, topics: &Topics, out: &Path, idle: Duration) -> Result<usize> {
    let mut all = Vec::new();
    for topic in [&topics.checkpoints, &topics.answers] {
        all.extend(kafka::read_all(conn, topic, idle, None)?.into_iter().map(|r| Captured::of(topic, r)));
    }
    let all = in_order(all);
    let tmp = out.with_extension("partial");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?);
    for c in &all {
        serde_json::to_writer(&mut f, c).map_err(|e| Error::io(&tmp, e.into()))?;
        f.write_all(b"\n").map_err(|e| Error::io(&tmp, e))?;
    }
    f.into_inner().map_err(|e| Error::io(&tmp, e.into_error()))?.sync_all().map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
    Ok(all.len())
}

/// Reads a capture file; a line that is not a captured message is an error naming the line.
pub fn read(path: &Path) -> Result<Vec<Captured>> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (n, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| Error::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let c: Captured = serde_json::from_str(&line).map_err(|e| {
            Error::input(Location::file(path).line(n as u64 + 1), format!("not a captured Kafka message: {e}"))
        })?;
        // Only base64 can be malformed; text payloads are decoded when replayed.
        if let Some(Err(e)) = c.payload_base64.as_deref().map(decode) {
            return Err(Error::input(Location::file(path).line(n as u64 + 1), e));
        }
        out.push(c);
    }
    Ok(in_order(out))
}

/// The order a replay feeds messages in: each partition's messages by offset (as a consumer
/// reads them), partitions interleaved by timestamp (as they arrived in the live run).
pub fn in_order(mut all: Vec<Captured>) -> Vec<Captured> {
    all.sort_by(|a, b| {
        (a.timestamp.unwrap_or(0), &a.topic, a.partition, a.offset).cmp(&(
            b.timestamp.unwrap_or(0),
            &b.topic,
            b.partition,
            b.offset,
        ))
    });
    // Timestamps need not grow with offsets: give each partition's slots back to its
    // messages in offset order.
    let mut by_partition: BTreeMap<(String, i32), Vec<Captured>> = BTreeMap::new();
    let slots: Vec<(String, i32)> = all.iter().map(|c| (c.topic.clone(), c.partition)).collect();
    for c in all {
        by_partition.entry((c.topic.clone(), c.partition)).or_default().push(c);
    }
    for v in by_partition.values_mut() {
        v.sort_by_key(|c| std::cmp::Reverse(c.offset));
    }
    slots.into_iter().map(|k| by_partition.get_mut(&k).and_then(Vec::pop).expect("one message per slot")).collect()
}
