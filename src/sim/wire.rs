//! The frames between a simulated client and the simulated network, in both directions.
//!
//! In process they travel as values over channels; over `sim serve` each is one JSON text frame
//! of a WebSocket at `/wire`, the first being the client's [`ClientFrame::Hello`].

use serde::{Deserialize, Serialize};
use switchboard_actors::ids::{Jid, PhoneNumber};
use switchboard_actors::transport::{AckError, InboundMessage, MessageId, MessageKey, Receipt};

/// Client → network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    /// Opens the connection: who, from which node, with which device identity.
    Hello {
        /// The account.
        number: PhoneNumber,
        /// The node id, recorded in the ledger.
        label: String,
        /// The paired device identity, if any.
        credentials: Option<String>,
    },
    /// Send a text.
    Send {
        /// Sender-chosen id.
        id: MessageId,
        /// The chat.
        to: Jid,
        /// The text.
        text: String,
        /// The inbound message this answers.
        reply_to: Option<MessageId>,
        /// Who wrote the quoted message (groups).
        #[serde(default)]
        reply_to_sender: Option<Jid>,
    },
    /// Typing indicator.
    Typing {
        /// The chat.
        chat: Jid,
        /// On or off.
        on: bool,
    },
    /// Read marks.
    Read {
        /// The chat.
        chat: Jid,
        /// The group member who wrote them.
        sender: Option<Jid>,
        /// The messages.
        ids: Vec<MessageId>,
    },
    /// Inbound messages are committed on the client (one or a batch).
    Ack {
        /// The messages.
        messages: Vec<MessageKey>,
    },
    /// A message arrived undecryptable: the client asks the sender's device to resend it.
    RetryRequest {
        /// Its chat.
        chat: Jid,
        /// Its sender.
        sender: Jid,
        /// Its id.
        id: MessageId,
    },
    /// The client generated this pair code and shows it; the phone may now enter it.
    PairCode {
        /// The code.
        code: String,
    },
    /// Unlink this device.
    Logout,
}

/// Network → client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// A QR code to scan, valid for `valid_ms`.
    Qr {
        /// The payload.
        code: String,
        /// Validity in milliseconds.
        valid_ms: u64,
    },
    /// Every QR code expired; with `disconnected` the network closes the connection.
    QrExhausted {
        /// Whether the connection closes (no pair code outstanding).
        disconnected: bool,
    },
    /// Pairing done: the device identity to reconnect with. [`ServerFrame::Restart`] follows.
    PairSuccess {
        /// The device identity.
        credentials: String,
    },
    /// The server asks the client to reconnect at once (WhatsApp's stream error 515, sent after
    /// pairing); not a disconnect the client reports.
    Restart,
    /// What the offline queue holds, announced before it is drained (as whatsapp-rust reports
    /// `OfflineSyncPreview` ahead of the messages).
    OfflineSyncPreview {
        /// Everything queued.
        total: usize,
        /// Of which messages.
        messages: usize,
    },
    /// Everything queued while the client was offline has been delivered.
    OfflineSyncCompleted {
        /// How many items (messages and receipts) the offline queue held.
        count: usize,
    },
    /// Logged in and drained.
    Connected,
    /// An inbound message (from a contact, or `is_from_me` from the account's phone).
    Message {
        /// The message.
        message: InboundMessage,
    },
    /// A message that could not be decrypted; the client asks for a resend.
    Undecryptable {
        /// Its chat.
        chat: Jid,
        /// Its sender.
        sender: Jid,
        /// Its id.
        id: MessageId,
        /// From the offline queue.
        offline: bool,
    },
    /// The server's answer to a send.
    Ack {
        /// The sender's id.
        id: MessageId,
        /// Why it was refused, if it was.
        error: Option<AckError>,
    },
    /// Delivery progress of messages we sent.
    Receipt {
        /// The receipt.
        receipt: Receipt,
    },
    /// The phone unlinked the device; closing.
    LoggedOut,
    /// The account connected elsewhere; closing.
    StreamReplaced,
    /// The account is banned (login failure 402); closing.
    TemporaryBan {
        /// WhatsApp's reason code, 101–106.
        #[serde(default = "default_ban_code")]
        code: u16,
        /// Ban length in milliseconds.
        duration_ms: u64,
    },
    /// The network closes the connection (the client reconnects after its backoff).
    Closed {
        /// Why.
        reason: String,
    },
}

/// The reason code of a ban: 101, "sent too many messages to people who don't have you in their
/// address books", the one a sender that ignores rate limits earns.
pub const BAN_CODE: u16 = 101;

fn default_ban_code() -> u16 {
    BAN_CODE
}
