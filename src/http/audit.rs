//! `/v1/audit`: the audit log, newest first.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use super::auth::Principal;
use super::page::{Page, TenantPageQuery};
use super::problem::{Problem, QueryParams};
use super::{Api, stored};
use crate::store::{AuditRow, Role};

pub(super) fn routes() -> Router<Api> {
    Router::new().route("/v1/audit", get(list))
}

/// One audited change as the API shows it.
#[derive(Debug, Serialize)]
struct AuditView {
    at_ms: i64,
    tenant: Option<String>,
    /// The token id, or `super-admin`, or `cli`.
    actor: String,
    action: String,
    target: String,
    /// A summary of the change: `before` and `after` where there are such.
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
