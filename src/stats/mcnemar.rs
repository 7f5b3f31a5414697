//! McNemar's test for paired binary outcomes (base vs fine-tuned answer to the same prompt).
//!
//! `b` counts pairs where the base model was right and the fine-tuned one wrong, `c` the reverse.
//! The exact test is statsmodels' `mcnemar(table, exact=True)`:
//! p = min(1, 2·BinomCDF(min(b, c); b + c, ½)). It is evaluated without ever forming `2^(b+c)` or a
//! binomial coefficient, so pooled families with b + c in the hundreds of thousands stay finite and
//! accurate. When b + c = 0 there is no test: the functions return `None`, and such a category is
//! left out of the Benjamini–Hochberg family (as the paper's code does).
//!
//! The exact test is conservative: its size is well below α for the small b + c of a single
//! category. [`mcnemar_midp`] reports the mid-p value beside it (Fagerland, Lydersen & Laake 2013,
//! "The McNemar test for binary matched-pairs data: mid-p and asymptotic are better than exact
//! conditional"): the exact p minus the probability of the observed table, i.e.
//! 2·P(X < k) + P(X = k) for k = min(b, c). It is 1 when b = c.
//!
//! ```
//! use candor::stats::mcnemar::{mcnemar_chi2, mcnemar_exact, mcnemar_midp};
//! assert_eq!(mcnemar_exact(12, 3), Some(9.0 / 256.0));
//! assert_eq!(mcnemar_exact(0, 0), None);
//! assert_eq!(mcnemar_midp(12, 3), Some(697.0 / 32768.0)); // (2·576 − 455)/2^15
//! let chi = mcnemar_chi2(12, 3, true).unwrap();
//! assert!((chi.statistic - 4.266_666_666_666_667).abs() < 1e-12);
//! ```

use statrs::function::erf::erfc;
use statrs::function::factorial::ln_factorial;

/// Exact two-sided McNemar p-value, or `None` when there are no discordant pairs (b + c = 0).
pub fn mcnemar_exact(b: u64, c: u64) -> Option<f64> {
    let n = b.checked_add(c)?;
    if n == 0 {
        return None;
    }
    let k = b.min(c);
    let cdf = binom_half_cdf_exact(k, n).unwrap_or_else(|| binom_half_cdf(k, n));
    Some((2.0 * cdf).min(1.0))
}

/// Two-sided mid-p McNemar value, 2·P(X < k) + P(X = k) with X ~ Binomial(b + c, ½) and
/// k = min(b, c), capped at 1; `None` when b + c = 0. Below the exact p by P(X = k) whenever b ≠ c.
pub fn mcnemar_midp(b: u64, c: u64) -> Option<f64> {
    let n = b.checked_add(c)?;
    if n == 0 {
        return None;
    }
    let k = b.min(c);
    if 2 * k == n {
        return Some(1.0);
    }
    let (cdf, pmf) = match (binom_half_cdf_exact(k, n), binom_half_pmf_exact(k, n)) {
        (Some(cdf), Some(pmf)) => (cdf, pmf),
        _ => (binom_half_cdf(k, n), binom_half_pmf(k, n)),
    };
    Some((2.0 * cdf - pmf).clamp(0.0, 1.0))
}

/// A chi-square McNemar test: statistic and p-value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Chi2Test {
    pub statistic: f64,
    pub pvalue: f64,
}

/// statsmodels' `mcnemar(table, exact=False, correction=...)`: χ² = (|b − c| − corr)² / (b + c)
/// with corr = 1 when `correction`, and p = P(χ²₁ > χ²). Like statsmodels, the continuity
/// correction is not clamped, so b = c gives χ² = 1/(b + c) rather than 0. `None` when b + c = 0.
pub fn mcnemar_chi2(b: u64, c: u64, correction: bool) -> Option<Chi2Test> {
    let n = b.checked_add(c)?;
    if n == 0 {
        return None;
    }
    let corr = if correction { 1.0 } else { 0.0 };
    let diff = (b as f64 - c as f64).abs() - corr;
    let statistic = diff * diff / n as f64;
    // The χ²₁ survival function is P(|Z| > √x) = erfc(√(x/2)); erfc keeps tail precision.
    let pvalue = erfc((statistic / 2.0).sqrt());
    Some(Chi2Test { statistic, pvalue })
}

