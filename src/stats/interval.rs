//! Confidence intervals for the accuracies of a category.
//!
//! - [`wilson`]: the Wilson score interval for one proportion (statsmodels'
//!   `proportion_confint(count, nobs, method="wilson")`). Unlike the Wald interval it stays inside
//!   [0, 1] and keeps its coverage at 0 or n successes, which small categories often have.
//!
//! The interval of their paired difference, built from two Wilson intervals, is
//! [`crate::stats::paired::newcombe_paired`].
//!
//! ```
//! use candor::stats::interval::{wilson, Z_95};
//! let (lo, hi) = wilson(0, 10, Z_95).unwrap();
//! assert_eq!(lo, 0.0);
//! assert!((hi - 0.2775327998628892).abs() < 1e-12); // z²/(n + z²)
//! ```

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
}
