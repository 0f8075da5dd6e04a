//! The batch loop against a scripted source and sink: no database, no broker, virtual
//! time. Each test pins one rule of the pipeline.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::pump::Pump;
use super::{RelayConfig, RelayError};
use crate::backoff::Backoff;
use crate::event::{OutboxEvent, Position};
use crate::metrics::Telemetry;
use crate::sink::kafka::checkpoint::{Checkpoint, Resume};
use crate::sink::{Delivery, Sink, SinkError};
use crate::source::{Source, SourceError};

fn event(seq: i64) -> OutboxEvent {
    OutboxEvent {
        position: Position::Seq(seq),
        id: Some(format!("id-{seq}").into()),
        aggregate_type: Some("order".into()),
        aggregate_id: Some(format!("agg-{}", seq % 3).into()),
        event_type: Some("E".into()),
        payload: Some(b"{}".to_vec().into()),
        ..OutboxEvent::blank(Position::Seq(seq))
    }
}

fn seq(e: &OutboxEvent) -> i64 {
    match e.position {
        Position::Seq(s) => s,
        Position::Lsn(_) => unreachable!("the test source has rows only"),
    }
}

/// Rows 1..=n, read in order like the polling source: a rewind reads again from the
/// oldest unacknowledged row. Stops the relay once every row is acknowledged.
struct Rows {
    n: i64,
    /// Highest row returned.
    returned: i64,
    acked: Vec<i64>,
    rewinds: Vec<Vec<i64>>,
    /// Rows whose bodies the source was asked to keep (dead-lettered as metadata only).
    kept: Vec<i64>,
    /// Cancelled once this many rows are acknowledged.
    done: CancellationToken,
    stop_at: usize,
}

impl Rows {
    fn new(n: i64, done: &CancellationToken) -> Rows {
        Rows {
            n,
            returned: 0,
            acked: Vec::new(),
            rewinds: Vec::new(),
            kept: Vec::new(),
            done: done.clone(),
            stop_at: n as usize,
        }
    }
}

impl Source for Rows {
    async fn next_batch(
        &mut self,
        max: usize,
        wait: bool,
    ) -> Result<Vec<OutboxEvent>, SourceError> {
        let upto = (self.returned + max as i64).min(self.n);
        let batch: Vec<_> = (self.returned + 1..=upto).map(event).collect();
        self.returned = upto;
        if batch.is_empty() && wait {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(batch)
    }

    async fn ack(&mut self, events: &[OutboxEvent]) -> Result<(), SourceError> {
        self.acked.extend(events.iter().map(seq));
        if self.acked.len() >= self.stop_at {
            self.done.cancel();
        }
        Ok(())
    }

    async fn keep_dead_letters(
        &mut self,
        events: &[(&OutboxEvent, &str)],
    ) -> Result<(), SourceError> {
        self.kept.extend(events.iter().map(|(e, _)| seq(e)));
        Ok(())
    }

    fn rewind(&mut self, unacknowledged: Vec<OutboxEvent>) {
        let seqs: Vec<i64> = unacknowledged.iter().map(seq).collect();
        self.returned = self.acked.last().copied().unwrap_or(0);
        self.rewinds.push(seqs);
    }
}

/// Publishes everything, except that rows in `fail_once` fail the first time they are
/// collected, and with `hang` no outcome ever arrives.
#[derive(Default)]
struct Scripted {
    fail_once: Mutex<HashSet<i64>>,
    /// Rows the dead-letter topic takes only as metadata (too large for it).
    metadata_only: HashSet<i64>,
    fatal: bool,
    hang: bool,
    /// The hand-over never finishes (librdkafka's queue stays full).
    hang_send: bool,
    /// Every row handed over, in order, resends included.
    sent: Mutex<Vec<i64>>,
}

impl Sink for Scripted {
    type Sent = ();

    async fn send(&self, events: &[OutboxEvent]) {
        if self.hang_send {
            std::future::pending::<()>().await;
        }
        self.sent.lock().unwrap().extend(events.iter().map(seq));
    }

