//! The pacer's bookkeeping: where each reply of a number stands on its way to the network, as
//! pure state (no I/O, no clock), so the rules are unit-tested on their own.
//!
//! A reply is in exactly one place:
//! - `queue`: to be sent, in order;
//! - `in_flight`: written on the live connection, waiting for the server's ack;
//! - `unknown`: its outcome is unknown — written on a connection that dropped before the ack,
//!   or left unsent in the outbox by an earlier owner (who may have sent it). It waits for the
//!   next login, where the offline receipts settle any it names, and is sent again (same id)
//!   only if still unsettled after a bounded wait;
//! - `settling`: the network has it (a server ack or a receipt); its sent mark is being
//!   committed;
//! - handled: sent and marked, given up, or expired — remembered (the latest
//!   [`HANDLED_MEMORY`]) so that a reply handed over again is not sent twice.
//!
//! The backlog is bounded: [`Book::expire`] takes out of the queue every reply older than the
//! age limit, and the oldest ones past the cap, for the pacer to record as expired.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use crate::transport::{AckError, MessageId, OutboundText};

/// A reply and when it was queued (its age counts from then, across retries and restarts).
#[derive(Debug, Clone)]
struct Entry {
    msg: OutboundText,
    queued_at: Instant,
}

/// Why a reply left the backlog unsent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// It waited longer than the age limit.
    Age,
    /// The backlog held more than its cap; it was the oldest.
    Cap,
}

impl Expiry {
    /// A bounded label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::Age => "age",
            Self::Cap => "cap",
        }
    }
}

/// How many message ids the book remembers as handled, so that a reply handed over again
/// ([`Book::push`] after a lost commit answer) is not sent twice. A handled reply leaves the
/// outbox's unsent rows once its sent mark commits (well under a second), so the memory only has
/// to cover the replies of that window; an account sends about one per second.
pub const HANDLED_MEMORY: usize = 256;

/// Room kept in the book's collections when it is compacted ([`Book::compact`]).
const SPARE: usize = 16;

/// Error acks (other than rate-overlimit) a reply may get before it is given up.
pub const MAX_ACK_ERRORS: u32 = 5;

/// What to do after an error ack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterError {
    /// The account is over its rate: cool down, then send it again (same id), first.
    CoolDown,
    /// Refused; send it again (same id) after a backoff.
    Retry,
    /// Refused too often: give it up with this reason.
    GiveUp(String),
    /// Not one of ours any more (settled or handled meanwhile).
    Unknown,
}

/// A reply taken from the queue to be written: [`Book::written`] or [`Book::not_written`] says
/// what became of it.
#[derive(Debug)]
pub struct Taken(Entry);

impl Taken {
    /// The reply.
    pub fn msg(&self) -> &OutboundText {
        &self.0.msg
    }
}

/// Where a number's replies stand. See the module docs.
#[derive(Debug, Default)]
pub struct Book {
    queue: VecDeque<Entry>,
    in_flight: Vec<Entry>,
    unknown: Vec<Entry>,
    settling: HashSet<MessageId>,
    /// Every id queued, in flight or unknown.
    tracked: HashSet<MessageId>,
    /// Error acks per id, kept across retries.
    errors: HashMap<MessageId, u32>,
    handled: HashSet<MessageId>,
    handled_order: VecDeque<MessageId>,
}

impl Book {
    /// Queues a reply to send (queued at `queued_at`), unless its id is known already (queued,
    /// in flight, unknown, settling or handled). Returns whether it was queued.
    pub fn push(&mut self, msg: OutboundText, queued_at: Instant) -> bool {
        if !self.track(&msg) {
            return false;
        }
        self.queue.push_back(Entry { msg, queued_at });
        true
    }

    /// Takes in a reply left unsent in the outbox by an earlier owner: its outcome is unknown.
    pub fn push_unknown(&mut self, msg: OutboundText, queued_at: Instant) -> bool {
        if !self.track(&msg) {
            return false;
        }
        self.unknown.push(Entry { msg, queued_at });
        true
    }

    /// Starts tracking `msg`; false if its id is known already.
    fn track(&mut self, msg: &OutboundText) -> bool {
        if self.knows(&msg.id) {
            return false;
        }
        self.tracked.insert(msg.id.clone());
        true
    }

