//! The llama-family decoder (llama, SmolLM2, Qwen2) that the candle backend runs, with
//! batched decoding over per-sequence KV caches and logits for every position.
//!
//! A local copy of candle-transformers 0.11.1 `src/models/quantized_llama.rs` and
//! `src/models/quantized_qwen2.rs` (© the candle authors, dual-licensed MIT / Apache-2.0),
//! cut down to the dense-MLP llama graph and changed in three ways:
//!
//! - **Batching.** [`Model::forward`] takes several sequences at once, each with its own
//!   [`Cache`] and its own number of new tokens. The projections and the MLP, where the time
//!   goes, run once over all sequences' tokens stacked into one matrix, so a decode step of `B`
//!   sequences costs far less than `B` steps. Attention runs per sequence against that
//!   sequence's cache with a causal mask, which is exactly the single-sequence computation: no
//!   padding, and a batch's composition does not change a sequence's logits (bit for bit with
//!   quantized weights, whose matmul works row by row; within float rounding with dense ones,
//!   whose matmul kernel blocks by row count). Sequences can join and leave between steps.
//! - **All positions.** [`Positions::All`] returns the logits of every new token (scoring a
//!   text's per-token log-likelihood in one pass); [`Positions::Last`] only the last one, which
//!   is what decoding needs and saves the vocabulary projection on prompt tokens.
//! - **CPU kernels.** On the CPU, attention is computed straight from each sequence's
//!   preallocated key/value buffers (appended in place, never copied per step), and Q4_1
//!   weights (SmolLM2) stay quantized on Candor's AVX2 kernel ([`candor_kernels::quant`]), with q/k/v
//!   and gate/up each fused into one matmul. Both spread their work over Candor's
//!   work-sharing pool, which degrades to one thread rather than stalling on a busy machine.
//! - **One graph for both weight formats.** Qwen2 is the llama graph with q/k/v biases and
//!   half-split ("NeoX") rotary embeddings; HF safetensors llama weights (with a LoRA adapter
//!   merged) load into the same graph as dense matrices through [`Model::load`], so every checkpoint
//!   kind decodes in batches. Its output is checked against candle-transformers' own `llama`
//!   and `quantized_llama` in the tests.
//!
//! The model holds no mutable state: caches belong to the caller, so one loaded model can
//! serve any number of sequences.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor, gguf_file};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, RmsNorm, VarBuilder};

use candor_kernels::attn::{self, Heads};
use candor_kernels::quant::{self, QMatrix};

/// How rotary embeddings pair the dimensions of a head: `Interleaved` pairs (2i, 2i+1), GGUF
/// llama (llama.cpp permutes q/k weights into this order); `Halves` pairs (i, i+d/2), HF
/// checkpoints and every GGUF qwen2. The kernels' own type, so the CPU path takes it as is.
pub use candor_kernels::attn::RopeLayout as Rope;

/// Shape of a llama-family model.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub rope: Rope,
    /// Longest sequence (prompt plus answer) the rotary tables cover.
    pub max_seq_len: usize,
    /// q, k and v projections carry a bias (Qwen2).
    pub qkv_bias: bool,
    /// The output projection reuses the token embedding.
    pub tie_word_embeddings: bool,
}

impl Config {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
}

/// Which GGUF weights are expanded to f32 at load time instead of staying quantized.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Dequantize {
    /// On the CPU: Q4_1 and Q8_0 (SmolLM2's types) stay quantized and run Candor's own AVX2
    /// kernels ([`candor_kernels::quant`], llama.cpp's numerics) where the CPU has AVX2/FMA/F16C; the other types
    /// candle 0.11 has no SIMD kernel for (Q5_0, Q5_1, Q8_1, and Q4_1 without AVX2) are
    /// expanded to f32, as their scalar dot products are several times slower than an f32
    /// matmul. Everything else stays quantized on candle's kernels.
    #[default]
    Auto,
    All,
    /// Every type stays quantized on candle's own kernels (scalar for Q4_1).
    None,
}

impl std::str::FromStr for Dequantize {
    type Err = String;
    /// `auto`, `all` or `none`: the one reading of the candle backend's `dequantize` key and of
    /// `candor bench generate --dequantize`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Dequantize::Auto),
            "all" => Ok(Dequantize::All),
            "none" => Ok(Dequantize::None),
            other => Err(format!("`{other}` is not auto, all or none")),
        }
    }
}

