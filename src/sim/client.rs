//! The simulator's client: the `sim` transport, implementing the transport port.
//!
//! A [`SimSession`] behaves as a whatsapp-rust 0.7 client does: it runs its own connection loop;
//! after a failed connect or a dropped connection it waits by Fibonacci backoff (1, 1, 2, 3, 5 …
//! s, ±10 %, capped at 900 s; the step resets only after a connection stayed up 30 s) and tries
//! again; after the server's restart request that follows pairing it reconnects at once; after a
//! terminal event it stops for good. A send resolves once written; its server ack is an event.
//! It reaches the network in process ([`Dialer::Local`]) or over `sim serve` ([`Dialer::Remote`]).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use switchboard_actors::ids::{Jid, PhoneNumber};
use switchboard_actors::transport::{
    AccountSpec, Credentials, DisconnectReason, EventSink, MessageId, MessageKey, OutboundText,
    SendError, ServerAck, SessionStats, TransportError, WaConnector, WaEvent, WaSession,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::network::{LinkReceiver, LinkSender, Network};
use super::remote;
use super::wire::{ClientFrame, ServerFrame};

/// Upper bound of the reconnect backoff.
const BACKOFF_CAP: Duration = Duration::from_secs(900);
/// A connection that stayed up this long resets the backoff.
const STABLE_AFTER: Duration = Duration::from_secs(30);
/// How long a pair code the client generated stays valid.
const PAIR_CODE_VALID: Duration = Duration::from_secs(180);
/// The pair-code alphabet of the real client (Crockford base 32 without 0, I, O, U).
const PAIR_CODE_ALPHABET: &[u8; 32] = b"123456789ABCDEFGHJKLMNPQRSTVWXYZ";

/// Where the network is.
#[derive(Clone)]
pub enum Dialer {
    /// In this process.
    Local(Network),
    /// A `switchboard sim serve` at this `host:port`.
    Remote(String),
}

/// One connection as the session sees it.
pub(crate) struct Link {
    pub(crate) tx: LinkTx,
    pub(crate) rx: LinkRx,
}

/// The sending half of a connection.
#[derive(Clone)]
pub(crate) enum LinkTx {
    Local(LinkSender),
    /// Bounded: a socket that cannot take more frames is a broken connection.
    Remote(mpsc::Sender<ClientFrame>),
}

impl LinkTx {
    /// Writes `frame`; false if it could not be written.
    fn send(&self, frame: ClientFrame) -> bool {
        match self {
            Self::Local(tx) => {
                tx.send(frame);
                true
            }
            Self::Remote(tx) => tx.try_send(frame).is_ok(),
        }
    }
}

/// The receiving half of a connection.
pub(crate) enum LinkRx {
    Local(LinkReceiver),
    Remote(mpsc::Receiver<ServerFrame>, JoinHandle<()>),
}

impl LinkRx {
    async fn recv(&mut self) -> Option<ServerFrame> {
        match self {
            Self::Local(rx) => rx.recv().await,
            Self::Remote(rx, _) => rx.recv().await,
        }
    }

    /// Closes the connection and waits until the network has seen it closed.
    async fn close(self) {
        match self {
            Self::Local(rx) => drop(rx),
            Self::Remote(rx, task) => {
                drop(rx);
                let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
            }
        }
    }
}

impl Dialer {
    async fn dial(&self, number: &PhoneNumber, label: &str, credentials: Option<&str>) -> Link {
        match self {
            Self::Local(network) => {
                let (tx, rx) = network.connect(number, label, credentials);
                Link {
                    tx: LinkTx::Local(tx),
                    rx: LinkRx::Local(rx),
                }
            }
            Self::Remote(addr) => {
                let hello = ClientFrame::Hello {
                    number: number.clone(),
                    label: label.to_owned(),
                    credentials: credentials.map(str::to_owned),
                };
                remote::dial(addr, hello).await
            }
        }
    }
}

/// The `sim` transport.
pub struct SimConnector {
    dialer: Dialer,
}

impl SimConnector {
    /// A connector to `dialer`.
    pub fn new(dialer: Dialer) -> Self {
        Self { dialer }
    }
}

#[async_trait]
impl WaConnector for SimConnector {
    async fn start(
        &self,
        account: AccountSpec,
        events: EventSink,
    ) -> Result<Arc<dyn WaSession>, TransportError> {
        let seed = account.number.digits().parse::<u64>().unwrap_or(0);
        let shared = Arc::new(Shared {
            number: account.number,
            label: account.client_label,
            dialer: self.dialer.clone(),
            events,
            cancel: CancellationToken::new(),
            inner: Mutex::new(Inner {
                credentials: account.credentials.map(|c| c.0),
                link: None,
                connected_at: None,
                pair_code_until: None,
                rng: SmallRng::seed_from_u64(seed),
                stats: SessionStats::default(),
            }),
        });
        let task = tokio::spawn(run(shared.clone()));
        Ok(Arc::new(SimSession {
            shared,
            task: Mutex::new(Some(task)),
        }))
    }
}

struct Shared {
    number: PhoneNumber,
    label: String,
    dialer: Dialer,
    events: EventSink,
    cancel: CancellationToken,
    inner: Mutex<Inner>,
}

struct Inner {
    credentials: Option<String>,
    link: Option<LinkTx>,
    /// When the live connection logged in (`Connected`); `None` while not logged in.
    connected_at: Option<Instant>,
    /// The pair code shown is valid until then.
    pair_code_until: Option<Instant>,
    /// Backoff jitter and pair codes.
    rng: SmallRng,
    stats: SessionStats,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn emit(&self, event: WaEvent) {
        (self.events)(event);
    }

    /// Writes on the live, logged-in connection.
    fn send_connected(&self, frame: ClientFrame) -> Result<(), SendError> {
        if self.cancel.is_cancelled() {
            return Err(SendError::Closed);
        }
        let inner = self.lock();
        match (&inner.link, inner.connected_at) {
            (Some(link), Some(_)) if link.send(frame) => Ok(()),
            _ => Err(SendError::NotConnected),
        }
    }
}

/// A session of the `sim` transport.
pub struct SimSession {
    shared: Arc<Shared>,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// How one connection ended.
enum End {
    /// A terminal event: stop.
    Terminal,
    /// The server asked for a new connection (after pairing): reconnect at once.
    Restart,
    /// The connection was lost; reconnect after the backoff. `answered` is false if it never
    /// got a frame (a silent connect failure).
    Lost {
        answered: bool,
        reason: DisconnectReason,
    },
    /// `shutdown` was called.
    Cancelled,
}

/// The connection loop.
async fn run(shared: Arc<Shared>) {
    let mut step: u32 = 0;
    loop {
        let credentials = shared.lock().credentials.clone();
        shared.lock().stats.connect_attempts += 1;
        let dial = shared
            .dialer
            .dial(&shared.number, &shared.label, credentials.as_deref());
        let link = tokio::select! {
            () = shared.cancel.cancelled() => return,
            link = dial => link,
        };
        shared.lock().link = Some(link.tx.clone());
        let mut rx = link.rx;
        let end = tokio::select! {
            () = shared.cancel.cancelled() => End::Cancelled,
            end = pump(&shared, &mut rx) => end,
        };
        let stable = {
            let mut inner = shared.lock();
            inner.link = None;
            inner.stats.connected = false;
            inner.pair_code_until = None;
            inner
                .connected_at
                .take()
                .is_some_and(|t| t.elapsed() >= STABLE_AFTER)
        };
        rx.close().await;
        let answered = match end {
            End::Terminal | End::Cancelled => return,
            End::Restart => {
                step = 0;
                continue;
            }
            End::Lost { answered, reason } => {
                if answered {
                    shared.emit(WaEvent::Disconnected { reason });
                }
                answered
            }
        };
        if !answered {
            shared.lock().stats.connect_failures += 1;
        }
        if stable {
            step = 0;
        }
        let delay = fibonacci_backoff(step, &mut shared.lock().rng);
        step = step.saturating_add(1);
        tokio::select! {
            () = shared.cancel.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// The delay before reconnect number `step` (0-based) since the last stable connection:
/// Fibonacci seconds (1, 1, 2, 3, 5 …) capped at 900 s, ±10 %.
pub fn fibonacci_backoff(step: u32, rng: &mut impl Rng) -> Duration {
    let (mut a, mut b) = (1u64, 1u64);
    for _ in 0..step.min(40) {
        (a, b) = (b, a.saturating_add(b));
    }
    let nominal = Duration::from_secs(a).min(BACKOFF_CAP);
    nominal.mul_f64(rng.random_range(0.9..=1.1))
}

/// Reads one connection's frames, turning them into events, until it ends.
async fn pump(shared: &Shared, rx: &mut LinkRx) -> End {
    let mut answered = false;
    while let Some(frame) = rx.recv().await {
        answered = true;
        if let Some(end) = on_frame(shared, frame) {
            return end;
        }
    }
    End::Lost {
        answered,
        reason: DisconnectReason::ConnectionLost,
    }
}

fn on_frame(shared: &Shared, frame: ServerFrame) -> Option<End> {
    let event = match frame {
        ServerFrame::Qr { code, valid_ms } => WaEvent::QrCode {
            code,
            valid_for: Duration::from_millis(valid_ms),
        },
        ServerFrame::QrExhausted { disconnected } => WaEvent::QrCodesExhausted { disconnected },
        ServerFrame::PairSuccess { credentials } => {
            shared.lock().credentials = Some(credentials.clone());
            WaEvent::PairSuccess {
                credentials: Credentials(credentials),
            }
        }
        ServerFrame::Restart => return Some(End::Restart),
        ServerFrame::OfflineSyncPreview { total, messages } => {
            WaEvent::OfflineSyncPreview { total, messages }
        }
        ServerFrame::OfflineSyncCompleted { count } => WaEvent::OfflineSyncCompleted { count },
        ServerFrame::Connected => {
            let mut inner = shared.lock();
            inner.connected_at = Some(Instant::now());
            inner.stats.connected = true;
            inner.stats.connections += 1;
            WaEvent::Connected
        }
        ServerFrame::Message { message } if message.is_from_me => WaEvent::FromPhone(message),
        ServerFrame::Message { message } => WaEvent::Message(message),
        ServerFrame::Undecryptable {
            chat,
            sender,
            id,
            offline,
        } => {
            // As the real client does: ask the sender's device to resend it.
            if let Some(link) = &shared.lock().link {
                link.send(ClientFrame::RetryRequest {
                    chat: chat.clone(),
                    sender: sender.clone(),
                    id: id.clone(),
                });
            }
            WaEvent::Undecryptable {
                chat,
                sender,
                id,
                offline,
            }
        }
        ServerFrame::Ack { id, error } => WaEvent::ServerAck(ServerAck { id, error }),
        ServerFrame::Receipt { receipt } => WaEvent::Receipt(receipt),
        ServerFrame::LoggedOut => {
            shared.lock().credentials = None;
            WaEvent::LoggedOut
        }
        ServerFrame::StreamReplaced => WaEvent::StreamReplaced,
        ServerFrame::TemporaryBan { code, duration_ms } => WaEvent::TemporaryBan {
            code,
            duration: Duration::from_millis(duration_ms),
        },
        ServerFrame::Closed { reason } => {
            return Some(End::Lost {
                answered: true,
                reason: DisconnectReason::ServerClosed(reason),
            });
        }
    };
    let terminal = event.is_terminal();
    shared.emit(event);
    terminal.then_some(End::Terminal)
}

#[async_trait]
impl WaSession for SimSession {
    async fn send_text(&self, msg: OutboundText) -> Result<(), SendError> {
        self.shared.send_connected(ClientFrame::Send {
            id: msg.id,
            to: msg.to,
            text: msg.text,
            reply_to: msg.reply_to,
            reply_to_sender: msg.reply_to_sender,
        })
    }

    async fn send_typing(&self, chat: &Jid, typing: bool) -> Result<(), SendError> {
        self.shared.send_connected(ClientFrame::Typing {
            chat: chat.clone(),
            on: typing,
        })
    }

    async fn mark_read(
        &self,
        chat: &Jid,
        sender: Option<&Jid>,
        ids: &[MessageId],
    ) -> Result<(), SendError> {
        self.shared.send_connected(ClientFrame::Read {
            chat: chat.clone(),
            sender: sender.cloned(),
            ids: ids.to_vec(),
        })
    }

    fn ack(&self, messages: &[MessageKey]) {
        if messages.is_empty() {
            return;
        }
        if let Some(link) = &self.shared.lock().link {
            link.send(ClientFrame::Ack {
                messages: messages.to_vec(),
            });
        }
    }

    async fn request_pair_code(&self) -> Result<(), TransportError> {
        let (code, valid_for) = {
            let mut inner = self.shared.lock();
            let now = Instant::now();
            if inner.credentials.is_some() || inner.connected_at.is_some() {
                return Err(TransportError::InvalidState("already paired".to_owned()));
            }
            let Some(link) = inner.link.clone() else {
                return Err(TransportError::InvalidState(
                    "not connected to the network".to_owned(),
                ));
            };
            if let Some(until) = inner.pair_code_until.filter(|t| *t > now) {
                return Err(TransportError::InvalidState(format!(
                    "a pair code is outstanding for {:?}",
                    until - now
                )));
            }
            let code: String = (0..8)
                .map(|_| char::from(PAIR_CODE_ALPHABET[inner.rng.random_range(0..32)]))
                .collect();
            if !link.send(ClientFrame::PairCode { code: code.clone() }) {
                return Err(TransportError::InvalidState("connection lost".to_owned()));
            }
            inner.pair_code_until = Some(now + PAIR_CODE_VALID);
            (code, PAIR_CODE_VALID)
        };
        self.shared.emit(WaEvent::PairCode { code, valid_for });
        Ok(())
    }

    async fn logout(&self) -> Result<(), TransportError> {
        if self.shared.send_connected(ClientFrame::Logout).is_ok() {
            return Ok(());
        }
        // Offline: the device forgets its identity and the session ends, as the real client's
        // logout does without a connection.
        self.shared.lock().credentials = None;
        self.shared.cancel.cancel();
        self.shared.emit(WaEvent::LoggedOut);
        Ok(())
    }

    async fn shutdown(&self) {
        self.shared.cancel.cancel();
        let task = self
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    fn stats(&self) -> SessionStats {
        self.shared.lock().stats.clone()
    }
}
