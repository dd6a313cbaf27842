//! The WhatsApp simulator: the stand-in for the WhatsApp network in every test, benchmark and
//! demo, and the referee whose ledger says whether anything was lost or sent twice.
//!
//! - [`network`]: accounts and connections; pairing, traffic, delivery, receipts and faults, each
//!   in a file of its own.
//! - [`ledger`]: the referee's record and totals.
//! - [`client`]: the `sim` transport (implements the transport port), in process or remote.
//! - [`server`]: `switchboard sim serve`, the control API and the wire.
//! - [`wire`]: the frames.

pub mod client;
pub mod ledger;
pub mod network;
mod remote;
pub mod server;
pub mod wire;

pub use client::{Dialer, SimConnector};
pub use network::{Fault, FaultKind, Network, SimConfig, TrafficSpec};
