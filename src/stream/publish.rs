//! Publishing: dead letters (sent from the evaluating thread and flushed before every save)
//! and a committed epoch's rows and statistics (handed to the [`outbox`] thread). A capture
//! replay publishes nothing.
//!
//! An epoch's rows are the batches its dataflow wrote or, for streams not there (after a
//! restart, or a checkpoint Candor generated), the rows read back from the archive. Either
//! way the same rows in the same order, so a message published again is byte-identical.

use std::collections::BTreeMap;
use std::time::Instant;

use arrow::record_batch::RecordBatch;

use super::messages::{self, Reject, SCHEMA_VERSION};
use super::{StreamOptions, Topics, kafka, outbox};
use crate::archive::Archive;
use crate::error::Result;
use crate::records::{Observation, Response, Verdict};
use crate::schema::Record;

/// Epochs the outbox delivered, with when.
pub(super) type Delivered = Vec<(u64, Instant)>;

/// One committed epoch's rows, as they are published.
pub(super) struct EpochRows {
    /// Empty unless every row is published.
    pub responses: Vec<Response>,
    /// Empty unless every row is published.
    pub verdicts: Vec<Verdict>,
    /// The observations as batches, always read (they feed the statistics).
    pub observation_batches: Vec<RecordBatch>,
    /// Empty unless every row is published.
    pub observations: Vec<Observation>,
}

impl EpochRows {
    /// An epoch's rows: `written`, what its dataflow wrote (by stream), or else the archive's.
    /// `rows`: whether responses and verdicts are published too.
    pub fn read(archive: &Archive, epoch: u64, written: &BTreeMap<String, RecordBatch>, rows: bool) -> Result<Self> {
        let responses: Vec<Response> = if rows { epoch_rows(archive, epoch, written)? } else { Vec::new() };
        let verdicts: Vec<Verdict> = if rows { epoch_rows(archive, epoch, written)? } else { Vec::new() };
        let observation_batches = epoch_batches::<Observation>(archive, epoch, written)?;
        let mut observations = Vec::new();
        for b in observation_batches.iter().filter(|_| rows) {
            observations.extend(Observation::from_batch(b)?);
        }
        Ok(EpochRows { responses, verdicts, observation_batches, observations })
    }
}

/// The stream's producers: none when replaying a capture.
pub(super) struct Publishing {
    topics: Topics,
    publish_rows: bool,
    /// Dead letters, sent from the evaluating thread and flushed before every save.
    dead_letters: Option<kafka::Publisher>,
    /// The output rows and statistics, sent on a thread of their own.
    outbox: Option<outbox::Outbox>,
}

impl Publishing {
    /// `live`: publishing to Kafka (false: replaying a capture).
    pub fn open(opts: &StreamOptions, live: bool) -> Result<Self> {
        Ok(Publishing {
            topics: opts.topics.clone(),
            publish_rows: opts.publish_rows,
            dead_letters: if live { Some(kafka::Publisher::new(&opts.connection)?) } else { None },
            outbox: if live { Some(outbox::Outbox::start(&opts.connection)?) } else { None },
        })
    }

    /// Whether responses and verdicts are published (not only statistics and dead letters).
    pub fn rows(&self) -> bool {
        self.publish_rows
    }

    /// Sends a message that cannot be used, with the reason and its original bytes, to the
    /// dead-letter topic.
    pub fn dead_letter(
        &self,
        topic: &str,
        partition: i32,
        offset: i64,
        payload: Option<&[u8]>,
        reject: &Reject,
    ) -> Result<()> {
        let original = payload.unwrap_or_default();
        let shown = std::str::from_utf8(original).ok().filter(|s| s.len() <= 4096);
        let letter = serde_json::json!({
            "schema_version": SCHEMA_VERSION,
            "source_topic": topic,
            "partition": partition,
            "offset": offset,
            "reason_kind": reject.kind,
            "reason": reject.reason,
            "original_base64": messages::base64(original),
            "original_text": shown,
        });
        let key = format!("{topic}/{partition}/{offset}");
        if let Some(p) = &self.dead_letters {
            p.send(&self.topics.dead_letters, &key, letter.to_string().as_bytes())?;
        }
        Ok(())
    }

    /// Queues one committed epoch's rows and its statistics messages (key, payload) for the
    /// outbox. Returns false when nothing is published (a replay): the epoch counts as
    /// published at once. Otherwise [`Publishing::poll`] reports it once delivered.
    pub fn submit(&mut self, epoch: u64, rows: EpochRows, statistics: Vec<(String, Vec<u8>)>) -> Result<bool> {
        let Some(outbox) = &mut self.outbox else {
            return Ok(false);
        };
        let t = self.topics.clone();
        let statistics = statistics.into_iter().map(|(key, stats)| (t.statistics.clone(), key, stats)).collect();
        outbox.submit(outbox::Job {
            epoch,
            responses: (t.responses, rows.responses),
            verdicts: (t.verdicts, rows.verdicts),
            observations: (t.observations, if self.publish_rows { rows.observations } else { Vec::new() }),
            statistics,
        })?;
        Ok(true)
    }

    /// Serves the dead-letter producer; returns the epochs the outbox delivered since the
    /// last call.
    pub fn poll(&mut self) -> Result<Delivered> {
        if let Some(p) = &self.dead_letters {
            p.poll();
        }
        match &mut self.outbox {
            Some(o) => o.delivered(),
            None => Ok(Vec::new()),
        }
    }

    /// Waits until every dead letter sent so far is delivered.
    pub fn flush_dead_letters(&self) -> Result<()> {
        match &self.dead_letters {
            Some(p) => p.flush(),
            None => Ok(()),
        }
    }

    /// Waits for every queued epoch to be delivered: the epochs delivered since the last
    /// [`Publishing::poll`] and the messages delivered in all (None when replaying).
    pub fn finish(&mut self) -> Result<Option<(Delivered, u64)>> {
        match &mut self.outbox {
            Some(o) => {
                let delivered = o.finish()?;
                Ok(Some((delivered, o.published)))
            }
            None => Ok(None),
        }
    }
}

/// One committed epoch's batches of a stream, in archive order: the batch its dataflow wrote
/// when there is one, else read back from the archive.
fn epoch_batches<R: Record>(
    archive: &Archive,
    epoch: u64,
    written: &BTreeMap<String, RecordBatch>,
) -> Result<Vec<RecordBatch>> {
    match written.get(R::STREAM) {
        Some(batch) => Ok(vec![batch.clone()]),
        None => archive.read_epoch(R::STREAM, epoch),
    }
}

/// One committed epoch's rows of a stream, in archive order (see [`epoch_batches`]).
fn epoch_rows<R: Record>(archive: &Archive, epoch: u64, written: &BTreeMap<String, RecordBatch>) -> Result<Vec<R>> {
    let mut out = Vec::new();
    for b in epoch_batches::<R>(archive, epoch, written)? {
        out.extend(R::from_batch(&b)?);
    }
    Ok(out)
}
