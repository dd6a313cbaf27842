//! `sim serve` contract test: drives every control route of SIMULATOR.md over HTTP, connects
//! clients over the wire, and checks the ledger summary against what it did.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use switchboard::sim::{Dialer, Network, SimConfig, SimConnector, server};
use switchboard_actors::coordinator::Lease;
use switchboard_actors::store::{Fence, FencingToken};
use switchboard_actors::transport::{
    AccountSpec, Credentials, InboundMessage, MessageId, OutboundText, WaConnector, WaEvent,
    WaSession,
};
use switchboard_actors::{Jid, PhoneNumber};

struct Client {
    session: Arc<dyn WaSession>,
    events: Arc<Mutex<Vec<WaEvent>>>,
}

impl Client {
    async fn start(addr: &str, number: &str, label: &str, creds: Option<Credentials>) -> Self {
        let events: Arc<Mutex<Vec<WaEvent>>> = Arc::default();
        let sink_events = events.clone();
        let connector = SimConnector::new(Dialer::Remote(addr.to_owned()));
        let account = AccountSpec {
            number: PhoneNumber::parse(number).unwrap(),
            client_label: label.into(),
            credentials: creds,
            lease: Lease::new(Fence {
                number: PhoneNumber::parse(number).unwrap(),
                token: FencingToken::new(1).unwrap(),
            }),
        };
        let session = connector
            .start(
                account,
                Arc::new(move |e| sink_events.lock().unwrap().push(e)),
            )
            .await
            .unwrap();
        Self { session, events }
    }

    async fn wait(&self, what: &str, pred: impl Fn(&WaEvent) -> bool) -> WaEvent {
        for _ in 0..1000 {
            if let Some(e) = self
                .events
                .lock()
                .unwrap()
                .iter()
                .find(|e| pred(e))
                .cloned()
            {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no {what}; events: {:?}", self.events.lock().unwrap());
    }

    /// Waits for the message with id `id` and returns it.
    async fn message(&self, what: &str, id: &str) -> InboundMessage {
        match self
            .wait(
                what,
                |e| matches!(e, WaEvent::Message(m) if m.id.as_str() == id),
            )
            .await
        {
            WaEvent::Message(m) => m,
            other => unreachable!("{other:?}"),
        }
    }

    fn count(&self, pred: impl Fn(&WaEvent) -> bool) -> usize {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| pred(e))
            .count()
    }
}

struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let problem = r
            .headers()
            .get("content-type")
            .is_some_and(|v| v == "application/problem+json");
        let body: Value = r.json().await.unwrap_or(Value::Null);
        assert!(
            status < 400 || problem,
            "{path}: error {status} is not problem+json"
        );
        (status, body)
    }
    async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }
}

fn out(id: &str, to: &Jid, reply_to: Option<&str>) -> OutboundText {
    OutboundText {
        id: MessageId::parse(id).unwrap(),
        to: to.clone(),
        text: "thanks".into(),
        reply_to: reply_to.map(|r| MessageId::parse(r).unwrap()),
        reply_to_sender: None,
    }
}

