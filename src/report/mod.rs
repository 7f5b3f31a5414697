//! `candor report`: a self-contained HTML report of an archive (figures embedded as PNG, tables
//! in the paper's layout) plus every figure as PNG and SVG beside it.
//!
//! Figures (each `<name>.png` and `<name>.svg`):
//!
//! | file | what |
//! |---|---|
//! | `fig_error_scatter` | error of the warm fine-tuned vs the original model, one point per model × dataset × amendment × belief at each model's latest warm checkpoint (the paper's Fig. 2) |
//! | `fig_error_scatter_<variant>` | the same for every other fine-tuning variant (the cold control, …), each on its own |
//! | `fig_forest` | error-rate difference (variant − original, pp, the variant named as configured) by amendment with 95% CIs, pooled over models and datasets at each model's latest compared checkpoint, per test type |
//! | `fig_sycophancy` | error without a user belief vs with an incorrect one, per model × dataset × checkpoint |
//! | `fig_refusals` | refusal counts per dataset × checkpoint |
//! | `fig_warmth` | mean warmth score across checkpoints (only when the archive has a `warmth` stream) |
//!
//! The per-family tables carry the paper's statistics and, beside them, Wilson intervals of each
//! accuracy, Newcombe's paired interval of the difference, the mid-p McNemar value and each
//! family's minimum detectable difference (docs/statistics.md). Every b and c count opens the
//! pairs behind it ([`drill`]). With a second judge's archive (`--second-judge`, e.g. the output
//! of `candor rescore`), each cell also shows Cohen's kappa between the judges on its answers and
//! is flagged when its Benjamini–Hochberg significance differs between them
//! (`queries/judge_cells.sql`).
//!
//! Checkpoints are named by their variant as configured (`warm system prompt`, `warm fine-tune,
//! epoch 2`), never called "fine-tuned" when only a system prompt differs; points of small cells
//! carry their n.
//!
//! Everything is read through the same [`LiveSql`] catalog `candor sql` serves, so the report
//! and a live query agree.

pub mod browser;
pub mod drill;
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
    /// Tables written beside the report (`judge_cells.csv` with a second judge).
    pub tables: Vec<PathBuf>,
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

/// Cells with fewer answers than this carry their n in figures.
const SMALL_N: f64 = 30.0;

/// The honest name of each (model, checkpoint): its variant as configured when the archive
/// recorded one, else "fine-tuned" or "original".
fn variant_labels(live: &LiveSql) -> Result<BTreeMap<(String, String), String>> {
    Ok(live
        .archive()
        .checkpoints()?
        .into_iter()
        .map(|e| {
            let label = e.variant.unwrap_or_else(|| if e.is_finetuned { "fine-tuned" } else { "original" }.into());
            ((e.model, e.checkpoint), label)
        })
        .collect())
}

