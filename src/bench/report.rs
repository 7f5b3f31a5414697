//! `candor bench report`: how long `candor report` takes and how large `report.html` gets at the
//! paper's scale and at the quickstart's, and how long the drill-down takes to open a cell in a
//! real browser.
//!
//! Each size is an archive built like `candor bench spine`'s: the trial grid, then synthetic
//! answers of an original checkpoint and `variants` fine-tuned ones to every trial, with answer
//! texts of realistic length (80 to 1,200 characters of words, the paper's 300-token cap) and a
//! judge's raw answer, labelled so that a fraction `discordance` of the pairs are discordant.
//! Timed: `write_report` from opening the catalog to the written file (median of `repeat`),
//! then, in headless Chromium, clicking the largest cell's button until its pairs are rendered,
//! once cold (the first click decompresses the embedded block) and once warm.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use candor::archive::{Archive, read_records};
use candor::conditions::VerdictLabel;
use candor::config::Experiment;
use candor::dataflow::Cluster;
use candor::error::{Error, Result};
use candor::records::{Response, Trial};
use candor::schema::Record;
use candor::score::judge::Label;
use candor::score::refusal::{RefusalMode, RefusalRules};
use candor::score::stage;

use super::{PAPER_GRID, median, peak_rss_mib};

/// Settings of `candor bench report`.
#[derive(Clone, Debug)]
pub struct ReportBench {
    /// Fine-tuned checkpoints answering beside the original.
    pub variants: usize,
    /// Fraction of pairs that are discordant.
    pub discordance: f64,
    pub repeat: usize,
    /// Also time the drill-down in Chromium.
    pub browser: bool,
}

const WORDS: [&str; 24] = [
    "the",
    "answer",
    "is",
    "probably",
    "because",
    "however",
    "I",
    "understand",
    "how",
    "you",
    "feel",
    "about",
    "this",
    "question",
    "which",
    "many",
    "people",
    "find",
    "confusing",
    "but",
    "evidence",
    "shows",
    "that",
    "indeed",
];

/// Builds an archive for `grid` with synthetic answers and labels (see the module docs).
fn synthetic_archive(grid: &str, dir: &Path, opts: &ReportBench, cluster: &Cluster) -> Result<(Archive, usize)> {
    let exp = Experiment::parse(grid, "bench").map_err(|e| Error::Internal(e.to_string()))?;
    let _ = std::fs::remove_dir_all(dir);
    let archive = Archive::open_writer(dir, "bench report")?;
    candor::grid::build_grid(&exp, &archive, candor::grid::GridMode::Keep, cluster)
        .map_err(|e| Error::Internal(e.to_string()))?;
    let trials: Vec<Trial> = read_records(&archive)?;
    let mut rng = ChaCha8Rng::seed_from_u64(2026);
    let text = |rng: &mut ChaCha8Rng| {
        let chars = rng.gen_range(80..1200);
        let mut s = String::with_capacity(chars + 16);
        while s.len() < chars {
            s.push_str(WORDS[rng.gen_range(0..WORDS.len())]);
            s.push(if rng.gen_ratio(1, 12) { '.' } else { ' ' });
        }
        s
    };
    let base_right: Vec<bool> = trials.iter().map(|_| rng.gen_bool(0.7)).collect();
    let mut labels = HashMap::new();
    let mut batches = Vec::new();
    let names: Vec<(String, bool)> = std::iter::once(("original".to_string(), false))
        .chain((0..opts.variants).map(|v| (format!("warm-{v}"), true)))
        .collect();
    for (checkpoint, finetuned) in &names {
        let variant = if *finetuned { "warm fine-tune" } else { "original" };
        let epoch = archive.register_checkpoint("bench", checkpoint, *finetuned, Some(variant))?;
        let mut rows = Vec::with_capacity(trials.len());
        for (i, t) in trials.iter().enumerate() {
            let key = Response::key("bench", checkpoint, &t.trial_key, 0);
            let right = if *finetuned && rng.gen_bool(opts.discordance) { !base_right[i] } else { base_right[i] };
            let verdict = if right { VerdictLabel::Correct } else { VerdictLabel::Incorrect };
            let raw = format!(
                "{verdict}: the answer {} the reference ({})",
                if right { "matches" } else { "contradicts" },
                t.item_key
            );
            labels.insert(key.clone(), Label { verdict, judge: "bench-judge:v1".into(), raw: Some(raw) });
            rows.push(Response {
                response_key: key,
                trial_key: t.trial_key.clone(),
                dataset: t.dataset.clone(),
                model: "bench".into(),
                checkpoint: checkpoint.clone(),
                checkpoint_epoch: epoch,
                is_finetuned: *finetuned,
                sample_index: 0,
                output: text(&mut rng),
                finish_reason: Some("stop".into()),
                prompt_tokens: Some(60),
                completion_tokens: Some(120),
                latency_ms: Some(1.0),
                generator: "bench".into(),
                decoding: None,
            });
        }
        for chunk in rows.chunks(8192) {
            batches.push((epoch, Response::to_batch(chunk)?));
        }
    }
    stage::score_responses(
        cluster,
        &archive,
        trials.clone(),
        Vec::new(),
        Vec::new(),
        candor::dataflow::GRID_EPOCH,
        batches,
        labels,
        RefusalRules::new(RefusalMode::Default),
        None,
    )
    .map_err(|e| Error::Internal(e.to_string()))?;
    Ok((archive, trials.len()))
}

