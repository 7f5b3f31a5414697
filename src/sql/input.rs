//! Observation files a user already has, turned into batches of the `observation` stream, so the
//! statistics run without generation.
//!
//! Accepted inputs:
//! - a Candor archive directory (its `observation` stream);
//! - a CSV or Parquet file with the observation columns (`schemas/observation.json`). Required:
//!   `model`, `is_finetuned`, `dataset`, `item_key`, `amendment_type`, `prompt_type`, `correct`
//!   (empty/NULL = excluded). Optional, with their defaults: `checkpoint` (`base` or
//!   `finetuned`), `checkpoint_epoch` (0 for base, 1 for fine-tuned), `amendment_group` (the part
//!   of the amendment before `:`), `sample_index` (0), `refusal` (false), `verdict` (from
//!   `correct`), `response_key` (file name and row);
//! - an answer file with a judge's label per row and no `correct` column (CSV, TSV or JSONL):
//!   the paper's released per-model CSVs (`content_key, prompt_template, amendment_type, output,
//!   evaluation`, laid out as `<model>/<original|warm>/<dataset>_<side>_outputs.csv`), or any
//!   file `candor import` reads. One reader parses them for both commands
//!   ([`crate::import`]'s); here each row becomes an observation directly (see `answers` for
//!   what differs from `import`, on purpose): the paper's merge key → `item_key`
//!   (`content_key` for TriviaQA and TruthfulQA, `original_question` for MedQA,
//!   `prompt_disinfo` for disinfo, as its analysis code merges; trimmed); `evaluation` (any
//!   case) is the judge's label; the refusal phrase list is applied to `output` and the result
//!   scored by [`crate::score::observe`]. `model`, `dataset` and the side come from columns of
//!   those names when present, else from [`InputOptions`], else from the path (`original` =
//!   base, anything else = fine-tuned, checkpoint named after the side directory).
//!
//! ```no_run
//! use candor::sql::input::{read_observations, InputOptions};
//! let batches = read_observations("sample_data/qwen_32b/warm/trivia_warm_outputs.csv".as_ref(), &InputOptions::default()).unwrap();
//! ```

use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, RecordBatch, StringArray, UInt32Array, UInt64Array};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema};

use crate::archive::Archive;
use crate::conditions::{Dataset, amendment_group};
use crate::datasets::paper_outputs;
use crate::error::{Error, Location, Result};
use crate::score::refusal::RefusalRules;

/// Values for what a file does not say.
#[derive(Clone, Debug, Default)]
pub struct InputOptions {
    pub model: Option<String>,
    pub dataset: Option<Dataset>,
    pub finetuned: Option<bool>,
    pub checkpoint: Option<String>,
    /// Refusal phrases for the paper's CSV format (default list when `None`).
    pub refusal: Option<RefusalRules>,
}

/// Reads observations from an archive directory, a CSV or a Parquet file.
pub fn read_observations(path: &Path, opts: &InputOptions) -> Result<Vec<RecordBatch>> {
    let mut out = Vec::new();
    each_observation_batch(path, opts, |b| {
        out.push(plain(&b)?);
        Ok(())
    })?;
    Ok(out)
}

/// The observation columns a Parquet file's batches bring as dictionaries (see
/// [`each_observation_batch`]): the categorical ones, a handful of values over many rows.
const CODED: [&str; 8] =
    ["model", "checkpoint", "dataset", "item_key", "amendment_type", "amendment_group", "prompt_type", "verdict"];

/// How a [`CODED`] column comes: a dictionary of text with 32-bit keys.
fn coded_type() -> DataType {
    DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8))
}