    fn knows(&self, id: &MessageId) -> bool {
        self.tracked.contains(id) || self.settling.contains(id) || self.handled.contains(id)
    }

    /// The next reply to send; it stays tracked until [`Book::written`] or
    /// [`Book::not_written`] says what became of it.
    pub fn next(&mut self) -> Option<Taken> {
        self.queue.pop_front().map(Taken)
    }

    /// The reply taken was written on the live connection.
    pub fn written(&mut self, taken: Taken) {
        self.in_flight.push(taken.0);
    }

    /// The reply taken could not be written (no connection): it goes back to the front.
    pub fn not_written(&mut self, taken: Taken) {
        self.requeue_front(taken.0);
    }

    fn requeue_front(&mut self, entry: Entry) {
        self.tracked.insert(entry.msg.id.clone());
        self.queue.push_front(entry);
    }

    /// Takes out of the queue every reply queued `max_age` or more ago, then the oldest while
    /// more than `cap` remain; they are handled (never sent) and returned with why.
    pub fn expire(
        &mut self,
        now: Instant,
        max_age: Duration,
        cap: usize,
    ) -> Vec<(MessageId, Expiry)> {
        let mut out = Vec::new();
        let mut keep = VecDeque::with_capacity(self.queue.len());
        for entry in self.queue.drain(..) {
            if now.saturating_duration_since(entry.queued_at) >= max_age {
                out.push((entry.msg.id, Expiry::Age));
            } else {
                keep.push_back(entry);
            }
        }
        while keep.len() > cap
            && let Some(entry) = keep.pop_front()
        {
            out.push((entry.msg.id, Expiry::Cap));
        }
        self.queue = keep;
        for (id, _) in &out {
            self.tracked.remove(id);
            self.errors.remove(id);
            self.handled(id.clone());
        }
        out
    }

    /// When the oldest reply in the queue was queued.
    pub fn oldest_queued(&self) -> Option<Instant> {
        self.queue.iter().map(|e| e.queued_at).min()
    }

    /// The network has `id` (a server ack without error, or a receipt): true if it was ours to
    /// settle, and its sent mark is now to be committed ([`Book::marked`]).
    pub fn settle(&mut self, id: &MessageId) -> bool {
        if !self.tracked.remove(id) {
            return false;
        }
        self.in_flight.retain(|e| e.msg.id != *id);
        self.unknown.retain(|e| e.msg.id != *id);
        self.queue.retain(|e| e.msg.id != *id);
        self.errors.remove(id);
        self.settling.insert(id.clone());
        true
    }

    /// The sent mark of `id` is committed.
    pub fn marked(&mut self, id: MessageId) {
        self.settling.remove(&id);
        self.handled(id);
    }

    /// An error ack for `id`: what to do with it.
    pub fn refused(&mut self, id: &MessageId, error: &AckError) -> AfterError {
        let Some(msg) = self.take_sent(id) else {
            return AfterError::Unknown;
        };
        if error.is_rate_limit() {
            self.requeue_front(msg);
            return AfterError::CoolDown;
        }
        let errors = self.errors.entry(id.clone()).or_insert(0);
        *errors += 1;
        if *errors >= MAX_ACK_ERRORS {
            self.errors.remove(id);
            self.handled(id.clone());
            return AfterError::GiveUp(format!("refused {MAX_ACK_ERRORS} times, last: {error}"));
        }
        self.requeue_front(msg);
        AfterError::Retry
    }

    /// Removes `id` from in flight or unknown.
    fn take_sent(&mut self, id: &MessageId) -> Option<Entry> {
        let from = |list: &mut Vec<Entry>| {
            let pos = list.iter().position(|e| e.msg.id == *id)?;
            Some(list.remove(pos))
        };
        let msg = from(&mut self.in_flight).or_else(|| from(&mut self.unknown))?;
        self.tracked.remove(id);
        Some(msg)
    }

    /// The connection dropped: whatever was in flight has an unknown outcome now.
    pub fn connection_lost(&mut self) {
        self.unknown.append(&mut self.in_flight);
    }

    /// True if some reply's outcome is unknown.
    pub fn has_unknown(&self) -> bool {
        !self.unknown.is_empty()
    }

