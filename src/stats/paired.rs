//! Paired counts for one category and the per-category results derived from them.
//!
//! A pair is the base and the fine-tuned answer to the same (item, amendment_type, prompt_type).
//! [`PairedCounts`] is the whole state the McNemar analysis needs, and it is a commutative monoid
//! with inverses: updates carry a signed multiplicity (`diff`, as in a differential dataflow), so
//! batches can be merged in any order and at any granularity, and retractions undo additions
//! exactly. [`CategoryStats`] is what the paper reports per category, and [`family`] adds the
//! Benjamini–Hochberg adjustment over the categories of one (model, dataset, test type).
//!
//! [`newcombe_paired`] is Newcombe's (1998) square-and-add interval for the difference of two
//! *paired* proportions (his method 10), built from the two Wilson intervals
//! ([`super::interval::wilson`]) and the correlation φ of the paired outcomes, with his
//! continuity-corrected φ. It is the interval Fagerland, Lydersen & Laake (*Statistical Analysis
//! of Contingency Tables*, 2017, ch. 8) recommend for paired 2×2 tables; the Wald interval of
//! the forest plot can leave [−1, 1] and collapses to a point when b = c = 0. Candor's
//! difference is fine-tuned minus base accuracy, (c − b)/n.
//!
//! ```
//! use candor::stats::paired::{family, PairedCounts, ALPHA};
//! let mut unmodified = PairedCounts::default();
//! for _ in 0..12 { unmodified.add(true, false, 1); }   // b: base right, fine-tuned wrong
//! for _ in 0..3 { unmodified.add(false, true, 1); }    // c: base wrong, fine-tuned right
//! unmodified.add(true, true, 85);
//! let sad = PairedCounts { both_correct: 90, b: 0, c: 0, both_wrong: 10 };
//! let stats = family(&[unmodified, sad], ALPHA).unwrap();
//! assert_eq!(stats[0].p_exact, Some(9.0 / 256.0));
//! assert_eq!(stats[0].significant, Some(true));   // alone in its family after `sad` drops out
//! assert_eq!(stats[1].p_adjusted, None);
//! // Fagerland et al.'s worked example (Cavo et al. 2012): −0.0621 (−0.1186 to −0.0046).
//! use candor::stats::{interval::Z_95, paired::newcombe_paired};
//! let cavo = PairedCounts { both_correct: 59, b: 16, c: 6, both_wrong: 80 };
//! let (lo, hi) = newcombe_paired(&cavo, Z_95).unwrap();
//! assert!((lo + 0.1186).abs() < 5e-5 && (hi + 0.0046).abs() < 5e-5);
//! ```

use std::fmt;

use super::bh::benjamini_hochberg;
use super::effect::{accuracy_pct, cohens_g, diff_pp, odds_ratio, paper_g};
use super::interval::{Z_95, wilson};
use super::mcnemar::{mcnemar_exact, mcnemar_midp};

/// The paper's significance level for every test.
pub const ALPHA: f64 = 0.05;

/// Counts of the four kinds of pair. Signed so that a retraction may arrive before the addition
/// it cancels; only a settled state (all counts ≥ 0) has statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PairedCounts {
    pub both_correct: i64,
    /// Base correct, fine-tuned wrong.
    pub b: i64,
    /// Base wrong, fine-tuned correct.
    pub c: i64,
    pub both_wrong: i64,
}

impl PairedCounts {
    /// Adds `diff` copies of one pair (negative `diff` retracts).
    pub fn add(&mut self, base_correct: bool, ft_correct: bool, diff: i64) {
        let cell = match (base_correct, ft_correct) {
            (true, true) => &mut self.both_correct,
            (true, false) => &mut self.b,
            (false, true) => &mut self.c,
            (false, false) => &mut self.both_wrong,
        };
        *cell += diff;
    }

    /// Folds another partial state into this one.
    pub fn merge(&mut self, other: &PairedCounts) {
        self.both_correct += other.both_correct;
        self.b += other.b;
        self.c += other.c;
        self.both_wrong += other.both_wrong;
    }

    /// Removes a previously merged partial state.
    pub fn retract(&mut self, other: &PairedCounts) {
        self.both_correct -= other.both_correct;
        self.b -= other.b;
        self.c -= other.c;
        self.both_wrong -= other.both_wrong;
    }

