//! `cargo bench --bench failover [-- --nodes 3 --numbers 1000 --ttl 10s --rate 50 --admission
//! 400]`: a cluster
//! of real processes (`tests/support/cluster.rs`: N `switchboard serve` nodes on PostgreSQL and
//! Redis, `switchboard sim serve` as WhatsApp and referee) under steady inbound load.
//!
//! 1. Steady state: the Redis commands the cluster sends per second (`redis_ops_per_s`: lease
//!    renewals, heartbeats, owner reads), over 10 s.
//! 2. The busiest node is killed with SIGKILL. Per number it ran, the failover time is from the
//!    kill to the first connection a survivor opens for it (the simulator's clock):
//!    `failover_p50_s`, `failover_p99_s`, `failover_max_s`. A number of a surviving node whose
//!    owner changed is a `false_failovers`.
//! 3. A survivor is restarted gracefully (SIGTERM, start): per number it ran, the time from its
//!    connection closing to the next one opening, `handoff_gap_p99_ms`.
//! 4. The load stops and the backlog drains: `lost` (messages never answered), `shown_twice`,
//!    `resent_same_id` from the referee's ledger.
//! 5. The ceiling: this process sends the same command mix (renewals of as many leases in
//!    chunks of 500, heartbeats, owner reads) as fast as Redis answers, `redis_ceiling_ops_per_s`.
//!
//! `--admission` is the cluster's connect rate (each node's is half of it): the failover of a
//! third of the numbers takes at least that third divided by it.
//!
//! Prints one JSON line.

#[path = "../tests/support/cluster.rs"]
#[allow(missing_docs)]
mod cluster;
#[path = "../tests/support/db.rs"]
#[allow(missing_docs)]
mod db;
#[path = "../tests/support/fleet.rs"]
#[allow(missing_docs, unused_imports)]
mod fleet;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster::{Cluster, quantile, redis_url};
use fleet::arg;
use fred::prelude::*;
use switchboard::cluster::{AdmissionRates, Keys, RedisLeases, RedisMembership, TokenFloor};
use switchboard_actors::PhoneNumber;
use switchboard_actors::coordinator::{
    Coordinator, CoordinatorError, Membership, NodeAnnouncement,
};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let nodes: usize = arg(&args, "--nodes", 3);
    let numbers: usize = arg(&args, "--numbers", 1000);
    let ttl: humantime::Duration = arg(&args, "--ttl", "10s".parse()?);
    let rate: f64 = arg(&args, "--rate", 50.0);
    let admission: f64 = arg(&args, "--admission", 400.0);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let line = runtime.block_on(bench(nodes, numbers, ttl.into(), rate, admission))?;
    println!("{line}");
    Ok(())
}

/// Commands Redis has processed so far.
async fn commands(redis: &Client) -> anyhow::Result<u64> {
    let info: String = redis.custom(fred::cmd!("INFO"), vec!["stats"]).await?;
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no total_commands_processed in INFO"))
}

