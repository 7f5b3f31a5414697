//! `candor replay`: an archive's responses through the scoring dataflow again, into a new
//! archive; or a capture of a stream's input topics through `candor stream`'s evaluation.

use std::path::PathBuf;

use anyhow::{Result, bail};

use candor::archive::Archive;
use candor::dataflow::Cluster;
use candor::grid::{GridMode, build_grid};
use candor::records::Response;
use candor::schema::Record;
use candor::score::stage;

use super::{EpochsReport, Globals, Report, load_experiment, open_for, refusal_rules};
use candor::score::refusal::RefusalMode;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The archive to read.
    #[arg(required_unless_present = "capture", conflicts_with = "capture")]
    archive: Option<PathBuf>,
    /// A Kafka capture (JSON lines from `candor capture`, or kcat -J) to replay instead.
    #[arg(long)]
    capture: Option<PathBuf>,
    /// With `--capture`: the experiment whose `[[models]]` generate for announcements without
    /// answer records, as `candor stream` does.
    #[arg(long, requires = "capture")]
    experiment: Option<PathBuf>,
    /// With `--capture`: the topic prefix of the captured stream.
    #[arg(long, default_value = "candor.")]
    topic_prefix: String,
    /// With `--capture`: the live run's `--max-message-bytes`.
    #[arg(long, default_value_t = 1 << 20)]
    max_message_bytes: usize,
    /// The archive to write (must not hold responses yet).
    #[arg(long)]
    out: PathBuf,
    /// Refusal phrase list (default: `default`; `paper` with --paper).
    #[arg(long, value_enum)]
    refusal: Option<RefusalMode>,
    #[command(flatten)]
    cluster: Cluster,
}

pub fn run(args: Args, g: &Globals) -> Result<Option<ReplayReport>> {
    let Args { archive, capture, experiment, topic_prefix, max_message_bytes, out, refusal, cluster } = args;
    if let Some(capture) = capture {
        let messages = candor::stream::capture::read(&capture)?;
        let exp = experiment.as_deref().map(|e| load_experiment(e, g.paper)).transpose()?;
        let target = open_for(&out, "replay", &cluster)?;
        if target.has(Response::STREAM)? {
            bail!("{}: already holds responses; replay into an empty directory", out.display());
        }
        if let Some(exp) = &exp
            && !exp.models.is_empty()
        {
            build_grid(exp, &target, GridMode::Keep, &Cluster::default())?;
        }
        let opts = candor::stream::StreamOptions::for_replay(
            &topic_prefix,
            max_message_bytes,
            refusal_rules(refusal, g.paper),
            exp,
        );
        let report = candor::stream::replay_capture(&cluster, &target, &opts, messages)?;
        return Ok(Some(ReplayReport::Capture { capture, out, report }));
    }
    let archive = archive.expect("clap requires an archive without --capture");
    let source = Archive::open(&archive)?;
    // A replay into an archive a previous replay of the same source began resumes it.
    let target = open_for(&out, "replay", &cluster)?;
    let epochs = stage::replay(&cluster, &source, &target, refusal_rules(refusal, g.paper))?;
    if !cluster.is_leader() {
        return Ok(None);
    }
    Ok(Some(ReplayReport::Archive(EpochsReport::read("replay", epochs, &out)?)))
}

pub enum ReplayReport {
    /// A capture evaluated as `candor stream` would: always one JSON line.
    Capture { capture: PathBuf, out: PathBuf, report: candor::stream::StreamReport },
    /// An archive scored again.
    Archive(EpochsReport),
}

impl Report for ReplayReport {
    fn table(&self) -> Result<()> {
        match self {
            ReplayReport::Capture { .. } => self.json(),
            ReplayReport::Archive(epochs) => epochs.table(),
        }
    }

    fn json(&self) -> Result<()> {
        match self {
            ReplayReport::Capture { capture, out, report } => {
                println!(
                    "{}",
                    serde_json::json!({"command": "replay", "capture": capture, "archive": out, "report": report})
                );
                Ok(())
            }
            ReplayReport::Archive(epochs) => epochs.json(),
        }
    }
}
