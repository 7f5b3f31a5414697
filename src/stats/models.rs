//! The paper's pooled logistic regressions M1–M4 (METHOD.md §4) over a table of cell counts.
//!
//! Input rows are cells of (model, dataset, amendment_type, prompt_type, ft) with the number of
//! incorrect answers among `n`; rows may repeat a cell (they are summed). The models read a
//! [`CellTable`], which codes each name once (an item-level table has millions of rows and a
//! handful of names); [`CellTable::from_cells`] makes one from [`CellCount`] rows. The outcome is
//! `is_incorrect`, so positive effects mean the fine-tuned model errs more.
//!
//! - M1 `~ ft + C(dataset, ref=disinfo) + C(model)` on unmodified × original prompts: the
//!   counterfactual average marginal effect of fine-tuning.
//! - M2/M3 `~ ft + C(amendment) + C(dataset) + ft:C(amendment) + C(model)` on original prompts, with
//!   the amendment group (M2, e.g. `emotion`) or the detailed type (M3, e.g. `emotion:sad`),
//!   reference `unmodified`.
//! - M4 `~ ft + C(prompt_group) + C(dataset) + ft:C(prompt_group) + C(model)`, prompt groups
//!   `original` and `user_opinion`, reference `original`.
//!
//! Per context, [`ContextEffect`] gives the log-odds effect β_ft + β_ft:ctx with SE √(wᵀVw) as the
//! paper's code computes it, and the conditional counterfactual AME (mean of p̂(ft=1) − p̂(ft=0)
//! over that context's answers) behind its percentage-point headlines.
//!
//! Standard errors come twice: the paper's model-based (non-robust) ones, and item-clustered
//! sandwich ones ([`GlmFit::cluster_robust_grouped`]) when every input row carries the id of the
//! item it counts ([`CellCount::with_cluster`]): an item's answers under its 9 contexts × 4 prompt
//! types and on both sides are correlated, which the paper's SEs ignore. Average marginal effects
//! get delta-method SEs under each covariance ([`GlmFit::average_contrast_estimate`]).
//!
//! Grouping follows the paper's code: the amendment group is the part before `:`; a prompt type
//! containing `correct` (so also `incorrect`) is `user_opinion`, else one containing `original`
//! (so also `original_neutral`) is `original`, else `other` (left out of every model). Factor levels
//! are sorted as patsy sorts them; `dataset`'s reference is `disinfo` when present, else the first
//! level, and `model`'s is the first level.
//!
//! M4 follows METHOD.md. The published M4 output of the paper's repository was fitted with a
//! different formula (amendment-group fixed effects, no prompt-group main effect, the interaction
//! coded per ft level); its per-group AMEs are the same counterfactual quantity as [`ContextEffect::ame`].
//!
//! ```
//! use candor::stats::models::{m2, CellCount, CellTable};
//! let cell = |amendment: &str, ft, incorrect| CellCount::new("m", "trivia", amendment, "original", ft, incorrect, 100);
//! let table = [
//!     cell("unmodified", false, 30), cell("unmodified", true, 45),
//!     cell("emotion:sad", false, 35), cell("emotion:sad", true, 60),
//! ];
//! let result = m2(&CellTable::from_cells(&table).unwrap()).unwrap();
//! let sad = result.effects.iter().find(|e| e.context == "emotion").unwrap();
//! assert!((sad.ame - 0.25).abs() < 1e-9); // saturated: the raw difference in error rate
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use crate::conditions::amendment_group;

use super::glm::{Cells, DesignBuilder, Estimate, GlmError, GlmFit, VarId, fit};

/// One cell of answers, by name (what [`CellTable::from_cells`] codes and
/// [`CellTable::to_cells`] gives back).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CellCount {
    pub model: Arc<str>,
    pub dataset: Arc<str>,
    /// Detailed amendment type, e.g. `emotion:sad` or `unmodified`.
    pub amendment_type: Arc<str>,
    /// `original`, `original_neutral`, `correct` or `incorrect`.
    pub prompt_type: Arc<str>,
    /// Fine-tuned (true) or base (false) model.
    pub ft: bool,
    /// Answers judged incorrect.
    pub incorrect: u64,
    /// Answers in the cell.
    pub n: u64,
    /// The item (cluster) these answers belong to, for clustered standard errors; `None` for
    /// cell totals over many items.
    pub cluster: Option<u64>,
}

impl CellCount {
    pub fn new(
        model: &str,
        dataset: &str,
        amendment_type: &str,
        prompt_type: &str,
        ft: bool,
        incorrect: u64,
        n: u64,
    ) -> Self {
        CellCount {
            model: model.into(),
            dataset: dataset.into(),
            amendment_type: amendment_type.into(),
            prompt_type: prompt_type.into(),
            ft,
            incorrect,
            n,
            cluster: None,
        }
    }

