//! The statistics engine: a [`PairedView`] kept up to date by observation batches, registered
//! with DataFusion as tables, and the per-family results maintained family by family.
//!
//! Tables of [`StatsEngine::context`]:
//!
//! | table | rows |
//! |---|---|
//! | `observations` | every observation batch applied with a positive diff (when kept) |
//! | `paired_counts` | one per family category (see [`crate::sql::view::paired_counts_schema`]) |
//! | `cells` | answer counts per model × checkpoint × dataset × amendment × prompt type |
//! | `family_results` | the rows of `queries/family_stats.sql` for every family |
//! | `coefficients`, `effects` | the regressions M1–M4: coefficients, per-context effects and AMEs |
//!
//! [`StatsEngine::refresh`] recomputes what changed since the last refresh: `family_stats.sql`
//! runs over the dirty families' paired counts only, and their stored rows are replaced. The
//! regressions M1–M4 are refitted when a statement reads them ([`StatsEngine::query`] on a
//! statement naming `coefficients` or `effects`, or [`StatsEngine::refit`]): their clustered
//! SEs need every item's answers, seconds of work with millions held, which a new checkpoint
//! should not wait for when nobody reads them. Until refitted, the two tables refuse to be
//! read (an error, never the previous fit's rows).
//!
//! ```
//! use candor::records::Observation;
//! use candor::schema::Record;
//! use candor::sql::engine::StatsEngine;
//! let obs = |ckpt: &str, ft: bool, item: &str, correct: bool| Observation {
//!     response_key: format!("{ckpt}/{item}"), model: "m".into(), checkpoint: ckpt.into(),
//!     checkpoint_epoch: ft as u64, is_finetuned: ft, dataset: "trivia".into(), item_key: item.into(),
//!     amendment_type: "unmodified".into(), amendment_group: "unmodified".into(),
//!     prompt_type: "original".into(), sample_index: 0, refusal: false,
//!     verdict: String::new(), correct: Some(correct),
//! };
//! let mut engine = StatsEngine::new().unwrap();
//! let rows: Vec<_> = (0..15).flat_map(|i| {
//!     let item = format!("q{i}");
//!     [obs("base", false, &item, true), obs("warm", true, &item, i < 3)]
//! }).collect();
//! engine.apply(&Observation::to_batch(&rows).unwrap(), 1).unwrap();
//! let refreshed = engine.refresh().unwrap();
//! assert_eq!(refreshed.families, 1);
//! let table = engine.query(candor::sql::queries::FAMILY_TABLE.sql).unwrap();
//! assert_eq!(table[0].num_rows(), 1); // one category: unmodified, b = 12, c = 0
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray, Float64Array, RecordBatch, StringArray, UInt64Array};
use arrow::compute::{concat_batches, take_record_batch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::datasource::MemTable;
use datafusion::prelude::{SessionConfig, SessionContext};

use super::queries::FAMILY_STATS;
use super::view::{FamilyKey, PairedView, cells_schema, paired_counts_schema};
use crate::error::{Error, Result};
use crate::stats::glm::Estimate;
use crate::stats::models::{self, CellTable, ContextModel};
use crate::stats::power::family_minimum_detectable_difference;

fn df_err(context: &str, e: impl std::fmt::Display) -> Error {
    Error::Internal(format!("{context}: {e}"))
}

/// What one refresh recomputed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Refresh {
    /// Families whose rows were recomputed.
    pub families: usize,
    /// Whether the regressions were refitted.
    pub regressions: bool,
    /// Regressions that could not be fitted, with the reason.
    pub regression_errors: Vec<String>,
}

/// The engine: maintained counts, DataFusion session and stored results.
pub struct StatsEngine {
    view: PairedView,
    ctx: SessionContext,
    /// Where `family_stats.sql` runs over the changed families' counts alone (made once: a
    /// session with the functions registered costs more than the query).
    scratch: SessionContext,
    keep_observations: bool,
    observations: Vec<RecordBatch>,
    family_results: BTreeMap<FamilyKey, RecordBatch>,
    family_schema: Option<SchemaRef>,
    /// Cells changed by updates whose families were refreshed alone ([`Self::refresh_families`]).
    cells_changed: bool,
    coefficients: RecordBatch,
    effects: RecordBatch,
    /// Whether observations changed since the regressions were fitted (the `coefficients` and
    /// `effects` tables refuse to be read until [`Self::refit`]).
    regressions_stale: bool,
    /// The last fit's regressions that could not be fitted, with the reason.
    regression_errors: Vec<String>,
}