    /// Number of pairs.
    pub fn n(&self) -> i64 {
        self.both_correct + self.b + self.c + self.both_wrong
    }

    /// True when nothing has been counted (the monoid's identity), e.g. after full retraction.
    pub fn is_empty(&self) -> bool {
        *self == PairedCounts::default()
    }
}

impl FromIterator<(bool, bool)> for PairedCounts {
    fn from_iter<I: IntoIterator<Item = (bool, bool)>>(pairs: I) -> Self {
        let mut counts = PairedCounts::default();
        for (base, ft) in pairs {
            counts.add(base, ft, 1);
        }
        counts
    }
}

/// Why statistics could not be derived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PairedError {
    /// A count is negative: more retractions than additions have been seen so far.
    NegativeCount(PairedCounts),
}

impl fmt::Display for PairedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PairedError::NegativeCount(c) => {
                write!(f, "paired counts are negative (more retractions than additions): {c:?}")
            }
        }
    }
}

impl std::error::Error for PairedError {}

/// The per-category results the paper reports, plus the honest effect sizes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CategoryStats {
    pub n: u64,
    pub both_correct: u64,
    pub b: u64,
    pub c: u64,
    pub both_wrong: u64,
    /// Base accuracy, percent.
    pub acc_base_pct: f64,
    /// Fine-tuned accuracy, percent.
    pub acc_ft_pct: f64,
    /// Fine-tuned minus base accuracy, percentage points.
    pub diff_pp: f64,
    /// |b − c|/√(b + c), what the paper calls "Cohen's g".
    pub paper_g: f64,
    /// Textbook Cohen's g, |b/(b + c) − ½|.
    pub cohens_g: f64,
    /// b/c.
    pub odds_ratio: f64,
    /// Wilson 95% interval of the base accuracy, percent; `None` when n = 0.
    pub acc_base_ci_pct: Option<(f64, f64)>,
    /// Wilson 95% interval of the fine-tuned accuracy, percent.
    pub acc_ft_ci_pct: Option<(f64, f64)>,
    /// Newcombe's paired 95% interval of `diff_pp`, percentage points.
    pub diff_ci_pp: Option<(f64, f64)>,
    /// Exact McNemar p; `None` when b + c = 0 (no test).
    pub p_exact: Option<f64>,
    /// Mid-p McNemar value (less conservative than the exact test); `None` when b + c = 0.
    pub p_midp: Option<f64>,
    /// Benjamini–Hochberg adjusted p within the family; `None` until [`family`] fills it, or when
    /// there was no test.
    pub p_adjusted: Option<f64>,
    /// BH rejection at the family's α; `None` when not adjusted.
    pub significant: Option<bool>,
}

impl CategoryStats {
    /// Unadjusted statistics of one category.
    pub fn from_counts(counts: &PairedCounts) -> Result<Self, PairedError> {
        let nonneg = |x: i64| u64::try_from(x).map_err(|_| PairedError::NegativeCount(*counts));
        let (both_correct, b, c, both_wrong) =
            (nonneg(counts.both_correct)?, nonneg(counts.b)?, nonneg(counts.c)?, nonneg(counts.both_wrong)?);
        let n = both_correct + b + c + both_wrong;
        let acc_base_pct = accuracy_pct(both_correct + b, n);
        let acc_ft_pct = accuracy_pct(both_correct + c, n);
        let pct = |ci: Option<(f64, f64)>| ci.map(|(lo, hi)| (100.0 * lo, 100.0 * hi));
        Ok(CategoryStats {
            n,
            both_correct,
            b,
            c,
            both_wrong,
            acc_base_pct,
            acc_ft_pct,
            diff_pp: diff_pp(acc_base_pct, acc_ft_pct),
            paper_g: paper_g(b, c),
            cohens_g: cohens_g(b, c),
            odds_ratio: odds_ratio(b, c),
            acc_base_ci_pct: pct(wilson(both_correct + b, n, Z_95)),
            acc_ft_ci_pct: pct(wilson(both_correct + c, n, Z_95)),
            diff_ci_pp: pct(newcombe_paired(counts, Z_95)),
            p_exact: mcnemar_exact(b, c),
            p_midp: mcnemar_midp(b, c),
            p_adjusted: None,
            significant: None,
        })
    }
}

