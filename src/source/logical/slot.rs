//! The replication slot: finding or creating it, and streaming from it.
//!
//! The slot is also the leader lock
//! ([design §6](../../../docs/design.md#6-leadership-and-standbys)): PostgreSQL lets one
//! connection stream from a slot, so a second relay gets "slot is active for PID n" and
//! waits as a standby.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use super::commands;
use super::lost::SlotState;
use super::mapping::Mapper;
use super::protocol::{ReplicationClient, ReplicationError};
use super::row_change::RowChanges;
use super::stream::{self, Feedback, Queued};
use super::{LogicalSource, Phase, Streaming, CHANNEL};
use crate::event::Lsn;
use crate::source::SourceError;

/// First key of the first-start advisory lock (`'outs'`); the second is the slot name's
/// hash.
const FIRST_START_LOCK_CLASS: i32 = 0x6f75_7473;

impl LogicalSource {
    pub(super) async fn take_slot(&mut self) -> Result<(), SourceError> {
        let recreating = match self.slot_state().await? {
            SlotState::Usable { failover } => {
                self.slot_is_failover = failover;
                if self
                    .memory
                    .as_ref()
                    .is_none_or(|m| m.forgotten_at.is_some())
                {
                    // A slot made before the relay had a memory (an upgrade, or by hand):
                    // adopted from here on.
                    self.remember_slot(None).await?;
                    tracing::info!(slot = %self.config.logical.slot, "recorded the slot in the relay's slot memory");
                }
                if let Some((xmin, remade)) = self.repair_from.take() {
                    return self.begin_repair(xmin, remade).await;
                }
                return self.start_streaming(Lsn(0)).await;
            }
            SlotState::Lost(why) => {
                self.slot_lost(why).await?;
                true
            }
            SlotState::Missing => {
                if let Some(m) = self.memory.as_ref().filter(|m| m.forgotten_at.is_some()) {
                    self.telemetry.metrics.first_starts_with_history.inc();
                    tracing::warn!(
                        slot = %self.config.logical.slot,
                        forgotten_at = m.forgotten_at.as_deref().unwrap_or("?"),
                        "first start on an outbox that had this slot before (an operator said it \
                         was dropped on purpose): the rows still in the outbox are published \
                         again, logical decoding messages written since it was dropped are lost"
                    );
                }
                false
            }
        };
        // A first start publishes every row of the table: nothing is left to repair.
        self.repair_from = None;
        let logical = &self.config.logical;
        if !logical.create_if_missing && !recreating {
            return Err(SourceError::Setup(format!(
                "replication slot {} does not exist and source.logical.create_if_missing = false: \
                 create it (outbox-relay setup prints the SQL) or allow the relay to",
                logical.slot
            )));
        }
        // Only one relay may do the first start: two would both publish the snapshot.
        // The lock is this session's, so it goes with the connection if the relay dies.
        let first: bool = self
            .sql
            .query_one(
                "SELECT pg_try_advisory_lock($1, hashtext($2))",
                &[&FIRST_START_LOCK_CLASS, &logical.slot],
            )
            .await
            .map_err(SourceError::pg("taking the first-start lock"))?
            .get(0);
        if !first {
            return Err(SourceError::SlotBusy {
                slot: logical.slot.clone(),
                detail: "another relay is creating it (first start)".into(),
            });
        }
        if self.select_sql.is_none() {
            // Table-less: nothing existed before the slot, so nothing to snapshot.
            let mut repl = self.replication_client().await?;
            let slot = &logical.slot;
            repl.simple_query(&commands::create_slot(
                self.server,
                slot,
                false,
                commands::Snapshot::Nothing,
            ))
            .await
            .map_err(slot_error(slot))?;
            tracing::info!(%slot, "created the replication slot");
            self.slot_is_failover = false;
            self.remember_slot(None).await?;
            return self.start_streaming(Lsn(0)).await;
        }
        self.begin_snapshot().await
    }

    /// Writes the slot memory: this outbox has a slot now (`xmin`: the first start's
    /// snapshot, whose rows were published).
    pub(super) async fn remember_slot(&mut self, xmin: Option<i64>) -> Result<(), SourceError> {
        let slot = &self.config.logical.slot;
        let lsn: Option<String> = self
            .sql
            .query_opt(
                "SELECT COALESCE(confirmed_flush_lsn, restart_lsn)::text FROM pg_replication_slots \
                 WHERE slot_name = $1",
                &[slot],
            )
            .await
            .map_err(SourceError::pg("reading the slot's position"))?
            .and_then(|r| r.get(0));
        self.state
            .remember(
                &self.sql,
                slot,
                &self.config.logical.publication,
                &self.carried_by,
                lsn.as_deref().unwrap_or("0/0"),
                xmin,
            )
            .await?;
        self.memory = self.state.recall(&self.sql, slot).await?;
        Ok(())
    }

