//! The timely dataflow: Arrow batches flow between operators, and the logical time is the
//! checkpoint epoch.
//!
//! Epoch 0 carries the grid (items and trials); every model checkpoint gets the next epoch in
//! order of arrival, so "a checkpoint's results are complete" is exactly "the frontier has
//! passed its epoch". Operators are thin adapters over [`Stage`]s, plain Rust that is tested
//! without a dataflow. A batch knows its stream from its schema metadata, so one sink routes
//! every stream to its archive partition.
//!
//! This is the engine only: [`run`] executes a dataflow, and the stages that are assembled
//! into one live beside their logic (`amend::stage`, `generate::operator`, `score::stage`).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;

use arrow::array::{Array, StringArray, UInt64Array};
use arrow::compute::{SortColumn, concat_batches, lexsort_to_indices, take_record_batch};
use arrow::record_batch::RecordBatch;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::generic::operator::Operator;
use timely::dataflow::operators::vec::Input;
use timely::dataflow::operators::{Capability, Exchange as _};
use timely::dataflow::{Stream, StreamVec};

use crate::archive::{Archive, Partition};
use crate::error::{Error, Result, StageError};
use crate::schema::{self, META_STREAM};

mod session;
pub use session::Session;

/// The logical time: 0 for the grid, then one epoch per checkpoint.
pub type Epoch = u64;

/// The epoch of the item and trial streams.
pub const GRID_EPOCH: Epoch = 0;

/// An Arrow batch travelling through timely. Across processes it is encoded as an Arrow IPC
/// stream, so nothing but Arrow's own format ever goes on the wire.
#[derive(Clone, Debug)]
pub struct Batch(pub RecordBatch);

impl Batch {
    /// The stream this batch belongs to.
    pub fn stream(&self) -> &str {
        stream_of(&self.0)
    }
}

/// The stream a batch belongs to, from its schema metadata ("" for foreign batches).
pub fn stream_of(batch: &RecordBatch) -> &str {
    batch.schema_ref().metadata().get(META_STREAM).map(String::as_str).unwrap_or("")
}

impl Serialize for Batch {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut buf = Vec::new();
        let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut buf, self.0.schema_ref())
            .map_err(serde::ser::Error::custom)?;
        w.write(&self.0).map_err(serde::ser::Error::custom)?;
        w.finish().map_err(serde::ser::Error::custom)?;
        drop(w);
        s.serialize_bytes(&buf)
    }
}

impl<'de> Deserialize<'de> for Batch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let bytes: Vec<u8> = serde_bytes_compat::deserialize(d)?;
        let mut r = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)
            .map_err(serde::de::Error::custom)?;
        let batch = r
            .next()
            .ok_or_else(|| serde::de::Error::custom("empty Arrow IPC message"))?
            .map_err(serde::de::Error::custom)?;
        Ok(Batch(batch))
    }
}

/// Reads a byte buffer whether the format encoded it as bytes or as a sequence.
mod serde_bytes_compat {
    use serde::Deserializer;
    use serde::de::{SeqAccess, Visitor};

    struct BytesVisitor;
    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("bytes")
        }
        fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }
        fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0));
            while let Some(b) = seq.next_element()? {
                out.push(b);
            }
            Ok(out)
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(BytesVisitor)
    }
}

/// What flows on a dataflow edge: a batch, or the error a stage hit on one. Errors travel as
/// data, with their domain, so the sink, wherever it runs, knows not to mark an epoch
/// complete, and the command fails as the stage's error would have outside the dataflow.
pub type Msg = std::result::Result<Batch, StageError>;

/// One step of the pipeline over batches: the logic an operator wraps.
pub trait Stage: 'static {
    /// Operator name shown in errors and timely logs.
    fn name(&self) -> &str;
    /// Turns one input batch into zero or more output batches (of any streams).
    fn apply(&mut self, epoch: Epoch, batch: &RecordBatch) -> Result<Vec<RecordBatch>>;
}

/// How a timely computation is laid out: threads per process and processes.
#[derive(Clone, Debug, clap::Args)]
pub struct Cluster {
    /// Worker threads per process.
    #[arg(short = 'w', long = "workers", default_value_t = 1)]
    pub workers: usize,
    /// Number of processes (each started with the same arguments and its own --process).
    #[arg(short = 'n', long = "processes", default_value_t = 1)]
    pub processes: usize,
    /// This process's index, 0-based.
    #[arg(short = 'p', long = "process", default_value_t = 0)]
    pub process: usize,
    /// File of `host:port` lines, one per process (timely's host file); default: localhost
    /// ports from 2101.
    #[arg(long = "hostfile")]
    pub hostfile: Option<PathBuf>,
}

impl Default for Cluster {
    fn default() -> Self {
        Cluster { workers: 1, processes: 1, process: 0, hostfile: None }
    }
}

