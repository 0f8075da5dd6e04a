//! Publishing the rows a publication change may have made the server skip, from the
//! table, before the stream goes on.
//!
//! When the carriage ([`super::carriage`]) differs from the one in the slot memory, the
//! rows committed while the outbox was not carried were never decoded and never will be:
//! the server decodes each transaction with the catalog as it was at its commit. They are
//! still in the table, unless cleanup or the application deleted them. Which ones? Every
//! row written by a transaction not older than the oldest one running when the relay last
//! vouched for the carriage (`vouched_xmin`): transactions that committed while the
//! outbox was not carried are among them, and so, at most, is the last stretch the
//! relay had already published (duplicates, never a gap).
//!
//! Order: these rows go out first, in the table's order, then the stream resumes from the
//! slot's flushed position. The relay stops before publishing anything that follows a
//! change, so an aggregate's skipped row is never published behind its later ones; the
//! stream's replay of rows also republished here comes after them.
//!
//! Before 18, PostgreSQL cannot decode WAL written while the publication was missing
//! ("publication … does not exist", for ever). When the publication was dropped and made
//! again, the relay moves the slot to the current WAL position first (rows committed
//! before it are all in the table snapshot taken after it; logical decoding messages in
//! that stretch cannot be decoded, and the log says so).

use std::time::Duration;

use tokio_postgres::Client;

use super::{LogicalSource, Phase};
use crate::event::OutboxEvent;
use crate::source::{quote_ident, table, SourceError};

const REPAIR_CURSOR: &str = "outbox_relay_repair";
/// Ids named in the log, at most.
const IDS_LOGGED: i64 = 100;
/// How long the slot move waits for transactions running at its position to end.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

pub(super) struct Repair {
    /// Inside a REPEATABLE READ transaction, with the cursor.
    reader: Client,
    pub(super) exhausted: bool,
    rows: i64,
}

impl LogicalSource {
    /// Counts and names the rows to republish, and opens the cursor over them.
    pub(super) async fn begin_repair(
        &mut self,
        from_xmin: i64,
        moved_slot: bool,
    ) -> Result<(), SourceError> {
        if moved_slot {
            self.move_slot_past_missing_publication().await?;
        }
        let t = self.config.outbox_table()?.clone();
        let select = self
            .select_base
            .as_deref()
            .expect("a table outbox has its SELECT");
        // 32 bits of the 64-bit id, compared by age: rows of that transaction or newer.
        let xid32 = (from_xmin as u64 & 0xffff_ffff).to_string();
        let mut newer = format!("age(xmin) <= age('{xid32}'::xid)");
        if let Some(filter) = &self.shard_filter {
            // This shard's rows only: the others' are their shards' to republish.
            newer = format!("{newer} AND {filter}");
        }
        let order = table::order_key(&self.config.columns);
        let reader = table::connect(&self.config).await?;
        reader
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(SourceError::pg("opening the repair snapshot"))?;
        let row = reader
            .query_one(
                &format!(
                    "SELECT count(*), (array_agg({id}::text ORDER BY {order}))[1:{IDS_LOGGED}] \
                     FROM {table} WHERE {newer}",
                    id = quote_ident(&self.config.columns.id),
                    table = t.quoted(),
                ),
                &[],
            )
            .await
            .map_err(SourceError::pg("counting the rows to republish"))?;
        let (rows, ids): (i64, Option<Vec<String>>) = (row.get(0), row.get(1));
        reader
            .batch_execute(&format!(
                "DECLARE {REPAIR_CURSOR} NO SCROLL CURSOR FOR {select} WHERE {newer} ORDER BY {order}"
            ))
            .await
            .map_err(SourceError::pg("opening the repair cursor"))?;
        tracing::warn!(
            publication = %self.config.logical.publication,
            rows,
            ids = ?ids.unwrap_or_default(),
            "the publication changed since the relay last checked it, so the server may have \
             skipped outbox rows: publishing the {rows} rows written since then from the table \
             first (in order; those the stream already carried come again as duplicates), then \
             streaming on"
        );
        self.telemetry
            .metrics
            .publication_gap_rows
            .inc_by(rows.max(0) as u64);
        self.phase = Phase::Repair(Box::new(Repair {
            reader,
            exhausted: false,
            rows,
        }));
        Ok(())
    }

