//! `candor stream`: continuous evaluation fed by Kafka, effectively once.
//!
//! Two input topics: checkpoint announcements (`<prefix>checkpoints`) and answer records
//! (`<prefix>answers`, for generations made elsewhere). A checkpoint is evaluated once it is
//! announced and all the answers its announcement counts have arrived: its responses go
//! through the same scoring dataflow as `candor import` and `candor replay`
//! ([`stage::score_responses`]) into the archive as one epoch, and then its responses,
//! verdicts, observations and statistics updates (per checkpoint, and the paper's per-family
//! tests) are published. Messages that cannot be used go to `<prefix>dead-letters` with the
//! reason and the original bytes. Formats: `schemas/kafka/*.json`.
//!
//! Threads: [`readers`] read and parse the input partitions; this module's loop handles the
//! parsed messages in partition order and evaluates; [`outbox`] publishes. A capture of the
//! input topics ([`capture`]) replays through the same loop without a broker
//! ([`replay_capture`]).
//!
//! **Effectively once.** Consumer offsets are never committed to Kafka: they live in
//! `stream-state.json` in the archive, saved atomically together with the operator state
//! (announcements and answers not yet archived) and the set of epochs already published,
//! after every archive commit and at most every `snapshot_every` otherwise. After a crash
//! Candor re-reads from the saved offsets; an answer whose response key is already archived
//! is skipped, an epoch already committed is never re-evaluated, and an epoch committed but
//! not yet marked published is published again. Outputs therefore may repeat after a crash,
//! but only byte-identical messages with the same key and sequence number (see
//! `schemas/kafka/output.json`: consumers drop repeats of `(key, epoch, seq)`), because the
//! archive a message is read from (or the batch its dataflow wrote, which is what the archive
//! holds) is a deterministic function of the input.

pub mod capture;
pub mod kafka;
pub mod messages;
pub mod outbox;
pub mod readers;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use arrow::record_batch::RecordBatch;
use rdkafka::Offset;
use serde::{Deserialize, Serialize};

use crate::archive::Archive;
use crate::archive::read_records;
use crate::conditions::VerdictLabel;
use crate::dataflow::Cluster;
use crate::error::{Error, Location, Result};
use crate::records::{Observation, Response, Trial, Verdict};
use crate::schema::Record;
use crate::score::judge::Label;
use crate::score::refusal::RefusalRules;
use crate::score::stage;
use messages::{Announcement, Answer, Reject, SCHEMA_VERSION};
use readers::{Incoming, Parsed, Readers, Source};

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

/// The state saved with the archive: where to resume and what is not archived yet.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StreamState {
    /// Next offset to read, by `topic/partition`.
    pub offsets: BTreeMap<String, i64>,
    /// Announced checkpoints not evaluated yet, by `model/checkpoint`.
    pub announced: BTreeMap<String, Announced>,
    /// Answers not archived yet, by `model/checkpoint` and response key.
    pub pending: BTreeMap<String, BTreeMap<String, Answer>>,
    /// Epochs whose outputs are published.
    pub published: BTreeSet<u64>,
    /// Dead letters sent, over all runs.
    pub dead_letters: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Announced {
    pub announcement: Announcement,
    pub epoch: u64,
}

/// The state file, in the archive root.
pub const STATE_FILE: &str = "stream-state.json";