impl Cluster {
    /// The timely configuration, as timely's own `-w -n -p -h` options would build it.
    pub fn timely_config(&self) -> Result<timely::Config> {
        use timely::CommunicationConfig;
        if self.workers == 0 {
            return Err(Error::config("--workers", "must be at least 1"));
        }
        if self.process >= self.processes {
            return Err(Error::config(
                "--process",
                format!("{} is not below --processes {}", self.process, self.processes),
            ));
        }
        let communication = if self.processes > 1 {
            let addresses = match &self.hostfile {
                Some(path) => {
                    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
                    let hosts: Vec<String> =
                        text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
                    if hosts.len() < self.processes {
                        return Err(Error::config(
                            "--hostfile",
                            format!("{} lists {} hosts for {} processes", path.display(), hosts.len(), self.processes),
                        ));
                    }
                    hosts
                }
                None => (0..self.processes).map(|i| format!("localhost:{}", 2101 + i)).collect(),
            };
            CommunicationConfig::Cluster {
                threads: self.workers,
                process: self.process,
                addresses,
                report: false,
                zerocopy: false,
            }
        } else if self.workers > 1 {
            CommunicationConfig::Process(self.workers)
        } else {
            CommunicationConfig::Thread
        };
        Ok(timely::Config { communication, worker: Default::default() })
    }

    /// Whether this process hosts global worker 0, which reads sources and writes the archive.
    pub fn is_leader(&self) -> bool {
        self.process == 0
    }
}

/// `timely::execute` with standard output kept for Candor's own: while a cluster's processes
/// connect, timely prints `awaiting connections (at i/n)` to stdout (unconditionally), which
/// would break `--json` output, so stdout is pointed at stderr until the workers are up.
/// Every dataflow of Candor starts here.
pub fn execute<T, F>(
    config: timely::Config,
    func: F,
) -> std::result::Result<timely::communication::initialize::WorkerGuards<T>, String>
where
    T: Send + 'static,
    F: Fn(&mut timely::worker::Worker) -> T + Send + Sync + 'static,
{
    let cluster = matches!(config.communication, timely::CommunicationConfig::Cluster { .. });
    let _quiet = cluster.then(StdoutToStderr::new);
    timely::execute(config, func)
}

/// Points the process's standard output at its standard error while held; the first guard
/// taken moves it, the last one dropped puts it back (threads of one process may start
/// clusters at once: the tests run two processes' watchers as threads).
struct StdoutToStderr;

/// Guards held, and the original stdout while any is.
static STDOUT_MOVED: std::sync::Mutex<(usize, i32)> = std::sync::Mutex::new((0, -1));

impl StdoutToStderr {
    fn new() -> Self {
        use std::io::Write;
        let mut moved = STDOUT_MOVED.lock().unwrap_or_else(|p| p.into_inner());
        if moved.0 == 0 {
            let _ = std::io::stdout().flush();
            // SAFETY: dup and dup2 on the process's own standard descriptors; a failed dup
            // (-1) leaves stdout where it is.
            let saved = unsafe { libc::dup(1) };
            if saved >= 0 {
                unsafe { libc::dup2(2, 1) };
            }
            moved.1 = saved;
        }
        moved.0 += 1;
        StdoutToStderr
    }
}

impl Drop for StdoutToStderr {
    fn drop(&mut self) {
        use std::io::Write;
        let mut moved = STDOUT_MOVED.lock().unwrap_or_else(|p| p.into_inner());
        moved.0 -= 1;
        if moved.0 == 0 && moved.1 >= 0 {
            let _ = std::io::stdout().flush();
            // SAFETY: puts back the descriptor saved by the first guard, then closes the copy.
            unsafe {
                libc::dup2(moved.1, 1);
                libc::close(moved.1);
            }
            moved.1 = -1;
        }
    }
}

/// Schema metadata marking a batch as reference data for the stages (the trials and items a
/// response is scored against, the verdicts it was given): carried in the dataflow to the
/// workers that need it, in whichever process they run, and never archived.
pub const META_DIMENSION: &str = "candor.dimension";

/// Marks `batch` as reference data ([`META_DIMENSION`]).
pub fn dimension(batch: RecordBatch) -> RecordBatch {
    with_metadata(batch, META_DIMENSION, "1")
}

/// Whether a batch is reference data ([`META_DIMENSION`]).
pub fn is_dimension(batch: &RecordBatch) -> bool {
    batch.schema_ref().metadata().contains_key(META_DIMENSION)
}

/// `batch` with one more schema metadata entry.
pub fn with_metadata(batch: RecordBatch, key: &str, value: &str) -> RecordBatch {
    let mut metadata = batch.schema_ref().metadata().clone();
    metadata.insert(key.into(), value.into());
    let schema = Arc::new(batch.schema_ref().as_ref().clone().with_metadata(metadata));
    batch.with_schema(schema).expect("only the metadata changed")
}

