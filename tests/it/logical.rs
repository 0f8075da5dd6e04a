//! Log mode: the relay tails the WAL through a replication slot (pgoutput).

use std::time::Duration;

use crate::support::{insert_event, load_toml, run_error, skipping, Env, RunningRelay};

/// `[source.logical]` settings for tests: fast status reports.
pub fn logical_toml(env: &Env, extra_logical: &str) -> String {
    env.config_toml("logical", "", "")
        .replace(
            "[source.polling]",
            &format!("[source.logical]\nstatus_interval = \"1s\"\nheartbeat_interval = \"0s\"\n{extra_logical}\n\n[source.polling]"),
        )
}

async fn emit(db: &tokio_postgres::Client, transactional: bool, content: &str) {
    db.execute(
        "SELECT pg_logical_emit_message($1, 'outbox', $2)",
        &[&transactional, &content],
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_start_publishes_existing_rows_then_streams_inserts_and_messages() {
    first_start_then_stream(Env::start().await).await
}

/// The same on tansu, the demo's broker: another Kafka-protocol implementation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_start_publishes_existing_rows_then_streams_inserts_and_messages_on_tansu() {
    first_start_then_stream(Env::start_tansu().await).await
}

async fn first_start_then_stream(env: Env) {
    env.create_topics(&["outbox.order", "outbox.dlq"], 2).await;
    let db = env.client().await;
    // PostgreSQL 13's pgoutput sends no logical decoding messages: there, only rows flow.
    let messages = env.pg_major().await >= 14;
    // Written before the relay (and its slot) ever existed.
    for i in 0..3 {
        insert_event(
            &db,
            "order",
            "o-1",
            &format!("Before{i}"),
            &format!("{{\"n\": {i}}}"),
        )
        .await;
    }
    // The poison messages below are of o-1: its later events flow past them.
    let relay = RunningRelay::start(load_toml(&skipping(&logical_toml(&env, ""))));
    let early = env.consume(&["outbox.order"], 3, 20).await;
    assert_eq!(early.len(), 3, "rows from before the slot are published");

    insert_event(&db, "order", "o-1", "After", r#"{"n": 3}"#).await;
    db.batch_execute("BEGIN").await.unwrap();
    emit(
        &db,
        true,
        r#"{"id":"11111111-1111-1111-1111-111111111111","aggregate_type":"order","aggregate_id":"o-1","event_type":"Tableless","payload":{"n": 4, "exact":   "bytes"},"headers":{"traceparent":"00-x-01"}}"#,
    )
    .await;
    db.batch_execute("COMMIT").await.unwrap();
    emit(
        &db,
        false,
        r#"{"id":"2","aggregate_type":"order","aggregate_id":"o-1","event_type":"X","payload":{}}"#,
    )
    .await;
    emit(&db, true, "{not json").await;
    insert_event(&db, "order", "o-1", "Last", r#"{"n": 5}"#).await;

    let all = env
        .consume(&["outbox.order"], if messages { 6 } else { 5 }, 20)
        .await;
    let dlq = env
        .consume(&["outbox.dlq"], 2, if messages { 20 } else { 2 })
        .await;
    relay.stop().await;

    let types: Vec<_> = all
        .iter()
        .map(|m| m.header("event_type").unwrap())
        .collect();
    if !messages {
        assert_eq!(types, ["Before0", "Before1", "Before2", "After", "Last"]);
        assert_eq!(dlq.len(), 0, "no message reaches the relay on 13");
        return;
    }
    assert_eq!(
        types,
        [
            "Before0",
            "Before1",
            "Before2",
            "After",
            "Tableless",
            "Last"
        ]
    );
    let tableless = &all[4];
    assert_eq!(
        tableless.value_str(),
        r#"{"n": 4, "exact":   "bytes"}"#,
        "payload bytes untouched"
    );
    assert_eq!(
        tableless.header("id"),
        Some("11111111-1111-1111-1111-111111111111")
    );
    assert_eq!(tableless.header("traceparent"), Some("00-x-01"));
    assert_eq!(tableless.key_str(), "o-1");
    assert_eq!(dlq.len(), 2);
    assert!(dlq
        .iter()
        .any(|m| m.header("error").unwrap().contains("non-transactional")));
    let bad = dlq
        .iter()
        .find(|m| {
            m.header("error")
                .unwrap()
                .contains("not a valid outbox envelope")
        })
        .unwrap();
    assert_eq!(
        bad.value_str(),
        "{not json",
        "the original bytes go to the dead-letter topic"
    );
    assert!(bad.header("source_position").unwrap().starts_with("lsn:"));
    assert_eq!(
        env.outbox_count().await,
        5,
        "log mode leaves rows in place without cleanup"
    );
}

/// After a graceful stop the final acknowledgement is in the slot: a restart sends
/// nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_restart_resumes_without_duplicates() {
    let env = Env::start().await;
    env.create_topics(&["outbox.order"], 1).await;
    let db = env.client().await;
    let config = logical_toml(&env, "");
    let relay = RunningRelay::start(load_toml(&config));
    insert_event(&db, "order", "o-1", "One", "{}").await;
    assert_eq!(env.consume(&["outbox.order"], 1, 20).await.len(), 1);
    relay.stop().await;

    insert_event(&db, "order", "o-1", "Two", "{}").await;
    let relay = RunningRelay::start(load_toml(&config));
    let got = env.consume(&["outbox.order"], 3, 4).await;
    relay.stop().await;
    let types: Vec<_> = got
        .iter()
        .map(|m| m.header("event_type").unwrap())
        .collect();
    assert_eq!(types, ["One", "Two"], "nothing replayed, nothing missed");
}

/// A stop right after a short first start: the snapshot's rows are all acknowledged,
/// so the slot is made before the relay exits and a restart sends none of them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_right_after_the_first_start_snapshot_repeats_nothing() {
    let env = Env::start().await;
    env.create_topics(&["outbox.order"], 1).await;
    let db = env.client().await;
    for i in 0..3 {
        insert_event(&db, "order", "o-1", &format!("Before{i}"), "{}").await;
    }
    let config = logical_toml(&env, "");
    let relay = RunningRelay::start(load_toml(&config));
    assert_eq!(env.consume(&["outbox.order"], 3, 20).await.len(), 3);
    // At once: the stop races the relay's own move from the snapshot to the stream.
    relay.stop().await;

    insert_event(&db, "order", "o-1", "After", "{}").await;
    let relay = RunningRelay::start(load_toml(&config));
    let got = env.consume(&["outbox.order"], 5, 4).await;
    relay.stop().await;
    let types: Vec<_> = got
        .iter()
        .map(|m| m.header("event_type").unwrap())
        .collect();
    assert_eq!(types, ["Before0", "Before1", "Before2", "After"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_deletes_delivered_rows() {
    let env = Env::start().await;
    env.create_topics(&["outbox.order"], 1).await;
    let db = env.client().await;
    let relay = RunningRelay::start(load_toml(&logical_toml(&env, "cleanup = true")));
    for i in 0..2500 {
        insert_event(&db, "order", &format!("o-{}", i % 7), "E", "{}").await;
    }
    assert_eq!(env.consume(&["outbox.order"], 2500, 60).await.len(), 2500);
    let mut left = env.outbox_count().await;
    for _ in 0..50 {
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = env.outbox_count().await;
    }
    relay.stop().await;
    assert_eq!(
        left, 0,
        "delivered rows are deleted in log mode with cleanup = true"
    );
}

/// Both modes produce the same Kafka message for the same event — key, value,
/// headers and partition byte for byte (only the timestamp may differ).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_modes_produce_byte_identical_messages() {
    let env = Env::start().await;
    env.create_topics(&["logical.order", "polling.order"], 4)
        .await;
    let db = env.client().await;
    let relay = RunningRelay::start(load_toml(
        &env.with_topic(&logical_toml(&env, ""), "logical.{aggregate_type}"),
    ));
    let payloads = [
        r#"{"b": 2, "a": 1}"#,
        r#"{"text": "grüße, 東京 \" \\ \n", "nested": {"list": [1, 2.50, null, true]}}"#,
        r#"[1, "two", {"three": 3}]"#,
        r#""just a string""#,
        "12345678901234567890.123",
    ];
    let headers = [
        r#"{}"#,
        r#"{"traceparent": "00-abc-01", "n": 7, "obj": {"x": [1]}, "id": "spoof"}"#,
    ];
    for (i, p) in payloads.iter().enumerate() {
        db.execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers) \
             VALUES ('order', $1, 'Changed', $2::text::jsonb, $3::text::jsonb)",
            &[&format!("agg-{}", i % 3), p, &headers[i % 2]],
        )
        .await
        .unwrap();
    }
    let logical = env.consume(&["logical.order"], payloads.len(), 20).await;
    relay.stop().await;

    let relay = RunningRelay::start(load_toml(&env.with_topic(
        &env.config_toml("polling", "", ""),
        "polling.{aggregate_type}",
    )));
    let polling = env.consume(&["polling.order"], payloads.len(), 20).await;
    relay.stop().await;

    assert_eq!(logical.len(), payloads.len());
    assert_eq!(polling.len(), payloads.len());
    for l in &logical {
        let p = polling
            .iter()
            .find(|p| p.header("id") == l.header("id"))
            .expect("the same event in both modes");
        assert_eq!(l.key, p.key);
        assert_eq!(l.value, p.value, "value of {:?}", l.header("id"));
        assert_eq!(l.headers, p.headers);
        assert_eq!(l.partition, p.partition);
    }
}

/// An idle outbox must not pin WAL while other tables are busy: keepalives move the
/// slot forward when nothing is in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_outbox_pins_no_wal_while_other_tables_write_50mb() {
    let env = Env::start().await;
    env.create_topics(&["outbox.order"], 1).await;
    let db = env.client().await;
    let relay = RunningRelay::start(load_toml(&logical_toml(&env, "")));
    insert_event(&db, "order", "o-1", "One", "{}").await;
    assert_eq!(env.consume(&["outbox.order"], 1, 20).await.len(), 1);

    let before: String = db
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    db.batch_execute(
        "CREATE TABLE busy (x text); \
         INSERT INTO busy SELECT repeat(md5(g::text), 32) FROM generate_series(1, 50000) g",
    )
    .await
    .unwrap();
    let written: i64 = db
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::int8",
            &[&before],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        written > 50_000_000,
        "the other table wrote {written} bytes of WAL"
    );
    let mut retained = written;
    for _ in 0..150 {
        retained = db
            // The relay's slot only: a first start's temporary slot may still exist.
            .query_one("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8 FROM pg_replication_slots WHERE slot_name = 'outbox_relay'", &[])
            .await
            .unwrap()
            .get(0);
        if retained < 1_000_000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    relay.stop().await;
    assert!(
        retained < 1_000_000,
        "the slot still retains {retained} bytes"
    );
}

