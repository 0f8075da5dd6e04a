//! The log tailer: a logical-replication client on pgoutput (SPEC §2, "logical").
//!
//! # How an event travels
//!
//! A transaction inserts an outbox row (or emits a transactional logical message with the
//! configured prefix) and commits. The walsender decodes it and streams Begin, Insert…,
//! Commit over the replication connection; the `stream` task maps the rows to events and hands
//! them over a bounded channel; `next_batch` gives them to the relay;
//! `ack` hears which ones Kafka acknowledged, and once every event of a
//! transaction is acknowledged the slot's flushed position moves past its commit.
//!
//! Protocol version 1 is requested: the server sends a transaction only after it
//! committed (spilling large ones to its own disk), and the relay passes its rows on in
//! batches as they arrive, so a transaction of any size needs bounded memory here.
//!
//! # First start
//!
//! When the slot does not exist and `create_if_missing` is set, rows already in the
//! outbox must not be missed, nor sent twice. The relay creates a *temporary* slot that
//! exports a snapshot, reads the table through that snapshot in `seq` order and
//! publishes it, then copies the temporary slot into the real one
//! (`pg_copy_logical_replication_slot`) and streams from the snapshot's consistent point:
//! no gap, no overlap. A crash before the copy leaves no slot behind (temporary slots
//! die with their session), so the next start simply does it all again; duplicates are
//! possible only then.
//!
//! # Leadership
//!
//! The slot is the lock: PostgreSQL lets one connection stream from it. A second relay
//! gets "slot is active for PID n", waits as a standby and retries.

mod config;
pub mod mapping;
pub mod pgoutput;
mod protocol;
mod stream;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

pub use config::{LogicalConfig, RawLogicalConfig};
pub use protocol::{format_lsn, parse_lsn, ReplicationError};

use crate::event::OutboxEvent;
use crate::metrics::Telemetry;
use crate::source::table::{self, Checks};
use crate::source::{quote_ident, SourceConfig, SourceError, TableName};
use mapping::Mapper;
use protocol::ReplicationClient;
use stream::{Item, Shared};

/// Items buffered between the stream task and the relay.
const CHANNEL: usize = 4096;
/// How long `next_batch` waits for the first event before returning an empty batch.
const IDLE_WAIT: Duration = Duration::from_millis(100);
/// Delivered rows deleted per statement when `cleanup` is on.
const CLEANUP_BATCH: usize = 1000;
/// How long a graceful stop waits for the final status update to go out.
const FINISH_TIMEOUT: Duration = Duration::from_secs(5);
const SNAPSHOT_CURSOR: &str = "outbox_relay_snapshot";
/// How often the slot-lag gauge is refreshed.
const LAG_INTERVAL: Duration = Duration::from_secs(2);

pub struct LogicalSource {
    config: SourceConfig,
    sql: Client,
    telemetry: Telemetry,
    phase: Phase,
    /// Events returned by `next_batch` and not acknowledged yet, with their number and
    /// whether they are table rows (which `cleanup` deletes).
    unacked: VecDeque<(u64, OutboxEvent)>,
    /// Transaction ends: (number of events before it, end LSN).
    txn_ends: VecDeque<(u64, u64)>,
    /// Number of events taken from the stream so far.
    taken: u64,
    /// How many of `unacked` (from the front) are with the relay; after a rewind, 0.
    handed: usize,
    /// Number of events acknowledged so far.
    acked: u64,
    cleanup: Option<Cleanup>,
    payload_is_json: bool,
    select_sql: Option<String>,
    lag_measured: Option<std::time::Instant>,
}

enum Phase {
    /// Connected; `lead` not called yet (or lost the slot).
    Idle,
    /// Publishing the rows that existed when the slot was created.
    Snapshot(Box<Snapshot>),
    Streaming(Streaming),
}

