//! `candor stream`: continuous evaluation fed by Kafka, effectively once.
//!
//! Two input topics: checkpoint announcements (`<prefix>checkpoints`) and answer records
//! (`<prefix>answers`, for generations made elsewhere). A checkpoint is evaluated once it is
//! announced and all the answers its announcement counts have arrived: its responses go
//! through the same scoring dataflow as `candor import` and `candor replay`
//! ([`crate::score::stage::score_responses`]) into the archive as one epoch, and then its responses,
//! verdicts, observations and statistics updates (per checkpoint, and the paper's per-family
//! tests) are published. Messages that cannot be used go to `<prefix>dead-letters` with the
//! reason and the original bytes. Formats: `schemas/kafka/*.json`.
//!
//! Threads: [`readers`] read and parse the input partitions; this module's loop handles the
//! parsed messages in partition order, feeds each complete checkpoint to the timely workers
//! and, while they score and archive it, reads on; [`outbox`] publishes. A capture of the
//! input topics ([`capture`]) replays through the same loop without a broker
//! ([`replay_capture`]).
//!
//! Duties, one module each; the loop's `Streamer` only passes things between them:
//! - reading: [`readers`] (threads, partition assignment), [`kafka`] (the client), [`messages`]
//!   (formats and parsing), [`capture`] (captures of the input topics);
//! - state: `state` (offsets, the announcements registry, pending answers, what the archive
//!   holds, and the admission rules: repeats, conflicts, late answers, complete checkpoints);
//! - evaluation: `evaluate` (the scoring dataflow and the generation fallback);
//! - publishing: `statistics` (the per-checkpoint and per-family statistics states and their
//!   messages), `publish` (dead letters, an epoch's rows) and [`outbox`] (the sending thread).
//!
//! **Effectively once.** Consumer offsets are never committed to Kafka: they live in
//! `stream-state.json` in the archive, saved atomically together with the operator state
//! (announcements and answers not yet archived, those of checkpoints whose evaluation is in
//! flight included) and the set of epochs already published, at most every `snapshot_every`
//! while reading and whenever the stream waits for its evaluations. After a crash Candor
//! re-reads from the saved offsets; an answer whose response key is already archived
//! is skipped, an epoch already committed is never re-evaluated, and an epoch committed but
//! not yet marked published is published again. Outputs therefore may repeat after a crash,
//! but only byte-identical messages with the same key and sequence number (see
//! `schemas/kafka/output.json`: consumers drop repeats of `(key, epoch, seq)`), because the
//! archive a message is read from (or the batch its dataflow wrote, which is what the archive
//! holds) is a deterministic function of the input.

pub mod capture;
mod evaluate;
pub mod hook;
pub mod kafka;
pub mod messages;
pub mod outbox;
mod publish;
pub mod readers;
mod state;
mod statistics;
#[cfg(test)]
mod tests;
pub mod watch;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use arrow::record_batch::RecordBatch;
use rdkafka::Offset;
use serde::Serialize;

use crate::archive::Archive;
use crate::dataflow::Cluster;
use crate::error::{Error, Location, Result};
use crate::score::refusal::RefusalRules;
use readers::{Incoming, Parsed, Readers, Source};
pub use state::{Announced, PendingAnswers, STATE_FILE, StreamState};

/// The topics of one Candor stream.
#[derive(Clone, Debug)]
pub struct Topics {
    pub checkpoints: String,
    pub answers: String,
    pub responses: String,
    pub verdicts: String,
    pub observations: String,
    pub statistics: String,
    pub dead_letters: String,
}

impl Topics {
    /// `<prefix>checkpoints`, `<prefix>answers`, `<prefix>responses`, … .
    pub fn with_prefix(prefix: &str) -> Topics {
        let t = |name: &str| format!("{prefix}{name}");
        Topics {
            checkpoints: t("checkpoints"),
            answers: t("answers"),
            responses: t("responses"),
            verdicts: t("verdicts"),
            observations: t("observations"),
            statistics: t("statistics"),
            dead_letters: t("dead-letters"),
        }
    }

