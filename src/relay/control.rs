//! The leader's side of operator control: the pause, redrives and discards that
//! commands recorded in the relay's tables ([`crate::control`]), carried out through
//! this relay's own producer — no second producer to fence it, and exactly-once holds
//! through a redrive.
//!
//! The batch loop asks [`Control::look`] at every turn; it reads the tables at most once
//! a second, or at once when a command's `NOTIFY` arrives. While publishing is paused or
//! a request waits, the loop reads no new events; once nothing is in flight the
//! requests are carried out ([`Control::carry_out`]) and reading resumes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_postgres::Client;

use super::parking::Parking;
use super::RelayError;
use crate::control::dead_letters::LEADER_APPLICATION_NAME;
use crate::control::requests::{Action, Request, Target, CHANNEL};
use crate::event::OutboxEvent;
use crate::metrics::Telemetry;
use crate::sink::{Delivery, Sink};
use crate::source::dead_letters::{Aggregate, Keeper, Kept, Row};
use crate::source::state::{self, State};
use crate::source::{table, SourceConfig, SourceError};

/// How often the tables are read without a notification.
const LOOK_EVERY: Duration = Duration::from_secs(1);
/// Events of a queue handed to the sink at once on a redrive.
const REDRIVE_BATCH: usize = 1000;
/// How often the parked gauges are read.
const GAUGES_EVERY: Duration = Duration::from_secs(5);

pub struct Control {
    sql: Arc<Client>,
    state: State,
    parking: Option<Arc<Parking>>,
    telemetry: Telemetry,
    notices: mpsc::UnboundedReceiver<()>,
    next_look: Instant,
    next_gauges: Instant,
    paused: bool,
    /// Redrives and discards waiting for nothing to be in flight.
    waiting: Vec<Request>,
    log_mode: bool,
}

impl Control {
    /// Opens the leader's control connection, loads what is parked and whether
    /// publishing is paused. `None` on a hot standby, where nothing can be kept: then
    /// poison events are dead-lettered only and their aggregates flow on (said once).
    pub async fn start(
        config: &SourceConfig,
        telemetry: &Telemetry,
        parking: Option<Arc<Parking>>,
    ) -> Result<Option<Control>, SourceError> {
        let (tx, notices) = mpsc::unbounded_channel();
        let sql = table::connect_noticing(config, Some(tx)).await?;
        let standby: bool = sql
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .map_err(SourceError::pg("asking whether the server is a standby"))?
            .get(0);
        let state = state::prepare(&sql, &config.state_schema, !standby).await?;
        if !state.writable() {
            tracing::warn!(
                "the source is a hot standby: dead letters cannot be kept in PostgreSQL here, \
                 so poison events go to the dead-letter topic only and their aggregates are \
                 not parked; operator commands need the primary"
            );
            if let Some(p) = &parking {
                p.disable();
            }
            return Ok(None);
        }
        // Named, so that a command can tell a leader runs (`pg_stat_activity`).
        sql.batch_execute(&format!(
            "SET application_name = '{LEADER_APPLICATION_NAME}'; LISTEN {CHANNEL}"
        ))
        .await
        .map_err(SourceError::pg("listening for operator requests"))?;
        if let Some(p) = &parking {
            p.load(state.parked(&sql).await?);
        }
        let mut control = Control {
            sql: Arc::new(sql),
            state,
            parking,
            telemetry: telemetry.clone(),
            notices,
            next_look: Instant::now(),
            next_gauges: Instant::now(),
            paused: false,
            waiting: Vec::new(),
            log_mode: config.mode == crate::source::Mode::Logical,
        };
        control.look().await?;
        Ok(Some(control))
    }

    /// Where a sink keeps dead letters before it commits (exactly-once).
    pub fn keeper(&self) -> Keeper {
        Keeper {
            sql: self.sql.clone(),
            state: self.state.clone(),
        }
    }

    /// Whether the loop must read no new events: paused, or requests wait.
    pub fn holds_reading(&self) -> bool {
        self.paused || !self.waiting.is_empty()
    }

