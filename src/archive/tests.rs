use super::*;
use crate::records::{Observation, Trial};

fn trial(i: usize) -> Trial {
    Trial {
        trial_key: Trial::key("trivia", &format!("q{i}"), "unmodified", "original"),
        dataset: "trivia".into(),
        item_key: format!("q{i}"),
        amendment_type: "unmodified".into(),
        amendment_group: "unmodified".into(),
        statement_id: None,
        statement: None,
        prompt_type: "original".into(),
        belief_answer: None,
        prompt: format!("Question {i}?"),
        template_style: "clean".into(),
        seed: 1,
    }
}

fn obs(model: &str, checkpoint: &str, epoch: u64, i: usize) -> Observation {
    Observation {
        response_key: crate::records::Response::key(model, checkpoint, &trial(i).trial_key, 0),
        model: model.into(),
        checkpoint: checkpoint.into(),
        checkpoint_epoch: epoch,
        is_finetuned: epoch > 1,
        dataset: "trivia".into(),
        item_key: format!("q{i}"),
        amendment_type: "unmodified".into(),
        amendment_group: "unmodified".into(),
        prompt_type: "original".into(),
        sample_index: 0,
        refusal: false,
        verdict: "CORRECT".into(),
        correct: Some(i.is_multiple_of(2)),
    }
}

fn grid(a: &Archive, n: usize) {
    let rows: Vec<Trial> = (0..n).map(trial).collect();
    a.write_epoch(0, &[("trial".into(), Partition::All, Trial::to_batch(&rows).unwrap())], &Value::Null).unwrap();
}

fn checkpoint(a: &Archive, model: &str, ckpt: &str, n: usize) -> u64 {
    let epoch = a.register_checkpoint(model, ckpt, false, None).unwrap();
    let rows: Vec<Observation> = (0..n).map(|i| obs(model, ckpt, epoch, i)).collect();
    a.write_epoch(
        epoch,
        &[("observation".into(), Partition::checkpoint(model, ckpt), Observation::to_batch(&rows).unwrap())],
        &Value::Null,
    )
    .unwrap();
    epoch
}

fn read_obs(a: &Archive) -> Vec<Observation> {
    a.read("observation").unwrap().iter().flat_map(|b| Observation::from_batch(b).unwrap()).collect()
}

#[test]
fn epochs_round_trip_and_checkpoints_get_reversible_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let a = Archive::open_writer(dir.path().join("a"), "test").unwrap();
    grid(&a, 5);
    let e1 = checkpoint(&a, "org/model", "warm epoch 2", 3);
    let e2 = checkpoint(&a, "org:model", "warm epoch 2", 4);
    assert_eq!((e1, e2), (1, 2));
    assert_eq!(a.committed_epochs().unwrap().into_iter().collect::<Vec<_>>(), [0, 1, 2]);
    let back: Vec<Trial> = a.read("trial").unwrap().iter().flat_map(|b| Trial::from_batch(b).unwrap()).collect();
    assert_eq!(back.len(), 5);
    let segs = a.segments("observation").unwrap();
    assert!(segs[0].path.to_string_lossy().contains("model=org%2Fmodel/checkpoint=warm%20epoch%202/"), "{segs:?}");
    assert!(segs[1].path.to_string_lossy().contains("model=org%3Amodel/"), "{segs:?}");
    let all = read_obs(&a);
    assert_eq!(all.iter().filter(|o| o.model == "org/model").count(), 3);
    assert_eq!(all.iter().filter(|o| o.model == "org:model").count(), 4);
    // A reader sees the same, and re-opening as a writer changes nothing.
    drop(a);
    let a = Archive::open_writer(dir.path().join("a"), "test").unwrap();
    assert_eq!(read_obs(&Archive::open(a.root()).unwrap()).len(), 7);
    assert!(a.verify().is_empty(), "{:?}", a.verify());
}