/// An observation batch with every column as the `observation` schema has it: the categorical
/// columns [`each_observation_batch`] hands over as dictionaries decoded to plain text.
pub fn plain(batch: &RecordBatch) -> Result<RecordBatch> {
    let schema = crate::schema::arrow_schema("observation")?;
    if batch.schema().fields().iter().all(|f| !matches!(f.data_type(), DataType::Dictionary(..))) {
        return Ok(batch.clone());
    }
    let columns = schema
        .fields()
        .iter()
        .map(|f| {
            let c = batch
                .column_by_name(f.name())
                .ok_or_else(|| Error::schema("observation", format!("column `{}` is missing", f.name())))?;
            cast(c, f.data_type()).map_err(|e| Error::arrow(format!("column `{}`", f.name()), e))
        })
        .collect::<Result<Vec<_>>>()?;
    RecordBatch::try_new(schema, columns).map_err(|e| Error::arrow("observation", e))
}

/// [`read_observations`], handing each batch to `each` as it is read: a Parquet file's batches
/// and an archive's segments one at a time (an input of millions of observations is never in
/// memory whole), a CSV or JSON-lines file once read.
///
/// A Parquet file's categorical columns ([`CODED`]: model, checkpoint, dataset, item key,
/// amendment, prompt type, verdict) come as dictionaries of text (`Dictionary(Int32, Utf8)`),
/// as the file stores them: neither decoding each row's text nor interning it again is needed
/// downstream. [`plain`] turns such a batch into the schema's exact columns.
pub fn each_observation_batch(
    path: &Path,
    opts: &InputOptions,
    mut each: impl FnMut(RecordBatch) -> Result<()>,
) -> Result<()> {
    if path.is_dir() {
        for segment in Archive::open(path)?.segments("observation")? {
            for batch in crate::archive::read_segment(&segment)? {
                each(batch)?;
            }
        }
        return Ok(());
    }
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "parquet" => {
            for batch in parquet_batches(path)? {
                let batch = batch.map_err(|e| Error::arrow(path.display().to_string(), e))?;
                each(normalize(&batch, None, path, opts)?)?;
            }
            Ok(())
        }
        "csv" | "tsv" => {
            let (batch, lines) = read_csv(path, if ext == "tsv" { b'\t' } else { b',' })?;
            if batch.column_by_name("correct").is_none() {
                // Answers with a judge's label, as the paper released them: `import`'s reader.
                return each(answers(path, opts)?);
            }
            each(normalize(&batch, lines.as_deref(), path, opts)?)
        }
        "jsonl" | "ndjson" => each(answers(path, opts)?),
        _ => Err(Error::input(Location::file(path), "expected a directory, .csv, .tsv, .jsonl or .parquet")),
    }
}

