//! Receipts: the contact's device reports each message delivered (50–400 ms after the server
//! took it) and read (0.5–5 s later). A receipt for a client that is offline is queued and
//! delivered at its next login, merged into lists; a contact that is offline (the
//! `contact_offline` fault) withholds its receipts and sends them together when it is back.
//!
//! One task per network delivers them in time order (queue order among equal times) and ends
//! with the network, so a network torn down costs nothing afterwards.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Arc, Weak};

use rand::Rng;
use switchboard_actors::ids::{Jid, PhoneNumber};
use switchboard_actors::transport::{MessageId, Receipt, ReceiptKind};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Inner, Network, State, sleep_until};
use crate::sim::wire::ServerFrame;

/// Something the receipt task does at a time.
pub(super) enum Due {
    /// The contact's device reports `id` delivered or read.
    Receipt {
        at: Instant,
        number: PhoneNumber,
        chat: Jid,
        id: MessageId,
        kind: ReceiptKind,
    },
    /// The account's contacts are back online: release what they withheld.
    Release { at: Instant, number: PhoneNumber },
}

impl Due {
    fn at(&self) -> Instant {
        match self {
            Self::Receipt { at, .. } | Self::Release { at, .. } => *at,
        }
    }
}

/// One account's receipts that wait.
#[derive(Debug, Default)]
pub(super) struct Receipts {
    /// For the client's next login, in order.
    queued: Vec<Receipt>,
    /// Withheld by offline contacts.
    withheld: Vec<(Jid, ReceiptKind, MessageId)>,
}

impl Receipts {
    /// The queued receipts, one per chat and kind with every id, marked offline.
    pub(super) fn take_queued(&mut self) -> Vec<Receipt> {
        let mut merged: Vec<Receipt> = Vec::new();
        let mut at: HashMap<(Jid, Option<Jid>, ReceiptKind), usize> = HashMap::new();
        for r in self.queued.drain(..) {
            let key = (r.chat.clone(), r.sender.clone(), r.kind);
            match at.get(&key) {
                Some(&i) => merged[i].ids.extend(r.ids),
                None => {
                    at.insert(key, merged.len());
                    merged.push(Receipt { offline: true, ..r });
                }
            }
        }
        merged
    }
}

impl Network {
    /// Schedules the delivered and read receipts of a send the server took now.
    pub(super) fn schedule_receipts(
        &self,
        st: &mut State,
        now: Instant,
        number: &PhoneNumber,
        chat: &Jid,
        id: &MessageId,
    ) {
        let cfg = &self.inner.config;
        let (lo, hi) = cfg.delivery_delay;
        let delivered = st.rng.random_range(lo..=hi);
        let (lo, hi) = cfg.read_delay;
        let read = delivered + st.rng.random_range(lo..=hi);
        for (after, kind) in [
            (delivered, ReceiptKind::Delivered),
            (read, ReceiptKind::Read),
        ] {
            self.queue_due(Due::Receipt {
                at: now + after,
                number: number.clone(),
                chat: chat.clone(),
                id: id.clone(),
                kind,
            });
        }
    }

    /// Releases `number`'s withheld receipts at `at`.
    pub(super) fn release_receipts_at(&self, at: Instant, number: &PhoneNumber) {
        self.queue_due(Due::Release {
            at,
            number: number.clone(),
        });
    }

    fn queue_due(&self, due: Due) {
        let tx = self.inner.receipts.get_or_init(|| {
            // Two receipts per send the network took, and sends are rate-limited per account.
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(run(Arc::downgrade(&self.inner), rx));
            tx
        });
        let _ = tx.send(due);
    }

    fn on_due(&self, due: Due) {
        let mut st = self.lock();
        let now = Instant::now();
        match due {
            Due::Receipt {
                number,
                chat,
                id,
                kind,
                ..
            } => {
                let Some(acct) = st.accounts.get_mut(&number) else {
                    return;
                };
                if acct.faults.contact_offline(now) {
                    acct.receipts.withheld.push((chat, kind, id));
                    return;
                }
                let receipt = Receipt {
                    chat,
                    sender: None,
                    ids: vec![id],
                    kind,
                    offline: false,
                };
                self.deliver_receipt(&mut st, &number, receipt);
            }
            Due::Release { number, .. } => {
                let Some(acct) = st.accounts.get_mut(&number) else {
                    return;
                };
                if acct.faults.contact_offline(now) {
                    return; // the fault was extended; a later release follows
                }
                let mut lists: Vec<Receipt> = Vec::new();
                for (chat, kind, id) in std::mem::take(&mut acct.receipts.withheld) {
                    match lists.iter_mut().find(|r| r.chat == chat && r.kind == kind) {
                        Some(r) => r.ids.push(id),
                        None => lists.push(Receipt {
                            chat,
                            sender: None,
                            ids: vec![id],
                            kind,
                            offline: false,
                        }),
                    }
                }
                for receipt in lists {
                    self.deliver_receipt(&mut st, &number, receipt);
                }
            }
        }
    }

    /// Sends `receipt` on the live connection, or queues it for the next login.
    fn deliver_receipt(&self, st: &mut State, number: &PhoneNumber, receipt: Receipt) {
        match Self::online(st, number) {
            Some(conn) => self.send(st, conn, ServerFrame::Receipt { receipt }),
            None => {
                if let Some(acct) = st.accounts.get_mut(number) {
                    acct.receipts.queued.push(receipt);
                }
            }
        }
    }
}

async fn run(network: Weak<Inner>, mut rx: mpsc::UnboundedReceiver<Due>) {
    let mut due: BinaryHeap<Reverse<(Instant, u64)>> = BinaryHeap::new();
    let mut waiting: HashMap<u64, Due> = HashMap::new();
    let mut seq = 0_u64;
    loop {
        let next = due.peek().map(|Reverse((at, _))| *at);
        tokio::select! {
            queued = rx.recv() => {
                let Some(d) = queued else { return };
                seq += 1;
                due.push(Reverse((d.at(), seq)));
                waiting.insert(seq, d);
            }
            () = sleep_until(next) => {
                let Some(inner) = network.upgrade() else { return };
                let network = Network { inner };
                let now = Instant::now();
                while let Some(Reverse((at, key))) = due.peek().copied() {
                    if at > now {
                        break;
                    }
                    due.pop();
                    if let Some(d) = waiting.remove(&key) {
                        network.on_due(d);
                    }
                }
            }
        }
    }
}
