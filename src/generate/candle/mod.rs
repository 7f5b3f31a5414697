//! The candle backend: local llama-family models (SmolLM2, Qwen2.5, HF llama checkpoints,
//! LoRA fine-tunes) answering trials in batches on the CPU, or on a GPU with the `cuda` feature.
//!
//! # Configuration
//!
//! A model's `backend` table in the experiment file:
//!
//! ```toml
//! [[models]]
//! name = "smollm2"
//! backend = { kind = "candle", device = "cpu", batch_size = 8, threads = 2 }
//! checkpoints = [
//!   { id = "base" },                                           # the `base` weights
//!   { id = "warm", finetuned = true, path = "adapters/warm" },  # a LoRA adapter onto `base`
//! ]
//! ```
//!
//! | key | meaning | default |
//! |---|---|---|
//! | `kind` | must be `"candle"` | `"candle"` |
//! | `base` | weights of checkpoints without a `path`, and the base a LoRA adapter applies to: a GGUF file or an HF safetensors directory | SmolLM2-135M-Instruct Q4_1 in the model cache (see below) |
//! | `device` | `"cpu"`, `"cuda"`, `"cuda:N"` or `"auto"` (CUDA when built with the `cuda` feature and a GPU is present, else CPU) | `"auto"` |
//! | `batch_size` | sequences decoded together | 8 |
//! | `threads` | CPU threads of candle's matmuls; sets `RAYON_NUM_THREADS`, which candle reads at its first computation in the process, so it must be the first candle work (an explicit `RAYON_NUM_THREADS` wins) | candle's default (physical cores) |
//! | `context` | cap on prompt plus answer tokens (the rotary tables and caches are sized by it) | the model's own context length |
//! | `dequantize` | GGUF weights expanded to f32 at load: `"auto"` (on the CPU, SmolLM2's Q4_1 stays quantized on Candor's own AVX2 kernel, llama.cpp's numerics, where the CPU has AVX2; the other types candle has no SIMD kernel for are expanded), `"all"` (exact f32, 6x the memory), `"none"` | `"auto"` |
//!
//! The weights a checkpoint runs ([`Weights`]), by its `path`:
//!
//! | `path` | weights | how they run |
//! |---|---|---|
//! | none | `base` | as below for a GGUF file or a safetensors directory |
//! | a GGUF file (llama, qwen2) | the file; tokenizer and chat template from its metadata | quantized, or expanded to f32, per `dequantize` |
//! | an HF llama/qwen2 safetensors directory (`config.json`, `*.safetensors`, `tokenizer.json`, optionally `tokenizer_config.json` with a `chat_template`) | the directory | dense f32 |
//! | a PEFT LoRA adapter directory (`adapter_config.json`, `adapter_model.safetensors`, e.g. a trainer's `checkpoint-N/`) on a GGUF `base` (the default SmolLM2 included) | `base` plus the adapter | each adapted projection computes `W·x + s·B·A·x`: the low-rank term beside a weight that stays quantized (every weight, adapted or not, keeps its kernel and memory), merged into one expanded to f32; the adapter's HF names map to llama.cpp's (`model.layers.N.self_attn.q_proj` → `blk.N.attn_q`, …) and its q/k rows are permuted as llama.cpp's converter permutes llama's |
//! | the same on a safetensors `base` | `base` plus the adapter | merged at load (`W + s·B·A`), dense f32 |
//!
//! An adapter's own `tokenizer.json` and `tokenizer_config.json` chat template, where it has
//! them, win over the base's. An adapter naming a module the base lacks (or one with no GGUF
//! counterpart, such as `lm_head`), a pair whose rank or shape does not fit, or an unreadable
//! `adapter_model.safetensors` is an input error naming the file and the tensor.
//!
//! The model cache is `$CANDOR_MODELS`, else `$XDG_CACHE_HOME/candor/models`, else
//! `~/.cache/candor/models`; `scripts/fetch-models` fills it.
//!
//! # What a generator's fingerprint covers
//!
//! `candle:<sha256 of the weights>:system:<digest of the checkpoint's system prompt>`; the
//! weights digest covers a GGUF file, or every `*.json` and `*.safetensors` file of a
//! safetensors or adapter directory but a trainer's log (`trainer_state.json`, see
//! [`crate::model::TRAINING_LOGS`]), and, for an adapter, its base's digest; so changed
//! weights never share stored answers, and two saves of the same weights do. It is part of every generation-store key and of the
//! `generator` column of every response row.

