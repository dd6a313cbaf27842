//! The store port: the durable half of the message path, and the fencing that keeps a number's
//! writes to its one owner.
//!
//! The message path through the store:
//! 1. [`Store::record_inbound`] commits an inbound message (deduplicated on number + chat +
//!    sender + message id) before it is acknowledged to the network.
//! 2. The conversation processes it and [`Store::complete`] commits, in one transaction, the
//!    message's processed mark, its replies as outbox rows with deterministic ids, and the chat's
//!    checkpoint. After any crash, [`Store::unprocessed`] is what is left to do.
//!
//!    A message that can be processed the moment it arrives (nothing ahead of it in its chat)
//!    skips step 1: [`Store::record_completed`] commits it to the log already processed, with its
//!    effects, in one write. It is acknowledged to the network only after that commit, so a crash
//!    before it loses nothing (the network redelivers what was not acknowledged); what has to
//!    wait is always recorded first.
//! 3. The pacer sends what [`Store::unsent`] holds and [`Store::mark_sent`] records that the
//!    network has it (its server ack, or a receipt naming it).
//!
//! The hot-path methods return a [`Pending`] future: the write is queued *when the method is
//! called* (so writes keep the caller's order) and the future resolves once it is committed.
//! Implementations group-commit them.
//!
//! Every write that belongs to a number carries its [`Fence`]. The store keeps the highest token
//! seen per number and refuses a lower one with [`StoreError::Fenced`], in the same transaction
//! as the write.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use tokio_util::sync::CancellationToken;

use crate::coordinator::TokenSource;
use crate::dead_letter::DeadLetterReason;
use crate::ids::{Jid, PhoneNumber};
use crate::responder::ChatContext;
use crate::telemetry::STORE_UP;
use crate::transport::{Credentials, InboundMessage, MessageId, OutboundText};

/// A fencing token: issued with each ownership of a number, higher than every earlier one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(u64);

impl FencingToken {
    /// A token; `None` for zero, which no owner ever holds.
    pub fn new(value: u64) -> Option<Self> {
        (value > 0).then_some(Self(value))
    }

    /// The token's value.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Who writes for a number: the number and the token of its current ownership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The number written for.
    pub number: PhoneNumber,
    /// The token of this ownership.
    pub token: FencingToken,
}

/// Why the store failed. Whether a failure is worth retrying is the variant, never the text:
/// [`StoreError::Unavailable`] is an outage (the same request will succeed once the database is
/// back), everything else is about the request itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// A newer owner of the number has written: this writer must stop.
    #[error("number {number}: fencing token {token} is older than {highest}")]
    Fenced {
        /// The number.
        number: PhoneNumber,
        /// The token that was refused.
        token: u64,
        /// The highest token the store has seen.
        highest: u64,
    },
    /// The database cannot serve the request now; it is not the request's fault. Wait for the
    /// store's [`Health`] and try again: never a reason to spend a restart budget or to
    /// dead-letter a message.
    #[error("store unavailable ({0})")]
    Unavailable(Outage),
    /// The database refused this write for what it holds; the same write will be refused again.
    #[error("refused by the database: {0}")]
    Refused(String),
    /// Stored data could not be read back (bad ciphertext, unknown key, bad encoding).
    #[error("stored data unreadable: {0}")]
    Corrupt(String),
    /// The row a write refers to does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The write conflicts with an existing row.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The store could not be set up (its URL, its directory, its migrations).
    #[error("store setup: {0}")]
    Setup(String),
    /// The store is shutting down.
    #[error("store closed")]
    Closed,
}

impl StoreError {
    /// True for an outage: the same request is worth trying again once the store is back.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }

    /// An outage of `kind`.
    pub fn outage(kind: OutageKind, detail: impl Into<String>) -> Self {
        Self::Unavailable(Outage {
            kind,
            detail: detail.into(),
        })
    }
}

/// What kind of outage made the store unavailable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutageKind {
    /// The database cannot be reached (connection refused or lost, shutting down).
    Unreachable,
    /// No pooled connection became free in time.
    PoolTimeout,
    /// Another writer holds the lock (SQLite's "database is locked").
    Locked,
    /// The database accepts reads only.
    ReadOnly,
    /// The database's disk is full.
    DiskFull,
    /// The transaction lost a deadlock or serialization race; trying it again may win.
    Contention,
    /// Anything else that is not the request's fault (an I/O error, a timeout).
    Other,
}

