//! The producer's settings, and handing a message to librdkafka.

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

use super::log::LogContext;
use super::{KafkaMessage, KafkaSinkConfig};

/// Producer settings the relay's guarantees rest on; `[sink.kafka.librdkafka]` is
/// applied after them and can override them (at the operator's own risk).
const PRODUCER_DEFAULTS: [(&str, &str); 10] = [
    ("enable.idempotence", "true"),
    // Retry inside librdkafka until delivered. A finite timeout lets a partition end up
    // with 1, 4, 5 after an outage (librdkafka INTRODUCTION.md, "Message timeout
    // considerations"), and re-sending 2, 3 afterwards would break per-key order.
    ("message.timeout.ms", "0"),
    ("acks", "all"),
    ("compression.type", "lz4"),
    // Java clients hash keys with murmur2: so do we, so keys land where they would.
    ("partitioner", "murmur2_random"),
    ("client.id", "outbox-relay"),
    // librdkafka's own limit (1 MB by default) would refuse a large event before the
    // broker saw it, and its dead-letter copy too. The broker's per-topic
    // `max.message.bytes` is the limit that matters: let it decide (this is
    // librdkafka's maximum).
    ("message.max.bytes", "1000000000"),
    // A broker cut off by the network keeps its sockets open and answers nothing. The
    // client's own deadline on a request (produce requests included) is
    // `socket.timeout.ms`, 60 s by default: a batch on the cut-off leader's partition
    // would hold every batch behind it (they are acknowledged in order) that long, long
    // after Kafka elected a new leader (~10 s). 10 s bounds that wait; the message is
    // then retried (idempotently: same sequence numbers) on the new leader.
    ("socket.timeout.ms", "10000"),
    ("socket.connection.setup.timeout.ms", "10000"),
    ("socket.keepalive.enable", "true"),
];

/// How long to wait before retrying an enqueue that found the local queue full.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(5);

/// The producer's settings: the brokers, the relay's defaults, then the operator's
/// `[sink.kafka.librdkafka]` over them.
pub fn producer_config(config: &KafkaSinkConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.brokers);
    for (key, value) in PRODUCER_DEFAULTS {
        client.set(key, value);
    }
    for (key, value) in &config.librdkafka {
        client.set(key, value);
    }
    client
}

/// Hands one message to librdkafka, waiting while its local queue is full: a full queue
/// is backpressure, never a failure.
// rdkafka's send hands the (large) record back with its error, by design.
#[allow(clippy::result_large_err)]
pub(crate) async fn enqueue(
    producer: &FutureProducer<LogContext>,
    msg: &KafkaMessage<'_>,
) -> Result<DeliveryFuture, KafkaError> {
    let record = FutureRecord {
        topic: &msg.topic,
        partition: None,
        payload: Some(msg.value.as_ref()),
        key: msg.key.as_deref(),
        timestamp: msg.timestamp_ms,
        headers: Some(headers_of(msg)),
    };
    offer(record, |r| producer.send_result(r)).await
}

/// Offers `record` to librdkafka through `send` until its local queue takes it.
pub(super) async fn offer<R, T>(
    mut record: R,
    mut send: impl FnMut(R) -> Result<T, (KafkaError, R)>,
) -> Result<T, KafkaError> {
    loop {
        match send(record) {
            Ok(taken) => return Ok(taken),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                tokio::time::sleep(QUEUE_FULL_PAUSE).await;
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// The message's headers, as librdkafka takes them.
pub(super) fn headers_of(msg: &KafkaMessage<'_>) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new_with_capacity(msg.headers.len());
    for (key, value) in &msg.headers {
        headers = headers.insert(Header {
            key,
            value: Some(value.as_ref()),
        });
    }
    headers
}
