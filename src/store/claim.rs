//! One node per store, until the cluster brings real leases: a node claims the store before it
//! runs any number, and a second node that finds it claimed stops with an error naming the
//! first. Two nodes on one store would otherwise take numbers from each other.
//!
//! The claim is a lock the operating system or the database drops when the holder dies, so a
//! node killed with `kill -9` never leaves a stale claim behind:
//! - SQLite: an exclusive lock on the file `<database>.claim`, held by the process;
//! - PostgreSQL: a session advisory lock, held by a connection of its own (re-taken if that
//!   connection is lost, for instance across a database restart).
//!
//! Who holds it is written in `node_claims`, for the error a second node reports.

use std::fs::File;
use std::path::PathBuf;
use std::time::Duration;

use sqlx::{AnyConnection, Connection, Row};
use switchboard_actors::store::StoreError;
use tokio::task::JoinHandle;

use super::{Dialect, SqlStore, db, now_ms, sqlite_path};

/// The advisory lock's key: the same for every node of every version.
const LOCK_KEY: i64 = 0x5357_4254_4348_4e44;

/// How long a claim is tried before the node holding it is reported.
pub const CLAIM_PATIENCE: Duration = Duration::from_secs(5);

/// How often the PostgreSQL claim checks that its connection (and so its lock) is alive.
const RECHECK: Duration = Duration::from_secs(5);

/// Why a node may not run this store.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// Another live node runs it.
    #[error(
        "this store is already run by node `{node}` (pid {pid} on {host}, since {since_ms} ms \
         after the epoch); stop that node first, or give this one a store of its own"
    )]
    Held {
        /// The holder's node id.
        node: String,
        /// Where it runs.
        host: String,
        /// Its process id.
        pid: i64,
        /// When it claimed the store (Unix ms).
        since_ms: i64,
    },
    /// The claim could not be checked.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A held claim; dropping it releases the store.
pub struct Claim {
    /// SQLite: the locked file.
    _file: Option<File>,
    /// PostgreSQL: the task holding the locked connection.
    task: Option<JoinHandle<()>>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl SqlStore {
    /// Claims the store for node `node`, or fails naming the node that holds it. A claim held
    /// by a node that just died may take the database a moment to drop: it is tried again for
    /// [`CLAIM_PATIENCE`].
    pub async fn claim(&self, node: &str) -> Result<Claim, ClaimError> {
        let deadline = tokio::time::Instant::now() + CLAIM_PATIENCE;
        loop {
            let claimed = match self.dialect {
                Dialect::Sqlite => self.claim_sqlite(node).await,
                Dialect::Postgres => self.claim_postgres(node).await,
            };
            match claimed {
                Err(ClaimError::Held { .. }) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                other => return other,
            }
        }
    }

    async fn claim_sqlite(&self, node: &str) -> Result<Claim, ClaimError> {
        let Some(path) = self.url_path() else {
            // An in-memory database is this process's alone.
            return Ok(Claim {
                _file: None,
                task: None,
            });
        };
        let mut lock = path.into_os_string();
        lock.push(".claim");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock)
            .map_err(|e| StoreError::Setup(format!("opening {}: {e}", lock.display())))?;
        if file.try_lock().is_err() {
            return Err(self.holder().await);
        }
        self.record_claim(node).await?;
        Ok(Claim {
            _file: Some(file),
            task: None,
        })
    }

    async fn claim_postgres(&self, node: &str) -> Result<Claim, ClaimError> {
        let url = self.url.clone();
        let mut conn = AnyConnection::connect(&url).await.map_err(db)?;
        if !try_lock(&mut conn).await? {
            return Err(self.holder().await);
        }
        self.record_claim(node).await?;
        let store = self.clone();
        let node = node.to_owned();
        let task = tokio::spawn(async move { store.keep_claim(conn, &url, &node).await });
        Ok(Claim {
            _file: None,
            task: Some(task),
        })
    }

    /// Holds the locked connection; if it is lost, takes the lock again on a new one.
    async fn keep_claim(&self, mut conn: AnyConnection, url: &str, node: &str) {
        loop {
            tokio::time::sleep(RECHECK).await;
            if sqlx::query("SELECT 1").execute(&mut conn).await.is_ok() {
                continue;
            }
            tracing::warn!("the store's claim connection was lost; taking the claim again");
            loop {
                tokio::time::sleep(RECHECK).await;
                let Ok(mut fresh) = AnyConnection::connect(url).await else {
                    continue;
                };
                match try_lock(&mut fresh).await {
                    Ok(true) => {
                        let _ = self.record_claim(node).await;
                        conn = fresh;
                        break;
                    }
                    Ok(false) => tracing::error!(
                        "another node claimed this store while our claim was lost; its numbers \
                         are protected by their fencing tokens, but this node should stop"
                    ),
                    Err(e) => tracing::debug!(error = %e, "taking the claim again"),
                }
            }
        }
    }

    async fn record_claim(&self, node: &str) -> Result<(), StoreError> {
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map_or_else(|| "an unknown host".to_owned(), |h| h.trim().to_owned());
        sqlx::query(
            "INSERT INTO node_claims (id, node, host, pid, claimed_at) VALUES (1, $1, $2, $3, $4) \
             ON CONFLICT (id) DO UPDATE SET node = excluded.node, host = excluded.host, \
             pid = excluded.pid, claimed_at = excluded.claimed_at",
        )
        .bind(node)
        .bind(host)
        .bind(i64::from(std::process::id()))
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    /// The error naming the node that holds the claim.
    async fn holder(&self) -> ClaimError {
        let row = sqlx::query("SELECT node, host, pid, claimed_at FROM node_claims WHERE id = 1")
            .fetch_optional(&self.pool)
            .await
            .map_err(db);
        match row {
            Ok(Some(r)) => ClaimError::Held {
                node: r.try_get("node").unwrap_or_default(),
                host: r.try_get("host").unwrap_or_default(),
                pid: r.try_get("pid").unwrap_or_default(),
                since_ms: r.try_get("claimed_at").unwrap_or_default(),
            },
            Ok(None) => ClaimError::Held {
                node: "(starting)".to_owned(),
                host: "(unknown)".to_owned(),
                pid: 0,
                since_ms: 0,
            },
            Err(e) => ClaimError::Store(e),
        }
    }

    fn url_path(&self) -> Option<PathBuf> {
        sqlite_path(&self.url).map(PathBuf::from)
    }
}

async fn try_lock(conn: &mut AnyConnection) -> Result<bool, StoreError> {
    let row = sqlx::query("SELECT pg_try_advisory_lock($1)")
        .bind(LOCK_KEY)
        .fetch_one(&mut *conn)
        .await
        .map_err(db)?;
    row.try_get::<bool, _>(0).map_err(db)
}
