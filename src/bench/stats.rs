//! `candor bench stats`: the full analysis (every family + M1–M4 + AMEs) in Candor and in
//! pandas + statsmodels (`scripts/stats_reference.py`) on the same synthetic observations, and
//! the latency from "a checkpoint's observations arrive" to updated SQL results.
//!
//! The observations are `candor::sql::synthetic`'s, 439,792 × scale of them.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candor::error::{Error, Result};
use candor::sql::analyze::reports;
use candor::sql::engine::StatsEngine;
use candor::sql::input::{InputOptions, each_observation_batch};
use candor::sql::queries::{FAMILY_TABLE, TRAJECTORIES};
use candor::sql::synthetic::{PAPER_OBSERVATIONS, synthetic_each, synthetic_for, write_parquet_with};

use super::{peak_rss_mib, rss_mib};

/// Candor's full analysis of a Parquet observation file: read, count, every family, every
/// report and M1–M4 with AMEs. Returns seconds.
fn candor_full(path: &Path) -> Result<(f64, usize)> {
    let start = Instant::now();
    let mut engine = StatsEngine::new()?;
    // Read and applied batch by batch: the file is never in memory whole.
    let mut read = std::time::Duration::ZERO;
    let mut last = Instant::now();
    each_observation_batch(path, &InputOptions::default(), |b| {
        read += last.elapsed();
        engine.feed(&b)?;
        last = Instant::now();
        Ok(())
    })?;
    let applied = start.elapsed();
    let rss = |at: &str| {
        if candor::trace::stats() {
            let mib = |v: Option<f64>| v.unwrap_or(f64::NAN);
            eprintln!("  after {at}: RSS {:.0} MiB, peak {:.0} MiB", mib(rss_mib()), mib(peak_rss_mib()));
        }
    };
    rss("apply");
    // As `candor analyze` does: the regressions fitted beside the families' refresh.
    let refresh = engine.refresh_and_refit()?;
    let refitted = start.elapsed();
    rss("refresh and refit");
    let errors = refresh.regression_errors.clone();
    let r = reports(&mut engine)?;
    let secs = start.elapsed().as_secs_f64();
    if candor::trace::stats() {
        eprintln!(
            "  full: read {read:?}, apply {:?}, refresh and refit {:?}, reports {:?}",
            applied - read,
            refitted - applied,
            start.elapsed() - refitted
        );
    }
    if !errors.is_empty() || r.is_empty() {
        return Err(Error::Internal(format!("benchmark analysis incomplete: {errors:?}")));
    }
    Ok((secs, refresh.families))
}

fn python_path(python: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = python {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("CANDOR_PYTHON") {
        return Ok(p.into());
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/python-env");
    let out = std::process::Command::new(&script).output().map_err(|e| Error::io(&script, e))?;
    if !out.status.success() {
        return Err(Error::system("scripts/python-env failed", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().into())
}

/// Runs `scripts/stats_reference.py analyze` and returns its own timing (seconds).
fn python_full(python: &Path, path: &Path, out: &Path) -> Result<f64> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/stats_reference.py");
    let o = std::process::Command::new(python)
        .arg(&script)
        .arg("analyze")
        .arg(path)
        .arg(out)
        .output()
        .map_err(|e| Error::io(python, e))?;
    if !o.status.success() {
        return Err(Error::system("stats_reference.py failed", String::from_utf8_lossy(&o.stderr)));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).map_err(|e| Error::Internal(format!("stats_reference.py output: {e}")))?;
    v["seconds"].as_f64().ok_or_else(|| Error::Internal("stats_reference.py printed no `seconds`".into()))
}

/// Latency of one checkpoint's arrival (model m00, ~8,000 observations) to updated SQL
/// results, with `history` observations already held; median and max over `reps` arrivals.
fn incremental(history: usize, reps: usize) -> Result<(f64, f64, usize)> {
    let mut engine = StatsEngine::new()?;
    synthetic_each(history, 11, 10, "warm", 1, true, |b| engine.apply(&b, 1))?;
    engine.refresh()?;
    let mut times = Vec::new();
    let mut families = 0;
    // Where each update's time goes, on stderr.
    let trace = candor::trace::stats();
    for r in 0..reps {
        let new = synthetic_for(8_000, 100 + r as u64, 1, &format!("warm-next-{r}"), 2 + r as u64, false)?;
        let start = Instant::now();
        for b in &new {
            engine.apply(b, 1)?;
        }
        let applied = start.elapsed();
        let refresh = engine.refresh()?;
        let refreshed = start.elapsed();
        let table = engine.query(FAMILY_TABLE.sql)?;
        let traj = engine.query(TRAJECTORIES.sql)?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
        if trace {
            eprintln!(
                "  history {history}: apply {applied:?}, refresh {:?}, queries {:?}",
                refreshed - applied,
                start.elapsed() - refreshed
            );
        }
        families = refresh.families;
        if table.is_empty() || traj.is_empty() {
            return Err(Error::Internal("no SQL results after an update".into()));
        }
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], times[times.len() - 1], families))
}

/// The benchmark behind `candor bench stats`.
pub fn run(dir: Option<&Path>, scales: &[usize], python: Option<&Path>, skip_python: bool) -> Result<()> {
    let tmp = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let dir = dir.unwrap_or(tmp.path());
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let python = if skip_python { None } else { Some(python_path(python)?) };
    println!("full analysis (all families + M1–M4 + AMEs), from a Parquet observation file");
    for &scale in scales {
        let rows = PAPER_OBSERVATIONS * scale;
        let path = dir.join(format!("observations-x{scale}.parquet"));
        write_parquet_with(&path, |write| synthetic_each(rows, 42, 10, "warm", 1, true, write))?;
        let (candor_s, families) = candor_full(&path)?;
        print!("  {scale:>2}x {rows:>9} obs, {families} families: candor {candor_s:.3} s");
        if let Some(py) = &python {
            let py_s = python_full(py, &path, &dir.join(format!("reference-x{scale}")))?;
            print!(", pandas+statsmodels {py_s:.2} s, speed-up {:.1}x", py_s / candor_s);
        }
        println!();
    }
    println!("peak RSS of the full analyses {:.0} MiB", peak_rss_mib().unwrap_or(f64::NAN));
    println!("incremental update: one checkpoint (~8,000 observations) to updated SQL results");
    for history in [10_000, 4_000_000] {
        let (median, max, families) = incremental(history, 7)?;
        println!("  history {history:>9}: median {median:.1} ms, max {max:.1} ms ({families} families recomputed)");
    }
    println!("peak RSS {:.0} MiB (this process, with 4M observations held)", peak_rss_mib().unwrap_or(f64::NAN));
    Ok(())
}
