//! Tests of the candle backend on tiny random models written by the tests themselves (2 layers,
//! width 32, a byte-level vocabulary), and one on the real SmolLM2 when it is in the cache.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokenizers::Tokenizer;

use super::llama::{Cache, Config, Dequantize, Model, Positions, Rope};
use super::*;
use crate::generate::{Decoding, FinishReason, GenRequest};

const SPECIAL: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
/// A few merges so BPE has something to do: "Ġt", "he", "Ġthe", "in", "er".
const MERGES: [(&str, &str); 5] = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r")];

fn tiny_tokenizer() -> Tokenizer {
    tokenizer::byte_level_bpe(&MERGES, &SPECIAL, "smollm").unwrap()
}

/// The tiny vocabulary in id order, as a GGUF stores it.
fn tiny_tokens() -> Vec<String> {
    let tok = tiny_tokenizer();
    let mut v: Vec<(String, u32)> = tok.get_vocab(true).into_iter().collect();
    v.sort_by_key(|(_, id)| *id);
    v.into_iter().map(|(t, _)| t).collect()
}

pub(crate) fn tiny_config(arch: &str) -> Config {
    Config {
        vocab_size: tiny_tokens().len(),
        hidden_size: 32,
        intermediate_size: 64,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        // Exact in f32, as GGUF stores it.
        rms_norm_eps: 2f64.powi(-16),
        rope_theta: 10_000.,
        rope: if arch == "llama" { Rope::Interleaved } else { Rope::Halves },
        max_seq_len: 256,
        qkv_bias: arch == "qwen2",
        tie_word_embeddings: false,
    }
}

fn random(rng: &mut ChaCha8Rng, shape: &[usize], std: f32, mean: f32) -> Tensor {
    let n: usize = shape.iter().product();
    // Sum of uniforms: roughly normal, and reproducible without a normal sampler.
    let data: Vec<f32> =
        (0..n).map(|_| mean + std * (0..3).map(|_| rng.gen_range(-1.0f32..1.0)).sum::<f32>()).collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

/// Random weights under HF llama names.
pub(crate) fn hf_weights(cfg: &Config, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (h, hd, i, v) = (cfg.hidden_size, cfg.head_dim(), cfg.intermediate_size, cfg.vocab_size);
    let mut w = HashMap::new();
    let mut put = |name: String, shape: &[usize], std: f32, mean: f32| {
        w.insert(name, random(&mut rng, shape, std, mean));
    };
    put("model.embed_tokens.weight".into(), &[v, h], 1.0, 0.0);
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        put(format!("{p}.input_layernorm.weight"), &[h], 0.1, 1.0);
        put(format!("{p}.post_attention_layernorm.weight"), &[h], 0.1, 1.0);
        put(format!("{p}.self_attn.q_proj.weight"), &[cfg.num_heads * hd, h], 0.3, 0.0);
        put(format!("{p}.self_attn.k_proj.weight"), &[cfg.num_kv_heads * hd, h], 0.3, 0.0);
        put(format!("{p}.self_attn.v_proj.weight"), &[cfg.num_kv_heads * hd, h], 0.3, 0.0);
        put(format!("{p}.self_attn.o_proj.weight"), &[h, cfg.num_heads * hd], 0.3, 0.0);
        put(format!("{p}.mlp.gate_proj.weight"), &[i, h], 0.3, 0.0);
        put(format!("{p}.mlp.up_proj.weight"), &[i, h], 0.3, 0.0);
        put(format!("{p}.mlp.down_proj.weight"), &[h, i], 0.3, 0.0);
        if cfg.qkv_bias {
            put(format!("{p}.self_attn.q_proj.bias"), &[cfg.num_heads * hd], 0.2, 0.0);
            put(format!("{p}.self_attn.k_proj.bias"), &[cfg.num_kv_heads * hd], 0.2, 0.0);
            put(format!("{p}.self_attn.v_proj.bias"), &[cfg.num_kv_heads * hd], 0.2, 0.0);
        }
    }
    put("model.norm.weight".into(), &[h], 0.1, 1.0);
    put("lm_head.weight".into(), &[v, h], 1.0, 0.0);
    w
}

/// An HF model directory: config.json, model.safetensors, tokenizer.json.
pub(crate) fn write_hf_dir(dir: &Path, cfg: &Config, weights: &HashMap<String, Tensor>) {
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::json!({
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": false,
        "eos_token_id": 2,
        "bos_token_id": 1,
    });
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config).unwrap()).unwrap();
    candle_core::safetensors::save(weights, dir.join("model.safetensors")).unwrap();
    tiny_tokenizer().save(dir.join("tokenizer.json"), false).unwrap();
}

/// llama.cpp names for the HF weights; `permute` reorders q/k rows into GGUF llama's
/// interleaved rotary layout (what llama.cpp's converter does), so both files hold one model.
fn gguf_tensors(cfg: &Config, hf: &HashMap<String, Tensor>, dtype: GgmlDType, permute: bool) -> Vec<(String, QTensor)> {
    let q = |t: &Tensor| QTensor::quantize(t, dtype).unwrap();
    let f32 = |t: &Tensor| QTensor::quantize(t, GgmlDType::F32).unwrap();
    let hd = cfg.head_dim();
    let interleave = |t: &Tensor, heads: usize| -> Tensor {
        if !permute {
            return t.clone();
        }
        let (out, inp) = t.dims2().unwrap();
        // HF row order per head is [first halves..., second halves...]; GGUF's is the pairs.
        t.reshape((heads, 2, hd / 2, inp)).unwrap().transpose(1, 2).unwrap().reshape((out, inp)).unwrap()
    };
    let mut out = vec![
        ("token_embd.weight".to_string(), q(&hf["model.embed_tokens.weight"])),
        ("output_norm.weight".to_string(), f32(&hf["model.norm.weight"])),
        ("output.weight".to_string(), q(&hf["lm_head.weight"])),
    ];
    for l in 0..cfg.num_layers {
        let g = |s: &str| &hf[&format!("model.layers.{l}.{s}")];
        let b = format!("blk.{l}");
        out.push((format!("{b}.attn_norm.weight"), f32(g("input_layernorm.weight"))));
        out.push((format!("{b}.ffn_norm.weight"), f32(g("post_attention_layernorm.weight"))));
        out.push((format!("{b}.attn_q.weight"), q(&interleave(g("self_attn.q_proj.weight"), cfg.num_heads))));
        out.push((format!("{b}.attn_k.weight"), q(&interleave(g("self_attn.k_proj.weight"), cfg.num_kv_heads))));
        out.push((format!("{b}.attn_v.weight"), q(g("self_attn.v_proj.weight"))));
        out.push((format!("{b}.attn_output.weight"), q(g("self_attn.o_proj.weight"))));
        out.push((format!("{b}.ffn_gate.weight"), q(g("mlp.gate_proj.weight"))));
        out.push((format!("{b}.ffn_up.weight"), q(g("mlp.up_proj.weight"))));
        out.push((format!("{b}.ffn_down.weight"), q(g("mlp.down_proj.weight"))));
        if cfg.qkv_bias {
            for (n, s) in [("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj")] {
                out.push((format!("{b}.{n}.bias"), f32(g(&format!("self_attn.{s}.bias")))));
            }
        }
    }
    out
}

const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a tiny test model<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// A tiny GGUF with the tokenizer and chat template in its metadata, like SmolLM2's.
fn write_gguf(path: &Path, arch: &str, dtype: GgmlDType, seed: u64) -> Config {
    write_gguf_with(path, arch, tiny_config(arch), dtype, seed)
}

fn write_gguf_with(path: &Path, arch: &str, cfg: Config, dtype: GgmlDType, seed: u64) -> Config {
    let hf = hf_weights(&cfg, seed);
    write_gguf_from(path, arch, cfg, &hf, dtype, false)
}

/// A tiny GGUF of the HF weights `hf`; with `permute`, q/k rows are in llama.cpp's order, so it
/// is the same model as an HF directory of `hf`.
fn write_gguf_from(
    path: &Path,
    arch: &str,
    cfg: Config,
    hf: &HashMap<String, Tensor>,
    dtype: GgmlDType,
    permute: bool,
) -> Config {
    let tensors = gguf_tensors(&cfg, hf, dtype, permute);
    let tokens = tiny_tokens();
    let types: Vec<Value> =
        tokens.iter().map(|t| Value::I32(if SPECIAL.contains(&t.as_str()) { 3 } else { 1 })).collect();
    let u32v = |n: usize| Value::U32(n as u32);
    let md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (format!("{arch}.block_count"), u32v(cfg.num_layers)),
        (format!("{arch}.context_length"), u32v(cfg.max_seq_len)),
        (format!("{arch}.embedding_length"), u32v(cfg.hidden_size)),
        (format!("{arch}.feed_forward_length"), u32v(cfg.intermediate_size)),
        (format!("{arch}.attention.head_count"), u32v(cfg.num_heads)),
        (format!("{arch}.attention.head_count_kv"), u32v(cfg.num_kv_heads)),
        (format!("{arch}.rope.freq_base"), Value::F32(cfg.rope_theta)),
        (format!("{arch}.rope.dimension_count"), u32v(cfg.head_dim())),
        (format!("{arch}.attention.layer_norm_rms_epsilon"), Value::F32(cfg.rms_norm_eps as f32)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens.iter().map(|t| Value::String(t.clone())).collect())),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(MERGES.iter().map(|(l, r)| Value::String(format!("{l} {r}"))).collect()),
        ),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.chat_template".into(), Value::String(SMOLLM2_TEMPLATE.into())),
    ];
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    candle_core::quantized::gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
    cfg
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn request(prompt: &str, temperature: f64, max_new_tokens: u32, seed: u64) -> GenRequest {
    GenRequest {
        system_prompt: None,
        prompt: prompt.into(),
        decoding: Decoding { temperature, top_p: None, max_new_tokens, stop: Vec::new(), seed, ignore_eos: false },
    }
}

