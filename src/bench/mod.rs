//! `candor bench`: figures for the closing notes and the README, never timed tests. Each
//! benchmark is a file named as its subcommand (`candor bench warmth` lives with the warmth
//! command, in `commands/warmth.rs`). They are part of the binary only: the library does not
//! carry them.

pub mod generate;
pub mod pg;
pub mod report;
pub mod score;
pub mod serve;
pub mod spine;
pub mod stats;
pub mod stream;
pub mod watch;

/// The paper's grid: the four open-ended datasets at 500/500/500/125 items, paper templates.
pub const PAPER_GRID: &str = r#"
name = "bench-paper-grid"
seed = 2026
template_style = "paper"
[datasets.trivia]
n = 500
[datasets.truthfulqa]
n = 500
[datasets.medqa]
n = 500
[datasets.disinfo]
n = 125
"#;

/// Peak resident memory of this process so far, in MiB (Linux `VmHWM`).
pub fn peak_rss_mib() -> Option<f64> {
    status_mib("VmHWM:")
}

/// This process's resident memory now, in MiB (Linux only).
pub fn rss_mib() -> Option<f64> {
    status_mib("VmRSS:")
}

fn status_mib(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Resets this process's peak resident memory (`VmHWM`) to its current size, so a figure
/// taken later covers only what ran in between. Linux only; elsewhere it does nothing.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The median of the figures (the upper one of an even count).
pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// The `q` quantile of sorted figures (the nearest rank); NaN when there are none.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// User and system CPU seconds of this process so far.
pub fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return f64::NAN;
    }
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}
