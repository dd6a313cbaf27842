//! The node's wiring, in one place: [`App::build`] opens the store, takes the coordinator (the
//! embedded one, or leases on Redis when `cluster.redis_url` is set), starts the HTTP surface
//! and the fleet; [`App::run_until`] runs the numbers until a shutdown trigger, then stops
//! everything in order. `switchboard serve` is `App::build(config)?.run_until(signal)`; the
//! demo is the same node on the default configuration with the in-process simulator as its
//! connector ([`App::build_with`]).
//!
//! ```text
//! App
//! ├── store (SqlStore)           SQLite embedded / PostgreSQL shared by the cluster
//! ├── coordinator                embedded: LocalCoordinator + the store's claim (one node per
//! │                              store); cluster: RedisLeases (renewals, watchdog)
//! ├── node (actors: Root)        the cluster agent (heartbeat + placement reconciler) and the
//! │                              fleet (one number actor per lease held); embedded, the agent
//! │                              is the only member and runs every registered number
//! ├── commands (cluster)          operator commands for this node's numbers (Redis Streams)
//! └── http                       /metrics, /healthz, /readyz
//! ```
//!
//! Numbers added or removed in the store while the node runs are picked up by the agent's next
//! pass (every 2 s embedded, every TTL/4 in a cluster, and at once when a lease is released).
//! On shutdown a clustered node first announces that it drains, then stops its numbers, whose
//! leases are released and published: their next owners take them at once.
//!
//! `/readyz` answers 200 once the numbers are started and while the store is up; 503 while the
//! node starts, stops, or waits out a store outage.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use rand::Rng;
use secrecy::ExposeSecret;
use switchboard_actors::admission::NodeAdmission;
use switchboard_actors::coordinator::{
    Coordinator, CoordinatorError, Directory, LocalCoordinator, NodeAnnouncement, SoloMembership,
};
use switchboard_actors::fleet::FleetMsg;
use switchboard_actors::number::NumberMsg;
use switchboard_actors::placement::PlacementConfig;
use switchboard_actors::responder::Responder;
use switchboard_actors::root::{AgentSpec, Node};
use switchboard_actors::store::{Store, StoreError};
use switchboard_actors::transport::WaConnector;
use switchboard_actors::{Addr, Deps, Fleet, FleetCounters, PhoneNumber};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::bot::{CannedModel, ChaosResponder, KeywordBot};
use crate::cluster::{self, AdmissionRates, Keys, RedisLeases, RedisMembership, TokenFloor};
use crate::config::{ChaosConfig, ClusterConfig, Config, StoreConfig, TransportConfig};
use crate::sim::{Dialer, SimConnector};
use crate::store::{Claim, Dialect, SessionCipher, SqlStore, StoreOptions};
use crate::whatsapp::WhatsAppConnector;

/// How long numbers get to stop on shutdown (the embedded node; a cluster's node takes
/// `cluster.drain_deadline`).
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);

/// The part of a drain deadline kept for the last numbers handed off to settle their sends.
const SETTLE_GRACE: Duration = Duration::from_secs(3);

/// How often the embedded node's agent looks for numbers added or removed while it runs.
const EMBEDDED_RECONCILE: Duration = Duration::from_secs(2);

/// A built node, ready to run.
pub struct App {
    config: Config,
    store: SqlStore,
    node: Node,
    ownership: Ownership,
    /// Clustered: serves the operator commands the cluster sends this node.
    commands: Option<JoinHandle<()>>,
    ready: Arc<AtomicBool>,
    stop: CancellationToken,
    http: JoinHandle<std::io::Result<()>>,
}

/// Who hands out the numbers' leases.
enum Ownership {
    /// The embedded single node: the store is claimed for this node alone.
    Embedded { _claim: Claim },
    /// One node of a cluster: leases on Redis.
    Cluster {
        leases: Arc<RedisLeases>,
        renewals: JoinHandle<()>,
        stop: CancellationToken,
    },
}

/// Parts a caller puts in place of the configured ones.
#[derive(Default)]
pub struct Parts {
    /// WhatsApp: the demo's in-process simulator instead of `transport`.
    pub connector: Option<Arc<dyn WaConnector>>,
}

