//! Crash consistency against the real processes: `switchboard sim serve` as the network and
//! referee, `switchboard serve` as the node, on SQLite and on PostgreSQL.
//!
//! 5,000 inbound messages across 50 numbers, while the node's chaos settings crash number actors
//! and make conversations panic at random points, and while the test kills the whole node with
//! SIGKILL three times and starts it again. Afterwards the simulator's ledger must show every
//! inbound message answered exactly once.
#![allow(clippy::unwrap_used, clippy::panic)]

#[path = "support/db.rs"]
mod db;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use db::TestDb;
use serde_json::{Value, json};
use switchboard::store::{Dialect, SessionCipher};

const NUMBERS: usize = 50;
const MESSAGES: usize = 5_000;
/// Offered over this long (about 1 per number per second: more than a number may send).
const OFFER_FOR: Duration = Duration::from_secs(90);
/// When the node is killed, counted from the first message offered.
const KILLS: [Duration; 3] = [
    Duration::from_secs(25),
    Duration::from_secs(60),
    Duration::from_secs(100),
];
/// How long the backlog may take to drain after the last message is offered.
const DRAIN: Duration = Duration::from_secs(300);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn number(i: usize) -> String {
    format!("+1555200{i:04}")
}

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Node {
    env: Vec<(String, String)>,
    dir: tempfile::TempDir,
}

impl Node {
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
        cmd.args(args)
            .current_dir(self.dir.path())
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", "warn,switchboard::panic=off");
        cmd
    }

    fn start(&self) -> Proc {
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

    fn kill(&self, node: &mut Proc) {
        // SIGKILL: no shutdown sequence, no flush.
        node.0.kill().unwrap();
        node.0.wait().unwrap();
    }
}

async fn wait_healthy(http: &reqwest::Client, url: &str) {
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

async fn summary(http: &reqwest::Client, sim: &str) -> Value {
    http.get(format!("{sim}/ledger/summary"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Pairs every account once its node shows a QR code (the phones scan it).
async fn pair_all(http: &reqwest::Client, sim: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut left: Vec<String> = (0..NUMBERS).map(number).collect();
    while !left.is_empty() {
        assert!(Instant::now() < deadline, "unpaired: {left:?}");
        let mut still = Vec::new();
        for n in left {
            let r = http
                .post(format!("{sim}/accounts/{n}/pair"))
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

async fn crash_consistency(dialect: Dialect) {
    let database = TestDb::new(dialect).await;
    let http = reqwest::Client::new();
    let sim_port = free_port();
    let sim_url = format!("http://127.0.0.1:{sim_port}");
    let node = Node {
        env: vec![
            ("SWITCHBOARD__STORE__URL".into(), database.url.clone()),
            (
                "SWITCHBOARD__STORE__SESSION_KEYS".into(),
                SessionCipher::generate("crash"),
            ),
            ("SWITCHBOARD__TRANSPORT__SIM_URL".into(), sim_url.clone()),
            (
                "SWITCHBOARD__HTTP__LISTEN".into(),
                format!("127.0.0.1:{}", free_port()),
            ),
            ("SWITCHBOARD__RUNTIME__TYPING_PER_CHAR".into(), "0ms".into()),
            ("SWITCHBOARD__CHAOS__PANIC_EVERY".into(), "97".into()),
            (
                "SWITCHBOARD__CHAOS__CRASH_NUMBER_EVERY".into(),
                "1500ms".into(),
            ),
        ],
        dir: tempfile::tempdir().unwrap(),
    };
    let _sim = Proc(
        node.command(&["sim", "serve", "--listen", &format!("127.0.0.1:{sim_port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_healthy(&http, &format!("{sim_url}/healthz")).await;
    let numbers: Vec<String> = (0..NUMBERS).map(number).collect();
    let mut add = node.command(&["numbers", "add", "--tenant", "crash"]);
    let status = add.args(&numbers).stdout(Stdio::null()).status().unwrap();
    assert!(status.success(), "numbers add failed");
    for n in &numbers {
        let r = http
            .post(format!("{sim_url}/accounts"))
            .json(&json!({ "number": n }))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }

    let mut serve = node.start();
    pair_all(&http, &sim_url).await;

    let started = Instant::now();
    let mut kills = KILLS.iter().peekable();
    for i in 0..MESSAGES {
        let due = OFFER_FOR.mul_f64(i as f64 / MESSAGES as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        if kills.peek().is_some_and(|k| started.elapsed() >= **k) {
            kills.next();
            node.kill(&mut serve);
            serve = node.start();
        }
        let to = &numbers[i % NUMBERS];
        let from = format!("+4915{:07}", i % 997);
        let r = http
            .post(format!("{sim_url}/accounts/{to}/inbound"))
            .json(&json!({ "from": from, "text": format!("message {i}: hello there") }))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "inbound {i}: {}", r.status());
    }
    for kill in kills {
        if let Some(wait) = kill.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        node.kill(&mut serve);
        serve = node.start();
    }

    let deadline = Instant::now() + DRAIN;
    let totals = loop {
        let s = summary(&http, &sim_url).await;
        if s["inbound_unanswered"] == 0 && s["inbound_acked"] == MESSAGES {
            break s;
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(node.dir.path().join("serve.log")).unwrap();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            panic!("not drained: {s}\nlog tail:\n{}", tail.join("\n"));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    drop(serve);
    println!("{} ledger: {totals}", dialect.as_str());
    assert_eq!(totals["inbound"], MESSAGES);
    assert_eq!(totals["inbound_unanswered"], 0, "{totals}");
    assert_eq!(totals["duplicate_replies"], 0, "{totals}");
    assert_eq!(totals["duplicate_outbound_ids"], 0, "{totals}");
    assert_eq!(
        totals["outbound"], MESSAGES,
        "one reply per message: {totals}"
    );
    // The kills happened: every number connected once per node start at least.
    let connections = totals["connections"].as_u64().unwrap();
    assert!(
        connections >= (NUMBERS * (1 + KILLS.len())) as u64,
        "{totals}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_answered_exactly_once_through_kills_on_sqlite() {
    crash_consistency(Dialect::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_answered_exactly_once_through_kills_on_postgres() {
    crash_consistency(Dialect::Postgres).await;
}
