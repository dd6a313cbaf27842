//! The simulated WhatsApp network: accounts and connections here; the rest by concern, each in
//! its own file, all on tokio time and deterministic from a seed.
//!
//! - [`pairing`](self::pairing): QR codes, pair codes, the phone's confirmation.
//! - [`traffic`](self::traffic): contacts writing (DMs by phone or LID, groups), the phone writing,
//!   scripted load.
//! - [`delivery`](self::delivery): the offline queue and its drain at login, acknowledgements,
//!   the stream recycle for acks owed too long, undecryptable messages, and sends (rate limit,
//!   server acks).
//! - [`receipts`](self::receipts): delivery and read receipts, queued while the client is offline
//!   and withheld while the contact is.
//! - [`faults`](self::faults): injected faults.
//!
//! One lock guards the whole state; every frame to a client goes through [`Network::send`], which
//! applies the latency fault and bounds each connection's queue (a client that stops reading is
//! disconnected, as a real server does).

mod delivery;
mod faults;
mod pairing;
mod receipts;
mod traffic;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::SmallRng;
use switchboard_actors::ids::PhoneNumber;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use faults::{Fault, FaultKind};
pub use traffic::{TrafficSpec, contact_of};

use super::ledger::{Ledger, LedgerEvent, Summary};
use super::wire::{ClientFrame, ServerFrame};
use delivery::{Inbox, SendLimiter};
use faults::Faults;
use pairing::Pairing;
use receipts::Receipts;

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
    /// Validity of a pair code (counted by the client that generated it).
    pub pair_code_valid: Duration,
    /// Sends an account may make back to back.
    pub send_burst: u32,
    /// Sustained sends per second per account.
    pub send_per_second: f64,
    /// Rate-overlimit refusals within a minute that earn a temporary ban.
    pub ban_after_overlimits: usize,
    /// Length of that ban.
    pub ban_duration: Duration,
    /// Delay range of delivery receipts after the server took a send.
    pub delivery_delay: (Duration, Duration),
    /// Delay range of read receipts after delivery.
    pub read_delay: (Duration, Duration),
    /// Share of contacts whose DMs are addressed by LID rather than by phone.
    pub lid_share: f64,
    /// A live connection that owes an ack for longer than this is recycled by the server.
    pub ack_owed_limit: Duration,
    /// Frames queued to one connection before the server gives up on the client.
    pub link_capacity: usize,
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
            lid_share: 0.3,
            ack_owed_limit: Duration::from_secs(60),
            link_capacity: 100_000,
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
    /// The code the phone entered is not the one the device shows.
    #[error("account {0} shows no such pair code")]
    WrongPairCode(PhoneNumber),
    /// The message id was used before by that sender in that chat.
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

/// A frame with the time the client may see it (the `latency` fault delays it).
#[derive(Debug)]
pub struct Timed {
    at: Instant,
    frame: ServerFrame,
}

/// The network's side of one connection, as seen by its client: frames arrive here.
pub struct LinkReceiver {
    conn: u64,
    rx: mpsc::Receiver<Timed>,
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
    receipts: OnceLock<mpsc::UnboundedSender<receipts::Due>>,
    /// The task that recycles connections owing acks too long (started with the first login).
    watchdog: OnceLock<()>,
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
    tx: mpsc::Sender<Timed>,
    /// Logged in (credentials accepted); the offline queue is drained on it.
    authenticated: bool,
}

struct Account {
    paired: bool,
    credentials: Option<String>,
    live: Option<u64>,
    pairing: Option<Pairing>,
    /// Offered and not acknowledged, in order: redelivered at every login.
    inbox: Inbox,
    /// Receipts waiting for the client to log in, and those the contacts withhold.
    receipts: Receipts,
    limiter: SendLimiter,
    banned_until: Option<Instant>,
    faults: Faults,
}

