//! Enough of PostgreSQL's `pg_catalog` for psql's `\dt`/`\dv` and the table browsers of GUI
//! clients to list the catalog's tables and views: `pg_namespace`, `pg_class`, `pg_am`,
//! `pg_database`, and the functions `pg_get_userbyid` and `pg_table_is_visible` (also under
//! their `pg_catalog.` names). Rebuilt with every [`super::live::Snapshot`], so it lists the
//! tables that snapshot has.
//!
//! ```
//! let ctx = datafusion::prelude::SessionContext::new();
//! ctx.register_batch("trials", arrow::array::RecordBatch::new_empty(std::sync::Arc::new(arrow::datatypes::Schema::empty()))).unwrap();
//! futures::executor::block_on(candor::sql::pg_catalog::register(&ctx)).unwrap();
//! let df = futures::executor::block_on(ctx.sql("SELECT relname FROM pg_catalog.pg_class WHERE relkind = 'r'")).unwrap();
//! let rows = futures::executor::block_on(df.collect()).unwrap();
//! assert_eq!(rows[0].num_rows(), 1);
//! ```

use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, Int32Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use datafusion::catalog::{MemorySchemaProvider, SchemaProvider};
use datafusion::common::ScalarValue;
use datafusion::datasource::{MemTable, TableType};
use datafusion::logical_expr::{ColumnarValue, Volatility, create_udf};
use datafusion::prelude::SessionContext;

use crate::error::{Error, Result};

const PG_CATALOG_OID: i32 = 11;
const PUBLIC_OID: i32 = 2200;
const INFORMATION_SCHEMA_OID: i32 = 13000;
/// The owner every table reports (`pg_get_userbyid` names it).
const OWNER_OID: i32 = 10;
const OWNER: &str = "candor";
const HEAP_AM_OID: i32 = 2;

fn err(e: impl std::fmt::Display) -> Error {
    Error::Internal(format!("pg_catalog: {e}"))
}

fn batch(fields: Vec<Field>, columns: Vec<ArrayRef>) -> Result<RecordBatch> {
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).map_err(err)
}

fn strings(v: Vec<&str>) -> ArrayRef {
    Arc::new(StringArray::from(v))
}

fn ints(v: Vec<i32>) -> ArrayRef {
    Arc::new(Int32Array::from(v))
}

/// Registers `pg_catalog` over the tables of `ctx`'s `public` schema (call after they are all
/// registered).
pub async fn register(ctx: &SessionContext) -> Result<()> {
    let catalog = ctx.catalog("datafusion").ok_or_else(|| err("no default catalog"))?;
    let public = catalog.schema("public").ok_or_else(|| err("no public schema"))?;
    let mut names = public.table_names();
    names.sort();
    let mut kinds = Vec::with_capacity(names.len());
    for name in &names {
        let kind = match public.table_type(name).await.map_err(|e| err(format!("{name}: {e}")))? {
            Some(TableType::View) => "v",
            _ => "r",
        };
        kinds.push(kind);
    }
    let schema = Arc::new(MemorySchemaProvider::new());
    catalog.register_schema("pg_catalog", schema.clone()).map_err(err)?;

    let text = |n: &str| Field::new(n, DataType::Utf8, false);
    let int = |n: &str| Field::new(n, DataType::Int32, false);
    let tables = [
        (
            "pg_namespace",
            batch(
                vec![int("oid"), text("nspname"), int("nspowner")],
                vec![
                    ints(vec![PG_CATALOG_OID, PUBLIC_OID, INFORMATION_SCHEMA_OID]),
                    strings(vec!["pg_catalog", "public", "information_schema"]),
                    ints(vec![OWNER_OID; 3]),
                ],
            )?,
        ),
        (
            "pg_class",
            batch(
                vec![
                    int("oid"),
                    text("relname"),
                    int("relnamespace"),
                    text("relkind"),
                    int("relowner"),
                    int("relam"),
                    text("relpersistence"),
                    Field::new("relhasindex", DataType::Boolean, false),
                    Field::new("relispartition", DataType::Boolean, false),
                ],
                vec![
                    ints((0..names.len() as i32).map(|i| 16384 + i).collect()),
                    strings(names.iter().map(String::as_str).collect()),
                    ints(vec![PUBLIC_OID; names.len()]),
                    strings(kinds.clone()),
                    ints(vec![OWNER_OID; names.len()]),
                    ints(kinds.iter().map(|k| if *k == "r" { HEAP_AM_OID } else { 0 }).collect()),
                    strings(vec!["p"; names.len()]),
                    Arc::new(BooleanArray::from(vec![false; names.len()])),
                    Arc::new(BooleanArray::from(vec![false; names.len()])),
                ],
            )?,
        ),
        ("pg_am", batch(vec![int("oid"), text("amname")], vec![ints(vec![HEAP_AM_OID]), strings(vec!["heap"])])?),
        (
            "pg_database",
            batch(
                vec![int("oid"), text("datname"), int("datdba")],
                vec![ints(vec![1]), strings(vec!["candor"]), ints(vec![OWNER_OID])],
            )?,
        ),
    ];
    for (name, rows) in tables {
        let table = MemTable::try_new(rows.schema(), vec![vec![rows]]).map_err(err)?;
        schema.register_table(name.to_string(), Arc::new(table)).map_err(err)?;
    }

    let owner = create_udf(
        "pg_get_userbyid",
        vec![DataType::Int32],
        DataType::Utf8,
        Volatility::Immutable,
        Arc::new(|args: &[ColumnarValue]| {
            Ok(match &args[0] {
                ColumnarValue::Array(a) => ColumnarValue::Array(strings(vec![OWNER; a.len()])),
                ColumnarValue::Scalar(_) => ColumnarValue::Scalar(ScalarValue::Utf8(Some(OWNER.into()))),
            })
        }),
    )
    .with_aliases(["pg_catalog.pg_get_userbyid"]);
    let visible = create_udf(
        "pg_table_is_visible",
        vec![DataType::Int32],
        DataType::Boolean,
        Volatility::Immutable,
        Arc::new(|args: &[ColumnarValue]| {
            Ok(match &args[0] {
                ColumnarValue::Array(a) => ColumnarValue::Array(Arc::new(BooleanArray::from(vec![true; a.len()]))),
                ColumnarValue::Scalar(_) => ColumnarValue::Scalar(ScalarValue::Boolean(Some(true))),
            })
        }),
    )
    .with_aliases(["pg_catalog.pg_table_is_visible"]);
    ctx.register_udf(owner);
    ctx.register_udf(visible);
    Ok(())
}