async fn bench(
    nodes: usize,
    numbers: usize,
    ttl: Duration,
    rate: f64,
    admission: f64,
) -> anyhow::Result<serde_json::Value> {
    let started = Instant::now();
    let (cluster_rate, node_rate) = (admission.to_string(), (admission / 2.0).to_string());
    let burst = (admission as u64).max(1).to_string();
    let settings = [
        (
            "SWITCHBOARD__ADMISSION__CLUSTER_PER_SECOND",
            cluster_rate.as_str(),
        ),
        ("SWITCHBOARD__ADMISSION__CLUSTER_BURST", burst.as_str()),
        (
            "SWITCHBOARD__ADMISSION__NODE_PER_SECOND",
            node_rate.as_str(),
        ),
        ("SWITCHBOARD__ADMISSION__NODE_BURST", burst.as_str()),
    ];
    let mut c = Cluster::start(nodes, numbers, ttl, &settings).await;
    eprintln!(
        "{numbers} numbers online on {nodes} nodes after {:?}",
        started.elapsed()
    );
    let every = Duration::from_secs_f64(1.0 / rate);
    let load_for = ttl * 4 + Duration::from_secs(60);
    let offered = (load_for.as_secs_f64() * rate) as usize;
    let load = c.load(offered, every);

    // 1. Lease traffic in the steady state.
    let window = Duration::from_secs(10);
    let before = commands(&c.redis).await?;
    tokio::time::sleep(window).await;
    let redis_ops_per_s = (commands(&c.redis).await? - before) as f64 / window.as_secs_f64();

    // 2. Kill the busiest node.
    let owners_before = c.owners().await;
    let (victim, lost_numbers) = c.busiest().await;
    let kill_ms = c.sim_now_ms().await;
    let mut victim_proc = c.procs.remove(&victim).expect("victim runs");
    c.node(&victim).kill(&mut victim_proc);
    let killed = Instant::now();
    let survivors = c.others(&victim);
    while c.online(&survivors).await < numbers as f64 {
        anyhow::ensure!(
            killed.elapsed() < ttl * 4 + Duration::from_secs(30),
            "{victim}'s numbers not online elsewhere after {:?}",
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut failover_ms = Vec::new();
    for n in &lost_numbers {
        let reopened = c
            .rig
            .ledger(n)
            .await
            .iter()
            .filter(|e| e["event"] == "connection_opened")
            .filter_map(|e| e["at_ms"].as_u64())
            .find(|at| *at > kill_ms);
        if let Some(at) = reopened {
            failover_ms.push(at - kill_ms);
        }
    }
    failover_ms.sort_unstable();
    anyhow::ensure!(
        failover_ms.len() == lost_numbers.len(),
        "a number never came back"
    );
    let owners_after = c.owners().await;
    let false_failovers = owners_before
        .iter()
        .filter(|(_, o)| **o != victim)
        .filter(|(n, o)| owners_after.get(*n) != Some(*o))
        .count();

    // 3. A graceful restart of a survivor.
    let restarted = survivors[0].clone();
    let term_ms = c.sim_now_ms().await;
    let mut proc = c.procs.remove(&restarted).expect("survivor runs");
    proc.terminate(Duration::from_secs(30));
    c.procs
        .insert(restarted.clone(), c.node(&restarted).start());
    let back = Instant::now();
    while c.online(&survivors).await < numbers as f64 {
        anyhow::ensure!(
            back.elapsed() < Duration::from_secs(120),
            "not all online after the restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let gaps = c.gaps_since(term_ms).await;

    // 4. Drain.
    load.abort();
    let deadline = Instant::now() + Duration::from_secs(180);
    let totals = loop {
        let s = c.rig.summary().await;
        if s["inbound_unanswered"] == 0 || Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };

    // 5. The ceiling of the same command mix.
    let redis_ceiling_ops_per_s = ceiling(&c, numbers, nodes, ttl).await?;
    let prefix = c.prefix.clone();
    c.stop_all().await;
    clean(&prefix).await?;

    let secs = |ms: u64| ms as f64 / 1000.0;
    Ok(serde_json::json!({
        "nodes": nodes,
        "numbers": numbers,
        "ttl_s": ttl.as_secs_f64(),
        "admission_per_s": admission,
        "inbound_per_s": rate,
        "killed_numbers": lost_numbers.len(),
        "failover_p50_s": secs(quantile(&failover_ms, 0.50)),
        "failover_p99_s": secs(quantile(&failover_ms, 0.99)),
        "failover_max_s": secs(*failover_ms.last().unwrap_or(&0)),
        "handoffs": gaps.len(),
        "handoff_gap_p99_ms": quantile(&gaps, 0.99),
        "handoff_gap_max_ms": gaps.last().copied().unwrap_or(0),
        "inbound": totals["inbound"],
        "lost": totals["inbound_unanswered"],
        "shown_twice": totals["shown_twice"],
        "duplicate_replies": totals["duplicate_replies"],
        "resent_same_id": totals["resent_same_id"],
        "false_failovers": false_failovers,
        "redis_ops_per_s": redis_ops_per_s.round(),
        "redis_ceiling_ops_per_s": redis_ceiling_ops_per_s.round(),
    }))
}

/// No floor: the ceiling's leases are its own numbers, unknown to any store.
struct NoFloor;

#[async_trait::async_trait]
impl TokenFloor for NoFloor {
    async fn floor(&self, _: &PhoneNumber) -> Result<u64, CoordinatorError> {
        Ok(0)
    }
}

/// Redis's ceiling for the cluster's command mix: a node's worth of leases renewed (chunks of
/// 500), heartbeats and owner reads of every number, sent back to back by four tasks for 5 s.
async fn ceiling(c: &Cluster, numbers: usize, nodes: usize, ttl: Duration) -> anyhow::Result<f64> {
    let prefix = format!("{}-ceiling", c.prefix);
    let keys = Keys::new(&prefix);
    let rates = AdmissionRates {
        node_per_second: 1e6,
        node_burst: 1_000_000,
        cluster_per_second: 1e6,
        cluster_burst: 1_000_000,
    };
    let client = switchboard::cluster::client(&redis_url(), Duration::from_secs(5))?;
    client.wait_for_connect().await?;
    let _: () = client.set(keys.epoch(), "1", None, None, false).await?;
    let leases = RedisLeases::new(
        client.clone(),
        keys.clone(),
        "ceiling#0".into(),
        ttl,
        Arc::new(NoFloor),
        rates,
    );
    let all: Vec<PhoneNumber> = (0..numbers)
        .map(|i| PhoneNumber::parse(&format!("+1555900{i:04}")))
        .collect::<Result<_, _>>()?;
    for n in all.iter().take(numbers / nodes.max(1)) {
        leases.acquire(n).await?;
    }
    let membership = Arc::new(RedisMembership::new(client.clone(), keys, ttl, None));
    let me = NodeAnnouncement {
        id: "ceiling".into(),
        capacity: 1,
        draining: false,
        version: "bench".into(),
    };
    let before = commands(&client).await?;
    let t0 = Instant::now();
    let run = Duration::from_secs(5);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (leases, membership, me, all) =
            (leases.clone(), membership.clone(), me.clone(), all.clone());
        tasks.spawn(async move {
            while t0.elapsed() < run {
                leases.renew_all().await;
                let _ = membership.heartbeat(&me).await;
                let _ = membership.owners(&all).await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let ops = (commands(&client).await? - before) as f64 / t0.elapsed().as_secs_f64();
    clean(&prefix).await?;
    Ok(ops)
}

/// Deletes every key under `prefix`.
async fn clean(prefix: &str) -> anyhow::Result<()> {
    let client = switchboard::cluster::client(&redis_url(), Duration::from_secs(5))?;
    client.wait_for_connect().await?;
    let keys: Vec<String> = client
        .custom(fred::cmd!("KEYS"), vec![format!("{{{prefix}}}:*")])
        .await?;
    for chunk in keys.chunks(500) {
        let _: i64 = client.del(chunk.to_vec()).await?;
    }
    Ok(())
}
