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
//! | `warmth_trajectory`, `warmth_by_type` | the warmth queries as views, when the archive holds `warmth` ([`WARMTH_VIEWS`]) |
//!
//! Every statement first checks the archive (one directory listing per stream): when an epoch
//! has committed since the last statement, its new segments are read, the statistics of the
//! families they touch are recomputed ([`ArchiveFollower`]) and a new [`Snapshot`] of the
//! catalog is published, so a client sees the statistics change as checkpoints complete.
//! Uncommitted segments stay invisible. Statements that would change anything are refused
//! ([`QueryError::ReadOnly`]).
//!
//! Snapshot reads: a statement runs on the snapshot published when it started (one consistent
//! set of committed epochs: its tables are immutable), and only the catch-up with the archive
//! is serialised, so statements run concurrently and a long one holds up no other.
//! `information_schema` is on (`SHOW TABLES`), and a small `pg_catalog` ([`super::pg_catalog`])
//! lets psql's `\dt` and GUI table browsers list the tables.
//!
//! Memory: every statement gets a DataFusion memory pool of its own ([`MemoryLimits::query`])
//! drawing on one pool for the whole catalog ([`MemoryLimits::server`]); operators' state and
//! the buffered result count against both, and a statement over either limit fails with
//! [`QueryError::OutOfMemory`] (SQLSTATE 53200) while others go on. Nothing spills to disk.
//!
//! ```
//! use candor::sql::live::LiveSql;
//! let dir = tempfile::tempdir().unwrap();
//! candor::archive::Archive::open_writer(dir.path(), "doc").unwrap(); // an empty archive
//! let live = LiveSql::open(dir.path()).unwrap();
//! let rows = live.query("SELECT count(*) AS n FROM family_table").unwrap();
//! assert_eq!(rows.batches[0].num_rows(), 1);
//! assert!(live.query("DROP TABLE cells").is_err());
//! ```

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::datasource::MemTable;
use datafusion::error::DataFusionError;
use datafusion::execution::context::SQLOptions;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::{
    GreedyMemoryPool, MemoryConsumer, MemoryLimit, MemoryPool, MemoryReservation,
};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::prelude::SessionContext;
use futures::StreamExt;

use super::engine::StatsEngine;
use super::follow::ArchiveFollower;
use super::queries::{
    AMENDMENT_EFFECTS, ARCHIVE_SUMMARY, BELIEF_ERRORS, CONDITION_ERRORS, DISCORDANT_PAIRS, ERROR_PAIRS, ERROR_RATES,
    FAMILY_STATS, FAMILY_TABLE, Query, REFUSALS, REGRESSION_CELLS, SYCOPHANCY, TRAJECTORIES,
    TRAJECTORY_FIRST_SIGNIFICANT, TRAJECTORY_STEPS, WARMTH_BY_TYPE, WARMTH_TRAJECTORY,
};
use crate::archive::Archive;
use crate::error::{Error, Result};

/// The queries of `queries/` served as views (`paired_counts.sql` is left out: its name is the
/// maintained table's, which it recomputes from `observations`).
pub const VIEWS: [Query; 15] = [
    FAMILY_STATS,
    FAMILY_TABLE,
    ERROR_RATES,
    SYCOPHANCY,
    REFUSALS,
    TRAJECTORIES,
    TRAJECTORY_STEPS,
    TRAJECTORY_FIRST_SIGNIFICANT,
    REGRESSION_CELLS,
    ERROR_PAIRS,
    AMENDMENT_EFFECTS,
    BELIEF_ERRORS,
    CONDITION_ERRORS,
    ARCHIVE_SUMMARY,
    DISCORDANT_PAIRS,
];

/// The queries of `queries/` over the `warmth` table, served as views when the archive holds
/// warmth (`candor warmth`, or an experiment with `[warmth]`).
pub const WARMTH_VIEWS: [Query; 2] = [WARMTH_BY_TYPE, WARMTH_TRAJECTORY];

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
    /// The statement needed more memory than its limit or the server's pool had left.
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    /// The statement was stopped: its timeout passed, or its client cancelled it.
    #[error("canceling statement due to {0}")]
    Canceled(String),
}

