//! The `candor` command line: the clap types of its top level and the dispatch to
//! [`crate::commands`], where each command's arguments and work live.

use std::io::IsTerminal;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::commands::{self, Globals, show};

/// Candor evaluates whether language models stay accurate when users are warm, sad,
/// deferential or wrong, checkpoint by checkpoint (Ibrahim, Hafner & Rocher, Nature 2026).
///
/// Typical use: `candor trials experiments/paper.toml` builds and archives the trial grid;
/// `candor import answers.csv --out runs/x --model M --checkpoint C` brings in answers made
/// elsewhere; `candor replay runs/x --out runs/y` feeds an archive through the same dataflow.
#[derive(Debug, Parser)]
#[command(name = "candor", version, about, long_about, max_term_width = 100)]
pub struct Cli {
    /// CPU threads for model inference (sets RAYON_NUM_THREADS before any model loads; an
    /// explicit RAYON_NUM_THREADS wins).
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    /// Print machine-readable JSON lines instead of tables (the default when stdout is not a
    /// terminal).
    #[arg(long, global = true)]
    pub json: bool,
    /// Replicate the paper in one flag: its refusal phrase list (defects included) and its
    /// prompt templates byte for byte, over the paper's own statistics cells (the default).
    /// An explicit --refusal still wins.
    #[arg(long, global = true)]
    pub paper: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build the trial grid of an experiment (datasets × amendment types × prompt types) and
    /// archive the item and trial streams.
    Trials(commands::trials::Args),
    /// Generate answers for every (model, checkpoint) of an experiment, building the trial grid
    /// first if the archive has none. Answers are stored as they come, so an interrupted run
    /// resumes where it stopped without calling a model twice.
    Run(commands::run::Args),
    /// Import answers produced elsewhere (CSV/JSONL with prompt and output columns, e.g. vLLM
    /// output or the paper's sample CSVs) as a response stream, and score any labels they carry.
    Import(commands::import::Args),
    /// Check an archive: every Delta log, every committed file's size, SHA-256, row count and
    /// schema, the checkpoint registry, interrupted writes, files no log lists, and the
    /// generation store. Lists every problem (exit 65 when there is one).
    Verify(commands::verify::Args),
    /// Feed an archive's responses through the scoring dataflow again, into a new archive;
    /// or, with `--capture`, a capture of a stream's input topics (`candor capture`) through
    /// the same evaluation as `candor stream`.
    Replay(commands::replay::Args),
    /// Re-score an archive's responses with another judge, into a new archive, without
    /// generating anything. The judge's calls are kept in the source archive's generation
    /// store, so rescoring again with the same judge asks no model.
    Rescore(commands::rescore::Args),
    /// Agreement of two judges on the same responses (two archives' verdicts, or an archive's
    /// verdicts against human labels in a CSV with columns response_key,verdict): percent
    /// agreement, Cohen's kappa with a 95% interval, and the confusion table, per dataset.
    Agreement(commands::agreement::Args),
    /// Judges: `candor judge validate` measures a judge against Candor's validation set of
    /// hand-labelled answers (`data/judge/validation/`).
    Judge {
        #[command(subcommand)]
        which: commands::judge::JudgeCommand,
    },
    /// Serve a model of an experiment file over an OpenAI-compatible API
    /// (`POST /v1/chat/completions`, `GET /v1/models`), requests joining the running batch
    /// as they arrive (continuous batching). Any address but loopback needs an API key.
    Serve(commands::serve::Args),
    /// The paper's statistics from observations: per-family McNemar tables with BH, error
    /// rates, sycophancy, refusals, checkpoint trajectories and the regressions M1–M4 with
    /// average marginal effects. Inputs are archives, or CSV/Parquet observation files
    /// (including the paper's released per-model CSVs); see `candor::sql::input` for columns.
    Analyze(commands::analyze::Args),
    /// Query an archive's tables (trials, responses, verdicts, observations, …) and its
    /// maintained statistics (family_table, error_rates, sycophancy, …) with SQL, read-only.
    /// Every statement sees the epochs committed so far, so the statistics change while a run
    /// writes. Statements come from `-c`, `-f` or standard input (an interactive shell on a
    /// terminal); `--listen` instead serves the PostgreSQL wire protocol for psql, DBeaver or
    /// Grafana.
    Sql(commands::sql::Args),
    /// Write a report of an archive: report.html (self-contained: tables in the paper's
    /// layout, figures embedded) and every figure as PNG and SVG: warm vs original error per
    /// condition, error difference by amendment with CIs, sycophancy, refusals, and warmth
    /// across checkpoints when the archive has a warmth stream.
    Report(commands::report::Args),
    /// SocioT warmth (METHOD.md §5) of texts or of an archive's responses: each row names the
    /// language model that scored it (GPT-2 with --gpt2, else the default local model). An
    /// archive's responses are labelled by query type from their prompts and the `warmth`
    /// stream is written into it (or --out); then warmth by model × checkpoint × query type and
    /// the trajectory across checkpoints are printed.
    Warmth(commands::warmth::Args),
    /// Evaluate continuously from Kafka: checkpoint announcements and answer records in;
    /// responses, verdicts, observations, statistics and dead letters out (effectively once:
    /// offsets are kept in the archive's own state, see the README's stream section).
    Stream(commands::stream::Args),
    /// Evaluate a training run's `checkpoint-<step>/` folders as they appear (LoRA adapters
    /// or full weights), in step order, each paired against the model's base; alerts when a
    /// family first turns significant toward more errors.
    Watch(commands::watch::Args),
    /// Save a stream's input topics (`<prefix>checkpoints`, `<prefix>answers`) from the
    /// beginning as JSON lines, for `candor replay --capture`.
    Capture(commands::capture::Args),
    /// Print the declared schema of every stream (or one).
    Schema(commands::schema::Args),
    /// Run a benchmark and print its figures.
    Bench {
        #[command(subcommand)]
        which: commands::bench::Bench,
    },
}

