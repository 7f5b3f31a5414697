//! Opt-in timing traces on standard error, for finding where a command's time goes.
//!
//! `CANDOR_STREAM_TRACE=1`: the stream's evaluations (consuming, rows built, feeding, the
//! archive sink's sort, file writes, snapshot and commit per epoch, saving, publishing).

use std::sync::OnceLock;

/// Whether `CANDOR_STREAM_TRACE` asks for the time of each step of the stream's evaluations
/// (read once per process).
pub fn stream() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("CANDOR_STREAM_TRACE").is_some())
}