fn tiny_gguf_engine(dir: &Path, dtype: GgmlDType) -> Engine {
    let path = dir.join("tiny.gguf");
    write_gguf(&path, "llama", dtype, 7);
    load_gguf(&path, None, &Device::Cpu, None, Dequantize::Auto).unwrap()
}

const PROMPTS: [&str; 4] =
    ["hi", "the winter is long in the north", "1234 + 5678 = ?", "Tell me about the weather there."];

#[test]
fn tokenizer_round_trips_and_splits_digits() {
    let tok = tiny_tokenizer();
    for text in ["hello there", "the thin winter", "12 + 345 = 357", "café ☕ naïve\nnew line\ttab", "  spaces  "] {
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
    // Digits are split one by one before the byte-level split (the `smollm` pre-tokenizer).
    assert_eq!(tok.encode("345", false).unwrap().get_ids().len(), 3);
    // Merges apply: " the" is one token.
    let the = tok.token_to_id("Ġthe").unwrap();
    assert_eq!(tok.encode(" the", false).unwrap().get_ids(), &[the]);
    // Control tokens are matched whole and skipped when decoding answers.
    let ids = tok.encode("<|im_start|>user\nhi<|im_end|>", false).unwrap().get_ids().to_vec();
    assert_eq!(ids[0], 1);
    assert_eq!(*ids.last().unwrap(), 2);
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nhi");
}

#[test]
fn gguf_tokenizer_equals_the_one_it_was_written_from() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.gguf");
    write_gguf(&path, "llama", GgmlDType::F32, 1);
    let mut f = std::fs::File::open(&path).unwrap();
    let ct = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let from_gguf = tokenizer::from_gguf(&ct, &path).unwrap();
    let direct = tiny_tokenizer();
    for text in ["<|im_start|>user\nthe 42 winters<|im_end|>\n", "héllo ther", ""] {
        assert_eq!(
            from_gguf.encode(text, false).unwrap().get_ids(),
            direct.encode(text, false).unwrap().get_ids(),
            "{text}"
        );
    }
}

#[test]
fn gguf_without_a_tokenizer_model_names_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bare.gguf");
    let t = QTensor::quantize(&Tensor::zeros(32, DType::F32, &Device::Cpu).unwrap(), GgmlDType::F32).unwrap();
    let arch = Value::String("llama".into());
    let mut f = std::fs::File::create(&path).unwrap();
    candle_core::quantized::gguf_file::write(&mut f, &[("general.architecture", &arch)], &[("x", &t)]).unwrap();
    let err = load_gguf(&path, None, &Device::Cpu, None, Dequantize::Auto).unwrap_err().to_string();
    assert!(err.contains("bare.gguf") && err.contains("llama.embedding_length"), "{err}");
}

#[test]
fn dense_graph_matches_candle_transformers_llama() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config("hf");
    let w = hf_weights(&cfg, 3);
    write_hf_dir(dir.path(), &cfg, &w);
    let ours = load_safetensors(dir.path(), None, &Device::Cpu, None).unwrap();

    let text = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    let up_cfg =
        serde_json::from_str::<candle_transformers::models::llama::LlamaConfig>(&text).unwrap().into_config(false);
    let vb = VarBuilder::from_tensors(w, DType::F32, &Device::Cpu);
    let upstream = candle_transformers::models::llama::Llama::load(vb, &up_cfg).unwrap();
    let mut up_cache = candle_transformers::models::llama::Cache::new(true, DType::F32, &up_cfg, &Device::Cpu).unwrap();

    let ids = ours.encode_prompt(None, "the winter").unwrap();
    let input = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let want = upstream.forward(&input, 0, &mut up_cache).unwrap().squeeze(0).unwrap();
    let mut cache = Cache::new(ours.model.config());
    let got = ours.model.forward(&mut [(ids.as_slice(), &mut cache)], Positions::Last).unwrap().remove(0);
    assert!(max_diff(&got, &want) < 1e-4, "prefill differs by {}", max_diff(&got, &want));
    // And one decode step through the caches.
    let next = [17u32];
    let want =
        upstream.forward(&Tensor::new(&next, &Device::Cpu).unwrap().unsqueeze(0).unwrap(), ids.len(), &mut up_cache);
    let want = want.unwrap().squeeze(0).unwrap();
    let got = ours.model.forward(&mut [(&next[..], &mut cache)], Positions::Last).unwrap().remove(0);
    assert!(max_diff(&got, &want) < 1e-4, "decode differs by {}", max_diff(&got, &want));
}

#[test]
fn gguf_graph_matches_candle_transformers_quantized_llama_and_qwen2() {
    let dir = tempfile::tempdir().unwrap();
    for arch in ["llama", "qwen2"] {
        let path = dir.path().join(format!("{arch}.gguf"));
        let cfg = write_gguf(&path, arch, GgmlDType::Q8_0, 11);
        // candle's own Q8_0 kernel on both sides, so only the graphs are compared (Candor's
        // kernel, used under `auto`, rounds activations its own way; checked in `quant`).
        let ours = load_gguf(&path, None, &Device::Cpu, None, Dequantize::None).unwrap();
        assert_eq!(ours.model.config(), &cfg);
        let mut f = std::fs::File::open(&path).unwrap();
        let ct = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
        let tokens: Vec<u32> = vec![1, 40, 41, 42, 100, 7, 9, 250];
        let input = Tensor::new(tokens.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let next = Tensor::new(&[33u32], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let (want, want_next) = if arch == "llama" {
            let mut m = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(ct, &mut f, &Device::Cpu)
                .unwrap();
            (m.forward(&input, 0).unwrap(), m.forward(&next, tokens.len()).unwrap())
        } else {
            let mut m = candle_transformers::models::quantized_qwen2::ModelWeights::from_gguf(ct, &mut f, &Device::Cpu)
                .unwrap();
            (m.forward(&input, 0).unwrap(), m.forward(&next, tokens.len()).unwrap())
        };
        let mut cache = Cache::new(&cfg);
        let got = ours.model.forward(&mut [(tokens.as_slice(), &mut cache)], Positions::Last).unwrap().remove(0);
        assert!(max_diff(&got, &want.squeeze(0).unwrap()) < 1e-4, "{arch} prefill");
        let got = ours.model.forward(&mut [(&[33u32][..], &mut cache)], Positions::Last).unwrap().remove(0);
        assert!(max_diff(&got, &want_next.squeeze(0).unwrap()) < 1e-4, "{arch} decode");
    }
}

#[test]
fn gguf_llama_layout_and_hf_layout_are_one_model() {
    // llama.cpp stores llama q/k rows interleaved for its rotary kernel; reading a GGUF written
    // that way must give the HF model's logits.
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config("llama");
    let hf = hf_weights(&cfg, 5);
    let tensors = gguf_tensors(&cfg, &hf, GgmlDType::F32, true);
    let dense = Model::load(
        VarBuilder::from_tensors(hf, DType::F32, &Device::Cpu),
        &Config { rope: Rope::Halves, ..cfg.clone() },
        &mut Default::default(),
    )
    .unwrap();
    let path = dir.path().join("perm.gguf");
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    candle_core::quantized::gguf_file::write(&mut std::fs::File::create(&path).unwrap(), &[], &t_refs).unwrap();
    let mut f = std::fs::File::open(&path).unwrap();
    let ct = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let quant = Model::from_gguf(&ct, &mut f, &cfg, &Device::Cpu, Dequantize::None).unwrap();
    let tokens = [5u32, 80, 81, 82, 200, 3];
    let a = dense.forward_all_positions(&tokens).unwrap();
    let b = quant.forward_all_positions(&tokens).unwrap();
    assert!(max_diff(&a, &b) < 1e-4, "{}", max_diff(&a, &b));
}

#[test]
fn q4_1_runs_its_own_kernel_and_other_slow_types_are_dequantized_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q41.gguf");
    // candle's Q4_1 kernel takes rows of an even number of 32-blocks: width 64.
    let wide = Config { hidden_size: 64, intermediate_size: 128, ..tiny_config("llama") };
    write_gguf_with(&path, "llama", wide, GgmlDType::Q4_1, 8);
    let logits =
        |d| load_gguf(&path, None, &Device::Cpu, None, d).unwrap().logits_all_positions(&[1, 50, 60, 70]).unwrap();
    let (auto, all, none) = (logits(Dequantize::Auto), logits(Dequantize::All), logits(Dequantize::None));
    let scale = auto.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    if candor_kernels::quant::supported() {
        // Q4_1 stays quantized on Candor's AVX2 kernel, which rounds activations to 8 bits as
        // candle's scalar kernel does: both close to f32, not equal to it.
        let (d_all, d_none) = (max_diff(&auto, &all), max_diff(&auto, &none));
        assert!(d_all > 0.0 && d_all < 0.1 * scale, "{d_all} of {scale}");
        assert!(d_none < 0.1 * scale, "{d_none} of {scale}");
    } else {
        assert_eq!(max_diff(&auto, &all), 0.0);
        // The quantized kernel rounds activations to 8 bits: close, not equal.
        let d = max_diff(&auto, &none);
        assert!(d > 0.0 && d < 0.1 * scale, "{d} of {scale}");
    }
    // Q8_0 stays quantized under auto (on Candor's kernel where the CPU has AVX2, else on
    // candle's): within activation rounding of candle's kernel.
    write_gguf(&path, "llama", GgmlDType::Q8_0, 8);
    let (auto, none) = (logits(Dequantize::Auto), logits(Dequantize::None));
    assert!(max_diff(&auto, &none) < 0.05 * scale, "{} of {scale}", max_diff(&auto, &none));
}

#[test]
fn all_positions_equal_step_by_step_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let e = tiny_gguf_engine(dir.path(), GgmlDType::Q8_0);
    let tokens: Vec<u32> = e.encode_prompt(None, "the winter is long").unwrap();
    let all = e.logits_all_positions(&tokens).unwrap();
    assert_eq!(all.dims(), &[tokens.len(), e.model.config().vocab_size]);
    let mut cache = Cache::new(e.model.config());
    for (i, t) in tokens.iter().enumerate() {
        let step = e.model.forward(&mut [(&[*t][..], &mut cache)], Positions::Last).unwrap().remove(0);
        assert!(max_diff(&step, &all.get(i).unwrap()) < 1e-4, "position {i}");
    }
    let lp = token_logprobs(&e, &tokens).unwrap();
    assert_eq!(lp.len(), tokens.len() - 1);
    for (i, p) in lp.iter().enumerate() {
        let row: Vec<f32> = all.get(i).unwrap().to_vec1().unwrap();
        let log_z = row.iter().map(|x| x.exp()).sum::<f32>().ln();
        assert!((p - (row[tokens[i + 1] as usize] - log_z)).abs() < 1e-4, "position {i}");
    }
}

