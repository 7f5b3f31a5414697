//! The `candor` command line.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use crate::amend::sample_items;
use crate::archive::{Archive, read_records};
use crate::conditions::Dataset;
use crate::config::Experiment;
use crate::dataflow::{Cluster, EpochDone};
use crate::import::{ImportDefaults, read_answers};
use crate::records::{Item, Observation, Response, Trial};
use crate::schema::{self, Record};
use crate::score::refusal::{RefusalMode, RefusalRules};
use crate::score::stage;

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

/// What `candor stream` publishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PublishArg {
    All,
    Statistics,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build the trial grid of an experiment (datasets × amendment types × prompt types) and
    /// archive the item and trial streams.
    Trials {
        /// The experiment file (TOML), e.g. experiments/paper.toml.
        experiment: PathBuf,
        /// Archive directory (default: the experiment's `output`, else `runs/<name>`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Build the experiment's grid as the archive's next grid version when it differs from
        /// the one there (as `candor run --regrid`), instead of refusing.
        #[arg(long, alias = "regrid")]
        replace: bool,
        #[command(flatten)]
        cluster: Cluster,
    },
    /// Generate answers for every (model, checkpoint) of an experiment, building the trial grid
    /// first if the archive has none. Answers are stored as they come, so an interrupted run
    /// resumes where it stopped without calling a model twice.
    Run {
        /// The experiment file (TOML) with `[[models]]` and their checkpoints.
        experiment: PathBuf,
        /// Archive directory (default: the experiment's `output`, else `runs/<name>`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// When the experiment's grid differs from the archive's: build the new grid as the
        /// archive's next grid version and evaluate every checkpoint on it again (answers
        /// already in the generation store are reused). Without it a changed grid is an error
        /// that says what changed.
        #[arg(long)]
        regrid: bool,
        /// Serve the archive's live tables and statistics over the PostgreSQL wire protocol on
        /// this address while the run goes (as `candor sql --listen`): each checkpoint's
        /// statistics appear when its epoch commits. Non-loopback addresses need
        /// CANDOR_SQL_PASSWORD.
        #[arg(long, value_name = "ADDR")]
        sql_listen: Option<std::net::SocketAddr>,
        /// With --sql-listen: keep serving after the run ends, until interrupted.
        #[arg(long, requires = "sql_listen")]
        sql_stay: bool,
        #[command(flatten)]
        cluster: Cluster,
    },
    /// Import answers produced elsewhere (CSV/JSONL with prompt and output columns, e.g. vLLM
    /// output or the paper's sample CSVs) as a response stream, and score any labels they carry.
    Import {
        /// The answer file (.csv, .tsv, .jsonl).
        file: PathBuf,
        /// Archive directory to add to (it may already hold a trial grid to link answers to).
        #[arg(long)]
        out: PathBuf,
        /// Dataset of every row, when the file has no `dataset` column.
        #[arg(long)]
        dataset: Option<Dataset>,
        /// Model family, when the file has no `model` column.
        #[arg(long)]
        model: Option<String>,
        /// Checkpoint id, when the file has no `checkpoint` column.
        #[arg(long)]
        checkpoint: Option<String>,
        /// The answers come from a fine-tuned (or otherwise modified) checkpoint.
        #[arg(long)]
        finetuned: bool,
        /// Free-text variant recorded with the checkpoint (warm, cold, warm-system-prompt, …).
        #[arg(long)]
        variant: Option<String>,
        /// Refusal phrase list (default: `default`; `paper` with --paper).
        #[arg(long, value_enum)]
        refusal: Option<RefusalArg>,
        /// Replace the answers of a checkpoint already in the archive. Without it, importing
        /// the same answers again does nothing and different ones are refused.
        #[arg(long)]
        replace: bool,
        #[command(flatten)]
        cluster: Cluster,
    },
    /// Check an archive: every Delta log, every committed file's size, SHA-256, row count and
    /// schema, the checkpoint registry, interrupted writes, files no log lists, and the
    /// generation store. Lists every problem (exit 65 when there is one).
    Verify {
        /// The archive directory.
        archive: PathBuf,
    },
    /// Feed an archive's responses through the scoring dataflow again, into a new archive;
    /// or, with `--capture`, a capture of a stream's input topics (`candor capture`) through
    /// the same evaluation as `candor stream`.
    Replay {
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
        refusal: Option<RefusalArg>,
        #[command(flatten)]
        cluster: Cluster,
    },
    /// Re-score an archive's responses with another judge, into a new archive, without
    /// generating anything. The judge's calls are kept in the source archive's generation
    /// store, so rescoring again with the same judge asks no model.
    Rescore {
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
        refusal: Option<RefusalArg>,
        #[command(flatten)]
        cluster: Cluster,
    },
    /// Agreement of two judges on the same responses (two archives' verdicts, or an archive's
    /// verdicts against human labels in a CSV with columns response_key,verdict): percent
    /// agreement, Cohen's kappa with a 95% interval, and the confusion table, per dataset.
    Agreement {
        /// The first judge's archive.
        first: PathBuf,
        /// The second judge's archive, or a CSV of human labels.
        second: PathBuf,
    },
    /// Judges: `candor judge validate` measures a judge against Candor's validation set of
    /// hand-labelled answers (`data/judge/validation/`).
    Judge {
        #[command(subcommand)]
        which: JudgeCommand,
    },
    /// Serve a model of an experiment file over an OpenAI-compatible API
    /// (`POST /v1/chat/completions`, `GET /v1/models`), requests joining the running batch
    /// as they arrive (continuous batching). Any address but loopback needs an API key.
    Serve {
        /// The experiment file naming the model and its backend.
        experiment: PathBuf,
        /// Model name in the experiment (default: the first).
        #[arg(long)]
        model: Option<String>,
        /// Checkpoint id of that model (default: its first).
        #[arg(long)]
        checkpoint: Option<String>,
        /// Address to listen on. Any address but loopback needs --api-key-env.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// Clients must send `Authorization: Bearer <key>`, the key read from this environment
        /// variable (never from the command line, where other users could read it).
        #[arg(long, value_name = "NAME")]
        api_key_env: Option<String>,
        /// Most requests decoded together.
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        /// `continuous`: requests join the running batch between decode steps; `static`:
        /// requests arriving together are decoded as one batch, later ones wait for all of it.
        #[arg(long, value_enum, default_value_t = crate::serve::Batching::Continuous)]
        batching: crate::serve::Batching,
        /// Most new tokens one request may ask for (bounds the response size); requests
        /// without `max_tokens` get 256, fitted to the context.
        #[arg(long, default_value_t = 4096)]
        max_tokens: u32,
        /// Requests one client address may have waiting or running at once (429 beyond).
        #[arg(long, default_value_t = 16)]
        per_client: usize,
        /// Requests waiting or running in all (503 beyond).
        #[arg(long, default_value_t = 256)]
        max_pending: usize,
        /// Largest request body (413 beyond), e.g. 1MiB.
        #[arg(long, default_value = "1MiB", value_parser = parse_bytes_arg)]
        max_request_bytes: usize,
        /// Inject faults for testing clients, e.g. `429=0.2,500=0.1,slow=0.05,truncate=0.05,garbage=0.05`.
        #[arg(long)]
        faults: Option<String>,
        /// Seed of the fault draws.
        #[arg(long, default_value_t = 0)]
        fault_seed: u64,
    },
    /// The paper's statistics from observations: per-family McNemar tables with BH, error
    /// rates, sycophancy, refusals, checkpoint trajectories and the regressions M1–M4 with
    /// average marginal effects. Inputs are archives, or CSV/Parquet observation files
    /// (including the paper's released per-model CSVs); see `candor::sql::input` for columns.
    Analyze {
        /// Archive directories or observation files (.csv, .tsv, .parquet).
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// Write every report as `<report>.parquet` / `.csv` into this directory.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Which files to write with --out.
        #[arg(long, value_enum, default_value_t = crate::sql::analyze::Export::Both)]
        export: crate::sql::analyze::Export,
        /// Model of every row, for files without a `model` column.
        #[arg(long)]
        model: Option<String>,
        /// Dataset of every row, for files without a `dataset` column.
        #[arg(long)]
        dataset: Option<Dataset>,
        /// Side of every row (true = fine-tuned), for files without `is_finetuned`.
        #[arg(long)]
        finetuned: Option<bool>,
        /// Checkpoint of every row, for files without a `checkpoint` column.
        #[arg(long)]
        checkpoint: Option<String>,
        /// Refusal phrase list applied to the paper's CSVs (default: `default`; `paper` with
        /// --paper).
        #[arg(long, value_enum)]
        refusal: Option<RefusalArg>,
    },
    /// Query an archive's tables (trials, responses, verdicts, observations, …) and its
    /// maintained statistics (family_table, error_rates, sycophancy, …) with SQL, read-only.
    /// Every statement sees the epochs committed so far, so the statistics change while a run
    /// writes. Statements come from `-c`, `-f` or standard input (an interactive shell on a
    /// terminal); `--listen` instead serves the PostgreSQL wire protocol for psql, DBeaver or
    /// Grafana.
    Sql {
        /// The archive directory.
        archive: PathBuf,
        /// Statements to run (`;`-separated; repeatable).
        #[arg(short = 'c', long = "command")]
        command: Vec<String>,
        /// A file of `;`-separated statements to run.
        #[arg(short = 'f', long = "file")]
        file: Option<PathBuf>,
        /// How to print results (default: table on a terminal, JSON lines otherwise).
        #[arg(long, value_enum)]
        output: Option<crate::sql::shell::Output>,
        /// Serve the PostgreSQL wire protocol on this address (e.g. 127.0.0.1:5433) until
        /// SIGTERM or Ctrl-C. Any address other than loopback needs a password in
        /// CANDOR_SQL_PASSWORD (when set, it is required on loopback too; checked with
        /// SCRAM-SHA-256).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        #[command(flatten)]
        endpoint: SqlEndpointArgs,
    },
    /// Write a report of an archive: report.html (self-contained: tables in the paper's
    /// layout, figures embedded) and every figure as PNG and SVG: warm vs original error per
    /// condition, error difference by amendment with CIs, sycophancy, refusals, and warmth
    /// across checkpoints when the archive has a warmth stream.
    Report {
        /// The archive directory.
        archive: PathBuf,
        /// Directory to write into (default: `<archive>/report`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// An archive of the same answers judged by another judge (e.g. `candor rescore`'s
        /// output): each family-table cell then shows the two judges' kappa on its answers and
        /// is flagged when its significance depends on the judge.
        #[arg(long)]
        second_judge: Option<PathBuf>,
    },
    /// SocioT warmth (METHOD.md §5) of texts or of an archive's responses: each row names the
    /// language model that scored it (GPT-2 with --gpt2, else the default local model). An
    /// archive's responses are labelled by query type from their prompts and the `warmth`
    /// stream is written into it (or --out); then warmth by model × checkpoint × query type and
    /// the trajectory across checkpoints are printed.
    Warmth {
        /// A text file (one text per line), a JSON-lines file (`text` or `output`, optional
        /// `prompt`, `response_key`, `model`, `checkpoint`, `checkpoint_epoch`), or an archive.
        input: PathBuf,
        #[command(flatten)]
        score: crate::warmth::command::ScoreArgs,
        /// Archive to write the warmth stream to (an archive input is written to itself).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Model name of text rows without one.
        #[arg(long, default_value = "text")]
        model: String,
        /// Checkpoint of text rows without one.
        #[arg(long, default_value = "none")]
        checkpoint: String,
        /// Checkpoint epoch (trajectory order) of text rows without one.
        #[arg(long, default_value_t = 0)]
        checkpoint_epoch: u64,
    },
    /// Evaluate continuously from Kafka: checkpoint announcements and answer records in;
    /// responses, verdicts, observations, statistics and dead letters out (effectively once:
    /// offsets are kept in the archive's own state, see the README's stream section).
    Stream {
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
        /// Milliseconds between state saves (archive commits always save).
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
    },
    /// Save a stream's input topics (`<prefix>checkpoints`, `<prefix>answers`) from the
    /// beginning as JSON lines, for `candor replay --capture`.
    Capture {
        /// The file to write.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        kafka: KafkaArgs,
        /// Stop reading a topic after this many seconds without a message.
        #[arg(long, default_value_t = 2.0)]
        idle: f64,
    },
    /// Print the declared schema of every stream (or one).
    Schema {
        /// A stream name: item, trial, response, verdict, observation.
        stream: Option<String>,
    },
    /// Run a benchmark and print its figures.
    Bench {
        #[command(subcommand)]
        which: Bench,
    },
}

