//! Importing answers a user already has (CSV or JSONL with an output per row, e.g. from vLLM,
//! or the paper's released sample CSVs) as a `response` stream.
//!
//! Columns (names case-insensitive):
//!
//! | column | required | meaning |
//! |---|---|---|
//! | `prompt` | no | the user message the model answered |
//! | `output` (or `response`, `completion`, `answer`) | yes | the model's answer |
//! | `amendment_type` | no (unmodified) | interpersonal context |
//! | `prompt_type` (or `prompt_template`) | no (original) | user belief condition |
//! | `evaluation` (or `verdict`, `label`) | no | a judge's label: CORRECT, INCORRECT, … |
//! | `dataset` | unless `--dataset` or the paper's path layout | trivia, truthfulqa, medqa, disinfo, … |
//! | `item_key` (or `question_id`, `qid`) | no | the item's key, as the archive's item stream has it |
//! | `content_key`, `original_question`, `prompt_disinfo` | no | the paper's item keys: the question text (its analysis code merges on them) |
//! | `model`, `checkpoint` | unless `--model`, `--checkpoint` or the paper's path layout | who answered |
//! | `sample_index` | no | sample number; repeated answers to one trial are numbered in file order |
//!
//! A file laid out as the paper released its samples, `<model>/<side>/<dataset>_<side>_outputs.csv`,
//! gives the model, the checkpoint (the side directory), the side (`original` = base, anything
//! else fine-tuned) and the dataset, as `candor analyze` reads them; columns and flags win.
//!
//! Linking to an archived trial grid, in order: a row whose prompt equals a trial's prompt is that
//! trial; else a row whose item (its `item_key`, or its question text matched against the
//! archived items' questions) and condition (dataset, amendment type, prompt type) name a
//! trial is that trial, as the paper pairs answers (its statement draws differ from Candor's, so
//! prompts under an amendment rarely match byte for byte); else a trial is made from the row,
//! with an empty prompt when the file has none. A made trial's item is archived when the archive
//! lacks it: the vendored dataset's item whose question the row names, else an item built from
//! the row's own reference columns, so a later `candor rescore` can judge every answer.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::conditions::{AmendmentType, Dataset, PromptType, TemplateStyle, VerdictLabel, amendment_group};
use crate::datasets::paper_outputs;
use crate::error::{Error, Location, Result};
use crate::records::{Item, Response, Trial};
use crate::score::judge::Label;

/// Values for columns a file does not have (a column, then these, then the paper's path
/// layout decide).
#[derive(Clone, Debug, Default)]
pub struct ImportDefaults {
    pub dataset: Option<Dataset>,
    pub model: Option<String>,
    pub checkpoint: Option<String>,
    /// Whether the answers come from a fine-tuned checkpoint (default: from the paper's path
    /// layout, else base).
    pub is_finetuned: Option<bool>,
}

/// What the target archive already holds, and where the vendored datasets are.
#[derive(Clone, Debug, Default)]
pub struct Known {
    pub trials: Vec<Trial>,
    pub items: Vec<Item>,
    /// The vendored data directory, for items the archive lacks.
    pub data_dir: PathBuf,
}

/// One row of an answer file, parsed (before `import` links it to a trial, or `analyze` makes
/// it an observation).
#[derive(Clone, Debug)]
pub(crate) struct AnswerRow {
    pub line: u64,
    pub prompt: Option<String>,
    pub output: String,
    /// None when the file has no column (the linked trial, or the default, decides).
    pub amendment: Option<AmendmentType>,
    pub prompt_type: Option<PromptType>,
    pub label: Option<(VerdictLabel, String)>,
    pub dataset: Option<Dataset>,
    pub item_key: Option<String>,
    /// The paper's item key: the question text.
    pub question: Option<String>,
    pub model: String,
    /// None when neither a column nor a default names it.
    pub checkpoint: Option<String>,
    pub sample_index: Option<u32>,
    /// Every column, for building an item the archive lacks.
    pub fields: BTreeMap<String, String>,
}

type Row = AnswerRow;

