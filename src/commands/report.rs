//! `candor report`: report.html and every figure of an archive.

use std::path::PathBuf;

use anyhow::Result;

use candor::report::ReportFiles;
use candor::sql::live::LiveSql;

use super::Report;

#[derive(Debug, clap::Args)]
pub struct Args {
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
}

pub fn run(args: Args) -> Result<ReportReport> {
    let live = LiveSql::open(&args.archive)?;
    let second = args.second_judge.map(LiveSql::open).transpose()?;
    let out = args.out.unwrap_or_else(|| args.archive.join("report"));
    let files = candor::report::write_report(&live, &out, second.as_ref())?;
    Ok(ReportReport { files, out })
}

/// The files written, and how far each dataset's verdicts can be trusted.
pub struct ReportReport {
    files: ReportFiles,
    out: PathBuf,
}

impl Report for ReportReport {
    fn table(&self) -> Result<()> {
        for line in &self.files.judge_trust {
            println!("{line}");
        }
        println!(
            "wrote {} and {} figure files in {}",
            self.files.html.display(),
            self.files.figures.len(),
            self.out.display()
        );
        Ok(())
    }

    fn json(&self) -> Result<()> {
        println!("{}", serde_json::to_string(&self.files).expect("paths serialise"));
        Ok(())
    }
}
