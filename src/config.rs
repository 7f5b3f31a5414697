//! The experiment file (TOML): which datasets, how many items, which conditions, which
//! template style, which models and checkpoints.
//!
//! ```
//! let exp = candor::config::Experiment::parse(r#"
//!     name = "demo"
//!     seed = 7
//!     [datasets.trivia]
//!     n = 10
//! "#, "demo.toml").unwrap();
//! assert_eq!(exp.datasets.len(), 1);
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::amend::{Amender, Statements};
use crate::conditions::{AmendmentType, Dataset, PromptType, TemplateStyle};
use crate::datasets::DatasetSource;
use crate::error::{Error, Location, Result};
use crate::model::ModelConfig;
use crate::score::refusal::RefusalMode;

/// An experiment, as written in its TOML file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// Name of the experiment; the default archive is `runs/<name>`.
    pub name: String,
    /// Seed of item sampling, statement assignment and generation.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// `clean` (default) or `paper`.
    #[serde(default)]
    pub template_style: TemplateStyle,
    /// Directory holding the vendored datasets; defaults to the repository's `data/`.
    pub data_dir: Option<PathBuf>,
    /// Where archives are written; defaults to `runs/<name>`.
    pub output: Option<PathBuf>,
    /// Datasets by name, each with its sample size and optional source file.
    pub datasets: BTreeMap<Dataset, DatasetConfig>,
    #[serde(default)]
    pub conditions: Conditions,
    #[serde(default)]
    pub refusal: RefusalConfig,
    #[serde(default)]
    pub generation: crate::generate::GenerationConfig,
    /// Who judges the answers `candor run` generates (`[judge]`, see [`crate::score::judge`]).
    #[serde(default)]
    pub judge: crate::score::judge::JudgeConfig,
    /// Models under evaluation, each with its checkpoints.
    #[serde(default)]
    pub models: Vec<ModelConfig>,
    /// `[warmth]`: score each generated answer's warmth as it is judged (see
    /// [`crate::warmth::WarmthConfig`]); absent, none is scored.
    pub warmth: Option<crate::warmth::WarmthConfig>,
}

fn default_seed() -> u64 {
    2026
}

/// One dataset's entry.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// Items sampled by seed; all items when absent.
    pub n: Option<usize>,
    #[serde(flatten)]
    pub source: DatasetSource,
}

/// Which amendment types and prompt types run.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Conditions {
    #[serde(default = "all_amendments")]
    pub amendments: Vec<AmendmentType>,
    #[serde(default = "all_prompt_types")]
    pub prompt_types: Vec<PromptType>,
    /// A JSON file of statements shaped like `amendment_statements_observed` in
    /// `data/templates/prompt_construction.json`, replacing the built-in ones.
    pub statements: Option<PathBuf>,
}

impl Default for Conditions {
    fn default() -> Self {
        Conditions { amendments: all_amendments(), prompt_types: all_prompt_types(), statements: None }
    }
}

fn all_amendments() -> Vec<AmendmentType> {
    AmendmentType::ALL.to_vec()
}

fn all_prompt_types() -> Vec<PromptType> {
    PromptType::ALL.to_vec()
}

/// Refusal detection settings.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefusalConfig {
    #[serde(default)]
    pub mode: RefusalMode,
}

