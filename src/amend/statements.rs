//! The interpersonal-context statements (one list per amendment subtype) and the seeded choice
//! of one statement per item.
//!
//! The built-in table is `amendment_statements_observed` of the vendored paper templates; a user
//! can supply their own table in the same shape. The choice hashes (seed, dataset, item_key,
//! amendment_type) with SHA-256, so it depends on nothing else: not on the model, the
//! checkpoint, the number of workers or the order items arrive in.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::LazyLock;

use sha2::{Digest, Sha256};

use crate::conditions::AmendmentType;
use crate::error::{Error, Location, Result};

use super::PAPER_TEMPLATES;

/// Statements per amendment subtype, in the order of the source file (the order fixes each
/// statement's `subtype#index` id).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Statements {
    by_type: BTreeMap<AmendmentType, Vec<String>>,
}

/// One drawn statement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chosen<'a> {
    /// `subtype#index`, index 0-based in the table's list for that subtype.
    pub id: String,
    pub text: &'a str,
}

static OBSERVED: LazyLock<Statements> = LazyLock::new(|| {
    Statements::from_json_str(PAPER_TEMPLATES, &Location::default())
        .expect("the vendored paper templates hold a valid statements table")
});

impl Statements {
    /// The statements observed in the paper's public sample prompts.
    pub fn observed() -> &'static Statements {
        &OBSERVED
    }

    /// Reads a table from a JSON file shaped like `amendment_statements_observed`
    /// (`{"emotion": {"anger": ["…", …], …}, …}`), or a whole templates file holding that key.
    pub fn from_path(path: &Path) -> Result<Statements> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Statements::from_json_str(&text, &Location::file(path))
    }

    /// Parses a table from JSON text; `origin` names where the text came from in errors.
    pub fn from_json_str(text: &str, origin: &Location) -> Result<Statements> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Error::input(origin.clone(), format!("invalid JSON: {e}")))?;
        let table = value.get("amendment_statements_observed").unwrap_or(&value);
        let groups =
            table.as_object().ok_or_else(|| Error::input(origin.clone(), "expected an object of amendment groups"))?;
        let mut by_type = BTreeMap::new();
        for (group, subtypes) in groups {
            let subtypes = subtypes
                .as_object()
                .ok_or_else(|| Error::input(origin.clone().field(group.as_str()), "expected an object of subtypes"))?;
            for (subtype, list) in subtypes {
                let at = origin.clone().field(format!("{group}.{subtype}"));
                let name = format!("{group}:{subtype}");
                let amendment: AmendmentType = name.parse().map_err(|e: String| Error::input(at.clone(), e))?;
                if amendment == AmendmentType::Unmodified {
                    return Err(Error::input(at, "the unmodified condition has no statements"));
                }
                by_type.insert(amendment, statement_list(list, &at)?);
            }
        }
        Ok(Statements { by_type })
    }

    /// The statements of one amendment type (None when the table has none for it).
    pub fn list(&self, amendment: AmendmentType) -> Option<&[String]> {
        self.by_type.get(&amendment).map(Vec::as_slice)
    }

    /// The statement drawn for one item under one amendment type; None for `unmodified`.
    pub fn choose(
        &self,
        seed: u64,
        dataset: &str,
        item_key: &str,
        amendment: AmendmentType,
    ) -> Result<Option<Chosen<'_>>> {
        let Some(subtype) = amendment.subtype() else {
            return Ok(None);
        };
        let list = self.list(amendment).ok_or_else(|| {
            Error::config("statements", format!("the statements table has no statements for `{amendment}`"))
        })?;
        let draw = seeded_u64(seed, &["statement", dataset, item_key, amendment.as_str()]);
        // The modulo bias is below 1e-17 for lists of a few statements.
        let index = (draw % list.len() as u64) as usize;
        Ok(Some(Chosen { id: format!("{subtype}#{index}"), text: &list[index] }))
    }
}

fn statement_list(list: &serde_json::Value, at: &Location) -> Result<Vec<String>> {
    let items = list.as_array().ok_or_else(|| Error::input(at.clone(), "expected a list of statements"))?;
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        match item.as_str() {
            Some(s) if !s.trim().is_empty() => out.push(s.to_string()),
            _ => {
                return Err(Error::input(at.clone(), "statements must be non-empty strings"));
            }
        }
    }
    if out.is_empty() {
        return Err(Error::input(at.clone(), "the list of statements is empty"));
    }
    Ok(out)
}

/// A 64-bit value from SHA-256 of the seed and the parts. Each part is length-prefixed so that
/// ("ab", "c") and ("a", "bc") hash differently.
pub(crate) fn seeded_u64(seed: u64, parts: &[&str]) -> u64 {
    let mut hasher = Sha256::new();
    hasher.update(seed.to_le_bytes());
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}