pub mod chat;
pub mod engine;
pub mod gpt2;
pub mod llama;
pub mod lora;
pub mod tokenizer;

#[cfg(test)]
pub(crate) mod tests;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use engine::model_error;
pub use engine::{BatchStats, Engine, PromptBudget};

use crate::error::{Error, Location, Result};
use crate::generate::{GenRequest, Generation, Generator, Job};
use crate::model::{CheckpointConfig, DEFAULT_GGUF, ModelConfig, dir_digest, hex, models_dir, sha256_file};

/// Where a backend runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    Cuda(usize),
    Auto,
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceChoice::Cpu),
            "auto" => Ok(DeviceChoice::Auto),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| format!("`{s}` is not a device (cpu, cuda, cuda:N, auto)")),
        }
    }
}

impl DeviceChoice {
    /// Opens the device. Only this is behind the `cuda` feature: every model runs on whichever
    /// device it is given.
    pub fn open(self) -> Result<Device> {
        let key = "backend.device";
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            #[cfg(feature = "cuda")]
            DeviceChoice::Cuda(n) => Device::new_cuda(n).map_err(|e| Error::config(key, format!("cuda:{n}: {e}"))),
            #[cfg(not(feature = "cuda"))]
            DeviceChoice::Cuda(n) => {
                Err(Error::config(key, format!("cuda:{n} needs Candor built with `--features cuda`")))
            }
            #[cfg(feature = "cuda")]
            DeviceChoice::Auto if candle_core::utils::cuda_is_available() => DeviceChoice::Cuda(0).open(),
            DeviceChoice::Auto => Ok(Device::Cpu),
        }
    }
}

/// Sets candle's CPU thread count (`RAYON_NUM_THREADS`) unless the environment already does;
/// returns the count candle will use. Only the first call in a process sets anything (the count
/// cannot change once candle's pools exist), and it must be made while the process has one
/// thread: the command line calls it at start-up (`--threads`, then the experiment's candle
/// backends' `threads`, see [`crate::generate::backend::init_threads`]), before any runtime,
/// pool or model exists. Later calls, and generators opened afterwards, never touch the
/// environment.
pub fn init_threads(threads: usize) -> usize {
    static SET: std::sync::Once = std::sync::Once::new();
    SET.call_once(|| {
        if std::env::var_os("RAYON_NUM_THREADS").is_none() && threads > 0 {
            // SAFETY: the first call is made at start-up while the process has a single
            // thread (see above), so no other thread reads or writes the environment during
            // `set_var`; the `Once` makes every later call skip it.
            unsafe { std::env::set_var("RAYON_NUM_THREADS", threads.to_string()) };
        }
    });
    candle_core::utils::get_num_threads()
}

/// The `backend` table of a candle model, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct CandleOptions {
    pub base: Option<PathBuf>,
    pub device: DeviceChoice,
    pub batch_size: usize,
    pub threads: Option<usize>,
    pub context: Option<usize>,
    pub dequantize: llama::Dequantize,
}

impl Default for CandleOptions {
    fn default() -> Self {
        CandleOptions {
            base: None,
            device: DeviceChoice::Auto,
            batch_size: 8,
            threads: None,
            context: None,
            dequantize: llama::Dequantize::Auto,
        }
    }
}

