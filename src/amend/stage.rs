//! The amend stage in the dataflow: item batches become trial batches ([`AmendStage`]), and
//! [`build_trials`] runs it to archive a trial grid.

use arrow::record_batch::RecordBatch;
use timely::dataflow::operators::Concat;

use super::Amender;
use crate::archive::Archive;
use crate::dataflow::{Cluster, Epoch, EpochDone, GRID_EPOCH, Stage, only, partition_by, run, stage, stream_of};
use crate::error::Result;
use crate::records::{Item, Trial};
use crate::schema::Record;

/// The amend operator's stage: item batches → trial batches.
pub struct AmendStage {
    amender: Amender,
}

impl AmendStage {
    pub fn new(amender: Amender) -> Self {
        AmendStage { amender }
    }
}

impl Stage for AmendStage {
    fn name(&self) -> &str {
        "amend"
    }
    fn apply(&mut self, _epoch: Epoch, batch: &RecordBatch) -> Result<Vec<RecordBatch>> {
        if stream_of(batch) != Item::STREAM {
            return Ok(Vec::new());
        }
        let mut trials = Vec::new();
        for item in Item::from_batch(batch)? {
            trials.extend(self.amender.trials(&item)?);
        }
        Ok(vec![Trial::to_batch(&trials)?])
    }
}

/// Builds the trial grid: items (sent at the grid epoch) are archived, partitioned by item
/// key across workers, amended into trials, and the trials archived.
pub fn build_trials(
    cluster: &Cluster,
    archive: &Archive,
    items: Vec<RecordBatch>,
    amender: Amender,
    expected_trials: u64,
) -> Result<Vec<EpochDone>> {
    let sources = items.into_iter().map(|b| (GRID_EPOCH, b)).collect();
    run(cluster, archive, sources, Some(expected_trials), move |items, peers| {
        let trials =
            stage(partition_by(only(items.clone(), Item::STREAM), "item_key", peers), AmendStage::new(amender.clone()));
        items.concat(trials)
    })
}
