//! `candor judge validate`: a judge measured against the hand-labelled validation set.

use std::path::PathBuf;

use anyhow::Result;

use candor::score::validation::{self, Validation};

use super::Report;

#[derive(Debug, clap::Subcommand)]
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

pub fn run(command: JudgeCommand) -> Result<ValidationReport> {
    let JudgeCommand::Validate { judge, set, split, store, record, disagreements } = command;
    let (rows, text) = match &set {
        Some(p) => (validation::read(p)?, std::fs::read_to_string(p)?),
        None => (validation::bundled()?, validation::BUNDLED.to_string()),
    };
    let rows: Vec<_> = rows.into_iter().filter(|r| split.as_ref().is_none_or(|s| *s == r.split)).collect();
    let items = validation::items_for(&rows, &candor::config::default_data_dir())?;
    let store = store
        .unwrap_or_else(|| candor::model::models_dir().parent().map(|p| p.join("judge-store")).unwrap_or_default());
    let config = candor::score::judge::JudgeConfig::parse_arg(&judge)?;
    let mut judge = candor::score::judge::open(&config, &store)?;
    let validation = validation::validate(judge.as_mut(), &rows, &items, &validation::digest(&text))?;
    Ok(ValidationReport { validation, disagreements, record })
}

/// The judge's agreement with the human labels (and the rows it differs on, when asked), then
/// the figures as an `agreement.json` record when one is named.
pub struct ValidationReport {
    validation: Validation,
    disagreements: bool,
    record: Option<String>,
}

impl ValidationReport {
    fn print(&self, json: bool) -> Result<()> {
        validation::print(&self.validation, json, self.disagreements);
        if let Some(name) = &self.record {
            println!("{}", serde_json::to_string_pretty(&validation::record(name, &self.validation))?);
        }
        Ok(())
    }
}

impl Report for ValidationReport {
    fn table(&self) -> Result<()> {
        self.print(false)
    }

    fn json(&self) -> Result<()> {
        self.print(true)
    }
}
