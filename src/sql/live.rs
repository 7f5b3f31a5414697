//! Live SQL over an archive: the archive's streams and the maintained statistics as one
//! read-only catalog that follows the archive as epochs commit.
//!
//! Tables of a [`LiveSql`] catalog:
//!
//! | table | rows |
//! |---|---|
//! | `items`, `trials`, `responses`, `verdicts`, … | every committed segment of the archive's streams (any stream with a declared schema, e.g. `warmth` when present) |
//! | `observations` | every committed observation |
//! | `paired_counts`, `cells`, `family_results`, `coefficients`, `effects` | the [`StatsEngine`]'s maintained tables |
//! | `family_table`, `error_rates`, `sycophancy`, `refusals`, `trajectories`, `error_pairs`, `amendment_effects`, `belief_errors`, `discordant_pairs`, … | the queries of `queries/` as views ([`VIEWS`]) |
//!
//! Every statement first checks the archive (one directory listing per stream): when an epoch
//! has committed since the last statement, its new segments are read, the statistics of the
//! families they touch are recomputed ([`ArchiveFollower`]) and the views are rebuilt, so a
//! client sees the statistics change as checkpoints complete. Uncommitted segments stay
//! invisible. Statements that would change anything are refused ([`QueryError::ReadOnly`]).
//!
//! ```
//! use candor::sql::live::LiveSql;
//! let dir = tempfile::tempdir().unwrap();
//! let live = LiveSql::open(dir.path()).unwrap();
//! let rows = live.query("SELECT count(*) AS n FROM family_table").unwrap();
//! assert_eq!(rows.batches[0].num_rows(), 1);
//! assert!(live.query("DROP TABLE cells").is_err());
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::datasource::MemTable;
use datafusion::execution::context::SQLOptions;

use super::engine::StatsEngine;
use super::follow::ArchiveFollower;
use super::queries::{
    AMENDMENT_EFFECTS, ARCHIVE_SUMMARY, BELIEF_ERRORS, CONDITION_ERRORS, DISCORDANT_PAIRS, ERROR_PAIRS, ERROR_RATES,
    FAMILY_STATS, FAMILY_TABLE, Query, REFUSALS, REGRESSION_CELLS, SYCOPHANCY, TRAJECTORIES,
};
use crate::archive::{Archive, Format, read_segment};
use crate::error::{Error, Result};

/// The queries of `queries/` served as views (`paired_counts.sql` is left out: its name is the
/// maintained table's, which it recomputes from `observations`).
pub const VIEWS: [Query; 13] = [
    FAMILY_STATS,
    FAMILY_TABLE,
    ERROR_RATES,
    SYCOPHANCY,
    REFUSALS,
    TRAJECTORIES,
    REGRESSION_CELLS,
    ERROR_PAIRS,
    AMENDMENT_EFFECTS,
    BELIEF_ERRORS,
    CONDITION_ERRORS,
    ARCHIVE_SUMMARY,
    DISCORDANT_PAIRS,
];

/// Directories of an archive root that are not streams served as tables.
const NOT_TABLES: [&str; 3] = ["epochs", "generation", "observation"];

/// Why a statement failed, with the SQLSTATE a PostgreSQL client expects.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The statement would write (INSERT, CREATE, COPY, …): the catalog is read-only.
    #[error("candor's SQL catalog is read-only: {0} is refused")]
    ReadOnly(String),
    /// The statement does not parse or names an unknown table or column.
    #[error("{0}")]
    Plan(String),
    /// The statement failed while running, or the archive could not be read.
    #[error("{0}")]
    Execution(String),
}

impl QueryError {
    /// The SQLSTATE code: 25006 read_only_sql_transaction, 42601 syntax_error, 42P01
    /// undefined_table, 42703 undefined_column, 42000 other planning errors, XX000 otherwise.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            QueryError::ReadOnly(_) => "25006",
            QueryError::Plan(m) if m.contains("ParserError") || m.contains("SQL error") => "42601",
            QueryError::Plan(m) if m.contains("table") && m.contains("not found") => "42P01",
            QueryError::Plan(m) if m.contains("No field named") || m.contains("Schema error") => "42703",
            QueryError::Plan(_) => "42000",
            QueryError::Execution(_) => "XX000",
        }
    }
}

