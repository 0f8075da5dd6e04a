//! The Kafka sink under faults, in-process against librdkafka's mock cluster: injected
//! request errors, a broker that goes away, poison events, an unwritable dead-letter
//! topic. And the relay retrying what Kafka did not acknowledge.

use std::collections::HashMap;
use std::time::Duration;

use outbox_relay::event::{OutboxEvent, Position};
use outbox_relay::sink::kafka::{Delivery, KafkaSink, KafkaSinkConfig};
use outbox_relay::testkit::kafka::{read_all, Consumed};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

use crate::support::{insert_event, load_toml, BrokerKind, Env, RunningRelay};

/// Like [`sink_config`], with a finite `message.timeout.ms`: refused in a real
/// configuration (it can reorder), set here directly so that failures surface quickly.
fn sink_config_with_timeout(brokers: &str, timeout_ms: u32) -> KafkaSinkConfig {
    let mut config = sink_config(brokers, "");
    config
        .librdkafka
        .insert("message.timeout.ms".into(), timeout_ms.to_string());
    config
}

fn sink_config(brokers: &str, librdkafka: &str) -> KafkaSinkConfig {
    let toml = format!(
        "[source]\nmode = \"polling\"\ndatabase_url = \"postgres://x@h/db\"\n\
         [sink.kafka]\nbrokers = \"{brokers}\"\n[sink.kafka.librdkafka]\n{librdkafka}\n"
    );
    load_toml(&toml).sink
}

fn event(seq: i64, aggregate_id: &str) -> OutboxEvent {
    OutboxEvent {
        position: Position::Seq(seq),
        id: Some(format!("id-{seq}").into()),
        aggregate_type: Some("order".into()),
        aggregate_id: Some(aggregate_id.into()),
        event_type: Some("E".into()),
        payload: Some(format!("{{\"seq\": {seq}}}").into_bytes().into()),
        payload_is_json: true,
        headers: Some("{}".into()),
        topic: None,
        timestamp_ms: None,
        invalid: None,
        original: None,
        redriven: false,
    }
}

async fn read(brokers: &str, topic: &str, count: usize) -> Vec<Consumed> {
    let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        read_all(&brokers, &[&topic], count, Duration::from_secs(20))
    })
    .await
    .unwrap()
    .unwrap()
}

