//! Agreement between two judges on the same responses: percent agreement, Cohen's kappa with a
//! 95% confidence interval, and the confusion table, per dataset.
//!
//! Agreement and kappa are computed over the responses both judges could read (CORRECT,
//! INCORRECT or REFUSAL on both sides); the rest are counted in the confusion table and as
//! `unreadable`, never silently dropped.
//!
//! ```
//! use candor::conditions::VerdictLabel::*;
//! use candor::score::agreement::Agreement;
//! let a = Agreement::of(&[(Correct, Correct), (Incorrect, Incorrect), (Correct, Incorrect), (Correct, Unparseable)]);
//! assert_eq!(a.compared, 3);
//! assert_eq!(a.unreadable, 1);
//! assert!((a.percent - 200.0 / 3.0).abs() < 1e-9);
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::conditions::VerdictLabel;
use crate::error::{Error, Location, Result};
use crate::records::Verdict;

/// Agreement of two judges over a set of responses.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Agreement {
    /// Responses both judges labelled readably.
    pub compared: usize,
    /// Responses where either judge gave UNPARSEABLE or JUDGE_ERROR.
    pub unreadable: usize,
    /// Percent of compared responses with the same label.
    pub percent: f64,
    /// Cohen's kappa over the compared responses (None when undefined: chance agreement 1).
    pub kappa: Option<f64>,
    /// 95% interval of kappa from its large-sample standard error.
    pub kappa_ci: Option<(f64, f64)>,
    /// Counts by (first judge's label, second judge's label), every response included.
    pub confusion: BTreeMap<String, BTreeMap<String, usize>>,
}

fn readable(l: VerdictLabel) -> bool {
    matches!(l, VerdictLabel::Correct | VerdictLabel::Incorrect | VerdictLabel::Refusal)
}

impl Agreement {
    /// Agreement over pairs (first judge, second judge).
    pub fn of(pairs: &[(VerdictLabel, VerdictLabel)]) -> Self {
        let mut confusion: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
        for (a, b) in pairs {
            *confusion.entry(a.to_string()).or_default().entry(b.to_string()).or_default() += 1;
        }
        let kept: Vec<_> = pairs.iter().filter(|(a, b)| readable(*a) && readable(*b)).collect();
        let n = kept.len();
        let unreadable = pairs.len() - n;
        if n == 0 {
            return Agreement { compared: 0, unreadable, percent: f64::NAN, kappa: None, kappa_ci: None, confusion };
        }
        let nf = n as f64;
        let po = kept.iter().filter(|(a, b)| a == b).count() as f64 / nf;
        let pe: f64 = VerdictLabel::ALL
            .iter()
            .map(|l| {
                let pa = kept.iter().filter(|(a, _)| a == l).count() as f64 / nf;
                let pb = kept.iter().filter(|(_, b)| b == l).count() as f64 / nf;
                pa * pb
            })
            .sum();
        let (kappa, kappa_ci) = if (1.0 - pe).abs() < 1e-12 {
            (None, None)
        } else {
            let k = (po - pe) / (1.0 - pe);
            // Cohen (1960): SE = sqrt(po (1 - po) / (n (1 - pe)^2)).
            let se = (po * (1.0 - po) / (nf * (1.0 - pe).powi(2))).sqrt();
            // Clamped to kappa's range [-1, 1].
            (Some(k), Some(((k - 1.959964 * se).max(-1.0), (k + 1.959964 * se).min(1.0))))
        };
        Agreement { compared: n, unreadable, percent: 100.0 * po, kappa, kappa_ci, confusion }
    }
}

/// Agreement per dataset, plus `all`, from rows (dataset, first label, second label).
pub fn by_dataset(rows: &[(String, VerdictLabel, VerdictLabel)]) -> BTreeMap<String, Agreement> {
    let mut groups: BTreeMap<String, Vec<(VerdictLabel, VerdictLabel)>> = BTreeMap::new();
    for (ds, a, b) in rows {
        groups.entry(ds.clone()).or_default().push((*a, *b));
        groups.entry("all".into()).or_default().push((*a, *b));
    }
    groups.into_iter().map(|(k, v)| (k, Agreement::of(&v))).collect()
}

/// One judge's labels read back: response key → (dataset, label, judge id).
fn labels(verdicts: &[Verdict]) -> BTreeMap<String, (String, VerdictLabel, String)> {
    verdicts
        .iter()
        .map(|v| {
            let ds = v.trial_key.split('/').next().unwrap_or("").to_string();
            let label = VerdictLabel::parse_loose(&v.verdict).unwrap_or(VerdictLabel::Unparseable);
            (v.response_key.clone(), (ds, label, v.judge.clone()))
        })
        .collect()
}