/// The reference data of a dataflow's input, sent where the stages need it: items (what a
/// judge reads) to every worker, trials and given verdicts to the worker that scores their
/// trial's responses (responses are routed by `trial_key` too, see [`partition_by`]). The
/// stages read nothing else: no table filled by a driver in one process's memory.
pub fn dimensions<'s>(input: StreamVec<'s, Epoch, Msg>, peers: usize) -> StreamVec<'s, Epoch, Msg> {
    use timely::dataflow::operators::Concat;
    use timely::dataflow::operators::vec::{Broadcast, Filter};
    let reference = input.filter(|m| m.as_ref().is_ok_and(|b| is_dimension(&b.0)));
    let items = only(reference.clone(), "item");
    let items = if peers > 1 { items.broadcast() } else { items };
    let keyed = reference.filter(|m| m.as_ref().is_ok_and(|b| b.stream() != "item"));
    partition_by(keyed, "trial_key", peers).concat(items)
}

/// The batches of a dataflow's input that are archived as they are: neither reference data
/// nor requests for a stage (such as the generate operator's).
pub fn archived<'s>(input: StreamVec<'s, Epoch, Msg>) -> StreamVec<'s, Epoch, Msg> {
    use timely::dataflow::operators::vec::Filter;
    input.filter(|m| m.as_ref().map_or(true, |b| !is_dimension(&b.0) && !is_request(&b.0)))
}

/// Schema metadata marking a batch as a request to a stage, carrying what the stage needs to
/// serve it (the generate operator: the checkpoint that answers, as JSON).
pub const META_REQUEST: &str = "candor.request";

/// Metadata key of an answer batch the generate operator made: its [`Generated`] counts, as
/// JSON. They travel with the answers to the sink (on whichever process it runs), so a run's
/// counts are every worker's of every process.
pub const META_GENERATED: &str = "candor.generated";

/// How a batch of answers was made: calls to a model, answers the generation store had.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Generated {
    pub model_calls: u64,
    pub from_store: u64,
    pub completion_tokens: u64,
}

impl Generated {
    /// `batch` marked with these counts.
    pub fn mark(&self, batch: RecordBatch) -> RecordBatch {
        with_metadata(batch, META_GENERATED, &serde_json::to_string(self).expect("plain data serializes"))
    }

    /// The counts a batch is marked with (none: not generated).
    pub fn of(batch: &RecordBatch) -> Option<Generated> {
        batch.schema_ref().metadata().get(META_GENERATED).and_then(|t| serde_json::from_str(t).ok())
    }

    pub fn add(&mut self, other: &Generated) {
        self.model_calls += other.model_calls;
        self.from_store += other.from_store;
        self.completion_tokens += other.completion_tokens;
    }
}

/// Whether a batch is a request to a stage ([`META_REQUEST`]).
pub fn is_request(batch: &RecordBatch) -> bool {
    batch.schema_ref().metadata().contains_key(META_REQUEST)
}

/// The requests among a dataflow's input ([`META_REQUEST`]).
pub fn requests<'s>(input: StreamVec<'s, Epoch, Msg>) -> StreamVec<'s, Epoch, Msg> {
    use timely::dataflow::operators::vec::Filter;
    input.filter(|m| m.as_ref().is_ok_and(|b| is_request(&b.0)))
}

/// Runs a [`Stage`] over every batch of a stream.
pub fn stage<'s, S: Stage>(stream: StreamVec<'s, Epoch, Msg>, mut stage: S) -> StreamVec<'s, Epoch, Msg> {
    let name = stage.name().to_string();
    stream.unary(Pipeline, &name, move |_cap, _info| {
        move |input, output| {
            input.for_each_stamp(|cap, data| {
                let Some(&epoch) = cap.least() else { return };
                let mut session = output.session(&cap);
                for msg in data.flat_map(|d| d.drain(..)) {
                    match msg {
                        Ok(batch) => match stage.apply(epoch, &batch.0) {
                            Ok(outs) => session.give_iterator(outs.into_iter().map(|b| Ok(Batch(b)))),
                            Err(e) => session.give(Err(StageError::new(stage.name(), &e))),
                        },
                        Err(e) => session.give(Err(e)),
                    }
                }
            });
        }
    })
}

/// Keeps the batches of one stream (and every error).
pub fn only<'s>(stream: StreamVec<'s, Epoch, Msg>, name: &'static str) -> StreamVec<'s, Epoch, Msg> {
    stream.unary(Pipeline, "Only", move |_cap, _info| {
        move |input, output| {
            input.for_each_stamp(|cap, data| {
                let keep = data.flat_map(|d| d.drain(..)).filter(|m| m.as_ref().map_or(true, |b| b.stream() == name));
                output.session(&cap).give_iterator(keep);
            });
        }
    })
}

