//! The Kafka sink: one idempotent producer, delivery reports in, outcomes out.
//!
//! Delivery is **at-least-once**: the relay acknowledges an event to PostgreSQL only
//! after the sink ([`Sink::collect`](crate::sink::Sink::collect)) reported it [`Delivery::Published`] (the broker has it,
//! `acks=all`) or [`Delivery::DeadLettered`] (the dead-letter topic has it). A failed
//! delivery comes back as [`Delivery::Failed`] and the event is simply read again.
//!
//! Order per aggregate rests on two things: the key is the aggregate id, so an aggregate
//! lives on one partition, and the idempotent producer keeps a partition's messages in
//! the order they were handed over, through its own retries.
//!
//! A broker checks a topic's `max.message.bytes` against a whole produce batch, and
//! librdkafka does not split a refused batch: on a topic whose limit is below the
//! producer's `batch.size`, small events refused together with a large one would look
//! too large themselves. So a size refusal is never trusted from a shared batch: the
//! event is sent again alone, through a second producer that puts one message in each
//! request, and from then on that topic's events go through that producer. Only an event
//! refused alone is dead-lettered for its size.

mod acks;
pub mod checkpoint;
mod config;
mod error;
pub mod limits;
mod log;
pub mod message;
mod poison;
mod probe;
mod producer;
pub mod schema;
pub mod topic;
mod transactional;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::producer::{
    BaseRecord, DeliveryFuture, FutureProducer, Producer, PurgeConfig, ThreadedProducer,
};
use rdkafka::ClientConfig;

use acks::{BatchContext, Ledger};
use log::LogContext;
pub(crate) use probe::{probe, spawn_health_probe};
pub use producer::producer_config;
use producer::{enqueue, headers_of, offer};

pub use config::{DeliveryMode, Format, KafkaSinkConfig, OnPoison, RawKafkaSinkConfig};
pub use error::{is_fenced, is_poison, is_too_large, SinkError};
pub use message::{KafkaMessage, Poison, Topics};
pub use transactional::{derive_transactional_id, TransactionalSink};

use crate::event::OutboxEvent;
use crate::metrics::Telemetry;
use crate::relay::parking::Parking;
use limits::{TopicLimits, Verdict};

/// How often a batch waiting for its reports looks whether some came in (readiness).
const REPORT_CHECK: Duration = Duration::from_secs(1);

/// What became of one event handed to [`KafkaSink::publish`].
#[derive(Debug)]
pub enum Delivery {
    /// The broker acknowledged it on `topic`.
    Published { topic: Arc<str> },
    /// It was poison and the dead-letter topic acknowledged it. With `metadata_only`,
    /// the event was too large even for the dead-letter topic, which got its key,
    /// headers, error, position and size but not its body: the source must keep the
    /// body in PostgreSQL before acknowledging it. `kind` says what was wrong
    /// ([`Poison::kind`]); with `parks`, its aggregate is parked from it on.
    DeadLettered {
        reason: String,
        metadata_only: bool,
        kind: &'static str,
        parks: bool,
    },
    /// Not sent: its aggregate is parked ([`crate::relay::parking`]). Durable once its
    /// row is kept in PostgreSQL, which the relay does before acknowledging it.
    Held,
    /// Not acknowledged: the event must be published again.
    Failed(SinkError),
}

impl Delivery {
    /// May the source forget this event?
    pub fn is_durable(&self) -> bool {
        !matches!(self, Delivery::Failed(_))
    }
}

pub struct KafkaSink {
    /// Events go through this one; its reports are counted per batch in `ledger`.
    producer: Arc<ThreadedProducer<BatchContext>>,
    ledger: Arc<Ledger>,
    /// One message per produce request (see the module docs), created when first needed.
    alone: OnceLock<Result<FutureProducer<LogContext>, KafkaError>>,
    /// Topics that refused a batch for its size: their events go through `alone`.
    one_at_a_time: Mutex<HashSet<String>>,
    /// Whether `one_at_a_time` holds any topic: until one is refused, which is the
    /// normal case, the per-event check takes no lock.
    any_one_at_a_time: AtomicBool,
    client: ClientConfig,
    config: KafkaSinkConfig,
    telemetry: Telemetry,
    /// With `on_poison = "park"`: the aggregates whose events are held.
    parking: Option<Arc<Parking>>,
    limits: TopicLimits,
}

impl KafkaSink {
    pub fn new(config: &KafkaSinkConfig, telemetry: Telemetry) -> Result<KafkaSink, SinkError> {
        let client = producer_config(config);
        let ledger = Arc::new(Ledger::default());
        let producer = client
            .create_with_context(BatchContext::new(ledger.clone()))
            .map_err(SinkError::Create)?;
        Ok(KafkaSink {
            producer: Arc::new(producer),
            ledger,
            alone: OnceLock::new(),
            one_at_a_time: Mutex::new(HashSet::new()),
            any_one_at_a_time: AtomicBool::new(false),
            limits: TopicLimits::new(&client),
            client,
            config: config.clone(),
            telemetry,
            parking: None,
        })
    }

