//! The event → message mapping of design §2 (docs/design.md), field by field.

use super::*;
use crate::event::Position;
use crate::sink::kafka::RawKafkaSinkConfig;

fn config(extra: &str) -> KafkaSinkConfig {
    let toml = format!("brokers = \"b:9092\"\n{extra}");
    let raw: RawKafkaSinkConfig = toml_value(&toml);
    let mut problems = crate::config::Problems::default();
    raw.validate(&mut problems, std::path::Path::new("."))
        .unwrap_or_else(|| panic!("{problems}"))
}

fn toml_value<T: serde::de::DeserializeOwned>(toml: &str) -> T {
    config::Config::builder()
        .add_source(config::File::from_str(toml, config::FileFormat::Toml))
        .build()
        .unwrap()
        .try_deserialize()
        .unwrap()
}

fn event() -> OutboxEvent {
    OutboxEvent {
        position: Position::Seq(7),
        id: Some("0b6c3a52-7c8e-4a43-9d0c-6b1a7f1d2e11".into()),
        aggregate_type: Some("order".into()),
        aggregate_id: Some("o-42".into()),
        event_type: Some("OrderPlaced".into()),
        payload: Some(br#"{"total": 42}"#.to_vec().into()),
        payload_is_json: true,
        headers: Some(r#"{"traceparent": "00-aa-bb-01", "retry": 2, "tags": ["a"]}"#.into()),
        topic: None,
        timestamp_ms: Some(1_700_000_000_123),
        invalid: None,
        original: None,
        redriven: false,
    }
}

#[test]
fn maps_topic_key_value_headers_and_timestamp() {
    let e = event();
    let m = to_message(&e, &config("")).unwrap();
    assert_eq!(&*m.topic, "outbox.order");
    assert_eq!(m.key.as_deref(), Some(&b"o-42"[..]));
    assert_eq!(&*m.value, &br#"{"total": 42}"#[..]);
    assert_eq!(m.timestamp_ms, Some(1_700_000_000_123));
    let headers: Vec<(&str, &str)> = m
        .headers
        .iter()
        .map(|(k, v)| (k.as_ref(), std::str::from_utf8(v).unwrap()))
        .collect();
    assert_eq!(
        headers,
        [
            ("id", "0b6c3a52-7c8e-4a43-9d0c-6b1a7f1d2e11"),
            ("event_type", "OrderPlaced"),
            ("aggregate_type", "order"),
            ("retry", "2"),
            ("tags", "[\"a\"]"),
            ("traceparent", "00-aa-bb-01"),
        ]
    );
}

#[test]
fn routes_by_override_then_row_topic() {
    let c = config(
        "topic = \"x.{event_type}\"\nrow_topics = [\"replies.*\"]\n\
         [topic_overrides]\norder = \"orders.{aggregate_type}\"",
    );
    assert_eq!(&*to_message(&event(), &c).unwrap().topic, "orders.order");
    let mut other = event();
    other.aggregate_type = Some("invoice".into());
    assert_eq!(&*to_message(&other, &c).unwrap().topic, "x.OrderPlaced");
    let mut routed = event();
    routed.topic = Some("replies.billing".into());
    assert_eq!(&*to_message(&routed, &c).unwrap().topic, "replies.billing");
}

#[test]
fn poison_events_say_what_is_wrong() {
    let c = config("");
    type Break = fn(&mut OutboxEvent);
    let cases: Vec<(Break, &str)> = vec![
        (
            |e| e.aggregate_id = Some(String::new().into()),
            "aggregate_id is empty",
        ),
        (|e| e.aggregate_id = None, "aggregate_id is missing"),
        (|e| e.id = None, "id is missing"),
        (|e| e.payload = None, "payload is missing"),
        (
            |e| e.headers = Some("[1]".into()),
            "headers must be a JSON object",
        ),
        (
            |e| e.headers = Some("{".into()),
            "headers is not valid JSON",
        ),
        (|e| e.aggregate_type = Some("a b".into()), "contains ' '"),
        (
            |e| e.topic = Some("x".repeat(300).into()),
            "Kafka allows 249",
        ),
    ];
    for (break_it, expected) in cases {
        let mut e = event();
        break_it(&mut e);
        let err = to_message(&e, &c).unwrap_err();
        assert!(
            err.reason.contains(expected),
            "{:?} should contain {expected:?}",
            err.reason
        );
    }
}

#[test]
fn dead_letters_keep_original_bytes_key_headers_and_say_why() {
    let mut e = event();
    e.aggregate_type = Some("bad type".into());
    let m = to_dead_letter(
        &e,
        &Poison::new("topic rejected"),
        &config("dead_letter_topic = \"dlq\""),
    );
    assert_eq!(&*m.topic, "dlq");
    assert_eq!(&*m.value, &br#"{"total": 42}"#[..]);
    assert_eq!(m.key.as_deref(), Some(&b"o-42"[..]));
    let get = |k: &str| {
        m.headers
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| String::from_utf8(v.to_vec()).unwrap())
    };
    assert_eq!(get("error").as_deref(), Some("topic rejected"));
    assert_eq!(get("source_position").as_deref(), Some("seq:7"));
    assert_eq!(get("traceparent").as_deref(), Some("00-aa-bb-01"));
    assert_eq!(
        get("id").as_deref(),
        Some("0b6c3a52-7c8e-4a43-9d0c-6b1a7f1d2e11")
    );
}

#[test]
fn cloudevents_wraps_the_payload_verbatim() {
    let e = event();
    let m = to_message(&e, &config("format = \"cloudevents\"")).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&m.value).unwrap();
    assert_eq!(v["specversion"], "1.0");
    assert_eq!(v["id"], "0b6c3a52-7c8e-4a43-9d0c-6b1a7f1d2e11");
    assert_eq!(v["type"], "OrderPlaced");
    assert_eq!(v["subject"], "o-42");
    assert_eq!(v["source"], "/outbox/order");
    assert_eq!(v["time"], "2023-11-14T22:13:20.123Z");
    assert_eq!(v["data"]["total"], 42);
    let text = String::from_utf8(m.value.into_owned()).unwrap();
    assert!(
        text.contains(r#""data":{"total": 42}"#),
        "payload bytes embedded as stored: {text}"
    );

    let mut bytes = event();
    bytes.payload = Some(vec![0, 159, 255].into());
    bytes.payload_is_json = false;
    let m = to_message(&bytes, &config("format = \"cloudevents\"")).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&m.value).unwrap();
    assert_eq!(v["data_base64"], "AJ//");
    assert_eq!(v["datacontenttype"], "application/octet-stream");
}

#[test]
fn a_row_may_name_only_topics_the_allow_list_permits() {
    let c = config("topic = \"outbox.{aggregate_type}\"");
    assert_eq!(
        c.row_topics,
        ["outbox.*"],
        "default: the template's fixed prefix"
    );
    let mut routed = event();
    routed.topic = Some("outbox.replies".into());
    assert_eq!(&*to_message(&routed, &c).unwrap().topic, "outbox.replies");
    routed.topic = Some("payments.commands".into());
    let why = to_message(&routed, &c).unwrap_err().reason;
    assert!(
        why.contains("payments.commands") && why.contains("sink.kafka.row_topics"),
        "{why}"
    );

    let c = config("row_topics = [\"a.*.z\", \"exact\"]");
    for (topic, allowed) in [
        ("a.b.z", true),
        ("a..z", true),
        ("a.bz", false),
        ("exact", true),
        ("exactly", false),
        ("b.a.z", false),
    ] {
        routed.topic = Some(topic.into());
        assert_eq!(to_message(&routed, &c).is_ok(), allowed, "{topic}");
    }
}
