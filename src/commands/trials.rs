//! `candor trials`: build and archive the trial grid of an experiment.

use std::path::PathBuf;

use anyhow::Result;

use candor::dataflow::Cluster;
use candor::grid::{GridMode, GridReport, build_grid};

use super::{Globals, Report, load_experiment, open_for};

#[derive(Debug, clap::Args)]
pub struct Args {
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
}

pub fn run(args: Args, g: &Globals) -> Result<Option<TrialsReport>> {
    let exp = load_experiment(&args.experiment, g.paper)?;
    let out = args.out.unwrap_or_else(|| exp.output_dir());
    let archive = open_for(&out, "trials", &args.cluster)?;
    let mode = if args.replace { GridMode::Regrid } else { GridMode::Keep };
    let grid = build_grid(&exp, &archive, mode, &args.cluster)?;
    Ok(args.cluster.is_leader().then_some(TrialsReport { grid, out }))
}

/// The grid in the archive: trials per dataset, amendment type and prompt type.
pub struct TrialsReport {
    grid: GridReport,
    out: PathBuf,
}

impl Report for TrialsReport {
    fn table(&self) -> Result<()> {
        let report = &self.grid;
        if report.unchanged {
            println!(
                "{}: the trial grid is already built from this experiment (grid version {})",
                self.out.display(),
                report.version
            );
        }
        let prompt_types: Vec<String> = {
            let mut p: Vec<String> = report.counts.keys().map(|k| k.2.clone()).collect();
            p.sort_by_key(|s| s.parse::<candor::conditions::PromptType>().map(|x| x as usize).unwrap_or(usize::MAX));
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
            amendments.sort_by_key(|s| {
                s.parse::<candor::conditions::AmendmentType>().map(|x| x as usize).unwrap_or(usize::MAX)
            });
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
        println!("\n{} trials archived in {}", report.counts.values().sum::<usize>(), self.out.display());
        Ok(())
    }

    fn json(&self) -> Result<()> {
        let report = &self.grid;
        for ((dataset, amendment, prompt_type), n) in &report.counts {
            println!(
                "{}",
                serde_json::json!({"dataset": dataset, "amendment_type": amendment, "prompt_type": prompt_type, "trials": n})
            );
        }
        println!(
            "{}",
            serde_json::json!({"archive": self.out, "items": report.items, "trials": report.counts.values().sum::<usize>(),
                "grid_version": report.version, "unchanged": report.unchanged})
        );
        Ok(())
    }
}
