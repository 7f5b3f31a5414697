//! `candor warmth` and `candor bench warmth`: score texts or an archive's responses, archive
//! the `warmth` stream, print the rows and the SQL reports; measure throughput. (The scorer
//! is the library's `warmth`; an experiment's `[warmth]` scores answers in the dataflow.)

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::Device;

use candor::archive::{Archive, Partition, read_records};
use candor::error::{Error, Location, Result as LibResult};
use candor::records::{Response, Trial, WarmthScore};
use candor::schema::Record;
use candor::warmth::query_type::Labeller;
use candor::warmth::{LmChoice, Mode, Scorer, TextRow, open_lm, read_texts};

use super::Report;

/// Options of `candor warmth` (the scoring half of them is shared with the benchmark).
#[derive(Clone, Debug, clap::Args)]
pub struct ScoreArgs {
    /// Scoring mode: `formula` (published formula, deterministic) or `reference` (reference
    /// code: batch-mean loss, dropout, seeded passes).
    #[arg(long, value_enum, default_value_t = Mode::Formula)]
    pub mode: Mode,
    /// Reference mode: passes per text.
    #[arg(long, default_value_t = candor::warmth::DEFAULT_PASSES)]
    pub passes: u32,
    /// Reference mode: seed of the dropout draws.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Formula mode: framed sequences per forward pass.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// GPT-2 (the paper's model): an HF safetensors directory. Without it the default local
    /// model scores, and every row says so.
    #[arg(long)]
    pub gpt2: Option<PathBuf>,
    /// Directory with GPT-2's vocab.json and merges.txt when the GPT-2 directory has none
    /// (default: the model cache, filled by `scripts/fetch-models gpt2-tokenizer`).
    #[arg(long)]
    pub gpt2_tokenizer: Option<PathBuf>,
    /// Another local model to score with instead of the default (GGUF file or HF llama/qwen2
    /// directory); ignored with --gpt2.
    #[arg(long)]
    pub lm: Option<PathBuf>,
}

impl ScoreArgs {
    fn scorer(&self, mode: Mode) -> LibResult<Scorer> {
        let choice =
            LmChoice { gpt2: self.gpt2.clone(), local: self.lm.clone(), tokenizer_dir: self.gpt2_tokenizer.clone() };
        self.scorer_with(open_lm(&choice, &Device::Cpu)?, mode)
    }

    fn scorer_with(&self, lm: Box<dyn candor::warmth::CausalLm>, mode: Mode) -> LibResult<Scorer> {
        let mut s = Scorer::new(lm, mode);
        s.passes = self.passes;
        s.seed = self.seed;
        s.batch_size = self.batch_size;
        Ok(s)
    }
}

/// What `candor warmth` was asked to do.
#[derive(Clone, Debug)]
pub struct WarmthRun {
    pub input: PathBuf,
    pub score: ScoreArgs,
    /// Archive to write the warmth stream to (an archive input is written to itself unless
    /// this is given).
    pub out: Option<PathBuf>,
    /// Model / checkpoint names for text rows that do not carry their own.
    pub model: String,
    pub checkpoint: String,
    pub checkpoint_epoch: u64,
}

/// A text to score with the columns of its warmth row.
struct Pending {
    key: String,
    text: String,
    model: String,
    checkpoint: String,
    epoch: u64,
    query_type: Option<String>,
}

fn from_archive(archive: &Archive, labeller: &Labeller) -> LibResult<Vec<Pending>> {
    let prompts: HashMap<String, String> =
        read_records::<Trial>(archive)?.into_iter().map(|t| (t.trial_key, t.prompt)).collect();
    Ok(read_records::<Response>(archive)?
        .into_iter()
        .map(|r| Pending {
            query_type: prompts.get(&r.trial_key).map(|p| labeller.label(p).to_string()),
            key: r.response_key,
            text: r.output,
            model: r.model,
            checkpoint: r.checkpoint,
            epoch: r.checkpoint_epoch,
        })
        .collect())
}

