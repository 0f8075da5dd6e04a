//! `[sink.kafka]`: brokers, topic routing, message format and librdkafka passthrough.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

use super::topic::{validate_topic_name, TopicTemplate};
use crate::config::Problems;

const DEFAULT_TOPIC: &str = "outbox.{aggregate_type}";
const DEFAULT_DEAD_LETTER_TOPIC: &str = "outbox.dlq";

#[derive(Deserialize)]
pub struct RawKafkaSinkConfig {
    brokers: Option<String>,
    #[serde(default = "default_topic")]
    topic: String,
    #[serde(default)]
    topic_overrides: BTreeMap<String, String>,
    #[serde(default = "default_dead_letter_topic")]
    dead_letter_topic: String,
    #[serde(default = "default_format")]
    format: String,
    #[serde(default)]
    librdkafka: BTreeMap<String, serde_json::Value>,
}

fn default_topic() -> String {
    DEFAULT_TOPIC.into()
}
fn default_dead_letter_topic() -> String {
    DEFAULT_DEAD_LETTER_TOPIC.into()
}
fn default_format() -> String {
    "raw".into()
}

/// The message value's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The payload exactly as stored.
    Raw,
    /// A CloudEvents 1.0 structured-mode JSON envelope around the payload.
    CloudEvents,
}

/// Validated `[sink.kafka]`.
#[derive(Debug, Clone)]
pub struct KafkaSinkConfig {
    pub brokers: String,
    pub topic: TopicTemplate,
    /// Per-aggregate-type topic templates that win over `topic`.
    pub topic_overrides: HashMap<String, TopicTemplate>,
    pub dead_letter_topic: String,
    pub format: Format,
    /// Extra librdkafka properties, applied after (and so over) the relay's defaults.
    pub librdkafka: BTreeMap<String, String>,
}

impl RawKafkaSinkConfig {
    pub fn validate(self, problems: &mut Problems) -> Option<KafkaSinkConfig> {
        let mut ok = true;
        let brokers = problems.required("sink.kafka.brokers", self.brokers);
        if brokers.as_deref().is_some_and(|b| b.trim().is_empty()) {
            problems.push("sink.kafka.brokers", "must list at least one host:port");
            ok = false;
        }
        let topic = TopicTemplate::parse(&self.topic)
            .map_err(|e| problems.push("sink.kafka.topic", e))
            .ok();
        let mut topic_overrides = HashMap::new();
        for (aggregate_type, template) in &self.topic_overrides {
            match TopicTemplate::parse(template) {
                Ok(t) => {
                    topic_overrides.insert(aggregate_type.clone(), t);
                }
                Err(e) => {
                    problems.push(format!("sink.kafka.topic_overrides.{aggregate_type}"), e);
                    ok = false;
                }
            }
        }
        if let Err(e) = validate_topic_name(&self.dead_letter_topic) {
            problems.push("sink.kafka.dead_letter_topic", e);
            ok = false;
        }
        let format = match self.format.as_str() {
            "raw" => Some(Format::Raw),
            "cloudevents" => Some(Format::CloudEvents),
            other => {
                problems.push(
                    "sink.kafka.format",
                    format!("unknown format {other:?}: use \"raw\" or \"cloudevents\""),
                );
                None
            }
        };
        let mut librdkafka = BTreeMap::new();
        for (key, value) in self.librdkafka {
            let text = match value {
                serde_json::Value::String(s) => s,
                serde_json::Value::Number(n) => n.to_string(),
                serde_json::Value::Bool(b) => b.to_string(),
                _ => {
                    problems.push(
                        format!("sink.kafka.librdkafka.{key}"),
                        "must be a string, number or boolean (librdkafka properties are scalars)",
                    );
                    ok = false;
                    continue;
                }
            };
            librdkafka.insert(key, text);
        }
        // librdkafka knows its own properties best: let it judge names and values now,
        // at check time, rather than at the first produce.
        let mut native = rdkafka::ClientConfig::new();
        for (key, value) in &librdkafka {
            native.set(key, value);
        }
        if let Err(e) = native.create_native_config() {
            problems.push(
                "sink.kafka.librdkafka",
                format!("librdkafka refused a property: {e}"),
            );
            ok = false;
        }
        if !ok {
            return None;
        }
        Some(KafkaSinkConfig {
            brokers: brokers?,
            topic: topic?,
            topic_overrides,
            dead_letter_topic: self.dead_letter_topic,
            format: format?,
            librdkafka,
        })
    }
}