impl App {
    /// Wires a node from `config` (see the module doc).
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        Self::build_with(config, Parts::default()).await
    }

    /// Like [`App::build`], with `parts` in place of the configured ones.
    pub async fn build_with(config: Config, parts: Parts) -> anyhow::Result<Self> {
        let ready = Arc::new(AtomicBool::new(false));
        let stop = CancellationToken::new();
        let store = open_store(&config.store).await?;
        let (store_port, _) = store.ports();
        let rates = config.admission;
        let local: Arc<dyn Coordinator> = Arc::new(
            LocalCoordinator::new(Arc::new(store.clone()))
                .with_admission(NodeAdmission::new(rates.node_per_second, rates.node_burst)),
        );
        let node = NodeAnnouncement {
            id: config.node_id.clone(),
            capacity: config.cluster.as_ref().map_or(1, |c| c.capacity),
            draining: false,
            version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        let directory = Arc::new(StoreDirectory(store.clone()));
        let (ownership, coordinator, spec): (Ownership, Arc<dyn Coordinator>, AgentSpec) =
            match &config.cluster {
                None => {
                    // One node per store: a second one stops here, naming the first.
                    let claim = store.claim(&config.node_id).await?;
                    let spec = AgentSpec {
                        node,
                        membership: Arc::new(SoloMembership),
                        directory,
                        every: EMBEDDED_RECONCILE,
                        placement: PlacementConfig::default(),
                        forget_lost: false,
                    };
                    (Ownership::Embedded { _claim: claim }, local, spec)
                }
                Some(cluster) => {
                    let leases = leases(cluster, &config.node_id, &store, rates)?;
                    let membership = membership(cluster, &config.node_id).await?;
                    let stop = CancellationToken::new();
                    let renewals = leases.spawn(stop.clone());
                    let ownership = Ownership::Cluster {
                        leases: leases.clone(),
                        renewals,
                        stop,
                    };
                    let spec = AgentSpec {
                        node,
                        membership: Arc::new(membership),
                        directory,
                        every: cluster.lease_ttl / 4,
                        placement: cluster.placement,
                        forget_lost: true,
                    };
                    (ownership, leases, spec)
                }
            };
        let listener = bind_http(&config).await?;
        let responder: Arc<dyn Responder> = if config.chaos.panic_every > 0 {
            Arc::new(ChaosResponder::new(KeywordBot, config.chaos.panic_every))
        } else {
            Arc::new(KeywordBot)
        };
        let deps = Deps {
            connector: parts
                .connector
                .unwrap_or_else(|| connector(&config.transport, &store)),
            responder,
            ai: Arc::new(CannedModel),
            store: store_port,
            coordinator,
            settings: config.runtime.clone(),
            counters: Arc::new(FleetCounters::default()),
        };
        let node = Node::start(deps, spec).await.context("starting the node")?;
        let commands = match (&config.cluster, &ownership) {
            (Some(cluster), Ownership::Cluster { stop, .. }) => Some(serve_commands(
                cluster,
                &config.node_id,
                node.fleet(),
                stop.clone(),
            )?),
            _ => None,
        };
        let bus = match &config.cluster {
            Some(cluster) => Some(cluster::CommandBus::new(
                redis_client(cluster)?,
                Keys::new(&cluster.key_prefix),
            )),
            None => None,
        };
        let membership = match &config.cluster {
            Some(cluster) => Some(RedisMembership::new(
                redis_client(cluster)?,
                Keys::new(&cluster.key_prefix),
                cluster.lease_ttl,
                None,
            )),
            None => None,
        };
        let api = crate::http::ApiParts {
            store: store.clone(),
            fleet: node.fleet().commands(),
            bus,
            membership,
            reconcile: node.reconciler(),
            admin_token: config.admin_token.clone(),
            node_id: config.node_id.clone(),
            ready: ready.clone(),
            store_health: store.health(),
            metrics: crate::telemetry::prometheus(),
            edges: config.api.clone(),
        };
        let http = serve_http(listener, api, stop.clone());
        Ok(Self {
            commands,
            config,
            store,
            node,
            ownership,
            ready,
            stop,
            http,
        })
    }

    /// The fleet.
    pub fn fleet(&self) -> &Fleet {
        self.node.fleet()
    }

    /// The store.
    pub fn store(&self) -> &SqlStore {
        &self.store
    }

    /// Runs the node until `shutdown` resolves, then stops it: readiness turns 503, the fleet
    /// stops its numbers within a deadline (sessions closed, queued writes committed, leases
    /// released), then the store's batcher and pool close.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let numbers = self.store.numbers().await.context("listing numbers")?;
        if numbers.is_empty() {
            tracing::warn!("no numbers registered; add some with `switchboard numbers add`");
        }
        let list: Vec<PhoneNumber> = numbers.into_iter().map(|n| n.number).collect();
        tracing::info!(
            numbers = list.len(),
            store = self.store.dialect().as_str(),
            clustered = self.config.cluster.is_some(),
            "serving"
        );
        if !self.config.chaos.crash_number_every.is_zero() {
            let addr = self.fleet().addr().clone();
            tokio::spawn(crash_numbers(
                addr,
                list,
                self.config.chaos,
                self.stop.clone(),
            ));
        }
        let retention = self.store.spawn_retention(
            self.config.store.retention,
            self.config.store.prune_every,
            self.stop.clone(),
        );
        self.ready.store(true, Ordering::Relaxed);

        shutdown.await;
        tracing::info!("shutting down");
        self.ready.store(false, Ordering::Relaxed);
        let deadline = self
            .config
            .cluster
            .as_ref()
            .map_or(SHUTDOWN_DEADLINE, |c| c.drain_deadline);
        let until = tokio::time::Instant::now() + deadline;
        if let Ownership::Cluster { leases, .. } = &self.ownership {
            // The cluster learns first that this node drains, so that nobody hands it a number
            // while it gives its own away, in waves the other nodes can admit.
            let started = tokio::time::Instant::now();
            if let Err(e) = self.node.drain(until - SETTLE_GRACE).await {
                tracing::warn!(error = %e, "the agent did not take the drain");
            }
            tracing::info!(took = ?started.elapsed(), "numbers handed off");
            leases.stop_acquiring();
        }
        self.stop.cancel();
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        self.node.shutdown(left.max(SETTLE_GRACE)).await;
        if let Ownership::Cluster { renewals, stop, .. } = self.ownership {
            stop.cancel();
            let _ = renewals.await;
        }
        if let Some(commands) = self.commands {
            let _ = commands.await;
        }
        let _ = retention.await;
        self.store.close().await;
        self.http.await??;
        Ok(())
    }
}

