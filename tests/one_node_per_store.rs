//! One node per store: a second `switchboard serve` on a store a live node runs exits at once
//! with an error naming that node, and touches no number; once the first node is gone (even
//! killed with SIGKILL) the store can be run again at once.
#![allow(clippy::unwrap_used, clippy::panic)]

#[path = "support/db.rs"]
mod db;
#[path = "support/fleet.rs"]
mod fleet;

use std::process::Stdio;
use std::time::{Duration, Instant};

use db::TestDb;
use fleet::{Rig, free_port};
use switchboard::store::Dialect;

async fn second_node_is_refused(dialect: Dialect) {
    let database = TestDb::new(dialect).await;
    let rig = Rig::new(
        &database.url,
        vec!["+15557000001".to_owned()],
        &[("SWITCHBOARD__NODE__ID", "node-a")],
    )
    .await;
    let mut first = rig.serve().await;
    wait_ready(&rig).await;

    let second = rig
        .node
        .command(&["serve"])
        .env("SWITCHBOARD__NODE__ID", "node-b")
        .env(
            "SWITCHBOARD__HTTP__LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = tokio::task::spawn_blocking(move || second.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(stderr.contains("node `node-a`"), "names the node: {stderr}");
    let s = rig.summary().await;
    assert_eq!(
        s["stream_replaced"], 0,
        "the second node never connected: {s}"
    );

    // The first node dies without a word; its claim goes with it.
    rig.node.kill(&mut first);
    let _again = rig.node.start();
    wait_ready(&rig).await;
}

async fn wait_ready(rig: &Rig) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while rig.readyz().await != 200 {
        assert!(
            Instant::now() < deadline,
            "not ready:\n{}",
            rig.node.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_node_on_a_sqlite_store_is_refused_naming_the_first() {
    second_node_is_refused(Dialect::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_node_on_a_postgres_store_is_refused_naming_the_first() {
    second_node_is_refused(Dialect::Postgres).await;
}
