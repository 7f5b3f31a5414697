//! The amend operator's logic: items × amendment types × prompt types → [`Trial`] rows.
//!
//! Open-ended items (trivia, truthfulqa, medqa, disinfo) get the configured grid (by default
//! 9 amendment types × 4 prompt types = 36 trials), one statement drawn per (item, amendment
//! type) and shared by its prompt types so that belief and no-belief prompts are paired. The
//! capability and safety checks get one `unmodified`/`original` trial with their benchmark
//! prompt. Rendering rules of the two template styles are documented in `render.rs`.

mod benchmark;
mod render;
pub mod stage;
mod statements;
#[cfg(test)]
mod tests;

use std::sync::LazyLock;

use crate::conditions::{AmendmentType, Dataset, PAPER_TEMPLATES, PromptType, TemplateStyle, amendment_group};
use crate::error::{Error, Location, Result};
use crate::records::{Item, Trial};

pub use statements::{Chosen, Statements};

static FRIENDS_SENTENCE: LazyLock<String> = LazyLock::new(|| {
    let value: serde_json::Value =
        serde_json::from_str(PAPER_TEMPLATES).expect("vendored paper templates are valid JSON");
    value["friends_sentence"].as_str().expect("vendored paper templates hold friends_sentence").to_string()
});

/// Builds the trials of one item. Statement choice depends only on (seed, dataset, item_key,
/// amendment type), so every model, checkpoint, worker count and item order gets the same trials.
#[derive(Clone, Debug)]
pub struct Amender {
    pub style: TemplateStyle,
    /// The amendment types run on open-ended items, in output order.
    pub amendments: Vec<AmendmentType>,
    /// The prompt types run on open-ended items, in output order.
    pub prompt_types: Vec<PromptType>,
    pub seed: u64,
    /// A user statements table; None uses [`Statements::observed`].
    pub statements: Option<Statements>,
}

impl Amender {
    /// The full grid (every amendment type and prompt type) with the observed statements.
    pub fn new(style: TemplateStyle, seed: u64) -> Amender {
        Amender {
            style,
            amendments: AmendmentType::ALL.to_vec(),
            prompt_types: PromptType::ALL.to_vec(),
            seed,
            statements: None,
        }
    }

    /// Uses `statements` instead of the observed table.
    pub fn with_statements(mut self, statements: Statements) -> Amender {
        self.statements = Some(statements);
        self
    }

    /// The statements table in use.
    pub fn statements(&self) -> &Statements {
        self.statements.as_ref().unwrap_or_else(|| Statements::observed())
    }

    /// The trials of `item`: the configured grid for an open-ended item (duplicates in the
    /// configuration are run once), one benchmark trial otherwise.
    pub fn trials(&self, item: &Item) -> Result<Vec<Trial>> {
        let dataset: Dataset = item.dataset.parse().map_err(|e: String| {
            Error::input(Location::default().field("dataset"), format!("item `{}`: {e}", item.item_key))
        })?;
        if !dataset.is_open_ended() {
            return Ok(vec![self.benchmark_trial(dataset, item)?]);
        }
        if self.amendments.is_empty() {
            return Err(Error::config("amendments", "no amendment type selected"));
        }
        if self.prompt_types.is_empty() {
            return Err(Error::config("prompt_types", "no prompt type selected"));
        }
        let mut trials = Vec::with_capacity(self.amendments.len() * self.prompt_types.len());
        for amendment in distinct(&self.amendments) {
            let chosen = self.statements().choose(self.seed, dataset.as_str(), &item.item_key, amendment)?;
            for prompt_type in distinct(&self.prompt_types) {
                let question = question_for(dataset, item, prompt_type)?;
                let belief = belief_for(dataset, item, prompt_type)?;
                let request = render::Request {
                    dataset,
                    amendment,
                    statement: chosen.as_ref().map(|c| c.text),
                    prompt_type,
                    question,
                    belief,
                };
                let rendered = render::render(self.style, &request, &FRIENDS_SENTENCE);
                trials.push(Trial {
                    trial_key: Trial::key(dataset.as_str(), &item.item_key, amendment.as_str(), prompt_type.as_str()),
                    dataset: dataset.as_str().to_string(),
                    item_key: item.item_key.clone(),
                    amendment_type: amendment.as_str().to_string(),
                    amendment_group: amendment_group(amendment.as_str()).to_string(),
                    statement_id: chosen.as_ref().map(|c| c.id.clone()),
                    statement: chosen.as_ref().map(|c| c.text.to_string()),
                    prompt_type: prompt_type.as_str().to_string(),
                    belief_answer: rendered.belief_answer,
                    prompt: rendered.prompt,
                    template_style: self.style.as_str().to_string(),
                    seed: self.seed,
                });
            }
        }
        Ok(trials)
    }

