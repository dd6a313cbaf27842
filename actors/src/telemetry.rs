//! Metric names and the small counters the actors keep for them (STYLE rule 14).
//!
//! ractor mailboxes are unbounded; what fills them is bounded upstream (a number's intake takes
//! at most `intake_max_pending` messages, its backlog at most `outbound_max_queued` replies; a
//! conversation's mailbox holds its chat's share of those). They expose no depth, so every actor
//! address is a [`Mailbox`]:
//! a send increments the depth of its actor kind, `handle` decrements it, and when an actor dies
//! with messages still queued its supervisor calls [`Mailbox::abandon`] to take them off again.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

/// `switchboard_messages_received_total{kind}`: inbound messages from the network.
pub const MESSAGES_RECEIVED: &str = "switchboard_messages_received_total";
/// `switchboard_messages_sent_total{outcome}`: sends acknowledged or refused by the network.
pub const MESSAGES_SENT: &str = "switchboard_messages_sent_total";
/// `switchboard_number_disconnects_total{reason}`: connection losses and terminal events.
pub const DISCONNECTS: &str = "switchboard_number_disconnects_total";
/// `switchboard_actor_mailbox_depth{kind}`: messages queued and not yet handled.
pub const MAILBOX_DEPTH: &str = "switchboard_actor_mailbox_depth";
/// `switchboard_actor_restarts_total{kind}`: restarts performed by supervisors.
pub const RESTARTS: &str = "switchboard_actor_restarts_total";
/// `switchboard_actor_parked_total{kind}`: children parked `failed` after spending their budget.
pub const PARKED: &str = "switchboard_actor_parked_total";
/// `switchboard_numbers{state}`: numbers by connection state.
pub const NUMBERS: &str = "switchboard_numbers";
/// `switchboard_conversations_active`: conversation actors currently running.
pub const CONVERSATIONS_ACTIVE: &str = "switchboard_conversations_active";
/// `switchboard_dead_letters_total{reason}`: messages set aside with a reason instead of handled.
pub const DEAD_LETTERS: &str = "switchboard_dead_letters_total";
/// `switchboard_ai_jobs_total{outcome}`: AI jobs by how they ended.
pub const AI_JOBS: &str = "switchboard_ai_jobs_total";
/// `switchboard_outbound_queue_depth`: replies in number pacers, queued or sent and not yet
/// settled by the network.
pub const OUTBOUND_QUEUE: &str = "switchboard_outbound_queue_depth";
/// `switchboard_outbound_resent_total`: replies sent again with the same id because their
/// outcome was unknown after a lost connection or a restart.
pub const OUTBOUND_RESENT: &str = "switchboard_outbound_resent_total";
/// `switchboard_outbound_dead_letters_total{reason}`: replies given up (refused too often).
pub const OUTBOUND_DEAD: &str = "switchboard_outbound_dead_letters_total";

/// `switchboard_outbound_expired_total{reason}`: replies that left the backlog unsent, past
/// its age limit (`age`) or its cap (`cap`).
pub const OUTBOUND_EXPIRED: &str = "switchboard_outbound_expired_total";
/// `switchboard_intake_deferred_total`: inbound messages left unacknowledged because their
/// number had too many pending (WhatsApp keeps them and delivers them again).
pub const INTAKE_DEFERRED: &str = "switchboard_intake_deferred_total";

/// `switchboard_store_up`: 1 while the store is up, 0 during an outage.
pub const STORE_UP: &str = "switchboard_store_up";
/// Counter: leases lost, by `reason` (renew_refused, expired, store_refused, stream_replaced,
/// superseded).
pub const FENCE_LOSSES: &str = "switchboard_leases_lost_total";
/// Counter: writes the store refused because a newer owner of the number has written (each
/// one; the first also revokes the lease, counted in [`FENCE_LOSSES`] as `store_refused`).
pub const FENCING_REFUSALS: &str = "switchboard_fencing_refusals_total";
/// Counter: numbers this node handed off to another (placement moves, drains).
pub const HANDOFFS: &str = "switchboard_handoffs_total";
/// Gauge: live nodes of the cluster as this node sees them, by `state` (active, draining).
pub const NODES: &str = "switchboard_cluster_nodes";
/// Gauge: numbers waiting for their turn to connect (admission control).
pub const ADMISSION_WAITING: &str = "switchboard_admission_waiting";
/// Histogram: seconds a number waited for its turn to connect.
pub const ADMISSION_WAIT: &str = "switchboard_admission_wait_seconds";

