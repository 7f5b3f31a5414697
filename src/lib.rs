//! Candor: a streaming evaluator of accuracy and sycophancy across model checkpoints.
//!
//! Records flow `datasets → amend → generate → score → stats/sql → sinks`; each stream has one
//! Arrow schema in `schemas/`, and the dataflow's logical time is the checkpoint.

pub mod amend;
pub mod archive;
pub mod bench;
pub mod cli;
pub mod conditions;
pub mod config;
pub mod dataflow;
pub mod datasets;
pub mod error;
pub mod generate;
pub mod identity;
pub mod import;
pub mod model;
pub mod records;
pub mod report;
pub mod schema;
pub mod score;
pub mod serve;
pub mod sql;
pub mod stats;
pub mod stream;
pub mod warmth;
