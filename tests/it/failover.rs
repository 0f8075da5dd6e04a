//! PostgreSQL 17 failover slots: a physical standby keeps a synchronised copy of the
//! relay's slot, and after a promotion under load the relay, following a multi-host
//! `database_url`, continues from it.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use outbox_relay::testkit::kafka::Consumed;
use outbox_relay::testkit::postgres::Postgres;
use tokio_util::sync::CancellationToken;

use crate::faults::write_until;
use crate::logical::logical_toml;
use crate::support::*;

async fn lsn_of(db: &tokio_postgres::Client, sql: &str) -> Option<u64> {
    let text: Option<String> = db.query_opt(sql, &[]).await.ok().flatten()?.get(0);
    let (hi, lo) = text?
        .split_once('/')
        .map(|(h, l)| (h.to_owned(), l.to_owned()))?;
    Some((u64::from_str_radix(&hi, 16).ok()? << 32) | u64::from_str_radix(&lo, 16).ok()?)
}

/// Waits until the standby's synchronised copy of the slot has reached where the
/// primary's slot stood when asked.
async fn wait_synced(primary: &tokio_postgres::Client, standby: &Postgres) {
    let target = lsn_of(
        primary,
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'outbox_relay'",
    )
    .await
    .expect("the primary's slot");
    let db = standby.connect("postgres").await.unwrap();
    for _ in 0..600 {
        let synced = lsn_of(
            &db,
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots \
             WHERE slot_name = 'outbox_relay' AND synced AND NOT temporary",
        )
        .await;
        if synced.is_some_and(|s| s >= target) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the standby's copy of the slot did not reach {target:x}");
}

/// `check` on the multi-host URL: the primary's and the standby's failover settings.
async fn check_reports_both_servers(toml: &str, standby_port: u16) {
    use std::io::Write;
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(toml.as_bytes()).unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args(["check", "--config"])
        .arg(f.path())
        .output()
        .await
        .unwrap();
    let t = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{t}");
    for line in [
        "ok: synchronized_standby_slots = standby1".to_owned(),
        format!("postgres postgres@127.0.0.1:{standby_port}/app: standby, PostgreSQL"),
        "ok: sync_replication_slots = on, hot_standby_feedback = on, primary_slot_name = standby1"
            .into(),
        ", failover true, synced from the primary".into(),
    ] {
        assert!(t.contains(&line), "{line:?} not in:\n{t}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_standby_continues_from_the_synced_failover_slot() {
    let env = Env::start().await;
    let major = env.pg_major().await;
    if major < 17 {
        eprintln!("PostgreSQL {major} has no failover slots: nothing to test");
        return;
    }
    env.create_topics(&["outbox.order"], 3).await;
    let standby = env
        .pg
        .start_standby("standby1", &["sync_replication_slots=on"])
        .await
        .expect("start the standby");
    let primary = env.client().await;
    // The relay receives nothing the standby has not: what a promotion loses from the
    // database it then cannot have published.
    for sql in [
        "ALTER SYSTEM SET synchronized_standby_slots = 'standby1'",
        "SELECT pg_reload_conf()",
    ] {
        primary.batch_execute(sql).await.unwrap();
    }
    let p = env.pg.port();
    let s = standby.port();
    let url = format!(
        "postgres://postgres@127.0.0.1:{p},127.0.0.1:{s}/app?target_session_attrs=read-write"
    );
    let toml = logical_toml(&env, "failover = true").replace(&env.db_url, &url);
    let relay = RunningRelay::start(load_toml(&toml));

    // A steady writer that follows the promotion through the same multi-host URL.
    let stop = CancellationToken::new();
    let writer = tokio::spawn(write_until(
        url.clone(),
        1_000_000,
        Duration::from_millis(20),
        stop.clone(),
    ));
    assert!(
        env.consume(&["outbox.order"], 500, 30).await.len() >= 500,
        "the relay streams before the failover"
    );
    let failover: bool = primary
        .query_one(
            "SELECT failover FROM pg_replication_slots WHERE slot_name = 'outbox_relay'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(failover, "source.logical.failover made it a failover slot");
    wait_synced(&primary, &standby).await;
    check_reports_both_servers(&toml, s).await;

    // Under load: the primary dies, the standby is promoted.
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.pg.kill();
    let new_primary = standby.connect("postgres").await.unwrap();
    let promoted: bool = new_primary
        .query_one("SELECT pg_promote(true, 60)", &[])
        .await
        .unwrap()
        .get(0);
    assert!(promoted);
    // The writer goes on on the new primary for a while.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    writer.await.unwrap();

    // What the database holds now is what must reach Kafka, in order per key.
    let app = standby.connect("app").await.unwrap();
    let rows = app
        .query(
            "SELECT id::text, aggregate_id FROM outbox ORDER BY seq",
            &[],
        )
        .await
        .unwrap();
    let expected: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let ids: HashSet<&str> = expected.iter().map(|(id, _)| id.as_str()).collect();
    let got = read_until_complete(&env, &ids).await;
    relay.stop().await;
    let Tally {
        lost,
        phantom,
        reordered,
        duplicates,
        ..
    } = tally(&expected, &got);
    eprintln!(
        "failover on PostgreSQL {major}: {} events in the new primary's outbox, {} delivered, \
         {lost} lost, {phantom} not in the database, {reordered} keys out of order, \
         {duplicates} duplicates",
        expected.len(),
        got.len()
    );
    assert_eq!(lost, 0, "every event the new primary holds reached Kafka");
    assert_eq!(phantom, 0, "nothing reached Kafka that the promotion lost");
    assert_eq!(reordered, 0, "per-key order kept across the promotion");
}

/// What reached Kafka against what the database holds (`expected`: id and key, in
/// `seq` order).
struct Tally {
    lost: usize,
    /// In Kafka, not in the database.
    phantom: usize,
    /// Keys whose first copies arrived in another order than `seq`'s.
    reordered: usize,
    duplicates: usize,
    /// Events per key in the database.
    per_key: HashMap<String, usize>,
}

fn tally(expected: &[(String, String)], got: &[Consumed]) -> Tally {
    let ids: HashSet<&str> = expected.iter().map(|(id, _)| id.as_str()).collect();
    let mut first = HashSet::new();
    let mut order: HashMap<&str, Vec<&str>> = HashMap::new();
    let (mut duplicates, mut phantom) = (0, 0);
    for m in got {
        let id = m.header("id").unwrap();
        if !first.insert(id) {
            duplicates += 1;
        } else if !ids.contains(id) {
            phantom += 1;
        } else {
            let key = std::str::from_utf8(m.key.as_deref().unwrap()).unwrap();
            order.entry(key).or_default().push(id);
        }
    }
    let mut wanted: HashMap<&str, Vec<&str>> = HashMap::new();
    for (id, key) in expected {
        wanted.entry(key.as_str()).or_default().push(id.as_str());
    }
    Tally {
        lost: ids.iter().filter(|id| !first.contains(*id)).count(),
        phantom,
        reordered: wanted
            .iter()
            .filter(|(key, ids)| order.get(*key).map(Vec::as_slice) != Some(ids.as_slice()))
            .count(),
        duplicates,
        per_key: wanted
            .iter()
            .map(|(k, v)| (k.to_string(), v.len()))
            .collect(),
    }
}

async fn slots_named_ours(db: &tokio_postgres::Client) -> i64 {
    db.query_one(
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'outbox_relay'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// Reads `topic` until every id the database holds is there (duplicates on top); returns
/// what arrived.
async fn read_until_complete(env: &Env, ids: &HashSet<&str>) -> Vec<Consumed> {
    let mut want = ids.len();
    let mut got = Vec::new();
    for _ in 0..10 {
        got = env.consume(&["outbox.order"], want, 10).await;
        let seen: HashSet<&str> = got.iter().filter_map(|m| m.header("id")).collect();
        let missing = ids.iter().filter(|id| !seen.contains(*id)).count();
        if missing == 0 {
            break;
        }
        want = got.len() + missing;
    }
    got
}

/// Decoding on a hot standby (16+): the slot lives on the standby, the first start reads
/// the standby's snapshot, and after that standby is promoted the relay goes on with the
/// same slot. Before 16 the relay refuses a standby by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_tails_a_hot_standby_and_goes_on_when_it_is_promoted() {
    let env = Env::start().await;
    let major = env.pg_major().await;
    env.create_topics(&["outbox.order"], 3).await;
    let standby = env
        .pg
        .start_standby("standby1", &[])
        .await
        .expect("start the standby");
    let on_standby =
        |extra: &str| logical_toml(&env, extra).replace(&env.db_url, &standby.url("app"));
    if major < 16 {
        let err = run_error(load_toml(&on_standby(""))).await;
        assert!(
            err.contains("this server is a standby: PostgreSQL")
                && err.contains("decodes only on a primary"),
            "{err}"
        );
        return;
    }
    let err = run_error(load_toml(&on_standby("cleanup = true"))).await;
    assert!(
        err.contains("cleanup = true deletes rows, which a standby cannot"),
        "{err}"
    );

    let primary = env.client().await;
    for i in 0..10 {
        insert_event(&primary, "order", "agg-before", &format!("Before{i}"), "{}").await;
    }
    // A slot made on a standby waits for the primary's next running-transactions record:
    // make them often rather than wait for the 15 s one.
    let nudge = CancellationToken::new();
    let nudging = {
        let stop = nudge.clone();
        let url = env.db_url.clone();
        tokio::spawn(async move {
            let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            while !stop.is_cancelled() {
                let _ = c.execute("SELECT pg_log_standby_snapshot()", &[]).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let relay = RunningRelay::start(load_toml(&on_standby("")));
    let stop = CancellationToken::new();
    let writer = tokio::spawn(write_until(
        env.db_url.clone(),
        1_000_000,
        Duration::from_millis(20),
        stop.clone(),
    ));
    assert!(env.consume(&["outbox.order"], 500, 60).await.len() >= 500);
    let standby_db = standby.connect("app").await.unwrap();
    assert_eq!(
        slots_named_ours(&standby_db).await,
        1,
        "the slot is on the standby"
    );
    assert_eq!(
        slots_named_ours(&primary).await,
        0,
        "and not on the primary"
    );

    // The standby is promoted (its primary gone); the writer and the relay follow.
    stop.cancel();
    let before = writer.await.unwrap();
    nudge.cancel();
    nudging.await.unwrap();
    env.pg.kill();
    let promoted: bool = standby
        .connect("postgres")
        .await
        .unwrap()
        .query_one("SELECT pg_promote(true, 60)", &[])
        .await
        .unwrap()
        .get(0);
    assert!(promoted);
    for i in 0..10 {
        insert_event(
            &standby_db,
            "order",
            "agg-after",
            &format!("After{i}"),
            "{}",
        )
        .await;
    }
    let rows = standby_db
        .query(
            "SELECT id::text, aggregate_id FROM outbox ORDER BY seq",
            &[],
        )
        .await
        .unwrap();
    let expected: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let ids: HashSet<&str> = expected.iter().map(|(id, _)| id.as_str()).collect();
    let got = read_until_complete(&env, &ids).await;
    relay.stop().await;
    let t = tally(&expected, &got);
    let (lost, reordered) = (t.lost, t.reordered);
    eprintln!(
        "standby decoding on PostgreSQL {major}: {} events in the promoted standby's outbox \
         ({} of the {before} the writer committed on the old primary had reached the standby \
         when it died), {} delivered, {lost} lost, {reordered} keys out of order, {} duplicates",
        expected.len(),
        expected.len() - 20,
        got.len(),
        t.duplicates
    );
    for key in ["agg-before", "agg-after"] {
        assert_eq!(
            t.per_key.get(key).copied().unwrap_or(0),
            10,
            "{key}: written before the first start / after the promotion"
        );
    }
    assert_eq!(lost, 0);
    assert_eq!(reordered, 0);
    assert_eq!(t.phantom, 0, "nothing delivered that is not in the table");
}
