//! LoRA adapters (PEFT layout) applied to a base model's projections at load time.
//!
//! A fine-tuned checkpoint in the paper is a base model plus a low-rank adapter: each adapted
//! projection becomes `W' = W + s·B·A` with `s = lora_alpha / r` (or `lora_alpha / √r` under
//! rsLoRA). [`Adapter::deltas`] turns the adapter into these changes under the base's own
//! weight names and row order ([`Layout`]: HF safetensors, or llama.cpp's GGUF names with
//! llama's q/k rows permuted); the model applies each as it builds the projection: merged into
//! a dense weight (decoding exactly as fast as the base), or kept beside a quantized one as a
//! low-rank term, so no weight leaves its quantized kernel.
//!
//! The adapter directory holds `adapter_config.json` (`r`, `lora_alpha`, `target_modules`,
//! optionally `use_rslora`, `fan_in_fan_out`) and `adapter_model.safetensors` with PEFT key
//! names, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (`[r, in]`)
//! and `…lora_B.weight` (`[out, r]`), which apply to the base weight
//! `model.layers.0.self_attn.q_proj.weight` (`[out, in]`), or `blk.0.attn_q.weight` in a GGUF.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::llama::{self, Delta, Deltas};
use crate::error::{Error, Location, Result};

/// `adapter_config.json`, the fields merging needs.
#[derive(Clone, Debug, Deserialize)]
pub struct AdapterConfig {
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub target_modules: TargetModules,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Where PEFT recorded the base model; a hint only (often a hub name).
    pub base_model_name_or_path: Option<String>,
}

/// `target_modules`: a list of module names, or a regex string.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    #[default]
    Unspecified,
    List(Vec<String>),
    Regex(String),
}

impl AdapterConfig {
    /// The factor multiplying `B·A`.
    pub fn scale(&self) -> f64 {
        if self.use_rslora { self.lora_alpha / (self.r as f64).sqrt() } else { self.lora_alpha / self.r as f64 }
    }
}

/// A LoRA adapter directory, read and checked.
#[derive(Debug)]
pub struct Adapter {
    pub dir: PathBuf,
    pub config: AdapterConfig,
    /// Base weight name (`model.layers.0.self_attn.q_proj.weight`) → (A, B).
    pub pairs: BTreeMap<String, (Tensor, Tensor)>,
}

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

impl Adapter {
    pub fn is_adapter_dir(dir: &Path) -> bool {
        dir.join(CONFIG_FILE).is_file()
    }

    /// Reads an adapter directory; every tensor must be a `lora_A`/`lora_B` weight with its
    /// partner, of rank `r`.
    pub fn read(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let config: AdapterConfig = serde_json::from_str(&text)
            .map_err(|e| Error::input(Location::file(&cfg_path).line(e.line() as u64), e.to_string()))?;
        let bad_cfg = |field: &str, msg: &str| Error::input(Location::file(&cfg_path).field(field), msg);
        if config.r == 0 {
            return Err(bad_cfg("r", "rank must be positive"));
        }
        if config.fan_in_fan_out {
            return Err(bad_cfg("fan_in_fan_out", "GPT-2-style [in, out] weights are not supported for llama models"));
        }
        let w_path = dir.join(WEIGHTS_FILE);
        let bad = |key: &str, msg: String| Error::input(Location::file(&w_path).field(key), msg);
        let tensors = candle_core::safetensors::load(&w_path, &Device::Cpu)
            .map_err(|e| Error::input(Location::file(&w_path), format!("cannot read safetensors: {e}")))?;
        let mut halves: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
        for (key, t) in tensors {
            let (module, is_a) = lora_key(&key).ok_or_else(|| {
                bad(
                    &key,
                    "not a LoRA weight (expected `base_model.model.<module>.lora_A|lora_B[.default].weight`)".into(),
                )
            })?;
            let entry = halves.entry(format!("{module}.weight")).or_default();
            if is_a { entry.0 = Some(t) } else { entry.1 = Some(t) }
        }
        let targeted = |module: &str| match &config.target_modules {
            TargetModules::Unspecified => true,
            // PEFT matches a list against the module name's last components.
            TargetModules::List(names) => names.iter().any(|n| module == n || module.ends_with(&format!(".{n}"))),
            // PEFT matches a string with `re.fullmatch`.
            TargetModules::Regex(re) => regex::Regex::new(&format!("^(?:{re})$")).is_ok_and(|re| re.is_match(module)),
        };
        let mut pairs = BTreeMap::new();
        for (base, (a, b)) in halves {
            let module = base.strip_suffix(".weight").unwrap_or(&base);
            if !targeted(module) {
                return Err(bad(
                    &base,
                    format!("module `{module}` is not in target_modules of {}", cfg_path.display()),
                ));
            }
            let (Some(a), Some(b)) = (a, b) else {
                return Err(bad(&base, "has only one of lora_A and lora_B".into()));
            };
            let (ra, _) = a.dims2().map_err(|e| bad(&base, format!("lora_A: {e}")))?;
            let (_, rb) = b.dims2().map_err(|e| bad(&base, format!("lora_B: {e}")))?;
            if ra != config.r || rb != config.r {
                return Err(bad(
                    &base,
                    format!("lora_A is {:?} and lora_B {:?}, rank r = {}", a.dims(), b.dims(), config.r),
                ));
            }
            pairs.insert(base, (a, b));
        }
        if pairs.is_empty() {
            return Err(bad("", "holds no LoRA weight".into()));
        }
        Ok(Adapter { dir: dir.to_path_buf(), config, pairs })
    }

