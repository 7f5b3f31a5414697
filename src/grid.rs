//! The trial grid of an experiment in an archive: the experiment's datasets sampled, every
//! item rendered under each amendment type × prompt type by the dataflow, and the result
//! archived as the grid epoch, with a definition that says what the grid was built from.
//!
//! An archive holds one grid at a time, numbered by version. Building the same definition again
//! changes nothing; a different definition is refused with what changed ([`grid_changes`]),
//! unless [`GridMode::Regrid`] builds it as the next version and withdraws every checkpoint
//! evaluated on the old one (their answers stay in the generation store and are reused).

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};

use crate::amend::sample_items;
use crate::archive::{Archive, read_records};
use crate::config::Experiment;
use crate::dataflow::{Cluster, EpochDone};
use crate::records::{Item, Trial};
use crate::schema::Record;

/// What to do when the archive already holds a grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GridMode {
    /// Keep a grid built from the same definition; refuse a different one, saying what changed.
    Keep,
    /// Build the new grid as the archive's next grid version: the old grid and every
    /// checkpoint evaluated on it are withdrawn (they stay in the tables' Delta history) and
    /// evaluated again (answers come from the generation store).
    Regrid,
}

/// What [`build_grid`] built, or found already built.
pub struct GridReport {
    /// Items sampled per dataset.
    pub items: BTreeMap<String, usize>,
    /// Archived trials per (dataset, amendment type, prompt type).
    pub counts: BTreeMap<(String, String, String), usize>,
    /// The epochs the dataflow wrote (none when the grid was unchanged).
    pub epochs: Vec<EpochDone>,
    /// The grid was already built from the same definition: nothing was written.
    pub unchanged: bool,
    /// The grid's version in the archive (1 for the first; `--regrid` adds one).
    pub version: u64,
}

/// Loads and samples the experiment's datasets, builds the grid in the dataflow, archives it,
/// and counts the archived trials. An archive whose grid was built from the same definition
/// is left as it is; a different definition is refused with what changed, unless `mode` is
/// [`GridMode::Regrid`].
pub fn build_grid(exp: &Experiment, archive: &Archive, mode: GridMode, cluster: &Cluster) -> Result<GridReport> {
    let amender = exp.amender()?;
    let mut batches = Vec::new();
    let mut items = BTreeMap::new();
    let mut expected = 0u64;
    let mut version = 1;
    if cluster.is_leader() {
        let (sampled, per_dataset, definition) = plan_grid(exp)?;
        items = per_dataset;
        let manifest = archive.manifest()?;
        let committed = archive.committed_epochs()?;
        let stored = manifest.grid.clone();
        let old_version = stored.as_ref().and_then(|g| g.get("version")).and_then(|v| v.as_u64()).unwrap_or(0);
        if let Some(old) = stored.as_ref().and_then(|g| g.get("definition")) {
            let changes = grid_changes(old, &definition);
            if changes.is_empty() && committed.contains(&crate::dataflow::GRID_EPOCH) {
                let counts = count_trials(archive)?;
                return Ok(GridReport { items, counts, epochs: Vec::new(), unchanged: true, version: old_version });
            }
            if !changes.is_empty() && mode == GridMode::Keep && committed.contains(&crate::dataflow::GRID_EPOCH) {
                bail!(crate::error::Error::input(
                    crate::error::Location::file(archive.root()),
                    format!(
                        "the experiment's grid differs from the one this archive was built with (grid version {old_version}):\n  {}\npass --regrid to build the new grid as version {} (every checkpoint is evaluated again on it; stored answers are reused), or choose another --out",
                        changes.join("\n  "),
                        old_version + 1
                    ),
                ));
            }
        } else if archive.has(Trial::STREAM)? && mode == GridMode::Keep {
            bail!(crate::error::Error::input(
                crate::error::Location::file(archive.root()),
                "holds trials that were not built from an experiment's grid (imported answers); build the grid in another --out, or pass --regrid to replace them",
            ));
        }
        if mode == GridMode::Regrid && !committed.is_empty() {
            archive.retract_epochs(&committed)?;
            eprintln!(
                "{}: grid version {} replaces version {old_version}; {} checkpoint epoch(s) withdrawn and to be evaluated again",
                archive.root().display(),
                old_version + 1,
                committed.iter().filter(|e| **e != crate::dataflow::GRID_EPOCH).count()
            );
        }
        version = old_version + 1;
        // Recorded first: a crash before the grid commits leaves an archive that builds the
        // same grid again, never one whose grid lacks its definition.
        archive.set_grid(serde_json::json!({"version": version, "definition": definition}))?;
        for dataset in exp.datasets.keys() {
            let n: Vec<Item> = sampled.iter().filter(|i| i.dataset == dataset.as_str()).cloned().collect();
            expected += n.len() as u64 * amender.trials_per_item(*dataset) as u64;
            batches.push(Item::to_batch(&n)?);
        }
    }
    let epochs = crate::amend::stage::build_trials(cluster, archive, batches, amender, expected)?;
    let counts = if cluster.is_leader() { count_trials(archive)? } else { BTreeMap::new() };
    Ok(GridReport { items, counts, epochs, unchanged: false, version })
}

