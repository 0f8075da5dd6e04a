//! Telemetry shared by every component: Prometheus metrics ([design §10](../../docs/design.md#10-monitoring)) and the readiness
//! state behind `/readyz`.
//!
//! All metric names live here, as constants, so the metrics table of docs/monitoring.md, the Grafana dashboard
//! and the alert rules can be checked against one list ([`NAMES`]).

mod health;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

pub use health::{Health, Readiness};

pub const EVENTS_PUBLISHED: &str = "outbox_relay_events_published_total";
pub const EVENTS_DEAD_LETTERED: &str = "outbox_relay_events_dead_lettered_total";
pub const FAILURES: &str = "outbox_relay_failures_total";
pub const BATCH_SIZE: &str = "outbox_relay_batch_size";
pub const COMMIT_TO_ACK: &str = "outbox_relay_commit_to_ack_seconds";
pub const IN_FLIGHT: &str = "outbox_relay_in_flight_messages";
pub const LEADER: &str = "outbox_relay_leader";
pub const READY: &str = "outbox_relay_ready";
pub const BACKLOG_ROWS: &str = "outbox_relay_backlog_rows";
pub const SLOT_LAG_BYTES: &str = "outbox_relay_slot_lag_bytes";
pub const LAST_ACKED_LSN: &str = "outbox_relay_last_acked_lsn";
pub const LAST_ACK_TIMESTAMP: &str = "outbox_relay_last_ack_timestamp_seconds";
pub const RECONNECTS: &str = "outbox_relay_reconnects_total";
pub const SLOTS_RECREATED: &str = "outbox_relay_slots_recreated_total";
pub const BUILD_INFO: &str = "outbox_relay_build_info";
pub const TRANSACTIONS: &str = "outbox_relay_kafka_transactions_total";
pub const EVENTS_RECONCILED: &str = "outbox_relay_events_reconciled_total";
pub const FIRST_STARTS_WITH_HISTORY: &str = "outbox_relay_first_starts_with_history_total";
pub const PUBLICATION_GAP_ROWS: &str = "outbox_relay_publication_gap_rows_total";
pub const ROW_CHANGES: &str = "outbox_relay_row_changes_total";
pub const SCHEMA_VIOLATIONS: &str = "outbox_relay_schema_violations_total";
pub const EVENTS_HELD: &str = "outbox_relay_events_held_total";
pub const PARKED_LATE: &str = "outbox_relay_parked_late_total";
pub const PARKED_AGGREGATES: &str = "outbox_relay_parked_aggregates";
pub const PARKED_EVENTS: &str = "outbox_relay_parked_events";
pub const OLDEST_PARKED: &str = "outbox_relay_oldest_parked_seconds";
pub const DEAD_LETTERS: &str = "outbox_relay_dead_letters";
pub const PAUSED: &str = "outbox_relay_paused";
pub const OPERATOR_ACTIONS: &str = "outbox_relay_operator_actions_total";
pub const EVENTS_REDRIVEN: &str = "outbox_relay_events_redriven_total";
pub const EVENTS_DISCARDED: &str = "outbox_relay_events_discarded_total";

/// The `reason` label values of [`FAILURES`].
pub const FAILURE_REASONS: [&str; 11] = [
    "delivery",
    "dead_letter",
    "producer",
    "not_attempted",
    "postgres",
    "stalled",
    "aborted",
    "fenced",
    "checkpoint",
    "schema_registry",
    "topic_refuses",
];

