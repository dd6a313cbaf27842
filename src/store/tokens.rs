//! API tokens of the admin API, and the operators' changes applied with their audit row.
//!
//! A token's secret is never stored: only its SHA-256 (hex), looked up on every request. A
//! change an operator makes ([`Change`]) commits in one transaction with the audit row that
//! records it, so the log never misses a change nor records one that did not happen.

use sqlx::AnyConnection;
use sqlx::Row;
use sqlx::any::AnyRow;
use switchboard_actors::PhoneNumber;
use switchboard_actors::store::StoreError;

use super::admin::{self, NumberRecord, TenantRecord};
use super::events::{self, AuditEntry};
use super::{SqlStore, db, now_ms, to_i64};

/// What a token may do within its tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Reads only.
    Viewer,
    /// Reads, adds and changes numbers, sends, restarts.
    Editor,
    /// Everything in the tenant: deletes, logouts, tokens, the audit log.
    Admin,
}

impl Role {
    /// Every role, least first.
    pub const ALL: [Self; 3] = [Self::Viewer, Self::Editor, Self::Admin];

    /// Its name in the API and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Editor => "editor",
            Self::Admin => "admin",
        }
    }

    /// The role named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

/// A token as stored (never its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// Public id: shown in lists and in the audit log as the actor.
    pub id: String,
    /// The tenant it is scoped to.
    pub tenant: String,
    /// What it may do there.
    pub role: Role,
    /// A label for people.
    pub name: String,
    /// When it was created (Unix ms).
    pub created_at_ms: i64,
    /// Revoked tokens authenticate nothing.
    pub revoked: bool,
}

/// A change an operator makes, applied with its audit row ([`SqlStore::apply`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A new tenant.
    CreateTenant(TenantRecord),
    /// A new token, stored by the hash of its secret.
    CreateToken {
        /// The token.
        token: TokenRecord,
        /// SHA-256 of its secret, hex.
        hash: String,
    },
    /// A token that authenticates nothing from now on.
    RevokeToken {
        /// Its tenant.
        tenant: String,
        /// Its id.
        id: String,
    },
    /// A number registered.
    AddNumber(NumberRecord),
    /// A number's settings replaced.
    SetSettings(PhoneNumber, serde_json::Value),
    /// A number pinned to a node, or unpinned.
    Pin(PhoneNumber, Option<String>),
    /// A number and everything stored for it removed.
    RemoveNumber(PhoneNumber),
    /// Nothing stored changes; the audit row records an action (a restart, a send).
    Act,
}

/// One row of the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    /// Its position: pages go by it, newest first.
    pub seq: i64,
    /// When (Unix ms).
    pub at_ms: i64,
    /// What was done.
    pub entry: AuditEntry,
}

