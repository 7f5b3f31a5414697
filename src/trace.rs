//! Opt-in timing traces on standard error, for finding where a command's time goes.
//!
//! `CANDOR_STREAM_TRACE=1`: the stream's evaluations (consuming, rows built, feeding, the
//! archive sink's sort, file writes, snapshot and commit per epoch, saving, publishing).
//! `CANDOR_STATS_TRACE=1`: the statistics' phases in `candor bench stats` (read, apply,
//! refresh, refit with its item table, reports) and resident memory after each.

use std::sync::OnceLock;

/// Whether `CANDOR_STREAM_TRACE` asks for the time of each step of the stream's evaluations
/// (read once per process).
pub fn stream() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("CANDOR_STREAM_TRACE").is_some())
}

/// Whether `CANDOR_STATS_TRACE` asks for the time and memory of each phase of the statistics.
pub fn stats() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("CANDOR_STATS_TRACE").is_some())
}
