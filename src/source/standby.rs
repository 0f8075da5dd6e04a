//! One relay per outbox: the loop every standby runs until it leads
//! ([design §6](../../docs/design.md#6-leadership-and-standbys)).
//!
//! Each capture mode knows only how to *try once* ([`Lead::try_take`]): polling takes an
//! advisory lock, log mode takes the replication slot. Waiting, retrying, telling
//! `/readyz` and the `leader` gauge why this relay is not publishing, and giving up on
//! shutdown are the same for both, so they live here.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::SourceError;
use crate::metrics::Telemetry;

/// What one attempt to lead found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// This relay leads now; the text names what it holds, for the log.
    Led(String),
    /// Another relay leads; the text says which lock or slot, for `/readyz`.
    Busy(String),
}

/// A capture mode that can try to become the one publishing relay of its outbox.
pub trait Lead {
    /// Tries once, without waiting. An error is a real failure (no privilege, lost
    /// connection), never "someone else leads".
    fn try_take(&mut self) -> impl Future<Output = Result<Attempt, SourceError>> + Send;
}

/// Tries to lead every `retry` until it works; `false` when `shutdown` fired first.
pub async fn lead<L: Lead>(
    candidate: &mut L,
    retry: Duration,
    telemetry: &Telemetry,
    shutdown: &CancellationToken,
) -> Result<bool, SourceError> {
    let mut announced = false;
    loop {
        match candidate.try_take().await? {
            Attempt::Led(what) => {
                tracing::info!(holds = %what, "this relay publishes the outbox");
                telemetry.metrics.leader.set(1);
                telemetry.health.set_leader(true, None);
                return Ok(true);
            }
            Attempt::Busy(why) => {
                telemetry.metrics.leader.set(0);
                telemetry
                    .health
                    .set_leader(false, Some(&format!("standby: {why}")));
                if !announced {
                    tracing::info!(%why, ?retry, "waiting as a standby");
                    announced = true;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(false),
            _ = tokio::time::sleep(retry) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Readiness;

    /// Both sides reachable: readiness then turns on leadership alone.
    fn connected() -> Telemetry {
        let telemetry = Telemetry::default();
        telemetry.health.set_postgres(None);
        telemetry.health.set_kafka(None);
        telemetry
    }

    /// Busy `busy` times, then leads.
    struct Scripted {
        busy: usize,
        tries: usize,
    }

    impl Lead for Scripted {
        async fn try_take(&mut self) -> Result<Attempt, SourceError> {
            self.tries += 1;
            Ok(if self.tries > self.busy {
                Attempt::Led("the test lock".into())
            } else {
                Attempt::Busy("another relay holds the test lock".into())
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_standby_retries_until_it_leads_and_says_why_meanwhile() {
        let telemetry = connected();
        let mut s = Scripted { busy: 3, tries: 0 };
        let shutdown = CancellationToken::new();
        let started = tokio::time::Instant::now();
        assert!(lead(&mut s, Duration::from_secs(1), &telemetry, &shutdown)
            .await
            .unwrap());
        assert_eq!(s.tries, 4);
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(3),
            "three pauses of `retry`"
        );
        assert_eq!(telemetry.metrics.leader.get(), 1);
        assert_eq!(telemetry.health.readiness(), Readiness::Ready);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_the_wait_and_readiness_names_the_holder() {
        let telemetry = connected();
        let mut s = Scripted {
            busy: usize::MAX,
            tries: 0,
        };
        let shutdown = CancellationToken::new();
        let waiting = lead(&mut s, Duration::from_secs(1), &telemetry, &shutdown);
        let cancel = async {
            tokio::time::sleep(Duration::from_millis(2500)).await;
            shutdown.cancel();
        };
        let (led, ()) = tokio::join!(waiting, cancel);
        assert!(!led.unwrap());
        assert_eq!(s.tries, 3);
        assert_eq!(telemetry.metrics.leader.get(), 0);
        assert_eq!(
            telemetry.health.readiness(),
            Readiness::NotReady("standby: another relay holds the test lock".into())
        );
    }
}