/// Asserts each key's messages carry increasing `seq` and no event appears twice.
fn assert_per_key_order_no_dups(messages: &[Consumed]) {
    let mut last: HashMap<String, i64> = HashMap::new();
    let mut ids = std::collections::HashSet::new();
    for m in messages {
        assert!(
            ids.insert(m.header("id").unwrap().to_owned()),
            "duplicate {:?}",
            m.header("id")
        );
        let seq: serde_json::Value = serde_json::from_slice(&m.value).unwrap();
        let seq = seq["seq"].as_i64().unwrap();
        let prev = last.insert(m.key_str().to_owned(), seq);
        assert!(
            prev.is_none_or(|p| p < seq),
            "key {} went {prev:?} -> {seq}",
            m.key_str()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_produce_errors_lose_nothing_and_keep_key_order() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("outbox.order", 4, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let sink = KafkaSink::new(&sink_config(&brokers, ""), Default::default()).unwrap();
    let errors = [
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
    ]
    .repeat(5);
    cluster.request_errors(RDKafkaApiKey::Produce, &errors);

    let events: Vec<_> = (1..=2000)
        .map(|i| event(i, &format!("a-{}", i % 20)))
        .collect();
    let outcomes = sink.publish(&events).await;
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Delivery::Published { .. })),
        "{outcomes:?}"
    );

    let got = read(&brokers, "outbox.order", 2000).await;
    assert_eq!(got.len(), 2000);
    assert_per_key_order_no_dups(&got);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_events_go_to_the_dead_letter_topic_and_the_rest_flows() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("outbox.order", 1, 1).unwrap();
    cluster.create_topic("outbox.dlq", 1, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let sink = KafkaSink::new(
        &sink_config(&brokers, "\"message.max.bytes\" = 4000"),
        Default::default(),
    )
    .unwrap();

    let mut empty_key = event(2, "");
    empty_key.payload = Some(b"{\"original\": true}".to_vec().into());
    let mut bad_headers = event(3, "a");
    bad_headers.headers = Some("[\"not\", \"an object\"]".into());
    let mut bad_topic = event(4, "a");
    bad_topic.aggregate_type = Some("no spaces allowed".into());
    let events = vec![
        event(1, "a"),
        empty_key,
        bad_headers,
        bad_topic,
        event(6, "a"),
    ];

    let outcomes = sink.publish(&events).await;
    let kinds: Vec<&str> = outcomes
        .iter()
        .map(|o| match o {
            Delivery::Published { .. } => "published",
            Delivery::DeadLettered { .. } => "dead-lettered",
            Delivery::Held => "held",
            Delivery::Failed(_) => "failed",
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "published",
            "dead-lettered",
            "dead-lettered",
            "dead-lettered",
            "published"
        ]
    );

    let normal = read(&brokers, "outbox.order", 2).await;
    assert_eq!(
        normal
            .iter()
            .map(|m| m.header("id").unwrap())
            .collect::<Vec<_>>(),
        ["id-1", "id-6"]
    );
    let dlq = read(&brokers, "outbox.dlq", 3).await;
    assert_eq!(dlq.len(), 3);
    let by_id = |id: &str| dlq.iter().find(|m| m.header("id") == Some(id)).unwrap();
    let m = by_id("id-2");
    assert_eq!(m.header("error"), Some("aggregate_id is empty"));
    assert_eq!(m.header("source_position"), Some("seq:2"));
    assert_eq!(m.value_str(), "{\"original\": true}", "original bytes");
    assert!(by_id("id-3")
        .header("error")
        .unwrap()
        .contains("headers must be a JSON object"));
    assert_eq!(
        by_id("id-3").header("headers"),
        Some("[\"not\", \"an object\"]")
    );
    assert!(by_id("id-4").header("error").unwrap().contains("topic"));
    assert_eq!(by_id("id-4").key_str(), "a", "original key kept");
}

/// Too large for its topic and for the dead-letter topic alike: the dead-letter topic
/// gets its metadata (key, headers, error, position, size, no body), the outcome tells
/// the relay to keep the body in PostgreSQL, and the events around it flow in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_too_large_even_for_the_dead_letter_topic_is_dead_lettered_as_metadata() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("outbox.order", 1, 1).unwrap();
    cluster.create_topic("outbox.dlq", 1, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let config = sink_config(&brokers, "\"message.max.bytes\" = 4000");
    let sink = KafkaSink::new(&config, Default::default()).unwrap();
    let mut too_large = event(2, "a");
    too_large.payload = Some(format!("\"{}\"", "x".repeat(10_000)).into_bytes().into());
    let outcomes = sink
        .publish(&[event(1, "a"), too_large, event(3, "a")])
        .await;
    assert!(outcomes.iter().all(Delivery::is_durable), "{outcomes:?}");
    assert!(
        matches!(
            &outcomes[1],
            Delivery::DeadLettered {
                metadata_only: true,
                ..
            }
        ),
        "{:?}",
        outcomes[1]
    );
    let normal = read(&brokers, "outbox.order", 2).await;
    let ids: Vec<_> = normal.iter().map(|m| m.header("id").unwrap()).collect();
    assert_eq!(ids, ["id-1", "id-3"]);
    let dlq = read(&brokers, "outbox.dlq", 1).await;
    assert_eq!(dlq[0].header("id"), Some("id-2"));
    assert_eq!(dlq[0].key_str(), "a");
    assert_eq!(dlq[0].header("source_position"), Some("seq:2"));
    assert_eq!(dlq[0].header("size"), Some("10002"));
    assert!(
        dlq[0].header("error").unwrap().contains("too large"),
        "{:?}",
        dlq[0].header("error")
    );
    assert!(dlq[0].value.is_empty(), "no body");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_dead_letter_topic_stops_progress_instead_of_dropping() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("outbox.order", 1, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    cluster
        .topic_error(
            "outbox.dlq",
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
        )
        .unwrap();
    let sink = KafkaSink::new(
        &sink_config_with_timeout(&brokers, 3000),
        Default::default(),
    )
    .unwrap();
    let outcomes = sink.publish(&[event(1, "")]).await;
    assert!(matches!(outcomes[0], Delivery::Failed(_)), "{outcomes:?}");
    assert!(
        !outcomes[0].is_durable(),
        "the source must not forget this event"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_delays_delivery_but_loses_nothing() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("outbox.order", 2, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let sink = KafkaSink::new(&sink_config(&brokers, ""), Default::default()).unwrap();
    assert!(sink.publish(&[event(0, "warm")]).await[0].is_durable());

    cluster.broker_down(1).unwrap();
    let events: Vec<_> = (1..=300)
        .map(|i| event(i, &format!("k{}", i % 7)))
        .collect();
    let publish = tokio::spawn(async move { sink.publish(&events).await });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !publish.is_finished(),
        "nothing can be acknowledged while the broker is down"
    );
    cluster.broker_up(1).unwrap();
    let outcomes = publish.await.unwrap();
    assert!(outcomes.iter().all(Delivery::is_durable));
    let got = read(&brokers, "outbox.order", 301).await;
    assert_eq!(got.len(), 301);
    assert_per_key_order_no_dups(&got);
}

/// Deliveries that fail (here: timed out while the broker was down) are not
/// acknowledged to PostgreSQL; the relay reads and sends them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_retries_failed_deliveries_and_deletes_only_acked_rows() {
    let env = Env::start_on(&[], BrokerKind::None).await;
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("outbox.order", 3, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let toml = env
        .config_toml("polling", "", "")
        .replace(&env.kafka.brokers(), &brokers);
    // A finite timeout (refused in a real configuration) makes deliveries fail quickly.
    let mut config = load_toml(&toml);
    config
        .sink
        .librdkafka
        .insert("message.timeout.ms".into(), "1000".into());
    let db = env.client().await;
    cluster.broker_down(1).unwrap();
    for i in 1..=100 {
        insert_event(
            &db,
            "order",
            &format!("a{}", i % 10),
            "E",
            &format!("{{\"seq\": {i}}}"),
        )
        .await;
    }
    let relay = RunningRelay::start(config);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        env.outbox_count().await,
        100,
        "nothing deleted while Kafka acknowledges nothing"
    );
    cluster.broker_up(1).unwrap();

    // Timed-out deliveries may arrive twice: read until every id has been seen.
    let got = {
        let (brokers, deadline) = (
            brokers.clone(),
            std::time::Instant::now() + Duration::from_secs(30),
        );
        tokio::task::spawn_blocking(move || {
            let reader =
                outbox_relay::testkit::kafka::Reader::new(&brokers, &["outbox.order"]).unwrap();
            let (mut all, mut ids) = (Vec::new(), std::collections::HashSet::new());
            while ids.len() < 100 && std::time::Instant::now() < deadline {
                if let Some(m) = reader.next(Duration::from_millis(100)).unwrap() {
                    ids.insert(m.header("id").unwrap().to_owned());
                    all.push(m);
                }
            }
            all
        })
        .await
        .unwrap()
    };
    let mut waited = 0;
    while env.outbox_count().await > 0 && waited < 100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += 1;
    }
    relay.stop().await;
    assert_eq!(env.outbox_count().await, 0);
    // Timed-out deliveries may have reached the broker after all: at-least-once allows
    // duplicates, so count distinct ids and check order on first occurrences.
    let mut first = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for m in &got {
        if seen.insert(m.header("id").unwrap().to_owned()) {
            first.push(m.clone());
        }
    }
    assert_eq!(seen.len(), 100, "every event delivered");
    assert_per_key_order_no_dups(&first);
}

/// The broker itself refusing an event as too large (its message.max.bytes is smaller
/// than the producer's): dead-lettered with its original bytes, the rest flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_broker_refuses_as_too_large_is_dead_lettered() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("outbox.order", 1, 1).unwrap();
    cluster.create_topic("outbox.dlq", 1, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let sink = KafkaSink::new(
        &sink_config(&brokers, "\"linger.ms\" = 0"),
        Default::default(),
    )
    .unwrap();
    assert!(sink.publish(&[event(1, "a")]).await[0].is_durable());
    // The next two produce requests are refused by the broker: the batch, and the event
    // sent again alone (a refused batch says nothing about one event). The copy to the
    // dead-letter topic goes through.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE,
        ],
    );
    let mut big = event(2, "a");
    big.payload = Some(format!("\"{}\"", "y".repeat(5000)).into_bytes().into());
    let outcomes = sink.publish(&[big]).await;
    assert!(
        matches!(outcomes[0], Delivery::DeadLettered { .. }),
        "{outcomes:?}"
    );
    assert!(sink.publish(&[event(3, "a")]).await[0].is_durable());
    let dlq = read(&brokers, "outbox.dlq", 1).await;
    assert!(
        dlq[0]
            .header("error")
            .unwrap()
            .to_lowercase()
            .contains("too large"),
        "{:?}",
        dlq[0].header("error")
    );
    assert_eq!(dlq[0].value.len(), 5002, "original bytes");
    assert_eq!(read(&brokers, "outbox.order", 2).await.len(), 2);
}