impl StatsEngine {
    /// An empty engine that does not keep raw observations (the counts are all it needs).
    pub fn new() -> Result<Self> {
        Self::with_options(false, 8192)
    }

    /// `keep_observations` registers the raw rows as the `observations` table (for ad-hoc
    /// queries and `paired_counts.sql`); `batch_size` is DataFusion's execution batch size.
    pub fn with_options(keep_observations: bool, batch_size: usize) -> Result<Self> {
        let config = SessionConfig::new().with_batch_size(batch_size).with_target_partitions(2);
        let ctx = SessionContext::new_with_config(config);
        super::udf::register(&ctx);
        let scratch = SessionContext::new_with_config(ctx.copied_config());
        super::udf::register(&scratch);
        let mut engine = StatsEngine {
            view: PairedView::default(),
            ctx,
            scratch,
            keep_observations,
            observations: Vec::new(),
            family_results: BTreeMap::new(),
            family_schema: None,
            cells_changed: false,
            coefficients: RecordBatch::new_empty(coefficients_schema()),
            effects: RecordBatch::new_empty(effects_schema()),
            regressions_stale: false,
            regression_errors: Vec::new(),
        };
        engine.register_all()?;
        Ok(engine)
    }

    /// Applies an observation batch with multiplicity `diff` (−1 retracts it).
    pub fn apply(&mut self, batch: &RecordBatch, diff: i64) -> Result<()> {
        let added = self.add(batch, diff);
        self.view.settle()?;
        added
    }

    /// [`Self::apply`] for loading many batches: batches are counted, a few together, on the
    /// counting thread while the next are read (see [`PairedView::feed`]), and every reader of
    /// the engine's results ([`Self::refresh`] and the rest) settles them first.
    pub fn feed(&mut self, batch: &RecordBatch) -> Result<()> {
        self.add(batch, 1)
    }

    fn add(&mut self, batch: &RecordBatch, diff: i64) -> Result<()> {
        self.view.feed(batch, diff)?;
        // The `observations` table has the schema's exact columns (a file's batches may bring
        // their categorical columns as dictionaries).
        let plain;
        let batch = if self.keep_observations {
            plain = super::input::plain(batch)?;
            &plain
        } else {
            batch
        };
        if self.keep_observations && diff > 0 {
            for _ in 0..diff {
                self.observations.push(batch.clone());
            }
        } else if self.keep_observations && diff < 0 {
            for _ in 0..-diff {
                let at = self
                    .observations
                    .iter()
                    .position(|b| b == batch)
                    .ok_or_else(|| Error::Internal("retracting observations that were never applied".into()))?;
                self.observations.remove(at);
            }
        }
        Ok(())
    }

    /// Inserts or replaces observations (a re-judged answer replaces its previous verdict).
    pub fn upsert(&mut self, batch: &RecordBatch) -> Result<()> {
        if self.keep_observations {
            return Err(Error::Internal("upsert is not supported while raw observations are kept".into()));
        }
        self.view.settle()?;
        self.view.upsert(batch)
    }

    /// The maintained counts, as of the last [`Self::refresh`] or [`Self::apply`].
    pub fn view(&self) -> &PairedView {
        &self.view
    }

