use super::*;

fn mapper() -> Mapper {
    let raw: crate::source::names::RawColumnsForTest = Default::default();
    Mapper::new(None, raw.into_columns(), "outbox".into())
}

/// Relation 9, `public.other`: a table that is not the outbox.
fn other_relation() -> Relation {
    Relation {
        id: 9,
        namespace: "public".into(),
        name: "other".into(),
        columns: vec![],
    }
}

#[test]
fn rows_of_relations_other_than_the_outbox_are_errors_never_skipped() {
    let mut m = mapper();
    let other = other_relation();
    m.relation(&other).unwrap();
    let pos = Position::Lsn(crate::event::Lsn(5));
    let e = m.insert(9, Vec::new(), pos, 0).unwrap_err().to_string();
    assert!(e.contains("insert into public.other"), "{e}");
    assert!(e.contains("DROP TABLE public.other"), "{e}");
    let e = m.insert(10, Vec::new(), pos, 0).unwrap_err().to_string();
    assert!(e.contains("insert into relation 10"), "{e}");
}

/// Values are moved out of the decoded row when no column is mapped twice, and
/// shared when one is: both give every field its column.
#[test]
fn a_column_mapped_twice_fills_both_fields() {
    let raw: crate::source::names::RawColumnsForTest = Default::default();
    let defaults = raw.into_columns();
    let twice = Columns {
        aggregate_id: defaults.id.clone(),
        topic: Some(defaults.aggregate_type.clone()),
        ..defaults.clone()
    };
    for columns in [defaults, twice] {
        let mut distinct = vec![
            &columns.id,
            &columns.aggregate_type,
            &columns.aggregate_id,
            &columns.event_type,
            &columns.payload,
        ];
        distinct.extend(columns.headers.as_ref());
        distinct.extend(columns.topic.as_ref());
        distinct.sort();
        distinct.dedup();
        let mut m = Mapper::new(
            Some(TableName::parse("public.outbox").unwrap()),
            columns.clone(),
            "outbox".into(),
        );
        let rel = Relation {
            id: 7,
            namespace: "public".into(),
            name: "outbox".into(),
            columns: distinct
                .iter()
                .map(|n| crate::source::logical::pgoutput::Column {
                    name: (*n).clone(),
                    type_oid: if **n == columns.payload {
                        JSONB_OID
                    } else {
                        25
                    },
                })
                .collect(),
        };
        assert!(m.relation(&rel).unwrap());
        let tuple = distinct
            .iter()
            .map(|n| Value::Text(Bytes::from(format!("v-{n}"))))
            .collect();
        let e = m
            .insert(7, tuple, Position::Lsn(crate::event::Lsn(5)), 0)
            .unwrap();
        let v = |name: &str| format!("v-{name}");
        assert_eq!(e.id.as_deref(), Some(v(&columns.id).as_str()));
        assert_eq!(
            e.aggregate_id.as_deref(),
            Some(v(&columns.aggregate_id).as_str())
        );
        assert_eq!(
            e.aggregate_type.as_deref(),
            Some(v(&columns.aggregate_type).as_str())
        );
        assert_eq!(
            e.event_type.as_deref(),
            Some(v(&columns.event_type).as_str())
        );
        assert_eq!(e.payload.as_deref(), Some(v(&columns.payload).as_bytes()));
        assert_eq!(
            e.topic.as_deref(),
            columns.topic.as_deref().map(v).as_deref()
        );
    }
}

/// The shipped table's columns, in its order, as pgoutput describes them.
fn outbox_relation(m: &mut Mapper, id: u32, payload_oid: u32) {
    let columns = [
        ("id", 2950),
        ("seq", 20),
        ("aggregate_type", 25),
        ("aggregate_id", 25),
        ("event_type", 25),
        ("payload", payload_oid),
        ("headers", JSONB_OID),
        ("created_at", 1184),
    ];
    let rel = Relation {
        id,
        namespace: "public".into(),
        name: "outbox".into(),
        columns: columns
            .iter()
            .map(|(name, type_oid)| super::super::pgoutput::Column {
                name: (*name).into(),
                type_oid: *type_oid,
            })
            .collect(),
    };
    assert!(m.relation(&rel).unwrap());
}

/// An Insert message of relation `relation` with these columns: `Ok(text)`, or
/// `Err(kind)` for a kind byte alone (`n`, `u`, or anything else).
fn insert_message(relation: u32, columns: &[Result<&[u8], u8>]) -> Bytes {
    use bytes::BufMut;
    let mut b = bytes::BytesMut::new();
    b.put_u8(b'I');
    b.put_u32(relation);
    b.put_u8(b'N');
    b.put_u16(columns.len() as u16);
    for c in columns {
        match c {
            Ok(text) => {
                b.put_u8(b't');
                b.put_u32(text.len() as u32);
                b.put_slice(text);
            }
            Err(kind) => b.put_u8(*kind),
        }
    }
    b.freeze()
}

