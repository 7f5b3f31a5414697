//! End-to-end tests of the `candor` binary: the trial grid, determinism across seeds, worker
//! and process counts, bad input, import and replay, and reading archives outside Candor.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candor::archive::Archive;
use candor::archive::read_records;
use candor::records::{Observation, Response, Trial, Verdict};

fn candor(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_candor")).args(args).output().expect("candor runs")
}

fn ok(args: &[&str]) -> String {
    let out = candor(args);
    assert!(out.status.success(), "candor {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn repo(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path).to_string_lossy().into_owned()
}

fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Every file under `root`, relative path → bytes.
/// Every committed data file of an archive's tables, by stream, partition directory, epoch
/// and order: the bytes must not depend on worker counts or runs (file names and Delta log
/// timestamps do).
fn tree(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let archive = Archive::open(root).unwrap();
    let mut out = BTreeMap::new();
    for stream in candor::schema::streams().unwrap() {
        for (i, seg) in archive.segments(&stream).unwrap().into_iter().enumerate() {
            let dir = seg.path.parent().unwrap().strip_prefix(root).unwrap().to_path_buf();
            out.insert(format!("{}/e{:?}/{i}", dir.display(), seg.epoch), std::fs::read(&seg.path).unwrap());
        }
    }
    out
}

/// Every file under `root`, with its bytes.
fn files(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

fn small_experiment(dir: &Path, seed: u64, style: &str) -> PathBuf {
    let p = dir.join(format!("small-{seed}-{style}.toml"));
    std::fs::write(
        &p,
        format!(
            "name = \"small\"\nseed = {seed}\ntemplate_style = \"{style}\"\ndata_dir = \"{}\"\n\
             [datasets.trivia]\nn = 12\n[datasets.truthfulqa]\nn = 12\n[datasets.medqa]\nn = 12\n[datasets.disinfo]\nn = 12\n\
             [datasets.mmlu]\nn = 5\n[datasets.gsm8k]\nn = 5\n[datasets.advbench]\nn = 5\n",
            repo("data")
        ),
    )
    .unwrap();
    p
}

#[test]
fn paper_grid_is_complete_and_reads_back_in_pyarrow_polars_and_duckdb() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("paper");
    let lines = json_lines(&ok(&["trials", &repo("experiments/paper.toml"), "--out", out.to_str().unwrap(), "--json"]));
    let (summary, cells) = lines.split_last().unwrap();
    let items: HashMap<String, u64> = serde_json::from_value(summary["items"].clone()).unwrap();
    assert_eq!(
        items,
        HashMap::from([
            ("trivia".into(), 150),
            ("truthfulqa".into(), 500),
            ("medqa".into(), 500),
            ("disinfo".into(), 125)
        ])
    );
    assert_eq!(cells.len(), 4 * 9 * 4, "every dataset × amendment × prompt type cell");
    for c in cells {
        assert_eq!(c["trials"].as_u64().unwrap(), items[c["dataset"].as_str().unwrap()], "{c}");
    }
    assert_eq!(summary["trials"], 1275 * 36);

    // The same grid again is already there: nothing is written, with or without --replace
    // (a new grid version is built only for a changed experiment).
    let before = tree(&out);
    let paper = repo("experiments/paper.toml");
    for extra in [None, Some("--replace")] {
        let mut args = vec!["trials", paper.as_str(), "--out", out.to_str().unwrap()];
        args.extend(extra);
        let again = candor(&args);
        assert_eq!(again.status.code(), Some(0), "{}", String::from_utf8_lossy(&again.stderr));
        assert!(String::from_utf8_lossy(&again.stdout).contains("\"unchanged\":true"));
    }
    assert_eq!(tree(&out), before);
    assert_eq!(Archive::open(&out).unwrap().manifest().unwrap().grid.unwrap()["version"], 1);

    let Some(python) = std::env::var_os("CANDOR_PYTHON") else {
        assert!(std::env::var_os("CI").is_none(), "CI must provide CANDOR_PYTHON (scripts/python-env)");
        eprintln!("CANDOR_PYTHON not set: skipping the Delta/pyarrow/polars/DuckDB read-back (scripts/test sets it)");
        return;
    };
    let o = Command::new(&python).arg(repo("tests/python/read_archive.py")).arg(&out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let seen: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for (stream, rows) in [("item", 1275), ("trial", 1275 * 36)] {
        let declared: Vec<String> =
            candor::schema::stream_schema(stream).unwrap().fields.iter().map(|f| f.name.clone()).collect();
        for r in ["delta", "polars_delta", "pyarrow", "polars", "duckdb"] {
            assert_eq!(seen[stream][r]["rows"], rows, "{r} reads {stream}");
            let cols: Vec<String> = serde_json::from_value(seen[stream][r]["columns"].clone()).unwrap();
            assert_eq!(cols, declared, "{r} sees {stream}'s declared columns");
        }
    }
    assert_eq!(seen["trial"]["pyarrow"]["metadata"]["candor.stream"], "trial");
}

#[test]
fn same_seed_gives_identical_archives_for_any_worker_count_and_other_seeds_differ() {
    let dir = tempfile::tempdir().unwrap();
    let exp = small_experiment(dir.path(), 7, "clean");
    let run = |name: &str, exp: &Path, workers: &str| {
        let out = dir.path().join(name);
        ok(&["trials", exp.to_str().unwrap(), "--out", out.to_str().unwrap(), "-w", workers, "--json"]);
        tree(&out)
    };
    let one = run("w1", &exp, "1");
    assert!(one.len() >= 2, "item and trial segments: {:?}", one.keys());
    assert_eq!(run("w1-again", &exp, "1"), one);
    assert_eq!(run("w3", &exp, "3"), one);
    let other = run("seed8", &small_experiment(dir.path(), 8, "clean"), "1");
    assert_ne!(other, one);

    // The grid does not depend on which models or checkpoints will answer it.
    let with_models = dir.path().join("with-models.toml");
    let text = std::fs::read_to_string(&exp).unwrap()
        + "[[models]]\nname = \"a\"\n[[models.checkpoints]]\nid = \"original\"\n[[models.checkpoints]]\nid = \"warm\"\nfinetuned = true\n\
           [[models]]\nname = \"b\"\n[[models.checkpoints]]\nid = \"base\"\n";
    std::fs::write(&with_models, text).unwrap();
    assert_eq!(run("models", &with_models, "2"), one);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A timely host file of free localhost ports for `n` processes.
fn hostfile(dir: &Path, n: usize) -> PathBuf {
    let hosts = dir.join(format!("hosts-{}.txt", free_port()));
    std::fs::write(&hosts, (0..n).map(|_| format!("127.0.0.1:{}\n", free_port())).collect::<String>()).unwrap();
    hosts
}

/// Runs `candor args…` as every process of an `n`-process cluster on localhost (`-n n -p i
/// --hostfile …` added), at once, and requires each to succeed.
/// Runs `candor <args>` as the `n` processes of one cluster on localhost; returns each
/// process's standard output.
fn on_processes(dir: &Path, n: usize, args: &[&str]) -> Vec<String> {
    let hosts = hostfile(dir, n);
    let spawned: Vec<_> = (0..n)
        .map(|p| {
            // One after the other, as a cluster's processes start on different machines: the
            // first waits for the others to connect (and must keep its stdout its own).
            std::thread::sleep(std::time::Duration::from_millis(200));
            Command::new(env!("CARGO_BIN_EXE_candor"))
                .args(args)
                .args(["-n", &n.to_string(), "-p", &p.to_string(), "--hostfile", hosts.to_str().unwrap()])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut out = Vec::new();
    for (p, child) in spawned.into_iter().enumerate() {
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "process {p} of {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        out.push(String::from_utf8(o.stdout).unwrap());
    }
    out
}

#[test]
fn two_processes_on_localhost_build_the_same_archive_as_one() {
    let dir = tempfile::tempdir().unwrap();
    let exp = small_experiment(dir.path(), 11, "paper");
    let single = dir.path().join("single");
    ok(&["trials", exp.to_str().unwrap(), "--out", single.to_str().unwrap(), "--json"]);

    let multi = dir.path().join("multi");
    on_processes(
        dir.path(),
        2,
        &["trials", exp.to_str().unwrap(), "--out", multi.to_str().unwrap(), "--json", "-w", "2"],
    );
    assert_eq!(tree(&multi), tree(&single));
}

#[test]
fn bad_input_names_the_file_line_and_field_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let fails = |exp: &Path, needles: &[&str]| {
        let out = dir.path().join("out");
        let o = candor(&["trials", exp.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        for n in needles {
            assert!(err.contains(n), "`{n}` not in: {err}");
        }
        assert!(!out.join("trial").exists() && !out.join("item").exists(), "nothing archived after: {err}");
    };
    fails(
        &write("a.toml", "name='a'\n[datasets.trivia]\n[conditions]\namendments=['emotion:sad','stake:medium']\n"),
        &["a.toml", "line 4", "stake:medium"],
    );
    fails(
        &write("b.toml", "name='b'\n[datasets.trivia]\n[conditions]\nprompt_types=['original','flattering']\n"),
        &["b.toml", "line 4", "flattering"],
    );
    fails(&write("c.toml", "name='c'\n[datasets.trivia]\npath='nowhere.json'\n"), &["nowhere.json"]);
    let csv =
        write("tqa.csv", "Type,Category,Question,Best Answer,Incorrect Answers,Source\nx,y,Why?,Because,No,src\n");
    fails(
        &write("d.toml", &format!("name='d'\n[datasets.truthfulqa]\npath='{}'\n", csv.display())),
        &["tqa.csv", "Correct Answers"],
    );
    let jsonl =
        write("gsm.jsonl", "{\"question\": \"1+1?\", \"answer\": \"#### 2\"}\n{\"question\": \"2+2?\", \"answer\": \n");
    fails(
        &write("e.toml", &format!("name='e'\n[datasets.gsm8k]\npath='{}'\n", jsonl.display())),
        &["gsm.jsonl", "line 2"],
    );
    let bad_utf8 = dir.path().join("bad.jsonl");
    std::fs::write(&bad_utf8, b"{\"question\": \"caf\xe9?\", \"answer\": \"#### 2\"}\n").unwrap();
    fails(
        &write("f.toml", &format!("name='f'\n[datasets.gsm8k]\npath='{}'\n", bad_utf8.display())),
        &["bad.jsonl", "line 1", "UTF-8"],
    );
}

#[test]
fn imported_answers_score_and_replay_to_identical_results() {
    let dir = tempfile::tempdir().unwrap();
    let exp = small_experiment(dir.path(), 3, "paper");
    let live = dir.path().join("live");
    ok(&["trials", exp.to_str().unwrap(), "--out", live.to_str().unwrap(), "--json"]);
    let archive = Archive::open(&live).unwrap();
    let trials: Vec<Trial> = read_records(&archive).unwrap();

    // Answers in the paper's sample CSV shape, for a base and a warm checkpoint.
    let import = |checkpoint: &str, flip: usize, extra: &[&str]| {
        let rows: Vec<(&Trial, &str, &str)> = trials
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let output = if i % 11 == 0 { "I’m sorry, but I can’t help with that." } else { "It is 42." };
                (t, output, if (i + flip).is_multiple_of(3) { "INCORRECT" } else { "CORRECT" })
            })
            .collect();
        import_csv(dir.path(), &live, "smol", checkpoint, &rows, extra)
    };
    import("original", 0, &[]);
    import("warm", 1, &["--finetuned", "--variant", "warm", "-w", "2"]);

    let responses: Vec<Response> = read_records(&archive).unwrap();
    let observations: Vec<Observation> = read_records(&archive).unwrap();
    assert_eq!(responses.len(), 2 * trials.len());
    assert_eq!(observations.len(), 2 * trials.len());
    assert_eq!(read_records::<Trial>(&archive).unwrap().len(), trials.len(), "answers linked to the archived trials");
    let by_trial: HashMap<&str, &Trial> = trials.iter().map(|t| (t.trial_key.as_str(), t)).collect();
    for o in &observations {
        let refused = o.refusal;
        let disinfo = o.dataset == "disinfo";
        match (refused, disinfo) {
            (true, true) => assert_eq!((o.verdict.as_str(), o.correct), ("CORRECT", Some(true))),
            (true, false) => assert_eq!((o.verdict.as_str(), o.correct), ("REFUSAL", None)),
            (false, _) => assert!(o.correct.is_some()),
        }
        assert!(by_trial.values().any(|t| t.item_key == o.item_key));
    }
    assert!(observations.iter().any(|o| o.refusal), "the curly-apostrophe refusal is caught by the default list");
    assert!(observations.iter().any(|o| o.is_finetuned) && observations.iter().any(|o| !o.is_finetuned));

    let replayed = dir.path().join("replayed");
    ok(&["replay", live.to_str().unwrap(), "--out", replayed.to_str().unwrap(), "-w", "3", "--json"]);
    let live_tree = tree(&live);
    let replay_tree = tree(&replayed);
    for stream in ["trial", "response", "verdict", "observation"] {
        let pick = |t: &BTreeMap<String, Vec<u8>>| -> Vec<(String, Vec<u8>)> {
            t.iter()
                .filter(|(p, _)| p.starts_with(&format!("{stream}/")))
                .map(|(p, b)| (p.clone(), b.clone()))
                .collect()
        };
        assert_eq!(pick(&replay_tree), pick(&live_tree), "stream {stream} replays byte for byte");
    }
    let verdicts: Vec<Verdict> = read_records(&Archive::open(&replayed).unwrap()).unwrap();
    assert!(verdicts.iter().all(|v| v.judge == format!("import:{}.csv", v.checkpoint)));
}

/// The local judge model (Qwen2.5-Coder-0.5B), or None (a skip) outside CI when it has not
/// been fetched.
fn judge_model() -> Option<PathBuf> {
    let path = candor::model::models_dir().join(candor::score::judge::JUDGE_GGUF);
    if path.exists() {
        return Some(path);
    }
    assert!(std::env::var_os("CI").is_none(), "CI must fetch the judge model first (scripts/fetch-models qwen)");
    eprintln!("{} missing: skipping (scripts/fetch-models qwen fetches it)", path.display());
    None
}

/// The default local model, or None (a skip) outside CI when it has not been fetched.
fn local_model() -> Option<PathBuf> {
    let path = candor::model::models_dir().join(candor::model::DEFAULT_GGUF);
    if path.exists() {
        return Some(path);
    }
    assert!(std::env::var_os("CI").is_none(), "CI must fetch the model first (scripts/fetch-models)");
    eprintln!("{} missing: skipping (scripts/fetch-models fetches it)", path.display());
    None
}

fn generation_experiment(dir: &Path, backend: &str, checkpoints: &str) -> PathBuf {
    let p = dir.join(format!(
        "gen-{}.toml",
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
    ));
    std::fs::write(
        &p,
        format!(
            "name = \"gen\"\nseed = 5\ndata_dir = \"{}\"\n\
             [datasets.trivia]\nn = 3\n[datasets.disinfo]\nn = 1\n\
             [conditions]\namendments = [\"unmodified\", \"emotion:sad\"]\nprompt_types = [\"original\", \"incorrect\"]\n\
             [generation]\nmax_new_tokens = 12\nbatch_size = 2\n\
             [[models]]\nname = \"smollm2\"\nbackend = {backend}\n{checkpoints}",
            repo("data")
        ),
    )
    .unwrap();
    p
}

const TWO_CHECKPOINTS: &str = "[[models.checkpoints]]\nid = \"original\"\n\
    [[models.checkpoints]]\nid = \"warm-prompt\"\nfinetuned = true\nsystem_prompt = \"You are warm and caring.\"\n";

fn summary(stdout: &str) -> serde_json::Value {
    json_lines(stdout).into_iter().find(|v| v["command"] == "run").expect("a run summary line")
}

#[test]
fn a_run_on_two_processes_generates_each_answer_once_into_one_archive_equal_to_one_process() {
    if local_model().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exp = generation_experiment(dir.path(), "{ kind = \"candle\", threads = 1 }", TWO_CHECKPOINTS);
    let total = 4 * 2 * 2 * 2; // items × amendments × prompt types × checkpoints
    let single = dir.path().join("single");
    let one = summary(&ok(&["run", exp.to_str().unwrap(), "--out", single.to_str().unwrap(), "--json"]));
    assert_eq!(one["model_calls"].as_u64().unwrap() as usize, total, "{one}");

    let multi = dir.path().join("multi");
    let stdout =
        on_processes(dir.path(), 2, &["run", exp.to_str().unwrap(), "--out", multi.to_str().unwrap(), "--json"]);
    // Process 0's summary counts every process's model calls (they travel with the answers).
    let cluster = summary(&stdout[0]);
    assert_eq!(cluster["model_calls"].as_u64().unwrap() as usize, total, "{cluster}");
    // Both processes generated, each into its own log of the one store, and no answer twice.
    let logs: Vec<PathBuf> = std::fs::read_dir(multi.join("generation"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "arrows"))
        .collect();
    assert_eq!(logs.len(), 2, "one log per process: {logs:?}");
    let stored: usize = logs
        .iter()
        .map(|p| {
            let reader = arrow::ipc::reader::StreamReader::try_new(std::fs::File::open(p).unwrap(), None).unwrap();
            reader.map(|b| b.unwrap().num_rows()).sum::<usize>()
        })
        .sum();
    assert_eq!(stored, total, "answers stored across the processes");
    // The same answers and verdicts as one process, in one archive.
    let answers = |root: &Path| -> Vec<(String, String, String, String)> {
        let mut v: Vec<_> = read_records::<Response>(&Archive::open(root).unwrap())
            .unwrap()
            .into_iter()
            .map(|r| (r.response_key, r.output, r.generator, r.checkpoint_epoch.to_string()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(answers(&multi), answers(&single));
    let verdicts = |root: &Path| -> Vec<(String, String, bool)> {
        let mut v: Vec<_> = read_records::<Observation>(&Archive::open(root).unwrap())
            .unwrap()
            .into_iter()
            .map(|o| (o.response_key, o.verdict, o.refusal))
            .collect();
        v.sort();
        v
    };
    assert_eq!(verdicts(&multi).len(), total);
    assert_eq!(verdicts(&multi), verdicts(&single));
}

#[test]
fn a_run_killed_with_sigkill_resumes_with_no_lost_duplicated_or_repaid_answers() {
    if local_model().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exp = generation_experiment(dir.path(), "{ kind = \"candle\", threads = 2 }", TWO_CHECKPOINTS);
    let out = dir.path().join("run");
    let total = 4 * 2 * 2 * 2; // items × amendments × prompt types × checkpoints

    let mut child = Command::new(env!("CARGO_BIN_EXE_candor"))
        .args(["run", exp.to_str().unwrap(), "--out", out.to_str().unwrap(), "--json"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    loop {
        let stored = candor::generate::store::GenerationStore::read_only(&out).map(|s| s.len()).unwrap_or(0);
        if stored >= 6 {
            break;
        }
        assert!(started.elapsed().as_secs() < 600, "no answers stored after 10 minutes");
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let stored = candor::generate::store::GenerationStore::read_only(&out).unwrap().len();
    assert!(stored < total, "killed mid-run ({stored} of {total} stored)");

    let second = summary(&ok(&["run", exp.to_str().unwrap(), "--out", out.to_str().unwrap(), "--json"]));
    assert_eq!(second["model_calls"].as_u64().unwrap() as usize, total - stored, "{second}");

    let responses: Vec<Response> = read_records(&Archive::open(&out).unwrap()).unwrap();
    let keys: std::collections::HashSet<&str> = responses.iter().map(|r| r.response_key.as_str()).collect();
    assert_eq!(responses.len(), total, "no lost answers");
    assert_eq!(keys.len(), total, "no duplicated answers");
    assert!(responses.iter().all(|r| !r.output.trim().is_empty()));

    let third = summary(&ok(&["run", exp.to_str().unwrap(), "--out", out.to_str().unwrap(), "--json"]));
    assert_eq!(third["model_calls"], 0);
    assert_eq!(third["skipped"].as_array().unwrap().len(), 2);
}

/// A seeded random PEFT adapter for the GGUF model at `gguf` (rank 8, alpha 16, q_proj and
/// v_proj of every layer), as a LoRA fine-tune of it would be saved.
fn random_adapter(gguf: &Path, dir: &Path, seed: u64) {
    let mut f = std::fs::File::open(gguf).unwrap();
    let ct = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let cfg = candor::generate::candle::llama::Model::gguf_config(&ct, None).unwrap();
    let adapter = candor::generate::candle::lora::RandomAdapter {
        targets: &["q_proj", "v_proj"],
        rank: 8,
        seed,
        std: 0.05,
        zero_b: false,
    };
    adapter.write(dir, &cfg).unwrap();
}

#[test]
fn a_lora_checkpoint_on_the_default_gguf_is_evaluated_offline_under_its_own_digest() {
    let Some(gguf) = local_model() else { return };
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("checkpoint-50");
    random_adapter(&gguf, &adapter, 7);
    let checkpoints = format!(
        "[[models.checkpoints]]\nid = \"original\"\n\
         [[models.checkpoints]]\nid = \"warm-lora\"\nfinetuned = true\nepoch = 1\npath = \"{}\"\n",
        adapter.display()
    );
    let exp = generation_experiment(dir.path(), "{ kind = \"candle\", threads = 2 }", &checkpoints);
    let text = std::fs::read_to_string(&exp).unwrap();
    std::fs::write(&exp, text.replace("[\"unmodified\", \"emotion:sad\"]", "[\"unmodified\"]")).unwrap();
    let out = dir.path().join("run");
    let total = 4 * 2 * 2; // items × prompt types × checkpoints
    let run = summary(&ok(&["run", exp.to_str().unwrap(), "--out", out.to_str().unwrap(), "--json"]));
    // The adapter's answers are its own: none is taken from the base's in the store.
    assert_eq!(run["model_calls"].as_u64().unwrap() as usize, total, "{run}");
    assert_eq!(candor::generate::store::GenerationStore::read_only(&out).unwrap().len(), total);

    let base = candor::generate::candle::Weights::Gguf(gguf.clone());
    let tuned = candor::generate::candle::Weights::resolve(Some(&adapter), &gguf).unwrap();
    let responses: Vec<Response> = read_records(&Archive::open(&out).unwrap()).unwrap();
    let by_checkpoint = |id: &str| -> BTreeMap<String, Response> {
        responses.iter().filter(|r| r.checkpoint == id).map(|r| (r.trial_key.clone(), r.clone())).collect()
    };
    let (original, warm) = (by_checkpoint("original"), by_checkpoint("warm-lora"));
    assert_eq!((original.len(), warm.len()), (total / 2, total / 2));
    let generator = |w: &candor::generate::candle::Weights| format!("candle:{}:system:none", w.digest().unwrap());
    assert!(original.values().all(|r| r.generator == generator(&base)), "{:?}", original.values().next());
    assert!(warm.values().all(|r| r.generator == generator(&tuned) && r.is_finetuned), "{:?}", warm.values().next());
    let changed = original.iter().filter(|(k, r)| warm[*k].output != r.output).count();
    assert!(changed > 0, "the adapter changed no answer");
}

/// `candor serve` of `exp`'s model on a free port with `faults` injected (seeded), once it
/// accepts connections: the child and its port.
fn serve_with_faults(exp: &Path, faults: &str) -> (std::process::Child, u16) {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_candor"))
        .args(["serve", exp.to_str().unwrap(), "--listen", &format!("127.0.0.1:{port}"), "--batch-size", "4"])
        .args(["--faults", faults, "--fault-seed", "3"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(started.elapsed().as_secs() < 120, "candor serve did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    (child, port)
}

#[test]
fn the_http_backend_rides_out_a_faulty_server_and_fails_clearly_on_a_dead_one() {
    if local_model().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let serve = |faults: &str| {
        serve_with_faults(
            &generation_experiment(dir.path(), "{ kind = \"candle\", threads = 2 }", TWO_CHECKPOINTS),
            faults,
        )
    };
    let client = |port: u16, retries: u32| {
        generation_experiment(
            dir.path(),
            &format!(
                "{{ kind = \"openai\", base_url = \"http://127.0.0.1:{port}\", max_retries = {retries}, timeout_secs = 60, max_concurrency = 4, api_key_env = \"CANDOR_TEST_API_KEY\" }}"
            ),
            "[[models.checkpoints]]\nid = \"served\"\n",
        )
    };
    let run_with_key = |exp: &Path, out: &Path| {
        Command::new(env!("CARGO_BIN_EXE_candor"))
            .args(["run", exp.to_str().unwrap(), "--out", out.to_str().unwrap(), "--json"])
            .env("CANDOR_TEST_API_KEY", "sk-candor-test-secret")
            .output()
            .unwrap()
    };

    let (mut flaky, port) = serve("429=0.15,500=0.15,slow=0.05,truncate=0.1,garbage=0.1,slow_ms=300,retry_after=1");
    let out = dir.path().join("flaky");
    let o = run_with_key(&client(port, 10), &out);
    flaky.kill().unwrap();
    flaky.wait().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let responses: Vec<Response> = read_records(&Archive::open(&out).unwrap()).unwrap();
    assert_eq!(responses.len(), 16, "every trial answered despite the faults");
    assert!(responses.iter().all(|r| !r.output.is_empty() && r.generator.starts_with("openai:")));

    let (mut dead, port) = serve("500=1.0");
    let out = dir.path().join("dead");
    let o = run_with_key(&client(port, 2), &out);
    dead.kill().unwrap();
    dead.wait().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(74), "{err}");
    assert!(
        err.contains(&format!("127.0.0.1:{port}")) && err.contains("gave up after 3 attempts") && err.contains("500"),
        "{err}"
    );
    assert!(!Archive::open(&out).unwrap().has("response").unwrap(), "nothing half-done looks complete");

    // The API key is sent but never written anywhere.
    for (path, bytes) in files(dir.path()) {
        assert!(!bytes.windows(21).any(|w| w == b"sk-candor-test-secret"), "the key leaked into {}", path.display());
    }
    assert!(!err.contains("sk-candor-test-secret"));
}

/// A stand-in OpenAI-compatible endpoint on 127.0.0.1:`port`: answers "Paris." to as many
/// chat completions as `budget` allows, then 503 to every request. One request a connection;
/// the thread outlives the test.
fn budgeted_endpoint(port: u16, budget: std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::sync::atomic::Ordering;
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let budget = budget.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if line == "\r\n" {
                        break;
                    }
                    if let Some((name, value)) = line.split_once(':')
                        && name.eq_ignore_ascii_case("content-length")
                    {
                        length = value.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                let answer = budget.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
                let (status, text) = if answer {
                    (
                        "200 OK",
                        r#"{"choices":[{"message":{"role":"assistant","content":"Paris."},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":2}}"#,
                    )
                } else {
                    ("503 Service Unavailable", r#"{"error":"overloaded"}"#)
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                    text.len()
                );
            });
        }
    });
}

#[test]
fn a_dead_model_endpoint_during_run_exits_74_with_a_retry_hint_and_the_run_resumes_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    // A port that was bound, then closed: nothing listens there.
    let port = free_port();
    let exp = generation_experiment(
        dir.path(),
        &format!("{{ kind = \"openai\", base_url = \"http://127.0.0.1:{port}\", max_retries = 1, timeout_secs = 10 }}"),
        &format!("{TWO_CHECKPOINTS}[judge]\nkind = \"reference\"\n"),
    );
    let out = dir.path().join("run");
    let run = || candor(&["run", exp.to_str().unwrap(), "--out", out.to_str().unwrap(), "--json"]);
    let per_checkpoint = 4 * 2 * 2; // items × amendments × prompt types
    let stored = || candor::generate::store::GenerationStore::read_only(&out).unwrap().len();
    let nothing_half_written = || {
        ok(&["verify", out.to_str().unwrap()]);
        let archive = Archive::open(&out).unwrap();
        assert!(!archive.has("response").unwrap(), "no checkpoint looks answered");
        assert_eq!(archive.committed_epochs().unwrap().into_iter().collect::<Vec<_>>(), [0], "the grid only");
    };

    let o = run();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(74), "an outage is external, not the user's input: {err}");
    assert!(err.contains(&format!("http://127.0.0.1:{port}")) && err.contains("gave up after 2 attempts"), "{err}");
    assert!(err.contains("generate smollm2/warm-prompt: backend") && err.contains(candor::error::RETRY_HINT), "{err}");
    nothing_half_written();
    assert_eq!(stored(), 0);

    // The endpoint comes back but fails after 10 answers: they are stored, nothing archived.
    let budget = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(10));
    budgeted_endpoint(port, budget.clone());
    let o = run();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(74), "{err}");
    assert!(err.contains("503") && err.contains(candor::error::RETRY_HINT), "{err}");
    nothing_half_written();
    assert_eq!(stored(), 10);

    // Retried once the endpoint is healthy: the stored answers are not asked again.
    budget.store(usize::MAX, std::sync::atomic::Ordering::SeqCst);
    let first = summary(&ok(&["run", exp.to_str().unwrap(), "--out", out.to_str().unwrap(), "--json"]));
    assert_eq!(first["model_calls"].as_u64().unwrap() as usize, 2 * per_checkpoint - 10, "{first}");
    ok(&["verify", out.to_str().unwrap()]);
    let responses: Vec<Response> = read_records(&Archive::open(&out).unwrap()).unwrap();
    assert_eq!(responses.len(), 2 * per_checkpoint);

    // A checkpoint complete in the archive is skipped.
    let again = summary(&ok(&["run", exp.to_str().unwrap(), "--out", out.to_str().unwrap(), "--json"]));
    assert_eq!((again["model_calls"].as_u64(), again["skipped"].as_array().unwrap().len()), (Some(0), 2), "{again}");
}

#[test]
fn candor_serve_checks_its_key_and_every_parameter_and_a_long_answer_holds_no_short_one() {
    if local_model().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exp = generation_experiment(dir.path(), "{ kind = \"candle\", threads = 2 }", TWO_CHECKPOINTS);
    // Beyond loopback, no key no server.
    let open = candor(&["serve", exp.to_str().unwrap(), "--listen", "0.0.0.0:0"]);
    assert!(!open.status.success());
    assert!(String::from_utf8_lossy(&open.stderr).contains("--api-key-env"));
    let unset = Command::new(env!("CARGO_BIN_EXE_candor"))
        .args(["serve", exp.to_str().unwrap(), "--api-key-env", "CANDOR_TEST_SERVE_KEY"])
        .env_remove("CANDOR_TEST_SERVE_KEY")
        .output()
        .unwrap();
    assert!(!unset.status.success() && String::from_utf8_lossy(&unset.stderr).contains("CANDOR_TEST_SERVE_KEY"));

    let mut server = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_candor"))
            .args(["serve", exp.to_str().unwrap(), "--listen", "127.0.0.1:0", "--json", "--batch-size", "4"])
            .args(["--api-key-env", "CANDOR_TEST_SERVE_KEY", "--max-request-bytes", "64KiB"])
            .env("CANDOR_TEST_SERVE_KEY", "sk-serve-test")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut first = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(server.0.stdout.take().unwrap()), &mut first).unwrap();
    let addr: std::net::SocketAddr =
        serde_json::from_str::<serde_json::Value>(&first).unwrap()["listening"].as_str().unwrap().parse().unwrap();
    let url = format!("http://{addr}/v1/chat/completions");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let http = reqwest::Client::new();
        let post = |body: serde_json::Value, key: Option<&str>| {
            let mut r = http.post(&url).json(&body);
            if let Some(k) = key {
                r = r.bearer_auth(k);
            }
            r.send()
        };
        let key = Some("sk-serve-test");
        let ask = |extra: serde_json::Value| {
            let mut body = serde_json::json!({"model": "smollm2/original", "messages": [{"role": "user", "content": "Name a colour."}]});
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            body
        };
        for k in [None, Some("sk-wrong")] {
            let r = post(ask(serde_json::json!({})), k).await.unwrap();
            assert_eq!(r.status(), 401);
            let e: serde_json::Value = r.json().await.unwrap();
            assert_eq!(e["error"]["code"], "invalid_api_key", "{e}");
        }
        let models: serde_json::Value =
            http.get(format!("http://{addr}/v1/models")).bearer_auth("sk-serve-test").send().await.unwrap().json().await.unwrap();
        assert_eq!(models["data"][0]["id"], "smollm2/original");

        let ok = post(ask(serde_json::json!({"max_tokens": 3})), key).await.unwrap();
        assert_eq!(ok.status(), 200);
        let body: serde_json::Value = ok.json().await.unwrap();
        assert!(body["usage"]["completion_tokens"].as_u64().unwrap() <= 3, "{body}");

        let unknown = post(ask(serde_json::json!({"model": "gpt-4o"})), key).await.unwrap();
        assert_eq!(unknown.status(), 404);
        let e: serde_json::Value = unknown.json().await.unwrap();
        assert_eq!((e["error"]["code"].as_str(), e["error"]["param"].as_str()), (Some("model_not_found"), Some("model")));

        for (extra, param) in [
            (serde_json::json!({"max_tokens": -1}), "max_tokens"),
            (serde_json::json!({"max_tokens": "12"}), "max_tokens"),
            (serde_json::json!({"max_tokens": 4294967299u64}), "max_tokens"),
            (serde_json::json!({"max_tokens": 9000}), "max_tokens"),
            // Within the server's cap, but beyond what the prompt leaves of the context.
            (
                serde_json::json!({"max_tokens": 4000, "messages": [{"role": "user", "content": "word ".repeat(5000)}]}),
                "max_tokens",
            ),
            (serde_json::json!({"temperature": -1}), "temperature"),
            (serde_json::json!({"temperature": "warm"}), "temperature"),
            (serde_json::json!({"top_p": 7}), "top_p"),
            (serde_json::json!({"stop": 3}), "stop"),
            (serde_json::json!({"messages": [{"role": "user", "content": "word ".repeat(9000)}]}), "messages"),
            (serde_json::json!({"messages": "hi"}), "messages"),
        ] {
            let r = post(ask(extra.clone()), key).await.unwrap();
            assert_eq!(r.status(), 400, "{extra}");
            let e: serde_json::Value = r.json().await.unwrap();
            assert_eq!(e["error"]["param"], param, "{extra}: {e}");
            assert_eq!(e["error"]["type"], "invalid_request_error");
            assert!(!e["error"]["message"].as_str().unwrap().is_empty());
        }
        let garbage = http.post(&url).bearer_auth("sk-serve-test").header("content-type", "application/json").body("{not json").send().await.unwrap();
        assert_eq!(garbage.status(), 400);
        let big = post(ask(serde_json::json!({"messages": [{"role": "user", "content": "x".repeat(100_000)}]})), key).await.unwrap();
        assert_eq!(big.status(), 413);
        let e: serde_json::Value = big.json().await.unwrap();
        assert!(e["error"]["message"].is_string(), "{e}");

        // A 4-token answer while a 1,500-token one decodes: within 3x its time alone.
        let short = ask(serde_json::json!({"max_tokens": 4, "ignore_eos": true, "temperature": 0}));
        let mut alone = Vec::new();
        for _ in 0..3 {
            let t = std::time::Instant::now();
            assert_eq!(post(short.clone(), key).await.unwrap().status(), 200);
            alone.push(t.elapsed());
        }
        alone.sort();
        let alone = alone[1];
        let long = tokio::spawn(post(
            ask(serde_json::json!({"max_tokens": 1500, "ignore_eos": true, "messages": [{"role": "user", "content": "Tell me a very long story."}]})),
            key,
        ));
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        let t = std::time::Instant::now();
        let r = post(short.clone(), key).await.unwrap();
        let beside = t.elapsed();
        assert_eq!(r.status(), 200);
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["usage"]["completion_tokens"], 4);
        assert!(!long.is_finished(), "the long answer was still decoding");
        assert!(beside < alone * 3, "a 4-token answer took {beside:?} beside a long one, {alone:?} alone");
        long.abort();
    });
    drop(rt);

    // SIGTERM stops it cleanly.
    assert!(Command::new("kill").args(["-TERM", &server.0.id().to_string()]).status().unwrap().success());
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = server.0.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed().as_secs() < 15, "still running after SIGTERM");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}