    pub fn has_requests(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Reads the pause and new requests when a second has passed or a command
    /// notified; carries out pause and resume at once.
    pub async fn look(&mut self) -> Result<(), SourceError> {
        let notified = self.notices.try_recv().is_ok();
        while self.notices.try_recv().is_ok() {}
        let now = Instant::now();
        if !notified && now < self.next_look {
            return Ok(());
        }
        self.next_look = now + LOOK_EVERY;
        for request in self.state.pending(&self.sql).await? {
            match request.action {
                Action::Pause | Action::Resume => self.pause(&request).await?,
                _ if self.waiting.iter().any(|r| r.id == request.id) => {}
                _ => self.waiting.push(request),
            }
        }
        let paused = self.state.paused(&self.sql).await?;
        self.set_paused(paused.map(|p| format!("by {} since {}", p.by, p.since)));
        if now >= self.next_gauges {
            self.next_gauges = now + GAUGES_EVERY;
            self.gauges().await?;
        }
        Ok(())
    }

    /// Waits until the next look is due or a command notifies.
    pub async fn wait(&mut self) {
        let due = tokio::time::Instant::from_std(self.next_look);
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            Some(()) = self.notices.recv() => self.next_look = Instant::now(),
        }
    }

    fn set_paused(&mut self, paused: Option<String>) {
        let now = paused.is_some();
        if now != self.paused {
            if now {
                let holds = if self.log_mode {
                    ": the replication slot holds the WAL back while paused"
                } else {
                    ""
                };
                tracing::warn!(
                    paused = paused.as_deref().unwrap_or(""),
                    "publishing is paused{holds}; `outbox-relay resume` resumes it"
                );
            } else {
                tracing::info!("publishing resumed");
            }
        }
        self.paused = now;
        self.telemetry.metrics.paused.set(i64::from(now));
        self.telemetry.health.set_paused(paused);
    }

    async fn pause(&mut self, request: &Request) -> Result<(), SourceError> {
        let pause = request.action == Action::Pause;
        let by = who(request);
        self.state.set_paused(&self.sql, pause, &by).await?;
        tracing::warn!(
            request = request.id,
            role = %request.requested_by,
            application_name = %request.application_name,
            "operator request: {}",
            request.action.name()
        );
        self.count(request.action);
        let outcome = if pause { "paused" } else { "resumed" };
        self.state
            .finish(&self.sql, request.id, outcome, None)
            .await
    }

    fn count(&self, action: Action) {
        self.telemetry
            .metrics
            .operator_actions
            .with_label_values(&[action.name()])
            .inc();
    }

    async fn gauges(&self) -> Result<(), SourceError> {
        let summary = self.state.summary(&self.sql).await?;
        let m = &self.telemetry.metrics;
        m.parked_aggregates.set(summary.parked_aggregates);
        m.parked_events.set(summary.parked_events);
        m.oldest_parked.set(summary.oldest_parked_seconds as i64);
        for reason in crate::metrics::DEAD_LETTER_REASONS {
            let n = summary
                .by_reason
                .iter()
                .find(|(r, _)| r == reason)
                .map_or(0, |(_, n)| *n);
            m.dead_letters.with_label_values(&[reason]).set(n);
        }
        Ok(())
    }

    /// Keeps a collected batch's dead letters and held events before the source
    /// acknowledges them (at-least-once; an exactly-once sink keeps them itself).
    pub async fn keep(
        &self,
        events: &[OutboxEvent],
        outcomes: &[Delivery],
    ) -> Result<(), SourceError> {
        let kept: Vec<Kept> = events
            .iter()
            .zip(outcomes)
            .filter_map(|(event, outcome)| match outcome {
                Delivery::DeadLettered {
                    reason,
                    kind,
                    parks,
                    ..
                } => Some(Kept::dead_letter(event, reason, kind, *parks)),
                Delivery::Held => Some(Kept::held(event)),
                _ => None,
            })
            .collect();
        if kept.is_empty() {
            return Ok(());
        }
        self.state.keep(&self.sql, &kept).await?;
        if let Some(parking) = &self.parking {
            parking.settle(kept.iter().filter(|k| k.held).map(|k| k.event));
        }
        Ok(())
    }

