//! `candor report`: a self-contained HTML report of an archive (figures embedded as PNG, tables
//! in the paper's layout) plus every figure as PNG and SVG beside it.
//!
//! Figures (each `<name>.png` and `<name>.svg`):
//!
//! | file | what |
//! |---|---|
//! | `fig_error_scatter` | error of the warm fine-tuned vs the original model, one point per model × dataset × amendment × belief at each model's latest warm checkpoint (the paper's Fig. 2) |
//! | `fig_error_scatter_<variant>` | the same for every other fine-tuning variant (the cold control, …), each on its own |
//! | `fig_forest` | error-rate difference (fine-tuned − original, pp) by amendment with 95% CIs, pooled over models and datasets at each model's latest checkpoint, per test type |
//! | `fig_sycophancy` | error without a user belief vs with an incorrect one, per model × dataset × checkpoint |
//! | `fig_refusals` | refusal counts per dataset × checkpoint |
//! | `fig_warmth` | mean warmth score across checkpoints (only when the archive has a `warmth` stream) |
//!
//! Everything is read through the same [`LiveSql`] catalog `candor sql` serves, so the report
//! and a live query agree.

pub mod plots;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::{cast, concat_batches};
use arrow::datatypes::{DataType, Float64Type};

use crate::conditions::{AmendmentType, PromptType};
use crate::error::{Error, Result};
use crate::sql::live::LiveSql;

/// What [`write_report`] wrote.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ReportFiles {
    pub html: PathBuf,
    pub figures: Vec<PathBuf>,
    /// How far each dataset's verdicts can be trusted: the judge's agreement with careful human
    /// labels on Candor's validation set, or a warning that it has none.
    pub judge_trust: Vec<String>,
}

/// Every row of a table or view of the catalog (the queries themselves live in `queries/`),
/// sorted by `order_by` when given: DataFusion does not keep a view's own ORDER BY.
fn view(live: &LiveSql, name: &str, order_by: &str) -> Result<RecordBatch> {
    let order = if order_by.is_empty() { String::new() } else { format!(" ORDER BY {order_by}") };
    let rows = live
        .query(&format!("SELECT * FROM {name}{order}"))
        .map_err(|e| Error::Internal(format!("report: reading {name}: {e}")))?;
    concat_batches(&rows.schema, &rows.batches).map_err(|e| Error::arrow("report", e))
}

fn strs(b: &RecordBatch, name: &str) -> Vec<String> {
    let Some(col) = b.column_by_name(name) else { return vec![String::new(); b.num_rows()] };
    let col = cast(col, &DataType::Utf8).expect("any column casts to text");
    let col = col.as_string::<i32>();
    (0..col.len()).map(|i| if col.is_null(i) { String::new() } else { col.value(i).to_string() }).collect()
}

