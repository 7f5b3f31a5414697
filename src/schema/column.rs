//! Conversion between Rust field types and Arrow columns.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, Float64Array, Int64Array, ListArray, ListBuilder, StringArray, StringBuilder,
    UInt32Array, UInt64Array,
};
use arrow::datatypes::{DataType, Field};

/// A Rust type that is stored as one Arrow column.
pub trait Column: Sized {
    const NULLABLE: bool;
    fn data_type() -> DataType;
    fn build<'a>(values: impl Iterator<Item = &'a Self>) -> ArrayRef
    where
        Self: 'a;
    /// Reads a whole column; the error says which row was wrong.
    fn read_column(array: &ArrayRef) -> Result<Vec<Self>, String>;
}

fn downcast<'a, A: 'static>(array: &'a ArrayRef, what: &str) -> Result<&'a A, String> {
    array.as_any().downcast_ref::<A>().ok_or_else(|| format!("expected {what}, found {:?}", array.data_type()))
}

fn no_nulls(array: &dyn Array) -> Result<(), String> {
    if array.null_count() > 0 {
        let row = (0..array.len()).find(|&i| array.is_null(i)).unwrap_or(0);
        return Err(format!("row {row} is null in a non-nullable column"));
    }
    Ok(())
}

macro_rules! primitive_column {
    ($rust:ty, $arrow:ty, $dt:expr, $what:literal) => {
        impl Column for $rust {
            const NULLABLE: bool = false;
            fn data_type() -> DataType {
                $dt
            }
            fn build<'a>(values: impl Iterator<Item = &'a Self>) -> ArrayRef {
                Arc::new(<$arrow>::from_iter_values(values.copied()))
            }
            fn read_column(array: &ArrayRef) -> Result<Vec<Self>, String> {
                let a = downcast::<$arrow>(array, $what)?;
                no_nulls(a)?;
                Ok(a.values().iter().copied().collect())
            }
        }
        impl Column for Option<$rust> {
            const NULLABLE: bool = true;
            fn data_type() -> DataType {
                $dt
            }
            fn build<'a>(values: impl Iterator<Item = &'a Self>) -> ArrayRef {
                Arc::new(values.copied().collect::<$arrow>())
            }
            fn read_column(array: &ArrayRef) -> Result<Vec<Self>, String> {
                Ok(downcast::<$arrow>(array, $what)?.iter().collect())
            }
        }
    };
}

primitive_column!(u64, UInt64Array, DataType::UInt64, "uint64");
primitive_column!(u32, UInt32Array, DataType::UInt32, "uint32");
primitive_column!(i64, Int64Array, DataType::Int64, "int64");
primitive_column!(f64, Float64Array, DataType::Float64, "float64");

impl Column for bool {
    const NULLABLE: bool = false;
    fn data_type() -> DataType {
        DataType::Boolean
    }
    fn build<'a>(values: impl Iterator<Item = &'a Self>) -> ArrayRef {
        Arc::new(values.map(|v| Some(*v)).collect::<BooleanArray>())
    }
    fn read_column(array: &ArrayRef) -> Result<Vec<Self>, String> {
        let a = downcast::<BooleanArray>(array, "bool")?;
        no_nulls(a)?;
        Ok(a.values().iter().collect())
    }
}

impl Column for Option<bool> {
    const NULLABLE: bool = true;
    fn data_type() -> DataType {
        DataType::Boolean
    }
    fn build<'a>(values: impl Iterator<Item = &'a Self>) -> ArrayRef {
        Arc::new(values.copied().collect::<BooleanArray>())
    }
    fn read_column(array: &ArrayRef) -> Result<Vec<Self>, String> {
        Ok(downcast::<BooleanArray>(array, "bool")?.iter().collect())
    }
}

impl Column for String {
    const NULLABLE: bool = false;
    fn data_type() -> DataType {
        DataType::Utf8
    }
    fn build<'a>(values: impl Iterator<Item = &'a Self>) -> ArrayRef {
        Arc::new(values.map(|s| Some(s.as_str())).collect::<StringArray>())
    }
    fn read_column(array: &ArrayRef) -> Result<Vec<Self>, String> {
        let a = downcast::<StringArray>(array, "utf8")?;
        no_nulls(a)?;
        Ok(a.iter().map(|s| s.unwrap_or_default().to_string()).collect())
    }
}

impl Column for Option<String> {
    const NULLABLE: bool = true;
    fn data_type() -> DataType {
        DataType::Utf8
    }
    fn build<'a>(values: impl Iterator<Item = &'a Self>) -> ArrayRef {
        Arc::new(values.map(|s| s.as_deref()).collect::<StringArray>())
    }
    fn read_column(array: &ArrayRef) -> Result<Vec<Self>, String> {
        Ok(downcast::<StringArray>(array, "utf8")?.iter().map(|s| s.map(str::to_string)).collect())
    }
}

impl Column for Vec<String> {
    const NULLABLE: bool = false;
    fn data_type() -> DataType {
        DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)))
    }
    fn build<'a>(values: impl Iterator<Item = &'a Self>) -> ArrayRef {
        let mut builder = ListBuilder::new(StringBuilder::new());
        for list in values {
            for s in list {
                builder.values().append_value(s);
            }
            builder.append(true);
        }
        Arc::new(builder.finish())
    }
    fn read_column(array: &ArrayRef) -> Result<Vec<Self>, String> {
        let a = downcast::<ListArray>(array, "list<utf8>")?;
        no_nulls(a)?;
        (0..a.len())
            .map(|i| {
                let inner = a.value(i);
                let strings = inner
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .ok_or_else(|| format!("row {i}: list items are {:?}, expected utf8", inner.data_type()))?;
                Ok(strings.iter().map(|s| s.unwrap_or_default().to_string()).collect())
            })
            .collect()
    }
}
