//! Transport conformance suite, written against the transport port (`WaConnector` /
//! `WaSession` / `WaEvent`) and a small control trait for the network side, so any transport
//! adapter can run it. Here it runs against the in-process simulator on paused time.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchboard::sim::ledger::Summary;
use switchboard::sim::{Dialer, FaultKind, Network, SimConfig, SimConnector};
use switchboard_actors::ids::Server;
use switchboard_actors::transport::{
    AccountSpec, Credentials, InboundMessage, MessageId, OutboundText, ReceiptKind, SendError,
    WaConnector, WaEvent, WaSession,
};
use switchboard_actors::{Jid, PhoneNumber};
use tokio::time::Instant;

/// The network side of the suite: what the phone, the contacts and the operator do.
trait NetworkControl {
    fn create(&self, n: &PhoneNumber);
    fn phone_pairs(&self, n: &PhoneNumber);
    fn contact_sends(
        &self,
        n: &PhoneNumber,
        from: &PhoneNumber,
        text: &str,
        group: Option<&str>,
    ) -> MessageId;
    fn inject(&self, kind: FaultKind, n: &PhoneNumber, duration: Duration);
    fn totals(&self) -> Summary;
    fn connector(&self) -> Arc<dyn WaConnector>;
}

impl NetworkControl for Network {
    fn create(&self, n: &PhoneNumber) {
        self.create_account(n);
    }
    fn phone_pairs(&self, n: &PhoneNumber) {
        Network::pair(self, n).unwrap();
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
    fn inject(&self, kind: FaultKind, n: &PhoneNumber, duration: Duration) {
        Network::fault(self, kind, n, 0, duration).unwrap();
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
        };
        let session = net.connector().start(account, sink).await.unwrap();
        Self { session, events }
    }