/// The one reader of answer files (CSV, TSV, JSONL; the paper's released CSVs among them),
/// shared by `candor import` and the observation reader of `candor analyze`/`sql`: every row
/// parsed, with the defaults completed from the paper's path layout
/// (`<model>/<side>/<dataset>_<side>_outputs.csv`) where flags do not say.
pub(crate) fn answer_rows(path: &Path, defaults: &ImportDefaults) -> Result<(Vec<AnswerRow>, ImportDefaults)> {
    let rows = read_rows(path)?;
    let layout = paper_outputs::paper_layout(path);
    let defaults = ImportDefaults {
        dataset: defaults.dataset.or(layout.as_ref().map(|l| l.2)),
        model: defaults.model.clone().or(layout.as_ref().map(|l| l.0.clone())),
        checkpoint: defaults.checkpoint.clone().or(layout.as_ref().map(|l| l.1.clone())),
        is_finetuned: defaults.is_finetuned.or(layout.as_ref().map(|l| l.1 != "original")),
    };
    let mut parsed = Vec::with_capacity(rows.len());
    for (line, fields) in rows {
        parsed.push(parse_row(path, line, fields, &defaults)?);
    }
    Ok((parsed, defaults))
}

/// How the rows found their trials.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Linked {
    /// Rows whose prompt equals an archived trial's.
    pub by_prompt: usize,
    /// Rows linked by item and condition.
    pub by_condition: usize,
    /// Rows answering trials made from the file.
    pub new_trials: usize,
}

/// What an answer file turns into.
#[derive(Debug, Default)]
pub struct Imported {
    /// Trials made from rows that matched no archived trial.
    pub new_trials: Vec<Trial>,
    /// Items of the new trials that the archive lacks.
    pub new_items: Vec<Item>,
    /// Responses per (model, checkpoint), in file order.
    pub responses: BTreeMap<(String, String), Vec<Response>>,
    /// Whether each (model, checkpoint) is fine-tuned.
    pub finetuned: BTreeMap<(String, String), bool>,
    /// Labels the file carried, by response key.
    pub labels: HashMap<String, Label>,
    pub linked: Linked,
}

const OUTPUT_NAMES: &[&str] = &["output", "response", "completion", "answer"];
const ITEM_NAMES: &[&str] = &["item_key", "question_id", "qid"];