    pub(super) async fn next_repair_batch(
        &mut self,
        max: usize,
    ) -> Result<Vec<OutboxEvent>, SourceError> {
        let Phase::Repair(repair) = &mut self.phase else {
            return Ok(Vec::new());
        };
        if repair.exhausted {
            return Ok(Vec::new());
        }
        let events = super::snapshot::fetch_unframed(
            &repair.reader,
            REPAIR_CURSOR,
            max,
            &mut self.ledger,
            self.payload_is_json,
            "reading the rows to republish",
        )
        .await?;
        repair.exhausted = events.is_empty();
        Ok(events)
    }

    /// Every republished row is acknowledged: stream on, and record the carriage at the
    /// first flush.
    pub(super) async fn finish_repair(&mut self) -> Result<(), SourceError> {
        let Phase::Repair(repair) = std::mem::replace(&mut self.phase, Phase::Idle) else {
            return Ok(());
        };
        let _ = repair.reader.batch_execute("COMMIT").await;
        tracing::info!(
            rows = repair.rows,
            "republished the rows the publication change may have skipped; streaming on"
        );
        self.memory_stale = true;
        self.start_streaming(crate::event::Lsn(0)).await
    }

    /// Moves the slot to the current WAL insert position (not `pg_current_wal_lsn()`,
    /// the write position, which lags behind commits under synchronous_commit = off),
    /// once every transaction that had committed before it is visible: the repair snapshot is taken after this returns,
    /// so each row committed before the new position is in it.
    async fn move_slot_past_missing_publication(&mut self) -> Result<(), SourceError> {
        let slot = &self.config.logical.slot;
        let row = self
            .sql
            .query_one(
                "SELECT pg_current_wal_insert_lsn()::text, pg_snapshot_xmax(pg_current_snapshot())::text, \
                        (SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1)",
                &[slot],
            )
            .await
            .map_err(SourceError::pg("reading the WAL position"))?;
        let (target, xmax, from): (String, String, Option<String>) =
            (row.get(0), row.get(1), row.get(2));
        let started = std::time::Instant::now();
        loop {
            // Every transaction that committed before the target has ended, and the WAL is
            // flushed up to it (a slot never moves past the flushed WAL, and with
            // synchronous_commit = off commits reach it a little later).
            let settled: bool = self
                .sql
                .query_one(
                    "SELECT pg_snapshot_xmin(pg_current_snapshot()) >= $1::text::xid8 \
                       AND pg_current_wal_flush_lsn() >= $2::text::pg_lsn",
                    &[&xmax, &target],
                )
                .await
                .map_err(SourceError::pg("waiting for running transactions"))?
                .get(0);
            if settled {
                break;
            }
            if started.elapsed() > SETTLE_TIMEOUT {
                return Err(SourceError::Setup(format!(
                    "a transaction older than WAL position {target} is still running after \
                     {SETTLE_TIMEOUT:?}: end it (pg_stat_activity), then start the relay again"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let moved: bool = self
            .sql
            .query_one(
                "SELECT end_lsn >= $2::text::pg_lsn FROM pg_replication_slot_advance($1, $2::text::pg_lsn)",
                &[slot, &target],
            )
            .await
            .map_err(SourceError::pg("moving the slot past the missing publication's WAL"))?
            .get(0);
        if !moved {
            return Err(SourceError::Setup(format!(
                "replication slot {slot} did not move to {target} (the server stopped short of \
                 it): start the relay again"
            )));
        }
        tracing::warn!(
            %slot,
            from = from.as_deref().unwrap_or("?"),
            to = %target,
            "publication was dropped and created again: PostgreSQL {} cannot decode the WAL \
             written while it was missing, so the slot moved past it; the outbox rows written \
             since the relay last checked are republished from the table, and any logical \
             decoding messages (pg_logical_emit_message) in that stretch could not be decoded",
            self.server
        );
        Ok(())
    }
}