impl Account {
    fn new(now: Instant, burst: u32) -> Self {
        Self {
            paired: false,
            credentials: None,
            live: None,
            pairing: None,
            inbox: Inbox::default(),
            receipts: Receipts::default(),
            limiter: SendLimiter::new(now, burst),
            banned_until: None,
            faults: Faults::default(),
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
                watchdog: OnceLock::new(),
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

    /// Server time now, in milliseconds since the epoch.
    fn server_time_ms(&self) -> u64 {
        EPOCH_MS + self.now_ms()
    }

    /// Creates an unpaired account; true if it is new.
    pub fn create_account(&self, number: &PhoneNumber) -> bool {
        let mut st = self.lock();
        self.ensure_account(&mut st, number)
    }

    /// The referee's totals.
    pub fn summary(&self) -> Summary {
        self.lock().ledger.summary()
    }

    /// Every ledger event of `number`.
    pub fn ledger(&self, number: &PhoneNumber) -> Vec<LedgerEvent> {
        self.lock().ledger.events(number)
    }

    /// Opens a connection for `number` from client `label`. A connect that fails silently (the
    /// `drop` fault) yields a receiver that is already closed and has seen no frame.
    pub fn connect(
        &self,
        number: &PhoneNumber,
        label: &str,
        credentials: Option<&str>,
    ) -> (LinkSender, LinkReceiver) {
        let (tx, rx) = mpsc::channel(self.inner.config.link_capacity.max(16));
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
        if acct.faults.connects_fail(now) {
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
            // WhatsApp refuses a banned account's login (failure 402) with the time left.
            let duration_ms = u64::try_from((until - now).as_millis()).unwrap_or(u64::MAX);
            self.send(
                &mut st,
                conn,
                ServerFrame::TemporaryBan {
                    code: super::wire::BAN_CODE,
                    duration_ms,
                },
            );
            self.close_locked(&mut st, conn, "temporary_ban");
            return link;
        }
        match credentials {
            Some(c) if acct.paired && acct.credentials.as_deref() == Some(c) => {
                self.login(&mut st, conn)
            }
            Some(_) => {
                self.send(&mut st, conn, ServerFrame::LoggedOut);
                self.close_locked(&mut st, conn, "logged_out");
            }
            None => self.start_pairing(&mut st, number, conn),
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
                reply_to_sender,
            } => {
                let send = delivery::Send {
                    id,
                    to,
                    text,
                    reply_to,
                    reply_to_sender,
                };
                if authenticated {
                    self.accept_send(&mut st, &number, conn, send);
                }
            }
            ClientFrame::Ack { messages } if authenticated => {
                self.acked(&mut st, &number, &messages);
            }
            ClientFrame::RetryRequest { chat, sender, id } if authenticated => {
                self.resend_decryptable(&mut st, &number, conn, &chat, &sender, &id);
            }
            ClientFrame::Ack { .. } | ClientFrame::RetryRequest { .. } => {}
            ClientFrame::PairCode { code } => self.register_pair_code(&mut st, &number, conn, code),
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

    /// The account's live, logged-in connection, if any.
    fn online(st: &State, number: &PhoneNumber) -> Option<u64> {
        let conn = st.accounts.get(number)?.live?;
        st.conns
            .get(&conn)
            .is_some_and(|c| c.authenticated)
            .then_some(conn)
    }

    /// Closes `conn` on a fault or an expiry: tells the client why, then closes.
    fn drop_connection(&self, st: &mut State, conn: u64, reason: &str) {
        let frame = ServerFrame::Closed {
            reason: reason.replace('_', " "),
        };
        self.send(st, conn, frame);
        self.close_locked(st, conn, reason);
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
            acct.inbox.undelivered();
        }
    }

    /// Queues `frame` to connection `conn`, delayed by the account's latency fault. A client
    /// whose queue is full has stopped reading: the server closes its connection.
    fn send(&self, st: &mut State, conn: u64, frame: ServerFrame) {
        let Some(c) = st.conns.get(&conn) else {
            return;
        };
        let now = Instant::now();
        let delay = st
            .accounts
            .get(&c.number)
            .map_or(Duration::ZERO, |a| a.faults.latency(now));
        let timed = Timed {
            at: now + delay,
            frame,
        };
        if c.tx.try_send(timed).is_err() {
            tracing::warn!(number = %c.number, "simulated client stopped reading; closing");
            self.close_locked(st, conn, "slow_consumer");
        }
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

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn new_credentials(rng: &mut SmallRng) -> String {
    use rand::Rng;
    let (a, b): (u64, u64) = (rng.random(), rng.random());
    format!("dev-{a:016x}{b:016x}")
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}