#[test]
fn opening_what_is_not_an_archive_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("typo");
    let err = Archive::open(&missing).unwrap_err();
    assert_eq!(err.kind(), crate::error::Domain::User);
    assert!(!missing.exists(), "reading must not create a directory");
    // The bug this pins: `--out runs` (a parent of archives) deleted every archive's files.
    let runs = dir.path().join("runs");
    let study = Archive::open_writer(runs.join("study"), "test").unwrap();
    grid(&study, 3);
    drop(study);
    let before = fs::read_dir(runs.join("study/trial")).unwrap().count();
    let err = Archive::open_writer(&runs, "test").unwrap_err().to_string();
    assert!(err.contains("not a Candor archive") && err.contains("runs"), "{err}");
    assert!(!runs.join(MANIFEST).exists());
    assert_eq!(fs::read_dir(runs.join("study/trial")).unwrap().count(), before);
    assert_eq!(Archive::open(runs.join("study")).unwrap().read("trial").unwrap()[0].num_rows(), 3);
}

/// Writers creating one archive at once all open it: none reads another's manifest half
/// written (before: "damaged: not a Candor manifest: EOF while parsing"), and none takes
/// another's manifest in progress for a directory that is not empty.
#[test]
fn writers_creating_one_archive_at_once_all_open_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("a");
    fs::create_dir(&root).unwrap();
    fs::write(root.join(".candor-archive.json.999.x.tmp"), "{").unwrap();
    Archive::open_writer(&root, "test").unwrap();
    for round in 0..200 {
        let root = dir.path().join(format!("r{round}"));
        std::thread::scope(|s| {
            let writers: Vec<_> =
                (0..4).map(|_| s.spawn(|| create(&root).and_then(|()| read_manifest(&root)))).collect();
            for w in writers {
                w.join().unwrap().unwrap();
            }
        });
        assert_eq!(fs::read_dir(&root).unwrap().count(), 1, "only the manifest is left");
    }
}

#[test]
fn an_epoch_is_written_once() {
    let dir = tempfile::tempdir().unwrap();
    let a = Archive::open_writer(dir.path(), "test").unwrap();
    grid(&a, 2);
    let rows = Trial::to_batch(&[trial(0), trial(1)]).unwrap();
    let err = a.write_epoch(0, &[("trial".into(), Partition::All, rows)], &Value::Null).unwrap_err();
    assert!(matches!(err, Error::Conflict(_)), "{err}");
    // The refused write left no file behind.
    assert!(a.verify().is_empty(), "{:?}", a.verify());
    assert_eq!(a.read("trial").unwrap()[0].num_rows(), 2);
}

#[test]
fn keys_are_archived_once() {
    let dir = tempfile::tempdir().unwrap();
    let a = Archive::open_writer(dir.path(), "test").unwrap();
    // The error names the key that is there twice.
    let key = |i: usize| format!("{:?}", row_keys("trial", &Trial::to_batch(&[trial(i)]).unwrap()).unwrap()[0]);
    let twice = Trial::to_batch(&[trial(3), trial(0), trial(4), trial(0)]).unwrap();
    let err = a.write_epoch(0, &[("trial".into(), Partition::All, twice)], &Value::Null).unwrap_err();
    assert!(err.to_string().contains(&format!("share the key {}", key(0))), "{err}");
    grid(&a, 2);
    // A later epoch may add trials, but not one the grid has.
    let epoch = a.register_checkpoint("m", "c", false, None).unwrap();
    let again = Trial::to_batch(&[trial(2), trial(1)]).unwrap();
    let err = a.write_epoch(epoch, &[("trial".into(), Partition::All, again)], &Value::Null).unwrap_err();
    assert!(err.to_string().contains(&format!("already holds a row with key {}", key(1))), "{err}");
    assert_eq!(a.read("trial").unwrap().iter().map(|b| b.num_rows()).sum::<usize>(), 2);
    // Two files of one stream in one epoch: a key in both is there twice.
    let epoch = a.register_checkpoint("m", "d", false, None).unwrap();
    let obs = |i: usize| Observation::to_batch(&[obs("m", "d", epoch, i)]).unwrap();
    let part = Partition::checkpoint("m", "d");
    a.append_epoch("observation", &part, epoch, &[obs(5)]).unwrap();
    a.append_epoch("observation", &part, epoch, &[obs(6)]).unwrap();
    a.append_epoch("observation", &part, epoch, &[obs(5)]).unwrap();
    let err = a.commit_epoch(epoch, &Value::Null).unwrap_err();
    let five = format!("{:?}", row_keys("observation", &obs(5)).unwrap()[0]);
    assert!(err.to_string().contains(&format!("share the key {five}")), "{err}");
    assert!(a.read("observation").unwrap().is_empty());
}