impl StreamState {
    pub fn load(root: &Path) -> Result<Self> {
        let path = root.join(STATE_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| Error::input(crate::error::Location::file(&path), e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StreamState::default()),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    /// Replaces the state file atomically (written, synced, renamed).
    pub fn save(&self, root: &Path) -> Result<()> {
        let path = root.join(STATE_FILE);
        let tmp = root.join(format!(".{STATE_FILE}.{}.tmp", std::process::id()));
        let bytes = serde_json::to_vec(self).expect("plain data serializes");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
            f.write_all(&bytes).and_then(|_| f.sync_all()).map_err(|e| Error::io(&tmp, e))?;
        }
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        std::fs::File::open(root).and_then(|d| d.sync_all()).map_err(|e| Error::io(root, e))
    }
}

fn checkpoint_key(model: &str, checkpoint: &str) -> String {
    crate::identity::CheckpointRef::new(model, checkpoint).key()
}

/// The model of a [`checkpoint_key`].
fn model_of(checkpoint_key: &str) -> String {
    crate::identity::split_key(checkpoint_key).into_iter().next().unwrap_or_default()
}

/// The key that pairs a fine-tuned checkpoint's observation with its base's.
fn pair_key(o: &Observation) -> String {
    crate::identity::key(&[&o.dataset, &o.item_key, &o.amendment_type, &o.prompt_type, &o.sample_index.to_string()])
}

struct Streamer<'a> {
    cluster: &'a Cluster,
    archive: &'a Archive,
    opts: &'a StreamOptions,
    state: StreamState,
    committed: BTreeSet<u64>,
    /// Checkpoints whose epoch is committed: `model/checkpoint` → (epoch, is_finetuned).
    done: HashMap<String, (u64, bool)>,
    archived_keys: HashSet<String>,
    trials: HashMap<String, Trial>,
    /// Per checkpoint, pair key → correct (None: excluded).
    observations: HashMap<String, HashMap<String, Option<bool>>>,
    /// Dead letters, sent from this thread and flushed before every save (none when
    /// replaying a capture: nothing is published then).
    publisher: Option<kafka::Publisher>,
    /// The output rows and statistics, sent on a thread of their own.
    outbox: Option<outbox::Outbox>,
    report: StreamReport,
    dirty: bool,
    started: Instant,
    /// Checkpoints complete and waiting for the end of the current poll batch.
    ready: BTreeSet<String>,
    /// Time spent reading and parsing messages since the last evaluation (for the trace).
    consuming: Duration,
    /// The paper's paired counts per family, maintained as epochs are published (the same
    /// incremental view `candor sql` keeps), for the per-family statistics messages.
    paired: crate::sql::view::PairedView,
}

