//! `/livez`, `/healthz`, `/readyz` and `/metrics`: no token, for probes and scrapers.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::Api;

pub(super) fn routes() -> OpenApiRouter<Api> {
    OpenApiRouter::new()
        .routes(routes!(live))
        .route("/healthz", get(live))
        .routes(routes!(ready))
        .routes(routes!(metrics))
}

#[utoipa::path(
    get,
    path = "/livez",
    tag = "health",
    summary = "The process serves requests",
    responses(
        (status = 200, description = "ok", body = String, content_type = "text/plain")
    ),
)]
async fn live() -> &'static str {
    "ok"
}

/// Not ready while starting, draining, or while the store is down.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    summary = "Ready to serve",
    responses(
        (status = 200, description = "ready", body = String, content_type = "text/plain"),
        (status = 503, description = "starting, draining or the store down", body = String, content_type = "text/plain")
    ),
)]
async fn ready(State(api): State<Api>) -> (StatusCode, &'static str) {
    if !api.ready.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "starting or draining")
    } else if !api.store_health.is_up() {
        (StatusCode::SERVICE_UNAVAILABLE, "store down")
    } else {
        (StatusCode::OK, "ready")
    }
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "health",
    summary = "Prometheus metrics",
    responses(
        (status = 200, description = "the exposition format", body = String, content_type = "text/plain")
    ),
)]
async fn metrics(State(api): State<Api>) -> String {
    api.metrics.render()
}
