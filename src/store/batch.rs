//! The group-commit batcher: one task per store commits the hot-path writes of many callers in
//! one transaction, on `batch_max` writes or `batch_wait` after the first, so throughput is not
//! one fsync per message.
//!
//! A caller only queues a completion or a sent mark for rows it has seen committed, so batches
//! never depend on each other and PostgreSQL commits several at once (SQLite: one at a time, it
//! has one writer). Each write's fence is checked in the same transaction: PostgreSQL holds the
//! fence rows `FOR SHARE` and the numbers `FOR KEY SHARE` (concurrent batches share them; taking
//! ownership or removing the number waits for them); a fenced write (or one for a number that
//! is not registered) fails alone and the rest of the batch commits. A batch that loses a deadlock
//! or serialization race is rolled back and tried again whole: every write in it is idempotent
//! (PostgreSQL: until its first statement has committed; after that, failures are answered to the
//! writes they concern). The statements are in `write`.

mod write;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use sqlx::AnyPool;
use switchboard_actors::store::{Completion, Fence, OutageKind, Recorded, StoreError};
use switchboard_actors::transport::{InboundMessage, MessageId};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use super::health::Watch;
use super::{Dialect, check_fence};

/// Times a batch that lost a deadlock is tried again before its writes fail.
const RETRIES: u32 = 3;

/// `switchboard_store_batch_rows`: writes per committed batch.
pub const BATCH_ROWS: &str = "switchboard_store_batch_rows";
/// `switchboard_store_commit_seconds`: time to commit one batch.
pub const COMMIT_SECONDS: &str = "switchboard_store_commit_seconds";

/// One queued write.
pub enum Op {
    /// Record an inbound message.
    Inbound {
        fence: Fence,
        msg: InboundMessage,
        reply: oneshot::Sender<Result<Recorded, StoreError>>,
    },
    /// Complete a processed message; `unlogged` is the message itself if it is to be recorded
    /// with its completion (the answer is `None` if the log had it processed already).
    Complete {
        fence: Fence,
        done: Completion,
        unlogged: Option<Box<InboundMessage>>,
        reply: oneshot::Sender<Result<Option<Vec<MessageId>>, StoreError>>,
    },
    /// Mark an outbox row sent.
    Sent {
        fence: Fence,
        id: MessageId,
        reply: oneshot::Sender<Result<bool, StoreError>>,
    },
}

impl Op {
    fn fail(self, e: StoreError) {
        match self {
            Self::Inbound { reply, .. } => drop(reply.send(Err(e))),
            Self::Complete { reply, .. } => drop(reply.send(Err(e))),
            Self::Sent { reply, .. } => drop(reply.send(Err(e))),
        }
    }
}

enum Msg {
    Op(Op),
    Close(oneshot::Sender<()>),
}

/// Queues writes to the batcher.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::UnboundedSender<Msg>,
}

impl Handle {
    /// Starts the batcher of `pool`.
    pub fn spawn(
        pool: AnyPool,
        dialect: Dialect,
        max: usize,
        wait: Duration,
        watch: Watch,
    ) -> Self {
        // Unbounded, bounded upstream: every write comes from a message a number's intake holds
        // (`runtime.intake_max_pending`), or from a reply in its backlog
        // (`runtime.outbound_max_queued`), and a caller waits for its write's answer before it
        // writes that again.
        let (tx, rx) = mpsc::unbounded_channel();
        let in_flight = match dialect {
            Dialect::Sqlite => 1,
            Dialect::Postgres => 4,
        };
        let batcher = Batcher {
            pool,
            dialect,
            max: max.max(1),
            wait,
            in_flight,
            watch,
        };
        tokio::spawn(batcher.run(rx));
        Self { tx }
    }

    /// Queues `op`; it fails with [`StoreError::Closed`] if the batcher has stopped.
    pub fn push(&self, op: Op) {
        if let Err(mpsc::error::SendError(Msg::Op(op))) = self.tx.send(Msg::Op(op)) {
            op.fail(StoreError::Closed);
        }
    }

    /// Commits what is queued, then stops.
    pub async fn close(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Close(done)).is_ok() {
            let _ = wait.await;
        }
    }
}

struct Batcher {
    pool: AnyPool,
    dialect: Dialect,
    max: usize,
    wait: Duration,
    /// Batches committing at once.
    in_flight: usize,
    /// Told how each batch went: the store's health.
    watch: Watch,
}