/// P(X ≤ k) for X ~ Binomial(n, ½) in integer arithmetic, rounded once; `None` for n > 127,
/// where binomial coefficients no longer fit in u128. Small tables, the common case per category,
/// thus get correctly rounded p-values (12 vs 3 gives exactly 9/256).
fn binom_half_cdf_exact(k: u64, n: u64) -> Option<f64> {
    if n > 127 {
        return None;
    }
    let (mut coef, mut sum) = (1u128, 1u128);
    for i in 1..=k as u128 {
        // C(n, i) = C(n, i−1)·(n−i+1)/i. Dividing out g = gcd(C, i) first leaves i/g coprime to
        // C/g, so i/g divides n−i+1 and no intermediate exceeds the result.
        let g = gcd(coef, i);
        coef = (coef / g) * ((n as u128 - i + 1) / (i / g));
        sum += coef;
    }
    // Dividing by a power of two is exact in f64 (no underflow for n ≤ 127).
    Some(sum as f64 / 2f64.powi(n as i32))
}

/// P(X = k) for X ~ Binomial(n, ½) in integer arithmetic, rounded once; `None` for n > 127.
fn binom_half_pmf_exact(k: u64, n: u64) -> Option<f64> {
    if n > 127 {
        return None;
    }
    let mut coef = 1u128;
    for i in 1..=k as u128 {
        let g = gcd(coef, i);
        coef = (coef / g) * ((n as u128 - i + 1) / (i / g));
    }
    Some(coef as f64 / 2f64.powi(n as i32))
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// P(X ≤ k) for X ~ Binomial(n, ½), k ≤ n/2 expected (the lower tail is the short one).
///
/// The largest term P(X = k) comes from Loader's saddle-point form, accurate to a few ulps at any n;
/// the rest of the tail is summed relative to it with the ratio P(X = i−1)/P(X = i) = i/(n−i+1),
/// stopping once further terms cannot change the sum.
fn binom_half_cdf(k: u64, n: u64) -> f64 {
    if k >= n {
        return 1.0;
    }
    let top = binom_half_pmf(k, n);
    if top == 0.0 {
        return 0.0;
    }
    let nf = n as f64;
    let mut sum = 1.0;
    let mut term = 1.0;
    let mut i = k;
    while i > 0 {
        term *= i as f64 / (nf - i as f64 + 1.0);
        let next = sum + term;
        if next == sum {
            break;
        }
        sum = next;
        i -= 1;
    }
    top * sum
}

/// P(X = k) for X ~ Binomial(n, ½): [`binom_pmf`] at p = q = ½.
fn binom_half_pmf(k: u64, n: u64) -> f64 {
    binom_pmf(k, n, 0.5, 0.5)
}

/// P(X = x) for X ~ Binomial(n, p), with q = 1 − p given by the caller (so that a p near 1
/// keeps q's digits), in C. Loader's form ("Fast and accurate computation of binomial
/// probabilities", 2000; R's `dbinom_raw`): exp(−Stirling errors − deviance terms) /
/// √(2π x (n−x)/n), accurate to a few ulps at any n.
pub(crate) fn binom_pmf(x: u64, n: u64, p: f64, q: f64) -> f64 {
    if p == 0.0 {
        return if x == 0 { 1.0 } else { 0.0 };
    }
    if q == 0.0 {
        return if x == n { 1.0 } else { 0.0 };
    }
    let nf = n as f64;
    if x == 0 {
        if n == 0 {
            return 1.0;
        }
        let lc = if p < 0.1 { -bd0(nf, nf * q) - nf * p } else { nf * q.ln() };
        return lc.exp();
    }
    if x == n {
        let lc = if q < 0.1 { -bd0(nf, nf * p) - nf * q } else { nf * p.ln() };
        return lc.exp();
    }
    if x > n {
        return 0.0;
    }
    let xf = x as f64;
    let lc = stirling_error(n) - stirling_error(x) - stirling_error(n - x) - bd0(xf, nf * p) - bd0(nf - xf, nf * q);
    let lf = (2.0 * std::f64::consts::PI).ln() + xf.ln() + (-xf / nf).ln_1p();
    (lc - 0.5 * lf).exp()
}

/// ln(n!) − ln(√(2πn) (n/e)^n).
fn stirling_error(n: u64) -> f64 {
    const S0: f64 = 1.0 / 12.0;
    const S1: f64 = 1.0 / 360.0;
    const S2: f64 = 1.0 / 1260.0;
    const S3: f64 = 1.0 / 1680.0;
    const S4: f64 = 1.0 / 1188.0;
    let x = n as f64;
    if n <= 15 {
        // statrs tabulates ln(n!) exactly for small n, so the direct difference is precise here.
        return ln_factorial(n) - (x + 0.5) * x.ln() + x - 0.5 * (2.0 * std::f64::consts::PI).ln();
    }
    let xx = x * x;
    if n > 500 {
        (S0 - S1 / xx) / x
    } else if n > 80 {
        (S0 - (S1 - S2 / xx) / xx) / x
    } else if n > 35 {
        (S0 - (S1 - (S2 - S3 / xx) / xx) / xx) / x
    } else {
        (S0 - (S1 - (S2 - (S3 - S4 / xx) / xx) / xx) / xx) / x
    }
}

/// The deviance term x·ln(x/m) + m − x, summed as a series when x ≈ m to avoid cancellation.
fn bd0(x: f64, m: f64) -> f64 {
    if (x - m).abs() < 0.1 * (x + m) {
        let v = (x - m) / (x + m);
        let mut s = (x - m) * v;
        let mut ej = 2.0 * x * v;
        let v2 = v * v;
        let mut j = 1.0;
        loop {
            ej *= v2;
            let s1 = s + ej / (2.0 * j + 1.0);
            if s1 == s {
                return s1;
            }
            s = s1;
            j += 1.0;
        }
    }
    x * (x / m).ln() + m - x
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel_close(a: f64, b: f64, tol: f64) -> bool {
        a == b || (a - b).abs() <= tol * a.abs().max(b.abs())
    }

    /// Exact p for every (b, c) with b + c ≤ 127, from Pascal's triangle in u128 (additions
    /// only, so no intermediate overflow): p = min(1, Σ_{i≤k} C(n, i) / 2^(n−1)), rounded once.
    fn pascal_oracle() -> Vec<Vec<f64>> {
        let mut row: Vec<u128> = vec![1];
        let mut table = vec![vec![]];
        for n in 1..=127usize {
            let mut next = vec![1u128; n + 1];
            for i in 1..n {
                next[i] = row[i - 1] + row[i];
            }
            row = next;
            let ps = (0..=n)
                .map(|b| {
                    let tail: u128 = row[..=b.min(n - b)].iter().sum();
                    (tail as f64 / 2f64.powi(n as i32 - 1)).min(1.0)
                })
                .collect();
            table.push(ps);
        }
        table
    }

    #[test]
    fn binomial_probabilities_match_statrs_at_any_p() {
        use statrs::distribution::{Binomial, Discrete};
        for (n, p) in [(1, 0.3), (10, 0.5), (60, 0.02), (500, 0.25), (5_000, 0.97), (100_000, 0.4)] {
            let dist = Binomial::new(p, n).unwrap();
            for x in [0, 1, n / 7, n / 2, (n as f64 * p) as u64, n - 1, n] {
                let (ours, theirs) = (binom_pmf(x, n, p, 1.0 - p), dist.pmf(x));
                assert!(
                    rel_close(ours, theirs, 1e-9) || (ours - theirs).abs() < 1e-300,
                    "{x} of {n} at {p}: {ours} vs {theirs}"
                );
            }
        }
        assert_eq!(binom_pmf(3, 3, 1.0, 0.0), 1.0);
        assert_eq!(binom_pmf(2, 3, 0.0, 1.0), 0.0);
    }

    #[test]
    fn exact_matches_u128_oracle_for_every_pair_up_to_127() {
        let oracle = pascal_oracle();
        let mut worst_tail: f64 = 0.0;
        for n in 1..=127u64 {
            for b in 0..=n {
                let c = n - b;
                let want = oracle[n as usize][b as usize];
                // The public function is correctly rounded here.
                assert_eq!(mcnemar_exact(b, c), Some(want), "b={b} c={c}");
                // The large-n path must agree too, since it alone serves n > 127.
                let tail = (2.0 * binom_half_cdf(b.min(c), n)).min(1.0);
                worst_tail = worst_tail.max((tail - want).abs() / want);
                assert!(rel_close(tail, want, 1e-13), "b={b} c={c} {tail} vs {want}");
            }
        }
        assert!(worst_tail < 1e-13, "worst relative error {worst_tail}");
    }

    #[test]
    fn exact_and_log_space_paths_meet_at_the_switch() {
        // Above n = 127 the integer path gives way to Loader's; both must agree around the switch.
        for n in 115..=140u64 {
            for b in [0, 1, n / 3, n / 2 - 1, n / 2] {
                let p = mcnemar_exact(b, n - b).unwrap();
                let loader = (2.0 * binom_half_cdf(b.min(n - b), n)).min(1.0);
                assert!(rel_close(p, loader, 1e-13), "n={n} b={b}");
            }
        }
    }

    #[test]
    fn oracle_table_rows() {
        assert!(rel_close(mcnemar_exact(12, 3).unwrap(), 0.03515625, 1e-13));
        assert!(rel_close(mcnemar_exact(25, 9).unwrap(), 9707899.0 / 2f64.powi(30), 1e-13));
        assert!(rel_close(mcnemar_exact(25, 9).unwrap(), 0.0090411855, 1e-8));
        assert_eq!(mcnemar_exact(10, 10), Some(1.0));
        assert!(rel_close(mcnemar_exact(7, 0).unwrap(), 0.015625, 1e-13));
        assert_eq!(mcnemar_exact(1, 0), Some(1.0));
        assert_eq!(mcnemar_exact(0, 0), None);
    }

    #[test]
    fn midp_oracles() {
        // b = 12, c = 3: (2·576 − 455)/2^15, exactly representable.
        assert_eq!(mcnemar_midp(12, 3), Some(697.0 / 32768.0));
        // Fagerland, Lydersen & Laake's worked example (Cavo et al. 2012, b = 6, c = 16):
        // exact conditional P = 0.052479, mid-P = 0.034690 (printed to 6 decimals).
        assert!((mcnemar_exact(6, 16).unwrap() - 0.052479).abs() < 5e-7);
        assert!((mcnemar_midp(6, 16).unwrap() - 0.034690).abs() < 5e-7);
        // b = 7, c = 0: 2·P(X < 0) + P(X = 0) = 1/128, half the exact 1/64.
        assert_eq!(mcnemar_midp(7, 0), Some(1.0 / 128.0));
        assert_eq!(mcnemar_midp(10, 10), Some(1.0));
        assert_eq!(mcnemar_midp(0, 0), None);
        // One discordant pair: exact p is 1, mid-p is ½.
        assert_eq!(mcnemar_midp(1, 0), Some(0.5));
    }

    #[test]
    fn midp_is_exact_minus_the_observed_probability_on_both_paths() {
        let oracle = pascal_oracle();
        for n in 1..=127u64 {
            for b in 0..=n {
                let c = n - b;
                let midp = mcnemar_midp(b, c).unwrap();
                assert!(midp <= oracle[n as usize][b as usize], "b={b} c={c}");
                if 2 * b != n {
                    let k = b.min(c);
                    let want = oracle[n as usize][b as usize] - binom_half_pmf_exact(k, n).unwrap();
                    assert!(rel_close(midp, want, 1e-13), "b={b} c={c} {midp} vs {want}");
                    let loader = 2.0 * binom_half_cdf(k, n) - binom_half_pmf(k, n);
                    assert!(rel_close(midp, loader, 1e-12), "b={b} c={c} {midp} vs {loader}");
                }
            }
        }
        // Large counts stay finite and below the exact p.
        for (b, c) in [(30000, 30500), (500, 700), (5, 40_000)] {
            let (exact, midp) = (mcnemar_exact(b, c).unwrap(), mcnemar_midp(b, c).unwrap());
            assert!(midp.is_finite() && midp <= exact && midp >= 0.0, "b={b} c={c}");
        }
        assert_eq!(mcnemar_midp(3, 12), mcnemar_midp(12, 3));
    }

    #[test]
    fn chi2_variants_match_statsmodels() {
        let corrected = mcnemar_chi2(12, 3, true).unwrap();
        assert!(rel_close(corrected.statistic, 64.0 / 15.0, 1e-14));
        assert!(rel_close(corrected.pvalue, 0.0388671, 1e-5));
        let plain = mcnemar_chi2(12, 3, false).unwrap();
        assert!(rel_close(plain.statistic, 5.4, 1e-14));
        assert!(rel_close(plain.pvalue, 0.0201368, 1e-5));
        // statsmodels does not clamp |b − c| − 1 at zero.
        let tied = mcnemar_chi2(10, 10, true).unwrap();
        assert!(rel_close(tied.statistic, 1.0 / 20.0, 1e-14));
        assert!(mcnemar_chi2(0, 0, true).is_none());
    }

    #[test]
    fn symmetric_in_b_and_c() {
        for (b, c) in [(12, 3), (25, 9), (0, 40), (1000, 1100), (30000, 30500)] {
            assert_eq!(mcnemar_exact(b, c), mcnemar_exact(c, b));
            assert_eq!(mcnemar_chi2(b, c, true), mcnemar_chi2(c, b, true));
        }
    }

    /// Independent log-space evaluation: ln C(n, i) from ln Γ, then log-sum-exp over the tail.
    fn log_space_reference(b: u64, c: u64) -> f64 {
        let n = b + c;
        let k = b.min(c);
        let ln_terms: Vec<f64> = (0..=k)
            .map(|i| ln_factorial(n) - ln_factorial(i) - ln_factorial(n - i) - n as f64 * std::f64::consts::LN_2)
            .collect();
        let max = ln_terms.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + ln_terms.iter().map(|t| (t - max).exp()).sum::<f64>().ln();
        (2.0 * lse.exp()).min(1.0)
    }

    #[test]
    fn large_counts_stay_finite_and_agree_with_log_space() {
        for (b, c) in [(30000, 30500), (500, 700), (1024, 1100), (100_000, 101_000), (5, 40_000)] {
            let p = mcnemar_exact(b, c).unwrap();
            assert!(p.is_finite() && (0.0..=1.0).contains(&p), "b={b} c={c} p={p}");
            let reference = log_space_reference(b, c);
            // ln Γ near 10^6 has absolute error ~1e-10, which bounds the reference's own accuracy.
            assert!(rel_close(p, reference, 1e-7), "b={b} c={c} p={p} ref={reference}");
        }
        // Normal approximation sanity check: z = (|b−c|−1)/√(b+c) ≈ 2.03.
        let p = mcnemar_exact(30000, 30500).unwrap();
        assert!(p > 0.03 && p < 0.05, "{p}");
        // Far tails underflow to 0 rather than producing NaN.
        assert_eq!(mcnemar_exact(0, 5000), Some(0.0));
    }
}
