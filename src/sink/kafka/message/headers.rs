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
#[cfg(test)]
fn extra_headers(json: &str) -> Result<Vec<Header<'_>>, Poison> {
    let mut headers = Vec::new();
    extra_headers_into(json, &[], &mut headers)?;
    Ok(headers)
}

/// Appends the `headers` object's entries to `out`, in name order, the last of duplicate
/// names, none of the names in `skip`; on an error `out` is left as it was.
pub(super) fn extra_headers_into<'a>(
    json: &'a str,
    skip: &[&str],
    out: &mut Vec<Header<'a>>,
) -> Result<(), Poison> {
    let start = out.len();
    if plain_entries(json, skip, out).is_none() {
        out.truncate(start);
        for (name, raw) in parsed_entries(json)? {
            if !skip.contains(&name.as_ref()) {
                match value_bytes(raw) {
                    Ok(value) => out.push((name, value)),
                    Err(poison) => {
                        out.truncate(start);
                        return Err(poison);
                    }
                }
            }
        }
    }
    // A stable sort keeps equal names in the order written: the last of each run wins.
    out[start..].sort_by(|a, b| a.0.cmp(&b.0));
    let mut kept = start;
    for i in start..out.len() {
        if out.get(i + 1).is_some_and(|next| next.0 == out[i].0) {
            continue;
        }
        out.swap(kept, i);
        kept += 1;
    }
    out.truncate(kept);
    Ok(())
}

/// The entries of an object whose names and values are all plain strings, without
/// escapes or control characters (`{}` and `{"traceparent": "00-…-01"}`: what most rows
/// hold, in the form `jsonb` prints), read in one pass over the text and appended to
/// `out` but for the names in `skip`. `None` for anything else, which [`parsed_entries`]
/// reads or refuses. Per event this was most of the relay's work on headers: serde's
/// setup alone costs more than reading `{}`.
fn plain_entries<'a>(json: &'a str, skip: &[&str], out: &mut Vec<Header<'a>>) -> Option<()> {
    let b = json.as_bytes();
    let mut at = skip_space(b, 0);
    if b.get(at) != Some(&b'{') {
        return None;
    }
    at = skip_space(b, at + 1);
    if b.get(at) != Some(&b'}') {
        loop {
            let (name, next) = plain_string(json, at)?;
            at = skip_space(b, next);
            if b.get(at) != Some(&b':') {
                return None;
            }
            let (value, next) = plain_string(json, skip_space(b, at + 1))?;
            if !skip.contains(&name) {
                out.push((Cow::Borrowed(name), Cow::Borrowed(value.as_bytes())));
            }
            at = skip_space(b, next);
            match b.get(at) {
                Some(b',') => at = skip_space(b, at + 1),
                Some(b'}') => break,
                _ => return None,
            }
        }
    }
    // Only whitespace may follow the object.
    (skip_space(b, at + 1) == b.len()).then_some(())
}

/// The JSON string at `at` when it has no escape and no control character: its text and
/// where it ends.
fn plain_string(json: &str, at: usize) -> Option<(&str, usize)> {
    let b = json.as_bytes();
    if b.get(at) != Some(&b'"') {
        return None;
    }
    let start = at + 1;
    let end = start + plain_len(&b[start..]);
    // Both ends are ASCII quotes, so the slice falls on character boundaries.
    (b.get(end) == Some(&b'"')).then(|| (&json[start..end], end + 1))
}

/// How many bytes at the start of `b` are none of `"`, `\` and the control characters
/// (below 0x20), tested eight at a time: a byte-by-byte loop was most of the plain
/// reading's cost (a trace context is 55 bytes).
fn plain_len(b: &[u8]) -> usize {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    // High bit set in each byte below `n` (n ≤ 0x80); where several bytes match, the
    // lowest one is exact, which is the one asked for.
    let below = |v: u64, n: u8| v.wrapping_sub(ONES * u64::from(n)) & !v & HIGH;
    let mut at = 0;
    while let Some(chunk) = b.get(at..at + 8) {
        let v = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        let hits = below(v ^ (ONES * u64::from(b'"')), 1)
            | below(v ^ (ONES * u64::from(b'\\')), 1)
            | below(v, 0x20);
        if hits != 0 {
            return at + (hits.trailing_zeros() / 8) as usize;
        }
        at += 8;
    }
    at + b[at..]
        .iter()
        .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
        .unwrap_or(b.len() - at)
}

/// The index of the first byte at or after `at` that is not JSON whitespace.
fn skip_space(b: &[u8], mut at: usize) -> usize {
    while matches!(b.get(at), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        at += 1;
    }
    at
}