impl CandleOptions {
    /// Reads a model's `backend` table; an unknown key or a wrong value names the key.
    pub fn from_table(table: &toml::Table) -> Result<Self> {
        let mut o = CandleOptions::default();
        let key = |k: &str| format!("backend.{k}");
        let positive = |k: &str, v: &toml::Value| -> Result<usize> {
            v.as_integer()
                .filter(|n| *n > 0)
                .map(|n| n as usize)
                .ok_or_else(|| Error::config(key(k), format!("{v} is not a positive integer")))
        };
        let string = |k: &str, v: &toml::Value| -> Result<String> {
            v.as_str().map(str::to_string).ok_or_else(|| Error::config(key(k), format!("{v} is not a string")))
        };
        for (k, v) in table {
            match k.as_str() {
                "kind" => {
                    let kind = string(k, v)?;
                    if kind != "candle" {
                        return Err(Error::config(key(k), format!("`{kind}` is not the candle backend")));
                    }
                }
                "base" => o.base = Some(PathBuf::from(string(k, v)?)),
                "device" => o.device = string(k, v)?.parse().map_err(|e| Error::config(key(k), e))?,
                "batch_size" => o.batch_size = positive(k, v)?,
                "threads" => o.threads = Some(positive(k, v)?),
                "context" => o.context = Some(positive(k, v)?),
                "dequantize" => o.dequantize = string(k, v)?.parse().map_err(|e| Error::config(key(k), e))?,
                other => {
                    return Err(Error::config(
                        key(other),
                        "unknown key (kind, base, device, batch_size, threads, context, dequantize)".to_string(),
                    ));
                }
            }
        }
        Ok(o)
    }

    /// The base weights: `base`, else the default model in the cache.
    pub fn base_path(&self) -> PathBuf {
        self.base.clone().unwrap_or_else(|| models_dir().join(DEFAULT_GGUF))
    }
}

/// Which weights a checkpoint runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Weights {
    Gguf(PathBuf),
    /// An HF safetensors model directory.
    Safetensors(PathBuf),
    /// A LoRA adapter directory applied to a base: [`Weights::Gguf`] or [`Weights::Safetensors`].
    Lora {
        base: Box<Weights>,
        adapter: PathBuf,
    },
}

impl Weights {
    /// Tells a checkpoint's weights apart by what is on disk; `path` None means `base`.
    pub fn resolve(path: Option<&Path>, base: &Path) -> Result<Self> {
        let plain = |p: &Path| -> Result<Weights> {
            if p.is_dir() {
                if lora::Adapter::is_adapter_dir(p) {
                    return Err(Error::input(Location::file(p), "a LoRA adapter cannot be a base model"));
                }
                if p.join("config.json").is_file() {
                    return Ok(Weights::Safetensors(p.to_path_buf()));
                }
                return Err(Error::input(
                    Location::file(p),
                    "directory has neither config.json nor adapter_config.json",
                ));
            }
            if p.is_file() {
                return Ok(Weights::Gguf(p.to_path_buf()));
            }
            let hint = if p.file_name().is_some_and(|n| n == DEFAULT_GGUF) { "; run scripts/fetch-models" } else { "" };
            Err(Error::input(Location::file(p), format!("no such model file or directory{hint}")))
        };
        match path {
            None => plain(base),
            Some(p) if p.is_dir() && lora::Adapter::is_adapter_dir(p) => {
                Ok(Weights::Lora { base: Box::new(plain(base)?), adapter: p.to_path_buf() })
            }
            Some(p) => plain(p),
        }
    }

    /// A digest of every file the weights are read from.
    pub fn digest(&self) -> Result<String> {
        match self {
            Weights::Gguf(p) => sha256_file(p),
            Weights::Safetensors(d) => dir_digest(d),
            Weights::Lora { base, adapter } => {
                let mut h = Sha256::new();
                h.update(format!("base {}\nadapter {}\n", base.digest()?, dir_digest(adapter)?));
                Ok(hex(&h.finalize()))
            }
        }
    }

