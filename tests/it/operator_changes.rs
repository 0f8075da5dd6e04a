//! What operators do to the database, in log mode: a table leaving the publication, a
//! publication dropped, a slot dropped while a supervisor restarts the relay, an outbox
//! row updated or deleted after it was written. Each is detected and either recovered
//! with nothing lost and per-key order kept, or refused with the exact fix.

use std::time::Duration;

use outbox_relay::metrics::Telemetry;
use outbox_relay::testkit::kafka::Consumed;

use crate::logical::logical_toml;
use crate::support::start_with_telemetry as start;
use crate::support::*;

/// Waits for a relay that must stop by itself; its error.
async fn stops_with_error(relay: RunningRelay) -> String {
    tokio::time::timeout(Duration::from_secs(30), relay.task)
        .await
        .expect("the relay stops by itself")
        .unwrap()
        .expect_err("the relay stops with an error")
        .to_string()
}

/// Event types in the order of their first delivery: what a consumer that drops
/// duplicates by event id sees.
fn first_seen(got: &[Consumed]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    got.iter()
        .filter(|m| seen.insert(m.header("id").unwrap().to_owned()))
        .map(|m| m.header("event_type").unwrap().to_owned())
        .collect()
}

/// Reads the topic until `want` distinct events arrived (or `secs` passed).
async fn distinct(env: &Env, topic: &str, want: usize, secs: u64) -> Vec<Consumed> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let got = env.consume(&[topic], 10_000, 2).await;
        if first_seen(&got).len() >= want || tokio::time::Instant::now() > deadline {
            return got;
        }
    }
}

/// Reads until the events of `want` arrived, and asserts that they arrived first in
/// this order.
async fn expect_in_order(env: &Env, want: &[&str], secs: u64) {
    let got = distinct(env, "outbox.order", want.len(), secs).await;
    assert_eq!(first_seen(&got), want);
}

const DROP_OUTBOX: &str = "ALTER PUBLICATION outbox_relay DROP TABLE outbox";
const ADD_OUTBOX_BACK: &str = "ALTER PUBLICATION outbox_relay ADD TABLE public.outbox";
/// Another table's traffic: it moves the WAL on past a change to the publication.
const OTHER_TRAFFIC: &str = "CREATE TABLE busy (x int); INSERT INTO busy VALUES (1)";

/// Writes one event of aggregate `o-1`, the aggregate of every test here but one.
async fn write(db: &tokio_postgres::Client, event_type: &str) {
    insert_event(db, "order", "o-1", event_type, "{}").await;
}

