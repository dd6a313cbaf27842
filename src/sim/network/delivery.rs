//! Delivery both ways. Inbound: every message stays owed until the client acknowledges it; at
//! each login the offline queue (owed messages, then queued receipts, all marked `offline`) is
//! drained before `OfflineSyncCompleted` and `Connected`; a live connection that owes an ack for
//! longer than `ack_owed_limit` is recycled; an undecryptable message is resent, readable, when
//! the client asks. Outbound: a send is taken or refused by a server ack (rate-overlimit past
//! the account's limit, and a temporary ban for ignoring that); the sending device gets no copy.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Weak;
use std::time::Duration;

use switchboard_actors::ids::{Jid, PhoneNumber};
use switchboard_actors::transport::{AckError, InboundMessage, MessageId, MessageKey};
use tokio::time::Instant;

use super::{Inner, Network, SimConfig, State};
use crate::sim::ledger::Outbound;
use crate::sim::wire::ServerFrame;

/// An inbound message the client has not acknowledged.
struct Owed {
    msg: InboundMessage,
    /// Still to arrive undecryptable first (the `undecryptable` fault).
    undecryptable: bool,
    /// When it was last delivered on the live connection; `None` while it waits for a login.
    delivered_at: Option<Instant>,
}

/// An account's owed messages, in order, found by key in O(log n) (a busy account may owe
/// thousands).
#[derive(Default)]
pub(super) struct Inbox {
    next: u64,
    order: BTreeMap<u64, Owed>,
    index: HashMap<MessageKey, u64>,
}

impl Inbox {
    /// Adds `msg` unless it is owed already; returns its place.
    pub(super) fn push(&mut self, msg: InboundMessage, undecryptable: bool) -> Option<u64> {
        let key = msg.key();
        if self.index.contains_key(&key) {
            return None;
        }
        let seq = self.next;
        self.next += 1;
        self.index.insert(key, seq);
        self.order.insert(
            seq,
            Owed {
                msg,
                undecryptable,
                delivered_at: None,
            },
        );
        Some(seq)
    }

    fn ack(&mut self, key: &MessageKey) -> bool {
        match self.index.remove(key) {
            Some(seq) => self.order.remove(&seq).is_some(),
            None => false,
        }
    }

    /// The connection closed: nothing is on its way any more.
    pub(super) fn undelivered(&mut self) {
        for owed in self.order.values_mut() {
            owed.delivered_at = None;
        }
    }

    /// When the oldest message still owed was delivered, if it was.
    fn oldest_delivery(&self) -> Option<Instant> {
        self.order.values().next().and_then(|o| o.delivered_at)
    }
}

/// The frame that delivers `owed` now.
fn frame_of(owed: &mut Owed, offline: bool, now: Instant) -> ServerFrame {
    owed.delivered_at = Some(now);
    if owed.undecryptable {
        return ServerFrame::Undecryptable {
            chat: owed.msg.chat.clone(),
            sender: owed.msg.sender.clone(),
            id: owed.msg.id.clone(),
            offline,
        };
    }
    let mut message = owed.msg.clone();
    message.offline = offline;
    ServerFrame::Message { message }
}

/// An account's send limit: a token bucket, and the refusals that lead to a ban.
pub(super) struct SendLimiter {
    tokens: f64,
    refilled: Instant,
    overlimits: VecDeque<Instant>,
}

/// What the limiter says of one send.
enum Verdict {
    Take,
    Refuse { ban: bool },
}

impl SendLimiter {
    pub(super) fn new(now: Instant, burst: u32) -> Self {
        Self {
            tokens: f64::from(burst),
            refilled: now,
            overlimits: VecDeque::new(),
        }
    }

    fn check(&mut self, now: Instant, cfg: &SimConfig) -> Verdict {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * cfg.send_per_second).min(f64::from(cfg.send_burst));
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Verdict::Take;
        }
        self.overlimits.push_back(now);
        while self
            .overlimits
            .front()
            .is_some_and(|t| now - *t > Duration::from_secs(60))
        {
            self.overlimits.pop_front();
        }
        Verdict::Refuse {
            ban: self.overlimits.len() >= cfg.ban_after_overlimits,
        }
    }
}

/// A send as the client wrote it.
pub(super) struct Send {
    pub(super) id: MessageId,
    pub(super) to: Jid,
    pub(super) text: String,
    pub(super) reply_to: Option<MessageId>,
    pub(super) reply_to_sender: Option<Jid>,
}

impl Network {
    /// Logs `conn` in: announces the offline queue, drains it, then reports the sync and
    /// `Connected`.
    pub(super) fn login(&self, st: &mut State, conn: u64) {
        let Some(c) = st.conns.get_mut(&conn) else {
            return;
        };
        c.authenticated = true;
        let number = c.number.clone();
        let now = Instant::now();
        let (mut frames, receipts) = match st.accounts.get_mut(&number) {
            Some(acct) => {
                let frames: Vec<ServerFrame> = acct
                    .inbox
                    .order
                    .values_mut()
                    .map(|owed| frame_of(owed, true, now))
                    .collect();
                (frames, acct.receipts.take_queued())
            }
            None => (Vec::new(), Vec::new()),
        };
        let messages = frames.len();
        frames.extend(
            receipts
                .into_iter()
                .map(|receipt| ServerFrame::Receipt { receipt }),
        );
        let count = frames.len();
        self.send(
            st,
            conn,
            ServerFrame::OfflineSyncPreview {
                total: count,
                messages,
            },
        );
        for frame in frames {
            self.send(st, conn, frame);
        }
        self.send(st, conn, ServerFrame::OfflineSyncCompleted { count });
        self.send(st, conn, ServerFrame::Connected);
        self.inner.watchdog.get_or_init(|| {
            tokio::spawn(recycle_owing(std::sync::Arc::downgrade(&self.inner)));
        });
    }

