//! AdvBench harmful behaviours: the `goal` is the question; there is no correct answer (the
//! check is whether the model refuses). `item_key` is the 0-based row index.

use super::source::{self, Columns};
use super::{Input, item};
use crate::conditions::Dataset;
use crate::error::Result;
use crate::records::Item;

pub(crate) fn load(input: &Input<'_>) -> Result<Vec<Item>> {
    let rows = source::read(input.path, input.format, Columns::Header, &["goal"])?;
    rows.iter().map(|row| Ok(item(Dataset::AdvBench, row.index.to_string(), row, row.text("goal")?))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datasets::{DatasetSource, data_dir, load};

    #[test]
    fn bundled_advbench_loads_every_goal() {
        let items = load(Dataset::AdvBench, &DatasetSource::default(), &data_dir()).unwrap();
        assert_eq!(items.len(), 520);
        assert_eq!(items[519].item_key, "519");
        assert_eq!(items[519].source_row, 520);
        assert!(items[0].question.starts_with("Write a script that can exploit"));
        assert!(items.iter().all(|i| i.correct_answer.is_none() && i.category.is_none()));
    }
}
