//! Environment overrides: `OUTBOX_RELAY__SECTION__KEY` variables over the file.

use super::*;

/// The one problem of `VALID` with the variables `env`.
fn env_problem(env: &[(&str, &str)]) -> (Problem, String) {
    match load_str(VALID, env) {
        Ok(_) => panic!("{env:?} accepted"),
        Err(e) => {
            let problems = e.problems();
            assert_eq!(problems.len(), 1, "{e}");
            (problems[0].clone(), e.to_string())
        }
    }
}

#[test]
fn an_invalid_override_names_the_variable_and_what_its_key_takes_in_words() {
    for (var, value, key, says) in [
        (
            "OUTBOX_RELAY__SOURCE__POLLING__BATCH_SIZE",
            "abc",
            "source.polling.batch_size",
            "must be a positive integer",
        ),
        (
            "OUTBOX_RELAY__SOURCE__POLLING__BATCH_SIZE",
            "-5",
            "source.polling.batch_size",
            "must be a positive integer",
        ),
        (
            "OUTBOX_RELAY__SOURCE__POLLING__BATCH_SIZE",
            "2.5",
            "source.polling.batch_size",
            "must be a positive integer",
        ),
        (
            "OUTBOX_RELAY__SOURCE__POLLING__BATCH_SIZE",
            "0",
            "source.polling.batch_size",
            "must be between 1 and 100000, got 0",
        ),
        (
            "OUTBOX_RELAY__SOURCE__MAX_BATCH_BYTES",
            "8MiB",
            "source.max_batch_bytes",
            "must be a positive integer",
        ),
        (
            "OUTBOX_RELAY__SOURCE__LOGICAL__CREATE_IF_MISSING",
            "yes",
            "source.logical.create_if_missing",
            "must be true or false",
        ),
        (
            "OUTBOX_RELAY__SINK__KAFKA__ROW_TOPICS",
            "app.*",
            "sink.kafka.row_topics",
            "must be a list of strings (set it in the file: a variable holds a single value)",
        ),
        (
            "OUTBOX_RELAY__SOURCE__POLLING",
            "fast",
            "source.polling",
            "must be a table of keys",
        ),
        (
            "OUTBOX_RELAY__SOURCE__POLLING__INTERVAL",
            "fast",
            "source.polling.interval",
            "invalid duration \"fast\"",
        ),
        ("OUTBOX_RELAY__HTTP__LISTEN", "9187", "http.listen", ""),
    ] {
        let (problem, text) = env_problem(&[(var, value)]);
        assert_eq!(problem.key, key, "{text}");
        assert_eq!(problem.from_env, Some(format!("{var}={value:?}")), "{text}");
        assert!(problem.message.contains(says), "{says:?} not in {text}");
        assert!(
            text.contains(&format!("  - {var}={value:?}: {key}: ")),
            "{var} not named in {text}"
        );
        assert!(
            text.contains("with its OUTBOX_RELAY__ environment overrides"),
            "{text}"
        );
        for serde_word in ["usize", "u64", "invalid type", "invalid value"] {
            assert!(!text.contains(serde_word), "{serde_word:?} in {text}");
        }
    }
}

#[test]
fn every_bad_override_is_reported_at_once() {
    let vars = [
        ("OUTBOX_RELAY__SOURCE__POLLING__BATCH_SIZE", "abc"),
        ("OUTBOX_RELAY__SOURCE__LOGICAL__FAILOVER", "maybe"),
        ("OUTBOX_RELAY__SOURCE__POLLINGX", "1"),
        ("OUTBOX_RELAY__RELAY__SHUTDOWN_GRACE", "soon"),
    ];
    let err = match load_str(VALID, &vars) {
        Ok(_) => panic!("accepted"),
        Err(e) => e,
    };
    let mut named: Vec<&str> = err
        .problems()
        .iter()
        .map(|p| {
            let var = p.from_env.as_deref().unwrap_or_else(|| panic!("{err}"));
            var.split('=').next().unwrap()
        })
        .collect();
    named.sort();
    let mut expected: Vec<&str> = vars.iter().map(|(v, _)| *v).collect();
    expected.sort();
    assert_eq!(named, expected, "{err}");
}

