//! The PostgreSQL wire protocol over a [`LiveSql`] catalog, so `psql`, DBeaver or Grafana can
//! query the live tables and statistics.
//!
//! - Simple and extended query protocol (statements without `$n` parameters); results in text
//!   or binary format as the client asks.
//! - Read-only: INSERT, UPDATE, DELETE, CREATE, COPY, … fail with SQLSTATE 25006
//!   (read_only_sql_transaction); SET, BEGIN, COMMIT and the like are acknowledged and ignored,
//!   except `SET statement_timeout`, which the session keeps.
//! - Statements run concurrently, each on the snapshot of committed epochs it started on
//!   ([`LiveSql::snapshot`]). Each has a timeout ([`PgOptions::statement_timeout`], 60 s unless
//!   the session sets `statement_timeout`) and honours PostgreSQL cancel requests (psql's
//!   Ctrl-C): both end it with SQLSTATE 57014 and free what it held. A statement over its
//!   memory limit fails with 53200 ([`super::live::MemoryLimits`]).
//! - At most [`PgOptions::max_connections`] connections: one more is refused with SQLSTATE
//!   53300 (too_many_connections) and the others are served on.
//! - Authentication: none on a loopback address unless a password is given; a password is
//!   required on any other address ([`PgAuth::check`]). Passwords are checked with
//!   SCRAM-SHA-256 (the password never crosses the wire), any user name. After
//!   [`FREE_FAILURES`] failed logins from one address, its further logins wait their turn,
//!   one per [`FAILURE_SPACING`] (then one per [`SLOW_SPACING`] after [`SLOW_AFTER`]), until
//!   it logs in or fails no more for [`FORGET_AFTER`].
//! - TLS from a certificate chain and key in PEM files ([`PgOptions::tls`]); with TLS, SCRAM
//!   also offers channel binding (SCRAM-SHA-256-PLUS).
//! - One log line per statement on standard error: client, user, duration, outcome.
//!
//! ```no_run
//! use std::sync::Arc;
//! use candor::sql::live::LiveSql;
//! use candor::sql::pg::{PgOptions, spawn_pg};
//! let live = Arc::new(LiveSql::open("runs/study").unwrap());
//! let server = spawn_pg(live, "127.0.0.1:5433".parse().unwrap(), PgOptions::from_env()).unwrap();
//! println!("psql -h 127.0.0.1 -p {} -c 'SELECT * FROM family_table'", server.addr.port());
//! server.stop_on_signals().unwrap(); // until SIGTERM or Ctrl-C
//! ```

use std::collections::HashMap;
use std::fmt::Debug;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Schema};
use arrow::util::display::{ArrayFormatter, FormatOptions as ArrowFormat};
use async_trait::async_trait;
use futures::{Sink, stream};
use pgwire::api::auth::noop::NoopStartupHandler;
use pgwire::api::auth::sasl::SASLAuthStartupHandler;
use pgwire::api::auth::sasl::scram::{SCRAM_ITERATIONS, ScramAuth, gen_salted_password};
use pgwire::api::auth::{AuthSource, DefaultServerParameterProvider, LoginInfo, Password, StartupHandler};
use pgwire::api::cancel::DefaultCancelHandler;
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{
    DataRowEncoder, DescribePortalResponse, DescribeStatementResponse, FieldInfo, QueryResponse, Response, Tag,
};
use pgwire::api::stmt::{NoopQueryParser, StoredStatement};
use pgwire::api::{ClientInfo, ConnectionManager, PgWireConnectionState, PgWireServerHandlers, Type};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::data::DataRow;
use pgwire::messages::{Message, PgWireBackendMessage, PgWireFrontendMessage};
use pgwire::types::format::FormatOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::live::{LiveSql, QueryError, Rows, Statement, split_statements};
use crate::error::{Error, Result};

/// The environment variable `candor sql --listen` reads the password from.
pub const PASSWORD_ENV: &str = "CANDOR_SQL_PASSWORD";
/// Failed logins from one address before its logins are spaced out.
pub const FREE_FAILURES: u32 = 5;
/// The spacing of one address's logins after [`FREE_FAILURES`] failures.
pub const FAILURE_SPACING: Duration = Duration::from_millis(250);
/// Failures after which the spacing grows to [`SLOW_SPACING`].
pub const SLOW_AFTER: u32 = 100;
pub const SLOW_SPACING: Duration = Duration::from_secs(2);
/// An address that has failed no login for this long starts afresh.
pub const FORGET_AFTER: Duration = Duration::from_secs(600);

/// Who may connect.
#[derive(Clone, Default)]
pub struct PgAuth {
    /// The password every connection must give (SCRAM-SHA-256; any user name). `None`: no
    /// authentication, allowed on loopback addresses only.
    pub password: Option<String>,
}