/// Batched and one-at-a-time forward passes give the same logits, for prompts of different
/// lengths and a mix of prefill and decode; returns the largest difference seen.
fn check_batched_logits(e: &Engine) -> f32 {
    let prompts: Vec<Vec<u32>> = PROMPTS.iter().map(|p| e.encode_prompt(None, p).unwrap()).collect();
    let cfg = e.model.config();
    let mut worst = 0f32;
    let mut caches: Vec<Cache> = prompts.iter().map(|_| Cache::new(cfg)).collect();
    let mut batch: Vec<(&[u32], &mut Cache)> = prompts.iter().map(|p| p.as_slice()).zip(caches.iter_mut()).collect();
    let batched = e.model.forward(&mut batch, Positions::Last).unwrap();
    for (p, b) in prompts.iter().zip(&batched) {
        let mut alone = Cache::new(cfg);
        let single = e.model.forward(&mut [(p.as_slice(), &mut alone)], Positions::Last).unwrap().remove(0);
        worst = worst.max(max_diff(&single, b));
    }
    // Then one decode token for two sequences while a third feeds three more tokens, each
    // compared with the same step taken alone from a copy of its cache.
    let new: [&[u32]; 3] = [&[9], &[10], &[50, 60, 70]];
    let before: Vec<Cache> = caches.clone();
    let mut batch: Vec<(&[u32], &mut Cache)> = new.iter().copied().zip(caches.iter_mut()).collect();
    let mixed = e.model.forward(&mut batch, Positions::Last).unwrap();
    for (k, tokens) in new.iter().enumerate() {
        let mut alone = before[k].clone();
        let single = e.model.forward(&mut [(*tokens, &mut alone)], Positions::Last).unwrap().remove(0);
        worst = worst.max(max_diff(&single, &mixed[k]));
        assert_eq!(alone.len(), caches[k].len());
    }
    worst
}

#[test]
fn batched_forward_equals_single_forward() {
    let dir = tempfile::tempdir().unwrap();
    let quantized = check_batched_logits(&tiny_gguf_engine(dir.path(), GgmlDType::Q8_0));
    let cfg = tiny_config("hf");
    write_hf_dir(&dir.path().join("hf"), &cfg, &hf_weights(&cfg, 4));
    let dense = check_batched_logits(&load_safetensors(&dir.path().join("hf"), None, &Device::Cpu, None).unwrap());
    eprintln!("largest batched-vs-single logit difference: quantized {quantized}, dense {dense}");
    // Quantized matmuls work row by row: bit-identical. The dense kernel blocks by row count,
    // which changes float rounding only (logits here are of order 10).
    assert_eq!(quantized, 0.0);
    assert!(dense < 1e-4, "dense {dense}");
}

fn outputs(e: &Engine, reqs: &[GenRequest], batch: usize) -> Vec<(String, u32, FinishReason)> {
    let (out, stats) = e.run(reqs, None, batch).unwrap();
    assert!(stats.max_active <= batch);
    out.into_iter()
        .map(|g| {
            let g = g.unwrap();
            (g.output, g.completion_tokens, g.finish_reason)
        })
        .collect()
}

#[test]
fn batched_decoding_gives_the_same_tokens_as_one_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config("hf");
    write_hf_dir(&dir.path().join("hf"), &cfg, &hf_weights(&cfg, 4));
    let engines = [
        tiny_gguf_engine(dir.path(), GgmlDType::Q8_0),
        load_safetensors(&dir.path().join("hf"), None, &Device::Cpu, None).unwrap(),
    ];
    for e in &engines {
        // Different prompt lengths and answer lengths, so sequences leave and join mid-batch.
        let reqs: Vec<GenRequest> = PROMPTS
            .iter()
            .cycle()
            .take(7)
            .enumerate()
            .map(|(i, p)| request(p, 0.0, 6 + 3 * i as u32, i as u64))
            .collect();
        let one = outputs(e, &reqs, 1);
        for batch in [3, 8] {
            assert_eq!(outputs(e, &reqs, batch), one, "batch size {batch}");
        }
        assert!(one.iter().any(|(t, _, _)| !t.is_empty()));
        let (_, stats) = e.run(&reqs, None, 3).unwrap();
        assert_eq!(stats.max_active, 3);
        assert!(stats.decode_passes < one.iter().map(|(_, n, _)| *n as u64).sum::<u64>());
    }
}

#[test]
fn sampling_is_reproducible_per_seed_whatever_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let e = tiny_gguf_engine(dir.path(), GgmlDType::Q8_0);
    let reqs: Vec<GenRequest> = (0..4).map(|s| request("the winter", 0.8, 16, 100 + s)).collect();
    let alone: Vec<_> = reqs.iter().map(|r| outputs(&e, std::slice::from_ref(r), 1).remove(0)).collect();
    assert_eq!(outputs(&e, &reqs, 4), alone);
    assert_eq!(outputs(&e, &reqs, 4), outputs(&e, &reqs, 2));
    // Same prompt, different seeds: different answers.
    let distinct: std::collections::HashSet<_> = alone.iter().map(|(t, _, _)| t.clone()).collect();
    assert!(distinct.len() >= 3, "{alone:?}");
    // top_p narrows the choice but stays seeded.
    let mut r = request("the winter", 1.0, 16, 5);
    r.decoding.top_p = Some(0.5);
    assert_eq!(outputs(&e, std::slice::from_ref(&r), 1), outputs(&e, &[r.clone(), reqs[0].clone()], 2)[..1]);
}

