//! `sink.kafka.delivery = "exactly_once"` on Apache Kafka: each batch one transaction
//! with its checkpoint, read back with `isolation.level=read_committed` (the testkit's
//! reader). What a crash between Kafka's commit and PostgreSQL's acknowledgement leaves
//! behind is published once, a killed leader's open transaction is never seen, and a
//! paused old leader is fenced.

use std::collections::HashSet;
use std::io::Write;
use std::time::{Duration, Instant};

use outbox_relay::sink::kafka::checkpoint::{self, Checkpoint};
use outbox_relay::testkit::kafka::Reader;
use rand::{Rng, SeedableRng};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;
use tokio_util::sync::CancellationToken;

use crate::faults::{first_occurrences, leader, write_until};
use crate::support::{insert_events, load_toml, spawn_relay, Env, RelayProcess, RunningRelay};

/// The `[sink.kafka]` lines of exactly-once delivery, under this test's prefix.
fn exactly_once(env: &Env, transactional_id: &str) -> String {
    format!(
        "delivery = \"exactly_once\"\ncheckpoint_topic = \"{}\"\n{}",
        env.topic("checkpoints"),
        if transactional_id.is_empty() {
            String::new()
        } else {
            format!("transactional_id = \"{}{transactional_id}\"\n", env.ns)
        }
    )
}

/// `toml` with `lines` added to its `[sink.kafka]` table.
fn in_sink(toml: &str, lines: &str) -> String {
    toml.replacen("[sink.kafka]\n", &format!("[sink.kafka]\n{lines}"), 1)
}

/// Commits `cp` as the checkpoint of `transactional_id`, as a relay would.
async fn commit_checkpoint(env: &Env, transactional_id: &str, cp: Checkpoint, epoch: &str) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", env.kafka.brokers())
        .set("transactional.id", transactional_id)
        .create()
        .unwrap();
    let p = producer.clone();
    tokio::task::spawn_blocking(move || p.init_transactions(Duration::from_secs(30)))
        .await
        .unwrap()
        .unwrap();
    producer.begin_transaction().unwrap();
    let value = cp.encode(epoch);
    let topic = env.topic("checkpoints");
    producer
        .send(
            FutureRecord::to(&topic)
                .key(transactional_id)
                .payload(&value),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    tokio::task::spawn_blocking(move || producer.commit_transaction(Duration::from_secs(30)))
        .await
        .unwrap()
        .unwrap();
}

async fn read_checkpoint(env: &Env, toml: &str, transactional_id: &str, epoch: &str) -> Checkpoint {
    let config = load_toml(toml);
    let (id, epoch) = (transactional_id.to_owned(), epoch.to_owned());
    tokio::task::spawn_blocking(move || {
        checkpoint::read_last(&config.sink, &id, &epoch, Duration::from_secs(30))
    })
    .await
    .unwrap()
    .unwrap()
    .unwrap_or_else(|| {
        panic!(
            "no checkpoint of {transactional_id} in {}",
            env.topic("checkpoints")
        )
    })
}