#[test]
fn rows_must_belong_to_their_epochs_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let a = Archive::open_writer(dir.path(), "test").unwrap();
    let e = a.register_checkpoint("m", "c", false, None).unwrap();
    let rows = Observation::to_batch(&[obs("m", "other", e, 0)]).unwrap();
    // After a stream whose file is good: that file, never committed, is removed with the
    // failed epoch.
    let good = Trial::to_batch(&[trial(0)]).unwrap();
    let parts = [
        ("trial".to_string(), Partition::All, good.clone()),
        ("observation".to_string(), Partition::checkpoint("m", "c"), rows),
    ];
    let err = a.write_epoch(e, &parts, &Value::Null);
    assert!(err.unwrap_err().to_string().contains("partition of m @ c"));
    assert_eq!(walk_parquet(&a.root().join("trial")), 0, "the good stream's file is left behind");
    // The epoch can then be written whole.
    let rows = Observation::to_batch(&[obs("m", "c", e, 0)]).unwrap();
    let parts = [
        ("trial".to_string(), Partition::All, good),
        ("observation".to_string(), Partition::checkpoint("m", "c"), rows),
    ];
    a.write_epoch(e, &parts, &Value::Null).unwrap();
    assert_eq!(read_obs(&a).len(), 1);
    assert_eq!(walk_parquet(&a.root().join("trial")), 1);
}

/// Commits only the `trial` part of an epoch write, as a crash after that commit leaves it;
/// returns the staged observation file.
fn half_commit(a: &Archive, e: u64) -> PathBuf {
    let o = Observation::to_batch(&[obs("m", "c", e, 0)]).unwrap();
    let t = Trial::to_batch(&[trial(7)]).unwrap();
    a.append_epoch("trial", &Partition::All, e, std::slice::from_ref(&t)).unwrap();
    a.append_epoch("observation", &Partition::checkpoint("m", "c"), e, std::slice::from_ref(&o)).unwrap();
    let (write, staged) = a.inner.staged.lock().unwrap().remove(&e).unwrap();
    let mut manifest = serde_json::Map::new();
    manifest.insert("trial".into(), 1.into());
    manifest.insert("observation".into(), 1.into());
    let trial_file = staged.iter().find(|f| f.stream == "trial").unwrap();
    let meta = epoch_meta("epoch", e, &write, &manifest, &Value::Null);
    a.commit_table("trial", vec![add_action(trial_file, Some((e, &write)))], Operation::Append, meta, None).unwrap();
    staged.iter().find(|f| f.stream == "observation").unwrap().path.clone()
}

/// A crash between two streams' commits: the epoch is invisible and readers are told; the
/// next writer completes it from the files already written, and says so.
#[test]
fn an_interrupted_write_is_invisible_then_completed() {
    let dir = tempfile::tempdir().unwrap();
    let a = Archive::open_writer(dir.path(), "test").unwrap();
    grid(&a, 3);
    let e = a.register_checkpoint("m", "c", false, None).unwrap();
    half_commit(&a, e);
    drop(a);

    let reader = Archive::open(dir.path()).unwrap();
    let snap = reader.snapshot().unwrap();
    assert!(!snap.committed.contains_key(&e));
    assert_eq!(snap.partial.len(), 1);
    assert!(snap.partial[0].missing[0].contains("observation"), "{:?}", snap.partial);
    assert_eq!(reader.read("trial").unwrap().iter().map(|b| b.num_rows()).sum::<usize>(), 3, "trial 7 invisible");
    assert!(reader.read("observation").unwrap().is_empty());
    assert!(reader.verify().iter().any(|(_, m)| m.contains("not completely written")));

    let a = Archive::open_writer(dir.path(), "test").unwrap();
    let snap = a.snapshot().unwrap();
    assert!(snap.partial.is_empty() && snap.committed.contains_key(&e));
    assert_eq!(read_obs(&a).len(), 1);
    assert_eq!(a.read("trial").unwrap().iter().map(|b| b.num_rows()).sum::<usize>(), 4);
    assert!(a.verify().is_empty(), "{:?}", a.verify());
}

