//! The batch loop: read a batch, hand it to the sink, acknowledge its durable prefix.

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::time::Instant;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{RelayConfig, RelayError};

/// Batches handed to Kafka and not yet acknowledged, at most.
pub(super) const PIPELINE_DEPTH: usize = 2;
use crate::backoff::Backoff;
use crate::event::OutboxEvent;
use crate::metrics::{unix_now, Telemetry};
use crate::sink::kafka::checkpoint::Resume;
use crate::sink::{Delivery, Sink, SinkError};
use crate::source::{Source, SourceError};

use super::control::Control;

/// How often a batch waiting for Kafka is checked for a stall.
const STALL_CHECK: Duration = Duration::from_secs(1);

/// The batch loop's collaborators.
pub(super) struct Pump<'a, K: Sink> {
    pub sink: &'a Arc<K>,
    pub telemetry: &'a Telemetry,
    pub config: &'a RelayConfig,
    pub shutdown: &'a CancellationToken,
    pub backoff: &'a mut Backoff,
    /// What an earlier run already committed to Kafka (exactly-once delivery): it is
    /// acknowledged to PostgreSQL without being published again.
    pub resume: Resume,
    /// The pause and operator requests, and where dead letters are kept (`None` on a
    /// hot standby).
    pub control: Option<Control>,
    /// `source.query_timeout`: how long a round trip to PostgreSQL may go unanswered.
    pub answer_within: Duration,
}

/// PostgreSQL's answer to one round trip of the leader's, or [`SourceError::Unanswered`]
/// after `limit`. The sockets' keepalives cannot see a server that stops answering behind
/// a live TCP link (a hung pooler or proxy); without this the loop would wait forever and
/// `/readyz` would keep saying ready. The relay then drops its connections and
/// reconnects, so a half-done round trip is never taken up again.
pub(super) async fn answered<T>(
    limit: Duration,
    what: &'static str,
    round_trip: impl std::future::Future<Output = Result<T, SourceError>>,
) -> Result<T, SourceError> {
    tokio::time::timeout(limit, round_trip)
        .await
        .unwrap_or(Err(SourceError::Unanswered { what, after: limit }))
}

/// A batch with the sink. The relay holds the only copy of its events: on a failure
/// they go back to the source ([`Source::rewind`]).
struct InFlight {
    batch: Arc<Vec<OutboxEvent>>,
    outcomes: JoinHandle<Vec<Delivery>>,
}

impl InFlight {
    /// Stops waiting for the outcomes and takes the events back.
    async fn abandon(self) -> Vec<OutboxEvent> {
        self.outcomes.abort();
        // Once the task is gone, so is its reference to the batch.
        let _ = self.outcomes.await;
        Arc::unwrap_or_clone(self.batch)
    }
}

