//! The relay's dead-letter queue in PostgreSQL (`outbox_relay_dlq`, `sql/006_parking.sql`):
//! every dead-lettered event and every event held behind one, body byte for byte, with
//! what identifies it, its error and when it was kept.
//!
//! Rows are written before the source acknowledges their events (this is what lets a
//! parked event be acknowledged without Kafka having it), read back in order to be
//! published again (`dead-letters redrive`) and deleted once Kafka has them or an
//! operator discarded them. An aggregate is parked while it has a `held` row.

use std::collections::HashSet;

use bytes::Bytes;
use tokio_postgres::Client;

use super::state::{failed, State};
use super::SourceError;
use crate::event::OutboxEvent;

/// An aggregate, as parking knows it: its type and id (`""` for a missing type).
pub type Aggregate = (String, String);

/// The aggregate an event belongs to; `None` without an aggregate id (no key, no order
/// to keep: such an event is a dead letter only).
pub fn aggregate_of(event: &OutboxEvent) -> Option<Aggregate> {
    let id = event.aggregate_id.as_deref()?;
    Some((
        event.aggregate_type.as_deref().unwrap_or("").to_owned(),
        id.to_owned(),
    ))
}

/// One event to keep.
pub struct Kept<'a> {
    pub event: &'a OutboxEvent,
    /// Why it was dead-lettered; `None` for an event held behind its aggregate's.
    pub error: Option<&'a str>,
    /// schema | too_large | invalid | refused (with `error`).
    pub reason: Option<&'static str>,
    /// Part of its aggregate's parked queue.
    pub held: bool,
}

impl<'a> Kept<'a> {
    /// A dead letter; `held` when its aggregate parks (it heads, or joins, a queue).
    pub fn dead_letter(
        event: &'a OutboxEvent,
        error: &'a str,
        reason: &'static str,
        held: bool,
    ) -> Kept<'a> {
        Kept {
            event,
            error: Some(error),
            reason: Some(reason),
            held,
        }
    }

    /// An event held behind its aggregate's dead letter.
    pub fn held(event: &'a OutboxEvent) -> Kept<'a> {
        Kept {
            event,
            error: None,
            reason: None,
            held: true,
        }
    }
}

/// One kept event, as read back.
#[derive(Debug, Clone)]
pub struct Row {
    pub id: i64,
    pub kept_at: String,
    pub age_seconds: f64,
    pub error: Option<String>,
    pub reason: Option<String>,
    pub held: bool,
    pub redrives: i32,
    pub event: OutboxEvent,
}

/// A parked aggregate, for `dead-letters list`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ParkedAggregate {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub events: i64,
    /// The queue's first row (the next to go on a redrive).
    pub head_id: i64,
    pub first_error: Option<String>,
    pub age_seconds: f64,
}

/// What the gauges show: no per-aggregate label.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Summary {
    pub parked_aggregates: i64,
    pub parked_events: i64,
    pub oldest_parked_seconds: f64,
    /// Rows with an error (dead letters, parked heads included) by reason.
    pub by_reason: Vec<(String, i64)>,
}

const COLUMNS: &str = "id, kept_at::text, extract(epoch FROM now() - kept_at)::float8, error, \
     reason, held, redrives, source_position, event_id, aggregate_type, aggregate_id, \
     event_type, headers, topic, payload, payload_is_json, created_ms";

fn row(r: &tokio_postgres::Row) -> Result<Row, SourceError> {
    let position: String = r.get(7);
    let position = position.parse().map_err(|e: String| {
        SourceError::Setup(format!(
            "the dead-letter queue holds a row whose source_position is not one: {e}"
        ))
    })?;
    let text = |i: usize| r.get::<_, Option<String>>(i).map(Into::into);
    let mut event = OutboxEvent::blank(position);
    event.id = text(8);
    event.aggregate_type = text(9);
    event.aggregate_id = text(10);
    event.event_type = text(11);
    event.headers = text(12);
    event.topic = text(13);
    event.payload = r.get::<_, Option<Vec<u8>>>(14).map(Bytes::from);
    event.payload_is_json = r.get(15);
    event.timestamp_ms = r.get(16);
    Ok(Row {
        id: r.get(0),
        kept_at: r.get(1),
        age_seconds: r.get(2),
        error: r.get(3),
        reason: r.get(4),
        held: r.get(5),
        redrives: r.get(6),
        event,
    })
}