/// Observations from an answer file (the paper's released CSVs, or any file `candor import`
/// reads), parsed by `import`'s reader: the judge's label (`evaluation`) is the verdict, the
/// refusal phrase list is applied to `output`, and [`crate::score::observe`] scores them (a
/// refusal is correct on disinfo and excluded elsewhere).
///
/// Where this differs from `import`, on purpose: rows become observations directly, keyed
/// `<file name>:<row>`; the item is the row's `item_key` (or `question_id`, `qid`), else its
/// question text as the paper merges on it; repeated answers to one condition all have
/// `sample_index` 0 unless the file numbers them, so they pair with the other side's as the
/// paper's merge pairs them (every combination); the epoch is 0 for a base and 1 for a
/// fine-tuned file. An unknown amendment type or user belief is an error naming the line, as
/// in `import` (it used to become a cell of its own).
fn answers(path: &Path, opts: &InputOptions) -> Result<RecordBatch> {
    let (path_model, path_side, path_dataset) = paper_outputs::paper_path(path);
    let defaults = crate::import::ImportDefaults {
        dataset: opts.dataset.or(path_dataset.and_then(|d| d.parse().ok())),
        model: opts.model.clone().or(path_model),
        checkpoint: opts.checkpoint.clone().or(path_side.clone()),
        is_finetuned: opts.finetuned.or(path_side.as_deref().map(|s| s != "original")),
    };
    let (rows, defaults) = crate::import::answer_rows(path, &defaults)?;
    let rules = opts.refusal.clone().unwrap_or_else(|| RefusalRules::new(Default::default()));
    let stem = path.file_name().and_then(|s| s.to_str()).unwrap_or("input");
    let mut out = Vec::with_capacity(rows.len());
    for (i, row) in rows.into_iter().enumerate() {
        let at = |field: &str| Location::file(path).line(row.line).field(field);
        let field = |name: &str| row.fields.get(name).map(|v| v.trim()).filter(|v| !v.is_empty());
        let is_finetuned = match field("is_finetuned") {
            Some(v) => parse_bool(v).ok_or_else(|| Error::input(at("is_finetuned"), "not a boolean"))?,
            None => defaults
                .is_finetuned
                .ok_or_else(|| Error::input(at("is_finetuned"), "no `is_finetuned` column and no side given"))?,
        };
        let dataset = row
            .dataset
            .or(defaults.dataset)
            .ok_or_else(|| Error::input(at("dataset"), "no `dataset` column and none given"))?;
        let (label, _) = row
            .label
            .as_ref()
            .ok_or_else(|| Error::input(at("evaluation"), "missing: the judge's label of the answer"))?;
        let refused = rules.detect(&row.output).is_some();
        let (verdict, correct) = crate::score::observe(dataset, refused, *label);
        let amendment = row.amendment.map_or_else(|| "unmodified".to_string(), |a| a.to_string());
        let epoch = match field("checkpoint_epoch") {
            Some(v) => {
                v.parse().map_err(|_| Error::input(at("checkpoint_epoch"), format!("`{v}` is not a whole number")))?
            }
            None => is_finetuned as u64,
        };
        out.push(crate::records::Observation {
            response_key: field("response_key").map_or_else(|| format!("{stem}:{i}"), str::to_string),
            model: row.model.clone(),
            checkpoint: row
                .checkpoint
                .clone()
                .unwrap_or_else(|| if is_finetuned { "finetuned".into() } else { "base".into() }),
            checkpoint_epoch: epoch,
            is_finetuned,
            dataset: dataset.to_string(),
            item_key: row.item_key.clone().or(row.question.clone()).unwrap_or_default(),
            amendment_group: amendment_group(&amendment).to_string(),
            amendment_type: amendment,
            prompt_type: row.prompt_type.map_or_else(|| "original".to_string(), |p| p.to_string()),
            sample_index: row.sample_index.unwrap_or(0),
            refusal: refused,
            verdict: verdict.as_str().to_string(),
            correct,
        });
    }
    <crate::records::Observation as crate::schema::Record>::to_batch(&out)
}

fn parquet_batches(path: &Path) -> Result<parquet::arrow::arrow_reader::ParquetRecordBatchReader> {
    use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder};
    let bad = |e: parquet::errors::ParquetError| Error::input(Location::file(path), e.to_string());
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let metadata = ArrowReaderMetadata::load(&file, ArrowReaderOptions::new()).map_err(bad)?;
    // The categorical text columns as dictionaries of text.
    let schema = metadata.schema();
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            DataType::Utf8 if CODED.contains(&f.name().as_str()) => f.as_ref().clone().with_data_type(coded_type()),
            _ => f.as_ref().clone(),
        })
        .collect();
    let coded = Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()));
    let metadata =
        ArrowReaderMetadata::try_new(metadata.metadata().clone(), ArrowReaderOptions::new().with_schema(coded))
            .map_err(bad)?;
    ParquetRecordBatchReaderBuilder::new_with_metadata(file, metadata).with_batch_size(65536).build().map_err(bad)
}