    /// Recomputes the families an update changed (untouched families keep their stored rows)
    /// and the tables; the regressions wait until read ([`Self::refit`]).
    pub fn refresh(&mut self) -> Result<Refresh> {
        let start = std::time::Instant::now();
        self.view.settle()?;
        let settled = start.elapsed();
        let (dirty, cells_dirty) = self.view.take_dirty();
        let cells_dirty = cells_dirty || std::mem::take(&mut self.cells_changed);
        let report = Refresh { families: dirty.len(), ..Refresh::default() };
        if !dirty.is_empty() {
            self.recompute_families(&dirty)?;
        }
        let families = start.elapsed();
        if cells_dirty || !dirty.is_empty() {
            self.register_counts()?;
        }
        if crate::trace::stats() {
            let tables = start.elapsed() - families;
            eprintln!(
                "  refresh: counts settled in {settled:?}, {} families in {:?}, tables in {tables:?}",
                dirty.len(),
                families - settled
            );
        }
        if cells_dirty && !self.regressions_stale {
            self.regressions_stale = true;
            for (name, schema) in [("coefficients", coefficients_schema()), ("effects", effects_schema())] {
                self.ctx.deregister_table(name).map_err(|e| df_err(&format!("table `{name}`"), e))?;
                self.ctx
                    .register_table(name, Arc::new(Unfitted { name, schema }))
                    .map_err(|e| df_err(&format!("table `{name}`"), e))?;
            }
        }
        Ok(report)
    }

    /// Refits the regressions M1–M4 if observations changed since they were fitted (after a
    /// [`Self::refresh`]); returns the regressions that could not be fitted, with the reason.
    pub fn refit(&mut self) -> Result<Vec<String>> {
        if self.regressions_stale {
            self.refit_regressions()?;
            self.regressions_stale = false;
        }
        Ok(self.regression_errors.clone())
    }

    /// [`Self::refresh`] then [`Self::refit`], as a whole analysis wants them, in less time:
    /// the regressions' item table is built from the observations held while the counting
    /// thread finishes the batches fed last, and M1–M4 are fitted on another core while the
    /// families are recomputed. The results are those of the two calls one after the other
    /// (the item table reads the observations held, which feeding has brought up to date
    /// already; only the counts lag). Returns what was recomputed, the regressions' errors
    /// included.
    pub fn refresh_and_refit(&mut self) -> Result<Refresh> {
        // Whether the refresh can find the regressions stale; when it cannot, nothing is built.
        let may_change =
            self.regressions_stale || self.cells_changed || !self.view.settled() || self.view.cells_dirty();
        let start = std::time::Instant::now();
        let table = may_change.then(|| self.view.regression_items());
        let items = start.elapsed();
        let (refreshed, fitted) = std::thread::scope(|s| {
            let fit = table.as_ref().map(|t| {
                std::thread::Builder::new()
                    .name("candor-fit".into())
                    .spawn_scoped(s, move || fit_regressions(t))
                    .map_err(|e| Error::Internal(format!("starting the regressions' thread: {e}")))
            });
            let refreshed = self.refresh();
            let fitted = fit.map(|h| h?.join().map_err(|_| Error::Internal("fitting M1–M4 panicked".into()))?);
            (refreshed, fitted)
        });
        let mut refresh = refreshed?;
        if self.regressions_stale {
            match fitted {
                Some(fitted) => self.install_regressions(fitted?)?,
                // Not reached (a refresh that finds them stale had changes to take in), but
                // the plain way is always right.
                None => {
                    self.refit_regressions()?;
                }
            }
            self.regressions_stale = false;
            refresh.regressions = true;
        }
        if crate::trace::stats()
            && let Some(t) = &table
        {
            eprintln!("  refit: {} item rows in {items:?} before the refresh, M1–M4 beside it", t.len());
        }
        refresh.regression_errors = self.regression_errors.clone();
        Ok(refresh)
    }

    /// Whether the regressions wait for a [`Self::refit`].
    pub fn regressions_stale(&self) -> bool {
        self.regressions_stale
    }

    /// Recomputes the `family_stats.sql` rows of the families an update changed, and nothing
    /// else (the tables and regressions wait for the next [`Self::refresh`]); returns those
    /// families, sorted by name. What the stream's per-family messages are made of.
    pub fn refresh_families(&mut self) -> Result<Vec<FamilyKey>> {
        self.view.settle()?;
        let (dirty, cells_dirty) = self.view.take_dirty();
        self.cells_changed |= cells_dirty;
        if !dirty.is_empty() {
            self.recompute_families(&dirty)?;
        }
        let mut keys: Vec<FamilyKey> = dirty.into_iter().collect();
        keys.sort_by(|a, b| self.view.family_names(a).cmp(&self.view.family_names(b)));
        Ok(keys)
    }

