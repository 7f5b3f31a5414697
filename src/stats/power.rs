//! Power of the exact McNemar test, and the smallest accuracy difference a study of a given
//! size can detect.
//!
//! A category with n pairs, each discordant with probability ψ, has a difference in accuracy
//! δ = P(b-type pair) − P(c-type pair) ∈ [−ψ, ψ]. The number of discordant pairs is
//! M ~ Binomial(n, ψ); given M = m, b ~ Binomial(m, (1 + δ/ψ)/2), and the exact test rejects
//! when min(b, m − b) ≤ k_m, the largest k with 2·P(X ≤ k) ≤ α under X ~ Binomial(m, ½) (no k
//! when m < 6 at α = 0.05). So the unconditional power is
//!
//!   power(δ) = Σ_m P(M = m) · [P(b ≤ k_m) + P(b ≥ m − k_m)],
//!
//! computed exactly (no normal approximation, which is poor at the small m of one category).
//! [`minimum_detectable_difference`] is the smallest |δ| with power ≥ the target (0.8 by
//! convention): below it a real difference is more likely missed than found. When even δ = ψ
//! (every discordant pair going the same way) has less power, the study cannot detect any
//! difference and the answer is `None`. This is what a 3-items-per-dataset quickstart says.
//!
//! ```
//! use candor::stats::power::minimum_detectable_difference;
//! // 6 pairs, all discordant: rejecting needs all 6 the same way, so power(δ) = π⁶ + (1 − π)⁶
//! // with π = (1 + δ)/2, and 80% needs π ≈ 0.8^(1/6).
//! let mdd = minimum_detectable_difference(6, 1.0, 0.05, 0.8).unwrap();
//! assert!((mdd - (2.0 * 0.8f64.powf(1.0 / 6.0) - 1.0)).abs() < 1e-6);
//! // Three items: no outcome is significant, whatever the models do.
//! assert_eq!(minimum_detectable_difference(3, 1.0, 0.05, 0.8), None);
//! ```

use super::mcnemar::{binom_pmf, mcnemar_exact};

/// The conventional power target.
pub const POWER: f64 = 0.8;

/// The largest k with exact two-sided McNemar p(k, m − k) ≤ α, or `None` when no table with m
/// discordant pairs is significant.
pub fn critical_count(m: u64, alpha: f64) -> Option<u64> {
    critical_counts(m, m, alpha)[0]
}

/// Whether the table (k, m − k) is significant at α.
fn significant(k: u64, m: u64, alpha: f64) -> bool {
    mcnemar_exact(k, m - k).is_some_and(|p| p <= alpha)
}

/// [`critical_count`] by binary search: p(k, m − k) grows with k up to m/2.
fn critical_count_searched(m: u64, alpha: f64) -> Option<u64> {
    if m == 0 || !significant(0, m, alpha) {
        return None;
    }
    let (mut lo, mut hi) = (0, m / 2);
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if significant(mid, m, alpha) { lo = mid } else { hi = mid - 1 }
    }
    Some(lo)
}

/// The critical counts of m = `lo` ..= `hi`, from a table kept per α for the whole process: a
/// critical count depends on (m, α) alone, and every family's power search asks for a few
/// hundred neighbouring m. The table grows from its end, each m's count found by stepping from
/// the previous m's, as far as it must (neighbouring m have close counts, so a few tests
/// instead of a binary search's ten); [`critical_count_searched`] agrees with it for every m
/// (tested).
fn critical_counts(lo: u64, hi: u64, alpha: f64) -> Vec<Option<u64>> {
    type Tables = Vec<(u64, Vec<Option<u64>>)>;
    static TABLES: std::sync::Mutex<Tables> = std::sync::Mutex::new(Vec::new());
    // Beyond this m the table is not kept (2^20 entries; the searches stay exact).
    const KEPT: u64 = 1 << 20;
    if hi >= KEPT {
        return (lo..=hi).map(|m| critical_count_searched(m, alpha)).collect();
    }
    let mut tables = TABLES.lock().unwrap_or_else(|p| p.into_inner());
    let at = match tables.iter().position(|(a, _)| *a == alpha.to_bits()) {
        Some(at) => at,
        None => {
            tables.push((alpha.to_bits(), Vec::new()));
            tables.len() - 1
        }
    };
    let table = &mut tables[at].1;
    while table.len() as u64 <= hi {
        let m = table.len() as u64;
        let k = match table.last().copied().flatten() {
            _ if m == 0 || !significant(0, m, alpha) => None,
            None => critical_count_searched(m, alpha),
            Some(previous) => {
                let mut k = previous.min(m / 2);
                if significant(k, m, alpha) {
                    while k < m / 2 && significant(k + 1, m, alpha) {
                        k += 1;
                    }
                } else {
                    while !significant(k, m, alpha) {
                        k -= 1;
                    }
                }
                Some(k)
            }
        };
        table.push(k);
    }
    table[lo as usize..=hi as usize].to_vec()
}