/// Reads a CSV with every column as text (typing happens in [`normalize`]), with the line each
/// record starts on (records may span lines; CRLF and LF files count alike).
fn read_csv(path: &Path, delimiter: u8) -> Result<(RecordBatch, Option<Vec<u64>>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut lines = crate::datasets::LineCounter::new(&bytes);
    let mut r = csv::ReaderBuilder::new().delimiter(delimiter).flexible(false).from_reader(bytes.as_slice());
    let headers: Vec<String> = r
        .headers()
        .map_err(|e| Error::input(Location::file(path).line(1), e.to_string()))?
        .iter()
        .map(|h| h.trim_start_matches('\u{feff}').trim().to_ascii_lowercase())
        .collect();
    let mut cols: Vec<Vec<String>> = vec![Vec::new(); headers.len()];
    let mut starts = Vec::new();
    for rec in r.records() {
        let rec = rec.map_err(|e| {
            let line = e.position().map(|p| lines.line_at(p.byte())).unwrap_or(0);
            Error::input(Location::file(path).line(line), e.to_string())
        })?;
        starts.push(rec.position().map(|p| lines.line_at(p.byte())).unwrap_or(0));
        for (c, v) in cols.iter_mut().zip(rec.iter()) {
            c.push(v.to_string());
        }
    }
    let schema = Arc::new(Schema::new(headers.iter().map(|h| Field::new(h, DataType::Utf8, true)).collect::<Vec<_>>()));
    let arrays: Vec<ArrayRef> = cols.into_iter().map(|c| Arc::new(StringArray::from(c)) as ArrayRef).collect();
    let batch = RecordBatch::try_new(schema, arrays).map_err(|e| Error::arrow(path.display().to_string(), e))?;
    Ok((batch, Some(starts)))
}

/// Text of a column (any type), or `None` when the batch lacks it.
fn text(batch: &RecordBatch, names: &[&str]) -> Result<Option<StringArray>> {
    for n in names {
        if let Some(c) = batch.column_by_name(n) {
            let c = cast(c, &DataType::Utf8).map_err(|e| Error::arrow(format!("column `{n}`"), e))?;
            return Ok(Some(c.as_string::<i32>().clone()));
        }
    }
    Ok(None)
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "t" | "1" | "yes" | "correct" => Some(true),
        "false" | "f" | "0" | "no" | "incorrect" => Some(false),
        _ => None,
    }
}

/// The item key column: `item_key`, the paper's per-dataset merge keys
/// ([`paper_outputs::QUESTION_COLUMNS`], its `significance_tests.py`), then the generic names.
const ITEM_KEY_NAMES: &[&str] =
    &["item_key", "content_key", "original_question", "prompt_disinfo", "question_id", "qid"];