impl OutageKind {
    /// A bounded label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Self::Unreachable => "unreachable",
            Self::PoolTimeout => "pool_timeout",
            Self::Locked => "locked",
            Self::ReadOnly => "read_only",
            Self::DiskFull => "disk_full",
            Self::Contention => "contention",
            Self::Other => "other",
        }
    }
}

/// An outage: its kind and what the database said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outage {
    /// What kind.
    pub kind: OutageKind,
    /// The database's words.
    pub detail: String,
}

impl fmt::Display for Outage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.label(), self.detail)
    }
}

/// Whether the store is up, as the store itself sees it: it goes down on the first outage and
/// up again when a write (or the store's own probe) succeeds. The tree waits on it instead of
/// crashing while the store is down, so work resumes the moment the store is back; `/readyz`
/// and the `switchboard_store_up` gauge report it. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Health {
    up: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    /// Up, to begin with.
    pub fn new() -> Self {
        metrics::gauge!(STORE_UP).set(1.0);
        Self {
            up: Arc::new(tokio::sync::watch::Sender::new(true)),
        }
    }

    /// True while the store is up.
    pub fn is_up(&self) -> bool {
        *self.up.borrow()
    }

    /// Records whether the store is up; returns whether that changed.
    pub fn set(&self, up: bool) -> bool {
        let changed = self
            .up
            .send_if_modified(|now| std::mem::replace(now, up) != up);
        if changed {
            metrics::gauge!(STORE_UP).set(if up { 1.0 } else { 0.0 });
            if up {
                tracing::info!("store is back");
            } else {
                tracing::warn!("store is down; waiting for it");
            }
        }
        changed
    }

    /// Resolves once the store is up (at once if it is), or after `at_most`.
    pub async fn wait_up(&self, at_most: Duration) {
        let mut rx = self.up.subscribe();
        let _ = tokio::time::timeout(at_most, rx.wait_for(|up| *up)).await;
    }

    /// Runs `attempt` until it succeeds or fails for a reason other than an outage; during an
    /// outage it waits for the store to be back (trying again at least every [`OUTAGE_RETRY`])
    /// and never gives up, unless `cancel` fires (then the outage is returned).
    pub async fn retrying<T, F, Fut>(
        &self,
        cancel: &CancellationToken,
        mut attempt: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        loop {
            match attempt().await {
                Err(e) if e.is_retryable() && !cancel.is_cancelled() => {
                    tracing::debug!(error = %e, "store unavailable; waiting");
                    tokio::select! {
                        () = cancel.cancelled() => return Err(e),
                        () = self.wait_up(OUTAGE_RETRY) => {}
                    }
                    // The first try after the store is back spreads out a little.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return other,
            }
        }
    }
}

/// While the store is down, a waiting write tries again at least this often.
pub const OUTAGE_RETRY: Duration = Duration::from_secs(2);

/// A write queued by a hot-path method; resolves when it is committed.
pub type Pending<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'static>>;

/// What recording an inbound message found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// First time: committed, to be processed.
    New,
    /// Already in the log (a redelivery).
    Duplicate {
        /// Whether it was already processed (or dead-lettered).
        processed: bool,
    },
}

/// The outcome of processing one inbound message.
#[derive(Debug, Clone)]
pub struct Completion {
    /// The message's chat.
    pub chat: Jid,
    /// Its sender.
    pub sender: Jid,
    /// Its id.
    pub inbound: MessageId,
    /// The replies to send, with ids derived from the inbound id and step.
    pub replies: Vec<OutboundText>,
    /// The chat's state after the message.
    pub checkpoint: ChatContext,
}

/// What queueing a message sent as the business found ([`Store::queue_send`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    /// Committed to the outbox now: hand it to the pacer.
    New,
    /// The outbox has it already (the same id, chat and text): nothing new was queued.
    /// `unsent`: still waiting to be sent.
    Repeat {
        /// Not sent, given up or expired yet.
        unsent: bool,
    },
    /// The outbox has that id for a different chat or text: the key was reused.
    KeyReused,
}

/// A reply in the outbox that the network has not acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsent {
    /// The reply.
    pub reply: OutboundText,
    /// When it was queued, in milliseconds since the epoch: its age counts from then.
    pub queued_at_ms: u64,
}