/// What `candor agreement` reports.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Responses both sides labelled.
    pub paired: usize,
    /// Responses only one side labelled.
    pub unpaired: usize,
    /// The judge ids on each side.
    pub first_judges: Vec<String>,
    pub second_judges: Vec<String>,
    pub by_dataset: BTreeMap<String, Agreement>,
}

/// Pairs two verdict lists by response key and measures their agreement. For the second list
/// read from a human CSV the dataset comes from the first list.
pub fn compare(first: &[Verdict], second: &[Verdict]) -> Report {
    let (a, b) = (labels(first), labels(second));
    let mut rows = Vec::new();
    for (key, (ds, la, _)) in &a {
        if let Some((_, lb, _)) = b.get(key) {
            rows.push((ds.clone(), *la, *lb));
        }
    }
    let judges = |m: &BTreeMap<String, (String, VerdictLabel, String)>| {
        let mut j: Vec<String> = m.values().map(|(_, _, j)| j.clone()).collect();
        j.sort();
        j.dedup();
        j
    };
    Report {
        paired: rows.len(),
        unpaired: a.len() + b.len() - 2 * rows.len(),
        first_judges: judges(&a),
        second_judges: judges(&b),
        by_dataset: by_dataset(&rows),
    }
}

/// Human labels from a CSV with columns `response_key` and `verdict` (any case; "correct",
/// "incorrect", "refusal", …), as verdicts of the judge `human`.
pub fn read_human_csv(path: &Path) -> Result<Vec<Verdict>> {
    let mut reader = csv::Reader::from_path(path).map_err(|e| Error::input(Location::file(path), e.to_string()))?;
    let headers = reader.headers().map_err(|e| Error::input(Location::file(path), e.to_string()))?.clone();
    let col = |name: &str| {
        headers
            .iter()
            .position(|h| h.trim() == name)
            .ok_or_else(|| Error::input(Location::file(path).field(name), "missing column"))
    };
    let (k, v) = (col("response_key")?, col("verdict")?);
    let mut out = Vec::new();
    for (line, rec) in reader.records().enumerate() {
        let rec = rec.map_err(|e| Error::input(Location::file(path), e.to_string()))?;
        let verdict = rec.get(v).unwrap_or("");
        let label = VerdictLabel::parse_loose(verdict).ok_or_else(|| {
            Error::input(
                Location::file(path).line(line as u64 + 2).field("verdict"),
                format!("unknown verdict `{verdict}`"),
            )
        })?;
        let key = rec.get(k).unwrap_or("").to_string();
        // The response key is (model, checkpoint, dataset, item, amendment, prompt type,
        // sample) as one reversible string; the trial key is its middle four.
        let parts = crate::identity::split_key(&key);
        let trial_key = match parts.get(2..6) {
            Some(t) => crate::identity::key(&t.iter().map(String::as_str).collect::<Vec<_>>()),
            None => String::new(),
        };
        out.push(Verdict {
            response_key: key,
            trial_key,
            model: parts.first().cloned().unwrap_or_default(),
            checkpoint: parts.get(1).cloned().unwrap_or_default(),
            checkpoint_epoch: 0,
            sample_index: parts.get(6).and_then(|s| s.parse().ok()).unwrap_or(0),
            refusal: false,
            refusal_phrase: None,
            verdict: label.to_string(),
            judge: "human".into(),
            judge_raw: None,
        });
    }
    Ok(out)
}

/// Prints a report as JSON lines (one per dataset) or as text.
pub fn print(report: &Report, json: bool) {
    if json {
        for (ds, a) in &report.by_dataset {
            println!("{}", serde_json::json!({"dataset": ds, "agreement": a}));
        }
        println!(
            "{}",
            serde_json::json!({"command": "agreement", "paired": report.paired, "unpaired": report.unpaired,
                "first_judges": report.first_judges, "second_judges": report.second_judges})
        );
        return;
    }
    println!("first judge:  {}", report.first_judges.join(", "));
    println!("second judge: {}", report.second_judges.join(", "));
    println!("{} responses paired ({} labelled by one side only)", report.paired, report.unpaired);
    for (ds, a) in &report.by_dataset {
        let kappa = match (a.kappa, a.kappa_ci) {
            (Some(k), Some((lo, hi))) => format!("kappa {k:.3} [{lo:.3}, {hi:.3}]"),
            _ => "kappa undefined".into(),
        };
        println!(
            "{ds:>10}: {:.1}% agreement over {} compared, {kappa}; {} unreadable",
            a.percent, a.compared, a.unreadable
        );
        for (la, row) in &a.confusion {
            let cells: Vec<String> = row.iter().map(|(lb, n)| format!("{lb}={n}")).collect();
            println!("{:>12}{la:<12} → {}", "", cells.join(" "));
        }
    }
}
