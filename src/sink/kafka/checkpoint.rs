//! The checkpoint topic: where each outbox's last committed source position lives.
//!
//! In exactly-once delivery every Kafka transaction carries, beside the batch's
//! messages, one record keyed by the outbox's transactional id whose value says how far
//! the outbox got: the last event's position and how many events at that position
//! were published. The record commits or aborts with the messages, so "the last
//! committed checkpoint" and "what consumers can read" never disagree. A relay that
//! starts (or takes over) reads it back, and events it covers are acknowledged to
//! PostgreSQL without being published again: a crash between Kafka's commit and
//! PostgreSQL's acknowledgement then repeats nothing.
//!
//! The count matters in log mode, where every event of a PostgreSQL transaction shares
//! its commit LSN: a batch may end in the middle of one, and "the first 6 events at
//! LSN X" is what lets a restart skip exactly those.

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

use super::{KafkaSinkConfig, SinkError};
use crate::event::{OutboxEvent, Position};

/// How far an outbox got: every event before `position`, and the first `count` events
/// at `position`, are in Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    pub position: Position,
    pub count: u64,
}

impl Checkpoint {
    /// The checkpoint after `events`, published in this order after `from`.
    pub fn advance<'a>(
        from: Option<Checkpoint>,
        events: impl IntoIterator<Item = &'a OutboxEvent>,
    ) -> Option<Checkpoint> {
        events.into_iter().fold(from, |cp, event| match cp {
            Some(c) if c.position == event.position => Some(Checkpoint {
                count: c.count + 1,
                ..c
            }),
            _ => Some(Checkpoint {
                position: event.position,
                count: 1,
            }),
        })
    }

    /// The record's value. `epoch` names the incarnation of the source (the outbox
    /// table's OID in polling mode): a checkpoint of another incarnation is ignored.
    pub fn encode(&self, epoch: &str) -> Vec<u8> {
        serde_json::json!({
            "position": self.position.to_string(),
            "count": self.count,
            "epoch": epoch,
        })
        .to_string()
        .into_bytes()
    }

    /// The checkpoint a record holds, if it is one of `epoch`'s.
    pub fn decode(value: &[u8], epoch: &str) -> Result<Option<Checkpoint>, String> {
        #[derive(serde::Deserialize)]
        struct Record {
            position: String,
            count: u64,
            epoch: String,
        }
        let record: Record =
            serde_json::from_slice(value).map_err(|e| format!("not a checkpoint record: {e}"))?;
        if record.epoch != epoch {
            return Ok(None);
        }
        Ok(Some(Checkpoint {
            position: record.position.parse()?,
            count: record.count,
        }))
    }
}

/// Skips, at the start of a run, the events an earlier run already committed.
///
/// Only a prefix of the stream can be covered: the first event the checkpoint does not
/// cover ends the skipping for good, so a late event can never be mistaken for an old
/// one further on. Positions of different kinds never cover each other: after a slot
/// was made again, log mode publishes the table's rows (`seq` positions) before the new
/// stream, and a checkpoint with an LSN says nothing about them.
#[derive(Debug, Default)]
pub struct Resume {
    checkpoint: Option<Checkpoint>,
    seen_at_position: u64,
}

impl Resume {
    pub fn from(checkpoint: Option<Checkpoint>) -> Resume {
        Resume {
            checkpoint,
            seen_at_position: 0,
        }
    }

    /// How many of `events`, from the first, the checkpoint covers.
    pub fn covered(&mut self, events: &[OutboxEvent]) -> usize {
        let mut covered = 0;
        for event in events {
            let Some(cp) = self.checkpoint else { break };
            let same_kind = matches!(
                (event.position, cp.position),
                (Position::Seq(_), Position::Seq(_)) | (Position::Lsn(_), Position::Lsn(_))
            );
            let is_covered = same_kind
                && (event.position < cp.position
                    || (event.position == cp.position && {
                        self.seen_at_position += 1;
                        self.seen_at_position <= cp.count
                    }));
            if !is_covered {
                self.checkpoint = None;
                break;
            }
            covered += 1;
        }
        covered
    }
}

/// The reader's context: the end of a partition is how the reader knows it is done,
/// not an error worth a log line (librdkafka reports it as one). Other reports go
/// through the relay's rate limit ([`super::log`]).
struct Reader;

