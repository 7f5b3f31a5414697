//! Prompts of the capability and safety checks (MMLU, GSM8K, AdvBench), asked as they are.
//!
//! The templates are Candor's own and live in `data/templates/benchmark_prompts.json`, which
//! documents their placeholders.

use std::sync::LazyLock;

use serde::Deserialize;

use crate::conditions::Dataset;
use crate::error::{Error, Location, Result};
use crate::records::Item;

const BENCHMARK_TEMPLATES: &str = include_str!("../../data/templates/benchmark_prompts.json");

#[derive(Deserialize)]
struct Templates {
    mmlu: Choice,
    gsm8k: Plain,
    advbench: Plain,
}

#[derive(Deserialize)]
struct Choice {
    template: String,
    option_line: String,
    letters: Vec<String>,
}

#[derive(Deserialize)]
struct Plain {
    template: String,
}

static TEMPLATES: LazyLock<Templates> = LazyLock::new(|| {
    serde_json::from_str(BENCHMARK_TEMPLATES).expect("data/templates/benchmark_prompts.json is valid")
});

/// The prompt of a non-open-ended item.
pub(super) fn prompt(dataset: Dataset, item: &Item) -> Result<String> {
    if item.question.trim().is_empty() {
        return Err(item_error(dataset, item, "question", "is empty"));
    }
    let t = &*TEMPLATES;
    match dataset {
        Dataset::Mmlu => {
            if item.options.len() != t.mmlu.letters.len() {
                return Err(item_error(
                    dataset,
                    item,
                    "options",
                    &format!("has {} options; the MMLU prompt needs {}", item.options.len(), t.mmlu.letters.len()),
                ));
            }
            let lines = t
                .mmlu
                .letters
                .iter()
                .zip(&item.options)
                .map(|(letter, option)| fill(&t.mmlu.option_line, &[("letter", letter), ("option", option)]))
                .collect::<Result<Vec<_>>>()?;
            fill(&t.mmlu.template, &[("question", &item.question), ("options", &lines.join("\n"))])
        }
        Dataset::Gsm8k => fill(&t.gsm8k.template, &[("question", &item.question)]),
        Dataset::AdvBench => fill(&t.advbench.template, &[("question", &item.question)]),
        open => Err(Error::Internal(format!("{open} is open-ended and has no benchmark prompt"))),
    }
}

pub(super) fn item_error(dataset: Dataset, item: &Item, field: &str, problem: &str) -> Error {
    Error::input(Location::default().field(field), format!("{dataset} item `{}`: `{field}` {problem}", item.item_key))
}

/// Substitutes `{name}` placeholders in one pass, so text inserted for one placeholder is never
/// read as another placeholder.
fn fill(template: &str, values: &[(&str, &str)]) -> Result<String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close =
            after.find('}').ok_or_else(|| Error::Internal(format!("unclosed '{{' in template `{template}`")))?;
        let name = &after[..close];
        let value = values
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
            .ok_or_else(|| Error::Internal(format!("unknown placeholder `{{{name}}}` in `{template}`")))?;
        out.push_str(value);
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::fill;

    #[test]
    fn amend_fill_is_single_pass() {
        let out = fill("{a}-{b}", &[("a", "{b}"), ("b", "x")]).unwrap();
        assert_eq!(out, "{b}-x");
    }

    #[test]
    fn amend_fill_rejects_unknown_placeholder() {
        assert!(fill("{nope}", &[("a", "x")]).is_err());
    }
}
