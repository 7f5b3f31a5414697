//! Importing answers a user already has (CSV or JSONL with a prompt and an output per row,
//! e.g. from vLLM, or the paper's released sample CSVs) as a `response` stream.
//!
//! Columns (names case-insensitive):
//!
//! | column | required | meaning |
//! |---|---|---|
//! | `prompt` | yes | the user message the model answered |
//! | `output` (or `response`, `completion`, `answer`) | yes | the model's answer |
//! | `amendment_type` | no (unmodified) | interpersonal context |
//! | `prompt_type` (or `prompt_template`) | no (original) | user belief condition |
//! | `evaluation` (or `verdict`, `label`) | no | a judge's label: CORRECT, INCORRECT, … |
//! | `dataset` | unless `--dataset` | trivia, truthfulqa, medqa, disinfo, … |
//! | `item_key` (or `question_id`, `qid`) | no | the item; else a digest of the prompt |
//! | `model`, `checkpoint` | unless `--model`, `--checkpoint` | who answered |
//! | `sample_index` | no | sample number; repeated answers to one trial are numbered in file order |
//!
//! When the target archive already holds a trial grid, a row whose prompt equals a trial's
//! prompt is linked to that trial, so answers produced elsewhere for Candor's own trials pair
//! up with everything else. Otherwise a trial is made from the row.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::conditions::{AmendmentType, Dataset, PromptType, TemplateStyle, VerdictLabel};
use crate::dataflow::pipelines::Label;
use crate::error::{Error, Location, Result};
use crate::records::{Response, Trial};

/// Values for columns a file does not have.
#[derive(Clone, Debug, Default)]
pub struct ImportDefaults {
    pub dataset: Option<Dataset>,
    pub model: Option<String>,
    pub checkpoint: Option<String>,
    pub is_finetuned: bool,
}

/// One parsed row, before trial linking.
#[derive(Clone, Debug)]
struct Row {
    line: u64,
    prompt: String,
    output: String,
    /// None when the file has no column (the linked trial, or the default, decides).
    amendment: Option<AmendmentType>,
    prompt_type: Option<PromptType>,
    label: Option<(VerdictLabel, String)>,
    dataset: Option<Dataset>,
    item_key: Option<String>,
    model: String,
    checkpoint: String,
    sample_index: Option<u32>,
}

/// What an answer file turns into.
#[derive(Debug, Default)]
pub struct Imported {
    /// Trials made from rows that matched no archived trial.
    pub new_trials: Vec<Trial>,
    /// Responses per (model, checkpoint), in file order.
    pub responses: BTreeMap<(String, String), Vec<Response>>,
    /// Labels the file carried, by response key.
    pub labels: HashMap<String, Label>,
}

const OUTPUT_NAMES: &[&str] = &["output", "response", "completion", "answer"];
const PROMPT_TYPE_NAMES: &[&str] = &["prompt_type", "prompt_template"];
const LABEL_NAMES: &[&str] = &["evaluation", "verdict", "label"];
const ITEM_NAMES: &[&str] = &["item_key", "question_id", "qid"];

/// Reads an answer file. `known` maps prompt text to the archived trial it renders.
pub fn read_answers(path: &Path, defaults: &ImportDefaults, known: &HashMap<String, Trial>) -> Result<Imported> {
    let rows = read_rows(path)?;
    let judge = format!("import:{}", path.file_name().and_then(|n| n.to_str()).unwrap_or("answers"));
    let mut parsed = Vec::with_capacity(rows.len());
    for (line, fields) in rows {
        parsed.push(parse_row(path, line, &fields, defaults)?);
    }
    let mut out = Imported::default();
    let mut made: HashMap<String, Trial> = HashMap::new();
    let mut samples: HashMap<(String, String, String), u32> = HashMap::new();
    for row in parsed {
        let at = |field: &str| Location::file(path).line(row.line).field(field);
        let trial = match known.get(&prompt_key(&row.prompt)) {
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
                t.clone()
            }
            None => {
                let dataset = row
                    .dataset
                    .or(defaults.dataset)
                    .ok_or_else(|| Error::input(at("dataset"), "missing (add the column or pass --dataset)"))?;
                let amendment = row.amendment.unwrap_or(AmendmentType::Unmodified);
                let prompt_type = row.prompt_type.unwrap_or(PromptType::Original);
                let item_key = row.item_key.clone().unwrap_or_else(|| prompt_digest(&row.prompt));
                let key = Trial::key(dataset.as_str(), &item_key, amendment.as_str(), prompt_type.as_str());
                made.entry(key.clone())
                    .or_insert_with(|| Trial {
                        trial_key: key,
                        dataset: dataset.to_string(),
                        item_key,
                        amendment_type: amendment.to_string(),
                        amendment_group: amendment.group().to_string(),
                        statement_id: None,
                        statement: None,
                        prompt_type: prompt_type.to_string(),
                        belief_answer: None,
                        prompt: row.prompt.clone(),
                        template_style: TemplateStyle::Paper.to_string(),
                        seed: 0,
                    })
                    .clone()
            }
        };
        let counter = samples.entry((row.model.clone(), row.checkpoint.clone(), trial.trial_key.clone())).or_insert(0);
        let sample_index = row.sample_index.unwrap_or(*counter);
        *counter = sample_index + 1;
        let response_key = Response::key(&row.model, &row.checkpoint, &trial.trial_key, sample_index);
        if let Some((verdict, raw)) = row.label {
            out.labels.insert(response_key.clone(), Label { verdict, judge: judge.clone(), raw: Some(raw) });
        }
        let list = out.responses.entry((row.model.clone(), row.checkpoint.clone())).or_default();
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
            checkpoint: row.checkpoint,
            checkpoint_epoch: 0,
            is_finetuned: defaults.is_finetuned,
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
    Ok(out)
}