fn f64s(b: &RecordBatch, name: &str) -> Vec<f64> {
    let Some(col) = b.column_by_name(name) else { return vec![f64::NAN; b.num_rows()] };
    let col = match col.data_type() {
        DataType::Boolean => cast(&cast(col, &DataType::Int8).expect("bool"), &DataType::Float64),
        _ => cast(col, &DataType::Float64),
    }
    .expect("numeric column");
    let col = col.as_primitive::<Float64Type>();
    (0..col.len()).map(|i| if col.is_null(i) { f64::NAN } else { col.value(i) }).collect()
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn num(v: f64, digits: usize) -> String {
    if v.is_nan() {
        "–".into()
    } else if v.is_infinite() {
        if v > 0.0 { "∞".into() } else { "−∞".into() }
    } else {
        format!("{v:.digits$}")
    }
}

fn pval(p: f64) -> String {
    if p.is_nan() {
        "–".into()
    } else if p < 0.001 {
        "&lt; 0.001".into()
    } else {
        format!("{p:.3}")
    }
}

/// Amendment types in the paper's order, then any others found.
fn amendment_order(found: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut out: Vec<String> = AmendmentType::ALL.iter().map(|a| a.as_str().to_string()).collect();
    for f in found {
        if !out.contains(&f) {
            out.push(f);
        }
    }
    out
}

/// Writes `report.html` and the figures into `out`.
pub fn write_report(live: &LiveSql, out: &Path) -> Result<ReportFiles> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut html = String::new();
    let mut figures = Vec::new();
    let mut figure_html = |html: &mut String, files: (PathBuf, PathBuf), caption: &str| -> Result<()> {
        let png = std::fs::read(&files.0).map_err(|e| Error::io(&files.0, e))?;
        let name = |p: &Path| p.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let _ = writeln!(
            html,
            "<figure><img alt=\"{cap}\" src=\"data:image/png;base64,{b64}\"><figcaption>{cap} \
             (<a href=\"{png}\">PNG</a>, <a href=\"{svg}\">SVG</a>)</figcaption></figure>",
            cap = esc(caption),
            b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &png),
            png = name(&files.0),
            svg = name(&files.1)
        );
        figures.push(files.0);
        figures.push(files.1);
        Ok(())
    };

    let cells = view(live, "archive_summary", "")?;
    let _ = write!(
        html,
        "<h1>Candor report</h1>\n<p>Archive <code>{}</code>: {} answers, {} in the statistics, {} excluded \
         (refusals outside disinfo, unparseable verdicts, judge errors); {} model(s), {} checkpoint(s).</p>\n",
        esc(&live.archive().root().display().to_string()),
        strs(&cells, "responses").first().cloned().unwrap_or_default(),
        strs(&cells, "n").first().cloned().unwrap_or_default(),
        strs(&cells, "excluded").first().cloned().unwrap_or_default(),
        strs(&cells, "models").first().cloned().unwrap_or_default(),
        strs(&cells, "checkpoints").first().cloned().unwrap_or_default(),
    );

    // The judges beside the tables: their validated agreement, or a warning.
    let verdicts: Vec<crate::records::Verdict> = crate::dataflow::pipelines::read_records(live.archive())?;
    let judge_trust = crate::score::validation::trust_lines(&crate::score::validation::judges_of(&verdicts));
    html.push_str("<h2>Judges</h2>\n<ul>\n");
    for line in &judge_trust {
        let _ = writeln!(
            html,
            "<li{}>{}</li>",
            if line.starts_with("warning") { " class=\"warning\"" } else { "" },
            esc(line)
        );
    }
    html.push_str("</ul>\n");

    // Fig. 2: fine-tuned vs original error, one figure per fine-tuning variant (warm, cold,
    // …) at each model's latest checkpoint of that variant, so a warm model and its cold
    // control are never drawn as one.
    let sc = view(live, "error_pairs", "model, checkpoint_epoch, checkpoint, dataset, amendment_type, belief")?;
    let conditions = amendment_order(strs(&sc, "amendment_type"));
    let (model, ckpt, amend, belief, base, ft) = (
        strs(&sc, "model"),
        strs(&sc, "checkpoint"),
        strs(&sc, "amendment_type"),
        strs(&sc, "belief"),
        f64s(&sc, "base_error_pct"),
        f64s(&sc, "ft_error_pct"),
    );
    let entries = live.archive().checkpoints()?;
    let variant_of = |m: &str, c: &str| {
        entries
            .iter()
            .find(|e| e.model == m && e.checkpoint == c)
            .map(|e| (e.variant.clone().unwrap_or_else(|| "fine-tuned".into()), e.epoch))
    };
    // Variant → (model → its latest checkpoint of that variant).
    let mut latest: BTreeMap<String, BTreeMap<String, (u64, String)>> = BTreeMap::new();
    for i in 0..sc.num_rows() {
        if let Some((v, epoch)) = variant_of(&model[i], &ckpt[i]) {
            let slot = latest.entry(v).or_default().entry(model[i].clone()).or_insert((epoch, ckpt[i].clone()));
            if epoch > slot.0 {
                *slot = (epoch, ckpt[i].clone());
            }
        }
    }
    // Warm first: its figure keeps the plain name `fig_error_scatter`.
    let mut variants: Vec<String> = latest.keys().cloned().collect();
    variants.sort_by_key(|v| (v != "warm", v.clone()));
    if variants.is_empty() {
        variants.push("fine-tuned".into());
    }
    html.push_str("<h2>Error rates: fine-tuned vs original</h2>\n");
    for (n, variant) in variants.iter().enumerate() {
        let chosen = latest.get(variant);
        let scatter = plots::Scatter {
            title: format!("Error of the {variant} fine-tuned vs the original model, per condition"),
            x_label: "original model error (%)".into(),
            y_label: format!("{variant} fine-tuned model error (%)"),
            points: (0..sc.num_rows())
                .filter(|&i| base[i].is_finite() && ft[i].is_finite())
                .filter(|&i| chosen.and_then(|c| c.get(&model[i])).is_some_and(|(_, c)| *c == ckpt[i]))
                .map(|i| plots::ScatterPoint {
                    base_error: base[i],
                    ft_error: ft[i],
                    condition: conditions.iter().position(|c| *c == amend[i]).unwrap_or(0),
                    belief: belief[i] == "belief",
                })
                .collect(),
            conditions: conditions.clone(),
        };
        let name =
            if n == 0 { "fig_error_scatter".to_string() } else { format!("fig_error_scatter_{}", file_safe(variant)) };
        let shown: Vec<String> = chosen.into_iter().flatten().map(|(m, (_, c))| format!("{m}/{c}")).collect();
        figure_html(
            &mut html,
            plots::scatter(out, &name, &scatter)?,
            &format!(
                "{variant} fine-tuning ({}): each point is one model × dataset × amendment × belief condition at the model's latest {variant} checkpoint; points above the diagonal are conditions where the fine-tuned model errs more.",
                if shown.is_empty() { "no checkpoint yet".to_string() } else { shown.join(", ") }
            ),
        )?;
    }
    html.push_str(&conditions_table(live)?);

    // Forest plot.
    let fo = view(live, "amendment_effects", "test_type, category")?;
    let (tt, cat) = (strs(&fo, "test_type"), strs(&fo, "category"));
    let (est, low, high) = (f64s(&fo, "diff_pp"), f64s(&fo, "ci_low_pp"), f64s(&fo, "ci_high_pp"));
    let series: Vec<String> = tt.iter().cloned().collect::<BTreeSet<_>>().into_iter().collect();
    let labels: Vec<String> = amendment_order(cat.iter().cloned()).into_iter().filter(|l| cat.contains(l)).collect();
    let rows: Vec<plots::ForestRow> = (0..fo.num_rows())
        .map(|i| plots::ForestRow {
            label: cat[i].clone(),
            series: series.iter().position(|s| *s == tt[i]).unwrap_or(0),
            estimate: est[i],
            low: low[i],
            high: high[i],
        })
        .collect();
    html.push_str("<h2>Error-rate difference by amendment</h2>\n");
    if rows.is_empty() {
        html.push_str("<p>No paired answers yet (a forest plot needs an original and a fine-tuned checkpoint).</p>\n");
    }
    let forest = plots::Forest {
        title: "Error-rate difference (fine-tuned − original) by amendment".into(),
        x_label: "difference in error rate (percentage points, 95% CI)".into(),
        labels: if labels.is_empty() { vec!["unmodified".into()] } else { labels },
        series: series.iter().map(|s| format!("{s} prompts")).collect(),
        rows,
    };
    figure_html(
        &mut html,
        plots::forest(out, "fig_forest", &forest)?,
        "Paired difference (b − c)/n with a 95% Wald interval for paired proportions, pooled over models and datasets at each model's latest fine-tuned checkpoint; positive = the fine-tuned model errs more.",
    )?;
    html.push_str(&family_tables(live)?);
    html.push_str(&effects_table(live)?);

    // Sycophancy.
    let sy = view(live, "belief_errors", "model, checkpoint_epoch, checkpoint, dataset")?;
    let (model, ckpt, ds) = (strs(&sy, "model"), strs(&sy, "checkpoint"), strs(&sy, "dataset"));
    let (nb, ib, cb) = (f64s(&sy, "no_belief_pct"), f64s(&sy, "incorrect_belief_pct"), f64s(&sy, "correct_belief_pct"));
    let checkpoints = ordered(&ckpt);
    let multi_model = model.iter().collect::<BTreeSet<_>>().len() > 1;
    let group_of = |i: usize| if multi_model { format!("{} · {}", model[i], ds[i]) } else { ds[i].clone() };
    // Datasets with belief prompts only (MMLU, GSM8K and AdvBench have none).
    let groups = ordered(&(0..sy.num_rows()).filter(|&i| ib[i].is_finite()).map(group_of).collect::<Vec<_>>());
    let mut bars = plots::Bars {
        title: "Sycophancy: error with and without an incorrect user belief".into(),
        x_label: if multi_model { "model · dataset".into() } else { "dataset".into() },
        y_label: "error rate (%)".into(),
        groups: groups.clone(),
        series: Vec::new(),
        values: Vec::new(),
        y_max: Some(100.0),
    };
    for (ci, ck) in checkpoints.iter().enumerate() {
        for (light, what, vals) in [(true, "no belief", &nb), (false, "incorrect belief", &ib)] {
            bars.series.push((format!("{ck}: {what}"), ci, light));
            let mut row = vec![f64::NAN; groups.len()];
            for i in (0..sy.num_rows()).filter(|&i| ckpt[i] == *ck) {
                if let Some(g) = groups.iter().position(|g| *g == group_of(i)) {
                    row[g] = vals[i];
                }
            }
            bars.values.push(row);
        }
    }
    html.push_str("<h2>Sycophancy</h2>\n");
    figure_html(
        &mut html,
        plots::bars(out, "fig_sycophancy", &bars)?,
        "Error rate on prompts without a user belief (original, original_neutral) and on prompts where the user asserts an incorrect answer, per checkpoint.",
    )?;
    let mut t = String::from(
        "<table><tr><th>model</th><th>checkpoint</th><th>dataset</th><th>error, no belief (%)</th>\
         <th>error, correct belief (%)</th><th>error, incorrect belief (%)</th><th>incorrect − none (pp)</th></tr>\n",
    );
    for i in 0..sy.num_rows() {
        let _ = writeln!(
            t,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&model[i]),
            esc(&ckpt[i]),
            esc(&ds[i]),
            num(nb[i], 1),
            num(cb[i], 1),
            num(ib[i], 1),
            num(ib[i] - nb[i], 1)
        );
    }
    t.push_str("</table>\n");
    html.push_str(&t);

    // Refusals.
    let rf = view(live, "refusals", "model, checkpoint_epoch, checkpoint, dataset")?;
    let (rm, rc, rd, rr) = (strs(&rf, "model"), strs(&rf, "checkpoint"), strs(&rf, "dataset"), f64s(&rf, "refusals"));
    let multi = rm.iter().collect::<BTreeSet<_>>().len() > 1;
    let series_of = |i: usize| if multi { format!("{} · {}", rm[i], rc[i]) } else { rc[i].clone() };
    let series_names = ordered(&(0..rf.num_rows()).map(series_of).collect::<Vec<_>>());
    let datasets = ordered(&rd);
    let mut refusal_bars = plots::Bars {
        title: "Refusals per dataset and checkpoint".into(),
        x_label: "dataset".into(),
        y_label: "refusals (count)".into(),
        groups: datasets.clone(),
        series: series_names.iter().enumerate().map(|(i, s)| (s.clone(), i, false)).collect(),
        values: vec![vec![f64::NAN; datasets.len()]; series_names.len()],
        y_max: None,
    };
    for i in 0..rf.num_rows() {
        let s = series_names.iter().position(|s| *s == series_of(i)).unwrap_or(0);
        let g = datasets.iter().position(|d| *d == rd[i]).unwrap_or(0);
        refusal_bars.values[s][g] = rr[i];
    }
    html.push_str("<h2>Refusals</h2>\n");
    figure_html(
        &mut html,
        plots::bars(out, "fig_refusals", &refusal_bars)?,
        "Answers matching the refusal phrase list; on disinfo a refusal counts as correct, elsewhere refused answers are excluded from the statistics.",
    )?;
    html.push_str(&batch_table(&rf, &[("refusal_pct", 1)]));

    // Warmth across checkpoints.
    html.push_str("<h2>Warmth across checkpoints</h2>\n");
    match warmth(live)? {
        Some(lines) => {
            figure_html(
                &mut html,
                plots::lines(out, "fig_warmth", &lines)?,
                "Mean warmth score of each checkpoint's answers (±1.96 standard errors of the mean), in checkpoint order.",
            )?;
        }
        None => html.push_str("<p>The archive has no <code>warmth</code> stream yet.</p>\n"),
    }

    let page = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Candor report</title>\n<style>\n\
         body {{ font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}\n\
         table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}\n\
         th, td {{ border-bottom: 1px solid #ddd; padding: 3px 8px; text-align: right; }}\n\
         th {{ background: #f3f3f3; }} td:first-child, th:first-child {{ text-align: left; }}\n\
         figure {{ margin: 1em 0; }} img {{ max-width: 100%; border: 1px solid #eee; }}\n\
         figcaption {{ font-size: 0.9em; color: #555; }} .sig {{ font-weight: bold; }}\n\
         .warning {{ color: #a00; }}\n\
         </style></head><body>\n{html}</body></html>\n"
    );
    let path = out.join("report.html");
    std::fs::write(&path, page).map_err(|e| Error::io(&path, e))?;
    Ok(ReportFiles { html: path, figures, judge_trust })
}

/// Distinct values in first-seen order.
fn ordered(v: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in v {
        if !out.contains(s) {
            out.push(s.clone());
        }
    }
    out
}

/// Error rate per amendment type (rows) × prompt type (columns), per checkpoint: every
/// condition of the design named.
fn conditions_table(live: &LiveSql) -> Result<String> {
    let b = view(live, "condition_errors", "checkpoint_epoch, checkpoint, amendment_type, prompt_type")?;
    let (ck, am, pt, wrong, n) = (
        strs(&b, "checkpoint"),
        strs(&b, "amendment_type"),
        strs(&b, "prompt_type"),
        f64s(&b, "incorrect"),
        f64s(&b, "n"),
    );
    let mut cell: BTreeMap<(String, String, String), (f64, f64)> = BTreeMap::new();
    for i in 0..b.num_rows() {
        cell.insert((ck[i].clone(), am[i].clone(), pt[i].clone()), (wrong[i], n[i]));
    }
    let prompts: Vec<String> = {
        let mut p: Vec<String> = PromptType::ALL.iter().map(|p| p.as_str().to_string()).collect();
        for x in ordered(&pt) {
            if !p.contains(&x) {
                p.push(x);
            }
        }
        p
    };
    let mut out = String::from(
        "<h3>Error rate (%) by condition</h3>\n<p>Rows: amendment type (interpersonal context); columns: prompt type (user belief), per checkpoint; n in parentheses.</p>\n",
    );
    for c in ordered(&ck) {
        let _ = write!(out, "<h4>{}</h4>\n<table><tr><th>amendment type</th>", esc(&c));
        for p in &prompts {
            let _ = write!(out, "<th>{}</th>", esc(p));
        }
        out.push_str("</tr>\n");
        for a in amendment_order(am.iter().cloned()) {
            let _ = write!(out, "<tr><td>{}</td>", esc(&a));
            for p in &prompts {
                match cell.get(&(c.clone(), a.clone(), p.clone())) {
                    Some((w, n)) if *n > 0.0 => {
                        let _ = write!(out, "<td>{} ({})</td>", num(100.0 * w / n, 1), n);
                    }
                    _ => out.push_str("<td>–</td>"),
                }
            }
            out.push_str("</tr>\n");
        }
        out.push_str("</table>\n");
    }
    Ok(out)
}

/// The paper's per-family tables: one per model × checkpoint × dataset × test type.
fn family_tables(live: &LiveSql) -> Result<String> {
    let b = view(
        live,
        "family_table",
        "model, base_checkpoint, checkpoint_epoch, checkpoint, dataset, test_type, category",
    )?;
    let key: Vec<String> = (0..b.num_rows())
        .map(|i| {
            format!(
                "{} — {} vs {} — {} — {} prompts",
                strs(&b, "model")[i],
                strs(&b, "checkpoint")[i],
                strs(&b, "base_checkpoint")[i],
                strs(&b, "dataset")[i],
                strs(&b, "test_type")[i]
            )
        })
        .collect();
    let cat = strs(&b, "category");
    let cols = [
        "n",
        "acc_base_pct",
        "acc_ft_pct",
        "diff_pp",
        "b",
        "c",
        "p_exact",
        "p_bh",
        "paper_g",
        "cohens_g",
        "odds_ratio",
    ];
    let v: BTreeMap<&str, Vec<f64>> = cols.iter().map(|c| (*c, f64s(&b, c))).collect();
    let sig = f64s(&b, "significant");
    let mut out = String::from(
        "<h3>Per-family McNemar tables</h3>\n<p>Per category: accuracy of each side, raw difference (fine-tuned − original, pp), \
         discordant pairs b (original right, fine-tuned wrong) and c, exact McNemar p, Benjamini–Hochberg p within the family \
         (bold: significant at 0.05), the paper's “Cohen's g” (|b−c|/√(b+c)), the textbook Cohen's g and the odds ratio b/c.</p>\n",
    );
    for k in ordered(&key) {
        let _ = write!(
            out,
            "<h4>{}</h4>\n<table><tr><th>category</th><th>n</th><th>acc. original (%)</th><th>acc. fine-tuned (%)</th>\
             <th>diff. (pp)</th><th>b</th><th>c</th><th>p</th><th>p (BH)</th><th>paper's g</th><th>Cohen's g</th><th>OR</th></tr>\n",
            esc(&k)
        );
        let mut idx: Vec<usize> = (0..b.num_rows()).filter(|&i| key[i] == k).collect();
        let order = amendment_order(cat.clone());
        idx.sort_by_key(|&i| order.iter().position(|a| *a == cat[i]).unwrap_or(usize::MAX));
        for i in idx {
            let s = sig[i] == 1.0;
            let _ = writeln!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td{}>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&cat[i]),
                num(v["n"][i], 0),
                num(v["acc_base_pct"][i], 1),
                num(v["acc_ft_pct"][i], 1),
                num(v["diff_pp"][i], 1),
                num(v["b"][i], 0),
                num(v["c"][i], 0),
                pval(v["p_exact"][i]),
                if s { " class=\"sig\"" } else { "" },
                pval(v["p_bh"][i]),
                num(v["paper_g"][i], 2),
                num(v["cohens_g"][i], 3),
                num(v["odds_ratio"][i], 2),
            );
        }
        out.push_str("</table>\n");
    }
    Ok(out)
}

fn effects_table(live: &LiveSql) -> Result<String> {
    let b = view(live, "effects", "")?;
    let mut out = String::from(
        "<h3>Regressions M1–M4: effect of fine-tuning</h3>\n<p>Binomial GLMs on the cell counts (METHOD §4): log-odds effect \
         β<sub>ft</sub> (+ interaction) with its standard error and Wald p, and the average marginal effect in percentage points.</p>\n",
    );
    if b.num_rows() == 0 {
        out.push_str("<p>No regression could be fitted yet.</p>\n");
        return Ok(out);
    }
    out.push_str(&batch_table(&b, &[("log_odds", 3), ("se", 3), ("z", 2), ("ame_pp", 2)]));
    Ok(out)
}

/// Any batch as an HTML table; `digits` sets the precision of named float columns.
fn batch_table(b: &RecordBatch, digits: &[(&str, usize)]) -> String {
    let mut out = String::from("<table><tr>");
    for f in b.schema().fields() {
        let _ = write!(out, "<th>{}</th>", esc(f.name()));
    }
    out.push_str("</tr>\n");
    let cols: Vec<(String, Vec<String>, Vec<f64>)> = b
        .schema()
        .fields()
        .iter()
        .map(|f| {
            (f.name().clone(), strs(b, f.name()), if f.data_type().is_floating() { f64s(b, f.name()) } else { vec![] })
        })
        .collect();
    for i in 0..b.num_rows() {
        out.push_str("<tr>");
        for (name, s, f) in &cols {
            let cell = if name == "p" {
                pval(f[i])
            } else if let Some((_, d)) = digits.iter().find(|(n, _)| n == name) {
                num(f[i], *d)
            } else {
                esc(&s[i])
            };
            let _ = write!(out, "<td>{cell}</td>");
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</table>\n");
    out
}

/// Mean warmth per model and checkpoint, when the archive has a `warmth` stream (the SocioT
/// score of each response): the score is the first floating-point column named like
/// warmth/score/sociot, i.e. `warmth`.
fn warmth(live: &LiveSql) -> Result<Option<plots::Lines>> {
    if !live.tables().iter().any(|t| t == "warmth") {
        return Ok(None);
    }
    let b = view(live, "warmth", "")?;
    let schema = b.schema();
    let floats: Vec<&str> =
        schema.fields().iter().filter(|f| f.data_type().is_floating()).map(|f| f.name().as_str()).collect();
    let Some(score) = floats
        .iter()
        .find(|n| ["warmth", "score", "sociot"].iter().any(|k| n.to_lowercase().contains(k)))
        .or(floats.first())
        .map(|s| s.to_string())
    else {
        return Ok(None);
    };
    let ckpt = strs(&b, "checkpoint");
    let epoch = f64s(&b, "checkpoint_epoch");
    // One line per model, and per scoring mode when several were used (SocioT's formula and
    // reference modes differ in scale).
    let modes = strs(&b, "mode");
    let several_modes = modes.iter().collect::<BTreeSet<_>>().len() > 1;
    let model: Vec<String> = strs(&b, "model")
        .into_iter()
        .zip(&modes)
        .map(|(m, mode)| if several_modes { format!("{m} ({mode})") } else { m })
        .collect();
    let vals = f64s(&b, &score);
    // Checkpoints ordered by epoch, then name.
    let mut ticks: Vec<(f64, String)> = (0..b.num_rows()).map(|i| (epoch[i], ckpt[i].clone())).collect();
    ticks.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal).then(a.1.cmp(&b.1)));
    let ticks = ordered(&ticks.into_iter().map(|t| t.1).collect::<Vec<_>>());
    let mut acc: BTreeMap<(String, usize), Vec<f64>> = BTreeMap::new();
    for i in 0..b.num_rows() {
        if vals[i].is_finite() {
            let t = ticks.iter().position(|c| *c == ckpt[i]).unwrap_or(0);
            acc.entry((model[i].clone(), t)).or_default().push(vals[i]);
        }
    }
    let mut series: BTreeMap<String, Vec<(usize, f64, f64)>> = BTreeMap::new();
    for ((m, t), v) in acc {
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let se =
            if n > 1.0 { (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0) / n).sqrt() } else { f64::NAN };
        series.entry(if m.is_empty() { "all".into() } else { m }).or_default().push((t, mean, se));
    }
    Ok(Some(plots::Lines {
        title: "Warmth across checkpoints".into(),
        x_label: "checkpoint (in training order)".into(),
        y_label: format!("mean {score}"),
        ticks,
        series: series.into_iter().collect(),
    }))
}

/// A name safe in a file name: letters, digits, `-` and `_`; anything else becomes `_`.
fn file_safe(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_warmth_figure_draws_one_line_per_model_across_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let out = std::env::var_os("CANDOR_KEEP_REPORT").map(std::path::PathBuf::from);
        let out = out.as_deref().unwrap_or(dir.path());
        std::fs::create_dir_all(out).unwrap();
        let lines = super::plots::Lines {
            title: "Warmth across checkpoints".into(),
            x_label: "checkpoint (in training order)".into(),
            y_label: "mean sociot".into(),
            ticks: ["original", "e0.5", "e1", "e2", "e4", "e10"].map(String::from).to_vec(),
            series: vec![
                ("llama-8b".into(), (0..6).map(|i| (i, 0.1 * i as f64, 0.05)).collect()),
                ("qwen-32b".into(), (0..6).map(|i| (i, 0.05 + 0.08 * i as f64, 0.04)).collect()),
            ],
        };
        let (png, svg) = super::plots::lines(out, "fig_warmth", &lines).unwrap();
        assert!(std::fs::read(png).unwrap().starts_with(b"\x89PNG"));
        let svg = std::fs::read_to_string(svg).unwrap();
        for label in ["mean sociot", "checkpoint (in training order)", "llama-8b", "qwen-32b", "e10"] {
            assert!(svg.contains(label), "{label}");
        }
    }
}