#[tokio::test]
async fn every_control_route_and_the_ledger_agree_with_what_happened() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let network = Network::new(SimConfig::default());
    tokio::spawn(server::serve(listener, network, std::future::pending()));
    let api = Api {
        http: reqwest::Client::new(),
        base: format!("http://{addr}"),
    };
    let (a, b, contact) = ("+15550201", "+15550202", "+4915300001");

    // GET /healthz
    assert_eq!(
        api.http
            .get(format!("{}/healthz", api.base))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // POST /accounts: idempotent, and bad input names the field.
    assert_eq!(api.post("/accounts", json!({"number": a})).await.0, 201);
    assert_eq!(
        api.post("/accounts", json!({"number": a})).await,
        (200, json!({"number": a, "created": false}))
    );
    let (status, problem) = api.post("/accounts", json!({"number": "555"})).await;
    assert_eq!((status, problem["field"].as_str()), (422, Some("number")));
    let (status, problem) = api.post("/accounts", json!({})).await;
    assert_eq!((status, problem["field"].as_str()), (422, Some("number")));

    // Pairing over the wire, confirmed by POST /accounts/{number}/pair.
    let c1 = Client::start(&addr, a, "node-a", None).await;
    c1.wait("qr", |e| matches!(e, WaEvent::QrCode { .. })).await;
    assert_eq!(
        api.post(&format!("/accounts/{a}/pair"), json!({})).await.0,
        200
    );
    let WaEvent::PairSuccess { credentials } = c1
        .wait("paired", |e| matches!(e, WaEvent::PairSuccess { .. }))
        .await
    else {
        unreachable!()
    };
    c1.wait("connected", |e| *e == WaEvent::Connected).await;
    assert_eq!(
        api.post(&format!("/accounts/{a}/pair"), json!({})).await.0,
        409,
        "nothing to pair"
    );

    // POST /accounts/{number}/inbound, then replies: one answer, a second distinct answer to the
    // same message, a repeat of an outbound id, and a fourth send inside a second.
    let (_, body) = api
        .post(
            &format!("/accounts/{a}/inbound"),
            json!({"from": contact, "text": "hi", "group": null, "id": null}),
        )
        .await;
    let id1 = body["id"].as_str().unwrap().to_owned();
    let m1 = c1.message("inbound", &id1).await;
    c1.session.ack(&[m1.key()]);
    for id in ["3EB0R1", "3EB0R2", "3EB0R1"] {
        c1.session
            .send_text(out(id, &m1.chat, Some(&id1)))
            .await
            .unwrap();
    }
    c1.session
        .send_text(out("3EB0R3", &m1.chat, None))
        .await
        .unwrap();
    c1.wait("rate-overlimit", |e| {
        matches!(e, WaEvent::ServerAck(a) if a.id.as_str() == "3EB0R3"
            && a.error.as_ref().is_some_and(|e| e.is_rate_limit()))
    })
    .await;
    c1.wait("receipt", |e| matches!(e, WaEvent::Receipt(_)))
        .await;
    assert_eq!(
        c1.count(|e| matches!(e, WaEvent::FromPhone(_))),
        0,
        "no copy of our own sends"
    );

    // POST /accounts/{number}/phone-send: the linked device sees it as from the phone.
    let (status, sent) = api
        .post(
            &format!("/accounts/{a}/phone-send"),
            json!({"to": contact, "text": "a person answers"}),
        )
        .await;
    assert_eq!(status, 200);
    let from_phone = c1
        .wait("from phone", |e| matches!(e, WaEvent::FromPhone(_)))
        .await;
    let WaEvent::FromPhone(m) = from_phone else {
        unreachable!()
    };
    assert_eq!(Some(m.id.as_str()), sent["id"].as_str());
    assert!(m.is_from_me);
    let (status, problem) = api
        .post(&format!("/accounts/{a}/phone-send"), json!({"to": "x"}))
        .await;
    assert_eq!((status, problem["field"].as_str()), (422, Some("to")));

    let (status, _) = api
        .post(
            &format!("/accounts/{a}/inbound"),
            json!({"from": contact, "text": "x", "id": "X1"}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        api.post(
            &format!("/accounts/{a}/inbound"),
            json!({"from": contact, "text": "x", "id": "X1"})
        )
        .await
        .0,
        409
    );
    let (_, g) = api
        .post(
            &format!("/accounts/{a}/inbound"),
            json!({"from": contact, "text": "hey all", "group": "120363-5"}),
        )
        .await;
    let gid = g["id"].as_str().unwrap().to_owned();
    let gm = c1.message("group message", &gid).await;
    assert_eq!(gm.chat, Jid::group("120363-5").unwrap());
    assert_eq!(
        api.post(
            "/accounts/+15559999/inbound",
            json!({"from": contact, "text": "?"})
        )
        .await
        .0,
        404
    );
    let (status, problem) = api
        .post(&format!("/accounts/{a}/inbound"), json!({"from": contact}))
        .await;
    assert_eq!((status, problem["field"].as_str()), (422, Some("text")));

    // POST /traffic
    let (status, run) = api
        .post("/traffic", json!({"numbers": [a], "contacts_per_number": 2, "rate_per_s": 20, "duration_s": 0.5, "seed": 7}))
        .await;
    assert_eq!((status, run["run"].as_u64()), (200, Some(1)));
    let (status, problem) = api
        .post(
            "/traffic",
            json!({"numbers": "some", "rate_per_s": 1, "duration_s": 1}),
        )
        .await;
    assert_eq!((status, problem["field"].as_str()), (422, Some("numbers")));
    let mut traffic_inbound = 0;
    for _ in 0..200 {
        traffic_inbound = api.get("/ledger/summary").await.1["inbound"]
            .as_u64()
            .unwrap()
            - 3;
        if traffic_inbound >= 8 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        traffic_inbound >= 8,
        "traffic delivered {traffic_inbound} messages"
    );

    // POST /faults: latency, drop (redelivery follows), replace (and a ping-pong reconnect).
    let fault = |kind: &str, number: &str| json!({"kind": kind, "number": number, "ms": 5, "duration_s": 1});
    assert_eq!(api.post("/faults", fault("latency", a)).await.0, 200);
    let (status, problem) = api.post("/faults", fault("meteor", a)).await;
    assert_eq!((status, problem["field"].as_str()), (422, Some("kind")));
    assert_eq!(api.post("/faults", fault("drop", "+15559999")).await.0, 404);
    let before = c1.count(|e| matches!(e, WaEvent::Message(m) if m.id.as_str() == "X1"));
    assert_eq!(
        api.post("/faults", json!({"kind": "drop", "number": a}))
            .await
            .0,
        200
    );
    c1.wait("disconnected", |e| {
        matches!(e, WaEvent::Disconnected { .. })
    })
    .await;
    for _ in 0..300 {
        if c1.count(|e| matches!(e, WaEvent::Message(m) if m.id.as_str() == "X1")) > before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        c1.count(|e| matches!(e, WaEvent::Message(m) if m.id.as_str() == "X1")),
        before + 1,
        "redelivered after the drop"
    );
    assert_eq!(
        c1.count(|e| matches!(e, WaEvent::Message(m) if m.id.as_str() == id1)),
        1,
        "acked: not redelivered"
    );

    assert_eq!(
        api.post("/faults", json!({"kind": "replace", "number": a}))
            .await
            .0,
        200
    );
    c1.wait("replaced", |e| *e == WaEvent::StreamReplaced).await;
    let c2 = Client::start(&addr, a, "node-a", Some(credentials)).await;
    c2.wait("connected again", |e| *e == WaEvent::Connected)
        .await;

    // Ban and logout.
    assert_eq!(api.post("/accounts", json!({"number": b})).await.0, 201);
    // b pairs by code: the device shows it, the phone enters it.
    let cb = Client::start(&addr, b, "node-b", None).await;
    cb.wait("qr", |e| matches!(e, WaEvent::QrCode { .. })).await;
    cb.session.request_pair_code().await.unwrap();
    let WaEvent::PairCode { code, .. } = cb
        .wait("pair code", |e| matches!(e, WaEvent::PairCode { .. }))
        .await
    else {
        unreachable!()
    };
    let (status, problem) = api
        .post(&format!("/accounts/{b}/pair"), json!({"code": "NOTTHIS1"}))
        .await;
    assert_eq!((status, problem["field"].as_str()), (422, Some("code")));
    let (status, problem) = api
        .post(&format!("/accounts/{b}/pair"), json!({"cod": code}))
        .await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(
        api.post(&format!("/accounts/{b}/pair"), json!({ "code": code }))
            .await
            .0,
        200
    );
    cb.wait("connected", |e| *e == WaEvent::Connected).await;
    assert_eq!(
        api.post(
            "/faults",
            json!({"kind": "ban", "number": b, "duration_s": 30})
        )
        .await
        .0,
        200
    );
    cb.wait("banned", |e| matches!(e, WaEvent::TemporaryBan { .. }))
        .await;
    assert_eq!(
        api.post("/faults", json!({"kind": "logout", "number": a}))
            .await
            .0,
        200
    );
    c2.wait("logged out", |e| *e == WaEvent::LoggedOut).await;

    // GET /ledger/summary: the referee saw exactly this.
    let (_, s) = api.get("/ledger/summary").await;
    let inbound = s["inbound"].as_u64().unwrap();
    assert!(inbound >= 3 + 8);
    assert_eq!(s["accounts"], 2);
    assert_eq!(s["inbound_acked"], 1);
    assert_eq!(s["inbound_unanswered"].as_u64().unwrap(), inbound - 1);
    assert_eq!(s["outbound"], 2, "distinct messages");
    assert_eq!(s["duplicate_outbound_ids"], 1);
    assert_eq!(s["resent_same_id"], 1);
    assert_eq!(s["duplicate_replies"], 1);
    assert_eq!(s["shown_twice"], 1, "R2 repeats R1's text and quote");
    assert_eq!(s["ack_errors"], 1);
    assert_eq!(s["phone_sent"], 1);
    assert_eq!(s["stream_replaced"], 1);
    assert_eq!(s["replaced_then_reconnected"], 1);
    assert_eq!(s["rate_overlimit"], 1);

    // GET /ledger?number=: a literal `+` and an encoded one both work.
    for query in [a.to_owned(), a.replace('+', "%2B")] {
        let (status, ledger) = api.get(&format!("/ledger?number={query}")).await;
        assert_eq!(status, 200);
        let events = ledger["events"].as_array().unwrap();
        let has = |pred: &dyn Fn(&Value) -> bool| events.iter().any(pred);
        assert!(has(
            &|e| e["event"] == "inbound_offered" && e["id"] == id1.as_str()
        ));
        assert!(has(
            &|e| e["event"] == "inbound_acknowledged" && e["id"] == id1.as_str()
        ));
        assert!(has(&|e| e["event"] == "outbound_received"
            && e["reply_to"] == id1.as_str()
            && e["to"] == m1.chat.as_str()));
        assert!(has(
            &|e| e["event"] == "outbound_received" && e["resend"] == true
        ));
        assert!(has(&|e| e["event"] == "ack_sent"
            && e["id"] == "3EB0R3"
            && e["error"]["code"] == 429));
        assert!(has(
            &|e| e["event"] == "connection_opened" && e["client"] == "node-a"
        ));
        assert!(has(
            &|e| e["event"] == "connection_closed" && e["reason"] == "stream_replaced"
        ));
    }
    assert_eq!(api.get("/ledger").await.0, 422);
}
