//! A regression guard on the relay's work per event, counted rather than timed: heap
//! allocations on the hot path (decode a pgoutput Insert, map it to an event, build its
//! Kafka message) for a fixed workload. Allocation counts are deterministic, so this
//! fails only when the code starts doing more work per event — not when the machine is
//! busy. If a change legitimately needs more, raise `BASELINE` in the same commit and
//! say why.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::{BufMut, Bytes, BytesMut};
use outbox_relay::event::Position;
use outbox_relay::sink::kafka::message::to_message;
use outbox_relay::source::logical::mapping::Mapper;
use outbox_relay::source::logical::pgoutput::{Decoder, Message};

/// Allocations per event measured when this guard was written (see the test's output).
const BASELINE: f64 = 23.0;
/// How far above the baseline a change may go before this fails.
const TOLERANCE: f64 = 1.5;
const EVENTS: usize = 10_000;

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

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

fn insert(n: usize) -> Bytes {
    let values = [
        format!("00000000-0000-0000-0000-{n:012}"),
        n.to_string(),
        "order".to_owned(),
        format!("agg-{}", n % 10_000),
        "OrderPlaced".to_owned(),
        format!(r#"{{"n": {n}, "pad": "{}"}}"#, "x".repeat(150)),
        r#"{"traceparent": "00-abc-01"}"#.to_owned(),
        "2026-11-23 12:00:00+00".to_owned(),
    ];
    let mut b = BytesMut::new();
    b.put_u8(b'I');
    b.put_u32(16384);
    b.put_u8(b'N');
    b.put_u16(values.len() as u16);
    for v in values {
        b.put_u8(b't');
        b.put_u32(v.len() as u32);
        b.put_slice(v.as_bytes());
    }
    b.freeze()
}

#[test]
fn allocations_per_event_stay_near_the_baseline() {
    let config = outbox_relay::config::from_value(serde_json::json!({
        "source": {"mode": "logical", "database_url": "postgres://u@h/db"},
        "sink": {"kafka": {"brokers": "b:9092"}},
    }))
    .unwrap_or_else(|p| panic!("{p}"));
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

    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let mut bytes = 0;
    for data in inputs {
        let Message::Insert {
            relation, tuple, ..
        } = decoder.decode(data).unwrap()
        else {
            panic!("insert")
        };
        let event = mapper
            .insert(
                relation,
                &tuple,
                Position::Lsn(outbox_relay::event::Lsn(1)),
                0,
            )
            .unwrap();
        let message = to_message(&event, &config.sink).unwrap();
        bytes += message.value.len();
    }
    let per_event = (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / EVENTS as f64;
    eprintln!("allocations per event: {per_event:.1} (baseline {BASELINE}, {bytes} value bytes)");
    assert!(
        per_event <= BASELINE * TOLERANCE,
        "{per_event:.1} allocations per event, baseline {BASELINE}: the hot path does more work"
    );
}