impl Batcher {
    async fn run(self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let permits = Arc::new(Semaphore::new(self.in_flight));
        let mut closing = None;
        // Whether the database's own caches may hold memory a quiet store can give back.
        let mut used = false;
        while closing.is_none() {
            let first = if used {
                match tokio::time::timeout(QUIET, rx.recv()).await {
                    Ok(first) => first,
                    Err(_) => {
                        used = false;
                        self.release_memory().await;
                        continue;
                    }
                }
            } else {
                rx.recv().await
            };
            let Some(first) = first else {
                break;
            };
            used = true;
            let mut batch = Vec::new();
            match first {
                Msg::Op(op) => batch.push(op),
                Msg::Close(done) => closing = Some(done),
            }
            let deadline = Instant::now() + self.wait;
            while closing.is_none() && batch.len() < self.max {
                // Take what is already queued without waiting, then wait out the deadline.
                let next = match rx.try_recv() {
                    Ok(m) => Some(m),
                    Err(_) => tokio::time::timeout_at(deadline, rx.recv())
                        .await
                        .ok()
                        .flatten(),
                };
                match next {
                    Some(Msg::Op(op)) => batch.push(op),
                    Some(Msg::Close(done)) => closing = Some(done),
                    None => break,
                }
            }
            if batch.is_empty() {
                continue;
            }
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            let (pool, dialect, watch) = (self.pool.clone(), self.dialect, self.watch.clone());
            tokio::spawn(async move {
                watch.wrote(&flush(&pool, dialect, batch).await);
                drop(permit);
            });
        }
        // Every batch in flight has committed before the close is answered.
        let all = u32::try_from(self.in_flight).unwrap_or(u32::MAX);
        let _ = permits.acquire_many(all).await;
        if let Some(done) = closing {
            let _ = done.send(());
        }
    }
}

/// A store without writes for this long gives back the memory its database caches hold.
const QUIET: Duration = Duration::from_secs(10);

impl Batcher {
    /// SQLite keeps up to its `cache_size` of pages in the process; a quiet embedded store
    /// returns them (they are read again from the operating system's cache when needed).
    /// PostgreSQL's caches live in its own processes.
    async fn release_memory(&self) {
        if self.dialect == Dialect::Sqlite
            && let Err(e) = sqlx::query("PRAGMA shrink_memory")
                .execute(&self.pool)
                .await
        {
            tracing::debug!(error = %e, "releasing the database's cache");
        }
    }
}