impl Dequantize {
    fn matmul(self, q: QTensor, device: &Device) -> Result<Weight> {
        let cpu = device.is_cpu();
        if self == Dequantize::Auto && cpu && quant::handles(q.dtype()) && quant::supported() {
            return Ok(Weight::Own(std::sync::Arc::new(QMatrix::from_qtensor(&q)?)));
        }
        let slow_on_cpu = matches!(q.dtype(), GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q8_1);
        match self {
            Dequantize::All => Ok(Weight::Candle(QMatMul::Tensor(q.dequantize(device)?))),
            Dequantize::Auto if slow_on_cpu && cpu => Ok(Weight::Candle(QMatMul::Tensor(q.dequantize(device)?))),
            _ => Ok(Weight::Candle(QMatMul::from_qtensor(q)?)),
        }
    }
}

/// The token embedding: a dense table, or rows of the quantized output projection it is tied to,
/// expanded one token at a time (no f32 copy of the whole vocabulary).
#[derive(Debug, Clone)]
enum Embed {
    Dense(Embedding),
    Rows(std::sync::Arc<QMatrix>),
}

impl Embed {
    fn forward(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        match self {
            Embed::Dense(e) => e.forward(&Tensor::new(ids, device)?),
            Embed::Rows(m) => {
                let h = m.cols();
                let mut out = vec![0f32; ids.len() * h];
                for (&id, row) in ids.iter().zip(out.chunks_exact_mut(h)) {
                    if id as usize >= m.rows() {
                        candle_core::bail!("token id {id} is outside the vocabulary of {}", m.rows());
                    }
                    m.dequantize_row(id as usize, row);
                }
                Tensor::from_vec(out, (ids.len(), h), device)
            }
        }
    }
}

/// A projection's weight: on candle's matmuls, or Q4_1/Q8_0 on Candor's kernels.
#[derive(Debug, Clone)]
enum Weight {
    Candle(QMatMul),
    Own(std::sync::Arc<QMatrix>),
}

/// Which positions' logits [`Model::forward`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Positions {
    /// The last new token of each sequence: a `[vocab]` tensor per sequence.
    Last,
    /// Every new token: a `[new_tokens, vocab]` tensor per sequence.
    All,
}

/// One sequence's key/value cache.
///
/// On the CPU each layer's keys and values are plain growable buffers, `[len, kv_heads,
/// head_dim]` row-major, appended in place (a decode step writes one row per layer and copies
/// nothing else); [`Cache::reserve`] sizes them once for a whole answer. On another device
/// they are tensors `[1, kv_heads, len, head_dim]`, concatenated per step.
#[derive(Clone, Debug)]
pub struct Cache {
    kv: Vec<Option<(Tensor, Tensor)>>,
    host: Vec<(Vec<f32>, Vec<f32>)>,
    len: usize,
}

impl Cache {
    pub fn new(cfg: &Config) -> Self {
        Cache { kv: vec![None; cfg.num_layers], host: vec![(Vec::new(), Vec::new()); cfg.num_layers], len: 0 }
    }
    /// A cache with room for `tokens` tokens on the CPU (no copy while it stays within them).
    pub fn with_capacity(cfg: &Config, tokens: usize) -> Self {
        let mut c = Cache::new(cfg);
        c.reserve(cfg, tokens);
        c
    }
    /// Makes room for `tokens` more tokens on the CPU. Pages are only touched as tokens are
    /// written, so reserving for the longest possible answer costs no resident memory.
    pub fn reserve(&mut self, cfg: &Config, tokens: usize) {
        let row = cfg.num_kv_heads * cfg.head_dim();
        for (k, v) in &mut self.host {
            k.reserve(tokens * row);
            v.reserve(tokens * row);
        }
    }
    /// Tokens already processed (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A projection `x · Wᵀ (+ x · Aᵀ · (s·B)ᵀ) (+ b)`, quantized (GGUF) or dense (safetensors),
/// with a LoRA adapter's low-rank term beside a quantized weight.
#[derive(Debug, Clone)]
struct Linear {
    weight: Weight,
    lora: Option<LowRank>,
    bias: Option<Tensor>,
}

/// An adapter's `s·B·A` beside a weight that stays quantized, as `Aᵀ` `[in, r]` and `(s·B)ᵀ`
/// `[r, out]`: two thin matmuls per projection instead of an f32 copy of the weight, so the
/// quantized kernel (and the fusion of q/k/v and gate/up) is kept.
#[derive(Debug, Clone)]
struct LowRank {
    a_t: Tensor,
    b_t: Tensor,
}

impl LowRank {
    /// `s·B·A` as the two thin factors on `device`.
    fn new(Delta { a, b }: Delta, device: &Device) -> Result<Self> {
        Ok(LowRank { a_t: a.t()?.contiguous()?.to_device(device)?, b_t: b.t()?.contiguous()?.to_device(device)? })
    }
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = match &self.weight {
            Weight::Candle(w) => w.forward(x)?,
            Weight::Own(w) => w.forward(x)?.to_dtype(x.dtype())?,
        };
        if let Some(l) = &self.lora {
            y = (y + x.matmul(&l.a_t)?.matmul(&l.b_t)?)?;
        }
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    fn dense(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { weight: Weight::Candle(QMatMul::Tensor(weight)), lora: None, bias }
    }