    /// A family's `family_stats.sql` rows, one per category (None: the family has no pairs).
    pub fn family_rows(&self, family: &FamilyKey) -> Option<&RecordBatch> {
        self.family_results.get(family)
    }

    /// Recomputes every family from the maintained counts.
    pub fn refresh_all(&mut self) -> Result<Refresh> {
        self.view.settle()?;
        self.view.mark_all_dirty();
        self.refresh()
    }

    fn recompute_families(&mut self, dirty: &BTreeSet<FamilyKey>) -> Result<()> {
        self.prepare_detectable_differences(dirty);
        let subset = self.view.paired_counts_batch(Some(dirty))?;
        register(&self.scratch, "paired_counts", paired_counts_schema(), vec![subset])?;
        let batches = self.run(&self.scratch, FAMILY_STATS.sql)?;
        for key in dirty {
            self.family_results.remove(key);
        }
        let Some(first) = batches.first() else { return Ok(()) };
        let schema = first.schema();
        self.family_schema = Some(schema.clone());
        let all = concat_batches(&schema, &batches).map_err(|e| Error::arrow("family_stats", e))?;
        let mut rows: BTreeMap<FamilyKey, Vec<u64>> = BTreeMap::new();
        let col = |n: &str| all.column_by_name(n).expect("family_stats.sql selects it").as_string::<i32>().clone();
        let (model, base, ckpt, dataset, test) =
            (col("model"), col("base_checkpoint"), col("checkpoint"), col("dataset"), col("test_type"));
        for i in 0..all.num_rows() {
            let key = self
                .view
                .family_key(model.value(i), base.value(i), ckpt.value(i), dataset.value(i), test.value(i))
                .ok_or_else(|| Error::Internal("family_stats.sql returned an unknown family".into()))?;
            rows.entry(key).or_default().push(i as u64);
        }
        for (key, idx) in rows {
            let batch =
                take_record_batch(&all, &UInt64Array::from(idx)).map_err(|e| Error::arrow("family_stats", e))?;
            self.family_results.insert(key, batch);
        }
        Ok(())
    }

    /// Each family's minimum detectable difference is a search of a millisecond or more, the
    /// slowest part of `family_stats.sql`, whose window function finds them one family after
    /// another. With many families to recompute, they are worked out beforehand on every core;
    /// the query then finds them in the search's memo. Only a matter of time: a family this
    /// misses is searched by the query itself.
    fn prepare_detectable_differences(&self, dirty: &BTreeSet<FamilyKey>) {
        const AT_LEAST: usize = 16;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        if dirty.len() < AT_LEAST || threads < 2 {
            return;
        }
        // As the query hands them over: per category, pairs and discordant pairs.
        let families: Vec<Vec<(u64, u64)>> = dirty
            .iter()
            .map(|f| {
                let counts = self.view.family_categories(f).into_iter().map(|(_, c)| c);
                counts.map(|c| ((c.both_correct + c.b + c.c + c.both_wrong) as u64, (c.b + c.c) as u64)).collect()
            })
            .collect();
        let share = families.len().div_ceil(threads);
        std::thread::scope(|s| {
            for part in families.chunks(share) {
                s.spawn(move || {
                    for c in part {
                        let _ = family_minimum_detectable_difference(c);
                    }
                });
            }
        });
    }

    fn refit_regressions(&mut self) -> Result<Vec<String>> {
        // Item by item, so that the clustered SEs can see which answers share an item.
        let start = std::time::Instant::now();
        let table = self.view.regression_items();
        let items = start.elapsed();
        let fitted = fit_regressions(&table)?;
        if crate::trace::stats() {
            eprintln!("  refit: {} item rows in {items:?}, M1–M4 in {:?}", table.len(), start.elapsed() - items);
        }
        self.install_regressions(fitted)?;
        Ok(self.regression_errors.clone())
    }