impl Debug for PgAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgAuth").field("password", &self.password.as_ref().map(|_| "<redacted>")).finish()
    }
}

impl PgAuth {
    /// The password from `CANDOR_SQL_PASSWORD`, if set and not empty.
    pub fn from_env() -> Self {
        PgAuth { password: std::env::var(PASSWORD_ENV).ok().filter(|p| !p.is_empty()) }
    }

    /// Refuses to serve a non-loopback address without a password.
    pub fn check(&self, addr: &SocketAddr) -> Result<()> {
        if self.password.is_none() && !addr.ip().is_loopback() {
            return Err(Error::config(
                "listen",
                format!("{addr} is reachable from other machines: set {PASSWORD_ENV} to require a password"),
            ));
        }
        Ok(())
    }
}

/// A certificate chain and its private key, PEM files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// How the endpoint serves.
#[derive(Clone, Debug)]
pub struct PgOptions {
    pub auth: PgAuth,
    /// Serve TLS (clients may still connect without it unless they require it).
    pub tls: Option<TlsFiles>,
    /// Connections served at once; more are refused with SQLSTATE 53300.
    pub max_connections: usize,
    /// A statement's timeout unless its session sets `statement_timeout` (zero: none).
    pub statement_timeout: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            auth: PgAuth::default(),
            tls: None,
            max_connections: 64,
            statement_timeout: Duration::from_secs(60),
        }
    }
}

impl PgOptions {
    /// The defaults with the password from `CANDOR_SQL_PASSWORD`.
    pub fn from_env() -> Self {
        PgOptions { auth: PgAuth::from_env(), ..PgOptions::default() }
    }
}

/// A running endpoint: the address it is bound to (the real port when 0 was asked for).
pub struct PgServer {
    pub addr: SocketAddr,
    pub thread: std::thread::JoinHandle<()>,
    stop: Arc<tokio::sync::Notify>,
}

impl PgServer {
    /// Stops accepting connections, lets running statements finish (up to 5 s) and waits
    /// for the endpoint's thread.
    pub fn stop(self) {
        self.stop.notify_one();
        let _ = self.thread.join();
    }

    /// Serves until SIGTERM or SIGINT, then stops cleanly ([`PgServer::stop`]).
    pub fn stop_on_signals(self) -> Result<()> {
        crate::runtime::block_on(crate::serve::terminated())?;
        eprintln!("candor sql: stopping");
        self.stop();
        Ok(())
    }
}

/// Starts the endpoint on a thread of its own (its connections run on the process's runtime,
/// [`crate::runtime`]) and returns once it is listening; for use beside `candor run` or a
/// stream.
pub fn spawn_pg(live: Arc<LiveSql>, addr: SocketAddr, options: PgOptions) -> Result<PgServer> {
    options.auth.check(&addr)?;
    let tls = options.tls.as_ref().map(load_tls).transpose()?;
    let listener = crate::runtime::block_on(tokio::net::TcpListener::bind(addr))
        .map_err(|e| Error::config("listen", format!("cannot listen on {addr}: {e}")))?;
    let bound = listener.local_addr().map_err(|e| Error::system(format!("listening on {addr}"), e))?;
    if !addr.ip().is_loopback() && tls.is_none() {
        eprintln!(
            "warning: {bound} serves SQL without TLS: passwords stay safe (SCRAM) but statements and results \
             cross the network in the clear (--tls-cert/--tls-key)"
        );
    }
    let stop = Arc::new(tokio::sync::Notify::new());
    let stopped = stop.clone();
    let thread = std::thread::Builder::new()
        .name("candor-pg".into())
        .spawn(move || {
            let shutdown = async move { stopped.notified().await };
            if let Err(e) = crate::runtime::block_on(serve_listener(live, listener, options, tls, shutdown)) {
                eprintln!("candor sql endpoint stopped: {e}");
            }
        })
        .map_err(|e| Error::system("starting the SQL endpoint", e))?;
    Ok(PgServer { addr: bound, thread, stop })
}

