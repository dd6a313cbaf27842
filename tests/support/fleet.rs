//! Real processes for end-to-end tests: `switchboard sim serve` as the network and referee,
//! `switchboard serve` as the node, with its numbers registered and paired. Include with
//! `#[path = "support/fleet.rs"] mod fleet;`.
#![allow(dead_code, clippy::unwrap_used, clippy::panic)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use switchboard::store::SessionCipher;

/// The value after `--name` in a benchmark's arguments, or `default`.
pub fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.windows(2)
        .find(|w| w[0] == name)
        .and_then(|w| w[1].parse().ok())
        .unwrap_or(default)
}

/// A free TCP port on localhost.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed when dropped.
pub struct Proc(pub Child);

impl Proc {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Its resident memory now, from `/proc`.
    pub fn rss_bytes(&self) -> u64 {
        self.status("VmRSS") * 1024
    }

    /// CPU time it has used so far (user + system), from `/proc/<pid>/stat`.
    pub fn cpu_time(&self) -> Duration {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // After the command name in parentheses: state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let fields: Vec<u64> = rest
            .split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect();
        let ticks = fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
        // The kernel's USER_HZ is 100 on Linux.
        Duration::from_millis(ticks * 10)
    }

    /// Sends SIGTERM and waits up to `within` for the process to exit; its exit code, or `None`
    /// if it was still running (then it is killed).
    pub fn terminate(&mut self, within: Duration) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.0.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// One numeric field of `/proc/<pid>/status` (memory in kB), 0 if absent.
    pub fn status(&self, field: &str) -> u64 {
        proc_status(&self.pid().to_string(), field)
    }
}

/// One numeric field of `/proc/<pid>/status` (memory in kB; `pid` may be `self`), 0 if absent.
pub fn proc_status(pid: &str, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How to run `switchboard` for one node: its environment and working directory.
pub struct Node {
    pub env: Vec<(String, String)>,
    pub dir: tempfile::TempDir,
    /// Where its `/metrics` and `/readyz` are.
    pub http: String,
}

impl Node {
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
        cmd.args(args)
            .current_dir(self.dir.path())
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", "warn,switchboard::panic=off");
        cmd
    }

    /// Starts `switchboard serve`, its log appended to `serve.log`.
    pub fn start(&self) -> Proc {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("serve.log"))
            .unwrap();
        Proc(
            self.command(&["serve"])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    }

    /// SIGKILL: no shutdown sequence, no flush.
    pub fn kill(&self, node: &mut Proc) {
        node.0.kill().unwrap();
        node.0.wait().unwrap();
    }

    /// The sum of every series of the node's metric `name` (0 if it has none); `name` may name
    /// one series with its labels, e.g. `switchboard_numbers{state="online"}`.
    pub async fn metric(&self, http: &reqwest::Client, name: &str) -> f64 {
        let text = http
            .get(format!("{}/metrics", self.http))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .fold(0.0, |sum, v| sum + v)
    }

    /// A node whose numbers connect through whatsapp-rust to an endpoint that refuses every
    /// connection (a closed local port): WhatsApp unreachable. `count` numbers registered,
    /// none paired; SQLite in its directory.
    pub fn offline_whatsapp(count: usize) -> Self {
        let listen = format!("127.0.0.1:{}", free_port());
        // Bound and dropped: nothing listens there.
        let closed = free_port();
        let node = Self {
            env: vec![
                ("SWITCHBOARD__TRANSPORT__KIND".into(), "whatsapp".into()),
                (
                    "SWITCHBOARD__TRANSPORT__WHATSAPP_URL".into(),
                    format!("ws://127.0.0.1:{closed}/ws/chat"),
                ),
                ("SWITCHBOARD__HTTP__LISTEN".into(), listen.clone()),
            ],
            dir: tempfile::tempdir().unwrap(),
            http: format!("http://{listen}"),
        };
        let numbers: Vec<String> = (0..count).map(|i| format!("+1555{i:07}")).collect();
        let status = node
            .command(&["numbers", "add"])
            .args(&numbers)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "numbers add failed");
        node
    }

    /// The last lines of the node's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(lines).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

/// The simulator, a node configured for it, and the numbers it runs.
pub struct Rig {
    pub http: reqwest::Client,
    /// The simulator's base URL.
    pub sim: String,
    pub node: Node,
    pub numbers: Vec<String>,
    _sim: Proc,
}

