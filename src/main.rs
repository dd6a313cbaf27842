//! The `switchboard` binary: parse the command line, set up telemetry, run until done or until
//! Ctrl-C / SIGTERM.

use std::process::ExitCode;

use clap::Parser;
use switchboard::cli::{Cli, Command, SimCommand};
use switchboard::demo::{self, DemoOptions};
use switchboard::sim::{Network, SimConfig, server};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchboard: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Demo(args) => {
            // Chaos panics are expected and counted as restarts; keep them off the progress line.
            let filter = if args.chaos {
                "error,switchboard::panic=off"
            } else {
                "error"
            };
            switchboard::telemetry::init_logging(filter, false);
            let opts = DemoOptions {
                numbers: args.numbers,
                duration: args.duration,
                chaos: args.chaos,
                listen: args.listen,
                seed: args.seed,
                rate_per_number: args.rate_per_number,
                progress: !args.quiet,
            };
            let report = demo::run(opts, shutdown_signal()).await?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        Command::Sim {
            command: SimCommand::Serve { listen, seed },
        } => {
            switchboard::telemetry::init_logging("info", false);
            let listener = tokio::net::TcpListener::bind(listen).await?;
            tracing::info!(%listen, "simulator listening");
            let network = Network::new(SimConfig {
                seed,
                ..SimConfig::default()
            });
            server::serve(listener, network, shutdown_signal()).await?;
            Ok(())
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
