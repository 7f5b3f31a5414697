//! `candor agreement`: how two judges agree on the same responses (two archives' verdicts, or
//! an archive's verdicts against human labels).

use std::path::PathBuf;

use anyhow::Result;

use candor::archive::Archive;
use candor::archive::read_records;
use candor::records::Verdict;
use candor::score::agreement;

use super::Report;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The first judge's archive.
    first: PathBuf,
    /// The second judge's archive, or a CSV of human labels.
    second: PathBuf,
}

pub fn run(args: Args) -> Result<AgreementReport> {
    let a = read_records::<Verdict>(&Archive::open(&args.first)?)?;
    let b = if args.second.is_file() {
        agreement::read_human_csv(&args.second)?
    } else {
        read_records::<Verdict>(&Archive::open(&args.second)?)?
    };
    Ok(AgreementReport(agreement::compare(&a, &b)))
}

/// Percent agreement, Cohen's kappa and the confusion table, per dataset.
pub struct AgreementReport(agreement::Report);

impl Report for AgreementReport {
    fn table(&self) -> Result<()> {
        agreement::print(&self.0, false);
        Ok(())
    }

    fn json(&self) -> Result<()> {
        agreement::print(&self.0, true);
        Ok(())
    }
}
