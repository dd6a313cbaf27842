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
use switchboard::store::{Dialect, NumberRecord, SessionCipher, TenantRecord};
use switchboard::whatsapp::{WaBackend, WhatsAppConnector, WhatsAppOptions};
use switchboard_actors::coordinator::{Lease, TokenSource};
use switchboard_actors::store::{Fence, FencingToken};
use switchboard_actors::transport::{
    AccountSpec, InboundMessage, MessageId, OutboundText, ReceiptKind, ServerAck, WaConnector,
    WaEvent, WaSession,
};
use switchboard_actors::{Jid, PhoneNumber};
use whatsapp_rust::wacore::store::Device;
use whatsapp_rust::wacore::store::traits::DeviceStore;
use whatsapp_rust::wacore_binary::builder::NodeBuilder;

const N: &str = "+15550601";
/// `N`'s device, as the fake knows it (`user:device`).
const DEVICE: &str = "15550601:5";

/// A client of `N` connecting to `fake`, with the events it reported and when.
struct Client {
    session: Arc<dyn WaSession>,
    events: Arc<Mutex<Vec<WaEvent>>>,
    timed: Arc<Mutex<Vec<(Instant, WaEvent)>>>,
    connector: WhatsAppConnector,
    fence: Fence,
    _db: Arc<TestDb>,
}

/// `N` on `store`, under its lease (the fence every write carries); with `paired`, its device
/// is registered already, as after a pairing.
async fn provision(store: &switchboard::store::SqlStore, paired: bool) -> Fence {
    provision_with(store, paired, serde_json::json!({})).await
}

/// [`provision`] with the number's settings.
async fn provision_with(
    store: &switchboard::store::SqlStore,
    paired: bool,
    settings: serde_json::Value,
) -> Fence {
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
            settings,
        })
        .await
        .unwrap();
    let fence = Fence {
        number: number.clone(),
        token: store.next_token(&number).await.unwrap(),
    };
    if paired {
        let backend = WaBackend::new(
            store.protocol_state(fence.clone()),
            Lease::new(fence.clone()),
        );
        let mut device = Device::new();
        device.pn = Some(format!("{DEVICE}@s.whatsapp.net").parse().unwrap());
        device.push_name = "Switchboard test".into();
        backend.save(&device).await.unwrap();
    }
    fence
}

fn connector(store: switchboard::store::SqlStore, fake: &FakeWhatsApp) -> WhatsAppConnector {
    WhatsAppConnector::new(
        store,
        WhatsAppOptions {
            url: fake.url.clone(),
            ..WhatsAppOptions::default()
        },
    )
}

impl Client {
    async fn start(fake: &FakeWhatsApp) -> Self {
        Self::start_as(fake, false).await
    }

    /// With `paired`, the device is registered already (as after a pairing): it logs in.
    async fn start_as(fake: &FakeWhatsApp, paired: bool) -> Self {
        Self::start_with(fake, paired, serde_json::json!({})).await
    }

    /// [`Client::start_as`] with the number's settings.
    async fn start_with(fake: &FakeWhatsApp, paired: bool, settings: serde_json::Value) -> Self {
        let db = TestDb::new(Dialect::Sqlite).await;
        let store = db.store().await;
        let fence = provision_with(&store, paired, settings).await;
        let connector = connector(store, fake);
        let (session, events, timed) = Self::open(&connector, &fence).await;
        Self {
            session,
            events,
            timed,
            connector,
            fence,
            _db: Arc::new(db),
        }
    }
    /// A new session of the same number on the same store.
    async fn again(&self) -> Self {
        let (session, events, timed) = Self::open(&self.connector, &self.fence).await;
        Self {
            session,
            events,
            timed,
            connector: self.connector.clone(),
            fence: self.fence.clone(),
            _db: self._db.clone(),
        }
    }

