//! The CPU kernels of Candor's candle backend, in their own crate so that they are compiled
//! with optimisations even in a debug build of Candor (the workspace's dev profile gives this
//! crate `opt-level = 3`, as it does candle-core): a model decoded by unoptimised loops is tens
//! of times slower, which made debug-build tests that run a model stall.
//!
//! Every function here that loops over numbers is an ordinary (non-generic, non-`#[inline]`)
//! function, so it is compiled in this crate, with this crate's optimisation level, rather
//! than instantiated in the caller's.
//!
//! - [`quant`]: Q4_1 and Q8_0 weights times f32 activations with AVX2, as llama.cpp computes them.
//! - [`attn`]: rotary embeddings and causal attention read in place from per-sequence caches.
//! - [`pool`]: the work-sharing thread pool both run on.
//!
//! Every `unsafe` block states the invariant it relies on in a `// SAFETY:` comment.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod attn;
pub mod pool;
pub mod quant;

#[cfg(test)]
mod tests;
