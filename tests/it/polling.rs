//! Polling mode: rows are published in `seq` order, deleted only once acked, and never
//! overtaken by a later row that committed first.

use std::time::Duration;

use crate::support::{insert_event, Env, RunningRelay};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_rows_with_topic_key_headers_and_deletes_them() {
    publishes_rows(Env::start().await).await
}

/// The same on tansu, the demo's broker: another Kafka-protocol implementation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_rows_with_topic_key_headers_and_deletes_them_on_tansu() {
    publishes_rows(Env::start_tansu().await).await
}

async fn publishes_rows(env: Env) {
    env.create_topics(&["outbox.order", "outbox.customer"], 3)
        .await;
    let db = env.client().await;
    let id1 = insert_event(
        &db,
        "order",
        "o-1",
        "OrderPlaced",
        r#"{"n": 1, "b": [true, null]}"#,
    )
    .await;
    let id2 = insert_event(
        &db,
        "customer",
        "c-9",
        "CustomerJoined",
        r#"{"name": "ada"}"#,
    )
    .await;
    db.execute(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers) \
         VALUES ('order', 'o-1', 'OrderPaid', '{\"n\": 2}', '{\"traceparent\": \"00-abc-01\", \"attempt\": 3, \"id\": \"spoof\"}')",
        &[],
    )
    .await
    .unwrap();

    let relay = RunningRelay::start(env.config(""));
    let orders = env.consume(&["outbox.order"], 2, 20).await;
    let customers = env.consume(&["outbox.customer"], 1, 20).await;
    relay.stop().await;

    assert_eq!(orders.len(), 2, "both order events arrive");
    assert_eq!(customers.len(), 1);
    let placed = &orders[0];
    assert_eq!(placed.key_str(), "o-1");
    // jsonb's own text form, byte for byte.
    assert_eq!(placed.value_str(), r#"{"b": [true, null], "n": 1}"#);
    assert_eq!(placed.header("id"), Some(id1.as_str()));
    assert_eq!(placed.header("event_type"), Some("OrderPlaced"));
    assert_eq!(placed.header("aggregate_type"), Some("order"));
    assert!(
        placed.timestamp_ms.unwrap() > 1_700_000_000_000,
        "created_at is the timestamp"
    );
    let paid = &orders[1];
    assert_eq!(
        paid.header("event_type"),
        Some("OrderPaid"),
        "per-key order holds"
    );
    assert_eq!(
        paid.header("traceparent"),
        Some("00-abc-01"),
        "string header as-is"
    );
    assert_eq!(
        paid.header("attempt"),
        Some("3"),
        "non-string header as JSON text"
    );
    assert_eq!(
        paid.headers.iter().filter(|(k, _)| k == "id").count(),
        1,
        "a headers key cannot spoof the event id"
    );
    assert_eq!(customers[0].header("id"), Some(id2.as_str()));
    assert_eq!(customers[0].key_str(), "c-9");
    assert_eq!(env.outbox_count().await, 0, "acked rows are deleted");
}

