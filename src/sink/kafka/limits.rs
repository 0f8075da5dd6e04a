//! Topics' `max.message.bytes`, read from the brokers, so that an event too large for its
//! topic is known *before* it is sent.
//!
//! A refusal the broker reports comes after the events behind it were handed over: with
//! parking, an aggregate's later events would already be on their way. Checking the size
//! first makes the common case exact. The broker checks a record batch (61 bytes of
//! header, then the records, compressed when the producer compresses); the relay knows
//! that size exactly without compression, and closely enough with lz4 (the default) by
//! compressing the record itself. With another codec a large event may only be judged by
//! the broker (then its aggregate parks late; see the dead-letters page).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;

use super::message::KafkaMessage;

/// How long a topic's limit is trusted before it is read again (in the background:
/// only a topic's first event waits for the answer).
const FRESH_FOR: Duration = Duration::from_secs(60);
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(5);
/// A v2 record batch's fixed header.
const BATCH_HEADER: usize = 61;
/// What an lz4 frame adds to the compressed block (header, block size, end mark), at
/// most.
const LZ4_FRAME: usize = 19 + 4 + 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    None,
    Lz4,
    /// gzip, snappy, zstd: the compressed size is not estimated.
    Other,
}

impl Codec {
    /// The producer's codec, from its settings (`compression.type` or its alias).
    pub fn of(client: &ClientConfig) -> Codec {
        let name = client
            .get("compression.type")
            .or_else(|| client.get("compression.codec"))
            .unwrap_or("none");
        match name {
            "none" => Codec::None,
            "lz4" => Codec::Lz4,
            _ => Codec::Other,
        }
    }
}

/// What the size check says of a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send it with the others.
    Batch,
    /// Its topic takes less than the producer's `batch.size`: a shared produce request
    /// could be refused for the sum of small events, so the topic's events go one per
    /// request from its first event on (deciding that later would let earlier events,
    /// still in the other producer's queue, be overtaken).
    Alone,
    /// Certainly larger than its topic takes: poison, with the reason.
    TooLarge(String),
}

/// librdkafka's default `batch.size`.
const DEFAULT_BATCH_SIZE: usize = 1_000_000;

pub struct TopicLimits {
    client: ClientConfig,
    codec: Codec,
    /// The producer's `batch.size`: what one produce request may carry per partition.
    batch_size: usize,
    admin: Admin,
    known: Arc<Mutex<Known>>,
}

/// The admin client, made at the first topic's read (none when it cannot be made).
type Admin = Arc<OnceLock<Option<AdminClient<DefaultClientContext>>>>;

/// What was read of each topic.
#[derive(Default)]
struct Known {
    topics: HashMap<String, Entry>,
    /// Counts [`TopicLimits::forget`]s: a refresh begun before one must not bring back
    /// what it forgot.
    generation: u64,
}

struct Entry {
    /// `None`: unknown (sizes are judged by the broker).
    limit: Option<usize>,
    read_at: Instant,
    refreshing: bool,
}

/// The limits as one batch sees them: a topic's limit is looked up once per run of its
/// events (a batch renders each topic once, so a run shares one `Arc`), not per event —
/// the lookup is a lock, a hash of the name and a clock read.
pub struct BatchLimits<'a> {
    limits: &'a TopicLimits,
    last: Option<(Arc<str>, Option<usize>)>,
}

impl BatchLimits<'_> {
    /// How `msg` goes out: with the others, alone, or not at all (too large).
    pub async fn check(&mut self, msg: &KafkaMessage<'_>) -> Verdict {
        let limit = match &self.last {
            Some((topic, limit)) if Arc::ptr_eq(topic, &msg.topic) => *limit,
            _ => {
                let limit = self.limits.limit(&msg.topic).await;
                self.last = Some((msg.topic.clone(), limit));
                limit
            }
        };
        self.limits.verdict(msg, limit)
    }
}

impl TopicLimits {
    pub fn new(client: &ClientConfig) -> TopicLimits {
        TopicLimits {
            client: client.clone(),
            codec: Codec::of(client),
            batch_size: client
                .get("batch.size")
                .and_then(|v| v.parse().ok())
                .unwrap_or(DEFAULT_BATCH_SIZE),
            admin: Arc::new(OnceLock::new()),
            known: Arc::new(Mutex::new(Known::default())),
        }
    }

    /// Forgets what was read (an operator raised a limit and redrives).
    pub fn forget(&self) {
        let mut known = self.known.lock().unwrap();
        known.topics.clear();
        known.generation += 1;
    }

