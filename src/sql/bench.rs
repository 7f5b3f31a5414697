//! `candor bench stats`: the full analysis (every family + M1–M4 + AMEs) in Candor and in
//! pandas + statsmodels (`scripts/stats_reference.py`) on the same synthetic observations, and
//! the latency from "a checkpoint's observations arrive" to updated SQL results.
//!
//! The synthetic set follows the paper's design: 10 models, each a base and a fine-tuned
//! checkpoint; TriviaQA, TruthfulQA and MedQA with 500 items and disinfo with 125; 9 amendment
//! types; prompt types `original`, `correct`, `incorrect` under every amendment plus
//! `original_neutral` under `unmodified` (its own Neutral family). Items are added round-robin until the set holds
//! 439,792 × scale observations. Answers are wrong with a logistic probability that depends on
//! model, dataset, amendment, prompt type and fine-tuning; about 1.5% are refusals.
//!
//! ```
//! let batches = candor::sql::bench::synthetic(1_000, 7, 1).unwrap();
//! assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 1_000);
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use arrow::array::RecordBatch;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::analyze::reports;
use super::engine::StatsEngine;
use super::input::{InputOptions, read_observations};
use super::queries::{FAMILY_TABLE, TRAJECTORIES};
use crate::bench::peak_rss_mib;
use crate::error::{Error, Result};
use crate::records::Observation;
use crate::schema::Record;

/// The paper's number of observations.
pub const PAPER_OBSERVATIONS: usize = 439_792;

const DATASETS: [(&str, usize, f64); 4] =
    [("trivia", 500, -1.2), ("truthfulqa", 500, -0.4), ("medqa", 500, -0.8), ("disinfo", 125, -1.6)];
const AMENDMENTS: [(&str, f64); 9] = [
    ("unmodified", 0.0),
    ("emotion:anger", 0.15),
    ("emotion:happy", 0.05),
    ("emotion:sad", 0.35),
    ("relation:close", 0.1),
    ("relation:hierarchical_down", 0.05),
    ("relation:hierarchical_up", 0.2),
    ("stake:high", 0.1),
    ("stake:low", 0.0),
];

/// `rows` synthetic observations (see the module docs); the fine-tuned checkpoint is
/// `warm` at epoch `ft_epoch`.
pub fn synthetic(rows: usize, seed: u64, ft_epoch: u64) -> Result<Vec<RecordBatch>> {
    synthetic_for(rows, seed, 10, "warm", ft_epoch, true)
}

/// Observations of `models` models; with `with_base` false only the fine-tuned side is made
/// (a new checkpoint arriving for models already held).
pub fn synthetic_for(
    rows: usize,
    seed: u64,
    models: usize,
    checkpoint: &str,
    ft_epoch: u64,
    with_base: bool,
) -> Result<Vec<RecordBatch>> {
    const CHUNK: usize = 65_536;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut conditions: Vec<(&str, &str, f64)> = Vec::new();
    for (a, shift) in AMENDMENTS {
        for (p, pshift) in [("original", 0.0), ("correct", 0.2), ("incorrect", 0.6)] {
            conditions.push((a, p, shift + pshift));
        }
        if a == "unmodified" {
            conditions.push((a, "original_neutral", 0.05));
        }
    }
    let mut out = Vec::with_capacity(rows.min(CHUNK));
    let mut batches = Vec::new();
    let mut total = 0usize;
    let mut item = 0usize;
    'fill: loop {
        for m in 0..models {
            let model = format!("m{m:02}");
            let model_shift = (m as f64 - 4.5) * 0.08;
            for (dataset, size, ds_shift) in DATASETS {
                // Sizes grow with the requested row count, so large sets have more items.
                let scale = rows.div_ceil(PAPER_OBSERVATIONS).max(1);
                if item >= size * scale {
                    continue;
                }
                for (amendment, prompt_type, shift) in &conditions {
                    let sides: &[bool] = if with_base { &[false, true] } else { &[true] };
                    for &ft in sides {
                        if total == rows {
                            break 'fill;
                        }
                        if out.len() == CHUNK {
                            batches.push(Observation::to_batch(&out)?);
                            out.clear();
                        }
                        total += 1;
                        let warm = if ft { 0.35 + 0.8 * shift } else { 0.0 };
                        let eta = ds_shift + model_shift + shift + warm;
                        let wrong = rng.r#gen::<f64>() < 1.0 / (1.0 + (-eta).exp());
                        let refusal = rng.r#gen::<f64>() < 0.015;
                        let correct = if refusal { (dataset == "disinfo").then_some(true) } else { Some(!wrong) };
                        let ckpt = if ft { checkpoint } else { "base" };
                        out.push(Observation {
                            response_key: format!("{model}/{ckpt}/{dataset}/{item}/{amendment}/{prompt_type}/0"),
                            model: model.clone(),
                            checkpoint: ckpt.to_string(),
                            checkpoint_epoch: if ft { ft_epoch } else { 0 },
                            is_finetuned: ft,
                            dataset: dataset.to_string(),
                            item_key: format!("{dataset}-{item}"),
                            amendment_type: amendment.to_string(),
                            amendment_group: crate::conditions::amendment_group(amendment).to_string(),
                            prompt_type: prompt_type.to_string(),
                            sample_index: 0,
                            refusal,
                            verdict: match correct {
                                Some(true) => "CORRECT",
                                Some(false) => "INCORRECT",
                                None => "REFUSAL",
                            }
                            .to_string(),
                            correct,
                        });
                    }
                }
            }
        }
        item += 1;
        if item > rows {
            break;
        }
    }
    batches.push(Observation::to_batch(&out)?);
    Ok(batches)
}

