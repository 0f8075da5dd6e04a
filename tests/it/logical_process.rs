//! Log mode as a process: SIGKILL at random moments under load, one huge transaction
//! in bounded memory, and two relays starting at once as PID 1 of their containers.
//!
//! `OUTBOX_RELAY_LONG=1` runs the long versions (20 kills; the same 500,000-row
//! transaction).

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::time::{Duration, Instant};

use outbox_relay::testkit::kafka::Reader;
use rand::{Rng, SeedableRng};

use crate::logical::logical_toml;
use crate::support::{insert_events, spawn_relay, Env};

fn long() -> bool {
    std::env::var("OUTBOX_RELAY_LONG").is_ok_and(|v| v == "1")
}

fn config_file(toml: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(toml.as_bytes()).unwrap();
    f
}

/// Reads until `ids` distinct event ids arrived; returns every message's (key, n, id)
/// in partition order, duplicates included.
async fn read_until(
    brokers: String,
    topic: String,
    ids: usize,
    secs: u64,
) -> Vec<(String, u64, String)> {
    tokio::task::spawn_blocking(move || {
        let reader = Reader::new(&brokers, &[&topic]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(secs);
        let (mut all, mut seen) = (Vec::new(), HashSet::new());
        while seen.len() < ids && Instant::now() < deadline {
            let Ok(Some(m)) = reader.next(Duration::from_millis(200)) else {
                continue;
            };
            let v: serde_json::Value = serde_json::from_slice(&m.value).unwrap();
            let id = m.header("id").unwrap().to_owned();
            seen.insert(id.clone());
            all.push((m.key_str().to_owned(), v["n"].as_u64().unwrap(), id));
        }
        all
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_nothing_and_keeps_order() {
    const EVENTS: usize = 50_000;
    const AGGREGATES: usize = 500;
    const PER_TXN: usize = 50;
    let kills = if long() { 20 } else { 5 };
    let env = Env::start().await;
    env.create_topics(&["outbox.order"], 4).await;
    let file = config_file(&logical_toml(&env, ""));
    let seed: u64 = rand::random();
    eprintln!("crash test seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let db = env.client().await;
    let writer = tokio::spawn(async move {
        for start in (0..EVENTS).step_by(PER_TXN) {
            let rows: Vec<(String, String)> = (start..start + PER_TXN)
                .map(|i| {
                    (
                        format!("agg-{}", i % AGGREGATES),
                        format!("{{\"n\": {}}}", i / AGGREGATES),
                    )
                })
                .collect();
            crate::support::insert_events(&db, &rows).await;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });

    let mut relay = spawn_relay(file.path());
    for _ in 0..kills {
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..1500))).await;
        relay.kill9();
        relay = spawn_relay(file.path());
    }
    writer.await.unwrap();
    let messages = read_until(env.kafka.brokers(), env.topic("outbox.order"), EVENTS, 180).await;
    assert_eq!(
        relay.terminate(Duration::from_secs(30)).await,
        Some(0),
        "clean exit after the last restart"
    );

    let distinct: HashSet<&str> = messages.iter().map(|m| m.2.as_str()).collect();
    let mut next: HashMap<&str, u64> = HashMap::new();
    let mut first_seen = HashSet::new();
    let mut reordered = 0;
    for (key, n, id) in &messages {
        if !first_seen.insert(id.as_str()) {
            continue; // a re-sent duplicate: allowed
        }
        let expected = next.entry(key.as_str()).or_insert(0);
        if *n != *expected {
            reordered += 1;
        }
        *expected = n + 1;
    }
    let lost = EVENTS - distinct.len();
    eprintln!(
        "crash test: kills {kills}, written {EVENTS}, delivered {}, lost {lost}, reordered {reordered}, duplicates {}",
        distinct.len(),
        messages.len() - distinct.len()
    );
    assert_eq!(lost, 0, "every event reached Kafka");
    assert_eq!(reordered, 0, "per-aggregate order held");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_500k_row_transaction_is_relayed_in_bounded_memory() {
    const ROWS: usize = 500_000;
    let env = Env::start().await;
    env.create_topics(&["outbox.order"], 4).await;
    let file = config_file(&logical_toml(&env, "batch_size = 5000"));
    let mut relay = spawn_relay(file.path());
    let db = env.client().await;
    // Let the relay take its slot first, so the transaction is streamed, not snapshotted.
    for _ in 0..100 {
        let active = db
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE active AND slot_name = 'outbox_relay'",
                &[],
            )
            .await
            .unwrap()
            .is_some();
        if active {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let started = Instant::now();
    db.execute(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
         SELECT 'order', 'agg-' || (g % 1000), 'Bulk', jsonb_build_object('n', g / 1000, 'pad', repeat('x', 60)) \
         FROM generate_series(0, $1::int8 - 1) g",
        &[&(ROWS as i64)],
    )
    .await
    .unwrap();
    let messages = read_until(env.kafka.brokers(), env.topic("outbox.order"), ROWS, 300).await;
    let elapsed = started.elapsed();
    let peak = relay.peak_rss();
    assert_eq!(relay.terminate(Duration::from_secs(30)).await, Some(0));
    let distinct: HashSet<&str> = messages.iter().map(|m| m.2.as_str()).collect();
    eprintln!(
        "large transaction: {} rows relayed in {elapsed:.1?}, relay peak RSS {:.1} MB",
        distinct.len(),
        peak as f64 / 1e6
    );
    assert_eq!(distinct.len(), ROWS);
    assert!(peak < 100_000_000, "peak RSS {peak} bytes");
}

/// Two relays started at the same moment, each PID 1 of its own PID namespace (as in
/// two containers): one does the first start and publishes the rows already there, once;
/// the other waits as a standby. Neither crash-loops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_starting_at_once_as_pid_1_publish_the_snapshot_once() {
    const ROWS: usize = 300;
    let env = Env::start().await;
    env.create_topics(&["outbox.order"], 2).await;
    let db = env.client().await;
    let rows: Vec<(String, String)> = (0..ROWS)
        .map(|i| (format!("agg-{}", i % 7), format!("{{\"n\": {}}}", i / 7)))
        .collect();
    insert_events(&db, &rows).await;
    let file = config_file(&logical_toml(&env, ""));
    let binary = env!("CARGO_BIN_EXE_outbox-relay");
    let mut relays = [
        outbox_relay::testkit::RelayProcess::spawn_as_pid_1(binary, file.path()),
        outbox_relay::testkit::RelayProcess::spawn_as_pid_1(binary, file.path()),
    ];
    let messages = read_until(env.kafka.brokers(), env.topic("outbox.order"), ROWS, 60).await;
    // Time for a second copy of the snapshot to show, if one were coming.
    tokio::time::sleep(Duration::from_secs(3)).await;
    insert_events(&db, &[("agg-0".into(), "{\"n\": 1000}".into())]).await;
    let all = read_until(env.kafka.brokers(), env.topic("outbox.order"), ROWS + 1, 30).await;
    let distinct: HashSet<&str> = all.iter().map(|m| m.2.as_str()).collect();
    assert_eq!(messages.len(), ROWS, "the snapshot arrived");
    assert_eq!(distinct.len(), ROWS + 1, "then the streamed row");
    assert_eq!(all.len(), ROWS + 1, "nothing published twice");
    for relay in &mut relays {
        assert!(relay.is_running(), "no relay exited (no crash loop)");
    }
    for relay in &mut relays {
        assert_eq!(relay.terminate(Duration::from_secs(30)).await, Some(0));
    }
}

/// Large events under `source.max_batch_bytes`: 120 events of 256 KB (30 MB) pass
/// through the relay in both modes while its resident memory stays a small multiple of
/// the budget — without the budget, a batch (and log mode's channel) held them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_events_are_relayed_within_the_byte_budget() {
    const EVENTS: usize = 120;
    let budget_mb: usize = std::env::var("BUDGET_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    for mode in ["polling", "logical"] {
        let env = Env::start().await;
        env.create_topics(&["outbox.order"], 2).await;
        let db = env.client().await;
        let blob = "x".repeat(256 * 1024);
        let rows: Vec<(String, String)> = (0..EVENTS)
            .map(|i| {
                (
                    format!("agg-{}", i % 5),
                    format!("{{\"n\": {}, \"blob\": \"{blob}\"}}", i / 5),
                )
            })
            .collect();
        let toml = if mode == "polling" {
            env.config_toml("polling", "", "")
        } else {
            logical_toml(&env, "")
        }
        .replace(
            "[source]\n",
            &format!("[source]\nmax_batch_bytes = {}\n", budget_mb << 20),
        );
        let file = config_file(&toml);
        let mut relay = spawn_relay(file.path());
        // Log mode: let it take the slot, so the events are streamed, not snapshotted.
        tokio::time::sleep(Duration::from_millis(if mode == "logical" {
            1500
        } else {
            0
        }))
        .await;
        insert_events(&db, &rows).await;
        let got = read_until(env.kafka.brokers(), env.topic("outbox.order"), EVENTS, 60).await;
        let peak = relay.peak_rss() as f64 / (1024.0 * 1024.0);
        assert_eq!(relay.terminate(Duration::from_secs(30)).await, Some(0));
        let distinct: HashSet<&str> = got.iter().map(|m| m.2.as_str()).collect();
        eprintln!(
            "{mode}: {EVENTS} events of 256 KB, budget {budget_mb} MB: peak RSS {peak:.1} MB"
        );
        assert_eq!(distinct.len(), EVENTS, "{mode}: every event delivered");
        assert!(
            peak < 60.0,
            "{mode}: peak RSS {peak:.1} MB for a {budget_mb} MB budget"
        );
    }
}
