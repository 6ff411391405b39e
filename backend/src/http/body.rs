//! JSON request bodies as the OpenAPI document describes them: every body is an object, a
//! nested object is an object (serde's derive would also take a struct as an array of its
//! fields, `[null, null]`), and an integer may be written `3600.0` (JSON Schema's `integer`
//! is any number without a fraction; serde's `u64` refuses one written with a point).

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::api_error::ApiError;

/// Parses `body` as a JSON object into `T`: malformed JSON is 400, a value that is not an
/// object or does not fit `T` is 422.
pub fn parse_object<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::BadRequest("a JSON body is required".into()));
    }
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::Unprocessable(
            "the body must be a JSON object".into(),
        ));
    }
    T::deserialize(value).map_err(|e| ApiError::Unprocessable(e.to_string()))
}

/// For an optional nested object (`#[serde(default, deserialize_with = ...)]`): an object or
/// `null`, never an array.
pub fn object_or_null<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: DeserializeOwned,
{
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        v @ Value::Object(_) => T::deserialize(v).map(Some).map_err(D::Error::custom),
        other => Err(D::Error::custom(format!(
            "invalid type: {}, expected an object",
            kind(&other)
        ))),
    }
}

/// For an optional integer field (`#[serde(default, deserialize_with = ...)]`): a whole
/// number in `T`'s range, written with or without a fraction of zero; or `null`.
pub fn opt_integer<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<u64>,
{
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    let whole = n.as_u64().or_else(|| {
        n.as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= u64::MAX as f64)
            .map(|f| f as u64)
    });
    whole
        .and_then(|u| T::try_from(u).ok())
        .map(Some)
        .ok_or_else(|| D::Error::custom(format!("{n} is not a whole number in range")))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        a: Option<bool>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        #[serde(default, deserialize_with = "opt_integer")]
        n: Option<u32>,
        #[serde(default, deserialize_with = "object_or_null")]
        inner: Option<Inner>,
    }

    fn parse(s: &str) -> Result<Outer, ApiError> {
        parse_object(s.as_bytes())
    }

    #[test]
    fn a_body_is_an_object_and_a_nested_object_is_an_object() {
        assert_eq!(
            parse(r#"{"inner": {"a": true}}"#).unwrap().inner,
            Some(Inner { a: Some(true) })
        );
        assert_eq!(parse(r#"{"inner": null}"#).unwrap().inner, None);
        assert!(matches!(
            parse("[null, null]"),
            Err(ApiError::Unprocessable(_))
        ));
        assert!(matches!(
            parse(r#"{"inner": [null]}"#),
            Err(ApiError::Unprocessable(_))
        ));
        assert!(matches!(parse(""), Err(ApiError::BadRequest(_))));
        assert!(matches!(parse("{"), Err(ApiError::BadRequest(_))));
        assert!(matches!(
            parse(r#"{"other": 1}"#),
            Err(ApiError::Unprocessable(_))
        ));
    }

    #[test]
    fn an_integer_may_carry_a_zero_fraction_but_not_more() {
        assert_eq!(parse(r#"{"n": 178}"#).unwrap().n, Some(178));
        assert_eq!(parse(r#"{"n": 178.0}"#).unwrap().n, Some(178));
        assert_eq!(parse(r#"{"n": null}"#).unwrap().n, None);
        assert_eq!(parse("{}").unwrap().n, None);
        for bad in [
            r#"{"n": 1.5}"#,
            r#"{"n": -1}"#,
            r#"{"n": 4294967296}"#,
            r#"{"n": "1"}"#,
        ] {
            assert!(
                matches!(parse(bad), Err(ApiError::Unprocessable(_))),
                "{bad}"
            );
        }
    }
}
