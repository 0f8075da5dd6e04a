//! Avro: the application's plain JSON, read as its schema says, encoded by `apache-avro`.
//!
//! Avro's own JSON encoding wraps every union value in `{"type": value}` and writes bytes
//! as ISO-8859-1 text; no application writes that. The relay reads the JSON an
//! application does write, guided by the schema:
//! - a union takes `null` for its null branch, else the first branch the value fits;
//! - a missing record field takes its default (none: a violation), an unknown one is a
//!   violation (encoding would drop it silently);
//! - `uuid`, `enum` symbols and `decimal` (`"12.30"`) are strings; `bytes` and `fixed`
//!   are base64;
//! - `date`, `time-*`, `timestamp-*` and `local-timestamp-*` take ISO-8601 text
//!   (`2024-05-01`, `13:45:00.250`, `2024-05-01T13:45:00Z` with an offset, local ones
//!   without) or a number in the logical type's own unit (days, ms, µs, ns).
//!
//! The converted value is checked by `apache-avro` again before it is written (a
//! mistake here would otherwise produce bytes no consumer can read).

use apache_avro::schema::{
    DecimalSchema, InnerDecimalSchema, Name, RecordSchema, ResolvedSchema, Schema, UnionSchema,
};
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use base64::prelude::{Engine as _, BASE64_STANDARD};
use serde_json::Value as Json;

use super::{parse_json, JsonPath, Violation, MAX_VIOLATIONS};

pub struct AvroCodec {
    text: String,
    /// Leaked once per compiled schema (a few per process, for its lifetime), so that
    /// the writer that borrows it and its resolved names are built once, not per event.
    schema: &'static Schema,
    names: ResolvedSchema<'static>,
    writer: GenericDatumWriter<'static>,
    record: Option<String>,
}

impl AvroCodec {
    pub fn compile(text: &str) -> Result<AvroCodec, String> {
        let schema = Schema::parse_str(text).map_err(|e| format!("not an Avro schema: {e}"))?;
        let schema: &'static Schema = Box::leak(Box::new(schema));
        let names = ResolvedSchema::new(schema).map_err(|e| format!("Avro schema: {e}"))?;
        let writer = GenericDatumWriter::builder(schema)
            .build()
            .map_err(|e| format!("Avro schema: {e}"))?;
        let record = match schema {
            Schema::Record(r) => Some(r.name.fullname(None)),
            Schema::Enum(e) => Some(e.name.fullname(None)),
            Schema::Fixed(f) => Some(f.name.fullname(None)),
            _ => None,
        };
        Ok(AvroCodec {
            text: text.to_owned(),
            schema,
            names,
            writer,
            record,
        })
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn record_name(&self) -> Option<&str> {
        self.record.as_deref()
    }

    pub fn encode(&self, payload: &[u8], out: &mut Vec<u8>) -> Result<(), Vec<Violation>> {
        let json = parse_json(payload)?;
        let mut violations = Vec::new();
        let value = self.convert(&json, self.schema, &JsonPath::root(), &mut violations);
        match value {
            Some(value) if violations.is_empty() => self
                .writer
                .write_value_ref(out, &value)
                .map(drop)
                .map_err(|e| vec![JsonPath::root().violation(format!("Avro: {e}"))]),
            _ => {
                violations.truncate(MAX_VIOLATIONS);
                Err(violations)
            }
        }
    }

    fn named(&self, name: &Name) -> Option<&'static Schema> {
        self.names.get_names().get(name).copied()
    }

