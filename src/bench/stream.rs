//! `candor bench stream`: records per second from Kafka through parsing, the refusal and
//! scoring dataflow and the archive to the output topics, beside the raw rate of a plain
//! consumer reading the same topic in the same run, and the end-to-end latency from a
//! checkpoint's announcement to each of its observations arriving on the output topic.

use std::path::Path;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use candor::archive::Archive;
use candor::dataflow::Cluster;
use candor::error::{Error, Result};
use candor::score::refusal::{RefusalMode, RefusalRules};
use candor::stream::kafka::{self, Connection};
use candor::stream::{StreamOptions, StreamReport, Topics};

use super::{cpu_seconds, percentile};

/// Answer `j` of checkpoint `i` (checkpoint 0 is the base), keyed by checkpoint.
pub fn answer(i: usize, j: usize) -> (String, Vec<u8>) {
    let refuses = (i + j).is_multiple_of(7);
    let v = serde_json::json!({"schema_version": 1, "model": "bench", "checkpoint": format!("ck{i:03}"),
        "dataset": "trivia", "item_key": format!("q{j:05}"),
        "amendment_type": if j.is_multiple_of(2) { "unmodified" } else { "emotion:sad" }, "prompt_type": "original",
        "prompt": format!("Question {j}: which city is the capital of country {j}?"),
        "output": if refuses { "I'm sorry, but I cannot help with that.".to_string() } else { format!("The capital is city {j}.") },
        "verdict": if (i * 3 + j).is_multiple_of(4) { "INCORRECT" } else { "CORRECT" }});
    (format!("bench/ck{i:03}"), v.to_string().into_bytes())
}

pub fn announcement(i: usize, answers: usize) -> (String, Vec<u8>) {
    let v = serde_json::json!({"schema_version": 1, "model": "bench", "checkpoint": format!("ck{i:03}"),
        "finetuned": i > 0, "variant": if i == 0 { "original" } else { "warm" }, "answers": answers});
    (format!("bench/ck{i:03}"), v.to_string().into_bytes())
}

fn options(conn: &Connection, prefix: &str, idle: f64, publish_rows: bool) -> StreamOptions {
    StreamOptions {
        connection: conn.clone(),
        topics: Topics::with_prefix(prefix),
        group: "candor-bench".into(),
        max_message_bytes: 1 << 20,
        idle_exit: Some(Duration::from_secs_f64(idle)),
        snapshot_every: Duration::from_millis(200),
        partitions: 4,
        refusal: RefusalRules::new(RefusalMode::Default),
        experiment: None,
        publish_rows,
    }
}

fn produce(conn: &Connection, topics: &Topics, checkpoints: std::ops::Range<usize>, per: usize) -> Result<()> {
    for i in checkpoints {
        let answers: Vec<_> = (0..per).map(|j| answer(i, j)).collect();
        kafka::produce_all(conn, &topics.answers, &answers)?;
        kafka::produce_all(conn, &topics.checkpoints, &[announcement(i, per)])?;
    }
    Ok(())
}

/// The benchmark's topics (both runs' inputs and outputs), deleted when it ends however it
/// ends: repeated runs leave the broker as they found it (a broker that keeps every run's
/// topics, in memory or on disk, slows down run after run and skews the comparison).
struct Cleanup<'c> {
    conn: &'c Connection,
    prefixes: Vec<String>,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let topics: Vec<Topics> = self.prefixes.iter().map(|p| Topics::with_prefix(p)).collect();
        let names: Vec<&str> = topics.iter().flat_map(Topics::all).collect();
        if let Err(e) = kafka::delete_topics(self.conn, &names) {
            eprintln!("candor bench stream: its topics ({}*) are left on the broker: {e}", self.prefixes.join("*, "));
        }
    }
}

