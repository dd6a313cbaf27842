//! The real whatsapp-rust client, through Switchboard's transport adapter, against the fake
//! WhatsApp endpoint: what each answer to a login becomes on the transport port, and how the
//! client backs off from failed connects (real clock). The same verdicts the simulator gives
//! for these cases (`tests/sim_conformance.rs`).
#![allow(clippy::unwrap_used, clippy::panic)]

#[path = "support/db.rs"]
mod db;
#[path = "support/fake_wa.rs"]
mod fake_wa;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use db::TestDb;
use fake_wa::{Answer, FakeWhatsApp};
use switchboard::store::{Dialect, NumberRecord, TenantRecord};
use switchboard::whatsapp::{WaBackend, WhatsAppConnector, WhatsAppOptions};
use switchboard_actors::PhoneNumber;
use switchboard_actors::store::{Coordinator, Fence};
use switchboard_actors::transport::{AccountSpec, WaConnector, WaEvent, WaSession};
use whatsapp_rust::wacore::store::Device;
use whatsapp_rust::wacore::store::traits::DeviceStore;
use whatsapp_rust::wacore_binary::builder::NodeBuilder;

const N: &str = "+15550601";

/// A client of `N` connecting to `fake`, with the events it reported.
struct Client {
    session: Arc<dyn WaSession>,
    events: Arc<Mutex<Vec<WaEvent>>>,
    _db: TestDb,
}

impl Client {
    async fn start(fake: &FakeWhatsApp) -> Self {
        Self::start_as(fake, false).await
    }

    /// With `paired`, the device is registered already (as after a pairing): it logs in.
    async fn start_as(fake: &FakeWhatsApp, paired: bool) -> Self {
        let db = TestDb::new(Dialect::Sqlite).await;
        let store = db.store().await;
        store
            .create_tenant(&TenantRecord {
                id: "t".into(),
                name: "t".into(),
                full_transcripts: false,
            })
            .await
            .unwrap();
        let number = PhoneNumber::parse(N).unwrap();
        store
            .add_number(&NumberRecord {
                number: number.clone(),
                tenant: "t".into(),
                pinned_node: None,
                settings: serde_json::json!({}),
            })
            .await
            .unwrap();
        let fence = Fence {
            number: number.clone(),
            token: store.acquire(&number).await.unwrap(),
        };
        if paired {
            let backend = WaBackend::new(store.protocol_state(fence.clone()));
            let mut device = Device::new();
            device.pn = Some("15550601:5@s.whatsapp.net".parse().unwrap());
            device.push_name = "Switchboard test".into();
            backend.save(&device).await.unwrap();
        }
        let connector = WhatsAppConnector::new(
            store,
            WhatsAppOptions {
                url: fake.url.clone(),
                ..WhatsAppOptions::default()
            },
        );
        let events: Arc<Mutex<Vec<WaEvent>>> = Arc::default();
        let sink_events = events.clone();
        let session = connector
            .start(
                AccountSpec {
                    number,
                    client_label: "Switchboard test".into(),
                    credentials: None,
                    fence,
                },
                Arc::new(move |e| sink_events.lock().unwrap().push(e)),
            )
            .await
            .unwrap();
        Self {
            session,
            events,
            _db: db,
        }
    }