    /// Holds the later events of an aggregate with a dead-lettered event
    /// (`on_poison = "park"`).
    pub fn with_parking(mut self, parking: Option<Arc<Parking>>) -> KafkaSink {
        self.parking = parking;
        self
    }

    /// Publishes `events` in order and reports, per event and in the same order, what
    /// became of it. Returns when every event has an outcome.
    pub async fn publish(&self, events: &[OutboxEvent]) -> Vec<Delivery> {
        let sent = self.send_batch(events).await;
        self.collect_batch(events, sent).await
    }

    /// [`Sink::send`](crate::sink::Sink::send): hands every event of the batch to
    /// librdkafka, in order. Batches sent one after the other keep their order on the
    /// wire, so the relay can send the next batch while this one's delivery reports are
    /// outstanding.
    async fn send_batch(&self, events: &[OutboxEvent]) -> SentBatch {
        let batch = self.ledger.open(events.len());
        let mut pending = Vec::with_capacity(events.len());
        let (mut batched, mut alone) = (0, 0);
        let mut broken = false;
        let mut topics = Topics::default();
        let mut limits = self.limits.for_batch();
        // Subjects first met in this batch are resolved before anything is handed over;
        // an event whose schema the registry cannot give yet waits, with those behind it.
        let mut waits_from = match &self.config.contracts {
            Some(contracts) => contracts
                .prepare(events, &self.config)
                .await
                .err()
                .map(|(i, e)| (i, SinkError::from(e))),
            None => None,
        };
        for (i, event) in events.iter().enumerate() {
            if waits_from.as_ref().is_some_and(|(at, _)| *at == i) {
                let (_, e) = waits_from.take().expect("checked");
                pending.push(Pending::Failed(e));
                broken = true;
                continue;
            }
            // After a failed hand-over, later events are not sent at all: sending them
            // would let them overtake the failed one when it is retried.
            if broken {
                pending.push(Pending::Failed(SinkError::NotAttempted));
                continue;
            }
            // A poison event goes to the dead-letter topic even behind a parked one of its
            // aggregate (it is announced, and kept with its own error); it parks the
            // aggregate before any later event of it is handed over.
            let msg = match message::to_message_with(event, &self.config, &mut topics) {
                Ok(msg) => msg,
                Err(poison) => {
                    pending.push(self.poison(event, poison));
                    continue;
                }
            };
            if self.parking.as_ref().is_some_and(|p| p.holds(event)) {
                pending.push(Pending::Held);
                continue;
            }
            let one_per_request = match limits.check(&msg).await {
                Verdict::TooLarge(reason) => {
                    let poison = Poison {
                        kind: "too_large",
                        ..Poison::new(reason)
                    };
                    pending.push(self.poison(event, poison));
                    continue;
                }
                Verdict::Alone => true,
                Verdict::Batch => self.goes_alone(&msg.topic),
            };
            let handed = if one_per_request {
                match self.alone() {
                    Ok(producer) => enqueue(producer, &msg).await.map(Some),
                    Err(e) => Err(e),
                }
            } else {
                self.produce(&msg, batch.number(i)).await.map(|()| None)
            };
            pending.push(match handed {
                Ok(Some(delivery)) => {
                    alone += 1;
                    Pending::SentAlone(msg.topic, delivery)
                }
                Ok(None) => {
                    batched += 1;
                    Pending::Sent(msg.topic)
                }
                Err(e) if is_poison(&e) => self.poison(event, Poison::refused(&e)),
                Err(e) => {
                    broken = true;
                    Pending::Failed(SinkError::Delivery {
                        topic: msg.topic.to_string(),
                        source: e,
                    })
                }
            });
        }
        batch.sealed(batched);
        let outstanding = (batched + alone) as i64;
        if outstanding > 0 {
            self.telemetry.metrics.in_flight.add(outstanding);
            self.telemetry.health.note_sent();
        }
        SentBatch {
            pending,
            batch,
            batched,
            in_flight: self.telemetry.metrics.in_flight.clone(),
            health: self.telemetry.health.clone(),
            outstanding,
        }
    }