impl SqlStore {
    /// Applies `change` and appends `audit`, in one transaction.
    pub async fn apply(&self, change: &Change, audit: &AuditEntry) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        apply(&mut tx, change).await?;
        events::insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(db)
    }

    /// Applies every one of `changes` and appends `audit`, in one transaction.
    pub async fn apply_all(
        &self,
        changes: &[Change],
        audit: &AuditEntry,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        for change in changes {
            apply(&mut tx, change).await?;
        }
        events::insert_audit(&mut tx, audit).await?;
        tx.commit().await.map_err(db)
    }

    /// The live (not revoked) token whose secret hashes to `hash`.
    pub async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT id, tenant_id, role, name, created_at, revoked_at FROM api_tokens \
             WHERE hash = $1 AND revoked_at IS NULL",
        )
        .bind(hash)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.as_ref().map(token_of).transpose()
    }

    /// The token `id` of `tenant`.
    pub async fn token(&self, tenant: &str, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT id, tenant_id, role, name, created_at, revoked_at FROM api_tokens \
             WHERE tenant_id = $1 AND id = $2",
        )
        .bind(tenant)
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.as_ref().map(token_of).transpose()
    }

    /// A page of `tenant`'s tokens, by id, after `after`.
    pub async fn tokens(
        &self,
        tenant: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<TokenRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, tenant_id, role, name, created_at, revoked_at FROM api_tokens \
             WHERE tenant_id = $1 AND id > $2 ORDER BY id LIMIT $3",
        )
        .bind(tenant)
        .bind(after.unwrap_or(""))
        .bind(to_i64(limit as u64))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter().map(token_of).collect()
    }

    /// A page of tenants, by id, after `after`.
    pub async fn tenants(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<TenantRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, name, full_transcripts FROM tenants WHERE id > $1 ORDER BY id LIMIT $2",
        )
        .bind(after.unwrap_or(""))
        .bind(to_i64(limit as u64))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter().map(admin::tenant_of).collect()
    }

    /// A page of numbers (of `tenant`, or of every tenant), by number, after `after`.
    pub async fn numbers_page(
        &self,
        tenant: Option<&str>,
        after: Option<&PhoneNumber>,
        limit: usize,
    ) -> Result<Vec<NumberRecord>, StoreError> {
        let after = after.map_or("", PhoneNumber::as_str);
        let limit = to_i64(limit as u64);
        let query = match tenant {
            Some(t) => sqlx::query(
                "SELECT number, tenant_id, pinned_node, settings FROM numbers \
                 WHERE tenant_id = $1 AND number > $2 ORDER BY number LIMIT $3",
            )
            .bind(t.to_owned()),
            None => sqlx::query(
                "SELECT number, tenant_id, pinned_node, settings FROM numbers \
                 WHERE $1 = '' AND number > $2 ORDER BY number LIMIT $3",
            )
            .bind(String::new()),
        };
        let rows = query
            .bind(after.to_owned())
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        rows.iter().map(admin::number_of).collect()
    }

    /// A page of the audit log (of `tenant`, or all of it), newest first, before `before`.
    pub async fn audit_page(
        &self,
        tenant: Option<&str>,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<AuditRow>, StoreError> {
        let before = before.unwrap_or(i64::MAX);
        let limit = to_i64(limit as u64);
        let sql_tenant = "SELECT seq, at, tenant_id, actor, action, target, detail FROM audit \
             WHERE tenant_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3";
        let sql_all = "SELECT seq, at, tenant_id, actor, action, target, detail FROM audit \
             WHERE $1 = '' AND seq < $2 ORDER BY seq DESC LIMIT $3";
        let (sql, t) = match tenant {
            Some(t) => (sql_tenant, t.to_owned()),
            None => (sql_all, String::new()),
        };
        let rows = sqlx::query(sql)
            .bind(t)
            .bind(before)
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        rows.iter()
            .map(|r| {
                Ok(AuditRow {
                    seq: r.try_get("seq").map_err(db)?,
                    at_ms: r.try_get("at").map_err(db)?,
                    entry: events::audit_of(r)?,
                })
            })
            .collect()
    }
}

async fn apply(conn: &mut AnyConnection, change: &Change) -> Result<(), StoreError> {
    match change {
        Change::CreateTenant(t) => admin::create_tenant(conn, t).await,
        Change::CreateToken { token, hash } => {
            sqlx::query(
                "INSERT INTO api_tokens (id, tenant_id, role, name, hash, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(token.id.as_str())
            .bind(token.tenant.as_str())
            .bind(token.role.as_str())
            .bind(token.name.as_str())
            .bind(hash.as_str())
            .bind(now_ms())
            .execute(conn)
            .await
            .map_err(db)?;
            Ok(())
        }
        Change::RevokeToken { tenant, id } => {
            let done = sqlx::query(
                "UPDATE api_tokens SET revoked_at = $1 \
                 WHERE tenant_id = $2 AND id = $3 AND revoked_at IS NULL",
            )
            .bind(now_ms())
            .bind(tenant.as_str())
            .bind(id.as_str())
            .execute(conn)
            .await
            .map_err(db)?;
            if done.rows_affected() == 0 {
                return Err(StoreError::NotFound(format!("token {id}")));
            }
            Ok(())
        }
        Change::AddNumber(n) => admin::add_number(conn, n).await,
        Change::SetSettings(n, settings) => admin::set_settings(conn, n, settings).await,
        Change::Pin(n, node) => admin::pin_number(conn, n, node.as_deref()).await,
        Change::RemoveNumber(n) => admin::remove_number(conn, n).await,
        Change::Act => Ok(()),
    }
}

fn token_of(r: &AnyRow) -> Result<TokenRecord, StoreError> {
    let role: String = r.try_get("role").map_err(db)?;
    let revoked: Option<i64> = r.try_get("revoked_at").map_err(db)?;
    Ok(TokenRecord {
        id: r.try_get("id").map_err(db)?,
        tenant: r.try_get("tenant_id").map_err(db)?,
        role: Role::parse(&role).ok_or_else(|| StoreError::Corrupt(format!("role {role:?}")))?,
        name: r.try_get("name").map_err(db)?,
        created_at_ms: r.try_get("created_at").map_err(db)?,
        revoked: revoked.is_some(),
    })
}
