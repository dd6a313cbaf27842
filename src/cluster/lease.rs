//! Leases on Redis: the [`Coordinator`] of a clustered node.
//!
//! Keys, all under the cluster's prefix in one hash slot (`{prefix}:…`):
//! - `lease:<number>` = `<owner>|<token>`, with the TTL as its expiry;
//! - `token:<number>`: the number's fencing counter (`INCR`);
//! - `epoch`: present while Redis holds the cluster's data; `quiet`: set for one TTL when a
//!   node finds `epoch` missing (a Redis restarted without persistence lost every lease);
//! - `shadow:<number>`: the lease's value again, expiring `SHADOW_TTLS` × TTL after the lease
//!   does (renewed with it, deleted with a release): a new owner that finds it knows the lease
//!   ran out unreleased, and when, and records the failover time
//!   (`switchboard_lease_failover_seconds`).
//!
//! Three Lua scripts, each idempotent under fred's replay of a command after a reconnect:
//! - acquire: the number's lease for `owner`, re-entrant (the same owner gets its lease back,
//!   extended); otherwise `SET PX` with a token from `INCR`, raised above the store's highest
//!   token for the number (a Redis that lost its counters never issues a stale token; the
//!   store is asked only when the number is free: a first call answers "free" without taking it);
//!   refused during `quiet`, so that no lease is handed out before every owner from before the
//!   loss has either renewed it or been revoked by its own watchdog;
//! - renew: extends each of the owner's leases; during `quiet` a missing lease is re-created
//!   for the owner and token that held it; any other missing or foreign lease is lost;
//! - release: deletes the lease if it is still the owner's with that token, and publishes the
//!   number on the `released` channel so that its next owner takes it at once.
//!
//! A fourth script is the cluster's token bucket for connects (admission control), on Redis's
//! clock: a node first waits for its own bucket, then takes one of the cluster's.
//!
//! Renewal runs every TTL/3, one script call for all of the node's leases. A watchdog with no
//! Redis I/O revokes a lease at `last renew sent + 0.9 × TTL`: however Redis or the network
//! behaves, this process stops writing and sending for a number before the lease can expire.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use fred::prelude::*;
use fred::types::scripts::Script;
use switchboard_actors::PhoneNumber;
use switchboard_actors::admission::NodeAdmission;
use switchboard_actors::coordinator::{Coordinator, CoordinatorError, FenceLoss, Lease};
use switchboard_actors::store::{Fence, FencingToken};
use switchboard_actors::telemetry::ADMISSION_WAIT;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Keys;
use super::metrics::{FAILOVER_SECONDS, LEASES_ACQUIRED, LEASES_HELD, RENEW_SECONDS};

const ACQUIRE: &str = r#"
-- KEYS: lease, token, epoch, quiet, shadow. ARGV: owner, ttl_ms, floor ('-': not fetched
-- yet), shadow_ms. Answers {token or code, detail, ms since the previous owner's lease
-- expired unreleased (-1: it was released, or never held)}.
if redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('SET', KEYS[3], '1')
  redis.call('SET', KEYS[4], '1', 'PX', ARGV[2])
end
local quiet = redis.call('PTTL', KEYS[4])
if quiet > 0 then return {-1, tostring(quiet), -1} end
local held = redis.call('GET', KEYS[1])
if held then
  local sep = string.find(held, '|', 1, true)
  if string.sub(held, 1, sep - 1) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    redis.call('PEXPIRE', KEYS[5], ARGV[2] + ARGV[4])
    return {tonumber(string.sub(held, sep + 1)), '', -1}
  end
  return {0, held, -1}
end
if ARGV[3] == '-' then return {-2, '', -1} end
local token = redis.call('INCR', KEYS[2])
local floor = tonumber(ARGV[3])
if token <= floor then
  token = floor + 1
  redis.call('SET', KEYS[2], token)
end
-- The shadow outlives its lease by shadow_ms: still there, it says when the lease expired.
local since = -1
local left = redis.call('PTTL', KEYS[5])
if left > 0 then since = tonumber(ARGV[4]) - left end
local mine = ARGV[1] .. '|' .. token
redis.call('SET', KEYS[1], mine, 'PX', ARGV[2])
redis.call('SET', KEYS[5], mine, 'PX', ARGV[2] + ARGV[4])
return {token, '', since}
"#;

