//! Fixtures shared by the integration tests.

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use outbox_relay::config::{self, Config};
use outbox_relay::testkit::apache_kafka::{self, Kafka};
use outbox_relay::testkit::kafka::{self, Consumed};
use outbox_relay::testkit::postgres::Postgres;
use outbox_relay::testkit::tansu::Tansu;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The broker a test runs against.
pub enum Broker {
    /// The test run's one Apache Kafka broker (`scripts/test` starts it and passes its
    /// address in `OUTBOX_RELAY_TEST_KAFKA`). Other tests use it at the same time: a test
    /// only touches topics under its own [`Env::ns`] prefix, and never stops the broker.
    Shared(String),
    /// An Apache Kafka broker (or cluster) of this test's own.
    Own(Kafka),
    /// tansu, the demo's embedded broker: the smoke subset that keeps other
    /// Kafka-protocol brokers covered.
    Tansu(Tansu),
    /// None: the test brings its own (librdkafka's mock cluster) and replaces
    /// [`Broker::brokers`] in the configuration with it.
    None,
}

impl Broker {
    pub fn brokers(&self) -> String {
        match self {
            Broker::Shared(bootstrap) => bootstrap.clone(),
            Broker::Own(kafka) => kafka.brokers(),
            Broker::Tansu(tansu) => tansu.brokers(),
            Broker::None => "no-broker.invalid:9092".into(),
        }
    }

    /// Stops a broker of this test's own (all nodes).
    pub fn kill(&mut self) {
        match self {
            Broker::Shared(_) | Broker::None => panic!("not a broker of this test's own"),
            Broker::Own(kafka) => (0..kafka.node_count()).for_each(|n| kafka.kill(n)),
            Broker::Tansu(tansu) => tansu.kill(),
        }
    }

    /// Starts a killed broker of this test's own again and waits until it serves.
    pub fn restart(&mut self) -> std::io::Result<()> {
        match self {
            Broker::Shared(_) | Broker::None => panic!("not a broker of this test's own"),
            Broker::Own(kafka) => {
                for n in 0..kafka.node_count() {
                    kafka.restart(n)?;
                }
                kafka.wait_all_ready()
            }
            Broker::Tansu(tansu) => tansu.restart(),
        }
    }

    fn replicas(&self) -> i32 {
        match self {
            Broker::Own(kafka) if kafka.node_count() >= 3 => 3,
            _ => 1,
        }
    }
}

/// Which broker [`Env::start_on`] gives a test.
pub enum BrokerKind {
    /// The shared Apache Kafka broker when the run has one, else one of the test's own.
    Kafka,
    /// An Apache Kafka broker of the test's own, started with these options.
    OwnKafka(apache_kafka::KafkaOptions),
    Tansu,
    /// No broker: the test starts librdkafka's mock cluster itself.
    None,
}

/// A database with the shipped outbox table, and a broker.
pub struct Env {
    pub pg: Postgres,
    pub kafka: Broker,
    pub db_url: String,
    /// Prefix of every topic this test uses: unique per test on the shared broker, empty
    /// on a broker of the test's own.
    pub ns: String,
}

impl Env {
    pub async fn start() -> Env {
        Env::start_with(&[]).await
    }

    /// [`Env::start`] with extra PostgreSQL settings.
    pub async fn start_with(settings: &[&str]) -> Env {
        Env::start_on(settings, BrokerKind::Kafka).await
    }

    /// [`Env::start`] on tansu.
    pub async fn start_tansu() -> Env {
        Env::start_on(&[], BrokerKind::Tansu).await
    }

