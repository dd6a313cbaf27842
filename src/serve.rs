//! `switchboard serve`: the runtime on the configured store and transport.
//!
//! Embedded defaults: SQLite under `./data/`, the in-process coordinator (fencing tokens from the
//! store), the `sim` transport. It runs every number registered in the store (`switchboard
//! numbers add`), and picks up numbers added or removed while it runs; their sessions, inbound
//! log, outbox and conversation checkpoints survive a restart of the process, so a restarted node
//! resumes exactly where the last one stopped. It claims the store first: a second node on the
//! same store exits with an error naming the node that runs it.
//!
//! With `cluster.redis_url` set it is one node of a cluster on a shared PostgreSQL store: it
//! runs the numbers whose lease it holds (see `crate::cluster`).
//!
//! The wiring is [`App`](crate::app::App), shared with the demo, the benches and the tests.

use std::future::Future;

use crate::app::App;
use crate::config::Config;

/// Runs the node until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    App::build(config).await?.run_until(shutdown).await
}