struct Snapshot {
    /// Holds the temporary slot: closing it drops the slot.
    _holder: ReplicationClient,
    /// Inside a REPEATABLE READ transaction on the exported snapshot, with the cursor.
    reader: Client,
    temp_slot: String,
    consistent_point: u64,
    exhausted: bool,
}

struct Streaming {
    rx: mpsc::Receiver<Item>,
    shared: Arc<Shared>,
    task: JoinHandle<Result<(), SourceError>>,
}

struct Cleanup {
    delete: String,
    ids: Vec<String>,
}

impl LogicalSource {
    /// Connects, checks what log mode needs (wal_level, the table and its columns,
    /// the publication) and creates the publication when allowed.
    pub async fn connect(
        config: &SourceConfig,
        telemetry: Telemetry,
    ) -> Result<LogicalSource, SourceError> {
        let sql = table::connect(config).await?;
        require_logical_wal(&sql).await?;
        let logical = &config.logical;
        let (mut cleanup, mut payload_is_json, mut select_sql) = (None, true, None);
        if let Some(t) = &config.table {
            let checks = Checks {
                delete: logical.cleanup,
                seq_cache: false,
                seq: true,
            };
            let shape = table::describe(&sql, t, &config.columns, checks).await?;
            payload_is_json = shape.payload_is_json;
            select_sql = Some(format!(
                "{} ORDER BY {}",
                table::select_sql(t, &config.columns, &shape),
                quote_ident(&config.columns.seq)
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
        ensure_publication(&sql, config).await?;
        Ok(LogicalSource {
            config: config.clone(),
            sql,
            telemetry,
            phase: Phase::Idle,
            unacked: VecDeque::new(),
            txn_ends: VecDeque::new(),
            taken: 0,
            handed: 0,
            acked: 0,
            cleanup,
            payload_is_json,
            select_sql,
            lag_measured: None,
        })
    }

    /// Takes the slot (creating it, with the first-start snapshot, when allowed), or
    /// waits as a standby while another relay streams from it. Returns `false` when
    /// `shutdown` fired first.
    pub async fn lead(&mut self, shutdown: &CancellationToken) -> Result<bool, SourceError> {
        let slot = self.config.logical.slot.clone();
        let mut announced = false;
        loop {
            match self.take_slot().await {
                Ok(()) => {
                    tracing::info!(%slot, "replication slot taken: this relay publishes the outbox");
                    self.telemetry.metrics.leader.set(1);
                    self.telemetry.health.set_leader(true, None);
                    return Ok(true);
                }
                Err(SourceError::SlotBusy { detail, .. }) => {
                    let why = format!("standby: replication slot {slot} is in use ({detail})");
                    self.telemetry.metrics.leader.set(0);
                    self.telemetry.health.set_leader(false, Some(&why));
                    if !announced {
                        tracing::info!(%slot, %detail, "slot in use by another relay: waiting as a standby");
                        announced = true;
                    }
                }
                Err(e) => return Err(e),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(false),
                _ = tokio::time::sleep(self.config.polling.standby_retry) => {}
            }
        }
    }

    async fn take_slot(&mut self) -> Result<(), SourceError> {
        let logical = &self.config.logical;
        let exists = self
            .sql
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
                &[&logical.slot],
            )
            .await
            .map_err(SourceError::pg("looking up the replication slot"))?
            .is_some();
        if exists {
            return self.start_streaming(0).await;
        }
        if !logical.create_if_missing {
            return Err(SourceError::Setup(format!(
                "replication slot {} does not exist and source.logical.create_if_missing = false: \
                 create it (outbox-relay setup prints the SQL) or allow the relay to",
                logical.slot
            )));
        }
        if self.select_sql.is_none() {
            // Table-less: nothing existed before the slot, so nothing to snapshot.
            let mut repl = self.replication_client().await?;
            let slot = &logical.slot;
            repl.simple_query(&format!(
                "CREATE_REPLICATION_SLOT \"{slot}\" LOGICAL pgoutput (SNAPSHOT 'nothing')"
            ))
            .await
            .map_err(slot_error(slot))?;
            tracing::info!(%slot, "created the replication slot");
            return self.start_streaming(0).await;
        }
        self.begin_snapshot().await
    }

    async fn replication_client(&self) -> Result<ReplicationClient, SourceError> {
        ReplicationClient::connect(&self.config.pg, &self.config.tls)
            .await
            .map_err(|e| match e.code() {
                Some("42501") => SourceError::Setup(format!(
                    "role {} may not open a replication connection: ALTER ROLE {} REPLICATION",
                    self.config.pg.get_user().unwrap_or("?"),
                    self.config.pg.get_user().unwrap_or("?")
                )),
                _ => SourceError::Replication {
                    context: "opening the replication connection",
                    source: e,
                },
            })
    }

    /// First start: a temporary slot exporting a snapshot, and a reader on it.
    async fn begin_snapshot(&mut self) -> Result<(), SourceError> {
        let slot = &self.config.logical.slot;
        let temp_slot: String = format!(
            "{}_init_{}",
            &slot[..slot.len().min(40)],
            std::process::id()
        );
        let mut holder = self.replication_client().await?;
        let rows = holder
            .simple_query(&format!(
                "CREATE_REPLICATION_SLOT \"{temp_slot}\" TEMPORARY LOGICAL pgoutput (SNAPSHOT 'export')"
            ))
            .await
            .map_err(slot_error(&temp_slot))?;
        let row = rows
            .first()
            .ok_or_else(|| protocol_error("CREATE_REPLICATION_SLOT returned no row"))?;
        let consistent_point = row
            .get(1)
            .and_then(|v| v.as_deref())
            .and_then(parse_lsn)
            .ok_or_else(|| {
                protocol_error("CREATE_REPLICATION_SLOT returned no consistent point")
            })?;
        let snapshot = row
            .get(2)
            .and_then(|v| v.clone())
            .ok_or_else(|| protocol_error("CREATE_REPLICATION_SLOT returned no snapshot"))?;
        let reader = table::connect(&self.config).await?;
        let select = self.select_sql.as_deref().expect("snapshot needs a table");
        reader
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; \
                 SET TRANSACTION SNAPSHOT '{snapshot}'; \
                 DECLARE {SNAPSHOT_CURSOR} NO SCROLL CURSOR FOR {select}"
            ))
            .await
            .map_err(SourceError::pg("opening the first-start snapshot"))?;
        tracing::info!(
            %slot,
            consistent_point = %format_lsn(consistent_point),
            "first start: publishing the rows already in the outbox, then streaming"
        );
        self.phase = Phase::Snapshot(Box::new(Snapshot {
            _holder: holder,
            reader,
            temp_slot,
            consistent_point,
            exhausted: false,
        }));
        Ok(())
    }

