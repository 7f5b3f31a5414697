//! `candor serve`: an OpenAI-compatible chat-completions server over any Candor backend (the
//! candle model on local weights, typically), so a GPU box can serve a checkpoint to evaluation
//! runs elsewhere, and Candor's own HTTP backend is tested against a real server.
//!
//! - Continuous batching: requests go to the model as they arrive; with the candle backend a
//!   request joins the running batch between decode steps, so a long answer does not hold a
//!   short one ([`Generator::serve`]; [`Batching::Static`] keeps the old whole-batch behaviour
//!   for comparison in `candor bench serve`).
//! - An API key (`Authorization: Bearer <key>`, compared in constant time), required on any
//!   address but loopback ([`ServeOptions::check`]).
//! - Every parameter is checked: a bad one is answered 400 with an OpenAI-style error body
//!   naming it, an unknown model 404, a prompt or `max_tokens` beyond the model's context 400.
//! - Limits: concurrent requests per client address (429), requests waiting or running in all
//!   (503), request body size (413), `max_tokens` (which bounds the response size).
//! - One log line per request on standard error; SIGTERM or Ctrl-C stops it cleanly
//!   ([`terminated`]).
//!
//! `--faults` makes the server misbehave on purpose (429 with Retry-After, 500, slow answers,
//! truncated and non-JSON bodies, and well-formed answers whose text is babble, as a confused
//! judge model would give), seeded, so clients' retry and error handling can be exercised
//! against a real endpoint.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::generate::{Decoding, GenRequest, Generation, Generator, Job, TokenBudget};

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

/// How requests reach the model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Batching {
    /// A request joins the running batch between decode steps (the backend's
    /// [`Generator::serve`]).
    #[default]
    Continuous,
    /// Requests that arrive together are decoded as one batch; later ones wait for all of
    /// it to end ([`crate::generate::serve_static`]). For comparison in benchmarks.
    Static,
}

/// How `candor serve` serves.
#[derive(Clone)]
pub struct ServeOptions {
    /// The model id requests name (`model/checkpoint`), listed by `/v1/models`.
    pub model: String,
    /// Other names requests may use for it (the experiment's model name).
    pub aliases: Vec<String>,
    pub listen: SocketAddr,
    /// Most requests decoded together.
    pub batch_size: usize,
    pub batching: Batching,
    /// The key clients must send as `Authorization: Bearer <key>`; None: no key (loopback only).
    pub api_key: Option<String>,
    /// Most new tokens one request may ask for (bounds the response size).
    pub max_tokens: u32,
    /// Requests one client address may have waiting or running at once (429 beyond).
    pub per_client: usize,
    /// Requests waiting or running in all (503 beyond).
    pub max_pending: usize,
    /// Largest request body, bytes (413 beyond).
    pub max_request_bytes: usize,
    pub faults: Faults,
    pub fault_seed: u64,
}

impl std::fmt::Debug for ServeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeOptions")
            .field("model", &self.model)
            .field("listen", &self.listen)
            .field("batching", &self.batching)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

impl ServeOptions {
    /// Defaults for `model` on `listen`: continuous batching of 8, no key, 4,096 tokens at
    /// most per answer, 16 requests per client and 256 in all, bodies up to 1 MiB.
    pub fn new(model: impl Into<String>, listen: SocketAddr) -> Self {
        ServeOptions {
            model: model.into(),
            aliases: Vec::new(),
            listen,
            batch_size: 8,
            batching: Batching::Continuous,
            api_key: None,
            max_tokens: 4096,
            per_client: 16,
            max_pending: 256,
            max_request_bytes: 1 << 20,
            faults: Faults::default(),
            fault_seed: 0,
        }
    }

    /// Refuses to serve beyond loopback without an API key.
    pub fn check(&self) -> Result<()> {
        check_listener(self.listen, self.api_key.as_deref(), "api-key-env")
    }
}

