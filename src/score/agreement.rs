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

use serde::Serialize;

use crate::conditions::VerdictLabel;

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
            (Some(k), Some((k - 1.959964 * se, k + 1.959964 * se)))
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
