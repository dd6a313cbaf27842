//! Switchboard: a runtime for running many WhatsApp numbers at once.
//!
//! The supervision tree and the ports live in the `switchboard-actors` crate; this crate wires
//! them to the world:
//!
//! - [`config`]: typed, layered configuration (`config/default.toml`, a file, the environment).
//! - [`store`]: the SQL store (SQLite embedded, PostgreSQL for clusters).
//! - [`app`]: the node's wiring (`App::build`, `App::run_until`), used by every entry point.
//! - [`cluster`]: the cluster on Redis (leases with fencing tokens).
//! - [`serve`]: `switchboard serve`, the runtime on the configured store and transport.
//! - [`sim`]: the WhatsApp simulator (network, referee ledger, `sim` transport, `sim serve`).
//! - [`bot`]: the demo's keyword/echo bot, a canned model and the chaos wrapper.
//! - [`demo`]: `switchboard demo`, the simulated fleet.
//! - [`login`]: `switchboard numbers login`, pairing a number from the terminal.
//! - [`http`]: the admin API under `/v1` (tenants, tokens, numbers, audit), health and metrics;
//!   its module doc is the route table. `http::problem`: `application/problem+json` errors for
//!   every HTTP surface.
//! - [`telemetry`]: logging and the Prometheus recorder.
//! - [`whatsapp`]: the production transport, whatsapp-rust 0.7.0 (its storage backend so far).
//! - [`cli`]: the command line.

#![forbid(unsafe_code)]

pub mod app;
pub mod bot;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod http;
pub mod login;
pub mod serve;
pub mod sim;
pub mod store;
pub mod telemetry;
pub mod whatsapp;
