//! The loop between source and sink: read a batch, publish it, acknowledge what Kafka
//! acknowledged, repeat — and survive everything in between.
//!
//! One event's path: [`Source::next_batch`] returns it (a row in `seq` order, or a row
//! or message in commit order) → [`KafkaSink::send`] hands it to librdkafka →
//! [`KafkaSink::collect`] waits for its delivery report → [`Source::ack`] forgets it
//! (deletes the row, or moves the slot past its transaction). Two batches may be with
//! Kafka at once; they are handed over and acknowledged strictly in order.
//!
//! Only events whose report said "durable" are acknowledged, and only as an unbroken
//! prefix: if event 7 of 10 failed, events 1–6 are acknowledged, and 7–10 and the batch
//! behind them are read and sent again, so a retry can never put an aggregate's later
//! event ahead of an earlier one that is still missing.
//!
//! # Shutdown
//!
//! The `shutdown` token stops reading (after finishing a transaction half handed to
//! Kafka, in log mode). Batches already handed over get `relay.shutdown_grace` to be
//! acknowledged, then are acknowledged to PostgreSQL, and the loop returns. What was not
//! acknowledged by then is simply read again by the next run.

mod config;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::{RawRelayConfig, RelayConfig};

use crate::config::Config;
use crate::event::OutboxEvent;
use crate::metrics::{unix_now, Telemetry};
use crate::sink::kafka::{Delivery, KafkaSink, SinkError};
use crate::source::{AnySource, Mode, Source, SourceError};

/// How often a batch waiting for Kafka is checked for a stall.
const STALL_CHECK: Duration = Duration::from_secs(1);

/// Batches handed to Kafka and not yet acknowledged, at most.
const PIPELINE_DEPTH: usize = 2;

/// First pause after a failure; it doubles up to `relay.max_backoff`.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("cannot listen on http.listen = {addr}: {source} (pick a free address or port)")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("a relay task failed: {0}")]
    Task(String),
    #[error("Kafka acknowledged nothing for {0:?} although it answers")]
    Stalled(Duration),
    #[error(
        "shutdown grace period ({0:?}) ran out with events still unacknowledged by Kafka; \
         they stay in the outbox and are published by the next run"
    )]
    GraceExpired(Duration),
}

/// Runs the relay loop until `shutdown` fires or an error no retry can fix. The
/// process-level entry point, with the HTTP endpoints, is [`crate::daemon::run`].
pub async fn run(
    config: Config,
    telemetry: Telemetry,
    shutdown: CancellationToken,
) -> Result<(), RelayError> {
    let mut sink = Arc::new(KafkaSink::new(&config.sink, telemetry.clone())?);
    let mut probe = sink.spawn_health_probe(shutdown.clone());
    let batch_size = match config.source.mode {
        Mode::Polling => config.source.polling.batch_size.get(),
        Mode::Logical => config.source.logical.batch_size.get(),
    };
    let mut backoff = Backoff::new(config.relay.max_backoff);
    tracing::info!(
        database = %config.source.redacted_url(),
        table = %config.source.table_label(),
        brokers = %config.sink.brokers,
        mode = ?config.source.mode,
        "relay starting"
    );
    let health = &telemetry.health;
    let result = loop {
        health.set_leader(false, Some("starting: connecting to PostgreSQL"));
        let outcome = async {
            let mut source = AnySource::connect(&config.source, telemetry.clone()).await?;
            health.set_postgres(None);
            if !source.lead(&shutdown).await? {
                return Ok(());
            }
            let mut pump = Pump {
                sink: &sink,
                telemetry: &telemetry,
                config: &config.relay,
                shutdown: &shutdown,
                backoff: &mut backoff,
            };
            pump.run(&mut source, batch_size).await?;
            source.finish().await?;
            Ok(())
        }
        .await;
        match outcome {
            Ok(()) => break Ok(()),
            Err(RelayError::Source(e)) if e.is_retryable() => {
                let pause = backoff.next();
                tracing::warn!(error = %e, retry_in = ?pause, "lost PostgreSQL; reconnecting");
                telemetry
                    .metrics
                    .failures
                    .with_label_values(&["postgres"])
                    .inc();
                telemetry.metrics.reconnects.inc();
                telemetry.metrics.leader.set(0);
                health.set_postgres(Some(format!("reconnecting after: {e}")));
                tokio::select! {
                    _ = shutdown.cancelled() => break Ok(()),
                    _ = tokio::time::sleep(pause) => {}
                }
            }
            Err(RelayError::Stalled(waited)) => {
                // A producer that stopped getting answers from a broker that does answer
                // (e.g. one restarted with its state lost) does not recover by itself:
                // start over with a new one. Nothing was acknowledged, so the events are
                // read again — duplicates at most.
                tracing::warn!(
                    waited = ?waited,
                    "Kafka acknowledged nothing for relay.stall_timeout although it answers: \
                     replacing the producer and reading the unacknowledged events again"
                );
                telemetry
                    .metrics
                    .failures
                    .with_label_values(&["stalled"])
                    .inc();
                probe.abort();
                sink = Arc::new(KafkaSink::new(&config.sink, telemetry.clone())?);
                probe = sink.spawn_health_probe(shutdown.clone());
            }
            Err(e) => break Err(e),
        }
    };
    telemetry.metrics.leader.set(0);
    health.set_leader(false, Some("stopping"));
    probe.abort();
    result
}

/// The batch loop's collaborators.
struct Pump<'a> {
    sink: &'a Arc<KafkaSink>,
    telemetry: &'a Telemetry,
    config: &'a RelayConfig,
    shutdown: &'a CancellationToken,
    backoff: &'a mut Backoff,
}

