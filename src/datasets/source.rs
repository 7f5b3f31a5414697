//! Reads a dataset file in any of its published formats (CSV with or without header, JSONL, a
//! JSON array, Parquet) into one shape: rows of named JSON values, each knowing the file and
//! line it came from, so every loader reports bad input the same way.
//!
//! Line numbers in errors: JSONL and JSON use the physical line (of the object's first
//! character for a JSON array); CSV uses the record number with the header as line 1; Parquet,
//! which has no lines, uses the 1-based row.

use std::fs;
use std::path::Path;
use std::sync::Arc;

use serde_json::{Map, Value};

use super::SourceFormat;
use crate::error::{Error, Location, Result};

/// How a file's columns are named.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Columns<'a> {
    /// The first CSV record names the columns (JSON formats name their own).
    Header,
    /// A headerless CSV whose columns are, in order, these names.
    Headerless(&'a [&'a str]),
}

/// One data row of a source file.
#[derive(Clone, Debug)]
pub(crate) struct Row {
    path: Arc<Path>,
    /// 0-based position among the file's data rows.
    pub index: usize,
    /// 1-based line (or row) reported in errors; see the module doc.
    pub line: u64,
    values: Map<String, Value>,
}

/// The file format: the explicit one, else the one the extension names.
pub(crate) fn format_of(path: &Path, explicit: Option<SourceFormat>) -> Result<SourceFormat> {
    if let Some(format) = explicit {
        return Ok(format);
    }
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("csv") => Ok(SourceFormat::Csv),
        Some("jsonl") | Some("ndjson") => Ok(SourceFormat::Jsonl),
        Some("json") => Ok(SourceFormat::Json),
        Some("parquet") | Some("pq") => Ok(SourceFormat::Parquet),
        _ => Err(Error::input(
            Location::file(path),
            "cannot tell the format from the file extension; set `format` (csv, jsonl, json, parquet)",
        )),
    }
}

/// Reads every data row of `path`, checking that each `required` column exists.
pub(crate) fn read(
    path: &Path,
    format: Option<SourceFormat>,
    columns: Columns<'_>,
    required: &[&str],
) -> Result<Vec<Row>> {
    let format = format_of(path, format)?;
    if !path.is_file() {
        let what = if path.exists() { "is not a file" } else { "file not found" };
        return Err(Error::input(Location::file(path), what));
    }
    let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
    let shared: Arc<Path> = Arc::from(path);
    let rows = match format {
        SourceFormat::Csv => read_csv(&shared, &bytes, columns, required)?,
        SourceFormat::Jsonl => read_jsonl(&shared, &bytes)?,
        SourceFormat::Json => read_json_array(&shared, &bytes)?,
        SourceFormat::Parquet => read_parquet(&shared)?,
    };
    if format != SourceFormat::Csv {
        for row in &rows {
            for name in required {
                row.value(name)?;
            }
        }
    }
    Ok(rows)
}

fn strip_bom(bytes: &[u8]) -> &[u8] {
    bytes.strip_prefix("\u{feff}".as_bytes()).unwrap_or(bytes)
}