/// A stable 64-bit hash (FNV-1a): routing must agree across processes and releases.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Spreads rows across workers by the hash of a string key column, so that every record of
/// one key is handled by the same worker.
pub fn partition_by<'s>(
    stream: StreamVec<'s, Epoch, Msg>,
    key: &'static str,
    peers: usize,
) -> StreamVec<'s, Epoch, Msg> {
    stream
        .unary(Pipeline, "PartitionBy", move |_cap, _info| {
            move |input, output| {
                input.for_each_stamp(|cap, data| {
                    let mut session = output.session(&cap);
                    for msg in data.flat_map(|d| d.drain(..)) {
                        match msg {
                            Ok(batch) => match split_by_key(&batch.0, key, peers) {
                                Ok(parts) => session.give_iterator(parts.into_iter().map(|(w, b)| (w, Ok(Batch(b))))),
                                Err(e) => session.give((0, Err(StageError::from(&e)))),
                            },
                            Err(e) => session.give((0u64, Err(e))),
                        }
                    }
                });
            }
        })
        .exchange(|(worker, _): &(u64, Msg)| *worker)
        .unary::<timely::container::CapacityContainerBuilder<Vec<Msg>>, _, _, _>(Pipeline, "Unroute", |_cap, _info| {
            move |input, output| {
                input.for_each_stamp(|cap, data| {
                    output
                        .session(&cap)
                        .give_iterator(data.flat_map(|d: &mut Vec<(u64, Msg)>| d.drain(..)).map(|(_, m)| m));
                });
            }
        })
}

/// Splits a batch into per-worker batches by the stable hash of `key`.
pub fn split_by_key(batch: &RecordBatch, key: &str, peers: usize) -> Result<Vec<(u64, RecordBatch)>> {
    if peers <= 1 {
        return Ok(vec![(0, batch.clone())]);
    }
    let column = batch
        .column_by_name(key)
        .and_then(|c| c.as_any().downcast_ref::<StringArray>())
        .ok_or_else(|| Error::Internal(format!("partition key `{key}` is not a string column")))?;
    let mut rows: Vec<Vec<u64>> = vec![Vec::new(); peers];
    for (i, k) in column.iter().enumerate() {
        rows[(stable_hash(k.unwrap_or("").as_bytes()) % peers as u64) as usize].push(i as u64);
    }
    let mut out = Vec::new();
    for (worker, idx) in rows.into_iter().enumerate() {
        if !idx.is_empty() {
            let part =
                take_record_batch(batch, &UInt64Array::from(idx)).map_err(|e| Error::arrow("partitioning", e))?;
            out.push((worker as u64, part));
        }
    }
    Ok(out)
}

/// Where the sink commits what a dataflow time carries: the archive epoch of each time
/// (absent: the time is the epoch, as in a one-shot [`run`]) and the partition of each
/// checkpoint's epoch. A long-lived [`Session`] fills it as checkpoints arrive, before their
/// rows do.
#[derive(Clone, Debug, Default)]
pub struct Routing {
    pub epochs: std::collections::HashMap<u64, Epoch>,
    pub partitions: BTreeMap<Epoch, Partition>,
}

/// [`Routing`] shared by the driver and the sink of one process.
pub type SharedRouting = Arc<std::sync::Mutex<Routing>>;

/// Where a stream's epoch goes in the archive.
pub fn partition_for(stream: &str, epoch: Epoch, checkpoints: &BTreeMap<Epoch, Partition>) -> Partition {
    match (stream, checkpoints.get(&epoch)) {
        ("item" | "trial", _) | (_, None) => Partition::All,
        (_, Some(p)) => p.clone(),
    }
}

/// What the archive sink reports when an epoch is complete.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EpochDone {
    pub epoch: Epoch,
    /// Rows written per stream.
    pub rows: BTreeMap<String, usize>,
    /// Errors the stages reported for this epoch; nothing is written for an epoch with errors.
    pub errors: Vec<StageError>,
    /// The batch written per stream, exactly as archived (sorted by the stream's key), for
    /// callers that pass the rows on (`candor stream` publishes them) without reading the
    /// archive back. Not serialised: it stays in the process that wrote it.
    #[serde(skip)]
    pub written: BTreeMap<String, RecordBatch>,
    /// How the epoch's answers were made (the counts its generated batches carry).
    #[serde(default)]
    pub generated: Generated,
}

