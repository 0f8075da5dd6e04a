//! Exactly-once delivery: each batch is one Kafka transaction.
//!
//! The transaction holds the batch's messages, its dead letters, and one record in the
//! checkpoint topic that says how far the outbox got ([`super::checkpoint`]). Consumers
//! reading with `isolation.level=read_committed` see all of it or none of it, and the
//! relay acknowledges to PostgreSQL only after the commit. After a crash, the next
//! leader reads the checkpoint and acknowledges what it covers without publishing it
//! again, so the window between Kafka's commit and PostgreSQL's acknowledgement repeats
//! nothing.
//!
//! Every replica of one outbox uses the same `transactional.id`, so a new leader's
//! `init_transactions` fences the old one: whatever a paused or partitioned old leader
//! still has queued can never be committed. A fenced producer is never replaced by the
//! relay on its own (that would fence the new leader in turn): it stops.
//!
//! Two batches may be with the sink, as at least once: while one transaction commits,
//! the relay reads the next batch and acknowledges the previous one to PostgreSQL. The
//! transactions themselves run one after the other, in the order the batches were
//! handed over (each has a ticket), and a batch whose predecessor did not commit is not
//! published at all: it comes back failed and is sent again behind the retried one.
//!
//! A broker refusal inside a transaction aborts it. The refused event is remembered,
//! and the batch goes again with that event on the dead-letter topic, inside the new
//! transaction like everything else.

mod plan;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, Producer};

use super::checkpoint::{self, Checkpoint};
use super::log::LogContext;
use super::message::KafkaMessage;
use super::{account, enqueue, is_fenced, Delivery, KafkaSinkConfig, SinkError};
use crate::event::OutboxEvent;
use crate::metrics::Telemetry;
use crate::relay::parking::Parking;
use crate::source::dead_letters::{Keeper, Kept};
use plan::{key_of, EventKey, Plan, Refusal};

/// How long `init_transactions`, `commit_transaction` and `abort_transaction` may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// librdkafka's default `transaction.timeout.ms`.
const DEFAULT_TRANSACTION_TIMEOUT_MS: &str = "60000";

/// The transactional id of an outbox when `sink.kafka.transactional_id` is not set: the
/// same on every replica of the database (a promoted standby keeps the system
/// identifier), different for every outbox.
pub fn derive_transactional_id(system_identifier: &str, database: &str, name: &str) -> String {
    format!("outbox-relay.{system_identifier}.{database}.{name}")
}

pub struct TransactionalSink {
    producer: FutureProducer<LogContext>,
    config: KafkaSinkConfig,
    telemetry: Telemetry,
    transactional_id: String,
    epoch: String,
    /// What the last committed transaction recorded.
    committed: Mutex<Option<Checkpoint>>,
    /// Events a broker refused for good in an aborted transaction.
    refused: Mutex<HashMap<EventKey, Refusal>>,
    tickets: Mutex<Tickets>,
    /// The last ticket whose collection ended (committed, aborted or refused).
    finished: tokio::sync::watch::Sender<u64>,
    /// With `on_poison = "park"`: the aggregates whose events are held.
    parking: Option<Arc<Parking>>,
    /// Where dead letters and held events are kept before a commit covers them.
    keeper: Option<Keeper>,
}

/// The order of the batches handed over.
#[derive(Default)]
struct Tickets {
    /// The last ticket handed out.
    sent: u64,
    /// The last ticket whose transaction committed, with every earlier one.
    committed: u64,
}

