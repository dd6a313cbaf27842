//! What every actor of the tree is given: the ports, the settings, and the shared counters.

use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::coordinator::{Coordinator, FenceLoss, Lease};
use crate::responder::{AiBackend, Responder};
use crate::restart::RestartPolicy;
use crate::store::Store;
use crate::telemetry::{FENCING_REFUSALS, NUMBERS};
use crate::transport::{WaConnector, WaSession};

/// Outbound pacing for one number.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SendRate {
    /// Sends allowed back to back.
    pub burst: u32,
    /// Sustained sends per second.
    pub per_second: f64,
}

/// Tunables of the tree. [`Settings::default`] holds the product defaults.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This node's id, stated to the network on every connection.
    pub client_label: String,
    /// Restart policy of number actors.
    pub number_policy: RestartPolicy,
    /// Restart policy of conversation actors.
    pub conversation_policy: RestartPolicy,
    /// A conversation with no message for this long stops, freeing its memory.
    pub conversation_idle: Duration,
    /// Deadline of one AI job.
    pub ai_timeout: Duration,
    /// Per-number send pacing, kept under WhatsApp's limit.
    pub send_rate: SendRate,
    /// "typing…" time per character of a reply (zero: no typing indicator).
    pub typing_per_char: Duration,
    /// Upper bound of the typing time.
    pub typing_max: Duration,
    /// After a login, how long replies of unknown outcome wait for receipts that settle them
    /// before they are sent again with the same id.
    pub unsettled_wait: Duration,
    /// A reply still queued this long after it was queued expires (recorded, counted).
    pub outbound_max_age: Duration,
    /// Replies a number's backlog holds at most; the oldest beyond it expire.
    pub outbound_max_queued: usize,
    /// Inbound messages a number holds unprocessed at most; beyond it, new ones are left
    /// unacknowledged (backpressure: WhatsApp keeps them and delivers them again).
    pub intake_max_pending: usize,
    /// Answer group chats (DM-only by default).
    pub groups_enabled: bool,
    /// Deadline of calls between actors.
    pub call_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            client_label: "node-1".to_owned(),
            number_policy: RestartPolicy::number(),
            conversation_policy: RestartPolicy::conversation(),
            conversation_idle: Duration::from_secs(300),
            ai_timeout: Duration::from_secs(30),
            send_rate: SendRate {
                burst: 3,
                per_second: 0.9,
            },
            typing_per_char: Duration::from_millis(10),
            typing_max: Duration::from_secs(2),
            unsettled_wait: Duration::from_secs(5),
            outbound_max_age: Duration::from_secs(600),
            outbound_max_queued: 1000,
            intake_max_pending: 1000,
            groups_enabled: false,
            call_timeout: Duration::from_secs(5),
        }
    }
}

/// The ports and settings shared by the whole tree.
#[derive(Clone)]
pub struct Deps {
    /// Opens WhatsApp sessions.
    pub connector: Arc<dyn WaConnector>,
    /// Decides replies.
    pub responder: Arc<dyn Responder>,
    /// Answers AI jobs.
    pub ai: Arc<dyn AiBackend>,
    /// The durable message path, sessions and dead letters.
    pub store: Arc<dyn Store>,
    /// Hands out ownership of numbers with fencing tokens.
    pub coordinator: Arc<dyn Coordinator>,
    /// Tunables.
    pub settings: Settings,
    /// Live counters for progress lines and status.
    pub counters: Arc<FleetCounters>,
}

/// A number's phase, as counted in `switchboard_numbers{state}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum NumberPhase {
    /// Actor up, session starting.
    Starting,
    /// Waiting for the phone to scan a QR code or enter a pair code.
    Pairing,
    /// (Re)connecting; pairing starts once the server sends a code.
    Connecting,
    /// Connected.
    Online,
    /// The phone unlinked the device; needs pairing again.
    LoggedOut,
    /// Connected elsewhere; stopped and not reconnecting.
    Replaced,
    /// Another owner holds the number (a write was refused as fenced); stopped, not restarted.
    Fenced,
    /// Temporarily banned; reconnects when the ban ends.
    Banned,
    /// QR codes ran out unscanned; waits for an operator.
    Unpaired,
    /// The server refused the login (client outdated, bad user agent…); waits for an operator.
    Rejected,
    /// Waiting for a restart after a crash.
    Restarting,
    /// Spent its restart budget; parked.
    Failed,
}

impl NumberPhase {
    const ALL: [Self; 12] = [
        Self::Starting,
        Self::Pairing,
        Self::Connecting,
        Self::Online,
        Self::LoggedOut,
        Self::Replaced,
        Self::Fenced,
        Self::Banned,
        Self::Unpaired,
        Self::Rejected,
        Self::Restarting,
        Self::Failed,
    ];