fn from_texts(rows: Vec<TextRow>, run: &WarmthRun, labeller: &Labeller) -> Vec<Pending> {
    rows.into_iter()
        .map(|r| Pending {
            query_type: r.prompt.as_deref().map(|p| labeller.label(p).to_string()),
            key: r.key,
            text: r.text,
            model: r.model.unwrap_or_else(|| run.model.clone()),
            checkpoint: r.checkpoint.unwrap_or_else(|| run.checkpoint.clone()),
            epoch: r.checkpoint_epoch.unwrap_or(run.checkpoint_epoch),
        })
        .collect()
}

/// A stream name and a batch written to it.
pub type ArchivedBatch = (String, arrow::record_batch::RecordBatch);

/// Scores, archives and returns the rows with the reports.
pub fn run_warmth(run: &WarmthRun) -> LibResult<(Vec<WarmthScore>, Vec<ArchivedBatch>)> {
    let labeller = Labeller::bundled()?;
    let (pending, archive_out) = if run.input.is_dir() {
        let source = Archive::open(&run.input)?;
        if !source.has("response")? {
            return Err(Error::input(Location::file(&run.input), "archive has no response stream"));
        }
        (from_archive(&source, &labeller)?, Some(run.out.clone().unwrap_or_else(|| run.input.clone())))
    } else {
        (from_texts(read_texts(&run.input)?, run, &labeller), run.out.clone())
    };
    // The archive first: a wrong --out is refused before any model loads.
    let archive_out = archive_out.map(|out| Archive::open_writer(out, "warmth")).transpose()?;
    let scorer = run.score.scorer(run.score.mode)?;
    // A response already scored with this model and mode is not scored (or archived) again.
    let done: std::collections::HashSet<String> = match &archive_out {
        Some(out) => read_records::<WarmthScore>(out)?
            .into_iter()
            .filter(|w| w.mode == scorer.mode.name() && w.lm == scorer.lm.name())
            .map(|w| w.response_key)
            .collect(),
        _ => Default::default(),
    };
    let pending: Vec<Pending> = pending.into_iter().filter(|p| !done.contains(&p.key)).collect();
    let texts: Vec<&str> = pending.iter().map(|p| p.text.as_str()).collect();
    let (scores, _) = scorer.score(&texts)?;
    let rows: Vec<WarmthScore> = pending
        .into_iter()
        .zip(scores)
        .map(|(p, w)| scorer.row(&p.key, &p.model, &p.checkpoint, p.epoch, p.query_type, w))
        .collect();
    // The reports cover everything the archive holds, earlier runs included.
    let reports = match archive_out {
        Some(out) => {
            write_archive(&out, &rows)?;
            candor::sql::warmth::reports_from_batches(out.read("warmth")?)?
        }
        None => candor::sql::warmth::reports(&rows)?,
    };
    Ok((rows, reports))
}

/// Appends the rows to an archive's warmth stream, one segment per model × checkpoint.
pub fn write_archive(archive: &Archive, rows: &[WarmthScore]) -> LibResult<()> {
    let mut parts: BTreeMap<(String, String), Vec<WarmthScore>> = BTreeMap::new();
    for r in rows {
        parts.entry((r.model.clone(), r.checkpoint.clone())).or_default().push(r.clone());
    }
    for ((model, checkpoint), rows) in parts {
        archive.append("warmth", &Partition::checkpoint(model, checkpoint), &[WarmthScore::to_batch(&rows)?])?;
    }
    Ok(())
}

/// GPT-2 small's shape with random weights (candle-nn's default initialisation through a
/// `VarMap`) and GPT-2's real tokenizer: GPT-2's speed without its weights, for benchmarks only.
pub fn random_gpt2_small(tokenizer_dir: &Path) -> LibResult<Box<dyn candor::warmth::CausalLm>> {
    use candor::generate::candle::gpt2;
    let cfg = gpt2::Config::gpt2_small();
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, candle_core::DType::F32, &Device::Cpu);
    let model = gpt2::Model::load(vb, &cfg)
        .map_err(|e| Error::Model { context: "random GPT-2".into(), message: e.to_string() })?;
    let tokenizer = gpt2::tokenizer(&tokenizer_dir.join("vocab.json"), &tokenizer_dir.join("merges.txt"))?;
    Ok(Box::new(candor::warmth::Gpt2Lm {
        model,
        tokenizer,
        name: "gpt2-small-shape:random-weights (benchmark only)".into(),
    }))
}

