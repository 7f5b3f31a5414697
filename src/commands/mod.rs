//! One module per `candor` command: its arguments (clap) and its `run`, which does the work and
//! returns what is left to print as a [`Report`]: a table for a person, JSON lines for a program
//! (`--json`, or stdout not a terminal). `cli.rs` only parses the command line and dispatches.
//!
//! A command that serves (`serve`, `sql --listen`, `run --sql-listen`) prints the address it
//! listens on as soon as it does, since a client waits for it; the other commands print
//! nothing but their report, progress and notices going to stderr.

pub mod agreement;
pub mod analyze;
pub mod bench;
pub mod capture;
pub mod import;
pub mod judge;
pub mod replay;
pub mod report;
pub mod rescore;
pub mod run;
pub mod schema;
pub mod serve;
pub mod sql;
pub mod stream;
pub mod trials;
pub mod verify;
pub mod warmth;
pub mod watch;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use candor::archive::Archive;
use candor::archive::read_records;
use candor::config::Experiment;
use candor::dataflow::{Cluster, EpochDone};
use candor::records::Observation;
use candor::score::refusal::{RefusalMode, RefusalRules};

/// The flags every command takes (`candor --json --paper <command>`).
#[derive(Clone, Copy, Debug)]
pub struct Globals {
    /// Print JSON lines instead of tables.
    pub json: bool,
    /// The paper's refusal list and prompt templates (an explicit `--refusal` still wins).
    pub paper: bool,
}

/// What a command prints when it is done.
pub trait Report {
    /// For a person: tables and sentences.
    fn table(&self) -> Result<()>;
    /// For a program: JSON lines.
    fn json(&self) -> Result<()>;
    /// What is left to do once the report is printed: fail with the problems it listed
    /// (`verify`), or keep serving (`run --sql-stay`). Nothing, for most commands.
    fn finish(self) -> Result<()>
    where
        Self: Sized,
    {
        Ok(())
    }
}

/// Prints a command's report in the form asked for, then finishes it.
pub fn show(report: impl Report, json: bool) -> Result<()> {
    if json {
        report.json()?
    } else {
        report.table()?
    }
    report.finish()
}

/// A command whose output is all printed while it runs (a server, the SQL shell, a benchmark).
impl Report for () {
    fn table(&self) -> Result<()> {
        Ok(())
    }
    fn json(&self) -> Result<()> {
        Ok(())
    }
}

/// Nothing, on the processes of a cluster that do not write the archive.
impl<R: Report> Report for Option<R> {
    fn table(&self) -> Result<()> {
        self.as_ref().map_or(Ok(()), R::table)
    }
    fn json(&self) -> Result<()> {
        self.as_ref().map_or(Ok(()), R::json)
    }
    fn finish(self) -> Result<()> {
        self.map_or(Ok(()), R::finish)
    }
}

/// The refusal rules of a `--refusal` argument under the `--paper` preset (an explicit
/// argument wins).
pub fn refusal_rules(arg: Option<RefusalMode>, paper: bool) -> RefusalRules {
    RefusalRules::new(arg.unwrap_or(if paper { RefusalMode::Paper } else { RefusalMode::Default }))
}

/// Loads an experiment; `--paper` sets its template style and refusal list to the paper's.
pub fn load_experiment(path: &Path, paper: bool) -> Result<Experiment> {
    let mut exp = Experiment::load(path)?;
    if paper {
        exp.template_style = candor::conditions::TemplateStyle::Paper;
        exp.refusal.mode = RefusalMode::Paper;
    }
    // Commands load their experiment before any thread exists: candle's thread count is fixed here.
    candor::generate::backend::init_threads(&exp.models);
    Ok(exp)
}

/// The archive a writing command writes: opened for writing (created where `out` is new or
/// empty) by the process that writes, or a handle that never touches it on the other
/// processes of a cluster.
pub fn open_for(out: &Path, command: &str, cluster: &Cluster) -> Result<Archive> {
    if cluster.is_leader() {
        Ok(Archive::open_writer(out, command)?)
    } else {
        // Its workers still generate and judge their share, into the archive's generation
        // store, under process 0's lock.
        candor::generate::store::write_as_cluster_follower();
        Ok(Archive::elsewhere(out))
    }
}

/// Verdicts by dataset and label (UNPARSEABLE and JUDGE_ERROR included: they are counted,
/// never folded into INCORRECT).
pub fn verdict_counts(archive: &Archive) -> Result<BTreeMap<String, BTreeMap<String, usize>>> {
    let mut out: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for v in read_records::<candor::records::Verdict>(archive)? {
        let ds = v.trial_key.split('/').next().unwrap_or("").to_string();
        *out.entry(ds).or_default().entry(v.verdict).or_default() += 1;
    }
    Ok(out)
}

