//! The HTTP surface of a node: the admin API under `/v1`, health and metrics.
//!
//! | method | path | least role | does |
//! |---|---|---|---|
//! | GET | `/livez` | — | 200 while the process serves requests |
//! | GET | `/healthz` | — | the same (older probes) |
//! | GET | `/readyz` | — | 200 when serving; 503 while starting, draining, or while the store is down |
//! | GET | `/metrics` | — | Prometheus text |
//! | POST | `/v1/tenants` | super-admin | create a tenant |
//! | GET | `/v1/tenants` | super-admin | tenants, paged |
//! | GET | `/v1/tenants/{tenant}` | viewer | one tenant |
//! | POST | `/v1/tenants/{tenant}/tokens` | admin | create a token; its secret is shown once |
//! | GET | `/v1/tenants/{tenant}/tokens` | admin | the tenant's tokens, paged (never secrets) |
//! | DELETE | `/v1/tenants/{tenant}/tokens/{id}` | admin | revoke a token |
//! | POST | `/v1/numbers` | editor | register a number: it starts at once, no restart |
//! | GET | `/v1/numbers` | viewer | numbers, paged by number |
//! | GET | `/v1/numbers/{number}` | viewer | one number, with its live status |
//! | PATCH | `/v1/numbers/{number}` | editor | replace its settings (its pin: the super-admin's) |
//! | DELETE | `/v1/numbers/{number}` | admin | remove it: it disconnects and its data is deleted |
//! | POST | `/v1/numbers/{number}/restart` | editor | a fresh start where it runs |
//! | POST | `/v1/numbers/{number}/logout` | admin | unlink its device |
//! | POST | `/v1/numbers/{number}/messages` | editor | send as the business (`Idempotency-Key`) |
//! | GET | `/v1/numbers/{number}/qr` | viewer | its current QR code while it pairs (`?format=png` or `svg`) |
//! | POST | `/v1/numbers/{number}/pair-code` | editor | ask for a pair code to type on the phone; answers with it |
//! | GET | `/v1/audit` | admin | the audit log, newest first, paged |
//! | GET | `/v1/cluster/nodes` | super-admin | the live nodes: state, capacity, version, numbers held |
//! | GET | `/v1/cluster/placement` | super-admin | where each number runs (pin, lease owner), paged |
//! | POST | `/v1/cluster/nodes/{node}/drain` | super-admin | ask a node to give every number away |
//! | POST | `/v1/cluster/numbers/{number}/move` | super-admin | pin a number to a node (or unpin it) |
//! | GET | `/v1/openapi.json` | — | this table as OpenAPI 3.1, generated from the handlers |
//! | GET | `/docs` | — | Swagger UI (vendored: no CDN) on that document |
//!
//! Every `/v1` route takes `Authorization: Bearer <token>`: the super-admin's from
//! `SWITCHBOARD_ADMIN_TOKEN`, or a tenant's ([`auth`]). A tenant's token sees its own tenant
//! only: another tenant's resource is a 404, never a 403 that would tell it exists. Every
//! mutation commits with its audit row. Lists take `limit` (1–500, default 100) and `cursor`
//! (the `next_cursor` of the previous page). Errors are `application/problem+json` naming the
//! field at fault ([`problem`]); 5xx bodies are opaque and the cause is logged.

mod audit;
pub mod auth;
mod cluster;
pub mod edges;
mod health;
mod numbers;
mod page;
pub mod problem;
pub mod qr;
mod tenants;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use metrics_exporter_prometheus::PrometheusHandle;
use secrecy::SecretString;
use switchboard_actors::fleet::Commands;
use switchboard_actors::root::Reconciler;
use switchboard_actors::store::Health;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;
use utoipa_swagger_ui::SwaggerUi;

use switchboard_actors::store::StoreError;

use crate::cluster::CommandBus;
use crate::store::SqlStore;
use problem::Problem;

/// The largest request body the API reads (a send's text is the largest thing it takes).
pub const BODY_LIMIT: usize = 64 * 1024;

pub use edges::Edges;

/// What the handlers share.
#[derive(Clone)]
pub struct Api {
    parts: Arc<ApiParts>,
    /// Each token's request budget.
    limit: Arc<edges::RateLimit>,
}

/// The parts of the node the API works through.
pub struct ApiParts {
    /// Tenants, tokens, numbers and the audit log.
    pub store: SqlStore,
    /// The numbers this node runs: status and commands.
    pub fleet: Commands,
    /// In a cluster: commands for numbers another node runs.
    pub bus: Option<CommandBus>,
    /// In a cluster: the live nodes, the leases' owners, drain requests.
    pub membership: Option<crate::cluster::RedisMembership>,
    /// Asks the node to pick up numbers added or removed now, not at its next pass.
    pub reconcile: Reconciler,
    /// The bootstrap super-admin token (`SWITCHBOARD_ADMIN_TOKEN`); without it only tenant
    /// tokens authenticate (and none exist until a super-admin makes one).
    pub admin_token: Option<SecretString>,
    /// This node's id, in statuses.
    pub node_id: String,
    /// Serving (not starting, not draining).
    pub ready: Arc<AtomicBool>,
    /// The store's health, for `/readyz`.
    pub store_health: Health,
    /// The Prometheus recorder's page.
    pub metrics: PrometheusHandle,
    /// Rate limit, deadline, CORS.
    pub edges: Edges,
}

impl std::ops::Deref for Api {
    type Target = ApiParts;
    fn deref(&self) -> &ApiParts {
        &self.parts
    }
}

/// The document's head; the paths come from the handlers' `#[utoipa::path]`.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Switchboard admin API",
        description = "Tenants, tokens, numbers and the audit log of a Switchboard node. Every \
            /v1 route takes a bearer token; errors are application/problem+json."
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "tenants", description = "tenants and their API tokens"),
        (name = "numbers", description = "numbers, live: status, QR codes, commands, sends"),
        (name = "audit", description = "who changed what, when"),
        (name = "cluster", description = "nodes and placement (the super-admin's)"),
        (name = "health", description = "probes and metrics, without a token")
    )
)]
struct ApiDoc;

/// The `bearer` security scheme the routes name.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The OpenAPI document of every route (as `/v1/openapi.json` serves it).
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes().split_for_parts().1
}

fn routes() -> OpenApiRouter<Api> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(health::routes())
        .merge(tenants::routes())
        .merge(numbers::routes())
        .merge(audit::routes())
        .merge(cluster::routes())
}

/// The router of every route in the table above.
pub fn router(parts: ApiParts) -> Router {
    let edges = parts.edges.clone();
    let api = Api {
        limit: Arc::new(edges::RateLimit::new(
            edges.rate_per_second,
            edges.rate_burst,
        )),
        parts: Arc::new(parts),
    };
    let timeout = edges.request_timeout;
    let (routes, doc) = routes().split_for_parts();
    routes
        .with_state(api)
        .merge(SwaggerUi::new("/docs").url("/v1/openapi.json", doc))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(edges::cors(&edges.cors_origins))
        .layer(axum::middleware::from_fn(move |req, next| {
            edges::request_id_and_deadline(timeout, req, next)
        }))
}

/// A store error as the API answers it: a conflict is a 409 saying `conflict`, a missing row a
/// 404, an outage a 503; anything else an opaque 500 (the cause is logged).
fn stored(e: StoreError, conflict: &str) -> Problem {
    match e {
        StoreError::Conflict(_) => Problem::conflict(conflict),
        StoreError::NotFound(what) => Problem::not_found(format!("no {what}")),
        e if e.is_retryable() => Problem::unavailable(&e),
        e => Problem::internal(&e),
    }
}