impl<K: Sink> Pump<'_, K> {
    /// Moves batches from `source` to the sink until shutdown or a source error.
    ///
    /// Up to [`PIPELINE_DEPTH`] batches are in flight: while Kafka acknowledges one, the
    /// next is read and handed over, so database and broker work overlap. Batches are
    /// handed to the producer strictly in order and acknowledged strictly in order; when
    /// one is not fully durable, the batches behind it are abandoned and the source is
    /// rewound, so everything after the durable prefix is read and sent again.
    pub async fn run<S: Source>(
        &mut self,
        source: &mut S,
        batch_size: usize,
    ) -> Result<(), RelayError> {
        let metrics = &self.telemetry.metrics;
        let mut in_flight: VecDeque<InFlight> = VecDeque::new();
        let mut stopping = false;
        let grace = Grace {
            shutdown: self.shutdown,
            grace: self.config.shutdown_grace,
            deadline: OnceLock::new(),
        };
        loop {
            if let Some(control) = &mut self.control {
                answered(
                    self.answer_within,
                    "looking for operator requests",
                    control.look(),
                )
                .await?;
            }
            // Paused, or an operator's request waits for nothing to be in flight.
            let holding = self.control.as_ref().is_some_and(Control::holds_reading);
            // When stopping, a transaction half handed to Kafka is finished first: the
            // source can only acknowledge whole transactions, so stopping in the middle
            // would send its first part again after the restart.
            let want_more = (!stopping || source.mid_transaction()) && !holding;
            if want_more && in_flight.len() < PIPELINE_DEPTH {
                // Only block for new events when nothing is waiting for Kafka.
                let wait = in_flight.is_empty();
                let batch = if stopping {
                    tokio::select! {
                        batch = answered(
                            self.answer_within,
                            "reading events",
                            source.next_batch(batch_size, wait),
                        ) => batch?,
                        _ = grace.expired() => {
                            return Err(RelayError::GraceExpired(self.config.shutdown_grace));
                        }
                    }
                } else {
                    tokio::select! {
                        // A shutdown wins over a batch that is ready too.
                        biased;
                        _ = self.shutdown.cancelled() => {
                            stopping = true;
                            grace.deadline.get_or_init(|| Instant::now() + grace.grace);
                            continue;
                        }
                        batch = answered(
                            self.answer_within,
                            "reading events",
                            source.next_batch(batch_size, wait),
                        ) => batch?,
                    }
                };
                let mut batch = batch;
                let covered = self.resume.covered(&batch);
                if covered > 0 {
                    // Only the start of the stream can be covered, before anything was
                    // sent: these are the oldest unacknowledged events, as `ack` wants.
                    answered(
                        self.answer_within,
                        "acknowledging events",
                        source.ack(&batch[..covered]),
                    )
                    .await?;
                    metrics.events_reconciled.inc_by(covered as u64);
                    metrics.acked_now();
                    tracing::info!(
                        events = covered,
                        up_to = %batch[covered - 1].position,
                        "already committed to Kafka by an earlier run: acknowledged without \
                         publishing them again"
                    );
                    batch.drain(..covered);
                    if batch.is_empty() {
                        continue;
                    }
                }
                if !batch.is_empty() {
                    metrics.batch_size.observe(batch.len() as f64);
                    // A full producer queue holds the hand-over; a shutdown must not wait
                    // for it beyond the grace period.
                    let sent = tokio::select! {
                        sent = self.sink.send(&batch) => sent,
                        _ = grace.expired() => {
                            return Err(RelayError::GraceExpired(self.config.shutdown_grace));
                        }
                    };
                    let batch = Arc::new(batch);
                    let (sink, events) = (self.sink.clone(), batch.clone());
                    let outcomes = tokio::spawn(async move { sink.collect(&events, sent).await });
                    in_flight.push_back(InFlight { batch, outcomes });
                    continue;
                }
                if wait {
                    continue;
                }
            }
            let Some(mut oldest) = in_flight.pop_front() else {
                if stopping {
                    return Ok(());
                }
                if let (true, Some(control)) = (holding, &mut self.control) {
                    if control.has_requests() {
                        control.carry_out(self.sink).await?;
                    } else {
                        tokio::select! {
                            _ = self.shutdown.cancelled() => stopping = true,
                            _ = control.wait() => {}
                        }
                    }
                }
                continue;
            };
            let started = Instant::now();
            let outcomes = loop {
                tokio::select! {
                    done = &mut oldest.outcomes => {
                        break done.map_err(|e| RelayError::Task(e.to_string()))?;
                    }
                    _ = grace.expired() => {
                        oldest.outcomes.abort();
                        return Err(RelayError::GraceExpired(self.config.shutdown_grace));
                    }
                    _ = tokio::time::sleep(STALL_CHECK) => {
                        // Waiting is right while the broker is unreachable; it is a stall
                        // when the broker answers and still acknowledges nothing.
                        let stalled = started.elapsed() >= self.config.stall_timeout
                            && self.telemetry.health.producer_may_be_wedged();
                        if stalled {
                            oldest.outcomes.abort();
                            for later in in_flight.drain(..) {
                                later.outcomes.abort();
                            }
                            return Err(RelayError::Stalled(started.elapsed()));
                        }
                    }
                }
            };
            let batch = oldest.batch;
            let durable = outcomes.iter().take_while(|o| o.is_durable()).count();
            // Bodies the dead-letter topic could not take are kept before the ack lets
            // the source forget them.
            let kept: Vec<(&OutboxEvent, &str)> = batch
                .iter()
                .zip(&outcomes[..durable])
                .filter_map(|(event, outcome)| match outcome {
                    Delivery::DeadLettered {
                        reason,
                        metadata_only: true,
                        ..
                    } => Some((event, reason.as_str())),
                    _ => None,
                })
                .collect();
            answered(
                self.answer_within,
                "keeping dead letters",
                source.keep_dead_letters(&kept),
            )
            .await?;
            // Dead letters and held events are kept before their acknowledgement: a held
            // event is acknowledged without Kafka having it, on the strength of its row.
            if let Some(control) = &self.control {
                if !self.sink.keeps_dead_letters() {
                    answered(
                        self.answer_within,
                        "keeping parked events",
                        control.keep(&batch[..durable], &outcomes[..durable]),
                    )
                    .await?;
                }
            }
            answered(
                self.answer_within,
                "acknowledging events",
                source.ack(&batch[..durable]),
            )
            .await?;
            self.record(&batch[..durable]);
            if durable == batch.len() {
                self.backoff.reset();
                continue;
            }
            let mut failure = outcomes.into_iter().nth(durable);
            if let Some(Delivery::Failed(fatal)) = failure {
                if fatal.is_fatal() {
                    return Err(fatal.into());
                }
                failure = Some(Delivery::Failed(fatal));
            }
            if let (Some(event), Some(Delivery::Failed(e))) = (batch.get(durable), &failure) {
                // One line per failed batch, naming the first event that blocks it.
                let what = match e {
                    SinkError::Contract(_) => {
                        "this event's schema could not be resolved, so it and the events behind \
                         it were not sent; they wait and are sent again"
                    }
                    _ => "Kafka did not acknowledge the batch from this event on; it will be sent again",
                };
                tracing::warn!(
                    event_id = event.id.as_deref().unwrap_or("?"),
                    aggregate_id = event.aggregate_id.as_deref().unwrap_or("?"),
                    position = %event.position,
                    error = %e,
                    unacknowledged = batch.len() - durable,
                    "{what}"
                );
            }
            // What was sent behind the failed batch goes again too. Its delivery reports
            // are not worth waiting for (the broker may be gone): librdkafka still
            // delivers those messages, in order and ahead of the re-sent copies.
            let mut unacknowledged = Arc::unwrap_or_clone(batch).split_off(durable);
            for later in in_flight.drain(..) {
                unacknowledged.extend(later.abandon().await);
            }
            self.sink.reset();
            source.rewind(unacknowledged);
            let pause = self.backoff.next_pause();
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Latency and progress of events just acknowledged to the source.
    fn record(&self, acked: &[OutboxEvent]) {
        if acked.is_empty() {
            return;
        }
        let metrics = &self.telemetry.metrics;
        let now = unix_now();
        // Observed into a local copy and added once per batch: the shared histogram's
        // atomic count, sum and bucket per event cost more than the rest of this loop.
        let commit_to_ack = metrics.commit_to_ack.local();
        for event in acked {
            if let Some(ms) = event.timestamp_ms {
                commit_to_ack.observe((now - ms as f64 / 1000.0).max(0.0));
            }
            tracing::debug!(
                event_id = event.id.as_deref().unwrap_or("?"),
                aggregate_id = event.aggregate_id.as_deref().unwrap_or("?"),
                position = %event.position,
                "event acknowledged"
            );
        }
        commit_to_ack.flush();
        metrics.acked_now();
    }
}

/// The shutdown grace period: one deadline, set when the shutdown is first seen.
///
/// The loop waits on it from several places, again and again (every stall check): a
/// timer started afresh by each wait would never run out.
struct Grace<'a> {
    shutdown: &'a CancellationToken,
    grace: Duration,
    deadline: OnceLock<Instant>,
}

impl Grace<'_> {
    /// Resolves `grace` after the shutdown fired; never before.
    async fn expired(&self) {
        self.shutdown.cancelled().await;
        let deadline = *self.deadline.get_or_init(|| Instant::now() + self.grace);
        tokio::time::sleep_until(deadline).await;
    }
}