#[derive(Debug, Subcommand)]
pub enum JudgeCommand {
    /// Agreement and Cohen's kappa (95% CI) of a judge with the careful human labels of the
    /// validation set, per dataset and split, and its verdicts/s.
    Validate {
        /// reference, ensemble, `candle[=<weights>]`, candle-text, `openai=<base_url>[,<model>]`, auto,
        /// or a TOML inline table.
        #[arg(long, default_value = "reference")]
        judge: String,
        /// A validation set of your own (JSON lines in the bundled set's shape).
        #[arg(long)]
        set: Option<PathBuf>,
        /// Only the `dev` or the `test` split.
        #[arg(long, value_parser = ["dev", "test"])]
        split: Option<String>,
        /// Where model judges keep their answers (default: `<model cache>/../judge-store`).
        #[arg(long)]
        store: Option<PathBuf>,
        /// Also print the figures as an `agreement.json` record under this name.
        #[arg(long)]
        record: Option<String>,
        /// List the rows the judge labelled otherwise than the humans.
        #[arg(long)]
        disagreements: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum Bench {
    /// SocioT warmth scoring throughput (texts/s, tokens/s) in both modes, on texts made from
    /// the bundled validation prompts.
    Warmth {
        #[command(flatten)]
        score: crate::warmth::command::ScoreArgs,
        /// Texts to score.
        #[arg(long, default_value_t = 24)]
        texts: usize,
        /// Score with GPT-2 small's shape and random weights (GPT-2's speed without its
        /// weights; needs the GPT-2 tokenizer from `scripts/fetch-models gpt2-tokenizer`).
        #[arg(long)]
        random_gpt2: bool,
    },
    /// `candor stream` throughput beside a plain consumer's, and end-to-end latency, against a
    /// running broker (`scripts/kafka-broker start DIR` starts one).
    Stream {
        #[arg(long, env = "CANDOR_KAFKA_BROKERS")]
        brokers: String,
        #[arg(long, default_value_t = 50)]
        checkpoints: usize,
        #[arg(long, default_value_t = 2000)]
        per_checkpoint: usize,
        /// Where the archives go (default: a temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        #[command(flatten)]
        cluster: Cluster,
    },
    /// Build and archive the full paper grid, then replay an archive of synthetic responses
    /// to it; prints rows/s and peak memory.
    Spine {
        /// Where to write the benchmark archives (a temporary directory by default).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Repetitions of each measurement.
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        #[command(flatten)]
        cluster: Cluster,
    },
    /// Verdicts/s and agreement of the judges (reference rules, local model, ensemble) on the
    /// validation set's answers, each with a fresh generation store.
    Score {
        /// Judge every n-th answer of the set (1: all 532).
        #[arg(long, default_value_t = 1)]
        every: usize,
        /// Where to keep the judges' generation stores (a temporary directory by default).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Candor's full statistical analysis against pandas + statsmodels on synthetic observations
    /// at the paper's scale (439,792 rows) and multiples of it, and the latency of an
    /// incremental update (one checkpoint, ~8,000 observations) with small and large history.
    Stats {
        /// Where to write the synthetic observation files (a temporary directory by default).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Multiples of the paper's size to run.
        #[arg(long, value_delimiter = ',', default_values_t = vec![1usize, 10])]
        scales: Vec<usize>,
        /// Python with pandas and statsmodels (default: $CANDOR_PYTHON, else scripts/python-env).
        #[arg(long)]
        python: Option<PathBuf>,
        /// Measure Candor only.
        #[arg(long)]
        skip_python: bool,
    },
    /// Latency and throughput of short requests through `candor serve` while long ones run,
    /// with static and with continuous batching (same model, prompts, clients and threads).
    Serve {
        /// The GGUF file (default: SmolLM2-135M-Instruct Q4_1 in the model cache).
        #[arg(long)]
        gguf: Option<PathBuf>,
        /// Clients sending long requests back to back.
        #[arg(long, default_value_t = 2)]
        long_clients: usize,
        /// Clients sending short requests back to back (their latency is measured).
        #[arg(long, default_value_t = 4)]
        short_clients: usize,
        /// New tokens of a long request.
        #[arg(long, default_value_t = 256)]
        long_tokens: u32,
        /// New tokens of a short request.
        #[arg(long, default_value_t = 8)]
        short_tokens: u32,
        /// Measured seconds per batching mode.
        #[arg(long, default_value_t = 30.0)]
        seconds: f64,
        /// The server's batch size.
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        /// CPU threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// Statements per second through the PostgreSQL endpoint from several tokio-postgres
    /// clients, over an archive of synthetic observations.
    Pg {
        /// Concurrent connections.
        #[arg(long, default_value_t = 8)]
        clients: usize,
        /// Measured seconds.
        #[arg(long, default_value_t = 20.0)]
        seconds: f64,
        /// Synthetic observations in the archive (default: the paper's 439,792).
        #[arg(long, default_value_t = crate::sql::bench::PAPER_OBSERVATIONS)]
        rows: usize,
        /// The statement each client runs.
        #[arg(long, default_value = "select * from family_table")]
        sql: String,
        /// Where to write the archive (a temporary directory by default).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// `candor report` at the paper's scale (45,900 trials × 2 checkpoints) and the
    /// quickstart's, on synthetic answers: build time, report.html size, and the time the
    /// drill-down takes to open the largest cell in headless Chromium.
    Report {
        /// Where to write the benchmark archives (a temporary directory by default).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Fine-tuned checkpoints beside the original (2 with --discordance 0.55 gives ~50,000
        /// discordant pairs at the paper's scale).
        #[arg(long, default_value_t = 1)]
        variants: usize,
        /// Fraction of pairs that are discordant.
        #[arg(long, default_value_t = 0.25)]
        discordance: f64,
        /// Repetitions of the report build.
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        /// Skip the browser timing.
        #[arg(long)]
        no_browser: bool,
        #[command(flatten)]
        cluster: Cluster,
    },
    /// Greedy generation throughput of the candle backend on a GGUF model at several batch
    /// sizes: prefill, decode and overall tokens/s, wall time and peak memory per batch size.
    /// Every request decodes exactly `--max-new-tokens` tokens (end-of-turn is ignored), so
    /// runs and engines compare like for like; `scripts/bench-generate` sets llama.cpp beside it.
    Generate {
        /// The GGUF file (default: SmolLM2-135M-Instruct Q4_1 in the model cache).
        #[arg(long)]
        gguf: Option<PathBuf>,
        /// Sequences decoded concurrently, one run each.
        #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
        batch_sizes: Vec<usize>,
        /// Requests per run (a fixed set of TriviaQA and TruthfulQA questions, cycled).
        #[arg(long, default_value_t = 16)]
        prompts: usize,
        /// New tokens per request.
        #[arg(long, default_value_t = 64)]
        max_new_tokens: u32,
        /// CPU threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Print the rendered prompts as a JSON array and exit (the llama.cpp peer reads them).
        #[arg(long)]
        print_prompts: bool,
        /// GGUF weights expanded to f32 at load (the candle backend's `dequantize`): auto, all, none.
        #[arg(long, default_value = "auto", value_parser = ["auto", "all", "none"])]
        dequantize: String,
    },
}

/// The refusal list on the command line.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum RefusalArg {
    Paper,
    Default,
}

impl From<RefusalArg> for RefusalMode {
    fn from(a: RefusalArg) -> Self {
        match a {
            RefusalArg::Paper => RefusalMode::Paper,
            RefusalArg::Default => RefusalMode::Default,
        }
    }
}

/// The refusal rules of a `--refusal` argument under the `--paper` preset (an explicit
/// argument wins).
fn refusal_rules(arg: Option<RefusalArg>, paper: bool) -> RefusalRules {
    let arg = arg.unwrap_or(if paper { RefusalArg::Paper } else { RefusalArg::Default });
    RefusalRules::new(arg.into())
}

/// Loads an experiment; `--paper` sets its template style and refusal list to the paper's.
fn load_experiment(path: &Path, paper: bool) -> Result<Experiment> {
    let mut exp = Experiment::load(path)?;
    if paper {
        exp.template_style = crate::conditions::TemplateStyle::Paper;
        exp.refusal.mode = RefusalMode::Paper;
    }
    Ok(exp)
}

/// Runs the command line.
pub fn main(cli: Cli) -> Result<()> {
    schema::validate_all().context("checking the stream schemas")?;
    if let Some(n) = cli.threads {
        crate::generate::candle::init_threads(n);
    }
    let json = cli.json || !std::io::stdout().is_terminal();
    let paper = cli.paper;
    match cli.command {
        Command::Trials { experiment, out, replace, cluster } => {
            let exp = load_experiment(&experiment, paper)?;
            let out = out.unwrap_or_else(|| exp.output_dir());
            let archive = open_for(&out, "trials", &cluster)?;
            let mode = if replace { GridMode::Regrid } else { GridMode::Keep };
            let report = build_grid(&exp, &archive, mode, &cluster)?;
            if cluster.is_leader() {
                if report.unchanged && !json {
                    println!(
                        "{}: the trial grid is already built from this experiment (grid version {})",
                        out.display(),
                        report.version
                    );
                }
                print_grid(&report, &out, json);
            }
        }
        Command::Run { experiment, out, regrid, sql_listen, sql_stay, cluster } => {
            let exp = load_experiment(&experiment, paper)?;
            if exp.models.is_empty() {
                bail!("{}: no [[models]] to run", experiment.display());
            }
            let out = out.unwrap_or_else(|| exp.output_dir());
            let archive = open_for(&out, "run", &cluster)?;
            if cluster.is_leader() {
                let mode = if regrid { GridMode::Regrid } else { GridMode::Keep };
                let grid = build_grid(&exp, &archive, mode, &Cluster::default())?;
                if !json && !grid.unchanged {
                    println!(
                        "built the trial grid (version {}): {} trials",
                        grid.version,
                        grid.counts.values().sum::<usize>()
                    );
                }
            }
            // The live SQL endpoint reads only committed epochs, so it can start before the run.
            let endpoint = match sql_listen {
                Some(addr) if cluster.is_leader() => {
                    let live = std::sync::Arc::new(crate::sql::live::LiveSql::open(&out)?);
                    let server = crate::sql::pg::spawn_pg(live, addr, crate::sql::pg::PgOptions::from_env())?;
                    eprintln!("live SQL (PostgreSQL protocol) on {}", server.addr);
                    if json {
                        println!("{}", serde_json::json!({"sql_listen": server.addr.to_string()}));
                    }
                    Some(server)
                }
                _ => None,
            };
            let progress = !json && std::io::stderr().is_terminal();
            let report =
                stage::run_experiment(&cluster, &archive, &exp, Box::new(crate::generate::backend::open), progress)?;
            if cluster.is_leader() {
                let verdicts = verdict_counts(&archive)?;
                if json {
                    for d in &report.epochs {
                        println!("{}", serde_json::json!({"epoch": d.epoch, "rows": d.rows}));
                    }
                    println!(
                        "{}",
                        serde_json::json!({"command": "run", "archive": out, "skipped": report.skipped,
                            "model_calls": report.model_calls, "from_store": report.from_store,
                            "completion_tokens": report.completion_tokens, "verdicts": verdicts})
                    );
                } else {
                    for s in &report.skipped {
                        println!("{s}: already complete in the archive");
                    }
                    for d in &report.epochs {
                        let rows: Vec<String> = d.rows.iter().map(|(s, n)| format!("{n} {s}")).collect();
                        println!("epoch {}: {}", d.epoch, rows.join(", "));
                    }
                    println!(
                        "run: {} model calls, {} answers from the store, {} tokens generated; archive {}",
                        report.model_calls,
                        report.from_store,
                        report.completion_tokens,
                        out.display()
                    );
                    for (ds, counts) in &verdicts {
                        let c: Vec<String> = counts.iter().map(|(v, n)| format!("{n} {v}")).collect();
                        println!("  {ds}: {}", c.join(", "));
                    }
                }
            }
            if let Some(server) = endpoint
                && sql_stay
            {
                eprintln!("run complete; live SQL still on {} (SIGTERM or Ctrl-C stops)", server.addr);
                server.stop_on_signals()?;
            }
        }
        Command::Import { file, out, dataset, model, checkpoint, finetuned, variant, refusal, replace, cluster } => {
            let archive = open_for(&out, "import", &cluster)?;
            let known = crate::import::Known {
                trials: read_records::<Trial>(&archive)?,
                items: read_records::<Item>(&archive)?,
                data_dir: crate::config::default_data_dir(),
            };
            let all_known: Vec<Trial> = known.trials.clone();
            let defaults = ImportDefaults { dataset, model, checkpoint, is_finetuned: finetuned.then_some(true) };
            let mut imported = read_answers(&file, &defaults, &known)?;
            let committed = archive.committed_epochs()?;
            let mut batches = Vec::new();
            let mut already = Vec::new();
            let mut to_replace = std::collections::BTreeSet::new();
            for ((model, checkpoint), mut rows) in std::mem::take(&mut imported.responses) {
                let ft = imported.finetuned.get(&(model.clone(), checkpoint.clone())).copied().unwrap_or(finetuned);
                let epoch = archive.register_checkpoint(&model, &checkpoint, ft, variant.as_deref())?;
                for r in &mut rows {
                    r.checkpoint_epoch = epoch;
                }
                if committed.contains(&epoch) {
                    let id = crate::identity::CheckpointRef::new(&model, &checkpoint);
                    match crate::import::compare_with_archive(&archive, epoch, &id, &rows, &imported.labels)? {
                        None => {
                            already.push(id);
                            continue;
                        }
                        Some(_) if replace => {
                            to_replace.insert(epoch);
                        }
                        Some(difference) => bail!(crate::error::Error::input(
                            crate::error::Location::file(&file),
                            format!(
                                "{id} is already in {} with other answers ({difference}); pass --replace to replace that checkpoint's answers",
                                out.display()
                            ),
                        )),
                    }
                }
                batches.push((epoch, Response::to_batch(&rows)?));
            }
            for id in &already {
                eprintln!("{id}: already in the archive with these answers; nothing to import");
            }
            if !to_replace.is_empty() {
                archive.retract_epochs(&to_replace)?;
                // Trials the replaced epochs had brought left with them: bring back those
                // these answers use.
                let remaining: std::collections::HashSet<String> =
                    read_records::<Trial>(&archive)?.into_iter().map(|t| t.trial_key).collect();
                let mut used = std::collections::HashSet::new();
                for (_, b) in &batches {
                    used.extend(Response::from_batch(b)?.into_iter().map(|r| r.trial_key));
                }
                for t in &all_known {
                    if !remaining.contains(&t.trial_key) && used.contains(&t.trial_key) {
                        imported.new_trials.push(t.clone());
                    }
                }
            }
            let mut trials = all_known;
            trials.extend(imported.new_trials.iter().cloned());
            // New trials belong to the first checkpoint that brought them.
            let trials_epoch = batches.iter().map(|(e, _)| *e).min().unwrap_or(0);
            let linked = imported.linked.clone();
            let new_items = imported.new_items.len();
            let reports = stage::score_responses(
                &cluster,
                &archive,
                trials,
                imported.new_trials,
                imported.new_items,
                trials_epoch,
                batches,
                imported.labels,
                refusal_rules(refusal, paper),
                None,
            )?;
            if cluster.is_leader() {
                if json {
                    println!("{}", serde_json::json!({"linked": linked, "new_items": new_items}));
                } else {
                    println!(
                        "linked {} rows to archived trials by prompt, {} by item and condition; {} rows answer trials made from the file ({} new items)",
                        linked.by_prompt, linked.by_condition, linked.new_trials, new_items
                    );
                }
                print_epochs("import", &reports, &out, json)?;
            }
        }
        Command::Replay {
            archive: None,
            capture: Some(capture),
            experiment,
            topic_prefix,
            max_message_bytes,
            out,
            refusal,
            cluster,
        } => {
            let messages = crate::stream::capture::read(&capture)?;
            let exp = experiment.as_deref().map(|e| load_experiment(e, paper)).transpose()?;
            let target = open_for(&out, "replay", &cluster)?;
            if target.has(Response::STREAM)? {
                bail!("{}: already holds responses; replay into an empty directory", out.display());
            }
            if let Some(exp) = &exp
                && !exp.models.is_empty()
            {
                build_grid(exp, &target, GridMode::Keep, &Cluster::default())?;
            }
            let opts = crate::stream::StreamOptions::for_replay(
                &topic_prefix,
                max_message_bytes,
                refusal_rules(refusal, paper),
                exp,
            );
            let report = crate::stream::replay_capture(&cluster, &target, &opts, messages)?;
            println!(
                "{}",
                serde_json::json!({"command": "replay", "capture": capture, "archive": out, "report": report})
            );
        }
        Command::Replay { archive, out, refusal, cluster, .. } => {
            let archive = archive.expect("clap requires an archive without --capture");
            let source = Archive::open(&archive)?;
            // A replay into an archive a previous replay of the same source began resumes it.
            let target = open_for(&out, "replay", &cluster)?;
            let reports = stage::replay(&cluster, &source, &target, refusal_rules(refusal, paper))?;
            if cluster.is_leader() {
                print_epochs("replay", &reports, &out, json)?;
            }
        }
        Command::Rescore { archive, out, judge, refusal, cluster } => {
            let source = Archive::open(&archive)?;
            if !source.has(Response::STREAM)? {
                bail!("{}: holds no responses to rescore", archive.display());
            }
            // A rescore into an archive a previous rescore of the same source began resumes it.
            let target = open_for(&out, "rescore", &cluster)?;
            let config = crate::score::judge::JudgeConfig::parse_arg(&judge)?;
            let judge = crate::score::judge::open(&config, source.root())?;
            let reports = stage::rescore(&cluster, &source, &target, refusal_rules(refusal, paper), judge)?;
            if cluster.is_leader() {
                print_epochs("rescore", &reports, &out, json)?;
            }
        }
        Command::Verify { archive } => {
            let a = Archive::open(&archive)?;
            let problems = a.verify();
            for (path, message) in &problems {
                if json {
                    println!("{}", serde_json::json!({"path": path, "problem": message}));
                } else {
                    println!("{}: {message}", path.display());
                }
            }
            if problems.is_empty() {
                if !json {
                    println!("{}: sound (every log, file, checksum and row count as committed)", archive.display());
                }
            } else {
                bail!(crate::error::Error::integrity(
                    &archive,
                    format!("{} problem(s) found (listed above)", problems.len())
                ));
            }
        }
        Command::Agreement { first, second } => {
            let a = read_records::<crate::records::Verdict>(&Archive::open(&first)?)?;
            let b = if second.is_file() {
                crate::score::agreement::read_human_csv(&second)?
            } else {
                read_records::<crate::records::Verdict>(&Archive::open(&second)?)?
            };
            let report = crate::score::agreement::compare(&a, &b);
            crate::score::agreement::print(&report, json);
        }
        Command::Judge { which: JudgeCommand::Validate { judge, set, split, store, record, disagreements } } => {
            use crate::score::validation;
            let (rows, text) = match &set {
                Some(p) => (validation::read(p)?, std::fs::read_to_string(p)?),
                None => (validation::bundled()?, validation::BUNDLED.to_string()),
            };
            let rows: Vec<_> = rows.into_iter().filter(|r| split.as_ref().is_none_or(|s| *s == r.split)).collect();
            let items = validation::items_for(&rows, &crate::config::default_data_dir())?;
            let store = store.unwrap_or_else(|| {
                crate::model::models_dir().parent().map(|p| p.join("judge-store")).unwrap_or_default()
            });
            let config = crate::score::judge::JudgeConfig::parse_arg(&judge)?;
            let mut judge = crate::score::judge::open(&config, &store)?;
            let v = validation::validate(judge.as_mut(), &rows, &items, &validation::digest(&text))?;
            validation::print(&v, json, disagreements);
            if let Some(name) = record {
                println!("{}", serde_json::to_string_pretty(&validation::record(&name, &v))?);
            }
        }
        Command::Serve {
            experiment,
            model,
            checkpoint,
            listen,
            api_key_env,
            batch_size,
            batching,
            max_tokens,
            per_client,
            max_pending,
            max_request_bytes,
            faults,
            fault_seed,
        } => {
            let exp = load_experiment(&experiment, paper)?;
            let m = match &model {
                Some(name) => exp.models.iter().find(|m| &m.name == name),
                None => exp.models.first(),
            }
            .with_context(|| format!("{}: no model {}", experiment.display(), model.as_deref().unwrap_or("at all")))?;
            let c = match &checkpoint {
                Some(id) => m.checkpoints.iter().find(|c| &c.id == id),
                None => m.checkpoints.first(),
            }
            .with_context(|| {
                format!("model `{}` has no checkpoint {}", m.name, checkpoint.as_deref().unwrap_or("at all"))
            })?;
            let api_key = match &api_key_env {
                Some(var) => Some(
                    std::env::var(var)
                        .ok()
                        .filter(|k| !k.is_empty())
                        .with_context(|| format!("--api-key-env {var}: ${var} is not set"))?,
                ),
                None => None,
            };
            let options = crate::serve::ServeOptions {
                batch_size,
                batching,
                api_key,
                max_tokens,
                per_client,
                max_pending,
                max_request_bytes,
                faults: match faults {
                    Some(spec) => crate::serve::Faults::parse(&spec)?,
                    None => crate::serve::Faults::default(),
                },
                fault_seed,
                aliases: vec![m.name.clone()],
                ..crate::serve::ServeOptions::new(format!("{}/{}", m.name, c.id), listen)
            };
            options.check()?;
            let generator = crate::generate::backend::open(m, c)?;
            let runtime = tokio::runtime::Runtime::new()?;
            let (tx, rx) = tokio::sync::oneshot::channel();
            runtime.block_on(async move {
                let stopping = std::sync::Arc::new(tokio::sync::Notify::new());
                let stop = stopping.clone();
                let server = tokio::spawn(crate::serve::serve(generator, options, Some(tx), async move {
                    let _ = crate::serve::terminated().await;
                    eprintln!("candor serve: stopping (requests in flight get up to 30 s)");
                    stop.notify_one();
                }));
                if let Ok(addr) = rx.await {
                    eprintln!("serving on http://{addr}/v1/chat/completions (SIGTERM or Ctrl-C stops)");
                    if json {
                        println!("{}", serde_json::json!({"listening": addr.to_string()}));
                    }
                }
                tokio::select! {
                    r = server => r.map_err(|e| anyhow::anyhow!("server task: {e}"))?.map_err(anyhow::Error::from),
                    _ = async {
                        stopping.notified().await;
                        tokio::time::sleep(std::time::Duration::from_secs(30)).await;
                    } => Ok(()),
                }
            })?;
        }
        Command::Stream {
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
        } => {
            let exp = load_experiment(&experiment, paper)?;
            let mut out = out.unwrap_or_else(|| exp.output_dir());
            if cluster.processes > 1 {
                // Each process owns some partitions, and its own archive and offsets.
                out = out.join(format!("process-{}", cluster.process));
            }
            let archive = open_for(&out, "stream", &Cluster::default())?;
            let connection = kafka.connection()?;
            let opts = crate::stream::StreamOptions {
                connection,
                topics: crate::stream::Topics::with_prefix(&kafka.topic_prefix),
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
            if !exp.models.is_empty() {
                let mode = if regrid { GridMode::Regrid } else { GridMode::Keep };
                build_grid(&exp, &archive, mode, &Cluster::default())?;
            }
            let report = crate::stream::run(&cluster, &archive, &opts)?;
            println!("{}", serde_json::json!({"command": "stream", "archive": out, "report": report}));
        }
        Command::Capture { out, kafka, idle } => {
            let connection = kafka.connection()?;
            let topics = crate::stream::Topics::with_prefix(&kafka.topic_prefix);
            let n =
                crate::stream::capture::capture(&connection, &topics, &out, std::time::Duration::from_secs_f64(idle))?;
            println!("{}", serde_json::json!({"command": "capture", "file": out, "messages": n}));
        }
        Command::Schema { stream } => {
            let names = match stream {
                Some(s) => vec![s],
                None => schema::streams()?,
            };
            for name in names {
                let s = schema::stream_schema(&name)?;
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"stream": s.stream, "version": s.version, "key": s.key,
                        "fields": s.fields.iter().map(|f| serde_json::json!({"name": f.name, "type": f.ty, "nullable": f.nullable})).collect::<Vec<_>>()})
                    );
                } else {
                    println!("{} (v{}): {}\n  key: {}", s.stream, s.version, s.doc, s.key.join(", "));
                    for f in &s.fields {
                        println!(
                            "  {:<20} {:<11} {:<9} {}",
                            f.name,
                            f.ty,
                            if f.nullable { "nullable" } else { "" },
                            f.doc
                        );
                    }
                    println!();
                }
            }
        }
        Command::Warmth { input, score, out, model, checkpoint, checkpoint_epoch } => {
            let run = crate::warmth::command::WarmthRun { input, score, out, model, checkpoint, checkpoint_epoch };
            let (rows, reports) = crate::warmth::command::run(&run)?;
            print_warmth(&rows, &reports, json)?;
        }
        Command::Bench { which: Bench::Warmth { score, texts, random_gpt2 } } => {
            let passes = score.passes;
            crate::warmth::command::bench(&score, texts, passes, random_gpt2)?
        }
        Command::Bench { which: Bench::Stream { brokers, checkpoints, per_checkpoint, dir, cluster } } => {
            let tmp = tempfile::tempdir()?;
            let dir = dir.unwrap_or_else(|| tmp.path().to_path_buf());
            crate::stream::bench::run(
                &crate::stream::kafka::Connection::new(brokers),
                &dir,
                checkpoints,
                per_checkpoint,
                &cluster,
            )?
        }
        Command::Bench { which: Bench::Spine { dir, repeat, cluster } } => {
            crate::bench::spine(dir.as_deref(), repeat, &cluster)?
        }
        Command::Bench { which: Bench::Score { every, dir } } => crate::bench::score(every, dir.as_deref())?,
        Command::Bench { which: Bench::Report { dir, variants, discordance, repeat, no_browser, cluster } } => {
            let opts = crate::report::bench::ReportBench { variants, discordance, repeat, browser: !no_browser };
            crate::report::bench::run(dir.as_deref(), &opts, &cluster)?
        }
        Command::Bench { which: Bench::Stats { dir, scales, python, skip_python } } => {
            crate::sql::bench::stats(dir.as_deref(), &scales, python.as_deref(), skip_python)?
        }
        Command::Report { archive, out, second_judge } => {
            let live = crate::sql::live::LiveSql::open(&archive)?;
            let second = second_judge.map(crate::sql::live::LiveSql::open).transpose()?;
            let out = out.unwrap_or_else(|| archive.join("report"));
            let files = crate::report::write_report(&live, &out, second.as_ref())?;
            if json {
                println!("{}", serde_json::to_string(&files).expect("paths serialise"));
            } else {
                for line in &files.judge_trust {
                    println!("{line}");
                }
                println!(
                    "wrote {} and {} figure files in {}",
                    files.html.display(),
                    files.figures.len(),
                    out.display()
                );
            }
        }
        Command::Sql { archive, command, file, output, listen, endpoint } => {
            use crate::sql::shell::{self, Output};
            let live = std::sync::Arc::new(crate::sql::live::LiveSql::open_with(&archive, endpoint.memory_limits())?);
            if let Some(addr) = listen {
                let server = crate::sql::pg::spawn_pg(live, addr, endpoint.options())?;
                if json {
                    println!("{}", serde_json::json!({"listening": server.addr.to_string()}));
                } else {
                    println!("listening on {} (psql -h {} -p {})", server.addr, server.addr.ip(), server.addr.port());
                }
                use std::io::Write;
                std::io::stdout().flush().ok();
                server.stop_on_signals()?;
                return Ok(());
            }
            let out = output.unwrap_or(if json { Output::Json } else { Output::Table });
            let mut ran = false;
            if let Some(f) = &file {
                let script = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
                shell::run_script(&live, &script, out, &f.display().to_string())?;
                ran = true;
            }
            for c in &command {
                shell::run_script(&live, c, out, "-c")?;
                ran = true;
            }
            if !ran {
                shell::interactive(&live, out, std::io::stdin().is_terminal())?;
            }
        }
        Command::Analyze { inputs, out, export, model, dataset, finetuned, checkpoint, refusal } => {
            let opts = crate::sql::input::InputOptions {
                model,
                dataset,
                finetuned,
                checkpoint,
                refusal: Some(refusal_rules(refusal, paper)),
            };
            let analysis = crate::sql::analyze::analyze(&inputs, &opts)?;
            if let Some(dir) = &out {
                analysis.export(dir, export)?;
            }
            analysis.print(json)?;
            // Beside the tables: how far each archive's verdicts can be trusted.
            for input in inputs.iter().filter(|p| p.is_dir()) {
                let verdicts: Vec<crate::records::Verdict> = read_records(&Archive::open(input)?)?;
                for line in crate::score::validation::trust_lines(&crate::score::validation::judges_of(&verdicts)) {
                    if json {
                        println!("{}", serde_json::json!({"archive": input, "judge_trust": line}));
                    } else {
                        println!("{line}");
                    }
                }
            }
        }
        Command::Bench {
            which:
                Bench::Serve { gguf, long_clients, short_clients, long_tokens, short_tokens, seconds, batch_size, threads },
        } => crate::bench::serve(
            &crate::bench::ServeBench {
                gguf,
                long_clients,
                short_clients,
                long_tokens,
                short_tokens,
                seconds,
                batch_size,
                threads,
            },
            json,
        )?,
        Command::Bench { which: Bench::Pg { clients, seconds, rows, sql, dir } } => {
            crate::sql::bench::endpoint(dir.as_deref(), rows, clients, seconds, &sql, json)?
        }
        Command::Bench {
            which: Bench::Generate { gguf, batch_sizes, prompts, max_new_tokens, threads, print_prompts, dequantize },
        } => {
            use crate::generate::candle::llama::Dequantize;
            let dequantize = match dequantize.as_str() {
                "all" => Dequantize::All,
                "none" => Dequantize::None,
                _ => Dequantize::Auto,
            };
            let b = crate::bench::GenerateBench {
                gguf,
                batch_sizes,
                prompts,
                max_new_tokens,
                threads,
                print_prompts,
                dequantize,
            };
            crate::bench::generate(&b, json)?
        }
    }
    Ok(())
}

/// What `trials` built.
pub struct GridReport {
    pub items: BTreeMap<String, usize>,
    pub counts: BTreeMap<(String, String, String), usize>,
    pub epochs: Vec<EpochDone>,
    /// The grid was already built from the same definition: nothing was written.
    pub unchanged: bool,
    /// The grid's version in the archive (1 for the first; `--regrid` adds one).
    pub version: u64,
}

/// What to do when the archive already holds a grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GridMode {
    /// Keep a grid built from the same definition; refuse a different one, saying what changed.
    Keep,
    /// Build the new grid as the archive's next grid version: the old grid and every
    /// checkpoint evaluated on it are withdrawn (they stay in the tables' Delta history) and
    /// evaluated again (answers come from the generation store).
    Regrid,
}