    /// Where a number stands once its ownership ended for `loss`.
    pub fn after_loss(loss: FenceLoss) -> Self {
        match loss {
            FenceLoss::StreamReplaced => Self::Replaced,
            _ => Self::Fenced,
        }
    }

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Pairing => "pairing",
            Self::Connecting => "connecting",
            Self::Online => "online",
            Self::LoggedOut => "logged_out",
            Self::Replaced => "replaced",
            Self::Fenced => "fenced",
            Self::Banned => "banned",
            Self::Unpaired => "unpaired",
            Self::Rejected => "rejected",
            Self::Restarting => "restarting",
            Self::Failed => "failed",
        }
    }

    fn from_u8(v: u8) -> Self {
        Self::ALL
            .get(usize::from(v))
            .copied()
            .unwrap_or(Self::Starting)
    }
}

/// Fleet-wide counters, readable without asking any actor.
#[derive(Debug, Default)]
pub struct FleetCounters {
    by_state: [AtomicI64; NumberPhase::ALL.len()],
    /// Inbound messages received.
    pub messages_in: AtomicU64,
    /// Sends acknowledged by the server.
    pub messages_out: AtomicU64,
    /// Restarts of any actor.
    pub restarts: AtomicU64,
    /// Dead-lettered messages.
    pub dead_letters: AtomicU64,
    /// Replies that expired unsent.
    pub expired: AtomicU64,
    /// Replies in the pacers now (queued, or sent and unsettled).
    pub outbound_queued: AtomicI64,
    /// Inbound messages left to WhatsApp for backpressure.
    pub deferred: AtomicU64,
}

impl FleetCounters {
    /// Numbers currently in `state`.
    pub fn numbers(&self, state: NumberPhase) -> i64 {
        self.by_state[state as usize].load(Ordering::Relaxed)
    }

    /// Moves one number between states (or into the count, with `from = None`).
    pub fn transition(&self, from: Option<NumberPhase>, to: Option<NumberPhase>) {
        if let Some(from) = from {
            self.by_state[from as usize].fetch_sub(1, Ordering::Relaxed);
            metrics::gauge!(NUMBERS, "state" => from.as_str()).decrement(1.0);
        }
        if let Some(to) = to {
            self.by_state[to as usize].fetch_add(1, Ordering::Relaxed);
            metrics::gauge!(NUMBERS, "state" => to.as_str()).increment(1.0);
        }
    }

    /// Adds one to a plain counter.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// What a number owns outside its actor, held by the fleet so that it can clean up when the
/// actor dies without running `post_stop` (a panic skips it): the session, the tasks, the state.
pub struct NumberResources {
    session: Mutex<Option<Arc<dyn WaSession>>>,
    lease: Mutex<Option<Lease>>,
    /// Cancels the number's tasks (pacer, timers).
    pub cancel: CancellationToken,
    /// Inbound messages the number's intake holds unprocessed, as its supervisor last counted.
    pub pending: AtomicUsize,
    state: AtomicU8,
    counters: Arc<FleetCounters>,
}

impl NumberResources {
    /// Resources for a number starting now, counted as [`NumberPhase::Starting`].
    pub fn new(counters: Arc<FleetCounters>) -> Arc<Self> {
        counters.transition(None, Some(NumberPhase::Starting));
        Arc::new(Self {
            session: Mutex::new(None),
            lease: Mutex::new(None),
            cancel: CancellationToken::new(),
            pending: AtomicUsize::new(0),
            state: AtomicU8::new(NumberPhase::Starting as u8),
            counters,
        })
    }

    /// The current session, if one is open.
    pub fn session(&self) -> Option<Arc<dyn WaSession>> {
        self.lock().clone()
    }

    /// Installs a new session, returning the previous one.
    pub fn replace_session(&self, s: Option<Arc<dyn WaSession>>) -> Option<Arc<dyn WaSession>> {
        std::mem::replace(&mut *self.lock(), s)
    }

    /// The lease the number runs under, once the fleet has it.
    pub fn lease(&self) -> Option<Lease> {
        self.lease
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Records the lease the number runs under.
    pub fn set_lease(&self, lease: Lease) {
        *self
            .lease
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(lease);
    }

    /// The one way a number loses its ownership, whoever notices it (a refused write, a lost
    /// renewal, a replaced stream): the lease is revoked, and the number's watch on it closes
    /// the session and stops the number at once.
    pub fn lose_fence(&self, loss: FenceLoss) {
        if loss == FenceLoss::StoreRefused {
            metrics::counter!(FENCING_REFUSALS).increment(1);
        }
        match self.lease() {
            Some(lease) => {
                lease.revoke(loss);
            }
            None => self.cancel.cancel(),
        }
    }

    /// The number's state.
    pub fn state(&self) -> NumberPhase {
        NumberPhase::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// Moves the number to `to`, keeping the fleet counts right.
    pub fn set_state(&self, to: NumberPhase) {
        let from = NumberPhase::from_u8(self.state.swap(to as u8, Ordering::Relaxed));
        if from != to {
            self.counters.transition(Some(from), Some(to));
        }
    }

    /// Takes the number out of the counts (it is removed from the fleet).
    pub fn retire(&self) {
        self.counters.transition(Some(self.state()), None);
    }

    /// Cancels the tasks and shuts the session down; safe to call more than once.
    pub async fn release(&self) {
        self.cancel.cancel();
        if let Some(session) = self.replace_session(None) {
            session.shutdown().await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Arc<dyn WaSession>>> {
        self.session
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