    /// `json` as a value of `schema`; `None` (with the reasons in `out`) when it does
    /// not fit.
    fn convert(
        &self,
        json: &Json,
        schema: &Schema,
        path: &JsonPath,
        out: &mut Vec<Violation>,
    ) -> Option<Value> {
        let mut wrong = |expected: &str| {
            out.push(path.violation(format!("expected {expected}, got {}", kind(json))));
            None
        };
        match schema {
            Schema::Null => json
                .is_null()
                .then_some(Value::Null)
                .or_else(|| wrong("null")),
            Schema::Boolean => match json {
                Json::Bool(b) => Some(Value::Boolean(*b)),
                _ => wrong("true or false"),
            },
            Schema::Int => match json.as_i64().map(i32::try_from) {
                Some(Ok(i)) => Some(Value::Int(i)),
                _ => wrong("an integer of 32 bits (int)"),
            },
            Schema::Long => match json.as_i64() {
                Some(i) => Some(Value::Long(i)),
                _ => wrong("an integer of 64 bits (long)"),
            },
            Schema::Float => match json.as_f64() {
                Some(f) => Some(Value::Float(f as f32)),
                _ => wrong("a number (float)"),
            },
            Schema::Double => match json.as_f64() {
                Some(f) => Some(Value::Double(f)),
                _ => wrong("a number (double)"),
            },
            Schema::String => match json {
                Json::String(s) => Some(Value::String(s.clone())),
                _ => wrong("a string"),
            },
            Schema::Bytes => match base64_of(json) {
                Some(b) => Some(Value::Bytes(b)),
                None => wrong("base64 text (bytes)"),
            },
            Schema::Fixed(f) => match base64_of(json) {
                Some(b) if b.len() == f.size => Some(Value::Fixed(f.size, b)),
                _ => wrong(&format!("base64 text of {} bytes (fixed)", f.size)),
            },
            Schema::Enum(e) => match json {
                Json::String(s) => match e.symbols.iter().position(|x| x == s) {
                    Some(i) => Some(Value::Enum(i as u32, s.clone())),
                    None => {
                        out.push(path.violation(format!(
                            "{s:?} is not a symbol of enum {} ({})",
                            e.name.fullname(None),
                            e.symbols.join(", ")
                        )));
                        None
                    }
                },
                _ => wrong("a string (an enum symbol)"),
            },
            Schema::Array(a) => {
                let Json::Array(items) = json else {
                    return wrong("an array");
                };
                let mut values = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    values.push(self.convert(item, &a.items, &path.index(i), out));
                }
                values
                    .into_iter()
                    .collect::<Option<Vec<_>>>()
                    .map(Value::Array)
            }
            Schema::Map(m) => {
                let Json::Object(entries) = json else {
                    return wrong("an object (map)");
                };
                let mut values = std::collections::HashMap::with_capacity(entries.len());
                let mut ok = true;
                for (k, v) in entries {
                    match self.convert(v, &m.types, &path.key(k), out) {
                        Some(v) => {
                            values.insert(k.clone(), v);
                        }
                        None => ok = false,
                    }
                }
                ok.then_some(Value::Map(values))
            }
            Schema::Union(u) => self.union(json, u, path, out),
            Schema::Record(r) => self.record(json, r, path, out),
            Schema::Ref { name } => match self.named(name) {
                Some(schema) => self.convert(json, schema, path, out),
                None => {
                    out.push(path.violation(format!("the schema names unknown type {name}")));
                    None
                }
            },
            Schema::Decimal(d) => match json {
                Json::String(s) => match decimal(s, d) {
                    Ok(bytes) => Some(Value::Decimal(apache_avro::Decimal::from(bytes))),
                    Err(e) => {
                        out.push(path.violation(e));
                        None
                    }
                },
                _ => wrong("a decimal as a string (\"12.30\")"),
            },
            Schema::Uuid(_) => match json.as_str().map(apache_avro::Uuid::parse_str) {
                Some(Ok(u)) => Some(Value::Uuid(u)),
                _ => wrong("a UUID string"),
            },
            Schema::Date => self.time(
                json,
                path,
                out,
                Unit::Days,
                "a date (2024-05-01) or days since 1970-01-01",
            ),
            Schema::TimeMillis => self.time(
                json,
                path,
                out,
                Unit::TimeMillis,
                "a time of day (13:45:00.250) or milliseconds since midnight",
            ),
            Schema::TimeMicros => self.time(
                json,
                path,
                out,
                Unit::TimeMicros,
                "a time of day (13:45:00.250) or microseconds since midnight",
            ),
            Schema::TimestampMillis => self.time(
                json,
                path,
                out,
                Unit::Millis(false),
                "an ISO-8601 timestamp with an offset or milliseconds since the epoch",
            ),
            Schema::TimestampMicros => self.time(
                json,
                path,
                out,
                Unit::Micros(false),
                "an ISO-8601 timestamp with an offset or microseconds since the epoch",
            ),
            Schema::TimestampNanos => self.time(
                json,
                path,
                out,
                Unit::Nanos(false),
                "an ISO-8601 timestamp with an offset or nanoseconds since the epoch",
            ),
            Schema::LocalTimestampMillis => self.time(
                json,
                path,
                out,
                Unit::Millis(true),
                "an ISO-8601 local date-time (no offset) or milliseconds",
            ),
            Schema::LocalTimestampMicros => self.time(
                json,
                path,
                out,
                Unit::Micros(true),
                "an ISO-8601 local date-time (no offset) or microseconds",
            ),
            Schema::LocalTimestampNanos => self.time(
                json,
                path,
                out,
                Unit::Nanos(true),
                "an ISO-8601 local date-time (no offset) or nanoseconds",
            ),
            Schema::BigDecimal | Schema::Duration(_) => {
                out.push(path.violation(
                    "the relay does not encode Avro big-decimal or duration from JSON: use \
                     decimal, or a long in a unit of your choice",
                ));
                None
            }
        }
    }

    fn union(
        &self,
        json: &Json,
        u: &UnionSchema,
        path: &JsonPath,
        out: &mut Vec<Violation>,
    ) -> Option<Value> {
        let variants = u.variants();
        if json.is_null() {
            if let Some(i) = variants.iter().position(|s| matches!(s, Schema::Null)) {
                return Some(Value::Union(i as u32, Box::new(Value::Null)));
            }
        }
        let candidates: Vec<(usize, &Schema)> = variants
            .iter()
            .enumerate()
            .filter(|(_, s)| !matches!(s, Schema::Null))
            .collect();
        let mut first_reasons = None;
        for (i, schema) in &candidates {
            let mut reasons = Vec::new();
            if let Some(v) = self.convert(json, schema, path, &mut reasons) {
                if reasons.is_empty() {
                    return Some(Value::Union(*i as u32, Box::new(v)));
                }
            }
            first_reasons.get_or_insert(reasons);
        }
        match (candidates.len(), first_reasons) {
            // The common optional field, ["null", T]: T's own reasons say most.
            (1, Some(reasons)) => out.extend(reasons),
            _ => out.push(path.violation(format!(
                "{} fits none of the union's types ({})",
                kind(json),
                variants.iter().map(type_name).collect::<Vec<_>>().join(", ")
            ))),
        }
        None
    }

    fn record(
        &self,
        json: &Json,
        r: &RecordSchema,
        path: &JsonPath,
        out: &mut Vec<Violation>,
    ) -> Option<Value> {
        let Json::Object(object) = json else {
            out.push(path.violation(format!(
                "expected an object (record {}), got {}",
                r.name.fullname(None),
                kind(json)
            )));
            return None;
        };
        let mut fields = Vec::with_capacity(r.fields.len());
        let mut ok = true;
        for field in &r.fields {
            let at = path.key(&field.name);
            let value = match (object.get(&field.name), &field.default) {
                (Some(v), _) => self.convert(v, &field.schema, &at, out),
                (None, Some(default)) => self.convert(default, &field.schema, &at, out),
                (None, None) => {
                    out.push(at.violation("required field is missing (it has no default)"));
                    None
                }
            };
            match value {
                Some(v) => fields.push((field.name.clone(), v)),
                None => ok = false,
            }
        }
        for key in object.keys() {
            if !r.lookup.contains_key(key) {
                out.push(path.key(key).violation(format!(
                    "not a field of record {} (encoding would drop it): add it to the schema, \
                     or stop writing it",
                    r.name.fullname(None)
                )));
                ok = false;
            }
        }
        ok.then_some(Value::Record(fields))
    }

    fn time(
        &self,
        json: &Json,
        path: &JsonPath,
        out: &mut Vec<Violation>,
        unit: Unit,
        expected: &str,
    ) -> Option<Value> {
        let number = match json {
            Json::Number(n) => n.as_i64(),
            Json::String(s) => unit.parse(s),
            _ => None,
        };
        let value = number.and_then(|n| unit.value(n));
        if value.is_none() {
            out.push(path.violation(format!("expected {expected}, got {}", kind(json))));
        }
        value
    }
}

