//! The `switchboard` binary: parse the command line, set up telemetry, run until done or until
//! Ctrl-C / SIGTERM.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use switchboard::cli::{Cli, ClusterCommand, Command, ConfigArg, NumbersCommand, SimCommand};
use switchboard::config::{Config, ConfigErrors};
use switchboard::demo::{self, DemoOptions};
use switchboard::sim::{Network, SimConfig, server};

mod allocator;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match allocator::runtime() {
        Ok(runtime) => runtime.block_on(run(cli)),
        Err(e) => Err(anyhow::Error::new(e).context("starting the runtime")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<ConfigErrors>() {
            Some(errors) => {
                eprint!("switchboard: {errors}");
                // Exit code 64 (EX_USAGE): the configuration is wrong, retrying will not help.
                ExitCode::from(64)
            }
            None if e.downcast_ref::<switchboard::store::ClaimError>().is_some() => {
                eprintln!("switchboard: {e:#}");
                // Exit code 69 (EX_UNAVAILABLE): another node runs this store.
                ExitCode::from(69)
            }
            None => {
                eprintln!("switchboard: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn load(arg: &ConfigArg) -> anyhow::Result<Config> {
    Ok(Config::load(arg.config.as_deref())?)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(arg) => {
            let config = load(&arg)?;
            switchboard::telemetry::init_logging("info,switchboard::panic=warn", false);
            switchboard::serve::run(config, shutdown_signal()).await
        }
        Command::Migrate(arg) => {
            let config = load(&arg)?;
            let url = secrecy::ExposeSecret::expose_secret(&config.store.url).to_owned();
            let (dialect, applied) = switchboard::store::migrate(&url).await?;
            println!("{}: {applied} migration(s) applied", dialect.as_str());
            Ok(())
        }
        Command::Numbers { config, command } => {
            let config = load(&config)?;
            switchboard::telemetry::init_logging("warn", false);
            numbers(&config, command).await
        }
        Command::Cluster { config, command } => {
            let config = load(&config)?;
            switchboard::telemetry::init_logging("warn", false);
            let Some(cluster) = &config.cluster else {
                eprintln!("switchboard: cluster.redis_url is not set: this node runs embedded");
                std::process::exit(64);
            };
            match command {
                ClusterCommand::Status => {
                    let store = switchboard::app::open_store(&config.store).await?;
                    let numbers: Vec<_> = store
                        .numbers()
                        .await?
                        .into_iter()
                        .map(|n| n.number)
                        .collect();
                    store.close().await;
                    print!("{}", switchboard::cluster::status(cluster, &numbers).await?);
                }
                ClusterCommand::Drain { node } => {
                    switchboard::cluster::request_drain(cluster, &node).await?;
                    println!("asked {node} to drain");
                }
            }
            Ok(())
        }
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

async fn numbers(config: &Config, command: NumbersCommand) -> anyhow::Result<()> {
    use serde_json::json;
    use switchboard::store::{Change, NumberRecord, TenantRecord};
    use switchboard_actors::PhoneNumber;
    if let NumbersCommand::Login { number, pair_code } = command {
        let number = PhoneNumber::parse(&number).with_context(|| format!("{number:?}"))?;
        let mut out = std::io::stdout();
        return switchboard::login::run(config, number, pair_code, &mut out).await;
    }
    if let NumbersCommand::Restart { number, timeout }
    | NumbersCommand::Logout { number, timeout }
    | NumbersCommand::Send {
        number, timeout, ..
    } = &command
    {
        use switchboard_actors::command::{BusinessSend, NumberCommand};
        let which = match &command {
            NumbersCommand::Restart { .. } => NumberCommand::Restart,
            NumbersCommand::Send { to, text, key, .. } => {
                let key = key
                    .clone()
                    .unwrap_or_else(|| format!("cli-{:016x}", rand::random::<u64>()));
                match BusinessSend::new(to, text, &key) {
                    Ok(send) => NumberCommand::Send(send),
                    Err(e) => {
                        eprintln!("switchboard: --{e}");
                        std::process::exit(64);
                    }
                }
            }
            _ => NumberCommand::Logout,
        };
        let Some(cluster) = &config.cluster else {
            eprintln!(
                "switchboard: numbers {which} reaches the node running the number through the \
                 cluster, and cluster.redis_url is not set"
            );
            std::process::exit(64);
        };
        let parsed = PhoneNumber::parse(number).with_context(|| format!("{number:?}"))?;
        let (node, done) =
            switchboard::cluster::command(cluster, &parsed, &which, *timeout).await?;
        match &which {
            NumberCommand::Send(send) => {
                println!("{number}: {done} on {node} (key {})", send.key);
            }
            _ => println!("{number}: {which} done on {node}"),
        }
        return Ok(());
    }
    // A bad proxy is a usage error, told before anything is opened.
    if let NumbersCommand::Add {
        proxy: Some(url), ..
    } = &command
        && let Err(e) = switchboard::whatsapp::Proxy::parse(url)
    {
        eprintln!("switchboard: --proxy: {e}");
        std::process::exit(64);
    }
    let store = switchboard::app::open_store(&config.store).await?;
    // Every change from the command line is audited like the API's, by actor `cli`.
    let audit = |tenant: Option<&str>, action: &str, target: &str, detail: serde_json::Value| {
        switchboard::store::AuditEntry {
            tenant: tenant.map(str::to_owned),
            actor: "cli".to_owned(),
            action: action.to_owned(),
            target: target.to_owned(),
            detail,
        }
    };
    let tenant_of = async |number: &PhoneNumber| -> anyhow::Result<Option<String>> {
        Ok(store.number(number).await?.map(|n| n.tenant))
    };
    match command {
        NumbersCommand::Add {
            tenant,
            numbers,
            proxy,
        } => {
            let mut settings = serde_json::json!({});
            if let Some(url) = proxy {
                settings[switchboard::whatsapp::PROXY_SETTING] = url.into();
            }
            if store.tenant(&tenant).await?.is_none() {
                let record = TenantRecord {
                    id: tenant.clone(),
                    name: tenant.clone(),
                    full_transcripts: false,
                };
                let entry = audit(Some(&tenant), "tenant.create", &tenant, json!({}));
                store.apply(&Change::CreateTenant(record), &entry).await?;
            }
            for raw in numbers {
                let number = PhoneNumber::parse(&raw).with_context(|| format!("{raw:?}"))?;
                let record = NumberRecord {
                    number,
                    tenant: tenant.clone(),
                    pinned_node: None,
                    settings: settings.clone(),
                };
                let entry = audit(Some(&tenant), "number.create", &raw, json!({}));
                match store.apply(&Change::AddNumber(record), &entry).await {
                    Ok(()) => println!("added {raw}"),
                    Err(switchboard_actors::store::StoreError::Conflict(_)) => {
                        println!("{raw} is registered already");
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        NumbersCommand::Login { .. }
        | NumbersCommand::Restart { .. }
        | NumbersCommand::Logout { .. }
        | NumbersCommand::Send { .. } => unreachable!("handled above"),
        NumbersCommand::List => {
            for n in store.numbers().await? {
                println!("{}\t{}", n.number, n.tenant);
            }
        }
        NumbersCommand::Move { number, to } => {
            let parsed = PhoneNumber::parse(&number).with_context(|| format!("{number:?}"))?;
            let tenant = tenant_of(&parsed).await?;
            let entry = audit(
                tenant.as_deref(),
                "number.update",
                &number,
                json!({ "after": { "pinned_node": to } }),
            );
            store
                .apply(&Change::Pin(parsed, Some(to.clone())), &entry)
                .await?;
            println!("{number} pinned to {to}: it moves there while {to} is live");
        }
        NumbersCommand::Unpin { number } => {
            let parsed = PhoneNumber::parse(&number).with_context(|| format!("{number:?}"))?;
            let tenant = tenant_of(&parsed).await?;
            let entry = audit(
                tenant.as_deref(),
                "number.update",
                &number,
                json!({ "after": { "pinned_node": null } }),
            );
            store.apply(&Change::Pin(parsed, None), &entry).await?;
            println!("{number} unpinned");
        }
        NumbersCommand::Remove { numbers } => {
            for raw in numbers {
                let number = PhoneNumber::parse(&raw).with_context(|| format!("{raw:?}"))?;
                let tenant = tenant_of(&number).await?;
                let entry = audit(tenant.as_deref(), "number.delete", &raw, json!({}));
                store.apply(&Change::RemoveNumber(number), &entry).await?;
                println!("removed {raw}");
            }
        }
    }
    store.close().await;
    Ok(())
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