/// Newcombe's square-and-add interval for the paired difference fine-tuned minus base
/// accuracy, (c − b)/n; `None` for an empty category or negative counts.
///
/// With p₁ = (both_correct + c)/n (fine-tuned), p₂ = (both_correct + b)/n (base), their Wilson
/// intervals (l₁, u₁), (l₂, u₂), and the paired correlation φ:
/// L = p₁ − p₂ − √((p₁ − l₁)² − 2φ(p₁ − l₁)(u₂ − p₂) + (u₂ − p₂)²),
/// U = p₁ − p₂ + √((p₂ − l₂)² − 2φ(p₂ − l₂)(u₁ − p₁) + (u₁ − p₁)²).
/// φ = A/√(product of the four margins) with A = both_correct·both_wrong − b·c, continuity
/// corrected as Newcombe does: A − n/2 when A > n/2, 0 when 0 ≤ A ≤ n/2; φ = 0 when a margin is 0.
pub fn newcombe_paired(counts: &PairedCounts, z: f64) -> Option<(f64, f64)> {
    let PairedCounts { both_correct, b, c, both_wrong } = *counts;
    if [both_correct, b, c, both_wrong].iter().any(|&x| x < 0) {
        return None;
    }
    let n = (both_correct + b + c + both_wrong) as u64;
    let (ft_right, base_right) = ((both_correct + c) as u64, (both_correct + b) as u64);
    let (l1, u1) = wilson(ft_right, n, z)?;
    let (l2, u2) = wilson(base_right, n, z)?;
    let nf = n as f64;
    let (p1, p2) = (ft_right as f64 / nf, base_right as f64 / nf);
    let margins = [ft_right, n - ft_right, base_right, n - base_right];
    let phi = if margins.contains(&0) {
        0.0
    } else {
        let a = both_correct as f64 * both_wrong as f64 - b as f64 * c as f64;
        let corrected = if a > nf / 2.0 {
            a - nf / 2.0
        } else if a >= 0.0 {
            0.0
        } else {
            a
        };
        corrected / margins.iter().map(|&m| m as f64).product::<f64>().sqrt()
    };
    let d = p1 - p2;
    let lower = ((p1 - l1).powi(2) - 2.0 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2).powi(2)).max(0.0).sqrt();
    let upper = ((p2 - l2).powi(2) - 2.0 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1).powi(2)).max(0.0).sqrt();
    Some((d - lower, d + upper))
}

