//! What each event becomes in a transaction (its message, its dead letter, or held
//! behind its parked aggregate), and which refusal explains an aborted one.

use rdkafka::error::KafkaError;

use super::TransactionalSink;
use crate::event::{OutboxEvent, Position};
use crate::sink::kafka::message::{self, KafkaMessage, Poison};
use crate::sink::kafka::{is_poison, is_too_large};

/// Why an event goes to the dead-letter topic in the next transaction.
pub(super) enum Refusal {
    DeadLetter(Poison),
    /// Too large even for the dead-letter topic: its metadata goes there.
    MetadataOnly(Poison),
}

/// What one event becomes in a transaction.
pub(super) enum Plan<'a> {
    Message(KafkaMessage<'a>),
    DeadLetter {
        msg: KafkaMessage<'a>,
        reason: String,
        metadata_only: bool,
        /// The payload did not fit its schema.
        violation: bool,
        kind: &'static str,
        /// Its aggregate parks from it on.
        parks: bool,
    },
    /// Its aggregate is parked: kept in PostgreSQL before the commit, not sent.
    Held,
}

impl<'a> Plan<'a> {
    pub(super) fn msg(&self) -> Option<&KafkaMessage<'a>> {
        match self {
            Plan::Message(msg) | Plan::DeadLetter { msg, .. } => Some(msg),
            Plan::Held => None,
        }
    }
}

/// Events are told apart across attempts by position and id (several share a position
/// in log mode).
pub(super) type EventKey = (Position, Option<bytestring::ByteString>);

pub(super) fn key_of(event: &OutboxEvent) -> EventKey {
    (event.position, event.id.clone())
}

impl TransactionalSink {
    /// What `event` becomes: its message, or its dead letter when it is poison or a
    /// broker refused it for good before.
    pub(super) fn plan<'a>(&self, event: &'a OutboxEvent) -> Plan<'a> {
        let dead_letter = |poison: Poison, metadata_only: bool| {
            let mut msg = message::to_dead_letter(event, &poison, &self.config);
            if metadata_only {
                let size = msg.value.len();
                msg = message::to_dead_letter_metadata(event, &poison, size, &self.config);
            }
            Plan::DeadLetter {
                msg,
                reason: poison.reason,
                metadata_only,
                violation: poison.schema_violation,
                kind: poison.kind,
                parks: self.parking.as_ref().is_some_and(|p| p.park(event)),
            }
        };
        match self.refused.lock().unwrap().get(&key_of(event)) {
            Some(Refusal::DeadLetter(poison)) => return dead_letter(poison.clone(), false),
            Some(Refusal::MetadataOnly(poison)) => return dead_letter(poison.clone(), true),
            None => {}
        }
        if self.parking.as_ref().is_some_and(|p| p.holds(event)) {
            // A poison event behind its parked aggregate is still dead-lettered (and
            // kept with its own error).
            return match message::to_message(event, &self.config) {
                Ok(_) => Plan::Held,
                Err(poison) => dead_letter(poison, false),
            };
        }
        match message::to_message(event, &self.config) {
            Ok(msg) => Plan::Message(msg),
            Err(poison) => {
                tracing::warn!(
                    event_id = event.id.as_deref().unwrap_or("?"),
                    position = %event.position,
                    reason = %poison.reason,
                    "poison event, sending it to the dead-letter topic"
                );
                dead_letter(poison, false)
            }
        }
    }

    /// Picks the refusal that explains the abort, and remembers the event to
    /// dead-letter next time when the refusal was about the event itself.
    ///
    /// A broker checks a topic's size limit against a whole produce batch, so when
    /// several events were refused as too large, the largest is the one to blame.
    pub(super) fn blame<'r>(
        &self,
        events: &[OutboxEvent],
        plans: &[Plan<'_>],
        refusals: &'r [(usize, KafkaError)],
    ) -> Option<(usize, &'r KafkaError)> {
        let size = |i: usize| {
            plans
                .get(i)
                .and_then(Plan::msg)
                .map_or(0, |m| m.value.len())
        };
        let (i, e) = refusals
            .iter()
            .filter(|(i, e)| is_too_large(e) && *i < events.len())
            .max_by_key(|(i, _)| size(*i))
            .or_else(|| refusals.iter().min_by_key(|(i, _)| *i))
            .map(|(i, e)| (*i, e))?;
        let (Some(event), Some(plan)) = (events.get(i), plans.get(i)) else {
            return Some((i, e));
        };
        let refusal = match plan {
            // Many aggregates refused on one topic: the topic is the problem. The
            // transaction is aborted and goes again, unchanged, until it is fixed.
            Plan::Message(msg)
                if is_poison(e)
                    && self
                        .parking
                        .as_ref()
                        .is_some_and(|p| p.topic_refuses(&msg.topic)) =>
            {
                tracing::error!(topic = %msg.topic, error = %e, "the topic refuses events of many aggregates: not dead-lettering more of them; fix the topic (an ACL, a deleted topic?)");
                None
            }
            Plan::Message(_) if is_poison(e) => Some(Refusal::DeadLetter(Poison::refused(e))),
            Plan::DeadLetter {
                reason,
                metadata_only: false,
                kind,
                violation,
                ..
            } if is_too_large(e) && self.config.metadata_dead_letters => {
                Some(Refusal::MetadataOnly(Poison {
                    kind,
                    schema_violation: *violation,
                    ..Poison::new(reason.clone())
                }))
            }
            _ => None,
        };
        if let Some(refusal) = refusal {
            tracing::warn!(
                event_id = event.id.as_deref().unwrap_or("?"),
                position = %event.position,
                error = %e,
                "the broker refused this event for good: the transaction is aborted and the \
                 batch goes again with the event on the dead-letter topic"
            );
            self.refused.lock().unwrap().insert(key_of(event), refusal);
        }
        Some((i, e))
    }
}
