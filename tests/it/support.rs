//! Fixtures shared by the integration tests.

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use outbox_relay::config::{self, Config};
use outbox_relay::testkit::kafka::{self, Consumed};
use outbox_relay::testkit::postgres::Postgres;
use outbox_relay::testkit::tansu::Tansu;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A database with the shipped outbox table, and a broker.
pub struct Env {
    pub pg: Postgres,
    pub kafka: Tansu,
    pub db_url: String,
}

impl Env {
    pub async fn start() -> Env {
        Env::start_with(&[]).await
    }

    /// [`Env::start`] with extra PostgreSQL settings.
    pub async fn start_with(settings: &[&str]) -> Env {
        init_logs();
        let pg = Postgres::start_with(settings).expect("start PostgreSQL");
        let kafka = Tansu::start().expect("start tansu");
        let db_url = pg.create_database("app").await.expect("create database");
        let env = Env { pg, kafka, db_url };
        let client = env.client().await;
        for (name, sql) in outbox_relay::SETUP_SQL {
            client
                .batch_execute(sql)
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        env
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
        )
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

    /// Reads `count` messages from `topics` (from the beginning), waiting up to `secs`.
    pub async fn consume(&self, topics: &[&str], count: usize, secs: u64) -> Vec<Consumed> {
        let brokers = self.kafka.brokers();
        let topics: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
            kafka::read_all(&brokers, &topics, count, Duration::from_secs(secs))
        })
        .await
        .unwrap()
        .expect("consume")
    }

    pub async fn create_topics(&self, topics: &[&str], partitions: i32) {
        kafka::create_topics(&self.kafka.brokers(), topics, partitions)
            .await
            .expect("create topics");
    }
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
