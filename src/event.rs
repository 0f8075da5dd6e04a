//! The event as it travels from source to sink, independent of the capture mode.

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use bytestring::ByteString;

/// A position in PostgreSQL's write-ahead log, written as PostgreSQL writes it
/// (`16/B374D848`: the high and low 32 bits in hex).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = String;

    fn from_str(s: &str) -> Result<Lsn, String> {
        let invalid = || format!("{s:?} is not an LSN (expected hex like 16/B374D848)");
        let (hi, lo) = s.split_once('/').ok_or_else(invalid)?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| invalid())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| invalid())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

/// Where an event sits in its source: its order key, and what the source forgets on ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Position {
    /// The outbox row's `seq` (polling, and rows of the first-start snapshot).
    Seq(i64),
    /// The commit LSN of the transaction that wrote the event (log mode).
    Lsn(Lsn),
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::Seq(seq) => write!(f, "seq:{seq}"),
            Position::Lsn(lsn) => write!(f, "lsn:{lsn}"),
        }
    }
}

impl FromStr for Position {
    type Err = String;

    /// The [`Display`](fmt::Display) form back: `seq:42` or `lsn:16/B374D848`.
    fn from_str(s: &str) -> Result<Position, String> {
        if let Some(seq) = s.strip_prefix("seq:") {
            return seq
                .parse()
                .map(Position::Seq)
                .map_err(|_| format!("{s:?} is not a position (bad seq)"));
        }
        if let Some(lsn) = s.strip_prefix("lsn:") {
            return lsn.parse().map(Position::Lsn);
        }
        Err(format!(
            "{s:?} is not a position (expected seq:N or lsn:X/Y)"
        ))
    }
}

impl OutboxEvent {
    /// An event at `position` with nothing else known yet: what the sources fill in.
    pub fn blank(position: Position) -> OutboxEvent {
        OutboxEvent {
            position,
            id: None,
            aggregate_type: None,
            aggregate_id: None,
            event_type: None,
            payload: None,
            payload_is_json: true,
            headers: None,
            topic: None,
            timestamp_ms: None,
            invalid: None,
            original: None,
            redriven: false,
        }
    }

    /// Roughly the memory the event holds: what byte budgets count.
    pub fn approx_bytes(&self) -> usize {
        let text = |s: &Option<ByteString>| s.as_ref().map_or(0, |s| s.len());
        let bytes = |b: &Option<Bytes>| b.as_ref().map_or(0, Bytes::len);
        std::mem::size_of::<OutboxEvent>()
            + bytes(&self.payload)
            + bytes(&self.original)
            + text(&self.id)
            + text(&self.aggregate_type)
            + text(&self.aggregate_id)
            + text(&self.event_type)
            + text(&self.headers)
            + text(&self.topic)
            + self.invalid.as_ref().map_or(0, String::len)
    }
}

/// One outbox event, exactly as stored.
///
/// Fields are optional because a malformed row must still travel: the sink maps a
/// complete event to its Kafka message, and an incomplete one to the dead-letter topic
/// with whatever it has. Nothing is dropped on the way.
///
/// Text and bytes are [`ByteString`] and [`Bytes`]: in log mode they are slices of the
/// buffer the replication stream was read into, so decoding a row copies none of its
/// columns (a slice keeps its part of that buffer alive until the event is dropped,
/// which happens once Kafka acknowledged it: memory stays bounded by what is in flight).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEvent {
    pub position: Position,
    /// The event id (`id` header, the consumers' dedupe key).
    pub id: Option<ByteString>,
    pub aggregate_type: Option<ByteString>,
    /// The Kafka key: one aggregate, one partition, one order.
    pub aggregate_id: Option<ByteString>,
    pub event_type: Option<ByteString>,
    /// The message value, byte for byte as stored (jsonb text, or raw `bytea`).
    pub payload: Option<Bytes>,
    /// Whether `payload` is JSON text (jsonb/json) rather than opaque bytes.
    pub payload_is_json: bool,
    /// The `headers` column's JSON text: an object whose keys become Kafka headers.
    pub headers: Option<ByteString>,
    /// Per-row topic override, from the optional topic column.
    pub topic: Option<ByteString>,
    /// Milliseconds since the Unix epoch: `created_at` or the commit time.
    pub timestamp_ms: Option<i64>,
    /// Set when the source already knows the event is poison (e.g. a logical message
    /// whose envelope is not valid JSON): the reason, for the dead-letter topic.
    pub invalid: Option<String>,
    /// The event's bytes as the source received them, when they differ from `payload`
    /// (a logical message's whole envelope): what the dead-letter topic gets.
    pub original: Option<Bytes>,
    /// Published again by an operator from the parked or dead-letter queue
    /// (`dead-letters redrive`): the message carries a `redriven` header, and its
    /// position is an old one that no checkpoint may move back to.
    pub redriven: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_round_trip_in_postgres_notation() {
        assert_eq!("16/B374D848".parse(), Ok(Lsn(0x16_B374_D848)));
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!(Lsn(0).to_string(), "0/0");
        assert_eq!(Position::Lsn(Lsn(0x1_0000_0002)).to_string(), "lsn:1/2");
        for bad in ["nonsense", "1/", "/1", "1/2/3", "G/1", "100000000/0"] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn positions_round_trip_through_their_text() {
        for p in [
            Position::Seq(0),
            Position::Seq(i64::MAX),
            Position::Seq(-3),
            Position::Lsn(Lsn(0x16_B374_D848)),
        ] {
            assert_eq!(p.to_string().parse(), Ok(p));
        }
        for bad in ["", "seq:", "seq:x", "lsn:1", "LSN:1/2", "42", "seq:1.5"] {
            assert!(bad.parse::<Position>().is_err(), "{bad} parsed");
        }
    }
}
