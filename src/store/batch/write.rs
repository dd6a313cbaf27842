//! The statements of a batch.
//!
//! PostgreSQL writes a whole chunk of the batch in one statement of data-modifying CTEs (the
//! inbound rows, the processed marks, the checkpoints, the queued replies and the sent marks), so
//! a batch costs four round trips: `BEGIN`, the fence lock, the statement, `COMMIT`. The CTEs see
//! one snapshot, which is safe here: a completion or a sent mark only ever refers to rows of an
//! earlier, committed batch. SQLite is local and runs the same statements one by one.

use std::collections::HashMap;

use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};
use switchboard_actors::store::{Fence, StoreError};
use switchboard_actors::transport::{MessageId, OutboundText};

use super::{CompletePart, InboundPart, Outcome, Parts, SentPart, inbound_key};
use crate::store::{
    AnyQuery, Dialect, bind_inbound_row, check_fence, db, now_ms, preview, to_i64, values_from,
};

/// Rows of each kind per statement, well under both dialects' bind-parameter limits
/// (completions bring 4 + 4 + 6 × replies parameters each).
const INBOUND_ROWS: usize = 256;
const COMPLETIONS: usize = 128;
const SENT_ROWS: usize = 256;

/// PostgreSQL batches up to this many writes use statements of placeholders (quickest for a few
/// rows); larger ones send their rows as JSON to one prepared statement (quickest in bulk).
const SMALL_BATCH: usize = 256;

/// Writes every part whose fence holds.
pub(super) async fn write(
    tx: &mut Transaction<'static, Any>,
    dialect: Dialect,
    parts: &Parts,
    highest: &HashMap<String, u64>,
) -> Result<Outcome, StoreError> {
    let mut out = Outcome::default();
    let now = now_ms();
    let ok = |fence: &Fence| check_fence(fence, highest).is_ok();
    let inbound: Vec<&InboundPart> = parts.inbound.iter().filter(|p| ok(&p.0)).collect();
    let complete: Vec<&CompletePart> = parts.complete.iter().filter(|p| ok(&p.0)).collect();
    let sent: Vec<&SentPart> = parts.sent.iter().filter(|p| ok(&p.0)).collect();
    let total = inbound.len() + complete.len() + sent.len();
    if dialect == Dialect::Postgres && total > SMALL_BATCH {
        for row in postgres(tx, &inbound, &complete, &sent, now).await? {
            out.record(&row)?;
        }
    } else {
        let chunks = [
            inbound.len().div_ceil(INBOUND_ROWS),
            complete.len().div_ceil(COMPLETIONS),
            sent.len().div_ceil(SENT_ROWS),
        ];
        for k in 0..chunks.into_iter().max().unwrap_or(0) {
            let chunk = Chunk {
                inbound: slice(&inbound, k, INBOUND_ROWS),
                complete: slice(&complete, k, COMPLETIONS),
                sent: slice(&sent, k, SENT_ROWS),
                now,
            };
            let rows = match dialect {
                Dialect::Postgres => chunk.postgres(tx).await?,
                Dialect::Sqlite => chunk.sqlite(tx).await?,
            };
            for row in rows {
                out.record(&row)?;
            }
        }
    }
    out.all_new = out.new_inbound.len() == inbound.len();
    if !out.all_new {
        duplicates(tx, &inbound, &mut out).await?;
    }
    Ok(out)
}

fn slice<T>(all: &[T], k: usize, size: usize) -> &[T] {
    let start = (k * size).min(all.len());
    &all[start..(start + size).min(all.len())]
}

