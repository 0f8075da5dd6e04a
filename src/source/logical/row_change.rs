//! An UPDATE or DELETE of an outbox row, seen in the log.
//!
//! Outbox rows are immutable once written: log mode publishes a row's insert image
//! (what the transaction wrote first), while polling reads whatever the row holds when
//! it is selected. Merging later changes into the insert would need whole transactions
//! in memory, which the byte budget forbids. So, as Debezium's outbox router does
//! (`table.op.invalid.behavior`), a change of a written row is never silent:
//! `source.on_row_change` decides (`warn`, `dead_letter`, `stop`).
//!
//! The relay's own cleanup deletes are not changes: each cleanup transaction starts
//! with a logical message with the [`CLEANUP_PREFIX`], and its deletes are passed over.

use std::collections::HashSet;

use super::mapping::Mapper;
use super::pgoutput::Value;
use crate::event::{OutboxEvent, Position};
use crate::metrics::Telemetry;
use crate::source::{OnRowChange, SourceError};

/// The prefix of the message that marks the relay's own cleanup transactions.
pub const CLEANUP_PREFIX: &str = "outbox-relay-cleanup";

/// Row ids already warned about, at most: past it the set starts over (a row may then be
/// named twice, never zero times).
const WARNED_MAX: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Update,
    Delete,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Update => "update",
            Kind::Delete => "delete",
        }
    }
}

pub struct RowChanges {
    policy: OnRowChange,
    /// False on 13 with cleanup on: its pgoutput sends no logical messages, so the
    /// relay's cleanup cannot be told from other deletes, and deletes are passed over.
    deletes: bool,
    warned: HashSet<String>,
    telemetry: Telemetry,
}

impl RowChanges {
    pub fn new(policy: OnRowChange, deletes: bool, telemetry: Telemetry) -> RowChanges {
        RowChanges {
            policy,
            deletes,
            warned: HashSet::new(),
            telemetry,
        }
    }

    /// Applies the policy to one change; an event comes back for the dead-letter topic.
    /// `tuple` is the new row (UPDATE) or the old key or row (DELETE).
    pub fn handle(
        &mut self,
        kind: Kind,
        mapper: &Mapper,
        relation: u32,
        tuple: Vec<Value>,
        position: Position,
        timestamp_ms: i64,
    ) -> Result<Option<OutboxEvent>, SourceError> {
        if kind == Kind::Delete && !self.deletes {
            return Ok(None);
        }
        // Mapped like an insert: the relation must be the outbox, and the id is there
        // (a DELETE's key tuple carries the key columns, the others as NULL).
        let mut event = mapper.insert(relation, tuple, position, timestamp_ms)?;
        let id = event
            .id
            .as_deref()
            .map_or_else(|| "(no id in the change)".to_owned(), str::to_owned);
        self.telemetry
            .metrics
            .row_changes
            .with_label_values(&[kind.label()])
            .inc();
        let what = match kind {
            Kind::Update => "an UPDATE changed outbox row",
            Kind::Delete => "a DELETE removed outbox row",
        };
        match self.policy {
            OnRowChange::Warn => {
                if self.warned.len() >= WARNED_MAX {
                    self.warned.clear();
                }
                if self.warned.insert(id.clone()) {
                    tracing::warn!(
                        row_id = %id,
                        change = kind.label(),
                        "{what} {id} after it was written; outbox rows are immutable, so the \
                         change is not published (log mode publishes the row as inserted). \
                         source.on_row_change = \"dead_letter\" sends it to the dead-letter \
                         topic, \"stop\" stops the relay"
                    );
                }
                Ok(None)
            }
            OnRowChange::DeadLetter => {
                let reason = match kind {
                    Kind::Update => format!(
                        "outbox row {id} was updated after it was written (rows are immutable; \
                         the insert image was published): this is the new image"
                    ),
                    Kind::Delete => format!(
                        "outbox row {id} was deleted by someone other than the relay's cleanup \
                         (rows are immutable once written)"
                    ),
                };
                if kind == Kind::Delete {
                    // The key alone: the rest of a key tuple is NULLs, not the row.
                    event.payload = None;
                }
                event.invalid = Some(reason);
                Ok(Some(event))
            }
            OnRowChange::Stop => Err(SourceError::Setup(format!(
                "{what} {id} after it was written, and source.on_row_change = \"stop\": the relay \
                 stopped before acknowledging that transaction. Outbox rows are immutable once \
                 written: find what changes them, or set source.on_row_change = \"warn\" or \
                 \"dead_letter\" to pass over the change"
            ))),
        }
    }
}
