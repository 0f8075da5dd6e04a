//! Operator requests and the pause, in the relay's own tables (`sql/006_parking.sql`).
//!
//! A command (`dead-letters redrive`, `pause`…) only records a request; the leading relay
//! carries it out with its own producer and records the outcome. The rows stay as the
//! audit trail: what was asked, by which PostgreSQL role and `application_name`, when,
//! and what came of it.

use tokio_postgres::Client;

use crate::source::dead_letters::Aggregate;
use crate::source::state::{failed, State};
use crate::source::SourceError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Redrive,
    Discard,
    Pause,
    Resume,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Redrive => "redrive",
            Action::Discard => "discard",
            Action::Pause => "pause",
            Action::Resume => "resume",
        }
    }

    fn parse(s: &str) -> Option<Action> {
        Some(match s {
            "redrive" => Action::Redrive,
            "discard" => Action::Discard,
            "pause" => Action::Pause,
            "resume" => Action::Resume,
            _ => return None,
        })
    }
}

/// What a redrive or discard acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An aggregate's whole parked queue.
    Aggregate(Aggregate),
    /// One kept event: for a parked one, its queue up to and including it.
    Id(i64),
    /// Every parked queue and every dead letter.
    All,
    /// Pause and resume.
    Nothing,
}

#[derive(Debug, Clone)]
pub struct Request {
    pub id: i64,
    pub action: Action,
    pub target: Target,
    pub requested_by: String,
    pub application_name: String,
}

/// A request's outcome, once carried out.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub text: String,
    pub events: Option<i32>,
}

/// Whether publishing is paused, by whom and since when.
#[derive(Debug, Clone)]
pub struct Paused {
    pub since: String,
    pub by: String,
}

/// The channel a command notifies, so the leader looks at once rather than at its next
/// tick.
pub const CHANNEL: &str = "outbox_relay_requests";

impl State {
    /// Records a request; returns its id.
    pub async fn request(
        &self,
        sql: &Client,
        action: Action,
        target: &Target,
    ) -> Result<i64, SourceError> {
        let (aggregate_type, aggregate_id, up_to, all) = match target {
            Target::Aggregate((t, a)) => (Some(t.as_str()), Some(a.as_str()), None, false),
            Target::Id(id) => (None, None, Some(*id), false),
            Target::All => (None, None, None, true),
            Target::Nothing => (None, None, None, false),
        };
        let id: i64 = sql
            .query_one(
                &format!(
                    "INSERT INTO {} (action, aggregate_type, aggregate_id, up_to_id, all_parked) \
                     VALUES ($1, $2, $3, $4, $5) RETURNING id",
                    self.table("outbox_relay_requests")
                ),
                &[&action.name(), &aggregate_type, &aggregate_id, &up_to, &all],
            )
            .await
            .map_err(failed(self.schema(), "recording an operator request"))?
            .get(0);
        // Wakes a leader at once; without one listening, the request simply waits.
        let _ = sql.execute(&format!("NOTIFY {CHANNEL}"), &[]).await;
        Ok(id)
    }

    /// Requests not carried out yet, oldest first.
    pub async fn pending(&self, sql: &Client) -> Result<Vec<Request>, SourceError> {
        let rows = sql
            .query(
                &format!(
                    "SELECT id, action, aggregate_type, aggregate_id, up_to_id, all_parked, \
                       requested_by, application_name \
                     FROM {} WHERE done_at IS NULL ORDER BY id",
                    self.table("outbox_relay_requests")
                ),
                &[],
            )
            .await
            .map_err(failed(self.schema(), "reading operator requests"))?;
        let mut requests = Vec::with_capacity(rows.len());
        for r in rows {
            let id: i64 = r.get(0);
            let action: String = r.get(1);
            let Some(action) = Action::parse(&action) else {
                // Written by a newer relay, or by hand: refused, never skipped silently.
                self.finish(
                    sql,
                    id,
                    &format!("refused: unknown action {action:?}"),
                    None,
                )
                .await?;
                continue;
            };
            let target = match (r.get::<_, Option<String>>(3), r.get::<_, Option<i64>>(4)) {
                (Some(a), _) => {
                    Target::Aggregate((r.get::<_, Option<String>>(2).unwrap_or_default(), a))
                }
                (None, Some(n)) => Target::Id(n),
                (None, None) if r.get::<_, bool>(5) => Target::All,
                (None, None) => Target::Nothing,
            };
            requests.push(Request {
                id,
                action,
                target,
                requested_by: r.get(6),
                application_name: r.get(7),
            });
        }
        Ok(requests)
    }

    /// Records what came of a request.
    pub async fn finish(
        &self,
        sql: &Client,
        id: i64,
        outcome: &str,
        events: Option<i32>,
    ) -> Result<(), SourceError> {
        sql.execute(
            &format!(
                "UPDATE {} SET done_at = now(), outcome = $2, events = $3 WHERE id = $1",
                self.table("outbox_relay_requests")
            ),
            &[&id, &outcome, &events],
        )
        .await
        .map_err(failed(self.schema(), "recording a request's outcome"))?;
        Ok(())
    }

    /// A request's outcome, once it has one.
    pub async fn outcome(&self, sql: &Client, id: i64) -> Result<Option<Outcome>, SourceError> {
        let row = sql
            .query_one(
                &format!(
                    "SELECT outcome, events FROM {} WHERE id = $1",
                    self.table("outbox_relay_requests")
                ),
                &[&id],
            )
            .await
            .map_err(failed(self.schema(), "reading a request's outcome"))?;
        Ok(row.get::<_, Option<String>>(0).map(|text| Outcome {
            text,
            events: row.get(1),
        }))
    }

    /// Whether publishing is paused.
    pub async fn paused(&self, sql: &Client) -> Result<Option<Paused>, SourceError> {
        let row = sql
            .query_opt(
                &format!(
                    "SELECT changed_at::text, COALESCE(changed_by, '') FROM {} WHERE paused",
                    self.table("outbox_relay_control")
                ),
                &[],
            )
            .await
            .map_err(failed(
                self.schema(),
                "reading whether publishing is paused",
            ))?;
        Ok(row.map(|r| Paused {
            since: r.get(0),
            by: r.get(1),
        }))
    }

    /// Pauses or resumes publishing (the leader, carrying out a request).
    pub async fn set_paused(
        &self,
        sql: &Client,
        paused: bool,
        by: &str,
    ) -> Result<(), SourceError> {
        sql.execute(
            &format!(
                "INSERT INTO {} AS c (singleton, paused, changed_by) VALUES (true, $1, $2) \
                 ON CONFLICT (singleton) DO UPDATE SET paused = $1, changed_by = $2, changed_at = now()",
                self.table("outbox_relay_control")
            ),
            &[&paused, &by],
        )
        .await
        .map_err(failed(self.schema(), "pausing or resuming"))?;
        Ok(())
    }
}
