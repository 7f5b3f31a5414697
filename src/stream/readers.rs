//! The stream's readers: threads that each own some of the input partitions, read them and
//! parse every message, and hand the results in batches to the thread that evaluates.
//!
//! Process I of P owns the partitions p with p mod P = I; among its W readers (`-w W`),
//! reader w takes those with (p / P) mod W = w. One reader per partition and a FIFO channel
//! keep each partition's messages in order, which is all the offsets in the stream's state
//! need: the evaluating thread records a message's offset when it handles the message, so a
//! message read ahead but not handled before a crash is simply read again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::kafka::{self, Connection};
use super::messages::{self, Announcement, Answer, Reject};
use crate::error::{Error, Result};

/// Which input topic a message came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Checkpoints,
    Answers,
}

/// A parsed input message.
#[derive(Debug)]
pub enum Parsed {
    Announcement(Announcement),
    Answer(Answer),
}

/// One message as a reader hands it on: where it came from, its bytes (kept for the
/// dead-letter topic) and what parsing made of it.
#[derive(Debug)]
pub struct Incoming {
    pub source: Source,
    pub partition: i32,
    pub offset: i64,
    pub payload: Option<Vec<u8>>,
    pub parsed: std::result::Result<Parsed, Reject>,
}

/// Parses one message of `source`.
pub fn parse(source: Source, payload: Option<&[u8]>, max_bytes: usize) -> std::result::Result<Parsed, Reject> {
    match source {
        Source::Checkpoints => messages::parse_announcement(payload, max_bytes).map(Parsed::Announcement),
        Source::Answers => messages::parse_answer(payload, max_bytes).map(Parsed::Answer),
    }
}

/// Messages a reader gathers before handing them on (fewer when nothing more is fetched).
const BATCH: usize = 256;
/// Batches waiting per stream before readers block (back-pressure on a slow evaluation).
const DEPTH: usize = 64;

/// The reader threads and the channel they feed.
pub struct Readers {
    rx: Option<Receiver<Vec<Incoming>>>,
    /// Kept so the channel stays open (and `recv` waits) even when no reader owns a partition.
    _tx: SyncSender<Vec<Incoming>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Readers {
    /// Starts `workers` readers over `assigned`: (source, topic, partition, first offset).
    /// `first` is a consumer already connected (the one that looked up the partitions),
    /// taken by the first reader.
    pub fn start(
        conn: &Connection,
        first: BaseConsumer,
        group: &str,
        assigned: &[(Source, String, i32, Offset)],
        workers: usize,
        max_bytes: usize,
    ) -> Result<Readers> {
        let (tx, rx) = mpsc::sync_channel(DEPTH);
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let mut first = Some(first);
        for w in 0..workers.max(1) {
            let mine: Vec<_> =
                assigned.iter().filter(|(_, _, p, _)| *p as usize % workers.max(1) == w).cloned().collect();
            if mine.is_empty() {
                continue;
            }
            let consumer = match first.take() {
                Some(c) => c,
                None => kafka::consumer(conn, group)?,
            };
            let mut tpl = TopicPartitionList::new();
            for (_, topic, p, offset) in &mine {
                tpl.add_partition_offset(topic, *p, *offset)
                    .map_err(|e| Error::backend("kafka", format!("assigning {topic}/{p}: {e}")))?;
            }
            consumer.assign(&tpl).map_err(|e| Error::backend("kafka", format!("assigning partitions: {e}")))?;
            let sources: Vec<(String, Source)> = mine.iter().map(|(s, t, _, _)| (t.clone(), *s)).collect();
            let (tx, stop) = (tx.clone(), stop.clone());
            let thread = std::thread::Builder::new()
                .name(format!("candor-reader-{w}"))
                .spawn(move || read(consumer, &sources, &tx, &stop, max_bytes))
                .map_err(|e| Error::system("starting a reader thread", e))?;
            threads.push(thread);
        }
        Ok(Readers { rx: Some(rx), _tx: tx, stop, threads })
    }

    /// The next batch, waiting up to `wait` for one.
    pub fn recv(&self, wait: Duration) -> Option<Vec<Incoming>> {
        let rx = self.rx.as_ref().expect("readers running");
        rx.recv_timeout(wait).ok()
    }

    /// A batch already waiting, if any.
    pub fn try_recv(&self) -> Option<Vec<Incoming>> {
        self.rx.as_ref().expect("readers running").try_recv().ok()
    }

    /// Stops the readers (what they read and did not hand on is read again next run).
    pub fn stop(mut self) -> Result<()> {
        self.halt()
    }

    fn halt(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        // Unblocks a reader waiting on a full channel.
        self.rx = None;
        for t in self.threads.drain(..) {
            t.join().map_err(|_| Error::Internal("a reader thread panicked".into()))?;
        }
        Ok(())
    }
}

impl Drop for Readers {
    fn drop(&mut self) {
        let _ = self.halt();
    }
}

fn read(
    consumer: BaseConsumer,
    sources: &[(String, Source)],
    tx: &SyncSender<Vec<Incoming>>,
    stop: &AtomicBool,
    max_bytes: usize,
) {
    let mut batch = Vec::with_capacity(BATCH);
    while !stop.load(Ordering::Relaxed) {
        let wait = if batch.is_empty() { Duration::from_millis(50) } else { Duration::ZERO };
        match consumer.poll(wait) {
            Some(Ok(m)) => {
                let source = sources.iter().find(|(t, _)| t == m.topic()).map_or(Source::Answers, |(_, s)| *s);
                let payload = m.payload().map(<[u8]>::to_vec);
                let parsed = parse(source, payload.as_deref(), max_bytes);
                batch.push(Incoming { source, partition: m.partition(), offset: m.offset(), payload, parsed });
                if batch.len() < BATCH {
                    continue;
                }
            }
            // The client reconnects by itself (a broker restart shows up here).
            Some(Err(e)) => {
                eprintln!("candor stream: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            None => {}
        }
        if !batch.is_empty() && tx.send(std::mem::replace(&mut batch, Vec::with_capacity(BATCH))).is_err() {
            return;
        }
    }
}