#[test]
fn an_insert_read_in_one_pass_is_the_insert_decoded_whole() {
    use super::super::pgoutput::{Decoder, Message};
    use rand::{Rng, SeedableRng};
    let mut m = Mapper::new(
        Some(TableName::parse("public.outbox").unwrap()),
        mapper().columns,
        "outbox".into(),
    );
    outbox_relation(&mut m, 7, JSONB_OID);
    outbox_relation(&mut m, 8, BYTEA_OID);
    let other = other_relation();
    m.relation(&other).unwrap();
    const TEXTS: [&[u8]; 6] = [
        b"e-1",
        b"",
        b"order",
        br#"{"a": 1}"#,
        b"\\x6869",
        b"\xff\xfe",
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(27);
    let position = Position::Lsn(crate::event::Lsn(5));
    let (mut read, mut refused) = (0, 0);
    for _ in 0..5_000 {
        let relation = [7, 8, 9][rng.random_range(0..3)];
        let count = [8, 8, 8, 5, 10][rng.random_range(0..5)];
        let columns: Vec<Result<&[u8], u8>> = (0..count)
            .map(|_| match rng.random_range(0..10) {
                0 => Err(b'n'),
                1 => Err(b'u'),
                2 if rng.random_bool(0.1) => Err([b'b', b'x'][rng.random_range(0..2)]),
                _ => Ok(TEXTS[rng.random_range(0..TEXTS.len())]),
            })
            .collect();
        let mut data = insert_message(relation, &columns);
        if rng.random_bool(0.2) {
            data.truncate(rng.random_range(6..=data.len()));
        }
        let whole = match Decoder::default().decode(data.clone()) {
            Ok(Message::Insert {
                relation, tuple, ..
            }) => m
                .insert(relation, tuple, position, 3)
                .map_err(|e| e.to_string()),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e.to_string()),
        };
        let (relation, tuple) = Decoder::default().insert(&data).expect("an insert");
        let one_pass = match m.insert_tuple(relation, tuple, position, 3) {
            Some(event) => event.map_err(|e| e.to_string()),
            // Not an outbox relation: the stream decodes it whole, as above.
            None => continue,
        };
        assert_eq!(one_pass, whole, "{data:?}");
        read += usize::from(one_pass.is_ok());
        refused += usize::from(one_pass.is_err());
    }
    assert!(
        read > 1_000 && refused > 500,
        "read {read}, refused {refused}"
    );
    // What is not an Insert outside a streaming block is left to the whole decoding.
    let data = insert_message(7, &[Ok(b"x")]);
    for bad in [b'U', b'D'] {
        let mut other = data.to_vec();
        other[0] = bad;
        assert!(Decoder::default().insert(&Bytes::from(other)).is_none());
    }
    let mut other = data.to_vec();
    other[5] = b'K';
    assert!(Decoder::default().insert(&Bytes::from(other)).is_none());
    assert!(Decoder::default().insert(&data.slice(..5)).is_none());
}

#[test]
fn envelopes_keep_payload_bytes_exactly() {
    let m = mapper();
    let content = Bytes::from_static(
        br#"{"id":"e1","aggregate_type":"order","aggregate_id":"o1","event_type":"Placed","payload":{"b": 1,"a":[2]},"headers":{"k":"v"}}"#,
    );
    let at = crate::event::Lsn(5);
    let message = |prefix, transactional, content: &Bytes, xid| {
        m.message(prefix, transactional, content, Position::Lsn(at), xid)
    };
    let e = message("outbox", true, &content, Some(7)).unwrap();
    assert_eq!(e.payload.as_deref(), Some(&br#"{"b": 1,"a":[2]}"#[..]));
    assert_eq!(e.headers.as_deref(), Some(r#"{"k":"v"}"#));
    assert_eq!((e.id.as_deref(), e.invalid.as_deref()), (Some("e1"), None));
    assert!(message("other", true, &content, None).is_none());
    let e = message("outbox", false, &content, None).unwrap();
    assert!(e.invalid.unwrap().contains("non-transactional"));
    let bad = Bytes::from_static(b"{not json");
    let e = message("outbox", true, &bad, None).unwrap();
    assert!(e.invalid.unwrap().contains("not a valid outbox envelope"));
    assert_eq!(e.original.as_deref(), Some(&b"{not json"[..]));
}

#[test]
fn bytea_text_decodes() {
    assert_eq!(decode_bytea(b"\\x00ff10"), Some(vec![0, 255, 16]));
    assert_eq!(decode_bytea(b"\\x0"), None);
    assert_eq!(decode_bytea(b"plain"), None);
}
