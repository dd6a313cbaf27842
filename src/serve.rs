//! `switchboard serve`: the runtime on the configured store and transport.
//!
//! Embedded defaults: SQLite under `./data/`, the in-process coordinator (fencing tokens from the
//! store), the `sim` transport. It runs every number registered in the store (`switchboard
//! numbers add`); their sessions, inbound log, outbox and conversation checkpoints survive a
//! restart of the process, so a restarted node resumes exactly where the last one stopped.
//!
//! It claims the store first: a second node on the same store exits with an error naming the
//! node that runs it (one node per store until the cluster brings leases).
//!
//! `/readyz` answers 200 once every number is started and while the store is up; 503 while the
//! node starts, stops, or waits out a store outage.
//!
//! Shutdown (on the trigger passed in): readiness turns 503, the fleet stops its numbers within a
//! deadline (sessions closed, queued writes committed), then the store's batcher and pool close.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use rand::Rng;
use secrecy::ExposeSecret;
use switchboard_actors::fleet::FleetMsg;
use switchboard_actors::number::NumberMsg;
use switchboard_actors::responder::Responder;
use switchboard_actors::store::{Health, Store};
use switchboard_actors::transport::WaConnector;
use switchboard_actors::{Addr, Deps, Fleet, FleetCounters, PhoneNumber};
use tokio_util::sync::CancellationToken;

use crate::bot::{CannedModel, ChaosResponder, KeywordBot};
use crate::config::{ChaosConfig, Config, StoreConfig, TransportConfig};
use crate::sim::{Dialer, SimConnector};
use crate::store::{Dialect, SessionCipher, SqlStore, StoreOptions};
use crate::whatsapp::WhatsAppConnector;

/// How long numbers get to stop on shutdown.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);

/// Runs the node until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let ready = Arc::new(AtomicBool::new(false));
    let stop = CancellationToken::new();
    let store = open_store(&config.store).await?;
    // One node per store: a second one stops here, naming the first.
    let claim = store.claim(&config.node_id).await?;
    let server = serve_http(&config, ready.clone(), store.health(), stop.clone()).await?;

    let numbers = store.numbers().await.context("listing numbers")?;
    if numbers.is_empty() {
        tracing::warn!("no numbers registered; add some with `switchboard numbers add`");
    }
    let (store_port, coordinator) = store.ports();
    let responder: Arc<dyn Responder> = if config.chaos.panic_every > 0 {
        Arc::new(ChaosResponder::new(KeywordBot, config.chaos.panic_every))
    } else {
        Arc::new(KeywordBot)
    };
    let connector = connector(&config.transport, &store);
    let deps = Deps {
        connector,
        responder,
        ai: Arc::new(CannedModel),
        store: store_port,
        coordinator,
        settings: config.runtime.clone(),
        counters: Arc::new(FleetCounters::default()),
    };
    let fleet = Fleet::start(deps).await.context("starting the fleet")?;
    for n in &numbers {
        fleet.add(n.number.clone())?;
    }
    let list: Vec<PhoneNumber> = numbers.into_iter().map(|n| n.number).collect();
    tracing::info!(
        numbers = list.len(),
        store = store.dialect().as_str(),
        "serving"
    );
    if !config.chaos.crash_number_every.is_zero() {
        let addr = fleet.addr().clone();
        tokio::spawn(crash_numbers(addr, list, config.chaos, stop.clone()));
    }
    let retention = store.spawn_retention(
        config.store.retention,
        config.store.prune_every,
        stop.clone(),
    );
    ready.store(true, Ordering::Relaxed);

    shutdown.await;
    tracing::info!("shutting down");
    ready.store(false, Ordering::Relaxed);
    stop.cancel();
    fleet.shutdown(SHUTDOWN_DEADLINE).await;
    let _ = retention.await;
    drop(claim);
    store.close().await;
    server.await??;
    Ok(())
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

async fn serve_http(
    config: &Config,
    ready: Arc<AtomicBool>,
    store: Health,
    stop: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<std::io::Result<()>>> {
    let metrics = crate::telemetry::prometheus();
    let listener = tokio::net::TcpListener::bind(config.http_listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.http_listen))?;
    let app = Router::new()
        .route(
            "/metrics",
            get(move || std::future::ready(metrics.render())),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                // Not ready while starting, stopping, or while the store is down.
                let status = if ready.load(Ordering::Relaxed) && store.is_up() {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                std::future::ready(status)
            }),
        );
    Ok(tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
    }))
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