/// Every metric this crate exports (the process_* metrics come on top).
pub const NAMES: [&str; 31] = [
    EVENTS_PUBLISHED,
    EVENTS_DEAD_LETTERED,
    FAILURES,
    BATCH_SIZE,
    COMMIT_TO_ACK,
    IN_FLIGHT,
    LEADER,
    READY,
    BACKLOG_ROWS,
    SLOT_LAG_BYTES,
    LAST_ACKED_LSN,
    LAST_ACK_TIMESTAMP,
    RECONNECTS,
    SLOTS_RECREATED,
    BUILD_INFO,
    TRANSACTIONS,
    EVENTS_RECONCILED,
    FIRST_STARTS_WITH_HISTORY,
    PUBLICATION_GAP_ROWS,
    ROW_CHANGES,
    SCHEMA_VIOLATIONS,
    EVENTS_HELD,
    PARKED_LATE,
    PARKED_AGGREGATES,
    PARKED_EVENTS,
    OLDEST_PARKED,
    DEAD_LETTERS,
    PAUSED,
    OPERATOR_ACTIONS,
    EVENTS_REDRIVEN,
    EVENTS_DISCARDED,
];

/// The `reason` label values of [`DEAD_LETTERS`].
pub const DEAD_LETTER_REASONS: [&str; 4] = ["invalid", "schema", "too_large", "refused"];

/// The `action` label values of [`OPERATOR_ACTIONS`].
pub const OPERATOR_ACTION_KINDS: [&str; 4] = ["redrive", "discard", "pause", "resume"];

/// Metrics whose series exist only once an event gave them their labels: a relay
/// without `[[sink.kafka.schemas]]` never exports [`SCHEMA_VIOLATIONS`] (its labels come
/// from the events, so no series can be made up front).
pub const EXPORTED_WHEN_SEEN: [&str; 1] = [SCHEMA_VIOLATIONS];

/// The `kind` label values of [`ROW_CHANGES`].
pub const ROW_CHANGE_KINDS: [&str; 2] = ["update", "delete"];

/// The `outcome` label values of [`TRANSACTIONS`].
pub const TRANSACTION_OUTCOMES: [&str; 2] = ["committed", "aborted"];