    /// Loads the weights; `dequantize` applies to a GGUF file (base or not).
    pub fn load(&self, device: &Device, context: Option<usize>, dequantize: llama::Dequantize) -> Result<Engine> {
        match self {
            Weights::Gguf(p) => load_gguf(p, None, device, context, dequantize),
            Weights::Safetensors(d) => load_safetensors(d, None, device, context),
            Weights::Lora { base, adapter } => match base.as_ref() {
                Weights::Gguf(p) => load_gguf(p, Some(adapter), device, context, dequantize),
                Weights::Safetensors(d) => load_safetensors(d, Some(adapter), device, context),
                Weights::Lora { .. } => {
                    Err(Error::input(Location::file(adapter), "a LoRA adapter cannot be the base of another"))
                }
            },
        }
    }
}

/// An adapter's own tokenizer or chat-template file (what training used), which wins over
/// the base's.
fn adapter_file(adapter: Option<&Path>, name: &str) -> Option<PathBuf> {
    adapter.map(|a| a.join(name)).filter(|p| p.is_file())
}

/// The `chat_template` of a `tokenizer_config.json`, if the file exists and has one.
fn template_file(path: &Path) -> Result<Option<String>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::input(Location::file(path), e.to_string()))?;
    Ok(v.get("chat_template").and_then(|t| t.as_str()).map(str::to_string))
}

/// Loads a GGUF model with the tokenizer and chat template from its own metadata, and a LoRA
/// adapter applied if given (see [`llama::Model::adapted`]; the adapter's own
/// `tokenizer.json` and `tokenizer_config.json` chat template, where it has them, win).
///
/// The base is read once per process ([`gguf_base`]): each checkpoint of a training run is the
/// same base plus its own adapter, so only the adapter is read for the next one.
pub fn load_gguf(
    path: &Path,
    adapter: Option<&Path>,
    device: &Device,
    context: Option<usize>,
    dequantize: llama::Dequantize,
) -> Result<Engine> {
    let base = gguf_base(path, device, context, dequantize)?;
    let Some(adapter) = adapter else { return Ok(base.engine) };
    let mut deltas =
        lora::Adapter::read(adapter)?.deltas(lora::Layout::Gguf(&base.cfg), |name| base.shapes.get(name).cloned())?;
    let model = base.engine.model.adapted(&mut deltas).map_err(|e| {
        Error::input(Location::file(adapter), format!("applying the adapter to {}: {e}", path.display()))
    })?;
    deltas.finish()?;
    let mut engine = Engine { model, ..base.engine };
    if let Some(p) = adapter_file(Some(adapter), "tokenizer.json") {
        engine.tokenizer = crate::model::read_tokenizer(&p)?;
        engine.stop_ids = Engine::stop_ids_for(&engine.tokenizer, &base.eos);
    }
    if let Some(p) = adapter_file(Some(adapter), "tokenizer_config.json")
        && let Some(t) = template_file(&p)?
    {
        engine.chat = chat::ChatTemplate::from_jinja(Some(&t))
            .map_err(|e| Error::input(Location::file(&p).field("chat_template"), e))?;
    }
    Ok(engine)
}

/// A GGUF model as read from its file: the model, tokenizer, chat format and stop tokens, its
/// shape, its tensors' shapes (what an adapter is checked against) and its end-of-sequence ids.
#[derive(Clone)]
struct GgufBase {
    engine: Engine,
    cfg: llama::Config,
    shapes: std::sync::Arc<HashMap<String, Vec<usize>>>,
    eos: Vec<u32>,
}