struct ServeState {
    model: String,
    aliases: Vec<String>,
    queue: Mutex<mpsc::Sender<Job>>,
    budget: Option<Arc<dyn TokenBudget>>,
    api_key: Option<Vec<u8>>,
    max_tokens: u32,
    per_client: usize,
    clients: Mutex<HashMap<IpAddr, usize>>,
    pending: Arc<tokio::sync::Semaphore>,
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

/// Serves `generator` until `shutdown` resolves. Returns the bound address through `bound`
/// (useful with port 0).
pub async fn serve(
    generator: Box<dyn Generator>,
    options: ServeOptions,
    bound: Option<oneshot::Sender<SocketAddr>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    options.check()?;
    let (tx, rx) = mpsc::channel::<Job>();
    let budget = generator.budget();
    let (batching, batch_size) = (options.batching, options.batch_size.max(1));
    let mut generator = generator;
    std::thread::Builder::new()
        .name("candor-serve-model".into())
        .spawn(move || match batching {
            Batching::Continuous => generator.serve(&rx, batch_size),
            Batching::Static => crate::generate::serve_static(generator.as_mut(), &rx, batch_size),
        })
        .map_err(|e| Error::system("spawning the model thread", e))?;
    let state = Arc::new(ServeState {
        model: options.model,
        aliases: options.aliases,
        queue: Mutex::new(tx),
        budget,
        api_key: options.api_key.map(String::into_bytes),
        max_tokens: options.max_tokens.max(1),
        per_client: options.per_client.max(1),
        clients: Mutex::new(HashMap::new()),
        pending: Arc::new(tokio::sync::Semaphore::new(options.max_pending.max(1))),
        faults: options.faults,
        rng: Mutex::new(rand_chacha::ChaCha8Rng::seed_from_u64(options.fault_seed)),
    });
    let api = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), authorize));
    let app = Router::new()
        .merge(api)
        .route("/health", get(|| async { "ok" }))
        .layer(DefaultBodyLimit::max(options.max_request_bytes))
        .layer(axum::middleware::from_fn(log_request))
        .with_state(state);
    let addr = options.listen;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::backend(addr.to_string(), format!("binding: {e}")))?;
    let local = listener.local_addr().map_err(|e| Error::backend(addr.to_string(), e.to_string()))?;
    if let Some(b) = bound {
        let _ = b.send(local);
    }
    if !local.ip().is_loopback() {
        eprintln!(
            "warning: {local} serves plain HTTP: the API key and every prompt cross the network in the clear; \
             put a TLS-terminating proxy in front beyond a trusted network"
        );
    }
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| Error::backend(local.to_string(), format!("serving: {e}")))
}

/// Resolves at SIGTERM or SIGINT (Ctrl-C): how Candor's servers learn to stop.
pub async fn terminated() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(|e| Error::system("SIGTERM handler", e))?;
    tokio::select! {
        _ = term.recv() => {}
        r = tokio::signal::ctrl_c() => r.map_err(|e| Error::system("SIGINT handler", e))?,
    }
    Ok(())
}