    pub fn outputs(&self) -> [&str; 5] {
        [&self.responses, &self.verdicts, &self.observations, &self.statistics, &self.dead_letters]
    }

    /// Every topic of the stream: the two inputs, then the outputs.
    pub fn all(&self) -> [&str; 7] {
        let [a, b, c, d, e] = self.outputs();
        [&self.checkpoints, &self.answers, a, b, c, d, e]
    }
}

/// How `candor stream` runs.
#[derive(Clone, Debug)]
pub struct StreamOptions {
    pub connection: kafka::Connection,
    pub topics: Topics,
    /// Consumer group id (used for nothing but monitoring: offsets live in Candor's state).
    pub group: String,
    /// Messages larger than this go to the dead-letter topic.
    pub max_message_bytes: usize,
    /// Stop after this long without a message (for batch-like runs and tests).
    pub idle_exit: Option<Duration>,
    /// How often the state is saved between archive commits.
    pub snapshot_every: Duration,
    /// Partitions of the topics Candor creates when they are missing.
    pub partitions: i32,
    pub refusal: RefusalRules,
    /// The experiment whose `[[models]]` generate for announcements without answer records.
    pub experiment: Option<crate::config::Experiment>,
    /// Publish every evaluated row (responses, verdicts, observations) as well as the
    /// statistics; false: statistics and dead letters only (the rows stay in the archive).
    pub publish_rows: bool,
}

impl StreamOptions {
    /// The options of a capture replay ([`replay_capture`]): no broker, nothing published.
    pub fn for_replay(
        topic_prefix: &str,
        max_message_bytes: usize,
        refusal: RefusalRules,
        experiment: Option<crate::config::Experiment>,
    ) -> Self {
        StreamOptions {
            connection: Default::default(),
            topics: Topics::with_prefix(topic_prefix),
            group: String::new(),
            max_message_bytes,
            idle_exit: None,
            snapshot_every: Duration::from_secs(3600),
            partitions: 1,
            refusal,
            experiment,
            publish_rows: false,
        }
    }
}

/// What a stream run did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StreamReport {
    /// Messages read in this run.
    pub consumed: u64,
    /// Messages sent to the dead-letter topic in this run, by kind.
    pub dead_letters: BTreeMap<String, u64>,
    /// Checkpoints evaluated in this run.
    pub evaluated: Vec<String>,
    /// Messages already archived or already seen (re-read after a restart).
    pub skipped: u64,
    /// Messages published to the output topics in this run.
    pub published: u64,
    /// Epochs published again after a restart.
    pub republished: Vec<u64>,
    /// Model calls made by generating announced checkpoints, and answers the generation store
    /// already had (a restart re-pays nothing).
    pub model_calls: u64,
    pub from_store: u64,
    /// Seconds from the start of the run to the last evaluation's archive commit.
    pub seconds_to_last_evaluation: Option<f64>,
    /// Seconds from the start of the run until the last evaluation's outputs were delivered.
    pub seconds_to_last_publication: Option<f64>,
}

