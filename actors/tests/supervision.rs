//! Supervision on paused time: restarts, redelivery, dead letters, parking and isolation,
//! with a fake transport behind the real ports.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use switchboard_actors::command::{BusinessSend, CommandError, Done, NumberCommand};
use switchboard_actors::conversations::{ChatStatus, ConversationsMsg};
use switchboard_actors::coordinator::{LocalCoordinator, TokenSource};
use switchboard_actors::dead_letter::DeadLetterReason;
use switchboard_actors::deps::SendRate;
use switchboard_actors::number::{HANDOFF_SETTLE, NumberMsg};
use switchboard_actors::responder::{AiBackend, AiError, ChatContext, Reply, Responder};
use switchboard_actors::store::{
    Completion, Fence, Health, MemoryStore, OutageKind, Pending, Queued, Recorded, Store,
    StoreError, Unsent,
};
use switchboard_actors::transport::{
    AccountSpec, AckError, Credentials, EventSink, InboundMessage, MessageId, MessageKey,
    OutboundText, Receipt, ReceiptKind, SendError, ServerAck, SessionStats, TransportError,
    WaConnector, WaEvent, WaSession,
};
use switchboard_actors::{Deps, Fleet, FleetCounters, Jid, NumberPhase, PhoneNumber, Settings};
use tokio::time::Instant;

// ---- fakes ------------------------------------------------------------------------------

#[derive(Default)]
struct FakeNet {
    sessions: Mutex<HashMap<PhoneNumber, Vec<Arc<FakeSession>>>>,
    /// Delivered on connect, before the offline-sync marker (like unacknowledged messages).
    offline: Mutex<HashMap<PhoneNumber, Vec<InboundMessage>>>,
    /// Delivery receipts queued for the next login, before the offline-sync marker.
    offline_receipts: Mutex<HashMap<PhoneNumber, Vec<MessageId>>>,
    /// How the server answers sends, for every session.
    acks: Mutex<Acks>,
}

/// How the fake server answers sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Acks {
    /// At once, without error.
    #[default]
    Ok,
    /// Never (the `no_ack` fault).
    Withheld,
    /// With this error code.
    Error(u16),
}

impl FakeNet {
    fn latest(&self, n: &PhoneNumber) -> Arc<FakeSession> {
        self.sessions.lock().unwrap()[n].last().cloned().unwrap()
    }
    fn starts(&self, n: &PhoneNumber) -> usize {
        self.sessions.lock().unwrap().get(n).map_or(0, Vec::len)
    }
    /// Every reply sent for `n`, over all of its sessions.
    fn sent(&self, n: &PhoneNumber) -> Vec<OutboundText> {
        let sessions = self.sessions.lock().unwrap();
        sessions
            .get(n)
            .into_iter()
            .flatten()
            .flat_map(|s| s.sent.lock().unwrap().clone())
            .collect()
    }
}

struct FakeConnector(Arc<FakeNet>);

#[async_trait]
impl WaConnector for FakeConnector {
    async fn start(
        &self,
        account: AccountSpec,
        events: EventSink,
    ) -> Result<Arc<dyn WaSession>, TransportError> {
        let session = Arc::new(FakeSession {
            net: Arc::downgrade(&self.0),
            sink: events.clone(),
            sent: Mutex::default(),
            acked: Mutex::default(),
            closed: AtomicBool::new(false),
        });
        self.0
            .sessions
            .lock()
            .unwrap()
            .entry(account.number.clone())
            .or_default()
            .push(session.clone());
        session.login(&self.0, &account.number);
        Ok(session)
    }
}

struct FakeSession {
    net: std::sync::Weak<FakeNet>,
    sink: EventSink,
    sent: Mutex<Vec<OutboundText>>,
    acked: Mutex<Vec<MessageId>>,
    closed: AtomicBool,
}

impl FakeSession {
    fn inject(&self, msg: InboundMessage) {
        (self.sink)(WaEvent::Message(msg));
    }

    /// Logs in as WhatsApp does: the offline queue, the sync marker, then `Connected`.
    fn login(&self, net: &FakeNet, n: &PhoneNumber) {
        let offline = net.offline.lock().unwrap().remove(n).unwrap_or_default();
        let receipts = net
            .offline_receipts
            .lock()
            .unwrap()
            .remove(n)
            .unwrap_or_default();
        let count = offline.len() + usize::from(!receipts.is_empty());
        for msg in offline {
            (self.sink)(WaEvent::Message(msg));
        }
        if !receipts.is_empty() {
            (self.sink)(WaEvent::Receipt(Receipt {
                chat: Jid::parse("4915100099@s.whatsapp.net").unwrap(),
                sender: None,
                ids: receipts.clone(),
                kind: ReceiptKind::Delivered,
                offline: true,
            }));
        }
        (self.sink)(WaEvent::OfflineSyncCompleted { count });
        (self.sink)(WaEvent::Connected);
    }

    /// The connection drops and comes back: what was owed is redelivered.
    fn reconnect(&self, net: &FakeNet, n: &PhoneNumber) {
        (self.sink)(WaEvent::Disconnected {
            reason: switchboard_actors::transport::DisconnectReason::ConnectionLost,
        });
        self.login(net, n);
    }

    /// The server acks `id` now (late).
    fn ack_now(&self, id: &MessageId) {
        (self.sink)(WaEvent::ServerAck(ServerAck {
            id: id.clone(),
            error: None,
        }));
    }
}

#[async_trait]
impl WaSession for FakeSession {
    async fn send_text(&self, msg: OutboundText) -> Result<(), SendError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(SendError::Closed);
        }
        let id = msg.id.clone();
        self.sent.lock().unwrap().push(msg);
        let acks = self.net.upgrade().map(|n| *n.acks.lock().unwrap());
        let error = match acks {
            Some(Acks::Ok) | None => None,
            Some(Acks::Withheld) => return Ok(()),
            Some(Acks::Error(code)) => Some(AckError {
                code,
                text: "refused".into(),
            }),
        };
        (self.sink)(WaEvent::ServerAck(ServerAck { id, error }));
        Ok(())
    }
    async fn send_typing(&self, _: &Jid, _: bool) -> Result<(), SendError> {
        Ok(())
    }
    async fn mark_read(&self, _: &Jid, _: Option<&Jid>, _: &[MessageId]) -> Result<(), SendError> {
        Ok(())
    }
    fn ack(&self, messages: &[MessageKey]) {
        let mut acked = self.acked.lock().unwrap();
        acked.extend(messages.iter().map(|m| m.id.clone()));
    }
    async fn request_pair_code(&self) -> Result<(), TransportError> {
        Ok(())
    }
    async fn logout(&self) -> Result<(), TransportError> {
        (self.sink)(WaEvent::LoggedOut);
        Ok(())
    }
    async fn shutdown(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }
    fn stats(&self) -> SessionStats {
        SessionStats::default()
    }
}