    #[allow(clippy::type_complexity)]
    async fn open(
        connector: &WhatsAppConnector,
        fence: &Fence,
    ) -> (
        Arc<dyn WaSession>,
        Arc<Mutex<Vec<WaEvent>>>,
        Arc<Mutex<Vec<(Instant, WaEvent)>>>,
    ) {
        let events: Arc<Mutex<Vec<WaEvent>>> = Arc::default();
        let timed: Arc<Mutex<Vec<(Instant, WaEvent)>>> = Arc::default();
        let (sink_events, sink_timed) = (events.clone(), timed.clone());
        let session = connector
            .start(
                AccountSpec {
                    number: fence.number.clone(),
                    client_label: "Switchboard test".into(),
                    credentials: None,
                    lease: Lease::new(fence.clone()),
                },
                Arc::new(move |e| {
                    sink_timed.lock().unwrap().push((Instant::now(), e.clone()));
                    sink_events.lock().unwrap().push(e);
                }),
            )
            .await
            .unwrap();
        (session, events, timed)
    }

    /// Waits (real time, up to 30 s) for the first event `pred` accepts.
    async fn wait(&self, what: &str, pred: impl Fn(&WaEvent) -> bool) -> WaEvent {
        self.wait_within(what, Duration::from_secs(30), pred).await
    }

