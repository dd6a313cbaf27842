//! `/v1/cluster`: the live nodes, where each number runs, draining a node and moving a number.
//! The agency's own: the super-admin alone (placement is infrastructure, not a tenant's).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::json;
use switchboard_actors::PhoneNumber;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Principal;
use super::page::{Page, PageQuery};
use super::problem::{JsonBody, Problem, ProblemDoc, QueryParams};
use super::{Api, stored};
use crate::store::{AuditEntry, Change};

pub(super) fn routes() -> OpenApiRouter<Api> {
    OpenApiRouter::new()
        .routes(routes!(nodes))
        .routes(routes!(placement))
        .routes(routes!(drain))
        .routes(routes!(move_number))
}

/// A live node.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct NodeView {
    id: String,
    /// `active`, or `draining` (it gives its numbers away and takes none).
    state: String,
    /// Its placement weight.
    capacity: u32,
    version: String,
    /// Leases it holds.
    numbers: usize,
}

/// Where a number runs.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct PlacementView {
    number: String,
    tenant: String,
    /// The node an admin pinned it to.
    pinned_node: Option<String>,
    /// The node holding its lease, if any.
    owner: Option<String>,
}

fn unavailable(e: &dyn std::fmt::Display) -> Problem {
    Problem::unavailable(e)
}

#[utoipa::path(
    get,
    path = "/v1/cluster/nodes",
    tag = "cluster",
    summary = "The live nodes (super-admin)",
    responses(
        (status = 200, body = Vec<NodeView>),
        (status = 401, description = "no token, or one that authenticates nothing", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "the token's role may not do this", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 429, description = "this token's rate limit is spent (Retry-After)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "a dependency is unavailable", body = ProblemDoc, content_type = "application/problem+json")
    ),
    security(("bearer" = []))
)]
async fn nodes(State(api): State<Api>, who: Principal) -> Result<Json<Vec<NodeView>>, Problem> {
    who.require_super()?;
    let numbers: Vec<PhoneNumber> = api
        .store
        .numbers()
        .await
        .map_err(|e| stored(e, ""))?
        .into_iter()
        .map(|n| n.number)
        .collect();
    let Some(membership) = &api.membership else {
        // The embedded node: itself, running every registered number.
        return Ok(Json(vec![NodeView {
            id: api.node_id.clone(),
            state: "active".to_owned(),
            capacity: 1,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            numbers: numbers.len(),
        }]));
    };
    let members = membership.members().await.map_err(|e| unavailable(&e))?;
    let owners = membership
        .lease_owners(&numbers)
        .await
        .map_err(|e| unavailable(&e))?;
    let mut nodes: Vec<NodeView> = members
        .into_iter()
        .map(|m| NodeView {
            numbers: owners.iter().flatten().filter(|o| **o == m.id).count(),
            id: m.id,
            state: m.state,
            capacity: m.capacity,
            version: m.version,
        })
        .collect();
    nodes.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(Json(nodes))
}

#[utoipa::path(
    get,
    path = "/v1/cluster/placement",
    tag = "cluster",
    summary = "Where each number runs, by number (super-admin)",
    params(
        ("limit" = Option<u32>, Query, description = "items per page, 1 to 500 (default 100)"),
        ("cursor" = Option<String>, Query, description = "the next_cursor of the previous page")
    ),
    responses(
        (status = 200, body = Page<PlacementView>),
        (status = 400, description = "malformed query", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "no token, or one that authenticates nothing", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "the token's role may not do this", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "a bad limit or cursor (named in `field`)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 429, description = "this token's rate limit is spent (Retry-After)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "a dependency is unavailable", body = ProblemDoc, content_type = "application/problem+json")
    ),
    security(("bearer" = []))
)]
async fn placement(
    State(api): State<Api>,
    who: Principal,
    QueryParams(q): QueryParams<PageQuery>,
) -> Result<Json<Page<PlacementView>>, Problem> {
    who.require_super()?;
    let ask = q.ask()?;
    let after = ask.after_as(|a| PhoneNumber::parse(a).ok())?;
    let rows = api
        .store
        .numbers_page(None, after.as_ref(), ask.limit + 1)
        .await
        .map_err(|e| stored(e, ""))?;
    let page = Page::of(rows, &ask, |n| n.number.to_string());
    let numbers: Vec<PhoneNumber> = page.items.iter().map(|n| n.number.clone()).collect();
    let owners = match &api.membership {
        Some(m) => m
            .lease_owners(&numbers)
            .await
            .map_err(|e| unavailable(&e))?,
        None => vec![Some(api.node_id.clone()); numbers.len()],
    };
    Ok(Json(Page {
        items: page
            .items
            .into_iter()
            .zip(owners)
            .map(|(n, owner)| PlacementView {
                number: n.number.to_string(),
                tenant: n.tenant,
                pinned_node: n.pinned_node,
                owner,
            })
            .collect(),
        next_cursor: page.next_cursor,
    }))
}

