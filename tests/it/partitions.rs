//! Network partitions made by the kernel (`testkit::netfault`: nftables drop rules), not by
//! killing processes: the leader reaches PostgreSQL through 127.0.0.2, its standby and the
//! writer through 127.0.0.1, and the leader's link is cut while a steady writer runs.
//! Checked by an independent consumer against the writer's own record: nothing lost,
//! nothing reordered, no duplicate in exactly-once, and the standby leads within 30 s
//! (`source/deadlines.rs` says why).

use std::collections::HashSet;
use std::io::Write;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use outbox_relay::testkit::kafka::Reader;
use outbox_relay::testkit::netfault::Cut;
use tokio_util::sync::CancellationToken;

use crate::faults::{first_occurrences, leader, write_until};
use crate::support::{spawn_relay, Env};

/// What one run showed.
#[derive(Debug)]
struct Report {
    takeover: Duration,
    written: usize,
    distinct: usize,
    reordered: usize,
    duplicates: usize,
}

fn config_file(toml: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    file.write_all(toml.as_bytes()).unwrap();
    file
}

/// Reads `topic` until `want` distinct events arrived (or 90 s), then 2 s more for late
/// duplicates; returns `(key, n, id)` in arrival order.
async fn read_back(env: &Env, topic: &str, want: usize) -> Vec<(String, u64, String)> {
    let brokers = env.kafka.brokers();
    let topic = env.topic(topic);
    tokio::task::spawn_blocking(move || {
        let reader = Reader::new(&brokers, &[&topic]).unwrap();
        let mut seen = Vec::new();
        let mut ids = HashSet::new();
        let mut deadline = Instant::now() + Duration::from_secs(90);
        let mut tail = false;
        while Instant::now() < deadline {
            if let Some(m) = reader.next(Duration::from_millis(100)).unwrap_or(None) {
                let v: serde_json::Value = serde_json::from_slice(&m.value).unwrap();
                let id = m.header("id").unwrap().to_owned();
                ids.insert(id.clone());
                seen.push((m.key_str().to_owned(), v["n"].as_u64().unwrap(), id));
            }
            if !tail && ids.len() >= want {
                tail = true;
                deadline = Instant::now() + Duration::from_secs(2);
            }
        }
        seen
    })
    .await
    .unwrap()
}

async fn wait_for(
    env: &Env,
    db: &mut tokio_postgres::Client,
    mode: &str,
    who: &str,
    within: Duration,
) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        if leader(env, db, mode).await.as_deref() == Some(who) {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// Cuts the leader from PostgreSQL (not from Kafka) under a steady writer.
async fn cut_the_leader(mode: &'static str, exactly_once: bool) -> Report {
    let env = Env::start_with(&["listen_addresses=127.0.0.1,127.0.0.2"]).await;
    env.create_topics(&["outbox.order"], 4).await;
    env.create_topics(&["outbox.dlq"], 1).await;
    let mut base = env.config_toml(mode, "", "");
    if exactly_once {
        base = base.replacen(
            "[sink.kafka]\n",
            &format!(
                "[sink.kafka]\ndelivery = \"exactly_once\"\ncheckpoint_topic = \"{}\"\n",
                env.topic("checkpoints")
            ),
            1,
        );
    }
    let named = |name: &str| base.replace("/app\"", &format!("/app?application_name={name}\""));
    let leader_file = config_file(&named("leader").replace("@127.0.0.1:", "@127.0.0.2:"));
    let standby_file = config_file(&named("standby"));
    let mut db = env.client().await;

    let mut first = spawn_relay(leader_file.path());
    wait_for(&env, &mut db, mode, "leader", Duration::from_secs(30))
        .await
        .expect("the leader leads");
    let mut second = spawn_relay(standby_file.path());
    let stop = CancellationToken::new();
    let writer = tokio::spawn(write_until(
        env.db_url.clone(),
        usize::MAX,
        Duration::from_millis(50),
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;

    let cut = Cut::link(Ipv4Addr::new(127, 0, 0, 2), env.pg.port()).expect("cut the link");
    let takeover = wait_for(&env, &mut db, mode, "standby", Duration::from_secs(45))
        .await
        .unwrap_or(Duration::MAX);
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    let written = writer.await.unwrap();
    drop(cut);

    let seen = read_back(&env, "outbox.order", written).await;
    let (distinct, reordered) =
        first_occurrences(seen.iter().map(|(k, n, id)| (k.as_str(), *n, id.as_str())));
    first.kill9();
    second.kill9();
    let report = Report {
        takeover,
        written,
        distinct,
        reordered,
        duplicates: seen.len() - distinct,
    };
    eprintln!("leader cut from PostgreSQL ({mode}, exactly_once={exactly_once}): {report:?}");
    report
}

fn assert_sound(report: &Report, exactly_once: bool) {
    assert!(
        report.takeover < Duration::from_secs(30),
        "the standby leads within 30 s: {report:?}"
    );
    assert_eq!(report.distinct, report.written, "nothing lost: {report:?}");
    assert_eq!(report.reordered, 0, "nothing reordered: {report:?}");
    if exactly_once {
        assert_eq!(report.duplicates, 0, "nothing twice: {report:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_a_leader_cut_from_postgres_is_replaced_within_30_s() {
    let report = cut_the_leader("polling", false).await;
    assert_sound(&report, false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_mode_a_leader_cut_from_postgres_is_replaced_within_30_s_exactly_once() {
    let report = cut_the_leader("logical", true).await;
    assert_sound(&report, true);
}
