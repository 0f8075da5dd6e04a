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

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::event::OutboxEvent;
use crate::metrics::Telemetry;
pub use codec::{Codec, SchemaFormat, Violation};
pub use config::{RegistryConfig, SchemaEntry, SchemaSource, SubjectStrategy};
use registry::{Compatibility, Registry, RegistryError};

use super::message::Poison;
use super::{KafkaSinkConfig, Topics};

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

    /// Resolves every subject the configuration names, asking again (with backoff, and
    /// the relay not ready) while the registry cannot answer. Returns early, with
    /// nothing resolved, when `shutdown` fires.
    pub async fn start(
        &self,
        sink: &KafkaSinkConfig,
        telemetry: &Telemetry,
        shutdown: &CancellationToken,
    ) -> Result<(), ContractError> {
        let mut pending = self.start_subjects(sink);
        let mut backoff = Backoff::new(FIRST_RETRY, MAX_RETRY);
        loop {
            let mut waiting = Vec::new();
            let mut last = None;
            for s in pending {
                match self.resolve(s.entry, &s.topic).await {
                    Ok(r) => tracing::info!(
                        schema = %self.entries[s.entry].origin(),
                        applies_to = %self.entries[s.entry].label(),
                        "event contract: {}",
                        r.describe()
                    ),
                    Err(e) if e.is_retryable() => {
                        last = Some(e.to_string());
                        waiting.push(s);
                    }
                    Err(e) => return Err(e),
                }
            }
            let Some(why) = last else {
                telemetry.health.set_registry(None);
                return Ok(());
            };
            let pause = backoff.next_pause();
            tracing::warn!(error = %why, retry_in = ?pause, "cannot resolve the event schemas yet; nothing is published until they are");
            telemetry.health.set_registry(Some(why));
            pending = waiting;
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// One attempt to resolve `entry` on `topic`: register or look up its file, or fetch
    /// its registered version. Cached for the relay's lifetime.
    pub async fn resolve(
        &self,
        entry: usize,
        topic: &Arc<str>,
    ) -> Result<Arc<Resolved>, ContractError> {
        let key = (entry, topic.clone());
        if let Some(r) = self.resolved.read().unwrap().get(&key) {
            return Ok(r.clone());
        }
        let e = &self.entries[entry];
        let resolved = match &e.source {
            SchemaSource::File { codec, .. } => {
                let subject = self
                    .subject(entry, topic)
                    .expect("a file's record name was checked at load");
                self.file_schema(e, subject, codec).await?
            }
            SchemaSource::Registered { version } => {
                let subject = self
                    .subject(entry, topic)
                    .expect("a registered version's subject was checked at load");
                self.registered_schema(e, subject, *version).await?
            }
        };
        let resolved = Arc::new(resolved);
        self.resolved.write().unwrap().insert(key, resolved.clone());
        Ok(resolved)
    }

    async fn file_schema(
        &self,
        e: &SchemaEntry,
        subject: String,
        codec: &Codec,
    ) -> Result<Resolved, ContractError> {
        if let Some(found) = self.registry.lookup(&subject, codec).await? {
            return Ok(Resolved::new(
                subject,
                found.id,
                found.version,
                codec.clone(),
            ));
        }
        if !self.config.register {
            return Err(ContractError::NotRegistered {
                subject,
                origin: e.origin(),
            });
        }
        match self.registry.register(&subject, codec).await {
            Ok(_) => {}
            Err(RegistryError::Refused {
                status: 409,
                message,
                ..
            }) => {
                return Err(ContractError::Incompatible {
                    subject,
                    origin: e.origin(),
                    reason: message,
                })
            }
            Err(RegistryError::Refused {
                code: 42201,
                message,
                ..
            }) => {
                return Err(ContractError::Unusable {
                    subject,
                    id: 0,
                    reason: message,
                })
            }
            Err(other) => return Err(other.into()),
        }
        // The registration's answer has the id only: the lookup gives the version too.
        match self.registry.lookup(&subject, codec).await? {
            Some(found) => Ok(Resolved::new(
                subject,
                found.id,
                found.version,
                codec.clone(),
            )),
            None => Err(RegistryError::Unrecognised {
                url: self.config.url.clone(),
                status: 200,
                body: format!("a schema just registered under {subject} is not found there"),
            }
            .into()),
        }
    }

    async fn registered_schema(
        &self,
        e: &SchemaEntry,
        subject: String,
        version: Option<u32>,
    ) -> Result<Resolved, ContractError> {
        let Some(fetched) = self.registry.version(&subject, version).await? else {
            return Err(ContractError::NoVersion {
                subject,
                origin: e.origin(),
                key: e.key.clone(),
            });
        };
        if fetched.format != e.format {
            return Err(ContractError::WrongFormat {
                subject,
                origin: e.origin(),
                key: e.key.clone(),
                expected: e.format,
                got: fetched.format,
            });
        }
        let known = self.compiled.lock().unwrap().get(&fetched.id).cloned();
        let codec = match known {
            Some(codec) => codec,
            None => {
                let codec = Codec::compile(e.format, &fetched.text, e.message.as_deref()).map_err(
                    |reason| ContractError::Unusable {
                        subject: subject.clone(),
                        id: fetched.id,
                        reason,
                    },
                )?;
                self.compiled
                    .lock()
                    .unwrap()
                    .insert(fetched.id, codec.clone());
                codec
            }
        };
        Ok(Resolved::new(
            subject,
            fetched.id,
            Some(fetched.version),
            codec,
        ))
    }

    /// Resolves what `events` need that is not resolved yet (subjects first met at run
    /// time). On failure: the index of the first event that must wait, and why.
    pub async fn prepare(
        &self,
        events: &[OutboxEvent],
        sink: &KafkaSinkConfig,
    ) -> Result<(), (usize, ContractError)> {
        let mut topics = Topics::default();
        for (i, event) in events.iter().enumerate() {
            let (Some(a), Some(t)) = (event.aggregate_type.as_deref(), event.event_type.as_deref())
            else {
                continue;
            };
            let Some(entry) = self.entry_for(a, t) else {
                continue;
            };
            // A poison event has no topic: it goes to the dead-letter topic as it is.
            let Some(topic) = super::message::topic_of(event, sink, &mut topics) else {
                continue;
            };
            if self
                .resolved
                .read()
                .unwrap()
                .contains_key(&(entry, topic.clone()))
            {
                continue;
            }
            match self.resolve(entry, &topic).await {
                Ok(r) => tracing::info!(
                    applies_to = %self.entries[entry].label(),
                    %topic,
                    "event contract for a topic first met: {}",
                    r.describe()
                ),
                Err(e) => return Err((i, e)),
            }
        }
        Ok(())
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

    /// Would the registry take each file as its subject's next version? For `check` and
    /// `schemas check`; registers nothing.
    pub async fn compatibility(
        &self,
        sink: &KafkaSinkConfig,
    ) -> Vec<(StartSubject, Result<Compatibility, ContractError>)> {
        let mut answers = Vec::new();
        for s in self.start_subjects(sink) {
            let e = &self.entries[s.entry];
            let answer = match (&e.source, &s.subject) {
                // Some registries (Apicurio) call any schema compatible with a subject
                // that has no version: ask first whether it has one.
                (SchemaSource::File { codec, .. }, Some(subject)) => {
                    match self.registry.version(subject, None).await {
                        Ok(None) => Ok(Compatibility::NewSubject),
                        Ok(Some(_)) => self
                            .registry
                            .compatibility(subject, codec)
                            .await
                            .map_err(ContractError::from),
                        Err(e) => Err(e.into()),
                    }
                }
                (SchemaSource::Registered { version }, Some(subject)) => {
                    match self.registry.version(subject, *version).await {
                        Ok(Some(_)) => Ok(Compatibility::Compatible),
                        Ok(None) => Err(ContractError::NoVersion {
                            subject: subject.clone(),
                            origin: e.origin(),
                            key: e.key.clone(),
                        }),
                        Err(err) => Err(err.into()),
                    }
                }
                (_, None) => continue,
            };
            answers.push((s, answer));
        }
        answers
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
