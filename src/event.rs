//! The event as it travels from source to sink, independent of the capture mode.

use std::fmt;

/// Where an event sits in its source: its order key, and what the source forgets on ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Position {
    /// The outbox row's `seq` (polling, and rows of the first-start snapshot).
    Seq(i64),
    /// The commit LSN of the transaction that wrote the event (log mode).
    Lsn(u64),
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::Seq(seq) => write!(f, "seq:{seq}"),
            Position::Lsn(lsn) => write!(f, "lsn:{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF),
        }
    }
}

/// One outbox event, exactly as stored.
///
/// Fields are optional because a malformed row must still travel: the sink maps a
/// complete event to its Kafka message, and an incomplete one to the dead-letter topic
/// with whatever it has. Nothing is dropped on the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEvent {
    pub position: Position,
    /// The event id (`id` header, the consumers' dedupe key).
    pub id: Option<String>,
    pub aggregate_type: Option<String>,
    /// The Kafka key: one aggregate, one partition, one order.
    pub aggregate_id: Option<String>,
    pub event_type: Option<String>,
    /// The message value, byte for byte as stored (jsonb text, or raw `bytea`).
    pub payload: Option<Vec<u8>>,
    /// Whether `payload` is JSON text (jsonb/json) rather than opaque bytes.
    pub payload_is_json: bool,
    /// The `headers` column's JSON text: an object whose keys become Kafka headers.
    pub headers: Option<String>,
    /// Per-row topic override, from the optional topic column.
    pub topic: Option<String>,
    /// Milliseconds since the Unix epoch: `created_at` or the commit time.
    pub timestamp_ms: Option<i64>,
    /// Set when the source already knows the event is poison (e.g. a logical message
    /// whose envelope is not valid JSON): the reason, for the dead-letter topic.
    pub invalid: Option<String>,
    /// The event's bytes as the source received them, when they differ from `payload`
    /// (a logical message's whole envelope): what the dead-letter topic gets.
    pub original: Option<Vec<u8>>,
}