/// Statistics for every category of one family (same order as `categories`), with BH-adjusted
/// p-values over the categories that have a test.
pub fn family(categories: &[PairedCounts], alpha: f64) -> Result<Vec<CategoryStats>, PairedError> {
    let mut stats = categories.iter().map(CategoryStats::from_counts).collect::<Result<Vec<_>, _>>()?;
    let pvalues: Vec<Option<f64>> = stats.iter().map(|s| s.p_exact).collect();
    for (s, adj) in stats.iter_mut().zip(benjamini_hochberg(&pvalues, alpha)) {
        s.p_adjusted = adj.map(|a| a.p_adjusted);
        s.significant = adj.map(|a| a.reject);
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * a.abs().max(b.abs())
    }

    #[test]
    fn derived_statistics_of_one_category() {
        let counts = PairedCounts { both_correct: 80, b: 12, c: 3, both_wrong: 5 };
        let s = CategoryStats::from_counts(&counts).unwrap();
        assert_eq!(s.n, 100);
        assert_eq!(s.acc_base_pct, 92.0);
        assert_eq!(s.acc_ft_pct, 83.0);
        assert!(close(s.diff_pp, -9.0, 1e-12));
        assert!(close(s.diff_pp, 100.0 * (3.0 - 12.0) / 100.0, 1e-12));
        assert!(close(s.paper_g, 2.323790, 1e-6));
        assert!(close(s.cohens_g, 0.3, 1e-14));
        assert_eq!(s.odds_ratio, 4.0);
        assert_eq!(s.p_exact, Some(0.03515625));
        assert_eq!(s.p_midp, Some(697.0 / 32768.0));
        assert_eq!(s.p_adjusted, None);
        let (lo, hi) = s.acc_base_ci_pct.unwrap();
        assert!(lo < 92.0 && 92.0 < hi && hi < 100.0);
        let (lo, hi) = s.diff_ci_pp.unwrap();
        assert!(lo < -9.0 && -9.0 < hi && hi < 0.0, "{lo} {hi}");
        let empty = CategoryStats::from_counts(&PairedCounts::default()).unwrap();
        assert_eq!((empty.acc_base_ci_pct, empty.diff_ci_pp, empty.p_midp), (None, None, None));
    }

    #[test]
    fn negative_counts_have_no_statistics() {
        let mut counts = PairedCounts::default();
        counts.add(true, false, -1);
        assert_eq!(CategoryStats::from_counts(&counts), Err(PairedError::NegativeCount(counts)));
        assert!(family(&[counts], ALPHA).is_err());
    }

    #[test]
    fn family_adjusts_over_tested_categories_only() {
        // The oracle rows of ORACLES.md §1, whose exact p-values are known rationals.
        let cats = [
            PairedCounts { both_correct: 50, b: 12, c: 3, both_wrong: 5 },
            PairedCounts { both_correct: 50, b: 0, c: 0, both_wrong: 5 },
            PairedCounts { both_correct: 50, b: 25, c: 9, both_wrong: 5 },
            PairedCounts { both_correct: 50, b: 10, c: 10, both_wrong: 5 },
            PairedCounts { both_correct: 50, b: 7, c: 0, both_wrong: 5 },
        ];
        let stats = family(&cats, ALPHA).unwrap();
        // m = 4; sorted: 0.00904 (rank 1), 0.015625 (2), 0.03515625 (3), 1 (4). Rank 1's raw
        // 0.00904/0.25 = 0.0362 exceeds rank 2's 0.03125, so the cumulative minimum takes over.
        let want = [0.03515625 / 0.75, 0.015625 / 0.5, 1.0, 0.015625 / 0.5];
        let tested: Vec<_> = stats.iter().filter(|s| s.p_exact.is_some()).collect();
        for (s, w) in tested.iter().zip(want) {
            assert!(close(s.p_adjusted.unwrap(), w, 1e-12), "{s:?} vs {w}");
        }
        assert_eq!(stats[1].p_adjusted, None);
        assert_eq!(stats[1].significant, None);
        assert_eq!(
            stats.iter().map(|s| s.significant).collect::<Vec<_>>(),
            [Some(true), None, Some(true), Some(false), Some(true)]
        );
    }

    fn from_scratch(obs: &[(bool, bool)]) -> PairedCounts {
        obs.iter().copied().collect()
    }

    /// Splits `obs` into consecutive batches of the given sizes (cycling), counts each batch
    /// separately, and merges the partial states in the order given by `order_seed`.
    fn batched(obs: &[(bool, bool)], sizes: &[usize], reverse: bool) -> PairedCounts {
        let mut parts = Vec::new();
        let mut start = 0;
        let mut i = 0;
        while start < obs.len() {
            let len = sizes[i % sizes.len()].max(1);
            let end = (start + len).min(obs.len());
            parts.push(from_scratch(&obs[start..end]));
            start = end;
            i += 1;
        }
        if reverse {
            parts.reverse();
        }
        let mut total = PairedCounts::default();
        for p in &parts {
            total.merge(p);
        }
        total
    }

    fn observations() -> impl Strategy<Value = Vec<(bool, bool)>> {
        prop::collection::vec((any::<bool>(), any::<bool>()), 0..2000)
    }

    proptest! {
        #[test]
        fn fixed_batch_sizes_merge_to_from_scratch(
            obs in observations(),
            size in prop::sample::select(vec![1usize, 2, 3, 8192]),
            reverse in any::<bool>(),
        ) {
            prop_assert_eq!(batched(&obs, &[size], reverse), from_scratch(&obs));
        }

        #[test]
        fn random_batches_in_random_order_merge_to_from_scratch(
            (obs, shuffled) in observations().prop_flat_map(|o| (Just(o.clone()), Just(o).prop_shuffle())),
            sizes in prop::collection::vec(1usize..300, 1..20),
            reverse in any::<bool>(),
        ) {
            let want = from_scratch(&obs);
            prop_assert_eq!(batched(&shuffled, &sizes, reverse), want);
            // Debug formatting compares NaN fields (empty categories) as equal.
            prop_assert_eq!(
                format!("{:?}", CategoryStats::from_counts(&batched(&shuffled, &sizes, !reverse))),
                format!("{:?}", CategoryStats::from_counts(&want))
            );
        }

        #[test]
        fn adding_then_retracting_a_subset_equals_never_adding_it(
            obs in observations(),
            mask_seed in prop::collection::vec(any::<bool>(), 2000),
            retract_first in any::<bool>(),
        ) {
            let kept: Vec<_> = obs.iter().zip(&mask_seed).filter(|(_, m)| !**m).map(|(o, _)| *o).collect();
            let dropped: Vec<_> = obs.iter().zip(&mask_seed).filter(|(_, m)| **m).map(|(o, _)| *o).collect();
            let mut state = PairedCounts::default();
            if retract_first {
                // A retraction may overtake its addition in a dataflow.
                for &(b, f) in &dropped { state.add(b, f, -1); }
                state.merge(&from_scratch(&obs));
            } else {
                for &(b, f) in &obs { state.add(b, f, 1); }
                state.retract(&from_scratch(&dropped));
            }
            prop_assert_eq!(state, from_scratch(&kept));
            let mut cancelled = from_scratch(&dropped);
            cancelled.retract(&from_scratch(&dropped));
            prop_assert!(cancelled.is_empty());
        }

        #[test]
        fn signed_multiplicities_match_repeated_unit_updates(
            base in any::<bool>(), ft in any::<bool>(), k in -50i64..50,
        ) {
            let mut once = PairedCounts::default();
            once.add(base, ft, k);
            let mut repeated = PairedCounts::default();
            for _ in 0..k.unsigned_abs() { repeated.add(base, ft, k.signum()); }
            prop_assert_eq!(once, repeated);
        }
    }
}

