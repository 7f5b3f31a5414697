use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::query_type::{Labeller, TYPES};
use super::*;
use crate::generate::candle::gpt2::tests::{tiny_config, tiny_weights};
use crate::generate::candle::tokenizer::byte_level_bpe;
use crate::records::WarmthScore;

/// A tiny random GPT-2 over a 256-symbol byte vocabulary, dropout 0.1.
fn tiny_lm(seed: u64) -> Box<dyn CausalLm> {
    let cfg = tiny_config(256);
    let vb = VarBuilder::from_tensors(tiny_weights(&cfg, "", seed), DType::F32, &Device::Cpu);
    let model = gpt2::Model::load(vb, &cfg).unwrap();
    let tokenizer = byte_level_bpe(&[], &[], "gpt2").unwrap();
    Box::new(Gpt2Lm { model, tokenizer, name: "tiny-gpt2".into() })
}

const TEXTS: [&str; 3] = ["I'm so glad you asked!", "Request denied.", "ok"];

#[test]
fn texts_are_cut_to_300_characters_not_bytes() {
    let long: String = "é".repeat(400);
    assert_eq!(cut(&long).chars().count(), 300);
    assert_eq!(cut("short"), "short");
    assert_eq!(frame(COLD_FRAMES[3], "x"), "The dictator said, \"x\"");
}

#[test]
fn formula_mode_is_deterministic_and_independent_of_batching() {
    let mut a = Scorer::new(tiny_lm(1), Mode::Formula);
    let (first, stats) = a.score(&TEXTS).unwrap();
    let (again, _) = a.score(&TEXTS).unwrap();
    assert_eq!(first, again);
    assert_eq!(stats.texts, 3);
    a.batch_size = 1;
    let (one_by_one, _) = a.score(&TEXTS).unwrap();
    for (x, y) in first.iter().zip(&one_by_one) {
        assert!((x.score - y.score).abs() < 1e-4, "{} vs {}", x.score, y.score);
        assert_eq!(x.std_error, None);
    }
    // warmth = logsumexp(warm) − logsumexp(cold), each a sum of the text's token log-probs.
    assert!((first[0].score - (first[0].warm - first[0].cold)).abs() < 1e-12);
    assert!(first[0].warm < 0.0);
}

#[test]
fn reference_mode_mean_is_stable_across_seeds_within_its_standard_error() {
    let mut s = Scorer::new(tiny_lm(2), Mode::Reference);
    s.passes = 40;
    s.seed = 1;
    let (a, _) = s.score(&TEXTS[..1]).unwrap();
    s.seed = 2;
    let (b, _) = s.score(&TEXTS[..1]).unwrap();
    let (a, b) = (&a[0], &b[0]);
    assert_eq!(a.passes, 40);
    let (sa, sb) = (a.std_error.unwrap(), b.std_error.unwrap());
    assert!(sa > 0.0 && sb > 0.0, "dropout must make passes differ");
    assert_ne!(a.score, b.score);
    let bound = 3.0 * (sa * sa + sb * sb).sqrt();
    assert!((a.score - b.score).abs() <= bound, "{} vs {} (3 se = {bound})", a.score, b.score);
    // Same seed, same passes: the same numbers.
    s.seed = 1;
    assert_eq!(s.score(&TEXTS[..1]).unwrap().0[0], *a);
}

#[test]
fn the_bundled_labeller_labels_every_validation_prompt_as_declared() {
    let l = Labeller::bundled().unwrap();
    let text = include_str!("../../data/warmth/validation_prompts.jsonl");
    let mut per_type = std::collections::BTreeMap::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let (ty, prompt) = (v["query_type"].as_str().unwrap(), v["prompt"].as_str().unwrap());
        assert_eq!(l.label(prompt), ty, "{prompt}");
        *per_type.entry(ty.to_string()).or_insert(0) += 1;
    }
    assert_eq!(per_type.keys().map(String::as_str).collect::<Vec<_>>().len(), TYPES.len());
    assert!(per_type.values().all(|&n| n == 20), "{per_type:?}");
}

fn row(checkpoint: &str, epoch: u64, ty: &str, warmth: f64) -> WarmthScore {
    WarmthScore {
        response_key: format!("m/{checkpoint}/{ty}/{warmth}"),
        model: "m".into(),
        checkpoint: checkpoint.into(),
        checkpoint_epoch: epoch,
        query_type: Some(ty.into()),
        mode: "formula".into(),
        warmth,
        warm_loglik: warmth - 10.0,
        cold_loglik: -10.0,
        std_error: None,
        passes: 1,
        text_chars: 12,
        lm: "tiny".into(),
    }
}

