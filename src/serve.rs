//! `candor serve`: an OpenAI-compatible chat-completions server over any Candor backend (the
//! candle model on local weights, typically), so a GPU box can serve a checkpoint to evaluation
//! runs elsewhere, and Candor's own HTTP backend is tested against a real server.
//!
//! Concurrent requests are gathered into batches for the model (decoded together), answered on
//! a thread of their own. `--faults` makes the server misbehave on purpose (429 with
//! Retry-After, 500, slow answers, truncated and non-JSON bodies, and well-formed answers whose
//! text is babble, as a confused judge model would give), seeded, so clients' retry
//! and error handling can be exercised against a real endpoint.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::generate::{Decoding, GenRequest, Generation, Generator};

/// Probabilities of each injected fault, per request.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Faults {
    pub rate_limit: f64,
    pub server_error: f64,
    pub slow: f64,
    pub truncated: f64,
    pub garbage: f64,
    /// A well-formed completion whose content is nonsense instead of the model's answer.
    pub babble: f64,
    /// How long a slow answer waits.
    pub slow_for: Duration,
    /// The Retry-After a 429 carries, in seconds.
    pub retry_after_secs: u32,
}

impl Faults {
    /// Parses `429=0.2,500=0.1,slow=0.05,truncate=0.05,garbage=0.05,babble=0.05[,slow_ms=2000][,retry_after=1]`.
    pub fn parse(spec: &str) -> Result<Self> {
        let mut f = Faults { slow_for: Duration::from_millis(1500), retry_after_secs: 1, ..Default::default() };
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) =
                part.split_once('=').ok_or_else(|| Error::config("--faults", format!("`{part}` is not key=value")))?;
            let num: f64 = v.parse().map_err(|_| Error::config("--faults", format!("`{v}` is not a number")))?;
            match k {
                "429" => f.rate_limit = num,
                "500" => f.server_error = num,
                "slow" => f.slow = num,
                "truncate" => f.truncated = num,
                "garbage" => f.garbage = num,
                "babble" => f.babble = num,
                "slow_ms" => f.slow_for = Duration::from_millis(num as u64),
                "retry_after" => f.retry_after_secs = num as u32,
                _ => {
                    return Err(Error::config(
                        "--faults",
                        format!(
                            "unknown fault `{k}` (429, 500, slow, truncate, garbage, babble, slow_ms, retry_after)"
                        ),
                    ));
                }
            }
        }
        if f.rate_limit + f.server_error + f.slow + f.truncated + f.garbage + f.babble > 1.0 {
            return Err(Error::config("--faults", "the probabilities add up to more than 1"));
        }
        Ok(f)
    }
}

enum Fault {
    None,
    RateLimit,
    ServerError,
    Slow,
    Truncated,
    Garbage,
    Babble,
}

struct ServeState {
    model: String,
    queue: mpsc::Sender<(GenRequest, oneshot::Sender<Result<Generation>>)>,
    faults: Faults,
    rng: Mutex<rand_chacha::ChaCha8Rng>,
}

impl ServeState {
    fn draw(&self) -> Fault {
        let u: f64 = self.rng.lock().expect("rng").r#gen();
        let f = &self.faults;
        let mut edge = f.rate_limit;
        if u < edge {
            return Fault::RateLimit;
        }
        edge += f.server_error;
        if u < edge {
            return Fault::ServerError;
        }
        edge += f.slow;
        if u < edge {
            return Fault::Slow;
        }
        edge += f.truncated;
        if u < edge {
            return Fault::Truncated;
        }
        edge += f.garbage;
        if u < edge {
            return Fault::Garbage;
        }
        edge += f.babble;
        if u < edge { Fault::Babble } else { Fault::None }
    }
}

/// Serves `generator` on `addr` until `shutdown` resolves. Returns the bound address through
/// `bound` (useful with port 0).
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    generator: Box<dyn Generator>,
    model: String,
    addr: SocketAddr,
    batch_size: usize,
    faults: Faults,
    fault_seed: u64,
    bound: Option<oneshot::Sender<SocketAddr>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("candor-serve-model".into())
        .spawn(move || batch_loop(generator, rx, batch_size.max(1)))
        .map_err(|e| Error::Internal(format!("spawning the model thread: {e}")))?;
    let state = Arc::new(ServeState {
        model,
        queue: tx,
        faults,
        rng: Mutex::new(rand_chacha::ChaCha8Rng::seed_from_u64(fault_seed)),
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { "ok" }))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::backend(addr.to_string(), format!("binding: {e}")))?;
    let local = listener.local_addr().map_err(|e| Error::backend(addr.to_string(), e.to_string()))?;
    if let Some(b) = bound {
        let _ = b.send(local);
    }
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| Error::backend(local.to_string(), format!("serving: {e}")))
}

/// Gathers requests that arrive together into one batch for the model.
fn batch_loop(
    mut generator: Box<dyn Generator>,
    rx: mpsc::Receiver<(GenRequest, oneshot::Sender<Result<Generation>>)>,
    batch_size: usize,
) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        let deadline = std::time::Instant::now() + Duration::from_millis(5);
        while batch.len() < batch_size {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let requests: Vec<GenRequest> = batch.iter().map(|(r, _)| r.clone()).collect();
        match generator.generate(&requests) {
            Ok(answers) => {
                for ((_, reply), a) in batch.into_iter().zip(answers) {
                    let _ = reply.send(a);
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for (_, reply) in batch {
                    let _ = reply.send(Err(Error::backend("model", msg.clone())));
                }
            }
        }
    }
}

