//! Leases on a real Redis (`REDIS_URL`, by default `redis://127.0.0.1:6379`): each test
//! has a key prefix of its own. Lease expiry is Redis's clock, so these tests run in real time,
//! with short TTLs.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use fred::prelude::*;
use switchboard::cluster::{self, AdmissionRates, Keys, RedisLeases, TokenFloor};
use switchboard_actors::PhoneNumber;
use switchboard_actors::coordinator::{Coordinator, CoordinatorError, FenceLoss};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Admission generous enough not to pace these tests.
const RATES: AdmissionRates = AdmissionRates {
    node_per_second: 1000.0,
    node_burst: 1000,
    cluster_per_second: 1000.0,
    cluster_burst: 1000,
};

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn prefix(test: &str) -> String {
    format!(
        "sbtest-{test}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    )
}

fn phone(n: &str) -> PhoneNumber {
    PhoneNumber::parse(n).unwrap()
}

/// The store's highest token, as a test sets it.
#[derive(Default)]
struct Floor(AtomicU64);

#[async_trait]
impl TokenFloor for Floor {
    async fn floor(&self, _: &PhoneNumber) -> Result<u64, CoordinatorError> {
        Ok(self.0.load(Ordering::Relaxed))
    }
}

struct Cluster {
    admin: Client,
    keys: Keys,
    prefix: String,
}

impl Cluster {
    /// A cluster whose Redis already holds its data (its epoch is set: no quiet period).
    async fn established(test: &str) -> Self {
        let c = Self::fresh(test).await;
        let _: () = c
            .admin
            .set(c.keys.epoch(), "1", None, None, false)
            .await
            .unwrap();
        c
    }

    async fn fresh(test: &str) -> Self {
        let admin = cluster::client(&redis_url(), Duration::from_secs(2)).unwrap();
        admin.wait_for_connect().await.unwrap();
        let prefix = prefix(test);
        Self {
            keys: Keys::new(&prefix),
            admin,
            prefix,
        }
    }

    fn node(&self, owner: &str, ttl: Duration, floor: Arc<Floor>) -> Arc<RedisLeases> {
        self.node_at(&redis_url(), owner, ttl, floor)
    }

    fn node_at(
        &self,
        url: &str,
        owner: &str,
        ttl: Duration,
        floor: Arc<Floor>,
    ) -> Arc<RedisLeases> {
        let client = cluster::client(url, ttl / 3).unwrap();
        RedisLeases::new(
            client,
            Keys::new(&self.prefix),
            owner.into(),
            ttl,
            floor,
            RATES,
        )
    }

    async fn pttl(&self, key: String) -> i64 {
        self.admin.pttl(key).await.unwrap()
    }

    /// What a Redis restarted without persistence holds of the cluster: nothing.
    async fn lose_everything(&self) {
        let keys: Vec<String> = self
            .admin
            .custom(fred::cmd!("KEYS"), vec![format!("{{{}}}:*", self.prefix)])
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: i64 = self.admin.del(keys).await.unwrap();
        }
    }
}

#[tokio::test]
async fn a_lease_is_reentrant_exclusive_and_after_release_taken_with_a_higher_token() {
    let c = Cluster::established("exclusive").await;
    let n = phone("+15550101");
    let floor = Arc::new(Floor::default());
    let (a, b) = (
        c.node("a|1", Duration::from_secs(5), floor.clone()),
        c.node("b|1", Duration::from_secs(5), floor.clone()),
    );
    let first = a.acquire(&n).await.unwrap();
    let again = a.acquire(&n).await.unwrap();
    assert_eq!(
        first.token(),
        again.token(),
        "re-entrant for the same owner"
    );
    match b.acquire(&n).await {
        Err(CoordinatorError::Held { owner, .. }) => assert_eq!(owner, "a"),
        other => panic!("expected held by a, got {other:?}"),
    }
    a.release(&first).await;
    assert!(!first.is_live());
    let second = b.acquire(&n).await.unwrap();
    assert!(second.token() > first.token());
    // A release that is no longer the owner's leaves the new owner's lease alone.
    a.release(&first).await;
    assert!(c.pttl(c.keys.lease(&n)).await > 0);

    // Tokens stay above what the store has seen, even if Redis's counter is behind it.
    let m = phone("+15550102");
    floor.0.store(100, Ordering::Relaxed);
    assert_eq!(a.acquire(&m).await.unwrap().token().get(), 101);
}

