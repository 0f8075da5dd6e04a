//! Configuration: every problem named by key, all of them at once.

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use super::*;

/// Environment overrides (`OUTBOX_RELAY__…`): what they win, and how a bad one is named.
mod env;

/// `[sink.kafka.schema_registry]` and `[[sink.kafka.schemas]]`.
mod schemas;

/// What the relay does when things go wrong: poison events, a silent replication link.
mod failures;

/// `source.logical.shards` and everything it cannot hold.
mod shards;

const VALID: &str = r#"
[source]
mode = "polling"
database_url = "postgres://relay:s3cret@db.internal:5433/app"
table = "public.outbox"

[source.polling]
interval = "250ms"
batch_size = 200

[sink.kafka]
brokers = "k1:9092,k2:9092"
topic = "app.{aggregate_type}.{event_type}"
dead_letter_topic = "app.dlq"

[sink.kafka.topic_overrides]
OrderLine = "orders"

[sink.kafka.librdkafka]
"linger.ms" = 20
"compression.type" = "zstd"
"#;

fn load_str(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    file.write_all(toml.as_bytes()).unwrap();
    let env: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    load_with_env(file.path(), env)
}

/// The keys of every reported problem, in order.
fn problem_keys(result: Result<Config, ConfigError>) -> Vec<String> {
    match result {
        Ok(_) => panic!("expected the configuration to be refused"),
        Err(e) => e.problems().iter().map(|p| p.key.clone()).collect(),
    }
}

