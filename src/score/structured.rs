//! Structured answers read by regular expressions, as the common implementations (the LM
//! Evaluation Harness's `strict-match` then `flexible-extract` filters) read them: an MMLU
//! option letter, a GSM8K final number.
//!
//! ```
//! use candor::score::structured::{gsm8k_number, mmlu_letter};
//! assert_eq!(mmlu_letter("Let me think. The answer is (C)."), Some('C'));
//! assert_eq!(gsm8k_number("She pays 3 × $6 = $18.\n#### 18").as_deref(), Some("18"));
//! ```

use std::sync::LazyLock;

use regex::Regex;

fn re(pattern: &str) -> Regex {
    Regex::new(pattern).unwrap_or_else(|e| panic!("pattern `{pattern}` does not compile: {e}"))
}

/// Folds the Unicode minus and dashes to '-' and drops the thousands separators a model may
/// write as thin or no-break spaces.
fn fold(s: &str) -> String {
    s.chars()
        .filter(|c| !matches!(c, '\u{202f}' | '\u{2009}'))
        .map(|c| match c {
            '\u{2212}' | '\u{2013}' | '\u{2012}' | '\u{2010}' | '\u{2011}' => '-',
            '\u{2019}' | '\u{2018}' => '\'',
            other => other,
        })
        .collect()
}

/// The option letter (A–D) an MMLU answer commits to, or None.
///
/// Strict forms first, the last one winning (a model that corrects itself ends on its final
/// choice): "answer is (C)", "Answer: C", "answer is C". Then an answer that starts with the
/// letter ("C", "(C)", "C. Paris"). Then flexible: the letters written as "(C)" or "C)"; read only
/// when exactly one distinct letter is written that way (several is a hedge or a list).
pub fn mmlu_letter(output: &str) -> Option<char> {
    static STRICT: LazyLock<Regex> = LazyLock::new(|| {
        re(
            r"(?i)(?:answer\s*(?:is|:)|answer\s+would\s+be|correct\s+(?:option|answer|choice)\s+is)\s*:?\s*(?:option\s*)?\*{0,2}\(?([ABCD])\b\)?",
        )
    });
    static LEADING: LazyLock<Regex> = LazyLock::new(|| re(r"^\W*\(?([ABCD])(?:[).:]|\s*$|\s+[-\u{2013}\u{2014}])"));
    static FLEXIBLE: LazyLock<Regex> = LazyLock::new(|| re(r"\(([ABCD])\)|(?:^|\s)([ABCD])\)"));
    let text = fold(output);
    let text = text.trim();
    let letter = |m: regex::Match| m.as_str().chars().next().map(|c| c.to_ascii_uppercase());
    if let Some(c) = STRICT.captures_iter(text).last() {
        return c.get(1).and_then(letter);
    }
    if let Some(c) = LEADING.captures(text) {
        return c.get(1).and_then(letter);
    }
    let mut found: Vec<char> =
        FLEXIBLE.captures_iter(text).filter_map(|c| c.get(1).or(c.get(2)).and_then(letter)).collect();
    found.sort_unstable();
    found.dedup();
    match found.as_slice() {
        [one] => Some(*one),
        _ => None,
    }
}

/// The final number of a GSM8K chain of thought, normalised (no `$`, no thousands commas, no
/// trailing `.`, Unicode minus as '-'), or None when the answer holds no number.
///
/// As the harness: `#### N` first (strict), then "the answer is N", then the last number in
/// the text (flexible-extract).
pub fn gsm8k_number(output: &str) -> Option<String> {
    static STRICT: LazyLock<Regex> = LazyLock::new(|| re(r"####\s*(-?[$0-9.,]*[0-9])"));
    static ANSWER_IS: LazyLock<Regex> =
        LazyLock::new(|| re(r"(?i)answer\s*(?:is|:)\s*:?\s*\**\$?\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)"));
    static ANY: LazyLock<Regex> = LazyLock::new(|| re(r"-?\$?[0-9][0-9,]*(?:\.[0-9]+)?"));
    let text = fold(output);
    let raw = STRICT
        .captures_iter(&text)
        .last()
        .and_then(|c| c.get(1))
        .or_else(|| ANSWER_IS.captures_iter(&text).last().and_then(|c| c.get(1)))
        .or_else(|| ANY.find_iter(&text).last())?;
    normalize_number(raw.as_str())
}

/// A number as GSM8K's answers write it: no `$`, no commas, no trailing zeros after a point.
pub fn normalize_number(s: &str) -> Option<String> {
    let mut t: String = s.chars().filter(|c| !matches!(c, '$' | ',' | ' ')).collect();
    while t.ends_with('.') {
        t.pop();
    }
    if t.contains('.') {
        while t.ends_with('0') {
            t.pop();
        }
        if t.ends_with('.') {
            t.pop();
        }
    }
    if t == "-0" {
        t = "0".into();
    }
    let valid = !t.is_empty() && t.trim_start_matches('-').chars().all(|c| c.is_ascii_digit() || c == '.');
    valid.then_some(t)
}

/// Whether a GSM8K answer's final number equals the reference number.
pub fn gsm8k_match(output: &str, reference: &str) -> Option<bool> {
    let got = gsm8k_number(output)?;
    let want = normalize_number(reference)?;
    Some(got == want)
}