    /// Each LoRA pair as the `s·B·A` of the base weight it adapts, under that weight's name
    /// and in its row order in `layout`. `shape` gives a base weight's shape by name (`None`:
    /// the base has no such weight). A pair whose base weight is absent, or whose shape does not
    /// fit it, is an error naming the adapter file and the pair's HF weight name.
    pub fn deltas(&self, layout: Layout, shape: impl Fn(&str) -> Option<Vec<usize>>) -> Result<Deltas> {
        let file = self.dir.join(WEIGHTS_FILE);
        let bad = |key: &str, msg: String| Error::input(Location::file(&file).field(key), msg);
        let scale = self.config.scale();
        let mut map = BTreeMap::new();
        for (name, (a, b)) in &self.pairs {
            let (target, heads) = match layout {
                Layout::Hf => (name.clone(), None),
                Layout::Gguf(cfg) => gguf_name(name, cfg).ok_or_else(|| {
                    bad(
                        name,
                        "has no counterpart in a GGUF base (only the layers' q/k/v/o and gate/up/down projections \
                         can be adapted)"
                            .into(),
                    )
                })?,
            };
            let shown = if target == *name { String::new() } else { format!(" `{target}`") };
            let dims =
                shape(&target).ok_or_else(|| bad(name, format!("matches no weight{shown} of the base model")))?;
            let [out_dim, in_dim] = dims[..] else {
                return Err(bad(name, format!("the base weight{shown} is {dims:?}, not a matrix")));
            };
            if b.dims()[0] != out_dim || a.dims()[1] != in_dim {
                return Err(bad(
                    name,
                    format!(
                        "B·A is [{}, {}] but the base weight{shown} is [{out_dim}, {in_dim}]",
                        b.dims()[0],
                        a.dims()[1]
                    ),
                ));
            }
            let delta = (|| {
                let a = a.to_dtype(DType::F32)?;
                let mut b = (b.to_dtype(DType::F32)? * scale)?;
                if let Some(heads) = heads {
                    // llama.cpp's converter reorders each head's q/k rows from HF's two halves
                    // into (first, second) pairs for its interleaved rotary kernel; B·A's rows
                    // (B's rows) must follow the base's.
                    let r = b.dims()[1];
                    b = b.reshape((heads, 2, out_dim / heads / 2, r))?.transpose(1, 2)?.reshape((out_dim, r))?;
                }
                Ok::<_, candle_core::Error>(Delta { a, b })
            })()
            .map_err(|e| bad(name, format!("cannot read the LoRA pair: {e}")))?;
            map.insert(target, (name.clone(), delta));
        }
        Ok(Deltas { file, map })
    }
}

/// How a base model names its weights and orders their rows.
#[derive(Clone, Copy, Debug)]
pub enum Layout<'a> {
    /// HF names (`model.layers.0.self_attn.q_proj.weight`), rows as trained.
    Hf,
    /// llama.cpp names (`blk.0.attn_q.weight`); under llama's interleaved rotary layout
    /// ([`llama::Rope::Interleaved`]) the q and k rows are permuted as llama.cpp's converter
    /// does, which the adapter's B must follow.
    Gguf(&'a llama::Config),
}

/// The llama.cpp name of an HF projection weight and, for q/k under the interleaved rotary
/// layout, the number of heads its rows are permuted over.
fn gguf_name(hf: &str, cfg: &llama::Config) -> Option<(String, Option<usize>)> {
    let rest = hf.strip_prefix("model.layers.")?.strip_suffix(".weight")?;
    let (layer, module) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let permuted = |heads: usize| (cfg.rope == llama::Rope::Interleaved).then_some(heads);
    let (gguf, heads) = match module {
        "self_attn.q_proj" => ("attn_q", permuted(cfg.num_heads)),
        "self_attn.k_proj" => ("attn_k", permuted(cfg.num_kv_heads)),
        "self_attn.v_proj" => ("attn_v", None),
        "self_attn.o_proj" => ("attn_output", None),
        "mlp.gate_proj" => ("ffn_gate", None),
        "mlp.up_proj" => ("ffn_up", None),
        "mlp.down_proj" => ("ffn_down", None),
        _ => return None,
    };
    Some((format!("blk.{layer}.{gguf}.weight"), heads))
}

