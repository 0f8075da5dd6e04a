//! Events Apache Kafka itself refuses go to the dead-letter topic; the events around them
//! flow on and the outbox drains. Two refusals a real broker makes that the mock cluster
//! can only imitate: a topic whose `max.message.bytes` is smaller than an event, and a
//! topic the relay's principal may not write (ACLs, on a broker started for that test).

use std::time::Duration;

use outbox_relay::testkit::apache_kafka::KafkaOptions;

use crate::support::{insert_event, load_toml, skipping, Broker, BrokerKind, Env, RunningRelay};

/// A topic with `max.message.bytes=2048`: the one event above it is dead-lettered with
/// its bytes; the small events beside it — many, so that they share produce batches
/// larger than the limit together — all reach the topic, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_above_the_topics_max_message_bytes_is_dead_lettered() {
    let env = Env::start().await;
    env.create_topics_with(&["outbox.small"], 1, &[("max.message.bytes", "2048")])
        .await;
    env.create_topics(&["outbox.dlq"], 1).await;
    let db = env.client().await;
    // Random letters: lz4 (the producer's compression) cannot shrink them below the limit.
    let noise: String = rand::Rng::sample_iter(rand::rng(), rand::distr::Alphanumeric)
        .take(8000)
        .map(char::from)
        .collect();
    let big = format!("{{\"blob\": \"{noise}\"}}");
    db.batch_execute("BEGIN").await.unwrap();
    for n in 0..60 {
        let payload = if n == 30 {
            big.clone()
        } else {
            format!("{{\"n\": {n}, \"pad\": \"{}\"}}", "p".repeat(100))
        };
        insert_event(&db, "small", "s-1", "Sized", &payload).await;
    }
    db.batch_execute("COMMIT").await.unwrap();
    // One aggregate: with parking its events after the big one would wait (see
    // parking.rs); here they flow past it.
    let relay = RunningRelay::start(load_toml(&skipping(&env.config_toml("polling", "", ""))));
    let small = env.consume(&["outbox.small"], 59, 30).await;
    let dlq = env.consume(&["outbox.dlq"], 1, 30).await;
    env.wait_outbox_empty(Duration::from_secs(10)).await;
    relay.stop().await;

    let ns: Vec<u64> = small
        .iter()
        .map(|m| {
            serde_json::from_slice::<serde_json::Value>(&m.value).unwrap()["n"]
                .as_u64()
                .unwrap()
        })
        .collect();
    let expected: Vec<u64> = (0..60).filter(|n| *n != 30).collect();
    assert_eq!(ns, expected, "every event that fits arrives, in order");
    assert_eq!(dlq.len(), 1);
    assert_eq!(
        dlq[0].value.len(),
        big.len(),
        "the refused event's own bytes"
    );
    let error = dlq[0].header("error").unwrap();
    // Known before sending (the topic's limit read from the broker), or the broker's own
    // refusal when the limit could not be read.
    assert!(
        error.contains("max.message.bytes (2048)") || error.to_lowercase().contains("too large"),
        "{error}"
    );
    assert_eq!(env.outbox_count().await, 0, "the outbox drains");
}

/// A broker with ACLs: the relay's principal is denied WRITE on one topic. Its event is
/// dead-lettered; the events for other topics, before and after it, are published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_the_principal_may_not_write_sends_its_events_to_the_dead_letter_topic() {
    let env = Env::start_on(
        &[],
        BrokerKind::OwnKafka(KafkaOptions {
            properties: vec![
                "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer"
                    .into(),
                // Everything without an ACL stays open (the brokers' own traffic too):
                // only the one deny below applies.
                "allow.everyone.if.no.acl.found=true".into(),
            ],
            ..KafkaOptions::default()
        }),
    )
    .await;
    env.create_topics(&["outbox.order", "outbox.secret", "outbox.dlq"], 1)
        .await;
    let Broker::Own(kafka) = &env.kafka else {
        unreachable!()
    };
    let secret = env.topic("outbox.secret");
    tokio::task::block_in_place(|| {
        kafka.run_tool(
            "org.apache.kafka.tools.AclCommand",
            &[
                "--add",
                "--deny-principal",
                "User:ANONYMOUS",
                "--operation",
                "Write",
                "--topic",
                &secret,
            ],
        )
    })
    .expect("add the deny ACL");
    let db = env.client().await;
    insert_event(&db, "order", "o-1", "Before", "{}").await;
    let refused = insert_event(&db, "secret", "s-1", "Secret", r#"{"keep": "me"}"#).await;
    insert_event(&db, "order", "o-1", "After", "{}").await;
    let relay = RunningRelay::start(env.config(""));
    let orders = env.consume(&["outbox.order"], 2, 30).await;
    let dlq = env.consume(&["outbox.dlq"], 1, 30).await;
    env.wait_outbox_empty(Duration::from_secs(10)).await;
    relay.stop().await;

    let types: Vec<_> = orders
        .iter()
        .map(|m| m.header("event_type").unwrap())
        .collect();
    assert_eq!(types, ["Before", "After"]);
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].header("id"), Some(refused.as_str()));
    assert_eq!(dlq[0].value_str(), r#"{"keep": "me"}"#);
    let error = dlq[0].header("error").unwrap();
    assert!(error.to_lowercase().contains("authoriz"), "{error}");
    assert_eq!(env.outbox_count().await, 0, "the outbox drains");
}