#[test]
fn a_request_arriving_mid_decode_joins_the_running_batch_and_answers_first() {
    let dir = tempfile::tempdir().unwrap();
    let e = tiny_gguf_engine(dir.path(), GgmlDType::Q8_0);
    let mut long = request("the winter", 0.0, 40, 1);
    long.decoding.ignore_eos = true;
    let short = request("hi", 0.0, 3, 2);
    let alone = |r: &GenRequest| outputs(&e, std::slice::from_ref(r), 1).remove(0);
    let (long_alone, short_alone) = (alone(&long), alone(&short));
    assert_eq!(long_alone.1, 40, "ignore_eos runs to max_new_tokens");
    // The long request starts; the short one arrives after five passes.
    let mut passes = 0;
    let mut order = Vec::new();
    let mut answers = std::collections::BTreeMap::new();
    let stats = e
        .run_continuous(
            None,
            4,
            |_room, _idle| {
                passes += 1;
                match passes {
                    1 => vec![(long.clone(), "long")],
                    6 => vec![(short.clone(), "short")],
                    _ => Vec::new(),
                }
            },
            |who, answer| {
                order.push(who);
                let g = answer.unwrap();
                answers.insert(who, (g.output, g.completion_tokens, g.finish_reason));
            },
            |_| true,
        )
        .unwrap();
    assert_eq!(order, ["short", "long"], "the short request did not wait for the long one");
    assert_eq!(stats.max_active, 2);
    assert_eq!(answers["long"], long_alone, "joining a running batch changes no answer");
    assert_eq!(answers["short"], short_alone);
}

#[test]
fn a_request_whose_client_went_away_leaves_the_batch_unanswered() {
    let dir = tempfile::tempdir().unwrap();
    let e = tiny_gguf_engine(dir.path(), GgmlDType::Q8_0);
    let mut long = request("the winter", 0.0, 40, 1);
    long.decoding.ignore_eos = true;
    let passes = std::cell::Cell::new(0);
    let mut answered = Vec::new();
    let stats = e
        .run_continuous(
            None,
            4,
            |_room, _idle| {
                passes.set(passes.get() + 1);
                if passes.get() == 1 { vec![(long.clone(), "gone"), (long.clone(), "stays")] } else { Vec::new() }
            },
            |who, _| answered.push(who),
            |who| *who != "gone" || passes.get() < 5,
        )
        .unwrap();
    assert_eq!(answered, ["stays"]);
    assert!(stats.decode_tokens < 2 * 39, "the gone request stopped decoding: {stats:?}");
}

#[test]
fn stops_lengths_and_bad_requests() {
    let dir = tempfile::tempdir().unwrap();
    let e = tiny_gguf_engine(dir.path(), GgmlDType::Q8_0);
    let free = outputs(&e, &[request("the winter", 0.0, 12, 0)], 1).remove(0);
    assert_eq!(free.1, 12);
    assert_eq!(free.2, FinishReason::Length);
    // A stop string taken from the free answer cuts the answer before it.
    let chars: Vec<char> = free.0.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 1].iter().collect();
    let mut r = request("the winter", 0.0, 12, 0);
    r.decoding.stop = vec![stop.clone()];
    let mut bad = request("x", -1.0, 5, 0);
    bad.decoding.temperature = -1.0;
    let zero = request("y", 0.0, 0, 0);
    let (out, _) = e.run(&[r, bad, zero], None, 4).unwrap();
    let cut = out[0].as_ref().unwrap();
    assert_eq!(cut.finish_reason, FinishReason::Stop);
    assert!(free.0.starts_with(&cut.output) && !cut.output.contains(&stop), "{:?} / {:?}", cut.output, free.0);
    assert!(out[1].as_ref().unwrap_err().to_string().contains("decoding.temperature"));
    let zero = out[2].as_ref().unwrap();
    assert_eq!((zero.output.as_str(), zero.completion_tokens, zero.finish_reason), ("", 0, FinishReason::Length));
    assert!(zero.prompt_tokens > 5);
    // A prompt longer than the context is that request's error only.
    let long = request(&"the ".repeat(300), 0.0, 4, 0);
    let (out, _) = e.run(&[long, request("hi", 0.0, 2, 0)], None, 2).unwrap();
    assert!(out[0].as_ref().unwrap_err().to_string().contains("context"));
    assert!(out[1].is_ok());
}

#[test]
fn chat_template_and_stop_ids_come_from_the_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let e = tiny_gguf_engine(dir.path(), GgmlDType::F32);
    assert_eq!(e.chat.default_system.as_deref(), Some("You are a tiny test model"));
    assert_eq!(e.stop_ids, vec![2]);
    let ids = e.encode_prompt(Some("S"), "Q").unwrap();
    assert_eq!(
        e.tokenizer.decode(&ids, false).unwrap(),
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    );
}

/// A PEFT adapter for the tiny HF model: q_proj and v_proj of both layers, r = 4, alpha = 8.
fn write_adapter(dir: &Path, cfg: &Config, extra_key: Option<&str>) -> HashMap<String, (Tensor, Tensor)> {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    let r = 4;
    let mut pairs = HashMap::new();
    let mut st = HashMap::new();
    for l in 0..cfg.num_layers {
        for (m, out) in [("q_proj", cfg.num_heads * cfg.head_dim()), ("v_proj", cfg.num_kv_heads * cfg.head_dim())] {
            let module = format!("model.layers.{l}.self_attn.{m}");
            let a = random(&mut rng, &[r, cfg.hidden_size], 0.3, 0.0);
            let b = random(&mut rng, &[out, r], 0.3, 0.0);
            st.insert(format!("base_model.model.{module}.lora_A.weight"), a.clone());
            st.insert(format!("base_model.model.{module}.lora_B.weight"), b.clone());
            pairs.insert(format!("{module}.weight"), (a, b));
        }
    }
    if let Some(k) = extra_key {
        st.insert(format!("base_model.model.{k}.lora_A.weight"), random(&mut rng, &[r, cfg.hidden_size], 0.3, 0.0));
        st.insert(format!("base_model.model.{k}.lora_B.weight"), random(&mut rng, &[cfg.hidden_size, r], 0.3, 0.0));
    }
    let config = serde_json::json!({"r": r, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj"], "peft_type": "LORA"});
    std::fs::write(dir.join(lora::CONFIG_FILE), config.to_string()).unwrap();
    candle_core::safetensors::save(&st, dir.join(lora::WEIGHTS_FILE)).unwrap();
    pairs
}

#[test]
fn lora_merge_equals_manually_merged_weights() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config("hf");
    let base = hf_weights(&cfg, 21);
    write_hf_dir(&dir.path().join("base"), &cfg, &base);
    let pairs = write_adapter(&dir.path().join("warm"), &cfg, None);

    // W' = W + (alpha / r) · B · A, by hand.
    let mut manual = base.clone();
    for (name, (a, b)) in &pairs {
        manual.insert(name.clone(), (&base[name] + (b.matmul(a).unwrap() * 2.0).unwrap()).unwrap());
    }
    // The adapter's changes are s·B·A = (alpha / r) · B · A under each base weight's name.
    let adapter = lora::Adapter::read(&dir.path().join("warm")).unwrap();
    let mut deltas = adapter.deltas(lora::Layout::Hf, |n| base.get(n).map(|t| t.dims().to_vec())).unwrap();
    for (name, (a, b)) in &pairs {
        let d = deltas.take(name).unwrap();
        assert!(max_diff(&d.b.matmul(&d.a).unwrap(), &(b.matmul(a).unwrap() * 2.0).unwrap()) < 1e-6, "{name}");
    }
    deltas.finish().unwrap();

    let e = load_safetensors(&dir.path().join("base"), Some(&dir.path().join("warm")), &Device::Cpu, None).unwrap();
    let by_hand =
        Model::load(VarBuilder::from_tensors(manual, DType::F32, &Device::Cpu), &cfg, &mut Default::default()).unwrap();
    let plain = load_safetensors(&dir.path().join("base"), None, &Device::Cpu, None).unwrap();
    let tokens = e.encode_prompt(None, "the winter").unwrap();
    let got = e.logits_all_positions(&tokens).unwrap();
    assert!(max_diff(&got, &by_hand.forward_all_positions(&tokens).unwrap()) < 1e-4);
    assert!(max_diff(&got, &plain.logits_all_positions(&tokens).unwrap()) > 1e-2, "the adapter changed nothing");

    // Through the backend config: the checkpoint path is the adapter, `base` the HF dir.
    let opts = CandleOptions { base: Some(dir.path().join("base")), device: DeviceChoice::Cpu, ..Default::default() };
    let w = Weights::resolve(Some(&dir.path().join("warm")), &opts.base_path()).unwrap();
    assert!(matches!(w, Weights::Lora { .. }));
    let g = CandleGenerator::open(&opts, w, None).unwrap();
    assert!(max_diff(&g.engine().logits_all_positions(&tokens).unwrap(), &got) < 1e-6);
}

#[test]
fn lora_key_without_base_weight_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config("hf");
    write_hf_dir(&dir.path().join("base"), &cfg, &hf_weights(&cfg, 21));
    write_adapter(&dir.path().join("bad"), &cfg, Some("model.layers.7.self_attn.o_proj"));
    let err =
        load_safetensors(&dir.path().join("base"), Some(&dir.path().join("bad")), &Device::Cpu, None).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("adapter_model.safetensors") && msg.contains("model.layers.7.self_attn.o_proj.weight"),
        "{msg}"
    );
    assert!(msg.contains("matches no weight"), "{msg}");
    // A module outside target_modules is refused too.
    write_adapter(&dir.path().join("off"), &cfg, Some("model.layers.0.mlp.up_proj"));
    let msg = lora::Adapter::read(&dir.path().join("off")).unwrap_err().to_string();
    assert!(msg.contains("target_modules") && msg.contains("mlp.up_proj"), "{msg}");
}

