//! `candor bench watch`: latency from a training run's checkpoint becoming ready to its
//! statistics (against the base and the previous step, in SQL), on the quickstart's grid with
//! the answers already in the generation store, so that only Candor's own work is timed.
//!
//! A first pass evaluates the base and `steps` seeded random adapters (rank 8 on q_proj and
//! v_proj) of the default model with answers of `max_new_tokens` tokens, filling the generation
//! store; the second pass watches the same folders into a new archive holding a copy of that
//! store, and reports each step's `latency_ms` (every answer found in the store: 0 model calls).

use std::path::Path;
use std::time::Duration;

use anyhow::{Result, bail};

use candor::archive::Archive;
use candor::dataflow::Cluster;
use candor::generate::candle as cb;
use candor::stream::watch::{WatchOptions, watch};

const QUICKSTART: &str = include_str!("../../experiments/quickstart.toml");

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &target)?;
        } else if !e.file_name().to_string_lossy().starts_with('.') {
            std::fs::copy(e.path(), target)?;
        }
    }
    Ok(())
}

pub fn run(dir: &Path, steps: u64, max_new_tokens: u32) -> Result<()> {
    let mut exp = candor::config::Experiment::parse(QUICKSTART, dir.join("quickstart.toml"))?;
    exp.generation.max_new_tokens = max_new_tokens;
    let model = exp.models.first().map(|m| m.name.clone()).unwrap_or_default();
    let gguf = candor::model::models_dir().join(candor::model::DEFAULT_GGUF);
    if !gguf.is_file() {
        bail!("{} is missing (scripts/fetch-models)", gguf.display());
    }
    let mut f = std::fs::File::open(&gguf)?;
    let cfg = cb::llama::Model::gguf_config(&candle_core::quantized::gguf_file::Content::read(&mut f)?, None)?;
    let run = dir.join("run");
    for step in 1..=steps {
        let ckpt = run.join(format!("checkpoint-{step}"));
        cb::lora::RandomAdapter { targets: &["q_proj", "v_proj"], rank: 8, seed: step, std: 0.02, zero_b: false }
            .write(&ckpt, &cfg)?;
        std::fs::write(ckpt.join("candor-ready"), "")?;
    }
    let opts = candor::stream::watch::stream_options(&exp);
    let w = WatchOptions {
        dir: run.clone(),
        model,
        marker: "candor-ready".into(),
        stable: Duration::from_secs(5),
        poll: Duration::from_millis(10),
        idle_exit: Some(Duration::from_millis(300)),
        alert_cmd: None,
        looks: 1,
        hook: None,
        items_per_checkpoint: None,
        final_step: None,
    };
    let pass = |root: &Path| -> Result<(candor::stream::watch::WatchReport, Vec<serde_json::Value>)> {
        let archive = Archive::open_writer(root, "bench")?;
        candor::grid::build_grid(&exp, &archive, candor::grid::GridMode::Keep, &Cluster::default())?;
        let mut events = Vec::new();
        let report = watch(&Cluster::default(), &archive, &opts, &w, &mut |e| events.push(e.clone()))?;
        Ok((report, events))
    };
    let first = dir.join("first");
    let (filled, _) = pass(&first)?;
    let second = dir.join("second");
    // A new archive (created first: Candor writes only into an archive or an empty
    // directory) holding a copy of the first pass's generation store.
    drop(Archive::open_writer(&second, "bench")?);
    copy_dir(&first.join("generation"), &second.join("generation"))?;
    let (report, events) = pass(&second)?;
    if report.stream.model_calls != 0 {
        bail!(
            "the second pass called the model {} times: the store did not hold every answer",
            report.stream.model_calls
        );
    }
    let trials = candor::archive::read_records::<candor::records::Trial>(&Archive::open(&second)?)?.len();
    let mut latencies: Vec<f64> = events.iter().filter_map(|e| e["latency_ms"].as_f64()).collect();
    println!(
        "candor bench watch: the quickstart grid ({trials} trials), {steps} checkpoints (random rank-8 adapters on the default model), answers of {max_new_tokens} tokens already in the generation store (first pass: {} model calls)",
        filled.stream.model_calls
    );
    for (e, l) in events.iter().filter(|e| e["event"] == "evaluated").zip(&latencies) {
        println!("  {}: ready → statistics in SQL {l:.0} ms", e["checkpoint"].as_str().unwrap_or("?"));
    }
    latencies.sort_by(f64::total_cmp);
    if let (Some(mid), Some(max)) = (latencies.get(latencies.len() / 2), latencies.last()) {
        println!("  median {mid:.0} ms, max {max:.0} ms (goal: under 1,000 ms)");
    }
    Ok(())
}