/// The sampled items of an experiment and its grid definition: the grid-defining part of the
/// experiment (datasets, sample sizes, seed, template style, conditions, statements) with a
/// digest of the items each dataset yields, so a change of settings or of a dataset file is
/// seen.
fn plan_grid(exp: &Experiment) -> Result<(Vec<Item>, BTreeMap<String, usize>, serde_json::Value)> {
    use sha2::{Digest, Sha256};
    let data_dir = exp.data_dir();
    let mut all = Vec::new();
    let mut items = BTreeMap::new();
    let mut datasets = serde_json::Map::new();
    for (dataset, cfg) in &exp.datasets {
        let loaded = crate::datasets::load(*dataset, &cfg.source, &data_dir)
            .with_context(|| format!("loading dataset `{dataset}`"))?;
        let sampled = sample_items(loaded, cfg.n, exp.seed);
        items.insert(dataset.to_string(), sampled.len());
        let digest = crate::archive::log::hex(&Sha256::digest(serde_json::to_vec(&sampled)?));
        datasets.insert(
            dataset.to_string(),
            serde_json::json!({
                "n": cfg.n,
                "path": cfg.source.path,
                "format": cfg.source.format.map(|f| format!("{f:?}")),
                "incorrect_column": cfg.source.incorrect_column,
                "items_sha256": digest,
            }),
        );
        all.extend(sampled);
    }
    let statements = match &exp.conditions.statements {
        Some(p) => {
            let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            Some(crate::archive::log::hex(&Sha256::digest(bytes)))
        }
        None => None,
    };
    let definition = serde_json::json!({
        "seed": exp.seed,
        "template_style": format!("{:?}", exp.template_style),
        "amendments": exp.conditions.amendments.iter().map(|a| a.as_str()).collect::<Vec<_>>(),
        "prompt_types": exp.conditions.prompt_types.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
        "statements_sha256": statements,
        "datasets": datasets,
    });
    Ok((all, items, definition))
}