/// Writes a PEFT adapter directory: `adapter_config.json` (`r`, alpha 16, `targets`) and the
/// LoRA pairs (module, A, B) under PEFT's key names, with candle's safetensors writer.
fn write_peft(dir: &Path, r: usize, targets: &[&str], pairs: &[(String, Tensor, Tensor)]) {
    std::fs::create_dir_all(dir).unwrap();
    let mut st = HashMap::new();
    for (module, a, b) in pairs {
        st.insert(format!("base_model.model.{module}.lora_A.weight"), a.clone());
        st.insert(format!("base_model.model.{module}.lora_B.weight"), b.clone());
    }
    let config = serde_json::json!({"r": r, "lora_alpha": 16, "target_modules": targets, "peft_type": "LORA",
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"});
    std::fs::write(dir.join(lora::CONFIG_FILE), config.to_string()).unwrap();
    candle_core::safetensors::save(&st, dir.join(lora::WEIGHTS_FILE)).unwrap();
}

/// A seeded random adapter, rank 8 and alpha 16 as in the paper, on the `targets` (`q_proj`,
/// `up_proj`, …) of every layer (B = 0 when `zero_b`, as PEFT initialises it).
fn random_adapter(dir: &Path, cfg: &Config, targets: &[&str], seed: u64, std: f32, zero_b: bool) {
    lora::RandomAdapter { targets, rank: 8, seed, std, zero_b }.write(dir, cfg).unwrap();
}

const ALL_PROJECTIONS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// Width 64, so Q4_1 runs on candle's kernel too (rows of an even number of 32-blocks).
fn wide_config() -> Config {
    Config { hidden_size: 64, intermediate_size: 128, ..tiny_config("llama") }
}

fn adapted_gguf(path: &Path, adapter: Option<&Path>, d: Dequantize) -> Engine {
    load_gguf(path, adapter, &Device::Cpu, None, d).unwrap()
}

#[test]
fn an_adapter_with_b_zero_leaves_a_gguf_base_exactly_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let zero = dir.path().join("zero");
    let reqs: Vec<GenRequest> = PROMPTS.iter().map(|p| request(p, 0.0, 8, 1)).collect();
    for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::F32] {
        let path = dir.path().join(format!("{dtype:?}.gguf"));
        let cfg = write_gguf_with(&path, "llama", wide_config(), dtype, 3);
        random_adapter(&zero, &cfg, &ALL_PROJECTIONS, 1, 0.2, true);
        // Candor's fused kernel (auto), candle's quantized kernel (none), f32 merges (all).
        for d in [Dequantize::Auto, Dequantize::None, Dequantize::All] {
            let (base, adapted) = (adapted_gguf(&path, None, d), adapted_gguf(&path, Some(&zero), d));
            let tokens = base.encode_prompt(None, PROMPTS[1]).unwrap();
            let (want, got) =
                (base.logits_all_positions(&tokens).unwrap(), adapted.logits_all_positions(&tokens).unwrap());
            assert_eq!(max_diff(&want, &got), 0.0, "{dtype:?} {d:?}");
            assert_eq!(outputs(&adapted, &reqs, 4), outputs(&base, &reqs, 4), "{dtype:?} {d:?}");
        }
    }
}

#[test]
fn a_seeded_adapter_on_a_gguf_base_changes_answers_the_same_way_every_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q41.gguf");
    let cfg = write_gguf_with(&path, "llama", wide_config(), GgmlDType::Q4_1, 3);
    let (one, again, other) = (dir.path().join("one"), dir.path().join("again"), dir.path().join("other"));
    random_adapter(&one, &cfg, &["q_proj", "v_proj"], 5, 0.2, false);
    random_adapter(&again, &cfg, &["q_proj", "v_proj"], 5, 0.2, false);
    random_adapter(&other, &cfg, &["q_proj", "v_proj"], 6, 0.2, false);
    let file = |d: &Path| std::fs::read(d.join(lora::WEIGHTS_FILE)).unwrap();
    assert_eq!(file(&one), file(&again), "the same seed writes the same adapter");

    let mut reqs: Vec<GenRequest> = PROMPTS.iter().map(|p| request(p, 0.0, 12, 1)).collect();
    reqs.extend(PROMPTS.iter().map(|p| request(p, 0.8, 12, 7)));
    let answers = |adapter: Option<&Path>| outputs(&adapted_gguf(&path, adapter, Dequantize::Auto), &reqs, 4);
    let base = answers(None);
    let tuned = answers(Some(&one));
    let changed = base.iter().zip(&tuned).filter(|(b, t)| b.0 != t.0).count();
    assert!(changed >= reqs.len() / 2, "the adapter changed {changed} of {} answers", reqs.len());
    assert_eq!(answers(Some(&one)), tuned, "loaded again");
    assert_eq!(answers(Some(&again)), tuned, "the same seed");
    assert_ne!(answers(Some(&other)), tuned, "another seed");
}

#[test]
fn a_gguf_adapter_equals_its_merge_into_the_same_model_in_safetensors() {
    // The GGUF holds the HF directory's model in llama.cpp's layout (q/k rows permuted), so an
    // adapter trained on the HF model must give the same logits on both: this pins the name
    // mapping and the permutation of B for q_proj and k_proj.
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config("llama");
    let hf = hf_weights(&cfg, 31);
    write_hf_dir(&dir.path().join("hf"), &cfg, &hf);
    let gguf = dir.path().join("f32.gguf");
    write_gguf_from(&gguf, "llama", cfg.clone(), &hf, GgmlDType::F32, true);
    let adapter = dir.path().join("adapter");
    random_adapter(&adapter, &cfg, &ALL_PROJECTIONS, 9, 0.2, false);

    let dense = load_safetensors(&dir.path().join("hf"), Some(&adapter), &Device::Cpu, None).unwrap();
    let dense_base = load_safetensors(&dir.path().join("hf"), None, &Device::Cpu, None).unwrap();
    let tokens = dense.encode_prompt(None, PROMPTS[3]).unwrap();
    let want = dense.logits_all_positions(&tokens).unwrap();
    let effect = max_diff(&want, &dense_base.logits_all_positions(&tokens).unwrap());
    assert!(effect > 1.0, "the adapter hardly changes the model: {effect}");
    let got = adapted_gguf(&gguf, Some(&adapter), Dequantize::Auto).logits_all_positions(&tokens).unwrap();
    assert!(max_diff(&got, &want) < 1e-4, "{} (adapter effect {effect})", max_diff(&got, &want));
}

#[test]
fn an_adapter_kept_beside_quantized_weights_equals_its_merge_into_them() {
    // On quantized weights the adapter runs as a low-rank term (fused across q/k/v and
    // gate/up on Candor's kernel, with zero blocks for k and gate, which it leaves alone);
    // expanded to f32 (`all`) it is merged. Both compute W·x + s·B·A·x: they differ only by the
    // quantized kernels' 8-bit rounding of activations, as the bases do.
    let dir = tempfile::tempdir().unwrap();
    let cfg = wide_config();
    let hf = hf_weights(&cfg, 12);
    let adapter = dir.path().join("adapter");
    random_adapter(&adapter, &cfg, &["q_proj", "v_proj", "up_proj", "down_proj"], 4, 0.2, false);
    for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
        let path = dir.path().join(format!("{dtype:?}.gguf"));
        write_gguf_from(&path, "llama", cfg.clone(), &hf, dtype, true);
        let logits = |a: Option<&Path>, d| {
            let e = adapted_gguf(&path, a, d);
            e.logits_all_positions(&e.encode_prompt(None, PROMPTS[1]).unwrap()).unwrap()
        };
        let (merged, merged_base) = (logits(Some(&adapter), Dequantize::All), logits(None, Dequantize::All));
        let effect = max_diff(&merged, &merged_base);
        for d in [Dequantize::Auto, Dequantize::None] {
            let rounding = max_diff(&logits(None, d), &merged_base);
            let diff = max_diff(&logits(Some(&adapter), d), &merged);
            eprintln!("{dtype:?} {d:?}: adapter effect {effect}, base rounding {rounding}, adapted {diff}");
            assert!(
                diff < 0.1 * effect && diff < 2.0 * rounding + 1e-3,
                "{dtype:?} {d:?}: {diff} (effect {effect}, rounding {rounding})"
            );
        }
    }
}

