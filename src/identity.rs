//! Identity: how a checkpoint, a trial and a response are named, in one place.
//!
//! Model and checkpoint names are the user's (`HuggingFaceTB/SmolLM2`, `org:model`, `warm
//! epoch 2`, `modèle`), so nothing here may assume a character is free. Three encodings, each
//! reversible, so two different identities can never meet under one name:
//!
//! - **Keys** ([`key`], [`CheckpointRef::key`]): a structured key as one string for joins and
//!   maps; components are joined with `/` after escaping `%` and `/` in each, so model `a` +
//!   checkpoint `b/c` (`a/b%2Fc`) never equals model `a/b` + checkpoint `c` (`a%2Fb/c`).
//! - **Partition directories** ([`partition_segment`]): the Hive convention `name=value` with
//!   every byte outside `[A-Za-z0-9._-]` percent-encoded (UTF-8), which pyarrow, polars and
//!   Spark decode back to the exact name.
//! - **Display** (`{model} @ {checkpoint}`) for messages only, never parsed.
//!
//! ```
//! use candor::identity::{CheckpointRef, key, split_key};
//! let a = CheckpointRef::new("a", "b/c");
//! let b = CheckpointRef::new("a/b", "c");
//! assert_ne!(a.key(), b.key());
//! assert_eq!(split_key(&a.key()), vec!["a", "b/c"]);
//! assert_eq!(key(&["emotion:sad", "100%"]), "emotion:sad/100%25");
//! ```

use std::fmt;

use serde::{Deserialize, Serialize};

/// One checkpoint of one model: the identity every per-checkpoint row carries.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CheckpointRef {
    pub model: String,
    pub checkpoint: String,
}

impl CheckpointRef {
    pub fn new(model: impl Into<String>, checkpoint: impl Into<String>) -> Self {
        CheckpointRef { model: model.into(), checkpoint: checkpoint.into() }
    }

    /// The reversible one-string form (see the module doc).
    pub fn key(&self) -> String {
        key(&[&self.model, &self.checkpoint])
    }

    /// Names must be non-empty and free of control characters (they end up in file names,
    /// messages and terminals); anything else is allowed.
    pub fn validate(&self) -> std::result::Result<(), String> {
        for (what, name) in [("model", &self.model), ("checkpoint", &self.checkpoint)] {
            if name.trim().is_empty() {
                return Err(format!("the {what} name is empty"));
            }
            if let Some(c) = name.chars().find(|c| c.is_control()) {
                return Err(format!("the {what} name {name:?} contains the control character {c:?}"));
            }
        }
        Ok(())
    }
}

impl fmt::Display for CheckpointRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} @ {}", self.model, self.checkpoint)
    }
}

/// Escapes one key component: `%` and `/` only, so ordinary names read as themselves.
pub fn escape_component(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.contains(['%', '/']) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 4);
    push_escaped(&mut out, s);
    std::borrow::Cow::Owned(out)
}

/// Appends [`escape_component`] of `s` to `out`, the text between escapes copied as slices.
fn push_escaped(out: &mut String, s: &str) {
    let mut rest = s;
    while let Some(i) = rest.find(['%', '/']) {
        out.push_str(&rest[..i]);
        out.push_str(if rest.as_bytes()[i] == b'%' { "%25" } else { "%2F" });
        rest = &rest[i + 1..];
    }
    out.push_str(rest);
}

/// Joins escaped components with `/`: a key no other list of components produces.
pub fn key(components: &[&str]) -> String {
    key_of(components.iter().copied())
}

/// [`key`] of components handed one at a time (no list of them built first).
pub fn key_of<'c>(components: impl IntoIterator<Item = &'c str>) -> String {
    let mut out = String::with_capacity(64);
    for (i, c) in components.into_iter().enumerate() {
        if i > 0 {
            out.push('/');
        }
        push_escaped(&mut out, c);
    }
    out
}

/// The components of a [`key`], unescaped.
pub fn split_key(key: &str) -> Vec<String> {
    key.split('/').map(|c| percent_decode(c).unwrap_or_else(|| c.to_string())).collect()
}

