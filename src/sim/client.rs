//! The simulator's client: the `sim` transport, implementing the transport port.
//!
//! A [`SimSession`] behaves as a whatsapp-rust 0.7 client does: it runs its own connection loop,
//! retries connects that fail silently with Fibonacci backoff (1, 1, 2, 3, 5 … s, ±10 %, capped
//! at 900 s), reconnects after a dropped connection, and stops for good after a terminal event.
//! It reaches the network in process ([`Dialer::Local`]) or over `sim serve` ([`Dialer::Remote`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use switchboard_actors::ids::{Jid, PhoneNumber};
use switchboard_actors::transport::{
    AccountSpec, Credentials, DisconnectReason, EventSink, MessageId, OutboundText, SendError,
    ServerAck, SessionStats, TransportError, WaConnector, WaEvent, WaSession,
};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::network::{LinkReceiver, LinkSender, Network};
use super::remote;
use super::wire::{ClientFrame, Refusal, ServerFrame};

/// How long a send waits for its server ack.
const SEND_TIMEOUT: Duration = Duration::from_secs(20);
/// Upper bound of the reconnect backoff.
const BACKOFF_CAP: Duration = Duration::from_secs(900);

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
    Remote(mpsc::UnboundedSender<ClientFrame>),
}

impl LinkTx {
    fn send(&self, frame: ClientFrame) {
        match self {
            Self::Local(tx) => tx.send(frame),
            Self::Remote(tx) => {
                let _ = tx.send(frame);
            }
        }
    }
}

