//! From pgoutput to [`OutboxEvent`]: outbox-table inserts and transactional logical
//! messages, mapped so that the sink builds the same Kafka message as in polling mode.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use bytestring::ByteString;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::pgoutput::{DecodeError, Relation, Tuple, Value};
use crate::event::{OutboxEvent, Position};
use crate::source::{Columns, SourceError, TableName};

const JSON_OID: u32 = 114;
const JSONB_OID: u32 = 3802;
const BYTEA_OID: u32 = 17;

/// The event fields a column can fill, as bit numbers of [`Layout::targets`].
const ID: usize = 0;
const AGGREGATE_TYPE: usize = 1;
const AGGREGATE_ID: usize = 2;
const EVENT_TYPE: usize = 3;
const PAYLOAD: usize = 4;
const HEADERS: usize = 5;
const TOPIC: usize = 6;
const FIELDS: usize = 7;

/// Where each column of an outbox relation's tuples goes in its event.
struct Layout {
    /// Per column, the fields it fills (bits [`ID`] … [`TOPIC`]): none for a column the
    /// event does not use, more than one when a column is mapped twice.
    targets: Vec<u8>,
    payload_oid: u32,
}

impl Layout {
    #[inline]
    fn wants(&self, column: usize) -> bool {
        self.targets.get(column).is_some_and(|t| *t != 0)
    }
}

/// One row's mapped columns as they are read, then its event.
struct Fields<'a> {
    layout: &'a Layout,
    values: [Option<Bytes>; FIELDS],
}

impl<'a> Fields<'a> {
    fn new(layout: &'a Layout) -> Fields<'a> {
        Fields {
            layout,
            values: Default::default(),
        }
    }

    /// Column `column`'s value into the fields it fills: moved into the last, a shared
    /// slice of the stream's buffer in the others (never a copy). NULL fills none.
    #[inline]
    fn put(&mut self, column: usize, value: Value) {
        let (Value::Text(bytes), Some(&targets)) = (value, self.layout.targets.get(column)) else {
            return;
        };
        if targets.is_power_of_two() {
            // One field, the usual case.
            self.values[targets.trailing_zeros() as usize] = Some(bytes);
            return;
        }
        let mut bytes = Some(bytes);
        let mut left = targets;
        while left != 0 {
            let field = left.trailing_zeros() as usize;
            left &= left - 1;
            self.values[field] = if left == 0 {
                bytes.take()
            } else {
                bytes.clone()
            };
        }
    }

    fn event(self, position: Position, timestamp_ms: i64) -> OutboxEvent {
        let [id, aggregate_type, aggregate_id, event_type, payload, headers, topic] = self.values;
        let (payload, payload_is_json) = match payload {
            Some(b) => match self.layout.payload_oid {
                JSON_OID | JSONB_OID => (Some(b), true),
                BYTEA_OID => (decode_bytea(&b).map(Bytes::from), false),
                _ => (Some(b), false),
            },
            None => (None, false),
        };
        // pgoutput sends text in the database's encoding: a column that is not UTF-8
        // reads as missing, and the event goes to the dead-letter topic with its other
        // columns.
        let text = |b: Option<Bytes>| b.and_then(|b| ByteString::try_from(b).ok());
        OutboxEvent {
            position,
            id: text(id),
            aggregate_type: text(aggregate_type),
            aggregate_id: text(aggregate_id),
            event_type: text(event_type),
            payload,
            payload_is_json,
            headers: text(headers),
            topic: text(topic),
            timestamp_ms: Some(timestamp_ms),
            invalid: None,
            original: None,
            redriven: false,
        }
    }
}

pub struct Mapper {
    table: Option<TableName>,
    /// (schema, name) of the relations whose rows are outbox rows: the outbox, and its
    /// partitions when it is partitioned.
    relations: Vec<(String, String)>,
    columns: Columns,
    prefix: String,
    /// Relation id → layout, for the outbox's relations (looked up per row: a B-tree of a
    /// few entries compares a handful of integers where a hash map hashes each time).
    layouts: BTreeMap<u32, Layout>,
    /// Relation id → name, for every other relation the stream described.
    others: HashMap<u32, String>,
}

impl Mapper {
    pub fn new(table: Option<TableName>, columns: Columns, prefix: String) -> Mapper {
        let relations = table
            .iter()
            .map(|t| (t.schema.clone(), t.name.clone()))
            .collect();
        Mapper {
            table,
            relations,
            columns,
            prefix,
            layouts: BTreeMap::new(),
            others: HashMap::new(),
        }
    }