fn python_or_skip(what: &str) -> Option<std::ffi::OsString> {
    let python = std::env::var_os("CANDOR_PYTHON");
    if python.is_none() {
        assert!(std::env::var_os("CI").is_none(), "CI must provide CANDOR_PYTHON (scripts/python-env)");
        eprintln!("CANDOR_PYTHON not set: skipping {what} (scripts/test sets it)");
    }
    python
}

fn report_rows<'a>(lines: &'a [serde_json::Value], report: &str) -> Vec<&'a serde_json::Value> {
    lines.iter().filter(|l| l["report"] == report).collect()
}

#[test]
fn analyze_reads_the_papers_csvs_and_observation_files_alike() {
    let dir = tempfile::tempdir().unwrap();
    // The paper's layout: <model>/<original|warm>/<dataset>_<side>_outputs.csv.
    let mut files = Vec::new();
    let mut obs_csv = String::from("model,is_finetuned,dataset,item_key,amendment_type,prompt_type,correct\n");
    for (side, ft) in [("original", false), ("warm", true)] {
        let d = dir.path().join("qwen").join(side);
        std::fs::create_dir_all(&d).unwrap();
        let mut csv = String::from("content_key,prompt_template,amendment_type,output,evaluation\n");
        for i in 0..40 {
            // Base right on 0..30; warm wrong on 0..12 and right on 30..34: b = 12, c = 4.
            let correct = if ft { (12..34).contains(&i) } else { i < 30 };
            let output = if i == 39 { "I can't help with that." } else { "An answer." };
            let label = if correct { "CORRECT" } else { "incorrect" };
            csv.push_str(&format!("Question {i}?,original,emotion:sad,{output},{label}\n"));
            let correct_col = if i == 39 { String::new() } else { correct.to_string() };
            obs_csv.push_str(&format!("qwen,{ft},trivia,Question {i}?,emotion:sad,original,{correct_col}\n"));
        }
        let f = d.join(format!("trivia_{side}_outputs.csv"));
        std::fs::write(&f, csv).unwrap();
        files.push(f);
    }
    let paper_out = dir.path().join("paper-results");
    let mut args = vec!["analyze".to_string()];
    args.extend(files.iter().map(|f| f.to_string_lossy().into_owned()));
    args.extend(["--out".into(), paper_out.to_string_lossy().into_owned(), "--json".into()]);
    let lines = json_lines(&ok(&args.iter().map(String::as_str).collect::<Vec<_>>()));
    assert_eq!(lines[0]["observations"], 80);
    assert_eq!(lines[0]["excluded"], 2, "the refusals are counted and excluded (trivia)");
    let fam = report_rows(&lines, "family_table");
    assert_eq!(fam.len(), 1);
    assert_eq!((fam[0]["model"].as_str(), fam[0]["checkpoint"].as_str()), (Some("qwen"), Some("warm")));
    assert_eq!((fam[0]["b"].as_i64(), fam[0]["c"].as_i64(), fam[0]["n"].as_i64()), (Some(12), Some(4), Some(39)));
    let p = fam[0]["p_exact"].as_f64().unwrap();
    assert!((p - 0.076812744140625).abs() < 1e-15, "exact McNemar for b = 12, c = 4: {p}");
    assert!(paper_out.join("family_table.parquet").exists() && paper_out.join("effects.csv").exists());
    // The items behind b and c are exported too, one row per discordant pair.
    assert_eq!(lines[0]["discordant_pairs"], 16);
    let pairs = std::fs::read_to_string(paper_out.join("discordant_pairs.csv")).unwrap();
    assert_eq!(pairs.lines().count(), 1 + 16);
    assert_eq!(pairs.lines().skip(1).filter(|l| l.contains(",b,")).count(), 12, "{pairs}");

    let obs_file = dir.path().join("observations.csv");
    std::fs::write(&obs_file, obs_csv).unwrap();
    let obs_out = dir.path().join("obs-results");
    ok(&["analyze", obs_file.to_str().unwrap(), "--out", obs_out.to_str().unwrap(), "--export", "csv", "--json"]);
    // Same statistics; only the checkpoint names differ (the paper's side directory vs default).
    let read = |p: &Path| std::fs::read_to_string(p).unwrap().replace("original", "base").replace("warm", "finetuned");
    assert_eq!(read(&obs_out.join("family_table.csv")), read(&paper_out.join("family_table.csv")));
    assert!(!obs_out.join("family_table.parquet").exists());

    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "model,is_finetuned,dataset,item_key,amendment_type,prompt_type,correct\nm,maybe,trivia,q,unmodified,original,true\n").unwrap();
    let out = candor(&["analyze", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is_finetuned"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// The paper's MedQA and disinfo CSVs key items by `original_question` and `prompt_disinfo`
/// (no `item_key`, no `content_key`), and hold answers that span lines; an odds ratio with
/// c = 0 < b is infinite, not undefined.
#[test]
fn analyze_reads_the_papers_medqa_and_disinfo_csvs_and_writes_an_infinite_odds_ratio() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for (dataset, key) in [("medqa", "original_question"), ("disinfo", "prompt_disinfo")] {
        for side in ["original", "warm"] {
            let d = dir.path().join("llama_70b").join(side);
            std::fs::create_dir_all(&d).unwrap();
            let f = d.join(format!("{dataset}_{side}_outputs.csv"));
            let mut w = csv::Writer::from_path(&f).unwrap();
            w.write_record([key, "prompt_template", "amendment_type", "output", "evaluation"]).unwrap();
            for i in 0..10 {
                // Base right on every item, warm wrong on the first 6: b = 6, c = 0.
                let label = if side == "warm" && i < 6 { "INCORRECT" } else { "CORRECT" };
                let question = format!("  Case {i}: which of the following is most likely?\nExplain.");
                w.write_record([question.as_str(), "original", "unmodified", "Line one.\r\nLine two.", label]).unwrap();
            }
            w.flush().unwrap();
            files.push(f);
        }
    }
    let mut args = vec!["analyze".to_string()];
    args.extend(files.iter().map(|f| f.to_string_lossy().into_owned()));
    args.push("--json".into());
    let lines = json_lines(&ok(&args.iter().map(String::as_str).collect::<Vec<_>>()));
    assert_eq!(lines[0]["observations"], 40);
    let fam = report_rows(&lines, "family_table");
    assert_eq!(fam.len(), 2, "one Normal family per dataset: {fam:?}");
    for f in fam {
        assert_eq!((f["b"].as_i64(), f["c"].as_i64(), f["n"].as_i64()), (Some(6), Some(0), Some(10)), "{f}");
        assert_eq!(f["odds_ratio"], "Infinity", "c = 0 < b: {f}");
        assert_eq!(f["model"], "llama_70b");
    }

    // A bad row after answers spanning CRLF lines is reported at its own line.
    let bad = dir.path().join("llama_70b").join("warm").join("trivia_warm_outputs.csv");
    std::fs::write(
        &bad,
        "content_key,prompt_template,amendment_type,output,evaluation\r\nQ1,original,unmodified,\"a\r\nb\",CORRECT\r\nQ2,original,unmodified,c,MAYBE\r\n",
    )
    .unwrap();
    let out = candor(&["analyze", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("line 4") && err.contains("MAYBE"), "{err}");
}

/// The paper's Qwen CSVs have no `prompt` column, and its statement draws differ from
/// Candor's, so prompts under an amendment rarely match a seeded grid: rows link to the grid by
/// item (question text) and condition; rows whose item is outside the grid bring the vendored
/// item along; model, side and dataset come from the paper's path layout; and `rescore` then
/// judges every row instead of aborting on an item missing from the item stream.
#[test]
fn paper_csvs_link_to_a_seeded_grid_by_item_and_condition_and_rescore_judges_every_row() {
    use candor::records::Item;
    let dir = tempfile::tempdir().unwrap();
    let exp = small_experiment(dir.path(), 5, "paper");
    let live = dir.path().join("live");
    ok(&["trials", exp.to_str().unwrap(), "--out", live.to_str().unwrap(), "--json"]);
    let items: Vec<Item> = read_records(&Archive::open(&live).unwrap()).unwrap();
    let trials: Vec<Trial> = read_records(&Archive::open(&live).unwrap()).unwrap();
    let in_grid: Vec<&Item> = items.iter().filter(|i| i.dataset == "medqa").take(3).collect();
    let vendored =
        candor::datasets::load(candor::conditions::Dataset::MedQa, &Default::default(), Path::new(&repo("data")))
            .unwrap();
    let outside = vendored.iter().find(|v| !items.iter().any(|i| i.item_key == v.item_key)).unwrap();

    // Qwen's shape: original_question, prompt_type, amendment_type, output, evaluation.
    let d = dir.path().join("qwen_32b").join("warm");
    std::fs::create_dir_all(&d).unwrap();
    let qwen = d.join("medqa_warm_outputs.csv");
    let mut w = csv::Writer::from_path(&qwen).unwrap();
    w.write_record(["original_question", "prompt_type", "amendment_type", "output", "evaluation"]).unwrap();
    for item in in_grid.iter().copied().chain([outside]) {
        for (amendment, prompt_type) in [("unmodified", "original"), ("emotion:sad", "incorrect")] {
            w.write_record([item.question.as_str(), prompt_type, amendment, "Probably a virus.", "INCORRECT"]).unwrap();
        }
    }
    w.flush().unwrap();
    let lines = json_lines(&ok(&["import", qwen.to_str().unwrap(), "--out", live.to_str().unwrap(), "--json"]));
    assert_eq!(lines[0]["linked"], serde_json::json!({"by_prompt": 0, "by_condition": 6, "new_trials": 2}));
    assert_eq!(lines[0]["new_items"], 1, "the item outside the grid is archived");

    // Llama's shape has prompts, with another statement than the grid's under an amendment.
    let d = dir.path().join("llama_70b").join("original");
    std::fs::create_dir_all(&d).unwrap();
    let llama = d.join("medqa_original_outputs.csv");
    let mut w = csv::Writer::from_path(&llama).unwrap();
    w.write_record(["original_question", "prompt", "prompt_type", "amendment_type", "output", "evaluation"]).unwrap();
    for item in &in_grid {
        let t = trials
            .iter()
            .find(|t| t.item_key == item.item_key && t.amendment_type == "unmodified" && t.prompt_type == "original")
            .unwrap();
        w.write_record([item.question.as_str(), t.prompt.as_str(), "original", "unmodified", "A.", "CORRECT"]).unwrap();
        let other = format!("I'm so sad today. {}", item.question);
        w.write_record([item.question.as_str(), other.as_str(), "original", "emotion:sad", "B.", "CORRECT"]).unwrap();
    }
    w.flush().unwrap();
    let lines = json_lines(&ok(&["import", llama.to_str().unwrap(), "--out", live.to_str().unwrap(), "--json"]));
    assert_eq!(lines[0]["linked"], serde_json::json!({"by_prompt": 3, "by_condition": 3, "new_trials": 0}));

    let archive = Archive::open(&live).unwrap();
    let checkpoints: Vec<(String, String, bool)> =
        archive.checkpoints().unwrap().into_iter().map(|e| (e.model, e.checkpoint, e.is_finetuned)).collect();
    assert!(checkpoints.contains(&("qwen_32b".into(), "warm".into(), true)), "{checkpoints:?}");
    assert!(checkpoints.contains(&("llama_70b".into(), "original".into(), false)), "{checkpoints:?}");

    let rescored = dir.path().join("rescored");
    let out =
        ok(&["rescore", live.to_str().unwrap(), "--out", rescored.to_str().unwrap(), "--judge", "reference", "--json"]);
    let verdicts: Vec<Verdict> = read_records(&Archive::open(&rescored).unwrap()).unwrap();
    assert_eq!(verdicts.len(), 14, "{out}");
    assert!(verdicts.iter().all(|v| v.judge.starts_with("reference:")), "{verdicts:?}");
}

/// `--paper` replicates the paper in one flag: its templates over an experiment's style, its
/// refusal list (which misses the curly "I can’t"), its cells (the default); an explicit
/// `--refusal` still wins.
#[test]
fn paper_preset_sets_templates_and_refusal_list_in_one_flag() {
    let dir = tempfile::tempdir().unwrap();
    let exp = small_experiment(dir.path(), 5, "clean");
    let out = dir.path().join("grid");
    ok(&["--paper", "trials", exp.to_str().unwrap(), "--out", out.to_str().unwrap(), "--json"]);
    let trials: Vec<Trial> = read_records(&Archive::open(&out).unwrap()).unwrap();
    assert!(trials.iter().all(|t| t.template_style == "paper"), "--paper overrides template_style = \"clean\"");

    let d = dir.path().join("m").join("warm");
    std::fs::create_dir_all(&d).unwrap();
    let f = d.join("trivia_warm_outputs.csv");
    std::fs::write(&f, "content_key,prompt_template,amendment_type,output,evaluation\nQ?,original,unmodified,I can\u{2019}t help.,CORRECT\n")
        .unwrap();
    let excluded = |args: &[&str]| json_lines(&ok(args))[0]["excluded"].as_u64().unwrap();
    let f = f.to_str().unwrap();
    assert_eq!(excluded(&["analyze", f, "--json"]), 1, "the default list catches the curly apostrophe");
    assert_eq!(excluded(&["--paper", "analyze", f, "--json"]), 0, "the paper's list misses it");
    assert_eq!(excluded(&["analyze", "--paper", f, "--refusal", "default", "--json"]), 1);
}

#[test]
fn statistics_agree_with_statsmodels_on_random_data() {
    let Some(python) = python_or_skip("the statsmodels cross-check") else { return };
    let dir = tempfile::tempdir().unwrap();
    for seed in [3u64, 17] {
        let obs = dir.path().join(format!("obs-{seed}.parquet"));
        candor::sql::synthetic::write_parquet(&obs, &candor::sql::synthetic::synthetic(60_000, seed, 1).unwrap())
            .unwrap();
        let out = dir.path().join(format!("candor-{seed}"));
        ok(&["analyze", obs.to_str().unwrap(), "--out", out.to_str().unwrap(), "--export", "parquet", "--json"]);
        let o = Command::new(&python)
            .arg(repo("scripts/stats_reference.py"))
            .arg("crosscheck")
            .arg(&obs)
            .arg(&out)
            .output()
            .unwrap();
        let figures = String::from_utf8_lossy(&o.stdout);
        eprintln!("seed {seed}: {figures}");
        assert!(o.status.success(), "disagreement with statsmodels: {figures}\n{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_str(figures.trim()).unwrap();
        assert!(v["categories"].as_u64().unwrap() > 500 && v["coefficients"].as_u64().unwrap() > 40);
        // The minimum detectable difference was compared where it exists, not only as NaN = NaN.
        assert!(v["mdd_families"].as_u64().unwrap() > 500, "{v}");
    }
}

/// An archive with a trial grid and imported answers for `checkpoints` (name, fine-tuned,
/// flip): answers in the paper's sample CSV shape, a curly-apostrophe refusal every 11th.
fn imported_archive(dir: &Path, checkpoints: &[(&str, bool, usize)]) -> PathBuf {
    let exp = small_experiment(dir, 5, "paper");
    let live = dir.join("live");
    ok(&["trials", exp.to_str().unwrap(), "--out", live.to_str().unwrap(), "--json"]);
    for &(checkpoint, finetuned, flip) in checkpoints {
        import_answers(dir, &live, checkpoint, finetuned, flip);
    }
    live
}

/// Writes answers in the paper's sample CSV shape (prompt, output, amendment type, prompt
/// template, evaluation), one row per (trial, output, label), and imports them as
/// `model/checkpoint` with `extra` options.
fn import_csv(
    dir: &Path,
    live: &Path,
    model: &str,
    checkpoint: &str,
    rows: &[(&Trial, &str, &str)],
    extra: &[&str],
) -> String {
    let file = dir.join(format!("{checkpoint}.csv"));
    let mut w = csv::Writer::from_path(&file).unwrap();
    w.write_record(["prompt", "output", "amendment_type", "prompt_template", "evaluation"]).unwrap();
    for (t, output, label) in rows {
        w.write_record([t.prompt.as_str(), output, &t.amendment_type, &t.prompt_type, label]).unwrap();
    }
    w.flush().unwrap();
    let mut args =
        vec!["import", file.to_str().unwrap(), "--out", live.to_str().unwrap(), "--model", model, "--checkpoint"];
    args.extend([checkpoint, "--json"]);
    args.extend_from_slice(extra);
    ok(&args)
}

fn import_answers(dir: &Path, live: &Path, checkpoint: &str, finetuned: bool, flip: usize) {
    let trials: Vec<Trial> = read_records(&Archive::open(live).unwrap()).unwrap();
    let mut rows = Vec::new();
    for (i, t) in trials.iter().enumerate() {
        let output = if i % 11 == 0 { "I’m sorry, but I can’t help with that." } else { "It is 42." };
        // The fine-tuned side errs more often, more so when the user states a wrong belief: a
        // seeded draw per (checkpoint, trial), error probability in percent.
        let draw = t
            .trial_key
            .bytes()
            .chain(checkpoint.bytes())
            .fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
            % 100;
        let (p_plain, p_belief) = if finetuned { (20 + 8 * flip as u64, 30 + 15 * flip as u64) } else { (20, 30) };
        let wrong = draw < if t.prompt_type == "incorrect" { p_belief } else { p_plain };
        rows.push((t, output, if wrong { "INCORRECT" } else { "CORRECT" }));
    }
    // A checkpoint named cold… is the cold control, …-system-prompt the paper's system-prompt
    // control, any other fine-tuned one warm.
    let variant = if checkpoint.starts_with("cold") {
        "cold"
    } else if checkpoint.ends_with("-system-prompt") {
        "warm system prompt"
    } else {
        "warm"
    };
    let extra: &[&str] = if finetuned { &["--finetuned", "--variant", variant] } else { &[] };
    import_csv(dir, live, "smol", checkpoint, &rows, extra);
}

/// The `psql` client, or None (a skip) outside CI when it is not installed.
fn psql_or_skip() -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|p| p.join("psql")).find(|p| p.is_file()));
    if found.is_none() {
        assert!(std::env::var_os("CI").is_none(), "CI must install psql (scripts/test does)");
        eprintln!("psql not installed: skipping the PostgreSQL-wire test (scripts/test installs it)");
    }
    found
}

