//! JSON Schema: the payload is validated by `jsonschema` and goes out as written (the
//! Confluent JSON Schema format is the JSON text after the id).
//!
//! Remote `$ref`s are not fetched (the crate is built without its HTTP and file
//! resolvers): a schema that needs one is refused when it is compiled.

use jsonschema::paths::LocationSegment;

use super::{parse_json, JsonPath, Violation, MAX_VIOLATIONS};

pub struct JsonCodec {
    text: String,
    validator: jsonschema::Validator,
    title: Option<String>,
}

impl JsonCodec {
    pub fn compile(text: &str) -> Result<JsonCodec, String> {
        let schema: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let validator =
            jsonschema::validator_for(&schema).map_err(|e| format!("not a JSON Schema: {e}"))?;
        let title = schema
            .get("title")
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned);
        Ok(JsonCodec {
            text: text.to_owned(),
            validator,
            title,
        })
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn record_name(&self) -> Option<&str> {
        self.title.as_deref()
    }

    pub fn encode(&self, payload: &[u8], out: &mut Vec<u8>) -> Result<(), Vec<Violation>> {
        let json = parse_json(payload)?;
        let violations: Vec<Violation> = self
            .validator
            .iter_errors(&json)
            .take(MAX_VIOLATIONS)
            .map(|e| {
                let mut at = JsonPath::root();
                for segment in e.instance_path().iter() {
                    at = match segment {
                        LocationSegment::Property(p) => at.key(&p),
                        LocationSegment::Index(i) => at.index(i),
                    };
                }
                at.violation(e.to_string())
            })
            .collect();
        if !violations.is_empty() {
            return Err(violations);
        }
        out.extend_from_slice(payload);
        Ok(())
    }
}
