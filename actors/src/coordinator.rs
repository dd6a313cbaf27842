//! The coordinator port: who owns a number, under which fencing token, and until when.
//!
//! A node runs a number only while it holds the number's [`Lease`]. The lease carries the
//! [`Fence`] every write for the number carries, and it ends in exactly one way, whatever ends
//! it: [`Lease::revoke`] with a [`FenceLoss`]. The coordinator revokes it when a renewal is lost
//! or its watchdog fires; the store's refusal of a stale token, a `StreamReplaced` from WhatsApp
//! and a refused protocol write revoke it too. The number watches its lease and nothing else: on
//! revocation it closes its session and stops at once, and the fleet keeps it stopped (no
//! reconnect, no restart). Whether this node should take the number again is the placement's
//! decision, not the number's.
//!
//! Membership (who is alive, who holds which lease) is the [`Membership`] port, read by the
//! cluster agent; the registered numbers and their pins are the [`Directory`].
//!
//! Implementations: [`LocalCoordinator`] (the embedded single node: a lease never expires, its
//! token comes from the store, so tokens keep rising across restarts) and the Redis one in the
//! service (leases with a TTL, renewed every TTL/3, and a watchdog that revokes locally at
//! `last renew sent + 0.9 × TTL` without waiting for Redis).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::admission::NodeAdmission;
use crate::ids::PhoneNumber;
use crate::placement::NodeView;
use crate::store::{Fence, FencingToken, StoreError};

/// Why a lease ended without being released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FenceLoss {
    /// A renewal found the lease gone or held by another owner.
    RenewRefused,
    /// No renewal succeeded in time: the watchdog revoked it locally.
    Expired,
    /// The store refused a write: a newer owner has written.
    StoreRefused,
    /// WhatsApp replaced the stream: another connection is logged in as this number.
    StreamReplaced,
    /// The coordinator handed the number to a newer owner in this process.
    Superseded,
}

impl FenceLoss {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RenewRefused => "renew_refused",
            Self::Expired => "expired",
            Self::StoreRefused => "store_refused",
            Self::StreamReplaced => "stream_replaced",
            Self::Superseded => "superseded",
        }
    }
}

impl fmt::Display for FenceLoss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Ownership of one number by this process. Clones share it: revoking one revokes all.
#[derive(Clone)]
pub struct Lease {
    fence: Fence,
    shared: Arc<LeaseShared>,
}

struct LeaseShared {
    loss: OnceLock<FenceLoss>,
    revoked: CancellationToken,
    released: CancellationToken,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("number", &self.fence.number)
            .field("token", &self.fence.token)
            .field("loss", &self.loss())
            .finish()
    }
}

impl Lease {
    /// A live lease under `fence`.
    pub fn new(fence: Fence) -> Self {
        Self {
            fence,
            shared: Arc::new(LeaseShared {
                loss: OnceLock::new(),
                revoked: CancellationToken::new(),
                released: CancellationToken::new(),
            }),
        }
    }

    /// The fence every write under this lease carries.
    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    /// The number.
    pub fn number(&self) -> &PhoneNumber {
        &self.fence.number
    }

    /// The fencing token.
    pub fn token(&self) -> FencingToken {
        self.fence.token
    }

    /// Ends the lease for `loss`; the first revocation wins. True if this call ended it.
    pub fn revoke(&self, loss: FenceLoss) -> bool {
        if self.is_released() || self.shared.loss.set(loss).is_err() {
            return false;
        }
        self.shared.revoked.cancel();
        true
    }

    /// Why it was revoked, if it was.
    pub fn loss(&self) -> Option<FenceLoss> {
        self.shared.loss.get().copied()
    }

    /// Held: neither revoked nor released.
    pub fn is_live(&self) -> bool {
        !self.shared.revoked.is_cancelled() && !self.is_released()
    }