/// Panics on texts with crashes left (`poison` always), records when each text was attempted,
/// answers `ai …` through the model, and echoes the rest.
#[derive(Default)]
struct Scripted {
    crashes_left: Mutex<HashMap<String, u32>>,
    attempts: Mutex<Vec<(String, Instant)>>,
}

impl Responder for Scripted {
    fn respond(&self, _: &ChatContext, msg: &InboundMessage) -> Reply {
        self.attempts
            .lock()
            .unwrap()
            .push((msg.text.clone(), Instant::now()));
        if msg.text == "poison" {
            panic!("poison message");
        }
        let crash = {
            let mut left = self.crashes_left.lock().unwrap();
            match left.get_mut(&msg.text) {
                Some(n) if *n > 0 => {
                    *n -= 1;
                    true
                }
                _ => false,
            }
        };
        if crash {
            panic!("transient crash on {}", msg.text);
        }
        if let Some(prompt) = msg.text.strip_prefix("ai ") {
            return Reply::Ai {
                prompt: prompt.to_owned(),
                fallback: "fallback".to_owned(),
            };
        }
        Reply::Text(format!("re: {}", msg.text))
    }
}

/// Answers after `delay`.
struct SlowModel(Duration);

#[async_trait]
impl AiBackend for SlowModel {
    async fn complete(&self, prompt: &str) -> Result<String, AiError> {
        tokio::time::sleep(self.0).await;
        Ok(format!("model: {prompt}"))
    }
}

struct Harness {
    net: Arc<FakeNet>,
    fleet: Fleet,
    responder: Arc<Scripted>,
    store: Arc<MemoryStore>,
}

async fn harness(numbers: &[&PhoneNumber], model_delay: Duration) -> Harness {
    let store = Arc::new(MemoryStore::default());
    start(Arc::default(), store, numbers, model_delay).await
}

/// A fleet on `net` and `store` (which may hold what an earlier node left).
async fn start(
    net: Arc<FakeNet>,
    store: Arc<MemoryStore>,
    numbers: &[&PhoneNumber],
    model_delay: Duration,
) -> Harness {
    start_on(net, store.clone(), store, numbers, model_delay).await
}

/// Like [`start`], with the actors writing through `port` (a wrapper of `store`).
async fn start_on(
    net: Arc<FakeNet>,
    port: Arc<dyn Store>,
    store: Arc<MemoryStore>,
    numbers: &[&PhoneNumber],
    model_delay: Duration,
) -> Harness {
    let settings = Settings {
        ai_timeout: Duration::from_secs(2),
        ..test_settings()
    };
    let model = SlowModel(model_delay);
    start_full(net, port, store.clone(), store, numbers, model, settings).await
}

/// Settings for tests: no typing, and no send limit of our own.
fn test_settings() -> Settings {
    Settings {
        typing_per_char: Duration::ZERO,
        send_rate: SendRate {
            burst: 1000,
            per_second: 1000.0,
        },
        ..Settings::default()
    }
}

/// Like [`start_on`], with ownership's tokens from `tokens` too.
async fn start_with(
    net: Arc<FakeNet>,
    port: Arc<dyn Store>,
    tokens: Arc<dyn TokenSource>,
    store: Arc<MemoryStore>,
    numbers: &[&PhoneNumber],
) -> Harness {
    let model = SlowModel(Duration::ZERO);
    start_full(net, port, tokens, store, numbers, model, test_settings()).await
}

async fn start_full(
    net: Arc<FakeNet>,
    port: Arc<dyn Store>,
    tokens: Arc<dyn TokenSource>,
    store: Arc<MemoryStore>,
    numbers: &[&PhoneNumber],
    model: SlowModel,
    settings: Settings,
) -> Harness {
    let responder = Arc::new(Scripted::default());
    let deps = Deps {
        connector: Arc::new(FakeConnector(net.clone())),
        responder: responder.clone(),
        ai: Arc::new(model),
        store: port,
        coordinator: Arc::new(LocalCoordinator::new(tokens)),
        settings,
        counters: Arc::new(FleetCounters::default()),
    };
    let fleet = Fleet::start(deps).await.unwrap();
    for n in numbers {
        fleet.add((*n).clone()).unwrap();
    }
    let h = Harness {
        net,
        fleet,
        responder,
        store,
    };
    let want = numbers.len() as i64;
    eventually("all numbers online", || {
        h.fleet.counters().numbers(NumberPhase::Online) == want
    })
    .await;
    h
}

fn phone(s: &str) -> PhoneNumber {
    PhoneNumber::parse(s).unwrap()
}

fn dm(from: &PhoneNumber, id: &str, text: &str) -> InboundMessage {
    InboundMessage {
        id: MessageId::parse(id).unwrap(),
        chat: from.jid(),
        sender: from.jid(),
        sender_alt: None,
        is_from_me: false,
        text: text.to_owned(),
        media: None,
        timestamp_ms: 0,
        offline: false,
    }
}

/// Polls `cond` on paused time (the clock advances while everything waits) for up to ten
/// simulated minutes.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(600);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn replies_to(sent: &[OutboundText], inbound: &str) -> usize {
    sent.iter()
        .filter(|m| m.reply_to.as_ref().map(MessageId::as_str) == Some(inbound))
        .count()
}

async fn actor_id(h: &Harness, n: &PhoneNumber) -> ractor::ActorId {
    h.fleet
        .number(n.clone())
        .await
        .unwrap()
        .unwrap()
        .actor()
        .get_id()
}

async fn chats(h: &Harness, n: &PhoneNumber) -> Vec<ChatStatus> {
    let number = h.fleet.number(n.clone()).await.unwrap().unwrap();
    let conv = number
        .call(NumberMsg::Conversations, Duration::from_secs(1))
        .await
        .unwrap()
        .unwrap();
    conv.call(ConversationsMsg::Status, Duration::from_secs(1))
        .await
        .unwrap()
}

