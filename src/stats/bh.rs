//! Benjamini–Hochberg false-discovery-rate adjustment over one family of p-values.
//!
//! Follows statsmodels' `fdrcorrection(p, alpha, method='indep')` step for step so results agree
//! bit for bit: sort ascending, adjusted = p / (rank/m), reverse cumulative minimum, clip at 1;
//! reject every hypothesis up to the largest rank with p ≤ (rank/m)·α (step-up, `<=`).
//! Missing p-values (`None` or NaN, a category with no discordant pairs) are not part of the
//! family: m counts only the present ones, and their output is `None`.
//!
//! ```
//! use candor::stats::bh::benjamini_hochberg;
//! let out = benjamini_hochberg(&[Some(0.01), None, Some(0.04), Some(0.03)], 0.05);
//! assert!(out[1].is_none());
//! let first = out[0].unwrap();
//! assert!((first.p_adjusted - 0.03).abs() < 1e-15 && first.reject);
//! ```

/// The adjusted p-value of one hypothesis and whether it is rejected at the family's α.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Adjusted {
    pub p_adjusted: f64,
    pub reject: bool,
}

/// Adjusts a family of p-values; the output is in input order, `None` where the input was missing.
pub fn benjamini_hochberg(pvalues: &[Option<f64>], alpha: f64) -> Vec<Option<Adjusted>> {
    let mut present: Vec<(usize, f64)> =
        pvalues.iter().enumerate().filter_map(|(i, p)| p.filter(|p| !p.is_nan()).map(|p| (i, p))).collect();
    let mut out = vec![None; pvalues.len()];
    let m = present.len();
    if m == 0 {
        return out;
    }
    // Ties get identical adjusted values through the cumulative minimum, so sort stability
    // (numpy uses an unstable sort) cannot change the result.
    present.sort_by(|a, b| a.1.total_cmp(&b.1));
    let mf = m as f64;
    let ecdf = |rank0: usize| (rank0 + 1) as f64 / mf;

    let last_rejected = present.iter().enumerate().rposition(|(r, &(_, p))| p <= ecdf(r) * alpha);

    let mut running_min = f64::INFINITY;
    for r in (0..m).rev() {
        let (idx, p) = present[r];
        running_min = running_min.min(p / ecdf(r));
        out[idx] =
            Some(Adjusted { p_adjusted: running_min.min(1.0), reject: last_rejected.is_some_and(|last| r <= last) });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * a.abs().max(b.abs())
    }

    fn run(p: &[f64]) -> (Vec<f64>, Vec<bool>) {
        let input: Vec<Option<f64>> = p.iter().map(|&p| Some(p)).collect();
        let out = benjamini_hochberg(&input, 0.05);
        let adj = out.iter().map(|a| a.unwrap().p_adjusted).collect();
        let rej = out.iter().map(|a| a.unwrap().reject).collect();
        (adj, rej)
    }

    #[test]
    fn example_a_benjamini_hochberg_1995() {
        let p = [
            0.0001, 0.0004, 0.0019, 0.0095, 0.0201, 0.0278, 0.0298, 0.0344, 0.0459, 0.3240, 0.4262, 0.5719, 0.6528,
            0.7590, 1.000,
        ];
        let want = [
            0.0015,
            0.003,
            0.0095,
            0.035625,
            0.0603,
            0.0298 * 15.0 / 7.0,
            0.0298 * 15.0 / 7.0,
            0.0645,
            0.0765,
            0.486,
            0.4262 * 15.0 / 11.0,
            0.5719 * 15.0 / 12.0,
            0.6528 * 15.0 / 13.0,
            0.7590 * 15.0 / 14.0,
            1.0,
        ];
        let (adj, rej) = run(&p);
        for (i, (&a, &w)) in adj.iter().zip(&want).enumerate() {
            assert!(close(a, w, 1e-12), "rank {i}: {a} vs {w}");
        }
        // Printed oracle digits as a second check on the closed forms above.
        for (a, w) in adj[10..14].iter().zip([0.581182, 0.714875, 0.753231, 0.813214]) {
            assert!(close(*a, w, 1e-6));
        }
        assert_eq!(rej.iter().filter(|&&r| r).count(), 4);
        assert!(rej[..4].iter().all(|&r| r));
    }

    #[test]
    fn example_b_unsorted_with_boundary_ties() {
        let (adj, rej) = run(&[0.01, 0.04, 0.03, 0.005, 0.20]);
        for (a, w) in adj.iter().zip([0.025, 0.05, 0.05, 0.025, 0.2]) {
            assert!(close(*a, w, 1e-12), "{a} vs {w}");
        }
        assert_eq!(rej, [true, true, true, true, false]);
    }

    #[test]
    fn example_b_is_bit_exact_with_numpy_division() {
        let (adj, _) = run(&[0.01, 0.04, 0.03, 0.005, 0.20]);
        assert_eq!(adj[1], 0.04 / (4.0 / 5.0));
    }

    #[test]
    fn example_c_step_up_stops_at_two() {
        let (adj, rej) = run(&[0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205, 0.212, 0.216]);
        let want = [0.01, 0.04, 0.084, 0.084, 0.084, 0.1, 0.074 / 0.7, 0.216, 0.216, 0.216];
        for (a, w) in adj.iter().zip(want) {
            assert!(close(*a, w, 1e-12), "{a} vs {w}");
        }
        assert!(close(adj[6], 0.105714, 1e-5));
        assert_eq!(rej, [true, true, false, false, false, false, false, false, false, false]);
    }

    #[test]
    fn missing_values_are_left_out_of_the_family() {
        let with_gaps = benjamini_hochberg(
            &[Some(0.01), None, Some(0.04), Some(f64::NAN), Some(0.03), Some(0.005), Some(0.20)],
            0.05,
        );
        let (adj, rej) = run(&[0.01, 0.04, 0.03, 0.005, 0.20]);
        let kept: Vec<_> = with_gaps.iter().flatten().copied().collect();
        assert!(with_gaps[1].is_none() && with_gaps[3].is_none());
        assert_eq!(kept.iter().map(|a| a.p_adjusted).collect::<Vec<_>>(), adj);
        assert_eq!(kept.iter().map(|a| a.reject).collect::<Vec<_>>(), rej);
        assert!(benjamini_hochberg(&[None, None], 0.05).iter().all(Option::is_none));
    }
}
