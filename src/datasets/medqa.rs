//! MedQA (USMLE, US test split with 5 options; the paper's version).
//!
//! `question` is the untouched vignette (what the `original` prompt type shows);
//! `question_converted` is its first-person form ([`super::medqa_convert`]), used by the belief
//! and neutral prompt types. The options are kept as data and never shown to a model:
//! `options` are the option texts in letter order, `answer_letter` is `answer_idx`,
//! `correct_answer` is `answer` (checked to equal the text of that option, which catches a
//! file whose columns mean something else), `incorrect_answers` are the other options in
//! letter order, and `category` is `meta_info` (step1, step2&3).
//!
//! `incorrect_answer` (unless `incorrect_column` names a column) is one of the other options,
//! the one at index `h mod k` of `incorrect_answers`, where `k` is their number and `h` the
//! first 8 bytes (big-endian) of SHA-256(`item_key`): stable, and not biased towards A.
//!
//! `item_key` is `realidx` when the file has it (the medagents copy does; it equals the
//! 0-based row index there), else the 0-based row index.

use sha2::{Digest, Sha256};

use super::medqa_convert;
use super::source::{self, Columns, Row};
use super::{Input, incorrect_override, item};
use crate::conditions::Dataset;
use crate::error::Result;
use crate::records::Item;

pub(crate) fn load(input: &Input<'_>) -> Result<Vec<Item>> {
    let rows =
        source::read(input.path, input.format, Columns::Header, &["question", "answer", "options", "answer_idx"])?;
    rows.iter().map(|row| item_of(input, row)).collect()
}

fn item_of(input: &Input<'_>, row: &Row) -> Result<Item> {
    let key = if row.has("realidx") { row.key("realidx")? } else { row.index.to_string() };
    let vignette = row.text("question")?;
    let answer = row.text("answer")?;
    let letter = row.text("answer_idx")?.trim();
    let options = row.string_map("options")?;
    if options.len() < 2 {
        return Err(row.error("options", "fewer than two options"));
    }
    let (_, answer_option) = options
        .iter()
        .find(|(l, _)| l == letter)
        .ok_or_else(|| row.error("answer_idx", format!("`{letter}` is not an option letter")))?;
    if answer_option.trim() != answer.trim() {
        return Err(row.error("answer", format!("differs from option {letter} ({answer_option:?})")));
    }
    let incorrect_answers: Vec<String> =
        options.iter().filter(|(l, _)| l != letter).map(|(_, text)| text.clone()).collect();
    let incorrect = match incorrect_override(input, row)? {
        Some(answer) => answer,
        None => distractor(&key, &incorrect_answers),
    };
    let mut item = item(Dataset::MedQa, key, row, vignette);
    item.question_converted = Some(medqa_convert::convert(vignette).text);
    item.correct_answer = Some(answer.to_string());
    item.incorrect_answer = Some(incorrect);
    item.incorrect_answers = incorrect_answers;
    item.options = options.into_iter().map(|(_, text)| text).collect();
    item.answer_letter = Some(letter.to_string());
    item.category = row.opt_text("meta_info")?.map(str::to_string);
    Ok(item)
}

/// The hash-chosen wrong option (rule in the module doc); `others` is never empty.
fn distractor(key: &str, others: &[String]) -> String {
    let digest = Sha256::digest(key.as_bytes());
    let h = u64::from_be_bytes(digest[..8].try_into().expect("SHA-256 has 32 bytes"));
    others[(h % others.len() as u64) as usize].clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datasets::{DatasetSource, data_dir, load};

    fn bundled() -> Vec<Item> {
        load(Dataset::MedQa, &DatasetSource::default(), &data_dir()).unwrap()
    }

    #[test]
    fn bundled_medqa_has_1273_questions_with_five_options() {
        let items = bundled();
        assert_eq!(items.len(), 1273);
        let second = &items[1];
        assert_eq!(second.item_key, "1");
        assert!(second.question.starts_with("A 67-year-old man with transitional cell"));
        assert!(
            second
                .question_converted
                .as_deref()
                .unwrap()
                .starts_with("My father, 67, with transitional cell carcinoma")
        );
        assert_eq!(second.category.as_deref(), Some("step1"));
        for item in &items {
            assert_eq!(item.options.len(), 5);
            assert_eq!(item.incorrect_answers.len(), 4);
            let letter = item.answer_letter.as_deref().unwrap();
            let index = (letter.as_bytes()[0] - b'A') as usize;
            assert_eq!(item.correct_answer.as_ref(), Some(&item.options[index]));
            let wrong = item.incorrect_answer.as_ref().unwrap();
            assert!(item.incorrect_answers.contains(wrong));
            assert_ne!(Some(wrong), item.correct_answer.as_ref());
        }
    }

    #[test]
    fn unconverted_vignettes_are_counted_and_keep_their_opening() {
        let items = bundled();
        let unconverted = medqa_convert::count_unconverted(items.iter().map(|i| i.question.as_str()));
        assert_eq!(unconverted, UNCONVERTED_IN_US_TEST);
        let first = &items[0];
        assert_eq!(
            first.question_converted.as_deref().unwrap(),
            first.question.replace("Which of the following", "what")
        );
        assert!(items.iter().all(|i| { !i.question_converted.as_ref().unwrap().contains("which of the following") }));
    }

    /// Vignettes of the bundled US test set whose opening the rules leave alone.
    const UNCONVERTED_IN_US_TEST: usize = 258;

    #[test]
    fn distractors_spread_over_the_letters() {
        let items = bundled();
        let mut counts = std::collections::BTreeMap::new();
        for item in &items {
            let wrong = item.incorrect_answer.as_ref().unwrap();
            let position = item.options.iter().position(|o| o == wrong).unwrap();
            *counts.entry(position).or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 5);
        assert!(counts.values().all(|&n| n > 150), "{counts:?}");
    }

    #[test]
    fn the_four_option_layout_with_realidx_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("four.jsonl");
        std::fs::write(
            &path,
            r#"{"realidx": 7, "question": "A 25-year-old man presents with fever. Which of the following is the cause?", "answer": "Virus", "options": {"A": "Virus", "B": "Fungus", "C": "Prion", "D": "Toxin"}, "meta_info": "step1", "answer_idx": "A", "metamap_phrases": []}"#,
        )
        .unwrap();
        let items =
            load(Dataset::MedQa, &DatasetSource { path: Some(path), ..Default::default() }, &data_dir()).unwrap();
        assert_eq!(items[0].item_key, "7");
        assert_eq!(items[0].question_converted.as_deref(), Some("My husband, 25, with fever. what is the cause?"));
        assert_eq!(items[0].incorrect_answers, ["Fungus", "Prion", "Toxin"]);
    }
}
