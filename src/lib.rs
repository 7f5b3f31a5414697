//! Candor: a streaming evaluator of accuracy and sycophancy across model checkpoints.
//!
//! Records flow `datasets → amend → generate → score → stats/sql → sinks`; each stream has one
//! Arrow schema in `schemas/`, and the dataflow's logical time is the checkpoint. The `candor`
//! binary adds the command line (`src/cli.rs`, `src/commands/`) and the benchmarks (`src/bench/`).

pub mod amend;
pub mod archive;
pub mod conditions;
pub mod config;
pub mod dataflow;
pub mod datasets;
pub mod error;
pub mod generate;
pub mod grid;
pub mod identity;
pub mod import;
pub mod model;
pub mod records;
pub mod report;
pub mod runtime;
pub mod schema;
pub mod score;
pub mod serve;
pub mod sql;
pub mod stats;
pub mod stream;
pub mod warmth;