/// Resolves at SIGTERM or SIGINT (Ctrl-C): how Candor's servers learn to stop.
pub async fn terminated() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(|e| Error::Internal(format!("SIGTERM handler: {e}")))?;
    tokio::select! {
        _ = term.recv() => {}
        r = tokio::signal::ctrl_c() => r.map_err(|e| Error::Internal(format!("SIGINT handler: {e}")))?,
    }
    Ok(())
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": {"message": message.into(), "type": "invalid_request_error"}}))).into_response()
}

/// Reads a chat-completions request into a [`GenRequest`].
pub fn parse_request(body: &Value) -> std::result::Result<GenRequest, String> {
    let messages = body.get("messages").and_then(Value::as_array).ok_or("`messages` must be an array")?;
    let mut system = None;
    let mut user = None;
    for m in messages {
        let role = m.get("role").and_then(Value::as_str).ok_or("every message needs a `role`")?;
        let content = m.get("content").and_then(Value::as_str).ok_or("every message needs string `content`")?;
        match role {
            "system" if system.is_none() && user.is_none() => system = Some(content.to_string()),
            "user" if user.is_none() => user = Some(content.to_string()),
            _ => return Err("only one optional system message followed by one user message is supported".into()),
        }
    }
    let prompt = user.ok_or("no user message")?;
    let stop = match body.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_string).ok_or("`stop` must hold strings"))
            .collect::<std::result::Result<_, _>>()?,
        Some(_) => return Err("`stop` must be a string or an array of strings".into()),
    };
    let decoding = Decoding {
        temperature: body.get("temperature").and_then(Value::as_f64).unwrap_or(1.0),
        top_p: body.get("top_p").and_then(Value::as_f64),
        max_new_tokens: body
            .get("max_tokens")
            .or(body.get("max_completion_tokens"))
            .and_then(Value::as_u64)
            .unwrap_or(256) as u32,
        stop,
        seed: body.get("seed").and_then(Value::as_u64).unwrap_or(0),
    };
    Ok(GenRequest { system_prompt: system, prompt, decoding })
}

async fn chat(State(state): State<Arc<ServeState>>, Json(body): Json<Value>) -> Response {
    let fault = state.draw();
    match fault {
        Fault::RateLimit => {
            let mut h = HeaderMap::new();
            h.insert("retry-after", state.faults.retry_after_secs.to_string().parse().expect("digits"));
            return (StatusCode::TOO_MANY_REQUESTS, h, Json(json!({"error": {"message": "rate limited (injected)"}})))
                .into_response();
        }
        Fault::ServerError => return error(StatusCode::INTERNAL_SERVER_ERROR, "internal error (injected)"),
        Fault::Garbage => {
            return (StatusCode::OK, "<html><body>502 Bad Gateway (injected)</body></html>").into_response();
        }
        Fault::Slow => tokio::time::sleep(state.faults.slow_for).await,
        Fault::None | Fault::Truncated | Fault::Babble => {}
    }
    let request = match parse_request(&body) {
        Ok(r) => r,
        Err(m) => return error(StatusCode::BAD_REQUEST, m),
    };
    let (tx, rx) = oneshot::channel();
    if state.queue.send((request, tx)).is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the model thread has stopped");
    }
    let answer = match rx.await {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(_) => return error(StatusCode::SERVICE_UNAVAILABLE, "the model thread has stopped"),
    };
    let mut answer = answer;
    if let Fault::Babble = fault {
        answer.output = "Hmm, well, perhaps the purple elephant of the question sings?".into();
    }
    let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let reply = json!({
        "id": format!("chatcmpl-candor-{created}"),
        "object": "chat.completion",
        "created": created,
        "model": state.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.output}, "finish_reason": answer.finish_reason.as_str()}],
        "usage": {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
                  "total_tokens": answer.prompt_tokens + answer.completion_tokens},
    });
    if let Fault::Truncated = fault {
        let text = reply.to_string();
        return (StatusCode::OK, [("content-type", "application/json")], text[..text.len() / 2].to_string())
            .into_response();
    }
    Json(reply).into_response()
}

async fn models(State(state): State<Arc<ServeState>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{"id": state.model, "object": "model", "owned_by": "candor"}]}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_specs_parse_and_bad_ones_are_named() {
        let f = Faults::parse("429=0.2, 500=0.1,slow=0.05,truncate=0.05,garbage=0.05,slow_ms=10").unwrap();
        assert_eq!((f.rate_limit, f.server_error, f.slow_for), (0.2, 0.1, Duration::from_millis(10)));
        assert!(Faults::parse("404=0.1").unwrap_err().to_string().contains("404"));
        assert!(Faults::parse("429=0.7,500=0.7").unwrap_err().to_string().contains("more than 1"));
    }

    #[test]
    fn requests_parse_like_the_openai_api() {
        let r = parse_request(&json!({"model": "m", "messages": [{"role": "system", "content": "warm"}, {"role": "user", "content": "hi"}],
            "temperature": 0.0, "max_tokens": 7, "seed": 3, "stop": "\n"}))
        .unwrap();
        assert_eq!(
            (r.system_prompt.as_deref(), r.prompt.as_str(), r.decoding.max_new_tokens, r.decoding.seed),
            (Some("warm"), "hi", 7, 3)
        );
        assert_eq!(r.decoding.stop, ["\n"]);
        assert!(parse_request(&json!({"messages": []})).unwrap_err().contains("no user message"));
        assert!(
            parse_request(
                &json!({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
            )
            .is_err()
        );
    }
}
