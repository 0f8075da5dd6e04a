//! Log mode over several slots (`source.logical.shards`): each aggregate in one shard, in
//! order; each shard acknowledged on its own; one leader for all shards.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::logical::logical_toml;
use crate::support::{
    cli, insert_event, insert_events, load_toml, run_error, standby_reason, start_with_telemetry,
    Env, RunningRelay,
};

const SHARDED: &str = "shards = 2\nmessage_prefix = \"\"";

/// `n` events of `aggregates` aggregates, their payloads numbered per aggregate from
/// `from[aggregate]` on.
fn events(n: usize, aggregates: usize, from: &mut HashMap<String, u64>) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            let agg = format!("agg-{}", i % aggregates);
            let next = from.entry(agg.clone()).or_insert(0);
            *next += 1;
            (agg, format!("{{\"n\": {}}}", *next))
        })
        .collect()
}

/// Each key's `n` in the order consumed: must be 1, 2, 3… with no gap and no repeat.
fn assert_in_order_once(
    got: &[outbox_relay::testkit::kafka::Consumed],
    expected: &HashMap<String, u64>,
) {
    let mut seen: HashMap<String, Vec<u64>> = HashMap::new();
    for m in got {
        let v: serde_json::Value = serde_json::from_slice(&m.value).unwrap();
        seen.entry(m.key_str().to_owned())
            .or_default()
            .push(v["n"].as_u64().unwrap());
    }
    for (agg, last) in expected {
        let want: Vec<u64> = (1..=*last).collect();
        assert_eq!(
            seen.get(agg),
            Some(&want),
            "events of {agg} in order, each once"
        );
    }
    assert_eq!(seen.len(), expected.len(), "no other keys");
}

/// Each shard's slot, its publication's row filter, and how many of the outbox's
/// aggregates hash to it (computed here, independently of the relay).
async fn shard_rows(db: &tokio_postgres::Client) -> Vec<(String, String, i64)> {
    db.query(
        "SELECT s.slot_name::text, t.rowfilter, \
           (SELECT count(DISTINCT aggregate_id) FROM outbox o \
            WHERE (COALESCE(hashtext(o.aggregate_id), 0) & 2147483647) % 2 \
                  = substring(s.slot_name::text FROM 'relay_([0-9]+)_of')::int) \
         FROM pg_replication_slots s \
         JOIN pg_publication_tables t ON t.pubname = s.slot_name::text \
         WHERE s.slot_name LIKE 'outbox_relay%' ORDER BY 1",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

/// The whole path with two shards: rows from before the first start (snapshotted through
/// each shard's filter), a stream of many aggregates, a graceful stop and a restart that
/// repeats nothing — and the refusals that keep a sharded outbox whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_shards_carry_every_aggregate_once_in_order_and_restart_where_they_stood() {
    let env = Env::start().await;
    let db = env.client().await;
    let config = logical_toml(&env, SHARDED);
    if env.pg_major().await < 15 {
        let error = run_error(load_toml(&config)).await;
        assert!(
            error.contains("source.logical.shards = 2 needs PostgreSQL 15"),
            "{error}"
        );
        return;
    }
    env.create_topics(&["outbox.order"], 3).await;
    let mut sent = HashMap::new();
    insert_events(&db, &events(300, 40, &mut sent)).await;

    let relay = RunningRelay::start(load_toml(&config));
    assert_eq!(env.consume(&["outbox.order"], 300, 30).await.len(), 300);
    for _ in 0..10 {
        // Many transactions, each spanning both shards.
        insert_events(&db, &events(200, 40, &mut sent)).await;
    }
    let got = env.consume(&["outbox.order"], 2300, 60).await;
    assert_eq!(got.len(), 2300);
    assert_in_order_once(&got, &sent);

    // Each shard is a slot of its own, filtered to its half of the aggregates.
    let shards = shard_rows(&db).await;
    assert_eq!(shards.len(), 2, "{shards:?}");
    let names: Vec<&str> = shards.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(names, ["outbox_relay_0_of_2", "outbox_relay_1_of_2"]);
    for (slot, filter, aggregates) in &shards {
        assert!(
            filter.contains("hashtext(aggregate_id)"),
            "{slot}: {filter}"
        );
        assert!(
            *aggregates > 5,
            "{slot} carries {aggregates} of 40 aggregates"
        );
    }
    assert_eq!(
        shards[0].2 + shards[1].2,
        40,
        "every aggregate in exactly one shard"
    );
    relay.stop().await;

    // Acknowledged per shard: a restart sends only what is new.
    insert_events(&db, &events(100, 40, &mut sent)).await;
    let relay = RunningRelay::start(load_toml(&config));
    let again = env.consume(&["outbox.order"], 2401, 8).await;
    relay.stop().await;
    assert_eq!(again.len(), 2400, "nothing repeated after a graceful stop");
    assert_in_order_once(&again, &sent);

    // The same outbox configured with another shard count is refused, naming the slots.
    let one = logical_toml(&env, "");
    let error = run_error(load_toml(&one)).await;
    assert!(
        error.contains("outbox_relay_0_of_2, outbox_relay_1_of_2 of another shard count"),
        "{error}"
    );
    let error = run_error(load_toml(&logical_toml(
        &env,
        "shards = 3\nmessage_prefix = \"\"",
    )))
    .await;
    assert!(error.contains("source.logical.shards = 3"), "{error}");
    assert!(error.contains("changing the number of shards"), "{error}");
    // `check` says the same, and passes the configuration the slots were made for.
    let check = |toml: &str| {
        let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        std::io::Write::write_all(&mut f, toml.as_bytes()).unwrap();
        let (code, text) = cli(&["check", "--config", f.path().to_str().unwrap()]);
        (Some(code), text)
    };
    let (code, text) = check(&one);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("of another shard count"), "{text}");
    // A shard publication of another count: the relay would start, `check` fails.
    db.batch_execute(
        "CREATE PUBLICATION outbox_relay_0_of_3 FOR TABLE outbox WITH (publish = 'insert')",
    )
    .await
    .unwrap();
    let (code, text) = check(&config);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("publication(s) outbox_relay_0_of_3 belong to another source.logical.shards count than 2"),
        "{text}"
    );
    db.batch_execute("DROP PUBLICATION outbox_relay_0_of_3")
        .await
        .unwrap();
    let (code, text) = check(&config);
    assert!(
        text.contains("publication outbox_relay_0_of_2 carries it")
            && text.contains("publication outbox_relay_1_of_2 carries it"),
        "{text}"
    );
    assert_eq!(code, Some(0), "{text}");
    let slots: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'outbox_relay%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 2, "a refused start makes no slot");
}