    /// A batch's view of the limits (see [`BatchLimits`]).
    pub fn for_batch(&self) -> BatchLimits<'_> {
        BatchLimits {
            limits: self,
            last: None,
        }
    }

    /// How `msg` goes out, given its topic's limit: with the others, alone, or not at
    /// all (too large).
    fn verdict(&self, msg: &KafkaMessage<'_>, limit: Option<usize>) -> Verdict {
        let Some(limit) = limit else {
            return Verdict::Batch;
        };
        let raw = BATCH_HEADER + record_size(msg);
        if raw > limit {
            let size = match self.codec {
                Codec::None => Some(raw),
                Codec::Lz4 => Some(BATCH_HEADER + LZ4_FRAME + lz4_size(msg)),
                Codec::Other => None,
            };
            if let Some(size) = size.filter(|s| *s > limit) {
                return Verdict::TooLarge(format!(
                    "the message is {size} bytes as the broker would see it, above topic {}'s \
                     max.message.bytes ({limit}): raise the topic's limit, then redrive",
                    msg.topic
                ));
            }
        }
        if limit < self.batch_size {
            Verdict::Alone
        } else {
            Verdict::Batch
        }
    }

    /// A topic's limit. Only its first event waits for the broker's answer (up to
    /// DESCRIBE_TIMEOUT); later reads happen in the background while the last answer
    /// holds, so the pipeline never stalls on a refresh (and, stalled, would not notice
    /// a lost PostgreSQL either).
    async fn limit(&self, topic: &str) -> Option<usize> {
        let generation = {
            let mut known = self.known.lock().unwrap();
            let generation = known.generation;
            if let Some(entry) = known.topics.get_mut(topic) {
                if entry.read_at.elapsed() >= FRESH_FOR && !entry.refreshing {
                    entry.refreshing = true;
                    let (admin, known) = (self.admin.clone(), self.known.clone());
                    let (client, topic) = (self.client.clone(), topic.to_owned());
                    tokio::spawn(async move {
                        let limit = describe(&admin, &client, &topic).await;
                        remember(&known, generation, topic, limit);
                    });
                }
                return entry.limit;
            }
            generation
        };
        let limit = describe(&self.admin, &self.client, topic).await;
        remember(&self.known, generation, topic.to_owned(), limit);
        limit
    }
}

/// Records what was read, unless a `forget` came in between.
fn remember(known: &Mutex<Known>, generation: u64, topic: String, limit: Option<usize>) {
    let mut known = known.lock().unwrap();
    if known.generation == generation {
        let entry = Entry {
            limit,
            read_at: Instant::now(),
            refreshing: false,
        };
        known.topics.insert(topic, entry);
    }
}

async fn describe(admin: &Admin, client: &ClientConfig, topic: &str) -> Option<usize> {
    let admin_client = admin
            .get_or_init(|| match client.create::<AdminClient<_>>() {
                Ok(admin) => Some(admin),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot create a Kafka admin client to read topics' max.message.bytes: sizes are judged by the broker only");
                    None
                }
            })
            .as_ref()?;
    // One timeout for both requests: a topic's first event waits at most DESCRIBE_TIMEOUT.
    let deadline = Instant::now() + DESCRIBE_TIMEOUT;
    let broker = serving_broker(admin, topic).await;
    let left = deadline.saturating_duration_since(Instant::now());
    let options = AdminOptions::new()
        .request_timeout(Some(left.max(Duration::from_millis(1))))
        .broker_id(broker);
    let answer = admin_client
        .describe_configs(&[ResourceSpecifier::Topic(topic)], &options)
        .await;
    let found = match answer.as_deref() {
        Ok([Ok(resource)]) => resource
            .get("max.message.bytes")
            .and_then(|e| e.value.as_deref())
            .and_then(|v| v.parse().ok()),
        _ => None,
    };
    if found.is_none() {
        // A topic not created yet (auto-creation), or no DescribeConfigs right.
        tracing::debug!(topic, answer = ?answer.map(|_| ()), "topic's max.message.bytes unknown: its events' sizes are judged by the broker");
    }
    found
}

/// The broker to ask for `topic`'s configuration: its first partition's leader, else any
/// broker the cluster lists; `None` (the controller, librdkafka's choice) when the
/// metadata cannot be read. Any broker answers for a topic's configuration, and Kafka's own
/// admin client asks the least loaded one; librdkafka asks the controller, so while the
/// controller is unknown or unreachable (an election, a partition; librdkafka's mock
/// cluster names none) a topic's first event would wait the whole timeout.
async fn serving_broker(admin: &Admin, topic: &str) -> Option<i32> {
    let (admin, topic) = (admin.clone(), topic.to_owned());
    // librdkafka's metadata call blocks its caller.
    tokio::task::spawn_blocking(move || {
        let admin = admin.get()?.as_ref()?;
        let metadata = admin
            .inner()
            .fetch_metadata(Some(&topic), DESCRIBE_TIMEOUT)
            .ok()?;
        let leader = metadata
            .topics()
            .first()
            .and_then(|t| t.partitions().first())
            .map(|p| p.leader())
            .filter(|id| *id >= 0);
        leader.or_else(|| metadata.brokers().first().map(|b| b.id()))
    })
    .await
    .ok()
    .flatten()
}