impl ClientContext for Reader {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        super::log::log("checkpoint reader", level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // The end of a partition is what the reader looks for, not a problem; librdkafka
        // reports it through this callback as a global error as well.
        let end = matches!(
            error,
            KafkaError::PartitionEOF(_)
                | KafkaError::Global(rdkafka::types::RDKafkaErrorCode::PartitionEOF)
        );
        if !end {
            super::log::error("checkpoint reader", tracing::Level::WARN, &error, reason);
        }
    }
}

impl ConsumerContext for Reader {}

/// A client configuration for the checkpoint topic's admin and reader: the brokers and
/// the operator's connection properties (TLS, SASL) of `[sink.kafka.librdkafka]`.
fn client(config: &KafkaSinkConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.brokers);
    for (key, value) in &config.librdkafka {
        let connection = [
            "security.",
            "ssl.",
            "sasl.",
            "client.",
            "socket.",
            "broker.",
        ]
        .iter()
        .any(|prefix| key.starts_with(prefix));
        if connection {
            client.set(key, value);
        }
    }
    client
}

/// Creates the checkpoint topic (compacted, one partition) unless it exists.
pub async fn ensure_topic(config: &KafkaSinkConfig, timeout: Duration) -> Result<(), SinkError> {
    let topic = &config.checkpoint_topic;
    let failed = |e: KafkaError| SinkError::Checkpoint {
        topic: topic.clone(),
        reason: format!(
            "cannot create it: {e} (create it yourself, compacted: \
             cleanup.policy=compact, or allow the relay's principal to create topics)"
        ),
    };
    let admin: AdminClient<_> = client(config)
        .create_with_context(super::log::LogContext::new("checkpoint admin"))
        .map_err(failed)?;
    let new = NewTopic::new(topic, 1, TopicReplication::Fixed(-1)).set("cleanup.policy", "compact");
    let options = AdminOptions::new().operation_timeout(Some(timeout));
    let results = admin
        .create_topics([&new], &options)
        .await
        .map_err(failed)?;
    for result in results {
        match result {
            Ok(_) => tracing::info!(%topic, "created the checkpoint topic (compacted)"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            // Not allowed to create is fine when it exists: the reader will tell.
            Err((_, RDKafkaErrorCode::TopicAuthorizationFailed))
            | Err((_, RDKafkaErrorCode::ClusterAuthorizationFailed)) => {}
            Err((_, code)) => return Err(failed(KafkaError::AdminOp(code))),
        }
    }
    Ok(())
}

/// Reads the last committed checkpoint under `key` (blocking: run it off the runtime).
///
/// The topic is compacted, but not at once: it may hold one record per batch since the
/// last compaction. So it is read backwards in growing windows from its end, and the
/// first window that holds a record of `key` answers. With `read_committed`, records of
/// an aborted (or still open) transaction are never seen.
pub fn read_last(
    config: &KafkaSinkConfig,
    key: &str,
    epoch: &str,
    timeout: Duration,
) -> Result<Option<Checkpoint>, SinkError> {
    let topic = &config.checkpoint_topic;
    let failed = |reason: String| SinkError::Checkpoint {
        topic: topic.clone(),
        reason,
    };
    let consumer: BaseConsumer<Reader> = client(config)
        .set("group.id", "outbox-relay-checkpoint-reader")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create_with_context(Reader)
        .map_err(|e| failed(format!("cannot create its reader: {e}")))?;
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| failed(format!("cannot read its metadata: {e}")))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(failed(
            "it does not exist (the relay could not create it): create it, compacted".into(),
        ));
    }
    let deadline = Instant::now() + timeout;
    let mut found: Option<Checkpoint> = None;
    for partition in partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, timeout)
            .map_err(|e| failed(format!("cannot read partition {partition}'s offsets: {e}")))?;
        let (mut end, mut window) = (high, 64);
        while end > low {
            let start = (end - window).max(low);
            let last = read_window(
                &consumer, topic, partition, start, end, key, epoch, deadline,
            )
            .map_err(failed)?;
            if let Some(cp) = last {
                // Several partitions only when the operator made the topic so: the
                // furthest checkpoint is the newest.
                if found.is_none_or(|f| (f.position, f.count) < (cp.position, cp.count)) {
                    found = Some(cp);
                }
                break;
            }
            end = start;
            window = window.saturating_mul(8);
        }
    }
    Ok(found)
}

