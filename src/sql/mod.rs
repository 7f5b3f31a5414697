//! Statistics as SQL: the maintained counts, the paper's statistics as DataFusion functions,
//! and every report as a `.sql` file in `queries/`.
//!
//! - [`counts`]: the paired counts and answer cells as a differential dataflow.
//! - [`view`]: that computation fed batch by batch (add, retract, upsert), its counts as tables.
//! - [`udf`]: `mcnemar_exact`, `bh_adjust`/`bh_reject` windows, the `paired_counts` aggregate, …
//! - [`engine`]: the view registered as DataFusion tables, per-family results recomputed for the
//!   families an update touched, and the regressions M1–M4 refitted when a statement reads them.
//! - [`queries`]: the report queries.
//! - [`input`]: observation files (archives, CSV, Parquet, the paper's CSVs).
//! - [`follow`]: the dataflow hook: when an epoch completes, its observations update the engine.
//! - [`live`]: the archive's streams and the statistics as one read-only catalog that follows
//!   committed epochs; [`shell`] (`candor sql`) and [`pg`] (the PostgreSQL wire endpoint) serve it,
//!   [`pg_catalog`] lets PostgreSQL clients list its tables.
//! - [`synthetic`]: observations in the paper's design, for trying and checking the analysis.
//!
//! ```
//! let mut engine = candor::sql::engine::StatsEngine::new().unwrap();
//! let rows = engine.query(candor::sql::queries::FAMILY_TABLE.sql).unwrap();
//! assert!(rows.iter().all(|b| b.num_rows() == 0));
//! ```

pub mod analyze;
pub mod counts;
pub mod engine;
pub mod follow;
pub mod input;
pub mod live;
pub mod pg;
pub mod pg_catalog;
pub mod queries;
pub mod shell;
pub mod synthetic;
pub mod udf;
pub mod view;
pub mod warmth;

#[cfg(test)]
mod tests;