/// A GGUF base is read once and shared by every checkpoint adapted from it: applying an adapter
/// (low-rank terms beside quantized weights, fused q/k/v and gate/up included, or merged into
/// expanded ones) never changes the base another checkpoint runs, the same adapter gives the
/// same model whatever was loaded before it, and a rewritten base file is read again.
#[test]
fn a_gguf_base_read_once_serves_every_adapter_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = wide_config();
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    random_adapter(&one, &cfg, &ALL_PROJECTIONS, 5, 0.2, false);
    random_adapter(&two, &cfg, &["q_proj", "v_proj"], 6, 0.2, false);
    let path = dir.path().join("base.gguf");
    for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
        write_gguf_from(&path, "llama", cfg.clone(), &hf_weights(&cfg, 13), dtype, true);
        for d in [Dequantize::Auto, Dequantize::All] {
            let logits = |a: Option<&Path>| {
                let e = adapted_gguf(&path, a, d);
                e.logits_all_positions(&e.encode_prompt(None, PROMPTS[1]).unwrap()).unwrap()
            };
            let base = logits(None);
            let first = logits(Some(&one));
            assert!(max_diff(&first, &base) > 1e-3, "{dtype:?} {d:?}: the adapter changes the model");
            let _ = logits(Some(&two));
            assert_eq!(max_diff(&logits(None), &base), 0.0, "{dtype:?} {d:?}: the base is as it was");
            assert_eq!(max_diff(&logits(Some(&one)), &first), 0.0, "{dtype:?} {d:?}: the adapter again");
        }
    }
    let before = adapted_gguf(&path, None, Dequantize::Auto);
    let prompt = before.encode_prompt(None, PROMPTS[1]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    write_gguf_from(&path, "llama", cfg.clone(), &hf_weights(&cfg, 14), GgmlDType::Q8_0, true);
    let after = adapted_gguf(&path, None, Dequantize::Auto);
    let diff = max_diff(&after.logits_all_positions(&prompt).unwrap(), &before.logits_all_positions(&prompt).unwrap());
    assert!(diff > 1e-3, "the rewritten base was not read again ({diff})");
}

/// `candor watch` loads a checkpoint before announcing it; the evaluation then takes that
/// generator instead of loading the weights a second time (here: they are gone by then), once,
/// and only for the same model and checkpoint.
#[test]
fn a_generator_opened_ahead_is_taken_once_by_the_next_open_of_its_checkpoint() {
    use crate::generate::backend::{open, open_ahead};
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("a.gguf");
    write_gguf(&gguf, "llama", GgmlDType::Q8_0, 1);
    let model = crate::model::ModelConfig {
        name: "tiny".into(),
        backend: toml::from_str(&format!("kind = 'candle'\ndevice = 'cpu'\nbase = '{}'", gguf.display())).unwrap(),
        checkpoints: Vec::new(),
    };
    let ck = |id: &str| crate::model::CheckpointConfig {
        id: id.into(),
        finetuned: false,
        variant: None,
        epoch: None,
        path: None,
        system_prompt: None,
        backend: Default::default(),
    };
    open_ahead(&model, &ck("base")).unwrap();
    let fingerprint = open(&model, &ck("base")).unwrap().fingerprint();
    open_ahead(&model, &ck("base")).unwrap();
    std::fs::remove_file(&gguf).unwrap();
    assert!(open(&model, &ck("other")).is_err(), "another checkpoint loads its own weights");
    assert_eq!(open(&model, &ck("base")).unwrap().fingerprint(), fingerprint, "the kept generator");
    let again = open(&model, &ck("base")).err().expect("taken once: the next open loads again").to_string();
    assert!(again.contains("a.gguf"), "{again}");
}

/// A model file's digest is computed once per process, and again when the file changes.
#[test]
fn a_rewritten_model_file_is_hashed_again() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("w.gguf");
    std::fs::write(&f, b"weights one").unwrap();
    let first = sha256_file(&f).unwrap();
    assert_eq!(sha256_file(&f).unwrap(), first);
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&f, b"weights two").unwrap();
    assert_ne!(sha256_file(&f).unwrap(), first, "same length, new content");
}

#[test]
fn the_weights_digest_covers_an_adapter_on_a_gguf_base_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.gguf"), dir.path().join("b.gguf"));
    let cfg = write_gguf(&a, "llama", GgmlDType::Q8_0, 1);
    write_gguf(&b, "llama", GgmlDType::Q8_0, 2);
    let adapter = dir.path().join("checkpoint-50");
    random_adapter(&adapter, &cfg, &["q_proj", "v_proj"], 3, 0.2, false);
    let model = crate::model::ModelConfig {
        name: "tiny".into(),
        backend: toml::from_str(&format!("kind = 'candle'\ndevice = 'cpu'\nbase = '{}'", a.display())).unwrap(),
        checkpoints: Vec::new(),
    };
    let ck = crate::model::CheckpointConfig {
        id: "warm".into(),
        finetuned: true,
        variant: None,
        epoch: None,
        path: Some(adapter.clone()),
        system_prompt: None,
        backend: Default::default(),
    };
    let g = CandleGenerator::new(&model, &ck).unwrap();
    let w = Weights::resolve(Some(&adapter), &a).unwrap();
    assert_eq!(w, Weights::Lora { base: Box::new(Weights::Gguf(a.clone())), adapter: adapter.clone() });
    assert_eq!(g.weights(), &w);
    let digest = w.digest().unwrap();
    assert_eq!(g.fingerprint(), format!("candle:{digest}:system:none"));
    assert_ne!(digest, sha256_file(&a).unwrap());
    assert_ne!(Weights::resolve(Some(&adapter), &b).unwrap().digest().unwrap(), digest, "another base");
    // One byte of one weight of the adapter (the file's last byte is tensor data).
    let file = adapter.join(lora::WEIGHTS_FILE);
    let mut bytes = std::fs::read(&file).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    std::fs::write(&file, &bytes).unwrap();
    let changed = w.digest().unwrap();
    assert_ne!(changed, digest);
    assert_ne!(CandleGenerator::new(&model, &ck).unwrap().fingerprint(), g.fingerprint());
    // And the adapter's config.
    let cfg_file = adapter.join(lora::CONFIG_FILE);
    std::fs::write(
        &cfg_file,
        std::fs::read_to_string(&cfg_file).unwrap().replace("\"lora_alpha\":16", "\"lora_alpha\":15"),
    )
    .unwrap();
    assert_ne!(w.digest().unwrap(), changed);
    let changed = w.digest().unwrap();
    // Not the trainer's log: a later save of the same weights shares their answers.
    std::fs::write(adapter.join("trainer_state.json"), r#"{"global_step": 50}"#).unwrap();
    assert_eq!(w.digest().unwrap(), changed);
    std::fs::write(adapter.join("trainer_state.json"), r#"{"global_step": 100}"#).unwrap();
    assert_eq!(w.digest().unwrap(), changed);
}

#[test]
fn bad_adapters_on_a_gguf_base_are_input_errors_naming_the_file_and_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    let cfg = write_gguf(&gguf, "llama", GgmlDType::Q8_0, 1);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut pair = |module: &str, a: &[usize], b: &[usize]| {
        (module.to_string(), random(&mut rng, a, 0.2, 0.0), random(&mut rng, b, 0.2, 0.0))
    };
    let (h, q) = (cfg.hidden_size, cfg.num_heads * cfg.head_dim());
    let cases = [
        // A layer the base does not have.
        (
            "absent",
            vec![pair("model.layers.7.self_attn.q_proj", &[8, h], &[q, 8])],
            "model.layers.7.self_attn.q_proj.weight",
            "matches no weight `blk.7.attn_q.weight` of the base model",
        ),
        // A module with no GGUF counterpart.
        (
            "lm_head",
            vec![pair("lm_head", &[8, h], &[cfg.vocab_size, 8])],
            "lm_head.weight",
            "no counterpart in a GGUF base",
        ),
        // B·A of the wrong shape for the base weight.
        (
            "shape",
            vec![pair("model.layers.0.self_attn.q_proj", &[8, h], &[q + 4, 8])],
            "model.layers.0.self_attn.q_proj.weight",
            &format!("B·A is [{}, {h}] but the base weight `blk.0.attn_q.weight` is [{q}, {h}]", q + 4),
        ),
        // A rank other than the config's r = 8.
        (
            "rank",
            vec![pair("model.layers.1.self_attn.q_proj", &[4, h], &[q, 4])],
            "model.layers.1.self_attn.q_proj.weight",
            "rank r = 8",
        ),
    ];
    for (name, pairs, tensor, says) in &cases {
        let ad = dir.path().join(name);
        write_peft(&ad, 8, &["q_proj", "lm_head"], pairs);
        let err = load_gguf(&gguf, Some(&ad), &Device::Cpu, None, Dequantize::Auto).unwrap_err();
        let msg = err.to_string();
        assert_eq!(err.kind(), crate::error::Domain::User, "{name}: {msg}");
        assert!(msg.contains(&ad.join(lora::WEIGHTS_FILE).display().to_string()), "{name}: {msg}");
        assert!(msg.contains(&format!("field `{tensor}`")) && msg.contains(says), "{name}: {msg}");
    }
    // A corrupt or truncated weights file.
    let ad = dir.path().join("corrupt");
    random_adapter(&ad, &cfg, &["q_proj"], 1, 0.2, false);
    let file = ad.join(lora::WEIGHTS_FILE);
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 10]).unwrap();
    let opts = CandleOptions { base: Some(gguf.clone()), device: DeviceChoice::Cpu, ..Default::default() };
    let err = CandleGenerator::open(&opts, Weights::resolve(Some(&ad), &gguf).unwrap(), None).unwrap_err();
    let msg = err.to_string();
    assert_eq!(err.kind(), crate::error::Domain::User, "{msg}");
    assert!(msg.contains(&file.display().to_string()) && msg.contains("cannot read safetensors"), "{msg}");
    std::fs::write(&file, b"not a safetensors file at all").unwrap();
    let msg = load_gguf(&gguf, Some(&ad), &Device::Cpu, None, Dequantize::Auto).unwrap_err().to_string();
    assert!(msg.contains(&file.display().to_string()) && msg.contains("cannot read safetensors"), "{msg}");
}