impl State {
    /// Keeps `items` in one statement (atomic, in order); an event already kept (its
    /// batch read again) stays as it was.
    pub async fn keep(&self, sql: &Client, items: &[Kept<'_>]) -> Result<(), SourceError> {
        if items.is_empty() {
            return Ok(());
        }
        let text = |f: &dyn Fn(&OutboxEvent) -> Option<&str>| -> Vec<Option<String>> {
            items
                .iter()
                .map(|k| f(k.event).map(str::to_owned))
                .collect()
        };
        let positions: Vec<String> = items.iter().map(|k| k.event.position.to_string()).collect();
        let ids = text(&|e| e.id.as_deref());
        let types = text(&|e| e.aggregate_type.as_deref());
        let aggregates = text(&|e| e.aggregate_id.as_deref());
        let event_types = text(&|e| e.event_type.as_deref());
        let headers = text(&|e| e.headers.as_deref());
        let topics = text(&|e| e.topic.as_deref());
        // A logical message's whole envelope when the source kept it: what was written.
        let payloads: Vec<Option<&[u8]>> = items
            .iter()
            .map(|k| k.event.original.as_deref().or(k.event.payload.as_deref()))
            .collect();
        let json: Vec<bool> = items
            .iter()
            .map(|k| k.event.payload_is_json && k.event.original.is_none())
            .collect();
        let created: Vec<Option<i64>> = items.iter().map(|k| k.event.timestamp_ms).collect();
        let errors: Vec<Option<&str>> = items.iter().map(|k| k.error).collect();
        let reasons: Vec<Option<&str>> = items.iter().map(|k| k.reason).collect();
        let held: Vec<bool> = items.iter().map(|k| k.held).collect();
        sql.execute(
            &format!(
                "INSERT INTO {} (source_position, event_id, aggregate_type, aggregate_id, \
                   event_type, headers, topic, payload, payload_is_json, created_ms, error, \
                   reason, held) \
                 SELECT p, i, t, a, e, h, tp, pl, j, c, er, r, hd FROM unnest($1::text[], \
                   $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], \
                   $8::bytea[], $9::bool[], $10::int8[], $11::text[], $12::text[], $13::bool[]) \
                   WITH ORDINALITY AS k(p, i, t, a, e, h, tp, pl, j, c, er, r, hd, n) ORDER BY n \
                 ON CONFLICT (source_position, (COALESCE(event_id, md5(COALESCE(payload, \
                   ''::bytea))))) DO NOTHING",
                self.table("outbox_relay_dlq")
            ),
            &[
                &positions,
                &ids,
                &types,
                &aggregates,
                &event_types,
                &headers,
                &topics,
                &payloads,
                &json,
                &created,
                &errors,
                &reasons,
                &held,
            ],
        )
        .await
        .map_err(failed(
            self.schema(),
            "keeping dead letters and parked events",
        ))?;
        Ok(())
    }

    /// The aggregates parked now.
    pub async fn parked(&self, sql: &Client) -> Result<HashSet<Aggregate>, SourceError> {
        let rows = sql
            .query(
                &format!(
                    "SELECT DISTINCT COALESCE(aggregate_type, ''), aggregate_id FROM {} WHERE held",
                    self.table("outbox_relay_dlq")
                ),
                &[],
            )
            .await
            .map_err(failed(self.schema(), "reading the parked aggregates"))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// An aggregate's parked queue, in order; up to and including `up_to` when given.
    pub async fn queue(
        &self,
        sql: &Client,
        (aggregate_type, aggregate_id): &Aggregate,
        up_to: Option<i64>,
    ) -> Result<Vec<Row>, SourceError> {
        let rows = sql
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM {} WHERE held AND COALESCE(aggregate_type, '') = $1 \
                       AND aggregate_id = $2 AND ($3::int8 IS NULL OR id <= $3) ORDER BY id",
                    self.table("outbox_relay_dlq")
                ),
                &[aggregate_type, aggregate_id, &up_to],
            )
            .await
            .map_err(failed(self.schema(), "reading a parked queue"))?;
        rows.iter().map(row).collect()
    }

    /// One kept event.
    pub async fn dead_letter(&self, sql: &Client, id: i64) -> Result<Option<Row>, SourceError> {
        let r = sql
            .query_opt(
                &format!(
                    "SELECT {COLUMNS} FROM {} WHERE id = $1",
                    self.table("outbox_relay_dlq")
                ),
                &[&id],
            )
            .await
            .map_err(failed(self.schema(), "reading a dead letter"))?;
        r.as_ref().map(row).transpose()
    }

