//! The outbound pacer: one task per number that sends the number's outbox in order, under the
//! account's rate limit, with a typing indicator proportional to the length, and settles each
//! send by the server's answer.
//!
//! Exactly once in effect, on WhatsApp's real semantics (the sending device gets no copy of its
//! own sends; a send resolves when it is written; the server's ack comes later, or never):
//! - A reply keeps the id it was given when it was queued, for every attempt.
//! - It is marked sent in the outbox when the server acks it, or when a receipt names it; it is
//!   remembered as handled only once that mark commits.
//! - An error ack is handled by kind: rate-overlimit cools the number down and sends the same
//!   id again; other refusals are retried with backoff, then the row is given up with the reason
//!   (`MAX_ACK_ERRORS`, in `pacer/book.rs`).
//! - A send whose ack never came has an unknown outcome: the connection dropped first, or an
//!   earlier owner of the number left it unsent in the outbox. After the next login (whose
//!   offline receipts settle whatever they name) the pacer waits `unsettled_wait`, then sends
//!   what is still unsettled again, same id, ahead of everything else. Recipients keep one
//!   message per sender and id, so the contact sees it once.
//! - No timer resends a reply whose ack is merely late: only a lost connection makes an
//!   outcome unknown.
//! - A reply handed over again after a lost commit answer ([`PacerHandle::recover`]) is sent
//!   only if the pacer does not know its id.
//!
//! - The backlog is bounded: a reply still queued `outbound_max_age` after it was queued, or the
//!   oldest beyond `outbound_max_queued`, expires: recorded in the outbox and counted
//!   (`switchboard_outbound_expired_total{reason}`), never silently dropped.
//!
//! The bookkeeping is `Book` (`pacer/book.rs`), pure and unit-tested; this file is the task
//! around it.
//! The command channel is unbounded; what flows through it is bounded upstream: one reply per
//! message the conversations process (bounded by intake), and acks and receipts per send.

mod book;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::coordinator::FenceLoss;
use crate::deps::{Deps, FleetCounters, NumberResources, SendRate};
use crate::store::{Fence, StoreError, Unsent};
use crate::telemetry::{
    MESSAGES_SENT, OUTBOUND_DEAD, OUTBOUND_EXPIRED, OUTBOUND_QUEUE, OUTBOUND_RESENT,
};
use crate::transport::{MessageId, OutboundText, ServerAck, WaSession};
use book::{AfterError, Book, Taken};

/// How long a failed sent mark waits before it is committed again.
const MARK_RETRY: Duration = Duration::from_secs(1);

/// What the pacer is told.
#[derive(Debug)]
enum Command {
    /// Send this reply (already committed to the outbox).
    Send(OutboundText),
    /// Send this reply unless its id is known (see [`PacerHandle::recover`]).
    Recover(Unsent),
    /// The server answered a send.
    Ack(ServerAck),
    /// A receipt named these ids: the network has them.
    Receipt(Vec<MessageId>),
    /// The session logged in (the offline queue is drained).
    Connected,
    /// The session's connection dropped.
    Disconnected,
    /// The sent mark of this id committed.
    Marked(MessageId),
    /// The sent mark of this id failed; commit it again later.
    MarkFailed(MessageId),
    /// The number is handed off: send nothing more, and answer once nothing written awaits
    /// its ack or its sent mark.
    Settle(oneshot::Sender<()>),
}

/// Talks to a number's pacer.
#[derive(Debug, Clone)]
pub struct PacerHandle {
    tx: mpsc::UnboundedSender<Command>,
}

impl PacerHandle {
    /// Queues a reply that is committed to the outbox; false if the pacer has stopped.
    pub fn enqueue(&self, msg: OutboundText) -> bool {
        self.tx.send(Command::Send(msg)).is_ok()
    }

    /// Hands over a reply found unsent in the outbox that this pacer may never have been given:
    /// its completion was committed but the answer was lost (the connection dropped at commit),
    /// so the conversation could not tell it was newly queued. It is sent unless this pacer has
    /// it queued, in flight or unsettled, or has handled that id.
    pub fn recover(&self, row: Unsent) {
        let _ = self.tx.send(Command::Recover(row));
    }

    /// The server answered one of our sends.
    pub fn server_ack(&self, ack: ServerAck) {
        let _ = self.tx.send(Command::Ack(ack));
    }

    /// A receipt named `ids`.
    pub fn receipt(&self, ids: Vec<MessageId>) {
        let _ = self.tx.send(Command::Receipt(ids));
    }

    /// The session logged in.
    pub fn connected(&self) {
        let _ = self.tx.send(Command::Connected);
    }

