//! Network faults an application sees: a peer that stops answering (black hole), a slow
//! link, connections reset again and again — on the relay's links to PostgreSQL (the SQL
//! and the replication connections) and to Kafka, through `testkit::proxy`, under a
//! steady writer. The relay's own broker advertises the proxy to it (a second listener),
//! while the test's consumer and the brokers' own traffic go direct, so arrivals are seen
//! when they happen. A partition made by the kernel is `partitions.rs`'s.
//!
//! One relay goes through the faults in turn; afterwards an independent consumer's record
//! is checked against what was written: nothing lost, nothing reordered per key, no
//! duplicate in exactly-once. Each phase reports how soon `/readyz` turned 503 and how
//! long after the heal the first event arrived. CI runs 15 s faults; `OUTBOX_RELAY_LONG=1`
//! runs 60 s faults, three times each.

use std::collections::HashSet;
use std::io::Write;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use outbox_relay::testkit::apache_kafka::KafkaOptions;
use outbox_relay::testkit::proxy::{Fault, Proxy};
use outbox_relay::testkit::{free_port, http_get};
use tokio_util::sync::CancellationToken;

use crate::faults::first_occurrences;
use crate::support::{spawn_relay, Arrival, ArrivalReader, Broker, BrokerKind, Env, RelayProcess};

const AGGREGATES: i64 = 8;
const PER_TXN: i64 = 4;

/// One event as the consumer saw it: key, n, id, when it was written (ms since the
/// epoch, from the payload), when it arrived.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    PostgresBlackHole,
    KafkaBlackHole,
    Latency,
    Resets,
}

#[derive(Debug)]
struct PhaseReport {
    phase: Phase,
    /// From the fault's start until `/readyz` said 503 (None: it never did).
    not_ready_after: Option<Duration>,
    /// From the heal until the first event arrived after it.
    first_delivery_after_heal: Option<Duration>,
    /// Events that arrived while the fault lasted.
    delivered_during: usize,
    /// 99th percentile of write-to-arrival, for events that arrived during the fault.
    p99: Option<Duration>,
}

