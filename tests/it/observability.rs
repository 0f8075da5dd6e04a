//! What operators see: /metrics values that match reality, /readyz reasons, `status`,
//! logs that name events and never secrets.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use outbox_relay::metrics::{self, Telemetry};
use outbox_relay::testkit::{http_get, metric_value};
use rdkafka::mocking::MockCluster;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::support::{insert_event, load_toml, BrokerKind, Env};

/// A relay in this process with its HTTP endpoints on a free port.
struct Served {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), outbox_relay::relay::RelayError>>,
}

impl Served {
    async fn start(config: outbox_relay::config::Config) -> Served {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(outbox_relay::daemon::run_with(
            config,
            listener,
            Telemetry::default(),
            shutdown.clone(),
        ));
        Served {
            addr,
            shutdown,
            task,
        }
    }

    async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.addr, path).await.expect("HTTP GET")
    }

    async fn metric(&self, name: &str) -> f64 {
        metric_value(&self.get("/metrics").await.1, name)
            .unwrap_or_else(|| panic!("{name} missing"))
    }

    /// Waits until `check` holds for the metric, or fails after `secs`.
    async fn wait_metric(&self, name: &str, secs: u64, check: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let v = self.metric(name).await;
            if check(v) || Instant::now() > deadline {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_ready(&self, want: u16, secs: u64) -> (u16, String) {
        self.wait_readyz(want, "", secs).await
    }

    /// Waits for /readyz to answer `want` with a body containing `text`.
    async fn wait_readyz(&self, want: u16, text: &str, secs: u64) -> (u16, String) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let r = self.get("/readyz").await;
            if (r.0 == want && r.1.contains(text)) || Instant::now() > deadline {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_exactly_what_was_published() {
    let env = Env::start().await;
    env.create_topics(&["outbox.order", "outbox.payment"], 2)
        .await;
    let db = env.client().await;
    let relay = Served::start(env.config("")).await;
    assert_eq!(relay.wait_ready(200, 20).await, (200, "ready\n".to_owned()));
    assert_eq!(relay.get("/healthz").await.0, 200);

    for i in 0..300 {
        let kind = if i % 3 == 0 { "payment" } else { "order" };
        insert_event(&db, kind, &format!("a{}", i % 17), "E", "{}").await;
    }
    assert_eq!(
        env.consume(&["outbox.order", "outbox.payment"], 300, 30)
            .await
            .len(),
        300
    );

    let published = relay
        .wait_metric(metrics::EVENTS_PUBLISHED, 10, |v| v >= 300.0)
        .await;
    assert_eq!(
        published, 300.0,
        "published counter equals the events inserted"
    );
    let body = relay.get("/metrics").await.1;
    assert!(
        body.contains(&format!(
            "outbox_relay_events_published_total{{topic=\"{}\"}} 100",
            env.topic("outbox.payment")
        )),
        "per-topic counts:\n{body}"
    );
    assert_eq!(
        metric_value(&body, metrics::IN_FLIGHT),
        Some(0.0),
        "nothing left in flight"
    );
    assert_eq!(metric_value(&body, metrics::LEADER), Some(1.0));
    assert_eq!(metric_value(&body, metrics::READY), Some(1.0));
    assert_eq!(
        metric_value(&body, metrics::EVENTS_DEAD_LETTERED),
        Some(0.0)
    );
    assert_eq!(
        metric_value(&body, &format!("{}_count", metrics::COMMIT_TO_ACK)),
        Some(300.0)
    );
    assert_eq!(
        metric_value(&body, &format!("{}_sum", metrics::BATCH_SIZE)),
        Some(300.0)
    );
    assert!(metric_value(&body, metrics::LAST_ACK_TIMESTAMP).unwrap() > 1.7e9);
    assert!(body.contains(&format!(
        "outbox_relay_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    )));
    assert!(metric_value(&body, "process_resident_memory_bytes").unwrap() > 0.0);
    let backlog = relay
        .wait_metric(metrics::BACKLOG_ROWS, 10, |v| v == 0.0)
        .await;
    assert_eq!(backlog, 0.0, "backlog returns to 0");
    // Every metric of the documented list is exported (but those whose labels only an
    // event can give).
    for name in metrics::NAMES
        .iter()
        .filter(|n| !metrics::EXPORTED_WHEN_SEEN.contains(n))
    {
        let present = body
            .lines()
            .any(|l| l.starts_with(name) || l.starts_with(&format!("# TYPE {name} ")));
        assert!(present, "{name} not exported");
    }
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_is_not_ready_and_says_why() {
    let env = Env::start().await;
    let leader = Served::start(env.config("")).await;
    assert_eq!(leader.wait_ready(200, 20).await.0, 200);
    let standby = Served::start(env.config("")).await;
    let (code, body) = standby.wait_readyz(503, "standby", 20).await;
    assert_eq!(code, 503);
    assert!(
        body.contains("standby: another relay holds the leader lock"),
        "{body}"
    );
    assert_eq!(standby.metric(metrics::LEADER).await, 0.0);
    leader.stop().await;
    assert_eq!(
        standby.wait_ready(200, 20).await.0,
        200,
        "the standby takes over"
    );
    standby.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_a_broker_outage() {
    let env = Env::start_on(&[], BrokerKind::None).await;
    let cluster = MockCluster::new(1).unwrap();
    let toml = env
        .config_toml("polling", "", "")
        .replace(&env.kafka.brokers(), &cluster.bootstrap_servers());
    let relay = Served::start(load_toml(&toml)).await;
    assert_eq!(relay.wait_ready(200, 20).await.0, 200);
    cluster.broker_down(1).unwrap();
    let (code, body) = relay.wait_readyz(503, "kafka", 20).await;
    assert_eq!(code, 503, "{body}");
    assert!(body.starts_with("not ready: kafka:"), "{body}");
    cluster.broker_up(1).unwrap();
    assert_eq!(relay.wait_ready(200, 20).await.0, 200);
    relay.stop().await;
}

fn relay_cmd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_outbox-relay"));
    c.stdin(Stdio::null());
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_names_the_leader_and_the_backlog_and_fails_without_one() {
    let env = Env::start().await;
    let db = env.client().await;
    insert_event(&db, "order", "o-1", "Waiting", "{}").await;
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::io::Write::write_all(&mut file, env.config_toml("polling", "", "").as_bytes()).unwrap();
    let path = file.path().to_str().unwrap().to_owned();

    let out = relay_cmd()
        .args(["status", "--config", &path])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("leader:   none"), "{text}");
    assert!(text.contains("backlog:  1 rows"), "{text}");
    assert!(
        text.contains("UNHEALTHY: no relay holds the leader lock"),
        "{text}"
    );

    env.create_topics(&["outbox.order"], 1).await;
    let relay = Served::start(env.config("")).await;
    assert_eq!(relay.wait_ready(200, 20).await.0, 200);
    env.consume(&["outbox.order"], 1, 20).await;
    let out = relay_cmd()
        .args(["status", "--config", &path])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("leader:   pid "), "{text}");
    assert!(
        text.contains("outbox-relay"),
        "application name shown: {text}"
    );
    assert!(text.contains("status:   healthy"), "{text}");
    relay.stop().await;
}

/// JSON logs, event ids and aggregate ids on event lines, no password anywhere, even at
/// debug level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_json_name_events_and_never_show_the_password() {
    let env = Env::start().await;
    env.create_topics(&["outbox.order", "outbox.dlq"], 1).await;
    let db = env.client().await;
    insert_event(&db, "order", "", "Keyless", "{}").await;
    insert_event(&db, "order", "o-7", "Fine", "{}").await;
    let toml = env
        .config_toml("polling", "", "")
        .replace("postgres://postgres@", "postgres://postgres:Sup3rS3cretPw@");
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::io::Write::write_all(&mut file, toml.as_bytes()).unwrap();

    let child = relay_cmd()
        .args(["--log-format", "json", "run", "--config"])
        .arg(file.path())
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    env.consume(&["outbox.order"], 1, 20).await;
    env.consume(&["outbox.dlq"], 1, 20).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let logs = String::from_utf8_lossy(&out.stderr);
    assert!(
        !logs.contains("Sup3rS3cretPw"),
        "password leaked into the logs"
    );
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let poison = lines
        .iter()
        .find(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("dead-letter"))
        })
        .expect("a log line about the poison event");
    assert!(poison["fields"]["event_id"]
        .as_str()
        .is_some_and(|id| id.len() == 36));
    assert_eq!(poison["fields"]["aggregate_id"], "");
    let acked = lines
        .iter()
        .find(|l| {
            l["fields"]["message"] == "event acknowledged" && l["fields"]["aggregate_id"] == "o-7"
        })
        .expect("a debug line per acknowledged event");
    assert!(acked["fields"]["event_id"].is_string());
}
