//! Fleet benchmark: how fast N numbers come online on the in-process simulator, what an idle
//! number costs in memory, and how long a number actor's restart takes.
//!
//! `cargo bench --bench fleet -- --numbers 10000` prints one JSON line:
//! `numbers`, `all_online_s` (first spawn to every number `Connected`), `spawns_per_s` (number
//! subtrees spawned per second), `rss_per_number_bytes` (resident-memory growth per idle, online
//! number: actors, session task, pacer, and the simulator's per-connection state), and
//! `restart_p50_us` / `restart_p99_us` (from injecting a crash into a number actor to its
//! successor answering a status call, over up to 1,000 restarts). Admission control is off.

/// The binary's allocator and its options, so that the memory figures are the node's.
#[path = "../src/allocator.rs"]
mod allocator;

use std::sync::Arc;
use std::time::Duration;

use switchboard::sim::{Dialer, Network, SimConfig, SimConnector};
use switchboard_actors::coordinator::{LocalCoordinator, TokenSource};
use switchboard_actors::number::NumberMsg;
use switchboard_actors::store::{Fence, MemoryStore, Store};
use switchboard_actors::transport::Credentials;
use switchboard_actors::{Deps, Fleet, FleetCounters, NumberPhase, PhoneNumber, Settings};
use tokio::time::Instant;

fn main() -> anyhow::Result<()> {
    let mut numbers = 10_000usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--numbers" {
            numbers = args.next().unwrap_or_default().parse()?;
        }
    }
    let runtime = allocator::runtime()?;
    let report = runtime.block_on(run(numbers))?;
    println!("{report}");
    Ok(())
}

async fn run(n: usize) -> anyhow::Result<serde_json::Value> {
    let network = Network::new(SimConfig::default());
    let store = Arc::new(MemoryStore::default());
    let numbers: Vec<PhoneNumber> = (1..=n)
        .map(|i| PhoneNumber::parse(&format!("+1555{i:07}")))
        .collect::<Result<_, _>>()?;
    for number in &numbers {
        let creds = network.create_paired_account(number);
        let fence = Fence {
            number: number.clone(),
            token: store.next_token(number).await?,
        };
        store.save_session(&fence, &Credentials(creds)).await?;
    }
    let settings = Settings {
        typing_per_char: Duration::ZERO,
        ..Settings::default()
    };
    let deps = Deps {
        connector: Arc::new(SimConnector::new(Dialer::Local(network.clone()))),
        responder: Arc::new(switchboard::bot::KeywordBot),
        ai: Arc::new(switchboard::bot::CannedModel),
        store: store.clone(),
        coordinator: Arc::new(LocalCoordinator::new(store)),
        settings,
        counters: Arc::new(FleetCounters::default()),
    };
    let rss_before = rss_bytes()?;
    let fleet = Fleet::start(deps).await?;

    let started = Instant::now();
    for number in &numbers {
        fleet.add(number.clone())?;
    }
    let mut spawned_s = None;
    let target = i64::try_from(n)?;
    while fleet.counters().numbers(NumberPhase::Online) < target {
        if spawned_s.is_none() && fleet.status().await?.running == n {
            spawned_s = Some(started.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let all_online_s = started.elapsed().as_secs_f64();
    let spawned_s = spawned_s.unwrap_or(all_online_s);

    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss_bytes()?;
    let rss_per_number = rss_after.saturating_sub(rss_before) / n as u64;

    let mut restarts = Vec::new();
    for number in numbers.iter().take(1_000) {
        restarts.push(restart_once(&fleet, number).await?);
    }
    restarts.sort_unstable();
    let pct = |p: f64| restarts[((restarts.len() - 1) as f64 * p).round() as usize];

    fleet.shutdown(Duration::from_secs(30)).await;
    Ok(serde_json::json!({
        "numbers": n,
        "all_online_s": all_online_s,
        "spawns_per_s": n as f64 / spawned_s,
        "rss_per_number_bytes": rss_per_number,
        "restart_p50_us": pct(0.50),
        "restart_p99_us": pct(0.99),
        "restart_samples": restarts.len(),
    }))
}

/// Crashes the number's actor and waits until its successor answers; returns microseconds.
async fn restart_once(fleet: &Fleet, number: &PhoneNumber) -> anyhow::Result<u64> {
    let old = fleet
        .number(number.clone())
        .await?
        .ok_or_else(|| anyhow::anyhow!("{number} is not running"))?;
    let old_id = old.actor().get_id();
    let t0 = Instant::now();
    old.cast(NumberMsg::Crash("bench: injected crash".to_owned()))?;
    loop {
        if let Some(new) = fleet.number(number.clone()).await?
            && new.actor().get_id() != old_id
            && new
                .call(NumberMsg::Status, Duration::from_secs(5))
                .await
                .is_ok()
        {
            return Ok(u64::try_from(t0.elapsed().as_micros())?);
        }
        tokio::task::yield_now().await;
    }
}

fn rss_bytes() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc/self/status"))?
        .parse::<u64>()?;
    Ok(kb * 1024)
}
