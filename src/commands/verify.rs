//! `candor verify`: check every log, file, checksum and row count of an archive.

use std::path::PathBuf;

use anyhow::{Result, bail};

use candor::archive::Archive;

use super::Report;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The archive directory.
    archive: PathBuf,
}

pub fn run(args: Args) -> Result<VerifyReport> {
    let problems = Archive::open(&args.archive)?.verify();
    Ok(VerifyReport { archive: args.archive, problems })
}

/// Every problem found, by the file it is in; the command fails once they are printed.
pub struct VerifyReport {
    archive: PathBuf,
    problems: Vec<(PathBuf, String)>,
}

impl Report for VerifyReport {
    fn table(&self) -> Result<()> {
        for (path, message) in &self.problems {
            println!("{}: {message}", path.display());
        }
        if self.problems.is_empty() {
            println!("{}: sound (every log, file, checksum and row count as committed)", self.archive.display());
        }
        Ok(())
    }

    fn json(&self) -> Result<()> {
        for (path, message) in &self.problems {
            println!("{}", serde_json::json!({"path": path, "problem": message}));
        }
        Ok(())
    }

    fn finish(self) -> Result<()> {
        if !self.problems.is_empty() {
            bail!(candor::error::Error::integrity(
                &self.archive,
                format!("{} problem(s) found (listed above)", self.problems.len())
            ));
        }
        Ok(())
    }
}
