//! The overload benchmark's scenario, short: ten times the send rate into one number for a
//! minute, with a backlog limit of 20 s and 30 replies so that both expire. The backlog stays
//! within its cap, what expires is counted, nothing is answered twice, and the node's memory
//! comes back to within 10 % of where it was.
#![allow(clippy::unwrap_used)]

#[path = "support/fleet.rs"]
mod fleet;
#[path = "../benches/overload/scenario.rs"]
mod scenario;

use std::time::Duration;

use scenario::{Overload, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_into_one_number_keeps_its_backlog_bounded_and_its_memory_returns() {
    let o = Overload {
        flood: Duration::from_secs(60),
        factor: 10.0,
        max_age: Duration::from_secs(20),
        max_queued: 30,
    };
    let r = run(&o, false).await;
    println!("{}", serde_json::to_string(&r).unwrap());
    // The cap, and the replies being written or awaiting their ack.
    assert!(r.max_queue_depth <= (o.max_queued + 5) as f64, "{r:?}");
    assert_eq!(r.end_queue_depth, 0.0);
    assert!(r.expired_by_cap > 0.0 && r.expired_by_age > 0.0, "{r:?}");
    assert_eq!(r.duplicate_replies, 0);
    assert_eq!(
        r.unanswered as f64, r.expired,
        "every message answered, or its reply expired and counted"
    );
    assert!(r.rss_after_ratio <= 1.10, "{r:?}");
}