async fn exec(db: &tokio_postgres::Client, sql: &str) {
    db.batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// A relay streaming (not in its first start) that has published `first` and flushed
/// the slot past it.
async fn streaming(env: &Env, toml: &str, first: &str) -> (RunningRelay, Telemetry) {
    let (relay, telemetry) = start(toml);
    write(&env.client().await, first).await;
    expect_in_order(env, &[first], 30).await;
    for _ in 0..200 {
        if telemetry.metrics.last_acked_lsn.get() > 0 {
            return (relay, telemetry);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the relay never flushed the slot");
}

/// The issue's own sequence, fast, while the relay streams: the row written while the
/// outbox was out of the publication is published, and before the later row of its
/// aggregate; the relay never exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_dropped_from_the_publication_and_added_back_is_republished_in_order() {
    let env = Env::start().await;
    env.create_topics(&["outbox.order"], 1).await;
    let db = env.client().await;
    let (relay, telemetry) = streaming(&env, &logical_toml(&env, ""), "Gap1").await;
    write(&db, "Gap2").await;
    expect_in_order(&env, &["Gap1", "Gap2"], 30).await;

    exec(&db, DROP_OUTBOX).await;
    write(&db, "Gap3").await;
    exec(&db, ADD_OUTBOX_BACK).await;
    write(&db, "Gap4").await;

    expect_in_order(&env, &["Gap1", "Gap2", "Gap3", "Gap4"], 40).await;
    assert!(
        telemetry.metrics.publication_gap_rows.get() >= 1,
        "the republished rows are counted"
    );
    assert!(!relay.task.is_finished(), "the relay recovered by itself");
    write(&db, "Gap5").await;
    expect_in_order(&env, &["Gap1", "Gap2", "Gap3", "Gap4", "Gap5"], 30).await;
    relay.stop().await;
}

/// The relay checks while the outbox is out of the publication (other tables' traffic
/// moves the WAL past the change) and the table comes back a moment later: a change in
/// progress, republished in order, not a stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_between_drop_and_add_waits_for_the_table_to_come_back() {
    let env = Env::start().await;
    env.create_topics(&["outbox.order"], 1).await;
    let db = env.client().await;
    let (relay, telemetry) = streaming(&env, &logical_toml(&env, ""), "Before").await;
    // Committed and flushed at once, so the walsender passes the change promptly and the
    // relay checks the publication while the outbox is out of it.
    exec(&db, "SET synchronous_commit = on").await;
    exec(&db, DROP_OUTBOX).await;
    write(&db, "WhileOut").await;
    exec(&db, OTHER_TRAFFIC).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    exec(&db, ADD_OUTBOX_BACK).await;
    write(&db, "After").await;

    expect_in_order(&env, &["Before", "WhileOut", "After"], 40).await;
    assert!(!relay.task.is_finished(), "the relay waited, then repaired");
    assert!(telemetry.metrics.publication_gap_rows.get() >= 1);
    relay.stop().await;
}

/// The table stays out: the relay stops before acknowledging anything past the change,
/// with the fix; once fixed (and with the relay stopped during another round of it), the
/// next start publishes what the server skipped, first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_without_the_outbox_stops_the_relay_with_the_fix_and_the_rows_follow() {
    let env = Env::start().await;
    env.create_topics(&["outbox.order"], 1).await;
    let db = env.client().await;
    let toml = logical_toml(&env, "");
    let (relay, _) = streaming(&env, &toml, "Before").await;

    exec(&db, DROP_OUTBOX).await;
    write(&db, "WhileOut").await;
    // The relay must not flush past the change.
    exec(&db, OTHER_TRAFFIC).await;
    let err = stops_with_error(relay).await;
    for needed in [
        "ALTER PUBLICATION outbox_relay ADD TABLE \"public\".\"outbox\"",
        "stopped before acknowledging",
    ] {
        assert!(err.contains(needed), "{needed:?} not in: {err}");
    }
    // A restart before the fix is refused the same way.
    let err = run_error(load_toml(&toml)).await;
    assert!(err.contains("does not publish"), "{err}");

    exec(&db, ADD_OUTBOX_BACK).await;
    write(&db, "AfterFix").await;
    // The same with the relay stopped throughout.
    exec(&db, DROP_OUTBOX).await;
    write(&db, "WhileStopped").await;
    exec(&db, ADD_OUTBOX_BACK).await;
    write(&db, "Last").await;

    let (relay, telemetry) = start(&toml);
    let order = ["Before", "WhileOut", "AfterFix", "WhileStopped", "Last"];
    expect_in_order(&env, &order, 40).await;
    assert!(telemetry.metrics.publication_gap_rows.get() >= 2);
    relay.stop().await;
}

