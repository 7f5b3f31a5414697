//! `candor watch`: checkpoints straight from a training run's output folder.
//!
//! Training pipelines (HF Trainer, TRL, PEFT) save `checkpoint-<step>/` folders: a LoRA adapter
//! (`adapter_config.json`, `adapter_model.safetensors`) or full weights, with
//! `trainer_state.json`. The watcher evaluates every such folder that appears under the
//! watched directory, in step order, as the next epoch of the stream's one long-lived
//! dataflow: each folder becomes the same checkpoint announcement a Kafka producer would send
//! (`schemas/kafka/announcement.json`: the experiment's `[[models]]` entry `model`, the folder
//! as its weights, no answer count, so Candor generates over the trial grid), handed to the
//! same state, evaluation and statistics as `candor stream`.
//!
//! **When a folder is ready.** When it holds the marker file (`--marker`, default
//! `candor-ready`: a training script can write it last), or else when it holds
//! `trainer_state.json` (HF Trainer writes it at the end of a save) and no file in it changed
//! size or modification time for `--stable-secs` (default 5 s). A folder that is not ready
//! holds back the steps after it: checkpoints are evaluated in step order.
//!
//! **A folder that cannot be evaluated** (a corrupt or truncated file, an adapter for another
//! base, weights Candor cannot load) is loaded once before it is announced; the failure is a
//! named error row (`"event": "error"`) and the watcher goes on with the next step.
//!
//! **Restart-safe.** `<archive>/.candor-watch.json` records each folder's content hash
//! (SHA-256 over its `.json` and `.safetensors` files but `trainer_state.json`, as the weights
//! digest) with what came of
//! it. A folder already evaluated or rejected with the same content is not looked at again; a
//! killed watcher that committed a checkpoint before saving that record finds it in the
//! archive and does not evaluate it again either. A folder whose content changed after it was
//! evaluated is an error row, never a silent second evaluation under the same name.
//!
//! **Alerts and repeated looks.** Looking at a family at every step inflates false alarms.
//! `--looks K` spreads α over K planned looks (Bonferroni over steps: a category counts as
//! significant at a step when its Benjamini–Hochberg-adjusted p is below α/K); `K = 1` applies
//! no correction. Every output line says which guard is in force. `--alert-cmd CMD` runs `CMD`
//! (through `sh -c`, the alert's JSON on its standard input) once for each family line
//! (model, base, dataset, test type) the first time one of its categories turns significant
//! toward more errors (b > c: right before fine-tuning, wrong after).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::messages::{Announcement, SCHEMA_VERSION};
use super::readers::{Incoming, Source, parse};
use super::{StreamOptions, Streamer};
use crate::archive::Archive;
use crate::dataflow::Cluster;
use crate::error::{Error, Location, Result};

/// The watcher's record, at the archive root.
pub const STATE_FILE: &str = ".candor-watch.json";

/// How to watch.
#[derive(Clone, Debug)]
pub struct WatchOptions {
    /// The directory the training run saves `checkpoint-<step>/` folders into.
    pub dir: PathBuf,
    /// The experiment's `[[models]]` entry the checkpoints belong to (its base is evaluated
    /// first, and adapters are merged into its base weights).
    pub model: String,
    /// A file whose presence makes a folder ready.
    pub marker: String,
    /// Without the marker: how long `trainer_state.json`'s folder must stay unchanged.
    pub stable: Duration,
    /// How often the directory is looked at.
    pub poll: Duration,
    /// Stop after this long without a new checkpoint (None: watch until killed).
    pub idle_exit: Option<Duration>,
    /// Run once per family line that first turns significant toward more errors.
    pub alert_cmd: Option<String>,
    /// Planned looks: α is spread over them (Bonferroni over steps); 1 = no correction.
    pub looks: u32,
    /// Also take checkpoints from `POST /v1/checkpoints` ([`super::hook`]).
    pub hook: Option<super::hook::HookOptions>,
    /// Evaluate intermediate checkpoints on a seeded sample of this many items per dataset
    /// (the same items at every step), the last one on the whole grid.
    pub items_per_checkpoint: Option<usize>,
    /// The run's last step (else `trainer_state.json`'s `max_steps`, when it says).
    pub final_step: Option<u64>,
}

/// The guard against repeated looks in force, stated in every output.
#[derive(Clone, Debug, Serialize)]
pub struct Guard {
    pub method: &'static str,
    pub looks: u32,
    pub alpha: f64,
    pub alpha_per_look: f64,
}

impl Guard {
    fn new(looks: u32) -> Self {
        let alpha = crate::stats::paired::ALPHA;
        let looks = looks.max(1);
        Guard {
            method: if looks == 1 { "none" } else { "bonferroni-over-steps" },
            looks,
            alpha,
            alpha_per_look: alpha / looks as f64,
        }
    }
}

/// What a watch did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct WatchReport {
    /// Checkpoints evaluated in this run, in step order.
    pub evaluated: Vec<String>,
    /// Checkpoints found already evaluated (by an earlier run).
    pub already: Vec<String>,
    /// Checkpoints that could not be evaluated, with the reason.
    pub errors: Vec<(String, String)>,
    /// Alerts raised in this run.
    pub alerts: usize,
    /// Per family line (model/base/dataset/test type), the first step at which a category
    /// was significant under the guard (this run and earlier ones).
    pub first_significant: BTreeMap<String, u64>,
    /// The stream's own report (messages handled, model calls, answers from the store).
    pub stream: super::StreamReport,
}

/// What became of one folder.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Entry {
    step: u64,
    sha256: String,
    /// `evaluated` or `error`.
    status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// `.candor-watch.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct State {
    checkpoints: BTreeMap<String, Entry>,
    /// Family lines an alert was raised for.
    alerted: BTreeSet<String>,
    /// Family line → first step significant under the guard.
    first_significant: BTreeMap<String, u64>,
}

impl State {
    fn load(root: &Path) -> Result<Self> {
        let path = root.join(STATE_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| Error::input(Location::file(&path), format!("not the watcher's record: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    /// Written to a temporary file, synced, then renamed over the record.
    fn save(&self, root: &Path) -> Result<()> {
        let path = root.join(STATE_FILE);
        let tmp = root.join(format!("{STATE_FILE}.tmp"));
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| Error::Internal(format!("watch state: {e}")))?;
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
            f.write_all(&bytes).and_then(|_| f.sync_all()).map_err(|e| Error::io(&tmp, e))?;
        }
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))
    }
}

/// The step of a `checkpoint-<step>` folder name.
pub fn step_of(name: &str) -> Option<u64> {
    name.strip_prefix("checkpoint-")?.parse().ok()
}

/// Every file of a folder with its length and modification time, sorted.
type Listing = Vec<(PathBuf, u64, Option<SystemTime>)>;

