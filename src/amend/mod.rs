//! The amend operator's logic: items × amendment types × prompt types → [`Trial`] rows.

use crate::conditions::{AmendmentType, PromptType, TemplateStyle};
use crate::error::Result;
use crate::records::{Item, Trial};

/// Builds the trials of one item. Statement choice depends only on (seed, dataset, item_key,
/// amendment type), so every model, checkpoint, worker count and item order gets the same trials.
#[derive(Clone, Debug)]
pub struct Amender {
    pub style: TemplateStyle,
    pub amendments: Vec<AmendmentType>,
    pub prompt_types: Vec<PromptType>,
    pub seed: u64,
}

impl Amender {
    pub fn trials(&self, item: &Item) -> Result<Vec<Trial>> {
        let _ = item;
        unimplemented!("filled in by the amend work")
    }
}

/// A seeded sample of `n` items (all of them when `n` is None or at least the count), in a
/// deterministic order that does not depend on the input order.
pub fn sample_items(items: Vec<Item>, n: Option<usize>, seed: u64) -> Vec<Item> {
    let _ = (n, seed);
    items
}

impl Amender {
    /// The amender an experiment describes.
    pub fn from_experiment(exp: &crate::config::Experiment) -> Result<Self> {
        Ok(Amender {
            style: exp.template_style,
            amendments: exp.conditions.amendments.clone(),
            prompt_types: exp.conditions.prompt_types.clone(),
            seed: exp.seed,
        })
    }

    /// How many trials one item of `dataset` becomes.
    pub fn trials_per_item(&self, dataset: crate::conditions::Dataset) -> usize {
        if dataset.is_open_ended() { self.amendments.len() * self.prompt_types.len() } else { 1 }
    }
}