    async fn collect(&self, events: &[OutboxEvent], (): ()) -> Vec<Delivery> {
        if self.hang {
            std::future::pending::<()>().await;
        }
        let mut fail = self.fail_once.lock().unwrap();
        let mut broken = false;
        events
            .iter()
            .map(|e| {
                broken |= fail.remove(&seq(e));
                match (broken, self.fatal) {
                    (false, _) if self.metadata_only.contains(&seq(e)) => Delivery::DeadLettered {
                        reason: "too large".into(),
                        metadata_only: true,
                        kind: "too_large",
                        parks: false,
                    },
                    (false, _) => Delivery::Published {
                        topic: "outbox.order".into(),
                    },
                    (true, true) => Delivery::Failed(SinkError::Fatal("fenced".into())),
                    (true, false) => Delivery::Failed(SinkError::NotAttempted),
                }
            })
            .collect()
    }
}

fn relay_config() -> RelayConfig {
    RelayConfig {
        shutdown_grace: Duration::from_secs(5),
        max_backoff: Duration::from_secs(1),
        stall_timeout: Duration::from_secs(10),
    }
}

/// Runs the pump until the source has every row acknowledged (or it fails).
async fn pump(
    sink: Scripted,
    source: &mut Rows,
    shutdown: &CancellationToken,
    batch_size: usize,
    kafka_answers: bool,
) -> (Result<(), RelayError>, Arc<Scripted>) {
    let telemetry = Telemetry::default();
    if kafka_answers {
        telemetry.health.set_kafka(None);
    }
    pump_with(sink, source, shutdown, batch_size, telemetry).await
}

async fn pump_with(
    sink: Scripted,
    source: &mut Rows,
    shutdown: &CancellationToken,
    batch_size: usize,
    telemetry: Telemetry,
) -> (Result<(), RelayError>, Arc<Scripted>) {
    pump_resuming(
        sink,
        source,
        shutdown,
        batch_size,
        telemetry,
        Resume::default(),
    )
    .await
}

async fn pump_resuming(
    sink: Scripted,
    source: &mut Rows,
    shutdown: &CancellationToken,
    batch_size: usize,
    telemetry: Telemetry,
    resume: Resume,
) -> (Result<(), RelayError>, Arc<Scripted>) {
    let sink = Arc::new(sink);
    let config = relay_config();
    let mut backoff = Backoff::new(Duration::from_millis(100), config.max_backoff);
    let mut pump = Pump {
        sink: &sink,
        telemetry: &telemetry,
        config: &config,
        shutdown,
        backoff: &mut backoff,
        resume,
        control: None,
        answer_within: Duration::from_secs(10),
    };
    let result = pump.run(source, batch_size).await;
    (result, sink)
}

fn range(from: i64, to: i64) -> Vec<i64> {
    (from..=to).collect()
}

#[tokio::test(start_paused = true)]
async fn every_row_is_acknowledged_once_and_in_order() {
    let done = CancellationToken::new();
    let mut rows = Rows::new(10, &done);
    let (result, sink) = pump(Scripted::default(), &mut rows, &done, 3, true).await;
    result.unwrap();
    assert_eq!(rows.acked, range(1, 10));
    assert_eq!(
        *sink.sent.lock().unwrap(),
        range(1, 10),
        "nothing sent twice"
    );
    assert!(rows.rewinds.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_failure_in_the_middle_of_a_batch_acknowledges_the_prefix_and_resends_the_rest() {
    let done = CancellationToken::new();
    let mut rows = Rows::new(5, &done);
    let sink = Scripted {
        fail_once: Mutex::new([3].into()),
        ..Default::default()
    };
    let (result, sink) = pump(sink, &mut rows, &done, 5, true).await;
    result.unwrap();
    assert_eq!(
        rows.acked,
        range(1, 5),
        "1, 2 first, then 3–5 after the resend"
    );
    assert_eq!(
        rows.rewinds,
        [vec![3, 4, 5]],
        "the source gets back exactly 3–5"
    );
    let expected: Vec<i64> = range(1, 5).into_iter().chain(range(3, 5)).collect();
    assert_eq!(*sink.sent.lock().unwrap(), expected);
}

#[tokio::test(start_paused = true)]
async fn a_failure_with_two_batches_in_flight_rewinds_both_and_keeps_order() {
    let done = CancellationToken::new();
    let mut rows = Rows::new(9, &done);
    let sink = Scripted {
        fail_once: Mutex::new([2].into()),
        ..Default::default()
    };
    let (result, sink) = pump(sink, &mut rows, &done, 3, true).await;
    result.unwrap();
    assert_eq!(rows.acked, range(1, 9));
    // Row 1 acknowledged; 2, 3 of the failed batch and all of the one behind it
    // come back to the source, in order.
    assert_eq!(rows.rewinds, [range(2, 6)]);
    let sent = sink.sent.lock().unwrap().clone();
    assert_eq!(
        &sent[..6],
        range(1, 6),
        "two batches handed over before the failure"
    );
    assert_eq!(
        &sent[6..],
        range(2, 9),
        "then everything from the failed row, in order"
    );
}

#[tokio::test(start_paused = true)]
async fn a_fatal_sink_error_stops_the_relay() {
    let done = CancellationToken::new();
    let mut rows = Rows::new(4, &done);
    let sink = Scripted {
        fail_once: Mutex::new([2].into()),
        fatal: true,
        ..Default::default()
    };
    let (result, _) = pump(sink, &mut rows, &done, 4, true).await;
    assert!(
        matches!(result, Err(RelayError::Sink(SinkError::Fatal(_)))),
        "{result:?}"
    );
    assert_eq!(rows.acked, [1], "the durable prefix is still acknowledged");
    assert!(rows.rewinds.is_empty(), "no retry with a dead producer");
}

#[tokio::test(start_paused = true)]
async fn no_outcome_while_the_broker_answers_is_a_stall() {
    let done = CancellationToken::new();
    let mut rows = Rows::new(4, &done);
    let sink = Scripted {
        hang: true,
        ..Default::default()
    };
    let started = tokio::time::Instant::now();
    let (result, _) = pump(sink, &mut rows, &done, 2, true).await;
    match result {
        Err(RelayError::Stalled(waited)) => {
            assert!(waited >= relay_config().stall_timeout, "{waited:?}")
        }
        other => panic!("expected a stall, got {other:?}"),
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed < relay_config().stall_timeout + Duration::from_secs(2),
        "{elapsed:?}"
    );
    assert!(rows.acked.is_empty());
}

#[tokio::test(start_paused = true)]
async fn no_outcome_while_the_broker_is_unreachable_is_waited_for_until_shutdown_grace() {
    let shutdown = CancellationToken::new();
    let mut rows = Rows::new(4, &CancellationToken::new());
    let sink = Scripted {
        hang: true,
        ..Default::default()
    };
    let stop = shutdown.clone();
    tokio::spawn(async move {
        // Far beyond the stall timeout: unreachable brokers are not a stall.
        tokio::time::sleep(Duration::from_secs(60)).await;
        stop.cancel();
    });
    let started = tokio::time::Instant::now();
    let (result, sink) = pump(sink, &mut rows, &shutdown, 2, false).await;
    assert!(
        matches!(result, Err(RelayError::GraceExpired(g)) if g == relay_config().shutdown_grace),
        "{result:?}"
    );
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(60) + relay_config().shutdown_grace
    );
    assert_eq!(
        *sink.sent.lock().unwrap(),
        range(1, 4),
        "two batches, no more"
    );
    assert!(rows.acked.is_empty());
}

#[tokio::test(start_paused = true)]
async fn shutdown_acknowledges_what_is_in_flight_and_reads_no_further() {
    let shutdown = CancellationToken::new();
    let mut rows = Rows::new(1_000, &shutdown);
    rows.stop_at = 10;
    let (result, sink) = pump(Scripted::default(), &mut rows, &shutdown, 10, true).await;
    result.unwrap();
    let sent = sink.sent.lock().unwrap().clone();
    // The signal came with the first acknowledgement, when the second batch was in
    // flight already: nothing was read after it.
    assert_eq!(sent.len(), 20, "{} sent", sent.len());
    assert_eq!(
        rows.acked, sent,
        "everything handed over was acknowledged before return"
    );
    assert_eq!(rows.acked, range(1, sent.len() as i64));
}

#[tokio::test(start_paused = true)]
async fn a_body_the_dead_letter_topic_could_not_take_is_kept_before_the_ack() {
    let done = CancellationToken::new();
    let mut rows = Rows::new(6, &done);
    let sink = Scripted {
        metadata_only: [2, 5].into(),
        ..Default::default()
    };
    let (result, sink) = pump(sink, &mut rows, &done, 3, true).await;
    result.unwrap();
    assert_eq!(rows.kept, [2, 5]);
    assert_eq!(rows.acked, range(1, 6));
    assert!(
        rows.rewinds.is_empty(),
        "a poison event re-sends nothing around it"
    );
    assert_eq!(*sink.sent.lock().unwrap(), range(1, 6));
}

/// Cancels `shutdown` after `after` (virtual time).
fn cancel_after(shutdown: &CancellationToken, after: Duration) {
    let stop = shutdown.clone();
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        stop.cancel();
    });
}