    /// Waits (real time, up to `within`) for the first event `pred` accepts.
    async fn wait_within(
        &self,
        what: &str,
        within: Duration,
        pred: impl Fn(&WaEvent) -> bool,
    ) -> WaEvent {
        let deadline = Instant::now() + within;
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

    /// Where the first event `pred` accepts is in the order of events.
    fn position(&self, pred: impl Fn(&WaEvent) -> bool) -> Option<usize> {
        self.events.lock().unwrap().iter().position(pred)
    }

    /// The first QR code shown (waiting for it).
    async fn first_qr_code(&self) -> String {
        match self
            .wait("a QR code", |e| matches!(e, WaEvent::QrCode { .. }))
            .await
        {
            WaEvent::QrCode { code, .. } => code,
            _ => unreachable!(),
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
    // Three failed connects first, so the backoff stands at 3 s (Fibonacci 1, 1, 2, 3 with
    // 10 % jitter) when the 515 comes: "at once" is then told from a backoff with seconds to
    // spare, however busy the machine.
    fake.script([Answer::Refuse, Answer::Refuse, Answer::Refuse]);
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
    while fake.seen().len() < 5 {
        assert!(Instant::now() < deadline, "no reconnect after 515");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let gap = fake.seen()[4].at - asked;
    assert!(
        gap < Duration::from_secs(2),
        "at once, not after the 3 s backoff: {gap:?}"
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
        fake.seen()[4].handshake,
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

// ---- pairing --------------------------------------------------------------------------------

fn qr_codes(c: &Client) -> Vec<(Instant, Duration, String)> {
    c.timed
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(t, e)| match e {
            WaEvent::QrCode { code, valid_for } => Some((*t, *valid_for, code.clone())),
            _ => None,
        })
        .collect()
}

/// The simulator's case with the server's six refs cut to two (the client's rule is per ref:
/// 60 s for the first, 20 s for each next), so that it runs in 80 s of real time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qr_codes_rotate_then_run_out() {
    let fake = FakeWhatsApp::start(Answer::Success).await;
    fake.pair_refs(2);
    let c = Client::start(&fake).await;
    c.wait_within("exhausted", Duration::from_secs(100), |e| {
        *e == WaEvent::QrCodesExhausted { disconnected: true }
    })
    .await;
    let exhausted = c
        .timed
        .lock()
        .unwrap()
        .iter()
        .find(|(_, e)| matches!(e, WaEvent::QrCodesExhausted { .. }))
        .unwrap()
        .0;
    let qrs = qr_codes(&c);
    assert_eq!(qrs.len(), 2, "one code per ref");
    let near = |d: Duration, secs: f64| (d.as_secs_f64() - secs).abs() < 1.0;
    assert!(near(qrs[0].1, 60.0) && qrs[0].1 <= Duration::from_secs(60));
    assert!(near(qrs[1].1, 20.0) && qrs[1].1 <= Duration::from_secs(20));
    assert!(near(qrs[1].0 - qrs[0].0, 60.0), "{:?}", qrs[1].0 - qrs[0].0);
    assert!(near(exhausted - qrs[0].0, 80.0));
    assert_ne!(qrs[0].2, qrs[1].2, "every code is new");
    assert!(
        qrs[0].2.starts_with("2@fake-ref-"),
        "the code carries the ref"
    );
    assert_eq!(c.count(|e| *e == WaEvent::Connected), 0);
    let seen = fake.seen();
    assert!(seen[0].registration && seen[0].handshake == Some("XX"));
    // Exhaustion is terminal: the session does not reconnect by itself.
    stays_down(&fake, &c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairing_by_qr_reconnects_before_connected_and_a_paired_device_needs_no_qr() {
    let fake = FakeWhatsApp::start(Answer::Success).await;
    let c = Client::start(&fake).await;
    let code = c.first_qr_code().await;
    fake.scan(&code, "15550601", false);
    let WaEvent::PairSuccess { credentials } = c
        .wait("paired", |e| matches!(e, WaEvent::PairSuccess { .. }))
        .await
    else {
        unreachable!()
    };
    assert!(
        credentials.0.contains("15550601"),
        "the device's JID: {credentials:?}"
    );
    c.wait("connected", |e| *e == WaEvent::Connected).await;
    assert_eq!(
        fake.linked(),
        [fake_wa::Linked {
            jid: "15550601:5@s.whatsapp.net".into(),
            signature_ok: true
        }],
        "the client signed its identity with the key its QR code showed"
    );
    let pos = |want: &dyn Fn(&WaEvent) -> bool| c.position(want).unwrap();
    let success = pos(&|e| matches!(e, WaEvent::PairSuccess { .. }));
    let preview = pos(&|e| matches!(e, WaEvent::OfflineSyncPreview { .. }));
    let sync = pos(&|e| matches!(e, WaEvent::OfflineSyncCompleted { .. }));
    let connected = pos(&|e| *e == WaEvent::Connected);
    assert!(
        success < preview && preview < sync && sync < connected,
        "{:?}",
        c.events.lock().unwrap()
    );
    // The server asked for a new connection after pairing: `Connected` came on the second,
    // at once and without a `Disconnected`.
    let seen = fake.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen[0].registration && !seen[1].registration);
    assert_eq!(c.session.stats().connect_attempts, 2);
    assert_eq!(
        c.count(|e| matches!(e, WaEvent::Disconnected { .. })),
        0,
        "{:?}",
        c.events.lock().unwrap()
    );
    c.session.shutdown().await;

    // The device is in the store: the next session logs in without a QR code.
    let again = c.again().await;
    again.wait("connected", |e| *e == WaEvent::Connected).await;
    assert_eq!(again.count(|e| matches!(e, WaEvent::QrCode { .. })), 0);
    assert!(!fake.seen()[2].registration);
    again.session.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scan_the_client_cannot_verify_fails_and_the_codes_go_on() {
    let fake = FakeWhatsApp::start(Answer::Success).await;
    let c = Client::start(&fake).await;
    let code = c.first_qr_code().await;
    fake.scan(&code, "15550601", true);
    let failed = c
        .wait("pairing failed", |e| {
            matches!(e, WaEvent::PairFailed { .. })
        })
        .await;
    assert!(!failed.is_terminal(), "{failed:?}");
    assert!(fake.linked().is_empty());
    // The same code still pairs when the right phone scans it.
    fake.scan(&code, "15550601", false);
    c.wait("paired", |e| matches!(e, WaEvent::PairSuccess { .. }))
        .await;
    c.wait("connected", |e| *e == WaEvent::Connected).await;
    c.session.shutdown().await;
}

// ---- inbound messages -----------------------------------------------------------------------

/// A contact of `N` on the fake (digits).
const CONTACT: &str = "15550002222";

/// Waits (real time, up to 30 s) until `done` holds.
async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn inbound(e: &WaEvent, id: &str) -> Option<InboundMessage> {
    match e {
        WaEvent::Message(m) if m.id.as_str() == id => Some(m.clone()),
        _ => None,
    }
}

/// A contact's DM, Signal-encrypted from the prekeys the client uploaded, comes out of the
/// real client as the port's message; the server hears of it (a delivery receipt) only once
/// Switchboard acknowledged it as committed, and a second message rides the same session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbound_dm_is_decrypted_and_acknowledged_only_after_its_commit() {
    let fake = FakeWhatsApp::start(Answer::Success).await;
    let c = Client::start_as(&fake, true).await;
    c.wait("connected", |e| *e == WaEvent::Connected).await;
    until("the prekey upload", || fake.prekeys(DEVICE).is_some()).await;
    let uploaded = fake.prekeys(DEVICE).unwrap();
    assert!(uploaded >= 5, "{uploaded} one-time prekeys");

    let id = fake.send_text(CONTACT, DEVICE, "hello there").await;
    let event = c.wait("the message", |e| inbound(e, &id).is_some()).await;
    let message = inbound(&event, &id).unwrap();
    assert_eq!(message.text, "hello there");
    assert_eq!(message.chat.as_str(), "15550002222@s.whatsapp.net");
    assert_eq!(
        message.sender_phone(),
        Some(PhoneNumber::parse("+15550002222").unwrap())
    );
    assert!(!message.is_from_me && !message.offline);
    assert_eq!(fake.prekeys(DEVICE), Some(uploaded - 1), "one prekey used");

    // Not committed yet: the server has heard nothing and still holds the message.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        fake.receipts(DEVICE).is_empty(),
        "{:?}",
        fake.receipts(DEVICE)
    );
    assert_eq!(fake.undelivered(DEVICE), std::slice::from_ref(&id));

    c.session.ack(&[message.key()]);
    until("the delivery receipt", || {
        fake.receipts(DEVICE).iter().any(|r| r.id == id)
    })
    .await;
    let receipt = fake
        .receipts(DEVICE)
        .into_iter()
        .find(|r| r.id == id)
        .unwrap();
    assert_ne!(receipt.kind.as_deref(), Some("retry"), "{receipt:?}");
    assert!(fake.undelivered(DEVICE).is_empty());

    // The next message on the same session.
    let second = fake.send_text(CONTACT, DEVICE, "and again").await;
    let event = c
        .wait("the second message", |e| inbound(e, &second).is_some())
        .await;
    let message = inbound(&event, &second).unwrap();
    assert_eq!(message.text, "and again");
    c.session.ack(&[message.key()]);
    until("the second receipt", || {
        fake.receipts(DEVICE).iter().any(|r| r.id == second)
    })
    .await;
    assert_eq!(fake.deliveries(DEVICE).len(), 2, "each delivered once");
    c.session.shutdown().await;
}

/// The process holding a decrypted message is killed (SIGKILL) before Switchboard committed
/// it: the server was never told, so the next login gets it again, from the offline queue,
/// and it is acknowledged once committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbound_dm_is_redelivered_after_a_kill_9_before_its_commit() {
    use std::io::BufRead as _;
    let fake = FakeWhatsApp::start(Answer::Success).await;
    let db = TestDb::new(Dialect::Postgres).await;
    let keys = SessionCipher::generate("test");
    let store = db.store_with_keys(&keys).await;
    let fence = provision(&store, true).await;

    /// Kills the child however the test ends.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "child_process_that_never_commits",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SB_CHILD_FAKE_URL", &fake.url)
        .env("SB_CHILD_DB_URL", &db.url)
        .env("SB_CHILD_KEYS", &keys)
        .env("SB_CHILD_TOKEN", fence.token.get().to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Killed(child);
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    let stdout = child.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines_tx.send(line);
        }
    });

    until("the child's prekey upload", || {
        fake.prekeys(DEVICE).is_some()
    })
    .await;
    let id = fake.send_text(CONTACT, DEVICE, "do not lose me").await;
    let handed_over = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.recv().await {
            // libtest's own "test … ..." may share the line.
            if line.ends_with(&format!("received {id}")) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(handed_over, Ok(true), "the child got the message");
    assert!(
        fake.receipts(DEVICE).is_empty(),
        "{:?}",
        fake.receipts(DEVICE)
    );
    // SIGKILL: nothing of the child runs after this.
    child.0.kill().unwrap();
    child.0.wait().unwrap();

    // A new process (here: this one) on the same store and lease.
    let connector = connector(store, &fake);
    let (session, events, _) = Client::open(&connector, &fence).await;
    let c = Client {
        session,
        events,
        timed: Arc::default(),
        connector,
        fence,
        _db: Arc::new(db),
    };
    let event = c
        .wait("the redelivery", |e| inbound(e, &id).is_some())
        .await;
    let message = inbound(&event, &id).unwrap();
    assert_eq!(message.text, "do not lose me");
    let deliveries = fake.deliveries(DEVICE);
    assert_eq!(deliveries.len(), 2, "{deliveries:?}");
    assert!(!deliveries[0].offline && deliveries[1].offline);
    assert!(fake.receipts(DEVICE).is_empty(), "not before the commit");
    c.session.ack(&[message.key()]);
    until("the delivery receipt", || {
        fake.receipts(DEVICE).iter().any(|r| r.id == id)
    })
    .await;
    assert!(fake.undelivered(DEVICE).is_empty());
    assert_eq!(
        c.count(|e| inbound(e, &id).is_some()),
        1,
        "handed over once in this process"
    );
    c.session.shutdown().await;
}

/// The child process of `an_inbound_dm_is_redelivered_after_a_kill_9_before_its_commit`: a
/// client of `N` that prints each message it is handed and never commits one, until killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the child process of an_inbound_dm_is_redelivered_after_a_kill_9_before_its_commit"]
async fn child_process_that_never_commits() {
    use std::io::Write as _;
    let var = |name: &str| std::env::var(name).unwrap();
    let store = db::connect_store(&var("SB_CHILD_DB_URL"), &var("SB_CHILD_KEYS")).await;
    let fence = Fence {
        number: PhoneNumber::parse(N).unwrap(),
        token: FencingToken::new(var("SB_CHILD_TOKEN").parse().unwrap()).unwrap(),
    };
    let connector = WhatsAppConnector::new(
        store,
        WhatsAppOptions {
            url: var("SB_CHILD_FAKE_URL"),
            ..WhatsAppOptions::default()
        },
    );
    let _session = connector
        .start(
            AccountSpec {
                number: fence.number.clone(),
                client_label: "Switchboard test".into(),
                credentials: None,
                lease: Lease::new(fence),
            },
            Arc::new(|e| {
                if let WaEvent::Message(m) = e {
                    println!("received {}", m.id.as_str());
                    let _ = std::io::stdout().flush();
                }
            }),
        )
        .await
        .unwrap();
    std::future::pending::<()>().await;
}

// ---- outbound messages ----------------------------------------------------------------------

fn text(id: MessageId, to: Jid, body: &str, reply_to: Option<MessageId>) -> OutboundText {
    OutboundText {
        id,
        to,
        text: body.into(),
        reply_to,
        reply_to_sender: None,
    }
}

/// The simulator's case of the same name on the real client: the send goes out Signal-encrypted
/// to the contact's device (its device list and prekey bundle from the server), the contact
/// decrypts it, the server acks it, and the contact's receipts (delivered, then read) settle
/// it; the sending device gets no copy of its own send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_is_settled_by_a_server_ack_and_receipts_with_no_copy_to_the_sender() {
    let fake = FakeWhatsApp::start(Answer::Success).await;
    let c = Client::start_as(&fake, true).await;
    c.wait("connected", |e| *e == WaEvent::Connected).await;
    let contact = Jid::parse(&format!("{CONTACT}@s.whatsapp.net")).unwrap();
    let id = "3EB0AAAA00000001";
    c.session
        .send_text(text(
            MessageId::parse(id).unwrap(),
            contact.clone(),
            "hello from switchboard",
            None,
        ))
        .await
        .unwrap();
    let ack = c
        .wait("the server ack", |e| matches!(e, WaEvent::ServerAck(_)))
        .await;
    assert_eq!(
        ack,
        WaEvent::ServerAck(ServerAck {
            id: MessageId::parse(id).unwrap(),
            error: None
        })
    );
    let sent = fake.sent(DEVICE);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(
        (
            sent[0].to.as_str(),
            sent[0].id.as_str(),
            sent[0].text.as_deref()
        ),
        (CONTACT, id, Some("hello from switchboard")),
        "the contact decrypted it"
    );
    assert_eq!(
        sent[0].kind, "pkmsg",
        "a new session, from the contact's bundle"
    );

    fake.contact_receipt(CONTACT, DEVICE, id, None);
    let delivered = c
        .wait(
            "delivered",
            |e| matches!(e, WaEvent::Receipt(r) if r.kind == ReceiptKind::Delivered),
        )
        .await;
    let WaEvent::Receipt(r) = delivered else {
        unreachable!()
    };
    assert_eq!(
        (r.ids, r.chat, r.offline),
        (vec![MessageId::parse(id).unwrap()], contact.clone(), false)
    );
    fake.contact_receipt(CONTACT, DEVICE, id, Some("read"));
    c.wait(
        "read",
        |e| matches!(e, WaEvent::Receipt(r) if r.kind == ReceiptKind::Read),
    )
    .await;
    // The client acknowledged both receipts: the server holds nothing more for it.
    until("the receipts acknowledged", || {
        fake.undelivered(DEVICE).is_empty()
    })
    .await;

    // A second send rides the session the first started.
    let second = "3EB0AAAA00000002";
    c.session
        .send_text(text(
            MessageId::parse(second).unwrap(),
            contact.clone(),
            "and a second",
            None,
        ))
        .await
        .unwrap();
    c.wait(
        "the second ack",
        |e| matches!(e, WaEvent::ServerAck(a) if a.id.as_str() == second),
    )
    .await;
    let sent = fake.sent(DEVICE);
    assert_eq!(sent[1].text.as_deref(), Some("and a second"), "{sent:?}");
    assert_eq!(
        c.count(|e| matches!(e, WaEvent::Message(_) | WaEvent::FromPhone(_))),
        0,
        "the sending device gets no copy of its own send"
    );
    c.session.shutdown().await;
}

/// A reply rides the session the contact's first message started: no prekey fetch, a plain
/// `msg` the contact decrypts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_rides_the_session_the_contacts_message_started() {
    let fake = FakeWhatsApp::start(Answer::Success).await;
    let c = Client::start_as(&fake, true).await;
    c.wait("connected", |e| *e == WaEvent::Connected).await;
    until("the prekey upload", || fake.prekeys(DEVICE).is_some()).await;
    let id = fake.send_text(CONTACT, DEVICE, "are you there?").await;
    let event = c.wait("the message", |e| inbound(e, &id).is_some()).await;
    let message = inbound(&event, &id).unwrap();
    c.session.ack(&[message.key()]);
    let reply = MessageId::derived(
        &c.fence.number,
        &message.chat,
        &message.sender,
        &message.id,
        0,
    );
    c.session
        .send_text(text(
            reply.clone(),
            message.chat.clone(),
            "yes",
            Some(message.id.clone()),
        ))
        .await
        .unwrap();
    c.wait(
        "the server ack",
        |e| matches!(e, WaEvent::ServerAck(a) if a.id == reply),
    )
    .await;
    let sent = fake.sent(DEVICE);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(
        (
            sent[0].id.as_str(),
            sent[0].kind.as_str(),
            sent[0].text.as_deref()
        ),
        (reply.as_str(), "msg", Some("yes"))
    );
    c.session.shutdown().await;
}

