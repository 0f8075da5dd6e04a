//! `[sink.kafka]`: brokers, topic routing, message format and librdkafka passthrough.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use super::schema::config::{validate_entries, RawRegistryConfig, RawSchemaEntry};
use super::schema::Contracts;
use super::topic::{validate_topic_name, TopicTemplate};
use crate::config::Problems;

const DEFAULT_TOPIC: &str = "outbox.{aggregate_type}";
const DEFAULT_DEAD_LETTER_TOPIC: &str = "outbox.dlq";
const DEFAULT_CHECKPOINT_TOPIC: &str = "outbox-relay.checkpoints";

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
    /// Patterns (`*` any run of characters) a row's topic column may name.
    row_topics: Option<Vec<String>>,
    #[serde(default)]
    librdkafka: BTreeMap<String, serde_json::Value>,
    #[serde(default = "default_delivery")]
    delivery: String,
    transactional_id: Option<String>,
    #[serde(default = "default_checkpoint_topic")]
    checkpoint_topic: String,
    schema_registry: Option<RawRegistryConfig>,
    #[serde(default)]
    schemas: Vec<RawSchemaEntry>,
    #[serde(default = "default_on_poison")]
    on_poison: String,
}

fn default_on_poison() -> String {
    "park".into()
}

fn default_delivery() -> String {
    "at_least_once".into()
}
fn default_checkpoint_topic() -> String {
    DEFAULT_CHECKPOINT_TOPIC.into()
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

/// What a dead-lettered event does to its aggregate's later events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnPoison {
    /// They are held, in order, in PostgreSQL until an operator redrives or discards
    /// the aggregate's queue: a consumer never sees an aggregate's event after a gap.
    Park,
    /// They flow past the dead letter.
    Skip,
}

/// What the sink promises about duplicates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryMode {
    /// One idempotent producer; an event may appear twice after a crash.
    AtLeastOnce,
    /// Each batch is one Kafka transaction that also records the batch's source position
    /// in the checkpoint topic (see [`super::transactional`]).
    ExactlyOnce,
}

/// Why a librdkafka override is refused: it would let the producer reorder, drop or
/// duplicate what the relay's guarantees rest on. `None` when it is harmless.
fn refused_override(key: &str, value: &str) -> Option<String> {
    let must = |wanted: &[&str], why: &str| {
        (!wanted.contains(&value)).then(|| {
            format!(
                "{value:?} would break {why}; remove the key (the relay sets {})",
                wanted[0]
            )
        })
    };
    match key {
        "enable.idempotence" => must(
            &["true"],
            "per-key order: without idempotence a retried batch can land behind a later one",
        ),
        "acks" | "request.required.acks" => must(
            &["all", "-1"],
            "durability: the relay deletes rows once Kafka acknowledged them, so every in-sync \
             replica must have them",
        ),
        "message.timeout.ms" | "delivery.timeout.ms" => must(
            &["0"],
            "per-key order: a message that times out is retried by the relay behind the ones \
             that did not",
        ),
        "max.in.flight.requests.per.connection" | "max.in.flight" => match value.parse::<u32>() {
            Ok(1..=5) => None,
            _ => Some(format!(
                "{value:?} would break per-key order: the idempotent producer keeps order with \
                 at most 5 requests in flight; use 1 to 5 or remove the key"
            )),
        },
        "transactional.id" => Some(format!(
            "{value:?}: the relay sets the transactional id itself; use \
             sink.kafka.transactional_id (with sink.kafka.delivery = \"exactly_once\")"
        )),
        "retries" | "message.send.max.retries" => Some(format!(
            "{value:?} would let a message fail for good after some retries and the ones behind \
             it go ahead; remove the key (librdkafka then retries until delivered)"
        )),
        _ => None,
    }
}

/// The part of a topic template before its first placeholder.
fn literal_prefix(template: &str) -> &str {
    &template[..template.find('{').unwrap_or(template.len())]
}