/// The GGUF model at `path`, read once per process while the file keeps its length and
/// modification time and it is asked for with the same device, context and `dequantize`:
/// the last one read is kept (its weights are shared, not copied, by every engine made from
/// it, so keeping it costs memory only while no checkpoint of it is open).
fn gguf_base(path: &Path, device: &Device, context: Option<usize>, dequantize: llama::Dequantize) -> Result<GgufBase> {
    /// What a base was read from and for: path, length, modification time, device, context,
    /// `dequantize`.
    type Key = (PathBuf, u64, std::time::SystemTime, String, Option<usize>, llama::Dequantize);
    static LAST: std::sync::Mutex<Option<(Key, GgufBase)>> = std::sync::Mutex::new(None);
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let key: Key = (
        path.to_path_buf(),
        meta.len(),
        meta.modified().map_err(|e| Error::io(path, e))?,
        format!("{:?}", device.location()),
        context,
        dequantize,
    );
    // Held while reading: a second open of the same base waits for the first.
    let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((k, base)) = last.as_ref()
        && *k == key
    {
        return Ok(base.clone());
    }
    *last = None;
    let bad = |msg: String| Error::input(Location::file(path), msg);
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let ct = gguf_file::Content::read(&mut file).map_err(|e| bad(format!("not a readable GGUF file: {e}")))?;
    let cfg = llama::Model::gguf_config(&ct, context).map_err(|e| bad(e.to_string()))?;
    let model =
        llama::Model::from_gguf(&ct, &mut file, &cfg, device, dequantize).map_err(|e| bad(format!("weights: {e}")))?;
    let tokenizer = tokenizer::from_gguf(&ct, path)?;
    let template = match ct.metadata.get("tokenizer.chat_template") {
        Some(v) => Some(v.to_string().map_err(|e| bad(format!("tokenizer.chat_template: {e}")))?.clone()),
        None => None,
    };
    let chat = chat::ChatTemplate::from_jinja(template.as_deref()).map_err(bad)?;
    let eos: Vec<u32> =
        ct.metadata.get("tokenizer.ggml.eos_token_id").and_then(|v| v.to_u32().ok()).into_iter().collect();
    let stop_ids = Engine::stop_ids_for(&tokenizer, &eos);
    let shapes = ct.tensor_infos.iter().map(|(name, t)| (name.clone(), t.shape.dims().to_vec())).collect();
    let base =
        GgufBase { engine: Engine { model, tokenizer, chat, stop_ids }, cfg, shapes: std::sync::Arc::new(shapes), eos };
    *last = Some((key, base.clone()));
    Ok(base)
}

/// `config.json` of an HF llama or qwen2 model: the fields the graph needs.
#[derive(Debug, Deserialize)]
struct HfConfig {
    #[serde(default = "llama_type")]
    model_type: String,
    hidden_size: usize,
    intermediate_size: usize,
    vocab_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    rope_theta: f32,
    max_position_embeddings: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    eos_token_id: Option<serde_json::Value>,
    head_dim: Option<usize>,
}

fn llama_type() -> String {
    "llama".into()
}

fn default_rope_theta() -> f32 {
    10_000.0
}

impl HfConfig {
    fn read(dir: &Path) -> Result<(Self, llama::Config)> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let hf: HfConfig = serde_json::from_str(&text)
            .map_err(|e| Error::input(Location::file(&path).line(e.line() as u64), e.to_string()))?;
        let bad = |field: &str, msg: String| Error::input(Location::file(&path).field(field), msg);
        let qkv_bias = match hf.model_type.as_str() {
            "llama" => false,
            "qwen2" => true,
            other => return Err(bad("model_type", format!("`{other}` is not supported (llama, qwen2)"))),
        };
        if hf.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(bad("rope_scaling", "scaled rotary embeddings are not supported".into()));
        }
        if hf.head_dim.is_some_and(|d| d * hf.num_attention_heads != hf.hidden_size) {
            return Err(bad("head_dim", "a head size other than hidden_size / num_attention_heads".into()));
        }
        let cfg = llama::Config {
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            rms_norm_eps: hf.rms_norm_eps,
            rope_theta: hf.rope_theta,
            rope: llama::Rope::Halves,
            max_seq_len: hf.max_position_embeddings,
            qkv_bias,
            tie_word_embeddings: hf.tie_word_embeddings,
        };
        Ok((hf, cfg))
    }

    fn eos_ids(&self) -> Vec<u32> {
        match &self.eos_token_id {
            Some(serde_json::Value::Number(n)) => n.as_u64().map(|n| n as u32).into_iter().collect(),
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_u64()).map(|n| n as u32).collect(),
            _ => Vec::new(),
        }
    }
}

