//! The session-store port: where paired credentials survive restarts of a number.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::ids::PhoneNumber;
use crate::transport::Credentials;

/// Why the session store failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("session store: {0}")]
pub struct SessionStoreError(pub String);

/// Keeps each number's device credentials.
#[async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// The stored credentials of `number`, if paired.
    async fn load(&self, number: &PhoneNumber) -> Result<Option<Credentials>, SessionStoreError>;
    /// Stores new credentials after pairing.
    async fn save(
        &self,
        number: &PhoneNumber,
        creds: &Credentials,
    ) -> Result<(), SessionStoreError>;
    /// Forgets them after a logout.
    async fn clear(&self, number: &PhoneNumber) -> Result<(), SessionStoreError>;
}

/// In-memory session store: survives actor restarts, not process restarts.
#[derive(Debug, Default)]
pub struct MemorySessionStore {
    creds: Mutex<HashMap<PhoneNumber, Credentials>>,
}

impl MemorySessionStore {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<PhoneNumber, Credentials>> {
        self.creds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl SessionStore for MemorySessionStore {
    async fn load(&self, number: &PhoneNumber) -> Result<Option<Credentials>, SessionStoreError> {
        Ok(self.map().get(number).cloned())
    }
    async fn save(
        &self,
        number: &PhoneNumber,
        creds: &Credentials,
    ) -> Result<(), SessionStoreError> {
        self.map().insert(number.clone(), creds.clone());
        Ok(())
    }
    async fn clear(&self, number: &PhoneNumber) -> Result<(), SessionStoreError> {
        self.map().remove(number);
        Ok(())
    }
}