/// Now, in milliseconds since the epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The durable message path, sessions and dead letters. See the module docs.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Whether the store is up, as it sees itself.
    fn health(&self) -> Health;

    /// Commits `msg` to the inbound log unless it is there already.
    fn record_inbound(&self, fence: &Fence, msg: &InboundMessage) -> Pending<Recorded>;

    /// Marks a message processed, queues its replies and saves the chat's checkpoint, at once.
    /// Resolves to the ids of the replies newly queued (a reply already in the outbox is not
    /// queued again).
    fn complete(&self, fence: &Fence, done: Completion) -> Pending<Vec<MessageId>>;

    /// Like [`Store::complete`], for a message processed straight from the network, before it
    /// was recorded: commits `msg` to the inbound log already processed, with the completion's
    /// effects, in one write. If the log has it already, a pending row is completed as by
    /// [`Store::complete`]; a processed (or dead-lettered) one is left as it is and nothing is
    /// written: then it resolves to `None` (a redelivery of a message processed before, whose
    /// outcome must be discarded).
    fn record_completed(
        &self,
        fence: &Fence,
        msg: &InboundMessage,
        done: Completion,
    ) -> Pending<Option<Vec<MessageId>>>;

    /// Records that the network has `id`; resolves to whether it is one of our outbox rows.
    fn mark_sent(&self, fence: &Fence, id: &MessageId) -> Pending<bool>;

    /// Queues `msg`, sent as the business (no inbound message behind it), unless the outbox
    /// has its id already; then says whether it is the same message.
    async fn queue_send(&self, fence: &Fence, msg: &OutboundText) -> Result<Queued, StoreError>;

    /// Sets an inbound message aside, unprocessed, with the reason.
    async fn dead_letter(
        &self,
        fence: &Fence,
        msg: &InboundMessage,
        reason: &DeadLetterReason,
    ) -> Result<(), StoreError>;

    /// Records a failed send attempt; `give_up` ends the row's retries (it is marked failed).
    async fn send_failed(
        &self,
        fence: &Fence,
        id: &MessageId,
        error: &str,
        give_up: bool,
    ) -> Result<(), StoreError>;

    /// Inbound messages committed and neither processed nor dead-lettered, oldest first.
    async fn unprocessed(&self, number: &PhoneNumber) -> Result<Vec<InboundMessage>, StoreError>;

    /// Replies queued and not yet acknowledged by the network, oldest first.
    async fn unsent(&self, number: &PhoneNumber) -> Result<Vec<Unsent>, StoreError>;

    /// Records that a queued reply will not be sent: it waited past the backlog's age limit or
    /// cap (`reason` says which).
    async fn expire(&self, fence: &Fence, id: &MessageId, reason: &str) -> Result<(), StoreError>;

    /// The chat's last checkpoint.
    async fn checkpoint(
        &self,
        number: &PhoneNumber,
        chat: &Jid,
    ) -> Result<Option<ChatContext>, StoreError>;

    /// The number's paired credentials.
    async fn load_session(&self, number: &PhoneNumber) -> Result<Option<Credentials>, StoreError>;

    /// Stores credentials after pairing.
    async fn save_session(&self, fence: &Fence, creds: &Credentials) -> Result<(), StoreError>;

    /// Forgets credentials after a logout.
    async fn clear_session(&self, fence: &Fence) -> Result<(), StoreError>;
}

/// One inbound row of the memory store.
#[derive(Debug, Clone)]
struct MemInbound {
    msg: InboundMessage,
    done: bool,
}

/// One outbox row of the memory store.
#[derive(Debug, Clone)]
struct MemOutbox {
    msg: OutboundText,
    queued_at_ms: u64,
    sent: bool,
    /// Given up or expired.
    failed: bool,
}

#[derive(Debug, Default)]
struct MemState {
    fences: HashMap<PhoneNumber, u64>,
    inbound: HashMap<PhoneNumber, Vec<MemInbound>>,
    inbound_keys: HashSet<(PhoneNumber, Jid, Jid, MessageId)>,
    outbox: HashMap<PhoneNumber, Vec<MemOutbox>>,
    checkpoints: HashMap<(PhoneNumber, Jid), ChatContext>,
    sessions: HashMap<PhoneNumber, Credentials>,
    dead: Vec<(PhoneNumber, InboundMessage, DeadLetterReason)>,
}

impl MemState {
    fn fence(&mut self, fence: &Fence) -> Result<(), StoreError> {
        let highest = self.fences.entry(fence.number.clone()).or_insert(0);
        if fence.token.get() < *highest {
            return Err(StoreError::Fenced {
                number: fence.number.clone(),
                token: fence.token.get(),
                highest: *highest,
            });
        }
        *highest = fence.token.get();
        Ok(())
    }

