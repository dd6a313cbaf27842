//! The referee's ledger: every inbound offer and ack, every outbound message, every connection,
//! and the totals of `GET /ledger/summary` kept up to date as events arrive.

use std::collections::{HashMap, HashSet};

use serde::Serialize;
use switchboard_actors::ids::{Jid, PhoneNumber};
use switchboard_actors::transport::{AckError, MessageId, MessageKey};

/// How long after its own connection was replaced a client label's reconnect counts as
/// ping-pong.
const PING_PONG_WINDOW_MS: u64 = 60_000;

/// One recorded event of an account.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum LedgerEvent {
    /// A contact sent a message to the account.
    InboundOffered {
        /// Milliseconds since the network started.
        at_ms: u64,
        /// Message id.
        id: MessageId,
        /// Chat.
        chat: Jid,
        /// Sender.
        from: Jid,
    },
    /// A person sent a message from the account's phone.
    PhoneSent {
        /// Milliseconds since the network started.
        at_ms: u64,
        /// Message id.
        id: MessageId,
        /// Chat.
        chat: Jid,
        /// The text.
        text: String,
    },
    /// The account's client acknowledged it (first time only).
    InboundAcknowledged {
        /// Milliseconds since the network started.
        at_ms: u64,
        /// Message id.
        id: MessageId,
        /// Chat.
        chat: Jid,
    },
    /// The account sent a message.
    OutboundReceived {
        /// Milliseconds since the network started.
        at_ms: u64,
        /// Sender-chosen id.
        id: MessageId,
        /// Recipient chat.
        to: Jid,
        /// The text.
        text: String,
        /// The inbound message it answers.
        reply_to: Option<MessageId>,
        /// The connection it came on.
        connection: u64,
        /// A send of an id the network had already taken: the contact sees nothing new.
        resend: bool,
    },
    /// The server answered a send.
    AckSent {
        /// Milliseconds since the network started.
        at_ms: u64,
        /// Sender-chosen id.
        id: MessageId,
        /// Why the send was refused (`None`: taken).
        error: Option<AckError>,
    },
    /// A connection was opened.
    ConnectionOpened {
        /// Milliseconds since the network started.
        at_ms: u64,
        /// Connection id.
        connection: u64,
        /// The client label (node id).
        client: String,
    },
    /// A connection was closed.
    ConnectionClosed {
        /// Milliseconds since the network started.
        at_ms: u64,
        /// Connection id.
        connection: u64,
        /// The client label (node id).
        client: String,
        /// Why.
        reason: String,
    },
}

/// The referee's totals.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Summary {
    /// Accounts created.
    pub accounts: u64,
    /// Inbound messages offered.
    pub inbound: u64,
    /// Inbound messages acknowledged by a client.
    pub inbound_acked: u64,
    /// Inbound messages no outbound message names in `reply_to`.
    pub inbound_unanswered: u64,
    /// Distinct outbound messages the contacts received (one per sender and id).
    pub outbound: u64,
    /// Kept for revision 1 readers: equals `resent_same_id`.
    pub duplicate_outbound_ids: u64,
    /// Inbound messages answered by more than one distinct outbound id.
    pub duplicate_replies: u64,
    /// Sends of an id the network had already taken (harmless to the contact; each is a send
    /// the node could not settle).
    pub resent_same_id: u64,
    /// Distinct outbound messages with the text and `reply_to` of one already received: a
    /// repeat the contact would see.
    pub shown_twice: u64,
    /// Sends answered with an error ack.
    pub ack_errors: u64,
    /// Messages sent from the accounts' phones.
    pub phone_sent: u64,
    /// Connections closed because the account connected elsewhere.
    pub stream_replaced: u64,
    /// Reconnects of a client label within 60 s of its own connection being replaced.
    pub replaced_then_reconnected: u64,
    /// Sends refused with rate-overlimit (error ack 429).
    pub rate_overlimit: u64,
    /// Connections opened.
    pub connections: u64,
    /// Connect attempts that failed silently.
    pub connect_failures: u64,
    /// Temporary bans issued.
    pub bans: u64,
}

