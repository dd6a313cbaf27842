//! `/v1/numbers`: register, list, change and remove numbers while the node runs, see their live
//! status, restart them, log them out, send as the business.
//!
//! A number registered or removed here starts or stops at once: the handler asks the node's
//! agent for a pass ([`Reconciler`](switchboard_actors::root::Reconciler)) after the commit. A
//! command goes to the fleet of this node if it runs the number, else, in a cluster, to the
//! node that does (the command bus).

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::json;
use switchboard_actors::PhoneNumber;
use switchboard_actors::command::{BusinessSend, CommandError, Done, NumberCommand};
use switchboard_actors::number::NumberStatus;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Principal;
use super::page::{Page, TenantPageQuery};
use super::problem::{JsonBody, Problem, ProblemDoc, QueryParams};
use super::tenants::visible;
use super::{Api, stored};
use crate::store::{AuditEntry, Change, NumberRecord, Role};

/// How long a command waits for the node that runs the number.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a pair-code request waits for WhatsApp's code.
const PAIR_CODE_WAIT: Duration = Duration::from_secs(10);

pub(super) fn routes() -> OpenApiRouter<Api> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(one, update, remove))
        .routes(routes!(restart))
        .routes(routes!(logout))
        .routes(routes!(send))
        .routes(routes!(qr))
        .routes(routes!(pair_code))
}

/// A number as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct NumberView {
    number: String,
    tenant: String,
    pinned_node: Option<String>,
    #[schema(value_type = Object)]
    settings: serde_json::Value,
    /// Where and how it runs; absent in lists (ask for the number itself).
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<StatusView>,
}

/// A number's live status.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct StatusView {
    /// The node that runs it, if one does.
    node: Option<String>,
    /// Its phase on that node (`starting`, `pairing`, `online`, …), when this node runs it;
    /// `null` when another node does (ask that node) or none does.
    state: Option<&'static str>,
    /// The QR code to scan, while it pairs.
    qr: Option<String>,
    /// The pair code to type on the phone, if one was asked for.
    pair_code: Option<String>,
}

impl NumberView {
    fn of(r: NumberRecord, status: Option<StatusView>) -> Self {
        Self {
            number: r.number.to_string(),
            tenant: r.tenant,
            pinned_node: r.pinned_node,
            settings: r.settings,
            status,
        }
    }
}

/// `{number}` of a path: E.164, else 404 (no such number can exist).
fn number_of(raw: &str) -> Result<PhoneNumber, Problem> {
    PhoneNumber::parse(raw).map_err(|_| Problem::not_found(format!("no number {raw}")))
}

/// The number `raw` if the caller may see it; else 404, whether or not it exists.
async fn visible_number(api: &Api, who: &Principal, raw: &str) -> Result<NumberRecord, Problem> {
    let number = number_of(raw)?;
    let missing = || Problem::not_found(format!("no number {number}"));
    let record = api
        .store
        .number(&number)
        .await
        .map_err(|e| stored(e, ""))?
        .ok_or_else(missing)?;
    if who.sees(&record.tenant) {
        Ok(record)
    } else {
        Err(missing())
    }
}

/// A number to register.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct NewNumber {
    number: String,
    /// Required of the super-admin; a tenant's token adds to its own tenant.
    tenant: Option<String>,
    #[serde(default = "empty_object")]
    #[schema(value_type = Option<Object>)]
    settings: serde_json::Value,
    pinned_node: Option<String>,
}

fn empty_object() -> serde_json::Value {
    json!({})
}

fn settings(value: serde_json::Value) -> Result<serde_json::Value, Problem> {
    if value.is_object() {
        Ok(value)
    } else {
        Err(Problem::invalid("settings", "a JSON object"))
    }
}

