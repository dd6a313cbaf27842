//! Transport conformance suite, written against the transport port (`WaConnector` /
//! `WaSession` / `WaEvent`) and a small control trait for the network side (what the phone, the
//! contacts and the operator do), so any transport adapter can run it: the simulator here, on
//! paused time; the whatsapp-rust adapter against its fake endpoint next. Each case is one
//! behaviour of WhatsApp as the whatsapp-rust 0.7 client presents it (SIMULATOR.md r2).
#![allow(clippy::unwrap_used, clippy::panic)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchboard::sim::ledger::Summary;
use switchboard::sim::{Dialer, Fault, FaultKind, Network, SimConfig, SimConnector};
use switchboard_actors::coordinator::Lease;
use switchboard_actors::ids::Server;
use switchboard_actors::store::{Fence, FencingToken};
use switchboard_actors::transport::{
    AccountSpec, AckError, Credentials, InboundMessage, MessageId, OutboundText, Receipt,
    ReceiptKind, ServerAck, WaConnector, WaEvent, WaSession,
};
use switchboard_actors::{Jid, PhoneNumber};
use tokio::time::Instant;

/// The network side of the suite.
trait NetworkControl {
    fn create(&self, n: &PhoneNumber);
    /// The phone scans the QR code showing now.
    fn phone_scans(&self, n: &PhoneNumber);
    /// The phone enters `code`; false if refused.
    fn phone_enters(&self, n: &PhoneNumber, code: &str) -> bool;
    fn contact_sends(
        &self,
        n: &PhoneNumber,
        from: &PhoneNumber,
        text: &str,
        group: Option<&str>,
    ) -> MessageId;
    /// A person writes to `to` from the account's phone.
    fn phone_sends(&self, n: &PhoneNumber, to: &PhoneNumber, text: &str) -> MessageId;
    fn inject(&self, n: &PhoneNumber, fault: Fault);
    fn totals(&self) -> Summary;
    fn connector(&self) -> Arc<dyn WaConnector>;
}

impl NetworkControl for Network {
    fn create(&self, n: &PhoneNumber) {
        self.create_account(n);
    }
    fn phone_scans(&self, n: &PhoneNumber) {
        Network::pair(self, n, None).unwrap();
    }
    fn phone_enters(&self, n: &PhoneNumber, code: &str) -> bool {
        Network::pair(self, n, Some(code)).is_ok()
    }
    fn contact_sends(
        &self,
        n: &PhoneNumber,
        from: &PhoneNumber,
        text: &str,
        group: Option<&str>,
    ) -> MessageId {
        Network::inbound(self, n, from, text, group, None).unwrap()
    }
    fn phone_sends(&self, n: &PhoneNumber, to: &PhoneNumber, text: &str) -> MessageId {
        Network::phone_send(self, n, to, text).unwrap()
    }
    fn inject(&self, n: &PhoneNumber, fault: Fault) {
        Network::fault(self, n, fault).unwrap();
    }
    fn totals(&self) -> Summary {
        Network::summary(self)
    }
    fn connector(&self) -> Arc<dyn WaConnector> {
        Arc::new(SimConnector::new(Dialer::Local(self.clone())))
    }
}

type Events = Arc<Mutex<Vec<(Instant, WaEvent)>>>;

struct Client {
    session: Arc<dyn WaSession>,
    events: Events,
}

impl Client {
    async fn start(
        net: &dyn NetworkControl,
        n: &PhoneNumber,
        label: &str,
        creds: Option<Credentials>,
    ) -> Self {
        let events: Events = Arc::default();
        let sink_events = events.clone();
        let sink =
            Arc::new(move |e: WaEvent| sink_events.lock().unwrap().push((Instant::now(), e)));
        let account = AccountSpec {
            number: n.clone(),
            client_label: label.to_owned(),
            credentials: creds,
            lease: Lease::new(Fence {
                number: n.clone(),
                token: FencingToken::new(1).unwrap(),
            }),
        };
        let session = net.connector().start(account, sink).await.unwrap();
        Self { session, events }
    }