    /// Resolves when the lease is revoked, with the reason.
    pub async fn revoked(&self) -> FenceLoss {
        self.shared.revoked.cancelled().await;
        self.loss().unwrap_or(FenceLoss::Expired)
    }

    /// Marks the lease given up by its holder (a handoff or a stop); a later revocation is moot.
    pub fn mark_released(&self) {
        self.shared.released.cancel();
    }

    /// Given up by its holder.
    pub fn is_released(&self) -> bool {
        self.shared.released.is_cancelled()
    }
}

/// Why ownership could not be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoordinatorError {
    /// Another owner holds the number's lease.
    #[error("number {number} is held by {owner}")]
    Held {
        /// The number.
        number: PhoneNumber,
        /// Who holds it (node id and incarnation).
        owner: String,
    },
    /// The coordinator cannot be reached: an outage, not the number's fault. Try again later.
    #[error("coordinator unavailable: {0}")]
    Unavailable(String),
    /// The node is draining or stopping: it takes no new ownership.
    #[error("this node takes no new numbers (draining)")]
    Draining,
    /// The store, which keeps the highest token per number, failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl CoordinatorError {
    /// An outage of a dependency: worth waiting out, never a reason to spend a budget.
    pub fn is_outage(&self) -> bool {
        match self {
            Self::Unavailable(_) => true,
            Self::Store(e) => e.is_retryable(),
            Self::Held { .. } | Self::Draining => false,
        }
    }
}

/// Hands out ownership of numbers.
#[async_trait]
pub trait Coordinator: Send + Sync + 'static {
    /// Takes ownership of `number` for this process, with a token higher than any earlier
    /// owner's. Re-entrant: a number this process holds comes back under the same lease.
    async fn acquire(&self, number: &PhoneNumber) -> Result<Lease, CoordinatorError>;

    /// Gives up `lease` (if it is still ours) so another node may take the number at once.
    /// Best effort and idempotent: a lease that cannot be released expires.
    async fn release(&self, lease: &Lease);

    /// Waits for `number`'s turn to connect (admission control: a token bucket per node and,
    /// in a cluster, one per cluster). An error is an outage: try again.
    async fn admit(&self, number: &PhoneNumber) -> Result<(), CoordinatorError> {
        let _ = number;
        Ok(())
    }
}

/// Where the embedded coordinator takes its tokens: the store, which keeps them across restarts.
#[async_trait]
pub trait TokenSource: Send + Sync + 'static {
    /// A token for `number` higher than every one issued before.
    async fn next_token(&self, number: &PhoneNumber) -> Result<FencingToken, StoreError>;
}

/// The embedded single node's coordinator: every number is this process's, leases never expire.
pub struct LocalCoordinator {
    tokens: Arc<dyn TokenSource>,
    held: Mutex<HashMap<PhoneNumber, Lease>>,
    admission: Option<NodeAdmission>,
}

impl LocalCoordinator {
    /// A coordinator issuing tokens from `tokens`.
    pub fn new(tokens: Arc<dyn TokenSource>) -> Self {
        Self {
            tokens,
            held: Mutex::new(HashMap::new()),
            admission: None,
        }
    }

