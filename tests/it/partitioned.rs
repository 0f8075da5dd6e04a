//! A partitioned outbox (old partitions dropped instead of rows deleted), in both modes;
//! and publications that would make the relay see rows it cannot map.

use std::time::Duration;

use crate::logical::logical_toml;
use crate::support::{insert_event, load_toml, run_error, Env, RunningRelay};

/// Replaces the shipped outbox with one partitioned by `created_at` (a yearly partition
/// and a default one), `seq` from a sequence: identity columns on partitioned tables
/// arrive only in PostgreSQL 17.
async fn partition_the_outbox(db: &tokio_postgres::Client) {
    db.batch_execute(
        "DROP PUBLICATION outbox_relay; DROP TABLE outbox; \
         CREATE SEQUENCE outbox_seq; \
         CREATE TABLE outbox ( \
           id uuid NOT NULL DEFAULT gen_random_uuid(), \
           seq bigint NOT NULL DEFAULT nextval('outbox_seq'), \
           aggregate_type text NOT NULL, aggregate_id text NOT NULL, event_type text NOT NULL, \
           payload jsonb NOT NULL, headers jsonb NOT NULL DEFAULT '{}', \
           created_at timestamptz NOT NULL DEFAULT now(), \
           PRIMARY KEY (id, created_at)) PARTITION BY RANGE (created_at); \
         CREATE TABLE outbox_old PARTITION OF outbox FOR VALUES FROM ('2000-01-01') TO ('2001-01-01'); \
         CREATE TABLE outbox_rest PARTITION OF outbox DEFAULT",
    )
    .await
    .unwrap();
}

/// Writes one row into each partition, `label` in the event type.
async fn write_both_partitions(db: &tokio_postgres::Client, label: &str) {
    db.execute(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, created_at) \
         VALUES ('order', 'o-1', $1, '{}', '2000-06-01')",
        &[&format!("{label}Old")],
    )
    .await
    .unwrap();
    insert_event(db, "order", "o-1", &format!("{label}New"), "{}").await;
}

fn types(messages: &[outbox_relay::testkit::kafka::Consumed]) -> Vec<&str> {
    messages
        .iter()
        .map(|m| m.header("event_type").unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_mode_relays_every_partition_through_the_root() {
    let env = Env::start().await;
    env.create_topics(&["outbox.order"], 1).await;
    let db = env.client().await;
    partition_the_outbox(&db).await;
    write_both_partitions(&db, "Before").await;

    let relay = RunningRelay::start(load_toml(&logical_toml(&env, "")));
    let early = env.consume(&["outbox.order"], 2, 20).await;
    assert_eq!(
        types(&early),
        ["BeforeOld", "BeforeNew"],
        "first-start snapshot"
    );
    write_both_partitions(&db, "After").await;
    let all = env.consume(&["outbox.order"], 4, 20).await;
    relay.stop().await;
    assert_eq!(
        types(&all),
        ["BeforeOld", "BeforeNew", "AfterOld", "AfterNew"],
        "streamed rows of both partitions arrive, in commit order"
    );
    let via_root: bool = db
        .query_one(
            "SELECT pubviaroot FROM pg_publication WHERE pubname = 'outbox_relay'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(via_root, "the relay created the publication via the root");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_relays_every_partition_in_seq_order() {
    let env = Env::start().await;
    env.create_topics(&["outbox.order"], 1).await;
    let db = env.client().await;
    partition_the_outbox(&db).await;
    write_both_partitions(&db, "One").await;
    write_both_partitions(&db, "Two").await;
    let relay = RunningRelay::start(env.config(""));
    let got = env.consume(&["outbox.order"], 4, 20).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay.stop().await;
    assert_eq!(types(&got), ["OneOld", "OneNew", "TwoOld", "TwoNew"]);
    assert_eq!(
        env.outbox_count().await,
        0,
        "rows deleted from every partition"
    );
}

/// Each publication that would send rows the relay cannot map is refused at start,
/// with the statement that fixes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publications_that_would_carry_unmapped_rows_are_refused() {
    let env = Env::start().await;
    let db = env.client().await;
    let with_publication = |name: &str| {
        load_toml(&logical_toml(
            &env,
            &format!("publication = \"{name}\"\ncreate_if_missing = false"),
        ))
    };
    db.batch_execute(
        "CREATE TABLE other (id int); \
         CREATE PUBLICATION everything FOR ALL TABLES; \
         CREATE PUBLICATION two FOR TABLE outbox, other WITH (publish = 'insert'); \
         CREATE PUBLICATION deletes FOR TABLE outbox WITH (publish = 'delete')",
    )
    .await
    .unwrap();
    let e = run_error(with_publication("everything")).await;
    assert!(
        e.contains("publication everything is FOR ALL TABLES"),
        "{e}"
    );
    assert!(e.contains("CREATE PUBLICATION"), "{e}");
    let e = run_error(with_publication("two")).await;
    assert!(e.contains("also publishes public.other"), "{e}");
    assert!(e.contains("DROP TABLE public.other"), "{e}");
    let e = run_error(with_publication("deletes")).await;
    assert!(e.contains("SET (publish = 'insert')"), "{e}");

    partition_the_outbox(&db).await;
    db.batch_execute("CREATE PUBLICATION leaves FOR TABLE outbox WITH (publish = 'insert')")
        .await
        .unwrap();
    let e = run_error(with_publication("leaves")).await;
    assert!(e.contains("SET (publish_via_partition_root = true)"), "{e}");
}
