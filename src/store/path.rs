//! The message path of the [`Store`] port, and the tokens of the embedded coordinator.

use async_trait::async_trait;
use sqlx::Row;
use sqlx::any::AnyRow;
use switchboard_actors::coordinator::TokenSource;
use switchboard_actors::dead_letter::DeadLetterReason;
use switchboard_actors::responder::ChatContext;
use switchboard_actors::store::{
    Completion, Fence, FencingToken, Health, Pending, Queued, Recorded, Store, StoreError, Unsent,
};
use switchboard_actors::transport::{Credentials, InboundMessage, MessageId, OutboundText};
use switchboard_actors::{Jid, PhoneNumber};
use tokio::sync::oneshot;

use super::batch::Op;
use super::cipher::Sealed;
use super::{SqlStore, bind_inbound_row, db, flag, now_ms, text};

/// Sets a message aside: dead letters keep the whole text, to be inspected and replayed.
const DEAD_LETTER: &str = "INSERT INTO inbound (number, chat, sender, message_id, sender_alt, \
    body, preview, sent_at, received_at, from_me, status, processed_at, error) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'dead', $9, $11) \
    ON CONFLICT (number, chat, sender, message_id) DO UPDATE SET status = 'dead', \
    processed_at = excluded.processed_at, error = excluded.error";

/// Queues `op` built around a fresh reply channel and returns the future of the answer.
fn queued<T: Send + 'static>(
    store: &SqlStore,
    op: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op,
) -> Pending<T> {
    let (tx, rx) = oneshot::channel();
    store.batch.push(op(tx));
    Box::pin(async move { rx.await.unwrap_or(Err(StoreError::Closed)) })
}

#[async_trait]
impl Store for SqlStore {
    fn health(&self) -> Health {
        self.watch.health()
    }

    fn record_inbound(&self, fence: &Fence, msg: &InboundMessage) -> Pending<Recorded> {
        let (fence, msg) = (fence.clone(), msg.clone());
        queued(self, |reply| Op::Inbound { fence, msg, reply })
    }

    fn complete(&self, fence: &Fence, done: Completion) -> Pending<Vec<MessageId>> {
        let fence = fence.clone();
        let completed = queued(self, |reply| Op::Complete {
            fence,
            done,
            unlogged: None,
            reply,
        });
        Box::pin(async move { completed.await.map(Option::unwrap_or_default) })
    }

    fn record_completed(
        &self,
        fence: &Fence,
        msg: &InboundMessage,
        done: Completion,
    ) -> Pending<Option<Vec<MessageId>>> {
        let (fence, msg) = (fence.clone(), Box::new(msg.clone()));
        queued(self, |reply| Op::Complete {
            fence,
            done,
            unlogged: Some(msg),
            reply,
        })
    }

    fn mark_sent(&self, fence: &Fence, id: &MessageId) -> Pending<bool> {
        let (fence, id) = (fence.clone(), id.clone());
        queued(self, |reply| Op::Sent { fence, id, reply })
    }

    async fn queue_send(&self, fence: &Fence, msg: &OutboundText) -> Result<Queued, StoreError> {
        self.watch
            .write(async {
                let mut tx = self.fenced(fence).await?;
                let inserted = sqlx::query(
                    "INSERT INTO outbox (number, message_id, chat, body, created_at) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (number, message_id) DO NOTHING",
                )
                .bind(fence.number.as_str())
                .bind(msg.id.as_str())
                .bind(msg.to.as_str())
                .bind(text::encode(&msg.text).into_owned())
                .bind(now_ms())
                .execute(&mut *tx)
                .await
                .map_err(db)?
                .rows_affected();
                let queued = if inserted == 1 {
                    Queued::New
                } else {
                    let row = sqlx::query(
                        "SELECT chat, body, status FROM outbox \
                         WHERE number = $1 AND message_id = $2",
                    )
                    .bind(fence.number.as_str())
                    .bind(msg.id.as_str())
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(db)?;
                    let chat: String = row.try_get("chat").map_err(db)?;
                    let body = text::decode(row.try_get("body").map_err(db)?);
                    let status: String = row.try_get("status").map_err(db)?;
                    if chat == msg.to.as_str() && body == msg.text {
                        Queued::Repeat {
                            unsent: status == "queued",
                        }
                    } else {
                        Queued::KeyReused
                    }
                };
                tx.commit().await.map_err(db)?;
                Ok(queued)
            })
            .await
    }

    async fn dead_letter(
        &self,
        fence: &Fence,
        msg: &InboundMessage,
        reason: &DeadLetterReason,
    ) -> Result<(), StoreError> {
        self.watch
            .write(async {
                let mut tx = self.fenced(fence).await?;
                bind_inbound_row(sqlx::query(DEAD_LETTER), fence, msg, now_ms())
                    .bind(reason.to_string())
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
                tx.commit().await.map_err(db)
            })
            .await
    }