/// The visibility rule: T1 takes seq 1, T2 takes seq 2 for the same aggregate, T2
/// commits first. Publishing what is visible would send 2 before 1; the relay must hold
/// 2 back until T1 has ended, then send 1, 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_committed_early_does_not_overtake_a_lower_seq_still_open() {
    let env = Env::start().await;
    env.create_topics(&["outbox.order"], 1).await;
    let t1 = env.client().await;
    let t2 = env.client().await;
    // T1 writes a business row first, so its xid is the lower one while its seq will be
    // the higher... and the other way round for T2: both orders of xid and seq covered.
    t1.batch_execute("BEGIN; CREATE TEMP TABLE t1_marker(x int); INSERT INTO t1_marker VALUES (1)")
        .await
        .unwrap();
    t2.batch_execute("BEGIN").await.unwrap();
    insert_event(&t2, "order", "o-1", "First", r#"{"step": 1}"#).await;
    insert_event(&t1, "order", "o-1", "Second", r#"{"step": 2}"#).await;
    t1.batch_execute("COMMIT").await.unwrap();

    let relay = RunningRelay::start(env.config(""));
    crate::support::wait_for_leader(&t2).await;
    let early = env.consume(&["outbox.order"], 1, 2).await;
    assert!(
        early.is_empty(),
        "the later seq must wait for the open transaction: {early:?}"
    );
    assert_eq!(
        env.outbox_count().await,
        1,
        "nothing deleted while held back"
    );

    t2.batch_execute("COMMIT").await.unwrap();
    let got = env.consume(&["outbox.order"], 2, 20).await;
    relay.stop().await;
    let steps: Vec<_> = got
        .iter()
        .map(|m| m.header("event_type").unwrap().to_owned())
        .collect();
    assert_eq!(steps, ["First", "Second"], "seq order per aggregate");
    assert_eq!(env.outbox_count().await, 0);
}

/// The batch read stays an index scan that stops after one batch whatever the planner
/// knows of the table. With the fence inside the index condition, a table never analyzed
/// (a new outbox, a burst before autovacuum's ANALYZE) or a generic plan got a bitmap
/// scan of the whole backlog and a sort for every batch: a drain quadratic in its size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_batch_read_is_an_index_scan_without_statistics_and_as_a_generic_plan() {
    let env = Env::start().await;
    let db = env.client().await;
    db.batch_execute(
        "ALTER TABLE outbox SET (autovacuum_enabled = false); \
         INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
         SELECT 'order', 'o-' || (i % 100), 'Tick', jsonb_build_object('n', i) \
         FROM generate_series(1, 50000) i",
    )
    .await
    .unwrap();
    let analyzed: i64 = db
        .query_one(
            "SELECT analyze_count + autoanalyze_count FROM pg_stat_user_tables \
             WHERE relname = 'outbox'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        analyzed, 0,
        "the table must have no statistics for this test"
    );
    let config = env.config("");
    let (batch, _) = outbox_relay::source::polling::batch_and_delete_sql(&config.source)
        .await
        .unwrap();
    db.batch_execute(&format!("PREPARE batch(int8, int8, int8, int8) AS {batch}"))
        .await
        .unwrap();
    // From the bottom and from the middle, each as a custom and as a generic plan.
    for (mode, from) in [
        ("force_custom_plan", 0),
        ("force_custom_plan", 25_000),
        ("force_generic_plan", 0),
        ("force_generic_plan", 25_000),
    ] {
        db.batch_execute(&format!("SET plan_cache_mode = {mode}"))
            .await
            .unwrap();
        let plan: Vec<String> = db
            .query(
                &format!("EXPLAIN EXECUTE batch({from}, 50000, 1000, 4194304)"),
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let plan = plan.join("\n");
        assert!(
            plan.contains("Index Scan") && !plan.contains("Bitmap"),
            "{mode} from {from}: the batch read must be an index scan:\n{plan}"
        );
    }
    let seqs = |sql: &'static str| {
        let db = &db;
        async move {
            let rows = db.query(sql, &[]).await.unwrap();
            rows.iter().map(|r| r.get(0)).collect::<Vec<i64>>()
        }
    };
    let read = seqs("EXECUTE batch(25000, 25500, 1000, 4194304)").await;
    let expected =
        seqs("SELECT seq FROM outbox WHERE seq > 25000 AND seq <= 25500 ORDER BY seq").await;
    assert!(!expected.is_empty());
    assert_eq!(
        read, expected,
        "a LIMIT reaching past the fence returns the rows up to the fence, in order"
    );
}

/// Rolled-back transactions leave gaps in `seq`; they must not stall the relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gaps_from_rolled_back_transactions_do_not_stall() {
    let env = Env::start().await;
    env.create_topics(&["outbox.order"], 1).await;
    let db = env.client().await;
    db.batch_execute("BEGIN").await.unwrap();
    insert_event(&db, "order", "o-1", "Lost", "{}").await;
    db.batch_execute("ROLLBACK").await.unwrap();
    insert_event(&db, "order", "o-1", "Kept", "{}").await;

    let relay = RunningRelay::start(env.config(""));
    let got = env.consume(&["outbox.order"], 1, 20).await;
    relay.stop().await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].header("event_type"), Some("Kept"));
}

/// One leader per outbox: a second relay waits, and takes over when the first stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_relay_waits_as_standby_and_takes_over() {
    let env = Env::start().await;
    env.create_topics(&["outbox.order"], 1).await;
    let db = env.client().await;

    let leader = RunningRelay::start(env.config(""));
    insert_event(&db, "order", "o-1", "One", "{}").await;
    assert_eq!(env.consume(&["outbox.order"], 1, 20).await.len(), 1);

    let standby = RunningRelay::start(env.config(""));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let holders: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(holders, 1, "exactly one relay holds the leader lock");

    leader.stop().await;
    insert_event(&db, "order", "o-1", "Two", "{}").await;
    let got = env.consume(&["outbox.order"], 2, 20).await;
    standby.stop().await;
    let types: Vec<_> = got
        .iter()
        .map(|m| m.header("event_type").unwrap())
        .collect();
    assert_eq!(types, ["One", "Two"], "the standby took over and published");
    assert_eq!(env.outbox_count().await, 0);
}

