//! Sentence embeddings for the TruthfulQA reference judge: all-MiniLM-L6-v2 (a 6-layer BERT)
//! in candle, mean-pooled over tokens and L2-normalised, as sentence-transformers does.
//! Weights come from `scripts/fetch-models minilm` (see `shared/MODELS.md`).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::Tokenizer;

use crate::error::{Error, Location, Result};

/// The directory `scripts/fetch-models minilm` fills.
pub fn minilm_dir() -> PathBuf {
    crate::model::models_dir().join("all-MiniLM-L6-v2")
}

/// sentence-transformers' `max_seq_length` for this model.
const MAX_TOKENS: usize = 256;

/// Texts embedded in one forward pass at most (sorted by length, so little is padding).
const BATCH_TEXTS: usize = 64;

/// Embeddings kept by text at most (384 floats each: about 50 MB); the cache starts afresh
/// when a call would pass it.
const CACHED: usize = 32_768;

/// A sentence embedder. It keeps each text's embedding (a judge meets the same reference
/// answers and option texts under every condition and checkpoint, and nearby checkpoints
/// often give the same short answer), and embeds the texts it has not seen in batches.
pub struct Embedder {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
    /// sha256 of the weights, part of the judge id.
    pub digest: String,
    cache: std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<[f32]>>>,
}

fn model_error(context: &str, e: candle_core::Error) -> Error {
    Error::Model { context: context.to_string(), message: e.to_string() }
}

impl Embedder {
    /// Loads all-MiniLM-L6-v2 from `dir` (model.safetensors, tokenizer.json, config.json).
    pub fn load(dir: &Path) -> Result<Self> {
        let weights = dir.join("model.safetensors");
        if !weights.is_file() {
            return Err(Error::input(
                Location::file(&weights),
                "missing: run `scripts/fetch-models minilm` for the TruthfulQA reference judge",
            ));
        }
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let config: Config =
            serde_json::from_str(&text).map_err(|e| Error::input(Location::file(&config_path), e.to_string()))?;
        let device = Device::Cpu;
        // SAFETY: the file is only read, and is not modified while mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, &device) }
            .map_err(|e| model_error("loading MiniLM", e))?;
        let model = BertModel::load(vb, &config).map_err(|e| model_error("loading MiniLM", e))?;
        let mut tokenizer = crate::model::read_tokenizer(&dir.join("tokenizer.json"))?;
        // The file pads every text to 128 tokens; a batch is padded to its longest text only,
        // with the padding masked (`embed_batch`). Truncation is sentence-transformers' 256.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::input(Location::file(dir.join("tokenizer.json")), e.to_string()))?;
        let digest = crate::model::sha256_file(&weights)?;
        Ok(Embedder { model, tokenizer, device, digest, cache: Default::default() })
    }

    /// Loads the weights from [`minilm_dir`].
    pub fn default_weights() -> Result<Self> {
        Self::load(&minilm_dir())
    }

    /// The unit-length embedding of each text, in order. Texts not seen before are embedded
    /// together, in batches of similar length: padded positions are masked out of attention
    /// and out of the mean, so a text's embedding is the one it has alone, within float
    /// rounding (a test holds them to 1e-5).
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<std::sync::Arc<[f32]>>> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let mut new: Vec<&str> = texts.iter().copied().filter(|t| !cache.contains_key(*t)).collect();
        new.sort_unstable();
        new.dedup();
        if cache.len() + new.len() > CACHED {
            cache.clear();
            new = texts.to_vec();
            new.sort_unstable();
            new.dedup();
        }
        let mut encoded = new.iter().map(|t| Ok((*t, self.token_ids(t)?))).collect::<Result<Vec<_>>>()?;
        encoded.sort_by_key(|(_, ids)| ids.len());
        for batch in encoded.chunks(BATCH_TEXTS) {
            let ids: Vec<&[u32]> = batch.iter().map(|(_, ids)| ids.as_slice()).collect();
            let vecs = self.embed_batch(&ids).map_err(|e| model_error("MiniLM forward pass", e))?;
            for ((text, _), v) in batch.iter().zip(vecs) {
                cache.insert(text.to_string(), v.into());
            }
        }
        Ok(texts.iter().map(|t| cache[*t].clone()).collect())
    }

    /// A text's token ids, cut to sentence-transformers' 256 (the closing `[SEP]` kept).
    fn token_ids(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| Error::input(Location::default().field("text"), format!("cannot tokenize: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        if ids.len() > MAX_TOKENS {
            let last = ids[ids.len() - 1];
            ids.truncate(MAX_TOKENS - 1);
            ids.push(last);
        }
        Ok(ids)
    }

    /// One forward pass over texts padded to the longest: the mean of each text's own token
    /// states (padding masked out of attention and of the mean), L2-normalised.
    fn embed_batch(&self, texts: &[&[u32]]) -> candle_core::Result<Vec<Vec<f32>>> {
        let len = texts.iter().map(|t| t.len()).max().unwrap_or(0);
        let (mut ids, mut mask) = (Vec::with_capacity(texts.len() * len), Vec::with_capacity(texts.len() * len));
        for t in texts {
            ids.extend(t.iter().copied().chain(std::iter::repeat_n(0, len - t.len())));
            mask.extend(std::iter::repeat_n(1u32, t.len()).chain(std::iter::repeat_n(0, len - t.len())));
        }
        let shape = (texts.len(), len);
        let input = Tensor::from_vec(ids, shape, &self.device)?;
        let mask = Tensor::from_vec(mask, shape, &self.device)?;
        let hidden = self.model.forward(&input, &input.zeros_like()?, Some(&mask))?;
        let weights = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let mean = hidden.broadcast_mul(&weights)?.sum(1)?.broadcast_div(&weights.sum(1)?)?;
        let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?;
        mean.broadcast_div(&norm)?.to_vec2::<f32>()
    }
}

/// Cosine similarity of two unit vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
