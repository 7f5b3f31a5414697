//! Errors that say where the problem is.
//!
//! Every error Candor reports to a user names the place it came from (a file, a line or row,
//! a field, a config key) and carries a [`Domain`] so that a bad config line, a failing
//! endpoint and a bug are told apart.

use std::fmt;
use std::path::{Path, PathBuf};

/// Who is expected to act on an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Domain {
    /// The input or configuration is wrong; the user must change it.
    User,
    /// Something outside Candor failed (an endpoint, the disk); retrying may help.
    External,
    /// Stored data is damaged (a checksum or row count does not match what was committed):
    /// restore the named file, or re-create what it held.
    Data,
    /// A bug in Candor.
    Internal,
}

/// A place in an input: a file and, where known, a line (or row) and a field.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Location {
    pub file: Option<PathBuf>,
    /// 1-based line (JSONL, TOML) or data row (CSV, counting the header as line 1).
    pub line: Option<u64>,
    pub field: Option<String>,
}

impl Location {
    pub fn file(path: impl AsRef<Path>) -> Self {
        Location { file: Some(path.as_ref().to_path_buf()), ..Default::default() }
    }
    pub fn line(mut self, line: u64) -> Self {
        self.line = Some(line);
        self
    }
    pub fn field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(file) = &self.file {
            parts.push(file.display().to_string());
        }
        if let Some(line) = self.line {
            parts.push(format!("line {line}"));
        }
        if let Some(field) = &self.field {
            parts.push(format!("field `{field}`"));
        }
        if parts.is_empty() { write!(f, "<unknown>") } else { write!(f, "{}", parts.join(", ")) }
    }
}

/// The library's error type.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An input (dataset, answer file, config, archive) is malformed.
    #[error("{location}: {message}")]
    Input { location: Location, message: String },
    /// A configuration value is not allowed.
    #[error("config {key}: {message}")]
    Config { key: String, message: String },
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An Arrow batch did not have the shape its stream's schema declares.
    #[error("stream `{stream}`: {message}")]
    Schema { stream: String, message: String },
    /// Arrow or Parquet failed on data that passed validation.
    #[error("{context}: {source}")]
    Arrow {
        context: String,
        #[source]
        source: arrow::error::ArrowError,
    },
    /// A model backend, broker or other service failed (after its retries, where they
    /// apply). `transient`: it could not be reached or kept failing in ways that pass (a
    /// refused connection, a timeout, 429 or 5xx answers), so the same command may succeed
    /// later.
    #[error("backend {backend}: {message}")]
    Backend { backend: String, message: String, transient: bool },
    /// Stages of the dataflow reported errors; nothing was archived for the epochs they hit.
    #[error("{}", dataflow_message(.0))]
    Dataflow(Vec<StageError>),
    /// A model backend failed while running (a forward pass, the device).
    #[error("model {context}: {message}")]
    Model { context: String, message: String },
    /// Stored data no longer matches what was committed (a flipped bit, a truncated or
    /// edited file): never read as data.
    #[error("{}: damaged: {message}", path.display())]
    Integrity { path: PathBuf, message: String },
    /// Another writer changed the same table at the same time; nothing of this write was
    /// committed.
    #[error("concurrent write: {0}")]
    Conflict(String),
    /// The archive's table format failed outside Candor's checks.
    #[error("archive: {0}")]
    Archive(String),
    /// The system Candor runs on refused or failed something that is not a file: a thread, an
    /// async runtime, a signal handler, a socket, standard input or output, a helper program.
    #[error("{context}: {message}")]
    System { context: String, message: String },
    /// An invariant broke.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn input(location: Location, message: impl Into<String>) -> Self {
        Error::Input { location, message: message.into() }
    }
    pub fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config { key: key.into(), message: message.into() }
    }
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io { path: path.as_ref().to_path_buf(), source }
    }
    pub fn schema(stream: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Schema { stream: stream.into(), message: message.into() }
    }
    pub fn backend(backend: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Backend { backend: backend.into(), message: message.into(), transient: false }
    }
    /// A backend that could not be reached, or kept failing in ways that pass: running the
    /// same command again later may succeed ([`Error::transient`]).
    pub fn unavailable(backend: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Backend { backend: backend.into(), message: message.into(), transient: true }
    }
    pub fn arrow(context: impl Into<String>, source: arrow::error::ArrowError) -> Self {
        Error::Arrow { context: context.into(), source }
    }
    pub fn integrity(path: impl AsRef<Path>, message: impl Into<String>) -> Self {
        Error::Integrity { path: path.as_ref().to_path_buf(), message: message.into() }
    }
    pub fn system(context: impl Into<String>, message: impl fmt::Display) -> Self {
        Error::System { context: context.into(), message: message.to_string() }
    }

    /// Who should act on this error.
    pub fn kind(&self) -> Domain {
        match self {
            Error::Dataflow(errors) => StageError::domain_of(errors),
            Error::Input { .. } | Error::Config { .. } | Error::Schema { .. } => Domain::User,
            Error::Io { .. }
            | Error::Arrow { .. }
            | Error::Backend { .. }
            | Error::Model { .. }
            | Error::Conflict(_)
            | Error::Archive(_)
            | Error::System { .. } => Domain::External,
            Error::Integrity { .. } => Domain::Data,
            Error::Internal(_) => Domain::Internal,
        }
    }

    /// Whether the failure is transient, so that running the same command again later may
    /// succeed (see [`RETRY_HINT`]): a backend that could not be reached, or stages that all
    /// failed that way.
    pub fn transient(&self) -> bool {
        match self {
            Error::Backend { transient, .. } => *transient,
            Error::Dataflow(errors) => !errors.is_empty() && errors.iter().all(|e| e.transient),
            _ => false,
        }
    }

    /// The retry hint for a [`transient`](Error::transient) error, else `None`.
    pub fn retry_hint(&self) -> Option<&'static str> {
        self.transient().then_some(RETRY_HINT)
    }
}