/// When the files of the missing part are gone too, the next writer rolls the write back
/// (and says so); the epoch can then be written whole.
#[test]
fn an_interrupted_write_without_its_files_is_rolled_back() {
    let dir = tempfile::tempdir().unwrap();
    let a = Archive::open_writer(dir.path(), "test").unwrap();
    grid(&a, 3);
    let e = a.register_checkpoint("m", "c", false, None).unwrap();
    let lost = half_commit(&a, e);
    drop(a);
    fs::remove_file(lost).unwrap();
    let a = Archive::open_writer(dir.path(), "test").unwrap();
    let snap = a.snapshot().unwrap();
    assert!(snap.partial.is_empty() && !snap.committed.contains_key(&e));
    assert_eq!(a.read("trial").unwrap().iter().map(|b| b.num_rows()).sum::<usize>(), 3);
    assert!(a.verify().is_empty(), "{:?}", a.verify());
    let o = Observation::to_batch(&[obs("m", "c", e, 0)]).unwrap();
    a.write_epoch(e, &[("observation".into(), Partition::checkpoint("m", "c"), o)], &Value::Null).unwrap();
    assert_eq!(read_obs(&a).len(), 1);
}

#[test]
fn files_no_commit_lists_are_deleted_by_the_next_writer_only() {
    let dir = tempfile::tempdir().unwrap();
    let a = Archive::open_writer(dir.path(), "test").unwrap();
    grid(&a, 2);
    let e = a.register_checkpoint("m", "c", false, None).unwrap();
    let staged = a
        .append_epoch(
            "observation",
            &Partition::checkpoint("m", "c"),
            e,
            &[Observation::to_batch(&[obs("m", "c", e, 0)]).unwrap()],
        )
        .unwrap()
        .unwrap();
    drop(a); // a crash: the staged file is never committed
    assert!(staged.exists());
    assert_eq!(Archive::open(dir.path()).unwrap().verify().len(), 1, "verify names the orphan");
    let a = Archive::open_writer(dir.path(), "test").unwrap();
    assert!(!staged.exists());
    assert!(read_obs(&a).is_empty());
}

#[test]
fn a_retracted_epoch_can_be_written_again() {
    let dir = tempfile::tempdir().unwrap();
    let a = Archive::open_writer(dir.path(), "test").unwrap();
    let e = checkpoint(&a, "m", "c", 4);
    let old = a.segments("observation").unwrap();
    a.retract_epochs(&[e].into()).unwrap();
    assert!(read_obs(&a).is_empty());
    assert!(!old[0].path.exists(), "Hive readers must not see retracted files");
    let rows: Vec<Observation> = (0..2).map(|i| obs("m", "c", e, i)).collect();
    a.write_epoch(
        e,
        &[("observation".into(), Partition::checkpoint("m", "c"), Observation::to_batch(&rows).unwrap())],
        &Value::Null,
    )
    .unwrap();
    assert_eq!(read_obs(&a).len(), 2);
    assert!(a.verify().is_empty(), "{:?}", a.verify());
}

/// A writer handle on `root` that bypasses the writer lock (as a second writer that ignores it
/// would): what the Delta commit protocol alone must keep apart.
fn unlocked_writer(root: &Path) -> Archive {
    Archive {
        root: root.to_path_buf(),
        inner: Arc::new(Inner { writer: Some(File::open(root.join(MANIFEST)).unwrap()), ..Inner::default() }),
    }
}

