//! `/v1/tenants`: tenants (the super-admin's) and their API tokens (each tenant's admins').

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{self, Principal};
use super::page::{Page, PageQuery};
use super::problem::{JsonBody, Problem, ProblemDoc, QueryParams};
use super::{Api, stored};
use crate::store::{AuditEntry, Change, Role, TenantRecord, TokenRecord};

pub(super) fn routes() -> OpenApiRouter<Api> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(one))
        .routes(routes!(list_tokens, create_token))
        .routes(routes!(revoke_token))
}

/// A tenant as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct TenantView {
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

/// A tenant to create.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct NewTenant {
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

#[utoipa::path(
    post,
    path = "/v1/tenants",
    tag = "tenants",
    summary = "Create a tenant (super-admin)",
    request_body(content = NewTenant, content_type = "application/json"),
    responses(
        (status = 201, body = TenantView),
        (status = 400, description = "malformed JSON or query", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "no token, or one that authenticates nothing", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "the token's role may not do this", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 409, description = "conflicts with what exists", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 413, description = "body over 64 KiB", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "a field is missing, of the wrong type or invalid (named in `field`)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 429, description = "this token's rate limit is spent (Retry-After)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "a dependency is unavailable", body = ProblemDoc, content_type = "application/problem+json")
    ),
    security(("bearer" = []))
)]
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

#[utoipa::path(
    get,
    path = "/v1/tenants",
    tag = "tenants",
    summary = "List tenants (super-admin)",
    params(("limit" = Option<u32>, Query, description = "items per page, 1 to 500 (default 100)"), ("cursor" = Option<String>, Query, description = "the next_cursor of the previous page")),
    responses(
        (status = 200, body = Page<TenantView>),
        (status = 400, description = "malformed JSON or query", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "no token, or one that authenticates nothing", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "the token's role may not do this", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "a field is missing, of the wrong type or invalid (named in `field`)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 429, description = "this token's rate limit is spent (Retry-After)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "a dependency is unavailable", body = ProblemDoc, content_type = "application/problem+json")
    ),
    security(("bearer" = []))
)]
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

#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant}",
    tag = "tenants",
    summary = "One tenant",
    params(("tenant" = String, Path, description = "tenant id")),
    responses(
        (status = 200, body = TenantView),
        (status = 401, description = "no token, or one that authenticates nothing", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "the token's role may not do this", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "no such resource (or another tenant's)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 429, description = "this token's rate limit is spent (Retry-After)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "a dependency is unavailable", body = ProblemDoc, content_type = "application/problem+json")
    ),
    security(("bearer" = []))
)]
async fn one(
    State(api): State<Api>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Json<TenantView>, Problem> {
    who.require(Role::Viewer)?;
    Ok(Json(visible(&api, &who, &id).await?.into()))
}

/// A token as the API shows it: never its secret, except once, on creation.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct TokenView {
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

/// A token to create: `role` is admin, editor or viewer.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct NewToken {
    name: String,
    role: String,
}

#[utoipa::path(
    post,
    path = "/v1/tenants/{tenant}/tokens",
    tag = "tenants",
    summary = "Create a token; its secret is shown once",
    params(("tenant" = String, Path, description = "tenant id")),
    request_body(content = NewToken, content_type = "application/json"),
    responses(
        (status = 201, body = TokenView),
        (status = 400, description = "malformed JSON or query", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "no token, or one that authenticates nothing", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "the token's role may not do this", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "no such resource (or another tenant's)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 409, description = "conflicts with what exists", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 413, description = "body over 64 KiB", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "a field is missing, of the wrong type or invalid (named in `field`)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 429, description = "this token's rate limit is spent (Retry-After)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "a dependency is unavailable", body = ProblemDoc, content_type = "application/problem+json")
    ),
    security(("bearer" = []))
)]
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

#[utoipa::path(
    get,
    path = "/v1/tenants/{tenant}/tokens",
    tag = "tenants",
    summary = "List the tenant's tokens (never their secrets)",
    params(("tenant" = String, Path, description = "tenant id"), ("limit" = Option<u32>, Query, description = "items per page, 1 to 500 (default 100)"), ("cursor" = Option<String>, Query, description = "the next_cursor of the previous page")),
    responses(
        (status = 200, body = Page<TokenView>),
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

#[utoipa::path(
    delete,
    path = "/v1/tenants/{tenant}/tokens/{id}",
    tag = "tenants",
    summary = "Revoke a token",
    params(("tenant" = String, Path, description = "tenant id"), ("id" = String, Path, description = "token id")),
    responses(
        (status = 204, description = "revoked"),
        (status = 401, description = "no token, or one that authenticates nothing", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "the token's role may not do this", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "no such resource (or another tenant's)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 429, description = "this token's rate limit is spent (Retry-After)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "a dependency is unavailable", body = ProblemDoc, content_type = "application/problem+json")
    ),
    security(("bearer" = []))
)]
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