#[tokio::test(start_paused = true)]
async fn a_partition_without_a_leader_is_slow_not_a_stalled_producer() {
    let shutdown = CancellationToken::new();
    let mut rows = Rows::new(4, &CancellationToken::new());
    let sink = Scripted {
        hang: true,
        ..Default::default()
    };
    let telemetry = Telemetry::default();
    telemetry.health.set_kafka(None);
    telemetry.health.set_leaderless_partitions(1);
    cancel_after(&shutdown, Duration::from_secs(120));
    let (result, _) = pump_with(sink, &mut rows, &shutdown, 2, telemetry).await;
    assert!(
        matches!(result, Err(RelayError::GraceExpired(_))),
        "waited for the election, no producer replacement: {result:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_is_honoured_while_the_producer_queue_is_full() {
    let shutdown = CancellationToken::new();
    let mut rows = Rows::new(4, &CancellationToken::new());
    let sink = Scripted {
        hang_send: true,
        ..Default::default()
    };
    cancel_after(&shutdown, Duration::from_secs(1));
    let started = tokio::time::Instant::now();
    let (result, _) = pump(sink, &mut rows, &shutdown, 2, true).await;
    assert!(
        matches!(result, Err(RelayError::GraceExpired(_))),
        "{result:?}"
    );
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(1) + relay_config().shutdown_grace
    );
}

