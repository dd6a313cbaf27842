//! `/v1/audit`: the audit log, newest first.

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Principal;
use super::page::{Page, TenantPageQuery};
use super::problem::{Problem, ProblemDoc, QueryParams};
use super::{Api, stored};
use crate::store::{AuditRow, Role};

pub(super) fn routes() -> OpenApiRouter<Api> {
    OpenApiRouter::new().routes(routes!(list))
}

/// One audited change as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct AuditView {
    at_ms: i64,
    tenant: Option<String>,
    /// The token id, or `super-admin`, or `cli`.
    actor: String,
    action: String,
    target: String,
    /// A summary of the change: `before` and `after` where there are such.
    #[schema(value_type = Object)]
    detail: serde_json::Value,
}

impl From<AuditRow> for AuditView {
    fn from(r: AuditRow) -> Self {
        Self {
            at_ms: r.at_ms,
            tenant: r.entry.tenant,
            actor: r.entry.actor,
            action: r.entry.action,
            target: r.entry.target,
            detail: r.entry.detail,
        }
    }
}

#[utoipa::path(
    get,
    path = "/v1/audit",
    tag = "audit",
    summary = "The audit log, newest first",
    params(("limit" = Option<u32>, Query, description = "items per page, 1 to 500 (default 100)"), ("cursor" = Option<String>, Query, description = "the next_cursor of the previous page"), ("tenant" = Option<String>, Query, description = "the super-admin's filter")),
    responses(
        (status = 200, body = Page<AuditView>),
        (status = 400, description = "malformed JSON or query", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "no token, or one that authenticates nothing", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "the token's role may not do this", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "no such resource (or another tenant's)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "a field is missing, of the wrong type or invalid (named in `field`)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 429, description = "this token's rate limit is spent (Retry-After)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "a dependency is unavailable", body = ProblemDoc, content_type = "application/problem+json")
    ),
    security(("bearer" = []))
)]
async fn list(
    State(api): State<Api>,
    who: Principal,
    QueryParams(q): QueryParams<TenantPageQuery>,
) -> Result<Json<Page<AuditView>>, Problem> {
    who.require(Role::Admin)?;
    let ask = q.page.ask()?;
    let tenant = who.narrow(q.tenant.as_deref())?;
    let before = ask.after_as(|c| c.parse::<i64>().ok())?;
    let rows = api
        .store
        .audit_page(tenant, before, ask.limit + 1)
        .await
        .map_err(|e| stored(e, ""))?;
    let page = Page::of(rows, &ask, |r| r.seq.to_string());
    Ok(Json(Page {
        items: page.items.into_iter().map(AuditView::from).collect(),
        next_cursor: page.next_cursor,
    }))
}
