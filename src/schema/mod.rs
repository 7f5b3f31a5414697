//! One Arrow schema per stream, declared once in `schemas/*.json`.
//!
//! The JSON files are compiled into the binary and parsed at start-up; every Rust record type
//! (declared with [`record!`](crate::record)) is checked against its stream's JSON schema by
//! [`validate_all`], so a column added in one place and not the other fails loudly instead of
//! writing archives that disagree with their documentation.
//!
//! ```
//! use candor::schema::{self, Record};
//! use candor::records::Trial;
//! schema::validate_all().unwrap();
//! let schema = schema::arrow_schema(Trial::STREAM).unwrap();
//! assert_eq!(schema.field(0).name(), "trial_key");
//! ```

mod column;

pub use column::Column;

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use serde::Deserialize;

use crate::error::{Error, Result};

/// Metadata key naming the stream a batch or archive file belongs to.
pub const META_STREAM: &str = "candor.stream";
/// Metadata key carrying the stream's schema version.
pub const META_VERSION: &str = "candor.schema_version";

/// The JSON files in `schemas/`, compiled in.
const SOURCES: &[(&str, &str)] = &[
    ("item", include_str!("../../schemas/item.json")),
    ("trial", include_str!("../../schemas/trial.json")),
    ("response", include_str!("../../schemas/response.json")),
    ("verdict", include_str!("../../schemas/verdict.json")),
    ("observation", include_str!("../../schemas/observation.json")),
    ("generation", include_str!("../../schemas/generation.json")),
    ("warmth", include_str!("../../schemas/warmth.json")),
    ("checkpoint", include_str!("../../schemas/checkpoint.json")),
];

/// A stream's declaration as written in `schemas/<stream>.json`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSchema {
    pub stream: String,
    pub version: u32,
    pub doc: String,
    /// Columns that identify a record; archives and sinks deduplicate on them.
    pub key: Vec<String>,
    pub fields: Vec<FieldSpec>,
}

/// One column of a stream.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldSpec {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: String,
    pub nullable: bool,
    pub doc: String,
}

/// Parses a type name used in the JSON schemas.
pub fn parse_type(name: &str) -> Option<DataType> {
    Some(match name {
        "utf8" => DataType::Utf8,
        "bool" => DataType::Boolean,
        "uint32" => DataType::UInt32,
        "uint64" => DataType::UInt64,
        "int64" => DataType::Int64,
        "float64" => DataType::Float64,
        "list<utf8>" => DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
        _ => return None,
    })
}

impl StreamSchema {
    /// Parses and checks one schema file's text.
    pub fn parse(stream: &str, text: &str) -> Result<Self> {
        let parsed: StreamSchema =
            serde_json::from_str(text).map_err(|e| Error::schema(stream, format!("schemas/{stream}.json: {e}")))?;
        if parsed.stream != stream {
            return Err(Error::schema(stream, format!("schemas/{stream}.json declares stream `{}`", parsed.stream)));
        }
        let mut seen = std::collections::HashSet::new();
        for f in &parsed.fields {
            if parse_type(&f.ty).is_none() {
                return Err(Error::schema(stream, format!("field `{}` has unknown type `{}`", f.name, f.ty)));
            }
            if !seen.insert(f.name.as_str()) {
                return Err(Error::schema(stream, format!("field `{}` is declared twice", f.name)));
            }
        }
        for k in &parsed.key {
            if !seen.contains(k.as_str()) {
                return Err(Error::schema(stream, format!("key column `{k}` is not a field")));
            }
        }
        Ok(parsed)
    }

    /// The Arrow schema, with the stream name and version as metadata.
    pub fn to_arrow(&self) -> Schema {
        let fields: Vec<Field> = self
            .fields
            .iter()
            .map(|f| Field::new(&f.name, parse_type(&f.ty).expect("checked in parse"), f.nullable))
            .collect();
        let metadata =
            [(META_STREAM.to_string(), self.stream.clone()), (META_VERSION.to_string(), self.version.to_string())];
        Schema::new(fields).with_metadata(metadata.into_iter().collect())
    }
}

