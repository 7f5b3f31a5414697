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

/// A sentence embedder.
pub struct Embedder {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
    /// sha256 of the weights, part of the judge id.
    pub digest: String,
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
        // The file pads every text to 128 tokens; one text at a time needs no padding, and a
        // padded mean would pool [PAD] states. Truncation is sentence-transformers' 256, below.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::input(Location::file(dir.join("tokenizer.json")), e.to_string()))?;
        let digest = crate::model::sha256_file(&weights)?;
        Ok(Embedder { model, tokenizer, device, digest })
    }

    /// Loads the weights from [`minilm_dir`].
    pub fn default_weights() -> Result<Self> {
        Self::load(&minilm_dir())
    }

    /// The unit-length embedding of each text.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>> {
        texts.iter().map(|t| self.embed_one(t)).collect()
    }

    fn embed_one(&self, text: &str) -> Result<Vec<f32>> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| Error::input(Location::default().field("text"), format!("cannot tokenize: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        if ids.len() > MAX_TOKENS {
            // Keep the closing [SEP].
            let last = ids[ids.len() - 1];
            ids.truncate(MAX_TOKENS - 1);
            ids.push(last);
        }
        let run = || -> candle_core::Result<Vec<f32>> {
            let input = Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?;
            let types = input.zeros_like()?;
            let hidden = self.model.forward(&input, &types, None)?;
            let mean = hidden.mean(1)?.squeeze(0)?;
            let norm = mean.sqr()?.sum_all()?.sqrt()?;
            mean.broadcast_div(&norm)?.to_vec1::<f32>()
        };
        run().map_err(|e| model_error("MiniLM forward pass", e))
    }
}

/// Cosine similarity of two unit vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