/// The differences between two grid definitions, one line each (`datasets.trivia.n: 1 → 2`).
pub fn grid_changes(old: &serde_json::Value, new: &serde_json::Value) -> Vec<String> {
    fn walk(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
        match (a, b) {
            (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                    let null = serde_json::Value::Null;
                    walk(&p, x.get(k).unwrap_or(&null), y.get(k).unwrap_or(&null), out);
                }
            }
            (a, b) if a != b => out.push(format!("{path}: {a} → {b}")),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk("", old, new, &mut out);
    out
}

/// Loads and samples the experiment's datasets, builds the grid in the dataflow, archives it,
/// and counts the archived trials. An archive whose grid was built from the same definition
/// is left as it is; a different definition is refused with what changed, unless `mode` is
/// [`GridMode::Regrid`].
pub fn build_grid(exp: &Experiment, archive: &Archive, mode: GridMode, cluster: &Cluster) -> Result<GridReport> {
    let amender = exp.amender()?;
    let mut batches = Vec::new();
    let mut items = BTreeMap::new();
    let mut expected = 0u64;
    let mut version = 1;
    if cluster.is_leader() {
        let (sampled, per_dataset, definition) = plan_grid(exp)?;
        items = per_dataset;
        let manifest = archive.manifest()?;
        let committed = archive.committed_epochs()?;
        let stored = manifest.grid.clone();
        let old_version = stored.as_ref().and_then(|g| g.get("version")).and_then(|v| v.as_u64()).unwrap_or(0);
        if let Some(old) = stored.as_ref().and_then(|g| g.get("definition")) {
            let changes = grid_changes(old, &definition);
            if changes.is_empty() && committed.contains(&crate::dataflow::GRID_EPOCH) {
                let counts = count_trials(archive)?;
                return Ok(GridReport { items, counts, epochs: Vec::new(), unchanged: true, version: old_version });
            }
            if !changes.is_empty() && mode == GridMode::Keep && committed.contains(&crate::dataflow::GRID_EPOCH) {
                bail!(crate::error::Error::input(
                    crate::error::Location::file(archive.root()),
                    format!(
                        "the experiment's grid differs from the one this archive was built with (grid version {old_version}):\n  {}\npass --regrid to build the new grid as version {} (every checkpoint is evaluated again on it; stored answers are reused), or choose another --out",
                        changes.join("\n  "),
                        old_version + 1
                    ),
                ));
            }
        } else if archive.has(Trial::STREAM)? && mode == GridMode::Keep {
            bail!(crate::error::Error::input(
                crate::error::Location::file(archive.root()),
                "holds trials that were not built from an experiment's grid (imported answers); build the grid in another --out, or pass --regrid to replace them",
            ));
        }
        if mode == GridMode::Regrid && !committed.is_empty() {
            archive.retract_epochs(&committed)?;
            eprintln!(
                "{}: grid version {} replaces version {old_version}; {} checkpoint epoch(s) withdrawn and to be evaluated again",
                archive.root().display(),
                old_version + 1,
                committed.iter().filter(|e| **e != crate::dataflow::GRID_EPOCH).count()
            );
        }
        version = old_version + 1;
        // Recorded first: a crash before the grid commits leaves an archive that builds the
        // same grid again, never one whose grid lacks its definition.
        archive.set_grid(serde_json::json!({"version": version, "definition": definition}))?;
        for dataset in exp.datasets.keys() {
            let n: Vec<Item> = sampled.iter().filter(|i| i.dataset == dataset.as_str()).cloned().collect();
            expected += n.len() as u64 * amender.trials_per_item(*dataset) as u64;
            batches.push(Item::to_batch(&n)?);
        }
    }
    let epochs = crate::amend::stage::build_trials(cluster, archive, batches, amender, expected)?;
    let counts = if cluster.is_leader() { count_trials(archive)? } else { BTreeMap::new() };
    Ok(GridReport { items, counts, epochs, unchanged: false, version })
}

fn count_trials(archive: &Archive) -> Result<BTreeMap<(String, String, String), usize>> {
    let mut counts = BTreeMap::new();
    for t in read_records::<Trial>(archive)? {
        *counts.entry((t.dataset, t.amendment_type, t.prompt_type)).or_insert(0) += 1;
    }
    Ok(counts)
}

/// The archive a writing command writes: opened for writing (created where `out` is new or
/// empty) by the process that writes, or a handle that never touches it on the other
/// processes of a cluster.
fn open_for(out: &Path, command: &str, cluster: &Cluster) -> Result<Archive> {
    if cluster.is_leader() { Ok(Archive::open_writer(out, command)?) } else { Ok(Archive::elsewhere(out)) }
}

fn print_grid(report: &GridReport, out: &Path, json: bool) {
    if json {
        for ((dataset, amendment, prompt_type), n) in &report.counts {
            println!(
                "{}",
                serde_json::json!({"dataset": dataset, "amendment_type": amendment, "prompt_type": prompt_type, "trials": n})
            );
        }
        println!(
            "{}",
            serde_json::json!({"archive": out, "items": report.items, "trials": report.counts.values().sum::<usize>(),
                "grid_version": report.version, "unchanged": report.unchanged})
        );
        return;
    }
    let prompt_types: Vec<String> = {
        let mut p: Vec<String> = report.counts.keys().map(|k| k.2.clone()).collect();
        p.sort_by_key(|s| s.parse::<crate::conditions::PromptType>().map(|x| x as usize).unwrap_or(usize::MAX));
        p.dedup();
        p
    };
    for (dataset, n_items) in &report.items {
        println!("\n{dataset}: {n_items} items");
        print!("  {:<28}", "amendment_type");
        for p in &prompt_types {
            print!("{p:>18}");
        }
        println!();
        let mut amendments: Vec<&String> = report.counts.keys().filter(|k| &k.0 == dataset).map(|k| &k.1).collect();
        amendments
            .sort_by_key(|s| s.parse::<crate::conditions::AmendmentType>().map(|x| x as usize).unwrap_or(usize::MAX));
        amendments.dedup();
        for a in amendments {
            print!("  {a:<28}");
            for p in &prompt_types {
                let n = report.counts.get(&(dataset.clone(), a.clone(), p.clone())).copied().unwrap_or(0);
                print!("{n:>18}");
            }
            println!();
        }
    }
    println!("\n{} trials archived in {}", report.counts.values().sum::<usize>(), out.display());
}

/// Where a Kafka command finds its brokers and topics.
/// How `candor sql --listen` serves: TLS, limits and timeouts.
#[derive(clap::Args, Clone, Debug)]
pub struct SqlEndpointArgs {
    /// TLS certificate chain (PEM) to serve with; needs --tls-key.
    #[arg(long, requires = "tls_key", value_name = "PEM")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, requires = "tls_cert", value_name = "PEM")]
    tls_key: Option<PathBuf>,
    /// Connections served at once; more are refused (SQLSTATE 53300).
    #[arg(long, default_value_t = 64)]
    max_connections: usize,
    /// A statement's timeout unless its session sets `statement_timeout` (e.g. 60s, 500ms; 0: none).
    #[arg(long, default_value = "60s", value_parser = parse_duration_arg)]
    statement_timeout: std::time::Duration,
    /// Memory one statement may use, its result included (e.g. 1GiB, 256MiB); over it the
    /// statement fails with SQLSTATE 53200.
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes_arg)]
    query_memory: usize,
    /// Memory all statements together may use.
    #[arg(long, default_value = "4GiB", value_parser = parse_bytes_arg)]
    memory_limit: usize,
}