    /// Carries out the waiting redrives and discards; nothing is in flight.
    pub async fn carry_out<K: Sink>(&mut self, sink: &Arc<K>) -> Result<(), RelayError> {
        for request in std::mem::take(&mut self.waiting) {
            tracing::info!(
                request = request.id,
                role = %request.requested_by,
                application_name = %request.application_name,
                target = ?request.target,
                "operator request: {}",
                request.action.name()
            );
            let (outcome, events) = match request.action {
                Action::Redrive if self.paused => (
                    "refused: publishing is paused (outbox-relay resume first)".to_owned(),
                    None,
                ),
                Action::Redrive => match self.redrive(sink, &request.target).await? {
                    Ok((text, n)) => (text, Some(n)),
                    Err(text) => (text, None),
                },
                Action::Discard => match self.discard(&request).await? {
                    Ok((text, n)) => (text, Some(n)),
                    Err(text) => (text, None),
                },
                Action::Pause | Action::Resume => unreachable!("carried out when seen"),
            };
            if !outcome.starts_with("refused") {
                self.count(request.action);
            }
            tracing::info!(request = request.id, outcome, "operator request done");
            self.state
                .finish(&self.sql, request.id, &outcome, events)
                .await?;
        }
        self.gauges().await?;
        Ok(())
    }

    /// The queues a target names: per aggregate (parked) or per loose dead letter.
    async fn queues(&self, target: &Target) -> Result<Result<Vec<Vec<Row>>, String>, SourceError> {
        let state = &self.state;
        let sql = &self.sql;
        Ok(Ok(match target {
            Target::Aggregate(a) => {
                let q = state.queue(sql, a, None).await?;
                if q.is_empty() {
                    return Ok(Err(format!(
                        "refused: aggregate {} {} is not parked",
                        a.0, a.1
                    )));
                }
                vec![q]
            }
            Target::Id(n) => match state.dead_letter(sql, *n).await? {
                None => return Ok(Err(format!("refused: no dead letter with id {n}"))),
                Some(row) if row.held => {
                    let a = aggregate(&row);
                    vec![state.queue(sql, &a, Some(*n)).await?]
                }
                Some(row) => vec![vec![row]],
            },
            Target::All => {
                let mut queues = Vec::new();
                for p in state.parked_aggregates(sql).await? {
                    let a = (p.aggregate_type, p.aggregate_id);
                    queues.push(state.queue(sql, &a, None).await?);
                }
                queues.extend(
                    state
                        .loose_dead_letters(sql)
                        .await?
                        .into_iter()
                        .map(|r| vec![r]),
                );
                queues
            }
            Target::Nothing => return Ok(Err("refused: nothing named".into())),
        }))
    }

