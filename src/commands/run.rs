//! `candor run`: generate (and score) every checkpoint of an experiment, building its trial grid
//! first when the archive has none; optionally serving the archive's live SQL meanwhile.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Result, bail};

use candor::dataflow::Cluster;
use candor::grid::{GridMode, build_grid};
use candor::score::stage;
use candor::sql::pg::PgServer;

use super::{Globals, Report, load_experiment, open_for, print_epoch_json, print_epoch_rows, print_verdicts};

#[derive(Debug, clap::Args)]
pub struct Args {
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
}

pub fn run(args: Args, g: &Globals) -> Result<Option<RunReport>> {
    let Args { experiment, out, regrid, sql_listen, sql_stay, cluster } = args;
    let exp = load_experiment(&experiment, g.paper)?;
    if exp.models.is_empty() {
        bail!("{}: no [[models]] to run", experiment.display());
    }
    let out = out.unwrap_or_else(|| exp.output_dir());
    let archive = open_for(&out, "run", &cluster)?;
    if cluster.is_leader() {
        let mode = if regrid { GridMode::Regrid } else { GridMode::Keep };
        let grid = build_grid(&exp, &archive, mode, &Cluster::default())?;
        if !g.json && !grid.unchanged {
            println!("built the trial grid (version {}): {} trials", grid.version, grid.counts.values().sum::<usize>());
        }
    }
    // The live SQL endpoint reads only committed epochs, so it can start before the run.
    let endpoint = match sql_listen {
        Some(addr) if cluster.is_leader() => {
            let live = std::sync::Arc::new(candor::sql::live::LiveSql::open(&out)?);
            let server = candor::sql::pg::spawn_pg(live, addr, candor::sql::pg::PgOptions::from_env())?;
            eprintln!("live SQL (PostgreSQL protocol) on {}", server.addr);
            if g.json {
                println!("{}", serde_json::json!({"sql_listen": server.addr.to_string()}));
            }
            Some(server)
        }
        _ => None,
    };
    let progress = !g.json && std::io::stderr().is_terminal();
    let generated =
        stage::run_experiment(&cluster, &archive, &exp, Box::new(candor::generate::backend::open), progress)?;
    if !cluster.is_leader() {
        return Ok(None);
    }
    let verdicts = super::verdict_counts(&archive)?;
    Ok(Some(RunReport { generated, verdicts, out, endpoint, stay: sql_stay }))
}

/// What the run generated, and the archive's verdicts after it.
pub struct RunReport {
    generated: stage::RunReport,
    verdicts: BTreeMap<String, BTreeMap<String, usize>>,
    out: PathBuf,
    /// The live SQL endpoint (`--sql-listen`), and whether it keeps serving once the report
    /// is out (`--sql-stay`).
    endpoint: Option<PgServer>,
    stay: bool,
}

impl Report for RunReport {
    fn table(&self) -> Result<()> {
        let report = &self.generated;
        for s in &report.skipped {
            println!("{s}: already complete in the archive");
        }
        print_epoch_rows(&report.epochs);
        println!(
            "run: {} model calls, {} answers from the store, {} tokens generated; archive {}",
            report.model_calls,
            report.from_store,
            report.completion_tokens,
            self.out.display()
        );
        print_verdicts(&self.verdicts);
        Ok(())
    }

    fn json(&self) -> Result<()> {
        let report = &self.generated;
        print_epoch_json(&report.epochs);
        println!(
            "{}",
            serde_json::json!({"command": "run", "archive": self.out, "skipped": report.skipped,
                "model_calls": report.model_calls, "from_store": report.from_store,
                "completion_tokens": report.completion_tokens, "verdicts": self.verdicts})
        );
        Ok(())
    }

    fn finish(self) -> Result<()> {
        if let Some(server) = self.endpoint
            && self.stay
        {
            eprintln!("run complete; live SQL still on {} (SIGTERM or Ctrl-C stops)", server.addr);
            server.stop_on_signals()?;
        }
        Ok(())
    }
}
