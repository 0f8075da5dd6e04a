//! The log tailer: a logical-replication client on pgoutput.
//!
//! # How an event travels
//!
//! A transaction inserts an outbox row (or emits a transactional logical message with the
//! configured prefix) and commits. The walsender decodes it and streams Begin, Insert…,
//! Commit over the replication connection; the [`stream`] task maps the rows to events
//! and passes them, with the transaction ends and keepalives, over a bounded channel;
//! `next_batch` takes them through the [`Ledger`](ledger::Ledger) and gives the events to
//! the relay; `ack` tells the ledger which ones Kafka acknowledged, and the ledger says
//! how far the slot may now forget, which reaches the stream task through a `watch`.
//! The rule itself is in [`ledger`] and in
//! [design §4](../../../docs/design.md#4-log-mode-the-acknowledgement-rule).
//!
//! Protocol version 1 is requested: the server sends a transaction only after it
//! committed (spilling large ones to its own disk), and the relay passes its rows on in
//! batches as they arrive, so a transaction of any size needs bounded memory here.
//!
//! # The files
//!
//! [`setup`] checks `wal_level` and the publication; [`slot`] finds or creates the slot
//! and starts streaming from it (the slot is the leader lock); [`snapshot`] publishes
//! the rows that existed before the slot, on the first start; this file is the
//! [`Source`](crate::source::Source) the relay drives.

mod commands;
mod config;
mod hosts;
pub mod ledger;
mod lost;
pub mod mapping;
pub mod pgoutput;
mod protocol;
pub mod report;
mod setup;
mod slot;
mod snapshot;
mod stream;

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_postgres::Client;

pub use commands::ServerVersion;
pub use config::{LogicalConfig, OnSlotLost, RawLogicalConfig};
#[doc(hidden)]
pub use protocol::fuzz_stream_bytes;
pub use protocol::ReplicationError;
pub use setup::{
    missing_publication, outbox_relations, publication_ready, require_logical_wal,
    require_supported, server_version,
};

use crate::event::OutboxEvent;
use crate::metrics::Telemetry;
use crate::source::standby::Attempt;
use crate::source::table::{self, Checks};
use crate::source::{quote_ident, SourceConfig, SourceError};
use ledger::{Item, Ledger};
use slot::protocol_error;
use snapshot::Snapshot;
use stream::Feedback;

/// Items buffered between the stream task and the relay.
const CHANNEL: usize = 4096;
/// How long `next_batch` waits for the first event before returning an empty batch.
const IDLE_WAIT: Duration = Duration::from_millis(100);
/// Delivered rows deleted per statement when `cleanup` is on.
const CLEANUP_BATCH: usize = 1000;
/// How long a graceful stop waits for the final status update to go out.
const FINISH_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the slot-lag gauge is refreshed.
const LAG_INTERVAL: Duration = Duration::from_secs(2);

pub struct LogicalSource {
    config: SourceConfig,
    sql: Client,
    telemetry: Telemetry,
    phase: Phase,
    /// What is taken, acknowledged and flushable; the events the relay holds are not
    /// copied here.
    ledger: Ledger,
    cleanup: Option<Cleanup>,
    /// The outbox and, when it is partitioned, its partitions: their rows are outbox rows.
    partitions: Vec<(String, String)>,
    payload_is_json: bool,
    select_sql: Option<String>,
    lag_measured: Option<std::time::Instant>,
    /// Decides the replication commands' syntax and options.
    server: ServerVersion,
    /// Whether the slot is a failover slot already (a new or copied slot is not).
    slot_is_failover: bool,
    /// Decoding on a hot standby (16+): no writes there, so no heartbeat.
    standby: bool,
}

enum Phase {
    /// Connected; `lead` not called yet (or lost the slot).
    Idle,
    /// Publishing the rows that existed when the slot was created.
    Snapshot(Box<Snapshot>),
    Streaming(Streaming),
}

struct Streaming {
    rx: mpsc::Receiver<stream::Chunk>,
    /// The rest of the chunk last received, taken before the next one.
    carry: std::vec::IntoIter<Item>,
    feedback: watch::Sender<Feedback>,
    /// Event bytes in `rx`, bounded by `source.max_batch_bytes`.
    queued: std::sync::Arc<stream::Queued>,
    task: JoinHandle<Result<(), SourceError>>,
}

struct Cleanup {
    delete: String,
    ids: Vec<String>,
}

impl LogicalSource {
    pub(crate) fn client(&self) -> &Client {
        &self.sql
    }

    pub(crate) fn slot(&self) -> &str {
        &self.config.logical.slot
    }