fn problem_text(result: Result<Config, ConfigError>) -> String {
    match result {
        Ok(_) => panic!("expected the configuration to be refused"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_complete_file_loads_into_typed_values() {
    let c = load_str(VALID, &[]).unwrap();
    assert_eq!(c.source.mode, crate::source::Mode::Polling);
    assert_eq!(c.source.polling.interval, Duration::from_millis(250));
    assert_eq!(c.source.polling.batch_size.get(), 200);
    assert_eq!(c.source.redacted_url(), "relay@db.internal:5433/app");
    assert_eq!(c.sink.brokers, "k1:9092,k2:9092");
    assert_eq!(c.sink.topic.render("Order", "Placed"), "app.Order.Placed");
    assert_eq!(
        c.sink.topic_overrides["OrderLine"].render("OrderLine", "X"),
        "orders",
        "override keys keep their case"
    );
    assert_eq!(c.sink.librdkafka["linger.ms"], "20");
    // Defaults for what the file leaves out.
    assert_eq!(c.source.logical.slot, "outbox_relay");
    assert_eq!(c.source.logical.status_interval, Duration::from_secs(10));
    assert_eq!(c.http.listen.to_string(), "0.0.0.0:9187");
    assert_eq!(c.relay.shutdown_grace, Duration::from_secs(30));
}

#[test]
fn the_spec_example_file_is_valid() {
    let spec_example = r#"
[source]
mode = "logical"
database_url = "postgres://relay@localhost:5432/app"
table = "public.outbox"

[source.logical]
slot = "outbox_relay"
publication = "outbox_relay"
message_prefix = "outbox"
create_if_missing = true
status_interval = "10s"
heartbeat_interval = "10s"
cleanup = false
failover = false
on_slot_lost = "fail"

[source.polling]
interval = "100ms"
batch_size = 1000

[sink.kafka]
brokers = "localhost:9092"
topic = "outbox.{aggregate_type}"
dead_letter_topic = "outbox.dlq"
format = "raw"

[sink.kafka.librdkafka]
"compression.type" = "lz4"

[http]
listen = "0.0.0.0:9187"
"#;
    let c = load_str(spec_example, &[]).unwrap();
    assert_eq!(c.source.mode, crate::source::Mode::Logical);
    assert_eq!(
        c.source.logical.heartbeat_interval,
        Some(Duration::from_secs(10))
    );
}

#[test]
fn unknown_keys_are_named_with_their_full_path() {
    let toml = VALID.replace("batch_size = 200", "batch_size = 200\nintervall = \"1s\"")
        + "\n[metrics]\nport = 1\n";
    let keys = problem_keys(load_str(&toml, &[]));
    assert_eq!(keys, ["metrics", "source.polling.intervall"]);
}

#[test]
fn a_wrong_type_names_the_key_and_the_expected_type_in_words() {
    for (from, to, said) in [
        (
            "batch_size = 200",
            "batch_size = \"lots\"",
            "source.polling.batch_size: must be a positive integer, not string \"lots\"",
        ),
        (
            "batch_size = 200",
            "batch_size = -3",
            "source.polling.batch_size: must be a positive integer, not integer `-3`",
        ),
        (
            "table = \"public.outbox\"",
            "table = 7",
            "source.table: must be a string, not integer `7`",
        ),
        (
            "dead_letter_topic = \"app.dlq\"",
            "dead_letter_topic = \"app.dlq\"\nrow_topics = \"app.*\"",
            "sink.kafka.row_topics: must be a list of strings, not string \"app.*\"",
        ),
    ] {
        let toml = VALID.replace(from, to);
        assert_ne!(toml, VALID);
        let text = problem_text(load_str(&toml, &[]));
        assert!(text.contains(said), "{said:?} not in {text}");
        assert!(
            !text.contains("usize") && !text.contains("expected"),
            "{text}"
        );
        assert!(
            !text.contains("environment"),
            "the file alone is blamed: {text}"
        );
    }
}

#[test]
fn missing_required_keys_are_all_reported() {
    let toml = r#"
[source]
table = "outbox"

[sink.kafka]
topic = "t"
"#;
    let keys = problem_keys(load_str(toml, &[]));
    assert_eq!(
        keys,
        ["source.mode", "source.database_url", "sink.kafka.brokers"]
    );
    let keys = problem_keys(load_str("[relay]\n", &[]));
    assert_eq!(keys, ["source", "sink"]);
}

#[test]
fn bad_durations_say_how_to_write_one() {
    let toml = VALID.replace("\"250ms\"", "\"10 parsecs\"");
    let text = problem_text(load_str(&toml, &[]));
    assert!(text.contains("source.polling.interval"), "{text}");
    assert!(
        text.contains("\"100ms\""),
        "the message shows the expected form: {text}"
    );
    let zero = VALID.replace("\"250ms\"", "\"0s\"");
    assert_eq!(
        problem_keys(load_str(&zero, &[])),
        ["source.polling.interval"]
    );
}

#[test]
fn bad_topic_templates_are_refused_before_any_event_is_read() {
    let toml = VALID
        .replace("app.{aggregate_type}.{event_type}", "app.{aggregate}")
        .replace("\"orders\"", "\"orders/{aggregate_type}\"")
        .replace("\"app.dlq\"", "\"dead letters\"");
    let problems = match load_str(&toml, &[]) {
        Err(e) => e.problems().to_vec(),
        Ok(_) => panic!("accepted bad templates"),
    };
    let keys: Vec<_> = problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "sink.kafka.topic",
            "sink.kafka.topic_overrides.OrderLine",
            "sink.kafka.dead_letter_topic"
        ]
    );
    assert!(problems[0]
        .message
        .contains("{aggregate_type} or {event_type}"));
}

#[test]
fn every_problem_is_reported_at_once() {
    let toml = VALID
        .replace("mode = \"polling\"", "mode = \"pollling\"")
        .replace("\"250ms\"", "\"soon\"")
        .replace("batch_size = 200", "batch_size = 0")
        .replace("format", "x")
        + "\n[http]\nlisten = \"everywhere\"\n[relay]\nshutdown_grace = \"-1s\"\n";
    let keys = problem_keys(load_str(&toml, &[]));
    for key in [
        "source.mode",
        "source.polling.interval",
        "source.polling.batch_size",
        "relay.shutdown_grace",
        "http.listen",
    ] {
        assert!(
            keys.contains(&key.to_string()),
            "{key} missing from {keys:?}"
        );
    }
}

#[test]
fn secrets_never_appear_in_errors() {
    let toml = VALID.replace("batch_size = 200", "batch_size = -1");
    let text = problem_text(load_str(&toml, &[]));
    assert!(!text.contains("s3cret"), "{text}");
    let bad_url = VALID.replace(
        "postgres://relay:s3cret@db.internal:5433/app",
        "postgres://relay:s3cret@db.internal:notaport/app",
    );
    let text = problem_text(load_str(&bad_url, &[]));
    assert!(text.contains("source.database_url"), "{text}");
    assert!(!text.contains("s3cret"), "{text}");
}

#[test]
fn librdkafka_properties_are_checked_by_librdkafka() {
    let toml = VALID.replace("\"linger.ms\" = 20", "\"linger.mss\" = 20");
    let text = problem_text(load_str(&toml, &[]));
    assert!(text.contains("sink.kafka.librdkafka"), "{text}");
    assert!(text.contains("linger.mss"), "{text}");
}

#[test]
fn a_missing_file_says_which() {
    let err = load_with_env(Path::new("/nonexistent/relay.toml"), HashMap::new())
        .err()
        .unwrap();
    assert!(err.to_string().contains("/nonexistent/relay.toml"));
}

#[test]
fn a_password_file_supplies_the_password() {
    let mut pw = tempfile::NamedTempFile::new().unwrap();
    writeln!(pw, "from-file").unwrap();
    let toml = VALID.replace(
        "table = \"public.outbox\"",
        &format!("table = \"public.outbox\"\npassword_file = {:?}", pw.path()),
    );
    let c = load_str(&toml, &[]).unwrap();
    assert_eq!(c.source.pg.get_password(), Some(&b"from-file"[..]));
}

#[test]
fn standby_retry_lives_in_source_and_its_old_name_still_works() {
    assert_eq!(
        load_str(VALID, &[]).unwrap().source.standby_retry,
        Duration::from_secs(1),
        "default"
    );
    let new = VALID.replace(
        "table = \"public.outbox\"\n",
        "table = \"public.outbox\"\nstandby_retry = \"250ms\"\n",
    );
    assert_eq!(
        load_str(&new, &[]).unwrap().source.standby_retry,
        Duration::from_millis(250)
    );
    let old = VALID.replace(
        "batch_size = 200\n",
        "batch_size = 200\nstandby_retry = \"3s\"\n",
    );
    assert_eq!(
        load_str(&old, &[]).unwrap().source.standby_retry,
        Duration::from_secs(3),
        "source.polling.standby_retry is an alias"
    );
    let both = new.replace(
        "batch_size = 200\n",
        "batch_size = 200\nstandby_retry = \"3s\"\n",
    );
    assert_eq!(
        problem_keys(load_str(&both, &[])),
        ["source.polling.standby_retry"]
    );
    assert!(problem_text(load_str(&both, &[])).contains("set only source.standby_retry"));
}

#[test]
fn a_toml_syntax_error_names_the_line_but_never_quotes_it() {
    let broken = VALID.replace(
        "database_url = \"postgres://relay:s3cret@db.internal:5433/app\"",
        "database_url = \"postgres://relay:s3cret@db.internal:5433/app",
    );
    let text = match load_str(&broken, &[]) {
        Err(e @ ConfigError::Unreadable { .. }) => e.to_string(),
        other => panic!("expected a syntax error, got {:?}", other.map(|_| ())),
    };
    assert!(text.contains("line 4"), "{text}");
    assert!(!text.contains("s3cret"), "the password leaked: {text}");
}

/// Every override that would break order or durability is refused, by key, with why.
#[test]
fn producer_overrides_that_break_order_or_durability_are_refused() {
    let refused = [
        ("enable.idempotence", "false"),
        ("acks", "1"),
        ("request.required.acks", "0"),
        ("message.timeout.ms", "30000"),
        ("delivery.timeout.ms", "120000"),
        ("max.in.flight.requests.per.connection", "6"),
        ("max.in.flight", "100"),
        ("retries", "3"),
        ("message.send.max.retries", "10"),
    ];
    for (key, value) in refused {
        let toml = format!("{VALID}\"{key}\" = \"{value}\"\n");
        let result = load_str(&toml, &[]);
        assert_eq!(
            problem_keys(load_str(&toml, &[])),
            [format!("sink.kafka.librdkafka.{key}")],
            "{key} = {value}"
        );
        assert!(problem_text(result).contains("would"), "{key}: says why");
    }
    let allowed = [
        ("enable.idempotence", "true"),
        ("acks", "all"),
        ("acks", "-1"),
        ("message.timeout.ms", "0"),
        ("max.in.flight.requests.per.connection", "5"),
    ];
    for (key, value) in allowed {
        let toml = format!("{VALID}\"{key}\" = \"{value}\"\n");
        assert!(load_str(&toml, &[]).is_ok(), "{key} = {value} is harmless");
    }
}

#[test]
fn kafka_secrets_never_show_in_debug_output() {
    let toml = format!(
        "{VALID}\"sasl.password\" = \"kafka-s3cret\"\n\"ssl.key.password\" = \"key-s3cret\"\n\
         \"sasl.username\" = \"relay\"\n"
    );
    let config = load_str(&toml, &[]).unwrap();
    let shown = format!("{:?} {:#?}", config.sink, config.sink);
    assert!(!shown.contains("s3cret"), "{shown}");
    assert!(
        shown.contains("<redacted>") && shown.contains("relay"),
        "{shown}"
    );
}

#[test]
fn the_dead_letter_table_decides_whether_bodies_can_be_kept() {
    let c = load_str(VALID, &[]).unwrap();
    assert_eq!(
        c.source.dead_letter_table.map(|t| t.to_string()).as_deref(),
        Some("public.outbox_relay_dead_letter")
    );
    assert!(c.sink.metadata_dead_letters);
    let none = VALID.replace(
        "table = \"public.outbox\"\n",
        "table = \"public.outbox\"\ndead_letter_table = \"\"\n",
    );
    let c = load_str(&none, &[]).unwrap();
    assert!(c.source.dead_letter_table.is_none());
    assert!(!c.sink.metadata_dead_letters, "nowhere to keep a body");
}

#[test]
fn on_slot_lost_takes_fail_or_recreate_and_names_both_otherwise() {
    let logical = |extra: &str| {
        VALID.replace("mode = \"polling\"", "mode = \"logical\"")
            + &format!("\n[source.logical]\n{extra}\n")
    };
    let c = load_str(&logical(""), &[]).unwrap();
    assert_eq!(
        c.source.logical.on_slot_lost,
        crate::source::logical::OnSlotLost::Fail
    );
    assert!(!c.source.logical.failover);
    let c = load_str(
        &logical("on_slot_lost = \"recreate\"\nfailover = true"),
        &[],
    )
    .unwrap();
    assert_eq!(
        c.source.logical.on_slot_lost,
        crate::source::logical::OnSlotLost::Recreate
    );
    assert!(c.source.logical.failover);
    let text = problem_text(load_str(&logical("on_slot_lost = \"skip\""), &[]));
    assert!(text.contains("source.logical.on_slot_lost"), "{text}");
    assert!(
        text.contains("\"fail\"") && text.contains("\"recreate\""),
        "{text}"
    );
}

#[test]
fn on_row_change_and_state_schema_take_their_values_and_name_the_rest() {
    use crate::source::OnRowChange;
    let source = |extra: &str| {
        VALID.replace(
            "mode = \"polling\"",
            &format!("mode = \"polling\"\n{extra}"),
        )
    };
    let c = load_str(VALID, &[]).unwrap();
    assert_eq!(c.source.on_row_change, OnRowChange::Warn);
    assert_eq!(c.source.state_schema, "public");
    for (raw, want) in [
        ("warn", OnRowChange::Warn),
        ("dead_letter", OnRowChange::DeadLetter),
        ("stop", OnRowChange::Stop),
    ] {
        let c = load_str(&source(&format!("on_row_change = \"{raw}\"")), &[]).unwrap();
        assert_eq!(c.source.on_row_change, want);
        assert_eq!(want.to_string(), raw);
    }
    let c = load_str(&source("state_schema = \"relay\""), &[]).unwrap();
    assert_eq!(c.source.state_schema, "relay");
    for (bad, key, says) in [
        (
            "on_row_change = \"ignore\"",
            "source.on_row_change",
            "\"dead_letter\"",
        ),
        ("state_schema = \"\"", "source.state_schema", "is empty"),
        (
            "state_schema = 'a\"b'",
            "source.state_schema",
            "no double quotes",
        ),
    ] {
        let text = problem_text(load_str(&source(bad), &[]));
        assert!(text.contains(key) && text.contains(says), "{bad}: {text}");
    }
}

#[test]
fn a_multi_host_url_splits_into_one_config_per_host_with_the_rest_kept() {
    let c = load_str(
        &VALID.replace(
            "postgres://relay:s3cret@db.internal:5433/app",
            "postgres://relay:s3cret@a:5433,b:5434/app?target_session_attrs=read-write&connect_timeout=3",
        ),
        &[],
    )
    .unwrap();
    let hosts = c.source.each_host();
    let names: Vec<String> = hosts.iter().map(|h| h.redacted_url()).collect();
    assert_eq!(names, ["relay@a:5433/app", "relay@b:5434/app"]);
    for h in &hosts {
        assert_eq!(h.pg.get_password(), Some(&b"s3cret"[..]));
        assert_eq!(
            h.pg.get_target_session_attrs(),
            tokio_postgres::config::TargetSessionAttrs::ReadWrite
        );
        assert_eq!(h.pg.get_connect_timeout(), Some(&Duration::from_secs(3)));
    }
}

#[test]
fn exactly_once_delivery_is_chosen_and_its_keys_checked() {
    let c = load_str(VALID, &[]).unwrap();
    assert_eq!(
        c.sink.delivery,
        crate::sink::kafka::DeliveryMode::AtLeastOnce
    );
    assert_eq!(c.sink.checkpoint_topic, "outbox-relay.checkpoints");
    assert_eq!(c.sink.transactional_id, None);

    let eos = VALID.replace(
        "dead_letter_topic = \"app.dlq\"",
        "dead_letter_topic = \"app.dlq\"\ndelivery = \"exactly_once\"\n\
         transactional_id = \"orders-outbox\"\ncheckpoint_topic = \"app.checkpoints\"",
    );
    let c = load_str(&eos, &[]).unwrap();
    assert_eq!(
        c.sink.delivery,
        crate::sink::kafka::DeliveryMode::ExactlyOnce
    );
    assert_eq!(c.sink.transactional_id.as_deref(), Some("orders-outbox"));
    assert_eq!(c.sink.checkpoint_topic, "app.checkpoints");

    // Each mistake named by its key, all at once.
    let bad = VALID.replace(
        "dead_letter_topic = \"app.dlq\"",
        "dead_letter_topic = \"app.dlq\"\ndelivery = \"exactly-once\"\n\
         transactional_id = \"x\"\ncheckpoint_topic = \"app.dlq\"",
    );
    let text = problem_text(load_str(&bad, &[]));
    for needle in [
        "sink.kafka.delivery",
        "\"at_least_once\" or \"exactly_once\"",
        "sink.kafka.transactional_id",
        "sink.kafka.checkpoint_topic",
        "must differ from sink.kafka.dead_letter_topic",
    ] {
        assert!(text.contains(needle), "{needle} missing from: {text}");
    }
    let blank = eos.replace("\"orders-outbox\"", "\"  \"");
    assert_eq!(
        problem_keys(load_str(&blank, &[])),
        ["sink.kafka.transactional_id"]
    );
    let bad_topic = eos.replace("\"app.checkpoints\"", "\"check points\"");
    assert_eq!(
        problem_keys(load_str(&bad_topic, &[])),
        ["sink.kafka.checkpoint_topic"]
    );
    // The transactional id is the relay's to set.
    let raw = eos.replace("\"linger.ms\" = 20", "\"transactional.id\" = \"mine\"");
    let text = problem_text(load_str(&raw, &[]));
    assert!(
        text.contains("sink.kafka.librdkafka.transactional.id"),
        "{text}"
    );
    assert!(text.contains("use sink.kafka.transactional_id"), "{text}");
}

#[test]
fn query_timeout_defaults_to_ten_seconds_and_is_bounded() {
    assert_eq!(
        load_str(VALID, &[]).unwrap().source.query_timeout,
        Duration::from_secs(10)
    );
    let with = |v: &str| {
        VALID.replace(
            "table = \"public.outbox\"\n",
            &format!("table = \"public.outbox\"\nquery_timeout = \"{v}\"\n"),
        )
    };
    assert_eq!(
        load_str(&with("30s"), &[]).unwrap().source.query_timeout,
        Duration::from_secs(30)
    );
    for bad in ["0s", "500ms", "11m", "soon"] {
        assert_eq!(
            problem_keys(load_str(&with(bad), &[])),
            ["source.query_timeout"],
            "{bad}"
        );
    }
    assert!(problem_text(load_str(&with("11m"), &[])).contains("between 1s and 10m"));
}
