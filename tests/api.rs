//! The admin API of a running `serve` (in-process, on a fresh PostgreSQL database, the simulator
//! as WhatsApp): every route's success path and its failures, each with its exact status and an
//! `application/problem+json` body; every role on every route; a number created over the API
//! pairs and answers with no restart, and a deleted one disconnects and its data is gone.
#![allow(clippy::unwrap_used, clippy::panic)]

#[path = "support/db.rs"]
mod db;

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use switchboard::config::Config;
use switchboard::sim::{Network, SimConfig};
use switchboard::store::{Dialect, SessionCipher};
use switchboard_actors::PhoneNumber;
use tokio::time::Instant;

/// The bootstrap super-admin token of every test server.
const SUPER: &str = "super-admin-token-of-the-tests-0123456789";

struct Server {
    base: String,
    http: reqwest::Client,
    network: Network,
    db: db::TestDb,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    sim: tokio::task::JoinHandle<std::io::Result<()>>,
    _dir: tempfile::TempDir,
}

/// A response: status, body (JSON, or `null`), content type.
struct Answer {
    status: u16,
    body: Value,
    content_type: String,
    www_authenticate: Option<String>,
}

impl Answer {
    /// Asserts a problem with `status`, naming `field` if given.
    #[track_caller]
    fn problem(&self, status: u16, field: Option<&str>) {
        assert_eq!(self.status, status, "{}", self.body);
        assert_eq!(
            self.content_type, "application/problem+json",
            "{}",
            self.body
        );
        assert_eq!(self.body["status"], status, "{}", self.body);
        assert!(self.body["title"].is_string() && self.body["detail"].is_string());
        if let Some(field) = field {
            assert_eq!(self.body["field"], field, "{}", self.body);
        }
    }
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

async fn server() -> Server {
    server_with("").await
}

/// A server with `http` lines added to its `[http]` section.
async fn server_with(http: &str) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let db = db::TestDb::new(Dialect::Postgres).await;
    let network = Network::new(SimConfig::default());
    let sim_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim_addr = sim_listener.local_addr().unwrap();
    let sim = tokio::spawn(switchboard::sim::server::serve(
        sim_listener,
        network.clone(),
        std::future::pending(),
    ));
    let listen = free_addr();
    let file = dir.path().join("node.toml");
    std::fs::write(
        &file,
        format!(
            "[store]\nurl = \"{}\"\nsession_keys = \"{}\"\n\
             [transport]\nsim_url = \"http://{sim_addr}\"\n\
             [http]\nlisten = \"{listen}\"\nadmin_token = \"{SUPER}\"\n{http}\n\
             [runtime]\ntyping_per_char = \"0ms\"\n",
            db.url,
            SessionCipher::generate("k1"),
        ),
    )
    .unwrap();
    let config = Config::load(Some(&file)).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(switchboard::serve::run(config, async {
        let _ = stopped.await;
    }));
    let server = Server {
        base: format!("http://{listen}"),
        http: reqwest::Client::new(),
        network,
        db,
        stop: Some(stop),
        task: Some(task),
        sim,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while server
        .raw(Method::GET, "/readyz", None, None, &[])
        .await
        .status
        != 200
    {
        assert!(Instant::now() < deadline, "serve not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server
}

impl Server {
    async fn raw(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let Ok(resp) = req.send().await else {
            return Answer {
                status: 0,
                body: Value::Null,
                content_type: String::new(),
                www_authenticate: None,
            };
        };
        let status = resp.status().as_u16();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let content_type = header("content-type").unwrap_or_default();
        let www_authenticate = header("www-authenticate");
        let text = resp.text().await.unwrap_or_default();
        Answer {
            status,
            body: serde_json::from_str(&text).unwrap_or(Value::Null),
            content_type,
            www_authenticate,
        }
    }

    async fn call(&self, method: Method, path: &str, token: &str, body: Option<Value>) -> Answer {
        let body = body.map(|b| b.to_string().into_bytes());
        self.raw(method, path, Some(token), body, &[]).await
    }

    async fn get(&self, path: &str, token: &str) -> Answer {
        self.call(Method::GET, path, token, None).await
    }

    async fn post(&self, path: &str, token: &str, body: Value) -> Answer {
        self.call(Method::POST, path, token, Some(body)).await
    }

    /// A tenant `id` with one token per role: (admin, editor, viewer).
    async fn tenant(&self, id: &str) -> Tokens {
        let a = self
            .post(
                "/v1/tenants",
                SUPER,
                json!({ "id": id, "name": format!("Tenant {id}") }),
            )
            .await;
        assert_eq!(a.status, 201, "{}", a.body);
        let mut made = Vec::new();
        for role in ["admin", "editor", "viewer"] {
            let a = self
                .post(
                    &format!("/v1/tenants/{id}/tokens"),
                    SUPER,
                    json!({ "name": format!("{role} token"), "role": role }),
                )
                .await;
            assert_eq!(a.status, 201, "{}", a.body);
            made.push(a.body["token"].as_str().unwrap().to_owned());
        }
        Tokens {
            admin: made[0].clone(),
            editor: made[1].clone(),
            viewer: made[2].clone(),
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("shutdown within its deadline")
                .unwrap()
                .unwrap();
        }
        self.sim.abort();
    }
}

struct Tokens {
    admin: String,
    editor: String,
    viewer: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_and_tokens_answer_success_and_every_failure_with_a_problem() {
    let s = server().await;
    // No token, a malformed header, an unknown token: 401, asking for a bearer token.
    let none = s.raw(Method::GET, "/v1/tenants", None, None, &[]).await;
    none.problem(401, None);
    assert_eq!(none.www_authenticate.as_deref(), Some("Bearer"));
    s.raw(
        Method::GET,
        "/v1/tenants",
        None,
        None,
        &[("authorization", "Basic eDp5")],
    )
    .await
    .problem(401, None);
    s.get("/v1/tenants", "sbt_unknown").await.problem(401, None);

    // Create: success, duplicate, bad id, malformed JSON, wrong type, missing and unknown fields.
    let t1 = s
        .post("/v1/tenants", SUPER, json!({ "id": "t1", "name": "One" }))
        .await;
    assert_eq!(t1.status, 201, "{}", t1.body);
    assert_eq!(
        t1.body,
        json!({ "id": "t1", "name": "One", "full_transcripts": false })
    );
    s.post("/v1/tenants", SUPER, json!({ "id": "t1", "name": "Again" }))
        .await
        .problem(409, None);
    s.post("/v1/tenants", SUPER, json!({ "id": "Not OK", "name": "x" }))
        .await
        .problem(422, Some("id"));
    s.raw(
        Method::POST,
        "/v1/tenants",
        Some(SUPER),
        Some(b"{\"id\": ".to_vec()),
        &[],
    )
    .await
    .problem(400, None);
    s.post(
        "/v1/tenants",
        SUPER,
        json!({ "id": "t9", "name": "x", "full_transcripts": "yes" }),
    )
    .await
    .problem(422, Some("full_transcripts"));
    s.post("/v1/tenants", SUPER, json!({ "id": "t9" }))
        .await
        .problem(422, Some("name"));
    s.post(
        "/v1/tenants",
        SUPER,
        json!({ "id": "t9", "name": "x", "colour": "red" }),
    )
    .await
    .problem(422, Some("colour"));
    s.post("/v1/tenants", SUPER, json!({ "id": "t9", "name": "  " }))
        .await
        .problem(422, Some("name"));
    let big = vec![b' '; switchboard::http::BODY_LIMIT + 1];
    s.raw(Method::POST, "/v1/tenants", Some(SUPER), Some(big), &[])
        .await
        .problem(413, None);

    // Lists page with a cursor; a bad limit or cursor names itself.
    s.post("/v1/tenants", SUPER, json!({ "id": "t2", "name": "Two" }))
        .await;
    let first = s.get("/v1/tenants?limit=1", SUPER).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.body["items"][0]["id"], "t1");
    let cursor = first.body["next_cursor"].as_str().unwrap().to_owned();
    let second = s
        .get(&format!("/v1/tenants?limit=1&cursor={cursor}"), SUPER)
        .await;
    assert_eq!(second.body["items"][0]["id"], "t2");
    assert!(second.body.get("next_cursor").is_none(), "{}", second.body);
    s.get("/v1/tenants?limit=0", SUPER)
        .await
        .problem(422, Some("limit"));
    s.get("/v1/tenants?limit=many", SUPER)
        .await
        .problem(422, Some("limit"));
    s.get("/v1/tenants?cursor=%25%25", SUPER)
        .await
        .problem(422, Some("cursor"));

    // Tokens: the secret is shown once; lists never show it; a revoked one is refused.
    let made = s
        .post(
            "/v1/tenants/t1/tokens",
            SUPER,
            json!({ "name": "ops", "role": "admin" }),
        )
        .await;
    assert_eq!(made.status, 201, "{}", made.body);
    let admin = made.body["token"].as_str().unwrap().to_owned();
    assert!(admin.starts_with("sbt_"));
    let id = made.body["id"].as_str().unwrap().to_owned();
    s.post(
        "/v1/tenants/t1/tokens",
        SUPER,
        json!({ "name": "x", "role": "owner" }),
    )
    .await
    .problem(422, Some("role"));
    s.post("/v1/tenants/t1/tokens", SUPER, json!({ "role": "viewer" }))
        .await
        .problem(422, Some("name"));
    s.post(
        "/v1/tenants/t404/tokens",
        SUPER,
        json!({ "name": "x", "role": "viewer" }),
    )
    .await
    .problem(404, None);
    let list = s.get("/v1/tenants/t1/tokens", &admin).await;
    assert_eq!(list.status, 200, "{}", list.body);
    assert_eq!(list.body["items"][0]["id"], id.as_str());
    assert!(
        list.body["items"][0].get("token").is_none(),
        "no secret in lists"
    );
    assert!(!list.body.to_string().contains(&admin));

    // A tenant's token sees its own tenant only: another's is a 404, never a 403.
    assert_eq!(s.get("/v1/tenants/t1", &admin).await.status, 200);
    s.get("/v1/tenants/t2", &admin).await.problem(404, None);
    s.get("/v1/tenants/t2/tokens", &admin)
        .await
        .problem(404, None);
    s.get("/v1/tenants/nope", SUPER).await.problem(404, None);
    // Only the super-admin lists or creates tenants.
    s.get("/v1/tenants", &admin).await.problem(403, None);
    s.post("/v1/tenants", &admin, json!({ "id": "t3", "name": "x" }))
        .await
        .problem(403, None);

    let other = s
        .post(
            "/v1/tenants/t1/tokens",
            &admin,
            json!({ "name": "temp", "role": "viewer" }),
        )
        .await;
    let (other_id, other_secret) = (
        other.body["id"].as_str().unwrap().to_owned(),
        other.body["token"].as_str().unwrap().to_owned(),
    );
    assert_eq!(s.get("/v1/tenants/t1", &other_secret).await.status, 200);
    let revoked = s
        .call(
            Method::DELETE,
            &format!("/v1/tenants/t1/tokens/{other_id}"),
            &admin,
            None,
        )
        .await;
    assert_eq!(revoked.status, 204);
    s.get("/v1/tenants/t1", &other_secret)
        .await
        .problem(401, None);
    s.call(
        Method::DELETE,
        &format!("/v1/tenants/t1/tokens/{other_id}"),
        &admin,
        None,
    )
    .await
    .problem(404, None);

    // Every mutation left an audit row, newest first; a tenant's admin reads its own only.
    let log = s.get("/v1/audit", &admin).await;
    assert_eq!(log.status, 200, "{}", log.body);
    let actions: Vec<&str> = log.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "token.revoke",
            "token.create",
            "token.create",
            "tenant.create"
        ],
        "{}",
        log.body
    );
    assert!(
        log.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["tenant"] == "t1")
    );
    assert_eq!(
        log.body["items"][0]["actor"],
        id.as_str(),
        "the revoking token"
    );
    let all = s.get("/v1/audit?limit=2", SUPER).await;
    assert_eq!(all.body["items"].as_array().unwrap().len(), 2);
    let next = all.body["next_cursor"].as_str().unwrap();
    let older = s
        .get(&format!("/v1/audit?limit=2&cursor={next}"), SUPER)
        .await;
    assert_eq!(older.status, 200);
    assert_ne!(older.body["items"][0], all.body["items"][0]);
    s.get("/v1/audit?tenant=t2", &admin)
        .await
        .problem(404, None);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_answer_success_and_every_failure_with_a_problem() {
    let s = server().await;
    let t1 = s.tenant("t1").await;
    let t2 = s.tenant("t2").await;
    let n = "+15550101";
    s.network.create_account(&PhoneNumber::parse(n).unwrap());

    let made = s
        .post("/v1/numbers", &t1.editor, json!({ "number": n }))
        .await;
    assert_eq!(made.status, 201, "{}", made.body);
    assert_eq!(made.body["tenant"], "t1");
    assert_eq!(made.body["settings"], json!({}));
    s.post("/v1/numbers", &t1.editor, json!({ "number": n }))
        .await
        .problem(409, None);
    s.post("/v1/numbers", &t1.editor, json!({ "number": "15550101" }))
        .await
        .problem(422, Some("number"));
    s.post("/v1/numbers", &t1.editor, json!({ "number": 15550101 }))
        .await
        .problem(422, Some("number"));
    s.post("/v1/numbers", &t1.editor, json!({}))
        .await
        .problem(422, Some("number"));
    s.post(
        "/v1/numbers",
        &t1.editor,
        json!({ "number": "+15550102", "settings": [1] }),
    )
    .await
    .problem(422, Some("settings"));
    s.post("/v1/numbers", &t1.viewer, json!({ "number": "+15550102" }))
        .await
        .problem(403, None);
    s.post("/v1/numbers", SUPER, json!({ "number": "+15550102" }))
        .await
        .problem(422, Some("tenant"));
    s.post(
        "/v1/numbers",
        &t1.editor,
        json!({ "number": "+15550102", "tenant": "t2" }),
    )
    .await
    .problem(404, None);

    // Lists: a tenant sees its own; paging by number.
    for extra in ["+15550103", "+15550104"] {
        assert_eq!(
            s.post("/v1/numbers", &t1.editor, json!({ "number": extra }))
                .await
                .status,
            201
        );
    }
    let page = s.get("/v1/numbers?limit=2", &t1.viewer).await;
    assert_eq!(page.status, 200);
    let got: Vec<&str> = page.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["number"].as_str().unwrap())
        .collect();
    assert_eq!(got, ["+15550101", "+15550103"]);
    let cursor = page.body["next_cursor"].as_str().unwrap();
    let rest = s
        .get(&format!("/v1/numbers?limit=2&cursor={cursor}"), &t1.viewer)
        .await;
    assert_eq!(rest.body["items"][0]["number"], "+15550104");
    assert!(rest.body.get("next_cursor").is_none());
    let theirs = s.get("/v1/numbers", &t2.viewer).await;
    assert_eq!(theirs.body["items"], json!([]));
    s.get("/v1/numbers?tenant=t1", &t2.viewer)
        .await
        .problem(404, None);
    let all = s.get("/v1/numbers?tenant=t1", SUPER).await;
    assert_eq!(all.body["items"].as_array().unwrap().len(), 3);