fn read_csv(path: &Arc<Path>, bytes: &[u8], columns: Columns<'_>, required: &[&str]) -> Result<Vec<Row>> {
    let mut reader = csv::ReaderBuilder::new().has_headers(false).flexible(true).from_reader(strip_bom(bytes));
    let mut records = reader.byte_records();
    let (names, first_data_line): (Vec<String>, u64) = match columns {
        Columns::Headerless(names) => (names.iter().map(|s| s.to_string()).collect(), 1),
        Columns::Header => {
            let header = match records.next() {
                Some(record) => record.map_err(|e| csv_error(path, 1, e))?,
                None => return Err(Error::input(Location::file(&**path), "the file is empty")),
            };
            let names = header
                .iter()
                .enumerate()
                .map(|(i, cell)| {
                    std::str::from_utf8(cell).map(str::to_string).map_err(|_| {
                        Error::input(
                            Location::file(&**path).line(1).field(format!("column {}", i + 1)),
                            "invalid UTF-8 in the header",
                        )
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            (names, 2)
        }
    };
    for name in required {
        if !names.iter().any(|n| n == name) {
            let mut location = Location::file(&**path).field(*name);
            if matches!(columns, Columns::Header) {
                location = location.line(1);
            }
            return Err(Error::input(location, format!("required column is missing (columns: {})", names.join(", "))));
        }
    }
    let mut rows = Vec::new();
    for (index, record) in records.enumerate() {
        let line = first_data_line + index as u64;
        let record = record.map_err(|e| csv_error(path, line, e))?;
        if record.len() != names.len() {
            return Err(Error::input(
                Location::file(&**path).line(line),
                format!("{} fields, expected {}", record.len(), names.len()),
            ));
        }
        let mut values = Map::new();
        for (name, cell) in names.iter().zip(record.iter()) {
            let text = std::str::from_utf8(cell)
                .map_err(|_| Error::input(Location::file(&**path).line(line).field(name), "invalid UTF-8"))?;
            values.insert(name.clone(), Value::String(text.to_string()));
        }
        rows.push(Row { path: path.clone(), index, line, values });
    }
    Ok(rows)
}

fn csv_error(path: &Path, line: u64, error: csv::Error) -> Error {
    Error::input(Location::file(path).line(line), format!("malformed CSV: {error}"))
}

fn read_jsonl(path: &Arc<Path>, bytes: &[u8]) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (i, raw) in strip_bom(bytes).split(|&b| b == b'\n').enumerate() {
        let line = i as u64 + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let text = std::str::from_utf8(raw).map_err(|_| invalid_utf8_in_json(path, line, raw))?;
        let value: Value = serde_json::from_str(text)
            .map_err(|e| Error::input(Location::file(&**path).line(line), format!("malformed JSON: {e}")))?;
        let values = object(path, line, value)?;
        rows.push(Row { path: path.clone(), index: rows.len(), line, values });
    }
    Ok(rows)
}

/// Names the field holding the bad bytes: the text is decoded lossily and the first field whose
/// value then carries a replacement character is the culprit.
fn invalid_utf8_in_json(path: &Path, line: u64, raw: &[u8]) -> Error {
    let mut location = Location::file(path).line(line);
    let lossy = String::from_utf8_lossy(raw);
    if let Ok(Value::Object(map)) = serde_json::from_str::<Value>(&lossy)
        && let Some((key, _)) = map.iter().find(|(_, v)| v.to_string().contains('\u{fffd}'))
    {
        location = location.field(key);
    }
    Error::input(location, "invalid UTF-8")
}

fn object(path: &Path, line: u64, value: Value) -> Result<Map<String, Value>> {
    match value {
        Value::Object(map) => Ok(map),
        other => Err(Error::input(
            Location::file(path).line(line),
            format!("expected a JSON object, found {}", kind(&other)),
        )),
    }
}

fn read_json_array(path: &Arc<Path>, bytes: &[u8]) -> Result<Vec<Row>> {
    let bytes = strip_bom(bytes);
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            let line = 1 + bytes[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count() as u64;
            return Err(Error::input(Location::file(&**path).line(line), "invalid UTF-8"));
        }
    };
    let value: Value = serde_json::from_str(text)
        .map_err(|e| Error::input(Location::file(&**path).line(e.line() as u64), format!("malformed JSON: {e}")))?;
    let Value::Array(elements) = value else {
        return Err(Error::input(
            Location::file(&**path),
            format!("expected a JSON array of objects, found {}", kind(&value)),
        ));
    };
    let lines = element_lines(text);
    elements
        .into_iter()
        .enumerate()
        .map(|(index, element)| {
            let line = lines.get(index).copied().unwrap_or(1);
            Ok(Row { path: path.clone(), index, line, values: object(path, line, element)? })
        })
        .collect()
}

/// The line on which each element of a top-level JSON array starts (serde_json's `Value`
/// forgets positions, and errors in an element should point at it).
fn element_lines(text: &str) -> Vec<u64> {
    let mut lines = Vec::new();
    let (mut line, mut depth) = (1u64, 0usize);
    let (mut in_string, mut escaped, mut expecting) = (false, false, false);
    for c in text.chars() {
        if c == '\n' {
            line += 1;
        }
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        if depth == 1 && expecting && !c.is_whitespace() && c != ']' {
            lines.push(line);
            expecting = false;
        }
        match c {
            '"' => in_string = true,
            '[' | '{' => {
                depth += 1;
                if depth == 1 {
                    expecting = true;
                }
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            ',' if depth == 1 => expecting = true,
            _ => {}
        }
    }
    lines
}

fn read_parquet(path: &Arc<Path>) -> Result<Vec<Row>> {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    let parquet_error = |e: parquet::errors::ParquetError| {
        Error::input(Location::file(&**path), format!("cannot read as Parquet: {e}"))
    };
    let file = fs::File::open(path).map_err(|e| Error::io(&**path, e))?;
    let reader =
        ParquetRecordBatchReaderBuilder::try_new(file).map_err(parquet_error)?.build().map_err(parquet_error)?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| Error::arrow(format!("reading {}", path.display()), e))?;
        // Going through arrow's JSON writer turns every column type (strings, numbers, lists,
        // structs) into the same values the JSON formats give.
        let mut json = Vec::new();
        let mut writer = arrow::json::WriterBuilder::new()
            .with_explicit_nulls(true)
            .build::<_, arrow::json::writer::JsonArray>(&mut json);
        writer
            .write(&batch)
            .and_then(|_| writer.finish())
            .map_err(|e| Error::arrow(format!("converting {}", path.display()), e))?;
        drop(writer);
        let objects: Vec<Map<String, Value>> = if json.is_empty() {
            Vec::new()
        } else {
            serde_json::from_slice(&json).map_err(|e| Error::Internal(format!("arrow wrote unreadable JSON: {e}")))?
        };
        for values in objects {
            let index = rows.len();
            rows.push(Row { path: path.clone(), index, line: index as u64 + 1, values });
        }
    }
    Ok(rows)
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl Row {
    /// Where `field` of this row is, for error messages.
    pub fn location(&self, field: &str) -> Location {
        Location::file(&*self.path).line(self.line).field(field)
    }

    pub fn error(&self, field: &str, message: impl Into<String>) -> Error {
        Error::input(self.location(field), message)
    }

    fn wrong_type(&self, field: &str, expected: &str, found: &Value) -> Error {
        self.error(field, format!("expected {expected}, found {}", kind(found)))
    }

    /// Whether the row has `field` with a non-null value.
    pub fn has(&self, field: &str) -> bool {
        self.values.get(field).is_some_and(|v| !v.is_null())
    }

    /// The raw value of a field that must be present.
    pub fn value(&self, field: &str) -> Result<&Value> {
        self.values.get(field).ok_or_else(|| self.error(field, "required field is missing"))
    }

    /// A required, non-empty string.
    pub fn text(&self, field: &str) -> Result<&str> {
        match self.value(field)? {
            Value::String(s) if s.trim().is_empty() => Err(self.error(field, "is empty")),
            Value::String(s) => Ok(s),
            other => Err(self.wrong_type(field, "a string", other)),
        }
    }

    /// An optional string: absent, null or empty is `None`; another type is an error.
    pub fn opt_text(&self, field: &str) -> Result<Option<&str>> {
        match self.values.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.wrong_type(field, "a string", other)),
        }
    }

    /// An identifier written either as a string or as an integer.
    pub fn key(&self, field: &str) -> Result<String> {
        match self.value(field)? {
            Value::Number(n) if n.is_u64() || n.is_i64() => Ok(n.to_string()),
            Value::String(s) if !s.trim().is_empty() => Ok(s.clone()),
            Value::String(_) => Err(self.error(field, "is empty")),
            other => Err(self.wrong_type(field, "a string or an integer", other)),
        }
    }

    /// A list of strings: a JSON array, or (in CSV) a cell holding a JSON array.
    pub fn strings(&self, field: &str) -> Result<Vec<String>> {
        let value = self.value(field)?;
        let parsed;
        let items = match value {
            Value::Array(items) => items,
            Value::String(s) => {
                parsed = serde_json::from_str::<Vec<Value>>(s)
                    .map_err(|_| self.error(field, "expected a list of strings (a JSON array in CSV cells)"))?;
                &parsed
            }
            other => return Err(self.wrong_type(field, "a list of strings", other)),
        };
        items
            .iter()
            .map(|item| match item {
                Value::String(s) => Ok(s.clone()),
                other => Err(self.wrong_type(field, "a list of strings", other)),
            })
            .collect()
    }

    /// An object of strings (e.g. MedQA's options by letter), sorted by key.
    pub fn string_map(&self, field: &str) -> Result<Vec<(String, String)>> {
        let parsed;
        let map = match self.value(field)? {
            Value::Object(map) => map,
            Value::String(s) => {
                parsed = serde_json::from_str::<Map<String, Value>>(s)
                    .map_err(|_| self.error(field, "expected an object of strings (JSON in CSV cells)"))?;
                &parsed
            }
            other => return Err(self.wrong_type(field, "an object of strings", other)),
        };
        let mut pairs = map
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                other => Err(self.wrong_type(field, "an object of strings", other)),
            })
            .collect::<Result<Vec<_>>>()?;
        pairs.sort();
        Ok(pairs)
    }
}