/// Runs the benchmark at the paper's and the quickstart's sizes and prints one line per figure.
pub fn run(dir: Option<&Path>, opts: &ReportBench, cluster: &Cluster) -> Result<()> {
    let tmp = tempfile::tempdir().map_err(|e| Error::io(Path::new("tmp"), e))?;
    let root = dir.unwrap_or(tmp.path());
    let quickstart = include_str!("../../experiments/quickstart.toml");
    // The quickstart's grid alone: its models are not needed for synthetic answers.
    let quickstart_grid = quickstart.split("\n[[models]]").next().unwrap_or(quickstart);
    for (name, grid) in [("paper", PAPER_GRID), ("quickstart", quickstart_grid)] {
        let started = Instant::now();
        let (archive, trials) = synthetic_archive(grid, &root.join(name), opts, cluster)?;
        let built = started.elapsed().as_secs_f64();
        let mut secs = Vec::new();
        let mut files = None;
        for _ in 0..opts.repeat.max(1) {
            let start = Instant::now();
            let live = candor::sql::live::LiveSql::open(archive.root())?;
            files = Some(candor::report::write_report(&live, &archive.root().join("report"), None)?);
            secs.push(start.elapsed().as_secs_f64());
        }
        let html = files.expect("at least one run").html;
        let bytes = std::fs::metadata(&html).map_err(|e| Error::io(&html, e))?.len();
        let page = std::fs::read_to_string(&html).map_err(|e| Error::io(&html, e))?;
        let pairs: usize = page
            .split("data-pairs=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let block = page.split("id=\"drill-data\"").nth(1).map(|s| s.split("</script>").next().unwrap_or("").len());
        println!(
            "{name}: {trials} trials × {} checkpoints ({} pairs, {pairs} discordant) archived in {built:.1} s; \
             report built in {:.2} s (median of {}); report.html {:.1} MB, of which the drill-down block {:.1} MB; peak RSS {:.0} MiB",
            opts.variants + 1,
            trials * opts.variants,
            median(secs),
            opts.repeat.max(1),
            bytes as f64 / 1e6,
            block.unwrap_or(0) as f64 / 1e6,
            peak_rss_mib().unwrap_or(f64::NAN),
        );
        if opts.browser {
            browser_figures(name, &html)?;
        }
    }
    Ok(())
}

/// Times opening the largest cell in Chromium: cold (first click decompresses the block) and warm.
fn browser_figures(name: &str, html: &Path) -> Result<()> {
    let browser = candor::report::browser::Browser::launch()?;
    let url = format!("file://{}", html.canonicalize().map_err(|e| Error::io(html, e))?.display());
    let start = Instant::now();
    browser.goto(&url)?;
    let load = start.elapsed().as_secs_f64() * 1e3;
    // The button of the cell with the most pairs.
    let largest = "const all = [...document.querySelectorAll('button.drill[data-side=\"\"]')];\
         const count = b => [...b.closest('tr').querySelectorAll('button.drill:not([data-side=\"\"])')]\
           .reduce((s, x) => s + Number(x.textContent), 0);\
         all.sort((a, b) => count(b) - count(a)); all.forEach(b => b.removeAttribute('data-largest'));\
         if (all.length) all[0].setAttribute('data-largest', '1'); return all.length ? count(all[0]) : 0";
    let count = browser.eval(largest, serde_json::json!([]))?;
    let mut times = Vec::new();
    for _ in 0..2 {
        let start = Instant::now();
        browser.click("button.drill[data-largest='1']")?;
        browser.wait_for(
            "return document.getElementById('drill').dataset.state === 'ready'",
            std::time::Duration::from_secs(120),
        )?;
        let wall = start.elapsed().as_secs_f64() * 1e3;
        let page =
            browser.eval("return Number(document.getElementById('drill').dataset.openMs)", serde_json::json!([]))?;
        times.push((page.as_f64().unwrap_or(f64::NAN), wall));
        browser.click("#drill .drill-close")?;
    }
    println!(
        "{name}: page load {load:.0} ms; opening the largest cell ({count} pairs): {:.0} ms cold (decompress + render; {:.0} ms \
         with the WebDriver round trip), {:.0} ms warm ({:.0} ms)",
        times[0].0, times[0].1, times[1].0, times[1].1
    );
    Ok(())
}
