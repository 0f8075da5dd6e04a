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

mod carriage;
mod commands;
mod config;
mod hosts;
pub mod ledger;
mod lost;
pub mod mapping;
pub mod pgoutput;
mod protocol;
mod publish;
mod repair;
pub mod report;
mod row_change;
mod setup;
pub mod shards;
mod slot;
mod snapshot;
mod stream;

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_postgres::Client;

pub use carriage::describe as describe_carriage;
pub use commands::ServerVersion;
pub use config::{LogicalConfig, OnRowChange, OnSlotLost, RawLogicalConfig};
#[doc(hidden)]
pub use protocol::fuzz_stream_bytes;
pub use protocol::ReplicationError;
pub use setup::{
    missing_publication, outbox_relations, publication_ready, require_logical_wal,
    require_supported, server_version, shard_filter,
};
pub use shards::{other_shard_publications, require_matching_slots, shard_configs, ShardedSource};
pub use slot::slot_exists;

use crate::event::OutboxEvent;
use crate::metrics::Telemetry;
use crate::source::standby::Attempt;
use crate::source::state::{self, SlotMemory, State};
use crate::source::table::{self, Checks};
use crate::source::{quote_ident, SourceConfig, SourceError};
use ledger::{Item, Ledger};
use slot::protocol_error;
use snapshot::Snapshot;
use stream::Feedback;

