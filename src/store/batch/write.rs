//! The statements of a batch.
//!
//! PostgreSQL writes the whole batch in one statement of data-modifying CTEs (the fence lock,
//! the inbound rows, the processed marks, the checkpoints, the queued replies and the sent
//! marks) that commits on its own: one round trip, one prepared statement, one cached plan. The
//! CTEs see one snapshot, which is safe here: a completion or a sent mark only ever refers to
//! rows of an earlier, committed batch. SQLite is local and runs the statements one by one in a
//! transaction.

use std::collections::{HashMap, HashSet};

use sqlx::any::AnyRow;
use sqlx::{Any, AnyConnection, AnyPool, Row, Transaction};
use switchboard_actors::store::{Fence, StoreError};
use switchboard_actors::transport::{InboundMessage, MessageId, OutboundText};

use super::{
    CompletePart, InboundKey, InboundPart, Outcome, Parts, RETRIES, SentPart, inbound_key,
};
use crate::store::{
    AnyQuery, Dialect, RETRY_MARK, bind_inbound_row, check_fence, db, lock_fences, now_ms, preview,
    to_i64, values_from,
};

/// Rows of each kind per statement, well under both dialects' bind-parameter limits
/// (completions bring 4 + 4 + 6 × replies parameters each).
const INBOUND_ROWS: usize = 256;
const COMPLETIONS: usize = 128;
const SENT_ROWS: usize = 256;

/// SQLite: one transaction that raises and checks the fences, then writes every part whose
/// fence holds, one statement per kind and chunk. Returns what was written and the highest
/// token per number.
pub(super) async fn sqlite(
    pool: &AnyPool,
    parts: &Parts,
) -> Result<(Outcome, HashMap<String, u64>), StoreError> {
    let mut tx = pool.begin().await.map_err(db)?;
    let all = Selection::new(parts, |_| true);
    let highest = lock_fences(&mut tx, Dialect::Sqlite, &all.tokens()).await?;
    let mut out = Outcome::default();
    let now = now_ms();
    let ok = Selection::new(parts, |fence| check_fence(fence, &highest).is_ok());
    let chunks = [
        ok.inbound.len().div_ceil(INBOUND_ROWS),
        ok.complete.len().div_ceil(COMPLETIONS),
        ok.sent.len().div_ceil(SENT_ROWS),
    ];
    for k in 0..chunks.into_iter().max().unwrap_or(0) {
        let chunk = Chunk {
            inbound: slice(&ok.inbound, k, INBOUND_ROWS),
            complete: slice(&ok.complete, k, COMPLETIONS),
            sent: slice(&ok.sent, k, SENT_ROWS),
            now,
        };
        for row in chunk.sqlite(&mut tx).await? {
            out.record(&row)?;
        }
    }
    out.all_new = out.new_inbound.len() == ok.inbound.len();
    if !out.all_new {
        duplicates(&mut tx, &ok.inbound, &mut out).await?;
    }
    tx.commit().await.map_err(db)?;
    Ok((out, highest))
}

