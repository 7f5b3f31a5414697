//! The paper's statistics as DataFusion functions, thin adapters over [`crate::stats`].
//!
//! | SQL | kind | meaning |
//! |---|---|---|
//! | `mcnemar_exact(b, c)` | scalar | exact two-sided McNemar p; NULL when b + c = 0 |
//! | `mcnemar_midp(b, c)` | scalar | mid-p McNemar value; NULL when b + c = 0 |
//! | `wilson_low(k, n)`, `wilson_high(k, n)` | scalar | Wilson 95% interval of k/n; NULL when n = 0 |
//! | `newcombe_low(both_correct, b, c, both_wrong)`, `newcombe_high(…)` | scalar | Newcombe's paired 95% interval of (c − b)/n |
//! | `mcnemar_mdd(n, b + c) OVER (PARTITION BY family)` | window | the family's minimum detectable difference at 80% power (a proportion); NULL when none is detectable |
//! | `cohens_kappa(both, first_only, second_only, neither)` | scalar | Cohen's kappa of two judges' correct/incorrect labels from their 2×2 table; NULL when undefined |
//! | `test_type(prompt_type)` | scalar | the McNemar test a condition's pairs count toward (`Normal`, `Sycophancy`, `Neutral`), NULL for none: the one rule of [`TestType::of`] |
//! | `paper_g(b, c)` | scalar | \|b − c\|/√(b + c), the paper's "Cohen's g" |
//! | `cohens_g(b, c)` | scalar | textbook Cohen's g, \|b/(b + c) − ½\| |
//! | `odds_ratio(b, c)` | scalar | b/c (∞ when c = 0 < b) |
//! | `bh_adjust(p) OVER (PARTITION BY family)` | window | Benjamini–Hochberg adjusted p |
//! | `bh_reject(p, alpha) OVER (PARTITION BY family)` | window | BH rejection at `alpha` |
//! | `paired_counts(base_correct, ft_correct)` | aggregate | struct {both_correct, b, c, both_wrong}, with merge and retract |
//!
//! NULL inputs to `paired_counts` (an excluded answer) are skipped.
//!
//! ```
//! # candor::runtime::block_on(async {
//! let ctx = datafusion::prelude::SessionContext::new();
//! candor::sql::udf::register(&ctx);
//! let out = ctx.sql("SELECT mcnemar_exact(12, 3) AS p").await.unwrap().collect().await.unwrap();
//! let p = out[0].column(0).as_any().downcast_ref::<arrow::array::Float64Array>().unwrap().value(0);
//! assert_eq!(p, 0.03515625);
//! # });
//! ```

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Float64Array, Int64Array, StructArray};
use arrow::datatypes::{DataType, Field, FieldRef, Fields, Int64Type};
use datafusion::common::{Result as DfResult, ScalarValue, exec_err};
use datafusion::logical_expr::function::{
    AccumulatorArgs, PartitionEvaluatorArgs, StateFieldsArgs, WindowUDFFieldArgs,
};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, ColumnarValue, PartitionEvaluator, ScalarFunctionArgs, ScalarUDF,
    ScalarUDFImpl, Signature, Volatility, WindowUDF, WindowUDFImpl,
};
use datafusion::prelude::SessionContext;

use super::view::TestType;
use crate::score::agreement::kappa_2x2;
use crate::stats::bh::benjamini_hochberg;
use crate::stats::effect::{cohens_g, odds_ratio, paper_g};
use crate::stats::interval::{Z_95, wilson};
use crate::stats::mcnemar::{mcnemar_exact, mcnemar_midp};
use crate::stats::paired::{PairedCounts, newcombe_paired};
use crate::stats::power::family_minimum_detectable_difference;

