//! The watcher's hook: `POST /v1/checkpoints` on a small HTTP listener (`candor watch --hook
//! ADDR`), for training pipelines that would rather call Candor from a callback (`on_save`)
//! than have a folder watched (`examples/candor_callback.py`).
//!
//! The body names one checkpoint: `{"model": M, "step": N, "path": DIR, "base": B?,
//! "sha256": H?}`. It becomes the same announcement the folder watcher makes for
//! `DIR/../checkpoint-N` (model `M`, checkpoint `checkpoint-<N>`, fine-tuned, `DIR` as its
//! weights), which is the announcement a Kafka producer would send: one record type for all
//! three. `sha256`, when given, must be the folder's content hash (as the watcher computes it)
//! when Candor gets to it; `base` must be one of the model's bases. Answers: `202` with the
//! checkpoint's name when queued; `400` for a body that is not one checkpoint; `413` for a body
//! over 64 KiB; `422` for one
//! Candor cannot evaluate (another model, an unknown base, no such folder, an `endpoint`
//! instead of weights: not evaluated by the watcher yet); `401` without the key. A listener
//! reachable from other machines needs a key (`--hook-key-env NAME`), compared in constant
//! time.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, mpsc};

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::oneshot;

use crate::error::{Error, Result};

/// Where the hook listens, and the key it asks for.
#[derive(Clone)]
pub struct HookOptions {
    pub listen: SocketAddr,
    /// `Authorization: Bearer <key>`; required when `listen` is not a loopback address.
    pub api_key: Option<String>,
}

impl std::fmt::Debug for HookOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HookOptions")
            .field("listen", &self.listen)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// One checkpoint a training run announced through the hook.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HookRequest {
    pub model: String,
    pub step: u64,
    pub path: Option<PathBuf>,
    pub endpoint: Option<String>,
    pub base: Option<String>,
    pub sha256: Option<String>,
}

/// A running hook: the requests it accepted, in order.
pub struct Hook {
    pub requests: mpsc::Receiver<HookRequest>,
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for Hook {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

struct HookState {
    model: String,
    bases: Vec<String>,
    key: Option<Vec<u8>>,
    queue: Mutex<mpsc::Sender<HookRequest>>,
}

fn refuse(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

impl Hook {
    /// Starts listening for checkpoints of `model` (whose bases are `bases`).
    pub fn start(options: &HookOptions, model: &str, bases: Vec<String>) -> Result<Hook> {
        crate::serve::check_listener(options.listen, options.api_key.as_deref(), "hook-key-env")?;
        let (tx, requests) = mpsc::channel();
        let state = Arc::new(HookState {
            model: model.to_string(),
            bases,
            key: options.api_key.clone().map(String::into_bytes),
            queue: Mutex::new(tx),
        });
        let app = Router::new()
            .route("/v1/checkpoints", post(checkpoint))
            .route_layer(axum::middleware::from_fn_with_state(state.clone(), authorize))
            .layer(DefaultBodyLimit::max(64 * 1024))
            .with_state(state);
        let listen = options.listen;
        let listener = crate::runtime::block_on(tokio::net::TcpListener::bind(listen))
            .map_err(|e| Error::backend(listen.to_string(), format!("binding the hook: {e}")))?;
        let addr = listener.local_addr().map_err(|e| Error::backend(listen.to_string(), e.to_string()))?;
        let (stop, stopped) = oneshot::channel::<()>();
        crate::runtime::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
                eprintln!("the hook at {addr} stopped: {e}");
            }
        });
        Ok(Hook { requests, addr, stop: Some(stop) })
    }
}

async fn authorize(State(state): State<Arc<HookState>>, request: Request, next: Next) -> Response {
    if let Some(message) = state.key.as_ref().and_then(|key| crate::serve::bearer_refusal(request.headers(), key)) {
        return refuse(StatusCode::UNAUTHORIZED, message);
    }
    next.run(request).await
}

async fn checkpoint(
    State(state): State<Arc<HookState>>,
    body: std::result::Result<Json<HookRequest>, JsonRejection>,
) -> Response {
    let request = match body {
        Ok(Json(r)) => r,
        // A body past the limit keeps its own status (413); anything else is not one checkpoint.
        Err(JsonRejection::BytesRejection(e)) => return refuse(e.status(), e.body_text()),
        Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("not one checkpoint: {}", e.body_text())),
    };
    if request.model != state.model {
        return refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("this watcher evaluates model `{}`, not `{}`", state.model, request.model),
        );
    }
    if let Some(b) = &request.base
        && !state.bases.contains(b)
    {
        return refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("`{b}` is not a base of `{}` (bases: {})", state.model, state.bases.join(", ")),
        );
    }
    match (&request.path, &request.endpoint) {
        (Some(p), None) if p.is_dir() => {}
        (Some(p), None) => {
            return refuse(StatusCode::UNPROCESSABLE_ENTITY, format!("`{}` is not a directory here", p.display()));
        }
        (None, Some(_)) => {
            return refuse(
                StatusCode::UNPROCESSABLE_ENTITY,
                "a checkpoint served at an endpoint is not evaluated by the watcher yet: give its `path`",
            );
        }
        _ => return refuse(StatusCode::BAD_REQUEST, "give exactly one of `path` and `endpoint`"),
    }
    let name = format!("checkpoint-{}", request.step);
    let sent = state.queue.lock().map(|q| q.send(request).is_ok()).unwrap_or(false);
    if !sent {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "the watcher is stopping");
    }
    (StatusCode::ACCEPTED, Json(json!({"checkpoint": name, "queued": true}))).into_response()
}