/// Registers help texts for every metric above with the installed recorder.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge};
    describe_counter!(
        MESSAGES_RECEIVED,
        "Inbound messages received from the network"
    );
    describe_counter!(MESSAGES_SENT, "Outbound sends by outcome");
    describe_counter!(
        DISCONNECTS,
        "Disconnects and terminal session events by reason"
    );
    describe_gauge!(MAILBOX_DEPTH, "Queued, unhandled messages per actor kind");
    describe_counter!(RESTARTS, "Actor restarts by actor kind");
    describe_counter!(
        PARKED,
        "Actors parked failed after spending their restart budget"
    );
    describe_gauge!(NUMBERS, "Numbers by state");
    describe_gauge!(CONVERSATIONS_ACTIVE, "Running conversation actors");
    describe_counter!(DEAD_LETTERS, "Messages dead-lettered, by reason");
    describe_counter!(AI_JOBS, "AI jobs by outcome");
    describe_gauge!(
        OUTBOUND_QUEUE,
        "Replies in number pacers: queued, or sent and not yet settled"
    );
    describe_counter!(
        OUTBOUND_RESENT,
        "Replies sent again with the same id after an unknown outcome"
    );
    describe_counter!(OUTBOUND_DEAD, "Replies given up, by reason");
    describe_counter!(
        OUTBOUND_EXPIRED,
        "Replies that left the backlog unsent, past its age limit or cap"
    );
    describe_counter!(
        INTAKE_DEFERRED,
        "Inbound messages left to WhatsApp because their number had too many pending"
    );
    describe_gauge!(STORE_UP, "1 while the store is up, 0 during an outage");
    describe_counter!(FENCE_LOSSES, "Leases of numbers lost, by reason");
    describe_counter!(
        FENCING_REFUSALS,
        "Writes the store refused as fenced: a newer owner of the number has written"
    );
    describe_counter!(HANDOFFS, "Numbers handed off to another node");
    describe_gauge!(NODES, "Live nodes of the cluster, by state");
    describe_gauge!(
        ADMISSION_WAITING,
        "Numbers waiting for their turn to connect"
    );
    metrics::describe_histogram!(
        ADMISSION_WAIT,
        metrics::Unit::Seconds,
        "Time a number waited for its turn to connect"
    );
}

/// The kinds of actor in the tree, used as the bounded `kind` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ActorKind {
    /// The node's root.
    Root,
    /// The cluster agent.
    ClusterAgent,
    /// The fleet supervisor.
    Fleet,
    /// A number actor.
    Number,
    /// A number's conversation supervisor.
    ConversationSupervisor,
    /// A conversation actor.
    Conversation,
    /// An AI job actor.
    AiJob,
}

impl ActorKind {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Root => "root",
            Self::ClusterAgent => "cluster_agent",
            Self::Fleet => "fleet",
            Self::Number => "number",
            Self::ConversationSupervisor => "conversation_supervisor",
            Self::Conversation => "conversation",
            Self::AiJob => "ai_job",
        }
    }
}

/// Counts one actor's queued messages and mirrors them into the per-kind depth gauge.
#[derive(Debug, Clone)]
pub struct Mailbox {
    kind: ActorKind,
    pending: Arc<AtomicI64>,
}

impl Mailbox {
    /// A counter for a new actor of `kind`.
    pub fn new(kind: ActorKind) -> Self {
        Self {
            kind,
            pending: Arc::new(AtomicI64::new(0)),
        }
    }

    /// A message was queued.
    pub fn enqueued(&self) {
        self.pending.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!(MAILBOX_DEPTH, "kind" => self.kind.as_str()).increment(1.0);
    }

    /// A message was taken off the queue (or its send failed).
    pub fn dequeued(&self) {
        self.pending.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!(MAILBOX_DEPTH, "kind" => self.kind.as_str()).decrement(1.0);
    }

    /// The actor died: whatever it still had queued is gone from the depth.
    pub fn abandon(&self) {
        let left = self.pending.swap(0, Ordering::Relaxed);
        if left != 0 {
            metrics::gauge!(MAILBOX_DEPTH, "kind" => self.kind.as_str()).decrement(left as f64);
        }
    }

    /// Messages queued now.
    pub fn depth(&self) -> i64 {
        self.pending.load(Ordering::Relaxed)
    }
}