/// PostgreSQL: the whole batch as one statement on its own (autocommit), which locks the fence
/// rows `FOR SHARE` and writes each part whose token equals the stored one. Parts whose token is
/// above the stored one (a new owner's first writes) are then written in a transaction that
/// raises their fences first. Returns what was written and the highest token per number.
///
/// Only the first statement's failure fails the batch (nothing is committed then, so the batch
/// may be tried again whole). After it, failures are answered to the writes they concern.
pub(super) async fn postgres(
    pool: &AnyPool,
    parts: &Parts,
) -> Result<(Outcome, HashMap<String, u64>), StoreError> {
    let now = now_ms();
    let mut out = Outcome::default();
    let mut highest = HashMap::new();
    let all = Selection::new(parts, |_| true);
    for row in all.statement(now)?.fetch_all(pool).await.map_err(db)? {
        if let Some((number, token)) = out.record(&row)? {
            highest.insert(number, token);
        }
    }
    let unraised = |fence: &Fence| {
        highest
            .get(fence.number.as_str())
            .is_none_or(|h| fence.token.get() > *h)
    };
    let raise = Selection::new(parts, unraised);
    if !raise.is_empty() {
        match raise_and_write(pool, &raise, now).await {
            Ok((raised, rows)) => {
                highest.extend(raised);
                for row in rows {
                    if let Some((number, token)) = out.record(&row)? {
                        highest.insert(number, token);
                    }
                }
            }
            Err(e) => {
                for fence in raise.fences() {
                    let key = (fence.number.to_string(), fence.token.get());
                    out.failed.insert(key, e.clone());
                }
            }
        }
    }
    let written = |fence: &Fence| highest.get(fence.number.as_str()) == Some(&fence.token.get());
    let inbound: Vec<&InboundPart> = parts.inbound.iter().filter(|p| written(&p.0)).collect();
    out.all_new = out.new_inbound.len() == inbound.len();
    if !out.all_new {
        let looked_up = match pool.acquire().await.map_err(db) {
            Ok(mut conn) => duplicates(&mut conn, &inbound, &mut out).await,
            Err(e) => Err(e),
        };
        out.lookup_failed = looked_up.err();
    }
    Ok((out, highest))
}

/// Raises the fences of `raise` and writes it, in one transaction (tried again when it loses a
/// deadlock); returns the highest tokens and the statement's rows.
async fn raise_and_write(
    pool: &AnyPool,
    raise: &Selection<'_>,
    now: i64,
) -> Result<(HashMap<String, u64>, Vec<AnyRow>), StoreError> {
    let mut attempt = 0;
    loop {
        let result = async {
            let mut tx = pool.begin().await.map_err(db)?;
            let highest = lock_fences(&mut tx, Dialect::Postgres, &raise.tokens()).await?;
            let rows = raise
                .statement(now)?
                .fetch_all(&mut *tx)
                .await
                .map_err(db)?;
            tx.commit().await.map_err(db)?;
            Ok((highest, rows))
        }
        .await;
        match result {
            Err(StoreError::Unavailable(e)) if e.starts_with(RETRY_MARK) && attempt < RETRIES => {
                attempt += 1;
            }
            other => return other,
        }
    }
}

fn slice<T>(all: &[T], k: usize, size: usize) -> &[T] {
    let start = (k * size).min(all.len());
    &all[start..(start + size).min(all.len())]
}

