//! A regression guard on the relay's work per event, counted rather than timed: heap
//! allocations and bytes allocated on the hot path of both capture modes, for a fixed
//! workload. Counts are deterministic, so this fails only when the code starts doing
//! more work per event, never because the machine is busy.
//!
//! * **log mode**: decode a pgoutput Insert, map it to an event, build its Kafka message;
//! * **polling mode**: read a batch of outbox rows from a real PostgreSQL and build their
//!   messages;
//! * **hand-over**: give a batch to the Kafka sink (librdkafka's own C allocations are
//!   not counted, the relay's are).
//!
//! Only the measuring thread's allocations count (a thread-local counter, everything on
//! one current-thread runtime), so other tests and librdkafka's threads cannot disturb
//! it. If a change legitimately needs more, raise the baseline in the same commit and
//! say why.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::{BufMut, Bytes, BytesMut};
use outbox_relay::event::{OutboxEvent, Position};
use outbox_relay::sink::kafka::message::{to_message_with, Topics};
use outbox_relay::sink::kafka::KafkaSink;
use outbox_relay::sink::Sink;
use outbox_relay::source::logical::mapping::Mapper;
use outbox_relay::source::logical::pgoutput::{Decoder, Message};
use outbox_relay::source::Source;

/// Measured when the baselines were last set (see each line the test prints).
// The event's columns are slices of the stream's buffer (2026-12-04: 8.5 allocations per
// event when they were copied). Until 2026-12-06 this test subtracted the events' own
// list, made before counting began, so its bytes read 320 per event too few (272 for
// 592). Since then the headers column's plain objects are read without serde, straight
// into the message's header list, and an insert's tuple straight into its event, with
// no list of values (3 allocations and 592 bytes before): what is left is the message's
// header list.
const LOG_BASELINE: Work = Work {
    allocations: 1.0,
    bytes: 240.0,
};
// The batch is read with a binary COPY, and the events' columns are slices of its
// messages (2026-12-05: 8.2 allocations and 1,833 bytes when each column was copied on
// its own; 2026-12-06: 4.2 and 1,855 with one buffer per row, then 2.2 and 1,943 with
// one per batch of tokio-postgres rows): what is left is the message's header list, and
// the connection's read buffer, which holds the rows' bytes. The header list is made
// with room for two of the row's headers, which are read straight into it (1,805 bytes
// before, when it was sized to fit and the row's headers had a list of their own).
const POLLING_BASELINE: Work = Work {
    allocations: 1.2,
    bytes: 1902.0,
};
// The message's header list and the topic name rdkafka copies into a C string per send
// (3 and 389 before the headers column's plain objects were read without a list of
// their own).
const HAND_OVER_BASELINE: Work = Work {
    allocations: 2.0,
    bytes: 365.0,
};
/// How far above a baseline a change may go before this fails.
const TOLERANCE: f64 = 1.3;
const EVENTS: usize = 10_000;

struct Counting;

thread_local! {
    // Const-initialised and without a destructor: reading it never allocates.
    static COUNTS: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
}

