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
//!
//! # Reading ahead
//!
//! While a backlog drains, the server would idle whenever the relay converts a batch,
//! hands it to Kafka or waits for an acknowledgement. So after a full batch the next
//! read is sent at once, on the same connection (its requests are pipelined: the DELETE
//! of an acknowledged batch queues behind it), and the next `next_batch` takes its
//! rows. It reads above the batch just returned, below the same fence, so it covers
//! exactly what the next read would; when the cursor moved meanwhile (a rewind, or
//! everything acknowledged so reads start from the bottom again) it is dropped.
//!
//! For the same reason an acknowledgement sends its DELETE without waiting for it. One
//! is outstanding at most: the next acknowledgement, a read from the bottom of the table
//! (which could otherwise see the rows being deleted) and a graceful stop wait for it
//! first, and its error surfaces there. Reads above the cursor never see those rows.

mod config;
mod copy;
mod fence;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_postgres::{Client, Statement};

pub use config::{PollingConfig, RawPollingConfig};

use super::standby::Attempt;
use super::table::{self, Checks, TableShape};
use super::{Columns, SourceConfig, SourceError, TableName};
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
    client: Arc<Client>,
    statements: Statements,
    /// The batch read's SELECT, which [`copy`] runs with each batch's bounds.
    batch: BatchSelect,
    fence: Fence,
    config: PollingConfig,
    table: TableName,
    table_oid: u32,
    payload_is_json: bool,
    telemetry: Telemetry,
    backlog_counted: Option<Instant>,
    /// Highest seq returned by `next_batch` and not yet acknowledged or rewound: reads
    /// continue above it while earlier batches are with Kafka.
    returned_upto: i64,
    dead_letter_table: Option<TableName>,
    /// Payload bytes per batch, at most (`source.max_batch_bytes`).
    max_batch_bytes: i64,
    /// Rows returned and not acknowledged yet. When none are, reads start from the
    /// bottom again, so a row that appeared below the cursor is never left behind.
    unacked: usize,
    /// Highest seq acknowledged so far, to notice such a late row.
    acked_upto: i64,
    /// The next batch's read, sent after a full batch (see "Reading ahead").
    ahead: Option<ReadAhead>,
    /// The last acknowledgement's DELETE, sent and not answered yet.
    deleting: Option<JoinHandle<Result<u64, tokio_postgres::Error>>>,
}

struct ReadAhead {
    /// The cursor it reads above, and its row limit: used only if both still hold.
    from: i64,
    limit: i64,
    rows: JoinHandle<Result<Vec<OutboxEvent>, copy::Partial>>,
}

struct Statements {
    raw_row: Statement,
    delete: Statement,
    backlog: Statement,
}

impl PollingSource {
    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    pub(crate) fn table_name(&self) -> String {
        self.table.to_string()
    }

    pub(crate) fn table_oid(&self) -> u32 {
        self.table_oid
    }