#[cfg(test)]
mod newcombe_tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn newcombe_published_examples() {
        // Fagerland, Lydersen & Laake (2017), ch. 8, as printed by their contingencytables
        // package: Cavo et al. (2012) −0.0621 (−0.1186 to −0.0046).
        let cavo = PairedCounts { both_correct: 59, b: 16, c: 6, both_wrong: 80 };
        let (lo, hi) = newcombe_paired(&cavo, Z_95).unwrap();
        assert!(close(lo, -0.1186, 5e-5) && close(hi, -0.0046, 5e-5), "{lo} {hi}");
        assert!(lo < (6.0 - 16.0) / 161.0 && (6.0 - 16.0) / 161.0 < hi);
    }

    #[test]
    fn newcombe_hand_computed_cases() {
        // No discordance and a margin of 0 (everything right on both sides): φ = 0, p₁ = p₂ = 1,
        // so L = −(1 − l) and U = 1 − l with l = n/(n + z²): a difference of 0 is not proof of
        // equal accuracy.
        let all_right = PairedCounts { both_correct: 20, b: 0, c: 0, both_wrong: 0 };
        let (lo, hi) = newcombe_paired(&all_right, Z_95).unwrap();
        let l = 20.0 / (20.0 + Z_95 * Z_95);
        assert!(close(lo, -(1.0 - l), 1e-15) && close(hi, 1.0 - l, 1e-15), "{lo} {hi}");
        // A = 0 ≤ n/2 gives φ = 0: the interval is the independent square-and-add one.
        let indep = PairedCounts { both_correct: 5, b: 5, c: 5, both_wrong: 5 };
        let (w_lo, w_hi) = wilson(10, 20, Z_95).unwrap();
        let (lo, hi) = newcombe_paired(&indep, Z_95).unwrap();
        let half = ((0.5 - w_lo).powi(2) + (w_hi - 0.5).powi(2)).sqrt();
        assert!(close(lo, -half, 1e-15) && close(hi, half, 1e-15));
        // Negative counts or an empty table have no interval.
        assert_eq!(newcombe_paired(&PairedCounts::default(), Z_95), None);
        assert_eq!(newcombe_paired(&PairedCounts { both_correct: 3, b: -1, c: 0, both_wrong: 0 }, Z_95), None);
    }

    #[test]
    fn newcombe_contains_the_estimate_and_stays_in_range() {
        for bc in 0..6i64 {
            for b in 0..6i64 {
                for c in 0..6i64 {
                    for bw in 0..6i64 {
                        let k = PairedCounts { both_correct: bc, b, c, both_wrong: bw };
                        let Some((lo, hi)) = newcombe_paired(&k, Z_95) else {
                            assert_eq!(k.n(), 0);
                            continue;
                        };
                        let d = (c - b) as f64 / k.n() as f64;
                        assert!(lo <= d + 1e-15 && d <= hi + 1e-15 && lo >= -1.0 && hi <= 1.0, "{k:?}: {lo} {d} {hi}");
                    }
                }
            }
        }
    }
}