    /// Publishes queues again, each in order; an event that fails again stays at its
    /// queue's head with the new error, and its aggregate stays parked.
    async fn redrive<K: Sink>(
        &mut self,
        sink: &Arc<K>,
        target: &Target,
    ) -> Result<Result<(String, i32), String>, RelayError> {
        let queues = match self.queues(target).await? {
            Ok(q) => q,
            Err(refused) => return Ok(Err(refused)),
        };
        // The operator may have raised a topic's limit: read it again.
        sink.forget_topic_limits();
        let (mut published, mut failed_again, mut still_parked) = (0, 0, 0);
        let mut kafka_error = None;
        for rows in queues {
            let held = rows[0].held;
            let agg = aggregate(&rows[0]);
            if let (true, Some(p)) = (held, &self.parking) {
                p.unpark(&agg);
            }
            let mut done = Vec::new();
            // In batches, in order; the first event that does not go stops the queue.
            'queue: for chunk in rows.chunks(REDRIVE_BATCH) {
                let events: Vec<OutboxEvent> = chunk
                    .iter()
                    .map(|r| OutboxEvent {
                        redriven: true,
                        ..r.event.clone()
                    })
                    .collect();
                let sent = sink.send(&events).await;
                let outcomes = sink.collect(&events, sent).await;
                for (row, outcome) in chunk.iter().zip(&outcomes) {
                    match outcome {
                        Delivery::Published { .. } => done.push(row.id),
                        Delivery::DeadLettered { reason, kind, .. } => {
                            failed_again += 1;
                            self.state
                                .failed_again(&self.sql, row.id, reason, kind)
                                .await?;
                            if held {
                                // The rest of the queue was held behind it again.
                                break 'queue;
                            }
                        }
                        Delivery::Held => break 'queue,
                        Delivery::Failed(e) => {
                            kafka_error.get_or_insert_with(|| e.to_string());
                            break 'queue;
                        }
                    }
                }
            }
            published += done.len();
            self.state.remove(&self.sql, &done).await?;
            self.telemetry
                .metrics
                .events_redriven
                .inc_by(done.len() as u64);
            if held && !self.state.queue(&self.sql, &agg, None).await?.is_empty() {
                still_parked += 1;
                if let Some(p) = &self.parking {
                    p.settle([&rows[0].event]);
                }
            }
            if kafka_error.is_some() {
                break;
            }
        }
        // Whatever the sink parked in passing is settled above or not parked at all.
        sink.reset();
        let mut text = format!("redrove {published} event(s)");
        if failed_again > 0 {
            text.push_str(&format!(
                "; {failed_again} failed again and went back to the dead-letter queue"
            ));
        }
        if still_parked > 0 {
            text.push_str(&format!("; {still_parked} aggregate(s) stay parked"));
        }
        if let Some(e) = kafka_error {
            text.push_str(&format!(
                "; stopped: Kafka did not take an event ({e}), the rest stays parked: redrive again"
            ));
        }
        Ok(Ok((text, published as i32)))
    }

    async fn discard(
        &mut self,
        request: &Request,
    ) -> Result<Result<(String, i32), String>, SourceError> {
        let rows: Vec<Row> = match &request.target {
            // Exactly the one event: discarding a parked queue's head makes the next
            // event its head.
            Target::Id(n) => match self.state.dead_letter(&self.sql, *n).await? {
                Some(row) => vec![row],
                None => return Ok(Err(format!("refused: no dead letter with id {n}"))),
            },
            target => match self.queues(target).await? {
                Ok(q) => q.into_iter().flatten().collect(),
                Err(refused) => return Ok(Err(refused)),
            },
        };
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        let n = self.state.remove(&self.sql, &ids).await?;
        self.telemetry.metrics.events_discarded.inc_by(n);
        for row in rows.iter().filter(|r| r.held) {
            let a = aggregate(row);
            if self.state.queue(&self.sql, &a, None).await?.is_empty() {
                if let Some(p) = &self.parking {
                    p.unpark(&a);
                }
            }
        }
        let what: Vec<String> = rows
            .iter()
            .map(|r| {
                format!(
                    "{} (event {}, {})",
                    r.id,
                    r.event.id.as_deref().unwrap_or("?"),
                    r.event.position
                )
            })
            .collect();
        tracing::warn!(
            request = request.id,
            role = %request.requested_by,
            application_name = %request.application_name,
            discarded = %what.join(", "),
            "discarded dead letters on an operator's request"
        );
        Ok(Ok((
            format!("discarded {n} event(s): {}", what.join(", ")),
            n as i32,
        )))
    }
}

fn aggregate(row: &Row) -> Aggregate {
    (
        row.event.aggregate_type.as_deref().unwrap_or("").to_owned(),
        row.event.aggregate_id.as_deref().unwrap_or("").to_owned(),
    )
}

fn who(request: &Request) -> String {
    format!("{} ({})", request.requested_by, request.application_name)
}
