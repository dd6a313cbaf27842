//! The cluster on Redis (fred): leases with fencing tokens, so that each number is owned by
//! exactly one node.
//!
//! - `lease`: [`RedisLeases`], the [`Coordinator`](switchboard_actors::coordinator::Coordinator)
//!   of a clustered node: the Lua scripts (acquire, renew, release), the renewal round every
//!   TTL/3 and the watchdog that revokes locally at `last renew sent + 0.9 × TTL`.
//! - `membership`: [`RedisMembership`], the
//!   [`Membership`](switchboard_actors::coordinator::Membership) the cluster agent reads:
//!   heartbeats, lease owners, release notices, drain requests.
//! - `commands`: [`CommandBus`], operator commands (restart, logout) to the node that owns the
//!   number, on Redis Streams, and the loop by which each node serves its own.
//!
//! Every key lives under `{<prefix>}:` (one hash slot, so each script's keys are in one slot on
//! a Redis Cluster too); each test gives itself a prefix of its own. Lease traffic has a client
//! of its own, with a command timeout: a renewal never waits longer than a third of a TTL.

pub mod commands;
pub mod lease;
pub mod membership;

use std::time::Duration;

use fred::clients::SubscriberClient;
use fred::prelude::*;
use switchboard_actors::PhoneNumber;

pub use commands::CommandBus;
pub use lease::{AdmissionRates, RedisLeases, TokenFloor};
pub use membership::{Announcement, RedisMembership};

/// Metric names of the cluster.
pub mod metrics {
    /// Gauge: leases this node holds.
    pub const LEASES_HELD: &str = "switchboard_leases_held";
    /// Counter: leases acquired.
    pub const LEASES_ACQUIRED: &str = "switchboard_leases_acquired_total";
    /// Histogram: seconds one renewal call took.
    pub const RENEW_SECONDS: &str = "switchboard_lease_renew_seconds";
    /// Histogram: seconds from a lease running out (its owner died or was cut off) to this
    /// node taking the number.
    pub const FAILOVER_SECONDS: &str = "switchboard_lease_failover_seconds";

    /// Registers the help texts.
    pub fn describe() {
        metrics::describe_gauge!(LEASES_HELD, "Leases of numbers this node holds");
        metrics::describe_counter!(LEASES_ACQUIRED, "Leases of numbers acquired");
        metrics::describe_histogram!(
            RENEW_SECONDS,
            metrics::Unit::Seconds,
            "Duration of one lease renewal call to Redis"
        );
        metrics::describe_histogram!(
            FAILOVER_SECONDS,
            metrics::Unit::Seconds,
            "Time from a lease expiring unreleased to this node acquiring the number"
        );
    }
}

/// The names of the cluster's keys under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix` (hash-tagged: every key is in one slot).
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: format!("{{{prefix}}}"),
        }
    }

    /// A number's lease.
    pub fn lease(&self, number: &PhoneNumber) -> String {
        format!("{}:lease:{number}", self.prefix)
    }

    /// The last owner of a number's lease, kept a while after the lease (see
    /// [`RedisLeases`]): when it expired, for the failover time.
    pub fn shadow(&self, number: &PhoneNumber) -> String {
        format!("{}:shadow:{number}", self.prefix)
    }

    /// A number's fencing counter.
    pub fn token(&self, number: &PhoneNumber) -> String {
        format!("{}:token:{number}", self.prefix)
    }

    /// Present while Redis holds the cluster's data.
    pub fn epoch(&self) -> String {
        format!("{}:epoch", self.prefix)
    }

    /// Set for one TTL after Redis lost its data: no lease is handed out meanwhile.
    pub fn quiet(&self) -> String {
        format!("{}:quiet", self.prefix)
    }

    /// The set of node ids seen.
    pub fn members(&self) -> String {
        format!("{}:members", self.prefix)
    }

    /// A node's announcement (`node("")` is the prefix of them all).
    pub fn node(&self, id: &str) -> String {
        format!("{}:node:{id}", self.prefix)
    }

    /// A request that node `id` drain.
    pub fn drain(&self, id: &str) -> String {
        format!("{}:drain:{id}", self.prefix)
    }

    /// The cluster's token bucket for connects.
    pub fn admission(&self) -> String {
        format!("{}:admission", self.prefix)
    }

    /// The channel lease releases are published on.
    pub fn released(&self) -> String {
        format!("{}:released", self.prefix)
    }

    /// The stream of commands for the numbers node `id` runs.
    pub fn commands(&self, id: &str) -> String {
        format!("{}:commands:{id}", self.prefix)
    }

    /// The reply to command `id`.
    pub fn reply(&self, id: &str) -> String {
        format!("{}:reply:{id}", self.prefix)
    }
}