/// An OpenAI-style error answer.
#[derive(Debug, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The request parameter at fault, if one is.
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    fn bad(param: &'static str, message: impl Into<String>) -> Self {
        ApiError { status: StatusCode::BAD_REQUEST, message: message.into(), param: Some(param), code: None }
    }
    fn status(status: StatusCode, message: impl Into<String>, code: &'static str) -> Self {
        ApiError { status, message: message.into(), param: None, code: Some(code) }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        };
        let body = json!({"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}});
        let mut response = (self.status, Json(body)).into_response();
        if matches!(self.status, StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE) {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    ApiError { status, message: message.into(), param: None, code: None }.into_response()
}

/// Compares `given` with `key` in time that depends only on their lengths (a SHA-256 of
/// each, compared without early exit).
fn key_matches(given: &[u8], key: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;
    Sha256::digest(given).ct_eq(&Sha256::digest(key)).into()
}

/// The one rule of Candor's HTTP listeners (`candor serve`, `candor watch --hook`): reachable
/// from other machines only with a key, and never an empty one. `flag` names the option that
/// gives the key (`api-key-env`, `hook-key-env`).
pub(crate) fn check_listener(listen: SocketAddr, key: Option<&str>, flag: &str) -> Result<()> {
    if key.is_none() && !listen.ip().is_loopback() {
        return Err(Error::config(
            "listen",
            format!("{listen} is reachable from other machines: give an API key (--{flag} NAME, the key in $NAME)"),
        ));
    }
    if key == Some("") {
        return Err(Error::config(flag, "the API key is empty"));
    }
    Ok(())
}

/// Why a request's `Authorization: Bearer <key>` does not match `key` (compared in constant
/// time), or None when it does.
pub(crate) fn bearer_refusal(headers: &HeaderMap, key: &[u8]) -> Option<&'static str> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        None => Some("no API key: send `Authorization: Bearer <key>`"),
        Some(g) if !key_matches(g.as_bytes(), key) => Some("the API key is not valid"),
        Some(_) => None,
    }
}

async fn authorize(State(state): State<Arc<ServeState>>, request: Request, next: Next) -> Response {
    if let Some(message) = state.api_key.as_ref().and_then(|key| bearer_refusal(request.headers(), key)) {
        return ApiError::status(StatusCode::UNAUTHORIZED, message, "invalid_api_key").into_response();
    }
    next.run(request).await
}

/// One line per request: client, method, path, status, duration.
async fn log_request(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let client =
        request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.to_string()).unwrap_or_else(|| "-".into());
    let (method, path) = (request.method().clone(), request.uri().path().to_string());
    let response = next.run(request).await;
    eprintln!(
        "serve {client} {method} {path} {} {:.1} ms",
        response.status().as_u16(),
        started.elapsed().as_secs_f64() * 1e3
    );
    response
}

/// A chat-completions request, checked: what to run, and whether it named `max_tokens`.
#[derive(Debug, PartialEq)]
pub struct ChatRequest {
    pub model: String,
    pub request: GenRequest,
    pub max_tokens_given: bool,
}