    /// Makes a fit's coefficients and effects the tables SQL reads.
    fn install_regressions(&mut self, fitted: (RecordBatch, RecordBatch, Vec<String>)) -> Result<()> {
        let (coefficients, effects, errors) = fitted;
        self.coefficients = coefficients;
        self.effects = effects;
        self.regression_errors = errors;
        register(&self.ctx, "coefficients", coefficients_schema(), vec![self.coefficients.clone()])?;
        register(&self.ctx, "effects", effects_schema(), vec![self.effects.clone()])
    }

    fn register_all(&mut self) -> Result<()> {
        self.register_counts()?;
        register(&self.ctx, "coefficients", coefficients_schema(), vec![self.coefficients.clone()])?;
        register(&self.ctx, "effects", effects_schema(), vec![self.effects.clone()])?;
        Ok(())
    }

    fn register_counts(&mut self) -> Result<()> {
        register(&self.ctx, "paired_counts", paired_counts_schema(), vec![self.view.paired_counts_batch(None)?])?;
        register(&self.ctx, "cells", cells_schema(), vec![self.view.cells_batch()?])?;
        let schema = match &self.family_schema {
            Some(s) => s.clone(),
            None => self.empty_family_schema()?,
        };
        register(&self.ctx, "family_results", schema, self.family_results.values().cloned().collect())?;
        let obs_schema = crate::schema::arrow_schema("observation")?;
        register(&self.ctx, "observations", obs_schema, self.observations.clone())?;
        Ok(())
    }

    /// The output schema of `family_stats.sql`, from planning it over an empty table.
    fn empty_family_schema(&mut self) -> Result<SchemaRef> {
        let scratch = SessionContext::new();
        super::udf::register(&scratch);
        register(&scratch, "paired_counts", paired_counts_schema(), vec![])?;
        let df = crate::runtime::block_on(scratch.sql(FAMILY_STATS.sql))
            .map_err(|e| df_err("planning family_stats.sql", e))?;
        let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        self.family_schema = Some(schema.clone());
        Ok(schema)
    }

    /// Runs SQL against the engine's tables (refitting the regressions first when the
    /// statement reads them, see [`reads_regressions`]).
    pub fn query(&mut self, sql: &str) -> Result<Vec<RecordBatch>> {
        if reads_regressions(sql) {
            self.refit()?;
        }
        self.run(&self.ctx, sql)
    }

    fn run(&self, ctx: &SessionContext, sql: &str) -> Result<Vec<RecordBatch>> {
        crate::runtime::block_on(async {
            let df = ctx.sql(sql).await.map_err(|e| df_err("planning a query", e))?;
            df.collect().await.map_err(|e| df_err("running a query", e))
        })
    }

    /// Registers (or replaces) an extra table beside the maintained ones, e.g. an archive's
    /// `responses` for `discordant_pairs.sql`; the batches take `schema` (segments written by
    /// older versions may differ in field metadata or nullability only).
    pub fn register(&self, name: &str, schema: SchemaRef, batches: Vec<RecordBatch>) -> Result<()> {
        let batches = batches
            .into_iter()
            .map(|b| RecordBatch::try_new(schema.clone(), b.columns().to_vec()))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::arrow(format!("table {name}"), e))?;
        register(&self.ctx, name, schema, batches)
    }

    /// The DataFusion session with every table registered, for ad-hoc SQL.
    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// Blocks on a future on the process's runtime (DataFusion is async; see
    /// [`crate::runtime::block_on`]).
    pub fn block_on<F>(&self, f: F) -> F::Output
    where
        F: std::future::Future + Send,
        F::Output: Send,
    {
        crate::runtime::block_on(f)
    }

    /// The regressions' coefficients, refitted first if observations changed.
    pub fn coefficients(&mut self) -> Result<&RecordBatch> {
        self.refit()?;
        Ok(&self.coefficients)
    }

    /// The regressions' effects, refitted first if observations changed.
    pub fn effects(&mut self) -> Result<&RecordBatch> {
        self.refit()?;
        Ok(&self.effects)
    }
}

