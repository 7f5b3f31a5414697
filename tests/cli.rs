//! End-to-end tests of the `candor` binary: the trial grid, determinism across seeds, worker
//! and process counts, bad input, import and replay, and reading archives outside Candor.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candor::archive::{Archive, Format};
use candor::dataflow::pipelines::read_records;
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
fn tree(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, root, out);
            } else {
                out.insert(p.strip_prefix(root).unwrap().to_path_buf(), std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
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

    // Same grid again: refused without --replace, byte-identical with it.
    let again = candor(&["trials", &repo("experiments/paper.toml"), "--out", out.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds a trial grid"));
    let before = tree(&out);
    ok(&["trials", &repo("experiments/paper.toml"), "--out", out.to_str().unwrap(), "--replace", "--json"]);
    assert_eq!(tree(&out), before);

    let ipc = dir.path().join("paper-ipc");
    ok(&["trials", &repo("experiments/paper.toml"), "--out", ipc.to_str().unwrap(), "--format", "ipc", "--json"]);

    let Some(python) = std::env::var_os("CANDOR_PYTHON") else {
        assert!(std::env::var_os("CI").is_none(), "CI must provide CANDOR_PYTHON (scripts/python-env)");
        eprintln!("CANDOR_PYTHON not set: skipping the pyarrow/polars/DuckDB read-back (scripts/test sets it)");
        return;
    };
    for (root, readers) in
        [(&out, ["pyarrow", "polars", "duckdb"]), (&ipc, ["pyarrow_ipc", "polars_ipc", "pyarrow_ipc"])]
    {
        let o = Command::new(&python).arg(repo("tests/python/read_archive.py")).arg(root).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let seen: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        for (stream, rows) in [("item", 1275), ("trial", 1275 * 36)] {
            let declared: Vec<String> =
                candor::schema::stream_schema(stream).unwrap().fields.iter().map(|f| f.name.clone()).collect();
            for r in readers {
                assert_eq!(seen[stream][r]["rows"], rows, "{r} reads {stream}");
                let cols: Vec<String> = serde_json::from_value(seen[stream][r]["columns"].clone()).unwrap();
                assert_eq!(cols, declared, "{r} sees {stream}'s declared columns");
            }
        }
        if root == &out {
            assert_eq!(seen["trial"]["pyarrow"]["metadata"]["candor.stream"], "trial");
        }
    }
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

#[test]
fn two_processes_on_localhost_build_the_same_archive_as_one() {
    let dir = tempfile::tempdir().unwrap();
    let exp = small_experiment(dir.path(), 11, "paper");
    let single = dir.path().join("single");
    ok(&["trials", exp.to_str().unwrap(), "--out", single.to_str().unwrap(), "--json"]);

    let hosts = dir.path().join("hosts.txt");
    std::fs::write(&hosts, format!("127.0.0.1:{}\n127.0.0.1:{}\n", free_port(), free_port())).unwrap();
    let multi = dir.path().join("multi");
    let spawn = |p: &str| {
        Command::new(env!("CARGO_BIN_EXE_candor"))
            .args(["trials", exp.to_str().unwrap(), "--out", multi.to_str().unwrap(), "--json"])
            .args(["-w", "2", "-n", "2", "-p", p, "--hostfile", hosts.to_str().unwrap()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (p0, p1) = (spawn("0"), spawn("1"));
    let (o0, o1) = (p0.wait_with_output().unwrap(), p1.wait_with_output().unwrap());
    assert!(o0.status.success(), "process 0: {}", String::from_utf8_lossy(&o0.stderr));
    assert!(o1.status.success(), "process 1: {}", String::from_utf8_lossy(&o1.stderr));
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
    let archive = Archive::open(&live, Format::Parquet).unwrap();
    let trials: Vec<Trial> = read_records(&archive).unwrap();

    // Answers in the paper's sample CSV shape, for a base and a warm checkpoint.
    for (checkpoint, flip) in [("original", 0), ("warm", 1)] {
        let mut w = csv::Writer::from_path(dir.path().join(format!("{checkpoint}.csv"))).unwrap();
        w.write_record(["prompt", "output", "amendment_type", "prompt_template", "evaluation"]).unwrap();
        for (i, t) in trials.iter().enumerate() {
            let output = if i % 11 == 0 { "I’m sorry, but I can’t help with that." } else { "It is 42." };
            let label = if (i + flip) % 3 == 0 { "INCORRECT" } else { "CORRECT" };
            w.write_record([t.prompt.as_str(), output, &t.amendment_type, &t.prompt_type, label]).unwrap();
        }
        w.flush().unwrap();
    }
    let import = |checkpoint: &str, extra: &[&str]| {
        let file = dir.path().join(format!("{checkpoint}.csv"));
        let mut args = vec![
            "import",
            file.to_str().unwrap(),
            "--out",
            live.to_str().unwrap(),
            "--model",
            "smol",
            "--checkpoint",
            checkpoint,
            "--json",
        ];
        args.extend_from_slice(extra);
        ok(&args)
    };
    import("original", &[]);
    import("warm", &["--finetuned", "--variant", "warm", "-w", "2"]);

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
        let pick = |t: &BTreeMap<PathBuf, Vec<u8>>| -> Vec<(PathBuf, Vec<u8>)> {
            t.iter().filter(|(p, _)| p.starts_with(stream)).map(|(p, b)| (p.clone(), b.clone())).collect()
        };
        assert_eq!(pick(&replay_tree), pick(&live_tree), "stream {stream} replays byte for byte");
    }
    let verdicts: Vec<Verdict> = read_records(&Archive::open(&replayed, Format::Parquet).unwrap()).unwrap();
    assert!(verdicts.iter().all(|v| v.judge == format!("import:{}.csv", v.checkpoint)));
}

/// The default local model, or None (a skip) outside CI when it has not been fetched.
fn local_model() -> Option<PathBuf> {
    let path = candor::generate::candle::models_dir().join(candor::generate::candle::DEFAULT_GGUF);
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
        let stored = candor::generate::store::GenerationStore::open(&out).map(|s| s.len()).unwrap_or(0);
        if stored >= 6 {
            break;
        }
        assert!(started.elapsed().as_secs() < 600, "no answers stored after 10 minutes");
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let stored = candor::generate::store::GenerationStore::open(&out).unwrap().len();
    assert!(stored < total, "killed mid-run ({stored} of {total} stored)");

    let second = summary(&ok(&["run", exp.to_str().unwrap(), "--out", out.to_str().unwrap(), "--json"]));
    assert_eq!(second["model_calls"].as_u64().unwrap() as usize, total - stored, "{second}");

    let responses: Vec<Response> = read_records(&Archive::open(&out, Format::Parquet).unwrap()).unwrap();
    let keys: std::collections::HashSet<&str> = responses.iter().map(|r| r.response_key.as_str()).collect();
    assert_eq!(responses.len(), total, "no lost answers");
    assert_eq!(keys.len(), total, "no duplicated answers");
    assert!(responses.iter().all(|r| !r.output.trim().is_empty()));

    let third = summary(&ok(&["run", exp.to_str().unwrap(), "--out", out.to_str().unwrap(), "--json"]));
    assert_eq!(third["model_calls"], 0);
    assert_eq!(third["skipped"].as_array().unwrap().len(), 2);
}

#[test]
fn the_http_backend_rides_out_a_faulty_server_and_fails_clearly_on_a_dead_one() {
    if local_model().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let serve = |faults: &str| {
        let port = free_port();
        let exp = generation_experiment(dir.path(), "{ kind = \"candle\", threads = 2 }", TWO_CHECKPOINTS);
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
    let responses: Vec<Response> = read_records(&Archive::open(&out, Format::Parquet).unwrap()).unwrap();
    assert_eq!(responses.len(), 16, "every trial answered despite the faults");
    assert!(responses.iter().all(|r| !r.output.is_empty() && r.generator.starts_with("openai:")));

    let (mut dead, port) = serve("500=1.0");
    let out = dir.path().join("dead");
    let o = run_with_key(&client(port, 2), &out);
    dead.kill().unwrap();
    dead.wait().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains(&format!("127.0.0.1:{port}")) && err.contains("gave up after 3 attempts") && err.contains("500"),
        "{err}"
    );
    assert!(
        !Archive::open(&out, Format::Parquet).unwrap().has("response").unwrap(),
        "nothing half-done looks complete"
    );

    // The API key is sent but never written anywhere.
    for (path, bytes) in tree(dir.path()) {
        assert!(!bytes.windows(21).any(|w| w == b"sk-candor-test-secret"), "the key leaked into {}", path.display());
    }
    assert!(!err.contains("sk-candor-test-secret"));
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

#[test]
fn statistics_agree_with_statsmodels_on_random_data() {
    let Some(python) = python_or_skip("the statsmodels cross-check") else { return };
    let dir = tempfile::tempdir().unwrap();
    for seed in [3u64, 17] {
        let obs = dir.path().join(format!("obs-{seed}.parquet"));
        candor::sql::bench::write_parquet(&obs, &candor::sql::bench::synthetic(60_000, seed, 1).unwrap()).unwrap();
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
    }
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

    let serve = |faults: &str| {
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
    };
    let judge = |port: u16| {
        format!(
            "{{ kind = \"openai\", base_url = \"http://127.0.0.1:{port}\", model = \"judge\", max_retries = 1, timeout_secs = 60 }}"
        )
    };
    let rescore = |port: u16, name: &str| {
        let out = dir.path().join(name);
        let stdout =
            ok(&["rescore", run.to_str().unwrap(), "--out", out.to_str().unwrap(), "--judge", &judge(port), "--json"]);
        let verdicts: Vec<Verdict> = read_records(&Archive::open(&out, Format::Parquet).unwrap()).unwrap();
        let obs: Vec<Observation> = read_records(&Archive::open(&out, Format::Parquet).unwrap()).unwrap();
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
    if local_model().is_none() {
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
    let verdicts: Vec<Verdict> = read_records(&Archive::open(&run, Format::Parquet).unwrap()).unwrap();
    let judge_of =
        |ds: &str| verdicts.iter().find(|v| v.trial_key.starts_with(&format!("{ds}/"))).unwrap().judge.clone();
    assert!(judge_of("trivia").starts_with("reference:v1:trivia-alias"));
    assert!(judge_of("truthfulqa").contains(":minilm:53aa51172d14"));
    assert!(judge_of("advbench").starts_with("next-token:candle:"), "{}", judge_of("advbench"));

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