/// Reads a PEM certificate chain and key into a TLS acceptor.
fn load_tls(files: &TlsFiles) -> Result<(pgwire::tokio::TlsAcceptor, Vec<u8>)> {
    use pgwire::tokio::tokio_rustls::rustls;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let pem = std::fs::read(&files.cert).map_err(|e| Error::io(&files.cert, e))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::config("tls-cert", format!("{}: {e}", files.cert.display())))?;
    if certs.is_empty() {
        return Err(Error::config("tls-cert", format!("{}: no certificate in it", files.cert.display())));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| Error::config("tls-key", format!("{}: {e}", files.key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
        .map_err(|e| Error::config("tls-key", format!("{} with {}: {e}", files.cert.display(), files.key.display())))?;
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok((pgwire::tokio::TlsAcceptor::from(Arc::new(config)), pem))
}

/// Serves the catalog on `addr` until `shutdown` resolves (await it on a tokio runtime, e.g.
/// [`crate::runtime::block_on`]).
pub async fn serve_pg(
    live: Arc<LiveSql>,
    addr: SocketAddr,
    options: PgOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    options.auth.check(&addr)?;
    let tls = options.tls.as_ref().map(load_tls).transpose()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::config("listen", format!("cannot listen on {addr}: {e}")))?;
    serve_listener(live, listener, options, tls, shutdown).await
}

/// Most refusals sent at once; connections beyond it are closed without one.
const MAX_REFUSALS: usize = 1024;

async fn serve_listener(
    live: Arc<LiveSql>,
    listener: tokio::net::TcpListener,
    options: PgOptions,
    tls: Option<(pgwire::tokio::TlsAcceptor, Vec<u8>)>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let manager = Arc::new(ConnectionManager::new());
    let handler = Arc::new(Handler {
        live,
        parser: Arc::new(NoopQueryParser::new()),
        statement_timeout: options.statement_timeout,
        running: AtomicUsize::new(0),
    });
    let mut parameters = DefaultServerParameterProvider::default();
    parameters.default_transaction_read_only = true;
    let parameters = Arc::new(parameters);
    let startup = match &options.auth.password {
        None => Startup::Open(Arc::new(OpenStartup { manager: manager.clone() })),
        Some(password) => {
            let secret = Arc::new(SaltedPassword::new(password));
            let sasl = |scram| {
                Box::new(
                    SASLAuthStartupHandler::new(parameters.clone())
                        .with_scram(scram)
                        .with_connection_manager(manager.clone()),
                )
            };
            // Channel binding (SCRAM-SHA-256-PLUS) is offered on TLS connections only: clients
            // refuse an offer of it over plain TCP.
            let tls_scram = match &tls {
                Some((_, pem)) => {
                    let mut scram = ScramAuth::new(secret.clone());
                    scram
                        .configure_certificate(pem)
                        .map_err(|e| Error::config("tls-cert", format!("channel binding: {e}")))?;
                    Some(sasl(scram))
                }
                None => None,
            };
            Startup::Scram { plain: sasl(ScramAuth::new(secret)), tls: tls_scram, backoff: Backoff::default() }
        }
    };
    let handlers = Arc::new(Handlers {
        handler: handler.clone(),
        startup: Arc::new(startup),
        cancel: Arc::new(DefaultCancelHandler::new(manager)),
    });
    let acceptor = tls.map(|(a, _)| a);
    let (limit, refusing) = connection_limits(options.max_connections);
    let connections = Arc::new(tokio::sync::Semaphore::new(limit));
    let refusals = Arc::new(tokio::sync::Semaphore::new(refusing));
    // The connections' tasks, ended when the endpoint stops (the runtime they run on is the
    // process's and goes on).
    let mut tasks = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let (socket, peer) = match accepted {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors (or a connection reset before it was accepted):
                // keep serving the connections there are and try again shortly.
                eprintln!("candor sql: accepting a connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match connections.clone().try_acquire_owned() {
            Ok(permit) => {
                let handlers = handlers.clone();
                let acceptor = acceptor.clone();
                tasks.spawn(async move {
                    let _ = pgwire::tokio::process_socket(socket, acceptor, handlers).await;
                    drop(permit);
                });
            }
            Err(_) => {
                if let Ok(permit) = refusals.clone().try_acquire_owned() {
                    tasks.spawn(async move {
                        refuse(socket, limit).await;
                        drop(permit);
                    });
                }
                eprintln!("candor sql: refused {peer}: {limit} connections already");
            }
        }
    }
    // Stopping: no new connections; running statements get a moment to finish.
    let deadline = Instant::now() + Duration::from_secs(5);
    while handler.running.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Closes the connections; a statement still running is stopped with its connection.
    tasks.shutdown().await;
    Ok(())
}

/// File descriptors kept for the catalog (archive files, the runtime) beside connections.
const RESERVED_FDS: usize = 64;

/// Connections served and refusals sent at once: `wanted` connections, lowered (with a
/// warning) to half of what the process's open-file limit leaves beside [`RESERVED_FDS`];
/// refusals get the rest, up to [`MAX_REFUSALS`].
fn connection_limits(wanted: usize) -> (usize, usize) {
    let wanted = wanted.max(1);
    let Some(fds) = open_file_limit() else { return (wanted, MAX_REFUSALS) };
    let budget = fds.saturating_sub(RESERVED_FDS).max(2);
    let room = (budget / 2).max(1);
    if wanted > room {
        eprintln!(
            "warning: serving at most {room} connections, not {wanted}: the process may open {fds} files \
             (raise it with `ulimit -n`)"
        );
    }
    let served = wanted.min(room);
    (served, (budget - served).clamp(1, MAX_REFUSALS))
}

/// The soft limit on open files of this process (Linux), if it has one.
fn open_file_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Tells a connection over the limit so, as PostgreSQL does (SQLSTATE 53300), and closes it.
async fn refuse(mut socket: tokio::net::TcpStream, limit: usize) {
    let info = ErrorInfo::new(
        "FATAL".into(),
        "53300".into(),
        format!("sorry, too many clients already (candor sql serves {limit} connections at once)"),
    );
    let mut buf = bytes::BytesMut::new();
    if pgwire::messages::response::ErrorResponse::from(info).encode(&mut buf).is_err() {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        // The client speaks first. To a TLS or GSS encryption request answer "no" (the error
        // is then read as PostgreSQL's own refusal is, after the startup message); then
        // answer the startup message with the error, and drain what the client sends so
        // closing does not reset the connection before the error is read.
        let mut scratch = [0u8; 1024];
        let mut head = [0u8; 8];
        socket.read_exact(&mut head).await?;
        let code = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        if head[..4] == 8u32.to_be_bytes() && (code == 80877103 || code == 80877104) {
            socket.write_all(b"N").await?;
            let _ = socket.read(&mut scratch).await?;
        }
        socket.write_all(&buf).await?;
        socket.shutdown().await?;
        while socket.read(&mut scratch).await? > 0 {}
        std::io::Result::Ok(())
    })
    .await;
}