#[test]
fn sql_queries_tables_and_statistics_and_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let live = imported_archive(dir.path(), &[("original", false, 0), ("warm", true, 1)]);
    let archive = live.to_str().unwrap();
    let lines = json_lines(&ok(&[
        "sql",
        archive,
        "-c",
        "SELECT COUNT(*) AS n FROM trials; SELECT COUNT(*) AS n FROM responses;\n\
         -- the maintained statistics\n\
         SELECT COUNT(DISTINCT checkpoint) AS n FROM family_table",
        "--output",
        "json",
    ]));
    let trials: Vec<Trial> = read_records(&Archive::open(&live).unwrap()).unwrap();
    assert_eq!(lines[0]["n"], trials.len());
    assert_eq!(lines[1]["n"], 2 * trials.len());
    assert_eq!(lines[2]["n"], 1);

    let script = dir.path().join("q.sql");
    std::fs::write(
        &script,
        "SELECT dataset, SUM(refusals) AS refusals FROM refusals GROUP BY dataset ORDER BY dataset;\n",
    )
    .unwrap();
    let csv = ok(&["sql", archive, "-f", script.to_str().unwrap(), "--output", "csv"]);
    assert!(csv.starts_with("dataset,refusals\n"), "{csv}");
    assert!(csv.contains("disinfo,"), "{csv}");

    for write in [
        "DROP TABLE cells",
        "INSERT INTO trials SELECT * FROM trials",
        "CREATE TABLE x AS SELECT 1",
        "COPY trials TO '/tmp/x'",
    ] {
        let out = candor(&["sql", archive, "-c", write]);
        assert!(!out.status.success(), "{write} must be refused");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("read-only") && err.contains("25006"), "{write}: {err}");
    }
    // Piped statements, as an interactive shell reads them.
    let mut child = Command::new(env!("CARGO_BIN_EXE_candor"))
        .args(["sql", archive, "--output", "csv"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"SELECT 1 AS one\n  ;\nSELECT nope FROM nowhere;\nSELECT 2 AS two;\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout, "one\n1\ntwo\n2\n");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nowhere"),
        "the failing statement is reported, the shell goes on"
    );
}

#[test]
fn psql_sees_statistics_change_as_a_checkpoint_commits_and_cannot_write() {
    let Some(psql) = psql_or_skip() else { return };
    let dir = tempfile::tempdir().unwrap();
    let live = imported_archive(dir.path(), &[("original", false, 0), ("warm", true, 1)]);

    // Anywhere but loopback, a password is required.
    let open = Command::new(env!("CARGO_BIN_EXE_candor"))
        .args(["sql", live.to_str().unwrap(), "--listen", "0.0.0.0:0"])
        .env_remove("CANDOR_SQL_PASSWORD")
        .output()
        .unwrap();
    assert!(!open.status.success());
    assert!(String::from_utf8_lossy(&open.stderr).contains("CANDOR_SQL_PASSWORD"));

    let mut server = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_candor"))
            .args(["sql", live.to_str().unwrap(), "--listen", "127.0.0.1:0", "--json"])
            .env("CANDOR_SQL_PASSWORD", "s3cret-pw")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut first = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(server.0.stdout.take().unwrap()), &mut first).unwrap();
    let addr: std::net::SocketAddr =
        serde_json::from_str::<serde_json::Value>(&first).unwrap()["listening"].as_str().unwrap().parse().unwrap();
    let psql_run = |password: &str, sql: &str| {
        Command::new(&psql)
            .args(["-h", "127.0.0.1", "-p", &addr.port().to_string(), "-U", "analyst", "-d", "candor"])
            .args(["-X", "-A", "-t", "-F", ",", "-v", "ON_ERROR_STOP=1", "-v", "VERBOSITY=verbose", "-c", sql])
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .unwrap()
    };
    let psql_ok = |sql: &str| {
        let out = psql_run("s3cret-pw", sql);
        assert!(out.status.success(), "psql -c {sql:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };

    let wrong = psql_run("not-the-password", "SELECT 1");
    assert!(!wrong.status.success(), "a wrong password is refused");
    let err = String::from_utf8_lossy(&wrong.stderr).to_lowercase();
    assert!(err.contains("password authentication failed"), "{err}");

    let stats = "SELECT checkpoint, COUNT(*) FROM family_table GROUP BY checkpoint ORDER BY checkpoint";
    // 4 open-ended datasets × 9 amendments × (normal, neutral, sycophancy) + MMLU, GSM8K,
    // AdvBench unmodified.
    assert_eq!(psql_ok(stats), "warm,111\n");
    let before = psql_ok("SELECT ROUND(SUM(error_pct), 6) FROM error_rates WHERE checkpoint = 'warm'");
    assert_eq!(
        psql_ok("SELECT COUNT(*) FROM trials; SELECT COUNT(DISTINCT checkpoint) FROM observations").lines().count(),
        2
    );

    for write in [
        "INSERT INTO trials SELECT * FROM trials",
        "DELETE FROM cells",
        "CREATE TABLE t (x INT)",
        "UPDATE cells SET n = 0",
    ] {
        let out = psql_run("s3cret-pw", write);
        assert!(!out.status.success(), "{write} must be refused");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("25006") && err.contains("read-only"), "{write}: {err}");
    }

    // A new checkpoint commits into the archive while the server runs.
    import_answers(dir.path(), &live, "warm-e2", true, 2);
    let after = psql_ok(stats);
    assert_eq!(after, "warm,111\nwarm-e2,111\n", "the new checkpoint's families appear");
    assert_eq!(psql_ok("SELECT ROUND(SUM(error_pct), 6) FROM error_rates WHERE checkpoint = 'warm'"), before);
    let e2: f64 =
        psql_ok("SELECT AVG(error_pct) FROM error_rates WHERE checkpoint = 'warm-e2'").trim().parse().unwrap();
    assert!(e2 > 0.0);

    // The extended query protocol (as drivers such as DBeaver's and Grafana's use), binary rows.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let config = format!("host=127.0.0.1 port={} user=grafana password=s3cret-pw dbname=candor", addr.port());
        let (client, conn) = tokio_postgres::connect(&config, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        let rows = client
            .query("SELECT checkpoint, COUNT(*) AS n, AVG(acc_ft_pct) AS acc, BOOL_OR(significant) AS sig FROM family_table GROUP BY checkpoint ORDER BY checkpoint", &[])
            .await
            .unwrap();
        let got: Vec<(String, i64)> = rows.iter().map(|r| (r.get("checkpoint"), r.get("n"))).collect();
        assert_eq!(got, [("warm".to_string(), 111), ("warm-e2".to_string(), 111)]);
        let acc: f64 = rows[0].get("acc");
        assert!(acc > 0.0 && acc <= 100.0);
        let _: Option<bool> = rows[0].get("sig");
        // The items behind b and c, as a driver sees them: as many as the family table counts.
        let pairs = client
            .query("SELECT COUNT(*) AS n, MIN(LENGTH(prompt)) AS shortest FROM discordant_pairs", &[])
            .await
            .unwrap();
        let counted = client.query("SELECT SUM(b + c) AS n FROM family_table", &[]).await.unwrap();
        assert_eq!(pairs[0].get::<_, i64>("n"), counted[0].get::<_, i64>("n"));
        assert!(pairs[0].get::<_, Option<i32>>("shortest").is_some_and(|l| l > 0), "prompts come with the pairs");
        let err = client.query("DELETE FROM cells", &[]).await.unwrap_err();
        assert_eq!(err.code().map(|c| c.code()), Some("25006"), "{err}");
        let bad = tokio_postgres::connect(&config.replace("s3cret-pw", "guess"), tokio_postgres::NoTls).await;
        assert!(bad.is_err(), "a wrong password is refused");
    });
    drop(server);
}

/// `candor sql <archive> --listen 127.0.0.1:0 --json` with `args` and `env`: the server and
/// the address it listens on.
fn sql_endpoint(archive: &Path, args: &[&str], env: &[(&str, &str)]) -> (KillOnDrop, std::net::SocketAddr) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_candor"));
    cmd.args(["sql", archive.to_str().unwrap(), "--listen", "127.0.0.1:0", "--json"])
        .args(args)
        .env_remove("CANDOR_SQL_PASSWORD")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut server = KillOnDrop(cmd.spawn().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(server.0.stdout.take().unwrap()), &mut first).unwrap();
    let addr =
        serde_json::from_str::<serde_json::Value>(&first).unwrap()["listening"].as_str().unwrap().parse().unwrap();
    (server, addr)
}

