//! Retention: processed inbound rows and sent outbox rows older than the retention period are
//! deleted, in batches, by a background job. Pending, dead-lettered, given-up and expired rows
//! stay: they are the record of what went wrong, for inspection and replay.
//!
//! Both tables fill in arrival order, so the old rows come first: PostgreSQL finds them through
//! a BRIN index on the arrival time (a few pages of index, nothing per row on the hot path);
//! SQLite walks its rowid up to the first row that is recent enough.

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
        Ok(pruned)
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
        let done = sqlx::query(&sql)
            .bind(before_ms)
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
                    Ok(p) if p.inbound + p.outbox > 0 => {
                        tracing::info!(inbound = p.inbound, outbox = p.outbox, "pruned old rows");
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "pruning old rows"),
                }
            }
        })
    }
}
