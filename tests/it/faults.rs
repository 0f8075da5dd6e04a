//! The fault suite: two relays (a leader and a standby) on one outbox under a steady
//! write load, while faults are injected at random moments — the leader killed with
//! SIGKILL, the broker going away and coming back, PostgreSQL restarted fast and
//! immediate. Afterwards every event must be in Kafka, each aggregate's events in order.
//! A table of what happened is printed.
//!
//! The broker is librdkafka's mock cluster: it can go down and come back with its data,
//! so delivered events can be counted across the outage (tansu's memory storage would
//! forget them). CI runs the short plan; `OUTBOX_RELAY_LONG=1` runs the long one
//! (20 kills, 5 broker outages of 30 s, 3 database restarts).

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::time::{Duration, Instant};

use outbox_relay::testkit::kafka::Reader;
use rand::{Rng, SeedableRng};
use rdkafka::mocking::MockCluster;

use tokio_util::sync::CancellationToken;

use crate::support::{spawn_relay, BrokerKind, Env, RelayProcess};

struct Plan {
    events: usize,
    kills: usize,
    outages: usize,
    outage: Duration,
    db_restarts: usize,
}

fn plan() -> Plan {
    if std::env::var("OUTBOX_RELAY_LONG").is_ok_and(|v| v == "1") {
        Plan {
            events: 40_000,
            kills: 20,
            outages: 5,
            outage: Duration::from_secs(30),
            db_restarts: 3,
        }
    } else {
        Plan {
            events: 8_000,
            kills: 3,
            outages: 1,
            outage: Duration::from_secs(5),
            db_restarts: 2,
        }
    }
}

pub const AGGREGATES: usize = 200;
pub const PER_TXN: usize = 20;

#[derive(Clone, Copy, Debug)]
enum Fault {
    KillLeader,
    BrokerOutage,
    RestartFast,
    RestartImmediate,
}

struct Relay {
    name: String,
    process: RelayProcess,
}

impl Relay {
    fn spawn(name: &str, config: &std::path::Path) -> Relay {
        Relay {
            name: name.to_owned(),
            process: spawn_relay(config),
        }
    }
}

/// The application name of the relay that currently leads, if any. The monitoring
/// connection is reopened after a database restart closed it.
pub async fn leader(env: &Env, db: &mut tokio_postgres::Client, mode: &str) -> Option<String> {
    if db.is_closed() {
        *db = env.pg.connect("app").await.ok()?;
    }
    let sql = if mode == "polling" {
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted"
    } else {
        // During a first start the leader holds the temporary slot it reads the
        // snapshot through; the real slot exists only once that is published. With
        // shards, the leader holds every shard's slot (a relay holding some lets go).
        "SELECT a.application_name FROM pg_replication_slots s JOIN pg_stat_activity a \
         ON a.pid = s.active_pid \
         WHERE s.slot_name ~ '^outbox_relay(_[0-9]+_of_[0-9]+)?$' \
            OR s.slot_name LIKE 'outbox\\_relay%\\_init\\_%' \
         GROUP BY 1 HAVING count(*) >= GREATEST(1, (SELECT count(*) FROM pg_replication_slots \
           WHERE slot_name ~ '^outbox_relay(_[0-9]+_of_[0-9]+)?$'))"
    };
    db.query_opt(sql, &[])
        .await
        .ok()
        .flatten()
        .map(|r| r.get(0))
}

/// Counts what a consumer saw, as `(key, n, event id)` in arrival order: how many distinct
/// events, and how many first occurrences broke their key's order (each key's `n` must
/// run 0, 1, 2, …; a duplicate is judged by its first copy only).
pub fn first_occurrences<'a>(
    seen: impl Iterator<Item = (&'a str, u64, &'a str)>,
) -> (usize, usize) {
    let mut first = HashSet::new();
    let mut next: HashMap<&str, u64> = HashMap::new();
    let mut reordered = 0;
    for (key, n, id) in seen {
        if !first.insert(id) {
            continue;
        }
        let expected = next.entry(key).or_insert(0);
        if n != *expected {
            reordered += 1;
        }
        *expected = n + 1;
    }
    (first.len(), reordered)
}

