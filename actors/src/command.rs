//! Operator commands to one number, wherever it runs: restart it, log it out, send a message as
//! the business.
//!
//! A node applies a command to a number it runs through
//! [`Commands::run`](crate::fleet::Commands::run):
//! the fleet restarts the number itself, and hands a logout or a send to the number's actor. A
//! send goes through the outbox and the number's pacer like every reply; its message id comes
//! from the caller's idempotency key ([`MessageId::for_key`]), so a send asked again with the
//! same key is queued once. In a cluster
//! the command is routed to the node holding the number's lease (the bus on Redis Streams in
//! the service), which answers with the outcome; when no live node holds the lease, or the
//! owner does not answer in time, the caller gets a [`CommandError`] saying so.

use std::fmt;
use std::time::Duration;

use crate::ids::{Jid, PhoneNumber};
use crate::transport::{MessageId, OutboundText};

/// The longest text a send may carry (WhatsApp's own limit is 65,536 characters).
pub const MAX_TEXT: usize = 4096;

/// The longest idempotency key a send may carry.
pub const MAX_KEY: usize = 255;

/// A message to send as the business.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BusinessSend {
    /// The chat: a contact or a group.
    pub to: Jid,
    /// The text.
    pub text: String,
    /// The caller's idempotency key: the same key is the same message.
    pub key: String,
}

impl BusinessSend {
    /// Checks a send's parts, naming the one at fault.
    pub fn new(to: &str, text: &str, key: &str) -> Result<Self, CommandError> {
        let to = Jid::parse(to).map_err(|e| {
            CommandError::Invalid(format!(
                "to: {e} (expected user@s.whatsapp.net, id@lid or id@g.us)"
            ))
        })?;
        if text.trim().is_empty() {
            return Err(CommandError::Invalid("text: empty".to_owned()));
        }
        if text.chars().count() > MAX_TEXT {
            return Err(CommandError::Invalid(format!(
                "text: longer than {MAX_TEXT} characters"
            )));
        }
        if key.is_empty() || key.len() > MAX_KEY || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(CommandError::Invalid(format!(
                "key: 1 to {MAX_KEY} printable ASCII characters without spaces"
            )));
        }
        Ok(Self {
            to,
            text: text.to_owned(),
            key: key.to_owned(),
        })
    }

    /// The outbound message `number` sends for it.
    pub fn outbound(&self, number: &PhoneNumber) -> OutboundText {
        OutboundText {
            id: MessageId::for_key(number, &self.key),
            to: self.to.clone(),
            text: self.text.clone(),
            reply_to: None,
            reply_to_sender: None,
        }
    }
}

/// What an operator can ask of a running number.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NumberCommand {
    /// A fresh start: its actor stops and starts again (a new session with the stored
    /// credentials), its restart budget and any parking forgotten. Ownership is kept.
    Restart,
    /// Unlinks the device from the account: the stored session is cleared and the number waits
    /// to be paired again.
    Logout,
    /// Sends a message as the business, through the outbox and the number's pacing.
    Send(BusinessSend),
    /// Asks WhatsApp for a pair code (to type on the phone) besides the QR codes; it shows in
    /// the number's status when it arrives. Only while pairing.
    PairCode,
}

impl NumberCommand {
    /// Its name on the wire and in logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Restart => "restart",
            Self::Logout => "logout",
            Self::Send(_) => "send",
            Self::PairCode => "pair_code",
        }
    }
}

impl fmt::Display for NumberCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Done {
    /// Restarted, or logged out.
    Done,
    /// The message is in the outbox with this id, to be sent in turn. `repeat`: the key was
    /// seen before, and nothing new was queued.
    Queued {
        /// Its message id.
        id: MessageId,
        /// The key had been used before, for the same message.
        repeat: bool,
    },
}

impl fmt::Display for Done {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Done => f.write_str("done"),
            Self::Queued { id, repeat: false } => write!(f, "queued as {id}"),
            Self::Queued { id, repeat: true } => write!(f, "already queued as {id}"),
        }
    }
}

/// Why a command was not carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// No node holds the number's lease: it is not running anywhere (not started yet, parked,
    /// or between owners).
    #[error("no node runs {0}")]
    NoOwner(PhoneNumber),
    /// The lease names a node that is not live (it died and its lease has not expired yet).
    #[error("{number} is held by {node}, which is not live")]
    OwnerGone {
        /// The number.
        number: PhoneNumber,
        /// The node its lease names.
        node: String,
    },
    /// The owner did not answer in time; the command may still be carried out.
    #[error("{node} did not answer within {after:?}; the command may still be carried out")]
    Timeout {
        /// The owner.
        node: String,
        /// How long the caller waited.
        after: Duration,
    },
    /// The number does not run on the node asked (it moved meanwhile).
    #[error("{0} does not run on this node")]
    NotHere(PhoneNumber),
    /// The cluster's store of commands, or the number's store, cannot be reached.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The command itself is wrong: the message names the part at fault.
    #[error("{0}")]
    Invalid(String),
    /// The idempotency key was used before for a different message.
    #[error("the idempotency key was used before for a different message")]
    KeyReused,
    /// The number could not do it.
    #[error("{0}")]
    Failed(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_send_names_the_part_at_fault_and_its_id_follows_its_key() {
        let n = PhoneNumber::parse("+15550001").expect("valid");
        let ok = BusinessSend::new("15550002@s.whatsapp.net", "hello", "order-1").expect("valid");
        let again = BusinessSend::new("15550002@s.whatsapp.net", "hello", "order-1").expect("ok");
        let other = BusinessSend::new("15550002@s.whatsapp.net", "hello", "order-2").expect("ok");
        assert_eq!(ok.outbound(&n).id, again.outbound(&n).id);
        assert_ne!(ok.outbound(&n).id, other.outbound(&n).id);
        let on_other_number = PhoneNumber::parse("+15550009").expect("valid");
        assert_ne!(ok.outbound(&n).id, ok.outbound(&on_other_number).id);
        for (to, text, key, field) in [
            ("15550002", "hi", "k", "to:"),
            ("15550002@s.whatsapp.net", " ", "k", "text:"),
            (
                "15550002@s.whatsapp.net",
                &"x".repeat(MAX_TEXT + 1),
                "k",
                "text:",
            ),
            ("15550002@s.whatsapp.net", "hi", "", "key:"),
            ("15550002@s.whatsapp.net", "hi", "a key", "key:"),
        ] {
            match BusinessSend::new(to, text, key) {
                Err(CommandError::Invalid(m)) => assert!(m.starts_with(field), "{m}"),
                other => panic!("{to:?} {key:?}: {other:?}"),
            }
        }
    }
}
