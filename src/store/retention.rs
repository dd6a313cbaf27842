//! Retention: processed inbound rows and sent outbox rows older than the retention period are
//! deleted, in batches, by a background job. Pending, dead-lettered, given-up and expired rows
//! stay: they are the record of what went wrong, for inspection and replay.
//!
//! Both tables fill in arrival order, so the old rows come first: PostgreSQL finds them through
//! a BRIN index on the arrival time (a few pages of index, nothing per row on the hot path);
//! SQLite walks its rowid up to the first row that is recent enough.
//!
//! The same pass bounds the WhatsApp client's LID ↔ phone mappings (whatsapp-rust loads every
//! one of them into memory when a number starts): a mapping last learned before the cutoff is
//! deleted unless a conversation of its number uses its LID or its phone. The client learns it
//! again when it next needs it.

use std::time::Duration;

use switchboard_actors::store::StoreError;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{Dialect, SqlStore, db, now_ms};

/// Rows deleted per statement: small enough that no statement holds locks for long.
pub const PRUNE_BATCH: i64 = 1000;

/// What one pruning pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Processed inbound messages.
    pub inbound: u64,
    /// Sent replies.
    pub outbox: u64,
    /// LID ↔ phone mappings no conversation uses.
    pub lid_mappings: u64,
}

/// The tables pruned: table, the status that may go, the time column.
const TABLES: [(&str, &str, &str); 2] = [
    ("inbound", "processed", "received_at"),
    ("outbox", "sent", "created_at"),
];

impl SqlStore {
    /// Deletes processed inbound rows and sent outbox rows from before `before_ms` (Unix ms),
    /// [`PRUNE_BATCH`] at a time, yielding between batches.
    pub async fn prune(&self, before_ms: i64) -> Result<Pruned, StoreError> {
        let mut pruned = Pruned::default();
        for (i, (table, status, at)) in TABLES.into_iter().enumerate() {
            loop {
                let deleted = self.prune_batch(table, status, at, before_ms).await?;
                if i == 0 {
                    pruned.inbound += deleted;
                } else {
                    pruned.outbox += deleted;
                }
                if deleted < PRUNE_BATCH as u64 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        loop {
            let deleted = self.prune_lid_batch(before_ms / 1000).await?;
            pruned.lid_mappings += deleted;
            if deleted < PRUNE_BATCH as u64 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(pruned)
    }

    /// Deletes up to [`PRUNE_BATCH`] LID mappings learned before `before_s` (Unix seconds, as
    /// the client stamps them) that no conversation of their number uses.
    async fn prune_lid_batch(&self, before_s: i64) -> Result<u64, StoreError> {
        const UNUSED: &str = "space = 'lid' AND n1 < $1 AND NOT EXISTS (SELECT 1 FROM \
            conversations c WHERE c.number = w.number AND (c.chat = w.k1 || '@lid' \
            OR c.chat = w.alt || '@s.whatsapp.net'))";
        let sql = match self.dialect {
            Dialect::Postgres => format!(
                "DELETE FROM wa_state WHERE ctid = ANY (ARRAY(SELECT ctid FROM wa_state w \
                 WHERE {UNUSED} LIMIT $2))"
            ),
            Dialect::Sqlite => format!(
                "DELETE FROM wa_state WHERE rowid IN (SELECT rowid FROM wa_state w \
                 WHERE {UNUSED} LIMIT $2)"
            ),
        };
        self.delete_batch(&sql, before_s).await
    }

    async fn prune_batch(
        &self,
        table: &str,
        status: &str,
        at: &str,
        before_ms: i64,
    ) -> Result<u64, StoreError> {
        let sql = match self.dialect {
            Dialect::Postgres => format!(
                "DELETE FROM {table} WHERE ctid = ANY (ARRAY(SELECT ctid FROM {table} \
                 WHERE status = '{status}' AND {at} < $1 LIMIT $2))"
            ),
            // Everything below the first recent row is old; only what is there is scanned.
            Dialect::Sqlite => format!(
                "DELETE FROM {table} WHERE seq IN (SELECT seq FROM {table} WHERE seq < \
                 COALESCE((SELECT seq FROM {table} WHERE {at} >= $1 ORDER BY seq LIMIT 1), \
                 9223372036854775807) AND status = '{status}' AND {at} < $1 LIMIT $2)"
            ),
        };
        self.delete_batch(&sql, before_ms).await
    }

    /// Runs one pruning statement: `$1` is the cutoff, `$2` the batch size.
    async fn delete_batch(&self, sql: &str, cutoff: i64) -> Result<u64, StoreError> {
        let done = sqlx::query(sql)
            .bind(cutoff)
            .bind(PRUNE_BATCH)
            .execute(&self.pool)
            .await
            .map_err(db);
        self.watch.wrote(&done);
        Ok(done?.rows_affected())
    }

    /// Prunes what is older than `keep`, now and then every `every`, until `stop` fires.
    pub fn spawn_retention(
        &self,
        keep: Duration,
        every: Duration,
        stop: CancellationToken,
    ) -> JoinHandle<()> {
        let store = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every.max(Duration::from_secs(1)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let keep_ms = i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
                let before = now_ms().saturating_sub(keep_ms);
                match store.prune(before).await {
                    Ok(p) if p.inbound + p.outbox + p.lid_mappings > 0 => {
                        tracing::info!(
                            inbound = p.inbound,
                            outbox = p.outbox,
                            lid_mappings = p.lid_mappings,
                            "pruned old rows"
                        );
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "pruning old rows"),
                }
            }
        })
    }
}