/// Runs the stream until `idle_exit` passes without a message (or forever).
pub fn run(cluster: &Cluster, archive: &Archive, opts: &StreamOptions) -> Result<StreamReport> {
    // Process 0 reads every input partition (its W reader threads split them, see
    // `readers`), keeps the state, writes the one archive and publishes; the W timely
    // workers of every process score (and generate) each round in one computation, rows
    // routed by trial, so the statistics are complete whatever the topics are keyed by.
    cluster.timely_config()?;
    if !cluster.is_leader() {
        take_part(cluster, archive, opts)?;
        return Ok(StreamReport::default());
    }
    let t = &opts.topics;
    kafka::create_topics(&opts.connection, &t.all(), opts.partitions)?;
    let mut s = Streamer::open(cluster, archive, opts, true)?;
    s.reconcile()?;

    let metadata = kafka::consumer(&opts.connection, &opts.group)?;
    let mut assigned = Vec::new();
    for (source, topic) in [(Source::Checkpoints, &t.checkpoints), (Source::Answers, &t.answers)] {
        for p in 0..kafka::partitions(&metadata, topic)? {
            let offset = match s.ledger.offset(&format!("{topic}/{p}")) {
                Some(o) => Offset::Offset(o),
                None => Offset::Beginning,
            };
            assigned.push((source, topic.clone(), p, offset));
        }
    }
    let readers =
        Readers::start(&opts.connection, metadata, &opts.group, &assigned, cluster.workers, opts.max_message_bytes)?;
    if crate::trace::stream() {
        eprintln!("reading from {:?} after starting", s.started.elapsed());
    }

    let mut last_message = Instant::now();
    loop {
        // A poll batch: wait for one batch of messages (briefly while rounds are in flight,
        // whose commits are taken in between), then take what the readers already have,
        // feeding each checkpoint to the workers as soon as it is complete.
        let polled = Instant::now();
        let mut taken = 0;
        let wait = if s.evaluator.in_flight() > 0 { Duration::from_millis(1) } else { Duration::from_millis(100) };
        let mut next = readers.recv(wait);
        while let Some(batch) = next {
            taken += batch.len();
            for m in batch {
                s.handle(m)?;
            }
            s.dispatch()?;
            last_message = Instant::now();
            next = if taken < 20_000 { readers.try_recv() } else { None };
        }
        if taken > 0 {
            s.consuming += polled.elapsed();
        }
        let busy = Instant::now();
        s.settle(false)?;
        if busy.elapsed() > Duration::from_millis(50) {
            // Idle means no message waiting, not time spent publishing.
            last_message = Instant::now();
        }
        s.poll_outputs()?;
        if s.ledger.dirty() && s.saved.elapsed() >= opts.snapshot_every {
            s.save()?;
        }
        let idle = opts.idle_exit.is_some_and(|idle| last_message.elapsed() >= idle);
        if idle && s.evaluator.in_flight() == 0 {
            break;
        }
    }
    readers.stop()?;
    s.finish()
}

/// What a process of a cluster other than process 0 does in `candor stream` and `candor
/// watch`: its workers take part in the one evaluation dataflow, fed by process 0, until
/// process 0 closes it. It reads no source and no archive, and keeps no state.
pub(crate) fn take_part(cluster: &Cluster, archive: &Archive, opts: &StreamOptions) -> Result<()> {
    let mut evaluator = evaluate::Evaluator::open(cluster, archive, opts)?;
    evaluator.stop()
}

/// Replays a capture of the input topics ([`capture`]) through the same evaluation as a
/// live run, publishing nothing: each checkpoint is evaluated as soon as it is complete,
/// so the archive holds the same responses, verdicts and observations as the live run's (in
/// both, an answer beyond a complete checkpoint's count is late, however messages were
/// batched).
pub fn replay_capture(
    cluster: &Cluster,
    archive: &Archive,
    opts: &StreamOptions,
    messages: Vec<capture::Captured>,
) -> Result<StreamReport> {
    let mut s = Streamer::open(cluster, archive, opts, false)?;
    s.reconcile()?;
    let t = &opts.topics;
    for c in messages {
        let source = if c.topic == t.checkpoints {
            Source::Checkpoints
        } else if c.topic == t.answers {
            Source::Answers
        } else {
            continue;
        };
        // A capture read by `capture::read` was checked already; one built otherwise may not be.
        let payload = c.bytes().map_err(|e| {
            Error::input(
                Location::default().field("payload_base64"),
                format!("{}/{}@{}: {e}", c.topic, c.partition, c.offset),
            )
        })?;
        let parsed = readers::parse(source, payload.as_deref(), opts.max_message_bytes);
        s.handle(Incoming { source, partition: c.partition, offset: c.offset, payload, parsed })?;
        s.evaluate_ready()?;
    }
    s.evaluate_ready()?;
    s.finish()
}

