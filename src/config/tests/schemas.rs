//! Schema entries are compiled while the configuration loads: every mistake is a
//! problem named by its key, before anything connects.

use super::*;

const BASE: &str = r#"
[source]
mode = "polling"
database_url = "postgres://relay@db/app"

[sink.kafka]
brokers = "k1:9092"
"#;

const AVSC: &str = r#"{"type": "record", "name": "Order", "namespace": "shop", "fields": [{"name": "id", "type": "string"}]}"#;

/// Loads `BASE` plus `extra` from a folder that also holds `order.avsc`, `anon.avsc` (a
/// schema with no record name) and `order.proto`.
fn load_in_folder(extra: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("order.avsc"), AVSC).unwrap();
    std::fs::write(
        dir.path().join("anon.avsc"),
        r#"{"type": "array", "items": "int"}"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("order.proto"),
        "syntax = \"proto3\"; package shop; message Order { string id = 1; } message Line { int32 qty = 1; }",
    )
    .unwrap();
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, format!("{BASE}{extra}")).unwrap();
    let env: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    load_with_env(&path, env)
}

const REGISTRY: &str = "[sink.kafka.schema_registry]\nurl = \"http://registry:8081/\"\n";

#[test]
fn a_file_relative_to_the_config_is_compiled_and_the_registry_configured() {
    let config = load_in_folder(
        &format!(
            "{REGISTRY}username = \"relay\"\npassword = \"hunter2\"\nsubject_strategy = \"record\"\n\
             [[sink.kafka.schemas]]\naggregate_type = \"order\"\nformat = \"avro\"\nfile = \"order.avsc\"\n\
             [[sink.kafka.schemas]]\naggregate_type = \"order\"\nevent_type = \"LineAdded\"\nformat = \"protobuf\"\nfile = \"order.proto\"\nmessage = \"Line\"\n"
        ),
        &[],
    )
    .unwrap();
    let contracts = config.sink.contracts.expect("schemas configured");
    assert_eq!(contracts.registry_config().url, "http://registry:8081");
    assert_eq!(contracts.entry_for("order", "Placed"), Some(0));
    assert_eq!(contracts.entry_for("order", "LineAdded"), Some(1));
    assert_eq!(contracts.entry_for("customer", "Placed"), None);
    assert_eq!(contracts.subject(0, "any").as_deref(), Some("shop.Order"));
    assert_eq!(contracts.subject(1, "any").as_deref(), Some("shop.Line"));
    let shown = format!("{contracts:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
}

#[test]
fn no_schema_entry_means_no_encoding() {
    let config = load_in_folder(REGISTRY, &[]).unwrap();
    assert!(config.sink.contracts.is_none());
}

#[test]
fn every_mistake_in_an_entry_is_named_by_its_key() {
    let entry = |body: &str| format!("{REGISTRY}[[sink.kafka.schemas]]\n{body}\n");
    for (body, key, words) in [
        (
            "format = \"avro\"\nfile = \"order.avsc\"",
            "sink.kafka.schemas[0].aggregate_type",
            "missing",
        ),
        (
            "aggregate_type = \"order\"\nformat = \"xml\"\nfile = \"order.avsc\"",
            "sink.kafka.schemas[0].format",
            "\"avro\", \"protobuf\" or \"json_schema\"",
        ),
        (
            "aggregate_type = \"order\"\nformat = \"avro\"",
            "sink.kafka.schemas[0]",
            "needs file",
        ),
        (
            "aggregate_type = \"order\"\nformat = \"avro\"\nfile = \"order.avsc\"\nversion = 3",
            "sink.kafka.schemas[0]",
            "both file and version",
        ),
        (
            "aggregate_type = \"order\"\nformat = \"avro\"\nfile = \"missing.avsc\"",
            "sink.kafka.schemas[0].file",
            "cannot read",
        ),
        (
            "aggregate_type = \"order\"\nformat = \"avro\"\nfile = \"order.proto\"",
            "sink.kafka.schemas[0].file",
            "not an Avro schema",
        ),
        (
            "aggregate_type = \"order\"\nformat = \"json_schema\"\nfile = \"order.proto\"",
            "sink.kafka.schemas[0].file",
            "not JSON",
        ),
        (
            "aggregate_type = \"order\"\nformat = \"protobuf\"\nfile = \"order.proto\"",
            "sink.kafka.schemas[0].file",
            "several messages",
        ),
        (
            "aggregate_type = \"order\"\nformat = \"avro\"\nfile = \"order.avsc\"\nmessage = \"x\"",
            "sink.kafka.schemas[0].message",
            "only for format = \"protobuf\"",
        ),
        (
            "aggregate_type = \"order\"\nformat = \"avro\"\nversion = 0",
            "sink.kafka.schemas[0].version",
            "1 or more",
        ),
        (
            "aggregate_type = \"order\"\nformat = \"avro\"\nversion = \"newest\"",
            "sink.kafka.schemas[0].version",
            "\"latest\"",
        ),
        (
            "aggregate_type = \"\"\nformat = \"avro\"\nfile = \"order.avsc\"",
            "sink.kafka.schemas[0]",
            "must not be empty",
        ),
    ] {
        let text = problem_text(load_in_folder(&entry(body), &[]));
        assert!(
            text.contains(key) && text.contains(words),
            "{body}:\n{text}"
        );
    }
    let twice = entry("aggregate_type = \"order\"\nformat = \"avro\"\nfile = \"order.avsc\"")
        + "[[sink.kafka.schemas]]\naggregate_type = \"order\"\nformat = \"avro\"\nversion = \"latest\"\n";
    let text = problem_text(load_in_folder(&twice, &[]));
    assert!(
        text.contains("sink.kafka.schemas[1]") && text.contains("like sink.kafka.schemas[0]"),
        "{text}"
    );
}

#[test]
fn the_registry_section_and_its_combinations_are_checked() {
    let one = "[[sink.kafka.schemas]]\naggregate_type = \"order\"\nformat = \"avro\"\nfile = \"order.avsc\"\n";
    for (extra, key, words) in [
        (one.to_owned(), "sink.kafka.schemas", "needs a registry"),
        (format!("[sink.kafka.schema_registry]\nurl = \"registry:8081\"\n{one}"), "sink.kafka.schema_registry.url", "http:// or https://"),
        (format!("{REGISTRY}username = \"u\"\n{one}"), "sink.kafka.schema_registry.password", "go together"),
        (format!("{REGISTRY}ca_file = \"order.avsc\"\n{one}"), "sink.kafka.schema_registry.ca_file", "https://"),
        (format!("{REGISTRY}subject_strategy = \"by_topic\"\n{one}"), "sink.kafka.schema_registry.subject_strategy", "\"topic_record\""),
        (format!("{REGISTRY}timeout = \"soon\"\n{one}"), "sink.kafka.schema_registry.timeout", ""),
        (format!("{REGISTRY}subject_strategy = \"record\"\n[[sink.kafka.schemas]]\naggregate_type = \"x\"\nformat = \"avro\"\nfile = \"anon.avsc\"\n"), "sink.kafka.schemas[0].file", "no record name"),
        (format!("{REGISTRY}subject_strategy = \"topic_record\"\n[[sink.kafka.schemas]]\naggregate_type = \"x\"\nformat = \"avro\"\nversion = 2\n"), "sink.kafka.schemas[0].version", "subject_strategy = \"topic\""),
    ] {
        let text = problem_text(load_in_folder(&extra, &[]));
        assert!(text.contains(key) && text.contains(words), "{extra}:\n{text}");
    }
}

#[test]
fn cloudevents_and_schemas_are_refused_together_by_name() {
    let toml = BASE.replace(
        "brokers = \"k1:9092\"",
        "brokers = \"k1:9092\"\nformat = \"cloudevents\"",
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("order.avsc"), AVSC).unwrap();
    let path = dir.path().join("relay.toml");
    std::fs::write(
        &path,
        format!("{toml}{REGISTRY}[[sink.kafka.schemas]]\naggregate_type = \"order\"\nformat = \"avro\"\nfile = \"order.avsc\"\n"),
    )
    .unwrap();
    let text = problem_text(load_with_env(&path, HashMap::new()));
    assert!(
        text.contains("sink.kafka.schemas") && text.contains("cloudevents"),
        "{text}"
    );
}

#[test]
fn the_registry_password_may_come_from_the_environment_and_is_never_shown() {
    let extra = format!(
        "{REGISTRY}username = \"relay\"\n[[sink.kafka.schemas]]\naggregate_type = \"order\"\nformat = \"avro\"\nfile = \"order.avsc\"\n"
    );
    let config = load_in_folder(
        &extra,
        &[(
            "OUTBOX_RELAY__SINK__KAFKA__SCHEMA_REGISTRY__PASSWORD",
            "from-env-secret",
        )],
    )
    .unwrap();
    let contracts = config.sink.contracts.as_ref().unwrap();
    assert!(contracts.registry_config().password.is_some());
    assert!(!format!("{:?}", config.sink).contains("from-env-secret"));
}