#[utoipa::path(
    post,
    path = "/v1/numbers",
    tag = "numbers",
    summary = "Register a number; it starts at once",
    request_body(content = NewNumber, content_type = "application/json"),
    responses(
        (status = 201, body = NumberView),
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
async fn create(
    State(api): State<Api>,
    who: Principal,
    JsonBody(body): JsonBody<NewNumber>,
) -> Result<(StatusCode, Json<NumberView>), Problem> {
    who.require(Role::Editor)?;
    let number = PhoneNumber::parse(&body.number)
        .map_err(|e| Problem::invalid("number", format!("{e} (E.164: + and 7 to 15 digits)")))?;
    let tenant = match (who.scope(), body.tenant) {
        (Some(own), None) => own.to_owned(),
        (_, Some(t)) => t,
        (None, None) => return Err(Problem::invalid("tenant", "missing: the tenant to add to")),
    };
    visible(&api, &who, &tenant).await?;
    if body.pinned_node.is_some() {
        who.require_super()
            .map_err(|p| p.with_field("pinned_node"))?;
    }
    let record = NumberRecord {
        number,
        tenant: tenant.clone(),
        pinned_node: body.pinned_node,
        settings: settings(body.settings)?,
    };
    let audit = AuditEntry {
        tenant: Some(tenant),
        actor: who.actor(),
        action: "number.create".to_owned(),
        target: record.number.to_string(),
        detail: json!({ "after": { "pinned_node": record.pinned_node, "settings": record.settings } }),
    };
    api.store
        .apply(&Change::AddNumber(record.clone()), &audit)
        .await
        .map_err(|e| stored(e, "this number is registered already"))?;
    api.reconcile.now().await;
    Ok((StatusCode::CREATED, Json(NumberView::of(record, None))))
}

#[utoipa::path(
    get,
    path = "/v1/numbers",
    tag = "numbers",
    summary = "List numbers, by number",
    params(("limit" = Option<u32>, Query, description = "items per page, 1 to 500 (default 100)"), ("cursor" = Option<String>, Query, description = "the next_cursor of the previous page"), ("tenant" = Option<String>, Query, description = "the super-admin's filter")),
    responses(
        (status = 200, body = Page<NumberView>),
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
) -> Result<Json<Page<NumberView>>, Problem> {
    who.require(Role::Viewer)?;
    let ask = q.page.ask()?;
    let tenant = who.narrow(q.tenant.as_deref())?;
    let after = ask.after_as(|a| PhoneNumber::parse(a).ok())?;
    let rows = api
        .store
        .numbers_page(tenant, after.as_ref(), ask.limit + 1)
        .await
        .map_err(|e| stored(e, ""))?;
    let page = Page::of(rows, &ask, |n| n.number.to_string());
    Ok(Json(Page {
        items: page
            .items
            .into_iter()
            .map(|r| NumberView::of(r, None))
            .collect(),
        next_cursor: page.next_cursor,
    }))
}

/// Where and how `number` runs: this node's fleet, else the lease's owner in a cluster.
async fn status_of(api: &Api, number: &PhoneNumber) -> Result<StatusView, Problem> {
    let here: Option<NumberStatus> = api
        .fleet
        .status(number)
        .await
        .map_err(|e| Problem::internal(&e))?;
    if let Some(s) = here {
        return Ok(StatusView {
            node: Some(api.node_id.clone()),
            state: Some(s.state.as_str()),
            qr: s.qr,
            pair_code: s.pair_code,
        });
    }
    let node = match &api.bus {
        Some(bus) => bus.owner(number).await.ok(),
        None => None,
    };
    Ok(StatusView {
        node,
        state: None,
        qr: None,
        pair_code: None,
    })
}

#[utoipa::path(
    get,
    path = "/v1/numbers/{number}",
    tag = "numbers",
    summary = "One number, with its live status",
    params(("number" = String, Path, description = "the number, E.164 (+15550001)")),
    responses(
        (status = 200, body = NumberView),
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
    Path(raw): Path<String>,
) -> Result<Json<NumberView>, Problem> {
    who.require(Role::Viewer)?;
    let record = visible_number(&api, &who, &raw).await?;
    let status = status_of(&api, &record.number).await?;
    Ok(Json(NumberView::of(record, Some(status))))
}

/// A field that may be absent (leave it), `null` (clear it) or a value.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// What to change: absent fields are left; `pinned_node: null` unpins.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct NumberPatch {
    #[schema(value_type = Option<Object>)]
    settings: Option<serde_json::Value>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pinned_node: Option<Option<String>>,
}

