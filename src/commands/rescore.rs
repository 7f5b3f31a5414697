//! `candor rescore`: an archive's responses judged again by another judge, into a new archive.

use std::path::PathBuf;

use anyhow::{Result, bail};

use candor::archive::Archive;
use candor::dataflow::Cluster;
use candor::records::Response;
use candor::schema::Record;
use candor::score::stage;

use super::{EpochsReport, Globals, open_for, refusal_rules};
use candor::score::refusal::RefusalMode;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The archive to read (items, trials, responses).
    archive: PathBuf,
    /// The archive to write (must not hold responses yet).
    #[arg(long)]
    out: PathBuf,
    /// auto, reference, `candle[=<weights>]` (local model, next-token probabilities), candle-text,
    /// `openai=<base_url>[,<model>]` (any OpenAI-compatible endpoint, free-text answer).
    #[arg(long, default_value = "auto")]
    judge: String,
    /// Refusal phrase list (default: `default`; `paper` with --paper).
    #[arg(long, value_enum)]
    refusal: Option<RefusalMode>,
    #[command(flatten)]
    cluster: Cluster,
}

pub fn run(args: Args, g: &Globals) -> Result<Option<EpochsReport>> {
    let Args { archive, out, judge, refusal, cluster } = args;
    let source = Archive::open(&archive)?;
    if !source.has(Response::STREAM)? {
        bail!("{}: holds no responses to rescore", archive.display());
    }
    // A rescore into an archive a previous rescore of the same source began resumes it.
    let target = open_for(&out, "rescore", &cluster)?;
    let config = candor::score::judge::JudgeConfig::parse_arg(&judge)?;
    let judge = candor::score::judge::open(&config, source.root())?;
    let epochs = stage::rescore(&cluster, &source, &target, refusal_rules(refusal, g.paper), judge)?;
    if !cluster.is_leader() {
        return Ok(None);
    }
    Ok(Some(EpochsReport::read("rescore", epochs, &out)?))
}
