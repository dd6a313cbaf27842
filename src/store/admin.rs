//! Tenants, numbers, contacts, conversations, flows and AI jobs.

use sqlx::AnyConnection;
use sqlx::Row;
use sqlx::any::AnyRow;
use switchboard_actors::store::{Fence, StoreError};
use switchboard_actors::{Jid, PhoneNumber};

use super::{SqlStore, db, flag, now_ms, text};

/// A tenant: a client of the agency, owning numbers and flows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantRecord {
    /// Stable id (slug).
    pub id: String,
    /// Display name.
    pub name: String,
    /// Keep whole message texts after processing instead of a 100-character preview.
    pub full_transcripts: bool,
}

/// A number registered to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumberRecord {
    /// The account.
    pub number: PhoneNumber,
    /// Its tenant.
    pub tenant: String,
    /// The node an admin pinned it to, if any.
    pub pinned_node: Option<String>,
    /// Per-number settings (JSON object).
    pub settings: serde_json::Value,
}

/// A contact's consent to automated (AI) replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptIn {
    /// Never asked.
    Unknown,
    /// Agreed.
    OptedIn,
    /// Refused or withdrew.
    OptedOut,
}

impl OptIn {
    fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::OptedIn => "opted_in",
            Self::OptedOut => "opted_out",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "unknown" => Ok(Self::Unknown),
            "opted_in" => Ok(Self::OptedIn),
            "opted_out" => Ok(Self::OptedOut),
            other => Err(StoreError::Corrupt(format!("opt-in state {other:?}"))),
        }
    }
}

/// A chat's stored state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationRecord {
    /// Flow state checkpoint (JSON).
    pub checkpoint: String,
    /// A human has taken the chat over: bots stay silent.
    pub human_takeover: bool,
}

/// Where a flow version stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowStatus {
    /// Being edited; not run.
    Draft,
    /// The version that runs.
    Published,
    /// Was published, replaced by a newer version.
    Retired,
}

impl FlowStatus {
    fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "draft" => Ok(Self::Draft),
            "published" => Ok(Self::Published),
            "retired" => Ok(Self::Retired),
            other => Err(StoreError::Corrupt(format!("flow status {other:?}"))),
        }
    }
}

/// One version of a flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowRecord {
    /// The flow's name within its tenant.
    pub name: String,
    /// Version, from 1.
    pub version: i64,
    /// Draft, published or retired.
    pub status: FlowStatus,
    /// The definition (JSON).
    pub definition: serde_json::Value,
}

/// Where an AI job stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AiJobStatus {
    /// Started, no result yet.
    Running,
    /// Answered.
    Done(String),
    /// Failed with this error.
    Failed(String),
}

/// An AI job as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AiJobRecord {
    /// Job id (derived from the inbound message, so a retry finds its job).
    pub id: String,
    /// The chat.
    pub chat: Jid,
    /// The inbound message it answers.
    pub inbound_id: String,
    /// The prompt.
    pub prompt: String,
    /// Its state.
    pub status: AiJobStatus,
}