    /// Waits (on paused time) for the first event at or after index `from` matching `pred`.
    async fn wait(&self, what: &str, pred: impl Fn(&WaEvent) -> bool) -> (Instant, WaEvent) {
        let deadline = Instant::now() + Duration::from_secs(600);
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

/// A paired, connected client and its credentials.
async fn paired(net: &dyn NetworkControl, n: &PhoneNumber) -> (Client, Credentials) {
    net.create(n);
    let c = Client::start(net, n, "node-1", None).await;
    c.wait("qr", |e| matches!(e, WaEvent::QrCode { .. })).await;
    net.phone_pairs(n);
    let (_, ok) = c
        .wait("pair success", |e| matches!(e, WaEvent::PairSuccess { .. }))
        .await;
    c.wait("connected", |e| *e == WaEvent::Connected).await;
    let WaEvent::PairSuccess { credentials } = ok else {
        unreachable!()
    };
    (c, credentials)
}

fn text(id: &str, to: &PhoneNumber, reply_to: Option<&MessageId>) -> OutboundText {
    OutboundText {
        id: MessageId::parse(id).unwrap(),
        to: to.jid(),
        text: "hello".into(),
        reply_to: reply_to.cloned(),
    }
}

#[tokio::test(start_paused = true)]
async fn qr_codes_rotate_then_run_out() {
    let net = network();
    let n = phone("+15550101");
    net.create(&n);
    let t0 = Instant::now();
    let c = Client::start(&net, &n, "node-1", None).await;
    let (at, _) = c
        .wait("exhausted", |e| *e == WaEvent::QrCodesExhausted)
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
    assert_eq!(
        c.count(|e| *e == WaEvent::Connected),
        0,
        "never connected without pairing"
    );
    // Exhaustion is terminal: the session does not reconnect by itself.
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(c.count(|e| matches!(e, WaEvent::QrCode { .. })), 6);
    assert_eq!(c.session.stats().connect_attempts, 1);
}

#[tokio::test(start_paused = true)]
async fn pairing_by_qr_connects_and_a_paired_device_reconnects_without_qr() {
    let net = network();
    let n = phone("+15550102");
    let (c, creds) = paired(&net, &n).await;
    let order: Vec<_> = c
        .events
        .lock()
        .unwrap()
        .iter()
        .map(|(_, e)| e.clone())
        .collect();
    let pos = |want: &dyn Fn(&WaEvent) -> bool| order.iter().position(want).unwrap();
    assert!(
        pos(&|e| matches!(e, WaEvent::PairSuccess { .. })) < pos(&|e| *e == WaEvent::Connected)
    );
    c.session.shutdown().await;

    let again = Client::start(&net, &n, "node-1", Some(creds)).await;
    again.wait("connected", |e| *e == WaEvent::Connected).await;
    assert_eq!(again.count(|e| matches!(e, WaEvent::QrCode { .. })), 0);
}

#[tokio::test(start_paused = true)]
async fn pairing_by_code() {
    let net = network();
    let n = phone("+15550103");
    net.create(&n);
    let c = Client::start(&net, &n, "node-1", None).await;
    c.wait("qr", |e| matches!(e, WaEvent::QrCode { .. })).await;
    c.session.request_pair_code().await.unwrap();
    let (_, code) = c
        .wait("pair code", |e| matches!(e, WaEvent::PairCode { .. }))
        .await;
    let WaEvent::PairCode { code } = code else {
        unreachable!()
    };
    assert_eq!(code.len(), 8);
    net.phone_pairs(&n);
    c.wait("connected", |e| *e == WaEvent::Connected).await;
    assert!(
        c.session.request_pair_code().await.is_err(),
        "no pair code once connected"
    );
}

#[tokio::test(start_paused = true)]
async fn a_second_connection_replaces_the_first_which_stays_down() {
    let net = network();
    let n = phone("+15550104");
    let (first, creds) = paired(&net, &n).await;
    let second = Client::start(&net, &n, "node-2", Some(creds)).await;
    second.wait("connected", |e| *e == WaEvent::Connected).await;
    first
        .wait("replaced", |e| *e == WaEvent::StreamReplaced)
        .await;
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(
        first.session.stats().connect_attempts,
        1,
        "a replaced session never reconnects by itself"
    );
    let s = net.totals();
    assert_eq!((s.stream_replaced, s.replaced_then_reconnected), (1, 0));
    assert_eq!(second.count(|e| *e == WaEvent::StreamReplaced), 0);
}

#[tokio::test(start_paused = true)]
async fn sends_get_a_server_ack_an_echo_and_receipts() {
    let net = network();
    let n = phone("+15550105");
    let contact = phone("+4915200001");
    let (c, _) = paired(&net, &n).await;
    let ack = c
        .session
        .send_text(text("3EB0AAAA0001", &contact, None))
        .await
        .unwrap();
    assert_eq!(ack.id.as_str(), "3EB0AAAA0001");
    let echo = c.message("echo", |m| m.is_from_me).await;
    assert_eq!(
        (echo.id.as_str(), &echo.chat),
        ("3EB0AAAA0001", &contact.jid())
    );
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
    assert!(t_read > t_delivered);
    assert_eq!(net.totals().outbound, 1);
}

#[tokio::test(start_paused = true)]
async fn sending_past_the_limit_is_refused_with_rate_overlimit() {
    let net = network();
    let n = phone("+15550106");
    let contact = phone("+4915200002");
    let (c, _) = paired(&net, &n).await;
    for i in 0..3 {
        c.session
            .send_text(text(&format!("3EB0B{i}"), &contact, None))
            .await
            .unwrap();
    }
    assert_eq!(
        c.session.send_text(text("3EB0B3", &contact, None)).await,
        Err(SendError::RateOverlimit)
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.session
        .send_text(text("3EB0B3", &contact, None))
        .await
        .unwrap();
    let s = net.totals();
    assert_eq!(
        (s.rate_overlimit, s.outbound, s.duplicate_outbound_ids),
        (1, 4, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn ignoring_rate_overlimit_earns_a_temporary_ban() {
    let net = network();
    let n = phone("+15550107");
    let contact = phone("+4915200003");
    let (c, _) = paired(&net, &n).await;
    for i in 0..30 {
        if c.session
            .send_text(text(&format!("3EB0C{i}"), &contact, None))
            .await
            == Err(SendError::NotConnected)
        {
            break;
        }
    }
    let (_, ban) = c
        .wait("ban", |e| matches!(e, WaEvent::TemporaryBan { .. }))
        .await;
    assert!(
        matches!(ban, WaEvent::TemporaryBan { duration } if duration > Duration::from_secs(60))
    );
}

#[tokio::test(start_paused = true)]
async fn dms_and_groups_carry_lid_and_phone_addresses() {
    let net = network();
    let n = phone("+15550108");
    let contact = phone("+4915200004");
    let (c, _) = paired(&net, &n).await;
    let dm_id = net.contact_sends(&n, &contact, "hi", None);
    let group_id = net.contact_sends(&n, &contact, "hi all", Some("120363-42"));
    let dm = c.message("dm", |m| m.id == dm_id).await;
    assert_eq!(dm.chat, contact.jid());
    assert!(!dm.chat.is_group() && !dm.is_from_me);
    assert_eq!(dm.sender_alt.as_ref().map(Jid::server), Some(Server::Lid));
    let group = c.message("group message", |m| m.id == group_id).await;
    assert!(group.chat.is_group());
    assert_eq!(
        group.sender.server(),
        Server::Lid,
        "group senders are addressed by LID"
    );
    assert_eq!(
        group.sender_phone(),
        Some(contact.clone()),
        "with the phone number as alternative"
    );
    assert_eq!(dm.sender_phone(), Some(contact));
}

#[tokio::test(start_paused = true)]
async fn unacknowledged_inbound_is_redelivered_after_a_disconnect() {
    let net = network();
    let n = phone("+15550109");
    let contact = phone("+4915200005");
    let (c, _) = paired(&net, &n).await;
    let m1 = net.contact_sends(&n, &contact, "one", None);
    let m2 = net.contact_sends(&n, &contact, "two", None);
    let e1 = c.message("m1", |m| m.id == m1).await;
    c.message("m2", |m| m.id == m2).await;
    c.session.ack(&e1.chat, &e1.sender, &e1.id);
    tokio::time::sleep(Duration::from_millis(10)).await;
    c.clear();

    net.inject(FaultKind::Drop, &n, Duration::ZERO);
    c.wait("disconnected", |e| {
        matches!(e, WaEvent::Disconnected { .. })
    })
    .await;
    c.wait("reconnected", |e| *e == WaEvent::Connected).await;
    c.wait(
        "m2 again",
        |e| matches!(e, WaEvent::Message(m) if m.id == m2),
    )
    .await;
    assert_eq!(
        c.count(|e| matches!(e, WaEvent::Message(m) if m.id == m1)),
        0,
        "acknowledged messages are not redelivered"
    );
    let s = net.totals();
    assert_eq!((s.inbound, s.inbound_acked), (2, 1));
}

#[tokio::test(start_paused = true)]
async fn silent_connect_failures_back_off_by_fibonacci() {
    let net = network();
    let n = phone("+15550110");
    let (c, _) = paired(&net, &n).await;
    c.clear();
    let t0 = Instant::now();
    net.inject(FaultKind::Drop, &n, Duration::from_secs(10));
    c.wait("disconnected", |e| {
        matches!(e, WaEvent::Disconnected { .. })
    })
    .await;
    let (t, _) = c.wait("reconnected", |e| *e == WaEvent::Connected).await;
    // Attempts at 0, 1, 2, 4, 7 s fail without any event; the one at 12 s (±10 % per step) succeeds.
    let stats = c.session.stats();
    assert_eq!(stats.connect_failures, 5);
    let elapsed = (t - t0).as_secs_f64();
    assert!(
        (10.8..=13.2).contains(&elapsed),
        "reconnected after {elapsed} s"
    );
    let events = c.events.lock().unwrap().clone();
    let before_sync: Vec<_> = events
        .iter()
        .take_while(|(_, e)| !matches!(e, WaEvent::OfflineSyncCompleted { .. }))
        .collect();
    assert_eq!(
        before_sync.len(),
        2,
        "failed attempts emit no event: {events:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn logout_and_ban_are_terminal() {
    let net = network();
    let (a, b) = (phone("+15550111"), phone("+15550112"));
    let (ca, _) = paired(&net, &a).await;
    let (cb, _) = paired(&net, &b).await;
    net.inject(FaultKind::Logout, &a, Duration::ZERO);
    net.inject(FaultKind::Ban, &b, Duration::from_secs(3600));
    ca.wait("logged out", |e| *e == WaEvent::LoggedOut).await;
    let (_, ban) = cb
        .wait("banned", |e| matches!(e, WaEvent::TemporaryBan { .. }))
        .await;
    assert_eq!(
        ban,
        WaEvent::TemporaryBan {
            duration: Duration::from_secs(3600)
        }
    );
    tokio::time::sleep(Duration::from_secs(300)).await;
    assert_eq!(ca.session.stats().connect_attempts, 1);
    assert_eq!(cb.session.stats().connect_attempts, 1);
}