    /// Connects and checks that the table, its columns and the relay's privileges are
    /// what the configuration says, so that problems surface at start, by name.
    pub async fn connect(
        config: &SourceConfig,
        telemetry: Telemetry,
    ) -> Result<PollingSource, SourceError> {
        let client = table::connect(config).await?;
        let table = config.outbox_table()?;
        let shape = table::describe(&client, table, &config.columns, Checks::POLLING).await?;
        let statements = prepare(&client, table, &config.columns, &shape).await?;
        let batch = BatchSelect::new(table, &config.columns, &shape);
        // COPY is planned only when it runs: the same SELECT prepared once here makes a
        // problem with it an error at start, as with the other statements.
        client
            .prepare(&batch.sql(BatchSelect::PARAMETERS))
            .await
            .map_err(SourceError::pg("preparing the batch query"))?;
        let fence = Fence::prepare(&client, table, &config.columns.seq, shape.oid).await?;
        if let Some(t) = &config.dead_letter_table {
            super::dead_letter_table::ensure(&client, t).await?;
        }
        Ok(PollingSource {
            client: Arc::new(client),
            statements,
            batch,
            fence,
            config: config.polling.clone(),
            table: table.clone(),
            table_oid: shape.oid,
            payload_is_json: shape.payload_is_json,
            telemetry,
            backlog_counted: None,
            returned_upto: 0,
            dead_letter_table: config.dead_letter_table.clone(),
            max_batch_bytes: i64::try_from(config.max_batch_bytes).unwrap_or(i64::MAX),
            unacked: 0,
            acked_upto: 0,
            ahead: None,
            deleting: None,
        })
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

    /// The batch read's COPY: at most `limit` rows above the cursor, up to the fence.
    fn copy_sql(&self, limit: i64) -> String {
        copy::copy_sql(&self.batch.sql([
            &format!("{}::int8", self.returned_upto),
            &format!("{}::int8", self.fence.seq()),
            &limit.to_string(),
            &format!("{}::int8", self.max_batch_bytes),
        ]))
    }

    /// Rows up to the fence, oldest first.
    ///
    /// A row the server cannot send (text invalid in the client encoding, say) fails the
    /// read where it stands: the rows before it are the batch. When it is the first, the
    /// read narrows down (half the batch, a quarter, …, in case the server failed before
    /// sending any row) until that row is read alone, as raw bytes, and marked invalid
    /// so it goes to the dead-letter topic.
    async fn read(&self, max: usize) -> Result<Vec<OutboxEvent>, SourceError> {
        let mut limit = i64::try_from(max).unwrap_or(i64::MAX);
        loop {
            let partial = match copy::read(
                &self.client,
                &self.copy_sql(limit),
                0,
                self.payload_is_json,
            )
            .await
            {
                Ok(events) => return Ok(events),
                Err(partial) => partial,
            };
            match (partial.error.bad_row(), partial.events.is_empty()) {
                (Some(_), false) => return Ok(partial.events),
                (Some(_), true) if limit > 1 => limit /= 2,
                (Some(e), true) => return self.read_unreadable(e).await,
                (None, _) => {
                    return Err(match partial.error {
                        copy::Failure::Pg(e) => SourceError::pg("reading outbox rows")(e),
                        copy::Failure::Format(why) => SourceError::Setup(format!(
                            "reading outbox rows: the server's COPY output is not the binary \
                             format this relay reads ({why}); report it with the server's \
                             version"
                        )),
                    })
                }
            }
        }
    }

    /// Sends the read of the batch after the one just returned (see "Reading ahead").
    fn read_ahead(&mut self, max: usize) {
        let limit = i64::try_from(max).unwrap_or(i64::MAX);
        let (client, copy) = (self.client.clone(), self.copy_sql(limit));
        let json = self.payload_is_json;
        // Sent after a full batch, it is likely full too: its list is made that large at
        // once (grown from empty, a 1,000-event list is moved ten times). A read when the
        // outbox may be empty starts small.
        let rows = tokio::spawn(async move { copy::read(&client, &copy, max, json).await });
        let from = self.returned_upto;
        self.ahead = Some(ReadAhead { from, limit, rows });
    }

    /// The rows read ahead, if they are what a read now would return. Any error (a row
    /// the server cannot send, say) leaves the work to [`Self::read`], which narrows
    /// such a read down.
    ///
    /// When these rows are a full batch too, the read after them is sent before they
    /// are returned, so the server works while the relay publishes.
    async fn take_ahead(&mut self, max: usize) -> Option<Vec<OutboxEvent>> {
        let ahead = self.ahead.take()?;
        let limit = i64::try_from(max).unwrap_or(i64::MAX);
        if ahead.from != self.returned_upto || ahead.limit != limit {
            ahead.rows.abort();
            return None;
        }
        let events = ahead.rows.await.ok()?.ok()?;
        if let (true, Some(Position::Seq(seq))) =
            (events.len() >= max, events.last().map(|e| e.position))
        {
            self.returned_upto = seq;
            self.read_ahead(max);
        }
        Some(events)
    }

    /// Waits for the outstanding DELETE, if any (see "Reading ahead").
    async fn settle_delete(&mut self) -> Result<(), SourceError> {
        let Some(deleting) = self.deleting.take() else {
            return Ok(());
        };
        let deleted = deleting
            .await
            .map_err(|e| SourceError::Setup(format!("deleting published rows failed: {e}")))?
            .map_err(SourceError::pg("deleting published rows"))?;
        let backlog = &self.telemetry.metrics.backlog_rows;
        backlog.set((backlog.get() - deleted as i64).max(0));
        Ok(())
    }

    /// The first row above the cursor, which the server cannot send as text: its raw
    /// bytes, and why, for the dead-letter topic.
    async fn read_unreadable(
        &self,
        why: &tokio_postgres::Error,
    ) -> Result<Vec<OutboxEvent>, SourceError> {
        let rows = self
            .client
            .query(
                &self.statements.raw_row,
                &[&self.returned_upto, &self.fence.seq()],
            )
            .await
            .map_err(SourceError::pg(
                "reading an unreadable outbox row as raw bytes",
            ))?;
        Ok(rows
            .iter()
            .map(|row| table::raw_row_to_event(row, why))
            .collect())
    }
}

impl Drop for PollingSource {
    fn drop(&mut self) {
        // The read holds the connection (and with it the leader lock) while it runs. An
        // outstanding DELETE is left to finish: its rows were acknowledged by Kafka.
        if let Some(ahead) = self.ahead.take() {
            ahead.rows.abort();
        }
    }
}

impl super::standby::Lead for PollingSource {
    /// The advisory lock, on the connection that reads and deletes.
    async fn try_take(&mut self) -> Result<Attempt, SourceError> {
        let row = self
            .client
            .query_one(
                "SELECT pg_try_advisory_lock($1, $2::oid::int4)",
                &[&LOCK_CLASS, &self.table_oid],
            )
            .await
            .map_err(SourceError::pg("taking the leader lock"))?;
        Ok(if row.get(0) {
            Attempt::Led(format!("leader lock on {}", self.table))
        } else {
            Attempt::Busy(format!(
                "another relay holds the leader lock on {}",
                self.table
            ))
        })
    }
}

impl super::Source for PollingSource {
    async fn next_batch(
        &mut self,
        max: usize,
        wait: bool,
    ) -> Result<Vec<OutboxEvent>, SourceError> {
        // Everything here only reads, so dropping the future (shutdown) is harmless.
        if self.returned_upto == 0 {
            // From the bottom: the rows being deleted must be gone first.
            self.settle_delete().await?;
        }
        self.count_backlog().await?;
        let mut batch = match self.take_ahead(max).await {
            Some(batch) => batch,
            None => self.read(max).await?,
        };
        if batch.is_empty() {
            self.fence
                .advance(&self.client, self.config.interval)
                .await?;
            batch = self.read(max).await?;
        }
        if let Some(Position::Seq(first)) = batch.first().map(|e| e.position) {
            if first < self.acked_upto {
                // The visibility rule should make this impossible; if a row shows up
                // anyway (a sequence altered while running, an explicit seq), it is
                // published late rather than never.
                tracing::warn!(
                    seq = first,
                    published_up_to = self.acked_upto,
                    "an outbox row appeared below rows already published: publishing it now, \
                     out of order for its aggregate"
                );
            }
        }
        match batch.last().map(|e| e.position) {
            Some(Position::Seq(seq)) => self.returned_upto = seq,
            _ if wait => tokio::time::sleep(self.config.interval).await,
            _ => {}
        }
        self.unacked += batch.len();
        if batch.len() >= max && self.ahead.is_none() {
            // A backlog: more is likely there.
            self.read_ahead(max);
        }
        Ok(batch)
    }