/// The whole batch as one statement of fixed text: the rows travel as JSON arrays, so the
/// statement is prepared once per connection and its plan is cached, whatever the batch size.
/// `f` locks the fence rows of the batch's numbers `FOR SHARE` (concurrent batches share them;
/// taking ownership waits for them) and every row is written only if its token equals the
/// stored one. Inbound rows marked `done` belong to completions of unlogged messages: they are
/// inserted processed, and such a completion's effects are written only if its message was
/// inserted by `ins` or was pending (`done`), which `ok` collects. The result rows are tagged
/// `f` (a fence: number, token), `i` (new inbound), `p` (an unlogged completion written), `q`
/// (queued reply) and `s` (marked sent).
const POSTGRES_BATCH: &str = "WITH \
    f AS (SELECT fences.number, fences.token, t.full_transcripts FROM fences \
        JOIN numbers ON numbers.number = fences.number \
        JOIN tenants t ON t.id = numbers.tenant_id \
        JOIN json_to_recordset($7::json) AS w(number text) ON w.number = fences.number \
        ORDER BY fences.number FOR SHARE OF fences FOR KEY SHARE OF numbers), \
    ins AS (INSERT INTO inbound (number, chat, sender, message_id, sender_alt, body, preview, \
            sent_at, received_at, status, processed_at) \
        SELECT x.number, chat, sender, message_id, sender_alt, \
            CASE WHEN x.done AND NOT f.full_transcripts THEN NULL ELSE body END, preview, \
            sent_at, $6, CASE WHEN x.done THEN 'processed' ELSE 'pending' END, \
            CASE WHEN x.done THEN $6 END \
        FROM json_to_recordset($1::json) AS x(number text, token bigint, chat text, \
            sender text, message_id text, sender_alt text, body text, preview text, \
            sent_at bigint, done boolean) \
        JOIN f ON f.number = x.number AND f.token = x.token \
        ON CONFLICT (number, chat, sender, message_id) DO NOTHING \
        RETURNING number, chat, sender, message_id, status), \
    done AS (UPDATE inbound SET status = 'processed', processed_at = $6, \
            body = CASE WHEN f.full_transcripts THEN inbound.body ELSE NULL END \
        FROM json_to_recordset($2::json) AS d(number text, token bigint, chat text, \
            sender text, message_id text, unlogged boolean) \
        JOIN f ON f.number = d.number AND f.token = d.token \
        WHERE inbound.status = 'pending' AND inbound.number = d.number \
            AND inbound.chat = d.chat AND inbound.sender = d.sender \
            AND inbound.message_id = d.message_id \
        RETURNING inbound.number, inbound.chat, inbound.sender, inbound.message_id, \
            d.unlogged), \
    ok AS (SELECT number, chat, sender, message_id FROM ins WHERE status = 'processed' \
        UNION ALL SELECT number, chat, sender, message_id FROM done WHERE unlogged), \
    saved AS (INSERT INTO conversations (number, chat, checkpoint, updated_at) \
        SELECT c.number, c.chat, checkpoint, $6 \
        FROM json_to_recordset($3::json) AS c(number text, token bigint, chat text, \
            checkpoint text, unlogged boolean, sender text, inbound text) \
        JOIN f ON f.number = c.number AND f.token = c.token \
        WHERE NOT c.unlogged OR EXISTS (SELECT 1 FROM ok WHERE ok.number = c.number \
            AND ok.chat = c.chat AND ok.sender = c.sender AND ok.message_id = c.inbound) \
        ON CONFLICT (number, chat) DO UPDATE SET checkpoint = excluded.checkpoint, \
            updated_at = excluded.updated_at), \
    q AS (INSERT INTO outbox (number, message_id, chat, body, reply_to, created_at) \
        SELECT o.number, o.message_id, o.chat, body, reply_to, $6 \
        FROM json_to_recordset($4::json) AS o(number text, token bigint, message_id text, \
            chat text, body text, reply_to text, unlogged boolean, in_chat text, \
            sender text, inbound text) \
        JOIN f ON f.number = o.number AND f.token = o.token \
        WHERE NOT o.unlogged OR EXISTS (SELECT 1 FROM ok WHERE ok.number = o.number \
            AND ok.chat = o.in_chat AND ok.sender = o.sender AND ok.message_id = o.inbound) \
        ON CONFLICT (number, message_id) DO NOTHING RETURNING number, message_id), \
    s AS (UPDATE outbox SET status = 'sent', sent_at = $6 \
        FROM json_to_recordset($5::json) AS m(number text, token bigint, message_id text) \
        JOIN f ON f.number = m.number AND f.token = m.token \
        WHERE outbox.status <> 'sent' AND outbox.number = m.number \
            AND outbox.message_id = m.message_id \
        RETURNING outbox.number, outbox.message_id) \
    SELECT 'f', number, token::text, NULL, NULL FROM f \
    UNION ALL SELECT 'i', number, chat, sender, message_id FROM ins WHERE status = 'pending' \
    UNION ALL SELECT 'p', number, chat, sender, message_id FROM ok \
    UNION ALL SELECT 'q', number, message_id, NULL, NULL FROM q \
    UNION ALL SELECT 's', number, message_id, NULL, NULL FROM s";

#[derive(serde::Serialize)]
struct JsonInbound<'a> {
    number: &'a str,
    token: u64,
    chat: String,
    sender: String,
    message_id: &'a str,
    sender_alt: Option<String>,
    body: &'a str,
    preview: String,
    sent_at: i64,
    /// Recorded already processed (an unlogged message's completion).
    done: bool,
}

#[derive(serde::Serialize)]
struct JsonKey<'a> {
    number: &'a str,
    token: u64,
    chat: String,
    sender: String,
    message_id: &'a str,
    unlogged: bool,
}