/// The metrics of one relay process.
pub struct Metrics {
    registry: Registry,
    pub events_published: IntCounterVec,
    pub events_dead_lettered: IntCounter,
    pub failures: IntCounterVec,
    pub batch_size: Histogram,
    pub commit_to_ack: Histogram,
    pub in_flight: IntGauge,
    pub leader: IntGauge,
    pub ready: IntGauge,
    pub backlog_rows: IntGauge,
    pub slot_lag_bytes: IntGauge,
    pub last_acked_lsn: IntGauge,
    pub last_ack_timestamp: IntGauge,
    pub reconnects: IntCounter,
    pub slots_recreated: IntCounter,
    pub transactions: IntCounterVec,
    pub events_reconciled: IntCounter,
    pub first_starts_with_history: IntCounter,
    pub publication_gap_rows: IntCounter,
    pub row_changes: IntCounterVec,
    pub schema_violations: IntCounterVec,
    pub events_held: IntCounter,
    pub parked_late: IntCounter,
    pub parked_aggregates: IntGauge,
    pub parked_events: IntGauge,
    pub oldest_parked: IntGauge,
    pub dead_letters: IntGaugeVec,
    pub paused: IntGauge,
    pub operator_actions: IntCounterVec,
    pub events_redriven: IntCounter,
    pub events_discarded: IntCounter,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let metrics = Metrics {
            events_published: IntCounterVec::new(
                Opts::new(EVENTS_PUBLISHED, "Events Kafka acknowledged, by topic."),
                &["topic"],
            )
            .unwrap(),
            events_dead_lettered: IntCounter::new(
                EVENTS_DEAD_LETTERED,
                "Poison events the dead-letter topic acknowledged.",
            )
            .unwrap(),
            failures: IntCounterVec::new(
                Opts::new(
                    FAILURES,
                    "Failures by reason: delivery, dead_letter, producer, not_attempted, postgres, stalled, aborted, fenced, checkpoint, schema_registry, topic_refuses.",
                ),
                &["reason"],
            )
            .unwrap(),
            batch_size: Histogram::with_opts(
                HistogramOpts::new(BATCH_SIZE, "Events per batch read from the source.")
                    .buckets(vec![1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0]),
            )
            .unwrap(),
            commit_to_ack: Histogram::with_opts(
                HistogramOpts::new(
                    COMMIT_TO_ACK,
                    "Seconds from the event's timestamp (created_at or commit time) to Kafka's acknowledgement.",
                )
                .buckets(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                ]),
            )
            .unwrap(),
            in_flight: IntGauge::new(IN_FLIGHT, "Events handed to Kafka and not yet acknowledged.")
                .unwrap(),
            leader: IntGauge::new(LEADER, "1 while this relay holds the outbox (lock or slot).")
                .unwrap(),
            ready: IntGauge::new(READY, "1 while /readyz answers 200.").unwrap(),
            backlog_rows: IntGauge::new(
                BACKLOG_ROWS,
                "Rows waiting in the outbox (polling mode; counted up to 1,000,000).",
            )
            .unwrap(),
            slot_lag_bytes: IntGauge::new(
                SLOT_LAG_BYTES,
                "WAL bytes the slot retains behind the server's current position (log mode).",
            )
            .unwrap(),
            last_acked_lsn: IntGauge::new(
                LAST_ACKED_LSN,
                "Last LSN reported flushed to PostgreSQL (log mode).",
            )
            .unwrap(),
            last_ack_timestamp: IntGauge::new(
                LAST_ACK_TIMESTAMP,
                "Unix time of the last acknowledgement to PostgreSQL.",
            )
            .unwrap(),
            reconnects: IntCounter::new(RECONNECTS, "Reconnections to PostgreSQL after a failure.")
                .unwrap(),
            slots_recreated: IntCounter::new(
                SLOTS_RECREATED,
                "Replication slots found invalidated or dropped and made again (on_slot_lost = recreate).",
            )
            .unwrap(),
            transactions: IntCounterVec::new(
                Opts::new(
                    TRANSACTIONS,
                    "Kafka transactions ended, by outcome: committed, aborted (exactly-once delivery).",
                ),
                &["outcome"],
            )
            .unwrap(),
            events_reconciled: IntCounter::new(
                EVENTS_RECONCILED,
                "Events found already committed to Kafka by an earlier run, acknowledged without publishing them again (exactly-once delivery).",
            )
            .unwrap(),
            first_starts_with_history: IntCounter::new(
                FIRST_STARTS_WITH_HISTORY,
                "First starts (a new slot, the outbox's rows published again) on an outbox whose slot the relay had had before: slot recreated after a loss, or forgotten by an operator.",
            )
            .unwrap(),
            publication_gap_rows: IntCounter::new(
                PUBLICATION_GAP_ROWS,
                "Outbox rows republished from the table because the publication stopped carrying the outbox for a while (log mode).",
            )
            .unwrap(),
            row_changes: IntCounterVec::new(
                Opts::new(
                    ROW_CHANGES,
                    "UPDATEs and DELETEs of outbox rows seen in the log (rows are immutable once written), by kind: update, delete. The relay's own cleanup is not counted.",
                ),
                &["kind"],
            )
            .unwrap(),
            schema_violations: IntCounterVec::new(
                Opts::new(
                    SCHEMA_VIOLATIONS,
                    "Events dead-lettered because their payload does not fit their schema, by aggregate_type and event_type.",
                ),
                &["aggregate_type", "event_type"],
            )
            .unwrap(),
            events_held: IntCounter::new(
                EVENTS_HELD,
                "Events not published because their aggregate is parked (kept in PostgreSQL, in order, until redriven or discarded).",
            )
            .unwrap(),
            parked_late: IntCounter::new(
                PARKED_LATE,
                "Aggregates parked by a refusal the broker reported after later events of the aggregate may already have been sent (they cannot be called back).",
            )
            .unwrap(),
            parked_aggregates: IntGauge::new(
                PARKED_AGGREGATES,
                "Aggregates parked now (the leader reads it from PostgreSQL every few seconds).",
            )
            .unwrap(),
            parked_events: IntGauge::new(PARKED_EVENTS, "Events held in parked aggregates' queues.")
                .unwrap(),
            oldest_parked: IntGauge::new(
                OLDEST_PARKED,
                "Seconds since the oldest parked event was kept (0 when nothing is parked).",
            )
            .unwrap(),
            dead_letters: IntGaugeVec::new(
                Opts::new(
                    DEAD_LETTERS,
                    "Dead letters kept in PostgreSQL (parked heads included), by reason: invalid, schema, too_large, refused.",
                ),
                &["reason"],
            )
            .unwrap(),
            paused: IntGauge::new(PAUSED, "1 while publishing is paused (outbox-relay pause).")
                .unwrap(),
            operator_actions: IntCounterVec::new(
                Opts::new(
                    OPERATOR_ACTIONS,
                    "Operator requests carried out by this relay, by action: redrive, discard, pause, resume.",
                ),
                &["action"],
            )
            .unwrap(),
            events_redriven: IntCounter::new(
                EVENTS_REDRIVEN,
                "Parked or dead-lettered events Kafka acknowledged on a redrive.",
            )
            .unwrap(),
            events_discarded: IntCounter::new(
                EVENTS_DISCARDED,
                "Parked or dead-lettered events an operator discarded.",
            )
            .unwrap(),
            registry,
        };
        let build = IntGaugeVec::new(
            Opts::new(BUILD_INFO, "Always 1; the labels say which build runs."),
            &["version"],
        )
        .unwrap();
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        // Known reasons start at 0, so rate() and alerts see the series from the start.
        for reason in FAILURE_REASONS {
            metrics.failures.with_label_values(&[reason]);
        }
        for outcome in TRANSACTION_OUTCOMES {
            metrics.transactions.with_label_values(&[outcome]);
        }
        for kind in ROW_CHANGE_KINDS {
            metrics.row_changes.with_label_values(&[kind]);
        }
        for reason in DEAD_LETTER_REASONS {
            metrics.dead_letters.with_label_values(&[reason]);
        }
        for action in OPERATOR_ACTION_KINDS {
            metrics.operator_actions.with_label_values(&[action]);
        }
        let r = &metrics.registry;
        for c in [
            Box::new(metrics.events_published.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(metrics.events_dead_lettered.clone()),
            Box::new(metrics.failures.clone()),
            Box::new(metrics.batch_size.clone()),
            Box::new(metrics.commit_to_ack.clone()),
            Box::new(metrics.in_flight.clone()),
            Box::new(metrics.leader.clone()),
            Box::new(metrics.ready.clone()),
            Box::new(metrics.backlog_rows.clone()),
            Box::new(metrics.slot_lag_bytes.clone()),
            Box::new(metrics.last_acked_lsn.clone()),
            Box::new(metrics.last_ack_timestamp.clone()),
            Box::new(metrics.reconnects.clone()),
            Box::new(metrics.slots_recreated.clone()),
            Box::new(metrics.transactions.clone()),
            Box::new(metrics.events_reconciled.clone()),
            Box::new(metrics.first_starts_with_history.clone()),
            Box::new(metrics.publication_gap_rows.clone()),
            Box::new(metrics.row_changes.clone()),
            Box::new(metrics.schema_violations.clone()),
            Box::new(metrics.events_held.clone()),
            Box::new(metrics.parked_late.clone()),
            Box::new(metrics.parked_aggregates.clone()),
            Box::new(metrics.parked_events.clone()),
            Box::new(metrics.oldest_parked.clone()),
            Box::new(metrics.dead_letters.clone()),
            Box::new(metrics.paused.clone()),
            Box::new(metrics.operator_actions.clone()),
            Box::new(metrics.events_redriven.clone()),
            Box::new(metrics.events_discarded.clone()),
            Box::new(build),
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        ] {
            r.register(c).expect("metric names are unique");
        }
        metrics
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let families = self.registry.gather();
        prometheus::TextEncoder::new()
            .encode_to_string(&families)
            .unwrap_or_default()
    }

    /// Records that events were acknowledged to PostgreSQL now.
    pub fn acked_now(&self) {
        self.last_ack_timestamp.set(unix_now() as i64);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Metrics and readiness, shared by all tasks of one relay.
#[derive(Clone, Default)]
pub struct Telemetry {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
}

pub(crate) fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}