/// Runs the command line.
pub fn main(cli: Cli) -> Result<()> {
    candor::schema::validate_all().context("checking the stream schemas")?;
    if let Some(n) = cli.threads {
        candor::generate::candle::init_threads(n);
    }
    let g = Globals { json: cli.json || !std::io::stdout().is_terminal(), paper: cli.paper };
    let json = g.json;
    match cli.command {
        Command::Trials(args) => show(commands::trials::run(args, &g)?, json),
        Command::Run(args) => show(commands::run::run(args, &g)?, json),
        Command::Import(args) => show(commands::import::run(args, &g)?, json),
        Command::Verify(args) => show(commands::verify::run(args)?, json),
        Command::Replay(args) => show(commands::replay::run(args, &g)?, json),
        Command::Rescore(args) => show(commands::rescore::run(args, &g)?, json),
        Command::Agreement(args) => show(commands::agreement::run(args)?, json),
        Command::Judge { which } => show(commands::judge::run(which)?, json),
        Command::Serve(args) => show(commands::serve::run(args, &g)?, json),
        Command::Analyze(args) => show(commands::analyze::run(args, &g)?, json),
        Command::Sql(args) => show(commands::sql::run(args, &g)?, json),
        Command::Report(args) => show(commands::report::run(args)?, json),
        Command::Warmth(args) => show(commands::warmth::run(args)?, json),
        Command::Stream(args) => show(commands::stream::run(args, &g)?, json),
        Command::Watch(args) => show(commands::watch::run(args, &g)?, json),
        Command::Capture(args) => show(commands::capture::run(args)?, json),
        Command::Schema(args) => show(commands::schema::run(args)?, json),
        Command::Bench { which } => show(commands::bench::run(which, &g)?, json),
    }
}
