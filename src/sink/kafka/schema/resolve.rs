//! Asking the registry: every subject the configuration names at start (with retries
//! while the registry cannot answer), one first met at run time before its batch goes
//! to Kafka, and the read-only compatibility questions of `check` and `schemas check`.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::registry::{Compatibility, RegistryError};
use super::{
    Codec, ContractError, Contracts, Resolved, SchemaEntry, SchemaSource, StartSubject,
    FIRST_RETRY, MAX_RETRY,
};
use crate::backoff::Backoff;
use crate::event::OutboxEvent;
use crate::metrics::Telemetry;
use crate::sink::kafka::{KafkaSinkConfig, Topics};

impl Contracts {
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
        // A file's record name, or a registered version's `message`, was checked at load.
        let subject = self
            .subject(entry, topic)
            .expect("every entry's subject can be named (checked at load)");
        let resolved = match &e.source {
            SchemaSource::File { codec, .. } => self.file_schema(e, subject, codec).await?,
            SchemaSource::Registered { version } => {
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
                return Err(ContractError::Invalid {
                    subject,
                    origin: e.origin(),
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
            let Some(topic) = crate::sink::kafka::message::topic_of(event, sink, &mut topics)
            else {
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

    /// Would the registry take each file as its subject's next version? For `check` and
    /// `schemas check`; registers nothing.
    pub async fn compatibility(
        &self,
        sink: &KafkaSinkConfig,
    ) -> Vec<(StartSubject, Result<Compatibility, ContractError>)> {
        let mut answers = Vec::new();
        for s in self.start_subjects(sink) {
            if let Some(answer) = self.compatibility_of(&s).await {
                answers.push((s, answer));
            }
        }
        answers
    }

    /// [`Contracts::compatibility`] for one subject; `None` when it cannot be named yet.
    pub async fn compatibility_of(
        &self,
        s: &StartSubject,
    ) -> Option<Result<Compatibility, ContractError>> {
        let e = &self.entries[s.entry];
        let subject = s.subject.as_ref()?;
        Some(match &e.source {
            // Some registries (Apicurio) call any schema compatible with a subject that
            // has no version: ask first whether it has one.
            SchemaSource::File { codec, .. } => match self.registry.version(subject, None).await {
                Ok(None) => Ok(Compatibility::NewSubject),
                Ok(Some(_)) => self
                    .registry
                    .compatibility(subject, codec)
                    .await
                    .map_err(ContractError::from),
                Err(e) => Err(e.into()),
            },
            SchemaSource::Registered { version } => {
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
        })
    }
}
