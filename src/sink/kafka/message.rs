//! Mapping an [`OutboxEvent`] to its Kafka message
//! ([design §2](../../../docs/design.md#2-the-outbox-table-and-the-message)).
//!
//! This is the one place that decides topic, key, value and headers, so both capture
//! modes produce byte-identical messages for the same event.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use base64::prelude::{Engine as _, BASE64_STANDARD};
use bytestring::ByteString;
use serde_json::value::RawValue;

use super::config::{Format, KafkaSinkConfig};
use super::topic::validate_topic_name;
use crate::event::OutboxEvent;
use headers::extra_headers_into;

/// Headers the relay sets itself; a `headers` column key of the same name is ignored so
/// that consumers can trust them (Java's `lastHeader("id")` included).
pub const RESERVED_HEADERS: [&str; 3] = ["id", "event_type", "aggregate_type"];

/// The reserved headers and `redriven`, which only the relay sets on a redriven event.
const RELAY_HEADERS: [&str; 4] = ["id", "event_type", "aggregate_type", "redriven"];

/// A message ready to produce. It borrows what it can from its event: the relay builds
/// one per event, and copying the key, the payload and the headers here would only be
/// copied again by librdkafka.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaMessage<'a> {
    pub topic: Arc<str>,
    pub key: Option<Cow<'a, [u8]>>,
    pub value: Cow<'a, [u8]>,
    pub headers: Vec<Header<'a>>,
    pub timestamp_ms: Option<i64>,
}

/// A Kafka header: its name and value, borrowed from the event where they can be.
pub type Header<'a> = (Cow<'a, str>, Cow<'a, [u8]>);

/// Why an event cannot become a normal message: it goes to the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Poison {
    /// The `error` header.
    pub reason: String,
    /// More headers for the dead letter (the schema and its violations).
    pub headers: Vec<(&'static str, String)>,
    /// The payload did not fit its schema (counted apart).
    pub schema_violation: bool,
    /// What kind of problem, for the dead-letter queue and its gauge: `invalid`,
    /// `schema`, `too_large` or `refused` (by the broker, for another reason).
    pub kind: &'static str,
}

impl Poison {
    pub fn new(reason: impl Into<String>) -> Poison {
        Poison {
            reason: reason.into(),
            headers: Vec::new(),
            schema_violation: false,
            kind: "invalid",
        }
    }

    /// A broker's (or librdkafka's) refusal of the event for good.
    pub fn refused(e: &rdkafka::error::KafkaError) -> Poison {
        Poison {
            kind: if super::is_too_large(e) {
                "too_large"
            } else {
                "refused"
            },
            ..Poison::new(e.to_string())
        }
    }
}

/// Topic names already rendered and checked, by aggregate type and event type.
///
/// A batch names few topics, usually one: rendering and checking the name again for
/// every event would cost an allocation and a scan each.
#[derive(Debug, Default)]
pub struct Topics {
    known: Vec<(String, String, Arc<str>)>,
}

/// How many (aggregate type, event type) pairs [`Topics`] remembers; past that, names
/// are rendered per event (still correct, only slower).
const TOPICS_REMEMBERED: usize = 32;

impl Topics {
    fn get(
        &mut self,
        config: &KafkaSinkConfig,
        aggregate_type: &str,
        event_type: &str,
    ) -> Result<Arc<str>, Poison> {
        if let Some((_, _, topic)) = self
            .known
            .iter()
            .find(|(a, e, _)| a == aggregate_type && e == event_type)
        {
            return Ok(topic.clone());
        }
        let topic = config
            .topic_overrides
            .get(aggregate_type)
            .unwrap_or(&config.topic)
            .render(aggregate_type, event_type);
        validate_topic_name(&topic).map_err(Poison::new)?;
        let topic: Arc<str> = topic.into();
        if self.known.len() < TOPICS_REMEMBERED {
            self.known.push((
                aggregate_type.to_owned(),
                event_type.to_owned(),
                topic.clone(),
            ));
        }
        Ok(topic)
    }
}

/// Builds the message for `event`, or says why it is poison.
pub fn to_message<'a>(
    event: &'a OutboxEvent,
    config: &KafkaSinkConfig,
) -> Result<KafkaMessage<'a>, Poison> {
    to_message_with(event, config, &mut Topics::default())
}

