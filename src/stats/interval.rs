//! Confidence intervals for the accuracies of a category and for their paired difference.
//!
//! - [`wilson`]: the Wilson score interval for one proportion (statsmodels'
//!   `proportion_confint(count, nobs, method="wilson")`). Unlike the Wald interval it stays inside
//!   [0, 1] and keeps its coverage at 0 or n successes, which small categories often have.
//! - [`newcombe_paired`]: Newcombe's (1998) square-and-add interval for the difference of two
//!   *paired* proportions (his method 10), built from the two Wilson intervals and the
//!   correlation φ of the paired outcomes, with his continuity-corrected φ. It is the interval
//!   Fagerland, Lydersen & Laake (*Statistical Analysis of Contingency Tables*, 2017, ch. 8)
//!   recommend for paired 2×2 tables; the Wald interval of the forest plot can leave [−1, 1]
//!   and collapses to a point when b = c = 0.
//!
//! Candor's difference is fine-tuned minus base accuracy, (c − b)/n.
//!
//! ```
//! use candor::stats::interval::{newcombe_paired, wilson, Z_95};
//! use candor::stats::paired::PairedCounts;
//! let (lo, hi) = wilson(0, 10, Z_95).unwrap();
//! assert_eq!(lo, 0.0);
//! assert!((hi - 0.2775327998628892).abs() < 1e-12); // z²/(n + z²)
//! // Fagerland et al.'s worked example (Cavo et al. 2012): −0.0621 (−0.1186 to −0.0046).
//! let cavo = PairedCounts { both_correct: 59, b: 16, c: 6, both_wrong: 80 };
//! let (lo, hi) = newcombe_paired(&cavo, Z_95).unwrap();
//! assert!((lo + 0.1186).abs() < 5e-5 && (hi + 0.0046).abs() < 5e-5);
//! ```

use super::paired::PairedCounts;

/// The standard normal 97.5% quantile, Φ⁻¹(0.975), for 95% intervals (scipy's `norm.ppf(0.975)`).
pub const Z_95: f64 = 1.959_963_984_540_054;

/// Wilson score interval for `successes` out of `n` at the two-sided level given by `z`;
/// `None` when n = 0 or successes > n.
pub fn wilson(successes: u64, n: u64, z: f64) -> Option<(f64, f64)> {
    if n == 0 || successes > n {
        return None;
    }
    let (x, nf, z2) = (successes as f64, n as f64, z * z);
    let center = (x + z2 / 2.0) / (nf + z2);
    let half = z / (nf + z2) * (x * (nf - x) / nf + z2 / 4.0).sqrt();
    // At 0 or n successes the bound is exactly 0 or 1; rounding must not leave it at ±1e-17.
    let lo = if successes == 0 { 0.0 } else { (center - half).max(0.0) };
    let hi = if successes == n { 1.0 } else { (center + half).min(1.0) };
    Some((lo, hi))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn wilson_hand_computed_cases() {
        // 0 of n: [0, z²/(n + z²)]; n of n: [n/(n + z²), 1].
        let z2 = Z_95 * Z_95;
        let (lo, hi) = wilson(0, 10, Z_95).unwrap();
        assert!(lo == 0.0 && close(hi, z2 / (10.0 + z2), 1e-15));
        let (lo, hi) = wilson(10, 10, Z_95).unwrap();
        assert!(close(lo, 10.0 / (10.0 + z2), 1e-15) && hi == 1.0);
        // Half of n is centred on ½: ½ ± z/(n + z²)·√(n/4 + z²/4).
        let (lo, hi) = wilson(50, 100, Z_95).unwrap();
        let half = Z_95 / (100.0 + z2) * (25.0 + z2 / 4.0f64).sqrt();
        assert!(close(lo, 0.5 - half, 1e-15) && close(hi, 0.5 + half, 1e-15));
        // statsmodels proportion_confint(7, 20, method="wilson") = (0.1811918241, 0.5671457233).
        let (lo, hi) = wilson(7, 20, Z_95).unwrap();
        assert!(close(lo, 0.181_191_824_101_082, 1e-12) && close(hi, 0.567_145_723_314_763_8, 1e-12), "{lo} {hi}");
        assert_eq!(wilson(1, 0, Z_95), None);
        assert_eq!(wilson(3, 2, Z_95), None);
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