/// The line of each byte offset of a text, counted forward (offsets must not decrease): one
/// more than the `\n` before it, so LF and CRLF files number alike.
pub(crate) struct LineCounter<'a> {
    bytes: &'a [u8],
    at: usize,
    line: u64,
}

impl<'a> LineCounter<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        LineCounter { bytes, at: 0, line: 1 }
    }

    pub(crate) fn line_at(&mut self, byte: u64) -> u64 {
        let mut to = (byte as usize).min(self.bytes.len());
        // The csv crate may place a record after a CRLF at the LF: a record starts after its
        // line break, never on one.
        while to < self.bytes.len() && matches!(self.bytes[to], b'\r' | b'\n') {
            to += 1;
        }
        if to < self.at {
            // Offsets went back (an error's position): count from the start.
            self.at = 0;
            self.line = 1;
        }
        self.line += self.bytes[self.at..to].iter().filter(|b| **b == b'\n').count() as u64;
        self.at = to;
        self.line
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conditions::Dataset;
    use crate::datasets::{DatasetSource, data_dir, load};
    use std::path::PathBuf;

    fn load_file(dataset: Dataset, path: &Path) -> Error {
        let source = DatasetSource { path: Some(path.to_path_buf()), ..Default::default() };
        load(dataset, &source, &data_dir()).unwrap_err()
    }

    /// The location of an input error, as (file, line, field).
    fn place(error: Error) -> (PathBuf, Option<u64>, Option<String>) {
        match error {
            Error::Input { location, .. } => (location.file.unwrap(), location.line, location.field),
            other => panic!("expected an input error, got {other:?}"),
        }
    }

    const TQA_HEADER: &str = "Type,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source";

    #[test]
    fn a_missing_file_is_an_input_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nowhere.csv");
        let error = load_file(Dataset::TruthfulQa, &path);
        assert!(error.to_string().contains("file not found"), "{error}");
        assert_eq!(place(error), (path, None, None));
    }

    #[test]
    fn a_csv_without_a_required_column_names_the_header_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tqa.csv");
        std::fs::write(&path, "Type,Category,Question,Correct Answers,Incorrect Answers\nA,B,Q?,x,y\n").unwrap();
        let error = load_file(Dataset::TruthfulQa, &path);
        assert_eq!(place(error), (path, Some(1), Some("Best Answer".into())));
    }

    #[test]
    fn a_malformed_jsonl_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gsm.jsonl");
        std::fs::write(&path, "{\"question\": \"Q?\", \"answer\": \"#### 1\"}\n\n{\"question\": \"Q2?\", \"answer\n")
            .unwrap();
        let error = load_file(Dataset::Gsm8k, &path);
        assert!(error.to_string().contains("malformed JSON"), "{error}");
        assert_eq!(place(error), (path, Some(3), None));
    }

    #[test]
    fn invalid_utf8_names_the_row_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let csv_path = dir.path().join("tqa.csv");
        let mut bytes = format!("\u{feff}{TQA_HEADER}\nA,C,Q?,b,b,x,s\nA,C,").into_bytes();
        bytes.extend_from_slice(b"Bad \xff?,b,b,x,s\n");
        std::fs::write(&csv_path, bytes).unwrap();
        let error = load_file(Dataset::TruthfulQa, &csv_path);
        assert!(error.to_string().contains("invalid UTF-8"), "{error}");
        assert_eq!(place(error), (csv_path, Some(3), Some("Question".into())));

        let jsonl_path = dir.path().join("gsm.jsonl");
        let mut bytes = b"{\"question\": \"Q?\", \"answer\": \"#### 1\"}\n".to_vec();
        bytes.extend_from_slice(b"{\"question\": \"Q?\", \"answer\": \"#### \xc3\"}\n");
        std::fs::write(&jsonl_path, bytes).unwrap();
        let error = load_file(Dataset::Gsm8k, &jsonl_path);
        assert_eq!(place(error), (jsonl_path, Some(2), Some("answer".into())));
    }

    #[test]
    fn a_wrong_type_in_a_json_field_names_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gsm.jsonl");
        std::fs::write(
            &path,
            "{\"question\": \"Q?\", \"answer\": \"#### 1\"}\n{\"question\": 5, \"answer\": \"#### 2\"}\n",
        )
        .unwrap();
        let error = load_file(Dataset::Gsm8k, &path);
        assert!(error.to_string().contains("expected a string, found a number"), "{error}");
        assert_eq!(place(error), (path, Some(2), Some("question".into())));

        let array = dir.path().join("trivia.json");
        std::fs::write(
            &array,
            "[\n  {\"qid\": \"a\", \"question\": \"Q?\", \"gold_answer\": \"x\", \"aliases\": [\"x\"]},\n  {\"qid\": \"b\", \"question\": \"Q?\",\n   \"gold_answer\": \"y\", \"aliases\": \"y\"}\n]\n",
        )
        .unwrap();
        let error = load_file(Dataset::Trivia, &array);
        assert_eq!(place(error), (array, Some(3), Some("aliases".into())));
    }

    #[test]
    fn a_jsonl_row_missing_a_field_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("adv.jsonl");
        std::fs::write(&path, "{\"goal\": \"g\"}\n{\"target\": \"t\"}\n").unwrap();
        let error = load_file(Dataset::AdvBench, &path);
        assert_eq!(place(error), (path, Some(2), Some("goal".into())));
    }

    #[test]
    fn formats_come_from_the_extension_unless_given() {
        let path = Path::new("x/data.JSONL");
        assert_eq!(format_of(path, None).unwrap(), SourceFormat::Jsonl);
        assert_eq!(format_of(path, Some(SourceFormat::Csv)).unwrap(), SourceFormat::Csv);
        assert!(format_of(Path::new("data.txt"), None).is_err());
        assert_eq!(element_lines("[\n {\"a\": \"[,\"},\n\n {}\n]"), [2, 4]);
    }
}
