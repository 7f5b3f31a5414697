//! `candor watch`: evaluate a training run's checkpoint folders as they appear.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

use candor::dataflow::Cluster;
use candor::grid::{GridMode, build_grid};
use candor::stream::watch::{WatchOptions, WatchReport, watch};

use super::{Globals, Report, load_experiment, open_for};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The experiment file: its `[[models]]` entry `--model` (the base evaluated first, the
    /// weights adapters merge into), trial grid, judge and refusal rules.
    experiment: PathBuf,
    /// The directory the training run saves `checkpoint-<step>/` folders into.
    #[arg(long)]
    checkpoints: PathBuf,
    /// The experiment's model the checkpoints belong to (default: its first).
    #[arg(long)]
    model: Option<String>,
    /// Archive directory (default: the experiment's).
    #[arg(long)]
    out: Option<PathBuf>,
    /// A file whose presence in a folder makes it ready at once.
    #[arg(long, default_value = "candor-ready")]
    marker: String,
    /// Without the marker: a folder holding `trainer_state.json` is ready once no file in it
    /// changed for this many seconds.
    #[arg(long, default_value_t = 5.0)]
    stable_secs: f64,
    /// Seconds between looks at the directory.
    #[arg(long, default_value_t = 1.0)]
    poll_secs: f64,
    /// Exit after this many seconds without a new checkpoint (default: watch until killed).
    #[arg(long)]
    idle_exit: Option<f64>,
    /// Run this shell command once per family line that first turns significant toward more
    /// errors, with the alert's JSON on its standard input.
    #[arg(long)]
    alert_cmd: Option<String>,
    /// Planned looks (checkpoints) at each family: α is spread over them (Bonferroni over
    /// steps); 1 applies no correction. Stated in every output line.
    #[arg(long, default_value_t = 1)]
    looks: u32,
    /// Also take checkpoints from `POST /v1/checkpoints` on this address (see
    /// `examples/candor_callback.py`); beyond loopback a key is required.
    #[arg(long)]
    hook: Option<std::net::SocketAddr>,
    /// The environment variable holding the hook's key (`Authorization: Bearer <key>`).
    #[arg(long)]
    hook_key_env: Option<String>,
    /// Evaluate intermediate checkpoints on a seeded sample of K items per dataset (the same
    /// items at every step; the families' `mdd_pp` states their power), the last step on the
    /// whole grid.
    #[arg(long, value_name = "K")]
    items_per_checkpoint: Option<usize>,
    /// The run's last step (default: `trainer_state.json`'s `max_steps`, when it says).
    #[arg(long)]
    final_step: Option<u64>,
    /// As `candor run --regrid`: build a changed experiment's grid as a new version.
    #[arg(long)]
    regrid: bool,
    #[command(flatten)]
    cluster: Cluster,
}

pub fn run(args: Args, g: &Globals) -> Result<Watched> {
    let exp = load_experiment(&args.experiment, g.paper)?;
    let out = args.out.clone().unwrap_or_else(|| exp.output_dir());
    let archive = open_for(&out, "watch", &args.cluster)?;
    let model = match &args.model {
        Some(m) => m.clone(),
        None => exp.models.first().map(|m| m.name.clone()).ok_or_else(|| {
            candor::error::Error::config("models", "the experiment has no [[models]] entry to evaluate with")
        })?,
    };
    let mode = if args.regrid { GridMode::Regrid } else { GridMode::Keep };
    if args.cluster.is_leader() {
        build_grid(&exp, &archive, mode, &Cluster::default())?;
    }
    let opts = candor::stream::watch::stream_options(&exp);
    let w = WatchOptions {
        dir: args.checkpoints.clone(),
        model,
        marker: args.marker.clone(),
        stable: Duration::from_secs_f64(args.stable_secs.max(0.0)),
        poll: Duration::from_secs_f64(args.poll_secs.max(0.01)),
        idle_exit: args.idle_exit.map(|s| Duration::from_secs_f64(s.max(0.0))),
        alert_cmd: args.alert_cmd.clone(),
        looks: args.looks,
        items_per_checkpoint: args.items_per_checkpoint,
        final_step: args.final_step,
        hook: match args.hook {
            Some(listen) => Some(candor::stream::hook::HookOptions {
                listen,
                api_key: match &args.hook_key_env {
                    Some(name) => Some(
                        std::env::var(name)
                            .map_err(|_| candor::error::Error::config("hook-key-env", format!("${name} is not set")))?,
                    ),
                    None => None,
                },
            }),
            None => None,
        },
    };
    // Events are printed as they happen (one JSON line each), the report at the end.
    let mut emit = |event: &serde_json::Value| println!("{event}");
    let report = watch(&args.cluster, &archive, &opts, &w, &mut emit)?;
    Ok(Watched { out, report })
}

/// What `candor watch` did: one JSON line (the events were printed as they happened).
pub struct Watched {
    out: PathBuf,
    report: WatchReport,
}

impl Report for Watched {
    fn table(&self) -> Result<()> {
        self.json()
    }

    fn json(&self) -> Result<()> {
        println!("{}", serde_json::json!({"command": "watch", "archive": self.out, "report": self.report}));
        Ok(())
    }
}
