//! The simulated WhatsApp network: accounts, connections, pairing, rate limits, receipts,
//! redelivery, faults and scripted traffic, all on tokio time and deterministic from a seed.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use switchboard_actors::ids::{Jid, PhoneNumber};
use switchboard_actors::transport::{InboundMessage, MessageId, Receipt, ReceiptKind};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::ledger::{Ledger, LedgerEvent, Summary};
use super::wire::{ClientFrame, Refusal, ServerFrame};

/// An account's messages waiting for the client's acknowledgement, in order, found by key in
/// O(log n) (a busy account may have thousands).
#[derive(Debug, Default)]
struct Unacked {
    next: u64,
    order: std::collections::BTreeMap<u64, InboundMessage>,
    index: HashMap<(Jid, MessageId), u64>,
}

impl Unacked {
    fn push(&mut self, m: InboundMessage) {
        let key = (m.chat.clone(), m.id.clone());
        if self.index.contains_key(&key) {
            return;
        }
        self.order.insert(self.next, m);
        self.index.insert(key, self.next);
        self.next += 1;
    }

    fn ack(&mut self, chat: &Jid, id: &MessageId) {
        if let Some(seq) = self.index.remove(&(chat.clone(), id.clone())) {
            self.order.remove(&seq);
        }
    }

    fn all(&self) -> Vec<InboundMessage> {
        self.order.values().cloned().collect()
    }
}

/// Server timestamps start here (2026-01-01T00:00:00Z) and advance with tokio time.
const EPOCH_MS: u64 = 1_767_225_600_000;

/// How the simulated network behaves. [`SimConfig::default`] follows WhatsApp as whatsapp-rust
/// 0.7 presents it.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Seed of every random choice.
    pub seed: u64,
    /// Validity of the first QR code.
    pub qr_first: Duration,
    /// Validity of each later QR code.
    pub qr_next: Duration,
    /// QR codes after the first before "codes exhausted".
    pub qr_more: u32,
    /// Validity of a pair code.
    pub pair_code_valid: Duration,
    /// Sends an account may make back to back.
    pub send_burst: u32,
    /// Sustained sends per second per account.
    pub send_per_second: f64,
    /// Rate-overlimit refusals within a minute that earn a temporary ban.
    pub ban_after_overlimits: usize,
    /// Length of that ban.
    pub ban_duration: Duration,
    /// Delay range of delivery receipts after the server ack.
    pub delivery_delay: (Duration, Duration),
    /// Delay range of read receipts after delivery.
    pub read_delay: (Duration, Duration),
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            qr_first: Duration::from_secs(60),
            qr_next: Duration::from_secs(20),
            qr_more: 5,
            pair_code_valid: Duration::from_secs(180),
            send_burst: 3,
            send_per_second: 1.0,
            ban_after_overlimits: 20,
            ban_duration: Duration::from_secs(600),
            delivery_delay: (Duration::from_millis(50), Duration::from_millis(400)),
            read_delay: (Duration::from_millis(500), Duration::from_secs(5)),
        }
    }
}

/// Why a control request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    /// No such account.
    #[error("no account {0}")]
    UnknownAccount(PhoneNumber),
    /// Pairing needs a connection showing a QR or pair code.
    #[error("account {0} has no pairing in progress")]
    NotPairing(PhoneNumber),
    /// The message id was used before in that chat.
    #[error("message id {0} was already used in this chat")]
    DuplicateId(String),
    /// A field is out of range.
    #[error("{field}: {problem}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        problem: String,
    },
}

/// A fault to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// Drop the connection; for `duration_s`, connect attempts fail silently.
    Drop,
    /// The phone unlinks the device.
    Logout,
    /// Temporary ban for `duration_s` (60 s if 0).
    Ban,
    /// Delay every frame to the client by `ms` for `duration_s` (60 s if 0).
    Latency,
    /// The account connects from elsewhere: the live connection is stream-replaced.
    Replace,
}

