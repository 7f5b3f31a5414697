//! `candor sql`: statements against a [`LiveSql`] catalog from `-c`, `-f` or standard input,
//! printed as tables, CSV or JSON lines.
//!
//! Interactive use reads statements ending in `;` (over several lines if needed); `\dt` lists
//! the tables, `\q` quits. Every statement sees the archive as it is at that moment.

use std::io::{BufRead, Write};

use arrow::array::RecordBatch;

use super::live::{LiveSql, QueryError, Rows, Statement, split_statements};
use crate::error::{Error, Location, Result};

/// How results are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Csv,
    Json,
}

/// Prints one result.
pub fn print_rows(rows: &Rows, out: Output, w: &mut impl Write) -> Result<()> {
    let io = |e: std::io::Error| Error::system("writing results", e);
    let batches: Vec<RecordBatch> = rows.batches.iter().filter(|b| b.num_rows() > 0).cloned().collect();
    match out {
        Output::Table => {
            let shown = if batches.is_empty() { vec![RecordBatch::new_empty(rows.schema.clone())] } else { batches };
            let table = arrow::util::pretty::pretty_format_batches(&shown).map_err(|e| Error::arrow("results", e))?;
            writeln!(w, "{table}").map_err(io)?;
            let n = rows.num_rows();
            writeln!(w, "({n} row{})", if n == 1 { "" } else { "s" }).map_err(io)?;
        }
        Output::Csv => {
            let mut cw = arrow::csv::WriterBuilder::new().with_header(true).build(&mut *w);
            if batches.is_empty() {
                cw.write(&RecordBatch::new_empty(rows.schema.clone())).map_err(|e| Error::arrow("results", e))?;
            }
            for b in &batches {
                cw.write(b).map_err(|e| Error::arrow("results", e))?;
            }
        }
        Output::Json => {
            let mut jw = arrow::json::LineDelimitedWriter::new(&mut *w);
            for b in &batches {
                jw.write(b).map_err(|e| Error::arrow("results", e))?;
            }
            jw.finish().map_err(|e| Error::arrow("results", e))?;
        }
    }
    Ok(())
}

/// Runs every statement of a script; stops at the first error. `source` names the script in
/// errors (`-c`, a file name).
pub fn run_script(live: &LiveSql, script: &str, out: Output, source: &str) -> Result<()> {
    let stdout = std::io::stdout();
    for sql in split_statements(script) {
        run_one(live, &sql, out, &mut stdout.lock(), source)?;
    }
    Ok(())
}

fn run_one(live: &LiveSql, sql: &str, out: Output, w: &mut impl Write, source: &str) -> Result<()> {
    if let Statement::Session(kw) = Statement::classify(sql) {
        if out == Output::Table {
            writeln!(w, "{}", Statement::session_tag(&kw)).ok();
        }
        return Ok(());
    }
    let rows = live.query(sql).map_err(|e| query_error(source, sql, e))?;
    print_rows(&rows, out, w)
}

fn query_error(source: &str, sql: &str, e: QueryError) -> Error {
    let first = sql.lines().next().unwrap_or_default();
    Error::input(crate::error::Location::file(source), format!("{e} (SQLSTATE {}) in `{first}`", e.sqlstate()))
}

/// Reads statements from standard input until end of input or `\q`; errors are printed and
/// the shell goes on.
pub fn interactive(live: &LiveSql, out: Output, prompt: bool) -> Result<()> {
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    let mut buf = String::new();
    let show_prompt = |buf: &str| {
        if prompt {
            print!("{}", if buf.trim().is_empty() { "candor> " } else { "   ...> " });
            std::io::stdout().flush().ok();
        }
    };
    if prompt {
        println!(
            "candor sql on {}: end statements with `;`, \\dt lists tables, \\q quits",
            live.archive().root().display()
        );
    }
    show_prompt(&buf);
    for line in stdin.lock().lines() {
        let line = line.map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => Error::input(Location::file("standard input"), e.to_string()),
            _ => Error::system("reading standard input", e),
        })?;
        let trimmed = line.trim();
        if buf.trim().is_empty() && trimmed.starts_with('\\') {
            match trimmed {
                "\\q" | "\\quit" => return Ok(()),
                "\\dt" | "\\d" => {
                    for t in live.tables() {
                        println!("{t}");
                    }
                }
                other => eprintln!("unknown command {other} (\\dt lists tables, \\q quits)"),
            }
            show_prompt(&buf);
            continue;
        }
        buf.push_str(&line);
        buf.push('\n');
        if trimmed.ends_with(';') {
            for sql in split_statements(&buf) {
                if let Err(e) = run_one(live, &sql, out, &mut stdout.lock(), "<stdin>") {
                    eprintln!("error: {e}");
                }
            }
            buf.clear();
        }
        show_prompt(&buf);
    }
    for sql in split_statements(&buf) {
        if let Err(e) = run_one(live, &sql, out, &mut stdout.lock(), "<stdin>") {
            eprintln!("error: {e}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Standard output closed under us (a pipe into `head`, say).
    struct Closed;

    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_closed_output_is_external_not_a_bug() {
        let schema = std::sync::Arc::new(arrow::datatypes::Schema::empty());
        let err = print_rows(&Rows::new(schema, Vec::new()), Output::Table, &mut Closed).unwrap_err();
        assert_eq!(err.kind(), crate::error::Domain::External);
        assert!(err.to_string().starts_with("writing results: "), "{err}");
    }
}
