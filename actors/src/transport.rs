//! The transport port: how a number talks to WhatsApp.
//!
//! [`WaConnector::start`] opens a [`WaSession`] for one account. The session owns its connection
//! loop: it connects, retries silent connect failures with Fibonacci backoff (1, 1, 2, 3, 5 … s,
//! ±10 %, capped at 900 s), and reports what happens as [`WaEvent`]s through one ordered
//! [`EventSink`]. Terminal events (logged out, stream replaced, temporary ban, QR codes exhausted)
//! end the loop: the session never reconnects by itself after one of them.
//!
//! Implementations: the simulator (tests, benchmarks, demo) and whatsapp-rust (production). No
//! implementation type crosses this port.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::ids::{Jid, PhoneNumber};

/// A message id as WhatsApp carries it: chosen by the sender, unique per (chat, sender).
/// Shared text: a clone is a reference count, not a copy.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(Arc<str>);

impl MessageId {
    /// Accepts 1 to 128 printable ASCII characters without spaces.
    pub fn parse(s: &str) -> Option<Self> {
        let ok = (1..=128).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic());
        ok.then(|| Self(s.into()))
    }

    /// A deterministic outbound id for step `step` of the answer to `inbound` in `chat` of
    /// `number`: retries of the same reply reuse it, so the network can tell a repeat from a
    /// second reply. Shaped like WhatsApp web ids (`3EB0` + 16 hex digits).
    pub fn derived(number: &PhoneNumber, chat: &Jid, inbound: &MessageId, step: u32) -> Self {
        let mut h = Fnv::new();
        h.write(number.as_str().as_bytes());
        h.write(&[0]);
        h.write(chat.as_str().as_bytes());
        h.write(&[0]);
        h.write(inbound.0.as_bytes());
        h.write(&step.to_le_bytes());
        Self(format!("3EB0{:016X}", h.0).into())
    }

    /// The id text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Serialize for MessageId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for MessageId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        Self::parse(&raw).ok_or_else(|| {
            serde::de::Error::custom("a message id is 1 to 128 printable characters without spaces")
        })
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// FNV-1a, 64 bit: stable across Rust versions, unlike `DefaultHasher`.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// The device identity a paired session reconnects with. Never printed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Credentials(pub String);

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credentials(…)")
    }
}

/// Who is connecting, as whom.
#[derive(Debug, Clone)]
pub struct AccountSpec {
    /// The WhatsApp account.
    pub number: PhoneNumber,
    /// This node's id: the network records it per connection.
    pub client_label: String,
    /// The paired device's identity; `None` starts pairing.
    pub credentials: Option<Credentials>,
}

/// An inbound chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboundMessage {
    /// Sender-chosen id, unique per (chat, sender).
    pub id: MessageId,
    /// The chat: the contact for a DM, the group otherwise.
    pub chat: Jid,
    /// Who wrote it; may be a LID.
    pub sender: Jid,
    /// The sender's other address (the phone JID when `sender` is a LID).
    pub sender_alt: Option<Jid>,
    /// True for our own sends coming back (sent by this or another device of the account).
    pub is_from_me: bool,
    /// The text.
    pub text: String,
    /// Server time in milliseconds since the epoch.
    pub timestamp_ms: u64,
}

impl InboundMessage {
    /// The sender's phone number, from `sender` or its alternative.
    pub fn sender_phone(&self) -> Option<PhoneNumber> {
        self.sender
            .phone()
            .or_else(|| self.sender_alt.as_ref().and_then(Jid::phone))
    }
}

/// A text to send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboundText {
    /// Caller-chosen id; a retry reuses it.
    pub id: MessageId,
    /// The chat to send to.
    pub to: Jid,
    /// The text.
    pub text: String,
    /// The inbound message this answers (WhatsApp's quoted-message context).
    pub reply_to: Option<MessageId>,
}

/// The server accepted a send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerAck {
    /// The id the sender chose.
    pub id: MessageId,
    /// Server time in milliseconds since the epoch.
    pub server_time_ms: u64,
}

/// Delivery progress of a sent message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReceiptKind {
    /// Reached the contact's device.
    Delivered,
    /// The contact opened it.
    Read,
}

/// A receipt for a message we sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The sent message.
    pub id: MessageId,
    /// The chat it was sent to.
    pub chat: Jid,
    /// Delivered or read.
    pub kind: ReceiptKind,
}

/// Why a connection ended without a terminal event; the session reconnects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DisconnectReason {
    /// The socket broke or the server dropped us.
    ConnectionLost,
    /// The server closed the stream with a reason.
    ServerClosed(String),
}

impl DisconnectReason {
    /// A bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::ConnectionLost => "connection_lost",
            Self::ServerClosed(_) => "server_closed",
        }
    }
}