/// Gathers every batch on worker 0 and, when the frontier passes an epoch, writes each
/// stream's rows for that epoch as one segment, sorted by the stream's key, so the archive is
/// a deterministic function of the input whatever the worker count. Emits one [`EpochDone`]
/// per completed epoch, once its write is committed.
///
/// The writes run on a thread of their own (`candor-archive`), one epoch after another in the
/// order the epochs complete, so the worker scores the next epoch while the last one's files
/// are encoded and synced. The epoch's capability is held until its write is reported back,
/// so nothing downstream (and no probe) sees the epoch complete before it is committed.
pub fn archive_sink<'s>(
    stream: StreamVec<'s, Epoch, Msg>,
    archive: Archive,
    routing: SharedRouting,
    progress: Option<indicatif::ProgressBar>,
) -> StreamVec<'s, Epoch, EpochDone> {
    let scope = stream.scope();
    stream.unary_frontier(Exchange::new(|_: &Msg| 0), "ArchiveSink", move |_cap, info| {
        let activator = scope.worker().sync_activator_for(info.address.to_vec());
        let mut writer: Option<Writer> = None;
        let mut pending: BTreeMap<Epoch, (Capability<Epoch>, Vec<Msg>)> = BTreeMap::new();
        // Epochs handed to the writer, by dataflow time.
        let mut writing: BTreeMap<Epoch, (Capability<Epoch>, Epoch)> = BTreeMap::new();
        move |(input, frontier), output| {
            input.for_each_stamp(|cap, data| {
                let Some(cap) = cap.retain_least(0) else { return };
                let entry = pending.entry(*cap.time()).or_insert_with(|| (cap.clone(), Vec::new()));
                for msg in data.flat_map(|d| d.drain(..)) {
                    if let (Some(bar), Ok(b)) = (&progress, &msg)
                        && b.stream() != "item"
                    {
                        bar.inc(b.0.num_rows() as u64);
                    }
                    entry.1.push(msg);
                }
            });
            let complete: Vec<Epoch> = pending.keys().copied().filter(|e| !frontier.frontier().less_equal(e)).collect();
            for time in complete {
                let (cap, msgs) = pending.remove(&time).expect("listed above");
                let (epoch, partitions) = match routing.lock() {
                    Ok(r) => (r.epochs.get(&time).copied().unwrap_or(time), r.partitions.clone()),
                    Err(_) => {
                        let error = Error::Internal("the archive routing was poisoned by a panic".into());
                        output.session(&cap).give(EpochDone::failed(time, "archiving", &error));
                        continue;
                    }
                };
                let w = match &mut writer {
                    Some(w) => w,
                    None => writer.insert(Writer::start(archive.clone(), activator.clone())),
                };
                let job = WriteJob { time, epoch, msgs, partitions };
                if w.jobs.send(job).is_err() {
                    let error = Error::Internal("the archive writer thread stopped".into());
                    output.session(&cap).give(EpochDone::failed(epoch, "archiving", &error));
                    continue;
                }
                writing.insert(time, (cap, epoch));
            }
            if let Some(w) = &writer {
                loop {
                    match w.done.try_recv() {
                        Ok((time, done)) => {
                            if let Some((cap, _)) = writing.remove(&time) {
                                output.session(&cap).give(done);
                            }
                        }
                        Err(std::sync::mpsc::TryRecvError::Empty) => break,
                        Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                            // The thread died (a panic): every epoch it held fails, none is lost.
                            let error = Error::Internal("the archive writer thread stopped".into());
                            for (cap, epoch) in std::mem::take(&mut writing).into_values() {
                                output.session(&cap).give(EpochDone::failed(epoch, "archiving", &error));
                            }
                            break;
                        }
                    }
                }
            }
        }
    })
}

/// One completed epoch handed to the archive writer.
struct WriteJob {
    /// The dataflow time (the round).
    time: Epoch,
    /// The archive epoch it is committed as.
    epoch: Epoch,
    msgs: Vec<Msg>,
    partitions: BTreeMap<Epoch, Partition>,
}

/// The archive sink's writing thread and its two channels.
struct Writer {
    jobs: std::sync::mpsc::Sender<WriteJob>,
    done: std::sync::mpsc::Receiver<(Epoch, EpochDone)>,
}

impl Writer {
    /// Started by the sink's first completed epoch (only worker 0 of process 0 has any).
    fn start(archive: Archive, activator: timely::scheduling::SyncActivator) -> Writer {
        let (jobs, rx) = std::sync::mpsc::channel::<WriteJob>();
        let (tx, done) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("candor-archive".into())
            .spawn(move || {
                for job in rx {
                    let done = write_epoch(&archive, job.epoch, job.msgs, &job.partitions);
                    if tx.send((job.time, done)).is_err() {
                        return;
                    }
                    let _ = activator.activate();
                }
            })
            .expect("spawning the archive writer thread");
        Writer { jobs, done }
    }
}