/// Bytes of a zig-zag varint.
fn varint_len(n: i64) -> usize {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    let mut len = 1;
    while z >= 0x80 {
        z >>= 7;
        len += 1;
    }
    len
}

fn field_len(bytes: Option<usize>) -> usize {
    match bytes {
        Some(n) => varint_len(n as i64) + n,
        None => varint_len(-1),
    }
}

/// The record's size in a v2 batch, as its first record (deltas 0).
pub fn record_size(msg: &KafkaMessage<'_>) -> usize {
    let headers: usize = msg
        .headers
        .iter()
        .map(|(k, v)| field_len(Some(k.len())) + field_len(Some(v.len())))
        .sum();
    let body = 1 // attributes
        + varint_len(0) // timestamp delta
        + varint_len(0) // offset delta
        + field_len(msg.key.as_ref().map(|k| k.len()))
        + field_len(Some(msg.value.len()))
        + varint_len(msg.headers.len() as i64)
        + headers;
    varint_len(body as i64) + body
}

/// The record's bytes compressed with lz4, about as librdkafka would.
fn lz4_size(msg: &KafkaMessage<'_>) -> usize {
    let mut bytes = Vec::with_capacity(record_size(msg));
    bytes.extend_from_slice(msg.key.as_deref().unwrap_or_default());
    bytes.extend_from_slice(&msg.value);
    for (k, v) in &msg.headers {
        bytes.extend_from_slice(k.as_bytes());
        bytes.extend_from_slice(v);
    }
    // The framing varints (a few bytes each) compress poorly: count them as they are.
    let framing = record_size(msg) - bytes.len();
    lz4_flex::block::compress(&bytes).len() + framing
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    fn msg(value: Vec<u8>) -> KafkaMessage<'static> {
        KafkaMessage {
            topic: "t".into(),
            key: Some(Cow::Borrowed(b"K")),
            value: Cow::Owned(value),
            headers: vec![(Cow::Borrowed("id"), Cow::Borrowed(b"e-1"))],
            timestamp_ms: None,
        }
    }

    #[test]
    fn varints_are_zig_zag() {
        assert_eq!(varint_len(0), 1);
        assert_eq!(varint_len(-1), 1);
        assert_eq!(varint_len(63), 1);
        assert_eq!(varint_len(64), 2);
        assert_eq!(varint_len(8191), 2);
        assert_eq!(varint_len(8192), 3);
    }

    #[test]
    fn a_record_counts_its_framing() {
        // attributes 1, deltas 2, key 1+1, value 2+200, one header (1+2)+(1+3), count 1
        let m = msg(vec![7; 200]);
        assert_eq!(record_size(&m), 2 + 1 + 2 + 2 + 202 + 1 + 7);
    }

    #[test]
    fn lz4_shrinks_what_repeats_and_not_what_is_random() {
        let repeated = msg(vec![b'a'; 20_000]);
        assert!(lz4_size(&repeated) < 500);
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let random: Vec<u8> = (0..20_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(lz4_size(&msg(random)) > 20_000);
    }

    /// librdkafka's mock cluster names a controller no broker is (id 0) and does not
    /// answer DescribeConfigs: asked of the topic's leader, the limit reads as unknown at
    /// once, where waiting for the controller took the whole timeout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_limit_is_asked_of_a_broker_serving_the_topic() {
        let cluster = rdkafka::mocking::MockCluster::new(2).unwrap();
        cluster.create_topic("t", 1, 1).unwrap();
        let mut client = ClientConfig::new();
        client.set("bootstrap.servers", cluster.bootstrap_servers());
        let limits = TopicLimits::new(&client);
        let started = Instant::now();
        assert_eq!(limits.limit("t").await, None);
        let waited = started.elapsed();
        assert!(waited < DESCRIBE_TIMEOUT / 2, "waited {waited:?}");
        let leader = serving_broker(&limits.admin, "t").await;
        assert!(matches!(leader, Some(1 | 2)), "{leader:?}");
    }

    #[test]
    fn the_codec_comes_from_the_settings() {
        let mut c = ClientConfig::new();
        assert_eq!(Codec::of(&c), Codec::None);
        c.set("compression.type", "lz4");
        assert_eq!(Codec::of(&c), Codec::Lz4);
        c.set("compression.type", "zstd");
        assert_eq!(Codec::of(&c), Codec::Other);
    }
}