#[derive(serde::Serialize)]
struct JsonCheckpoint<'a> {
    number: &'a str,
    token: u64,
    chat: &'a str,
    checkpoint: &'a str,
    /// The completion it belongs to: written only if that was (see [`POSTGRES_BATCH`]).
    unlogged: bool,
    sender: String,
    inbound: &'a str,
}

#[derive(serde::Serialize)]
struct JsonReply<'a> {
    number: &'a str,
    token: u64,
    message_id: &'a str,
    chat: String,
    body: &'a str,
    reply_to: Option<&'a str>,
    /// The completion it belongs to, like [`JsonCheckpoint`]'s.
    unlogged: bool,
    in_chat: String,
    sender: String,
    inbound: &'a str,
}

#[derive(serde::Serialize)]
struct JsonSent<'a> {
    number: &'a str,
    token: u64,
    message_id: &'a str,
}

#[derive(serde::Serialize)]
struct JsonNumber<'a> {
    number: &'a str,
}

/// The parts of a batch one PostgreSQL statement writes.
struct Selection<'a> {
    inbound: Vec<&'a InboundPart>,
    complete: Vec<&'a CompletePart>,
    sent: Vec<&'a SentPart>,
}

impl<'a> Selection<'a> {
    /// The parts whose fence `keep` accepts.
    fn new(parts: &'a Parts, keep: impl Fn(&Fence) -> bool) -> Self {
        Self {
            inbound: parts.inbound.iter().filter(|p| keep(&p.0)).collect(),
            complete: parts.complete.iter().filter(|p| keep(&p.0)).collect(),
            sent: parts.sent.iter().filter(|p| keep(&p.0)).collect(),
        }
    }

    fn is_empty(&self) -> bool {
        self.inbound.is_empty() && self.complete.is_empty() && self.sent.is_empty()
    }

    fn fences(&self) -> impl Iterator<Item = &'a Fence> + '_ {
        let inbound = self.inbound.iter().map(|p| &p.0);
        let complete = self.complete.iter().map(|p| &p.0);
        inbound
            .chain(complete)
            .chain(self.sent.iter().map(|p| &p.0))
    }

    fn tokens(&self) -> Vec<(&'a str, u64)> {
        self.fences()
            .map(|f| (f.number.as_str(), f.token.get()))
            .collect()
    }

    /// [`POSTGRES_BATCH`] with these parts bound.
    fn statement(&self, now: i64) -> Result<AnyQuery<'static>, StoreError> {
        let recorded = self
            .inbound
            .iter()
            .map(|(fence, msg, _)| (fence, msg, false));
        let unlogged = self
            .complete
            .iter()
            .filter_map(|(fence, _, msg, _)| msg.as_deref().map(|msg| (fence, msg, true)));
        let inbound: Vec<JsonInbound<'_>> = recorded
            .chain(unlogged)
            .map(|(fence, msg, done)| JsonInbound {
                number: fence.number.as_str(),
                token: fence.token.get(),
                chat: msg.chat.to_string(),
                sender: msg.sender.to_string(),
                message_id: msg.id.as_str(),
                sender_alt: msg.sender_alt.as_ref().map(ToString::to_string),
                body: &msg.text,
                preview: preview(&msg.text),
                sent_at: to_i64(msg.timestamp_ms),
                done,
            })
            .collect();
        let done: Vec<JsonKey<'_>> = self
            .complete
            .iter()
            .map(|(fence, d, unlogged, _)| JsonKey {
                number: fence.number.as_str(),
                token: fence.token.get(),
                chat: d.chat.to_string(),
                sender: d.sender.to_string(),
                message_id: d.inbound.as_str(),
                unlogged: unlogged.is_some(),
            })
            .collect();
        let cps = checkpoints(&self.complete)?;
        let cps: Vec<JsonCheckpoint<'_>> = cps
            .iter()
            .map(|(part, chat, checkpoint)| JsonCheckpoint {
                number: part.0.number.as_str(),
                token: part.0.token.get(),
                chat,
                checkpoint,
                unlogged: part.2.is_some(),
                sender: part.1.sender.to_string(),
                inbound: part.1.inbound.as_str(),
            })
            .collect();
        let replies: Vec<JsonReply<'_>> = replies(&self.complete)
            .into_iter()
            .map(|(part, r)| JsonReply {
                number: part.0.number.as_str(),
                token: part.0.token.get(),
                message_id: r.id.as_str(),
                chat: r.to.to_string(),
                body: &r.text,
                reply_to: r.reply_to.as_ref().map(MessageId::as_str),
                unlogged: part.2.is_some(),
                in_chat: part.1.chat.to_string(),
                sender: part.1.sender.to_string(),
                inbound: part.1.inbound.as_str(),
            })
            .collect();
        let sent: Vec<JsonSent<'_>> = self
            .sent
            .iter()
            .map(|(fence, id, _)| JsonSent {
                number: fence.number.as_str(),
                token: fence.token.get(),
                message_id: id.as_str(),
            })
            .collect();
        let mut numbers: Vec<&str> = self.fences().map(|f| f.number.as_str()).collect();
        numbers.sort_unstable();
        numbers.dedup();
        let numbers: Vec<JsonNumber<'_>> = numbers
            .into_iter()
            .map(|number| JsonNumber { number })
            .collect();
        Ok(sqlx::query(POSTGRES_BATCH)
            .bind(to_json(&inbound)?)
            .bind(to_json(&done)?)
            .bind(to_json(&cps)?)
            .bind(to_json(&replies)?)
            .bind(to_json(&sent)?)
            .bind(now)
            .bind(to_json(&numbers)?))
    }
}