/// Writes `events` events, `PER_TXN` per transaction, with ids derived from (aggregate,
/// n), so a transaction retried after a lost connection cannot write an event twice.
async fn write(env_url: String, events: usize) {
    write_until(
        env_url,
        events,
        Duration::from_millis(25),
        CancellationToken::new(),
    )
    .await;
}

/// [`write`] until `events` are written or `stop` is cancelled, pausing `pause` after
/// each transaction; returns how many were written (a multiple of `PER_TXN`).
pub async fn write_until(
    env_url: String,
    events: usize,
    pause: Duration,
    stop: CancellationToken,
) -> usize {
    let mut n = 0;
    let mut client: Option<tokio_postgres::Client> = None;
    while n < events && !stop.is_cancelled() {
        let db = match &client {
            Some(c) if !c.is_closed() => c,
            _ => {
                match tokio_postgres::connect(&env_url, tokio_postgres::NoTls).await {
                    Ok((c, conn)) => {
                        tokio::spawn(async move {
                            let _ = conn.await;
                        });
                        client = Some(c);
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
                continue;
            }
        };
        let result = db
            .execute(
                "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) \
                 SELECT md5('agg-' || (i % $3) || ':' || (i / $3))::uuid, 'order', 'agg-' || (i % $3), \
                        'Tick', jsonb_build_object('n', i / $3) \
                 FROM generate_series($1::int8, $2::int8) i ON CONFLICT (id) DO NOTHING",
                &[&(n as i64), &((n + PER_TXN - 1) as i64), &(AGGREGATES as i64)],
            )
            .await;
        match result {
            Ok(_) => {
                n += PER_TXN;
                tokio::time::sleep(pause).await;
            }
            Err(_) => {
                client = None;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    n
}

/// `sharded`: log mode over two slots (PostgreSQL 15+; one slot before).
async fn fault_suite(mode: &'static str, sharded: bool) {
    let plan = plan();
    // A commit the writer saw must survive an immediate restart: the testkit's default
    // synchronous_commit=off could lose it in PostgreSQL itself, before any relay.
    let env = Env::start_on(&["synchronous_commit=on"], BrokerKind::None).await;
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("outbox.order", 4, 1).unwrap();
    cluster.create_topic("outbox.dlq", 1, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let seed: u64 = std::env::var("FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let shards = if sharded && env.pg_major().await >= 15 {
        "shards = 2\nmessage_prefix = \"\"\n"
    } else {
        ""
    };
    eprintln!("fault suite ({mode}): seed {seed}; {shards:?}");

    let config = |name: &str| {
        let toml = env
            .config_toml(mode, "", "")
            .replace(&env.kafka.brokers(), &brokers)
            .replace("/app\"", &format!("/app?application_name={name}\""))
            .replace("standby_retry = \"100ms\"", "standby_retry = \"300ms\"")
            .replace(
                "[source.polling]",
                &format!("[source.logical]\nstatus_interval = \"1s\"\nheartbeat_interval = \"0s\"\n{shards}\n[source.polling]"),
            );
        let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        f.write_all(toml.as_bytes()).unwrap();
        f
    };
    let (config_a, config_b) = (config("relay-a"), config("relay-b"));
    let mut relays = vec![
        Relay::spawn("relay-a", config_a.path()),
        Relay::spawn("relay-b", config_b.path()),
    ];
    let mut db = env.client().await;

    let writer = tokio::spawn(write(env.db_url.clone(), plan.events));
    let mut faults: Vec<Fault> = std::iter::repeat_n(Fault::KillLeader, plan.kills)
        .chain(std::iter::repeat_n(Fault::BrokerOutage, plan.outages))
        .chain((0..plan.db_restarts).map(|i| {
            if i % 2 == 0 {
                Fault::RestartFast
            } else {
                Fault::RestartImmediate
            }
        }))
        .collect();
    // Random order, random moments.
    for i in (1..faults.len()).rev() {
        faults.swap(i, rng.random_range(0..=i));
    }
    let mut takeovers = Vec::new();
    for fault in &faults {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1500))).await;
        match fault {
            Fault::KillLeader => {
                // Right after a restart or a failover there may be no leader for a moment.
                let mut current = None;
                for _ in 0..100 {
                    current = leader(&env, &mut db, mode).await;
                    if current.is_some() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let name = current.expect("a relay leads within 5 s");
                let idx = relays
                    .iter()
                    .position(|r| r.name == name)
                    .expect("known relay");
                let killed = Instant::now();
                relays[idx].process.kill9();
                // The standby must take over within 5 s.
                let deadline = killed + Duration::from_secs(5);
                loop {
                    if leader(&env, &mut db, mode).await.is_some_and(|l| l != name) {
                        takeovers.push(killed.elapsed());
                        break;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "no takeover within 5 s of killing {name}"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let config = if name == "relay-a" {
                    config_a.path()
                } else {
                    config_b.path()
                };
                relays[idx] = Relay::spawn(&name, config);
            }
            Fault::BrokerOutage => {
                cluster.broker_down(1).unwrap();
                tokio::time::sleep(plan.outage).await;
                cluster.broker_up(1).unwrap();
            }
            Fault::RestartFast | Fault::RestartImmediate => {
                let immediate = matches!(fault, Fault::RestartImmediate);
                tokio::task::block_in_place(|| env.pg.restart(immediate))
                    .expect("restart PostgreSQL");
            }
        }
    }
    writer.await.unwrap();

    // Read until every event arrived (or time runs out), duplicates included.
    let messages = tokio::task::spawn_blocking({
        let (brokers, events) = (brokers.clone(), plan.events);
        move || {
            let reader = Reader::new(&brokers, &["outbox.order"]).unwrap();
            let deadline = Instant::now() + Duration::from_secs(120);
            let (mut all, mut ids) = (Vec::new(), HashSet::new());
            while ids.len() < events && Instant::now() < deadline {
                if let Ok(Some(m)) = reader.next(Duration::from_millis(200)) {
                    let v: serde_json::Value = serde_json::from_slice(&m.value).unwrap();
                    let id = m.header("id").unwrap().to_owned();
                    ids.insert(id.clone());
                    all.push((m.key_str().to_owned(), v["n"].as_u64().unwrap(), id));
                }
            }
            all
        }
    })
    .await
    .unwrap();
    drop(relays);

    let (delivered, reordered) = first_occurrences(
        messages
            .iter()
            .map(|(k, n, id)| (k.as_str(), *n, id.as_str())),
    );
    let count = |f: fn(&Fault) -> bool| faults.iter().filter(|x| f(x)).count();
    let slowest = takeovers.iter().max().copied().unwrap_or_default();
    eprintln!(
        "\nfault suite, {mode} mode (seed {seed})\n\
         | kills | broker outages | db restarts (fast/immediate) | written | delivered | lost | reordered | duplicated | slowest takeover |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|\n\
         | {} | {} | {}/{} | {} | {} | {} | {} | {} | {:.2?} |\n",
        takeovers.len(),
        count(|f| matches!(f, Fault::BrokerOutage)),
        count(|f| matches!(f, Fault::RestartFast)),
        count(|f| matches!(f, Fault::RestartImmediate)),
        plan.events,
        delivered,
        plan.events - delivered,
        reordered,
        messages.len() - delivered,
        slowest,
    );
    assert_eq!(plan.events - delivered, 0, "events lost");
    assert_eq!(reordered, 0, "events reordered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_suite_polling() {
    fault_suite("polling", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_suite_logical() {
    // Over two slots: every guarantee of the suite holds with shards too.
    fault_suite("logical", true).await;
}