/// A publication named for a shard but without its filter would send that shard every
/// aggregate: refused with the statement that fixes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_publication_without_its_row_filter_is_refused() {
    let env = Env::start().await;
    if env.pg_major().await < 15 {
        return;
    }
    let db = env.client().await;
    db.batch_execute(
        "CREATE PUBLICATION outbox_relay_1_of_2 FOR TABLE outbox \
         WHERE ((COALESCE(hashtext(aggregate_id), 0) & 2147483647) % 4 = 1) \
         WITH (publish = 'insert')",
    )
    .await
    .unwrap();
    let error = run_error(load_toml(&logical_toml(&env, SHARDED))).await;
    assert!(
        error.contains("publication outbox_relay_1_of_2 is shard 1 of 2 but its row filter"),
        "{error}"
    );
    assert!(
        error.contains("% 2 = 1"),
        "names the filter it expects: {error}"
    );
    db.batch_execute("ALTER PUBLICATION outbox_relay_1_of_2 SET TABLE outbox")
        .await
        .unwrap();
    let error = run_error(load_toml(&logical_toml(&env, SHARDED))).await;
    assert!(
        error.contains("its row filter on public.outbox is none"),
        "{error}"
    );
}

/// Leading is all or nothing: while another connection holds shard 1's slot, a relay
/// that took shard 0's lets go of it and waits; once shard 1 is free it leads both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_leads_every_shard_or_none() {
    let env = Env::start().await;
    if env.pg_major().await < 15 {
        return;
    }
    env.create_topics(&["outbox.order"], 1).await;
    let db = env.client().await;
    let config =
        logical_toml(&env, SHARDED).replace("standby_retry = \"100ms\"", "standby_retry = \"3s\"");
    let relay = RunningRelay::start(load_toml(&config));
    insert_event(&db, "order", "o-1", "One", "{}").await;
    assert_eq!(env.consume(&["outbox.order"], 1, 30).await.len(), 1);
    relay.stop().await;

    // Another holder of shard 1's slot (a relay that is still letting go, say).
    let bin = outbox_relay::testkit::postgres::bin_dir().unwrap();
    let mut holder = std::process::Command::new(bin.join("pg_recvlogical"))
        .args([
            "-d",
            &env.db_url,
            "-S",
            "outbox_relay_1_of_2",
            "--start",
            "-f",
            "/dev/null",
        ])
        .args([
            "-o",
            "proto_version=1",
            "-o",
            "publication_names=outbox_relay_1_of_2",
        ])
        .spawn()
        .unwrap();
    let active = |slot: &'static str| {
        let db = &db;
        async move {
            db.query_one(
                "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()
            .get::<_, bool>(0)
        }
    };
    for _ in 0..100 {
        if active("outbox_relay_1_of_2").await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        active("outbox_relay_1_of_2").await,
        "the holder streams shard 1"
    );

    let (relay, telemetry) = start_with_telemetry(&config);
    let reason = standby_reason(&telemetry).await;
    assert!(
        reason.contains("standby: replication slot outbox_relay_1_of_2 is in use"),
        "{reason}"
    );
    // Within its 3 s pause, the standby holds no shard.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(!active("outbox_relay_0_of_2").await, "shard 0 was let go");
    assert_eq!(telemetry.metrics.leader.get(), 0);

    // Killed before anything is written: it would have acknowledged shard 1's events.
    holder.kill().unwrap();
    holder.wait().unwrap();
    insert_event(&db, "order", "o-2", "Two", "{}").await;
    insert_event(&db, "order", "o-1", "Three", "{}").await;
    let got = env.consume(&["outbox.order"], 3, 30).await;
    let types: HashSet<&str> = got
        .iter()
        .map(|m| m.header("event_type").unwrap())
        .collect();
    assert_eq!(types, HashSet::from(["One", "Two", "Three"]));
    assert_eq!(telemetry.metrics.leader.get(), 1);
    assert!(active("outbox_relay_0_of_2").await && active("outbox_relay_1_of_2").await);
    relay.stop().await;
}