impl QueryError {
    /// The SQLSTATE code: 25006 read_only_sql_transaction, 42601 syntax_error, 42P01
    /// undefined_table, 42703 undefined_column, 42000 other planning errors, 53200
    /// out_of_memory, 57014 query_canceled, XX000 otherwise.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            QueryError::ReadOnly(_) => "25006",
            QueryError::OutOfMemory(_) => "53200",
            QueryError::Canceled(_) => "57014",
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

impl QueryError {
    /// A DataFusion error while running: out of memory (the pool refused a reservation) or
    /// any other failure.
    fn running(e: DataFusionError) -> Self {
        match e.find_root() {
            DataFusionError::ResourcesExhausted(m) => QueryError::OutOfMemory(m.clone()),
            _ => QueryError::Execution(e.to_string()),
        }
    }
}

/// The result of one statement: its columns and rows.
#[derive(Clone, Debug)]
pub struct Rows {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
    /// The rows' memory, held in the statement's pool until the rows are dropped.
    reservation: Option<Arc<MemoryReservation>>,
}

impl Rows {
    pub fn new(schema: SchemaRef, batches: Vec<RecordBatch>) -> Self {
        Rows { schema, batches, reservation: None }
    }

    /// Bytes the rows hold against the memory limits (0 for rows made outside a statement).
    pub fn reserved(&self) -> usize {
        self.reservation.as_ref().map_or(0, |r| r.size())
    }

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

struct State {
    engine: StatsEngine,
    /// The archive's segments read so far, every stream's (their tables) and the observations
    /// (the engine's input).
    follower: ArchiveFollower,
    /// Committed epochs and every visible segment at the last sync.
    fingerprint: Option<(BTreeSet<u64>, Vec<PathBuf>)>,
    syncs: u64,
    /// When the last look at the archive began.
    looked: Option<std::time::Instant>,
}

/// Memory limits of statements, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryLimits {
    /// What one statement may hold (operators' state and its buffered result).
    pub query: usize,
    /// What all statements together may hold.
    pub server: usize,
}

impl Default for MemoryLimits {
    /// 1 GiB per statement, 4 GiB for the catalog.
    fn default() -> Self {
        MemoryLimits { query: 1 << 30, server: 4 << 30 }
    }
}

/// One statement's memory pool: at most `limit` bytes of its own, drawn from the server's pool.
#[derive(Debug)]
struct StatementPool {
    server: Arc<dyn MemoryPool>,
    limit: usize,
    used: AtomicUsize,
}

impl std::fmt::Display for StatementPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "statement pool ({} of {} bytes in use)", self.used.load(Ordering::Relaxed), self.limit)
    }
}