#[utoipa::path(
    patch,
    path = "/v1/numbers/{number}",
    tag = "numbers",
    summary = "Replace its settings; pin or unpin it",
    params(("number" = String, Path, description = "the number, E.164 (+15550001)")),
    request_body(content = NumberPatch, content_type = "application/json"),
    responses(
        (status = 200, body = NumberView),
        (status = 400, description = "malformed JSON or query", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "no token, or one that authenticates nothing", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "the token's role may not do this", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "no such resource (or another tenant's)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 413, description = "body over 64 KiB", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "a field is missing, of the wrong type or invalid (named in `field`)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 429, description = "this token's rate limit is spent (Retry-After)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "a dependency is unavailable", body = ProblemDoc, content_type = "application/problem+json")
    ),
    security(("bearer" = []))
)]
async fn update(
    State(api): State<Api>,
    who: Principal,
    Path(raw): Path<String>,
    JsonBody(patch): JsonBody<NumberPatch>,
) -> Result<Json<NumberView>, Problem> {
    let mut record = visible_number(&api, &who, &raw).await?;
    who.require(Role::Editor)?;
    let before = json!({ "pinned_node": record.pinned_node, "settings": record.settings });
    let mut changes = Vec::new();
    if let Some(s) = patch.settings {
        record.settings = settings(s)?;
        changes.push(Change::SetSettings(
            record.number.clone(),
            record.settings.clone(),
        ));
    }
    if let Some(pin) = patch.pinned_node {
        // Placement is the agency's: a tenant's token may not pick nodes.
        who.require_super()
            .map_err(|p| p.with_field("pinned_node"))?;
        if pin.as_deref().is_some_and(|p| p.trim().is_empty()) {
            return Err(Problem::invalid(
                "pinned_node",
                "a node id, or null to unpin",
            ));
        }
        record.pinned_node = pin.clone();
        changes.push(Change::Pin(record.number.clone(), pin));
    }
    let audit = AuditEntry {
        tenant: Some(record.tenant.clone()),
        actor: who.actor(),
        action: "number.update".to_owned(),
        target: record.number.to_string(),
        detail: json!({
            "before": before,
            "after": { "pinned_node": record.pinned_node, "settings": record.settings },
        }),
    };
    api.store
        .apply_all(&changes, &audit)
        .await
        .map_err(|e| stored(e, ""))?;
    api.reconcile.now().await;
    Ok(Json(NumberView::of(record, None)))
}

#[utoipa::path(
    delete,
    path = "/v1/numbers/{number}",
    tag = "numbers",
    summary = "Remove it: it disconnects and its data is deleted",
    params(("number" = String, Path, description = "the number, E.164 (+15550001)")),
    responses(
        (status = 204, description = "removed"),
        (status = 401, description = "no token, or one that authenticates nothing", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "the token's role may not do this", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "no such resource (or another tenant's)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 429, description = "this token's rate limit is spent (Retry-After)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "a dependency is unavailable", body = ProblemDoc, content_type = "application/problem+json")
    ),
    security(("bearer" = []))
)]
async fn remove(
    State(api): State<Api>,
    who: Principal,
    Path(raw): Path<String>,
) -> Result<StatusCode, Problem> {
    let record = visible_number(&api, &who, &raw).await?;
    who.require(Role::Admin)?;
    let audit = AuditEntry {
        tenant: Some(record.tenant.clone()),
        actor: who.actor(),
        action: "number.delete".to_owned(),
        target: record.number.to_string(),
        detail: json!({ "before": { "pinned_node": record.pinned_node, "settings": record.settings } }),
    };
    api.store
        .apply(&Change::RemoveNumber(record.number.clone()), &audit)
        .await
        .map_err(|e| stored(e, ""))?;
    api.reconcile.now().await;
    Ok(StatusCode::NO_CONTENT)
}

/// Carries `command` out where `number` runs: here, else through the cluster's bus.
async fn run(api: &Api, number: &PhoneNumber, command: NumberCommand) -> Result<Done, Problem> {
    let outcome = match api.fleet.run(number.clone(), command.clone()).await {
        Err(CommandError::NotHere(_)) if api.bus.is_some() => match &api.bus {
            Some(bus) => bus
                .send(number, &command, COMMAND_TIMEOUT)
                .await
                .map(|(_, done)| done),
            None => Err(CommandError::NotHere(number.clone())),
        },
        other => other,
    };
    outcome.map_err(command_problem)
}

/// A command's failure as the API answers it.
fn command_problem(e: CommandError) -> Problem {
    match e {
        CommandError::NoOwner(_) | CommandError::NotHere(_) => {
            Problem::conflict(format!("{e}: it is not running (yet)"))
        }
        CommandError::OwnerGone { .. } | CommandError::Unavailable(_) => Problem::unavailable(&e),
        CommandError::Timeout { .. } => {
            Problem::new(StatusCode::GATEWAY_TIMEOUT, "no answer", e.to_string())
        }
        CommandError::Invalid(m) => {
            let field = m.split(':').next().unwrap_or_default().to_owned();
            Problem::invalid(field, m)
        }
        CommandError::KeyReused => Problem::conflict(e.to_string()).with_field("Idempotency-Key"),
        CommandError::Failed(m) => Problem::conflict(m),
    }
}