    /// Connects, checks what log mode needs (wal_level, the table and its columns,
    /// the publication) and creates the publication when allowed.
    pub async fn connect(
        config: &SourceConfig,
        telemetry: Telemetry,
    ) -> Result<LogicalSource, SourceError> {
        let sql = table::connect(config).await?;
        require_logical_wal(&sql).await?;
        let server = server_version(&sql).await?;
        setup::require_supported(server, config)?;
        let standby = setup::require_standby_ready(&sql, server, config).await?;
        let logical = &config.logical;
        let (mut cleanup, mut payload_is_json, mut select_sql) = (None, true, None);
        let mut partitions = Vec::new();
        if let Some(t) = &config.table {
            let checks = Checks::logical(logical.cleanup);
            let shape = table::describe(&sql, t, &config.columns, checks).await?;
            partitions = setup::outbox_relations(&sql, t).await?;
            payload_is_json = shape.payload_is_json;
            select_sql = Some(format!(
                "{} ORDER BY {}",
                table::select_sql(t, &config.columns, &shape),
                table::order_key(&config.columns)
            ));
            if logical.cleanup {
                cleanup = Some(Cleanup {
                    delete: format!(
                        "DELETE FROM {} WHERE {} = ANY($1::text[]::{}[])",
                        t.quoted(),
                        quote_ident(&config.columns.id),
                        shape.id_type
                    ),
                    ids: Vec::new(),
                });
            }
        }
        setup::ensure_publication(&sql, config, &partitions).await?;
        Ok(LogicalSource {
            config: config.clone(),
            sql,
            telemetry,
            phase: Phase::Idle,
            ledger: Ledger::default(),
            cleanup,
            partitions,
            payload_is_json,
            select_sql,
            lag_measured: None,
            server,
            slot_is_failover: false,
            standby,
        })
    }

    /// Writes a transactional message with a prefix of its own every `every`: on a quiet
    /// database it gives the slot a transaction to acknowledge.
    fn spawn_heartbeat(&self, every: Duration) {
        let source_config = self.config.clone();
        let Phase::Streaming(s) = &self.phase else {
            return;
        };
        let stream_alive = s.feedback.subscribe();
        tokio::spawn(async move {
            let Ok(client) = table::connect(&source_config).await else {
                return;
            };
            // Ends with the stream it serves (the source dropped the sender).
            while stream_alive.has_changed().is_ok() {
                tokio::time::sleep(every).await;
                if let Err(e) = client
                    .execute(
                        "SELECT pg_logical_emit_message(true, 'outbox-relay-heartbeat', '')",
                        &[],
                    )
                    .await
                {
                    tracing::debug!(error = %e, "heartbeat failed");
                    return;
                }
            }
        });
    }

    /// Queues acknowledged rows for deletion and deletes a batch when one is full (or
    /// `force`).
    async fn clean_up(&mut self, force: bool) -> Result<(), SourceError> {
        let Some(cleanup) = &mut self.cleanup else {
            return Ok(());
        };
        if cleanup.ids.is_empty() || (!force && cleanup.ids.len() < CLEANUP_BATCH) {
            return Ok(());
        }
        let ids = std::mem::take(&mut cleanup.ids);
        self.sql
            .execute(&cleanup.delete, &[&ids])
            .await
            .map_err(SourceError::pg("deleting delivered outbox rows (cleanup)"))?;
        Ok(())
    }

    /// Refreshes the slot-lag gauge: WAL the slot keeps behind the server's position.
    async fn measure_lag(&mut self) -> Result<(), SourceError> {
        if self
            .lag_measured
            .is_some_and(|t| t.elapsed() < LAG_INTERVAL)
        {
            return Ok(());
        }
        self.lag_measured = Some(std::time::Instant::now());
        let lag: Option<i64> = self
            .sql
            .query_opt(
                "SELECT pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
                   ELSE pg_current_wal_lsn() END, confirmed_flush_lsn)::int8 \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.config.logical.slot],
            )
            .await
            .map_err(SourceError::pg("measuring the slot's lag"))?
            .and_then(|r| r.get(0));
        self.telemetry.metrics.slot_lag_bytes.set(lag.unwrap_or(0));
        Ok(())
    }

    /// Tells the stream task how far the slot may forget, when that moved.
    fn report_flushable(&mut self) {
        let Phase::Streaming(s) = &self.phase else {
            return;
        };
        let flushable = self.ledger.flushable();
        let moved = s.feedback.send_if_modified(|f| {
            let moved = flushable > f.flushed;
            f.flushed = f.flushed.max(flushable);
            moved
        });
        if moved {
            self.telemetry.metrics.acked_now();
        }
    }

    async fn next_stream_batch(
        &mut self,
        max: usize,
        wait: bool,
    ) -> Result<Vec<OutboxEvent>, SourceError> {
        let Phase::Streaming(s) = &mut self.phase else {
            return Ok(Vec::new());
        };
        let mut batch = Vec::new();
        let mut bytes = 0;
        let budget = self.config.max_batch_bytes;
        let mut take = |item: Item, batch: &mut Vec<OutboxEvent>, bytes: &mut usize| {
            if let Item::Event(event) = &item {
                let size = event.approx_bytes();
                s.queued
                    .bytes
                    .fetch_sub(size, std::sync::atomic::Ordering::AcqRel);
                *bytes += size;
            }
            batch.extend(self.ledger.take(item));
        };
        if s.carry.len() == 0 {
            let first = if wait {
                tokio::time::timeout(IDLE_WAIT, s.rx.recv())
                    .await
                    .ok()
                    .flatten()
            } else {
                s.rx.try_recv().ok()
            };
            match first {
                Some(chunk) => s.carry = chunk.into_iter(),
                None if s.rx.is_closed() && s.rx.is_empty() => return Err(stream_ended(s).await),
                None => {}
            }
        }
        while batch.len() < max && bytes < budget {
            match s.carry.next() {
                Some(item) => take(item, &mut batch, &mut bytes),
                None => match s.rx.try_recv() {
                    Ok(chunk) => s.carry = chunk.into_iter(),
                    Err(_) => break,
                },
            }
        }
        Ok(batch)
    }
}

