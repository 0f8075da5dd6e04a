//! Event contracts against a real Schema Registry (Apicurio, the Confluent API): each
//! format in both capture modes, decoded by an independent decoder (Python's fastavro,
//! protobuf and json, reading the schema by id from the registry), invalid payloads
//! dead-lettered with their violations, events without a schema passing through.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{insert_event, start_with_telemetry, Env};
use outbox_relay::testkit::kafka::Consumed;
use outbox_relay::testkit::registry;

/// A test's registry: the run's shared one, or one of its own (kept until dropped).
pub struct TestRegistry {
    pub url: String,
    _own: Option<registry::Registry>,
}

pub fn shared_registry() -> TestRegistry {
    match registry::shared_url() {
        Some(url) => TestRegistry { url, _own: None },
        None => {
            let own = registry::Registry::start().expect("start the schema registry");
            TestRegistry {
                url: own.url(),
                _own: Some(own),
            }
        }
    }
}

/// Writes `text` to `name` in `dir`; returns its path.
pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// The registry section and schema entries, for [`Env::config_toml`]'s `extra`.
pub fn registry_toml(url: &str, register: bool, entries: &str) -> String {
    format!(
        "[sink.kafka.schema_registry]\nurl = \"{url}\"\nregister = {register}\ntimeout = \"3s\"\n{entries}"
    )
}

/// One `[[sink.kafka.schemas]]` entry for a file.
pub fn entry(aggregate_type: &str, format: &str, file: &Path, more: &str) -> String {
    format!(
        "[[sink.kafka.schemas]]\naggregate_type = \"{aggregate_type}\"\nformat = \"{format}\"\nfile = \"{}\"\n{more}\n",
        file.display()
    )
}