/// What to do about a transient error. Commands resume: `candor run` skips the checkpoints
/// the archive holds complete and takes every answer already in the generation store from
/// there; `candor stream` continues from the offsets its state committed.
pub const RETRY_HINT: &str =
    "retry: this failure looks transient; run the same command again later, and it resumes where it stopped";

/// An error a dataflow stage hit, as it travels on an edge (and between processes, so it is
/// plain data): the text, who should act on it and whether it is transient. The archive sink
/// gathers them, and [`Error::Dataflow`] reports them with their domain.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StageError {
    pub domain: Domain,
    pub message: String,
    pub transient: bool,
}

impl StageError {
    /// `error`, hit by the stage or step `context`.
    pub fn new(context: &str, error: &Error) -> Self {
        StageError { domain: error.kind(), message: format!("{context}: {error}"), transient: error.transient() }
    }

    /// The domain of several errors: who must act for the command to succeed. A bug first,
    /// then damaged data, then the input (retrying cannot fix those); external only when every
    /// error is external, since only then may running again be all it takes.
    pub fn domain_of(errors: &[StageError]) -> Domain {
        [Domain::Internal, Domain::Data, Domain::User, Domain::External]
            .into_iter()
            .find(|d| errors.iter().any(|e| e.domain == *d))
            .unwrap_or(Domain::Internal)
    }
}

impl From<&Error> for StageError {
    fn from(error: &Error) -> Self {
        StageError { domain: error.kind(), message: error.to_string(), transient: error.transient() }
    }
}

impl fmt::Display for StageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// The first five errors, one a line, and how many more there were.
fn dataflow_message(errors: &[StageError]) -> String {
    let mut out = String::from("the dataflow reported errors (nothing was archived for those epochs):");
    for e in errors.iter().take(5) {
        out.push_str("\n  ");
        out.push_str(&e.message);
    }
    if errors.len() > 5 {
        out.push_str(&format!("\n  … and {} more", errors.len() - 5));
    }
    out
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(e: Error) -> StageError {
        StageError::new("generate", &e)
    }

    #[test]
    fn stage_errors_keep_the_domain_and_transience_of_the_error() {
        let down = stage(Error::unavailable("http://127.0.0.1:9", "gave up after 2 attempts"));
        assert_eq!((down.domain, down.transient), (Domain::External, true));
        assert_eq!(down.to_string(), "generate: backend http://127.0.0.1:9: gave up after 2 attempts");
        let refused = stage(Error::backend("http://127.0.0.1:9", "401 Unauthorized"));
        assert_eq!((refused.domain, refused.transient), (Domain::External, false));
        let bad = stage(Error::schema("trial", "column `prompt` is missing"));
        assert_eq!((bad.domain, bad.transient), (Domain::User, false));
        let bug = stage(Error::Internal("epoch 3 has no checkpoint plan".into()));
        assert_eq!(bug.domain, Domain::Internal);
        let json = serde_json::to_string(&down).unwrap();
        assert_eq!(serde_json::from_str::<StageError>(&json).unwrap(), down, "errors cross processes as data");
    }

    #[test]
    fn a_dataflow_error_is_external_and_transient_only_when_every_stage_error_is() {
        let down = || stage(Error::unavailable("kafka", "all brokers down"));
        let outage = Error::Dataflow(vec![down(), down()]);
        assert_eq!(outage.kind(), Domain::External);
        assert!(outage.transient());
        assert_eq!(outage.retry_hint(), Some(RETRY_HINT));

        let refused = Error::Dataflow(vec![down(), stage(Error::backend("m", "401 Unauthorized"))]);
        assert_eq!((refused.kind(), refused.transient()), (Domain::External, false));
        assert_eq!(refused.retry_hint(), None);

        let input = Error::Dataflow(vec![down(), stage(Error::schema("trial", "bad"))]);
        assert_eq!((input.kind(), input.transient()), (Domain::User, false), "retrying cannot fix an input");
        let damaged = Error::Dataflow(vec![stage(Error::schema("trial", "bad")), stage(Error::integrity("f", "x"))]);
        assert_eq!(damaged.kind(), Domain::Data);
        let bug = Error::Dataflow(vec![stage(Error::integrity("f", "x")), stage(Error::Internal("x".into()))]);
        assert_eq!(bug.kind(), Domain::Internal);
    }

    #[test]
    fn the_system_refusing_something_is_external() {
        let e = Error::system("starting the SQL endpoint", std::io::Error::from(std::io::ErrorKind::WouldBlock));
        assert_eq!((e.kind(), e.transient()), (Domain::External, false));
        assert!(e.to_string().starts_with("starting the SQL endpoint: "), "{e}");
    }

    #[test]
    fn a_dataflow_error_shows_five_errors_and_counts_the_rest() {
        let errors = (0..7).map(|i| stage(Error::schema("trial", format!("row {i}")))).collect();
        let text = Error::Dataflow(errors).to_string();
        assert!(text.starts_with("the dataflow reported errors (nothing was archived for those epochs):\n  generate:"));
        assert!(text.contains("row 4") && !text.contains("row 5") && text.ends_with("\n  … and 2 more"), "{text}");
    }
}
