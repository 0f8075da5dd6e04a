//! Polling's batch read two ways, for the next step of the relay's own CPU per event: the
//! extended protocol as the relay reads today (tokio-postgres rows, `rows_to_events`)
//! against `COPY (…) TO STDOUT (FORMAT binary)`, whose rows arrive as slices of the
//! connection's buffer with no per-row allocation. Reads a 200,000-row outbox in batches
//! of 1,000 and prints the time and the server backend's CPU.
//!
//! ```sh
//! cargo run --release --example polling_read -- query   # or copy; a row count may follow
//! valgrind --tool=callgrind target/release/examples/polling_read copy 20000   # instructions
//! ```
//!
//! A prototype, not the relay's read: no byte budget, no visibility fence, no narrowing
//! past a bad row. Measured 2026-12-06 in BENCHMARKS.md ("A prototype: COPY").

use bytes::{Buf, Bytes};
use bytestring::ByteString;
use futures::TryStreamExt;
use outbox_relay::event::{OutboxEvent, Position};
use outbox_relay::testkit::postgres::Postgres;

const BATCH: i64 = 1_000;
const LIST: &str = "seq::int8, id::text, aggregate_type::text, aggregate_id::text, \
    event_type::text, payload::text, headers::text, \
    CASE WHEN isfinite(created_at) AND created_at >= 'epoch' \
    THEN (extract(epoch FROM created_at) * 1000)::int8 END, NULL::text";

fn copy_events(chunks: Vec<Bytes>) -> Vec<OutboxEvent> {
    let mut events = Vec::new();
    for mut chunk in chunks {
        // The 19-byte header (signature, flags, extension length) comes with the first.
        if chunk.starts_with(b"PGCOPY\n\xff\r\n\0") {
            chunk.advance(19);
        }
        while chunk.len() >= 2 {
            let n = chunk.get_i16();
            if n == -1 {
                break;
            }
            let mut fields: [Option<Bytes>; 9] = Default::default();
            for f in fields.iter_mut().take(n as usize) {
                let len = chunk.get_i32();
                if len >= 0 {
                    *f = Some(chunk.split_to(len as usize));
                }
            }
            let text = |b: Option<Bytes>| b.and_then(|b| ByteString::try_from(b).ok());
            let [seq, id, at, ai, et, payload, headers, created, topic] = fields;
            let seq = seq.map(|mut b| b.get_i64()).unwrap_or(i64::MAX);
            events.push(OutboxEvent {
                id: text(id),
                aggregate_type: text(at),
                aggregate_id: text(ai),
                event_type: text(et),
                payload,
                payload_is_json: true,
                headers: text(headers),
                topic: text(topic),
                timestamp_ms: created.map(|mut b| b.get_i64()),
                ..OutboxEvent::blank(Position::Seq(seq))
            });
        }
    }
    events
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let how = std::env::args().nth(1).unwrap_or_else(|| "query".into());
    let rows: i64 = std::env::args()
        .nth(2)
        .map_or(200_000, |n| n.parse().expect("a row count"));
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
    ))
    .await
    .unwrap();
    db.batch_execute("VACUUM ANALYZE outbox").await.unwrap();
    let query = db
        .prepare(&format!(
            "SELECT {LIST} FROM outbox WHERE seq > $1 ORDER BY seq LIMIT $2"
        ))
        .await
        .unwrap();
    let backend: i32 = db
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let server_cpu = || {
        outbox_relay::testkit::cpu::stat_cpu(
            &std::fs::read_to_string(format!("/proc/{backend}/stat")).unwrap(),
        )
    };
    let before = server_cpu();
    let started = std::time::Instant::now();
    let (mut from, mut total, mut bytes) = (0i64, 0usize, 0usize);
    loop {
        let events = if how == "copy" {
            let copy = format!(
                "COPY (SELECT {LIST} FROM outbox WHERE seq > {from} ORDER BY seq LIMIT {BATCH}) \
                 TO STDOUT (FORMAT binary)"
            );
            let chunks: Vec<Bytes> = db
                .copy_out(&copy)
                .await
                .unwrap()
                .try_collect()
                .await
                .unwrap();
            copy_events(chunks)
        } else {
            let rows = db.query(&query, &[&from, &BATCH]).await.unwrap();
            outbox_relay::source::table::rows_to_events(&rows, true)
        };
        let Some(last) = events.last() else { break };
        let Position::Seq(seq) = last.position else {
            unreachable!()
        };
        from = seq;
        total += events.len();
        bytes += events
            .iter()
            .map(|e| {
                e.payload.as_ref().map_or(0, |p| p.len()) + e.id.as_ref().map_or(0, |s| s.len())
            })
            .sum::<usize>();
    }
    println!(
        "{how}: {total} events, {bytes} bytes, {:?}, server CPU {:.2} s",
        started.elapsed(),
        server_cpu() - before
    );
}
