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
/// Cell counts the regressions are fitted from.
pub const REGRESSION_CELLS: Query = query!("regression_cells");
/// SocioT warmth by model × checkpoint × query type, from `warmth`.
pub const WARMTH_BY_TYPE: Query = query!("warmth_by_type");
/// SocioT warmth across checkpoints, from `warmth`.
pub const WARMTH_TRAJECTORY: Query = query!("warmth_trajectory");

/// The reports `candor analyze` prints and exports, in order.
pub const REPORTS: [Query; 5] = [FAMILY_TABLE, ERROR_RATES, SYCOPHANCY, REFUSALS, TRAJECTORIES];