/// Unconditional power of the exact McNemar test at level α for n pairs with discordance ψ and
/// difference δ (|δ| ≤ ψ).
pub fn mcnemar_power(n: u64, discordance: f64, delta: f64, alpha: f64) -> f64 {
    let psi = discordance.clamp(0.0, 1.0);
    power_at(&rejection_table(n, psi, alpha), psi, delta)
}

/// What the power at every δ shares, for n pairs with discordance ψ at level α: for each
/// possible number m of discordant pairs that can reject, its critical count k_m and its
/// probability P(M = m). Computed once, it makes a search over δ cheap.
fn rejection_table(n: u64, psi: f64, alpha: f64) -> Vec<(u64, u64, f64)> {
    if n == 0 || psi == 0.0 {
        return Vec::new();
    }
    // M's mass beyond 12 standard deviations of its mean is below f64 resolution.
    let mean = n as f64 * psi;
    let sd = (mean * (1.0 - psi)).sqrt();
    let lo = (mean - 12.0 * sd - 2.0).floor().max(0.0) as u64;
    let hi = ((mean + 12.0 * sd + 2.0).ceil() as u64).min(n);
    let mut table = Vec::new();
    for (m, k) in (lo..=hi).zip(critical_counts(lo, hi, alpha)) {
        let Some(k) = k else { continue };
        let weight = binom_pmf(m, n, psi, 1.0 - psi);
        if weight == 0.0 {
            continue;
        }
        table.push((m, k, weight));
    }
    table
}

/// The power at δ from a [`rejection_table`].
fn power_at(table: &[(u64, u64, f64)], psi: f64, delta: f64) -> f64 {
    if table.is_empty() {
        return 0.0;
    }
    // π and 1 − π each from δ/ψ directly, so that neither loses digits to the other.
    let ratio = (delta.abs().min(psi) / psi).clamp(0.0, 1.0);
    let (pi, rho) = ((1.0 + ratio) / 2.0, (1.0 - ratio) / 2.0);
    let mut power = 0.0;
    for &(m, k, weight) in table {
        // P(b ≤ k) + P(b ≥ m − k) for b ~ Binomial(m, π); the two regions are disjoint since
        // k < m/2, and the upper one is P(m − b ≤ k) with m − b ~ Binomial(m, 1 − π).
        let reject = binom_cdf(k, m, pi, rho) + binom_cdf(k, m, rho, pi);
        power += weight * reject.min(1.0);
    }
    power.min(1.0)
}

/// The smallest |δ| (a proportion, ×100 for percentage points) that the exact McNemar test at
/// level α detects with probability ≥ `power` in n pairs with discordance ψ; `None` when no
/// δ ≤ ψ reaches it.
pub fn minimum_detectable_difference(n: u64, discordance: f64, alpha: f64, power: f64) -> Option<f64> {
    let psi = discordance.clamp(0.0, 1.0);
    let table = rejection_table(n, psi, alpha);
    let top = power_at(&table, psi, psi);
    if top < power {
        return None;
    }
    // Power rises with |δ| (the rejection region is symmetric and π moves away from ½), smoothly
    // (a polynomial in π): Brent's method finds where it crosses the target in about ten
    // evaluations, to 1e-13 (the reference, scipy's brentq, stops at 1e-12).
    let f = |delta: f64| power_at(&table, psi, delta) - power;
    let at_zero = f(0.0);
    if at_zero >= 0.0 {
        return Some(0.0);
    }
    Some(brent_root(f, 0.0, psi, at_zero, top - power, 1e-13))
}

