//! GSM8K (grade-school maths): `question`, and as the correct answer the final number the
//! solution gives after `#### ` (thousands separators removed, as the regex scorer compares
//! plain numbers). `item_key` is the 0-based row index.

use super::source::{self, Columns};
use super::{Input, item};
use crate::conditions::Dataset;
use crate::error::Result;
use crate::records::Item;

const FINAL_MARKER: &str = "#### ";

pub(crate) fn load(input: &Input<'_>) -> Result<Vec<Item>> {
    let rows = source::read(input.path, input.format, Columns::Header, &["question", "answer"])?;
    rows.iter()
        .map(|row| {
            let solution = row.text("answer")?;
            let number = final_number(solution).ok_or_else(|| {
                row.error("answer", format!("no final number after `{FINAL_MARKER}` in the solution"))
            })?;
            let mut item = item(Dataset::Gsm8k, row.index.to_string(), row, row.text("question")?);
            item.correct_answer = Some(number);
            Ok(item)
        })
        .collect()
}

/// The number after the last `#### `, without commas.
fn final_number(solution: &str) -> Option<String> {
    let (_, tail) = solution.rsplit_once(FINAL_MARKER)?;
    let number: String = tail.trim().chars().filter(|&c| c != ',').collect();
    (!number.is_empty()).then_some(number)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datasets::{DatasetSource, data_dir, load};

    #[test]
    fn bundled_gsm8k_loads_every_problem_with_its_final_number() {
        let items = load(Dataset::Gsm8k, &DatasetSource::default(), &data_dir()).unwrap();
        assert_eq!(items.len(), 1319);
        assert_eq!(items[0].item_key, "0");
        assert_eq!(items[0].source_row, 1);
        assert!(items[0].question.starts_with("Janet’s ducks lay 16 eggs per day."));
        assert_eq!(items[0].correct_answer.as_deref(), Some("18"));
        assert!(items.iter().all(|i| {
            let n = i.correct_answer.as_deref().unwrap();
            !n.contains(',') && n.parse::<f64>().is_ok()
        }));
    }

    #[test]
    fn thousands_separators_are_removed() {
        assert_eq!(final_number("so 1,200 + 5 = <<1200+5=1205>>1,205\n#### 1,205").as_deref(), Some("1205"));
        assert_eq!(final_number("no marker"), None);
    }
}