const RENEW: &str = r#"
-- KEYS: epoch, quiet, then (lease, token, shadow) per number. ARGV: owner, ttl_ms,
-- shadow_ms, then a token per number.
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SET', KEYS[1], '1')
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
end
local quiet = redis.call('PTTL', KEYS[2]) > 0
local shadow_px = ARGV[2] + ARGV[3]
local kept = {}
for i = 3, #KEYS, 3 do
  local mine = ARGV[1] .. '|' .. ARGV[(i - 3) / 3 + 4]
  local held = redis.call('GET', KEYS[i])
  if held == mine then
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
    redis.call('SET', KEYS[i + 2], mine, 'PX', shadow_px)
    kept[#kept + 1] = 1
  elseif (not held) and quiet then
    redis.call('SET', KEYS[i], mine, 'PX', ARGV[2])
    redis.call('SET', KEYS[i + 2], mine, 'PX', shadow_px)
    local token = tonumber(ARGV[(i - 3) / 3 + 4])
    if tonumber(redis.call('GET', KEYS[i + 1]) or '0') < token then
      redis.call('SET', KEYS[i + 1], token)
    end
    kept[#kept + 1] = 1
  else
    kept[#kept + 1] = 0
  end
end
return kept
"#;

const RELEASE: &str = r#"
-- KEYS: lease, shadow. ARGV: owner|token, the channel releases are published on, the number.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
"#;

const ADMIT: &str = r#"
-- KEYS: the cluster's connect bucket. ARGV: per_second, burst.
-- Answers 0 (admitted) or how many ms until a token is there.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(b[1]) or burst, tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate / 1000)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = math.ceil((1 - tokens) * 1000 / rate) end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', now)
redis.call('PEXPIRE', KEYS[1], 600000)
return wait
"#;

/// How many TTLs a lease's shadow outlives it: failovers slower than that are not timed.
const SHADOW_TTLS: u32 = 10;

/// Numbers renewed per script call (a call's keys stay in one slot; this bounds its run time).
const RENEW_CHUNK: usize = 500;

/// Where the acquire script reads the store's highest token of a number from.
#[async_trait]
pub trait TokenFloor: Send + Sync + 'static {
    /// The highest fencing token the store has seen for `number` (0 if none).
    async fn floor(&self, number: &PhoneNumber) -> Result<u64, CoordinatorError>;
}

/// One lease this node holds, with its watchdog deadline.
struct Held {
    lease: Lease,
    /// `last renew sent + 0.9 × TTL`.
    deadline: Instant,
}

/// The Redis coordinator: leases for one owner (this node's process).
pub struct RedisLeases {
    client: Client,
    keys: Keys,
    owner: String,
    ttl: Duration,
    floor: Arc<dyn TokenFloor>,
    scripts: Scripts,
    held: Mutex<HashMap<PhoneNumber, Held>>,
    draining: std::sync::atomic::AtomicBool,
    rates: AdmissionRates,
    node_admission: NodeAdmission,
}

struct Scripts {
    acquire: Script,
    renew: Script,
    release: Script,
    admit: Script,
}

/// Connects admitted per second and back to back, on this node and over the cluster.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdmissionRates {
    /// This node's rate.
    pub node_per_second: f64,
    /// This node's burst.
    pub node_burst: u32,
    /// The cluster's rate.
    pub cluster_per_second: f64,
    /// The cluster's burst.
    pub cluster_burst: u32,
}