/// A Hive partition directory name `name=value`, the value percent-encoded byte by byte
/// outside `[A-Za-z0-9._-]`.
pub fn partition_segment(name: &str, value: &str) -> String {
    let mut out = format!("{name}=");
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The value of a partition directory name made by [`partition_segment`].
pub fn parse_partition_segment(segment: &str) -> Option<(String, String)> {
    let (name, value) = segment.split_once('=')?;
    Some((name.to_string(), percent_decode(value)?))
}

/// Decodes `%XX` escapes (UTF-8); None for a malformed escape or invalid UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    if !s.contains('%') {
        return Some(s.to_string());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The base-checkpoint rule, the one place it is written.
///
/// A checkpoint is a *base* when it is not fine-tuned (`finetuned = false` in the experiment
/// file and in stream announcements, `is_finetuned = false` in the records). Every fine-tuned
/// checkpoint of a model is paired against every base of the same model, one family per
/// (base, fine-tuned) pair, as the SQL view (`sql/view.rs`) and the report keep them
/// (METHOD.md §4). Where a single base must stand for the model (the `paired` summary of
/// `candor stream`'s per-checkpoint statistics), it is the first one returned here.
///
/// Returns the bases among `checkpoints`, given as (name, fine-tuned), sorted by name and
/// each once. Names are compared as given (`candor stream` passes checkpoint keys).
///
/// ```
/// use candor::identity::base_checkpoints;
/// let cps = [("warm", true), ("original", false), ("b-original", false)];
/// assert_eq!(base_checkpoints(cps), ["b-original", "original"]);
/// assert!(base_checkpoints([("warm", true)]).is_empty());
/// ```
pub fn base_checkpoints<'a>(checkpoints: impl IntoIterator<Item = (&'a str, bool)>) -> Vec<&'a str> {
    let mut bases: Vec<&str> =
        checkpoints.into_iter().filter(|(_, finetuned)| !finetuned).map(|(name, _)| name).collect();
    bases.sort_unstable();
    bases.dedup();
    bases
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMES: &[&str] = &["org/model", "org:model", "org model", "org/modèl", "org%model", "a", "a/b", "b/c", "%2F"];

    #[test]
    fn keys_of_different_checkpoints_never_collide() {
        let mut seen = std::collections::HashMap::new();
        for m in NAMES {
            for c in NAMES {
                let r = CheckpointRef::new(*m, *c);
                if let Some(prev) = seen.insert(r.key(), r.clone()) {
                    panic!("{prev} and {r} share the key {}", r.key());
                }
                assert_eq!(split_key(&r.key()), vec![m.to_string(), c.to_string()]);
            }
        }
        // The escapes themselves, wherever they fall in a component.
        assert_eq!(key(&["a/b%c", "%2F", "modèl/", "/", ""]), "a%2Fb%25c/%252F/modèl%2F/%2F/");
        assert_eq!(escape_component("%/%"), "%25%2F%25");
    }

    /// The bug this pins: `org/model`, `org:model`, `org model` and `org/modèl` all became
    /// `model=org%model`, and Hive readers merged them.
    #[test]
    fn partition_directories_round_trip_and_stay_apart() {
        let mut seen = std::collections::HashSet::new();
        for name in NAMES {
            let seg = partition_segment("model", name);
            assert!(seg.bytes().all(|b| b.is_ascii_graphic() && b != b'/'), "{seg}");
            assert!(seen.insert(seg.clone()), "{seg} reused");
            assert_eq!(parse_partition_segment(&seg), Some(("model".into(), name.to_string())));
        }
        assert_eq!(partition_segment("model", "org/modèl"), "model=org%2Fmod%C3%A8l");
    }

    #[test]
    fn names_must_be_printable_and_non_empty() {
        assert!(CheckpointRef::new("", "c").validate().is_err());
        assert!(CheckpointRef::new("m", "a\nb").validate().is_err());
        assert!(CheckpointRef::new("org/modèl", "warm epoch 2").validate().is_ok());
    }
}