/// What a command that scores answers into an archive wrote (`import`, `replay`, `rescore`):
/// the rows of each epoch, then the archive's observations and verdicts.
pub struct EpochsReport {
    command: &'static str,
    epochs: Vec<EpochDone>,
    out: PathBuf,
    observations: usize,
    excluded: usize,
    verdicts: BTreeMap<String, BTreeMap<String, usize>>,
}

impl EpochsReport {
    /// The report of `command`, which wrote `epochs` into the archive at `out`.
    pub fn read(command: &'static str, epochs: Vec<EpochDone>, out: &Path) -> Result<Self> {
        let archive = Archive::open(out)?;
        let obs = read_records::<Observation>(&archive)?;
        let excluded = obs.iter().filter(|o| o.correct.is_none()).count();
        let verdicts = verdict_counts(&archive)?;
        Ok(EpochsReport { command, epochs, out: out.to_path_buf(), observations: obs.len(), excluded, verdicts })
    }
}

impl Report for EpochsReport {
    fn table(&self) -> Result<()> {
        print_epoch_rows(&self.epochs);
        println!(
            "{}: {} observations in {} ({} excluded from statistics)",
            self.command,
            self.observations,
            self.out.display(),
            self.excluded
        );
        print_verdicts(&self.verdicts);
        Ok(())
    }

    fn json(&self) -> Result<()> {
        print_epoch_json(&self.epochs);
        println!(
            "{}",
            serde_json::json!({"command": self.command, "archive": self.out, "observations": self.observations,
                "excluded": self.excluded, "verdicts": self.verdicts})
        );
        Ok(())
    }
}

/// One line per epoch: `epoch 1: 36 observation, 36 response, …`.
pub fn print_epoch_rows(epochs: &[EpochDone]) {
    for d in epochs {
        let rows: Vec<String> = d.rows.iter().map(|(s, n)| format!("{n} {s}")).collect();
        println!("epoch {}: {}", d.epoch, rows.join(", "));
    }
}

/// One JSON line per epoch: `{"epoch": 1, "rows": {…}}`.
pub fn print_epoch_json(epochs: &[EpochDone]) {
    for d in epochs {
        println!("{}", serde_json::json!({"epoch": d.epoch, "rows": d.rows}));
    }
}

/// One indented line per dataset: `  trivia: 30 CORRECT, 6 INCORRECT`.
pub fn print_verdicts(verdicts: &BTreeMap<String, BTreeMap<String, usize>>) {
    for (ds, counts) in verdicts {
        let c: Vec<String> = counts.iter().map(|(v, n)| format!("{n} {v}")).collect();
        println!("  {ds}: {}", c.join(", "));
    }
}

/// Where a Kafka command finds its brokers and topics.
#[derive(Debug, clap::Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, `host:port[,host:port…]`.
    #[arg(long, env = "CANDOR_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// A further Kafka client property, `key=value` (repeatable), e.g.
    /// `security.protocol=SASL_SSL`.
    #[arg(long = "kafka-property", value_name = "KEY=VALUE")]
    pub kafka_properties: Vec<String>,
    /// Prefix of every topic name: `<prefix>checkpoints`, `<prefix>answers`, ….
    #[arg(long, default_value = "candor.")]
    pub topic_prefix: String,
}

impl KafkaArgs {
    /// The brokers and the `--kafka-property KEY=VALUE` settings.
    pub fn connection(&self) -> Result<candor::stream::kafka::Connection> {
        let mut connection = candor::stream::kafka::Connection::new(self.brokers.clone());
        for p in &self.kafka_properties {
            let (k, v) = p.split_once('=').with_context(|| format!("--kafka-property `{p}`: expected KEY=VALUE"))?;
            connection.properties.push((k.trim().to_string(), v.trim().to_string()));
        }
        Ok(connection)
    }
}

/// `1GiB`, `256MiB`, `512MB`, `1e9`, plain bytes.
pub fn parse_bytes_arg(s: &str) -> std::result::Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == 'e')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("`{s}` is not a size (e.g. 1GiB, 256MiB)"))?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1048576.0,
        "g" | "gb" => 1e9,
        "gib" => 1073741824.0,
        _ => return Err(format!("`{s}`: unknown unit (B, KiB, MiB, GiB, KB, MB, GB)")),
    };
    let bytes = n * scale;
    if !(1.0..1e18).contains(&bytes) {
        return Err(format!("`{s}` is not a usable size"));
    }
    Ok(bytes as usize)
}