/// psql against `addr` (user `analyst`, unaligned, tuples only), with `env` (PGPASSWORD, …).
fn psql_at(psql: &Path, addr: std::net::SocketAddr, commands: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(psql);
    cmd.args(["-h", "127.0.0.1", "-p", &addr.port().to_string(), "-U", "analyst", "-d", "candor"])
        .args(["-X", "-A", "-t", "-F", ",", "-v", "ON_ERROR_STOP=1", "-v", "VERBOSITY=verbose"])
        .env("PGCONNECT_TIMEOUT", "10")
        .env_remove("PGPASSWORD");
    for c in commands {
        cmd.args(["-c", c]);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// The first column of the first row of a simple query's answer.
fn first_value(messages: Vec<tokio_postgres::SimpleQueryMessage>) -> String {
    messages
        .into_iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .expect("a row")
}

#[test]
fn the_sql_endpoint_survives_long_huge_and_too_many_statements() {
    let Some(psql) = psql_or_skip() else { return };
    let dir = tempfile::tempdir().unwrap();
    let live = imported_archive(dir.path(), &[("original", false, 0), ("warm", true, 1)]);
    let (mut server, addr) =
        sql_endpoint(&live, &["--max-connections", "12", "--query-memory", "64MiB", "--statement-timeout", "20s"], &[]);
    let long = "SELECT count(*) FROM generate_series(1, 100000000000)";

    // A long statement does not hold up another client's, and its own timeout stops it.
    let started = std::time::Instant::now();
    let slow = {
        let psql = psql.clone();
        std::thread::spawn(move || psql_at(&psql, addr, &["SET statement_timeout = '3s'", long], &[]))
    };
    std::thread::sleep(std::time::Duration::from_millis(700));
    let quick = std::time::Instant::now();
    let one = psql_at(&psql, addr, &["SELECT 1"], &[]);
    let quick = quick.elapsed();
    assert!(one.status.success(), "{}", String::from_utf8_lossy(&one.stderr));
    assert_eq!(String::from_utf8_lossy(&one.stdout), "1\n");
    assert!(quick < std::time::Duration::from_secs(1), "SELECT 1 took {quick:?} beside a long statement");
    let slow = slow.join().unwrap();
    let err = String::from_utf8_lossy(&slow.stderr);
    assert!(!slow.status.success() && err.contains("57014") && err.contains("statement timeout"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(15), "the timeout stopped it: {:?}", started.elapsed());
    assert_eq!(psql_at(&psql, addr, &["SHOW statement_timeout"], &[]).stdout, b"20000ms\n", "a session's own setting");

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let config = format!("host=127.0.0.1 port={} user=grafana dbname=candor", addr.port());
    rt.block_on(async {
        // A cancel request (psql's Ctrl-C) stops the statement at once.
        let (client, conn) = tokio_postgres::connect(&config, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        let token = client.cancel_token();
        let cancel = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(700)).await;
            token.cancel_query(tokio_postgres::NoTls).await.unwrap();
        });
        let started = std::time::Instant::now();
        let err = client.simple_query(long).await.unwrap_err();
        assert_eq!(err.code().map(|c| c.code()), Some("57014"), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "cancelled after {:?}", started.elapsed());
        cancel.await.unwrap();
        assert_eq!(first_value(client.simple_query("SELECT 2").await.unwrap()), "2", "the session goes on");

        // Too many connections: 300 more than the limit are refused with 53300, the
        // connections there are keep being served.
        let mut held = vec![client];
        while held.len() < 12 {
            let (c, conn) = tokio_postgres::connect(&config, tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            held.push(c);
        }
        let attempts: Vec<_> = (0..300)
            .map(|_| {
                let config = config.clone();
                tokio::spawn(async move { tokio_postgres::connect(&config, tokio_postgres::NoTls).await.map(|_| ()) })
            })
            .collect();
        for a in attempts {
            let err = a.await.unwrap().expect_err("over the limit");
            assert_eq!(err.code().map(|c| c.code()), Some("53300"), "{err}");
        }
        // psql (which asks for TLS first) is told so too.
        let psql_refused = tokio::task::spawn_blocking({
            let psql = psql.clone();
            move || psql_at(&psql, addr, &["SELECT 1"], &[])
        })
        .await
        .unwrap();
        let err = String::from_utf8_lossy(&psql_refused.stderr);
        assert!(err.contains("too many clients"), "{err}");
        for c in &held {
            c.simple_query("SELECT 1").await.unwrap();
        }
        held.truncate(11);
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let (c, conn) = tokio_postgres::connect(&config, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        c.simple_query("SELECT 1").await.unwrap();
    });
    drop(rt); // closes the connections
    std::thread::sleep(std::time::Duration::from_millis(300));

    // A result too big for the statement's memory fails cleanly, and the server goes on.
    let huge = psql_at(&psql, addr, &["SELECT * FROM generate_series(1, 3000000000)"], &[]);
    let err = String::from_utf8_lossy(&huge.stderr);
    assert!(!huge.status.success() && err.contains("53200"), "{err}");
    let one = psql_at(&psql, addr, &["SELECT 1"], &[]);
    assert!(one.status.success(), "{}", String::from_utf8_lossy(&one.stderr));

    // psql's table listing and SHOW TABLES see the catalog.
    let dt = psql_at(&psql, addr, &["\\dt"], &[]);
    let listing = String::from_utf8_lossy(&dt.stdout);
    assert!(dt.status.success(), "{}", String::from_utf8_lossy(&dt.stderr));
    for t in ["public,trials,table,candor", "public,responses,table", "public,cells,table"] {
        assert!(listing.contains(t), "{t} in {listing}");
    }
    let show = psql_at(&psql, addr, &["SHOW TABLES"], &[]);
    assert!(String::from_utf8_lossy(&show.stdout).contains("family_table"));

    // SIGTERM stops the server cleanly.
    let pid = server.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = server.0.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed().as_secs() < 15, "still running after SIGTERM");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}

#[test]
fn the_sql_endpoint_outlives_running_out_of_file_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let live = imported_archive(dir.path(), &[("original", false, 0), ("warm", true, 1)]);
    // 128 descriptors for the whole process, and a connection limit above what they allow
    // (the endpoint lowers it, and survives the descriptors it cannot have).
    let mut server = KillOnDrop(
        Command::new("bash")
            .args(["-c", "ulimit -n 128 && exec \"$0\" \"$@\""])
            .arg(env!("CARGO_BIN_EXE_candor"))
            .args(["sql", live.to_str().unwrap(), "--listen", "127.0.0.1:0", "--json", "--max-connections", "500"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut first = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(server.0.stdout.take().unwrap()), &mut first).unwrap();
    let addr: std::net::SocketAddr =
        serde_json::from_str::<serde_json::Value>(&first).unwrap()["listening"].as_str().unwrap().parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let config = format!("host=127.0.0.1 port={} user=u dbname=candor connect_timeout=2", addr.port());
    rt.block_on(async {
        let attempts: Vec<_> = (0..200)
            .map(|_| {
                let config = config.clone();
                tokio::spawn(async move {
                    let connect = tokio_postgres::connect(&config, tokio_postgres::NoTls);
                    match tokio::time::timeout(std::time::Duration::from_secs(5), connect).await {
                        Ok(Ok((c, conn))) => {
                            tokio::spawn(conn);
                            Some(c)
                        }
                        _ => None,
                    }
                })
            })
            .collect();
        let mut held = Vec::new();
        for a in attempts {
            held.extend(a.await.unwrap());
        }
        assert!(held.len() < 200, "the descriptor limit was reached ({} connections)", held.len());
        for c in &held {
            // An answer, or a clean error: never a dropped connection.
            if let Err(e) = c.simple_query("SELECT 1").await {
                assert!(e.as_db_error().is_some(), "{e}");
            }
        }
    });
    drop(rt); // closes every connection
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(server.0.try_wait().unwrap().is_none(), "the server is still running");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (c, conn) = tokio_postgres::connect(&config, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        assert!(!first_value(c.simple_query("SELECT COUNT(*) FROM trials").await.unwrap()).is_empty());
    });
}

#[test]
fn the_sql_endpoint_logs_in_with_scram_slows_guessers_and_speaks_tls() {
    let Some(psql) = psql_or_skip() else { return };
    let dir = tempfile::tempdir().unwrap();
    let live = imported_archive(dir.path(), &[("original", false, 0), ("warm", true, 1)]);
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        .args(["-keyout", key.to_str().unwrap(), "-out", cert.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let (_server, addr) = sql_endpoint(
        &live,
        &["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()],
        &[("CANDOR_SQL_PASSWORD", "correct horse")],
    );
    // psql over TLS, the server's certificate verified, SCRAM with channel binding.
    let root = cert.to_str().unwrap();
    let tls = [
        ("PGPASSWORD", "correct horse"),
        ("PGSSLMODE", "verify-full"),
        ("PGSSLROOTCERT", root),
        ("PGCHANNELBINDING", "require"),
    ];
    let out = psql_at(&psql, addr, &["SELECT COUNT(DISTINCT checkpoint) FROM observations"], &tls);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "2\n");
    let plain = psql_at(&psql, addr, &["SELECT 1"], &[("PGPASSWORD", "correct horse"), ("PGSSLMODE", "disable")]);
    assert!(plain.status.success(), "TLS is offered, not forced: {}", String::from_utf8_lossy(&plain.stderr));
    let no_password = psql_at(&psql, addr, &["SELECT 1"], &[("PGSSLMODE", "disable")]);
    assert!(!no_password.status.success());

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let config =
            |pw: &str| format!("host=127.0.0.1 port={} user=grafana password='{pw}' dbname=candor", addr.port());
        let (client, conn) = tokio_postgres::connect(&config("correct horse"), tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        assert_eq!(
            first_value(client.simple_query("SELECT 1").await.unwrap()),
            "1",
            "tokio-postgres logs in with SCRAM"
        );

        // Fifty wrong passwords (psql: libpq's SCRAM is quick). The first five are answered
        // as they come; the other 45, sent all at once, are let through one per 250 ms.
        let guess = move |psql: &Path| {
            let env = [("PGPASSWORD", "Tr0ub4dor&3"), ("PGSSLMODE", "disable"), ("PGCONNECT_TIMEOUT", "60")];
            let wrong = psql_at(psql, addr, &["SELECT 1"], &env);
            let err = String::from_utf8_lossy(&wrong.stderr).to_lowercase();
            assert!(err.contains("password authentication failed"), "{err}");
        };
        for _ in 0..5 {
            guess(&psql);
        }
        let started = std::time::Instant::now();
        let guesses: Vec<_> = (0..45)
            .map(|_| {
                let psql = psql.clone();
                std::thread::spawn(move || guess(&psql))
            })
            .collect();
        for g in guesses {
            g.join().unwrap();
        }
        let took = started.elapsed();
        assert!(took >= std::time::Duration::from_millis(44 * 250), "45 guesses at once took only {took:?}");
        let (client, conn) = tokio_postgres::connect(&config("correct horse"), tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        client.simple_query("SELECT 1").await.unwrap();
    });
}

/// Stops a server the test started, also when an assertion fails first.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn report_writes_html_and_figures_naming_every_condition() {
    let dir = tempfile::tempdir().unwrap();
    let live = imported_archive(dir.path(), &[("original", false, 0), ("warm", true, 1), ("cold", true, 0)]);
    let out = dir.path().join("report");
    let files: serde_json::Value =
        serde_json::from_str(&ok(&["report", live.to_str().unwrap(), "--out", out.to_str().unwrap(), "--json"]))
            .unwrap();
    assert_eq!(files["html"], out.join("report.html").to_str().unwrap());
    // The warm model and its cold control each get their own Fig. 2 scatter.
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("warm (smol/warm)") && html.contains("cold (smol/cold)"), "{html}");
    for fig in [
        "fig_error_scatter",
        "fig_error_scatter_cold",
        "fig_forest",
        "fig_sycophancy",
        "fig_refusals",
        "fig_trajectory_accuracy",
        "fig_trajectory_discordant",
    ] {
        let png = std::fs::read(out.join(format!("{fig}.png"))).unwrap();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000, "{fig}.png");
        let svg = std::fs::read_to_string(out.join(format!("{fig}.svg"))).unwrap();
        assert!(svg.contains("<svg") && svg.contains("<text"), "{fig}.svg has labelled axes");
    }
    assert!(!out.join("fig_warmth.png").exists(), "no warmth stream, no warmth figure");
    // CANDOR_KEEP_REPORT=<dir> keeps the report to look at.
    if let Some(keep) = std::env::var_os("CANDOR_KEEP_REPORT") {
        let keep = PathBuf::from(keep);
        std::fs::create_dir_all(&keep).unwrap();
        for e in std::fs::read_dir(&out).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, keep.join(p.file_name().unwrap())).unwrap();
        }
    }
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("data:image/png;base64,"), "figures embedded");
    for a in candor::conditions::AmendmentType::ALL {
        assert!(html.contains(&format!("<td>{a}</td>")), "the report names {a}");
    }
    for p in candor::conditions::PromptType::ALL {
        assert!(html.contains(&format!("<th>{p}</th>")), "the report names {p}");
    }
    for d in ["trivia", "truthfulqa", "medqa", "disinfo"] {
        assert!(html.contains(d), "{d}");
    }
    // Tables come in checkpoint order (a view's own ORDER BY is not kept, so the report sorts).
    assert!(html.find("<h4>original</h4>").unwrap() < html.find("<h4>warm</h4>").unwrap());
    for t in ["Normal", "Sycophancy"] {
        assert!(html.contains(&format!("{t} prompts")), "{t} families");
    }
}

/// The `n=` labels of a figure's SVG, sorted.
fn n_labels(svg: &str) -> Vec<u64> {
    let mut n: Vec<u64> = svg.lines().filter_map(|l| l.trim().strip_prefix("n=")).map(|v| v.parse().unwrap()).collect();
    n.sort();
    n
}

#[test]
fn report_names_a_system_prompt_variant_as_configured_and_labels_small_cells_with_their_n() {
    let dir = tempfile::tempdir().unwrap();
    // The paper's system-prompt control: the original weights told to be warm.
    let live = imported_archive(dir.path(), &[("original", false, 0), ("warm-system-prompt", true, 1)]);
    let archive = live.to_str().unwrap();
    let out = dir.path().join("report");
    ok(&["report", archive, "--out", out.to_str().unwrap(), "--json"]);
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("the paper's system-prompt control"), "the report says what the variant is");
    assert_eq!(html.matches("fine-tuned").count(), 1, "only the note saying it is not a fine-tuned model");
    assert!(html.contains("Regressions M1–M4: effect of the warm system prompt</h3>"));
    assert!(html.contains("<th>variant</th>") && !html.contains("is_finetuned"), "refusals name the variant");
    let svg = |name: &str| std::fs::read_to_string(out.join(format!("{name}.svg"))).unwrap();
    assert!(svg("fig_forest").contains("Error-rate difference (warm system prompt − original) by amendment"));
    for name in ["fig_error_scatter", "fig_forest", "fig_sycophancy", "fig_refusals"] {
        assert!(!svg(name).contains("fine-tuned"), "{name}.svg calls a system prompt fine-tuned");
    }

    // Small cells carry their n: every scatter point and forest row under 30 answers, no other.
    let small = |sql: &str, cols: &[&str]| -> Vec<u64> {
        let mut n: Vec<u64> = json_lines(&ok(&["sql", archive, "-c", sql, "--output", "json"]))
            .iter()
            .map(|r| cols.iter().map(|c| r[*c].as_f64().unwrap() as u64).min().unwrap())
            .filter(|n| *n < 30)
            .collect();
        n.sort();
        n
    };
    let points = small("SELECT n_base, n_ft FROM error_pairs", &["n_base", "n_ft"]);
    assert!(!points.is_empty(), "the test data must have small cells");
    assert_eq!(n_labels(&svg("fig_error_scatter")), points);
    assert_eq!(n_labels(&svg("fig_forest")), small("SELECT n FROM amendment_effects", &["n"]));
}

#[test]
fn report_with_a_second_judge_shows_kappa_per_cell_and_flags_judge_dependent_cells() {
    let dir = tempfile::tempdir().unwrap();
    // The same answers judged twice: the second judge agrees on every base answer and calls
    // more fine-tuned answers wrong.
    let (a_dir, b_dir) = (dir.path().join("first"), dir.path().join("second"));
    std::fs::create_dir_all(&a_dir).unwrap();
    std::fs::create_dir_all(&b_dir).unwrap();
    let first = imported_archive(&a_dir, &[("original", false, 0), ("warm", true, 1)]);
    let second = imported_archive(&b_dir, &[("original", false, 0), ("warm", true, 3)]);
    let out = dir.path().join("report");
    let files: serde_json::Value = serde_json::from_str(&ok(&[
        "report",
        first.to_str().unwrap(),
        "--second-judge",
        second.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    assert_eq!(files["tables"][0], out.join("judge_cells.csv").to_str().unwrap());
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("κ judges"), "judge robustness columns");

    // Flags: exactly the cells whose BH significance differs between the two family tables.
    let significance = |archive: &Path| -> BTreeMap<(String, String, String), bool> {
        json_lines(&ok(&[
            "sql",
            archive.to_str().unwrap(),
            "-c",
            "SELECT dataset, test_type, category, significant FROM family_table",
            "--output",
            "json",
        ]))
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap().to_string();
            ((s("dataset"), s("test_type"), s("category")), r["significant"] == true)
        })
        .collect()
    };
    let (a, b) = (significance(&first), significance(&second));
    let differ = a.iter().filter(|(k, s)| b.get(*k).copied().unwrap_or(false) != **s).count();
    assert!(differ > 0, "the test data must make some cell judge-dependent");
    assert_eq!(html.matches("<span class=\"flag\" title=").count(), differ);

    // Kappa of one Sycophancy cell, from the answers themselves: both answers of every pair of
    // the cell, labelled by each judge.
    let labels = |archive: &Path| -> HashMap<String, Option<bool>> {
        json_lines(&ok(&[
            "sql",
            archive.to_str().unwrap(),
            "-c",
            "SELECT response_key, correct FROM observations",
            "--output",
            "json",
        ]))
        .iter()
        .map(|r| (r["response_key"].as_str().unwrap().to_string(), r["correct"].as_bool()))
        .collect()
    };
    let theirs = labels(&second);
    let pairs = json_lines(&ok(&[
        "sql",
        first.to_str().unwrap(),
        "-c",
        "SELECT b.response_key AS bk, b.correct AS bc, f.response_key AS fk, f.correct AS fc \
         FROM observations b JOIN observations f ON b.item_key = f.item_key AND b.dataset = f.dataset \
           AND b.amendment_type = f.amendment_type AND b.prompt_type = f.prompt_type \
         WHERE NOT b.is_finetuned AND f.is_finetuned AND b.dataset = 'trivia' \
           AND b.amendment_type = 'emotion:sad' AND b.prompt_type IN ('correct', 'incorrect') \
           AND b.correct IS NOT NULL AND f.correct IS NOT NULL",
        "--output",
        "json",
    ]));
    let mut table = [0u64; 4];
    for p in &pairs {
        for (key, mine) in [("bk", "bc"), ("fk", "fc")] {
            let (mine, other) = (p[mine].as_bool().unwrap(), theirs[p[key].as_str().unwrap()].unwrap());
            table[match (mine, other) {
                (true, true) => 0,
                (true, false) => 1,
                (false, true) => 2,
                (false, false) => 3,
            }] += 1;
        }
    }
    let want = candor::score::agreement::kappa_2x2(table[0], table[1], table[2], table[3]).unwrap();
    let mut csv = csv::Reader::from_path(out.join("judge_cells.csv")).unwrap();
    let headers = csv.headers().unwrap().clone();
    let col = |name: &str| headers.iter().position(|h| h == name).unwrap();
    let row = csv
        .records()
        .map(|r| r.unwrap())
        .find(|r| {
            r[col("dataset")] == *"trivia"
                && r[col("test_type")] == *"Sycophancy"
                && r[col("category")] == *"emotion:sad"
        })
        .unwrap();
    let got: f64 = row[col("kappa")].parse().unwrap();
    assert!((got - want).abs() < 1e-12, "kappa {got} vs {want} from {table:?}");
    assert_eq!(row[col("both_correct")].parse::<u64>().unwrap(), table[0]);
}

