//! The compatibility gate and the registry as a dependency: an incompatible schema stops
//! `run` and `check` (exit 2) and `schemas check` says so (exit 1); `register = false`
//! needs the schema registered first; a registry down at start holds every event back;
//! a schema evolved compatibly while the relay was stopped is registered at the next
//! start, and both versions decode.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use crate::schemas::{decode_independently, entry, registry_toml, shared_registry, write_file};
use crate::support::{cli, insert_event, load_toml, run_error, spawn_relay, Env, RunningRelay};
use outbox_relay::testkit::kafka::Consumed;
use outbox_relay::testkit::registry;

const V1: &str = r#"{"type": "record", "name": "Order", "namespace": "shop",
  "fields": [{"name": "id", "type": "string"}, {"name": "qty", "type": "int"}]}"#;

/// V1 plus an optional field with a default: what a backward-compatible change looks like.
const V2_COMPATIBLE: &str = r#"{"type": "record", "name": "Order", "namespace": "shop",
  "fields": [{"name": "id", "type": "string"}, {"name": "qty", "type": "int"},
             {"name": "coupon", "type": ["null", "string"], "default": null}]}"#;

/// V1 with `qty` retyped: readers of V1 data break.
const V2_BREAKING: &str = r#"{"type": "record", "name": "Order", "namespace": "shop",
  "fields": [{"name": "id", "type": "string"}, {"name": "qty", "type": "string"}]}"#;

/// A plain HTTP client for the registry's own API (reqwest is built without a default
/// crypto provider: the relay hands it one).
fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

async fn set_compatibility(url: &str, subject: &str, level: &str) {
    let answer = http()
        .put(format!("{url}/config/{subject}"))
        .header("Content-Type", "application/json")
        .body(json!({ "compatibility": level }).to_string())
        .send()
        .await
        .unwrap();
    assert!(answer.status().is_success(), "{:?}", answer.text().await);
}

async fn register(url: &str, subject: &str, schema: &str) -> u64 {
    let answer: Value = http()
        .post(format!("{url}/subjects/{subject}/versions"))
        .header("Content-Type", "application/json")
        .body(json!({ "schema": schema }).to_string())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    answer["id"].as_u64().unwrap_or_else(|| panic!("{answer}"))
}