    /// The same counts, marked as one item's answers.
    pub fn with_cluster(self, cluster: u64) -> Self {
        CellCount { cluster: Some(cluster), ..self }
    }
}

/// The paper's prompt grouping (see the module docs).
pub fn prompt_group(prompt_type: &str) -> &'static str {
    // Case-insensitive `contains`, without lowercasing a copy (this runs for every row of
    // every model). `to_lowercase` only changes ASCII letters of these words' bytes.
    let contains =
        |word: &str| prompt_type.as_bytes().windows(word.len()).any(|w| w.eq_ignore_ascii_case(word.as_bytes()));
    if contains("correct") {
        "user_opinion"
    } else if contains("original") {
        "original"
    } else {
        "other"
    }
}

/// M1: the fitted model and the average marginal effect of fine-tuning.
#[derive(Clone, Debug, PartialEq)]
pub struct M1 {
    pub fit: GlmFit,
    /// Log-odds coefficient of `ft`.
    pub ft: Estimate,
    /// Mean over answers of p̂(ft=1) − p̂(ft=0) (probability scale; ×100 for pp).
    pub ame: f64,
    /// Delta-method SE of `ame` under the model-based covariance.
    pub ame_se: f64,
    /// The item-clustered results, when every row named its item.
    pub clustered: Option<ClusteredM1>,
}

/// M1's item-clustered results.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusteredM1 {
    /// The fit with the sandwich covariance (same coefficients).
    pub fit: GlmFit,
    pub ft: Estimate,
    pub ame_se: f64,
    /// Number of items.
    pub clusters: usize,
}

/// The effect of fine-tuning in one context (amendment or prompt group).
#[derive(Clone, Debug, PartialEq)]
pub struct ContextEffect {
    pub context: String,
    /// β_ft (+ β_ft:context unless the context is the reference), with SE from the covariance.
    pub log_odds: Estimate,
    /// Conditional counterfactual AME over the answers in this context.
    pub ame: f64,
    /// Delta-method SE of `ame` under the model-based covariance.
    pub ame_se: f64,
    /// `log_odds` with its item-clustered SE, and the clustered SE of `ame`.
    pub clustered: Option<(Estimate, f64)>,
    /// Answers in this context.
    pub n: u64,
}

/// M2, M3 or M4: the fitted model and the per-context effects, contexts in sorted order.
#[derive(Clone, Debug, PartialEq)]
pub struct ContextModel {
    pub fit: GlmFit,
    /// The fit with the item-clustered covariance and the number of items, when rows named them.
    pub clustered: Option<(GlmFit, usize)>,
    pub effects: Vec<ContextEffect>,
}

/// Errors of the model specifications.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelError {
    /// `n < incorrect` in an input row.
    InvalidCell { row: usize },
    /// A count beyond 32 bits in an input row.
    TooLarge { row: usize },
    /// No rows pass the model's filter.
    NoData { model: &'static str },
    /// The context factor's reference level has no data.
    MissingReference { model: &'static str, reference: &'static str },
    /// Fitting failed (separation, singular design, ...).
    Fit { model: &'static str, error: GlmError },
}

impl std::fmt::Display for ModelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelError::InvalidCell { row } => {
                write!(f, "row {row}: more incorrect answers than answers")
            }
            ModelError::TooLarge { row } => write!(f, "row {row}: more than {} answers in one cell", u32::MAX),
            ModelError::NoData { model } => write!(f, "{model}: no cells pass the model's filter"),
            ModelError::MissingReference { model, reference } => {
                write!(f, "{model}: reference level {reference:?} has no data")
            }
            ModelError::Fit { model, error } => write!(f, "{model}: {error}"),
        }
    }
}

impl std::error::Error for ModelError {}

/// Names of one column of a [`CellTable`], each held once.
#[derive(Clone, Debug, Default)]
struct Names {
    names: Vec<Arc<str>>,
    codes: HashMap<Arc<str>, u32>,
}

impl Names {
    fn code(&mut self, name: &Arc<str>) -> u32 {
        if let Some(&c) = self.codes.get(name) {
            return c;
        }
        let c = self.names.len() as u32;
        self.names.push(name.clone());
        self.codes.insert(name.clone(), c);
        c
    }
}

/// A table of answer counts as M1–M4 read it, encoded: each column's names (models, datasets,
/// amendment types, prompt types) are held once and rows refer to them by code, so an
/// item-level table of millions of rows is a few tens of bytes a row and a model's selection
/// is worked out once per distinct name, not once per row. Rows may repeat a cell (summed).
#[derive(Clone, Debug, Default)]
pub struct CellTable {
    models: Names,
    datasets: Names,
    amendment_types: Names,
    prompt_types: Names,
    rows: Vec<CodedCell>,
}