/// Registers every function of this module with `ctx`.
pub fn register(ctx: &SessionContext) {
    for (name, f) in [
        ("mcnemar_exact", mcnemar_exact as fn(u64, u64) -> Option<f64>),
        ("mcnemar_midp", mcnemar_midp),
        ("wilson_low", |k, n| wilson(k, n, Z_95).map(|ci| ci.0)),
        ("wilson_high", |k, n| wilson(k, n, Z_95).map(|ci| ci.1)),
        ("paper_g", |b, c| Some(paper_g(b, c))),
        ("cohens_g", |b, c| Some(cohens_g(b, c))),
        ("odds_ratio", |b, c| Some(odds_ratio(b, c))),
    ] {
        ctx.register_udf(ScalarUDF::from(CountsFn::new(name, f)));
    }
    for (name, f) in [
        (
            "newcombe_low",
            (|k: [u64; 4]| newcombe_paired(&counts_of(k), Z_95).map(|ci| ci.0)) as fn([u64; 4]) -> Option<f64>,
        ),
        ("newcombe_high", |k| newcombe_paired(&counts_of(k), Z_95).map(|ci| ci.1)),
        ("cohens_kappa", |k| kappa_2x2(k[0], k[1], k[2], k[3])),
    ] {
        ctx.register_udf(ScalarUDF::from(TableFn::new(name, f)));
    }
    ctx.register_udf(ScalarUDF::from(TestTypeFn::new()));
    ctx.register_udwf(WindowUDF::from(MddWindow::new()));
    ctx.register_udwf(WindowUDF::from(BhWindow::new("bh_adjust")));
    ctx.register_udwf(WindowUDF::from(BhWindow::new("bh_reject")));
    ctx.register_udaf(AggregateUDF::from(PairedCountsAgg::new()));
}

/// A scalar function of the discordant counts (b, c). Identified by its name (function
/// pointers do not compare meaningfully).
#[derive(Debug)]
struct CountsFn {
    name: &'static str,
    f: fn(u64, u64) -> Option<f64>,
    signature: Signature,
}

impl CountsFn {
    fn new(name: &'static str, f: fn(u64, u64) -> Option<f64>) -> Self {
        // Exact Int64: other integer types are coerced by the planner.
        CountsFn { name, f, signature: Signature::exact(vec![DataType::Int64, DataType::Int64], Volatility::Immutable) }
    }
}

impl PartialEq for CountsFn {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for CountsFn {}

impl std::hash::Hash for CountsFn {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.name.hash(state);
    }
}

impl ScalarUDFImpl for CountsFn {
    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Float64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let (b, c) = (arrays[0].as_primitive::<Int64Type>(), arrays[1].as_primitive::<Int64Type>());
        let mut out = Vec::with_capacity(b.len());
        for i in 0..b.len() {
            if b.is_null(i) || c.is_null(i) {
                out.push(None);
                continue;
            }
            let (bi, ci) = (b.value(i), c.value(i));
            if bi < 0 || ci < 0 {
                return exec_err!("{}: negative count (b = {bi}, c = {ci})", self.name);
            }
            out.push((self.f)(bi as u64, ci as u64));
        }
        let array: ArrayRef = Arc::new(Float64Array::from(out));
        if args.args.iter().all(|a| matches!(a, ColumnarValue::Scalar(_))) {
            return Ok(ColumnarValue::Scalar(ScalarValue::try_from_array(&array, 0)?));
        }
        Ok(ColumnarValue::Array(array))
    }
}

/// A paired table (both_correct, b, c, both_wrong) from a 2×2 table's four counts.
fn counts_of(k: [u64; 4]) -> PairedCounts {
    PairedCounts { both_correct: k[0] as i64, b: k[1] as i64, c: k[2] as i64, both_wrong: k[3] as i64 }
}

/// A scalar function of a whole 2×2 table, its four counts in row order.
#[derive(Debug)]
struct TableFn {
    name: &'static str,
    f: fn([u64; 4]) -> Option<f64>,
    signature: Signature,
}

impl TableFn {
    fn new(name: &'static str, f: fn([u64; 4]) -> Option<f64>) -> Self {
        TableFn { name, f, signature: Signature::exact(vec![DataType::Int64; 4], Volatility::Immutable) }
    }
}

impl PartialEq for TableFn {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for TableFn {}

impl std::hash::Hash for TableFn {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.name.hash(state);
    }
}

impl ScalarUDFImpl for TableFn {
    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Float64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let cols: Vec<&Int64Array> = arrays.iter().map(|a| a.as_primitive::<Int64Type>()).collect();
        let mut out = Vec::with_capacity(cols[0].len());
        for i in 0..cols[0].len() {
            if cols.iter().any(|c| c.is_null(i)) {
                out.push(None);
                continue;
            }
            let counts = [cols[0].value(i), cols[1].value(i), cols[2].value(i), cols[3].value(i)];
            if counts.iter().any(|&x| x < 0) {
                return exec_err!("{}: negative count in {counts:?}", self.name);
            }
            out.push((self.f)(counts.map(|x| x as u64)));
        }
        let array: ArrayRef = Arc::new(Float64Array::from(out));
        if args.args.iter().all(|a| matches!(a, ColumnarValue::Scalar(_))) {
            return Ok(ColumnarValue::Scalar(ScalarValue::try_from_array(&array, 0)?));
        }
        Ok(ColumnarValue::Array(array))
    }
}