fn payload_n(m: &outbox_relay::testkit::kafka::Consumed) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(&m.value).unwrap();
    v["n"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_publishes_each_event_once_and_records_its_checkpoint() {
    let env = Env::start().await;
    env.create_topics(&["outbox.order"], 3).await;
    let toml = in_sink(
        &env.config_toml("polling", "", ""),
        &exactly_once(&env, "poll"),
    );
    let relay = RunningRelay::start(load_toml(&toml));
    let db = env.client().await;
    for t in 0..10u64 {
        let rows: Vec<(String, String)> = (0..50)
            .map(|i| {
                (
                    format!("agg-{}", i % 7),
                    format!("{{\"n\": {}}}", t * 50 + i),
                )
            })
            .collect();
        insert_events(&db, &rows).await;
    }
    let max_seq: i64 = db
        .query_one("SELECT max(seq) FROM outbox", &[])
        .await
        .unwrap()
        .get(0);
    let got = env.consume(&["outbox.order"], 500, 60).await;
    env.wait_outbox_empty(Duration::from_secs(20)).await;
    relay.stop().await;

    assert_eq!(got.len(), 500);
    let ids: HashSet<&str> = got.iter().map(|m| m.header("id").unwrap()).collect();
    assert_eq!(ids.len(), 500, "no duplicates");
    let mut by_key: std::collections::HashMap<&str, u64> = Default::default();
    for m in &got {
        let n = payload_n(m);
        if let Some(prev) = by_key.insert(m.key_str(), n) {
            assert!(prev < n, "{} out of order: {prev} then {n}", m.key_str());
        }
    }
    assert_eq!(env.outbox_count().await, 0);
    let oid: u32 = db
        .query_one("SELECT 'outbox'::regclass::oid", &[])
        .await
        .unwrap()
        .get(0);
    let cp = read_checkpoint(&env, &toml, &env.topic("poll"), &oid.to_string()).await;
    assert_eq!(
        cp,
        Checkpoint {
            position: outbox_relay::event::Position::Seq(max_seq),
            count: 1
        }
    );
}

/// The crash window, made on purpose: Kafka has the first rows (the checkpoint says so)
/// but PostgreSQL still holds them. They are deleted, never published again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_deletes_what_the_checkpoint_covers_without_publishing_it() {
    let env = Env::start().await;
    env.create_topics(&["outbox.order"], 1).await;
    env.create_topics_with(&["checkpoints"], 1, &[("cleanup.policy", "compact")])
        .await;
    let db = env.client().await;
    let rows: Vec<(String, String)> = (0..10)
        .map(|i| ("agg".to_owned(), format!("{{\"n\": {i}}}")))
        .collect();
    insert_events(&db, &rows).await;
    let seqs: Vec<i64> = db
        .query("SELECT seq FROM outbox ORDER BY seq", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let oid: u32 = db
        .query_one("SELECT 'outbox'::regclass::oid", &[])
        .await
        .unwrap()
        .get(0);
    let id = env.topic("crash");
    let covered = Checkpoint {
        position: outbox_relay::event::Position::Seq(seqs[5]),
        count: 1,
    };
    commit_checkpoint(&env, &id, covered, &oid.to_string()).await;
    // A checkpoint of another incarnation of the table (another OID) is not trusted.
    commit_checkpoint(&env, &format!("{id}-other"), covered, "1").await;

    let toml = in_sink(
        &env.config_toml("polling", "", ""),
        &exactly_once(&env, "crash"),
    );
    let relay = RunningRelay::start(load_toml(&toml));
    let got = env.consume(&["outbox.order"], 4, 30).await;
    env.wait_outbox_empty(Duration::from_secs(20)).await;
    // Anything published beyond the 4 would have arrived by now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let all = env.consume(&["outbox.order"], 11, 2).await;
    relay.stop().await;
    let ns: Vec<u64> = got.iter().map(payload_n).collect();
    assert_eq!(ns, [6, 7, 8, 9], "only the rows after the checkpoint");
    assert_eq!(all.len(), 4, "nothing else was published");
    assert_eq!(env.outbox_count().await, 0, "the covered rows are deleted");
}

/// Log mode, with a checkpoint in the middle of a PostgreSQL transaction: of its five
/// events the first three are in Kafka; the restart publishes the last two and the next
/// transaction, and flushes the slot past both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_mode_skips_exactly_the_events_the_checkpoint_covers_mid_transaction() {
    let env = Env::start().await;
    env.create_topics(&["outbox.order", "again.order"], 1).await;
    let base = in_sink(
        &env.config_toml("logical", "", ""),
        &exactly_once(&env, "log"),
    );
    let id = env.topic("log");
    let db = env.client().await;

    // A first run makes the publication and its slot and publishes transaction A.
    let relay = RunningRelay::start(load_toml(&base));
    let mut first = None;
    for _ in 0..200 {
        let n: i64 = db
            .query_one("SELECT count(*) FROM pg_replication_slots", &[])
            .await
            .unwrap()
            .get(0);
        if n > 0 {
            first = Some(());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    first.expect("the relay made its slot");
    // A second slot from here on replays A for the second run.
    db.execute(
        "SELECT pg_create_logical_replication_slot('replay', 'pgoutput')",
        &[],
    )
    .await
    .unwrap();
    let a: Vec<(String, String)> = (0..5)
        .map(|i| ("agg".to_owned(), format!("{{\"n\": {i}}}")))
        .collect();
    insert_events(&db, &a).await;
    assert_eq!(env.consume(&["outbox.order"], 5, 30).await.len(), 5);
    relay.stop().await;
    let after_a = read_checkpoint(&env, &base, &id, "").await;
    assert_eq!(
        after_a.count, 5,
        "one transaction of five events: {after_a:?}"
    );

    // Kafka has 3 of A's 5 events, say; then B is written.
    commit_checkpoint(
        &env,
        &id,
        Checkpoint {
            count: 3,
            ..after_a
        },
        "",
    )
    .await;
    let b: Vec<(String, String)> = (5..10)
        .map(|i| ("agg".to_owned(), format!("{{\"n\": {i}}}")))
        .collect();
    insert_events(&db, &b).await;

    let again = env.with_topic(&base, "again.{aggregate_type}").replace(
        "[source.polling]",
        "[source.logical]\nslot = \"replay\"\n\n[source.polling]",
    );
    let relay = RunningRelay::start(load_toml(&again));
    let got = env.consume(&["again.order"], 7, 30).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let all = env.consume(&["again.order"], 8, 2).await;
    relay.stop().await;
    let ns: Vec<u64> = got.iter().map(payload_n).collect();
    assert_eq!(ns, [3, 4, 5, 6, 7, 8, 9]);
    assert_eq!(all.len(), 7, "nothing else was published");
    let after_b = read_checkpoint(&env, &again, &id, "").await;
    assert_eq!(after_b.count, 5);
    assert!(after_b.position > after_a.position);
    let flushed: String = db
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'replay'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let flushed: outbox_relay::event::Lsn = flushed.parse().unwrap();
    assert!(
        outbox_relay::event::Position::Lsn(flushed) >= after_b.position,
        "the slot is flushed past B ({flushed} < {})",
        after_b.position
    );
}

/// Two relays (`relay-a`, `relay-b`) on one outbox, their config files kept with them.
struct Pair {
    files: [tempfile::NamedTempFile; 2],
    relays: Vec<RelayProcess>,
}

const NAMES: [&str; 2] = ["relay-a", "relay-b"];

impl Pair {
    fn start(env: &Env, mode: &str, delivery: &str) -> Pair {
        let sink = match delivery {
            "exactly_once" => exactly_once(env, ""),
            _ => String::new(),
        };
        let config = |name: &str| {
            let toml = in_sink(&env.config_toml(mode, "", ""), &sink)
                .replace("/app\"", &format!("/app?application_name={name}\""))
                .replace(
                    "[source.polling]",
                    "[source.logical]\nstatus_interval = \"1s\"\nheartbeat_interval = \"0s\"\n\n[source.polling]",
                );
            let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
            f.write_all(toml.as_bytes()).unwrap();
            f
        };
        let files = [config(NAMES[0]), config(NAMES[1])];
        let relays = files.iter().map(|f| spawn_relay(f.path())).collect();
        Pair { files, relays }
    }

    /// The index of the relay that leads, waiting up to 10 s for one.
    async fn leader(&self, env: &Env, db: &mut tokio_postgres::Client, mode: &str) -> usize {
        for _ in 0..200 {
            if let Some(name) = leader(env, db, mode).await {
                return NAMES.iter().position(|n| *n == name).expect("known relay");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no relay leads within 10 s");
    }

    fn restart(&mut self, idx: usize) {
        self.relays[idx] = spawn_relay(self.files[idx].path());
    }
}

/// Reads the topic back until `written` distinct events arrived and 3 s more passed
/// (late duplicates), or 120 s: `(key, n, id)` in arrival order, duplicates included.
async fn read_back(env: &Env, written: usize) -> Vec<(String, u64, String)> {
    let brokers = env.kafka.brokers();
    let topic = env.topic("outbox.order");
    tokio::task::spawn_blocking(move || {
        let reader = Reader::new(&brokers, &[&topic]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        let (mut all, mut ids) = (Vec::new(), HashSet::new());
        let mut quiet_since = None;
        while Instant::now() < deadline {
            match reader.next(Duration::from_millis(200)) {
                Ok(Some(m)) => {
                    let id = m.header("id").unwrap().to_owned();
                    ids.insert(id.clone());
                    all.push((m.key_str().to_owned(), payload_n(&m), id));
                    quiet_since = None;
                }
                _ if ids.len() >= written => {
                    let since = *quiet_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > Duration::from_secs(3) {
                        break;
                    }
                }
                _ => {}
            }
        }
        all
    })
    .await
    .unwrap()
}

/// (delivered, duplicated, reordered) of what [`read_back`] returned.
fn tally(messages: &[(String, u64, String)]) -> (usize, usize, usize) {
    let (delivered, reordered) = first_occurrences(
        messages
            .iter()
            .map(|(k, n, id)| (k.as_str(), *n, id.as_str())),
    );
    (delivered, messages.len() - delivered, reordered)
}

struct Kills {
    kills: usize,
    events: usize,
}

fn kills() -> Kills {
    Kills {
        kills: 20,
        events: if std::env::var("OUTBOX_RELAY_LONG").is_ok_and(|v| v == "1") {
            40_000
        } else {
            12_000
        },
    }
}

/// Two relays on one outbox under a steady load; the leader is SIGKILLed 20 times at
/// random moments and started again as the standby. Returns (written, delivered,
/// duplicated, reordered).
async fn kill_the_leader(mode: &'static str, delivery: &str) -> (usize, usize, usize, usize) {
    let env = Env::start_with(&["synchronous_commit=on"]).await;
    env.create_topics(&["outbox.order"], 4).await;
    let plan = kills();
    let seed: u64 = std::env::var("FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut pair = Pair::start(&env, mode, delivery);
    let mut db = env.client().await;
    let stop = CancellationToken::new();
    let writer = tokio::spawn(write_until(
        env.db_url.clone(),
        plan.events,
        Duration::from_millis(20),
        stop.clone(),
    ));
    for _ in 0..plan.kills {
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..1200))).await;
        let idx = pair.leader(&env, &mut db, mode).await;
        pair.relays[idx].kill9();
        pair.restart(idx);
    }
    let written = writer.await.unwrap();
    let messages = read_back(&env, written).await;
    stop.cancel();
    drop(pair);
    let (delivered, duplicated, reordered) = tally(&messages);
    eprintln!(
        "\nleader kills, {mode} mode, {delivery} (seed {seed})\n\
         | kills | written | delivered | lost | duplicated | reordered |\n\
         |---:|---:|---:|---:|---:|---:|\n\
         | {} | {written} | {delivered} | {} | {duplicated} | {reordered} |\n",
        plan.kills,
        written - delivered.min(written),
    );
    assert_eq!(delivered, written, "events lost (or foreign ones read)");
    assert_eq!(reordered, 0, "events reordered");
    (written, delivered, duplicated, reordered)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_leader_kills_in_polling_mode_publish_each_event_exactly_once() {
    let (_, _, duplicated, _) = kill_the_leader("polling", "exactly_once").await;
    assert_eq!(duplicated, 0, "duplicates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_leader_kills_in_log_mode_publish_each_event_exactly_once() {
    let (_, _, duplicated, _) = kill_the_leader("logical", "exactly_once").await;
    assert_eq!(duplicated, 0, "duplicates");
}

/// The same kills at least once, for the table beside it: nothing lost or reordered,
/// duplicates allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_leader_kills_at_least_once_lose_nothing() {
    kill_the_leader("polling", "at_least_once").await;
    kill_the_leader("logical", "at_least_once").await;
}

/// What a paused old leader did after it was resumed.
#[derive(Debug, PartialEq, Eq)]
enum Zombie {
    /// It exited with this code (1: fenced).
    Exited(i32),
    /// It runs on, as a standby.
    Standby,
}

/// The zombie leader: the leader is frozen (SIGSTOP), its PostgreSQL sessions are
/// terminated so the standby takes over and publishes, and then it is resumed. Returns
/// (delivered, duplicated, reordered, what the old leader did).
async fn zombie(mode: &'static str, delivery: &str) -> (usize, usize, usize, Zombie) {
    let env = Env::start_with(&["synchronous_commit=on"]).await;
    env.create_topics(&["outbox.order"], 4).await;
    let mut pair = Pair::start(&env, mode, delivery);
    let mut db = env.client().await;
    let stop = CancellationToken::new();
    let writer = tokio::spawn(write_until(
        env.db_url.clone(),
        6_000,
        Duration::from_millis(10),
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idx = pair.leader(&env, &mut db, mode).await;
    let old = NAMES[idx];
    pair.relays[idx].pause();
    db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
        &[&old],
    )
    .await
    .unwrap();
    // The standby takes over and publishes for a while; then the old leader wakes up.
    let deadline = Instant::now() + Duration::from_secs(10);
    while leader(&env, &mut db, mode).await.is_none_or(|l| l == old) {
        assert!(Instant::now() < deadline, "no takeover within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    pair.relays[idx].resume();
    let written = writer.await.unwrap();
    let messages = read_back(&env, written).await;
    let fate = match pair.relays[idx].exit_code() {
        Some(code) => Zombie::Exited(code),
        None => {
            assert_ne!(
                leader(&env, &mut db, mode).await.as_deref(),
                Some(old),
                "the old leader took the lead back"
            );
            Zombie::Standby
        }
    };
    stop.cancel();
    drop(pair);
    let (delivered, duplicated, reordered) = tally(&messages);
    eprintln!(
        "\nzombie leader, {mode} mode, {delivery}\n\
         | written | delivered | lost | duplicated | reordered | old leader after SIGCONT |\n\
         |---:|---:|---:|---:|---:|---|\n\
         | {written} | {delivered} | {} | {duplicated} | {reordered} | {fate:?} |\n",
        written - delivered.min(written),
    );
    assert_eq!(delivered, written, "events lost");
    (delivered, duplicated, reordered, fate)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_old_leader_is_fenced_in_polling_mode() {
    let (_, duplicated, reordered, _) = zombie("polling", "exactly_once").await;
    assert_eq!((duplicated, reordered), (0, 0), "(duplicated, reordered)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_old_leader_is_fenced_in_log_mode() {
    let (_, duplicated, reordered, _) = zombie("logical", "exactly_once").await;
    assert_eq!((duplicated, reordered), (0, 0), "(duplicated, reordered)");
}

/// The same at least once: nothing is lost; what the old leader had on the wire may
/// land again (the table says how much).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_old_leader_at_least_once_loses_nothing() {
    zombie("polling", "at_least_once").await;
    zombie("logical", "at_least_once").await;
}

/// A broker refusal inside a transaction: the event too large for its topic aborts the
/// transaction (and the batch behind it, already read); the batch goes again with that
/// event on the dead-letter topic, inside the new transaction, and the aggregate's later
/// events held in PostgreSQL (parking is exact in this mode: the retry knows the
/// refusal before it sends them). Nothing is lost, repeated or reordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_broker_refuses_is_dead_lettered_inside_the_retried_transaction() {
    let env = Env::start().await;
    env.create_topics_with(&["outbox.order"], 1, &[("max.message.bytes", "65536")])
        .await;
    env.create_topics(&["outbox.dlq"], 1).await;
    let db = env.client().await;
    // Random letters: lz4 cannot shrink them below the limit.
    let noise: String = rand::Rng::sample_iter(rand::rng(), rand::distr::Alphanumeric)
        .take(200_000)
        .map(char::from)
        .collect();
    let rows: Vec<(String, String)> = (0..200u64)
        .map(|n| {
            let payload = if n == 57 {
                format!("{{\"n\": {n}, \"blob\": \"{noise}\"}}")
            } else {
                format!("{{\"n\": {n}}}")
            };
            ("agg".to_owned(), payload)
        })
        .collect();
    insert_events(&db, &rows).await;
    let toml = in_sink(
        &env.config_toml("polling", "", ""),
        &exactly_once(&env, "refused"),
    )
    .replace("batch_size = 500", "batch_size = 20");
    let relay = RunningRelay::start(load_toml(&toml));
    let got = env.consume(&["outbox.order"], 57, 60).await;
    let dlq = env.consume(&["outbox.dlq"], 1, 30).await;
    env.wait_outbox_empty(Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let all = env.consume(&["outbox.order"], 58, 2).await;
    relay.stop().await;
    let ns: Vec<u64> = got.iter().map(payload_n).collect();
    let expected: Vec<u64> = (0..57).collect();
    assert_eq!(ns, expected, "every event before it once, in order");
    assert_eq!(
        all.len(),
        57,
        "nothing repeated, nothing after it (its aggregate parks)"
    );
    let held: i64 = db
        .query_one(
            "SELECT count(*) FROM outbox_relay_dlq WHERE held AND aggregate_id = 'agg'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        held, 143,
        "the refused event and the 142 after it, kept in PostgreSQL"
    );
    assert_eq!(dlq.len(), 1);
    assert_eq!(payload_n(&dlq[0]), 57);
    assert!(
        dlq[0].header("error").unwrap().contains("too large")
            || dlq[0].header("error").unwrap().contains("Size"),
        "{:?}",
        dlq[0].header("error")
    );
    assert_eq!(env.outbox_count().await, 0);
}
