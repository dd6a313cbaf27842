//! `switchboard serve` in-process, from start to shutdown and again: ready only once running,
//! answers a message end to end on the embedded store, shuts down within its deadline, and a
//! second run resumes from what the first committed without sending anything twice.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::net::SocketAddr;
use std::time::Duration;

use switchboard::config::Config;
use switchboard::sim::{Network, SimConfig};
use switchboard::store::{NumberRecord, SessionCipher, TenantRecord};
use switchboard_actors::PhoneNumber;
use switchboard_actors::store::Store;
use tokio::time::Instant;

async fn eventually(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_shuts_down_in_time_and_resumes_without_sending_twice() {
    let dir = tempfile::tempdir().unwrap();
    let network = Network::new(SimConfig::default());
    let sim_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim_addr = sim_listener.local_addr().unwrap();
    let sim = tokio::spawn(switchboard::sim::server::serve(
        sim_listener,
        network.clone(),
        std::future::pending(),
    ));
    let http = free_addr();
    let file = dir.path().join("node.toml");
    std::fs::write(
        &file,
        format!(
            "[store]\nurl = \"sqlite://{}/node.db?mode=rwc\"\nsession_keys = \"{}\"\n\
             [transport]\nsim_url = \"http://{sim_addr}\"\n[http]\nlisten = \"{http}\"\n\
             [runtime]\ntyping_per_char = \"0ms\"\n",
            dir.path().display(),
            SessionCipher::generate("k1"),
        ),
    )
    .unwrap();
    let config = Config::load(Some(&file)).unwrap();

    let number = PhoneNumber::parse("+15550031").unwrap();
    let store = switchboard::app::open_store(&config.store).await.unwrap();
    let tenant = TenantRecord {
        id: "t".into(),
        name: "t".into(),
        full_transcripts: false,
    };
    store.create_tenant(&tenant).await.unwrap();
    let record = NumberRecord {
        number: number.clone(),
        tenant: "t".into(),
        pinned_node: None,
        settings: serde_json::json!({}),
    };
    store.add_number(&record).await.unwrap();
    store.close().await;
    network.create_account(&number);

    let client = reqwest::Client::new();
    let readyz = format!("http://{http}/readyz");
    let node = start(&config, &client, &readyz).await;
    eventually("paired", async || network.pair(&number, None).is_ok()).await;
    let contact = PhoneNumber::parse("+4915100041").unwrap();
    network
        .inbound(&number, &contact, "hello", None, None)
        .unwrap();
    eventually("answered", async || {
        let s = network.summary();
        s.inbound_unanswered == 0 && s.inbound_acked == 1
    })
    .await;
    node.stop().await;
    assert!(client.get(&readyz).send().await.is_err(), "HTTP stopped");

    // Processed before acknowledged: nothing left to process. The reply is settled by its server
    // ack, or by a receipt the next run gets from the offline queue.
    let store = switchboard::app::open_store(&config.store).await.unwrap();
    assert!(store.unprocessed(&number).await.unwrap().is_empty());
    assert!(
        store.load_session(&number).await.unwrap().is_some(),
        "session kept"
    );

    let node = start(&config, &client, &readyz).await;
    eventually("reply settled", async || {
        store.unsent(&number).await.unwrap().is_empty()
    })
    .await;
    node.stop().await;
    let s = network.summary();
    assert_eq!((s.outbound, s.duplicate_outbound_ids), (1, 0), "{s:?}");
    assert_eq!(
        s.connections, 3,
        "pairing reconnects once; the second run connected without pairing"
    );
    store.close().await;
    sim.abort();
}

struct Node {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Node {
    /// Triggers shutdown and waits for it, within its deadline.
    async fn stop(self) {
        let started = Instant::now();
        self.stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("shutdown within its deadline")
            .unwrap()
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(15));
    }
}

/// Runs `serve` until stopped; returns once it reports ready.
async fn start(config: &Config, client: &reqwest::Client, readyz: &str) -> Node {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(switchboard::serve::run(config.clone(), async {
        let _ = stopped.await;
    }));
    eventually("ready", async || {
        client
            .get(readyz)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
    Node { stop, task }
}