struct Handlers {
    handler: Arc<Handler>,
    startup: Arc<Startup>,
    cancel: Arc<DefaultCancelHandler>,
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.handler.clone()
    }
    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.handler.clone()
    }
    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        self.startup.clone()
    }
    fn cancel_handler(&self) -> Arc<impl pgwire::api::cancel::CancelHandler> {
        self.cancel.clone()
    }
}

/// No authentication (loopback only); connections are registered for cancel requests.
struct OpenStartup {
    manager: Arc<ConnectionManager>,
}

impl NoopStartupHandler for OpenStartup {
    fn connection_manager(&self) -> Option<Arc<ConnectionManager>> {
        Some(self.manager.clone())
    }
}

type ScramStartup = SASLAuthStartupHandler<DefaultServerParameterProvider>;

enum Startup {
    Open(Arc<OpenStartup>),
    Scram { plain: Box<ScramStartup>, tls: Option<Box<ScramStartup>>, backoff: Backoff },
}

#[async_trait]
impl StartupHandler for Startup {
    async fn on_startup<C>(&self, client: &mut C, message: PgWireFrontendMessage) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        match self {
            Startup::Open(open) => open.on_startup(client, message).await,
            Startup::Scram { plain, tls, backoff } => {
                let scram = match tls {
                    Some(tls) if client.is_secure() => tls,
                    _ => plain,
                };
                let ip = client.socket_addr().ip();
                if matches!(message, PgWireFrontendMessage::Startup(_)) {
                    let turn = backoff.turn(ip, Instant::now());
                    tokio::time::sleep_until(turn.into()).await;
                }
                let result = scram.on_startup(client, message).await;
                match &result {
                    Err(e) => {
                        backoff.failed(ip, Instant::now());
                        eprintln!("candor sql: login from {ip} failed: {e}");
                    }
                    Ok(()) if matches!(client.state(), PgWireConnectionState::ReadyForQuery) => backoff.succeeded(ip),
                    Ok(()) => {}
                }
                result
            }
        }
    }
}

/// Failed logins per client address, and when its next login may be checked.
#[derive(Default)]
struct Backoff {
    addresses: Mutex<HashMap<IpAddr, Failures>>,
}

#[derive(Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
    /// When the next login from the address may go ahead.
    next: Instant,
}

impl Backoff {
    /// When a login starting at `now` from `ip` may go ahead; reserves that turn.
    fn turn(&self, ip: IpAddr, now: Instant) -> Instant {
        let mut map = self.addresses.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, f| now.duration_since(f.last) < FORGET_AFTER);
        let Some(f) = map.get_mut(&ip) else { return now };
        if f.count < FREE_FAILURES {
            return now;
        }
        let spacing = if f.count >= SLOW_AFTER { SLOW_SPACING } else { FAILURE_SPACING };
        let turn = f.next.max(now);
        f.next = turn + spacing;
        turn
    }

    fn failed(&self, ip: IpAddr, now: Instant) {
        let mut map = self.addresses.lock().unwrap_or_else(|p| p.into_inner());
        let f = map.entry(ip).or_insert(Failures { count: 0, last: now, next: now });
        f.count += 1;
        f.last = now;
    }

    fn succeeded(&self, ip: IpAddr) {
        self.addresses.lock().unwrap_or_else(|p| p.into_inner()).remove(&ip);
    }
}