struct Registry {
    streams: BTreeMap<String, (StreamSchema, SchemaRef)>,
}

fn registry() -> Result<&'static Registry> {
    static REGISTRY: OnceLock<std::result::Result<Registry, String>> = OnceLock::new();
    REGISTRY
        .get_or_init(|| {
            let mut streams = BTreeMap::new();
            for (name, text) in SOURCES {
                let s = StreamSchema::parse(name, text).map_err(|e| e.to_string())?;
                let arrow = Arc::new(s.to_arrow());
                streams.insert(name.to_string(), (s, arrow));
            }
            Ok(Registry { streams })
        })
        .as_ref()
        .map_err(|e| Error::Internal(e.clone()))
}

/// Names of every declared stream.
pub fn streams() -> Result<Vec<String>> {
    Ok(registry()?.streams.keys().cloned().collect())
}

/// The declaration of `stream`.
pub fn stream_schema(stream: &str) -> Result<&'static StreamSchema> {
    registry()?.streams.get(stream).map(|(s, _)| s).ok_or_else(|| Error::schema(stream, "no such stream in schemas/"))
}

/// The Arrow schema of `stream`.
pub fn arrow_schema(stream: &str) -> Result<SchemaRef> {
    registry()?
        .streams
        .get(stream)
        .map(|(_, a)| a.clone())
        .ok_or_else(|| Error::schema(stream, "no such stream in schemas/"))
}

/// A Rust type whose values are rows of one stream.
pub trait Record: Sized {
    /// The stream name, as in `schemas/<STREAM>.json`.
    const STREAM: &'static str;
    /// The columns the Rust type writes, in order.
    fn fields() -> Vec<Field>;
    /// Rows to a batch with the stream's schema.
    fn to_batch(rows: &[Self]) -> Result<RecordBatch>;
    /// A batch of this stream (columns looked up by name) back to rows.
    fn from_batch(batch: &RecordBatch) -> Result<Vec<Self>>;
}

/// Checks that a record type writes exactly the columns its JSON schema declares.
pub fn validate<R: Record>() -> Result<()> {
    let declared = arrow_schema(R::STREAM)?;
    let written = R::fields();
    if declared.fields().len() != written.len() {
        return Err(Error::schema(
            R::STREAM,
            format!(
                "schemas/{}.json declares {} columns, the Rust type writes {}",
                R::STREAM,
                declared.fields().len(),
                written.len()
            ),
        ));
    }
    for (d, w) in declared.fields().iter().zip(&written) {
        if d.name() != w.name() || d.data_type() != w.data_type() || d.is_nullable() != w.is_nullable() {
            return Err(Error::schema(
                R::STREAM,
                format!(
                    "column mismatch: schemas/{}.json has `{}` {:?} nullable={}, the Rust type writes `{}` {:?} nullable={}",
                    R::STREAM,
                    d.name(),
                    d.data_type(),
                    d.is_nullable(),
                    w.name(),
                    w.data_type(),
                    w.is_nullable()
                ),
            ));
        }
    }
    Ok(())
}

/// Parses every schema file and checks every record type against it. Called at start-up.
pub fn validate_all() -> Result<()> {
    use crate::records::*;
    validate::<Item>()?;
    validate::<Trial>()?;
    validate::<Response>()?;
    validate::<Verdict>()?;
    validate::<Observation>()?;
    validate::<StoredGeneration>()?;
    validate::<WarmthScore>()?;
    validate::<CheckpointEntry>()?;
    Ok(())
}

/// Checks that a batch read from outside carries `stream`'s columns with the right types.
/// Extra columns are allowed (later versions may add some); missing or retyped ones are not.
pub fn check_batch(stream: &str, batch: &RecordBatch) -> Result<()> {
    let declared = arrow_schema(stream)?;
    for f in declared.fields() {
        match batch.schema().field_with_name(f.name()) {
            Ok(got) if got.data_type() == f.data_type() => {}
            Ok(got) => {
                return Err(Error::schema(
                    stream,
                    format!("column `{}` is {:?}, expected {:?}", f.name(), got.data_type(), f.data_type()),
                ));
            }
            Err(_) => {
                return Err(Error::schema(stream, format!("column `{}` is missing", f.name())));
            }
        }
    }
    Ok(())
}