fn to_json<T: serde::Serialize>(rows: &T) -> Result<String, StoreError> {
    serde_json::to_string(rows).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Part of a SQLite batch, written by one statement per kind.
struct Chunk<'a> {
    inbound: &'a [&'a InboundPart],
    complete: &'a [&'a CompletePart],
    sent: &'a [&'a SentPart],
    now: i64,
}

impl Chunk<'_> {
    /// The statements one at a time; their rows are tagged like the PostgreSQL rows.
    async fn sqlite(&self, tx: &mut Transaction<'static, Any>) -> Result<Vec<AnyRow>, StoreError> {
        let mut rows = Vec::new();
        if !self.inbound.is_empty() {
            let sql = format!(
                "{} RETURNING 'i', number, chat, sender, message_id",
                inbound_sql(1, self.inbound.len())
            );
            let recorded = self.inbound.iter().map(|(fence, msg, _)| (fence, msg));
            let q = bind_inbound(sqlx::query(&sql), recorded, self.now);
            rows.extend(q.fetch_all(&mut **tx).await.map_err(db)?);
        }
        let mut complete: Vec<&CompletePart> = self.complete.to_vec();
        if !complete.is_empty() {
            // Unlogged messages go in pending, so that the processed mark below finds them
            // exactly when their completion is to be written.
            let unlogged: Vec<_> = complete
                .iter()
                .filter_map(|(fence, _, msg, _)| msg.as_deref().map(|msg| (fence, msg)))
                .collect();
            if !unlogged.is_empty() {
                let sql = inbound_sql(1, unlogged.len());
                let q = bind_inbound(sqlx::query(&sql), unlogged.iter().copied(), self.now);
                q.execute(&mut **tx).await.map_err(db)?;
            }
            let sql = format!(
                "{} RETURNING 'p', number, chat, sender, message_id",
                processed_sql(1, complete.len())
            );
            let q = bind_processed(sqlx::query(&sql), &complete, self.now);
            let marked = q.fetch_all(&mut **tx).await.map_err(db)?;
            if !unlogged.is_empty() {
                // An unlogged message's completion is written only if it was marked just now.
                let applied = marked
                    .iter()
                    .map(tagged_key)
                    .collect::<Result<HashSet<_>, _>>()?;
                complete.retain(|(fence, _, msg, _)| {
                    msg.as_ref()
                        .is_none_or(|msg| applied.contains(&inbound_key(fence, msg)))
                });
                rows.extend(marked);
            }
            let checkpoints = checkpoints(&complete)?;
            if !checkpoints.is_empty() {
                let sql = checkpoint_sql(1, checkpoints.len());
                let q = bind_checkpoints(sqlx::query(&sql), &checkpoints, self.now);
                q.execute(&mut **tx).await.map_err(db)?;
            }
        }
        let replies = replies(&complete);
        if !replies.is_empty() {
            let sql = format!(
                "{} RETURNING 'q', number, message_id, NULL, NULL",
                queue_sql(1, replies.len())
            );
            let q = bind_queue(sqlx::query(&sql), &replies, self.now);
            rows.extend(q.fetch_all(&mut **tx).await.map_err(db)?);
        }
        if !self.sent.is_empty() {
            let sql = format!(
                "{} RETURNING 's', number, message_id, NULL, NULL",
                sent_sql(1, self.sent.len())
            );
            let q = bind_sent(sqlx::query(&sql), self.sent, self.now);
            rows.extend(q.fetch_all(&mut **tx).await.map_err(db)?);
        }
        Ok(rows)
    }
}