/// A topic the broker refuses (here: not authorised) sends its events to the dead-letter
/// topic, counted; events for other topics keep flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_the_broker_refuses_sends_its_events_to_the_dead_letter_topic() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("outbox.order", 1, 1).unwrap();
    cluster.create_topic("outbox.dlq", 1, 1).unwrap();
    cluster
        .topic_error(
            "outbox.secret",
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED,
        )
        .unwrap();
    let brokers = cluster.bootstrap_servers();
    let telemetry = outbox_relay::metrics::Telemetry::default();
    let config = sink_config_with_timeout(&brokers, 10000);
    let sink = KafkaSink::new(&config, telemetry.clone()).unwrap();
    let mut secret = event(2, "a");
    secret.aggregate_type = Some("secret".into());
    let outcomes = sink.publish(&[event(1, "a"), secret, event(3, "b")]).await;
    let kinds: Vec<bool> = outcomes
        .iter()
        .map(|o| matches!(o, Delivery::DeadLettered { .. }))
        .collect();
    assert_eq!(kinds, [false, true, false], "{outcomes:?}");
    assert!(outcomes.iter().all(Delivery::is_durable));
    assert_eq!(telemetry.metrics.events_dead_lettered.get(), 1);
    let dlq = read(&brokers, "outbox.dlq", 1).await;
    assert_eq!(dlq[0].header("id"), Some("id-2"));
}

/// Without a dead-letter table (`source.dead_letter_table = ""`) the body of an event too
/// large for every topic has nowhere to go: the sink does not dead-letter it as metadata,
/// and the event stays unacknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_dead_letter_table_an_event_too_large_for_every_topic_stops_progress() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("outbox.order", 1, 1).unwrap();
    cluster.create_topic("outbox.dlq", 1, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let mut config = sink_config(&brokers, "\"message.max.bytes\" = 4000");
    config.metadata_dead_letters = false;
    let sink = KafkaSink::new(&config, Default::default()).unwrap();
    let mut too_large = event(2, "a");
    too_large.payload = Some(format!("\"{}\"", "x".repeat(10_000)).into_bytes().into());
    let outcomes = sink.publish(&[event(1, "a"), too_large]).await;
    assert!(outcomes[0].is_durable());
    assert!(!outcomes[1].is_durable(), "{:?}", outcomes[1]);
}