    // One number, with its live status; another tenant's, an unknown or a malformed one: 404.
    let one = s.get(&format!("/v1/numbers/{n}"), &t1.viewer).await;
    assert_eq!(one.status, 200, "{}", one.body);
    assert!(one.body["status"]["node"].is_string(), "{}", one.body);
    s.get(&format!("/v1/numbers/{n}"), &t2.admin)
        .await
        .problem(404, None);
    s.get("/v1/numbers/+15559999999", &t1.viewer)
        .await
        .problem(404, None);
    s.get("/v1/numbers/not-a-number", &t1.viewer)
        .await
        .problem(404, None);

    // Update: settings replaced, pin set and cleared; wrong shapes name the field.
    let path = format!("/v1/numbers/{n}");
    let patched = s
        .call(
            Method::PATCH,
            &path,
            SUPER,
            Some(json!({ "settings": { "greeting": "hola" }, "pinned_node": "node-x" })),
        )
        .await;
    assert_eq!(patched.status, 200, "{}", patched.body);
    assert_eq!(patched.body["settings"]["greeting"], "hola");
    assert_eq!(patched.body["pinned_node"], "node-x");
    // Placement is the agency's: a tenant's token may change settings, not pins.
    s.call(
        Method::PATCH,
        &path,
        &t1.admin,
        Some(json!({ "pinned_node": "node-y" })),
    )
    .await
    .problem(403, Some("pinned_node"));
    let unpinned = s
        .call(
            Method::PATCH,
            &path,
            SUPER,
            Some(json!({ "pinned_node": null })),
        )
        .await;
    assert_eq!(unpinned.body["pinned_node"], Value::Null);
    assert_eq!(
        unpinned.body["settings"]["greeting"], "hola",
        "settings kept"
    );
    s.call(
        Method::PATCH,
        &path,
        &t1.editor,
        Some(json!({ "settings": "x" })),
    )
    .await
    .problem(422, Some("settings"));
    s.call(
        Method::PATCH,
        &path,
        SUPER,
        Some(json!({ "pinned_node": 3 })),
    )
    .await
    .problem(422, Some("pinned_node"));
    s.call(
        Method::PATCH,
        &path,
        &t1.viewer,
        Some(json!({ "settings": {} })),
    )
    .await
    .problem(403, None);
    s.call(
        Method::PATCH,
        &path,
        &t2.admin,
        Some(json!({ "settings": {} })),
    )
    .await
    .problem(404, None);