fn count(bytes: usize) {
    // `try_with`: a thread being torn down has no counter left, and must still allocate.
    let _ = COUNTS.try_with(|c| {
        let (n, b) = c.get();
        c.set((n + 1, b + bytes));
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Work per event.
#[derive(Debug, Clone, Copy)]
struct Work {
    allocations: f64,
    bytes: f64,
}

/// What `f` allocates on this thread, per event of `events`.
async fn measure<T>(events: usize, f: impl AsyncFnOnce() -> T) -> (Work, T) {
    let before = COUNTS.with(Cell::get);
    let out = f().await;
    let after = COUNTS.with(Cell::get);
    let work = Work {
        allocations: (after.0 - before.0) as f64 / events as f64,
        bytes: (after.1 - before.1) as f64 / events as f64,
    };
    (work, out)
}

fn check(what: &str, work: Work, baseline: Work) {
    eprintln!(
        "{what}: {:.2} allocations, {:.0} bytes per event (baseline {}, {})",
        work.allocations, work.bytes, baseline.allocations, baseline.bytes
    );
    assert!(
        work.allocations <= baseline.allocations * TOLERANCE,
        "{what}: {:.2} allocations per event, baseline {}: the hot path does more work",
        work.allocations,
        baseline.allocations
    );
    assert!(
        work.bytes <= baseline.bytes * TOLERANCE,
        "{what}: {:.0} bytes allocated per event, baseline {}: the hot path copies more",
        work.bytes,
        baseline.bytes
    );
}

fn config(mode: &str, url: &str) -> outbox_relay::config::Config {
    outbox_relay::config::from_value(serde_json::json!({
        "source": {"mode": mode, "database_url": url},
        // Nothing listens there: the hand-over only queues inside librdkafka.
        "sink": {"kafka": {"brokers": "127.0.0.1:9"}},
    }))
    .unwrap_or_else(|p| panic!("{p}"))
}

fn cstr(b: &mut BytesMut, s: &str) {
    b.put_slice(s.as_bytes());
    b.put_u8(0);
}

/// The shipped outbox table's Relation message.
fn relation() -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(b'R');
    b.put_u32(16384);
    cstr(&mut b, "public");
    cstr(&mut b, "outbox");
    b.put_u8(b'd');
    let columns = [
        ("id", 2950u32),
        ("seq", 20),
        ("aggregate_type", 25),
        ("aggregate_id", 25),
        ("event_type", 25),
        ("payload", 3802),
        ("headers", 3802),
        ("created_at", 1184),
    ];
    b.put_u16(columns.len() as u16);
    for (name, oid) in columns {
        b.put_u8(0);
        cstr(&mut b, name);
        b.put_u32(oid);
        b.put_i32(-1);
    }
    b.freeze()
}

/// The payload of event `n`: about 200 bytes of JSON, as in the benchmark.
fn payload(n: usize) -> String {
    format!(r#"{{"n": {n}, "pad": "{}"}}"#, "x".repeat(150))
}

/// An Insert of event `n` into the outbox; every other one carries a trace header.
fn insert(n: usize) -> Bytes {
    let headers = n
        .is_multiple_of(2)
        .then(|| format!(r#"{{"traceparent": "00-{n:032x}-01"}}"#));
    let values = [
        Some(format!("00000000-0000-0000-0000-{n:012}")),
        Some(n.to_string()),
        Some("order".to_owned()),
        Some(format!("agg-{}", n % 10_000)),
        Some("OrderPlaced".to_owned()),
        Some(payload(n)),
        headers,
        Some("2026-11-23 12:00:00+00".to_owned()),
    ];
    let mut b = BytesMut::new();
    b.put_u8(b'I');
    b.put_u32(16384);
    b.put_u8(b'N');
    b.put_u16(values.len() as u16);
    for v in values {
        match v {
            Some(v) => {
                b.put_u8(b't');
                b.put_u32(v.len() as u32);
                b.put_slice(v.as_bytes());
            }
            None => b.put_u8(b'n'),
        }
    }
    b.freeze()
}

#[test]
fn work_per_event_stays_near_the_baseline() {
    // Everything on this thread: the counter is per thread.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let events = log_mode();
        polling_mode().await;
        hand_over(&events).await;
    });
}

/// Log mode: pgoutput bytes in, Kafka messages out.
fn log_mode() -> Vec<OutboxEvent> {
    let config = config("logical", "postgres://u@h/db");
    let mut mapper = Mapper::new(
        config.source.table.clone(),
        config.source.columns.clone(),
        "outbox".into(),
    );
    let mut decoder = Decoder::default();
    let Message::Relation(rel) = decoder.decode(relation()).unwrap() else {
        panic!("relation")
    };
    mapper.relation(&rel).unwrap();
    let inputs: Vec<Bytes> = (0..EVENTS).map(insert).collect();
    let mut events = Vec::with_capacity(EVENTS);
    let mut topics = Topics::default();
    let mut value_bytes = 0;
    let before = COUNTS.with(Cell::get);
    for data in inputs {
        // As the stream does: an outbox row read straight into its event.
        let (relation, tuple) = decoder.insert(&data).expect("an insert");
        let event = mapper
            .insert_tuple(
                relation,
                tuple,
                Position::Lsn(outbox_relay::event::Lsn(1)),
                0,
            )
            .expect("an outbox row")
            .unwrap();
        value_bytes += to_message_with(&event, &config.sink, &mut topics)
            .unwrap()
            .value
            .len();
        events.push(event);
    }
    let after = COUNTS.with(Cell::get);
    assert_eq!(
        value_bytes,
        (0..EVENTS).map(|n| payload(n).len()).sum::<usize>()
    );
    // The events vector was made before counting began: not per-event work.
    let work = Work {
        allocations: (after.0 - before.0) as f64 / EVENTS as f64,
        bytes: (after.1 - before.1) as f64 / EVENTS as f64,
    };
    check("log mode", work, LOG_BASELINE);
    events
}

/// Polling mode: one batch of rows read from PostgreSQL, and their messages.
async fn polling_mode() {
    let pg = outbox_relay::testkit::postgres::Postgres::start().expect("PostgreSQL");
    let url = pg.create_database("guard").await.unwrap();
    let db = pg.connect("guard").await.unwrap();
    for (name, sql) in outbox_relay::SETUP_SQL {
        db.batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    db.execute(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
         SELECT 'order', 'agg-' || (g % 10000), 'OrderPlaced', \
                jsonb_build_object('n', g, 'pad', repeat('x', 150)) \
         FROM generate_series(1, $1::int8) g",
        &[&(EVENTS as i64)],
    )
    .await
    .unwrap();
    let config = config("polling", &url);
    let mut source = outbox_relay::source::polling::PollingSource::connect(
        &config.source,
        outbox_relay::metrics::Telemetry::default(),
    )
    .await
    .unwrap();
    let mut topics = Topics::default();
    let (work, batch) = measure(EVENTS, async || {
        let batch = source.next_batch(EVENTS, false).await.unwrap();
        for event in &batch {
            to_message_with(event, &config.sink, &mut topics).unwrap();
        }
        batch
    })
    .await;
    assert_eq!(batch.len(), EVENTS, "one batch holds every row");
    check("polling mode", work, POLLING_BASELINE);
}

/// The hand-over of one batch to the Kafka sink.
async fn hand_over(events: &[OutboxEvent]) {
    let config = config("logical", "postgres://u@h/db");
    let sink = KafkaSink::new(&config.sink, outbox_relay::metrics::Telemetry::default()).unwrap();
    let (work, sent) = measure(events.len(), async || sink.send(events).await).await;
    check("hand-over to the Kafka sink", work, HAND_OVER_BASELINE);
    sink.purge_queued();
    drop(sent);
}