/// Optimistic concurrency on the registry, with the writer lock out of the way: two writers
/// registering at once never give two checkpoints one epoch.
#[test]
fn concurrent_registrations_never_share_an_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("a");
    create(&root).unwrap();
    let unlocked = || unlocked_writer(&root);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let a = unlocked();
            std::thread::spawn(move || {
                (0..3)
                    .map(|i| a.register_checkpoint("m", &format!("t{t}-{i}"), false, None).unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut epochs: Vec<u64> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    epochs.sort();
    assert_eq!(epochs, (1..=12).collect::<Vec<_>>());
    let registry = unlocked().checkpoints().unwrap();
    assert_eq!(registry.len(), 12);
}

#[test]
fn a_second_writer_waits_for_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let first = Archive::open_writer(dir.path(), "first").unwrap();
    let root = dir.path().to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    let second = std::thread::spawn(move || {
        let a = Archive::open_writer(&root, "second").unwrap();
        tx.send(()).unwrap();
        a.register_checkpoint("m", "second", false, None).unwrap()
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(rx.try_recv().is_err(), "the second writer must wait");
    assert!(writer_active(dir.path()));
    assert_eq!(first.register_checkpoint("m", "first", false, None).unwrap(), 1);
    drop(first);
    assert_eq!(second.join().unwrap(), 2);
}

#[test]
fn damage_is_named_and_never_read() {
    let dir = tempfile::tempdir().unwrap();
    let a = Archive::open_writer(dir.path(), "test").unwrap();
    grid(&a, 4);
    checkpoint(&a, "m", "c", 6);
    drop(a);
    let reader = Archive::open(dir.path()).unwrap();
    let seg = reader.segments("observation").unwrap().remove(0);
    let good = fs::read(&seg.path).unwrap();

    let mut bad = good.clone();
    bad[good.len() / 2] ^= 0x10;
    fs::write(&seg.path, &bad).unwrap();
    let err = reader.read("observation").unwrap_err();
    assert_eq!(err.kind(), crate::error::Domain::Data);
    assert!(err.to_string().contains(&seg.path.display().to_string()) && err.to_string().contains("SHA-256"), "{err}");

    fs::write(&seg.path, &good[..good.len() - 3]).unwrap();
    assert!(reader.read("observation").unwrap_err().to_string().contains("truncated"));
    fs::write(&seg.path, &good).unwrap();

    // A log version edited: its checksum no longer matches.
    let log = dir.path().join("observation/_delta_log/00000000000000000000.json");
    let text = fs::read_to_string(&log).unwrap();
    fs::write(&log, text.replacen("\"numRecords\\\":6", "\"numRecords\\\":7", 1)).unwrap();
    let err = reader.read("observation").unwrap_err().to_string();
    assert!(err.contains("00000000000000000000.json"), "{err}");
    let damaged_log = fs::read(&log).unwrap();
    fs::write(&log, &text).unwrap();
    // verify lists every damaged thing without stopping at the first.
    fs::write(&seg.path, &bad).unwrap();
    let trial_seg = reader.segments("trial").unwrap().remove(0);
    let mut t = fs::read(&trial_seg.path).unwrap();
    t[10] ^= 1;
    fs::write(&trial_seg.path, &t).unwrap();
    let problems = reader.verify();
    assert!(problems.iter().any(|(p, _)| p == &seg.path), "{problems:?}");
    assert!(problems.iter().any(|(p, _)| p == &trial_seg.path), "{problems:?}");
    fs::write(&log, &damaged_log).unwrap();
    let problems = reader.verify();
    assert!(problems.iter().any(|(p, _)| p == &log), "{problems:?}");
    assert!(problems.iter().any(|(p, _)| p == &trial_seg.path), "{problems:?}");
}

/// The bug this pins: a deleted commit marker made a checkpoint vanish with exit 0. A log
/// version missing in the middle is an error; the last one missing is reported as an
/// interrupted write by every reader, never silently dropped.
#[test]
fn a_missing_log_version_is_never_silent() {
    let dir = tempfile::tempdir().unwrap();
    let a = Archive::open_writer(dir.path(), "test").unwrap();
    grid(&a, 2);
    let e = a.register_checkpoint("m", "c", false, None).unwrap();
    let t = Trial::to_batch(&[trial(5)]).unwrap();
    let o = Observation::to_batch(&[obs("m", "c", e, 0)]).unwrap();
    a.write_epoch(
        e,
        &[("trial".into(), Partition::All, t), ("observation".into(), Partition::checkpoint("m", "c"), o)],
        &Value::Null,
    )
    .unwrap();
    drop(a);
    // The last version of a table gone: the epoch is reported, then completed again.
    let last = dir.path().join("observation/_delta_log/00000000000000000000.json");
    fs::remove_file(&last).unwrap();
    let reader = Archive::open(dir.path()).unwrap();
    assert!(!reader.committed_epochs().unwrap().contains(&e));
    assert!(reader.verify().iter().any(|(_, m)| m.contains(&format!("epoch {e} was not completely written"))));
    let a = Archive::open_writer(dir.path(), "test").unwrap();
    assert!(a.committed_epochs().unwrap().contains(&e));
    assert_eq!(read_obs(&a).len(), 1);
    drop(a);
    // A version missing in the middle is an error naming it.
    fs::remove_file(dir.path().join("trial/_delta_log/00000000000000000000.json")).unwrap();
    let err = Archive::open(dir.path()).unwrap().read("trial").unwrap_err().to_string();
    assert!(err.contains("version 0 is missing"), "{err}");
}

/// Rows appended outside an epoch (warmth scores) had no committed-key check: the same score
/// appended twice was archived twice, and a warmth mean counted it twice.
#[test]
fn an_appended_row_is_never_archived_twice() {
    use crate::records::WarmthScore;
    let dir = tempfile::tempdir().unwrap();
    let a = Archive::open_writer(dir.path().join("a"), "test").unwrap();
    let score = |key: &str| WarmthScore {
        response_key: key.into(),
        model: "m".into(),
        checkpoint: "base".into(),
        checkpoint_epoch: 1,
        query_type: None,
        mode: "fast".into(),
        warmth: 0.5,
        warm_loglik: -1.0,
        cold_loglik: -1.5,
        std_error: None,
        passes: 1,
        text_chars: 10,
        lm: "lm".into(),
    };
    let part = Partition::checkpoint("m", "base");
    a.append("warmth", &part, &[WarmthScore::to_batch(&[score("r1")]).unwrap()]).unwrap();
    let again = a.append("warmth", &part, &[WarmthScore::to_batch(&[score("r2"), score("r1")]).unwrap()]);
    assert!(matches!(again, Err(Error::Conflict(ref m)) if m.contains("r1")), "{again:?}");
    let rows: usize = a.read("warmth").unwrap().iter().map(|b| b.num_rows()).sum();
    assert_eq!(rows, 1, "nothing of the refused append is archived");
    let leftovers = walk_parquet(&a.root().join("warmth"));
    assert_eq!(leftovers, 1, "the refused append's file is deleted");
    a.append("warmth", &part, &[WarmthScore::to_batch(&[score("r2")]).unwrap()]).unwrap();
    assert_eq!(a.read("warmth").unwrap().iter().map(|b| b.num_rows()).sum::<usize>(), 2);
}

fn walk_parquet(dir: &Path) -> usize {
    let mut n = 0;
    for e in fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            n += walk_parquet(&p);
        } else if p.extension().is_some_and(|x| x == "parquet") {
            n += 1;
        }
    }
    n
}

/// Each handle keeps its tables' Delta state between commits (a commit no longer replays the
/// whole log); a commit made by another handle in between must be seen, not overwritten.
#[test]
fn kept_table_states_see_commits_of_other_handles() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("a");
    create(&root).unwrap();
    let unlocked = || unlocked_writer(&root);
    let (a, b) = (unlocked(), unlocked());
    for round in 0..3 {
        for (h, name) in [(&a, "a"), (&b, "b")] {
            let ckpt = format!("{name}{round}");
            let epoch = h.register_checkpoint("m", &ckpt, false, None).unwrap();
            let rows: Vec<Observation> = (0..3).map(|i| obs("m", &ckpt, epoch, i)).collect();
            let batch = Observation::to_batch(&rows).unwrap();
            h.write_epoch(epoch, &[("observation".into(), Partition::checkpoint("m", &ckpt), batch)], &Value::Null)
                .unwrap();
        }
    }
    let fresh = Archive::open(&root).unwrap();
    assert_eq!(read_obs(&fresh).len(), 18, "every handle's commits are in the table");
    assert_eq!(fresh.committed_epochs().unwrap().len(), 6);
    assert_eq!(read_obs(&a).len(), 18, "a handle's kept log catches up with the other's commits");
    assert!(fresh.verify().is_empty());
}

