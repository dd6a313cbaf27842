//! A cluster of real processes on loopback: three `switchboard serve` nodes on one PostgreSQL
//! database and one Redis (a key prefix of the test's own), one `switchboard sim serve` as
//! WhatsApp and referee.
//!
//! Under steady inbound load: one node is killed with SIGKILL (every number it ran must be online
//! on the survivors within the lease TTL + 2 s); one is paused with SIGSTOP for 2 × TTL (its
//! numbers fail over, and once resumed it connects and sends nothing for them) or for 0.5 × TTL
//! (nothing moves); all three are restarted one by one with SIGTERM (each number handed over
//! within a second). The referee's ledger must show every message answered, none answered
//! twice, none shown twice; a reply may be sent again with its id only if it was in flight on a
//! killed node. A node holding more numbers than its peers admit at once hands them over in
//! waves, each number within a second. Admins pin a number, drain a node and add a number while the cluster runs; a
//! cold start follows the cluster's admission rate; a Redis restarted without its data (a
//! server of the test's own) never makes two owners, and service goes on. Operator commands
//! (restart, logout, a send as the business) reach the node that runs the number from any node,
//! or fail saying why.
#![allow(clippy::unwrap_used, clippy::panic)]

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/db.rs"]
mod db;
#[path = "support/fleet.rs"]
mod fleet;

use std::time::{Duration, Instant};

use cluster::{Cluster, quantile};
use serde_json::json;

const NUMBERS: usize = 24;
const TTL: Duration = Duration::from_secs(3);
/// The steady inbound load: one message every this long.
const EVERY: Duration = Duration::from_millis(125);