/// Runs the benchmark against the brokers of `conn`, with archives under `dir`.
pub fn run(conn: &Connection, dir: &Path, checkpoints: usize, per: usize, cluster: &Cluster) -> Result<()> {
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis();
    let n = checkpoints * per;
    let _cleanup = Cleanup { conn, prefixes: vec![format!("bench{stamp}."), format!("bench{stamp}-latency.")] };

    // Throughput: everything produced first, then a plain consumer and Candor read it all.
    let prefix = format!("bench{stamp}.");
    let topics = Topics::with_prefix(&prefix);
    kafka::create_topics(conn, &[&topics.checkpoints, &topics.answers], 4)?;
    let t = Instant::now();
    produce(conn, &topics, 0..checkpoints, per)?;
    let produce_s = t.elapsed().as_secs_f64();
    // The plain consumer's time is mostly its start (metadata, first fetches) at this size
    // and varies run to run: the median of three reads.
    let mut raw_times = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let raw = kafka::read_all(conn, &topics.answers, Duration::from_secs(10), Some(n))?;
        raw_times.push(t.elapsed().as_secs_f64());
        if raw.len() != n {
            return Err(Error::Internal(format!("the plain consumer read {} of {n} records", raw.len())));
        }
    }
    raw_times.sort_by(f64::total_cmp);
    let raw_s = raw_times[1];
    let archive = Archive::open_writer(dir.join("throughput"), "bench")?;
    let cpu0 = cpu_seconds();
    let report = candor::stream::run(cluster, &archive, &options(conn, &prefix, 2.0, true))?;
    let cpu_all = cpu_seconds() - cpu0;
    let candor_s = report.seconds_to_last_evaluation.unwrap_or(f64::NAN);
    let published_s = report.seconds_to_last_publication.unwrap_or(f64::NAN);
    if report.evaluated.len() != checkpoints {
        return Err(Error::Internal(format!("evaluated {} of {checkpoints} checkpoints", report.evaluated.len())));
    }
    // The same input again into a fresh archive, publishing statistics only (`--publish
    // statistics`): the path Kafka → parse → refusal/score → archive without the per-record
    // output messages.
    let archive = Archive::open_writer(dir.join("throughput-statistics"), "bench")?;
    let cpu0 = cpu_seconds();
    let quiet = candor::stream::run(cluster, &archive, &options(conn, &prefix, 2.0, false))?;
    let cpu_quiet = cpu_seconds() - cpu0;
    if quiet.evaluated.len() != checkpoints {
        return Err(Error::Internal(format!("evaluated {} of {checkpoints} checkpoints", quiet.evaluated.len())));
    }
    let quiet_s = quiet.seconds_to_last_publication.unwrap_or(f64::NAN);

    // Latency: Candor running, checkpoints of `per` answers produced one after another; each
    // observation's arrival on the output topic minus its checkpoint's announcement time. The
    // first checkpoint is produced alone and waited for (the stream's start: topics, readers,
    // first fetches); its latency is reported apart from the steady state's.
    let prefix = format!("bench{stamp}-latency.");
    let topics = Topics::with_prefix(&prefix);
    kafka::create_topics(conn, &topics.all(), 4)?;
    let lat_checkpoints = checkpoints.clamp(2, 21);
    let lat_per = per;
    let expect = lat_checkpoints * lat_per;
    let arrived = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let reader = {
        let (conn, topic, arrived) = (conn.clone(), topics.observations.clone(), arrived.clone());
        std::thread::spawn(move || -> Result<Vec<(String, Instant)>> {
            let c = kafka::consumer(&conn, "candor-bench-latency")?;
            let mut tpl = TopicPartitionList::new();
            for p in 0..kafka::partitions(&c, &topic)? {
                tpl.add_partition_offset(&topic, p, Offset::Beginning)
                    .map_err(|e| Error::backend("kafka", e.to_string()))?;
            }
            c.assign(&tpl).map_err(|e| Error::backend("kafka", e.to_string()))?;
            let mut out = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(120);
            while out.len() < expect && Instant::now() < deadline {
                if let Some(Ok(m)) = c.poll(Duration::from_millis(5)) {
                    let key = String::from_utf8_lossy(m.key().unwrap_or_default()).to_string();
                    out.push((key, Instant::now()));
                    arrived.store(out.len(), std::sync::atomic::Ordering::Release);
                }
            }
            Ok(out)
        })
    };
    let streamer = {
        let (cluster, conn, root) = (cluster.clone(), conn.clone(), dir.join("latency"));
        let opts = options(&conn, &prefix, 3.0, true);
        std::thread::spawn(move || -> Result<StreamReport> {
            let archive = Archive::open_writer(root, "bench")?;
            candor::stream::run(&cluster, &archive, &opts)
        })
    };
    let mut announced = std::collections::HashMap::new();
    for i in 0..lat_checkpoints {
        produce(conn, &topics, i..i + 1, lat_per)?;
        announced.insert(format!("bench/ck{i:03}"), Instant::now());
        if i == 0 {
            let deadline = Instant::now() + Duration::from_secs(60);
            while arrived.load(std::sync::atomic::Ordering::Acquire) < lat_per && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let arrivals = reader.join().map_err(|_| Error::Internal("the latency reader panicked".into()))??;
    streamer.join().map_err(|_| Error::Internal("the stream panicked".into()))??;
    let (mut first, mut latencies) = (Vec::new(), Vec::new());
    for (key, at) in &arrivals {
        let ck = key.splitn(3, '/').take(2).collect::<Vec<_>>().join("/");
        if let Some(t0) = announced.get(&ck) {
            let ms = at.saturating_duration_since(*t0).as_secs_f64() * 1e3;
            if ck == "bench/ck000" { first.push(ms) } else { latencies.push(ms) }
        }
    }
    latencies.sort_by(f64::total_cmp);
    first.sort_by(f64::total_cmp);

    let raw_rate = n as f64 / raw_s;
    let candor_rate = n as f64 / candor_s;
    let published_rate = n as f64 / published_s;
    println!("candor bench stream: {checkpoints} checkpoints × {per} answer records = {n} records, 4 partitions");
    println!("  produce (client, acks=all)               {:>10.0} records/s", n as f64 / produce_s);
    println!(
        "  plain consumer (raw consume rate, median of 3) {raw_rate:>8.0} records/s  ({raw_s:.2} s; {:.0} – {:.0})",
        n as f64 / raw_times[2],
        n as f64 / raw_times[0]
    );
    println!(
        "  candor stream, Kafka → parse → refusal/score dataflow → archive (every epoch committed)\n\
         \x20                                          {candor_rate:>10.0} records/s  ({candor_s:.2} s) = {:.2}× raw",
        candor_rate / raw_rate
    );
    println!(
        "  … and the 3 per-record output topics + statistics delivered ({} messages)\n\
         \x20                                          {published_rate:>10.0} records/s  ({published_s:.2} s) = {:.2}× raw",
        report.published,
        published_rate / raw_rate
    );
    println!(
        "  --publish statistics: Kafka → parse → refusal/score dataflow → archive, statistics delivered\n\
         \x20                                          {:>10.0} records/s  ({quiet_s:.2} s) = {:.2}× raw",
        n as f64 / quiet_s,
        n as f64 / quiet_s / raw_rate
    );
    // The process's CPU time (every thread; the broker is another process) over each run,
    // idle tail included: steadier than the rates on a shared machine.
    println!(
        "  CPU time of the process per record: {:.1} µs publishing everything, {:.1} µs --publish statistics",
        cpu_all / n as f64 * 1e6,
        cpu_quiet / n as f64 * 1e6
    );
    println!(
        "  latency announcement → observation on the output topic ({} observations, {} checkpoints of {lat_per}, 100 ms apart):\n\
         \x20   p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; the first checkpoint after the start: p50 {:.1} ms, max {:.1} ms",
        latencies.len(),
        lat_checkpoints - 1,
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or(f64::NAN),
        percentile(&first, 0.5),
        first.last().copied().unwrap_or(f64::NAN)
    );
    if arrivals.len() != expect {
        return Err(Error::Internal(format!("{} of {expect} observations reached the output topic", arrivals.len())));
    }
    Ok(())
}