/// Any object, through serde: escaped strings, numbers, nested values; or the reason
/// it is not an object.
fn parsed_entries(json: &str) -> Result<Vec<(Cow<'_, str>, &RawValue)>, Poison> {
    if !json.trim_start().starts_with('{') {
        return Err(not_an_object(json));
    }
    let Entries(entries) = serde_json::from_str(json)
        .map_err(|e| Poison::new(format!("headers is not valid JSON: {e}")))?;
    Ok(entries)
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

    fn pick<'a>(rng: &mut impl rand::Rng, from: &[&'a str]) -> &'a str {
        from[rng.random_range(0..from.len())]
    }

    /// Objects written the way rows write them, and each small way to get one wrong.
    fn generated(rng: &mut impl rand::Rng) -> String {
        const SPACES: [&str; 7] = ["", "", " ", "  ", "\t", "\n", "\r\n"];
        const TEXTS: [&str; 12] = [
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "",
            "é ü 中文 🦀",
            "with space",
            "tab\\there",
            "quote\\\"d",
            "\\u00e9",
            "raw\ttab",
            "raw\u{1}control",
            "id",
            "a",
        ];
        const VALUES: [&str; 8] = [
            "1",
            "-2.5e3",
            "true",
            "null",
            "[1, \"a\"]",
            "{\"x\": 1}",
            "{}",
            "[]",
        ];
        let mut json = String::new();
        json.push_str(pick(rng, &SPACES));
        json.push('{');
        let entries = rng.random_range(0..4);
        for i in 0..entries {
            if i > 0 {
                json.push_str(pick(rng, &SPACES));
                json.push(',');
            }
            json.push_str(pick(rng, &SPACES));
            json.push_str(&format!("\"{}\"", pick(rng, &TEXTS)));
            json.push_str(pick(rng, &SPACES));
            json.push(':');
            json.push_str(pick(rng, &SPACES));
            if rng.random_bool(0.8) {
                json.push_str(&format!("\"{}\"", pick(rng, &TEXTS)));
            } else {
                json.push_str(pick(rng, &VALUES));
            }
        }
        json.push_str(pick(rng, &SPACES));
        json.push('}');
        json.push_str(pick(rng, &SPACES));
        // One in four gets one flaw: a byte dropped, doubled or swapped for another.
        if rng.random_bool(0.25) && !json.is_empty() {
            let at = rng.random_range(0..json.len());
            if json.is_char_boundary(at) {
                const BYTES: [&str; 9] = ["\"", ",", ":", "{", "}", "\\", " ", "x", "\u{b}"];
                match rng.random_range(0..3) {
                    0 => {
                        json.remove(at);
                    }
                    1 => json.insert_str(at, pick(rng, &BYTES)),
                    _ => json.truncate(at),
                }
            }
        }
        json
    }

    #[test]
    fn the_plain_reading_gives_what_a_full_parse_gives_or_steps_aside() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(27);
        let (mut plain, mut valid) = (0, 0);
        for _ in 0..20_000 {
            let json = generated(&mut rng);
            let expected = serde_json::from_str::<serde_json::Value>(&json)
                .ok()
                .filter(serde_json::Value::is_object)
                .map(|_| reference(&json));
            let got = extra_headers(&json).ok().map(|headers| {
                headers
                    .into_iter()
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect::<Vec<_>>()
            });
            assert_eq!(got, expected, "{json:?}");
            valid += usize::from(expected.is_some());
            if plain_entries(&json, &[], &mut Vec::new()).is_some() {
                plain += 1;
                assert!(expected.is_some(), "read as plain but not JSON: {json:?}");
            }
        }
        // Both readings were exercised, and most valid objects took the plain one.
        assert!(
            plain > 5_000 && valid - plain > 2_000,
            "plain {plain}, valid {valid}"
        );
    }

    #[test]
    fn plain_len_stops_where_a_byte_by_byte_scan_does() {
        let stops = |c: u8| c == b'"' || c == b'\\' || c < 0x20;
        // Every byte value at every place of the word-at-a-time scan and its tail, after
        // fillers that sit next to the bytes it looks for (a borrow between bytes would
        // show as a wrong place).
        for filler in [
            b'a', b' ', b'!', b'#', b'[', b']', 0x7f, 0x80, 0xa2, 0xdc, 0xff,
        ] {
            for len in 0..20 {
                for at in 0..=len {
                    for c in 0..=255u8 {
                        let mut b = vec![filler; len];
                        if at < len {
                            b[at] = c;
                        }
                        let expected = b.iter().position(|&x| stops(x)).unwrap_or(len);
                        assert_eq!(plain_len(&b), expected, "{b:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn appended_entries_skip_the_names_asked_and_nothing_is_left_on_an_error() {
        let names = |out: &[Header]| out.iter().map(|(k, _)| k.to_string()).collect::<Vec<_>>();
        let mut out = vec![(Cow::Borrowed("id"), Cow::Borrowed(&b"e-1"[..]))];
        for json in [
            r#"{"id": "x", "b": "2", "a": "1"}"#,
            r#"{"id": 1, "b": 2, "a": "1"}"#,
        ] {
            extra_headers_into(json, &["id"], &mut out).unwrap();
            assert_eq!(names(&out), ["id", "a", "b"], "{json}");
            out.truncate(1);
        }
        for json in [
            r#"{"a": "1", "b": }"#,
            r#"{"a": "1"} x"#,
            "[]",
            r#"{"a": "\"}"#,
        ] {
            assert!(extra_headers_into(json, &[], &mut out).is_err(), "{json}");
            assert_eq!(names(&out), ["id"], "{json}");
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
