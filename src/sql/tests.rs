//! Tests of the SQL layer: the oracles of ORACLES.md through SQL, the aggregate at several batch
//! sizes (as DataFusion's regr.slt does), and incremental maintenance against from-scratch SQL.

use std::sync::Arc;

use arrow::array::{Array, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::compute::concat_batches;
use arrow::datatypes::{DataType, Field, Schema};
use arrow::util::display::array_value_to_string;
use datafusion::datasource::MemTable;
use datafusion::prelude::{SessionConfig, SessionContext};
use proptest::prelude::*;

use super::engine::StatsEngine;
use super::queries::{DISCORDANT_PAIRS, FAMILY_TABLE, PAIRED_COUNTS, REGRESSION_CELLS};
use super::view::PairedView;
use crate::records::Observation;
use crate::schema::Record;
use crate::stats::paired::{ALPHA, PairedCounts, family};

fn ctx(batch_size: usize) -> SessionContext {
    let ctx =
        SessionContext::new_with_config(SessionConfig::new().with_batch_size(batch_size).with_target_partitions(3));
    super::udf::register(&ctx);
    ctx
}

fn sql(ctx: &SessionContext, q: &str) -> RecordBatch {
    let batches = crate::runtime::block_on(async { ctx.sql(q).await.unwrap().collect().await.unwrap() });
    let schema = batches.first().map(|b| b.schema()).unwrap_or_else(|| Arc::new(Schema::empty()));
    concat_batches(&schema, &batches).unwrap()
}

fn f64s(b: &RecordBatch, col: &str) -> Vec<Option<f64>> {
    let a = b.column_by_name(col).unwrap().as_any().downcast_ref::<Float64Array>().unwrap();
    (0..a.len()).map(|i| a.is_valid(i).then(|| a.value(i))).collect()
}

/// Every cell of the named columns as text, row by row.
fn rows(b: &RecordBatch, cols: &[&str]) -> Vec<Vec<String>> {
    (0..b.num_rows())
        .map(|r| cols.iter().map(|c| array_value_to_string(b.column_by_name(c).unwrap(), r).unwrap()).collect())
        .collect()
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * a.abs().max(b.abs())
}

#[test]
fn mcnemar_and_effect_oracles_through_sql() {
    // ORACLES.md §1.
    let ctx = ctx(8192);
    let out = sql(
        &ctx,
        "SELECT mcnemar_exact(b, c) AS p, paper_g(b, c) AS g, cohens_g(b, c) AS cg, odds_ratio(b, c) AS o \
         FROM (VALUES (12, 3), (25, 9), (10, 10), (7, 0), (1, 0), (0, 0)) AS t(b, c)",
    );
    let p = f64s(&out, "p");
    assert_eq!(p[0], Some(0.03515625));
    assert!(close(p[1].unwrap(), 9707899.0 / 2f64.powi(30), 1e-9));
    assert_eq!(&p[2..], &[Some(1.0), Some(0.015625), Some(1.0), None]);
    let g = f64s(&out, "g");
    assert!(close(g[0].unwrap(), 2.323790, 1e-6) && close(g[1].unwrap(), 2.743977, 1e-6));
    assert!(close(f64s(&out, "cg")[1].unwrap(), 0.235294, 1e-5));
    assert_eq!(f64s(&out, "o")[3], Some(f64::INFINITY));
}

#[test]
fn interval_midp_and_test_type_functions_through_sql() {
    // The oracles of the stats modules, reached by SQL: mid-p of 12 vs 3, Fagerland et al.'s
    // Cavo example for Newcombe, Wilson at 0 of 10, and the view's own pairing rule.
    let ctx = ctx(8192);
    let out = sql(
        &ctx,
        "SELECT mcnemar_midp(12, 3) AS midp, mcnemar_midp(0, 0) AS none,          newcombe_low(59, 16, 6, 80) AS lo, newcombe_high(59, 16, 6, 80) AS hi,          wilson_low(0, 10) AS wl, wilson_high(0, 10) AS wh, wilson_low(0, 0) AS wn,          test_type('original') AS t1, test_type('correct') AS t2,          test_type('other') AS t3",
    );
    assert_eq!(f64s(&out, "midp")[0], Some(697.0 / 32768.0));
    assert_eq!(f64s(&out, "none")[0], None);
    assert!(close(f64s(&out, "lo")[0].unwrap(), -0.1186, 5e-4) && close(f64s(&out, "hi")[0].unwrap(), -0.0046, 2e-2));
    assert_eq!(f64s(&out, "wl")[0], Some(0.0));
    assert!(close(f64s(&out, "wh")[0].unwrap(), 0.2775327998628892, 1e-12));
    assert_eq!(f64s(&out, "wn")[0], None);
    let t = rows(&out, &["t1", "t2", "t3"]);
    assert_eq!(t[0], ["Normal", "Sycophancy", ""]);
    // Negative counts are an error, not an interval.
    let negative =
        crate::runtime::block_on(async { ctx.sql("SELECT newcombe_low(-1, 0, 0, 3)").await.unwrap().collect().await });
    assert!(negative.is_err());
}

#[test]
fn bh_window_reproduces_the_oracle_families() {
    // ORACLES.md §2, examples A, B and C as three partitions of one table, plus a NULL p that
    // stays outside its family.
    let a = [
        0.0001, 0.0004, 0.0019, 0.0095, 0.0201, 0.0278, 0.0298, 0.0344, 0.0459, 0.3240, 0.4262, 0.5719, 0.6528, 0.7590,
        1.000,
    ];
    let a_adj = [
        0.0015,
        0.003,
        0.0095,
        0.035625,
        0.0603,
        0.0298 * 15.0 / 7.0,
        0.0298 * 15.0 / 7.0,
        0.0645,
        0.0765,
        0.486,
        0.581182,
        0.714875,
        0.753231,
        0.813214,
        1.0,
    ];
    let b = [0.01, 0.04, 0.03, 0.005, 0.20];
    let b_adj = [0.025, 0.05, 0.05, 0.025, 0.2];
    let c = [0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205, 0.212, 0.216];
    let c_adj = [0.01, 0.04, 0.084, 0.084, 0.084, 0.1, 0.105714, 0.216, 0.216, 0.216];
    let mut fam = Vec::new();
    let mut idx = Vec::new();
    let mut p = Vec::new();
    for (name, ps) in [("A", &a[..]), ("B", &b[..]), ("C", &c[..])] {
        for (i, v) in ps.iter().enumerate() {
            fam.push(name);
            idx.push(i as i64);
            p.push(Some(*v));
        }
    }
    fam.push("B");
    idx.push(99);
    p.push(None);
    let schema = Arc::new(Schema::new(vec![
        Field::new("family", DataType::Utf8, false),
        Field::new("i", DataType::Int64, false),
        Field::new("p", DataType::Float64, true),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![Arc::new(StringArray::from(fam)), Arc::new(Int64Array::from(idx)), Arc::new(Float64Array::from(p))],
    )
    .unwrap();
    for batch_size in [1, 2, 3, 8192] {
        let ctx = ctx(batch_size);
        ctx.register_table("t", Arc::new(MemTable::try_new(schema.clone(), vec![vec![batch.clone()]]).unwrap()))
            .unwrap();
        let out = sql(
            &ctx,
            "SELECT family, i, bh_adjust(p) OVER (PARTITION BY family) AS adj, \
             bh_reject(p, 0.05) OVER (PARTITION BY family) AS rej FROM t ORDER BY family, i",
        );
        let adj = f64s(&out, "adj");
        let rej = out.column_by_name("rej").unwrap().as_any().downcast_ref::<BooleanArray>().unwrap();
        let want: Vec<f64> = a_adj.iter().chain(&b_adj).chain(&c_adj).copied().collect();
        // Rows: A (15), B (5 + the NULL at i = 99), C (10).
        let got: Vec<f64> = adj.iter().flatten().copied().collect();
        assert_eq!(got.len(), 30);
        for (g, w) in got.iter().zip(&want) {
            assert!(close(*g, *w, 1e-5), "{g} vs {w} at batch size {batch_size}");
        }
        assert_eq!(adj[20], None, "a missing p is not adjusted");
        assert!(rej.is_null(20));
        let rejected = |range: std::ops::Range<usize>| range.filter(|&i| rej.value(i)).count();
        assert_eq!(rejected(0..15), 4, "B&H 1995: four rejections");
        assert_eq!(rejected(15..20), 4);
        assert_eq!(rejected(21..31), 2);
    }
}

/// Random (base, ft) pairs in a table with a group column, for the aggregate's tests.
fn pair_table(pairs: &[(Option<bool>, Option<bool>, u8)]) -> (Arc<Schema>, RecordBatch) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("g", DataType::Int64, false),
        Field::new("i", DataType::Int64, false),
        Field::new("base", DataType::Boolean, true),
        Field::new("ft", DataType::Boolean, true),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(Int64Array::from_iter_values(pairs.iter().map(|p| p.2 as i64))),
            Arc::new(Int64Array::from_iter_values(0..pairs.len() as i64)),
            Arc::new(pairs.iter().map(|p| p.0).collect::<BooleanArray>()),
            Arc::new(pairs.iter().map(|p| p.1).collect::<BooleanArray>()),
        ],
    )
    .unwrap();
    (schema, batch)
}