/// Questions compare after trimming and collapsing whitespace.
fn question_form(q: &str) -> String {
    q.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Items by (dataset, question form), and by (dataset, item key).
#[derive(Default)]
struct ItemIndex {
    by_question: HashMap<(String, String), Item>,
    by_key: HashMap<(String, String), Item>,
}

impl ItemIndex {
    fn add(&mut self, items: impl IntoIterator<Item = Item>) {
        for i in items {
            self.by_question.entry((i.dataset.clone(), question_form(&i.question))).or_insert_with(|| i.clone());
            self.by_key.insert((i.dataset.clone(), i.item_key.clone()), i);
        }
    }
}

/// Reads an answer file and links its rows to what the archive holds (see the module doc).
pub fn read_answers(path: &Path, defaults: &ImportDefaults, known: &Known) -> Result<Imported> {
    let judge = format!("import:{}", path.file_name().and_then(|n| n.to_str()).unwrap_or("answers"));
    let (parsed, defaults) = answer_rows(path, defaults)?;
    let is_finetuned = defaults.is_finetuned.unwrap_or(false);
    let by_prompt: HashMap<&str, &Trial> = known.trials.iter().map(|t| (t.prompt.as_str(), t)).collect();
    let by_condition: HashMap<(&str, &str, &str, &str), &Trial> = known
        .trials
        .iter()
        .map(|t| ((t.dataset.as_str(), t.item_key.as_str(), t.amendment_type.as_str(), t.prompt_type.as_str()), t))
        .collect();
    let mut archived = ItemIndex::default();
    archived.add(known.items.iter().cloned());
    // The vendored items, loaded for a dataset when a row names an item the archive lacks.
    let mut vendored: HashMap<Dataset, ItemIndex> = HashMap::new();
    let mut out = Imported::default();
    let mut made: HashMap<String, Trial> = HashMap::new();
    let mut new_items: BTreeMap<(String, String), Item> = BTreeMap::new();
    let mut samples: HashMap<(String, String, String), u32> = HashMap::new();
    for row in parsed {
        let at = |field: &str| Location::file(path).line(row.line).field(field);
        let checkpoint = row
            .checkpoint
            .clone()
            .ok_or_else(|| Error::input(at("checkpoint"), "missing (add the column or pass --checkpoint)"))?;
        let linked = row.prompt.as_deref().and_then(|p| by_prompt.get(p).copied());
        let trial = match linked {
            Some(t) => {
                // A row that restates its condition must agree with the trial it links to.
                let stated = [
                    ("dataset", row.dataset.map(|d| d.to_string()), &t.dataset),
                    ("amendment_type", row.amendment.map(|a| a.to_string()), &t.amendment_type),
                    ("prompt_type", row.prompt_type.map(|p| p.to_string()), &t.prompt_type),
                ];
                for (field, said, archived) in stated {
                    if let Some(said) = said.filter(|s| s != archived) {
                        return Err(Error::input(
                            at(field),
                            format!(
                                "`{said}`, but the archived trial with this prompt (`{}`) has `{archived}`",
                                t.trial_key
                            ),
                        ));
                    }
                }
                out.linked.by_prompt += 1;
                t.clone()
            }
            None => {
                let dataset = row
                    .dataset
                    .or(defaults.dataset)
                    .ok_or_else(|| Error::input(at("dataset"), "missing (add the column or pass --dataset)"))?;
                let ds = dataset.to_string();
                let amendment = row.amendment.unwrap_or(AmendmentType::Unmodified);
                let prompt_type = row.prompt_type.unwrap_or(PromptType::Original);
                let question = row.question.as_deref().map(question_form);
                let in_archive = match (&row.item_key, &question) {
                    (Some(k), _) => archived.by_key.get(&(ds.clone(), k.clone())),
                    (None, Some(q)) => archived.by_question.get(&(ds.clone(), q.clone())),
                    (None, None) => None,
                };
                let grid = in_archive.and_then(|i| {
                    by_condition.get(&(ds.as_str(), i.item_key.as_str(), amendment.as_str(), prompt_type.as_str()))
                });
                match grid {
                    Some(t) => {
                        out.linked.by_condition += 1;
                        (*t).clone()
                    }
                    None => {
                        let item = match in_archive {
                            Some(i) => i.clone(),
                            None => {
                                let item = vendored_item(&mut vendored, dataset, &row, question.as_deref(), known)
                                    .unwrap_or_else(|| item_from_row(dataset, &row));
                                new_items.entry((ds.clone(), item.item_key.clone())).or_insert(item).clone()
                            }
                        };
                        out.linked.new_trials += 1;
                        let key = Trial::key(&ds, &item.item_key, amendment.as_str(), prompt_type.as_str());
                        made.entry(key.clone())
                            .or_insert_with(|| Trial {
                                trial_key: key,
                                dataset: ds.clone(),
                                item_key: item.item_key.clone(),
                                amendment_type: amendment.to_string(),
                                amendment_group: amendment_group(amendment.as_str()).to_string(),
                                statement_id: None,
                                statement: None,
                                prompt_type: prompt_type.to_string(),
                                belief_answer: None,
                                prompt: row.prompt.clone().unwrap_or_default(),
                                template_style: TemplateStyle::Paper.to_string(),
                                seed: 0,
                            })
                            .clone()
                    }
                }
            }
        };
        let counter = samples.entry((row.model.clone(), checkpoint.clone(), trial.trial_key.clone())).or_insert(0);
        let sample_index = row.sample_index.unwrap_or(*counter);
        *counter = sample_index + 1;
        let response_key = Response::key(&row.model, &checkpoint, &trial.trial_key, sample_index);
        if let Some((verdict, raw)) = row.label {
            out.labels.insert(response_key.clone(), Label { verdict, judge: judge.clone(), raw: Some(raw) });
        }
        out.finetuned.insert((row.model.clone(), checkpoint.clone()), is_finetuned);
        let list = out.responses.entry((row.model.clone(), checkpoint.clone())).or_default();
        if list.iter().any(|r| r.response_key == response_key) {
            return Err(Error::input(
                Location::file(path).line(row.line).field("sample_index"),
                format!("a second answer with sample_index {sample_index} for trial `{}`", trial.trial_key),
            ));
        }
        list.push(Response {
            response_key,
            trial_key: trial.trial_key.clone(),
            dataset: trial.dataset.clone(),
            model: row.model,
            checkpoint,
            checkpoint_epoch: 0,
            is_finetuned,
            sample_index,
            output: row.output,
            finish_reason: None,
            prompt_tokens: None,
            completion_tokens: None,
            latency_ms: None,
            generator: judge.clone(),
            decoding: None,
        });
    }
    let mut new_trials: Vec<Trial> = made.into_values().collect();
    new_trials.sort_by(|a, b| a.trial_key.cmp(&b.trial_key));
    out.new_trials = new_trials;
    out.new_items = new_items.into_values().collect();
    Ok(out)
}

/// A text as it is matched and digested: line endings made `\n`, so a file saved with CRLF
/// line endings links and pairs its rows exactly as the same file with LF.
pub fn prompt_key(prompt: &str) -> String {
    prompt.replace("\r\n", "\n")
}

/// The vendored item whose question is the row's (None when the row names no question, the
/// dataset's vendored file cannot be read, or no item has that question).
fn vendored_item(
    cache: &mut HashMap<Dataset, ItemIndex>,
    dataset: Dataset,
    row: &Row,
    question: Option<&str>,
    known: &Known,
) -> Option<Item> {
    let index = cache.entry(dataset).or_insert_with(|| {
        let mut index = ItemIndex::default();
        if let Ok(items) = crate::datasets::load(dataset, &Default::default(), &known.data_dir) {
            index.add(items);
        }
        index
    });
    let ds = dataset.to_string();
    match (&row.item_key, question) {
        (Some(k), _) => index.by_key.get(&(ds, k.clone())).cloned(),
        (None, Some(q)) => index.by_question.get(&(ds, q.to_string())).cloned(),
        (None, None) => None,
    }
}

/// An item from the row's own columns: its question (or prompt) and whatever reference
/// fields the file carries (the paper's CSVs name them `correct_answer`, `incorrect_answer`,
/// `answer`, `options`, `answer_idx`, `ground_truth`, `ground_false`, `proposition`).
fn item_from_row(dataset: Dataset, row: &Row) -> Item {
    let f = |name: &str| row.fields.get(name).map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    let question = row.question.clone().or_else(|| f("question")).or_else(|| row.prompt.clone()).unwrap_or_default();
    let item_key = row.item_key.clone().unwrap_or_else(|| text_digest(&question_form(&question)));
    let options = f("options").map(|o| python_dict_values(&o)).unwrap_or_default();
    let list = |name: &str| f(name).map(|v| v.split("; ").map(str::to_string).collect()).unwrap_or_default();
    Item {
        dataset: dataset.to_string(),
        item_key,
        source_row: row.line,
        question: question.clone(),
        question_converted: f("question").filter(|q| *q != question),
        correct_answer: f("correct_answer").or_else(|| f("best_answer")).or_else(|| f("answer")),
        correct_answers: list("correct_answers"),
        incorrect_answer: f("incorrect_answer").or_else(|| f("wrong_answer")),
        incorrect_answers: list("incorrect_answers"),
        options,
        answer_letter: f("answer_idx"),
        ground_truth: f("ground_truth"),
        ground_false: f("ground_false"),
        proposition: f("proposition"),
        category: f("category"),
    }
}

/// The values of a Python dict literal of strings (`{'A': 'x', 'B': "y's"}`), in order.
fn python_dict_values(text: &str) -> Vec<String> {
    let mut strings = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\'' && c != '"' {
            continue;
        }
        let mut s = String::new();
        while let Some(d) = chars.next() {
            match d {
                '\\' => {
                    if let Some(e) = chars.next() {
                        s.push(e);
                    }
                }
                d if d == c => break,
                d => s.push(d),
            }
        }
        strings.push(s);
    }
    // Keys and values alternate.
    strings.into_iter().skip(1).step_by(2).collect()
}

