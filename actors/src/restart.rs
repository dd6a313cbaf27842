//! Restart policies: what a supervisor does when a child exits.
//!
//! OTP-like and deliberately small. A [`RestartPolicy`] says which exits are restarted
//! ([`RestartKind`]), how many restarts a child may use in a sliding window ([`Budget`]), and how
//! long to wait before each restart ([`Backoff`]: the first restart is immediate, later ones grow
//! exponentially with jitter, and the streak resets once the child has run for `stable_after`).
//! A [`RestartTracker`] holds that bookkeeping for one child, so a budget is always per child: a
//! storm of crashing chats in one number never stops its siblings or other numbers.
//!
//! The tracker is pure bookkeeping over `tokio::time::Instant`, so the tests drive it on paused
//! time and supervisors stay free of policy arithmetic.

use std::collections::VecDeque;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use crate::store::StoreError;

/// Which exits of a child are followed by a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartKind {
    /// Always restarted, even after a normal exit.
    Permanent,
    /// Restarted only after a failure; a normal exit ends it.
    Transient,
    /// Never restarted; the parent is told and decides.
    Temporary,
}

/// At most `max_restarts` restarts within any `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Restarts allowed inside one window.
    pub max_restarts: u32,
    /// The sliding window the restarts are counted in.
    pub window: Duration,
}

/// Delay before restart number `n` of a streak: 0 for the first, then
/// `min(max, base × 2^(n-2))`, each scaled by a random factor in `1 ± jitter`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Delay before the second restart of a streak.
    pub base: Duration,
    /// Upper bound of the delay before jitter.
    pub max: Duration,
    /// Relative jitter, 0.0 to 1.0: spreads restarts so crashed siblings do not retry in lockstep.
    pub jitter: f64,
}

impl Backoff {
    /// The delay before the `attempt`-th restart of a streak (1-based), before jitter.
    pub fn nominal(&self, attempt: u32) -> Duration {
        if attempt <= 1 {
            return Duration::ZERO;
        }
        let exp = (attempt - 2).min(30);
        self.base.saturating_mul(1 << exp).min(self.max)
    }
}

/// Everything a supervisor needs to know to restart one kind of child.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RestartPolicy {
    /// Which exits are restarted.
    pub kind: RestartKind,
    /// How many restarts a child may spend before it is parked `failed`.
    pub budget: Budget,
    /// Delays between restarts of one streak.
    pub backoff: Backoff,
    /// After running this long without exiting, the backoff streak starts over.
    pub stable_after: Duration,
}

impl RestartPolicy {
    /// Conversations: transient, 5 restarts per 60 s, 100 ms doubling to 5 s.
    pub fn conversation() -> Self {
        Self {
            kind: RestartKind::Transient,
            budget: Budget {
                max_restarts: 5,
                window: Duration::from_secs(60),
            },
            backoff: Backoff {
                base: Duration::from_millis(100),
                max: Duration::from_secs(5),
                jitter: 0.2,
            },
            stable_after: Duration::from_secs(30),
        }
    }

    /// Numbers: permanent, 10 restarts per 10 minutes, 1 s doubling to 60 s, then parked.
    pub fn number() -> Self {
        Self {
            kind: RestartKind::Permanent,
            budget: Budget {
                max_restarts: 10,
                window: Duration::from_secs(600),
            },
            backoff: Backoff {
                base: Duration::from_secs(1),
                max: Duration::from_secs(60),
                jitter: 0.2,
            },
            stable_after: Duration::from_secs(120),
        }
    }

    /// The cluster agent: permanent, 30 restarts per 10 minutes, 100 ms doubling to 10 s.
    pub fn cluster_agent() -> Self {
        Self {
            kind: RestartKind::Permanent,
            budget: Budget {
                max_restarts: 30,
                window: Duration::from_secs(600),
            },
            backoff: Backoff {
                base: Duration::from_millis(100),
                max: Duration::from_secs(10),
                jitter: 0.2,
            },
            stable_after: Duration::from_secs(60),
        }
    }

