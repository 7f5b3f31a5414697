//! `candor bench serve`: latency of short requests through `candor serve` while long ones run,
//! with static and with continuous batching.

use std::time::Instant;

use anyhow::Result;

use super::generate::GENERATE_PROMPTS;
use super::percentile;

/// Settings of `candor bench serve`.
#[derive(Clone, Debug)]
pub struct ServeBench {
    /// The GGUF file (default: SmolLM2-135M-Instruct Q4_1 in the model cache).
    pub gguf: Option<std::path::PathBuf>,
    /// Clients each sending long requests back to back.
    pub long_clients: usize,
    /// Clients each sending short requests back to back (their latency is measured).
    pub short_clients: usize,
    /// New tokens of a long and of a short request (always reached: end-of-turn ignored).
    pub long_tokens: u32,
    pub short_tokens: u32,
    /// Measured seconds per batching mode.
    pub seconds: f64,
    /// The server's batch size.
    pub batch_size: usize,
    pub threads: usize,
}

/// What one batching mode did in `candor bench serve`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ServeFigures {
    pub batching: &'static str,
    pub seconds: f64,
    pub short_requests: usize,
    pub long_requests: usize,
    pub short_per_sec: f64,
    pub short_p50_ms: f64,
    pub short_p99_ms: f64,
    pub short_max_ms: f64,
    /// Completion tokens of every answered request per second.
    pub tokens_per_sec: f64,
}

/// Latency of short requests while long ones run, through `candor serve` over HTTP on
/// 127.0.0.1, with static and with continuous batching: same model, prompts, clients and
/// threads. Every client sends its next request as soon as the last is answered.
pub fn run(opts: &ServeBench, json: bool) -> Result<()> {
    use candor::generate::candle::{self as cb, CandleGenerator, CandleOptions, DeviceChoice, Weights};
    use candor::serve::{Batching, ServeOptions};

    let threads = cb::init_threads(opts.threads); // at start-up: no other thread exists yet
    let path = opts.gguf.clone().unwrap_or_else(|| candor::model::models_dir().join(candor::model::DEFAULT_GGUF));
    let options = CandleOptions { device: DeviceChoice::Cpu, threads: Some(opts.threads), ..Default::default() };
    if !json {
        println!(
            "candor serve, {} ({threads} threads, batch {}): {} clients of {}-token requests beside {} of {}-token ones, {} s per mode, end-of-turn ignored",
            path.display(),
            opts.batch_size,
            opts.short_clients,
            opts.short_tokens,
            opts.long_clients,
            opts.long_tokens,
            opts.seconds
        );
        println!(
            "{:>10} {:>7} {:>9} {:>10} {:>10} {:>10} {:>6} {:>10}",
            "batching", "short", "short/s", "p50 ms", "p99 ms", "max ms", "long", "tokens/s"
        );
    }
    for batching in [Batching::Static, Batching::Continuous] {
        let generator = Box::new(CandleGenerator::open(&options, Weights::Gguf(path.clone()), None)?);
        let serve_opts = ServeOptions {
            batch_size: opts.batch_size,
            batching,
            per_client: 64,
            ..ServeOptions::new("bench", "127.0.0.1:0".parse().expect("an address"))
        };
        let figures = candor::runtime::block_on(serve_run(generator, serve_opts, opts))?;
        if json {
            println!("{}", serde_json::to_string(&figures)?);
        } else {
            println!(
                "{:>10} {:>7} {:>9.2} {:>10.0} {:>10.0} {:>10.0} {:>6} {:>10.1}",
                figures.batching,
                figures.short_requests,
                figures.short_per_sec,
                figures.short_p50_ms,
                figures.short_p99_ms,
                figures.short_max_ms,
                figures.long_requests,
                figures.tokens_per_sec
            );
        }
    }
    Ok(())
}

async fn serve_run(
    generator: Box<dyn candor::generate::Generator>,
    options: candor::serve::ServeOptions,
    opts: &ServeBench,
) -> Result<ServeFigures> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    let batching = match options.batching {
        candor::serve::Batching::Static => "static",
        candor::serve::Batching::Continuous => "continuous",
    };
    let stop = Arc::new(tokio::sync::Notify::new());
    let stopped = stop.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let server =
        tokio::spawn(candor::serve::serve(generator, options, Some(tx), async move { stopped.notified().await }));
    let addr = rx.await?;
    let url = format!("http://{addr}/v1/chat/completions");
    let http = reqwest::Client::new();
    let ask = |prompt: &str, tokens: u32| {
        serde_json::json!({"model": "bench", "messages": [{"role": "user", "content": prompt}],
            "max_tokens": tokens, "ignore_eos": true, "temperature": 0})
    };
    // Warm-up: thread pools and first-touch allocations are not part of any figure.
    http.post(&url).json(&ask(GENERATE_PROMPTS[0], 4)).send().await?.error_for_status()?;

    let running = Arc::new(AtomicBool::new(true));
    let tokens = Arc::new(AtomicU64::new(0));
    let short_latencies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let long_requests = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut clients = Vec::new();
    for c in 0..opts.long_clients + opts.short_clients {
        let long = c < opts.long_clients;
        let (http, url, running, tokens) = (http.clone(), url.clone(), running.clone(), tokens.clone());
        let (short_latencies, long_requests) = (short_latencies.clone(), long_requests.clone());
        let budget = if long { opts.long_tokens } else { opts.short_tokens };
        let bodies: Vec<serde_json::Value> =
            GENERATE_PROMPTS.iter().skip(c).step_by(2).map(|p| ask(p, budget)).collect();
        clients.push(tokio::spawn(async move {
            for body in bodies.iter().cycle() {
                let t = Instant::now();
                let answer: serde_json::Value =
                    http.post(&url).json(body).send().await?.error_for_status()?.json().await?;
                // Only requests that ended within the measured window count.
                if !running.load(Ordering::Relaxed) {
                    break;
                }
                tokens.fetch_add(answer["usage"]["completion_tokens"].as_u64().unwrap_or(0), Ordering::Relaxed);
                if long {
                    long_requests.fetch_add(1, Ordering::Relaxed);
                } else {
                    short_latencies.lock().expect("latencies").push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep(std::time::Duration::from_secs_f64(opts.seconds)).await;
    running.store(false, Ordering::Relaxed);
    let seconds = start.elapsed().as_secs_f64();
    let generated = tokens.load(Ordering::Relaxed);
    // Requests still running are dropped; the server drops them from its batch.
    for c in &clients {
        c.abort();
    }
    for c in clients {
        if let Ok(Err(e)) = c.await {
            return Err(e.context("a benchmark client failed"));
        }
    }
    let mut short = std::mem::take(&mut *short_latencies.lock().expect("latencies"));
    let long_requests = long_requests.load(Ordering::Relaxed) as usize;
    stop.notify_one();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), server).await;
    short.sort_by(f64::total_cmp);
    Ok(ServeFigures {
        batching,
        seconds,
        short_requests: short.len(),
        long_requests,
        short_per_sec: short.len() as f64 / seconds,
        short_p50_ms: percentile(&short, 0.5),
        short_p99_ms: percentile(&short, 0.99),
        short_max_ms: short.last().copied().unwrap_or(f64::NAN),
        tokens_per_sec: generated as f64 / seconds,
    })
}
