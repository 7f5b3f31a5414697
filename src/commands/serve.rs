//! `candor serve`: a model of an experiment over an OpenAI-compatible API, with continuous
//! batching, until SIGTERM or Ctrl-C.

use std::path::PathBuf;

use anyhow::{Context, Result};

use super::{Globals, load_experiment, parse_bytes_arg};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The experiment file naming the model and its backend.
    experiment: PathBuf,
    /// Model name in the experiment (default: the first).
    #[arg(long)]
    model: Option<String>,
    /// Checkpoint id of that model (default: its first).
    #[arg(long)]
    checkpoint: Option<String>,
    /// Address to listen on. Any address but loopback needs --api-key-env.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
    /// Clients must send `Authorization: Bearer <key>`, the key read from this environment
    /// variable (never from the command line, where other users could read it).
    #[arg(long, value_name = "NAME")]
    api_key_env: Option<String>,
    /// Most requests decoded together.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// `continuous`: requests join the running batch between decode steps; `static`:
    /// requests arriving together are decoded as one batch, later ones wait for all of it.
    #[arg(long, value_enum, default_value_t = candor::serve::Batching::Continuous)]
    batching: candor::serve::Batching,
    /// Most new tokens one request may ask for (bounds the response size); requests
    /// without `max_tokens` get 256, fitted to the context.
    #[arg(long, default_value_t = 4096)]
    max_tokens: u32,
    /// Requests one client address may have waiting or running at once (429 beyond).
    #[arg(long, default_value_t = 16)]
    per_client: usize,
    /// Requests waiting or running in all (503 beyond).
    #[arg(long, default_value_t = 256)]
    max_pending: usize,
    /// Largest request body (413 beyond), e.g. 1MiB.
    #[arg(long, default_value = "1MiB", value_parser = parse_bytes_arg)]
    max_request_bytes: usize,
    /// Inject faults for testing clients, e.g. `429=0.2,500=0.1,slow=0.05,truncate=0.05,garbage=0.05`.
    #[arg(long)]
    faults: Option<String>,
    /// Seed of the fault draws.
    #[arg(long, default_value_t = 0)]
    fault_seed: u64,
}

/// Serves until SIGTERM or Ctrl-C; the address it listens on is printed as soon as it does.
pub fn run(args: Args, g: &Globals) -> Result<()> {
    let Args {
        experiment,
        model,
        checkpoint,
        listen,
        api_key_env,
        batch_size,
        batching,
        max_tokens,
        per_client,
        max_pending,
        max_request_bytes,
        faults,
        fault_seed,
    } = args;
    let exp = load_experiment(&experiment, g.paper)?;
    let m = match &model {
        Some(name) => exp.models.iter().find(|m| &m.name == name),
        None => exp.models.first(),
    }
    .with_context(|| format!("{}: no model {}", experiment.display(), model.as_deref().unwrap_or("at all")))?;
    let c = match &checkpoint {
        Some(id) => m.checkpoints.iter().find(|c| &c.id == id),
        None => m.checkpoints.first(),
    }
    .with_context(|| format!("model `{}` has no checkpoint {}", m.name, checkpoint.as_deref().unwrap_or("at all")))?;
    let api_key = match &api_key_env {
        Some(var) => Some(
            std::env::var(var)
                .ok()
                .filter(|k| !k.is_empty())
                .with_context(|| format!("--api-key-env {var}: ${var} is not set"))?,
        ),
        None => None,
    };
    let options = candor::serve::ServeOptions {
        batch_size,
        batching,
        api_key,
        max_tokens,
        per_client,
        max_pending,
        max_request_bytes,
        faults: match faults {
            Some(spec) => candor::serve::Faults::parse(&spec)?,
            None => candor::serve::Faults::default(),
        },
        fault_seed,
        aliases: vec![m.name.clone()],
        ..candor::serve::ServeOptions::new(format!("{}/{}", m.name, c.id), listen)
    };
    options.check()?;
    let generator = candor::generate::backend::open(m, c)?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let json = g.json;
    candor::runtime::block_on(async move {
        let stopping = std::sync::Arc::new(tokio::sync::Notify::new());
        let stop = stopping.clone();
        let server = tokio::spawn(candor::serve::serve(generator, options, Some(tx), async move {
            let _ = candor::serve::terminated().await;
            eprintln!("candor serve: stopping (requests in flight get up to 30 s)");
            stop.notify_one();
        }));
        if let Ok(addr) = rx.await {
            eprintln!("serving on http://{addr}/v1/chat/completions (SIGTERM or Ctrl-C stops)");
            if json {
                println!("{}", serde_json::json!({"listening": addr.to_string()}));
            }
        }
        tokio::select! {
            r = server => r.map_err(|e| anyhow::anyhow!("server task: {e}"))?.map_err(anyhow::Error::from),
            _ = async {
                stopping.notified().await;
                tokio::time::sleep(std::time::Duration::from_secs(30)).await;
            } => Ok(()),
        }
    })
}
