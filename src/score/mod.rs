//! Scoring: refusal rules now; judges later.

pub mod refusal;