/// Per key, the first occurrences run 1, 2, 3…: duplicates allowed, nothing lost or
/// reordered.
fn assert_in_order_at_least_once(
    got: &[outbox_relay::testkit::kafka::Consumed],
    expected: &HashMap<String, u64>,
) {
    let mut next: HashMap<String, u64> = HashMap::new();
    let mut ids = HashSet::new();
    for m in got {
        if !ids.insert(m.header("id").unwrap().to_owned()) {
            continue;
        }
        let v: serde_json::Value = serde_json::from_slice(&m.value).unwrap();
        let n = v["n"].as_u64().unwrap();
        let want = next.entry(m.key_str().to_owned()).or_insert(1);
        assert_eq!(n, *want, "{}: first occurrences in order", m.key_str());
        *want += 1;
    }
    for (agg, last) in expected {
        assert_eq!(next.get(agg), Some(&(last + 1)), "every event of {agg}");
    }
}

/// With `REPLICA IDENTITY FULL` the shards' publications carry updates and deletes too
/// (the application's UPDATEs are not refused), cleanup deletes every shard's delivered
/// rows, and a shard whose slot is lost is recreated alone (`on_slot_lost = "recreate"`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_row_changes_and_a_lost_shard_slot_with_shards() {
    let env = Env::start().await;
    if env.pg_major().await < 15 {
        return;
    }
    env.create_topics(&["outbox.order"], 2).await;
    let db = env.client().await;
    db.batch_execute("ALTER TABLE outbox REPLICA IDENTITY FULL")
        .await
        .unwrap();
    let config = logical_toml(
        &env,
        &format!("{SHARDED}\ncleanup = true\non_slot_lost = \"recreate\""),
    );
    let (relay, telemetry) = start_with_telemetry(&config);
    let mut sent = HashMap::new();
    insert_events(&db, &events(400, 20, &mut sent)).await;
    let got = env.consume(&["outbox.order"], 400, 30).await;
    assert_in_order_once(&got, &sent);
    env.wait_outbox_empty(Duration::from_secs(10)).await;
    assert_eq!(
        env.outbox_count().await,
        0,
        "each shard deletes its delivered rows"
    );
    let carried: Vec<(bool, bool)> = db
        .query(
            "SELECT pubupdate, pubdelete FROM pg_publication WHERE pubname LIKE 'outbox_relay_%' \
             ORDER BY pubname",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(carried, [(true, true), (true, true)]);
    // An application's UPDATE of outbox rows is not refused by the row filters.
    db.batch_execute("UPDATE outbox SET event_type = event_type")
        .await
        .unwrap();

    // Shard 1's slot dropped under the relay: recreated, its rows still in the outbox
    // published again; shard 0 goes on from where it stood.
    crate::slot_lost::drop_under_the_relay(&db, "outbox_relay_1_of_2").await;
    insert_events(&db, &events(200, 20, &mut sent)).await;
    // Duplicates count in what is consumed: ask for more until 600 distinct arrived.
    let mut want = 600;
    let mut got = Vec::new();
    for _ in 0..5 {
        got = env.consume(&["outbox.order"], want, 20).await;
        let distinct: HashSet<&str> = got.iter().map(|m| m.header("id").unwrap()).collect();
        if distinct.len() >= 600 {
            break;
        }
        want = got.len() + 600 - distinct.len();
    }
    assert_in_order_at_least_once(&got, &sent);
    assert_eq!(
        telemetry.metrics.slots_recreated.get(),
        1,
        "one shard's slot"
    );
    relay.stop().await;
}

