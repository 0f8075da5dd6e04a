//! Whether the publication still carries the outbox: the check behind every slot flush.
//!
//! pgoutput says nothing when a publication changes. A table dropped from the
//! publication and added back, or a publication dropped and created again, lets the
//! server skip every row committed in between, and the slot moves past them as if
//! nothing happened. So the relay identifies *what carries the outbox* by catalog rows:
//! the publication's OID and row version, and the membership row
//! (`pg_publication_rel`, or `pg_publication_namespace` for `FOR TABLES IN SCHEMA`)
//! with its OID and version. Leaving and coming back makes new rows, so the identity
//! (the *carriage*) changes even when both changes fall between two checks.
//!
//! The relay checks the carriage
//! * at start, against the one it recorded in its slot memory (`source::state`);
//! * whenever the stream describes an outbox relation, which pgoutput does again after
//!   the table is added to a publication: before any event that follows is published;
//! * before every slot flush: a flush moves the slot only to a point received before
//!   a check that found the carriage unchanged.
//!
//! A changed carriage never passes silently: when the outbox is carried again, the relay
//! reconnects and republishes the rows the server may have skipped from the table
//! ([`super::repair`]); when it is not, the relay stops with the exact fix.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::commands::ServerVersion;
use super::{LogicalSource, Phase};
use crate::event::Lsn;
use crate::source::{SourceConfig, SourceError};

/// How often, at most, the slot's flushed position moves (each move is checked first).
pub(super) const VOUCH_INTERVAL: Duration = Duration::from_millis(250);

/// How long a streaming relay keeps looking at a publication that stopped carrying the
/// outbox before it stops (at most half of `source.query_timeout`): `DROP TABLE` then
/// `ADD TABLE`, two statements, leave it without the outbox for a moment, and the relay
/// should repair that change, not stop in the middle of it.
const NOT_CARRIED_GRACE: Duration = Duration::from_secs(3);
const NOT_CARRIED_RECHECK: Duration = Duration::from_millis(200);

/// What the catalog says about the publication and the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Carriage {
    /// No publication of that name.
    NoPublication,
    /// The publication exists but does not carry the outbox's inserts; says why.
    NotCarried(String),
    /// Carried; the identity of what carries it (compare for equality only).
    Carried(String),
}

impl Carriage {
    /// The publication's own OID, the first part of a carriage identity.
    pub(super) fn publication_oid(identity: &str) -> &str {
        identity.split(':').next().unwrap_or_default()
    }
}