    /// Dead letters that hold no aggregate back (`on_poison = "skip"`, no aggregate id).
    pub async fn loose_dead_letters(&self, sql: &Client) -> Result<Vec<Row>, SourceError> {
        let rows = sql
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM {} WHERE NOT held ORDER BY id",
                    self.table("outbox_relay_dlq")
                ),
                &[],
            )
            .await
            .map_err(failed(self.schema(), "reading the dead letters"))?;
        rows.iter().map(row).collect()
    }

    /// The parked aggregates with their queues' size, head and age.
    pub async fn parked_aggregates(
        &self,
        sql: &Client,
    ) -> Result<Vec<ParkedAggregate>, SourceError> {
        let rows = sql
            .query(
                &format!(
                    "SELECT COALESCE(aggregate_type, ''), aggregate_id, count(*), min(id), \
                       (array_agg(error ORDER BY id) FILTER (WHERE error IS NOT NULL))[1], \
                       extract(epoch FROM now() - min(kept_at))::float8 \
                     FROM {} WHERE held GROUP BY 1, 2 ORDER BY min(id)",
                    self.table("outbox_relay_dlq")
                ),
                &[],
            )
            .await
            .map_err(failed(self.schema(), "reading the parked aggregates"))?;
        Ok(rows
            .iter()
            .map(|r| ParkedAggregate {
                aggregate_type: r.get(0),
                aggregate_id: r.get(1),
                events: r.get(2),
                head_id: r.get(3),
                first_error: r.get(4),
                age_seconds: r.get(5),
            })
            .collect())
    }

    /// Deletes kept events (published again, or discarded).
    pub async fn remove(&self, sql: &Client, ids: &[i64]) -> Result<u64, SourceError> {
        if ids.is_empty() {
            return Ok(0);
        }
        sql.execute(
            &format!(
                "DELETE FROM {} WHERE id = ANY($1)",
                self.table("outbox_relay_dlq")
            ),
            &[&ids],
        )
        .await
        .map_err(failed(self.schema(), "removing dead letters"))
    }

    /// A redriven event failed again: it stays (at the head of its queue) with the new
    /// error.
    pub async fn failed_again(
        &self,
        sql: &Client,
        id: i64,
        error: &str,
        reason: &str,
    ) -> Result<(), SourceError> {
        sql.execute(
            &format!(
                "UPDATE {} SET error = $2, reason = $3, redrives = redrives + 1 WHERE id = $1",
                self.table("outbox_relay_dlq")
            ),
            &[&id, &error, &reason],
        )
        .await
        .map_err(failed(self.schema(), "recording a failed redrive"))?;
        Ok(())
    }

    /// What the gauges show.
    pub async fn summary(&self, sql: &Client) -> Result<Summary, SourceError> {
        let table = self.table("outbox_relay_dlq");
        let r = sql
            .query_one(
                &format!(
                    "SELECT count(DISTINCT (COALESCE(aggregate_type, ''), aggregate_id)) FILTER \
                       (WHERE held), count(*) FILTER (WHERE held), \
                       COALESCE(extract(epoch FROM now() - min(kept_at) FILTER (WHERE held)), 0)::float8 \
                     FROM {table}"
                ),
                &[],
            )
            .await
            .map_err(failed(self.schema(), "summing up the dead letters"))?;
        let by_reason = sql
            .query(
                &format!(
                    "SELECT COALESCE(reason, 'invalid'), count(*) FROM {table} \
                     WHERE error IS NOT NULL GROUP BY 1"
                ),
                &[],
            )
            .await
            .map_err(failed(self.schema(), "summing up the dead letters"))?;
        Ok(Summary {
            parked_aggregates: r.get(0),
            parked_events: r.get(1),
            oldest_parked_seconds: r.get(2),
            by_reason: by_reason.iter().map(|r| (r.get(0), r.get(1))).collect(),
        })
    }
}

/// Keeps dead letters and held events through a connection of its own (the leader's
/// control connection), so a sink can keep them before it commits.
#[derive(Clone)]
pub struct Keeper {
    pub sql: std::sync::Arc<Client>,
    pub state: State,
}

impl Keeper {
    pub async fn keep(&self, items: &[Kept<'_>]) -> Result<(), SourceError> {
        self.state.keep(&self.sql, items).await
    }
}