    /// The wait after login is over: replies still unknown are sent again (same id), first and
    /// in their order. Returns how many.
    pub fn resend_unknown(&mut self) -> usize {
        let n = self.unknown.len();
        for entry in self.unknown.drain(..).rev() {
            self.queue.push_front(entry);
        }
        n
    }

    /// Replies waiting to be sent.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Nothing written awaits its ack or its sent mark: a handoff now leaves the next owner
    /// nothing of unknown outcome (beyond what was unknown already).
    pub fn at_rest(&self) -> bool {
        self.in_flight.is_empty() && self.settling.is_empty()
    }

    /// Replies written and not yet settled (in flight or unknown).
    pub fn unsettled(&self) -> usize {
        self.in_flight.len() + self.unknown.len()
    }

    /// Gives back the room a burst left behind once nothing is waiting: a queue that held a
    /// thousand replies keeps its allocation otherwise, on every number that ever had one.
    pub fn compact(&mut self) {
        if !self.queue.is_empty() || self.queue.capacity() <= SPARE {
            return;
        }
        self.queue.shrink_to(SPARE);
        self.in_flight.shrink_to(SPARE);
        self.unknown.shrink_to(SPARE);
        self.tracked.shrink_to(SPARE);
        self.settling.shrink_to(SPARE);
        self.errors.shrink_to(SPARE);
    }

    /// Remembers that `id` needs no more sending.
    fn handled(&mut self, id: MessageId) {
        if self.handled.insert(id.clone()) {
            self.handled_order.push_back(id);
            if self.handled_order.len() > HANDLED_MEMORY
                && let Some(old) = self.handled_order.pop_front()
            {
                self.handled.remove(&old);
            }
        }
    }