impl SqlStore {
    /// Creates a tenant; [`StoreError::Conflict`] if the id exists.
    pub async fn create_tenant(&self, t: &TenantRecord) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await.map_err(db)?;
        create_tenant(&mut conn, t).await
    }

    /// The tenant `id`.
    pub async fn tenant(&self, id: &str) -> Result<Option<TenantRecord>, StoreError> {
        let row = sqlx::query("SELECT id, name, full_transcripts FROM tenants WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        row.as_ref().map(tenant_of).transpose()
    }

    /// Turns full transcripts on or off for a tenant.
    pub async fn set_full_transcripts(&self, tenant: &str, on: bool) -> Result<(), StoreError> {
        let done = sqlx::query("UPDATE tenants SET full_transcripts = $1 WHERE id = $2")
            .bind(on)
            .bind(tenant)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        found(done.rows_affected(), || format!("tenant {tenant}"))
    }

    /// Registers a number; [`StoreError::Conflict`] if it exists, [`StoreError::NotFound`] if
    /// the tenant does not.
    pub async fn add_number(&self, n: &NumberRecord) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await.map_err(db)?;
        add_number(&mut conn, n).await
    }

    /// Every registered number, in order.
    pub async fn numbers(&self) -> Result<Vec<NumberRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT number, tenant_id, pinned_node, settings FROM numbers ORDER BY number",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter().map(number_of).collect()
    }

    /// The number `n`, if registered.
    pub async fn number(&self, n: &PhoneNumber) -> Result<Option<NumberRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT number, tenant_id, pinned_node, settings FROM numbers WHERE number = $1",
        )
        .bind(n.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.as_ref().map(number_of).transpose()
    }

    /// Pins a number to a node (or unpins it).
    pub async fn pin_number(&self, n: &PhoneNumber, node: Option<&str>) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await.map_err(db)?;
        pin_number(&mut conn, n, node).await
    }

    /// Removes a number and everything stored for it. The number goes first: that waits for
    /// writes in flight (they hold it `FOR KEY SHARE`), and later writes find it gone. Its fence
    /// stays, so a number added again keeps rising tokens.
    pub async fn remove_number(&self, n: &PhoneNumber) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        remove_number(&mut tx, n).await?;
        tx.commit().await.map_err(db)
    }

    /// Records a contact's consent.
    pub async fn set_opt_in(
        &self,
        fence: &Fence,
        contact: &Jid,
        state: OptIn,
    ) -> Result<(), StoreError> {
        let mut tx = self.fenced(fence).await?;
        sqlx::query(
            "INSERT INTO contacts (number, contact, opt_in, updated_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (number, contact) DO UPDATE SET opt_in = excluded.opt_in, \
             updated_at = excluded.updated_at",
        )
        .bind(fence.number.as_str())
        .bind(contact.to_string())
        .bind(state.as_str())
        .bind(now_ms())
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)
    }

    /// A contact's consent ([`OptIn::Unknown`] if never recorded).
    pub async fn opt_in(&self, number: &PhoneNumber, contact: &Jid) -> Result<OptIn, StoreError> {
        let state: Option<String> =
            sqlx::query_scalar("SELECT opt_in FROM contacts WHERE number = $1 AND contact = $2")
                .bind(number.as_str())
                .bind(contact.to_string())
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?;
        state.map_or(Ok(OptIn::Unknown), |s| OptIn::parse(&s))
    }

    /// Hands a chat to a human (or back to the bot).
    pub async fn set_human_takeover(
        &self,
        fence: &Fence,
        chat: &Jid,
        on: bool,
    ) -> Result<(), StoreError> {
        let mut tx = self.fenced(fence).await?;
        sqlx::query(
            "INSERT INTO conversations (number, chat, checkpoint, human_takeover, updated_at) \
             VALUES ($1, $2, '{}', $3, $4) ON CONFLICT (number, chat) DO UPDATE SET \
             human_takeover = excluded.human_takeover, updated_at = excluded.updated_at",
        )
        .bind(fence.number.as_str())
        .bind(chat.to_string())
        .bind(on)
        .bind(now_ms())
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)
    }

    /// A chat's stored state.
    pub async fn conversation(
        &self,
        number: &PhoneNumber,
        chat: &Jid,
    ) -> Result<Option<ConversationRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT checkpoint, human_takeover FROM conversations WHERE number = $1 AND chat = $2",
        )
        .bind(number.as_str())
        .bind(chat.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.map(|r| {
            Ok(ConversationRecord {
                checkpoint: r.try_get("checkpoint").map_err(db)?,
                human_takeover: flag(&r, "human_takeover")?,
            })
        })
        .transpose()
    }

    /// Saves a new draft version of a flow; returns its version.
    pub async fn save_flow_draft(
        &self,
        tenant: &str,
        name: &str,
        definition: &serde_json::Value,
    ) -> Result<i64, StoreError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let latest: Option<i64> =
            sqlx::query_scalar("SELECT MAX(version) FROM flows WHERE tenant_id = $1 AND name = $2")
                .bind(tenant)
                .bind(name)
                .fetch_one(&mut *tx)
                .await
                .map_err(db)?;
        let version = latest.unwrap_or(0) + 1;
        sqlx::query(
            "INSERT INTO flows (tenant_id, name, version, status, definition, created_at) \
             VALUES ($1, $2, $3, 'draft', $4, $5)",
        )
        .bind(tenant)
        .bind(name)
        .bind(version)
        .bind(definition.to_string())
        .bind(now_ms())
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(version)
    }

    /// Publishes a draft; the version published before is retired.
    pub async fn publish_flow(
        &self,
        tenant: &str,
        name: &str,
        version: i64,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        sqlx::query(
            "UPDATE flows SET status = 'retired' WHERE tenant_id = $1 AND name = $2 \
             AND status = 'published'",
        )
        .bind(tenant)
        .bind(name)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        let done = sqlx::query(
            "UPDATE flows SET status = 'published', published_at = $1 WHERE tenant_id = $2 \
             AND name = $3 AND version = $4 AND status = 'draft'",
        )
        .bind(now_ms())
        .bind(tenant)
        .bind(name)
        .bind(version)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        found(done.rows_affected(), || format!("draft {name} v{version}"))?;
        tx.commit().await.map_err(db)
    }

    /// Every version of a flow, oldest first.
    pub async fn flow_versions(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<Vec<FlowRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT name, version, status, definition FROM flows WHERE tenant_id = $1 \
             AND name = $2 ORDER BY version",
        )
        .bind(tenant)
        .bind(name)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter().map(flow_of).collect()
    }

    /// The published version of a flow.
    pub async fn published_flow(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<Option<FlowRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT name, version, status, definition FROM flows WHERE tenant_id = $1 \
             AND name = $2 AND status = 'published'",
        )
        .bind(tenant)
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.as_ref().map(flow_of).transpose()
    }

    /// Records a started AI job (again after a restart: idempotent on its id).
    pub async fn start_ai_job(&self, fence: &Fence, job: &AiJobRecord) -> Result<(), StoreError> {
        let mut tx = self.fenced(fence).await?;
        sqlx::query(
            "INSERT INTO ai_jobs (id, number, chat, inbound_id, prompt, status, created_at) \
             VALUES ($1, $2, $3, $4, $5, 'running', $6) ON CONFLICT (id) DO NOTHING",
        )
        .bind(job.id.as_str())
        .bind(fence.number.as_str())
        .bind(job.chat.to_string())
        .bind(job.inbound_id.as_str())
        .bind(text::encode(&job.prompt).into_owned())
        .bind(now_ms())
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)
    }

    /// Commits an AI job's result by its id; a second result for the same job is ignored.
    pub async fn finish_ai_job(
        &self,
        fence: &Fence,
        id: &str,
        result: Result<&str, &str>,
    ) -> Result<(), StoreError> {
        let (status, answer, error) = match result {
            Ok(answer) => ("done", Some(answer), None),
            Err(e) => ("failed", None, Some(e)),
        };
        let mut tx = self.fenced(fence).await?;
        sqlx::query(
            "UPDATE ai_jobs SET status = $1, result = $2, error = $3, finished_at = $4 \
             WHERE id = $5 AND number = $6 AND status = 'running'",
        )
        .bind(status)
        .bind(answer.map(|t| text::encode(t).into_owned()))
        .bind(error.map(str::to_owned))
        .bind(now_ms())
        .bind(id)
        .bind(fence.number.as_str())
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)
    }

    /// An AI job by id.
    pub async fn ai_job(&self, id: &str) -> Result<Option<AiJobRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT id, chat, inbound_id, prompt, status, result, error FROM ai_jobs WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.as_ref().map(ai_job_of).transpose()
    }
}

