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
    failover: bool,
    on_slot_lost: String,
    wal_sender_timeout: String,
    shards: u32,
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
            failover: false,
            on_slot_lost: "fail".into(),
            wal_sender_timeout: format!(
                "{}s",
                crate::source::deadlines::DEFAULT_WAL_SENDER_TIMEOUT.as_secs()
            ),
            shards: 1,
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
    /// Make the slot a failover slot (PostgreSQL 17+), so a promoted standby has it.
    pub failover: bool,
    pub on_slot_lost: OnSlotLost,
    /// The walsender's own `wal_sender_timeout`, set on the replication connection: a
    /// relay silent this long is cut off and its slot freed for a standby.
    pub wal_sender_timeout: Duration,
    /// Slots (and publications, and walsenders) the outbox is split over by a hash of the
    /// aggregate id; 1 is one slot under the configured names.
    pub shards: u32,
    /// Set on the configuration of one shard when `shards > 1` ([`super::shards`]): its
    /// slot and publication are named for it and carry its aggregates only.
    pub shard: Option<Shard>,
}

impl LogicalConfig {
    /// Every slot of the outbox this configuration belongs to: its own, or all its
    /// shards'.
    pub fn all_slots(&self) -> Vec<String> {
        match self.shard {
            Some(shard) => (0..shard.count)
                .map(|i| shard_name(self.base_slot(), i, shard.count))
                .collect(),
            None => self.shards().into_iter().map(|l| l.slot).collect(),
        }
    }

    /// The configured slot name (a shard's own has a suffix).
    pub fn base_slot(&self) -> &str {
        match self.shard {
            Some(shard) => {
                let suffix = format!("_{}_of_{}", shard.index, shard.count);
                self.slot.strip_suffix(&suffix).unwrap_or(&self.slot)
            }
            None => &self.slot,
        }
    }

    /// The configuration of each shard: itself when `shards = 1`.
    pub fn shards(&self) -> Vec<LogicalConfig> {
        if self.shards <= 1 {
            return vec![self.clone()];
        }
        (0..self.shards)
            .map(|index| LogicalConfig {
                slot: shard_name(&self.slot, index, self.shards),
                publication: shard_name(&self.publication, index, self.shards),
                shard: Some(Shard {
                    index,
                    count: self.shards,
                }),
                ..self.clone()
            })
            .collect()
    }
}

/// One shard of a sharded outbox: `index` of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

/// The most shards: each is a walsender process, a slot and a replication connection,
/// and PostgreSQL's defaults allow 10 of each.
pub const MAX_SHARDS: u32 = 16;

/// The name of shard `index` of `count` for a configured slot or publication name.
pub fn shard_name(base: &str, index: u32, count: u32) -> String {
    format!("{base}_{index}_of_{count}")
}

impl std::fmt::Display for OnSlotLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OnSlotLost::Fail => "fail",
            OnSlotLost::Recreate => "recreate",
        })
    }
}

/// What to do when the slot is invalidated or dropped under the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnSlotLost {
    /// Stop with an error that says what was lost and how to go on (the default): the
    /// operator decides, because events may be gone from the WAL.
    Fail,
    /// Drop the dead slot, make a new one and publish the rows still in the outbox again:
    /// duplicates, never lost table rows; logical decoding messages written meanwhile are
    /// gone with the WAL.
    Recreate,
}

impl RawLogicalConfig {
    pub fn validate(self, problems: &mut Problems) -> Option<LogicalConfig> {
        let mut ok = true;
        if !(1..=MAX_SHARDS).contains(&self.shards) {
            problems.push(
                "source.logical.shards",
                format!(
                    "must be between 1 and {MAX_SHARDS}, got {} (each shard is a replication \
                     slot, a walsender and a connection)",
                    self.shards
                ),
            );
            ok = false;
        }
        // The longest name a shard gets, checked like the configured one.
        let longest = |base: &str| {
            if self.shards > 1 {
                shard_name(base, self.shards - 1, self.shards)
            } else {
                base.to_owned()
            }
        };
        // PostgreSQL accepts only these characters in slot names, and we hold
        // publication names to the same rule so they never need quoting.
        for (key, value) in [
            ("source.logical.slot", &self.slot),
            ("source.logical.publication", &self.publication),
        ] {
            let valid = !value.is_empty()
                && longest(value).len() <= 63
                && value
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !valid {
                problems.push(
                    key,
                    if self.shards > 1 && value.len() <= 63 {
                        format!(
                            "{value:?} is too long for {} shards: shard names add a suffix \
                             ({:?}), and PostgreSQL allows 63 characters",
                            self.shards,
                            longest(value)
                        )
                    } else {
                        format!(
                            "{value:?} is not allowed: use 1 to 63 characters of a-z, 0-9 and _"
                        )
                    },
                );
                ok = false;
            }
        }
        if self.shards > 1 && !self.message_prefix.is_empty() {
            // Row filters do not apply to logical decoding messages.
            problems.push(
                "source.logical.message_prefix",
                format!(
                    "{:?} with shards = {}: logical decoding messages pass no row filter, so \
                     every shard's slot would receive each one and it would be published {} \
                     times; set message_prefix = \"\" (messages off) to shard a table outbox, \
                     or keep shards = 1 for messages",
                    self.message_prefix, self.shards, self.shards
                ),
            );
            ok = false;
        }
        let status_interval =
            problems.positive_duration("source.logical.status_interval", &self.status_interval);
        let wal_sender_timeout = problems.positive_duration(
            "source.logical.wal_sender_timeout",
            &self.wal_sender_timeout,
        );
        // The relay's status updates are what keep the walsender from timing out: two
        // must fit in the timeout, or a late one ends a healthy stream.
        if let (Some(status), Some(timeout)) = (status_interval, wal_sender_timeout) {
            if status * 2 > timeout {
                problems.push(
                    "source.logical.status_interval",
                    format!(
                        "{} is more than half of source.logical.wal_sender_timeout ({}): the \
                         server would end a healthy stream between two status updates; lower \
                         it, or raise the timeout",
                        humantime::format_duration(status),
                        humantime::format_duration(timeout)
                    ),
                );
                ok = false;
            }
        }
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
        let on_slot_lost = match self.on_slot_lost.as_str() {
            "fail" => Some(OnSlotLost::Fail),
            "recreate" => Some(OnSlotLost::Recreate),
            other => {
                problems.push(
                    "source.logical.on_slot_lost",
                    format!("{other:?} is not one of \"fail\" (the default) or \"recreate\""),
                );
                None
            }
        };
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
                failover: self.failover,
                wal_sender_timeout: wal_sender_timeout?,
                on_slot_lost: on_slot_lost?,
                shards: self.shards,
                shard: None,
            })
        } else {
            None
        }
    }
}

/// What an UPDATE or DELETE of an outbox row does (rows are immutable once written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnRowChange {
    /// A WARN naming the row (once per row) and the `outbox_relay_row_changes_total`
    /// counter; the change is not published.
    Warn,
    /// The new image (or, for a DELETE, the row's key) goes to the dead-letter topic with
    /// the reason.
    DeadLetter,
    /// The relay stops before acknowledging the change's transaction.
    Stop,
}

impl std::fmt::Display for OnRowChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OnRowChange::Warn => "warn",
            OnRowChange::DeadLetter => "dead_letter",
            OnRowChange::Stop => "stop",
        })
    }
}
