//! The group-commit batcher: one task per store commits the hot-path writes of many callers in
//! one transaction, on `batch_max` writes or `batch_wait` after the first, so throughput is not
//! one fsync per message.
//!
//! Writes keep their queue order: a batch writes inbound rows first, then completions, then sent
//! marks, and a caller only queues a completion or a sent mark for rows it has seen committed.
//! Each write's fence is checked in the same transaction; a fenced write fails alone and the rest
//! of the batch commits.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use sqlx::{Any, AnyPool, Row, Transaction};
use switchboard_actors::store::{Completion, Fence, Recorded, StoreError};
use switchboard_actors::transport::{InboundMessage, MessageId};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{check_fence, db, now_ms, preview, raise_fences, to_i64, values};

/// Rows per statement: well under both dialects' bind-parameter limits.
const ROWS_PER_STATEMENT: usize = 400;

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
    /// Complete a processed message.
    Complete {
        fence: Fence,
        done: Completion,
        reply: oneshot::Sender<Result<Vec<MessageId>, StoreError>>,
    },
    /// Mark an outbox row sent.
    Sent {
        fence: Fence,
        id: MessageId,
        reply: oneshot::Sender<Result<bool, StoreError>>,
    },
}

impl Op {
    fn fence(&self) -> &Fence {
        match self {
            Self::Inbound { fence, .. }
            | Self::Complete { fence, .. }
            | Self::Sent { fence, .. } => fence,
        }
    }

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
    pub fn spawn(pool: AnyPool, max: usize, wait: Duration) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(pool, rx, max.max(1), wait));
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

