//! `[relay]`: settings of the loop between source and sink.

use std::time::Duration;

use serde::Deserialize;

use crate::config::Problems;

#[derive(Deserialize)]
#[serde(default)]
pub struct RawRelayConfig {
    shutdown_grace: String,
    max_backoff: String,
    stall_timeout: String,
}

impl Default for RawRelayConfig {
    fn default() -> Self {
        RawRelayConfig {
            shutdown_grace: "30s".into(),
            max_backoff: "30s".into(),
            stall_timeout: "60s".into(),
        }
    }
}

/// Validated `[relay]`.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// After SIGTERM, how long in-flight events may take to be acknowledged.
    pub shutdown_grace: Duration,
    /// Ceiling of the exponential backoff between retries (reconnects, failed batches).
    pub max_backoff: Duration,
    /// A batch unacknowledged this long while the brokers answer metadata requests
    /// means a wedged producer: it is replaced.
    pub stall_timeout: Duration,
}

impl RawRelayConfig {
    pub fn validate(self, problems: &mut Problems) -> Option<RelayConfig> {
        let shutdown_grace = problems.duration("relay.shutdown_grace", &self.shutdown_grace);
        let max_backoff = problems.positive_duration("relay.max_backoff", &self.max_backoff);
        let stall_timeout = problems.positive_duration("relay.stall_timeout", &self.stall_timeout);
        Some(RelayConfig {
            shutdown_grace: shutdown_grace?,
            max_backoff: max_backoff?,
            stall_timeout: stall_timeout?,
        })
    }
}
