//! The relay loop with `sink.kafka.delivery = "exactly_once"`.
//!
//! The same batch loop as at-least-once ([`Pump`]), with three differences:
//!
//! - The producer is made only once this relay leads the outbox (holds its lock or
//!   slot), under the outbox's transactional id, and its `init_transactions` fences every
//!   earlier producer of the outbox — a paused old leader included.
//! - Each batch is one Kafka transaction with its checkpoint, one at a time.
//! - Before publishing, events the last committed checkpoint covers are acknowledged to
//!   PostgreSQL without being published again ([`Resume`]).
//!
//! Every time PostgreSQL is lost, the relay gives up its producer with the lead, and a
//! new one is made when it leads again: the checkpoint is read anew then, since another
//! relay may have published in between. A fenced producer stops the relay (exit 1): it
//! never makes a producer on its own after that, which would fence the new leader.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::control::Control;
use super::pump::Pump;
use super::{connect_and_lead, lost_postgres, RelayError, FIRST_BACKOFF};
use crate::backoff::Backoff;
use crate::config::Config;
use crate::metrics::Telemetry;
use crate::sink::kafka::checkpoint::Resume;
use crate::sink::kafka::{derive_transactional_id, SinkError, TransactionalSink};
use crate::source::Source;

pub(super) async fn run(
    config: Config,
    telemetry: Telemetry,
    shutdown: CancellationToken,
) -> Result<(), RelayError> {
    let batch_size = super::starting(&config, "exactly_once");
    let parking = super::parking_for(&config);
    let mut backoff = Backoff::new(FIRST_BACKOFF, config.relay.max_backoff);
    let health = &telemetry.health;
    loop {
        let mut probe = None;
        let outcome = async {
            let Some(mut source) = connect_and_lead(&config, &telemetry, &shutdown).await? else {
                return Ok(());
            };
            let identity = source.identity().await?;
            let transactional_id = config.sink.transactional_id.clone().unwrap_or_else(|| {
                derive_transactional_id(
                    &identity.system_identifier,
                    &identity.database,
                    &identity.name,
                )
            });
            let (sink, checkpoint) = TransactionalSink::start(
                &config.sink,
                telemetry.clone(),
                transactional_id,
                identity.epoch,
            )
            .await?;
            let control = super::pump::answered(
                config.source.query_timeout,
                "opening the control connection",
                Control::start(&config.source, &telemetry, parking.clone()),
            )
            .await?;
            let keeper = control.as_ref().map(Control::keeper);
            let sink = Arc::new(sink.with_parking(parking.clone(), keeper));
            probe = Some(sink.spawn_health_probe(shutdown.clone()));
            let mut pump = Pump {
                sink: &sink,
                telemetry: &telemetry,
                config: &config.relay,
                shutdown: &shutdown,
                backoff: &mut backoff,
                resume: Resume::from(checkpoint),
                control,
                answer_within: config.source.query_timeout,
            };
            pump.run(&mut source, batch_size).await?;
            source.finish().await?;
            Ok(())
        }
        .await;
        if let Some(probe) = probe {
            probe.abort();
        }
        let pause = match outcome {
            Ok(()) => break,
            Err(RelayError::Source(e)) if e.is_retryable() => {
                // The producer went with the lead: the next lead fences again.
                let pause = backoff.next_pause();
                lost_postgres(&telemetry, &e, pause);
                pause
            }
            // Kafka not reachable while fencing, or the checkpoint not readable yet.
            Err(RelayError::Sink(e @ (SinkError::Aborted(_) | SinkError::Checkpoint { .. }))) => {
                tracing::warn!(error = %e, "cannot start the transactional producer; retrying");
                telemetry
                    .metrics
                    .failures
                    .with_label_values(&[e.reason()])
                    .inc();
                health.set_kafka(Some(e.to_string()));
                backoff.next_pause()
            }
            Err(RelayError::Stalled(waited)) => {
                tracing::warn!(
                    waited = ?waited,
                    "Kafka acknowledged nothing for relay.stall_timeout although it answers: \
                     starting over with a new transactional producer, which aborts the open \
                     transaction"
                );
                telemetry
                    .metrics
                    .failures
                    .with_label_values(&["stalled"])
                    .inc();
                backoff.next_pause()
            }
            Err(e) => {
                telemetry.metrics.leader.set(0);
                health.set_leader(false, Some("stopping"));
                return Err(e);
            }
        };
        telemetry.metrics.leader.set(0);
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(pause) => {}
        }
    }
    telemetry.metrics.leader.set(0);
    health.set_leader(false, Some("stopping"));
    Ok(())
}