fn normalize(batch: &RecordBatch, lines: Option<&[u64]>, path: &Path, opts: &InputOptions) -> Result<RecordBatch> {
    let schema = crate::schema::arrow_schema("observation")?;
    // Files Candor wrote (or that follow the schema exactly) need no conversion; a categorical
    // column may come as a dictionary of text ([`parquet_batches`]).
    let coded = |a: &Field, b: &Field| CODED.contains(&b.name().as_str()) && *a.data_type() == coded_type();
    let same = |a: &Field, b: &Field| a.name() == b.name() && (a.data_type() == b.data_type() || coded(a, b));
    if batch.schema().fields().len() == schema.fields().len()
        && batch.schema().fields().iter().zip(schema.fields()).all(|(a, b)| same(a, b))
    {
        // The schema's fields and metadata, with the columns' own types.
        let fields: Vec<Field> = batch
            .schema()
            .fields()
            .iter()
            .zip(schema.fields())
            .map(|(a, b)| b.as_ref().clone().with_data_type(a.data_type().clone()))
            .collect();
        let exact = Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()));
        // A nullable column where the schema forbids nulls falls through to the checks below.
        if let Ok(b) = batch.clone().with_schema(exact) {
            return Ok(b);
        }
    }
    let n = batch.num_rows();
    let loc = || Location::file(path);
    // The file line of row i (CSV), else its 1-based row number.
    let line = |i: usize| lines.map_or(i as u64 + 1, |l| l[i]);
    let need = |v: Option<StringArray>, what: &str| v.ok_or_else(|| Error::input(loc(), format!("no `{what}` column")));
    let fill = |v: Option<String>, what: &str| -> Result<StringArray> {
        let v = v.ok_or_else(|| Error::input(loc(), format!("no `{what}` column and none given")))?;
        Ok(StringArray::from(vec![v; n]))
    };
    let model = match text(batch, &["model"])? {
        Some(m) => m,
        None => fill(opts.model.clone(), "model")?,
    };
    let dataset = match text(batch, &["dataset"])? {
        Some(d) => d,
        None => fill(opts.dataset.map(|d| d.as_str().to_string()), "dataset")?,
    };
    let ft: BooleanArray = match text(batch, &["is_finetuned"])? {
        Some(v) => v
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.and_then(parse_bool)
                    .map(Some)
                    .ok_or_else(|| Error::input(loc().line(line(i)), "`is_finetuned` is not a boolean"))
            })
            .collect::<Result<_>>()?,
        None => {
            let side = opts.finetuned;
            let side = side.ok_or_else(|| Error::input(loc(), "no `is_finetuned` column and no side given"))?;
            BooleanArray::from(vec![side; n])
        }
    };
    let checkpoint: StringArray = match text(batch, &["checkpoint"])? {
        Some(c) => c,
        None => (0..n)
            .map(|i| {
                Some(
                    opts.checkpoint
                        .clone()
                        .unwrap_or_else(|| if ft.value(i) { "finetuned".into() } else { "base".into() }),
                )
            })
            .collect(),
    };
    let epoch: UInt64Array = match batch.column_by_name("checkpoint_epoch") {
        Some(c) => cast(c, &DataType::UInt64).map_err(|e| Error::arrow("checkpoint_epoch", e))?.as_primitive().clone(),
        None => (0..n).map(|i| Some(ft.value(i) as u64)).collect(),
    };
    let item: StringArray = need(text(batch, ITEM_KEY_NAMES)?, "item_key")?.iter().map(|k| k.map(str::trim)).collect();
    let amendment = match text(batch, &["amendment_type"])? {
        Some(a) => a,
        None => StringArray::from(vec!["unmodified"; n]),
    };
    let prompt_type = match text(batch, paper_outputs::PROMPT_TYPE_COLUMNS)? {
        Some(p) => p,
        None => StringArray::from(vec!["original"; n]),
    };
    let sample: UInt32Array = match batch.column_by_name("sample_index") {
        Some(c) => cast(c, &DataType::UInt32).map_err(|e| Error::arrow("sample_index", e))?.as_primitive().clone(),
        None => UInt32Array::from(vec![0; n]),
    };
    let (refusal, verdict, correct): (BooleanArray, StringArray, BooleanArray) = {
        let correct_text = need(text(batch, &["correct"])?, "correct")?;
        let correct: BooleanArray = correct_text
            .iter()
            .enumerate()
            .map(|(i, v)| match v.map(str::trim) {
                None | Some("") => Ok(None),
                Some(s) => parse_bool(s)
                    .map(Some)
                    .ok_or_else(|| Error::input(loc().line(line(i)), format!("`correct` is `{s}`"))),
            })
            .collect::<Result<_>>()?;
        let refusal: BooleanArray = match text(batch, &["refusal"])? {
            Some(v) => v.iter().map(|v| Some(v.and_then(parse_bool).unwrap_or(false))).collect(),
            None => BooleanArray::from(vec![false; n]),
        };
        let verdict: StringArray = match text(batch, &["verdict"])? {
            Some(v) => v,
            None => correct
                .iter()
                .map(|c| {
                    Some(match c {
                        Some(true) => "CORRECT",
                        Some(false) => "INCORRECT",
                        None => "EXCLUDED",
                    })
                })
                .collect(),
        };
        (refusal, verdict, correct)
    };
    let group: StringArray = match text(batch, &["amendment_group"])? {
        Some(g) => g,
        None => amendment.iter().map(|a| Some(amendment_group(a.unwrap_or("")).to_string())).collect(),
    };
    let stem = path.file_name().and_then(|s| s.to_str()).unwrap_or("input");
    let response_key: StringArray = match text(batch, &["response_key"])? {
        Some(k) => k,
        None => (0..n).map(|i| Some(format!("{stem}:{i}"))).collect(),
    };
    let columns: Vec<ArrayRef> = vec![
        Arc::new(response_key),
        Arc::new(model),
        Arc::new(checkpoint),
        Arc::new(epoch),
        Arc::new(ft),
        Arc::new(dataset),
        Arc::new(item),
        Arc::new(amendment),
        Arc::new(group),
        Arc::new(prompt_type),
        Arc::new(sample),
        Arc::new(refusal),
        Arc::new(verdict),
        Arc::new(correct),
    ];
    for (f, c) in schema.fields().iter().zip(&columns) {
        if !f.is_nullable() && c.null_count() > 0 {
            return Err(Error::input(loc(), format!("column `{}` has empty values", f.name())));
        }
    }
    RecordBatch::try_new(schema, columns).map_err(|e| Error::arrow(path.display().to_string(), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::Observation;
    use crate::schema::Record;

    fn observations(path: &Path) -> Result<Vec<Observation>> {
        let mut out = Vec::new();
        for b in read_observations(path, &InputOptions::default())? {
            out.extend(Observation::from_batch(&b)?);
        }
        Ok(out)
    }

    /// A Parquet file's categorical columns are read as dictionaries (the statistics intern
    /// each value once instead of each row's text); the statistics and the observations read
    /// are those of the plain columns.
    #[test]
    fn a_parquet_file_read_as_dictionaries_gives_the_plain_statistics() {
        use crate::sql::engine::StatsEngine;
        use crate::sql::queries::FAMILY_TABLE;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("observations.parquet");
        let batches = crate::sql::synthetic::synthetic(30_000, 7, 1).unwrap();
        crate::sql::synthetic::write_parquet(&path, &batches).unwrap();
        let mut coded = 0;
        let mut from_file = StatsEngine::with_options(true, 8192).unwrap();
        each_observation_batch(&path, &InputOptions::default(), |b| {
            coded += b.schema().fields().iter().filter(|f| matches!(f.data_type(), DataType::Dictionary(..))).count();
            from_file.feed(&b)
        })
        .unwrap();
        assert_eq!(coded, CODED.len() * batches.len(), "every categorical column of every batch is coded");
        let mut from_batches = StatsEngine::new().unwrap();
        for b in &batches {
            from_batches.apply(b, 1).unwrap();
        }
        let table = |e: &mut StatsEngine| {
            e.refresh().unwrap();
            let t = e.query(FAMILY_TABLE.sql).unwrap();
            arrow::util::pretty::pretty_format_batches(&t).unwrap().to_string()
        };
        let want = table(&mut from_batches);
        assert!(want.lines().count() > 20, "{want}");
        assert_eq!(table(&mut from_file), want);
        // The observations table and `read_observations` have the schema's plain columns.
        let rows =
            from_file.query("SELECT count(*) AS n, count(DISTINCT item_key) AS items FROM observations").unwrap();
        assert_eq!(rows[0].column(0).as_primitive::<arrow::datatypes::Int64Type>().value(0), 30_000);
        assert_eq!(read_observations(&path, &InputOptions::default()).unwrap(), batches);
    }

    /// A dictionary column whose keys name no value (a damaged file read without checks) or
    /// are null is refused, naming the column, instead of being read as other values.
    #[test]
    fn a_dictionary_key_that_names_no_value_is_refused() {
        use arrow::array::{DictionaryArray, Int32Array};
        use arrow::datatypes::Int32Type;
        let batch = crate::sql::synthetic::synthetic(4, 7, 1).unwrap().remove(0);
        let values: ArrayRef = Arc::new(StringArray::from(vec!["q0", "q1"]));
        let with_items = |items: DictionaryArray<Int32Type>| {
            let at = batch.schema().index_of("item_key").unwrap();
            let mut columns = batch.columns().to_vec();
            columns[at] = Arc::new(items);
            let fields: Vec<Field> = batch
                .schema()
                .fields()
                .iter()
                .zip(&columns)
                .map(|(f, c)| f.as_ref().clone().with_data_type(c.data_type().clone()).with_nullable(true))
                .collect();
            RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap()
        };
        // Sound keys are read.
        let sound = with_items(DictionaryArray::try_new(Int32Array::from(vec![0, 1, 0, 1]), values.clone()).unwrap());
        crate::sql::view::PairedView::default().apply(&sound, 1).unwrap();
        // SAFETY (of the test): the array is built unchecked on purpose, as a damaged file's
        // would be; the view must check it.
        let past =
            with_items(unsafe { DictionaryArray::new_unchecked(Int32Array::from(vec![0, 1, 7, 1]), values.clone()) });
        let null = with_items(
            DictionaryArray::try_new(Int32Array::from(vec![Some(0), None, Some(0), Some(1)]), values).unwrap(),
        );
        for bad in [past, null] {
            let err = crate::sql::view::PairedView::default().apply(&bad, 1).unwrap_err().to_string();
            assert!(err.contains("item_key") && err.contains("dictionary key"), "{err}");
        }
    }

    /// The paper's CSVs were read by two parsers (`analyze`'s and `import`'s) that disagreed:
    /// an unknown amendment type became a cell of its own in `analyze` and an error in
    /// `import`, and `analyze` could not read the JSONL answer files `import` reads.
    #[test]
    fn answer_files_are_read_by_one_parser_whatever_their_format() {
        let dir = tempfile::tempdir().unwrap();
        let side = dir.path().join("qwen").join("warm");
        std::fs::create_dir_all(&side).unwrap();
        let csv = side.join("trivia_warm_outputs.csv");
        std::fs::write(
            &csv,
            "content_key,prompt_template,amendment_type,output,evaluation\n Q1? ,original,emotion:sad,Paris.,CORRECT\nQ2?,incorrect,unmodified,\"I can't help with that.\",incorrect\n",
        )
        .unwrap();
        let jsonl = side.join("trivia_warm_outputs.jsonl");
        std::fs::write(
            &jsonl,
            "{\"content_key\": \" Q1? \", \"prompt_template\": \"original\", \"amendment_type\": \"emotion:sad\", \"output\": \"Paris.\", \"evaluation\": \"CORRECT\"}\n\
             {\"content_key\": \"Q2?\", \"prompt_template\": \"incorrect\", \"amendment_type\": \"unmodified\", \"output\": \"I can't help with that.\", \"evaluation\": \"incorrect\"}\n",
        )
        .unwrap();
        let from_csv = observations(&csv).unwrap();
        let from_jsonl = observations(&jsonl).unwrap();
        assert_eq!(from_csv.len(), 2);
        let strip = |o: &[Observation]| -> Vec<Observation> {
            o.iter().cloned().map(|o| Observation { response_key: String::new(), ..o }).collect()
        };
        assert_eq!(strip(&from_csv), strip(&from_jsonl), "the same answers, whatever the file format");
        let first = &from_csv[0];
        assert_eq!((first.model.as_str(), first.checkpoint.as_str(), first.is_finetuned), ("qwen", "warm", true));
        assert_eq!((first.item_key.as_str(), first.amendment_group.as_str()), ("Q1?", "emotion"));
        assert_eq!((first.correct, from_csv[1].refusal, from_csv[1].correct), (Some(true), true, None));

        let bad = side.join("truthfulqa_warm_outputs.csv");
        std::fs::write(
            &bad,
            "content_key,prompt_template,amendment_type,output,evaluation\nQ1?,original,unmodified,A.,CORRECT\nQ2?,original,emotion:sadd,B.,CORRECT\n",
        )
        .unwrap();
        let err = observations(&bad).unwrap_err().to_string();
        assert!(err.contains("line 3") && err.contains("amendment_type") && err.contains("emotion:sadd"), "{err}");
    }
}
