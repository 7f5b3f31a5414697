//! `candor stream`: evaluate continuously from Kafka, checkpoint announcements and answer
//! records in; responses, verdicts, observations, statistics and dead letters out.

use std::path::PathBuf;

use anyhow::Result;

use candor::dataflow::Cluster;
use candor::grid::{GridMode, build_grid};
use candor::score::refusal::RefusalRules;

use super::{Globals, KafkaArgs, Report, load_experiment, open_for};

/// What `candor stream` publishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PublishArg {
    All,
    Statistics,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The experiment file (archive location and refusal rules).
    experiment: PathBuf,
    /// Archive directory (default: the experiment's).
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    kafka: KafkaArgs,
    /// Consumer group id (monitoring only: offsets are not committed to Kafka).
    #[arg(long, default_value = "candor-stream")]
    group: String,
    /// Larger messages go to the dead-letter topic.
    #[arg(long, default_value_t = 1 << 20)]
    max_message_bytes: usize,
    /// Exit after this many seconds without a message (default: run forever).
    #[arg(long)]
    idle_exit: Option<f64>,
    /// Milliseconds between state saves while reading (the state is saved also whenever the
    /// stream waits for its evaluations, and at exit).
    #[arg(long, default_value_t = 200)]
    snapshot_ms: u64,
    /// Partitions of the topics Candor creates when they are missing.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// What to publish: every evaluated row and the statistics (`all`), or the statistics
    /// (and dead letters) only, the rows staying in the archive (`statistics`).
    #[arg(long, value_enum, default_value_t = PublishArg::All)]
    publish: PublishArg,
    /// As `candor run --regrid`: build a changed experiment's grid as a new version.
    #[arg(long)]
    regrid: bool,
    #[command(flatten)]
    cluster: Cluster,
}

pub fn run(args: Args, g: &Globals) -> Result<StreamReport> {
    let Args {
        experiment,
        out,
        kafka,
        group,
        max_message_bytes,
        idle_exit,
        snapshot_ms,
        partitions,
        publish,
        regrid,
        cluster,
    } = args;
    let exp = load_experiment(&experiment, g.paper)?;
    let out = out.unwrap_or_else(|| exp.output_dir());
    // One archive per run, written by process 0 (see `candor::stream::run`).
    let archive = open_for(&out, "stream", &cluster)?;
    let connection = kafka.connection()?;
    let opts = candor::stream::StreamOptions {
        connection,
        topics: candor::stream::Topics::with_prefix(&kafka.topic_prefix),
        group,
        max_message_bytes,
        idle_exit: idle_exit.map(std::time::Duration::from_secs_f64),
        snapshot_every: std::time::Duration::from_millis(snapshot_ms),
        partitions,
        refusal: RefusalRules::new(exp.refusal.mode),
        experiment: Some(exp.clone()),
        publish_rows: publish == PublishArg::All,
    };
    // Announcements without answer records are generated over the trial grid.
    if !exp.models.is_empty() && cluster.is_leader() {
        let mode = if regrid { GridMode::Regrid } else { GridMode::Keep };
        build_grid(&exp, &archive, mode, &Cluster::default())?;
    }
    let report = candor::stream::run(&cluster, &archive, &opts)?;
    Ok(StreamReport { out, report })
}

/// What the stream evaluated and published before it stopped: always one JSON line.
pub struct StreamReport {
    out: PathBuf,
    report: candor::stream::StreamReport,
}

impl Report for StreamReport {
    fn table(&self) -> Result<()> {
        self.json()
    }

    fn json(&self) -> Result<()> {
        println!("{}", serde_json::json!({"command": "stream", "archive": self.out, "report": self.report}));
        Ok(())
    }
}
