//! The command line.
//!
//! ```text
//! switchboard demo [--numbers N] [--duration 30s] [--chaos] [--listen ADDR] [--seed S]
//! switchboard sim serve [--listen ADDR] [--seed S]
//! ```

use std::net::SocketAddr;
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
    /// Run a simulated fleet on the embedded defaults and print a JSON report.
    Demo(DemoArgs),
    /// The WhatsApp simulator.
    Sim {
        /// Simulator subcommands.
        #[command(subcommand)]
        command: SimCommand,
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