    /// Adds `msg` to the inbound log unless it is there.
    fn log(&mut self, fence: &Fence, msg: &InboundMessage) -> Recorded {
        let key = (
            fence.number.clone(),
            msg.chat.clone(),
            msg.sender.clone(),
            msg.id.clone(),
        );
        if self.inbound_keys.insert(key) {
            self.inbound
                .entry(fence.number.clone())
                .or_default()
                .push(MemInbound {
                    msg: msg.clone(),
                    done: false,
                });
            return Recorded::New;
        }
        let processed = self
            .inbound
            .get(&fence.number)
            .is_some_and(|rows| rows.iter().any(|r| r.done && r.msg.key() == msg.key()));
        Recorded::Duplicate { processed }
    }
}

/// A store in memory with the same semantics as the SQL stores: for actor tests and for runs
/// that need no durability across processes. It is also a [`TokenSource`] for the in-process
/// [`LocalCoordinator`](crate::coordinator::LocalCoordinator).
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<MemState>,
    health: Health,
}

impl MemoryStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, MemState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The dead letters kept so far, oldest first.
    pub fn dead_letters(&self) -> Vec<(PhoneNumber, InboundMessage, DeadLetterReason)> {
        self.lock().dead.clone()
    }

    fn with<T: Send + 'static>(
        &self,
        fence: &Fence,
        f: impl FnOnce(&mut MemState) -> T,
    ) -> Result<T, StoreError> {
        let mut st = self.lock();
        st.fence(fence)?;
        Ok(f(&mut st))
    }
}

fn ready<T: Send + 'static>(r: Result<T, StoreError>) -> Pending<T> {
    Box::pin(std::future::ready(r))
}

#[async_trait]
impl Store for MemoryStore {
    fn health(&self) -> Health {
        self.health.clone()
    }

    fn record_inbound(&self, fence: &Fence, msg: &InboundMessage) -> Pending<Recorded> {
        ready(self.with(fence, |st| st.log(fence, msg)))
    }

    fn complete(&self, fence: &Fence, done: Completion) -> Pending<Vec<MessageId>> {
        ready(self.with(fence, |st| {
            if let Some(row) = st.inbound.get_mut(&fence.number).and_then(|rows| {
                rows.iter_mut().find(|r| {
                    r.msg.id == done.inbound
                        && r.msg.chat == done.chat
                        && r.msg.sender == done.sender
                })
            }) {
                row.done = true;
            }
            st.checkpoints
                .insert((fence.number.clone(), done.chat.clone()), done.checkpoint);
            let outbox = st.outbox.entry(fence.number.clone()).or_default();
            let mut queued = Vec::new();
            for reply in done.replies {
                if outbox.iter().all(|o| o.msg.id != reply.id) {
                    queued.push(reply.id.clone());
                    outbox.push(MemOutbox {
                        msg: reply,
                        queued_at_ms: unix_ms(),
                        sent: false,
                        failed: false,
                    });
                }
            }
            queued
        }))
    }

    fn record_completed(
        &self,
        fence: &Fence,
        msg: &InboundMessage,
        done: Completion,
    ) -> Pending<Option<Vec<MessageId>>> {
        match self.with(fence, |st| st.log(fence, msg)) {
            Ok(Recorded::Duplicate { processed: true }) => ready(Ok(None)),
            Ok(_) => {
                let completed = self.complete(fence, done);
                Box::pin(async move { completed.await.map(Some) })
            }
            Err(e) => ready(Err(e)),
        }
    }

    fn mark_sent(&self, fence: &Fence, id: &MessageId) -> Pending<bool> {
        ready(self.with(fence, |st| {
            let row = st
                .outbox
                .get_mut(&fence.number)
                .and_then(|rows| rows.iter_mut().find(|o| o.msg.id == *id));
            row.map(|r| r.sent = true).is_some()
        }))
    }

    async fn queue_send(&self, fence: &Fence, msg: &OutboundText) -> Result<Queued, StoreError> {
        self.with(fence, |st| {
            let outbox = st.outbox.entry(fence.number.clone()).or_default();
            match outbox.iter().find(|o| o.msg.id == msg.id) {
                Some(o) if o.msg.to == msg.to && o.msg.text == msg.text => Queued::Repeat {
                    unsent: !o.sent && !o.failed,
                },
                Some(_) => Queued::KeyReused,
                None => {
                    outbox.push(MemOutbox {
                        msg: msg.clone(),
                        queued_at_ms: unix_ms(),
                        sent: false,
                        failed: false,
                    });
                    Queued::New
                }
            }
        })
    }