/// The simulator's ack-error case, its first half on the real client: a send the server
/// refuses comes back as a server ack carrying the error code, and nothing reaches the contact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_error_refuses_a_send() {
    let fake = FakeWhatsApp::start(Answer::Success).await;
    let c = Client::start_as(&fake, true).await;
    c.wait("connected", |e| *e == WaEvent::Connected).await;
    fake.refuse_sends(Some(479));
    let id = MessageId::parse("3EB0AAAA000000E1").unwrap();
    c.session
        .send_text(text(
            id.clone(),
            Jid::parse(&format!("{CONTACT}@s.whatsapp.net")).unwrap(),
            "refused",
            None,
        ))
        .await
        .unwrap();
    let WaEvent::ServerAck(ack) = c
        .wait("the server ack", |e| matches!(e, WaEvent::ServerAck(_)))
        .await
    else {
        unreachable!()
    };
    assert_eq!(ack.id, id);
    assert_eq!(ack.error.map(|e| e.code), Some(479));
    assert!(fake.sent(DEVICE).is_empty());
    c.session.shutdown().await;
}

// ---- per-number proxies ---------------------------------------------------------------------

/// What a test proxy was asked: the target and the credentials it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Tunnelled {
    target: String,
    auth: Option<String>,
}

/// A minimal SOCKS5 (`socks = true`) or HTTP CONNECT proxy on a free local port that relays
/// every tunnel; its URL prefix (`scheme://`-less `host:port`) and what it was asked.
async fn test_proxy(socks: bool) -> (String, Arc<Mutex<Vec<Tunnelled>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let asked: Arc<Mutex<Vec<Tunnelled>>> = Arc::default();
    let log = asked.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let (target, auth) = if socks {
                    let mut head = [0u8; 3];
                    s.read_exact(&mut head).await.ok()?;
                    s.write_all(&[5, head[2]]).await.ok()?;
                    let mut auth = None;
                    if head[2] == 2 {
                        let _ver = s.read_u8().await.ok()?;
                        let mut user = vec![0; usize::from(s.read_u8().await.ok()?)];
                        s.read_exact(&mut user).await.ok()?;
                        let mut pass = vec![0; usize::from(s.read_u8().await.ok()?)];
                        s.read_exact(&mut pass).await.ok()?;
                        auth = Some(format!(
                            "{}:{}",
                            String::from_utf8_lossy(&user),
                            String::from_utf8_lossy(&pass)
                        ));
                        s.write_all(&[1, 0]).await.ok()?;
                    }
                    let mut req = [0u8; 4];
                    s.read_exact(&mut req).await.ok()?;
                    assert_eq!(req[3], 3, "by domain name");
                    let mut name = vec![0; usize::from(s.read_u8().await.ok()?)];
                    s.read_exact(&mut name).await.ok()?;
                    let port = s.read_u16().await.ok()?;
                    s.write_all(&[5, 0, 0, 1, 127, 0, 0, 1, 0, 0]).await.ok()?;
                    (format!("{}:{port}", String::from_utf8_lossy(&name)), auth)
                } else {
                    let mut head = Vec::new();
                    while !head.ends_with(b"\r\n\r\n") {
                        head.push(s.read_u8().await.ok()?);
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let target = head.split_whitespace().nth(1)?.to_owned();
                    let auth = head
                        .lines()
                        .find_map(|l| l.strip_prefix("Proxy-Authorization: Basic "))
                        .map(str::to_owned);
                    s.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                        .await
                        .ok()?;
                    (target, auth)
                };
                log.lock().unwrap().push(Tunnelled {
                    target: target.clone(),
                    auth,
                });
                let mut upstream = tokio::net::TcpStream::connect(&target).await.ok()?;
                let _ = tokio::io::copy_bidirectional(&mut s, &mut upstream).await;
                Some(())
            });
        }
    });
    (addr, asked)
}