/// P(X ≤ k) for X ~ Binomial(m, p), with q = 1 − p given as computed by the caller: the
/// terms on the short side of the mode summed from the largest, each from the last by the
/// ratio of successive probabilities, until further terms cannot change the sum; when k is at
/// or past the mode, one minus the upper tail summed the same way.
fn binom_cdf(k: u64, m: u64, p: f64, q: f64) -> f64 {
    if k >= m {
        return 1.0;
    }
    // The probabilities rise up to the mode ⌊(m + 1)p⌋ and fall after it.
    let mode = ((m + 1) as f64 * p).floor() as u64;
    let (odds, mf) = (q / p, m as f64);
    if k < mode {
        // Downward from k: P(j − 1)/P(j) = j/(m − j + 1) · q/p, to j = 0.
        let ratio = |i: u64| (i < k).then(|| (k - i) as f64 / (mf - (k - i) as f64 + 1.0) * odds);
        sum_terms(binom_pmf(k, m, p, q), ratio).min(1.0)
    } else {
        // Upward from k + 1: P(j + 1)/P(j) = (m − j)/(j + 1) · p/q, to j = m.
        let ratio = |i: u64| (k + 1 + i < m).then(|| (mf - (k + 1 + i) as f64) / ((k + 1 + i) as f64 + 1.0) / odds);
        (1.0 - sum_terms(binom_pmf(k + 1, m, p, q), ratio)).max(0.0)
    }
}

/// `first` plus the terms after it, each the one before times `ratio(i)` (i = 0, 1, …; None
/// past the end of the support), until a term is zero or cannot change the sum.
fn sum_terms(first: f64, ratio: impl Fn(u64) -> Option<f64>) -> f64 {
    let (mut term, mut sum) = (first, first);
    let mut i = 0;
    while term > 0.0 {
        let Some(r) = ratio(i) else { break };
        term *= r;
        let next = sum + term;
        if next == sum {
            break;
        }
        sum = next;
        i += 1;
    }
    sum
}

/// Brent's method (van Wijngaarden–Dekker–Brent, as in Numerical Recipes' `zbrent`): a root
/// of `f` in [a, b], where f(a) = `fa` and f(b) = `fb` have opposite signs, to within `tol`.
fn brent_root(f: impl Fn(f64) -> f64, mut a: f64, mut b: f64, mut fa: f64, mut fb: f64, tol: f64) -> f64 {
    if fb == 0.0 {
        return b;
    }
    let (mut c, mut fc) = (b, fb);
    let (mut d, mut e) = (b - a, b - a);
    for _ in 0..200 {
        if (fb > 0.0) == (fc > 0.0) {
            (c, fc) = (a, fa);
            d = b - a;
            e = d;
        }
        if fc.abs() < fb.abs() {
            (a, fa) = (b, fb);
            (b, fb) = (c, fc);
            (c, fc) = (a, fa);
        }
        let tol1 = 2.0 * f64::EPSILON * b.abs() + 0.5 * tol;
        let xm = 0.5 * (c - b);
        if xm.abs() <= tol1 || fb == 0.0 {
            return b;
        }
        if e.abs() >= tol1 && fa.abs() > fb.abs() {
            // Inverse quadratic interpolation (the secant step when only two points differ).
            let s = fb / fa;
            let (mut p, mut q) = if a == c {
                (2.0 * xm * s, 1.0 - s)
            } else {
                let (q, r) = (fa / fc, fb / fc);
                (s * (2.0 * xm * q * (q - r) - (b - a) * (r - 1.0)), (q - 1.0) * (r - 1.0) * (s - 1.0))
            };
            if p > 0.0 {
                q = -q;
            }
            p = p.abs();
            if 2.0 * p < (3.0 * xm * q - (tol1 * q).abs()).min((e * q).abs()) {
                e = d;
                d = p / q;
            } else {
                d = xm;
                e = d;
            }
        } else {
            // Bisection.
            d = xm;
            e = d;
        }
        (a, fa) = (b, fb);
        b += if d.abs() > tol1 { d } else { tol1.copysign(xm) };
        fb = f(b);
    }
    b
}