    /// The snapshot is published: make the real slot and stream from where it ends.
    async fn finish_snapshot(&mut self) -> Result<(), SourceError> {
        let Phase::Snapshot(snap) = std::mem::replace(&mut self.phase, Phase::Idle) else {
            return Ok(());
        };
        snap.reader
            .batch_execute("COMMIT")
            .await
            .map_err(SourceError::pg("closing the first-start snapshot"))?;
        let slot = &self.config.logical.slot;
        self.sql
            .execute(
                "SELECT pg_copy_logical_replication_slot($1, $2, false)",
                &[&snap.temp_slot, slot],
            )
            .await
            .map_err(|e| match e.code().map(|c| c.code()) {
                // Another relay finished its first start first: it leads, this one waits.
                Some("42710") => SourceError::SlotBusy {
                    slot: slot.clone(),
                    detail: "another relay created it first".into(),
                },
                _ => SourceError::Postgres {
                    context: "creating the replication slot from the snapshot's",
                    source: e,
                },
            })?;
        tracing::info!(%slot, "first-start snapshot published; created the replication slot");
        let point = snap.consistent_point;
        drop(snap); // closes the holder: the temporary slot goes away
        self.start_streaming(point).await
    }

    async fn start_streaming(&mut self, from: u64) -> Result<(), SourceError> {
        let logical = &self.config.logical;
        let mut repl = self.replication_client().await?;
        // Which server and timeline this stream comes from, for the operator's logs.
        let system = repl
            .simple_query("IDENTIFY_SYSTEM")
            .await
            .map_err(SourceError::repl("IDENTIFY_SYSTEM"))?;
        if let Some(row) = system.first() {
            let field = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
            tracing::info!(
                system_id = %field(0),
                timeline = %field(1),
                wal_position = %field(2),
                slot = %logical.slot,
                from = %format_lsn(from),
                "starting replication"
            );
        }
        let command = format!(
            "START_REPLICATION SLOT \"{}\" LOGICAL {} (proto_version '1', publication_names '\"{}\"', messages 'true')",
            logical.slot,
            format_lsn(from),
            logical.publication
        );
        let stream = repl
            .start_replication(&command)
            .await
            .map_err(slot_error(&logical.slot))?;
        let (tx, rx) = mpsc::channel(CHANNEL);
        let shared = Arc::new(Shared::default());
        let mapper = Mapper::new(
            self.config.table.clone(),
            self.config.columns.clone(),
            logical.message_prefix.clone(),
        );
        let task = tokio::spawn(stream::run(
            stream,
            mapper,
            tx,
            shared.clone(),
            logical.status_interval,
            self.telemetry.clone(),
        ));
        self.phase = Phase::Streaming(Streaming { rx, shared, task });
        // Events already returned belong to the previous stream: it will send them again.
        self.unacked.clear();
        self.txn_ends.clear();
        self.taken = self.acked;
        self.handed = 0;
        if let Some(every) = logical.heartbeat_interval {
            self.spawn_heartbeat(every);
        }
        Ok(())
    }