/// What a session reports, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaEvent {
    /// Show this QR code; it is valid for `valid_for`, then the next one follows.
    QrCode {
        /// The QR payload.
        code: String,
        /// How long the phone may scan it.
        valid_for: Duration,
    },
    /// All QR codes expired unscanned; the connection closed and the session ended (terminal).
    QrCodesExhausted,
    /// Enter this code on the phone.
    PairCode {
        /// The 8-character code.
        code: String,
    },
    /// The phone confirmed pairing; keep these credentials to reconnect without pairing.
    PairSuccess {
        /// The device identity.
        credentials: Credentials,
    },
    /// Online and able to send.
    Connected,
    /// The connection ended; the session retries on its own.
    Disconnected {
        /// Why.
        reason: DisconnectReason,
    },
    /// The phone unlinked this device (terminal; the credentials are void).
    LoggedOut,
    /// The same account connected elsewhere; this connection is closed (terminal).
    StreamReplaced,
    /// The account is banned for `duration` (terminal for this session).
    TemporaryBan {
        /// How long the ban lasts.
        duration: Duration,
    },
    /// A message arrived; acknowledge it with [`WaSession::ack`] once it is committed. Our own
    /// sends come back as messages with `is_from_me` (redelivered after a reconnect until
    /// acknowledged), which is how a restarted node learns that a send it lost track of arrived.
    Message(InboundMessage),
    /// After connecting, the server has delivered everything queued while we were offline
    /// (WhatsApp's offline-sync marker). Sends whose outcome was unknown can now be settled.
    OfflineSyncCompleted {
        /// Messages delivered from the offline queue.
        count: usize,
    },
    /// A receipt for a message we sent.
    Receipt(Receipt),
}

impl WaEvent {
    /// True for events after which the session does not reconnect by itself.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Self::QrCodesExhausted
                | Self::LoggedOut
                | Self::StreamReplaced
                | Self::TemporaryBan { .. }
        )
    }
}

/// Receives a session's events in order; must not block.
pub type EventSink = Arc<dyn Fn(WaEvent) + Send + Sync>;

/// Why a send failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// No live connection right now; retry later with the same id.
    #[error("not connected")]
    NotConnected,
    /// The account sent faster than its limit (WhatsApp's 429).
    #[error("rate-overlimit")]
    RateOverlimit,
    /// No server ack in time; the send may or may not have arrived.
    #[error("no server ack within {0:?}")]
    Timeout(Duration),
    /// The server refused it for another reason.
    #[error("refused by the server: {0}")]
    Refused(String),
    /// The session has ended.
    #[error("session closed")]
    Closed,
}

/// Why a session could not be started or asked something.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// The session has ended.
    #[error("session closed")]
    Closed,
    /// The request needs a state the session is not in.
    #[error("{0}")]
    InvalidState(String),
    /// Transport setup failed.
    #[error("transport: {0}")]
    Setup(String),
}

/// Connection counters, for what emits no event (silent connect failures).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Connection attempts so far.
    pub connect_attempts: u64,
    /// Attempts that failed before the server answered.
    pub connect_failures: u64,
    /// Connections that reached `Connected`.
    pub connections: u64,
    /// True while connected.
    pub connected: bool,
}

/// Opens sessions.
#[async_trait]
pub trait WaConnector: Send + Sync + 'static {
    /// Starts the connection loop for `account`, reporting through `events`.
    async fn start(
        &self,
        account: AccountSpec,
        events: EventSink,
    ) -> Result<Arc<dyn WaSession>, TransportError>;
}

/// One account's live session.
#[async_trait]
pub trait WaSession: Send + Sync + 'static {
    /// Sends a text and resolves at the server ack (or its refusal).
    async fn send_text(&self, msg: OutboundText) -> Result<ServerAck, SendError>;
    /// Shows or clears "typing…" in a chat.
    async fn send_typing(&self, chat: &Jid, typing: bool) -> Result<(), SendError>;
    /// Marks messages of a chat as read.
    async fn mark_read(&self, chat: &Jid, ids: &[MessageId]) -> Result<(), SendError>;
    /// Acknowledges an inbound message after it is committed; unacknowledged ones are
    /// redelivered after a reconnect.
    fn ack(&self, chat: &Jid, sender: &Jid, id: &MessageId);
    /// Asks for a pair code instead of QR codes.
    async fn request_pair_code(&self) -> Result<(), TransportError>;
    /// Unlinks this device from the account.
    async fn logout(&self) -> Result<(), TransportError>;
    /// Closes the connection and ends the loop; no event follows.
    async fn shutdown(&self);
    /// Connection counters.
    fn stats(&self) -> SessionStats;
}
