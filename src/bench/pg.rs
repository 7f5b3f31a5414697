//! `candor bench pg`: statements per second through the PostgreSQL endpoint from several
//! tokio-postgres clients, over an archive of synthetic observations.

use std::path::Path;
use std::time::Instant;

use candor::error::{Error, Result};
use candor::sql::synthetic::synthetic;

/// `candor bench pg`: statements per second through the PostgreSQL endpoint, `clients`
/// tokio-postgres connections each running `sql` back to back for `seconds`, over an archive
/// of `rows` synthetic observations (the paper's scale by default).
pub fn run(dir: Option<&Path>, rows: usize, clients: usize, seconds: f64, sql: &str, json: bool) -> Result<()> {
    use std::sync::Arc;
    let tmp = tempfile::tempdir().map_err(|e| Error::system("a temporary directory", e))?;
    let root = dir.map(Path::to_path_buf).unwrap_or_else(|| tmp.path().join("archive"));
    {
        // Synthetic observations of many models and checkpoints, as one epoch outside any
        // checkpoint's partition.
        let archive = candor::archive::Archive::open_writer(&root, "bench")?;
        let parts: Vec<(String, candor::archive::Partition, arrow::array::RecordBatch)> = synthetic(rows, 7, 1)?
            .into_iter()
            .map(|b| ("observation".to_string(), candor::archive::Partition::All, b))
            .collect();
        for (stream, partition, batch) in &parts {
            archive.append_epoch(stream, partition, 1, std::slice::from_ref(batch))?;
        }
        archive.commit_epoch(1, &serde_json::json!({}))?;
    }
    let start = Instant::now();
    let live = Arc::new(candor::sql::live::LiveSql::open(&root)?);
    let load = start.elapsed().as_secs_f64();
    let server = candor::sql::pg::spawn_pg(
        live,
        "127.0.0.1:0".parse().expect("an address"),
        candor::sql::pg::PgOptions::default(),
    )?;
    let config = format!("host=127.0.0.1 port={} user=bench dbname=candor", server.addr.port());
    let (count, rows_per, mut latencies, elapsed) = candor::runtime::block_on(async {
        let mut connections = Vec::new();
        for _ in 0..clients.max(1) {
            let (client, conn) = tokio_postgres::connect(&config, tokio_postgres::NoTls)
                .await
                .map_err(|e| Error::system("connecting to the endpoint", e))?;
            tokio::spawn(conn);
            connections.push(client);
        }
        // Warm-up: the first statement plans the views.
        let first = connections[0].simple_query(sql).await.map_err(|e| Error::Internal(e.to_string()))?;
        let rows_per = first.iter().filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_))).count();
        let until = Instant::now() + std::time::Duration::from_secs_f64(seconds);
        let started = Instant::now();
        let tasks: Vec<_> = connections
            .into_iter()
            .map(|client| {
                let sql = sql.to_string();
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    while Instant::now() < until {
                        let t = Instant::now();
                        client.simple_query(&sql).await.map_err(|e| Error::Internal(e.to_string()))?;
                        latencies.push(t.elapsed().as_secs_f64() * 1e3);
                    }
                    Ok::<_, Error>(latencies)
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.map_err(|e| Error::Internal(e.to_string()))??);
        }
        let elapsed = started.elapsed().as_secs_f64();
        Ok::<_, Error>((all.len(), rows_per, all, elapsed))
    })?;
    server.stop();
    latencies.sort_by(f64::total_cmp);
    let q =
        |p: f64| latencies.get(((latencies.len().max(1) - 1) as f64 * p).round() as usize).copied().unwrap_or(f64::NAN);
    let figures = serde_json::json!({
        "bench": "pg", "sql": sql, "clients": clients, "observations": rows, "load_secs": load,
        "rows_per_statement": rows_per, "statements": count, "seconds": elapsed,
        "statements_per_sec": count as f64 / elapsed, "p50_ms": q(0.5), "p99_ms": q(0.99),
    });
    if json {
        println!("{figures}");
    } else {
        println!(
            "`{sql}` ({rows_per} rows) over {rows} observations (loaded in {load:.1} s), {clients} clients: {:.0} statements/s, p50 {:.1} ms, p99 {:.1} ms",
            count as f64 / elapsed,
            q(0.5),
            q(0.99)
        );
    }
    Ok(())
}