/// Declares a record struct and its [`Record`] implementation from one field list.
#[macro_export]
macro_rules! record {
    ($(#[$meta:meta])* pub struct $name:ident in $stream:literal {
        $( $(#[$fmeta:meta])* pub $field:ident : $ty:ty ),* $(,)?
    }) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
        pub struct $name { $( $(#[$fmeta])* pub $field: $ty ),* }

        impl $crate::schema::Record for $name {
            const STREAM: &'static str = $stream;
            fn fields() -> Vec<arrow::datatypes::Field> {
                vec![$( arrow::datatypes::Field::new(
                    stringify!($field),
                    <$ty as $crate::schema::Column>::data_type(),
                    <$ty as $crate::schema::Column>::NULLABLE,
                ) ),*]
            }
            fn to_batch(rows: &[Self]) -> $crate::error::Result<arrow::record_batch::RecordBatch> {
                let schema = $crate::schema::arrow_schema(Self::STREAM)?;
                let columns = vec![$( <$ty as $crate::schema::Column>::build(rows.iter().map(|r| &r.$field)) ),*];
                arrow::record_batch::RecordBatch::try_new(schema, columns)
                    .map_err(|e| $crate::error::Error::arrow(concat!("building a ", $stream, " batch"), e))
            }
            fn from_batch(batch: &arrow::record_batch::RecordBatch) -> $crate::error::Result<Vec<Self>> {
                $(
                    let column = batch.column_by_name(stringify!($field)).ok_or_else(|| {
                        $crate::error::Error::schema($stream, concat!("column `", stringify!($field), "` is missing"))
                    })?;
                    let mut $field = <$ty as $crate::schema::Column>::read_column(column)
                        .map_err(|m| $crate::error::Error::schema($stream, format!("column `{}`: {m}", stringify!($field))))?
                        .into_iter();
                )*
                Ok((0..batch.num_rows())
                    .map(|_| $name { $( $field: $field.next().expect("column length equals batch length") ),* })
                    .collect())
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{Item, Observation};

    #[test]
    fn every_record_type_matches_its_json_schema() {
        validate_all().unwrap();
        assert_eq!(
            streams().unwrap(),
            ["checkpoint", "generation", "item", "observation", "response", "trial", "verdict", "warmth"]
        );
    }

    #[test]
    fn records_round_trip_through_batches() {
        let items = vec![Item {
            dataset: "trivia".into(),
            item_key: "q1".into(),
            source_row: 2,
            question: "Which city?".into(),
            question_converted: None,
            correct_answer: Some("Paris".into()),
            correct_answers: vec!["Paris".into(), "paris".into()],
            incorrect_answer: None,
            incorrect_answers: vec![],
            options: vec![],
            answer_letter: None,
            ground_truth: None,
            ground_false: None,
            proposition: None,
            category: Some("geo".into()),
        }];
        let batch = Item::to_batch(&items).unwrap();
        assert_eq!(batch.schema().metadata().get(META_STREAM).unwrap(), "item");
        assert_eq!(Item::from_batch(&batch).unwrap(), items);
        let obs = vec![Observation {
            response_key: "r".into(),
            model: "m".into(),
            checkpoint: "c".into(),
            checkpoint_epoch: 3,
            is_finetuned: true,
            dataset: "disinfo".into(),
            item_key: "i".into(),
            amendment_type: "emotion:sad".into(),
            amendment_group: "emotion".into(),
            prompt_type: "incorrect".into(),
            sample_index: 0,
            refusal: false,
            verdict: "INCORRECT".into(),
            correct: None,
        }];
        assert_eq!(Observation::from_batch(&Observation::to_batch(&obs).unwrap()).unwrap(), obs);
    }

    #[test]
    fn a_batch_missing_a_column_is_rejected_by_name() {
        let batch = Item::to_batch(&[]).unwrap();
        let err = check_batch("trial", &batch).unwrap_err().to_string();
        assert!(err.contains("trial_key") && err.contains("missing"), "{err}");
    }
}
