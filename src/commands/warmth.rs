//! `candor warmth`: SocioT warmth of texts or of an archive's responses (the work is the
//! library's `warmth::command`; this is its command line and its printing).

use std::path::PathBuf;

use anyhow::Result;

use candor::records::WarmthScore;
use candor::warmth::command::{ArchivedBatch, ScoreArgs, WarmthRun};

use super::Report;

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
    let (rows, reports) = candor::warmth::command::run(&run)?;
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
