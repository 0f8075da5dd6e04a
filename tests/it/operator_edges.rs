//! What an operator meets at the edges of the process: logs while a broker is down,
//! signals, JSON logs, colours, exit codes, environment overrides, `setup` with a
//! configuration. Most need no PostgreSQL or Kafka: the relay points at closed ports.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use outbox_relay::testkit::free_port;
use outbox_relay::testkit::postgres::Postgres;

fn config_file(toml: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(toml.as_bytes()).unwrap();
    f
}

/// A configuration whose PostgreSQL and Kafka are closed local ports.
fn unreachable_toml() -> String {
    let (pg, kafka) = (free_port().unwrap(), free_port().unwrap());
    format!(
        "[source]\nmode = \"polling\"\ndatabase_url = \"postgres://x@127.0.0.1:{pg}/db\"\n\
         [sink.kafka]\nbrokers = \"127.0.0.1:{kafka}\"\n\
         [relay]\nmax_backoff = \"1s\"\n\
         [http]\nlisten = \"127.0.0.1:0\"\n"
    )
}

fn relay() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_outbox-relay"));
    c.env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null());
    c
}

fn stderr_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `outbox-relay run` as a child, its stderr (a pipe) collected line by line.
struct Running {
    child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Running {
    fn start(config: &std::path::Path) -> Running {
        let mut child = relay()
            .args(["run", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn outbox-relay");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let lines = stderr.clone();
        let pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                lines.lock().unwrap().push(line);
            }
        });
        Running { child, stderr }
    }

    fn lines(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits up to `within` for a stderr line containing `needle`.
    fn wait_for(&self, needle: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.lines().iter().any(|l| l.contains(needle)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }

    fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The exit code, waiting up to `within`.
    fn exit_code(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// 10 s of `check` against a dead broker wrote 392 librdkafka ERROR lines: the first of
/// each kind is what stays, repeats wait for the 30 s summary.
#[test]
fn a_dead_broker_is_a_few_librdkafka_lines_not_a_flood() {
    let f = config_file(&unreachable_toml());
    let started = Instant::now();
    let out = relay()
        .args(["check", "--config", f.path().to_str().unwrap()])
        .output()
        .unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("kafka: FAILED"), "{t}");
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "check waits for the broker"
    );
    let librdkafka: Vec<String> = stderr_lines(&out)
        .into_iter()
        .filter(|l| l.contains("librdkafka") && (l.contains("ERROR") || l.contains("WARN")))
        .collect();
    assert!(
        !librdkafka.is_empty(),
        "the broker's absence is still reported:\n{t}"
    );
    assert!(
        librdkafka.len() <= 5,
        "{} librdkafka lines in ~10 s:\n{}",
        librdkafka.len(),
        librdkafka.join("\n")
    );
}

#[test]
fn sighup_is_logged_and_the_relay_carries_on_until_sigterm() {
    let f = config_file(&unreachable_toml());
    let mut relay = Running::start(f.path());
    assert!(
        relay.wait_for("serving /metrics", Duration::from_secs(20)),
        "{:#?}",
        relay.lines()
    );
    relay.signal(Signal::SIGHUP);
    let warning = "SIGHUP: configuration reload is not supported; restart the relay to apply a \
                   changed configuration";
    assert!(
        relay.wait_for(warning, Duration::from_secs(5)),
        "{:#?}",
        relay.lines()
    );
    // Another one, and the relay is still there a while after.
    relay.signal(Signal::SIGHUP);
    std::thread::sleep(Duration::from_secs(1));
    assert!(relay.is_running(), "SIGHUP ended the relay");
    let lines = relay.lines();
    let warnings: Vec<_> = lines.iter().filter(|l| l.contains(warning)).collect();
    assert_eq!(warnings.len(), 2, "{lines:#?}");
    assert!(warnings.iter().all(|l| l.contains("WARN")), "{warnings:#?}");

    relay.signal(Signal::SIGTERM);
    assert_eq!(
        relay.exit_code(Duration::from_secs(30)),
        Some(0),
        "{:#?}",
        relay.lines()
    );
    assert!(relay
        .lines()
        .iter()
        .any(|l| l.contains("relay stopped cleanly")));
}

#[test]
fn logs_written_to_a_pipe_carry_no_colour_codes() {
    let f = config_file(&unreachable_toml());
    let mut relay = Running::start(f.path());
    // An INFO line, then the WARN of the unreachable database and librdkafka's ERROR:
    // each level would have its colour on a terminal.
    for needle in ["serving /metrics", "lost PostgreSQL", "librdkafka"] {
        assert!(
            relay.wait_for(needle, Duration::from_secs(20)),
            "{needle}: {:#?}",
            relay.lines()
        );
    }
    relay.signal(Signal::SIGTERM);
    assert_eq!(relay.exit_code(Duration::from_secs(30)), Some(0));
    let lines = relay.lines();
    assert!(lines.len() >= 3);
    for line in &lines {
        assert!(!line.contains('\x1b'), "escape code in {line:?}");
    }
    assert!(lines.iter().any(|l| l.contains(" WARN ")), "{lines:#?}");
}

/// Every stderr line is one JSON object, the fatal error's too.
fn assert_all_json(out: &Output) -> Vec<serde_json::Value> {
    let lines = stderr_lines(out);
    assert!(!lines.is_empty(), "{}", text(out));
    lines
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}\n{}", text(out)));
            assert!(v.is_object(), "{l}");
            v
        })
        .collect()
}