    /// Waits (real time) for the first event `pred` accepts.
    async fn wait(&self, what: &str, pred: impl Fn(&WaEvent) -> bool) -> WaEvent {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(e) = self.events.lock().unwrap().iter().find(|e| pred(e)) {
                return e.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no {what}: {:?}",
                self.events.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// After a terminal event the client never connects again by itself.
async fn stays_down(fake: &FakeWhatsApp, c: &Client) {
    let before = fake.seen().len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        fake.seen().len(),
        before,
        "no reconnect after a terminal event"
    );
    c.session.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_refused_as_logged_out_ends_the_session() {
    let fake = FakeWhatsApp::start(Answer::failure(401)).await;
    let c = Client::start(&fake).await;
    let e = c.wait("logged out", |e| *e == WaEvent::LoggedOut).await;
    assert!(e.is_terminal());
    assert_eq!(
        fake.seen()[0].handshake,
        Some("XX"),
        "first contact speaks XX"
    );
    stays_down(&fake, &c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_temporary_ban_carries_its_code_and_expiry() {
    let fake = FakeWhatsApp::start(Answer::Failure {
        reason: 402,
        code: Some(101),
        expire: Some(3600),
    })
    .await;
    let c = Client::start(&fake).await;
    let ban = c
        .wait("ban", |e| matches!(e, WaEvent::TemporaryBan { .. }))
        .await;
    assert_eq!(
        ban,
        WaEvent::TemporaryBan {
            code: 101,
            duration: Duration::from_secs(3600)
        }
    );
    stays_down(&fake, &c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outdated_client_is_told_so_and_stops() {
    let fake = FakeWhatsApp::start(Answer::failure(405)).await;
    let c = Client::start(&fake).await;
    let e = c.wait("outdated", |e| *e == WaEvent::ClientOutdated).await;
    assert!(e.is_terminal());
    stays_down(&fake, &c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_refusal_stops_but_a_server_error_is_retried() {
    let fake = FakeWhatsApp::start(Answer::failure(409)).await;
    let c = Client::start(&fake).await;
    let e = c
        .wait("refusal", |e| matches!(e, WaEvent::ConnectFailure { .. }))
        .await;
    assert!(matches!(
        e,
        WaEvent::ConnectFailure {
            code: 409,
            will_retry: false,
            ..
        }
    ));
    stays_down(&fake, &c).await;

    let fake = FakeWhatsApp::start(Answer::failure(503)).await;
    let c = Client::start(&fake).await;
    let e = c
        .wait("unavailable", |e| {
            matches!(e, WaEvent::ConnectFailure { .. })
        })
        .await;
    assert!(matches!(
        e,
        WaEvent::ConnectFailure {
            code: 503,
            will_retry: true,
            ..
        }
    ));
    assert!(!e.is_terminal());
    let deadline = Instant::now() + Duration::from_secs(20);
    while fake.seen().len() < 2 {
        assert!(Instant::now() < deadline, "a 503 is retried");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A refused login caches nothing: the retry speaks XX again (IK follows a login that
    // succeeded, which the fake does not answer yet).
    assert_eq!(fake.seen()[1].handshake, Some("XX"));
    c.session.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_replaced_elsewhere_ends_the_session() {
    let fake = FakeWhatsApp::start(Answer::Conflict("replaced".into())).await;
    let c = Client::start(&fake).await;
    let e = c.wait("replaced", |e| *e == WaEvent::StreamReplaced).await;
    assert!(e.is_terminal());
    stays_down(&fake, &c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_connects_back_off_by_fibonacci_and_emit_nothing() {
    let fake = FakeWhatsApp::start(Answer::Refuse).await;
    let c = Client::start(&fake).await;
    // Five attempts: the first at once, then about 1, 1, 2 and 3 s apart (±10 %).
    let deadline = Instant::now() + Duration::from_secs(20);
    while fake.seen().len() < 5 {
        assert!(Instant::now() < deadline, "attempts: {}", fake.seen().len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let at: Vec<Instant> = fake.seen().iter().map(|s| s.at).collect();
    let gaps: Vec<f64> = at.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).collect();
    for (gap, step) in gaps.iter().zip([1.0, 1.0, 2.0, 3.0]) {
        // The delay, plus a failed connect's own time: never sooner, and not much later.
        assert!(
            *gap >= step * 0.85 && *gap <= step * 1.1 + 1.0,
            "gaps {gaps:?}"
        );
    }
    assert!(
        c.events.lock().unwrap().is_empty(),
        "a failed connect emits no event: {:?}",
        c.events.lock().unwrap()
    );
    let stats = c.session.stats();
    assert!(stats.connect_attempts >= 5, "{stats:?}");
    assert!(
        stats.connect_failures >= 4,
        "every retried refusal counted: {stats:?}"
    );
    assert_eq!(stats.connections, 0);
    c.session.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_drains_the_offline_queue_before_connected_and_a_515_reconnects_at_once() {
    let fake = FakeWhatsApp::start(Answer::Success).await;
    let c = Client::start_as(&fake, true).await;
    c.wait("connected", |e| *e == WaEvent::Connected).await;
    let events = c.events.lock().unwrap().clone();
    let synced = events
        .iter()
        .position(|e| matches!(e, WaEvent::OfflineSyncCompleted { .. }))
        .unwrap_or_else(|| panic!("no offline sync: {events:?}"));
    let connected = events
        .iter()
        .position(|e| *e == WaEvent::Connected)
        .unwrap();
    assert!(synced < connected, "the offline queue first: {events:?}");
    assert_eq!(events[synced], WaEvent::OfflineSyncCompleted { count: 0 });
    assert!(c.session.stats().connected);

    // The server asks for a new connection: the client reconnects at once, no backoff.
    let asked = Instant::now();
    fake.push(NodeBuilder::new("stream:error").attr("code", "515").build());
    let deadline = Instant::now() + Duration::from_secs(10);
    while fake.seen().len() < 2 {
        assert!(Instant::now() < deadline, "no reconnect after 515");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        fake.seen()[1].at - asked < Duration::from_millis(900),
        "at once"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while c
        .events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| **e == WaEvent::Connected)
        .count()
        < 2
    {
        assert!(Instant::now() < deadline, "{:?}", c.events.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        fake.seen()[1].handshake,
        Some("IK"),
        "after a login the client knows the server's key"
    );
    // A 515 is a routine restart: the client reports nothing but the new login (no stream
    // error, no disconnect), as the simulator does after pairing.
    let events = c.events.lock().unwrap().clone();
    let expected = [
        WaEvent::OfflineSyncPreview {
            total: 0,
            messages: 0,
        },
        WaEvent::OfflineSyncCompleted { count: 0 },
        WaEvent::Connected,
    ];
    assert_eq!(events, [expected.clone(), expected].concat());
    c.session.shutdown().await;
}
