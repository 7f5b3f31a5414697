//! The judge validation set (`data/judge/validation/`): answers to the vendored items, each
//! labelled CORRECT or INCORRECT by careful reading against METHOD.md §3, with a rationale and
//! its provenance. `candor judge validate` runs a judge over it and reports agreement and
//! Cohen's kappa with a 95% interval per dataset ([`validate`]); the figures Candor's own judges
//! reached are recorded in `agreement.json` beside the set ([`recorded`]), so `candor report`
//! and `candor analyze` can print a judge's validated kappa beside its tables, or warn that it
//! has none.
//!
//! ```
//! let set = candor::score::validation::bundled().unwrap();
//! assert!(set.len() >= 400);
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::agreement::{Agreement, by_dataset};
use super::judge::{Case, Judge};
use crate::conditions::{Dataset, VerdictLabel};
use crate::error::{Error, Location, Result};
use crate::records::Item;

/// The validation set shipped with Candor.
pub const BUNDLED: &str = include_str!("../../data/judge/validation/answers.jsonl");
/// The figures Candor's judges reached on it.
pub const RECORDED: &str = include_str!("../../data/judge/validation/agreement.json");

/// One labelled answer.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Row {
    pub id: String,
    pub dataset: Dataset,
    pub item_key: String,
    /// The condition the answer was given under (for hand-written answers: the one it imitates).
    pub prompt_type: String,
    pub amendment_type: String,
    /// Who wrote the answer: a local model and the experiment that generated it, or `hand`.
    pub source: String,
    /// For hand-written answers, the failure class they exercise.
    #[serde(default)]
    pub class: Option<String>,
    pub answer: String,
    /// CORRECT or INCORRECT, by METHOD.md §3.
    pub label: VerdictLabel,
    /// Why, in one line.
    pub rationale: String,
    /// `dev` (read while building the judges) or `test` (only ever measured).
    pub split: String,
}

/// Reads a validation set (JSON lines), checking every row.
pub fn parse(text: &str, origin: &str) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let mut ids = std::collections::HashSet::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || Location::file(origin).line(i as u64 + 1);
        let row: Row = serde_json::from_str(line).map_err(|e| Error::input(at(), e.to_string()))?;
        if !matches!(row.label, VerdictLabel::Correct | VerdictLabel::Incorrect) {
            return Err(Error::input(at().field("label"), format!("`{}` is not CORRECT or INCORRECT", row.label)));
        }
        if !matches!(row.split.as_str(), "dev" | "test") {
            return Err(Error::input(at().field("split"), format!("`{}` is not dev or test", row.split)));
        }
        if !ids.insert(row.id.clone()) {
            return Err(Error::input(at().field("id"), format!("`{}` appears twice", row.id)));
        }
        rows.push(row);
    }
    Ok(rows)
}

/// The bundled validation set.
pub fn bundled() -> Result<Vec<Row>> {
    parse(BUNDLED, "data/judge/validation/answers.jsonl")
}

/// Reads a validation set from a file.
pub fn read(path: &Path) -> Result<Vec<Row>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse(&text, &path.display().to_string())
}

/// First 12 hex digits of the sha256 of a set's text: which set a figure was measured on.
pub fn digest(text: &str) -> String {
    Sha256::digest(text.as_bytes()).iter().take(6).map(|b| format!("{b:02x}")).collect()
}

/// The items the rows answer, from the vendored datasets under `data_dir`.
pub fn items_for(rows: &[Row], data_dir: &Path) -> Result<HashMap<(Dataset, String), Item>> {
    let mut wanted: BTreeMap<Dataset, Vec<&str>> = BTreeMap::new();
    for r in rows {
        wanted.entry(r.dataset).or_default().push(&r.item_key);
    }
    let mut out = HashMap::new();
    for (dataset, keys) in wanted {
        let items = crate::datasets::load(dataset, &Default::default(), data_dir)?;
        let by_key: HashMap<&str, &Item> = items.iter().map(|i| (i.item_key.as_str(), i)).collect();
        for k in keys {
            let item = by_key.get(k).ok_or_else(|| {
                Error::input(
                    Location::default().field("item_key"),
                    format!("validation row names {dataset} item `{k}`, which the vendored data lacks"),
                )
            })?;
            out.insert((dataset, k.to_string()), (*item).clone());
        }
    }
    Ok(out)
}

/// What a judge did on a validation set.
#[derive(Clone, Debug, Serialize)]
pub struct Validation {
    /// The judge ids seen, per dataset (a judge id names the rule or model and prompt version).
    pub judges: BTreeMap<String, Vec<String>>,
    /// Agreement with the human labels per dataset and `all` (human label first).
    pub by_dataset: BTreeMap<String, Agreement>,
    /// Agreement per dataset and split (`<dataset>/<split>`).
    pub by_split: BTreeMap<String, Agreement>,
    /// Agreement per deciding part (the judge id up to its rule or model), when a judge has
    /// several (the ensemble).
    pub by_part: BTreeMap<String, Agreement>,
    pub answers: usize,
    pub seconds: f64,
    pub verdicts_per_second: f64,
    /// The set's digest.
    pub set: String,
    /// Every row the judge did not label as the humans did: (id, human label, verdict, what
    /// the judge said).
    pub disagreements: Vec<(String, VerdictLabel, VerdictLabel, Option<String>)>,
}

