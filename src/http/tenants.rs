//! `/v1/tenants`: tenants (the super-admin's) and their API tokens (each tenant's admins').

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::auth::{self, Principal};
use super::page::{Page, PageQuery};
use super::problem::{JsonBody, Problem, QueryParams};
use super::{Api, stored};
use crate::store::{AuditEntry, Change, Role, TenantRecord, TokenRecord};

pub(super) fn routes() -> Router<Api> {
    Router::new()
        .route("/v1/tenants", get(list).post(create))
        .route("/v1/tenants/{tenant}", get(one))
        .route(
            "/v1/tenants/{tenant}/tokens",
            get(list_tokens).post(create_token),
        )
        .route("/v1/tenants/{tenant}/tokens/{id}", delete(revoke_token))
}

/// A tenant as the API shows it.
#[derive(Debug, Serialize)]
struct TenantView {
    id: String,
    name: String,
    full_transcripts: bool,
}

impl From<TenantRecord> for TenantView {
    fn from(t: TenantRecord) -> Self {
        Self {
            id: t.id,
            name: t.name,
            full_transcripts: t.full_transcripts,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewTenant {
    id: String,
    name: String,
    #[serde(default)]
    full_transcripts: bool,
}

/// A tenant id: 1 to 64 lowercase letters, digits and dashes, not starting with a dash.
fn tenant_id(raw: &str) -> Result<String, Problem> {
    let ok = (1..=64).contains(&raw.len())
        && !raw.starts_with('-')
        && raw
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(raw.to_owned())
    } else {
        Err(Problem::invalid(
            "id",
            "1 to 64 lowercase letters, digits and dashes, not starting with a dash",
        ))
    }
}

/// A display name: 1 to 200 characters, not blank.
fn name(field: &str, raw: &str) -> Result<String, Problem> {
    if raw.trim().is_empty() || raw.chars().count() > 200 {
        return Err(Problem::invalid(field, "1 to 200 characters, not blank"));
    }
    Ok(raw.to_owned())
}

async fn create(
    State(api): State<Api>,
    who: Principal,
    JsonBody(body): JsonBody<NewTenant>,
) -> Result<(StatusCode, Json<TenantView>), Problem> {
    who.require_super()?;
    let record = TenantRecord {
        id: tenant_id(&body.id)?,
        name: name("name", &body.name)?,
        full_transcripts: body.full_transcripts,
    };
    let audit = AuditEntry {
        tenant: Some(record.id.clone()),
        actor: who.actor(),
        action: "tenant.create".to_owned(),
        target: record.id.clone(),
        detail: json!({ "after": { "name": record.name, "full_transcripts": record.full_transcripts } }),
    };
    api.store
        .apply(&Change::CreateTenant(record.clone()), &audit)
        .await
        .map_err(|e| stored(e, "a tenant with this id exists"))?;
    Ok((StatusCode::CREATED, Json(record.into())))
}

async fn list(
    State(api): State<Api>,
    who: Principal,
    QueryParams(q): QueryParams<PageQuery>,
) -> Result<Json<Page<TenantView>>, Problem> {
    who.require_super()?;
    let ask = q.ask()?;
    let rows = api
        .store
        .tenants(ask.after.as_deref(), ask.limit + 1)
        .await
        .map_err(|e| stored(e, ""))?;
    let page = Page::of(rows, &ask, |t| t.id.clone());
    Ok(Json(Page {
        items: page.items.into_iter().map(TenantView::from).collect(),
        next_cursor: page.next_cursor,
    }))
}

/// The tenant `id` if the caller may see it; else 404, whether or not it exists.
pub(super) async fn visible(api: &Api, who: &Principal, id: &str) -> Result<TenantRecord, Problem> {
    let missing = || Problem::not_found(format!("no tenant {id}"));
    if !who.sees(id) {
        return Err(missing());
    }
    api.store
        .tenant(id)
        .await
        .map_err(|e| stored(e, ""))?
        .ok_or_else(missing)
}

async fn one(
    State(api): State<Api>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Json<TenantView>, Problem> {
    who.require(Role::Viewer)?;
    Ok(Json(visible(&api, &who, &id).await?.into()))
}

/// A token as the API shows it: never its secret, except once, on creation.
#[derive(Debug, Serialize)]
struct TokenView {
    id: String,
    tenant: String,
    name: String,
    role: &'static str,
    created_at_ms: i64,
    revoked: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
}

impl From<TokenRecord> for TokenView {
    fn from(t: TokenRecord) -> Self {
        Self {
            id: t.id,
            tenant: t.tenant,
            name: t.name,
            role: t.role.as_str(),
            created_at_ms: t.created_at_ms,
            revoked: t.revoked,
            token: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    name: String,
    role: String,
}

async fn create_token(
    State(api): State<Api>,
    who: Principal,
    Path(tenant): Path<String>,
    JsonBody(body): JsonBody<NewToken>,
) -> Result<(StatusCode, Json<TokenView>), Problem> {
    visible(&api, &who, &tenant).await?;
    who.require(Role::Admin)?;
    let role = Role::parse(&body.role)
        .ok_or_else(|| Problem::invalid("role", "one of admin, editor, viewer"))?;
    let (secret, hash) = auth::new_secret();
    let token = TokenRecord {
        id: auth::new_token_id(),
        tenant: tenant.clone(),
        role,
        name: name("name", &body.name)?,
        created_at_ms: i64::try_from(switchboard_actors::store::unix_ms()).unwrap_or(i64::MAX),
        revoked: false,
    };
    let audit = AuditEntry {
        tenant: Some(tenant),
        actor: who.actor(),
        action: "token.create".to_owned(),
        target: token.id.clone(),
        detail: json!({ "after": { "name": token.name, "role": role.as_str() } }),
    };
    let change = Change::CreateToken {
        token: token.clone(),
        hash,
    };
    api.store
        .apply(&change, &audit)
        .await
        .map_err(|e| stored(e, "a token with this id exists; try again"))?;
    let mut view = TokenView::from(token);
    view.token = Some(secret);
    Ok((StatusCode::CREATED, Json(view)))
}

async fn list_tokens(
    State(api): State<Api>,
    who: Principal,
    Path(tenant): Path<String>,
    QueryParams(q): QueryParams<PageQuery>,
) -> Result<Json<Page<TokenView>>, Problem> {
    visible(&api, &who, &tenant).await?;
    who.require(Role::Admin)?;
    let ask = q.ask()?;
    let rows = api
        .store
        .tokens(&tenant, ask.after.as_deref(), ask.limit + 1)
        .await
        .map_err(|e| stored(e, ""))?;
    let page = Page::of(rows, &ask, |t| t.id.clone());
    Ok(Json(Page {
        items: page.items.into_iter().map(TokenView::from).collect(),
        next_cursor: page.next_cursor,
    }))
}

async fn revoke_token(
    State(api): State<Api>,
    who: Principal,
    Path((tenant, id)): Path<(String, String)>,
) -> Result<StatusCode, Problem> {
    visible(&api, &who, &tenant).await?;
    who.require(Role::Admin)?;
    let audit = AuditEntry {
        tenant: Some(tenant.clone()),
        actor: who.actor(),
        action: "token.revoke".to_owned(),
        target: id.clone(),
        detail: json!({ "before": { "revoked": false }, "after": { "revoked": true } }),
    };
    api.store
        .apply(&Change::RevokeToken { tenant, id }, &audit)
        .await
        .map_err(|e| stored(e, ""))?;
    Ok(StatusCode::NO_CONTENT)
}