/// The last checkpoint of `key` in `[start, end)` of one partition.
#[allow(clippy::too_many_arguments)]
fn read_window(
    consumer: &BaseConsumer<Reader>,
    topic: &str,
    partition: i32,
    start: i64,
    end: i64,
    key: &str,
    epoch: &str,
    deadline: Instant,
) -> Result<Option<Checkpoint>, String> {
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, partition, Offset::Offset(start))
        .map_err(|e| e.to_string())?;
    consumer.assign(&assignment).map_err(|e| e.to_string())?;
    let mut last = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "reading partition {partition} from offset {start} took too long"
            ));
        }
        match consumer.poll(left.min(Duration::from_millis(500))) {
            None => continue,
            Some(Err(KafkaError::PartitionEOF(_))) => return Ok(last),
            Some(Err(e)) => return Err(format!("cannot read partition {partition}: {e}")),
            Some(Ok(msg)) => {
                if msg.key() == Some(key.as_bytes()) {
                    match msg.payload().map(|v| Checkpoint::decode(v, epoch)) {
                        Some(Ok(Some(cp))) => last = Some(cp),
                        Some(Ok(None)) => {}
                        // A tombstone ends what came before: nothing to resume from.
                        None => last = None,
                        Some(Err(e)) => {
                            return Err(format!("offset {}: {e}", msg.offset()));
                        }
                    }
                }
                if msg.offset() + 1 >= end {
                    return Ok(last);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Lsn;

    fn at(position: Position) -> OutboxEvent {
        OutboxEvent::blank(position)
    }

    fn lsn(n: u64) -> Position {
        Position::Lsn(Lsn(n))
    }

    #[test]
    fn a_checkpoint_counts_the_events_at_its_position_across_batches() {
        let first = [at(lsn(10)), at(lsn(20)), at(lsn(20))];
        let cp = Checkpoint::advance(None, &first);
        assert_eq!(
            cp,
            Some(Checkpoint {
                position: lsn(20),
                count: 2
            })
        );
        let cp = Checkpoint::advance(cp, &[at(lsn(20))]);
        assert_eq!(
            cp,
            Some(Checkpoint {
                position: lsn(20),
                count: 3
            })
        );
        let cp = Checkpoint::advance(cp, &[at(lsn(30))]);
        assert_eq!(
            cp,
            Some(Checkpoint {
                position: lsn(30),
                count: 1
            })
        );
        assert_eq!(Checkpoint::advance(cp, &[]), cp);
    }

    #[test]
    fn records_round_trip_and_another_epoch_is_ignored() {
        for cp in [
            Checkpoint {
                position: Position::Seq(41),
                count: 1,
            },
            Checkpoint {
                position: lsn(0x16_B374_D848),
                count: 7,
            },
        ] {
            let value = cp.encode("16384");
            assert_eq!(Checkpoint::decode(&value, "16384"), Ok(Some(cp)));
            assert_eq!(Checkpoint::decode(&value, "16999"), Ok(None));
        }
        for bad in [
            &b"{}"[..],
            b"not json",
            br#"{"position":"x","count":1,"epoch":""}"#,
        ] {
            assert!(Checkpoint::decode(bad, "").is_err());
        }
    }

    #[test]
    fn resume_skips_the_covered_prefix_and_nothing_after_it() {
        // The first 2 of 3 events of the transaction at LSN 20 were committed.
        let cp = Checkpoint {
            position: lsn(20),
            count: 2,
        };
        let mut resume = Resume::from(Some(cp));
        assert_eq!(resume.covered(&[at(lsn(10)), at(lsn(20))]), 2);
        assert_eq!(resume.covered(&[at(lsn(20)), at(lsn(20)), at(lsn(30))]), 1);
        // Done for good: an old-looking event later on is published.
        assert_eq!(resume.covered(&[at(lsn(5))]), 0);

        let mut resume = Resume::from(Some(Checkpoint {
            position: Position::Seq(9),
            count: 1,
        }));
        assert_eq!(
            resume.covered(&[
                at(Position::Seq(3)),
                at(Position::Seq(9)),
                at(Position::Seq(10))
            ]),
            2
        );

        // Positions of another kind are never covered.
        let mut resume = Resume::from(Some(cp));
        assert_eq!(resume.covered(&[at(Position::Seq(1)), at(lsn(10))]), 0);
        let mut resume = Resume::from(Some(Checkpoint {
            position: Position::Seq(9),
            count: 1,
        }));
        assert_eq!(resume.covered(&[at(lsn(1))]), 0);

        assert_eq!(Resume::from(None).covered(&[at(lsn(1))]), 0);
    }
}
