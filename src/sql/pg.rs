//! The PostgreSQL wire protocol over a [`LiveSql`] catalog, so `psql`, DBeaver or Grafana can
//! query the live tables and statistics.
//!
//! - Simple and extended query protocol (statements without `$n` parameters); results in text
//!   or binary format as the client asks.
//! - Read-only: INSERT, UPDATE, DELETE, CREATE, COPY, … fail with SQLSTATE 25006
//!   (read_only_sql_transaction); SET, BEGIN, COMMIT and the like are acknowledged and ignored.
//! - Authentication: none on a loopback address unless a password is given; a password (MD5,
//!   any user name) is required on any other address ([`PgAuth::check`]).
//! - Every statement sees the archive's committed epochs at that moment ([`LiveSql::query`]).
//!
//! ```no_run
//! use std::sync::Arc;
//! use candor::sql::live::LiveSql;
//! use candor::sql::pg::{PgAuth, spawn_pg};
//! let live = Arc::new(LiveSql::open("runs/study").unwrap());
//! let server = spawn_pg(live, "127.0.0.1:5433".parse().unwrap(), PgAuth::from_env()).unwrap();
//! println!("psql -h 127.0.0.1 -p {} -c 'SELECT * FROM family_table'", server.addr.port());
//! ```

use std::fmt::Debug;
use std::net::SocketAddr;
use std::sync::Arc;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Schema};
use arrow::util::display::{ArrayFormatter, FormatOptions as ArrowFormat};
use async_trait::async_trait;
use futures::stream;
use pgwire::api::auth::md5pass::{Md5PasswordAuthStartupHandler, hash_md5_password};
use pgwire::api::auth::noop::NoopStartupHandler;
use pgwire::api::auth::{AuthSource, DefaultServerParameterProvider, LoginInfo, Password, StartupHandler};
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{
    DataRowEncoder, DescribePortalResponse, DescribeStatementResponse, FieldInfo, QueryResponse, Response, Tag,
};
use pgwire::api::stmt::{NoopQueryParser, StoredStatement};
use pgwire::api::{ClientInfo, PgWireServerHandlers, Type};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::data::DataRow;
use pgwire::types::format::FormatOptions;

use super::live::{LiveSql, QueryError, Rows, Statement, split_statements};
use crate::error::{Error, Result};

/// The environment variable `candor sql --listen` reads the password from.
pub const PASSWORD_ENV: &str = "CANDOR_SQL_PASSWORD";

/// Who may connect.
#[derive(Clone, Debug, Default)]
pub struct PgAuth {
    /// The password every connection must give (MD5 exchange; any user name). `None`: no
    /// authentication, allowed on loopback addresses only.
    pub password: Option<String>,
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

/// A running endpoint: the address it is bound to (the real port when 0 was asked for).
pub struct PgServer {
    pub addr: SocketAddr,
    pub thread: std::thread::JoinHandle<()>,
}

/// Starts the endpoint on a thread of its own (with its own async runtime) and returns once
/// it is listening; for use beside `candor run` or a stream.
pub fn spawn_pg(live: Arc<LiveSql>, addr: SocketAddr, auth: PgAuth) -> Result<PgServer> {
    auth.check(&addr)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("candor-pg")
        .enable_all()
        .build()
        .map_err(|e| Error::Internal(format!("starting the SQL endpoint's runtime: {e}")))?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(addr))
        .map_err(|e| Error::config("listen", format!("cannot listen on {addr}: {e}")))?;
    let bound = listener.local_addr().map_err(|e| Error::Internal(e.to_string()))?;
    let thread = std::thread::Builder::new()
        .name("candor-pg".into())
        .spawn(move || {
            if let Err(e) = runtime.block_on(serve_listener(live, listener, auth)) {
                eprintln!("candor sql endpoint stopped: {e}");
            }
        })
        .map_err(|e| Error::Internal(format!("starting the SQL endpoint: {e}")))?;
    Ok(PgServer { addr: bound, thread })
}

/// Serves the catalog on `addr` until the task is dropped (call inside a tokio runtime).
pub async fn serve_pg(live: Arc<LiveSql>, addr: SocketAddr, auth: PgAuth) -> Result<()> {
    auth.check(&addr)?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::config("listen", format!("cannot listen on {addr}: {e}")))?;
    serve_listener(live, listener, auth).await
}

async fn serve_listener(live: Arc<LiveSql>, listener: tokio::net::TcpListener, auth: PgAuth) -> Result<()> {
    let handler = Arc::new(Handler { live, parser: Arc::new(NoopQueryParser::new()) });
    match auth.password {
        Some(password) => accept_loop(listener, Arc::new(Secured { handler, password })).await,
        None => accept_loop(listener, Arc::new(Open { handler })).await,
    }
}

