//! A slot that is gone: invalidated by the server or dropped under the relay.
//!
//! A slot keeps the WAL the relay has not acknowledged. When the server gives up on it
//! (`max_slot_wal_keep_size`, on 18 `idle_replication_slot_timeout`, on a standby a
//! conflict with recovery), the events committed after its last acknowledgement may no
//! longer be in the WAL. The relay never skips over that silently:
//! `source.logical.on_slot_lost` decides. `fail` (the default) stops with what happened
//! and the ways on; `recreate` drops the dead slot and does a first start, which
//! publishes the rows still in the outbox again (duplicates, no lost table rows). Logical
//! decoding messages (`pg_logical_emit_message`) live only in the WAL: those written
//! while the slot was lost are gone either way.
//!
//! The relay remembers every slot it has had, in PostgreSQL next to the data
//! (`source::state`), written once a first start has made the real slot: a slot missing
//! while the memory has it is a loss, on every start, in every pod, however often a
//! supervisor restarts the relay. `fail` exits with its own code
//! ([`SLOT_LOST_EXIT_CODE`](crate::cli::SLOT_LOST_EXIT_CODE)), which the systemd unit and
//! the Kubernetes docs list as "do not restart". An operator who dropped the slot on
//! purpose says so with `outbox-relay slot forget`; the next start is then a first start
//! (logged as a WARN and counted, since the outbox has history). Without the memory (a
//! hot standby whose primary has no relay tables) only a slot that vanishes while this
//! process has acknowledged through it is known to be lost.

use super::commands::ServerVersion;
use super::config::OnSlotLost;
use super::LogicalSource;
use crate::source::SourceError;

/// What `pg_replication_slots` says about the slot.
pub(super) enum SlotState {
    Missing,
    Usable { failover: bool },
    Lost(Why),
}

/// Why a slot is lost, in the server's words where it has them.
pub(super) enum Why {
    /// `invalidation_reason` (17+) or `wal_status = 'lost'` (13–16: `wal_removed`).
    Invalidated(String),
    /// Gone while this process had acknowledged through it.
    Dropped,
    /// Gone, though the relay's slot memory says it had it (dropped while the relay was
    /// stopped, or by a restart loop's earlier run).
    Remembered { since: String, checked: String },
}

impl Why {
    fn explain(&self) -> String {
        match self {
            Why::Invalidated(reason) => {
                let what = match reason.as_str() {
                    "wal_removed" => {
                        "the server removed WAL it still needed (it fell more than \
                         max_slot_wal_keep_size behind)"
                    }
                    "idle_timeout" => "it was unused for longer than idle_replication_slot_timeout",
                    "rows_removed" => {
                        "catalog rows it needed were removed (on a standby: turn on \
                         hot_standby_feedback and use a physical slot on the primary)"
                    }
                    "wal_level_insufficient" => "the primary's wal_level went below logical",
                    _ => "the server invalidated it",
                };
                format!("was invalidated ({reason}): {what}")
            }
            Why::Dropped => "was dropped while the relay was using it".into(),
            Why::Remembered { since, checked } => format!(
                "is gone: the relay has streamed from it since {since} (last acknowledged at \
                 {checked}, as its slot memory in PostgreSQL records), so it was dropped"
            ),
        }
    }
}

/// The slot's state, in the columns each major has. On 16 `conflicting` is true for
/// every invalidation (17 narrows it to conflicts), so `wal_status` is asked first.
fn state_query(server: ServerVersion) -> &'static str {
    if server.major() >= 17 {
        "SELECT COALESCE(wal_status = 'lost', false) OR invalidation_reason IS NOT NULL, \
                COALESCE(invalidation_reason, 'wal_removed'), failover \
         FROM pg_replication_slots WHERE slot_name = $1"
    } else if server.major() == 16 {
        "SELECT COALESCE(wal_status = 'lost', false) OR COALESCE(conflicting, false), \
                CASE WHEN wal_status = 'lost' THEN 'wal_removed' ELSE 'rows_removed' END, false \
         FROM pg_replication_slots WHERE slot_name = $1"
    } else {
        "SELECT COALESCE(wal_status = 'lost', false), 'wal_removed', false \
         FROM pg_replication_slots WHERE slot_name = $1"
    }
}