impl TransactionalSink {
    /// Creates the transactional producer, fences every earlier producer of this
    /// outbox (aborting what they left open) and reads the last committed checkpoint.
    pub async fn start(
        config: &KafkaSinkConfig,
        telemetry: Telemetry,
        transactional_id: String,
        epoch: String,
    ) -> Result<(TransactionalSink, Option<Checkpoint>), SinkError> {
        let mut client = super::producer_config(config);
        client.set("transactional.id", &transactional_id);
        // A transactional producer must give up on a message before its transaction
        // times out (librdkafka refuses an infinite message timeout here). Giving up is
        // harmless in this mode: the whole transaction aborts and goes again.
        let timeout = config
            .librdkafka
            .get("transaction.timeout.ms")
            .map_or(DEFAULT_TRANSACTION_TIMEOUT_MS, String::as_str);
        client.set("message.timeout.ms", timeout);
        let producer: FutureProducer<LogContext> = client
            .create_with_context(LogContext::new("transactional producer"))
            .map_err(SinkError::Create)?;
        checkpoint::ensure_topic(config, CALL_TIMEOUT).await?;
        let p = producer.clone();
        blocking(move || p.init_transactions(CALL_TIMEOUT))
            .await
            .map_err(|e| transaction_error("init_transactions", e))?;
        let (c, id, ep) = (config.clone(), transactional_id.clone(), epoch.clone());
        let last = blocking(move || checkpoint::read_last(&c, &id, &ep, CALL_TIMEOUT)).await?;
        tracing::info!(
            transactional_id,
            checkpoint_topic = config.checkpoint_topic,
            checkpoint = ?last.map(|c| format!("{} (count {})", c.position, c.count)),
            "exactly-once: fenced earlier producers of this outbox and read its checkpoint"
        );
        let sink = TransactionalSink {
            producer,
            config: config.clone(),
            telemetry,
            transactional_id,
            epoch,
            committed: Mutex::new(last),
            refused: Mutex::new(HashMap::new()),
            tickets: Mutex::new(Tickets::default()),
            finished: tokio::sync::watch::Sender::new(0),
            parking: None,
            keeper: None,
        };
        Ok((sink, last))
    }

    /// Parks aggregates (`on_poison = "park"`) and keeps dead letters in PostgreSQL
    /// before each commit: a checkpoint never covers an event PostgreSQL does not hold.
    pub fn with_parking(mut self, parking: Option<Arc<Parking>>, keeper: Option<Keeper>) -> Self {
        self.parking = parking;
        self.keeper = keeper;
        self
    }

    pub fn spawn_health_probe(
        &self,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let producer = self.producer.clone();
        super::spawn_health_probe(
            std::sync::Arc::new(move || super::probe(producer.client())),
            &self.telemetry,
            &self.config.brokers,
            shutdown,
        )
    }

    /// Publishes `events` in one transaction with their checkpoint; every outcome is
    /// durable after a commit, and none is after an abort.
    async fn transact(&self, events: &[OutboxEvent]) -> Vec<Delivery> {
        // Subjects first met are resolved first: until the registry gives them, the
        // whole batch waits (one transaction, one outcome).
        if let Some(contracts) = &self.config.contracts {
            if let Err((_, e)) = contracts.prepare(events, &self.config).await {
                let failed = SinkError::from(e);
                let metrics = &self.telemetry.metrics;
                metrics.failures.with_label_values(&[failed.reason()]).inc();
                self.telemetry.health.set_registry(Some(failed.to_string()));
                let mut outcomes = vec![Delivery::Failed(failed)];
                outcomes
                    .extend((1..events.len()).map(|_| Delivery::Failed(SinkError::NotAttempted)));
                return outcomes;
            }
        }
        let plans: Vec<Plan> = events.iter().map(|e| self.plan(e)).collect();
        let failed = match self.produce_and_commit(events, &plans).await {
            Ok(()) => {
                let mut refused = self.refused.lock().unwrap();
                for event in events {
                    refused.remove(&key_of(event));
                }
                drop(refused);
                self.telemetry
                    .metrics
                    .transactions
                    .with_label_values(&["committed"])
                    .inc();
                let outcomes: Vec<Delivery> = plans
                    .into_iter()
                    .zip(events)
                    .map(|(plan, event)| match plan {
                        Plan::Message(msg) => {
                            if let Some(p) = &self.parking {
                                p.published(&msg.topic);
                            }
                            Delivery::Published { topic: msg.topic }
                        }
                        Plan::DeadLetter {
                            reason,
                            metadata_only,
                            violation,
                            kind,
                            parks,
                            ..
                        } => {
                            if violation {
                                super::count_violation(&self.telemetry, event);
                            }
                            Delivery::DeadLettered {
                                reason,
                                metadata_only,
                                kind,
                                parks,
                            }
                        }
                        Plan::Held => Delivery::Held,
                    })
                    .collect();
                account(&self.telemetry, &outcomes);
                return outcomes;
            }
            Err(e) => e,
        };
        // The first event carries the reason; the rest of the batch goes again with it.
        let metrics = &self.telemetry.metrics;
        metrics.failures.with_label_values(&[failed.reason()]).inc();
        self.telemetry.health.set_kafka(Some(failed.to_string()));
        let mut outcomes = vec![Delivery::Failed(failed)];
        outcomes.extend((1..events.len()).map(|_| Delivery::Failed(SinkError::NotAttempted)));
        outcomes
    }