/// `test_type(prompt_type)`: [`TestType::of`] in SQL, so that every query that
/// pairs answers uses the view's own rule.
#[derive(Debug, PartialEq, Eq, Hash)]
struct TestTypeFn {
    signature: Signature,
}

impl TestTypeFn {
    fn new() -> Self {
        TestTypeFn { signature: Signature::exact(vec![DataType::Utf8], Volatility::Immutable) }
    }
}

impl ScalarUDFImpl for TestTypeFn {
    fn name(&self) -> &str {
        "test_type"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let prompt = arrays[0].as_string::<i32>();
        let out: arrow::array::StringArray = (0..prompt.len())
            .map(|i| if prompt.is_null(i) { None } else { TestType::of(prompt.value(i)).map(TestType::as_str) })
            .collect();
        let array: ArrayRef = Arc::new(out);
        if args.args.iter().all(|a| matches!(a, ColumnarValue::Scalar(_))) {
            return Ok(ColumnarValue::Scalar(ScalarValue::try_from_array(&array, 0)?));
        }
        Ok(ColumnarValue::Array(array))
    }
}

/// `mcnemar_mdd(n, discordant) OVER (PARTITION BY family)`: every row of a family gets the
/// family's minimum detectable difference ([`family_minimum_detectable_difference`]).
#[derive(Debug, PartialEq, Eq, Hash)]
struct MddWindow {
    signature: Signature,
}

impl MddWindow {
    fn new() -> Self {
        MddWindow { signature: Signature::exact(vec![DataType::Int64, DataType::Int64], Volatility::Immutable) }
    }
}

impl WindowUDFImpl for MddWindow {
    fn name(&self) -> &str {
        "mcnemar_mdd"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn partition_evaluator(&self, _args: PartitionEvaluatorArgs) -> DfResult<Box<dyn PartitionEvaluator>> {
        Ok(Box::new(MddEvaluator))
    }

    fn field(&self, field_args: WindowUDFFieldArgs) -> DfResult<FieldRef> {
        Ok(Arc::new(Field::new(field_args.name(), DataType::Float64, true)))
    }
}

#[derive(Debug)]
struct MddEvaluator;

impl PartitionEvaluator for MddEvaluator {
    fn evaluate_all(&mut self, values: &[ArrayRef], num_rows: usize) -> DfResult<ArrayRef> {
        let (n, d) = (values[0].as_primitive::<Int64Type>(), values[1].as_primitive::<Int64Type>());
        let mut categories = Vec::with_capacity(num_rows);
        for i in 0..num_rows {
            if n.is_valid(i) && d.is_valid(i) {
                let (ni, di) = (n.value(i), d.value(i));
                if ni < 0 || di < 0 {
                    return exec_err!("mcnemar_mdd: negative count (n = {ni}, discordant = {di})");
                }
                categories.push((ni as u64, di as u64));
            }
        }
        let mdd = family_minimum_detectable_difference(&categories);
        Ok(Arc::new(Float64Array::from(vec![mdd; num_rows])))
    }
}

/// Benjamini–Hochberg over each window partition (a family). Missing p-values (NULL or NaN)
/// are outside the family, as in [`benjamini_hochberg`].
#[derive(Debug, PartialEq, Eq, Hash)]
struct BhWindow {
    name: &'static str,
    signature: Signature,
}

impl BhWindow {
    fn new(name: &'static str) -> Self {
        let signature = if name == "bh_reject" {
            Signature::exact(vec![DataType::Float64, DataType::Float64], Volatility::Immutable)
        } else {
            Signature::exact(vec![DataType::Float64], Volatility::Immutable)
        };
        BhWindow { name, signature }
    }
}

impl WindowUDFImpl for BhWindow {
    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn partition_evaluator(&self, _args: PartitionEvaluatorArgs) -> DfResult<Box<dyn PartitionEvaluator>> {
        Ok(Box::new(BhEvaluator { reject: self.name == "bh_reject" }))
    }