    /// Writes a transactional message with a prefix of its own every `every`: on a quiet
    /// database it gives the slot a transaction to acknowledge.
    fn spawn_heartbeat(&self, every: Duration) {
        let source_config = self.config.clone();
        let Phase::Streaming(s) = &self.phase else {
            return;
        };
        let shared = s.shared.clone();
        tokio::spawn(async move {
            let Ok(client) = table::connect(&source_config).await else {
                return;
            };
            // Ends when the stream it serves is gone (the source dropped its state).
            while Arc::strong_count(&shared) > 1 {
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
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8 \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.config.logical.slot],
            )
            .await
            .map_err(SourceError::pg("measuring the slot's lag"))?
            .and_then(|r| r.get(0));
        self.telemetry.metrics.slot_lag_bytes.set(lag.unwrap_or(0));
        Ok(())
    }

    /// Moves the slot's flushed position past every transaction whose events are all
    /// acknowledged.
    fn flush_completed(&mut self) {
        let Phase::Streaming(s) = &self.phase else {
            return;
        };
        let mut flushed = None;
        let mut count = 0;
        while let Some(&(events_before, end_lsn)) = self.txn_ends.front() {
            if events_before > self.acked {
                break;
            }
            self.txn_ends.pop_front();
            flushed = Some(end_lsn);
            count += 1;
        }
        if let Some(lsn) = flushed {
            let mut state = s.shared.state.lock().unwrap();
            state.flushed_lsn = state.flushed_lsn.max(lsn);
            state.flushed_ends += count;
            drop(state);
            s.shared.notify.notify_one();
            self.telemetry.metrics.acked_now();
        }
    }

    async fn next_snapshot_batch(&mut self, max: usize) -> Result<Vec<OutboxEvent>, SourceError> {
        let Phase::Snapshot(snap) = &mut self.phase else {
            return Ok(Vec::new());
        };
        if !snap.exhausted {
            let rows = snap
                .reader
                .query(&format!("FETCH {max} FROM {SNAPSHOT_CURSOR}"), &[])
                .await
                .map_err(SourceError::pg("reading the first-start snapshot"))?;
            if rows.is_empty() {
                snap.exhausted = true;
            } else {
                let events: Vec<OutboxEvent> = rows
                    .iter()
                    .map(|r| table::row_to_event(r, self.payload_is_json))
                    .collect();
                for e in &events {
                    self.taken += 1;
                    self.unacked.push_back((self.taken, e.clone()));
                }
                return Ok(events);
            }
        }
        Ok(Vec::new())
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
        let mut take = |item: Item, batch: &mut Vec<OutboxEvent>| match item {
            Item::Event(e) => {
                self.taken += 1;
                batch.push(e.clone());
                self.unacked.push_back((self.taken, e));
            }
            Item::TxnEnd { end_lsn } => self.txn_ends.push_back((self.taken, end_lsn)),
        };
        let first = if wait {
            tokio::time::timeout(IDLE_WAIT, s.rx.recv())
                .await
                .ok()
                .flatten()
        } else {
            s.rx.try_recv().ok()
        };
        match first {
            Some(item) => take(item, &mut batch),
            None if s.rx.is_closed() && s.rx.is_empty() => return Err(stream_ended(s).await),
            None => {}
        }
        while batch.len() < max {
            match s.rx.try_recv() {
                Ok(item) => take(item, &mut batch),
                Err(_) => break,
            }
        }
        Ok(batch)
    }
}

impl crate::source::Source for LogicalSource {
    async fn next_batch(
        &mut self,
        max: usize,
        wait: bool,
    ) -> Result<Vec<OutboxEvent>, SourceError> {
        // After a rewind, what was handed out and not acknowledged goes out again first.
        if self.handed < self.unacked.len() {
            let batch: Vec<OutboxEvent> = self
                .unacked
                .iter()
                .skip(self.handed)
                .take(max)
                .map(|(_, e)| e.clone())
                .collect();
            self.handed += batch.len();
            return Ok(batch);
        }
        if let Phase::Snapshot(snap) = &self.phase {
            if !snap.exhausted {
                let batch = self.next_snapshot_batch(max).await?;
                self.handed = self.unacked.len();
                if !batch.is_empty() {
                    return Ok(batch);
                }
            }
            if !self.unacked.is_empty() {
                // The snapshot's last rows are still with Kafka: the slot is made only
                // once all of them are acknowledged.
                return Ok(Vec::new());
            }
            self.finish_snapshot().await?;
        }
        self.measure_lag().await?;
        let batch = self.next_stream_batch(max, wait).await?;
        self.handed = self.unacked.len();
        self.flush_completed();
        if batch.is_empty() {
            self.clean_up(true).await?;
        }
        Ok(batch)
    }

