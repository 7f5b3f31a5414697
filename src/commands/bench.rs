//! `candor bench`: run a benchmark and print its figures as it goes (the benchmarks
//! themselves are in `crate::bench`, one file each; `bench warmth` is the library's).

use std::path::PathBuf;

use anyhow::Result;

use super::warmth::ScoreArgs;
use candor::dataflow::Cluster;
use candor::sql::synthetic::PAPER_OBSERVATIONS;

use super::Globals;
use crate::bench;

/// The benchmarks of `candor bench`.
#[derive(Debug, clap::Subcommand)]
pub enum Bench {
    /// SocioT warmth scoring throughput (texts/s, tokens/s) in both modes, on texts made from
    /// the bundled validation prompts.
    Warmth {
        #[command(flatten)]
        score: ScoreArgs,
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
    /// Latency from a training run's checkpoint becoming ready to its statistics in SQL
    /// (`candor watch`), on the quickstart's grid with the answers already in the generation
    /// store (a first pass fills it).
    Watch {
        /// Checkpoints (seeded random adapters on the default model).
        #[arg(long, default_value_t = 3)]
        steps: u64,
        /// New tokens of each answer of the first pass.
        #[arg(long, default_value_t = 4)]
        max_new_tokens: u32,
        /// Where to write the archives (a temporary directory by default).
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
        #[arg(long, default_value_t = PAPER_OBSERVATIONS)]
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
        #[arg(long, default_value = "auto", value_parser = clap::builder::TypedValueParser::map(clap::builder::PossibleValuesParser::new(["auto", "all", "none"]),
            |s: String| s.parse::<candor::generate::candle::llama::Dequantize>().expect("one of the listed values")))]
        dequantize: candor::generate::candle::llama::Dequantize,
        /// A PEFT LoRA adapter directory (a fine-tune of the GGUF's model) applied to the GGUF.
        #[arg(long, conflicts_with = "random_adapter")]
        adapter: Option<PathBuf>,
        /// Apply a seeded random adapter of this rank to every projection of every layer (the
        /// heaviest adapter: its cost in load time, speed and memory).
        #[arg(long, value_name = "RANK", value_parser = clap::value_parser!(u64).range(1..))]
        random_adapter: Option<u64>,
    },
}

pub fn run(which: Bench, g: &Globals) -> Result<()> {
    match which {
        Bench::Warmth { score, texts, random_gpt2 } => {
            let passes = score.passes;
            super::warmth::bench(&score, texts, passes, random_gpt2)?
        }
        Bench::Stream { brokers, checkpoints, per_checkpoint, dir, cluster } => {
            let tmp = tempfile::tempdir()?;
            let dir = dir.unwrap_or_else(|| tmp.path().to_path_buf());
            bench::stream::run(
                &candor::stream::kafka::Connection::new(brokers),
                &dir,
                checkpoints,
                per_checkpoint,
                &cluster,
            )?
        }
        Bench::Spine { dir, repeat, cluster } => bench::spine::run(dir.as_deref(), repeat, &cluster)?,
        Bench::Score { every, dir } => bench::score::run(every, dir.as_deref())?,
        Bench::Report { dir, variants, discordance, repeat, no_browser, cluster } => {
            let opts = bench::report::ReportBench { variants, discordance, repeat, browser: !no_browser };
            bench::report::run(dir.as_deref(), &opts, &cluster)?
        }
        Bench::Watch { steps, max_new_tokens, dir } => {
            let tmp = tempfile::tempdir()?;
            bench::watch::run(&dir.unwrap_or_else(|| tmp.path().to_path_buf()), steps, max_new_tokens)?
        }
        Bench::Stats { dir, scales, python, skip_python } => {
            bench::stats::run(dir.as_deref(), &scales, python.as_deref(), skip_python)?
        }
        Bench::Serve { gguf, long_clients, short_clients, long_tokens, short_tokens, seconds, batch_size, threads } => {
            bench::serve::run(
                &bench::serve::ServeBench {
                    gguf,
                    long_clients,
                    short_clients,
                    long_tokens,
                    short_tokens,
                    seconds,
                    batch_size,
                    threads,
                },
                g.json,
            )?
        }
        Bench::Pg { clients, seconds, rows, sql, dir } => {
            bench::pg::run(dir.as_deref(), rows, clients, seconds, &sql, g.json)?
        }
        Bench::Generate {
            gguf,
            batch_sizes,
            prompts,
            max_new_tokens,
            threads,
            print_prompts,
            dequantize,
            adapter,
            random_adapter,
        } => {
            let b = bench::generate::GenerateBench {
                gguf,
                batch_sizes,
                prompts,
                max_new_tokens,
                threads,
                print_prompts,
                dequantize,
                adapter,
                random_adapter: random_adapter.map(|r| r as usize),
            };
            bench::generate::run(&b, g.json)?
        }
    }
    Ok(())
}