/// The role from sql/003_relay_role.sql is all the relay needs: read, delete, lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_as_the_least_privilege_role() {
    let env = Env::start().await;
    env.create_topics(&["outbox.order"], 1).await;
    let db = env.client().await;
    insert_event(&db, "order", "o-1", "Placed", "{}").await;
    let toml = env
        .config_toml("polling", "", "")
        .replace("postgres://postgres@", "postgres://outbox_relay@");
    let relay = RunningRelay::start(crate::support::load_toml(&toml));
    let got = env.consume(&["outbox.order"], 1, 20).await;
    relay.stop().await;
    assert_eq!(got.len(), 1);
    assert_eq!(env.outbox_count().await, 0);
}

/// After an upgrade from a version without `source.dead_letter_table`, the relay makes
/// the table itself where its role may (the shipped definition), and where it may not,
/// refuses to start naming the table and the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_dead_letter_table_is_created_at_start_or_refused_with_the_fix() {
    let env = Env::start().await;
    env.create_topics(&["outbox.order"], 1).await;
    let db = env.client().await;
    // PostgreSQL 15's default, stated for the older majors: only owners create in public.
    db.batch_execute(
        "DROP TABLE outbox_relay_dead_letter; REVOKE CREATE ON SCHEMA public FROM PUBLIC",
    )
    .await
    .unwrap();
    let least = env
        .config_toml("polling", "", "")
        .replace("postgres://postgres@", "postgres://outbox_relay@");
    let e = crate::support::run_error(crate::support::load_toml(&least)).await;
    assert!(
        e.contains(
            "dead-letter table public.outbox_relay_dead_letter does not exist \
             (source.dead_letter_table) and this role may not create it in schema public: \
             create it with sql/004_dead_letter.sql"
        ),
        "{e}"
    );

    insert_event(&db, "order", "o-1", "Placed", "{}").await;
    let relay = RunningRelay::start(crate::support::load_toml(
        &env.config_toml("polling", "", ""),
    ));
    let got = env.consume(&["outbox.order"], 1, 20).await;
    relay.stop().await;
    assert_eq!(got.len(), 1, "the relay runs once the table is made");
    let columns: Vec<String> = db
        .query(
            "SELECT column_name::text FROM information_schema.columns \
             WHERE table_schema = 'public' AND table_name = 'outbox_relay_dead_letter' \
             ORDER BY ordinal_position",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        columns,
        [
            "id",
            "dead_lettered_at",
            "source_position",
            "event_id",
            "aggregate_type",
            "aggregate_id",
            "event_type",
            "headers",
            "error",
            "body"
        ],
        "the shipped definition"
    );
}

/// Another table layout: Debezium-style names, a `bytea` payload passed through byte for
/// byte, no headers or created_at column, and a per-row topic column.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_columns_bytea_payloads_and_a_topic_column() {
    let env = Env::start().await;
    env.create_topics(&["events.Shipped", "replies.billing"], 1)
        .await;
    let db = env.client().await;
    db.batch_execute(
        "CREATE TABLE app_events (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), \
           pos bigint GENERATED ALWAYS AS IDENTITY UNIQUE, aggregatetype varchar(64) NOT NULL, \
           aggregateid varchar(64) NOT NULL, type varchar(64) NOT NULL, payload bytea, dest text);
         INSERT INTO app_events (aggregatetype, aggregateid, type, payload, dest) VALUES
           ('shipment', 's-1', 'Shipped', '\\x00ff10', NULL);",
    )
    .await
    .unwrap();
    db.execute(
        "INSERT INTO app_events (aggregatetype, aggregateid, type, payload, dest) VALUES \
           ('invoice', 'i-1', 'Reply', '\\x7b7d', $1)",
        &[&env.topic("replies.billing")],
    )
    .await
    .unwrap();
    let source = r#"table = "app_events"