/// The part of an ensemble verdict's judge id that names who decided (`ensemble:…:rule`,
/// `ensemble:…:rule-weak` or `ensemble:…:model`), else the judge id's first two fields.
fn part_of(judge: &str) -> String {
    let fields: Vec<&str> = judge.split(':').collect();
    if let Some(i) = fields.iter().position(|f| *f == "rule" || *f == "rule-weak" || *f == "model") {
        return fields[..=i].join(":");
    }
    fields.iter().take(2).copied().collect::<Vec<_>>().join(":")
}

/// Runs `judge` over `rows` (in batches per dataset) and measures its agreement with the labels.
pub fn validate(
    judge: &mut dyn Judge,
    rows: &[Row],
    items: &HashMap<(Dataset, String), Item>,
    set: &str,
) -> Result<Validation> {
    let start = Instant::now();
    let mut judged = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(32) {
        let cases: Vec<Case> = chunk
            .iter()
            .map(|r| Case { dataset: r.dataset, item: &items[&(r.dataset, r.item_key.clone())], output: &r.answer })
            .collect();
        judged.extend(judge.judge(&cases)?);
    }
    let seconds = start.elapsed().as_secs_f64();
    let mut judges: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let (mut pairs, mut split_pairs, mut part_pairs) = (Vec::new(), Vec::new(), Vec::new());
    for (r, j) in rows.iter().zip(&judged) {
        let ds = r.dataset.to_string();
        let ids = judges.entry(ds.clone()).or_default();
        if !ids.contains(&j.judge) {
            ids.push(j.judge.clone());
        }
        pairs.push((ds.clone(), r.label, j.verdict));
        split_pairs.push((format!("{ds}/{}", r.split), r.label, j.verdict));
        part_pairs.push((part_of(&j.judge), r.label, j.verdict));
    }
    for ids in judges.values_mut() {
        ids.sort();
    }
    let mut by_split = by_dataset(&split_pairs);
    by_split.remove("all");
    let splits: Vec<(String, VerdictLabel, VerdictLabel)> =
        rows.iter().zip(&judged).map(|(r, j)| (format!("all/{}", r.split), r.label, j.verdict)).collect();
    by_split.extend(by_dataset(&splits).into_iter().filter(|(k, _)| k != "all"));
    let mut by_part = by_dataset(&part_pairs);
    by_part.remove("all");
    let disagreements = rows
        .iter()
        .zip(&judged)
        .filter(|(r, j)| r.label != j.verdict)
        .map(|(r, j)| (r.id.clone(), r.label, j.verdict, j.raw.clone()))
        .collect();
    Ok(Validation {
        disagreements,
        judges,
        by_dataset: by_dataset(&pairs),
        by_split,
        by_part,
        answers: rows.len(),
        seconds,
        verdicts_per_second: if seconds > 0.0 { rows.len() as f64 / seconds } else { f64::INFINITY },
        set: set.to_string(),
    })
}

fn kappa_text(a: &Agreement) -> String {
    match (a.kappa, a.kappa_ci) {
        (Some(k), Some((lo, hi))) => format!("kappa {k:.2} [{lo:.2}, {hi:.2}]"),
        _ => "kappa undefined".into(),
    }
}

/// Prints a validation as text or JSON, with the rows the judge got wrong when `rows`.
pub fn print(v: &Validation, json: bool, rows: bool) {
    if json && !rows {
        let mut v = v.clone();
        v.disagreements.clear();
        println!("{}", serde_json::json!({"command": "judge validate", "validation": v}));
        return;
    }
    if json {
        println!("{}", serde_json::json!({"command": "judge validate", "validation": v}));
        return;
    }
    println!(
        "{} answers of validation set {} in {:.2} s ({:.1} verdicts/s)",
        v.answers, v.set, v.seconds, v.verdicts_per_second
    );
    for (ds, ids) in &v.judges {
        println!("  {ds:>10} judged by {}", ids.join(", "));
    }
    let line = |name: &str, a: &Agreement| {
        println!(
            "{name:>14}: {:5.1}% agreement over {:>3}, {}; {} unreadable",
            a.percent,
            a.compared,
            kappa_text(a),
            a.unreadable
        );
    };
    println!("agreement with the human labels:");
    for (ds, a) in &v.by_dataset {
        line(ds, a);
    }
    println!("by split (dev: read while building the judges; test: only measured):");
    for (k, a) in &v.by_split {
        line(k, a);
    }
    if v.by_part.len() > 1 {
        println!("by deciding part:");
        for (k, a) in &v.by_part {
            line(k, a);
        }
    }
    if rows {
        println!("rows judged otherwise than the human label:");
        for (id, human, verdict, raw) in &v.disagreements {
            println!("  {id}: human {human}, judge {verdict}: {}", raw.as_deref().unwrap_or(""));
        }
    }
}