fn expected_counts(pairs: &[(Option<bool>, Option<bool>, u8)], group: u8) -> PairedCounts {
    pairs.iter().filter(|p| p.2 == group).filter_map(|p| Some((p.0?, p.1?))).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// The aggregate over any partitioning and batch size equals the direct count, and the
    /// sliding-window form (which retracts rows leaving the frame) equals a direct count of
    /// each frame.
    #[test]
    fn paired_counts_aggregate_merges_and_retracts_exactly(
        pairs in prop::collection::vec((prop::option::of(any::<bool>()), prop::option::of(any::<bool>()), 0u8..3), 0..300),
        batch_size in prop::sample::select(vec![1usize, 2, 3, 8192]),
        split in 1usize..50,
    ) {
        let (schema, batch) = pair_table(&pairs);
        // Partitions of `split` rows each, so partial states are merged.
        let parts: Vec<Vec<RecordBatch>> = (0..batch.num_rows()).step_by(split)
            .map(|s| vec![batch.slice(s, split.min(batch.num_rows() - s))]).collect();
        let ctx = ctx(batch_size);
        ctx.register_table("t", Arc::new(MemTable::try_new(schema, if parts.is_empty() { vec![vec![]] } else { parts }).unwrap())).unwrap();
        let out = sql(&ctx, "SELECT g, get_field(pc, 'both_correct') AS n11, get_field(pc, 'b') AS b, \
            get_field(pc, 'c') AS c, get_field(pc, 'both_wrong') AS n00 \
            FROM (SELECT g, paired_counts(base, ft) AS pc FROM t GROUP BY g) ORDER BY g");
        for r in rows(&out, &["g", "n11", "b", "c", "n00"]) {
            let want = expected_counts(&pairs, r[0].parse().unwrap());
            prop_assert_eq!(r[1..].to_vec(), vec![want.both_correct.to_string(), want.b.to_string(), want.c.to_string(), want.both_wrong.to_string()]);
        }
        let window = sql(&ctx, "SELECT i, get_field(paired_counts(base, ft) OVER (ORDER BY i ROWS BETWEEN 2 PRECEDING AND CURRENT ROW), 'b') AS b, \
            get_field(paired_counts(base, ft) OVER (ORDER BY i ROWS BETWEEN 2 PRECEDING AND CURRENT ROW), 'both_correct') AS n11 FROM t ORDER BY i");
        for r in rows(&window, &["i", "b", "n11"]) {
            let i: usize = r[0].parse().unwrap();
            let frame: PairedCounts = pairs[i.saturating_sub(2)..=i].iter().filter_map(|p| Some((p.0?, p.1?))).collect();
            prop_assert_eq!(r[1].clone(), frame.b.to_string());
            prop_assert_eq!(r[2].clone(), frame.both_correct.to_string());
        }
    }
}

/// A small random observation domain where every kind of collision happens: two models, two
/// base and two fine-tuned checkpoints, conditions outside both tests, excluded answers,
/// several samples.
/// Up to `max` observations, each key at most once (the view counts a key once: a second
/// copy is an error, tested on its own).
fn observations(max: usize) -> impl Strategy<Value = Vec<Observation>> {
    prop::collection::vec(observation(), 0..max).prop_map(|obs| {
        let mut seen = std::collections::HashSet::new();
        obs.into_iter()
            .filter(|o| {
                seen.insert((
                    o.model.clone(),
                    o.checkpoint.clone(),
                    o.dataset.clone(),
                    o.item_key.clone(),
                    o.amendment_type.clone(),
                    o.prompt_type.clone(),
                    o.sample_index,
                ))
            })
            .collect()
    })
}

fn observation() -> impl Strategy<Value = Observation> {
    (
        0..2usize,
        0..4usize,
        0..2usize,
        0..5usize,
        0..3usize,
        0..5usize,
        0..2u32,
        prop::option::weighted(0.9, any::<bool>()),
    )
        .prop_map(|(m, ck, ds, item, am, pt, sample, correct)| {
            let (checkpoint, ft, epoch) =
                [("base", false, 0), ("base-b", false, 1), ("warm-1", true, 2), ("warm-2", true, 3)][ck];
            let dataset = ["trivia", "disinfo"][ds];
            let amendment = ["unmodified", "emotion:sad", "stake:high"][am];
            let prompt = ["original", "original_neutral", "correct", "incorrect", "other"][pt];
            // Names shared between columns (a model named like a dataset, items named like
            // anything) must stay apart.
            let model = ["m0", "trivia"][m];
            let item = ["q0", "q1", "m0", "trivia", "original"][item];
            Observation {
                response_key: format!("{model}/{checkpoint}/{dataset}/{item}/{amendment}/{prompt}/{sample}"),
                model: model.into(),
                checkpoint: checkpoint.into(),
                checkpoint_epoch: epoch,
                is_finetuned: ft,
                dataset: dataset.into(),
                item_key: item.into(),
                amendment_type: amendment.into(),
                amendment_group: crate::conditions::amendment_group(amendment).into(),
                prompt_type: prompt.into(),
                sample_index: sample,
                refusal: correct.is_none(),
                verdict: String::new(),
                correct,
            }
        })
}

/// Paired counts computed from scratch by `queries/paired_counts.sql` over the observations.
fn sql_from_scratch(obs: &[Observation]) -> Vec<Vec<String>> {
    let ctx = ctx(8192);
    let schema = crate::schema::arrow_schema("observation").unwrap();
    let batches = if obs.is_empty() { vec![] } else { vec![Observation::to_batch(obs).unwrap()] };
    ctx.register_table("observations", Arc::new(MemTable::try_new(schema, vec![batches]).unwrap())).unwrap();
    rows(&sql(&ctx, PAIRED_COUNTS.sql), &COUNT_COLUMNS)
}