#[test]
fn an_adapters_own_chat_template_wins_over_the_gguf_metadata() {
    // A trainer saves the tokenizer files it trained with beside the adapter.
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    let cfg = write_gguf(&gguf, "llama", GgmlDType::Q8_0, 1);
    let adapter = dir.path().join("checkpoint-50");
    random_adapter(&adapter, &cfg, &["q_proj"], 1, 0.2, false);
    let base = adapted_gguf(&gguf, Some(&adapter), Dequantize::Auto);
    assert_eq!(base.chat.default_system.as_deref(), Some("You are a tiny test model"));
    let template = "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\\n'}}{% endif %}";
    std::fs::write(adapter.join("tokenizer_config.json"), serde_json::json!({"chat_template": template}).to_string())
        .unwrap();
    let own = adapted_gguf(&gguf, Some(&adapter), Dequantize::Auto);
    assert_eq!(own.chat.default_system, None);
    assert_eq!(
        own.tokenizer.decode(&own.encode_prompt(None, "Q").unwrap(), false).unwrap(),
        "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn an_adapter_on_a_weight_that_is_no_projection_is_refused() {
    // The token embedding is a base weight of the right shape, but no projection takes it:
    // merging nothing silently would evaluate the base under the adapter's name.
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config("hf");
    write_hf_dir(&dir.path().join("base"), &cfg, &hf_weights(&cfg, 2));
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let a = random(&mut rng, &[8, cfg.hidden_size], 0.2, 0.0);
    let b = random(&mut rng, &[cfg.vocab_size, 8], 0.2, 0.0);
    write_peft(&dir.path().join("emb"), 8, &["embed_tokens"], &[("model.embed_tokens".into(), a, b)]);
    let err = load_safetensors(&dir.path().join("base"), Some(&dir.path().join("emb")), &Device::Cpu, None);
    let msg = err.unwrap_err().to_string();
    assert!(msg.contains("field `model.embed_tokens.weight`") && msg.contains("not a projection"), "{msg}");
}

#[test]
fn backend_table_is_checked_key_by_key() {
    let t: toml::Table =
        toml::from_str("kind = 'candle'\ndevice = 'cuda:1'\nbatch_size = 4\nthreads = 2\nbase = 'm.gguf'").unwrap();
    let o = CandleOptions::from_table(&t).unwrap();
    assert_eq!(o.device, DeviceChoice::Cuda(1));
    assert_eq!(o.dequantize, Dequantize::Auto);
    assert_eq!((o.batch_size, o.threads, o.base.as_deref()), (4, Some(2), Some(Path::new("m.gguf"))));
    let none = CandleOptions::from_table(&toml::from_str("dequantize = 'none'").unwrap()).unwrap();
    assert_eq!(none.dequantize, Dequantize::None);
    assert_eq!("all".parse::<Dequantize>(), Ok(Dequantize::All));
    for (bad, key) in [
        ("batch_size = 0", "batch_size"),
        ("device = 'tpu'", "device"),
        ("kind = 'openai'", "kind"),
        ("gguf = 'x'", "gguf"),
        ("dequantize = 'most'", "dequantize"),
    ] {
        let err = CandleOptions::from_table(&toml::from_str(bad).unwrap()).unwrap_err().to_string();
        assert!(err.contains(&format!("backend.{key}")), "{err}");
    }
    assert_eq!(
        DeviceChoice::Auto.open().unwrap().is_cpu(),
        !candle_core::utils::cuda_is_available() || !cfg!(feature = "cuda")
    );
    #[cfg(not(feature = "cuda"))]
    assert!(DeviceChoice::Cuda(0).open().unwrap_err().to_string().contains("--features cuda"));
    let missing = Weights::resolve(None, &PathBuf::from("/nonexistent").join(DEFAULT_GGUF)).unwrap_err().to_string();
    assert!(missing.contains("scripts/fetch-models"), "{missing}");
}

#[test]
fn generator_fingerprint_covers_weights_and_system_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.gguf"), dir.path().join("b.gguf"));
    write_gguf(&a, "llama", GgmlDType::Q8_0, 1);
    write_gguf(&b, "llama", GgmlDType::Q8_0, 2);
    let model = crate::model::ModelConfig {
        name: "tiny".into(),
        backend: toml::from_str(&format!("kind = 'candle'\ndevice = 'cpu'\nbatch_size = 2\nbase = '{}'", a.display()))
            .unwrap(),
        checkpoints: Vec::new(),
    };
    let ck = |path: Option<&Path>, sys: Option<&str>| crate::model::CheckpointConfig {
        id: "c".into(),
        finetuned: false,
        variant: None,
        epoch: None,
        path: path.map(Path::to_path_buf),
        system_prompt: sys.map(str::to_string),
        backend: Default::default(),
    };
    let mut g = CandleGenerator::new(&model, &ck(None, None)).unwrap();
    let fp = g.fingerprint();
    assert!(fp.starts_with(&format!("candle:{}:system:none", sha256_file(&a).unwrap())), "{fp}");
    assert_ne!(CandleGenerator::new(&model, &ck(Some(&b), None)).unwrap().fingerprint(), fp);
    let warm = CandleGenerator::new(&model, &ck(None, Some("Be warm."))).unwrap();
    assert_ne!(warm.fingerprint(), fp);
    assert_eq!(CandleGenerator::new(&model, &ck(None, None)).unwrap().fingerprint(), fp);

    let reqs: Vec<GenRequest> = PROMPTS.iter().map(|p| request(p, 0.0, 5, 1)).collect();
    let out = g.generate(&reqs).unwrap();
    assert_eq!(out.len(), 4);
    let stats = g.last_stats().clone();
    assert_eq!(stats.requests, 4);
    let gens: Vec<_> = out.into_iter().map(|r| r.unwrap()).collect();
    assert_eq!(stats.prefill_tokens, gens.iter().map(|g| g.prompt_tokens as u64).sum::<u64>());
    assert_eq!(stats.generated_tokens, gens.iter().map(|g| g.completion_tokens as u64).sum::<u64>());
    assert!(gens.iter().all(|g| g.latency_ms > 0.0));
    // The checkpoint's system prompt goes with requests that have none.
    let with_sys = warm.engine().encode_prompt(Some("Be warm."), "hi").unwrap();
    let (w_out, _) = warm.engine().run(&[request("hi", 0.0, 1, 0)], Some("Be warm."), 1).unwrap();
    assert_eq!(w_out[0].as_ref().unwrap().prompt_tokens as usize, with_sys.len());
}