/// The aggregate ids a shard can hash, as a class: for each type the docs name, the row
/// filter is one the server takes for a publication and it puts every row in exactly one
/// shard; any other type is refused by name, by the relay and by `check`, before a
/// publication is made for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_aggregate_id_types_a_shard_can_hash() {
    use outbox_relay::source::logical::{shard_configs, shard_filter};
    let env = Env::start().await;
    if env.pg_major().await < 15 {
        return;
    }
    let db = env.client().await;
    let toml = logical_toml(&env, SHARDED);
    let shards = shard_configs(&load_toml(&toml).source);
    let retype = |ty: &str| {
        format!(
        "TRUNCATE outbox; ALTER TABLE outbox ALTER COLUMN aggregate_id TYPE {ty} USING aggregate_id::text::{ty}"
    )
    };
    for (ty, value) in [
        ("text", "'order-' || g"),
        ("varchar(64)", "'order-' || g"),
        ("char(40)", "'order-' || g"),
        ("uuid", "md5(g::text)::uuid"),
        ("bigint", "g::bigint * 1000000007"),
        ("integer", "g"),
        ("smallint", "g"),
    ] {
        db.batch_execute(&retype(ty)).await.unwrap();
        db.batch_execute(&format!(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
             SELECT 'order', {value}, 'Tick', '{{}}' FROM generate_series(1, 200) g"
        ))
        .await
        .unwrap();
        let mut counts = Vec::new();
        for shard in &shards {
            let filter = shard_filter(&db, shard).await.unwrap().expect("sharded");
            db.batch_execute(&format!(
                "CREATE PUBLICATION type_check FOR TABLE outbox WHERE ({filter}); \
                 DROP PUBLICATION type_check"
            ))
            .await
            .unwrap_or_else(|e| panic!("{ty}: the server refuses the row filter {filter}: {e}"));
            let n: i64 = db
                .query_one(&format!("SELECT count(*) FROM outbox WHERE {filter}"), &[])
                .await
                .unwrap()
                .get(0);
            counts.push(n);
        }
        assert_eq!(
            counts.iter().sum::<i64>(),
            200,
            "{ty}: every row in one shard: {counts:?}"
        );
        assert!(
            counts.iter().all(|&n| n > 0),
            "{ty}: both shards get rows: {counts:?}"
        );
    }
    for (ty, shown) in [
        ("numeric", "numeric"),
        ("bytea", "bytea"),
        ("timestamptz", "timestamp with time zone"),
    ] {
        db.batch_execute(&retype(ty)).await.unwrap();
        let error = shard_filter(&db, &shards[1]).await.unwrap_err().to_string();
        assert!(
            error.contains(&format!(
                "public.outbox.aggregate_id, whose type ({shown}) has no hash function"
            )),
            "{ty}: {error}"
        );
        assert!(
            error.contains("or shards = 1"),
            "{ty}: names the fix: {error}"
        );
    }
    // The relay and `check` say so before any publication is made.
    db.batch_execute(&retype("numeric")).await.unwrap();
    let error = run_error(load_toml(&toml)).await;
    assert!(error.contains("(numeric) has no hash function"), "{error}");
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::io::Write::write_all(&mut f, toml.as_bytes()).unwrap();
    let (code, text) = cli(&["check", "--config", f.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("(numeric) has no hash function"), "{text}");
    let made: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_publication WHERE pubname LIKE 'outbox_relay_%_of_2'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        made, 0,
        "no shard publication made for an id it cannot hash"
    );
}
