//! Event contracts: events of the aggregate types (and event types) that
//! `[[sink.kafka.schemas]]` names are encoded with their registered schema, in the
//! Confluent wire format, and a payload that does not fit its schema is dead-lettered
//! with the violations instead of reaching consumers
//! ([design §12](../../../../docs/design.md#12-event-contracts)).
//!
//! The registry is asked at start, never per event: [`Contracts::start`] resolves every
//! subject the configuration can name (registering the schema, or looking it up), and
//! stops the relay when the registry refuses one as incompatible. A subject first met at
//! run time (a row's topic column, an `{event_type}` topic) is resolved by
//! [`Contracts::prepare`] before its batch is handed to Kafka; while the registry cannot
//! answer, that event and those behind it wait (they fail and are read again), and none
//! goes out unencoded. [`Contracts::encode`], on the hot path, reads the cache only.
//!
//! The wire format: magic byte 0, the schema id (4 bytes, big-endian), for Protobuf the
//! message-index list, then the encoded payload.

pub mod codec;
pub mod config;
pub mod registry;
mod resolve;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

pub use codec::{Codec, SchemaFormat, Violation};
pub use config::{RegistryConfig, SchemaEntry, SchemaSource, SubjectStrategy};
use registry::{Registry, RegistryError};

use super::message::Poison;
use super::KafkaSinkConfig;

/// Registry retries at start: the first pause, doubling up to the last.
const FIRST_RETRY: Duration = Duration::from_millis(500);
const MAX_RETRY: Duration = Duration::from_secs(30);

/// Why a schema cannot be used. All but a retryable [`ContractError::Registry`] need an
/// operator: at start they stop the relay with exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum ContractError {
    #[error("{0}")]
    Registry(#[from] RegistryError),
    #[error(
        "the schema registry refuses {origin} for subject {subject} as incompatible with \
         the subject's compatibility level: {reason}. Evolve the schema compatibly (add \
         optional fields with defaults; never remove or retype one), or change the \
         subject's compatibility level on purpose"
    )]
    Incompatible {
        subject: String,
        origin: String,
        reason: String,
    },
    #[error(
        "{origin} is not registered under subject {subject}, and \
         sink.kafka.schema_registry.register = false: register it first (your CI's \
         job), or set register = true"
    )]
    NotRegistered { subject: String, origin: String },
    #[error("subject {subject} has no {origin}: register it, or fix {key}.version")]
    NoVersion {
        subject: String,
        origin: String,
        key: String,
    },
    #[error(
        "subject {subject}'s {origin} is a {got} schema, and {key}.format says {expected}: fix \
         the format, or the subject"
    )]
    WrongFormat {
        subject: String,
        origin: String,
        key: String,
        expected: SchemaFormat,
        got: SchemaFormat,
    },
    #[error(
        "the schema registry refuses {origin} for subject {subject} as an invalid schema: \
         {reason}"
    )]
    Invalid {
        subject: String,
        origin: String,
        reason: String,
    },
    #[error("subject {subject}'s schema (id {id}) does not compile: {reason}")]
    Unusable {
        subject: String,
        id: u32,
        reason: String,
    },
}

impl ContractError {
    /// Whether asking again later can succeed without an operator.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ContractError::Registry(e) if e.is_retryable())
    }
}

/// A schema resolved for one subject: what the hot path encodes with.
#[derive(Debug)]
pub struct Resolved {
    pub subject: String,
    pub id: u32,
    pub version: Option<i64>,
    pub codec: Codec,
    /// Magic byte and schema id: the start of every message.
    header: [u8; 5],
}

impl Resolved {
    fn new(subject: String, id: u32, version: Option<i64>, codec: Codec) -> Resolved {
        let mut header = [0; 5];
        header[1..].copy_from_slice(&id.to_be_bytes());
        Resolved {
            subject,
            id,
            version,
            codec,
            header,
        }
    }

    fn describe(&self) -> String {
        match self.version {
            Some(v) => format!("subject {} version {v} (id {})", self.subject, self.id),
            None => format!("subject {} (id {})", self.subject, self.id),
        }
    }
}

/// An entry's index and a topic.
type ResolvedKey = (usize, Arc<str>);

/// Which entry applies to an aggregate type's events.
#[derive(Debug, Default)]
struct Choice {
    any_event: Option<usize>,
    by_event: HashMap<String, usize>,
}

/// The configured schemas, the registry, and what it answered.
pub struct Contracts {
    registry: Registry,
    config: RegistryConfig,
    entries: Vec<SchemaEntry>,
    choices: HashMap<String, Choice>,
    /// Per entry and topic (the subject follows from both).
    resolved: RwLock<HashMap<ResolvedKey, Arc<Resolved>>>,
    /// Schemas taken from the registry, compiled once per id.
    compiled: Mutex<HashMap<u32, Codec>>,
}

impl std::fmt::Debug for Contracts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Contracts")
            .field("registry", &self.config)
            .field("entries", &self.entries)
            .finish()
    }
}

/// What [`Contracts::start_subjects`] finds for one entry.
pub struct StartSubject {
    pub entry: usize,
    /// The topic the subject is for (empty: a record subject, whatever the topic).
    pub topic: Arc<str>,
    pub subject: Option<String>,
}