impl Rig {
    /// Starts the simulator, registers `numbers` on the store at `store_url` (tenant `test`)
    /// and on the network; `env` adds settings of the node's own.
    pub async fn new(store_url: &str, numbers: Vec<String>, env: &[(&str, &str)]) -> Self {
        let http = reqwest::Client::new();
        let sim_port = free_port();
        let sim = format!("http://127.0.0.1:{sim_port}");
        let listen = format!("127.0.0.1:{}", free_port());
        let mut vars: Vec<(String, String)> = vec![
            ("SWITCHBOARD__STORE__URL".into(), store_url.to_owned()),
            (
                "SWITCHBOARD__STORE__SESSION_KEYS".into(),
                SessionCipher::generate("test"),
            ),
            ("SWITCHBOARD__TRANSPORT__SIM_URL".into(), sim.clone()),
            ("SWITCHBOARD__HTTP__LISTEN".into(), listen.clone()),
            ("SWITCHBOARD__RUNTIME__TYPING_PER_CHAR".into(), "0ms".into()),
        ];
        vars.extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        let node = Node {
            env: vars,
            dir: tempfile::tempdir().unwrap(),
            http: format!("http://{listen}"),
        };
        let sim_proc = Proc(
            node.command(&["sim", "serve", "--listen", &format!("127.0.0.1:{sim_port}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        wait_healthy(&http, &format!("{sim}/healthz")).await;
        let mut add = node.command(&["numbers", "add", "--tenant", "test"]);
        let status = add.args(&numbers).stdout(Stdio::null()).status().unwrap();
        assert!(status.success(), "numbers add failed");
        for n in &numbers {
            let r = http
                .post(format!("{sim}/accounts"))
                .json(&json!({ "number": n }))
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success());
        }
        Self {
            http,
            sim,
            node,
            numbers,
            _sim: sim_proc,
        }
    }

    /// Starts the node and pairs every number (the phones scan the QR codes).
    pub async fn serve(&self) -> Proc {
        let serve = self.node.start();
        self.pair_all().await;
        serve
    }

    async fn pair_all(&self) {
        let deadline = Instant::now() + Duration::from_secs(60 + self.numbers.len() as u64 / 10);
        let mut left = self.numbers.clone();
        while !left.is_empty() {
            assert!(Instant::now() < deadline, "unpaired: {left:?}");
            let mut still = Vec::new();
            for n in left {
                let r = self
                    .http
                    .post(format!("{}/accounts/{n}/pair", self.sim))
                    .send()
                    .await
                    .unwrap();
                if !r.status().is_success() {
                    still.push(n);
                }
            }
            left = still;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Replies written to WhatsApp but not settled by a node that just died: queued in the
    /// database (frozen: nothing writes for them now) and received by the network, over
    /// `numbers`. A kill may resend these with their ids, and nothing else.
    pub async fn in_flight(&self, db: &sqlx::AnyPool, numbers: &[String]) -> u64 {
        use sqlx::Row;
        let queued: std::collections::HashSet<(String, String)> =
            sqlx::query("SELECT number, message_id FROM outbox WHERE status = 'queued'")
                .fetch_all(db)
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get::<String, _>(0), r.get::<String, _>(1)))
                .collect();
        let mut count = 0;
        for n in numbers {
            count += self
                .ledger(n)
                .await
                .iter()
                .filter(|e| e["event"] == "outbound_received")
                .filter_map(|e| e["id"].as_str())
                .filter(|id| queued.contains(&(n.clone(), (*id).to_owned())))
                .count() as u64;
        }
        count
    }

    /// The referee's totals.
    pub async fn summary(&self) -> Value {
        self.get_json("/ledger/summary").await
    }

    /// Every ledger event of `number`.
    pub async fn ledger(&self, number: &str) -> Vec<Value> {
        let ledger: Value = self
            .http
            .get(format!("{}/ledger", self.sim))
            .query(&[("number", number)])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        ledger["events"].as_array().unwrap().clone()
    }

    async fn get_json(&self, path: &str) -> Value {
        self.http
            .get(format!("{}{path}", self.sim))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// POSTs to the simulator's control API, asserting success.
    pub async fn post(&self, path: &str, body: Value) -> Value {
        let r = self
            .http
            .post(format!("{}{path}", self.sim))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(
            r.status().is_success(),
            "POST {path} {body}: {}",
            r.status()
        );
        r.json().await.unwrap_or(Value::Null)
    }

    /// Waits until every message offered so far is acknowledged and answered.
    pub async fn drained(&self, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let s = self.summary().await;
            if s["inbound_unanswered"] == 0 && s["inbound_acked"] == s["inbound"] {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "not drained: {s}\nlog tail:\n{}",
                self.node.log_tail(40)
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// The node's `/readyz` status (0 if it does not answer).
    pub async fn readyz(&self) -> u16 {
        self.http
            .get(format!("{}/readyz", self.node.http))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .map_or(0, |r| r.status().as_u16())
    }

    /// The sum of every series of the node's metric `name` (0 if it has none).
    pub async fn metric(&self, name: &str) -> f64 {
        self.node.metric(&self.http, name).await
    }
}

/// Waits until `url` answers 2xx.
pub async fn wait_healthy(http: &reqwest::Client, url: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while http
        .get(url)
        .send()
        .await
        .map(|r| r.status().is_success())
        .ok()
        != Some(true)
    {
        assert!(Instant::now() < deadline, "{url} never became healthy");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