/// Runs the stream until `idle_exit` passes without a message (or forever).
pub fn run(cluster: &Cluster, archive: &Archive, opts: &StreamOptions) -> Result<StreamReport> {
    // Processes split the input partitions (process I of P takes partition p when
    // p mod P = I) and each keeps its own archive and state; within a process, the W reader
    // threads (-w) split its partitions (see `readers`), and W timely workers run the scoring
    // dataflow of each evaluation.
    cluster.timely_config()?;
    let processes = cluster.processes.max(1);
    let owned = |p: i32| (p as usize) % processes == cluster.process;
    let local = Cluster { workers: cluster.workers, processes: 1, process: 0, hostfile: None };
    let cluster = &local;
    let t = &opts.topics;
    let mut all: Vec<&str> = vec![&t.checkpoints, &t.answers];
    all.extend(t.outputs());
    kafka::create_topics(&opts.connection, &all, opts.partitions)?;
    let mut s = Streamer::open(cluster, archive, opts, true)?;
    s.reconcile()?;

    let metadata = kafka::consumer(&opts.connection, &opts.group)?;
    let mut assigned = Vec::new();
    for (source, topic) in [(Source::Checkpoints, &t.checkpoints), (Source::Answers, &t.answers)] {
        for p in (0..kafka::partitions(&metadata, topic)?).filter(|p| owned(*p)) {
            let offset = match s.state.offsets.get(&format!("{topic}/{p}")) {
                Some(o) => Offset::Offset(*o),
                None => Offset::Beginning,
            };
            assigned.push((source, topic.clone(), p, offset));
        }
    }
    let readers = Readers::start(
        &opts.connection,
        metadata,
        &opts.group,
        &assigned,
        cluster.workers,
        processes,
        opts.max_message_bytes,
    )?;
    if std::env::var_os("CANDOR_STREAM_TRACE").is_some() {
        eprintln!("reading from {:?} after starting", s.started.elapsed());
    }

    let mut last_message = Instant::now();
    let mut last_save = Instant::now();
    loop {
        // A poll batch: wait for one batch of messages, then take what the readers already
        // have, so that every checkpoint it completes is evaluated in one run of the dataflow.
        let polled = Instant::now();
        let mut taken = 0;
        let mut next = readers.recv(Duration::from_millis(100));
        while let Some(batch) = next {
            taken += batch.len();
            for m in batch {
                s.handle(m)?;
            }
            last_message = Instant::now();
            next = if taken < 20_000 { readers.try_recv() } else { None };
        }
        if taken > 0 {
            s.consuming += polled.elapsed();
        }
        let busy = Instant::now();
        s.evaluate_ready()?;
        if busy.elapsed() > Duration::from_millis(50) {
            // Idle means no message waiting, not time spent evaluating.
            last_message = Instant::now();
        }
        s.poll_outputs()?;
        if s.dirty && last_save.elapsed() >= opts.snapshot_every {
            s.save()?;
            last_save = Instant::now();
        }
        if opts.idle_exit.is_some_and(|idle| last_message.elapsed() >= idle) {
            break;
        }
    }
    readers.stop()?;
    s.finish()
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

impl<'a> Streamer<'a> {
    /// `live`: publishing to Kafka (false: replaying a capture).
    fn open(cluster: &'a Cluster, archive: &'a Archive, opts: &'a StreamOptions, live: bool) -> Result<Self> {
        let committed = archive.committed_epochs()?;
        let done = archive
            .checkpoints()?
            .into_iter()
            .filter(|e| committed.contains(&e.epoch))
            .map(|e| (checkpoint_key(&e.model, &e.checkpoint), (e.epoch, e.is_finetuned)))
            .collect();
        let archived_keys = read_records::<Response>(archive)?.into_iter().map(|r| r.response_key).collect();
        let trials = read_records::<Trial>(archive)?.into_iter().map(|t| (t.trial_key.clone(), t)).collect();
        // The archived observations, read once, feed both statistics states.
        let mut observations: HashMap<String, HashMap<String, Option<bool>>> = HashMap::new();
        let mut paired = crate::sql::view::PairedView::default();
        for b in archive.read(Observation::STREAM)? {
            paired.upsert(&b)?;
            for o in Observation::from_batch(&b)? {
                observations
                    .entry(checkpoint_key(&o.model, &o.checkpoint))
                    .or_default()
                    .insert(pair_key(&o), o.correct);
            }
        }
        paired.take_dirty();
        Ok(Streamer {
            cluster,
            archive,
            opts,
            state: StreamState::load(archive.root())?,
            committed,
            done,
            archived_keys,
            trials,
            observations,
            publisher: if live { Some(kafka::Publisher::new(&opts.connection)?) } else { None },
            outbox: if live { Some(outbox::Outbox::start(&opts.connection)?) } else { None },
            report: StreamReport::default(),
            dirty: false,
            started: Instant::now(),
            ready: BTreeSet::new(),
            consuming: Duration::ZERO,
            paired,
        })
    }

    /// Brings the saved state in line with the archive after a crash: checkpoints committed
    /// since the last save are dropped from the state, unpublished epochs are published,
    /// and checkpoints whose answers were all in are evaluated.
    fn reconcile(&mut self) -> Result<()> {
        let finished: Vec<String> = self
            .state
            .announced
            .iter()
            .filter(|(_, a)| self.committed.contains(&a.epoch))
            .map(|(k, _)| k.clone())
            .collect();
        for k in finished {
            self.state.announced.remove(&k);
            self.state.pending.remove(&k);
        }
        let mut unpublished: Vec<(u64, String)> = self
            .done
            .iter()
            .filter(|(_, (e, _))| !self.state.published.contains(e))
            .map(|(k, (e, _))| (*e, k.clone()))
            .collect();
        unpublished.sort();
        for (epoch, key) in unpublished {
            self.publish(epoch, &key, BTreeMap::new())?;
            self.report.republished.push(epoch);
        }
        let announced: Vec<String> = self.state.announced.keys().cloned().collect();
        for k in announced {
            self.mark_if_complete(&k);
        }
        self.evaluate_ready()
    }

    /// Serves the dead-letter producer and marks what the outbox delivered as published.
    fn poll_outputs(&mut self) -> Result<()> {
        if let Some(p) = &self.publisher {
            p.poll();
        }
        let delivered = match &mut self.outbox {
            Some(o) => o.delivered()?,
            None => Vec::new(),
        };
        self.mark_published(delivered);
        Ok(())
    }

    /// Waits for every output to be delivered, then saves the state for the last time.
    fn finish(mut self) -> Result<StreamReport> {
        if let Some(o) = &mut self.outbox {
            let delivered = o.finish()?;
            self.report.published = o.published;
            self.mark_published(delivered);
        }
        self.save()?;
        Ok(self.report)
    }

    /// Marks epochs the outbox delivered as published.
    fn mark_published(&mut self, delivered: Vec<(u64, Instant)>) {
        for (epoch, at) in delivered {
            self.state.published.insert(epoch);
            self.dirty = true;
            self.report.seconds_to_last_publication = Some((at - self.started).as_secs_f64());
        }
    }

    /// Flushes the dead letters sent so far, then saves the state: an offset is saved only
    /// once what its message produced is delivered.
    fn save(&mut self) -> Result<()> {
        if let Some(p) = &self.publisher {
            p.flush()?;
        }
        self.state.save(self.archive.root())?;
        self.dirty = false;
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
        let position = format!("{topic}/{partition}");
        match self.state.offsets.get_mut(&position) {
            Some(o) => *o = offset + 1,
            None => {
                self.state.offsets.insert(position, offset + 1);
            }
        }
        self.dirty = true;
        let payload = payload.as_deref();
        let outcome = parsed.and_then(|p| match p {
            Parsed::Announcement(a) => self.on_announcement(a),
            Parsed::Answer(a) => self.on_answer(a),
        });
        match outcome {
            Ok(Some(checkpoint)) => {
                self.mark_if_complete(&checkpoint);
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(reject) => self.dead_letter(topic, partition, offset, payload, &reject),
        }
    }

    fn dead_letter(
        &mut self,
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
        if let Some(p) = &self.publisher {
            p.send(&self.opts.topics.dead_letters, &key, letter.to_string().as_bytes())?;
        }
        *self.report.dead_letters.entry(reject.kind.to_string()).or_default() += 1;
        self.state.dead_letters += 1;
        Ok(())
    }

    /// Records an announcement; returns the checkpoint to look at, or None for a repeat.
    fn on_announcement(&mut self, a: Announcement) -> std::result::Result<Option<String>, Reject> {
        let key = checkpoint_key(&a.model, &a.checkpoint);
        if let Some(prev) = self.state.announced.get(&key) {
            if prev.announcement == a {
                self.report.skipped += 1;
                return Ok(None);
            }
            return Err(Reject::new(
                "conflicting_announcement",
                format!("`{key}` was announced before with different fields"),
            ));
        }
        if self.done.contains_key(&key) {
            self.report.skipped += 1;
            return Ok(None);
        }
        if a.answers.is_none() && self.generator_for(&a).is_none() {
            return Err(Reject::new(
                "unknown_model",
                format!(
                    "no `answers` count, and the experiment has no [[models]] entry `{}` to generate with",
                    a.model
                ),
            ));
        }
        let epoch = self
            .archive
            .register_checkpoint(&a.model, &a.checkpoint, a.finetuned, a.variant.as_deref())
            .map_err(|e| Reject::new("conflicting_announcement", e.to_string()))?;
        self.state.announced.insert(key.clone(), Announced { announcement: a, epoch });
        Ok(Some(key))
    }

    fn on_answer(&mut self, a: Answer) -> std::result::Result<Option<String>, Reject> {
        let key = a.response_key();
        if self.archived_keys.contains(&key) {
            self.report.skipped += 1;
            return Ok(None);
        }
        let checkpoint = checkpoint_key(&a.model, &a.checkpoint);
        if self.done.contains_key(&checkpoint) {
            return Err(Reject::new("late_answer", format!("checkpoint `{checkpoint}` is already evaluated")));
        }
        let pending = self.state.pending.entry(checkpoint.clone()).or_default();
        match pending.get(&key) {
            Some(prev) if *prev == a => {
                self.report.skipped += 1;
                Ok(None)
            }
            Some(_) => {
                Err(Reject::new("conflicting_answer", format!("a different answer with key `{key}` came first")))
            }
            // Complete (all its announced answers are in) but not evaluated yet: an answer
            // beyond the count is late however the messages were batched, so a replay of the
            // same input decides the same.
            None if self.ready.contains(&checkpoint) => Err(Reject::new(
                "late_answer",
                format!("checkpoint `{checkpoint}` already has all the answers its announcement counts"),
            )),
            None => {
                pending.insert(key, a);
                Ok(Some(checkpoint))
            }
        }
    }

    /// Queues a checkpoint for evaluation once it is announced and all its answers are in.
    fn mark_if_complete(&mut self, checkpoint: &str) {
        let Some(announced) = self.state.announced.get(checkpoint) else { return };
        let have = self.state.pending.get(checkpoint).map_or(0, BTreeMap::len) as u64;
        if announced.announcement.answers.is_none_or(|n| have >= n) {
            self.ready.insert(checkpoint.to_string());
        }
    }

    /// Evaluates every queued checkpoint: those with answer records in one run of the scoring
    /// dataflow (one epoch each), those to generate one at a time; then saves the state,
    /// publishes and saves again.
    fn evaluate_ready(&mut self) -> Result<()> {
        let ready = std::mem::take(&mut self.ready);
        if ready.is_empty() {
            return Ok(());
        }
        let source = format!("kafka:{}", self.opts.topics.answers);
        let mut sources = Vec::new();
        let mut labels = HashMap::new();
        let mut new_trials = BTreeMap::new();
        let mut keys = Vec::new();
        let mut finished = Vec::new();
        for checkpoint in &ready {
            let announced = self.state.announced.get(checkpoint).cloned().expect("queued when announced");
            let (epoch, finetuned) = (announced.epoch, announced.announcement.finetuned);
            let answers = self.state.pending.remove(checkpoint).unwrap_or_default();
            finished.push((checkpoint.clone(), epoch, finetuned));
            if self.committed.contains(&epoch) {
                continue;
            }
            if announced.announcement.answers.is_none() {
                let exp = self.generator_for(&announced.announcement).expect("checked when announced");
                let run = stage::run_experiment(
                    self.cluster,
                    self.archive,
                    &exp,
                    Box::new(crate::generate::backend::open),
                    false,
                )?;
                self.report.model_calls += run.model_calls;
                self.report.from_store += run.from_store;
                self.committed.insert(epoch);
                self.report.evaluated.push(checkpoint.clone());
                continue;
            }
            let mut responses = Vec::with_capacity(answers.len());
            for a in answers.values() {
                let r = a.response(epoch, finetuned, &source);
                if let Some(v) = &a.verdict {
                    let verdict = VerdictLabel::parse_loose(v).expect("checked when parsed");
                    labels
                        .insert(r.response_key.clone(), Label { verdict, judge: source.clone(), raw: Some(v.clone()) });
                }
                if !self.trials.contains_key(&r.trial_key) {
                    new_trials.entry(r.trial_key.clone()).or_insert_with(|| a.trial());
                }
                keys.push(r.response_key.clone());
                responses.push(r);
            }
            sources.push((epoch, Response::to_batch(&responses)?));
            self.report.evaluated.push(checkpoint.clone());
        }
        let trace = std::env::var_os("CANDOR_STREAM_TRACE").is_some();
        let t0 = Instant::now();
        // What each epoch's dataflow wrote, published as is rather than read back.
        let mut written = HashMap::new();
        if !sources.is_empty() {
            let epochs: Vec<u64> = sources.iter().map(|(e, _)| *e).collect();
            let new_trials: Vec<Trial> = new_trials.into_values().collect();
            let mut all: Vec<Trial> = self.trials.values().cloned().collect();
            all.extend(new_trials.iter().cloned());
            // New trials belong to the first epoch of the run, which commits first.
            let trials_epoch = *epochs.iter().min().expect("not empty");
            let reports = stage::score_responses(
                self.cluster,
                self.archive,
                all,
                new_trials.clone(),
                Vec::new(),
                trials_epoch,
                sources,
                labels,
                self.opts.refusal.clone(),
                // Answer records carry their verdicts; unlabelled ones stay archived unscored
                // (`candor rescore` judges them afterwards).
                None,
            )?;
            written.extend(reports.into_iter().map(|d| (d.epoch, d.written)));
            self.committed.extend(epochs);
            self.archived_keys.extend(keys);
            self.trials.extend(new_trials.into_iter().map(|t| (t.trial_key.clone(), t)));
        }
        for (checkpoint, epoch, finetuned) in &finished {
            self.done.insert(checkpoint.clone(), (*epoch, *finetuned));
            self.state.announced.remove(checkpoint);
        }
        let t1 = Instant::now();
        self.save()?;
        let t2 = Instant::now();
        for (checkpoint, epoch, _) in &finished {
            self.publish(*epoch, checkpoint, written.remove(epoch).unwrap_or_default())?;
        }
        if trace {
            eprintln!(
                "evaluated {} checkpoints: consume {:?}, dataflow {:?}, save {:?}, queue for publication {:?}",
                finished.len(),
                std::mem::take(&mut self.consuming),
                t1 - t0,
                t2 - t1,
                t2.elapsed()
            );
        }
        self.report.seconds_to_last_evaluation = Some(self.started.elapsed().as_secs_f64());
        Ok(())
    }

    /// The experiment narrowed to the announced checkpoint, when it can generate for it.
    fn generator_for(&self, a: &Announcement) -> Option<crate::config::Experiment> {
        let mut exp = self.opts.experiment.clone()?;
        let mut model = exp.models.iter().find(|m| m.name == a.model)?.clone();
        let checkpoint = match model.checkpoints.iter().find(|c| c.id == a.checkpoint) {
            Some(c) => c.clone(),
            None => crate::model::CheckpointConfig {
                id: a.checkpoint.clone(),
                finetuned: a.finetuned,
                variant: a.variant.clone(),
                epoch: a.training_epoch,
                path: a.path.as_ref().map(std::path::PathBuf::from),
                system_prompt: None,
                backend: Default::default(),
            },
        };
        model.checkpoints = vec![checkpoint];
        exp.models = vec![model];
        Some(exp)
    }

    /// Queues one committed epoch's rows and the statistics it changes for publication: the
    /// batches its dataflow wrote (`written`, by stream) or, for streams not there (after a
    /// restart, or a checkpoint Candor generated), the rows read back from the archive. Either
    /// way the same rows in the same order, so a message published again is byte-identical.
    /// Published by the outbox thread; marked published once [`outbox::Outbox::delivered`]
    /// reports it.
    fn publish(&mut self, epoch: u64, checkpoint: &str, written: BTreeMap<String, RecordBatch>) -> Result<()> {
        let t = self.opts.topics.clone();
        let rows = self.opts.publish_rows;
        let responses: Vec<Response> = if rows { epoch_rows(self.archive, epoch, &written)? } else { Vec::new() };
        let verdicts: Vec<Verdict> = if rows { epoch_rows(self.archive, epoch, &written)? } else { Vec::new() };
        let observation_batches = epoch_batches::<Observation>(self.archive, epoch, &written)?;
        let mut observations = Vec::new();
        for b in &observation_batches {
            observations.extend(Observation::from_batch(b)?);
        }
        let cell = self.observations.entry(checkpoint.to_string()).or_default();
        for o in &observations {
            cell.insert(pair_key(o), o.correct);
        }
        // The checkpoint's own statistics, and, when it is a base, those of the fine-tuned
        // checkpoints it pairs with.
        let (model, finetuned) = (model_of(checkpoint), self.done[checkpoint].1);
        let mut changed = vec![checkpoint.to_string()];
        if !finetuned {
            let mut others: Vec<String> =
                self.done.iter().filter(|(k, (_, ft))| *ft && model_of(k) == model).map(|(k, _)| k.clone()).collect();
            others.sort();
            changed.extend(others);
        }
        let mut statistics: Vec<(String, String, Vec<u8>)> = changed
            .into_iter()
            .map(|k| {
                let stats = self.statistics(&k, epoch).to_string().into_bytes();
                (t.statistics.clone(), k, stats)
            })
            .collect();
        // The paper's per-category tests of every family the epoch changed. An upsert, so
        // an epoch published again after a restart is not counted twice.
        for b in &observation_batches {
            self.paired.upsert(b)?;
        }
        let (dirty, _) = self.paired.take_dirty();
        let mut families: Vec<_> = dirty.into_iter().map(|f| (self.paired.family_names(&f), f)).collect();
        families.sort();
        for (names, f) in families {
            let (key, stats) = family_statistics(names, &self.paired.family_categories(&f), epoch)?;
            statistics.push((t.statistics.clone(), key, stats.to_string().into_bytes()));
        }
        let Some(outbox) = &mut self.outbox else {
            // A replay publishes nothing.
            self.state.published.insert(epoch);
            return Ok(());
        };
        outbox.submit(outbox::Job {
            epoch,
            responses: (t.responses, responses),
            verdicts: (t.verdicts, verdicts),
            observations: (t.observations, if rows { observations } else { Vec::new() }),
            statistics,
        })
    }

    /// A checkpoint's statistics: accuracy over the included observations and, for a
    /// fine-tuned checkpoint whose base is evaluated, the paired counts and McNemar's test.
    fn statistics(&self, checkpoint: &str, update_epoch: u64) -> serde_json::Value {
        let empty = HashMap::new();
        let obs = self.observations.get(checkpoint).unwrap_or(&empty);
        let n = obs.len();
        let correct = obs.values().filter(|c| **c == Some(true)).count();
        let included = obs.values().filter(|c| c.is_some()).count();
        let (epoch, finetuned) = self.done[checkpoint];
        let model = model_of(checkpoint);
        let same_model = self.done.iter().filter(|(k, _)| model_of(k) == model).map(|(k, (_, ft))| (k.as_str(), *ft));
        let base = crate::identity::base_checkpoints(same_model).first().map(|b| b.to_string());
        let paired = base.filter(|_| finetuned).map(|b| {
            let base_obs = self.observations.get(&b).unwrap_or(&empty);
            let mut cells = [0u64; 4];
            for (k, c) in obs {
                if let (Some(ft), Some(Some(bc))) = (c, base_obs.get(k)) {
                    cells[match (*bc, *ft) {
                        (true, true) => 0,
                        (true, false) => 1,
                        (false, true) => 2,
                        (false, false) => 3,
                    }] += 1;
                }
            }
            serde_json::json!({
                "base": b, "n11": cells[0], "n10": cells[1], "n01": cells[2], "n00": cells[3],
                "mcnemar_exact_p": crate::stats::mcnemar::mcnemar_exact(cells[1], cells[2]),
            })
        });
        serde_json::json!({
            "schema_version": SCHEMA_VERSION,
            "kind": "checkpoint",
            "key": checkpoint,
            "checkpoint_epoch": epoch,
            "update_epoch": update_epoch,
            "finetuned": finetuned,
            "observations": n,
            "included": included,
            "correct": correct,
            "accuracy": if included > 0 { Some(correct as f64 / included as f64) } else { None },
            "paired": paired,
        })
    }
}

/// A family's statistics message: per category (amendment type) the paired counts, the
/// accuracies, the exact McNemar p, its Benjamini–Hochberg adjustment within the family and
/// the effect sizes, as `candor analyze` reports them (METHOD.md §4).
fn family_statistics(
    (model, base, checkpoint, dataset, test): (&str, &str, &str, &str, &str),
    categories: &[(String, crate::stats::paired::PairedCounts)],
    update_epoch: u64,
) -> Result<(String, serde_json::Value)> {
    use crate::stats::paired::{ALPHA, family};
    let counts: Vec<_> = categories.iter().map(|(_, c)| *c).collect();
    let stats = family(&counts, ALPHA).map_err(|e| Error::Internal(format!("family statistics: {e}")))?;
    let rows: Vec<serde_json::Value> = categories
        .iter()
        .zip(stats)
        .map(|((category, _), s)| {
            serde_json::json!({
                "category": category, "n": s.n, "both_correct": s.both_correct, "b": s.b, "c": s.c,
                "both_wrong": s.both_wrong, "acc_base_pct": s.acc_base_pct, "acc_ft_pct": s.acc_ft_pct,
                "diff_pp": s.diff_pp, "p_exact": s.p_exact, "p_adjusted": s.p_adjusted,
                "significant": s.significant, "paper_g": s.paper_g, "cohens_g": s.cohens_g,
                "odds_ratio": crate::stats::effect::json_number(s.odds_ratio),
            })
        })
        .collect();
    let key = format!("{model}/{base}/{checkpoint}/{dataset}/{test}");
    Ok((
        key.clone(),
        serde_json::json!({
            "schema_version": SCHEMA_VERSION,
            "kind": "family",
            "key": key,
            "update_epoch": update_epoch,
            "model": model,
            "base_checkpoint": base,
            "checkpoint": checkpoint,
            "dataset": dataset,
            "test_type": test,
            "alpha": ALPHA,
            "categories": rows,
        }),
    ))
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