    pub(super) async fn replication_client(&self) -> Result<ReplicationClient, SourceError> {
        // The server's side of source/deadlines.rs, and the walsender's own timeout.
        let mut pg = self.config.pg.clone();
        pg.options(crate::source::deadlines::replication_options(
            self.config.logical.wal_sender_timeout,
            self.config.pg.get_options(),
        ));
        super::hosts::connect(&pg, &self.config.tls)
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

    /// Streams from the slot, from `from` (0: wherever the slot stands).
    pub(super) async fn start_streaming(&mut self, from: Lsn) -> Result<(), SourceError> {
        let logical = &self.config.logical;
        let mut repl = self.replication_client().await?;
        // Checked once replication is known to work: that problem comes first.
        if let Some(t) = &self.config.dead_letter_table {
            crate::source::dead_letter_table::ensure(&self.sql, t).await?;
        }
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
                from = %from,
                "starting replication"
            );
        }
        if logical.failover && !self.slot_is_failover {
            // Made here for every path (found, copied from the first start's, created
            // table-less): a copied slot never inherits the option.
            repl.simple_query(&commands::make_failover(&logical.slot))
                .await
                .map_err(slot_error(&logical.slot))?;
            self.slot_is_failover = true;
            tracing::info!(slot = %logical.slot, "the replication slot is a failover slot");
        }
        let command =
            commands::start_replication(self.server, &logical.slot, from, &logical.publication);
        let stream = repl
            .start_replication(&command)
            .await
            .map_err(slot_error(&logical.slot))?;
        // The channel carries chunks of items: about CHANNEL items when they are full,
        // shared among the shards (each one's stream has its own channel).
        let shards = logical.shard.map_or(1, |s| s.count as usize);
        let (tx, rx) = mpsc::channel((CHANNEL / stream::CHUNK / shards).max(2));
        let (feedback, feedback_rx) = watch::channel(Feedback::default());
        let mapper = Mapper::new(
            self.config.table.clone(),
            self.config.columns.clone(),
            logical.message_prefix.clone(),
        )
        .with_relations(self.partitions.clone());
        let queued = Arc::new(Queued {
            bytes: AtomicUsize::new(0),
            budget: self.config.max_batch_bytes,
        });
        let deletes = self.server.has_messages() || !logical.cleanup;
        let changes = RowChanges::new(self.config.on_row_change, deletes, self.telemetry.clone());
        let task = tokio::spawn(stream::run(
            stream,
            mapper,
            changes,
            tx,
            feedback_rx,
            queued.clone(),
            logical.status_interval,
            logical.wal_sender_timeout,
            self.telemetry.clone(),
        ));
        self.phase = Phase::Streaming(Streaming {
            rx,
            carry: Vec::new().into_iter(),
            feedback,
            queued,
            task,
            last_len: 0,
        });
        // Events taken from an earlier stream are that stream's: this one sends them again.
        self.ledger = Default::default();
        match logical.heartbeat_interval {
            // A standby takes no writes; the primary's own traffic moves its WAL on.
            Some(_) if self.standby => tracing::info!(
                "decoding on a standby: no heartbeat messages (they would be writes)"
            ),
            // Every slot decodes the one message: the first shard writes it for all.
            Some(_) if logical.shard.is_some_and(|s| s.index > 0) => {}
            Some(every) => self.spawn_heartbeat(every),
            None => {}
        }
        Ok(())
    }
}

/// Whether the slot exists (in any state).
pub async fn slot_exists(sql: &tokio_postgres::Client, slot: &str) -> Result<bool, SourceError> {
    Ok(sql
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
            &[&slot],
        )
        .await
        .map_err(SourceError::pg("looking up the replication slot"))?
        .get(0))
}

/// Maps slot errors: "in use" means another relay leads; the rest keep their context.
pub(super) fn slot_error(slot: &str) -> impl FnOnce(ReplicationError) -> SourceError + '_ {
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

pub(super) fn protocol_error(what: &str) -> SourceError {
    SourceError::Replication {
        context: "creating the replication slot",
        source: ReplicationError::Protocol(what.to_owned()),
    }
}