    /// AI jobs: temporary, never restarted (the conversation answers with a fallback).
    pub fn ai_job() -> Self {
        Self {
            kind: RestartKind::Temporary,
            budget: Budget {
                max_restarts: 0,
                window: Duration::from_secs(1),
            },
            backoff: Backoff {
                base: Duration::ZERO,
                max: Duration::ZERO,
                jitter: 0.0,
            },
            stable_after: Duration::ZERO,
        }
    }
}

/// How a child ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// It stopped on its own or was asked to.
    Normal,
    /// It panicked or returned an error; the text is the last error.
    Failed(String),
    /// It failed because a dependency is down (a store outage): not its own fault.
    Outage(String),
}

impl Exit {
    /// How a child that failed with `err` ended: an outage if the error is the store's
    /// retryable one, a failure otherwise.
    pub fn of_failure(err: &(dyn std::error::Error + 'static)) -> Self {
        match err.downcast_ref::<StoreError>() {
            Some(e) if e.is_retryable() => Self::Outage(e.to_string()),
            _ => Self::Failed(err.to_string()),
        }
    }
}

/// What the supervisor does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Start the child again after `delay` (zero: now). `attempt` counts the current streak.
    Restart {
        /// How long to wait before starting it.
        delay: Duration,
        /// 1 for the first restart of a streak.
        attempt: u32,
    },
    /// The budget is spent: keep the child stopped and report it `failed`.
    Park {
        /// The error of the exit that spent the budget.
        last_error: String,
    },
    /// The exit needs no restart under this policy.
    Done,
    /// A dependency is down: start the child again once it is back. Nothing is spent.
    AwaitDependency,
}

/// One child's restart bookkeeping.
#[derive(Debug)]
pub struct RestartTracker {
    policy: RestartPolicy,
    /// Times of the restarts still inside the budget window.
    recent: VecDeque<Instant>,
    /// Restarts since the child last ran stably; drives the backoff.
    streak: u32,
    started_at: Instant,
    rng: SmallRng,
}

impl RestartTracker {
    /// A tracker for a child that starts now. `seed` makes the jitter reproducible.
    pub fn new(policy: RestartPolicy, now: Instant, seed: u64) -> Self {
        Self {
            policy,
            recent: VecDeque::new(),
            streak: 0,
            started_at: now,
            rng: SmallRng::seed_from_u64(seed),
        }
    }

    /// The policy this tracker applies.
    pub fn policy(&self) -> &RestartPolicy {
        &self.policy
    }

    /// Records that the child (re)started at `now`.
    pub fn started(&mut self, now: Instant) {
        self.started_at = now;
    }