impl From<Error> for QueryError {
    fn from(e: Error) -> Self {
        QueryError::Execution(e.to_string())
    }
}

/// The result of one statement: its columns and rows.
#[derive(Clone, Debug)]
pub struct Rows {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
}

impl Rows {
    pub fn num_rows(&self) -> usize {
        self.batches.iter().map(|b| b.num_rows()).sum()
    }
}

/// One statement of a script, classified before it reaches DataFusion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Statement {
    /// A query (SELECT, WITH, VALUES, EXPLAIN, SHOW, DESCRIBE).
    Query(String),
    /// A session statement a client sends on its own (SET, BEGIN, COMMIT, ROLLBACK, DISCARD…):
    /// acknowledged with its tag and otherwise ignored, so drivers that set options connect.
    Session(String),
    /// A statement that would write: refused.
    Write(String),
    /// Nothing but whitespace and comments.
    Empty,
}

const WRITES: [&str; 17] = [
    "INSERT", "UPDATE", "DELETE", "MERGE", "CREATE", "DROP", "ALTER", "TRUNCATE", "COPY", "GRANT", "REVOKE", "VACUUM",
    "ANALYZE", "COMMENT", "REINDEX", "CLUSTER", "LOCK",
];
const SESSION: [&str; 10] =
    ["SET", "RESET", "BEGIN", "START", "COMMIT", "END", "ROLLBACK", "DISCARD", "DEALLOCATE", "CLOSE"];

impl Statement {
    /// Classifies one statement by its first keyword.
    pub fn classify(sql: &str) -> Statement {
        let body = strip_leading_comments(sql);
        let keyword: String = body.chars().take_while(|c| c.is_ascii_alphabetic()).collect::<String>().to_uppercase();
        if keyword.is_empty() && body.trim().is_empty() {
            Statement::Empty
        } else if WRITES.contains(&keyword.as_str()) {
            Statement::Write(keyword)
        } else if SESSION.contains(&keyword.as_str()) {
            Statement::Session(keyword)
        } else {
            Statement::Query(sql.trim().to_string())
        }
    }

    /// The command tag a session statement is acknowledged with.
    pub fn session_tag(keyword: &str) -> &'static str {
        match keyword {
            "SET" => "SET",
            "RESET" => "RESET",
            "BEGIN" | "START" => "BEGIN",
            "COMMIT" | "END" => "COMMIT",
            "ROLLBACK" => "ROLLBACK",
            "DISCARD" => "DISCARD ALL",
            "DEALLOCATE" => "DEALLOCATE",
            _ => "CLOSE CURSOR",
        }
    }
}

fn strip_leading_comments(sql: &str) -> &str {
    let mut s = sql.trim_start();
    loop {
        if let Some(rest) = s.strip_prefix("--") {
            s = rest.split_once('\n').map(|(_, r)| r).unwrap_or("").trim_start();
        } else if let Some(rest) = s.strip_prefix("/*") {
            s = rest.split_once("*/").map(|(_, r)| r).unwrap_or("").trim_start();
        } else {
            return s;
        }
    }
}

/// Splits a script into statements at `;`, outside quotes and comments. The last statement
/// needs no `;`; empty statements are dropped.
pub fn split_statements(script: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = script.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' => {
                cur.push(c);
                for d in chars.by_ref() {
                    cur.push(d);
                    if d == c {
                        break;
                    }
                }
            }
            '-' if chars.peek() == Some(&'-') => {
                cur.push(c);
                for d in chars.by_ref() {
                    cur.push(d);
                    if d == '\n' {
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'*') => {
                cur.push(c);
                let mut prev = ' ';
                for d in chars.by_ref() {
                    cur.push(d);
                    if prev == '*' && d == '/' {
                        break;
                    }
                    prev = d;
                }
            }
            ';' => {
                if Statement::classify(&cur) != Statement::Empty {
                    out.push(cur.trim().to_string());
                }
                cur.clear();
            }
            _ => cur.push(c),
        }
    }
    if Statement::classify(&cur) != Statement::Empty {
        out.push(cur.trim().to_string());
    }
    out
}

