//! Tokenizers for local models: built from a GGUF file's own vocabulary, or read from a
//! `tokenizer.json`.
//!
//! A GGUF carries the BPE vocabulary, merges and token types but no `tokenizer.json`; the
//! pre-tokenizer is only named (`tokenizer.ggml.pre`), so it is rebuilt here from that name as
//! the model's HF tokenizer defines it. candle's generic GGUF tokenizer gets SmolLM2's wrong
//! (it does not know `smollm`, which splits digits one by one before the byte-level split).
//!
//! ```
//! use candor::generate::candle::tokenizer::byte_level_bpe;
//! let tok = byte_level_bpe(&[("a", "b")], &["<|im_start|>"], "smollm").unwrap();
//! let ids = tok.encode("<|im_start|>ab12", false).unwrap().get_ids().to_vec();
//! assert_eq!(tok.decode(&ids, false).unwrap(), "<|im_start|>ab12");
//! ```

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{Error, Location, Result};

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Qwen2's pre-tokenizer split (from its `tokenizer.json`), applied before the byte-level map.
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer named by `tokenizer.ggml.pre`.
fn pre_tokenizer(pre: &str) -> std::result::Result<PreTokenizerWrapper, String> {
    let byte_level = |use_regex| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, use_regex));
    Ok(match pre {
        "smollm" => PreTokenizerWrapper::Sequence(Sequence::new(vec![Digits::new(true).into(), byte_level(true)])),
        "qwen2" => {
            let split = Split::new(SplitPattern::Regex(QWEN2_SPLIT.into()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| e.to_string())?;
            PreTokenizerWrapper::Sequence(Sequence::new(vec![split.into(), byte_level(false)]))
        }
        "gpt2" | "default" => byte_level(true),
        other => return Err(format!("pre-tokenizer `{other}` is not supported (smollm, qwen2, gpt2 are)")),
    })
}

/// A byte-level BPE tokenizer from merges alone (tests, examples): ids are the `special`
/// tokens, then the 256 byte symbols, then one token per merge in merge order. Merge halves
/// are written in GPT-2's byte-to-unicode form (`Ġ` for a space), as in GGUF and `vocab.json`.
pub fn byte_level_bpe(merges: &[(&str, &str)], special: &[&str], pre: &str) -> std::result::Result<Tokenizer, String> {
    let mut vocab: HashMap<String, u32> = HashMap::new();
    let mut add = |t: String| {
        let n = vocab.len() as u32;
        vocab.entry(t).or_insert(n);
    };
    special.iter().for_each(|s| add(s.to_string()));
    let mut bytes: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    bytes.sort();
    bytes.into_iter().for_each(|c| add(c.to_string()));
    merges.iter().for_each(|(l, r)| add(format!("{l}{r}")));
    let merges = merges.iter().map(|(l, r)| (l.to_string(), r.to_string())).collect();
    build(vocab, merges, special.iter().map(|s| (s.to_string(), true)).collect(), pre)
}

fn build(
    vocab: HashMap<String, u32>,
    merges: Vec<(String, String)>,
    added: Vec<(String, bool)>,
    pre: &str,
) -> std::result::Result<Tokenizer, String> {
    let bpe = BPE::builder()
        .vocab_and_merges(vocab.into_iter().collect::<tokenizers::models::bpe::Vocab>(), merges)
        .build()
        .map_err(|e| e.to_string())?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(pre_tokenizer(pre)?));
    tok.with_decoder(Some(ByteLevel::default()));
    let (special, plain): (Vec<_>, Vec<_>) = added.into_iter().partition(|(_, special)| *special);
    tok.add_special_tokens(special.into_iter().map(|(t, _)| AddedToken::from(t, true))).map_err(|e| e.to_string())?;
    tok.add_tokens(plain.into_iter().map(|(t, _)| AddedToken::from(t, false))).map_err(|e| e.to_string())?;
    Ok(tok)
}

/// Builds the tokenizer a GGUF file describes (`tokenizer.ggml.model = "gpt2"`): BPE from its
/// tokens and merges, the pre-tokenizer `tokenizer.ggml.pre` names, a byte-level decoder, and
/// control tokens (type 3) as special tokens, user-defined ones (type 4) as added tokens.
pub fn from_gguf(ct: &gguf_file::Content, path: &Path) -> Result<Tokenizer> {
    let bad = |key: &str, msg: String| Error::input(Location::file(path).field(key), msg);
    let md = |key: &str| ct.metadata.get(key).ok_or_else(|| bad(key, "metadata key is missing".into()));
    let model = md("tokenizer.ggml.model")?.to_string().map_err(|e| bad("tokenizer.ggml.model", e.to_string()))?;
    if model != "gpt2" {
        return Err(bad("tokenizer.ggml.model", format!("tokenizer `{model}` is not supported (only BPE `gpt2`)")));
    }
    // An absent pre-tokenizer name means llama.cpp's default, GPT-2's.
    let pre = match ct.metadata.get("tokenizer.ggml.pre") {
        Some(v) => v.to_string().map_err(|e| bad("tokenizer.ggml.pre", e.to_string()))?.clone(),
        None => "default".to_string(),
    };
    let strings = |key: &str| -> Result<Vec<String>> {
        md(key)?
            .to_vec()
            .map_err(|e| bad(key, e.to_string()))?
            .iter()
            .map(|v| v.to_string().cloned().map_err(|e| bad(key, e.to_string())))
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| match m.split_once(' ') {
            Some((l, r)) => Ok((l.to_string(), r.to_string())),
            None => Err(bad("tokenizer.ggml.merges", format!("merge `{m}` is not two tokens"))),
        })
        .collect::<Result<Vec<_>>>()?;
    let types: Vec<i32> = match ct.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(|e| bad("tokenizer.ggml.token_type", e.to_string()))?
            .iter()
            .map(|t| t.to_i32().map_err(|e| bad("tokenizer.ggml.token_type", e.to_string())))
            .collect::<Result<_>>()?,
        None => Vec::new(),
    };
    let added = tokens
        .iter()
        .zip(&types)
        .filter_map(|(t, &ty)| match ty {
            TOKEN_TYPE_CONTROL => Some((t.clone(), true)),
            TOKEN_TYPE_USER_DEFINED => Some((t.clone(), false)),
            _ => None,
        })
        .collect();
    let vocab = tokens.into_iter().enumerate().map(|(i, t)| (t, i as u32)).collect();
    build(vocab, merges, added, &pre).map_err(|e| bad("tokenizer.ggml.pre", e))
}
