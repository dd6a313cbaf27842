//! `cargo bench --bench overload [-- --minutes 10 --factor 10 --max-age-s 600 --max-queued 1000]`: ten times the send rate into
//! one number for ten minutes, through the real processes; prints one JSON line (see
//! `overload/scenario.rs` for the fields).

#[path = "../tests/support/fleet.rs"]
#[allow(missing_docs, unused_imports)]
mod fleet;
#[path = "overload/scenario.rs"]
#[allow(missing_docs)]
mod scenario;

use std::time::Duration;

use fleet::arg;
use scenario::{Overload, run};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let minutes = arg(&args, "--minutes", 10.0);
    let o = Overload {
        flood: Duration::from_secs_f64(minutes * 60.0),
        factor: arg(&args, "--factor", 10.0),
        // The product defaults, unless told otherwise.
        max_age: Duration::from_secs_f64(arg(&args, "--max-age-s", 600.0)),
        max_queued: arg(&args, "--max-queued", 1000.0) as usize,
    };
    let report = run(&o, true).await;
    println!(
        "{}",
        serde_json::to_string(&report).expect("the report serializes")
    );
}