/// [`to_message`], with topic names remembered across the events of a batch.
pub fn to_message_with<'a>(
    event: &'a OutboxEvent,
    config: &KafkaSinkConfig,
    topics: &mut Topics,
) -> Result<KafkaMessage<'a>, Poison> {
    if let Some(reason) = &event.invalid {
        return Err(Poison::new(reason.clone()));
    }
    let id = required(&event.id, "id")?;
    let aggregate_type = required(&event.aggregate_type, "aggregate_type")?;
    let aggregate_id = required(&event.aggregate_id, "aggregate_id")?;
    let event_type = required(&event.event_type, "event_type")?;
    let payload = event
        .payload
        .as_deref()
        .ok_or_else(|| Poison::new("payload is missing (NULL)"))?;
    let topic = route(event, config, topics, aggregate_type, event_type)?;

    let mut headers = Vec::with_capacity(RESERVED_HEADERS.len() + 2);
    headers.extend([
        (Cow::Borrowed("id"), Cow::Borrowed(id.as_bytes())),
        (
            Cow::Borrowed("event_type"),
            Cow::Borrowed(event_type.as_bytes()),
        ),
        (
            Cow::Borrowed("aggregate_type"),
            Cow::Borrowed(aggregate_type.as_bytes()),
        ),
    ]);
    if let Some(extra) = &event.headers {
        extra_headers_into(extra, &RELAY_HEADERS, &mut headers)?;
    }
    if event.redriven {
        // Sent again by an operator: same key, headers and id (a consumer deduplicates
        // by id), and this mark.
        headers.push((Cow::Borrowed("redriven"), Cow::Borrowed(b"true")));
    }

    let value = match config.format {
        Format::Raw => match &config.contracts {
            Some(contracts) => match contracts.encode(
                aggregate_type,
                event_type,
                &topic,
                payload,
                event.payload_is_json,
            )? {
                Some(encoded) => Cow::Owned(encoded),
                None => Cow::Borrowed(payload),
            },
            None => Cow::Borrowed(payload),
        },
        Format::CloudEvents => Cow::Owned(cloudevent(
            event,
            id,
            aggregate_type,
            aggregate_id,
            event_type,
            payload,
        )?),
    };
    Ok(KafkaMessage {
        topic,
        key: Some(Cow::Borrowed(aggregate_id.as_bytes())),
        value,
        headers,
        timestamp_ms: event.timestamp_ms,
    })
}

/// The topic of an event's message; `None` when the event is poison (it has no topic:
/// the dead-letter topic gets it).
pub(crate) fn topic_of(
    event: &OutboxEvent,
    config: &KafkaSinkConfig,
    topics: &mut Topics,
) -> Option<Arc<str>> {
    if event.invalid.is_some() {
        return None;
    }
    let aggregate_type = event.aggregate_type.as_deref().filter(|a| !a.is_empty())?;
    let event_type = event.event_type.as_deref().filter(|e| !e.is_empty())?;
    route(event, config, topics, aggregate_type, event_type).ok()
}

/// The row's own topic (when its topic column names one `row_topics` allows), else the
/// aggregate type's template.
fn route(
    event: &OutboxEvent,
    config: &KafkaSinkConfig,
    topics: &mut Topics,
    aggregate_type: &str,
    event_type: &str,
) -> Result<Arc<str>, Poison> {
    Ok(match &event.topic {
        Some(topic) if !topic.is_empty() => {
            validate_topic_name(topic).map_err(Poison::new)?;
            if !config
                .row_topics
                .iter()
                .any(|p| super::config::topic_matches(p, topic))
            {
                return Err(Poison::new(format!(
                    "the row names topic {topic:?}, which sink.kafka.row_topics ({}) does not \
                     allow: add a pattern for it, or fix the row",
                    config.row_topics.join(", ")
                )));
            }
            Arc::from(&topic[..])
        }
        _ => topics.get(config, aggregate_type, event_type)?,
    })
}

