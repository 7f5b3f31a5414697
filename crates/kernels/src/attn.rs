//! Rotary embeddings and causal attention on the CPU, over plain `f32` buffers.
//!
//! The layout is the one the llama graph of `candor::generate::candle::llama` keeps: query,
//! key and value rows `[tokens, heads, head_dim]` row-major, and each sequence's key/value
//! cache `[len, kv_heads, head_dim]`, appended in place. Grouped query heads read their shared
//! key/value head without copying it.

use std::ops::Range;

/// How a head's dimensions are paired for rotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeLayout {
    /// Pairs `(2i, 2i + 1)`: GGUF llama.
    Interleaved,
    /// Pairs `(i, i + half)`: HF llama and Qwen2 ("NeoX").
    Halves,
}

/// Rotates every head of every row of `x` (`[rows, heads, head_dim]`) in place; row `r` is at
/// position `positions[r]`, whose tables are `cos[p * head_dim / 2..][..head_dim / 2]` (and
/// the same in `sin`).
pub fn rope(
    x: &mut [f32],
    heads: usize,
    head_dim: usize,
    positions: &[usize],
    cos: &[f32],
    sin: &[f32],
    layout: RopeLayout,
) {
    let half = head_dim / 2;
    for (row, &p) in x.chunks_exact_mut(heads * head_dim).zip(positions) {
        let (c, s) = (&cos[p * half..(p + 1) * half], &sin[p * half..(p + 1) * half]);
        for head in row.chunks_exact_mut(head_dim) {
            rotate(head, c, s, layout);
        }
    }
}

fn rotate(head: &mut [f32], cos: &[f32], sin: &[f32], layout: RopeLayout) {
    let half = cos.len();
    match layout {
        RopeLayout::Interleaved => {
            for i in 0..half {
                let (a, b) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = a * cos[i] - b * sin[i];
                head[2 * i + 1] = a * sin[i] + b * cos[i];
            }
        }
        RopeLayout::Halves => {
            for i in 0..half {
                let (a, b) = (head[i], head[i + half]);
                head[i] = a * cos[i] - b * sin[i];
                head[i + half] = a * sin[i] + b * cos[i];
            }
        }
    }
}

/// The shape of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    pub query: usize,
    pub kv: usize,
    pub dim: usize,
}

/// Causal attention of query rows `q` (`[rows, query heads, head_dim]`, already rotated).
/// Row `r` belongs to sequence `rows[r].0` at position `rows[r].1` and attends to positions
/// `0..=rows[r].1` of that sequence's cache `caches[s] = (keys, values)`, which must already
/// hold them. Returns `[rows, query heads * head_dim]`. The work, one item per (row, head), is
/// spread over the [`crate::pool`] unless it is too small to pay for waking it.
pub fn attend(q: &[f32], rows: &[(usize, usize)], caches: &[(&[f32], &[f32])], heads: Heads) -> Vec<f32> {
    let Heads { query: nh, kv: nkv, dim: hd } = heads;
    let rep = nh / nkv;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut y = vec![0f32; rows.len() * nh * hd];
    let y_addr = y.as_mut_ptr() as usize;
    let work = |items: Range<usize>| {
        let mut scores = Vec::new();
        for item in items {
            let (row, h) = (item / nh, item % nh);
            let (s, p) = rows[row];
            let (kc, vc) = caches[s];
            let g = h / rep;
            let qrow = &q[row * nh * hd + h * hd..][..hd];
            scores.clear();
            let mut max = f32::NEG_INFINITY;
            for j in 0..=p {
                let sc = dot(qrow, &kc[(j * nkv + g) * hd..][..hd]) * scale;
                max = max.max(sc);
                scores.push(sc);
            }
            let mut sum = 0f32;
            for sc in scores.iter_mut() {
                *sc = (*sc - max).exp();
                sum += *sc;
            }
            // SAFETY: `item < rows.len() * nh`, so `y[item * hd..][..hd]` is inside `y`
            // (`rows.len() * nh * hd` values). `y` is not otherwise used until the work is done
            // (`pool::run` returns or unwinds only once no thread is in `work`), and each item
            // runs once, item (row, h) alone writing those `hd` values: this slice aliases
            // nothing.
            let out = unsafe { std::slice::from_raw_parts_mut((y_addr as *mut f32).add(item * hd), hd) };
            for (j, &w) in scores.iter().enumerate() {
                axpy(w / sum, &vc[(j * nkv + g) * hd..][..hd], out);
            }
        }
    };
    let items = rows.len() * nh;
    let flops: usize = rows.iter().map(|&(_, p)| (p + 1) * hd * 4).sum::<usize>() * nh;
    if flops < 200_000 {
        // Small steps run inline: waking the pool costs more than the work.
        work(0..items);
    } else {
        crate::pool::run(items, work);
    }
    y
}

/// Dot product with eight independent accumulators, so the compiler vectorises it.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `out += w * x`.
fn axpy(w: f32, x: &[f32], out: &mut [f32]) {
    for (o, v) in out.iter_mut().zip(x) {
        *o += w * v;
    }
}