    /// The session's connection dropped.
    pub fn disconnected(&self) {
        let _ = self.tx.send(Command::Disconnected);
    }

    /// Stops sending and resolves once nothing written awaits its ack or its sent mark (or the
    /// pacer has stopped): a number handed off now leaves its next owner nothing to resend.
    pub async fn settle(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Settle(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

/// Starts the pacer of a number; it first loads the number's unsent outbox.
pub fn spawn(resources: Arc<NumberResources>, deps: &Deps, fence: Fence) -> PacerHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    let settings = &deps.settings;
    let pacer = Pacer {
        bucket: Bucket::new(settings.send_rate),
        typing_per_char: settings.typing_per_char,
        typing_max: settings.typing_max,
        unsettled_wait: settings.unsettled_wait,
        max_age: settings.outbound_max_age,
        max_queued: settings.outbound_max_queued,
        resources,
        deps: deps.clone(),
        fence,
        book: Book::default(),
        online: false,
        resend_at: None,
        paused_until: None,
        error_delays: retry_delays(),
        failed_marks: Vec::new(),
        retry_marks_at: None,
        gauge: 0,
        settling: None,
        tx: tx.clone(),
    };
    tokio::spawn(pacer.run(rx));
    PacerHandle { tx }
}

struct Pacer {
    bucket: Bucket,
    typing_per_char: Duration,
    typing_max: Duration,
    unsettled_wait: Duration,
    /// A reply still queued this long after it was queued expires.
    max_age: Duration,
    /// The queue holds at most this many replies; the oldest beyond it expire.
    max_queued: usize,
    resources: Arc<NumberResources>,
    deps: Deps,
    fence: Fence,
    book: Book,
    /// The session is logged in.
    online: bool,
    /// When replies of unknown outcome are sent again (set at login); nothing is sent before.
    resend_at: Option<Instant>,
    /// Cooling down after an error ack until then.
    paused_until: Option<Instant>,
    /// Delays after error acks; starts over after an ack without error.
    error_delays: ExponentialBackoff,
    /// Sent marks to commit again at `retry_marks_at`.
    failed_marks: Vec<MessageId>,
    retry_marks_at: Option<Instant>,
    /// What this pacer adds to the queue-depth gauge now.
    gauge: usize,
    /// Set by [`Command::Settle`]: nothing more is sent; these wait for the book to be at rest.
    settling: Option<Vec<oneshot::Sender<()>>>,
    /// Its own commands, for the answers of the store.
    tx: mpsc::UnboundedSender<Command>,
}

impl Pacer {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        let cancel = self.resources.cancel.clone();
        tokio::select! {
            () = cancel.cancelled() => return,
            () = self.load() => {}
        }
        loop {
            while let Ok(cmd) = rx.try_recv() {
                self.apply(cmd);
            }
            if self.book.at_rest()
                && let Some(waiters) = self.settling.as_mut()
            {
                for w in waiters.drain(..) {
                    let _ = w.send(());
                }
            }
            self.expire();
            self.report();
            let next = if self.may_send() {
                self.book.next()
            } else {
                None
            };
            if let Some(msg) = next {
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = self.deliver(msg) => {}
                }
                continue;
            }
            tokio::select! {
                () = cancel.cancelled() => break,
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.apply(cmd),
                    None => break,
                },
                () = sleep_until(self.next_timer()) => self.on_timer(),
            }
        }
        self.gauge_to(0);
    }

    /// Loads what earlier owners of the number left unsent: their outcome is unknown.
    async fn load(&mut self) {
        let mut delays = retry_delays();
        loop {
            match self.deps.store.unsent(&self.fence.number).await {
                Ok(rows) => {
                    for row in rows {
                        let queued_at = instant_of(row.queued_at_ms);
                        self.book.push_unknown(row.reply, queued_at);
                    }
                    return;
                }
                Err(e) => {
                    tracing::warn!(number = %self.fence.number, error = %e, "loading the outbox");
                    tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(30))).await;
                }
            }
        }
    }

    fn may_send(&self) -> bool {
        let now = Instant::now();
        self.online
            && self.settling.is_none()
            && self.resend_at.is_none()
            && self.paused_until.is_none_or(|t| t <= now)
    }

    fn next_timer(&self) -> Option<Instant> {
        let expires = self.book.oldest_queued().map(|t| t + self.max_age);
        [
            self.resend_at,
            self.paused_until,
            self.retry_marks_at,
            expires,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Takes what is past the backlog's age limit or cap out of the queue and records it as
    /// expired: counted, never silently dropped.
    fn expire(&mut self) {
        let expired = self
            .book
            .expire(Instant::now(), self.max_age, self.max_queued);
        for (id, why) in expired {
            metrics::counter!(OUTBOUND_EXPIRED, "reason" => why.label()).increment(1);
            FleetCounters::bump(&self.deps.counters.expired);
            let store = self.deps.store.clone();
            let fence = self.fence.clone();
            let cancel = self.resources.cancel.clone();
            tokio::spawn(async move {
                let reason = format!("expired: past the backlog's {}", why.label());
                let written = store
                    .health()
                    .retrying(&cancel, || store.expire(&fence, &id, &reason))
                    .await;
                if let Err(e) = written {
                    tracing::warn!(message_id = %id, error = %e, "recording an expired reply");
                }
            });
        }
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        if self.resend_at.is_some_and(|t| t <= now) {
            self.resend_at = None;
            let n = self.book.resend_unknown();
            if n > 0 {
                tracing::info!(number = %self.fence.number, count = n, "sending unsettled replies again");
                metrics::counter!(OUTBOUND_RESENT).increment(n as u64);
            }
        }
        if self.paused_until.is_some_and(|t| t <= now) {
            self.paused_until = None;
        }
        if self.retry_marks_at.is_some_and(|t| t <= now) {
            self.retry_marks_at = None;
            for id in std::mem::take(&mut self.failed_marks) {
                self.mark_sent(id);
            }
        }
    }

    fn apply(&mut self, cmd: Command) {
        match cmd {
            Command::Send(msg) => {
                self.book.push(msg, Instant::now());
            }
            Command::Recover(row) => {
                self.book.push(row.reply, instant_of(row.queued_at_ms));
            }
            Command::Ack(ack) => self.on_ack(ack),
            Command::Receipt(ids) => {
                for id in ids {
                    if self.book.settle(&id) {
                        self.mark_sent(id);
                    }
                }
            }
            Command::Connected => {
                self.online = true;
                if self.book.has_unknown() {
                    self.resend_at = Some(Instant::now() + self.unsettled_wait);
                }
            }
            Command::Disconnected => {
                self.online = false;
                self.resend_at = None;
                self.book.connection_lost();
            }
            Command::Marked(id) => self.book.marked(id),
            Command::Settle(done) => self.settling.get_or_insert_with(Vec::new).push(done),
            Command::MarkFailed(id) => {
                self.failed_marks.push(id);
                self.retry_marks_at
                    .get_or_insert_with(|| Instant::now() + MARK_RETRY);
            }
        }
    }

    fn on_ack(&mut self, ack: ServerAck) {
        let Some(error) = ack.error else {
            if self.book.settle(&ack.id) {
                metrics::counter!(MESSAGES_SENT, "outcome" => "ok").increment(1);
                FleetCounters::bump(&self.deps.counters.messages_out);
                self.error_delays = retry_delays();
                self.mark_sent(ack.id);
            }
            return;
        };
        let after = self.book.refused(&ack.id, &error);
        if after == AfterError::Unknown {
            return;
        }
        metrics::counter!(MESSAGES_SENT, "outcome" => error.label()).increment(1);
        tracing::warn!(number = %self.fence.number, message_id = %ack.id, %error, "send refused");
        let delay = self.error_delays.next().unwrap_or(Duration::from_secs(30));
        match after {
            AfterError::CoolDown => {
                self.bucket.drain();
                self.paused_until = Some(Instant::now() + delay);
                self.send_failed(&ack.id, error.to_string(), false);
            }
            AfterError::Retry => {
                self.paused_until = Some(Instant::now() + delay);
                self.send_failed(&ack.id, error.to_string(), false);
            }
            AfterError::GiveUp(reason) => {
                metrics::counter!(OUTBOUND_DEAD, "reason" => "refused").increment(1);
                tracing::error!(number = %self.fence.number, message_id = %ack.id, %reason, "reply given up");
                self.send_failed(&ack.id, reason, true);
            }
            AfterError::Unknown => {}
        }
    }

    /// Writes one reply to the connection; its outcome is the server's ack, later.
    async fn deliver(&mut self, taken: Taken) {
        let Some(session) = self.resources.session() else {
            self.book.not_written(taken);
            self.online = false;
            return;
        };
        self.type_for(taken.msg(), session.as_ref()).await;
        // The token is taken right before the send, so the network sees sends spaced by the
        // bucket whatever the typing times were.
        self.bucket.take().await;
        match session.send_text(taken.msg().clone()).await {
            Ok(()) => self.book.written(taken),
            Err(e) => {
                metrics::counter!(MESSAGES_SENT, "outcome" => "not_connected").increment(1);
                tracing::debug!(number = %self.fence.number, error = %e, "send not written");
                self.book.not_written(taken);
                self.online = false;
            }
        }
    }

    /// Commits that the network has `id`; the answer comes back as a command.
    fn mark_sent(&self, id: MessageId) {
        let committed = self.deps.store.mark_sent(&self.fence, &id);
        let tx = self.tx.clone();
        let resources = self.resources.clone();
        tokio::spawn(async move {
            match committed.await {
                Ok(_) => {
                    let _ = tx.send(Command::Marked(id));
                }
                Err(StoreError::Fenced { .. }) => {
                    tracing::warn!("outbox write fenced; stopping sends");
                    resources.lose_fence(FenceLoss::StoreRefused);
                }
                Err(e) => {
                    tracing::warn!(message_id = %id, error = %e, "recording a send");
                    let _ = tx.send(Command::MarkFailed(id));
                }
            }
        });
    }

    /// Records a refused send in the outbox, off the send path; `give_up` ends the row.
    fn send_failed(&self, id: &MessageId, error: String, give_up: bool) {
        let store = self.deps.store.clone();
        let fence = self.fence.clone();
        let id = id.clone();
        let resources = self.resources.clone();
        tokio::spawn(async move {
            match store.send_failed(&fence, &id, &error, give_up).await {
                Ok(()) => {}
                Err(StoreError::Fenced { .. }) => {
                    tracing::warn!(number = %fence.number, "outbox write fenced; stopping sends");
                    resources.lose_fence(FenceLoss::StoreRefused);
                }
                Err(e) => tracing::warn!(message_id = %id, error = %e, "recording a refusal"),
            }
        });
    }

    async fn type_for(&self, msg: &OutboundText, session: &dyn WaSession) {
        let chars = u32::try_from(msg.text.chars().count()).unwrap_or(u32::MAX);
        let typing = self
            .typing_per_char
            .saturating_mul(chars)
            .min(self.typing_max);
        if typing.is_zero() {
            return;
        }
        if session.send_typing(&msg.to, true).await.is_ok() {
            tokio::time::sleep(typing).await;
            let _ = session.send_typing(&msg.to, false).await;
        }
    }

    /// Brings the queue-depth gauge up to date with the book.
    fn report(&mut self) {
        let depth = self.book.queued() + self.book.unsettled();
        if depth == 0 {
            self.book.compact();
        }
        self.gauge_to(depth);
    }

    fn gauge_to(&mut self, depth: usize) {
        if depth != self.gauge {
            let delta = depth as f64 - self.gauge as f64;
            metrics::gauge!(OUTBOUND_QUEUE).increment(delta);
            let counted = &self.deps.counters.outbound_queued;
            counted.fetch_add(depth as i64 - self.gauge as i64, Ordering::Relaxed);
            self.gauge = depth;
        }
    }
}

/// The tokio instant of a wall-clock time in the past (when a stored reply was queued).
fn instant_of(unix_ms_then: u64) -> Instant {
    let age = Duration::from_millis(crate::store::unix_ms().saturating_sub(unix_ms_then));
    let now = Instant::now();
    now.checked_sub(age).unwrap_or(now)
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Delays between retries: exponential from 500 ms, jittered, capped at 30 s, never ending.
pub fn retry_delays() -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times()
        .build()
}

/// A token bucket: `burst` sends at once, refilled at `per_second`.
struct Bucket {
    rate: SendRate,
    tokens: f64,
    refilled: Instant,
}

impl Bucket {
    /// Starts empty: the number's previous pacer (before a restart of the actor or the node)
    /// may have spent the account's burst moments ago, and the network remembers.
    fn new(rate: SendRate) -> Self {
        Self {
            rate,
            tokens: 0.0,
            refilled: Instant::now(),
        }
    }

    async fn take(&mut self) {
        loop {
            let now = Instant::now();
            let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
            self.tokens =
                (self.tokens + elapsed * self.rate.per_second).min(f64::from(self.rate.burst));
            self.refilled = now;
            if self.tokens >= 1.0 - 1e-9 {
                self.tokens = (self.tokens - 1.0).max(0.0);
                return;
            }
            // Whole milliseconds: a wait rounded to nothing by floating point would never let
            // the clock move.
            let wait = (1.0 - self.tokens) / self.rate.per_second.max(1e-3);
            tokio::time::sleep(Duration::from_secs_f64(wait).max(Duration::from_millis(1))).await;
        }
    }

    /// The server said we are over the limit: start from an empty bucket.
    fn drain(&mut self) {
        self.tokens = 0.0;
        self.refilled = Instant::now();
    }
}