/// The dead-letter message for a poison event: its original bytes, key and headers where
/// they exist, plus `error` and `source_position`.
pub fn to_dead_letter<'a>(
    event: &'a OutboxEvent,
    poison: &Poison,
    config: &KafkaSinkConfig,
) -> KafkaMessage<'a> {
    let mut headers = Vec::new();
    for (name, value) in [
        ("id", &event.id),
        ("event_type", &event.event_type),
        ("aggregate_type", &event.aggregate_type),
    ] {
        if let Some(v) = value {
            headers.push((Cow::Borrowed(name), Cow::Borrowed(str::as_bytes(v))));
        }
    }
    match event
        .headers
        .as_deref()
        .map(|extra| extra_headers_into(extra, &RESERVED_HEADERS, &mut headers))
    {
        Some(Ok(())) => {}
        // Unparseable headers are kept verbatim, so nothing of the event is lost.
        Some(Err(_)) => headers.push((
            Cow::Borrowed("headers"),
            Cow::Borrowed(event.headers.as_deref().unwrap_or_default().as_bytes()),
        )),
        None => {}
    }
    headers.push((
        Cow::Borrowed("error"),
        Cow::Owned(poison.reason.as_bytes().to_vec()),
    ));
    for (name, value) in &poison.headers {
        headers.push((Cow::Borrowed(*name), Cow::Owned(value.as_bytes().to_vec())));
    }
    headers.push((
        Cow::Borrowed("source_position"),
        Cow::Owned(event.position.to_string().into_bytes()),
    ));
    KafkaMessage {
        topic: Arc::from(config.dead_letter_topic.as_str()),
        key: event
            .aggregate_id
            .as_ref()
            .filter(|k| !k.is_empty())
            .map(|k| Cow::Borrowed(str::as_bytes(k))),
        value: Cow::Borrowed(
            event
                .original
                .as_deref()
                .or(event.payload.as_deref())
                .unwrap_or_default(),
        ),
        headers,
        timestamp_ms: event.timestamp_ms,
    }
}

/// The dead-letter record of an event too large even for the dead-letter topic: what
/// [`to_dead_letter`] sends, without the body, plus its `size` and where the body is.
pub fn to_dead_letter_metadata<'a>(
    event: &'a OutboxEvent,
    poison: &Poison,
    size: usize,
    config: &KafkaSinkConfig,
) -> KafkaMessage<'a> {
    let mut msg = to_dead_letter(event, poison, config);
    msg.value = Cow::Borrowed(&[]);
    msg.headers.push((
        Cow::Borrowed("size"),
        Cow::Owned(size.to_string().into_bytes()),
    ));
    msg.headers.push((
        Cow::Borrowed("body"),
        Cow::Borrowed(
            b"too large for the dead-letter topic: kept in PostgreSQL (source.dead_letter_table)",
        ),
    ));
    msg
}

fn required<'a>(value: &'a Option<ByteString>, name: &str) -> Result<&'a str, Poison> {
    match value.as_deref() {
        Some(v) if !v.is_empty() => Ok(v),
        Some(_) => Err(Poison::new(format!("{name} is empty"))),
        None => Err(Poison::new(format!("{name} is missing (NULL)"))),
    }
}

/// A CloudEvents 1.0 structured-mode envelope; JSON payloads are embedded verbatim as
/// `data`, byte payloads as `data_base64`.
fn cloudevent(
    event: &OutboxEvent,
    id: &str,
    aggregate_type: &str,
    aggregate_id: &str,
    event_type: &str,
    payload: &[u8],
) -> Result<Vec<u8>, Poison> {
    #[derive(serde::Serialize)]
    struct Envelope<'a> {
        specversion: &'static str,
        id: &'a str,
        source: String,
        #[serde(rename = "type")]
        ty: &'a str,
        subject: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        time: Option<String>,
        datacontenttype: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        data: Option<&'a RawValue>,
        #[serde(skip_serializing_if = "Option::is_none")]
        data_base64: Option<String>,
    }
    let raw_json;
    let (data, data_base64, content_type) = if event.payload_is_json {
        let text =
            std::str::from_utf8(payload).map_err(|_| Poison::new("payload is not UTF-8 JSON"))?;
        raw_json = serde_json::from_str::<&RawValue>(text)
            .map_err(|e| Poison::new(format!("payload is not valid JSON: {e}")))?;
        (Some(raw_json), None, "application/json")
    } else {
        (
            None,
            Some(BASE64_STANDARD.encode(payload)),
            "application/octet-stream",
        )
    };
    let time = event.timestamp_ms.and_then(|ms| {
        let t = UNIX_EPOCH.checked_add(Duration::from_millis(u64::try_from(ms).ok()?))?;
        Some(humantime::format_rfc3339_millis(t).to_string())
    });
    let envelope = Envelope {
        specversion: "1.0",
        id,
        source: format!("/outbox/{aggregate_type}"),
        ty: event_type,
        subject: aggregate_id,
        time,
        datacontenttype: content_type,
        data,
        data_base64,
    };
    serde_json::to_vec(&envelope).map_err(|e| Poison::new(format!("cannot encode CloudEvent: {e}")))
}

mod headers;
#[cfg(test)]
mod tests;
