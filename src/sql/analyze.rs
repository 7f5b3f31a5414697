//! `candor analyze`: the paper's tables and regressions from observations, printed and
//! exported as Parquet and CSV (one file per report, named after its query).
//!
//! ```no_run
//! use candor::sql::analyze::{analyze, Export};
//! use candor::sql::input::InputOptions;
//! let analysis = analyze(&["runs/paper".into()], &InputOptions::default()).unwrap();
//! analysis.export("results".as_ref(), Export::Both).unwrap();
//! ```

use std::path::{Path, PathBuf};

use arrow::array::{Array, RecordBatch};
use arrow::compute::concat_batches;

use super::engine::{Refresh, StatsEngine};
use super::input::{InputOptions, each_observation_batch};
use super::queries::{DISCORDANT_PAIRS, REPORTS};
use crate::error::{Error, Result};

/// Which files [`Analysis::export`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Export {
    Parquet,
    Csv,
    Both,
}

/// The outcome of an analysis: every report as one batch.
pub struct Analysis {
    pub observations: usize,
    /// Observations with `correct` null: counted, not used.
    pub excluded: usize,
    pub refresh: Refresh,
    /// (report name, rows), in print order: the SQL reports, then `coefficients` and `effects`.
    pub reports: Vec<(String, RecordBatch)>,
    /// The `discordant_pairs` view: exported with the reports, summarised when printed (its
    /// rows carry whole answers).
    pub discordant_pairs: RecordBatch,
}

/// The archive streams `discordant_pairs.sql` reads beside the observations.
const TEXT_STREAMS: [&str; 3] = ["trial", "response", "verdict"];

/// Reads every input, maintains the counts in one pass, and runs every report.
pub fn analyze(inputs: &[PathBuf], opts: &InputOptions) -> Result<Analysis> {
    // Raw observations are kept for `discordant_pairs`, which lists pairs, not counts.
    let mut engine = StatsEngine::with_options(true, 8192)?;
    let (mut observations, mut excluded) = (0, 0);
    // The same input named twice (`analyze A A`, or `A` and `./A`) is read once.
    let mut seen = std::collections::HashSet::new();
    let mut text: Vec<Vec<RecordBatch>> = vec![Vec::new(); TEXT_STREAMS.len()];
    for path in inputs {
        let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.clone());
        if !seen.insert(canonical) {
            eprintln!("{}: given more than once; read once", path.display());
            continue;
        }
        each_observation_batch(path, opts, |batch| {
            observations += batch.num_rows();
            excluded += batch.column_by_name("correct").map(|c| c.null_count()).unwrap_or(0);
            engine.feed(&batch)
        })?;
        if path.is_dir() {
            let archive = crate::archive::Archive::open(path)?;
            for (stream, batches) in TEXT_STREAMS.iter().zip(&mut text) {
                batches.extend(archive.read(stream)?);
            }
        }
    }
    // An analysis reports the regressions: fitted now, their errors beside the families'.
    let mut refresh = engine.refresh_and_refit()?;
    refresh.regressions = true;
    for (stream, batches) in TEXT_STREAMS.iter().zip(text) {
        engine.register(&super::live::table_name(stream), crate::schema::arrow_schema(stream)?, batches)?;
    }
    let reports = reports(&mut engine)?;
    let discordant_pairs = run_report(&mut engine, DISCORDANT_PAIRS.name, DISCORDANT_PAIRS.sql)?;
    Ok(Analysis { observations, excluded, refresh, reports, discordant_pairs })
}

/// Runs every report query of an engine, plus the regression tables.
pub fn reports(engine: &mut StatsEngine) -> Result<Vec<(String, RecordBatch)>> {
    let mut out = Vec::new();
    for q in REPORTS {
        out.push((q.name.to_string(), run_report(engine, q.name, q.sql)?));
    }
    out.push(("coefficients".into(), engine.coefficients()?.clone()));
    out.push(("effects".into(), engine.effects()?.clone()));
    Ok(out)
}