/// Reads a chat-completions body; every bad parameter is a 400 naming it. `max_tokens` not
/// given is [`DEFAULT_MAX_TOKENS`], to be fitted to the context by the caller.
pub fn parse_request(body: &Value) -> std::result::Result<ChatRequest, ApiError> {
    let body = body.as_object().ok_or_else(|| ApiError::bad("body", "the body must be a JSON object"))?;
    let model = match body.get("model") {
        Some(Value::String(m)) => m.clone(),
        Some(_) => return Err(ApiError::bad("model", "`model` must be a string")),
        None => return Err(ApiError::bad("model", "`model` is required")),
    };
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::bad("messages", "`messages` must be an array"))?;
    let mut system = None;
    let mut user = None;
    for m in messages {
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad("messages", "every message needs a string `role`"))?;
        let content = m
            .get("content")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad("messages", "every message needs string `content`"))?;
        match role {
            "system" if system.is_none() && user.is_none() => system = Some(content.to_string()),
            "user" if user.is_none() => user = Some(content.to_string()),
            _ => {
                return Err(ApiError::bad(
                    "messages",
                    "only one optional system message followed by one user message is supported",
                ));
            }
        }
    }
    let prompt = user.ok_or_else(|| ApiError::bad("messages", "no user message"))?;
    let present = |k: &str| body.get(k).filter(|v| !v.is_null());
    let number = |k: &'static str, lo: f64, hi: f64, lo_open: bool| -> std::result::Result<Option<f64>, ApiError> {
        match present(k) {
            None => Ok(None),
            Some(v) => {
                let x = v.as_f64().ok_or_else(|| ApiError::bad(k, format!("`{k}` must be a number")))?;
                let low_ok = if lo_open { x > lo } else { x >= lo };
                if !(low_ok && x <= hi) {
                    let open = if lo_open { "(" } else { "[" };
                    return Err(ApiError::bad(k, format!("`{k}` is {x}: it must be in {open}{lo}, {hi}]")));
                }
                Ok(Some(x))
            }
        }
    };
    let temperature = number("temperature", 0.0, 2.0, false)?.unwrap_or(1.0);
    let top_p = number("top_p", 0.0, 1.0, true)?;
    let (max_tokens_key, max_tokens) = match (present("max_tokens"), present("max_completion_tokens")) {
        (Some(v), _) => ("max_tokens", Some(v)),
        (None, Some(v)) => ("max_completion_tokens", Some(v)),
        (None, None) => ("max_tokens", None),
    };
    let max_new_tokens = match max_tokens {
        None => DEFAULT_MAX_TOKENS,
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 && n <= u32::MAX as u64 => n as u32,
            _ => {
                return Err(ApiError::bad(
                    max_tokens_key,
                    format!("`{max_tokens_key}` is {v}: it must be a whole number from 1"),
                ));
            }
        },
    };
    let stop = match present("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= 4 => a
            .iter()
            .map(|v| v.as_str().filter(|s| !s.is_empty()).map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::bad("stop", "`stop` must hold non-empty strings"))?,
        Some(_) => return Err(ApiError::bad("stop", "`stop` must be a string or an array of up to 4 strings")),
    };
    let seed = match present("seed") {
        None => 0,
        Some(v) => v
            .as_u64()
            .or_else(|| v.as_i64().map(|i| i as u64))
            .ok_or_else(|| ApiError::bad("seed", format!("`seed` is {v}: it must be an integer")))?,
    };
    match present("n") {
        None => {}
        Some(v) if v.as_u64() == Some(1) => {}
        Some(v) => return Err(ApiError::bad("n", format!("`n` is {v}: only 1 is supported"))),
    }
    match present("stream") {
        None | Some(Value::Bool(false)) => {}
        Some(Value::Bool(true)) => return Err(ApiError::bad("stream", "streaming is not supported")),
        Some(v) => return Err(ApiError::bad("stream", format!("`stream` is {v}: it must be a boolean"))),
    }
    let ignore_eos = match present("ignore_eos") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => return Err(ApiError::bad("ignore_eos", format!("`ignore_eos` is {v}: it must be a boolean"))),
    };
    let decoding = Decoding { temperature, top_p, max_new_tokens, stop, seed, ignore_eos };
    Ok(ChatRequest {
        model,
        request: GenRequest { system_prompt: system, prompt, decoding },
        max_tokens_given: max_tokens.is_some(),
    })
}

/// New tokens of a request that does not say (`max_tokens` absent), fitted to the context.
pub const DEFAULT_MAX_TOKENS: u32 = 256;

/// Checks a parsed request against the served model, the server's cap and the model's
/// context; fits a default `max_tokens` into what the context leaves.
fn admit(state: &ServeState, chat: &mut ChatRequest) -> std::result::Result<(), ApiError> {
    if chat.model != state.model && !state.aliases.contains(&chat.model) {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("the model `{}` does not exist here; this server serves `{}`", chat.model, state.model),
            param: Some("model"),
            code: Some("model_not_found"),
        });
    }
    let key = "max_tokens";
    let d = &mut chat.request.decoding;
    if chat.max_tokens_given && d.max_new_tokens > state.max_tokens {
        return Err(ApiError::bad(
            key,
            format!("`max_tokens` is {}: this server allows at most {}", d.max_new_tokens, state.max_tokens),
        ));
    }
    d.max_new_tokens = d.max_new_tokens.min(state.max_tokens);
    if let Some(budget) = &state.budget {
        let prompt = budget.prompt_tokens(&chat.request).map_err(|e| ApiError::bad("messages", e.to_string()))?;
        let context = budget.context();
        let d = &mut chat.request.decoding;
        if prompt >= context {
            return Err(ApiError {
                code: Some("context_length_exceeded"),
                ..ApiError::bad(
                    "messages",
                    format!("the prompt takes {prompt} tokens: the model's context is {context}"),
                )
            });
        }
        let room = (context - prompt) as u32;
        if chat.max_tokens_given && d.max_new_tokens > room {
            return Err(ApiError {
                code: Some("context_length_exceeded"),
                ..ApiError::bad(
                    key,
                    format!(
                        "the prompt ({prompt} tokens) and `max_tokens` ({}) exceed the model's context of {context} tokens",
                        d.max_new_tokens
                    ),
                )
            });
        }
        d.max_new_tokens = d.max_new_tokens.min(room);
    }
    Ok(())
}

