//! The OpenAI-compatible HTTP backend (`/v1/chat/completions`): vLLM, llama.cpp's server,
//! Ollama, OpenAI, and Candor's own `candor serve`.
//!
//! Backend keys (`[models.backend]`, overridable per checkpoint):
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `kind` | — | `"openai"` |
//! | `base_url` | — | e.g. `http://127.0.0.1:8000` (`/v1/chat/completions` is appended) |
//! | `model` | the model's name | the model name the endpoint serves |
//! | `api_key_env` | none | the environment variable holding the API key; the key is never written to archives, logs or errors |
//! | `max_concurrency` | 8 | the ceiling of the adaptive limiter |
//! | `timeout_secs` | 120 | per request |
//! | `max_retries` | 6 | retries on 429, 5xx, timeouts and unreadable bodies |
//!
//! Requests run concurrently on the process's tokio runtime ([`crate::runtime`]), never on a
//! dataflow thread.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::limit::{AdaptiveLimiter, RetryPolicy};
use super::{FinishReason, GenRequest, Generation, Generator};
use crate::error::{Error, Result};

/// Settings of one endpoint.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub base_url: String,
    pub model: String,
    pub api_key: Option<String>,
    pub max_concurrency: usize,
    pub timeout: Duration,
    pub retry: RetryPolicy,
}

impl Endpoint {
    /// Reads the backend table; `default_model` names the model when the table does not.
    pub fn from_table(table: &toml::Table, default_model: &str) -> Result<Self> {
        let key = |k: &str| format!("backend.{k}");
        let string = |k: &str| -> Result<Option<String>> {
            match table.get(k) {
                None => Ok(None),
                Some(toml::Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(Error::config(key(k), format!("expected a string, found {}", other.type_str()))),
            }
        };
        let int = |k: &str, default: i64| -> Result<i64> {
            match table.get(k) {
                None => Ok(default),
                Some(toml::Value::Integer(i)) if *i >= 0 => Ok(*i),
                Some(other) => Err(Error::config(key(k), format!("expected a non-negative integer, found {other}"))),
            }
        };
        let base_url = string("base_url")?.ok_or_else(|| Error::config(key("base_url"), "missing"))?;
        let api_key = match string("api_key_env")? {
            Some(var) => Some(std::env::var(&var).map_err(|_| {
                Error::config(key("api_key_env"), format!("the environment variable `{var}` is not set"))
            })?),
            None => None,
        };
        Ok(Endpoint {
            base_url: base_url.trim_end_matches('/').to_string(),
            model: string("model")?.unwrap_or_else(|| default_model.to_string()),
            api_key,
            max_concurrency: int("max_concurrency", 8)?.max(1) as usize,
            timeout: Duration::from_secs(int("timeout_secs", 120)?.max(1) as u64),
            retry: RetryPolicy { max_retries: int("max_retries", 6)? as u32, ..RetryPolicy::default() },
        })
    }

    fn url(&self) -> String {
        format!("{}/v1/chat/completions", self.base_url)
    }
}

/// A generator that asks an OpenAI-compatible endpoint.
pub struct OpenAiGenerator {
    endpoint: Arc<Endpoint>,
    client: reqwest::Client,
    limiter: Arc<AdaptiveLimiter>,
    fingerprint: String,
    /// Calls sent, retries included (for accounting and tests).
    pub attempts: Arc<std::sync::atomic::AtomicU64>,
}

/// How one attempt ended.
enum Attempt {
    Done(Generation),
    Retry { why: String, retry_after: Option<Duration> },
    Fail(String),
}

impl OpenAiGenerator {
    pub fn new(endpoint: Endpoint, system_prompt: Option<&str>) -> Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(endpoint.timeout)
            .build()
            .map_err(|e| Error::backend(&endpoint.base_url, format!("building the HTTP client: {e}")))?;
        let sys = system_prompt.map(|s| {
            let d = Sha256::digest(s.as_bytes());
            d.iter().take(8).map(|b| format!("{b:02x}")).collect::<String>()
        });
        let fingerprint =
            format!("openai:{}:{}:system={}", endpoint.base_url, endpoint.model, sys.as_deref().unwrap_or("none"));
        Ok(OpenAiGenerator {
            limiter: Arc::new(AdaptiveLimiter::new(endpoint.max_concurrency)),
            endpoint: Arc::new(endpoint),
            client,
            fingerprint,
            attempts: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        })
    }