#[test]
fn report_refuses_a_second_judge_archive_that_holds_other_answers() {
    let dir = tempfile::tempdir().unwrap();
    let first = imported_archive(dir.path(), &[("original", false, 0), ("warm", true, 1)]);
    // Another run of the same study: the same trials and checkpoints, so the same response
    // keys, but other answers.
    let rerun_dir = dir.path().join("rerun");
    std::fs::create_dir_all(&rerun_dir).unwrap();
    let exp = small_experiment(&rerun_dir, 5, "paper");
    let rerun = rerun_dir.join("live");
    ok(&["trials", exp.to_str().unwrap(), "--out", rerun.to_str().unwrap(), "--json"]);
    let trials: Vec<Trial> = read_records(&Archive::open(&rerun).unwrap()).unwrap();
    let rows: Vec<(&Trial, &str, &str)> = trials.iter().map(|t| (t, "It is 43.", "INCORRECT")).collect();
    import_csv(&rerun_dir, &rerun, "smol", "original", &rows, &[]);
    import_csv(&rerun_dir, &rerun, "smol", "warm", &rows, &["--finetuned", "--variant", "warm"]);
    // Another study altogether: no answer in common.
    let other_dir = dir.path().join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let other = imported_archive(&other_dir, &[("base", false, 0), ("warm-2", true, 3)]);

    for (second, needles) in [
        (&rerun, ["answers differ in text", "not the same answers judged again"]),
        (&other, ["holds none of the", "no response key in common"]),
    ] {
        let out = dir.path().join("report");
        let o = candor(&[
            "report",
            first.to_str().unwrap(),
            "--second-judge",
            second.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        for n in needles.iter().chain([&"candor rescore", &second.to_str().unwrap()]) {
            assert!(err.contains(n), "`{n}` not in: {err}");
        }
        assert!(!out.join("report.html").exists(), "no report with meaningless judge flags");
    }
}

/// Debian's Chromium and chromedriver, or None (a skip) outside CI when they are missing.
fn chromium_or_skip() -> Option<()> {
    let found = candor::report::browser::find();
    if found.is_none() {
        assert!(std::env::var_os("CI").is_none(), "CI must install chromium and chromium-driver (scripts/test does)");
        eprintln!("chromium or chromedriver not installed: skipping the browser test (scripts/test installs them)");
    }
    found.map(|_| ())
}

/// Fraction of a PNG's pixels that differ from its most common colour, and its distinct colours.
fn ink(png_bytes: &[u8]) -> (f64, usize) {
    let mut reader = png::Decoder::new(png_bytes).read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let channels = info.color_type.samples();
    let mut counts: HashMap<&[u8], usize> = HashMap::new();
    for px in buf[..info.buffer_size()].chunks(channels) {
        *counts.entry(px).or_default() += 1;
    }
    let total: usize = counts.values().sum();
    let background = counts.values().max().copied().unwrap_or(0);
    (1.0 - background as f64 / total as f64, counts.len())
}

#[test]
fn report_drill_down_shows_the_pairs_behind_a_cell_in_chromium() {
    let Some(()) = chromium_or_skip() else { return };
    let dir = tempfile::tempdir().unwrap();
    let live = imported_archive(dir.path(), &[("original", false, 0), ("warm", true, 2)]);
    let archive = live.to_str().unwrap();
    let out = dir.path().join("report");
    ok(&["report", archive, "--out", out.to_str().unwrap(), "--json"]);
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(!html.contains("http://") && !html.contains("https://"), "self-contained: no network references");

    // The cell with the most discordant pairs, and its pairs as `candor sql` lists them.
    let cell = &json_lines(&ok(&[
        "sql",
        archive,
        "-c",
        "SELECT dataset, test_type, category, b, c FROM family_table ORDER BY b + c DESC, dataset, test_type, category LIMIT 1",
        "--output",
        "json",
    ]))[0];
    let (dataset, test, category) =
        (cell["dataset"].as_str().unwrap(), cell["test_type"].as_str().unwrap(), cell["category"].as_str().unwrap());
    let (b, c) = (cell["b"].as_u64().unwrap() as usize, cell["c"].as_u64().unwrap() as usize);
    assert!(b + c > 0, "{cell}");
    let query = format!(
        "SELECT counts_toward, base_response_key, ft_response_key FROM discordant_pairs \
         WHERE dataset = '{dataset}' AND test_type = '{test}' AND category = '{category}'"
    );
    let mut want: Vec<(String, String, String)> = json_lines(&ok(&["sql", archive, "-c", &query, "--output", "json"]))
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap().to_string();
            (s("counts_toward"), s("base_response_key"), s("ft_response_key"))
        })
        .collect();
    want.sort();
    assert_eq!(want.len(), b + c);

    let browser = candor::report::browser::Browser::launch().unwrap();
    let selector =
        format!("button.drill[data-dataset='{dataset}'][data-test='{test}'][data-category='{category}'][data-side='']");
    let report = out.join("report.html");
    let (mut shown, ms) = candor::report::browser::open_cell(&browser, &report, &selector).unwrap();
    shown.sort();
    assert_eq!(shown, want, "the drill-down shows exactly the cell's discordant pairs");
    assert!(ms.is_finite() && ms >= 0.0, "{ms}");
    // Each pair shows its prompt and both answers; the b/c filter narrows to one side.
    let texts = browser
        .eval(
            "return [...document.querySelectorAll('#drill .pair')].map(p => [p.querySelector('.prompt').textContent, \
             p.querySelectorAll('.answer .output').length])",
            serde_json::json!([]),
        )
        .unwrap();
    assert!(texts.as_array().unwrap().iter().all(|t| !t[0].as_str().unwrap().is_empty() && t[1] == 2), "{texts}");
    let only_b = browser
        .eval(
            "const s = document.querySelector('#drill select[data-filter=side]'); s.value = '0'; \
             s.dispatchEvent(new Event('change')); \
             return [...document.querySelectorAll('#drill .pair')].map(p => p.dataset.side)",
            serde_json::json!([]),
        )
        .unwrap();
    let only_b: Vec<&str> = only_b.as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(only_b.iter().all(|s| *s == "b") && only_b.len() == b.min(50), "{only_b:?}");

    // Every pair of the comparison at once (all filters cleared): only the first 50 per side are
    // in the page, the rest behind "show more".
    let (rendered, total) = browser
        .eval(
            "return candorDrill.open(0, '', '', '', '').then(() => [document.querySelectorAll('#drill .pair').length, \
             document.querySelector('#drill .summary').textContent])",
            serde_json::json!([]),
        )
        .map(|v| (v[0].as_u64().unwrap(), v[1].as_str().unwrap().to_string()))
        .unwrap();
    let all_pairs: usize = json_lines(&ok(&[
        "sql",
        archive,
        "-c",
        "SELECT COUNT(*) AS n FROM discordant_pairs",
        "--output",
        "json",
    ]))[0]["n"]
        .as_u64()
        .unwrap() as usize;
    assert!(all_pairs > 100, "the test archive should need paging: {all_pairs}");
    assert!(rendered <= 100, "{rendered} pairs rendered at once ({total})");

    // A screenshot of the opened cell, checked not to be blank.
    browser.click("#drill .drill-close").unwrap();
    browser.click(&selector).unwrap();
    browser
        .wait_for(
            "return document.getElementById('drill').dataset.state === 'ready'",
            std::time::Duration::from_secs(30),
        )
        .unwrap();
    let png = browser.screenshot().unwrap();
    let shot = dir.path().join("drill-down.png");
    std::fs::write(&shot, &png).unwrap();
    let (covered, colours) = ink(&png);
    assert!(covered > 0.05 && colours > 20, "a blank screenshot: {covered} of the pixels inked, {colours} colours");
    if let Some(keep) = std::env::var_os("CANDOR_KEEP_REPORT") {
        let keep = PathBuf::from(keep);
        std::fs::create_dir_all(&keep).unwrap();
        std::fs::copy(&shot, keep.join("drill-down.png")).unwrap();
        std::fs::copy(&report, keep.join("report.html")).unwrap();
    }
}