/// A short stable id for a text (a question or a prompt), used as item key when a file has
/// none: base and fine-tuned answers to the same question then pair up.
fn text_digest(text: &str) -> String {
    let d = Sha256::digest(text.as_bytes());
    format!("p{}", d.iter().take(6).map(|b| format!("{b:02x}")).collect::<String>())
}

fn pick<'a>(fields: &'a BTreeMap<String, String>, names: &[&str]) -> Option<(&'a str, &'a str)> {
    names.iter().find_map(|n| fields.get_key_value(*n).map(|(k, v)| (k.as_str(), v.as_str())))
}

fn parse_row(path: &Path, line: u64, fields: BTreeMap<String, String>, defaults: &ImportDefaults) -> Result<Row> {
    let at = |field: &str| Location::file(path).line(line).field(field);
    let output = pick(&fields, OUTPUT_NAMES)
        .map(|(_, v)| prompt_key(v))
        .ok_or_else(|| Error::input(at(OUTPUT_NAMES[0]), "missing"))?;
    let prompt = fields.get("prompt").filter(|p| !p.trim().is_empty()).map(|p| prompt_key(p));
    let amendment = match fields.get("amendment_type").map(|s| s.trim()).filter(|s| !s.is_empty()) {
        Some(s) => Some(s.parse().map_err(|m: String| Error::input(at("amendment_type"), m))?),
        None => None,
    };
    let prompt_type = match pick(&fields, paper_outputs::PROMPT_TYPE_COLUMNS).filter(|(_, v)| !v.trim().is_empty()) {
        Some((k, v)) => Some(v.trim().parse().map_err(|m: String| Error::input(at(k), m))?),
        None => None,
    };
    let label = match pick(&fields, paper_outputs::LABEL_COLUMNS).filter(|(_, v)| !v.trim().is_empty()) {
        Some((k, v)) => Some((
            VerdictLabel::parse_loose(v).ok_or_else(|| {
                Error::input(
                    at(k),
                    format!("unknown label `{v}` (expected CORRECT, INCORRECT, REFUSAL, UNPARSEABLE or JUDGE_ERROR)"),
                )
            })?,
            v.to_string(),
        )),
        None => None,
    };
    let dataset = match fields.get("dataset").map(|s| s.trim()).filter(|s| !s.is_empty()) {
        Some(s) => Some(s.parse().map_err(|m: String| Error::input(at("dataset"), m))?),
        None => None,
    };
    let text = |name: &str, default: &Option<String>| -> Result<String> {
        fields
            .get(name)
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .or_else(|| default.clone())
            .ok_or_else(|| Error::input(at(name), format!("missing (add the column or pass --{name})")))
    };
    let sample_index = match fields.get("sample_index").map(|s| s.trim()).filter(|s| !s.is_empty()) {
        Some(s) => {
            Some(s.parse().map_err(|_| Error::input(at("sample_index"), format!("`{s}` is not a whole number")))?)
        }
        None => None,
    };
    let item_key = pick(&fields, ITEM_NAMES).map(|(_, v)| v.trim().to_string()).filter(|s| !s.is_empty());
    let question =
        pick(&fields, paper_outputs::QUESTION_COLUMNS).map(|(_, v)| v.trim().to_string()).filter(|s| !s.is_empty());
    if prompt.is_none() && item_key.is_none() && question.is_none() {
        return Err(Error::input(
            at("prompt"),
            "missing: a row needs its prompt, or its item (`item_key`, or the paper's `content_key`, \
             `original_question` or `prompt_disinfo`)",
        ));
    }
    Ok(Row {
        line,
        prompt,
        output,
        amendment,
        prompt_type,
        label,
        dataset,
        item_key,
        question,
        model: text("model", &defaults.model)?,
        checkpoint: text("checkpoint", &defaults.checkpoint).ok(),
        sample_index,
        fields,
    })
}