async fn run(pool: AnyPool, mut rx: mpsc::UnboundedReceiver<Msg>, max: usize, wait: Duration) {
    let mut closing = None;
    while closing.is_none() {
        let Some(first) = rx.recv().await else {
            return;
        };
        let mut batch = Vec::new();
        match first {
            Msg::Op(op) => batch.push(op),
            Msg::Close(done) => closing = Some(done),
        }
        let deadline = Instant::now() + wait;
        while closing.is_none() && batch.len() < max {
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
        if !batch.is_empty() {
            flush(&pool, batch).await;
        }
    }
    if let Some(done) = closing {
        let _ = done.send(());
    }
}

/// Commits one batch and answers every write in it.
async fn flush(pool: &AnyPool, batch: Vec<Op>) {
    let started = Instant::now();
    let rows = batch.len();
    let mut tx = match pool.begin().await {
        Ok(tx) => tx,
        Err(e) => return fail_all(batch, &db(e)),
    };
    let tokens: Vec<(&str, u64)> = batch
        .iter()
        .map(|op| (op.fence().number.as_str(), op.fence().token.get()))
        .collect();
    let highest = match raise_fences(&mut tx, &tokens).await {
        Ok(h) => h,
        Err(e) => return fail_all(batch, &e),
    };
    let mut parts = Parts::default();
    for op in batch {
        match check_fence(op.fence(), &highest) {
            Ok(()) => parts.push(op),
            Err(e) => op.fail(e),
        }
    }
    match write(&mut tx, &parts).await {
        Ok(outcome) => match tx.commit().await {
            Ok(()) => {
                metrics::histogram!(BATCH_ROWS).record(rows as f64);
                metrics::histogram!(COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
                parts.answer(outcome);
            }
            Err(e) => parts.fail(&db(e)),
        },
        Err(e) => parts.fail(&e),
    }
}

fn fail_all(batch: Vec<Op>, e: &StoreError) {
    for op in batch {
        op.fail(e.clone());
    }
}

/// Where a write's answer goes.
type Reply<T> = oneshot::Sender<Result<T, StoreError>>;
type InboundPart = (Fence, InboundMessage, Reply<Recorded>);
type CompletePart = (Fence, Completion, Reply<Vec<MessageId>>);
type SentPart = (Fence, MessageId, Reply<bool>);

/// The writes of a batch that passed their fence, by kind.
#[derive(Default)]
struct Parts {
    inbound: Vec<InboundPart>,
    complete: Vec<CompletePart>,
    sent: Vec<SentPart>,
}

/// What the statements found, for the answers.
#[derive(Default)]
struct Outcome {
    /// Inbound keys newly inserted.
    new_inbound: HashSet<(String, String, String, String)>,
    /// Inbound keys already there, with whether they were processed.
    duplicates: HashMap<(String, String, String, String), bool>,
    /// Outbox rows newly queued: (number, message id).
    queued: HashSet<(String, String)>,
    /// Outbox rows newly marked sent.
    marked: HashSet<(String, String)>,
}

impl Parts {
    fn push(&mut self, op: Op) {
        match op {
            Op::Inbound { fence, msg, reply } => self.inbound.push((fence, msg, reply)),
            Op::Complete { fence, done, reply } => self.complete.push((fence, done, reply)),
            Op::Sent { fence, id, reply } => self.sent.push((fence, id, reply)),
        }
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

    fn answer(self, mut out: Outcome) {
        for (fence, msg, reply) in self.inbound {
            let key = inbound_key(&fence, &msg);
            // The same message twice in one batch: the first write is the new one.
            let recorded = if out.new_inbound.remove(&key) {
                Recorded::New
            } else {
                Recorded::Duplicate {
                    processed: out.duplicates.get(&key).copied().unwrap_or(false),
                }
            };
            let _ = reply.send(Ok(recorded));
        }
        for (fence, done, reply) in self.complete {
            let number = fence.number.as_str();
            let queued = done
                .replies
                .iter()
                .filter(|r| out.queued.contains(&(number.to_owned(), r.id.to_string())))
                .map(|r| r.id.clone())
                .collect();
            let _ = reply.send(Ok(queued));
        }
        for (fence, id, reply) in self.sent {
            let key = (fence.number.to_string(), id.to_string());
            let _ = reply.send(Ok(out.marked.contains(&key)));
        }
    }
}

fn inbound_key(fence: &Fence, msg: &InboundMessage) -> (String, String, String, String) {
    (
        fence.number.to_string(),
        msg.chat.to_string(),
        msg.sender.to_string(),
        msg.id.to_string(),
    )
}

async fn write(tx: &mut Transaction<'static, Any>, parts: &Parts) -> Result<Outcome, StoreError> {
    let mut out = Outcome::default();
    let now = now_ms();
    insert_inbound(tx, &parts.inbound, now, &mut out).await?;
    complete(tx, &parts.complete, now, &mut out).await?;
    mark_sent(tx, &parts.sent, now, &mut out).await?;
    Ok(out)
}

async fn insert_inbound(
    tx: &mut Transaction<'static, Any>,
    rows: &[InboundPart],
    now: i64,
    out: &mut Outcome,
) -> Result<(), StoreError> {
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO inbound (number, chat, sender, message_id, sender_alt, body, preview, \
             sent_at, received_at) VALUES {} ON CONFLICT (number, chat, sender, message_id) \
             DO NOTHING RETURNING number, chat, sender, message_id",
            values(chunk.len(), 9)
        );
        let mut q = sqlx::query(&sql);
        for (fence, msg, _) in chunk {
            q = q
                .bind(fence.number.as_str())
                .bind(msg.chat.to_string())
                .bind(msg.sender.to_string())
                .bind(msg.id.as_str())
                .bind(msg.sender_alt.as_ref().map(ToString::to_string))
                .bind(msg.text.as_str())
                .bind(preview(&msg.text))
                .bind(to_i64(msg.timestamp_ms))
                .bind(now);
        }
        for row in q.fetch_all(&mut **tx).await.map_err(db)? {
            out.new_inbound.insert(key_of(&row)?);
        }
    }
    for (fence, msg, _) in rows {
        let key = inbound_key(fence, msg);
        if out.new_inbound.contains(&key) || out.duplicates.contains_key(&key) {
            continue;
        }
        let status: Option<String> = sqlx::query_scalar(
            "SELECT status FROM inbound WHERE number = $1 AND chat = $2 AND sender = $3 \
             AND message_id = $4",
        )
        .bind(&key.0)
        .bind(&key.1)
        .bind(&key.2)
        .bind(&key.3)
        .fetch_optional(&mut **tx)
        .await
        .map_err(db)?;
        out.duplicates
            .insert(key, status.is_some_and(|s| s != "pending"));
    }
    Ok(())
}

fn key_of(row: &sqlx::any::AnyRow) -> Result<(String, String, String, String), StoreError> {
    Ok((
        row.try_get(0).map_err(db)?,
        row.try_get(1).map_err(db)?,
        row.try_get(2).map_err(db)?,
        row.try_get(3).map_err(db)?,
    ))
}

/// Marks messages processed (dropping the whole text unless the tenant keeps transcripts),
/// queues their replies and saves the chats' checkpoints.
async fn complete(
    tx: &mut Transaction<'static, Any>,
    rows: &[CompletePart],
    now: i64,
    out: &mut Outcome,
) -> Result<(), StoreError> {
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "UPDATE inbound SET status = 'processed', processed_at = $1, body = CASE WHEN \
             (SELECT t.full_transcripts FROM numbers n JOIN tenants t ON t.id = n.tenant_id \
             WHERE n.number = inbound.number) THEN body ELSE NULL END \
             WHERE status = 'pending' AND (number, chat, sender, message_id) IN (VALUES {})",
            super::values_from(2, chunk.len(), 4)
        );
        let mut q = sqlx::query(&sql).bind(now);
        for (fence, done, _) in chunk {
            q = q
                .bind(fence.number.as_str())
                .bind(done.chat.to_string())
                .bind(done.sender.to_string())
                .bind(done.inbound.as_str());
        }
        q.execute(&mut **tx).await.map_err(db)?;
    }
    let replies: Vec<_> = rows
        .iter()
        .flat_map(|(fence, done, _)| done.replies.iter().map(move |r| (fence, r)))
        .collect();
    for chunk in replies.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO outbox (number, message_id, chat, body, reply_to, created_at) \
             VALUES {} ON CONFLICT (number, message_id) DO NOTHING RETURNING number, message_id",
            values(chunk.len(), 6)
        );
        let mut q = sqlx::query(&sql);
        for (fence, r) in chunk {
            q = q
                .bind(fence.number.as_str())
                .bind(r.id.as_str())
                .bind(r.to.to_string())
                .bind(r.text.as_str())
                .bind(r.reply_to.as_ref().map(|id| id.as_str().to_owned()))
                .bind(now);
        }
        for row in q.fetch_all(&mut **tx).await.map_err(db)? {
            out.queued
                .insert((row.try_get(0).map_err(db)?, row.try_get(1).map_err(db)?));
        }
    }
    save_checkpoints(tx, rows, now).await
}

