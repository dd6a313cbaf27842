//! `switchboard demo`: a simulated fleet on the embedded defaults.
//!
//! It starts the in-process simulator with N unpaired accounts, a fleet of N numbers whose
//! simulated phones scan the QR codes, and scripted contacts chatting with the keyword/echo bot.
//! The fleet runs on the embedded store (SQLite, in a scratch directory removed afterwards), so
//! every message takes the durable path of `switchboard serve`.
//! It prints a progress line every second, serves `/metrics` and `/healthz`, and ends with one
//! JSON line. With `--chaos` it makes conversations panic, drops connections and crashes number
//! actors while it runs, and still expects every number online at the end.

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::routing::get;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use switchboard_actors::responder::Responder;
use switchboard_actors::{Deps, Fleet, FleetCounters, NumberPhase, PhoneNumber, Settings};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::bot::{CannedModel, ChaosResponder, KeywordBot};
use crate::sim::ledger::Summary;
use crate::sim::{Dialer, Fault, FaultKind, Network, SimConfig, SimConnector, TrafficSpec};
use crate::store::{NumberRecord, SessionCipher, SqlStore, StoreOptions, TenantRecord};

/// What to run.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// How many numbers.
    pub numbers: usize,
    /// How long the traffic runs.
    pub duration: Duration,
    /// Inject faults while running.
    pub chaos: bool,
    /// Where `/metrics` and `/healthz` are served.
    pub listen: SocketAddr,
    /// Seed of the simulator and the traffic.
    pub seed: u64,
    /// Inbound messages per second per number.
    pub rate_per_number: f64,
    /// Print the live progress line to stderr.
    pub progress: bool,
}

/// The final JSON line.
#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    /// Numbers in the fleet.
    pub numbers: usize,
    /// Numbers online at the end.
    pub numbers_online: i64,
    /// Inbound messages received by the fleet.
    pub messages_in: u64,
    /// Replies acknowledged by the network.
    pub messages_out: u64,
    /// Actor restarts performed.
    pub restarts: u64,
    /// Numbers parked `failed`.
    pub failed: i64,
    /// Messages dead-lettered.
    pub dead_letters: u64,
    /// Seconds the traffic ran.
    pub duration_s: f64,
    /// The simulator's referee totals.
    pub ledger: Summary,
}

/// How long the end of the demo waits for reconnects and in-flight replies.
const SETTLE: Duration = Duration::from_secs(20);

/// Runs the demo until its duration passes or `shutdown` resolves.
pub async fn run(
    opts: DemoOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<DemoReport> {
    let metrics = crate::telemetry::prometheus();
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("cannot listen on {}", opts.listen))?;
    let stop = CancellationToken::new();
    let app = Router::new()
        .route(
            "/metrics",
            get(move || std::future::ready(metrics.render())),
        )
        .route("/healthz", get(|| async { "ok" }));
    let server_stop = stop.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(server_stop.cancelled_owned())
            .await
    });

    let network = Network::new(SimConfig {
        seed: opts.seed,
        ..SimConfig::default()
    });
    let numbers: Vec<PhoneNumber> = (1..=opts.numbers)
        .map(|i| PhoneNumber::parse(&format!("+1555{i:07}")))
        .collect::<Result<_, _>>()?;
    for n in &numbers {
        network.create_account(n);
    }
    tokio::spawn(phones(network.clone(), stop.clone()));

    let responder: Arc<dyn Responder> = if opts.chaos {
        Arc::new(ChaosResponder::new(KeywordBot, 50))
    } else {
        Arc::new(KeywordBot)
    };
    let scratch = Scratch::new()?;
    let store = scratch.store(&numbers).await?;
    let (store_port, coordinator) = store.ports();
    let deps = Deps {
        connector: Arc::new(SimConnector::new(Dialer::Local(network.clone()))),
        responder,
        ai: Arc::new(CannedModel),
        store: store_port,
        coordinator,
        settings: Settings::default(),
        counters: Arc::new(FleetCounters::default()),
    };
    let fleet = Fleet::start(deps).await?;
    for n in &numbers {
        fleet.add(n.clone())?;
    }
    network.start_traffic(TrafficSpec {
        numbers: None,
        contacts_per_number: 20,
        rate_per_s: opts.rate_per_number * opts.numbers as f64,
        duration: opts.duration,
        seed: opts.seed,
    })?;
    if opts.chaos {
        tokio::spawn(chaos(
            network.clone(),
            numbers.clone(),
            fleet.addr().clone(),
            opts.seed,
            stop.clone(),
        ));
    }

    let started = Instant::now();
    tokio::select! {
        () = shutdown => {}
        () = progress(&fleet, opts.numbers, opts.duration, opts.progress) => {}
    }
    let duration_s = started.elapsed().as_secs_f64();
    network.stop_traffic();
    stop.cancel();
    settle(&fleet, opts.numbers, &network).await;
    if opts.progress {
        eprintln!();
    }

    let c = fleet.counters().clone();
    let status = fleet.status().await?;
    let report = DemoReport {
        numbers: opts.numbers,
        numbers_online: c.numbers(NumberPhase::Online),
        messages_in: c.messages_in.load(std::sync::atomic::Ordering::Relaxed),
        messages_out: c.messages_out.load(std::sync::atomic::Ordering::Relaxed),
        restarts: c.restarts.load(std::sync::atomic::Ordering::Relaxed),
        failed: i64::try_from(status.parked.len()).unwrap_or(i64::MAX),
        dead_letters: c.dead_letters.load(std::sync::atomic::Ordering::Relaxed),
        duration_s,
        ledger: network.summary(),
    };
    fleet.shutdown(Duration::from_secs(10)).await;
    store.close().await;
    server.await??;
    Ok(report)
}