/// Commits one batch and answers every write in it. A batch the database refuses as a whole
/// (nothing of it committed) is split in halves, each committed on its own, down to the one
/// write it refuses: that write alone is answered with the refusal. Returns how the batch went
/// (an outage fails every write; the callers wait it out and write again).
pub async fn flush(pool: &AnyPool, dialect: Dialect, batch: Vec<Op>) -> Result<(), StoreError> {
    let started = Instant::now();
    let rows = batch.len();
    let mut parts = Parts::default();
    for op in batch {
        parts.push(op);
    }
    parts.sort();
    let mut attempt = 0;
    loop {
        match attempt_once(pool, dialect, &parts).await {
            Ok((outcome, highest)) => {
                metrics::histogram!(BATCH_ROWS).record(rows as f64);
                metrics::histogram!(COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
                parts.answer(outcome, &highest);
                return Ok(());
            }
            Err(StoreError::Refused(e)) if rows > 1 => {
                tracing::warn!(rows, error = %e, "batch refused; committing it in halves");
                let mut first = parts.into_ops();
                let second = first.split_off(first.len() / 2);
                Box::pin(flush(pool, dialect, first)).await?;
                return Box::pin(flush(pool, dialect, second)).await;
            }
            Err(StoreError::Unavailable(e))
                if e.kind == OutageKind::Contention && attempt < RETRIES =>
            {
                attempt += 1;
                tracing::debug!(attempt, error = %e, "batch lost a race; trying again");
            }
            Err(e) => {
                parts.fail(&e);
                // A refusal is the write's own: it says nothing about the store's health.
                return if e.is_retryable() { Err(e) } else { Ok(()) };
            }
        }
    }
}

/// One try: write what passes its fence; returns what was written and the highest token per
/// number.
async fn attempt_once(
    pool: &AnyPool,
    dialect: Dialect,
    parts: &Parts,
) -> Result<(Outcome, HashMap<String, u64>), StoreError> {
    match dialect {
        Dialect::Postgres => write::postgres(pool, parts).await,
        Dialect::Sqlite => write::sqlite(pool, parts).await,
    }
}

/// An inbound row's key: number, chat, sender, message id.
type InboundKey = (String, String, String, String);

/// Where a write's answer goes.
type Reply<T> = oneshot::Sender<Result<T, StoreError>>;
type InboundPart = (Fence, InboundMessage, Reply<Recorded>);
type CompletePart = (
    Fence,
    Completion,
    Option<Box<InboundMessage>>,
    Reply<Option<Vec<MessageId>>>,
);
type SentPart = (Fence, MessageId, Reply<bool>);

/// The writes of a batch, by kind.
#[derive(Default)]
struct Parts {
    inbound: Vec<InboundPart>,
    complete: Vec<CompletePart>,
    sent: Vec<SentPart>,
}

/// What the statements found, for the answers.
#[derive(Default)]
struct Outcome {
    /// What was written.
    written: Written,
    /// Inbound keys already there, with whether they were processed.
    duplicates: HashMap<InboundKey, bool>,
    /// Writes (by number and token) that failed after other writes of the batch had committed.
    failed: HashMap<(String, u64), StoreError>,
    /// Why inbound writes that were already there could not be looked up, if they could not.
    lookup_failed: Option<StoreError>,
}

/// The rows written, by kind; `None` where every row given was written (the usual case, which
/// then needs no lookups).
#[derive(Default)]
struct Written {
    /// Inbound keys newly inserted.
    new_inbound: Option<HashSet<InboundKey>>,
    /// Completions of unlogged messages that were written (the message was not in the log, or
    /// was pending there).
    applied: Option<HashSet<InboundKey>>,
    /// Outbox rows newly queued: (number, message id).
    queued: Option<HashSet<(String, String)>>,
    /// Outbox rows newly marked sent.
    marked: Option<HashSet<(String, String)>>,
}

impl Parts {
    /// Rows in key order, so concurrent batches take row locks in the same order.
    fn sort(&mut self) {
        self.inbound.sort_by(|(fa, a, _), (fb, b, _)| {
            (&fa.number, &a.chat, &a.sender, &a.id).cmp(&(&fb.number, &b.chat, &b.sender, &b.id))
        });
        self.complete
            .sort_by(|(fa, a, ..), (fb, b, ..)| (&fa.number, &a.chat).cmp(&(&fb.number, &b.chat)));
        self.sent
            .sort_by(|a, b| (&a.0.number, &a.1).cmp(&(&b.0.number, &b.1)));
    }

    fn push(&mut self, op: Op) {
        match op {
            Op::Inbound { fence, msg, reply } => self.inbound.push((fence, msg, reply)),
            Op::Complete {
                fence,
                done,
                unlogged,
                reply,
            } => self.complete.push((fence, done, unlogged, reply)),
            Op::Sent { fence, id, reply } => self.sent.push((fence, id, reply)),
        }
    }

    /// The writes again, to be committed in another batch.
    fn into_ops(self) -> Vec<Op> {
        let inbound = self
            .inbound
            .into_iter()
            .map(|(fence, msg, reply)| Op::Inbound { fence, msg, reply });
        let complete = self
            .complete
            .into_iter()
            .map(|(fence, done, unlogged, reply)| Op::Complete {
                fence,
                done,
                unlogged,
                reply,
            });
        let sent = self
            .sent
            .into_iter()
            .map(|(fence, id, reply)| Op::Sent { fence, id, reply });
        inbound.chain(complete).chain(sent).collect()
    }

    fn fail(self, e: &StoreError) {
        for (.., reply) in self.inbound {
            let _ = reply.send(Err(e.clone()));
        }
        for (.., reply) in self.complete {
            let _ = reply.send(Err(e.clone()));
        }
        for (.., reply) in self.sent {
            let _ = reply.send(Err(e.clone()));
        }
    }

    fn answer(self, mut out: Outcome, highest: &HashMap<String, u64>) {
        let refused = |fence: &Fence| {
            if !out.failed.is_empty() {
                let key = (fence.number.to_string(), fence.token.get());
                if let Some(e) = out.failed.get(&key) {
                    return Some(e.clone());
                }
            }
            check_fence(fence, highest).err()
        };
        for (fence, msg, reply) in self.inbound {
            if let Some(e) = refused(&fence) {
                let _ = reply.send(Err(e));
                continue;
            }
            let Some(new) = &mut out.written.new_inbound else {
                let _ = reply.send(Ok(Recorded::New));
                continue;
            };
            let key = inbound_key(&fence, &msg);
            // The same message twice in one batch: the first write is the new one.
            let recorded = if new.remove(&key) {
                Ok(Recorded::New)
            } else if let Some(processed) = out.duplicates.get(&key) {
                Ok(Recorded::Duplicate {
                    processed: *processed,
                })
            } else if let Some(e) = &out.lookup_failed {
                Err(e.clone())
            } else {
                Ok(Recorded::Duplicate { processed: false })
            };
            let _ = reply.send(recorded);
        }
        for (fence, done, unlogged, reply) in self.complete {
            if let Some(e) = refused(&fence) {
                let _ = reply.send(Err(e));
                continue;
            }
            if let (Some(msg), Some(applied)) = (unlogged, &out.written.applied)
                && !applied.contains(&inbound_key(&fence, &msg))
            {
                let _ = reply.send(Ok(None));
                continue;
            }
            let number = fence.number.as_str();
            let queued = done
                .replies
                .iter()
                .filter(|r| {
                    out.written.queued.as_ref().is_none_or(|queued| {
                        queued.contains(&(number.to_owned(), r.id.to_string()))
                    })
                })
                .map(|r| r.id.clone())
                .collect();
            let _ = reply.send(Ok(Some(queued)));
        }
        for (fence, id, reply) in self.sent {
            if let Some(e) = refused(&fence) {
                let _ = reply.send(Err(e));
                continue;
            }
            let marked =
                out.written.marked.as_ref().is_none_or(|marked| {
                    marked.contains(&(fence.number.to_string(), id.to_string()))
                });
            let _ = reply.send(Ok(marked));
        }
    }
}

fn inbound_key(fence: &Fence, msg: &InboundMessage) -> InboundKey {
    (
        fence.number.to_string(),
        msg.chat.to_string(),
        msg.sender.to_string(),
        msg.id.to_string(),
    )
}