/// The whole batch as one statement of fixed text: the rows travel as JSON arrays, so the
/// statement is prepared once per connection and never re-planned for another batch size.
/// Its rows are tagged `i` (new inbound), `q` (queued reply), `s` (marked sent).
const POSTGRES_BATCH: &str = "WITH \
    ins AS (INSERT INTO inbound (number, chat, sender, message_id, sender_alt, body, preview, \
            sent_at, received_at) \
        SELECT number, chat, sender, message_id, sender_alt, body, preview, sent_at, $6 \
        FROM json_to_recordset($1::json) AS x(number text, chat text, sender text, \
            message_id text, sender_alt text, body text, preview text, sent_at bigint) \
        ON CONFLICT (number, chat, sender, message_id) DO NOTHING \
        RETURNING number, chat, sender, message_id), \
    done AS (UPDATE inbound SET status = 'processed', processed_at = $6, body = CASE WHEN \
            (SELECT t.full_transcripts FROM numbers n JOIN tenants t ON t.id = n.tenant_id \
             WHERE n.number = inbound.number) THEN inbound.body ELSE NULL END \
        FROM json_to_recordset($2::json) AS d(number text, chat text, sender text, \
            message_id text) \
        WHERE inbound.status = 'pending' AND inbound.number = d.number \
            AND inbound.chat = d.chat AND inbound.sender = d.sender \
            AND inbound.message_id = d.message_id), \
    saved AS (INSERT INTO conversations (number, chat, checkpoint, updated_at) \
        SELECT number, chat, checkpoint, $6 \
        FROM json_to_recordset($3::json) AS c(number text, chat text, checkpoint text) \
        ON CONFLICT (number, chat) DO UPDATE SET checkpoint = excluded.checkpoint, \
            updated_at = excluded.updated_at), \
    q AS (INSERT INTO outbox (number, message_id, chat, body, reply_to, created_at) \
        SELECT number, message_id, chat, body, reply_to, $6 \
        FROM json_to_recordset($4::json) AS o(number text, message_id text, chat text, \
            body text, reply_to text) \
        ON CONFLICT (number, message_id) DO NOTHING RETURNING number, message_id), \
    s AS (UPDATE outbox SET status = 'sent', sent_at = $6 \
        FROM json_to_recordset($5::json) AS m(number text, message_id text) \
        WHERE outbox.status <> 'sent' AND outbox.number = m.number \
            AND outbox.message_id = m.message_id \
        RETURNING outbox.number, outbox.message_id) \
    SELECT 'i', number, chat, sender, message_id FROM ins \
    UNION ALL SELECT 'q', number, message_id, NULL, NULL FROM q \
    UNION ALL SELECT 's', number, message_id, NULL, NULL FROM s";

#[derive(serde::Serialize)]
struct JsonInbound<'a> {
    number: &'a str,
    chat: String,
    sender: String,
    message_id: &'a str,
    sender_alt: Option<String>,
    body: &'a str,
    preview: String,
    sent_at: i64,
}

#[derive(serde::Serialize)]
struct JsonKey<'a> {
    number: &'a str,
    chat: String,
    sender: String,
    message_id: &'a str,
}

#[derive(serde::Serialize)]
struct JsonCheckpoint<'a> {
    number: &'a str,
    chat: &'a str,
    checkpoint: &'a str,
}

#[derive(serde::Serialize)]
struct JsonReply<'a> {
    number: &'a str,
    message_id: &'a str,
    chat: String,
    body: &'a str,
    reply_to: Option<&'a str>,
}

#[derive(serde::Serialize)]
struct JsonSent<'a> {
    number: &'a str,
    message_id: &'a str,
}