/// The coordinator of one run: hands each parsed message to the state, the checkpoints it
/// completes to the evaluator, and what an evaluation committed to the statistics and the
/// publishers; saves the state and keeps the run's report.
struct Streamer<'a> {
    archive: &'a Archive,
    opts: &'a StreamOptions,
    /// Offsets, announcements, pending answers, what the archive holds.
    ledger: state::Ledger<'a>,
    /// Scoring and the generation fallback.
    evaluator: evaluate::Evaluator<'a>,
    /// Per-checkpoint and per-family statistics.
    statistics: statistics::Statistics,
    /// Dead letters and the outbox.
    publishing: publish::Publishing,
    report: StreamReport,
    started: Instant,
    /// Time spent reading and parsing messages since the last evaluation (for the trace).
    consuming: Duration,
    /// When the state was last saved.
    saved: Instant,
    /// The statistics messages of the epochs not published to Kafka, kept for the caller
    /// (`candor watch`) when `Some`.
    kept: Option<Vec<(u64, statistics::Messages)>>,
}

impl<'a> Streamer<'a> {
    /// `live`: publishing to Kafka (false: replaying a capture).
    fn open(cluster: &'a Cluster, archive: &'a Archive, opts: &'a StreamOptions, live: bool) -> Result<Self> {
        let ledger = state::Ledger::open(archive)?;
        let evaluator = evaluate::Evaluator::open(cluster, archive, opts)?;
        let unpublished = ledger.unpublished().into_iter().map(|(epoch, _)| epoch).collect();
        let statistics = statistics::Statistics::load(archive, &unpublished)?;
        Ok(Streamer {
            archive,
            opts,
            ledger,
            evaluator,
            statistics,
            publishing: publish::Publishing::open(opts, live)?,
            report: StreamReport::default(),
            started: Instant::now(),
            consuming: Duration::ZERO,
            saved: Instant::now(),
            kept: None,
        })
    }

    /// Brings the saved state in line with the archive after a crash: checkpoints committed
    /// since the last save are dropped from the state, unpublished epochs are published,
    /// and checkpoints whose answers were all in are evaluated.
    fn reconcile(&mut self) -> Result<()> {
        self.ledger.drop_committed();
        let unpublished = self.ledger.unpublished();
        self.report.republished.extend(unpublished.iter().map(|(epoch, _)| *epoch));
        self.publish(unpublished.into_iter().map(|(epoch, key)| (epoch, key, BTreeMap::new())).collect())?;
        self.ledger.queue_complete();
        self.evaluate_ready()
    }

    /// Serves the dead-letter producer and marks what the outbox delivered as published.
    fn poll_outputs(&mut self) -> Result<()> {
        let delivered = self.publishing.poll()?;
        self.mark_published(delivered);
        Ok(())
    }

    /// Waits for every round in flight to be committed and every output to be delivered,
    /// then saves the state for the last time.
    fn finish(mut self) -> Result<StreamReport> {
        self.settle(true)?;
        if let Some((delivered, published)) = self.publishing.finish()? {
            self.report.published = published;
            self.mark_published(delivered);
        }
        self.save()?;
        Ok(self.report)
    }

    /// Marks epochs the outbox delivered as published.
    fn mark_published(&mut self, delivered: publish::Delivered) {
        for (epoch, at) in delivered {
            self.ledger.mark_published(epoch);
            self.report.seconds_to_last_publication = Some((at - self.started).as_secs_f64());
        }
    }

    /// Flushes the dead letters sent so far, then saves the state: an offset is saved only
    /// once what its message produced is delivered.
    fn save(&mut self) -> Result<()> {
        self.publishing.flush_dead_letters()?;
        self.ledger.save()?;
        self.saved = Instant::now();
        Ok(())
    }

    fn handle(&mut self, m: Incoming) -> Result<()> {
        self.report.consumed += 1;
        let Incoming { source, partition, offset, payload, parsed } = m;
        let opts = self.opts;
        let topic = match source {
            Source::Checkpoints => &opts.topics.checkpoints,
            Source::Answers => &opts.topics.answers,
        };
        // The offset moves first: the state saved by an evaluation this message completes
        // must not read it again.
        self.ledger.advance(topic, partition, offset);
        let evaluator = &self.evaluator;
        let outcome = match parsed {
            Ok(Parsed::Announcement(a)) => self.ledger.announce(a, |a| evaluator.can_generate(a)),
            Ok(Parsed::Answer(a)) => self.ledger.answer(a)?,
            Err(reject) => Err(reject),
        };
        match outcome {
            Ok(Some(_)) => {}
            Ok(None) => self.report.skipped += 1,
            Err(reject) => {
                self.publishing.dead_letter(topic, partition, offset, payload.as_deref(), &reject)?;
                *self.report.dead_letters.entry(reject.kind.to_string()).or_default() += 1;
                self.ledger.count_dead_letter();
            }
        }
        Ok(())
    }