    /// Connects pass `admission` first.
    pub fn with_admission(mut self, admission: NodeAdmission) -> Self {
        self.admission = Some(admission);
        self
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<PhoneNumber, Lease>> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl Coordinator for LocalCoordinator {
    async fn acquire(&self, number: &PhoneNumber) -> Result<Lease, CoordinatorError> {
        if let Some(lease) = self.held().get(number).filter(|l| l.is_live()) {
            return Ok(lease.clone());
        }
        let token = self.tokens.next_token(number).await?;
        let lease = Lease::new(Fence {
            number: number.clone(),
            token,
        });
        if let Some(old) = self.held().insert(number.clone(), lease.clone()) {
            old.revoke(FenceLoss::Superseded);
        }
        Ok(lease)
    }

    async fn release(&self, lease: &Lease) {
        lease.mark_released();
        let mut held = self.held();
        if held
            .get(lease.number())
            .is_some_and(|l| l.token() == lease.token())
        {
            held.remove(lease.number());
        }
    }

    async fn admit(&self, _number: &PhoneNumber) -> Result<(), CoordinatorError> {
        if let Some(admission) = &self.admission {
            admission.admit().await;
        }
        Ok(())
    }
}

/// What a node announces of itself in its heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAnnouncement {
    /// The node id.
    pub id: String,
    /// Its placement weight.
    pub capacity: u32,
    /// It gives its numbers away and takes none.
    pub draining: bool,
    /// Its version.
    pub version: String,
}

/// The cluster as one heartbeat saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterView {
    /// The live nodes (this one included).
    pub nodes: Vec<NodeView>,
    /// An admin asked this node to drain.
    pub drain_requested: bool,
}

/// Membership and lease ownership as the cluster agent reads them.
#[async_trait]
pub trait Membership: Send + Sync + 'static {
    /// Announces `me` (alive for one TTL) and returns the live nodes.
    async fn heartbeat(&self, me: &NodeAnnouncement) -> Result<ClusterView, CoordinatorError>;

    /// The node holding each number's lease, in order (`None`: nobody).
    async fn owners(
        &self,
        numbers: &[PhoneNumber],
    ) -> Result<Vec<Option<String>>, CoordinatorError>;

    /// Resolves when a lease was released somewhere in the cluster: a hint to reconcile now.
    async fn released(&self);
}

/// The registered numbers and their pins, as the store holds them.
#[async_trait]
pub trait Directory: Send + Sync + 'static {
    /// Every registered number with the node it is pinned to, if any.
    async fn numbers(&self) -> Result<Vec<(PhoneNumber, Option<String>)>, StoreError>;
}

/// The embedded single node's membership: it is the cluster, and every number is its own.
pub struct SoloMembership;

#[async_trait]
impl Membership for SoloMembership {
    async fn heartbeat(&self, me: &NodeAnnouncement) -> Result<ClusterView, CoordinatorError> {
        Ok(ClusterView {
            nodes: vec![NodeView {
                id: me.id.clone(),
                capacity: me.capacity,
                active: !me.draining,
            }],
            drain_requested: false,
        })
    }

    async fn owners(
        &self,
        numbers: &[PhoneNumber],
    ) -> Result<Vec<Option<String>>, CoordinatorError> {
        Ok(vec![None; numbers.len()])
    }

    async fn released(&self) {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn number() -> PhoneNumber {
        PhoneNumber::parse("+15550001").expect("valid number")
    }

    #[tokio::test]
    async fn the_first_revocation_wins_and_a_released_lease_cannot_be_revoked() {
        let lease = Lease::new(Fence {
            number: number(),
            token: FencingToken::new(1).expect("token"),
        });
        assert!(lease.revoke(FenceLoss::StreamReplaced));
        assert!(!lease.revoke(FenceLoss::Expired));
        assert_eq!(lease.revoked().await, FenceLoss::StreamReplaced);
        assert!(!lease.is_live());

        let other = Lease::new(lease.fence().clone());
        other.mark_released();
        assert!(!other.revoke(FenceLoss::Expired));
        assert_eq!(other.loss(), None);
    }

    #[tokio::test]
    async fn the_local_coordinator_is_reentrant_and_a_new_ownership_after_release_is_higher() {
        let coordinator = LocalCoordinator::new(Arc::new(MemoryStore::default()));
        let first = coordinator.acquire(&number()).await.expect("lease");
        let again = coordinator.acquire(&number()).await.expect("lease");
        assert_eq!(first.token(), again.token());
        coordinator.release(&first).await;
        assert!(!again.is_live(), "clones share the release");
        let next = coordinator.acquire(&number()).await.expect("lease");
        assert!(next.token() > first.token());
    }
}
