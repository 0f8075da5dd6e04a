//! Where events come from: the PostgreSQL side of the relay.
//!
//! Both capture modes yield the same [`OutboxEvent`]s and
//! accept the same acknowledgement: "Kafka has these, you may forget them". What
//! forgetting means is theirs: the polling source deletes rows, the logical source
//! advances the slot's flushed LSN.

pub(crate) mod config;
pub mod dead_letter_table;
pub mod dead_letters;
pub mod deadlines;
mod error;
pub mod logical;
mod names;
pub mod polling;
pub mod standby;
pub mod state;
pub mod table;
pub mod tls;

use std::future::Future;

pub use config::{
    quote_ident, quote_ident_opt, Columns, Mode, RawSourceConfig, SourceConfig, TableName,
};
pub use error::{retryable_sqlstate, SourceError};
pub use logical::OnRowChange;

use crate::event::OutboxEvent;

/// A capture mode, as the relay loop sees it.
///
/// The contract that makes the pipeline at-least-once: `next_batch` may return an event
/// again until it has been passed to `ack`, and `ack` is only called for events Kafka has
/// acknowledged. Batches are returned in publication order (`seq` or commit order).
pub trait Source: Send {
    /// The next events to publish, at most `max`; an empty batch means "nothing now".
    /// Events already returned are not returned again until [`Source::rewind`]. With
    /// `wait`, an idle source may pause a little before answering empty (its poll
    /// interval); without, it answers at once.
    fn next_batch(
        &mut self,
        max: usize,
        wait: bool,
    ) -> impl Future<Output = Result<Vec<OutboxEvent>, SourceError>> + Send;

    /// Forgets events Kafka has acknowledged (delete the rows / advance the slot).
    /// `events` is always the oldest of the events returned and not acknowledged yet,
    /// in order.
    fn ack(
        &mut self,
        events: &[OutboxEvent],
    ) -> impl Future<Output = Result<(), SourceError>> + Send;

    /// Keeps in PostgreSQL the bodies of events the dead-letter topic took only as
    /// metadata (too large for it), each with why; called before they are acknowledged,
    /// so their bodies survive the acknowledgement.
    fn keep_dead_letters(
        &mut self,
        events: &[(&OutboxEvent, &str)],
    ) -> impl Future<Output = Result<(), SourceError>> + Send;

    /// After a failed delivery: the next batches start again from the oldest
    /// unacknowledged event. `unacknowledged` is every event returned and not
    /// acknowledged, in order — the relay holds the only copy of an event in flight, so
    /// a source that cannot read its events again (the log stream) replays these; one
    /// that can (the table) drops them.
    fn rewind(&mut self, unacknowledged: Vec<OutboxEvent>);

    /// True while events of a transaction were handed out but the transaction's end was
    /// not: a graceful stop reads on until it is false.
    fn mid_transaction(&self) -> bool {
        false
    }

    /// A graceful stop: the last acknowledgement goes out to PostgreSQL.
    fn finish(&mut self) -> impl Future<Output = Result<(), SourceError>> + Send {
        async { Ok(()) }
    }
}

/// The configured capture mode. One exists per process, so its size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum AnySource {
    Polling(polling::PollingSource),
    Logical(logical::LogicalSource),
    /// Log mode with `shards > 1`.
    Sharded(logical::ShardedSource),
}

/// What names an outbox across its replicas, for exactly-once delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The cluster's system identifier: the same on a physical standby and after its
    /// promotion, different on any other cluster.
    pub system_identifier: String,
    pub database: String,
    /// The outbox table (polling) or the slot (log mode).
    pub name: String,
    /// Changes when the outbox is made anew under the same name (the table's OID in
    /// polling mode, whose `seq` may start over), so an old checkpoint is not trusted.
    pub epoch: String,
}

/// Reads the cluster's system identifier and the database's name.
async fn cluster_identity(
    client: &tokio_postgres::Client,
) -> Result<(String, String), SourceError> {
    let row = client
        .query_one(
            "SELECT system_identifier::text, current_database()::text FROM pg_control_system()",
            &[],
        )
        .await
        .map_err(SourceError::pg(
            "reading the system identifier (pg_control_system())",
        ))?;
    Ok((row.get(0), row.get(1)))
}