    async fn send_failed(
        &self,
        fence: &Fence,
        id: &MessageId,
        error: &str,
        give_up: bool,
    ) -> Result<(), StoreError> {
        let set = if give_up {
            "attempts = attempts + 1, last_error = $1, status = 'failed'"
        } else {
            "attempts = attempts + 1, last_error = $1"
        };
        self.update_queued(fence, id, set, error).await
    }

    async fn unprocessed(&self, number: &PhoneNumber) -> Result<Vec<InboundMessage>, StoreError> {
        self.watch
            .read(async {
                let rows = sqlx::query(
                    "SELECT chat, sender, message_id, sender_alt, body, preview, sent_at, from_me \
                     FROM inbound WHERE number = $1 AND status = 'pending' ORDER BY seq",
                )
                .bind(number.as_str())
                .fetch_all(&self.pool)
                .await
                .map_err(db)?;
                rows.iter().map(inbound_of).collect()
            })
            .await
    }

    async fn unsent(&self, number: &PhoneNumber) -> Result<Vec<Unsent>, StoreError> {
        self.watch
            .read(async {
                let rows = sqlx::query(
                    "SELECT message_id, chat, body, reply_to, reply_to_sender, created_at \
                     FROM outbox WHERE number = $1 AND status = 'queued' ORDER BY seq",
                )
                .bind(number.as_str())
                .fetch_all(&self.pool)
                .await
                .map_err(db)?;
                rows.iter()
                    .map(|row| {
                        let at: i64 = row.try_get("created_at").map_err(db)?;
                        Ok(Unsent {
                            reply: outbound_of(row)?,
                            queued_at_ms: u64::try_from(at).unwrap_or(0),
                        })
                    })
                    .collect()
            })
            .await
    }

    async fn expire(&self, fence: &Fence, id: &MessageId, reason: &str) -> Result<(), StoreError> {
        let set = "status = 'expired', last_error = $1";
        self.update_queued(fence, id, set, reason).await
    }

    async fn checkpoint(
        &self,
        number: &PhoneNumber,
        chat: &Jid,
    ) -> Result<Option<ChatContext>, StoreError> {
        self.watch
            .read(async {
                let json: Option<String> = sqlx::query_scalar(
                    "SELECT checkpoint FROM conversations WHERE number = $1 AND chat = $2",
                )
                .bind(number.as_str())
                .bind(chat.to_string())
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?;
                json.map(|j| {
                    serde_json::from_str(&j).map_err(|e| StoreError::Corrupt(e.to_string()))
                })
                .transpose()
            })
            .await
    }

    async fn load_session(&self, number: &PhoneNumber) -> Result<Option<Credentials>, StoreError> {
        self.watch
            .read(async {
                let row =
                    sqlx::query("SELECT key_id, nonce, ciphertext FROM sessions WHERE number = $1")
                        .bind(number.as_str())
                        .fetch_optional(&self.pool)
                        .await
                        .map_err(db)?;
                let Some(row) = row else {
                    return Ok(None);
                };
                let sealed = Sealed {
                    key_id: row.try_get("key_id").map_err(db)?,
                    nonce: row.try_get("nonce").map_err(db)?,
                    ciphertext: row.try_get("ciphertext").map_err(db)?,
                };
                let plain = self
                    .cipher
                    .open(number.as_str(), &sealed)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                String::from_utf8(plain)
                    .map(|s| Some(Credentials(s)))
                    .map_err(|e| StoreError::Corrupt(e.to_string()))
            })
            .await
    }

    async fn save_session(&self, fence: &Fence, creds: &Credentials) -> Result<(), StoreError> {
        self.watch
            .write(async {
            let sealed = self
                .cipher
                .seal(fence.number.as_str(), creds.0.as_bytes())
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let mut tx = self.fenced(fence).await?;
            sqlx::query(
                "INSERT INTO sessions (number, key_id, nonce, ciphertext, updated_at) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (number) DO UPDATE SET \
                 key_id = excluded.key_id, nonce = excluded.nonce, ciphertext = excluded.ciphertext, \
                 updated_at = excluded.updated_at",
            )
            .bind(fence.number.as_str())
            .bind(sealed.key_id)
            .bind(sealed.nonce)
            .bind(sealed.ciphertext)
            .bind(now_ms())
            .execute(&mut *tx)
            .await
            .map_err(db)?;
            tx.commit().await.map_err(db)
            })
            .await
    }

    async fn clear_session(&self, fence: &Fence) -> Result<(), StoreError> {
        self.watch
            .write(async {
                let mut tx = self.fenced(fence).await?;
                // The device's protocol state goes with its session: a logged-out device's keys
                // would only log in to be refused again; the next pairing starts afresh.
                for table in ["sessions", "wa_state"] {
                    sqlx::query(&format!("DELETE FROM {table} WHERE number = $1"))
                        .bind(fence.number.as_str())
                        .execute(&mut *tx)
                        .await
                        .map_err(db)?;
                }
                tx.commit().await.map_err(db)
            })
            .await
    }
}