fn error_messages(lines: &[serde_json::Value]) -> Vec<String> {
    lines
        .iter()
        .filter(|v| v["level"] == "ERROR")
        .filter_map(|v| v["fields"]["message"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn with_json_logs_every_stderr_line_is_json_and_the_fatal_reason_is_one() {
    // A configuration error (exit 2) and a runtime one (exit 1).
    let bad = config_file("[source]\nmode = \"tailing\"\n[sink.kafka]\nbrokers = \"k:9092\"\n");
    let out = relay()
        .args(["--log-format", "json", "run", "--config"])
        .arg(bad.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let errors = error_messages(&assert_all_json(&out));
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(errors[0].contains("source.mode"), "{errors:#?}");
    assert!(errors[0].contains("source.database_url"), "{errors:#?}");

    let f = config_file(&unreachable_toml());
    let out = relay()
        .args(["--log-format=json", "status", "--config"])
        .arg(f.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let errors = error_messages(&assert_all_json(&out));
    assert!(
        errors.iter().any(|e| e.contains("PostgreSQL")),
        "{errors:#?}"
    );

    // A usage error, which comes before the command line is understood.
    let out = relay()
        .args(["--log-format", "json", "run"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let errors = error_messages(&assert_all_json(&out));
    assert!(errors.iter().any(|e| e.contains("--config")), "{errors:#?}");

    // Human logs stay plain text.
    let out = relay()
        .args(["run", "--config"])
        .arg(bad.path())
        .output()
        .unwrap();
    let lines = stderr_lines(&out);
    assert!(
        lines[0].starts_with("outbox-relay: invalid configuration"),
        "{lines:#?}"
    );
    assert!(serde_json::from_str::<serde_json::Value>(&lines[0]).is_err());
}

#[test]
fn an_http_listen_address_in_use_exits_2_naming_the_key() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let toml = unreachable_toml().replace("127.0.0.1:0", &addr.to_string());
    assert!(toml.contains(&format!("listen = \"{addr}\"")));
    let f = config_file(&toml);
    let out = relay()
        .args(["run", "--config", f.path().to_str().unwrap()])
        .output()
        .unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(t.contains(&format!("http.listen = {addr}")), "{t}");
}

#[test]
fn an_override_variable_that_names_no_key_exits_2_naming_it() {
    let f = config_file(&unreachable_toml());
    for (var, value) in [
        ("OUTBOX_RELAY__SOURCE__POLLING__BATCHSIZE", "5"),
        ("OUTBOX_RELAY__SOURCE__POLLING__BATCH_SIZE", "abc"),
    ] {
        let out = relay()
            .args(["check", "--config", f.path().to_str().unwrap()])
            .env(var, value)
            .output()
            .unwrap();
        let t = text(&out);
        assert_eq!(out.status.code(), Some(2), "{t}");
        assert!(t.contains(&format!("{var}=\"{value}\": ")), "{t}");
        assert!(!t.contains("usize"), "{t}");
    }
}

fn named_toml(db_url: &str) -> String {
    let kafka = free_port().unwrap();
    format!(
        "[source]\nmode = \"logical\"\ndatabase_url = \"{db_url}\"\n\
         table = \"app.Events\"\ndead_letter_table = \"app.dead_letters\"\n\
         [source.logical]\npublication = \"events_pub\"\n\
         [sink.kafka]\nbrokers = \"127.0.0.1:{kafka}\"\n"
    )
}

#[test]
fn setup_with_a_config_prints_the_configured_names() {
    let f = config_file(&named_toml("postgres://x@127.0.0.1:1/db"));
    let out = relay()
        .args(["setup", "--config", f.path().to_str().unwrap()])
        .output()
        .unwrap();
    let t = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", text(&out));
    for line in [
        "CREATE TABLE IF NOT EXISTS \"app\".\"Events\" (",
        "CREATE PUBLICATION \"events_pub\" FOR TABLE \"app\".\"Events\"",
        "GRANT SELECT, DELETE ON \"app\".\"Events\" TO outbox_relay;",
        "CREATE TABLE IF NOT EXISTS \"app\".\"dead_letters\" (",
    ] {
        assert!(t.contains(line), "{line:?} not in:\n{t}");
    }
    assert!(!t.contains("public.outbox "), "{t}");
    assert!(!t.contains("PUBLICATION outbox_relay"), "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_apply_creates_the_configured_table_and_publication() {
    let pg = Postgres::start().expect("start PostgreSQL");
    let url = pg.create_database("fresh").await.unwrap();
    let db = pg.connect("fresh").await.unwrap();
    db.batch_execute("CREATE SCHEMA app").await.unwrap();
    let f = config_file(&named_toml(&url));
    let path = f.path().to_str().unwrap().to_owned();

    let out = tokio::task::spawn_blocking({
        let path = path.clone();
        move || {
            relay()
                .args(["setup", "--apply", "--config", &path])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    let one = |sql: &'static str| {
        let db = &db;
        async move { db.query_one(sql, &[]).await.unwrap() }
    };
    let tables: i64 = one("SELECT count(*) FROM pg_tables WHERE schemaname = 'app' \
         AND tablename IN ('Events', 'dead_letters')")
    .await
    .get(0);
    assert_eq!(
        tables, 2,
        "the outbox and dead-letter tables under their names"
    );
    let published: Vec<(String, String)> = db
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables \
             WHERE pubname = 'events_pub'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(published, [("app".to_owned(), "Events".to_owned())]);
    let defaults: bool = one("SELECT to_regclass('public.outbox') IS NULL \
         AND to_regclass('public.outbox_relay_dead_letter') IS NULL \
         AND NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'outbox_relay')")
    .await
    .get(0);
    assert!(defaults, "nothing made under the default names");
    let granted: bool = one(
        "SELECT has_table_privilege('outbox_relay', '\"app\".\"Events\"', 'SELECT') \
         AND has_table_privilege('outbox_relay', '\"app\".\"Events\"', 'DELETE') \
         AND has_table_privilege('outbox_relay', 'app.dead_letters', 'INSERT') \
         AND has_schema_privilege('outbox_relay', 'app', 'USAGE')",
    )
    .await
    .get(0);
    assert!(granted, "the relay role may use the configured tables");

    // `check` finds PostgreSQL's side complete (its Kafka is a closed port).
    let out = tokio::task::spawn_blocking(move || {
        relay().args(["check", "--config", &path]).output().unwrap()
    })
    .await
    .unwrap();
    let t = text(&out);
    let postgres = t
        .lines()
        .find(|l| l.starts_with("postgres: ok") || l.starts_with("postgres: FAILED"))
        .unwrap_or_else(|| panic!("no postgres verdict in:\n{t}"));
    assert!(postgres.starts_with("postgres: ok"), "{t}");
    assert!(postgres.contains("table app.Events readable"), "{t}");
    assert!(
        postgres.contains("publication events_pub carries it"),
        "{t}"
    );
    assert!(
        postgres.contains("dead-letter table app.dead_letters writable"),
        "{t}"
    );
    assert!(!t.contains("setup --apply"), "{t}");
}