[source.columns]
seq = "pos"
aggregate_type = "aggregatetype"
aggregate_id = "aggregateid"
event_type = "type"
headers = ""
created_at = ""
topic = "dest""#;
    let toml = env
        .with_topic(
            &env.config_toml("polling", source, ""),
            "events.{event_type}",
        )
        .replace(
            "[sink.kafka]",
            &format!(
                "[sink.kafka]\nrow_topics = [\"{}\"]",
                env.topic("replies.*")
            ),
        );
    let relay = RunningRelay::start(crate::support::load_toml(&toml));
    let shipped = env.consume(&["events.Shipped"], 1, 20).await;
    let replies = env.consume(&["replies.billing"], 1, 20).await;
    relay.stop().await;
    assert_eq!(
        shipped[0].value,
        [0x00, 0xff, 0x10],
        "bytea passes through untouched"
    );
    assert_eq!(shipped[0].key_str(), "s-1");
    assert_eq!(shipped[0].header("event_type"), Some("Shipped"));
    assert_eq!(replies[0].value, b"{}");
    assert_eq!(replies[0].key_str(), "i-1");
    let left: i64 = db
        .query_one("SELECT count(*) FROM app_events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
}

/// A malformed row goes to the dead-letter topic; the rows behind it keep flowing and
/// all of them are deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_row_is_dead_lettered_and_does_not_stop_the_pipeline() {
    let env = Env::start().await;
    env.create_topics(&["outbox.order", "outbox.dlq"], 1).await;
    let db = env.client().await;
    insert_event(&db, "order", "o-1", "Before", "{}").await;
    let bad = insert_event(&db, "order", "", "Keyless", r#"{"keep": "me"}"#).await;
    insert_event(&db, "order", "o-1", "After", "{}").await;
    let relay = RunningRelay::start(env.config(""));
    let normal = env.consume(&["outbox.order"], 2, 20).await;
    let dlq = env.consume(&["outbox.dlq"], 1, 20).await;
    relay.stop().await;
    let types: Vec<_> = normal
        .iter()
        .map(|m| m.header("event_type").unwrap())
        .collect();
    assert_eq!(types, ["Before", "After"]);
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].header("id"), Some(bad.as_str()));
    assert_eq!(dlq[0].header("error"), Some("aggregate_id is empty"));
    assert!(dlq[0]
        .header("source_position")
        .unwrap()
        .starts_with("seq:"));
    assert_eq!(dlq[0].value_str(), r#"{"keep": "me"}"#);
    assert_eq!(env.outbox_count().await, 0);
}

/// The visibility rule needs a sequence that hands out values in order: one that caches
/// several values per session is refused whether the column owns it (identity, serial)
/// or only calls it from its default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caching_sequence_behind_seq_is_refused_owned_or_not() {
    let env = Env::start().await;
    let db = env.client().await;
    db.batch_execute("ALTER TABLE outbox ALTER COLUMN seq SET CACHE 20")
        .await
        .unwrap();
    let e = crate::support::run_error(env.config("")).await;
    assert!(e.contains("caches 20 values per session"), "{e}");
    assert!(e.contains("CACHE 1"), "{e}");

    db.batch_execute(
        "ALTER TABLE outbox ALTER COLUMN seq SET CACHE 1; \
         ALTER TABLE outbox ALTER COLUMN seq DROP IDENTITY; \
         CREATE SEQUENCE not_owned CACHE 20; \
         ALTER TABLE outbox ALTER COLUMN seq SET DEFAULT nextval('not_owned')",
    )
    .await
    .unwrap();
    let e = crate::support::run_error(env.config("")).await;
    assert!(e.contains("sequence not_owned"), "{e}");
    assert!(e.contains("ALTER SEQUENCE not_owned CACHE 1"), "{e}");
}

/// A row that appears below rows already published (here written with an explicit
/// seq) is published late, never left behind until a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_appearing_below_the_cursor_is_still_published() {
    let env = Env::start().await;
    env.create_topics(&["outbox.order"], 1).await;
    let db = env.client().await;
    db.batch_execute("SELECT setval(pg_get_serial_sequence('outbox', 'seq'), 100)")
        .await
        .unwrap();
    let relay = RunningRelay::start(env.config(""));
    insert_event(&db, "order", "o-1", "High", "{}").await;
    assert_eq!(env.consume(&["outbox.order"], 1, 20).await.len(), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    db.batch_execute(
        "INSERT INTO outbox (seq, aggregate_type, aggregate_id, event_type, payload) \
         OVERRIDING SYSTEM VALUE VALUES (5, 'order', 'o-2', 'Low', '{}')",
    )
    .await
    .unwrap();
    let got = env.consume(&["outbox.order"], 2, 20).await;
    relay.stop().await;
    let types: Vec<_> = got
        .iter()
        .map(|m| m.header("event_type").unwrap())
        .collect();
    assert_eq!(types, ["High", "Low"]);
    assert_eq!(env.outbox_count().await, 0);
}
