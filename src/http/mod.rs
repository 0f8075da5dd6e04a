//! The monitoring endpoints ([design §10](../../docs/design.md#10-monitoring)), for Prometheus and for orchestrators' probes:
//!
//! * `GET /metrics` — Prometheus text format, see [`crate::metrics`];
//! * `GET /healthz` — 200 while the process serves requests (liveness);
//! * `GET /readyz` — 200 only when this relay is the leader and reaches both PostgreSQL
//!   and Kafka; otherwise 503 with a one-line reason (readiness).

mod config;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::{HttpConfig, RawHttpConfig};

use crate::metrics::{Readiness, Telemetry};

/// Serves the endpoints on `listener` until `stop` fires.
pub async fn serve(
    listener: TcpListener,
    telemetry: Telemetry,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(telemetry);
    axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}

/// Readiness, also mirrored into the `outbox_relay_ready` gauge.
fn readiness(t: &Telemetry) -> Readiness {
    let r = t.health.readiness();
    t.metrics.ready.set(i64::from(r == Readiness::Ready));
    r
}

async fn metrics(State(t): State<Telemetry>) -> impl IntoResponse {
    readiness(&t);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        t.metrics.render(),
    )
}

async fn readyz(State(t): State<Telemetry>) -> impl IntoResponse {
    match readiness(&t) {
        Readiness::Ready => (StatusCode::OK, "ready\n".to_owned()),
        Readiness::NotReady(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}
