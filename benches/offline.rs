//! `cargo bench --bench offline [-- --numbers 100 --seconds 60]`: `switchboard serve` on the
//! whatsapp transport with WhatsApp unreachable (every connect refused). Measures the node's CPU
//! use over `--seconds` once the numbers are all connecting, and how long SIGTERM takes to stop
//! it. Prints one JSON line: `numbers`, `connecting`, `connect_failures`, `cpu_percent_of_core`,
//! `rss_bytes`, `shutdown_s`, `exit_code`.

#[path = "../tests/support/fleet.rs"]
#[allow(missing_docs, unused_imports)]
mod fleet;

use std::time::{Duration, Instant};

use fleet::{Node, arg, wait_healthy};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let numbers: usize = arg(&args, "--numbers", 100);
    let seconds: u64 = arg(&args, "--seconds", 60);
    let node = Node::offline_whatsapp(numbers);
    let http = reqwest::Client::new();
    let mut serve = node.start();
    wait_healthy(&http, &format!("{}/readyz", node.http)).await;
    let connecting = "switchboard_numbers{state=\"connecting\"}";
    while node.metric(&http, connecting).await < numbers as f64 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The first steps of the backoff are dense; measure the steady state after them.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (cpu_before, at) = (serve.cpu_time(), Instant::now());
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let cpu = (serve.cpu_time() - cpu_before).as_secs_f64() / at.elapsed().as_secs_f64();
    let still_connecting = node.metric(&http, connecting).await;
    let failures = node
        .metric(
            &http,
            "switchboard_connect_failures_total{transport=\"whatsapp\"}",
        )
        .await;
    let rss = serve.rss_bytes();
    let stopping = Instant::now();
    let code = serve.terminate(Duration::from_secs(30));
    println!(
        "{}",
        serde_json::json!({
            "bench": "offline",
            "numbers": numbers,
            "seconds": seconds,
            "connecting": still_connecting,
            "connect_failures": failures,
            "cpu_percent_of_core": (cpu * 1000.0).round() / 10.0,
            "rss_bytes": rss,
            "shutdown_s": (stopping.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
            "exit_code": code,
        })
    );
}