pub(super) async fn create_tenant(
    conn: &mut AnyConnection,
    t: &TenantRecord,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO tenants (id, name, full_transcripts, created_at) VALUES ($1, $2, $3, $4)",
    )
    .bind(t.id.as_str())
    .bind(t.name.as_str())
    .bind(t.full_transcripts)
    .bind(now_ms())
    .execute(conn)
    .await
    .map_err(db)?;
    Ok(())
}

pub(super) async fn add_number(
    conn: &mut AnyConnection,
    n: &NumberRecord,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO numbers (number, tenant_id, pinned_node, settings, created_at) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(n.number.as_str())
    .bind(n.tenant.as_str())
    .bind(n.pinned_node.clone())
    .bind(n.settings.to_string())
    .bind(now_ms())
    .execute(conn)
    .await
    .map_err(db)?;
    Ok(())
}

pub(super) async fn pin_number(
    conn: &mut AnyConnection,
    n: &PhoneNumber,
    node: Option<&str>,
) -> Result<(), StoreError> {
    let done = sqlx::query("UPDATE numbers SET pinned_node = $1 WHERE number = $2")
        .bind(node.map(str::to_owned))
        .bind(n.as_str())
        .execute(conn)
        .await
        .map_err(db)?;
    found(done.rows_affected(), || format!("number {n}"))
}