/// The real SmolLM2 GGUF from the model cache (`scripts/fetch-models`).
#[test]
fn real_smollm2_answers_in_text() {
    let path = models_dir().join(DEFAULT_GGUF);
    if !path.is_file() {
        assert!(std::env::var_os("CI").is_none(), "{} is missing in CI; scripts/test fetches it", path.display());
        eprintln!("skipped: {} not found; run scripts/fetch-models", path.display());
        return;
    }
    let opts = CandleOptions { device: DeviceChoice::Cpu, batch_size: 4, ..Default::default() };
    let mut g = CandleGenerator::open(&opts, Weights::Gguf(path.clone()), None).unwrap();
    let e = g.engine();
    assert_eq!(e.tokenizer.encode("<|im_start|>user\n", false).unwrap().get_ids(), &[1, 4093, 198]);
    assert_eq!(e.stop_ids, vec![2]);
    assert!(e.chat.default_system.as_deref().unwrap().contains("SmolLM"));
    let prompts = [
        "What is the capital of France?",
        "Name three colours of the rainbow.",
        "What is 12 plus 7?",
        "Write one sentence about the sea.",
        "Who wrote Romeo and Juliet?",
    ];
    let reqs: Vec<GenRequest> = prompts.iter().map(|p| request(p, 0.0, 24, 1)).collect();
    let (out, stats) = g.run_batch(&reqs).unwrap();
    for (p, r) in prompts.iter().zip(out) {
        let answer = r.unwrap();
        eprintln!("{p} -> {:?} ({:?}, {} tokens)", answer.output, answer.finish_reason, answer.completion_tokens);
        let text = answer.output.trim();
        assert!(!text.is_empty(), "{p}: empty answer");
        let printable = text.chars().filter(|c| !c.is_control() || c.is_whitespace()).count();
        assert!(printable * 10 >= text.chars().count() * 9, "{p}: not text: {text:?}");
        let words: std::collections::HashSet<&str> = text
            .split_whitespace()
            .map(|w| w.trim_matches(|c: char| !c.is_alphanumeric()))
            .filter(|w| !w.is_empty())
            .collect();
        assert!(words.len() >= 3, "{p}: too few distinct words: {text:?}");
    }
    eprintln!(
        "SmolLM2 batch of {}: prefill {} tokens in {:.2}s ({:.0}/s), decode {} tokens in {:.2}s ({:.1}/s)",
        stats.requests,
        stats.prefill_tokens,
        stats.prefill_secs,
        stats.prefill_tokens_per_sec(),
        stats.decode_tokens,
        stats.decode_secs,
        stats.decode_tokens_per_sec()
    );
    // No answer is one token repeated throughout (checked on the token level too).
    let ids = g.engine().encode_prompt(None, prompts[0]).unwrap();
    let lp = token_logprobs(g.engine(), &ids).unwrap();
    assert!(lp.iter().all(|p| p.is_finite() && *p <= 0.0));
    let (again, _) = g.run_batch(&reqs[..1]).unwrap();
    let again = again.into_iter().next().unwrap().unwrap();
    let toks = g.engine().tokenizer.encode(again.output.as_str(), false).unwrap().get_ids().to_vec();
    assert!(toks.iter().any(|t| *t != toks[0]), "one token repeated: {:?}", again.output);
}

/// A random adapter on the real SmolLM2 GGUF from the model cache, as a fine-tune of it would
/// be applied: B = 0 (PEFT's initialisation) leaves every logit as it was; a seeded adapter
/// changes the answers, the same way on every load.
#[test]
fn real_smollm2_takes_a_seeded_random_adapter() {
    let path = models_dir().join(DEFAULT_GGUF);
    if !path.is_file() {
        assert!(std::env::var_os("CI").is_none(), "{} is missing in CI; scripts/test fetches it", path.display());
        eprintln!("skipped: {} not found; run scripts/fetch-models", path.display());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let load = |adapter: Option<&Path>| load_gguf(&path, adapter, &Device::Cpu, Some(256), Dequantize::Auto).unwrap();
    let base = load(None);
    let cfg = base.model.config().clone();
    let (zero, tuned) = (dir.path().join("zero"), dir.path().join("checkpoint-50"));
    random_adapter(&zero, &cfg, &["q_proj", "v_proj"], 1, 0.05, true);
    random_adapter(&tuned, &cfg, &["q_proj", "v_proj"], 2, 0.05, false);
    let tokens = base.encode_prompt(None, "What is the capital of France?").unwrap();
    let logits = |e: &Engine| e.logits_all_positions(&tokens).unwrap();
    let want = logits(&base);
    assert_eq!(max_diff(&logits(&load(Some(&zero))), &want), 0.0);

    let (first, second) = (load(Some(&tuned)), load(Some(&tuned)));
    let got = logits(&first);
    assert_eq!(max_diff(&logits(&second), &got), 0.0, "the same adapter loaded twice");
    assert!(max_diff(&got, &want) > 0.5, "the adapter hardly changed the logits: {}", max_diff(&got, &want));
    assert_eq!(max_diff(&logits(&load(None)), &want), 0.0, "the shared base is as it was");
    let reqs: Vec<GenRequest> = ["What is the capital of France?", "Name three colours of the rainbow."]
        .iter()
        .map(|p| request(p, 0.0, 16, 1))
        .collect();
    let (b, t) = (outputs(&base, &reqs, 2), outputs(&first, &reqs, 2));
    eprintln!("base {b:?}\nadapted {t:?}");
    assert_ne!(b, t);
    assert_eq!(outputs(&second, &reqs, 2), t);
}

/// Throughput of the real SmolLM2 at batch sizes 1, 4 and 8 (a benchmark, not a check; run
/// with `cargo test --release --lib bench_smollm2 -- --ignored --nocapture`).
#[test]
#[ignore]
fn bench_smollm2_batch_sizes() {
    let path = models_dir().join(DEFAULT_GGUF);
    let opts = CandleOptions { device: DeviceChoice::Cpu, ..Default::default() };
    let mut g = CandleGenerator::open(&opts, Weights::Gguf(path), None).unwrap();
    let prompts = [
        "What is the capital of France?",
        "Explain photosynthesis in one paragraph.",
        "Is the Great Wall of China visible from space?",
        "Give me three tips for sleeping better.",
        "What causes the seasons on Earth?",
        "Who painted the Mona Lisa?",
        "Why is the sky blue?",
        "How many legs does a spider have?",
    ];
    // max_new_tokens is reached by every answer (no stop token): the same work at each size.
    let reqs: Vec<GenRequest> = prompts.iter().map(|p| request(p, 0.0, 32, 1)).collect();
    let mut outputs = Vec::new();
    for batch in [1, 4, 8] {
        g.set_batch_size(batch);
        let start = std::time::Instant::now();
        let (out, s) = g.run_batch(&reqs).unwrap();
        let wall = start.elapsed().as_secs_f64();
        eprintln!(
            "batch {batch}: prefill {} tok {:.0} tok/s | decode {} tok in {:.2}s = {:.1} tok/s | {} generated in {wall:.2}s = {:.1} tok/s overall",
            s.prefill_tokens,
            s.prefill_tokens_per_sec(),
            s.decode_tokens,
            s.decode_secs,
            s.decode_tokens_per_sec(),
            s.generated_tokens,
            s.generated_tokens as f64 / wall
        );
        outputs.push(out.into_iter().map(|r| r.unwrap().output).collect::<Vec<_>>());
    }
    let same = (0..prompts.len()).filter(|&i| outputs[0][i] == outputs[2][i]).count();
    eprintln!("answers identical at batch 1 and 8: {same}/{}", prompts.len());
}

const QWEN_GGUF: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";

/// The Qwen2.5 GGUF tokenizer built here agrees with candle's own GGUF tokenizer, which is
/// right for Qwen (opt-in model: checked when `scripts/fetch-models qwen` has fetched it).
#[test]
fn qwen_gguf_tokenizer_agrees_with_candles() {
    use candle_core::quantized::tokenizer::TokenizerFromGguf;
    let path = models_dir().join(QWEN_GGUF);
    if !path.is_file() {
        eprintln!("skipped: {} not found (scripts/fetch-models qwen)", path.display());
        return;
    }
    let mut f = std::fs::File::open(&path).unwrap();
    let ct = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let ours = tokenizer::from_gguf(&ct, &path).unwrap();
    let theirs = Tokenizer::from_gguf(&ct).unwrap();
    assert_eq!(ours.encode("<|im_start|>user\n", false).unwrap().get_ids(), &[151644, 872, 198]);
    for text in [
        "<|im_start|>system\nYou are Qwen.<|im_end|>\n<|im_start|>user\nWhat is 1234 + 5678?<|im_end|>\n",
        "I'm sure it's   fine,\n\n  isn't it? Café naïve — 東京 😀 x=3.14159;",
    ] {
        let a = ours.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(a, theirs.encode(text, false).unwrap().get_ids(), "{text}");
        assert_eq!(ours.decode(&a, false).unwrap(), text);
    }
}

/// The opt-in Qwen2.5-Coder-0.5B answers in text (slow: run with `--ignored`).
#[test]
#[ignore]
fn real_qwen25_answers_in_text() {
    let path = models_dir().join(QWEN_GGUF);
    let opts = CandleOptions { device: DeviceChoice::Cpu, batch_size: 3, ..Default::default() };
    let mut g = CandleGenerator::open(&opts, Weights::Gguf(path), None).unwrap();
    assert!(g.engine().chat.default_system.as_deref().unwrap_or("").contains("Qwen"));
    let prompts = ["What is the capital of France?", "What is 12 plus 7?", "Name a primary colour."];
    let reqs: Vec<GenRequest> = prompts.iter().map(|p| request(p, 0.0, 24, 1)).collect();
    let (out, s) = g.run_batch(&reqs).unwrap();
    for (p, r) in prompts.iter().zip(out) {
        let a = r.unwrap();
        eprintln!("{p} -> {:?} ({:?})", a.output, a.finish_reason);
        assert!(a.output.split_whitespace().count() >= 2, "{p}: {:?}", a.output);
    }
    eprintln!(
        "Qwen batch of 3: decode {:.1} tok/s, prefill {:.0} tok/s",
        s.decode_tokens_per_sec(),
        s.prefill_tokens_per_sec()
    );
}