async fn trio() -> Cluster {
    Cluster::start(3, NUMBERS, TTL, &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_s_numbers_are_online_on_the_survivors_within_the_ttl_and_nothing_is_lost() {
    let mut trio = trio().await;
    let load = trio.load(200, EVERY);
    tokio::time::sleep(Duration::from_secs(8)).await;

    let (victim, lost) = trio.busiest().await;
    sqlx::any::install_default_drivers();
    let db = sqlx::AnyPool::connect(&trio.database.url).await.unwrap();
    let mut victim_proc = trio.procs.remove(&victim).unwrap();
    trio.node(&victim).kill(&mut victim_proc);
    let killed = Instant::now();
    let in_flight_at_kill = trio.rig.in_flight(&db, &lost).await;
    let survivors = trio.others(&victim);
    while trio.online(&survivors).await < NUMBERS as f64 {
        assert!(
            killed.elapsed() < TTL * 4,
            "{victim}'s {} numbers not online elsewhere after {:?}",
            lost.len(),
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let failover = killed.elapsed();
    let after = trio.owners().await;
    for n in &lost {
        assert_ne!(
            after.get(n),
            Some(&victim),
            "{n} still leased by the dead node"
        );
    }

    load.await.unwrap();
    let totals = trio.rig.drained(Duration::from_secs(120)).await;
    println!(
        "killed {victim} with {} of {NUMBERS} numbers; all online on the survivors after \
         {failover:?} (TTL {TTL:?}); in flight at the kill: {in_flight_at_kill}; ledger: {totals}",
        lost.len()
    );
    assert!(
        failover <= TTL + Duration::from_secs(2),
        "failover took {failover:?}, more than TTL + 2 s"
    );
    // The survivors timed each takeover from the moment the dead node's lease ran out.
    let taken = trio
        .metric(&survivors, "switchboard_lease_failover_seconds_count")
        .await;
    let waited = trio
        .metric(&survivors, "switchboard_lease_failover_seconds_sum")
        .await;
    assert_eq!(taken, lost.len() as f64, "failovers timed");
    assert!(
        waited / taken <= 2.0,
        "{:.2} s on average from a lease's expiry to its takeover",
        waited / taken
    );
    assert_eq!(totals["inbound"], 200);
    assert_eq!(totals["inbound_unanswered"], 0, "{totals}");
    assert_eq!(totals["duplicate_replies"], 0, "{totals}");
    assert_eq!(totals["shown_twice"], 0, "{totals}");
    let resent = totals["resent_same_id"].as_u64().unwrap();
    assert!(
        resent <= in_flight_at_kill,
        "{resent} resends, {in_flight_at_kill} sends in flight on the killed node"
    );
    trio.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_paused_for_two_ttls_loses_its_numbers_and_after_it_resumes_sends_nothing_for_them()
{
    // No rebalancing: the numbers it lost could otherwise move back to it, legitimately.
    let trio = Cluster::start(
        3,
        NUMBERS,
        TTL,
        &[("SWITCHBOARD__CLUSTER__REBALANCE_IMBALANCE", "100")],
    )
    .await;
    let load = trio.load(160, EVERY);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (victim, lost) = trio.busiest().await;
    trio.signal(&victim, "-STOP");
    let paused = Instant::now();
    let survivors = trio.others(&victim);
    while trio.online(&survivors).await < NUMBERS as f64 {
        assert!(
            paused.elapsed() < TTL * 2,
            "no failover while {victim} is paused"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Some(rest) = (TTL * 2).checked_sub(paused.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    let before = trio.footprint(&victim, &lost).await;
    trio.signal(&victim, "-CONT");
    // Its watchdog fires at once: it stops the lost numbers and does not take them back.
    tokio::time::sleep(TTL * 2).await;
    load.await.unwrap();
    let totals = trio.rig.drained(Duration::from_secs(120)).await;
    let after = trio.footprint(&victim, &lost).await;
    let owners = trio.owners().await;
    println!(
        "paused {victim} with {} numbers; ledger: {totals}",
        lost.len()
    );
    assert_eq!(
        after, before,
        "{victim} connected or sent for a number it lost"
    );
    assert_eq!(trio.online(std::slice::from_ref(&victim)).await, 0.0);
    for n in &lost {
        assert_ne!(
            owners.get(n),
            Some(&victim),
            "{n} taken back by the paused node"
        );
    }
    assert_eq!(totals["replaced_then_reconnected"], 0, "{totals}");
    assert!(
        totals["stream_replaced"].as_u64().unwrap() <= lost.len() as u64,
        "{totals}"
    );
    assert_eq!(totals["inbound_unanswered"], 0, "{totals}");
    assert_eq!(totals["duplicate_replies"], 0, "{totals}");
    assert_eq!(totals["shown_twice"], 0, "{totals}");
    trio.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_paused_for_half_a_ttl_keeps_its_numbers() {
    // At the default TTL: a lease renewed every TTL/3 and revoked by its watchdog at 0.9 × TTL
    // survives a pause of 0.5 × TTL with 0.067 × TTL to spare, which at 3 s (200 ms) a busy
    // two-core machine can eat in waking the paused process up.
    let ttl = Duration::from_secs(10);
    let trio = Cluster::start(3, NUMBERS, ttl, &[]).await;
    let load = trio.load(120, EVERY);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (victim, held) = trio.busiest().await;
    trio.signal(&victim, "-STOP");
    tokio::time::sleep(ttl / 2).await;
    trio.signal(&victim, "-CONT");
    load.await.unwrap();
    let totals = trio.rig.drained(Duration::from_secs(120)).await;
    let owners = trio.owners().await;
    for n in &held {
        assert_eq!(owners.get(n), Some(&victim), "{n} failed over");
    }
    assert_eq!(trio.online(&trio.ids()).await, NUMBERS as f64);
    assert_eq!(totals["stream_replaced"], 0, "{totals}");
    assert_eq!(totals["inbound_unanswered"], 0, "{totals}");
    assert_eq!(totals["duplicate_replies"], 0, "{totals}");
    assert_eq!(totals["shown_twice"], 0, "{totals}");
    trio.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_loses_nothing_and_hands_each_number_over_within_a_second() {
    let mut trio = trio().await;
    let load = trio.load(400, EVERY);
    for id in trio.ids() {
        let mut proc = trio.procs.remove(&id).unwrap();
        let code = proc.terminate(Duration::from_secs(20));
        assert_eq!(code, Some(0), "{id} did not stop cleanly");
        trio.procs.insert(id.clone(), trio.node(&id).start());
        let deadline = Instant::now() + TTL * 4;
        while trio.online(&trio.ids()).await < NUMBERS as f64 {
            assert!(
                Instant::now() < deadline,
                "not all online after restarting {id}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    load.await.unwrap();
    let totals = trio.rig.drained(Duration::from_secs(120)).await;
    let gaps = trio.gaps().await;
    let p99 = quantile(&gaps, 0.99);
    println!(
        "rolling restart: {} handovers, gap p50 {} ms, p99 {p99} ms, max {} ms; ledger: {totals}",
        gaps.len(),
        gaps[gaps.len() / 2],
        gaps[gaps.len() - 1]
    );
    assert_eq!(totals["inbound"], 400);
    assert_eq!(totals["inbound_unanswered"], 0, "{totals}");
    assert_eq!(totals["duplicate_replies"], 0, "{totals}");
    assert_eq!(totals["shown_twice"], 0, "{totals}");
    assert_eq!(
        totals["stream_replaced"], 0,
        "never two connections at once: {totals}"
    );
    assert_eq!(
        totals["resent_same_id"], 0,
        "each node settled its sends before handing off: {totals}"
    );
    assert!(p99 <= 1000, "lease gap p99 {p99} ms");
    trio.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_pin_and_drain_and_a_number_added_to_a_running_cluster_comes_online() {
    let trio = trio().await;
    let cli = |args: &[&str]| {
        let out = trio.rig.node.command(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let within = |what: &'static str| (what, Instant::now() + TTL * 3);

    // A pin moves a number to the pinned node.
    let owners = trio.owners().await;
    let (number, from) = owners.iter().find(|(_, o)| *o != "node-c").unwrap();
    cli(&["numbers", "move", number, "--to", "node-c"]);
    let (what, deadline) = within("pinned number moved");
    while trio.owners().await.get(number).map(String::as_str) != Some("node-c") {
        assert!(
            Instant::now() < deadline,
            "{what}: {number} still on {from}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Draining a node empties it; the others run everything.
    cli(&["cluster", "drain", "node-b"]);
    let (what, deadline) = within("drained");
    while trio.owners().await.values().any(|o| o == "node-b")
        || trio.online(&trio.others("node-b")).await < NUMBERS as f64
    {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = cli(&["cluster", "status"]);
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("node-b") && l.contains("draining")),
        "{status}"
    );

    // A number added while the cluster runs comes online without a restart.
    let added = "+15553009999";
    cli(&["numbers", "add", "--tenant", "test", added]);
    trio.rig.post("/accounts", json!({ "number": added })).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = trio
            .rig
            .http
            .post(format!("{}/accounts/{added}/pair", trio.rig.sim))
            .send()
            .await
            .unwrap();
        if r.status().is_success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the added number never showed a QR code"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while trio.online(&trio.ids()).await < (NUMBERS + 1) as f64 {
        assert!(Instant::now() < deadline, "the added number is not online");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    trio.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_holding_more_than_its_peers_admit_at_once_hands_over_in_waves_each_within_a_second()
{
    // One receiver admitting 15 connects a second: a node draining 60 numbers at once would
    // leave the last ones offline in the receiver's admission queue for three seconds.
    const MANY: usize = 120;
    const RATE: f64 = 15.0;
    // The default TTL: a handover does not wait for an expiry, and renewals keep up on a loaded
    // machine (at 3 s one late renewal stops a number of the receiver, which is not what this
    // measures).
    let mut pair = Cluster::start(
        2,
        MANY,
        Duration::from_secs(10),
        &[
            ("SWITCHBOARD__ADMISSION__NODE_PER_SECOND", "15"),
            ("SWITCHBOARD__ADMISSION__NODE_BURST", "15"),
            ("SWITCHBOARD__ADMISSION__CLUSTER_PER_SECOND", "30"),
            ("SWITCHBOARD__ADMISSION__CLUSTER_BURST", "30"),
            ("SWITCHBOARD__CLUSTER__MOVES_PER_SECOND", "100"),
        ],
    )
    .await;
    let load = pair.load(80, EVERY);
    let (leaving, held) = pair.busiest().await;
    let term_ms = pair.sim_now_ms().await;
    let mut proc = pair.procs.remove(&leaving).unwrap();
    assert_eq!(proc.terminate(Duration::from_secs(30)), Some(0));
    let stayed = pair.others(&leaving);
    let deadline = Instant::now() + Duration::from_secs(20);
    while pair.online(&stayed).await < MANY as f64 {
        assert!(Instant::now() < deadline, "not all online on {stayed:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    load.await.unwrap();
    let totals = pair.rig.drained(Duration::from_secs(120)).await;
    // The handed-over numbers' gaps: the receiver's own numbers may reconnect meanwhile on a
    // loaded machine (a renewal late past 0.9 × TTL stops a number), which is not a handover.
    let gaps = pair.gaps_of(&held, term_ms).await;
    let others = pair.gaps_since(term_ms).await.len() - gaps.len();
    let mut closes = Vec::new();
    for n in &held {
        closes.extend(
            pair.rig
                .ledger(n)
                .await
                .iter()
                .filter(|e| e["event"] == "connection_closed")
                .filter_map(|e| e["at_ms"].as_u64())
                .filter(|at| *at >= term_ms),
        );
    }
    closes.sort_unstable();
    let spread_s = (closes[closes.len() - 1] - closes[0]) as f64 / 1000.0;
    let p99 = quantile(&gaps, 0.99);
    println!(
        "{} numbers handed over in {spread_s:.2} s (receiver admits {RATE}/s); {} gaps, p99 \
         {p99} ms, max {} ms; {others} reconnects of other numbers; ledger: {totals}",
        held.len(),
        gaps.len(),
        gaps.last().unwrap()
    );
    assert!(
        gaps.len() >= held.len(),
        "every number reconnected: {gaps:?}"
    );
    // Paced at the receiver's rate (one wave of a tenth of a second at once), not all at once.
    let paced_s = (held.len() as f64 - RATE / 10.0) / RATE;
    assert!(
        spread_s >= 0.8 * paced_s,
        "{} numbers handed over in {spread_s:.2} s: not paced at {RATE}/s",
        held.len()
    );
    assert!(p99 <= 1000, "handoff gap p99 {p99} ms");
    assert_eq!(totals["inbound_unanswered"], 0, "{totals}");
    assert_eq!(totals["shown_twice"], 0, "{totals}");
    assert_eq!(totals["stream_replaced"], 0, "{totals}");
    pair.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_start_of_a_thousand_numbers_connects_at_the_cluster_s_admission_rate() {
    const COLD: usize = 1000;
    const RATE: f64 = 25.0;
    let trio = Cluster::start(
        3,
        COLD,
        TTL,
        &[
            ("SWITCHBOARD__ADMISSION__CLUSTER_PER_SECOND", "25"),
            ("SWITCHBOARD__ADMISSION__CLUSTER_BURST", "25"),
            // The nodes start one after another; let the later ones take their share quickly.
            ("SWITCHBOARD__CLUSTER__MOVES_PER_SECOND", "100"),
        ],
    )
    .await;
    // Each number's first connection (later ones are the session's own reconnects and moves).
    let mut first: Vec<u64> = Vec::new();
    for n in &trio.numbers {
        let events = trio.rig.ledger(n).await;
        if let Some(at) = events
            .iter()
            .find(|e| e["event"] == "connection_opened")
            .and_then(|e| e["at_ms"].as_u64())
        {
            first.push(at);
        }
    }
    first.sort_unstable();
    assert_eq!(first.len(), COLD);
    // The rate between the 5th and the 95th percentile: past the initial burst, and not
    // stretched by the last straggler.
    let (lo, hi) = (COLD / 20, COLD - COLD / 20);
    let span_s = (first[hi] - first[lo]) as f64 / 1000.0;
    let measured = (hi - lo) as f64 / span_s;
    let total_s = (first[COLD - 1] - first[0]) as f64 / 1000.0;
    println!(
        "{COLD} cold connects over {total_s:.2} s; {measured:.2}/s between the 5th and 95th \
         percentile (admission {RATE}/s)"
    );
    assert!(
        (measured / RATE - 1.0).abs() <= 0.10,
        "{measured:.2} connects/s against an admission rate of {RATE}/s"
    );
    trio.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_reach_the_node_that_runs_the_number_or_say_why_not() {
    let trio = trio().await;
    let owners = trio.owners().await;
    let cli = |from: &str, args: &[&str]| {
        let out = trio.node(from).command(args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let connections = |events: &[serde_json::Value]| {
        events
            .iter()
            .filter(|e| e["event"] == "connection_opened")
            .count()
    };

    // Restart, asked from a node that does not run the number.
    let n = &trio.numbers[0];
    let owner = &owners[n];
    let elsewhere = trio.others(owner)[0].clone();
    let before = connections(&trio.rig.ledger(n).await);
    let (ok, out, err) = cli(&elsewhere, &["numbers", "restart", n]);
    assert!(ok, "restart failed: {err}");
    assert!(out.contains(&format!("restart done on {owner}")), "{out}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while connections(&trio.rig.ledger(n).await) <= before
        || trio.online(&trio.ids()).await < NUMBERS as f64
    {
        assert!(
            Instant::now() < deadline,
            "{n} did not come back after its restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        trio.owners().await.get(n),
        Some(owner),
        "a restart keeps the owner"
    );

    // Logout: the device is unlinked and the number waits to be paired again.
    let m = &trio.numbers[1];
    let (ok, out, err) = cli(&elsewhere, &["numbers", "logout", m]);
    assert!(ok, "logout failed: {err}");
    assert!(out.contains("logout done on"), "{out}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !trio
        .rig
        .ledger(m)
        .await
        .iter()
        .any(|e| e["event"] == "connection_closed" && e["reason"] == "logged_out")
    {
        assert!(Instant::now() < deadline, "{m} was not logged out");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A send as the business, asked from a node that does not run the number: queued on its
    // owner and sent once, however often it is asked with the same key.
    let s = &trio.numbers[3];
    let s_owner = &owners[s];
    let s_asker = trio.others(s_owner)[0].clone();
    let to = "491700000001@s.whatsapp.net";
    let send = |text: &str| {
        cli(
            &s_asker,
            &[
                "numbers", "send", s, "--to", to, "--text", text, "--key", "order-1",
            ],
        )
    };
    let (ok, out, err) = send("your order shipped");
    assert!(ok, "send failed: {err}");
    assert!(
        out.contains("queued as 3EB0") && out.contains(&format!("on {s_owner}")),
        "{out}"
    );
    let (ok, out, err) = send("your order shipped");
    assert!(ok && out.contains("already queued as 3EB0"), "{out} {err}");
    let (ok, _, err) = send("your order was cancelled");
    assert!(
        !ok && err.contains("used before for a different message"),
        "{err}"
    );
    let (ok, _, err) = cli(
        &s_asker,
        &["numbers", "send", s, "--to", "12345", "--text", "x"],
    );
    assert!(!ok && err.contains("--to:"), "{err}");
    let sent = |events: &[serde_json::Value]| {
        events
            .iter()
            .filter(|e| e["event"] == "outbound_received" && e["text"] == "your order shipped")
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while sent(&trio.rig.ledger(s).await) == 0 {
        assert!(Instant::now() < deadline, "the send never reached {to}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sent(&trio.rig.ledger(s).await), 1, "sent once");

    // No node runs it: a clear error at once.
    let (ok, _, err) = cli(&elsewhere, &["numbers", "restart", "+15559999999"]);
    assert!(!ok);
    assert!(err.contains("no node runs +15559999999"), "{err}");

    // Its owner does not answer: the caller is told after its timeout, and the command is
    // dropped once the owner resumes (its caller gave up).
    let k = &trio.numbers[2];
    let k_owner = owners[k].clone();
    let asker = trio.others(&k_owner)[0].clone();
    let before = connections(&trio.rig.ledger(k).await);
    trio.signal(&k_owner, "-STOP");
    let started = Instant::now();
    let (ok, _, err) = cli(&asker, &["numbers", "restart", k, "--timeout", "1s"]);
    let waited = started.elapsed();
    trio.signal(&k_owner, "-CONT");
    assert!(!ok);
    assert!(
        err.contains(&format!("{k_owner} did not answer within 1s")),
        "{err}"
    );
    assert!(waited < Duration::from_secs(3), "waited {waited:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    if trio.owners().await.get(k) == Some(&k_owner) {
        assert_eq!(
            connections(&trio.rig.ledger(k).await),
            before,
            "a command its caller gave up on was carried out"
        );
    }
    trio.stop_all().await;
}

/// A Redis of this test's own, which it can restart with nothing kept.
struct PrivateRedis {
    port: u16,
    proc: Option<std::process::Child>,
}

impl PrivateRedis {
    fn start() -> Self {
        let mut r = Self {
            port: fleet::free_port(),
            proc: None,
        };
        r.restart();
        r
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL (if running), then a fresh server on the same port with no persistence.
    fn restart(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill().unwrap();
            p.wait().unwrap();
        }
        let port = self.port.to_string();
        let proc = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        self.proc = Some(proc);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

/// The most connections any number had open at once, from the referee's ledger.
async fn most_open_at_once(trio: &Cluster) -> usize {
    let mut most = 0;
    for n in &trio.numbers {
        let mut open = std::collections::HashSet::new();
        for e in &trio.rig.ledger(n).await {
            match e["event"].as_str() {
                Some("connection_opened") => {
                    open.insert(e["connection"].as_u64());
                }
                Some("connection_closed") => {
                    open.remove(&e["connection"].as_u64());
                }
                _ => {}
            }
            most = most.max(open.len());
        }
    }
    most
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_without_its_data_never_makes_two_owners_and_service_goes_on() {
    let mut redis = PrivateRedis::start();
    let trio = Cluster::start_on(&redis.url(), 3, NUMBERS, TTL, &[]).await;
    let owners_before = trio.owners().await;
    let load = trio.load(200, EVERY);
    tokio::time::sleep(Duration::from_secs(6)).await;
    redis.restart();
    let restarted = Instant::now();
    // Every number is owned again, by the node that held it, within a TTL.
    loop {
        let owners = trio.owners().await;
        if owners.len() == NUMBERS {
            assert_eq!(
                owners, owners_before,
                "ownership moved across the Redis restart"
            );
            break;
        }
        assert!(
            restarted.elapsed() < TTL,
            "leases not back within a TTL: {owners:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recovered = restarted.elapsed();
    load.await.unwrap();
    let totals = trio.rig.drained(Duration::from_secs(120)).await;
    println!("Redis restarted empty; leases back after {recovered:?}; ledger: {totals}");
    assert_eq!(
        most_open_at_once(&trio).await,
        1,
        "two connections for one number"
    );
    assert_eq!(totals["stream_replaced"], 0, "{totals}");
    assert_eq!(totals["inbound_unanswered"], 0, "{totals}");
    assert_eq!(totals["duplicate_replies"], 0, "{totals}");
    assert_eq!(totals["shown_twice"], 0, "{totals}");
    assert_eq!(trio.online(&trio.ids()).await, NUMBERS as f64);
    trio.stop_all().await;
}
