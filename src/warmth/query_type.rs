//! The query-type labeller of the warmth validation set: refusal, factual, creative,
//! technical, advice, other, by regular expressions kept in `data/warmth/query_types.json`.
//!
//! ```
//! let l = candor::warmth::query_type::Labeller::bundled().unwrap();
//! assert_eq!(l.label("Write a haiku about rain"), "creative");
//! assert_eq!(l.label("Hello there"), "other");
//! ```

use regex::{Regex, RegexBuilder};
use serde::Deserialize;

use crate::error::{Error, Location, Result};

/// The bundled rules.
pub const BUNDLED: &str = include_str!("../../data/warmth/query_types.json");

/// Query types in the paper's order.
pub const TYPES: [&str; 6] = ["refusal", "factual", "creative", "technical", "advice", "other"];

#[derive(Deserialize)]
struct Rules {
    default: String,
    types: Vec<TypeRule>,
}

#[derive(Deserialize)]
struct TypeRule {
    #[serde(rename = "type")]
    ty: String,
    patterns: Vec<String>,
}

/// Labels a prompt with the first type whose pattern matches.
#[derive(Clone, Debug)]
pub struct Labeller {
    rules: Vec<(String, Vec<Regex>)>,
    default: String,
}

impl Labeller {
    /// The rules of `data/warmth/query_types.json`.
    pub fn bundled() -> Result<Self> {
        Self::parse(BUNDLED, "data/warmth/query_types.json")
    }

    /// Rules from a JSON text of the bundled file's shape; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let at = || Location::file(origin);
        let r: Rules =
            serde_json::from_str(text).map_err(|e| Error::input(at().line(e.line() as u64), e.to_string()))?;
        let rules = r
            .types
            .into_iter()
            .map(|t| {
                let res = t
                    .patterns
                    .iter()
                    .map(|p| {
                        RegexBuilder::new(p)
                            .case_insensitive(true)
                            .build()
                            .map_err(|e| Error::input(at().field(&t.ty), format!("pattern `{p}`: {e}")))
                    })
                    .collect::<Result<_>>()?;
                Ok((t.ty, res))
            })
            .collect::<Result<_>>()?;
        Ok(Labeller { rules, default: r.default })
    }

    pub fn label(&self, prompt: &str) -> &str {
        self.rules
            .iter()
            .find(|(_, res)| res.iter().any(|re| re.is_match(prompt)))
            .map_or(self.default.as_str(), |(t, _)| t.as_str())
    }
}
