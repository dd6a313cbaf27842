//! Whether the database is up: every outage the store meets marks it down and starts one probe,
//! which writes a row of its own every [`PROBE_EVERY`] until a write succeeds; any write that
//! succeeds marks it up. Reads only ever mark it down: a database that answers reads may still
//! refuse writes (read-only, locked, disk full).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::AnyPool;
use switchboard_actors::store::{Health, StoreError};

use super::{db, now_ms};

/// How often the probe tries a write while the store is down.
pub const PROBE_EVERY: Duration = Duration::from_millis(500);

/// The store's health and its probe. Cheap to clone.
#[derive(Clone)]
pub(super) struct Watch {
    health: Health,
    pool: AnyPool,
    probing: Arc<AtomicBool>,
}

impl Watch {
    pub(super) fn new(pool: AnyPool) -> Self {
        Self {
            health: Health::new(),
            pool,
            probing: Arc::new(AtomicBool::new(false)),
        }
    }

    pub(super) fn health(&self) -> Health {
        self.health.clone()
    }

    /// Takes in the result of a write: success means the store is up, an outage that it is down.
    pub(super) fn wrote<T>(&self, result: &Result<T, StoreError>) {
        match result {
            Ok(_) => {
                self.health.set(true);
            }
            Err(e) => self.failed(e),
        }
    }

    /// Takes in a failure of a read or a write.
    pub(super) fn failed(&self, e: &StoreError) {
        if !e.is_retryable() {
            return;
        }
        self.health.set(false);
        if !self.probing.swap(true, Ordering::AcqRel) {
            tokio::spawn(self.clone().probe());
        }
    }

    /// Runs a write and takes in its result.
    pub(super) async fn write<T>(
        &self,
        write: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let result = write.await;
        self.wrote(&result);
        result
    }

    /// Runs a read and takes in its failure, if any.
    pub(super) async fn read<T>(
        &self,
        read: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let result = read.await;
        if let Err(e) = &result {
            self.failed(e);
        }
        result
    }

    /// Writes the probe row until a write succeeds (or another write has marked the store up).
    async fn probe(self) {
        loop {
            while !self.health.is_up() && !self.pool.is_closed() {
                tokio::time::sleep(PROBE_EVERY).await;
                let probed = sqlx::query("UPDATE store_probe SET probed_at = $1 WHERE id = 1")
                    .bind(now_ms())
                    .execute(&self.pool)
                    .await
                    .map_err(db);
                match probed {
                    Ok(_) => {
                        self.health.set(true);
                    }
                    Err(e) => tracing::debug!(error = %e, "store probe"),
                }
            }
            self.probing.store(false, Ordering::Release);
            // An outage may have begun since the last look; then this probe goes on.
            if self.health.is_up() || self.probing.swap(true, Ordering::AcqRel) {
                return;
            }
        }
    }
}
