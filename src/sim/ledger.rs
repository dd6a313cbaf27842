//! The referee's ledger: every inbound offer and ack, every outbound message, every connection,
//! and the totals of `GET /ledger/summary` kept up to date as events arrive.

use std::collections::{HashMap, HashSet};

use serde::Serialize;
use switchboard_actors::ids::{Jid, PhoneNumber};
use switchboard_actors::transport::MessageId;

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
    },
    /// A send was refused with rate-overlimit.
    RateOverlimit {
        /// Milliseconds since the network started.
        at_ms: u64,
        /// Sender-chosen id.
        id: MessageId,
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
    /// Outbound messages received (repeats included).
    pub outbound: u64,
    /// Receptions of an outbound id already received.
    pub duplicate_outbound_ids: u64,
    /// Inbound messages answered by more than one distinct outbound id.
    pub duplicate_replies: u64,
    /// Connections closed because the account connected elsewhere.
    pub stream_replaced: u64,
    /// Reconnects of a client label within 60 s of its own connection being replaced.
    pub replaced_then_reconnected: u64,
    /// Sends refused with rate-overlimit.
    pub rate_overlimit: u64,
    /// Connections opened.
    pub connections: u64,
    /// Connect attempts that failed silently.
    pub connect_failures: u64,
    /// Temporary bans issued.
    pub bans: u64,
}

type InboundKey = (PhoneNumber, Jid, MessageId);

/// What the ledger knows of one inbound message (account, chat, id), found with one lookup.
#[derive(Debug, Default)]
struct Inbound {
    offered: bool,
    acked: bool,
    /// Distinct outbound ids naming it in `reply_to`.
    replies: Vec<MessageId>,
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
            .entry((number.clone(), chat.clone(), id.clone()))
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

    pub(crate) fn inbound_acked(
        &mut self,
        at_ms: u64,
        number: &PhoneNumber,
        chat: &Jid,
        id: &MessageId,
    ) {
        let key = (number.clone(), chat.clone(), id.clone());
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

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn outbound(
        &mut self,
        at_ms: u64,
        number: &PhoneNumber,
        connection: u64,
        id: &MessageId,
        to: &Jid,
        text: &str,
        reply_to: Option<&MessageId>,
    ) {
        self.summary.outbound += 1;
        if !self.outbound_ids.insert((number.clone(), id.clone())) {
            self.summary.duplicate_outbound_ids += 1;
        }
        if let Some(inbound) = reply_to {
            let key = (number.clone(), to.clone(), inbound.clone());
            let m = self.inbound.entry(key).or_default();
            if m.replies.is_empty() && m.offered {
                self.answered += 1;
            }
            if !m.replies.contains(id) {
                m.replies.push(id.clone());
                if m.replies.len() == 2 {
                    self.summary.duplicate_replies += 1;
                }
            }
        }
        self.push(
            number,
            LedgerEvent::OutboundReceived {
                at_ms,
                id: id.clone(),
                to: to.clone(),
                text: text.to_owned(),
                reply_to: reply_to.cloned(),
                connection,
            },
        );
    }

    pub(crate) fn rate_overlimit(&mut self, at_ms: u64, number: &PhoneNumber, id: &MessageId) {
        self.summary.rate_overlimit += 1;
        self.push(
            number,
            LedgerEvent::RateOverlimit {
                at_ms,
                id: id.clone(),
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
