//! `cargo bench --bench clients [-- --clients 1000 --settle 10]`: real whatsapp-rust clients, one
//! per number, through Switchboard's whatsapp transport on the PostgreSQL store, logging in to
//! the fake WhatsApp endpoint (`tests/support/fake_wa.rs`).
//!
//! The clients all run in this process; the fake runs in a child process (this binary again,
//! with `--serve-fake`), so the memory measured is the clients' alone. Every number starts
//! paired (a registered device in the store), all sessions start at once, and the bench waits
//! until every one reported `Connected`, then at least `--settle` seconds more, until the store
//! stops growing (what a client does after login: pre-key uploads), before measuring.
//!
//! Prints one JSON line: `clients`, `all_connected_s`, `rss_per_client_bytes` (RSS growth from
//! before the first session to after the settle, per client), `rss_bytes`,
//! `store_rows_per_client` and `store_bytes_per_client` (the `wa_state` rows and their data).

/// The binary's allocator and runtime, so that the memory figures are the node's.
#[path = "../src/allocator.rs"]
mod allocator;
#[path = "../tests/support/db.rs"]
#[allow(missing_docs)]
mod db;
#[path = "../tests/support/fake_wa.rs"]
#[allow(missing_docs)]
mod fake_wa;
#[path = "../tests/support/fleet.rs"]
#[allow(missing_docs, unused_imports)]
mod fleet;

use std::io::{BufRead, Read, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fleet::arg;
use switchboard::store::{Dialect, NumberRecord, TenantRecord};
use switchboard::whatsapp::{WaBackend, WhatsAppConnector, WhatsAppOptions};
use switchboard_actors::PhoneNumber;
use switchboard_actors::coordinator::{Lease, TokenSource};
use switchboard_actors::store::Fence;
use switchboard_actors::transport::{AccountSpec, WaConnector, WaEvent, WaSession};
use whatsapp_rust::wacore::store::Device;
use whatsapp_rust::wacore::store::traits::DeviceStore;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--serve-fake") {
        return serve_fake();
    }
    let clients: usize = arg(&args, "--clients", 1000);
    let settle: u64 = arg(&args, "--settle", 10);
    let runtime = allocator::runtime()?;
    let line = runtime.block_on(bench(clients, Duration::from_secs(settle)))?;
    println!("{line}");
    Ok(())
}

/// The child: the fake endpoint, answering every login with success, until stdin closes.
fn serve_fake() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let fake = runtime.block_on(fake_wa::FakeWhatsApp::start(fake_wa::Answer::Success));
    println!("{}", fake.url);
    std::io::stdout().flush()?;
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
    drop(fake);
    Ok(())
}

async fn bench(clients: usize, settle: Duration) -> anyhow::Result<serde_json::Value> {
    let mut child = Command::new(std::env::current_exe()?)
        .arg("--serve-fake")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut url = String::new();
    std::io::BufReader::new(child.stdout.take().expect("piped"))
        .read_line(&mut url)
        .map_err(|e| anyhow::anyhow!("the fake did not start: {e}"))?;
    let url = url.trim().to_owned();

    let db = db::TestDb::new(Dialect::Postgres).await;
    let store = db.store().await;
    store
        .create_tenant(&TenantRecord {
            id: "bench".into(),
            name: "bench".into(),
            full_transcripts: false,
        })
        .await?;
    let mut fences = Vec::with_capacity(clients);
    for i in 0..clients {
        let digits = format!("1555{:07}", 1_000_000 + i);
        let number = PhoneNumber::parse(&format!("+{digits}"))?;
        store
            .add_number(&NumberRecord {
                number: number.clone(),
                tenant: "bench".into(),
                pinned_node: None,
                settings: serde_json::json!({}),
            })
            .await?;
        let fence = Fence {
            number: number.clone(),
            token: store.next_token(&number).await?,
        };
        // A paired device, as `switchboard numbers login` leaves it.
        let mut device = Device::new();
        device.pn = Some(format!("{digits}:5@s.whatsapp.net").parse()?);
        device.push_name = "Switchboard bench".into();
        WaBackend::new(
            store.protocol_state(fence.clone()),
            Lease::new(fence.clone()),
        )
        .save(&device)
        .await?;
        fences.push(fence);
    }
    let paired = store.protocol_footprint().await?;

    let connector = WhatsAppConnector::new(
        store.clone(),
        WhatsAppOptions {
            url,
            ..WhatsAppOptions::default()
        },
    );
    let connected = Arc::new(AtomicUsize::new(0));
    let rss_before = rss_bytes();
    let t0 = Instant::now();
    let mut starting = tokio::task::JoinSet::new();
    for fence in fences {
        let connector = connector.clone();
        let connected = connected.clone();
        starting.spawn(async move {
            let once = std::sync::Once::new();
            let sink = Arc::new(move |e: WaEvent| {
                if e == WaEvent::Connected {
                    once.call_once(|| {
                        connected.fetch_add(1, Ordering::Relaxed);
                    });
                }
            });
            connector
                .start(
                    AccountSpec {
                        number: fence.number.clone(),
                        client_label: "Switchboard bench".into(),
                        credentials: None,
                        lease: Lease::new(fence),
                    },
                    sink,
                )
                .await
        });
    }
    let mut sessions: Vec<Arc<dyn WaSession>> = Vec::with_capacity(clients);
    while let Some(started) = starting.join_next().await {
        sessions.push(started??);
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while connected.load(Ordering::Relaxed) < clients {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {clients} clients connected in 10 min",
            connected.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let all_connected = t0.elapsed();
    // What the clients do after login (pre-key uploads) is done when the store stops growing.
    let settled = Instant::now();
    let mut footprint = store.protocol_footprint().await?;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = store.protocol_footprint().await?;
        let quiet = now == footprint;
        footprint = now;
        if (quiet && settled.elapsed() >= settle) || settled.elapsed() > Duration::from_secs(300) {
            break;
        }
    }
    let rss = rss_bytes();
    let still = connected.load(Ordering::Relaxed);

    for session in &sessions {
        session.shutdown().await;
    }
    drop(child.stdin.take());
    let _ = child.wait();

    let per = |v: u64| (v as f64 / clients as f64).round();
    Ok(serde_json::json!({
        "bench": "clients",
        "clients": clients,
        "connected": still,
        "all_connected_s": (all_connected.as_secs_f64() * 1000.0).round() / 1000.0,
        "rss_bytes": rss,
        "rss_per_client_bytes": per(rss.saturating_sub(rss_before)),
        "store_rows_per_client": per(footprint.rows),
        "store_bytes_per_client": per(footprint.bytes),
        "store_rows_per_client_paired": per(paired.rows),
    }))
}

/// This process's resident memory, from `/proc`.
fn rss_bytes() -> u64 {
    fleet::proc_status("self", "VmRSS") * 1024
}