/// When the scenario's writer wrote `a` (its payloads all carry `at`).
fn written(a: &Arrival) -> u64 {
    a.written_ms.expect("the writer's payloads carry `at`")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Writes `PER_TXN` events per transaction every 50 ms until stopped, each stamped with
/// its write time; ids derive from (aggregate, n), so a transaction retried after a lost
/// connection cannot write an event twice. Returns how many were written.
async fn write_stamped(url: String, stop: CancellationToken) -> i64 {
    let mut n = 0;
    let mut client: Option<tokio_postgres::Client> = None;
    while !stop.is_cancelled() {
        let db = match &client {
            Some(c) if !c.is_closed() => c,
            _ => {
                if let Ok((c, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                    tokio::spawn(conn);
                    client = Some(c);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let written = db
            .execute(
                "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) \
                 SELECT md5('agg-' || (i % $3) || ':' || (i / $3))::uuid, 'order', 'agg-' || (i % $3), \
                        'Tick', jsonb_build_object('n', i / $3, 'at', $4::int8) \
                 FROM generate_series($1::int8, $2::int8) i ON CONFLICT (id) DO NOTHING",
                &[&n, &(n + PER_TXN - 1), &AGGREGATES, &(now_ms() as i64)],
            )
            .await;
        match written {
            Ok(_) => n += PER_TXN,
            Err(_) => client = None,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    n
}

struct Rig {
    env: Env,
    pg: Proxy,
    kafka: Proxy,
    http: u16,
    relay: RelayProcess,
    arrivals: ArrivalReader,
    file: tempfile::NamedTempFile,
}

impl Rig {
    async fn start(mode: &str, exactly_once: bool) -> Rig {
        let kafka = Proxy::start(None).unwrap();
        let env = Env::start_on(
            &["synchronous_commit=on"],
            BrokerKind::OwnKafka(KafkaOptions {
                advertised_ports: vec![kafka.port()],
                ..KafkaOptions::default()
            }),
        )
        .await;
        let Broker::Own(own) = &env.kafka else {
            unreachable!()
        };
        kafka.set_upstream(([127, 0, 0, 1], own.proxied_port(0).unwrap()).into());
        let pg = Proxy::start(Some(([127, 0, 0, 1], env.pg.port()).into())).unwrap();
        env.create_topics(&["outbox.order", "outbox.dlq"], 4).await;
        env.create_topics(&["checkpoints"], 1).await;
        let http = free_port().unwrap();
        let mut toml = env
            .config_toml(mode, "", "")
            .replace(
                &format!("@127.0.0.1:{}/", env.pg.port()),
                &format!("@127.0.0.1:{}/", pg.port()),
            )
            .replace(
                &format!("brokers = \"{}\"", env.kafka.brokers()),
                &format!("brokers = \"127.0.0.1:{}\"", kafka.port()),
            )
            .replace("127.0.0.1:0", &format!("127.0.0.1:{http}"));
        assert!(toml.contains(&format!(":{}/", pg.port())), "{toml}");
        if exactly_once {
            toml = toml.replacen(
                "[sink.kafka]\n",
                "[sink.kafka]\ndelivery = \"exactly_once\"\ncheckpoint_topic = \"checkpoints\"\n",
                1,
            );
        }
        let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        file.write_all(toml.as_bytes()).unwrap();
        let relay = spawn_relay(file.path());

        let arrivals = ArrivalReader::start(
            env.kafka.brokers(),
            "outbox.order".to_owned(),
            Duration::from_millis(100),
        );
        Rig {
            env,
            pg,
            kafka,
            http,
            relay,
            arrivals,
            file,
        }
    }

    async fn ready(&self) -> Option<bool> {
        match http_get(([127, 0, 0, 1], self.http).into(), "/readyz").await {
            Ok((200, _)) => Some(true),
            Ok((_, _)) => Some(false),
            Err(_) => None,
        }
    }

    async fn wait_ready(&self, within: Duration) {
        let start = Instant::now();
        while self.ready().await != Some(true) {
            assert!(
                start.elapsed() < within,
                "the relay is not ready within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until the backlog a fault left is gone: the newest arrival was written less
    /// than a second before it arrived, so the next phase's figures are its own.
    async fn wait_caught_up(&self, within: Duration) {
        let start = Instant::now();
        loop {
            let fresh = self.arrivals.seen.lock().unwrap().last().is_some_and(|a| {
                let arrived_ms = now_ms() - a.at.elapsed().as_millis() as u64;
                a.at > start && arrived_ms.saturating_sub(written(a)) < 1000
            });
            if fresh {
                return;
            }
            assert!(
                start.elapsed() < within,
                "no fresh delivery within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn arrived(&self) -> usize {
        self.arrivals.seen.lock().unwrap().len()
    }

    /// Runs `phase` for `length`, watching readiness, then heals and waits for the first
    /// delivery after the heal.
    async fn run(&self, phase: Phase, length: Duration) -> PhaseReport {
        let before = self.arrived();
        let start = Instant::now();
        let mut not_ready_after = None;
        let mut acked_at_drop = None;
        match phase {
            Phase::PostgresBlackHole => self.pg.set(Fault::BlackHole),
            Phase::KafkaBlackHole => self.kafka.set(Fault::BlackHole),
            Phase::Latency => {
                self.pg.set(Fault::Latency(Duration::from_millis(200)));
                self.kafka.set(Fault::Latency(Duration::from_millis(200)));
            }
            Phase::Resets => {}
        }
        let mut next_reset = Instant::now();
        while start.elapsed() < length {
            if phase == Phase::Resets && Instant::now() >= next_reset {
                self.pg.reset_all();
                self.kafka.reset_all();
                next_reset += Duration::from_secs(2);
            }
            if not_ready_after.is_none() && self.ready().await == Some(false) {
                not_ready_after = Some(start.elapsed());
                if phase == Phase::KafkaBlackHole {
                    acked_at_drop = Some(self.acked().await);
                }
                let link = match phase {
                    Phase::PostgresBlackHole => Some("postgres"),
                    Phase::KafkaBlackHole => Some("kafka"),
                    _ => None,
                };
                if let Some(link) = link {
                    let (code, text) = self.status().await;
                    assert_eq!(code, Some(1), "{text}");
                    assert!(
                        text.contains(&format!("down:     the relay's link to {link}")),
                        "status names the link that is down: {text}"
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        if let Some(at_drop) = acked_at_drop {
            assert_eq!(
                self.acked().await,
                at_drop,
                "nothing is acknowledged to PostgreSQL while Kafka answers nothing"
            );
        }
        let during: Vec<Duration> = self.arrivals.seen.lock().unwrap()[before..]
            .iter()
            .map(|a| {
                let arrived_ms = now_ms() - a.at.elapsed().as_millis() as u64;
                Duration::from_millis(arrived_ms.saturating_sub(written(a)))
            })
            .collect();
        self.pg.set(Fault::Pass);
        self.kafka.set(Fault::Pass);
        let healed = Instant::now();
        let mut first_delivery_after_heal = None;
        while healed.elapsed() < Duration::from_secs(60) {
            let first = (self.arrivals.seen.lock().unwrap().iter().rev())
                .take_while(|x| x.at >= healed)
                .last()
                .map(|x| x.at);
            if let Some(first) = first {
                first_delivery_after_heal = Some(first - healed);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut sorted = during.clone();
        sorted.sort();
        PhaseReport {
            phase,
            not_ready_after,
            first_delivery_after_heal,
            delivered_during: during.len(),
            p99: (!sorted.is_empty()).then(|| sorted[(sorted.len() * 99).div_ceil(100) - 1]),
        }
    }

    /// `outbox-relay status` with the relay's own configuration (its database URL names
    /// the proxy too): exit code and output.
    async fn status(&self) -> (Option<i32>, String) {
        let path = self.file.path().to_owned();
        tokio::task::spawn_blocking(move || {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
                .args(["status", "--config"])
                .arg(path)
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
            )
        })
        .await
        .unwrap()
    }

    /// What the relay acknowledged to PostgreSQL: the outbox's lowest `seq` (polling
    /// deletes from the head) or the slot's confirmed position (log mode), read direct.
    async fn acked(&self) -> String {
        let db = self.env.client().await;
        let row = db
            .query_one(
                "SELECT coalesce((SELECT confirmed_flush_lsn::text FROM pg_replication_slots \
                   WHERE slot_name = 'outbox_relay'), (SELECT min(seq)::text FROM outbox), '')",
                &[],
            )
            .await
            .unwrap();
        row.get(0)
    }
}

/// The faults in turn under one relay; returns the phase reports and asserts the record.
async fn through_the_faults(mode: &'static str, exactly_once: bool) -> Vec<PhaseReport> {
    let long = std::env::var("OUTBOX_RELAY_LONG").is_ok_and(|v| v == "1");
    let (length, rounds) = if long {
        (Duration::from_secs(60), 3)
    } else {
        (Duration::from_secs(15), 1)
    };
    let mut rig = Rig::start(mode, exactly_once).await;
    rig.wait_ready(Duration::from_secs(60)).await;
    let stop = CancellationToken::new();
    let writer = tokio::spawn(write_stamped(rig.env.db_url.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut reports = Vec::new();
    for _ in 0..rounds {
        for phase in [
            Phase::PostgresBlackHole,
            Phase::KafkaBlackHole,
            Phase::Latency,
            Phase::Resets,
        ] {
            let report = rig.run(phase, length).await;
            eprintln!("{mode} exactly_once={exactly_once}: {report:?}");
            reports.push(report);
            assert!(rig.relay.is_running(), "the relay runs on after {phase:?}");
            // Settle before the next fault, so each starts from a relay that publishes
            // what is written as it is written.
            rig.wait_ready(Duration::from_secs(60)).await;
            rig.wait_caught_up(Duration::from_secs(60)).await;
        }
    }
    stop.cancel();
    let written = writer.await.unwrap() as usize;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let distinct: HashSet<String> = rig
            .arrivals
            .seen
            .lock()
            .unwrap()
            .iter()
            .map(|a| a.id.clone())
            .collect();
        if distinct.len() >= written || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Time for late duplicates to show.
    tokio::time::sleep(Duration::from_secs(2)).await;
    rig.arrivals.stop();
    let seen = rig.arrivals.seen.lock().unwrap().clone();
    let (distinct, reordered) =
        first_occurrences(seen.iter().map(|a| (a.key.as_str(), a.n, a.id.as_str())));
    let duplicates = seen.len() - distinct;
    eprintln!(
        "{mode} exactly_once={exactly_once}: written {written}, distinct {distinct}, \
         reordered {reordered}, duplicates {duplicates}"
    );
    rig.relay.kill9();
    assert_eq!(distinct, written, "nothing lost");
    assert_eq!(reordered, 0, "nothing reordered");
    if exactly_once {
        assert_eq!(duplicates, 0, "nothing twice");
    }
    reports
}

fn assert_phases(reports: &[PhaseReport]) {
    for r in reports {
        match r.phase {
            Phase::PostgresBlackHole | Phase::KafkaBlackHole => {
                let after = r.not_ready_after.expect("readiness drops in a black hole");
                assert!(after <= Duration::from_secs(15), "{r:?}");
            }
            Phase::Latency => {
                // The delay was really there: each event crossed at least one slowed link.
                let p99 = r.p99.expect("progress goes on under latency");
                assert!(p99 >= Duration::from_millis(200), "{r:?}");
            }
            Phase::Resets => assert!(r.delivered_during > 0, "progress goes on: {r:?}"),
        }
        let back = r
            .first_delivery_after_heal
            .expect("events flow after the heal");
        assert!(back <= Duration::from_secs(30), "{r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_at_least_once_through_black_holes_latency_and_resets() {
    let reports = through_the_faults("polling", false).await;
    assert_phases(&reports);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_mode_exactly_once_through_black_holes_latency_and_resets() {
    let reports = through_the_faults("logical", true).await;
    assert_phases(&reports);
}

/// The other two pairings, on demand (`OUTBOX_RELAY_LONG=1`): CI's two cover both modes
/// and both deliveries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_polling_exactly_once_and_log_mode_at_least_once_through_the_faults() {
    if std::env::var("OUTBOX_RELAY_LONG").is_ok_and(|v| v == "1") {
        assert_phases(&through_the_faults("polling", true).await);
        assert_phases(&through_the_faults("logical", false).await);
    }
}
