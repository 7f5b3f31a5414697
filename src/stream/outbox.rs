//! Publishing a committed epoch's rows on a thread of its own, so that serialising and
//! producing the output messages overlaps with reading and evaluating the next checkpoints.
//!
//! An epoch counts as published only once every one of its messages is delivered: the
//! outbox reports it back ([`Outbox::delivered`]) after its producer's flush, and only then
//! does the stream mark it published in its state. Until then a crash leaves it unpublished
//! and the next run publishes it again, byte for byte (the dedupe contract of
//! `schemas/kafka/output.json`).

use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;
use std::time::Instant;

use serde::Serialize;

use super::kafka::{Connection, Publisher};
use super::messages::SCHEMA_VERSION;
use crate::error::{Error, Result};
use crate::records::{Observation, Response, Verdict};
use crate::schema::Record;

/// One committed epoch's outputs.
pub struct Job {
    pub epoch: u64,
    pub responses: (String, Vec<Response>),
    pub verdicts: (String, Vec<Verdict>),
    pub observations: (String, Vec<Observation>),
    /// Topic, key and payload of each statistics message, sent after the rows.
    pub statistics: Vec<(String, String, Vec<u8>)>,
}

/// Epochs waiting at most this many deep before [`Outbox::submit`] blocks (back-pressure).
const DEPTH: usize = 16;

/// The publishing thread and its two channels.
pub struct Outbox {
    jobs: Option<SyncSender<Job>>,
    done: Receiver<Result<(u64, u64, Instant)>>,
    thread: Option<JoinHandle<()>>,
    /// Messages delivered so far.
    pub published: u64,
}

impl Outbox {
    pub fn start(conn: &Connection) -> Result<Self> {
        let publisher = Publisher::new(conn)?;
        let (jobs, rx) = mpsc::sync_channel::<Job>(DEPTH);
        let (tx, done) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("candor-outbox".into())
            .spawn(move || {
                for job in rx {
                    let epoch = job.epoch;
                    let sent =
                        publish(&publisher, job).and_then(|n| publisher.flush().map(|()| (epoch, n, Instant::now())));
                    let failed = sent.is_err();
                    if tx.send(sent).is_err() || failed {
                        return;
                    }
                }
            })
            .map_err(|e| Error::system("starting the outbox thread", e))?;
        Ok(Outbox { jobs: Some(jobs), done, thread: Some(thread), published: 0 })
    }

    /// Queues an epoch's outputs, waiting while `DEPTH` (16) epochs are already queued.
    pub fn submit(&mut self, job: Job) -> Result<()> {
        let jobs = self.jobs.as_ref().expect("submit after finish");
        if jobs.send(job).is_err() {
            // The thread stopped on an error: report it.
            return Err(self.failure());
        }
        Ok(())
    }

    /// Epochs delivered since the last call (not blocking); the first delivery error, if any.
    pub fn delivered(&mut self) -> Result<Vec<(u64, Instant)>> {
        let mut out = Vec::new();
        while let Ok(r) = self.done.try_recv() {
            let (epoch, n, at) = r?;
            self.published += n;
            out.push((epoch, at));
        }
        Ok(out)
    }

    /// Waits until everything queued is delivered; returns the epochs delivered since the
    /// last [`Outbox::delivered`].
    pub fn finish(&mut self) -> Result<Vec<(u64, Instant)>> {
        self.jobs = None;
        let mut out = Vec::new();
        for r in self.done.iter() {
            let (epoch, n, at) = r?;
            self.published += n;
            out.push((epoch, at));
        }
        if let Some(t) = self.thread.take() {
            t.join().map_err(|_| Error::Internal("the outbox thread panicked".into()))?;
        }
        Ok(out)
    }

    fn failure(&mut self) -> Error {
        self.done.iter().find_map(|r| r.err()).unwrap_or_else(|| Error::Internal("the outbox thread stopped".into()))
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends one epoch's messages; returns how many.
fn publish(p: &Publisher, job: Job) -> Result<u64> {
    let mut n = send_rows(p, &job.responses.0, job.epoch, &job.responses.1, |r| &r.response_key)?;
    n += send_rows(p, &job.verdicts.0, job.epoch, &job.verdicts.1, |r| &r.response_key)?;
    n += send_rows(p, &job.observations.0, job.epoch, &job.observations.1, |r| &r.response_key)?;
    for (topic, key, payload) in &job.statistics {
        p.send(topic, key, payload)?;
        n += 1;
    }
    Ok(n)
}

fn send_rows<R: Record + Serialize>(
    p: &Publisher,
    topic: &str,
    epoch: u64,
    rows: &[R],
    key: impl Fn(&R) -> &String,
) -> Result<u64> {
    /// One output message (`schemas/kafka/output.json`), serialised without a JSON tree.
    #[derive(Serialize)]
    struct Out<'r, R> {
        schema_version: u64,
        stream: &'static str,
        key: &'r str,
        epoch: u64,
        seq: usize,
        record: &'r R,
    }
    let mut value = Vec::with_capacity(512);
    for (seq, r) in rows.iter().enumerate() {
        let out = Out { schema_version: SCHEMA_VERSION, stream: R::STREAM, key: key(r), epoch, seq, record: r };
        value.clear();
        serde_json::to_writer(&mut value, &out).map_err(|e| Error::Internal(format!("serialising a row: {e}")))?;
        p.send(topic, key(r), &value)?;
    }
    Ok(rows.len() as u64)
}
