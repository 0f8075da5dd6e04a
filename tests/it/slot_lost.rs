//! A replication slot lost for real: invalidated by `max_slot_wal_keep_size`, or dropped
//! while the relay uses it. `on_slot_lost = "fail"` stops with the fix; `"recreate"`
//! makes a new slot and publishes the rows still in the outbox.

use std::time::Duration;

use outbox_relay::testkit::kafka::Consumed;

use crate::logical::logical_toml;
use crate::support::start_with_telemetry as start;
use crate::support::*;

/// Writes WAL elsewhere, switching segments and checkpointing, until the server gives
/// up on the slot (a checkpoint is where it invalidates).
async fn invalidate(db: &tokio_postgres::Client, slot: &str) {
    db.batch_execute("CREATE TABLE filler (x text)")
        .await
        .unwrap();
    for _ in 0..20 {
        db.batch_execute(
            "INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 5000); \
             SELECT pg_switch_wal(); CHECKPOINT",
        )
        .await
        .unwrap();
        let status: Option<String> = db
            .query_one(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()
            .get(0);
        if status.as_deref() == Some("lost") {
            return;
        }
    }
    panic!("slot {slot} was not invalidated");
}

async fn transactional_message(db: &tokio_postgres::Client, event_type: &str) {
    let content = format!(
        r#"{{"id":"m-{event_type}","aggregate_type":"order","aggregate_id":"o-1","event_type":"{event_type}","payload":{{}}}}"#
    );
    db.execute(
        "SELECT pg_logical_emit_message(true, 'outbox', $1)",
        &[&content],
    )
    .await
    .unwrap();
}

fn types(got: &[Consumed]) -> Vec<String> {
    got.iter()
        .map(|m| m.header("event_type").unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidated_slot_stops_the_relay_or_is_recreated_with_the_outbox_rows_republished() {
    let env = Env::start_with(&["max_slot_wal_keep_size=1MB", "wal_keep_size=0"]).await;
    env.create_topics(&["outbox.order"], 1).await;
    let db = env.client().await;
    let toml = logical_toml(&env, "cleanup = true");
    let relay = RunningRelay::start(load_toml(&toml));
    for i in 0..5 {
        insert_event(&db, "order", "o-1", &format!("Sent{i}"), "{}").await;
    }
    assert_eq!(env.consume(&["outbox.order"], 5, 20).await.len(), 5);
    env.wait_outbox_empty(Duration::from_secs(20)).await;
    relay.stop().await;

    // Written while the relay is away, then the slot falls out of the WAL.
    for i in 0..3 {
        insert_event(&db, "order", "o-1", &format!("Left{i}"), "{}").await;
    }
    transactional_message(&db, "OnlyInWal").await;
    invalidate(&db, "outbox_relay").await;

    // fail (the default): the relay stops with what happened and the ways on.
    let relay = RunningRelay::start(load_toml(&toml));
    let err = tokio::time::timeout(Duration::from_secs(30), relay.task)
        .await
        .expect("the relay stops by itself")
        .unwrap()
        .expect_err("a lost slot is an error")
        .to_string();
    for needed in [
        "replication slot outbox_relay was invalidated (wal_removed)",
        "max_slot_wal_keep_size",
        "on_slot_lost = \"recreate\"",
        "pg_drop_replication_slot('outbox_relay')",
    ] {
        assert!(err.contains(needed), "{needed:?} not in: {err}");
    }
    let still: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'outbox_relay'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(still, 1, "fail leaves the slot for the operator");

    // recreate: a new slot, the rows still in the outbox published, the loss counted.
    let (relay, telemetry) = start(&logical_toml(
        &env,
        "cleanup = true\non_slot_lost = \"recreate\"",
    ));
    let got = env.consume(&["outbox.order"], 8, 30).await;
    assert_eq!(
        types(&got),
        ["Sent0", "Sent1", "Sent2", "Sent3", "Sent4", "Left0", "Left1", "Left2"],
        "the rows left in the outbox are published again"
    );
    insert_event(&db, "order", "o-1", "Streamed", "{}").await;
    let after = env.consume(&["outbox.order"], 9, 20).await;
    relay.stop().await;
    assert_eq!(
        types(&after[8..]),
        ["Streamed"],
        "then the new slot streams; the message that was only in the lost WAL is gone"
    );
    assert_eq!(telemetry.metrics.slots_recreated.get(), 1);
    let status: String = db
        .query_one(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'outbox_relay'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_ne!(status, "lost", "the new slot is usable");
}

/// A slot dropped while the relay streams from it (its walsender terminated, then
/// `pg_drop_replication_slot`): a loss, not a first start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_dropped_under_the_relay_is_a_loss_it_reports_or_recreates() {
    let env = Env::start().await;
    env.create_topics(&["outbox.order"], 1).await;
    let db = env.client().await;
    for (policy, expect_recreate) in [("fail", false), ("recreate", true)] {
        let toml = logical_toml(&env, &format!("on_slot_lost = \"{policy}\""));
        let (relay, telemetry) = start(&toml);
        insert_event(&db, "order", "o-1", &format!("Before-{policy}"), "{}").await;
        let seen = env.consume(&["outbox.order"], 1000, 3).await;
        assert!(types(&seen).contains(&format!("Before-{policy}")));
        // The relay acknowledged through the slot: wait for its flush to count.
        for _ in 0..100 {
            if telemetry.metrics.last_acked_lsn.get() > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(telemetry.metrics.last_acked_lsn.get() > 0);
        // The slot the fail round lost is remembered: this round's start recreated it.
        let recreated_at_start = telemetry.metrics.slots_recreated.get();
        assert_eq!(recreated_at_start, u64::from(expect_recreate));
        drop_under_the_relay(&db, "outbox_relay").await;
        if expect_recreate {
            insert_event(&db, "order", "o-1", "AfterRecreate", "{}").await;
            let got = env.consume(&["outbox.order"], 1000, 5).await;
            assert!(types(&got).contains(&"AfterRecreate".to_owned()));
            assert_eq!(
                telemetry.metrics.slots_recreated.get(),
                recreated_at_start + 1
            );
            assert_eq!(
                telemetry.metrics.first_starts_with_history.get(),
                recreated_at_start + 1,
                "each recreation is a first start on an outbox with history"
            );
            relay.stop().await;
        } else {
            let err = tokio::time::timeout(Duration::from_secs(30), relay.task)
                .await
                .expect("the relay stops by itself")
                .unwrap()
                .expect_err("a dropped slot is an error")
                .to_string();
            assert!(
                err.contains(
                    "replication slot outbox_relay was dropped while the relay was using it"
                ),
                "{err}"
            );
            assert!(err.contains("on_slot_lost = \"recreate\""), "{err}");
            assert_eq!(telemetry.metrics.slots_recreated.get(), 0);
        }
    }
}

/// Terminates the slot's walsender and drops the slot before the relay reconnects
/// (it may win the race a few times: then again).
pub async fn drop_under_the_relay(db: &tokio_postgres::Client, slot: &str) {
    for _ in 0..100 {
        db.execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
             WHERE slot_name = $1 AND active_pid IS NOT NULL",
            &[&slot],
        )
        .await
        .unwrap();
        match db
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
        {
            Ok(_) => return,
            Err(e) if e.code().is_some_and(|c| c.code() == "55006") => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(e) => panic!("dropping {slot}: {e}"),
        }
    }
    panic!("could not drop {slot} under the relay");
}

/// PostgreSQL 18 also invalidates a slot unused for `idle_replication_slot_timeout`: the
/// same policy, the server's own reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_18_a_slot_idle_past_idle_replication_slot_timeout_is_reported_as_such() {
    let env = Env::start().await;
    let major = env.pg_major().await;
    if major < 18 {
        eprintln!("PostgreSQL {major} has no idle_replication_slot_timeout: nothing to test");
        return;
    }
    env.create_topics(&["outbox.order"], 1).await;
    let db = env.client().await;
    let toml = logical_toml(&env, "");
    let relay = RunningRelay::start(load_toml(&toml));
    insert_event(&db, "order", "o-1", "Sent", "{}").await;
    assert_eq!(env.consume(&["outbox.order"], 1, 20).await.len(), 1);
    relay.stop().await;
    for sql in [
        "ALTER SYSTEM SET idle_replication_slot_timeout = '1s'",
        "SELECT pg_reload_conf()",
    ] {
        db.batch_execute(sql).await.unwrap();
    }
    let mut reason = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        db.batch_execute("CHECKPOINT").await.unwrap();
        reason = db
            .query_one(
                "SELECT invalidation_reason FROM pg_replication_slots WHERE slot_name = 'outbox_relay'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, Option<String>>(0);
        if reason.is_some() {
            break;
        }
    }
    assert_eq!(reason.as_deref(), Some("idle_timeout"));
    let err = run_error(load_toml(&toml)).await;
    assert!(
        err.contains("replication slot outbox_relay was invalidated (idle_timeout): it was unused for longer than idle_replication_slot_timeout"),
        "{err}"
    );
}