/// Whether `topic` matches `pattern`, where `*` stands for any run of characters.
pub fn topic_matches(pattern: &str, topic: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = topic.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// Property names whose values are secrets: never printed, not even by `Debug`.
fn is_secret_property(key: &str) -> bool {
    [
        "password",
        "secret",
        "sasl.oauthbearer.config",
        "ssl.key.pem",
    ]
    .iter()
    .any(|marker| key.contains(marker))
}

/// Validated `[sink.kafka]`.
#[derive(Clone)]
pub struct KafkaSinkConfig {
    pub brokers: String,
    pub topic: TopicTemplate,
    /// Per-aggregate-type topic templates that win over `topic`.
    pub topic_overrides: HashMap<String, TopicTemplate>,
    pub dead_letter_topic: String,
    pub format: Format,
    /// What a row's topic column may name (patterns, `*` a wildcard).
    pub row_topics: Vec<String>,
    /// May an event too large for the dead-letter topic go there as metadata only (its
    /// body kept in PostgreSQL)? Set from `source.dead_letter_table`.
    pub metadata_dead_letters: bool,
    /// Extra librdkafka properties, applied after (and so over) the relay's defaults.
    pub librdkafka: BTreeMap<String, String>,
    pub delivery: DeliveryMode,
    /// Exactly-once: the producer's `transactional.id`; derived from the outbox's
    /// identity when `None`.
    pub transactional_id: Option<String>,
    /// Exactly-once: the compacted topic that holds each outbox's last committed position.
    pub checkpoint_topic: String,
    /// The event schemas and their registry (`[[sink.kafka.schemas]]`), when configured.
    pub contracts: Option<Arc<Contracts>>,
    pub on_poison: OnPoison,
}

impl std::fmt::Debug for KafkaSinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let librdkafka: BTreeMap<&str, &str> = self
            .librdkafka
            .iter()
            .map(|(k, v)| {
                let shown = if is_secret_property(k) {
                    "<redacted>"
                } else {
                    v
                };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("KafkaSinkConfig")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("topic_overrides", &self.topic_overrides)
            .field("dead_letter_topic", &self.dead_letter_topic)
            .field("format", &self.format)
            .field("row_topics", &self.row_topics)
            .field("metadata_dead_letters", &self.metadata_dead_letters)
            .field("librdkafka", &librdkafka)
            .field("delivery", &self.delivery)
            .field("transactional_id", &self.transactional_id)
            .field("checkpoint_topic", &self.checkpoint_topic)
            .field("contracts", &self.contracts)
            .field("on_poison", &self.on_poison)
            .finish()
    }
}

impl RawKafkaSinkConfig {
    /// Validates the section; `base` is the config file's folder (schema files are
    /// relative to it).
    pub fn validate(mut self, problems: &mut Problems, base: &Path) -> Option<KafkaSinkConfig> {
        let schemas = std::mem::take(&mut self.schemas);
        let registry = self.schema_registry.take();
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
        let delivery = match self.delivery.as_str() {
            "at_least_once" => Some(DeliveryMode::AtLeastOnce),
            "exactly_once" => Some(DeliveryMode::ExactlyOnce),
            other => {
                problems.push(
                    "sink.kafka.delivery",
                    format!(
                        "unknown delivery {other:?}: use \"at_least_once\" or \"exactly_once\""
                    ),
                );
                None
            }
        };
        let on_poison = match self.on_poison.as_str() {
            "park" => Some(OnPoison::Park),
            "skip" => Some(OnPoison::Skip),
            other => {
                problems.push(
                    "sink.kafka.on_poison",
                    format!("unknown value {other:?}: use \"park\" or \"skip\""),
                );
                None
            }
        };
        if let Some(id) = &self.transactional_id {
            if delivery != Some(DeliveryMode::ExactlyOnce) {
                problems.push(
                    "sink.kafka.transactional_id",
                    "only means something with sink.kafka.delivery = \"exactly_once\": \
                     set that, or remove the key",
                );
                ok = false;
            } else if id.trim().is_empty() {
                problems.push(
                    "sink.kafka.transactional_id",
                    "is empty: name the outbox (every replica of one outbox must use the same \
                     id), or remove the key to derive it",
                );
                ok = false;
            }
        }
        if let Err(e) = validate_topic_name(&self.checkpoint_topic) {
            problems.push("sink.kafka.checkpoint_topic", e);
            ok = false;
        } else if self.checkpoint_topic == self.dead_letter_topic {
            problems.push(
                "sink.kafka.checkpoint_topic",
                "must differ from sink.kafka.dead_letter_topic",
            );
            ok = false;
        }
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
            if let Some(why) = refused_override(&key, &text) {
                problems.push(format!("sink.kafka.librdkafka.{key}"), why);
                ok = false;
                continue;
            }
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
        // By default a row may name only topics that look like the relay's own (the
        // template's fixed prefix): a topic column is a routing aid, not a way for any
        // writer of the outbox to reach every topic the relay's principal may write.
        let row_topics = match self.row_topics {
            Some(patterns) => {
                for p in &patterns {
                    if p.is_empty()
                        || p.chars()
                            .any(|c| c != '*' && !super::topic::is_topic_char(c))
                    {
                        problems.push(
                            "sink.kafka.row_topics",
                            format!("{p:?} is not a topic pattern: topic characters and '*'"),
                        );
                        ok = false;
                    }
                }
                patterns
            }
            None => vec![format!("{}*", literal_prefix(&self.topic))],
        };
        let contracts = contracts(registry, schemas, format, problems, base);
        if !ok {
            return None;
        }
        Some(KafkaSinkConfig {
            brokers: brokers?,
            topic: topic?,
            topic_overrides,
            dead_letter_topic: self.dead_letter_topic,
            format: format?,
            row_topics,
            metadata_dead_letters: true,
            librdkafka,
            delivery: delivery?,
            transactional_id: self.transactional_id,
            checkpoint_topic: self.checkpoint_topic,
            contracts: contracts?,
            on_poison: on_poison?,
        })
    }
}

/// `[sink.kafka.schema_registry]` and `[[sink.kafka.schemas]]`: `Some(None)` when no
/// schema is configured, `None` after a problem.
fn contracts(
    registry: Option<RawRegistryConfig>,
    raw_entries: Vec<RawSchemaEntry>,
    format: Option<Format>,
    problems: &mut Problems,
    base: &Path,
) -> Option<Option<Arc<Contracts>>> {
    {
        if raw_entries.is_empty() {
            // A registry alone is harmless (schemas may come later), but say nothing of it.
            return match registry.map(|r| r.validate(problems, base)) {
                Some(None) => None,
                _ => Some(None),
            };
        }
        let Some(registry) = registry else {
            problems.push(
                "sink.kafka.schemas",
                "needs a registry: add [sink.kafka.schema_registry] with its url",
            );
            return None;
        };
        if format == Some(Format::CloudEvents) {
            problems.push(
                "sink.kafka.schemas",
                "cannot be combined with sink.kafka.format = \"cloudevents\" (a CloudEvents \
                 envelope is JSON; a schema encodes the payload itself): use format = \"raw\", \
                 or remove the schemas",
            );
            return None;
        }
        let registry = registry.validate(problems, base)?;
        let entries =
            validate_entries(raw_entries, Some(registry.subject_strategy), problems, base)?;
        for e in &entries {
            if let super::schema::SchemaSource::File { codec, .. } = &e.source {
                if registry.subject_strategy == super::schema::SubjectStrategy::Topic {
                    continue;
                }
                if codec.record_name().is_none() {
                    problems.push(
                        format!("{}.file", e.key),
                        "has no record name for this subject_strategy (an Avro schema whose top \
                         level is a record, enum or fixed; a JSON Schema with a \"title\"): add \
                         one, or use subject_strategy = \"topic\"",
                    );
                    return None;
                }
            }
        }
        match Contracts::new(registry, entries) {
            Ok(c) => Some(Some(Arc::new(c))),
            Err(e) => {
                problems.push("sink.kafka.schema_registry", e);
                None
            }
        }
    }
}