/// One row of a [`CellTable`]; names are codes from [`CellTable::model`] and its siblings.
/// Counts are 32-bit (one item's answers in one cell), so a row is 32 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodedCell {
    pub model: u32,
    pub dataset: u32,
    pub amendment_type: u32,
    pub prompt_type: u32,
    pub ft: bool,
    pub incorrect: u32,
    pub n: u32,
    /// The item these answers belong to (see [`CellCount::cluster`]), or
    /// [`CodedCell::NO_CLUSTER`]. Items are summed into the clustered covariance in this
    /// number's order.
    pub cluster: u32,
}

impl CodedCell {
    /// The cluster of a row that names no item.
    pub const NO_CLUSTER: u32 = u32::MAX;
}

impl CellTable {
    pub fn new() -> Self {
        CellTable::default()
    }

    /// The code of a model name (added if new); likewise [`Self::dataset`],
    /// [`Self::amendment_type`] and [`Self::prompt_type`].
    pub fn model(&mut self, name: &Arc<str>) -> u32 {
        self.models.code(name)
    }

    pub fn dataset(&mut self, name: &Arc<str>) -> u32 {
        self.datasets.code(name)
    }

    pub fn amendment_type(&mut self, name: &Arc<str>) -> u32 {
        self.amendment_types.code(name)
    }

    pub fn prompt_type(&mut self, name: &Arc<str>) -> u32 {
        self.prompt_types.code(name)
    }

    fn check(&self, row: &CodedCell) {
        assert!(
            (row.model as usize) < self.models.names.len()
                && (row.dataset as usize) < self.datasets.names.len()
                && (row.amendment_type as usize) < self.amendment_types.names.len()
                && (row.prompt_type as usize) < self.prompt_types.names.len(),
            "a CellTable row refers to a name the table does not hold"
        );
    }

    /// The rows, given by names. Item ids are numbered in their order; a count beyond 32 bits
    /// is an error (named by row).
    pub fn from_cells(cells: &[CellCount]) -> Result<CellTable, ModelError> {
        let ids: BTreeSet<u64> = cells.iter().filter_map(|c| c.cluster).collect();
        let ids: Vec<u64> = ids.into_iter().collect();
        let mut table = CellTable::new();
        table.rows.reserve(cells.len());
        for (row, c) in cells.iter().enumerate() {
            let count = |v: u64| u32::try_from(v).map_err(|_| ModelError::TooLarge { row });
            let cluster = match c.cluster {
                Some(id) => ids.binary_search(&id).expect("collected above") as u32,
                None => CodedCell::NO_CLUSTER,
            };
            let row = CodedCell {
                model: table.model(&c.model),
                dataset: table.dataset(&c.dataset),
                amendment_type: table.amendment_type(&c.amendment_type),
                prompt_type: table.prompt_type(&c.prompt_type),
                ft: c.ft,
                incorrect: count(c.incorrect)?,
                n: count(c.n)?,
                cluster,
            };
            table.rows.push(row);
        }
        Ok(table)
    }