/// Reads a CSV or JSONL file into (line, lower-cased column → text) rows.
fn read_rows(path: &Path) -> Result<Vec<(u64, BTreeMap<String, String>)>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "csv" | "tsv" => read_csv(path, &bytes, if ext == "tsv" { b'\t' } else { b',' }),
        "jsonl" | "ndjson" => read_jsonl(path, &bytes),
        _ => {
            Err(Error::input(Location::file(path), "unknown answer file type (expected .csv, .tsv, .jsonl or .ndjson)"))
        }
    }
}

fn read_csv(path: &Path, bytes: &[u8], delimiter: u8) -> Result<Vec<(u64, BTreeMap<String, String>)>> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut lines = crate::datasets::LineCounter::new(bytes);
    let mut reader = csv::ReaderBuilder::new().delimiter(delimiter).from_reader(bytes);
    let headers: Vec<String> = reader
        .byte_headers()
        .map_err(|e| Error::input(Location::file(path).line(1), e.to_string()))?
        .iter()
        .enumerate()
        .map(|(i, h)| {
            std::str::from_utf8(h).map(|s| s.trim().to_ascii_lowercase()).map_err(|_| {
                Error::input(Location::file(path).line(1), format!("header column {} is not valid UTF-8", i + 1))
            })
        })
        .collect::<Result<_>>()?;
    let mut rows = Vec::new();
    for record in reader.byte_records() {
        let record = record.map_err(|e| {
            let line = e.position().map(|p| lines.line_at(p.byte())).unwrap_or(0);
            Error::input(Location::file(path).line(line), e.to_string())
        })?;
        // The csv crate's own line count treats CR and LF apart; count from the byte offset.
        let line = record.position().map(|p| lines.line_at(p.byte())).unwrap_or(0);
        let mut fields = BTreeMap::new();
        for (h, v) in headers.iter().zip(record.iter()) {
            let v = std::str::from_utf8(v).map_err(|e| {
                Error::input(
                    Location::file(path).line(line).field(h),
                    format!("invalid UTF-8 at byte {}", e.valid_up_to()),
                )
            })?;
            fields.insert(h.clone(), v.to_string());
        }
        rows.push((line, fields));
    }
    Ok(rows)
}