    // Commands: restart (editor), logout (admin only).
    wait_state(&s, n, &t1.viewer, "pairing").await;
    assert_eq!(
        s.post(&format!("{path}/restart"), &t1.editor, json!({}))
            .await
            .status,
        202
    );
    s.post(&format!("{path}/logout"), &t1.editor, json!({}))
        .await
        .problem(403, None);
    s.post(&format!("{path}/restart"), &t2.admin, json!({}))
        .await
        .problem(404, None);

    // Sends: queued once per key; a reused key or bad input named; oversized refused.
    let server = &s;
    let send = |key: &str, body: Value| {
        let body = body.to_string().into_bytes();
        let path = format!("{path}/messages");
        let key = key.to_owned();
        let token = t1.editor.clone();
        async move {
            server
                .raw(
                    Method::POST,
                    &path,
                    Some(&token),
                    Some(body),
                    &[("idempotency-key", &key)],
                )
                .await
        }
    };
    let to = "4915100001@s.whatsapp.net";
    let first = send("k-1", json!({ "to": to, "text": "hello" })).await;
    assert_eq!(first.status, 202, "{}", first.body);
    assert!(
        first.body["message_id"]
            .as_str()
            .unwrap()
            .starts_with("3EB0")
    );
    assert_eq!(first.body["repeat"], false);
    let again = send("k-1", json!({ "to": to, "text": "hello" })).await;
    assert_eq!((again.status, &again.body["repeat"]), (202, &json!(true)));
    assert_eq!(again.body["message_id"], first.body["message_id"]);
    send("k-1", json!({ "to": to, "text": "bye" }))
        .await
        .problem(409, Some("Idempotency-Key"));
    send("k-2", json!({ "to": "4915100001", "text": "x" }))
        .await
        .problem(422, Some("to"));
    send("k-2", json!({ "to": to }))
        .await
        .problem(422, Some("text"));
    send("a key", json!({ "to": to, "text": "x" }))
        .await
        .problem(422, Some("Idempotency-Key"));
    let huge = json!({ "to": to, "text": "x".repeat(switchboard::http::BODY_LIMIT) });
    send("k-3", huge).await.problem(413, None);