    pub async fn start_on(settings: &[&str], broker: BrokerKind) -> Env {
        init_logs();
        let pg = Postgres::start_with(settings).expect("start PostgreSQL");
        // Started on this (the test's) thread: a broker dies with the thread that started it.
        let kafka = match broker {
            BrokerKind::Kafka => match apache_kafka::shared_bootstrap() {
                Some(bootstrap) => Broker::Shared(bootstrap),
                None => Broker::Own(Kafka::start().expect("start Apache Kafka")),
            },
            BrokerKind::OwnKafka(options) => {
                Broker::Own(Kafka::start_with(options).expect("start Apache Kafka"))
            }
            BrokerKind::Tansu => Broker::Tansu(Tansu::start().expect("start tansu")),
            BrokerKind::None => Broker::None,
        };
        let ns = match kafka {
            Broker::Shared(_) => format!("t{:08x}.", rand::random::<u32>()),
            _ => String::new(),
        };
        let db_url = pg.create_database("app").await.expect("create database");
        let env = Env {
            pg,
            kafka,
            db_url,
            ns,
        };
        let client = env.client().await;
        for (name, sql) in outbox_relay::SETUP_SQL {
            client
                .batch_execute(sql)
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        env
    }

    /// The server's major version (13…18).
    pub async fn pg_major(&self) -> u32 {
        let num: String = self
            .client()
            .await
            .query_one("SHOW server_version_num", &[])
            .await
            .unwrap()
            .get(0);
        num.parse::<u32>().unwrap() / 10000
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        self.pg.connect("app").await.expect("connect to app")
    }

    /// The relay's configuration for this environment, plus `extra` TOML lines that go
    /// into the `[source]` table (before any sub-table).
    pub fn config_toml(&self, mode: &str, extra_source: &str, extra: &str) -> String {
        format!(
            r#"
[source]
mode = "{mode}"
database_url = "{db}"
{extra_source}

[source.polling]
interval = "20ms"
batch_size = 500
standby_retry = "100ms"

[sink.kafka]
brokers = "{brokers}"
topic = "{ns}outbox.{{aggregate_type}}"
dead_letter_topic = "{ns}outbox.dlq"

[relay]
shutdown_grace = "10s"
max_backoff = "1s"
stall_timeout = "10s"

[http]
listen = "127.0.0.1:0"
{extra}
"#,
            db = self.db_url,
            brokers = self.kafka.brokers(),
            ns = self.ns,
        )
    }

    /// This test's name for `topic` (with its [`Env::ns`] prefix).
    pub fn topic(&self, topic: &str) -> String {
        format!("{}{topic}", self.ns)
    }

    /// `toml` (from [`Env::config_toml`]) with `sink.kafka.topic` set to `template`, under
    /// this test's prefix.
    pub fn with_topic(&self, toml: &str, template: &str) -> String {
        let default = format!("topic = \"{}outbox.{{aggregate_type}}\"", self.ns);
        assert!(toml.contains(&default), "no default topic line in {toml}");
        toml.replace(&default, &format!("topic = \"{}{template}\"", self.ns))
    }

    pub fn config(&self, extra: &str) -> Config {
        load_toml(&self.config_toml("polling", "", extra))
    }

    pub async fn outbox_count(&self) -> i64 {
        self.client()
            .await
            .query_one("SELECT count(*) FROM outbox", &[])
            .await
            .unwrap()
            .get(0)
    }

    /// Waits up to `timeout` for the outbox to be empty (the relay deleted every row).
    pub async fn wait_outbox_empty(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.outbox_count().await > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Reads `count` messages from `topics` (from the beginning), waiting up to `secs`.
    pub async fn consume(&self, topics: &[&str], count: usize, secs: u64) -> Vec<Consumed> {
        let brokers = self.kafka.brokers();
        let topics: Vec<String> = topics.iter().map(|t| self.topic(t)).collect();
        tokio::task::spawn_blocking(move || {
            let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
            kafka::read_all(&brokers, &topics, count, Duration::from_secs(secs))
        })
        .await
        .unwrap()
        .expect("consume")
    }

    /// Creates `topics` (names without this test's prefix: it is added).
    pub async fn create_topics(&self, topics: &[&str], partitions: i32) {
        self.create_topics_with(topics, partitions, &[]).await
    }

    /// [`Env::create_topics`] with topic-level settings.
    pub async fn create_topics_with(
        &self,
        topics: &[&str],
        partitions: i32,
        settings: &[(&str, &str)],
    ) {
        let topics: Vec<String> = topics.iter().map(|t| self.topic(t)).collect();
        let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
        kafka::create_replicated_topics(
            &self.kafka.brokers(),
            &topics,
            partitions,
            self.kafka.replicas(),
            settings,
        )
        .await
        .expect("create topics");
    }
}

/// `toml` (from [`Env::config_toml`]) with `sink.kafka.on_poison = "skip"`: a poison
/// event's aggregate flows on (what tests of dead-lettering itself look at).
pub fn skipping(toml: &str) -> String {
    assert!(toml.contains("[sink.kafka]\n"), "no [sink.kafka] in {toml}");
    toml.replacen("[sink.kafka]\n", "[sink.kafka]\non_poison = \"skip\"\n", 1)
}

/// Validates TOML text exactly as `outbox-relay check` would (no environment).
pub fn load_toml(toml: &str) -> Config {
    try_load_toml(toml, HashMap::new()).unwrap_or_else(|e| panic!("{e}"))
}

pub fn try_load_toml(
    toml: &str,
    env: HashMap<String, String>,
) -> Result<Config, config::ConfigError> {
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    file.write_all(toml.as_bytes()).unwrap();
    config::load_with_env(file.path(), env)
}

/// A relay running in this process.
pub struct RunningRelay {
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), outbox_relay::relay::RelayError>>,
}

impl RunningRelay {
    pub fn start(config: Config) -> RunningRelay {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(outbox_relay::run(config, shutdown.clone()));
        RunningRelay { shutdown, task }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("relay task").expect("relay result");
    }
}

/// Runs the relay in this process with telemetry the test can read.
pub fn start_with_telemetry(toml: &str) -> (RunningRelay, outbox_relay::metrics::Telemetry) {
    let telemetry = outbox_relay::metrics::Telemetry::default();
    let shutdown = CancellationToken::new();
    let config = load_toml(toml);
    let t = telemetry.clone();
    let stop = shutdown.clone();
    let task = tokio::spawn(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        outbox_relay::daemon::run_with(config, listener, t, stop).await
    });
    (RunningRelay { shutdown, task }, telemetry)
}

