//! The command line as an operator meets it: exit codes, messages, `check`, `setup`.

use std::io::Write;
use std::process::{Command, Output};

use crate::support::Env;

fn relay(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run outbox-relay")
}

fn config_file(toml: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(toml.as_bytes()).unwrap();
    f
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn version_prints_the_crate_version() {
    let out = relay(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("outbox-relay {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn check_lists_every_config_problem_and_exits_2() {
    let f = config_file(
        r#"
[source]
mode = "tailing"
database_url = "postgres://relay:hunter2@db/app"
[source.polling]
interval = "often"
[sink.kafka]
brokers = "k:9092"
topic = "{aggregate}"
colour = "blue"
"#,
    );
    let out = relay(&["check", "--config", f.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let t = text(&out);
    for key in [
        "sink.kafka.colour",
        "source.mode",
        "source.polling.interval",
        "sink.kafka.topic",
    ] {
        assert!(t.contains(key), "{key} not named in:\n{t}");
    }
    assert!(!t.contains("hunter2"), "secret leaked:\n{t}");
}

#[test]
fn run_with_a_missing_file_exits_2_naming_it() {
    let out = relay(&["run", "--config", "/nope/relay.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("/nope/relay.toml"));
}

#[test]
fn setup_prints_the_shipped_sql() {
    let out = relay(&["setup"]);
    assert!(out.status.success());
    let t = String::from_utf8_lossy(&out.stdout);
    assert!(t.contains("CREATE TABLE IF NOT EXISTS public.outbox"));
    assert!(t.contains("CREATE PUBLICATION outbox_relay"));
    assert!(t.contains("GRANT SELECT, DELETE ON public.outbox TO outbox_relay"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_both_sides_ok_and_then_a_missing_table() {
    let env = Env::start().await;
    let f = config_file(&env.config_toml("polling", "", ""));
    let out = relay(&["check", "--config", f.path().to_str().unwrap()]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(t.contains("postgres: ok"), "{t}");
    assert!(t.contains("kafka: ok"), "{t}");

    let f = config_file(&env.config_toml("polling", "table = \"public.events\"", ""));
    let out = relay(&["check", "--config", f.path().to_str().unwrap()]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("table public.events does not exist (source.table)"),
        "{t}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_a_misconfigured_column_and_a_missing_privilege() {
    let env = Env::start().await;
    let f = config_file(&env.config_toml(
        "polling",
        "[source.columns]\naggregate_id = \"aggregateid\"",
        "",
    ));
    let out = relay(&["check", "--config", f.path().to_str().unwrap()]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("source.columns.aggregate_id = \"aggregateid\""),
        "{t}"
    );

    let db = env.client().await;
    db.batch_execute("CREATE ROLE reader LOGIN; GRANT SELECT ON outbox TO reader")
        .await
        .unwrap();
    let toml = env
        .config_toml("polling", "", "")
        .replace("postgres://postgres@", "postgres://reader@");
    let f = config_file(&toml);
    let out = relay(&["check", "--config", f.path().to_str().unwrap()]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("may not SELECT, DELETE on public.outbox"), "{t}");
}

#[test]
fn check_reports_an_unreachable_database_and_exits_1() {
    let port = outbox_relay::testkit::free_port().unwrap();
    let f = config_file(&format!(
        "[source]\nmode = \"polling\"\ndatabase_url = \"postgres://x@127.0.0.1:{port}/db\"\n\
         [sink.kafka]\nbrokers = \"127.0.0.1:{port}\"\n[sink.kafka.librdkafka]\n\"socket.timeout.ms\" = 1000\n"
    ));
    let out = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args(["check", "--config", f.path().to_str().unwrap()])
        .output()
        .unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("postgres: FAILED"), "{t}");
    assert!(t.contains("kafka: FAILED"), "{t}");
}

/// In log mode `check` reports every host of the URL: role, version, each setting the
/// relay depends on, and the fix beside each problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_in_log_mode_reports_each_server_with_its_settings() {
    let env = Env::start().await;
    let major = env.pg_major().await;
    let logical = |extra: &str| crate::logical::logical_toml(&env, extra);
    let f = config_file(&logical(""));
    let out = relay(&["check", "--config", f.path().to_str().unwrap()]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    let port = env.pg.port();
    for line in [
        format!("postgres postgres@127.0.0.1:{port}/app: primary, PostgreSQL {major}."),
        "  ok: wal_level = logical".into(),
        "  ok: role postgres may replicate".into(),
        "  WARNING: max_slot_wal_keep_size = -1 (unlimited)".into(),
        "  ok: slot outbox_relay does not exist yet (the first start creates it)".into(),
        "postgres: ok".into(),
    ] {
        assert!(t.contains(&line), "{line:?} not in:\n{t}");
    }
    assert!(
        t.contains("publication outbox_relay"),
        "the publication is reported:\n{t}"
    );

    // Failover slots: refused before 17, and on 17+ the primary's missing
    // synchronized_standby_slots is explained.
    let f = config_file(&logical("failover = true"));
    let out = relay(&["check", "--config", f.path().to_str().unwrap()]);
    let t = text(&out);
    if major < 17 {
        assert_eq!(out.status.code(), Some(1), "{t}");
        assert!(
            t.contains("PROBLEM: source.logical.failover = true needs PostgreSQL 17"),
            "{t}"
        );
    } else {
        assert_eq!(out.status.code(), Some(0), "{t}");
        assert!(
            t.contains("WARNING: synchronized_standby_slots is empty"),
            "{t}"
        );
    }

    // A second host that does not answer is reported by name, and fails the check.
    let dead = outbox_relay::testkit::free_port().unwrap();
    let two = logical("").replace(
        &format!("127.0.0.1:{port}/"),
        &format!("127.0.0.1:{port},127.0.0.1:{dead}/"),
    );
    assert!(two.contains(&format!(",127.0.0.1:{dead}/")), "{two}");
    let f = config_file(&two);
    let out = relay(&["check", "--config", f.path().to_str().unwrap()]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains(&format!(
            "postgres postgres@127.0.0.1:{dead}/app: unreachable"
        )),
        "{t}"
    );
}
