//! The warmth reports: `queries/warmth_by_type.sql` and `queries/warmth_trajectory.sql` run on
//! the `warmth` stream, registered as the table `warmth` of the statistics engine's session.

use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use datafusion::datasource::MemTable;

use crate::error::{Error, Result};
use crate::records::WarmthScore;
use crate::schema::{self, Record};
use crate::sql::engine::StatsEngine;
use crate::sql::queries::{Query, WARMTH_BY_TYPE, WARMTH_TRAJECTORY};

/// The warmth reports, in the order `candor warmth` prints them.
pub const REPORTS: [Query; 2] = [WARMTH_BY_TYPE, WARMTH_TRAJECTORY];

/// Runs [`REPORTS`] over `rows`; returns (report name, result) pairs.
pub fn reports(rows: &[WarmthScore]) -> Result<Vec<(String, RecordBatch)>> {
    reports_from_batches(vec![WarmthScore::to_batch(rows)?])
}

/// Runs [`REPORTS`] over batches of the `warmth` stream (e.g. read from an archive).
pub fn reports_from_batches(batches: Vec<RecordBatch>) -> Result<Vec<(String, RecordBatch)>> {
    let mut engine = StatsEngine::new()?;
    let table = MemTable::try_new(schema::arrow_schema("warmth")?, vec![batches])
        .map_err(|e| Error::Internal(format!("table `warmth`: {e}")))?;
    engine
        .context()
        .register_table("warmth", Arc::new(table))
        .map_err(|e| Error::Internal(format!("table `warmth`: {e}")))?;
    REPORTS
        .iter()
        .map(|q| {
            let batches = engine.query(q.sql)?;
            let schema =
                batches.first().map(|b| b.schema()).unwrap_or_else(|| Arc::new(arrow::datatypes::Schema::empty()));
            let one = arrow::compute::concat_batches(&schema, &batches).map_err(|e| Error::arrow(q.name, e))?;
            Ok((q.name.to_string(), one))
        })
        .collect()
}