/// `DROP PUBLICATION` under a streaming relay: stopped with the fix (on 15 the server
/// fails the stream, on 18 it skips the rows and the flush check stops the relay); a
/// restart never re-creates the publication of a slot with history; once the operator
/// creates it, the rows written while it was missing are published, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_publication_is_never_recreated_silently_and_its_rows_follow_the_fix() {
    let env = Env::start().await;
    env.create_topics(&["outbox.order"], 1).await;
    let db = env.client().await;
    let toml = logical_toml(&env, "");
    let (relay, _) = streaming(&env, &toml, "Before").await;

    exec(&db, "DROP PUBLICATION outbox_relay").await;
    write(&db, "Missing1").await;
    exec(&db, OTHER_TRAFFIC).await;
    let err = stops_with_error(relay).await;
    assert!(err.contains("CREATE PUBLICATION outbox_relay"), "{err}");
    let err = run_error(load_toml(&toml)).await;
    assert!(
        err.contains("the relay does not create it silently"),
        "a restart refuses too: {err}"
    );
    let publications: i64 = db
        .query_one("SELECT count(*) FROM pg_publication", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(publications, 0, "create_if_missing made no publication");

    write(&db, "Missing2").await;
    exec(
        &db,
        "CREATE PUBLICATION outbox_relay FOR TABLE public.outbox \
         WITH (publish = 'insert, update, delete', publish_via_partition_root = true)",
    )
    .await;
    write(&db, "After").await;
    let (relay, telemetry) = start(&toml);
    expect_in_order(&env, &["Before", "Missing1", "Missing2", "After"], 40).await;
    assert!(telemetry.metrics.publication_gap_rows.get() >= 2);
    write(&db, "Streamed").await;
    let got = distinct(&env, "outbox.order", 5, 30).await;
    if relay.task.is_finished() {
        let log = env.pg.log();
        let tail: Vec<&str> = log.lines().rev().take(400).collect();
        panic!(
            "the relay stopped: {:?}\n{}",
            relay.task.await,
            tail.join("\n")
        );
    }
    assert_eq!(
        first_seen(&got).last().map(String::as_str),
        Some("Streamed")
    );
    relay.stop().await;
}

/// A slot dropped while the relay is stopped, under a supervisor that restarts it:
/// every start exits with the slot-lost code until an operator says the drop was on
/// purpose; then a first start, warned about and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_slot_is_remembered_across_restarts_until_an_operator_forgets_it() {
    let env = Env::start().await;
    env.create_topics(&["outbox.order"], 1).await;
    let db = env.client().await;
    let toml = logical_toml(&env, "");
    let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(file.path(), &toml).unwrap();
    let (relay, telemetry) = streaming(&env, &toml, "First").await;
    relay.stop().await;
    assert_eq!(telemetry.metrics.first_starts_with_history.get(), 0);

    exec(&db, "SELECT pg_drop_replication_slot('outbox_relay')").await;
    // Two starts, as a supervisor would make them: both exit 3, neither makes a slot.
    for _ in 0..2 {
        let mut process = spawn_relay(file.path());
        let mut code = None;
        for _ in 0..300 {
            code = process.exit_code();
            if code.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            code,
            Some(i32::from(outbox_relay::cli::SLOT_LOST_EXIT_CODE)),
            "a lost slot exits with its own code"
        );
        let slots: i64 = db
            .query_one("SELECT count(*) FROM pg_replication_slots", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(slots, 0, "no silent first start");
    }
    let err = run_error(load_toml(&toml)).await;
    assert!(err.contains("outbox-relay slot forget"), "{err}");
    let check = |expect: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
            .args(["check", "--config"])
            .arg(file.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(text.contains(expect), "{expect:?} not in: {text}");
        out.status.code()
    };
    assert_eq!(check("replication slot outbox_relay is lost"), Some(1));

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args(["slot", "forget", "--config"])
        .arg(file.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("forgot replication slot outbox_relay"));
    check("slot outbox_relay forgotten at");

    let (relay, telemetry) = start(&toml);
    write(&db, "Second").await;
    let got = distinct(&env, "outbox.order", 2, 30).await;
    assert_eq!(first_seen(&got), ["First", "Second"]);
    assert_eq!(
        got.iter()
            .filter(|m| m.header("event_type") == Some("First"))
            .count(),
        2,
        "the first start published the table again"
    );
    assert_eq!(telemetry.metrics.first_starts_with_history.get(), 1);
    relay.stop().await;

    // The relay's tables are versioned: an older relay refuses newer state.
    exec(&db, "UPDATE outbox_relay_schema SET version = 99").await;
    let err = run_error(load_toml(&toml)).await;
    assert!(err.contains("at version 99"), "{err}");
}

