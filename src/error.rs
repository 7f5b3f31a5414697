//! Errors that say where the problem is.
//!
//! Every error Candor reports to a user names the place it came from (a file, a line or row,
//! a field, a config key) and carries a [`Domain`] so that a bad config line, a failing
//! endpoint and a bug are told apart.

use std::fmt;
use std::path::{Path, PathBuf};

/// Who is expected to act on an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    /// A model backend failed (after its retries, where they apply).
    #[error("backend {backend}: {message}")]
    Backend { backend: String, message: String },
    /// Stages of the dataflow reported errors; nothing was archived for the epochs they hit.
    #[error("the dataflow reported errors (nothing was archived for those epochs):\n  {}", .0.join("\n  "))]
    Dataflow(Vec<String>),
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
        Error::Backend { backend: backend.into(), message: message.into() }
    }
    pub fn arrow(context: impl Into<String>, source: arrow::error::ArrowError) -> Self {
        Error::Arrow { context: context.into(), source }
    }
    pub fn integrity(path: impl AsRef<Path>, message: impl Into<String>) -> Self {
        Error::Integrity { path: path.as_ref().to_path_buf(), message: message.into() }
    }

    /// Who should act on this error.
    pub fn kind(&self) -> Domain {
        match self {
            Error::Input { .. } | Error::Config { .. } | Error::Schema { .. } | Error::Dataflow(_) => Domain::User,
            Error::Io { .. }
            | Error::Arrow { .. }
            | Error::Backend { .. }
            | Error::Model { .. }
            | Error::Conflict(_)
            | Error::Archive(_) => Domain::External,
            Error::Integrity { .. } => Domain::Data,
            Error::Internal(_) => Domain::Internal,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