/// Items buffered between the stream task and the relay (between all shards' streams and
/// the relay with `shards > 1`).
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
    /// `select_sql` without its ORDER BY and shard filter, for the repair's WHERE.
    select_base: Option<String>,
    /// This shard's row filter ([`setup::shard_filter`]), which the first-start snapshot
    /// and the repair read through too; `None` unsharded.
    shard_filter: Option<String>,
    /// The relay's own tables, and what they say of this slot.
    state: State,
    memory: Option<SlotMemory>,
    /// What carries the outbox in the publication ([`carriage`]), as this process vouches.
    carried_by: String,
    /// The carriage differs from the slot memory's: (the memory's vouched xmin, whether
    /// the publication itself was made anew) — rows to republish before streaming.
    repair_from: Option<(i64, bool)>,
    /// When the slot's flushed position last moved (each move is checked first).
    vouched_at: Option<std::time::Instant>,
    /// The slot memory's vouched point is behind: events were acknowledged, or the
    /// carriage was repaired, since it was written.
    memory_stale: bool,
    /// The stream described an outbox relation: check the carriage before taking more.
    recheck: bool,
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
    /// Publishing the rows a publication change may have made the server skip.
    Repair(Box<repair::Repair>),
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
    /// The last batch's length: the next batch's room. Grown from empty, a batch of
    /// 1,000 events was moved seven times; sized for the most, a trickle's batch of one
    /// would take as much memory as a backlog's.
    last_len: usize,
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
        if logical_shard_index(config) == 0 {
            shards::require_matching_slots(&sql, &config.logical).await?;
        }
        let standby = setup::require_standby_ready(&sql, server, config).await?;
        let logical = &config.logical;
        let (mut cleanup, mut payload_is_json, mut select_sql) = (None, true, None);
        let mut select_base = None;
        let mut partitions = Vec::new();
        let shard_filter = setup::shard_filter(&sql, config).await?;
        if let Some(t) = &config.table {
            let checks = Checks::logical(logical.cleanup);
            let shape = table::describe(&sql, t, &config.columns, checks).await?;
            partitions = setup::outbox_relations(&sql, t).await?;
            payload_is_json = shape.payload_is_json;
            let base = table::select_sql(t, &config.columns, &shape);
            let filter = shard_filter
                .as_ref()
                .map_or_else(String::new, |f| format!(" WHERE {f}"));
            select_sql = Some(format!(
                "{base}{filter} ORDER BY {}",
                table::order_key(&config.columns)
            ));
            select_base = Some(base);
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
        let state = state::prepare(&sql, &config.state_schema, !standby).await?;
        let memory = state.recall(&sql, &logical.slot).await?;
        // A slot with history never gets a publication made anew: rows committed while
        // it was missing were skipped, and re-creating it would hide that.
        let history = memory.as_ref().filter(|m| m.forgotten_at.is_none());
        let filter = shard_filter.as_deref();
        setup::ensure_publication(&sql, config, &partitions, filter, server, history).await?;
        let carried_by = match carriage::read(&sql, config, server, filter).await? {
            carriage::Carriage::Carried(identity) => identity,
            carriage::Carriage::NotCarried(why) => return Err(SourceError::Setup(why)),
            carriage::Carriage::NoPublication => {
                return Err(missing_publication(&logical.publication))
            }
        };
        let repair_from = history
            .filter(|m| m.carried_by != carried_by)
            .and_then(|m| {
                if config.table.is_none() {
                    // Logical messages are decoded whatever the publication carries.
                    tracing::info!(
                        publication = %logical.publication,
                        "the publication was made anew since the last run; a table-less outbox \
                         loses nothing by it"
                    );
                    return None;
                }
                let remade = carriage::Carriage::publication_oid(&m.carried_by)
                    != carriage::Carriage::publication_oid(&carried_by);
                tracing::warn!(
                    publication = %logical.publication,
                    last_checked = %m.vouched_at,
                    "the publication changed since the relay last checked it (the outbox left it \
                     and came back, or it was dropped and created again)"
                );
                // Before 18 the server cannot decode the WAL of a missing publication.
                Some((m.vouched_xmin, remade && server.major() < 18))
            });
        let memory_stale =
            repair_from.is_none() && history.is_some_and(|m| m.carried_by != carried_by);
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
            select_base,
            shard_filter,
            state,
            memory,
            carried_by,
            repair_from,
            vouched_at: None,
            memory_stale,
            recheck: false,
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
        let failed = SourceError::pg("deleting delivered outbox rows (cleanup)");
        if !self.server.has_messages() {
            // 13 sends no logical messages, so its publication carries no deletes to
            // tell apart (see `setup::ensure_publication`).
            self.sql
                .execute(&cleanup.delete, &[&ids])
                .await
                .map_err(failed)?;
            return Ok(());
        }
        // Marked as the relay's own, so the stream does not take it for a row change.
        let tx = self
            .sql
            .transaction()
            .await
            .map_err(SourceError::pg("starting cleanup"))?;
        tx.execute(
            "SELECT pg_logical_emit_message(true, $1, '')",
            &[&row_change::CLEANUP_PREFIX],
        )
        .await
        .map_err(SourceError::pg("marking the cleanup transaction"))?;
        tx.execute(&cleanup.delete, &[&ids]).await.map_err(failed)?;
        tx.commit()
            .await
            .map_err(SourceError::pg("committing cleanup"))?;
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
        if self.config.logical.shard.is_some_and(|s| s.index > 0) {
            // The first shard measures the largest lag of all.
            return Ok(());
        }
        let lag: Option<i64> = self
            .sql
            .query_one(
                "SELECT max(pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
                   ELSE pg_current_wal_lsn() END, confirmed_flush_lsn))::int8 \
                 FROM pg_replication_slots WHERE slot_name = ANY($1)",
                &[&self.config.logical.all_slots()],
            )
            .await
            .map_err(SourceError::pg("measuring the slot's lag"))?
            .get(0);
        self.telemetry.metrics.slot_lag_bytes.set(lag.unwrap_or(0));
        Ok(())
    }

    /// Waits until `next_batch` has something to take at once: a chunk from the stream
    /// (kept for it), or any phase but streaming, or the stream's end. Cancel-safe, so
    /// a sharded source can wait on every shard at once.
    pub(super) async fn wait_for_items(&mut self) {
        if self.ledger.has_replay() {
            return;
        }
        let Phase::Streaming(s) = &mut self.phase else {
            return;
        };
        if s.carry.len() > 0 {
            return;
        }
        if let Some(chunk) = s.rx.recv().await {
            s.carry = chunk.into_iter();
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
        let mut batch = Vec::with_capacity(s.last_len.min(max));
        let mut bytes = 0;
        let budget = self.config.max_batch_bytes;
        let mut recheck = false;
        // False for a recheck: nothing after it is taken before the carriage is checked.
        let mut take = |item: Item, batch: &mut Vec<OutboxEvent>, bytes: &mut usize| {
            if let Item::Recheck = item {
                return false;
            }
            if let Item::Event(event) = &item {
                let size = event.approx_bytes();
                s.queued
                    .bytes
                    .fetch_sub(size, std::sync::atomic::Ordering::AcqRel);
                *bytes += size;
            }
            batch.extend(self.ledger.take(item));
            true
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
                None if s.rx.is_closed() && s.rx.is_empty() => {
                    let e = stream_ended(s).await;
                    return Err(self.explain_stream_end(e));
                }
                None => {}
            }
        }
        while batch.len() < max && bytes < budget && !recheck {
            match s.carry.next() {
                Some(item) => recheck = !take(item, &mut batch, &mut bytes),
                None => match s.rx.try_recv() {
                    Ok(chunk) => s.carry = chunk.into_iter(),
                    Err(_) => break,
                },
            }
        }
        self.recheck |= recheck;
        s.last_len = batch.len();
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
        if let Phase::Repair(repair) = &self.phase {
            if !repair.exhausted {
                let batch = self.next_repair_batch(max).await?;
                if !batch.is_empty() {
                    return Ok(batch);
                }
            }
            if self.ledger.unacknowledged() > 0 {
                return Ok(Vec::new());
            }
            self.finish_repair().await?;
        }
        if std::mem::take(&mut self.recheck) {
            self.check_carriage().await?;
        }
        self.measure_lag().await?;
        let batch = self.next_stream_batch(max, wait).await?;
        self.advance(false).await?;
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
        crate::source::dead_letter_table::keep_dead_letters(&self.sql, table, events).await
    }

    fn rewind(&mut self, unacknowledged: Vec<OutboxEvent>) {
        self.ledger.rewind(unacknowledged);
    }

    fn mid_transaction(&self) -> bool {
        self.ledger.mid_transaction()
    }

    async fn ack(&mut self, events: &[OutboxEvent]) -> Result<(), SourceError> {
        self.ledger.ack(events.len());
        self.memory_stale |= !events.is_empty();
        if let Some(cleanup) = &mut self.cleanup {
            // Table rows only: a logical message (its envelope kept in `original`) has
            // no row to delete.
            let rows = events.iter().filter(|e| e.original.is_none());
            // Copies: a slice would keep its read buffer alive until the cleanup runs.
            cleanup
                .ids
                .extend(rows.filter_map(|e| e.id.as_deref().map(str::to_owned)));
        }
        self.advance(false).await?;
        self.clean_up(false).await
    }

    async fn finish(&mut self) -> Result<(), SourceError> {
        self.finish_snapshot_on_stop().await?;
        self.clean_up(true).await?;
        // The final acknowledgement is checked like every other.
        self.advance(true).await?;
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

/// Which shard `config` is (0 unsharded).
fn logical_shard_index(config: &SourceConfig) -> u32 {
    config.logical.shard.map_or(0, |s| s.index)
}

/// Why the stream task stopped, once its channel is closed.
async fn stream_ended(s: &mut Streaming) -> SourceError {
    match (&mut s.task).await {
        Ok(Err(e)) => e,
        Ok(Ok(())) => protocol_error("the replication stream ended"),
        Err(e) => protocol_error(&format!("the replication stream task failed: {e}")),
    }
}
