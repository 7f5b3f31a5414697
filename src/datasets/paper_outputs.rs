//! The paper's released per-model output CSVs: `<model>/<side>/<dataset>_<side>_outputs.csv`
//! with the columns `content_key` (or `original_question`, `prompt_disinfo`), `prompt_template`,
//! `amendment_type`, `output` and `evaluation`. One reader parses them (`import::answer_rows`,
//! with the path layout and the column names from here); `candor import` links each row to a
//! trial (answers become responses with their labels, scored by the score stage) and the
//! observation reader of `candor analyze` and `candor sql` (`sql/input.rs`) makes each row an
//! observation directly.

use std::path::Path;

use crate::conditions::Dataset;

/// The paper's per-dataset merge keys (its `significance_tests.py`): the question text.
pub(crate) const QUESTION_COLUMNS: &[&str] = &["content_key", "original_question", "prompt_disinfo"];
/// The user-belief condition: `prompt_type`, or the paper's `prompt_template`.
pub(crate) const PROMPT_TYPE_COLUMNS: &[&str] = &["prompt_type", "prompt_template"];
/// A judge's label: the paper's `evaluation`, or `verdict` or `label`.
pub(crate) const LABEL_COLUMNS: &[&str] = &["evaluation", "verdict", "label"];

/// The path's (model, side, dataset) under the paper's layout
/// `<model>/<side>/<dataset>_<side>_outputs.csv`.
pub(crate) fn paper_path(path: &Path) -> (Option<String>, Option<String>, Option<String>) {
    let name = |p: Option<&Path>| p.and_then(|p| p.file_name()).and_then(|n| n.to_str()).map(str::to_string);
    let side_dir = path.parent();
    let side = name(side_dir);
    let model = name(side_dir.and_then(|p| p.parent()));
    let dataset = path.file_stem().and_then(|s| s.to_str()).and_then(|s| s.split('_').next()).map(str::to_string);
    (model, side, dataset)
}

/// The paper's path layout `<model>/<side>/<dataset>_<side>_outputs.<ext>`: (model, side,
/// dataset), or None for any other path.
pub(crate) fn paper_layout(path: &Path) -> Option<(String, String, Dataset)> {
    let (model, side, dataset) = paper_path(path);
    let (model, side, dataset) = (model?, side?, dataset?);
    let stem = path.file_stem()?.to_str()?;
    if stem != format!("{dataset}_{side}_outputs") {
        return None;
    }
    Some((model, side, dataset.parse().ok()?))
}
