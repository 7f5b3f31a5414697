//! MMLU (57 subjects, 14,042 test questions), asked zero-shot as multiple choice.
//!
//! Accepted layouts:
//! - a directory of headerless per-subject CSVs as published (`question,A,B,C,D,answer`), read
//!   in file-name order; the subject is the file name without `.csv` and a `_test`, `_dev` or
//!   `_val` suffix;
//! - one such headerless CSV (the subject is again its file name);
//! - one JSONL, JSON or Parquet file in the Hugging Face layout: `question`, `subject`,
//!   `choices` (four strings) and `answer` (0-3, or a letter).
//!
//! `options` are A-D, `answer_letter` the correct letter, `correct_answer` the text of that
//! option, `category` the subject, and `item_key` = `subject/n` with `n` the 0-based index of
//! the question within its subject.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::source::{self, Columns, Row};
use super::{Input, SourceFormat, item};
use crate::conditions::Dataset;
use crate::error::{Error, Location, Result};
use crate::records::Item;

const LETTERS: [&str; 4] = ["A", "B", "C", "D"];
const CSV_COLUMNS: &[&str] = &["question", "A", "B", "C", "D", "answer"];
const SUBJECT_SUFFIXES: &[&str] = &["_test", "_dev", "_val"];

pub(crate) fn load(input: &Input<'_>) -> Result<Vec<Item>> {
    if input.path.is_dir() {
        let mut items = Vec::new();
        for file in subject_files(input.path)? {
            items.extend(load_subject_csv(&file)?);
        }
        return Ok(items);
    }
    match source::format_of(input.path, input.format)? {
        SourceFormat::Csv => load_subject_csv(input.path),
        _ => load_hf_layout(input),
    }
}

fn subject_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.extension().is_some_and(|e| e == "csv") {
            files.push(path);
        }
    }
    if files.is_empty() {
        return Err(Error::input(Location::file(dir), "no per-subject .csv files in this directory"));
    }
    files.sort();
    Ok(files)
}

fn subject_of(path: &Path) -> String {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    SUBJECT_SUFFIXES.iter().find_map(|suffix| stem.strip_suffix(suffix)).unwrap_or(&stem).to_string()
}

fn load_subject_csv(path: &Path) -> Result<Vec<Item>> {
    let subject = subject_of(path);
    let rows = source::read(path, Some(SourceFormat::Csv), Columns::Headerless(CSV_COLUMNS), CSV_COLUMNS)?;
    rows.iter()
        .map(|row| {
            let options = LETTERS.iter().map(|l| row.text(l).map(str::to_string)).collect::<Result<Vec<_>>>()?;
            let letter = row.text("answer")?.trim().to_string();
            question_item(row, &subject, row.index, options, letter, "answer")
        })
        .collect()
}

fn load_hf_layout(input: &Input<'_>) -> Result<Vec<Item>> {
    let rows = source::read(input.path, input.format, Columns::Header, &["question", "subject", "choices", "answer"])?;
    let mut seen: HashMap<String, usize> = HashMap::new();
    rows.iter()
        .map(|row| {
            let subject = row.text("subject")?.to_string();
            let options = row.strings("choices")?;
            if options.len() != LETTERS.len() {
                return Err(row.error("choices", format!("{} choices, expected 4", options.len())));
            }
            let letter = match row.value("answer")? {
                Value::Number(n) => n
                    .as_u64()
                    .and_then(|i| LETTERS.get(i as usize))
                    .map(|l| l.to_string())
                    .ok_or_else(|| row.error("answer", format!("{n} is not an index 0-3")))?,
                _ => row.text("answer")?.trim().to_string(),
            };
            let counter = seen.entry(subject.clone()).or_default();
            let within = *counter;
            *counter += 1;
            question_item(row, &subject, within, options, letter, "answer")
        })
        .collect()
}

fn question_item(
    row: &Row,
    subject: &str,
    within_subject: usize,
    options: Vec<String>,
    letter: String,
    answer_field: &str,
) -> Result<Item> {
    let index = LETTERS
        .iter()
        .position(|l| *l == letter)
        .ok_or_else(|| row.error(answer_field, format!("`{letter}` is not one of A-D")))?;
    let mut item = item(Dataset::Mmlu, format!("{subject}/{within_subject}"), row, row.text("question")?);
    item.correct_answer = Some(options[index].clone());
    item.options = options;
    item.answer_letter = Some(letter);
    item.category = Some(subject.to_string());
    Ok(item)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datasets::{DatasetSource, bundled_path, data_dir, load};

    fn bundled() -> Vec<Item> {
        load(Dataset::Mmlu, &DatasetSource::default(), &data_dir()).unwrap()
    }

    #[test]
    fn bundled_mmlu_test_has_14042_questions_in_57_subjects() {
        let items = bundled();
        assert_eq!(items.len(), 14042);
        let subjects: std::collections::BTreeSet<_> = items.iter().map(|i| i.category.clone().unwrap()).collect();
        assert_eq!(subjects.len(), 57);
        let first = &items[0];
        assert_eq!(first.item_key, "abstract_algebra/0");
        assert_eq!(first.category.as_deref(), Some("abstract_algebra"));
        assert_eq!(first.options.len(), 4);
        let letter = first.answer_letter.as_deref().unwrap();
        let index = LETTERS.iter().position(|l| *l == letter).unwrap();
        assert_eq!(first.correct_answer.as_ref(), Some(&first.options[index]));
        assert!(items.iter().all(|i| i.options.len() == 4));
    }

    #[test]
    fn one_subject_file_and_the_hf_layout_give_the_same_items() {
        let file = bundled_path(Dataset::Mmlu, &data_dir()).join("anatomy_test.csv");
        let single =
            load(Dataset::Mmlu, &DatasetSource { path: Some(file), ..Default::default() }, &data_dir()).unwrap();
        let from_dir: Vec<Item> = bundled().into_iter().filter(|i| i.category.as_deref() == Some("anatomy")).collect();
        assert_eq!(single, from_dir);
        assert_eq!(single.len(), 135);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mmlu.jsonl");
        let lines: Vec<String> = single
            .iter()
            .map(|i| {
                let answer = LETTERS.iter().position(|l| Some(*l) == i.answer_letter.as_deref()).unwrap();
                serde_json::json!({
                    "question": i.question, "subject": "anatomy",
                    "choices": i.options, "answer": answer,
                })
                .to_string()
            })
            .collect();
        std::fs::write(&path, lines.join("\n")).unwrap();
        let hf = load(Dataset::Mmlu, &DatasetSource { path: Some(path), ..Default::default() }, &data_dir()).unwrap();
        assert_eq!(hf, single);
    }

    #[test]
    fn an_answer_outside_a_to_d_names_the_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("virology_test.csv");
        std::fs::write(&path, "Q1?,a,b,c,d,B\nQ2?,a,b,c,d,E\n").unwrap();
        let error =
            load(Dataset::Mmlu, &DatasetSource { path: Some(path), ..Default::default() }, &data_dir()).unwrap_err();
        assert!(error.to_string().contains("virology_test.csv, line 2, field `answer`"), "{error}");
    }
}
