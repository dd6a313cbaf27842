//! `switchboard serve` on the whatsapp transport with WhatsApp unreachable: every number keeps
//! trying (connecting, with its failed connects counted), nothing panics, `/readyz` answers,
//! and SIGTERM stops the node cleanly within its deadline. (Its CPU use is measured by
//! `cargo bench --bench offline`.)
#![allow(clippy::unwrap_used, clippy::panic)]

#[path = "support/fleet.rs"]
mod fleet;

use std::time::{Duration, Instant};

use fleet::{Node, wait_healthy};

const NUMBERS: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_whatsapp_every_number_keeps_connecting_and_the_node_stops_cleanly() {
    let node = Node::offline_whatsapp(NUMBERS);
    let http = reqwest::Client::new();
    let mut serve = node.start();
    wait_healthy(&http, &format!("{}/readyz", node.http)).await;

    // Every number is connecting, and each has failed at least twice (the backoff's first
    // steps are 1 s and 1 s): failed connects emit no event, the count comes from the client.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let connecting = node
            .metric(&http, "switchboard_numbers{state=\"connecting\"}")
            .await;
        let failures = node
            .metric(
                &http,
                "switchboard_connect_failures_total{transport=\"whatsapp\"}",
            )
            .await;
        if connecting == NUMBERS as f64 && failures >= 2.0 * NUMBERS as f64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "connecting {connecting}, failures {failures}\n{}",
            node.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        node.metric(&http, "switchboard_numbers{state=\"failed\"}")
            .await,
        0.0,
        "an unreachable WhatsApp spends no restart budget"
    );
    assert!(serve.0.try_wait().unwrap().is_none(), "still running");

    let stopped = Instant::now();
    let code = serve.terminate(Duration::from_secs(15));
    assert_eq!(
        code,
        Some(0),
        "a clean exit on SIGTERM\n{}",
        node.log_tail(20)
    );
    assert!(
        stopped.elapsed() < Duration::from_secs(12),
        "within the shutdown deadline"
    );
    let log = std::fs::read_to_string(node.dir.path().join("serve.log")).unwrap();
    assert!(
        !log.contains("panicked"),
        "no panic:\n{}",
        node.log_tail(40)
    );
}