/// One query's rows as one batch (with its schema even when it has no rows).
fn run_report(engine: &mut StatsEngine, name: &str, sql: &str) -> Result<RecordBatch> {
    let batches = engine.query(sql)?;
    let schema = match batches.first() {
        Some(b) => b.schema(),
        None => engine
            .block_on(async { engine.context().sql(sql).await.map(|df| df.schema().as_arrow().clone()) })
            .map(std::sync::Arc::new)
            .map_err(|e| Error::Internal(format!("planning {name}: {e}")))?,
    };
    concat_batches(&schema, &batches).map_err(|e| Error::arrow(name, e))
}

impl Analysis {
    /// Writes `<dir>/<report>.parquet` and/or `.csv` for every report and `discordant_pairs`.
    pub fn export(&self, dir: &Path, what: Export) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let pairs = (DISCORDANT_PAIRS.name.to_string(), self.discordant_pairs.clone());
        for (name, batch) in self.reports.iter().chain([&pairs]) {
            if matches!(what, Export::Parquet | Export::Both) {
                let path = dir.join(format!("{name}.parquet"));
                let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
                let parquet = |e: parquet::errors::ParquetError| Error::io(&path, std::io::Error::other(e));
                let mut w = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).map_err(parquet)?;
                w.write(batch).map_err(parquet)?;
                w.close().map_err(parquet)?;
            }
            if matches!(what, Export::Csv | Export::Both) {
                let path = dir.join(format!("{name}.csv"));
                let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
                let mut w = arrow::csv::WriterBuilder::new().with_header(true).build(file);
                w.write(batch).map_err(|e| Error::arrow(path.display().to_string(), e))?;
            }
        }
        Ok(())
    }

    /// Prints every report as a table, or as JSON lines with a `report` field.
    pub fn print(&self, json: bool) -> Result<()> {
        if json {
            println!(
                "{}",
                serde_json::json!({"observations": self.observations, "excluded": self.excluded,
                    "families": self.refresh.families, "regression_errors": self.refresh.regression_errors,
                    "discordant_pairs": self.discordant_pairs.num_rows()})
            );
        } else {
            println!(
                "{} observations ({} excluded from statistics: refusals outside disinfo, unparseable, judge errors); {} families",
                self.observations, self.excluded, self.refresh.families
            );
            for e in &self.refresh.regression_errors {
                println!("regression not fitted: {e}");
            }
            println!(
                "{} discordant pairs (the items behind b and c; written as discordant_pairs with --out)",
                self.discordant_pairs.num_rows()
            );
        }
        for (name, batch) in &self.reports {
            if json {
                let mut buf = Vec::new();
                let mut w = arrow::json::LineDelimitedWriter::new(&mut buf);
                w.write(batch).map_err(|e| Error::arrow(name.clone(), e))?;
                w.finish().map_err(|e| Error::arrow(name.clone(), e))?;
                drop(w);
                // Arrow writes non-finite floats as null: an infinite odds ratio would read as
                // undefined, so infinities are written as "Infinity" / "-Infinity".
                let floats: Vec<(&str, &arrow::array::Float64Array)> = batch
                    .schema_ref()
                    .fields()
                    .iter()
                    .zip(batch.columns())
                    .filter_map(|(f, c)| {
                        c.as_any().downcast_ref::<arrow::array::Float64Array>().map(|a| (f.name().as_str(), a))
                    })
                    .collect();
                for (i, line) in String::from_utf8_lossy(&buf).lines().enumerate() {
                    let mut row: serde_json::Map<String, serde_json::Value> =
                        serde_json::from_str(line).map_err(|e| Error::Internal(e.to_string()))?;
                    for (col, a) in &floats {
                        if a.is_valid(i) && a.value(i).is_infinite() {
                            row.insert(col.to_string(), crate::stats::effect::json_number(a.value(i)));
                        }
                    }
                    row.insert("report".into(), name.clone().into());
                    println!("{}", serde_json::Value::Object(row));
                }
            } else {
                println!("\n== {name} ({} rows)", batch.num_rows());
                let shown = batch.slice(0, batch.num_rows().min(200));
                println!(
                    "{}",
                    arrow::util::pretty::pretty_format_batches(&[shown]).map_err(|e| Error::arrow(name.clone(), e))?
                );
                if batch.num_rows() > 200 {
                    println!("… {} more rows (use --out to export them all)", batch.num_rows() - 200);
                }
            }
        }
        Ok(())
    }
}