/// The slot is the leader lock: a second relay waits, says why on /readyz, and takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_relay_waits_for_the_slot_and_takes_over() {
    let env = Env::start().await;
    env.create_topics(&["outbox.order"], 1).await;
    let db = env.client().await;
    let config = logical_toml(&env, "");
    let telemetry = outbox_relay::metrics::Telemetry::default();
    let leader = RunningRelay::start(load_toml(&config));
    insert_event(&db, "order", "o-1", "One", "{}").await;
    assert_eq!(env.consume(&["outbox.order"], 1, 20).await.len(), 1);

    let shutdown = tokio_util::sync::CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let standby = tokio::spawn(outbox_relay::daemon::run_with(
        load_toml(&config),
        listener,
        telemetry.clone(),
        shutdown.clone(),
    ));
    let reason = crate::support::standby_reason(&telemetry).await;
    assert!(
        reason.contains("standby: replication slot outbox_relay is in use"),
        "{reason}"
    );

    leader.stop().await;
    insert_event(&db, "order", "o-1", "Two", "{}").await;
    let got = env.consume(&["outbox.order"], 2, 30).await;
    shutdown.cancel();
    standby.await.unwrap().unwrap();
    let types: Vec<_> = got
        .iter()
        .map(|m| m.header("event_type").unwrap())
        .collect();
    assert_eq!(types, ["One", "Two"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_problems_are_named_with_their_fix() {
    let env = Env::start().await;
    let db = env.client().await;
    db.batch_execute(
        "CREATE ROLE plain LOGIN; GRANT SELECT ON outbox TO plain; \
         CREATE ROLE replicator LOGIN REPLICATION; GRANT SELECT ON outbox TO replicator; \
         GRANT SELECT, INSERT, UPDATE ON outbox_relay_schema, outbox_relay_slots TO plain, replicator; GRANT SELECT, INSERT, UPDATE, DELETE ON outbox_relay_dlq, outbox_relay_requests, outbox_relay_control TO plain, replicator",
    )
    .await
    .unwrap();
    let base = logical_toml(&env, "");

    let no_replication = base.replace("postgres://postgres@", "postgres://plain@");
    let e = run_error(load_toml(&no_replication)).await;
    assert!(
        e.contains("may not open a replication connection: ALTER ROLE plain REPLICATION"),
        "{e}"
    );

    db.batch_execute(
        "CREATE ROLE nostate LOGIN REPLICATION; GRANT SELECT ON outbox TO nostate; \
         GRANT INSERT ON outbox_relay_dead_letter TO nostate",
    )
    .await
    .unwrap();
    let no_state = base.replace("postgres://postgres@", "postgres://nostate@");
    let e = run_error(load_toml(&no_state)).await;
    assert!(
        e.contains("may not use the relay's own tables in schema public")
            && e.contains("GRANT SELECT, INSERT, UPDATE ON \"public\".outbox_relay_schema"),
        "{e}"
    );

    // Grants of a relay older than the dead-letter queue: named, with the GRANT.
    db.batch_execute(
        "CREATE ROLE oldgrants LOGIN REPLICATION; GRANT SELECT ON outbox TO oldgrants; \
         GRANT INSERT ON outbox_relay_dead_letter TO oldgrants; \
         GRANT SELECT, INSERT, UPDATE ON outbox_relay_schema, outbox_relay_slots TO oldgrants",
    )
    .await
    .unwrap();
    let old_grants = base
        .replace("postgres://postgres@", "postgres://oldgrants@")
        .replace("status_interval", "slot = \"oldgrants\"\nstatus_interval");
    let e = run_error(load_toml(&old_grants)).await;
    assert!(e.contains("DELETE ON \"public\".outbox_relay_dlq"), "{e}");

    let no_publication = base.replace(
        "status_interval",
        "publication = \"nope\"\ncreate_if_missing = false\nstatus_interval",
    );
    let e = run_error(load_toml(&no_publication)).await;
    assert!(e.contains("publication nope does not exist"), "{e}");

    let no_table = base.replace(
        "mode = \"logical\"",
        "mode = \"logical\"\ntable = \"public.missing\"",
    );
    let e = run_error(load_toml(&no_table)).await;
    assert!(e.contains("table public.missing does not exist"), "{e}");

    let no_slot = base.replace(
        "status_interval",
        "create_if_missing = false\nstatus_interval",
    );
    let e = run_error(load_toml(&no_slot)).await;
    assert!(
        e.contains("replication slot outbox_relay does not exist"),
        "{e}"
    );

    db.batch_execute("CREATE TABLE other (id int)")
        .await
        .unwrap();
    let wrong_publication = base.replace(
        "mode = \"logical\"",
        "mode = \"logical\"\ntable = \"public.other\"",
    );
    let e = run_error(load_toml(&wrong_publication)).await;
    assert!(e.contains("column"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_below_logical_is_named() {
    let pg = outbox_relay::testkit::postgres::Postgres::start_with(&["wal_level=replica"]).unwrap();
    let url = pg.url("postgres");
    let toml = format!(
        "[source]\nmode = \"logical\"\ndatabase_url = \"{url}\"\n[sink.kafka]\nbrokers = \"127.0.0.1:1\"\n[http]\nlisten = \"127.0.0.1:0\"\n"
    );
    let e = run_error(load_toml(&toml)).await;
    assert!(
        e.contains("wal_level is \"replica\": log mode needs wal_level = logical"),
        "{e}"
    );
}

/// md5 and SCRAM-SHA-256 on the replication connection, as pg_hba.conf demands them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_and_scram_authentication() {
    let env = Env::start().await;
    env.create_topics(&["outbox.order"], 1).await;
    let db = env.client().await;
    db.batch_execute(
        "SET password_encryption = 'md5'; CREATE ROLE md5_user LOGIN REPLICATION PASSWORD 'md5-pw'; \
         SET password_encryption = 'scram-sha-256'; CREATE ROLE scram_user LOGIN REPLICATION PASSWORD 'scram-pw'; \
         GRANT SELECT ON outbox TO md5_user, scram_user; \
         GRANT INSERT ON outbox_relay_dead_letter TO md5_user, scram_user; \
         GRANT SELECT, INSERT, UPDATE ON outbox_relay_schema, outbox_relay_slots TO md5_user, scram_user; GRANT SELECT, INSERT, UPDATE, DELETE ON outbox_relay_dlq, outbox_relay_requests, outbox_relay_control TO md5_user, scram_user;",
    )
    .await
    .unwrap();
    let hba = env.pg.data_dir().join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("host all md5_user 127.0.0.1/32 md5\nhost all scram_user 127.0.0.1/32 scram-sha-256\n{old}"),
    )
    .unwrap();
    db.execute("SELECT pg_reload_conf()", &[]).await.unwrap();

    for (n, (user, pw, event)) in [
        ("md5_user", "md5-pw", "ViaMd5"),
        ("scram_user", "scram-pw", "ViaScram"),
    ]
    .into_iter()
    .enumerate()
    {
        let config = logical_toml(&env, &format!("slot = \"{user}_slot\""))
            .replace("postgres://postgres@", &format!("postgres://{user}:{pw}@"));
        let relay = RunningRelay::start(load_toml(&config));
        // Wait for the slot: only events after it count (the snapshot is empty).
        for _ in 0..100 {
            let active: bool = db
                .query_opt(
                    "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                    &[&format!("{user}_slot")],
                )
                .await
                .unwrap()
                .is_some_and(|r| r.get(0));
            if active {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        insert_event(&db, "order", "o-1", event, "{}").await;
        // The second relay's new slot starts with a snapshot: it publishes the first
        // relay's event again (first start, docs/design.md §5), then its own.
        let got = env.consume(&["outbox.order"], [1, 3][n], 20).await;
        relay.stop().await;
        assert!(
            got.iter().any(|m| m.header("event_type") == Some(event)),
            "{user}: {got:?}"
        );
    }
    let wrong = logical_toml(&env, "slot = \"wrong_slot\"")
        .replace("postgres://postgres@", "postgres://scram_user:nope@");
    let e = run_error(load_toml(&wrong)).await;
    assert!(
        e.contains("password authentication failed") || e.contains("authentication"),
        "{e}"
    );
}

/// An existing Debezium-style table relays unchanged; only the column names are
/// configured.
/// Log mode on the Debezium-style table `outboxevent` (publication and slot `dbz`),
/// `extra_columns` added to `[source.columns]`.
fn debezium_toml(env: &Env, extra_columns: &str) -> String {
    let toml = logical_toml(env, "publication = \"dbz\"\nslot = \"dbz\"");
    env.with_topic(&toml, "outbox.event.{aggregate_type}")
        .replace(
            "mode = \"logical\"",
            "mode = \"logical\"\ntable = \"public.outboxevent\"",
        )
        .replace(
            "[source.logical]",
            &format!(
                "[source.columns]\n{extra_columns}aggregate_type = \"aggregatetype\"\n\
                 aggregate_id = \"aggregateid\"\nevent_type = \"type\"\nheaders = \"\"\n\
                 created_at = \"\"\n\n[source.logical]"
            ),
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debezium_style_columns_work_through_config() {
    let env = Env::start().await;
    env.create_topics(&["outbox.event.shipment"], 1).await;
    let db = env.client().await;
    db.batch_execute(
        "CREATE TABLE outboxevent (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), \
           aggregatetype varchar(255) NOT NULL, aggregateid varchar(255) NOT NULL, \
           type varchar(255) NOT NULL, payload jsonb, seq bigint GENERATED ALWAYS AS IDENTITY); \
         CREATE PUBLICATION dbz FOR TABLE outboxevent WITH (publish = 'insert')",
    )
    .await
    .unwrap();
    let toml = debezium_toml(&env, "");
    db.batch_execute(
        "INSERT INTO outboxevent (aggregatetype, aggregateid, type, payload) \
         VALUES ('shipment', 's-1', 'Created', '{\"a\": 1}')",
    )
    .await
    .unwrap();
    let relay = RunningRelay::start(load_toml(&toml));
    tokio::time::sleep(Duration::from_millis(500)).await;
    db.batch_execute(
        "INSERT INTO outboxevent (aggregatetype, aggregateid, type, payload) \
         VALUES ('shipment', 's-1', 'Shipped', '{\"b\": 2}')",
    )
    .await
    .unwrap();
    let got = env.consume(&["outbox.event.shipment"], 2, 20).await;
    relay.stop().await;
    let types: Vec<_> = got
        .iter()
        .map(|m| m.header("event_type").unwrap())
        .collect();
    assert_eq!(
        types,
        ["Created", "Shipped"],
        "snapshot row, then the streamed one"
    );
    assert_eq!(got[1].value_str(), r#"{"b": 2}"#);
    assert_eq!(got[1].key_str(), "s-1");
}

/// A Debezium-style table with no `seq` column at all (`source.columns.seq = ""`): the
/// first start publishes the rows already there in the table's order (`created_at`
/// when configured, else physical order), then streams in commit order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_without_seq_works_in_log_mode() {
    let env = Env::start().await;
    env.create_topics(&["outbox.event.shipment"], 1).await;
    let db = env.client().await;
    db.batch_execute(
        "CREATE TABLE outboxevent (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), \
           aggregatetype varchar(255) NOT NULL, aggregateid varchar(255) NOT NULL, \
           type varchar(255) NOT NULL, payload jsonb); \
         CREATE PUBLICATION dbz FOR TABLE outboxevent WITH (publish = 'insert'); \
         INSERT INTO outboxevent (aggregatetype, aggregateid, type, payload) VALUES \
           ('shipment', 's-1', 'First', '{}'), ('shipment', 's-1', 'Second', '{}'), \
           ('shipment', 's-1', 'Third', '{}')",
    )
    .await
    .unwrap();
    let toml = debezium_toml(&env, "seq = \"\"\n");
    let relay = RunningRelay::start(load_toml(&toml));
    assert_eq!(
        env.consume(&["outbox.event.shipment"], 3, 20).await.len(),
        3
    );
    db.batch_execute(
        "INSERT INTO outboxevent (aggregatetype, aggregateid, type, payload) \
         VALUES ('shipment', 's-1', 'Streamed', '{}')",
    )
    .await
    .unwrap();
    let got = env.consume(&["outbox.event.shipment"], 4, 20).await;
    relay.stop().await;
    let types: Vec<_> = got
        .iter()
        .map(|m| m.header("event_type").unwrap())
        .collect();
    assert_eq!(types, ["First", "Second", "Third", "Streamed"]);

    let polling = toml.replace("mode = \"logical\"", "mode = \"polling\"");
    let e = crate::support::try_load_toml(&polling, Default::default())
        .err()
        .expect("polling needs a seq")
        .to_string();
    assert!(e.contains("source.columns.seq"), "{e}");
}

/// A table-less outbox needs pgoutput's `messages` (PostgreSQL 14+): on 13 the relay
/// refuses it, naming the version and the fix; from 14 on a message is relayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_less_outbox_runs_from_14_and_is_refused_clearly_before() {
    let env = Env::start().await;
    env.create_topics(&["outbox.order"], 1).await;
    // A publication of its own: the shipped SQL's `outbox_relay` carries the table.
    let toml = logical_toml(&env, "publication = \"messages_only\"")
        .replace("mode = \"logical\"", "mode = \"logical\"\ntable = \"\"");
    if env.pg_major().await < 14 {
        let e = run_error(load_toml(&toml)).await;
        assert!(e.contains("needs PostgreSQL 14 or later"), "{e}");
        assert!(e.contains("use an outbox table"), "{e}");
        return;
    }
    let relay = RunningRelay::start(load_toml(&toml));
    let db = env.client().await;
    // The slot exists once the relay streams: a message before that would not be decoded.
    for _ in 0..200 {
        let active = db
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE active AND slot_name = 'outbox_relay'",
                &[],
            )
            .await
            .unwrap();
        if active.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    db.batch_execute("BEGIN").await.unwrap();
    emit(
        &db,
        true,
        r#"{"id":"22222222-2222-2222-2222-222222222222","aggregate_type":"order","aggregate_id":"o-9","event_type":"NoTable","payload":{"n": 1}}"#,
    )
    .await;
    db.batch_execute("COMMIT").await.unwrap();
    let got = env.consume(&["outbox.order"], 1, 20).await;
    relay.stop().await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].header("event_type"), Some("NoTable"));
    assert_eq!(got[0].key_str(), "o-9");
}