/// The receiving half of a connection.
pub(crate) enum LinkRx {
    Local(LinkReceiver),
    Remote(mpsc::UnboundedReceiver<ServerFrame>, JoinHandle<()>),
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
                connected: false,
                pending: HashMap::new(),
                stats: SessionStats::default(),
            }),
        });
        let task = tokio::spawn(run(shared.clone(), SmallRng::seed_from_u64(seed)));
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
    connected: bool,
    pending: HashMap<MessageId, oneshot::Sender<Result<ServerAck, SendError>>>,
    stats: SessionStats,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn emit(&self, event: WaEvent) {
        (self.events)(event);
    }

    /// Sends on the live, logged-in connection.
    fn send_connected(&self, frame: ClientFrame) -> Result<(), SendError> {
        let inner = self.lock();
        match (&inner.link, inner.connected) {
            (Some(link), true) => {
                link.send(frame);
                Ok(())
            }
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
    /// The connection was lost; reconnect. `false` if it never got a frame (silent failure).
    Lost {
        answered: bool,
        reason: DisconnectReason,
    },
    /// `shutdown` was called.
    Cancelled,
}

/// The connection loop.
async fn run(shared: Arc<Shared>, mut rng: SmallRng) {
    let mut failures: u32 = 0;
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
        {
            let mut inner = shared.lock();
            inner.link = None;
            inner.connected = false;
            inner.stats.connected = false;
            for (_, waiter) in inner.pending.drain() {
                let _ = waiter.send(Err(SendError::NotConnected));
            }
        }
        rx.close().await;
        match end {
            End::Terminal | End::Cancelled => return,
            End::Lost {
                answered: true,
                reason,
            } => {
                shared.emit(WaEvent::Disconnected { reason });
                failures = 0;
            }
            End::Lost {
                answered: false, ..
            } => {
                shared.lock().stats.connect_failures += 1;
                failures += 1;
                let delay = fibonacci_backoff(failures, &mut rng);
                tokio::select! {
                    () = shared.cancel.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// The delay before retry `n` (1-based) after silent failures: Fibonacci seconds, ±10 %.
pub fn fibonacci_backoff(n: u32, rng: &mut impl Rng) -> Duration {
    let (mut a, mut b) = (1u64, 1u64);
    for _ in 1..n.min(40) {
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
        ServerFrame::QrExhausted => WaEvent::QrCodesExhausted,
        ServerFrame::PairCode { code } => WaEvent::PairCode { code },
        ServerFrame::PairSuccess { credentials } => {
            shared.lock().credentials = Some(credentials.clone());
            WaEvent::PairSuccess {
                credentials: Credentials(credentials),
            }
        }
        ServerFrame::Connected => {
            let mut inner = shared.lock();
            inner.connected = true;
            inner.stats.connected = true;
            inner.stats.connections += 1;
            WaEvent::Connected
        }
        ServerFrame::Message { message } => WaEvent::Message(message),
        ServerFrame::OfflineSyncCompleted { count } => WaEvent::OfflineSyncCompleted { count },
        ServerFrame::Receipt { receipt } => WaEvent::Receipt(receipt),
        ServerFrame::SendAck { id, server_time_ms } => {
            resolve(shared, &id.clone(), Ok(ServerAck { id, server_time_ms }));
            return None;
        }
        ServerFrame::SendError { id, error } => {
            let err = match error {
                Refusal::RateOverlimit => SendError::RateOverlimit,
                Refusal::NotAuthenticated => SendError::NotConnected,
            };
            resolve(shared, &id, Err(err));
            return None;
        }
        ServerFrame::LoggedOut => {
            shared.lock().credentials = None;
            WaEvent::LoggedOut
        }
        ServerFrame::StreamReplaced => WaEvent::StreamReplaced,
        ServerFrame::TemporaryBan { duration_ms } => WaEvent::TemporaryBan {
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

fn resolve(shared: &Shared, id: &MessageId, result: Result<ServerAck, SendError>) {
    if let Some(waiter) = shared.lock().pending.remove(id) {
        let _ = waiter.send(result);
    }
}

#[async_trait]
impl WaSession for SimSession {
    async fn send_text(&self, msg: OutboundText) -> Result<ServerAck, SendError> {
        let (tx, rx) = oneshot::channel();
        let id = msg.id.clone();
        {
            let mut inner = self.shared.lock();
            match (&inner.link, inner.connected) {
                (Some(link), true) => link.send(ClientFrame::Send {
                    id: msg.id,
                    to: msg.to,
                    text: msg.text,
                    reply_to: msg.reply_to,
                }),
                _ => return Err(SendError::NotConnected),
            }
            inner.pending.insert(id.clone(), tx);
        }
        match tokio::time::timeout(SEND_TIMEOUT, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(SendError::Closed),
            Err(_) => {
                self.shared.lock().pending.remove(&id);
                Err(SendError::Timeout(SEND_TIMEOUT))
            }
        }
    }

    async fn send_typing(&self, chat: &Jid, typing: bool) -> Result<(), SendError> {
        self.shared.send_connected(ClientFrame::Typing {
            chat: chat.clone(),
            on: typing,
        })
    }

    async fn mark_read(&self, chat: &Jid, ids: &[MessageId]) -> Result<(), SendError> {
        self.shared.send_connected(ClientFrame::Read {
            chat: chat.clone(),
            ids: ids.to_vec(),
        })
    }

    fn ack(&self, chat: &Jid, sender: &Jid, id: &MessageId) {
        let _ = self.shared.send_connected(ClientFrame::Ack {
            chat: chat.clone(),
            sender: sender.clone(),
            id: id.clone(),
        });
    }

    async fn request_pair_code(&self) -> Result<(), TransportError> {
        let inner = self.shared.lock();
        match &inner.link {
            Some(link) if !inner.connected => {
                link.send(ClientFrame::PairCode);
                Ok(())
            }
            Some(_) => Err(TransportError::InvalidState(
                "already paired and connected".to_owned(),
            )),
            None => Err(TransportError::InvalidState(
                "not connected to the network".to_owned(),
            )),
        }
    }

    async fn logout(&self) -> Result<(), TransportError> {
        self.shared
            .send_connected(ClientFrame::Logout)
            .map_err(|_| TransportError::InvalidState("not connected".to_owned()))
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