impl Pump<'_> {
    /// Moves batches from `source` to the sink until shutdown or a source error.
    ///
    /// Up to [`PIPELINE_DEPTH`] batches are in flight: while Kafka acknowledges one, the
    /// next is read and handed over, so database and broker work overlap. Batches are
    /// handed to the producer strictly in order and acknowledged strictly in order; when
    /// one is not fully durable, the batches behind it are waited out and the source is
    /// rewound, so everything after the durable prefix is read and sent again.
    async fn run<S: Source>(
        &mut self,
        source: &mut S,
        batch_size: usize,
    ) -> Result<(), RelayError> {
        let metrics = &self.telemetry.metrics;
        let mut in_flight: VecDeque<JoinHandle<(Vec<OutboxEvent>, Vec<Delivery>)>> =
            VecDeque::new();
        let mut stopping = false;
        loop {
            // When stopping, a transaction half handed to Kafka is finished first: the
            // source can only acknowledge whole transactions, so stopping in the middle
            // would send its first part again after the restart.
            let want_more = !stopping || source.mid_transaction();
            if want_more && in_flight.len() < PIPELINE_DEPTH {
                // Only block for new events when nothing is waiting for Kafka.
                let wait = in_flight.is_empty();
                let batch = if stopping {
                    tokio::select! {
                        batch = source.next_batch(batch_size, wait) => batch?,
                        _ = grace_expired(self.shutdown, self.config.shutdown_grace) => {
                            return Err(RelayError::GraceExpired(self.config.shutdown_grace));
                        }
                    }
                } else {
                    tokio::select! {
                        _ = self.shutdown.cancelled() => {
                            stopping = true;
                            continue;
                        }
                        batch = source.next_batch(batch_size, wait) => batch?,
                    }
                };
                if !batch.is_empty() {
                    metrics.batch_size.observe(batch.len() as f64);
                    let sent = self.sink.send(&batch).await;
                    let sink = self.sink.clone();
                    in_flight.push_back(tokio::spawn(async move {
                        let outcomes = sink.collect(&batch, sent).await;
                        (batch, outcomes)
                    }));
                    continue;
                }
                if wait {
                    continue;
                }
            }
            let Some(oldest) = in_flight.pop_front() else {
                if stopping {
                    return Ok(());
                }
                continue;
            };
            let started = Instant::now();
            let mut oldest = oldest;
            let (batch, outcomes) = loop {
                tokio::select! {
                    done = &mut oldest => break done.map_err(|e| RelayError::Task(e.to_string()))?,
                    _ = grace_expired(self.shutdown, self.config.shutdown_grace) => {
                        oldest.abort();
                        return Err(RelayError::GraceExpired(self.config.shutdown_grace));
                    }
                    _ = tokio::time::sleep(STALL_CHECK) => {
                        // Waiting is right while the broker is unreachable; it is a stall
                        // when the broker answers and still acknowledges nothing.
                        let stalled = started.elapsed() >= self.config.stall_timeout
                            && self.telemetry.health.kafka_reachable();
                        if stalled {
                            oldest.abort();
                            for later in in_flight.drain(..) {
                                later.abort();
                            }
                            return Err(RelayError::Stalled(started.elapsed()));
                        }
                    }
                }
            };
            let durable = outcomes.iter().take_while(|o| o.is_durable()).count();
            source.ack(&batch[..durable]).await?;
            self.record(&batch[..durable]);
            if durable == batch.len() {
                self.backoff.reset();
                continue;
            }
            if let Some(fatal) = self.sink.fatal_error() {
                return Err(fatal.into());
            }
            if let (Some(event), Some(Delivery::Failed(e))) =
                (batch.get(durable), outcomes.get(durable))
            {
                // One line per failed batch, naming the first event that blocks it.
                tracing::warn!(
                    event_id = event.id.as_deref().unwrap_or("?"),
                    aggregate_id = event.aggregate_id.as_deref().unwrap_or("?"),
                    position = %event.position,
                    error = %e,
                    unacknowledged = batch.len() - durable,
                    "Kafka did not acknowledge the batch from this event on; it will be sent again"
                );
            }
            // What was sent behind the failed batch goes again too. Its delivery reports
            // are not worth waiting for (the broker may be gone): librdkafka still
            // delivers those messages, in order and ahead of the re-sent copies.
            for later in in_flight.drain(..) {
                later.abort();
            }
            source.rewind();
            let pause = self.backoff.next();
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
        for event in acked {
            if let Some(ms) = event.timestamp_ms {
                metrics
                    .commit_to_ack
                    .observe((now - ms as f64 / 1000.0).max(0.0));
            }
            tracing::debug!(
                event_id = event.id.as_deref().unwrap_or("?"),
                aggregate_id = event.aggregate_id.as_deref().unwrap_or("?"),
                position = %event.position,
                "event acknowledged"
            );
        }
        metrics.acked_now();
    }
}

/// Resolves `grace` after `shutdown` fired; never before.
async fn grace_expired(shutdown: &CancellationToken, grace: Duration) {
    shutdown.cancelled().await;
    tokio::time::sleep(grace).await;
}

/// Capped exponential backoff.
struct Backoff {
    current: Duration,
    max: Duration,
}

impl Backoff {
    fn new(max: Duration) -> Backoff {
        Backoff {
            current: FIRST_BACKOFF.min(max),
            max,
        }
    }

    fn next(&mut self) -> Duration {
        let pause = self.current;
        self.current = (self.current * 2).min(self.max);
        pause
    }

    fn reset(&mut self) {
        self.current = FIRST_BACKOFF.min(self.max);
    }
}