    /// [`Sink::collect`](crate::sink::Sink::collect): waits for the delivery reports (and
    /// sends poison events to the dead-letter topic).
    async fn collect_batch(&self, events: &[OutboxEvent], mut sent: SentBatch) -> Vec<Delivery> {
        let health = &self.telemetry.health;
        let reports = if sent.batched > 0 {
            // Reports arriving while the batch is incomplete keep readiness's clock
            // from running out, as each report would.
            let in_flight = &sent.in_flight;
            sent.batch
                .reports(REPORT_CHECK, || health.note_answer(in_flight.get() > 0))
                .await
        } else {
            acks::Reports { failed: Vec::new() }
        };
        let mut failed = reports.failed.into_iter().peekable();
        let mut outcomes = Vec::with_capacity(events.len());
        let pending = std::mem::take(&mut sent.pending);
        for (i, (event, pending)) in events.iter().zip(pending).enumerate() {
            let outcome = match pending {
                Pending::Sent(topic) => match failed.next_if(|(j, _)| *j == i) {
                    None => {
                        if let Some(p) = &self.parking {
                            p.published(&topic);
                        }
                        Delivery::Published { topic }
                    }
                    Some((_, e)) => self.refused(event, topic, e, false).await,
                },
                Pending::SentAlone(topic, delivery) => match delivery.await {
                    Ok(Ok(_)) => Delivery::Published { topic },
                    Ok(Err((e, _))) => self.refused(event, topic, e, true).await,
                    Err(_canceled) => Delivery::Failed(SinkError::Delivery {
                        topic: topic.to_string(),
                        source: KafkaError::Canceled,
                    }),
                },
                Pending::Poison(poison, parks) => self.dead_letter(event, poison, parks).await,
                Pending::Held => Delivery::Held,
                Pending::Failed(e) => Delivery::Failed(e),
            };
            outcomes.push(outcome);
        }
        if sent.outstanding > 0 {
            sent.in_flight.sub(sent.outstanding);
            sent.outstanding = 0;
            health.note_answer(sent.in_flight.get() > 0);
        }
        account(&self.telemetry, &outcomes);
        // A fatal producer error (e.g. the idempotent producer was fenced) poisons every
        // later send: the only cure is a new producer, so the relay must stop.
        if let Some(failed) = outcomes.iter_mut().find(|o| !o.is_durable()) {
            if let Some(fatal) = self.fatal_error() {
                *failed = Delivery::Failed(fatal);
            }
        }
        outcomes
    }

    /// The producer that sends one message per request.
    fn alone(&self) -> Result<&FutureProducer<LogContext>, KafkaError> {
        self.alone
            .get_or_init(|| {
                let mut client = self.client.clone();
                client.set("batch.num.messages", "1");
                // Told apart in the broker's logs and quotas, under the operator's name
                // when one is set.
                let id = self
                    .config
                    .librdkafka
                    .get("client.id")
                    .map_or("outbox-relay".to_owned(), |v| v.to_string());
                client.set("client.id", format!("{id}-single"));
                client.create_with_context(LogContext::new("producer (one message per request)"))
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Whether `topic`'s events go through the one-message producer.
    fn goes_alone(&self, topic: &str) -> bool {
        self.any_one_at_a_time.load(Ordering::Acquire)
            && self.one_at_a_time.lock().unwrap().contains(topic)
    }

    /// Hands `msg` to the batch producer as message `number` of its batch, waiting
    /// while librdkafka's queue is full (backpressure, never a failure).
    // rdkafka's send hands the (large) record back with its error, by design.
    #[allow(clippy::result_large_err)]
    async fn produce(&self, msg: &KafkaMessage<'_>, number: usize) -> Result<(), KafkaError> {
        let record = BaseRecord {
            topic: &msg.topic,
            partition: None,
            payload: Some(msg.value.as_ref()),
            key: msg.key.as_deref(),
            timestamp: msg.timestamp_ms,
            headers: Some(headers_of(msg)),
            delivery_opaque: number,
        };
        offer(record, |r| self.producer.send(r)).await
    }

    /// Produces one message alone and waits for its delivery report. Dead letters go this
    /// way too: a size refusal then speaks of that message only.
    async fn deliver(&self, msg: &KafkaMessage<'_>) -> Result<(), KafkaError> {
        match enqueue(self.alone()?, msg).await?.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, _))) => Err(e),
            Err(_canceled) => Err(KafkaError::Canceled),
        }
    }

    /// Asks the brokers for metadata every few seconds, so `/readyz` notices a Kafka
    /// outage even while no event is flowing. Stops with `shutdown` (or when aborted).
    pub fn spawn_health_probe(
        &self,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let producer = self.producer.clone();
        spawn_health_probe(
            Arc::new(move || probe(producer.client())),
            &self.telemetry,
            &self.config.brokers,
            shutdown,
        )
    }

    /// Drops what the producers hold and have not sent yet: a relay that lost its lead
    /// must not publish after the new leader. (What is already on the wire cannot be
    /// called back; exactly-once delivery fences that too.)
    pub fn purge_queued(&self) {
        let queued = PurgeConfig::default().queue().non_blocking();
        self.producer.purge(queued);
        if let Some(Ok(alone)) = self.alone.get() {
            alone.purge(queued);
        }
    }

    /// The producer's fatal error, if it has one.
    fn fatal_error(&self) -> Option<SinkError> {
        self.producer
            .client()
            .fatal_error()
            .map(|(code, reason)| SinkError::Fatal(format!("{code}: {reason}")))
    }

    /// Asks the brokers for cluster metadata: proves they are reachable.
    pub fn ping(&self, timeout: Duration) -> Result<usize, KafkaError> {
        let md = self.producer.client().fetch_metadata(None, timeout)?;
        Ok(md.brokers().len())
    }
}

