//! `[source.logical]`: slot, publication and acknowledgement cadence of the log tailer.

use std::time::Duration;

use serde::Deserialize;

use crate::config::Problems;

#[derive(Deserialize)]
#[serde(default)]
pub struct RawLogicalConfig {
    slot: String,
    publication: String,
    message_prefix: String,
    create_if_missing: bool,
    status_interval: String,
    heartbeat_interval: String,
    cleanup: bool,
    batch_size: usize,
}

impl Default for RawLogicalConfig {
    fn default() -> Self {
        RawLogicalConfig {
            slot: "outbox_relay".into(),
            publication: "outbox_relay".into(),
            message_prefix: "outbox".into(),
            create_if_missing: true,
            status_interval: "10s".into(),
            heartbeat_interval: "10s".into(),
            cleanup: false,
            batch_size: 1000,
        }
    }
}

/// Validated `[source.logical]`.
#[derive(Debug, Clone)]
pub struct LogicalConfig {
    pub slot: String,
    pub publication: String,
    pub message_prefix: String,
    pub create_if_missing: bool,
    pub status_interval: Duration,
    /// `None` when heartbeats are off (`"0s"`).
    pub heartbeat_interval: Option<Duration>,
    pub cleanup: bool,
    /// Events handed to Kafka per round.
    pub batch_size: std::num::NonZeroUsize,
}

impl RawLogicalConfig {
    pub fn validate(self, problems: &mut Problems) -> Option<LogicalConfig> {
        let mut ok = true;
        // PostgreSQL accepts only these characters in slot names, and we hold
        // publication names to the same rule so they never need quoting.
        for (key, value) in [
            ("source.logical.slot", &self.slot),
            ("source.logical.publication", &self.publication),
        ] {
            let valid = !value.is_empty()
                && value.len() <= 63
                && value
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !valid {
                problems.push(
                    key,
                    format!("{value:?} is not allowed: use 1 to 63 characters of a-z, 0-9 and _"),
                );
                ok = false;
            }
        }
        if self.message_prefix.is_empty() {
            problems.push(
                "source.logical.message_prefix",
                "must not be empty (the default is \"outbox\")",
            );
            ok = false;
        }
        let status_interval =
            problems.positive_duration("source.logical.status_interval", &self.status_interval);
        let heartbeat = problems.duration(
            "source.logical.heartbeat_interval",
            &self.heartbeat_interval,
        );
        let batch_size =
            std::num::NonZeroUsize::new(self.batch_size).filter(|n| n.get() <= 100_000);
        if batch_size.is_none() {
            problems.push(
                "source.logical.batch_size",
                format!("must be between 1 and 100000, got {}", self.batch_size),
            );
            ok = false;
        }
        if ok {
            Some(LogicalConfig {
                slot: self.slot,
                publication: self.publication,
                message_prefix: self.message_prefix,
                create_if_missing: self.create_if_missing,
                status_interval: status_interval?,
                heartbeat_interval: heartbeat.filter(|d| !d.is_zero()),
                cleanup: self.cleanup,
                batch_size: batch_size?,
            })
        } else {
            None
        }
    }
}
