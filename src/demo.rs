//! `switchboard demo`: a simulated fleet on the embedded defaults.
//!
//! It starts the in-process simulator with N unpaired accounts, the node of `switchboard
//! serve` ([`App`], on the embedded defaults: SQLite in a scratch directory removed afterwards)
//! running N numbers whose simulated phones scan the QR codes, and scripted contacts chatting
//! with the keyword/echo bot: every message takes the durable path of `serve`.
//! It prints a progress line every second, serves `/metrics`, `/healthz` and `/readyz`, and ends with one
//! JSON line. With `--chaos` it makes conversations panic, drops connections and crashes number
//! actors while it runs, and still expects every number online at the end.

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use switchboard_actors::{FleetCounters, NumberPhase, PhoneNumber};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::app::{App, Parts};
use crate::config::Config;
use crate::sim::ledger::Summary;
use crate::sim::{Dialer, Fault, FaultKind, Network, SimConfig, SimConnector, TrafficSpec};
use crate::store::{NumberRecord, SqlStore, TenantRecord};

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
    let stop = CancellationToken::new();
    tokio::spawn(phones(network.clone(), stop.clone()));

    // The node itself is `switchboard serve`'s, on the embedded defaults in a scratch
    // directory, with the in-process simulator as WhatsApp.
    let scratch = Scratch::new()?;
    let mut config = Config::defaults()?;
    config.node_id = "demo".into();
    config.store.url = format!("sqlite://{}/demo.db?mode=rwc", scratch.dir.display()).into();
    config.store.session_key_file = scratch.dir.join("session.key").display().to_string();
    config.http_listen = opts.listen;
    config.chaos.panic_every = if opts.chaos { CHAOS_PANIC_EVERY } else { 0 };
    let parts = Parts {
        connector: Some(Arc::new(SimConnector::new(Dialer::Local(network.clone())))),
    };
    let app = App::build_with(config, parts)
        .await
        .with_context(|| format!("starting the demo node (listening on {})", opts.listen))?;
    register(app.store(), &numbers).await?;
    for n in &numbers {
        app.fleet().add(n.clone())?;
    }
    let counters = app.fleet().counters().clone();
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
            app.fleet().addr().clone(),
            opts.seed,
            stop.clone(),
        ));
    }

    let started = Instant::now();
    let (report_tx, report_rx) = tokio::sync::oneshot::channel();
    let run = async {
        tokio::select! {
            () = shutdown => {}
            () = progress(&counters, opts.numbers, opts.duration, opts.progress) => {}
        }
        let duration_s = started.elapsed().as_secs_f64();
        network.stop_traffic();
        stop.cancel();
        settle(&counters, opts.numbers, &network).await;
        if opts.progress {
            eprintln!();
        }
        let c = &counters;
        let _ = report_tx.send(DemoReport {
            numbers: opts.numbers,
            numbers_online: c.numbers(NumberPhase::Online),
            messages_in: c.messages_in.load(Ordering::Relaxed),
            messages_out: c.messages_out.load(Ordering::Relaxed),
            restarts: c.restarts.load(Ordering::Relaxed),
            failed: c.numbers(NumberPhase::Failed),
            dead_letters: c.dead_letters.load(Ordering::Relaxed),
            duration_s,
            ledger: network.summary(),
        });
    };
    app.run_until(run).await?;
    Ok(report_rx.await?)
}

/// Conversations panic on one message in this many with `--chaos`.
const CHAOS_PANIC_EVERY: u64 = 50;

/// Registers the demo's tenant and numbers.
async fn register(store: &SqlStore, numbers: &[PhoneNumber]) -> anyhow::Result<()> {
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
    Ok(())
}

/// The demo's scratch directory, removed on drop.
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
async fn progress(c: &FleetCounters, numbers: usize, duration: Duration, print: bool) {
    let end = Instant::now() + duration;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let (mut last_in, mut last_out) = (0, 0);
    while Instant::now() < end {
        tick.tick().await;
        let msgs_in = c.messages_in.load(Ordering::Relaxed);
        let msgs_out = c.messages_out.load(Ordering::Relaxed);
        if print {
            eprint!(
                "\rnumbers online {:>6}/{numbers}  in {:>6}/s  out {:>6}/s  restarts {:>6}  failed {:>4}   ",
                c.numbers(NumberPhase::Online),
                msgs_in - last_in,
                msgs_out - last_out,
                c.restarts.load(Ordering::Relaxed),
                c.numbers(NumberPhase::Failed),
            );
            let _ = std::io::stderr().flush();
        }
        (last_in, last_out) = (msgs_in, msgs_out);
    }
}

/// Waits (bounded) until every number is online and every inbound message has been answered.
async fn settle(counters: &FleetCounters, numbers: usize, network: &Network) {
    let deadline = Instant::now() + SETTLE;
    let target = i64::try_from(numbers).unwrap_or(i64::MAX);
    while Instant::now() < deadline {
        let all_online = counters.numbers(NumberPhase::Online) == target;
        if all_online && network.summary().inbound_unanswered == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
