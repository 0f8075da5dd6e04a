//! The polling publisher: read outbox rows in `seq` order, publish, delete once acked.
//!
//! # The visibility rule
//!
//! `seq` is taken from a sequence when a row is inserted, but transactions commit in any
//! order: a row with `seq = 5` can become visible after the row with `seq = 6`. Reading
//! "whatever is visible, in `seq` order" would then publish 6 before 5 — out of order
//! when both belong to one aggregate. (Skipping is not a risk here: rows are deleted, not
//! passed by a cursor, so a late row is always found by a later poll.)
//!
//! The rule: **a row is published only once every transaction that was inserting into
//! the outbox when that row became visible has ended.** The source keeps a *fence*, a
//! `seq` below which every row is settled (committed or rolled back for good):
//!
//! 1. read `H = max(seq)` of the visible rows;
//! 2. then list the transactions holding `RowExclusiveLock` on the outbox (`pg_locks`);
//! 3. wait until all of them have ended; the fence moves to `H`.
//!
//! Why this is enough: a transaction still holding a `seq < H` at step 1 took its lock on
//! the table before it drew that `seq` (PostgreSQL locks the target table when an INSERT
//! starts), so before row `H` was drawn and committed, so before step 2. It is therefore
//! in the list, or already over. Waiting for the list settles every `seq ≤ H`, and rows
//! are read only up to the fence. The rule needs the `seq` sequence to hand out values
//! in order across sessions: the default `CACHE 1` does.
//!
//! The cost is latency, not throughput: an event waits for the outbox writers that were
//! running when it committed — a few milliseconds for short transactions.
//!
//! # Leadership
//!
//! One relay per outbox holds a session-level advisory lock on its connection; the same
//! connection reads and deletes, so a relay that lost its connection (and with it the
//! lock) cannot delete anything. Others wait as standbys and retry.

mod config;
mod fence;

use std::time::{Duration, Instant};

use tokio_postgres::{Client, Statement};
use tokio_util::sync::CancellationToken;

pub use config::{PollingConfig, RawPollingConfig};

use super::{quote_ident_opt, Columns, SourceConfig, SourceError, TableName};
use crate::event::{OutboxEvent, Position};
use crate::metrics::Telemetry;
use fence::Fence;

/// First key of the leader lock (`'outb'`); the second is the outbox table's OID, so
/// relays of different outbox tables in one database do not exclude each other.
pub const LOCK_CLASS: i32 = 0x6f75_7462;

/// How often the backlog gauge is refreshed, and up to how many rows it counts (so a
/// huge backlog costs a bounded scan).
const BACKLOG_INTERVAL: Duration = Duration::from_secs(2);
const BACKLOG_CAP: i64 = 1_000_000;

pub struct PollingSource {
    client: Client,
    statements: Statements,
    fence: Fence,
    config: PollingConfig,
    table: TableName,
    table_oid: u32,
    payload_is_json: bool,
    telemetry: Telemetry,
    backlog_counted: Option<Instant>,
}

struct Statements {
    batch: Statement,
    delete: Statement,
    backlog: Statement,
}

impl PollingSource {
    /// Connects and checks that the table, its columns and the relay's privileges are
    /// what the configuration says, so that problems surface at start, by name.
    pub async fn connect(
        config: &SourceConfig,
        telemetry: Telemetry,
    ) -> Result<PollingSource, SourceError> {
        let client = connect(&config.pg).await?;
        let table = &config.table;
        let shape = describe_table(&client, table, &config.columns).await?;
        let statements = prepare(&client, table, &config.columns, &shape).await?;
        let fence = Fence::prepare(&client, table, &config.columns.seq, shape.oid).await?;
        Ok(PollingSource {
            client,
            statements,
            fence,
            config: config.polling.clone(),
            table: table.clone(),
            table_oid: shape.oid,
            payload_is_json: shape.payload_is_json,
            telemetry,
            backlog_counted: None,
        })
    }

    /// Tries once to become the leader for this outbox.
    pub async fn try_lead(&self) -> Result<bool, SourceError> {
        let row = self
            .client
            .query_one(
                "SELECT pg_try_advisory_lock($1, $2::oid::int4)",
                &[&LOCK_CLASS, &self.table_oid],
            )
            .await
            .map_err(SourceError::pg("taking the leader lock"))?;
        Ok(row.get(0))
    }

    /// Waits as a standby until this relay holds the leader lock. Returns `false` when
    /// `shutdown` fired first.
    pub async fn lead(&self, shutdown: &CancellationToken) -> Result<bool, SourceError> {
        let mut announced = false;
        loop {
            if self.try_lead().await? {
                tracing::info!(table = %self.table, "leader lock taken: this relay publishes the outbox");
                self.telemetry.metrics.leader.set(1);
                self.telemetry.health.set_leader(true, None);
                return Ok(true);
            }
            self.telemetry.metrics.leader.set(0);
            self.telemetry.health.set_leader(
                false,
                Some(&format!(
                    "standby: another relay holds the leader lock on {}",
                    self.table
                )),
            );
            if !announced {
                tracing::info!(
                    table = %self.table,
                    retry = ?self.config.standby_retry,
                    "another relay holds the leader lock: waiting as a standby"
                );
                announced = true;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(false),
                _ = tokio::time::sleep(self.config.standby_retry) => {}
            }
        }
    }

