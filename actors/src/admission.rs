//! Admission control of connects, so that a cold start or a failover of hundreds of numbers
//! never storms WhatsApp: every number's first connect takes a token from this node's bucket
//! ([`NodeAdmission`]) and, in a cluster, from the cluster's (the coordinator's, in Redis).
//!
//! [`TokenBucket`] is the bookkeeping, pure with time as an argument; placement paces its moves
//! with the same bucket.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::telemetry::{ADMISSION_WAIT, ADMISSION_WAITING};

/// A token bucket: `burst` tokens at most, refilled at `per_second`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    per_second: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn new(per_second: f64, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            per_second: per_second.max(0.0),
            burst,
            tokens: burst,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at);
        self.at = now;
        self.tokens = (self.tokens + elapsed.as_secs_f64() * self.per_second).min(self.burst);
    }

    /// Takes one token if there is one at `now`.
    pub fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// How long from `now` until a token is there (zero if one is, or if it never refills).
    pub fn wait(&self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        let tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        if tokens >= 1.0 || self.per_second <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - tokens) / self.per_second)
        }
    }
}

/// This node's admission: connects wait their turn, first come first served.
#[derive(Debug)]
pub struct NodeAdmission {
    bucket: Mutex<TokenBucket>,
    waiting: AtomicI64,
}

impl NodeAdmission {
    /// Admits `per_second` connects, `burst` back to back.
    pub fn new(per_second: f64, burst: u32) -> Self {
        Self {
            bucket: Mutex::new(TokenBucket::new(per_second, burst, Instant::now())),
            waiting: AtomicI64::new(0),
        }
    }

    /// Waits for this node's turn to connect.
    pub async fn admit(&self) {
        let started = Instant::now();
        let waiting = self.waiting.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::gauge!(ADMISSION_WAITING).set(waiting as f64);
        loop {
            let wait = {
                let mut bucket = self
                    .bucket
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let now = Instant::now();
                if bucket.take(now) {
                    break;
                }
                bucket.wait(now).max(Duration::from_millis(1))
            };
            tokio::time::sleep(wait).await;
        }
        let waiting = self.waiting.fetch_sub(1, Ordering::Relaxed) - 1;
        metrics::gauge!(ADMISSION_WAITING).set(waiting as f64);
        metrics::histogram!(ADMISSION_WAIT).record(started.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(2.0, 3, t0);
        assert!((0..3).all(|_| b.take(t0)));
        assert!(!b.take(t0));
        assert_eq!(b.wait(t0), Duration::from_millis(500));
        let t1 = t0 + Duration::from_millis(500);
        assert!(b.take(t1));
        assert!(!b.take(t1));
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!(
            (0..10).filter(|_| b.take(t2)).count(),
            3,
            "refills to the burst only"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn connects_are_admitted_at_the_rate_after_the_burst() {
        let admission = std::sync::Arc::new(NodeAdmission::new(10.0, 5));
        let t0 = Instant::now();
        let tasks: Vec<_> = (0..25)
            .map(|_| {
                let a = admission.clone();
                tokio::spawn(async move {
                    a.admit().await;
                    Instant::now()
                })
            })
            .collect();
        let mut at = Vec::new();
        for t in tasks {
            at.push(t.await.expect("admitted"));
        }
        at.sort();
        // 5 at once, then 20 more at 10 per second: the last after about 2 s.
        assert_eq!(at.iter().filter(|t| **t == t0).count(), 5);
        let last = at[24].duration_since(t0);
        assert!(
            last >= Duration::from_millis(1990) && last <= Duration::from_millis(2100),
            "{last:?}"
        );
    }
}