/// Reads the carriage from the catalog. `shard_filter` is the row filter a shard's
/// publication must have ([`super::setup::shard_filter`]); unsharded, any row filter
/// means rows the server skips.
pub(super) async fn read(
    sql: &Client,
    config: &SourceConfig,
    server: ServerVersion,
    shard_filter: Option<&str>,
) -> Result<Carriage, SourceError> {
    let name = &config.logical.publication;
    let table = config.table.as_ref().map(|t| t.quoted());
    // Schema-level publication members exist from 15.
    let by_schema = if server.major() >= 15 {
        "(SELECT 'schema ' || n.oid::text || '.' || n.xmin::text FROM pg_publication_namespace n \
          WHERE n.pnpubid = p.oid AND n.pnnspid = \
            (SELECT relnamespace FROM pg_class WHERE oid = $2::text::regclass))"
    } else {
        "NULL::text"
    };
    let row_filter = if server.major() >= 15 {
        "(SELECT pg_get_expr(r.prqual, r.prrelid) FROM pg_publication_rel r \
          WHERE r.prpubid = p.oid AND r.prrelid = $2::text::regclass)"
    } else {
        "NULL::text"
    };
    let query = format!(
        "SELECT p.oid::text || ':' || p.xmin::text, p.pubinsert, \
           CASE WHEN $2::text IS NULL THEN 'table-less' ELSE \
             COALESCE((SELECT 'table ' || r.oid::text || '.' || r.xmin::text FROM pg_publication_rel r \
                       WHERE r.prpubid = p.oid AND r.prrelid = $2::text::regclass), {by_schema}) END, \
           CASE WHEN $2::text IS NULL THEN NULL ELSE {row_filter} END \
         FROM pg_publication p WHERE p.pubname = $1"
    );
    let row = sql
        .query_opt(&query, &[name, &table])
        .await
        .map_err(SourceError::pg(
            "checking that the publication carries the outbox",
        ))?;
    let Some(row) = row else {
        return Ok(Carriage::NoPublication);
    };
    let (publication, inserts, member, filter): (String, bool, Option<String>, Option<String>) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let unexpected_filter = match (&filter, shard_filter) {
        (None, None) => None,
        (Some(found), Some(expected)) if super::setup::same_filter(found, expected) => None,
        (found, expected) => Some((found.as_deref().unwrap_or("none"), expected)),
    };
    let target = config.table_label();
    Ok(match member {
        None => Carriage::NotCarried(format!(
            "publication {name} does not publish {target}: ALTER PUBLICATION {name} ADD TABLE {}",
            table.as_deref().unwrap_or("?")
        )),
        Some(_) if !inserts && config.table.is_some() => Carriage::NotCarried(format!(
            "publication {name} does not publish inserts: ALTER PUBLICATION {name} SET \
             (publish = 'insert, update, delete')"
        )),
        Some(_) if unexpected_filter.is_some() => {
            let (found, expected) = unexpected_filter.unwrap_or_default();
            Carriage::NotCarried(match expected {
                None => format!(
                    "publication {name} publishes {target} with a row filter (WHERE {found}), so \
                     the server skips the rows it filters out: ALTER PUBLICATION {name} SET \
                     TABLE {}",
                    table.as_deref().unwrap_or("?")
                ),
                Some(expected) => format!(
                    "publication {name} is a shard's, but its row filter on {target} is {found}, \
                     not WHERE ({expected}): ALTER PUBLICATION {name} SET TABLE {} WHERE \
                     ({expected})",
                    table.as_deref().unwrap_or("?")
                ),
            })
        }
        Some(member) => Carriage::Carried(format!("{publication}:{member}")),
    })
}

/// What the relay's slot memory says against the catalog now, in one line for `check`;
/// `Err` with the problem when the slot is lost.
pub async fn describe(
    sql: &Client,
    config: &SourceConfig,
    server: ServerVersion,
) -> Result<String, SourceError> {
    let slot = &config.logical.slot;
    let Some((state, version)) = crate::source::state::peek(sql, &config.state_schema).await?
    else {
        return Ok(format!(
            "the relay's own tables are not in schema {} yet (the relay creates them at start, \
             or setup --apply)",
            config.state_schema
        ));
    };
    let memory = state.recall(sql, slot).await?;
    let exists = super::slot::slot_exists(sql, slot).await?;
    let Some(m) = memory else {
        return Ok(format!(
            "relay tables version {version}; no memory of slot {slot} (the next start {})",
            if exists {
                "records it"
            } else {
                "is a first start"
            }
        ));
    };
    if let Some(when) = &m.forgotten_at {
        return Ok(format!(
            "slot {slot} forgotten at {when} (the next start is a first start)"
        ));
    }
    if !exists {
        return Err(SourceError::SlotLost(format!(
            "replication slot {slot} is lost: the relay has streamed from it since {} (last \
             acknowledged at {}); source.logical.on_slot_lost = \"{}\" applies at start \
             (outbox-relay slot forget if it was dropped on purpose)",
            m.first_started_at, m.vouched_at, config.logical.on_slot_lost
        )));
    }
    let filter = super::setup::shard_filter(sql, config).await?;
    let now = read(sql, config, server, filter.as_deref()).await?;
    let changed = match now {
        Carriage::Carried(identity) if identity == m.carried_by => "",
        Carriage::Carried(_) => {
            "; the publication changed since: the next start republishes the rows written \
             since then from the table"
        }
        _ => "",
    };
    Ok(format!(
        "slot {slot} remembered since {}, publication last checked at {}{changed}",
        m.first_started_at, m.vouched_at
    ))
}

