//! Scoring: refusal rules and how refusals enter the statistics; judges later.

pub mod refusal;

pub use refusal::{RefusalMode, RefusalRules, refusal_handling};
