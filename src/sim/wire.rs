//! The frames between a simulated client and the simulated network, in both directions.
//!
//! In process they travel as values over channels; over `sim serve` each is one JSON text frame
//! of a WebSocket at `/wire`, the first being the client's [`ClientFrame::Hello`].

use serde::{Deserialize, Serialize};
use switchboard_actors::ids::{Jid, PhoneNumber};
use switchboard_actors::transport::{InboundMessage, MessageId, Receipt};

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
        /// The messages.
        ids: Vec<MessageId>,
    },
    /// An inbound message is committed on the client.
    Ack {
        /// Its chat.
        chat: Jid,
        /// Its sender.
        sender: Jid,
        /// Its id.
        id: MessageId,
    },
    /// Ask for a pair code instead of QR codes.
    PairCode,
    /// Unlink this device.
    Logout,
}

/// Why the network refused a send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// Over the account's rate limit.
    RateOverlimit,
    /// The connection is not logged in.
    NotAuthenticated,
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
    /// Every QR code expired; the network closes the connection.
    QrExhausted,
    /// A pair code to type on the phone.
    PairCode {
        /// The code.
        code: String,
    },
    /// Pairing done: the device identity to reconnect with.
    PairSuccess {
        /// The device identity.
        credentials: String,
    },
    /// Logged in.
    Connected,
    /// An inbound message (or the echo of our own send).
    Message {
        /// The message.
        message: InboundMessage,
    },
    /// Everything queued while the client was offline has been delivered.
    OfflineSyncCompleted {
        /// How many messages were delivered from the offline queue.
        count: usize,
    },
    /// A send was accepted.
    SendAck {
        /// The sender's id.
        id: MessageId,
        /// Server time.
        server_time_ms: u64,
    },
    /// A send was refused.
    SendError {
        /// The sender's id.
        id: MessageId,
        /// Why.
        error: Refusal,
    },
    /// Delivery progress of a message we sent.
    Receipt {
        /// The receipt.
        receipt: Receipt,
    },
    /// The phone unlinked the device; closing.
    LoggedOut,
    /// The account connected elsewhere; closing.
    StreamReplaced,
    /// The account is banned; closing.
    TemporaryBan {
        /// Ban length in milliseconds.
        duration_ms: u64,
    },
    /// The network closes the connection (the client may reconnect).
    Closed {
        /// Why.
        reason: String,
    },
}
