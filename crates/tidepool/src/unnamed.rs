//! Statements without a server-side name, for when the statement cache is off
//! (`DB_STATEMENT_CACHE=false`, or asyncpg's `statement_cache_size=0` in the URL): the way to run
//! behind PgBouncer in transaction mode, where consecutive round trips of one client may reach
//! different server connections, so a named statement prepared in one may be missing (`26000`)
//! or taken by another client (`42P05`) in the next.
//!
//! Each statement goes out as Parse (unnamed, with parameter types), Bind, Describe, Execute and
//! Sync in one round trip (tokio-postgres' `query_typed`). The parameter types are told from the
//! Rust values: each value is offered the built-in types below in order and takes the first it
//! can be encoded as (`i32` is `int4`, `&str` is `text`, `Option<T>` is `T`'s type, ...). The
//! server then converts as it would a typed literal: an `int4` compared with a `bigint` column,
//! `text` stored in a `varchar` one. A value of a type outside the list (a custom `ToSql`) cannot
//! be named; the statement then needs a transaction (where PgBouncer keeps one server
//! connection, so it is prepared by name there) or the statement cache on, in session mode.

use bytes::BytesMut;
use tokio_postgres::types::{ToSql, Type};

/// Built-in types a parameter's value is tried against, most common first. Where a Rust type
/// accepts several (`serde_json::Value`: `jsonb` and `json`), the first is the one it gets.
const CANDIDATES: &[Type] = &[
    Type::INT4,
    Type::INT8,
    Type::TEXT,
    Type::BOOL,
    Type::FLOAT8,
    Type::INT2,
    Type::FLOAT4,
    Type::NUMERIC,
    Type::BYTEA,
    Type::TIMESTAMPTZ,
    Type::TIMESTAMP,
    Type::DATE,
    Type::TIME,
    Type::UUID,
    Type::JSONB,
    Type::JSON,
    Type::INET,
    Type::OID,
    Type::CHAR,
    Type::INT4_ARRAY,
    Type::INT8_ARRAY,
    Type::TEXT_ARRAY,
    Type::BOOL_ARRAY,
    Type::FLOAT8_ARRAY,
    Type::INT2_ARRAY,
    Type::FLOAT4_ARRAY,
    Type::NUMERIC_ARRAY,
    Type::BYTEA_ARRAY,
    Type::TIMESTAMPTZ_ARRAY,
    Type::TIMESTAMP_ARRAY,
    Type::DATE_ARRAY,
    Type::UUID_ARRAY,
    Type::JSONB_ARRAY,
];

/// Parameters with the types they are declared as in the unnamed statement's Parse.
pub(crate) type Typed<'a> = Vec<(&'a (dyn ToSql + Sync), Type)>;

/// A parameter whose type cannot be told from its value: its position (1-based, as `$n`) and
/// the conversion error that named its Rust type.
pub(crate) struct Unnamable {
    pub(crate) index: usize,
    pub(crate) rust_type: String,
}

/// `params` with the type each one is sent as, or the first that fits none of the candidates.
pub(crate) fn typed<'a>(params: &[&'a (dyn ToSql + Sync)]) -> Result<Typed<'a>, Unnamable> {
    let mut scratch = BytesMut::new();
    params
        .iter()
        .enumerate()
        .map(|(i, &value)| {
            type_of(value, &mut scratch)
                .map(|ty| (value, ty))
                .ok_or_else(|| Unnamable {
                    index: i + 1,
                    rust_type: rust_type(value),
                })
        })
        .collect()
}

/// The first candidate `value` accepts. A type it does not accept is refused before anything is
/// encoded, so a miss costs a comparison; the hit encodes once into `scratch`.
fn type_of(value: &(dyn ToSql + Sync), scratch: &mut BytesMut) -> Option<Type> {
    CANDIDATES.iter().find_map(|ty| {
        scratch.clear();
        value.to_sql_checked(ty, scratch).ok().map(|_| ty.clone())
    })
}

/// The Rust type's name, as tokio-postgres' conversion error gives it.
fn rust_type(value: &(dyn ToSql + Sync)) -> String {
    let mut scratch = BytesMut::new();
    match value.to_sql_checked(&Type::VOID, &mut scratch) {
        Err(e) => {
            let text = e.to_string();
            // "cannot convert between the Rust type `T` and the Postgres type `void`"
            text.split('`').nth(1).unwrap_or("unknown").to_owned()
        }
        Ok(_) => "unknown".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn type_name(value: &(dyn ToSql + Sync)) -> Option<String> {
        type_of(value, &mut BytesMut::new()).map(|t| t.name().to_owned())
    }

    #[test]
    fn common_rust_types_get_their_postgres_types() {
        assert_eq!(type_name(&1i32).as_deref(), Some("int4"));
        assert_eq!(type_name(&1i64).as_deref(), Some("int8"));
        assert_eq!(type_name(&1i16).as_deref(), Some("int2"));
        assert_eq!(type_name(&"x").as_deref(), Some("text"));
        assert_eq!(type_name(&String::from("x")).as_deref(), Some("text"));
        assert_eq!(type_name(&true).as_deref(), Some("bool"));
        assert_eq!(type_name(&1.5f64).as_deref(), Some("float8"));
        assert_eq!(type_name(&vec![1u8]).as_deref(), Some("bytea"));
        assert_eq!(type_name(&vec![1i64]).as_deref(), Some("_int8"));
        assert_eq!(type_name(&vec!["a"]).as_deref(), Some("_text"));
        assert_eq!(type_name(&None::<i64>).as_deref(), Some("int8"));
        assert_eq!(type_name(&Some("x")).as_deref(), Some("text"));
        assert_eq!(
            type_name(&std::time::SystemTime::now()).as_deref(),
            Some("timestamptz")
        );
    }

    #[test]
    fn an_unknown_type_is_named_with_its_position() {
        #[derive(Debug)]
        struct Mood;
        impl ToSql for Mood {
            fn to_sql(
                &self,
                _: &Type,
                _: &mut BytesMut,
            ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>>
            {
                Ok(tokio_postgres::types::IsNull::No)
            }
            fn accepts(ty: &Type) -> bool {
                ty.name() == "mood"
            }
            tokio_postgres::types::to_sql_checked!();
        }
        let Err(e) = typed(&[&1i32, &Mood]) else {
            panic!("a custom type cannot be named")
        };
        assert_eq!(e.index, 2);
        assert!(e.rust_type.ends_with("Mood"), "{}", e.rust_type);
    }
}
