//! The transport port: how a number talks to WhatsApp, as the whatsapp-rust 0.7 client presents
//! it.
//!
//! [`WaConnector::start`] opens a [`WaSession`] for one account. The session owns its connection
//! loop: it connects, and after a failed connect or a dropped connection it waits by Fibonacci
//! backoff (1, 1, 2, 3, 5 … s, ±10 %, capped at 900 s; the step resets only after a connection
//! stayed up 30 s) and tries again. It reports what happens as [`WaEvent`]s through one
//! [`EventSink`]. Terminal events (logged out, stream replaced, temporary ban, QR codes exhausted
//! with the connection closed) end the loop: the session never reconnects by itself after one.
//!
//! What the port promises, and what it does not (the real client's semantics):
//! - On every login the server first drains the offline queue (messages and receipts, marked
//!   `offline`), then [`WaEvent::OfflineSyncCompleted`], then [`WaEvent::Connected`].
//! - [`WaSession::send_text`] resolves once the message is written to the connection. Whether
//!   the server took it is a later [`WaEvent::ServerAck`], which may carry an error, may never
//!   come (the connection dropped first) and is not replayed after a reconnect. The sending
//!   device gets no copy of its own sends; receipts ([`WaEvent::Receipt`]) name delivered and
//!   read ids, in lists, and are queued while the client is offline.
//! - Sending the same id again is accepted: recipients keep one message per sender and id.
//! - Server acks and receipts may arrive out of order with other events (the real client
//!   handles them on tasks of their own); messages and lifecycle events keep their order.
//! - An inbound message stays owed to the server until [`WaSession::ack`] names it; what is owed
//!   is redelivered at the next login.
//!
//! Implementations: the simulator (tests, benchmarks, demo) and whatsapp-rust (production). No
//! implementation type crosses this port.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::coordinator::Lease;
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

    /// A deterministic outbound id for step `step` of the answer to message `inbound` of
    /// `sender` in `chat` of `number`: retries of the same reply reuse it, so the network can
    /// tell a repeat from a second reply. The sender is part of it because an id is unique only
    /// per (chat, sender): two members of a group may send the same id. Shaped like WhatsApp web
    /// ids (`3EB0` + 16 hex digits).
    pub fn derived(
        number: &PhoneNumber,
        chat: &Jid,
        sender: &Jid,
        inbound: &MessageId,
        step: u32,
    ) -> Self {
        let mut h = Fnv::new();
        h.write(number.as_str().as_bytes());
        h.write(&[0]);
        h.write(chat.as_str().as_bytes());
        h.write(&[0]);
        h.write(sender.as_str().as_bytes());
        h.write(&[0]);
        h.write(inbound.0.as_bytes());
        h.write(&step.to_le_bytes());
        Self(format!("3EB0{:016X}", h.0).into())
    }

    /// The outbound id of a message `number` sends as the business under the caller's
    /// idempotency `key`: the same key is the same message, whoever asks and however often.
    /// Shaped like WhatsApp web ids; kept apart from [`MessageId::derived`] ids by a tag.
    pub fn for_key(number: &PhoneNumber, key: &str) -> Self {
        let mut h = Fnv::new();
        h.write(b"business-send\0");
        h.write(number.as_str().as_bytes());
        h.write(&[0]);
        h.write(key.as_bytes());
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
    /// The ownership it connects under: what the transport writes for the number (whatsapp-rust
    /// keeps its protocol state in the store) carries its fence, and a write refused as fenced
    /// revokes it.
    pub lease: Lease,
}

/// An inbound chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboundMessage {
    /// Sender-chosen id, unique per (chat, sender).
    pub id: MessageId,
    /// The chat: the contact for a DM (by phone or by LID), the group otherwise.
    pub chat: Jid,
    /// Who wrote it; may be a LID.
    pub sender: Jid,
    /// The sender's other address (the phone JID when `sender` is a LID, and the other way).
    pub sender_alt: Option<Jid>,
    /// Written by a person on the account's own phone (delivered as [`WaEvent::FromPhone`]),
    /// not by the contact: recorded in the chat, never answered.
    #[serde(default)]
    pub is_from_me: bool,
    /// The text (a media message's caption, or empty).
    pub text: String,
    /// What media it carries, if any: its metadata only; the content is not downloaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media: Option<Media>,
    /// Server time in milliseconds since the epoch.
    pub timestamp_ms: u64,
    /// Delivered from the offline queue at login rather than live.
    #[serde(default)]
    pub offline: bool,
}