/// Counts a payload dead-lettered because it does not fit its schema.
pub(super) fn count_violation(telemetry: &Telemetry, event: &OutboxEvent) {
    telemetry
        .metrics
        .schema_violations
        .with_label_values(&[
            event.aggregate_type.as_deref().unwrap_or(""),
            event.event_type.as_deref().unwrap_or(""),
        ])
        .inc();
}

/// Counts a batch's outcomes and keeps Kafka's readiness current: a delivery proves the
/// brokers answer, a failed one says why they do not (the last outcome decides).
///
/// Counters move once per run of events on one topic: a labelled counter's lookup per
/// event would cost a hash and a lock each.
pub(super) fn account(telemetry: &Telemetry, outcomes: &[Delivery]) {
    let metrics = &telemetry.metrics;
    let mut run: Option<(&Arc<str>, u64)> = None;
    let flush = |run: Option<(&Arc<str>, u64)>| {
        if let Some((topic, n)) = run {
            metrics
                .events_published
                .with_label_values(&[topic])
                .inc_by(n);
        }
    };
    for outcome in outcomes {
        match outcome {
            Delivery::Published { topic } => match &mut run {
                Some((current, n)) if Arc::ptr_eq(current, topic) || *current == topic => *n += 1,
                _ => {
                    flush(run.take());
                    run = Some((topic, 1));
                }
            },
            Delivery::DeadLettered { .. } => metrics.events_dead_lettered.inc(),
            Delivery::Held => metrics.events_held.inc(),
            Delivery::Failed(e) => metrics.failures.with_label_values(&[e.reason()]).inc(),
        }
    }
    flush(run);
    // An event waiting for its schema (and those not sent behind it) says nothing about
    // Kafka: readiness names the registry instead.
    let waiting = outcomes.iter().find_map(|o| match o {
        Delivery::Failed(e @ SinkError::Contract(_)) => Some(e),
        _ => None,
    });
    if !outcomes.is_empty() {
        telemetry
            .health
            .set_registry(waiting.map(ToString::to_string));
    }
    let about_kafka = outcomes.iter().rev().find(|o| {
        !matches!(
            o,
            Delivery::Failed(SinkError::Contract(_)) | Delivery::Failed(SinkError::NotAttempted)
        ) || waiting.is_none()
    });
    match about_kafka {
        Some(Delivery::Failed(e)) => telemetry.health.set_kafka(Some(e.to_string())),
        Some(_) => telemetry.health.set_kafka(None),
        None => {}
    }
}

impl crate::sink::Sink for KafkaSink {
    type Sent = SentBatch;

    async fn send(&self, events: &[OutboxEvent]) -> SentBatch {
        self.send_batch(events).await
    }

    async fn collect(&self, events: &[OutboxEvent], sent: SentBatch) -> Vec<Delivery> {
        self.collect_batch(events, sent).await
    }

    fn reset(&self) {
        if let Some(parking) = &self.parking {
            parking.reset();
        }
    }

    fn forget_topic_limits(&self) {
        self.limits.forget();
    }
}

/// A batch handed to librdkafka, its delivery reports not collected yet. Dropping it
/// (an aborted collection) takes its events out of the in-flight gauge.
pub struct SentBatch {
    pending: Vec<Pending>,
    /// The batch's reports; dropping it stops waiting for them.
    batch: acks::Batch,
    /// Events handed to the batch producer.
    batched: usize,
    in_flight: prometheus::IntGauge,
    health: std::sync::Arc<crate::metrics::Health>,
    outstanding: i64,
}

impl Drop for SentBatch {
    fn drop(&mut self) {
        if self.outstanding > 0 {
            self.in_flight.sub(self.outstanding);
            // Given up on, not answered: with nothing else in flight nothing is awaited.
            if self.in_flight.get() <= 0 {
                self.health.note_answer(false);
            }
        }
    }
}

enum Pending {
    /// Handed to the batch producer for this topic: its report comes with the batch's.
    Sent(Arc<str>),
    /// Handed to the one-message producer.
    SentAlone(Arc<str>, DeliveryFuture),
    /// Dead-lettered, and with `true` its aggregate parked.
    Poison(Poison, bool),
    Held,
    Failed(SinkError),
}