pub(super) async fn set_settings(
    conn: &mut AnyConnection,
    n: &PhoneNumber,
    settings: &serde_json::Value,
) -> Result<(), StoreError> {
    let done = sqlx::query("UPDATE numbers SET settings = $1 WHERE number = $2")
        .bind(settings.to_string())
        .bind(n.as_str())
        .execute(conn)
        .await
        .map_err(db)?;
    found(done.rows_affected(), || format!("number {n}"))
}

/// Removes a number and everything stored for them; call inside a transaction. The number goes
/// first: that waits for writes in flight (they hold it `FOR KEY SHARE`), and later writes find
/// it gone. Its fence stays, so a number added again keeps rising tokens.
pub(super) async fn remove_number(
    conn: &mut AnyConnection,
    n: &PhoneNumber,
) -> Result<(), StoreError> {
    let done = sqlx::query("DELETE FROM numbers WHERE number = $1")
        .bind(n.as_str())
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    found(done.rows_affected(), || format!("number {n}"))?;
    for table in [
        "inbound",
        "outbox",
        "ai_jobs",
        "conversations",
        "contacts",
        "sessions",
        "wa_state",
    ] {
        sqlx::query(&format!("DELETE FROM {table} WHERE number = $1"))
            .bind(n.as_str())
            .execute(&mut *conn)
            .await
            .map_err(db)?;
    }
    Ok(())
}

fn found(rows: u64, what: impl FnOnce() -> String) -> Result<(), StoreError> {
    if rows == 0 {
        Err(StoreError::NotFound(what()))
    } else {
        Ok(())
    }
}

fn json_of(s: &str) -> Result<serde_json::Value, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(e.to_string()))
}

pub(super) fn tenant_of(r: &AnyRow) -> Result<TenantRecord, StoreError> {
    Ok(TenantRecord {
        id: r.try_get("id").map_err(db)?,
        name: r.try_get("name").map_err(db)?,
        full_transcripts: flag(r, "full_transcripts")?,
    })
}

pub(super) fn number_of(r: &AnyRow) -> Result<NumberRecord, StoreError> {
    let number: String = r.try_get("number").map_err(db)?;
    let settings: String = r.try_get("settings").map_err(db)?;
    Ok(NumberRecord {
        number: PhoneNumber::parse(&number).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        tenant: r.try_get("tenant_id").map_err(db)?,
        pinned_node: r.try_get("pinned_node").map_err(db)?,
        settings: json_of(&settings)?,
    })
}

fn flow_of(r: &AnyRow) -> Result<FlowRecord, StoreError> {
    let status: String = r.try_get("status").map_err(db)?;
    let definition: String = r.try_get("definition").map_err(db)?;
    Ok(FlowRecord {
        name: r.try_get("name").map_err(db)?,
        version: r.try_get("version").map_err(db)?,
        status: FlowStatus::parse(&status)?,
        definition: json_of(&definition)?,
    })
}

fn ai_job_of(r: &AnyRow) -> Result<AiJobRecord, StoreError> {
    let chat: String = r.try_get("chat").map_err(db)?;
    let status: String = r.try_get("status").map_err(db)?;
    let result: Option<String> = r.try_get("result").map_err(db)?;
    let error: Option<String> = r.try_get("error").map_err(db)?;
    let status = match status.as_str() {
        "running" => AiJobStatus::Running,
        "done" => AiJobStatus::Done(text::decode(result.unwrap_or_default())),
        "failed" => AiJobStatus::Failed(error.unwrap_or_default()),
        other => return Err(StoreError::Corrupt(format!("AI job status {other:?}"))),
    };
    Ok(AiJobRecord {
        id: r.try_get("id").map_err(db)?,
        chat: Jid::parse(&chat).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        inbound_id: r.try_get("inbound_id").map_err(db)?,
        prompt: text::decode(r.try_get("prompt").map_err(db)?),
        status,
    })
}
