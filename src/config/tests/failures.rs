//! `sink.kafka.on_poison` and `source.logical.wal_sender_timeout`.

use std::time::Duration;

use super::{load_str, problem_text, VALID};

#[test]
fn on_poison_parks_by_default_and_names_a_bad_value() {
    use crate::sink::kafka::OnPoison;
    let sink = |extra: &str| {
        VALID.replace(
            "brokers = \"k1:9092,k2:9092\"",
            &format!("brokers = \"k1:9092,k2:9092\"\n{extra}"),
        )
    };
    assert_eq!(load_str(VALID, &[]).unwrap().sink.on_poison, OnPoison::Park);
    let c = load_str(&sink("on_poison = \"skip\""), &[]).unwrap();
    assert_eq!(c.sink.on_poison, OnPoison::Skip);
    for bad in ["drop", "", "Park"] {
        let text = problem_text(load_str(&sink(&format!("on_poison = \"{bad}\"")), &[]));
        assert!(
            text.contains("sink.kafka.on_poison") && text.contains("\"park\" or \"skip\""),
            "{bad}: {text}"
        );
    }
    let c = load_str(VALID, &[("OUTBOX_RELAY__SINK__KAFKA__ON_POISON", "skip")]).unwrap();
    assert_eq!(c.sink.on_poison, OnPoison::Skip);
}

#[test]
fn status_updates_must_fit_twice_in_the_wal_sender_timeout() {
    let logical = |lines: &str| format!("{VALID}\n[source.logical]\n{lines}\n");
    let c = load_str(&logical(""), &[]).unwrap();
    assert_eq!(c.source.logical.wal_sender_timeout, Duration::from_secs(20));
    let c = load_str(
        &logical("wal_sender_timeout = \"1m\"\nstatus_interval = \"30s\""),
        &[],
    )
    .unwrap();
    assert_eq!(c.source.logical.wal_sender_timeout, Duration::from_secs(60));
    for bad in ["status_interval = \"11s\"", "wal_sender_timeout = \"15s\""] {
        let text = problem_text(load_str(&logical(bad), &[]));
        assert!(
            text.contains("source.logical.status_interval")
                && text.contains("half of source.logical.wal_sender_timeout"),
            "{bad}: {text}"
        );
    }
    let text = problem_text(load_str(&logical("wal_sender_timeout = \"0s\""), &[]));
    assert!(text.contains("source.logical.wal_sender_timeout"), "{text}");
}
