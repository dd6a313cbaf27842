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
#[path = "support/fleet.rs"]
mod fleet;

use std::time::{Duration, Instant};

use db::TestDb;
use fleet::Rig;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use sqlx::Row;
use switchboard::store::Dialect;

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

fn number(i: usize) -> String {
    format!("+1555200{i:04}")
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

async fn count(db: &sqlx::AnyPool, sql: &str) -> i64 {
    sqlx::query(sql)
        .fetch_one(db)
        .await
        .unwrap()
        .get::<i64, _>(0)
}

async fn crash_consistency(dialect: Dialect) {
    let database = TestDb::new(dialect).await;
    let numbers: Vec<String> = (0..NUMBERS).map(number).collect();
    let chaos = [
        ("SWITCHBOARD__CHAOS__PANIC_EVERY", "97"),
        ("SWITCHBOARD__CHAOS__CRASH_NUMBER_EVERY", "1500ms"),
    ];
    let rig = Rig::new(&database.url, numbers.clone(), &chaos).await;
    let node = &rig.node;
    let mut serve = rig.serve().await;
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
            in_flight_at_kills += rig.in_flight(&db, &rig.numbers).await;
            serve = node.start();
        }
        if faults
            .peek()
            .is_some_and(|(at, _)| started.elapsed() >= *at)
        {
            let (_, body) = faults.next().unwrap();
            rig.post("/faults", body).await;
        }
        let to = &numbers[i % NUMBERS];
        let from = format!("+4915{:07}", i % 997);
        let text = format!("message {i}: hello there");
        rig.post(
            &format!("/accounts/{to}/inbound"),
            json!({ "from": from, "text": text }),
        )
        .await;
    }
    for kill in kills {
        if let Some(wait) = kill.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        node.kill(&mut serve);
        in_flight_at_kills += rig.in_flight(&db, &rig.numbers).await;
        serve = node.start();
    }

    let totals = rig.drained(DRAIN).await;
    // Quiet: nothing is owed, so a kill now must change nothing the contacts see.
    tokio::time::sleep(QUIET).await;
    let before = rig.summary().await;
    node.kill(&mut serve);
    let in_flight_quiet = rig.in_flight(&db, &rig.numbers).await;
    let serve = node.start();
    tokio::time::sleep(QUIET).await;
    let after = rig.summary().await;
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
