//! Rows real databases hold that once broke the read: the relay never exits or loops on
//! one of them. It publishes what is publishable, dead-letters what is not, in order.

use std::time::Duration;

use crate::logical::logical_toml;
use crate::support::{insert_event, load_toml, skipping, Env, RunningRelay};

fn types(messages: &[outbox_relay::testkit::kafka::Consumed]) -> Vec<&str> {
    messages
        .iter()
        .map(|m| m.header("event_type").unwrap_or("?"))
        .collect()
}

/// `created_at = 'infinity'` (or before 1970) has no Kafka timestamp: the event goes out
/// with the broker's time, in order, in both modes (log mode: its first-start snapshot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamps_kafka_cannot_carry_do_not_stop_the_read() {
    for mode in ["polling", "logical"] {
        let env = Env::start().await;
        env.create_topics(&["outbox.order"], 1).await;
        let db = env.client().await;
        for (event_type, created_at) in [
            ("Normal", "2026-01-01"),
            ("Infinite", "infinity"),
            ("Ancient", "1900-01-01"),
            ("MinusInfinite", "-infinity"),
        ] {
            db.execute(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, created_at) \
                 VALUES ('order', 'o-1', $1, '{}', $2::text::timestamptz)",
                &[&event_type, &created_at],
            )
            .await
            .unwrap();
        }
        let config = if mode == "polling" {
            env.config("")
        } else {
            load_toml(&logical_toml(&env, ""))
        };
        let relay = RunningRelay::start(config);
        let got = env.consume(&["outbox.order"], 4, 20).await;
        relay.stop().await;
        assert_eq!(
            types(&got),
            ["Normal", "Infinite", "Ancient", "MinusInfinite"],
            "{mode}"
        );
        assert_eq!(got[0].timestamp_ms, Some(1_767_225_600_000), "{mode}");
    }
}

