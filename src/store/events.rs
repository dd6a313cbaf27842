//! The event outbox (webhooks and SSE, delivered with retries) and the audit log.

use std::time::Duration;

use sqlx::AnyConnection;
use sqlx::Row;
use sqlx::any::AnyRow;
use switchboard_actors::store::StoreError;

use super::{Dialect, SqlStore, db, now_ms, to_i64};

/// An event waiting for delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRecord {
    /// Position in the outbox; delivery order.
    pub seq: i64,
    /// The tenant whose webhooks receive it.
    pub tenant: String,
    /// What happened (`message.received`, `number.state`, …).
    pub kind: String,
    /// The body (JSON).
    pub payload: serde_json::Value,
    /// Deliveries tried so far.
    pub attempts: i64,
}

/// One audited mutation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    /// The tenant it concerns, if any.
    pub tenant: Option<String>,
    /// Who did it (token id, `system`, …).
    pub actor: String,
    /// What (`number.add`, `flow.publish`, …).
    pub action: String,
    /// On what.
    pub target: String,
    /// Details (JSON); never secrets.
    pub detail: serde_json::Value,
}

impl SqlStore {
    /// Queues an event for delivery; returns its position.
    pub async fn enqueue_event(
        &self,
        tenant: &str,
        kind: &str,
        payload: &serde_json::Value,
    ) -> Result<i64, StoreError> {
        let now = now_ms();
        sqlx::query_scalar(
            "INSERT INTO events (tenant_id, kind, payload, next_attempt_at, created_at) \
             VALUES ($1, $2, $3, $4, $4) RETURNING seq",
        )
        .bind(tenant)
        .bind(kind)
        .bind(payload.to_string())
        .bind(now)
        .fetch_one(&self.pool)
        .await
        .map_err(db)
    }

    /// Claims up to `limit` due events for `lease`: they are not handed to another claimer until
    /// the lease ends, unless marked delivered or failed first. Several dispatchers may claim at
    /// once (PostgreSQL: `FOR UPDATE SKIP LOCKED`; SQLite has one writer).
    pub async fn claim_events(
        &self,
        limit: usize,
        lease: Duration,
    ) -> Result<Vec<EventRecord>, StoreError> {
        let now = now_ms();
        let until = now + to_i64(u64::try_from(lease.as_millis()).unwrap_or(u64::MAX));
        let lock = match self.dialect {
            Dialect::Postgres => "FOR UPDATE SKIP LOCKED",
            Dialect::Sqlite => "",
        };
        let sql = format!(
            "UPDATE events SET next_attempt_at = $1 WHERE seq IN (SELECT seq FROM events \
             WHERE status = 'pending' AND next_attempt_at <= $2 ORDER BY seq LIMIT $3 {lock}) \
             RETURNING seq, tenant_id, kind, payload, attempts"
        );
        let rows = sqlx::query(&sql)
            .bind(until)
            .bind(now)
            .bind(to_i64(limit as u64))
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        let mut events: Vec<EventRecord> = rows.iter().map(event_of).collect::<Result<_, _>>()?;
        events.sort_by_key(|e| e.seq);
        Ok(events)
    }

    /// The event was delivered.
    pub async fn event_delivered(&self, seq: i64) -> Result<(), StoreError> {
        sqlx::query("UPDATE events SET status = 'delivered', delivered_at = $1 WHERE seq = $2")
            .bind(now_ms())
            .bind(seq)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
    }

    /// A delivery failed: retry after `retry_in`, or, with `None`, set it aside as dead.
    pub async fn event_failed(
        &self,
        seq: i64,
        error: &str,
        retry_in: Option<Duration>,
    ) -> Result<(), StoreError> {
        let next = retry_in.map(|d| now_ms() + to_i64(u64::try_from(d.as_millis()).unwrap_or(0)));
        sqlx::query(
            "UPDATE events SET attempts = attempts + 1, last_error = $1, \
             status = CASE WHEN $2 IS NULL THEN 'dead' ELSE status END, \
             next_attempt_at = COALESCE($2, next_attempt_at) WHERE seq = $3",
        )
        .bind(error)
        .bind(next)
        .bind(seq)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    /// Appends to the audit log.
    pub async fn audit(&self, entry: &AuditEntry) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await.map_err(db)?;
        insert_audit(&mut conn, entry).await
    }

    /// The newest `limit` audit entries of a tenant, newest first.
    pub async fn audit_log(
        &self,
        tenant: &str,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT tenant_id, actor, action, target, detail FROM audit WHERE tenant_id = $1 \
             ORDER BY seq DESC LIMIT $2",
        )
        .bind(tenant)
        .bind(to_i64(limit as u64))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter().map(audit_of).collect()
    }
}

/// Appends `entry` to the audit log on `conn` (inside the transaction of its change).
pub(super) async fn insert_audit(
    conn: &mut AnyConnection,
    entry: &AuditEntry,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO audit (tenant_id, actor, action, target, detail, at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(entry.tenant.clone())
    .bind(entry.actor.as_str())
    .bind(entry.action.as_str())
    .bind(entry.target.as_str())
    .bind(entry.detail.to_string())
    .bind(now_ms())
    .execute(conn)
    .await
    .map_err(db)?;
    Ok(())
}

/// An audit entry from its row.
pub(super) fn audit_of(r: &AnyRow) -> Result<AuditEntry, StoreError> {
    let detail: String = r.try_get("detail").map_err(db)?;
    Ok(AuditEntry {
        tenant: r.try_get("tenant_id").map_err(db)?,
        actor: r.try_get("actor").map_err(db)?,
        action: r.try_get("action").map_err(db)?,
        target: r.try_get("target").map_err(db)?,
        detail: serde_json::from_str(&detail).map_err(|e| StoreError::Corrupt(e.to_string()))?,
    })
}

fn event_of(r: &AnyRow) -> Result<EventRecord, StoreError> {
    let payload: String = r.try_get("payload").map_err(db)?;
    Ok(EventRecord {
        seq: r.try_get("seq").map_err(db)?,
        tenant: r.try_get("tenant_id").map_err(db)?,
        kind: r.try_get("kind").map_err(db)?,
        payload: serde_json::from_str(&payload).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        attempts: r.try_get("attempts").map_err(db)?,
    })
}