    async fn keep_dead_letters(
        &mut self,
        events: &[(&OutboxEvent, &str)],
    ) -> Result<(), SourceError> {
        super::dead_letter_table::keep_dead_letters(
            &self.client,
            self.dead_letter_table.as_ref(),
            events,
        )
        .await
    }

    fn rewind(&mut self, _unacknowledged: Vec<OutboxEvent>) {
        // The rows are still in the table: read them again from the start.
        if let Some(ahead) = self.ahead.take() {
            ahead.rows.abort();
        }
        self.returned_upto = 0;
        self.unacked = 0;
    }

    async fn ack(&mut self, events: &[OutboxEvent]) -> Result<(), SourceError> {
        self.settle_delete().await?;
        self.unacked = self.unacked.saturating_sub(events.len());
        if self.unacked == 0 {
            self.returned_upto = 0;
        }
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
        self.acked_upto = self.acked_upto.max(seqs.iter().copied().max().unwrap_or(0));
        let (client, delete) = (self.client.clone(), self.statements.delete.clone());
        self.deleting = Some(tokio::spawn(async move {
            client.execute(&delete, &[&seqs]).await
        }));
        Ok(())
    }

    async fn finish(&mut self) -> Result<(), SourceError> {
        self.settle_delete().await
    }
}

/// The text of the polling statements for one outbox table.
struct Texts {
    raw_row: String,
    delete: String,
    backlog: String,
}

/// The batch read's SELECT and the delete as this relay runs them on `config`'s outbox
/// (the relay's read is that SELECT inside a COPY, its bounds written in; here they are
/// parameters: the batch's `$1` lower and `$2` upper `seq` bounds, `$3` rows and `$4`
/// bytes at most; the delete's `$1` array of `seq`s): the benchmark loops them inside the
/// server for the polling floor, an upper bound no client beats.
#[cfg(feature = "testkit")]
pub async fn batch_and_delete_sql(config: &SourceConfig) -> Result<(String, String), SourceError> {
    let client = table::connect(config).await?;
    let table = config.outbox_table()?;
    let shape = table::describe(&client, table, &config.columns, Checks::POLLING).await?;
    let batch = BatchSelect::new(table, &config.columns, &shape);
    let t = texts(table, &config.columns, &shape);
    Ok((batch.sql(BatchSelect::PARAMETERS), t.delete))
}

async fn prepare(
    client: &Client,
    t: &TableName,
    c: &Columns,
    shape: &TableShape,
) -> Result<Statements, SourceError> {
    let Texts {
        raw_row,
        delete,
        backlog,
    } = texts(t, c, shape);
    Ok(Statements {
        backlog: client
            .prepare(&backlog)
            .await
            .map_err(SourceError::pg("preparing the backlog count"))?,
        raw_row: client
            .prepare(&raw_row)
            .await
            .map_err(SourceError::pg("preparing the raw row query"))?,
        delete: client
            .prepare(&delete)
            .await
            .map_err(SourceError::pg("preparing the delete"))?,
    })
}

/// The batch read's SELECT for one outbox table, its bounds left open.
struct BatchSelect {
    list: String,
    seq: String,
    size: String,
    table: String,
}

impl BatchSelect {
    /// The bounds as parameters `$1` … `$4` (see [`BatchSelect::sql`]).
    const PARAMETERS: [&'static str; 4] = ["$1::int8", "$2::int8", "$3", "$4::int8"];

    fn new(t: &TableName, c: &Columns, shape: &TableShape) -> BatchSelect {
        let q = |name: &str| crate::source::quote_ident(name);
        BatchSelect {
            list: table::select_list(c, shape),
            seq: q(&c.seq),
            // The length of the value as sent, not as stored: stored values may be
            // compressed.
            size: if shape.payload_type == "bytea" {
                format!("octet_length({})", q(&c.payload))
            } else {
                format!("octet_length({}::text)", q(&c.payload))
            },
            table: t.quoted(),
        }
    }

    /// The SELECT with its bounds, as SQL expressions: the lower and upper `seq` bounds
    /// (`from`, the fence), the rows and the payload bytes at most.
    fn sql(&self, [from, fence, rows, bytes]: [&str; 4]) -> String {
        let BatchSelect {
            list,
            seq,
            size,
            table,
        } = self;
        // At most `rows` rows, and of those only the prefix whose payloads fit in `bytes`,
        // with at least one row: a batch of large events stays small in memory. (A NULL
        // payload counts 0, so its row is still read, and dead-lettered.)
        //
        // The fence bounds the rows outside the LIMIT, not in the index condition: a
        // range on `seq` gets the planner's default 0.5 % selectivity when the table has
        // no statistics yet (a new outbox, a burst before autovacuum's ANALYZE) or in a
        // generic plan, and with it a bitmap scan of the whole range and a sort for every
        // batch — 67 ms instead of 2 ms per 1,000 rows of a 100,000-row backlog, a drain
        // quadratic in its size. `seq > from ORDER BY seq LIMIT n` is an index scan that
        // stops after n rows whatever the estimates. A batch whose LIMIT reaches past the
        // fence is only shorter: the rows are in `seq` order, so what is left is still a
        // prefix.
        //
        // Only the event's columns are sent (the batch's own two are named so they can
        // be left out), so the rows are exactly what `copy` reads.
        let columns = (1..=table::SELECTED.len())
            .map(|i| format!("c{i}"))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "SELECT {columns} FROM (SELECT {list}, outbox_relay_size, \
               sum(outbox_relay_size) OVER (ORDER BY {seq}) AS outbox_relay_running \
               FROM (SELECT *, COALESCE({size}, 0) AS outbox_relay_size FROM {table} \
                     WHERE {seq} > {from} ORDER BY {seq} LIMIT {rows}) outbox_rows \
               WHERE {seq} <= {fence}) \
               batch({columns}, outbox_relay_size, outbox_relay_running) \
             WHERE outbox_relay_running - outbox_relay_size < {bytes} ORDER BY 1"
        )
    }
}

fn texts(t: &TableName, c: &Columns, shape: &TableShape) -> Texts {
    let q = |name: &str| crate::source::quote_ident(name);
    let raw_row = format!(
        "{} WHERE {seq} > $1::int8 AND {seq} <= $2::int8 ORDER BY {seq} LIMIT 1",
        table::raw_select_sql(t, c, shape),
        seq = q(&c.seq),
    );
    let delete = format!(
        "DELETE FROM {table} WHERE {seq} = ANY($1::int8[])",
        table = t.quoted(),
        seq = q(&c.seq)
    );
    let backlog = format!(
        "SELECT count(*) FROM (SELECT 1 FROM {table} LIMIT $1) backlog",
        table = t.quoted()
    );
    Texts {
        raw_row,
        delete,
        backlog,
    }
}
