//! `switchboard sim serve`: the simulated network as a server.
//!
//! | route | does |
//! |---|---|
//! | `GET /healthz` | 200 when ready |
//! | `POST /accounts` `{"number"}` | create an unpaired account (idempotent) |
//! | `POST /accounts/{number}/pair` `{}` or `{"code"}` | the phone scans the QR, or enters the pair code |
//! | `POST /accounts/{number}/inbound` `{"from","text","group","id"}` | a contact writes; `{"id"}` |
//! | `POST /accounts/{number}/phone-send` `{"to","text"}` | a person writes from the account's phone; `{"id"}` |
//! | `POST /traffic` `{"numbers","contacts_per_number","rate_per_s","duration_s","seed"}` | scripted load; `{"run"}` |
//! | `POST /faults` `{"kind","number","ms","duration_s","code"}` | inject a fault |
//! | `GET /ledger/summary` | the referee's totals |
//! | `GET /ledger?number=` | every event of one account |
//! | `GET /wire` | WebSocket: one client connection, JSON frames, `hello` first |

use std::future::Future;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use switchboard_actors::ids::PhoneNumber;

use super::network::{self, FaultKind, Network, SimError, TrafficSpec};
use super::wire::ClientFrame;
use crate::http::problem::{JsonBody, Problem, parse_json};

/// The control API and the wire, over one network.
pub fn router(network: Network) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/accounts", post(create_account))
        .route("/accounts/{number}/pair", post(pair))
        .route("/accounts/{number}/inbound", post(inbound))
        .route("/accounts/{number}/phone-send", post(phone_send))
        .route("/traffic", post(traffic))
        .route("/faults", post(fault))
        .route("/ledger/summary", get(summary))
        .route("/ledger", get(ledger))
        .route("/wire", get(wire))
        .with_state(network)
}

/// Serves `router(network)` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    network: Network,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(network))
        .with_graceful_shutdown(shutdown)
        .await
}

impl From<SimError> for Problem {
    fn from(e: SimError) -> Self {
        match &e {
            SimError::UnknownAccount(_) => Problem::not_found(e.to_string()),
            SimError::NotPairing(_) | SimError::DuplicateId(_) => Problem::conflict(e.to_string()),
            SimError::WrongPairCode(_) => Problem::invalid("code", e.to_string()),
            SimError::Invalid { field, .. } => Problem::invalid(*field, e.to_string()),
        }
    }
}

