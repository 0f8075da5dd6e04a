//! Decoding real message layouts, and a property: no input makes the decoder panic.

use bytes::{BufMut, Bytes, BytesMut};
use rand::{Rng, SeedableRng};

use super::*;

fn cstr(b: &mut BytesMut, s: &str) {
    b.put_slice(s.as_bytes());
    b.put_u8(0);
}

fn relation(stream_xid: Option<u32>) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(b'R');
    if let Some(x) = stream_xid {
        b.put_u32(x);
    }
    b.put_u32(16384);
    cstr(&mut b, "public");
    cstr(&mut b, "outbox");
    b.put_u8(b'd');
    b.put_u16(2);
    for (name, oid) in [("id", 2950u32), ("payload", 3802)] {
        b.put_u8(1);
        cstr(&mut b, name);
        b.put_u32(oid);
        b.put_i32(-1);
    }
    b.freeze()
}

fn insert(stream_xid: Option<u32>) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(b'I');
    if let Some(x) = stream_xid {
        b.put_u32(x);
    }
    b.put_u32(16384);
    b.put_u8(b'N');
    b.put_u16(3);
    b.put_u8(b't');
    b.put_u32(4);
    b.put_slice(b"abcd");
    b.put_u8(b'n');
    b.put_u8(b'u');
    b.freeze()
}

fn message() -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(b'M');
    b.put_u8(1);
    b.put_u64(0x16_B374_D848);
    cstr(&mut b, "outbox");
    b.put_u32(2);
    b.put_slice(b"{}");
    b.freeze()
}

fn samples() -> Vec<Bytes> {
    let mut begin = BytesMut::new();
    begin.put_u8(b'B');
    begin.put_u64(100);
    begin.put_i64(7);
    begin.put_u32(42);
    let mut commit = BytesMut::new();
    commit.put_u8(b'C');
    commit.put_u8(0);
    commit.put_u64(100);
    commit.put_u64(120);
    commit.put_i64(7);
    vec![
        begin.freeze(),
        relation(None),
        insert(None),
        message(),
        commit.freeze(),
    ]
}

#[test]
fn decodes_a_transaction() {
    let mut d = Decoder::default();
    let got: Vec<Message> = samples()
        .into_iter()
        .map(|m| d.decode(m).unwrap())
        .collect();
    assert_eq!(
        got[0],
        Message::Begin {
            final_lsn: 100,
            commit_ts: 7,
            xid: 42
        }
    );
    let Message::Relation(rel) = &got[1] else {
        panic!()
    };
    assert_eq!(
        (rel.namespace.as_str(), rel.name.as_str()),
        ("public", "outbox")
    );
    assert_eq!(
        rel.columns[1],
        Column {
            name: "payload".into(),
            type_oid: 3802
        }
    );
    assert_eq!(
        got[2],
        Message::Insert {
            xid: None,
            relation: 16384,
            tuple: vec![
                Value::Text(Bytes::from_static(b"abcd")),
                Value::Null,
                Value::Unchanged
            ],
        }
    );
    assert_eq!(
        got[3],
        Message::Message {
            xid: None,
            transactional: true,
            lsn: 0x16_B374_D848,
            prefix: "outbox".into(),
            content: Bytes::from_static(b"{}"),
        }
    );
    assert_eq!(
        got[4],
        Message::Commit {
            commit_lsn: 100,
            end_lsn: 120,
            commit_ts: 7
        }
    );
}

#[test]
fn streaming_blocks_carry_xids() {
    let mut d = Decoder::default();
    let mut start = BytesMut::new();
    start.put_u8(b'S');
    start.put_u32(77);
    start.put_u8(1);
    assert_eq!(
        d.decode(start.freeze()).unwrap(),
        Message::StreamStart {
            xid: 77,
            first_segment: true
        }
    );
    assert!(matches!(
        d.decode(relation(Some(77))).unwrap(),
        Message::Relation(_)
    ));
    assert!(matches!(
        d.decode(insert(Some(77))).unwrap(),
        Message::Insert { xid: Some(77), .. }
    ));
    assert_eq!(
        d.decode(Bytes::from_static(b"E")).unwrap(),
        Message::StreamStop
    );
    // Outside the block the same insert layout has no xid: decoding it as such fails.
    assert!(d.decode(insert(Some(77))).is_err());
    let mut abort = BytesMut::new();
    abort.put_u8(b'A');
    abort.put_u32(77);
    abort.put_u32(78);
    assert_eq!(
        d.decode(abort.freeze()).unwrap(),
        Message::StreamAbort {
            xid: 77,
            subxid: 78
        }
    );
    let mut commit = BytesMut::new();
    commit.put_u8(b'c');
    commit.put_u32(77);
    commit.put_u8(0);
    commit.put_u64(1);
    commit.put_u64(2);
    commit.put_i64(3);
    assert_eq!(
        d.decode(commit.freeze()).unwrap(),
        Message::StreamCommit {
            xid: 77,
            commit_lsn: 1,
            end_lsn: 2,
            commit_ts: 3
        }
    );
}

