//! `/livez`, `/healthz`, `/readyz` and `/metrics`: no token, for probes and scrapers.

use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use super::Api;

pub(super) fn routes() -> Router<Api> {
    Router::new()
        .route("/livez", get(live))
        .route("/healthz", get(live))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
}

async fn live() -> &'static str {
    "ok"
}

/// Not ready while starting, draining, or while the store is down.
async fn ready(State(api): State<Api>) -> (StatusCode, &'static str) {
    if !api.ready.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "starting or draining")
    } else if !api.store_health.is_up() {
        (StatusCode::SERVICE_UNAVAILABLE, "store down")
    } else {
        (StatusCode::OK, "ready")
    }
}

async fn metrics(State(api): State<Api>) -> String {
    api.metrics.render()
}