    /// Refreshes the backlog gauge, at most every [`BACKLOG_INTERVAL`].
    async fn count_backlog(&mut self) -> Result<(), SourceError> {
        if self
            .backlog_counted
            .is_some_and(|t| t.elapsed() < BACKLOG_INTERVAL)
        {
            return Ok(());
        }
        let rows: i64 = self
            .client
            .query_one(&self.statements.backlog, &[&BACKLOG_CAP])
            .await
            .map_err(SourceError::pg("counting the backlog"))?
            .get(0);
        self.telemetry.metrics.backlog_rows.set(rows);
        self.backlog_counted = Some(Instant::now());
        Ok(())
    }

    /// Rows up to the fence, oldest first.
    async fn read(&self, max: usize) -> Result<Vec<OutboxEvent>, SourceError> {
        let limit = i64::try_from(max).unwrap_or(i64::MAX);
        let rows = self
            .client
            .query(&self.statements.batch, &[&self.fence.seq(), &limit])
            .await
            .map_err(SourceError::pg("reading outbox rows"))?;
        Ok(rows
            .iter()
            .map(|row| OutboxEvent {
                position: Position::Seq(row.get(0)),
                id: row.get(1),
                aggregate_type: row.get(2),
                aggregate_id: row.get(3),
                event_type: row.get(4),
                payload: if self.payload_is_json {
                    row.get::<_, Option<String>>(5).map(String::into_bytes)
                } else {
                    row.get::<_, Option<Vec<u8>>>(5)
                },
                payload_is_json: self.payload_is_json,
                headers: row.get(6),
                timestamp_ms: row.get(7),
                topic: row.get(8),
            })
            .collect())
    }
}

impl super::Source for PollingSource {
    async fn next_batch(&mut self, max: usize) -> Result<Vec<OutboxEvent>, SourceError> {
        // Everything here only reads, so dropping the future (shutdown) is harmless.
        self.count_backlog().await?;
        let batch = self.read(max).await?;
        if !batch.is_empty() {
            return Ok(batch);
        }
        self.fence
            .advance(&self.client, self.config.interval)
            .await?;
        let batch = self.read(max).await?;
        if batch.is_empty() {
            tokio::time::sleep(self.config.interval).await;
        }
        Ok(batch)
    }

    async fn ack(&mut self, events: &[OutboxEvent]) -> Result<(), SourceError> {
        let seqs: Vec<i64> = events
            .iter()
            .filter_map(|e| match e.position {
                Position::Seq(seq) => Some(seq),
                Position::Lsn(_) => None,
            })
            .collect();
        if seqs.is_empty() {
            return Ok(());
        }
        let deleted = self
            .client
            .execute(&self.statements.delete, &[&seqs])
            .await
            .map_err(SourceError::pg("deleting published rows"))?;
        let backlog = &self.telemetry.metrics.backlog_rows;
        backlog.set((backlog.get() - deleted as i64).max(0));
        Ok(())
    }
}

/// Opens a plain (non-replication) connection and drives it in the background.
pub(crate) async fn connect(pg: &tokio_postgres::Config) -> Result<Client, SourceError> {
    let (client, connection) = pg
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(SourceError::pg("connecting to PostgreSQL"))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "PostgreSQL connection ended");
        }
    });
    // The server, too, should notice a vanished relay within seconds and release its
    // leader lock, so a standby can take over.
    client
        .batch_execute(&format!(
            "SET tcp_keepalives_idle = {}; SET tcp_keepalives_interval = {}; SET tcp_keepalives_count = {}",
            super::config::KEEPALIVE_IDLE.as_secs(),
            super::config::KEEPALIVE_INTERVAL.as_secs(),
            super::config::KEEPALIVE_RETRIES
        ))
        .await
        .map_err(SourceError::pg("setting keepalives"))?;
    Ok(client)
}

/// What the relay learned about the outbox table at start.
struct TableShape {
    oid: u32,
    payload_type: String,
    payload_is_json: bool,
}