const COUNT_COLUMNS: [&str; 11] = [
    "model",
    "base_checkpoint",
    "checkpoint",
    "checkpoint_epoch",
    "dataset",
    "test_type",
    "category",
    "both_correct",
    "b",
    "c",
    "both_wrong",
];

/// The regressions' item rows computed from scratch as the paper's selection reads: each
/// model's base answers and its highest-epoch fine-tuned checkpoint's, scored answers only,
/// counted per (dataset, item, model, amendment, prompt type, fine-tuned) in name order,
/// clusters numbered by (dataset, item) in name order.
fn regression_items_from_scratch(obs: &[Observation]) -> Vec<crate::stats::models::CellCount> {
    use std::collections::BTreeMap;
    let mut latest: BTreeMap<&str, u64> = BTreeMap::new();
    for o in obs.iter().filter(|o| o.is_finetuned) {
        let e = latest.entry(o.model.as_str()).or_insert(o.checkpoint_epoch);
        *e = (*e).max(o.checkpoint_epoch);
    }
    // (dataset, item, model, amendment, prompt type, fine-tuned) → (incorrect, answers).
    type Cell<'a> = (&'a str, &'a str, &'a str, &'a str, &'a str, bool);
    let mut counts: BTreeMap<Cell, (u64, u64)> = BTreeMap::new();
    for o in obs {
        let Some(correct) = o.correct else { continue };
        if o.is_finetuned && latest.get(o.model.as_str()) != Some(&o.checkpoint_epoch) {
            continue;
        }
        let key = (&*o.dataset, &*o.item_key, &*o.model, &*o.amendment_type, &*o.prompt_type, o.is_finetuned);
        let e = counts.entry(key).or_default();
        e.0 += u64::from(!correct);
        e.1 += 1;
    }
    let mut clusters: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    counts
        .into_iter()
        .map(|((dataset, item, model, amendment, prompt, ft), (incorrect, n))| {
            let next = clusters.len() as u64;
            let cluster = *clusters.entry((dataset, item)).or_insert(next);
            crate::stats::models::CellCount::new(model, dataset, amendment, prompt, ft, incorrect, n)
                .with_cluster(cluster)
        })
        .collect()
}

fn view_rows(view: &PairedView) -> Vec<Vec<String>> {
    rows(&view.paired_counts_batch(None).unwrap(), &COUNT_COLUMNS)
}

/// Splits `obs` into consecutive batches of the given sizes (cycling).
fn split(obs: &[Observation], sizes: &[usize]) -> Vec<RecordBatch> {
    let mut out = Vec::new();
    let (mut start, mut i) = (0, 0);
    while start < obs.len() {
        let end = (start + sizes[i % sizes.len()].max(1)).min(obs.len());
        out.push(Observation::to_batch(&obs[start..end]).unwrap());
        start = end;
        i += 1;
    }
    out
}

fn batch_sizes() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        prop::sample::select(vec![1usize, 2, 3, 8192]).prop_map(|s| vec![s]),
        prop::collection::vec(1usize..40, 1..10),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Any batching and arrival order gives exactly the from-scratch SQL result.
    #[test]
    fn incremental_counts_equal_from_scratch_sql_for_any_batching_and_order(
        (obs, shuffled) in observations(250).prop_flat_map(|o| (Just(o.clone()), Just(o).prop_shuffle())),
        sizes in batch_sizes(),
    ) {
        let want = sql_from_scratch(&obs);
        let mut view = PairedView::default();
        // Batches fed (counted while the next is read) and applied (counted at once) alike.
        for (i, b) in split(&shuffled, &sizes).iter().enumerate() {
            if i % 2 == 0 { view.feed(b, 1).unwrap() } else { view.apply(b, 1).unwrap() }
        }
        view.settle().unwrap();
        prop_assert_eq!(view_rows(&view), want);
        prop_assert_eq!(view.regression_items().to_cells(), regression_items_from_scratch(&obs));
    }

    /// The regressions' item rows (what the clustered SEs need) sum, cell by cell, to the
    /// `regression_cells.sql` view over the maintained cells: one selection of checkpoints.
    #[test]
    fn regression_items_sum_to_the_regression_cells_view(obs in observations(250)) {
        let mut view = PairedView::default();
        if !obs.is_empty() {
            view.apply(&Observation::to_batch(&obs).unwrap(), 1).unwrap();
        }
        let ctx = ctx(8192);
        let cells = view.cells_batch().unwrap();
        ctx.register_table("cells", Arc::new(MemTable::try_new(cells.schema(), vec![vec![cells]]).unwrap())).unwrap();
        let want: Vec<Vec<String>> = rows(
            &sql(&ctx, REGRESSION_CELLS.sql),
            &["model", "dataset", "amendment_type", "prompt_type", "is_finetuned", "incorrect", "n"],
        )
        .into_iter()
        .filter(|r| r[6] != "0")
        .collect();
        let mut summed: std::collections::BTreeMap<Vec<String>, (u64, u64)> = Default::default();
        let items = view.regression_items().to_cells();
        for c in &items {
            let key = vec![c.model.to_string(), c.dataset.to_string(), c.amendment_type.to_string(), c.prompt_type.to_string(), c.ft.to_string()];
            let e = summed.entry(key).or_default();
            e.0 += c.incorrect;
            e.1 += c.n;
        }
        let got: Vec<Vec<String>> = summed
            .into_iter()
            .map(|(mut k, (incorrect, n))| { k.push(incorrect.to_string()); k.push(n.to_string()); k })
            .collect();
        prop_assert_eq!(got, want);
        // One cluster per (dataset, item).
        let distinct: std::collections::BTreeSet<_> = obs.iter().filter(|o| o.correct.is_some()).map(|o| (o.dataset.clone(), o.item_key.clone())).collect();
        let clusters: std::collections::BTreeSet<_> = items.iter().map(|c| c.cluster.unwrap()).collect();
        prop_assert!(clusters.len() <= distinct.len());
    }

    /// `discordant_pairs` lists exactly the pairs behind the maintained b and c of every cell
    /// (conditions outside both tests, excluded answers and several samples included).
    #[test]
    fn discordant_pairs_count_to_the_maintained_b_and_c(obs in observations(250)) {
        let mut engine = StatsEngine::with_options(true, 8192).unwrap();
        if !obs.is_empty() {
            engine.apply(&Observation::to_batch(&obs).unwrap(), 1).unwrap();
        }
        engine.refresh().unwrap();
        for stream in ["trial", "response", "verdict"] {
            let name = super::live::table_name(stream);
            engine.register(&name, crate::schema::arrow_schema(stream).unwrap(), vec![]).unwrap();
        }
        let key = ["model", "base_checkpoint", "checkpoint", "dataset", "test_type", "category"];
        let mut want: Vec<Vec<String>> = Vec::new();
        for r in rows(&engine.view().paired_counts_batch(None).unwrap(), &[&key[..], &["b", "c"]].concat()) {
            for (side, count) in [("b", &r[6]), ("c", &r[7])] {
                for _ in 0..count.parse::<usize>().unwrap() {
                    let mut k = r[..6].to_vec();
                    k.push(side.to_string());
                    want.push(k);
                }
            }
        }
        want.sort();
        let batches = engine.query(DISCORDANT_PAIRS.sql).unwrap();
        let mut got: Vec<Vec<String>> =
            batches.iter().flat_map(|b| rows(b, &[&key[..], &["counts_toward"]].concat())).collect();
        got.sort();
        prop_assert_eq!(got, want);
    }

    /// Retracting any subset, in any batching and interleaving, equals never adding it; a
    /// retraction may even arrive before its addition.
    #[test]
    fn retraction_equals_never_adding(
        obs in observations(250),
        mask in prop::collection::vec(any::<bool>(), 250),
        sizes in batch_sizes(),
        retract_first in any::<bool>(),
    ) {
        let kept: Vec<Observation> = obs.iter().zip(&mask).filter(|(_, m)| !**m).map(|(o, _)| o.clone()).collect();
        let dropped: Vec<Observation> = obs.iter().zip(&mask).filter(|(_, m)| **m).map(|(o, _)| o.clone()).collect();
        let mut view = PairedView::default();
        if retract_first {
            for b in split(&dropped, &sizes) { view.apply(&b, -1).unwrap(); }
            for b in split(&obs, &sizes) { view.apply(&b, 1).unwrap(); }
        } else {
            for b in split(&obs, &sizes) { view.apply(&b, 1).unwrap(); }
            for b in split(&dropped, &sizes) { view.apply(&b, -1).unwrap(); }
        }
        prop_assert_eq!(view_rows(&view), sql_from_scratch(&kept));
        // The regressions' item cells too: a retracted latest checkpoint hands the model's
        // fine-tuned cells back to the one before it.
        prop_assert_eq!(view.regression_items().to_cells(), regression_items_from_scratch(&kept));
    }

    /// Re-judging answers (upsert with a flipped verdict) moves them between cells exactly as
    /// if the new verdicts had been there from the start.
    #[test]
    fn rejudged_answers_move_between_cells(
        obs in observations(200),
        flip in prop::collection::vec(any::<bool>(), 200),
        sizes in batch_sizes(),
    ) {
        // Upsert identifies an answer by its pair key and checkpoint, so keep one per slot.
        let mut seen = std::collections::HashSet::new();
        let unique: Vec<Observation> = obs.into_iter().filter(|o| seen.insert(o.response_key.clone())).collect();
        let rejudged: Vec<Observation> = unique.iter().zip(&flip).map(|(o, f)| {
            let mut o = o.clone();
            if *f { o.correct = o.correct.map(|c| !c); }
            o
        }).collect();
        let mut view = PairedView::default();
        for b in split(&unique, &sizes) { view.upsert(&b).unwrap(); }
        for b in split(&rejudged, &sizes) { view.upsert(&b).unwrap(); }
        prop_assert_eq!(view_rows(&view), sql_from_scratch(&rejudged));
        prop_assert_eq!(view.regression_items().to_cells(), regression_items_from_scratch(&rejudged));
    }

    /// Re-judging mid-stream: after each batch arrives, some answers of the batches before it
    /// are re-judged (flipped again after every later batch); at the end the counts (and the
    /// cells) equal a from-scratch run over the final verdicts, whatever the batch sizes.
    #[test]
    fn rejudging_mid_stream_equals_from_scratch_on_the_final_verdicts(
        obs in observations(200),
        flips in prop::collection::vec(0..3u8, 200),
        sizes in batch_sizes(),
    ) {
        let mut seen = std::collections::HashSet::new();
        let unique: Vec<Observation> = obs.into_iter().filter(|o| seen.insert(o.response_key.clone())).collect();
        let mut current = unique.clone();
        let mut view = PairedView::default();
        let mut arrived = 0;
        for b in split(&unique, &sizes) {
            view.upsert(&b).unwrap();
            // Re-judge a few of those that arrived in earlier batches.
            let earlier: Vec<usize> = (0..arrived).filter(|i| flips[*i] > 0).collect();
            let mut rejudged = Vec::new();
            for i in earlier {
                current[i].correct = current[i].correct.map(|c| !c);
                rejudged.push(current[i].clone());
            }
            for r in split(&rejudged, &sizes) { view.upsert(&r).unwrap(); }
            arrived += b.num_rows();
        }
        prop_assert_eq!(view_rows(&view), sql_from_scratch(&current));
        let mut scratch = PairedView::default();
        if !current.is_empty() { scratch.apply(&Observation::to_batch(&current).unwrap(), 1).unwrap(); }
        prop_assert_eq!(view.cells_batch().unwrap(), scratch.cells_batch().unwrap());
    }
}