/// Account, chat, sender, id: what identifies an inbound message.
type InboundKey = (PhoneNumber, Jid, Jid, MessageId);

/// What the ledger knows of one inbound message, found with one lookup.
#[derive(Debug, Default)]
struct Inbound {
    offered: bool,
    acked: bool,
    /// Distinct outbound ids naming it in `reply_to`.
    replies: Vec<MessageId>,
}

/// An outbound message as the network took it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Outbound<'a> {
    /// The connection it came on.
    pub(crate) connection: u64,
    /// Sender-chosen id.
    pub(crate) id: &'a MessageId,
    /// The chat.
    pub(crate) to: &'a Jid,
    /// The text.
    pub(crate) text: &'a str,
    /// The inbound message it quotes.
    pub(crate) reply_to: Option<&'a MessageId>,
    /// Who wrote the quoted message, where the chat does not say it.
    pub(crate) reply_to_sender: Option<&'a Jid>,
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The ledger.
#[derive(Debug, Default)]
pub struct Ledger {
    events: HashMap<PhoneNumber, Vec<LedgerEvent>>,
    summary: Summary,
    inbound: HashMap<InboundKey, Inbound>,
    /// Offered inbound messages with at least one reply (kept as replies arrive, so the
    /// summary is O(1) however long the run).
    answered: u64,
    outbound_ids: HashSet<(PhoneNumber, MessageId)>,
    /// (account, chat, quoted message, hash of the text) of every distinct outbound message
    /// that quotes one: a second distinct id with the same is shown twice.
    shown: HashSet<(PhoneNumber, Jid, MessageId, u64)>,
    /// (account, client label) → when that label's connection was last replaced.
    replaced_at: HashMap<(PhoneNumber, String), u64>,
}

impl Ledger {
    /// The totals.
    pub fn summary(&self) -> Summary {
        Summary {
            inbound_unanswered: self.summary.inbound - self.answered,
            ..self.summary.clone()
        }
    }

    /// Every event of `number`, oldest first.
    pub fn events(&self, number: &PhoneNumber) -> Vec<LedgerEvent> {
        self.events.get(number).cloned().unwrap_or_default()
    }

    pub(crate) fn account_created(&mut self, number: &PhoneNumber) {
        self.summary.accounts += 1;
        self.events.entry(number.clone()).or_default();
    }

    /// Records an offer; false if (account, chat, id) was offered before.
    pub(crate) fn inbound_offered(
        &mut self,
        at_ms: u64,
        number: &PhoneNumber,
        chat: &Jid,
        from: &Jid,
        id: &MessageId,
    ) -> bool {
        let entry = self
            .inbound
            .entry((number.clone(), chat.clone(), from.clone(), id.clone()))
            .or_default();
        if entry.offered {
            return false;
        }
        entry.offered = true;
        self.summary.inbound += 1;
        self.push(
            number,
            LedgerEvent::InboundOffered {
                at_ms,
                id: id.clone(),
                chat: chat.clone(),
                from: from.clone(),
            },
        );
        true
    }

    pub(crate) fn inbound_acked(&mut self, at_ms: u64, number: &PhoneNumber, key: &MessageKey) {
        let MessageKey { chat, sender, id } = key;
        let key = (number.clone(), chat.clone(), sender.clone(), id.clone());
        let first = self
            .inbound
            .get_mut(&key)
            .is_some_and(|m| m.offered && !std::mem::replace(&mut m.acked, true));
        if first {
            self.summary.inbound_acked += 1;
            self.push(
                number,
                LedgerEvent::InboundAcknowledged {
                    at_ms,
                    id: id.clone(),
                    chat: chat.clone(),
                },
            );
        }
    }

