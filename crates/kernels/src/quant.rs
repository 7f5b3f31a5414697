//! Q4_1 and Q8_0 weights times f32 activations on the CPU, the way llama.cpp computes them.
//!
//! SmolLM2's GGUF holds its layers in Q4_1 and its tied embedding / output projection in Q8_0.
//! candle 0.11 has no SIMD kernel for GGUF's Q4_1: its scalar dot product
//! is several times slower than an f32 matmul, so such weights used to be expanded to f32 at
//! load, which reads 6.4x more bytes per decoded token (f32 against 5 bits a weight) and holds
//! 6.4x the memory. This module keeps the Q4_1 blocks as they are in the file and multiplies
//! them with AVX2: each row of activations is quantized to 8 bits per block of 32 (llama.cpp's
//! Q8_1: a scale and the block's scaled sum), and a weight block times an activation block is
//! `d_w·d_x·Σ q_w q_x + m_w·s_x`, integer products summed by `maddubs`/`madd`. The numerics are
//! those of llama.cpp on the same file (activations rounded to 8 bits), not of the f32 path.
//!
//! Q8_0 (which candle does run with AVX2) goes through the same tiling and thread pool, so the
//! output projection, a fifth of a decode step's weights, reuses each weight block for 4
//! sequences too; and the embedding lookup expands single rows of it instead of holding an
//! f32 copy of the vocabulary (113 MB for SmolLM2).
//!
//! Every output element is one dot product of one activation row with one weight row,
//! whatever else is in the batch, so a sequence's result does not depend on the batch (bit for
//! bit). The work is spread over candle's CPU threads in tiles of up to 4 activation rows by 32
//! weight rows, so a weight block is decoded once for 4 rows.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Result, Tensor};
use half::f16;

const QK: usize = 32;

/// A GGUF Q4_1 block: scale, minimum, 32 four-bit values (value `i` in the low nibble of byte
/// `i`, value `i + 16` in its high nibble).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct BlockQ41 {
    d: f16,
    m: f16,
    qs: [u8; QK / 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ41>() == 20);

/// A GGUF Q8_0 block: scale, 32 signed bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct BlockQ80 {
    d: f16,
    qs: [i8; QK],
}

/// An activation block: scale, scale times the sum of the values, 32 signed bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct BlockQ81 {
    d: f32,
    s: f32,
    qs: [i8; QK],
}

#[derive(Clone, Debug)]
enum Blocks {
    Q41(Vec<BlockQ41>),
    Q80(Vec<BlockQ80>),
}

/// A `[out, in]` Q4_1 or Q8_0 matrix, kept quantized.
///
/// A `QMatrix` exists only on a CPU that runs the kernels ([`supported`]): its constructor
/// [`QMatrix::from_qtensor`] refuses any other, and [`QMatrix::concat`] and `clone` start from
/// an existing one. [`QMatrix::forward`] runs the AVX2/FMA/F16C kernels on the strength of that.
#[derive(Clone, Debug)]
pub struct QMatrix {
    rows: usize,
    cols: usize,
    blocks: Blocks,
}

/// The types this module runs.
pub fn handles(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q8_0)
}