#[allow(clippy::too_many_arguments)] // one argument per observation field the tests vary
fn obs(
    model: &str,
    ckpt: &str,
    ft: bool,
    dataset: &str,
    item: usize,
    amendment: &str,
    prompt: &str,
    correct: bool,
) -> Observation {
    Observation {
        response_key: format!("{model}/{ckpt}/{dataset}/{item}/{amendment}/{prompt}"),
        model: model.into(),
        checkpoint: ckpt.into(),
        checkpoint_epoch: if ft { 1 + ckpt.len() as u64 } else { 0 },
        is_finetuned: ft,
        dataset: dataset.into(),
        item_key: format!("q{item}"),
        amendment_type: amendment.into(),
        amendment_group: crate::conditions::amendment_group(amendment).into(),
        prompt_type: prompt.into(),
        sample_index: 0,
        refusal: false,
        verdict: String::new(),
        correct: Some(correct),
    }
}

/// Pairs with the given (base, ft) outcomes for one category.
fn pairs_for(
    model: &str,
    ckpt: &str,
    dataset: &str,
    amendment: &str,
    outcomes: &[(bool, bool, usize)],
) -> Vec<Observation> {
    let mut out = Vec::new();
    let mut item = 0;
    for &(base, ft, k) in outcomes {
        for _ in 0..k {
            out.push(obs(model, "base", false, dataset, item, amendment, "original", base));
            out.push(obs(model, ckpt, true, dataset, item, amendment, "original", ft));
            item += 1;
        }
    }
    out
}