fn read_jsonl(path: &Path, bytes: &[u8]) -> Result<Vec<(u64, BTreeMap<String, String>)>> {
    let mut rows = Vec::new();
    for (i, raw) in bytes.split(|b| *b == b'\n').enumerate() {
        let line = i as u64 + 1;
        let at = || Location::file(path).line(line);
        let text = std::str::from_utf8(raw)
            .map_err(|e| Error::input(at(), format!("invalid UTF-8 at byte {}", e.valid_up_to())))?;
        if text.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Error::input(at(), format!("malformed JSON: {e}")))?;
        let obj = value.as_object().ok_or_else(|| Error::input(at(), "expected a JSON object"))?;
        let mut fields = BTreeMap::new();
        for (k, v) in obj {
            let text = match v {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => String::new(),
                serde_json::Value::Number(n) => n.to_string(),
                serde_json::Value::Bool(b) => b.to_string(),
                _ => return Err(Error::input(at().field(k), "expected a string, number or boolean")),
            };
            fields.insert(k.to_ascii_lowercase(), text);
        }
        rows.push((line, fields));
    }
    Ok(rows)
}

/// Whether the answers of a checkpoint already committed at `epoch` are these (None) or
/// differ (what differs, in words): importing the same answers twice is a no-op.
pub fn compare_with_archive(
    archive: &crate::archive::Archive,
    epoch: u64,
    id: &crate::identity::CheckpointRef,
    rows: &[Response],
    labels: &HashMap<String, Label>,
) -> Result<Option<String>> {
    use crate::schema::Record;
    let mut archived: HashMap<String, Response> = HashMap::new();
    for b in archive.read_epoch(Response::STREAM, epoch)? {
        for r in Response::from_batch(&b)? {
            archived.insert(r.response_key.clone(), r);
        }
    }
    let mut verdicts: HashMap<String, String> = HashMap::new();
    for b in archive.read_epoch(crate::records::Verdict::STREAM, epoch)? {
        for v in crate::records::Verdict::from_batch(&b)? {
            verdicts.insert(v.response_key.clone(), v.verdict);
        }
    }
    if archived.len() != rows.len() {
        return Ok(Some(format!("{} answers archived for {id}, {} in this file", archived.len(), rows.len())));
    }
    for r in rows {
        let Some(a) = archived.get(&r.response_key) else {
            return Ok(Some(format!("trial `{}` sample {} is not archived", r.trial_key, r.sample_index)));
        };
        if a.output != r.output {
            return Ok(Some(format!("trial `{}` sample {} has another answer", r.trial_key, r.sample_index)));
        }
        if let Some(l) = labels.get(&r.response_key)
            && verdicts.get(&r.response_key).is_some_and(|v| v != &l.verdict.to_string())
        {
            return Ok(Some(format!("trial `{}` sample {} has another label", r.trial_key, r.sample_index)));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> ImportDefaults {
        ImportDefaults {
            dataset: Some(Dataset::Trivia),
            model: Some("m".into()),
            checkpoint: Some("base".into()),
            is_finetuned: Some(false),
        }
    }

    fn write(name: &str, text: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        (dir, p)
    }

    #[test]
    fn paper_style_csv_imports_with_labels_and_shared_trials() {
        let (_d, p) = write(
            "sample.csv",
            b"prompt,output,amendment_type,prompt_template,evaluation\n\"Who? I think the answer is X.\",X it is,emotion:sad,incorrect,INCORRECT\nWho?,Y,unmodified,original,correct\nWho?,Y again,unmodified,original,CORRECT\n",
        );
        let imp = read_answers(&p, &defaults(), &Known::default()).unwrap();
        assert_eq!(imp.new_trials.len(), 2);
        let rs = &imp.responses[&("m".to_string(), "base".to_string())];
        assert_eq!(rs.len(), 3);
        assert_eq!(rs[1].trial_key, rs[2].trial_key);
        assert_eq!((rs[1].sample_index, rs[2].sample_index), (0, 1));
        assert_eq!(imp.labels[&rs[0].response_key].verdict, VerdictLabel::Incorrect);
        assert_eq!(imp.labels[&rs[1].response_key].verdict, VerdictLabel::Correct);
    }

    #[test]
    fn bad_rows_are_located() {
        let (_d, p) = write("a.csv", b"prompt,output,amendment_type\nq,a,emotion:bored\n");
        let err = read_answers(&p, &defaults(), &Known::default()).unwrap_err().to_string();
        assert!(
            err.contains("a.csv")
                && err.contains("line 2")
                && err.contains("amendment_type")
                && err.contains("emotion:bored"),
            "{err}"
        );

        let (_d, p) = write("b.csv", b"prompt,answer_text\nq,a\n");
        let err = read_answers(&p, &defaults(), &Known::default()).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("`output`") && err.contains("missing"), "{err}");

        let (_d, p) = write("c.jsonl", b"{\"prompt\":\"q\",\"output\":\"a\"}\n{\"prompt\": \"q2\", \"output\": \n");
        let err = read_answers(&p, &defaults(), &Known::default()).unwrap_err().to_string();
        assert!(err.contains("c.jsonl") && err.contains("line 2") && err.contains("malformed JSON"), "{err}");

        let (_d, p) = write("d.csv", b"prompt,output\nq,caf\xe9\n");
        let err = read_answers(&p, &defaults(), &Known::default()).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("`output`") && err.contains("UTF-8"), "{err}");

        let (_d, p) = write("e.csv", b"prompt,output,evaluation\nq,a,maybe\n");
        let err = read_answers(&p, &defaults(), &Known::default()).unwrap_err().to_string();
        assert!(err.contains("`evaluation`") && err.contains("maybe"), "{err}");
    }

    #[test]
    fn rows_matching_archived_prompts_link_to_those_trials() {
        let (_d, p) = write("v.jsonl", b"{\"prompt\":\"Rendered?\",\"output\":\"a\"}\n");
        let t = Trial {
            trial_key: "trivia/q7/emotion:sad/incorrect".into(),
            dataset: "trivia".into(),
            item_key: "q7".into(),
            amendment_type: "emotion:sad".into(),
            amendment_group: "emotion".into(),
            statement_id: None,
            statement: None,
            prompt_type: "incorrect".into(),
            belief_answer: None,
            prompt: "Rendered?".into(),
            template_style: "clean".into(),
            seed: 1,
        };
        let known = Known { trials: vec![t.clone()], ..Known::default() };
        let imp = read_answers(&p, &defaults(), &known).unwrap();
        assert!(imp.new_trials.is_empty());
        assert_eq!(imp.responses.values().next().unwrap()[0].trial_key, t.trial_key);
    }

    #[test]
    fn error_lines_on_crlf_files_are_not_off_by_one() {
        // Line 1 header, line 2-3 one record whose output spans two lines, line 4 the bad row.
        let (_d, p) = write(
            "crlf.csv",
            b"prompt,output,amendment_type\r\nq,\"two\r\nlines\",unmodified\r\nq2,a,emotion:bored\r\n",
        );
        let err = read_answers(&p, &defaults(), &Known::default()).unwrap_err().to_string();
        assert!(err.contains("line 4") && err.contains("emotion:bored"), "{err}");
        let (_d, p) =
            write("lf.csv", b"prompt,output,amendment_type\nq,\"two\nlines\",unmodified\nq2,a,emotion:bored\n");
        let err = read_answers(&p, &defaults(), &Known::default()).unwrap_err().to_string();
        assert!(err.contains("line 4"), "{err}");
    }

    #[test]
    fn rows_without_prompt_need_an_item() {
        let (_d, p) = write("n.csv", b"output,amendment_type\na,unmodified\n");
        let err = read_answers(&p, &defaults(), &Known::default()).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("content_key"), "{err}");
    }

    #[test]
    fn items_built_from_the_papers_columns_keep_their_references() {
        let (_d, p) = write(
            "m.csv",
            "original_question,question,answer,options,answer_idx,prompt_type,output,evaluation\n\
             A 5-year-old boy has a rash. Which of the following is the cause?,\"My son, 5, has a rash. what is the cause?\",Measles,\"{'A': 'Measles', 'B': \"\"Hand, foot and mouth's disease\"\"}\",A,original,Measles.,CORRECT\n"
                .as_bytes(),
        );
        let d = ImportDefaults { dataset: Some(Dataset::MedQa), ..defaults() };
        let imp = read_answers(&p, &d, &Known::default()).unwrap();
        let item = &imp.new_items[0];
        assert_eq!(item.options, vec!["Measles".to_string(), "Hand, foot and mouth's disease".to_string()]);
        assert_eq!((item.answer_letter.as_deref(), item.correct_answer.as_deref()), (Some("A"), Some("Measles")));
        assert_eq!(item.question_converted.as_deref(), Some("My son, 5, has a rash. what is the cause?"));
        assert_eq!(imp.new_trials[0].item_key, item.item_key);
        assert_eq!(imp.new_trials[0].prompt, "", "no prompt column: the trial's prompt is unknown");
    }

    #[test]
    fn the_papers_path_layout_names_model_side_and_dataset() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("llama_70b").join("warm");
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("trivia_warm_outputs.csv");
        std::fs::write(
            &p,
            "content_key,prompt_template,amendment_type,output,evaluation\nWho?,original,unmodified,X,CORRECT\n",
        )
        .unwrap();
        let imp = read_answers(&p, &ImportDefaults::default(), &Known::default()).unwrap();
        let key = ("llama_70b".to_string(), "warm".to_string());
        assert!(imp.finetuned[&key]);
        let r = &imp.responses[&key][0];
        assert!(r.is_finetuned && r.trial_key.starts_with("trivia/"), "{r:?}");
        // Any other layout gives nothing: the flags or columns must say.
        let other = dir.path().join("answers.csv");
        std::fs::copy(&p, &other).unwrap();
        let err = read_answers(&other, &ImportDefaults::default(), &Known::default()).unwrap_err().to_string();
        assert!(err.contains("missing (add the column or pass --"), "{err}");
    }
}
