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
pub mod control;
mod exactly_once;
pub mod parking;
mod pump;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use config::{RawRelayConfig, RelayConfig};

use crate::backoff::Backoff;
use crate::config::Config;
use crate::metrics::Telemetry;
use crate::sink::kafka::checkpoint::Resume;
use crate::sink::kafka::{DeliveryMode, KafkaSink, OnPoison, SinkError};
use crate::source::{AnySource, Mode, Source, SourceError};
use control::Control;
use parking::Parking;
use pump::Pump;

/// First pause after a failure; it doubles up to `relay.max_backoff`.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// Producer replacements after stalls with no acknowledgement in between, at most.
const MAX_REPLACEMENTS: u32 = 3;

/// Stalls since the last acknowledgement (the `last_ack_timestamp` gauge then).
struct Stalls {
    count: u32,
    last_ack: i64,
}

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
    /// An event schema the registry refuses (incompatible, not registered…): an
    /// operator must act, so this is a configuration error (exit 2).
    #[error(transparent)]
    Contract(#[from] crate::sink::kafka::schema::ContractError),
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

/// The parked aggregates' set, with `on_poison = "park"`.
fn parking_for(config: &Config) -> Option<Arc<Parking>> {
    (config.sink.on_poison == OnPoison::Park).then(|| Arc::new(Parking::default()))
}

/// Logs what the relay starts with; returns its batch size.
fn starting(config: &Config, delivery: &str) -> usize {
    tracing::info!(
        database = %config.source.redacted_url(),
        table = %config.source.table_label(),
        brokers = %config.sink.brokers,
        mode = ?config.source.mode,
        delivery,
        "relay starting"
    );
    match config.source.mode {
        Mode::Polling => config.source.polling.batch_size.get(),
        Mode::Logical => config.source.logical.batch_size.get(),
    }
}

/// Connects to PostgreSQL and becomes the outbox's leader, waiting as a standby while
/// another relay leads; `None` when `shutdown` fired first.
async fn connect_and_lead(
    config: &Config,
    telemetry: &Telemetry,
    shutdown: &CancellationToken,
) -> Result<Option<AnySource>, RelayError> {
    telemetry
        .health
        .set_leader(false, Some("starting: connecting to PostgreSQL"));
    let mut source = AnySource::connect(&config.source, telemetry.clone()).await?;
    telemetry.health.set_postgres(None);
    let leads = source
        .lead(config.source.standby_retry, telemetry, shutdown)
        .await?;
    Ok(leads.then_some(source))
}

/// What losing PostgreSQL (a retryable source error) does to the metrics and readiness.
fn lost_postgres(telemetry: &Telemetry, e: &SourceError, retry_in: Duration) {
    tracing::warn!(error = %e, ?retry_in, "lost PostgreSQL; reconnecting");
    let metrics = &telemetry.metrics;
    metrics.failures.with_label_values(&["postgres"]).inc();
    metrics.reconnects.inc();
    metrics.leader.set(0);
    telemetry
        .health
        .set_postgres(Some(format!("reconnecting after: {e}")));
}

/// Runs the relay loop until `shutdown` fires or an error no retry can fix. The
/// process-level entry point, with the HTTP endpoints, is [`crate::daemon::run`].
pub async fn run(
    config: Config,
    telemetry: Telemetry,
    shutdown: CancellationToken,
) -> Result<(), RelayError> {
    // The event schemas first: until the registry resolved them nothing is published,
    // events without a schema included (one pipeline, one order).
    if let Some(contracts) = &config.sink.contracts {
        contracts.start(&config.sink, &telemetry, &shutdown).await?;
        if shutdown.is_cancelled() {
            return Ok(());
        }
    }
    if config.sink.delivery == DeliveryMode::ExactlyOnce {
        return exactly_once::run(config, telemetry, shutdown).await;
    }
    let parking = parking_for(&config);
    let new_sink = || -> Result<Arc<KafkaSink>, SinkError> {
        Ok(Arc::new(
            KafkaSink::new(&config.sink, telemetry.clone())?.with_parking(parking.clone()),
        ))
    };
    let mut sink = new_sink()?;
    let mut probe = sink.spawn_health_probe(shutdown.clone());
    let batch_size = starting(&config, "at_least_once");
    let mut backoff = Backoff::new(FIRST_BACKOFF, config.relay.max_backoff);
    let health = &telemetry.health;
    let mut relay_config = config.relay.clone();
    let mut stalls = Stalls {
        count: 0,
        last_ack: telemetry.metrics.last_ack_timestamp.get(),
    };
    let result = loop {
        if telemetry.metrics.last_ack_timestamp.get() != stalls.last_ack {
            // Progress since the replacements ran out: detect stalls again.
            relay_config.stall_timeout = config.relay.stall_timeout;
        }
        let outcome = async {
            let Some(mut source) = connect_and_lead(&config, &telemetry, &shutdown).await? else {
                return Ok(());
            };
            let control = pump::answered(
                config.source.query_timeout,
                "opening the control connection",
                Control::start(&config.source, &telemetry, parking.clone()),
            )
            .await?;
            let mut pump = Pump {
                sink: &sink,
                telemetry: &telemetry,
                config: &relay_config,
                shutdown: &shutdown,
                backoff: &mut backoff,
                resume: Resume::default(),
                control,
                answer_within: config.source.query_timeout,
            };
            pump.run(&mut source, batch_size).await?;
            source.finish().await?;
            Ok(())
        }
        .await;
        match outcome {
            Ok(()) => break Ok(()),
            Err(RelayError::Source(e)) if e.is_retryable() => {
                let pause = backoff.next_pause();
                lost_postgres(&telemetry, &e, pause);
                if telemetry.metrics.in_flight.get() > 0 {
                    // Without its connection this relay no longer leads (its lock or slot
                    // is gone, and a standby may be publishing already): what its
                    // producer still queues must not land after the new leader's events.
                    // A new producer starts clean; the events are read again by
                    // whichever relay leads next.
                    tracing::warn!(
                        "purging the events queued for Kafka: this relay lost its lead with \
                         PostgreSQL"
                    );
                    sink.purge_queued();
                    probe.abort();
                    sink = new_sink()?;
                    probe = sink.spawn_health_probe(shutdown.clone());
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break Ok(()),
                    _ = tokio::time::sleep(pause) => {}
                }
            }
            Err(RelayError::Stalled(waited)) => {
                // A producer that stopped getting answers from a broker that does answer
                // (e.g. one restarted with its state lost) does not recover by itself:
                // start over with a new one. Nothing was acknowledged, so the events are
                // read again — duplicates at most. Each replacement re-sends the window,
                // so after a few without any progress the relay stops replacing and
                // waits, until an event is acknowledged again.
                let last_ack = telemetry.metrics.last_ack_timestamp.get();
                if last_ack != stalls.last_ack {
                    stalls = Stalls { count: 0, last_ack };
                }
                stalls.count += 1;
                if stalls.count >= MAX_REPLACEMENTS {
                    tracing::error!(
                        replacements = stalls.count - 1,
                        "the producer was replaced without any progress: no more replacements \
                         until an event is acknowledged; waiting for Kafka"
                    );
                    relay_config.stall_timeout = Duration::MAX;
                    continue;
                }
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
                sink = new_sink()?;
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
