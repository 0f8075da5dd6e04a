//! # outbox-relay
//!
//! Relays a PostgreSQL transactional outbox to Kafka. A service writes its business
//! change and an event row in one local transaction; this crate guarantees the event
//! reaches Kafka — never lost, in order per aggregate — with no distributed transaction.
//!
//! The modules follow one event's path:
//!
//! * [`source`] — where events come from: [`source::polling`] reads rows in `seq` order
//!   (and explains the visibility rule that keeps per-aggregate order), `logical` tails
//!   the write-ahead log.
//! * [`relay`] — the loop: batch, publish, acknowledge only what Kafka acknowledged.
//! * [`sink::kafka`] — maps an [`event::OutboxEvent`] to its Kafka message
//!   ([`sink::kafka::message`]) and produces it with an idempotent producer.
//!
//! Around them: [`config`] (TOML + environment, validated with every problem named),
//! [`cli`] (the `outbox-relay` commands), and, with the `testkit` feature, `testkit`
//! (ephemeral PostgreSQL and Kafka-protocol broker processes for tests, the demo and
//! benchmarks).

mod backoff;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod event;
pub mod http;
pub mod metrics;
pub mod relay;
pub mod sink;
pub mod source;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use daemon::run;

/// The SQL the project ships in `sql/`, in the order to apply it.
pub const SETUP_SQL: [(&str, &str); 6] = [
    ("sql/001_outbox.sql", include_str!("../sql/001_outbox.sql")),
    (
        "sql/002_publication.sql",
        include_str!("../sql/002_publication.sql"),
    ),
    (
        "sql/003_relay_role.sql",
        include_str!("../sql/003_relay_role.sql"),
    ),
    (
        "sql/004_dead_letter.sql",
        include_str!("../sql/004_dead_letter.sql"),
    ),
    (
        "sql/005_relay_state.sql",
        include_str!("../sql/005_relay_state.sql"),
    ),
    (
        "sql/006_parking.sql",
        include_str!("../sql/006_parking.sql"),
    ),
];