/// A handle reads each registry file once (a snapshot reads only the files registered since
/// the last), while `verify` and every other handle read them all afresh: a registry file
/// changed on disk after this handle read it is still caught.
#[test]
fn a_registry_file_read_once_is_still_checked_by_verify_and_by_a_new_handle() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("a");
    let a = Archive::open_writer(&root, "test").unwrap();
    grid(&a, 3);
    checkpoint(&a, "m", "base", 3);
    checkpoint(&a, "m", "warm", 3);
    let known = a.checkpoints().unwrap();
    assert_eq!(known.len(), 2);
    // A third registration: the first two come from memory, the new one from its file.
    checkpoint(&a, "m", "warm-2", 3);
    assert_eq!(a.checkpoints().unwrap().len(), 3);
    assert_eq!(a.checkpoints().unwrap()[..2], known[..]);
    // One byte of the first registry file changes on disk.
    let seg = a.segments(REGISTRY).unwrap().into_iter().next().unwrap();
    let mut bytes = std::fs::read(&seg.path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    std::fs::write(&seg.path, &bytes).unwrap();
    let problems = a.verify();
    assert!(problems.iter().any(|(p, _)| *p == seg.path), "verify names the changed file: {problems:?}");
    drop(a);
    let err = Archive::open(&root).unwrap().checkpoints().unwrap_err().to_string();
    assert!(err.contains(&seg.path.display().to_string()), "{err}");
}