impl SqlEndpointArgs {
    fn options(&self) -> crate::sql::pg::PgOptions {
        crate::sql::pg::PgOptions {
            tls: self
                .tls_cert
                .clone()
                .zip(self.tls_key.clone())
                .map(|(cert, key)| crate::sql::pg::TlsFiles { cert, key }),
            max_connections: self.max_connections,
            statement_timeout: self.statement_timeout,
            ..crate::sql::pg::PgOptions::from_env()
        }
    }

    fn memory_limits(&self) -> crate::sql::live::MemoryLimits {
        crate::sql::live::MemoryLimits { query: self.query_memory, server: self.memory_limit.max(self.query_memory) }
    }
}

fn parse_duration_arg(s: &str) -> std::result::Result<std::time::Duration, String> {
    crate::sql::pg::parse_timeout(s).ok_or_else(|| format!("`{s}` is not a duration (e.g. 60s, 500ms, 2min)"))
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
    fn connection(&self) -> Result<crate::stream::kafka::Connection> {
        let mut connection = crate::stream::kafka::Connection::new(self.brokers.clone());
        for p in &self.kafka_properties {
            let (k, v) = p.split_once('=').with_context(|| format!("--kafka-property `{p}`: expected KEY=VALUE"))?;
            connection.properties.push((k.trim().to_string(), v.trim().to_string()));
        }
        Ok(connection)
    }
}