/// Decodes Kafka values with the independent decoder; one JSON answer per value.
pub fn decode_independently(registry_url: &str, values: &[&Consumed]) -> Vec<Value> {
    use base64::prelude::{Engine as _, BASE64_STANDARD};
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".tools/py/bin/python");
    assert!(
        python.exists(),
        "run scripts/install (the decoder's Python venv)"
    );
    let mut child = std::process::Command::new(python)
        .arg(root.join("tests/decode/confluent.py"))
        .arg(registry_url)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut stdin = child.stdin.take().unwrap();
        for v in values {
            let line = json!({"value_b64": BASE64_STANDARD.encode(&v.value)});
            writeln!(stdin, "{line}").unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the decoder failed");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The decoded value, or a panic with the decoder's error.
fn value_of(decoded: &Value) -> &Value {
    assert!(decoded.get("error").is_none(), "decoder: {decoded}");
    &decoded["value"]
}

/// Waits until the relay made its replication slot (log mode's first start).
async fn wait_for_slot(db: &tokio_postgres::Client) {
    for _ in 0..300 {
        let n: i64 = db
            .query_one("SELECT count(*) FROM pg_replication_slots", &[])
            .await
            .unwrap()
            .get(0);
        if n > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the relay made no slot within 15 s");
}

struct Case {
    format: &'static str,
    file_name: &'static str,
    schema: &'static str,
    more: &'static str,
    /// Payloads that fit, as the application writes them.
    valid: [&'static str; 2],
    /// One that does not, and the JSON path its violation names.
    invalid: &'static str,
    invalid_path: &'static str,
    /// Checks one decoded value against the payload it came from.
    check: fn(payload: &Value, decoded: &Value),
}

/// Polling (at least once) then log mode (exactly once when `exactly_once`): both
/// encode with one registered schema, dead-letter the payload that does not fit, and
/// leave the aggregate type without a schema alone.
async fn both_modes(case: Case, exactly_once: bool) {
    let env = Env::start().await;
    let registry = shared_registry();
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(dir.path(), case.file_name, case.schema);
    let extra = registry_toml(
        &registry.url,
        true,
        &entry("order", case.format, &file, case.more),
    );
    env.create_topics(&["outbox.order", "outbox.customer", "outbox.dlq"], 1)
        .await;
    let db = env.client().await;

    let mut written = Vec::new();
    for (round, mode) in ["polling", "logical"].into_iter().enumerate() {
        for (i, payload) in case.valid.iter().enumerate() {
            insert_event(
                &db,
                "order",
                &format!("o-{round}"),
                &format!("E{i}"),
                payload,
            )
            .await;
            written.push(serde_json::from_str::<Value>(payload).unwrap());
        }
        insert_event(&db, "order", "o-bad", "Bad", case.invalid).await;
        insert_event(&db, "customer", "c-1", "Joined", r#"{"free": "form"}"#).await;

        let mut toml = env.config_toml(mode, "", &extra);
        if exactly_once && mode == "logical" {
            toml = toml.replacen(
                "[sink.kafka]\n",
                &format!(
                    "[sink.kafka]\ndelivery = \"exactly_once\"\ncheckpoint_topic = \"{}\"\n",
                    env.topic("checkpoints")
                ),
                1,
            );
        }
        let (relay, telemetry) = start_with_telemetry(&toml);
        let n = round + 1;
        let mut expected = 2 * n;
        if mode == "logical" {
            // A table-less event (a logical message) takes the same contract; it is only
            // captured once the relay's slot exists.
            wait_for_slot(&db).await;
            env.consume(&["outbox.order"], expected, 30).await;
            let envelope = json!({
                "id": "m-1", "aggregate_type": "order", "aggregate_id": "o-msg",
                "event_type": "FromMessage",
                "payload": serde_json::from_str::<Value>(case.valid[0]).unwrap(),
            });
            db.execute(
                "SELECT pg_logical_emit_message(true, 'outbox', $1)",
                &[&envelope.to_string()],
            )
            .await
            .unwrap();
            written.push(serde_json::from_str::<Value>(case.valid[0]).unwrap());
            expected += 1;
        }
        let orders = env.consume(&["outbox.order"], expected, 30).await;
        let dlq = env.consume(&["outbox.dlq"], n, 30).await;
        let customers = env.consume(&["outbox.customer"], n, 30).await;
        env.wait_outbox_empty(Duration::from_secs(20)).await;
        relay.stop().await;

        assert_eq!(
            orders.len(),
            expected,
            "{mode}: every valid order event arrives"
        );
        let refs: Vec<&Consumed> = orders.iter().collect();
        let decoded = decode_independently(&registry.url, &refs);
        let subject = format!("{}outbox.order-value", env.ns);
        for ((msg, payload), d) in orders.iter().zip(&written).zip(&decoded) {
            assert_eq!(msg.value[0], 0, "{mode}: the magic byte");
            (case.check)(payload, value_of(d));
            assert_eq!(d["schema_id"], decoded[0]["schema_id"], "one schema");
        }

        assert_eq!(
            dlq.len(),
            n,
            "{mode}: the payload that does not fit is dead-lettered"
        );
        let dead = &dlq[round];
        assert_eq!(dead.header("event_type"), Some("Bad"));
        assert_eq!(dead.header("schema_subject"), Some(subject.as_str()));
        assert_eq!(
            dead.header("schema_id").map(str::to_owned),
            Some(decoded[0]["schema_id"].to_string())
        );
        assert!(dead.header("schema_version").is_some_and(|v| !v.is_empty()));
        let violations = dead.header("schema_violations").unwrap();
        assert!(
            violations.starts_with(case.invalid_path),
            "{mode}: violations {violations:?} start at {}",
            case.invalid_path
        );
        let stored: Value = serde_json::from_slice(&dead.value).unwrap();
        assert_eq!(
            stored,
            serde_json::from_str::<Value>(case.invalid).unwrap(),
            "{mode}: the dead letter is the payload as written"
        );
        let counted = telemetry
            .metrics
            .schema_violations
            .with_label_values(&["order", "Bad"])
            .get();
        assert_eq!(counted, 1, "{mode}: counted by aggregate and event type");

        assert_eq!(customers.len(), n);
        assert_eq!(
            serde_json::from_slice::<Value>(&customers[round].value).unwrap(),
            json!({"free": "form"}),
            "{mode}: no schema, no encoding"
        );
    }
}

const ORDER_AVSC: &str = r#"{
  "type": "record", "name": "Order", "namespace": "shop",
  "fields": [
    {"name": "id", "type": {"type": "string", "logicalType": "uuid"}},
    {"name": "qty", "type": "int"},
    {"name": "note", "type": ["null", "string"], "default": null},
    {"name": "placed_at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    {"name": "total", "type": {"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": 2}}
  ]
}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_in_both_modes_and_exactly_once() {
    both_modes(
        Case {
            format: "avro",
            file_name: "order.avsc",
            schema: ORDER_AVSC,
            more: "",
            valid: [
                r#"{"id": "9b2f4c1e-1111-4a2b-8c3d-000000000001", "qty": 3, "note": "gift", "placed_at": "2024-05-01T12:00:00+02:00", "total": "12.30"}"#,
                r#"{"id": "9b2f4c1e-1111-4a2b-8c3d-000000000002", "qty": 1, "placed_at": 1714557600000, "total": "-0.05"}"#,
            ],
            invalid: r#"{"id": "9b2f4c1e-1111-4a2b-8c3d-000000000003", "qty": "three", "placed_at": 0, "total": "1"}"#,
            invalid_path: "$.qty",
            check: |payload, decoded| {
                assert_eq!(decoded["id"], payload["id"]);
                assert_eq!(decoded["qty"], payload["qty"]);
                assert_eq!(decoded["note"], payload.get("note").cloned().unwrap_or(Value::Null));
                assert_eq!(decoded["total"], payload["total"]);
                // Both ways of writing the instant are 2024-05-01T10:00:00Z.
                let at = decoded["placed_at"].as_str().unwrap();
                assert!(at.starts_with("2024-05-01T10:00:00"), "{at}");
            },
        },
        true,
    )
    .await
}

const ORDER_PROTO: &str = r#"
syntax = "proto3";
package shop;
import "google/protobuf/timestamp.proto";
message Customer { string name = 1; }
message Order {
  message Line { string sku = 1; int32 qty = 2; }
  string id = 1;
  repeated Line lines = 2;
  google.protobuf.Timestamp placed_at = 3;
  int64 total_cents = 4;
}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protobuf_in_both_modes() {
    both_modes(
        Case {
            format: "protobuf",
            file_name: "order.proto",
            schema: ORDER_PROTO,
            more: "message = \"shop.Order\"",
            valid: [
                r#"{"id": "o-1", "lines": [{"sku": "a", "qty": 2}], "placed_at": "2024-05-01T10:00:00Z", "total_cents": "1250"}"#,
                r#"{"id": "o-2", "lines": []}"#,
            ],
            invalid: r#"{"id": "o-3", "lines": [{"sku": "a", "qty": "two"}]}"#,
            invalid_path: "$.lines[0].qty",
            check: |payload, decoded| {
                assert_eq!(decoded["id"], payload["id"]);
                let lines = payload["lines"].as_array().unwrap();
                if lines.is_empty() {
                    assert!(decoded.get("lines").is_none_or(|l| l == &json!([])));
                } else {
                    assert_eq!(decoded["lines"], payload["lines"]);
                    assert_eq!(decoded["placed_at"], payload["placed_at"]);
                    assert_eq!(decoded["total_cents"], payload["total_cents"]);
                }
            },
        },
        false,
    )
    .await
}

const ORDER_JSON_SCHEMA: &str = r#"{
  "$schema": "http://json-schema.org/draft-07/schema#",
  "title": "shop.Order", "type": "object", "required": ["id", "qty"],
  "properties": {"id": {"type": "string"}, "qty": {"type": "integer", "minimum": 1},
                 "tags": {"type": "array", "items": {"type": "string"}}}
}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_schema_in_both_modes() {
    both_modes(
        Case {
            format: "json_schema",
            file_name: "order.json",
            schema: ORDER_JSON_SCHEMA,
            more: "",
            valid: [
                r#"{"id": "o-1", "qty": 2, "tags": ["x"]}"#,
                r#"{"id": "o-2", "qty": 1}"#,
            ],
            invalid: r#"{"id": "o-3", "qty": 1, "tags": ["x", 7]}"#,
            invalid_path: "$.tags[1]",
            check: |payload, decoded| assert_eq!(decoded, payload),
        },
        false,
    )
    .await
}
