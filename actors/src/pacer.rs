//! The outbound pacer: one task per number that sends the number's outbox in order, under the
//! account's rate limit, with a typing indicator proportional to the length.
//!
//! Exactly once in effect: a reply keeps the id it was given when it was queued, for every
//! attempt. It is marked sent in the outbox when its echo arrives (the number's session sink does
//! that, and acknowledges the echo only once the mark is committed, so an echo lost to a crash is
//! redelivered): one write per reply, made by one party. A send whose outcome is unknown (the
//! connection dropped before the server's ack, or the node restarted) is not retried blindly:
//! the pacer waits until the next connection's offline sync has completed. By then the network
//! has redelivered the echo of every send it received, the session sink has confirmed those
//! ([`PacerHandle::confirmed`]) in the session's order, ahead of the sync marker, and only the
//! sends the network never saw are tried again. A reply handed over again after a lost commit
//! answer ([`PacerHandle::recover`]) is sent only if the pacer has not handled its id.
//!
//! A task rather than an actor: it spends its life waiting on timers and server acks, which would
//! block an actor's mailbox. It is cancelled with the number's token.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::deps::{Deps, FleetCounters, NumberResources, SendRate};
use crate::store::{Fence, StoreError};
use crate::telemetry::{MESSAGES_SENT, OUTBOUND_QUEUE};
use crate::transport::{MessageId, OutboundText, SendError, WaSession};

/// A send whose outcome is unknown is tried again after this long even if no new offline sync
/// came (the connection stayed up but the server's ack never arrived).
const UNSETTLED_WAIT: Duration = Duration::from_secs(30);

/// How many message ids the pacer remembers as handled (sent, given up or confirmed), so that a
/// reply handed over again ([`PacerHandle::recover`]) is not sent twice. A handled reply leaves
/// the outbox's unsent rows once its sent mark commits (well under a second), so the memory
/// only has to cover the replies of that window; an account sends a few per second at most.
const HANDLED_MEMORY: usize = 256;

/// Sends that fail this many times in a row (not counting waits for a connection) are given up
/// and marked failed in the outbox.
const MAX_ATTEMPTS: u32 = 20;

/// What the pacer is told.
#[derive(Debug)]
enum Command {
    /// Send this reply (already committed to the outbox).
    Send(OutboundText),
    /// Send this reply unless it was handled already (see [`PacerHandle::recover`]).
    Recover(OutboundText),
    /// The network has this message (its echo arrived): never send it again.
    Confirmed(MessageId),
    /// The session finished its offline sync: unknown outcomes are settled.
    Synced,
}

/// Talks to a number's pacer.
#[derive(Debug, Clone)]
pub struct PacerHandle {
    tx: mpsc::UnboundedSender<Command>,
}

impl PacerHandle {
    /// Queues a reply that is committed to the outbox; false if the pacer has stopped.
    pub fn enqueue(&self, msg: OutboundText) -> bool {
        let queued = self.tx.send(Command::Send(msg)).is_ok();
        if queued {
            metrics::gauge!(OUTBOUND_QUEUE).increment(1.0);
        }
        queued
    }

    /// Hands over a reply found unsent in the outbox that this pacer may never have been given:
    /// its completion was committed but the answer was lost (the connection dropped at commit),
    /// so the conversation could not tell it was newly queued. It is sent unless this pacer has
    /// it queued or has sent, given up or seen confirmed that id.
    pub fn recover(&self, msg: OutboundText) {
        if self.tx.send(Command::Recover(msg)).is_ok() {
            metrics::gauge!(OUTBOUND_QUEUE).increment(1.0);
        }
    }

    /// The network has `id`: drop it from the queue.
    pub fn confirmed(&self, id: MessageId) {
        let _ = self.tx.send(Command::Confirmed(id));
    }

    /// The session's offline sync completed.
    pub fn synced(&self) {
        let _ = self.tx.send(Command::Synced);
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
        resources,
        deps: deps.clone(),
        fence,
        queue: Queue::default(),
        synced: false,
        settle_by: None,
    };
    tokio::spawn(pacer.run(rx));
    PacerHandle { tx }
}

