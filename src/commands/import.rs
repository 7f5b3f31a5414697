//! `candor import`: answers produced elsewhere (CSV/JSONL) into an archive's response stream,
//! linked to its trials and scored with any labels they carry.

use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;

use anyhow::{Result, bail};

use candor::archive::read_records;
use candor::conditions::Dataset;
use candor::dataflow::Cluster;
use candor::import::{ImportDefaults, Linked, read_answers};
use candor::records::{Item, Response, Trial};
use candor::schema::Record;
use candor::score::stage;

use super::{EpochsReport, Globals, Report, open_for, refusal_rules};
use candor::score::refusal::RefusalMode;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The answer file (.csv, .tsv, .jsonl).
    file: PathBuf,
    /// Archive directory to add to (it may already hold a trial grid to link answers to).
    #[arg(long)]
    out: PathBuf,
    /// Dataset of every row, when the file has no `dataset` column.
    #[arg(long)]
    dataset: Option<Dataset>,
    /// Model family, when the file has no `model` column.
    #[arg(long)]
    model: Option<String>,
    /// Checkpoint id, when the file has no `checkpoint` column.
    #[arg(long)]
    checkpoint: Option<String>,
    /// The answers come from a fine-tuned (or otherwise modified) checkpoint.
    #[arg(long)]
    finetuned: bool,
    /// Free-text variant recorded with the checkpoint (warm, cold, warm-system-prompt, …).
    #[arg(long)]
    variant: Option<String>,
    /// Refusal phrase list (default: `default`; `paper` with --paper).
    #[arg(long, value_enum)]
    refusal: Option<RefusalMode>,
    /// Replace the answers of a checkpoint already in the archive. Without it, importing
    /// the same answers again does nothing and different ones are refused.
    #[arg(long)]
    replace: bool,
    #[command(flatten)]
    cluster: Cluster,
}

pub fn run(args: Args, g: &Globals) -> Result<Option<ImportReport>> {
    let Args { file, out, dataset, model, checkpoint, finetuned, variant, refusal, replace, cluster } = args;
    let archive = open_for(&out, "import", &cluster)?;
    let known = candor::import::Known {
        trials: read_records::<Trial>(&archive)?,
        items: read_records::<Item>(&archive)?,
        data_dir: candor::config::default_data_dir(),
    };
    let all_known: Vec<Trial> = known.trials.clone();
    let defaults = ImportDefaults { dataset, model, checkpoint, is_finetuned: finetuned.then_some(true) };
    let mut imported = read_answers(&file, &defaults, &known)?;
    let committed = archive.committed_epochs()?;
    let mut batches = Vec::new();
    let mut already = Vec::new();
    let mut to_replace = BTreeSet::new();
    for ((model, checkpoint), mut rows) in std::mem::take(&mut imported.responses) {
        let ft = imported.finetuned.get(&(model.clone(), checkpoint.clone())).copied().unwrap_or(finetuned);
        let epoch = archive.register_checkpoint(&model, &checkpoint, ft, variant.as_deref())?;
        for r in &mut rows {
            r.checkpoint_epoch = epoch;
        }
        if committed.contains(&epoch) {
            let id = candor::identity::CheckpointRef::new(&model, &checkpoint);
            match candor::import::compare_with_archive(&archive, epoch, &id, &rows, &imported.labels)? {
                None => {
                    already.push(id);
                    continue;
                }
                Some(_) if replace => {
                    to_replace.insert(epoch);
                }
                Some(difference) => bail!(candor::error::Error::input(
                    candor::error::Location::file(&file),
                    format!(
                        "{id} is already in {} with other answers ({difference}); pass --replace to replace that checkpoint's answers",
                        out.display()
                    ),
                )),
            }
        }
        batches.push((epoch, Response::to_batch(&rows)?));
    }
    for id in &already {
        eprintln!("{id}: already in the archive with these answers; nothing to import");
    }
    if !to_replace.is_empty() {
        archive.retract_epochs(&to_replace)?;
        // Trials the replaced epochs had brought left with them: bring back those
        // these answers use.
        let remaining: HashSet<String> = read_records::<Trial>(&archive)?.into_iter().map(|t| t.trial_key).collect();
        let mut used = HashSet::new();
        for (_, b) in &batches {
            used.extend(Response::from_batch(b)?.into_iter().map(|r| r.trial_key));
        }
        for t in &all_known {
            if !remaining.contains(&t.trial_key) && used.contains(&t.trial_key) {
                imported.new_trials.push(t.clone());
            }
        }
    }
    let mut trials = all_known;
    trials.extend(imported.new_trials.iter().cloned());
    // New trials belong to the first checkpoint that brought them.
    let trials_epoch = batches.iter().map(|(e, _)| *e).min().unwrap_or(0);
    let linked = imported.linked.clone();
    let new_items = imported.new_items.len();
    let epochs = stage::score_responses(
        &cluster,
        &archive,
        trials,
        imported.new_trials,
        imported.new_items,
        trials_epoch,
        batches,
        imported.labels,
        refusal_rules(refusal, g.paper),
        None,
    )?;
    if !cluster.is_leader() {
        return Ok(None);
    }
    Ok(Some(ImportReport { linked, new_items, epochs: EpochsReport::read("import", epochs, &out)? }))
}

/// How the rows found their trials, then what was scored.
pub struct ImportReport {
    linked: Linked,
    new_items: usize,
    epochs: EpochsReport,
}

impl Report for ImportReport {
    fn table(&self) -> Result<()> {
        let linked = &self.linked;
        println!(
            "linked {} rows to archived trials by prompt, {} by item and condition; {} rows answer trials made from the file ({} new items)",
            linked.by_prompt, linked.by_condition, linked.new_trials, self.new_items
        );
        self.epochs.table()
    }

    fn json(&self) -> Result<()> {
        println!("{}", serde_json::json!({"linked": self.linked, "new_items": self.new_items}));
        self.epochs.json()
    }
}
