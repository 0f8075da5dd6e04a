//! Secrets — the database password, Kafka's SASL password — go through every path the
//! relay has for showing things, and none of them shows them: errors (bad syntax, an
//! unreachable database), logs at debug level, `Debug` output, `/readyz`, `/metrics`,
//! `check` and `status`.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use outbox_relay::testkit::{free_port, http_get};

use crate::support::{insert_event, load_toml, Env};

const PG_SECRET: &str = "pg-Sup3rS3cret";
const KAFKA_SECRET: &str = "kafka-Sup3rS3cret";

fn assert_no_secret(path: &str, text: &str) {
    for secret in [PG_SECRET, KAFKA_SECRET] {
        assert!(!text.contains(secret), "{path} shows a secret:\n{text}");
    }
}

fn relay(args: &[&str], config: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_outbox-relay"));
    c.args(args)
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn both(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_show_in_errors_logs_debug_readiness_metrics_check_or_status() {
    let env = Env::start().await;
    env.create_topics(&["outbox.order"], 1).await;
    let db = env.client().await;
    insert_event(&db, "order", "o-1", "One", "{}").await;
    let port = free_port().unwrap();
    let toml = env
        .config_toml("polling", "", "")
        .replace(
            "postgres://postgres@",
            &format!("postgres://postgres:{PG_SECRET}@"),
        )
        .replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{port}\""),
        )
        + &format!(
            "[sink.kafka.librdkafka]\n\"sasl.username\" = \"relay\"\n\"sasl.password\" = \"{KAFKA_SECRET}\"\n"
        );
    assert!(toml.contains(PG_SECRET) && toml.contains(KAFKA_SECRET));

    // Debug output of the loaded configuration.
    let config = load_toml(&toml);
    assert_no_secret("Debug of the Kafka config", &format!("{:?}", config.sink));
    assert_no_secret(
        "Debug of the PostgreSQL config",
        &format!("{:?}", config.source.pg),
    );

    // A running relay at debug level, its readiness and its metrics.
    let good = file(&toml);
    let child = relay(&["--log-format", "json", "run"], good.path())
        .spawn()
        .unwrap();
    env.consume(&["outbox.order"], 1, 20).await;
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let (_, readyz) = http_get(addr, "/readyz").await.unwrap();
    let (_, metrics) = http_get(addr, "/metrics").await.unwrap();
    assert_no_secret("/readyz", &readyz);
    assert_no_secret("/metrics", &metrics);
    let status = relay(&["status"], good.path()).output().unwrap();
    assert_no_secret("status", &both(&status));
    let check = relay(&["check"], good.path()).output().unwrap();
    assert_no_secret("check", &both(&check));
    assert!(both(&check).contains("postgres: ok"), "{}", both(&check));
    assert!(
        both(&check).contains("TLS prefer") && both(&check).contains("loopback"),
        "check prints the TLS mode in effect: {}",
        both(&check)
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let run = child.wait_with_output().unwrap();
    assert_eq!(run.status.code(), Some(0));
    assert_no_secret("run's logs", &both(&run));

    // Errors: a syntax error on the URL's line, an unreachable database.
    let broken = file(&toml.replacen(&format!("{PG_SECRET}@"), &format!("{PG_SECRET}@\n"), 1));
    let out = relay(&["check"], broken.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", both(&out));
    assert_no_secret("a TOML syntax error", &both(&out));
    let closed = free_port().unwrap();
    let unreachable = file(&toml.replace(&format!(":{}/", env.pg.port()), &format!(":{closed}/")));
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || relay(&["check"], unreachable.path()).output()),
    )
    .await
    .unwrap()
    .unwrap()
    .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", both(&out));
    assert_no_secret("a connection error", &both(&out));
}
