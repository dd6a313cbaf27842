//! A cluster of real processes on loopback for tests and benchmarks: N `switchboard serve` nodes
//! on one PostgreSQL database and one Redis (a key prefix of its own), one `switchboard sim
//! serve` as WhatsApp and referee. Include with `#[path = "support/cluster.rs"] mod cluster;`
//! next to `db` and `fleet`.
#![allow(dead_code, clippy::unwrap_used, clippy::panic)]

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use fred::prelude::*;
use serde_json::json;
use switchboard::store::Dialect;

use crate::db::TestDb;
use crate::fleet::{Node, Proc, Rig, free_port};

/// Where the test Redis is.
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The id of node `i`: `node-a`, `node-b`, …
pub fn node_id(i: usize) -> String {
    format!("node-{}", char::from(b'a' + u8::try_from(i % 26).unwrap()))
}

/// Another node of the rig's cluster: the same store, keys, simulator and Redis prefix, its own
/// id, port and directory.
fn peer(rig: &Rig, id: &str) -> Node {
    let listen = format!("127.0.0.1:{}", free_port());
    let mut env: Vec<(String, String)> = rig
        .node
        .env
        .iter()
        .filter(|(k, _)| k != "SWITCHBOARD__HTTP__LISTEN" && k != "SWITCHBOARD__NODE__ID")
        .cloned()
        .collect();
    env.push(("SWITCHBOARD__HTTP__LISTEN".into(), listen.clone()));
    env.push(("SWITCHBOARD__NODE__ID".into(), id.into()));
    Node {
        env,
        dir: tempfile::tempdir().unwrap(),
        http: format!("http://{listen}"),
    }
}

/// The nodes, every number paired and online.
pub struct Cluster {
    pub rig: Rig,
    pub peers: Vec<Node>,
    pub procs: HashMap<String, Proc>,
    pub redis: Client,
    pub prefix: String,
    pub numbers: Vec<String>,
    pub database: TestDb,
    nodes: usize,
    _lock: std::fs::File,
}

impl Cluster {
    /// `nodes` nodes running `numbers` numbers with lease TTL `ttl`, and `extra` settings each.
    pub async fn start(
        nodes: usize,
        numbers: usize,
        ttl: Duration,
        extra: &[(&str, &str)],
    ) -> Self {
        Self::start_on(&redis_url(), nodes, numbers, ttl, extra).await
    }