    async fn produce_and_commit(
        &self,
        events: &[OutboxEvent],
        plans: &[Plan<'_>],
    ) -> Result<(), SinkError> {
        self.producer
            .begin_transaction()
            .map_err(|e| transaction_error("begin_transaction", e))?;
        // Redriven events sit at old positions: the checkpoint never moves back to them
        // (a redrive alone commits no checkpoint record).
        let committed = *self.committed.lock().unwrap();
        let checkpoint = Checkpoint::advance(committed, events.iter().filter(|e| !e.redriven));
        let record = checkpoint
            .filter(|c| Some(*c) != committed)
            .map(|c| KafkaMessage {
                topic: self.config.checkpoint_topic.as_str().into(),
                key: Some(self.transactional_id.as_bytes().into()),
                value: c.encode(&self.epoch).into(),
                headers: Vec::new(),
                timestamp_ms: None,
            });
        let in_flight = &self.telemetry.metrics.in_flight;
        let mut deliveries = Vec::with_capacity(plans.len() + 1);
        let mut refusals: Vec<(usize, KafkaError)> = Vec::new();
        // Held events are not sent; indices stay the events' own.
        let messages = plans
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.msg().map(|m| (i, m)));
        for (i, msg) in messages.chain(record.as_ref().map(|r| (plans.len(), r))) {
            match enqueue(&self.producer, msg).await {
                Ok(delivery) => deliveries.push((i, delivery)),
                Err(e) => {
                    refusals.push((i, e));
                    break;
                }
            }
        }
        in_flight.add(deliveries.len() as i64);
        self.telemetry.health.note_sent();
        for (i, delivery) in deliveries {
            let answer = match delivery.await {
                Ok(Ok(_)) => None,
                Ok(Err((e, _))) => Some(e),
                Err(_canceled) => Some(KafkaError::Canceled),
            };
            in_flight.dec();
            self.telemetry.health.note_answer(in_flight.get() > 0);
            if let Some(e) = answer {
                refusals.push((i, e));
            }
        }
        if let Some((i, e)) = self.blame(events, plans, &refusals) {
            self.abort().await?;
            let what = match events.get(i) {
                Some(event) => format!("event at {}: {e}", event.position),
                None => format!("the checkpoint record: {e}"),
            };
            return Err(SinkError::Aborted(what));
        }
        self.keep(events, plans).await?;
        self.commit().await?;
        if checkpoint.is_some() {
            *self.committed.lock().unwrap() = checkpoint;
        }
        Ok(())
    }

