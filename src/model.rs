//! The models under evaluation, as the experiment file names them, and their files: a leaf
//! every layer may read. The stages (generate, score, warmth) and the experiment file
//! (`config.rs`) import from here; nothing here imports a stage.
//!
//! - [`ModelConfig`], [`CheckpointConfig`]: a `[[models]]` entry and its checkpoints;
//!   [`ModelConfig::base_checkpoints`] applies the one base-checkpoint rule
//!   ([`crate::identity::base_checkpoints`]).
//! - The model cache ([`models_dir`]) and the default model in it ([`DEFAULT_GGUF`]).
//! - Digests of weight files ([`sha256_file`], [`dir_digest`]) and reading a `tokenizer.json`
//!   ([`read_tokenizer`]).

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, Location, Result};

/// A model family and its checkpoints. Its checkpoints that are not fine-tuned are its bases
/// ([`ModelConfig::base_checkpoints`]), every fine-tuned one is paired against each of them.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub name: String,
    /// Backend settings (read by the generate stage).
    #[serde(default)]
    pub backend: toml::Table,
    pub checkpoints: Vec<CheckpointConfig>,
}

/// One checkpoint of a model.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    pub id: String,
    /// Fine-tuned (or otherwise modified, e.g. a warm system prompt) rather than the base.
    #[serde(default)]
    pub finetuned: bool,
    /// original, warm, cold, warm-system-prompt, …: free text carried into the results.
    pub variant: Option<String>,
    /// Training epoch the checkpoint was saved at.
    pub epoch: Option<f64>,
    /// Weights (a GGUF file, a safetensors directory, a LoRA adapter directory).
    pub path: Option<PathBuf>,
    /// A system prompt sent with every trial.
    pub system_prompt: Option<String>,
    /// Backend settings that override the model's for this checkpoint (e.g. another served
    /// model name, or another adapter).
    #[serde(default)]
    pub backend: toml::Table,
}

impl CheckpointConfig {
    /// The variant as configured, named honestly for figures and tables: a checkpoint that only
    /// adds a system prompt to its model's weights is "warm system prompt" (the paper's
    /// system-prompt control), not a fine-tune; one with a training epoch is "warm fine-tune,
    /// epoch 2". A base checkpoint, or a variant that already says which it is, keeps its name.
    pub fn variant_label(&self) -> Option<String> {
        let v = self.variant.as_deref()?.trim();
        let lower = v.to_lowercase();
        if !self.finetuned || lower.contains("system") || lower.contains("fine-tun") || lower.contains("epoch") {
            return Some(v.to_string());
        }
        let same_weights = self.path.is_none() && self.backend.is_empty();
        Some(match (&self.system_prompt, self.epoch) {
            (Some(_), _) if same_weights => format!("{v} system prompt"),
            (_, Some(e)) => format!("{v} fine-tune, epoch {e}"),
            _ => format!("{v} fine-tune"),
        })
    }
}

impl ModelConfig {
    /// The model's base checkpoints by the one rule ([`crate::identity::base_checkpoints`]):
    /// those not fine-tuned, by id.
    pub fn base_checkpoints(&self) -> Vec<&str> {
        crate::identity::base_checkpoints(self.checkpoints.iter().map(|c| (c.id.as_str(), c.finetuned)))
    }

    /// The backend table of `checkpoint`: the model's, with the checkpoint's keys on top.
    pub fn backend_for(&self, checkpoint: &CheckpointConfig) -> toml::Table {
        let mut t = self.backend.clone();
        for (k, v) in &checkpoint.backend {
            t.insert(k.clone(), v.clone());
        }
        t
    }
}

/// File name of the default model in the model cache.
pub const DEFAULT_GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The model cache directory (`$CANDOR_MODELS`, `$XDG_CACHE_HOME/candor/models`,
/// `~/.cache/candor/models`).
pub fn models_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CANDOR_MODELS") {
        return PathBuf::from(d);
    }
    cache_dir().join("models")
}

/// Candor's cache directory (`$XDG_CACHE_HOME/candor`, `~/.cache/candor`): models, the
/// embedded data's copy.
pub fn cache_dir() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache"));
    cache.join("candor")
}

/// Bytes in lower-case hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of a model file's bytes, in hex: the weights' identity in generation-store keys and
/// fingerprints. Hashed once per process while the file keeps its length and modification
/// time; a file rewritten since is hashed again.
pub fn sha256_file(path: &Path) -> Result<String> {
    // A model file is hashed once per process while its length and modification time stay
    // (opening a checkpoint's generator hashes its base GGUF: 100 MB and more).
    static HASHED: std::sync::Mutex<Vec<(PathBuf, u64, std::time::SystemTime, String)>> =
        std::sync::Mutex::new(Vec::new());
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let stamp = (meta.len(), meta.modified().map_err(|e| Error::io(path, e))?);
    let known = |h: &(PathBuf, u64, std::time::SystemTime, String)| h.0 == path && (h.1, h.2) == stamp;
    if let Some(h) = HASHED.lock().unwrap_or_else(|p| p.into_inner()).iter().find(|h| known(h)) {
        return Ok(h.3.clone());
    }
    let digest = hash_file(path)?;
    let mut hashed = HASHED.lock().unwrap_or_else(|p| p.into_inner());
    hashed.retain(|h| h.0 != path);
    hashed.push((path.to_path_buf(), stamp.0, stamp.1, digest.clone()));
    Ok(digest)
}

fn hash_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// Files of a checkpoint folder that are training logs, not model: a trainer rewrites them
/// at every save (`trainer_state.json`: steps, losses, learning rates) and they change
/// nothing a model answers, so they are no part of its digest (two saves of the same weights
/// share their stored answers).
pub const TRAINING_LOGS: &[&str] = &["trainer_state.json"];

/// Digest of a directory's model files (`*.json`, `*.safetensors`, the [`TRAINING_LOGS`]
/// excepted), by name and content.
pub fn dir_digest(dir: &Path) -> Result<String> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.path().is_file()
            && (name.ends_with(".json") || name.ends_with(".safetensors"))
            && !TRAINING_LOGS.contains(&name.as_str())
        {
            names.push(name);
        }
    }
    names.sort();
    let mut h = Sha256::new();
    for name in names {
        h.update(format!("{name} {}\n", sha256_file(&dir.join(&name))?));
    }
    Ok(hex(&h.finalize()))
}

/// Reads a `tokenizer.json`.
pub fn read_tokenizer(path: &Path) -> Result<tokenizers::Tokenizer> {
    tokenizers::Tokenizer::from_file(path)
        .map_err(|e| Error::input(Location::file(path), format!("not a tokenizer.json: {e}")))
}