    /// The limiter's current concurrency bound.
    pub fn concurrency(&self) -> usize {
        self.limiter.limit()
    }
}

impl Generator for OpenAiGenerator {
    fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }

    fn generate(&mut self, requests: &[GenRequest]) -> Result<Vec<Result<Generation>>> {
        let tasks: Vec<_> = requests
            .iter()
            .map(|r| {
                let (endpoint, client, limiter, attempts) =
                    (self.endpoint.clone(), self.client.clone(), self.limiter.clone(), self.attempts.clone());
                let body = request_body(&endpoint.model, r);
                crate::runtime::spawn(async move { ask(&endpoint, &client, &limiter, &attempts, body).await })
            })
            .collect();
        crate::runtime::block_on(async {
            let mut out = Vec::with_capacity(tasks.len());
            for t in tasks {
                out.push(t.await.map_err(|e| Error::Internal(format!("request task: {e}")))?);
            }
            Ok(out)
        })
    }
}

/// The chat-completions body for one request.
pub fn request_body(model: &str, r: &GenRequest) -> Value {
    let mut messages = Vec::new();
    if let Some(sys) = &r.system_prompt {
        messages.push(json!({"role": "system", "content": sys}));
    }
    messages.push(json!({"role": "user", "content": r.prompt}));
    let mut body = json!({
        "model": model,
        "messages": messages,
        "temperature": r.decoding.temperature,
        "max_tokens": r.decoding.max_new_tokens,
        "seed": r.decoding.seed,
    });
    if let Some(p) = r.decoding.top_p {
        body["top_p"] = json!(p);
    }
    if !r.decoding.stop.is_empty() {
        body["stop"] = json!(r.decoding.stop);
    }
    if r.decoding.ignore_eos {
        body["ignore_eos"] = json!(true);
    }
    body
}

async fn ask(
    endpoint: &Endpoint,
    client: &reqwest::Client,
    limiter: &AdaptiveLimiter,
    attempts: &std::sync::atomic::AtomicU64,
    body: Value,
) -> Result<Generation> {
    let mut last = String::new();
    for attempt in 0..=endpoint.retry.max_retries {
        let outcome = {
            let _permit = limiter.acquire().await;
            attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            once(endpoint, client, &body).await
        };
        match outcome {
            Attempt::Done(g) => {
                limiter.on_success();
                return Ok(g);
            }
            Attempt::Fail(why) => return Err(Error::backend(&endpoint.base_url, why)),
            Attempt::Retry { why, retry_after } => {
                if let Some(d) = retry_after {
                    limiter.on_rate_limited(Some(d));
                } else if why.starts_with("429") {
                    limiter.on_rate_limited(None);
                }
                last = why;
                if attempt < endpoint.retry.max_retries {
                    let jitter: f64 = rand::thread_rng().r#gen();
                    tokio::time::sleep(endpoint.retry.delay(attempt, jitter)).await;
                }
            }
        }
    }
    // Every retried failure passes in time (refused connections, timeouts, 429, 5xx, torn
    // bodies): running again later may succeed.
    Err(Error::unavailable(
        &endpoint.base_url,
        format!("gave up after {} attempts; last error: {last}", endpoint.retry.max_retries + 1),
    ))
}

async fn once(endpoint: &Endpoint, client: &reqwest::Client, body: &Value) -> Attempt {
    let start = Instant::now();
    let mut req = client.post(endpoint.url()).json(body);
    if let Some(key) = &endpoint.api_key {
        req = req.bearer_auth(key);
    }
    let resp = match req.send().await {
        Ok(r) => r,
        // The error text of reqwest names the URL but never the headers, so no key leaks.
        Err(e) if e.is_timeout() => {
            return Attempt::Retry { why: format!("timed out after {:?}", endpoint.timeout), retry_after: None };
        }
        // A request that cannot be built (a malformed `base_url`) never succeeds.
        Err(e) if e.is_builder() => return Attempt::Fail(format!("request failed: {}", with_causes(&e))),
        Err(e) => return Attempt::Retry { why: format!("request failed: {}", with_causes(&e)), retry_after: None },
    };
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|s| Duration::from_secs_f64(s.clamp(0.0, 600.0)));
    let text = match resp.text().await {
        Ok(t) => t,
        Err(e) => return Attempt::Retry { why: format!("{status}: reading the body failed: {e}"), retry_after: None },
    };
    if status.as_u16() == 429 {
        return Attempt::Retry { why: format!("429 rate limited: {}", snippet(&text)), retry_after };
    }
    if status.is_server_error() {
        return Attempt::Retry { why: format!("{status}: {}", snippet(&text)), retry_after };
    }
    if !status.is_success() {
        let hint = if status.as_u16() == 401 || status.as_u16() == 403 { " (check the API key variable)" } else { "" };
        return Attempt::Fail(format!("{status}{hint}: {}", snippet(&text)));
    }
    match parse_completion(&text) {
        Ok(mut g) => {
            g.latency_ms = start.elapsed().as_secs_f64() * 1e3;
            Attempt::Done(g)
        }
        // A truncated or garbled body is retried: proxies and overloaded servers produce them.
        Err(why) => {
            Attempt::Retry { why: format!("unreadable response: {why}: {}", snippet(&text)), retry_after: None }
        }
    }
}