#[tokio::test]
async fn renewals_keep_a_lease_past_its_ttl_and_a_lease_taken_over_is_revoked_at_the_next_one() {
    let c = Cluster::established("renew").await;
    let n = phone("+15550111");
    let ttl = Duration::from_millis(900);
    let a = c.node("a|1", ttl, Arc::default());
    let stop = CancellationToken::new();
    let task = a.spawn(stop.clone());
    let lease = a.acquire(&n).await.unwrap();
    tokio::time::sleep(ttl * 3).await;
    assert!(lease.is_live(), "renewed");
    assert!(c.pttl(c.keys.lease(&n)).await > 0, "still held in Redis");

    // Someone else holds it now (as after an expiry and a takeover).
    let _: () = c
        .admin
        .set(
            c.keys.lease(&n),
            "b|99",
            Some(Expiration::PX(10_000)),
            None,
            false,
        )
        .await
        .unwrap();
    let t0 = Instant::now();
    let loss = tokio::time::timeout(ttl, lease.revoked()).await.unwrap();
    assert_eq!(loss, FenceLoss::RenewRefused);
    assert!(t0.elapsed() <= ttl / 3 + Duration::from_millis(200));
    assert_eq!(a.held_count(), 0);
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn the_watchdog_revokes_a_lease_before_it_expires_when_redis_is_unreachable() {
    let c = Cluster::established("watchdog").await;
    let n = phone("+15550121");
    let ttl = Duration::from_secs(3);
    let proxy = Proxy::start("127.0.0.1:6379").await;
    let a = c.node_at(&proxy.url(), "a|1", ttl, Arc::default());
    let stop = CancellationToken::new();
    let task = a.spawn(stop.clone());
    let lease = a.acquire(&n).await.unwrap();
    tokio::time::sleep(ttl).await;
    assert!(lease.is_live());

    proxy.cut();
    let cut = Instant::now();
    let loss = tokio::time::timeout(ttl * 2, lease.revoked())
        .await
        .unwrap();
    let revoked_after = cut.elapsed();
    assert_eq!(loss, FenceLoss::Expired);
    // Revoked here while Redis still holds the lease: nobody else can have it yet.
    let left = c.pttl(c.keys.lease(&n)).await;
    assert!(
        left > 0,
        "revoked {revoked_after:?} after the cut, {left} ms before expiry"
    );
    assert!(revoked_after <= ttl.mul_f64(0.9) + Duration::from_millis(100));
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn after_redis_loses_its_data_no_lease_is_handed_out_until_the_old_owners_renewed() {
    let c = Cluster::established("lost").await;
    let n = phone("+15550131");
    let ttl = Duration::from_millis(1200);
    let (a, b) = (
        c.node("a|1", ttl, Arc::default()),
        c.node("b|1", ttl, Arc::default()),
    );
    let stop = CancellationToken::new();
    let task = a.spawn(stop.clone());
    let lease = a.acquire(&n).await.unwrap();

    c.lose_everything().await;
    // Before a's next renewal, b finds Redis empty: it must not take the number.
    match b.acquire(&n).await {
        Err(e @ CoordinatorError::Unavailable(_)) => assert!(e.is_outage()),
        other => panic!("expected the quiet period, got {other:?}"),
    }
    // a's renewal re-creates its lease during the quiet period…
    tokio::time::sleep(ttl / 3 + Duration::from_millis(200)).await;
    assert!(lease.is_live());
    assert!(c.pttl(c.keys.lease(&n)).await > 0);
    // …and after it, b still finds it held by a, and a's token is the counter's floor.
    tokio::time::sleep(ttl).await;
    assert!(matches!(
        b.acquire(&n).await,
        Err(CoordinatorError::Held { .. })
    ));
    let counter: u64 = c.admin.get(c.keys.token(&n)).await.unwrap();
    assert!(counter >= lease.token().get());
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn a_fresh_cluster_waits_one_ttl_before_its_first_lease() {
    let c = Cluster::fresh("fresh").await;
    let ttl = Duration::from_millis(800);
    let a = c.node("a|1", ttl, Arc::default());
    let n = phone("+15550141");
    let t0 = Instant::now();
    let lease = loop {
        match a.acquire(&n).await {
            Ok(lease) => break lease,
            Err(e) if e.is_outage() => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => panic!("{e}"),
        }
    };
    assert!(t0.elapsed() >= ttl - Duration::from_millis(100));
    assert!(lease.is_live());
}

/// A TCP proxy to Redis that can be cut: every connection dropped, new ones refused.
struct Proxy {
    addr: std::net::SocketAddr,
    cut: CancellationToken,
}

impl Proxy {
    async fn start(upstream: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = CancellationToken::new();
        let accepting = cut.clone();
        tokio::spawn(async move {
            loop {
                let (mut client, _) = tokio::select! {
                    () = accepting.cancelled() => return,
                    accepted = listener.accept() => accepted.unwrap(),
                };
                let conn_cut = accepting.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        () = conn_cut.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    }
                });
            }
        });
        Self { addr, cut }
    }

    fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    fn cut(&self) {
        self.cut.cancel();
    }
}
