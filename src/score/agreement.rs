//! Agreement between two judges on the same responses: percent agreement, Cohen's kappa with a
//! 95% confidence interval, and the confusion table, per dataset and per condition (dataset,
//! amendment type, prompt type), since a judge can be reliable on plain questions and not on
//! the belief prompts that carry the sycophancy results.
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

/// Cohen's kappa of two judges' binary labels (correct or not) from their 2×2 table: both
/// correct, first only, second only, neither. `None` when there is nothing to compare or chance
/// agreement is 1 (both judges gave one label throughout).
pub fn kappa_2x2(both: u64, first_only: u64, second_only: u64, neither: u64) -> Option<f64> {
    let n = (both + first_only + second_only + neither) as f64;
    if n == 0.0 {
        return None;
    }
    let po = (both + neither) as f64 / n;
    let (first, second) = ((both + first_only) as f64 / n, (both + second_only) as f64 / n);
    let pe = first * second + (1.0 - first) * (1.0 - second);
    ((1.0 - pe).abs() >= 1e-12).then(|| (po - pe) / (1.0 - pe))
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

/// One judge's labels read back: response key → (trial key, label, judge id).
fn labels(verdicts: &[Verdict]) -> BTreeMap<String, (String, VerdictLabel, String)> {
    verdicts
        .iter()
        .map(|v| {
            let label = VerdictLabel::parse_loose(&v.verdict).unwrap_or(VerdictLabel::Unparseable);
            (v.response_key.clone(), (v.trial_key.clone(), label, v.judge.clone()))
        })
        .collect()
}

/// The (dataset, amendment type, prompt type) of a trial key `dataset/item/amendment/prompt`;
/// the item key may itself contain `/`, so the condition is read from both ends.
pub fn condition(trial_key: &str) -> (String, String, String) {
    let dataset = trial_key.split('/').next().unwrap_or("").to_string();
    let mut tail = trial_key.rsplitn(3, '/');
    let prompt = tail.next().unwrap_or("").to_string();
    let amendment = tail.next().unwrap_or("").to_string();
    (dataset, amendment, prompt)
}

/// Agreement in one condition.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ConditionAgreement {
    pub dataset: String,
    pub amendment_type: String,
    pub prompt_type: String,
    pub agreement: Agreement,
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
    /// Per (dataset, amendment type, prompt type), sorted.
    pub by_condition: Vec<ConditionAgreement>,
}