/// A prompt as it is matched and digested: line endings made `\n`, so a file saved with CRLF
/// line endings links and pairs its rows exactly as the same file with LF.
pub fn prompt_key(prompt: &str) -> String {
    prompt.replace("\r\n", "\n")
}

/// A short stable id for a prompt, used as item key when a file has none: base and
/// fine-tuned answers to the same prompt then pair up.
fn prompt_digest(prompt: &str) -> String {
    let d = Sha256::digest(prompt_key(prompt).as_bytes());
    format!("p{}", d.iter().take(6).map(|b| format!("{b:02x}")).collect::<String>())
}

fn pick<'a>(fields: &'a BTreeMap<String, String>, names: &[&str]) -> Option<(&'a str, &'a str)> {
    names.iter().find_map(|n| fields.get_key_value(*n).map(|(k, v)| (k.as_str(), v.as_str())))
}

fn parse_row(path: &Path, line: u64, fields: &BTreeMap<String, String>, defaults: &ImportDefaults) -> Result<Row> {
    let at = |field: &str| Location::file(path).line(line).field(field);
    let required = |names: &[&str]| -> Result<String> {
        pick(fields, names).map(|(_, v)| v.to_string()).ok_or_else(|| Error::input(at(names[0]), "missing"))
    };
    let prompt = prompt_key(&required(&["prompt"])?);
    let output = prompt_key(&required(OUTPUT_NAMES)?);
    let amendment = match fields.get("amendment_type").map(|s| s.trim()).filter(|s| !s.is_empty()) {
        Some(s) => Some(s.parse().map_err(|m: String| Error::input(at("amendment_type"), m))?),
        None => None,
    };
    let prompt_type = match pick(fields, PROMPT_TYPE_NAMES).filter(|(_, v)| !v.trim().is_empty()) {
        Some((k, v)) => Some(v.trim().parse().map_err(|m: String| Error::input(at(k), m))?),
        None => None,
    };
    let label = match pick(fields, LABEL_NAMES).filter(|(_, v)| !v.trim().is_empty()) {
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
    Ok(Row {
        line,
        prompt,
        output,
        amendment,
        prompt_type,
        label,
        dataset,
        item_key: pick(fields, ITEM_NAMES).map(|(_, v)| v.trim().to_string()).filter(|s| !s.is_empty()),
        model: text("model", &defaults.model)?,
        checkpoint: text("checkpoint", &defaults.checkpoint)?,
        sample_index,
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
            let line = e.position().map(|p| p.line()).unwrap_or(0);
            Error::input(Location::file(path).line(line), e.to_string())
        })?;
        let line = record.position().map(|p| p.line()).unwrap_or(0);
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
            is_finetuned: false,
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
        let imp = read_answers(&p, &defaults(), &HashMap::new()).unwrap();
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
        let err = read_answers(&p, &defaults(), &HashMap::new()).unwrap_err().to_string();
        assert!(
            err.contains("a.csv")
                && err.contains("line 2")
                && err.contains("amendment_type")
                && err.contains("emotion:bored"),
            "{err}"
        );

        let (_d, p) = write("b.csv", b"prompt,answer_text\nq,a\n");
        let err = read_answers(&p, &defaults(), &HashMap::new()).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("`output`") && err.contains("missing"), "{err}");

        let (_d, p) = write("c.jsonl", b"{\"prompt\":\"q\",\"output\":\"a\"}\n{\"prompt\": \"q2\", \"output\": \n");
        let err = read_answers(&p, &defaults(), &HashMap::new()).unwrap_err().to_string();
        assert!(err.contains("c.jsonl") && err.contains("line 2") && err.contains("malformed JSON"), "{err}");

        let (_d, p) = write("d.csv", b"prompt,output\nq,caf\xe9\n");
        let err = read_answers(&p, &defaults(), &HashMap::new()).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("`output`") && err.contains("UTF-8"), "{err}");

        let (_d, p) = write("e.csv", b"prompt,output,evaluation\nq,a,maybe\n");
        let err = read_answers(&p, &defaults(), &HashMap::new()).unwrap_err().to_string();
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
        let known = HashMap::from([(t.prompt.clone(), t.clone())]);
        let imp = read_answers(&p, &defaults(), &known).unwrap();
        assert!(imp.new_trials.is_empty());
        assert_eq!(imp.responses.values().next().unwrap()[0].trial_key, t.trial_key);
    }
}