#[test]
fn truncated_messages_are_errors() {
    let mut d = Decoder::default();
    for m in samples() {
        for cut in 0..m.len() {
            assert!(
                d.decode(m.slice(..cut)).is_err(),
                "prefix {cut} of {m:?} decoded"
            );
        }
    }
    let err = d.decode(Bytes::from_static(b"Zxx")).unwrap_err();
    assert!(err.0.contains("unknown message tag"));
}

/// Property: random bytes, and valid messages with random bytes flipped, cut or grown,
/// decode to a value or an error — never a panic or a huge allocation.
#[test]
fn arbitrary_bytes_never_panic() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x0070_6700);
    let valid = samples();
    let tags = b"BCRIMSEcAOYUDTZ";
    for i in 0..200_000 {
        let data: Vec<u8> = if i % 2 == 0 {
            let len = rng.random_range(0..64);
            let mut v: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            if let Some(first) = v.first_mut() {
                *first = tags[rng.random_range(0..tags.len())];
            }
            v
        } else {
            let mut v = valid[rng.random_range(0..valid.len())].to_vec();
            for _ in 0..rng.random_range(1..4) {
                match rng.random_range(0..3) {
                    0 if !v.is_empty() => {
                        let at = rng.random_range(0..v.len());
                        v[at] = rng.random();
                    }
                    1 if !v.is_empty() => v.truncate(rng.random_range(0..v.len())),
                    _ => v.push(rng.random()),
                }
            }
            v
        };
        let mut d = Decoder {
            in_stream: rng.random(),
        };
        let _ = d.decode(Bytes::from(data));
    }
}

#[test]
fn binary_column_values_are_refused_because_never_requested() {
    let mut m = vec![b'I'];
    m.extend_from_slice(&7u32.to_be_bytes());
    m.push(b'N');
    m.extend_from_slice(&1u16.to_be_bytes());
    m.push(b'b');
    m.extend_from_slice(&1u32.to_be_bytes());
    m.push(0);
    let err = Decoder::default().decode(Bytes::from(m)).unwrap_err();
    assert!(err.to_string().contains("binary column value"), "{err}");
}

/// A tuple of one text column.
fn tuple(b: &mut BytesMut, value: &[u8]) {
    b.put_u16(1);
    b.put_u8(b't');
    b.put_u32(value.len() as u32);
    b.put_slice(value);
}

#[test]
fn updates_and_deletes_decode_with_each_old_tuple_form() {
    let text = |v: &[u8]| vec![Value::Text(Bytes::copy_from_slice(v))];
    // An UPDATE: no old tuple (default identity, key unchanged), the old key, the old row.
    for (marker, old) in [
        (None, None),
        (Some(b'K'), Some(b"k")),
        (Some(b'O'), Some(b"o")),
    ] {
        let mut b = BytesMut::new();
        b.put_u8(b'U');
        b.put_u32(16384);
        if let (Some(m), Some(o)) = (marker, old) {
            b.put_u8(m);
            tuple(&mut b, o);
        }
        b.put_u8(b'N');
        tuple(&mut b, b"new");
        assert_eq!(
            Decoder::default().decode(b.freeze()).unwrap(),
            Message::Update {
                xid: None,
                relation: 16384,
                old: old.map(|o| text(o)),
                new: text(b"new"),
            }
        );
    }
    for marker in [b'K', b'O'] {
        let mut b = BytesMut::new();
        b.put_u8(b'D');
        b.put_u32(16384);
        b.put_u8(marker);
        tuple(&mut b, b"key");
        assert_eq!(
            Decoder::default().decode(b.freeze()).unwrap(),
            Message::Delete {
                xid: None,
                relation: 16384,
                old: text(b"key"),
            }
        );
    }
    // A wrong marker is an error naming the message, never a panic.
    let mut b = BytesMut::new();
    b.put_u8(b'D');
    b.put_u32(16384);
    b.put_u8(b'N');
    let err = Decoder::default().decode(b.freeze()).unwrap_err();
    assert!(err.0.contains("Delete"), "{err}");
    let mut b = BytesMut::new();
    b.put_u8(b'U');
    b.put_u32(16384);
    b.put_u8(b'K');
    tuple(&mut b, b"k");
    b.put_u8(b'X');
    let err = Decoder::default().decode(b.freeze()).unwrap_err();
    assert!(err.0.contains("Update"), "{err}");
}