struct Pacer {
    bucket: Bucket,
    typing_per_char: Duration,
    typing_max: Duration,
    resources: Arc<NumberResources>,
    deps: Deps,
    fence: Fence,
    queue: Queue,
    /// Whether sends may go out: false until the session's offline sync, and again after a send
    /// whose outcome is unknown.
    synced: bool,
    /// When an unknown outcome is settled by waiting if no sync comes first.
    settle_by: Option<Instant>,
}

/// How one delivery ended.
enum Outcome {
    /// Acknowledged, given up, or confirmed: next message.
    Done,
    /// Unknown or not connected: wait for the next sync, then try again.
    Unsettled,
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
            let next = if self.synced { self.next() } else { None };
            let Some(msg) = next else {
                let settle_by = self.settle_by;
                tokio::select! {
                    () = cancel.cancelled() => break,
                    cmd = rx.recv() => match cmd {
                        Some(cmd) => self.apply(cmd),
                        None => break,
                    },
                    () = sleep_until(settle_by) => {
                        self.synced = true;
                        self.settle_by = None;
                    }
                }
                continue;
            };
            let outcome = tokio::select! {
                () = cancel.cancelled() => break,
                outcome = self.deliver(&msg) => outcome,
            };
            match outcome {
                Outcome::Done => self.queue.handled(msg.id),
                Outcome::Unsettled => {
                    self.synced = false;
                    self.settle_by = Some(Instant::now() + UNSETTLED_WAIT);
                    self.queue.push_front(msg);
                }
            }
        }
        metrics::gauge!(OUTBOUND_QUEUE).decrement(self.queue.len() as f64);
        let left = rx.len();
        if left > 0 {
            metrics::gauge!(OUTBOUND_QUEUE).decrement(left as f64);
        }
    }

    /// Loads what earlier owners of the number left unsent. Their outcome is unknown until the
    /// first offline sync.
    async fn load(&mut self) {
        let mut delays = retry_delays();
        loop {
            match self.deps.store.unsent(&self.fence.number).await {
                Ok(rows) => {
                    for row in rows {
                        self.queue.push_back(row);
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

    fn apply(&mut self, cmd: Command) {
        match cmd {
            Command::Send(msg) => {
                // `enqueue` counted it; the queue counts what it keeps.
                metrics::gauge!(OUTBOUND_QUEUE).decrement(1.0);
                self.queue.push_back(msg);
            }
            Command::Recover(msg) => {
                metrics::gauge!(OUTBOUND_QUEUE).decrement(1.0);
                if !self.queue.handled.contains(&msg.id) {
                    self.queue.push_back(msg);
                }
            }
            Command::Confirmed(id) => self.queue.confirm(id),
            Command::Synced => {
                self.synced = true;
                self.settle_by = None;
            }
        }
    }

    /// The next message to send, skipping the confirmed ones.
    fn next(&mut self) -> Option<OutboundText> {
        self.queue.pop_front()
    }

    /// Sends one message, retrying a refusal for rate with backoff; reports an unknown outcome.
    async fn deliver(&mut self, msg: &OutboundText) -> Outcome {
        let mut delays = retry_delays();
        let mut attempts = 0;
        loop {
            let Some(session) = self.resources.session() else {
                return Outcome::Unsettled;
            };
            self.type_for(msg, session.as_ref()).await;
            // The token is taken right before the send, so the network sees sends spaced by the
            // bucket whatever the typing times were.
            self.bucket.take().await;
            let outcome = session.send_text(msg.clone()).await;
            metrics::counter!(MESSAGES_SENT, "outcome" => label(&outcome)).increment(1);
            attempts += 1;
            let error = match outcome {
                Ok(_) => {
                    FleetCounters::bump(&self.deps.counters.messages_out);
                    return Outcome::Done;
                }
                Err(SendError::Refused(reason)) => {
                    tracing::warn!(message_id = %msg.id, %reason, "send refused by the server");
                    self.failed(msg, reason, true);
                    return Outcome::Done;
                }
                Err(SendError::RateOverlimit) => {
                    self.bucket.drain();
                    "rate-overlimit"
                }
                Err(SendError::NotConnected | SendError::Timeout(_) | SendError::Closed) => {
                    return Outcome::Unsettled;
                }
            };
            if attempts >= MAX_ATTEMPTS {
                self.failed(msg, error.to_owned(), true);
                return Outcome::Done;
            }
            self.failed(msg, error.to_owned(), false);
            tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(30))).await;
        }
    }

    /// Records a failed attempt in the outbox, off the send path.
    fn failed(&self, msg: &OutboundText, error: String, give_up: bool) {
        let store = self.deps.store.clone();
        let fence = self.fence.clone();
        let id = msg.id.clone();
        let resources = self.resources.clone();
        tokio::spawn(async move {
            match store.send_failed(&fence, &id, &error, give_up).await {
                Ok(()) => {}
                Err(StoreError::Fenced { .. }) => {
                    tracing::warn!(number = %fence.number, "outbox write fenced; stopping sends");
                    resources.cancel.cancel();
                }
                Err(e) => tracing::warn!(message_id = %id, error = %e, "recording a send"),
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
}

/// The replies waiting to be sent, in order, each once; counted in the queue-depth gauge.
#[derive(Default)]
struct Queue {
    order: VecDeque<OutboundText>,
    ids: HashSet<MessageId>,
    /// Ids the network is known to have, among those queued.
    confirmed: HashSet<MessageId>,
    /// The latest ids sent, given up or confirmed (at most [`HANDLED_MEMORY`]), oldest first.
    handled: HashSet<MessageId>,
    handled_order: VecDeque<MessageId>,
}

impl Queue {
    fn push_back(&mut self, msg: OutboundText) {
        if self.ids.insert(msg.id.clone()) {
            metrics::gauge!(OUTBOUND_QUEUE).increment(1.0);
            self.order.push_back(msg);
        }
    }

    fn push_front(&mut self, msg: OutboundText) {
        if self.ids.insert(msg.id.clone()) {
            metrics::gauge!(OUTBOUND_QUEUE).increment(1.0);
            self.order.push_front(msg);
        }
    }

    /// The first message the network does not have yet and that was not handled meanwhile.
    fn pop_front(&mut self) -> Option<OutboundText> {
        while let Some(msg) = self.order.pop_front() {
            self.ids.remove(&msg.id);
            metrics::gauge!(OUTBOUND_QUEUE).decrement(1.0);
            if self.confirmed.remove(&msg.id) {
                self.handled(msg.id);
            } else if !self.handled.contains(&msg.id) {
                return Some(msg);
            }
        }
        None
    }

    fn confirm(&mut self, id: MessageId) {
        if self.ids.contains(&id) {
            self.confirmed.insert(id);
        } else {
            self.handled(id);
        }
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

    fn len(&self) -> usize {
        self.order.len()
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn label<T>(outcome: &Result<T, SendError>) -> &'static str {
    match outcome {
        Ok(_) => "ok",
        Err(SendError::RateOverlimit) => "rate_overlimit",
        Err(SendError::NotConnected) => "not_connected",
        Err(SendError::Timeout(_)) => "timeout",
        Err(SendError::Refused(_)) => "refused",
        Err(SendError::Closed) => "closed",
    }
}

/// Delays between retries: exponential from 500 ms, jittered, capped at 30 s, never ending.
pub fn retry_delays() -> impl Iterator<Item = Duration> {
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
            if self.tokens >= 1.0 {
                self.tokens -= 1.0;
                return;
            }
            let wait = (1.0 - self.tokens) / self.rate.per_second.max(1e-3);
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
        }
    }

    /// The server said we are over the limit: start from an empty bucket.
    fn drain(&mut self) {
        self.tokens = 0.0;
        self.refilled = Instant::now();
    }
}