    async fn dead_letter(
        &self,
        fence: &Fence,
        msg: &InboundMessage,
        reason: &DeadLetterReason,
    ) -> Result<(), StoreError> {
        self.with(fence, |st| {
            if let Some(row) = st
                .inbound
                .get_mut(&fence.number)
                .and_then(|rows| rows.iter_mut().find(|r| r.msg == *msg))
            {
                row.done = true;
            }
            st.dead
                .push((fence.number.clone(), msg.clone(), reason.clone()));
        })
    }

    async fn send_failed(
        &self,
        fence: &Fence,
        id: &MessageId,
        _error: &str,
        give_up: bool,
    ) -> Result<(), StoreError> {
        self.with(fence, |st| {
            if let Some(row) = st
                .outbox
                .get_mut(&fence.number)
                .and_then(|rows| rows.iter_mut().find(|o| o.msg.id == *id))
            {
                row.failed |= give_up;
            }
        })
    }

    async fn unprocessed(&self, number: &PhoneNumber) -> Result<Vec<InboundMessage>, StoreError> {
        let st = self.lock();
        let rows = st.inbound.get(number).map(Vec::as_slice).unwrap_or(&[]);
        Ok(rows
            .iter()
            .filter(|r| !r.done)
            .map(|r| r.msg.clone())
            .collect())
    }

    async fn unsent(&self, number: &PhoneNumber) -> Result<Vec<Unsent>, StoreError> {
        let st = self.lock();
        let rows = st.outbox.get(number).map(Vec::as_slice).unwrap_or(&[]);
        Ok(rows
            .iter()
            .filter(|o| !o.sent && !o.failed)
            .map(|o| Unsent {
                reply: o.msg.clone(),
                queued_at_ms: o.queued_at_ms,
            })
            .collect())
    }

    async fn expire(&self, fence: &Fence, id: &MessageId, _reason: &str) -> Result<(), StoreError> {
        self.with(fence, |st| {
            if let Some(row) = st
                .outbox
                .get_mut(&fence.number)
                .and_then(|rows| rows.iter_mut().find(|o| o.msg.id == *id && !o.sent))
            {
                row.failed = true;
            }
        })
    }

    async fn checkpoint(
        &self,
        number: &PhoneNumber,
        chat: &Jid,
    ) -> Result<Option<ChatContext>, StoreError> {
        let key = (number.clone(), chat.clone());
        Ok(self.lock().checkpoints.get(&key).cloned())
    }

    async fn load_session(&self, number: &PhoneNumber) -> Result<Option<Credentials>, StoreError> {
        Ok(self.lock().sessions.get(number).cloned())
    }

    async fn save_session(&self, fence: &Fence, creds: &Credentials) -> Result<(), StoreError> {
        self.with(fence, |st| {
            st.sessions.insert(fence.number.clone(), creds.clone());
        })
    }

    async fn clear_session(&self, fence: &Fence) -> Result<(), StoreError> {
        self.with(fence, |st| {
            st.sessions.remove(&fence.number);
        })
    }
}

#[async_trait]
impl TokenSource for MemoryStore {
    async fn next_token(&self, number: &PhoneNumber) -> Result<FencingToken, StoreError> {
        let mut st = self.lock();
        let highest = st.fences.entry(number.clone()).or_insert(0);
        *highest += 1;
        FencingToken::new(*highest).ok_or_else(|| StoreError::Corrupt("token overflow".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn number() -> PhoneNumber {
        PhoneNumber::parse("+15550001").expect("valid number")
    }

    #[tokio::test]
    async fn lower_token_is_refused_after_a_higher_one_wrote() {
        let store = MemoryStore::default();
        let old = store.next_token(&number()).await.expect("token");
        let new = store.next_token(&number()).await.expect("token");
        assert!(new > old);
        let fence = |token| Fence {
            number: number(),
            token,
        };
        let creds = Credentials("c".into());
        store
            .save_session(&fence(new), &creds)
            .await
            .expect("new owner writes");
        let err = store.save_session(&fence(old), &creds).await;
        assert!(matches!(err, Err(StoreError::Fenced { .. })), "{err:?}");
    }
}
