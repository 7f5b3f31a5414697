//! Candor: a streaming evaluator of accuracy and sycophancy across model checkpoints.
//!
//! Records flow `datasets → amend → generate → score → stats/sql → sinks`; each stream has one
//! Arrow schema in `schemas/`, and the dataflow's logical time is the checkpoint. The `candor`
//! binary adds the command line (`src/cli.rs`, `src/commands/`) and the benchmarks (`src/bench/`).
//!
//! **What a program embeds** (the documented surface): [`datasets`], [`amend`], [`generate`],
//! [`score`], [`stats`], [`sql`] and [`archive`], with the shared types they speak
//! ([`records`], [`schema`], [`conditions`], [`identity`], [`model`], [`config`], [`error`],
//! [`runtime`]). The rest is the binary's machinery (the dataflow engine, the stream, the
//! servers, the report, import, the grid, warmth): public only because the binary is a
//! separate crate, hidden from the documentation, and free to change.

pub mod amend;
pub mod archive;
pub mod conditions;
pub mod config;
pub mod datasets;
pub mod error;
pub mod generate;
pub mod identity;
pub mod model;
pub mod records;
pub mod runtime;
pub mod schema;
pub mod score;
pub mod sql;
pub mod stats;
pub mod trace;

#[doc(hidden)]
pub mod dataflow;
#[doc(hidden)]
pub mod grid;
#[doc(hidden)]
pub mod import;
#[doc(hidden)]
pub mod report;
#[doc(hidden)]
pub mod serve;
#[doc(hidden)]
pub mod stream;
#[doc(hidden)]
pub mod warmth;