/// Reads every `*.safetensors` file of a directory (one file or shards) into memory.
fn read_safetensors_dir(dir: &Path) -> Result<HashMap<String, candle_core::Tensor>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::input(Location::file(dir), "holds no .safetensors file"));
    }
    let mut tensors = HashMap::new();
    for f in files {
        let t = candle_core::safetensors::load(&f, &Device::Cpu)
            .map_err(|e| Error::input(Location::file(&f), format!("cannot read safetensors: {e}")))?;
        tensors.extend(t);
    }
    Ok(tensors)
}

/// Loads an HF llama/qwen2 safetensors directory, with a LoRA adapter merged in if given,
/// as f32 on `device`. The tokenizer is the adapter's `tokenizer.json` if it has one, else the
/// base's; the chat template is read from `tokenizer_config.json` the same way.
pub fn load_safetensors(dir: &Path, adapter: Option<&Path>, device: &Device, context: Option<usize>) -> Result<Engine> {
    let (hf, mut cfg) = HfConfig::read(dir)?;
    if let Some(c) = context {
        cfg.max_seq_len = cfg.max_seq_len.min(c);
    }
    let tensors = read_safetensors_dir(dir)?;
    let mut deltas = match adapter {
        Some(a) => {
            lora::Adapter::read(a)?.deltas(lora::Layout::Hf, |name| tensors.get(name).map(|t| t.dims().to_vec()))?
        }
        None => llama::Deltas::default(),
    };
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    let model = llama::Model::load(vb, &cfg, &mut deltas)
        .map_err(|e| Error::input(Location::file(dir), format!("weights: {e}")))?;
    deltas.finish()?;
    let pick = |name: &str| adapter_file(adapter, name).unwrap_or_else(|| dir.join(name));
    let tokenizer = crate::model::read_tokenizer(&pick("tokenizer.json"))?;
    let tc_path = pick("tokenizer_config.json");
    let template = template_file(&tc_path)?;
    let chat = chat::ChatTemplate::from_jinja(template.as_deref())
        .map_err(|e| Error::input(Location::file(&tc_path).field("chat_template"), e))?;
    let stop_ids = Engine::stop_ids_for(&tokenizer, &hf.eos_ids());
    Ok(Engine { model, tokenizer, chat, stop_ids })
}

/// A [`Generator`] on a local model.
#[derive(Debug)]
pub struct CandleGenerator {
    engine: Engine,
    weights: Weights,
    system_prompt: Option<String>,
    batch_size: usize,
    fingerprint: String,
    last_stats: BatchStats,
}

impl CandleGenerator {
    /// The generator of one checkpoint of a model configured with the candle backend.
    pub fn new(model: &ModelConfig, checkpoint: &CheckpointConfig) -> Result<Self> {
        let options = CandleOptions::from_table(&model.backend_for(checkpoint))?;
        let weights = Weights::resolve(checkpoint.path.as_deref(), &options.base_path())?;
        Self::open(&options, weights, checkpoint.system_prompt.clone())
    }

    /// A generator on `weights`; `system_prompt` goes with every request that has none.
    pub fn open(options: &CandleOptions, weights: Weights, system_prompt: Option<String>) -> Result<Self> {
        if let Some(t) = options.threads {
            let running = candle_core::utils::get_num_threads();
            if t != running {
                eprintln!(
                    "warning: the candle backend asks for {t} threads but candle runs {running} (the count is fixed at start-up: --threads, RAYON_NUM_THREADS or the experiment's first candle backend)"
                );
            }
        }
        let device = options.device.open()?;
        let engine = weights.load(&device, options.context, options.dequantize)?;
        let system = match &system_prompt {
            Some(s) => hex(&Sha256::digest(s.as_bytes()))[..16].to_string(),
            None => "none".to_string(),
        };
        let fingerprint = format!("candle:{}:system:{system}", weights.digest()?);
        Ok(CandleGenerator {
            engine,
            weights,
            system_prompt,
            batch_size: options.batch_size,
            fingerprint,
            last_stats: BatchStats::default(),
        })
    }