/// The one password, salted and hashed once at start-up (SCRAM's server side needs only that).
struct SaltedPassword {
    salt: Vec<u8>,
    salted: Vec<u8>,
}

impl SaltedPassword {
    fn new(password: &str) -> Self {
        let salt: [u8; 16] = rand::random();
        SaltedPassword { salt: salt.to_vec(), salted: gen_salted_password(password, &salt, SCRAM_ITERATIONS) }
    }
}

impl Debug for SaltedPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SaltedPassword(<redacted>)")
    }
}

#[async_trait]
impl AuthSource for SaltedPassword {
    async fn get_password(&self, _login: &LoginInfo) -> PgWireResult<Password> {
        Ok(Password::new(Some(self.salt.clone()), self.salted.clone()))
    }
}

struct Handler {
    live: Arc<LiveSql>,
    parser: Arc<NoopQueryParser>,
    statement_timeout: Duration,
    /// Statements running now (shutdown waits for them).
    running: AtomicUsize,
}

/// The session setting a client changes with `SET statement_timeout`.
const TIMEOUT_KEY: &str = "candor.statement_timeout_ms";

fn user_error(e: QueryError) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new("ERROR".into(), e.sqlstate().into(), e.to_string())))
}

/// Parses a PostgreSQL duration setting: a number of milliseconds, or a number with a unit
/// (`ms`, `s`, `min`, `h`, `d`), quoted or not; 0 turns the timeout off.
pub fn parse_timeout(value: &str) -> Option<Duration> {
    let v = value.trim().trim_matches('\'').trim_matches('"').trim();
    let split = v.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: f64 = num.parse().ok().filter(|n: &f64| n.is_finite() && *n >= 0.0)?;
    let ms = match unit.trim().to_lowercase().as_str() {
        "" | "ms" => n,
        "s" => n * 1e3,
        "min" => n * 60e3,
        "h" => n * 3600e3,
        "d" => n * 86400e3,
        _ => return None,
    };
    Some(Duration::from_millis(ms as u64))
}

/// `SET [SESSION|LOCAL] statement_timeout {=|TO} value` → the value; `RESET statement_timeout`
/// → `DEFAULT`. Other settings: None.
fn statement_timeout_setting(sql: &str) -> Option<String> {
    let words: Vec<&str> = sql.trim().trim_end_matches(';').split_whitespace().collect();
    let lower: Vec<String> = words.iter().map(|w| w.to_lowercase()).collect();
    let mut i = match lower.first().map(String::as_str) {
        Some("reset") => {
            return (lower.get(1).map(String::as_str) == Some("statement_timeout")).then(|| "DEFAULT".into());
        }
        Some("set") => 1,
        _ => return None,
    };
    if matches!(lower.get(i).map(String::as_str), Some("session" | "local")) {
        i += 1;
    }
    let rest = words[i..].join(" ");
    let (name, value) = rest.split_once('=').or_else(|| {
        let lower = rest.to_lowercase();
        lower.find(" to ").map(|p| (&rest[..p], &rest[p + 4..]))
    })?;
    (name.trim().eq_ignore_ascii_case("statement_timeout")).then(|| value.trim().to_string())
}

/// Ends a statement's task when its future is dropped (a cancel request or a closed
/// connection drops it), and logs how it went.
struct StatementGuard<'a> {
    abort: Option<tokio::task::AbortHandle>,
    running: &'a AtomicUsize,
    started: Instant,
    client: String,
    sql: String,
    outcome: Option<String>,
}

impl Drop for StatementGuard<'_> {
    fn drop(&mut self) {
        if let Some(a) = &self.abort {
            a.abort();
        }
        self.running.fetch_sub(1, Ordering::SeqCst);
        let outcome = self.outcome.take().unwrap_or_else(|| "canceled (57014, cancel request or disconnect)".into());
        let mut sql: String = self.sql.split_whitespace().collect::<Vec<_>>().join(" ");
        if sql.len() > 200 {
            let cut = (0..=200).rev().find(|i| sql.is_char_boundary(*i)).unwrap_or(0);
            sql.truncate(cut);
            sql.push('…');
        }
        eprintln!("sql {} {:.1} ms {}: {}", self.client, self.started.elapsed().as_secs_f64() * 1e3, outcome, sql);
    }
}

impl Handler {
    fn timeout<C: ClientInfo>(&self, client: &C) -> Duration {
        client
            .metadata()
            .get(TIMEOUT_KEY)
            .and_then(|ms| ms.parse().ok())
            .map(Duration::from_millis)
            .unwrap_or(self.statement_timeout)
    }