/// The inbound key of a row tagged `i` or `p`.
fn tagged_key(row: &AnyRow) -> Result<InboundKey, StoreError> {
    Ok((
        row.try_get(1).map_err(db)?,
        row.try_get(2).map_err(db)?,
        row.try_get(3).map_err(db)?,
        row.try_get(4).map_err(db)?,
    ))
}

impl Outcome {
    /// Takes in one tagged row; returns a fence row's number and token.
    fn record(&mut self, row: &AnyRow) -> Result<Option<(String, u64)>, StoreError> {
        let tag: String = row.try_get(0).map_err(db)?;
        let a: String = row.try_get(1).map_err(db)?;
        let b: String = row.try_get(2).map_err(db)?;
        match tag.as_str() {
            "f" => {
                let token = b
                    .parse()
                    .map_err(|_| StoreError::Corrupt(format!("token {b:?}")))?;
                return Ok(Some((a, token)));
            }
            "i" => {
                self.new_inbound.insert(tagged_key(row)?);
            }
            "p" => {
                self.applied.insert(tagged_key(row)?);
            }
            "q" => {
                self.queued.insert((a, b));
            }
            "s" => {
                self.marked.insert((a, b));
            }
            other => return Err(StoreError::Corrupt(format!("batch row tag {other:?}"))),
        }
        Ok(None)
    }
}

/// Looks up the inbound messages that were already there (redeliveries: rare).
async fn duplicates(
    conn: &mut AnyConnection,
    rows: &[&InboundPart],
    out: &mut Outcome,
) -> Result<(), StoreError> {
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
        .fetch_optional(&mut *conn)
        .await
        .map_err(db)?;
        out.duplicates
            .insert(key, status.is_some_and(|s| s != "pending"));
    }
    Ok(())
}

fn inbound_sql(first: usize, rows: usize) -> String {
    format!(
        "INSERT INTO inbound (number, chat, sender, message_id, sender_alt, body, preview, \
         sent_at, received_at) VALUES {} ON CONFLICT (number, chat, sender, message_id) \
         DO NOTHING",
        values_from(first, rows, 9)
    )
}

fn bind_inbound<'q>(
    mut q: AnyQuery<'q>,
    rows: impl IntoIterator<Item = (&'q Fence, &'q InboundMessage)>,
    now: i64,
) -> AnyQuery<'q> {
    for (fence, msg) in rows {
        q = bind_inbound_row(q, fence, msg, now);
    }
    q
}

/// Marks processed; drops the whole text unless the tenant keeps transcripts. `$first` is the
/// time, then number, chat, sender and message id per message.
fn processed_sql(first: usize, rows: usize) -> String {
    format!(
        "UPDATE inbound SET status = 'processed', processed_at = ${first}, body = CASE WHEN \
         (SELECT t.full_transcripts FROM numbers n JOIN tenants t ON t.id = n.tenant_id \
         WHERE n.number = inbound.number) THEN body ELSE NULL END \
         WHERE status = 'pending' AND (number, chat, sender, message_id) IN (VALUES {})",
        values_from(first + 1, rows, 4)
    )
}