/// Writes `report.html` and the figures into `out`. With `second_judge` (the same answers
/// judged again, e.g. by `candor rescore`), the family tables show per cell the agreement of the
/// two judges and flag cells whose significance depends on the judge.
pub fn write_report(live: &LiveSql, out: &Path, second_judge: Option<&LiveSql>) -> Result<ReportFiles> {
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
    let verdicts: Vec<crate::records::Verdict> = crate::archive::read_records(live.archive())?;
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
    let (n_base, n_ft) = (f64s(&sc, "n_base"), f64s(&sc, "n_ft"));
    let entries = live.archive().checkpoints()?;
    let variant_names = variant_labels(live)?;
    let variant_of = |m: &str, c: &str| {
        entries.iter().find(|e| e.model == m && e.checkpoint == c).map(|e| {
            (variant_names.get(&(e.model.clone(), e.checkpoint.clone())).cloned().unwrap_or_default(), e.epoch)
        })
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
    variants.sort_by_key(|v| (!v.starts_with("warm"), v.clone()));
    if variants.is_empty() {
        variants.push("fine-tuned".into());
    }
    html.push_str("<h2>Error rates: each variant vs the original model</h2>\n");
    if variants.iter().any(|v| v.contains("system prompt")) {
        html.push_str(
            "<p class=\"note\">A <em>system prompt</em> variant is the paper's system-prompt control: the original \
             weights, told by a system prompt to be warm (or cold). It is not a fine-tuned model, and its results say \
             nothing about what fine-tuning does.</p>\n",
        );
    }
    for (n, variant) in variants.iter().enumerate() {
        let chosen = latest.get(variant);
        let scatter = plots::Scatter {
            title: format!("Error with the {variant} vs the original model, per condition"),
            x_label: "original model error (%)".into(),
            y_label: format!("{variant}: error (%)"),
            points: (0..sc.num_rows())
                .filter(|&i| base[i].is_finite() && ft[i].is_finite())
                .filter(|&i| chosen.and_then(|c| c.get(&model[i])).is_some_and(|(_, c)| *c == ckpt[i]))
                .map(|i| plots::ScatterPoint {
                    base_error: base[i],
                    ft_error: ft[i],
                    condition: conditions.iter().position(|c| *c == amend[i]).unwrap_or(0),
                    belief: belief[i] == "belief",
                    n: (n_base[i].min(n_ft[i]) < SMALL_N).then_some(n_base[i].min(n_ft[i]) as u64),
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
                "{variant} ({}): each point is one model × dataset × amendment × belief condition at the model's latest {variant} checkpoint; points above the diagonal are conditions where the {variant} errs more. Points of cells with fewer than {SMALL_N} answers are labelled with their n.",
                if shown.is_empty() { "no checkpoint yet".to_string() } else { shown.join(", ") }
            ),
        )?;
    }
    html.push_str(&conditions_table(live)?);

    // The forest plot and the regressions compare each model's latest compared checkpoint with
    // its original: name those checkpoints by their variant, never a generic "fine-tuned".
    let mut compared: BTreeMap<String, (u64, String)> = BTreeMap::new();
    for e in entries.iter().filter(|e| e.is_finetuned) {
        let slot = compared.entry(e.model.clone()).or_insert((e.epoch, e.checkpoint.clone()));
        if e.epoch > slot.0 {
            *slot = (e.epoch, e.checkpoint.clone());
        }
    }
    let mut compared_variants: Vec<String> = Vec::new();
    for (m, (_, c)) in &compared {
        let v = variant_names.get(&(m.clone(), c.clone())).cloned().unwrap_or_else(|| c.clone());
        if !compared_variants.contains(&v) {
            compared_variants.push(v);
        }
    }
    let compared_name =
        if compared_variants.is_empty() { "variant".to_string() } else { compared_variants.join(" / ") };
    let compared_list = compared.iter().map(|(m, (_, c))| format!("{m}/{c}")).collect::<Vec<_>>().join(", ");

    // Forest plot.
    let fo = view(live, "amendment_effects", "test_type, category")?;
    let (tt, cat) = (strs(&fo, "test_type"), strs(&fo, "category"));
    let (est, low, high) = (f64s(&fo, "diff_pp"), f64s(&fo, "ci_low_pp"), f64s(&fo, "ci_high_pp"));
    let forest_n = f64s(&fo, "n");
    let series: Vec<String> = tt.iter().cloned().collect::<BTreeSet<_>>().into_iter().collect();
    let labels: Vec<String> = amendment_order(cat.iter().cloned()).into_iter().filter(|l| cat.contains(l)).collect();
    let rows: Vec<plots::ForestRow> = (0..fo.num_rows())
        .map(|i| plots::ForestRow {
            label: cat[i].clone(),
            series: series.iter().position(|s| *s == tt[i]).unwrap_or(0),
            estimate: est[i],
            low: low[i],
            high: high[i],
            n: (forest_n[i] < SMALL_N).then_some(forest_n[i] as u64),
        })
        .collect();
    html.push_str("<h2>Error-rate difference by amendment</h2>\n");
    if rows.is_empty() {
        html.push_str("<p>No paired answers yet (a forest plot needs an original and a fine-tuned checkpoint).</p>\n");
    }
    let forest = plots::Forest {
        title: format!("Error-rate difference ({compared_name} − original) by amendment"),
        x_label: "difference in error rate (percentage points, 95% CI)".into(),
        labels: if labels.is_empty() { vec!["unmodified".into()] } else { labels },
        series: series.iter().map(|s| format!("{s} prompts")).collect(),
        rows,
    };
    figure_html(
        &mut html,
        plots::forest(out, "fig_forest", &forest)?,
        &format!(
            "Paired difference (b − c)/n with a 95% Wald interval for paired proportions, pooled over models and datasets at each model's latest compared checkpoint ({}); positive = the {compared_name} errs more. Rows pooled from fewer than 30 pairs show their n.",
            if compared_list.is_empty() { "none yet" } else { &compared_list }
        ),
    )?;
    let (tables, block, judge_cells) = family_tables(live, second_judge, &variant_names)?;
    html.push_str(&tables);
    let mut written = Vec::new();
    if let Some(cells) = judge_cells {
        let path = out.join("judge_cells.csv");
        let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        arrow::csv::WriterBuilder::new()
            .with_header(true)
            .build(file)
            .write(&cells)
            .map_err(|e| Error::arrow("judge_cells.csv", e))?;
        written.push(path);
    }
    html.push_str(&effects_table(live, &compared_name, &compared_list)?);

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
    html.push_str(&batch_table(&with_variant(&rf, &variant_names)?, &[("refusal_pct", 1)]));

    // Accuracy and discordant pairs step by step (a training run's checkpoints, in order).
    if let Some((accuracy, discordant)) = trajectory(live)? {
        html.push_str("<h2>Across checkpoints</h2>\n");
        figure_html(
            &mut html,
            plots::lines(out, "fig_trajectory_accuracy", &accuracy)?,
            "Accuracy of each checkpoint compared with its base, on the pairs the two share (Normal test, pooled over amendment types), per dataset, in checkpoint order; the step-against-step pairing is the live SQL view trajectory_steps.",
        )?;
        figure_html(
            &mut html,
            plots::lines(out, "fig_trajectory_discordant", &discordant)?,
            "Discordant pairs against the base at each checkpoint (Normal test, pooled over amendment types): b = right at the base and wrong at the checkpoint, c = the reverse.",
        )?;
    }

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
         body {{ font-family: sans-serif; max-width: 1400px; margin: 2em auto; color: #222; }}\n\
         table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}\n\
         th, td {{ border-bottom: 1px solid #ddd; padding: 3px 8px; text-align: right; }}\n\
         th {{ background: #f3f3f3; }} td:first-child, th:first-child {{ text-align: left; }}\n\
         figure {{ margin: 1em 0; }} img {{ max-width: 100%; border: 1px solid #eee; }}\n\
         figcaption {{ font-size: 0.9em; color: #555; }} .sig {{ font-weight: bold; }}\n\
         .warning {{ color: #a00; }}\n\
         {style}</style></head><body>\n{html}\n\
         <div id=\"drill\" hidden data-state=\"closed\"><div class=\"drill-head\"><span class=\"drill-title\"></span>\
         <button class=\"drill-close\" aria-label=\"close\">close ✕</button></div><div class=\"drill-body\"></div></div>\n\
         <script type=\"application/octet-stream\" id=\"drill-data\" data-pairs=\"{pairs}\">{data}</script>\n\
         <script>{script}</script>\n</body></html>\n",
        style = drill::STYLE,
        pairs = block.len(),
        data = block.encode()?,
        script = drill::SCRIPT,
    );
    let path = out.join("report.html");
    std::fs::write(&path, page).map_err(|e| Error::io(&path, e))?;
    Ok(ReportFiles { html: path, figures, judge_trust, tables: written })
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

/// A family-table cell: (model, base checkpoint, checkpoint, dataset, test type, category).
type CellKey = (String, String, String, String, String, String);

fn cell_keys(b: &RecordBatch) -> Vec<CellKey> {
    let cols: Vec<Vec<String>> = ["model", "base_checkpoint", "checkpoint", "dataset", "test_type", "category"]
        .iter()
        .map(|c| strs(b, c))
        .collect();
    (0..b.num_rows())
        .map(|i| {
            (
                cols[0][i].clone(),
                cols[1][i].clone(),
                cols[2][i].clone(),
                cols[3][i].clone(),
                cols[4][i].clone(),
                cols[5][i].clone(),
            )
        })
        .collect()
}

/// What a second judge says about each cell: kappa with the first judge on the cell's answers,
/// the answers it could not label, and its own BH significance.
struct SecondJudge {
    kappa: BTreeMap<CellKey, (Option<f64>, u64)>,
    significant: BTreeMap<CellKey, bool>,
    /// The rows of `judge_cells.sql`.
    cells: RecordBatch,
}

/// A second judge's archive must hold this archive's answers judged again (what `candor rescore`
/// writes): answers under the same response keys, with the same text. Another study's archive
/// (no key in common) or another run of this study (the same keys, other answers) would give a
/// meaningless kappa and flag cells for reasons that have nothing to do with the judge.
fn check_same_answers(live: &LiveSql, second: &LiveSql) -> Result<()> {
    let outputs = |l: &LiveSql| -> Result<std::collections::HashMap<String, String>> {
        let b = view(l, "responses", "")?;
        Ok(strs(&b, "response_key").into_iter().zip(strs(&b, "output")).collect())
    };
    let (mine, theirs) = (outputs(live)?, outputs(second)?);
    let at = crate::error::Location::file(second.archive().root());
    let first = live.archive().root().display().to_string();
    let shared: Vec<&String> = mine.keys().filter(|k| theirs.contains_key(*k)).collect();
    if shared.is_empty() && !mine.is_empty() {
        return Err(Error::input(
            at,
            format!(
                "--second-judge: holds none of the {} answers of {first} (no response key in common); a second \
                 judge's archive is this archive re-scored (`candor rescore {first} --out DIR --judge …`)",
                mine.len()
            ),
        ));
    }
    let differ: Vec<&String> = shared.into_iter().filter(|k| mine[*k] != theirs[*k]).collect();
    if let Some(example) = differ.iter().min() {
        return Err(Error::input(
            at,
            format!(
                "--second-judge: {} answers differ in text from {first}'s under the same response key (e.g. `{example}`): \
                 these are other answers, not the same answers judged again (`candor rescore {first} --out DIR --judge …`)",
                differ.len()
            ),
        ));
    }
    Ok(())
}

fn second_judge_cells(live: &LiveSql, second: &LiveSql) -> Result<SecondJudge> {
    use datafusion::datasource::MemTable;
    check_same_answers(live, second)?;
    let observations = |l: &LiveSql| -> Result<Vec<RecordBatch>> {
        Ok(l.query("SELECT * FROM observations")
            .map_err(|e| Error::Internal(format!("report: reading observations: {e}")))?
            .batches)
    };
    let schema = crate::schema::arrow_schema("observation")?;
    let ctx = datafusion::prelude::SessionContext::new();
    crate::sql::udf::register(&ctx);
    for (name, l) in [("observations", live), ("second_observations", second)] {
        let batches = observations(l)?
            .into_iter()
            .map(|b| RecordBatch::try_new(schema.clone(), b.columns().to_vec()))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::arrow("report", e))?;
        let table = MemTable::try_new(schema.clone(), vec![batches]).map_err(|e| Error::Internal(e.to_string()))?;
        ctx.register_table(name, std::sync::Arc::new(table)).map_err(|e| Error::Internal(e.to_string()))?;
    }
    let q = crate::sql::queries::JUDGE_CELLS;
    let batches = crate::runtime::block_on(async { ctx.sql(q.sql).await?.collect().await })
        .map_err(|e| Error::Internal(format!("report: {}: {e}", q.name)))?;
    let cells = match batches.first() {
        Some(first) => concat_batches(&first.schema(), &batches).map_err(|e| Error::arrow("judge_cells", e))?,
        None => RecordBatch::new_empty(std::sync::Arc::new(arrow::datatypes::Schema::empty())),
    };
    let mut kappa = BTreeMap::new();
    for b in &batches {
        let (k, unreadable) = (f64s(b, "kappa"), f64s(b, "unreadable"));
        for (i, key) in cell_keys(b).into_iter().enumerate() {
            kappa.insert(key, (k[i].is_finite().then_some(k[i]), unreadable[i] as u64));
        }
    }
    let theirs = view(second, "family_table", "")?;
    let sig = f64s(&theirs, "significant");
    let significant = cell_keys(&theirs).into_iter().enumerate().map(|(i, k)| (k, sig[i] == 1.0)).collect();
    Ok(SecondJudge { kappa, significant, cells })
}

/// A percentage with its interval, e.g. `92.0 [85.1, 96.0]`.
fn with_ci(v: f64, low: f64, high: f64) -> String {
    if low.is_finite() && high.is_finite() {
        format!("{}<br><span class=\"ci\">[{}, {}]</span>", num(v, 1), num(low, 1), num(high, 1))
    } else {
        num(v, 1)
    }
}

/// The paper's per-family tables, one per model × checkpoint × dataset × test type, with the
/// statistics beside the paper's, the drill-down buttons, and (with a second judge) the judge
/// robustness of every cell; also the drill-down data of every pair behind them.
fn family_tables(
    live: &LiveSql,
    second: Option<&LiveSql>,
    labels: &BTreeMap<(String, String), String>,
) -> Result<(String, drill::Block, Option<RecordBatch>)> {
    let b = view(
        live,
        "family_table",
        "model, base_checkpoint, checkpoint_epoch, checkpoint, dataset, test_type, category",
    )?;
    let label =
        |m: &str, c: &str| labels.get(&(m.to_string(), c.to_string())).cloned().unwrap_or_else(|| c.to_string());
    let mut block = drill::Block::default();
    let pairs = view(
        live,
        "discordant_pairs",
        "model, base_checkpoint, checkpoint, dataset, test_type, category, counts_toward, item_key, prompt_type, sample_index",
    )?;
    block.add(&pairs, &|m, c| label(m, c))?;
    let judge2 = second.map(|s| second_judge_cells(live, s)).transpose()?;

    let keys = cell_keys(&b);
    let family =
        |i: usize| (keys[i].0.clone(), keys[i].1.clone(), keys[i].2.clone(), keys[i].3.clone(), keys[i].4.clone());
    let cols = [
        "n",
        "acc_base_pct",
        "acc_ft_pct",
        "diff_pp",
        "b",
        "c",
        "p_exact",
        "p_midp",
        "p_bh",
        "paper_g",
        "cohens_g",
        "odds_ratio",
        "acc_base_ci_low",
        "acc_base_ci_high",
        "acc_ft_ci_low",
        "acc_ft_ci_high",
        "diff_ci_low",
        "diff_ci_high",
        "mdd_pp",
    ];
    let v: BTreeMap<&str, Vec<f64>> = cols.iter().map(|c| (*c, f64s(&b, c))).collect();
    let sig = f64s(&b, "significant");
    let mut out = String::from(
        "<h3>Per-family McNemar tables</h3>\n<p>Per category: accuracy of each side with its Wilson 95% interval, the raw \
         difference (variant − original, pp) with Newcombe's paired 95% interval, discordant pairs b (original right, \
         variant wrong) and c — <strong>click b or c to see the items behind it</strong> — exact McNemar p, mid-p, \
         Benjamini–Hochberg p within the family (bold: significant at 0.05), the paper's “Cohen's g” (|b−c|/√(b+c)), \
         the textbook Cohen's g and the odds ratio b/c. Under each table, the smallest difference the family can detect \
         with 80% power. See docs/statistics.md.</p>\n",
    );
    if second.is_some() {
        out.push_str(
            "<p>Judge robustness: κ is Cohen's kappa between the two judges on the answers of the cell's pairs \
             (unreadable: answers the second judge could not label); <span class=\"flag\">⚑</span> marks cells whose \
             BH significance differs between the judges.</p>\n",
        );
    }
    let mut order: Vec<(String, String, String, String, String)> = Vec::new();
    for i in 0..b.num_rows() {
        if !order.contains(&family(i)) {
            order.push(family(i));
        }
    }
    for f in order {
        let (model, base, checkpoint, dataset, test) = &f;
        let cmp = block.comparison(model, base, checkpoint, &label(model, checkpoint));
        let variant = label(model, checkpoint);
        let named = if variant == *checkpoint { variant.clone() } else { format!("{variant} ({checkpoint})") };
        let _ = write!(
            out,
            "<h4>{} — {} vs {} — {} — {} prompts</h4>\n<table><tr><th>category</th><th>n</th><th>acc. original (%)</th>\
             <th>acc. {} (%)</th><th>diff. (pp)</th><th>b</th><th>c</th><th>p</th><th>mid-p</th><th>p (BH)</th>\
             <th>paper's g</th><th>Cohen's g</th><th>OR</th>{}</tr>\n",
            esc(model),
            esc(&named),
            esc(base),
            esc(dataset),
            esc(test),
            esc(&label(model, checkpoint)),
            if judge2.is_some() { "<th>κ judges</th><th>BH sig. (2nd judge)</th>" } else { "" },
        );
        let mut idx: Vec<usize> = (0..b.num_rows()).filter(|&i| family(i) == f).collect();
        let cats: Vec<String> = idx.iter().map(|&i| keys[i].5.clone()).collect();
        let order = amendment_order(cats);
        idx.sort_by_key(|&i| order.iter().position(|a| *a == keys[i].5).unwrap_or(usize::MAX));
        let button = |i: usize, side: &str, count: f64| {
            format!(
                "<button class=\"drill\" data-cmp=\"{cmp}\" data-dataset=\"{}\" data-test=\"{}\" data-category=\"{}\" \
                 data-side=\"{side}\" title=\"show these pairs\">{count:.0}</button>",
                esc(dataset),
                esc(test),
                esc(&keys[i].5),
            )
        };
        for &i in &idx {
            let s = sig[i] == 1.0;
            let count_cell = |side: &str, count: f64| if count > 0.0 { button(i, side, count) } else { num(count, 0) };
            let robustness = match &judge2 {
                Some(j) => {
                    let (kappa, unreadable) = j.kappa.get(&keys[i]).copied().unwrap_or((None, 0));
                    let theirs = j.significant.get(&keys[i]).copied().unwrap_or(false);
                    let flag = if theirs != s {
                        format!(
                            " <span class=\"flag\" title=\"significant under {} judge only\">⚑</span>",
                            if s { "the first" } else { "the second" }
                        )
                    } else {
                        String::new()
                    };
                    format!(
                        "<td>{}{}</td><td>{}{flag}</td>",
                        kappa.map(|k| num(k, 2)).unwrap_or_else(|| "–".into()),
                        if unreadable > 0 { format!(" ({unreadable} unreadable)") } else { String::new() },
                        if theirs { "yes" } else { "no" },
                    )
                }
                None => String::new(),
            };
            let _ = writeln!(
                out,
                "<tr><td><button class=\"drill\" data-cmp=\"{cmp}\" data-dataset=\"{}\" data-test=\"{}\" data-category=\"{}\" \
                 data-side=\"\" title=\"show every discordant pair of this cell\">{}</button></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
                 <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td{}>{}</td><td>{}</td><td>{}</td><td>{}</td>{robustness}</tr>",
                esc(dataset),
                esc(test),
                esc(&keys[i].5),
                esc(&keys[i].5),
                num(v["n"][i], 0),
                with_ci(v["acc_base_pct"][i], v["acc_base_ci_low"][i], v["acc_base_ci_high"][i]),
                with_ci(v["acc_ft_pct"][i], v["acc_ft_ci_low"][i], v["acc_ft_ci_high"][i]),
                with_ci(v["diff_pp"][i], v["diff_ci_low"][i], v["diff_ci_high"][i]),
                count_cell("0", v["b"][i]),
                count_cell("1", v["c"][i]),
                pval(v["p_exact"][i]),
                pval(v["p_midp"][i]),
                if s { " class=\"sig\"" } else { "" },
                pval(v["p_bh"][i]),
                num(v["paper_g"][i], 2),
                num(v["cohens_g"][i], 3),
                num(v["odds_ratio"][i], 2),
            );
        }
        out.push_str("</table>\n");
        let mut sizes: Vec<f64> = idx.iter().map(|&i| v["n"][i]).filter(|n| *n > 0.0).collect();
        sizes.sort_by(f64::total_cmp);
        let median = sizes.get(sizes.len().saturating_sub(1) / 2).copied().unwrap_or(0.0);
        let mdd = idx.first().map(|&i| v["mdd_pp"][i]).unwrap_or(f64::NAN);
        let _ = writeln!(
            out,
            "<p class=\"mdd\">{}</p>",
            if mdd.is_finite() {
                format!(
                    "Minimum detectable difference: {} pp (80% power, exact McNemar at α = 0.05, a category of {median:.0} \
                     pairs with this family's discordance). Smaller true differences are more likely missed than found.",
                    num(mdd, 1)
                )
            } else {
                format!(
                    "<strong>This family cannot detect any difference:</strong> with {median:.0} pairs per category and this \
                     discordance, not even every discordant pair going the same way would reach 80% power (exact McNemar, \
                     α = 0.05). Its p-values and “no significant difference” say nothing about the models."
                )
            }
        );
    }
    Ok((out, block, judge2.map(|j| j.cells)))
}

/// The regressions' effects; `variant` and `checkpoints` name the compared side (each model's
/// latest compared checkpoint, as `regression_cells.sql` takes it).
fn effects_table(live: &LiveSql, variant: &str, checkpoints: &str) -> Result<String> {
    let b = view(live, "effects", "")?;
    let mut out = format!("<h3>Regressions M1–M4: effect of the {}</h3>\n", esc(variant));
    if !checkpoints.is_empty() {
        let _ = writeln!(
            out,
            "<p>The original model vs each model's latest compared checkpoint: {}.</p>",
            esc(checkpoints)
        );
    }
    out.push_str(
        "<p>Binomial GLMs on the cell counts (METHOD §4): log-odds effect \
         β<sub>ft</sub> (+ interaction) with the paper's model-based standard error and Wald p, the item-clustered \
         (sandwich) standard error and p beside them (every item is answered under many contexts and prompt types, so \
         its answers are not independent), and the average marginal effect in percentage points with its delta-method \
         standard error, model-based and item-clustered. See docs/statistics.md.</p>\n",
    );
    if b.num_rows() == 0 {
        out.push_str("<p>No regression could be fitted yet.</p>\n");
        return Ok(out);
    }
    out.push_str(&batch_table(
        &b,
        &[
            ("log_odds", 3),
            ("se", 3),
            ("z", 2),
            ("se_cluster", 3),
            ("ame_pp", 2),
            ("ame_se_pp", 2),
            ("ame_se_cluster_pp", 2),
        ],
    ));
    Ok(out)
}

/// `b` with its `is_finetuned` column replaced by `variant`, each row's checkpoint named as
/// configured: a system-prompt checkpoint is not shown as fine-tuned.
fn with_variant(b: &RecordBatch, labels: &BTreeMap<(String, String), String>) -> Result<RecordBatch> {
    use arrow::datatypes::{Field, Schema};
    let Some(at) = b.schema().index_of("is_finetuned").ok() else { return Ok(b.clone()) };
    let (model, checkpoint) = (strs(b, "model"), strs(b, "checkpoint"));
    let names: arrow::array::StringArray = model
        .into_iter()
        .zip(checkpoint)
        .map(|(m, c)| Some(labels.get(&(m, c.clone())).cloned().unwrap_or(c)))
        .collect();
    let mut fields: Vec<Field> = b.schema().fields().iter().map(|f| f.as_ref().clone()).collect();
    let mut columns = b.columns().to_vec();
    fields[at] = Field::new("variant", DataType::Utf8, true);
    columns[at] = std::sync::Arc::new(names);
    RecordBatch::try_new(std::sync::Arc::new(Schema::new(fields)), columns).map_err(|e| Error::arrow("report", e))
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
            let cell = if name == "p" || name == "p_cluster" {
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

/// Accuracy and discordant pairs (b, c) of each compared checkpoint against its model's first
/// base, per dataset, in checkpoint order (Normal test, pooled over amendment types); None
/// without a fine-tuned checkpoint.
fn trajectory(live: &LiveSql) -> Result<Option<(plots::Lines, plots::Lines)>> {
    let sql = "SELECT f.model, f.dataset, f.checkpoint, f.checkpoint_epoch, \
               CAST(SUM(f.n) AS DOUBLE) AS n, CAST(SUM(f.both_correct + f.c) AS DOUBLE) AS correct, \
               CAST(SUM(f.b) AS DOUBLE) AS b, CAST(SUM(f.c) AS DOUBLE) AS c \
               FROM family_results f \
               JOIN (SELECT model, MIN(base_checkpoint) AS base FROM family_results GROUP BY model) first \
                 ON f.model = first.model AND f.base_checkpoint = first.base \
               WHERE f.test_type = 'Normal' \
               GROUP BY f.model, f.dataset, f.checkpoint, f.checkpoint_epoch \
               ORDER BY f.model, f.dataset, f.checkpoint_epoch, f.checkpoint";
    let rows = live.query(sql).map_err(|e| Error::Internal(format!("report: the trajectory: {e}")))?;
    let b = concat_batches(&rows.schema, &rows.batches).map_err(|e| Error::arrow("report", e))?;
    if b.num_rows() == 0 {
        return Ok(None);
    }
    let (model, dataset, ckpt) = (strs(&b, "model"), strs(&b, "dataset"), strs(&b, "checkpoint"));
    let (epoch, n, correct, bb, cc) =
        (f64s(&b, "checkpoint_epoch"), f64s(&b, "n"), f64s(&b, "correct"), f64s(&b, "b"), f64s(&b, "c"));
    let mut ticks: Vec<(f64, String)> = (0..b.num_rows()).map(|i| (epoch[i], ckpt[i].clone())).collect();
    ticks.sort_by(|x, y| x.0.partial_cmp(&y.0).unwrap_or(std::cmp::Ordering::Equal).then(x.1.cmp(&y.1)));
    let ticks = ordered(&ticks.into_iter().map(|t| t.1).collect::<Vec<_>>());
    let several = model.iter().collect::<BTreeSet<_>>().len() > 1;
    let mut accuracy: BTreeMap<String, Vec<plots::LinePoint>> = BTreeMap::new();
    let mut discordant: BTreeMap<String, Vec<plots::LinePoint>> = BTreeMap::new();
    for i in 0..b.num_rows() {
        let t = ticks.iter().position(|c| *c == ckpt[i]).unwrap_or(0);
        let name = if several { format!("{} {}", model[i], dataset[i]) } else { dataset[i].clone() };
        let p = correct[i] / n[i];
        // ±1.96 standard errors of the proportion, in percent.
        let se = 100.0 * (p * (1.0 - p) / n[i]).sqrt();
        accuracy.entry(name.clone()).or_default().push((t, 100.0 * p, se));
        discordant.entry(format!("{name} b")).or_default().push((t, bb[i], f64::NAN));
        discordant.entry(format!("{name} c")).or_default().push((t, cc[i], f64::NAN));
    }
    let lines = |title: &str, y: &str, series: BTreeMap<String, Vec<plots::LinePoint>>| plots::Lines {
        title: title.into(),
        x_label: "checkpoint (in training order)".into(),
        y_label: y.into(),
        ticks: ticks.clone(),
        series: series.into_iter().collect(),
    };
    Ok(Some((
        lines("Accuracy across checkpoints", "accuracy (%)", accuracy),
        lines("Discordant pairs against the base", "pairs", discordant),
    )))
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
