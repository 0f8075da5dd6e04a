//! Where events go. One sink today: Kafka.

pub mod kafka;