    fn rewind(&mut self) {
        self.handed = 0;
    }

    fn mid_transaction(&self) -> bool {
        let ended = self
            .txn_ends
            .back()
            .map_or(self.acked, |&(before, _)| before);
        matches!(self.phase, Phase::Streaming(_)) && self.taken > ended.max(self.acked)
    }

    async fn ack(&mut self, events: &[OutboxEvent]) -> Result<(), SourceError> {
        self.handed = self.handed.saturating_sub(events.len());
        for _ in 0..events.len() {
            let Some((no, event)) = self.unacked.pop_front() else {
                break;
            };
            self.acked = no;
            if let (Some(cleanup), Some(id)) = (&mut self.cleanup, event.id) {
                if event.original.is_none() {
                    cleanup.ids.push(id);
                }
            }
        }
        self.flush_completed();
        self.clean_up(false).await
    }

    async fn finish(&mut self) -> Result<(), SourceError> {
        self.clean_up(true).await?;
        if let Phase::Streaming(s) = &mut self.phase {
            s.shared.state.lock().unwrap().finishing = true;
            s.shared.notify.notify_one();
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

/// Log mode needs `wal_level = logical`; says how to get it otherwise.
pub async fn require_logical_wal(sql: &Client) -> Result<(), SourceError> {
    let wal_level: String = sql
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(SourceError::pg("reading wal_level"))?
        .get(0);
    if wal_level != "logical" {
        return Err(SourceError::Setup(format!(
            "wal_level is {wal_level:?}: log mode needs wal_level = logical in postgresql.conf \
             (then restart PostgreSQL), or use source.mode = \"polling\""
        )));
    }
    Ok(())
}

/// Creates the publication when it is missing and allowed; checks it covers the table.
async fn ensure_publication(sql: &Client, config: &SourceConfig) -> Result<(), SourceError> {
    let name = &config.logical.publication;
    let row = sql
        .query_opt(
            "SELECT p.puballtables, \
               EXISTS (SELECT 1 FROM pg_publication_tables t WHERE t.pubname = p.pubname \
                       AND t.schemaname = $2 AND t.tablename = $3) \
             FROM pg_publication p WHERE p.pubname = $1",
            &[
                name,
                &config
                    .table
                    .as_ref()
                    .map(|t| t.schema.clone())
                    .unwrap_or_default(),
                &config
                    .table
                    .as_ref()
                    .map(|t| t.name.clone())
                    .unwrap_or_default(),
            ],
        )
        .await
        .map_err(SourceError::pg("looking up the publication"))?;
    match (row, &config.table) {
        (Some(row), Some(t)) => {
            let (all, has): (bool, bool) = (row.get(0), row.get(1));
            if !all && !has {
                return Err(SourceError::Setup(format!(
                    "publication {name} does not publish {t}: ALTER PUBLICATION {name} ADD TABLE {}",
                    t.quoted()
                )));
            }
            Ok(())
        }
        (Some(_), None) => Ok(()),
        (None, _) if !config.logical.create_if_missing => Err(SourceError::Setup(format!(
            "publication {name} does not exist and source.logical.create_if_missing = false: \
             CREATE PUBLICATION {name} FOR TABLE <outbox> WITH (publish = 'insert') (see sql/002_publication.sql)"
        ))),
        (None, table) => {
            let target = table_clause(table.as_ref());
            sql.batch_execute(&format!(
                "CREATE PUBLICATION {} {target} WITH (publish = 'insert')",
                quote_ident(name)
            ))
            .await
            .map_err(|e| match e.code().map(|c| c.code()) {
                Some("42501") => SourceError::Setup(format!(
                    "may not create publication {name}: create it as the table's owner \
                     (sql/002_publication.sql) or grant this role ownership of the table"
                )),
                _ => SourceError::Postgres {
                    context: "creating the publication",
                    source: e,
                },
            })?;
            tracing::info!(publication = %name, "created the publication");
            Ok(())
        }
    }
}

fn table_clause(table: Option<&TableName>) -> String {
    table.map_or_else(String::new, |t| format!("FOR TABLE {}", t.quoted()))
}

/// Maps slot errors: "in use" means another relay leads; the rest keep their context.
fn slot_error(slot: &str) -> impl FnOnce(ReplicationError) -> SourceError + '_ {
    move |e| match e.code() {
        Some("55006") => SourceError::SlotBusy {
            slot: slot.to_owned(),
            detail: e.to_string(),
        },
        Some("55000") | Some("0A000") => {
            SourceError::Setup(format!("replication slot {slot}: {e}"))
        }
        _ => SourceError::Replication {
            context: "using the replication slot",
            source: e,
        },
    }
}

fn protocol_error(what: &str) -> SourceError {
    SourceError::Replication {
        context: "creating the replication slot",
        source: ReplicationError::Protocol(what.to_owned()),
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
