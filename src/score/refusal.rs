//! The refusal operator's logic: phrase rules over model output.

use serde::Deserialize;

/// Which phrase list to apply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RefusalMode {
    /// The paper's list exactly, with its defects (regex semantics of the unescaped list).
    Paper,
    /// The corrected list (curly apostrophes, literal matching, common refusal forms).
    #[default]
    Default,
}

/// Finds refusals in model output.
#[derive(Clone, Debug)]
pub struct RefusalRules {
    pub mode: RefusalMode,
}

impl RefusalRules {
    pub fn new(mode: RefusalMode) -> Self {
        RefusalRules { mode }
    }
    /// The first phrase of the list that matches `output`, if any.
    pub fn detect(&self, output: &str) -> Option<String> {
        let _ = output;
        unimplemented!("filled in by the refusal work")
    }
}
