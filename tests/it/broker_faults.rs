//! The broker fault suite: one relay on a steady write load into a three-node Apache
//! Kafka cluster (replication factor 3, `min.insync.replicas=2`), while the cluster
//! fails under it at random moments (the seed is printed; `FAULT_SEED` replays one):
//!
//! - the leader of a busy partition killed with SIGKILL, restarted with its data later;
//! - two nodes down at once, below `min.insync.replicas` (and the KRaft quorum): the
//!   relay must say it is not ready, hold its memory, lose nothing, and go on once they
//!   are back;
//! - a node paused (SIGSTOP), like a frozen VM, then resumed;
//! - the leader of a busy partition cut off from everyone by the kernel (nftables drops
//!   every packet its user sends and every packet to its ports): a network partition of
//!   one node, during which delivery must go on once Kafka elected new leaders;
//! - the whole cluster killed and restarted with its data.
//!
//! Afterwards every event written must be in Kafka, each aggregate's in order, read back
//! by an independent consumer; the relay's stall detection (`relay.stall_timeout`, at its
//! default) must not have fired: a leader election is not a wedged producer. A table like
//! the relay fault suite's is printed. CI runs the short plan; `OUTBOX_RELAY_LONG=1` the
//! long one (5 kills, 30 s outages and pauses).

use std::collections::HashSet;
use std::io::Write;
use std::time::{Duration, Instant};

use outbox_relay::testkit::apache_kafka::{Kafka, KafkaOptions};
use outbox_relay::testkit::kafka::{partition_leader, under_replicated};
use outbox_relay::testkit::netfault::Cut;
use outbox_relay::testkit::{free_port, http_get};
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

use crate::faults::{first_occurrences, write_until};
use crate::support::{spawn_relay, ArrivalReader, Broker, BrokerKind, Env};

const PARTITIONS: i32 = 4;

/// One message read back: key, the event's `n`, its id, and when it arrived.
/// Far more than the run writes: the writer is stopped when the faults are over.
const WRITE_LIMIT: usize = 10_000_000;

struct Plan {
    kills: usize,
    outage: Duration,
    pause: Duration,
}