impl LogicalSource {
    pub(super) async fn slot_state(&self) -> Result<SlotState, SourceError> {
        let slot = &self.config.logical.slot;
        let row = self
            .sql
            .query_opt(state_query(self.server), &[slot])
            .await
            .map_err(SourceError::pg("looking up the replication slot"))?;
        let remembered = self.memory.as_ref().filter(|m| m.forgotten_at.is_none());
        Ok(match row {
            None if self.acknowledged_before() => SlotState::Lost(Why::Dropped),
            None => match remembered {
                Some(m) => SlotState::Lost(Why::Remembered {
                    since: m.first_started_at.clone(),
                    checked: m.vouched_at.clone(),
                }),
                None => SlotState::Missing,
            },
            Some(r) if r.get::<_, bool>(0) => SlotState::Lost(Why::Invalidated(r.get(1))),
            Some(r) => SlotState::Usable { failover: r.get(2) },
        })
    }

    /// Whether this process has acknowledged WAL through the slot: then a missing slot
    /// was taken from under it. (The metric is this process's own flushed position.)
    fn acknowledged_before(&self) -> bool {
        self.telemetry.metrics.last_acked_lsn.get() > 0
    }

    /// `fail`: the error that stops the relay. `recreate`: the dead slot is dropped and
    /// counted; the caller then creates a new one with a first start.
    pub(super) async fn slot_lost(&mut self, why: Why) -> Result<(), SourceError> {
        let slot = &self.config.logical.slot;
        let what = why.explain();
        if self.config.logical.on_slot_lost == OnSlotLost::Fail {
            let own_way = match why {
                Why::Invalidated(_) => format!(
                    "drop it (SELECT pg_drop_replication_slot('{slot}')) and start the relay, \
                     which then does a first start"
                ),
                Why::Dropped | Why::Remembered { .. } => {
                    "if it was dropped on purpose, say so: outbox-relay slot forget --config \
                     <file> (the next start is then a first start)"
                        .to_owned()
                }
            };
            return Err(SourceError::SlotLost(format!(
                "replication slot {slot} {what}. Events committed after its last \
                 acknowledgement may be gone from the WAL, so the relay stops rather than \
                 skip them. To go on: set source.logical.on_slot_lost = \"recreate\" (a new \
                 slot; the rows still in the outbox are published again, duplicates possible; \
                 logical decoding messages written meanwhile are lost), or {own_way}"
            )));
        }
        if let Why::Invalidated(_) = why {
            let dropped = self
                .sql
                .execute("SELECT pg_drop_replication_slot($1)", &[slot])
                .await;
            match dropped {
                // Another relay dropped it first: the first-start lock decides who goes on.
                Err(e) if e.code().is_some_and(|c| c.code() == "42704") => {}
                Err(e) if e.code().is_some_and(|c| c.code() == "55006") => {
                    return Err(SourceError::SlotBusy {
                        slot: slot.clone(),
                        detail: e.to_string(),
                    })
                }
                Err(e) => {
                    return Err(SourceError::Postgres {
                        context: "dropping the lost replication slot",
                        source: e,
                    })
                }
                Ok(_) => {}
            }
        }
        self.telemetry.metrics.slots_recreated.inc();
        self.telemetry.metrics.first_starts_with_history.inc();
        tracing::error!(
            %slot,
            "replication slot {slot} {what}; on_slot_lost = \"recreate\": making a new slot and \
             publishing the rows still in the outbox again (duplicates possible); logical \
             decoding messages written since its last acknowledgement are lost"
        );
        Ok(())
    }
}