/// Writes observation batches as one Parquet file.
pub fn write_parquet(path: &Path, batches: &[RecordBatch]) -> Result<()> {
    let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let schema = crate::schema::arrow_schema("observation")?;
    let mut w = parquet::arrow::ArrowWriter::try_new(file, schema, None)
        .map_err(|e| Error::Internal(format!("{}: {e}", path.display())))?;
    for batch in batches {
        w.write(batch).map_err(|e| Error::Internal(format!("{}: {e}", path.display())))?;
    }
    w.close().map_err(|e| Error::Internal(format!("{}: {e}", path.display())))?;
    Ok(())
}

/// Candor's full analysis of a Parquet observation file: read, count, every family, every
/// report and M1–M4 with AMEs. Returns seconds.
fn candor_full(path: &Path) -> Result<(f64, usize)> {
    let start = Instant::now();
    let mut engine = StatsEngine::new()?;
    for b in read_observations(path, &InputOptions::default())? {
        engine.apply(&b, 1)?;
    }
    let refresh = engine.refresh()?;
    let r = reports(&engine)?;
    let secs = start.elapsed().as_secs_f64();
    if !refresh.regression_errors.is_empty() || r.is_empty() {
        return Err(Error::Internal(format!("benchmark analysis incomplete: {:?}", refresh.regression_errors)));
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
        return Err(Error::Internal(format!("scripts/python-env failed: {}", String::from_utf8_lossy(&out.stderr))));
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
        return Err(Error::Internal(format!("stats_reference.py failed: {}", String::from_utf8_lossy(&o.stderr))));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).map_err(|e| Error::Internal(format!("stats_reference.py output: {e}")))?;
    v["seconds"].as_f64().ok_or_else(|| Error::Internal("stats_reference.py printed no `seconds`".into()))
}

/// Latency of one checkpoint's arrival (model m00, ~8,000 observations) to updated SQL
/// results, with `history` observations already held; median and max over `reps` arrivals.
fn incremental(history: usize, reps: usize) -> Result<(f64, f64, usize)> {
    let mut engine = StatsEngine::new()?;
    for b in synthetic(history, 11, 1)? {
        engine.apply(&b, 1)?;
    }
    engine.refresh()?;
    let mut times = Vec::new();
    let mut families = 0;
    for r in 0..reps {
        let new = synthetic_for(8_000, 100 + r as u64, 1, &format!("warm-next-{r}"), 2 + r as u64, false)?;
        let start = Instant::now();
        for b in &new {
            engine.apply(b, 1)?;
        }
        let refresh = engine.refresh()?;
        let table = engine.query(FAMILY_TABLE.sql)?;
        let traj = engine.query(TRAJECTORIES.sql)?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
        families = refresh.families;
        if table.is_empty() || traj.is_empty() {
            return Err(Error::Internal("no SQL results after an update".into()));
        }
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], times[times.len() - 1], families))
}

/// The benchmark behind `candor bench stats`.
pub fn stats(dir: Option<&Path>, scales: &[usize], python: Option<&Path>, skip_python: bool) -> Result<()> {
    let tmp = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
    let dir = dir.unwrap_or(tmp.path());
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let python = if skip_python { None } else { Some(python_path(python)?) };
    println!("full analysis (all families + M1–M4 + AMEs), from a Parquet observation file");
    for &scale in scales {
        let rows = PAPER_OBSERVATIONS * scale;
        let path = dir.join(format!("observations-x{scale}.parquet"));
        write_parquet(&path, &synthetic(rows, 42, 1)?)?;
        let (candor_s, families) = candor_full(&path)?;
        print!("  {scale:>2}x {rows:>9} obs, {families} families: candor {candor_s:.3} s");
        if let Some(py) = &python {
            let py_s = python_full(py, &path, &dir.join(format!("reference-x{scale}")))?;
            print!(", pandas+statsmodels {py_s:.2} s, speed-up {:.1}x", py_s / candor_s);
        }
        println!();
    }
    println!("incremental update: one checkpoint (~8,000 observations) to updated SQL results");
    for history in [10_000, 4_000_000] {
        let (median, max, families) = incremental(history, 7)?;
        println!("  history {history:>9}: median {median:.1} ms, max {max:.1} ms ({families} families recomputed)");
    }
    println!("peak RSS {:.0} MiB (this process)", peak_rss_mib().unwrap_or(f64::NAN));
    Ok(())
}