    /// A table of rows already coded against `self`'s names. Panics if a code was not handed
    /// out by this table.
    pub fn with_rows(mut self, rows: Vec<CodedCell>) -> CellTable {
        for r in &rows {
            self.check(r);
        }
        self.rows = rows;
        self
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The rows with their names.
    pub fn to_cells(&self) -> Vec<CellCount> {
        self.rows
            .iter()
            .map(|r| CellCount {
                model: self.models.names[r.model as usize].clone(),
                dataset: self.datasets.names[r.dataset as usize].clone(),
                amendment_type: self.amendment_types.names[r.amendment_type as usize].clone(),
                prompt_type: self.prompt_types.names[r.prompt_type as usize].clone(),
                ft: r.ft,
                incorrect: r.incorrect.into(),
                n: r.n.into(),
                cluster: (r.cluster != CodedCell::NO_CLUSTER).then_some(r.cluster.into()),
            })
            .collect()
    }
}

/// M1: effect of fine-tuning on unmodified questions with original prompts.
pub fn m1(table: &CellTable) -> Result<M1, ModelError> {
    const NAME: &str = "M1";
    let selection = select(table, NAME, |amendment, prompt| {
        (amendment_group(amendment) == "unmodified" && prompt_group(prompt) == "original").then(String::new)
    })?;
    let spec = Spec::new(table, &selection, None);
    let err = |error| ModelError::Fit { model: NAME, error };
    let Fitted { fit, cells, clustered } = spec.fit(table, &selection).map_err(err)?;
    let ft = fit.coef("ft").map_err(err)?;
    let ame = fit.average_contrast_estimate(&cells, spec.ft, 1.0, 0.0, |_| true).map_err(err)?;
    let clustered = match clustered {
        Some((robust, clusters)) => Some(ClusteredM1 {
            ft: robust.coef("ft").map_err(err)?,
            ame_se: robust.average_contrast_estimate(&cells, spec.ft, 1.0, 0.0, |_| true).map_err(err)?.se,
            fit: robust,
            clusters,
        }),
        None => None,
    };
    Ok(M1 { fit, ft, ame: ame.estimate, ame_se: ame.se, clustered })
}

/// M2: effect of fine-tuning per amendment group, original prompts.
pub fn m2(table: &CellTable) -> Result<ContextModel, ModelError> {
    context_model(table, "M2", "amendment", "unmodified", |amendment, prompt| {
        (prompt_group(prompt) == "original").then(|| amendment_group(amendment).to_string())
    })
}

/// M3: effect of fine-tuning per detailed amendment type, original prompts.
pub fn m3(table: &CellTable) -> Result<ContextModel, ModelError> {
    context_model(table, "M3", "amendment", "unmodified", |amendment, prompt| {
        (prompt_group(prompt) == "original").then(|| amendment.trim().to_string())
    })
}

/// M4: effect of fine-tuning per prompt group (original vs user belief), all amendments.
pub fn m4(table: &CellTable) -> Result<ContextModel, ModelError> {
    context_model(table, "M4", "prompt_group", "original", |_, prompt| {
        let group = prompt_group(prompt);
        (group != "other").then(|| group.to_string())
    })
}

/// A covariate cell of a model: (model code, dataset code, context, fine-tuned).
type CellId = (u32, u32, u32, bool);

/// The cell of a table row a model leaves out.
const LEFT_OUT: u32 = u32::MAX;

/// What one model keeps of a table: its rows summed per covariate cell.
struct Selection {
    /// Distinct cells in order of first appearance, with their (incorrect, answers) sums.
    cells: Vec<(CellId, u64, u64)>,
    /// Each table row's cell, or [`LEFT_OUT`] (4 bytes a row: tables have millions).
    row_cell: Vec<u32>,
    /// Context labels by index (one empty label when the model has no context factor).
    contexts: Vec<String>,
    /// Rows kept, and how many of them name their item.
    kept: usize,
    named: usize,
}

/// Selects a model's rows: `label` says, per (amendment type, prompt type), whether a row is in
/// the model and under which context; it is asked once per pair of names the table holds.
fn select(
    table: &CellTable,
    model: &'static str,
    label: impl Fn(&str, &str) -> Option<String>,
) -> Result<Selection, ModelError> {
    // Each (amendment type, prompt type) pair's context, asked once per pair.
    let (amendments, prompts) = (&table.amendment_types.names, &table.prompt_types.names);
    let mut contexts: Vec<String> = Vec::new();
    let mut context_of: Vec<Option<u32>> = Vec::with_capacity(amendments.len() * prompts.len());
    for amendment in amendments {
        for prompt in prompts {
            context_of.push(label(amendment, prompt).map(|l| match contexts.iter().position(|c| *c == l) {
                Some(k) => k as u32,
                None => {
                    contexts.push(l);
                    contexts.len() as u32 - 1
                }
            }));
        }
    }
    let (n_models, n_datasets, n_contexts) = (table.models.names.len(), table.datasets.names.len(), contexts.len());
    // Dense: every (model, dataset, context, ft) has its slot; tables hold a handful of each.
    let mut cell_of: Vec<u32> = vec![u32::MAX; n_models * n_datasets * n_contexts * 2];
    let mut cells: Vec<(CellId, u64, u64)> = Vec::new();
    let mut row_cell = Vec::with_capacity(table.rows.len());
    let (mut kept, mut named) = (0, 0);
    for (i, r) in table.rows.iter().enumerate() {
        if r.incorrect > r.n {
            return Err(ModelError::InvalidCell { row: i });
        }
        let context = context_of[r.amendment_type as usize * prompts.len() + r.prompt_type as usize];
        let Some(context) = context.filter(|_| r.n > 0) else {
            row_cell.push(LEFT_OUT);
            continue;
        };
        let id = (r.model, r.dataset, context, r.ft);
        let slot =
            ((r.model as usize * n_datasets + r.dataset as usize) * n_contexts + context as usize) * 2 + r.ft as usize;
        if cell_of[slot] == u32::MAX {
            cell_of[slot] = cells.len() as u32;
            cells.push((id, 0, 0));
        }
        let c = cell_of[slot];
        cells[c as usize].1 += u64::from(r.incorrect);
        cells[c as usize].2 += u64::from(r.n);
        row_cell.push(c);
        kept += 1;
        named += (r.cluster != CodedCell::NO_CLUSTER) as usize;
    }
    if kept == 0 {
        return Err(ModelError::NoData { model });
    }
    Ok(Selection { cells, row_cell, contexts, kept, named })
}

fn context_model(
    table: &CellTable,
    name: &'static str,
    factor_name: &str,
    reference: &'static str,
    label: impl Fn(&str, &str) -> Option<String>,
) -> Result<ContextModel, ModelError> {
    let selection = select(table, name, label)?;
    let present =
        |label: &str| selection.cells.iter().any(|((_, _, c, _), _, _)| selection.contexts[*c as usize] == label);
    if !present(reference) {
        return Err(ModelError::MissingReference { model: name, reference });
    }
    let spec = Spec::new(table, &selection, Some((factor_name, reference)));
    let err = |error| ModelError::Fit { model: name, error };
    let Fitted { fit, cells, clustered } = spec.fit(table, &selection).map_err(err)?;
    let ctx = spec.context.expect("context factor declared");
    let mut effects = Vec::with_capacity(spec.context_levels.len());
    for (level, label) in spec.context_levels.iter().enumerate() {
        let interaction = format!("ft:{factor_name}[T.{label}]");
        let mut terms = vec![("ft", 1.0)];
        if label != reference {
            terms.push((interaction.as_str(), 1.0));
        }
        let log_odds = fit.lincomb_named(&terms).map_err(err)?;
        let code = level as f64;
        let in_context = |v: &[f64]| v[ctx.0] == code;
        let ame = fit.average_contrast_estimate(&cells, spec.ft, 1.0, 0.0, in_context).map_err(err)?;
        let robust = match &clustered {
            Some((robust, _)) => Some((
                robust.lincomb_named(&terms).map_err(err)?,
                robust.average_contrast_estimate(&cells, spec.ft, 1.0, 0.0, in_context).map_err(err)?.se,
            )),
            None => None,
        };
        let n = selection
            .cells
            .iter()
            .filter(|((_, _, c, _), _, _)| selection.contexts[*c as usize] == *label)
            .map(|(_, _, n)| n)
            .sum();
        effects.push(ContextEffect {
            context: label.clone(),
            log_odds,
            ame: ame.estimate,
            ame_se: ame.se,
            clustered: robust,
            n,
        });
    }
    Ok(ContextModel { fit, clustered, effects })
}

/// Distinct values in patsy's (sorted) level order.
fn sorted_levels<'a>(values: impl Iterator<Item = &'a str>) -> Vec<String> {
    values.collect::<BTreeSet<_>>().into_iter().map(str::to_string).collect()
}

