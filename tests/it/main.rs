//! Integration tests against real parts: an ephemeral PostgreSQL cluster and a tansu
//! broker process per test (see `outbox_relay::testkit`), or librdkafka's mock cluster
//! where faults must be injected. One module per feature; each reads as a spec.

mod support;
mod tls;

mod bad_rows;
mod broker_faults;
mod cli;
mod debian_package;
mod deploy;
mod docs;
mod exactly_once;
mod failover;
mod faults;
mod kafka_sink;
mod logical;
mod logical_process;
mod network;
mod observability;
mod operator_changes;
mod operator_edges;
mod packaging;
mod parking;
mod partitioned;
mod partitions;
mod polling;
mod process;
mod refusals;
mod schema_access;
mod schema_gate;
mod schemas;
mod secrets;
mod shards;
mod slot_lost;
