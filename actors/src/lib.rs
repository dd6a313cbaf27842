//! Switchboard's supervision tree, its restart policies, and the ports the service implements.
//!
//! ```text
//! Fleet supervisor  (fleet.rs)          one child per number; per-child budget: 10 per 10 min
//! └── Number actor  (number.rs)         session state machine; owns the session and the pacer;
//!     │                                 its session's sink hands messages to intake directly
//!     ├── pacer task (pacer.rs)         rate-limited, typing; settles sends by server ack and
//!     │                                 receipts; bounded backlog (book.rs: the bookkeeping)
//!     └── Conversation supervisor (conversations.rs)   intake: pending until processed;
//!         │                                            bounded (backpressure to WhatsApp)
//!         └── Conversation actor (conversation.rs)     one per chat; lazy; stops when idle;
//!             │                                        budget 5 per 60 s, then the message
//!             │                                        it fails on is dead-lettered
//!             └── AI job actor (ai_job.rs)             temporary; timeout; fallback on failure
//! ```
//!
//! - [`restart`]: the policies (permanent / transient / temporary, budgets, backoff) as pure,
//!   tested bookkeeping. A failure caused by a store outage costs no budget: the child waits
//!   for the store ([`store::Health`]) and starts again.
//! - Ports: [`transport`] (WhatsApp sessions), [`responder`] (replies and AI), [`store`] (the
//!   durable message path: inbound log, outbox, checkpoints, sessions, dead letters, fencing;
//!   and the [`store::Coordinator`] that hands out ownership with fencing tokens).
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
pub mod ai_job;
pub mod conversation;
pub mod conversations;
pub mod dead_letter;
pub mod deps;
pub mod fleet;
pub mod ids;
pub mod number;
pub mod pacer;
pub mod responder;
pub mod restart;
pub mod store;
pub mod telemetry;
pub mod transport;

pub use addr::{Addr, CallError};
pub use deps::{Deps, FleetCounters, NumberPhase, Settings};
pub use fleet::{Fleet, FleetStatus};
pub use ids::{Jid, PhoneNumber};