/// The differences between two grid definitions, one line each (`datasets.trivia.n: 1 → 2`).
pub fn grid_changes(old: &serde_json::Value, new: &serde_json::Value) -> Vec<String> {
    fn walk(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
        match (a, b) {
            (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                    let null = serde_json::Value::Null;
                    walk(&p, x.get(k).unwrap_or(&null), y.get(k).unwrap_or(&null), out);
                }
            }
            (a, b) if a != b => out.push(format!("{path}: {a} → {b}")),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk("", old, new, &mut out);
    out
}

/// The sampled items of an experiment and its grid definition: the grid-defining part of the
/// experiment (datasets, sample sizes, seed, template style, conditions, statements) with a
/// digest of the items each dataset yields, so a change of settings or of a dataset file is
/// seen.
fn plan_grid(exp: &Experiment) -> Result<(Vec<Item>, BTreeMap<String, usize>, serde_json::Value)> {
    use sha2::{Digest, Sha256};
    let data_dir = exp.data_dir();
    let mut all = Vec::new();
    let mut items = BTreeMap::new();
    let mut datasets = serde_json::Map::new();
    for (dataset, cfg) in &exp.datasets {
        let loaded = crate::datasets::load(*dataset, &cfg.source, &data_dir)
            .with_context(|| format!("loading dataset `{dataset}`"))?;
        let sampled = sample_items(loaded, cfg.n, exp.seed);
        items.insert(dataset.to_string(), sampled.len());
        let digest = crate::archive::log::hex(&Sha256::digest(serde_json::to_vec(&sampled)?));
        datasets.insert(
            dataset.to_string(),
            serde_json::json!({
                "n": cfg.n,
                "path": cfg.source.path,
                "format": cfg.source.format.map(|f| format!("{f:?}")),
                "incorrect_column": cfg.source.incorrect_column,
                "items_sha256": digest,
            }),
        );
        all.extend(sampled);
    }
    let statements = match &exp.conditions.statements {
        Some(p) => {
            let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            Some(crate::archive::log::hex(&Sha256::digest(bytes)))
        }
        None => None,
    };
    let definition = serde_json::json!({
        "seed": exp.seed,
        "template_style": format!("{:?}", exp.template_style),
        "amendments": exp.conditions.amendments.iter().map(|a| a.as_str()).collect::<Vec<_>>(),
        "prompt_types": exp.conditions.prompt_types.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
        "statements_sha256": statements,
        "datasets": datasets,
    });
    Ok((all, items, definition))
}

/// Trials of the archive by (dataset, amendment type, prompt type).
fn count_trials(archive: &Archive) -> Result<BTreeMap<(String, String, String), usize>> {
    let mut counts = BTreeMap::new();
    for t in read_records::<Trial>(archive)? {
        *counts.entry((t.dataset, t.amendment_type, t.prompt_type)).or_insert(0) += 1;
    }
    Ok(counts)
}