impl EpochDone {
    /// The report of an epoch that could not be written.
    fn failed(epoch: Epoch, stage: &str, error: &Error) -> EpochDone {
        EpochDone {
            epoch,
            rows: BTreeMap::new(),
            errors: vec![StageError::new(stage, error)],
            written: BTreeMap::new(),
            generated: Generated::default(),
        }
    }
}

fn write_epoch(archive: &Archive, epoch: Epoch, msgs: Vec<Msg>, checkpoints: &BTreeMap<Epoch, Partition>) -> EpochDone {
    let mut done = EpochDone {
        epoch,
        rows: BTreeMap::new(),
        errors: Vec::new(),
        written: BTreeMap::new(),
        generated: Generated::default(),
    };
    let mut by_stream: BTreeMap<String, Vec<RecordBatch>> = BTreeMap::new();
    for msg in msgs {
        match msg {
            Ok(b) => {
                if let Some(g) = Generated::of(&b.0) {
                    done.generated.add(&g);
                }
                by_stream.entry(b.stream().to_string()).or_default().push(b.0)
            }
            Err(e) => done.errors.push(e),
        }
    }
    if !done.errors.is_empty() {
        return done;
    }
    let t0 = std::time::Instant::now();
    let mut parts = Vec::new();
    for (stream, batches) in by_stream {
        if batches.iter().all(|b| b.num_rows() == 0) {
            continue;
        }
        match sorted_by_key(&stream, &batches) {
            Ok(batch) => {
                let partition = partition_for(&stream, epoch, checkpoints);
                done.rows.insert(stream.clone(), batch.num_rows());
                done.written.insert(stream.clone(), batch.clone());
                parts.push((stream, partition, batch));
            }
            Err(e) => done.errors.push(StageError::new(&format!("archiving stream `{stream}`"), &e)),
        }
    }
    if crate::trace::stream() {
        eprintln!("  sink, epoch {epoch}: sort {:?}", t0.elapsed());
    }
    // One write per epoch: every stream's rows or none of them.
    if done.errors.is_empty()
        && let Err(e) = archive.write_epoch(epoch, &parts, &serde_json::json!({"epoch": epoch, "rows": done.rows}))
    {
        done.errors.push(StageError::new(&format!("archiving epoch {epoch}"), &e));
    }
    if !done.errors.is_empty() {
        done.rows.clear();
        done.written.clear();
    }
    done
}

/// Concatenates batches of one stream and sorts them by the stream's key columns.
pub fn sorted_by_key(stream: &str, batches: &[RecordBatch]) -> Result<RecordBatch> {
    let schema = schema::arrow_schema(stream)?;
    let all = concat_batches(&schema, batches).map_err(|e| Error::arrow(format!("stream `{stream}`"), e))?;
    let keys = &schema::stream_schema(stream)?.key;
    let columns: Vec<SortColumn> = keys
        .iter()
        .map(|k| SortColumn { values: all.column_by_name(k).expect("key is a field").clone(), options: None })
        .collect();
    if columns.is_empty() || all.num_rows() < 2 {
        return Ok(all);
    }
    let idx = lexsort_to_indices(&columns, None).map_err(|e| Error::arrow(format!("sorting `{stream}`"), e))?;
    take_record_batch(&all, &idx).map_err(|e| Error::arrow(format!("sorting `{stream}`"), e))
}

/// Collects the sink's reports on the worker that hosts the sink.
pub fn collect_done<'s>(
    stream: StreamVec<'s, Epoch, EpochDone>,
    into: Rc<RefCell<Vec<EpochDone>>>,
) -> Stream<'s, Epoch, Vec<EpochDone>> {
    stream.unary(Pipeline, "CollectDone", move |_cap, _info| {
        move |input, output| {
            input.for_each_stamp(|cap, data| {
                for d in data.flat_map(|d| d.drain(..)) {
                    into.borrow_mut().push(d.clone());
                    output.session(&cap).give(d);
                }
            });
        }
    })
}

/// A string column of a batch, for stages.
pub fn string_column<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a StringArray> {
    batch.column_by_name(name).and_then(|c| c.as_any().downcast_ref::<StringArray>()).ok_or_else(|| {
        Error::schema(Batch(batch.clone()).stream().to_string(), format!("column `{name}` is not a string column"))
    })
}

