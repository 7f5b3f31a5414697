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
//! - **One graph for both weight formats.** Qwen2 is the llama graph with q/k/v biases and
//!   half-split ("NeoX") rotary embeddings; HF safetensors llama weights (and LoRA-merged ones)
//!   load into the same graph as dense matrices through [`Model::load`], so every checkpoint
//!   kind decodes in batches. Its output is checked against candle-transformers' own `llama`
//!   and `quantized_llama` in the tests.
//!
//! The model holds no mutable state: caches belong to the caller, so one loaded model can
//! serve any number of sequences.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor, gguf_file};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, RmsNorm, VarBuilder};

/// How rotary embeddings pair the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rope {
    /// Pairs (2i, 2i+1): GGUF llama (llama.cpp permutes q/k weights into this order).
    Interleaved,
    /// Pairs (i, i+d/2): HF checkpoints and every GGUF qwen2.
    Halves,
}

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
    /// On the CPU, the types candle 0.11 has no SIMD kernel for (Q4_1, Q5_0, Q5_1, Q8_1):
    /// their scalar dot products are several times slower than an f32 matmul (SmolLM2's Q4_1:
    /// 10x on prefill, 3x on decode, measured), and f32 is exact where the quantized path
    /// rounds activations to 8 bits. Everything else stays quantized.
    #[default]
    Auto,
    All,
    None,
}

impl Dequantize {
    fn matmul(self, q: QTensor, device: &Device) -> Result<QMatMul> {
        let slow_on_cpu = matches!(q.dtype(), GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q8_1);
        match self {
            Dequantize::All => Ok(QMatMul::Tensor(q.dequantize(device)?)),
            Dequantize::Auto if slow_on_cpu && device.is_cpu() => Ok(QMatMul::Tensor(q.dequantize(device)?)),
            _ => QMatMul::from_qtensor(q),
        }
    }
}

/// Which positions' logits [`Model::forward`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Positions {
    /// The last new token of each sequence: a `[vocab]` tensor per sequence.
    Last,
    /// Every new token: a `[new_tokens, vocab]` tensor per sequence.
    All,
}

