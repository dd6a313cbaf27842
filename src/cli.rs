//! The command line.
//!
//! ```text
//! switchboard serve   [--config FILE]        the runtime on the configured store and transport
//! switchboard migrate [--config FILE]        apply pending database migrations
//! switchboard numbers add [--tenant T] NUMBER…  |  list  |  remove NUMBER…
//! switchboard numbers login NUMBER [--pair-code PHONE]   pair a number from the terminal
//! switchboard numbers move NUMBER --to NODE  |  unpin NUMBER   pin a number to a node
//! switchboard cluster status  |  drain NODE  the cluster's nodes; drain one
//! switchboard demo [--numbers N] [--duration 30s] [--chaos] [--listen ADDR] [--seed S]
//! switchboard sim serve [--listen ADDR] [--seed S]
//! ```
//!
//! Configuration errors are all printed together and the process exits with code 64.
//!
//! ```text
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Switchboard: run many WhatsApp numbers at once.
#[derive(Debug, Parser)]
#[command(name = "switchboard", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the numbers registered in the store (embedded defaults: SQLite, simulator).
    Serve(ConfigArg),
    /// Apply pending database migrations and exit.
    Migrate(ConfigArg),
    /// Register, list or remove numbers.
    Numbers {
        /// Where the config is.
        #[command(flatten)]
        config: ConfigArg,
        /// What to do.
        #[command(subcommand)]
        command: NumbersCommand,
    },
    /// The cluster: its nodes, and draining one.
    Cluster {
        /// Where the config is (its `cluster.*` keys name the Redis).
        #[command(flatten)]
        config: ConfigArg,
        /// What to do.
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Run a simulated fleet on the embedded defaults and print a JSON report.
    Demo(DemoArgs),
    /// The WhatsApp simulator.
    Sim {
        /// Simulator subcommands.
        #[command(subcommand)]
        command: SimCommand,
    },
}

/// The config file option shared by commands that use the store.
#[derive(Debug, Args)]
pub struct ConfigArg {
    /// A TOML file layered over the defaults (environment variables still win).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
}

/// `switchboard numbers …`.
#[derive(Debug, Subcommand)]
pub enum NumbersCommand {
    /// Register numbers (E.164) to run; the tenant is created if it does not exist.
    Add {
        /// The tenant that owns them.
        #[arg(long, default_value = "default")]
        tenant: String,
        /// The proxy their connections to WhatsApp go through (`socks5://[user:pass@]host:port`
        /// or `http://[user:pass@]host:port`); kept in each number's settings.
        #[arg(long)]
        proxy: Option<String>,
        /// The numbers.
        #[arg(required = true)]
        numbers: Vec<String>,
    },
    /// List the registered numbers.
    List,
    /// Pair a number: show its QR code in the terminal (or a pair code) until the phone
    /// confirms. Run it while no node runs this store.
    Login {
        /// The number, as registered (`+15550001`).
        number: String,
        /// Link with a pair code typed on the phone instead of a QR code; give the number again.
        #[arg(long, value_name = "PHONE")]
        pair_code: Option<String>,
    },
    /// Pin a number to a node: the cluster moves it there (while that node is live).
    Move {
        /// The number.
        number: String,
        /// The node id.
        #[arg(long)]
        to: String,
    },
    /// Remove a number's pin: placement decides again.
    Unpin {
        /// The number.
        number: String,
    },
    /// Restart a number on the node that runs it: a fresh session, its restart budget and any
    /// parking forgotten (clustered nodes only).
    Restart {
        /// The number.
        number: String,
        /// How long to wait for the node's answer.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Unlink a number's device on the node that runs it: it must be paired again (clustered
    /// nodes only).
    Logout {
        /// The number.
        number: String,
        /// How long to wait for the node's answer.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Send a message as the business from a number, on the node that runs it, through its
    /// outbox and pacing (clustered nodes only). The same --key sends it once, however often.
    Send {
        /// The number that sends.
        number: String,
        /// The chat: `DIGITS@s.whatsapp.net`, `ID@lid` or `ID@g.us`.
        #[arg(long)]
        to: String,
        /// The text.
        #[arg(long)]
        text: String,
        /// The idempotency key (default: a new one, printed).
        #[arg(long)]
        key: Option<String>,
        /// How long to wait for the node's answer.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Remove numbers and everything stored for them.
    Remove {
        /// The numbers.
        #[arg(required = true)]
        numbers: Vec<String>,
    },
}

/// `switchboard cluster …`.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// The live nodes, their states and how many numbers each holds.
    Status,
    /// Ask a node to give all its numbers away (it keeps running, taking none).
    Drain {
        /// The node id.
        node: String,
    },
}

/// `switchboard demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How many numbers to run.
    #[arg(long, default_value_t = 100)]
    pub numbers: usize,
    /// How long the simulated contacts chat (e.g. 30s, 2m).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Inject conversation panics, dropped connections and number crashes.
    #[arg(long)]
    pub chaos: bool,
    /// Where /metrics and /healthz are served.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Seed of the simulator.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Inbound messages per second per number.
    #[arg(long, default_value_t = 0.3)]
    pub rate_per_number: f64,
    /// No live progress line.
    #[arg(long)]
    pub quiet: bool,
}

/// `switchboard sim …`.
#[derive(Debug, Subcommand)]
pub enum SimCommand {
    /// Run the simulated network as a server (control API and client wire).
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:7900")]
        listen: SocketAddr,
        /// Seed of every random choice.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}