/// Whether a statement names the regression tables (`coefficients`, `effects`), as a word of
/// its text in any case: a conservative test (a string literal naming them counts too), so a
/// statement that reads them never finds them unfitted. No view of `queries/` reads them.
pub fn reads_regressions(sql: &str) -> bool {
    sql.split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .any(|w| w.eq_ignore_ascii_case("coefficients") || w.eq_ignore_ascii_case("effects"))
}

/// A regression table while observations changed since the last fit: reading it is an error
/// (the engine refits before statements that name it; a path that did not is a bug to see,
/// not the previous fit's rows to show).
#[derive(Debug)]
struct Unfitted {
    name: &'static str,
    schema: SchemaRef,
}

#[async_trait::async_trait]
impl datafusion::catalog::TableProvider for Unfitted {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> datafusion::logical_expr::TableType {
        datafusion::logical_expr::TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn datafusion::catalog::Session,
        _projection: Option<&Vec<usize>>,
        _filters: &[datafusion::logical_expr::Expr],
        _limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
        Err(datafusion::error::DataFusionError::Execution(format!(
            "`{}` is not refitted since observations changed: the regressions are refitted for \
             statements that name `coefficients` or `effects`",
            self.name
        )))
    }
}

fn register(ctx: &SessionContext, name: &str, schema: SchemaRef, batches: Vec<RecordBatch>) -> Result<()> {
    let table = MemTable::try_new(schema, vec![batches]).map_err(|e| df_err(&format!("table `{name}`"), e))?;
    ctx.deregister_table(name).map_err(|e| df_err(&format!("table `{name}`"), e))?;
    ctx.register_table(name, Arc::new(table)).map_err(|e| df_err(&format!("table `{name}`"), e))?;
    Ok(())
}

/// Columns of the `coefficients` table: every coefficient of M1–M4 on the log-odds scale, with
/// the paper's model-based SE, z and p, and the item-clustered (sandwich) SE and p beside them
/// (NULL when fewer than two items).
pub fn coefficients_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("model_spec", DataType::Utf8, false),
        Field::new("term", DataType::Utf8, false),
        Field::new("estimate", DataType::Float64, false),
        Field::new("se", DataType::Float64, false),
        Field::new("z", DataType::Float64, false),
        Field::new("p", DataType::Float64, false),
        Field::new("se_cluster", DataType::Float64, true),
        Field::new("p_cluster", DataType::Float64, true),
    ]))
}

/// Columns of the `effects` table: the effect of fine-tuning per model and context, on the
/// log-odds scale (β_ft + β_ft:context, SE from the covariance) and as the counterfactual
/// average marginal effect in percentage points with its delta-method SE, each SE model-based
/// (the paper's) and item-clustered. M1 has the single context `all`.
pub fn effects_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("model_spec", DataType::Utf8, false),
        Field::new("context", DataType::Utf8, false),
        Field::new("log_odds", DataType::Float64, false),
        Field::new("se", DataType::Float64, false),
        Field::new("z", DataType::Float64, false),
        Field::new("p", DataType::Float64, false),
        Field::new("se_cluster", DataType::Float64, true),
        Field::new("p_cluster", DataType::Float64, true),
        Field::new("ame_pp", DataType::Float64, false),
        Field::new("ame_se_pp", DataType::Float64, false),
        Field::new("ame_se_cluster_pp", DataType::Float64, true),
        Field::new("n", DataType::UInt64, false),
    ]))
}

/// One row of the `effects` table.
struct EffectRow {
    spec: &'static str,
    context: String,
    log_odds: Estimate,
    cluster: Option<Estimate>,
    ame: f64,
    ame_se: f64,
    ame_se_cluster: Option<f64>,
    n: u64,
}

