//! Dataset loaders: files in their original published formats → [`Item`] rows.
//!
//! The datasets the default run needs are vendored under `data/` (sources and licences in
//! `data/README.md`); a user can point any loader at their own full copy instead.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::conditions::Dataset;
use crate::error::Result;
use crate::records::Item;

/// File formats a loader accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceFormat {
    Csv,
    Jsonl,
    Json,
    Parquet,
}

/// Where a dataset comes from and how to read it. Everything but `dataset` is optional: the
/// default is the vendored copy under the data directory.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSource {
    /// A file (or, for MMLU, a directory of per-subject CSVs) in the dataset's published format.
    pub path: Option<PathBuf>,
    /// Overrides the format guessed from the file extension.
    pub format: Option<SourceFormat>,
    /// A column holding the wrong answer used by `incorrect` prompts (replaces the built-in
    /// choice; TriviaQA has no distractor of its own).
    pub incorrect_column: Option<String>,
}

/// The vendored file (or directory) of `dataset` under `data_dir`.
pub fn bundled_path(dataset: Dataset, data_dir: &Path) -> PathBuf {
    let _ = (dataset, data_dir);
    unimplemented!("filled in by the datasets work")
}

/// Loads every item of `dataset` from `source` (or the vendored copy under `data_dir`).
pub fn load(dataset: Dataset, source: &DatasetSource, data_dir: &Path) -> Result<Vec<Item>> {
    let _ = (dataset, source, data_dir);
    unimplemented!("filled in by the datasets work")
}
