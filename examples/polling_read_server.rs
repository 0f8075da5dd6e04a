//! The server's side of polling's batch read: the backend's CPU per row for reading a
//! 200,000-row outbox in batches of 1,000, three ways, four rounds:
//!
//! - `old query`: the prepared SELECT the relay ran before its COPY read (the batch's two
//!   bookkeeping columns sent too), rows in binary;
//! - `named query`: the same prepared, only the event's columns sent;
//! - `copy`: the relay's read, `COPY (…) TO STDOUT (FORMAT binary)`, bounds as literals,
//!   so planned anew for every batch.
//!
//! ```sh
//! cargo run --release --example polling_read_server
//! ```
//!
//! The SQL is written out here for the default outbox table; it must follow
//! `BatchSelect::sql` in src/source/polling/mod.rs. Measured 2026-12-06 in BENCHMARKS.md
//! ("Polling reads with a binary COPY").
use futures::TryStreamExt;
use outbox_relay::testkit::postgres::Postgres;

const LIST: &str = "seq::int8, id::text, aggregate_type::text, aggregate_id::text, \
    event_type::text, payload::text, headers::text, \
    CASE WHEN isfinite(created_at) AND created_at >= 'epoch' \
    THEN (extract(epoch FROM created_at) * 1000)::int8 END, NULL::text";

fn inner(from: &str, fence: &str, lim: &str) -> String {
    format!(
        "(SELECT {LIST}, outbox_relay_size, \
       sum(outbox_relay_size) OVER (ORDER BY seq) AS outbox_relay_running \
       FROM (SELECT *, COALESCE(octet_length(payload::text), 0) AS outbox_relay_size FROM outbox \
             WHERE seq > {from} ORDER BY seq LIMIT {lim}) outbox_rows \
       WHERE seq <= {fence})"
    )
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let rows: i64 = 200_000;
    let pg = Postgres::start().unwrap();
    let db = pg.connect("postgres").await.unwrap();
    db.batch_execute(&format!(
        "CREATE TABLE outbox (seq bigserial PRIMARY KEY, id uuid NOT NULL DEFAULT gen_random_uuid(), \
         aggregate_type text NOT NULL, aggregate_id text NOT NULL, event_type text NOT NULL, \
         payload jsonb NOT NULL, headers jsonb, created_at timestamptz NOT NULL DEFAULT now()); \
         INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers) \
         SELECT 'order', 'order-' || (g % 100), 'OrderPlaced', \
           jsonb_build_object('n', g, 'customer', 'c-' || g, 'total', g * 3), \
           CASE WHEN g % 2 = 0 THEN '{{\"traceparent\": \"00-ab-cd-01\"}}'::jsonb END \
         FROM generate_series(1, {rows}) g"
    )).await.unwrap();
    db.batch_execute("VACUUM ANALYZE outbox").await.unwrap();
    let cols = "c1, c2, c3, c4, c5, c6, c7, c8, c9";
    let old = db.prepare(&format!("SELECT * FROM {} batch WHERE outbox_relay_running - outbox_relay_size < $4::int8 ORDER BY 1",
        inner("$1::int8", "$2::int8", "$3"))).await.unwrap();
    let named = db.prepare(&format!("SELECT {cols} FROM {} batch({cols}, outbox_relay_size, outbox_relay_running) WHERE outbox_relay_running - outbox_relay_size < $4::int8 ORDER BY 1",
        inner("$1::int8", "$2::int8", "$3"))).await.unwrap();
    let backend: i32 = db
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let cpu = || {
        outbox_relay::testkit::cpu::stat_cpu(
            &std::fs::read_to_string(format!("/proc/{backend}/stat")).unwrap(),
        )
    };
    let fence = 1_000_000_000i64;
    let lim = 1000i64;
    let budget = 4_194_304i64;
    for round in 0..4 {
        for how in ["old query", "named query", "copy"] {
            let before = cpu();
            let t = std::time::Instant::now();
            let mut from = 0i64;
            let mut n = 0;
            loop {
                let got: usize = match how {
                    "old query" | "named query" => {
                        let st = if how == "old query" { &old } else { &named };
                        let r = db.query(st, &[&from, &fence, &lim, &budget]).await.unwrap();
                        r.len()
                    }
                    _ => {
                        let sql = format!("COPY (SELECT {cols} FROM {} batch({cols}, outbox_relay_size, outbox_relay_running) WHERE outbox_relay_running - outbox_relay_size < {budget}::int8 ORDER BY 1) TO STDOUT (FORMAT binary)",
                            inner(&format!("{from}::int8"), &format!("{fence}::int8"), &lim.to_string()));
                        let c: Vec<bytes::Bytes> = db
                            .copy_out(&sql)
                            .await
                            .unwrap()
                            .try_collect()
                            .await
                            .unwrap();
                        c.len().saturating_sub(1)
                    }
                };
                if got == 0 {
                    break;
                }
                n += got;
                from += got as i64;
            }
            println!(
                "round {round} {how:12}: {n} rows {:?} server CPU {:.3} s = {:.2} µs/row",
                t.elapsed(),
                cpu() - before,
                (cpu() - before) * 1e6 / n as f64
            );
        }
    }
}