impl AnySource {
    /// The outbox's identity (see [`Identity`]).
    pub async fn identity(&self) -> Result<Identity, SourceError> {
        let (client, name, epoch) = match self {
            AnySource::Polling(s) => (s.client(), s.table_name(), s.table_oid().to_string()),
            AnySource::Logical(s) => (s.client(), format!("slot:{}", s.slot()), String::new()),
            AnySource::Sharded(s) => (s.client(), format!("slots:{}", s.slots()), String::new()),
        };
        let (system_identifier, database) = cluster_identity(client).await?;
        Ok(Identity {
            system_identifier,
            database,
            name,
            epoch,
        })
    }

    pub async fn connect(
        config: &SourceConfig,
        telemetry: crate::metrics::Telemetry,
    ) -> Result<AnySource, SourceError> {
        Ok(match config.mode {
            Mode::Polling => {
                AnySource::Polling(polling::PollingSource::connect(config, telemetry).await?)
            }
            Mode::Logical if config.logical.shards > 1 => {
                AnySource::Sharded(logical::ShardedSource::connect(config, telemetry).await?)
            }
            Mode::Logical => {
                AnySource::Logical(logical::LogicalSource::connect(config, telemetry).await?)
            }
        })
    }

    /// Becomes the one publishing relay of this outbox, waiting as a standby while
    /// another one is (retrying every `retry`); `false` when `shutdown` fired first.
    pub async fn lead(
        &mut self,
        retry: std::time::Duration,
        telemetry: &crate::metrics::Telemetry,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Result<bool, SourceError> {
        match self {
            AnySource::Polling(s) => standby::lead(s, retry, telemetry, shutdown).await,
            AnySource::Logical(s) => standby::lead(s, retry, telemetry, shutdown).await,
            AnySource::Sharded(s) => standby::lead(s, retry, telemetry, shutdown).await,
        }
    }
}

impl Source for AnySource {
    async fn next_batch(
        &mut self,
        max: usize,
        wait: bool,
    ) -> Result<Vec<OutboxEvent>, SourceError> {
        match self {
            AnySource::Polling(s) => s.next_batch(max, wait).await,
            AnySource::Logical(s) => s.next_batch(max, wait).await,
            AnySource::Sharded(s) => s.next_batch(max, wait).await,
        }
    }

    fn rewind(&mut self, unacknowledged: Vec<OutboxEvent>) {
        match self {
            AnySource::Polling(s) => s.rewind(unacknowledged),
            AnySource::Logical(s) => s.rewind(unacknowledged),
            AnySource::Sharded(s) => s.rewind(unacknowledged),
        }
    }

    async fn ack(&mut self, events: &[OutboxEvent]) -> Result<(), SourceError> {
        match self {
            AnySource::Polling(s) => s.ack(events).await,
            AnySource::Logical(s) => s.ack(events).await,
            AnySource::Sharded(s) => s.ack(events).await,
        }
    }

    async fn keep_dead_letters(
        &mut self,
        events: &[(&OutboxEvent, &str)],
    ) -> Result<(), SourceError> {
        match self {
            AnySource::Polling(s) => s.keep_dead_letters(events).await,
            AnySource::Logical(s) => s.keep_dead_letters(events).await,
            AnySource::Sharded(s) => s.keep_dead_letters(events).await,
        }
    }

    fn mid_transaction(&self) -> bool {
        match self {
            AnySource::Polling(s) => s.mid_transaction(),
            AnySource::Logical(s) => s.mid_transaction(),
            AnySource::Sharded(s) => s.mid_transaction(),
        }
    }

    async fn finish(&mut self) -> Result<(), SourceError> {
        match self {
            AnySource::Polling(s) => s.finish().await,
            AnySource::Logical(s) => s.finish().await,
            AnySource::Sharded(s) => s.finish().await,
        }
    }
}
