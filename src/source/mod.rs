//! Where events come from: the PostgreSQL side of the relay.
//!
//! Both capture modes yield the same [`OutboxEvent`](crate::event::OutboxEvent)s and
//! accept the same acknowledgement: "Kafka has these, you may forget them". What
//! forgetting means is theirs: the polling source deletes rows, the logical source
//! advances the slot's flushed LSN.

pub(crate) mod config;
mod error;
pub mod logical;
pub mod polling;
pub mod table;

use std::future::Future;

pub use config::{
    quote_ident, quote_ident_opt, Columns, Mode, RawSourceConfig, SourceConfig, TableName,
};
pub use error::SourceError;

use crate::event::OutboxEvent;

/// A capture mode, as the relay loop sees it.
///
/// The contract that makes the pipeline at-least-once: `next_batch` may return an event
/// again until it has been passed to `ack`, and `ack` is only called for events Kafka has
/// acknowledged. Batches are returned in publication order (`seq` or commit order).
pub trait Source: Send {
    /// The next events to publish, at most `max`; an empty batch means "nothing now".
    fn next_batch(
        &mut self,
        max: usize,
    ) -> impl Future<Output = Result<Vec<OutboxEvent>, SourceError>> + Send;

    /// Forgets events Kafka has acknowledged (delete the rows / advance the slot).
    fn ack(
        &mut self,
        events: &[OutboxEvent],
    ) -> impl Future<Output = Result<(), SourceError>> + Send;
}