impl LogicalSource {
    /// Checks that the outbox is carried as it was when this process started (or last
    /// repaired): the error says what to do when it is not.
    pub(super) async fn check_carriage(&mut self) -> Result<(), SourceError> {
        let read_now = || {
            read(
                &self.sql,
                &self.config,
                self.server,
                self.shard_filter.as_deref(),
            )
        };
        let mut now = read_now().await?;
        let grace = NOT_CARRIED_GRACE.min(self.config.query_timeout / 2);
        let deadline = Instant::now() + grace;
        while matches!(now, Carriage::NotCarried(_)) && Instant::now() < deadline {
            tracing::debug!("the publication does not carry the outbox (now): looking again");
            tokio::time::sleep(NOT_CARRIED_RECHECK).await;
            now = read_now().await?;
        }
        let secs = grace.as_secs_f64();
        tracing::debug!(
            unchanged = matches!(&now, Carriage::Carried(identity) if *identity == self.carried_by),
            "checked the publication"
        );
        match now {
            Carriage::Carried(identity) if identity == self.carried_by => Ok(()),
            Carriage::Carried(_) => Err(SourceError::PublicationChanged(format!(
                "publication {} changed while the relay streamed (the outbox left it and came \
                 back, or it was dropped and created again): rows committed meanwhile may have \
                 been skipped by the server. Nothing after the change was acknowledged; \
                 reconnecting to publish them from the table",
                self.config.logical.publication
            ))),
            Carriage::NoPublication => Err(self.publication_dropped()),
            Carriage::NotCarried(why) => Err(SourceError::Setup(format!(
                "{why}. The publication stopped carrying the outbox while the relay streamed \
                 (and still did not {secs:.1} s later), so the server skips its rows: the relay \
                 stopped before acknowledging any. \
                 After the fix, the next start publishes the rows committed since the relay \
                 last checked from the table (duplicates possible, none lost)"
            ))),
        }
    }

    /// The publication was dropped under the running relay.
    fn publication_dropped(&self) -> SourceError {
        SourceError::Setup(format!(
            "publication {pubname} was dropped while the relay streamed: the server skips (18) \
             or refuses to decode (13–17) every outbox row from then on, so the relay stopped \
             before acknowledging any. Create it again: CREATE PUBLICATION {pubname} FOR TABLE \
             {table} WITH (publish = 'insert, update, delete', publish_via_partition_root = \
             true); the next start publishes the rows committed since the relay last checked \
             from the table (duplicates possible, none lost)",
            pubname = self.config.logical.publication,
            table = self.config.table_label(),
        ))
    }

    /// Why the stream ended, with the fix when the server ended it for a dropped
    /// publication (before 18 it fails the stream at the first row it decodes).
    pub(super) fn explain_stream_end(&self, e: SourceError) -> SourceError {
        match &e {
            SourceError::Replication { source, .. }
                if source.code() == Some("42704") && source.to_string().contains("publication") =>
            {
                let SourceError::Setup(fix) = self.publication_dropped() else {
                    unreachable!("publication_dropped is a setup error")
                };
                SourceError::Setup(format!("{fix} (the server: {e})"))
            }
            _ => e,
        }
    }

    /// Moves the slot's flushed position to what the ledger allows, after checking the
    /// carriage, at most every [`VOUCH_INTERVAL`] (`force`: now, for a stop). The slot
    /// memory's vouched point is written only when events were acknowledged since the
    /// last write: the relay's own write would otherwise be WAL to acknowledge again.
    pub(super) async fn advance(&mut self, force: bool) -> Result<(), SourceError> {
        let Phase::Streaming(s) = &self.phase else {
            return Ok(());
        };
        let flushable = self.ledger.flushable();
        if flushable <= s.feedback.borrow().flushed {
            return Ok(());
        }
        if !force
            && self
                .vouched_at
                .is_some_and(|t| t.elapsed() < VOUCH_INTERVAL)
        {
            return Ok(());
        }
        self.check_carriage().await?;
        if self.memory_stale {
            self.state
                .vouch(
                    &self.sql,
                    &self.config.logical.slot,
                    &self.carried_by,
                    &flushable.to_string(),
                )
                .await?;
            self.memory_stale = false;
        }
        self.vouched_at = Some(Instant::now());
        self.flush_to(flushable);
        Ok(())
    }

    /// Tells the stream task how far the slot may forget.
    fn flush_to(&mut self, flushable: Lsn) {
        let Phase::Streaming(s) = &self.phase else {
            return;
        };
        let moved = s.feedback.send_if_modified(|f| {
            let moved = flushable > f.flushed;
            f.flushed = f.flushed.max(flushable);
            moved
        });
        if moved {
            self.telemetry.metrics.acked_now();
        }
    }
}