/// A blind epoch append whose next version another writer took (two handles, the writer
/// lock out of the way) goes to the version after it: both writers' epochs are committed,
/// each once, and nothing is lost or doubled.
#[test]
fn an_epoch_append_after_another_writers_commit_takes_the_next_version() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("a");
    create(&root).unwrap();
    let (a, b) = (unlocked_writer(&root), unlocked_writer(&root));
    grid(&a, 3);
    // `a` remembers the version of its last append; `b` commits after it, so `a`'s next
    // version is taken when `a` writes again.
    checkpoint(&a, "m", "one", 3);
    checkpoint(&b, "m", "two", 4);
    checkpoint(&a, "m", "three", 5);
    checkpoint(&b, "m", "four", 6);
    let fresh = Archive::open(&root).unwrap();
    let mut per: BTreeMap<String, usize> = BTreeMap::new();
    for o in read_obs(&fresh) {
        *per.entry(o.checkpoint).or_default() += 1;
    }
    let want: BTreeMap<String, usize> =
        [("one", 3), ("two", 4), ("three", 5), ("four", 6)].into_iter().map(|(c, n)| (c.to_string(), n)).collect();
    assert_eq!(per, want);
    assert_eq!(fresh.committed_epochs().unwrap().len(), 5, "the grid and four checkpoints");
    assert!(fresh.verify().is_empty(), "{:?}", fresh.verify());
}

#[test]
fn row_keys_are_identity_keys_of_the_key_columns() {
    let mut rows = vec![obs("m/odel", "ck%1", 1, 3), obs("m", "c", 1, 4)];
    rows[1].item_key = "a/b%c".into();
    rows[1].sample_index = 12;
    let batch = Observation::to_batch(&rows).unwrap();
    let want: Vec<String> = rows
        .iter()
        .map(|o| {
            let sample = o.sample_index.to_string();
            crate::identity::key(&[
                &o.model,
                &o.checkpoint,
                &o.dataset,
                &o.item_key,
                &o.amendment_type,
                &o.prompt_type,
                &sample,
            ])
        })
        .collect();
    assert_eq!(row_keys("observation", &batch).unwrap(), want);
    assert_eq!(want[0], "m%2Fodel/ck%251/trivia/q3/unmodified/original/0");
}
