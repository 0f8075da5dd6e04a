//! The `headers` column: a JSON object whose entries become Kafka headers.
//!
//! Most rows carry a few short string values (`traceparent`, say), or none: they are
//! borrowed from the row's text rather than parsed into a `serde_json::Value` and copied
//! out again. What a consumer sees is exactly what a full parse gives: entries in name
//! order (a JSON object's order is not significant, and a `serde_json::Map` sorts), the
//! last of duplicate names, strings unescaped, any other value as its compact JSON text.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::{Header, Poison};

/// The `headers` object's entries: strings as-is, any other JSON value as its JSON text.
pub(super) fn extra_headers(json: &str) -> Result<Vec<Header<'_>>, Poison> {
    if !json.trim_start().starts_with('{') {
        return Err(not_an_object(json));
    }
    let Entries(entries) = serde_json::from_str(json)
        .map_err(|e| Poison::new(format!("headers is not valid JSON: {e}")))?;
    let mut headers = Vec::with_capacity(entries.len());
    for (name, raw) in entries {
        headers.push((name, value_bytes(raw)?));
    }
    headers.sort_by(|a, b| a.0.cmp(&b.0));
    // Of equal names the last one written wins: keep its value in the first's place.
    headers.dedup_by(|later, kept| {
        let same = later.0 == kept.0;
        if same {
            std::mem::swap(later, kept);
        }
        same
    });
    Ok(headers)
}

/// A header value: a JSON string's text, or another value's compact JSON.
fn value_bytes(raw: &RawValue) -> Result<Cow<'_, [u8]>, Poison> {
    let text = raw.get();
    let bad = |e: serde_json::Error| Poison::new(format!("headers is not valid JSON: {e}"));
    if let Some(inner) = text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        if !inner.contains('\\') {
            return Ok(Cow::Borrowed(inner.as_bytes()));
        }
        let unescaped: String = serde_json::from_str(text).map_err(bad)?;
        return Ok(Cow::Owned(unescaped.into_bytes()));
    }
    let value: serde_json::Value = serde_json::from_str(text).map_err(bad)?;
    Ok(Cow::Owned(value.to_string().into_bytes()))
}

/// The error for a `headers` value that is JSON but no object (or no JSON at all).
fn not_an_object(json: &str) -> Poison {
    match serde_json::from_str::<serde_json::Value>(json) {
        Err(e) => Poison::new(format!("headers is not valid JSON: {e}")),
        Ok(v) => Poison::new(format!("headers must be a JSON object, got {}", kind(&v))),
    }
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// An object's entries in the order written, names borrowed where they have no escapes.
struct Entries<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for Entries<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Object;
        impl<'de> Visitor<'de> for Object {
            type Value = Entries<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries<'de>, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some((Name(name), raw)) = map.next_entry::<Name<'de>, &'de RawValue>()? {
                    entries.push((name, raw));
                }
                Ok(Entries(entries))
            }
        }
        d.deserialize_map(Object)
    }
}

struct Name<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Name<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Text;
        impl<'de> Visitor<'de> for Text {
            type Value = Name<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a header name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Owned(v)))
            }
        }
        d.deserialize_str(Text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the relay gave before this parser: a full parse into a `serde_json::Value`.
    fn reference(json: &str) -> Vec<(String, Vec<u8>)> {
        let serde_json::Value::Object(map) = serde_json::from_str(json).unwrap() else {
            panic!("not an object")
        };
        map.into_iter()
            .map(|(k, v)| {
                let bytes = match v {
                    serde_json::Value::String(s) => s.into_bytes(),
                    other => other.to_string().into_bytes(),
                };
                (k, bytes)
            })
            .collect()
    }

    #[test]
    fn entries_are_what_a_full_parse_gives() {
        for json in [
            "{}",
            " { } ",
            r#"{"traceparent": "00-abc-01"}"#,
            r#"{"b": "2", "a": "1", "c": "3"}"#,
            r#"{"k": "first", "other": 1, "k": "last"}"#,
            r#"{"esc\"aped": "tab\there \u00e9 \\ \/", "plain": "é"}"#,
            r#"{"n": 1.50, "e": 1e3, "t": true, "z": null, "arr": [1, "a", {"x": 2}], "o": {"b": 1, "a": 2}}"#,
            r#"{"": "empty name", "empty value": ""}"#,
        ] {
            let got: Vec<(String, Vec<u8>)> = extra_headers(json)
                .unwrap()
                .into_iter()
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            assert_eq!(got, reference(json), "{json}");
        }
    }

    #[test]
    fn plain_names_and_strings_are_borrowed() {
        let headers = extra_headers(r#"{"traceparent": "00-abc-01", "n": 2}"#).unwrap();
        assert!(matches!(headers[1].0, Cow::Borrowed("traceparent")));
        assert!(matches!(headers[1].1, Cow::Borrowed(b"00-abc-01")));
        assert!(matches!(headers[0].1, Cow::Owned(_)));
    }

    #[test]
    fn anything_but_an_object_is_poison_naming_what_it_got() {
        for (json, says) in [
            ("[1]", "headers must be a JSON object, got an array"),
            ("\"x\"", "headers must be a JSON object, got a string"),
            ("42", "headers must be a JSON object, got a number"),
            ("null", "headers must be a JSON object, got null"),
            ("{", "headers is not valid JSON"),
            (r#"{"a": }"#, "headers is not valid JSON"),
            (r#"{"a": "1"} trailing"#, "headers is not valid JSON"),
            ("", "headers is not valid JSON"),
        ] {
            let reason = extra_headers(json).unwrap_err().reason;
            assert!(reason.contains(says), "{json}: {reason}");
        }
    }
}
