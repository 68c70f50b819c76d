//! Statements without a server-side name, for when the statement cache is off
//! (`DB_STATEMENT_CACHE=false`, or asyncpg's `statement_cache_size=0` in the URL): the way to run
//! behind PgBouncer in transaction mode, where consecutive round trips of one client may reach
//! different server connections, so a named statement prepared in one may be missing (`26000`)
//! or taken by another client (`42P05`) in the next.
//!
//! Each statement goes out as Parse (unnamed, with parameter types), Bind, Describe, Execute and
//! Sync in one round trip (tokio-postgres' `query_typed`). The parameter types are told from the
//! Rust values: each value is offered the built-in types below in order and takes the first it
//! can be encoded as (`i32` is `int4`, `Option<T>` is `T`'s type, ...), and the server converts
//! as it would a typed literal (an `int4` compared with a `bigint` column).
//!
//! Text (`&str`, `String`, ...) is sent the way libpq sends parameters: in text format with no
//! declared type, so the server reads it as an untyped literal of whatever type the statement
//! needs there (`citext`, an enum, `varchar`, a number, a date), exactly as with a server-side
//! prepare. A value that fits two candidates the server would tell apart (`SystemTime` as
//! `timestamptz` or `timestamp`: the conversion between them depends on the session's
//! `TimeZone`), or none (a custom `ToSql`), cannot be named: the statement then needs a
//! transaction (where PgBouncer keeps one server connection, so it is prepared by name there)
//! or the statement cache on, in session mode.

use std::error::Error as StdError;

use bytes::BytesMut;
use tokio_postgres::types::{Format, IsNull, ToSql, Type};

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
pub(crate) type Typed<'a> = Vec<(Param<'a>, Type)>;

/// One parameter as the unnamed statement sends it: binary in its declared type, or text with
/// no declared type (`unknown`), read by the server as an untyped literal.
#[derive(Debug)]
pub(crate) struct Param<'a> {
    value: &'a (dyn ToSql + Sync),
    text: bool,
}

impl<'a> Param<'a> {
    /// `value` sent in binary as the type it is declared with.
    pub(crate) fn binary(value: &'a (dyn ToSql + Sync)) -> Self {
        Param { value, text: false }
    }
}

impl ToSql for Param<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        if self.text {
            // A text value's binary form is its UTF-8 text: the text format's bytes too.
            self.value.to_sql_checked(&Type::TEXT, out)
        } else {
            self.value.to_sql_checked(ty, out)
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    fn to_sql_checked(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        self.to_sql(ty, out)
    }

    fn encode_format(&self, _: &Type) -> Format {
        if self.text {
            Format::Text
        } else {
            Format::Binary
        }
    }
}

/// Candidates a value may fit together whose meaning differs on the server.
const AMBIGUOUS: &[(Type, Type)] = &[(Type::TIMESTAMPTZ, Type::TIMESTAMP)];

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
            let unnamable = || Unnamable {
                index: i + 1,
                rust_type: rust_type(value),
            };
            match type_of(value, &mut scratch) {
                Some(ty) if ty == Type::TEXT => Ok((Param { value, text: true }, Type::UNKNOWN)),
                Some(ty) => {
                    let ambiguous = AMBIGUOUS.iter().any(|(a, b)| {
                        *a == ty && {
                            scratch.clear();
                            value.to_sql_checked(b, &mut scratch).is_ok()
                        }
                    });
                    if ambiguous {
                        return Err(unnamable());
                    }
                    Ok((Param::binary(value), ty))
                }
                None => Err(unnamable()),
            }
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
    }

    #[test]
    fn text_goes_untyped_in_text_format() {
        let some = Some(String::from("x"));
        let typed = typed(&[&"abc", &some, &7i32]).ok().unwrap();
        assert_eq!(typed[0].1, Type::UNKNOWN);
        assert!(matches!(
            typed[0].0.encode_format(&Type::UNKNOWN),
            Format::Text
        ));
        let mut out = BytesMut::new();
        typed[0].0.to_sql_checked(&Type::UNKNOWN, &mut out).unwrap();
        assert_eq!(&out[..], b"abc");
        assert_eq!(typed[1].1, Type::UNKNOWN);
        assert_eq!(typed[2].1, Type::INT4);
        assert!(matches!(
            typed[2].0.encode_format(&Type::INT4),
            Format::Binary
        ));
    }

    #[test]
    fn a_value_two_server_types_would_read_differently_is_not_guessed() {
        let Err(e) = typed(&[&std::time::SystemTime::now()]) else {
            panic!("SystemTime fits timestamptz and timestamp")
        };
        assert_eq!(e.index, 1);
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
