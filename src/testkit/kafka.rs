//! Kafka helpers for tests and the demo: create topics, read everything back.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// One message as read back from the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumed {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub timestamp_ms: Option<i64>,
}

impl Consumed {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    pub fn key_str(&self) -> &str {
        self.key
            .as_deref()
            .and_then(|k| std::str::from_utf8(k).ok())
            .unwrap_or("")
    }

    pub fn value_str(&self) -> &str {
        std::str::from_utf8(&self.value).unwrap_or("<binary>")
    }
}

/// Creates topics with one replica (ignoring "already exists").
pub async fn create_topics(brokers: &str, topics: &[&str], partitions: i32) -> anyhow::Result<()> {
    create_replicated_topics(brokers, topics, partitions, 1, &[]).await
}

/// Creates topics with `replicas` replicas and topic-level `settings` (ignoring "already
/// exists").
pub async fn create_replicated_topics(
    brokers: &str,
    topics: &[&str],
    partitions: i32,
    replicas: i32,
    settings: &[(&str, &str)],
) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| {
            settings.iter().fold(
                NewTopic::new(t, partitions, TopicReplication::Fixed(replicas)),
                |topic, (k, v)| topic.set(k, v),
            )
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(&new, &opts).await? {
        match result {
            Ok(_) => {}
            Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => anyhow::bail!("cannot create topic {topic}: {code}"),
        }
    }
    Ok(())
}

/// Sets one topic-level setting (e.g. raises `max.message.bytes`).
pub async fn set_topic_config(
    brokers: &str,
    topic: &str,
    key: &str,
    value: &str,
) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let alter = rdkafka::admin::AlterConfig::new(rdkafka::admin::ResourceSpecifier::Topic(topic))
        .set(key, value);
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.alter_configs(&[alter], &opts).await? {
        if let Err((_, code)) = result {
            anyhow::bail!("cannot set {key} on topic {topic}: {code}");
        }
    }
    Ok(())
}

/// A fresh metadata answer for `topic` (all topics with `None`), blocking.
fn metadata(
    brokers: &str,
    topic: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<rdkafka::metadata::Metadata> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    Ok(consumer.fetch_metadata(topic, timeout)?)
}

/// How many brokers the cluster's metadata lists (blocking).
pub fn broker_count(brokers: &str, timeout: Duration) -> anyhow::Result<usize> {
    Ok(metadata(brokers, None, timeout)?.brokers().len())
}

/// The node id leading `topic`'s `partition`, from a fresh metadata request (blocking).
pub fn partition_leader(
    brokers: &str,
    topic: &str,
    partition: i32,
    timeout: Duration,
) -> anyhow::Result<i32> {
    metadata(brokers, Some(topic), timeout)?
        .topics()
        .iter()
        .flat_map(|t| t.partitions())
        .find(|p| p.id() == partition)
        .map(|p| p.leader())
        .filter(|leader| *leader >= 0)
        .ok_or_else(|| anyhow::anyhow!("{topic}[{partition}] has no leader"))
}

/// How many of `topic`'s partitions have fewer than `replicas` in sync, or no leader
/// (blocking).
pub fn under_replicated(
    brokers: &str,
    topic: &str,
    replicas: usize,
    timeout: Duration,
) -> anyhow::Result<usize> {
    Ok(metadata(brokers, Some(topic), timeout)?
        .topics()
        .iter()
        .flat_map(|t| t.partitions())
        .filter(|p| p.leader() < 0 || p.isr().len() < replicas)
        .count())
}

/// A consumer that reads `topics` from the beginning of every partition, without a
/// consumer group (tansu makes a new group wait seconds for its first message).
pub struct Reader {
    consumer: BaseConsumer,
}

impl Reader {
    pub fn new(brokers: &str, topics: &[&str]) -> anyhow::Result<Reader> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", "outbox-relay-testkit")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            // librdkafka's default, spelled out: exactly-once tests rely on it.
            .set("isolation.level", "read_committed")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        for topic in topics {
            let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
            for t in md.topics() {
                for p in t.partitions() {
                    tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
                }
            }
        }
        consumer.assign(&tpl)?;
        Ok(Reader { consumer })
    }

    /// The next message, waiting up to `timeout`.
    pub fn next(&self, timeout: Duration) -> anyhow::Result<Option<Consumed>> {
        match self.consumer.poll(timeout) {
            None => Ok(None),
            Some(Err(e)) => Err(e.into()),
            Some(Ok(m)) => Ok(Some(Consumed {
                topic: m.topic().to_owned(),
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                value: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                headers: m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                (
                                    h.key.to_owned(),
                                    h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                timestamp_ms: m.timestamp().to_millis(),
            })),
        }
    }

    /// Reads until `count` messages arrived or `timeout` passed; returns what arrived, in
    /// arrival order (per partition that is offset order).
    pub fn read(&self, count: usize, timeout: Duration) -> anyhow::Result<Vec<Consumed>> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(count);
        let mut seen = HashSet::new();
        while out.len() < count && Instant::now() < deadline {
            // Transient consumer errors (a broker restarting) are not the end of the read.
            let next = match self.next(Duration::from_millis(100)) {
                Ok(next) => next,
                Err(e) => {
                    tracing::debug!(error = %e, "consumer error while reading back; polling on");
                    None
                }
            };
            if let Some(m) = next {
                // A reassignment can redeliver; the broker's offsets are the truth.
                if seen.insert((m.topic.clone(), m.partition, m.offset)) {
                    out.push(m);
                }
            }
        }
        Ok(out)
    }
}

/// Reads `count` messages from `topics` (blocking; call from `spawn_blocking`).
pub fn read_all(
    brokers: &str,
    topics: &[&str],
    count: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<Consumed>> {
    Reader::new(brokers, topics)?.read(count, timeout)
}