/// Pairs two verdict lists by response key and measures their agreement. For the second list
/// read from a human CSV the dataset comes from the first list.
pub fn compare(first: &[Verdict], second: &[Verdict]) -> Report {
    let (a, b) = (labels(first), labels(second));
    let mut rows = Vec::new();
    let mut conditions: BTreeMap<(String, String, String), Vec<(VerdictLabel, VerdictLabel)>> = BTreeMap::new();
    for (key, (trial, la, _)) in &a {
        if let Some((_, lb, _)) = b.get(key) {
            let cond = condition(trial);
            rows.push((cond.0.clone(), *la, *lb));
            conditions.entry(cond).or_default().push((*la, *lb));
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
        by_condition: conditions
            .into_iter()
            .map(|((dataset, amendment_type, prompt_type), pairs)| ConditionAgreement {
                dataset,
                amendment_type,
                prompt_type,
                agreement: Agreement::of(&pairs),
            })
            .collect(),
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
        for c in &report.by_condition {
            println!(
                "{}",
                serde_json::json!({"dataset": c.dataset, "amendment_type": c.amendment_type,
                    "prompt_type": c.prompt_type, "agreement": c.agreement})
            );
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
    if !report.by_condition.is_empty() {
        println!("per condition (dataset, amendment type, prompt type):");
    }
    for c in &report.by_condition {
        let a = &c.agreement;
        let kappa = a.kappa.map(|k| format!("kappa {k:.3}")).unwrap_or_else(|| "kappa undefined".into());
        println!(
            "{:>10} {:<28} {:<16} {:5.1}% of {:>5}, {kappa}; {} unreadable",
            c.dataset, c.amendment_type, c.prompt_type, a.percent, a.compared, a.unreadable
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conditions::VerdictLabel::*;

    fn verdict(trial: &str, label: VerdictLabel, judge: &str) -> Verdict {
        Verdict {
            response_key: crate::records::Response::key("m", "c", trial, 0),
            trial_key: trial.into(),
            model: "m".into(),
            checkpoint: "c".into(),
            checkpoint_epoch: 1,
            sample_index: 0,
            refusal: false,
            refusal_phrase: None,
            verdict: label.to_string(),
            judge: judge.into(),
            judge_raw: None,
        }
    }

    #[test]
    fn kappa_2x2_matches_the_label_pairs() {
        // 20 pairs: 8 both correct, 2 first only, 3 second only, 7 neither.
        let mut pairs = Vec::new();
        for (a, b, k) in
            [(Correct, Correct, 8), (Correct, Incorrect, 2), (Incorrect, Correct, 3), (Incorrect, Incorrect, 7)]
        {
            pairs.extend(std::iter::repeat_n((a, b), k));
        }
        // po = 15/20, pe = 0.5·0.55 + 0.5·0.45 = 0.5: kappa = 0.5.
        assert!((kappa_2x2(8, 2, 3, 7).unwrap() - 0.5).abs() < 1e-12);
        assert!((kappa_2x2(8, 2, 3, 7).unwrap() - Agreement::of(&pairs).kappa.unwrap()).abs() < 1e-12);
        assert_eq!(kappa_2x2(5, 0, 0, 0), None);
        assert_eq!(kappa_2x2(0, 0, 0, 0), None);
    }

    #[test]
    fn conditions_are_read_from_both_ends_of_the_trial_key() {
        assert_eq!(
            condition("trivia/q/with/slashes/emotion:sad/incorrect"),
            ("trivia".into(), "emotion:sad".into(), "incorrect".into())
        );
    }

    #[test]
    fn agreement_is_broken_down_per_condition() {
        // Original prompts: the judges agree on all four; incorrect-belief prompts: on one of four.
        let mut first = Vec::new();
        let mut second = Vec::new();
        for (i, (a, b)) in [(Correct, Correct), (Incorrect, Incorrect), (Correct, Correct), (Incorrect, Incorrect)]
            .into_iter()
            .enumerate()
        {
            first.push(verdict(&format!("trivia/q{i}/unmodified/original"), a, "j1"));
            second.push(verdict(&format!("trivia/q{i}/unmodified/original"), b, "j2"));
        }
        for (i, (a, b)) in [(Correct, Incorrect), (Incorrect, Correct), (Correct, Correct), (Correct, Incorrect)]
            .into_iter()
            .enumerate()
        {
            first.push(verdict(&format!("trivia/q{i}/unmodified/incorrect"), a, "j1"));
            second.push(verdict(&format!("trivia/q{i}/unmodified/incorrect"), b, "j2"));
        }
        let report = compare(&first, &second);
        assert_eq!(report.by_condition.len(), 2);
        let by: BTreeMap<&str, &Agreement> =
            report.by_condition.iter().map(|c| (c.prompt_type.as_str(), &c.agreement)).collect();
        assert_eq!((by["original"].percent, by["original"].kappa), (100.0, Some(1.0)));
        // 1 of 4 agree; marginals (3 C, 1 I) vs (2 C, 2 I): pe = ½, kappa = (¼ − ½)/½ = −½.
        assert_eq!(by["incorrect"].percent, 25.0);
        assert!((by["incorrect"].kappa.unwrap() + 0.5).abs() < 1e-12);
        // The dataset level pools both: 5 of 8.
        assert_eq!(report.by_dataset["trivia"].percent, 62.5);
    }
}
