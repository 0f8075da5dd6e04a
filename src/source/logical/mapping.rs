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
mod tests;