    async fn run<C: ClientInfo>(&self, client: &mut C, sql: String, format: &Format) -> PgWireResult<Response> {
        match Statement::classify(&sql) {
            Statement::Write(kw) => Err(user_error(QueryError::ReadOnly(kw))),
            Statement::Session(kw) => {
                if let Some(value) = statement_timeout_setting(&sql) {
                    let ms = if value.eq_ignore_ascii_case("default") {
                        self.statement_timeout
                    } else {
                        parse_timeout(&value).ok_or_else(|| {
                            PgWireError::UserError(Box::new(ErrorInfo::new(
                                "ERROR".into(),
                                "22023".into(),
                                format!("invalid value for parameter \"statement_timeout\": {value}"),
                            )))
                        })?
                    };
                    client.metadata_mut().insert(TIMEOUT_KEY.into(), ms.as_millis().to_string());
                }
                let tag = Tag::new(Statement::session_tag(&kw));
                Ok(match kw.as_str() {
                    "BEGIN" | "START" => Response::TransactionStart(tag),
                    "COMMIT" | "END" | "ROLLBACK" => Response::TransactionEnd(tag),
                    _ => Response::Execution(tag),
                })
            }
            Statement::Empty => Ok(Response::EmptyQuery),
            Statement::Query(sql) if is_show_timeout(&sql) => {
                let ms = self.timeout(client).as_millis();
                let schema = Arc::new(Schema::new(vec![arrow::datatypes::Field::new(
                    "statement_timeout",
                    DataType::Utf8,
                    false,
                )]));
                let batch = arrow::array::RecordBatch::try_new(
                    schema.clone(),
                    vec![Arc::new(arrow::array::StringArray::from(vec![format!("{ms}ms")]))],
                )
                .map_err(|e| user_error(QueryError::Execution(e.to_string())))?;
                encode(Rows::new(schema, vec![batch]), format)
            }
            Statement::Query(sql) => {
                let timeout = self.timeout(client);
                let user = client.metadata().get("user").cloned().unwrap_or_default();
                let mut guard = StatementGuard {
                    abort: None,
                    running: &self.running,
                    started: Instant::now(),
                    client: format!("{} {user}", client.socket_addr()),
                    sql: sql.clone(),
                    outcome: None,
                };
                self.running.fetch_add(1, Ordering::SeqCst);
                let work = async {
                    let (live, text) = (self.live.clone(), sql.clone());
                    let snapshot = tokio::task::spawn_blocking(move || live.snapshot(&text))
                        .await
                        .map_err(|e| QueryError::Execution(format!("catching up with the archive: {e}")))??;
                    let task = self.live.spawn_query(snapshot, sql);
                    guard.abort = Some(task.abort_handle());
                    task.await.map_err(|e| QueryError::Execution(format!("statement task: {e}")))?
                };
                let result = if timeout.is_zero() {
                    work.await
                } else {
                    tokio::time::timeout(timeout, work).await.unwrap_or_else(|_| {
                        Err(QueryError::Canceled(format!("statement timeout ({} ms)", timeout.as_millis())))
                    })
                };
                guard.outcome = Some(match &result {
                    Ok(rows) => format!("ok, {} rows", rows.num_rows()),
                    Err(e) => format!("error {}: {e}", e.sqlstate()),
                });
                encode(result.map_err(user_error)?, format)
            }
        }
    }
}

fn is_show_timeout(sql: &str) -> bool {
    let words: Vec<String> = sql.trim_end_matches(';').split_whitespace().map(str::to_lowercase).collect();
    words == ["show", "statement_timeout"]
}

#[async_trait]
impl SimpleQueryHandler for Handler {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let mut out = Vec::new();
        for sql in split_statements(query) {
            out.push(self.run(client, sql, &Format::UnifiedText).await?);
        }
        if out.is_empty() {
            out.push(Response::EmptyQuery);
        }
        Ok(out)
    }
}

#[async_trait]
impl ExtendedQueryHandler for Handler {
    type Statement = String;
    type QueryParser = NoopQueryParser;

    fn query_parser(&self) -> Arc<Self::QueryParser> {
        self.parser.clone()
    }

    async fn do_query<C>(&self, client: &mut C, portal: &Portal<String>, _max_rows: usize) -> PgWireResult<Response>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        if !portal.parameters.is_empty() {
            return Err(user_error(QueryError::Plan("statements with $n parameters are not supported".into())));
        }
        self.run(client, portal.statement.statement.clone(), &portal.result_column_format).await
    }

    async fn do_describe_statement<C>(
        &self,
        _client: &mut C,
        stmt: &StoredStatement<String>,
    ) -> PgWireResult<DescribeStatementResponse>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let fields = self.describe(&stmt.statement, &Format::UnifiedText).await?;
        let params = stmt.parameter_types.iter().map(|t| t.clone().unwrap_or(Type::UNKNOWN)).collect();
        Ok(DescribeStatementResponse::new(params, fields))
    }

    async fn do_describe_portal<C>(
        &self,
        _client: &mut C,
        portal: &Portal<String>,
    ) -> PgWireResult<DescribePortalResponse>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        Ok(DescribePortalResponse::new(self.describe(&portal.statement.statement, &portal.result_column_format).await?))
    }
}

