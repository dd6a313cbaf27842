//! The overload scenario, shared by `cargo bench --bench overload` (10 minutes) and its short
//! test (`tests/overload.rs`): one number on the embedded store receives ten times what it may
//! send, for a while, through the real processes (`sim serve` and `serve`). The node's backlog
//! must stay bounded (expiring what is past its age limit or cap, counted), and its memory must
//! come back to where it was once the flood is over.
#![allow(dead_code, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;

use super::fleet::{Proc, Rig};

/// What to run.
#[derive(Debug, Clone)]
pub struct Overload {
    /// How long the flood lasts.
    pub flood: Duration,
    /// Its rate, as a multiple of the number's send rate (0.9 per second by default).
    pub factor: f64,
    /// `runtime.outbound_max_age`.
    pub max_age: Duration,
    /// `runtime.outbound_max_queued`.
    pub max_queued: usize,
}

/// The node's send rate (`runtime.send_per_second`'s default).
pub const SEND_PER_SECOND: f64 = 0.9;

/// What it measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub flood_s: f64,
    pub rate_per_s: f64,
    pub max_age_s: f64,
    pub max_queued: usize,
    /// Inbound messages offered during the flood.
    pub offered: u64,
    /// Replies the contacts received.
    pub replies_sent: u64,
    /// Replies that expired (past the age limit or the cap).
    pub expired: f64,
    pub expired_by_age: f64,
    pub expired_by_cap: f64,
    /// Inbound messages left to WhatsApp by the intake's cap (delivered again later).
    pub intake_deferred: f64,
    /// The largest backlog seen (`switchboard_outbound_queue_depth`, sampled each second).
    pub max_queue_depth: f64,
    /// The backlog once the flood was over and the node settled.
    pub end_queue_depth: f64,
    /// The node's resident memory before the flood, at its largest, and after it.
    pub rss_before_bytes: u64,
    pub rss_max_bytes: u64,
    pub rss_after_bytes: u64,
    /// `rss_after_bytes / rss_before_bytes`.
    pub rss_after_ratio: f64,
    /// Every inbound message answered or its reply expired: the ledger's unanswered count
    /// equals the expired replies (nothing lost silently).
    pub unanswered: u64,
    pub duplicate_replies: u64,
    /// Where the resident memory was, before and after: what explains a difference.
    pub memory_before: Memory,
    pub memory_after: Memory,
}

/// The parts of a process's resident memory (`/proc/<pid>/status`), in KiB, and its threads.
#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    pub anon_kib: u64,
    pub file_kib: u64,
    pub shmem_kib: u64,
    pub threads: u64,
}

impl Memory {
    fn of(p: &Proc) -> Self {
        Self {
            anon_kib: p.status("RssAnon"),
            file_kib: p.status("RssFile"),
            shmem_kib: p.status("RssShmem"),
            threads: p.status("Threads"),
        }
    }
}

const NUMBER: &str = "+15556000001";

/// How long the node is left idle before its memory is read: its conversations stop after 30 s
/// without a message, and the allocator returns what they freed within seconds.
const IDLE: Duration = Duration::from_secs(45);

/// Runs the scenario; `progress` prints a line every ten seconds.
pub async fn run(o: &Overload, progress: bool) -> Report {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/overload.db?mode=rwc", dir.path().display());
    let max_age = format!("{}s", o.max_age.as_secs());
    let max_queued = o.max_queued.to_string();
    let env = [
        ("SWITCHBOARD__RUNTIME__OUTBOUND_MAX_AGE", max_age.as_str()),
        (
            "SWITCHBOARD__RUNTIME__OUTBOUND_MAX_QUEUED",
            max_queued.as_str(),
        ),
        ("SWITCHBOARD__RUNTIME__TYPING_PER_CHAR", "10ms"),
        // Idle conversations stop (and free their chat's memory) sooner than the 5 minutes of
        // the default, so that "before" and "after" are both measured on an idle node.
        ("SWITCHBOARD__RUNTIME__CONVERSATION_IDLE", "30s"),
    ];
    let rig = Rig::new(&url, vec![NUMBER.to_owned()], &env).await;
    let serve = rig.serve().await;
    while rig.metric("switchboard_numbers{state=\"online\"}").await < 1.0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Warm-up at half the send rate, so that every chat and code path has run once; then the
    // memory before the flood.
    traffic(&rig, SEND_PER_SECOND / 2.0, Duration::from_secs(40), 1).await;
    tokio::time::sleep(Duration::from_secs(42)).await;
    rig.drained(Duration::from_secs(120)).await;
    tokio::time::sleep(IDLE).await;
    let rss_before = serve.rss_bytes();
    let memory_before = Memory::of(&serve);
    let offered_before = rig.summary().await["inbound"].as_u64().unwrap();

    let rate = SEND_PER_SECOND * o.factor;
    traffic(&rig, rate, o.flood, 2).await;
    let started = Instant::now();
    let mut max_depth: f64 = 0.0;
    let mut rss_max = rss_before;
    let mut sample = |depth: f64, rss: u64| {
        max_depth = max_depth.max(depth);
        rss_max = rss_max.max(rss);
    };
    // The flood, then the backlog drains or expires.
    let end = o.flood + o.max_age + Duration::from_secs(30);
    while started.elapsed() < end {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let depth = rig.metric("switchboard_outbound_queue_depth").await;
        sample(depth, serve.rss_bytes());
        let secs = started.elapsed().as_secs();
        if progress && secs.is_multiple_of(10) {
            eprintln!(
                "overload: {secs:>4} s  queue {depth:>5}  rss {:>4} MiB  expired {}",
                serve.rss_bytes() >> 20,
                rig.metric("switchboard_outbound_expired_total").await
            );
        }
        if started.elapsed() > o.flood && depth == 0.0 {
            break;
        }
    }
    // Idle again: the memory after.
    tokio::time::sleep(IDLE).await;
    let rss_after = serve.rss_bytes();
    let memory_after = Memory::of(&serve);
    let s = rig.summary().await;
    Report {
        flood_s: o.flood.as_secs_f64(),
        rate_per_s: rate,
        max_age_s: o.max_age.as_secs_f64(),
        max_queued: o.max_queued,
        offered: s["inbound"].as_u64().unwrap() - offered_before,
        replies_sent: s["outbound"].as_u64().unwrap(),
        expired: rig.metric("switchboard_outbound_expired_total").await,
        expired_by_age: rig
            .metric("switchboard_outbound_expired_total{reason=\"age\"}")
            .await,
        expired_by_cap: rig
            .metric("switchboard_outbound_expired_total{reason=\"cap\"}")
            .await,
        intake_deferred: rig.metric("switchboard_intake_deferred_total").await,
        max_queue_depth: max_depth,
        end_queue_depth: rig.metric("switchboard_outbound_queue_depth").await,
        rss_before_bytes: rss_before,
        rss_max_bytes: rss_max,
        rss_after_bytes: rss_after,
        rss_after_ratio: rss_after as f64 / rss_before.max(1) as f64,
        unanswered: s["inbound_unanswered"].as_u64().unwrap(),
        duplicate_replies: s["duplicate_replies"].as_u64().unwrap(),
        memory_before,
        memory_after,
    }
}

/// Scripted contacts (20 of them) write to the number at `rate` for `lasting`.
async fn traffic(rig: &Rig, rate: f64, lasting: Duration, seed: u64) {
    rig.post(
        "/traffic",
        json!({"numbers": [NUMBER], "contacts_per_number": 20, "rate_per_s": rate,
               "duration_s": lasting.as_secs_f64(), "seed": seed}),
    )
    .await;
}