/// Runs `command` on a visible number with at least `role`, audited as `action`.
async fn act(
    api: &Api,
    who: &Principal,
    raw: &str,
    role: Role,
    action: &str,
    command: NumberCommand,
) -> Result<Done, Problem> {
    let record = visible_number(api, who, raw).await?;
    who.require(role)?;
    let done = run(api, &record.number, command).await?;
    let audit = AuditEntry {
        tenant: Some(record.tenant),
        actor: who.actor(),
        action: action.to_owned(),
        target: record.number.to_string(),
        detail: json!({ "outcome": done.to_string() }),
    };
    api.store
        .apply(&Change::Act, &audit)
        .await
        .map_err(|e| stored(e, ""))?;
    Ok(done)
}

#[utoipa::path(
    post,
    path = "/v1/numbers/{number}/restart",
    tag = "numbers",
    summary = "A fresh start where it runs",
    params(("number" = String, Path, description = "the number, E.164 (+15550001)")),
    responses(
        (status = 202, description = "restarting"),
        (status = 401, description = "no token, or one that authenticates nothing", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "the token's role may not do this", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "no such resource (or another tenant's)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 409, description = "conflicts with what exists", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 429, description = "this token's rate limit is spent (Retry-After)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "a dependency is unavailable", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 504, description = "no answer in time", body = ProblemDoc, content_type = "application/problem+json")
    ),
    security(("bearer" = []))
)]
async fn restart(
    State(api): State<Api>,
    who: Principal,
    Path(raw): Path<String>,
) -> Result<StatusCode, Problem> {
    act(
        &api,
        &who,
        &raw,
        Role::Editor,
        "number.restart",
        NumberCommand::Restart,
    )
    .await?;
    Ok(StatusCode::ACCEPTED)
}

#[utoipa::path(
    post,
    path = "/v1/numbers/{number}/logout",
    tag = "numbers",
    summary = "Unlink its device (it must be paired again)",
    params(("number" = String, Path, description = "the number, E.164 (+15550001)")),
    responses(
        (status = 202, description = "logging out"),
        (status = 401, description = "no token, or one that authenticates nothing", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "the token's role may not do this", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "no such resource (or another tenant's)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 409, description = "conflicts with what exists", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 429, description = "this token's rate limit is spent (Retry-After)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "a dependency is unavailable", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 504, description = "no answer in time", body = ProblemDoc, content_type = "application/problem+json")
    ),
    security(("bearer" = []))
)]
async fn logout(
    State(api): State<Api>,
    who: Principal,
    Path(raw): Path<String>,
) -> Result<StatusCode, Problem> {
    act(
        &api,
        &who,
        &raw,
        Role::Admin,
        "number.logout",
        NumberCommand::Logout,
    )
    .await?;
    Ok(StatusCode::ACCEPTED)
}

/// A message to send: `to` is `DIGITS@s.whatsapp.net`, `ID@lid` or `ID@g.us`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct NewMessage {
    to: String,
    text: String,
}

/// A send as the API answers it.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct Sent {
    message_id: String,
    /// The key had been used before for this message: nothing new was queued.
    repeat: bool,
    idempotency_key: String,
}

#[utoipa::path(
    post,
    path = "/v1/numbers/{number}/messages",
    tag = "numbers",
    summary = "Send a message as the business",
    params(("number" = String, Path, description = "the number, E.164 (+15550001)"), ("Idempotency-Key" = Option<String>, Header, description = "the same key sends the message once")),
    request_body(content = NewMessage, content_type = "application/json"),
    responses(
        (status = 202, body = Sent),
        (status = 400, description = "malformed JSON or query", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "no token, or one that authenticates nothing", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "the token's role may not do this", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "no such resource (or another tenant's)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 409, description = "conflicts with what exists", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 413, description = "body over 64 KiB", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "a field is missing, of the wrong type or invalid (named in `field`)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 429, description = "this token's rate limit is spent (Retry-After)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "a dependency is unavailable", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 504, description = "no answer in time", body = ProblemDoc, content_type = "application/problem+json")
    ),
    security(("bearer" = []))
)]
async fn send(
    State(api): State<Api>,
    who: Principal,
    Path(raw): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<NewMessage>,
) -> Result<(StatusCode, Json<Sent>), Problem> {
    let key = match headers.get("idempotency-key") {
        Some(v) => v
            .to_str()
            .map_err(|_| Problem::invalid("Idempotency-Key", "printable ASCII"))?
            .to_owned(),
        None => format!("api-{:032x}", rand::random::<u128>()),
    };
    let message = BusinessSend::new(&body.to, &body.text, &key).map_err(|e| match e {
        CommandError::Invalid(m) if m.starts_with("key") => Problem::invalid("Idempotency-Key", m),
        other => command_problem(other),
    })?;
    let done = act(
        &api,
        &who,
        &raw,
        Role::Editor,
        "number.send",
        NumberCommand::Send(message),
    )
    .await?;
    match done {
        Done::Queued { id, repeat } => Ok((
            StatusCode::ACCEPTED,
            Json(Sent {
                message_id: id.to_string(),
                repeat,
                idempotency_key: key,
            }),
        )),
        Done::Done => Err(Problem::internal(&"a send answered without a message id")),
    }
}