/// An error and its causes ("error sending request …: tcp connect error: Connection refused"):
/// reqwest's own text stops at the first.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

fn snippet(text: &str) -> String {
    let t: String = text.chars().take(200).collect();
    if t.len() < text.len() { format!("{t}…") } else { t }
}

/// Reads a chat-completions response body.
pub fn parse_completion(text: &str) -> std::result::Result<Generation, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON ({e})"))?;
    let choice = v.get("choices").and_then(|c| c.get(0)).ok_or("no choices[0]")?;
    let output = choice
        .get("message")
        .and_then(|m| m.get("content"))
        .and_then(Value::as_str)
        .ok_or("no choices[0].message.content string")?
        .to_string();
    let finish_reason = match choice.get("finish_reason").and_then(Value::as_str) {
        Some("length") => FinishReason::Length,
        _ => FinishReason::Stop,
    };
    let usage = |k: &str| v.get("usage").and_then(|u| u.get(k)).and_then(Value::as_u64).unwrap_or(0) as u32;
    Ok(Generation {
        output,
        finish_reason,
        prompt_tokens: usage("prompt_tokens"),
        completion_tokens: usage("completion_tokens"),
        latency_ms: 0.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::Decoding;

    #[test]
    fn bodies_carry_the_decoding_and_system_prompt() {
        let r =
            GenRequest { system_prompt: Some("warm".into()), prompt: "q".into(), decoding: Decoding::structured(9) };
        let b = request_body("m", &r);
        assert_eq!(b["messages"][0]["role"], "system");
        assert_eq!(b["messages"][1]["content"], "q");
        assert_eq!(b["temperature"], 0.2);
        assert_eq!(b["max_tokens"], 300);
        assert_eq!(b["seed"], 9);
        assert!(b.get("top_p").is_none());
    }

    #[test]
    fn completions_parse_and_garbage_is_named() {
        let g = parse_completion(r#"{"choices":[{"message":{"role":"assistant","content":"Paris."},"finish_reason":"length"}],"usage":{"prompt_tokens":12,"completion_tokens":3}}"#).unwrap();
        assert_eq!(
            (g.output.as_str(), g.finish_reason, g.prompt_tokens, g.completion_tokens),
            ("Paris.", FinishReason::Length, 12, 3)
        );
        assert!(parse_completion(r#"{"choices":[{"message":{"content""#).unwrap_err().contains("not JSON"));
        assert!(parse_completion("<html>502</html>").unwrap_err().contains("not JSON"));
        assert!(parse_completion(r#"{"choices":[]}"#).unwrap_err().contains("choices[0]"));
    }

    #[test]
    fn the_api_key_comes_only_from_the_named_variable() {
        let t: toml::Table =
            toml::from_str("base_url = 'http://127.0.0.1:1/'\napi_key_env = 'CANDOR_TEST_SURELY_UNSET_VAR'").unwrap();
        let err = Endpoint::from_table(&t, "m").unwrap_err().to_string();
        assert!(err.contains("CANDOR_TEST_SURELY_UNSET_VAR") && err.contains("not set"), "{err}");
        let t: toml::Table = toml::from_str("base_url = 'http://127.0.0.1:1/'").unwrap();
        let e = Endpoint::from_table(&t, "m").unwrap();
        assert_eq!((e.base_url.as_str(), e.model.as_str(), e.api_key), ("http://127.0.0.1:1", "m", None));
    }
}