async fn accept_loop<H: PgWireServerHandlers + Send + Sync>(
    listener: tokio::net::TcpListener,
    handlers: Arc<H>,
) -> Result<()> {
    loop {
        let (socket, _) = listener.accept().await.map_err(|e| Error::Internal(format!("accepting: {e}")))?;
        let handlers = handlers.clone();
        tokio::spawn(async move {
            let _ = pgwire::tokio::process_socket(socket, None, handlers).await;
        });
    }
}

struct Handler {
    live: Arc<LiveSql>,
    parser: Arc<NoopQueryParser>,
}

struct Open {
    handler: Arc<Handler>,
}

struct Secured {
    handler: Arc<Handler>,
    password: String,
}

impl NoopStartupHandler for Handler {}

impl PgWireServerHandlers for Open {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.handler.clone()
    }
    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.handler.clone()
    }
    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        self.handler.clone()
    }
}

struct FixedPassword(String);

impl Debug for FixedPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FixedPassword(<redacted>)")
    }
}

#[async_trait]
impl AuthSource for FixedPassword {
    async fn get_password(&self, login: &LoginInfo) -> PgWireResult<Password> {
        let salt: [u8; 4] = rand::random();
        let hashed = hash_md5_password(login.user().unwrap_or_default(), &self.0, &salt);
        Ok(Password::new(Some(salt.to_vec()), hashed.into_bytes()))
    }
}

impl PgWireServerHandlers for Secured {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.handler.clone()
    }
    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.handler.clone()
    }
    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        Arc::new(Md5PasswordAuthStartupHandler::new(
            Arc::new(FixedPassword(self.password.clone())),
            Arc::new(DefaultServerParameterProvider::default()),
        ))
    }
}

fn user_error(e: QueryError) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new("ERROR".into(), e.sqlstate().into(), e.to_string())))
}

/// Runs a blocking catalog call off the async workers (the catalog has its own runtime).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::result::Result<T, QueryError> + Send + 'static,
) -> PgWireResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| user_error(QueryError::Execution(format!("query task failed: {e}"))))?
        .map_err(user_error)
}

impl Handler {
    async fn run(&self, sql: String, format: &Format) -> PgWireResult<Response> {
        match Statement::classify(&sql) {
            Statement::Write(kw) => Err(user_error(QueryError::ReadOnly(kw))),
            Statement::Session(kw) => {
                let tag = Tag::new(Statement::session_tag(&kw));
                Ok(match kw.as_str() {
                    "BEGIN" | "START" => Response::TransactionStart(tag),
                    "COMMIT" | "END" | "ROLLBACK" => Response::TransactionEnd(tag),
                    _ => Response::Execution(tag),
                })
            }
            Statement::Empty => Ok(Response::EmptyQuery),
            Statement::Query(sql) => {
                let live = self.live.clone();
                let rows = blocking(move || live.query(&sql)).await?;
                encode(rows, format)
            }
        }
    }
}

#[async_trait]
impl SimpleQueryHandler for Handler {
    async fn do_query<C>(&self, _client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let mut out = Vec::new();
        for sql in split_statements(query) {
            out.push(self.run(sql, &Format::UnifiedText).await?);
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

    async fn do_query<C>(&self, _client: &mut C, portal: &Portal<String>, _max_rows: usize) -> PgWireResult<Response>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        if !portal.parameters.is_empty() {
            return Err(user_error(QueryError::Plan("statements with $n parameters are not supported".into())));
        }
        self.run(portal.statement.statement.clone(), &portal.result_column_format).await
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
            Statement::Query(sql) => {
                let live = self.live.clone();
                let schema = blocking(move || live.describe(&sql)).await?;
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

fn encode(rows: Rows, format: &Format) -> PgWireResult<Response> {
    use arrow::datatypes::{Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, UInt64Type};
    let fields = Arc::new(fields(&rows.schema, format));
    let opts = FormatOptions::default();
    let display = ArrowFormat::default().with_null("");
    let mut out: Vec<PgWireResult<DataRow>> = Vec::with_capacity(rows.num_rows());
    let mut encoder = DataRowEncoder::new(fields.clone());
    for batch in &rows.batches {
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
                    _ => encoder.encode_field_with_type_and_format(
                        &formatters[i].value(row).to_string(),
                        &ty,
                        ff,
                        &opts,
                    )?,
                }
            }
            out.push(Ok(encoder.take_row()));
        }
    }
    Ok(Response::Query(QueryResponse::new(fields, stream::iter(out))))
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
    }
}
