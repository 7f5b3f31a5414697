//! `candor schema`: the declared schema of every stream (or one).

use anyhow::Result;

use candor::schema::{self, StreamSchema};

use super::Report;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A stream name: item, trial, response, verdict, observation.
    stream: Option<String>,
}

pub fn run(args: Args) -> Result<SchemaReport> {
    let names = match args.stream {
        Some(s) => vec![s],
        None => schema::streams()?,
    };
    let schemas = names.iter().map(|name| schema::stream_schema(name)).collect::<Result<_, _>>()?;
    Ok(SchemaReport { schemas })
}

/// Each stream's version, key and columns.
pub struct SchemaReport {
    schemas: Vec<&'static StreamSchema>,
}

impl Report for SchemaReport {
    fn table(&self) -> Result<()> {
        for s in &self.schemas {
            println!("{} (v{}): {}\n  key: {}", s.stream, s.version, s.doc, s.key.join(", "));
            for f in &s.fields {
                println!("  {:<20} {:<11} {:<9} {}", f.name, f.ty, if f.nullable { "nullable" } else { "" }, f.doc);
            }
            println!();
        }
        Ok(())
    }

    fn json(&self) -> Result<()> {
        for s in &self.schemas {
            println!(
                "{}",
                serde_json::json!({"stream": s.stream, "version": s.version, "key": s.key,
                "fields": s.fields.iter().map(|f| serde_json::json!({"name": f.name, "type": f.ty, "nullable": f.nullable})).collect::<Vec<_>>()})
            );
        }
        Ok(())
    }
}
