//! A headless Chromium driven over WebDriver (`chromedriver`), to check and time the report in
//! a real browser: the drill-down test opens a cell and reads the items shown, `candor bench
//! report` times opening one. Uses the system's Chromium (Debian's `chromium` and
//! `chromium-driver`), never a downloaded browser; the profile is a fresh temporary directory
//! and background networking is off, so nothing leaves the machine.
//!
//! ```no_run
//! use candor::report::browser::Browser;
//! let browser = Browser::launch().unwrap();
//! browser.goto("file:///tmp/report/report.html").unwrap();
//! let title = browser.eval("return document.title", serde_json::json!([])).unwrap();
//! assert_eq!(title, "Candor report");
//! ```

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

use crate::error::{Error, Result};

/// The Chromium switches every session uses: headless, no sandbox (containers), no GPU, and
/// nothing that would reach the network on its own.
pub const CHROMIUM_ARGS: [&str; 9] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
];

/// The system Chromium and its driver, when installed.
pub fn find() -> Option<(PathBuf, PathBuf)> {
    let on_path = |name: &str| {
        std::env::var_os("PATH")
            .and_then(|paths| std::env::split_paths(&paths).map(|p| p.join(name)).find(|p| p.is_file()))
    };
    let chromium = ["chromium", "chromium-browser"].iter().find_map(|n| on_path(n))?;
    let driver = on_path("chromedriver")?;
    Some((chromium, driver))
}

/// One browser session.
pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: reqwest::Client,
    profile: tempfile::TempDir,
}

/// Chromium and chromedriver are outside Candor: their failures are external.
fn err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::system(format!("browser: {what}"), e)
}

impl Browser {
    /// Starts chromedriver on a free local port and opens a headless Chromium session.
    pub fn launch() -> Result<Browser> {
        let (chromium, driver) = find().ok_or_else(|| {
            err("launch", "chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
        })?;
        Self::launch_with(&chromium, &driver)
    }

    pub fn launch_with(chromium: &Path, driver: &Path) -> Result<Browser> {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| err("port", e))?.port();
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| err("starting chromedriver", e))?;
        let profile = tempfile::tempdir().map_err(|e| err("profile", e))?;
        let mut browser = Browser {
            driver: child,
            base: format!("http://127.0.0.1:{port}"),
            session: String::new(),
            http: reqwest::Client::new(),
            profile,
        };
        let started = Instant::now();
        loop {
            match browser.request(reqwest::Method::GET, "/status", None) {
                Ok(v) if v["ready"] == true => break,
                _ if started.elapsed() > Duration::from_secs(20) => {
                    return Err(err("chromedriver", "not ready after 20 s"));
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        let mut args: Vec<String> = CHROMIUM_ARGS.iter().map(|s| s.to_string()).collect();
        args.push(format!("--user-data-dir={}", browser.profile.path().display()));
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args},
        }}});
        let session = browser.request(reqwest::Method::POST, "/session", Some(caps))?;
        browser.session = session["sessionId"]
            .as_str()
            .ok_or_else(|| err("session", format!("no session id in {session}")))?
            .to_string();
        Ok(browser)
    }

    fn request(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        crate::runtime::block_on(async {
            let mut req = self.http.request(method, &url);
            if let Some(b) = body {
                req = req.json(&b);
            }
            let resp = req.send().await.map_err(|e| err(path, e))?;
            let status = resp.status();
            let v: Value = resp.json().await.map_err(|e| err(path, e))?;
            if !status.is_success() {
                return Err(err(path, format!("{status}: {}", v["value"])));
            }
            Ok(v.get("value").cloned().unwrap_or(Value::Null))
        })
    }

    fn session_path(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    /// Opens a URL and waits for the page to load.
    pub fn goto(&self, url: &str) -> Result<()> {
        self.request(reqwest::Method::POST, &self.session_path("/url"), Some(json!({"url": url}))).map(|_| ())
    }

    /// Runs a script's body (`return …` gives the value) with `args`.
    pub fn eval(&self, script: &str, args: Value) -> Result<Value> {
        self.request(
            reqwest::Method::POST,
            &self.session_path("/execute/sync"),
            Some(json!({"script": script, "args": args})),
        )
    }

    /// Clicks the first element matching a CSS selector, as a user would.
    pub fn click(&self, css: &str) -> Result<()> {
        let found = self.request(
            reqwest::Method::POST,
            &self.session_path("/element"),
            Some(json!({"using": "css selector", "value": css})),
        )?;
        let id = found
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .ok_or_else(|| err("click", format!("no element {css}")))?
            .to_string();
        self.request(reqwest::Method::POST, &self.session_path(&format!("/element/{id}/click")), Some(json!({})))
            .map(|_| ())
    }

    /// Polls a script until it returns a truthy value, at most `timeout`.
    pub fn wait_for(&self, script: &str, timeout: Duration) -> Result<Value> {
        let started = Instant::now();
        loop {
            let v = self.eval(script, json!([]))?;
            if !matches!(v, Value::Null | Value::Bool(false)) {
                return Ok(v);
            }
            if started.elapsed() > timeout {
                return Err(err("wait", format!("`{script}` still false after {timeout:?}")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A PNG of the viewport.
    pub fn screenshot(&self) -> Result<Vec<u8>> {
        let v = self.request(reqwest::Method::GET, &self.session_path("/screenshot"), None)?;
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().ok_or_else(|| err("screenshot", "no image"))?)
            .map_err(|e| err("screenshot", e))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.request(reqwest::Method::DELETE, &self.session_path(""), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// A pair as the drill-down shows it: (`b` or `c`, base response key, fine-tuned response key).
pub type ShownPair = (String, String, String);

/// The report's drill-down, driven in a browser: opens `report` and clicks the button of one
/// cell (`selector`), then reads back every pair shown, pressing "show more" until all are.
/// Returns the pairs as (side, base response key, fine-tuned response key) and the milliseconds
/// the page took from the click to the rendered items.
pub fn open_cell(browser: &Browser, report: &Path, selector: &str) -> Result<(Vec<ShownPair>, f64)> {
    let url = format!("file://{}", report.canonicalize().map_err(|e| Error::io(report, e))?.display());
    browser.goto(&url)?;
    browser.click(selector)?;
    browser.wait_for("return document.getElementById('drill').dataset.state === 'ready'", Duration::from_secs(60))?;
    let ms = browser.eval("return Number(document.getElementById('drill').dataset.openMs)", json!([]))?;
    while browser.eval("return document.querySelector('#drill button.more') !== null", json!([]))? == Value::Bool(true)
    {
        browser.click("#drill button.more")?;
    }
    let shown = browser.eval(
        "return [...document.querySelectorAll('#drill .pair')].map(p => [p.dataset.side, p.dataset.baseKey, p.dataset.ftKey])",
        json!([]),
    )?;
    let pairs = shown
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let s = |i: usize| p[i].as_str().unwrap_or("").to_string();
            (s(0), s(1), s(2))
        })
        .collect();
    Ok((pairs, ms.as_f64().unwrap_or(f64::NAN)))
}