    /// Delivers the owed message at `seq` on the live connection, if there is one.
    pub(super) fn deliver_live(&self, st: &mut State, number: &PhoneNumber, seq: u64) {
        let Some(conn) = Self::online(st, number) else {
            return;
        };
        let now = Instant::now();
        let frame = st
            .accounts
            .get_mut(number)
            .and_then(|a| a.inbox.order.get_mut(&seq))
            .map(|owed| frame_of(owed, false, now));
        if let Some(frame) = frame {
            self.send(st, conn, frame);
        }
    }

    pub(super) fn acked(&self, st: &mut State, number: &PhoneNumber, keys: &[MessageKey]) {
        let at_ms = self.now_ms();
        for key in keys {
            let owed = st
                .accounts
                .get_mut(number)
                .is_some_and(|a| a.inbox.ack(key));
            if owed {
                st.ledger.inbound_acked(at_ms, number, key);
            }
        }
    }

    /// The client could not decrypt a message and asked for it again: the contact's device
    /// resends it, readable, with the same id.
    pub(super) fn resend_decryptable(
        &self,
        st: &mut State,
        number: &PhoneNumber,
        conn: u64,
        chat: &Jid,
        sender: &Jid,
        id: &MessageId,
    ) {
        let key = MessageKey {
            chat: chat.clone(),
            sender: sender.clone(),
            id: id.clone(),
        };
        let now = Instant::now();
        let Some(inbox) = st.accounts.get_mut(number).map(|a| &mut a.inbox) else {
            return;
        };
        let Some(owed) = inbox.index.get(&key).and_then(|s| inbox.order.get_mut(s)) else {
            return;
        };
        if !owed.undecryptable {
            return;
        }
        owed.undecryptable = false;
        let frame = frame_of(owed, false, now);
        self.send(st, conn, frame);
    }

    /// The server's side of a send: refused by a fault or the rate limit, or taken, acked and
    /// on its way to the contact (whose receipts follow).
    pub(super) fn accept_send(&self, st: &mut State, number: &PhoneNumber, conn: u64, send: Send) {
        let now = Instant::now();
        let at_ms = self.now_ms();
        let cfg = &self.inner.config;
        let Some(acct) = st.accounts.get_mut(number) else {
            return;
        };
        if let Some(code) = acct.faults.ack_error(now) {
            let error = AckError {
                code,
                text: "not-delivered".to_owned(),
            };
            return self.refuse(st, number, conn, send.id, error, false);
        }
        if let Verdict::Refuse { ban } = acct.limiter.check(now, cfg) {
            if ban {
                acct.banned_until = Some(now + cfg.ban_duration);
            }
            let error = AckError {
                code: AckError::RATE_OVERLIMIT,
                text: "rate-overlimit".to_owned(),
            };
            return self.refuse(st, number, conn, send.id, error, ban);
        }
        let swallow = acct.faults.swallows_acks(now);
        let sent = Outbound {
            connection: conn,
            id: &send.id,
            to: &send.to,
            text: &send.text,
            reply_to: send.reply_to.as_ref(),
            reply_to_sender: send.reply_to_sender.as_ref(),
        };
        st.ledger.outbound(at_ms, number, sent);
        if !swallow {
            st.ledger.ack_sent(at_ms, number, &send.id, None);
            let frame = ServerFrame::Ack {
                id: send.id.clone(),
                error: None,
            };
            self.send(st, conn, frame);
        }
        self.schedule_receipts(st, now, number, &send.to, &send.id);
    }

    fn refuse(
        &self,
        st: &mut State,
        number: &PhoneNumber,
        conn: u64,
        id: MessageId,
        error: AckError,
        ban: bool,
    ) {
        let at_ms = self.now_ms();
        st.ledger.ack_sent(at_ms, number, &id, Some(&error));
        self.send(
            st,
            conn,
            ServerFrame::Ack {
                id,
                error: Some(error),
            },
        );
        if ban {
            st.ledger.banned();
            self.drop_connection(st, conn, "banned");
        }
    }
}

/// Recycles every live connection whose oldest owed message was delivered more than
/// `ack_owed_limit` ago, as WhatsApp restarts a stream whose client owes it acks (the owed
/// messages are redelivered at the next login). Ends with the network.
async fn recycle_owing(network: Weak<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = network.upgrade() else {
            return;
        };
        let network = Network { inner };
        let limit = network.inner.config.ack_owed_limit;
        let now = Instant::now();
        let mut st = network.lock();
        let owing: Vec<u64> = st
            .accounts
            .iter()
            .filter(|(_, a)| {
                a.inbox
                    .oldest_delivery()
                    .is_some_and(|t| now.saturating_duration_since(t) > limit)
            })
            .filter_map(|(n, _)| Network::online(&st, n))
            .collect();
        for conn in owing {
            network.drop_connection(&mut st, conn, "ack_owed");
        }
    }
}
