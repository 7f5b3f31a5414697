//! Effect sizes for paired base-vs-fine-tuned comparisons, each under an honest name.
//!
//! The paper reports as "Cohen's g" the quantity |b − c|/√(b + c), which is the square root of the
//! uncorrected McNemar χ² (a z-score, growing with sample size), not Cohen's g. Candor reports it as
//! [`paper_g`] and the textbook Cohen's g, |b/(b + c) − ½| (bounded by ½), as [`cohens_g`].
//!
//! ```
//! use candor::stats::effect::{cohens_g, odds_ratio, paper_g};
//! assert!((paper_g(12, 3) - 9.0 / 15f64.sqrt()).abs() < 1e-15);
//! assert!((cohens_g(12, 3) - 0.3).abs() < 1e-15);
//! assert_eq!(odds_ratio(7, 0), f64::INFINITY);
//! assert!(odds_ratio(0, 0).is_nan());
//! ```

/// The paper's "Cohen's g": |b − c| / √(b + c), i.e. √(uncorrected McNemar χ²). NaN when b + c = 0.
pub fn paper_g(b: u64, c: u64) -> f64 {
    let n = b as f64 + c as f64;
    if n == 0.0 {
        return f64::NAN;
    }
    (b as f64 - c as f64).abs() / n.sqrt()
}

/// Textbook Cohen's g for McNemar tables: |b/(b + c) − ½|. NaN when b + c = 0.
pub fn cohens_g(b: u64, c: u64) -> f64 {
    let n = b as f64 + c as f64;
    if n == 0.0 {
        return f64::NAN;
    }
    // |b/n − ½| written as |b − c|/(2n): exact in (b, c) symmetry and free of cancellation.
    (b as f64 - c as f64).abs() / (2.0 * n)
}

/// Matched-pairs odds ratio b/c (odds that a discordant pair favours the base model):
/// ∞ when c = 0 < b, NaN when b = c = 0.
pub fn odds_ratio(b: u64, c: u64) -> f64 {
    if c == 0 {
        return if b == 0 { f64::NAN } else { f64::INFINITY };
    }
    b as f64 / c as f64
}

/// A statistic as JSON: a number when finite, the strings `"Infinity"` / `"-Infinity"` when
/// infinite (an odds ratio with c = 0 < b), null when undefined (NaN). JSON has no infinity,
/// and writing it as null would make "infinite" and "undefined" look alike.
pub fn json_number(v: f64) -> serde_json::Value {
    if v.is_nan() {
        serde_json::Value::Null
    } else if v.is_infinite() {
        serde_json::Value::String(if v > 0.0 { "Infinity" } else { "-Infinity" }.into())
    } else {
        serde_json::json!(v)
    }
}

/// Accuracy in percent: 100·correct/n, NaN when n = 0.
pub fn accuracy_pct(correct: u64, n: u64) -> f64 {
    if n == 0 {
        return f64::NAN;
    }
    100.0 * correct as f64 / n as f64
}

/// Raw accuracy difference in percentage points, fine-tuned minus base (negative when the
/// fine-tuned model is less accurate). Over paired data this equals 100·(c − b)/n.
pub fn diff_pp(acc_base_pct: f64, acc_ft_pct: f64) -> f64 {
    acc_ft_pct - acc_base_pct
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * a.abs().max(b.abs())
    }

    #[test]
    fn oracle_table_rows() {
        // (b, c, paper g, Cohen's g, OR) from ORACLES.md §1; closed forms where the table rounds.
        let rows: [(u64, u64, f64, f64, f64); 5] = [
            (12, 3, 9.0 / 15f64.sqrt(), 0.3, 4.0),
            (25, 9, 16.0 / 34f64.sqrt(), 25.0 / 34.0 - 0.5, 25.0 / 9.0),
            (10, 10, 0.0, 0.0, 1.0),
            (7, 0, 7f64.sqrt(), 0.5, f64::INFINITY),
            (1, 0, 1.0, 0.5, f64::INFINITY),
        ];
        for (b, c, pg, cg, or) in rows {
            assert!(close(paper_g(b, c), pg, 1e-14) || pg == 0.0 && paper_g(b, c) == 0.0);
            assert!(close(cohens_g(b, c), cg, 1e-14) || cg == 0.0 && cohens_g(b, c) == 0.0);
            assert!(or.is_infinite() && odds_ratio(b, c) == or || close(odds_ratio(b, c), or, 1e-14));
        }
        assert!(close(paper_g(12, 3), 2.323790, 1e-6));
        assert!(close(paper_g(25, 9), 2.743977, 1e-6));
        assert!(close(paper_g(7, 0), 2.645751, 1e-6));
        assert!(close(cohens_g(25, 9), 0.235294, 1e-5));
        assert!(close(odds_ratio(25, 9), 2.7778, 1e-4));
        assert!(paper_g(0, 0).is_nan() && cohens_g(0, 0).is_nan() && odds_ratio(0, 0).is_nan());
    }

    #[test]
    fn infinite_odds_ratio_is_not_written_as_undefined() {
        assert_eq!(json_number(odds_ratio(7, 0)), serde_json::json!("Infinity"));
        assert_eq!(json_number(odds_ratio(0, 0)), serde_json::Value::Null);
        assert_eq!(json_number(odds_ratio(12, 3)), serde_json::json!(4.0));
        assert_eq!(json_number(f64::NEG_INFINITY), serde_json::json!("-Infinity"));
    }

    #[test]
    fn odds_ratio_is_not_symmetric_but_g_is() {
        assert_eq!(odds_ratio(3, 12), 0.25);
        assert_eq!(odds_ratio(0, 5), 0.0);
        assert_eq!(paper_g(3, 12), paper_g(12, 3));
        assert_eq!(cohens_g(3, 12), cohens_g(12, 3));
    }

    #[test]
    fn accuracy_and_difference() {
        assert_eq!(accuracy_pct(3, 4), 75.0);
        assert!(accuracy_pct(0, 0).is_nan());
        assert_eq!(diff_pp(75.0, 62.5), -12.5);
    }
}