/// A client's place among the requests running for it; freed when dropped.
struct ClientSlot<'a> {
    state: &'a ServeState,
    ip: IpAddr,
}

impl Drop for ClientSlot<'_> {
    fn drop(&mut self) {
        let mut clients = self.state.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = clients.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                clients.remove(&self.ip);
            }
        }
    }
}

fn client_slot(state: &ServeState, ip: IpAddr) -> Option<ClientSlot<'_>> {
    let mut clients = state.clients.lock().unwrap_or_else(|p| p.into_inner());
    let n = clients.entry(ip).or_insert(0);
    if *n >= state.per_client {
        return None;
    }
    *n += 1;
    Some(ClientSlot { state, ip })
}

async fn chat(
    State(state): State<Arc<ServeState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => {
            return ApiError { status: e.status(), message: e.body_text(), param: None, code: None }.into_response();
        }
    };
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
    let value: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return ApiError::bad("body", format!("the body is not JSON: {e}")).into_response(),
    };
    let mut chat = match parse_request(&value) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = admit(&state, &mut chat) {
        return e.into_response();
    }
    let Some(_slot) = client_slot(&state, peer.ip()) else {
        return ApiError::status(
            StatusCode::TOO_MANY_REQUESTS,
            format!("at most {} requests at once per client", state.per_client),
            "rate_limit_exceeded",
        )
        .into_response();
    };
    let Ok(_pending) = state.pending.clone().try_acquire_owned() else {
        return ApiError::status(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is busy: try again shortly",
            "server_busy",
        )
        .into_response();
    };
    let (tx, rx) = oneshot::channel();
    // A client that goes away drops `rx`: the model then drops the request from its batch.
    let job = Job { request: chat.request, reply: tx };
    if state.queue.lock().unwrap_or_else(|p| p.into_inner()).send(job).is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the model thread has stopped");
    }
    let answer = match rx.await {
        Ok(Ok(a)) => a,
        Ok(Err(e @ (Error::Input { .. } | Error::Config { .. }))) => {
            return ApiError::bad("messages", e.to_string()).into_response();
        }
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(_) => return error(StatusCode::SERVICE_UNAVAILABLE, "the model thread has stopped"),
    };
    reply(&state, fault, answer)
}