/// The layer projections an adapter can target, by PEFT's short names, with their HF path
/// under the layer and `[out, in]` in `cfg`.
pub fn projections(cfg: &llama::Config) -> [(&'static str, &'static str, usize, usize); 7] {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let (q, kv) = (cfg.num_heads * cfg.head_dim(), cfg.num_kv_heads * cfg.head_dim());
    [
        ("q_proj", "self_attn.q_proj", q, h),
        ("k_proj", "self_attn.k_proj", kv, h),
        ("v_proj", "self_attn.v_proj", kv, h),
        ("o_proj", "self_attn.o_proj", h, q),
        ("gate_proj", "mlp.gate_proj", i, h),
        ("up_proj", "mlp.up_proj", i, h),
        ("down_proj", "mlp.down_proj", h, i),
    ]
}

/// A seeded random adapter for a model of shape `cfg`, written as PEFT writes one (for tests
/// and `candor bench generate --random-adapter`; it is no fine-tune of anything).
#[derive(Clone, Debug)]
pub struct RandomAdapter<'a> {
    /// PEFT short names of the projections adapted in every layer (`q_proj`, …).
    pub targets: &'a [&'a str],
    /// `r`; `lora_alpha` is `2r`, as the paper's r = 8, alpha = 16.
    pub rank: usize,
    pub seed: u64,
    /// Spread of the entries of A and B (each the sum of three uniforms on ±`std`).
    pub std: f32,
    /// B = 0, as PEFT initialises it: the adapter changes nothing.
    pub zero_b: bool,
}

impl RandomAdapter<'_> {
    /// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir`.
    pub fn write(&self, dir: &Path, cfg: &llama::Config) -> Result<()> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed);
        let mut random = |rows: usize, cols: usize| {
            let data: Vec<f32> =
                (0..rows * cols).map(|_| self.std * (0..3).map(|_| rng.gen_range(-1.0f32..1.0)).sum::<f32>()).collect();
            Tensor::from_vec(data, (rows, cols), &Device::Cpu)
        };
        let (r, mut tensors) = (self.rank, std::collections::HashMap::new());
        let model_error = |e: candle_core::Error| super::engine::model_error("random adapter", e);
        for l in 0..cfg.num_layers {
            for (short, path, out, inp) in projections(cfg) {
                if !self.targets.contains(&short) {
                    continue;
                }
                let key = format!("base_model.model.model.layers.{l}.{path}");
                let a = random(r, inp).map_err(model_error)?;
                let b = random(out, r).map_err(model_error)?;
                let b = if self.zero_b { b.zeros_like().map_err(model_error)? } else { b };
                tensors.insert(format!("{key}.lora_A.weight"), a);
                tensors.insert(format!("{key}.lora_B.weight"), b);
            }
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let config =
            serde_json::json!({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": self.targets});
        let cfg_path = dir.join(CONFIG_FILE);
        std::fs::write(&cfg_path, config.to_string()).map_err(|e| Error::io(&cfg_path, e))?;
        let w_path = dir.join(WEIGHTS_FILE);
        candle_core::safetensors::save(&tensors, &w_path)
            .map_err(|e| Error::io(&w_path, std::io::Error::other(e.to_string())))
    }
}

/// `base_model.model.<module>.lora_A[.default].weight` → (`<module>`, is A).
fn lora_key(key: &str) -> Option<(&str, bool)> {
    let rest = key.strip_prefix("base_model.model.")?;
    let rest = rest.strip_suffix(".weight")?;
    let rest = rest.strip_suffix(".default").unwrap_or(rest);
    if let Some(m) = rest.strip_suffix(".lora_A") {
        Some((m, true))
    } else {
        rest.strip_suffix(".lora_B").map(|m| (m, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_keys_name_their_base_weight() {
        assert_eq!(
            lora_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
            Some(("model.layers.0.self_attn.q_proj", true))
        );
        assert_eq!(
            lora_key("base_model.model.model.layers.3.mlp.up_proj.lora_B.default.weight"),
            Some(("model.layers.3.mlp.up_proj", false))
        );
        assert_eq!(lora_key("model.layers.0.self_attn.q_proj.weight"), None);
        assert_eq!(lora_key("base_model.model.lm_head.weight"), None);
    }
}
