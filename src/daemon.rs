//! One relay process: the monitoring endpoints beside the relay loop, one shutdown.
//!
//! Shutdown order matters: the relay drains first (its in-flight batch acknowledged to
//! Kafka and PostgreSQL) while `/metrics` and `/readyz` keep answering, then the HTTP
//! server stops.

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::Telemetry;
use crate::relay::{self, RelayError};

/// Binds `http.listen` and runs until `shutdown` fires or an error no retry can fix.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RelayError> {
    let addr = config.http.listen;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| RelayError::Listen { addr, source })?;
    run_with(config, listener, Telemetry::default(), shutdown).await
}

/// [`run`] with the listener and telemetry supplied, so tests bind port 0 and read the
/// metrics directly.
pub async fn run_with(
    config: Config,
    listener: TcpListener,
    telemetry: Telemetry,
    shutdown: CancellationToken,
) -> Result<(), RelayError> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    }
    let stop_http = CancellationToken::new();
    let http = tokio::spawn(crate::http::serve(
        listener,
        telemetry.clone(),
        stop_http.clone(),
    ));
    let result = relay::run(config, telemetry, shutdown).await;
    stop_http.cancel();
    match http.await {
        Ok(Err(e)) => tracing::warn!(error = %e, "HTTP server failed"),
        Err(e) => tracing::warn!(error = %e, "HTTP server task failed"),
        Ok(Ok(())) => {}
    }
    result
}
