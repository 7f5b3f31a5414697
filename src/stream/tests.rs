use super::messages::*;
use super::*;
use crate::archive::{Partition, read_records};
use crate::records::Response;
use crate::schema::Record;

const MAX: usize = 4096;

fn answer(extra: &str) -> String {
    super::messages::corpus_answer(extra)
}

fn malformed_answers() -> Vec<(&'static str, Vec<u8>)> {
    malformed_corpus(MAX)
}

pub fn malformed_announcements() -> Vec<(&'static str, Vec<u8>)> {
    let ok = r#"{"schema_version":1,"model":"m","checkpoint":"c","finetuned":true,"answers":3"#;
    vec![
        ("unknown_variant", format!(r#"{ok},"variant":"lukewarm"}}"#).into_bytes()),
        ("bad_answer_count", ok.replace(r#""answers":3"#, r#""answers":0}"#).into_bytes()),
        ("missing_field", r#"{"schema_version":1,"model":"m","checkpoint":"c","answers":3}"#.as_bytes().to_vec()),
        ("wrong_type", r#"{"schema_version":1,"model":"m","checkpoint":"c","finetuned":"yes"}"#.as_bytes().to_vec()),
        ("wrong_type", format!(r#"{ok},"training_epoch":"two"}}"#).into_bytes()),
    ]
}

#[test]
fn a_good_answer_parses_with_defaults() {
    let a = parse_answer(Some(answer(r#","verdict":"correct""#).as_bytes()), MAX).unwrap();
    assert_eq!(a.amendment_type, "unmodified");
    assert_eq!(a.prompt_type, "original");
    assert_eq!(a.sample_index, 0);
    assert_eq!(a.response_key(), "m/c/trivia/q1/unmodified/original/0");
    assert_eq!(a.trial().amendment_group, "unmodified");
}

#[test]
fn every_malformed_answer_is_rejected_with_its_kind() {
    let corpus = malformed_answers();
    assert!(corpus.len() >= 15);
    for (kind, bytes) in corpus {
        let payload = if bytes.is_empty() { None } else { Some(bytes.as_slice()) };
        let err = parse_answer(payload, MAX).expect_err(kind);
        assert_eq!(err.kind, kind, "{err}");
        assert!(REJECT_KINDS.contains(&err.kind));
        assert!(!err.reason.is_empty());
    }
}

#[test]
fn every_malformed_announcement_is_rejected_with_its_kind() {
    for (kind, bytes) in malformed_announcements() {
        let err = parse_announcement(Some(&bytes), MAX).expect_err(kind);
        assert_eq!(err.kind, kind, "{err}");
    }
    let a = parse_announcement(
        Some(br#"{"schema_version":1,"model":"m","checkpoint":"c","finetuned":false,"variant":"warm","training_epoch":2,"answers":3}"#),
        MAX,
    )
    .unwrap();
    assert_eq!((a.answers, a.variant.as_deref(), a.training_epoch), (Some(3), Some("warm"), Some(2.0)));
}

#[test]
fn the_state_survives_a_save_and_load() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = StreamState::default();
    s.offsets.insert("t/0".into(), 42);
    let a = parse_answer(Some(answer("").as_bytes()), MAX).unwrap();
    s.pending.entry("m/c".into()).or_default().insert(a.response_key(), a);
    s.published.insert(3);
    s.save(dir.path()).unwrap();
    let back = StreamState::load(dir.path()).unwrap();
    assert_eq!(back.offsets, s.offsets);
    assert_eq!(back.pending, s.pending);
    assert_eq!(back.published, s.published);
    assert!(StreamState::load(tempfile::tempdir().unwrap().path()).unwrap().offsets.is_empty());
    // A checkpoint's answers are written once and kept as text until they change: an answer
    // added after a save is in the next one.
    let mut b = parse_answer(Some(answer("").as_bytes()), MAX).unwrap();
    b.sample_index = 1;
    s.pending.get_mut("m/c").unwrap().insert(b.response_key(), b);
    s.save(dir.path()).unwrap();
    let back = StreamState::load(dir.path()).unwrap();
    assert_eq!(back.pending.get("m/c").map(|p| p.len()), Some(2));
    assert_eq!(back.pending, s.pending);
}

#[test]
fn the_dead_letter_format_documents_every_kind() {
    let doc = include_str!("../../schemas/kafka/dead-letter.json");
    for kind in REJECT_KINDS {
        assert!(doc.contains(kind), "schemas/kafka/dead-letter.json does not list `{kind}`");
    }
}

#[test]
fn the_fast_answer_path_agrees_with_the_checked_one() {
    let mut messages: Vec<Vec<u8>> = [
        "",
        r#","verdict":"correct""#,
        r#","verdict":" INCORRECT ","sample_index":3,"amendment_type":"emotion:sad","prompt_type":"incorrect_belief""#,
        r#","sample_index":null,"amendment_type":null,"verdict":null"#,
        r#","prompt_type":"  ""#,
        r#","sample_index":1.0"#,
        r#","sample_index":4294967296"#,
        r#","verdict":"CORRECT","verdict":"MAYBE""#,
    ]
    .iter()
    .map(|extra| answer(extra).into_bytes())
    .collect();
    messages.push(answer("").replace(r#""output":"A.""#, r#""output":"""#).into_bytes());
    messages.push(answer("").replace(r#""output":"A.""#, r#""output":null"#).into_bytes());
    messages.push(answer("").replace(r#""model":"m""#, r#""model":" m\u00e9 ""#).into_bytes());
    messages.push(answer("").replace(r#""schema_version":1"#, r#""schema_version":1.0"#).into_bytes());
    messages.extend(malformed_answers().into_iter().map(|(_, b)| b));
    let mut fast = 0;
    for m in &messages {
        let payload = if m.is_empty() { None } else { Some(m.as_slice()) };
        if fast_answer(m).is_some() {
            fast += 1;
        }
        assert_eq!(parse_answer(payload, MAX), parse_answer_checked(payload, MAX), "{}", String::from_utf8_lossy(m));
    }
    assert!(fast >= 4, "well-formed records take the fast path ({fast})");
}

/// A capture of `(topic, payload)` messages, one partition per topic, offsets in order.
fn capture_of(messages: &[(&str, String)]) -> Vec<capture::Captured> {
    messages
        .iter()
        .enumerate()
        .map(|(i, (topic, payload))| capture::Captured {
            topic: topic.to_string(),
            partition: 0,
            offset: i as i64,
            timestamp: Some(i as i64),
            key: None,
            payload: Some(payload.clone()),
            payload_base64: None,
        })
        .collect()
}

fn replay_options() -> StreamOptions {
    StreamOptions::for_replay("t.", MAX, RefusalRules::new(crate::score::refusal::RefusalMode::Default), None)
}

#[test]
fn an_answer_beyond_a_complete_checkpoints_count_is_late_and_the_rest_is_archived_once() {
    let dir = tempfile::tempdir().unwrap();
    let archive = Archive::open_writer(dir.path(), "test").unwrap();
    let ann = r#"{"schema_version":1,"model":"m","checkpoint":"c","finetuned":false,"answers":2}"#.to_string();
    let a = |item: &str| answer(r#","verdict":"CORRECT""#).replace("\"q1\"", &format!("\"{item}\""));
    let messages = capture_of(&[
        ("t.answers", a("q1")),
        ("t.checkpoints", ann),
        ("t.answers", a("q1")), // a repeat: skipped, not late
        ("t.answers", a("q2")), // completes the checkpoint
        ("t.answers", a("q3")), // beyond the count
        ("t.answers", "{".into()),
    ]);
    let report = replay_capture(&Cluster::default(), &archive, &replay_options(), messages).unwrap();
    assert_eq!(report.evaluated, ["m/c"]);
    assert_eq!(report.skipped, 1);
    assert_eq!(report.dead_letters.get("late_answer"), Some(&1), "{:?}", report.dead_letters);
    assert_eq!(report.dead_letters.get("malformed_json"), Some(&1));
    let responses: Vec<Response> = read_records(&archive).unwrap();
    let mut items: Vec<&str> = responses.iter().map(|r| r.trial_key.as_str()).collect();
    items.sort();
    assert_eq!(items, ["trivia/q1/unmodified/original", "trivia/q2/unmodified/original"]);
    // Replaying the same capture again adds nothing: everything is archived already.
    let again = replay_capture(
        &Cluster::default(),
        &archive,
        &replay_options(),
        capture_of(&[("t.answers", a("q3")), ("t.checkpoints", "{}".into())]),
    )
    .unwrap();
    assert!(again.evaluated.is_empty());
    assert_eq!(read_records::<Response>(&archive).unwrap().len(), 2);
}

#[test]
fn a_replayed_stream_evaluates_checkpoints_out_of_epoch_order_in_one_computation() {
    let dir = tempfile::tempdir().unwrap();
    let archive = Archive::open_writer(dir.path(), "test").unwrap();
    let ann = |c: &str, ft: bool| {
        format!(r#"{{"schema_version":1,"model":"m","checkpoint":"{c}","finetuned":{ft},"answers":2}}"#)
    };
    let a = |c: &str, item: &str, verdict: &str| {
        answer(&format!(r#","verdict":"{verdict}""#))
            .replace("\"q1\"", &format!("\"{item}\""))
            .replace("\"checkpoint\":\"c\"", &format!("\"checkpoint\":\"{c}\""))
    };
    // Announced c0, c1, c2 (epochs in that order); their answers complete them in reverse, each
    // in an evaluation of its own.
    let messages = capture_of(&[
        ("t.checkpoints", ann("c0", false)),
        ("t.checkpoints", ann("c1", true)),
        ("t.checkpoints", ann("c2", true)),
        ("t.answers", a("c2", "q1", "INCORRECT")),
        ("t.answers", a("c2", "q2", "CORRECT")),
        ("t.answers", a("c1", "q1", "CORRECT")),
        ("t.answers", a("c1", "q2", "CORRECT")),
        ("t.answers", a("c0", "q1", "CORRECT")),
        ("t.answers", a("c0", "q2", "CORRECT")),
    ]);
    let before = crate::dataflow::computations_started();
    let report =
        replay_capture(&Cluster { workers: 2, ..Cluster::default() }, &archive, &replay_options(), messages).unwrap();
    assert_eq!(report.evaluated, ["m/c2", "m/c1", "m/c0"]);
    assert_eq!(crate::dataflow::computations_started() - before, 1, "one computation for the whole stream");
    // Each checkpoint is archived under the epoch it was given when announced.
    let epochs: std::collections::BTreeMap<String, u64> =
        archive.checkpoints().unwrap().into_iter().map(|e| (e.checkpoint.clone(), e.epoch)).collect();
    let observations: Vec<crate::records::Observation> = read_records(&archive).unwrap();
    assert_eq!(observations.len(), 6);
    for o in &observations {
        assert_eq!(o.checkpoint_epoch, epochs[&o.checkpoint], "{o:?}");
    }
    let committed = archive.committed_epochs().unwrap();
    assert!(epochs.values().all(|e| committed.contains(e)), "{committed:?} {epochs:?}");
    // Checkpoints registered after the dataflow started are archived in their own partitions.
    for c in ["c0", "c1", "c2"] {
        let dir = crate::identity::partition_segment("checkpoint", c);
        let in_partition =
            archive.segments("observation").unwrap().iter().filter(|s| s.path.to_string_lossy().contains(&dir)).count();
        assert!(in_partition > 0, "no observation segment under {dir}");
    }
}

/// A checkpoint fed to the workers and not committed yet (the stream reads on meanwhile):
/// the state saved meanwhile still holds its answers (a crash before the commit evaluates it
/// again rather than losing it), an answer beyond its count is late, a repeat is a repeat;
/// once its commit is recorded its answers leave the state.
#[test]
fn a_checkpoint_in_flight_keeps_its_answers_in_the_saved_state_until_its_commit() {
    let dir = tempfile::tempdir().unwrap();
    let archive = Archive::open_writer(dir.path(), "test").unwrap();
    let mut ledger = state::Ledger::open(&archive).unwrap();
    let ann = parse_announcement(
        Some(br#"{"schema_version":1,"model":"m","checkpoint":"c","finetuned":false,"answers":2}"#),
        MAX,
    )
    .unwrap();
    let a = |item: &str| {
        parse_answer(Some(answer(r#","verdict":"CORRECT""#).replace("\"q1\"", &format!("\"{item}\"")).as_bytes()), MAX)
            .unwrap()
    };
    assert_eq!(ledger.announce(ann, |_| false).unwrap().as_deref(), Some("m/c"));
    ledger.answer(a("q1")).unwrap().unwrap();
    ledger.answer(a("q2")).unwrap().unwrap();
    let taken = ledger.take_ready();
    assert_eq!(taken, ["m/c"]);
    let epoch = {
        let ready = ledger.ready(&taken[0]);
        assert_eq!(ready.answers.len(), 2);
        assert!(!ready.committed);
        ready.announced.epoch
    };
    ledger.save().unwrap();
    let saved = StreamState::load(dir.path()).unwrap();
    assert_eq!(saved.pending.get("m/c").map(|p| p.len()), Some(2), "in-flight answers are saved");
    assert!(saved.announced.contains_key("m/c"));
    assert_eq!(ledger.answer(a("q3")).unwrap().unwrap_err().kind, "late_answer");
    assert_eq!(ledger.answer(a("q1")).unwrap().unwrap(), None, "a repeat of an answer in flight");
    assert!(ledger.take_ready().is_empty(), "taken once");
    // The commit: its responses are in the archive.
    let responses: Vec<Response> =
        ["q1", "q2"].iter().map(|q| a(q).response(a(q).response_key(), epoch, false, "kafka:t.answers")).collect();
    let rows = Response::to_batch(&responses).unwrap();
    archive
        .write_epoch(epoch, &[("response".into(), Partition::checkpoint("m", "c"), rows)], &serde_json::Value::Null)
        .unwrap();
    let recorded = state::Recorded { finished: vec![("m/c".into(), epoch, false)], committed: vec![epoch] };
    ledger.record(&recorded);
    ledger.save().unwrap();
    let saved = StreamState::load(dir.path()).unwrap();
    assert!(saved.pending.is_empty() && saved.announced.is_empty(), "{saved:?}");
    assert_eq!(ledger.answer(a("q4")).unwrap().unwrap_err().kind, "late_answer");
    assert_eq!(ledger.answer(a("q2")).unwrap().unwrap(), None, "archived");
    // Opened again (a restart): an archived answer read again is skipped, a new one is late.
    let mut again = state::Ledger::open(&archive).unwrap();
    assert_eq!(again.answer(a("q1")).unwrap().unwrap(), None, "archived before the restart");
    assert_eq!(again.answer(a("q5")).unwrap().unwrap_err().kind, "late_answer");
    // The committed checkpoint's file unreadable: the stream stops on that error, naming the
    // file, instead of taking an archived answer for a late one.
    let file = archive.segments("response").unwrap().remove(0).path;
    std::fs::write(&file, b"not parquet").unwrap();
    let mut broken = state::Ledger::open(&archive).unwrap();
    let err = broken.answer(a("q1")).unwrap_err();
    assert!(err.to_string().contains(&*file.file_name().unwrap().to_string_lossy()), "{err}");
}