fn path_number(raw: &str) -> Result<PhoneNumber, Problem> {
    PhoneNumber::parse(raw).map_err(|e| Problem::invalid("number", e.to_string()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateAccount {
    number: PhoneNumber,
}

async fn create_account(
    State(net): State<Network>,
    JsonBody(body): JsonBody<CreateAccount>,
) -> Response {
    let created = net.create_account(&body.number);
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (
        status,
        Json(json!({"number": body.number, "created": created})),
    )
        .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Pair {
    #[serde(default)]
    code: Option<String>,
}

async fn pair(
    State(net): State<Network>,
    Path(number): Path<String>,
    body: Bytes,
) -> Result<Json<serde_json::Value>, Problem> {
    let number = path_number(&number)?;
    // No body, or `{}`, scans the QR code; `{"code": …}` enters the pair code.
    let body: Pair = if body.iter().all(u8::is_ascii_whitespace) {
        Pair { code: None }
    } else {
        parse_json(&body)?
    };
    net.pair(&number, body.code.as_deref())?;
    Ok(Json(json!({"number": number, "paired": true})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PhoneSend {
    to: PhoneNumber,
    text: String,
}

async fn phone_send(
    State(net): State<Network>,
    Path(number): Path<String>,
    JsonBody(body): JsonBody<PhoneSend>,
) -> Result<Json<serde_json::Value>, Problem> {
    let number = path_number(&number)?;
    let id = net.phone_send(&number, &body.to, &body.text)?;
    Ok(Json(json!({"id": id})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Inbound {
    from: PhoneNumber,
    text: String,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    id: Option<String>,
}

async fn inbound(
    State(net): State<Network>,
    Path(number): Path<String>,
    JsonBody(body): JsonBody<Inbound>,
) -> Result<Json<serde_json::Value>, Problem> {
    let number = path_number(&number)?;
    let id = net.inbound(
        &number,
        &body.from,
        &body.text,
        body.group.as_deref(),
        body.id.as_deref(),
    )?;
    Ok(Json(json!({"id": id})))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Targets {
    List(Vec<PhoneNumber>),
    Keyword(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Traffic {
    numbers: Targets,
    #[serde(default = "default_contacts")]
    contacts_per_number: u32,
    rate_per_s: f64,
    duration_s: f64,
    #[serde(default)]
    seed: u64,
}

fn default_contacts() -> u32 {
    20
}

async fn traffic(
    State(net): State<Network>,
    JsonBody(body): JsonBody<Traffic>,
) -> Result<Json<serde_json::Value>, Problem> {
    let numbers = match body.numbers {
        Targets::List(list) => Some(list),
        Targets::Keyword(k) if k == "all" => None,
        Targets::Keyword(k) => {
            return Err(Problem::invalid(
                "numbers",
                format!("expected a list of numbers or \"all\", got {k:?}"),
            ));
        }
    };
    if !(body.duration_s.is_finite() && body.duration_s > 0.0 && body.duration_s <= 86_400.0) {
        return Err(Problem::invalid(
            "duration_s",
            "must be between 0 and 86400 seconds",
        ));
    }
    let run = net.start_traffic(TrafficSpec {
        numbers,
        contacts_per_number: body.contacts_per_number,
        rate_per_s: body.rate_per_s,
        duration: Duration::from_secs_f64(body.duration_s),
        seed: body.seed,
    })?;
    Ok(Json(json!({"run": run})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Fault {
    kind: FaultKind,
    number: PhoneNumber,
    #[serde(default)]
    ms: u64,
    #[serde(default)]
    duration_s: u64,
    #[serde(default)]
    code: Option<u16>,
}

async fn fault(
    State(net): State<Network>,
    JsonBody(body): JsonBody<Fault>,
) -> Result<Json<serde_json::Value>, Problem> {
    let fault = network::Fault {
        kind: body.kind,
        ms: body.ms,
        duration: Duration::from_secs(body.duration_s),
        code: body.code,
    };
    net.fault(&body.number, fault)?;
    Ok(Json(
        json!({"kind": body.kind, "number": body.number, "injected": true}),
    ))
}

async fn summary(State(net): State<Network>) -> Json<super::ledger::Summary> {
    Json(net.summary())
}

#[derive(Deserialize)]
struct LedgerQuery {
    number: Option<String>,
}

async fn ledger(
    State(net): State<Network>,
    Query(q): Query<LedgerQuery>,
) -> Result<Response, Problem> {
    let raw = q
        .number
        .ok_or_else(|| Problem::invalid("number", "the query parameter `number` is required"))?;
    // A literal `+` in a query string arrives as a space; accept it as the `+` it was.
    let raw = raw.trim();
    let number = PhoneNumber::parse(raw)
        .or_else(|_| PhoneNumber::parse(&format!("+{}", raw.trim_start_matches('+'))))
        .map_err(|e| Problem::invalid("number", e.to_string()))?;
    Ok(Json(json!({"number": number, "events": net.ledger(&number)})).into_response())
}

async fn wire(State(net): State<Network>, ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(move |socket| serve_wire(net, socket))
}

/// One client connection: the first frame must be `hello`; then frames flow both ways until
/// either side closes.
async fn serve_wire(net: Network, socket: WebSocket) {
    let (mut sink, mut stream) = socket.split();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next()).await;
    let Ok(Some(Ok(Message::Text(text)))) = first else {
        return;
    };
    let Ok(ClientFrame::Hello {
        number,
        label,
        credentials,
    }) = serde_json::from_str::<ClientFrame>(&text)
    else {
        let _ = sink.send(Message::Close(None)).await;
        return;
    };
    let (tx, mut rx) = net.connect(&number, &label, credentials.as_deref());
    loop {
        tokio::select! {
            frame = rx.recv() => match frame.and_then(|f| serde_json::to_string(&f).ok()) {
                Some(text) => {
                    if sink.send(Message::text(text)).await.is_err() {
                        break;
                    }
                }
                None => break,
            },
            incoming = stream.next() => match incoming {
                Some(Ok(Message::Text(text))) => match serde_json::from_str::<ClientFrame>(&text) {
                    Ok(frame) => tx.send(frame),
                    Err(e) => tracing::debug!(error = %e, "unreadable client frame"),
                },
                Some(Ok(Message::Close(_)) | Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
        }
    }
    drop(rx);
    let _ = sink.send(Message::Close(None)).await;
}
