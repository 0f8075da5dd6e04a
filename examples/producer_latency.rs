//! librdkafka alone, with the relay's producer settings, through a proxy that delays
//! every chunk each way: the CPU its threads spend per message at each delay. Written to
//! measure the busy loop that `vendor/idempotent-window-spin.patch` removes (an
//! idempotent producer with a full in-flight window spun on `poll()` until the broker
//! answered); see vendor/README.md.
//!
//! ```sh
//! cargo run --release --example producer_latency -- 0 3 10            # delays in ms
//! cargo run --release --example producer_latency -- 10 linger.ms=20   # and librdkafka settings
//! ```

use std::time::{Duration, Instant};

use outbox_relay::testkit::apache_kafka::{Kafka, KafkaOptions};
use outbox_relay::testkit::cpu::producer_threads_cpu;
use outbox_relay::testkit::proxy::{Fault, Proxy};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

const MESSAGES: usize = 200_000;
const TOPIC: &str = "latency";

#[tokio::main]
async fn main() {
    let mut delays = Vec::new();
    let mut settings = Vec::new();
    for arg in std::env::args().skip(1) {
        match arg.split_once('=') {
            Some((key, value)) => settings.push((key.to_owned(), value.to_owned())),
            None => delays.push(arg.parse::<u64>().expect("a delay in ms, or key=value")),
        }
    }
    if delays.is_empty() {
        delays = vec![0, 3, 10];
    }

    // The broker advertises the proxy's port, so every connection goes through it.
    let proxy = Proxy::start(None).expect("proxy");
    let kafka = Kafka::start_with(KafkaOptions {
        advertised_ports: vec![proxy.port()],
        ..KafkaOptions::default()
    })
    .expect("Apache Kafka (scripts/install)");
    proxy.set_upstream(([127, 0, 0, 1], kafka.proxied_port(0).expect("proxied")).into());
    let brokers = format!("127.0.0.1:{}", proxy.port());
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .expect("admin client");
    admin
        .create_topics(
            &[NewTopic::new(TOPIC, 4, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .expect("topic");

    let config = outbox_relay::config::from_value(serde_json::json!({
        "source": {"mode": "logical", "database_url": "postgres://u@h/db"},
        "sink": {"kafka": {"brokers": brokers}},
    }))
    .unwrap_or_else(|p| panic!("{p}"));
    let mut client = outbox_relay::sink::kafka::producer_config(&config.sink);
    for (key, value) in &settings {
        client.set(key, value);
    }
    let producer: ThreadedProducer<DefaultProducerContext> = client.create().expect("producer");

    // Made beforehand: this thread's CPU counts (it is the one calling librdkafka).
    let messages: Vec<(String, String)> = (0..MESSAGES)
        .map(|i| {
            (
                format!("00000000-0000-0000-0000-{i:012}"),
                format!("agg-{}", i % 10_000),
            )
        })
        .collect();
    // Warm the broker (JIT, log segments) with the link undelayed.
    drain(&producer, &messages[..MESSAGES / 4]);
    for delay in delays {
        proxy.set(Fault::Latency(Duration::from_millis(delay)));
        let cpu = producer_threads_cpu();
        let start = Instant::now();
        drain(&producer, &messages);
        let seconds = start.elapsed().as_secs_f64();
        let cpu = producer_threads_cpu() - cpu;
        println!(
            "{delay} ms each way {settings:?}: {:.0} messages/s, librdkafka {:.2} µs CPU per message",
            MESSAGES as f64 / seconds,
            cpu / MESSAGES as f64 * 1e6
        );
    }
}

/// Sends `messages` (an id header, a key, a payload of the benchmark's size), up to 8,000
/// unacknowledged (a relay with a backlog keeps that many queued), and waits for every
/// acknowledgement.
fn drain(producer: &ThreadedProducer<DefaultProducerContext>, messages: &[(String, String)]) {
    let payload = format!(r#"{{"n": 0, "pad": "{}"}}"#, "x".repeat(150));
    for (id, key) in messages {
        while producer.in_flight_count() > 8_000 {
            std::thread::sleep(Duration::from_micros(500));
        }
        let headers = OwnedHeaders::new_with_capacity(1).insert(Header {
            key: "id",
            value: Some(id),
        });
        let mut record = BaseRecord::to(TOPIC)
            .key(key)
            .payload(&payload)
            .headers(headers);
        // A full local queue is backpressure: wait and offer again.
        while let Err((_, back)) = producer.send(record) {
            record = back;
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    producer.flush(Duration::from_secs(120)).expect("flush");
}