    // Delete: admin only; then gone.
    s.call(Method::DELETE, &path, &t1.editor, None)
        .await
        .problem(403, None);
    assert_eq!(
        s.call(Method::DELETE, &path, &t1.admin, None).await.status,
        204
    );
    s.get(&path, &t1.viewer).await.problem(404, None);
    s.call(Method::DELETE, &path, &t1.admin, None)
        .await
        .problem(404, None);

    let log = s.get("/v1/audit", &t1.admin).await;
    let actions: Vec<&str> = log.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for a in [
        "number.create",
        "number.update",
        "number.restart",
        "number.send",
        "number.delete",
    ] {
        assert!(actions.contains(&a), "{a} not audited: {actions:?}");
    }
    let update = log.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "number.update")
        .unwrap();
    assert!(update["detail"]["before"].is_object() && update["detail"]["after"].is_object());
    s.stop().await;
}

/// Waits until `number` is in `state` on the node.
async fn wait_state(s: &Server, number: &str, token: &str, state: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let a = s.get(&format!("/v1/numbers/{number}"), token).await;
        if a.body["status"]["state"] == state {
            return a.body;
        }
        assert!(
            Instant::now() < deadline,
            "{number} never {state}: {}",
            a.body
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The least role of each route, as the route table says. `None`: the super-admin only.
fn routes(n: &str) -> Vec<(Method, String, Option<Value>, Option<&'static str>)> {
    let to = json!({ "to": "4915100001@s.whatsapp.net", "text": "hi" });
    vec![
        (Method::GET, "/v1/tenants".into(), None, None),
        (
            Method::POST,
            "/v1/tenants".into(),
            Some(json!({ "id": "tx", "name": "x" })),
            None,
        ),
        (Method::GET, "/v1/tenants/t1".into(), None, Some("viewer")),
        (
            Method::GET,
            "/v1/tenants/t1/tokens".into(),
            None,
            Some("admin"),
        ),
        (
            Method::POST,
            "/v1/tenants/t1/tokens".into(),
            Some(json!({ "name": "m", "role": "viewer" })),
            Some("admin"),
        ),
        (
            Method::DELETE,
            "/v1/tenants/t1/tokens/tok_0".into(),
            None,
            Some("admin"),
        ),
        (Method::GET, "/v1/numbers".into(), None, Some("viewer")),
        (
            Method::POST,
            "/v1/numbers".into(),
            Some(json!({ "number": "+15550199" })),
            Some("editor"),
        ),
        (
            Method::GET,
            format!("/v1/numbers/{n}"),
            None,
            Some("viewer"),
        ),
        (
            Method::PATCH,
            format!("/v1/numbers/{n}"),
            Some(json!({ "settings": {} })),
            Some("editor"),
        ),
        (
            Method::GET,
            format!("/v1/numbers/{n}/qr"),
            None,
            Some("viewer"),
        ),
        (
            Method::POST,
            format!("/v1/numbers/{n}/pair-code"),
            Some(json!({})),
            Some("editor"),
        ),
        (
            Method::POST,
            format!("/v1/numbers/{n}/restart"),
            Some(json!({})),
            Some("editor"),
        ),
        (
            Method::POST,
            format!("/v1/numbers/{n}/logout"),
            Some(json!({})),
            Some("admin"),
        ),
        (
            Method::POST,
            format!("/v1/numbers/{n}/messages"),
            Some(to),
            Some("editor"),
        ),
        (Method::GET, "/v1/audit".into(), None, Some("admin")),
        (Method::GET, "/v1/cluster/nodes".into(), None, None),
        (Method::GET, "/v1/cluster/placement".into(), None, None),
        (
            Method::POST,
            format!("/v1/cluster/numbers/{n}/move"),
            Some(json!({ "node": null })),
            None,
        ),
        (
            Method::POST,
            "/v1/cluster/nodes/node-x/drain".into(),
            Some(json!({})),
            None,
        ),
        (
            Method::DELETE,
            format!("/v1/numbers/{n}"),
            None,
            Some("admin"),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_on_every_route_is_allowed_exactly_what_the_route_table_says() {
    let s = server().await;
    let t1 = s.tenant("t1").await;
    let n = "+15550111";
    s.network.create_account(&PhoneNumber::parse(n).unwrap());
    assert_eq!(
        s.post("/v1/numbers", &t1.editor, json!({ "number": n }))
            .await
            .status,
        201
    );
    wait_state(&s, n, &t1.viewer, "pairing").await;
    let rank = |r: &str| {
        ["viewer", "editor", "admin"]
            .iter()
            .position(|x| *x == r)
            .unwrap()
    };
    // Denials first, for every route; then each route once by its least role (the order
    // deletes the number last).
    for (method, path, body, least) in routes(n) {
        for (role, token) in [
            ("viewer", &t1.viewer),
            ("editor", &t1.editor),
            ("admin", &t1.admin),
        ] {
            let allowed = least.is_some_and(|l| rank(role) >= rank(l));
            if !allowed {
                s.call(method.clone(), &path, token, body.clone())
                    .await
                    .problem(403, None);
            }
        }
    }
    for (method, path, body, least) in routes(n) {
        let token = match least {
            None => SUPER,
            Some("viewer") => &t1.viewer,
            Some("editor") => &t1.editor,
            Some(_) => &t1.admin,
        };
        let a = s.call(method.clone(), &path, token, body.clone()).await;
        assert!(
            a.status != 401 && a.status != 403 && a.status < 500,
            "{method} {path} as {least:?}: {} {}",
            a.status,
            a.body
        );
        // And the super-admin may do everything a tenant's admin may.
        if least.is_some() && method == Method::GET {
            assert_eq!(
                s.call(method.clone(), &path, SUPER, None).await.status,
                200,
                "{path}"
            );
        }
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_number_created_on_a_running_serve_shows_its_qr_pairs_and_answers_and_a_deleted_one_is_gone()
 {
    let s = server().await;
    let t = s.tenant("live").await;
    let n = PhoneNumber::parse("+15550121").unwrap();
    s.network.create_account(&n);
    let created = Instant::now();
    let made = s
        .post("/v1/numbers", &t.editor, json!({ "number": n.as_str() }))
        .await;
    assert_eq!(made.status, 201, "{}", made.body);
    let shown = wait_state(&s, n.as_str(), &t.viewer, "pairing").await;
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut body = shown;
    while body["status"]["qr"].is_null() {
        assert!(Instant::now() < deadline, "no QR code: {body}");
        tokio::time::sleep(Duration::from_millis(25)).await;
        body = s.get(&format!("/v1/numbers/{n}"), &t.viewer).await.body;
    }
    let took = created.elapsed();
    assert!(took < Duration::from_secs(2), "QR after {took:?}");

    // The QR code as images: a PNG (the default) and an SVG, never cached.
    let png = s
        .http
        .get(format!("{}/v1/numbers/{n}/qr", s.base))
        .bearer_auth(&t.viewer)
        .send()
        .await
        .unwrap();
    assert_eq!(png.status(), 200);
    assert_eq!(png.headers()["content-type"], "image/png");
    assert_eq!(png.headers()["cache-control"], "no-store");
    let bytes = png.bytes().await.unwrap();
    let decoder = png::Decoder::new(bytes.as_ref());
    let info = decoder.read_info().unwrap().info().clone();
    assert!(info.width >= 200 && info.width == info.height, "{info:?}");
    let svg = s
        .http
        .get(format!("{}/v1/numbers/{n}/qr?format=svg", s.base))
        .bearer_auth(&t.viewer)
        .send()
        .await
        .unwrap();
    assert_eq!(svg.headers()["content-type"], "image/svg+xml");
    assert!(svg.text().await.unwrap().contains("<svg"));
    s.get(&format!("/v1/numbers/{n}/qr?format=gif"), &t.viewer)
        .await
        .problem(422, Some("format"));

    // A pair code, typed on the phone, pairs it.
    let asked = s
        .post(&format!("/v1/numbers/{n}/pair-code"), &t.editor, json!({}))
        .await;
    assert_eq!(asked.status, 200, "{}", asked.body);
    let code = asked.body["code"].as_str().unwrap().to_owned();
    s.network.pair(&n, Some(&code)).unwrap();
    wait_state(&s, n.as_str(), &t.viewer, "online").await;
    s.get(&format!("/v1/numbers/{n}/qr"), &t.viewer)
        .await
        .problem(409, None);
    s.post(&format!("/v1/numbers/{n}/pair-code"), &t.editor, json!({}))
        .await
        .problem(409, None);
    let contact = PhoneNumber::parse("+4915100121").unwrap();
    s.network
        .inbound(&n, &contact, "hello", None, None)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let sum = s.network.summary();
        if sum.inbound_acked == 1 && sum.inbound_unanswered == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "not answered: {sum:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    // Deleted: it disconnects, and nothing of it stays in the store.
    let connections_before = s.network.summary().connections;
    assert_eq!(
        s.call(Method::DELETE, &format!("/v1/numbers/{n}"), &t.admin, None)
            .await
            .status,
        204
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s
        .network
        .ledger(&n)
        .iter()
        .rev()
        .any(|e| format!("{e:?}").starts_with("ConnectionClosed"))
    {
        assert!(Instant::now() < deadline, "still connected");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        s.network.summary().connections,
        connections_before,
        "not reconnected"
    );
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&s.db.url).await.unwrap();
    for table in [
        "numbers",
        "inbound",
        "outbox",
        "sessions",
        "conversations",
        "wa_state",
    ] {
        let left: i64 =
            sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table} WHERE number = $1"))
                .bind(n.as_str())
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(left, 0, "{table} still holds {n}");
    }
    pool.close().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_carry_ids_tokens_are_rate_limited_and_only_configured_origins_may_call() {
    let s = server_with(
        "rate_per_second = 1.0\nrate_burst = 3\ncors_origins = \"https://console.example.com\"",
    )
    .await;
    // A request's id comes back; one is made when none is given.
    let given = s
        .http
        .get(format!("{}/v1/tenants", s.base))
        .bearer_auth(SUPER)
        .header("x-request-id", "trace-me-1")
        .send()
        .await
        .unwrap();
    assert_eq!(given.headers()["x-request-id"], "trace-me-1");
    let made = s
        .http
        .get(format!("{}/livez", s.base))
        .send()
        .await
        .unwrap();
    let id = made.headers()["x-request-id"].to_str().unwrap();
    assert!(id.starts_with("req_") && id.len() == 20, "{id}");

    // The budget: 3 back to back (one spent above), then 429 with Retry-After; probes are free.
    for _ in 0..2 {
        assert_eq!(s.get("/v1/tenants", SUPER).await.status, 200);
    }
    let limited = s
        .http
        .get(format!("{}/v1/tenants", s.base))
        .bearer_auth(SUPER)
        .send()
        .await
        .unwrap();
    assert_eq!(limited.status(), 429);
    assert_eq!(limited.headers()["retry-after"], "1");
    assert_eq!(
        limited.headers()["content-type"],
        "application/problem+json"
    );
    for _ in 0..10 {
        assert_eq!(
            s.raw(Method::GET, "/readyz", None, None, &[]).await.status,
            200
        );
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(s.get("/v1/tenants", SUPER).await.status, 200, "refilled");

    // CORS: the configured origin is allowed, any other is not.
    let preflight = |origin: &'static str| {
        s.http
            .request(Method::OPTIONS, format!("{}/v1/numbers", s.base))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type",
            )
            .send()
    };
    let ok = preflight("https://console.example.com").await.unwrap();
    assert_eq!(
        ok.headers()["access-control-allow-origin"],
        "https://console.example.com"
    );
    let other = preflight("https://evil.example").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_is_served_lists_every_route_of_the_table_and_the_docs_render() {
    let s = server().await;
    let doc = s
        .raw(Method::GET, "/v1/openapi.json", None, None, &[])
        .await;
    assert_eq!(doc.status, 200);
    assert!(
        doc.body["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc.body["openapi"]
    );
    // The route table of src/http.rs and the document say the same.
    let table = include_str!("../src/http.rs");
    let mut rows = 0;
    for line in table
        .lines()
        .filter(|l| l.starts_with("//! | ") && l.contains("| `/"))
    {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let (method, path) = (cells[1].to_lowercase(), cells[2].trim_matches('`'));
        if matches!(path, "/healthz" | "/v1/openapi.json" | "/docs") {
            continue;
        }
        rows += 1;
        let op = &doc.body["paths"][path][&method];
        assert!(op.is_object(), "{method} {path} is not in the document");
        let secured = op["security"].is_array();
        assert_eq!(
            secured,
            path.starts_with("/v1/"),
            "{method} {path}: bearer only on /v1"
        );
        if secured {
            for status in ["401", "403", "429"] {
                assert!(
                    op["responses"][status].is_object(),
                    "{method} {path} lacks {status}"
                );
            }
        }
    }
    assert!(rows >= 20, "{rows} rows read from the table");
    assert_eq!(
        doc.body["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let ui = s
        .http
        .get(format!("{}/docs/", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ui.status(), 200);
    assert!(
        ui.text().await.unwrap().contains("swagger"),
        "the vendored Swagger UI"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_node_shows_itself_as_the_cluster_moves_pins_and_refuses_a_drain() {
    let s = server().await;
    let t1 = s.tenant("t1").await;
    for n in ["+15550131", "+15550132"] {
        assert_eq!(
            s.post("/v1/numbers", &t1.editor, json!({ "number": n }))
                .await
                .status,
            201
        );
    }
    let nodes = s.get("/v1/cluster/nodes", SUPER).await;
    assert_eq!(nodes.status, 200, "{}", nodes.body);
    assert_eq!(nodes.body[0]["state"], "active");
    assert_eq!(nodes.body[0]["numbers"], 2);
    let node = nodes.body[0]["id"].as_str().unwrap().to_owned();
    s.get("/v1/cluster/nodes", &t1.admin)
        .await
        .problem(403, None);

    let moved = s
        .post(
            "/v1/cluster/numbers/+15550131/move",
            SUPER,
            json!({ "node": node }),
        )
        .await;
    assert_eq!(moved.status, 202, "{}", moved.body);
    let page = s.get("/v1/cluster/placement?limit=1", SUPER).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert_eq!(page.body["items"][0]["number"], "+15550131");
    assert_eq!(page.body["items"][0]["pinned_node"], node.as_str());
    assert_eq!(page.body["items"][0]["owner"], node.as_str());
    assert!(page.body["next_cursor"].is_string());
    s.post(
        "/v1/cluster/numbers/+15559999999/move",
        SUPER,
        json!({ "node": node }),
    )
    .await
    .problem(404, None);
    s.post(
        "/v1/cluster/numbers/+15550131/move",
        SUPER,
        json!({ "node": 7 }),
    )
    .await
    .problem(422, Some("node"));
    s.post(
        "/v1/cluster/numbers/+15550131/move",
        &t1.admin,
        json!({ "node": null }),
    )
    .await
    .problem(403, None);
    s.post(&format!("/v1/cluster/nodes/{node}/drain"), SUPER, json!({}))
        .await
        .problem(409, None);
    let log = s.get("/v1/audit?tenant=t1", SUPER).await;
    assert_eq!(log.body["items"][0]["action"], "number.move");
    s.stop().await;
}