/// Text that is not UTF-8 (a `SQL_ASCII` database takes any bytes) makes that one row a
/// dead letter, with the column named; the rows around it are published in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_with_undecodable_text_is_dead_lettered_alone() {
    let env = Env::start().await;
    env.create_topics(&["outbox.order", "outbox.dlq"], 1).await;
    let db = ascii_database(&env).await;
    insert_event(&db, "order", "o-1", "Before", "{}").await;
    // 0xE9 alone is Latin-1 'é', not UTF-8.
    db.batch_execute(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
         VALUES ('order', E'caf\\xe9', 'Latin1', '{\"n\": 1}')",
    )
    .await
    .unwrap();
    insert_event(&db, "order", "o-1", "After", "{}").await;

    let config = env
        .config_toml("polling", "", "")
        .replace(&env.db_url, &env.db_url.replace("/app", "/ascii"));
    let relay = RunningRelay::start(load_toml(&config));
    let published = env.consume(&["outbox.order"], 2, 20).await;
    let dead = env.consume(&["outbox.dlq"], 1, 20).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay.stop().await;

    assert_eq!(types(&published), ["Before", "After"]);
    let error = dead[0].header("error").unwrap();
    assert!(
        error.contains("source.columns.aggregate_id") && error.contains("UTF-8"),
        "{error}"
    );
    assert_eq!(dead[0].value_str(), r#"{"n": 1}"#, "the original payload");
    let left: i64 = db
        .query_one("SELECT count(*) FROM outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "the dead-lettered row is gone too: the DLQ has it");
}

/// A row the server itself cannot send (a text payload that is not UTF-8 fails its
/// conversion: SQLSTATE 22021) fails the whole read. The rows before it are published,
/// each such row goes to the dead-letter topic as its raw bytes, and the rows after it
/// follow, in order: the read never stops at the row or skips it. (The bad rows are
/// another aggregate's: a dead letter parks its aggregate's later events.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_the_server_cannot_send_is_dead_lettered_alone() {
    let env = Env::start().await;
    env.create_topics(&["outbox.order", "outbox.dlq"], 1).await;
    let db = ascii_database(&env).await;
    db.batch_execute("ALTER TABLE outbox ALTER COLUMN payload TYPE text")
        .await
        .unwrap();
    let bad = |name: &str| {
        format!(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             VALUES ('order', 'o-2', '{name}', E'{{\"n\": \"caf\\xe9\"}}')"
        )
    };
    for name in ["B1", "B2", "B3"] {
        insert_event(&db, "order", "o-1", name, "{}").await;
    }
    db.batch_execute(&bad("Bad1")).await.unwrap();
    db.batch_execute(&bad("Bad2")).await.unwrap();
    for name in ["A1", "A2"] {
        insert_event(&db, "order", "o-1", name, "{}").await;
    }

    let config = env
        .config_toml("polling", "", "")
        .replace(&env.db_url, &env.db_url.replace("/app", "/ascii"));
    let relay = RunningRelay::start(load_toml(&config));
    let published = env.consume(&["outbox.order"], 5, 20).await;
    let dead = env.consume(&["outbox.dlq"], 2, 20).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay.stop().await;

    assert_eq!(types(&published), ["B1", "B2", "B3", "A1", "A2"]);
    assert_eq!(types(&dead), ["Bad1", "Bad2"]);
    for d in &dead {
        let error = d.header("error").unwrap();
        assert!(
            error.contains("cannot be read as text") && error.contains("source.columns.payload"),
            "{error}"
        );
        assert_eq!(
            d.value.as_slice(),
            b"{\"n\": \"caf\xe9\"}",
            "the payload's stored bytes"
        );
    }
    let left: i64 = db
        .query_one("SELECT count(*) FROM outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
}

/// A `SQL_ASCII` database (it takes any bytes as text) with the outbox, as `env`'s
/// database `ascii`.
async fn ascii_database(env: &Env) -> tokio_postgres::Client {
    let admin = env.pg.connect("postgres").await.unwrap();
    admin
        .batch_execute(
            "CREATE DATABASE ascii ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' \
             TEMPLATE template0",
        )
        .await
        .unwrap();
    let db = env.pg.connect("ascii").await.unwrap();
    for (name, sql) in outbox_relay::SETUP_SQL {
        db.batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    db
}

/// A table without NOT NULL on `seq` (Debezium-style tables, say): log mode's first
/// start publishes a NULL-seq row last instead of panicking; polling, which could never
/// read such a row, refuses the table with the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nullable_seq_is_handled_by_log_mode_and_refused_by_polling() {
    let env = Env::start().await;
    env.create_topics(&["outbox.order"], 1).await;
    let db = env.client().await;
    db.batch_execute(
        "ALTER TABLE outbox ALTER COLUMN seq DROP IDENTITY, ALTER COLUMN seq DROP NOT NULL; \
         INSERT INTO outbox (seq, aggregate_type, aggregate_id, event_type, payload) \
         VALUES (NULL, 'order', 'o-1', 'NoSeq', '{}'), (7, 'order', 'o-2', 'Seven', '{}')",
    )
    .await
    .unwrap();
    let e = crate::support::run_error(env.config("")).await;
    assert!(e.contains("SET NOT NULL"), "{e}");

    let relay = RunningRelay::start(load_toml(&logical_toml(&env, "")));
    let got = env.consume(&["outbox.order"], 2, 20).await;
    relay.stop().await;
    assert_eq!(types(&got), ["Seven", "NoSeq"]);
}

/// An event too large for its topic and for the dead-letter topic: its metadata goes to
/// the dead-letter topic, its body into the dead-letter table, the rows around it are
/// published in order, and none is sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_too_large_for_every_topic_keeps_its_body_in_postgres() {
    let env = Env::start().await;
    env.create_topics(&["outbox.order", "outbox.dlq"], 1).await;
    let db = env.client().await;
    insert_event(&db, "order", "o-1", "Small1", "{}").await;
    let big = format!("{{\"blob\": \"{}\"}}", "x".repeat(20_000));
    insert_event(&db, "order", "o-1", "Huge", &big).await;
    insert_event(&db, "order", "o-1", "Small2", "{}").await;
    // The producer's own limit stands in for the brokers' max.message.bytes here.
    let config = load_toml(&skipping(&env.config_toml(
        "polling",
        "",
        "[sink.kafka.librdkafka]\n\"message.max.bytes\" = 8000\n",
    )));
    let relay = RunningRelay::start(config);
    let published = env.consume(&["outbox.order"], 2, 20).await;
    let dead = env.consume(&["outbox.dlq"], 1, 20).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    relay.stop().await;
    assert_eq!(types(&published), ["Small1", "Small2"]);
    assert_eq!(
        env.consume(&["outbox.order"], 3, 2).await.len(),
        2,
        "no resend"
    );
    assert_eq!(dead[0].header("event_type"), Some("Huge"));
    assert!(dead[0].value.is_empty());
    let size: usize = dead[0].header("size").unwrap().parse().unwrap();
    assert_eq!(size, big.len());
    let kept = db
        .query_one(
            "SELECT event_type, convert_from(body, 'UTF8'), source_position, error \
             FROM outbox_relay_dead_letter",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(kept.get::<_, String>(0), "Huge");
    assert_eq!(kept.get::<_, String>(1), big, "the body, byte for byte");
    assert!(kept.get::<_, String>(2).starts_with("seq:"));
    assert_eq!(env.outbox_count().await, 0);
}

/// A NULL payload (a table whose payload column allows it) is a dead letter, never a
/// row left behind by the byte-bounded read; the rows around it flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_null_payload_is_dead_lettered_not_left_behind() {
    let env = Env::start().await;
    env.create_topics(&["outbox.order", "outbox.dlq"], 1).await;
    let db = env.client().await;
    db.batch_execute("ALTER TABLE outbox ALTER COLUMN payload DROP NOT NULL")
        .await
        .unwrap();
    insert_event(&db, "order", "o-1", "Before", "{}").await;
    db.batch_execute(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
         VALUES ('order', 'o-1', 'NoPayload', NULL)",
    )
    .await
    .unwrap();
    insert_event(&db, "order", "o-1", "After", "{}").await;
    let relay = RunningRelay::start(load_toml(&skipping(&env.config_toml("polling", "", ""))));
    let published = env.consume(&["outbox.order"], 2, 20).await;
    let dead = env.consume(&["outbox.dlq"], 1, 20).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay.stop().await;
    assert_eq!(types(&published), ["Before", "After"]);
    assert_eq!(dead[0].header("event_type"), Some("NoPayload"));
    assert_eq!(env.outbox_count().await, 0);
}