thread_local! {
    /// Timely computations started from this thread ([`run`] and [`Session::start`]).
    static STARTED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// How many timely computations this thread has started: what tests check a long-lived
/// command against (one computation for its whole life, not one per batch).
pub fn computations_started() -> u64 {
    STARTED.with(|s| s.get())
}

fn count_computation() {
    STARTED.with(|s| s.set(s.get() + 1));
}

/// Runs a dataflow over `sources` (sent by worker 0 in epoch order) and archives everything
/// the dataflow built by `build` emits. Returns the sink's report per epoch, or the errors
/// the stages reported.
pub fn run<F>(
    cluster: &Cluster,
    archive: &Archive,
    sources: Vec<(Epoch, RecordBatch)>,
    progress_total: Option<u64>,
    build: F,
) -> Result<Vec<EpochDone>>
where
    F: for<'s> Fn(StreamVec<'s, Epoch, Msg>, usize) -> StreamVec<'s, Epoch, Msg> + Send + Sync + 'static,
{
    let config = cluster.timely_config()?;
    // The sink runs on worker 0, in the leader process; only it reads the registry.
    let partitions = if cluster.is_leader() { archive.checkpoint_partitions()? } else { BTreeMap::new() };
    let routing: SharedRouting = Arc::new(std::sync::Mutex::new(Routing { epochs: Default::default(), partitions }));
    let sources = Arc::new(sources);
    let archive = archive.clone();
    let bar = progress_total.map(|n| {
        let bar = indicatif::ProgressBar::new(n);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {msg} [{bar:30}] {pos}/{len} rows ({per_sec}, eta {eta})",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_message("archiving");
        bar
    });
    let bar_for_workers = bar.clone();
    count_computation();
    let guards = execute(config, move |worker| {
        let index = worker.index();
        let peers = worker.peers();
        let done = Rc::new(RefCell::new(Vec::new()));
        let mut input = worker.dataflow::<Epoch, _, _>(|scope| {
            let (input, stream) = scope.new_input::<Msg>();
            let out = build(stream, peers);
            let sink_bar = if index == 0 { bar_for_workers.clone() } else { None };
            collect_done(archive_sink(out, archive.clone(), routing.clone(), sink_bar), done.clone());
            input
        });
        if index == 0 {
            for (epoch, batch) in sources.iter() {
                if *epoch > *input.time() {
                    input.advance_to(*epoch);
                }
                input.send(Ok(Batch(batch.clone())));
            }
        }
        drop(input);
        // Park between activations: model calls run on other threads and wake the operator.
        while worker.step_or_park(Some(std::time::Duration::from_millis(50))) {}
        done.take()
    })
    // Fails on the network in a cluster (a port taken, a peer unreachable).
    .map_err(|e| Error::system("starting timely", e))?;
    let mut reports = Vec::new();
    for result in guards.join() {
        reports.extend(result.map_err(|e| Error::Internal(format!("a worker panicked: {e}")))?);
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    checked(reports)
}

/// The sink's reports in epoch order, or the errors the stages reported. An error reaches the
/// sink once per path it travels (a generate error both as itself and through the score
/// stage): each is reported once.
fn checked(mut reports: Vec<EpochDone>) -> Result<Vec<EpochDone>> {
    reports.sort_by_key(|d| d.epoch);
    let mut errors: Vec<StageError> = Vec::new();
    for e in reports.iter().flat_map(|d| d.errors.iter()) {
        if !errors.contains(e) {
            errors.push(e.clone());
        }
    }
    if !errors.is_empty() {
        return Err(Error::Dataflow(errors));
    }
    Ok(reports)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::Trial;
    use crate::schema::Record;

    fn trials(n: usize) -> Vec<Trial> {
        (0..n)
            .map(|i| Trial {
                trial_key: format!("trivia/q{i:03}/unmodified/original"),
                dataset: "trivia".into(),
                item_key: format!("q{i:03}"),
                amendment_type: "unmodified".into(),
                amendment_group: "unmodified".into(),
                statement_id: None,
                statement: None,
                prompt_type: "original".into(),
                belief_answer: None,
                prompt: format!("Q{i}?"),
                template_style: "clean".into(),
                seed: 1,
            })
            .collect()
    }

    #[test]
    fn batches_survive_the_wire_encoding() {
        let batch = Trial::to_batch(&trials(3)).unwrap();
        let bytes = bincode_roundtrip(&Batch(batch.clone()));
        assert_eq!(bytes.0, batch);
        assert_eq!(bytes.stream(), "trial");
    }

    fn bincode_roundtrip(b: &Batch) -> Batch {
        let json = serde_json::to_vec(b).unwrap();
        serde_json::from_slice(&json).unwrap()
    }

    #[test]
    fn splitting_keeps_every_row_once_and_routes_keys_stably() {
        let batch = Trial::to_batch(&trials(100)).unwrap();
        let parts = split_by_key(&batch, "item_key", 3).unwrap();
        assert_eq!(parts.iter().map(|(_, b)| b.num_rows()).sum::<usize>(), 100);
        let again = split_by_key(&batch, "item_key", 3).unwrap();
        assert_eq!(parts, again);
        assert!(parts.len() == 3, "100 keys over 3 workers should hit all of them");
    }

    /// Fails on every trial batch with `error`.
    struct Failing(fn() -> Error);

    impl Stage for Failing {
        fn name(&self) -> &str {
            "failing"
        }
        fn apply(&mut self, _epoch: Epoch, _batch: &RecordBatch) -> Result<Vec<RecordBatch>> {
            Err((self.0)())
        }
    }

    #[test]
    fn a_stage_error_fails_the_run_with_its_domain_and_archives_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let archive = Archive::open_writer(dir.path().join("a"), "test").unwrap();
        let sources = vec![(1, Trial::to_batch(&trials(4)).unwrap()), (2, Trial::to_batch(&trials(4)).unwrap())];
        let run_with = |error: fn() -> Error| {
            let cluster = Cluster { workers: 2, ..Cluster::default() };
            run(&cluster, &archive, sources.clone(), None, move |input, peers| {
                stage(partition_by(input, "item_key", peers), Failing(error))
            })
            .unwrap_err()
        };
        let outage = run_with(|| Error::unavailable("http://127.0.0.1:9", "gave up after 2 attempts"));
        assert!(matches!(&outage, Error::Dataflow(errors) if errors.len() == 1), "reported once: {outage}");
        assert_eq!((outage.kind(), outage.transient()), (crate::error::Domain::External, true));
        assert!(outage.to_string().contains("failing: backend http://127.0.0.1:9: gave up"), "{outage}");
        let input = run_with(|| Error::schema("trial", "column `prompt` is missing"));
        assert_eq!((input.kind(), input.transient()), (crate::error::Domain::User, false));
        assert!(archive.committed_epochs().unwrap().is_empty(), "nothing archived");
    }

    fn trials_from(start: usize, n: usize) -> Vec<Trial> {
        let mut t = trials(start + n);
        t.drain(..start);
        t
    }

    #[test]
    fn a_session_commits_rounds_fed_out_of_epoch_order_as_their_epochs() {
        let dir = tempfile::tempdir().unwrap();
        let archive = Archive::open_writer(dir.path().join("a"), "test").unwrap();
        let first = archive.register_checkpoint("m", "a", false, None).unwrap();
        let cluster = Cluster { workers: 2, ..Cluster::default() };
        let mut session =
            Session::start(&cluster, &archive, Vec::new(), |input, peers| partition_by(input, "item_key", peers))
                .unwrap();
        // Registered after the session started: found in the registry when it is fed.
        let second = archive.register_checkpoint("m", "b", true, None).unwrap();
        // The later checkpoint completes first; then the earlier one, in a second feed of the
        // same computation.
        session.feed(second, vec![Trial::to_batch(&trials_from(0, 5)).unwrap()]).unwrap();
        let done = session.wait().unwrap();
        assert_eq!(done.iter().map(|d| (d.epoch, d.rows["trial"])).collect::<Vec<_>>(), vec![(second, 5)]);
        session.feed(first, vec![Trial::to_batch(&trials_from(5, 3)).unwrap()]).unwrap();
        session.feed(first, vec![]).unwrap(); // nothing to feed: no round
        let done = session.wait().unwrap();
        assert_eq!(done.iter().map(|d| (d.epoch, d.rows["trial"])).collect::<Vec<_>>(), vec![(first, 3)]);
        session.stop().unwrap();
        let committed = archive.committed_epochs().unwrap();
        assert!(committed.contains(&first) && committed.contains(&second), "{committed:?}");
        assert_eq!(crate::archive::read_records::<Trial>(&archive).unwrap().len(), 8);
    }

    #[test]
    fn a_session_reports_a_stage_error_with_its_domain_and_archives_nothing_of_that_round() {
        let dir = tempfile::tempdir().unwrap();
        let archive = Archive::open_writer(dir.path().join("a"), "test").unwrap();
        let epoch = archive.register_checkpoint("m", "a", false, None).unwrap();
        let mut session = Session::start(&Cluster::default(), &archive, Vec::new(), |input, peers| {
            stage(partition_by(input, "item_key", peers), Failing(|| Error::unavailable("http://127.0.0.1:9", "down")))
        })
        .unwrap();
        session.feed(epoch, vec![Trial::to_batch(&trials(2)).unwrap()]).unwrap();
        let err = session.wait().unwrap_err();
        assert_eq!(err.kind(), crate::error::Domain::External, "{err}");
        assert!(!archive.committed_epochs().unwrap().contains(&epoch));
    }

    #[test]
    fn sorting_by_key_makes_order_irrelevant() {
        let mut rows = trials(20);
        let a = sorted_by_key("trial", &[Trial::to_batch(&rows).unwrap()]).unwrap();
        rows.reverse();
        let (x, y) = rows.split_at(7);
        let b = sorted_by_key("trial", &[Trial::to_batch(y).unwrap(), Trial::to_batch(x).unwrap()]).unwrap();
        assert_eq!(a, b);
    }
}