/// Whether this CPU runs the kernels (AVX2, FMA, F16C); elsewhere Q4_1 is dequantized.
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl QMatrix {
    /// Takes a 2-d Q4_1 or Q8_0 tensor's blocks; its inner dimension must be a multiple of 32.
    /// An error on a CPU without AVX2, FMA and F16C (see [`supported`]).
    pub fn from_qtensor(q: &QTensor) -> Result<Self> {
        Self::from_qtensor_on(q, supported())
    }

    /// [`QMatrix::from_qtensor`] on a CPU that runs the kernels or not (`cpu_supported`, which
    /// must be `false` unless [`supported`] is true: the tests pass `false` to check the refusal).
    pub(crate) fn from_qtensor_on(q: &QTensor, cpu_supported: bool) -> Result<Self> {
        if !cpu_supported {
            candle_core::bail!(
                "Candor's quantized matmul kernels need a CPU with AVX2, FMA and F16C, which this one lacks \
                 (dequantize the weights or use candle's kernels instead)"
            );
        }
        let (rows, cols) = q.shape().dims2()?;
        if !cols.is_multiple_of(QK) {
            candle_core::bail!("rows of {cols} values are not whole blocks");
        }
        let data = q.data()?;
        let n = rows * cols / QK;
        let size = match q.dtype() {
            GgmlDType::Q4_1 => 20,
            GgmlDType::Q8_0 => 34,
            other => candle_core::bail!("expected a Q4_1 or Q8_0 tensor, got {other:?}"),
        };
        if data.len() != n * size {
            candle_core::bail!("{:?} tensor holds {} bytes, expected {}", q.dtype(), data.len(), n * size);
        }
        let h = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]);
        let blocks = match q.dtype() {
            GgmlDType::Q4_1 => Blocks::Q41(
                data.chunks_exact(20)
                    .map(|b| BlockQ41 { d: h(&b[0..2]), m: h(&b[2..4]), qs: b[4..20].try_into().expect("16 bytes") })
                    .collect(),
            ),
            _ => Blocks::Q80(
                data.chunks_exact(34)
                    .map(|b| BlockQ80 { d: h(&b[0..2]), qs: std::array::from_fn(|i| b[2 + i] as i8) })
                    .collect(),
            ),
        };
        Ok(QMatrix { rows, cols, blocks })
    }

    /// The matrices' rows one after another (projections of the same input, run as one
    /// matmul); `None` unless they all have the same number of columns.
    pub fn concat(parts: &[&QMatrix]) -> Option<Self> {
        let cols = parts.first()?.cols;
        if parts.iter().any(|p| p.cols != cols) {
            return None;
        }
        let blocks = match &parts[0].blocks {
            Blocks::Q41(_) => Blocks::Q41(
                parts
                    .iter()
                    .map(|p| match &p.blocks {
                        Blocks::Q41(b) => Some(b.iter().copied()),
                        Blocks::Q80(_) => None,
                    })
                    .collect::<Option<Vec<_>>>()?
                    .into_iter()
                    .flatten()
                    .collect(),
            ),
            Blocks::Q80(_) => Blocks::Q80(
                parts
                    .iter()
                    .map(|p| match &p.blocks {
                        Blocks::Q80(b) => Some(b.iter().copied()),
                        Blocks::Q41(_) => None,
                    })
                    .collect::<Option<Vec<_>>>()?
                    .into_iter()
                    .flatten()
                    .collect(),
            ),
        };
        Some(QMatrix { rows: parts.iter().map(|p| p.rows).sum(), cols, blocks })
    }

    /// Output features (weight rows).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features (weight columns).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row `r` expanded to f32 (an embedding lookup).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let kb = self.cols / QK;
        match &self.blocks {
            Blocks::Q41(blocks) => {
                for (b, o) in blocks[r * kb..(r + 1) * kb].iter().zip(out.chunks_exact_mut(QK)) {
                    let (d, m) = (b.d.to_f32(), b.m.to_f32());
                    for j in 0..QK / 2 {
                        o[j] = d * (b.qs[j] & 0x0F) as f32 + m;
                        o[j + QK / 2] = d * (b.qs[j] >> 4) as f32 + m;
                    }
                }
            }
            Blocks::Q80(blocks) => {
                for (b, o) in blocks[r * kb..(r + 1) * kb].iter().zip(out.chunks_exact_mut(QK)) {
                    let d = b.d.to_f32();
                    for (o, &q) in o.iter_mut().zip(&b.qs) {
                        *o = d * q as f32;
                    }
                }
            }
        }
    }

    /// `x · Wᵀ` for `x` of shape `[..., in]` (f32, on the CPU): `[..., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let k = *dims.last().unwrap_or(&0);
        if k != self.cols {
            candle_core::bail!("quantized matmul: input of {k} features, weight of {}", self.cols);
        }
        let m = x.elem_count() / k.max(1);
        let xs = x.flatten_all()?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
        let acts = quantize_rows(&xs, m, k);
        let mut y = vec![0f32; m * self.rows];
        match &self.blocks {
            Blocks::Q41(b) => self.matmul(b, &acts, m, &mut y),
            Blocks::Q80(b) => self.matmul(b, &acts, m, &mut y),
        }
        let mut out_dims = dims;
        *out_dims.last_mut().expect("a dimension") = self.rows;
        Tensor::from_vec(y, out_dims, &Device::Cpu)
    }

    /// `y = acts · blocksᵀ`: `acts` holds `m` rows of `cols / 32` blocks, `y` is `[m, rows]`.
    fn matmul<B: WeightBlock>(&self, blocks: &[B], acts: &[BlockQ81], m: usize, y: &mut [f32]) {
        debug_assert!(supported(), "a QMatrix exists only where the kernels run");
        assert!(acts.len() == m * (self.cols / QK) && y.len() == m * self.rows);
        const TILE_N: usize = 32;
        const TILE_M: usize = 64;
        let n = self.rows;
        let kb = self.cols / QK;
        let (col_tiles, row_tiles) = (n.div_ceil(TILE_N), m.div_ceil(TILE_M));
        let y_addr = y.as_mut_ptr() as usize;
        let work = |items: std::ops::Range<usize>| {
            for item in items {
                // Row tile major: consecutive items share activations, walk the weights.
                let (rt, ct) = (item / col_tiles, item % col_tiles);
                let (r0, r1) = (rt * TILE_M, ((rt + 1) * TILE_M).min(m));
                let (c0, c1) = (ct * TILE_N, ((ct + 1) * TILE_N).min(n));
                for c in c0..c1 {
                    let w = &blocks[c * kb..(c + 1) * kb];
                    let mut r = r0;
                    while r < r1 {
                        let take = (r1 - r).min(4);
                        let mut out = [0f32; 4];
                        let row = |i: usize| &acts[(r + i) * kb..(r + i + 1) * kb];
                        // SAFETY: the CPU has AVX2, FMA and F16C, since this `QMatrix` exists (see
                        // the type's docs); `w` and every row passed are `kb` blocks long.
                        unsafe {
                            match take {
                                4 => B::dot_n::<4>(w, [row(0), row(1), row(2), row(3)], &mut out),
                                3 => B::dot_n::<3>(w, [row(0), row(1), row(2)], &mut out),
                                2 => B::dot_n::<2>(w, [row(0), row(1)], &mut out),
                                _ => B::dot_n::<1>(w, [row(0)], &mut out),
                            }
                        }
                        for (i, &v) in out[..take].iter().enumerate() {
                            // SAFETY: `r + i < m` and `c < n`, so the element is inside `y` (`m * n`
                            // values, asserted above). `y` is not otherwise used until `pool::run`
                            // has returned or unwound, which it does only once no thread is in
                            // `work`; and `pool::run` runs each item once, item (rt, ct) alone
                            // writing rows `r0..r1` of columns `c0..c1`: no other access to this
                            // element overlaps this write.
                            unsafe { *(y_addr as *mut f32).add((r + i) * n + c) = v };
                        }
                        r += take;
                    }
                }
            }
        };
        let items = col_tiles * row_tiles;
        if m * n * self.cols < 1 << 16 {
            work(0..items);
        } else {
            crate::pool::run(items, work);
        }
    }
}