#[test]
fn family_sql_agrees_with_the_stats_library_and_updates_only_touched_families() {
    let mut engine = StatsEngine::new().unwrap();
    // Oracle rows of ORACLES.md §1 as categories of one family.
    let mut rows_a = Vec::new();
    for (amendment, b, c) in [
        ("unmodified", 12, 3),
        ("emotion:sad", 25, 9),
        ("stake:high", 10, 10),
        ("stake:low", 7, 0),
        ("emotion:happy", 0, 0),
    ] {
        rows_a.extend(pairs_for(
            "A",
            "warm",
            "trivia",
            amendment,
            &[(true, true, 20), (true, false, b), (false, true, c), (false, false, 5)],
        ));
    }
    let rows_b = pairs_for("B", "warm", "trivia", "unmodified", &[(true, false, 4), (false, true, 1), (true, true, 3)]);
    engine.apply(&Observation::to_batch(&rows_a).unwrap(), 1).unwrap();
    engine.apply(&Observation::to_batch(&rows_b).unwrap(), 1).unwrap();
    assert_eq!(engine.refresh().unwrap().families, 2);
    let table = sql_table(&mut engine);
    assert_eq!(table.num_rows(), 6);
    // Against the pure library: counts in category order (sorted names).
    let cats = [(0, 0), (25, 9), (10, 10), (7, 0), (12, 3)];
    let counts: Vec<PairedCounts> =
        cats.iter().map(|&(b, c)| PairedCounts { both_correct: 20, b, c, both_wrong: 5 }).collect();
    let want = family(&counts, ALPHA).unwrap();
    let (p, p_bh) = (f64s(&table, "p_exact"), f64s(&table, "p_bh"));
    let (acc, diff) = (f64s(&table, "acc_base_pct"), f64s(&table, "diff_pp"));
    for (i, w) in want.iter().enumerate() {
        assert_eq!(p[i], w.p_exact, "category {i}");
        assert_eq!(p_bh[i], w.p_adjusted, "category {i}");
        assert_eq!(acc[i], Some(w.acc_base_pct));
        assert_eq!(diff[i], Some(w.diff_pp));
        // The statistics beside the paper's, through the SQL functions.
        assert_eq!(f64s(&table, "p_midp")[i], w.p_midp, "category {i}");
        for (col, want) in [
            ("acc_base_ci_low", w.acc_base_ci_pct.map(|c| c.0)),
            ("acc_base_ci_high", w.acc_base_ci_pct.map(|c| c.1)),
            ("acc_ft_ci_low", w.acc_ft_ci_pct.map(|c| c.0)),
            ("acc_ft_ci_high", w.acc_ft_ci_pct.map(|c| c.1)),
            ("diff_ci_low", w.diff_ci_pp.map(|c| c.0)),
            ("diff_ci_high", w.diff_ci_pp.map(|c| c.1)),
        ] {
            let got = f64s(&table, col)[i].unwrap();
            assert!(close(got, want.unwrap(), 1e-12), "{col} of category {i}: {got} vs {want:?}");
        }
    }
    assert_eq!(p[0], None, "b + c = 0: no test");
    // The family's minimum detectable difference, on every row of the family, and NULL for
    // model B's 8-pair family, which cannot detect anything.
    let sizes: Vec<(u64, u64)> = counts.iter().map(|c| (c.n() as u64, (c.b + c.c) as u64)).collect();
    let mdd = crate::stats::power::family_minimum_detectable_difference(&sizes).unwrap();
    let got = f64s(&table, "mdd_pp");
    assert!(got[..5].iter().all(|g| close(g.unwrap(), 100.0 * mdd, 1e-12)), "{got:?} vs {mdd}");
    assert_eq!(got[5], None);

    // A new checkpoint of model B touches one family; A's stored rows are not recomputed.
    let before_a = sql_table(&mut engine).slice(0, 5);
    // Only the new checkpoint's answers arrive; they pair with B's base answers already held.
    let new: Vec<Observation> = pairs_for("B", "warm-2", "trivia", "unmodified", &[(true, false, 2), (true, true, 2)])
        .into_iter()
        .filter(|o| o.is_finetuned)
        .collect();
    engine.apply(&Observation::to_batch(&new).unwrap(), 1).unwrap();
    let refreshed = engine.refresh().unwrap();
    assert_eq!(refreshed.families, 1);
    let after = sql_table(&mut engine);
    assert_eq!(after.num_rows(), 7);
    assert_eq!(after.slice(0, 5), before_a);
    // Retracting it removes the family's rows again.
    engine.apply(&Observation::to_batch(&new).unwrap(), -1).unwrap();
    assert_eq!(engine.refresh().unwrap().families, 1);
    assert_eq!(sql_table(&mut engine).num_rows(), 6);
}