/// The Redis leases of this node: a client of their own, owner = node id + incarnation.
fn leases(
    cluster: &ClusterConfig,
    node_id: &str,
    store: &SqlStore,
    rates: AdmissionRates,
) -> anyhow::Result<Arc<RedisLeases>> {
    let client = redis_client(cluster)?;
    let incarnation: u64 = rand::rng().random();
    let owner = format!("{node_id}#{incarnation:016x}");
    tracing::info!(%owner, ttl = ?cluster.lease_ttl, "joining the cluster");
    Ok(RedisLeases::new(
        client,
        Keys::new(&cluster.key_prefix),
        owner,
        cluster.lease_ttl,
        Arc::new(StoreFloor(store.clone())),
        rates,
    ))
}

/// Serves the operator commands the cluster sends this node, through `fleet`, until `stop`.
fn serve_commands(
    cluster: &ClusterConfig,
    node_id: &str,
    fleet: &Fleet,
    stop: CancellationToken,
) -> anyhow::Result<JoinHandle<()>> {
    let (reader, writer) = (redis_client(cluster)?, redis_client(cluster)?);
    let commands = fleet.commands();
    Ok(cluster::commands::serve(
        reader,
        writer,
        Keys::new(&cluster.key_prefix),
        node_id.to_owned(),
        move |number, command| {
            let commands = commands.clone();
            async move { commands.run(number, command).await }
        },
        stop,
    ))
}

/// The cluster's membership for this node: a client of its own, and one for release notices.
/// A drain requested for this node id before it started is cleared: it starts serving.
async fn membership(cluster: &ClusterConfig, node_id: &str) -> anyhow::Result<RedisMembership> {
    let client = redis_client(cluster)?;
    let subscriber = cluster::subscriber(cluster.redis_url.expose_secret(), cluster.lease_ttl / 3)
        .context("cluster.redis_url")?;
    let membership = RedisMembership::new(
        client,
        Keys::new(&cluster.key_prefix),
        cluster.lease_ttl,
        Some(subscriber),
    );
    if let Err(e) = membership.clear_drain(node_id).await {
        tracing::warn!(error = %e, "could not clear an old drain request (Redis unreachable?)");
    }
    Ok(membership)
}