fn plan() -> Plan {
    if std::env::var("OUTBOX_RELAY_LONG").is_ok_and(|v| v == "1") {
        Plan {
            kills: 5,
            outage: Duration::from_secs(30),
            pause: Duration::from_secs(30),
        }
    } else {
        Plan {
            kills: 2,
            // Longer than the 15 s after which events without an answer make the relay
            // not ready.
            outage: Duration::from_secs(20),
            pause: Duration::from_secs(10),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    KillLeader,
    TwoDown,
    Pause,
    FullRestart,
    CutOff,
}

/// What happened while one node was cut off.
#[derive(Default, Debug)]
struct Partitioned {
    /// How long `/readyz` answered 503 (polled every 500 ms), and its first reason.
    not_ready_for: Duration,
    not_ready: Option<String>,
    /// Events that arrived after the first 12 s of the cut (the 9 s session timeout and
    /// an election), and events Kafka acknowledged to the relay meanwhile: delivery
    /// must have gone on.
    delivered_after_election: usize,
    published_after_election: u64,
}

/// What the relay said while two nodes were down.
#[derive(Default)]
struct Outage {
    not_ready: Option<String>,
    back_ready_after: Option<Duration>,
}

/// The index of the node leading `topic`'s `partition` (blocking).
fn leader_node(kafka: &Kafka, topic: &str, partition: i32) -> usize {
    let id = partition_leader(&kafka.brokers(), topic, partition, Duration::from_secs(5))
        .expect("a leader");
    kafka.index_of(id).expect("a node of ours")
}

async fn relay_get(port: u16, path: &str) -> Option<(u16, String)> {
    http_get(([127, 0, 0, 1], port).into(), path).await.ok()
}

/// Blocks (in place) until every partition has its three replicas in sync again, so the
/// next fault starts from a healthy cluster.
fn wait_in_sync(kafka: &Kafka, topic: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while under_replicated(&kafka.brokers(), topic, 3, Duration::from_secs(3)).unwrap_or(1) > 0 {
        assert!(
            Instant::now() < deadline,
            "partitions still under-replicated 120 s after a fault"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

async fn broker_fault_suite(mode: &'static str) {
    let plan = plan();
    let seed: u64 = std::env::var("FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    eprintln!("broker fault suite ({mode}): seed {seed}");
    let started = Instant::now();
    let mut env = Env::start_on(
        &["synchronous_commit=on"],
        BrokerKind::OwnKafka(KafkaOptions {
            nodes: 3,
            own_users: true,
            ..KafkaOptions::default()
        }),
    )
    .await;
    eprintln!("three-node cluster ready in {:.1?}", started.elapsed());
    env.create_topics(&["outbox.order", "outbox.dlq"], PARTITIONS)
        .await;
    let topic = env.topic("outbox.order");
    let http = free_port().unwrap();
    let toml = env
        .config_toml(mode, "", "")
        // The default stall timeout: what must hold through real elections.
        .replace("stall_timeout = \"10s\"\n", "")
        .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"127.0.0.1:{http}\""))
        .replace(
            "[source.polling]",
            "[source.logical]\nstatus_interval = \"1s\"\nheartbeat_interval = \"0s\"\n\n[source.polling]",
        );
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    file.write_all(toml.as_bytes()).unwrap();
    let relay = spawn_relay(file.path());

    // The independent consumer reads all along, so stalls are seen when they happen.
    let mut reader = ArrivalReader::start(
        env.kafka.brokers(),
        topic.clone(),
        Duration::from_millis(200),
    );
    let arrivals = reader.seen.clone();
    let stop_writing = CancellationToken::new();
    let writer = tokio::spawn(write_until(
        env.db_url.clone(),
        WRITE_LIMIT,
        Duration::from_millis(50),
        stop_writing.clone(),
    ));

    let mut faults: Vec<Fault> = std::iter::repeat_n(Fault::KillLeader, plan.kills)
        .chain([
            Fault::TwoDown,
            Fault::Pause,
            Fault::FullRestart,
            Fault::CutOff,
        ])
        .collect();
    for i in (1..faults.len()).rev() {
        faults.swap(i, rng.random_range(0..=i));
    }
    let Broker::Own(kafka) = &mut env.kafka else {
        unreachable!()
    };
    let mut outage = Outage::default();
    let mut partitioned = Partitioned::default();
    let mut peak_rss_before_outage = 0;
    let mut elections = Vec::new();
    for fault in &faults {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1000..3000))).await;
        let at = Instant::now();
        match fault {
            Fault::KillLeader => {
                let partition = rng.random_range(0..PARTITIONS);
                let node = tokio::task::block_in_place(|| leader_node(kafka, &topic, partition));
                kafka.kill(node);
                tokio::time::sleep(Duration::from_millis(rng.random_range(2000..5000))).await;
                tokio::task::block_in_place(|| {
                    kafka.restart(node).unwrap();
                    kafka.wait_all_ready().unwrap();
                    wait_in_sync(kafka, &topic);
                });
                elections.push(at.elapsed());
            }
            Fault::TwoDown => {
                peak_rss_before_outage = relay.peak_rss();
                let spared = rng.random_range(0..3);
                let down: Vec<usize> = (0..3).filter(|n| *n != spared).collect();
                for &n in &down {
                    kafka.kill(n);
                }
                let until = Instant::now() + plan.outage;
                while Instant::now() < until {
                    if let Some((503, body)) = relay_get(http, "/readyz").await {
                        outage.not_ready.get_or_insert(body);
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                let back = Instant::now();
                tokio::task::block_in_place(|| {
                    for &n in &down {
                        kafka.restart(n).unwrap();
                    }
                    kafka.wait_all_ready().unwrap();
                });
                let deadline = Instant::now() + Duration::from_secs(90);
                while Instant::now() < deadline {
                    if let Some((200, _)) = relay_get(http, "/readyz").await {
                        outage.back_ready_after = Some(back.elapsed());
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                tokio::task::block_in_place(|| wait_in_sync(kafka, &topic));
            }
            Fault::Pause => {
                let partition = rng.random_range(0..PARTITIONS);
                let node = tokio::task::block_in_place(|| leader_node(kafka, &topic, partition));
                kafka.pause(node);
                tokio::time::sleep(plan.pause).await;
                kafka.resume(node);
                tokio::task::block_in_place(|| wait_in_sync(kafka, &topic));
            }
            Fault::CutOff => {
                let partition = rng.random_range(0..PARTITIONS);
                let node = tokio::task::block_in_place(|| leader_node(kafka, &topic, partition));
                let uid = kafka
                    .node_uid(node)
                    .expect("nodes run as users of their own");
                let cut = Cut::process(uid, &kafka.node_ports(node)).expect("cut the node off");
                let until = Instant::now() + plan.outage;
                // A loaded machine (CI's two test slots) can take longer to elect and
                // to let the producer find the new leaders: the cut then lasts longer
                // too, until something was published after the election, up to 25 s
                // more. Delivery must still resume while the node is cut off.
                let give_up = until + Duration::from_secs(25);
                let elected = at + Duration::from_secs(12);
                let mut published_at_election = None;
                loop {
                    let now = Instant::now();
                    if now >= until {
                        let moved = match published_at_election {
                            Some(then) => published(http).await > then,
                            None => false,
                        };
                        if moved || now >= give_up {
                            break;
                        }
                    }
                    if let Some((503, body)) = relay_get(http, "/readyz").await {
                        partitioned.not_ready.get_or_insert(body);
                        partitioned.not_ready_for += Duration::from_millis(500);
                    }
                    if published_at_election.is_none() && Instant::now() >= elected {
                        published_at_election = Some(published(http).await);
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                partitioned.published_after_election =
                    published(http).await - published_at_election.unwrap_or_default();
                partitioned.delivered_after_election = arrivals
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|a| a.at > elected)
                    .count();
                drop(cut);
                tokio::task::block_in_place(|| {
                    kafka.wait_all_ready().unwrap();
                    wait_in_sync(kafka, &topic);
                });
            }
            Fault::FullRestart => {
                for n in 0..3 {
                    kafka.kill(n);
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
                tokio::task::block_in_place(|| {
                    for n in 0..3 {
                        kafka.restart(n).unwrap();
                    }
                    kafka.wait_all_ready().unwrap();
                    wait_in_sync(kafka, &topic);
                });
            }
        }
        eprintln!(
            "{fault:?}: {:.1?} until the cluster was whole again",
            at.elapsed()
        );
        // The next fault waits for a delivery after this one: back-to-back outages with
        // no acknowledgement between them add up past relay.stall_timeout on a slow
        // machine (a full restart, then two nodes down: 61 s), and a stall across two
        // faults is not the wedged producer the check is about.
        let seen = arrivals.lock().unwrap().len();
        let deadline = Instant::now() + Duration::from_secs(30);
        while arrivals.lock().unwrap().len() == seen && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    stop_writing.cancel();
    let written = writer.await.unwrap();

    // Everything written must arrive; wait for it (or time out and count what is lost).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ids: HashSet<String> = arrivals
            .lock()
            .unwrap()
            .iter()
            .map(|a| a.id.clone())
            .collect();
        if ids.len() >= written || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metrics = relay_get(http, "/metrics")
        .await
        .map(|m| m.1)
        .unwrap_or_default();
    let stalled = stalled_count(&metrics);
    let peak_rss = relay.peak_rss();
    reader.stop();
    drop(relay);

    let arrivals = arrivals.lock().unwrap();
    let (delivered, reordered) = first_occurrences(
        arrivals
            .iter()
            .map(|a| (a.key.as_str(), a.n, a.id.as_str())),
    );
    let longest_stall = arrivals
        .windows(2)
        .map(|w| w[1].at.duration_since(w[0].at))
        .max()
        .unwrap_or_default();
    let slowest_election = elections.iter().max().copied().unwrap_or_default();
    eprintln!(
        "\nbroker fault suite, {mode} mode, Apache Kafka x3 (seed {seed})\n\
         | leader kills | two down | pause | full restart | written | delivered | lost | reordered | duplicated | longest stall | stall replacements | peak RSS |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n\
         | {} | {:?} | {:?} | 1 | {} | {} | {} | {} | {} | {:.1?} | {} | {} MiB |\n\
         not ready during the outage: {:?}; ready again {:?} after the nodes returned; \
         slowest leader kill until whole: {:.1?}\n",
        plan.kills,
        plan.outage,
        plan.pause,
        written,
        delivered,
        written.saturating_sub(delivered),
        reordered,
        arrivals.len() - delivered,
        longest_stall,
        stalled,
        peak_rss >> 20,
        outage.not_ready,
        outage.back_ready_after,
        slowest_election,
    );
    eprintln!("one node cut off for {:?}: {partitioned:?}", plan.outage);
    assert!(written > 0, "the writer wrote nothing");
    assert!(
        partitioned.published_after_election > 0,
        "delivery goes on while one node of three is cut off: {partitioned:?}"
    );
    assert_eq!(written.saturating_sub(delivered), 0, "events lost");
    assert_eq!(reordered, 0, "events reordered");
    assert_eq!(
        stalled, 0,
        "relay.stall_timeout fired during a broker fault"
    );
    let not_ready = outage
        .not_ready
        .expect("not ready while two nodes were down");
    assert!(not_ready.contains("kafka"), "{not_ready}");
    assert!(
        outage.back_ready_after.is_some(),
        "ready again after the outage"
    );
    // Held memory: the backlog stays in PostgreSQL, not in the relay.
    assert!(
        peak_rss < peak_rss_before_outage.max(64 << 20) * 2,
        "peak RSS {} MiB after the outage, {} MiB before",
        peak_rss >> 20,
        peak_rss_before_outage >> 20
    );
}

/// Events Kafka acknowledged to the relay so far (`outbox_relay_events_published_total`).
async fn published(http: u16) -> u64 {
    let metrics = relay_get(http, "/metrics")
        .await
        .map(|m| m.1)
        .unwrap_or_default();
    metrics
        .lines()
        .filter(|l| l.starts_with(outbox_relay::metrics::EVENTS_PUBLISHED))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Producer replacements after a stall (`outbox_relay_failures_total{reason="stalled"}`).
fn stalled_count(metrics: &str) -> u64 {
    let series = format!("{}{{reason=\"stalled\"}} ", outbox_relay::metrics::FAILURES);
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .expect("the relay's metrics") as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_fault_suite_polling() {
    broker_fault_suite("polling").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_fault_suite_logical() {
    broker_fault_suite("logical").await;
}
