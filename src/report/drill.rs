//! The report's drill-down: the items behind every b and c of the family tables.
//!
//! The rows of the `discordant_pairs` view (prompt, both answers, verdicts, judge ids and raw
//! answers, refusal flags) are embedded in `report.html` as one gzip-compressed, base64-encoded
//! JSON block, column by column with every string stored once. Nothing is decoded when the page
//! opens: the first click on a b or c count decompresses the block in the browser
//! (`DecompressionStream`, no network, no library) and `drill.js` renders only the pairs of the
//! chosen cell, 50 at a time, so a report of 50,000 pairs stays responsive.
//!
//! Layout of the decompressed JSON (`v` = 1):
//!
//! | key | value |
//! |---|---|
//! | `strings` | every distinct text, once |
//! | `comparisons` | `[{model, base, checkpoint, label}]`: the (model, base checkpoint, checkpoint) a family belongs to |
//! | `n` | number of pairs |
//! | `cols` | one array of length `n` per column: string columns hold indices into `strings` (−1 for NULL), `comparison` indexes `comparisons`, `side` is 0 for b and 1 for c, flags are 0/1 |
//!
//! ```
//! use candor::report::drill::Block;
//! let mut block = Block::default();
//! let cmp = block.comparison("m", "original", "warm", "warm system prompt");
//! assert_eq!(block.comparison("m", "original", "warm", "warm system prompt"), cmp);
//! assert!(block.encode().unwrap().len() > 0);
//! ```

use std::collections::HashMap;
use std::io::Write as _;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use base64::Engine as _;
use serde_json::{Value, json};

use crate::error::{Error, Result};

/// Columns of `discordant_pairs` carried as text.
const TEXT_COLUMNS: [&str; 17] = [
    "dataset",
    "test_type",
    "category",
    "prompt_type",
    "item_key",
    "prompt",
    "base_output",
    "ft_output",
    "base_verdict",
    "ft_verdict",
    "base_judge",
    "ft_judge",
    "base_judge_raw",
    "ft_judge_raw",
    "base_response_key",
    "ft_response_key",
    "sample_index",
];

/// Columns carried as 0/1 flags.
const FLAG_COLUMNS: [&str; 2] = ["base_refusal", "ft_refusal"];

/// The drill-down data being built: a string table, the comparisons and the columns.
#[derive(Default)]
pub struct Block {
    strings: Vec<String>,
    index: HashMap<String, i64>,
    comparisons: Vec<(String, String, String, String)>,
    comparison_index: HashMap<(String, String, String), usize>,
    cols: HashMap<&'static str, Vec<i64>>,
    n: usize,
}

impl Block {
    fn intern(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.index.get(s) {
            return i;
        }
        let i = self.strings.len() as i64;
        self.strings.push(s.to_string());
        self.index.insert(s.to_string(), i);
        i
    }

    /// The index of a comparison (model, base checkpoint, checkpoint), added when new with the
    /// checkpoint's honest label.
    pub fn comparison(&mut self, model: &str, base: &str, checkpoint: &str, label: &str) -> usize {
        let key = (model.to_string(), base.to_string(), checkpoint.to_string());
        if let Some(&i) = self.comparison_index.get(&key) {
            return i;
        }
        let i = self.comparisons.len();
        self.comparisons.push((key.0.clone(), key.1.clone(), key.2.clone(), label.to_string()));
        self.comparison_index.insert(key, i);
        i
    }