async fn versions(url: &str, subject: &str) -> Value {
    http()
        .get(format!("{url}/subjects/{subject}/versions"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// What most tests here start with: an outbox, a registry, `order.avsc` (V1) and a relay
/// configuration encoding `order` events with it.
struct Gate {
    env: Env,
    registry: crate::schemas::TestRegistry,
    /// The subject of `order` events: `<prefix>outbox.order-value`.
    subject: String,
    dir: tempfile::TempDir,
    toml: String,
}

impl Gate {
    async fn start(mode: &str, register: bool) -> Gate {
        let env = Env::start().await;
        let registry = shared_registry();
        let subject = format!("{}outbox.order-value", env.ns);
        let dir = tempfile::tempdir().unwrap();
        let file = write_file(dir.path(), "order.avsc", V1);
        let toml = env.config_toml(
            mode,
            "",
            &registry_toml(&registry.url, register, &entry("order", "avro", &file, "")),
        );
        env.create_topics(&["outbox.order"], 1).await;
        Gate {
            env,
            registry,
            subject,
            dir,
            toml,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incompatible_schema_stops_run_and_check_and_schemas_check_names_the_break() {
    let Gate {
        env,
        registry,
        subject,
        dir,
        toml,
    } = Gate::start("polling", true).await;
    let config = write_file(dir.path(), "relay.toml", &toml);
    let config = config.to_str().unwrap();

    // Before the first run: compatible, not registered yet; `check` registers nothing.
    let (code, out) = cli(&["schemas", "check", "--config", config]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("has no version yet"), "{out}");
    let (code, out) = cli(&["check", "--config", config]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("run registers it at start"), "{out}");
    assert_eq!(versions(&registry.url, &subject).await["error_code"], 40401);

    // The first run registers V1 and publishes with it.
    let db = env.client().await;
    insert_event(&db, "order", "o-1", "Placed", r#"{"id": "o-1", "qty": 1}"#).await;
    let relay = RunningRelay::start(load_toml(&toml));
    assert_eq!(env.consume(&["outbox.order"], 1, 30).await.len(), 1);
    relay.stop().await;
    set_compatibility(&registry.url, &subject, "BACKWARD").await;

    // A breaking change: every command refuses it, naming the subject and the file.
    write_file(dir.path(), "order.avsc", V2_BREAKING);
    let (code, out) = cli(&["schemas", "check", "--config", config]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("BREAK") && out.contains(&subject), "{out}");
    let (code, out) = cli(&["check", "--config", config]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains(&subject) && out.contains("order.avsc"),
        "{out}"
    );
    insert_event(
        &db,
        "order",
        "o-2",
        "Placed",
        r#"{"id": "o-2", "qty": "2"}"#,
    )
    .await;
    let mut relay = spawn_relay(Path::new(config));
    let mut code = None;
    for _ in 0..200 {
        code = relay.exit_code();
        if code.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(code, Some(2), "run stops with a configuration error");
    assert_eq!(env.outbox_count().await, 1, "nothing was published");
    let latest = versions(&registry.url, &subject).await;
    assert_eq!(latest, json!([1]), "nothing was registered");

    // Sample payloads against the local file: what an application's CI runs.
    let good = write_file(dir.path(), "good.json", r#"{"id": "o-9", "qty": "nine"}"#);
    let bad = write_file(dir.path(), "bad.json", r#"{"id": "o-9", "qty": 9, "x": 1}"#);
    let validate = |files: &[&Path]| {
        let mut args = vec![
            "schemas",
            "validate",
            "--config",
            config,
            "--aggregate-type",
            "order",
        ];
        args.extend(files.iter().map(|f| f.to_str().unwrap()));
        cli(&args)
    };
    let (code, out) = validate(&[&good]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = validate(&[&good, &bad]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("$.qty") && out.contains("$.x"), "{out}");
    let (code, out) = cli(&[
        "schemas",
        "validate",
        "--config",
        config,
        "--aggregate-type",
        "nope",
        good.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("no [[sink.kafka.schemas]] entry applies to nope"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_register_false_the_schema_must_be_registered_first() {
    // `_dir` keeps the schema file until the test ends.
    let Gate {
        env,
        registry,
        subject,
        toml,
        dir: _dir,
    } = Gate::start("polling", false).await;
    let db = env.client().await;
    insert_event(&db, "order", "o-1", "Placed", r#"{"id": "o-1", "qty": 1}"#).await;

    let error = run_error(load_toml(&toml)).await;
    assert!(
        error.contains(&subject) && error.contains("register = false"),
        "{error}"
    );
    assert_eq!(env.outbox_count().await, 1);

    let id = register(&registry.url, &subject, V1).await;
    let relay = RunningRelay::start(load_toml(&toml));
    let got = env.consume(&["outbox.order"], 1, 30).await;
    relay.stop().await;
    let decoded = decode_independently(&registry.url, &got.iter().collect::<Vec<_>>());
    assert_eq!(decoded[0]["schema_id"], id);
    assert_eq!(decoded[0]["value"], json!({"id": "o-1", "qty": 1}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_down_at_start_holds_every_event_back_until_it_answers() {
    let env = Env::start().await;
    let port = outbox_relay::testkit::free_port().unwrap();
    let url = registry::url_on(port);
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(dir.path(), "order.avsc", V1);
    let toml = env.config_toml(
        "logical",
        "",
        &registry_toml(&url, true, &entry("order", "avro", &file, "")),
    );
    env.create_topics(&["outbox.order", "outbox.customer"], 1)
        .await;
    let db = env.client().await;
    insert_event(&db, "order", "o-1", "Placed", r#"{"id": "o-1", "qty": 1}"#).await;
    insert_event(&db, "customer", "c-1", "Joined", r#"{"any": "thing"}"#).await;

    let (relay, telemetry) = crate::support::start_with_telemetry(&toml);
    tokio::time::sleep(Duration::from_secs(3)).await;
    match telemetry.health.readiness() {
        outbox_relay::metrics::Readiness::NotReady(why) => {
            assert!(why.starts_with("schema registry:"), "{why}")
        }
        other => panic!("ready without the registry: {other:?}"),
    }
    assert_eq!(env.outbox_count().await, 2, "nothing was published");
    let slots: i64 = db
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "the relay did not even start reading");

    let registry = registry::Registry::start_on(port).expect("start the registry");
    let orders = env.consume(&["outbox.order"], 1, 60).await;
    let customers = env.consume(&["outbox.customer"], 1, 30).await;
    relay.stop().await;
    assert_eq!(customers.len(), 1);
    let decoded = decode_independently(&registry.url(), &orders.iter().collect::<Vec<_>>());
    assert_eq!(decoded[0]["value"], json!({"id": "o-1", "qty": 1}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_evolved_compatibly_while_stopped_is_registered_at_the_next_start() {
    let Gate {
        env,
        registry,
        subject,
        dir,
        toml,
    } = Gate::start("logical", true).await;
    let db = env.client().await;

    insert_event(&db, "order", "o-1", "Placed", r#"{"id": "o-1", "qty": 1}"#).await;
    let relay = RunningRelay::start(load_toml(&toml));
    assert_eq!(env.consume(&["outbox.order"], 1, 30).await.len(), 1);
    relay.stop().await;
    set_compatibility(&registry.url, &subject, "BACKWARD").await;

    write_file(dir.path(), "order.avsc", V2_COMPATIBLE);
    insert_event(
        &db,
        "order",
        "o-1",
        "Couponed",
        r#"{"id": "o-1", "qty": 1, "coupon": "XMAS"}"#,
    )
    .await;
    insert_event(&db, "order", "o-1", "Plain", r#"{"id": "o-1", "qty": 2}"#).await;
    let relay = RunningRelay::start(load_toml(&toml));
    let got: Vec<Consumed> = env.consume(&["outbox.order"], 3, 30).await;
    relay.stop().await;

    assert_eq!(versions(&registry.url, &subject).await, json!([1, 2]));
    let decoded = decode_independently(&registry.url, &got.iter().collect::<Vec<_>>());
    assert_ne!(
        decoded[0]["schema_id"], decoded[1]["schema_id"],
        "a new id for V2"
    );
    assert_eq!(decoded[1]["schema_id"], decoded[2]["schema_id"]);
    assert_eq!(decoded[0]["value"], json!({"id": "o-1", "qty": 1}));
    assert_eq!(
        decoded[1]["value"],
        json!({"id": "o-1", "qty": 1, "coupon": "XMAS"})
    );
    assert_eq!(
        decoded[2]["value"],
        json!({"id": "o-1", "qty": 2, "coupon": null}),
        "the default"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_first_met_at_run_time_is_resolved_then_and_its_events_encoded() {
    let env = Env::start().await;
    let registry = shared_registry();
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(
        dir.path(),
        "order.json",
        r#"{"$schema": "http://json-schema.org/draft-07/schema#", "title": "shop.Order",
            "type": "object", "required": ["id"]}"#,
    );
    // The topic names the event type, and the entry does not: no subject is known at
    // start, each is met with its first event.
    let toml = env.with_topic(
        &env.config_toml(
            "logical",
            "",
            &registry_toml(
                &registry.url,
                true,
                &entry("order", "json_schema", &file, ""),
            ),
        ),
        "outbox.{aggregate_type}.{event_type}",
    );
    let config = write_file(dir.path(), "relay.toml", &toml);
    let (code, out) = cli(&["schemas", "check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("skipped") && out.contains("resolved when the first event is"),
        "{out}"
    );
    env.create_topics(&["outbox.order.Placed", "outbox.order.Paid"], 1)
        .await;
    let db = env.client().await;

    insert_event(&db, "order", "o-1", "Placed", r#"{"id": "o-1"}"#).await;
    let relay = RunningRelay::start(load_toml(&toml));
    let placed = env.consume(&["outbox.order.Placed"], 1, 30).await;
    insert_event(
        &db,
        "order",
        "o-1",
        "Paid",
        r#"{"id": "o-1", "paid": true}"#,
    )
    .await;
    let paid = env.consume(&["outbox.order.Paid"], 1, 30).await;
    relay.stop().await;

    for (topic, got) in [("Placed", &placed), ("Paid", &paid)] {
        let subject = format!("{}outbox.order.{topic}-value", env.ns);
        assert_eq!(
            versions(&registry.url, &subject).await,
            json!([1]),
            "{subject}"
        );
        let decoded = decode_independently(&registry.url, &got.iter().collect::<Vec<_>>());
        assert_eq!(decoded[0]["type"], "JSON", "{topic}");
    }
    let decoded = decode_independently(&registry.url, &paid.iter().collect::<Vec<_>>());
    assert_eq!(decoded[0]["value"], json!({"id": "o-1", "paid": true}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_the_registry_calls_invalid_stops_run_naming_it() {
    let env = Env::start().await;
    let registry = shared_registry();
    let dir = tempfile::tempdir().unwrap();
    // Valid JSON Schema to the relay, but Apicurio cannot tell its type without `$schema`.
    let file = write_file(dir.path(), "order.json", r#"{"type": "object"}"#);
    let toml = env.config_toml(
        "polling",
        "",
        &registry_toml(
            &registry.url,
            true,
            &entry("order", "json_schema", &file, ""),
        ),
    );
    let error = run_error(load_toml(&toml)).await;
    assert!(
        error.contains("as an invalid schema")
            && error.contains(&format!("{}outbox.order-value", env.ns))
            && error.contains("order.json"),
        "{error}"
    );
}