    /// Also maps rows of these relations (the outbox's partitions) as outbox rows.
    pub fn with_relations(mut self, relations: Vec<(String, String)>) -> Mapper {
        self.relations.extend(relations);
        self
    }

    /// Learns a relation's columns (pgoutput sends one before its first row, and again
    /// after a schema or publication change); true when it is an outbox relation.
    pub fn relation(&mut self, rel: &Relation) -> Result<bool, SourceError> {
        let ours = self
            .relations
            .iter()
            .any(|(schema, name)| *schema == rel.namespace && *name == rel.name);
        if !ours {
            self.layouts.remove(&rel.id);
            self.others
                .insert(rel.id, format!("{}.{}", rel.namespace, rel.name));
            return Ok(false);
        }
        let find = |key: &str, name: &str| {
            rel.columns.iter().position(|c| c.name == name).ok_or_else(|| {
                SourceError::Setup(format!(
                    "the outbox table {}.{} as replicated has no column {name:?} (source.columns.{key})",
                    rel.namespace, rel.name
                ))
            })
        };
        let c = &self.columns;
        let mut mapped = vec![
            (ID, find("id", &c.id)?),
            (AGGREGATE_TYPE, find("aggregate_type", &c.aggregate_type)?),
            (AGGREGATE_ID, find("aggregate_id", &c.aggregate_id)?),
            (EVENT_TYPE, find("event_type", &c.event_type)?),
            (PAYLOAD, find("payload", &c.payload)?),
        ];
        if let Some(h) = c.headers.as_deref() {
            mapped.push((HEADERS, find("headers", h)?));
        }
        if let Some(t) = c.topic.as_deref() {
            mapped.push((TOPIC, find("topic", t)?));
        }
        let mut layout = Layout {
            targets: vec![0; rel.columns.len()],
            payload_oid: 0,
        };
        for (field, column) in mapped {
            layout.targets[column] |= 1 << field;
            if field == PAYLOAD {
                layout.payload_oid = rel.columns[column].type_oid;
            }
        }
        self.layouts.insert(rel.id, layout);
        Ok(true)
    }

    /// The event of an inserted outbox row.
    ///
    /// A row of any other relation is an error, never skipped: the slot would move past
    /// it, and if it was an outbox row under a name the relay did not expect (a
    /// partition, a renamed table), the event would be lost for good.
    pub fn insert(
        &self,
        relation: u32,
        tuple: Vec<Value>,
        position: Position,
        timestamp_ms: i64,
    ) -> Result<OutboxEvent, SourceError> {
        let Some(layout) = self.layouts.get(&relation) else {
            return Err(self.not_the_outbox(relation));
        };
        let mut fields = Fields::new(layout);
        for (column, value) in tuple.into_iter().enumerate() {
            fields.put(column, value);
        }
        Ok(fields.event(position, timestamp_ms))
    }

    /// The event of an inserted outbox row from its tuple's bytes, read once, only the
    /// columns the event uses sliced out: the stream's way, [`Mapper::insert`]'s rule.
    /// `None` when `relation` is not an outbox relation (then `insert` says why).
    pub fn insert_tuple(
        &self,
        relation: u32,
        tuple: Tuple,
        position: Position,
        timestamp_ms: i64,
    ) -> Option<Result<OutboxEvent, DecodeError>> {
        let layout = self.layouts.get(&relation)?;
        let mut fields = Fields::new(layout);
        Some(
            tuple
                .read(
                    |column| layout.wants(column),
                    |column, value| fields.put(column, value),
                )
                .map(|()| fields.event(position, timestamp_ms)),
        )
    }

    fn not_the_outbox(&self, relation: u32) -> SourceError {
        let name = self
            .others
            .get(&relation)
            .map_or_else(|| format!("relation {relation}"), String::clone);
        let outbox = self.table.as_ref().map_or_else(
            || "none: the outbox is table-less".into(),
            |t| t.to_string(),
        );
        SourceError::Setup(format!(
            "the replication stream carries an insert into {name}, but the relay maps only \
             the outbox table ({outbox}) and its partitions: remove {name} from the \
             publication (ALTER PUBLICATION … DROP TABLE {name}); nothing was acknowledged \
             past it"
        ))
    }

