//! TriviaQA (a 150-question sample of rc.wikipedia validation with answer aliases).
//!
//! `item_key` is `qid`; `correct_answer` is `gold_answer`; `correct_answers` are the aliases with
//! the gold answer first (added when the aliases lack it).
//!
//! TriviaQA has no wrong answer, and `incorrect` prompts need one. Unless `incorrect_column`
//! names a column of the user's file that holds it, the incorrect answer is chosen so that it
//! is plausible, stable and never secretly right:
//! 1. Each gold answer has a kind: **year** (a 4-digit number 1000-2099), **number** (only digits
//!    and number words, e.g. "45", "Three", "4 billion") or **text**.
//! 2. The candidates are the gold answers of the *other* items of the same kind, taken once per
//!    normalised form, ordered by normalised form, leaving out every candidate whose normalised
//!    form equals that of any alias of this item (normalisation as in the TriviaQA scorer:
//!    lower case, punctuation and the articles a/an/the removed, spaces collapsed).
//! 3. The pick is `candidates[h mod len]`, `h` = the first 8 bytes (big-endian) of
//!    SHA-256(`qid`). If the kind has no candidate the rule falls back to all kinds.
//!
//! The choice depends only on the item's key and the set of gold answers in the file, not on
//! the file's order.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use super::source::{self, Columns};
use super::{Input, incorrect_override, item};
use crate::conditions::Dataset;
use crate::error::Result;
use crate::records::Item;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Year,
    Number,
    Text,
}

const NUMBER_WORDS: &[&str] = &[
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
    "thirty",
    "forty",
    "fifty",
    "sixty",
    "seventy",
    "eighty",
    "ninety",
    "hundred",
    "thousand",
    "million",
    "billion",
    "trillion",
];

pub(crate) fn load(input: &Input<'_>) -> Result<Vec<Item>> {
    let rows = source::read(input.path, input.format, Columns::Header, &["qid", "question", "gold_answer", "aliases"])?;
    let mut items = Vec::with_capacity(rows.len());
    let mut overrides = Vec::with_capacity(rows.len());
    for row in &rows {
        let gold = row.text("gold_answer")?.to_string();
        let mut aliases = row.strings("aliases")?;
        aliases.retain(|a| *a != gold);
        aliases.insert(0, gold.clone());
        let mut item = item(Dataset::Trivia, row.key("qid")?, row, row.text("question")?);
        item.correct_answer = Some(gold);
        item.correct_answers = aliases;
        items.push(item);
        overrides.push(incorrect_override(input, row)?);
    }
    let chosen: Vec<Option<String>> = items.iter().map(|i| distractor(i, &items)).collect();
    for ((item, user), built_in) in items.iter_mut().zip(overrides).zip(chosen) {
        item.incorrect_answer = user.or(built_in);
    }
    Ok(items)
}

/// The built-in incorrect answer of `item` among `items` (rule in the module doc).
fn distractor(item: &Item, items: &[Item]) -> Option<String> {
    let gold = item.correct_answer.as_deref()?;
    let taken: Vec<String> = item.correct_answers.iter().map(|a| normalise(a)).collect();
    let pool = |kind: Option<Kind>| -> Vec<String> {
        let mut by_form = BTreeMap::new();
        for other in items.iter().filter(|o| o.item_key != item.item_key) {
            let Some(answer) = other.correct_answer.as_deref() else {
                continue;
            };
            let form = normalise(answer);
            if kind.is_some_and(|k| kind_of(answer) != k) || taken.contains(&form) {
                continue;
            }
            by_form.entry(form).or_insert_with(|| answer.to_string());
        }
        by_form.into_values().collect()
    };
    let mut candidates = pool(Some(kind_of(gold)));
    if candidates.is_empty() {
        candidates = pool(None);
    }
    if candidates.is_empty() {
        return None;
    }
    let index = (stable_hash(&item.item_key) % candidates.len() as u64) as usize;
    Some(candidates.swap_remove(index))
}

fn stable_hash(key: &str) -> u64 {
    let digest = Sha256::digest(key.as_bytes());
    u64::from_be_bytes(digest[..8].try_into().expect("SHA-256 has 32 bytes"))
}

/// TriviaQA's answer normalisation: lower case, no punctuation, no articles, single spaces.
fn normalise(answer: &str) -> String {
    let lower: String =
        answer.to_lowercase().chars().map(|c| if c.is_alphanumeric() || c.is_whitespace() { c } else { ' ' }).collect();
    lower.split_whitespace().filter(|w| !matches!(*w, "a" | "an" | "the")).collect::<Vec<_>>().join(" ")
}

