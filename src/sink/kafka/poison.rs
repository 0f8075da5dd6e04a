//! What the at-least-once sink does with a poison event: dead-letter it (its body kept in
//! PostgreSQL when even the dead-letter topic cannot take it), park its aggregate, and
//! tell a refusal about the event from one about a shared request or a whole topic.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use rdkafka::error::KafkaError;

use super::message::{self, Poison};
use super::{count_violation, is_poison, is_too_large, Delivery, KafkaSink, Pending, SinkError};
use crate::event::OutboxEvent;

impl KafkaSink {
    /// A poison event found before sending: dead-lettered, parking its aggregate.
    pub(super) fn poison(&self, event: &OutboxEvent, poison: Poison) -> Pending {
        let parks = self.parking.as_ref().is_some_and(|p| p.park(event));
        Pending::Poison(poison, parks)
    }

    /// A poison event the broker reported after the events behind it were handed over:
    /// its aggregate parks from now on, but those events are out (counted). Past
    /// [`crate::relay::parking::TOPIC_THRESHOLD`] aggregates in a short time the topic is the
    /// problem, not the events: the event fails and is sent again, and nothing more
    /// parks.
    async fn refused_for_good(&self, event: &OutboxEvent, topic: &str, e: KafkaError) -> Delivery {
        let Some(parking) = &self.parking else {
            return self.dead_letter(event, Poison::refused(&e), false).await;
        };
        if parking.topic_refuses(topic) {
            return Delivery::Failed(SinkError::TopicRefuses {
                topic: topic.to_owned(),
                source: e,
            });
        }
        let parks = parking.park(event);
        if parks {
            self.telemetry.metrics.parked_late.inc();
        }
        self.dead_letter(event, Poison::refused(&e), parks).await
    }

    /// What becomes of an event the broker refused with `e`: sent again alone when it
    /// was refused for its size as part of a shared request, dead-lettered when the
    /// refusal is about the event, failed (to be sent again) otherwise.
    pub(super) async fn refused(
        &self,
        event: &OutboxEvent,
        topic: Arc<str>,
        e: KafkaError,
        alone: bool,
    ) -> Delivery {
        if !alone && is_too_large(&e) {
            self.send_alone(event, topic).await
        } else if is_poison(&e) {
            self.refused_for_good(event, &topic, e).await
        } else {
            Delivery::Failed(SinkError::Delivery {
                topic: topic.to_string(),
                source: e,
            })
        }
    }

    pub(super) async fn dead_letter(
        &self,
        event: &OutboxEvent,
        poison: Poison,
        parks: bool,
    ) -> Delivery {
        tracing::warn!(
            event_id = event.id.as_deref().unwrap_or("?"),
            aggregate_id = event.aggregate_id.as_deref().unwrap_or("?"),
            position = %event.position,
            reason = %poison.reason,
            "poison event, sending it to the dead-letter topic"
        );
        let msg = message::to_dead_letter(event, &poison, &self.config);
        let source = match self.deliver(&msg).await {
            Ok(()) => {
                if poison.schema_violation {
                    count_violation(&self.telemetry, event);
                }
                return Delivery::DeadLettered {
                    reason: poison.reason,
                    metadata_only: false,
                    kind: poison.kind,
                    parks,
                };
            }
            Err(e) => e,
        };
        // Too large for the dead-letter topic as well: it gets what describes the event,
        // and the body stays in PostgreSQL (the source keeps it before acknowledging).
        if is_too_large(&source) && self.config.metadata_dead_letters {
            let size = msg.value.len();
            let meta = message::to_dead_letter_metadata(event, &poison, size, &self.config);
            tracing::warn!(
                event_id = event.id.as_deref().unwrap_or("?"),
                position = %event.position,
                size,
                "too large for the dead-letter topic as well: sending its metadata there and \
                 keeping its body in PostgreSQL"
            );
            if self.deliver(&meta).await.is_ok() {
                if poison.schema_violation {
                    count_violation(&self.telemetry, event);
                }
                return Delivery::DeadLettered {
                    reason: poison.reason,
                    metadata_only: true,
                    kind: poison.kind,
                    parks,
                };
            }
        }
        // The dead-letter topic refuses even that (unwritable, say): the event stays
        // unacknowledged and the relay stops advancing. Nothing is dropped.
        Delivery::Failed(SinkError::DeadLetter {
            topic: msg.topic.to_string(),
            reason: poison.reason,
            source: Box::new(source),
        })
    }

    /// An event refused for its size as part of a batch: sent again alone, so the answer
    /// is about the event itself. Its topic's events go alone from now on.
    async fn send_alone(&self, event: &OutboxEvent, topic: Arc<str>) -> Delivery {
        let first = self.one_at_a_time.lock().unwrap().insert(topic.to_string());
        self.any_one_at_a_time.store(true, Ordering::Release);
        if first {
            tracing::warn!(
                %topic,
                "the broker refused a produce batch for this topic as too large: its events \
                 are sent one per request from now on (slower). Raise the topic's \
                 max.message.bytes above the producer's batch.size, or lower \
                 [sink.kafka.librdkafka] batch.size"
            );
        }
        let msg = match message::to_message(event, &self.config) {
            Ok(msg) => msg,
            Err(poison) => {
                let parks = self.parking.as_ref().is_some_and(|p| p.park(event));
                return self.dead_letter(event, poison, parks).await;
            }
        };
        match self.deliver(&msg).await {
            Ok(()) => Delivery::Published { topic },
            Err(e) if is_poison(&e) => self.refused_for_good(event, &topic, e).await,
            Err(e) => Delivery::Failed(SinkError::Delivery {
                topic: topic.to_string(),
                source: e,
            }),
        }
    }
}
