"""Reads every stream of a Candor archive with pyarrow, polars and DuckDB and prints, as
JSON, the row count and column names each tool sees, so the Rust tests can check that the
archive reads back unchanged outside Candor."""
import json
import pathlib
import sys

import duckdb
import polars as pl
import pyarrow.dataset as ds
import pyarrow.ipc as ipc

root = pathlib.Path(sys.argv[1])
out = {}
for stream_dir in sorted(p for p in root.iterdir() if p.is_dir()):
    stream = stream_dir.name
    parquet = sorted(stream_dir.rglob("part-*.parquet"))
    arrows = sorted(stream_dir.rglob("part-*.arrows"))
    seen = {}
    if parquet:
        t = ds.dataset(str(stream_dir), format="parquet", partitioning="hive").to_table()
        seen["pyarrow"] = {"rows": t.num_rows, "columns": t.schema.names,
                           "metadata": {k.decode(): v.decode() for k, v in (t.schema.metadata or {}).items() if k.startswith(b"candor.")}}
        df = pl.scan_parquet(str(stream_dir / "**" / "*.parquet"), hive_partitioning=True).collect()
        seen["polars"] = {"rows": df.height, "columns": df.columns}
        con = duckdb.connect()
        rel = con.sql(f"SELECT * FROM read_parquet('{stream_dir}/**/*.parquet', hive_partitioning = true)")
        seen["duckdb"] = {"rows": rel.count("*").fetchone()[0], "columns": rel.columns}
    if arrows:
        tables = [ipc.open_stream(str(p)).read_all() for p in arrows]
        seen["pyarrow_ipc"] = {"rows": sum(t.num_rows for t in tables), "columns": tables[0].schema.names}
        frames = [pl.read_ipc_stream(str(p)) for p in arrows]
        seen["polars_ipc"] = {"rows": sum(f.height for f in frames), "columns": frames[0].columns}
    out[stream] = seen
print(json.dumps(out))