    /// The projection `vb` names, with the adapter's change to it (`deltas`, by weight name).
    fn load(vb: &VarBuilder, in_dim: usize, out_dim: usize, bias: bool, deltas: &mut Deltas) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias { Some(vb.get(out_dim, "bias")?) } else { None };
        Linear::dense(weight, bias).adapt(deltas.take(&format!("{}.weight", vb.prefix())))
    }

    /// Applies an adapter's change: merged into a dense weight (`W + s·B·A`, free at run
    /// time), kept beside a quantized one as a [`LowRank`] term.
    fn adapt(mut self, delta: Option<Delta>) -> Result<Self> {
        let Some(Delta { a, b }) = delta else { return Ok(self) };
        match &mut self.weight {
            Weight::Candle(QMatMul::Tensor(w) | QMatMul::TensorF16(w)) => {
                *w = (w.to_dtype(DType::F32)? + b.matmul(&a)?.to_device(w.device())?)?.to_dtype(w.dtype())?;
            }
            Weight::Candle(QMatMul::QTensor(q)) => self.lora = Some(LowRank::new(Delta { a, b }, &q.device())?),
            Weight::Own(_) => self.lora = Some(LowRank::new(Delta { a, b }, &Device::Cpu)?),
        }
        Ok(self)
    }

    /// The device the weight runs on.
    fn device(&self) -> Device {
        match &self.weight {
            Weight::Candle(QMatMul::Tensor(w) | QMatMul::TensorF16(w)) => w.device().clone(),
            Weight::Candle(QMatMul::QTensor(q)) => q.device(),
            Weight::Own(_) => Device::Cpu,
        }
    }
}

/// Projections of the same input: one matmul over their stacked weights where they are all
/// Q4_1 on Candor's kernel (one pass over the threads and one activation quantization instead
/// of several), else one matmul each.
#[derive(Debug, Clone)]
enum Proj {
    Split(Vec<Linear>),
    Fused(Linear, Vec<usize>),
}

impl Proj {
    fn new(parts: Vec<Linear>) -> Result<Self> {
        let q41: Option<Vec<&QMatrix>> = parts
            .iter()
            .map(|l| match &l.weight {
                Weight::Own(m) => Some(m.as_ref()),
                Weight::Candle(_) => None,
            })
            .collect();
        let biased = parts.iter().filter(|l| l.bias.is_some()).count();
        let Some(mats) = q41.filter(|_| biased == 0 || biased == parts.len()) else {
            return Ok(Proj::Split(parts));
        };
        let Some(fused) = QMatrix::concat(&mats) else { return Ok(Proj::Split(parts)) };
        let sizes: Vec<usize> = mats.iter().map(|m| m.rows()).collect();
        let bias = if biased > 0 {
            Some(Tensor::cat(&parts.iter().filter_map(|l| l.bias.as_ref()).collect::<Vec<_>>(), 0)?)
        } else {
            None
        };
        let lora = Self::fused_lora(&parts.iter().map(|l| l.lora.as_ref()).collect::<Vec<_>>(), &sizes)?;
        Ok(Proj::Fused(Linear { weight: Weight::Own(std::sync::Arc::new(fused)), lora, bias }, sizes))
    }

    /// The parts' low-rank terms as one on the fused output: their `Aᵀ` side by side and their
    /// `(s·B)ᵀ` block-diagonal (zero columns for a part without an adapter), so one pair of
    /// thin matmuls serves all parts.
    fn fused_lora(parts: &[Option<&LowRank>], sizes: &[usize]) -> Result<Option<LowRank>> {
        let total: usize = sizes.iter().sum();
        let (mut a_ts, mut b_ts, mut before) = (Vec::new(), Vec::new(), 0);
        for (l, &n) in parts.iter().zip(sizes) {
            if let Some(lr) = l {
                a_ts.push(lr.a_t.clone());
                b_ts.push(lr.b_t.pad_with_zeros(1, before, total - before - n)?);
            }
            before += n;
        }
        if a_ts.is_empty() {
            return Ok(None);
        }
        Ok(Some(LowRank { a_t: Tensor::cat(&a_ts, 1)?.contiguous()?, b_t: Tensor::cat(&b_ts, 0)?.contiguous()? }))
    }

