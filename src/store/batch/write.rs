//! The statements of a batch.
//!
//! PostgreSQL writes the whole batch in one statement of data-modifying CTEs (the fence lock,
//! the inbound rows, the processed marks, the checkpoints, the queued replies and the sent
//! marks) that commits on its own: one round trip, one prepared statement, one cached plan. The
//! CTEs see one snapshot, which is safe here: a completion or a sent mark only ever refers to
//! rows of an earlier, committed batch. SQLite is local and runs the statements one by one in a
//! transaction.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use sqlx::any::AnyRow;
use sqlx::{Any, AnyConnection, AnyPool, Row, Transaction};
use switchboard_actors::ids::Jid;
use switchboard_actors::store::{Fence, OutageKind, StoreError};
use switchboard_actors::transport::{InboundMessage, MessageId, OutboundText};

use super::{
    CompletePart, InboundKey, InboundPart, Outcome, Parts, RETRIES, SentPart, Written, inbound_key,
};
use crate::store::{
    AnyQuery, Dialect, bind_inbound_row, bind_text, check_fence, db, lock_fences, now_ms, text,
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
    let now = now_ms();
    let ok = Selection::new(parts, |fence| check_fence(fence, &highest).is_ok());
    let chunks = [
        ok.inbound.len().div_ceil(INBOUND_ROWS),
        ok.complete.len().div_ceil(COMPLETIONS),
        ok.sent.len().div_ceil(SENT_ROWS),
    ];
    let mut out = Outcome {
        written: Written::none(),
        ..Outcome::default()
    };
    for k in 0..chunks.into_iter().max().unwrap_or(0) {
        let chunk = Chunk {
            inbound: slice(&ok.inbound, k, INBOUND_ROWS),
            complete: slice(&ok.complete, k, COMPLETIONS),
            sent: slice(&ok.sent, k, SENT_ROWS),
            now,
        };
        for row in chunk.sqlite(&mut tx).await? {
            out.written.record(&row)?;
        }
    }
    if let Some(new) = &out.written.new_inbound
        && new.len() == ok.inbound.len()
    {
        // Every inbound row was new (the usual case): nothing to look up.
        out.written.new_inbound = None;
    }
    duplicates(&mut tx, &ok.inbound, &mut out).await?;
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
    let all = Selection::new(parts, |_| true);
    // As the statement expects it; its answer corrects the numbers where it is not so.
    let mut highest: HashMap<String, u64> = all
        .highest_tokens()
        .into_iter()
        .map(|(number, token)| (number.to_owned(), token))
        .collect();
    for row in all.statement(now)?.fetch_all(pool).await.map_err(db)? {
        out.written.record_or_correct(&row, &mut highest)?;
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
                let mut second = Written::default();
                for row in rows {
                    second.record_or_correct(&row, &mut highest)?;
                }
                let first = std::mem::take(&mut out.written);
                out.written = first.merge(&all, second, &raise);
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
    if let Err(e) = lookup_duplicates(pool, &inbound, &mut out).await {
        out.lookup_failed = Some(e);
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
            Err(StoreError::Unavailable(e))
                if e.kind == OutageKind::Contention && attempt < RETRIES =>
            {
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
/// inserted by `ins` or was pending (`done`), which `ok` collects.
///
/// The answer is empty when the batch wrote everything it was given (the usual case): `f`
/// rows name the numbers whose stored token is not the batch's highest for them (number,
/// stored token or NULL if the number has no fence); a kind that wrote fewer rows than it was
/// given (`$8` to `$11`, compared once in `short`) answers `I`, `P`, `Q` or `S`, then the rows
/// it wrote: `i` (new inbound), `p` (unlogged completion written), `q` (queued reply) or `s`
/// (marked sent).
const POSTGRES_BATCH: &str = "WITH \
    f AS (SELECT fences.number, fences.token, t.full_transcripts FROM fences \
        JOIN numbers ON numbers.number = fences.number \
        JOIN tenants t ON t.id = numbers.tenant_id \
        JOIN json_to_recordset($7::json) AS w(number text, token bigint) \
            ON w.number = fences.number \
        ORDER BY fences.number FOR SHARE OF fences FOR KEY SHARE OF numbers), \
    ins AS (INSERT INTO inbound (number, chat, sender, message_id, sender_alt, body, preview, \
            sent_at, received_at, from_me, status, processed_at) \
        SELECT x.number, chat, sender, message_id, sender_alt, \
            CASE WHEN x.done AND NOT f.full_transcripts THEN NULL ELSE body END, preview, \
            sent_at, $6, from_me, CASE WHEN x.done THEN 'processed' ELSE 'pending' END, \
            CASE WHEN x.done THEN $6 END \
        FROM json_to_recordset($1::json) AS x(number text, token bigint, chat text, \
            sender text, message_id text, sender_alt text, body text, preview text, \
            sent_at bigint, from_me boolean, done boolean) \
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
    q AS (INSERT INTO outbox (number, message_id, chat, body, reply_to, reply_to_sender, \
            created_at) \
        SELECT o.number, o.message_id, o.chat, body, reply_to, reply_to_sender, $6 \
        FROM json_to_recordset($4::json) AS o(number text, token bigint, message_id text, \
            chat text, body text, reply_to text, reply_to_sender text, unlogged boolean, \
            in_chat text, sender text, inbound text) \
        JOIN f ON f.number = o.number AND f.token = o.token \
        WHERE NOT o.unlogged OR EXISTS (SELECT 1 FROM ok WHERE ok.number = o.number \
            AND ok.chat = o.in_chat AND ok.sender = o.sender AND ok.message_id = o.inbound) \
        ON CONFLICT (number, message_id) DO NOTHING RETURNING number, message_id), \
    s AS (UPDATE outbox SET status = 'sent', sent_at = $6 \
        FROM json_to_recordset($5::json) AS m(number text, token bigint, message_id text) \
        JOIN f ON f.number = m.number AND f.token = m.token \
        WHERE outbox.status <> 'sent' AND outbox.number = m.number \
            AND outbox.message_id = m.message_id \
        RETURNING outbox.number, outbox.message_id), \
    short AS (SELECT (SELECT count(*) FROM ins WHERE status = 'pending') <> $8 AS inbound, \
        (SELECT count(*) FROM ok) <> $9 AS applied, \
        (SELECT count(*) FROM q) <> $10 AS queued, \
        (SELECT count(*) FROM s) <> $11 AS marked) \
    SELECT 'f', w.number, f.token::text, NULL, NULL \
        FROM json_to_recordset($7::json) AS w(number text, token bigint) \
        LEFT JOIN f ON f.number = w.number WHERE f.token IS DISTINCT FROM w.token \
    UNION ALL SELECT kind, NULL, NULL, NULL, NULL FROM short, LATERAL (VALUES \
            ('I', inbound), ('P', applied), ('Q', queued), ('S', marked)) AS c(kind, fewer) \
        WHERE fewer \
    UNION ALL SELECT 'i', number, chat, sender, message_id FROM ins \
        WHERE status = 'pending' AND (SELECT inbound FROM short) \
    UNION ALL SELECT 'p', number, chat, sender, message_id FROM ok \
        WHERE (SELECT applied FROM short) \
    UNION ALL SELECT 'q', number, message_id, NULL, NULL FROM q \
        WHERE (SELECT queued FROM short) \
    UNION ALL SELECT 's', number, message_id, NULL, NULL FROM s \
        WHERE (SELECT marked FROM short)";

#[derive(serde::Serialize)]
struct JsonInbound<'a> {
    number: &'a str,
    token: u64,
    chat: &'a str,
    sender: &'a str,
    message_id: &'a str,
    sender_alt: Option<&'a str>,
    body: Cow<'a, str>,
    preview: String,
    sent_at: i64,
    from_me: bool,
    /// Recorded already processed (an unlogged message's completion).
    done: bool,
}

#[derive(serde::Serialize)]
struct JsonKey<'a> {
    number: &'a str,
    token: u64,
    chat: &'a str,
    sender: &'a str,
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
    sender: &'a str,
    inbound: &'a str,
}

#[derive(serde::Serialize)]
struct JsonReply<'a> {
    number: &'a str,
    token: u64,
    message_id: &'a str,
    chat: &'a str,
    body: Cow<'a, str>,
    reply_to: Option<&'a str>,
    reply_to_sender: Option<&'a str>,
    /// The completion it belongs to, like [`JsonCheckpoint`]'s.
    unlogged: bool,
    in_chat: &'a str,
    sender: &'a str,
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
    /// The highest token of the batch's writes for it.
    token: u64,
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

    /// The highest token of these writes per number, in number order.
    fn highest_tokens(&self) -> Vec<(&'a str, u64)> {
        let mut tokens = self.tokens();
        tokens.sort_unstable_by(|a, b| a.0.cmp(b.0).then(b.1.cmp(&a.1)));
        tokens.dedup_by(|later, first| later.0 == first.0);
        tokens
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
        let unlogged_count = self.complete.iter().filter(|p| p.2.is_some()).count();
        let unlogged = self
            .complete
            .iter()
            .filter_map(|(fence, _, msg, _)| msg.as_deref().map(|msg| (fence, msg, true)));
        let inbound: Vec<JsonInbound<'_>> = recorded
            .chain(unlogged)
            .map(|(fence, msg, done)| JsonInbound {
                number: fence.number.as_str(),
                token: fence.token.get(),
                chat: msg.chat.as_str(),
                sender: msg.sender.as_str(),
                message_id: msg.id.as_str(),
                sender_alt: msg.sender_alt.as_ref().map(Jid::as_str),
                body: text::encode(&msg.text),
                preview: text::preview(&msg.text),
                sent_at: to_i64(msg.timestamp_ms),
                from_me: msg.is_from_me,
                done,
            })
            .collect();
        let done: Vec<JsonKey<'_>> = self
            .complete
            .iter()
            .map(|(fence, d, unlogged, _)| JsonKey {
                number: fence.number.as_str(),
                token: fence.token.get(),
                chat: d.chat.as_str(),
                sender: d.sender.as_str(),
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
                sender: part.1.sender.as_str(),
                inbound: part.1.inbound.as_str(),
            })
            .collect();
        let replies: Vec<JsonReply<'_>> = replies(&self.complete)
            .into_iter()
            .map(|(part, r)| JsonReply {
                number: part.0.number.as_str(),
                token: part.0.token.get(),
                message_id: r.id.as_str(),
                chat: r.to.as_str(),
                body: text::encode(&r.text),
                reply_to: r.reply_to.as_ref().map(MessageId::as_str),
                reply_to_sender: r.reply_to_sender.as_ref().map(Jid::as_str),
                unlogged: part.2.is_some(),
                in_chat: part.1.chat.as_str(),
                sender: part.1.sender.as_str(),
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
        let numbers: Vec<JsonNumber<'_>> = self
            .highest_tokens()
            .into_iter()
            .map(|(number, token)| JsonNumber { number, token })
            .collect();
        Ok(sqlx::query(POSTGRES_BATCH)
            .bind(to_json(&inbound)?)
            .bind(to_json(&done)?)
            .bind(to_json(&cps)?)
            .bind(to_json(&replies)?)
            .bind(to_json(&sent)?)
            .bind(now)
            .bind(to_json(&numbers)?)
            .bind(count(self.inbound.len()))
            .bind(count(unlogged_count))
            .bind(count(replies.len()))
            .bind(count(sent.len())))
    }
}

fn count(rows: usize) -> i64 {
    i64::try_from(rows).unwrap_or(i64::MAX)
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

/// The (number, message id) of a row tagged `q` or `s`.
fn tagged_pair(row: &AnyRow) -> Result<(String, String), StoreError> {
    Ok((row.try_get(1).map_err(db)?, row.try_get(2).map_err(db)?))
}

impl Written {
    /// Nothing written yet, for statements whose rows name everything written (SQLite's).
    fn none() -> Self {
        Self {
            new_inbound: Some(HashSet::new()),
            applied: Some(HashSet::new()),
            queued: Some(HashSet::new()),
            marked: Some(HashSet::new()),
        }
    }

    /// Takes in one row: an upper-case tag says that kind did not write every row it was
    /// given, a lower-case one names a row written.
    fn record(&mut self, row: &AnyRow) -> Result<(), StoreError> {
        let tag: String = row.try_get(0).map_err(db)?;
        match tag.as_str() {
            "I" => {
                self.new_inbound.get_or_insert_default();
            }
            "P" => {
                self.applied.get_or_insert_default();
            }
            "Q" => {
                self.queued.get_or_insert_default();
            }
            "S" => {
                self.marked.get_or_insert_default();
            }
            "i" => {
                let key = tagged_key(row)?;
                self.new_inbound.get_or_insert_default().insert(key);
            }
            "p" => {
                let key = tagged_key(row)?;
                self.applied.get_or_insert_default().insert(key);
            }
            "q" => {
                let key = tagged_pair(row)?;
                self.queued.get_or_insert_default().insert(key);
            }
            "s" => {
                let key = tagged_pair(row)?;
                self.marked.get_or_insert_default().insert(key);
            }
            other => return Err(StoreError::Corrupt(format!("batch row tag {other:?}"))),
        }
        Ok(())
    }

    /// Takes in one row of [`POSTGRES_BATCH`]'s answer: a fence row corrects `highest`.
    fn record_or_correct(
        &mut self,
        row: &AnyRow,
        highest: &mut HashMap<String, u64>,
    ) -> Result<(), StoreError> {
        let tag: String = row.try_get(0).map_err(db)?;
        if tag != "f" {
            return self.record(row);
        }
        let number: String = row.try_get(1).map_err(db)?;
        let token: Option<String> = row.try_get(2).map_err(db)?;
        match token {
            Some(token) => {
                let token = token
                    .parse()
                    .map_err(|_| StoreError::Corrupt(format!("token {token:?}")))?;
                highest.insert(number, token);
            }
            None => {
                highest.remove(&number);
            }
        }
        Ok(())
    }

    /// This, written for `mine`, with `other`, written for `theirs` (the rare batch that also
    /// raised fences).
    fn merge(self, mine: &Selection<'_>, other: Self, theirs: &Selection<'_>) -> Self {
        fn union<K: Eq + std::hash::Hash>(
            a: Option<HashSet<K>>,
            b: Option<HashSet<K>>,
        ) -> Option<HashSet<K>> {
            let mut a = a.unwrap_or_default();
            a.extend(b.unwrap_or_default());
            Some(a)
        }
        let (a, b) = (self.or_every(mine), other.or_every(theirs));
        Self {
            new_inbound: union(a.new_inbound, b.new_inbound),
            applied: union(a.applied, b.applied),
            queued: union(a.queued, b.queued),
            marked: union(a.marked, b.marked),
        }
    }

    /// This, with every row of `selection` where all were written.
    fn or_every(self, selection: &Selection<'_>) -> Self {
        let every = Self::every(selection);
        Self {
            new_inbound: self.new_inbound.or(every.new_inbound),
            applied: self.applied.or(every.applied),
            queued: self.queued.or(every.queued),
            marked: self.marked.or(every.marked),
        }
    }

    /// Every row of `selection`, as if all were written.
    fn every(selection: &Selection<'_>) -> Self {
        let number = |fence: &Fence| fence.number.to_string();
        Self {
            new_inbound: Some(
                selection
                    .inbound
                    .iter()
                    .map(|(fence, msg, _)| inbound_key(fence, msg))
                    .collect(),
            ),
            applied: Some(
                selection
                    .complete
                    .iter()
                    .filter_map(|(fence, _, msg, _)| {
                        msg.as_deref().map(|msg| inbound_key(fence, msg))
                    })
                    .collect(),
            ),
            queued: Some(
                replies(&selection.complete)
                    .into_iter()
                    .map(|((fence, ..), r)| (number(fence), r.id.to_string()))
                    .collect(),
            ),
            marked: Some(
                selection
                    .sent
                    .iter()
                    .map(|(fence, id, _)| (number(fence), id.to_string()))
                    .collect(),
            ),
        }
    }
}

/// Looks up the inbound messages of `rows` that were there already, if any were.
async fn lookup_duplicates(
    pool: &AnyPool,
    rows: &[&InboundPart],
    out: &mut Outcome,
) -> Result<(), StoreError> {
    if out.written.new_inbound.is_none() {
        return Ok(());
    }
    let mut conn = pool.acquire().await.map_err(db)?;
    duplicates(&mut conn, rows, out).await
}

/// Looks up the inbound messages that were already there (redeliveries: rare).
async fn duplicates(
    conn: &mut AnyConnection,
    rows: &[&InboundPart],
    out: &mut Outcome,
) -> Result<(), StoreError> {
    let Some(new) = &out.written.new_inbound else {
        return Ok(());
    };
    for (fence, msg, _) in rows {
        let key = inbound_key(fence, msg);
        if new.contains(&key) || out.duplicates.contains_key(&key) {
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
         sent_at, received_at, from_me) VALUES {} ON CONFLICT (number, chat, sender, \
         message_id) DO NOTHING",
        values_from(first, rows, 10)
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
) -> Result<Vec<(&'a CompletePart, &'a str, String)>, StoreError> {
    let mut latest: HashMap<(&str, &str), (&CompletePart, String)> = HashMap::new();
    for part in rows {
        let (fence, done, ..) = part;
        let json = serde_json::to_string(&done.checkpoint)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        latest.insert((fence.number.as_str(), done.chat.as_str()), (part, json));
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
    rows: &'q [(&'q CompletePart, &'q str, String)],
    now: i64,
) -> AnyQuery<'q> {
    for ((fence, ..), chat, json) in rows {
        q = q
            .bind(fence.number.as_str())
            .bind(*chat)
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
        "INSERT INTO outbox (number, message_id, chat, body, reply_to, reply_to_sender, \
         created_at) VALUES {} ON CONFLICT (number, message_id) DO NOTHING",
        values_from(first, rows, 7)
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
            .bind(r.to.to_string());
        q = bind_text(q, &r.text)
            .bind(r.reply_to.as_ref().map(|id| id.as_str().to_owned()))
            .bind(r.reply_to_sender.as_ref().map(|s| s.as_str().to_owned()))
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