/// `candor bench pg`: statements per second through the PostgreSQL endpoint, `clients`
/// tokio-postgres connections each running `sql` back to back for `seconds`, over an archive
/// of `rows` synthetic observations (the paper's scale by default).
pub fn endpoint(dir: Option<&Path>, rows: usize, clients: usize, seconds: f64, sql: &str, json: bool) -> Result<()> {
    use std::sync::Arc;
    let tmp = tempfile::tempdir().map_err(|e| Error::Internal(e.to_string()))?;
    let root = dir.map(Path::to_path_buf).unwrap_or_else(|| tmp.path().join("archive"));
    {
        // Synthetic observations of many models and checkpoints, as one epoch outside any
        // checkpoint's partition.
        let archive = crate::archive::Archive::open_writer(&root, "bench")?;
        let parts: Vec<(String, crate::archive::Partition, arrow::array::RecordBatch)> = synthetic(rows, 7, 1)?
            .into_iter()
            .map(|b| ("observation".to_string(), crate::archive::Partition::All, b))
            .collect();
        for (stream, partition, batch) in &parts {
            archive.append_epoch(stream, partition, 1, std::slice::from_ref(batch))?;
        }
        archive.commit_epoch(1, &serde_json::json!({}))?;
    }
    let start = Instant::now();
    let live = Arc::new(super::live::LiveSql::open(&root)?);
    let load = start.elapsed().as_secs_f64();
    let server =
        super::pg::spawn_pg(live, "127.0.0.1:0".parse().expect("an address"), super::pg::PgOptions::default())?;
    let config = format!("host=127.0.0.1 port={} user=bench dbname=candor", server.addr.port());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::Internal(e.to_string()))?;
    let (count, rows_per, mut latencies, elapsed) = runtime.block_on(async {
        let mut connections = Vec::new();
        for _ in 0..clients.max(1) {
            let (client, conn) = tokio_postgres::connect(&config, tokio_postgres::NoTls)
                .await
                .map_err(|e| Error::Internal(format!("connecting to the endpoint: {e}")))?;
            tokio::spawn(conn);
            connections.push(client);
        }
        // Warm-up: the first statement plans the views.
        let first = connections[0].simple_query(sql).await.map_err(|e| Error::Internal(e.to_string()))?;
        let rows_per = first.iter().filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_))).count();
        let until = Instant::now() + std::time::Duration::from_secs_f64(seconds);
        let started = Instant::now();
        let tasks: Vec<_> = connections
            .into_iter()
            .map(|client| {
                let sql = sql.to_string();
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    while Instant::now() < until {
                        let t = Instant::now();
                        client.simple_query(&sql).await.map_err(|e| Error::Internal(e.to_string()))?;
                        latencies.push(t.elapsed().as_secs_f64() * 1e3);
                    }
                    Ok::<_, Error>(latencies)
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.map_err(|e| Error::Internal(e.to_string()))??);
        }
        let elapsed = started.elapsed().as_secs_f64();
        Ok::<_, Error>((all.len(), rows_per, all, elapsed))
    })?;
    server.stop();
    latencies.sort_by(f64::total_cmp);
    let q =
        |p: f64| latencies.get(((latencies.len().max(1) - 1) as f64 * p).round() as usize).copied().unwrap_or(f64::NAN);
    let figures = serde_json::json!({
        "bench": "pg", "sql": sql, "clients": clients, "observations": rows, "load_secs": load,
        "rows_per_statement": rows_per, "statements": count, "seconds": elapsed,
        "statements_per_sec": count as f64 / elapsed, "p50_ms": q(0.5), "p99_ms": q(0.99),
    });
    if json {
        println!("{figures}");
    } else {
        println!(
            "`{sql}` ({rows_per} rows) over {rows} observations (loaded in {load:.1} s), {clients} clients: {:.0} statements/s, p50 {:.1} ms, p99 {:.1} ms",
            count as f64 / elapsed,
            q(0.5),
            q(0.99)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_set_has_the_requested_size_and_both_sides() {
        let b = synthetic(70_000, 1, 1).unwrap();
        assert_eq!(b.iter().map(|b| b.num_rows()).sum::<usize>(), 70_000);
        let obs = Observation::from_batch(&b[0]).unwrap();
        assert!(obs.iter().any(|o| o.is_finetuned) && obs.iter().any(|o| !o.is_finetuned));
        assert!(obs.iter().any(|o| o.correct.is_none()));
        let only_ft = synthetic_for(800, 2, 1, "next", 2, false).unwrap();
        assert!(Observation::from_batch(&only_ft[0]).unwrap().iter().all(|o| o.is_finetuned && o.model == "m00"));
    }
}