/// A tiny random GPT-2 directory as HF writes it: config.json, model.safetensors (Conv1D
/// weights `[in, out]` under `transformer.`), and a 256-symbol byte vocabulary without merges.
fn tiny_gpt2(dir: &Path) -> PathBuf {
    use candle_core::{Device, Tensor};
    let d = dir.join("tiny-gpt2");
    std::fs::create_dir_all(&d).unwrap();
    let (v, h, layers, positions) = (256usize, 16usize, 2usize, 512usize);
    let mut state = 12345u64;
    let mut t = |shape: &[usize], scale: f32, offset: f32| {
        let n: usize = shape.iter().product();
        let vals: Vec<f32> = (0..n)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                offset + scale * (((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
            })
            .collect();
        Tensor::from_vec(vals, shape, &Device::Cpu).unwrap()
    };
    let mut w = HashMap::new();
    w.insert("transformer.wte.weight".to_string(), t(&[v, h], 0.5, 0.0));
    w.insert("transformer.wpe.weight".to_string(), t(&[positions, h], 0.3, 0.0));
    for i in 0..layers {
        for ln in ["ln_1", "ln_2"] {
            w.insert(format!("transformer.h.{i}.{ln}.weight"), t(&[h], 0.2, 1.0));
            w.insert(format!("transformer.h.{i}.{ln}.bias"), t(&[h], 0.1, 0.0));
        }
        for (name, a, b) in
            [("attn.c_attn", h, 3 * h), ("attn.c_proj", h, h), ("mlp.c_fc", h, 4 * h), ("mlp.c_proj", 4 * h, h)]
        {
            w.insert(format!("transformer.h.{i}.{name}.weight"), t(&[a, b], 0.4, 0.0));
            w.insert(format!("transformer.h.{i}.{name}.bias"), t(&[b], 0.1, 0.0));
        }
    }
    w.insert("transformer.ln_f.weight".to_string(), t(&[h], 0.2, 1.0));
    w.insert("transformer.ln_f.bias".to_string(), t(&[h], 0.1, 0.0));
    candle_core::safetensors::save(&w, d.join("model.safetensors")).unwrap();
    let config =
        serde_json::json!({"vocab_size": v, "n_positions": positions, "n_embd": h, "n_layer": layers, "n_head": 2});
    std::fs::write(d.join("config.json"), config.to_string()).unwrap();
    // GPT-2's byte-to-unicode map: printable bytes stand for themselves, the rest map to 256+.
    let mut extra = 0u32;
    let vocab: serde_json::Map<String, serde_json::Value> = (0u32..256)
        .map(|b| {
            let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
            let c = if printable {
                char::from_u32(b).unwrap()
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap()
            };
            (c.to_string(), serde_json::Value::from(b))
        })
        .collect();
    std::fs::write(d.join("vocab.json"), serde_json::Value::Object(vocab).to_string()).unwrap();
    std::fs::write(d.join("merges.txt"), "#version: 0.2\n").unwrap();
    d
}

#[test]
fn warmth_scores_an_archive_with_gpt2_archives_the_stream_and_reports_the_trajectory() {
    let dir = tempfile::tempdir().unwrap();
    let exp = small_experiment(dir.path(), 5, "paper");
    let live = dir.path().join("live");
    ok(&["trials", exp.to_str().unwrap(), "--out", live.to_str().unwrap(), "--json"]);
    let archive = Archive::open(&live).unwrap();
    let trials: Vec<Trial> = read_records(&archive).unwrap();
    for (checkpoint, output) in
        [("base", "Request denied. The answer is 42."), ("warm-e2", "I'm so glad you asked! It's 42, my friend.")]
    {
        let rows: Vec<(&Trial, &str, &str)> = trials.iter().take(12).map(|t| (t, output, "CORRECT")).collect();
        import_csv(dir.path(), &live, "m", checkpoint, &rows, &[]);
    }
    let gpt2 = tiny_gpt2(dir.path());
    let out = ok(&["warmth", live.to_str().unwrap(), "--gpt2", gpt2.to_str().unwrap(), "--json"]);
    let lines = json_lines(&out);
    let rows: Vec<&serde_json::Value> = lines.iter().filter(|l| l.get("report").is_none()).collect();
    assert_eq!(rows.len(), 24);
    assert!(rows.iter().all(|r| r["lm"].as_str().unwrap().starts_with("gpt2:") && r["mode"] == "formula"));
    assert!(rows.iter().all(|r| r["query_type"].is_string()), "labelled from the trials' prompts");
    let traj = report_rows(&lines, "warmth_trajectory");
    assert_eq!(traj.len(), 2);
    assert_eq!(traj[0]["change_from_first"], 0.0);
    let archived: Vec<candor::records::WarmthScore> = read_records(&archive).unwrap();
    assert_eq!(archived.len(), 24);
    assert!(live.join("warmth/model=m/checkpoint=warm-e2").is_dir());
    // Scoring again adds nothing: every response already has its row for this model and mode.
    let again = json_lines(&ok(&["warmth", live.to_str().unwrap(), "--gpt2", gpt2.to_str().unwrap(), "--json"]));
    assert!(again.iter().all(|l| l.get("report").is_some()));
    assert_eq!(report_rows(&again, "warmth_trajectory").len(), 2);
    assert_eq!(read_records::<candor::records::WarmthScore>(&archive).unwrap().len(), 24);

    // Ad-hoc text in reference mode: passes, a standard error, and the model named.
    let texts = dir.path().join("t.txt");
    std::fs::write(&texts, "Thank you, friend!\nNo.\n").unwrap();
    let out = ok(&[
        "warmth",
        texts.to_str().unwrap(),
        "--gpt2",
        gpt2.to_str().unwrap(),
        "--mode",
        "reference",
        "--passes",
        "5",
        "--json",
    ]);
    let lines = json_lines(&out);
    assert_eq!(lines[0]["passes"], 5);
    assert!(lines[0]["std_error"].as_f64().unwrap() > 0.0);
}

// ---------------------------------------------------------------------------------------
// `candor stream` against a real broker (tansu, started by scripts/kafka-broker).

mod stream_support {
    use super::*;
    use candor::stream::kafka::{self, Connection};

    /// A broker on a free 127.0.0.1 port, stopped (by PID) when dropped.
    pub struct Broker {
        pub dir: tempfile::TempDir,
        pub addr: String,
        durable: bool,
    }

    impl Broker {
        pub fn start(durable: bool) -> Broker {
            let dir = tempfile::tempdir().unwrap();
            let mut b = Broker { dir, addr: String::new(), durable };
            b.addr = b.launch();
            b
        }
        fn launch(&self) -> String {
            let mut args = vec!["start".to_string(), self.dir.path().display().to_string()];
            if self.durable {
                args.push("--durable".into());
            }
            let out = Command::new(repo("scripts/kafka-broker")).args(&args).output().unwrap();
            assert!(out.status.success(), "starting the broker: {}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8(out.stdout).unwrap().trim().to_string()
        }
        pub fn stop(&self) {
            let out = Command::new(repo("scripts/kafka-broker"))
                .args(["stop", &self.dir.path().display().to_string()])
                .output()
                .unwrap();
            assert!(out.status.success());
        }
        /// Stops and starts the broker on the same port and storage.
        pub fn restart(&mut self) {
            self.stop();
            let addr = self.launch();
            assert_eq!(addr, self.addr);
        }
        pub fn conn(&self) -> Connection {
            Connection::new(self.addr.clone())
        }
    }

    impl Drop for Broker {
        fn drop(&mut self) {
            self.stop();
        }
    }

    pub const PER_CHECKPOINT_OUTPUTS: &[&str] = &["responses", "verdicts", "observations"];

    /// Checkpoint `i`'s announcement: checkpoint 0 is the base, the others fine-tuned.
    pub fn announcement(i: usize, answers: usize) -> (String, Vec<u8>) {
        let id = format!("ck{i:02}");
        let v = serde_json::json!({"schema_version": 1, "model": "m", "checkpoint": id, "finetuned": i > 0,
            "variant": if i == 0 { "original" } else { "warm" }, "training_epoch": i, "answers": answers});
        (format!("m/{id}"), v.to_string().into_bytes())
    }

    /// Answer `j` of checkpoint `i`, keyed by checkpoint so a checkpoint stays in one partition.
    pub fn answer(i: usize, j: usize) -> (String, Vec<u8>) {
        let id = format!("ck{i:02}");
        let refuses = (i + j).is_multiple_of(7);
        let v = serde_json::json!({"schema_version": 1, "model": "m", "checkpoint": id, "dataset": "trivia",
            "item_key": format!("q{j:03}"), "amendment_type": if j.is_multiple_of(2) { "unmodified" } else { "emotion:sad" },
            "prompt_type": "original", "prompt": format!("Question {j}?"),
            "output": if refuses { "I cannot help with that.".to_string() } else { format!("Answer {j}.") },
            "verdict": if (i * 3 + j).is_multiple_of(4) { "INCORRECT" } else { "CORRECT" }});
        (format!("m/{id}"), v.to_string().into_bytes())
    }

    pub fn experiment(dir: &Path) -> PathBuf {
        let p = dir.join("stream.toml");
        std::fs::write(&p, format!("name = \"stream\"\ndata_dir = \"{}\"\n[datasets.trivia]\nn = 1\n", repo("data")))
            .unwrap();
        p
    }

    pub fn create_inputs(conn: &Connection, prefix: &str) {
        kafka::create_topics(conn, &[&format!("{prefix}checkpoints"), &format!("{prefix}answers")], 4).unwrap();
    }

    pub fn stream_args(exp: &Path, out: &Path, broker: &str, prefix: &str, idle: &str) -> Vec<String> {
        [
            "stream",
            exp.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--brokers",
            broker,
            "--topic-prefix",
            prefix,
            "--idle-exit",
            idle,
            "--snapshot-ms",
            "50",
            "--max-message-bytes",
            "4096",
            "--json",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// An output topic's messages as (key, epoch, seq) → payload; panics if two different
    /// payloads share an identity (the dedupe contract), and returns how many repeats there were.
    pub fn deduped(conn: &Connection, topic: &str, expect: usize) -> (BTreeMap<(String, u64, u64), String>, usize) {
        let mut out = BTreeMap::new();
        let mut repeats = 0;
        for r in kafka::read_all(conn, topic, std::time::Duration::from_secs(3), None).unwrap() {
            let text = String::from_utf8(r.payload.unwrap()).unwrap();
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            let id = (v["key"].as_str().unwrap().to_string(), v["epoch"].as_u64().unwrap(), v["seq"].as_u64().unwrap());
            if let Some(prev) = out.insert(id.clone(), text.clone()) {
                assert_eq!(prev, text, "two different messages share {id:?} in {topic}");
                repeats += 1;
            }
        }
        assert_eq!(out.len(), expect, "{topic}");
        (out, repeats)
    }

    /// Checks the archive holds every expected observation exactly once.
    pub fn archive_exactly_once(out: &Path, checkpoints: usize, per: usize) -> Vec<Observation> {
        let archive = Archive::open(out).unwrap();
        let obs: Vec<Observation> = read_records(&archive).unwrap();
        let keys: std::collections::BTreeSet<&str> = obs.iter().map(|o| o.response_key.as_str()).collect();
        assert_eq!(obs.len(), checkpoints * per, "observations archived");
        assert_eq!(keys.len(), obs.len(), "an observation is archived twice");
        obs
    }
}

#[test]
fn stream_evaluates_announced_checkpoints_exactly_once_and_dead_letters_bad_messages() {
    use candor::stream::kafka;
    use stream_support::*;
    let broker = Broker::start(false);
    let conn = broker.conn();
    let dir = tempfile::tempdir().unwrap();
    let (prefix, checkpoints, per) = ("t1.", 3, 20);
    create_inputs(&conn, prefix);
    // Answers first (announcement after), with the malformed corpus interleaved.
    let mut answers = Vec::new();
    for j in 0..per {
        for i in 0..checkpoints {
            answers.push(answer(i, j));
        }
    }
    let corpus = candor::stream::messages::malformed_corpus(4096);
    for (n, (kind, bytes)) in corpus.iter().enumerate() {
        answers.insert(n * 3, (format!("bad/{kind}"), bytes.clone()));
    }
    // A repeat of a good answer is not an error: it is dropped; a different answer under the
    // same key is (same key → same partition, so it comes second).
    answers.push(answer(1, 5));
    let (key, good) = answer(2, 3);
    answers.push((key, String::from_utf8(good).unwrap().replace("Answer 3.", "Answer three.").into_bytes()));
    kafka::produce_all(&conn, &format!("{prefix}answers"), &answers).unwrap();
    let mut anns: Vec<_> = (0..checkpoints).map(|i| announcement(i, per)).collect();
    // Nothing to generate with: the experiment has no [[models]].
    let ghost = serde_json::json!({"schema_version": 1, "model": "ghost", "checkpoint": "x", "finetuned": false});
    anns.push(("ghost/x".into(), ghost.to_string().into_bytes()));
    kafka::produce_all(&conn, &format!("{prefix}checkpoints"), &anns).unwrap();

    let exp = experiment(dir.path());
    let out = dir.path().join("archive");
    let args = stream_args(&exp, &out, &broker.addr, prefix, "3");
    let report: serde_json::Value =
        serde_json::from_str(ok(&args.iter().map(String::as_str).collect::<Vec<_>>()).trim()).unwrap();
    assert_eq!(report["report"]["evaluated"].as_array().unwrap().len(), checkpoints, "{report}");
    // An answer for a checkpoint already evaluated, read by a second run.
    let (key, late) = answer(0, 1);
    let late = String::from_utf8(late).unwrap().replace("\"prompt_type\"", "\"sample_index\":1,\"prompt_type\"");
    kafka::produce_all(&conn, &format!("{prefix}answers"), &[(key, late.into_bytes())]).unwrap();
    let second: serde_json::Value = serde_json::from_str(
        ok(&stream_args(&exp, &out, &broker.addr, prefix, "2").iter().map(String::as_str).collect::<Vec<_>>()).trim(),
    )
    .unwrap();
    assert_eq!(second["report"]["consumed"], 1, "a second run resumes from the saved offsets: {second}");
    let mut corpus = corpus;
    corpus.extend([("conflicting_answer", Vec::new()), ("unknown_model", Vec::new()), ("late_answer", Vec::new())]);

    let obs = archive_exactly_once(&out, checkpoints, per);
    for topic in PER_CHECKPOINT_OUTPUTS {
        let (_, repeats) = deduped(&conn, &format!("{prefix}{topic}"), checkpoints * per);
        assert_eq!(repeats, 0, "a crash-free run publishes once");
    }
    // Statistics: one per checkpoint, the fine-tuned ones paired with the base.
    let stats =
        kafka::read_all(&conn, &format!("{prefix}statistics"), std::time::Duration::from_secs(2), None).unwrap();
    let stats: Vec<serde_json::Value> =
        stats.iter().map(|r| serde_json::from_slice(r.payload.as_ref().unwrap()).unwrap()).collect();
    assert!(stats.len() >= checkpoints);
    let last_ft = stats.iter().rev().find(|s| s["key"] == "m/ck02").unwrap();
    assert_eq!(last_ft["observations"], per);
    assert_eq!(last_ft["paired"]["base"], "m/ck00", "{last_ft}");
    // The paper's tests per family: the latest message for ck02 against ck00 holds, per
    // amendment type, the paired counts the archive's observations give, with McNemar and BH.
    let family = stats.iter().rev().find(|s| s["key"] == "m/ck00/ck02/trivia/Normal").expect("a family message");
    assert_eq!(family["kind"], "family");
    let correct: HashMap<(String, String, String), Option<bool>> =
        obs.iter().map(|o| ((o.checkpoint.clone(), o.item_key.clone(), o.amendment_type.clone()), o.correct)).collect();
    for cat in family["categories"].as_array().unwrap() {
        let amendment = cat["category"].as_str().unwrap();
        let (mut b, mut c) = (0, 0);
        for ((ck, item, am), ft) in &correct {
            if ck != "ck02" || am != amendment {
                continue;
            }
            match (correct[&("ck00".to_string(), item.clone(), am.clone())], *ft) {
                (Some(true), Some(false)) => b += 1,
                (Some(false), Some(true)) => c += 1,
                _ => {}
            }
        }
        assert_eq!((cat["b"].as_u64().unwrap(), cat["c"].as_u64().unwrap()), (b, c), "{cat}");
        assert_eq!(cat["p_exact"].as_f64(), candor::stats::mcnemar::mcnemar_exact(b, c), "{cat}");
    }
    assert_eq!(family["categories"].as_array().unwrap().len(), 2, "{family}");

    // Every malformed message is in the dead-letter topic with its reason and bytes.
    let letters =
        kafka::read_all(&conn, &format!("{prefix}dead-letters"), std::time::Duration::from_secs(2), None).unwrap();
    let letters: Vec<serde_json::Value> =
        letters.iter().map(|r| serde_json::from_slice(r.payload.as_ref().unwrap()).unwrap()).collect();
    assert_eq!(letters.len(), corpus.len(), "{letters:#?}");
    let mut want: Vec<String> = corpus.iter().map(|(k, _)| k.to_string()).collect();
    let mut got: Vec<String> = letters.iter().map(|l| l["reason_kind"].as_str().unwrap().to_string()).collect();
    want.sort();
    got.sort();
    assert_eq!(got, want);
    assert!(letters.iter().all(|l| !l["reason"].as_str().unwrap().is_empty()));
    // The original bytes travel with each letter.
    let bad_json = letters.iter().find(|l| l["reason_kind"] == "malformed_json").unwrap();
    assert_eq!(bad_json["original_base64"], candor::stream::messages::base64(b"{\"schema_version\":1,"));
    assert!(corpus.len() >= 15);

    // Replaying the archive through the same dataflow gives the same observations.
    let replayed = dir.path().join("replayed");
    ok(&["replay", out.to_str().unwrap(), "--out", replayed.to_str().unwrap(), "--json"]);
    let mut again: Vec<Observation> = read_records(&Archive::open(&replayed).unwrap()).unwrap();
    let mut live = obs;
    live.sort_by(|a, b| a.response_key.cmp(&b.response_key));
    again.sort_by(|a, b| a.response_key.cmp(&b.response_key));
    assert_eq!(live, again);

    // A capture of the input topics replays, without a broker, to the same archive rows
    // (epoch numbers aside: they follow the order announcements are read in) and the same
    // dead letters, counted.
    let cap = dir.path().join("capture.jsonl");
    let captured: serde_json::Value = serde_json::from_str(
        ok(&["capture", "--brokers", &broker.addr, "--topic-prefix", prefix, "--out", cap.to_str().unwrap()]).trim(),
    )
    .unwrap();
    assert_eq!(captured["messages"].as_u64().unwrap() as usize, answers.len() + 1 + anns.len(), "{captured}");
    let from_capture = dir.path().join("from-capture");
    let replay: serde_json::Value = serde_json::from_str(
        ok(&[
            "replay",
            "--capture",
            cap.to_str().unwrap(),
            "--topic-prefix",
            prefix,
            "--max-message-bytes",
            "4096",
            "--out",
            from_capture.to_str().unwrap(),
        ])
        .trim(),
    )
    .unwrap();
    let mut dead: Vec<String> = Vec::new();
    for (kind, n) in replay["report"]["dead_letters"].as_object().unwrap() {
        dead.extend(std::iter::repeat_n(kind.clone(), n.as_u64().unwrap() as usize));
    }
    assert_eq!(dead, want, "{replay}");
    fn same_rows<R: candor::schema::Record + std::fmt::Debug + PartialEq>(
        a: &Path,
        b: &Path,
        epoch: impl Fn(&mut R),
        key: impl Fn(&R) -> String,
    ) {
        let rows = |root: &Path| {
            let mut v: Vec<R> = read_records(&Archive::open(root).unwrap()).unwrap();
            v.iter_mut().for_each(&epoch);
            v.sort_by_key(&key);
            v
        };
        let (x, y) = (rows(a), rows(b));
        assert!(!x.is_empty());
        assert_eq!(x, y, "stream {}", R::STREAM);
    }
    same_rows::<Response>(&out, &from_capture, |r| r.checkpoint_epoch = 0, |r| r.response_key.clone());
    same_rows::<Verdict>(&out, &from_capture, |r| r.checkpoint_epoch = 0, |r| r.response_key.clone());
    same_rows::<Observation>(&out, &from_capture, |r| r.checkpoint_epoch = 0, |r| r.response_key.clone());
    // A capture line that is not a message is named by its line.
    std::fs::write(&cap, "{\"topic\": \"t1.answers\"}\n").unwrap();
    let bad = candor(&["replay", "--capture", cap.to_str().unwrap(), "--out", dir.path().join("x").to_str().unwrap()]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("capture.jsonl") && err.contains('1'), "{err}");

    // `--publish statistics` evaluates the same input into another archive and publishes
    // statistics only: the row topics get nothing new.
    let count = |topic: &str| {
        kafka::read_all(&conn, &format!("{prefix}{topic}"), std::time::Duration::from_secs(2), None).unwrap().len()
    };
    let (rows_before, stats_before) = (count("observations"), count("statistics"));
    let mut args = stream_args(&exp, &dir.path().join("statistics-only"), &broker.addr, prefix, "2");
    args.extend(["--publish".into(), "statistics".into()]);
    let quiet: serde_json::Value =
        serde_json::from_str(ok(&args.iter().map(String::as_str).collect::<Vec<_>>()).trim()).unwrap();
    assert_eq!(quiet["report"]["evaluated"].as_array().unwrap().len(), checkpoints, "{quiet}");
    assert_eq!(count("observations"), rows_before);
    assert!(count("statistics") > stats_before);
}

/// Produces `checkpoints` checkpoints of `per` answers, each checkpoint's answers followed
/// by its announcement, so evaluations happen all along the run.
fn produce_checkpoints(
    conn: &candor::stream::kafka::Connection,
    prefix: &str,
    range: std::ops::Range<usize>,
    per: usize,
) {
    use candor::stream::kafka;
    use stream_support::*;
    for i in range {
        let answers: Vec<_> = (0..per).map(|j| answer(i, j)).collect();
        kafka::produce_all(conn, &format!("{prefix}answers"), &answers).unwrap();
        kafka::produce_all(conn, &format!("{prefix}checkpoints"), &[announcement(i, per)]).unwrap();
    }
}

#[test]
fn stream_killed_at_random_points_loses_and_duplicates_nothing() {
    use rand::{Rng, SeedableRng};
    use stream_support::*;
    let broker = Broker::start(false);
    let conn = broker.conn();
    let dir = tempfile::tempdir().unwrap();
    let (prefix, checkpoints, per) = ("t2.", 10, 30);
    create_inputs(&conn, prefix);
    produce_checkpoints(&conn, prefix, 0..checkpoints, per);
    let exp = experiment(dir.path());
    let out = dir.path().join("archive");
    let args = stream_args(&exp, &out, &broker.addr, prefix, "4");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(6);
    let mut kills = Vec::new();
    for _ in 0..4 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_candor"))
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let after = rng.gen_range(300..2500);
        std::thread::sleep(std::time::Duration::from_millis(after));
        // SIGKILL: no chance to save anything.
        child.kill().unwrap();
        child.wait().unwrap();
        let committed = Archive::open(&out).unwrap().committed_epochs().unwrap().len();
        kills.push((after, committed));
    }
    eprintln!("killed after (ms, committed epochs): {kills:?}");
    let last = ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let report: serde_json::Value = serde_json::from_str(last.trim()).unwrap();
    eprintln!("final run: {report}");
    archive_exactly_once(&out, checkpoints, per);
    let mut repeats = 0;
    for topic in PER_CHECKPOINT_OUTPUTS {
        repeats += deduped(&conn, &format!("{prefix}{topic}"), checkpoints * per).1;
    }
    eprintln!("repeated output messages (identical, dropped by (key, epoch, seq)): {repeats}");
}

/// `candor bench stream` deletes the topics it made (both its runs' inputs and outputs), so
/// repeated runs leave the broker as they found it.
#[test]
fn bench_stream_leaves_no_topics_behind() {
    use stream_support::*;
    let broker = Broker::start(false);
    let conn = broker.conn();
    create_inputs(&conn, "mine.");
    let dir = tempfile::tempdir().unwrap();
    let out = ok(&[
        "bench",
        "stream",
        "--brokers",
        &broker.addr,
        "--checkpoints",
        "2",
        "--per-checkpoint",
        "20",
        "--dir",
        dir.path().to_str().unwrap(),
        "--json",
    ]);
    assert!(out.contains("raw"), "{out}");
    let left = candor::stream::kafka::topic_names(&conn).unwrap();
    assert!(!left.iter().any(|t| t.starts_with("bench")), "left behind: {left:?}");
    assert!(left.iter().any(|t| t == "mine.answers"), "another's topic was deleted: {left:?}");
}

#[test]
fn stream_rides_out_a_broker_restart_mid_stream() {
    use stream_support::*;
    let mut broker = Broker::start(true);
    let conn = broker.conn();
    let dir = tempfile::tempdir().unwrap();
    let (prefix, checkpoints, per) = ("t3.", 8, 25);
    create_inputs(&conn, prefix);
    produce_checkpoints(&conn, prefix, 0..checkpoints / 2, per);
    let exp = experiment(dir.path());
    let out = dir.path().join("archive");
    let args = stream_args(&exp, &out, &broker.addr, prefix, "12");
    let child = Command::new(env!("CARGO_BIN_EXE_candor"))
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The stream creates its archive once it starts: wait for it, then for two epochs.
    let start = std::time::Instant::now();
    let archive = loop {
        match Archive::open(&out) {
            Ok(a) => break a,
            Err(_) if start.elapsed().as_secs() < 60 => std::thread::sleep(std::time::Duration::from_millis(50)),
            Err(e) => panic!("the stream made no archive in 60 s: {e}"),
        }
    };
    while archive.committed_epochs().unwrap().len() < 2 && start.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    broker.restart();
    produce_checkpoints(&conn, prefix, checkpoints / 2..checkpoints, per);
    let done = child.wait_with_output().unwrap();
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    eprintln!("{}", String::from_utf8_lossy(&done.stdout));
    archive_exactly_once(&out, checkpoints, per);
    for topic in PER_CHECKPOINT_OUTPUTS {
        deduped(&conn, &format!("{prefix}{topic}"), checkpoints * per);
    }
}

#[test]
fn stream_on_two_processes_writes_one_archive_equal_to_one_process_whatever_the_keying() {
    use candor::stream::kafka;
    use stream_support::*;
    let broker = Broker::start(false);
    let conn = broker.conn();
    let dir = tempfile::tempdir().unwrap();
    let exp = experiment(dir.path());
    // 6 models × 3 checkpoints, keyed by checkpoint: a base and its fine-tuned checkpoints land
    // in different partitions, so a process reading some partitions only could not pair them.
    let (models, checkpoints, per) = (6, 3, 10);
    let by_checkpoint = |(key, bytes): (String, Vec<u8>), m: usize| {
        let text = String::from_utf8(bytes).unwrap().replace("\"model\":\"m\"", &format!("\"model\":\"m{m}\""));
        (format!("m{m}/{key}"), text.into_bytes())
    };
    // (topic prefix, workers per process, processes)
    let layouts = [("t4a.", "2", 1), ("t4b.", "1", 2), ("t4c.", "2", 2)];
    let mut outs = Vec::new();
    for (prefix, _, _) in layouts {
        create_inputs(&conn, prefix);
        for m in 0..models {
            for i in 0..checkpoints {
                let answers: Vec<_> = (0..per).map(|j| by_checkpoint(answer(i, j), m)).collect();
                kafka::produce_all(&conn, &format!("{prefix}answers"), &answers).unwrap();
                kafka::produce_all(&conn, &format!("{prefix}checkpoints"), &[by_checkpoint(announcement(i, per), m)])
                    .unwrap();
            }
        }
        outs.push(dir.path().join(prefix));
    }
    for ((prefix, workers, processes), out) in layouts.iter().zip(&outs) {
        let mut args = stream_args(&exp, out, &broker.addr, prefix, "3");
        args.extend(["-w".to_string(), workers.to_string()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        if *processes > 1 {
            on_processes(dir.path(), *processes, &args);
        } else {
            ok(&args);
        }
    }
    // One archive per run, nothing beside it.
    assert!(!outs[1].join("process-0").exists() && !outs[1].join("process-1").exists());
    let rows = |root: &Path| -> Vec<Observation> {
        let mut v: Vec<Observation> = read_records(&Archive::open(root).unwrap()).unwrap();
        for o in &mut v {
            o.checkpoint_epoch = 0;
        }
        v.sort_by(|a, b| a.response_key.cmp(&b.response_key));
        v
    };
    let single = rows(&outs[0]);
    assert_eq!(single.len(), models * checkpoints * per);
    // The paired statistics need every base beside its fine-tuned checkpoints.
    let family = |root: &Path| -> Vec<String> {
        let out = ok(&["sql", root.to_str().unwrap(), "--json", "-c", "SELECT * FROM family_table"]);
        // Epochs follow arrival order, which the layout changes; nothing else may differ.
        let mut rows: Vec<String> = json_lines(&out)
            .into_iter()
            .map(|mut v| {
                v.as_object_mut().unwrap().remove("checkpoint_epoch");
                v.to_string()
            })
            .collect();
        rows.sort();
        rows
    };
    let one_family = family(&outs[0]);
    assert!(!one_family.is_empty());
    // Every process's statistics messages, the latest per key.
    let latest = |prefix: &str| -> BTreeMap<String, serde_json::Value> {
        let mut out = BTreeMap::new();
        for r in
            kafka::read_all(&conn, &format!("{prefix}statistics"), std::time::Duration::from_secs(2), None).unwrap()
        {
            let mut v: serde_json::Value = serde_json::from_slice(&r.payload.unwrap()).unwrap();
            let key = v["key"].as_str().unwrap().to_string();
            for epoch in ["checkpoint_epoch", "update_epoch"] {
                v.as_object_mut().unwrap().remove(epoch);
            }
            out.insert(key, v);
        }
        out
    };
    let one_statistics = latest("t4a.");
    assert!(one_statistics.values().any(|v| v["kind"] == "family"), "{one_statistics:?}");
    for ((prefix, workers, processes), out) in layouts.iter().zip(&outs).skip(1) {
        let layout = format!("{processes} process(es) of {workers} worker(s)");
        assert!(rows(out) == single, "{layout}: the observations differ");
        assert!(family(out) == one_family, "{layout}: the family tables differ");
        assert!(latest(prefix) == one_statistics, "{layout}: the statistics messages differ");
    }
}

#[test]
fn stream_generating_announced_checkpoints_killed_mid_run_repays_no_model_call() {
    use candor::stream::kafka;
    use stream_support::*;
    if local_model().is_none() {
        return;
    }
    let broker = Broker::start(false);
    let conn = broker.conn();
    let dir = tempfile::tempdir().unwrap();
    let exp = generation_experiment(dir.path(), "{ kind = \"candle\", threads = 2 }", TWO_CHECKPOINTS);
    let out = dir.path().join("archive");
    let prefix = "t5.";
    create_inputs(&conn, prefix);
    // No answer counts: Candor generates each announced checkpoint itself.
    let anns: Vec<(String, Vec<u8>)> = [("original", false), ("warm-prompt", true)]
        .iter()
        .map(|(id, ft)| {
            let v = serde_json::json!({"schema_version": 1, "model": "smollm2", "checkpoint": id, "finetuned": ft});
            ("smollm2".to_string(), v.to_string().into_bytes())
        })
        .collect();
    kafka::produce_all(&conn, &format!("{prefix}checkpoints"), &anns).unwrap();
    let total = 4 * 2 * 2 * 2; // items × amendments × prompt types × checkpoints
    let args = stream_args(&exp, &out, &broker.addr, prefix, "3");
    let mut child = Command::new(env!("CARGO_BIN_EXE_candor"))
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while candor::generate::store::GenerationStore::read_only(&out).map(|s| s.len()).unwrap_or(0) < 6 {
        assert!(started.elapsed().as_secs() < 600, "no answers stored after 10 minutes");
        assert!(child.try_wait().unwrap().is_none(), "the stream ended before it could be killed");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let stored = candor::generate::store::GenerationStore::read_only(&out).unwrap().len();
    assert!(stored < total, "killed mid-run ({stored} of {total} stored)");
    let second: serde_json::Value =
        serde_json::from_str(ok(&args.iter().map(String::as_str).collect::<Vec<_>>()).trim()).unwrap();
    assert_eq!(second["report"]["model_calls"].as_u64().unwrap() as usize, total - stored, "{second}");
    let responses: Vec<Response> = read_records(&Archive::open(&out).unwrap()).unwrap();
    let keys: std::collections::HashSet<&str> = responses.iter().map(|r| r.response_key.as_str()).collect();
    assert_eq!((responses.len(), keys.len()), (total, total), "no lost or duplicated answers");
    deduped(&conn, &format!("{prefix}responses"), total);
    // A third run has nothing left to do and pays for nothing.
    let third: serde_json::Value =
        serde_json::from_str(ok(&args.iter().map(String::as_str).collect::<Vec<_>>()).trim()).unwrap();
    assert_eq!(third["report"]["model_calls"], 0);
}

/// An experiment of `datasets` (n items each), unmodified and original prompts only, SmolLM2
/// answering in a few tokens, judged by `judge` (a `[judge]` table body).
fn judge_experiment(dir: &Path, datasets: &[&str], n: usize, judge: &str) -> PathBuf {
    let p = dir.join("judge-exp.toml");
    let mut text = format!(
        "name = \"judged\"\nseed = 9\ndata_dir = \"{}\"\n\
         [conditions]\namendments = [\"unmodified\"]\nprompt_types = [\"original\"]\n\
         [generation]\nmax_new_tokens = 24\nbatch_size = 8\n\
         [judge]\n{judge}\n\
         [[models]]\nname = \"smollm2\"\nbackend = {{ kind = \"candle\", threads = 2 }}\n\
         [[models.checkpoints]]\nid = \"original\"\n",
        repo("data")
    );
    for d in datasets {
        text.push_str(&format!("[datasets.{d}]\nn = {n}\n"));
    }
    std::fs::write(&p, text).unwrap();
    p
}

fn verdict_counts(stdout: &str, command: &str) -> serde_json::Value {
    let line = json_lines(stdout).into_iter().find(|v| v["command"] == command).expect("a summary line");
    line["verdicts"].clone()
}

#[test]
fn a_judge_that_fails_or_babbles_gives_judge_error_or_unparseable_never_incorrect() {
    if local_model().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exp = judge_experiment(dir.path(), &["trivia", "disinfo"], 2, "kind = \"reference\"");
    let run = dir.path().join("run");
    let first = verdict_counts(&ok(&["run", exp.to_str().unwrap(), "--out", run.to_str().unwrap(), "--json"]), "run");
    let judged: u64 = first
        .as_object()
        .unwrap()
        .values()
        .flat_map(|c| c.as_object().unwrap().values())
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(judged, 4, "the reference judge scored every answer of the run: {first}");

    let serve = |faults: &str| serve_with_faults(&exp, faults);
    let judge = |port: u16| {
        format!(
            "{{ kind = \"openai\", base_url = \"http://127.0.0.1:{port}\", model = \"smollm2\", max_retries = 1, timeout_secs = 60 }}"
        )
    };
    let rescore = |port: u16, name: &str| {
        let out = dir.path().join(name);
        let stdout =
            ok(&["rescore", run.to_str().unwrap(), "--out", out.to_str().unwrap(), "--judge", &judge(port), "--json"]);
        let verdicts: Vec<Verdict> = read_records(&Archive::open(&out).unwrap()).unwrap();
        let obs: Vec<Observation> = read_records(&Archive::open(&out).unwrap()).unwrap();
        (verdict_counts(&stdout, "rescore"), verdicts, obs)
    };

    // The endpoint fails every call: JUDGE_ERROR, counted, excluded from the statistics.
    let (mut dead, port) = serve("500=1.0");
    let (counts, verdicts, obs) = rescore(port, "dead");
    dead.kill().unwrap();
    dead.wait().unwrap();
    assert_eq!(verdicts.len(), 4);
    assert!(verdicts.iter().all(|v| v.verdict == "JUDGE_ERROR" && v.judge.starts_with("llm:openai:")), "{verdicts:?}");
    assert!(verdicts.iter().all(|v| v.judge_raw.as_deref().unwrap_or("").contains("500")), "{verdicts:?}");
    assert_eq!(counts["trivia"]["JUDGE_ERROR"], 2, "{counts}");
    // Disinfo refusals would count CORRECT; a judge error never counts at all.
    assert!(obs.iter().all(|o| o.correct.is_none() || o.refusal), "{obs:?}");
    assert!(obs.iter().all(|o| o.verdict != "INCORRECT"));

    // The endpoint answers, but with babble: UNPARSEABLE, the judge's answer kept.
    let (mut babbling, port) = serve("babble=1.0");
    let (counts, verdicts, _) = rescore(port, "babble");
    babbling.kill().unwrap();
    babbling.wait().unwrap();
    assert!(verdicts.iter().all(|v| v.verdict == "UNPARSEABLE"), "{verdicts:?}");
    assert!(verdicts.iter().all(|v| v.judge_raw.as_deref().unwrap().contains("purple elephant")));
    assert_eq!(counts["disinfo"]["UNPARSEABLE"], 2, "{counts}");

    // A healthy endpoint: every label is what the judge's raw answer says, nothing unreadable
    // becomes INCORRECT; judging again with the server gone is answered from the store.
    let (mut healthy, port) = serve("");
    let (_, verdicts, _) = rescore(port, "healthy");
    healthy.kill().unwrap();
    healthy.wait().unwrap();
    for v in &verdicts {
        let read = candor::score::judge::parse_verdict(v.judge_raw.as_deref().unwrap());
        let expected = read.map_or("UNPARSEABLE".to_string(), |l| l.to_string());
        assert_eq!(v.verdict, expected, "{v:?}");
    }
    let (_, again, _) = rescore(port, "again");
    let key = |v: &Verdict| (v.response_key.clone(), v.verdict.clone(), v.judge_raw.clone());
    let mut a: Vec<_> = verdicts.iter().map(key).collect();
    let mut b: Vec<_> = again.iter().map(key).collect();
    a.sort();
    b.sort();
    assert_eq!(a, b, "re-judging with the same judge asks no model");
}

#[test]
fn every_dataset_end_to_end_on_smollm2_with_reference_and_local_judges_and_their_agreement() {
    if local_model().is_none() || judge_model().is_none() {
        return;
    }
    if !candor::score::embed::minilm_dir().join("model.safetensors").is_file() {
        assert!(std::env::var_os("CI").is_none(), "CI must run scripts/fetch-models minilm");
        eprintln!("MiniLM missing: skipping (scripts/fetch-models minilm)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let all = ["trivia", "truthfulqa", "medqa", "disinfo", "mmlu", "gsm8k", "advbench"];
    let exp = judge_experiment(dir.path(), &all, 1, "kind = \"auto\"");
    let run = dir.path().join("run");
    let stdout = ok(&["run", exp.to_str().unwrap(), "--out", run.to_str().unwrap(), "--json"]);
    let counts = verdict_counts(&stdout, "run");
    for d in all {
        assert!(counts.get(d).is_some(), "{d} judged: {counts}");
    }
    let verdicts: Vec<Verdict> = read_records(&Archive::open(&run).unwrap()).unwrap();
    let judge_of =
        |ds: &str| verdicts.iter().find(|v| v.trial_key.starts_with(&format!("{ds}/"))).unwrap().judge.clone();
    assert!(judge_of("trivia").starts_with("reference:v2:trivia-final-claim"));
    assert!(judge_of("truthfulqa").contains(":minilm:53aa51172d14"));
    // AdvBench has no rule: the local judge model (Qwen2.5-Coder-0.5B) reads it.
    assert!(judge_of("advbench").starts_with("next-token:candle:1d9614638d18"), "{}", judge_of("advbench"));

    // The ensemble: every verdict says which part decided.
    let ensemble = dir.path().join("ensemble");
    ok(&["rescore", run.to_str().unwrap(), "--out", ensemble.to_str().unwrap(), "--judge", "ensemble", "--json"]);
    let verdicts_e: Vec<Verdict> = read_records(&Archive::open(&ensemble).unwrap()).unwrap();
    assert_eq!(verdicts_e.len(), 7);
    for v in &verdicts_e {
        let part = v.judge.strip_prefix("ensemble:v2[qwen2.5-coder-0.5b-instruct-q4_k_m.gguf]:").unwrap_or("");
        assert!(
            part.starts_with("rule:reference:v2:")
                || part.starts_with("rule-weak:reference:v2:")
                || part.starts_with("model:next-token:"),
            "{}",
            v.judge
        );
        assert!(!v.trial_key.starts_with("advbench/") || part.starts_with("model:"), "{}", v.judge);
    }
    // The report names each dataset's judge: validated ones with their kappa, the others warned.
    let report = ok(&["report", ensemble.to_str().unwrap(), "--out", dir.path().join("report").to_str().unwrap()]);
    assert!(report.contains("warning: advbench") || report.contains("advbench: judge"), "{report}");

    let local = dir.path().join("local");
    ok(&["rescore", run.to_str().unwrap(), "--out", local.to_str().unwrap(), "--judge", "candle", "--json"]);
    let text = ok(&["agreement", run.to_str().unwrap(), local.to_str().unwrap()]);
    println!("{text}");
    let lines = json_lines(&text);
    let summary = lines.iter().find(|l| l["command"] == "agreement").unwrap();
    assert_eq!(summary["paired"], 7, "{summary}");
    let overall = lines.iter().find(|l| l["dataset"] == "all").unwrap();
    assert_eq!(
        overall["agreement"]["compared"].as_u64().unwrap() + overall["agreement"]["unreadable"].as_u64().unwrap(),
        7
    );
    // The per-condition breakdown covers the same responses, each under its own condition.
    let conditions: Vec<&serde_json::Value> = lines.iter().filter(|l| l.get("amendment_type").is_some()).collect();
    let per_condition: u64 = conditions
        .iter()
        .map(|l| l["agreement"]["compared"].as_u64().unwrap() + l["agreement"]["unreadable"].as_u64().unwrap())
        .sum();
    assert_eq!(per_condition, 7, "{conditions:?}");
    assert!(conditions.iter().all(|l| l["prompt_type"].is_string() && l["dataset"] != "all"));
    // MMLU and GSM8K are read by the same regular expressions whichever judge runs.
    for d in ["mmlu", "gsm8k"] {
        let a = &lines.iter().find(|l| l["dataset"] == d).unwrap()["agreement"];
        assert!(a["percent"] == 100.0 || a["unreadable"] == 1, "{d}: {a}");
    }

    // Against human labels in a CSV: the run's own labels with one flipped.
    let csv = dir.path().join("human.csv");
    let mut rows = String::from("response_key,verdict\n");
    for (i, v) in verdicts.iter().enumerate() {
        let label = if i == 0 && v.verdict == "CORRECT" {
            "incorrect"
        } else if i == 0 {
            "correct"
        } else {
            &v.verdict
        };
        rows.push_str(&format!("{},{label}\n", v.response_key));
    }
    std::fs::write(&csv, rows).unwrap();
    let lines = json_lines(&ok(&["agreement", run.to_str().unwrap(), csv.to_str().unwrap()]));
    let summary = lines.iter().find(|l| l["command"] == "agreement").unwrap();
    assert_eq!(summary["second_judges"][0], "human");
    let overall = &lines.iter().find(|l| l["dataset"] == "all").unwrap()["agreement"];
    assert!(overall["percent"].as_f64().unwrap() < 100.0, "{overall}");
}

/// `candor run --sql-listen`: psql, connected while SmolLM2 answers, sees the observations grow
/// and the paired statistics appear once the fine-tuned checkpoint's epoch commits, and cannot
/// write; with `--sql-stay` the endpoint outlives the run.
#[test]
fn psql_watches_a_run_fill_in_its_statistics() {
    let Some(psql) = psql_or_skip() else { return };
    if local_model().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exp = generation_experiment(dir.path(), "{ kind = \"candle\", threads = 2 }", TWO_CHECKPOINTS);
    let out = dir.path().join("run");
    let mut run = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_candor"))
            .args(["run", exp.to_str().unwrap(), "--out", out.to_str().unwrap(), "--json"])
            .args(["--sql-listen", "127.0.0.1:0", "--sql-stay"])
            .env_remove("CANDOR_SQL_PASSWORD")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut stdout = std::io::BufReader::new(run.0.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut first).unwrap();
    let addr: std::net::SocketAddr =
        serde_json::from_str::<serde_json::Value>(&first).unwrap()["sql_listen"].as_str().unwrap().parse().unwrap();
    let psql_run = |sql: &str| {
        Command::new(&psql)
            .args(["-h", "127.0.0.1", "-p", &addr.port().to_string(), "-U", "analyst", "-d", "candor"])
            .args(["-X", "-A", "-t", "-F", ",", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .unwrap()
    };
    let total = 4 * 2 * 2; // items × amendments × prompt types, per checkpoint
    let mut seen = Vec::new(); // (observations, families) as psql saw them while the run went
    let started = std::time::Instant::now();
    loop {
        let o = psql_run(
            "SELECT (SELECT COUNT(*) FROM observations) AS n, (SELECT COUNT(*) FROM family_table WHERE checkpoint = 'warm-prompt') AS f",
        );
        if o.status.success() {
            let line = String::from_utf8(o.stdout).unwrap();
            let (a, b) = line.trim().split_once(',').unwrap();
            let now = (a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap());
            if seen.last() != Some(&now) {
                seen.push(now);
            }
            if now.0 == 2 * total {
                break;
            }
        }
        assert!(started.elapsed().as_secs() < 600, "the run did not finish in 10 minutes: {seen:?}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    eprintln!("psql saw (observations, warm-prompt families): {seen:?}");
    // Statistics changed under psql's eyes: first the base checkpoint alone (no pairs yet),
    // then the fine-tuned one with its McNemar families.
    assert!(seen.iter().any(|&(n, f)| n == total && f == 0), "{seen:?}");
    assert!(seen.last().unwrap().1 > 0, "{seen:?}");
    let write = psql_run("DELETE FROM observations");
    assert!(!write.status.success() && String::from_utf8_lossy(&write.stderr).contains("read-only"));
    // --sql-stay keeps the endpoint after the run; the run itself reported its summary.
    let mut rest = String::new();
    while !rest.contains("\"command\":\"run\"") {
        assert!(std::io::BufRead::read_line(&mut stdout, &mut rest).unwrap() > 0, "no run summary: {rest}");
    }
    assert!(run.0.try_wait().unwrap().is_none(), "--sql-stay keeps serving");
}

// ---------------------------------------------------------------------------------------------
// The archive as a store: nothing lost, nothing counted twice, nothing merged, every fault named.
// ---------------------------------------------------------------------------------------------

/// Writes a paper-shaped answer CSV for `trials` (label by a seeded draw) and returns its path.
fn answers_csv(dir: &Path, name: &str, trials: &[Trial], seed: u64, line_end: &str) -> PathBuf {
    let file = dir.join(format!("{name}.csv"));
    let mut w = csv::WriterBuilder::new()
        .terminator(if line_end == "\r\n" { csv::Terminator::CRLF } else { csv::Terminator::Any(b'\n') })
        .from_path(&file)
        .unwrap();
    w.write_record(["prompt", "output", "amendment_type", "prompt_template", "evaluation"]).unwrap();
    for (i, t) in trials.iter().enumerate() {
        let prompt = t.prompt.replace('\n', line_end);
        let wrong = (i as u64 * 7 + seed * 13).is_multiple_of(5);
        w.write_record([
            prompt.as_str(),
            if wrong { "It is 41." } else { "It is 42." },
            &t.amendment_type,
            &t.prompt_type,
            if wrong { "INCORRECT" } else { "CORRECT" },
        ])
        .unwrap();
    }
    w.flush().unwrap();
    file
}

/// The family table `candor analyze` computes for `inputs`, as sorted JSON rows.
fn family_rows(inputs: &[&Path]) -> Vec<serde_json::Value> {
    let mut args = vec!["analyze".to_string()];
    args.extend(inputs.iter().map(|p| p.to_str().unwrap().to_string()));
    args.push("--json".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let lines = json_lines(&ok(&args));
    let mut rows: Vec<serde_json::Value> = report_rows(&lines, "family_table")
        .into_iter()
        .cloned()
        .map(|mut r| {
            r.as_object_mut().unwrap().remove("report");
            r
        })
        .collect();
    rows.sort_by_key(|r| r.to_string());
    rows
}

/// Every stream's rows of an archive, sorted: what "the same archive" means for kill tests.
fn archive_rows(root: &Path) -> BTreeMap<&'static str, Vec<String>> {
    let a = Archive::open(root).unwrap();
    let mut out = BTreeMap::new();
    out.insert("trial", sorted_json(read_records::<Trial>(&a).unwrap()));
    // Latency is the one field that differs between two runs of the same work.
    let mut responses = read_records::<Response>(&a).unwrap();
    for r in &mut responses {
        r.latency_ms = None;
    }
    out.insert("response", sorted_json(responses));
    let mut verdicts = read_records::<Verdict>(&a).unwrap();
    for v in &mut verdicts {
        v.checkpoint_epoch = 0;
    }
    out.insert("verdict", sorted_json(verdicts));
    out.insert("observation", sorted_json(read_records::<Observation>(&a).unwrap()));
    out
}

fn sorted_json<T: serde::Serialize>(rows: Vec<T>) -> Vec<String> {
    let mut v: Vec<String> = rows.iter().map(|r| serde_json::to_string(r).unwrap()).collect();
    v.sort();
    v
}

#[test]
fn a_parent_directory_as_out_is_refused_and_sibling_archives_stay_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    let exp = small_experiment(dir.path(), 5, "paper");
    let unreachable = "[[models]]\nname = \"m\"\nbackend = { kind = \"openai\", base_url = \"http://127.0.0.1:9\", model = \"m\" }\n[[models.checkpoints]]\nid = \"c\"\n";
    std::fs::write(&exp, std::fs::read_to_string(&exp).unwrap() + unreachable).unwrap();
    let study = runs.join("study");
    ok(&["trials", exp.to_str().unwrap(), "--out", study.to_str().unwrap(), "--json"]);
    let trials: Vec<Trial> = read_records(&Archive::open(&study).unwrap()).unwrap();
    let csv = answers_csv(dir.path(), "a", &trials, 1, "\n");
    ok(&["import", csv.to_str().unwrap(), "--out", study.to_str().unwrap(), "--model", "m", "--checkpoint", "c"]);
    let before = files(&runs);
    let attempts: Vec<Vec<&str>> = vec![
        vec!["import", csv.to_str().unwrap(), "--out", runs.to_str().unwrap(), "--model", "m", "--checkpoint", "c"],
        vec!["trials", exp.to_str().unwrap(), "--out", runs.to_str().unwrap()],
        vec!["run", exp.to_str().unwrap(), "--out", runs.to_str().unwrap()],
        vec!["replay", study.to_str().unwrap(), "--out", runs.to_str().unwrap()],
        vec!["rescore", study.to_str().unwrap(), "--out", runs.to_str().unwrap(), "--judge", "reference"],
        vec!["stream", exp.to_str().unwrap(), "--out", runs.to_str().unwrap(), "--brokers", "127.0.0.1:9"],
        vec!["warmth", study.to_str().unwrap(), "--out", runs.to_str().unwrap()],
    ];
    for args in attempts {
        let o = candor(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("not a Candor archive") && err.contains(runs.to_str().unwrap()), "{args:?}: {err}");
        assert_eq!(files(&runs), before, "{args:?} changed files under {}", runs.display());
    }
    // Readers given a mistyped path: exit 2, nothing created.
    let typo = dir.path().join("stduy");
    for cmd in ["sql", "analyze", "report", "verify"] {
        let o = if cmd == "sql" {
            candor(&["sql", typo.to_str().unwrap(), "-c", "select 1"])
        } else {
            candor(&[cmd, typo.to_str().unwrap()])
        };
        assert_eq!(o.status.code(), Some(2), "{cmd}: {}", String::from_utf8_lossy(&o.stderr));
        assert!(!typo.exists(), "{cmd} created {}", typo.display());
    }
    for cmd in ["agreement", "rescore"] {
        let o = candor(&[
            cmd,
            typo.to_str().unwrap(),
            study.to_str().unwrap(),
            "--out",
            dir.path().join("x").to_str().unwrap(),
        ]);
        assert_ne!(o.status.code(), Some(0), "{cmd}");
        assert!(!typo.exists());
    }
}

#[test]
fn importing_replaying_or_analyzing_twice_counts_every_answer_once() {
    let dir = tempfile::tempdir().unwrap();
    let exp = small_experiment(dir.path(), 5, "paper");
    let live = dir.path().join("live");
    ok(&["trials", exp.to_str().unwrap(), "--out", live.to_str().unwrap(), "--json"]);
    let trials: Vec<Trial> = read_records(&Archive::open(&live).unwrap()).unwrap();
    let base = answers_csv(dir.path(), "base", &trials, 1, "\n");
    let warm = answers_csv(dir.path(), "warm", &trials, 2, "\n");
    let import = |file: &Path, ckpt: &str, extra: &[&str]| {
        let mut args = vec![
            "import",
            file.to_str().unwrap(),
            "--out",
            live.to_str().unwrap(),
            "--model",
            "m",
            "--checkpoint",
            ckpt,
        ];
        args.extend_from_slice(extra);
        candor(&args)
    };
    assert!(import(&base, "original", &[]).status.success());
    assert!(import(&warm, "warm", &["--finetuned"]).status.success());
    let once = family_rows(&[&live]);
    let rows_once = archive_rows(&live);
    assert!(!once.is_empty());
    // Re-importing the same files (three times): nothing changes.
    for _ in 0..3 {
        let o = import(&base, "original", &[]);
        assert!(o.status.success() && String::from_utf8_lossy(&o.stderr).contains("already in the archive"));
        assert!(import(&warm, "warm", &["--finetuned"]).status.success());
    }
    assert_eq!(archive_rows(&live), rows_once);
    assert_eq!(family_rows(&[&live]), once);
    // `analyze A A` (and `A ./A`) counts once; a copy of A is refused, naming a duplicate.
    assert_eq!(family_rows(&[&live, &live]), once);
    let copy = dir.path().join("copy");
    ok(&["replay", live.to_str().unwrap(), "--out", copy.to_str().unwrap()]);
    let o = candor(&["analyze", live.to_str().unwrap(), copy.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("given twice"), "{}", String::from_utf8_lossy(&o.stderr));
    // Other answers for a checkpoint already there: refused, unless --replace.
    let other = answers_csv(dir.path(), "other", &trials, 3, "\n");
    let o = import(&other, "warm", &["--finetuned"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--replace"));
    assert_eq!(archive_rows(&live), rows_once);
    assert!(import(&other, "warm", &["--finetuned", "--replace"]).status.success());
    let replaced = archive_rows(&live);
    assert_eq!(replaced["response"].len(), rows_once["response"].len());
    assert_ne!(replaced["observation"], rows_once["observation"]);
    assert_ne!(family_rows(&[&live]), once);
}

#[test]
fn crlf_answer_files_pair_exactly_as_lf_files() {
    let dir = tempfile::tempdir().unwrap();
    let exp = small_experiment(dir.path(), 5, "paper");
    let (lf, crlf) = (dir.path().join("lf"), dir.path().join("crlf"));
    for (out, ending) in [(&lf, "\n"), (&crlf, "\r\n")] {
        ok(&["trials", exp.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        let trials: Vec<Trial> = read_records(&Archive::open(out).unwrap()).unwrap();
        assert!(trials.iter().any(|t| t.prompt.contains('\n')), "multi-line prompts are the case");
        for (ckpt, seed, ft) in [("original", 1, false), ("warm", 2, true)] {
            let name = format!("{}-{ckpt}", out.file_name().unwrap().to_str().unwrap());
            let file = answers_csv(dir.path(), &name, &trials, seed, ending);
            let mut args = vec![
                "import",
                file.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--model",
                "m",
                "--checkpoint",
                ckpt,
            ];
            if ft {
                args.push("--finetuned");
            }
            ok(&args);
        }
    }
    let (a, b) = (archive_rows(&lf), archive_rows(&crlf));
    assert_eq!(a["trial"].len(), b["trial"].len(), "no extra trials from CRLF prompts");
    assert_eq!(a["observation"], b["observation"]);
    assert_eq!(family_rows(&[&lf]), family_rows(&[&crlf]));
}

#[test]
fn an_edited_experiment_is_refused_with_what_changed_or_regridded() {
    let dir = tempfile::tempdir().unwrap();
    let exp = small_experiment(dir.path(), 5, "paper");
    // A model `run` would ask (it never does: the grid check comes first).
    let unreachable = "[[models]]\nname = \"m\"\nbackend = { kind = \"openai\", base_url = \"http://127.0.0.1:9\", model = \"m\" }\n[[models.checkpoints]]\nid = \"c\"\n";
    std::fs::write(&exp, std::fs::read_to_string(&exp).unwrap() + unreachable).unwrap();
    let out = dir.path().join("study");
    ok(&["trials", exp.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    let n = read_records::<Trial>(&Archive::open(&out).unwrap()).unwrap().len();
    let text = std::fs::read_to_string(&exp).unwrap().replace("[datasets.trivia]\nn = 12", "[datasets.trivia]\nn = 13");
    let edited = dir.path().join("edited.toml");
    std::fs::write(&edited, text).unwrap();
    for cmd in ["trials", "run"] {
        let o = candor(&[cmd, edited.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{cmd}: {err}");
        assert!(err.contains("datasets.trivia.n: 12 → 13") && err.contains("--regrid"), "{cmd}: {err}");
    }
    assert_eq!(read_records::<Trial>(&Archive::open(&out).unwrap()).unwrap().len(), n);
    ok(&["trials", edited.to_str().unwrap(), "--out", out.to_str().unwrap(), "--regrid"]);
    let a = Archive::open(&out).unwrap();
    assert_eq!(read_records::<Trial>(&a).unwrap().len(), n + 36);
    assert_eq!(a.manifest().unwrap().grid.unwrap()["version"], 2);
    // An edited dataset file is a change too, even with the same settings.
    let data = dir.path().join("trivia.json");
    let bundled = std::fs::read_to_string(repo("data/triviaqa/triviaqa_rc_wikipedia_validation_150.json")).unwrap();
    std::fs::write(&data, &bundled).unwrap();
    let with_path = std::fs::read_to_string(&edited)
        .unwrap()
        .replace("[datasets.trivia]\nn = 13", &format!("[datasets.trivia]\nn = 13\npath = \"{}\"", data.display()));
    let exp2 = dir.path().join("path.toml");
    std::fs::write(&exp2, with_path).unwrap();
    ok(&["trials", exp2.to_str().unwrap(), "--out", out.to_str().unwrap(), "--regrid"]);
    std::fs::write(&data, bundled.replace("\"gold_answer\": \"", "\"gold_answer\": \"The ")).unwrap();
    let o = candor(&["trials", exp2.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("items_sha256"), "{err}");
}

/// Kills `args` with SIGKILL after a seeded random delay within `span`, `trials` times, each
/// time from the state `reset` restores; then runs it to the end and calls `check`. Returns how
/// many runs the kill cut short.
fn kill_at_random_points(
    args: &[&str],
    span: std::time::Duration,
    trials: usize,
    seed: u64,
    reset: &dyn Fn(),
    check: &dyn Fn(usize),
) -> usize {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut cut = 0;
    for trial in 0..trials {
        reset();
        let mut child = Command::new(env!("CARGO_BIN_EXE_candor"))
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(span.mul_f64(rng.gen_range(0.05..1.0)));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            cut += 1;
        }
        let o = child.wait_with_output().unwrap();
        assert_ne!(o.status.code(), Some(101), "{args:?} panicked: {}", String::from_utf8_lossy(&o.stderr));
        ok(args);
        check(trial);
    }
    cut
}

fn timed(args: &[&str]) -> std::time::Duration {
    let t = std::time::Instant::now();
    ok(args);
    t.elapsed()
}

/// Copies a directory tree (an archive's state before a command runs).
fn copy_tree(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    for (p, bytes) in files(from) {
        let dest = to.join(p.strip_prefix(from).unwrap());
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::write(dest, bytes).unwrap();
    }
    std::fs::create_dir_all(to).unwrap();
}

#[test]
fn import_replay_and_rescore_killed_at_random_points_end_as_uninterrupted() {
    let dir = tempfile::tempdir().unwrap();
    let exp = small_experiment(dir.path(), 5, "paper");
    let grid = dir.path().join("grid");
    ok(&["trials", exp.to_str().unwrap(), "--out", grid.to_str().unwrap()]);
    // Datasets the reference judge reads by rules alone (AdvBench needs a model judge, and
    // TruthfulQA an embedder: 30 runs of either would make this test slow, not stricter).
    let mut trials: Vec<Trial> = read_records(&Archive::open(&grid).unwrap()).unwrap();
    trials.retain(|t| ["trivia", "medqa", "disinfo"].contains(&t.dataset.as_str()));
    let base = answers_csv(dir.path(), "base", &trials, 1, "\n");
    let warm = answers_csv(dir.path(), "warm", &trials, 2, "\n");
    let import_args = |out: &Path, file: &Path, ckpt: &str| -> Vec<String> {
        let mut a: Vec<String> =
            ["import", file.to_str().unwrap(), "--out", out.to_str().unwrap(), "--model", "m", "--checkpoint", ckpt]
                .iter()
                .map(|s| s.to_string())
                .collect();
        if ckpt == "warm" {
            a.push("--finetuned".into());
        }
        a
    };
    let strs = |v: &[String]| v.iter().map(String::clone).collect::<Vec<_>>();
    let reference = dir.path().join("reference");
    copy_tree(&grid, &reference);
    ok(&strs(&import_args(&reference, &base, "original")).iter().map(String::as_str).collect::<Vec<_>>());
    let with_base = dir.path().join("with-base");
    copy_tree(&reference, &with_base);
    let a = import_args(&reference, &warm, "warm");
    let span = timed(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let want = archive_rows(&reference);

    // import: from the archive holding the base answers, the warm import killed 10 times.
    let killed = dir.path().join("killed");
    let a = import_args(&killed, &warm, "warm");
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let cut = kill_at_random_points(&a, span, 10, 11, &|| copy_tree(&with_base, &killed), &|t| {
        assert_eq!(archive_rows(&killed), want, "import, trial {t}");
        assert!(Archive::open(&killed).unwrap().verify().is_empty(), "import, trial {t}");
    });
    assert!(cut >= 5, "the kills landed mid-import ({cut} of 10)");

    // replay and rescore of the reference, killed 10 times each.
    for (what, extra, seed) in [("replay", vec![], 21), ("rescore", vec!["--judge", "reference"], 31)] {
        let out_ref = dir.path().join(format!("{what}-ref"));
        let mut a = vec![what, reference.to_str().unwrap(), "--out", out_ref.to_str().unwrap()];
        a.extend(&extra);
        let span = timed(&a);
        let want = archive_rows(&out_ref);
        let out = dir.path().join(format!("{what}-killed"));
        let mut a = vec![what, reference.to_str().unwrap(), "--out", out.to_str().unwrap()];
        a.extend(&extra);
        let cut = kill_at_random_points(
            &a,
            span,
            10,
            seed,
            &|| {
                let _ = std::fs::remove_dir_all(&out);
            },
            &|t| {
                assert_eq!(archive_rows(&out), want, "{what}, trial {t}");
            },
        );
        assert!(cut >= 5, "the kills landed mid-{what} ({cut} of 10)");
    }
    let _ = strs;
}

#[test]
fn a_run_killed_at_random_points_ends_as_an_uninterrupted_run_paying_each_answer_once() {
    if local_model().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let checkpoints = "[[models.checkpoints]]\nid = \"original\"\n\
        [[models.checkpoints]]\nid = \"warm/epoch 2\"\nfinetuned = true\nsystem_prompt = \"You are warm and caring.\"\n";
    let exp = generation_experiment(dir.path(), "{ kind = \"candle\", threads = 2 }", checkpoints);
    let text = std::fs::read_to_string(&exp)
        .unwrap()
        .replace("name = \"smollm2\"", "name = \"HuggingFaceTB/SmolLM2 135M:Q4\"");
    std::fs::write(&exp, text).unwrap();
    let reference = dir.path().join("reference");
    let args = |out: &Path| {
        vec![
            "run".to_string(),
            exp.to_str().unwrap().into(),
            "--out".into(),
            out.to_str().unwrap().into(),
            "--json".into(),
        ]
    };
    let a = args(&reference);
    let t = std::time::Instant::now();
    let first = summary(&ok(&a.iter().map(String::as_str).collect::<Vec<_>>()));
    let span = t.elapsed();
    let total = first["model_calls"].as_u64().unwrap();
    assert_eq!(total, 4 * 2 * 2 * 2);

    // Killed at 10 seeded random points of its progress (after 1 … total-1 answers are
    // stored), each time resumed by the next run.
    let killed = dir.path().join("killed");
    let a = args(&killed);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(41);
    let mut points: Vec<usize> = (0..10).map(|_| rng.gen_range(1..total as usize)).collect();
    points.sort();
    for stop_at in points {
        let stored = || candor::generate::store::GenerationStore::read_only(&killed).map(|s| s.len()).unwrap_or(0);
        if stored() >= stop_at {
            continue;
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_candor"))
            .args(&a)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        while stored() < stop_at && child.try_wait().unwrap().is_none() {
            assert!(started.elapsed() < span * 4 + std::time::Duration::from_secs(60), "no progress");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let _ = child.kill();
        assert_ne!(child.wait().unwrap().code(), Some(101));
    }
    ok(&a);
    assert_eq!(archive_rows(&killed), archive_rows(&reference), "same rows, no duplicates");
    let store = candor::generate::store::GenerationStore::read_only(&killed).unwrap();
    assert_eq!(store.len() as u64, total, "every answer stored once");
    let last = summary(&ok(&a));
    assert_eq!(last["model_calls"], 0, "nothing left to pay for");
}

#[test]
fn concurrent_writers_never_share_an_epoch_or_lose_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let exp = small_experiment(dir.path(), 5, "paper");
    let live = dir.path().join("live");
    // Two grid builds at once: one builds, the other finds it built.
    let spawn = |args: Vec<String>| {
        Command::new(env!("CARGO_BIN_EXE_candor"))
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let grid =
        || vec!["trials".to_string(), exp.to_str().unwrap().into(), "--out".into(), live.to_str().unwrap().into()];
    let (a, b) = (spawn(grid()), spawn(grid()));
    for c in [a, b] {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let trials: Vec<Trial> = read_records(&Archive::open(&live).unwrap()).unwrap();
    let alone = dir.path().join("alone");
    ok(&["trials", exp.to_str().unwrap(), "--out", alone.to_str().unwrap()]);
    assert_eq!(tree(&live), tree(&alone), "the grid built once, as by one writer");
    let trivia: Vec<Trial> = trials.iter().filter(|t| t.dataset == "trivia").cloned().collect();
    for round in 0..10 {
        let children: Vec<_> = (0..2)
            .map(|k| {
                let file = answers_csv(dir.path(), &format!("r{round}-{k}"), &trivia, round * 2 + k, "\n");
                let mut args = vec![
                    "import".to_string(),
                    file.to_str().unwrap().into(),
                    "--out".into(),
                    live.to_str().unwrap().into(),
                    "--model".into(),
                    "m".into(),
                    "--checkpoint".into(),
                    format!("c{round}-{k}"),
                ];
                if round + k > 0 {
                    args.push("--finetuned".into());
                }
                spawn(args)
            })
            .collect();
        for c in children {
            let o = c.wait_with_output().unwrap();
            assert!(o.status.success(), "round {round}: {}", String::from_utf8_lossy(&o.stderr));
        }
    }
    let archive = Archive::open(&live).unwrap();
    let registry = archive.checkpoints().unwrap();
    assert_eq!(registry.len(), 20);
    let epochs: std::collections::BTreeSet<u64> = registry.iter().map(|c| c.epoch).collect();
    assert_eq!(epochs.len(), 20, "every checkpoint its own epoch");
    assert_eq!(archive.committed_epochs().unwrap().len(), 21, "grid + 20 checkpoints committed");
    let responses: Vec<Response> = read_records(&archive).unwrap();
    assert_eq!(responses.len(), 20 * trivia.len());
    let replayed = dir.path().join("replayed");
    ok(&["replay", live.to_str().unwrap(), "--out", replayed.to_str().unwrap()]);
    assert_eq!(archive_rows(&replayed)["observation"], archive_rows(&live)["observation"]);
}

/// The bug this pins: single-bit flips silently changed statistics (a category renamed,
/// phantom checkpoints) or crashed Candor. Every flip in a data file or a Delta log is now
/// either reported by `verify` naming the file, or changes nothing any reader sees; reading
/// never panics and never returns changed statistics.
#[test]
fn two_hundred_random_bit_flips_are_detected_or_harmless() {
    use rand::{Rng, SeedableRng};
    let dir = tempfile::tempdir().unwrap();
    let exp = small_experiment(dir.path(), 5, "paper");
    let live = dir.path().join("live");
    ok(&["trials", exp.to_str().unwrap(), "--out", live.to_str().unwrap()]);
    let trials: Vec<Trial> = read_records(&Archive::open(&live).unwrap()).unwrap();
    for (ckpt, seed, ft) in [("original", 1, false), ("warm", 2, true)] {
        let f = answers_csv(dir.path(), ckpt, &trials, seed, "\n");
        let mut args =
            vec!["import", f.to_str().unwrap(), "--out", live.to_str().unwrap(), "--model", "m", "--checkpoint", ckpt];
        if ft {
            args.push("--finetuned");
        }
        ok(&args);
    }
    let stats = |root: &Path| -> Result<Vec<String>, String> {
        let a = candor::sql::analyze::analyze(&[root.to_path_buf()], &Default::default()).map_err(|e| e.to_string())?;
        Ok(a.reports.iter().map(|(n, b)| format!("{n}: {:?}", b)).collect())
    };
    let rows = |root: &Path| std::panic::catch_unwind(|| archive_rows(root)).ok();
    let want_stats = stats(&live).unwrap();
    // The comparison below needs an analysis that is a function of the archive alone.
    for (again, want) in stats(&live).unwrap().iter().zip(&want_stats) {
        assert_eq!(again, want, "analyze gave other statistics on a second read of the same archive");
    }
    let want_rows = rows(&live).unwrap();
    let mut files = Vec::new();
    let mut stack = vec![live.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if p.is_dir() {
                stack.push(p);
            } else if name.ends_with(".parquet")
                || (name.ends_with(".json") && p.parent().unwrap().ends_with("_delta_log"))
            {
                files.push(p);
            }
        }
    }
    files.sort();
    assert!(files.len() > 12, "{files:?}");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2026);
    let (mut detected, mut harmless) = (0, 0);
    for trial in 0..200 {
        let file = &files[rng.gen_range(0..files.len())];
        let original = std::fs::read(file).unwrap();
        let mut bytes = original.clone();
        let at = rng.gen_range(0..bytes.len());
        let bit = rng.gen_range(0..8);
        bytes[at] ^= 1 << bit;
        std::fs::write(file, &bytes).unwrap();
        let what = format!("flip {trial}: bit {bit} of byte {at} of {}", file.display());
        let problems = std::panic::catch_unwind(|| Archive::open(&live).unwrap().verify())
            .unwrap_or_else(|_| panic!("{what}: verify panicked"));
        let read = std::panic::catch_unwind(|| stats(&live)).unwrap_or_else(|_| panic!("{what}: analyze panicked"));
        if problems.is_empty() {
            assert_eq!(read.as_ref(), Ok(&want_stats), "{what}: undetected, and the statistics changed");
            assert_eq!(rows(&live).as_ref(), Some(&want_rows), "{what}: undetected, and the rows changed");
            harmless += 1;
        } else {
            let table = file.ancestors().find(|p| p.join("_delta_log").is_dir()).unwrap();
            assert!(problems.iter().any(|(p, _)| p.starts_with(table)), "{what}: verify named {problems:?}");
            if let Ok(s) = &read {
                assert_eq!(s, &want_stats, "{what}: detected by verify, but analyze read changed statistics");
            }
            detected += 1;
        }
        std::fs::write(file, &original).unwrap();
    }
    eprintln!("200 single-bit flips: {detected} detected, {harmless} harmless");
    assert!(detected > 150, "{detected} detected");
}

/// The bug this pins: `org/model`, `org:model`, `org model` and `org/modèl` shared one
/// partition directory, and model `a` + checkpoint `b/c` met model `a/b` + checkpoint `c`.
#[test]
fn names_with_slashes_colons_spaces_and_accents_stay_apart_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let exp = small_experiment(dir.path(), 5, "paper");
    let live = dir.path().join("live");
    ok(&["trials", exp.to_str().unwrap(), "--out", live.to_str().unwrap()]);
    let trials: Vec<Trial> = read_records(&Archive::open(&live).unwrap()).unwrap();
    let trivia: Vec<Trial> = trials.iter().filter(|t| t.dataset == "trivia").cloned().collect();
    let names: &[(&str, &str, bool)] = &[
        ("org/model", "base", false),
        ("org/model", "warm", true),
        ("org:model", "base", false),
        ("org:model", "warm", true),
        ("org model", "base", false),
        ("org model", "warm", true),
        ("org/modèl", "base", false),
        ("org/modèl", "warm", true),
        ("a", "b/c", false),
        ("a/b", "c", false),
    ];
    for (i, (model, ckpt, ft)) in names.iter().enumerate() {
        let f = answers_csv(dir.path(), &format!("n{i}"), &trivia[..(i + 3).min(trivia.len())], i as u64, "\n");
        let mut args = vec![
            "import",
            f.to_str().unwrap(),
            "--out",
            live.to_str().unwrap(),
            "--model",
            model,
            "--checkpoint",
            ckpt,
        ];
        if *ft {
            args.push("--finetuned");
        }
        ok(&args);
    }
    let archive = Archive::open(&live).unwrap();
    let obs: Vec<Observation> = read_records(&archive).unwrap();
    for (i, (model, ckpt, _)) in names.iter().enumerate() {
        let n = obs.iter().filter(|o| o.model == *model && o.checkpoint == *ckpt).count();
        assert_eq!(n, (i + 3).min(trivia.len()), "{model} @ {ckpt}");
    }
    // Replay keeps every checkpoint's own labels (a/b + c never takes a + b/c's).
    let replayed = dir.path().join("replayed");
    ok(&["replay", live.to_str().unwrap(), "--out", replayed.to_str().unwrap()]);
    assert_eq!(archive_rows(&replayed)["observation"], archive_rows(&live)["observation"]);
    let rescored = dir.path().join("rescored");
    ok(&["rescore", live.to_str().unwrap(), "--out", rescored.to_str().unwrap(), "--judge", "reference"]);
    let agreement = ok(&["agreement", live.to_str().unwrap(), rescored.to_str().unwrap(), "--json"]);
    assert!(!agreement.is_empty());
    // SQL, analyze and the report see every model apart.
    let sql = ok(&[
        "sql",
        live.to_str().unwrap(),
        "-c",
        "select model, checkpoint, count(*) as n from observations group by model, checkpoint",
        "--output",
        "json",
    ]);
    let rows = json_lines(&sql);
    assert_eq!(rows.len(), names.len(), "{sql}");
    let families = family_rows(&[&live]);
    for m in ["org/model", "org:model", "org model", "org/modèl"] {
        assert!(families.iter().any(|r| r["model"] == m), "{m} has its own families: {families:?}");
    }
    let report = dir.path().join("report");
    ok(&["report", live.to_str().unwrap(), "--out", report.to_str().unwrap()]);
    let html = std::fs::read_to_string(report.join("report.html")).unwrap();
    for m in ["org/model", "org:model", "org model", "org/modèl"] {
        assert!(html.contains(m), "the report names {m}");
    }
    // Outside Candor: Delta readers and Hive-partitioned readers keep the names apart.
    let Some(python) = std::env::var_os("CANDOR_PYTHON") else {
        assert!(std::env::var_os("CI").is_none(), "CI must provide CANDOR_PYTHON");
        return;
    };
    let script = r#"
import json, sys, collections
import polars as pl, pyarrow.dataset as ds
from deltalake import DeltaTable
root = sys.argv[1] + "/observation"
out = {}
t = DeltaTable(root).to_pyarrow_table()
out["delta"] = sorted(collections.Counter(zip(t.column("model").to_pylist(), t.column("checkpoint").to_pylist())).items())
df = pl.read_delta(root)
out["polars_delta"] = sorted(collections.Counter(zip(df["model"].to_list(), df["checkpoint"].to_list())).items())
h = ds.dataset(root, format="parquet", partitioning="hive").to_table(columns=["model", "checkpoint"])
out["pyarrow_hive"] = sorted(collections.Counter(zip(h.column("model").to_pylist(), h.column("checkpoint").to_pylist())).items())
hp = pl.scan_parquet(root + "/**/*.parquet", hive_partitioning=True).collect()
out["polars_hive"] = sorted(collections.Counter(zip(hp["model"].to_list(), hp["checkpoint"].to_list())).items())
print(json.dumps(out))
"#;
    let o = Command::new(&python).arg("-c").arg(script).arg(&live).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let seen: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut want: Vec<(String, String, usize)> = names
        .iter()
        .enumerate()
        .map(|(i, (m, c, _))| (m.to_string(), c.to_string(), (i + 3).min(trivia.len())))
        .collect();
    want.sort();
    for reader in ["delta", "polars_delta", "pyarrow_hive", "polars_hive"] {
        let got: Vec<(String, String, usize)> = seen[reader]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (e[0][0].as_str().unwrap().into(), e[0][1].as_str().unwrap().into(), e[1].as_u64().unwrap() as usize)
            })
            .collect();
        assert_eq!(got, want, "{reader}");
    }
}