fn reply(state: &ServeState, fault: Fault, mut answer: Generation) -> Response {
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
        let c = parse_request(&json!({"model": "m", "messages": [{"role": "system", "content": "warm"}, {"role": "user", "content": "hi"}],
            "temperature": 0.0, "max_tokens": 7, "seed": 3, "stop": "\n"}))
        .unwrap();
        let r = &c.request;
        assert_eq!(
            (
                c.model.as_str(),
                r.system_prompt.as_deref(),
                r.prompt.as_str(),
                r.decoding.max_new_tokens,
                r.decoding.seed
            ),
            ("m", Some("warm"), "hi", 7, 3)
        );
        assert_eq!(r.decoding.stop, ["\n"]);
        assert!(c.max_tokens_given);
        let d = parse_request(&json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})).unwrap();
        assert_eq!((d.request.decoding.max_new_tokens, d.max_tokens_given), (DEFAULT_MAX_TOKENS, false));
        assert!(parse_request(&json!({"model": "m", "messages": []})).unwrap_err().message.contains("no user message"));
    }

    #[test]
    fn every_bad_parameter_is_a_400_naming_it() {
        let user = json!([{"role": "user", "content": "hi"}]);
        let cases = [
            (json!({"messages": user}), "model"),
            (json!({"model": 3, "messages": user}), "model"),
            (json!({"model": "m"}), "messages"),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
                "messages",
            ),
            (json!({"model": "m", "messages": [{"role": "user"}]}), "messages"),
            (json!({"model": "m", "messages": user, "max_tokens": -5}), "max_tokens"),
            (json!({"model": "m", "messages": user, "max_tokens": "12"}), "max_tokens"),
            (json!({"model": "m", "messages": user, "max_tokens": 4294967299u64}), "max_tokens"),
            (json!({"model": "m", "messages": user, "max_tokens": 0}), "max_tokens"),
            (json!({"model": "m", "messages": user, "max_tokens": 2.5}), "max_tokens"),
            (json!({"model": "m", "messages": user, "max_completion_tokens": -1}), "max_completion_tokens"),
            (json!({"model": "m", "messages": user, "temperature": -0.1}), "temperature"),
            (json!({"model": "m", "messages": user, "temperature": 2.5}), "temperature"),
            (json!({"model": "m", "messages": user, "temperature": "hot"}), "temperature"),
            (json!({"model": "m", "messages": user, "top_p": 0}), "top_p"),
            (json!({"model": "m", "messages": user, "top_p": 1.5}), "top_p"),
            (json!({"model": "m", "messages": user, "stop": 5}), "stop"),
            (json!({"model": "m", "messages": user, "stop": ["a", "b", "c", "d", "e"]}), "stop"),
            (json!({"model": "m", "messages": user, "seed": "x"}), "seed"),
            (json!({"model": "m", "messages": user, "n": 2}), "n"),
            (json!({"model": "m", "messages": user, "stream": true}), "stream"),
            (json!({"model": "m", "messages": user, "ignore_eos": "yes"}), "ignore_eos"),
            (json!(["not", "an", "object"]), "body"),
        ];
        for (body, param) in cases {
            let e = parse_request(&body).unwrap_err();
            assert_eq!((e.status, e.param), (StatusCode::BAD_REQUEST, Some(param)), "{body}: {}", e.message);
        }
    }

    #[test]
    fn a_client_has_at_most_its_share_of_requests_in_flight() {
        let (tx, _rx) = mpsc::channel();
        let state = ServeState {
            model: "m".into(),
            aliases: Vec::new(),
            queue: Mutex::new(tx),
            budget: None,
            api_key: None,
            max_tokens: 16,
            per_client: 2,
            clients: Mutex::new(HashMap::new()),
            pending: Arc::new(tokio::sync::Semaphore::new(4)),
            faults: Faults::default(),
            rng: Mutex::new(rand_chacha::ChaCha8Rng::seed_from_u64(0)),
        };
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let first = client_slot(&state, a).unwrap();
        let _second = client_slot(&state, a).unwrap();
        assert!(client_slot(&state, a).is_none(), "a third request from the same client waits its turn");
        assert!(client_slot(&state, b).is_some(), "another client is not held up");
        drop(first);
        assert!(client_slot(&state, a).is_some(), "a finished request frees its place");
    }

    #[test]
    fn an_api_key_is_required_off_loopback_and_compared_whole() {
        let local = ServeOptions::new("m/c", "127.0.0.1:8080".parse().unwrap());
        assert!(local.check().is_ok());
        let open = ServeOptions::new("m/c", "0.0.0.0:8080".parse().unwrap());
        assert!(open.check().unwrap_err().to_string().contains("--api-key-env"));
        let keyed = ServeOptions { api_key: Some("k3y".into()), ..open };
        assert!(keyed.check().is_ok());
        assert!(!format!("{keyed:?}").contains("k3y"));
        assert!(key_matches(b"k3y", b"k3y"));
        assert!(!key_matches(b"k3", b"k3y") && !key_matches(b"k3yy", b"k3y") && !key_matches(b"", b"k3y"));
    }
}
