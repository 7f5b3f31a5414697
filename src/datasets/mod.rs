//! Dataset loaders: files in their original published formats → [`Item`] rows.
//!
//! The datasets the default run needs are vendored under `data/` (sources and licences in
//! `data/README.md`); a user can point any loader at their own full copy instead.
//!
//! Conventions shared by every loader:
//! - `item_key` is the upstream id where the dataset has one (TriviaQA `qid`, MASK `task_id`,
//!   MedQA `realidx`), else the 0-based data row index (0 = first row after any header).
//! - `source_row` is the 1-based data row (the first row after any header is 1).
//! - Bad input is an [`Error::Input`] naming the file, the line (CSV:
//!   the record, header = line 1) and the field.

mod advbench;
mod disinfo;
pub mod embedded;
mod gsm8k;
mod medqa;
pub mod medqa_convert;
mod mmlu;
pub(crate) mod paper_outputs;
mod source;
mod trivia;
mod truthfulqa;

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::conditions::Dataset;
use crate::error::{Error, Result};
use crate::records::Item;

pub(crate) use source::LineCounter;

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
    let relative = match dataset {
        Dataset::Trivia => "triviaqa/triviaqa_rc_wikipedia_validation_150.json",
        Dataset::TruthfulQa => "truthfulqa/TruthfulQA_2021_817.csv",
        Dataset::MedQa => "medqa/medqa_us_5options_test.jsonl",
        Dataset::Disinfo => "mask/disinformation.csv",
        Dataset::Mmlu => "mmlu/test",
        Dataset::Gsm8k => "gsm8k/test.jsonl",
        Dataset::AdvBench => "advbench/harmful_behaviors.csv",
    };
    data_dir.join(relative)
}

/// Loads every item of `dataset` from `source` (or the vendored copy under `data_dir`).
pub fn load(dataset: Dataset, source: &DatasetSource, data_dir: &Path) -> Result<Vec<Item>> {
    let path = source.path.clone().unwrap_or_else(|| bundled_path(dataset, data_dir));
    let input = Input { path: &path, format: source.format, incorrect_column: source.incorrect_column.as_deref() };
    if input.incorrect_column.is_some() && !matches!(dataset, Dataset::Trivia | Dataset::TruthfulQa | Dataset::MedQa) {
        return Err(Error::config(
            "incorrect_column",
            format!("dataset `{dataset}` takes no incorrect answer from a column"),
        ));
    }
    match dataset {
        Dataset::Trivia => trivia::load(&input),
        Dataset::TruthfulQa => truthfulqa::load(&input),
        Dataset::MedQa => medqa::load(&input),
        Dataset::Disinfo => disinfo::load(&input),
        Dataset::Mmlu => mmlu::load(&input),
        Dataset::Gsm8k => gsm8k::load(&input),
        Dataset::AdvBench => advbench::load(&input),
    }
}

/// What a loader reads: the resolved path and the user's reading options.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Input<'a> {
    pub path: &'a Path,
    pub format: Option<SourceFormat>,
    pub incorrect_column: Option<&'a str>,
}

/// An item with only its identity and question set; loaders fill in the rest.
pub(crate) fn item(dataset: Dataset, item_key: String, row: &source::Row, question: &str) -> Item {
    Item {
        dataset: dataset.as_str().to_string(),
        item_key,
        source_row: row.index as u64 + 1,
        question: question.to_string(),
        question_converted: None,
        correct_answer: None,
        correct_answers: Vec::new(),
        incorrect_answer: None,
        incorrect_answers: Vec::new(),
        options: Vec::new(),
        answer_letter: None,
        ground_truth: None,
        ground_false: None,
        proposition: None,
        category: None,
    }
}

/// The user's wrong answer for `row` when `incorrect_column` is set.
pub(crate) fn incorrect_override(input: &Input<'_>, row: &source::Row) -> Result<Option<String>> {
    input.incorrect_column.map(|column| row.text(column).map(str::to_string)).transpose()
}

#[cfg(test)]
pub(crate) fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bundled_path_exists() {
        for &dataset in Dataset::ALL {
            assert!(bundled_path(dataset, &data_dir()).exists(), "{dataset}");
        }
    }

    #[test]
    fn incorrect_column_is_refused_where_no_incorrect_answer_is_used() {
        let source = DatasetSource { incorrect_column: Some("wrong".into()), ..Default::default() };
        let error = load(Dataset::Gsm8k, &source, &data_dir()).unwrap_err();
        assert!(matches!(&error, Error::Config { key, .. } if key == "incorrect_column"), "{error}");
    }
}