/// Scripted inbound load.
#[derive(Debug, Clone)]
pub struct TrafficSpec {
    /// Target accounts; `None` for all accounts.
    pub numbers: Option<Vec<PhoneNumber>>,
    /// Distinct contacts writing to each account.
    pub contacts_per_number: u32,
    /// Messages per second over all accounts.
    pub rate_per_s: f64,
    /// How long it runs.
    pub duration: Duration,
    /// Seed of the texts and the choice of sender.
    pub seed: u64,
}

/// A frame with the time the client may see it (the `latency` fault delays it).
#[derive(Debug)]
pub struct Timed {
    at: Instant,
    frame: ServerFrame,
}

/// The network's side of one connection, as seen by its client: frames arrive here.
pub struct LinkReceiver {
    conn: u64,
    rx: mpsc::UnboundedReceiver<Timed>,
    network: Network,
}

impl LinkReceiver {
    /// The next frame, or `None` once the network closed the connection.
    pub async fn recv(&mut self) -> Option<ServerFrame> {
        let timed = self.rx.recv().await?;
        // Only a latency fault delays frames: the usual frame is due already and needs no timer.
        if timed.at > Instant::now() {
            tokio::time::sleep_until(timed.at).await;
        }
        Some(timed.frame)
    }
}

impl Drop for LinkReceiver {
    fn drop(&mut self) {
        self.network.close(self.conn, "client_closed");
    }
}

/// Sends the client's frames on one connection.
#[derive(Clone)]
pub struct LinkSender {
    conn: u64,
    network: Network,
}

impl LinkSender {
    /// Delivers a client frame to the network.
    pub fn send(&self, frame: ClientFrame) {
        self.network.client_frame(self.conn, frame);
    }
}

/// The simulated network; cheap to clone.
#[derive(Clone)]
pub struct Network {
    inner: Arc<Inner>,
}

struct Inner {
    config: SimConfig,
    started: Instant,
    state: Mutex<State>,
    /// Stops every traffic run (the demo's end).
    traffic_stop: CancellationToken,
    /// Traffic runs started so far.
    runs: std::sync::atomic::AtomicU64,
    /// Receipts to deliver later, to the task that delivers them (started with the first).
    receipts: OnceLock<mpsc::UnboundedSender<DueReceipt>>,
}

/// A receipt waiting for its time.
struct DueReceipt {
    at: Instant,
    number: PhoneNumber,
    receipt: Receipt,
}