/// One sequence's key/value cache: per layer, keys and values of shape
/// `[1, kv_heads, len, head_dim]`.
#[derive(Clone, Debug)]
pub struct Cache {
    kv: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl Cache {
    pub fn new(cfg: &Config) -> Self {
        Cache { kv: vec![None; cfg.num_layers], len: 0 }
    }
    /// Tokens already processed (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A projection `x · Wᵀ (+ b)`, quantized (GGUF) or dense (safetensors).
#[derive(Debug, Clone)]
struct Linear {
    weight: QMatMul,
    bias: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.weight.forward(x)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    fn dense(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { weight: QMatMul::Tensor(weight), bias }
    }

    fn load(vb: &VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias { Some(vb.get(out_dim, "bias")?) } else { None };
        Ok(Linear::dense(weight, bias))
    }
}

#[derive(Debug, Clone)]
struct Layer {
    attn_norm: RmsNorm,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    ffn_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// A llama-family decoder.
#[derive(Debug, Clone)]
pub struct Model {
    cfg: Config,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    cos: Tensor,
    sin: Tensor,
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
    /// `lm_head`) from `vb`. The dtype is the var builder's.
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
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
                wq: Linear::load(&a.pp("q_proj"), h, cfg.num_heads * hd, cfg.qkv_bias)?,
                wk: Linear::load(&a.pp("k_proj"), h, cfg.num_kv_heads * hd, cfg.qkv_bias)?,
                wv: Linear::load(&a.pp("v_proj"), h, cfg.num_kv_heads * hd, cfg.qkv_bias)?,
                wo: Linear::load(&a.pp("o_proj"), cfg.num_heads * hd, h, false)?,
                ffn_norm: candle_nn::rms_norm(h, cfg.rms_norm_eps, l.pp("post_attention_layernorm"))?,
                gate: Linear::load(&mlp.pp("gate_proj"), h, cfg.intermediate_size, false)?,
                up: Linear::load(&mlp.pp("up_proj"), h, cfg.intermediate_size, false)?,
                down: Linear::load(&mlp.pp("down_proj"), cfg.intermediate_size, h, false)?,
            });
        }
        let norm = candle_nn::rms_norm(h, cfg.rms_norm_eps, m.pp("norm"))?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::dense(embed_weight.clone(), None)
        } else {
            Linear::load(&vb.pp("lm_head"), h, cfg.vocab_size, false)?
        };
        let (cos, sin) = rope_tables(cfg, &device)?;
        Ok(Model { cfg: cfg.clone(), embed: Embedding::new(embed_weight, h), layers, norm, lm_head, cos, sin, device })
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

    /// Loads a GGUF `llama` or `qwen2` model (llama.cpp tensor names `blk.N.attn_q`, …).
    pub fn from_gguf<R: std::io::Seek + std::io::Read>(
        ct: &gguf_file::Content,
        reader: &mut R,
        cfg: &Config,
        device: &Device,
        dequantize: Dequantize,
    ) -> Result<Self> {
        let mut qt = |name: &str| ct.tensor(reader, name, device);
        let norm = |t: QTensor, eps: f64| -> Result<RmsNorm> { Ok(RmsNorm::new(t.dequantize(device)?, eps)) };
        let embed_q = qt("token_embd.weight")?;
        let embed = Embedding::new(embed_q.dequantize(device)?, cfg.hidden_size);
        let lm_head = if cfg.tie_word_embeddings { embed_q } else { qt("output.weight")? };
        let lm_head = Linear { weight: dequantize.matmul(lm_head, device)?, bias: None };
        let out_norm = norm(qt("output_norm.weight")?, cfg.rms_norm_eps)?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let mut lin = |name: &str, bias: bool| -> Result<Linear> {
                let weight = dequantize.matmul(qt(&format!("blk.{i}.{name}.weight"))?, device)?;
                let bias = if bias { Some(qt(&format!("blk.{i}.{name}.bias"))?.dequantize(device)?) } else { None };
                Ok(Linear { weight, bias })
            };
            let (wq, wk, wv) =
                (lin("attn_q", cfg.qkv_bias)?, lin("attn_k", cfg.qkv_bias)?, lin("attn_v", cfg.qkv_bias)?);
            let (wo, gate, up, down) =
                (lin("attn_output", false)?, lin("ffn_gate", false)?, lin("ffn_up", false)?, lin("ffn_down", false)?);
            layers.push(Layer {
                attn_norm: norm(qt(&format!("blk.{i}.attn_norm.weight"))?, cfg.rms_norm_eps)?,
                ffn_norm: norm(qt(&format!("blk.{i}.ffn_norm.weight"))?, cfg.rms_norm_eps)?,
                wq,
                wk,
                wv,
                wo,
                gate,
                up,
                down,
            });
        }
        let (cos, sin) = rope_tables(cfg, device)?;
        Ok(Model { cfg: cfg.clone(), embed, layers, norm: out_norm, lm_head, cos, sin, device: device.clone() })
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
        // Causal masks `[rep * n, kv_len]`: one `[n, kv_len]` block per query head of a group.
        let masks = spans
            .iter()
            .map(|&(_, n, pos)| {
                if n == 1 {
                    return Ok(None);
                }
                let mask = candle_transformers::utils::build_causal_mask(n, pos, &self.device)?;
                Ok(Some(if rep == 1 { mask } else { Tensor::cat(&vec![&mask; rep], 0)? }))
            })
            .collect::<Result<Vec<_>>>()?;
        let neg_inf = Tensor::new(f32::NEG_INFINITY, &self.device)?;
        let (hd, nh, nkv) = (cfg.head_dim(), cfg.num_heads, cfg.num_kv_heads);
        let scale = 1.0 / (hd as f64).sqrt();

        let mut x = self.embed.forward(&Tensor::new(ids.as_slice(), &self.device)?)?; // [T, h]
        for (li, layer) in self.layers.iter().enumerate() {
            let normed = layer.attn_norm.forward(&x)?;
            let q = layer.wq.forward(&normed)?;
            let k = layer.wk.forward(&normed)?;
            let v = layer.wv.forward(&normed)?;
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
                let qs = rope(&heads(&q, nh)?)?;
                let ks = rope(&heads(&k, nkv)?)?;
                let vs = heads(&v, nkv)?;
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
                    Some(mask) => {
                        mask.broadcast_as(att.shape())?.where_cond(&neg_inf.broadcast_as(att.shape())?, &att)?
                    }
                    None => att,
                };
                let att = candle_nn::ops::softmax_last_dim(&att)?;
                let y = att.matmul(&vs)?.reshape((1, nh, n, hd))?;
                ys.push(y.transpose(1, 2)?.reshape((n, nh * hd))?);
            }
            let y = if ys.len() == 1 { ys.pop().expect("one sequence") } else { Tensor::cat(&ys, 0)? };
            x = (layer.wo.forward(&y)? + x)?;
            let normed = layer.ffn_norm.forward(&x)?;
            let act = (candle_nn::ops::silu(&layer.gate.forward(&normed)?)? * layer.up.forward(&normed)?)?;
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

    /// Logits `[tokens, vocab]` of every position of `tokens` from an empty cache: entry `i`
    /// predicts token `i + 1`. One pass, for per-token log-likelihoods.
    pub fn forward_all_positions(&self, tokens: &[u32]) -> Result<Tensor> {
        let mut cache = Cache::new(&self.cfg);
        let mut out = self.forward(&mut [(tokens, &mut cache)], Positions::All)?;
        Ok(out.pop().expect("one sequence"))
    }
}