/// Exactly-once recovery: rows an earlier run committed to Kafka (the checkpoint says up
/// to row 7) are acknowledged without being sent; the rest are sent, and a failure
/// later on does not make the pump skip anything again.
#[tokio::test(start_paused = true)]
async fn rows_the_checkpoint_covers_are_acknowledged_without_being_sent() {
    let shutdown = CancellationToken::new();
    let mut rows = Rows::new(20, &shutdown);
    let sink = Scripted {
        fail_once: Mutex::new(HashSet::from([12])),
        ..Scripted::default()
    };
    let telemetry = Telemetry::default();
    telemetry.health.set_kafka(None);
    let resume = Resume::from(Some(Checkpoint {
        position: Position::Seq(7),
        count: 1,
    }));
    let (result, sink) =
        pump_resuming(sink, &mut rows, &shutdown, 5, telemetry.clone(), resume).await;
    result.unwrap();
    assert_eq!(
        rows.acked,
        range(1, 20),
        "every row acknowledged once, in order"
    );
    let sent = sink.sent.lock().unwrap().clone();
    assert!(
        sent.iter().all(|&s| s > 7),
        "covered rows were sent: {sent:?}"
    );
    assert_eq!(sent.iter().filter(|&&s| s == 8).count(), 1);
    assert_eq!(telemetry.metrics.events_reconciled.get(), 7);
}