/// A Redis client for `url`: commands time out after `timeout`, and it reconnects by itself
/// forever (a Redis outage is waited out, never fatal). It connects in the background: commands
/// sent while Redis is unreachable fail after `timeout`.
pub fn client(url: &str, timeout: Duration) -> Result<Client, Error> {
    let client = builder(url, timeout)?.build()?;
    client.connect();
    Ok(client)
}

/// A client for pub/sub on `url`, reconnecting like [`client`].
pub fn subscriber(url: &str, timeout: Duration) -> Result<SubscriberClient, Error> {
    let client = builder(url, timeout)?.build_subscriber_client()?;
    client.connect();
    Ok(client)
}

fn builder(url: &str, timeout: Duration) -> Result<Builder, Error> {
    let config = Config::from_url(url)?;
    let mut builder = Builder::from_config(config);
    builder
        .with_performance_config(|p| {
            p.default_command_timeout = timeout;
        })
        .with_connection_config(|c| {
            c.connection_timeout = timeout;
            c.internal_command_timeout = timeout;
            // A command is not retried past its timeout by reconnects.
            c.max_command_attempts = 2;
        })
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2));
    Ok(builder)
}

/// `switchboard cluster status`: the live nodes (state, capacity, version) and how many of
/// `numbers` each holds, as text.
pub async fn status(
    cluster: &crate::config::ClusterConfig,
    numbers: &[PhoneNumber],
) -> anyhow::Result<String> {
    use std::fmt::Write as _;
    let membership = admin(cluster).await?;
    let nodes = membership.members().await?;
    let owners = membership.lease_owners(numbers).await?;
    let mut held: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for owner in owners.iter().flatten() {
        *held.entry(owner.as_str()).or_default() += 1;
    }
    let mut out = String::new();
    writeln!(
        out,
        "{:<24} {:<9} {:>8} {:>8}  version",
        "node", "state", "capacity", "numbers"
    )?;
    let mut nodes = nodes;
    nodes.sort_by(|a, b| a.id.cmp(&b.id));
    for n in &nodes {
        let count = held.get(n.id.as_str()).copied().unwrap_or(0);
        writeln!(
            out,
            "{:<24} {:<9} {:>8} {:>8}  {}",
            n.id, n.state, n.capacity, count, n.version
        )?;
    }
    let unowned = owners.iter().filter(|o| o.is_none()).count();
    writeln!(
        out,
        "{} numbers, {unowned} not owned by any node",
        numbers.len()
    )?;
    Ok(out)
}

/// `switchboard cluster drain NODE`: asks the node to give its numbers away.
pub async fn request_drain(
    cluster: &crate::config::ClusterConfig,
    node: &str,
) -> anyhow::Result<()> {
    admin(cluster).await?.request_drain(node).await?;
    Ok(())
}

/// `switchboard numbers restart|logout|send NUMBER`: carries `command` out on the node that
/// owns `number`, waiting at most `timeout`; returns that node's id and what it did.
pub async fn command(
    cluster: &crate::config::ClusterConfig,
    number: &PhoneNumber,
    command: &switchboard_actors::command::NumberCommand,
    timeout: Duration,
) -> anyhow::Result<(String, switchboard_actors::command::Done)> {
    let client = connected(cluster).await?;
    let bus = CommandBus::new(client, Keys::new(&cluster.key_prefix));
    Ok(bus.send(number, command, timeout).await?)
}

/// Membership for a command-line tool: connected now, or an error.
async fn admin(cluster: &crate::config::ClusterConfig) -> anyhow::Result<RedisMembership> {
    let client = connected(cluster).await?;
    Ok(RedisMembership::new(
        client,
        Keys::new(&cluster.key_prefix),
        cluster.lease_ttl,
        None,
    ))
}

/// A client for a command-line tool: connected now, or an error.
async fn connected(cluster: &crate::config::ClusterConfig) -> anyhow::Result<Client> {
    use secrecy::ExposeSecret;
    let client = client(cluster.redis_url.expose_secret(), Duration::from_secs(5))?;
    tokio::time::timeout(Duration::from_secs(5), client.wait_for_connect())
        .await
        .map_err(|_| anyhow::anyhow!("Redis at cluster.redis_url does not answer"))??;
    Ok(client)
}