    /// The event of a logical message with our prefix; `None` for other prefixes.
    pub fn message(
        &self,
        prefix: &str,
        transactional: bool,
        content: &Bytes,
        position: Position,
        timestamp_ms: Option<i64>,
    ) -> Option<OutboxEvent> {
        // An empty configured prefix turns messages off.
        if self.prefix.is_empty() || prefix != self.prefix {
            return None;
        }
        let mut event = match parse_envelope(content) {
            Ok(event) => event,
            Err(reason) => OutboxEvent {
                invalid: Some(format!(
                    "logical message is not a valid outbox envelope: {reason}"
                )),
                ..empty_event()
            },
        };
        if !transactional {
            // Emitted outside the business transaction: it could exist without the
            // change it announces, so it is not published as an event.
            event.invalid = Some(
                "non-transactional logical message: emit it with pg_logical_emit_message(true, …) \
                 inside the business transaction"
                    .into(),
            );
        }
        event.position = position;
        event.timestamp_ms = timestamp_ms;
        event.original = Some(content.clone());
        Some(event)
    }
}

fn empty_event() -> OutboxEvent {
    OutboxEvent::blank(Position::Lsn(crate::event::Lsn(0)))
}

/// The JSON envelope of a table-less outbox event. `payload` and `headers` are kept as
/// the exact bytes written (no re-serialisation).
#[derive(Deserialize)]
struct Envelope<'a> {
    id: Option<String>,
    aggregate_type: Option<String>,
    aggregate_id: Option<String>,
    event_type: Option<String>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
    #[serde(borrow)]
    headers: Option<&'a RawValue>,
    topic: Option<String>,
}

fn parse_envelope(content: &Bytes) -> Result<OutboxEvent, String> {
    let text = std::str::from_utf8(content).map_err(|_| "not UTF-8".to_owned())?;
    let env: Envelope = serde_json::from_str(text).map_err(|e| e.to_string())?;
    Ok(OutboxEvent {
        id: env.id.map(ByteString::from),
        aggregate_type: env.aggregate_type.map(ByteString::from),
        aggregate_id: env.aggregate_id.map(ByteString::from),
        event_type: env.event_type.map(ByteString::from),
        // Borrowed raw values point into `content`: slices of it, not copies.
        payload: env.payload.map(|p| content.slice_ref(p.get().as_bytes())),
        headers: env
            .headers
            .and_then(|h| ByteString::try_from(content.slice_ref(h.get().as_bytes())).ok()),
        topic: env.topic.map(ByteString::from),
        ..empty_event()
    })
}

/// bytea's text output (`\x` + hex) back to bytes.
fn decode_bytea(text: &[u8]) -> Option<Vec<u8>> {
    let hex = text.strip_prefix(b"\\x")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    hex.chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapper() -> Mapper {
        let raw: crate::source::names::RawColumnsForTest = Default::default();
        Mapper::new(None, raw.into_columns(), "outbox".into())
    }

    #[test]
    fn rows_of_relations_other_than_the_outbox_are_errors_never_skipped() {
        let mut m = mapper();
        let other = Relation {
            id: 9,
            namespace: "public".into(),
            name: "other".into(),
            columns: vec![],
        };
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

    /// An Insert message of relation `relation` with these columns: `Some(text)`, or a
    /// kind byte alone (`n`, `u`, or anything else).
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
        let other = Relation {
            id: 9,
            namespace: "public".into(),
            name: "other".into(),
            columns: vec![],
        };
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
        let e = m
            .message(
                "outbox",
                true,
                &content,
                Position::Lsn(crate::event::Lsn(5)),
                Some(7),
            )
            .unwrap();
        assert_eq!(e.payload.as_deref(), Some(&br#"{"b": 1,"a":[2]}"#[..]));
        assert_eq!(e.headers.as_deref(), Some(r#"{"k":"v"}"#));
        assert_eq!((e.id.as_deref(), e.invalid.as_deref()), (Some("e1"), None));
        assert!(m
            .message(
                "other",
                true,
                &content,
                Position::Lsn(crate::event::Lsn(5)),
                None
            )
            .is_none());
        let e = m
            .message(
                "outbox",
                false,
                &content,
                Position::Lsn(crate::event::Lsn(5)),
                None,
            )
            .unwrap();
        assert!(e.invalid.unwrap().contains("non-transactional"));
        let bad = Bytes::from_static(b"{not json");
        let e = m
            .message(
                "outbox",
                true,
                &bad,
                Position::Lsn(crate::event::Lsn(5)),
                None,
            )
            .unwrap();
        assert!(e.invalid.unwrap().contains("not a valid outbox envelope"));
        assert_eq!(e.original.as_deref(), Some(&b"{not json"[..]));
    }

    #[test]
    fn bytea_text_decodes() {
        assert_eq!(decode_bytea(b"\\x00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(decode_bytea(b"\\x0"), None);
        assert_eq!(decode_bytea(b"plain"), None);
    }
}