async fn describe_table(
    client: &Client,
    table: &TableName,
    columns: &Columns,
) -> Result<TableShape, SourceError> {
    let oid: Option<u32> = client
        .query_one("SELECT to_regclass($1)::oid", &[&table.quoted()])
        .await
        .map_err(SourceError::pg("looking up the outbox table"))?
        .get(0);
    let Some(oid) = oid else {
        return Err(SourceError::Setup(format!(
            "table {table} does not exist (source.table): create it with sql/001_outbox.sql \
             or `outbox-relay setup --apply`, or point source.table at your outbox"
        )));
    };
    let rows = client
        .query(
            "SELECT a.attname::text, t.typname::text FROM pg_attribute a \
             JOIN pg_type t ON t.oid = a.atttypid \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped",
            &[&oid],
        )
        .await
        .map_err(SourceError::pg("reading the outbox table's columns"))?;
    let type_of = |name: &str| {
        rows.iter()
            .find(|r| r.get::<_, String>(0) == name)
            .map(|r| r.get::<_, String>(1))
    };
    let mut missing = Vec::new();
    let mut payload_type = String::new();
    for (key, name) in columns.all() {
        match type_of(name) {
            Some(ty) if key == "payload" => payload_type = ty,
            Some(_) => {}
            None => missing.push(format!("source.columns.{key} = {name:?}")),
        }
    }
    if !missing.is_empty() {
        return Err(SourceError::Setup(format!(
            "table {table} has no column for {}: fix the column names under [source.columns] \
             or the table",
            missing.join(", ")
        )));
    }
    // The visibility rule needs seq values handed out in order across sessions.
    let sequence = client
        .query_opt(
            "SELECT pg_get_serial_sequence($1, $2), s.seqcache FROM pg_sequence s \
             WHERE s.seqrelid = pg_get_serial_sequence($1, $2)::regclass",
            &[&table.quoted(), &columns.seq],
        )
        .await
        .map_err(SourceError::pg("checking the seq sequence"))?;
    if let Some(row) = sequence {
        let (name, cache): (String, i64) = (row.get(0), row.get(1));
        if cache > 1 {
            return Err(SourceError::Setup(format!(
                "sequence {name} (behind {table}.{}) caches {cache} values per session, so seq \
                 values can commit out of order in ways the relay cannot see: \
                 ALTER SEQUENCE {name} CACHE 1",
                columns.seq
            )));
        }
    }
    let allowed: bool = client
        .query_one(
            "SELECT has_table_privilege($1::oid, 'SELECT') AND has_table_privilege($1::oid, 'DELETE')",
            &[&oid],
        )
        .await
        .map_err(SourceError::pg("checking privileges on the outbox"))?
        .get(0);
    if !allowed {
        return Err(SourceError::Setup(format!(
            "this role may not SELECT and DELETE on {table}: GRANT SELECT, DELETE ON {} TO <relay role> \
             (see sql/003_relay_role.sql)",
            table.quoted()
        )));
    }
    Ok(TableShape {
        oid,
        payload_is_json: matches!(payload_type.as_str(), "jsonb" | "json"),
        payload_type,
    })
}

async fn prepare(
    client: &Client,
    table: &TableName,
    c: &Columns,
    shape: &TableShape,
) -> Result<Statements, SourceError> {
    let q = |name: &str| crate::source::quote_ident(name);
    // Text casts keep the mapping independent of the exact column types (uuid, varchar,
    // text…), and jsonb's text form is what log mode receives too.
    let payload = match shape.payload_type.as_str() {
        "jsonb" | "json" => format!("{}::text", q(&c.payload)),
        "bytea" => q(&c.payload),
        // Text kept as its UTF-8 bytes: a `::bytea` cast would decode backslash escapes.
        _ => format!("convert_to({}::text, 'UTF8')", q(&c.payload)),
    };
    let created = match &c.created_at {
        Some(col) => format!("(extract(epoch FROM {}) * 1000)::int8", q(col)),
        None => "NULL::int8".to_owned(),
    };
    let select = format!(
        "SELECT {seq}::int8, {id}::text, {at}::text, {ai}::text, {et}::text, {payload}, \
         {headers}::text, {created}, {topic}::text \
         FROM {table} WHERE {seq} <= $1::int8 ORDER BY {seq} LIMIT $2",
        seq = q(&c.seq),
        id = q(&c.id),
        at = q(&c.aggregate_type),
        ai = q(&c.aggregate_id),
        et = q(&c.event_type),
        headers = quote_ident_opt(c.headers.as_deref()),
        topic = quote_ident_opt(c.topic.as_deref()),
        table = table.quoted(),
    );
    let delete = format!(
        "DELETE FROM {table} WHERE {seq} = ANY($1::int8[])",
        table = table.quoted(),
        seq = q(&c.seq)
    );
    let backlog = format!(
        "SELECT count(*) FROM (SELECT 1 FROM {table} LIMIT $1) backlog",
        table = table.quoted()
    );
    Ok(Statements {
        backlog: client
            .prepare(&backlog)
            .await
            .map_err(SourceError::pg("preparing the backlog count"))?,
        batch: client
            .prepare(&select)
            .await
            .map_err(SourceError::pg("preparing the batch query"))?,
        delete: client
            .prepare(&delete)
            .await
            .map_err(SourceError::pg("preparing the delete"))?,
    })
}

/// A pause that grows from `min` to `max`, for loops that poll the database.
pub(crate) fn next_pause(current: Duration, max: Duration) -> Duration {
    (current * 2).min(max)
}