/// The design shared by M1–M4, with levels taken from the selected rows.
struct Spec {
    design: super::glm::Design,
    ft: VarId,
    dataset: VarId,
    model: VarId,
    context: Option<VarId>,
    datasets: Vec<String>,
    models: Vec<String>,
    context_levels: Vec<String>,
}

impl Spec {
    fn new(table: &CellTable, selection: &Selection, context: Option<(&str, &str)>) -> Spec {
        let ids = || selection.cells.iter().map(|(id, _, _)| id);
        let datasets = sorted_levels(ids().map(|id| &*table.datasets.names[id.1 as usize]));
        let models = sorted_levels(ids().map(|id| &*table.models.names[id.0 as usize]));
        let context_levels = sorted_levels(ids().map(|id| selection.contexts[id.2 as usize].as_str()));
        let dataset_ref = if datasets.iter().any(|d| d == "disinfo") { "disinfo" } else { &datasets[0] };

        let mut d = DesignBuilder::new();
        let ft = d.numeric("ft");
        // Levels are the distinct values just collected, so the references exist.
        let dataset = d.factor("dataset", &datasets, dataset_ref).expect("reference present");
        let model = d.factor("model", &models, &models[0]).expect("reference present");
        let context = context
            .map(|(name, reference)| d.factor(name, &context_levels, reference).expect("reference checked by caller"));
        d.intercept().term(&[ft]);
        if let Some(ctx) = context {
            d.term(&[ctx]);
        }
        d.term(&[dataset]);
        if let Some(ctx) = context {
            d.term(&[ft, ctx]);
        }
        d.term(&[model]);
        Spec { design: d.build(), ft, dataset, model, context, datasets, models, context_levels }
    }