/// The minimum detectable difference printed beside a family's table, from each category's
/// (pairs, discordant pairs): n is the family's median category size (the lower middle one for
/// an even count) and ψ its pooled discordance, Σ(b + c)/Σn, at the paper's α and 80% power.
/// `None` when the family cannot detect any difference (or is empty).
pub fn family_minimum_detectable_difference(categories: &[(u64, u64)]) -> Option<f64> {
    let mut sizes: Vec<u64> = categories.iter().map(|c| c.0).filter(|&n| n > 0).collect();
    if sizes.is_empty() {
        return None;
    }
    sizes.sort_unstable();
    let n = sizes[(sizes.len() - 1) / 2];
    let discordant: u64 = categories.iter().map(|c| c.1.min(c.0)).sum();
    let total: u64 = categories.iter().map(|c| c.0).sum();
    // A pure function of three counts, asked again for every family an update touches (and
    // for every family when a statement reads them all): each answer is computed once. The
    // search takes milliseconds (a binomial table and 60 bisection steps).
    type Memo = std::collections::HashMap<(u64, u64, u64), Option<f64>>;
    static MEMO: std::sync::Mutex<Option<Memo>> = std::sync::Mutex::new(None);
    let key = (n, discordant, total);
    if let Some(known) = MEMO.lock().unwrap_or_else(|p| p.into_inner()).as_ref().and_then(|m| m.get(&key)) {
        return *known;
    }
    let mdd = minimum_detectable_difference(n, discordant as f64 / total as f64, super::paired::ALPHA, POWER);
    let mut memo = MEMO.lock().unwrap_or_else(|p| p.into_inner());
    let memo = memo.get_or_insert_with(Memo::new);
    if memo.len() >= 1 << 16 {
        memo.clear();
    }
    memo.insert(key, mdd);
    mdd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn critical_counts_by_hand() {
        // m ≤ 5: even 0 vs m has p = 2/2^m ≥ 1/16 > 0.05.
        for m in 0..=5 {
            assert_eq!(critical_count(m, 0.05), None, "m = {m}");
        }
        // m = 6: p(0, 6) = 1/32 ≤ 0.05 < p(1, 5) = 14/64.
        assert_eq!(critical_count(6, 0.05), Some(0));
        // m = 10: p(1, 9) = 22/1024 ≤ 0.05 < p(2, 8) = 112/1024.
        assert_eq!(critical_count(10, 0.05), Some(1));
        // m = 20: p(5, 15) = 0.0414 ≤ 0.05 < p(6, 14) = 0.1153.
        assert_eq!(critical_count(20, 0.05), Some(5));
    }

    #[test]
    fn the_kept_critical_counts_are_the_searched_ones() {
        // Asked out of order, from the middle first, at two levels.
        for alpha in [0.05, 0.01] {
            let middle = critical_counts(900, 1_000, alpha);
            let all = critical_counts(0, 3_000, alpha);
            assert_eq!(&all[900..=1_000], &middle[..]);
            for (m, k) in all.iter().enumerate() {
                assert_eq!(*k, critical_count_searched(m as u64, alpha), "m = {m}, α = {alpha}");
            }
        }
    }

    #[test]
    fn power_by_hand() {
        // n = 6, ψ = 1: M = 6 surely, reject iff b ∈ {0, 6}: π⁶ + (1 − π)⁶.
        for delta in [0.0, 0.3, 0.9] {
            let pi: f64 = (1.0 + delta) / 2.0;
            let want = pi.powi(6) + (1.0 - pi).powi(6);
            assert!((mcnemar_power(6, 1.0, delta, 0.05) - want).abs() < 1e-12, "δ = {delta}");
        }
        // Under δ = 0 the power is the test's size, at most α.
        for (n, psi) in [(50, 0.3), (200, 0.1), (1000, 0.05)] {
            let size = mcnemar_power(n, psi, 0.0, 0.05);
            assert!(size > 0.0 && size <= 0.05, "n = {n}: {size}");
        }
        // n = 2, ψ = ½: M ≤ 2, never significant.
        assert_eq!(mcnemar_power(2, 0.5, 0.5, 0.05), 0.0);
        assert_eq!(mcnemar_power(100, 0.0, 0.0, 0.05), 0.0);
    }

    #[test]
    fn minimum_detectable_difference_by_hand_and_by_monotonicity() {
        let mdd = minimum_detectable_difference(6, 1.0, 0.05, 0.8).unwrap();
        assert!((mdd - (2.0 * 0.8f64.powf(1.0 / 6.0) - 1.0)).abs() < 1e-9, "{mdd}");
        assert_eq!(minimum_detectable_difference(5, 1.0, 0.05, 0.8), None);
        assert_eq!(minimum_detectable_difference(500, 0.0, 0.05, 0.8), None);
        // More pairs detect smaller differences.
        let small = minimum_detectable_difference(100, 0.2, 0.05, 0.8).unwrap();
        let large = minimum_detectable_difference(1000, 0.2, 0.05, 0.8).unwrap();
        assert!(large < small && small <= 0.2, "{small} {large}");
        // At the answer the power is the target.
        assert!((mcnemar_power(1000, 0.2, large, 0.05) - 0.8).abs() < 1e-6);
        // Connor's (1987) normal approximation, √n·δ = z_{α/2}·√ψ + z_β·√(ψ − δ²), is close
        // at this size: δ ≈ 0.0396 for n = 1000, ψ = 0.2.
        assert!((large - 0.0396).abs() < 0.002, "{large}");
    }

    /// The power in its textbook form: statrs' binomial CDF and survival function (the
    /// regularized incomplete beta function), over every m.
    fn power_by_incomplete_beta(n: u64, psi: f64, delta: f64, alpha: f64) -> f64 {
        use statrs::distribution::{Binomial, Discrete, DiscreteCDF};
        let m_dist = Binomial::new(psi, n).unwrap();
        let pi = (1.0 + delta / psi) / 2.0;
        let mut power = 0.0;
        for m in 0..=n {
            let Some(k) = critical_count(m, alpha) else { continue };
            let b = Binomial::new(pi, m).unwrap();
            power += m_dist.pmf(m) * (b.cdf(k) + b.sf(m - k - 1));
        }
        power
    }

    #[test]
    fn power_matches_the_incomplete_beta_form() {
        for (n, psi) in [(6, 1.0), (50, 0.3), (260, 0.25), (2_000, 0.2), (3_000, 0.9), (20_000, 0.02)] {
            for frac in [0.0, 0.05, 0.3, 0.7, 0.97, 1.0] {
                let delta = frac * psi;
                let (fast, slow) = (mcnemar_power(n, psi, delta, 0.05), power_by_incomplete_beta(n, psi, delta, 0.05));
                // statrs forms each P(M = m) from ln Γ, whose absolute error (about 2000 ulps
                // of ln C(3000, m)) leaves its sum over m 1e-12 off 1; the sums agree to that.
                assert!((fast - slow).abs() < 1e-11, "n = {n}, ψ = {psi}, δ = {delta}: {fast} vs {slow}");
            }
        }
    }

    #[test]
    fn brent_finds_the_crossing_a_bisection_finds() {
        for (n, psi) in [(6, 1.0), (40, 0.4), (260, 0.25), (2_000, 0.2), (50_000, 0.03)] {
            let table = rejection_table(n, psi, 0.05);
            let (mut lo, mut hi) = (0.0, psi);
            for _ in 0..60 {
                let mid = (lo + hi) / 2.0;
                if power_at(&table, psi, mid) >= POWER { hi = mid } else { lo = mid }
            }
            let got = minimum_detectable_difference(n, psi, 0.05, POWER).unwrap();
            assert!((got - hi).abs() < 1e-12, "n = {n}, ψ = {psi}: {got} vs {hi}");
        }
    }

    #[test]
    fn a_remembered_family_answer_is_the_one_computed_afresh() {
        // Same median size and discordant count, other totals: each its own answer.
        for categories in [vec![(40, 10), (40, 6)], vec![(40, 10), (40, 6), (90, 0)], vec![(40, 16), (70, 0)]] {
            let n = 40;
            let discordant: u64 = categories.iter().map(|c: &(u64, u64)| c.1).sum();
            let total: u64 = categories.iter().map(|c| c.0).sum();
            let fresh =
                minimum_detectable_difference(n, discordant as f64 / total as f64, crate::stats::paired::ALPHA, POWER);
            for _ in 0..2 {
                assert_eq!(family_minimum_detectable_difference(&categories), fresh, "{categories:?}");
            }
        }
    }

    #[test]
    fn a_family_uses_its_median_category_and_pooled_discordance() {
        let k = |n: u64, b: u64, c: u64| (n, b + c);
        // Sizes 6, 6, 100 → median 6; discordance (6 + 6 + 0)/112 is far below 1, so 6 pairs
        // cannot reach 80% power.
        assert_eq!(family_minimum_detectable_difference(&[k(6, 3, 3), k(6, 6, 0), k(100, 0, 0)]), None);
        // Every pair discordant, median 6: the n = 6, ψ = 1 case.
        let got = family_minimum_detectable_difference(&[k(6, 6, 0), k(6, 0, 6), k(8, 4, 4)]).unwrap();
        assert!((got - (2.0 * 0.8f64.powf(1.0 / 6.0) - 1.0)).abs() < 1e-9);
        // Even count: the lower middle (100 of 100, 400).
        let fam = [k(100, 10, 10), k(400, 40, 40)];
        assert_eq!(family_minimum_detectable_difference(&fam), minimum_detectable_difference(100, 0.2, 0.05, 0.8));
        assert_eq!(family_minimum_detectable_difference(&[]), None);
    }
}