fn kind_of(answer: &str) -> Kind {
    let form = normalise(answer);
    let words: Vec<&str> = form.split_whitespace().collect();
    if let [word] = words.as_slice()
        && word.len() == 4
        && word.parse::<u32>().is_ok_and(|y| (1000..2100).contains(&y))
    {
        return Kind::Year;
    }
    let numeric = |w: &&str| w.chars().all(|c| c.is_ascii_digit()) || NUMBER_WORDS.contains(w);
    if !words.is_empty() && words.iter().all(numeric) { Kind::Number } else { Kind::Text }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datasets::{DatasetSource, data_dir, load};

    fn bundled() -> Vec<Item> {
        load(Dataset::Trivia, &DatasetSource::default(), &data_dir()).unwrap()
    }

    #[test]
    fn bundled_triviaqa_sample_has_150_questions() {
        let items = bundled();
        assert_eq!(items.len(), 150);
        let first = &items[0];
        assert_eq!(first.item_key, "tqa_c256394e");
        assert_eq!(first.question, "What spirit is added to tomato juice to make a Bloody Maria?");
        assert_eq!(first.correct_answer.as_deref(), Some("Tequila"));
        assert_eq!(first.correct_answers[0], "Tequila");
        assert!(first.correct_answers.contains(&"Tequilla".to_string()));
        assert_eq!(first.correct_answers.len(), 10);
    }

    #[test]
    fn every_distractor_is_wrong_and_of_the_same_kind() {
        for item in bundled() {
            let wrong = item.incorrect_answer.as_deref().expect("a distractor");
            let gold = item.correct_answer.as_deref().unwrap();
            assert!(
                item.correct_answers.iter().all(|a| normalise(a) != normalise(wrong)),
                "{}: {wrong}",
                item.item_key
            );
            assert_eq!(kind_of(wrong), kind_of(gold), "{}", item.item_key);
        }
    }

    #[test]
    fn distractors_do_not_depend_on_file_order() {
        let items = bundled();
        let mut reversed = items.clone();
        reversed.reverse();
        for item in &items {
            assert_eq!(distractor(item, &reversed), item.incorrect_answer, "{}", item.item_key);
        }
    }

    #[test]
    fn answer_kinds() {
        assert_eq!(kind_of("1971"), Kind::Year);
        assert_eq!(kind_of("45"), Kind::Number);
        assert_eq!(kind_of("Three"), Kind::Number);
        assert_eq!(kind_of("4 billion"), Kind::Number);
        assert_eq!(kind_of("APOLLO 11"), Kind::Text);
        assert_eq!(normalise("The Taking of Pelham, One Two Three"), "taking of pelham one two three");
    }

    /// A user's JSONL copy with its own wrong-answer column loads to the bundled items with
    /// that column as the incorrect answer.
    #[test]
    fn incorrect_column_overrides_the_distractor() {
        let raw: Vec<serde_json::Value> = serde_json::from_str(
            &std::fs::read_to_string(crate::datasets::bundled_path(Dataset::Trivia, &data_dir())).unwrap(),
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trivia.jsonl");
        let lines: Vec<String> = raw
            .iter()
            .map(|row| {
                let mut row = row.clone();
                let wrong = format!("not {}", row["gold_answer"].as_str().unwrap());
                row["my_wrong"] = wrong.into();
                row.to_string()
            })
            .collect();
        std::fs::write(&path, lines.join("\n")).unwrap();
        let source = DatasetSource { path: Some(path), format: None, incorrect_column: Some("my_wrong".into()) };
        let items = load(Dataset::Trivia, &source, &data_dir()).unwrap();
        let expected = bundled();
        assert_eq!(items.len(), expected.len());
        for (got, want) in items.iter().zip(&expected) {
            let gold = want.correct_answer.as_deref().unwrap();
            assert_eq!(got.incorrect_answer, Some(format!("not {gold}")));
            let mut got = got.clone();
            got.incorrect_answer = want.incorrect_answer.clone();
            assert_eq!(&got, want);
        }

        let missing = DatasetSource { incorrect_column: Some("absent".into()), ..source };
        let error = load(Dataset::Trivia, &missing, &data_dir()).unwrap_err();
        assert!(error.to_string().contains("field `absent`"), "{error}");
    }
}