impl RedisLeases {
    /// Leases for `owner` on `client`, with `ttl`; tokens start above what `floor` reports.
    pub fn new(
        client: Client,
        keys: Keys,
        owner: String,
        ttl: Duration,
        floor: Arc<dyn TokenFloor>,
        rates: AdmissionRates,
    ) -> Arc<Self> {
        Arc::new(Self {
            rates,
            node_admission: NodeAdmission::new(rates.node_per_second, rates.node_burst),
            client,
            keys,
            owner,
            ttl,
            floor,
            scripts: Scripts {
                acquire: Script::from_lua(ACQUIRE),
                renew: Script::from_lua(RENEW),
                release: Script::from_lua(RELEASE),
                admit: Script::from_lua(ADMIT),
            },
            held: Mutex::new(HashMap::new()),
            draining: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// This process's owner id (node id and incarnation).
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The lease TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Leases held now.
    pub fn held_count(&self) -> usize {
        self.lock().len()
    }

    /// The numbers held now.
    pub fn held_numbers(&self) -> Vec<PhoneNumber> {
        self.lock().keys().cloned().collect()
    }

    /// From now on, acquire refuses ([`CoordinatorError::Draining`]).
    pub fn stop_acquiring(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Runs renewals every TTL/3 and the watchdog until `stop`.
    pub fn spawn(self: &Arc<Self>, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let renewer = self.clone();
        let watchdog = self.clone();
        let stop2 = stop.clone();
        let renewals = tokio::spawn(async move { renewer.renew_loop(stop2).await });
        tokio::spawn(async move {
            watchdog.watchdog(stop).await;
            let _ = renewals.await;
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PhoneNumber, Held>> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn renew_loop(&self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.renew_all().await;
        }
    }

    /// One renewal round over every lease held.
    pub async fn renew_all(&self) {
        let batch: Vec<(PhoneNumber, u64)> = self
            .lock()
            .iter()
            .map(|(n, h)| (n.clone(), h.lease.token().get()))
            .collect();
        for chunk in batch.chunks(RENEW_CHUNK) {
            let sent = Instant::now();
            let mut keys = vec![self.keys.epoch(), self.keys.quiet()];
            let mut args = vec![self.owner.clone(), millis(self.ttl), millis(self.shadow())];
            for (number, token) in chunk {
                keys.push(self.keys.lease(number));
                keys.push(self.keys.token(number));
                keys.push(self.keys.shadow(number));
                args.push(token.to_string());
            }
            let result: Result<Vec<i64>, Error> = self
                .scripts
                .renew
                .evalsha_with_reload(&self.client, keys, args)
                .await;
            metrics::histogram!(RENEW_SECONDS).record(sent.elapsed().as_secs_f64());
            match result {
                Ok(kept) => self.renewed(chunk, &kept, sent),
                Err(e) => {
                    // The watchdog revokes what this leaves unrenewed for too long.
                    tracing::warn!(error = %e, leases = chunk.len(), "lease renewal failed");
                }
            }
        }
    }

    fn renewed(&self, chunk: &[(PhoneNumber, u64)], kept: &[i64], sent: Instant) {
        let deadline = sent + self.ttl.mul_f64(0.9);
        let mut lost = Vec::new();
        {
            let mut held = self.lock();
            for ((number, token), kept) in chunk.iter().zip(kept) {
                let Some(h) = held
                    .get_mut(number)
                    .filter(|h| h.lease.token().get() == *token)
                else {
                    continue;
                };
                if *kept == 1 {
                    h.deadline = h.deadline.max(deadline);
                } else if let Some(h) = held.remove(number) {
                    lost.push(h.lease);
                }
            }
            metrics::gauge!(LEASES_HELD).set(held.len() as f64);
        }
        for lease in lost {
            tracing::warn!(number = %lease.number(), token = %lease.token(), "renewal refused");
            lease.revoke(FenceLoss::RenewRefused);
        }
    }

    /// Revokes, without any Redis I/O, every lease past its deadline.
    async fn watchdog(&self, stop: CancellationToken) {
        let step = (self.ttl / 50).max(Duration::from_millis(10));
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(step) => {}
            }
            self.expire(Instant::now());
        }
    }

    /// Revokes the leases whose deadline passed at `now`.
    pub fn expire(&self, now: Instant) {
        let expired: Vec<Lease> = {
            let mut held = self.lock();
            let due: Vec<PhoneNumber> = held
                .iter()
                .filter(|(_, h)| h.deadline <= now || !h.lease.is_live())
                .map(|(n, _)| n.clone())
                .collect();
            let out = due
                .iter()
                .filter_map(|n| held.remove(n))
                .map(|h| h.lease)
                .collect();
            metrics::gauge!(LEASES_HELD).set(held.len() as f64);
            out
        };
        for lease in expired {
            if lease.revoke(FenceLoss::Expired) {
                tracing::warn!(number = %lease.number(), token = %lease.token(), "lease expired unrenewed");
            }
        }
    }

    async fn try_acquire(&self, number: &PhoneNumber) -> Result<Lease, CoordinatorError> {
        if let Some(h) = self.lock().get(number).filter(|h| h.lease.is_live()) {
            return Ok(h.lease.clone());
        }
        // The store's floor is read only for a number that is free: a number held elsewhere
        // costs one Redis call and no query.
        let mut floor = None;
        let (sent, token, detail, since_expiry) = loop {
            let sent = Instant::now();
            let keys = vec![
                self.keys.lease(number),
                self.keys.token(number),
                self.keys.epoch(),
                self.keys.quiet(),
                self.keys.shadow(number),
            ];
            let arg = floor.map_or_else(|| "-".to_owned(), |f: u64| f.to_string());
            let args = vec![
                self.owner.clone(),
                millis(self.ttl),
                arg,
                millis(self.shadow()),
            ];
            let (token, detail, since_expiry): (i64, String, i64) = self
                .scripts
                .acquire
                .evalsha_with_reload(&self.client, keys, args)
                .await
                .map_err(unavailable)?;
            if token == -2 && floor.is_none() {
                floor = Some(self.floor.floor(number).await?);
                continue;
            }
            break (sent, token, detail, since_expiry);
        };
        match token {
            -1 => Err(CoordinatorError::Unavailable(format!(
                "Redis lost its leases; none is handed out for {detail} ms more"
            ))),
            0 => Err(CoordinatorError::Held {
                number: number.clone(),
                owner: detail.split('|').next().unwrap_or_default().to_owned(),
            }),
            t => {
                let token = u64::try_from(t)
                    .ok()
                    .and_then(FencingToken::new)
                    .ok_or_else(|| CoordinatorError::Unavailable(format!("bad token {t}")))?;
                let lease = Lease::new(Fence {
                    number: number.clone(),
                    token,
                });
                let mut held = self.lock();
                let h = held.entry(number.clone()).or_insert_with(|| Held {
                    lease: lease.clone(),
                    deadline: sent + self.ttl.mul_f64(0.9),
                });
                if h.lease.token() != token || !h.lease.is_live() {
                    *h = Held {
                        lease: lease.clone(),
                        deadline: sent + self.ttl.mul_f64(0.9),
                    };
                }
                let lease = h.lease.clone();
                metrics::gauge!(LEASES_HELD).set(held.len() as f64);
                metrics::counter!(LEASES_ACQUIRED).increment(1);
                if let Ok(ms) = u64::try_from(since_expiry) {
                    // Taken over from an owner whose lease ran out: a failover, this long
                    // after the lease expired.
                    let after = Duration::from_millis(ms);
                    metrics::histogram!(FAILOVER_SECONDS).record(after.as_secs_f64());
                    tracing::info!(%number, ?after, "failed over: taken after its lease expired");
                }
                Ok(lease)
            }
        }
    }
}

#[async_trait]
impl Coordinator for RedisLeases {
    async fn acquire(&self, number: &PhoneNumber) -> Result<Lease, CoordinatorError> {
        if self.draining.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(CoordinatorError::Draining);
        }
        self.try_acquire(number).await
    }

    async fn release(&self, lease: &Lease) {
        lease.mark_released();
        {
            let mut held = self.lock();
            if held
                .get(lease.number())
                .is_some_and(|h| h.lease.token() == lease.token())
            {
                held.remove(lease.number());
            }
            metrics::gauge!(LEASES_HELD).set(held.len() as f64);
        }
        let value = format!("{}|{}", self.owner, lease.token());
        let released: Result<i64, Error> = self
            .scripts
            .release
            .evalsha_with_reload(
                &self.client,
                vec![
                    self.keys.lease(lease.number()),
                    self.keys.shadow(lease.number()),
                ],
                vec![
                    value,
                    self.keys.released(),
                    lease.number().as_str().to_owned(),
                ],
            )
            .await;
        if let Err(e) = released {
            tracing::warn!(number = %lease.number(), error = %e, "release failed; the lease expires");
        }
    }

    async fn admit(&self, _number: &PhoneNumber) -> Result<(), CoordinatorError> {
        // This node's turn first (no Redis call while it waits), then the cluster's.
        self.node_admission.admit().await;
        let started = Instant::now();
        let admitted = self.cluster_admit().await;
        metrics::histogram!(ADMISSION_WAIT).record(started.elapsed().as_secs_f64());
        admitted
    }
}

impl RedisLeases {
    /// Waits for a token of the cluster's connect bucket.
    async fn cluster_admit(&self) -> Result<(), CoordinatorError> {
        loop {
            let wait: i64 = self
                .scripts
                .admit
                .evalsha_with_reload(
                    &self.client,
                    vec![self.keys.admission()],
                    vec![
                        self.rates.cluster_per_second.to_string(),
                        self.rates.cluster_burst.max(1).to_string(),
                    ],
                )
                .await
                .map_err(unavailable)?;
            if wait <= 0 {
                return Ok(());
            }
            let wait = Duration::from_millis(u64::try_from(wait).unwrap_or(1));
            tokio::time::sleep(wait).await;
        }
    }
}

impl RedisLeases {
    /// How long a shadow outlives its lease.
    fn shadow(&self) -> Duration {
        self.ttl * SHADOW_TTLS
    }
}

fn millis(d: Duration) -> String {
    d.as_millis().max(1).to_string()
}

fn unavailable(e: Error) -> CoordinatorError {
    CoordinatorError::Unavailable(e.to_string())
}