/// The media of a message, as its metadata says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Media {
    /// What kind.
    pub kind: MediaKind,
    /// Its MIME type, if given.
    pub mime: Option<String>,
    /// Its size in bytes, if given.
    pub size: Option<u64>,
}

/// A kind of media.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MediaKind {
    /// A picture.
    Image,
    /// A video.
    Video,
    /// A voice note or audio file.
    Audio,
    /// A document.
    Document,
    /// A sticker.
    Sticker,
}

impl MediaKind {
    /// The label used in metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Self::Image => "image",
            Self::Video => "video",
            Self::Audio => "audio",
            Self::Document => "document",
            Self::Sticker => "sticker",
        }
    }
}

impl InboundMessage {
    /// The sender's phone number, from `sender` or its alternative.
    pub fn sender_phone(&self) -> Option<PhoneNumber> {
        self.sender
            .phone()
            .or_else(|| self.sender_alt.as_ref().and_then(Jid::phone))
    }

    /// What identifies this message to the server, for [`WaSession::ack`].
    pub fn key(&self) -> MessageKey {
        MessageKey {
            chat: self.chat.clone(),
            sender: self.sender.clone(),
            id: self.id.clone(),
        }
    }
}

/// What identifies an inbound message: its id is unique per (chat, sender).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MessageKey {
    /// The chat.
    pub chat: Jid,
    /// Who wrote it.
    pub sender: Jid,
    /// The sender-chosen id.
    pub id: MessageId,
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
    /// Who wrote the quoted message, where the chat alone does not say it (groups).
    #[serde(default)]
    pub reply_to_sender: Option<Jid>,
}

/// The server's answer to one send: taken, or refused with an error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerAck {
    /// The id the sender chose.
    pub id: MessageId,
    /// Why the server refused it; `None` when it took it.
    pub error: Option<AckError>,
}

/// An error carried by a server ack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckError {
    /// The numeric code (WhatsApp's stanza error codes; 429 is rate-overlimit).
    pub code: u16,
    /// The server's text for it.
    pub text: String,
}

impl AckError {
    /// Code 429: the account sent faster than it may.
    pub const RATE_OVERLIMIT: u16 = 429;

    /// True when the account should slow down and send the same id again later.
    pub fn is_rate_limit(&self) -> bool {
        self.code == Self::RATE_OVERLIMIT || self.text == "rate-overlimit"
    }

    /// A bounded label for metrics.
    pub fn label(&self) -> &'static str {
        if self.is_rate_limit() {
            "rate_overlimit"
        } else {
            "refused"
        }
    }
}

impl fmt::Display for AckError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.text)
    }
}

/// Delivery progress of a sent message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReceiptKind {
    /// Reached the contact's device.
    Delivered,
    /// The contact opened it.
    Read,
}

/// A receipt for messages we sent: the network has them, and the contact's device too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The chat they were sent to.
    pub chat: Jid,
    /// The group member whose device sent the receipt; `None` in a DM.
    pub sender: Option<Jid>,
    /// The messages, one or many.
    pub ids: Vec<MessageId>,
    /// Delivered or read.
    pub kind: ReceiptKind,
    /// Queued while we were offline and delivered at login.
    pub offline: bool,
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