impl crate::source::standby::Lead for LogicalSource {
    /// Takes the slot (creating it, with the first-start snapshot, when allowed).
    async fn try_take(&mut self) -> Result<Attempt, SourceError> {
        let slot = self.config.logical.slot.clone();
        match self.take_slot().await {
            Ok(()) => Ok(Attempt::Led(format!("replication slot {slot}"))),
            Err(SourceError::SlotBusy { detail, .. }) => Ok(Attempt::Busy(format!(
                "replication slot {slot} is in use ({detail})"
            ))),
            Err(e) => Err(e),
        }
    }
}

impl crate::source::Source for LogicalSource {
    async fn next_batch(
        &mut self,
        max: usize,
        wait: bool,
    ) -> Result<Vec<OutboxEvent>, SourceError> {
        // After a rewind, what the relay gave back goes out again first.
        if self.ledger.has_replay() {
            return Ok(self.ledger.replay(max));
        }
        if let Phase::Snapshot(snap) = &self.phase {
            if !snap.exhausted {
                let batch = self.next_snapshot_batch(max).await?;
                if !batch.is_empty() {
                    return Ok(batch);
                }
            }
            if self.ledger.unacknowledged() > 0 {
                // The snapshot's last rows are still with Kafka: the slot is made only
                // once all of them are acknowledged.
                return Ok(Vec::new());
            }
            self.finish_snapshot().await?;
        }
        self.measure_lag().await?;
        let batch = self.next_stream_batch(max, wait).await?;
        self.report_flushable();
        if batch.is_empty() {
            self.clean_up(true).await?;
        }
        Ok(batch)
    }

    async fn keep_dead_letters(
        &mut self,
        events: &[(&OutboxEvent, &str)],
    ) -> Result<(), SourceError> {
        let table = self.config.dead_letter_table.as_ref();
        table::keep_dead_letters(&self.sql, table, events).await
    }

    fn rewind(&mut self, unacknowledged: Vec<OutboxEvent>) {
        self.ledger.rewind(unacknowledged);
    }

    fn mid_transaction(&self) -> bool {
        self.ledger.mid_transaction()
    }

    async fn ack(&mut self, events: &[OutboxEvent]) -> Result<(), SourceError> {
        self.ledger.ack(events.len());
        if let Some(cleanup) = &mut self.cleanup {
            // Table rows only: a logical message (its envelope kept in `original`) has
            // no row to delete.
            let rows = events.iter().filter(|e| e.original.is_none());
            // Copies: a slice would keep its read buffer alive until the cleanup runs.
            cleanup
                .ids
                .extend(rows.filter_map(|e| e.id.as_deref().map(str::to_owned)));
        }
        self.report_flushable();
        self.clean_up(false).await
    }

    async fn finish(&mut self) -> Result<(), SourceError> {
        self.finish_snapshot_on_stop().await?;
        self.clean_up(true).await?;
        if let Phase::Streaming(s) = &mut self.phase {
            s.feedback.send_modify(|f| f.finishing = true);
            let _ = tokio::time::timeout(FINISH_TIMEOUT, &mut s.task).await;
        }
        Ok(())
    }
}

impl Drop for LogicalSource {
    fn drop(&mut self) {
        if let Phase::Streaming(s) = &self.phase {
            s.task.abort();
        }
    }
}

/// Why the stream task stopped, once its channel is closed.
async fn stream_ended(s: &mut Streaming) -> SourceError {
    match (&mut s.task).await {
        Ok(Err(e)) => e,
        Ok(Ok(())) => protocol_error("the replication stream ended"),
        Err(e) => protocol_error(&format!("the replication stream task failed: {e}")),
    }
}
