//! The real binary, as an operator runs it: `outbox-relay run --config FILE` against
//! PostgreSQL and tansu, four concurrent writers, SIGTERM at the end.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::time::{Duration, Instant};

use crate::support::{java_partition, spawn_relay, Env};

const WRITERS: usize = 4;
const EVENTS_PER_WRITER: usize = 2_500;
const AGGREGATES: usize = 100;
/// Events per writer transaction.
const PER_TRANSACTION: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_10k_events_from_4_writers_and_stops_cleanly_on_sigterm() {
    let env = Env::start().await;
    env.create_topics(&["outbox.order"], 4).await;
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    file.write_all(env.config_toml("polling", "", "").as_bytes())
        .unwrap();

    let mut relay = spawn_relay(file.path());
    let started = Instant::now();

    // Each writer owns every 4th aggregate, so per-aggregate seq order is the order in
    // which its writer wrote them: payload `n` increases per aggregate.
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let db = env.client().await;
        writers.push(tokio::spawn(async move {
            let mut n = 0usize;
            while n < EVENTS_PER_WRITER {
                let tx_rows: Vec<(String, String)> = (n..n + PER_TRANSACTION)
                    .map(|i| {
                        let agg = format!("agg-{}", (i * WRITERS + w) % AGGREGATES);
                        (agg, format!("{{\"writer\": {w}, \"n\": {i}}}"))
                    })
                    .collect();
                crate::support::insert_events(&db, &tx_rows).await;
                n += PER_TRANSACTION;
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let total = WRITERS * EVENTS_PER_WRITER;
    let got = env.consume(&["outbox.order"], total, 120).await;
    let elapsed = started.elapsed();
    eprintln!(
        "process test: {} events relayed in {:.2?} ({:.0} events/s, writers included)",
        got.len(),
        elapsed,
        got.len() as f64 / elapsed.as_secs_f64()
    );

    let code = relay.terminate(Duration::from_secs(20)).await;
    assert_eq!(code, Some(0), "clean exit on SIGTERM");

    assert_eq!(got.len(), total, "every event arrived");
    let ids: HashSet<&str> = got.iter().map(|m| m.header("id").unwrap()).collect();
    assert_eq!(ids.len(), total, "no duplicates in a clean run");
    let mut last: HashMap<&str, (u64, i32)> = HashMap::new();
    for m in &got {
        let v: serde_json::Value = serde_json::from_slice(&m.value).unwrap();
        let n = v["n"].as_u64().unwrap();
        if let Some((prev, partition)) = last.insert(m.key_str(), (n, m.partition)) {
            assert!(
                prev < n,
                "aggregate {} out of order: {prev} then {n}",
                m.key_str()
            );
            assert_eq!(partition, m.partition, "one aggregate, one partition");
        }
        assert_eq!(
            m.partition,
            java_partition(&m.key.clone().unwrap(), 4),
            "key {} lands where a Java producer would put it",
            m.key_str()
        );
    }
    assert_eq!(last.len(), AGGREGATES);
    assert_eq!(
        env.outbox_count().await,
        0,
        "the outbox is empty after the relay stopped"
    );
}

/// SIGTERM in the middle of a write load: the relay acknowledges what it sent, exits 0
/// within its grace period, and a restarted relay sends nothing twice.
async fn sigterm_under_load_then_clean_restart(mode: &str) {
    let env = Env::start().await;
    env.create_topics(&["outbox.order"], 2).await;
    let toml = env.config_toml(mode, "", "").replace(
        "[source.polling]",
        "[source.logical]\nstatus_interval = \"1s\"\nheartbeat_interval = \"0s\"\n\n[source.polling]",
    );
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    file.write_all(toml.as_bytes()).unwrap();
    let spawn = || spawn_relay(file.path());
    const TOTAL: usize = 6000;
    let db = env.client().await;
    let writer = tokio::spawn(async move {
        for start in (0..TOTAL).step_by(50) {
            db.execute(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
                 SELECT 'order', 'agg-' || (i % 20), 'Tick', jsonb_build_object('n', i / 20) \
                 FROM generate_series($1::int8, $2::int8) i",
                &[&(start as i64), &(start as i64 + 49)],
            )
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let mut relay = spawn();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let code = relay.terminate(Duration::from_secs(10)).await;
    assert_eq!(
        code,
        Some(0),
        "{mode}: clean exit under load, within the grace period"
    );
    let relay = spawn();
    writer.await.unwrap();
    let got = env.consume(&["outbox.order"], TOTAL, 60).await;
    let ids: HashSet<&str> = got.iter().map(|m| m.header("id").unwrap()).collect();
    drop(relay);
    assert_eq!(ids.len(), TOTAL, "{mode}: every event delivered");
    assert_eq!(
        got.len(),
        TOTAL,
        "{mode}: nothing sent twice after a clean stop"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_polling() {
    sigterm_under_load_then_clean_restart("polling").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_logical() {
    sigterm_under_load_then_clean_restart("logical").await;
}

/// The broker process goes away for a while and comes back (tansu killed, restarted on
/// the same port). With its memory storage the new broker starts empty, so only events
/// written from the outage on can be counted there: all of them must arrive, in order,
/// and the outbox must drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_and_restarted_is_caught_up_with() {
    // On tansu: its memory storage makes the restarted broker a new, empty one.
    let mut env = Env::start_tansu().await;
    env.create_topics(&["outbox.order", "outbox.dlq"], 1).await;
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    file.write_all(
        env.config_toml("polling", "", "")
            .replace("stall_timeout = \"10s\"", "stall_timeout = \"5s\"")
            .as_bytes(),
    )
    .unwrap();
    let relay = spawn_relay(file.path());
    let db = env.client().await;
    crate::support::insert_event(&db, "order", "o-1", "Before", r#"{"n": 0}"#).await;
    assert_eq!(env.consume(&["outbox.order"], 1, 20).await.len(), 1);

    env.kafka.kill();
    for n in 1..=50 {
        crate::support::insert_event(&db, "order", "o-1", "During", &format!("{{\"n\": {n}}}"))
            .await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        env.outbox_count().await,
        50,
        "nothing deleted while the broker is gone"
    );
    tokio::task::block_in_place(|| env.kafka.restart()).unwrap();
    env.create_topics(&["outbox.order", "outbox.dlq"], 1).await;

    // The relay notices that the broker answers but its producer gets nothing
    // acknowledged (relay.stall_timeout), replaces the producer and sends again.
    let got = env.consume(&["outbox.order"], 50, 60).await;
    let ns: Vec<u64> = got
        .iter()
        .map(|m| {
            serde_json::from_slice::<serde_json::Value>(&m.value).unwrap()["n"]
                .as_u64()
                .unwrap()
        })
        .collect();
    let mut deduped = ns.clone();
    deduped.dedup();
    assert_eq!(
        deduped,
        (1..=50).collect::<Vec<u64>>(),
        "all events written during the outage, in order"
    );
    let mut left = env.outbox_count().await;
    for _ in 0..100 {
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = env.outbox_count().await;
    }
    assert_eq!(left, 0, "the outbox drained");
    drop(relay);
}