impl MemoryPool for StatementPool {
    fn name(&self) -> &str {
        "candor-statement"
    }
    fn register(&self, consumer: &MemoryConsumer) {
        self.server.register(consumer)
    }
    fn unregister(&self, consumer: &MemoryConsumer) {
        self.server.unregister(consumer)
    }
    fn grow(&self, reservation: &MemoryReservation, additional: usize) {
        self.server.grow(reservation, additional);
        self.used.fetch_add(additional, Ordering::Relaxed);
    }
    fn shrink(&self, reservation: &MemoryReservation, shrink: usize) {
        self.server.shrink(reservation, shrink);
        self.used.fetch_sub(shrink, Ordering::Relaxed);
    }
    fn try_grow(&self, reservation: &MemoryReservation, additional: usize) -> datafusion::error::Result<()> {
        let before = self.used.fetch_add(additional, Ordering::Relaxed);
        if before + additional > self.limit {
            self.used.fetch_sub(additional, Ordering::Relaxed);
            return Err(DataFusionError::ResourcesExhausted(format!(
                "the statement needs more than its limit of {} MiB ({} for {})",
                self.limit >> 20,
                additional,
                reservation.consumer().name()
            )));
        }
        if let Err(e) = self.server.try_grow(reservation, additional) {
            self.used.fetch_sub(additional, Ordering::Relaxed);
            return Err(match e {
                DataFusionError::ResourcesExhausted(_) => DataFusionError::ResourcesExhausted(format!(
                    "the server's memory limit of {} MiB is in use by other statements",
                    match self.server.memory_limit() {
                        MemoryLimit::Finite(n) => n >> 20,
                        _ => 0,
                    }
                )),
                e => e,
            });
        }
        Ok(())
    }
    fn reserved(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
    fn memory_limit(&self) -> MemoryLimit {
        MemoryLimit::Finite(self.limit)
    }
}

/// The catalog as it was at one sync: immutable tables and views over one consistent set of
/// committed epochs. Statements run on a snapshot without any lock.
pub struct Snapshot {
    ctx: SessionContext,
    /// The sync that made it ([`LiveSql::version`]).
    pub version: u64,
}

/// Statements that would write or change the session are refused while planning.
fn read_only_options() -> SQLOptions {
    SQLOptions::new().with_allow_ddl(false).with_allow_dml(false).with_allow_statements(false)
}

impl Snapshot {
    /// A session over this snapshot whose statements draw memory from `pool`.
    fn session(&self, pool: Arc<dyn MemoryPool>) -> std::result::Result<SessionContext, QueryError> {
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_pool(pool)
            .with_disk_manager_builder(DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled))
            .build_arc()
            .map_err(|e| QueryError::Execution(e.to_string()))?;
        let state = SessionStateBuilder::new_from_existing(self.ctx.state()).with_runtime_env(runtime).build();
        Ok(SessionContext::new_with_state(state))
    }

    async fn plan(
        &self,
        sql: &str,
        pool: Arc<dyn MemoryPool>,
    ) -> std::result::Result<datafusion::dataframe::DataFrame, QueryError> {
        match Statement::classify(sql) {
            Statement::Write(kw) => return Err(QueryError::ReadOnly(kw)),
            Statement::Session(kw) => {
                return Err(QueryError::Plan(format!("{kw} is a session statement, not a query")));
            }
            Statement::Empty => return Err(QueryError::Plan("empty statement".into())),
            Statement::Query(_) => {}
        }
        self.session(pool)?
            .sql_with_options(sql, read_only_options())
            .await
            .map_err(|e| classify_df_error(e.to_string()))
    }

    /// Runs one read-only query; its state and its result count against `pool`.
    async fn query(&self, sql: &str, pool: Arc<dyn MemoryPool>) -> std::result::Result<Rows, QueryError> {
        let df = self.plan(sql, pool.clone()).await?;
        let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        let mut stream = df.execute_stream().await.map_err(QueryError::running)?;
        let reservation = MemoryConsumer::new("query result").register(&pool);
        let mut batches = Vec::new();
        while let Some(batch) = stream.next().await {
            let batch = batch.map_err(QueryError::running)?;
            reservation.try_grow(batch.get_array_memory_size()).map_err(QueryError::running)?;
            batches.push(batch);
        }
        Ok(Rows { schema, batches, reservation: Some(Arc::new(reservation)) })
    }

    /// The columns a query would return, without running it.
    async fn describe(&self, sql: &str, pool: Arc<dyn MemoryPool>) -> std::result::Result<SchemaRef, QueryError> {
        let df = self.plan(sql, pool).await?;
        Ok(Arc::new(df.schema().as_arrow().clone()))
    }

    /// Every table and view, sorted (the `public` schema).
    pub fn tables(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .ctx
            .catalog("datafusion")
            .and_then(|c| c.schema("public"))
            .map(|s| s.table_names())
            .unwrap_or_default();
        names.sort();
        names
    }
}

/// A read-only SQL catalog over an archive that follows its committed epochs. Shared between
/// threads (`Arc<LiveSql>`): catching up with the archive is serialised, statements run
/// concurrently on snapshots ([`Snapshot`]).
pub struct LiveSql {
    archive: Archive,
    state: Mutex<State>,
    current: RwLock<Arc<Snapshot>>,
    server_pool: Arc<dyn MemoryPool>,
    limits: MemoryLimits,
}