/// The fake's `host:port`, as the proxies are asked for it.
fn fake_target(fake: &FakeWhatsApp) -> String {
    let rest = fake.url.strip_prefix("ws://").unwrap();
    rest.split('/').next().unwrap().to_owned()
}

/// A paired number whose `settings.proxy` is `url` connects to `fake` through the test proxy
/// whose log is `asked`, which was asked once, for the fake, with `auth`.
async fn connects_through(
    fake: &FakeWhatsApp,
    url: String,
    asked: &Mutex<Vec<Tunnelled>>,
    auth: Option<&str>,
) {
    let c = Client::start_with(fake, true, serde_json::json!({ "proxy": url })).await;
    c.wait("connected", |e| *e == WaEvent::Connected).await;
    assert_eq!(
        asked.lock().unwrap().clone(),
        [Tunnelled {
            target: fake_target(fake),
            auth: auth.map(str::to_owned),
        }]
    );
    c.session.shutdown().await;
}

/// A number whose settings name a SOCKS5 proxy (with credentials) connects through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_number_connects_through_its_socks5_proxy() {
    let fake = FakeWhatsApp::start(Answer::Success).await;
    let (proxy, asked) = test_proxy(true).await;
    let url = format!("socks5://ann:s3cret@{proxy}");
    connects_through(&fake, url, &asked, Some("ann:s3cret")).await;
}

/// The same through an HTTP proxy's CONNECT tunnel; a proxy that is down fails the connect
/// like an unreachable WhatsApp (counted, backed off, no event).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_number_connects_through_its_http_proxy_and_a_dead_one_is_a_failed_connect() {
    let fake = FakeWhatsApp::start(Answer::Success).await;
    let (proxy, asked) = test_proxy(false).await;
    connects_through(&fake, format!("http://{proxy}"), &asked, None).await;

    // A port nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let c = Client::start_with(
        &fake,
        true,
        serde_json::json!({ "proxy": format!("socks5://{dead_addr}") }),
    )
    .await;
    until("two failed connects", || {
        c.session.stats().connect_failures >= 2
    })
    .await;
    assert!(
        c.events.lock().unwrap().is_empty(),
        "{:?}",
        c.events.lock().unwrap()
    );
    let logins = fake.seen().len();
    assert_eq!(logins, 1, "only the first number reached the fake");
    c.session.shutdown().await;
}