/// METHOD.md §4 (corrected): the paper's Normal/unmodified cell pairs `original` prompts only
/// (its code's `'original neutral'` filter never matched the data), so n equals one prompt
/// type's item count; `original_neutral` answers form their own Neutral family.
#[test]
fn normal_unmodified_cell_pairs_only_original_prompts_and_neutral_is_its_own_family() {
    let mut rows = Vec::new();
    for item in 0..6 {
        // original: base right, warm wrong on the first 4 items (b = 4).
        rows.push(obs("A", "base", false, "disinfo", item, "unmodified", "original", true));
        rows.push(obs("A", "warm", true, "disinfo", item, "unmodified", "original", item >= 4));
        // original_neutral: warm right where base is wrong (c = 3), which pooling would mix in.
        rows.push(obs("A", "base", false, "disinfo", item, "unmodified", "original_neutral", item >= 3));
        rows.push(obs("A", "warm", true, "disinfo", item, "unmodified", "original_neutral", true));
    }
    let mut view = PairedView::default();
    view.apply(&Observation::to_batch(&rows).unwrap(), 1).unwrap();
    let families: Vec<(String, String, i64, i64, i64)> = view
        .family_counts()
        .iter()
        .flat_map(|(k, cats)| {
            let test = k.test_type.as_str().to_string();
            cats.iter().map(move |(cat, c)| (test.clone(), cat.clone(), c.n(), c.b, c.c)).collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(
        families,
        vec![
            ("Neutral".to_string(), "unmodified".to_string(), 6, 0, 3),
            ("Normal".to_string(), "unmodified".to_string(), 6, 4, 0),
        ],
        "Normal/unmodified n is one prompt type's 6 items, not 12"
    );
    // The from-scratch SQL agrees.
    assert_eq!(view_rows(&view), sql_from_scratch(&rows));
}

fn sql_table(engine: &mut StatsEngine) -> RecordBatch {
    let batches = engine.query(FAMILY_TABLE.sql).unwrap();
    concat_batches(&batches[0].schema(), &batches).unwrap()
}

#[test]
fn regressions_from_maintained_cells_reproduce_the_glm_oracle() {
    // ORACLES.md §3 fixed effects: (model, dataset, base incorrect, warm incorrect) of 50.
    let mut rows = Vec::new();
    for (m, ds, base, warm) in
        [("A", "disinfo", 10, 18), ("A", "trivia", 15, 22), ("B", "disinfo", 8, 12), ("B", "trivia", 20, 30)]
    {
        for i in 0..50 {
            rows.push(obs(m, "base", false, ds, i, "unmodified", "original", i >= base));
            rows.push(obs(m, "warm", true, ds, i, "unmodified", "original", i >= warm));
        }
    }
    let mut engine = StatsEngine::new().unwrap();
    for b in split(&rows, &[7]) {
        engine.apply(&b, 1).unwrap();
    }
    let r = engine.refresh().unwrap();
    assert!(!r.regressions && engine.regressions_stale(), "refitted when read, not by every update");
    // Read around the engine's check, an unfitted table is an error, never an older fit.
    let unfitted = engine.block_on(async { engine.context().sql("SELECT * FROM coefficients").await?.collect().await });
    assert!(unfitted.as_ref().is_err_and(|e| e.to_string().contains("not refitted")), "{unfitted:?}");
    let query = |engine: &mut StatsEngine, q: &str| {
        let b = engine.query(q).unwrap();
        arrow::compute::concat_batches(&b[0].schema(), &b).unwrap()
    };
    let coef = query(&mut engine, "SELECT term, estimate, se FROM coefficients WHERE model_spec = 'M1' ORDER BY term");
    assert!(!engine.regressions_stale());
    let got: Vec<(String, f64, f64)> = rows_f(&coef);
    let want = [
        ("Intercept", -1.587705, 0.240637),
        ("dataset[T.trivia]", 0.914861, 0.221790),
        ("ft", 0.686974, 0.220633),
        ("model[T.B]", 0.119834, 0.219029),
    ];
    assert_eq!(got.len(), 4);
    for ((t, e, s), (wt, we, ws)) in got.iter().zip(want) {
        assert_eq!(t, wt);
        assert!(close(*e, we, 1e-5) && close(*s, ws, 1e-5), "{t}: {e} {s}");
    }
    let ame = query(&mut engine, "SELECT ame_pp FROM effects WHERE model_spec = 'M1'");
    assert!(close(f64s(&ame, "ame_pp")[0].unwrap(), 14.5, 1e-9));

    // A later checkpoint moves the fit: the next statement that reads it sees the refit, equal
    // to a fit from scratch on everything (the fit is never served from before the update).
    let later: Vec<_> =
        (0..50).map(|i| obs("B", "warm-2", true, "trivia", i, "unmodified", "original", i >= 40)).collect();
    engine.apply(&Observation::to_batch(&later).unwrap(), 1).unwrap();
    engine.refresh().unwrap();
    let m1 = query(&mut engine, "SELECT term, estimate, se FROM coefficients WHERE model_spec = 'M1' ORDER BY term");
    assert_ne!(rows_f(&m1), got, "the later checkpoint moved the fit");
    let all = "SELECT model_spec, term, estimate, se FROM coefficients ORDER BY model_spec, term";
    let refit = query(&mut engine, all);
    let mut scratch = StatsEngine::new().unwrap();
    let everything = [rows, later].concat();
    scratch.apply(&Observation::to_batch(&everything).unwrap(), 1).unwrap();
    scratch.refresh().unwrap();
    assert_eq!(refit, query(&mut scratch, all));

    // Refreshed and refitted at once, with the batches fed and not yet counted (the item
    // table is built while the counts come in, M1–M4 fitted beside the families): the same
    // families and the same fit; a second call with nothing new refits nothing.
    let mut together = StatsEngine::new().unwrap();
    for b in split(&everything, &[13]) {
        together.feed(&b).unwrap();
    }
    assert!(!together.view().settled(), "fed batches still counting");
    let r = together.refresh_and_refit().unwrap();
    assert!(r.regressions && r.regression_errors.is_empty() && !together.regressions_stale(), "{r:?}");
    let effects = "SELECT * FROM effects ORDER BY model_spec, context";
    assert_eq!(query(&mut together, all), refit);
    assert_eq!(query(&mut together, effects), query(&mut scratch, effects));
    assert_eq!(sql_table(&mut together), sql_table(&mut scratch));
    let again = together.refresh_and_refit().unwrap();
    assert!(!again.regressions && again.families == 0, "{again:?}");
    assert_eq!(query(&mut together, all), refit);
}

fn rows_f(b: &RecordBatch) -> Vec<(String, f64, f64)> {
    let t = b.column(0).as_any().downcast_ref::<StringArray>().unwrap();
    let (e, s) = (f64s(b, "estimate"), f64s(b, "se"));
    (0..b.num_rows()).map(|i| (t.value(i).to_string(), e[i].unwrap(), s[i].unwrap())).collect()
}

mod live {
    use super::super::live::{LiveSql, QueryError, Statement, split_statements};
    use crate::archive::{Archive, Partition};
    use crate::records::Observation;
    use crate::schema::Record;

    #[test]
    fn scripts_split_at_semicolons_outside_quotes_and_comments() {
        let script = "SELECT 'a;b' AS x; -- one; two\nSELECT \"c;d\" FROM t /* ; */ ;;\n  SELECT 3";
        assert_eq!(
            split_statements(script),
            vec!["SELECT 'a;b' AS x", "-- one; two\nSELECT \"c;d\" FROM t /* ; */", "SELECT 3"]
        );
        assert!(split_statements("  -- only a comment\n ; ").is_empty());
        assert_eq!(Statement::classify("-- c\n insert into t values (1)"), Statement::Write("INSERT".into()));
        assert_eq!(Statement::classify("/* x */ COPY t TO 'f'"), Statement::Write("COPY".into()));
        assert_eq!(Statement::classify("set extra_float_digits = 3"), Statement::Session("SET".into()));
        assert!(matches!(Statement::classify("WITH x AS (SELECT 1) SELECT * FROM x"), Statement::Query(_)));
    }

    fn answers(checkpoint: &str, ft: bool, epoch: u64) -> Vec<Observation> {
        (0..30)
            .map(|i| Observation {
                response_key: format!("{checkpoint}/{i}"),
                model: "m".into(),
                checkpoint: checkpoint.into(),
                checkpoint_epoch: epoch,
                is_finetuned: ft,
                dataset: "trivia".into(),
                item_key: format!("q{i}"),
                amendment_type: "unmodified".into(),
                amendment_group: "unmodified".into(),
                prompt_type: "original".into(),
                sample_index: 0,
                refusal: false,
                verdict: String::new(),
                correct: Some(!ft || i % (epoch as usize + 1) != 0),
            })
            .collect()
    }

    #[test]
    fn the_catalog_sees_only_committed_epochs_and_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let archive = Archive::open_writer(dir.path(), "test").unwrap();
        let write = |ckpt: &str, ft: bool, epoch: u64, commit: bool| {
            assert_eq!(archive.register_checkpoint("m", ckpt, ft, None).unwrap(), epoch);
            let part = Partition::checkpoint("m", ckpt);
            let batch = Observation::to_batch(&answers(ckpt, ft, epoch)).unwrap();
            archive.append_epoch("observation", &part, epoch, &[batch]).unwrap();
            if commit {
                archive.commit_epoch(epoch, &serde_json::json!({})).unwrap();
            }
        };
        write("base", false, 1, true);
        write("warm-e1", true, 2, true);
        let live = LiveSql::open(dir.path()).unwrap();
        let q = |sql: &str| -> Vec<String> {
            let rows = live.query(sql).unwrap();
            let b = arrow::compute::concat_batches(&rows.schema, &rows.batches).unwrap();
            (0..b.num_rows())
                .map(|i| {
                    let cells: Vec<String> =
                        b.columns().iter().map(|c| super::array_value_to_string(c, i).unwrap()).collect();
                    cells.join(",")
                })
                .collect()
        };
        let stats = "SELECT checkpoint, b, c FROM family_table ORDER BY checkpoint";
        assert_eq!(q(stats), ["warm-e1,10,0"]);
        let coefficients = "SELECT model_spec, term, estimate FROM coefficients ORDER BY model_spec, term";
        // Read through the live catalog the regressions are refitted, not refused as unfitted
        // (this answer set separates perfectly: no coefficient fits, and none is shown).
        assert_eq!(q(coefficients), Vec::<String>::new());
        // Registering a checkpoint is visible (the `checkpoints` table); its rows are not, until
        // its epoch commits.
        archive.register_checkpoint("m", "warm-e2", true, None).unwrap();
        live.sync().unwrap();
        let version = live.version();
        assert!(!live.sync().unwrap(), "nothing new");

        write("warm-e2", true, 3, false);
        assert_eq!(live.query(stats).unwrap().num_rows(), 1, "an uncommitted epoch stays invisible");
        assert_eq!(live.version(), version);
        archive.commit_epoch(3, &serde_json::json!({})).unwrap();
        assert_eq!(q(stats), ["warm-e1,10,0", "warm-e2,8,0"]);
        // The regressions are refitted for the next statement that reads them (not by the
        // sync), on everything committed: a fit from scratch gives the same rows.
        let fit_after = q(coefficients);
        let mut scratch = super::super::engine::StatsEngine::new().unwrap();
        for (c, ft, e) in [("base", false, 1), ("warm-e1", true, 2), ("warm-e2", true, 3)] {
            scratch.apply(&Observation::to_batch(&answers(c, ft, e)).unwrap(), 1).unwrap();
        }
        scratch.refresh().unwrap();
        let want: Vec<String> = scratch
            .query(coefficients)
            .unwrap()
            .iter()
            .flat_map(|b| {
                (0..b.num_rows()).map(|i| {
                    let cells: Vec<String> =
                        b.columns().iter().map(|c| super::array_value_to_string(c, i).unwrap()).collect();
                    cells.join(",")
                })
            })
            .collect();
        assert_eq!(fit_after, want);
        assert_eq!(live.query("SELECT * FROM observations").unwrap().num_rows(), 90);
        assert!(live.version() > version);
        for view in super::super::live::VIEWS {
            live.query(&format!("SELECT * FROM {}", view.name)).unwrap();
        }
        for t in ["trials", "responses", "verdicts", "items", "cells", "effects", "sycophancy"] {
            assert!(live.tables().iter().any(|x| x == t), "{t} in {:?}", live.tables());
        }

        for sql in ["INSERT INTO cells SELECT * FROM cells", "CREATE TABLE x AS SELECT 1", "DROP VIEW sycophancy"] {
            let e = live.query(sql).unwrap_err();
            assert!(matches!(e, QueryError::ReadOnly(_)), "{sql}: {e}");
            assert_eq!(e.sqlstate(), "25006");
        }
        // Past the keyword check, DataFusion's own options refuse DDL and DML too.
        let _ = live.query("EXPLAIN ANALYZE CREATE TABLE y AS SELECT 1");
        assert!(live.query("SELECT * FROM y").is_err(), "nothing was created");
        assert_eq!(live.query("SELECT nope FROM nowhere").unwrap_err().sqlstate(), "42P01");
    }

    #[test]
    fn a_statement_keeps_its_snapshot_while_epochs_commit() {
        let dir = tempfile::tempdir().unwrap();
        let archive = Archive::open_writer(dir.path(), "test").unwrap();
        let write = |ckpt: &str, ft: bool, epoch: u64| {
            assert_eq!(archive.register_checkpoint("m", ckpt, ft, None).unwrap(), epoch);
            let part = Partition::checkpoint("m", ckpt);
            let batch = Observation::to_batch(&answers(ckpt, ft, epoch)).unwrap();
            archive.append_epoch("observation", &part, epoch, &[batch]).unwrap();
            archive.commit_epoch(epoch, &serde_json::json!({})).unwrap();
        };
        write("base", false, 1);
        write("warm-e1", true, 2);
        let live = LiveSql::open(dir.path()).unwrap();
        let old = live.snapshot("SELECT * FROM family_table").unwrap();
        write("warm-e2", true, 3);
        let new = live.snapshot("SELECT * FROM family_table").unwrap();
        assert!(new.version > old.version);
        let count = |snap: std::sync::Arc<super::super::live::Snapshot>, sql: &str| {
            crate::runtime::block_on(live.spawn_query(snap, sql.to_string())).unwrap().unwrap().num_rows()
        };
        let sql = "SELECT * FROM family_table";
        assert_eq!(count(old.clone(), sql), 1, "the old snapshot does not see the new epoch");
        assert_eq!(count(old, "SELECT * FROM observations"), 60);
        assert_eq!(count(new, sql), 2);
    }

    #[test]
    fn a_statement_over_its_memory_limit_fails_with_53200_and_the_next_one_runs() {
        let dir = tempfile::tempdir().unwrap();
        drop(Archive::open_writer(dir.path(), "test").unwrap());
        let limits = super::super::live::MemoryLimits { query: 8 << 20, server: 10 << 20 };
        let live = LiveSql::open_with(dir.path(), limits).unwrap();
        let e = live.query("SELECT * FROM generate_series(1, 100000000)").unwrap_err();
        assert!(matches!(e, QueryError::OutOfMemory(_)), "{e}");
        assert_eq!(e.sqlstate(), "53200");
        let e = live.query("SELECT v, count(*) FROM generate_series(1, 10000000) AS t(v) GROUP BY v").unwrap_err();
        assert_eq!(e.sqlstate(), "53200", "an aggregate's hash table counts too: {e}");
        // A failed statement's operators wind down on the runtime's workers, freeing what
        // they held.
        let freed = |live: &LiveSql| {
            let start = std::time::Instant::now();
            while live.memory_in_use() > 0 && start.elapsed().as_secs() < 10 {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            live.memory_in_use()
        };
        assert_eq!(freed(&live), 0, "a failed statement frees what it held");
        let held = live.query("SELECT * FROM generate_series(1, 600000)").unwrap();
        assert!(held.reserved() > 4 << 20 && live.memory_in_use() == held.reserved(), "a result holds its memory");
        let e = live.query("SELECT * FROM generate_series(1, 900000)").unwrap_err();
        assert_eq!(e.sqlstate(), "53200", "under its own limit but over what the server has left: {e}");
        drop(held);
        assert_eq!(live.query("SELECT 1").unwrap().num_rows(), 1);
        assert_eq!(freed(&live), 0);
    }

    #[test]
    fn show_tables_and_psqls_table_listing_see_the_catalog() {
        let dir = tempfile::tempdir().unwrap();
        drop(Archive::open_writer(dir.path(), "test").unwrap());
        let live = LiveSql::open(dir.path()).unwrap();
        let rows = live.query("SHOW TABLES").unwrap();
        assert!(rows.num_rows() > 10);
        // psql 15's `\dt` and `\dv`, verbatim.
        let listing = |kinds: &str| {
            format!(
                "SELECT n.nspname as \"Schema\",\n  c.relname as \"Name\",\n  CASE c.relkind WHEN 'r' THEN 'table' WHEN 'v' THEN 'view' WHEN 'm' THEN 'materialized view' WHEN 'i' THEN 'index' WHEN 'S' THEN 'sequence' WHEN 't' THEN 'TOAST table' WHEN 'f' THEN 'foreign table' WHEN 'p' THEN 'partitioned table' WHEN 'I' THEN 'partitioned index' END as \"Type\",\n  pg_catalog.pg_get_userbyid(c.relowner) as \"Owner\"\nFROM pg_catalog.pg_class c\n     LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace\n     LEFT JOIN pg_catalog.pg_am am ON am.oid = c.relam\nWHERE c.relkind IN ({kinds})\n      AND n.nspname <> 'pg_catalog'\n      AND n.nspname !~ '^pg_toast'\n      AND n.nspname <> 'information_schema'\n  AND pg_catalog.pg_table_is_visible(c.oid)\nORDER BY 1,2;"
            )
        };
        let names = |rows: super::super::live::Rows| -> Vec<String> {
            let b = arrow::compute::concat_batches(&rows.schema, &rows.batches).unwrap();
            (0..b.num_rows()).map(|i| super::array_value_to_string(b.column(1), i).unwrap()).collect()
        };
        let tables = names(live.query(&listing("'r','p',''")).unwrap());
        for t in ["cells", "observations", "responses", "trials"] {
            assert!(tables.iter().any(|x| x == t), "{t} in {tables:?}");
        }
        assert!(!tables.iter().any(|x| x == "family_table"), "views are not tables");
        let views = names(live.query(&listing("'v',''")).unwrap());
        assert!(views.iter().any(|x| x == "family_table"), "{views:?}");
    }

    /// `trajectory_steps` pairs each fine-tuned checkpoint with the previous one of its model
    /// (in epoch order) as a from-scratch count does, and `trajectory_first_significant` names
    /// the earliest significant step of each family line that `family_table` shows.
    #[test]
    fn trajectory_queries_match_a_computation_from_scratch() {
        use rand::{Rng, SeedableRng};
        use std::collections::BTreeMap;
        let dir = tempfile::tempdir().unwrap();
        let archive = Archive::open_writer(dir.path(), "test").unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(19);
        let mut all: Vec<Observation> = Vec::new();
        // The base and three steps; each step drifts further (more wrong answers).
        for (step, (checkpoint, ft)) in
            [("base", false), ("checkpoint-50", true), ("checkpoint-100", true), ("checkpoint-150", true)]
                .iter()
                .enumerate()
        {
            let epoch = archive.register_checkpoint("m", checkpoint, *ft, None).unwrap();
            let mut rows = Vec::new();
            for i in 0..80 {
                for amendment in ["unmodified", "emotion:sad"] {
                    for prompt_type in ["original", "incorrect"] {
                        let wrong = rng.gen_bool(0.1 + 0.15 * step as f64);
                        rows.push(Observation {
                            response_key: format!("{checkpoint}/{i}/{amendment}/{prompt_type}"),
                            model: "m".into(),
                            checkpoint: checkpoint.to_string(),
                            checkpoint_epoch: epoch,
                            is_finetuned: *ft,
                            dataset: "trivia".into(),
                            item_key: format!("q{i}"),
                            amendment_type: amendment.into(),
                            amendment_group: amendment.split(':').next().unwrap().into(),
                            prompt_type: prompt_type.into(),
                            sample_index: 0,
                            refusal: false,
                            verdict: String::new(),
                            correct: if i == 7 { None } else { Some(!wrong) },
                        });
                    }
                }
            }
            let batch = Observation::to_batch(&rows).unwrap();
            archive.append_epoch("observation", &Partition::checkpoint("m", *checkpoint), epoch, &[batch]).unwrap();
            archive.commit_epoch(epoch, &serde_json::json!({})).unwrap();
            all.extend(rows);
        }
        let live = LiveSql::open(dir.path()).unwrap();
        let rows = live
            .query("SELECT previous_checkpoint, checkpoint, test_type, category, b, c, both_correct, both_wrong, p_exact FROM trajectory_steps")
            .unwrap();
        let b = arrow::compute::concat_batches(&rows.schema, &rows.batches).unwrap();
        let text = |c: usize, i: usize| super::array_value_to_string(b.column(c), i).unwrap();
        let mut got = BTreeMap::new();
        for i in 0..b.num_rows() {
            let counts: Vec<u64> = (4..8).map(|c| text(c, i).parse().unwrap()).collect();
            let p: Option<f64> = text(8, i).parse().ok();
            got.insert((text(0, i), text(1, i), text(2, i), text(3, i)), (counts, p));
        }
        // From scratch: consecutive fine-tuned checkpoints, answers with the same key.
        let steps = [("checkpoint-50", "checkpoint-100"), ("checkpoint-100", "checkpoint-150")];
        let mut want = BTreeMap::new();
        for (previous, current) in steps {
            let at = |c: &str| -> BTreeMap<(String, String, String), bool> {
                all.iter()
                    .filter(|o| o.checkpoint == c && o.correct.is_some())
                    .map(|o| {
                        ((o.item_key.clone(), o.amendment_type.clone(), o.prompt_type.clone()), o.correct.unwrap())
                    })
                    .collect()
            };
            let (before, after) = (at(previous), at(current));
            let mut cells: BTreeMap<(String, String), [u64; 4]> = BTreeMap::new();
            for ((item, amendment, prompt), was) in &before {
                let Some(now) = after.get(&(item.clone(), amendment.clone(), prompt.clone())) else { continue };
                let test = if prompt == "original" { "Normal" } else { "Sycophancy" };
                let cell = cells.entry((test.to_string(), amendment.clone())).or_default();
                match (was, now) {
                    (true, false) => cell[0] += 1,
                    (false, true) => cell[1] += 1,
                    (true, true) => cell[2] += 1,
                    (false, false) => cell[3] += 1,
                }
            }
            for ((test, amendment), [b, c, both, neither]) in cells {
                let p = crate::stats::mcnemar::mcnemar_exact(b, c);
                want.insert(
                    (previous.to_string(), current.to_string(), test, amendment),
                    (vec![b, c, both, neither], p),
                );
            }
        }
        assert_eq!(got.len(), want.len(), "{got:?}");
        for (k, (counts, p)) in &want {
            let (g, gp) = &got[k];
            assert_eq!(g, counts, "{k:?}");
            assert!(
                match (gp, p) {
                    (Some(a), Some(b)) => (a - b).abs() < 1e-12,
                    (a, b) => a == b,
                },
                "{k:?}: {gp:?} vs {p:?}"
            );
        }

        // The first significant step of each family line, as a scan of family_table finds it.
        let firsts = live
            .query(
                "SELECT dataset, test_type, category, first_checkpoint, looks, b, c FROM trajectory_first_significant",
            )
            .unwrap();
        let f = arrow::compute::concat_batches(&firsts.schema, &firsts.batches).unwrap();
        let table = live
            .query("SELECT dataset, test_type, category, checkpoint, checkpoint_epoch, significant, b, c FROM family_table WHERE p_exact IS NOT NULL ORDER BY checkpoint_epoch")
            .unwrap();
        let t = arrow::compute::concat_batches(&table.schema, &table.batches).unwrap();
        let cell =
            |b: &arrow::array::RecordBatch, c: usize, i: usize| super::array_value_to_string(b.column(c), i).unwrap();
        type Line = (String, String, String);
        let mut expected: BTreeMap<Line, (String, u64, String, String)> = BTreeMap::new();
        let mut looks: BTreeMap<(String, String, String), u64> = BTreeMap::new();
        for i in 0..t.num_rows() {
            let line = (cell(&t, 0, i), cell(&t, 1, i), cell(&t, 2, i));
            let n = looks.entry(line.clone()).or_default();
            *n += 1;
            if cell(&t, 5, i) == "true" && !expected.contains_key(&line) {
                expected.insert(line, (cell(&t, 3, i), *n, cell(&t, 6, i), cell(&t, 7, i)));
            }
        }
        assert!(!expected.is_empty(), "the drift makes some line significant");
        let mut found = BTreeMap::new();
        for i in 0..f.num_rows() {
            found.insert(
                (cell(&f, 0, i), cell(&f, 1, i), cell(&f, 2, i)),
                (cell(&f, 3, i), cell(&f, 4, i).parse::<u64>().unwrap(), cell(&f, 5, i), cell(&f, 6, i)),
            );
        }
        assert_eq!(found, expected);
    }
}

/// Bulk feeding gathers batches into epochs of at least `FEED_EPOCH` observations that can
/// pair (several here, and a remainder counted at the settle): the families, cells and
/// regressions equal those of every batch applied as an epoch of its own.
#[test]
fn fed_batches_gathered_into_epochs_count_as_batches_applied_one_by_one() {
    let mut batches = Vec::new();
    super::synthetic::synthetic_each(120_000, 9, 2, "warm", 1, true, |b| {
        let mut at = 0;
        while at < b.num_rows() {
            let n = 5_000.min(b.num_rows() - at);
            batches.push(b.slice(at, n));
            at += n;
        }
        Ok(())
    })
    .unwrap();
    let (mut fed, mut applied) = (StatsEngine::new().unwrap(), StatsEngine::new().unwrap());
    let mut sent_while_feeding = false;
    for b in &batches {
        fed.feed(b).unwrap();
        applied.apply(b, 1).unwrap();
        // Past the first epoch's worth, an epoch is out on the counting thread.
        sent_while_feeding |= !fed.view().settled();
    }
    assert!(sent_while_feeding);
    fed.refresh_and_refit().unwrap();
    applied.refresh().unwrap();
    applied.refit().unwrap();
    assert_eq!(sql_table(&mut fed), sql_table(&mut applied));
    let one = |engine: &mut StatsEngine, sql: &str| {
        let b = engine.query(sql).unwrap();
        concat_batches(&b[0].schema(), &b).unwrap()
    };
    for sql in [
        "SELECT * FROM cells ORDER BY model, checkpoint, dataset, amendment_type, prompt_type",
        "SELECT * FROM coefficients ORDER BY model_spec, term",
    ] {
        assert_eq!(one(&mut fed, sql), one(&mut applied, sql), "{sql}");
    }
}