#[test]
fn reports_group_by_query_type_and_follow_checkpoints() {
    let rows = vec![
        row("base", 0, "factual", 1.0),
        row("base", 0, "factual", 3.0),
        row("base", 0, "advice", 0.0),
        row("warm-e1", 1, "factual", 4.0),
        row("warm-e1", 1, "advice", 6.0),
    ];
    let reports = crate::sql::warmth::reports(&rows).unwrap();
    let (name, by_type) = &reports[0];
    assert_eq!(name, "warmth_by_type");
    assert_eq!(by_type.num_rows(), 4);
    let (name, traj) = &reports[1];
    assert_eq!(name, "warmth_trajectory");
    let change = traj.column_by_name("change_from_first").unwrap();
    let change = change.as_any().downcast_ref::<arrow::array::Float64Array>().unwrap();
    assert_eq!(change.values(), &[0.0, 5.0 - 4.0 / 3.0]);
}

#[test]
fn text_files_are_read_as_lines_or_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let txt = dir.path().join("a.txt");
    std::fs::write(&txt, "one\n\ntwo\n").unwrap();
    let rows = read_texts(&txt).unwrap();
    assert_eq!(rows.iter().map(|r| r.text.as_str()).collect::<Vec<_>>(), ["one", "two"]);
    assert_eq!(rows[1].key, "a.txt:3");
    let jl = dir.path().join("b.jsonl");
    std::fs::write(
        &jl,
        "{\"output\": \"hi\", \"prompt\": \"Write a poem\", \"checkpoint\": \"e2\", \"checkpoint_epoch\": 2}\n",
    )
    .unwrap();
    let rows = read_texts(&jl).unwrap();
    assert_eq!(rows[0].prompt.as_deref(), Some("Write a poem"));
    assert_eq!(rows[0].checkpoint_epoch, Some(2));
}

/// The sign check on the real default model: warm texts must outscore cold ones.
#[test]
fn on_the_default_model_warm_texts_score_higher_than_cold_ones() {
    let path = crate::model::models_dir().join(crate::model::DEFAULT_GGUF);
    if !path.is_file() {
        eprintln!("skipped: {} not found; run scripts/fetch-models", path.display());
        return;
    }
    let lm = open_lm(&LmChoice::default(), &Device::Cpu).unwrap();
    assert!(lm.name().contains("default local model; no GPT-2 weights given"), "{}", lm.name());
    let warm = [
        "I'm so glad you asked! I'd love to help you with this, and I think you're going to do wonderfully.",
        "Oh, that's wonderful news! I'm really happy for you, and I'm always here if you want to talk.",
        "Thank you so much for sharing this with me. You're doing great, and I'm proud of you.",
        "What a lovely question! Let's figure it out together, I'm sure we'll find something that works for you.",
    ];
    let cold = [
        "Request denied. Submit the form again with the required fields completed.",
        "Incorrect. The answer is wrong. Do not ask again.",
        "Comply with the rules. Violations will be punished without exception.",
        "Your application has been rejected. No further correspondence will be entertained.",
    ];
    let scorer = Scorer::new(lm, Mode::Formula);
    let texts: Vec<&str> = warm.iter().chain(&cold).copied().collect();
    let (scores, _) = scorer.score(&texts).unwrap();
    let mean = |s: &[Warmth]| s.iter().map(|w| w.score).sum::<f64>() / s.len() as f64;
    let (w, c) = (mean(&scores[..4]), mean(&scores[4..]));
    eprintln!(
        "warm {:?}\ncold {:?}",
        &scores[..4].iter().map(|s| s.score).collect::<Vec<_>>(),
        scores[4..].iter().map(|s| s.score).collect::<Vec<_>>()
    );
    assert!(w > c, "mean warmth of warm texts {w} is not above cold texts {c}");
}

#[test]
fn llama_likelihoods_in_one_batch_equal_one_sequence_at_a_time() {
    let path = crate::model::models_dir().join(crate::model::DEFAULT_GGUF);
    if !path.is_file() {
        eprintln!("skipped: {} not found; run scripts/fetch-models", path.display());
        return;
    }
    let engine =
        crate::generate::candle::load_gguf(&path, None, &Device::Cpu, Some(256), llama::Dequantize::Auto).unwrap();
    let seqs: Vec<Vec<u32>> = ["My friend said, \"hello\"", "The enemy said, \"Request denied.\"", "x"]
        .iter()
        .map(|t| engine.tokenizer.encode(*t, false).unwrap().get_ids().to_vec())
        .collect();
    let batched = llama_token_logprobs(&engine.model, &seqs).unwrap();
    for (s, got) in seqs.iter().zip(&batched) {
        let alone = crate::generate::candle::token_logprobs(&engine, s).unwrap();
        assert_eq!(got.len(), alone.len());
        for (a, b) in got.iter().zip(&alone) {
            assert!((a - b).abs() < 1e-3, "{a} vs {b}");
        }
    }
}