/// `candor bench warmth`: texts/s and tokens/s of both modes on the bundled validation prompts.
pub fn bench(args: &ScoreArgs, texts: usize, passes: u32, random_gpt2: bool) -> LibResult<()> {
    let body = include_str!("../../data/warmth/validation_prompts.jsonl");
    let prompts: Vec<String> = body
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["prompt"].as_str().map(str::to_string))
        .collect();
    // Response-like texts of realistic length: each prompt followed by the next two.
    let all: Vec<String> = (0..prompts.len())
        .map(|i| format!("{} {} {}", prompts[i], prompts[(i + 1) % prompts.len()], prompts[(i + 2) % prompts.len()]))
        .collect();
    let texts: Vec<&str> = all.iter().take(texts.max(1)).map(String::as_str).collect();
    let profile = if cfg!(debug_assertions) { "debug" } else { "release" };
    for mode in [Mode::Formula, Mode::Reference] {
        let mut a = args.clone();
        a.passes = passes;
        let scorer = if random_gpt2 {
            let dir = args.gpt2_tokenizer.clone().unwrap_or_else(candor::warmth::gpt2_tokenizer_dir);
            a.scorer_with(random_gpt2_small(&dir)?, mode)?
        } else {
            a.scorer(mode)?
        };
        let (_, stats) = scorer.score(&texts)?;
        let effective = if mode == Mode::Reference && scorer.lm.has_dropout() { passes } else { 1 };
        println!(
            "warmth {:<9} lm={} profile={profile} threads={} texts={} passes={effective} forward_passes={} tokens={} secs={:.2} => {:.2} texts/s, {:.0} tokens/s",
            mode.name(),
            scorer.lm.name(),
            candle_core::utils::get_num_threads(),
            stats.texts,
            stats.forward_passes,
            stats.tokens,
            stats.secs,
            stats.texts as f64 / stats.secs,
            stats.tokens as f64 / stats.secs,
        );
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A text file (one text per line), a JSON-lines file (`text` or `output`, optional
    /// `prompt`, `response_key`, `model`, `checkpoint`, `checkpoint_epoch`), or an archive.
    input: PathBuf,
    #[command(flatten)]
    score: ScoreArgs,
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
}

pub fn run(args: Args) -> Result<WarmthReport> {
    let Args { input, score, out, model, checkpoint, checkpoint_epoch } = args;
    let run = WarmthRun { input, score, out, model, checkpoint, checkpoint_epoch };
    let (rows, reports) = run_warmth(&run)?;
    Ok(WarmthReport { rows, reports })
}

/// Each row's warmth, then the reports (warmth by model × checkpoint × query type, the
/// trajectory across checkpoints).
pub struct WarmthReport {
    rows: Vec<WarmthScore>,
    reports: Vec<ArchivedBatch>,
}

impl Report for WarmthReport {
    fn table(&self) -> Result<()> {
        if let Some(r) = self.rows.first() {
            println!("scored by {} ({} mode)", r.lm, r.mode);
        }
        for r in &self.rows {
            let se = r.std_error.map(|s| format!(" ± {s:.4}")).unwrap_or_default();
            let ty = r.query_type.as_deref().unwrap_or("-");
            println!("{:>9.4}{se}  {:<9} {}", r.warmth, ty, r.response_key);
        }
        for (name, batch) in &self.reports {
            println!("\n== {name}\n{}", arrow::util::pretty::pretty_format_batches(std::slice::from_ref(batch))?);
        }
        Ok(())
    }

    /// JSON lines: the rows, then each report's rows with a `report` field naming it.
    fn json(&self) -> Result<()> {
        for r in &self.rows {
            println!("{}", serde_json::to_string(r)?);
        }
        for (name, batch) in &self.reports {
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
        }
        Ok(())
    }
}