    fn field(&self, field_args: WindowUDFFieldArgs) -> DfResult<FieldRef> {
        let t = if self.name == "bh_reject" { DataType::Boolean } else { DataType::Float64 };
        Ok(Arc::new(Field::new(field_args.name(), t, true)))
    }
}

#[derive(Debug)]
struct BhEvaluator {
    reject: bool,
}

impl PartitionEvaluator for BhEvaluator {
    fn evaluate_all(&mut self, values: &[ArrayRef], num_rows: usize) -> DfResult<ArrayRef> {
        let p = values[0].as_primitive::<arrow::datatypes::Float64Type>();
        let pvalues: Vec<Option<f64>> = (0..num_rows).map(|i| p.is_valid(i).then(|| p.value(i))).collect();
        let alpha = if self.reject {
            let a = values[1].as_primitive::<arrow::datatypes::Float64Type>();
            let alpha = if num_rows > 0 && a.is_valid(0) { a.value(0) } else { crate::stats::paired::ALPHA };
            if (0..num_rows).any(|i| a.is_valid(i) && a.value(i) != alpha) {
                return exec_err!("bh_reject: alpha must be the same for the whole family");
            }
            alpha
        } else {
            crate::stats::paired::ALPHA
        };
        let adjusted = benjamini_hochberg(&pvalues, alpha);
        Ok(if self.reject {
            Arc::new(adjusted.iter().map(|a| a.map(|a| a.reject)).collect::<BooleanArray>())
        } else {
            Arc::new(adjusted.iter().map(|a| a.map(|a| a.p_adjusted)).collect::<Float64Array>())
        })
    }
}

/// `paired_counts(base_correct, ft_correct)`: the four pair counts as an aggregate. Its state is
/// the [`PairedCounts`] monoid, so partial states merge in any order and rows can be retracted
/// (sliding windows, a re-judged answer).
#[derive(Debug, PartialEq, Eq, Hash)]
struct PairedCountsAgg {
    signature: Signature,
}

impl PairedCountsAgg {
    fn new() -> Self {
        PairedCountsAgg {
            signature: Signature::exact(vec![DataType::Boolean, DataType::Boolean], Volatility::Immutable),
        }
    }
}

const COUNT_NAMES: [&str; 4] = ["both_correct", "b", "c", "both_wrong"];

/// The struct type `paired_counts` returns.
pub fn paired_counts_type() -> DataType {
    DataType::Struct(Fields::from(
        COUNT_NAMES.iter().map(|n| Field::new(*n, DataType::Int64, false)).collect::<Vec<_>>(),
    ))
}

impl AggregateUDFImpl for PairedCountsAgg {
    fn name(&self) -> &str {
        "paired_counts"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> DfResult<DataType> {
        Ok(paired_counts_type())
    }

    fn accumulator(&self, _acc_args: AccumulatorArgs) -> DfResult<Box<dyn Accumulator>> {
        Ok(Box::new(PairedAccumulator::default()))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> DfResult<Vec<FieldRef>> {
        Ok(COUNT_NAMES
            .iter()
            .map(|n| Arc::new(Field::new(format!("{}[{n}]", args.name), DataType::Int64, false)))
            .collect())
    }
}

#[derive(Debug, Default)]
struct PairedAccumulator {
    counts: PairedCounts,
}

impl PairedAccumulator {
    fn add_rows(&mut self, values: &[ArrayRef], diff: i64) {
        let (base, ft) = (values[0].as_boolean(), values[1].as_boolean());
        for i in 0..base.len() {
            if base.is_valid(i) && ft.is_valid(i) {
                self.counts.add(base.value(i), ft.value(i), diff);
            }
        }
    }
}

impl Accumulator for PairedAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> DfResult<()> {
        self.add_rows(values, 1);
        Ok(())
    }

    fn retract_batch(&mut self, values: &[ArrayRef]) -> DfResult<()> {
        self.add_rows(values, -1);
        Ok(())
    }

    fn supports_retract_batch(&self) -> bool {
        true
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> DfResult<()> {
        let cols: Vec<&Int64Array> = states.iter().map(|s| s.as_primitive::<Int64Type>()).collect();
        for i in 0..cols[0].len() {
            self.counts.merge(&PairedCounts {
                both_correct: cols[0].value(i),
                b: cols[1].value(i),
                c: cols[2].value(i),
                both_wrong: cols[3].value(i),
            });
        }
        Ok(())
    }

    fn state(&mut self) -> DfResult<Vec<ScalarValue>> {
        let c = self.counts;
        Ok([c.both_correct, c.b, c.c, c.both_wrong].into_iter().map(|v| ScalarValue::Int64(Some(v))).collect())
    }

    fn evaluate(&mut self) -> DfResult<ScalarValue> {
        let c = self.counts;
        let DataType::Struct(fields) = paired_counts_type() else { unreachable!("a struct type") };
        let arrays: Vec<ArrayRef> = [c.both_correct, c.b, c.c, c.both_wrong]
            .into_iter()
            .map(|v| Arc::new(Int64Array::from(vec![v])) as ArrayRef)
            .collect();
        Ok(ScalarValue::Struct(Arc::new(StructArray::new(fields, arrays, None))))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self)
    }
}