/// One recorded validation: a judge (its id prefix per dataset) and its figures.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Recorded {
    /// A name for people (`reference`, `candle (Qwen2.5-Coder-0.5B)`, `ensemble`).
    pub name: String,
    /// Judge id prefixes this record covers: a verdict whose judge id starts with one of them
    /// was given by this judge.
    pub prefixes: Vec<String>,
    /// The set's digest the figures were measured on.
    pub set: String,
    /// Per dataset: percent agreement, kappa and its 95% interval, answers compared, unreadable.
    pub datasets: BTreeMap<String, RecordedFigures>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct RecordedFigures {
    pub percent: f64,
    pub kappa: Option<f64>,
    pub kappa_ci: Option<(f64, f64)>,
    pub compared: usize,
    pub unreadable: usize,
}

impl From<&Agreement> for RecordedFigures {
    fn from(a: &Agreement) -> Self {
        RecordedFigures {
            percent: a.percent,
            kappa: a.kappa,
            kappa_ci: a.kappa_ci,
            compared: a.compared,
            unreadable: a.unreadable,
        }
    }
}

/// A validation as a record for `agreement.json`: its judge ids up to the deciding part as
/// prefixes, and the per-dataset figures.
pub fn record(name: &str, v: &Validation) -> Recorded {
    let mut prefixes: Vec<String> = v
        .judges
        .values()
        .flatten()
        .map(|id| {
            let fields: Vec<&str> = id.split(':').collect();
            match fields.iter().position(|f| *f == "rule" || *f == "rule-weak" || *f == "model") {
                Some(i) => format!("{}:", fields[..i].join(":")),
                None => id.clone(),
            }
        })
        .collect();
    prefixes.sort();
    prefixes.dedup();
    Recorded {
        name: name.to_string(),
        prefixes,
        set: v.set.clone(),
        datasets: v.by_dataset.iter().map(|(k, a)| (k.clone(), a.into())).collect(),
    }
}

/// The recorded validations of Candor's judges.
pub fn recorded() -> Result<Vec<Recorded>> {
    serde_json::from_str(RECORDED)
        .map_err(|e| Error::input(Location::file("data/judge/validation/agreement.json"), e.to_string()))
}

/// The recorded figures of the judge that gave `judge_id` on `dataset`, if it was validated.
pub fn validated<'a>(
    records: &'a [Recorded],
    judge_id: &str,
    dataset: &str,
) -> Option<(&'a Recorded, &'a RecordedFigures)> {
    records
        .iter()
        .filter(|r| r.prefixes.iter().any(|p| judge_id.starts_with(p.as_str())))
        .find_map(|r| r.datasets.get(dataset).map(|f| (r, f)))
}

/// Lines saying how far each dataset's verdicts in an archive can be trusted: per judge, its
/// validated agreement and kappa, or a warning that it has none. `judged` maps dataset → the
/// judge ids of its verdicts.
pub fn trust_lines(judged: &BTreeMap<String, Vec<String>>) -> Vec<String> {
    let records = recorded().unwrap_or_default();
    let mut out = Vec::new();
    for (ds, ids) in judged {
        let mut seen = Vec::new();
        for id in ids {
            let line = match validated(&records, id, ds) {
                Some((r, f)) => format!(
                    "{ds}: judge {} agreed with careful human labels on {:.0}% of {} validation answers, {} ({} unreadable)",
                    r.name,
                    f.percent,
                    f.compared,
                    match (f.kappa, f.kappa_ci) {
                        (Some(k), Some((lo, hi))) => format!("Cohen's kappa {k:.2} [95% CI {lo:.2}, {hi:.2}]"),
                        _ => "kappa undefined".into(),
                    },
                    f.unreadable
                ),
                None => format!(
                    "warning: {ds}: judge `{id}` has no validated agreement on Candor's validation set \
                     (`candor judge validate --judge …` measures one)"
                ),
            };
            if !seen.contains(&line) {
                seen.push(line);
            }
        }
        out.extend(seen);
    }
    out
}

/// Which judge ids gave an archive's verdicts, per dataset (MMLU, GSM8K and AdvBench included).
pub fn judges_of(verdicts: &[crate::records::Verdict]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for v in verdicts {
        let ds = v.trial_key.split('/').next().unwrap_or("").to_string();
        let ids = out.entry(ds).or_default();
        if !ids.contains(&v.judge) {
            ids.push(v.judge.clone());
        }
    }
    for ids in out.values_mut() {
        ids.sort();
    }
    out
}