async fn postgres(
    tx: &mut Transaction<'static, Any>,
    inbound: &[&InboundPart],
    complete: &[&CompletePart],
    sent: &[&SentPart],
    now: i64,
) -> Result<Vec<AnyRow>, StoreError> {
    let inbound: Vec<JsonInbound<'_>> = inbound
        .iter()
        .map(|(fence, msg, _)| JsonInbound {
            number: fence.number.as_str(),
            chat: msg.chat.to_string(),
            sender: msg.sender.to_string(),
            message_id: msg.id.as_str(),
            sender_alt: msg.sender_alt.as_ref().map(ToString::to_string),
            body: &msg.text,
            preview: preview(&msg.text),
            sent_at: to_i64(msg.timestamp_ms),
        })
        .collect();
    let done: Vec<JsonKey<'_>> = complete
        .iter()
        .map(|(fence, d, _)| JsonKey {
            number: fence.number.as_str(),
            chat: d.chat.to_string(),
            sender: d.sender.to_string(),
            message_id: d.inbound.as_str(),
        })
        .collect();
    let cps = checkpoints(complete)?;
    let cps: Vec<JsonCheckpoint<'_>> = cps
        .iter()
        .map(|(number, chat, checkpoint)| JsonCheckpoint {
            number,
            chat,
            checkpoint,
        })
        .collect();
    let replies: Vec<JsonReply<'_>> = replies(complete)
        .into_iter()
        .map(|(fence, r)| JsonReply {
            number: fence.number.as_str(),
            message_id: r.id.as_str(),
            chat: r.to.to_string(),
            body: &r.text,
            reply_to: r.reply_to.as_ref().map(MessageId::as_str),
        })
        .collect();
    let sent: Vec<JsonSent<'_>> = sent
        .iter()
        .map(|(fence, id, _)| JsonSent {
            number: fence.number.as_str(),
            message_id: id.as_str(),
        })
        .collect();
    sqlx::query(POSTGRES_BATCH)
        .bind(to_json(&inbound)?)
        .bind(to_json(&done)?)
        .bind(to_json(&cps)?)
        .bind(to_json(&replies)?)
        .bind(to_json(&sent)?)
        .bind(now)
        .fetch_all(&mut **tx)
        .await
        .map_err(db)
}

fn to_json<T: serde::Serialize>(rows: &T) -> Result<String, StoreError> {
    serde_json::to_string(rows).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Part of a batch written by one statement of placeholders (a small PostgreSQL batch) or one
/// statement per kind (SQLite).
struct Chunk<'a> {
    inbound: &'a [&'a InboundPart],
    complete: &'a [&'a CompletePart],
    sent: &'a [&'a SentPart],
    now: i64,
}