// ---- tests -------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_crashing_message_is_processed_after_the_restart_and_siblings_carry_on() {
    let n = phone("+15550001");
    let h = harness(&[&n], Duration::ZERO).await;
    h.responder
        .crashes_left
        .lock()
        .unwrap()
        .insert("boom".into(), 2);
    let (alice, bob) = (phone("+4915100001"), phone("+4915100002"));
    let s = h.net.latest(&n);
    s.inject(dm(&alice, "A1", "boom"));
    s.inject(dm(&alice, "A2", "after boom"));
    s.inject(dm(&bob, "B1", "hello"));

    eventually("every message answered", || {
        let sent = h.net.sent(&n);
        ["A1", "A2", "B1"]
            .iter()
            .all(|id| replies_to(&sent, id) == 1)
    })
    .await;
    let sent = h.net.sent(&n);
    assert_eq!(
        sent.len(),
        3,
        "each message answered exactly once: {sent:?}"
    );
    // Order within the crashing chat is kept: A1's reply precedes A2's.
    let pos = |id: &str| {
        sent.iter()
            .position(|m| m.reply_to.as_ref().map(MessageId::as_str) == Some(id))
    };
    assert!(pos("A1") < pos("A2"));
    assert_eq!(h.fleet.counters().restarts.load(Ordering::Relaxed), 2);
    assert_eq!(h.net.starts(&n), 1, "the number itself was never restarted");
    let status = chats(&h, &n).await;
    let alice_chat = status.iter().find(|c| c.chat == alice.jid()).unwrap();
    assert_eq!((alice_chat.restarts, alice_chat.pending), (2, 0));
    assert_eq!(
        status
            .iter()
            .find(|c| c.chat == bob.jid())
            .unwrap()
            .restarts,
        0
    );
    eventually("all acknowledged", || {
        h.net.latest(&n).acked.lock().unwrap().len() == 3
    })
    .await;
    assert!(h.store.dead_letters().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_poison_message_spends_the_budget_is_dead_lettered_and_its_chat_goes_on() {
    let n = phone("+15550002");
    let h = harness(&[&n], Duration::ZERO).await;
    let (alice, bob) = (phone("+4915100003"), phone("+4915100004"));
    let s = h.net.latest(&n);
    s.inject(dm(&alice, "P1", "poison"));
    s.inject(dm(&alice, "P2", "queued behind poison"));

    eventually("the poison dead-lettered", || {
        h.store.dead_letters().len() == 1
    })
    .await;
    let letters = h.store.dead_letters();
    assert_eq!(letters[0].1.id.as_str(), "P1");
    assert!(
        matches!(&letters[0].2, DeadLetterReason::RestartBudgetSpent { last_error } if last_error.contains("poison message"))
    );
    // 1 first try + 5 restarts (the conversation default budget).
    let attempts = h
        .responder
        .attempts
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, _)| t == "poison")
        .count();
    assert_eq!(attempts, 6);
    // The chat goes on with the next message, and with new ones.
    eventually("the next one answered", || {
        replies_to(&h.net.sent(&n), "P2") == 1
    })
    .await;
    s.inject(dm(&alice, "P3", "hello again"));
    eventually("a new one answered", || {
        replies_to(&h.net.sent(&n), "P3") == 1
    })
    .await;
    assert_eq!(h.store.dead_letters().len(), 1, "only the poison");

    // Siblings and the number are untouched.
    s.inject(dm(&bob, "B1", "hi"));
    eventually("sibling answered", || {
        replies_to(&h.net.sent(&n), "B1") == 1
    })
    .await;
    assert_eq!(h.fleet.counters().numbers(NumberPhase::Online), 1);
    assert_eq!(h.net.starts(&n), 1);
    // Every message is accounted for: acknowledged, never redelivered.
    eventually("acked", || {
        h.net.latest(&n).acked.lock().unwrap().len() == 4
    })
    .await;
}

/// A store with faults: down while `down` is set (every call fails as an outage, and its health
/// says so, as the SQL store's does), and the answer to the first completion of each message in
/// `lose` lost after the write committed (the connection dropped at commit).
struct FaultyStore {
    inner: Arc<MemoryStore>,
    down: AtomicBool,
    health: Health,
    calls_while_down: std::sync::atomic::AtomicU64,
    lose: Mutex<Vec<MessageId>>,
}

impl FaultyStore {
    fn new(inner: Arc<MemoryStore>) -> Arc<Self> {
        Self::losing(inner, &[])
    }

    fn losing(inner: Arc<MemoryStore>, lose: &[&str]) -> Arc<Self> {
        Arc::new(Self {
            inner,
            down: AtomicBool::new(false),
            health: Health::new(),
            calls_while_down: std::sync::atomic::AtomicU64::new(0),
            lose: Mutex::new(
                lose.iter()
                    .map(|id| MessageId::parse(id).unwrap())
                    .collect(),
            ),
        })
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        self.health.set(!down);
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            self.calls_while_down.fetch_add(1, Ordering::Relaxed);
            return Err(StoreError::outage(
                OutageKind::Unreachable,
                "connection refused",
            ));
        }
        Ok(())
    }

    fn gate<T: Send + 'static>(&self, written: impl FnOnce() -> Pending<T>) -> Pending<T> {
        match self.check() {
            Ok(()) => written(),
            Err(e) => Box::pin(std::future::ready(Err(e))),
        }
    }

    /// `written`, with its answer lost if `id` is still to be lost.
    fn maybe_lost<T: Send + 'static>(&self, id: &MessageId, written: Pending<T>) -> Pending<T> {
        let lost = {
            let mut lose = self.lose.lock().unwrap();
            let before = lose.len();
            lose.retain(|l| l != id);
            lose.len() < before
        };
        if !lost {
            return written;
        }
        Box::pin(async move {
            written.await?;
            Err(StoreError::outage(
                OutageKind::Unreachable,
                "connection lost at commit",
            ))
        })
    }
}