/// Inserts one outbox event and returns its id.
pub async fn insert_event(
    client: &tokio_postgres::Client,
    aggregate_type: &str,
    aggregate_id: &str,
    event_type: &str,
    payload: &str,
) -> String {
    client
        .query_one(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             VALUES ($1, $2, $3, $4::text::jsonb) RETURNING id::text",
            &[&aggregate_type, &aggregate_id, &event_type, &payload],
        )
        .await
        .expect("insert event")
        .get(0)
}

/// Relay logs in test output (RUST_LOG=debug for more).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "outbox_relay=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Kafka's Java `Utils.murmur2`: where the Java producer's default partitioner puts a key
/// (`(murmur2(key) & 0x7fffffff) % partitions`).
pub fn java_partition(key: &[u8], partitions: i32) -> i32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ key.len() as u32;
    let mut chunks = key.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        for (i, b) in rest.iter().enumerate().rev() {
            h ^= u32::from(*b) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    ((h as i32) & 0x7fff_ffff) % partitions
}

#[test]
fn java_partition_matches_kafkas_murmur2_vectors() {
    // Vectors from Kafka's UtilsTest (murmur2 of the bytes), reduced the same way.
    for (key, hash) in [
        ("21", -973_932_308i32),
        ("foobar", -790_332_482),
        ("abc", 479_470_107),
    ] {
        assert_eq!(
            java_partition(key.as_bytes(), i32::MAX),
            (hash & 0x7fff_ffff) % i32::MAX
        );
    }
}