/// What a session reports. Lifecycle events and messages come in order; server acks and
/// receipts may overtake them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaEvent {
    /// Show this QR code; it is valid for `valid_for`, then the next one follows.
    QrCode {
        /// The QR payload.
        code: String,
        /// How long the phone may scan it.
        valid_for: Duration,
    },
    /// All QR codes expired unscanned. With `disconnected` the connection closed and the session
    /// ended (terminal); without, a pair code is still outstanding and the connection stays.
    QrCodesExhausted {
        /// Whether the session ended.
        disconnected: bool,
    },
    /// Enter this code on the phone (the answer to [`WaSession::request_pair_code`]).
    PairCode {
        /// The 8-character code.
        code: String,
        /// How long it stays valid.
        valid_for: Duration,
    },
    /// The pair code lapsed; ask for a new one with [`WaSession::request_pair_code`].
    PairCodeRefresh,
    /// A pair-code request failed; no linking comes of it.
    PairCodeFailed {
        /// Why, as the server or the client said.
        reason: String,
        /// How long the server asked to wait before asking again, if it said.
        retry_after: Option<Duration>,
    },
    /// The phone scanned a code but pairing failed; the QR codes go on.
    PairFailed {
        /// Why.
        reason: String,
    },
    /// The phone confirmed pairing; keep these credentials to reconnect without pairing. The
    /// server then asks for a new connection, on which [`WaEvent::Connected`] follows.
    PairSuccess {
        /// The device identity.
        credentials: Credentials,
    },
    /// The server delivered everything queued while we were offline. Comes before
    /// [`WaEvent::Connected`].
    OfflineSyncCompleted {
        /// Items drained from the offline queue (messages and receipts).
        count: usize,
    },
    /// Logged in, the offline queue drained: able to send.
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
        /// WhatsApp's reason code (101–106).
        code: u16,
        /// How long the ban lasts.
        duration: Duration,
    },
    /// The server refused the login with a failure code. Unless `will_retry` (a server error:
    /// 500, 503), the session ends (terminal).
    ConnectFailure {
        /// The failure code (400, 405, 409, 413, 500, 503…).
        code: u16,
        /// The server's message, if any.
        message: Option<String>,
        /// Whether the session retries on its own.
        will_retry: bool,
    },
    /// This client version is too old for the server (terminal): update and restart.
    ClientOutdated,
    /// The server ended the stream with an error code; the session reconnects on its own.
    StreamError {
        /// The code (`515` asks for a new connection, `503` is overload…).
        code: String,
    },
    /// The server announced what it queued while we were offline, before draining it.
    OfflineSyncPreview {
        /// All queued items.
        total: usize,
        /// Of which messages.
        messages: usize,
    },
    /// A contact is typing (or stopped) in a chat.
    ChatPresence {
        /// The chat.
        chat: Jid,
        /// Who.
        sender: Jid,
        /// Typing (true) or paused (false).
        composing: bool,
    },
    /// A contact's message; acknowledge it with [`WaSession::ack`] once it is committed.
    Message(InboundMessage),
    /// A message a person sent from the account's phone (`is_from_me`); acknowledge it like a
    /// contact's. Our own sends from this device never come back.
    FromPhone(InboundMessage),
    /// A message arrived that could not be decrypted. The session has asked the sender's device
    /// to resend it; it arrives again, readable, with the same id.
    Undecryptable {
        /// The message's chat.
        chat: Jid,
        /// Its sender.
        sender: Jid,
        /// Its id.
        id: MessageId,
        /// Delivered from the offline queue.
        offline: bool,
    },
    /// Receipts for messages we sent.
    Receipt(Receipt),
    /// The server's answer to one of our sends.
    ServerAck(ServerAck),
}

impl WaEvent {
    /// True for events after which the session does not reconnect by itself.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Self::QrCodesExhausted { disconnected: true }
                | Self::LoggedOut
                | Self::StreamReplaced
                | Self::TemporaryBan { .. }
                | Self::ClientOutdated
                | Self::ConnectFailure {
                    will_retry: false,
                    ..
                }
        )
    }
}

/// Receives a session's events; must not block.
pub type EventSink = Arc<dyn Fn(WaEvent) + Send + Sync>;

/// Why a send was not written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// No live, logged-in connection right now: nothing was written; try again later.
    #[error("not connected")]
    NotConnected,
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
    /// Writes a text to the connection and resolves once it is written. The server's verdict
    /// comes later as [`WaEvent::ServerAck`] (possibly before this returns), or never if the
    /// connection drops first. Sending an id again is a resend of the same message.
    async fn send_text(&self, msg: OutboundText) -> Result<(), SendError>;
    /// Shows or clears "typing…" in a chat.
    async fn send_typing(&self, chat: &Jid, typing: bool) -> Result<(), SendError>;
    /// Marks messages of a chat as read; in a group, `sender` is the member who wrote them.
    async fn mark_read(
        &self,
        chat: &Jid,
        sender: Option<&Jid>,
        ids: &[MessageId],
    ) -> Result<(), SendError>;
    /// Acknowledges inbound messages once they are committed (one or a batch); what stays
    /// unacknowledged is redelivered at the next login, and a live connection that owes acks
    /// for too long is recycled by the server.
    fn ack(&self, messages: &[MessageKey]);
    /// Asks for a pair code besides the QR codes; it arrives as [`WaEvent::PairCode`]. Refused
    /// while one is outstanding or once paired.
    async fn request_pair_code(&self) -> Result<(), TransportError>;
    /// Unlinks this device from the account; works offline too. [`WaEvent::LoggedOut`] follows.
    async fn logout(&self) -> Result<(), TransportError>;
    /// Closes the connection and ends the loop; no event follows.
    async fn shutdown(&self);
    /// Connection counters.
    fn stats(&self) -> SessionStats;
}