#[utoipa::path(
    post,
    path = "/v1/cluster/nodes/{node}/drain",
    tag = "cluster",
    summary = "Ask a node to give every number away (super-admin)",
    params(("node" = String, Path, description = "node id")),
    responses(
        (status = 202, description = "the node drains at its next pass"),
        (status = 401, description = "no token, or one that authenticates nothing", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "the token's role may not do this", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "no live node of that id", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 409, description = "not a cluster: the embedded node has nowhere to drain to", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 429, description = "this token's rate limit is spent (Retry-After)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "a dependency is unavailable", body = ProblemDoc, content_type = "application/problem+json")
    ),
    security(("bearer" = []))
)]
async fn drain(
    State(api): State<Api>,
    who: Principal,
    Path(node): Path<String>,
) -> Result<StatusCode, Problem> {
    who.require_super()?;
    let Some(membership) = &api.membership else {
        return Err(Problem::conflict(
            "the embedded node is not in a cluster: there is nowhere to drain to",
        ));
    };
    let members = membership.members().await.map_err(|e| unavailable(&e))?;
    if !members.iter().any(|m| m.id == node) {
        return Err(Problem::not_found(format!("no live node {node}")));
    }
    membership
        .request_drain(&node)
        .await
        .map_err(|e| unavailable(&e))?;
    let audit = AuditEntry {
        tenant: None,
        actor: who.actor(),
        action: "cluster.drain".to_owned(),
        target: node,
        detail: json!({ "after": { "state": "draining" } }),
    };
    api.store
        .apply(&Change::Act, &audit)
        .await
        .map_err(|e| stored(e, ""))?;
    Ok(StatusCode::ACCEPTED)
}

/// Where to move a number.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct Move {
    /// The node to pin it to; `null` lets placement decide again.
    node: Option<String>,
}

#[utoipa::path(
    post,
    path = "/v1/cluster/numbers/{number}/move",
    tag = "cluster",
    summary = "Pin a number to a node: it moves there while that node is live (super-admin)",
    params(("number" = String, Path, description = "the number, E.164 (+15550001)")),
    request_body(content = Move, content_type = "application/json"),
    responses(
        (status = 202, description = "pinned; it moves at the nodes' next pass"),
        (status = 400, description = "malformed JSON", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "no token, or one that authenticates nothing", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "the token's role may not do this", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "no such number", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 413, description = "body over 64 KiB", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "a field is missing, of the wrong type or invalid (named in `field`)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 429, description = "this token's rate limit is spent (Retry-After)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "a dependency is unavailable", body = ProblemDoc, content_type = "application/problem+json")
    ),
    security(("bearer" = []))
)]
async fn move_number(
    State(api): State<Api>,
    who: Principal,
    Path(raw): Path<String>,
    JsonBody(body): JsonBody<Move>,
) -> Result<StatusCode, Problem> {
    who.require_super()?;
    let number =
        PhoneNumber::parse(&raw).map_err(|_| Problem::not_found(format!("no number {raw}")))?;
    let record = api
        .store
        .number(&number)
        .await
        .map_err(|e| stored(e, ""))?
        .ok_or_else(|| Problem::not_found(format!("no number {number}")))?;
    if body.node.as_deref().is_some_and(|n| n.trim().is_empty()) {
        return Err(Problem::invalid("node", "a node id, or null to unpin"));
    }
    let audit = AuditEntry {
        tenant: Some(record.tenant),
        actor: who.actor(),
        action: "number.move".to_owned(),
        target: number.to_string(),
        detail: json!({
            "before": { "pinned_node": record.pinned_node },
            "after": { "pinned_node": body.node },
        }),
    };
    api.store
        .apply(&Change::Pin(number, body.node), &audit)
        .await
        .map_err(|e| stored(e, ""))?;
    api.reconcile.now().await;
    Ok(StatusCode::ACCEPTED)
}