    /// The projections with an adapter's changes (one per part, in order; `None` leaves a
    /// part as it is). The weights are shared with `self`, never copied: a merged change
    /// makes a new dense weight, a low-rank one sits beside the quantized weight.
    fn adapted(&self, deltas: Vec<Option<Delta>>) -> Result<Self> {
        match self {
            Proj::Split(parts) => {
                Ok(Proj::Split(parts.iter().zip(deltas).map(|(l, d)| l.clone().adapt(d)).collect::<Result<_>>()?))
            }
            Proj::Fused(l, sizes) => {
                let device = l.device();
                let terms = deltas
                    .into_iter()
                    .map(|d| d.map(|d| LowRank::new(d, &device)).transpose())
                    .collect::<Result<Vec<_>>>()?;
                let lora = Self::fused_lora(&terms.iter().map(Option::as_ref).collect::<Vec<_>>(), sizes)?;
                Ok(Proj::Fused(Linear { lora, ..l.clone() }, sizes.clone()))
            }
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Proj::Split(parts) => parts.iter().map(|l| l.forward(x)).collect(),
            Proj::Fused(l, sizes) => {
                let y = l.forward(x)?;
                let mut off = 0;
                sizes
                    .iter()
                    .map(|&n| {
                        off += n;
                        y.narrow(candle_core::D::Minus1, off - n, n)
                    })
                    .collect()
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Layer {
    attn_norm: RmsNorm,
    /// q, k, v.
    qkv: Proj,
    wo: Linear,
    ffn_norm: RmsNorm,
    /// gate, up.
    gate_up: Proj,
    down: Linear,
}

/// A llama-family decoder.
#[derive(Debug, Clone)]
pub struct Model {
    cfg: Config,
    embed: Embed,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    cos: Tensor,
    sin: Tensor,
    /// The rotary tables on the host, `[max_seq_len, head_dim / 2]`, for CPU attention.
    cos_host: Vec<f32>,
    sin_host: Vec<f32>,
    device: Device,
}

fn rope_tables(cfg: &Config, device: &Device) -> Result<(Tensor, Tensor)> {
    let head_dim = cfg.head_dim();
    let theta: Vec<f32> =
        (0..head_dim).step_by(2).map(|i| 1f32 / cfg.rope_theta.powf(i as f32 / head_dim as f32)).collect();
    let theta = Tensor::new(theta.as_slice(), device)?;
    let idx = Tensor::arange(0, cfg.max_seq_len as u32, device)?.to_dtype(DType::F32)?.reshape((cfg.max_seq_len, 1))?;
    let angles = idx.matmul(&theta.reshape((1, head_dim / 2))?)?;
    Ok((angles.cos()?, angles.sin()?))
}

impl Model {
    /// Loads HF llama/qwen2 names (`model.embed_tokens`, `model.layers.N.self_attn.q_proj`, …,
    /// `lm_head`) from `vb`, with an adapter's changes (`deltas`, HF names) merged into the
    /// projections they name. The dtype is the var builder's.
    pub fn load(vb: VarBuilder, cfg: &Config, deltas: &mut Deltas) -> Result<Self> {
        let device = vb.device().clone();
        let (h, hd) = (cfg.hidden_size, cfg.head_dim());
        let m = vb.pp("model");
        let embed_weight = m.pp("embed_tokens").get((cfg.vocab_size, h), "weight")?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let l = m.pp(format!("layers.{i}"));
            let a = l.pp("self_attn");
            let mlp = l.pp("mlp");
            layers.push(Layer {
                attn_norm: candle_nn::rms_norm(h, cfg.rms_norm_eps, l.pp("input_layernorm"))?,
                qkv: Proj::Split(vec![
                    Linear::load(&a.pp("q_proj"), h, cfg.num_heads * hd, cfg.qkv_bias, deltas)?,
                    Linear::load(&a.pp("k_proj"), h, cfg.num_kv_heads * hd, cfg.qkv_bias, deltas)?,
                    Linear::load(&a.pp("v_proj"), h, cfg.num_kv_heads * hd, cfg.qkv_bias, deltas)?,
                ]),
                wo: Linear::load(&a.pp("o_proj"), cfg.num_heads * hd, h, false, deltas)?,
                ffn_norm: candle_nn::rms_norm(h, cfg.rms_norm_eps, l.pp("post_attention_layernorm"))?,
                gate_up: Proj::Split(vec![
                    Linear::load(&mlp.pp("gate_proj"), h, cfg.intermediate_size, false, deltas)?,
                    Linear::load(&mlp.pp("up_proj"), h, cfg.intermediate_size, false, deltas)?,
                ]),
                down: Linear::load(&mlp.pp("down_proj"), cfg.intermediate_size, h, false, deltas)?,
            });
        }
        let norm = candle_nn::rms_norm(h, cfg.rms_norm_eps, m.pp("norm"))?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::dense(embed_weight.clone(), None)
        } else {
            Linear::load(&vb.pp("lm_head"), h, cfg.vocab_size, false, deltas)?
        };
        let (cos, sin) = rope_tables(cfg, &device)?;
        Model::assemble(cfg, Embed::Dense(Embedding::new(embed_weight, h)), layers, norm, lm_head, (cos, sin), &device)
    }

    /// Reads the shape of a GGUF `llama` or `qwen2` model from its metadata; `max_seq_len`
    /// caps the metadata's context length (memory for the rotary tables and caches).
    pub fn gguf_config(ct: &gguf_file::Content, max_seq_len: Option<usize>) -> Result<Config> {
        let md = |key: &str| match ct.metadata.get(key) {
            Some(v) => Ok(v),
            None => candle_core::bail!("metadata key `{key}` is missing"),
        };
        let arch = md("general.architecture")?.to_string()?.clone();
        let (qkv_bias, rope) = match arch.as_str() {
            "llama" => (false, Rope::Interleaved),
            "qwen2" => (true, Rope::Halves),
            other => candle_core::bail!("architecture `{other}` is not supported (llama and qwen2 are)"),
        };
        let get = |key: &str| md(&format!("{arch}.{key}"));
        if get("expert_count").and_then(|v| v.to_u32()).unwrap_or(0) > 1 {
            candle_core::bail!("mixture-of-experts models are not supported");
        }
        let hidden_size = get("embedding_length")?.to_u32()? as usize;
        let num_heads = get("attention.head_count")?.to_u32()? as usize;
        if let Ok(rope_dim) = get("rope.dimension_count").and_then(|v| v.to_u32())
            && rope_dim as usize != hidden_size / num_heads
        {
            candle_core::bail!("partial rotary embeddings (rope.dimension_count {rope_dim}) are not supported");
        }
        let context = get("context_length")?.to_u32()? as usize;
        let vocab_size = match get("vocab_size") {
            Ok(v) => v.to_u32()? as usize,
            Err(_) => md("tokenizer.ggml.tokens")?.to_vec()?.len(),
        };
        Ok(Config {
            vocab_size,
            hidden_size,
            intermediate_size: get("feed_forward_length")?.to_u32()? as usize,
            num_layers: get("block_count")?.to_u32()? as usize,
            num_heads,
            num_kv_heads: get("attention.head_count_kv")?.to_u32()? as usize,
            rms_norm_eps: get("attention.layer_norm_rms_epsilon")?.to_f32()? as f64,
            rope_theta: get("rope.freq_base").and_then(|v| v.to_f32()).unwrap_or(10_000.),
            rope,
            max_seq_len: max_seq_len.map_or(context, |m| m.min(context)),
            qkv_bias,
            tie_word_embeddings: !ct.tensor_infos.contains_key("output.weight"),
        })
    }

    /// Loads a GGUF `llama` or `qwen2` model (llama.cpp tensor names `blk.N.attn_q`, …); an
    /// adapter applies to it with [`Model::adapted`].
    pub fn from_gguf<R: std::io::Seek + std::io::Read>(
        ct: &gguf_file::Content,
        reader: &mut R,
        cfg: &Config,
        device: &Device,
        dequantize: Dequantize,
    ) -> Result<Self> {
        let mut qt = |name: &str| ct.tensor(reader, name, device);
        let norm = |t: QTensor, eps: f64| -> Result<RmsNorm> { Ok(RmsNorm::new(t.dequantize(device)?, eps)) };
        let lm_head = qt(if cfg.tie_word_embeddings { "token_embd.weight" } else { "output.weight" })?;
        let lm_head = Linear { weight: dequantize.matmul(lm_head, device)?, lora: None, bias: None };
        let embed = match (&lm_head.weight, cfg.tie_word_embeddings) {
            (Weight::Own(m), true) => Embed::Rows(m.clone()),
            _ => Embed::Dense(Embedding::new(qt("token_embd.weight")?.dequantize(device)?, cfg.hidden_size)),
        };
        let out_norm = norm(qt("output_norm.weight")?, cfg.rms_norm_eps)?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let mut lin = |name: &str, bias: bool| -> Result<Linear> {
                let weight = dequantize.matmul(qt(&format!("blk.{i}.{name}.weight"))?, device)?;
                let bias = if bias { Some(qt(&format!("blk.{i}.{name}.bias"))?.dequantize(device)?) } else { None };
                Ok(Linear { weight, lora: None, bias })
            };
            let (wq, wk, wv) =
                (lin("attn_q", cfg.qkv_bias)?, lin("attn_k", cfg.qkv_bias)?, lin("attn_v", cfg.qkv_bias)?);
            let (wo, gate, up, down) =
                (lin("attn_output", false)?, lin("ffn_gate", false)?, lin("ffn_up", false)?, lin("ffn_down", false)?);
            layers.push(Layer {
                attn_norm: norm(qt(&format!("blk.{i}.attn_norm.weight"))?, cfg.rms_norm_eps)?,
                ffn_norm: norm(qt(&format!("blk.{i}.ffn_norm.weight"))?, cfg.rms_norm_eps)?,
                qkv: Proj::new(vec![wq, wk, wv])?,
                wo,
                gate_up: Proj::new(vec![gate, up])?,
                down,
            });
        }
        let tables = rope_tables(cfg, device)?;
        Model::assemble(cfg, embed, layers, out_norm, lm_head, tables, device)
    }

    /// This GGUF model with an adapter's changes (`deltas`, llama.cpp names `blk.N.attn_q.weight`,
    /// …) applied to the projections they name: merged into a weight expanded to f32, beside
    /// one that stays quantized. Every weight is shared with `self` (a loaded base serves each
    /// checkpoint of a training run without being read again); the changes no projection took
    /// stay in `deltas` ([`Deltas::finish`] names them).
    pub fn adapted(&self, deltas: &mut Deltas) -> Result<Self> {
        let mut model = self.clone();
        for (i, layer) in model.layers.iter_mut().enumerate() {
            let mut take = |names: &[&str]| -> Vec<Option<Delta>> {
                names.iter().map(|n| deltas.take(&format!("blk.{i}.{n}.weight"))).collect()
            };
            layer.qkv = layer.qkv.adapted(take(&["attn_q", "attn_k", "attn_v"]))?;
            layer.gate_up = layer.gate_up.adapted(take(&["ffn_gate", "ffn_up"]))?;
            layer.wo = layer.wo.clone().adapt(take(&["attn_output"]).pop().flatten())?;
            layer.down = layer.down.clone().adapt(take(&["ffn_down"]).pop().flatten())?;
        }
        Ok(model)
    }

    fn assemble(
        cfg: &Config,
        embed: Embed,
        layers: Vec<Layer>,
        norm: RmsNorm,
        lm_head: Linear,
        (cos, sin): (Tensor, Tensor),
        device: &Device,
    ) -> Result<Self> {
        let (cos_host, sin_host) = if device.is_cpu() {
            (cos.flatten_all()?.to_vec1::<f32>()?, sin.flatten_all()?.to_vec1::<f32>()?)
        } else {
            (Vec::new(), Vec::new())
        };
        Ok(Model {
            cfg: cfg.clone(),
            embed,
            layers,
            norm,
            lm_head,
            cos,
            sin,
            cos_host,
            sin_host,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Feeds each sequence its new tokens (a whole prompt, or the one token sampled last) and
    /// returns its logits as f32, in order. Each cache grows by its sequence's new tokens.
    pub fn forward(&self, seqs: &mut [(&[u32], &mut Cache)], positions: Positions) -> Result<Vec<Tensor>> {
        let cfg = &self.cfg;
        let mut spans = Vec::with_capacity(seqs.len()); // (offset in the stacked tokens, length, start position)
        let mut ids = Vec::new();
        for (tokens, cache) in seqs.iter() {
            if tokens.is_empty() {
                candle_core::bail!("a sequence has no new token");
            }
            if cache.len + tokens.len() > cfg.max_seq_len {
                candle_core::bail!(
                    "sequence of {} tokens exceeds the context length {}",
                    cache.len + tokens.len(),
                    cfg.max_seq_len
                );
            }
            spans.push((ids.len(), tokens.len(), cache.len));
            ids.extend_from_slice(tokens);
        }
        let rep = cfg.num_heads / cfg.num_kv_heads;
        let on_host = self.device.is_cpu();
        // Causal masks `[rep * n, kv_len]` (device attention only): one `[n, kv_len]` block per
        // query head of a group.
        let masks = spans
            .iter()
            .map(|&(_, n, pos)| {
                if n == 1 || on_host {
                    return Ok(None);
                }
                let mask = candle_transformers::utils::build_causal_mask(n, pos, &self.device)?;
                Ok(Some(if rep == 1 { mask } else { Tensor::cat(&vec![&mask; rep], 0)? }))
            })
            .collect::<Result<Vec<_>>>()?;

        let mut x = self.embed.forward(&ids, &self.device)?; // [T, h]
        for (li, layer) in self.layers.iter().enumerate() {
            let normed = layer.attn_norm.forward(&x)?;
            let qkv = layer.qkv.forward(&normed)?;
            let (q, k, v) = (&qkv[0], &qkv[1], &qkv[2]);
            let y = if on_host {
                self.attend_host(li, q, k, v, seqs, &spans)?
            } else {
                self.attend_device(li, q, k, v, seqs, &spans, &masks)?
            };
            x = (layer.wo.forward(&y)? + x)?;
            let normed = layer.ffn_norm.forward(&x)?;
            let gate_up = layer.gate_up.forward(&normed)?;
            let act = (candle_nn::ops::silu(&gate_up[0])? * &gate_up[1])?;
            x = (layer.down.forward(&act)? + x)?;
        }
        for ((tokens, cache), _) in seqs.iter_mut().zip(&spans) {
            cache.len += tokens.len();
        }
        match positions {
            Positions::Last => {
                let last: Vec<u32> = spans.iter().map(|&(off, n, _)| (off + n - 1) as u32).collect();
                let x = x.index_select(&Tensor::new(last.as_slice(), &self.device)?, 0)?;
                let logits = self.lm_head.forward(&self.norm.forward(&x)?)?.to_dtype(DType::F32)?;
                (0..spans.len()).map(|i| logits.get(i)).collect()
            }
            Positions::All => {
                let logits = self.lm_head.forward(&self.norm.forward(&x)?)?.to_dtype(DType::F32)?;
                spans.iter().map(|&(off, n, _)| logits.narrow(0, off, n)).collect()
            }
        }
    }

    /// Attention of every sequence's new tokens on the CPU: rotary embeddings, the new keys
    /// and values appended to each sequence's cache in place, then causal attention per
    /// sequence, query row and head, read straight from the cache (grouped query heads share
    /// their key/value head without copying it), spread over candle's CPU threads. Each
    /// sequence's result depends on its own tokens and cache only.
    fn attend_host(
        &self,
        li: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        seqs: &mut [(&[u32], &mut Cache)],
        spans: &[(usize, usize, usize)],
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (hd, nh, nkv) = (cfg.head_dim(), cfg.num_heads, cfg.num_kv_heads);
        let dtype = q.dtype();
        let host = |t: &Tensor| -> Result<Vec<f32>> { t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>() };
        let (mut qh, mut kh, vh) = (host(q)?, host(k)?, host(v)?);
        // Query rows: (sequence, position).
        let row_of: Vec<(usize, usize)> =
            spans.iter().enumerate().flat_map(|(s, &(_, n, pos))| (pos..pos + n).map(move |p| (s, p))).collect();
        let positions: Vec<usize> = row_of.iter().map(|&(_, p)| p).collect();
        attn::rope(&mut qh, nh, hd, &positions, &self.cos_host, &self.sin_host, cfg.rope);
        attn::rope(&mut kh, nkv, hd, &positions, &self.cos_host, &self.sin_host, cfg.rope);
        for (s, &(off, n, _)) in spans.iter().enumerate() {
            let (kc, vc) = &mut seqs[s].1.host[li];
            kc.extend_from_slice(&kh[off * nkv * hd..(off + n) * nkv * hd]);
            vc.extend_from_slice(&vh[off * nkv * hd..(off + n) * nkv * hd]);
        }
        let caches: Vec<(&[f32], &[f32])> =
            seqs.iter().map(|(_, c)| (c.host[li].0.as_slice(), c.host[li].1.as_slice())).collect();
        let y = attn::attend(&qh, &row_of, &caches, Heads { query: nh, kv: nkv, dim: hd });
        Tensor::from_vec(y, (row_of.len(), nh * hd), &self.device)?.to_dtype(dtype)
    }

    /// Attention on a non-CPU device, with tensors: the new keys and values concatenated to
    /// each sequence's cache, then masked attention per sequence.
    #[allow(clippy::too_many_arguments)]
    fn attend_device(
        &self,
        li: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        seqs: &mut [(&[u32], &mut Cache)],
        spans: &[(usize, usize, usize)],
        masks: &[Option<Tensor>],
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (hd, nh, nkv) = (cfg.head_dim(), cfg.num_heads, cfg.num_kv_heads);
        let rep = nh / nkv;
        let scale = 1.0 / (hd as f64).sqrt();
        let neg_inf = Tensor::new(f32::NEG_INFINITY, &self.device)?;
        let mut ys = Vec::with_capacity(seqs.len());
        for (s, &(off, n, pos)) in spans.iter().enumerate() {
            let heads = |t: &Tensor, count: usize| -> Result<Tensor> {
                t.narrow(0, off, n)?.reshape((1, n, count, hd))?.transpose(1, 2)?.contiguous()
            };
            let cos = self.cos.narrow(0, pos, n)?;
            let sin = self.sin.narrow(0, pos, n)?;
            let rope = |t: &Tensor| match cfg.rope {
                Rope::Interleaved => candle_nn::rotary_emb::rope_i(t, &cos, &sin),
                Rope::Halves => candle_nn::rotary_emb::rope(t, &cos, &sin),
            };
            let qs = rope(&heads(q, nh)?)?;
            let ks = rope(&heads(k, nkv)?)?;
            let vs = heads(v, nkv)?;
            let cache = &mut seqs[s].1;
            let (ks, vs) = match &cache.kv[li] {
                Some((kc, vc)) => (Tensor::cat(&[kc, &ks], 2)?, Tensor::cat(&[vc, &vs], 2)?),
                None => (ks, vs),
            };
            cache.kv[li] = Some((ks.clone(), vs.clone()));
            // The query heads sharing a key/value head attend as one block of rows, so the
            // cache is read in place instead of copied once per query head (repeat_kv).
            let qs = qs.reshape((1, nkv, rep * n, hd))?;
            let att = (qs.matmul(&ks.t()?)? * scale)?; // [1, nkv, rep * n, kv_len]
            let att = match &masks[s] {
                Some(mask) => mask.broadcast_as(att.shape())?.where_cond(&neg_inf.broadcast_as(att.shape())?, &att)?,
                None => att,
            };
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let y = att.matmul(&vs)?.reshape((1, nh, n, hd))?;
            ys.push(y.transpose(1, 2)?.reshape((n, nh * hd))?);
        }
        if ys.len() == 1 { Ok(ys.pop().expect("one sequence")) } else { Tensor::cat(&ys, 0) }
    }

    /// Logits `[tokens, vocab]` of every position of `tokens` from an empty cache: entry `i`
    /// predicts token `i + 1`. One pass, for per-token log-likelihoods.
    pub fn forward_all_positions(&self, tokens: &[u32]) -> Result<Tensor> {
        let mut cache = Cache::new(&self.cfg);
        let mut out = self.forward(&mut [(tokens, &mut cache)], Positions::All)?;
        Ok(out.pop().expect("one sequence"))
    }
}

/// An adapter's change to one base weight, `s·B·A`, as A `[r, in]` and `s·B` `[out, r]` in
/// f32, rows in the base weight's order.
#[derive(Clone, Debug)]
pub struct Delta {
    pub a: Tensor,
    pub b: Tensor,
}

/// The changes an adapter makes ([`super::lora::Adapter::deltas`]), by base weight name, checked against the base's shapes. The
/// model takes each as it builds the projection; [`Deltas::finish`] then refuses any it did
/// not take.
#[derive(Debug, Default)]
pub struct Deltas {
    /// The adapter's weights file, named by errors.
    pub(crate) file: std::path::PathBuf,
    /// Base weight name → (the adapter's HF weight name, delta).
    pub(crate) map: std::collections::BTreeMap<String, (String, Delta)>,
}

impl Deltas {
    /// The change to base weight `name`, if the adapter makes one.
    pub fn take(&mut self, name: &str) -> Option<Delta> {
        self.map.remove(name).map(|(_, d)| d)
    }

    /// An error naming the first change no projection of the model took (a base weight that
    /// exists but is not a projection, e.g. the token embedding).
    pub fn finish(self) -> crate::error::Result<()> {
        match self.map.into_iter().next() {
            None => Ok(()),
            Some((target, (name, _))) => Err(crate::error::Error::input(
                crate::error::Location::file(&self.file).field(&name),
                format!("adapts `{target}`, which is not a projection of the model"),
            )),
        }
    }
}