impl Experiment {
    /// Reads and checks an experiment file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut exp = Self::parse(&text, path)?;
        // Relative paths in the file are relative to the file.
        let base = path.parent().unwrap_or(Path::new("."));
        for ds in exp.datasets.values_mut() {
            if let Some(p) = &ds.source.path {
                ds.source.path = Some(base.join(p));
            }
        }
        if let Some(p) = &exp.conditions.statements {
            exp.conditions.statements = Some(base.join(p));
        }
        if let Some(p) = &exp.data_dir {
            exp.data_dir = Some(base.join(p));
        }
        for m in &mut exp.models {
            for c in &mut m.checkpoints {
                if let Some(p) = &c.path {
                    c.path = Some(base.join(p));
                }
            }
        }
        Ok(exp)
    }

    /// Parses experiment text; `origin` names the file in errors.
    pub fn parse(text: &str, origin: impl AsRef<Path>) -> Result<Self> {
        let exp: Experiment = toml::from_str(text).map_err(|e| {
            let mut loc = Location::file(origin.as_ref());
            if let Some(span) = e.span() {
                loc = loc.line(text[..span.start].matches('\n').count() as u64 + 1);
            }
            Error::input(loc, e.message().to_string())
        })?;
        exp.check(origin.as_ref())?;
        Ok(exp)
    }

    fn check(&self, origin: &Path) -> Result<()> {
        let here = |key: &str, msg: String| Error::input(Location::file(origin).field(key), msg);
        if self.datasets.is_empty() {
            return Err(here("datasets", "no dataset is configured".into()));
        }
        if self.conditions.amendments.is_empty() {
            return Err(here("conditions.amendments", "the list is empty".into()));
        }
        if self.conditions.prompt_types.is_empty() {
            return Err(here("conditions.prompt_types", "the list is empty".into()));
        }
        let mut names = std::collections::HashSet::new();
        for m in &self.models {
            if !names.insert(&m.name) {
                return Err(here("models", format!("model `{}` is listed twice", m.name)));
            }
            if m.checkpoints.is_empty() {
                return Err(here("models.checkpoints", format!("model `{}` has no checkpoint", m.name)));
            }
            let mut ids = std::collections::HashSet::new();
            for c in &m.checkpoints {
                if !ids.insert(&c.id) {
                    return Err(here(
                        "models.checkpoints.id",
                        format!("model `{}` lists checkpoint `{}` twice", m.name, c.id),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The directory the datasets are read from.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(default_data_dir)
    }

    /// The amender this experiment describes: its template style, conditions, seed and
    /// statements table.
    pub fn amender(&self) -> Result<Amender> {
        Ok(Amender {
            style: self.template_style,
            amendments: self.conditions.amendments.clone(),
            prompt_types: self.conditions.prompt_types.clone(),
            seed: self.seed,
            statements: match &self.conditions.statements {
                Some(path) => Some(Statements::from_path(path)?),
                None => None,
            },
        })
    }

    /// The archive root.
    pub fn output_dir(&self) -> PathBuf {
        self.output.clone().unwrap_or_else(|| PathBuf::from("runs").join(&self.name))
    }
}

/// The vendored data directory: `$CANDOR_DATA_DIR`, else the copy of the data embedded in the
/// binary, written once to Candor's cache (`~/.cache/candor/data-<digest>/`, see
/// [`crate::datasets::embedded`]), so the binary needs no source checkout. If the cache cannot
/// be written, the error is printed and the build's checkout is tried.
pub fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CANDOR_DATA_DIR") {
        return PathBuf::from(d);
    }
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        crate::datasets::embedded::materialize(&crate::model::cache_dir()).unwrap_or_else(|e| {
            eprintln!("warning: {e}; reading the data of the source checkout instead");
            Path::new(env!("CARGO_MANIFEST_DIR")).join("data")
        })
    })
    .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_amendment_names_file_line_and_choices() {
        let text =
            "name = \"x\"\n[datasets.trivia]\nn = 3\n[conditions]\namendments = [\"emotion:sad\", \"emotion:bored\"]\n";
        let err = Experiment::parse(text, "exp.toml").unwrap_err().to_string();
        assert!(err.contains("exp.toml") && err.contains("line 5"), "{err}");
        assert!(err.contains("emotion:bored") && err.contains("emotion:sad"), "{err}");
    }

    #[test]
    fn unknown_prompt_type_and_dataset_are_rejected() {
        let err =
            Experiment::parse("name='x'\n[datasets.trivia]\n[conditions]\nprompt_types=['flattering']\n", "e.toml")
                .unwrap_err()
                .to_string();
        assert!(err.contains("flattering") && err.contains("line 4"), "{err}");
        let err = Experiment::parse("name='x'\n[datasets.squad]\n", "e.toml").unwrap_err().to_string();
        assert!(err.contains("squad"), "{err}");
    }

    #[test]
    fn a_misspelt_key_is_an_error() {
        let err = Experiment::parse("name='x'\nsede=3\n[datasets.trivia]\n", "e.toml").unwrap_err().to_string();
        assert!(err.contains("sede") && err.contains("line 2"), "{err}");
    }

    #[test]
    fn variants_are_labelled_as_configured() {
        let exp = Experiment::parse(
            r#"name='x'
[datasets.trivia]
[[models]]
name = "m"
[[models.checkpoints]]
id = "original"
variant = "original"
[[models.checkpoints]]
id = "warm-sp"
variant = "warm"
finetuned = true
system_prompt = "be warm"
[[models.checkpoints]]
id = "warm-e2"
variant = "warm"
finetuned = true
epoch = 2.0
path = "adapters/e2"
[[models.checkpoints]]
id = "cold"
variant = "cold"
finetuned = true
path = "cold"
[[models.checkpoints]]
id = "named"
variant = "warm-system-prompt"
finetuned = true
system_prompt = "be warm"
"#,
            "e.toml",
        )
        .unwrap();
        assert_eq!(exp.models[0].base_checkpoints(), ["original"]);
        let labels: Vec<Option<String>> = exp.models[0].checkpoints.iter().map(|c| c.variant_label()).collect();
        assert_eq!(
            labels,
            [
                Some("original".into()),
                Some("warm system prompt".into()),
                Some("warm fine-tune, epoch 2".into()),
                Some("cold fine-tune".into()),
                Some("warm-system-prompt".into()),
            ]
        );
    }

    #[test]
    fn defaults_cover_the_full_grid() {
        let exp = Experiment::parse("name='x'\n[datasets.disinfo]\nn = 125\n", "e.toml").unwrap();
        assert_eq!(exp.conditions.amendments.len(), 9);
        assert_eq!(exp.conditions.prompt_types.len(), 4);
        assert_eq!(exp.template_style, TemplateStyle::Clean);
        assert_eq!(exp.output_dir(), PathBuf::from("runs/x"));
    }
}