/// Every file under `dir` with its length and modification time, sorted.
fn listing(dir: &Path) -> Result<Listing> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).map_err(|e| Error::io(&d, e))? {
            let entry = entry.map_err(|e| Error::io(&d, e))?;
            let meta = entry.metadata().map_err(|e| Error::io(entry.path(), e))?;
            if meta.is_dir() {
                todo.push(entry.path());
            } else {
                out.push((entry.path(), meta.len(), meta.modified().ok()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Decides when folders are ready, remembering what each looked like and since when.
struct Readiness<'o> {
    opts: &'o WatchOptions,
    seen: HashMap<PathBuf, (Listing, Instant)>,
}

impl Readiness<'_> {
    fn ready(&mut self, dir: &Path) -> Result<bool> {
        if dir.join(&self.opts.marker).is_file() {
            return Ok(true);
        }
        if !dir.join("trainer_state.json").is_file() {
            return Ok(false);
        }
        let now = listing(dir)?;
        let since = match self.seen.get(dir) {
            Some((before, since)) if *before == now => *since,
            _ => {
                self.seen.insert(dir.to_path_buf(), (now, Instant::now()));
                Instant::now()
            }
        };
        Ok(since.elapsed() >= self.opts.stable)
    }
}

/// The `checkpoint-<step>` folders under `dir`, in step order.
fn folders(dir: &Path) -> Result<Vec<(u64, String, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = step_of(&name)
            && entry.path().is_dir()
        {
            out.push((step, name, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Whether `step` is the run's last: `final_step`, else `trainer_state.json`'s `max_steps`.
fn is_final(dir: &Path, step: u64, final_step: Option<u64>) -> bool {
    if let Some(f) = final_step {
        return step >= f;
    }
    let state =
        std::fs::read(dir.join("trainer_state.json")).ok().and_then(|b| serde_json::from_slice::<Value>(&b).ok());
    state.and_then(|s| s.get("max_steps").and_then(Value::as_u64)).is_some_and(|max| step >= max)
}

/// The training epoch `trainer_state.json` records, if any.
fn training_epoch(dir: &Path) -> Option<f64> {
    let bytes = std::fs::read(dir.join("trainer_state.json")).ok()?;
    serde_json::from_slice::<Value>(&bytes).ok()?.get("epoch")?.as_f64()
}

/// The stream options a watcher runs with: `exp`'s refusal rules and models, no broker (its
/// announcements go straight to the stream's loop), nothing published to Kafka.
pub fn stream_options(exp: &crate::config::Experiment) -> StreamOptions {
    StreamOptions::for_replay(
        "watch.",
        1 << 20,
        crate::score::refusal::RefusalRules::new(exp.refusal.mode),
        Some(exp.clone()),
    )
}

/// Watches `w.dir` and evaluates each ready checkpoint folder into `archive` through the
/// stream's evaluation; `emit` gets one JSON value per event (a checkpoint evaluated with its
/// statistics, an error row, an alert).
pub fn watch(
    cluster: &Cluster,
    archive: &Archive,
    opts: &StreamOptions,
    w: &WatchOptions,
    emit: &mut dyn FnMut(&Value),
) -> Result<WatchReport> {
    let exp = opts.experiment.as_ref().ok_or_else(|| Error::Internal("watch without an experiment".into()))?;
    let model = exp.models.iter().find(|m| m.name == w.model).cloned().ok_or_else(|| {
        Error::config("--model", format!("the experiment has no [[models]] entry `{}` to evaluate with", w.model))
    })?;
    let base_ids = model.base_checkpoints();
    let bases: Vec<_> = model.checkpoints.iter().filter(|c| base_ids.contains(&c.id.as_str())).cloned().collect();
    if bases.is_empty() {
        return Err(Error::config(
            format!("models.{}", model.name),
            "no base checkpoint (finetuned = false) to pair the training run's checkpoints against",
        ));
    }
    if !cluster.is_leader() {
        // Process 0 watches, and feeds every process's workers.
        super::take_part(cluster, archive, opts)?;
        return Ok(WatchReport::default());
    }
    if !w.dir.is_dir() {
        return Err(Error::input(Location::file(&w.dir), "not a directory (the training run's output folder)"));
    }
    let guard = Guard::new(w.looks);
    let mut state = State::load(archive.root())?;
    let mut report = WatchReport { first_significant: state.first_significant.clone(), ..Default::default() };
    let mut s = Streamer::open(cluster, archive, opts, false)?;
    s.kept = Some(Vec::new());
    s.reconcile()?;
    let mut offset = 0i64;
    let mut announce = |s: &mut Streamer, a: Announcement| -> Result<()> {
        let mut value = serde_json::to_value(&a).map_err(|e| Error::Internal(format!("announcement: {e}")))?;
        value["schema_version"] = json!(SCHEMA_VERSION);
        // As a producer writes it: fields without a value left out.
        if let Some(o) = value.as_object_mut() {
            o.retain(|_, v| !v.is_null());
        }
        let payload = value.to_string().into_bytes();
        let parsed = parse(Source::Checkpoints, Some(&payload), opts.max_message_bytes);
        s.handle(Incoming { source: Source::Checkpoints, partition: 0, offset, payload: Some(payload), parsed })?;
        offset += 1;
        s.evaluate_ready()
    };
    // The base first: every fine-tuned checkpoint pairs against it.
    for b in &bases {
        announce(
            &mut s,
            Announcement {
                model: model.name.clone(),
                checkpoint: b.id.clone(),
                finetuned: false,
                variant: b.variant_label(),
                training_epoch: b.epoch,
                path: None,
                endpoint: None,
                answers: None,
            },
        )?;
    }
    // Each step is also paired against the previous one (`queries/trajectory_steps.sql`),
    // and its warmth read (`queries/warmth_trajectory.sql`), from the archive as live SQL
    // reads it.
    let live = crate::sql::live::LiveSql::open(archive.root())?;
    let mut warmth = Value::Null;
    for b in &bases {
        if let Value::Array(rows) = step_warmth(&live, archive, &model.name, &b.id)? {
            warmth = json!([warmth.as_array().cloned().unwrap_or_default(), rows].concat());
        }
    }
    take_statistics(&mut s, &guard, w, &mut state, &mut report, None, warmth, emit)?;

    let mut readiness = Readiness { opts: w, seen: HashMap::new() };
    let mut reported: BTreeSet<(String, String)> = BTreeSet::new();
    // Folders recorded before whose content was checked in this run, with the listing it was
    // checked at (hashed again only when a file changes).
    let mut checked: HashMap<String, Listing> = HashMap::new();
    let mut last_new = Instant::now();
    let mut subsample: Option<Value> = None;
    let hook = match &w.hook {
        Some(h) => {
            let hook = super::hook::Hook::start(h, &model.name, base_ids.iter().map(|b| b.to_string()).collect())?;
            emit(&json!({"event": "hook", "listening": hook.addr.to_string()}));
            Some(hook)
        }
        None => None,
    };
    loop {
        // The folders in step order, then what the hook received, in order.
        let mut candidates: Vec<(u64, String, PathBuf, Option<String>, bool)> =
            folders(&w.dir)?.into_iter().map(|(step, name, path)| (step, name, path, None, true)).collect();
        if let Some(h) = &hook {
            for r in h.requests.try_iter() {
                let path = r.path.expect("the hook accepts paths only");
                candidates.push((r.step, format!("checkpoint-{}", r.step), path, r.sha256, false));
            }
        }
        let mut waiting = false;
        for (step, name, path, expected, folder) in candidates {
            if folder && waiting {
                continue;
            }
            if let Some(entry) = state.checkpoints.get(&name).cloned() {
                let now = listing(&path)?;
                if checked.get(&name) == Some(&now) {
                    continue;
                }
                checked.insert(name.clone(), now);
                match crate::model::dir_digest(&path) {
                    Ok(sha256) if sha256 == entry.sha256 => {
                        if entry.status == "evaluated"
                            && !report.already.contains(&name)
                            && !report.evaluated.contains(&name)
                        {
                            report.already.push(name.clone());
                        }
                    }
                    Ok(sha256) => {
                        let message = format!(
                            "its content changed after it was {} (SHA-256 {} then, {} now): it is not evaluated again under the same name; save the new weights as a new step",
                            if entry.status == "evaluated" { "evaluated" } else { "rejected" },
                            entry.sha256,
                            sha256
                        );
                        error_row(&name, step, Some(&sha256), &message, &mut report, &mut reported, emit);
                    }
                    Err(e) => error_row(&name, step, None, &e.to_string(), &mut report, &mut reported, emit),
                }
                continue;
            }
            if folder && !readiness.ready(&path)? {
                // Later steps wait for this one.
                waiting = true;
                continue;
            }
            last_new = Instant::now();
            let found = last_new;
            let sha256 = match crate::model::dir_digest(&path) {
                Ok(h) => h,
                Err(e) => {
                    error_row(&name, step, None, &e.to_string(), &mut report, &mut reported, emit);
                    continue;
                }
            };
            if let Some(given) = expected.filter(|h| !h.eq_ignore_ascii_case(&sha256)) {
                let message = format!(
                    "the hook gave SHA-256 {given}, but the folder's content hashes to {sha256}: not evaluated"
                );
                error_row(&name, step, Some(&sha256), &message, &mut report, &mut reported, emit);
                state.checkpoints.insert(name, Entry { step, sha256, status: "error".into(), error: Some(message) });
                state.save(archive.root())?;
                continue;
            }
            let path_text = path.canonicalize().unwrap_or(path.clone()).to_string_lossy().into_owned();
            // As the announcement will name it.
            let checkpoint = crate::model::CheckpointConfig {
                id: name.clone(),
                finetuned: true,
                variant: None,
                epoch: training_epoch(&path),
                path: Some(PathBuf::from(&path_text)),
                system_prompt: None,
                backend: Default::default(),
            };
            // Loaded once before it is announced: a folder that cannot be is an error row.
            // The generator loaded is kept for the evaluation, which does not load it again.
            let mut probe = model.clone();
            probe.checkpoints = vec![checkpoint.clone()];
            let loaded = crate::generate::backend::open_ahead(&probe, &checkpoint);
            let rejected = match loaded {
                Err(e) => Some(e.to_string()),
                Ok(()) => {
                    subsample = None;
                    if let Some(k) = w.items_per_checkpoint.filter(|_| !is_final(&path, step, w.final_step)) {
                        let items = s.evaluator.sample_items(k, exp.seed)?;
                        subsample = Some(json!({"items_per_dataset": k, "items": items.len()}));
                        s.evaluator.subsample(super::state::checkpoint_key(&model.name, &name), items);
                    }
                    let before: u64 = s.report.dead_letters.values().sum();
                    announce(
                        &mut s,
                        Announcement {
                            model: model.name.clone(),
                            checkpoint: name.clone(),
                            finetuned: true,
                            variant: None,
                            training_epoch: checkpoint.epoch,
                            path: Some(path_text),
                            endpoint: None,
                            answers: None,
                        },
                    )?;
                    let after: u64 = s.report.dead_letters.values().sum();
                    (after > before).then(|| format!("its announcement was refused ({:?})", s.report.dead_letters))
                }
            };
            if let Some(message) = rejected {
                error_row(&name, step, Some(&sha256), &message, &mut report, &mut reported, emit);
                state.checkpoints.insert(name, Entry { step, sha256, status: "error".into(), error: Some(message) });
                state.save(archive.root())?;
                continue;
            }
            let key = super::state::checkpoint_key(&model.name, &name);
            if s.report.evaluated.contains(&key) {
                report.evaluated.push(name.clone());
            } else {
                // Committed by a run killed before it recorded it here: not evaluated again.
                report.already.push(name.clone());
            }
            let previous = previous_step(&live, &name)?;
            let warmth = step_warmth(&live, archive, &model.name, &name)?;
            let evaluated = Step { name: &name, step, sha256: &sha256, previous, subsample: subsample.take(), found };
            take_statistics(&mut s, &guard, w, &mut state, &mut report, Some(evaluated), warmth, emit)?;
            state.checkpoints.insert(name, Entry { step, sha256, status: "evaluated".into(), error: None });
            state.save(archive.root())?;
            // Idle time counts from the end of the work, not from its start.
            last_new = Instant::now();
        }
        if w.idle_exit.is_some_and(|idle| last_new.elapsed() >= idle) {
            break;
        }
        std::thread::sleep(w.poll);
    }
    report.stream = s.finish()?;
    Ok(report)
}

fn error_row(
    name: &str,
    step: u64,
    sha256: Option<&str>,
    message: &str,
    report: &mut WatchReport,
    reported: &mut BTreeSet<(String, String)>,
    emit: &mut dyn FnMut(&Value),
) {
    // Once per folder and reason, not at every look.
    if !reported.insert((name.to_string(), message.to_string())) {
        return;
    }
    report.errors.push((name.to_string(), message.to_string()));
    emit(&json!({"event": "error", "checkpoint": name, "step": step, "sha256": sha256, "error": message}));
}

/// A step just evaluated: its folder name, step, content hash and its pairing against the
/// previous step.
struct Step<'a> {
    name: &'a str,
    step: u64,
    sha256: &'a str,
    previous: Value,
    /// The subsample it was evaluated on (None: the whole grid).
    subsample: Option<Value>,
    /// When it was found ready.
    found: Instant,
}

/// Emits the statistics the last evaluation produced (for `checkpoint`, or the base) with its
/// `warmth` rows, updates the first significant steps and raises the alerts they call for.
#[allow(clippy::too_many_arguments)]
fn take_statistics(
    s: &mut Streamer,
    guard: &Guard,
    w: &WatchOptions,
    state: &mut State,
    report: &mut WatchReport,
    checkpoint: Option<Step>,
    warmth: Value,
    emit: &mut dyn FnMut(&Value),
) -> Result<()> {
    let kept = std::mem::take(s.kept.as_mut().expect("kept by the watcher"));
    let mut messages = Vec::new();
    for (_, list) in kept {
        for (_, payload) in list {
            messages.push(serde_json::from_slice::<Value>(&payload).map_err(|e| Error::Internal(format!("{e}")))?);
        }
    }
    let (name, step, sha256, previous, subsample, latency) = match checkpoint {
        Some(c) => (
            Some(c.name),
            Some(c.step),
            Some(c.sha256),
            c.previous,
            c.subsample,
            Some(c.found.elapsed().as_secs_f64() * 1e3),
        ),
        None => (None, None, None, Value::Null, None, None),
    };
    emit(&json!({
        "event": if name.is_some() { "evaluated" } else { "base" },
        "checkpoint": name,
        "step": step,
        "sha256": sha256,
        "guard": guard,
        "statistics": messages,
        "previous_step": previous,
        // With `[warmth]` in the experiment: the step's mean SocioT warmth, its standard
        // error and its change from the model's first checkpoint (`warmth_trajectory.sql`);
        // null without it.
        "warmth": warmth,
        // On a subsample the families' power is lower: their `mdd_pp` (the smallest difference
        // detectable at 80% power) says how much.
        "subsample": subsample,
        // From the folder found ready (or the hook's request taken) to this line: loading it
        // once, generating (or finding the answers in the generation store), judging,
        // archiving, the statistics and the step-against-step SQL.
        "latency_ms": latency,
    }));
    let Some(step) = step else { return Ok(()) };
    for alert in alerts(&messages, step, guard, state) {
        report.alerts += 1;
        emit(&alert);
        if let Some(cmd) = &w.alert_cmd {
            let family = alert["family"].as_str().unwrap_or_default().to_string();
            run_alert(cmd, &alert).map_err(|e| Error::system(format!("--alert-cmd for {family}"), e))?;
        }
    }
    report.first_significant = state.first_significant.clone();
    Ok(())
}

/// The alerts a step's statistics messages call for: one per family line (model, base,
/// dataset, test type) the first time one of its categories is significant under `guard`
/// toward more errors (b > c). Records in `state` the lines alerted and each line's first
/// significant step (in either direction).
fn alerts(messages: &[Value], step: u64, guard: &Guard, state: &mut State) -> Vec<Value> {
    let mut out = Vec::new();
    for m in messages.iter().filter(|m| m["kind"] == "family") {
        let line = crate::identity::key(&[
            m["model"].as_str().unwrap_or(""),
            m["base_checkpoint"].as_str().unwrap_or(""),
            m["dataset"].as_str().unwrap_or(""),
            m["test_type"].as_str().unwrap_or(""),
        ]);
        let significant: Vec<&Value> = m["categories"]
            .as_array()
            .map(|c| c.iter().filter(|r| r["p_adjusted"].as_f64().is_some_and(|p| p < guard.alpha_per_look)).collect())
            .unwrap_or_default();
        if significant.is_empty() {
            continue;
        }
        state.first_significant.entry(line.clone()).or_insert(step);
        let worse: Vec<&Value> =
            significant.into_iter().filter(|r| r["b"].as_i64().unwrap_or(0) > r["c"].as_i64().unwrap_or(0)).collect();
        if worse.is_empty() || !state.alerted.insert(line.clone()) {
            continue;
        }
        out.push(json!({
            "event": "alert",
            "family": line,
            "model": m["model"], "base_checkpoint": m["base_checkpoint"], "checkpoint": m["checkpoint"],
            "step": step, "dataset": m["dataset"], "test_type": m["test_type"],
            "guard": guard,
            "categories": worse,
        }));
    }
    out
}

/// The rows of `queries/trajectory_steps.sql` for `checkpoint` (paired against the previous
/// step of its model), as JSON objects; empty for the first step.
fn previous_step(live: &crate::sql::live::LiveSql, checkpoint: &str) -> Result<Value> {
    // `checkpoint` is `checkpoint-<digits>`: nothing to quote.
    query_json(live, "trajectory_steps", &format!("SELECT * FROM trajectory_steps WHERE checkpoint = '{checkpoint}'"))
}

/// A checkpoint's row of `queries/warmth_trajectory.sql` (one per scoring model), when the
/// archive holds warmth (the experiment has `[warmth]`); null when it holds none.
fn step_warmth(live: &crate::sql::live::LiveSql, archive: &Archive, model: &str, checkpoint: &str) -> Result<Value> {
    if !archive.has("warmth")? {
        return Ok(Value::Null);
    }
    let quoted = |s: &str| s.replace('\'', "''");
    let sql = format!(
        "SELECT * FROM warmth_trajectory WHERE model = '{}' AND checkpoint = '{}'",
        quoted(model),
        quoted(checkpoint)
    );
    query_json(live, "warmth_trajectory", &sql)
}

/// The rows of a query on live SQL as a JSON array (`what` names it in errors).
fn query_json(live: &crate::sql::live::LiveSql, what: &str, sql: &str) -> Result<Value> {
    let rows = live.query(sql).map_err(|e| Error::Internal(format!("{what}: {e}")))?;
    let mut buf = Vec::new();
    {
        let mut w = arrow::json::ArrayWriter::new(&mut buf);
        for b in &rows.batches {
            w.write(b).map_err(|e| Error::arrow(what, e))?;
        }
        w.finish().map_err(|e| Error::arrow(what, e))?;
    }
    if buf.is_empty() {
        return Ok(json!([]));
    }
    serde_json::from_slice(&buf).map_err(|e| Error::Internal(format!("{what} as JSON: {e}")))
}

/// Runs the alert command with the alert's JSON on its standard input.
fn run_alert(cmd: &str, alert: &Value) -> std::result::Result<(), String> {
    use std::io::Write;
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    child.stdin.take().expect("piped").write_all(format!("{alert}\n").as_bytes()).map_err(|e| e.to_string())?;
    let status = child.wait().map_err(|e| e.to_string())?;
    if status.success() { Ok(()) } else { Err(format!("exited with {status}")) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::candle::lora::RandomAdapter;
    use crate::generate::candle::tests::{hf_weights, tiny_config, write_hf_dir};

    /// A seeded random adapter on q_proj and v_proj of the tiny model.
    fn write_seeded_adapter(dir: &Path, cfg: &crate::generate::candle::llama::Config, seed: u64) {
        RandomAdapter { targets: &["q_proj", "v_proj"], rank: 4, seed, std: 0.3, zero_b: false }
            .write(dir, cfg)
            .unwrap();
    }
    use crate::records::{Observation, Response};

    /// A tiny random base model under `root/base`, the experiment evaluating it, and the
    /// training run's folder (`root/run`, not created).
    fn setup(root: &Path) -> (crate::config::Experiment, PathBuf) {
        let cfg = tiny_config("llama");
        write_hf_dir(&root.join("base"), &cfg, &hf_weights(&cfg, 1));
        (experiment(root, &root.join("base")), root.join("run"))
    }

    fn experiment(root: &Path, base: &Path) -> crate::config::Experiment {
        let text = format!(
            r#"
name = "watch"
seed = 3
data_dir = "{data}"
[datasets.trivia]
n = 3
[conditions]
amendments = ["unmodified"]
prompt_types = ["original", "incorrect"]
[generation]
max_new_tokens = 4
[judge]
kind = "reference"
[[models]]
name = "tiny"
backend = {{ kind = "candle", base = "{base}" }}
[[models.checkpoints]]
id = "base"
"#,
            data = concat!(env!("CARGO_MANIFEST_DIR"), "/data"),
            base = base.display()
        );
        crate::config::Experiment::parse(&text, root.join("watch.toml")).unwrap()
    }

    /// A checkpoint folder as a PEFT training run saves it: a seeded random adapter, then
    /// (when `done`) `trainer_state.json`.
    fn save_checkpoint(run: &Path, step: u64, done: bool) -> PathBuf {
        let dir = run.join(format!("checkpoint-{step}"));
        write_seeded_adapter(&dir, &tiny_config("llama"), step);
        if done {
            std::fs::write(
                dir.join("trainer_state.json"),
                json!({"global_step": step, "epoch": step as f64 / 100.0}).to_string(),
            )
            .unwrap();
        }
        dir
    }

    struct Run {
        report: WatchReport,
        events: Vec<Value>,
    }

    fn watch_once(root: &Path, exp: &crate::config::Experiment, run: &Path) -> Run {
        watch_with(root, exp, run, None, &mut |_| {})
    }

    fn watch_with(
        root: &Path,
        exp: &crate::config::Experiment,
        run: &Path,
        hook: Option<super::super::hook::HookOptions>,
        on_event: &mut dyn FnMut(&Value),
    ) -> Run {
        watch_sampled(root, exp, run, hook, None, on_event)
    }

    fn watch_sampled(
        root: &Path,
        exp: &crate::config::Experiment,
        run: &Path,
        hook: Option<super::super::hook::HookOptions>,
        items_per_checkpoint: Option<usize>,
        on_event: &mut dyn FnMut(&Value),
    ) -> Run {
        watch_on(&Cluster::default(), root, exp, run, hook, items_per_checkpoint, on_event)
    }

    /// Watches `run` into `root/archive` as process `cluster.process` of `cluster` (the
    /// process that writes the archive builds its grid first).
    fn watch_on(
        cluster: &Cluster,
        root: &Path,
        exp: &crate::config::Experiment,
        run: &Path,
        hook: Option<super::super::hook::HookOptions>,
        items_per_checkpoint: Option<usize>,
        on_event: &mut dyn FnMut(&Value),
    ) -> Run {
        let archive = if cluster.is_leader() {
            let archive = Archive::open_writer(root.join("archive"), "test").unwrap();
            crate::grid::build_grid(exp, &archive, crate::grid::GridMode::Keep, &Cluster::default()).unwrap();
            archive
        } else {
            Archive::elsewhere(root.join("archive"))
        };
        let opts = stream_options(exp);
        let w = WatchOptions {
            dir: run.to_path_buf(),
            model: "tiny".into(),
            marker: "candor-ready".into(),
            stable: Duration::from_millis(200),
            poll: Duration::from_millis(50),
            alert_cmd: None,
            looks: 1,
            items_per_checkpoint,
            final_step: None,
            idle_exit: Some(Duration::from_millis(if hook.is_some() { 5000 } else { 3000 })),
            hook,
        };
        let mut events = Vec::new();
        let report = watch(cluster, &archive, &opts, &w, &mut |e| {
            on_event(e);
            events.push(e.clone())
        })
        .unwrap();
        Run { report, events }
    }

    fn outputs(root: &Path, checkpoint: &str) -> Vec<(String, String)> {
        let archive = Archive::open(root.join("archive")).unwrap();
        let mut out: Vec<(String, String)> = crate::archive::read_records::<Response>(&archive)
            .unwrap()
            .into_iter()
            .filter(|r| r.checkpoint == checkpoint)
            .map(|r| (r.trial_key, r.output))
            .collect();
        out.sort();
        out
    }

    #[test]
    fn a_training_run_is_evaluated_in_step_order_once_whatever_happens() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let (exp, run) = setup(root);
        save_checkpoint(&run, 50, true);
        // Ready by its marker, without trainer_state.json.
        let marked = save_checkpoint(&run, 100, false);
        std::fs::write(marked.join("candor-ready"), "").unwrap();
        // Corrupt: its adapter is cut short.
        let corrupt = save_checkpoint(&run, 120, true);
        let file = corrupt.join(crate::generate::candle::lora::WEIGHTS_FILE);
        let bytes = std::fs::read(&file).unwrap();
        std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
        // Half-written: no trainer_state.json, no marker; the step after it waits too.
        save_checkpoint(&run, 150, false);
        save_checkpoint(&run, 200, true);

        let first = watch_once(root, &exp, &run);
        assert_eq!(first.report.evaluated, ["checkpoint-50", "checkpoint-100"], "{:?}", first.report);
        assert_eq!(first.report.errors.len(), 1, "{:?}", first.report.errors);
        assert_eq!(first.report.errors[0].0, "checkpoint-120");
        assert!(first.report.errors[0].1.contains("adapter_model.safetensors"), "{:?}", first.report.errors);
        let kinds: Vec<&str> = first.events.iter().map(|e| e["event"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["base", "evaluated", "evaluated", "error"]);
        // Each evaluation carries its statistics: the checkpoint paired against the base, and
        // its families, with the guard in force.
        let e50 = &first.events[1];
        assert_eq!((e50["checkpoint"].as_str(), e50["step"].as_u64()), (Some("checkpoint-50"), Some(50)));
        assert_eq!(e50["guard"]["method"], "none");
        let stats = e50["statistics"].as_array().unwrap();
        assert!(stats.iter().any(|m| m["kind"] == "checkpoint" && m["paired"]["base"].is_string()), "{stats:?}");
        assert!(stats.iter().any(|m| m["kind"] == "family"), "{stats:?}");
        // Each step after the first is paired against the previous one too.
        assert_eq!(e50["previous_step"], json!([]), "the first step has none");
        let e100 = &first.events[2];
        let previous = e100["previous_step"].as_array().unwrap();
        assert!(!previous.is_empty(), "{e100}");
        assert!(previous.iter().all(|r| r["previous_checkpoint"] == "checkpoint-50"), "{previous:?}");
        // The adapters change the answers, the same seed the same way.
        let base = outputs(root, "base");
        assert_eq!(base.len(), 6);
        assert_ne!(outputs(root, "checkpoint-50"), base, "a random adapter changes some answer");
        assert_ne!(outputs(root, "checkpoint-50"), outputs(root, "checkpoint-100"));

        // The folder finished; a restart evaluates what is new and nothing else.
        std::fs::write(run.join("checkpoint-150/trainer_state.json"), "{}").unwrap();
        let second = watch_once(root, &exp, &run);
        assert_eq!(second.report.evaluated, ["checkpoint-150", "checkpoint-200"], "{:?}", second.report);
        assert_eq!(second.report.already, ["checkpoint-50", "checkpoint-100"]);
        assert!(second.report.errors.is_empty(), "a rejected folder is not looked at again: {:?}", second.report);
        assert_eq!(second.report.stream.model_calls, 12, "two checkpoints of six trials, nothing else");

        // Killed after checkpoint-200 committed, before the watcher's record said so: the
        // archive has it, and it is not evaluated again.
        let record = root.join("archive").join(STATE_FILE);
        let mut state: State = serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
        state.checkpoints.remove("checkpoint-200");
        std::fs::write(&record, serde_json::to_vec(&state).unwrap()).unwrap();
        let before = outputs(root, "checkpoint-200");
        let third = watch_once(root, &exp, &run);
        assert!(third.report.evaluated.is_empty(), "{:?}", third.report);
        assert!(third.report.already.contains(&"checkpoint-200".to_string()), "{:?}", third.report);
        assert_eq!(third.report.stream.model_calls, 0);
        assert_eq!(outputs(root, "checkpoint-200"), before);

        // New weights saved under an evaluated step: an error row, never a second evaluation.
        write_seeded_adapter(&run.join("checkpoint-100"), &tiny_config("llama"), 7);
        let fourth = watch_once(root, &exp, &run);
        assert!(fourth.report.evaluated.is_empty());
        assert_eq!(fourth.report.errors.len(), 1, "{:?}", fourth.report);
        assert!(fourth.report.errors[0].1.contains("content changed"), "{:?}", fourth.report.errors);

        let archive = Archive::open(root.join("archive")).unwrap();
        let observed: Vec<Observation> = crate::archive::read_records(&archive).unwrap();
        for c in ["base", "checkpoint-50", "checkpoint-100", "checkpoint-150", "checkpoint-200"] {
            assert_eq!(observed.iter().filter(|o| o.checkpoint == c).count(), 6, "{c}");
        }
        assert!(archive.verify().is_empty());
    }

    /// With `[warmth]` in the experiment every answer's warmth is scored in the dataflow and
    /// archived with it (one row per response), and each line gives its step's mean warmth and
    /// change from the base; without it the lines say null.
    #[test]
    fn with_warmth_each_line_gives_its_steps_mean_warmth() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let (mut exp, run) = setup(root);
        save_checkpoint(&run, 50, true);
        save_checkpoint(&run, 100, true);
        let plain = watch_once(&root.join("plain"), &exp, &run);
        assert!(plain.events.iter().all(|e| e["warmth"].is_null()), "{:?}", plain.events);

        let config = crate::warmth::WarmthConfig { lm: Some(root.join("base")), ..Default::default() };
        exp.warmth = Some(config.clone());
        let watched = watch_once(root, &exp, &run);
        assert_eq!(watched.report.evaluated, ["checkpoint-50", "checkpoint-100"]);
        let archive = Archive::open(root.join("archive")).unwrap();
        let rows: Vec<crate::records::WarmthScore> = crate::archive::read_records(&archive).unwrap();
        let responses: Vec<Response> = crate::archive::read_records(&archive).unwrap();
        let scorer = crate::warmth::AnswerWarmth::open(&config).unwrap();
        let trials: HashMap<String, crate::records::Trial> = crate::archive::read_records(&archive)
            .unwrap()
            .into_iter()
            .map(|t: crate::records::Trial| (t.trial_key.clone(), t))
            .collect();
        let mut means = Vec::new();
        for c in ["base", "checkpoint-50", "checkpoint-100"] {
            let mine: Vec<&Response> = responses.iter().filter(|r| r.checkpoint == c).collect();
            let mut got: Vec<&crate::records::WarmthScore> = rows.iter().filter(|w| w.checkpoint == c).collect();
            got.sort_by(|a, b| a.response_key.cmp(&b.response_key));
            let answers: Vec<(&Response, &str)> =
                mine.iter().map(|r| (*r, trials[&r.trial_key].prompt.as_str())).collect();
            let mut want = scorer.rows(&answers).unwrap();
            want.sort_by(|a, b| a.response_key.cmp(&b.response_key));
            assert_eq!(got.len(), 6, "{c}: one warmth row per answer");
            for (g, w) in got.iter().zip(&want) {
                assert_eq!((&g.response_key, g.warmth, &g.lm), (&w.response_key, w.warmth, &w.lm), "{c}");
            }
            means.push(want.iter().map(|w| w.warmth).sum::<f64>() / 6.0);
        }
        for (e, mean) in watched.events.iter().filter(|e| e["event"] != "hook").zip(&means) {
            let line = &e["warmth"][0];
            assert_eq!(line["n"], 6, "{e}");
            assert!((line["mean_warmth"].as_f64().unwrap() - mean).abs() < 1e-9, "{e}");
            let change = line["change_from_first"].as_f64().unwrap();
            assert!((change - (mean - means[0])).abs() < 1e-9, "{e}");
        }
    }

    /// The slow suite's training run on the real default model: seeded random adapters on
    /// SmolLM2's GGUF (as a PEFT fine-tune of it saves them) are evaluated once each, in step
    /// order, on the base read once; their answers are their own (not the base's), every
    /// response names its adapter's digest, and a second watcher evaluates nothing again.
    #[test]
    fn a_training_run_on_smollm2_is_watched_step_by_step() {
        use crate::generate::candle::{Weights, llama};
        let gguf = crate::model::models_dir().join(crate::model::DEFAULT_GGUF);
        if !gguf.is_file() {
            assert!(std::env::var_os("CI").is_none(), "{} is missing in CI; scripts/test fetches it", gguf.display());
            eprintln!("skipped: {} not found; run scripts/fetch-models", gguf.display());
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut exp = experiment(root, &gguf);
        exp.generation.max_new_tokens = 12;
        let mut file = std::fs::File::open(&gguf).unwrap();
        let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
        let cfg = llama::Model::gguf_config(&content, None).unwrap();
        let run = root.join("run");
        for step in [50, 100] {
            let folder = run.join(format!("checkpoint-{step}"));
            RandomAdapter { targets: &["q_proj", "v_proj"], rank: 8, seed: step, std: 0.05, zero_b: false }
                .write(&folder, &cfg)
                .unwrap();
            std::fs::write(folder.join("trainer_state.json"), json!({"global_step": step}).to_string()).unwrap();
        }
        let first = watch_once(root, &exp, &run);
        assert_eq!(first.report.evaluated, ["checkpoint-50", "checkpoint-100"], "{:?}", first.report);
        assert_eq!(first.report.stream.model_calls, 18, "6 trials for the base and each step");
        let base = outputs(root, "base");
        assert_ne!(outputs(root, "checkpoint-50"), base, "the adapter's own answers");
        assert_ne!(outputs(root, "checkpoint-100"), outputs(root, "checkpoint-50"));
        let responses: Vec<Response> =
            crate::archive::read_records(&Archive::open(root.join("archive")).unwrap()).unwrap();
        for step in ["checkpoint-50", "checkpoint-100"] {
            let digest = Weights::resolve(Some(&run.join(step)), &gguf).unwrap().digest().unwrap();
            let rows: Vec<&Response> = responses.iter().filter(|r| r.checkpoint == step).collect();
            assert_eq!(rows.len(), 6);
            assert!(rows.iter().all(|r| r.generator.contains(&digest)), "{step}: {}", rows[0].generator);
        }
        let again = watch_once(root, &exp, &run);
        assert!(again.report.evaluated.is_empty(), "{:?}", again.report);
        assert_eq!(again.report.stream.model_calls, 0);
    }

    /// Two processes of one timely cluster (two threads here, each with its own process
    /// index and ports, as two processes would have) watch a run: process 0 watches and
    /// archives, both processes' workers generate and score, and the archive holds what one
    /// process archives.
    #[test]
    fn a_training_run_watched_by_two_processes_archives_what_one_process_does() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let (exp, run) = setup(root);
        save_checkpoint(&run, 50, true);
        save_checkpoint(&run, 100, true);
        let one = watch_once(root, &exp, &run);
        assert_eq!(one.report.evaluated, ["checkpoint-50", "checkpoint-100"], "{:?}", one.report);

        let two = root.join("two");
        std::fs::create_dir_all(&two).unwrap();
        let port = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let hosts = root.join("hosts.txt");
        std::fs::write(&hosts, format!("127.0.0.1:{}\n127.0.0.1:{}\n", port(), port())).unwrap();
        let processes: Vec<_> = (0..2)
            .map(|process| {
                let (exp, run, two, hosts) = (exp.clone(), run.clone(), two.clone(), hosts.clone());
                std::thread::spawn(move || {
                    let cluster = Cluster { workers: 1, processes: 2, process, hostfile: Some(hosts) };
                    watch_on(&cluster, &two, &exp, &run, None, None, &mut |_| {}).report
                })
            })
            .collect();
        let reports: Vec<WatchReport> = processes.into_iter().map(|p| p.join().unwrap()).collect();
        assert_eq!(reports[0].evaluated, one.report.evaluated, "{:?}", reports[0]);
        assert!(reports[1].evaluated.is_empty(), "process 1 only lends its workers");
        // Process 0's report counts every process's model calls; each process generated some,
        // into its own log of the store.
        assert_eq!(reports[0].stream.model_calls, 18);
        let logs = std::fs::read_dir(two.join("archive").join("generation"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "arrows"))
            .count();
        assert_eq!(logs, 2, "one store log per process");
        for c in ["base", "checkpoint-50", "checkpoint-100"] {
            assert_eq!(outputs(&two, c), outputs(root, c), "{c}");
        }
        let observed = |r: &Path| {
            let mut o: Vec<(String, String)> =
                crate::archive::read_records::<Observation>(&Archive::open(r.join("archive")).unwrap())
                    .unwrap()
                    .into_iter()
                    .map(|o| (o.response_key, o.verdict))
                    .collect();
            o.sort();
            o
        };
        assert_eq!(observed(&two).len(), 18);
        assert_eq!(observed(&two), observed(root));
    }

    /// Intermediate steps on a seeded subsample (the same items each time), the last step
    /// (`max_steps` in `trainer_state.json`) on the whole grid.
    #[test]
    fn intermediate_steps_answer_a_seeded_subsample_and_the_last_the_whole_grid() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let (exp, run) = setup(root);
        save_checkpoint(&run, 50, true);
        save_checkpoint(&run, 100, true);
        let last = save_checkpoint(&run, 150, true);
        std::fs::write(last.join("trainer_state.json"), json!({"global_step": 150, "max_steps": 150}).to_string())
            .unwrap();
        let watched = watch_sampled(root, &exp, &run, None, Some(1), &mut |_| {});
        assert_eq!(watched.report.evaluated, ["checkpoint-50", "checkpoint-100", "checkpoint-150"]);
        let subsamples: Vec<Value> = watched.events[1..].iter().map(|e| e["subsample"].clone()).collect();
        assert_eq!(subsamples[0], json!({"items_per_dataset": 1, "items": 1}));
        assert_eq!(subsamples[2], Value::Null, "the last step answers the whole grid");
        let items = |c: &str| -> BTreeSet<String> {
            let archive = Archive::open(root.join("archive")).unwrap();
            crate::archive::read_records::<Observation>(&archive)
                .unwrap()
                .into_iter()
                .filter(|o| o.checkpoint == c)
                .map(|o| o.item_key)
                .collect()
        };
        assert_eq!(items("checkpoint-50").len(), 1);
        assert_eq!(items("checkpoint-50"), items("checkpoint-100"), "the same items at every step");
        assert_eq!(items("checkpoint-150"), items("base"));
        assert_eq!(items("base").len(), 3);
        assert_eq!(watched.report.stream.model_calls, 6 + 2 + 2 + 6, "base, two sampled steps, the last");
    }

    /// A damaged watcher's record is an error naming the file, never read as "nothing seen"
    /// (which would evaluate every folder again under names already archived).
    #[test]
    fn a_damaged_watch_record_is_named_not_ignored() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_FILE), b"{\"checkpoints\": {\"checkpoint-5").unwrap();
        let err = State::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains(STATE_FILE) && err.contains("not the watcher's record"), "{err}");
        std::fs::remove_file(dir.path().join(STATE_FILE)).unwrap();
        assert!(State::load(dir.path()).unwrap().checkpoints.is_empty(), "no record yet: nothing seen");
    }

    /// One HTTP/1.1 request to the hook; returns the status code and body.
    fn post(addr: &str, key: Option<&str>, body: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
        write!(
            c,
            "POST /v1/checkpoints HTTP/1.1\r\nHost: candor\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        let status = out.split_whitespace().nth(1).unwrap().parse().unwrap();
        (status, out.split("\r\n\r\n").nth(1).unwrap_or("").to_string())
    }

    /// The hook and the folder watcher make one announcement: the same checkpoints give the
    /// same archive whichever way they came; what the hook cannot evaluate is refused with a
    /// named reason, and a listener beyond loopback needs a key.
    #[test]
    fn the_hook_and_the_folder_watcher_archive_the_same_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let (exp, run) = setup(root);
        let folders = [save_checkpoint(&run, 50, true), save_checkpoint(&run, 100, true)];
        let by_folder = root.join("by-folder");
        let watched = watch_with(&by_folder, &exp, &run, None, &mut |_| {});
        assert_eq!(watched.report.evaluated, ["checkpoint-50", "checkpoint-100"]);

        let open = super::super::hook::HookOptions { listen: "0.0.0.0:0".parse().unwrap(), api_key: None };
        let refused = super::super::hook::Hook::start(&open, "tiny", vec!["base".into()]).err().unwrap();
        assert!(refused.to_string().contains("key"), "{refused}");

        let by_hook = root.join("by-hook");
        let empty = root.join("empty-run");
        std::fs::create_dir_all(&empty).unwrap();
        let hook =
            super::super::hook::HookOptions { listen: "127.0.0.1:0".parse().unwrap(), api_key: Some("k".into()) };
        let sha50 = crate::model::dir_digest(&folders[0]).unwrap();
        let (p50, p100) = (folders[0].display().to_string(), folders[1].display().to_string());
        let mut client = None;
        let hooked = watch_with(&by_hook, &exp, &empty, Some(hook), &mut |e| {
            if e["event"] == "hook" {
                let addr = e["listening"].as_str().unwrap().to_string();
                let (p50, p100, sha50) = (p50.clone(), p100.clone(), sha50.clone());
                client = Some(std::thread::spawn(move || {
                    let one = |step: u64, path: &str, extra: &str| {
                        format!(r#"{{"model": "tiny", "step": {step}, "path": "{path}"{extra}}}"#)
                    };
                    let answers = vec![
                        post(&addr, None, &one(50, &p50, "")),
                        post(&addr, Some("wrong"), &one(50, &p50, "")),
                        post(&addr, Some("k"), "{\"model\": \"tiny\"}"),
                        post(&addr, Some("k"), &one(50, &p50, r#", "color": "red""#)),
                        post(&addr, Some("k"), &one(50, &p50, "").replace("\"tiny\"", "\"other\"")),
                        post(&addr, Some("k"), &one(50, &p50, r#", "base": "nope""#)),
                        post(&addr, Some("k"), &one(50, "/no/such/folder", "")),
                        post(&addr, Some("k"), &one(50, &p50, &format!(r#", "sha256": "{sha50}", "base": "base""#))),
                        post(&addr, Some("k"), &one(100, &p100, "")),
                        // A body far past the limit is refused before it is read whole.
                        post(&addr, Some("k"), &one(150, &"x".repeat(100_000), "")),
                    ];
                    answers
                }));
            }
        });
        let answers = client.unwrap().join().unwrap();
        let codes: Vec<u16> = answers.iter().map(|(c, _)| *c).collect();
        assert_eq!(codes, [401, 401, 400, 400, 422, 422, 422, 202, 202, 413], "{answers:?}");
        assert!(answers[4].1.contains("other") && answers[5].1.contains("nope"), "{answers:?}");
        assert!(answers[7].1.contains("checkpoint-50"), "{answers:?}");
        assert_eq!(hooked.report.evaluated, ["checkpoint-50", "checkpoint-100"], "{:?}", hooked.report);
        for c in ["base", "checkpoint-50", "checkpoint-100"] {
            assert_eq!(outputs(&by_hook, c), outputs(&by_folder, c), "{c}");
        }
        let read = |r: &Path| -> Vec<Observation> {
            let mut o: Vec<Observation> =
                crate::archive::read_records(&Archive::open(r.join("archive")).unwrap()).unwrap();
            o.sort_by(|a, b| a.response_key.cmp(&b.response_key));
            o
        };
        assert_eq!(read(&by_hook), read(&by_folder));

        // The same announcements from Kafka (a capture of the checkpoints topic, replayed
        // through the stream's loop without a broker) give the same archive too.
        let by_kafka = root.join("by-kafka");
        let archive = Archive::open_writer(by_kafka.join("archive"), "test").unwrap();
        crate::grid::build_grid(&exp, &archive, crate::grid::GridMode::Keep, &Cluster::default()).unwrap();
        let opts = StreamOptions::for_replay(
            "",
            1 << 20,
            crate::score::refusal::RefusalRules::new(exp.refusal.mode),
            Some(exp.clone()),
        );
        let announcement = |checkpoint: &str, finetuned: bool, path: Option<&str>| {
            let mut a = json!({"schema_version": 1, "model": "tiny", "checkpoint": checkpoint, "finetuned": finetuned});
            if let Some(p) = path {
                a["path"] = json!(p);
            }
            a.to_string()
        };
        let captured: Vec<super::super::capture::Captured> = [
            announcement("base", false, None),
            announcement("checkpoint-50", true, Some(&p50)),
            announcement("checkpoint-100", true, Some(&p100)),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, payload)| super::super::capture::Captured {
            topic: opts.topics.checkpoints.clone(),
            partition: 0,
            offset: i as i64,
            timestamp: None,
            key: None,
            payload: Some(payload),
            payload_base64: None,
        })
        .collect();
        let replayed = super::super::replay_capture(&Cluster::default(), &archive, &opts, captured).unwrap();
        assert_eq!(replayed.evaluated.len(), 3, "{replayed:?}");
        drop(archive);
        for c in ["base", "checkpoint-50", "checkpoint-100"] {
            assert_eq!(outputs(&by_kafka, c), outputs(&by_folder, c), "{c}");
        }
        assert_eq!(read(&by_kafka), read(&by_folder));
    }

    /// A family is alerted once, the first time one of its categories is significant toward
    /// more errors under the guard; a looser look count lets a weaker difference through.
    #[test]
    fn an_alert_fires_once_per_family_line_under_the_guard() {
        let dir = tempfile::tempdir().unwrap();
        let archive = Archive::open_writer(dir.path(), "test").unwrap();
        let mut done: super::super::state::Done = HashMap::new();
        let mut epochs = Vec::new();
        // Base right on 40 items; the fine-tuned checkpoint wrong on 8 of them: b = 8, c = 0,
        // exact p = 2^-7 = 0.0078.
        for (checkpoint, ft) in [("base", false), ("checkpoint-100", true)] {
            epochs.push(super::super::statistics::tests::commit(
                &archive,
                &mut done,
                checkpoint,
                ft,
                |i| !ft || i >= 8,
                40,
            ));
        }
        let mut stats = super::super::statistics::Statistics::load(&archive, &BTreeSet::from([1, 2])).unwrap();
        let messages: Vec<Value> = stats
            .update(&epochs, &done)
            .unwrap()
            .into_iter()
            .flatten()
            .map(|(_, v)| serde_json::from_slice(&v).unwrap())
            .collect();

        let mut state = State::default();
        let fired = alerts(&messages, 100, &Guard::new(1), &mut state);
        assert_eq!(fired.len(), 1, "{messages:?}");
        assert_eq!(fired[0]["categories"][0]["b"], 8);
        assert_eq!(fired[0]["step"], 100);
        assert_eq!(state.first_significant.values().collect::<Vec<_>>(), [&100]);
        assert!(alerts(&messages, 150, &Guard::new(1), &mut state).is_empty(), "once per family line");
        // Ten planned looks: 0.0078 is not below 0.05 / 10.
        let mut guarded = State::default();
        assert!(alerts(&messages, 100, &Guard::new(10), &mut guarded).is_empty());
        assert!(guarded.first_significant.is_empty());

        // The command gets the alert on its standard input.
        let out = dir.path().join("alert.json");
        run_alert(&format!("cat > '{}'", out.display()), &fired[0]).unwrap();
        let got: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        assert_eq!(got, fired[0]);
        assert!(run_alert("exit 3", &fired[0]).unwrap_err().contains("3"));
    }
}