#[async_trait]
impl Store for FaultyStore {
    fn health(&self) -> Health {
        self.health.clone()
    }
    fn record_inbound(&self, fence: &Fence, msg: &InboundMessage) -> Pending<Recorded> {
        self.gate(|| self.inner.record_inbound(fence, msg))
    }
    fn complete(&self, fence: &Fence, done: Completion) -> Pending<Vec<MessageId>> {
        let id = done.inbound.clone();
        self.gate(|| self.maybe_lost(&id, self.inner.complete(fence, done)))
    }
    fn record_completed(
        &self,
        fence: &Fence,
        msg: &InboundMessage,
        done: Completion,
    ) -> Pending<Option<Vec<MessageId>>> {
        self.gate(|| self.maybe_lost(&msg.id, self.inner.record_completed(fence, msg, done)))
    }
    fn mark_sent(&self, fence: &Fence, id: &MessageId) -> Pending<bool> {
        self.gate(|| self.inner.mark_sent(fence, id))
    }
    async fn queue_send(&self, fence: &Fence, msg: &OutboundText) -> Result<Queued, StoreError> {
        self.check()?;
        self.inner.queue_send(fence, msg).await
    }
    async fn dead_letter(
        &self,
        fence: &Fence,
        msg: &InboundMessage,
        reason: &DeadLetterReason,
    ) -> Result<(), StoreError> {
        self.check()?;
        self.inner.dead_letter(fence, msg, reason).await
    }
    async fn send_failed(
        &self,
        fence: &Fence,
        id: &MessageId,
        error: &str,
        give_up: bool,
    ) -> Result<(), StoreError> {
        self.check()?;
        self.inner.send_failed(fence, id, error, give_up).await
    }
    async fn unprocessed(&self, number: &PhoneNumber) -> Result<Vec<InboundMessage>, StoreError> {
        self.check()?;
        self.inner.unprocessed(number).await
    }
    async fn unsent(&self, number: &PhoneNumber) -> Result<Vec<Unsent>, StoreError> {
        self.check()?;
        self.inner.unsent(number).await
    }
    async fn expire(&self, fence: &Fence, id: &MessageId, reason: &str) -> Result<(), StoreError> {
        self.check()?;
        self.inner.expire(fence, id, reason).await
    }
    async fn checkpoint(
        &self,
        number: &PhoneNumber,
        chat: &Jid,
    ) -> Result<Option<ChatContext>, StoreError> {
        self.check()?;
        self.inner.checkpoint(number, chat).await
    }
    async fn load_session(&self, number: &PhoneNumber) -> Result<Option<Credentials>, StoreError> {
        self.check()?;
        self.inner.load_session(number).await
    }
    async fn save_session(&self, fence: &Fence, creds: &Credentials) -> Result<(), StoreError> {
        self.check()?;
        self.inner.save_session(fence, creds).await
    }
    async fn clear_session(&self, fence: &Fence) -> Result<(), StoreError> {
        self.check()?;
        self.inner.clear_session(fence).await
    }
}

#[async_trait]
impl TokenSource for FaultyStore {
    async fn next_token(
        &self,
        number: &PhoneNumber,
    ) -> Result<switchboard_actors::store::FencingToken, StoreError> {
        self.check()?;
        self.inner.next_token(number).await
    }
}