/// A Redis client of its own for one part of a node (leases, membership, the command bus's
/// reader and writer): a command waits at most a third of the lease TTL.
fn redis_client(cluster: &ClusterConfig) -> anyhow::Result<fred::prelude::Client> {
    cluster::client(cluster.redis_url.expose_secret(), cluster.lease_ttl / 3)
        .context("cluster.redis_url")
}

/// The registered numbers and their pins, from the store.
struct StoreDirectory(SqlStore);

#[async_trait]
impl Directory for StoreDirectory {
    async fn numbers(&self) -> Result<Vec<(PhoneNumber, Option<String>)>, StoreError> {
        let numbers = self.0.numbers().await?;
        Ok(numbers
            .into_iter()
            .map(|n| (n.number, n.pinned_node))
            .collect())
    }
}

/// Tokens above the store's highest: what the store has seen bounds what Redis may issue.
struct StoreFloor(SqlStore);

#[async_trait]
impl TokenFloor for StoreFloor {
    async fn floor(&self, number: &PhoneNumber) -> Result<u64, CoordinatorError> {
        Ok(self.0.highest_token(number).await?.unwrap_or(0))
    }
}

/// The configured transport's connector; whatsapp-rust keeps its protocol state in `store`.
pub fn connector(transport: &TransportConfig, store: &SqlStore) -> Arc<dyn WaConnector> {
    match transport {
        TransportConfig::Sim { url } => {
            let addr = url
                .trim_start_matches("http://")
                .trim_start_matches("ws://")
                .to_owned();
            Arc::new(SimConnector::new(Dialer::Remote(addr)))
        }
        TransportConfig::WhatsApp(options) => {
            Arc::new(WhatsAppConnector::new(store.clone(), options.clone()))
        }
    }
}

/// Opens the configured store, with the session keys from the config or the embedded key file.
pub async fn open_store(config: &StoreConfig) -> anyhow::Result<SqlStore> {
    let keys = config.session_keys.expose_secret();
    let keys = if keys.trim().is_empty() {
        anyhow::ensure!(
            config.dialect == Dialect::Sqlite,
            "store.session_keys is required with PostgreSQL"
        );
        key_file(Path::new(&config.session_key_file))?
    } else {
        keys.to_owned()
    };
    let cipher = SessionCipher::parse(&keys).context("store.session_keys")?;
    SqlStore::connect(StoreOptions {
        url: config.url.expose_secret().to_owned(),
        max_connections: config.max_connections,
        batch_max: config.batch_max,
        batch_wait: config.batch_wait,
        cipher: Arc::new(cipher),
    })
    .await
    .context("opening the store")
}

/// Reads the embedded session key, creating it (readable by the owner only) on first start.
fn key_file(path: &Path) -> anyhow::Result<String> {
    if path.exists() {
        return std::fs::read_to_string(path)
            .map(|s| s.trim().to_owned())
            .with_context(|| format!("reading {}", path.display()));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let key = SessionCipher::generate("local-1");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    std::io::Write::write_all(&mut file, key.as_bytes())?;
    tracing::warn!(path = %path.display(), "created a session key; back it up with the database");
    Ok(key)
}

/// Binds the HTTP listener first thing, so that a taken port fails the start at once.
async fn bind_http(config: &Config) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(config.http_listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.http_listen))
}

/// Serves the admin API, health and metrics ([`crate::http`]) on `listener` until `stop`.
fn serve_http(
    listener: tokio::net::TcpListener,
    parts: crate::http::ApiParts,
    stop: CancellationToken,
) -> JoinHandle<std::io::Result<()>> {
    let app = crate::http::router(parts);
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
    })
}

/// Chaos: crash a random number actor every `crash_number_every`.
async fn crash_numbers(
    fleet: Addr<FleetMsg>,
    numbers: Vec<PhoneNumber>,
    chaos: ChaosConfig,
    stop: CancellationToken,
) {
    if numbers.is_empty() {
        return;
    }
    let mut tick = tokio::time::interval(chaos.crash_number_every);
    tick.tick().await;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let victim = numbers[rand::rng().random_range(0..numbers.len())].clone();
        crash_number(&fleet, victim).await;
    }
}

/// Chaos: makes the actor of `number` fail, as a bug would.
pub async fn crash_number(fleet: &Addr<FleetMsg>, number: PhoneNumber) {
    let get = fleet
        .call(|r| FleetMsg::Get(number, r), Duration::from_secs(5))
        .await;
    if let Ok(Some(actor)) = get {
        let _ = actor.cast(NumberMsg::Crash("chaos: injected number crash".to_owned()));
    }
}