    /// Keeps the transaction's dead letters and held events in PostgreSQL before it
    /// commits: once committed, its checkpoint covers them, and a restart acknowledges
    /// them without publishing them again.
    async fn keep(&self, events: &[OutboxEvent], plans: &[Plan<'_>]) -> Result<(), SinkError> {
        let Some(keeper) = &self.keeper else {
            return Ok(());
        };
        let kept: Vec<Kept> = events
            .iter()
            .zip(plans)
            .filter_map(|(event, plan)| match plan {
                Plan::Message(_) => None,
                Plan::DeadLetter {
                    reason,
                    kind,
                    parks,
                    ..
                } => Some(Kept::dead_letter(event, reason, kind, *parks)),
                Plan::Held => Some(Kept::held(event)),
            })
            .collect();
        if kept.is_empty() {
            return Ok(());
        }
        if let Err(e) = keeper.keep(&kept).await {
            self.abort().await?;
            return Err(SinkError::Aborted(format!(
                "cannot keep dead letters in PostgreSQL before the commit: {e}"
            )));
        }
        if let Some(parking) = &self.parking {
            parking.settle(kept.iter().filter(|k| k.held).map(|k| k.event));
        }
        Ok(())
    }

    async fn commit(&self) -> Result<(), SinkError> {
        loop {
            let p = self.producer.clone();
            match blocking(move || p.commit_transaction(CALL_TIMEOUT)).await {
                Ok(()) => return Ok(()),
                // librdkafka: a retriable commit error means "call commit again"; a
                // commit that did happen then answers success.
                Err(KafkaError::Transaction(t)) if t.is_retriable() => {
                    tracing::warn!(error = %t, "committing the Kafka transaction again");
                }
                Err(KafkaError::Transaction(t)) if t.txn_requires_abort() => {
                    self.abort().await?;
                    return Err(SinkError::Aborted(format!("the commit failed: {t}")));
                }
                Err(e) => return Err(transaction_error("commit_transaction", e)),
            }
        }
    }

    async fn abort(&self) -> Result<(), SinkError> {
        self.telemetry
            .metrics
            .transactions
            .with_label_values(&["aborted"])
            .inc();
        loop {
            let p = self.producer.clone();
            match blocking(move || p.abort_transaction(CALL_TIMEOUT)).await {
                Ok(()) => return Ok(()),
                Err(KafkaError::Transaction(t)) if t.is_retriable() => {
                    tracing::warn!(error = %t, "aborting the Kafka transaction again");
                }
                Err(e) => return Err(transaction_error("abort_transaction", e)),
            }
        }
    }
}

/// A failed transactional call: fenced, or fatal, or (when Kafka is not reachable yet)
/// something a later attempt may get through.
fn transaction_error(call: &str, e: KafkaError) -> SinkError {
    if is_fenced(&e) {
        return SinkError::Fenced(format!("{call}: {e}"));
    }
    match &e {
        KafkaError::Transaction(t) if !t.is_fatal() => {
            SinkError::Aborted(format!("{call} failed: {t}"))
        }
        _ => SinkError::Fatal(format!("{call}: {e}")),
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(value) => value,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// A batch's place in line.
pub struct Ticket(u64);

impl crate::sink::Sink for TransactionalSink {
    type Sent = Ticket;

    /// The ticket is taken when the batch is handed over, so transactions follow the
    /// batches' order, whichever collection runs first.
    async fn send(&self, _events: &[OutboxEvent]) -> Ticket {
        let mut tickets = self.tickets.lock().unwrap();
        tickets.sent += 1;
        Ticket(tickets.sent)
    }

    fn keeps_dead_letters(&self) -> bool {
        self.keeper.is_some()
    }

    fn forget_topic_limits(&self) {}

    async fn collect(&self, events: &[OutboxEvent], Ticket(ticket): Ticket) -> Vec<Delivery> {
        let mut finished = self.finished.subscribe();
        // An abandoned predecessor never finishes, but then this batch is abandoned
        // too, and [`Sink::reset`] comes before anything is sent again.
        let _ = finished.wait_for(|&f| f + 1 >= ticket).await;
        let follows = self.tickets.lock().unwrap().committed + 1 == ticket;
        let outcomes = if follows {
            self.transact(events).await
        } else {
            // The batch before it did not commit: publishing this one would put its
            // events ahead of the ones that are sent again.
            events
                .iter()
                .map(|_| Delivery::Failed(SinkError::NotAttempted))
                .collect()
        };
        if follows && outcomes.iter().all(Delivery::is_durable) {
            self.tickets.lock().unwrap().committed = ticket;
        }
        self.finished.send_modify(|f| *f = (*f).max(ticket));
        outcomes
    }

    fn reset(&self) {
        if let Some(parking) = &self.parking {
            parking.reset();
        }
        let mut tickets = self.tickets.lock().unwrap();
        tickets.committed = tickets.sent;
        let sent = tickets.sent;
        drop(tickets);
        self.finished.send_modify(|f| *f = sent);
    }
}