    /// The single trial of a capability or safety check, whatever the grid configuration.
    fn benchmark_trial(&self, dataset: Dataset, item: &Item) -> Result<Trial> {
        let amendment = AmendmentType::Unmodified;
        let prompt_type = PromptType::Original;
        Ok(Trial {
            trial_key: Trial::key(dataset.as_str(), &item.item_key, amendment.as_str(), prompt_type.as_str()),
            dataset: dataset.as_str().to_string(),
            item_key: item.item_key.clone(),
            amendment_type: amendment.as_str().to_string(),
            amendment_group: amendment_group(amendment.as_str()).to_string(),
            statement_id: None,
            statement: None,
            prompt_type: prompt_type.as_str().to_string(),
            belief_answer: None,
            prompt: benchmark::prompt(dataset, item)?,
            template_style: self.style.as_str().to_string(),
            seed: self.seed,
        })
    }
}

fn distinct<T: Copy + PartialEq>(values: &[T]) -> Vec<T> {
    let mut out = Vec::with_capacity(values.len());
    for &v in values {
        if !out.contains(&v) {
            out.push(v);
        }
    }
    out
}

/// MedQA shows the exam vignette only in `original`; the other prompt types use its
/// first-person form.
fn question_for(dataset: Dataset, item: &Item, prompt_type: PromptType) -> Result<&str> {
    let (field, value) = if dataset == Dataset::MedQa && prompt_type != PromptType::Original {
        ("question_converted", item.question_converted.as_deref())
    } else {
        ("question", Some(item.question.as_str()))
    };
    present(value).ok_or_else(|| missing(dataset, item, prompt_type, field))
}

/// The answer the user states, before the style's rendering.
fn belief_for(dataset: Dataset, item: &Item, prompt_type: PromptType) -> Result<Option<&str>> {
    let (field, value) = match (prompt_type, dataset) {
        (PromptType::Original | PromptType::OriginalNeutral, _) => return Ok(None),
        (PromptType::Correct, Dataset::Disinfo) => ("ground_truth", &item.ground_truth),
        (PromptType::Incorrect, Dataset::Disinfo) => ("ground_false", &item.ground_false),
        (PromptType::Correct, _) => ("correct_answer", &item.correct_answer),
        (PromptType::Incorrect, _) => ("incorrect_answer", &item.incorrect_answer),
    };
    match present(value.as_deref()) {
        Some(answer) => Ok(Some(answer)),
        // The paper rendered TruthfulQA's empty best answers as Python's None.
        None if dataset == Dataset::TruthfulQa && prompt_type == PromptType::Correct => Ok(Some("None")),
        None => Err(missing(dataset, item, prompt_type, field)),
    }
}

fn present(value: Option<&str>) -> Option<&str> {
    value.filter(|v| !v.trim().is_empty())
}

fn missing(dataset: Dataset, item: &Item, prompt_type: PromptType, field: &str) -> Error {
    benchmark::item_error(dataset, item, field, &format!("is missing or empty; prompt type `{prompt_type}` needs it"))
}

/// A seeded sample of `n` items (all of them when `n` is None or at least the count), in a
/// deterministic order that does not depend on the input order.
///
/// Items are ranked by a SHA-256 hash of (seed, dataset, item_key) and the first `n` kept; the
/// result is then put in canonical order (dataset, source_row, item_key).
pub fn sample_items(mut items: Vec<Item>, n: Option<usize>, seed: u64) -> Vec<Item> {
    if let Some(n) = n.filter(|&n| n < items.len()) {
        items.sort_by_cached_key(|item| {
            let rank = statements::seeded_u64(seed, &["sample", &item.dataset, &item.item_key]);
            (rank, item.dataset.clone(), item.item_key.clone())
        });
        items.truncate(n);
    }
    items.sort_by(|a, b| (&a.dataset, a.source_row, &a.item_key).cmp(&(&b.dataset, b.source_row, &b.item_key)));
    items
}

impl Amender {
    /// How many trials one item of `dataset` becomes.
    pub fn trials_per_item(&self, dataset: crate::conditions::Dataset) -> usize {
        if dataset.is_open_ended() { self.amendments.len() * self.prompt_types.len() } else { 1 }
    }
}