fn bind_processed<'q>(mut q: AnyQuery<'q>, rows: &'q [&CompletePart], now: i64) -> AnyQuery<'q> {
    q = q.bind(now);
    for (fence, done, ..) in rows {
        q = q
            .bind(fence.number.as_str())
            .bind(done.chat.to_string())
            .bind(done.sender.to_string())
            .bind(done.inbound.as_str());
    }
    q
}

/// One checkpoint per chat, the latest, with the completion it comes from, the chat and the
/// JSON: an upsert may not touch a row twice in one statement.
fn checkpoints<'a>(
    rows: &[&'a CompletePart],
) -> Result<Vec<(&'a CompletePart, String, String)>, StoreError> {
    let mut latest: HashMap<(&str, String), (&CompletePart, String)> = HashMap::new();
    for part in rows {
        let (fence, done, ..) = part;
        let json = serde_json::to_string(&done.checkpoint)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        latest.insert((fence.number.as_str(), done.chat.to_string()), (part, json));
    }
    let mut latest: Vec<_> = latest
        .into_iter()
        .map(|((_, chat), (part, json))| (part, chat, json))
        .collect();
    latest.sort_by(|a, b| (&a.0.0.number, &a.1).cmp(&(&b.0.0.number, &b.1)));
    Ok(latest)
}

fn checkpoint_sql(first: usize, rows: usize) -> String {
    format!(
        "INSERT INTO conversations (number, chat, checkpoint, updated_at) VALUES {} \
         ON CONFLICT (number, chat) DO UPDATE SET checkpoint = excluded.checkpoint, \
         updated_at = excluded.updated_at",
        values_from(first, rows, 4)
    )
}

fn bind_checkpoints<'q>(
    mut q: AnyQuery<'q>,
    rows: &'q [(&'q CompletePart, String, String)],
    now: i64,
) -> AnyQuery<'q> {
    for ((fence, ..), chat, json) in rows {
        q = q
            .bind(fence.number.as_str())
            .bind(chat.as_str())
            .bind(json.as_str())
            .bind(now);
    }
    q
}

/// Every reply, with the completion it comes from.
fn replies<'a>(rows: &[&'a CompletePart]) -> Vec<(&'a CompletePart, &'a OutboundText)> {
    rows.iter()
        .flat_map(|part| part.1.replies.iter().map(move |r| (*part, r)))
        .collect()
}

fn queue_sql(first: usize, rows: usize) -> String {
    format!(
        "INSERT INTO outbox (number, message_id, chat, body, reply_to, created_at) VALUES {} \
         ON CONFLICT (number, message_id) DO NOTHING",
        values_from(first, rows, 6)
    )
}

fn bind_queue<'q>(
    mut q: AnyQuery<'q>,
    rows: &'q [(&'q CompletePart, &'q OutboundText)],
    now: i64,
) -> AnyQuery<'q> {
    for ((fence, ..), r) in rows {
        q = q
            .bind(fence.number.as_str())
            .bind(r.id.as_str())
            .bind(r.to.to_string())
            .bind(r.text.as_str())
            .bind(r.reply_to.as_ref().map(|id| id.as_str().to_owned()))
            .bind(now);
    }
    q
}

/// `$first` is the time, then number and message id per reply.
fn sent_sql(first: usize, rows: usize) -> String {
    format!(
        "UPDATE outbox SET status = 'sent', sent_at = ${first} WHERE status <> 'sent' AND \
         (number, message_id) IN (VALUES {})",
        values_from(first + 1, rows, 2)
    )
}

fn bind_sent<'q>(mut q: AnyQuery<'q>, rows: &'q [&SentPart], now: i64) -> AnyQuery<'q> {
    if rows.is_empty() {
        return q;
    }
    q = q.bind(now);
    for (fence, id, _) in rows {
        q = q.bind(fence.number.as_str()).bind(id.as_str());
    }
    q
}