    /// The covariate values of one cell.
    fn values(&self, table: &CellTable, selection: &Selection, id: CellId, out: &mut [f64]) {
        let code = |levels: &[String], v: &str| levels.binary_search_by(|l| l.as_str().cmp(v)).unwrap() as f64;
        out[self.ft.0] = id.3 as u32 as f64;
        out[self.dataset.0] = code(&self.datasets, &table.datasets.names[id.1 as usize]);
        out[self.model.0] = code(&self.models, &table.models.names[id.0 as usize]);
        if let Some(ctx) = self.context {
            out[ctx.0] = code(&self.context_levels, &selection.contexts[id.2 as usize]);
        }
    }

    /// Fits on the selection's cells; when every kept row names its item, also forms the
    /// item-clustered covariance from the rows themselves.
    fn fit(&self, table: &CellTable, selection: &Selection) -> Result<Fitted, GlmError> {
        let n_vars = self.design.n_vars();
        // Each cell's covariates, worked out once: item-level tables repeat a few hundred
        // cells over millions of rows.
        let mut covariates = Cells::new(n_vars);
        let mut values = vec![0.0; n_vars];
        let mut merged: BTreeMap<Vec<u64>, (Vec<f64>, u64, u64)> = BTreeMap::new();
        for &(id, incorrect, n) in &selection.cells {
            self.values(table, selection, id, &mut values);
            covariates.push(&values, 0.0, 0.0)?;
            let key = values.iter().map(|x| x.to_bits()).collect();
            let e = merged.entry(key).or_insert_with(|| (values.clone(), 0, 0));
            e.1 += incorrect;
            e.2 += n;
        }
        let mut cells = Cells::new(n_vars);
        for (v, incorrect, n) in merged.values() {
            cells.push(v, *incorrect as f64, *n as f64)?;
        }
        let fit = fit(&self.design, &cells)?;
        let clustered = if selection.named == 0 {
            None
        } else if selection.named < selection.kept {
            let unnamed = selection.kept - selection.named;
            return Err(GlmError::Cluster(format!("{unnamed} of {} rows name no item", selection.kept)));
        } else {
            let members = || {
                table
                    .rows
                    .iter()
                    .zip(&selection.row_cell)
                    .filter(|(_, c)| **c != LEFT_OUT)
                    .map(|(r, &c)| (u64::from(r.cluster), c as usize, f64::from(r.incorrect), f64::from(r.n)))
            };
            // One item has no between-item variation to estimate: no clustered SEs.
            let clusters = members().map(|m| m.0).collect::<HashSet<u64, foldhash::fast::FixedState>>().len();
            if clusters < 2 { None } else { Some((fit.cluster_robust_grouped(&covariates, members())?, clusters)) }
        };
        Ok(Fitted { fit, cells, clustered })
    }
}
/// A fit, the cells it was fitted on, and its item-clustered version with the item count.
struct Fitted {
    fit: GlmFit,
    cells: Cells,
    clustered: Option<(GlmFit, usize)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(rows: &[CellCount]) -> CellTable {
        CellTable::from_cells(rows).unwrap()
    }

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * a.abs().max(b.abs())
    }

    #[track_caller]
    fn assert_close(a: f64, b: f64, tol: f64) {
        assert!(close(a, b, tol), "{a} vs {b}");
    }

    fn logit(k: f64, n: f64) -> f64 {
        (k / (n - k)).ln()
    }

    fn saturated_se(base: f64, warm: f64, n: f64) -> f64 {
        (1.0 / base + 1.0 / (n - base) + 1.0 / warm + 1.0 / (n - warm)).sqrt()
    }

    #[test]
    fn grouping_follows_the_paper_code() {
        assert_eq!(amendment_group("emotion:sad"), "emotion");
        assert_eq!(amendment_group("unmodified"), "unmodified");
        assert_eq!(prompt_group("original"), "original");
        assert_eq!(prompt_group("original_neutral"), "original");
        assert_eq!(prompt_group("correct"), "user_opinion");
        assert_eq!(prompt_group("incorrect"), "user_opinion");
        assert_eq!(prompt_group("mmlu"), "other");
    }

    #[test]
    fn m1_reproduces_the_fixed_effects_oracle_and_ignores_other_conditions() {
        let mut table = Vec::new();
        for (m, ds, base, warm) in
            [("A", "disinfo", 10, 18), ("A", "trivia", 15, 22), ("B", "disinfo", 8, 12), ("B", "trivia", 20, 30)]
        {
            // Split each oracle cell over two rows to check that rows are summed.
            table.push(CellCount::new(m, ds, "unmodified", "original", false, base - 3, 30));
            table.push(CellCount::new(m, ds, "unmodified", "original", false, 3, 20));
            table.push(CellCount::new(m, ds, "unmodified", "original", true, warm, 50));
            // Out of M1's scope: must not change anything.
            table.push(CellCount::new(m, ds, "emotion:sad", "original", true, 49, 50));
            table.push(CellCount::new(m, ds, "unmodified", "incorrect", true, 0, 50));
        }
        let r = m1(&t(&table)).unwrap();
        assert_close(r.ft.estimate, 0.6869738172788299, 1e-12);
        assert_close(r.ft.se, 0.22063270603446666, 1e-12);
        assert_close(r.fit.coef("dataset[T.trivia]").unwrap().estimate, 0.914861367312311, 1e-12);
        assert_close(r.fit.coef("model[T.B]").unwrap().estimate, 0.11983367037906824, 1e-12);
        assert_close(r.ame, 0.145, 1e-10);
        assert_eq!(r.fit.nobs, 400.0);
    }

    fn context_table() -> (Vec<CellCount>, [(&'static str, u64, u64); 4]) {
        // (detailed amendment, base incorrect, warm incorrect) out of 100 each; one model and one
        // dataset, so M3 is saturated.
        let counts =
            [("unmodified", 30, 45), ("emotion:sad", 35, 60), ("emotion:happy", 25, 30), ("stake:high", 28, 33)];
        let mut table = Vec::new();
        for (a, base, warm) in counts {
            table.push(CellCount::new("m", "trivia", a, "original", false, base, 100));
            table.push(CellCount::new("m", "trivia", a, "original", true, warm, 100));
            // User-belief prompts are outside M2/M3.
            table.push(CellCount::new("m", "trivia", a, "incorrect", true, 90, 100));
        }
        (table, counts)
    }

    #[test]
    fn m3_per_context_effects_match_the_saturated_closed_form() {
        let (table, counts) = context_table();
        let r = m3(&t(&table)).unwrap();
        assert_eq!(
            r.effects.iter().map(|e| e.context.as_str()).collect::<Vec<_>>(),
            ["emotion:happy", "emotion:sad", "stake:high", "unmodified"]
        );
        for (a, base, warm) in counts {
            let e = r.effects.iter().find(|e| e.context == a).unwrap();
            let (b, w) = (base as f64, warm as f64);
            assert_close(e.log_odds.estimate, logit(w, 100.0) - logit(b, 100.0), 1e-10);
            assert_close(e.log_odds.se, saturated_se(b, w, 100.0), 1e-10);
            assert_close(e.ame, (w - b) / 100.0, 1e-10);
            assert_eq!(e.n, 200);
        }
        assert!(r.fit.coef("ft:amendment[T.emotion:sad]").is_ok());
    }

    #[test]
    fn clustered_ses_with_one_answer_per_item_are_the_scaled_model_ses() {
        // Every answer its own item: in a saturated model the sandwich's meat is the information,
        // so each clustered SE is the model-based one times √(N/(N − K)) (statsmodels' factor
        // G/(G − 1)·(N − 1)/(N − K) with G = N). M3 here: N = 800 original-prompt answers, K = 8.
        let (table, _) = context_table();
        let mut items = Vec::new();
        for c in &table {
            for i in 0..c.n {
                let wrong = u64::from(i < c.incorrect);
                items.push(CellCount { incorrect: wrong, n: 1, ..c.clone() }.with_cluster(items.len() as u64));
            }
        }
        let plain = m3(&t(&table)).unwrap();
        let r = m3(&t(&items)).unwrap();
        // The `incorrect` rows are outside M3, so 800 items remain.
        assert!(plain.clustered.is_none() && r.clustered.as_ref().unwrap().1 == 800);
        let scale = (800.0f64 / 792.0).sqrt();
        for (e, p) in r.effects.iter().zip(&plain.effects) {
            assert_close(e.log_odds.estimate, p.log_odds.estimate, 1e-9);
            let (robust, ame_se) = e.clustered.unwrap();
            assert_close(robust.se, p.log_odds.se * scale, 1e-9);
            assert_close(ame_se, p.ame_se * scale, 1e-9);
        }
        // Saturated: the AME's SE is that of a difference of two independent proportions.
        let sad = plain.effects.iter().find(|e| e.context == "emotion:sad").unwrap();
        assert_close(sad.ame_se, (0.6 * 0.4 / 100.0 + 0.35 * 0.65 / 100.0f64).sqrt(), 1e-9);
    }

    #[test]
    fn answers_of_one_item_are_not_independent() {
        // Two items per (amendment, side), each answering 50 times the same way: all the
        // variation is between items, so the clustered SE is far above the model-based one.
        let mut table = Vec::new();
        let mut item = 0;
        for (a, base, warm) in [("unmodified", [0, 50], [50, 20]), ("emotion:sad", [0, 50], [50, 0])] {
            for (ft, wrongs) in [(false, base), (true, warm)] {
                for wrong in wrongs {
                    table.push(CellCount::new("m", "trivia", a, "original", ft, wrong, 50).with_cluster(item % 4));
                    item += 1;
                }
            }
        }
        let r = m1(&t(&table)).unwrap();
        let c = r.clustered.unwrap();
        assert!(c.ft.se > 2.0 * r.ft.se, "{} vs {}", c.ft.se, r.ft.se);
        assert_eq!(c.clusters, 4);
        // Rows that mix named and unnamed items are refused.
        let mut mixed = table.clone();
        mixed.push(CellCount::new("m", "trivia", "unmodified", "original", false, 3, 10));
        assert!(matches!(m1(&t(&mixed)), Err(ModelError::Fit { error: GlmError::Cluster(_), .. })));
    }

    #[test]
    fn m2_pools_detailed_types_into_groups() {
        let (table, _) = context_table();
        let r = m2(&t(&table)).unwrap();
        let emotion = r.effects.iter().find(|e| e.context == "emotion").unwrap();
        // Pooled emotion cells: base 60/200, warm 90/200; still saturated at the group level.
        assert_close(emotion.log_odds.estimate, logit(90.0, 200.0) - logit(60.0, 200.0), 1e-10);
        assert_close(emotion.log_odds.se, saturated_se(60.0, 90.0, 200.0), 1e-10);
        assert_close(emotion.ame, 0.15, 1e-10);
        assert_eq!(emotion.n, 400);
        let unmodified = r.effects.iter().find(|e| e.context == "unmodified").unwrap();
        assert_close(unmodified.log_odds.estimate, r.fit.coef("ft").unwrap().estimate, 0.0);
    }

    #[test]
    fn m4_contrasts_user_belief_with_original_prompts() {
        let mut table = Vec::new();
        // original + original_neutral pool to 30/100 vs 45/100; correct + incorrect to 40 vs 65.
        for (pt, base, warm) in
            [("original", 20, 25), ("original_neutral", 10, 20), ("correct", 15, 30), ("incorrect", 25, 35)]
        {
            table.push(CellCount::new("m", "disinfo", "unmodified", pt, false, base, 50));
            table.push(CellCount::new("m", "disinfo", "unmodified", pt, true, warm, 50));
        }
        let r = m4(&t(&table)).unwrap();
        let belief = r.effects.iter().find(|e| e.context == "user_opinion").unwrap();
        // ORACLES.md §3 interaction oracle: 1.024504, SE 0.292614 (closed forms).
        assert_close(belief.log_odds.estimate, ((65.0 / 35.0) / (40.0 / 60.0f64)).ln(), 1e-10);
        assert_close(belief.log_odds.se, (1.0 / 65.0 + 1.0 / 35.0 + 1.0 / 40.0 + 1.0 / 60.0f64).sqrt(), 1e-10);
        assert_close(belief.ame, 0.25, 1e-10);
        let original = r.effects.iter().find(|e| e.context == "original").unwrap();
        assert_close(original.log_odds.estimate, 0.646627, 1e-6);
        assert_close(original.ame, 0.15, 1e-10);
    }

    #[test]
    fn missing_data_is_an_error() {
        let only_belief = [CellCount::new("m", "trivia", "unmodified", "incorrect", true, 5, 10)];
        assert_eq!(m1(&t(&only_belief)), Err(ModelError::NoData { model: "M1" }));
        let no_reference = [
            CellCount::new("m", "trivia", "emotion:sad", "original", true, 5, 10),
            CellCount::new("m", "trivia", "emotion:sad", "original", false, 4, 10),
        ];
        assert_eq!(m2(&t(&no_reference)), Err(ModelError::MissingReference { model: "M2", reference: "unmodified" }));
        let bad = [CellCount::new("m", "trivia", "unmodified", "original", true, 11, 10)];
        assert_eq!(m1(&t(&bad)), Err(ModelError::InvalidCell { row: 0 }));
        // Counts are coded in 32 bits: a larger one is refused, naming its row.
        let huge = [
            CellCount::new("m", "trivia", "unmodified", "original", true, 1, 10),
            CellCount::new("m", "trivia", "unmodified", "original", false, 1, u64::from(u32::MAX) + 1),
        ];
        assert!(matches!(CellTable::from_cells(&huge), Err(ModelError::TooLarge { row: 1 })));
        let separated = [
            CellCount::new("m", "trivia", "unmodified", "original", true, 0, 10),
            CellCount::new("m", "trivia", "unmodified", "original", false, 4, 10),
        ];
        assert!(matches!(m1(&t(&separated)), Err(ModelError::Fit { error: GlmError::Separation, .. })));
    }
}