    /// Records a send the network took; a repeat of an id counts as a resend only.
    pub(crate) fn outbound(&mut self, at_ms: u64, number: &PhoneNumber, sent: Outbound<'_>) {
        let resend = !self.outbound_ids.insert((number.clone(), sent.id.clone()));
        if resend {
            self.summary.resent_same_id += 1;
            self.summary.duplicate_outbound_ids += 1;
        } else {
            self.summary.outbound += 1;
            if let Some(inbound) = sent.reply_to {
                self.reply(number, &sent, inbound);
            }
        }
        self.push(
            number,
            LedgerEvent::OutboundReceived {
                at_ms,
                id: sent.id.clone(),
                to: sent.to.clone(),
                text: sent.text.to_owned(),
                reply_to: sent.reply_to.cloned(),
                connection: sent.connection,
                resend,
            },
        );
    }

    /// A new outbound message quotes `inbound`: pairs them, and counts a second answer or a
    /// repeated text.
    fn reply(&mut self, number: &PhoneNumber, sent: &Outbound<'_>, inbound: &MessageId) {
        let quoted_sender = sent.reply_to_sender.unwrap_or(sent.to);
        let key = (
            number.clone(),
            sent.to.clone(),
            quoted_sender.clone(),
            inbound.clone(),
        );
        let m = self.inbound.entry(key).or_default();
        if m.replies.is_empty() && m.offered {
            self.answered += 1;
        }
        if !m.replies.contains(sent.id) {
            m.replies.push(sent.id.clone());
            if m.replies.len() == 2 {
                self.summary.duplicate_replies += 1;
            }
        }
        let text = fnv(sent.text.as_bytes());
        if !self
            .shown
            .insert((number.clone(), sent.to.clone(), inbound.clone(), text))
        {
            self.summary.shown_twice += 1;
        }
    }

    /// Records the server's answer to a send.
    pub(crate) fn ack_sent(
        &mut self,
        at_ms: u64,
        number: &PhoneNumber,
        id: &MessageId,
        error: Option<&AckError>,
    ) {
        if let Some(e) = error {
            self.summary.ack_errors += 1;
            if e.is_rate_limit() {
                self.summary.rate_overlimit += 1;
            }
        }
        self.push(
            number,
            LedgerEvent::AckSent {
                at_ms,
                id: id.clone(),
                error: error.cloned(),
            },
        );
    }

    /// Records a message sent from the account's phone.
    pub(crate) fn phone_sent(
        &mut self,
        at_ms: u64,
        number: &PhoneNumber,
        chat: &Jid,
        id: &MessageId,
        text: &str,
    ) {
        self.summary.phone_sent += 1;
        self.push(
            number,
            LedgerEvent::PhoneSent {
                at_ms,
                id: id.clone(),
                chat: chat.clone(),
                text: text.to_owned(),
            },
        );
    }

    pub(crate) fn connection_opened(
        &mut self,
        at_ms: u64,
        number: &PhoneNumber,
        connection: u64,
        client: &str,
    ) {
        self.summary.connections += 1;
        let key = (number.clone(), client.to_owned());
        if let Some(replaced) = self.replaced_at.get(&key)
            && at_ms.saturating_sub(*replaced) < PING_PONG_WINDOW_MS
        {
            self.summary.replaced_then_reconnected += 1;
        }
        self.push(
            number,
            LedgerEvent::ConnectionOpened {
                at_ms,
                connection,
                client: client.to_owned(),
            },
        );
    }

    pub(crate) fn connection_closed(
        &mut self,
        at_ms: u64,
        number: &PhoneNumber,
        connection: u64,
        client: &str,
        reason: &str,
    ) {
        if reason == "stream_replaced" {
            self.summary.stream_replaced += 1;
            self.replaced_at
                .insert((number.clone(), client.to_owned()), at_ms);
        }
        self.push(
            number,
            LedgerEvent::ConnectionClosed {
                at_ms,
                connection,
                client: client.to_owned(),
                reason: reason.to_owned(),
            },
        );
    }

    pub(crate) fn connect_failed(&mut self) {
        self.summary.connect_failures += 1;
    }

    pub(crate) fn banned(&mut self) {
        self.summary.bans += 1;
    }

    fn push(&mut self, number: &PhoneNumber, event: LedgerEvent) {
        self.events.entry(number.clone()).or_default().push(event);
    }
}
