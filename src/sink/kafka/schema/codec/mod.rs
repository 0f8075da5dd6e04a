//! From the application's plain JSON payload to a schema's binary encoding.
//!
//! Each format checks the payload against its schema while encoding it, so a payload
//! that does not fit comes back as [`Violation`]s (JSON paths and what was expected),
//! never as a message consumers cannot decode. The wire framing (magic byte, schema id)
//! is the caller's: a codec writes what follows it.

mod avro;
mod json_schema;
mod protobuf;

use std::fmt;
use std::sync::Arc;

/// The schema languages the relay encodes with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemaFormat {
    Avro,
    Protobuf,
    JsonSchema,
}

impl SchemaFormat {
    /// The registry's `schemaType` (absent means AVRO).
    pub fn registry_type(self) -> &'static str {
        match self {
            SchemaFormat::Avro => "AVRO",
            SchemaFormat::Protobuf => "PROTOBUF",
            SchemaFormat::JsonSchema => "JSON",
        }
    }

    pub fn from_registry_type(t: Option<&str>) -> Option<SchemaFormat> {
        match t.unwrap_or("AVRO") {
            "AVRO" => Some(SchemaFormat::Avro),
            "PROTOBUF" => Some(SchemaFormat::Protobuf),
            "JSON" => Some(SchemaFormat::JsonSchema),
            _ => None,
        }
    }
}

impl fmt::Display for SchemaFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SchemaFormat::Avro => "avro",
            SchemaFormat::Protobuf => "protobuf",
            SchemaFormat::JsonSchema => "json_schema",
        })
    }
}

/// One place where a payload does not fit its schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Where, as a JSON path: `$.lines[2].qty` (`$` is the payload itself).
    pub path: String,
    /// What the schema wanted there.
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// At most this many violations are reported per payload: the first ones tell what is
/// wrong, and a header has to stay small.
pub const MAX_VIOLATIONS: usize = 10;

/// A compiled schema: parsed once, shared by every event it encodes.
#[derive(Clone)]
pub struct Codec(Arc<Inner>);

enum Inner {
    Avro(avro::AvroCodec),
    Protobuf(protobuf::ProtoCodec),
    Json(json_schema::JsonCodec),
}

impl fmt::Debug for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Codec({}, {:?})", self.format(), self.record_name())
    }
}

impl Codec {
    /// Compiles schema `text`; `message` picks a Protobuf file's message.
    pub fn compile(
        format: SchemaFormat,
        text: &str,
        message: Option<&str>,
    ) -> Result<Codec, String> {
        let inner = match format {
            SchemaFormat::Avro => Inner::Avro(avro::AvroCodec::compile(text)?),
            SchemaFormat::Protobuf => {
                Inner::Protobuf(protobuf::ProtoCodec::compile(text, message)?)
            }
            SchemaFormat::JsonSchema => Inner::Json(json_schema::JsonCodec::compile(text)?),
        };
        Ok(Codec(Arc::new(inner)))
    }

    pub fn format(&self) -> SchemaFormat {
        match &*self.0 {
            Inner::Avro(_) => SchemaFormat::Avro,
            Inner::Protobuf(_) => SchemaFormat::Protobuf,
            Inner::Json(_) => SchemaFormat::JsonSchema,
        }
    }

    /// The schema's text, as registered.
    pub fn text(&self) -> &str {
        match &*self.0 {
            Inner::Avro(c) => c.text(),
            Inner::Protobuf(c) => c.text(),
            Inner::Json(c) => c.text(),
        }
    }

    /// The record's full name, for the record subject strategies: an Avro record's
    /// `namespace.name`, a Protobuf message's `package.Message`, a JSON Schema's `title`.
    pub fn record_name(&self) -> Option<&str> {
        match &*self.0 {
            Inner::Avro(c) => c.record_name(),
            Inner::Protobuf(c) => Some(c.record_name()),
            Inner::Json(c) => c.record_name(),
        }
    }

    /// Appends what follows the schema id in the wire format: the encoded payload (after
    /// the message indexes, for Protobuf).
    pub fn encode(&self, payload: &[u8], out: &mut Vec<u8>) -> Result<(), Vec<Violation>> {
        match &*self.0 {
            Inner::Avro(c) => c.encode(payload, out),
            Inner::Protobuf(c) => c.encode(payload, out),
            Inner::Json(c) => c.encode(payload, out),
        }
    }
}

/// A JSON path under construction: `$`, then `.field`, `["odd key"]` or `[index]`.
#[derive(Debug, Clone, Default)]
pub(crate) struct JsonPath(String);

impl JsonPath {
    pub fn root() -> JsonPath {
        JsonPath("$".into())
    }

    /// The path one step down, into an object's `key`.
    pub fn key(&self, key: &str) -> JsonPath {
        let plain = !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if plain {
            JsonPath(format!("{}.{key}", self.0))
        } else {
            JsonPath(format!("{}[{}]", self.0, serde_json::Value::from(key)))
        }
    }

    /// The path one step down, into an array's element `i`.
    pub fn index(&self, i: usize) -> JsonPath {
        JsonPath(format!("{}[{i}]", self.0))
    }

    pub fn violation(&self, message: impl Into<String>) -> Violation {
        Violation {
            path: self.0.clone(),
            message: message.into(),
        }
    }
}

/// The payload as JSON, or the violation that it is not.
fn parse_json(payload: &[u8]) -> Result<serde_json::Value, Vec<Violation>> {
    serde_json::from_slice(payload)
        .map_err(|e| vec![JsonPath::root().violation(format!("not valid JSON: {e}"))])
}

#[cfg(test)]
mod tests;