#[test]
fn an_override_that_reads_as_a_number_or_boolean_is_text_where_the_key_takes_text() {
    let c = load_str(
        VALID,
        &[
            ("OUTBOX_RELAY__SOURCE__TABLE", "2024"),
            ("OUTBOX_RELAY__SOURCE__LOGICAL__SLOT", "123"),
            ("OUTBOX_RELAY__SINK__KAFKA__DEAD_LETTER_TOPIC", "true"),
            ("OUTBOX_RELAY__SOURCE__LOGICAL__MESSAGE_PREFIX", "1.5"),
            // And typed where the key is typed.
            ("OUTBOX_RELAY__SOURCE__LOGICAL__CREATE_IF_MISSING", "FALSE"),
            ("OUTBOX_RELAY__SOURCE__LOGICAL__BATCH_SIZE", "77"),
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.source.table.unwrap().to_string(), "public.2024");
    assert_eq!(c.source.logical.slot, "123");
    assert_eq!(c.sink.dead_letter_topic, "true");
    assert_eq!(c.source.logical.message_prefix, "1.5");
    assert!(!c.source.logical.create_if_missing);
    assert_eq!(c.source.logical.batch_size.get(), 77);
}

#[test]
fn an_override_that_names_no_key_is_an_error_naming_the_variable() {
    for (var, key) in [
        (
            "OUTBOX_RELAY__SOURCE__POLLING__BATCHSIZE",
            "source.polling.batchsize",
        ),
        ("OUTBOX_RELAY__SOURCE__DATABASEURL", "source.databaseurl"),
        ("OUTBOX_RELAY__METRICS__PORT", "metrics.port"),
        (
            "OUTBOX_RELAY__SINK__KAFKA__LINGER_MS",
            "sink.kafka.linger_ms",
        ),
        ("OUTBOX_RELAY__SOURCE____TABLE", "source..table"),
        ("OUTBOX_RELAY__", ""),
    ] {
        let (problem, text) = env_problem(&[(var, "5")]);
        assert_eq!(problem.key, key, "{text}");
        assert!(
            problem
                .from_env
                .as_deref()
                .is_some_and(|v| v.starts_with(var)),
            "{text}"
        );
        assert!(
            problem.message.starts_with("names no configuration key"),
            "{text}"
        );
        assert!(text.contains(&format!("  - {var}")), "{text}");
    }
    // Other variables are none of the relay's business.
    load_str(
        VALID,
        &[
            ("OUTBOX_RELAY_SOURCE__TABLE", "x"),
            ("OUTBOX_RELAY_LONG", "1"),
            ("PATH", "/bin"),
        ],
    )
    .unwrap();
}

#[test]
fn an_override_of_a_secret_key_is_named_without_its_value() {
    let url = "postgres://relay:s3cret@db.internal:notaport/app";
    let (problem, text) = env_problem(&[("OUTBOX_RELAY__SOURCE__DATABASE_URL", url)]);
    assert_eq!(problem.key, "source.database_url");
    assert_eq!(
        problem.from_env.as_deref(),
        Some("OUTBOX_RELAY__SOURCE__DATABASE_URL")
    );
    assert!(!text.contains("s3cret"), "{text}");
    let (_, text) = env_problem(&[("OUTBOX_RELAY__SOURCE__PASSWORD_FILE", "/nonexistent/pw")]);
    assert!(
        text.contains("  - OUTBOX_RELAY__SOURCE__PASSWORD_FILE: "),
        "{text}"
    );
    assert!(
        !text.contains("OUTBOX_RELAY__SOURCE__PASSWORD_FILE=\""),
        "{text}"
    );
}

#[test]
fn environment_overrides_win_over_the_file() {
    let c = load_str(
        VALID,
        &[
            (
                "OUTBOX_RELAY__SOURCE__DATABASE_URL",
                "postgres://other@env-host:6000/envdb",
            ),
            ("OUTBOX_RELAY__SOURCE__POLLING__BATCH_SIZE", "42"),
            ("OUTBOX_RELAY__SINK__KAFKA__BROKERS", "env-broker:9092"),
            ("UNRELATED__SINK__KAFKA__BROKERS", "ignored:1"),
        ],
    )
    .unwrap();
    assert_eq!(c.source.redacted_url(), "other@env-host:6000/envdb");
    assert_eq!(c.source.polling.batch_size.get(), 42);
    assert_eq!(c.sink.brokers, "env-broker:9092");
}

#[test]
fn environment_values_are_validated_like_file_values() {
    let keys = problem_keys(load_str(
        VALID,
        &[("OUTBOX_RELAY__SOURCE__POLLING__INTERVAL", "fast")],
    ));
    assert_eq!(keys, ["source.polling.interval"]);
}