/// The embedded coordinator's tokens: each ownership gets the next token from the store itself,
/// so tokens keep rising across restarts of the process.
#[async_trait]
impl TokenSource for SqlStore {
    async fn next_token(&self, number: &PhoneNumber) -> Result<FencingToken, StoreError> {
        self.watch
            .write(async {
                let token: i64 = sqlx::query_scalar(
                    "INSERT INTO fences (number, token) VALUES ($1, 1) ON CONFLICT (number) \
                 DO UPDATE SET token = fences.token + 1 RETURNING token",
                )
                .bind(number.as_str())
                .fetch_one(&self.pool)
                .await
                .map_err(db)?;
                u64::try_from(token)
                    .ok()
                    .and_then(FencingToken::new)
                    .ok_or_else(|| StoreError::Corrupt(format!("fencing token {token}")))
            })
            .await
    }
}

impl SqlStore {
    /// Updates the queued outbox row `id` with `set` (which binds `text` as `$1`), fenced; a
    /// row no longer queued is left as it is.
    async fn update_queued(
        &self,
        fence: &Fence,
        id: &MessageId,
        set: &str,
        text: &str,
    ) -> Result<(), StoreError> {
        let sql = format!(
            "UPDATE outbox SET {set} WHERE number = $2 AND message_id = $3 AND status = 'queued'"
        );
        self.watch
            .write(async {
                let mut tx = self.fenced(fence).await?;
                sqlx::query(&sql)
                    .bind(text)
                    .bind(fence.number.as_str())
                    .bind(id.as_str())
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
                tx.commit().await.map_err(db)
            })
            .await
    }

    /// The highest fencing token stored for `number`.
    pub async fn highest_token(&self, number: &PhoneNumber) -> Result<Option<u64>, StoreError> {
        let token: Option<i64> = sqlx::query_scalar("SELECT token FROM fences WHERE number = $1")
            .bind(number.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        Ok(token.and_then(|t| u64::try_from(t).ok()))
    }

    /// The dead letters of `number`, oldest first, with their reasons.
    pub async fn dead_letters(
        &self,
        number: &PhoneNumber,
    ) -> Result<Vec<(InboundMessage, String)>, StoreError> {
        let rows = sqlx::query(
            "SELECT chat, sender, message_id, sender_alt, body, preview, sent_at, from_me, error \
             FROM inbound WHERE number = $1 AND status = 'dead' ORDER BY seq",
        )
        .bind(number.as_str())
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter()
            .map(|row| {
                let error: Option<String> = row.try_get("error").map_err(db)?;
                Ok((inbound_of(row)?, error.unwrap_or_default()))
            })
            .collect()
    }
}

fn parse<T>(value: &str, what: &str, f: impl FnOnce(&str) -> Option<T>) -> Result<T, StoreError> {
    f(value).ok_or_else(|| StoreError::Corrupt(format!("stored {what} {value:?}")))
}

fn inbound_of(row: &AnyRow) -> Result<InboundMessage, StoreError> {
    let chat: String = row.try_get("chat").map_err(db)?;
    let sender: String = row.try_get("sender").map_err(db)?;
    let id: String = row.try_get("message_id").map_err(db)?;
    let alt: Option<String> = row.try_get("sender_alt").map_err(db)?;
    let body: Option<String> = row.try_get("body").map_err(db)?;
    let preview: String = row.try_get("preview").map_err(db)?;
    let sent_at: i64 = row.try_get("sent_at").map_err(db)?;
    Ok(InboundMessage {
        id: parse(&id, "message id", MessageId::parse)?,
        chat: parse(&chat, "chat", |s| Jid::parse(s).ok())?,
        sender: parse(&sender, "sender", |s| Jid::parse(s).ok())?,
        sender_alt: alt
            .map(|a| parse(&a, "sender", |s| Jid::parse(s).ok()))
            .transpose()?,
        is_from_me: flag(row, "from_me")?,
        text: text::decode(body.unwrap_or(preview)),
        media: None,
        timestamp_ms: u64::try_from(sent_at).unwrap_or(0),
        offline: false,
    })
}

fn outbound_of(row: &AnyRow) -> Result<OutboundText, StoreError> {
    let id: String = row.try_get("message_id").map_err(db)?;
    let chat: String = row.try_get("chat").map_err(db)?;
    let reply_to: Option<String> = row.try_get("reply_to").map_err(db)?;
    let quoted: Option<String> = row.try_get("reply_to_sender").map_err(db)?;
    Ok(OutboundText {
        id: parse(&id, "message id", MessageId::parse)?,
        to: parse(&chat, "chat", |s| Jid::parse(s).ok())?,
        text: text::decode(row.try_get("body").map_err(db)?),
        reply_to: reply_to
            .map(|r| parse(&r, "message id", MessageId::parse))
            .transpose()?,
        reply_to_sender: quoted
            .map(|q| parse(&q, "sender", |s| Jid::parse(s).ok()))
            .transpose()?,
    })
}