    /// True if `id` is remembered as handled.
    #[cfg(test)]
    pub fn is_handled(&self, id: &MessageId) -> bool {
        self.handled.contains(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Jid;

    fn reply(id: &str) -> OutboundText {
        OutboundText {
            id: MessageId::parse(id).expect("valid id"),
            to: Jid::parse("15550001@s.whatsapp.net").expect("valid jid"),
            text: "hi".into(),
            reply_to: None,
            reply_to_sender: None,
        }
    }

    fn id(s: &str) -> MessageId {
        MessageId::parse(s).expect("valid id")
    }

    fn error(code: u16) -> AckError {
        AckError {
            code,
            text: "x".into(),
        }
    }

    /// Sends the next reply: takes it from the queue and writes it.
    fn send(book: &mut Book) -> MessageId {
        let taken = book.next().expect("a reply to send");
        let id = taken.msg().id.clone();
        book.written(taken);
        id
    }

    fn ids(book: &mut Book) -> Vec<MessageId> {
        std::iter::from_fn(|| book.next().map(|t| t.msg().id.clone())).collect()
    }

    #[test]
    fn a_reply_is_settled_by_its_ack_and_then_never_queued_again() {
        let mut book = Book::default();
        assert!(book.push(reply("A"), Instant::now()));
        assert!(!book.push(reply("A"), Instant::now()), "queued once");
        let a = send(&mut book);
        assert!(
            !book.push(reply("A"), Instant::now()),
            "in flight: not queued again"
        );
        assert!(book.settle(&a));
        assert!(
            !book.push(reply("A"), Instant::now()),
            "settling: not queued again"
        );
        book.marked(a.clone());
        assert!(
            !book.push(reply("A"), Instant::now()),
            "handled: a recovered copy is not sent"
        );
        assert!(!book.settle(&a), "a late receipt changes nothing");
        assert_eq!((book.queued(), book.unsettled()), (0, 0));
    }

    #[test]
    fn the_handled_memory_forgets_the_oldest_ids_first() {
        let mut book = Book::default();
        for i in 0..=HANDLED_MEMORY {
            let r = reply(&format!("R{i}"));
            book.push(r, Instant::now());
            let id = send(&mut book);
            book.settle(&id);
            book.marked(id);
        }
        assert!(!book.is_handled(&id("R0")), "the oldest is forgotten");
        assert!(book.is_handled(&id("R1")));
        assert!(book.is_handled(&id(&format!("R{HANDLED_MEMORY}"))));
        assert!(
            book.push(reply("R0"), Instant::now()),
            "a forgotten id can be queued again"
        );
    }

    #[test]
    fn a_receipt_settles_a_queued_reply_before_it_is_popped() {
        let mut book = Book::default();
        book.push_unknown(reply("A"), Instant::now());
        book.push_unknown(reply("B"), Instant::now());
        // The offline receipts name A: the network has it.
        assert!(book.settle(&id("A")));
        assert_eq!(book.resend_unknown(), 1);
        assert_eq!(ids(&mut book), vec![id("B")], "A is never sent again");
    }

    #[test]
    fn a_lost_connection_makes_in_flight_sends_unknown_until_the_wait_ends() {
        let mut book = Book::default();
        for r in ["A", "B", "C"] {
            book.push(reply(r), Instant::now());
        }
        send(&mut book);
        send(&mut book);
        book.connection_lost();
        assert!(book.has_unknown());
        assert_eq!(book.unsettled(), 2);
        // An ack that arrives late still settles.
        assert!(book.settle(&id("B")));
        assert_eq!(book.resend_unknown(), 1);
        assert_eq!(
            ids(&mut book),
            vec![id("A"), id("C")],
            "resends go first, in order"
        );
    }

    #[test]
    fn rate_limits_cool_down_and_other_errors_are_bounded() {
        let mut book = Book::default();
        book.push(reply("A"), Instant::now());
        let a = send(&mut book);
        assert_eq!(
            book.refused(&a, &error(AckError::RATE_OVERLIMIT)),
            AfterError::CoolDown
        );
        for _ in 1..MAX_ACK_ERRORS {
            let a = send(&mut book);
            assert_eq!(book.refused(&a, &error(479)), AfterError::Retry);
        }
        let a = send(&mut book);
        assert!(matches!(
            book.refused(&a, &error(479)),
            AfterError::GiveUp(_)
        ));
        assert!(book.is_handled(&a));
        assert_eq!(book.refused(&a, &error(479)), AfterError::Unknown);
        assert_eq!((book.queued(), book.unsettled()), (0, 0));
    }

    #[test]
    fn a_recovered_reply_is_sent_once_whatever_its_state() {
        let mut book = Book::default();
        book.push(reply("A"), Instant::now());
        assert!(!book.push(reply("A"), Instant::now()), "queued");
        let a = send(&mut book);
        assert!(!book.push(reply("A"), Instant::now()), "in flight");
        book.connection_lost();
        assert!(!book.push(reply("A"), Instant::now()), "unknown");
        assert!(
            !book.push_unknown(reply("A"), Instant::now()),
            "reloaded from the outbox"
        );
        assert_eq!(book.resend_unknown(), 1);
        assert_eq!(ids(&mut book), vec![a]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_backlog_expires_by_age_then_by_cap_oldest_first() {
        let mut book = Book::default();
        let age = Duration::from_secs(600);
        book.push(reply("OLD"), Instant::now());
        tokio::time::advance(Duration::from_secs(300)).await;
        for r in ["A", "B", "C", "D"] {
            book.push(reply(r), Instant::now());
        }
        assert!(book.expire(Instant::now(), age, 10).is_empty());
        tokio::time::advance(Duration::from_secs(301)).await;
        let out = book.expire(Instant::now(), age, 2);
        assert_eq!(
            out,
            vec![
                (id("OLD"), Expiry::Age),
                (id("A"), Expiry::Cap),
                (id("B"), Expiry::Cap)
            ]
        );
        assert!(!book.push(reply("A"), Instant::now()), "expired: handled");
        assert_eq!(ids(&mut book), vec![id("C"), id("D")]);
    }

    #[test]
    fn a_burst_leaves_no_room_behind_once_settled() {
        let mut book = Book::default();
        for n in 0..1000 {
            book.push(reply(&format!("B{n}")), Instant::now());
        }
        book.compact();
        assert!(
            book.queue.capacity() >= 1000,
            "nothing is given back while replies wait"
        );
        while book.queued() > 0 {
            let sent = send(&mut book);
            assert!(book.settle(&sent));
        }
        book.compact();
        assert!(book.queue.capacity() <= 2 * SPARE);
        assert!(book.in_flight.capacity() <= 2 * SPARE);
        assert!(book.tracked.capacity() <= 2 * SPARE);
        assert!(book.push(reply("C"), Instant::now()), "the book works on");
        assert_eq!(ids(&mut book), vec![id("C")]);
    }
}
