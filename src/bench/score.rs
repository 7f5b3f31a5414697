//! `candor bench score`: verdicts/s of the judges on the validation set, and their agreement
//! with its human labels.

use std::path::Path;
use std::time::Instant;

use anyhow::Result;

/// The judges on the validation set (`data/judge/validation/`), every `every`-th row: verdicts/s
/// of the reference rules (with MiniLM, and the lexical rules alone), the local model judge and
/// the ensemble, each with a fresh generation store, and each one's agreement with the human
/// labels.
pub fn run(every: usize, dir: Option<&Path>) -> Result<()> {
    use candor::score::judge::{Case, Judge, JudgeConfig, ReferenceJudge};
    use candor::score::validation;
    let tmp = tempfile::tempdir()?;
    let root = dir.unwrap_or(tmp.path());
    let rows: Vec<validation::Row> = validation::bundled()?.into_iter().step_by(every.max(1)).collect();
    let items = validation::items_for(&rows, &candor::config::default_data_dir())?;
    let set = validation::digest(validation::BUNDLED);
    println!("{} answers of the validation set ({set}), every {every}. row", rows.len());

    // The rules without embeddings, repeated for a stable rate.
    let lexical: Vec<Case> = rows
        .iter()
        .filter(|r| matches!(r.dataset, candor::conditions::Dataset::Trivia | candor::conditions::Dataset::Disinfo))
        .map(|r| Case { dataset: r.dataset, item: &items[&(r.dataset, r.item_key.clone())], output: &r.answer })
        .collect();
    let mut reference = ReferenceJudge::new();
    reference.judge(&lexical)?;
    let start = Instant::now();
    let repeat = 20;
    for _ in 0..repeat {
        reference.judge(&lexical)?;
    }
    println!(
        "reference rules without embeddings (TriviaQA, disinfo): {:.0} verdicts/s",
        (lexical.len() * repeat) as f64 / start.elapsed().as_secs_f64()
    );

    for name in ["reference", "candle", "ensemble"] {
        let store = root.join(format!("store-{name}"));
        let _ = std::fs::remove_dir_all(&store);
        let mut judge = candor::score::judge::open(&JudgeConfig::parse_arg(name)?, &store)?;
        // Load the models first (an answer of no row, asked once): the rate is of judging.
        for r in rows.iter().filter(|r| r.dataset == candor::conditions::Dataset::TruthfulQa).take(1) {
            let warm = Case { dataset: r.dataset, item: &items[&(r.dataset, r.item_key.clone())], output: "warm-up" };
            judge.judge(&[warm])?;
        }
        let v = validation::validate(judge.as_mut(), &rows, &items, &set)?;
        let all = &v.by_dataset["all"];
        println!(
            "{name}: {:.2} verdicts/s ({} in {:.1} s); {:.1}% agreement, kappa {}, {} unreadable",
            v.verdicts_per_second,
            v.answers,
            v.seconds,
            all.percent,
            all.kappa.map_or("undefined".into(), |k| format!("{k:.3}")),
            all.unreadable
        );
        for (ds, a) in v.by_dataset.iter().filter(|(k, _)| *k != "all") {
            println!(
                "  {ds:>10}: {:5.1}% of {}, kappa {}, {} unreadable",
                a.percent,
                a.compared,
                a.kappa.map_or("undefined".into(), |k| format!("{k:.3}")),
                a.unreadable
            );
        }
        for (part, a) in v.by_part.iter().filter(|_| v.by_part.len() > 1) {
            println!("  decided by {part}: {} answers, {:.1}% agreement", a.compared + a.unreadable, a.percent);
        }
    }
    Ok(())
}
