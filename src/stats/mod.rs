//! The statistics of the paper, as a pure library over counts.
//!
//! - [`mcnemar`]: exact, mid-p (and χ²) McNemar tests on discordant pairs, overflow-free at any size.
//! - [`bh`]: Benjamini–Hochberg adjustment with statsmodels' exact semantics.
//! - [`effect`]: effect sizes, including the paper's mislabelled "Cohen's g" under an honest name.
//! - [`interval`]: Wilson intervals for each accuracy.
//! - [`paired`]: the paired-count monoid kept per category, Newcombe's paired interval of the
//!   accuracy difference, and the per-family results.
//! - [`power`]: power of the exact McNemar test and the minimum detectable difference.
//! - [`glm`]: binomial-logit regression from cell counts, with Wald tests, linear combinations,
//!   counterfactual average marginal effects, and item-clustered (sandwich) covariances.
//! - [`models`]: the paper's regressions M1–M4 over a table of cell counts.
//!
//! Nothing here knows about dataflows or tables: operators feed counts in and read results out.
//!
//! ```
//! use candor::stats::paired::{family, PairedCounts, ALPHA};
//! let counts = PairedCounts { both_correct: 80, b: 12, c: 3, both_wrong: 5 };
//! let stats = family(&[counts], ALPHA).unwrap();
//! assert_eq!(stats[0].p_exact, Some(0.03515625));
//! ```

pub mod bh;
pub mod effect;
pub mod glm;
pub mod interval;
pub mod mcnemar;
pub mod models;
pub mod paired;
pub mod power;