    /// Waits (on paused time) for the first event matching `pred`.
    async fn wait(&self, what: &str, pred: impl Fn(&WaEvent) -> bool) -> (Instant, WaEvent) {
        let deadline = Instant::now() + Duration::from_secs(900);
        loop {
            if let Some(found) = self
                .events
                .lock()
                .unwrap()
                .iter()
                .find(|(_, e)| pred(e))
                .cloned()
            {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "no {what}; events: {:?}",
                self.events.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits for the first message event matching `pred` and returns the message.
    async fn message(&self, what: &str, pred: impl Fn(&InboundMessage) -> bool) -> InboundMessage {
        match self
            .wait(what, |e| matches!(e, WaEvent::Message(m) if pred(m)))
            .await
            .1
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
            .filter(|(_, e)| pred(e))
            .count()
    }

    /// Every event so far, in order.
    fn all(&self) -> Vec<WaEvent> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// Where the first event matching `pred` is among all events.
    fn position(&self, pred: impl Fn(&WaEvent) -> bool) -> Option<usize> {
        self.all().iter().position(pred)
    }

    fn clear(&self) {
        self.events.lock().unwrap().clear();
    }
}

fn phone(s: &str) -> PhoneNumber {
    PhoneNumber::parse(s).unwrap()
}

fn network() -> Network {
    Network::new(SimConfig {
        seed: 42,
        ..SimConfig::default()
    })
}

fn fault(kind: FaultKind, duration: Duration) -> Fault {
    Fault::new(kind, duration)
}

fn is_connected(e: &WaEvent) -> bool {
    *e == WaEvent::Connected
}

/// A paired, connected client and its credentials.
async fn paired(net: &dyn NetworkControl, n: &PhoneNumber) -> (Client, Credentials) {
    net.create(n);
    let c = Client::start(net, n, "node-1", None).await;
    c.wait("qr", |e| matches!(e, WaEvent::QrCode { .. })).await;
    net.phone_scans(n);
    let (_, ok) = c
        .wait("pair success", |e| matches!(e, WaEvent::PairSuccess { .. }))
        .await;
    c.wait("connected", is_connected).await;
    let WaEvent::PairSuccess { credentials } = ok else {
        unreachable!()
    };
    (c, credentials)
}

fn text(id: &str, to: &Jid, reply_to: Option<&MessageId>) -> OutboundText {
    OutboundText {
        id: MessageId::parse(id).unwrap(),
        to: to.clone(),
        text: "hello".into(),
        reply_to: reply_to.cloned(),
        reply_to_sender: None,
    }
}

fn acked(c: &Client, id: &str) -> Option<ServerAck> {
    c.all().into_iter().find_map(|e| match e {
        WaEvent::ServerAck(a) if a.id.as_str() == id => Some(a),
        _ => None,
    })
}

fn receipts(c: &Client) -> Vec<Receipt> {
    c.all()
        .into_iter()
        .filter_map(|e| match e {
            WaEvent::Receipt(r) => Some(r),
            _ => None,
        })
        .collect()
}

// ---- pairing --------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn qr_codes_rotate_then_run_out() {
    let net = network();
    let n = phone("+15550101");
    net.create(&n);
    let t0 = Instant::now();
    let c = Client::start(&net, &n, "node-1", None).await;
    let (at, _) = c
        .wait("exhausted", |e| {
            *e == WaEvent::QrCodesExhausted { disconnected: true }
        })
        .await;
    let qrs: Vec<(Instant, Duration, String)> = c
        .events
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(t, e)| match e {
            WaEvent::QrCode { code, valid_for } => Some((*t, *valid_for, code.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(qrs.len(), 6, "the first code and five more");
    assert_eq!(qrs[0].1, Duration::from_secs(60));
    assert!(qrs[1..].iter().all(|q| q.1 == Duration::from_secs(20)));
    assert_eq!(qrs[1].0 - qrs[0].0, Duration::from_secs(60));
    let codes: std::collections::HashSet<_> = qrs.iter().map(|q| &q.2).collect();
    assert_eq!(codes.len(), 6, "every code is new");
    assert_eq!(at - t0, Duration::from_secs(160));
    assert_eq!(c.count(is_connected), 0, "never connected without pairing");
    // Exhaustion is terminal: the session does not reconnect by itself.
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(c.count(|e| matches!(e, WaEvent::QrCode { .. })), 6);
    assert_eq!(c.session.stats().connect_attempts, 1);
}

#[tokio::test(start_paused = true)]
async fn pairing_by_qr_reconnects_before_connected_and_a_paired_device_needs_no_qr() {
    let net = network();
    let n = phone("+15550102");
    let (c, creds) = paired(&net, &n).await;
    let pos = |want: &dyn Fn(&WaEvent) -> bool| c.position(want).unwrap();
    let success = pos(&|e| matches!(e, WaEvent::PairSuccess { .. }));
    let preview = pos(&|e| matches!(e, WaEvent::OfflineSyncPreview { .. }));
    let sync = pos(&|e| matches!(e, WaEvent::OfflineSyncCompleted { .. }));
    assert!(success < preview && preview < sync && sync < pos(&is_connected));
    // The server asked for a new connection after pairing: `Connected` came on the second,
    // at once and without a `Disconnected`.
    assert_eq!(c.session.stats().connect_attempts, 2);
    assert_eq!(c.count(|e| matches!(e, WaEvent::Disconnected { .. })), 0);
    c.session.shutdown().await;

    let again = Client::start(&net, &n, "node-1", Some(creds)).await;
    again.wait("connected", is_connected).await;
    assert_eq!(again.count(|e| matches!(e, WaEvent::QrCode { .. })), 0);
}

#[tokio::test(start_paused = true)]
async fn pairing_by_code_is_generated_by_the_client_and_confirmed_by_the_phone() {
    let net = network();
    let n = phone("+15550103");
    net.create(&n);
    let c = Client::start(&net, &n, "node-1", None).await;
    c.wait("qr", |e| matches!(e, WaEvent::QrCode { .. })).await;
    c.session.request_pair_code().await.unwrap();
    let (_, event) = c
        .wait("pair code", |e| matches!(e, WaEvent::PairCode { .. }))
        .await;
    let WaEvent::PairCode { code, valid_for } = event else {
        unreachable!()
    };
    assert_eq!(code.len(), 8);
    assert!(
        code.bytes()
            .all(|b| b"123456789ABCDEFGHJKLMNPQRSTVWXYZ".contains(&b)),
        "{code} uses the client's alphabet"
    );
    assert_eq!(valid_for, Duration::from_secs(180));
    assert!(
        c.session.request_pair_code().await.is_err(),
        "a second code while one is outstanding is refused"
    );
    // QR codes keep rotating meanwhile.
    let qrs = c.count(|e| matches!(e, WaEvent::QrCode { .. }));
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert!(c.count(|e| matches!(e, WaEvent::QrCode { .. })) > qrs);
    assert!(!net.phone_enters(&n, "WRONG123"), "a wrong code is refused");
    assert!(net.phone_enters(&n, &code));
    c.wait("pair success", |e| matches!(e, WaEvent::PairSuccess { .. }))
        .await;
    c.wait("connected", is_connected).await;
    assert_eq!(c.session.stats().connect_attempts, 2, "on a new connection");
    assert!(
        c.session.request_pair_code().await.is_err(),
        "no pair code once paired"
    );
}

#[tokio::test(start_paused = true)]
async fn an_outstanding_pair_code_keeps_the_connection_after_the_qr_codes_run_out() {
    let net = network();
    let n = phone("+15550113");
    net.create(&n);
    let t0 = Instant::now();
    let c = Client::start(&net, &n, "node-1", None).await;
    c.wait("qr", |e| matches!(e, WaEvent::QrCode { .. })).await;
    tokio::time::sleep(Duration::from_secs(100)).await;
    c.session.request_pair_code().await.unwrap();
    let (at, _) = c
        .wait("qr exhausted, still up", |e| {
            *e == WaEvent::QrCodesExhausted {
                disconnected: false,
            }
        })
        .await;
    let exhausted = (at - t0).as_secs_f64();
    assert!(
        (160.0..160.1).contains(&exhausted),
        "exhausted at {exhausted} s"
    );
    let (end, _) = c
        .wait("pairing over", |e| {
            *e == WaEvent::QrCodesExhausted { disconnected: true }
        })
        .await;
    let expired = (end - t0).as_secs_f64();
    assert!(
        (280.0..280.1).contains(&expired),
        "code expired at {expired} s"
    );
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(c.session.stats().connect_attempts, 1, "terminal");
}

// ---- connections ----------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_second_connection_replaces_the_first_which_stays_down() {
    let net = network();
    let n = phone("+15550104");
    let (first, creds) = paired(&net, &n).await;
    let second = Client::start(&net, &n, "node-2", Some(creds)).await;
    second.wait("connected", is_connected).await;
    first
        .wait("replaced", |e| *e == WaEvent::StreamReplaced)
        .await;
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(
        first.session.stats().connect_attempts,
        2,
        "a replaced session never reconnects by itself"
    );
    let s = net.totals();
    assert_eq!((s.stream_replaced, s.replaced_then_reconnected), (1, 0));
    assert_eq!(second.count(|e| *e == WaEvent::StreamReplaced), 0);
}

#[tokio::test(start_paused = true)]
async fn reconnects_back_off_by_fibonacci_and_reset_only_after_a_stable_connection() {
    let net = network();
    let n = phone("+15550110");
    let (c, _) = paired(&net, &n).await;
    c.clear();
    let t0 = Instant::now();
    net.inject(&n, fault(FaultKind::Drop, Duration::from_secs(10)));
    c.wait("disconnected", |e| {
        matches!(e, WaEvent::Disconnected { .. })
    })
    .await;
    let (t, _) = c.wait("reconnected", is_connected).await;
    // Attempts at 1, 2, 4, 7 s fail without any event; the one at 12 s (±10 % per step)
    // succeeds.
    assert_eq!(c.session.stats().connect_failures, 4);
    let elapsed = (t - t0).as_secs_f64();
    assert!(
        (10.8..=13.2).contains(&elapsed),
        "reconnected after {elapsed} s"
    );
    let events = c.all();
    let before_sync: Vec<_> = events
        .iter()
        .take_while(|e| {
            !matches!(
                e,
                WaEvent::OfflineSyncPreview { .. } | WaEvent::OfflineSyncCompleted { .. }
            )
        })
        .collect();
    assert_eq!(
        before_sync.len(),
        1,
        "failed attempts emit no event: {events:?}"
    );

    // A drop soon after: the backoff keeps counting (step 5: 8 s).
    c.clear();
    let t1 = Instant::now();
    net.inject(&n, fault(FaultKind::Drop, Duration::ZERO));
    let (t, _) = c.wait("reconnected", is_connected).await;
    let gap = (t - t1).as_secs_f64();
    assert!((7.2..=8.8).contains(&gap), "unstable: waited {gap} s");

    // After 30 s up, the next drop starts over at 1 s.
    tokio::time::sleep(Duration::from_secs(31)).await;
    c.clear();
    let t2 = Instant::now();
    net.inject(&n, fault(FaultKind::Drop, Duration::ZERO));
    let (t, _) = c.wait("reconnected", is_connected).await;
    let gap = (t - t2).as_secs_f64();
    assert!((0.9..=1.1).contains(&gap), "stable: waited {gap} s");
}

#[tokio::test(start_paused = true)]
async fn logout_and_ban_are_terminal_and_logout_works_offline() {
    let net = network();
    let (a, b, d) = (phone("+15550111"), phone("+15550112"), phone("+15550114"));
    let (ca, _) = paired(&net, &a).await;
    let (cb, _) = paired(&net, &b).await;
    net.inject(&a, fault(FaultKind::Logout, Duration::ZERO));
    net.inject(&b, fault(FaultKind::Ban, Duration::from_secs(3600)));
    ca.wait("logged out", |e| *e == WaEvent::LoggedOut).await;
    // A ban closes the live connection; the next login is refused with it.
    cb.wait("disconnected", |e| {
        matches!(e, WaEvent::Disconnected { .. })
    })
    .await;
    let (_, ban) = cb
        .wait("banned", |e| matches!(e, WaEvent::TemporaryBan { .. }))
        .await;
    let WaEvent::TemporaryBan { code, duration } = ban else {
        unreachable!()
    };
    assert!(duration > Duration::from_secs(3590) && duration <= Duration::from_secs(3600));
    assert!(
        (101..=106).contains(&code),
        "a ban names its reason: {code}"
    );
    tokio::time::sleep(Duration::from_secs(300)).await;
    assert_eq!(ca.session.stats().connect_attempts, 2);
    assert_eq!(cb.session.stats().connect_attempts, 3);
    assert_eq!(net.totals().bans, 1);

    // Logout with no connection: the device forgets its identity and the session ends.
    let (cd, _) = paired(&net, &d).await;
    net.inject(&d, fault(FaultKind::Drop, Duration::from_secs(600)));
    cd.wait("disconnected", |e| {
        matches!(e, WaEvent::Disconnected { .. })
    })
    .await;
    cd.session.logout().await.unwrap();
    cd.wait("logged out", |e| *e == WaEvent::LoggedOut).await;
    let attempts = cd.session.stats().connect_attempts;
    tokio::time::sleep(Duration::from_secs(900)).await;
    assert_eq!(cd.session.stats().connect_attempts, attempts);
}

// ---- sends ----------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_send_is_settled_by_a_server_ack_and_receipts_with_no_copy_to_the_sender() {
    let net = network();
    let n = phone("+15550105");
    let contact = phone("+4915200001");
    let (c, _) = paired(&net, &n).await;
    c.session
        .send_text(text("3EB0AAAA0001", &contact.jid(), None))
        .await
        .unwrap();
    let (t_ack, _) = c
        .wait("server ack", |e| matches!(e, WaEvent::ServerAck(_)))
        .await;
    assert_eq!(acked(&c, "3EB0AAAA0001").unwrap().error, None);
    let (t_delivered, _) = c
        .wait(
            "delivered",
            |e| matches!(e, WaEvent::Receipt(r) if r.kind == ReceiptKind::Delivered),
        )
        .await;
    let (t_read, _) = c
        .wait(
            "read",
            |e| matches!(e, WaEvent::Receipt(r) if r.kind == ReceiptKind::Read),
        )
        .await;
    assert!(t_ack <= t_delivered && t_delivered < t_read);
    let r = &receipts(&c)[0];
    assert_eq!(
        (r.ids.clone(), &r.chat, r.offline),
        (
            vec![MessageId::parse("3EB0AAAA0001").unwrap()],
            &contact.jid(),
            false
        )
    );
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(
        c.count(|e| matches!(e, WaEvent::Message(_) | WaEvent::FromPhone(_))),
        0,
        "the sending device gets no copy of its own send"
    );
    let s = net.totals();
    assert_eq!((s.outbound, s.ack_errors), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn sends_past_the_limit_get_error_acks_and_ignoring_them_earns_a_ban() {
    let net = network();
    let n = phone("+15550106");
    let contact = phone("+4915200002").jid();
    let (c, _) = paired(&net, &n).await;
    for i in 0..4 {
        c.session
            .send_text(text(&format!("3EB0B{i}"), &contact, None))
            .await
            .unwrap();
    }
    c.wait(
        "the fourth ack",
        |e| matches!(e, WaEvent::ServerAck(a) if a.id.as_str() == "3EB0B3"),
    )
    .await;
    let refused = acked(&c, "3EB0B3").unwrap().error.unwrap();
    assert!(refused.is_rate_limit() && refused.code == AckError::RATE_OVERLIMIT);
    assert!((0..3).all(|i| acked(&c, &format!("3EB0B{i}")).unwrap().error.is_none()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.session
        .send_text(text("3EB0B3", &contact, None))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let s = net.totals();
    assert_eq!(
        (s.rate_overlimit, s.ack_errors, s.outbound, s.resent_same_id),
        (1, 1, 4, 0),
        "a refused send was never taken: sending it again is not a resend"
    );

    // Ignoring the refusals: banned, at the next login.
    for i in 0..40 {
        if c.session
            .send_text(text(&format!("3EB0C{i}"), &contact, None))
            .await
            .is_err()
        {
            break;
        }
    }
    let (_, ban) = c
        .wait("ban", |e| matches!(e, WaEvent::TemporaryBan { .. }))
        .await;
    assert!(
        matches!(ban, WaEvent::TemporaryBan { duration, .. } if duration > Duration::from_secs(60))
    );
}

#[tokio::test(start_paused = true)]
async fn an_ack_error_fault_refuses_sends_and_an_ack_that_never_comes_leaves_receipts() {
    let net = network();
    let n = phone("+15550115");
    let contact = phone("+4915200012").jid();
    let (c, _) = paired(&net, &n).await;
    net.inject(
        &n,
        Fault {
            code: Some(463),
            ..fault(FaultKind::AckError, Duration::from_secs(5))
        },
    );
    c.session
        .send_text(text("3EB0E1", &contact, None))
        .await
        .unwrap();
    c.wait("error ack", |e| matches!(e, WaEvent::ServerAck(_)))
        .await;
    assert_eq!(acked(&c, "3EB0E1").unwrap().error.unwrap().code, 463);
    assert_eq!(net.totals().outbound, 0, "not taken");

    tokio::time::sleep(Duration::from_secs(6)).await;
    net.inject(&n, fault(FaultKind::NoAck, Duration::from_secs(30)));
    c.session
        .send_text(text("3EB0E2", &contact, None))
        .await
        .unwrap();
    c.wait(
        "delivered",
        |e| matches!(e, WaEvent::Receipt(r) if r.ids.iter().any(|i| i.as_str() == "3EB0E2")),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(acked(&c, "3EB0E2").is_none(), "the ack never came");
    let s = net.totals();
    assert_eq!((s.outbound, s.ack_errors), (1, 1), "taken, though unacked");
}

#[tokio::test(start_paused = true)]
async fn receipts_come_in_lists_queued_while_offline_and_withheld_while_the_contact_is() {
    let net = network();
    let n = phone("+15550116");
    let contact = phone("+4915200013").jid();
    let (c, _) = paired(&net, &n).await;
    for i in 0..2 {
        c.session
            .send_text(text(&format!("3EB0F{i}"), &contact, None))
            .await
            .unwrap();
    }
    // Offline before any receipt: they are queued and come at login, merged, before Connected.
    net.inject(&n, fault(FaultKind::Drop, Duration::from_secs(10)));
    c.clear();
    c.wait("reconnected", is_connected).await;
    let offline = receipts(&c);
    assert_eq!(
        offline.len(),
        2,
        "one delivered and one read list: {offline:?}"
    );
    assert!(offline.iter().all(|r| r.offline && r.ids.len() == 2));
    let receipt = c.position(|e| matches!(e, WaEvent::Receipt(_))).unwrap();
    let sync = c
        .position(|e| *e == WaEvent::OfflineSyncCompleted { count: 2 })
        .unwrap();
    assert!(receipt < sync && sync < c.position(is_connected).unwrap());

    // A contact that is offline sends its receipts together when it is back.
    c.clear();
    net.inject(
        &n,
        fault(FaultKind::ContactOffline, Duration::from_secs(20)),
    );
    for i in 2..4 {
        c.session
            .send_text(text(&format!("3EB0F{i}"), &contact, None))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(19)).await;
    assert!(receipts(&c).is_empty(), "withheld");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let back = receipts(&c);
    assert_eq!(back.len(), 2, "{back:?}");
    assert!(back.iter().all(|r| !r.offline && r.ids.len() == 2));
}

#[tokio::test(start_paused = true)]
async fn sending_an_id_again_is_a_resend_and_a_new_id_with_the_same_text_is_shown_twice() {
    let net = network();
    let n = phone("+15550117");
    let contact = phone("+4915200014");
    let (c, _) = paired(&net, &n).await;
    let q = net.contact_sends(&n, &contact, "hi", None);
    let m = c.message("inbound", |m| m.id == q).await;
    let chat = m.chat.clone();
    c.session
        .send_text(text("3EB0G1", &chat, Some(&q)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.session
        .send_text(text("3EB0G1", &chat, Some(&q)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = net.totals();
    assert_eq!(
        (s.outbound, s.resent_same_id, s.duplicate_outbound_ids),
        (1, 1, 1)
    );
    assert_eq!(
        (s.duplicate_replies, s.shown_twice, s.inbound_unanswered),
        (0, 0, 0)
    );
    c.session
        .send_text(text("3EB0G2", &chat, Some(&q)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = net.totals();
    assert_eq!((s.outbound, s.duplicate_replies, s.shown_twice), (2, 1, 1));
}

// ---- inbound --------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn dms_come_by_phone_or_by_lid_and_groups_carry_lid_senders() {
    let net = network();
    let n = phone("+15550108");
    let (c, _) = paired(&net, &n).await;
    let mut by_lid = 0;
    for i in 0..100 {
        let contact = phone(&format!("+49152{i:05}"));
        let id = net.contact_sends(&n, &contact, "hi", None);
        let dm = c.message("dm", |m| m.id == id).await;
        assert_eq!(dm.sender, dm.chat, "in a DM the chat is the sender");
        assert!(!dm.chat.is_group() && !dm.is_from_me && !dm.offline);
        assert_eq!(dm.sender_phone(), Some(contact.clone()));
        match dm.chat.server() {
            Server::Lid => {
                by_lid += 1;
                assert_eq!(dm.sender_alt, Some(contact.jid()));
            }
            _ => assert_eq!(dm.sender_alt.as_ref().map(Jid::server), Some(Server::Lid)),
        }
    }
    assert!(
        (15..=45).contains(&by_lid),
        "{by_lid} of 100 contacts by LID"
    );

    let contact = phone("+4915200004");
    let group_id = net.contact_sends(&n, &contact, "hi all", Some("120363-42"));
    let group = c.message("group message", |m| m.id == group_id).await;
    assert!(group.chat.is_group());
    assert_eq!(group.sender.server(), Server::Lid, "group senders are LIDs");
    assert_eq!(group.sender_phone(), Some(contact));
}

#[tokio::test(start_paused = true)]
async fn what_arrived_offline_is_drained_marked_offline_before_connected() {
    let net = network();
    let n = phone("+15550109");
    let contact = phone("+4915200005");
    let (c, _) = paired(&net, &n).await;
    let m1 = net.contact_sends(&n, &contact, "one", None);
    let e1 = c.message("m1", |m| m.id == m1).await;
    assert!(!e1.offline);
    c.session.ack(&[e1.key()]);
    tokio::time::sleep(Duration::from_millis(10)).await;
    net.inject(&n, fault(FaultKind::Drop, Duration::from_secs(5)));
    c.wait("disconnected", |e| {
        matches!(e, WaEvent::Disconnected { .. })
    })
    .await;
    let m2 = net.contact_sends(&n, &contact, "two", None);
    c.clear();
    c.wait("reconnected", is_connected).await;
    let e2 = c.message("m2 from the offline queue", |m| m.id == m2).await;
    assert!(e2.offline);
    let pos = c.position(|e| matches!(e, WaEvent::Message(m) if m.id == m2));
    let sync = c.position(|e| *e == WaEvent::OfflineSyncCompleted { count: 1 });
    assert!(pos < sync && sync < c.position(is_connected));
    assert_eq!(
        c.count(|e| matches!(e, WaEvent::Message(m) if m.id == m1)),
        0,
        "acknowledged messages are not redelivered"
    );
    let s = net.totals();
    assert_eq!((s.inbound, s.inbound_acked), (2, 1));
}

#[tokio::test(start_paused = true)]
async fn a_connection_that_owes_acks_too_long_is_recycled_and_redelivers() {
    let net = network();
    let n = phone("+15550118");
    let contact = phone("+4915200015");
    let (c, _) = paired(&net, &n).await;
    let t0 = Instant::now();
    let id = net.contact_sends(&n, &contact, "never acked", None);
    c.message("delivered", |m| m.id == id).await;
    c.clear();
    let (t, _) = c
        .wait("recycled", |e| matches!(e, WaEvent::Disconnected { .. }))
        .await;
    let owed = (t - t0).as_secs();
    assert!((60..=62).contains(&owed), "recycled after {owed} s");
    let again = c.message("redelivered", |m| m.id == id).await;
    assert!(again.offline);
}

#[tokio::test(start_paused = true)]
async fn an_undecryptable_message_is_resent_readable_with_the_same_id() {
    let net = network();
    let n = phone("+15550119");
    let contact = phone("+4915200016");
    let (c, _) = paired(&net, &n).await;
    net.inject(&n, fault(FaultKind::Undecryptable, Duration::from_secs(10)));
    let id = net.contact_sends(&n, &contact, "secret", None);
    let readable = c.message("readable copy", |m| m.id == id).await;
    assert_eq!(readable.text, "secret");
    let first = c
        .position(|e| matches!(e, WaEvent::Undecryptable { id: u, .. } if *u == id))
        .expect("first undecryptable");
    assert!(
        first
            < c.position(|e| matches!(e, WaEvent::Message(m) if m.id == id))
                .unwrap()
    );
    c.session.ack(&[readable.key()]);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(net.totals().inbound_acked, 1);
}

#[tokio::test(start_paused = true)]
async fn a_message_sent_from_the_phone_arrives_as_its_own_event() {
    let net = network();
    let n = phone("+15550120");
    let contact = phone("+4915200017");
    let (c, _) = paired(&net, &n).await;
    let q = net.contact_sends(&n, &contact, "is anyone there?", None);
    let asked = c.message("question", |m| m.id == q).await;
    let id = net.phone_sends(&n, &contact, "yes, Anna here");
    let (_, event) = c
        .wait("from phone", |e| matches!(e, WaEvent::FromPhone(_)))
        .await;
    let WaEvent::FromPhone(m) = event else {
        unreachable!()
    };
    assert_eq!((&m.id, &m.chat, m.is_from_me), (&id, &asked.chat, true));
    assert_eq!(m.sender, n.jid());
    c.session.ack(&[m.key()]);
    let s = net.totals();
    assert_eq!((s.phone_sent, s.inbound), (1, 1));
}