    /// Like [`Cluster::start`], on the Redis at `redis`.
    pub async fn start_on(
        redis: &str,
        nodes: usize,
        numbers: usize,
        ttl: Duration,
        extra: &[(&str, &str)],
    ) -> Self {
        // One cluster at a time on this machine: its processes are enough for two cores.
        let lock = tokio::task::spawn_blocking(|| {
            let path = std::env::temp_dir().join("switchboard-cluster.lock");
            let file = std::fs::File::create(path).unwrap();
            file.lock().unwrap();
            file
        })
        .await
        .unwrap();
        let database = TestDb::new(Dialect::Postgres).await;
        let prefix = format!(
            "sbtest-cluster-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        );
        let list: Vec<String> = (0..numbers).map(|i| format!("+1555300{i:04}")).collect();
        let ttl = format!("{}ms", ttl.as_millis());
        let env = [
            ("SWITCHBOARD__CLUSTER__REDIS_URL", redis.to_owned()),
            ("SWITCHBOARD__CLUSTER__KEY_PREFIX", prefix.clone()),
            ("SWITCHBOARD__CLUSTER__LEASE_TTL", ttl),
            ("SWITCHBOARD__NODE__ID", node_id(0)),
        ];
        let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        env.extend_from_slice(extra);
        let rig = Rig::new(&database.url, list.clone(), &env).await;
        let peers: Vec<Node> = (1..nodes).map(|i| peer(&rig, &node_id(i))).collect();
        let mut procs = HashMap::new();
        for (i, p) in peers.iter().enumerate() {
            procs.insert(node_id(i + 1), p.start());
        }
        procs.insert(node_id(0), rig.serve().await);
        let redis = switchboard::cluster::client(redis, Duration::from_secs(2)).unwrap();
        redis.wait_for_connect().await.unwrap();
        let cluster = Self {
            rig,
            peers,
            procs,
            redis,
            prefix,
            numbers: list,
            database,
            nodes,
            _lock: lock,
        };
        let deadline = Instant::now() + Duration::from_secs(60 + numbers as u64 / 10);
        let mut rescan = Instant::now();
        while cluster.online(&cluster.ids()).await < numbers as f64 {
            // A number whose lease is lost while it pairs (a node too slow to renew in time)
            // starts over on its next owner with a new QR code: its phone scans again, as a
            // person would.
            if rescan.elapsed() > Duration::from_secs(2) {
                rescan = Instant::now();
                for n in &cluster.numbers {
                    let url = format!("{}/accounts/{n}/pair", cluster.rig.sim);
                    let _ = cluster.rig.http.post(url).send().await;
                }
            }
            if Instant::now() >= deadline {
                let mut per_node = Vec::new();
                for id in cluster.ids() {
                    per_node.push((id.clone(), cluster.online(&[id]).await));
                }
                let owners = cluster.owners().await;
                panic!(
                    "not all online: {per_node:?}; {} of {numbers} leased: {owners:?}\n{}",
                    owners.len(),
                    cluster.rig.node.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        cluster.settle(deadline).await;
        cluster
    }

    /// Waits until placement has settled: every number leased, online, and no lease changing
    /// hands for a few of the agents' passes (the nodes started one after another, so the
    /// later ones take their share by rebalancing).
    async fn settle(&self, deadline: Instant) {
        let quiet = Duration::from_secs(3);
        let mut last = self.owners().await;
        let mut since = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let now = self.owners().await;
            if now != last || now.len() < self.numbers.len() {
                last = now;
                since = Instant::now();
            } else if since.elapsed() >= quiet
                && self.online(&self.ids()).await >= self.numbers.len() as f64
            {
                return;
            }
            assert!(
                Instant::now() < deadline + quiet,
                "placement did not settle: {last:?}"
            );
        }
    }

    pub fn ids(&self) -> Vec<String> {
        (0..self.nodes).map(node_id).collect()
    }

    pub fn node(&self, id: &str) -> &Node {
        match self.ids().iter().position(|i| i == id) {
            Some(0) | None => &self.rig.node,
            Some(i) => &self.peers[i - 1],
        }
    }

    /// Numbers online on the nodes `ids` (a node not answering has none).
    pub async fn online(&self, ids: &[String]) -> f64 {
        self.metric(ids, "switchboard_numbers{state=\"online\"}")
            .await
    }

    /// The sum over the nodes `ids` of the series `series` (name and labels, exactly as
    /// `/metrics` shows them; a node not answering adds nothing).
    pub async fn metric(&self, ids: &[String], series: &str) -> f64 {
        let mut sum = 0.0;
        let prefix = format!("{series} ");
        for id in ids {
            let url = format!("{}/metrics", self.node(id).http);
            let Ok(r) = self.rig.http.get(url).send().await else {
                continue;
            };
            let text = r.text().await.unwrap_or_default();
            sum += text
                .lines()
                .filter_map(|l| l.strip_prefix(prefix.as_str()))
                .filter_map(|v| v.parse::<f64>().ok())
                .sum::<f64>();
        }
        sum
    }

    /// Each number's lease holder (node id), from Redis.
    pub async fn owners(&self) -> HashMap<String, String> {
        let mut out = HashMap::new();
        for chunk in self.numbers.chunks(500) {
            let keys: Vec<String> = chunk
                .iter()
                .map(|n| format!("{{{}}}:lease:{n}", self.prefix))
                .collect();
            let held: Vec<Option<String>> = if keys.len() == 1 {
                vec![self.redis.get(keys[0].clone()).await.unwrap()]
            } else {
                self.redis.mget(keys).await.unwrap()
            };
            for (n, held) in chunk.iter().zip(held) {
                if let Some(held) = held {
                    let node = held.split(['#', '|']).next().unwrap_or_default();
                    out.insert(n.clone(), node.to_owned());
                }
            }
        }
        out
    }

    /// The node holding the most numbers, with its numbers.
    pub async fn busiest(&self) -> (String, Vec<String>) {
        let mut per_node: HashMap<String, Vec<String>> = HashMap::new();
        for (n, owner) in self.owners().await {
            per_node.entry(owner).or_default().push(n);
        }
        per_node.into_iter().max_by_key(|(_, ns)| ns.len()).unwrap()
    }

    pub fn others(&self, id: &str) -> Vec<String> {
        self.ids().into_iter().filter(|i| i != id).collect()
    }

    /// Offers `count` inbound messages, one every `every`, round the numbers.
    pub fn load(&self, count: usize, every: Duration) -> tokio::task::JoinHandle<()> {
        let (sim, http, numbers) = (
            self.rig.sim.clone(),
            self.rig.http.clone(),
            self.numbers.clone(),
        );
        tokio::spawn(async move {
            let started = Instant::now();
            for i in 0..count {
                let to = &numbers[i % numbers.len()];
                let body =
                    json!({ "from": format!("+4916{:07}", i % 53), "text": format!("hi {i}") });
                let r = http
                    .post(format!("{sim}/accounts/{to}/inbound"))
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success());
                let next = started + every * u32::try_from(i + 1).unwrap();
                tokio::time::sleep_until(next.into()).await;
            }
        })
    }

    pub fn signal(&self, id: &str, signal: &str) {
        let pid = self.procs[id].pid().to_string();
        let status = std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Over `numbers`: the connections `client` opened for them, and the sends on those.
    pub async fn footprint(&self, client: &str, numbers: &[String]) -> (usize, usize) {
        let (mut opened, mut sent) = (0, 0);
        for n in numbers {
            let events = self.rig.ledger(n).await;
            let mine: HashSet<u64> = events
                .iter()
                .filter(|e| e["event"] == "connection_opened" && e["client"] == client)
                .filter_map(|e| e["connection"].as_u64())
                .collect();
            opened += mine.len();
            sent += events
                .iter()
                .filter(|e| e["event"] == "outbound_received")
                .filter(|e| e["connection"].as_u64().is_some_and(|c| mine.contains(&c)))
                .count();
        }
        (opened, sent)
    }

    /// Per number, the time from each connection closing to the next one opening (ms,
    /// sorted): how long the number had no connection while it moved between nodes.
    pub async fn gaps(&self) -> Vec<u64> {
        self.gaps_since(0).await
    }

    /// [`Cluster::gaps`] for connections closed at `since_ms` (the simulator's clock) or later.
    pub async fn gaps_since(&self, since_ms: u64) -> Vec<u64> {
        self.gaps_of(&self.numbers, since_ms).await
    }

    /// [`Cluster::gaps_since`] for `numbers` only.
    pub async fn gaps_of(&self, numbers: &[String], since_ms: u64) -> Vec<u64> {
        let mut gaps = Vec::new();
        for n in numbers {
            let mut closed_at: Option<u64> = None;
            for e in &self.rig.ledger(n).await {
                let at = e["at_ms"].as_u64().unwrap_or(0);
                match e["event"].as_str() {
                    Some("connection_closed") if at >= since_ms => closed_at = Some(at),
                    Some("connection_opened") => {
                        if let Some(c) = closed_at.take() {
                            gaps.push(at.saturating_sub(c));
                        }
                    }
                    _ => {}
                }
            }
        }
        gaps.sort_unstable();
        gaps
    }

    /// The simulator's clock now (ms since it started): the time of a message offered now.
    pub async fn sim_now_ms(&self) -> u64 {
        let to = &self.numbers[0];
        let id = format!("clock-{}", rand::random::<u64>());
        self.rig
            .post(
                &format!("/accounts/{to}/inbound"),
                json!({ "from": "+491700000000", "text": "what time is it", "id": id }),
            )
            .await;
        self.rig
            .ledger(to)
            .await
            .iter()
            .rev()
            .find(|e| e["event"] == "inbound_offered")
            .and_then(|e| e["at_ms"].as_u64())
            .unwrap_or(0)
    }

    pub async fn stop_all(mut self) {
        for (_, mut p) in self.procs.drain() {
            p.terminate(Duration::from_secs(15));
        }
    }
}

/// The `q`-quantile of sorted `values` (0 if empty).
pub fn quantile(values: &[u64], q: f64) -> u64 {
    if values.is_empty() {
        return 0;
    }
    let rank = ((values.len() as f64) * q).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}