impl Handler {
    async fn describe(&self, sql: &str, format: &Format) -> PgWireResult<Vec<FieldInfo>> {
        match Statement::classify(sql) {
            Statement::Query(sql) if is_show_timeout(&sql) => {
                Ok(vec![FieldInfo::new("statement_timeout".into(), None, None, Type::VARCHAR, format.format_for(0))])
            }
            Statement::Query(sql) => {
                let (live, text) = (self.live.clone(), sql.clone());
                let snapshot = tokio::task::spawn_blocking(move || live.snapshot(&text))
                    .await
                    .map_err(|e| user_error(QueryError::Execution(e.to_string())))?
                    .map_err(user_error)?;
                let task = self.live.spawn_describe(snapshot, sql);
                let abort = task.abort_handle();
                let schema = tokio::time::timeout(self.statement_timeout.max(Duration::from_secs(1)), task).await;
                abort.abort();
                let schema = schema
                    .map_err(|_| user_error(QueryError::Canceled("statement timeout while planning".into())))?
                    .map_err(|e| user_error(QueryError::Execution(e.to_string())))?
                    .map_err(user_error)?;
                Ok(fields(&schema, format))
            }
            Statement::Write(kw) => Err(user_error(QueryError::ReadOnly(kw))),
            _ => Ok(Vec::new()),
        }
    }
}

/// The PostgreSQL type a column is sent as.
fn pg_type(dt: &DataType) -> Type {
    match dt {
        DataType::Boolean => Type::BOOL,
        DataType::Int8 | DataType::Int16 | DataType::UInt8 => Type::INT2,
        DataType::Int32 | DataType::UInt16 => Type::INT4,
        DataType::Int64 | DataType::UInt32 | DataType::UInt64 => Type::INT8,
        DataType::Float16 | DataType::Float32 => Type::FLOAT4,
        DataType::Float64 => Type::FLOAT8,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Type::VARCHAR,
        _ => Type::TEXT,
    }
}

fn fields(schema: &Schema, format: &Format) -> Vec<FieldInfo> {
    schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| FieldInfo::new(f.name().clone(), None, None, pg_type(f.data_type()), format.format_for(i)))
        .collect()
}

/// Small integers are sent widened (PostgreSQL has no unsigned or 1-byte integer types).
fn widen(col: &arrow::array::ArrayRef) -> PgWireResult<arrow::array::ArrayRef> {
    let to = match col.data_type() {
        DataType::Int8 | DataType::UInt8 => DataType::Int16,
        DataType::UInt16 => DataType::Int32,
        DataType::UInt32 => DataType::Int64,
        DataType::Float16 => DataType::Float32,
        _ => return Ok(col.clone()),
    };
    arrow::compute::cast(col, &to).map_err(|e| user_error(QueryError::Execution(e.to_string())))
}

fn encode(mut rows: Rows, format: &Format) -> PgWireResult<Response> {
    let fields = Arc::new(fields(&rows.schema, format));
    let batches = std::mem::take(&mut rows.batches);
    let row_fields = fields.clone();
    // Rows are encoded one batch at a time as the client reads them; `rows` keeps the
    // result's memory reservation until the last one is sent.
    let data = batches.into_iter().flat_map(move |batch| {
        let _held = &rows;
        encode_batch(&batch, &row_fields).unwrap_or_else(|e| vec![Err(e)])
    });
    Ok(Response::Query(QueryResponse::new(fields, stream::iter(data))))
}

