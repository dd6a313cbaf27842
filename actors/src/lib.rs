//! Switchboard's supervision tree, its restart policies, and the ports the service implements.
//!
//! ```text
//! Root (root.rs)                         the node; restarts the agent; stops if the fleet ends
//! ├── Cluster agent (cluster_agent.rs)   heartbeat; placement reconciler (placement.rs):
//! │                                      starts what this node should own, hands off the rest
//! └── Fleet supervisor (fleet.rs)        one child per number, after taking its lease
//!     │                                  (coordinator.rs); per-child budget: 10 per 10 min
//!     └── Number actor (number.rs)       session state machine; owns the session and the
//!         │                              pacer; watches its lease (stops the moment it is
//!         │                              revoked); its session's sink feeds intake directly
//!         ├── pacer task (pacer.rs)      rate-limited, typing; settles sends by server ack and
//!         │                              receipts; bounded backlog (book.rs: the bookkeeping)
//!         └── Conversation supervisor (conversations.rs)  intake: pending until processed;
//!             │                                           bounded (backpressure to WhatsApp)
//!             └── Conversation actor (conversation.rs)    one per chat; lazy; stops when
//!                 │                                       idle; budget 5 per 60 s, then the
//!                 │                                       message it fails on is dead-lettered
//!                 └── AI job actor (ai_job.rs)            temporary; timeout; fallback
//! ```
//!
//! - [`restart`] and [`placement`]: pure, tested bookkeeping with time as an argument: the
//!   restart policies (permanent / transient / temporary, budgets, backoff), and who should own
//!   each number (pins, sticky owners, weighted rendezvous hashing, rebalancing, move budget).
//!   A failure caused by a store outage costs no budget: the child waits for the store
//!   ([`store::Health`]) and starts again.
//! - Ports: [`transport`] (WhatsApp sessions), [`responder`] (replies and AI), [`store`] (the
//!   durable message path: inbound log, outbox, checkpoints, sessions, dead letters, fencing),
//!   [`coordinator`] (leases: who owns a number, under which fencing token; the one path by
//!   which ownership ends; membership and the directory of numbers the cluster agent reads).
//! - [`command`]: operator commands to one number (restart, logout), applied by the fleet that
//!   runs it; in a cluster the service routes them to the lease holder.
//! - [`telemetry`]: metric names and mailbox-depth counting; [`addr`]: counted actor addresses.
//!
//! ractor facts that shape the tree: its default `handle_supervisor_evt` stops the supervisor
//! when any child exits, so every supervisor here overrides it; a panic drops the actor's queued
//! messages and skips `post_stop`, so intake is held by the parent and cleanup is done by the
//! parent; `pre_start` runs in the spawner's task, so I/O happens in `post_start`.
//!
//! This crate depends on no web, SQL or Redis crate.

#![forbid(unsafe_code)]

pub mod addr;
pub mod admission;
pub mod ai_job;
pub mod cluster_agent;
pub mod command;
pub mod conversation;
pub mod conversations;
pub mod coordinator;
pub mod dead_letter;
pub mod deps;
pub mod fleet;
pub mod ids;
pub mod number;
pub mod pacer;
pub mod placement;
pub mod responder;
pub mod restart;
pub mod root;
pub mod store;
pub mod telemetry;
pub mod transport;

pub use addr::{Addr, CallError};
pub use coordinator::{Coordinator, FenceLoss, Lease};
pub use deps::{Deps, FleetCounters, NumberPhase, Settings};
pub use fleet::{Fleet, FleetStatus};
pub use ids::{Jid, PhoneNumber};
