"""Reads every stream of a Candor archive the ways researchers do, and prints, as JSON, the
row count and column names each reader sees, so the Rust tests can check that the archive
reads back unchanged outside Candor: as Delta tables (the `deltalake` package, polars
`read_delta`) and as Hive-partitioned Parquet (pyarrow datasets, polars, DuckDB). With
`--rows STREAM`, prints that stream's rows (as the Delta reader sees them) instead."""
import json
import pathlib
import sys

import duckdb
import polars as pl
import pyarrow.dataset as ds
from deltalake import DeltaTable

root = pathlib.Path(sys.argv[1])
if len(sys.argv) > 3 and sys.argv[2] == "--rows":
    table = DeltaTable(str(root / sys.argv[3])).to_pyarrow_table()
    print(json.dumps(table.to_pylist(), default=str))
    sys.exit(0)
out = {}
for stream_dir in sorted(p for p in root.iterdir() if (p / "_delta_log").is_dir()):
    stream = stream_dir.name
    seen = {}
    t = DeltaTable(str(stream_dir)).to_pyarrow_table()
    seen["delta"] = {"rows": t.num_rows, "columns": t.schema.names}
    df = pl.read_delta(str(stream_dir))
    seen["polars_delta"] = {"rows": df.height, "columns": df.columns}
    if any(stream_dir.rglob("part-*.parquet")):
        t = ds.dataset(str(stream_dir), format="parquet", partitioning="hive").to_table()
        seen["pyarrow"] = {"rows": t.num_rows, "columns": t.schema.names,
                           "metadata": {k.decode(): v.decode() for k, v in (t.schema.metadata or {}).items() if k.startswith(b"candor.")}}
        df = pl.scan_parquet(str(stream_dir / "**" / "*.parquet"), hive_partitioning=True).collect()
        seen["polars"] = {"rows": df.height, "columns": df.columns}
        con = duckdb.connect()
        rel = con.sql(f"SELECT * FROM read_parquet('{stream_dir}/**/*.parquet', hive_partitioning = true)")
        seen["duckdb"] = {"rows": rel.count("*").fetchone()[0], "columns": rel.columns}
    out[stream] = seen
print(json.dumps(out))
