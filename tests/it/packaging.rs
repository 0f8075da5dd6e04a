//! The deployment files can't run here (no Docker engine, no cluster), so they are
//! checked for what can go stale: every file they name exists, every configuration they
//! carry passes the relay's own validation, probes point at the relay's endpoints.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml_docs(path: &str) -> Vec<serde_yaml::Value> {
    let text = read(path);
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::Value::deserialize(d).unwrap_or_else(|e| panic!("{path}: {e}")))
        .collect()
}

fn str_map(v: &serde_yaml::Value) -> HashMap<String, String> {
    v.as_mapping()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.as_str().unwrap().to_owned(),
                        v.as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The test kit's Kafka version is the one scripts/install fetches.
#[test]
fn the_kafka_version_is_pinned_once() {
    let pom = std::fs::read_to_string(repo().join("scripts/kafka/pom.xml")).unwrap();
    let pinned = format!(
        "<kafka.version>{}</kafka.version>",
        outbox_relay::testkit::apache_kafka::VERSION
    );
    assert!(
        pom.contains(&pinned),
        "scripts/kafka/pom.xml does not pin {pinned}"
    );
}

#[test]
fn compose_services_ports_and_files_exist() {
    let doc = &yaml_docs("docker-compose.yml")[0];
    let services = doc["services"].as_mapping().unwrap();
    let names: Vec<&str> = services.keys().map(|k| k.as_str().unwrap()).collect();
    for needed in [
        "postgres",
        "kafka",
        "relay",
        "relay-polling",
        "writer",
        "prometheus",
        "registry",
    ] {
        assert!(names.contains(&needed), "service {needed} missing");
    }
    assert_eq!(
        doc["services"]["kafka"]["image"].as_str(),
        Some(
            format!(
                "apache/kafka:{}",
                outbox_relay::testkit::apache_kafka::VERSION
            )
            .as_str()
        ),
        "compose runs the Apache Kafka version the tests run"
    );
    assert_eq!(
        doc["services"]["kafka"]["environment"]["KAFKA_PROCESS_ROLES"].as_str(),
        Some("broker,controller")
    );
    let command: Vec<&str> = doc["services"]["postgres"]["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert!(command.contains(&"wal_level=logical"));
    assert_eq!(
        doc["services"]["relay"]["profiles"][0].as_str(),
        Some("logical")
    );
    assert_eq!(
        doc["services"]["relay-polling"]["profiles"][0].as_str(),
        Some("polling")
    );
    assert!(
        read(".env").contains("COMPOSE_PROFILES=logical"),
        "log mode by default"
    );

    for (name, service) in services {
        let name = name.as_str().unwrap();
        assert!(
            service.get("image").is_some() || service.get("build").is_some(),
            "{name} has neither image nor build"
        );
        if let Some(build) = service.get("build").and_then(|b| b.as_str()) {
            assert!(
                repo().join(build).join("Dockerfile").exists(),
                "{name}: no Dockerfile"
            );
        }
        for volume in service
            .get("volumes")
            .and_then(|v| v.as_sequence())
            .into_iter()
            .flatten()
        {
            let host = volume.as_str().unwrap().split(':').next().unwrap();
            assert!(repo().join(host).exists(), "{name}: mounts missing {host}");
        }
        for port in service
            .get("ports")
            .and_then(|v| v.as_sequence())
            .into_iter()
            .flatten()
        {
            let p = port
                .as_str()
                .unwrap_or_else(|| panic!("{name}: quote ports as strings"));
            let (h, c) = p.split_once(':').unwrap();
            assert!(
                h.parse::<u16>().is_ok() && c.parse::<u16>().is_ok(),
                "{name}: port {p}"
            );
        }
    }

    // The relays' configuration, with compose's environment overrides, is valid.
    assert_eq!(
        doc["services"]["registry"]["image"].as_str(),
        Some("apicurio/apicurio-registry:3.3.3"),
        "compose runs the registry version the tests run"
    );
    for (service, file) in [
        ("relay", "deploy/compose/relay-avro.toml"),
        ("relay-polling", "config/polling.toml"),
    ] {
        let env = str_map(&doc["services"][service]["environment"]);
        assert!(env.keys().all(|k| k.starts_with("OUTBOX_RELAY__")));
        let config = outbox_relay::config::load_with_env(&repo().join(file), env)
            .unwrap_or_else(|e| panic!("{service}: {e}"));
        assert_eq!(config.sink.brokers, "kafka:9092");
        assert_eq!(config.http.listen.port(), 9187);
        if service == "relay" {
            let contracts = config.sink.contracts.expect("orders are Avro-encoded");
            assert_eq!(contracts.entry_for("order", "OrderPlaced"), Some(0));
        }
    }
}

#[test]
fn dockerfile_copies_only_what_exists_and_runs_as_non_root() {
    let dockerfile = read("Dockerfile");
    for line in dockerfile
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for src in &parts[1..parts.len() - 1] {
            assert!(repo().join(src).exists(), "Dockerfile copies missing {src}");
        }
    }
    assert!(dockerfile.contains("USER 10001"));
    assert!(dockerfile.contains("HEALTHCHECK") && dockerfile.contains("/healthz"));
    assert!(dockerfile.contains(r#"RUN ["outbox-relay", "--version"]"#));
}

#[test]
fn kubernetes_manifests_carry_a_valid_config_and_probe_the_relay() {
    let docs = yaml_docs("deploy/k8s/sidecar.yaml");
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["ConfigMap", "Secret", "Deployment"]);
    let toml = docs[0]["data"]["relay.toml"].as_str().unwrap();
    let secret_env = str_map(&docs[1]["stringData"]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, toml).unwrap();
    let config =
        outbox_relay::config::load_with_env(&path, secret_env).unwrap_or_else(|e| panic!("{e}"));
    let containers = docs[2]["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .unwrap();
    assert_eq!(containers.len(), 2, "application + relay in one pod");
    let relay = &containers[1];
    assert_eq!(
        relay["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    assert_eq!(
        relay["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    assert_eq!(
        relay["ports"][0]["containerPort"].as_u64(),
        Some(u64::from(config.http.listen.port()))
    );
    assert!(relay["resources"]["requests"]["memory"].as_str().is_some());
    let grace = docs[2]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    assert!(
        config.relay.shutdown_grace.as_secs() < grace,
        "the relay drains before the kubelet kills it"
    );

    let standby = yaml_docs("deploy/k8s/standby.yaml");
    assert_eq!(standby[0]["spec"]["replicas"].as_u64(), Some(2));
    assert_eq!(standby[1]["kind"].as_str(), Some("PodDisruptionBudget"));
}

#[test]
fn the_systemd_unit_is_hardened_and_runs_the_relay() {
    let unit = read("deploy/systemd/outbox-relay.service");
    for line in [
        "ExecStart=/usr/local/bin/outbox-relay run --config /etc/outbox-relay/relay.toml",
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "Restart=on-failure",
        // A configuration error and a lost slot (on_slot_lost = "fail"): no restart fixes them.
        &format!(
            "RestartPreventExitStatus=2 {}",
            outbox_relay::cli::SLOT_LOST_EXIT_CODE
        ),
        "Environment=OUTBOX_RELAY__SOURCE__PASSWORD_FILE=%d/pg-password",
    ] {
        assert!(unit.lines().any(|l| l == line), "unit lacks {line}");
    }
    assert!(Path::new(&repo().join("deploy/compose/writer.sh")).exists());
}

/// The relay is built with librdkafka's busy-loop fix (vendor/README.md): the build uses
/// the vendored crate, and the vendored source carries every line the patch adds. An
/// update of rdkafka-sys that forgets to re-apply it fails here, not in production.
#[test]
fn librdkafka_is_built_from_the_vendored_copy_with_its_fix() {
    let manifest = read("Cargo.toml");
    assert!(
        manifest.contains("[patch.crates-io]")
            && manifest.contains(r#"rdkafka-sys = { path = "vendor/rdkafka-sys" }"#),
        "Cargo.toml no longer patches rdkafka-sys with vendor/rdkafka-sys"
    );
    let lock = read("Cargo.lock");
    let entry = lock
        .split("[[package]]")
        .find(|p| p.contains("name = \"rdkafka-sys\""))
        .expect("rdkafka-sys in Cargo.lock");
    assert!(
        !entry.contains("source = "),
        "Cargo.lock takes rdkafka-sys from a registry: {entry}"
    );
    let patch = read("vendor/idempotent-window-spin.patch");
    let source = read("vendor/rdkafka-sys/librdkafka/src/rdkafka_broker.c");
    let added: Vec<&str> = patch
        .lines()
        .filter(|l| l.starts_with('+') && !l.starts_with("+++"))
        .map(|l| l[1..].trim())
        .filter(|l| !l.is_empty())
        .collect();
    assert!(added.len() >= 5, "the patch adds lines: {added:?}");
    for line in added {
        assert!(
            source.lines().any(|s| s.trim() == line),
            "vendor/rdkafka-sys lacks the patch's line {line:?}: re-apply \
             vendor/idempotent-window-spin.patch (vendor/README.md)"
        );
    }
}
