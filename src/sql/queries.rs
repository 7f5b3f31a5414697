//! The SQL reports, one `.sql` file each in `queries/` (compiled in, documented at their top).

/// A named query of `queries/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Query {
    pub name: &'static str,
    pub sql: &'static str,
}

macro_rules! query {
    ($name:literal) => {
        Query { name: $name, sql: include_str!(concat!("../../queries/", $name, ".sql")) }
    };
}

/// Per-category McNemar statistics with BH per family, from `paired_counts`.
pub const FAMILY_STATS: Query = query!("family_stats");
/// The maintained per-family table in report order.
pub const FAMILY_TABLE: Query = query!("family_table");
/// Paired counts from scratch, from `observations`.
pub const PAIRED_COUNTS: Query = query!("paired_counts");
/// Error rates by model × checkpoint × dataset × amendment × prompt type.
pub const ERROR_RATES: Query = query!("error_rates");
/// Error rate with versus without a user belief.
pub const SYCOPHANCY: Query = query!("sycophancy");
/// Refusals and exclusions.
pub const REFUSALS: Query = query!("refusals");
/// Paired accuracy across checkpoints.
pub const TRAJECTORIES: Query = query!("trajectories");
/// Each fine-tuned checkpoint paired against the previous one (step against step), from `observations`.
pub const TRAJECTORY_STEPS: Query = query!("trajectory_steps");
/// The first step at which each family line turns significant against the base.
pub const TRAJECTORY_FIRST_SIGNIFICANT: Query = query!("trajectory_first_significant");
/// Cell counts the regressions are fitted from.
pub const REGRESSION_CELLS: Query = query!("regression_cells");
/// SocioT warmth by model × checkpoint × query type, from `warmth`.
pub const WARMTH_BY_TYPE: Query = query!("warmth_by_type");
/// SocioT warmth across checkpoints, from `warmth`.
pub const WARMTH_TRAJECTORY: Query = query!("warmth_trajectory");

/// Fine-tuned vs original error per dataset × amendment × belief (the report's Fig. 2 scatter).
pub const ERROR_PAIRS: Query = query!("error_pairs");
/// Pooled paired error difference by test type and amendment, with 95% CIs (the forest plot).
pub const AMENDMENT_EFFECTS: Query = query!("amendment_effects");
/// Error without a belief, with a correct one doubted, with an incorrect one asserted.
pub const BELIEF_ERRORS: Query = query!("belief_errors");
/// Errors per checkpoint × amendment type × prompt type.
pub const CONDITION_ERRORS: Query = query!("condition_errors");
/// One summary row: answers, answers in the statistics, exclusions, models, checkpoints.
pub const ARCHIVE_SUMMARY: Query = query!("archive_summary");

/// One row per discordant pair (the items behind each b and c), with prompts, answers and verdicts.
pub const DISCORDANT_PAIRS: Query = query!("discordant_pairs");

/// Per family-table cell, agreement of a second judge with the first on the cell's answers.
pub const JUDGE_CELLS: Query = query!("judge_cells");

/// The reports `candor analyze` prints and exports, in order.
pub const REPORTS: [Query; 5] = [FAMILY_TABLE, ERROR_RATES, SYCOPHANCY, REFUSALS, TRAJECTORIES];