/// The demo's embedded store: a SQLite file in a directory of its own, removed on drop.
struct Scratch {
    dir: std::path::PathBuf,
}

impl Scratch {
    fn new() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "switchboard-demo-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self { dir })
    }

    /// Opens the store and registers the demo's numbers.
    async fn store(&self, numbers: &[PhoneNumber]) -> anyhow::Result<SqlStore> {
        let store = SqlStore::connect(StoreOptions {
            url: format!("sqlite://{}/demo.db?mode=rwc", self.dir.display()),
            max_connections: 1,
            batch_max: 2048,
            batch_wait: Duration::from_millis(1),
            cipher: Arc::new(SessionCipher::parse(&SessionCipher::generate("demo"))?),
        })
        .await?;
        let tenant = TenantRecord {
            id: "demo".into(),
            name: "Demo".into(),
            full_transcripts: false,
        };
        store.create_tenant(&tenant).await?;
        for n in numbers {
            let record = NumberRecord {
                number: n.clone(),
                tenant: tenant.id.clone(),
                pinned_node: None,
                settings: serde_json::json!({}),
            };
            store.add_number(&record).await?;
        }
        Ok(store)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The simulated phones: scan every QR code shown, a moment after it appears.
async fn phones(network: Network, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    while !stop.is_cancelled() {
        tick.tick().await;
        for n in network.awaiting_pairing() {
            let _ = network.pair(&n, None);
        }
    }
}

/// Faults while the traffic runs: a dropped connection every 200 ms (sometimes with silent
/// connect failures for a few seconds after) and a crashed number actor every 2 s.
async fn chaos(
    network: Network,
    numbers: Vec<PhoneNumber>,
    fleet_addr: switchboard_actors::Addr<switchboard_actors::fleet::FleetMsg>,
    seed: u64,
    stop: CancellationToken,
) {
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x00c4_a05e);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut round = 0u64;
    while !stop.is_cancelled() {
        tick.tick().await;
        round += 1;
        let n = &numbers[rng.random_range(0..numbers.len())];
        let outage = if rng.random_bool(0.3) {
            Duration::from_secs(3)
        } else {
            Duration::ZERO
        };
        let _ = network.fault(n, Fault::new(FaultKind::Drop, outage));
        if round.is_multiple_of(10) {
            let victim = numbers[rng.random_range(0..numbers.len())].clone();
            crate::app::crash_number(&fleet_addr, victim).await;
        }
    }
}

/// Prints the live line every second until `duration` has passed.
async fn progress(fleet: &Fleet, numbers: usize, duration: Duration, print: bool) {
    let c = fleet.counters();
    let end = Instant::now() + duration;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let (mut last_in, mut last_out) = (0, 0);
    while Instant::now() < end {
        tick.tick().await;
        let msgs_in = c.messages_in.load(std::sync::atomic::Ordering::Relaxed);
        let msgs_out = c.messages_out.load(std::sync::atomic::Ordering::Relaxed);
        if print {
            eprint!(
                "\rnumbers online {:>6}/{numbers}  in {:>6}/s  out {:>6}/s  restarts {:>6}  failed {:>4}   ",
                c.numbers(NumberPhase::Online),
                msgs_in - last_in,
                msgs_out - last_out,
                c.restarts.load(std::sync::atomic::Ordering::Relaxed),
                c.numbers(NumberPhase::Failed),
            );
            let _ = std::io::stderr().flush();
        }
        (last_in, last_out) = (msgs_in, msgs_out);
    }
}

/// Waits (bounded) until every number is online and every inbound message has been answered.
async fn settle(fleet: &Fleet, numbers: usize, network: &Network) {
    let deadline = Instant::now() + SETTLE;
    let target = i64::try_from(numbers).unwrap_or(i64::MAX);
    while Instant::now() < deadline {
        let all_online = fleet.counters().numbers(NumberPhase::Online) == target;
        if all_online && network.summary().inbound_unanswered == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