#[derive(Clone, Copy)]
enum Unit {
    Days,
    TimeMillis,
    TimeMicros,
    /// `true`: a local date-time, without an offset.
    Millis(bool),
    Micros(bool),
    Nanos(bool),
}

impl Unit {
    /// ISO-8601 text as a number in this unit.
    fn parse(self, s: &str) -> Option<i64> {
        use jiff::civil::{Date, DateTime, Time};
        let instant = |local: bool| -> Option<jiff::Timestamp> {
            if local {
                let dt: DateTime = s.parse().ok()?;
                Some(dt.to_zoned(jiff::tz::TimeZone::UTC).ok()?.timestamp())
            } else {
                s.parse().ok()
            }
        };
        match self {
            Unit::Days => {
                let d: Date = s.parse().ok()?;
                let epoch = jiff::civil::date(1970, 1, 1);
                Some(i64::from(d.since(epoch).ok()?.get_days()))
            }
            Unit::TimeMillis | Unit::TimeMicros => {
                let t: Time = s.parse().ok()?;
                let micros = ((i64::from(t.hour()) * 60 + i64::from(t.minute())) * 60
                    + i64::from(t.second()))
                    * 1_000_000
                    + i64::from(t.subsec_nanosecond()) / 1_000;
                Some(match self {
                    Unit::TimeMillis => micros / 1_000,
                    _ => micros,
                })
            }
            Unit::Millis(local) => Some(instant(local)?.as_millisecond()),
            Unit::Micros(local) => Some(instant(local)?.as_microsecond()),
            Unit::Nanos(local) => i64::try_from(instant(local)?.as_nanosecond()).ok(),
        }
    }