    /// Decides what follows the child's exit at `now`.
    pub fn on_exit(&mut self, exit: &Exit, now: Instant) -> Decision {
        let wants_restart = match (self.policy.kind, exit) {
            (RestartKind::Temporary, _) => false,
            // An outage is not the child's fault: it costs no budget and no backoff.
            (_, Exit::Outage(_)) => return Decision::AwaitDependency,
            (RestartKind::Transient, Exit::Normal) => false,
            (RestartKind::Transient | RestartKind::Permanent, Exit::Failed(_))
            | (RestartKind::Permanent, Exit::Normal) => true,
        };
        if !wants_restart {
            return Decision::Done;
        }
        if now.saturating_duration_since(self.started_at) >= self.policy.stable_after {
            self.streak = 0;
        }
        let window = self.policy.budget.window;
        while self
            .recent
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= window)
        {
            self.recent.pop_front();
        }
        if self.recent.len() >= self.policy.budget.max_restarts as usize {
            let last_error = match exit {
                Exit::Failed(e) | Exit::Outage(e) => e.clone(),
                Exit::Normal => "exited normally".to_owned(),
            };
            return Decision::Park { last_error };
        }
        self.recent.push_back(now);
        self.streak += 1;
        Decision::Restart {
            delay: self.jittered(self.policy.backoff.nominal(self.streak)),
            attempt: self.streak,
        }
    }

    /// Forgets all restarts, as after an operator resets a parked child.
    pub fn reset(&mut self, now: Instant) {
        self.recent.clear();
        self.streak = 0;
        self.started_at = now;
    }

    fn jittered(&mut self, nominal: Duration) -> Duration {
        let jitter = self.policy.backoff.jitter.clamp(0.0, 1.0);
        if nominal.is_zero() || jitter == 0.0 {
            return nominal;
        }
        nominal.mul_f64(self.rng.random_range(1.0 - jitter..=1.0 + jitter))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed() -> Exit {
        Exit::Failed("boom".into())
    }

    fn delay(d: Decision) -> Duration {
        match d {
            Decision::Restart { delay, .. } => delay,
            other => panic!("expected a restart, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_costs_no_budget_and_no_backoff() {
        let mut t = RestartTracker::new(RestartPolicy::conversation(), Instant::now(), 7);
        for _ in 0..100 {
            let exit = Exit::Outage("store down".into());
            assert_eq!(t.on_exit(&exit, Instant::now()), Decision::AwaitDependency);
        }
        assert_eq!(delay(t.on_exit(&failed(), Instant::now())), Duration::ZERO);
        let outage = StoreError::outage(crate::store::OutageKind::Locked, "database is locked");
        assert!(matches!(Exit::of_failure(&outage), Exit::Outage(_)));
        let bad = StoreError::Refused("bad row".into());
        assert!(matches!(Exit::of_failure(&bad), Exit::Failed(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn first_restart_is_immediate_then_delays_double_within_jitter() {
        let policy = RestartPolicy::conversation();
        let mut t = RestartTracker::new(policy, Instant::now(), 7);
        assert_eq!(delay(t.on_exit(&failed(), Instant::now())), Duration::ZERO);
        for attempt in 2..=5u32 {
            let nominal = policy.backoff.nominal(attempt);
            let d = delay(t.on_exit(&failed(), Instant::now()));
            assert!(
                d >= nominal.mul_f64(0.8) && d <= nominal.mul_f64(1.2),
                "{attempt}: {d:?}"
            );
            tokio::time::advance(d).await;
        }
        assert_eq!(policy.backoff.nominal(2), Duration::from_millis(100));
        assert_eq!(policy.backoff.nominal(5), Duration::from_millis(800));
        assert_eq!(policy.backoff.nominal(20), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn budget_exhaustion_parks_with_the_last_error() {
        let mut t = RestartTracker::new(RestartPolicy::conversation(), Instant::now(), 1);
        for _ in 0..5 {
            assert!(matches!(
                t.on_exit(&failed(), Instant::now()),
                Decision::Restart { .. }
            ));
        }
        let last = Exit::Failed("poison message".into());
        assert_eq!(
            t.on_exit(&last, Instant::now()),
            Decision::Park {
                last_error: "poison message".into()
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn restarts_leave_the_window_and_the_streak_resets_after_a_stable_run() {
        let policy = RestartPolicy::conversation();
        let mut t = RestartTracker::new(policy, Instant::now(), 3);
        for _ in 0..5 {
            t.on_exit(&failed(), Instant::now());
        }
        tokio::time::advance(policy.budget.window).await;
        t.started(Instant::now());
        tokio::time::advance(policy.stable_after).await;
        // The old restarts left the window and the child ran stably: immediate restart again.
        assert_eq!(
            t.on_exit(&failed(), Instant::now()),
            Decision::Restart {
                delay: Duration::ZERO,
                attempt: 1
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn kinds_decide_which_exits_restart() {
        let now = Instant::now();
        let mut transient = RestartTracker::new(RestartPolicy::conversation(), now, 0);
        assert_eq!(transient.on_exit(&Exit::Normal, now), Decision::Done);
        let mut permanent = RestartTracker::new(RestartPolicy::number(), now, 0);
        assert!(matches!(
            permanent.on_exit(&Exit::Normal, now),
            Decision::Restart { .. }
        ));
        let mut temporary = RestartTracker::new(RestartPolicy::ai_job(), now, 0);
        assert_eq!(temporary.on_exit(&failed(), now), Decision::Done);
    }

    #[tokio::test(start_paused = true)]
    async fn number_default_allows_ten_restarts_per_ten_minutes() {
        let mut t = RestartTracker::new(RestartPolicy::number(), Instant::now(), 9);
        for _ in 0..10 {
            let d = delay(t.on_exit(&failed(), Instant::now()));
            tokio::time::advance(d).await;
        }
        assert!(matches!(
            t.on_exit(&failed(), Instant::now()),
            Decision::Park { .. }
        ));
    }
}