fn print_epochs(what: &str, reports: &[EpochDone], out: &Path, json: bool) -> Result<()> {
    for d in reports {
        if json {
            println!("{}", serde_json::json!({"epoch": d.epoch, "rows": d.rows}));
        } else {
            let rows: Vec<String> = d.rows.iter().map(|(s, n)| format!("{n} {s}")).collect();
            println!("epoch {}: {}", d.epoch, rows.join(", "));
        }
    }
    let archive = Archive::open(out)?;
    let obs = read_records::<Observation>(&archive)?;
    let excluded = obs.iter().filter(|o| o.correct.is_none()).count();
    let verdicts = verdict_counts(&archive)?;
    if json {
        println!(
            "{}",
            serde_json::json!({"command": what, "archive": out, "observations": obs.len(), "excluded": excluded,
                "verdicts": verdicts})
        );
    } else {
        println!("{what}: {} observations in {} ({excluded} excluded from statistics)", obs.len(), out.display());
        for (ds, counts) in &verdicts {
            let c: Vec<String> = counts.iter().map(|(v, n)| format!("{n} {v}")).collect();
            println!("  {ds}: {}", c.join(", "));
        }
    }
    Ok(())
}

/// Prints warmth rows and reports: JSON lines (`report` names a report row) or tables.
fn print_warmth(
    rows: &[crate::records::WarmthScore],
    reports: &[(String, arrow::record_batch::RecordBatch)],
    json: bool,
) -> Result<()> {
    if json {
        for r in rows {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        if let Some(r) = rows.first() {
            println!("scored by {} ({} mode)", r.lm, r.mode);
        }
        for r in rows {
            let se = r.std_error.map(|s| format!(" ± {s:.4}")).unwrap_or_default();
            let ty = r.query_type.as_deref().unwrap_or("-");
            println!("{:>9.4}{se}  {:<9} {}", r.warmth, ty, r.response_key);
        }
    }
    for (name, batch) in reports {
        if json {
            let mut buf = Vec::new();
            let mut w = arrow::json::LineDelimitedWriter::new(&mut buf);
            w.write(batch)?;
            w.finish()?;
            drop(w);
            for line in String::from_utf8_lossy(&buf).lines() {
                let mut row: serde_json::Map<String, serde_json::Value> = serde_json::from_str(line)?;
                row.insert("report".into(), name.clone().into());
                println!("{}", serde_json::Value::Object(row));
            }
        } else {
            println!("\n== {name}\n{}", arrow::util::pretty::pretty_format_batches(std::slice::from_ref(batch))?);
        }
    }
    Ok(())
}

/// Verdicts by dataset and label (UNPARSEABLE and JUDGE_ERROR included: they are counted,
/// never folded into INCORRECT).
pub fn verdict_counts(archive: &Archive) -> Result<BTreeMap<String, BTreeMap<String, usize>>> {
    let mut out: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for v in read_records::<crate::records::Verdict>(archive)? {
        let ds = v.trial_key.split('/').next().unwrap_or("").to_string();
        *out.entry(ds).or_default().entry(v.verdict).or_default() += 1;
    }
    Ok(out)
}
