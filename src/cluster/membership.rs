//! Membership on Redis: node heartbeats, lease owners, release notices, drain requests.
//!
//! Keys under the cluster's prefix:
//! - `members`: the set of node ids seen;
//! - `node:<id>`: the node's announcement (JSON: capacity, state, version), expiring one TTL
//!   after its last heartbeat: a node whose key is gone is dead, and leaves `members` at the next
//!   heartbeat of any node;
//! - `drain:<id>`: set by `switchboard cluster drain`; the node drains when its heartbeat sees
//!   it, and clears it when it starts again;
//! - channel `released`: every lease release publishes the number (see the release script), so
//!   the node that should own it takes it at once instead of at its next pass.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use fred::clients::SubscriberClient;
use fred::prelude::*;
use fred::types::scripts::Script;
use serde::{Deserialize, Serialize};
use switchboard_actors::PhoneNumber;
use switchboard_actors::coordinator::{
    ClusterView, CoordinatorError, Membership, NodeAnnouncement,
};
use switchboard_actors::placement::NodeView;
use tokio::sync::Notify;

use super::Keys;

const HEARTBEAT: &str = r#"
-- KEYS: members, node:<me>, drain:<me>. ARGV: id, announcement, ttl_ms, node key prefix.
if ARGV[2] ~= '' then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
  redis.call('SADD', KEYS[1], ARGV[1])
end
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local v = redis.call('GET', ARGV[4] .. id)
  if v then out[#out + 1] = v else redis.call('SREM', KEYS[1], id) end
end
return {redis.call('EXISTS', KEYS[3]), out}
"#;

/// Lease keys read per `MGET`.
const OWNERS_CHUNK: usize = 500;

/// A node's announcement as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    /// Node id.
    pub id: String,
    /// Placement weight.
    pub capacity: u32,
    /// `active` or `draining`.
    pub state: String,
    /// Version of the binary.
    pub version: String,
}

/// Membership of one node on Redis.
pub struct RedisMembership {
    client: Client,
    keys: Keys,
    ttl: Duration,
    heartbeat: Script,
    released: Arc<Notify>,
}

impl RedisMembership {
    /// Membership on `client` with announcements alive for `ttl`. `subscriber`, a client of its
    /// own, listens for releases (none: the node only reconciles on its period).
    pub fn new(
        client: Client,
        keys: Keys,
        ttl: Duration,
        subscriber: Option<SubscriberClient>,
    ) -> Self {
        let released = Arc::new(Notify::new());
        if let Some(sub) = subscriber {
            let notify = released.clone();
            let channel = keys.released();
            tokio::spawn(async move {
                let mut messages = sub.message_rx();
                // Re-subscribed by fred after every reconnect.
                let _resubscriber = sub.manage_subscriptions();
                if let Err(e) = sub.subscribe(channel).await {
                    tracing::warn!(error = %e, "cannot subscribe to lease releases");
                }
                while messages.recv().await.is_ok() {
                    notify.notify_one();
                }
            });
        }
        Self {
            client,
            keys,
            ttl,
            heartbeat: Script::from_lua(HEARTBEAT),
            released,
        }
    }

    /// The live nodes, without announcing this one (for `switchboard cluster status`).
    pub async fn members(&self) -> Result<Vec<Announcement>, Error> {
        let (_, nodes) = self.call_heartbeat("", "").await?;
        Ok(nodes)
    }

    /// Asks node `id` to drain.
    pub async fn request_drain(&self, id: &str) -> Result<(), Error> {
        self.client
            .set(self.keys.drain(id), "1", None, None, false)
            .await
    }

    /// Clears a drain request for `id` (a node starting again serves).
    pub async fn clear_drain(&self, id: &str) -> Result<(), Error> {
        let _: i64 = self.client.del(self.keys.drain(id)).await?;
        Ok(())
    }

    /// The node holding each number's lease.
    pub async fn lease_owners(
        &self,
        numbers: &[PhoneNumber],
    ) -> Result<Vec<Option<String>>, Error> {
        let mut out = Vec::with_capacity(numbers.len());
        for chunk in numbers.chunks(OWNERS_CHUNK) {
            let keys: Vec<String> = chunk.iter().map(|n| self.keys.lease(n)).collect();
            let values: Vec<Option<String>> = if keys.len() == 1 {
                vec![self.client.get(keys[0].clone()).await?]
            } else {
                self.client.mget(keys).await?
            };
            out.extend(
                values
                    .into_iter()
                    .map(|v| v.map(|held| node_of(&held).to_owned())),
            );
        }
        Ok(out)
    }

    async fn call_heartbeat(
        &self,
        id: &str,
        announcement: &str,
    ) -> Result<(bool, Vec<Announcement>), Error> {
        let keys = vec![self.keys.members(), self.keys.node(id), self.keys.drain(id)];
        let args = vec![
            id.to_owned(),
            announcement.to_owned(),
            self.ttl.as_millis().max(1).to_string(),
            self.keys.node(""),
        ];
        let (drain, nodes): (i64, Vec<String>) = self
            .heartbeat
            .evalsha_with_reload(&self.client, keys, args)
            .await?;
        let nodes = nodes
            .iter()
            .filter_map(|v| serde_json::from_str(v).ok())
            .collect();
        Ok((drain == 1, nodes))
    }
}

/// The node id of a lease value `<node>#<incarnation>|<token>`.
pub fn node_of(held: &str) -> &str {
    held.split(['#', '|']).next().unwrap_or_default()
}

#[async_trait]
impl Membership for RedisMembership {
    async fn heartbeat(&self, me: &NodeAnnouncement) -> Result<ClusterView, CoordinatorError> {
        let announcement = Announcement {
            id: me.id.clone(),
            capacity: me.capacity,
            state: if me.draining { "draining" } else { "active" }.to_owned(),
            version: me.version.clone(),
        };
        let json = serde_json::to_string(&announcement)
            .map_err(|e| CoordinatorError::Unavailable(e.to_string()))?;
        let (drain_requested, nodes) = self
            .call_heartbeat(&me.id, &json)
            .await
            .map_err(|e| CoordinatorError::Unavailable(e.to_string()))?;
        Ok(ClusterView {
            nodes: nodes
                .into_iter()
                .map(|a| NodeView {
                    active: a.state == "active",
                    id: a.id,
                    capacity: a.capacity,
                })
                .collect(),
            drain_requested,
        })
    }

    async fn owners(
        &self,
        numbers: &[PhoneNumber],
    ) -> Result<Vec<Option<String>>, CoordinatorError> {
        self.lease_owners(numbers)
            .await
            .map_err(|e| CoordinatorError::Unavailable(e.to_string()))
    }

    async fn released(&self) {
        self.released.notified().await;
    }
}