    /// Answers `requests` and reports the token counts and timings of the run.
    pub fn run_batch(&mut self, requests: &[GenRequest]) -> Result<(Vec<Result<Generation>>, BatchStats)> {
        let (out, stats) = self.engine.run(requests, self.system_prompt.as_deref(), self.batch_size)?;
        self.last_stats = stats.clone();
        Ok((out, stats))
    }

    /// Counts and timings of the last [`Generator::generate`] or [`Self::run_batch`].
    pub fn last_stats(&self) -> &BatchStats {
        &self.last_stats
    }

    /// The loaded model, tokenizer and chat format (for scoring with the same weights).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    pub fn set_batch_size(&mut self, batch_size: usize) {
        self.batch_size = batch_size.max(1);
    }
}

impl Generator for CandleGenerator {
    fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }

    fn generate(&mut self, requests: &[GenRequest]) -> Result<Vec<Result<Generation>>> {
        self.run_batch(requests).map(|(out, _)| out)
    }

    /// Continuous batching: jobs join the running batch between decode steps.
    fn serve(&mut self, queue: &std::sync::mpsc::Receiver<Job>, batch_size: usize) {
        loop {
            let run = self.engine.run_continuous(
                self.system_prompt.as_deref(),
                batch_size,
                |room, idle| {
                    let mut jobs = Vec::new();
                    if idle {
                        match queue.recv() {
                            Ok(job) => jobs.push(job),
                            Err(_) => return Vec::new(),
                        }
                    }
                    while jobs.len() < room {
                        match queue.try_recv() {
                            Ok(job) => jobs.push(job),
                            Err(_) => break,
                        }
                    }
                    jobs.into_iter().map(|j| (j.request, j.reply)).collect()
                },
                |reply, answer| {
                    let _ = reply.send(answer);
                },
                |reply| !reply.is_closed(),
            );
            match run {
                // Idle with the queue closed.
                Ok(_) => return,
                // Every job in flight was answered with the error; serve the next ones.
                Err(e) => eprintln!("candor serve: a forward pass failed: {e}"),
            }
        }
    }

    fn budget(&self) -> Option<std::sync::Arc<dyn crate::generate::TokenBudget>> {
        Some(std::sync::Arc::new(self.engine.budget(self.system_prompt.clone())))
    }
}

/// Per-token log-probabilities of `tokens[1..]` given their prefixes, in one forward pass.
pub fn token_logprobs(engine: &Engine, tokens: &[u32]) -> Result<Vec<f32>> {
    if tokens.len() < 2 {
        return Ok(Vec::new());
    }
    let picked = (|| {
        let logits = engine.model.forward_all_positions(&tokens[..tokens.len() - 1])?;
        let lp = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1)?;
        let next = candle_core::Tensor::new(&tokens[1..], logits.device())?.unsqueeze(1)?;
        lp.gather(&next, 1)?.squeeze(1)?.to_vec1::<f32>()
    })();
    picked.map_err(|e| model_error("log-likelihood pass", e))
}

/// Next-token logits `[vocab]` after each prompt (token ids), prompts prefilled together in one
/// batched pass: the local judge's reading of label probabilities. Only the last position's
/// logits are computed, not the whole `[tokens, vocab]` of [`Engine::logits_all_positions`].
pub fn next_token_logits(engine: &Engine, prompts: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
    let mut caches: Vec<llama::Cache> = prompts.iter().map(|_| llama::Cache::new(engine.model.config())).collect();
    let mut batch: Vec<(&[u32], &mut llama::Cache)> =
        prompts.iter().map(Vec::as_slice).zip(caches.iter_mut()).collect();
    let logits = engine
        .model
        .forward(&mut batch, llama::Positions::Last)
        .map_err(|e| engine::model_error("next-token pass", e))?;
    logits.iter().map(|t| t.to_vec1::<f32>().map_err(|e| engine::model_error("next-token pass", e))).collect()
}