/// The table name of a stream: `trial` → `trials`; `warmth` and names ending in `s` unchanged.
pub fn table_name(stream: &str) -> String {
    if stream == "warmth" || stream.ends_with('s') { stream.to_string() } else { format!("{stream}s") }
}

impl LiveSql {
    /// Opens an archive (it must exist) and loads what is committed, with the default
    /// [`MemoryLimits`].
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(root, MemoryLimits::default())
    }

    /// Opens an archive with the given memory limits.
    pub fn open_with(root: impl AsRef<Path>, limits: MemoryLimits) -> Result<Self> {
        let root = root.as_ref();
        if !root.is_dir() {
            return Err(Error::input(
                crate::error::Location::file(root),
                "no archive here (create one with `candor trials`, `candor run` or `candor import`)",
            ));
        }
        let archive = Archive::open(root)?;
        let live = LiveSql {
            archive,
            state: Mutex::new(State {
                engine: StatsEngine::with_options(true, 8192)?,
                follower: ArchiveFollower::default(),
                fingerprint: None,
                syncs: 0,
                looked: None,
            }),
            current: RwLock::new(Arc::new(Snapshot { ctx: SessionContext::new(), version: 0 })),
            server_pool: Arc::new(GreedyMemoryPool::new(limits.server)),
            limits,
        };
        live.sync()?;
        Ok(live)
    }

    pub fn archive(&self) -> &Archive {
        &self.archive
    }

    pub fn limits(&self) -> MemoryLimits {
        self.limits
    }

    /// Bytes held by running statements and the results they are sending.
    pub fn memory_in_use(&self) -> usize {
        self.server_pool.reserved()
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
        let began = std::time::Instant::now();
        let changed = self.sync_locked(&mut st)?;
        st.looked = Some(began);
        Ok(changed)
    }

    /// [`LiveSql::sync`] for a statement that arrived at `arrived`: when another statement's
    /// look at the archive began after that (while this one waited for it), its snapshot
    /// already holds every epoch committed before this statement arrived, and is used as is.
    /// A statement that reads the regressions (`regressions`) gets them refitted first if
    /// observations changed since their last fit.
    fn sync_since(&self, arrived: std::time::Instant, regressions: bool) -> Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.looked.is_none_or(|t| t <= arrived) {
            let began = std::time::Instant::now();
            self.sync_locked(&mut st)?;
            st.looked = Some(began);
        }
        if regressions && st.engine.regressions_stale() {
            st.engine.refit()?;
            st.syncs += 1;
            self.publish(&st)?;
        }
        Ok(())
    }

    fn sync_locked(&self, st: &mut State) -> Result<bool> {
        let streams = self.streams()?;
        // One checked view of the archive for the whole sync.
        let snapshot = self.archive.snapshot()?;
        let epochs = snapshot.committed_epochs();
        let mut all = Vec::new();
        for s in streams.iter().map(String::as_str).chain(["observation"]) {
            all.extend(snapshot.segments(s).into_iter().map(|seg| seg.path));
        }
        let fingerprint = (epochs, all);
        if st.fingerprint.as_ref() == Some(&fingerprint) {
            return Ok(false);
        }
        let ctx = st.engine.context().clone();
        let first = st.fingerprint.is_none();
        for s in &streams {
            if st.follower.follow(&snapshot, s)?.is_empty() && !first {
                continue;
            }
            let schema = crate::schema::arrow_schema(s)?;
            let batches = st
                .follower
                .batches(s)
                .iter()
                .map(|b| RecordBatch::try_new(schema.clone(), b.columns().to_vec()))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| Error::arrow(format!("stream {s}"), e))?;
            register(&ctx, &table_name(s), schema, batches)?;
        }
        st.follower.update(&snapshot, &mut st.engine)?;
        st.fingerprint = Some(fingerprint);
        st.syncs += 1;
        self.publish(st)?;
        Ok(true)
    }

    /// Publishes a snapshot of the catalog as `st` has it: the stream tables and the engine's
    /// tables as they are now (every refresh registers new immutable tables rather than
    /// changing them), the views planned over those, and `pg_catalog`.
    fn publish(&self, st: &State) -> Result<()> {
        let source = st.engine.context();
        let config = source.copied_config().with_information_schema(true);
        let ctx = SessionContext::new_with_config(config);
        super::udf::register(&ctx);
        let public = source
            .catalog("datafusion")
            .and_then(|c| c.schema("public"))
            .ok_or_else(|| Error::Internal("the engine has no public schema".into()))?;
        for name in public.table_names() {
            let table = st
                .engine
                .block_on(public.table(&name))
                .map_err(|e| Error::Internal(format!("table {name}: {e}")))?
                .ok_or_else(|| Error::Internal(format!("table {name} vanished")))?;
            ctx.register_table(name.as_str(), table).map_err(|e| Error::Internal(format!("table {name}: {e}")))?;
        }
        let warmth = ctx.table_exist("warmth").map_err(|e| Error::Internal(format!("table warmth: {e}")))?;
        for q in VIEWS.iter().chain(WARMTH_VIEWS.iter().filter(|_| warmth)) {
            let view = st
                .engine
                .block_on(ctx.sql(q.sql))
                .map_err(|e| Error::Internal(format!("planning the view {}: {e}", q.name)))?
                .into_view();
            ctx.register_table(q.name, view).map_err(|e| Error::Internal(format!("view {}: {e}", q.name)))?;
        }
        st.engine.block_on(super::pg_catalog::register(&ctx))?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(Snapshot { ctx, version: st.syncs });
        Ok(())
    }

    /// How many times the catalog has changed (loads included).
    pub fn version(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).syncs
    }

    /// Brings the catalog up to date with the archive and returns the snapshot a statement
    /// `sql` started now runs on (with the regressions refitted when it reads them, see
    /// [`super::engine::reads_regressions`]). Blocks while the archive is read (call off async
    /// workers).
    pub fn snapshot(&self, sql: &str) -> std::result::Result<Arc<Snapshot>, QueryError> {
        self.sync_since(std::time::Instant::now(), super::engine::reads_regressions(sql))?;
        Ok(self.current.read().unwrap_or_else(|p| p.into_inner()).clone())
    }

    /// A fresh memory pool for one statement.
    pub fn statement_pool(&self) -> Arc<dyn MemoryPool> {
        Arc::new(StatementPool {
            server: self.server_pool.clone(),
            limit: self.limits.query,
            used: AtomicUsize::new(0),
        })
    }

    /// Runs `sql` on `snapshot` on the process's runtime ([`crate::runtime`]; DataFusion's
    /// operators yield between batches, so a statement stopped by its timeout or a cancel
    /// request stops at once): the future to await, from any runtime.
    /// Dropping the handle does not stop the statement: abort it ([`tokio::task::JoinHandle::abort`]).
    pub fn spawn_query(
        &self,
        snapshot: Arc<Snapshot>,
        sql: String,
    ) -> tokio::task::JoinHandle<std::result::Result<Rows, QueryError>> {
        let pool = self.statement_pool();
        crate::runtime::spawn(async move { snapshot.query(&sql, pool).await })
    }

    /// The columns `sql` would return on `snapshot`, planned on the process's runtime.
    pub fn spawn_describe(
        &self,
        snapshot: Arc<Snapshot>,
        sql: String,
    ) -> tokio::task::JoinHandle<std::result::Result<SchemaRef, QueryError>> {
        let pool = self.statement_pool();
        crate::runtime::spawn(async move { snapshot.describe(&sql, pool).await })
    }

    /// Runs one read-only query after bringing the catalog up to date (blocking, from any
    /// thread: [`crate::runtime::block_on`]).
    pub fn query(&self, sql: &str) -> std::result::Result<Rows, QueryError> {
        let snapshot = self.snapshot(sql)?;
        crate::runtime::block_on(snapshot.query(sql, self.statement_pool()))
    }

    /// The columns a query would return, without running it.
    pub fn describe(&self, sql: &str) -> std::result::Result<SchemaRef, QueryError> {
        let snapshot = self.snapshot(sql)?;
        crate::runtime::block_on(snapshot.describe(sql, self.statement_pool()))
    }

    /// Every table and view of the catalog, sorted.
    pub fn tables(&self) -> Vec<String> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).tables()
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