/// Quantizes `m` rows of `k` values to 8-bit blocks (round to nearest).
fn quantize_rows(xs: &[f32], m: usize, k: usize) -> Vec<BlockQ81> {
    let mut out = Vec::with_capacity(m * k / QK);
    for block in xs.chunks_exact(QK) {
        let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut qs = [0i8; QK];
        let mut sum = 0i32;
        for (q, v) in qs.iter_mut().zip(block) {
            // Round to nearest (ties to even) without a libm call: adding 1.5·2^23 leaves
            // no fraction bits for values this small.
            *q = ((v * id + 12_582_912.0) - 12_582_912.0) as i8;
            sum += *q as i32;
        }
        out.push(BlockQ81 { d, s: d * sum as f32, qs });
    }
    out
}

/// A weight block type with a kernel against 8-bit activation blocks.
trait WeightBlock: Copy + Sync {
    /// Dot products of one weight row with `R` (at most 4) activation rows, into `out[..R]`.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C ([`supported`]), and every row of `xs` must hold at
    /// least `w.len()` blocks.
    unsafe fn dot_n<const R: usize>(w: &[Self], xs: [&[BlockQ81]; R], out: &mut [f32; 4]);
}

impl WeightBlock for BlockQ41 {
    unsafe fn dot_n<const R: usize>(w: &[Self], xs: [&[BlockQ81]; R], out: &mut [f32; 4]) {
        // SAFETY: `q41_dot_n` has `dot_n`'s contract, which the caller keeps.
        unsafe { q41_dot_n::<R>(w, xs, out) }
    }
}

