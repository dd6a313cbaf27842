//! Store outages under steady traffic, against the real processes: 20 numbers, scripted contacts
//! writing all along, and the node's store made unavailable for a while in the middle:
//! - SQLite: another process holds the database's write lock for 60 s;
//! - PostgreSQL stopped for 30 s (the node reaches it through a proxy the test switches off:
//!   connections refused, open ones cut — what the node sees of a stopped server);
//! - PostgreSQL read-only for 30 s (`default_transaction_read_only`, its sessions restarted).
//!
//! In each: nothing is dead-lettered or given up, no restart budget is spent, `/readyz` answers
//! 503 during the outage and 200 after, every message is answered once the store is back, and
//! the node's memory stays bounded.
#![allow(clippy::unwrap_used, clippy::panic)]

#[path = "support/db.rs"]
mod db;
#[path = "support/fleet.rs"]
mod fleet;
#[path = "support/proxy.rs"]
mod proxy;

use std::future::Future;
use std::time::{Duration, Instant};

use db::TestDb;
use fleet::Rig;
use serde_json::json;
use sqlx::{Connection, Row};
use switchboard::store::Dialect;

const NUMBERS: usize = 20;
/// Messages per second over all numbers (half of what they may send).
const RATE: f64 = 10.0;
/// Traffic before the outage begins, and after it ends.
const AROUND: Duration = Duration::from_secs(20);
/// Memory the node may grow by over its level before the outage.
const RSS_SLACK: u64 = 96 << 20;

fn number(i: usize) -> String {
    format!("+1555300{i:04}")
}

/// What the node did around the outage.
struct Observed {
    ready_during: Vec<u16>,
    ready_after: u16,
    rss_before: u64,
    rss_max: u64,
}

/// Runs traffic on a fresh node on `store_url`, with `outage` (which returns when the store is
/// back, after about `lasts`) in the middle, and checks what the issue asks.
async fn outage_under_traffic<F, Fut>(
    case: &str,
    db: &TestDb,
    store_url: &str,
    lasts: Duration,
    outage: F,
) where
    F: FnOnce() -> Fut,
    Fut: Future<Output = ()>,
{
    let numbers: Vec<String> = (0..NUMBERS).map(number).collect();
    let rig = Rig::new(store_url, numbers, &[]).await;
    let serve = rig.serve().await;
    // Every number online before the traffic starts.
    let deadline = Instant::now() + Duration::from_secs(60);
    while rig.metric("switchboard_numbers{state=\"online\"}").await < NUMBERS as f64 {
        assert!(Instant::now() < deadline, "numbers not online");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let traffic = (AROUND * 2 + lasts).as_secs_f64();
    rig.post(
        "/traffic",
        json!({"numbers": "all", "contacts_per_number": 5, "rate_per_s": RATE,
               "duration_s": traffic, "seed": 11}),
    )
    .await;
    tokio::time::sleep(AROUND).await;
    let mut seen = Observed {
        ready_during: Vec::new(),
        ready_after: 0,
        rss_before: serve.rss_bytes(),
        rss_max: 0,
    };

    // The outage, watched: readiness and memory every half second while it lasts.
    let began = Instant::now();
    let watch = async {
        loop {
            seen.ready_during.push(rig.readyz().await);
            seen.rss_max = seen.rss_max.max(serve.rss_bytes());
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    tokio::select! {
        () = outage() => {}
        () = watch => unreachable!(),
    }
    let lasted = began.elapsed();
    tokio::time::sleep(AROUND + Duration::from_secs(1)).await;
    // The traffic is over: every message offered is answered, and every reply settled.
    let s = rig.drained(Duration::from_secs(240)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    seen.rss_max = seen.rss_max.max(serve.rss_bytes());
    seen.ready_after = rig.readyz().await;

    let dead = count(db, "SELECT COUNT(*) FROM inbound WHERE status = 'dead'").await;
    let failed = count(db, "SELECT COUNT(*) FROM outbox WHERE status <> 'sent'").await;
    let restarts = rig.metric("switchboard_actor_restarts_total").await;
    let parked = rig.metric("switchboard_actor_parked_total").await;
    let store_up = rig.metric("switchboard_store_up").await;
    let not_ready = seen.ready_during.iter().filter(|s| **s == 503).count();
    println!(
        "{case}: outage {lasted:?}; ledger {s}; readyz 503 on {not_ready} of {} looks; RSS \
         {} MiB before, {} MiB at most; dead {dead}, unsettled {failed}, restarts {restarts}, \
         parked {parked}",
        seen.ready_during.len(),
        seen.rss_before >> 20,
        seen.rss_max >> 20,
    );
    assert_eq!(dead, 0, "no dead letter");
    assert_eq!(failed, 0, "every reply sent, none given up");
    assert_eq!(restarts, 0.0, "no restart budget spent");
    assert_eq!(parked, 0.0, "nothing parked");
    assert_eq!(s["duplicate_replies"], 0, "{s}");
    assert_eq!(s["shown_twice"], 0, "{s}");
    assert!(
        not_ready * 2 >= seen.ready_during.len(),
        "/readyz said 503 for most of the outage: {:?}",
        seen.ready_during
    );
    assert_eq!(seen.ready_after, 200, "ready again");
    assert_eq!(store_up, 1.0);
    assert!(
        seen.rss_max <= seen.rss_before + RSS_SLACK,
        "RSS grew from {} to {} bytes",
        seen.rss_before,
        seen.rss_max
    );
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&db.url).await.unwrap();
    sqlx::query(sql)
        .fetch_one(&mut conn)
        .await
        .unwrap()
        .get::<i64, _>(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_write_lock_held_for_60_s() {
    let db = TestDb::new(Dialect::Sqlite).await;
    let url = db.url.clone();
    let lasts = Duration::from_secs(60);
    outage_under_traffic("sqlite locked", &db, &db.url, lasts, || async move {
        let mut other = sqlx::SqliteConnection::connect(&url).await.unwrap();
        sqlx::query("BEGIN EXCLUSIVE")
            .execute(&mut other)
            .await
            .unwrap();
        tokio::time::sleep(lasts).await;
        sqlx::query("COMMIT").execute(&mut other).await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_for_30_s() {
    let db = TestDb::new(Dialect::Postgres).await;
    let proxy = proxy::Proxy::start(&db.pg_server()).await;
    let url = db.via(proxy.port);
    let lasts = Duration::from_secs(30);
    outage_under_traffic("postgres stopped", &db, &url, lasts, || async {
        proxy.stop();
        tokio::time::sleep(lasts).await;
        proxy.resume().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_read_only_for_30_s() {
    let db = TestDb::new(Dialect::Postgres).await;
    let name = db.pg_name().unwrap().to_owned();
    let admin = db::admin_url();
    let lasts = Duration::from_secs(30);
    outage_under_traffic("postgres read-only", &db, &db.url, lasts, || async move {
        let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
        read_only(&mut conn, &name, true).await;
        tokio::time::sleep(lasts).await;
        read_only(&mut conn, &name, false).await;
    })
    .await;
}

/// Makes database `name` read-only (or writable again) for every session: new sessions take the
/// setting, and the open ones are ended so that the node's pool opens new ones.
async fn read_only(conn: &mut sqlx::PgConnection, name: &str, on: bool) {
    let value = if on { "on" } else { "off" };
    sqlx::query(&format!(
        "ALTER DATABASE {name} SET default_transaction_read_only = {value}"
    ))
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(name)
    .execute(&mut *conn)
    .await
    .unwrap();
}