/// Fits M1–M4 on a cell table (item-clustered SEs too when its rows name their items); a model
/// that cannot be fitted is reported, not fatal.
pub fn fit_regressions(table: &CellTable) -> Result<(RecordBatch, RecordBatch, Vec<String>)> {
    // (spec, term, model-based estimate, clustered estimate)
    let mut coef: Vec<(&str, String, Estimate, Option<Estimate>)> = Vec::new();
    let mut eff: Vec<EffectRow> = Vec::new();
    let mut errors = Vec::new();
    let mut coefficients_of =
        |spec: &'static str, fit: &crate::stats::glm::GlmFit, robust: Option<&crate::stats::glm::GlmFit>| {
            let robust = robust.map(|r| r.summary());
            for (i, (term, e)) in fit.summary().into_iter().enumerate() {
                coef.push((spec, term, e, robust.as_ref().map(|r| r[i].1)));
            }
        };
    match models::m1(table) {
        Ok(m) => {
            coefficients_of("M1", &m.fit, m.clustered.as_ref().map(|c| &c.fit));
            eff.push(EffectRow {
                spec: "M1",
                context: "all".into(),
                log_odds: m.ft,
                cluster: m.clustered.as_ref().map(|c| c.ft),
                ame: m.ame,
                ame_se: m.ame_se,
                ame_se_cluster: m.clustered.as_ref().map(|c| c.ame_se),
                n: m.fit.nobs as u64,
            });
        }
        Err(e) => errors.push(e.to_string()),
    }
    type Fit = fn(&CellTable) -> std::result::Result<ContextModel, models::ModelError>;
    let specs: [(&'static str, Fit); 3] = [("M2", models::m2), ("M3", models::m3), ("M4", models::m4)];
    for (name, f) in specs {
        match f(table) {
            Ok(m) => {
                coefficients_of(name, &m.fit, m.clustered.as_ref().map(|c| &c.0));
                eff.extend(m.effects.into_iter().map(|e| EffectRow {
                    spec: name,
                    context: e.context,
                    log_odds: e.log_odds,
                    cluster: e.clustered.map(|c| c.0),
                    ame: e.ame,
                    ame_se: e.ame_se,
                    ame_se_cluster: e.clustered.map(|c| c.1),
                    n: e.n,
                }));
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    let f64s = |v: Vec<f64>| Arc::new(Float64Array::from(v)) as ArrayRef;
    let opt = |v: Vec<Option<f64>>| Arc::new(Float64Array::from(v)) as ArrayRef;
    let strs = |v: Vec<&str>| Arc::new(StringArray::from(v)) as ArrayRef;
    let coefficients = RecordBatch::try_new(
        coefficients_schema(),
        vec![
            strs(coef.iter().map(|c| c.0).collect()),
            strs(coef.iter().map(|c| c.1.as_str()).collect()),
            f64s(coef.iter().map(|c| c.2.estimate).collect()),
            f64s(coef.iter().map(|c| c.2.se).collect()),
            f64s(coef.iter().map(|c| c.2.z).collect()),
            f64s(coef.iter().map(|c| c.2.pvalue).collect()),
            opt(coef.iter().map(|c| c.3.map(|e| e.se)).collect()),
            opt(coef.iter().map(|c| c.3.map(|e| e.pvalue)).collect()),
        ],
    )
    .map_err(|e| Error::arrow("coefficients", e))?;
    let effects = RecordBatch::try_new(
        effects_schema(),
        vec![
            strs(eff.iter().map(|e| e.spec).collect()),
            strs(eff.iter().map(|e| e.context.as_str()).collect()),
            f64s(eff.iter().map(|e| e.log_odds.estimate).collect()),
            f64s(eff.iter().map(|e| e.log_odds.se).collect()),
            f64s(eff.iter().map(|e| e.log_odds.z).collect()),
            f64s(eff.iter().map(|e| e.log_odds.pvalue).collect()),
            opt(eff.iter().map(|e| e.cluster.map(|c| c.se)).collect()),
            opt(eff.iter().map(|e| e.cluster.map(|c| c.pvalue)).collect()),
            f64s(eff.iter().map(|e| 100.0 * e.ame).collect()),
            f64s(eff.iter().map(|e| 100.0 * e.ame_se).collect()),
            opt(eff.iter().map(|e| e.ame_se_cluster.map(|s| 100.0 * s)).collect()),
            Arc::new(UInt64Array::from(eff.iter().map(|e| e.n).collect::<Vec<_>>())) as ArrayRef,
        ],
    )
    .map_err(|e| Error::arrow("effects", e))?;
    Ok((coefficients, effects, errors))
}