fn encode_batch(
    batch: &arrow::array::RecordBatch,
    fields: &Arc<Vec<FieldInfo>>,
) -> PgWireResult<Vec<PgWireResult<DataRow>>> {
    use arrow::datatypes::{Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, UInt64Type};
    let opts = FormatOptions::default();
    let display = ArrowFormat::default().with_null("");
    let mut out = Vec::with_capacity(batch.num_rows());
    let mut encoder = DataRowEncoder::new(fields.clone());
    let cols = batch.columns().iter().map(widen).collect::<PgWireResult<Vec<_>>>()?;
    let formatters = cols
        .iter()
        .map(|c| ArrayFormatter::try_new(c.as_ref(), &display))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| user_error(QueryError::Execution(e.to_string())))?;
    for row in 0..batch.num_rows() {
        for (i, col) in cols.iter().enumerate() {
            let (ty, ff) = (fields[i].datatype().clone(), fields[i].format());
            if col.is_null(row) {
                encoder.encode_field_with_type_and_format(&None::<i64>, &ty, ff, &opts)?;
                continue;
            }
            match col.data_type() {
                DataType::Boolean => {
                    encoder.encode_field_with_type_and_format(&col.as_boolean().value(row), &ty, ff, &opts)?
                }
                DataType::Int16 => encoder.encode_field_with_type_and_format(
                    &col.as_primitive::<Int16Type>().value(row),
                    &ty,
                    ff,
                    &opts,
                )?,
                DataType::Int32 => encoder.encode_field_with_type_and_format(
                    &col.as_primitive::<Int32Type>().value(row),
                    &ty,
                    ff,
                    &opts,
                )?,
                DataType::Int64 => encoder.encode_field_with_type_and_format(
                    &col.as_primitive::<Int64Type>().value(row),
                    &ty,
                    ff,
                    &opts,
                )?,
                DataType::UInt64 => {
                    let v = col.as_primitive::<UInt64Type>().value(row);
                    match i64::try_from(v) {
                        Ok(v) => encoder.encode_field_with_type_and_format(&v, &ty, ff, &opts)?,
                        Err(_) => encoder.encode_field_with_type_and_format(&v.to_string(), &ty, ff, &opts)?,
                    }
                }
                DataType::Float32 => encoder.encode_field_with_type_and_format(
                    &col.as_primitive::<Float32Type>().value(row),
                    &ty,
                    ff,
                    &opts,
                )?,
                DataType::Float64 => encoder.encode_field_with_type_and_format(
                    &col.as_primitive::<Float64Type>().value(row),
                    &ty,
                    ff,
                    &opts,
                )?,
                _ => {
                    encoder.encode_field_with_type_and_format(&formatters[i].value(row).to_string(), &ty, ff, &opts)?
                }
            }
        }
        out.push(Ok(encoder.take_row()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_is_required_off_loopback() {
        let open = PgAuth::default();
        assert!(open.check(&"127.0.0.1:5433".parse().unwrap()).is_ok());
        assert!(open.check(&"[::1]:5433".parse().unwrap()).is_ok());
        let err = open.check(&"0.0.0.0:5433".parse().unwrap()).unwrap_err().to_string();
        assert!(err.contains(PASSWORD_ENV), "{err}");
        let secured = PgAuth { password: Some("s3cret".into()) };
        assert!(secured.check(&"0.0.0.0:5433".parse().unwrap()).is_ok());
        assert!(!format!("{secured:?}").contains("s3cret"), "the password is never printed");
    }

    #[test]
    fn statement_timeouts_parse_as_postgresql_writes_them() {
        assert_eq!(parse_timeout("5000"), Some(Duration::from_millis(5000)));
        assert_eq!(parse_timeout("'1.5s'"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_timeout("2min"), Some(Duration::from_secs(120)));
        assert_eq!(parse_timeout("0"), Some(Duration::ZERO));
        assert_eq!(parse_timeout("-1"), None);
        assert_eq!(parse_timeout("soon"), None);
        assert_eq!(statement_timeout_setting("SET statement_timeout = 100"), Some("100".into()));
        assert_eq!(statement_timeout_setting("set session statement_timeout to '2s';"), Some("'2s'".into()));
        assert_eq!(statement_timeout_setting("RESET statement_timeout"), Some("DEFAULT".into()));
        assert_eq!(statement_timeout_setting("SET search_path = public"), None);
        assert_eq!(statement_timeout_setting("SET extra_float_digits = 3"), None);
    }

    #[test]
    fn logins_from_an_address_that_keeps_failing_are_spaced_out_and_others_are_not() {
        let b = Backoff::default();
        let (bad, good): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        for _ in 0..FREE_FAILURES {
            assert_eq!(b.turn(bad, t0), t0, "the first failures cost nothing");
            b.failed(bad, t0);
        }
        // Ten logins started at once go ahead one per spacing.
        let turns: Vec<Instant> = (0..10).map(|_| b.turn(bad, t0)).collect();
        for (k, t) in turns.iter().enumerate() {
            assert_eq!(*t, t0 + FAILURE_SPACING * k as u32);
        }
        assert_eq!(b.turn(good, t0), t0, "another address is not slowed");
        b.succeeded(bad);
        assert_eq!(b.turn(bad, t0), t0, "a successful login starts afresh");
        for _ in 0..FREE_FAILURES {
            b.failed(bad, t0);
        }
        let later = t0 + FORGET_AFTER;
        assert_eq!(b.turn(bad, later), later, "old failures are forgotten");
    }
}