impl Contracts {
    pub fn new(config: RegistryConfig, entries: Vec<SchemaEntry>) -> Result<Contracts, String> {
        let registry = Registry::new(&config).map_err(|e| e.to_string())?;
        let mut choices: HashMap<String, Choice> = HashMap::new();
        for (i, e) in entries.iter().enumerate() {
            let choice = choices.entry(e.aggregate_type.clone()).or_default();
            match &e.event_type {
                Some(t) => {
                    choice.by_event.insert(t.clone(), i);
                }
                None => choice.any_event = Some(i),
            }
        }
        Ok(Contracts {
            registry,
            config,
            entries,
            choices,
            resolved: RwLock::new(HashMap::new()),
            compiled: Mutex::new(HashMap::new()),
        })
    }

    pub fn entries(&self) -> &[SchemaEntry] {
        &self.entries
    }

    pub fn registry_config(&self) -> &RegistryConfig {
        &self.config
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The entry for events of this aggregate type and event type, if any.
    pub fn entry_for(&self, aggregate_type: &str, event_type: &str) -> Option<usize> {
        let choice = self.choices.get(aggregate_type)?;
        choice
            .by_event
            .get(event_type)
            .copied()
            .or(choice.any_event)
    }

    /// The subject of `entry` on `topic`, when it can be named before the registry
    /// answers (a registered version under a record strategy names its message).
    pub fn subject(&self, entry: usize, topic: &str) -> Option<String> {
        let e = &self.entries[entry];
        let record = match &e.source {
            SchemaSource::File { codec, .. } => codec.record_name().map(str::to_owned),
            SchemaSource::Registered { .. } => e.message.clone(),
        };
        let strategy = self.config.subject_strategy;
        match (strategy, record) {
            (SubjectStrategy::Topic, _) => Some(strategy.subject(topic, "")),
            (_, Some(record)) => Some(strategy.subject(topic, &record)),
            (_, None) => None,
        }
    }

    /// The subjects the configuration names without any event: each entry's topic when
    /// its template renders without the event, and record subjects.
    pub fn start_subjects(&self, sink: &KafkaSinkConfig) -> Vec<StartSubject> {
        let mut found = Vec::new();
        for (i, e) in self.entries.iter().enumerate() {
            let template = sink
                .topic_overrides
                .get(&e.aggregate_type)
                .unwrap_or(&sink.topic);
            let topic: Option<Arc<str>> = match &e.event_type {
                Some(t) => Some(template.render(&e.aggregate_type, t).into()),
                None if !template.uses_event_type() => {
                    Some(template.render(&e.aggregate_type, "").into())
                }
                None => None,
            };
            match topic {
                Some(topic) => found.push(StartSubject {
                    entry: i,
                    subject: self.subject(i, &topic),
                    topic,
                }),
                None if !self.config.subject_strategy.uses_topic() => found.push(StartSubject {
                    entry: i,
                    subject: self.subject(i, ""),
                    topic: "".into(),
                }),
                None => {}
            }
        }
        found
    }

    /// The payload encoded with its schema, `None` when no schema applies, or why it is
    /// poison. Reads the cache only: [`Contracts::prepare`] resolved the subject.
    pub fn encode(
        &self,
        aggregate_type: &str,
        event_type: &str,
        topic: &Arc<str>,
        payload: &[u8],
        payload_is_json: bool,
    ) -> Result<Option<Vec<u8>>, Poison> {
        let Some(entry) = self.entry_for(aggregate_type, event_type) else {
            return Ok(None);
        };
        let resolved = self
            .resolved
            .read()
            .unwrap()
            .get(&(entry, topic.clone()))
            .cloned();
        let Some(r) = resolved else {
            // Not reachable through the sinks (they prepare every batch); never unencoded.
            return Err(Poison::new(format!(
                "no schema was resolved for {} on topic {topic}",
                self.entries[entry].label()
            )));
        };
        if !payload_is_json {
            return Err(violation_poison(
                &r,
                &[Violation {
                    path: "$".into(),
                    message: "the payload is bytes (bytea); a schema encodes JSON payloads".into(),
                }],
            ));
        }
        let mut out = Vec::with_capacity(payload.len() + 8);
        out.extend_from_slice(&r.header);
        match r.codec.encode(payload, &mut out) {
            Ok(()) => Ok(Some(out)),
            Err(violations) => Err(violation_poison(&r, &violations)),
        }
    }
}

/// The dead letter's reason and headers for a payload that does not fit `r`.
fn violation_poison(r: &Resolved, violations: &[Violation]) -> Poison {
    let list: Vec<String> = violations.iter().map(ToString::to_string).collect();
    let mut poison = Poison::new(format!(
        "the payload does not fit its schema ({}): {}",
        r.describe(),
        list.join("; ")
    ));
    poison.schema_violation = true;
    poison.kind = "schema";
    poison.headers.extend([
        ("schema_subject", r.subject.clone()),
        ("schema_id", r.id.to_string()),
        (
            "schema_version",
            r.version.map_or(String::new(), |v| v.to_string()),
        ),
        ("schema_violations", list.join("\n")),
    ]);
    poison
}