/// A stream's segments read so far.
#[derive(Default)]
struct StreamTable {
    applied: BTreeSet<PathBuf>,
    batches: Vec<RecordBatch>,
}

struct State {
    engine: StatsEngine,
    follower: ArchiveFollower,
    streams: BTreeMap<String, StreamTable>,
    /// Committed epochs and every visible segment at the last sync.
    fingerprint: Option<(BTreeSet<u64>, Vec<PathBuf>)>,
    syncs: u64,
}

/// A read-only SQL catalog over an archive that follows its committed epochs. Shared between
/// threads (`Arc<LiveSql>`): statements run one at a time.
pub struct LiveSql {
    archive: Archive,
    state: Mutex<State>,
}

/// The table name of a stream: `trial` → `trials`; `warmth` and names ending in `s` unchanged.
pub fn table_name(stream: &str) -> String {
    if stream == "warmth" || stream.ends_with('s') { stream.to_string() } else { format!("{stream}s") }
}

impl LiveSql {
    /// Opens an archive (it must exist) and loads what is committed.
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref();
        if !root.is_dir() {
            return Err(Error::input(
                crate::error::Location::file(root),
                "no archive here (create one with `candor trials`, `candor run` or `candor import`)",
            ));
        }
        let archive = Archive::open(root, Format::Parquet)?;
        let live = LiveSql {
            archive,
            state: Mutex::new(State {
                engine: StatsEngine::with_options(true, 8192)?,
                follower: ArchiveFollower::default(),
                streams: BTreeMap::new(),
                fingerprint: None,
                syncs: 0,
            }),
        };
        live.sync()?;
        Ok(live)
    }

    pub fn archive(&self) -> &Archive {
        &self.archive
    }

    /// Streams of the archive served as tables (besides `observations`): every directory with
    /// a declared stream schema.
    fn streams(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let root = self.archive.root();
        for entry in std::fs::read_dir(root).map_err(|e| Error::io(root, e))? {
            let entry = entry.map_err(|e| Error::io(root, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.path().is_dir()
                && !name.starts_with('.')
                && !NOT_TABLES.contains(&name.as_str())
                && crate::schema::stream_schema(&name).is_ok()
            {
                out.push(name);
            }
        }
        for s in ["item", "trial", "response", "verdict"] {
            if !out.iter().any(|o| o == s) {
                out.push(s.to_string());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Brings the catalog up to date with the archive; returns whether anything changed.
    pub fn sync(&self) -> Result<bool> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.sync_locked(&mut st)
    }

    fn sync_locked(&self, st: &mut State) -> Result<bool> {
        let streams = self.streams()?;
        let epochs = self.archive.committed_epochs()?;
        let mut segments: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
        let mut all = Vec::new();
        for s in streams.iter().map(String::as_str).chain(["observation"]) {
            let paths: Vec<PathBuf> = self.archive.segments(s)?.into_iter().map(|seg| seg.path).collect();
            all.extend(paths.iter().cloned());
            segments.insert(s.to_string(), paths);
        }
        let fingerprint = (epochs, all);
        if st.fingerprint.as_ref() == Some(&fingerprint) {
            return Ok(false);
        }
        let ctx = st.engine.context().clone();
        for s in &streams {
            let table = st.streams.entry(s.clone()).or_default();
            let mut changed = st.fingerprint.is_none();
            for path in &segments[s] {
                if table.applied.insert(path.clone()) {
                    table.batches.extend(read_segment(s, path)?);
                    changed = true;
                }
            }
            if changed {
                let schema = crate::schema::arrow_schema(s)?;
                let batches = table
                    .batches
                    .iter()
                    .map(|b| RecordBatch::try_new(schema.clone(), b.columns().to_vec()))
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .map_err(|e| Error::arrow(format!("stream {s}"), e))?;
                register(&ctx, &table_name(s), schema, batches)?;
            }
        }
        st.follower.poll(&self.archive, &mut st.engine)?;
        for q in VIEWS {
            let view = st
                .engine
                .block_on(ctx.sql(q.sql))
                .map_err(|e| Error::Internal(format!("planning the view {}: {e}", q.name)))?
                .into_view();
            ctx.deregister_table(q.name).map_err(|e| Error::Internal(format!("view {}: {e}", q.name)))?;
            ctx.register_table(q.name, view).map_err(|e| Error::Internal(format!("view {}: {e}", q.name)))?;
        }
        st.fingerprint = Some(fingerprint);
        st.syncs += 1;
        Ok(true)
    }

    /// How many times the catalog has changed (loads included).
    pub fn version(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).syncs
    }

    /// Runs one read-only query after bringing the catalog up to date.
    pub fn query(&self, sql: &str) -> std::result::Result<Rows, QueryError> {
        match Statement::classify(sql) {
            Statement::Write(kw) => return Err(QueryError::ReadOnly(kw)),
            Statement::Session(kw) => {
                return Err(QueryError::Plan(format!("{kw} is a session statement, not a query")));
            }
            Statement::Empty => return Err(QueryError::Plan("empty statement".into())),
            Statement::Query(_) => {}
        }
        self.read_only(sql, async |df| {
            let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
            let batches = df.collect().await.map_err(|e| QueryError::Execution(e.to_string()))?;
            Ok(Rows { schema, batches })
        })
    }

    /// The columns a query would return, without running it.
    pub fn describe(&self, sql: &str) -> std::result::Result<SchemaRef, QueryError> {
        if let Statement::Write(kw) = Statement::classify(sql) {
            return Err(QueryError::ReadOnly(kw));
        }
        self.read_only(sql, async |df| Ok(Arc::new(df.schema().as_arrow().clone()) as SchemaRef))
    }

    /// Brings the tables up to date, plans `sql` with DDL, DML and other statements refused,
    /// and hands the plan to `finish`.
    fn read_only<T>(
        &self,
        sql: &str,
        finish: impl AsyncFnOnce(datafusion::dataframe::DataFrame) -> std::result::Result<T, QueryError>,
    ) -> std::result::Result<T, QueryError> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.sync_locked(&mut st)?;
        let ctx = st.engine.context().clone();
        let options = SQLOptions::new().with_allow_ddl(false).with_allow_dml(false).with_allow_statements(false);
        st.engine.block_on(async {
            let df = ctx.sql_with_options(sql, options).await.map_err(|e| classify_df_error(e.to_string()))?;
            finish(df).await
        })
    }

    /// Every table and view of the catalog, sorted.
    pub fn tables(&self) -> Vec<String> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut names: Vec<String> = st
            .engine
            .context()
            .catalog("datafusion")
            .and_then(|c| c.schema("public"))
            .map(|s| s.table_names())
            .unwrap_or_default();
        names.sort();
        names
    }
}

fn classify_df_error(message: String) -> QueryError {
    if message.contains("DDL not supported")
        || message.contains("DML not supported")
        || message.contains("Statement not supported")
    {
        QueryError::ReadOnly(message)
    } else {
        QueryError::Plan(message)
    }
}

fn register(
    ctx: &datafusion::prelude::SessionContext,
    name: &str,
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
) -> Result<()> {
    let table =
        MemTable::try_new(schema, vec![batches]).map_err(|e| Error::Internal(format!("table `{name}`: {e}")))?;
    ctx.deregister_table(name).map_err(|e| Error::Internal(format!("table `{name}`: {e}")))?;
    ctx.register_table(name, Arc::new(table)).map_err(|e| Error::Internal(format!("table `{name}`: {e}")))?;
    Ok(())
}