impl Chunk<'_> {
    /// One statement; its rows are tagged `i` (new inbound), `q` (queued reply), `s` (sent).
    async fn postgres(
        &self,
        tx: &mut Transaction<'static, Any>,
    ) -> Result<Vec<AnyRow>, StoreError> {
        let checkpoints = checkpoints(self.complete)?;
        let replies = replies(self.complete);
        let (mut ctes, mut selects, mut p) = (Vec::new(), Vec::new(), 1);
        if !self.inbound.is_empty() {
            let sql = inbound_sql(p, self.inbound.len());
            ctes.push(format!(
                "ins AS ({sql} RETURNING number, chat, sender, message_id)"
            ));
            selects.push("SELECT 'i', number, chat, sender, message_id FROM ins");
            p += self.inbound.len() * 9;
        }
        if !self.complete.is_empty() {
            ctes.push(format!(
                "done AS ({})",
                processed_sql(p, self.complete.len())
            ));
            p += 1 + self.complete.len() * 4;
            ctes.push(format!(
                "saved AS ({})",
                checkpoint_sql(p, checkpoints.len())
            ));
            p += checkpoints.len() * 4;
        }
        if !replies.is_empty() {
            let sql = queue_sql(p, replies.len());
            ctes.push(format!("q AS ({sql} RETURNING number, message_id)"));
            selects.push("SELECT 'q', number, message_id, NULL::text, NULL::text FROM q");
            p += replies.len() * 6;
        }
        if !self.sent.is_empty() {
            let sql = sent_sql(p, self.sent.len());
            ctes.push(format!("s AS ({sql} RETURNING number, message_id)"));
            selects.push("SELECT 's', number, message_id, NULL::text, NULL::text FROM s");
        }
        if selects.is_empty() {
            selects.push(
                "SELECT NULL::text, NULL::text, NULL::text, NULL::text, NULL::text WHERE FALSE",
            );
        }
        let sql = format!("WITH {} {}", ctes.join(", "), selects.join(" UNION ALL "));
        let mut q = bind_inbound(sqlx::query(&sql), self.inbound, self.now);
        if !self.complete.is_empty() {
            q = bind_processed(q, self.complete, self.now);
            q = bind_checkpoints(q, &checkpoints, self.now);
        }
        q = bind_queue(q, &replies, self.now);
        q = bind_sent(q, self.sent, self.now);
        q.fetch_all(&mut **tx).await.map_err(db)
    }

    /// The same statements one at a time, each tagged like the PostgreSQL rows.
    async fn sqlite(&self, tx: &mut Transaction<'static, Any>) -> Result<Vec<AnyRow>, StoreError> {
        let mut rows = Vec::new();
        if !self.inbound.is_empty() {
            let sql = format!(
                "{} RETURNING 'i', number, chat, sender, message_id",
                inbound_sql(1, self.inbound.len())
            );
            let q = bind_inbound(sqlx::query(&sql), self.inbound, self.now);
            rows.extend(q.fetch_all(&mut **tx).await.map_err(db)?);
        }
        if !self.complete.is_empty() {
            let sql = processed_sql(1, self.complete.len());
            let q = bind_processed(sqlx::query(&sql), self.complete, self.now);
            q.execute(&mut **tx).await.map_err(db)?;
            let checkpoints = checkpoints(self.complete)?;
            let sql = checkpoint_sql(1, checkpoints.len());
            let q = bind_checkpoints(sqlx::query(&sql), &checkpoints, self.now);
            q.execute(&mut **tx).await.map_err(db)?;
        }
        let replies = replies(self.complete);
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

impl Outcome {
    /// Takes in one tagged row.
    fn record(&mut self, row: &AnyRow) -> Result<(), StoreError> {
        let tag: String = row.try_get(0).map_err(db)?;
        let a: String = row.try_get(1).map_err(db)?;
        let b: String = row.try_get(2).map_err(db)?;
        match tag.as_str() {
            "i" => {
                let key = (
                    a,
                    b,
                    row.try_get(3).map_err(db)?,
                    row.try_get(4).map_err(db)?,
                );
                self.new_inbound.insert(key);
            }
            "q" => {
                self.queued.insert((a, b));
            }
            "s" => {
                self.marked.insert((a, b));
            }
            other => return Err(StoreError::Corrupt(format!("batch row tag {other:?}"))),
        }
        Ok(())
    }
}

/// Looks up the inbound messages that were already there (redeliveries: rare).
async fn duplicates(
    tx: &mut Transaction<'static, Any>,
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
        .fetch_optional(&mut **tx)
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

fn bind_inbound<'q>(mut q: AnyQuery<'q>, rows: &'q [&InboundPart], now: i64) -> AnyQuery<'q> {
    for (fence, msg, _) in rows {
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
    for (fence, done, _) in rows {
        q = q
            .bind(fence.number.as_str())
            .bind(done.chat.to_string())
            .bind(done.sender.to_string())
            .bind(done.inbound.as_str());
    }
    q
}

/// One checkpoint per chat, the latest: an upsert may not touch a row twice in one statement.
fn checkpoints<'a>(
    rows: &[&'a CompletePart],
) -> Result<Vec<(&'a str, String, String)>, StoreError> {
    let mut latest: HashMap<(&str, String), String> = HashMap::new();
    for (fence, done, _) in rows {
        let json = serde_json::to_string(&done.checkpoint)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        latest.insert((fence.number.as_str(), done.chat.to_string()), json);
    }
    let mut latest: Vec<_> = latest.into_iter().map(|((n, c), j)| (n, c, j)).collect();
    latest.sort();
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
    rows: &'q [(&'q str, String, String)],
    now: i64,
) -> AnyQuery<'q> {
    for (number, chat, json) in rows {
        q = q
            .bind(*number)
            .bind(chat.as_str())
            .bind(json.as_str())
            .bind(now);
    }
    q
}

fn replies<'a>(rows: &[&'a CompletePart]) -> Vec<(&'a Fence, &'a OutboundText)> {
    rows.iter()
        .flat_map(|(fence, done, _)| done.replies.iter().map(move |r| (fence, r)))
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
    rows: &'q [(&'q Fence, &'q OutboundText)],
    now: i64,
) -> AnyQuery<'q> {
    for (fence, r) in rows {
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
