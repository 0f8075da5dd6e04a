//! The shipped monitoring material refers only to metrics the relay exports, the rules
//! pass `promtool`, and the guide's monitoring page documents every metric and alert.

use std::path::Path;
use std::process::Command;

use outbox_relay::metrics::NAMES;

fn repo(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

/// Every `outbox_relay_*` token in `text`, without histogram suffixes.
fn metric_names(text: &str) -> Vec<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|t| t.starts_with("outbox_relay_"))
        .map(|t| {
            ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| t.strip_suffix(s).filter(|base| NAMES.contains(base)))
                .unwrap_or(t)
                .to_owned()
        })
        .collect()
}

#[test]
fn dashboard_and_alerts_use_only_exported_metrics() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&repo("deploy/grafana/outbox-relay.json")).unwrap();
    let mut exprs = String::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            exprs.push_str(target["expr"].as_str().unwrap());
            exprs.push('\n');
        }
    }
    let rules = repo("deploy/prometheus/alerts.yml");
    for (file, text) in [
        ("dashboard", exprs.as_str()),
        ("alerts.yml", rules.as_str()),
    ] {
        let names = metric_names(text);
        assert!(!names.is_empty(), "{file} uses no metric");
        for name in names {
            assert!(
                NAMES.contains(&name.as_str()),
                "{file} uses unknown metric {name}"
            );
        }
    }
    for needed in ["throughput", "latency", "lag", "dead", "ready"] {
        assert!(
            dashboard["panels"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["title"].as_str().unwrap().to_lowercase().contains(needed)),
            "dashboard has no {needed} panel"
        );
    }
}

#[test]
fn alert_rules_pass_promtool() {
    if Command::new("promtool").arg("--version").output().is_err() {
        eprintln!("promtool not installed (scripts/install adds it): rules not checked");
        return;
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/alerts.yml");
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_monitoring_page_documents_every_metric_and_no_other() {
    let page = repo("docs/monitoring.md");
    for name in NAMES {
        assert!(
            page.contains(&format!("| `{name}` |")),
            "docs/monitoring.md does not document {name} in its metrics table"
        );
    }
    for name in metric_names(&page) {
        assert!(
            NAMES.contains(&name.as_str()),
            "docs/monitoring.md names {name}, which the relay does not export"
        );
    }
}

#[test]
fn the_monitoring_page_has_a_runbook_for_every_alert() {
    let page = repo("docs/monitoring.md");
    let rules = repo("deploy/prometheus/alerts.yml");
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 10, "only {} alerts found", alerts.len());
    for alert in &alerts {
        assert!(
            page.contains(&format!("| `{alert}` |")),
            "docs/monitoring.md has no row for the alert {alert}"
        );
    }
    for named in page.split('`').filter(|t| t.starts_with("OutboxRelay")) {
        assert!(
            alerts.contains(&named),
            "docs/monitoring.md names the alert {named}, which alerts.yml does not define"
        );
    }
}

#[test]
fn every_shipped_example_config_is_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            outbox_relay::config::load_with_env(&path, Default::default())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            checked += 1;
        }
    }
    assert!(checked >= 4, "only {checked} example configs found");
}