#[derive(Debug, Default, Deserialize)]
struct QrQuery {
    /// `png` (the default) or `svg`.
    format: Option<String>,
}

/// The number's current QR code as an image, while it pairs on this node. Never cached: the
/// code rotates every few seconds.
#[utoipa::path(
    get,
    path = "/v1/numbers/{number}/qr",
    tag = "numbers",
    summary = "Its current QR code while it pairs",
    params(("number" = String, Path, description = "the number, E.164 (+15550001)"), ("format" = Option<String>, Query, description = "png (default) or svg")),
    responses(
        (status = 200, description = "the QR code", content(("image/png"), ("image/svg+xml"))),
        (status = 400, description = "malformed JSON or query", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "no token, or one that authenticates nothing", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "the token's role may not do this", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "no such resource (or another tenant's)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 409, description = "conflicts with what exists", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "a field is missing, of the wrong type or invalid (named in `field`)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 429, description = "this token's rate limit is spent (Retry-After)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "a dependency is unavailable", body = ProblemDoc, content_type = "application/problem+json")
    ),
    security(("bearer" = []))
)]
async fn qr(
    State(api): State<Api>,
    who: Principal,
    Path(raw): Path<String>,
    QueryParams(q): QueryParams<QrQuery>,
) -> Result<Response, Problem> {
    who.require(Role::Viewer)?;
    let svg = match q.format.as_deref() {
        None | Some("png") => false,
        Some("svg") => true,
        Some(_) => return Err(Problem::invalid("format", "png or svg")),
    };
    let record = visible_number(&api, &who, &raw).await?;
    let status = status_of(&api, &record.number).await?;
    let Some(code) = status.qr else {
        let detail = match (status.state, status.node) {
            (Some(state), _) => format!("{} is {state}: it shows no QR code", record.number),
            (None, Some(node)) => format!("{} runs on {node}: ask that node", record.number),
            (None, None) => format!("{} is not running", record.number),
        };
        return Err(Problem::conflict(detail));
    };
    let (kind, body) = if svg {
        let image = super::qr::svg(&code).map_err(|e| Problem::internal(&e))?;
        ("image/svg+xml", image.into_bytes())
    } else {
        let image = super::qr::png(&code).map_err(|e| Problem::internal(&e))?;
        ("image/png", image)
    };
    Ok((
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response())
}

/// The pair code as the API answers it.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct PairCodeView {
    /// Type it on the phone (Linked devices → Link with phone number).
    code: Option<String>,
}

/// Asks for a pair code and waits for it (on this node; through another node, the code shows in
/// that node's status).
#[utoipa::path(
    post,
    path = "/v1/numbers/{number}/pair-code",
    tag = "numbers",
    summary = "Ask for a pair code to type on the phone",
    params(("number" = String, Path, description = "the number, E.164 (+15550001)")),
    responses(
        (status = 200, body = PairCodeView),
        (status = 202, body = PairCodeView, description = "asked; the code shows in the status when it comes"),
        (status = 401, description = "no token, or one that authenticates nothing", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 403, description = "the token's role may not do this", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "no such resource (or another tenant's)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 409, description = "conflicts with what exists", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 429, description = "this token's rate limit is spent (Retry-After)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "a dependency is unavailable", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 504, description = "no answer in time", body = ProblemDoc, content_type = "application/problem+json")
    ),
    security(("bearer" = []))
)]
async fn pair_code(
    State(api): State<Api>,
    who: Principal,
    Path(raw): Path<String>,
) -> Result<(StatusCode, Json<PairCodeView>), Problem> {
    act(
        &api,
        &who,
        &raw,
        Role::Editor,
        "number.pair_code",
        NumberCommand::PairCode,
    )
    .await?;
    let number = number_of(&raw)?;
    let deadline = tokio::time::Instant::now() + PAIR_CODE_WAIT;
    loop {
        let status = status_of(&api, &number).await?;
        if let Some(code) = status.pair_code {
            return Ok((StatusCode::OK, Json(PairCodeView { code: Some(code) })));
        }
        if status.state.is_none() || tokio::time::Instant::now() >= deadline {
            return Ok((StatusCode::ACCEPTED, Json(PairCodeView { code: None })));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
