//! `candor analyze`: the paper's statistics from archives or observation files.

use std::path::PathBuf;

use anyhow::Result;

use candor::archive::Archive;
use candor::archive::read_records;
use candor::conditions::Dataset;
use candor::sql::analyze::{Analysis, Export};

use super::{Globals, Report, refusal_rules};
use candor::score::refusal::RefusalMode;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Archive directories or observation files (.csv, .tsv, .parquet).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Write every report as `<report>.parquet` / `.csv` into this directory.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Which files to write with --out.
    #[arg(long, value_enum, default_value_t = Export::Both)]
    export: Export,
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
    refusal: Option<RefusalMode>,
}

pub fn run(args: Args, g: &Globals) -> Result<AnalyzeReport> {
    let Args { inputs, out, export, model, dataset, finetuned, checkpoint, refusal } = args;
    let opts = candor::sql::input::InputOptions {
        model,
        dataset,
        finetuned,
        checkpoint,
        refusal: Some(refusal_rules(refusal, g.paper)),
    };
    let analysis = candor::sql::analyze::analyze(&inputs, &opts)?;
    if let Some(dir) = &out {
        analysis.export(dir, export)?;
    }
    // Beside the tables: how far each archive's verdicts can be trusted.
    let mut trust = Vec::new();
    for input in inputs.iter().filter(|p| p.is_dir()) {
        let verdicts: Vec<candor::records::Verdict> = read_records(&Archive::open(input)?)?;
        for line in candor::score::validation::trust_lines(&candor::score::validation::judges_of(&verdicts)) {
            trust.push((input.clone(), line));
        }
    }
    Ok(AnalyzeReport { analysis, trust })
}

/// Every report of the analysis, then how far each archive's verdicts can be trusted.
pub struct AnalyzeReport {
    analysis: Analysis,
    /// (archive, line) for each archive among the inputs.
    trust: Vec<(PathBuf, String)>,
}

impl Report for AnalyzeReport {
    fn table(&self) -> Result<()> {
        self.analysis.print(false)?;
        for (_, line) in &self.trust {
            println!("{line}");
        }
        Ok(())
    }

    fn json(&self) -> Result<()> {
        self.analysis.print(true)?;
        for (input, line) in &self.trust {
            println!("{}", serde_json::json!({"archive": input, "judge_trust": line}));
        }
        Ok(())
    }
}