async fn save_checkpoints(
    tx: &mut Transaction<'static, Any>,
    rows: &[CompletePart],
    now: i64,
) -> Result<(), StoreError> {
    // One row per chat (the latest): an upsert may not touch a row twice in one statement.
    let mut latest: HashMap<(&str, String), String> = HashMap::new();
    for (fence, done, _) in rows {
        let json = serde_json::to_string(&done.checkpoint)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        latest.insert((fence.number.as_str(), done.chat.to_string()), json);
    }
    let latest: Vec<_> = latest.into_iter().collect();
    for chunk in latest.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "INSERT INTO conversations (number, chat, checkpoint, updated_at) VALUES {} \
             ON CONFLICT (number, chat) DO UPDATE SET checkpoint = excluded.checkpoint, \
             updated_at = excluded.updated_at",
            values(chunk.len(), 4)
        );
        let mut q = sqlx::query(&sql);
        for ((number, chat), json) in chunk {
            q = q
                .bind(*number)
                .bind(chat.as_str())
                .bind(json.as_str())
                .bind(now);
        }
        q.execute(&mut **tx).await.map_err(db)?;
    }
    Ok(())
}

async fn mark_sent(
    tx: &mut Transaction<'static, Any>,
    rows: &[SentPart],
    now: i64,
    out: &mut Outcome,
) -> Result<(), StoreError> {
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "UPDATE outbox SET status = 'sent', sent_at = $1 WHERE status <> 'sent' AND \
             (number, message_id) IN (VALUES {}) RETURNING number, message_id",
            super::values_from(2, chunk.len(), 2)
        );
        let mut q = sqlx::query(&sql).bind(now);
        for (fence, id, _) in chunk {
            q = q.bind(fence.number.as_str()).bind(id.as_str());
        }
        for row in q.fetch_all(&mut **tx).await.map_err(db)? {
            out.marked
                .insert((row.try_get(0).map_err(db)?, row.try_get(1).map_err(db)?));
        }
    }
    Ok(())
}
