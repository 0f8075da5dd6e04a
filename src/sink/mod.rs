//! Where events go: Kafka, at least once ([`kafka::KafkaSink`]) or exactly once
//! ([`kafka::TransactionalSink`]).
//!
//! The relay loop sees it through [`Sink`], two steps per batch, so that it can keep two
//! batches with the broker at once and so that its logic (durable prefix, rewind,
//! stall, shutdown grace) is tested against a fake sink without a broker.

pub mod kafka;

use std::future::Future;

use crate::event::OutboxEvent;
pub use kafka::{Delivery, SinkError};

/// A destination that takes events in order and reports, per event, what became of it.
///
/// Delivery is at-least-once: the relay acknowledges an event to PostgreSQL only after
/// its outcome is durable ([`Delivery::is_durable`]).
pub trait Sink: Send + Sync + 'static {
    /// A batch handed over whose outcomes are not collected yet.
    type Sent: Send + 'static;

    /// Hands every event of the batch over, in order. Batches sent one after the other
    /// keep their order, so the next one may be sent before this one is collected.
    fn send(&self, events: &[OutboxEvent]) -> impl Future<Output = Self::Sent> + Send;

    /// The relay gave up on every batch handed over and not collected (they were
    /// abandoned after a failure, and their collections have ended): the next batch
    /// starts afresh from the oldest unacknowledged event.
    fn reset(&self) {}

    /// Whether the sink keeps dead letters and held events in PostgreSQL itself
    /// (exactly-once: before its transaction commits); otherwise the relay keeps them
    /// before acknowledging.
    fn keeps_dead_letters(&self) -> bool {
        false
    }

    /// Reads topics' size limits again before the next events (an operator raised one
    /// and redrives).
    fn forget_topic_limits(&self) {}

    /// Waits for each event's outcome, in the batch's order. A failure no retry can fix
    /// (the producer is unusable) comes back as [`SinkError::Fatal`].
    fn collect(
        &self,
        events: &[OutboxEvent],
        sent: Self::Sent,
    ) -> impl Future<Output = Vec<Delivery>> + Send;
}
