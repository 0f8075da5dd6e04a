//! `[source.polling]`: how often and how much the polling publisher reads.

use std::num::NonZeroUsize;
use std::time::Duration;

use serde::Deserialize;

use crate::config::Problems;

const DEFAULT_INTERVAL: &str = "100ms";
const DEFAULT_BATCH_SIZE: usize = 1000;
const MAX_BATCH_SIZE: usize = 100_000;

#[derive(Deserialize)]
#[serde(default)]
pub struct RawPollingConfig {
    interval: String,
    batch_size: usize,
    /// The old name of `source.standby_retry`, still accepted.
    pub(crate) standby_retry: Option<String>,
}

impl Default for RawPollingConfig {
    fn default() -> Self {
        RawPollingConfig {
            interval: DEFAULT_INTERVAL.into(),
            batch_size: DEFAULT_BATCH_SIZE,
            standby_retry: None,
        }
    }
}

/// Validated `[source.polling]`.
#[derive(Debug, Clone)]
pub struct PollingConfig {
    /// Pause after a poll that found nothing to publish.
    pub interval: Duration,
    /// Rows read, published and deleted per round trip.
    pub batch_size: NonZeroUsize,
}

impl RawPollingConfig {
    pub fn validate(self, problems: &mut Problems) -> Option<PollingConfig> {
        let interval = problems.positive_duration("source.polling.interval", &self.interval);
        let batch_size = match NonZeroUsize::new(self.batch_size) {
            Some(n) if n.get() <= MAX_BATCH_SIZE => Some(n),
            _ => {
                problems.push(
                    "source.polling.batch_size",
                    format!(
                        "must be between 1 and {MAX_BATCH_SIZE}, got {}",
                        self.batch_size
                    ),
                );
                None
            }
        };
        Some(PollingConfig {
            interval: interval?,
            batch_size: batch_size?,
        })
    }
}