impl WeightBlock for BlockQ80 {
    unsafe fn dot_n<const R: usize>(w: &[Self], xs: [&[BlockQ81]; R], out: &mut [f32; 4]) {
        // SAFETY: `q80_dot_n` has `dot_n`'s contract, which the caller keeps.
        unsafe { q80_dot_n::<R>(w, xs, out) }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// `d_w·d_x·Σ q_w q_x + m_w·s_x` per block, Q4_1 weights.
///
/// # Safety
/// As [`WeightBlock::dot_n`]: AVX2, FMA and F16C, and rows of `xs` at least `w.len()` blocks long.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q41_dot_n<const R: usize>(w: &[BlockQ41], xs: [&[BlockQ81]; R], out: &mut [f32; 4]) {
    use std::arch::x86_64::*;
    let low = _mm_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); R];
    let mut mins = [0f32; R];
    for (b, wb) in w.iter().enumerate() {
        // 32 nibbles to 32 bytes 0..=15: values 0..15 in the low lane, 16..31 in the high one.
        // SAFETY: reads the 16 bytes of `wb.qs` (`[u8; 16]`); `loadu` needs no alignment.
        let packed = unsafe { _mm_loadu_si128(wb.qs.as_ptr() as *const __m128i) };
        let lo = _mm_and_si128(packed, low);
        let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low);
        let q = _mm256_set_m128i(hi, lo);
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(((wb.m.to_bits() as i32) << 16) | wb.d.to_bits() as i32));
        let (dw, mw) = (_mm_cvtss_f32(dm), _mm_cvtss_f32(_mm_shuffle_ps(dm, dm, 1)));
        for i in 0..R {
            // SAFETY: `b < w.len()`, and the caller guarantees `xs[i]` has at least `w.len()` blocks.
            let xb = unsafe { xs[i].get_unchecked(b) };
            // SAFETY: reads the 32 bytes of `xb.qs` (`[i8; 32]`); `loadu` needs no alignment.
            let a = unsafe { _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i) };
            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, a), ones);
            acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(dw * xb.d), _mm256_cvtepi32_ps(p), acc[i]);
            mins[i] += mw * xb.s;
        }
    }
    for i in 0..R {
        out[i] = hsum(acc[i]) + mins[i];
    }
}

/// `d_w·d_x·Σ q_w q_x` per block, Q8_0 weights (signs moved onto the activations so that
/// `maddubs` multiplies unsigned by signed bytes).
///
/// # Safety
/// As [`WeightBlock::dot_n`]: AVX2, FMA and F16C, and rows of `xs` at least `w.len()` blocks long.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q80_dot_n<const R: usize>(w: &[BlockQ80], xs: [&[BlockQ81]; R], out: &mut [f32; 4]) {
    use std::arch::x86_64::*;
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); R];
    for (b, wb) in w.iter().enumerate() {
        // SAFETY: reads the 32 bytes of `wb.qs` (`[i8; 32]`); `loadu` needs no alignment.
        let q = unsafe { _mm256_loadu_si256(wb.qs.as_ptr() as *const __m256i) };
        let qa = _mm256_sign_epi8(q, q);
        let dw = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(wb.d.to_bits() as i32)));
        for i in 0..R {
            // SAFETY: `b < w.len()`, and the caller guarantees `xs[i]` has at least `w.len()` blocks.
            let xb = unsafe { xs[i].get_unchecked(b) };
            // SAFETY: reads the 32 bytes of `xb.qs` (`[i8; 32]`); `loadu` needs no alignment.
            let a = unsafe { _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i) };
            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(qa, _mm256_sign_epi8(a, q)), ones);
            acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(dw * xb.d), _mm256_cvtepi32_ps(p), acc[i]);
        }
    }
    for i in 0..R {
        out[i] = hsum(acc[i]);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn q41_dot_n<const R: usize>(_: &[BlockQ41], _: [&[BlockQ81]; R], _: &mut [f32; 4]) {
    unreachable!("the kernels are only used where `supported()`")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn q80_dot_n<const R: usize>(_: &[BlockQ80], _: [&[BlockQ81]; R], _: &mut [f32; 4]) {
    unreachable!("the kernels are only used where `supported()`")
}
