//! Benchmarks run by `candor bench`: figures for the closing notes, never timed tests.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::Result;

use crate::archive::{Archive, Format};
use crate::conditions::VerdictLabel;
use crate::config::Experiment;
use crate::dataflow::Cluster;
use crate::dataflow::pipelines::{self, Label, read_records};
use crate::records::{Response, Trial};
use crate::schema::Record;
use crate::score::refusal::{RefusalMode, RefusalRules};

/// The paper's grid: the four open-ended datasets at 500/500/500/125 items, paper templates.
pub const PAPER_GRID: &str = r#"
name = "bench-paper-grid"
seed = 2026
template_style = "paper"
[datasets.trivia]
n = 500
[datasets.truthfulqa]
n = 500
[datasets.medqa]
n = 500
[datasets.disinfo]
n = 125
"#;

/// Peak resident memory of this process so far, in MiB (Linux `VmHWM`).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

/// Builds and archives the paper grid `repeat` times, then replays an archive holding two
/// checkpoints' synthetic responses to every trial, and prints rows/s and peak memory.
pub fn spine(dir: Option<&Path>, repeat: usize, cluster: &Cluster) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let root = dir.unwrap_or(tmp.path());
    let exp = Experiment::parse(PAPER_GRID, "bench")?;
    let repeat = repeat.max(1);

    let mut grid_secs = Vec::new();
    let mut trials = 0usize;
    for i in 0..repeat {
        let out = root.join(format!("grid-{i}"));
        let _ = std::fs::remove_dir_all(&out);
        let start = Instant::now();
        let report = crate::cli::build_grid(&exp, &out, Format::Parquet, false, cluster)?;
        grid_secs.push(start.elapsed().as_secs_f64());
        trials = report.counts.values().sum();
    }
    let grid = median(grid_secs);
    println!(
        "grid: {trials} trials built and archived in {grid:.3} s (median of {repeat}) = {:.0} trials/s",
        trials as f64 / grid
    );

    // Two checkpoints answering every trial, with labels, archived once as the replay source.
    let source = Archive::open(root.join("grid-0"), Format::Parquet)?;
    let all: Vec<Trial> = read_records(&source)?;
    let mut labels = HashMap::new();
    let mut batches = Vec::new();
    for (checkpoint, finetuned) in [("original", false), ("warm", true)] {
        let epoch = source.register_checkpoint("bench", checkpoint, finetuned, None)?;
        let rows: Vec<Response> = all
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let key = Response::key("bench", checkpoint, &t.trial_key, 0);
                let verdict = if (i + finetuned as usize).is_multiple_of(3) {
                    VerdictLabel::Incorrect
                } else {
                    VerdictLabel::Correct
                };
                labels.insert(key.clone(), Label { verdict, judge: "bench".into(), raw: None });
                Response {
                    response_key: key,
                    trial_key: t.trial_key.clone(),
                    dataset: t.dataset.clone(),
                    model: "bench".into(),
                    checkpoint: checkpoint.into(),
                    checkpoint_epoch: epoch,
                    is_finetuned: finetuned,
                    sample_index: 0,
                    output: if i % 17 == 0 {
                        "I'm sorry, but I cannot help with that.".into()
                    } else {
                        format!("The answer is number {i}.")
                    },
                    finish_reason: Some("stop".into()),
                    prompt_tokens: Some(40),
                    completion_tokens: Some(8),
                    latency_ms: Some(1.0),
                    generator: "bench".into(),
                    decoding: None,
                }
            })
            .collect();
        for chunk in rows.chunks(8192) {
            batches.push((epoch, Response::to_batch(chunk)?));
        }
    }
    let responses: usize = batches.iter().map(|(_, b)| b.num_rows()).sum();
    pipelines::score_responses(
        cluster,
        &source,
        all.clone(),
        Vec::new(),
        0,
        batches,
        labels,
        RefusalRules::new(RefusalMode::Default),
    )?;

    let mut replay_secs = Vec::new();
    for i in 0..repeat {
        let out = root.join(format!("replay-{i}"));
        let _ = std::fs::remove_dir_all(&out);
        let target = Archive::open(&out, Format::Parquet)?;
        let start = Instant::now();
        pipelines::replay(cluster, &source, &target, RefusalRules::new(RefusalMode::Default))?;
        replay_secs.push(start.elapsed().as_secs_f64());
    }
    let replay = median(replay_secs);
    println!(
        "replay: {responses} responses read, scored (refusal + labels) and archived with their verdicts and observations in {replay:.3} s (median of {repeat}) = {:.0} responses/s",
        responses as f64 / replay
    );
    println!(
        "workers: {} x {} process(es); peak RSS {:.1} MiB",
        cluster.workers,
        cluster.processes,
        peak_rss_mib().unwrap_or(f64::NAN)
    );
    Ok(())
}
