//! Synthetic observations in the paper's design, for trying the analysis without a model run
//! and for checking it against a reference (`candor bench stats`, the statsmodels cross-check).
//!
//! The set follows the paper's design: 10 models, each a base and a fine-tuned checkpoint;
//! TriviaQA, TruthfulQA and MedQA with 500 items and disinfo with 125; 9 amendment types;
//! prompt types `original`, `correct`, `incorrect` under every amendment plus
//! `original_neutral` under `unmodified` (its own Neutral family). Items are added round-robin
//! until the set holds the requested number of observations (439,792 at the paper's scale).
//! Answers are wrong with a logistic probability that depends on model, dataset, amendment,
//! prompt type and fine-tuning; about 1.5% are refusals.
//!
//! ```
//! let batches = candor::sql::synthetic::synthetic(1_000, 7, 1).unwrap();
//! assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 1_000);
//! ```

use std::path::Path;

use arrow::array::RecordBatch;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::records::Observation;
use crate::schema::Record;

/// The paper's number of observations.
pub const PAPER_OBSERVATIONS: usize = 439_792;

const DATASETS: [(&str, usize, f64); 4] =
    [("trivia", 500, -1.2), ("truthfulqa", 500, -0.4), ("medqa", 500, -0.8), ("disinfo", 125, -1.6)];
const AMENDMENTS: [(&str, f64); 9] = [
    ("unmodified", 0.0),
    ("emotion:anger", 0.15),
    ("emotion:happy", 0.05),
    ("emotion:sad", 0.35),
    ("relation:close", 0.1),
    ("relation:hierarchical_down", 0.05),
    ("relation:hierarchical_up", 0.2),
    ("stake:high", 0.1),
    ("stake:low", 0.0),
];

/// `rows` synthetic observations (see the module docs); the fine-tuned checkpoint is
/// `warm` at epoch `ft_epoch`.
pub fn synthetic(rows: usize, seed: u64, ft_epoch: u64) -> Result<Vec<RecordBatch>> {
    synthetic_for(rows, seed, 10, "warm", ft_epoch, true)
}

/// Observations of `models` models; with `with_base` false only the fine-tuned side is made
/// (a new checkpoint arriving for models already held).
pub fn synthetic_for(
    rows: usize,
    seed: u64,
    models: usize,
    checkpoint: &str,
    ft_epoch: u64,
    with_base: bool,
) -> Result<Vec<RecordBatch>> {
    let mut batches = Vec::new();
    synthetic_each(rows, seed, models, checkpoint, ft_epoch, with_base, |b| {
        batches.push(b);
        Ok(())
    })?;
    Ok(batches)
}

/// [`synthetic_for`]'s observations handed to `each` batch by batch (65,536 rows at most), as
/// they are made: millions of them never need to be in memory at once.
pub fn synthetic_each(
    rows: usize,
    seed: u64,
    models: usize,
    checkpoint: &str,
    ft_epoch: u64,
    with_base: bool,
    mut each: impl FnMut(RecordBatch) -> Result<()>,
) -> Result<()> {
    const CHUNK: usize = 65_536;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut conditions: Vec<(&str, &str, f64)> = Vec::new();
    for (a, shift) in AMENDMENTS {
        for (p, pshift) in [("original", 0.0), ("correct", 0.2), ("incorrect", 0.6)] {
            conditions.push((a, p, shift + pshift));
        }
        if a == "unmodified" {
            conditions.push((a, "original_neutral", 0.05));
        }
    }
    let mut out = Vec::with_capacity(rows.min(CHUNK));
    let mut total = 0usize;
    let mut item = 0usize;
    'fill: loop {
        for m in 0..models {
            let model = format!("m{m:02}");
            let model_shift = (m as f64 - 4.5) * 0.08;
            for (dataset, size, ds_shift) in DATASETS {
                // Sizes grow with the requested row count, so large sets have more items.
                let scale = rows.div_ceil(PAPER_OBSERVATIONS).max(1);
                if item >= size * scale {
                    continue;
                }
                for (amendment, prompt_type, shift) in &conditions {
                    let sides: &[bool] = if with_base { &[false, true] } else { &[true] };
                    for &ft in sides {
                        if total == rows {
                            break 'fill;
                        }
                        if out.len() == CHUNK {
                            each(Observation::to_batch(&out)?)?;
                            out.clear();
                        }
                        total += 1;
                        let warm = if ft { 0.35 + 0.8 * shift } else { 0.0 };
                        let eta = ds_shift + model_shift + shift + warm;
                        let wrong = rng.r#gen::<f64>() < 1.0 / (1.0 + (-eta).exp());
                        let refusal = rng.r#gen::<f64>() < 0.015;
                        let correct = if refusal { (dataset == "disinfo").then_some(true) } else { Some(!wrong) };
                        let ckpt = if ft { checkpoint } else { "base" };
                        out.push(Observation {
                            response_key: format!("{model}/{ckpt}/{dataset}/{item}/{amendment}/{prompt_type}/0"),
                            model: model.clone(),
                            checkpoint: ckpt.to_string(),
                            checkpoint_epoch: if ft { ft_epoch } else { 0 },
                            is_finetuned: ft,
                            dataset: dataset.to_string(),
                            item_key: format!("{dataset}-{item}"),
                            amendment_type: amendment.to_string(),
                            amendment_group: crate::conditions::amendment_group(amendment).to_string(),
                            prompt_type: prompt_type.to_string(),
                            sample_index: 0,
                            refusal,
                            verdict: match correct {
                                Some(true) => "CORRECT",
                                Some(false) => "INCORRECT",
                                None => "REFUSAL",
                            }
                            .to_string(),
                            correct,
                        });
                    }
                }
            }
        }
        item += 1;
        if item > rows {
            break;
        }
    }
    each(Observation::to_batch(&out)?)
}

/// Writes observation batches as one Parquet file.
pub fn write_parquet(path: &Path, batches: &[RecordBatch]) -> Result<()> {
    write_parquet_with(path, |write| batches.iter().try_for_each(|b| write(b.clone())))
}

/// Writes one Parquet file of observation batches that `fill` hands to the writer it is given
/// one by one (so that they need not all be in memory at once).
pub fn write_parquet_with(
    path: &Path,
    fill: impl FnOnce(&mut dyn FnMut(RecordBatch) -> Result<()>) -> Result<()>,
) -> Result<()> {
    let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let schema = crate::schema::arrow_schema("observation")?;
    let parquet = |e: parquet::errors::ParquetError| Error::io(path, std::io::Error::other(e));
    let mut w = parquet::arrow::ArrowWriter::try_new(file, schema, None).map_err(parquet)?;
    fill(&mut |batch| w.write(&batch).map_err(parquet))?;
    w.close().map_err(parquet)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_set_has_the_requested_size_and_both_sides() {
        let b = synthetic(70_000, 1, 1).unwrap();
        assert_eq!(b.iter().map(|b| b.num_rows()).sum::<usize>(), 70_000);
        let obs = Observation::from_batch(&b[0]).unwrap();
        assert!(obs.iter().any(|o| o.is_finetuned) && obs.iter().any(|o| !o.is_finetuned));
        assert!(obs.iter().any(|o| o.correct.is_none()));
        let only_ft = synthetic_for(800, 2, 1, "next", 2, false).unwrap();
        assert!(Observation::from_batch(&only_ft[0]).unwrap().iter().all(|o| o.is_finetuned && o.model == "m00"));
    }
}