/// Waits until some relay holds the polling leader lock (so it is actively polling).
pub async fn wait_for_leader(db: &tokio_postgres::Client) {
    for _ in 0..200 {
        let held: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if held > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("no relay took the leader lock within 10 s");
}

pub use outbox_relay::testkit::RelayProcess;

/// The relay binary under test, `run --config FILE`, as a child process (killed when
/// dropped).
pub fn spawn_relay(config: &std::path::Path) -> RelayProcess {
    RelayProcess::spawn(env!("CARGO_BIN_EXE_outbox-relay"), config)
}

/// Runs the relay binary with `args`; its exit code and what it printed.
pub fn cli(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// Waits (up to 10 s) until `telemetry` says this relay is a standby; returns its
/// readiness reason (the last one seen, if it never became one).
pub async fn standby_reason(telemetry: &outbox_relay::metrics::Telemetry) -> String {
    let mut reason = String::new();
    for _ in 0..200 {
        if let outbox_relay::metrics::Readiness::NotReady(why) = telemetry.health.readiness() {
            reason = why;
            if reason.contains("standby") {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    reason
}

/// Runs a relay in this process that must fail, and returns its error message.
pub async fn run_error(config: Config) -> String {
    let run = outbox_relay::run(config, CancellationToken::new());
    match tokio::time::timeout(Duration::from_secs(20), run).await {
        Ok(Err(e)) => e.to_string(),
        Ok(Ok(())) => panic!("the relay ran without error"),
        Err(_) => panic!("the relay kept retrying instead of failing clearly"),
    }
}

/// Inserts `(aggregate_id, payload JSON)` rows as 'order'/'Tick' events in one statement
/// (one transaction), keeping their order in `seq`.
pub async fn insert_events(db: &tokio_postgres::Client, rows: &[(String, String)]) {
    let aggs: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    let payloads: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    db.execute(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
         SELECT 'order', a, 'Tick', p::jsonb FROM unnest($1::text[], $2::text[]) \
         WITH ORDINALITY AS t(a, p, o) ORDER BY o",
        &[&aggs, &payloads],
    )
    .await
    .expect("insert events");
}

/// One event as an independent test reader saw it (the writers' payloads carry `n`,
/// the key's own sequence, and some `at`, the Unix milliseconds when written).
#[derive(Clone)]
pub struct Arrival {
    pub key: String,
    pub n: u64,
    /// The `id` header.
    pub id: String,
    pub written_ms: Option<u64>,
    pub at: std::time::Instant,
}

/// A reader on a thread of its own that records every event of a topic as it arrives,
/// so stalls are seen when they happen; [`ArrivalReader::stop`] (or a drop) ends it.
pub struct ArrivalReader {
    pub seen: std::sync::Arc<std::sync::Mutex<Vec<Arrival>>>,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ArrivalReader {
    pub fn start(brokers: String, topic: String, poll: Duration) -> ArrivalReader {
        let seen: std::sync::Arc<std::sync::Mutex<Vec<Arrival>>> = Default::default();
        let stop = CancellationToken::new();
        let thread = std::thread::spawn({
            let (seen, stop) = (seen.clone(), stop.clone());
            move || {
                let reader = kafka::Reader::new(&brokers, &[&topic]).unwrap();
                while !stop.is_cancelled() {
                    if let Ok(Some(m)) = reader.next(poll) {
                        let v: serde_json::Value = serde_json::from_slice(&m.value).unwrap();
                        seen.lock().unwrap().push(Arrival {
                            key: m.key_str().to_owned(),
                            n: v["n"].as_u64().unwrap(),
                            id: m.header("id").unwrap().to_owned(),
                            written_ms: v["at"].as_u64(),
                            at: std::time::Instant::now(),
                        });
                    }
                }
            }
        });
        ArrivalReader {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    /// Ends the reader and waits for its thread.
    pub fn stop(&mut self) {
        self.stop.cancel();
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

impl Drop for ArrivalReader {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