    /// Feeds every queued checkpoint to the evaluator ([`evaluate::Evaluator::feed`]) and
    /// returns: the workers score and archive while the stream reads on.
    fn dispatch(&mut self) -> Result<()> {
        let taken = self.ledger.take_ready();
        if taken.is_empty() {
            return Ok(());
        }
        let ready: Vec<state::Ready> = taken.iter().map(|k| self.ledger.ready(k)).collect();
        self.evaluator.feed(&ready)
    }

    /// Evaluates every queued checkpoint and waits for its commit ([`Self::dispatch`], then
    /// [`Self::settle`] waiting).
    fn evaluate_ready(&mut self) -> Result<()> {
        self.dispatch()?;
        self.settle(true)
    }

    /// Takes the epochs committed since the last call (`wait`: waits for every one fed):
    /// records them in the state, saves it, and queues their outputs for publication.
    fn settle(&mut self, wait: bool) -> Result<()> {
        let evaluated = self.evaluator.settle(wait)?;
        if evaluated.recorded.finished.is_empty() {
            return Ok(());
        }
        let trace = crate::trace::stream();
        self.report.model_calls += evaluated.model_calls;
        self.report.from_store += evaluated.from_store;
        self.report.evaluated.extend(evaluated.evaluated);
        self.ledger.record(&evaluated.recorded);
        let mut written = evaluated.written;
        let t1 = Instant::now();
        // Saved now when waited for; while reading, with the next periodic save (a commit
        // the state does not record yet is found in the archive on a restart).
        if wait || self.saved.elapsed() >= self.opts.snapshot_every {
            self.save()?;
        }
        let t2 = Instant::now();
        let finished = evaluated.recorded.finished;
        let epochs: Vec<_> = finished
            .iter()
            .map(|(checkpoint, epoch, _)| (*epoch, checkpoint.clone(), written.remove(epoch).unwrap_or_default()))
            .collect();
        self.publish(epochs)?;
        if trace {
            eprintln!(
                "settled {} checkpoints: consume {:?}, fed to committed (longest) {:?}, save {:?}, queue for publication {:?}",
                finished.len(),
                std::mem::take(&mut self.consuming),
                evaluated.dataflow,
                t2 - t1,
                t2.elapsed()
            );
        }
        self.report.seconds_to_last_evaluation = Some(self.started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Queues committed epochs' rows (each (epoch, checkpoint key, what its dataflow wrote))
    /// and the statistics they change for publication ([`publish::EpochRows`]); the statistics
    /// are computed once for them all. Published by the outbox thread; marked published once
    /// [`outbox::Outbox::delivered`] reports it.
    fn publish(&mut self, epochs: Vec<(u64, String, BTreeMap<String, RecordBatch>)>) -> Result<()> {
        let mut rows = Vec::with_capacity(epochs.len());
        let mut observations = Vec::with_capacity(epochs.len());
        for (epoch, checkpoint, written) in epochs {
            let r = publish::EpochRows::read(self.archive, epoch, &written, self.publishing.rows())?;
            observations.push((epoch, checkpoint, r.observation_batches.clone()));
            rows.push(r);
        }
        let statistics = self.statistics.update(&observations, self.ledger.done())?;
        for ((epoch, _, _), (rows, statistics)) in observations.iter().zip(rows.into_iter().zip(statistics)) {
            let kept = self.kept.is_some().then(|| statistics.clone());
            if !self.publishing.submit(*epoch, rows, statistics)? {
                // A replay publishes nothing; a watcher keeps the statistics for its caller.
                self.ledger.mark_published(*epoch);
                if let (Some(all), Some(mine)) = (&mut self.kept, kept) {
                    all.push((*epoch, mine));
                }
            }
        }
        Ok(())
    }
}
