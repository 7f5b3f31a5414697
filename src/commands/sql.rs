//! `candor sql`: query an archive's tables and maintained statistics with SQL, from `-c`, `-f`,
//! standard input or an interactive shell; or serve them over the PostgreSQL wire protocol.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};

use candor::sql::live::{LiveSql, MemoryLimits};
use candor::sql::pg::{PgOptions, TlsFiles};
use candor::sql::shell::{self, Output};

use super::{Globals, parse_bytes_arg};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The archive directory.
    archive: PathBuf,
    /// Statements to run (`;`-separated; repeatable).
    #[arg(short = 'c', long = "command")]
    command: Vec<String>,
    /// A file of `;`-separated statements to run.
    #[arg(short = 'f', long = "file")]
    file: Option<PathBuf>,
    /// How to print results (default: table on a terminal, JSON lines otherwise).
    #[arg(long, value_enum)]
    output: Option<Output>,
    /// Serve the PostgreSQL wire protocol on this address (e.g. 127.0.0.1:5433) until
    /// SIGTERM or Ctrl-C. Any address other than loopback needs a password in
    /// CANDOR_SQL_PASSWORD (when set, it is required on loopback too; checked with
    /// SCRAM-SHA-256).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    #[command(flatten)]
    endpoint: SqlEndpointArgs,
}

/// How `candor sql --listen` serves: TLS, limits and timeouts.
#[derive(clap::Args, Clone, Debug)]
pub struct SqlEndpointArgs {
    /// TLS certificate chain (PEM) to serve with; needs --tls-key.
    #[arg(long, requires = "tls_key", value_name = "PEM")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, requires = "tls_cert", value_name = "PEM")]
    tls_key: Option<PathBuf>,
    /// Connections served at once; more are refused (SQLSTATE 53300).
    #[arg(long, default_value_t = 64)]
    max_connections: usize,
    /// A statement's timeout unless its session sets `statement_timeout` (e.g. 60s, 500ms; 0: none).
    #[arg(long, default_value = "60s", value_parser = parse_duration_arg)]
    statement_timeout: std::time::Duration,
    /// Memory one statement may use, its result included (e.g. 1GiB, 256MiB); over it the
    /// statement fails with SQLSTATE 53200.
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes_arg)]
    query_memory: usize,
    /// Memory all statements together may use.
    #[arg(long, default_value = "4GiB", value_parser = parse_bytes_arg)]
    memory_limit: usize,
}

impl SqlEndpointArgs {
    fn options(&self) -> PgOptions {
        PgOptions {
            tls: self.tls_cert.clone().zip(self.tls_key.clone()).map(|(cert, key)| TlsFiles { cert, key }),
            max_connections: self.max_connections,
            statement_timeout: self.statement_timeout,
            ..PgOptions::from_env()
        }
    }

    fn memory_limits(&self) -> MemoryLimits {
        MemoryLimits { query: self.query_memory, server: self.memory_limit.max(self.query_memory) }
    }
}

fn parse_duration_arg(s: &str) -> std::result::Result<std::time::Duration, String> {
    candor::sql::pg::parse_timeout(s).ok_or_else(|| format!("`{s}` is not a duration (e.g. 60s, 500ms, 2min)"))
}

/// Runs the statements, printing each result as it comes, or serves until SIGTERM or Ctrl-C
/// (the address it listens on printed as soon as it does).
pub fn run(args: Args, g: &Globals) -> Result<()> {
    let Args { archive, command, file, output, listen, endpoint } = args;
    let live = std::sync::Arc::new(LiveSql::open_with(&archive, endpoint.memory_limits())?);
    if let Some(addr) = listen {
        let server = candor::sql::pg::spawn_pg(live, addr, endpoint.options())?;
        if g.json {
            println!("{}", serde_json::json!({"listening": server.addr.to_string()}));
        } else {
            println!("listening on {} (psql -h {} -p {})", server.addr, server.addr.ip(), server.addr.port());
        }
        std::io::stdout().flush().ok();
        server.stop_on_signals()?;
        return Ok(());
    }
    let out = output.unwrap_or(if g.json { Output::Json } else { Output::Table });
    let mut ran = false;
    if let Some(f) = &file {
        let script = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        shell::run_script(&live, &script, out, &f.display().to_string())?;
        ran = true;
    }
    for c in &command {
        shell::run_script(&live, c, out, "-c")?;
        ran = true;
    }
    if !ran {
        shell::interactive(&live, out, std::io::stdin().is_terminal())?;
    }
    Ok(())
}