/// Delivers receipts when they are due, in time order (queue order among equal times). It ends
/// with the network: receipts still due then are dropped with it, so a network torn down costs
/// nothing afterwards.
async fn deliver_receipts(network: Weak<Inner>, mut rx: mpsc::UnboundedReceiver<DueReceipt>) {
    let mut due: BinaryHeap<Reverse<(Instant, u64)>> = BinaryHeap::new();
    let mut waiting: HashMap<u64, DueReceipt> = HashMap::new();
    let mut seq = 0_u64;
    loop {
        let next = due.peek().map(|Reverse((at, _))| *at);
        tokio::select! {
            queued = rx.recv() => {
                let Some(receipt) = queued else { return };
                seq += 1;
                due.push(Reverse((receipt.at, seq)));
                waiting.insert(seq, receipt);
            }
            () = sleep_until(next) => {
                let Some(inner) = network.upgrade() else { return };
                let network = Network { inner };
                let now = Instant::now();
                while let Some(Reverse((at, key))) = due.peek().copied() {
                    if at > now {
                        break;
                    }
                    due.pop();
                    if let Some(d) = waiting.remove(&key) {
                        network.push_receipt(&d.number, d.receipt);
                    }
                }
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

struct State {
    accounts: HashMap<PhoneNumber, Account>,
    conns: HashMap<u64, Conn>,
    next_conn: u64,
    next_id: u64,
    rng: SmallRng,
    ledger: Ledger,
}

struct Conn {
    number: PhoneNumber,
    label: String,
    tx: mpsc::UnboundedSender<Timed>,
    authenticated: bool,
}

struct Pairing {
    conn: u64,
    pair_code: Option<String>,
}

struct Account {
    paired: bool,
    credentials: Option<String>,
    live: Option<u64>,
    pairing: Option<Pairing>,
    /// Offered (or echoed) and not acknowledged, in order: redelivered on every connect.
    unacked: Unacked,
    tokens: f64,
    refilled: Instant,
    overlimits: VecDeque<Instant>,
    banned_until: Option<Instant>,
    fail_connects_until: Option<Instant>,
    latency: Option<(Duration, Instant)>,
}

impl Account {
    fn new(now: Instant, burst: u32) -> Self {
        Self {
            paired: false,
            credentials: None,
            live: None,
            pairing: None,
            unacked: Unacked::default(),
            tokens: f64::from(burst),
            refilled: now,
            overlimits: VecDeque::new(),
            banned_until: None,
            fail_connects_until: None,
            latency: None,
        }
    }
}

impl Network {
    /// A network with no accounts.
    pub fn new(config: SimConfig) -> Self {
        let rng = SmallRng::seed_from_u64(config.seed);
        Self {
            inner: Arc::new(Inner {
                config,
                started: Instant::now(),
                traffic_stop: CancellationToken::new(),
                runs: std::sync::atomic::AtomicU64::new(0),
                receipts: OnceLock::new(),
                state: Mutex::new(State {
                    accounts: HashMap::new(),
                    conns: HashMap::new(),
                    next_conn: 1,
                    next_id: 1,
                    rng,
                    ledger: Ledger::default(),
                }),
            }),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &SimConfig {
        &self.inner.config
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Milliseconds since the network started: the ledger's clock.
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.inner.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    // ---- control ------------------------------------------------------------------------

    /// Creates an unpaired account; true if it is new.
    pub fn create_account(&self, number: &PhoneNumber) -> bool {
        let mut st = self.lock();
        self.ensure_account(&mut st, number)
    }

    /// Creates an account that is already paired and returns the device identity a client
    /// reconnects with (a fleet restored from its session store).
    pub fn create_paired_account(&self, number: &PhoneNumber) -> String {
        let mut st = self.lock();
        self.ensure_account(&mut st, number);
        let creds = new_credentials(&mut st.rng);
        if let Some(acct) = st.accounts.get_mut(number) {
            acct.paired = true;
            acct.credentials = Some(creds.clone());
        }
        creds
    }

    /// The phone scans the current QR code or confirms the pair code.
    pub fn pair(&self, number: &PhoneNumber) -> Result<(), SimError> {
        let mut st = self.lock();
        let conn = {
            let acct = st
                .accounts
                .get_mut(number)
                .ok_or_else(|| SimError::UnknownAccount(number.clone()))?;
            let pairing = acct
                .pairing
                .take()
                .ok_or_else(|| SimError::NotPairing(number.clone()))?;
            pairing.conn
        };
        let creds = new_credentials(&mut st.rng);
        if let Some(acct) = st.accounts.get_mut(number) {
            acct.paired = true;
            acct.credentials = Some(creds.clone());
        }
        self.send(
            &mut st,
            conn,
            ServerFrame::PairSuccess { credentials: creds },
        );
        self.authenticate(&mut st, conn);
        Ok(())
    }

    /// Accounts whose connection is showing a QR or pair code right now.
    pub fn awaiting_pairing(&self) -> Vec<PhoneNumber> {
        let st = self.lock();
        st.accounts
            .iter()
            .filter(|(_, a)| a.pairing.is_some())
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// A contact sends a message to `number`: in a DM, or in `group` if given. Returns its id.
    pub fn inbound(
        &self,
        number: &PhoneNumber,
        from: &PhoneNumber,
        text: &str,
        group: Option<&str>,
        id: Option<&str>,
    ) -> Result<MessageId, SimError> {
        let mut st = self.lock();
        if !st.accounts.contains_key(number) {
            return Err(SimError::UnknownAccount(number.clone()));
        }
        let chat = match group {
            Some(g) => Jid::group(g).map_err(|e| SimError::Invalid {
                field: "group",
                problem: e.to_string(),
            })?,
            None => from.jid(),
        };
        let lid = lid_of(from);
        let (sender, sender_alt) = if chat.is_group() {
            (lid, Some(from.jid()))
        } else {
            (from.jid(), Some(lid))
        };
        let id = match id {
            Some(raw) => MessageId::parse(raw).ok_or_else(|| SimError::Invalid {
                field: "id",
                problem: "1 to 128 printable characters without spaces".to_owned(),
            })?,
            None => {
                let n = st.next_id;
                st.next_id += 1;
                let salt: u32 = st.rng.random();
                MessageId::parse(&format!("3A{salt:08X}{n:010X}"))
                    .ok_or_else(|| SimError::DuplicateId(n.to_string()))?
            }
        };
        let at_ms = self.now_ms();
        if !st
            .ledger
            .inbound_offered(at_ms, number, &chat, &sender, &id)
        {
            return Err(SimError::DuplicateId(id.to_string()));
        }
        let message = InboundMessage {
            id: id.clone(),
            chat,
            sender,
            sender_alt,
            is_from_me: false,
            text: text.to_owned(),
            timestamp_ms: EPOCH_MS + at_ms,
        };
        let live = st.accounts.get(number).and_then(|a| a.live);
        let online = live.is_some_and(|c| st.conns.get(&c).is_some_and(|c| c.authenticated));
        if let Some(acct) = st.accounts.get_mut(number) {
            acct.unacked.push(message.clone());
        }
        if let (true, Some(conn)) = (online, live) {
            self.send(&mut st, conn, ServerFrame::Message { message });
        }
        Ok(id)
    }

    /// Injects a fault into `number`.
    pub fn fault(
        &self,
        kind: FaultKind,
        number: &PhoneNumber,
        ms: u64,
        duration: Duration,
    ) -> Result<(), SimError> {
        let mut st = self.lock();
        let now = Instant::now();
        let live = {
            let acct = st
                .accounts
                .get_mut(number)
                .ok_or_else(|| SimError::UnknownAccount(number.clone()))?;
            let lasting = if duration.is_zero() {
                Duration::from_secs(60)
            } else {
                duration
            };
            match kind {
                FaultKind::Drop if !duration.is_zero() => {
                    acct.fail_connects_until = Some(now + duration)
                }
                FaultKind::Drop | FaultKind::Replace => {}
                FaultKind::Logout => {
                    acct.paired = false;
                    acct.credentials = None;
                }
                FaultKind::Ban => acct.banned_until = Some(now + lasting),
                FaultKind::Latency => {
                    acct.latency = Some((Duration::from_millis(ms), now + lasting))
                }
            }
            acct.live
        };
        let Some(conn) = live else {
            return Ok(());
        };
        match kind {
            FaultKind::Drop => {
                let frame = ServerFrame::Closed {
                    reason: "connection dropped".to_owned(),
                };
                self.send(&mut st, conn, frame);
                self.close_locked(&mut st, conn, "dropped");
            }
            FaultKind::Logout => {
                self.send(&mut st, conn, ServerFrame::LoggedOut);
                self.close_locked(&mut st, conn, "logged_out");
            }
            FaultKind::Ban => self.ban_locked(&mut st, number, conn),
            FaultKind::Replace => {
                self.send(&mut st, conn, ServerFrame::StreamReplaced);
                self.close_locked(&mut st, conn, "stream_replaced");
            }
            FaultKind::Latency => {}
        }
        Ok(())
    }

    /// The referee's totals.
    pub fn summary(&self) -> Summary {
        self.lock().ledger.summary()
    }

    /// Every ledger event of `number`.
    pub fn ledger(&self, number: &PhoneNumber) -> Vec<LedgerEvent> {
        self.lock().ledger.events(number)
    }

    /// Starts scripted traffic and returns its run number at once. The run ends after its duration or at
    /// [`Network::stop_traffic`].
    pub fn start_traffic(&self, spec: TrafficSpec) -> Result<u64, SimError> {
        if !(spec.rate_per_s.is_finite() && spec.rate_per_s > 0.0) {
            return Err(SimError::Invalid {
                field: "rate_per_s",
                problem: "must be a positive number".to_owned(),
            });
        }
        if spec.contacts_per_number == 0 {
            return Err(SimError::Invalid {
                field: "contacts_per_number",
                problem: "must be at least 1".to_owned(),
            });
        }
        let numbers = match spec.numbers.clone() {
            Some(list) => {
                let st = self.lock();
                if let Some(missing) = list.iter().find(|n| !st.accounts.contains_key(*n)) {
                    return Err(SimError::UnknownAccount(missing.clone()));
                }
                list
            }
            None => {
                let mut all: Vec<_> = self.lock().accounts.keys().cloned().collect();
                all.sort();
                all
            }
        };
        let network = self.clone();
        tokio::spawn(async move { network.run_traffic(spec, numbers).await });
        Ok(self
            .inner
            .runs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1)
    }

    /// Ends every traffic run.
    pub fn stop_traffic(&self) {
        self.inner.traffic_stop.cancel();
    }

    async fn run_traffic(self, spec: TrafficSpec, numbers: Vec<PhoneNumber>) {
        const TICK: Duration = Duration::from_millis(10);
        if numbers.is_empty() {
            return;
        }
        let mut rng = SmallRng::seed_from_u64(spec.seed);
        let end = Instant::now() + spec.duration;
        let mut budget = 0.0;
        let mut tick = tokio::time::interval(TICK);
        let stop = self.inner.traffic_stop.clone();
        while Instant::now() < end {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            budget += spec.rate_per_s * TICK.as_secs_f64();
            while budget >= 1.0 {
                budget -= 1.0;
                let number = &numbers[rng.random_range(0..numbers.len())];
                let contact = contact_of(number, rng.random_range(0..spec.contacts_per_number));
                let text = PHRASES[rng.random_range(0..PHRASES.len())];
                let _ = self.inbound(number, &contact, text, None, None);
            }
        }
    }

    // ---- connections ---------------------------------------------------------------------

    /// Opens a connection for `number` from client `label`. A connect that fails silently (the
    /// `drop` fault) yields a receiver that is already closed and has seen no frame.
    pub fn connect(
        &self,
        number: &PhoneNumber,
        label: &str,
        credentials: Option<&str>,
    ) -> (LinkSender, LinkReceiver) {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut st = self.lock();
        let conn = st.next_conn;
        st.next_conn += 1;
        let link = (
            LinkSender {
                conn,
                network: self.clone(),
            },
            LinkReceiver {
                conn,
                rx,
                network: self.clone(),
            },
        );
        self.ensure_account(&mut st, number);
        let now = Instant::now();
        let at_ms = self.now_ms();
        let Some(acct) = st.accounts.get_mut(number) else {
            return link;
        };
        if acct.fail_connects_until.is_some_and(|t| t > now) {
            st.ledger.connect_failed();
            return link;
        }
        let old = acct.live.replace(conn);
        st.conns.insert(
            conn,
            Conn {
                number: number.clone(),
                label: label.to_owned(),
                tx,
                authenticated: false,
            },
        );
        st.ledger.connection_opened(at_ms, number, conn, label);
        if let Some(old) = old {
            self.send(&mut st, old, ServerFrame::StreamReplaced);
            self.close_locked(&mut st, old, "stream_replaced");
        }
        let Some(acct) = st.accounts.get_mut(number) else {
            return link;
        };
        if let Some(until) = acct.banned_until.filter(|t| *t > now) {
            let duration_ms = u64::try_from((until - now).as_millis()).unwrap_or(u64::MAX);
            self.send(&mut st, conn, ServerFrame::TemporaryBan { duration_ms });
            self.close_locked(&mut st, conn, "temporary_ban");
            return link;
        }
        match credentials {
            Some(c) if acct.paired && acct.credentials.as_deref() == Some(c) => {
                self.authenticate(&mut st, conn)
            }
            Some(_) => {
                self.send(&mut st, conn, ServerFrame::LoggedOut);
                self.close_locked(&mut st, conn, "logged_out");
            }
            None => {
                acct.pairing = Some(Pairing {
                    conn,
                    pair_code: None,
                });
                let network = self.clone();
                let number = number.clone();
                tokio::spawn(async move { network.rotate_qr(number, conn).await });
            }
        }
        link
    }

    fn client_frame(&self, conn: u64, frame: ClientFrame) {
        let mut st = self.lock();
        let Some((number, authenticated)) = st
            .conns
            .get(&conn)
            .map(|c| (c.number.clone(), c.authenticated))
        else {
            return;
        };
        match frame {
            ClientFrame::Hello { .. } | ClientFrame::Typing { .. } | ClientFrame::Read { .. } => {}
            ClientFrame::Send {
                id,
                to,
                text,
                reply_to,
            } => {
                if authenticated {
                    self.accept_send(&mut st, &number, conn, id, to, text, reply_to);
                } else {
                    self.send(
                        &mut st,
                        conn,
                        ServerFrame::SendError {
                            id,
                            error: Refusal::NotAuthenticated,
                        },
                    );
                }
            }
            ClientFrame::Ack { chat, id, .. } => {
                let at_ms = self.now_ms();
                st.ledger.inbound_acked(at_ms, &number, &chat, &id);
                if let Some(acct) = st.accounts.get_mut(&number) {
                    acct.unacked.ack(&chat, &id);
                }
            }
            ClientFrame::PairCode => self.start_pair_code(&mut st, &number, conn),
            ClientFrame::Logout => {
                if let Some(acct) = st.accounts.get_mut(&number) {
                    acct.paired = false;
                    acct.credentials = None;
                }
                self.send(&mut st, conn, ServerFrame::LoggedOut);
                self.close_locked(&mut st, conn, "logged_out");
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn accept_send(
        &self,
        st: &mut State,
        number: &PhoneNumber,
        conn: u64,
        id: MessageId,
        to: Jid,
        text: String,
        reply_to: Option<MessageId>,
    ) {
        let now = Instant::now();
        let at_ms = self.now_ms();
        let cfg = &self.inner.config;
        let Some(acct) = st.accounts.get_mut(number) else {
            return;
        };
        let elapsed = now.saturating_duration_since(acct.refilled).as_secs_f64();
        acct.tokens = (acct.tokens + elapsed * cfg.send_per_second).min(f64::from(cfg.send_burst));
        acct.refilled = now;
        if acct.tokens < 1.0 {
            acct.overlimits.push_back(now);
            while acct
                .overlimits
                .front()
                .is_some_and(|t| now - *t > Duration::from_secs(60))
            {
                acct.overlimits.pop_front();
            }
            let ban = acct.overlimits.len() >= cfg.ban_after_overlimits;
            if ban {
                acct.banned_until = Some(now + cfg.ban_duration);
            }
            st.ledger.rate_overlimit(at_ms, number, &id);
            self.send(
                st,
                conn,
                ServerFrame::SendError {
                    id,
                    error: Refusal::RateOverlimit,
                },
            );
            if ban {
                self.ban_locked(st, number, conn);
            }
            return;
        }
        acct.tokens -= 1.0;
        st.ledger
            .outbound(at_ms, number, conn, &id, &to, &text, reply_to.as_ref());
        self.send(
            st,
            conn,
            ServerFrame::SendAck {
                id: id.clone(),
                server_time_ms: EPOCH_MS + at_ms,
            },
        );
        let echo = InboundMessage {
            id: id.clone(),
            chat: to.clone(),
            sender: number.jid(),
            sender_alt: None,
            is_from_me: true,
            text,
            timestamp_ms: EPOCH_MS + at_ms,
        };
        // The echo is queued like any inbound message: redelivered after a reconnect until the
        // client acknowledges it.
        if let Some(acct) = st.accounts.get_mut(number) {
            acct.unacked.push(echo.clone());
        }
        self.send(st, conn, ServerFrame::Message { message: echo });
        let (lo, hi) = cfg.delivery_delay;
        let delivered = st.rng.random_range(lo..=hi);
        let (lo, hi) = cfg.read_delay;
        let read = delivered + st.rng.random_range(lo..=hi);
        for (after, kind) in [
            (delivered, ReceiptKind::Delivered),
            (read, ReceiptKind::Read),
        ] {
            let receipt = Receipt {
                id: id.clone(),
                chat: to.clone(),
                kind,
            };
            self.schedule_receipt(now + after, number, receipt);
        }
    }

    /// Queues `receipt` to `number` for `at`, on the network's one receipt task.
    fn schedule_receipt(&self, at: Instant, number: &PhoneNumber, receipt: Receipt) {
        let tx = self.inner.receipts.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(deliver_receipts(Arc::downgrade(&self.inner), rx));
            tx
        });
        let _ = tx.send(DueReceipt {
            at,
            number: number.clone(),
            receipt,
        });
    }

    fn push_receipt(&self, number: &PhoneNumber, receipt: Receipt) {
        let mut st = self.lock();
        let live = st.accounts.get(number).and_then(|a| a.live);
        if let Some(conn) = live.filter(|c| st.conns.get(c).is_some_and(|c| c.authenticated)) {
            self.send(&mut st, conn, ServerFrame::Receipt { receipt });
        }
    }

    fn start_pair_code(&self, st: &mut State, number: &PhoneNumber, conn: u64) {
        let code: String = (0..8)
            .map(|_| char::from(b"ABCDEFGHJKLMNPQRSTVWXYZ23456789"[st.rng.random_range(0..31)]))
            .collect();
        let Some(pairing) = st.accounts.get_mut(number).and_then(|a| a.pairing.as_mut()) else {
            return;
        };
        if pairing.conn != conn {
            return;
        }
        pairing.pair_code = Some(code.clone());
        self.send(st, conn, ServerFrame::PairCode { code });
        let network = self.clone();
        let number = number.clone();
        let valid = self.inner.config.pair_code_valid;
        tokio::spawn(async move {
            tokio::time::sleep(valid).await;
            network.expire_pairing(&number, conn);
        });
    }

    /// Shows the QR codes in turn while the connection is pairing by QR.
    async fn rotate_qr(self, number: PhoneNumber, conn: u64) {
        let cfg = self.inner.config.clone();
        for i in 0..=cfg.qr_more {
            let valid = if i == 0 { cfg.qr_first } else { cfg.qr_next };
            {
                let mut st = self.lock();
                let showing_qr = st
                    .accounts
                    .get(&number)
                    .and_then(|a| a.pairing.as_ref())
                    .is_some_and(|p| p.conn == conn && p.pair_code.is_none());
                if !showing_qr {
                    return;
                }
                let ref_: u64 = st.rng.random();
                let code = format!("2@{ref_:016x},{},{}", number.digits(), i + 1);
                let valid_ms = u64::try_from(valid.as_millis()).unwrap_or(u64::MAX);
                self.send(&mut st, conn, ServerFrame::Qr { code, valid_ms });
            }
            tokio::time::sleep(valid).await;
        }
        self.expire_pairing(&number, conn);
    }

    fn expire_pairing(&self, number: &PhoneNumber, conn: u64) {
        let mut st = self.lock();
        let Some(acct) = st.accounts.get_mut(number) else {
            return;
        };
        if acct.pairing.as_ref().is_some_and(|p| p.conn == conn) {
            acct.pairing = None;
            self.send(&mut st, conn, ServerFrame::QrExhausted);
            self.close_locked(&mut st, conn, "qr_exhausted");
        }
    }

    fn authenticate(&self, st: &mut State, conn: u64) {
        let Some(c) = st.conns.get_mut(&conn) else {
            return;
        };
        c.authenticated = true;
        let number = c.number.clone();
        self.send(st, conn, ServerFrame::Connected);
        let redeliver: Vec<InboundMessage> = match st.accounts.get(&number) {
            Some(acct) => acct.unacked.all(),
            None => Vec::new(),
        };
        let count = redeliver.len();
        for message in redeliver {
            self.send(st, conn, ServerFrame::Message { message });
        }
        self.send(st, conn, ServerFrame::OfflineSyncCompleted { count });
    }

    fn ban_locked(&self, st: &mut State, number: &PhoneNumber, conn: u64) {
        let now = Instant::now();
        let until = st
            .accounts
            .get(number)
            .and_then(|a| a.banned_until)
            .unwrap_or(now);
        let duration_ms =
            u64::try_from(until.saturating_duration_since(now).as_millis()).unwrap_or(u64::MAX);
        st.ledger.banned();
        self.send(st, conn, ServerFrame::TemporaryBan { duration_ms });
        self.close_locked(st, conn, "temporary_ban");
    }

    fn close(&self, conn: u64, reason: &str) {
        let mut st = self.lock();
        self.close_locked(&mut st, conn, reason);
    }

    fn close_locked(&self, st: &mut State, conn: u64, reason: &str) {
        let Some(c) = st.conns.remove(&conn) else {
            return;
        };
        let at_ms = self.now_ms();
        st.ledger
            .connection_closed(at_ms, &c.number, conn, &c.label, reason);
        if let Some(acct) = st.accounts.get_mut(&c.number) {
            if acct.live == Some(conn) {
                acct.live = None;
            }
            if acct.pairing.as_ref().is_some_and(|p| p.conn == conn) {
                acct.pairing = None;
            }
        }
    }

    /// Queues `frame` to connection `conn`, delayed by the account's latency fault.
    fn send(&self, st: &mut State, conn: u64, frame: ServerFrame) {
        let Some(c) = st.conns.get(&conn) else {
            return;
        };
        let now = Instant::now();
        let delay = st
            .accounts
            .get(&c.number)
            .and_then(|a| a.latency)
            .filter(|(_, until)| *until > now)
            .map_or(Duration::ZERO, |(d, _)| d);
        let _ = c.tx.send(Timed {
            at: now + delay,
            frame,
        });
    }

    fn ensure_account(&self, st: &mut State, number: &PhoneNumber) -> bool {
        if st.accounts.contains_key(number) {
            return false;
        }
        st.accounts.insert(
            number.clone(),
            Account::new(Instant::now(), self.inner.config.send_burst),
        );
        st.ledger.account_created(number);
        true
    }
}

fn new_credentials(rng: &mut SmallRng) -> String {
    let (a, b): (u64, u64) = (rng.random(), rng.random());
    format!("dev-{a:016x}{b:016x}")
}

/// A contact's LID: a stable opaque id derived from its phone number.
fn lid_of(phone: &PhoneNumber) -> Jid {
    let h = fnv(phone.as_str().as_bytes()) % 100_000_000_000_000;
    Jid::lid(&format!("{h:014}")).unwrap_or_else(|_| phone.jid())
}

/// The `index`-th scripted contact of `number`: a stable, valid E.164 number.
pub fn contact_of(number: &PhoneNumber, index: u32) -> PhoneNumber {
    let mut bytes = number.as_str().as_bytes().to_vec();
    bytes.extend_from_slice(&index.to_le_bytes());
    let n = fnv(&bytes) % 1_000_000_000;
    PhoneNumber::parse(&format!("+49{n:09}")).unwrap_or_else(|_| number.clone())
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// What scripted contacts write.
const PHRASES: &[&str] = &[
    "hi",
    "hello there",
    "menu",
    "what are your opening hours?",
    "price of the basic plan?",
    "ai can you summarise your refund policy?",
    "I'd like to talk to someone",
    "thanks!",
    "is my order shipped?",
    "ok",
];