    /// Number of pairs added.
    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Adds every row of a `discordant_pairs` batch; `label` names a (model, checkpoint)'s variant.
    pub fn add(&mut self, pairs: &RecordBatch, label: &dyn Fn(&str, &str) -> String) -> Result<()> {
        let text = |name: &str| -> Result<arrow::array::StringArray> {
            let col = pairs
                .column_by_name(name)
                .ok_or_else(|| Error::Internal(format!("discordant_pairs has no column {name}")))?;
            let col = cast(col, &DataType::Utf8).map_err(|e| Error::arrow("discordant_pairs", e))?;
            Ok(col.as_string::<i32>().clone())
        };
        let (model, base, checkpoint, side) =
            (text("model")?, text("base_checkpoint")?, text("checkpoint")?, text("counts_toward")?);
        let texts: Vec<(&'static str, arrow::array::StringArray)> =
            TEXT_COLUMNS.iter().map(|c| Ok((*c, text(c)?))).collect::<Result<_>>()?;
        let flags: Vec<(&'static str, arrow::array::BooleanArray)> = FLAG_COLUMNS
            .iter()
            .map(|c| {
                let col = pairs
                    .column_by_name(c)
                    .ok_or_else(|| Error::Internal(format!("discordant_pairs has no column {c}")))?;
                Ok((*c, col.as_boolean().clone()))
            })
            .collect::<Result<_>>()?;
        for i in 0..pairs.num_rows() {
            let cmp = self.comparison(
                model.value(i),
                base.value(i),
                checkpoint.value(i),
                &label(model.value(i), checkpoint.value(i)),
            );
            self.cols.entry("comparison").or_default().push(cmp as i64);
            self.cols.entry("side").or_default().push(i64::from(side.value(i) == "c"));
            for (name, col) in &texts {
                let v = if col.is_null(i) { -1 } else { self.intern(col.value(i)) };
                self.cols.entry(name).or_default().push(v);
            }
            for (name, col) in &flags {
                self.cols.entry(name).or_default().push(i64::from(col.is_valid(i) && col.value(i)));
            }
        }
        self.n += pairs.num_rows();
        Ok(())
    }

    /// The block as embedded: gzip-compressed JSON, base64-encoded.
    pub fn encode(&self) -> Result<String> {
        let comparisons: Vec<Value> = self
            .comparisons
            .iter()
            .map(|(m, b, c, l)| json!({"model": m, "base": b, "checkpoint": c, "label": l}))
            .collect();
        let doc = json!({
            "v": 1,
            "strings": self.strings,
            "comparisons": comparisons,
            "n": self.n,
            "cols": self.cols,
        });
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        serde_json::to_writer(&mut gz, &doc).map_err(|e| Error::Internal(format!("drill-down data: {e}")))?;
        gz.flush().map_err(|e| Error::Internal(format!("drill-down data: {e}")))?;
        let bytes = gz.finish().map_err(|e| Error::Internal(format!("drill-down data: {e}")))?;
        Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
    }
}

/// The drill-down's script and style, inlined into the report (no network, no CDN).
pub const SCRIPT: &str = include_str!("drill.js");
pub const STYLE: &str = include_str!("drill.css");

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    #[test]
    fn the_block_round_trips_and_stores_each_string_once() {
        // A two-row discordant_pairs batch, built by hand.
        use arrow::array::{ArrayRef, BooleanArray, StringArray};
        use std::sync::Arc;
        let s = |v: [Option<&str>; 2]| Arc::new(StringArray::from(v.to_vec())) as ArrayRef;
        let mut cols: Vec<(&str, ArrayRef)> = vec![
            ("model", s([Some("m"), Some("m")])),
            ("base_checkpoint", s([Some("original"), Some("original")])),
            ("checkpoint", s([Some("warm"), Some("warm")])),
            ("counts_toward", s([Some("b"), Some("c")])),
        ];
        for c in TEXT_COLUMNS {
            let v = match c {
                "prompt" => s([Some("What is 2+2?"), Some("What is 2+2?")]),
                "base_judge_raw" => s([None, Some("CORRECT")]),
                _ => s([Some(c), Some(c)]),
            };
            cols.push((c, v));
        }
        for c in FLAG_COLUMNS {
            cols.push((c, Arc::new(BooleanArray::from(vec![true, false])) as ArrayRef));
        }
        let batch = RecordBatch::try_from_iter(cols).unwrap();
        let mut block = Block::default();
        block.add(&batch, &|_, c| format!("{c} label")).unwrap();
        assert_eq!(block.len(), 2);
        let bytes = base64::engine::general_purpose::STANDARD.decode(block.encode().unwrap()).unwrap();
        let mut text = String::new();
        flate2::read::GzDecoder::new(&bytes[..]).read_to_string(&mut text).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["n"], 2);
        assert_eq!(v["comparisons"][0]["label"], "warm label");
        assert_eq!(v["cols"]["side"], json!([0, 1]));
        assert_eq!(v["cols"]["base_refusal"], json!([1, 0]));
        assert_eq!(v["cols"]["base_judge_raw"][0], -1, "NULL stays NULL");
        let strings = v["strings"].as_array().unwrap();
        assert_eq!(strings.iter().filter(|s| *s == "What is 2+2?").count(), 1);
        let prompt = v["cols"]["prompt"][1].as_i64().unwrap() as usize;
        assert_eq!(strings[prompt], "What is 2+2?");
    }
}
