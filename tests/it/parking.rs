//! Parking and operator control on Apache Kafka: an aggregate with a dead-lettered event
//! holds its later events back, in order, until an operator redrives or discards them;
//! every other aggregate flows. Commands act through PostgreSQL and the leading relay;
//! per-key order is checked by an independent consumer (the test kit's reader).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use outbox_relay::testkit::kafka::{set_topic_config, Consumed};
use rand::Rng;

use crate::support::{insert_events, spawn_relay, start_with_telemetry, wait_for_leader, Env};

/// Runs `outbox-relay ARGS --config FILE`: (exit code, stdout, stderr).
async fn cli(config: &Path, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .await
        .expect("run outbox-relay");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn config_file(toml: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    file.write_all(toml.as_bytes()).unwrap();
    file
}

/// Each key's `n` values in the order the topic holds them.
fn by_key(messages: &[Consumed]) -> BTreeMap<String, Vec<u64>> {
    let mut keys: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for m in messages {
        let v: serde_json::Value = serde_json::from_slice(&m.value).unwrap();
        keys.entry(m.key_str().to_owned())
            .or_default()
            .push(v["n"].as_u64().unwrap());
    }
    keys
}

/// Exactly `n` messages on `topic`: all of them within 60 s, and no more 3 s later.
async fn consume_exactly(env: &Env, topic: &str, n: usize) -> Vec<Consumed> {
    let got = env.consume(&[topic], n, 60).await;
    assert_eq!(got.len(), n, "messages on {topic}");
    let again = env.consume(&[topic], n + 1, 3).await;
    assert_eq!(again.len(), n, "no more than {n} messages on {topic}");
    again
}

async fn count(db: &tokio_postgres::Client, sql: &str) -> i64 {
    db.query_one(sql, &[]).await.unwrap().get(0)
}

/// Polls `sql` (a count) until it is `want`, for up to 30 s.
async fn wait_count(db: &tokio_postgres::Client, sql: &str, want: i64) {
    for _ in 0..300 {
        if count(db, sql).await == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{sql} never became {want} (is {})", count(db, sql).await);
}

/// Events 0..`count` of aggregates K and B in one transaction, K's `poison` with headers
/// that are not an object (poison).
async fn insert_k_and_b(db: &tokio_postgres::Client, count: u64, poison: u64) {
    let mut sql = String::from("BEGIN;");
    for n in 0..count {
        let headers = if n == poison { "[1]" } else { "{}" };
        sql.push_str(&format!(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers) \
               VALUES ('order', 'K', 'Tick', '{{\"n\": {n}}}', '{headers}'), \
                      ('order', 'B', 'Tick', '{{\"n\": {n}}}', '{{}}');"
        ));
    }
    sql.push_str("COMMIT;");
    db.batch_execute(&sql).await.unwrap();
}

const HELD_K: &str = "SELECT count(*) FROM outbox_relay_dlq WHERE held AND aggregate_id = 'K'";

/// Polling, at least once. Aggregate K's event 10 is larger than its topic's
/// `max.message.bytes` (read from the broker before sending), among 300 events of ten
/// other aggregates: K's 11–29 are held while everything else flows; a redrive before
/// the fix fails again and keeps K parked; after the topic's limit is raised a redrive
/// publishes K's 10–29 in order, and K's next event flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_parks_its_aggregate_until_fixed_and_redriven_in_order() {
    let env = Env::start().await;
    env.create_topics_with(&["outbox.order"], 3, &[("max.message.bytes", "4000")])
        .await;
    env.create_topics(&["outbox.dlq"], 1).await;
    let toml = env.config_toml("polling", "", "");
    let file = config_file(&toml);
    let db = env.client().await;
    let noise: String = rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(20_000)
        .map(char::from)
        .collect();
    let mut rows = Vec::new();
    for n in 0..30 {
        let blob = if n == 10 { noise.as_str() } else { "" };
        rows.push(("K".to_owned(), format!(r#"{{"n": {n}, "blob": "{blob}"}}"#)));
        for other in 0..10 {
            rows.push((format!("A{other}"), format!(r#"{{"n": {n}}}"#)));
        }
    }
    insert_events(&db, &rows).await;
    let (relay, telemetry) = start_with_telemetry(&toml);

    let dlq = env.consume(&["outbox.dlq"], 1, 30).await;
    env.wait_outbox_empty(Duration::from_secs(20)).await;
    assert_eq!(
        env.outbox_count().await,
        0,
        "held events are acknowledged once kept"
    );
    // K's 0-9 and every other aggregate's 30.
    let first = consume_exactly(&env, "outbox.order", 310).await;
    let keys = by_key(&first);
    assert_eq!(
        keys["K"],
        (0..10).collect::<Vec<_>>(),
        "K stops before its poison"
    );
    for other in 0..10 {
        assert_eq!(keys[&format!("A{other}")], (0..30).collect::<Vec<_>>());
    }
    assert_eq!(dlq.len(), 1);
    assert!(dlq[0]
        .header("error")
        .unwrap()
        .contains("max.message.bytes"));
    wait_count(&db, HELD_K, 20).await;

    let (code, out, err) = cli(file.path(), &["dead-letters", "list", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    let parked = list["parked"].as_array().unwrap();
    assert_eq!(parked.len(), 1, "{list}");
    assert_eq!(parked[0]["aggregate_id"], "K");
    assert_eq!(parked[0]["events"], 20);
    assert!(parked[0]["first_error"]
        .as_str()
        .unwrap()
        .contains("max.message.bytes"));
    let head = parked[0]["head_id"].as_i64().unwrap();
    let (code, out, _) = cli(file.path(), &["dead-letters", "show", &head.to_string()]).await;
    assert_eq!(code, 0);
    assert!(out.contains(&noise), "show prints the body");

    // Bad arguments: refused, exit 2, nothing recorded.
    for args in [
        &["dead-letters", "redrive", "--aggregate", "nobody"][..],
        &["dead-letters", "show", "999999"],
        &["dead-letters", "discard", "--id", "999999"],
        &["dead-letters", "redrive", "--id", "999999"],
    ] {
        let (code, _, err) = cli(file.path(), args).await;
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains("999999") || err.contains("nobody"), "{err}");
    }
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox_relay_requests").await,
        0
    );

    // Before the fix: the head fails again, K stays parked with the new error.
    let (code, out, err) = cli(
        file.path(),
        &["dead-letters", "redrive", "--aggregate", "K"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("failed again"), "{out}");
    assert_eq!(count(&db, HELD_K).await, 20);
    assert_eq!(
        count(
            &db,
            "SELECT redrives::int8 FROM outbox_relay_dlq WHERE held ORDER BY id LIMIT 1"
        )
        .await,
        1
    );

    let topic = env.topic("outbox.order");
    set_topic_config(&env.kafka.brokers(), &topic, "max.message.bytes", "1000000")
        .await
        .unwrap();
    // The broker applies a changed topic setting a moment after it answered.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (code, out, err) = cli(
        file.path(),
        &["dead-letters", "redrive", "--aggregate", "K"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("redrove 20 event(s)"), "{out}");
    assert_eq!(
        count(&db, HELD_K).await,
        0,
        "K's queue is empty: K flows again"
    );
    insert_events(&db, &[("K".into(), r#"{"n": 30}"#.into())]).await;

    // Nothing twice, nothing lost.
    let all = consume_exactly(&env, "outbox.order", 331).await;
    let keys = by_key(&all);
    assert_eq!(
        keys["K"],
        (0..31).collect::<Vec<_>>(),
        "K complete and in order"
    );
    let redriven: Vec<_> = all
        .iter()
        .filter(|m| m.header("redriven") == Some("true"))
        .collect();
    assert_eq!(redriven.len(), 20);
    assert!(redriven.iter().all(|m| m.key_str() == "K"));
    let metrics = &telemetry.metrics;
    assert_eq!(metrics.events_redriven.get(), 20);
    assert_eq!(
        metrics
            .operator_actions
            .with_label_values(&["redrive"])
            .get(),
        2
    );
    let audit = db
        .query(
            "SELECT action, requested_by, application_name, outcome FROM outbox_relay_requests ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(audit.len(), 2);
    for row in &audit {
        assert_eq!(row.get::<_, String>(0), "redrive");
        assert_eq!(row.get::<_, String>(1), "postgres");
        assert_eq!(row.get::<_, String>(2), "outbox-relay dead-letters redrive");
    }
    relay.stop().await;
}

/// Polling, at least once: `pause` stops publishing (durably, /readyz 503 "paused"), a
/// redrive while paused is refused, `resume` publishes everything in order; a poison
/// event's aggregate is discarded on purpose, head first, and recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_and_discard_are_carried_out_by_the_leader() {
    let env = Env::start().await;
    env.create_topics(&["outbox.order", "outbox.dlq"], 1).await;
    let toml = env.config_toml("polling", "", "");
    let file = config_file(&toml);
    let db = env.client().await;
    // No relay yet: the request is recorded and waits for one.
    let (code, out, err) = cli(file.path(), &["pause"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("no relay leads this outbox now"), "{out}");
    let rows: Vec<_> = (0..10)
        .map(|n| ("P".to_owned(), format!(r#"{{"n": {n}}}"#)))
        .collect();
    insert_events(&db, &rows).await;
    let (relay, telemetry) = start_with_telemetry(&toml);
    wait_for_leader(&db).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(env.outbox_count().await, 10, "a new leader starts paused");
    assert_eq!(telemetry.metrics.paused.get(), 1);
    // Durable: a restart stays paused.
    relay.stop().await;
    let (relay, telemetry) = start_with_telemetry(&toml);
    wait_for_leader(&db).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(env.outbox_count().await, 10, "nothing is read while paused");
    let ready = telemetry.health.readiness();
    assert!(format!("{ready:?}").contains("paused"), "{ready:?}");
    assert_eq!(telemetry.metrics.paused.get(), 1);
    let (code, _, err) = cli(file.path(), &["dead-letters", "redrive", "--all"]).await;
    assert_eq!(code, 2, "a redrive while paused is refused");
    assert!(err.contains("paused"), "{err}");
    let (code, _, err) = cli(file.path(), &["dead-letters", "redrive"]).await;
    assert_eq!(code, 2, "a redrive must name what: {err}");
    let (code, out, _) = cli(file.path(), &["pause"]).await;
    assert_eq!((code, out.contains("already paused")), (0, true), "{out}");
    let (code, out, _) = cli(file.path(), &["status"]).await;
    assert_eq!(code, 1, "status calls a paused relay unhealthy");
    assert!(out.contains("paused:   yes"), "{out}");
    let (code, out, err) = cli(file.path(), &["resume"]).await;
    assert_eq!((code, out.contains("resumed")), (0, true), "{out}{err}");
    let published = env.consume(&["outbox.order"], 10, 30).await;
    assert_eq!(by_key(&published)["P"], (0..10).collect::<Vec<_>>());
    assert_eq!(telemetry.metrics.paused.get(), 0);

    // D's first event has headers that are not an object: poison, D parks.
    db.batch_execute(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers) \
           VALUES ('order', 'D', 'Tick', '{\"n\": 1}', '[1]'); \
         INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
           VALUES ('order', 'D', 'Tick', '{\"n\": 2}'), ('order', 'D', 'Tick', '{\"n\": 3}')",
    )
    .await
    .unwrap();
    let held_d = "SELECT count(*) FROM outbox_relay_dlq WHERE held AND aggregate_id = 'D'";
    wait_count(&db, held_d, 3).await;
    let head: i64 = db
        .query_one(
            "SELECT min(id) FROM outbox_relay_dlq WHERE aggregate_id = 'D'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let (code, out, err) = cli(
        file.path(),
        &["dead-letters", "discard", "--id", &head.to_string()],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("discarded 1 event(s)"), "{out}");
    let (_, out, _) = cli(file.path(), &["dead-letters", "list", "--json"]).await;
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        list["parked"][0]["events"], 2,
        "the next event is the head: {list}"
    );
    assert!(list["parked"][0]["first_error"].is_null());
    let (code, out, _) = cli(
        file.path(),
        &["dead-letters", "discard", "--aggregate", "D"],
    )
    .await;
    assert_eq!(code, 0);
    assert!(out.contains("discarded 2 event(s)"), "{out}");
    insert_events(&db, &[("D".into(), r#"{"n": 4}"#.into())]).await;
    let all = consume_exactly(&env, "outbox.order", 11).await;
    assert_eq!(
        by_key(&all)["D"],
        [4],
        "D flows again after its queue was discarded"
    );
    assert_eq!(telemetry.metrics.events_discarded.get(), 3);
    let audit: Vec<(String, String, String)> = db
        .query(
            "SELECT action, application_name, outcome FROM outbox_relay_requests ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let actions: Vec<&str> = audit.iter().map(|a| a.0.as_str()).collect();
    assert_eq!(actions, ["pause", "resume", "discard", "discard"]);
    assert_eq!(audit[2].1, "outbox-relay dead-letters discard");
    assert!(audit[3].2.contains("discarded 2"), "{audit:?}");
    relay.stop().await;
}

/// Log mode, exactly once, two relay processes: K parks on an event with invalid
/// headers; the leader is killed and the standby keeps K parked (K's next event is held
/// too); a redrive fails again (the body is what it is), the head is discarded, and a
/// redrive publishes the rest of K once and in order (read_committed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parking_holds_through_failover_in_log_mode_exactly_once() {
    let env = Env::start().await;
    env.create_topics(&["outbox.order"], 3).await;
    env.create_topics(&["outbox.dlq"], 1).await;
    let toml = env.config_toml("logical", "", "").replacen(
        "[sink.kafka]\n",
        &format!(
            "[sink.kafka]\ndelivery = \"exactly_once\"\ncheckpoint_topic = \"{}\"\n",
            env.topic("checkpoints")
        ),
        1,
    );
    let file = config_file(&toml);
    let db = env.client().await;
    let mut leader = spawn_relay(file.path());
    insert_events(&db, &[("W".into(), r#"{"n": 0}"#.into())]).await;
    assert_eq!(
        env.consume(&["outbox.order"], 1, 60).await.len(),
        1,
        "the leader runs"
    );
    let mut standby = spawn_relay(file.path());

    insert_k_and_b(&db, 15, 5).await;
    let first = consume_exactly(&env, "outbox.order", 21).await;
    assert_eq!(by_key(&first)["K"], (0..5).collect::<Vec<_>>());
    assert_eq!(by_key(&first)["B"], (0..15).collect::<Vec<_>>());
    wait_count(&db, HELD_K, 10).await;

    leader.kill9();
    insert_events(
        &db,
        &[
            ("K".into(), r#"{"n": 15}"#.into()),
            ("B".into(), r#"{"n": 15}"#.into()),
        ],
    )
    .await;
    let after = env.consume(&["outbox.order"], 22, 90).await;
    assert_eq!(after.len(), 22);
    assert_eq!(
        by_key(&after)["B"],
        (0..16).collect::<Vec<_>>(),
        "the standby took over"
    );
    wait_count(&db, HELD_K, 11).await;

    let (code, out, err) = cli(
        file.path(),
        &["dead-letters", "redrive", "--aggregate", "K"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("failed again"), "{out}");
    let head: i64 = db
        .query_one("SELECT min(id) FROM outbox_relay_dlq WHERE held", &[])
        .await
        .unwrap()
        .get(0);
    let (code, _, err) = cli(
        file.path(),
        &["dead-letters", "discard", "--id", &head.to_string()],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = cli(
        file.path(),
        &["dead-letters", "redrive", "--aggregate", "K"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("redrove 10 event(s)"), "{out}");
    insert_events(&db, &[("K".into(), r#"{"n": 16}"#.into())]).await;

    // Once each (read_committed), nothing lost.
    let all = consume_exactly(&env, "outbox.order", 33).await;
    let keys = by_key(&all);
    let mut expected: Vec<u64> = (0..17).collect();
    expected.retain(|n| *n != 5);
    assert_eq!(
        keys["K"], expected,
        "K in order, its discarded event 5 aside"
    );
    standby.terminate(Duration::from_secs(15)).await;
}

/// Log mode, at least once: K parks on a row with invalid headers; a pause holds the
/// stream (B's next event waits) and a resume releases it; the head is discarded; a
/// redrive `--id N` publishes K's queue up to and including N and leaves K parked, its
/// next event held behind the rest; a last redrive completes K, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_mode_redrives_a_queue_up_to_an_id_and_pauses_the_stream() {
    let env = Env::start().await;
    env.create_topics(&["outbox.order", "outbox.dlq"], 2).await;
    let toml = env.config_toml("logical", "", "");
    let file = config_file(&toml);
    let db = env.client().await;
    let (relay, telemetry) = start_with_telemetry(&toml);
    insert_k_and_b(&db, 8, 2).await;
    let first = consume_exactly(&env, "outbox.order", 10).await;
    assert_eq!(by_key(&first)["K"], [0, 1]);
    wait_count(&db, HELD_K, 6).await;

    let (code, out, err) = cli(file.path(), &["pause"]).await;
    assert_eq!((code, out.contains("paused")), (0, true), "{out}{err}");
    insert_events(&db, &[("B".into(), r#"{"n": 8}"#.into())]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        env.consume(&["outbox.order"], 11, 1).await.len(),
        10,
        "paused"
    );
    assert_eq!(telemetry.metrics.paused.get(), 1);
    let (code, out, err) = cli(file.path(), &["resume"]).await;
    assert_eq!((code, out.contains("resumed")), (0, true), "{out}{err}");
    consume_exactly(&env, "outbox.order", 11).await;

    let ids: Vec<i64> = db
        .query(
            "SELECT id FROM outbox_relay_dlq WHERE held ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids.len(), 6);
    let (code, _, err) = cli(
        file.path(),
        &["dead-letters", "discard", "--id", &ids[0].to_string()],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    // Up to and including K's 5 (ids[3]): 3, 4 and 5 go; 6 and 7 stay, K stays parked.
    let (code, out, err) = cli(
        file.path(),
        &["dead-letters", "redrive", "--id", &ids[3].to_string()],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("redrove 3 event(s)") && out.contains("stay parked"),
        "{out}"
    );
    insert_events(&db, &[("K".into(), r#"{"n": 8}"#.into())]).await;
    wait_count(&db, HELD_K, 3).await;
    let (code, out, err) = cli(
        file.path(),
        &["dead-letters", "redrive", "--aggregate", "K"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("redrove 3 event(s)"), "{out}");

    let all = consume_exactly(&env, "outbox.order", 17).await;
    let keys = by_key(&all);
    assert_eq!(
        keys["K"],
        [0, 1, 3, 4, 5, 6, 7, 8],
        "in order, the discarded 2 aside"
    );
    assert_eq!(keys["B"], (0..9).collect::<Vec<_>>());
    assert_eq!(telemetry.metrics.events_redriven.get(), 6);
    assert_eq!(telemetry.metrics.events_discarded.get(), 1);
    relay.stop().await;
}

/// Tables of state version 1 (before the dead-letter queue) are migrated in place by the
/// first relay or command that may; the slot memory stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_1_tables_are_migrated_to_the_dead_letter_queue() {
    let env = Env::start_on(&[], crate::support::BrokerKind::None).await;
    let db = env.client().await;
    db.batch_execute(
        "DROP TABLE outbox_relay_dlq, outbox_relay_requests, outbox_relay_control; \
         UPDATE outbox_relay_schema SET version = 1; \
         INSERT INTO outbox_relay_slots (slot_name, publication, carried_by, vouched_lsn, vouched_xmin) \
           VALUES ('kept', 'p', 'x', '0/1', 1)",
    )
    .await
    .unwrap();
    let file = config_file(&env.config_toml("polling", "", ""));
    let (code, out, err) = cli(file.path(), &["dead-letters", "list"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("parked aggregates: 0"), "{out}");
    assert_eq!(
        count(&db, "SELECT version::int8 FROM outbox_relay_schema").await,
        2
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox_relay_control").await,
        1
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM outbox_relay_slots").await,
        1
    );
}