/// Outbox rows are immutable: an UPDATE (even in the inserting transaction) or a DELETE
/// by someone else is warned about and counted, sent to the dead-letter topic, or stops
/// the relay, as `source.on_row_change` says; the relay's own cleanup is not counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_updated_or_deleted_outbox_row_is_never_silent() {
    let env = Env::start().await;
    env.create_topics(&["outbox.order", "outbox.dlq"], 1).await;
    let db = env.client().await;
    let toml = |policy: &str| {
        logical_toml(&env, "cleanup = true").replace(
            "[source.logical]",
            &format!("on_row_change = \"{policy}\"\n\n[source.logical]"),
        )
    };

    let (relay, telemetry) = start(&toml("warn"));
    // Streaming first: a first start would read the row as it is by then.
    insert_event(&db, "order", "o-0", "Warmup", "{}").await;
    assert_eq!(
        first_seen(&distinct(&env, "outbox.order", 1, 30).await).len(),
        1
    );
    exec(
        &db,
        "BEGIN; \
         INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
           VALUES ('order', 'o-1', 'Drafted', '{\"v\":\"draft\"}'); \
         UPDATE outbox SET payload = '{\"v\":\"final\"}' WHERE event_type = 'Drafted'; \
         COMMIT",
    )
    .await;
    let got = distinct(&env, "outbox.order", 2, 30).await;
    assert_eq!(
        got[1].value_str(),
        r#"{"v": "draft"}"#,
        "log mode publishes the insert image"
    );
    for i in 0..20 {
        insert_event(&db, "order", "o-2", &format!("Cleaned{i}"), "{}").await;
    }
    assert_eq!(
        first_seen(&distinct(&env, "outbox.order", 22, 30).await).len(),
        22
    );
    env.wait_outbox_empty(Duration::from_secs(20)).await;
    assert_eq!(
        env.outbox_count().await,
        0,
        "cleanup deleted the delivered rows"
    );
    let changes = |kind: &str| {
        telemetry
            .metrics
            .row_changes
            .with_label_values(&[kind])
            .get()
    };
    assert_eq!(changes("update"), 1);
    assert_eq!(
        changes("delete"),
        0,
        "the relay's own cleanup is not a row change"
    );
    relay.stop().await;

    // dead_letter: the new image goes to the dead-letter topic with the reason.
    let (relay, telemetry) = start(&toml("dead_letter"));
    exec(
        &db,
        "BEGIN; \
         INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) \
           VALUES ('00000000-0000-0000-0000-00000000000d', 'order', 'o-3', 'Drafted', '{\"v\":1}'); \
         UPDATE outbox SET payload = '{\"v\":2}' WHERE aggregate_id = 'o-3'; \
         COMMIT",
    )
    .await;
    let dead = env.consume(&["outbox.dlq"], 1, 30).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].value_str(), r#"{"v": 2}"#);
    let error = dead[0].header("error").unwrap_or_default();
    assert!(
        error.contains("00000000-0000-0000-0000-00000000000d") && error.contains("updated"),
        "{error}"
    );
    assert_eq!(
        telemetry
            .metrics
            .row_changes
            .with_label_values(&["update"])
            .get(),
        1
    );
    relay.stop().await;

    // stop: the relay stops before acknowledging the change, naming the row and the way on.
    // A DELETE by someone else (13 cannot tell them from cleanup's: an UPDATE there).
    let change = if env.pg_major().await >= 14 {
        "DELETE FROM outbox WHERE aggregate_id = 'o-4'"
    } else {
        "UPDATE outbox SET payload = '{\"v\":3}' WHERE aggregate_id = 'o-4'"
    };
    let (relay, _) = start(&toml("stop"));
    exec(
        &db,
        &format!(
            "BEGIN; \
             INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload) \
               VALUES ('00000000-0000-0000-0000-00000000000e', 'order', 'o-4', 'Drafted', '{{}}'); \
             {change}; \
             COMMIT"
        ),
    )
    .await;
    let err = stops_with_error(relay).await;
    assert!(
        err.contains("00000000-0000-0000-0000-00000000000e"),
        "{err}"
    );
    assert!(err.contains("on_row_change"), "{err}");
}
