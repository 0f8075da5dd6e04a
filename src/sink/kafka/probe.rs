//! The background metadata probe: Kafka's side of `/readyz` while no event flows.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::client::Client;
use rdkafka::error::KafkaError;
use rdkafka::ClientContext;

use crate::metrics::Telemetry;

/// How often the background probe asks the brokers for metadata (readiness).
const PROBE_INTERVAL: Duration = Duration::from_secs(5);
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// The first probes come quicker. Besides telling readiness sooner, a metadata answer
/// from a broker that is up is what makes librdkafka's idempotent producer ask for its
/// producer id at once: when its first attempt found no broker up yet (the bootstrap
/// connection answered before the broker it named was connected), it would otherwise
/// wait for its 500 ms timer, and so would the first event (seen here: 520 ms from
/// process start to first event acknowledged, against 65 ms).
const STARTING_PROBES: [Duration; 3] = [
    Duration::from_millis(20),
    Duration::from_millis(50),
    Duration::from_millis(200),
];

/// The brokers' metadata through `client`: how many brokers it lists, and how many
/// partitions without a leader.
pub(crate) fn probe<C: ClientContext>(client: &Client<C>) -> Result<(usize, usize), KafkaError> {
    client.fetch_metadata(None, PROBE_TIMEOUT).map(|md| {
        let leaderless = md
            .topics()
            .iter()
            .flat_map(|t| t.partitions())
            .filter(|p| p.leader() < 0)
            .count();
        (md.brokers().len(), leaderless)
    })
}

/// Asks the brokers for metadata every few seconds through `producer`, so `/readyz`
/// notices a Kafka outage even while no event is flowing. Stops with `shutdown` (or when
/// aborted).
pub(crate) fn spawn_health_probe(
    probe: Arc<dyn Fn() -> Result<(usize, usize), KafkaError> + Send + Sync>,
    telemetry: &Telemetry,
    brokers: &str,
    shutdown: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let health = telemetry.health.clone();
    let brokers = brokers.to_owned();
    tokio::spawn(async move {
        let mut first = STARTING_PROBES.iter();
        loop {
            let probe = probe.clone();
            let answer = tokio::task::spawn_blocking(move || probe()).await;
            if let Ok(Ok((_, leaderless))) = &answer {
                health.set_leaderless_partitions(*leaderless);
            }
            match answer.map(|r| r.map(|(brokers, _)| brokers)) {
                Ok(Ok(n)) if n > 0 => health.set_kafka(None),
                Ok(Ok(_)) => health.set_kafka(Some(format!("{brokers}: metadata lists no broker"))),
                Ok(Err(e)) => health.set_kafka(Some(format!("{brokers} unreachable: {e}"))),
                Err(_) => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(*first.next().unwrap_or(&PROBE_INTERVAL)) => {}
            }
        }
    })
}