    fn value(self, n: i64) -> Option<Value> {
        Some(match self {
            Unit::Days => Value::Date(i32::try_from(n).ok()?),
            Unit::TimeMillis => Value::TimeMillis(i32::try_from(n).ok()?),
            Unit::TimeMicros => Value::TimeMicros(n),
            Unit::Millis(false) => Value::TimestampMillis(n),
            Unit::Micros(false) => Value::TimestampMicros(n),
            Unit::Nanos(false) => Value::TimestampNanos(n),
            Unit::Millis(true) => Value::LocalTimestampMillis(n),
            Unit::Micros(true) => Value::LocalTimestampMicros(n),
            Unit::Nanos(true) => Value::LocalTimestampNanos(n),
        })
    }
}

/// `"-12.30"` as the two's-complement big-endian bytes of its unscaled value, checked
/// against the schema's precision and scale.
fn decimal(s: &str, d: &DecimalSchema) -> Result<Vec<u8>, String> {
    let bad =
        || format!("{s:?} is not a decimal number (digits, optionally a '.' and more digits)");
    let (negative, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    if whole.is_empty() && fraction.is_empty()
        || !whole
            .chars()
            .chain(fraction.chars())
            .all(|c| c.is_ascii_digit())
    {
        return Err(bad());
    }
    if fraction.len() > d.scale {
        return Err(format!(
            "{s:?} has {} digits after the point; the schema's scale is {} (round it first)",
            fraction.len(),
            d.scale
        ));
    }
    let mut unscaled = String::with_capacity(whole.len() + d.scale);
    unscaled.push_str(whole);
    unscaled.push_str(fraction);
    unscaled.extend(std::iter::repeat_n('0', d.scale - fraction.len()));
    let significant = unscaled.trim_start_matches('0');
    if significant.len() > d.precision {
        return Err(format!(
            "{s:?} has {} significant digits; the schema's precision is {}",
            significant.len(),
            d.precision
        ));
    }
    let mut n: i128 = if significant.is_empty() {
        0
    } else {
        significant
            .parse()
            .map_err(|_| format!("{s:?} is beyond 38 digits, the most the relay encodes"))?
    };
    if negative {
        n = -n;
    }
    let bytes = n.to_be_bytes();
    // The shortest two's complement that keeps the sign.
    let mut start = 0;
    while start < 15
        && ((bytes[start] == 0 && bytes[start + 1] & 0x80 == 0)
            || (bytes[start] == 0xff && bytes[start + 1] & 0x80 != 0))
    {
        start += 1;
    }
    let mut out = bytes[start..].to_vec();
    if let InnerDecimalSchema::Fixed(f) = &d.inner {
        if out.len() > f.size {
            return Err(format!("{s:?} does not fit the decimal's {} bytes", f.size));
        }
        let fill = if negative { 0xff } else { 0 };
        let mut padded = vec![fill; f.size - out.len()];
        padded.append(&mut out);
        out = padded;
    }
    Ok(out)
}

fn base64_of(json: &Json) -> Option<Vec<u8>> {
    BASE64_STANDARD.decode(json.as_str()?).ok()
}

/// What a JSON value is, for messages.
pub(super) fn kind(json: &Json) -> String {
    match json {
        Json::Null => "null".into(),
        Json::Bool(b) => b.to_string(),
        Json::Number(n) => format!("number {n}"),
        Json::String(s) if s.len() <= 40 => format!("string {s:?}"),
        Json::String(_) => "a string".into(),
        Json::Array(_) => "an array".into(),
        Json::Object(_) => "an object".into(),
    }
}

fn type_name(schema: &Schema) -> String {
    match schema {
        Schema::Record(r) => r.name.fullname(None),
        Schema::Enum(e) => e.name.fullname(None),
        Schema::Fixed(f) => f.name.fullname(None),
        Schema::Ref { name } => name.fullname(None),
        other => {
            let json = serde_json::to_value(other).unwrap_or_default();
            match json {
                Json::String(s) => s,
                Json::Object(o) => o
                    .get("logicalType")
                    .or_else(|| o.get("type"))
                    .and_then(Json::as_str)
                    .unwrap_or("?")
                    .to_owned(),
                _ => "?".into(),
            }
        }
    }
}