#[tokio::test(start_paused = true)]
async fn a_store_outage_is_waited_out_without_restarts_or_dead_letters() {
    let (n, m) = (phone("+15550027"), phone("+15550028"));
    let store = Arc::new(MemoryStore::default());
    let outage = FaultyStore::new(store.clone());
    let net: Arc<FakeNet> = Arc::default();
    let h = start_with(net, outage.clone(), outage.clone(), store.clone(), &[&n]).await;
    let s = h.net.latest(&n);
    s.inject(dm(&phone("+4915100070"), "O0", "before"));
    eventually("answered before", || replies_to(&h.net.sent(&n), "O0") == 1).await;

    // The store goes down for ten minutes, with traffic on several chats meanwhile, and a
    // number that starts during it.
    outage.set_down(true);
    for i in 0..20 {
        let contact = phone(&format!("+49151001{i:02}"));
        s.inject(dm(&contact, &format!("O{}", i + 1), "during"));
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
    h.fleet.add(m.clone()).unwrap();
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(outage.calls_while_down.load(Ordering::Relaxed) > 0);
    assert_eq!(
        s.acked.lock().unwrap().len(),
        1,
        "nothing acknowledged while the store is down"
    );
    assert_eq!(replies_to(&h.net.sent(&n), "O1"), 0);

    let back = Instant::now();
    outage.set_down(false);
    eventually("every message answered", || {
        let sent = h.net.sent(&n);
        (1..=20).all(|i| replies_to(&sent, &format!("O{i}")) == 1)
    })
    .await;
    assert!(
        back.elapsed() < Duration::from_secs(10),
        "resumed within seconds: {:?}",
        back.elapsed()
    );
    eventually("the late number online", || {
        h.fleet.counters().numbers(NumberPhase::Online) == 2
    })
    .await;
    eventually("all acked", || s.acked.lock().unwrap().len() == 21).await;
    assert!(store.dead_letters().is_empty(), "no dead letter");
    assert_eq!(
        h.fleet.counters().restarts.load(Ordering::Relaxed),
        0,
        "no restart budget spent"
    );
    assert!(h.fleet.status().await.unwrap().parked.is_empty());
}

#[tokio::test(start_paused = true)]
async fn restart_delays_follow_the_policy() {
    let n = phone("+15550003");
    let h = harness(&[&n], Duration::ZERO).await;
    h.net
        .latest(&n)
        .inject(dm(&phone("+4915100005"), "P1", "poison"));
    eventually("parked", || h.store.dead_letters().len() == 1).await;
    let times: Vec<Instant> = h
        .responder
        .attempts
        .lock()
        .unwrap()
        .iter()
        .map(|(_, t)| *t)
        .collect();
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    let policy = Settings::default().conversation_policy;
    assert_eq!(gaps.len(), 5);
    for (i, gap) in gaps.iter().enumerate() {
        let nominal = policy.backoff.nominal(i as u32 + 1);
        let (lo, hi) = (
            nominal.mul_f64(0.8),
            nominal.mul_f64(1.2) + Duration::from_millis(5),
        );
        assert!(
            *gap >= lo && *gap <= hi,
            "restart {} after {gap:?}, policy says {nominal:?} ±20 %",
            i + 1
        );
    }
    assert_eq!(gaps[0], Duration::ZERO, "the first restart is immediate");
}

#[tokio::test(start_paused = true)]
async fn a_number_crash_restarts_only_that_numbers_subtree() {
    let (a, b) = (phone("+15550004"), phone("+15550005"));
    let h = harness(&[&a, &b], Duration::ZERO).await;
    let contact = phone("+4915100006");
    h.net.latest(&b).inject(dm(&contact, "B1", "hi"));
    eventually("b answered", || replies_to(&h.net.sent(&b), "B1") == 1).await;
    let a_before = actor_id(&h, &a).await;
    let b_before = actor_id(&h, &b).await;

    let a_addr = h.fleet.number(a.clone()).await.unwrap().unwrap();
    a_addr.cast(NumberMsg::Crash("injected".into())).unwrap();
    eventually("a restarted", || h.net.starts(&a) == 2).await;
    eventually("a online", || {
        h.fleet.counters().numbers(NumberPhase::Online) == 2
    })
    .await;

    let a_after = actor_id(&h, &a).await;
    assert_ne!(a_before, a_after);
    assert!(
        h.net.sessions.lock().unwrap()[&a][0]
            .closed
            .load(Ordering::SeqCst),
        "the crashed number's session was closed by the fleet"
    );
    assert_eq!(actor_id(&h, &b).await, b_before);
    assert_eq!(h.net.starts(&b), 1);
    let b_chats = chats(&h, &b).await;
    assert_eq!(b_chats.len(), 1, "b's conversation survived a's crash");

    // The restarted number works.
    h.net.latest(&a).inject(dm(&contact, "A1", "hi"));
    eventually("a answered", || replies_to(&h.net.sent(&a), "A1") == 1).await;
}

/// Crashes `n` (now in its `starts`th start) eleven times in a row: one more than its budget.
async fn crash_until_parked(h: &Harness, n: &PhoneNumber, starts: usize) {
    for i in 1..=11 {
        eventually("running", || h.net.starts(n) == starts + i - 1).await;
        let addr = loop {
            if let Some(addr) = h.fleet.number(n.clone()).await.unwrap() {
                break addr;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        addr.cast(NumberMsg::Crash(format!("crash {i}"))).unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_number_that_spends_its_budget_is_parked_and_the_fleet_survives() {
    let (a, b) = (phone("+15550006"), phone("+15550007"));
    let h = harness(&[&a, &b], Duration::ZERO).await;
    crash_until_parked(&h, &a, 1).await;
    let mut status = h.fleet.status().await.unwrap();
    while status.parked.is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
        status = h.fleet.status().await.unwrap();
    }
    assert_eq!(status.parked, vec![(a.clone(), "crash 11".to_owned())]);
    assert_eq!(h.fleet.counters().numbers(NumberPhase::Failed), 1);
    assert_eq!(h.fleet.counters().numbers(NumberPhase::Online), 1);
    assert_eq!(h.net.starts(&a), 11, "no restart after parking");
    // The fleet and the sibling keep working.
    h.net
        .latest(&b)
        .inject(dm(&phone("+4915100007"), "B1", "hi"));
    eventually("b answered", || replies_to(&h.net.sent(&b), "B1") == 1).await;
}

#[tokio::test(start_paused = true)]
async fn ai_jobs_answer_and_time_out_to_the_fallback() {
    let n = phone("+15550008");
    let h = harness(&[&n], Duration::from_millis(500)).await;
    let s = h.net.latest(&n);
    s.inject(dm(&phone("+4915100008"), "Q1", "ai what is up"));
    eventually("model answered", || replies_to(&h.net.sent(&n), "Q1") == 1).await;
    assert_eq!(h.net.sent(&n)[0].text, "model: what is up");

    let slow = phone("+15550009");
    let h2 = harness(&[&slow], Duration::from_secs(10)).await;
    h2.net
        .latest(&slow)
        .inject(dm(&phone("+4915100009"), "Q2", "ai too slow"));
    eventually("fallback", || replies_to(&h2.net.sent(&slow), "Q2") == 1).await;
    assert_eq!(h2.net.sent(&slow)[0].text, "fallback");
}

#[tokio::test(start_paused = true)]
async fn phone_messages_and_groups_are_recorded_and_acknowledged_but_not_answered() {
    let n = phone("+15550010");
    let h = harness(&[&n], Duration::ZERO).await;
    let s = h.net.latest(&n);
    let contact = phone("+4915100010");
    // A person answers the contact from the account's phone.
    let from_phone = InboundMessage {
        sender: n.jid(),
        is_from_me: true,
        ..dm(&contact, "E1", "a human answer")
    };
    (s.sink)(WaEvent::FromPhone(from_phone));
    let mut group = dm(&phone("+4915100011"), "G1", "hello group");
    group.chat = Jid::group("120363-77").unwrap();
    s.inject(group);
    s.inject(dm(&phone("+4915100012"), "D1", "hi"));
    eventually("dm answered", || replies_to(&h.net.sent(&n), "D1") == 1).await;
    eventually("all acked", || s.acked.lock().unwrap().len() == 3).await;
    assert_eq!(h.net.sent(&n).len(), 1);
    // The phone's message is in the chat's record, not answered.
    let saved = h
        .store
        .checkpoint(&n, &contact.jid())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((saved.turns, saved.from_phone), (0, 1));
    assert!(h.store.unprocessed(&n).await.unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn idle_conversations_are_passivated_and_start_again_on_the_next_message() {
    let n = phone("+15550011");
    let h = harness(&[&n], Duration::ZERO).await;
    let s = h.net.latest(&n);
    let contact = phone("+4915100013");
    s.inject(dm(&contact, "I1", "hi"));
    eventually("answered", || replies_to(&h.net.sent(&n), "I1") == 1).await;
    assert_eq!(chats(&h, &n).await.len(), 1);
    tokio::time::sleep(Settings::default().conversation_idle + Duration::from_secs(1)).await;
    assert!(
        chats(&h, &n).await.is_empty(),
        "the idle conversation stopped and was forgotten"
    );
    s.inject(dm(&contact, "I2", "back again"));
    eventually("answered after passivation", || {
        replies_to(&h.net.sent(&n), "I2") == 1
    })
    .await;
    assert_eq!(
        h.fleet.counters().restarts.load(Ordering::Relaxed),
        0,
        "passivation is not a restart"
    );
}

/// An earlier node committed a reply per message and died; returns the replies.
async fn committed_replies(
    store: &MemoryStore,
    n: &PhoneNumber,
    ids: &[&str],
) -> Vec<OutboundText> {
    let fence = Fence {
        number: n.clone(),
        token: store.next_token(n).await.unwrap(),
    };
    let contact = phone("+4915100030");
    let mut replies = Vec::new();
    for id in ids {
        let m = dm(&contact, id, "hello");
        store.record_inbound(&fence, &m).await.unwrap();
        let reply = OutboundText {
            id: MessageId::derived(n, &m.chat, &m.sender, &m.id, 0),
            to: m.chat.clone(),
            text: "hi".into(),
            reply_to: Some(m.id.clone()),
            reply_to_sender: None,
        };
        let done = Completion {
            chat: m.chat.clone(),
            sender: m.sender.clone(),
            inbound: m.id.clone(),
            replies: vec![reply.clone()],
            checkpoint: ChatContext::default(),
        };
        store.complete(&fence, done).await.unwrap();
        replies.push(reply);
    }
    replies
}

#[tokio::test(start_paused = true)]
async fn a_restarted_node_sends_only_what_the_network_does_not_have() {
    let n = phone("+15550020");
    let store = Arc::new(MemoryStore::default());
    let replies = committed_replies(&store, &n, &["Q1", "Q2"]).await;
    // The network had received the first: at login its delivery receipt comes from the offline
    // queue, before the sync marker. There is no echo of our own sends.
    let net = Arc::new(FakeNet::default());
    net.offline_receipts
        .lock()
        .unwrap()
        .insert(n.clone(), vec![replies[0].id.clone()]);

    let h = start(net, store.clone(), &[&n], Duration::ZERO).await;
    eventually("the second reply sent", || h.net.sent(&n).len() == 1).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    let sent = h.net.sent(&n);
    assert_eq!(sent.len(), 1, "the first reply is not sent again: {sent:?}");
    assert_eq!(sent[0].id, replies[1].id);
    // Both are settled: the first by its receipt, the second by its server ack.
    eventually("outbox settled", || {
        futures_now(store.unsent(&n)).is_some_and(|u| u.is_empty())
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_late_ack_is_waited_for_and_never_answered_by_a_resend() {
    let n = phone("+15550024");
    let h = harness(&[&n], Duration::ZERO).await;
    *h.net.acks.lock().unwrap() = Acks::Withheld;
    let s = h.net.latest(&n);
    s.inject(dm(&phone("+4915100060"), "W1", "hello"));
    eventually("sent", || h.net.sent(&n).len() == 1).await;
    // The ack is late, not lost: no timer sends it again, however long it takes.
    tokio::time::sleep(Duration::from_secs(600)).await;
    let sent = h.net.sent(&n);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(
        h.store.unsent(&n).await.unwrap().len(),
        1,
        "not settled yet"
    );
    s.ack_now(&sent[0].id);
    eventually("settled by the late ack", || {
        futures_now(h.store.unsent(&n)).is_some_and(|u| u.is_empty())
    })
    .await;
    // A reconnect now changes nothing: the reply is settled.
    s.reconnect(&h.net, &n);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(h.net.sent(&n).len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_send_of_unknown_outcome_is_resent_once_after_the_next_login_unless_a_receipt_settles_it()
{
    let n = phone("+15550025");
    let h = harness(&[&n], Duration::ZERO).await;
    *h.net.acks.lock().unwrap() = Acks::Withheld;
    let s = h.net.latest(&n);
    let contact = phone("+4915100061");
    s.inject(dm(&contact, "U1", "one"));
    s.inject(dm(&phone("+4915100062"), "U2", "two"));
    eventually("both sent", || h.net.sent(&n).len() == 2).await;
    let sent = h.net.sent(&n);
    // The connection drops before either ack; at the next login a receipt names U1's reply.
    *h.net.acks.lock().unwrap() = Acks::Ok;
    h.net
        .offline_receipts
        .lock()
        .unwrap()
        .insert(n.clone(), vec![sent[0].id.clone()]);
    let t = Instant::now();
    s.reconnect(&h.net, &n);
    eventually("the unsettled one resent", || h.net.sent(&n).len() == 3).await;
    let waited = t.elapsed();
    let wait = Settings::default().unsettled_wait;
    assert!(waited >= wait, "resent after {waited:?}, before the wait");
    tokio::time::sleep(Duration::from_secs(60)).await;
    let sent = h.net.sent(&n);
    assert_eq!(sent.len(), 3, "{sent:?}");
    assert_eq!(sent[2].id, sent[1].id, "resent with the same id");
    eventually("outbox settled", || {
        futures_now(h.store.unsent(&n)).is_some_and(|u| u.is_empty())
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn error_acks_cool_down_on_rate_limits_and_give_up_other_refusals() {
    let n = phone("+15550026");
    let h = harness(&[&n], Duration::ZERO).await;
    *h.net.acks.lock().unwrap() = Acks::Error(AckError::RATE_OVERLIMIT);
    let s = h.net.latest(&n);
    s.inject(dm(&phone("+4915100063"), "R1", "hello"));
    eventually("refused twice", || h.net.sent(&n).len() >= 2).await;
    *h.net.acks.lock().unwrap() = Acks::Ok;
    eventually("settled", || {
        futures_now(h.store.unsent(&n)).is_some_and(|u| u.is_empty())
    })
    .await;
    let sent = h.net.sent(&n);
    assert!(
        sent.iter().all(|m| m.id == sent[0].id),
        "same id every time"
    );

    // Another refusal is retried a bounded number of times, then given up.
    *h.net.acks.lock().unwrap() = Acks::Error(479);
    s.inject(dm(&phone("+4915100064"), "R2", "hello"));
    eventually("given up", || {
        futures_now(h.store.unsent(&n)).is_some_and(|u| u.is_empty())
            && replies_to(&h.net.sent(&n), "R2") > 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(
        replies_to(&h.net.sent(&n), "R2"),
        5,
        "MAX_ACK_ERRORS attempts"
    );
}

/// The value of a store future that is ready at once (the memory store's are).
fn futures_now<T>(f: impl std::future::Future<Output = Result<T, StoreError>>) -> Option<T> {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(r) => r.ok(),
        std::task::Poll::Pending => None,
    }
}

#[tokio::test(start_paused = true)]
async fn a_fenced_number_stops_and_is_not_restarted() {
    let n = phone("+15550021");
    let h = harness(&[&n], Duration::ZERO).await;
    // Another owner takes the number: our next write is refused.
    h.store.next_token(&n).await.unwrap();
    h.net
        .latest(&n)
        .inject(dm(&phone("+4915100031"), "F1", "hello"));
    eventually("fenced", || {
        h.fleet.counters().numbers(NumberPhase::Fenced) == 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(h.net.starts(&n), 1, "never restarted nor reconnected");
    assert!(h.net.sent(&n).is_empty());
    assert!(
        h.net.latest(&n).acked.lock().unwrap().is_empty(),
        "not acknowledged: the owner gets it"
    );
    assert_eq!(h.fleet.counters().numbers(NumberPhase::Fenced), 1);
    assert_eq!(h.fleet.counters().restarts.load(Ordering::Relaxed), 0);
}

#[tokio::test(start_paused = true)]
async fn a_redelivery_of_a_processed_message_is_acknowledged_and_not_answered_again() {
    let n = phone("+15550022");
    let store = Arc::new(MemoryStore::default());
    let fence = Fence {
        number: n.clone(),
        token: store.next_token(&n).await.unwrap(),
    };
    // An earlier node processed Q1 and died before its ack reached the network.
    let contact = phone("+4915100040");
    let q1 = dm(&contact, "Q1", "hello");
    store.record_inbound(&fence, &q1).await.unwrap();
    let done = Completion {
        chat: q1.chat.clone(),
        sender: q1.sender.clone(),
        inbound: q1.id.clone(),
        replies: Vec::new(),
        checkpoint: ChatContext {
            turns: 1,
            ..ChatContext::default()
        },
    };
    store.complete(&fence, done).await.unwrap();

    let h = start(Arc::default(), store.clone(), &[&n], Duration::ZERO).await;
    // The chat is idle, so the redelivery goes the unlogged way; the store recognizes it.
    h.net.latest(&n).inject(q1.clone());
    eventually("Q1 acknowledged", || {
        h.net.latest(&n).acked.lock().unwrap().contains(&q1.id)
    })
    .await;
    assert!(h.net.sent(&n).is_empty(), "not answered again");
    let saved = store.checkpoint(&n, &q1.chat).await.unwrap();
    assert_eq!(saved.map(|c| c.turns), Some(1));

    // The chat's state did not count it twice.
    h.net.latest(&n).inject(dm(&contact, "Q2", "again"));
    eventually("Q2 answered", || h.net.sent(&n).len() == 1).await;
    let saved = store.checkpoint(&n, &q1.chat).await.unwrap();
    assert_eq!(saved.map(|c| c.turns), Some(2));
}

#[tokio::test(start_paused = true)]
async fn a_reply_whose_commit_answer_was_lost_is_still_sent_once() {
    let n = phone("+15550023");
    let store = Arc::new(MemoryStore::default());
    let contact = phone("+4915100050");
    // L1 arrives with nothing ahead (recorded with its completion), L2 behind it (recorded
    // first): both completions commit, but their answers are lost.
    let port = FaultyStore::losing(store.clone(), &["L1", "L2"]);
    let h = start_on(Arc::default(), port, store.clone(), &[&n], Duration::ZERO).await;
    h.net.latest(&n).inject(dm(&contact, "L1", "one"));
    h.net.latest(&n).inject(dm(&contact, "L2", "two"));
    eventually("both answered", || {
        let sent = h.net.sent(&n);
        replies_to(&sent, "L1") == 1 && replies_to(&sent, "L2") == 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(120)).await;
    let sent = h.net.sent(&n);
    assert_eq!(sent.len(), 2, "each reply once: {sent:?}");
    assert_eq!(h.net.starts(&n), 1, "without restarting the number");
    let acked = h.net.latest(&n).acked.lock().unwrap().clone();
    for id in ["L1", "L2"] {
        assert!(acked.contains(&MessageId::parse(id).unwrap()), "{acked:?}");
    }
}

/// A fleet of `numbers` on a fresh memory store, with `settings`.
async fn harness_with(numbers: &[&PhoneNumber], settings: Settings) -> Harness {
    let store = Arc::new(MemoryStore::default());
    let model = SlowModel(Duration::ZERO);
    start_full(
        Arc::default(),
        store.clone(),
        store.clone(),
        store,
        numbers,
        model,
        settings,
    )
    .await
}

#[tokio::test(start_paused = true)]
async fn a_backlog_past_its_age_or_cap_expires_counted_and_never_sent() {
    let n = phone("+15550029");
    let settings = Settings {
        // One send every ten seconds, a backlog of at most 5 replies of at most a minute.
        send_rate: SendRate {
            burst: 1,
            per_second: 0.1,
        },
        outbound_max_age: Duration::from_secs(60),
        outbound_max_queued: 5,
        ..test_settings()
    };
    let h = harness_with(&[&n], settings).await;
    let s = h.net.latest(&n);
    for i in 0..20 {
        s.inject(dm(
            &phone(&format!("+49151002{i:02}")),
            &format!("Q{i}"),
            "hi",
        ));
    }
    tokio::time::sleep(Duration::from_secs(300)).await;
    let sent = h.net.sent(&n);
    let expired = h.fleet.counters().expired.load(Ordering::Relaxed);
    assert_eq!(
        sent.len() as u64 + expired,
        20,
        "every reply sent or expired: {} sent",
        sent.len()
    );
    assert!(expired >= 14, "{expired} expired");
    assert!(
        sent.len() <= 6,
        "at most the cap and the one in hand: {}",
        sent.len()
    );
    assert!(
        h.store.unsent(&n).await.unwrap().is_empty(),
        "recorded in the outbox"
    );
    assert_eq!(
        h.fleet.counters().outbound_queued.load(Ordering::Relaxed),
        0
    );
}

#[tokio::test(start_paused = true)]
async fn intake_beyond_its_cap_is_left_to_whatsapp_and_delivered_again() {
    let n = phone("+15550030");
    let settings = Settings {
        intake_max_pending: 3,
        ..test_settings()
    };
    let store = Arc::new(MemoryStore::default());
    let outage = FaultyStore::new(store.clone());
    let model = SlowModel(Duration::ZERO);
    let h = start_full(
        Arc::default(),
        outage.clone(),
        outage.clone(),
        store.clone(),
        &[&n],
        model,
        settings,
    )
    .await;
    let s = h.net.latest(&n);
    // While the store is down nothing is processed: the intake fills up, then defers.
    outage.set_down(true);
    let msgs: Vec<InboundMessage> = (0..10)
        .map(|i| dm(&phone(&format!("+49151003{i:02}")), &format!("C{i}"), "hi"))
        .collect();
    for m in &msgs {
        s.inject(m.clone());
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let deferred = h.fleet.counters().deferred.load(Ordering::Relaxed);
    assert_eq!(deferred, 7, "beyond 3 pending, left unacknowledged");
    outage.set_down(false);
    eventually("the held ones answered", || h.net.sent(&n).len() == 3).await;
    // WhatsApp delivers what it was not acknowledged for again, at each login (here the test
    // plays WhatsApp); each time the intake takes what fits.
    for _ in 0..5 {
        let acked = s.acked.lock().unwrap().clone();
        let owed: Vec<_> = msgs
            .iter()
            .filter(|m| !acked.contains(&m.id))
            .cloned()
            .collect();
        h.net.offline.lock().unwrap().insert(n.clone(), owed);
        s.reconnect(&h.net, &n);
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    eventually("all answered", || h.net.sent(&n).len() == 10).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(h.net.sent(&n).len(), 10, "each once");
}

#[tokio::test(start_paused = true)]
async fn shutdown_stops_every_number_once_without_restarting_it() {
    let (a, b) = (phone("+15550021"), phone("+15550022"));
    let h = harness(&[&a, &b], Duration::ZERO).await;
    let counters = h.fleet.counters().clone();
    h.fleet.shutdown(Duration::from_secs(10)).await;
    assert_eq!(counters.restarts.load(Ordering::Relaxed), 0);
    for n in [&a, &b] {
        assert_eq!(h.net.starts(n), 1, "{n} was connected again while stopping");
        assert!(
            h.net.sessions.lock().unwrap()[n][0]
                .closed
                .load(Ordering::SeqCst),
            "{n}'s session was closed"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_number_handed_off_settles_its_sends_in_flight_before_it_stops() {
    let (a, b) = (phone("+15550031"), phone("+15550032"));
    let h = harness(&[&a, &b], Duration::ZERO).await;
    *h.net.acks.lock().unwrap() = Acks::Withheld;
    for (n, id) in [(&a, "H1"), (&b, "H2")] {
        h.net
            .latest(n)
            .inject(dm(&phone("+4915100070"), id, "hello"));
        eventually("sent", || h.net.sent(n).len() == 1).await;
    }
    assert!(h.fleet.remove(a.clone()).await.unwrap());
    assert!(h.fleet.remove(b.clone()).await.unwrap());
    // a's ack comes late but within the settle time: a stops once its sent mark commits, and
    // no later owner has anything to send again.
    tokio::time::sleep(HANDOFF_SETTLE / 4).await;
    let session_a = h.net.latest(&a);
    assert!(
        !session_a.closed.load(Ordering::SeqCst),
        "a waits for its ack"
    );
    session_a.ack_now(&h.net.sent(&a)[0].id);
    eventually("a stopped", || session_a.closed.load(Ordering::SeqCst)).await;
    assert!(
        h.store.unsent(&a).await.unwrap().is_empty(),
        "a's reply is settled"
    );
    // b's ack never comes: b stops at the settle deadline anyway, its reply left unsent.
    let session_b = h.net.latest(&b);
    tokio::time::sleep(HANDOFF_SETTLE).await;
    eventually("b stopped", || session_b.closed.load(Ordering::SeqCst)).await;
    assert_eq!(h.store.unsent(&b).await.unwrap().len(), 1);
    assert_eq!(
        h.net.sent(&a).len() + h.net.sent(&b).len(),
        2,
        "nothing more was sent"
    );
}

#[tokio::test(start_paused = true)]
async fn operator_commands_restart_a_number_even_parked_and_log_it_out() {
    let (a, b) = (phone("+15550033"), phone("+15550034"));
    let h = harness(&[&a, &b], Duration::ZERO).await;
    let commands = h.fleet.commands();
    eventually("both running", || {
        h.net.starts(&a) == 1 && h.net.starts(&b) == 1
    })
    .await;

    commands
        .run(a.clone(), NumberCommand::Restart)
        .await
        .unwrap();
    eventually("a restarted", || h.net.starts(&a) == 2).await;
    eventually("a online", || {
        h.fleet.counters().numbers(NumberPhase::Online) == 2
    })
    .await;
    assert_eq!(
        h.fleet.counters().restarts.load(Ordering::Relaxed),
        0,
        "not a crash"
    );

    // Parked after spending its budget: a restart brings it back.
    crash_until_parked(&h, &a, 2).await;
    eventually("a parked", || {
        h.fleet.counters().numbers(NumberPhase::Failed) == 1
    })
    .await;
    commands
        .run(a.clone(), NumberCommand::Restart)
        .await
        .unwrap();
    eventually("a back online", || {
        h.fleet.counters().numbers(NumberPhase::Online) == 2
    })
    .await;
    assert!(h.fleet.status().await.unwrap().parked.is_empty());

    // Logout: the session unlinks and the number waits to be paired again.
    commands
        .run(b.clone(), NumberCommand::Logout)
        .await
        .unwrap();
    eventually("b logged out", || {
        h.fleet.counters().numbers(NumberPhase::LoggedOut) == 1
    })
    .await;
    // A logged-out number can be started again (to pair anew).
    commands
        .run(b.clone(), NumberCommand::Restart)
        .await
        .unwrap();
    eventually("b started again", || h.net.starts(&b) == 2).await;

    let stranger = phone("+15550039");
    assert_eq!(
        commands.run(stranger.clone(), NumberCommand::Restart).await,
        Err(CommandError::NotHere(stranger))
    );
}

#[tokio::test]
async fn a_business_send_is_queued_once_per_key_and_sent_once() {
    let n = phone("+15550041");
    let h = harness(&[&n], Duration::ZERO).await;
    let commands = h.fleet.commands();
    eventually("online", || {
        h.fleet.counters().numbers(NumberPhase::Online) == 1
    })
    .await;
    let to = "15557770001@s.whatsapp.net";
    let send = |text: &str, key: &str| {
        NumberCommand::Send(BusinessSend::new(to, text, key).expect("valid"))
    };
    let first = commands
        .run(n.clone(), send("your order shipped", "order-7"))
        .await;
    let Ok(Done::Queued { id, repeat: false }) = first else {
        panic!("{first:?}");
    };
    eventually("sent", || h.net.sent(&n).len() == 1).await;
    // The same key again (a caller retrying after a lost answer): the same id, nothing new.
    assert_eq!(
        commands
            .run(n.clone(), send("your order shipped", "order-7"))
            .await,
        Ok(Done::Queued {
            id: id.clone(),
            repeat: true
        })
    );
    // The same key for another message is refused; another key is another message.
    assert_eq!(
        commands
            .run(n.clone(), send("your order was cancelled", "order-7"))
            .await,
        Err(CommandError::KeyReused)
    );
    let other = commands
        .run(n.clone(), send("your order shipped", "order-8"))
        .await;
    assert!(
        matches!(other, Ok(Done::Queued { repeat: false, .. })),
        "{other:?}"
    );
    eventually("the second sent", || h.net.sent(&n).len() == 2).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sent = h.net.sent(&n);
    assert_eq!(sent.len(), 2, "each key sent once: {sent:?}");
    assert_eq!(sent[0].id, id);
    assert_eq!(sent[0].to.as_str(), to);
    assert_eq!(sent[0].text, "your order shipped");
    assert!(sent[0].reply_to.is_none());

    let stranger = phone("+15550049");
    assert_eq!(
        commands.run(stranger.clone(), send("hi", "k")).await,
        Err(CommandError::NotHere(stranger))
    );
}
