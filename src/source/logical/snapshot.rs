//! The first start ([design §5](../../../docs/design.md#5-first-start)): rows already in
//! the outbox when the slot is created are published before the stream starts.
//!
//! A *temporary* slot exports a snapshot; the table is read through it in `seq` order
//! and published; only then is the temporary slot copied into the real one
//! (`pg_copy_logical_replication_slot`), and the stream starts at the snapshot's
//! consistent point: no gap, no overlap. A crash before the copy leaves no slot behind
//! (temporary slots die with their session), so the next start does it all again. A
//! graceful stop whose snapshot is wholly acknowledged makes the slot before it exits,
//! so a restart right after a short first start repeats nothing.

use tokio_postgres::Client;

use super::protocol::ReplicationClient;
use super::slot::{protocol_error, slot_error};
use super::{LogicalSource, Phase};
use crate::event::{Lsn, OutboxEvent};
use crate::source::{table, SourceError};

const SNAPSHOT_CURSOR: &str = "outbox_relay_snapshot";

/// A random number, from the standard library's randomly seeded hasher.
fn nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish()
}

pub(super) struct Snapshot {
    /// Holds the temporary slot: closing it drops the slot.
    _holder: ReplicationClient,
    /// Inside a REPEATABLE READ transaction on the exported snapshot, with the cursor.
    reader: Client,
    temp_slot: String,
    consistent_point: Lsn,
    /// The exported snapshot's oldest running transaction: rows of older ones are in it.
    xmin: i64,
    pub(super) exhausted: bool,
    /// A FETCH was sent and its rows not taken: a stop cancelled it. The server moved
    /// the cursor past rows nobody published, so where it stands says nothing.
    fetching: bool,
}

impl LogicalSource {
    /// First start: a temporary slot exporting a snapshot, and a reader on it.
    pub(super) async fn begin_snapshot(&mut self) -> Result<(), SourceError> {
        let slot = &self.config.logical.slot;
        // Unique per attempt: in containers every relay is PID 1.
        let temp_slot: String = format!("{}_init_{:016x}", &slot[..slot.len().min(40)], nonce());
        let mut holder = self.replication_client().await?;
        let rows = holder
            .simple_query(&super::commands::create_slot(
                self.server,
                &temp_slot,
                true,
                super::commands::Snapshot::Export,
            ))
            .await
            .map_err(slot_error(&temp_slot))?;
        let row = rows
            .first()
            .ok_or_else(|| protocol_error("CREATE_REPLICATION_SLOT returned no row"))?;
        let consistent_point = row
            .get(1)
            .and_then(|v| v.as_deref())
            .and_then(|v| v.parse::<Lsn>().ok())
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
        let xmin: i64 = reader
            .query_one(
                "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::int8",
                &[],
            )
            .await
            .map_err(SourceError::pg(
                "reading the first-start snapshot's horizon",
            ))?
            .get(0);
        tracing::info!(
            %slot,
            %consistent_point,
            "first start: publishing the rows already in the outbox, then streaming"
        );
        self.phase = Phase::Snapshot(Box::new(Snapshot {
            _holder: holder,
            reader,
            temp_slot,
            consistent_point,
            xmin,
            exhausted: false,
            fetching: false,
        }));
        Ok(())
    }

    /// The snapshot is published: make the real slot and stream from where it ends.
    pub(super) async fn finish_snapshot(&mut self) -> Result<(), SourceError> {
        match self.keep_snapshot_slot().await? {
            Some(point) => self.start_streaming(point).await,
            None => Ok(()),
        }
    }

    /// A stop during the first start: if every snapshot row is published and
    /// acknowledged, the real slot is made now. Otherwise the next start would publish
    /// the whole snapshot again, though Kafka has all of it.
    pub(super) async fn finish_snapshot_on_stop(&mut self) -> Result<(), SourceError> {
        let Phase::Snapshot(snap) = &mut self.phase else {
            return Ok(());
        };
        if self.ledger.unacknowledged() > 0 {
            return Ok(());
        }
        if snap.fetching {
            tracing::info!(
                slot = %self.config.logical.slot,
                "stopped while reading the first-start snapshot: the next start publishes the \
                 outbox's rows again (duplicates, no loss)"
            );
            return Ok(());
        }
        if !snap.exhausted {
            // The last batch may have been the end without the cursor saying so yet.
            let more = snap
                .reader
                .query(&format!("FETCH 1 FROM {SNAPSHOT_CURSOR}"), &[])
                .await
                .map_err(SourceError::pg("reading the first-start snapshot"))?;
            if !more.is_empty() {
                tracing::info!(
                    slot = %self.config.logical.slot,
                    "stopped during the first start: the next start publishes the outbox's \
                     rows again (duplicates, no loss)"
                );
                return Ok(());
            }
            snap.exhausted = true;
        }
        match self.keep_snapshot_slot().await {
            Ok(_) => Ok(()),
            // A copy a stop cancelled had made it already (or another relay did): the
            // slot exists, which is all a stop needs.
            Err(SourceError::SlotBusy { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Copies the temporary slot into the real one and closes the snapshot; returns the
    /// consistent point to stream from, or `None` when not in the first start.
    ///
    /// The phase changes only at the end: a stop may cancel this half way, and the
    /// stop's [`LogicalSource::finish_snapshot_on_stop`] must then still find the
    /// snapshot to finish (a second COMMIT is only a warning).
    async fn keep_snapshot_slot(&mut self) -> Result<Option<Lsn>, SourceError> {
        let Phase::Snapshot(snap) = &self.phase else {
            return Ok(None);
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
        let Phase::Snapshot(snap) = std::mem::replace(&mut self.phase, Phase::Idle) else {
            unreachable!("the phase was the snapshot above");
        };
        let (point, xmin) = (snap.consistent_point, snap.xmin);
        self.slot_is_failover = false;
        drop(snap); // closes the holder: the temporary slot goes away

        // Only now: a crash during the snapshot left no slot, and no memory of one.
        self.remember_slot(Some(xmin)).await?;
        Ok(Some(point))
    }

    pub(super) async fn next_snapshot_batch(
        &mut self,
        max: usize,
    ) -> Result<Vec<OutboxEvent>, SourceError> {
        let Phase::Snapshot(snap) = &mut self.phase else {
            return Ok(Vec::new());
        };
        if !snap.exhausted {
            snap.fetching = true;
            let rows = fetch_unframed(
                &snap.reader,
                SNAPSHOT_CURSOR,
                max,
                &mut self.ledger,
                self.payload_is_json,
                "reading the first-start snapshot",
            )
            .await?;
            snap.fetching = false;
            if rows.is_empty() {
                snap.exhausted = true;
            } else {
                return Ok(rows);
            }
        }
        Ok(Vec::new())
    }
}

/// The next `max` rows of a table read through `cursor` (the first-start snapshot, or
/// the rows a publication change may have skipped), as events the ledger counts without
/// a transaction of the stream around them.
pub(super) async fn fetch_unframed(
    reader: &Client,
    cursor: &str,
    max: usize,
    ledger: &mut super::ledger::Ledger,
    payload_is_json: bool,
    context: &'static str,
) -> Result<Vec<OutboxEvent>, SourceError> {
    let rows = reader
        .query(&format!("FETCH {max} FROM {cursor}"), &[])
        .await
        .map_err(SourceError::pg(context))?;
    Ok(table::rows_to_events(&rows, payload_is_json)
        .into_iter()
        .map(|event| ledger.take_unframed(event))
        .collect())
}
