//! Crash consistency against the real processes: `switchboard sim serve` as the network and
//! referee, `switchboard serve` as the node, on SQLite and on PostgreSQL.
//!
//! 5,000 inbound messages across 50 numbers, while the node's chaos settings crash number actors
//! and make conversations panic at random points, while one number's server acks are swallowed
//! (`no_ack`) and another's frames are 55 s late (`latency`), and while the test kills the whole
//! node with SIGKILL three times, at seeded random times, and starts it again. After the drain
//! it waits 60 s, kills and restarts the node once more and waits 60 s again.
//!
//! Then the simulator's ledger must show every inbound message answered, no second reply and no
//! repeat shown to a contact, and no send at all after the drain. A reply may be sent again with
//! the same id only if it was in flight at a kill (written to WhatsApp, not yet settled in the
//! database): the test counts those at each kill and bounds `resent_same_id` by them. Finally
//! the database holds no queued reply and no pending message.
#![allow(clippy::unwrap_used, clippy::panic)]

#[path = "support/db.rs"]
mod db;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::collections::HashSet;

use db::TestDb;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use sqlx::Row;
use switchboard::store::{Dialect, SessionCipher};

const NUMBERS: usize = 50;
const MESSAGES: usize = 5_000;
/// Offered over this long (about 1 per number per second: more than a number may send).
const OFFER_FOR: Duration = Duration::from_secs(90);
/// How many times the node is killed while messages flow, at seeded random times within the
/// first 100 s after the first message is offered.
const KILLS: usize = 3;
const KILL_SEED: u64 = 0x5eed_0011;
/// How long the test waits after the drain before (and after) the last kill.
const QUIET: Duration = Duration::from_secs(60);
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

/// The kill times, sorted.
fn kill_times() -> Vec<Duration> {
    let mut rng = SmallRng::seed_from_u64(KILL_SEED);
    let mut at: Vec<Duration> = (0..KILLS)
        .map(|_| Duration::from_millis(rng.random_range(15_000..100_000)))
        .collect();
    at.sort();
    at
}

/// Replies the node had written to WhatsApp but not settled when it died: queued in the
/// database (frozen: the node is dead) and received by the network.
async fn in_flight(
    http: &reqwest::Client,
    sim: &str,
    db: &sqlx::AnyPool,
    numbers: &[String],
) -> u64 {
    let queued: HashSet<(String, String)> =
        sqlx::query("SELECT number, message_id FROM outbox WHERE status = 'queued'")
            .fetch_all(db)
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get::<String, _>(0), r.get::<String, _>(1)))
            .collect();
    let mut count = 0;
    for n in numbers {
        let ledger: Value = http
            .get(format!("{sim}/ledger"))
            .query(&[("number", n)])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let received: HashSet<&str> = ledger["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["event"] == "outbound_received")
            .filter_map(|e| e["id"].as_str())
            .collect();
        count += received
            .iter()
            .filter(|id| queued.contains(&(n.clone(), (**id).to_owned())))
            .count() as u64;
    }
    count
}

async fn count(db: &sqlx::AnyPool, sql: &str) -> i64 {
    sqlx::query(sql)
        .fetch_one(db)
        .await
        .unwrap()
        .get::<i64, _>(0)
}

async fn fault(http: &reqwest::Client, sim: &str, body: Value) {
    let r = http
        .post(format!("{sim}/faults"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "fault {body}");
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
    sqlx::any::install_default_drivers();
    let db = sqlx::AnyPool::connect(&database.url).await.unwrap();

    let kill_at = kill_times();
    let started = Instant::now();
    let mut kills = kill_at.iter().peekable();
    let mut in_flight_at_kills = 0;
    let mut faults = [
        (
            Duration::from_secs(20),
            json!({"kind": "no_ack", "number": numbers[1], "duration_s": 20}),
        ),
        (
            Duration::from_secs(30),
            json!({"kind": "latency", "number": numbers[2], "ms": 55_000, "duration_s": 30}),
        ),
    ]
    .into_iter()
    .peekable();
    for i in 0..MESSAGES {
        let due = OFFER_FOR.mul_f64(i as f64 / MESSAGES as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        if kills.peek().is_some_and(|k| started.elapsed() >= **k) {
            kills.next();
            node.kill(&mut serve);
            in_flight_at_kills += in_flight(&http, &sim_url, &db, &numbers).await;
            serve = node.start();
        }
        if faults
            .peek()
            .is_some_and(|(at, _)| started.elapsed() >= *at)
        {
            let (_, body) = faults.next().unwrap();
            fault(&http, &sim_url, body).await;
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
        in_flight_at_kills += in_flight(&http, &sim_url, &db, &numbers).await;
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
    // Quiet: nothing is owed, so a kill now must change nothing the contacts see.
    tokio::time::sleep(QUIET).await;
    let before = summary(&http, &sim_url).await;
    node.kill(&mut serve);
    let in_flight_quiet = in_flight(&http, &sim_url, &db, &numbers).await;
    let serve = node.start();
    tokio::time::sleep(QUIET).await;
    let after = summary(&http, &sim_url).await;
    let queued = count(&db, "SELECT COUNT(*) FROM outbox WHERE status = 'queued'").await;
    let pending = count(&db, "SELECT COUNT(*) FROM inbound WHERE status = 'pending'").await;
    drop(serve);
    println!(
        "{} ledger at the drain: {totals}\nafter the quiet kill: {after}\nin flight at the kills: \
         {in_flight_at_kills}",
        dialect.as_str()
    );
    assert_eq!(totals["inbound"], MESSAGES);
    for s in [&totals, &after] {
        assert_eq!(s["inbound_unanswered"], 0, "{s}");
        assert_eq!(s["duplicate_replies"], 0, "{s}");
        assert_eq!(s["shown_twice"], 0, "{s}");
        assert_eq!(s["outbound"], MESSAGES, "one reply per message: {s}");
    }
    assert_eq!(
        in_flight_quiet, 0,
        "nothing in flight after the quiet minute"
    );
    assert_eq!(
        after["outbound"], before["outbound"],
        "no send after the drain"
    );
    assert_eq!(after["resent_same_id"], before["resent_same_id"], "{after}");
    let resent = after["resent_same_id"].as_u64().unwrap();
    assert!(
        resent <= in_flight_at_kills,
        "{resent} resends, {in_flight_at_kills} sends in flight at the kills"
    );
    assert_eq!(
        (queued, pending),
        (0, 0),
        "the database has settled everything"
    );
    // The kills happened: every number connected once per node start at least.
    let connections = after["connections"].as_u64().unwrap();
    assert!(connections >= (NUMBERS * (2 + KILLS)) as u64, "{after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_answered_exactly_once_through_kills_on_sqlite() {
    crash_consistency(Dialect::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_answered_exactly_once_through_kills_on_postgres() {
    crash_consistency(Dialect::Postgres).await;
}
