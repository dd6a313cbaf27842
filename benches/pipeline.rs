//! Pipeline benchmark: the whole durable message path on a real store, against the in-process
//! simulator, compared with the store's own write ceiling measured in the same run.
//!
//! `cargo bench --bench pipeline -- --store postgres|sqlite --messages 200000` prints one JSON
//! line:
//! - `msgs_per_s`: M messages offered at once by the simulated contacts, divided by the time
//!   until the network has received the last reply. Each message goes the whole way: intake,
//!   inbound log (group commit), conversation actor, completion (processed mark + outbox row +
//!   checkpoint, group commit), pacer, server ack, sent mark (group commit). Offered at once,
//!   nearly every message waits behind others in its chat, so it is recorded before it is
//!   processed; only each chat's first message takes the fast way below.
//! - `p50_ms` / `p99_ms`: latency from a contact sending a message to the network receiving its
//!   reply (the simulator's ledger, millisecond resolution), with messages offered at half of
//!   the measured maximum rate. Most of them find their chat idle and are recorded together with
//!   their completion (one group commit on the way to the reply).
//! - `ceiling_rows_per_s`: a fresh database of the same kind written with the same rows (inbound
//!   insert, processed update, outbox insert, sent update, checkpoint upsert), through the same
//!   statements and transactions, in tight batches of `batch_max` with nothing else running.
//! - `ratio`: pipeline rows written per second / ceiling rows per second (4 rows per message
//!   counted on both sides; both also upsert checkpoints).
//! - `disk_*` and `p99_ms_clear_of_disk_stalls`: the disk's own flush latency during the latency
//!   phase, and the p99 of the messages that no stall of it overlapped (see `pipeline/disk.rs`).
//!
//! For profiling, `--only throughput|latency|ceiling` runs one phase (`latency` with
//! `--latency-rate R`); the others report 0.
//!
//! WhatsApp's per-account send limit is lifted in the simulator and the pacer for this run, and
//! with it the node's bounds on intake and backlog (every message is offered at once): the
//! benchmark measures Switchboard and its store, not the network's policy.

#[path = "../tests/support/db.rs"]
#[allow(missing_docs, unused_imports)]
mod db;
#[path = "pipeline/disk.rs"]
#[allow(missing_docs)]
mod disk;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use switchboard::sim::ledger::LedgerEvent;
use switchboard::sim::network::contact_of;
use switchboard::sim::{Dialer, Network, SimConfig, SimConnector};
use switchboard::store::{
    Dialect, HotWrite, NumberRecord, SessionCipher, SqlStore, StoreOptions, TenantRecord,
};
use switchboard_actors::coordinator::TokenSource;
use switchboard_actors::deps::SendRate;
use switchboard_actors::responder::ChatContext;
use switchboard_actors::store::{Completion, Fence, Store};
use switchboard_actors::transport::{Credentials, InboundMessage, MessageId, OutboundText};
use switchboard_actors::{Deps, Fleet, FleetCounters, NumberPhase, PhoneNumber, Settings};
use tokio::time::Instant;

/// The binary's allocator and its options, so the benchmark measures what runs.
#[path = "../src/allocator.rs"]
mod allocator;

/// Per-message rows counted on both sides.
const ROWS_PER_MESSAGE: f64 = 4.0;

struct Args {
    dialect: Dialect,
    messages: usize,
    numbers: usize,
    contacts: u32,
    /// Measure latency at this rate instead of half of the maximum.
    latency_rate: Option<f64>,
    /// Run only this phase (`throughput`, `latency` or `ceiling`), for profiling; the others
    /// report 0 (`latency` needs `--latency-rate`).
    only: Option<String>,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        dialect: Dialect::Postgres,
        messages: 200_000,
        numbers: 100,
        contacts: 50,
        latency_rate: None,
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().context(format!("{arg} needs a value"));
        match arg.as_str() {
            "--store" => {
                a.dialect = match value()?.as_str() {
                    "postgres" => Dialect::Postgres,
                    "sqlite" => Dialect::Sqlite,
                    other => anyhow::bail!("--store {other}: postgres or sqlite"),
                }
            }
            "--messages" => a.messages = value()?.parse()?,
            "--numbers" => a.numbers = value()?.parse()?,
            "--contacts" => a.contacts = value()?.parse()?,
            "--latency-rate" => a.latency_rate = Some(value()?.parse()?),
            "--only" => a.only = Some(value()?),
            _ => {} // cargo bench passes --bench
        }
    }
    Ok(a)
}

fn main() -> anyhow::Result<()> {
    let a = args()?;
    let runtime = allocator::runtime()?;
    let report = runtime.block_on(run(a))?;
    println!("{report}");
    Ok(())
}

/// The store settings of `config/default.toml` (or `SWITCHBOARD__STORE__*` overrides).
fn store_config() -> anyhow::Result<switchboard::config::StoreConfig> {
    Ok(switchboard::config::Config::load(None)?.store)
}

async fn open(db: &db::TestDb) -> anyhow::Result<SqlStore> {
    let c = store_config()?;
    Ok(SqlStore::connect(StoreOptions {
        url: db.url.clone(),
        max_connections: c.max_connections,
        batch_max: c.batch_max,
        batch_wait: c.batch_wait,
        cipher: Arc::new(SessionCipher::parse(&SessionCipher::generate("bench"))?),
    })
    .await?)
}

/// Registers the numbers and takes ownership of them.
async fn seed(store: &SqlStore, numbers: &[PhoneNumber]) -> anyhow::Result<Vec<Fence>> {
    store
        .create_tenant(&TenantRecord {
            id: "bench".into(),
            name: "bench".into(),
            full_transcripts: false,
        })
        .await?;
    let mut fences = Vec::new();
    for n in numbers {
        store
            .add_number(&NumberRecord {
                number: n.clone(),
                tenant: "bench".into(),
                pinned_node: None,
                settings: serde_json::json!({}),
            })
            .await?;
        fences.push(Fence {
            number: n.clone(),
            token: store.next_token(n).await?,
        });
    }
    Ok(fences)
}

async fn run(a: Args) -> anyhow::Result<serde_json::Value> {
    let numbers: Vec<PhoneNumber> = (0..a.numbers)
        .map(|i| PhoneNumber::parse(&format!("+1555300{i:04}")))
        .collect::<Result<_, _>>()?;
    let runs = |phase: &str| a.only.as_deref().is_none_or(|only| only == phase);
    let (max_rate, unanswered_1, duplicates_1) = if runs("throughput") {
        throughput(&a, &numbers).await?
    } else {
        (0.0, 0, 0)
    };
    let latency_rate = a.latency_rate.unwrap_or(max_rate / 2.0);
    let (lat, unanswered_2, duplicates_2) = if runs("latency") {
        latency(&a, &numbers, latency_rate).await?
    } else {
        (Latency::default(), 0, 0)
    };
    eprintln!(
        "latency at {latency_rate:.0} msgs/s: p50 {} ms, p99 {} ms, max {} ms; disk: {} stalls over {} ms ({} ms in all, worst {} ms); p99 clear of them {} ms",
        lat.p50,
        lat.p99,
        lat.max,
        lat.disk.stalls.len(),
        disk::STALL_MS,
        lat.disk.stalled_ms(),
        lat.disk.max_ms,
        lat.p99_clear,
    );
    let ceiling_msgs_per_s = if runs("ceiling") {
        ceiling(&a, &numbers).await?
    } else {
        0.0
    };
    let c = store_config()?;
    Ok(serde_json::json!({
        "store": a.dialect.as_str(),
        "messages": a.messages,
        "numbers": a.numbers,
        "chats": a.numbers * a.contacts as usize,
        "msgs_per_s": max_rate,
        "p50_ms": lat.p50,
        "p99_ms": lat.p99,
        "latency_rate_msgs_per_s": latency_rate,
        "ceiling_rows_per_s": ceiling_msgs_per_s * ROWS_PER_MESSAGE,
        "pipeline_rows_per_s": max_rate * ROWS_PER_MESSAGE,
        "ratio": max_rate / ceiling_msgs_per_s,
        "batch_max": c.batch_max,
        "batch_wait_ms": c.batch_wait.as_secs_f64() * 1000.0,
        "inbound_unanswered": unanswered_1 + unanswered_2,
        "duplicate_replies_or_ids": duplicates_1 + duplicates_2,
        "disk_flushes": lat.disk.flushes,
        "disk_flush_p50_ms": lat.disk.p50_ms,
        "disk_flush_max_ms": lat.disk.max_ms,
        "disk_stalls": lat.disk.stalls.len(),
        "disk_stalled_ms": lat.disk.stalled_ms(),
        "p99_ms_clear_of_disk_stalls": lat.p99_clear,
    }))
}

/// A fleet of `numbers` on `store`, on an in-process simulator without the send limit.
struct Rig {
    network: Network,
    fleet: Fleet,
    /// Messages offered so far (ids stay unique across phases).
    offered: usize,
}

impl Rig {
    async fn start(store: &SqlStore, numbers: &[PhoneNumber]) -> anyhow::Result<Self> {
        let fences = seed(store, numbers).await?;
        let network = Network::new(SimConfig {
            send_burst: 1_000_000,
            send_per_second: 1e9,
            ..SimConfig::default()
        });
        for fence in &fences {
            let creds = network.create_paired_account(&fence.number);
            store.save_session(fence, &Credentials(creds)).await?;
        }
        let (store_port, coordinator) = store.ports();
        let deps = Deps {
            connector: Arc::new(SimConnector::new(Dialer::Local(network.clone()))),
            responder: Arc::new(switchboard::bot::KeywordBot),
            ai: Arc::new(switchboard::bot::CannedModel),
            store: store_port,
            coordinator,
            settings: Settings {
                typing_per_char: Duration::ZERO,
                send_rate: SendRate {
                    burst: 1_000_000,
                    per_second: 1e9,
                },
                // Every message is offered at once: the intake and backlog bounds, there to
                // protect a node from WhatsApp, are lifted with the send limit.
                intake_max_pending: usize::MAX,
                outbound_max_queued: usize::MAX,
                ..Settings::default()
            },
            counters: Arc::new(FleetCounters::default()),
        };
        let fleet = Fleet::start(deps).await?;
        for n in numbers {
            fleet.add(n.clone())?;
        }
        let target = i64::try_from(numbers.len())?;
        while fleet.counters().numbers(NumberPhase::Online) < target {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Let every pacer see its first offline sync before any clock starts.
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(Self {
            network,
            fleet,
            offered: 0,
        })
    }

    /// Offers `count` messages (at `rate` per second, or all at once) and waits until all are
    /// answered; returns their ids.
    async fn run(
        &mut self,
        a: &Args,
        numbers: &[PhoneNumber],
        count: usize,
        rate: Option<f64>,
    ) -> anyhow::Result<Vec<(PhoneNumber, MessageId)>> {
        let ids = offer(
            &self.network,
            numbers,
            a.contacts,
            self.offered,
            count,
            rate,
        )
        .await?;
        self.offered += count;
        wait_answered(&self.network, self.offered).await;
        Ok(ids)
    }

    /// Unanswered messages and duplicate replies or ids, from the referee.
    async fn stop(self) -> (u64, u64) {
        let s = self.network.summary();
        self.fleet.shutdown(Duration::from_secs(30)).await;
        (
            s.inbound_unanswered,
            s.duplicate_replies + s.duplicate_outbound_ids,
        )
    }
}

/// Maximum rate on a fresh database: every message offered at once.
async fn throughput(a: &Args, numbers: &[PhoneNumber]) -> anyhow::Result<(f64, u64, u64)> {
    let db = db::TestDb::new(a.dialect).await;
    let store = open(&db).await?;
    let mut rig = Rig::start(&store, numbers).await?;
    eprintln!("throughput: {} messages at once", a.messages);
    let started = Instant::now();
    rig.run(a, numbers, a.messages, None).await?;
    let rate = a.messages as f64 / started.elapsed().as_secs_f64();
    eprintln!("throughput: {rate:.0} msgs/s");
    let (unanswered, duplicates) = rig.stop().await;
    store.close().await;
    Ok((rate, unanswered, duplicates))
}

/// What the latency phase measured.
#[derive(Default)]
struct Latency {
    /// Offered → reply received over every message, ms.
    p50: f64,
    p99: f64,
    max: f64,
    /// p99 over the messages whose time in flight overlapped no stall of the disk, ms.
    p99_clear: f64,
    /// The disk's own flushes meanwhile.
    disk: disk::Report,
}

/// Latency at `rate` on a fresh database, after one warm-up message per chat (every
/// conversation started), with the disk probed meanwhile.
async fn latency(
    a: &Args,
    numbers: &[PhoneNumber],
    rate: f64,
) -> anyhow::Result<(Latency, u64, u64)> {
    let db = db::TestDb::new(a.dialect).await;
    let store = open(&db).await?;
    let mut rig = Rig::start(&store, numbers).await?;
    let chats = numbers.len() * a.contacts as usize;
    rig.run(a, numbers, chats, Some(rate)).await?;
    let count = (a.messages / 4).max(1000);
    let dir = std::env::temp_dir();
    eprintln!(
        "latency: {count} messages at {rate:.0} msgs/s; probing the disk in {}",
        dir.display()
    );
    let probe = disk::Probe::start(&dir)?;
    let ids = rig.run(a, numbers, count, Some(rate)).await?;
    let disk = disk::Report::of(probe.stop()?);
    let lat = latencies(&rig.network, numbers, &ids, disk);
    let (unanswered, duplicates) = rig.stop().await;
    store.close().await;
    Ok((lat, unanswered, duplicates))
}

/// Offers `count` messages round-robin over numbers and their contacts, at `rate` per second
/// (all at once with `None`). Returns the ids offered.
async fn offer(
    network: &Network,
    numbers: &[PhoneNumber],
    contacts: u32,
    first: usize,
    count: usize,
    rate: Option<f64>,
) -> anyhow::Result<Vec<(PhoneNumber, MessageId)>> {
    let started = Instant::now();
    let mut ids = Vec::with_capacity(count);
    for k in 0..count {
        let i = first + k;
        let number = &numbers[i % numbers.len()];
        let contact = u32::try_from((i / numbers.len()) % contacts as usize)?;
        let from = contact_of(number, contact);
        let id = network.inbound(number, &from, "hello, what are your hours?", None, None)?;
        ids.push((number.clone(), id));
        match rate {
            Some(rate) => {
                let due = started + Duration::from_secs_f64(k as f64 / rate);
                if due > Instant::now() + Duration::from_millis(1) {
                    tokio::time::sleep_until(due).await;
                }
            }
            None if k % 1024 == 0 => tokio::task::yield_now().await,
            None => {}
        }
    }
    Ok(ids)
}

async fn wait_answered(network: &Network, total: usize) {
    let total = total as u64;
    loop {
        let s = network.summary();
        if s.inbound == total && s.inbound_unanswered == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Offered → reply received over `ids`, from the ledger, against the disk's stalls.
fn latencies(
    network: &Network,
    numbers: &[PhoneNumber],
    ids: &[(PhoneNumber, MessageId)],
    disk: disk::Report,
) -> Latency {
    let wanted: std::collections::HashSet<&MessageId> = ids.iter().map(|(_, id)| id).collect();
    // The ledger's clock (ms since the network started) in unix ms.
    let to_unix = disk::unix_ms().saturating_sub(network.now_ms());
    // (offered at, unix ms; latency, ms)
    let mut timed = Vec::with_capacity(ids.len());
    for n in numbers {
        let mut offered: HashMap<MessageId, u64> = HashMap::new();
        for event in network.ledger(n) {
            match event {
                LedgerEvent::InboundOffered { at_ms, id, .. } if wanted.contains(&id) => {
                    offered.insert(id, at_ms);
                }
                LedgerEvent::OutboundReceived {
                    at_ms,
                    reply_to: Some(to),
                    ..
                } => {
                    if let Some(start) = offered.get(&to) {
                        timed.push((to_unix + *start, at_ms.saturating_sub(*start)));
                    }
                }
                _ => {}
            }
        }
    }
    report_slow_windows(&disk, &mut timed);
    let mut clear: Vec<u64> = timed
        .iter()
        .filter(|(at, ms)| disk.worst_within(*at, at + ms).is_none())
        .map(|(_, ms)| *ms)
        .collect();
    let mut all: Vec<u64> = timed.iter().map(|(_, ms)| *ms).collect();
    all.sort_unstable();
    clear.sort_unstable();
    Latency {
        p50: percentile(&all, 0.50),
        p99: percentile(&all, 0.99),
        max: percentile(&all, 1.0),
        p99_clear: percentile(&clear, 0.99),
        disk,
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    sorted
        .get(((sorted.len().saturating_sub(1)) as f64 * p).round() as usize)
        .copied()
        .unwrap_or(0) as f64
}

/// Prints to stderr each 250 ms window of offers whose p90 latency exceeds 25 ms, with its
/// wall-clock time and the worst stall of the disk while its messages were in flight.
fn report_slow_windows(disk: &disk::Report, timed: &mut [(u64, u64)]) {
    const WINDOW_MS: u64 = 250;
    timed.sort_unstable();
    for window in timed.chunk_by(|a, b| a.0 / WINDOW_MS == b.0 / WINDOW_MS) {
        let mut lat: Vec<u64> = window.iter().map(|(_, l)| *l).collect();
        lat.sort_unstable();
        let p90 = lat[lat.len() * 9 / 10];
        if p90 > 25 {
            let start = window[0].0 / WINDOW_MS * WINDOW_MS;
            let end = window.iter().map(|(at, l)| at + l).max().unwrap_or(start);
            let stall = disk
                .worst_within(start, end)
                .map_or("none".to_owned(), |ms| format!("{ms} ms"));
            eprintln!(
                "latency: slow window at unix {}.{:03} s: {} messages, p50 {} ms, p90 {p90} ms, max {} ms; disk stall {stall}",
                start / 1000,
                start % 1000,
                lat.len(),
                lat[lat.len() / 2],
                lat[lat.len() - 1],
            );
        }
    }
}

/// Writes the pipeline's rows for `messages` messages on a fresh database in tight batches of
/// `store.batch_max`, with as many batches committing at once as the batcher allows (`WRITERS`), each
/// message's rows in three commits like the pipeline's; returns messages/s.
async fn ceiling(a: &Args, numbers: &[PhoneNumber]) -> anyhow::Result<f64> {
    let db = db::TestDb::new(a.dialect).await;
    let store = open(&db).await?;
    let fences = Arc::new(seed(&store, numbers).await?);
    let writers = match a.dialect {
        Dialect::Postgres => 4,
        Dialect::Sqlite => 1,
    };
    let batch = store_config()?.batch_max;
    eprintln!("ceiling: {} messages' rows, {writers} writers", a.messages);
    let chunks: Vec<usize> = (0..a.messages).step_by(batch).collect();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let mine: Vec<usize> = chunks.iter().copied().skip(w).step_by(writers).collect();
        let (store, fences, contacts, total) =
            (store.clone(), fences.clone(), a.contacts, a.messages);
        tasks.push(tokio::spawn(async move {
            for start in mine {
                write_chunk(&store, &fences, contacts, start, (start + batch).min(total)).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let rate = a.messages as f64 / started.elapsed().as_secs_f64();
    store.close().await;
    Ok(rate)
}

async fn write_chunk(
    store: &SqlStore,
    fences: &[Fence],
    contacts: u32,
    start: usize,
    end: usize,
) -> anyhow::Result<()> {
    let rows: Vec<(Fence, InboundMessage, OutboundText)> = (start..end)
        .map(|i| row(fences, contacts, i))
        .collect::<anyhow::Result<_>>()?;
    let inbound = rows
        .iter()
        .map(|(f, m, _)| HotWrite::Inbound(f.clone(), m.clone()))
        .collect();
    store.commit_batch(inbound).await?;
    let complete = rows
        .iter()
        .map(|(f, m, r)| {
            HotWrite::Complete(
                f.clone(),
                Completion {
                    chat: m.chat.clone(),
                    sender: m.sender.clone(),
                    inbound: m.id.clone(),
                    replies: vec![r.clone()],
                    checkpoint: ChatContext {
                        turns: 1,
                        from_phone: 0,
                    },
                },
            )
        })
        .collect();
    store.commit_batch(complete).await?;
    let sent = rows
        .iter()
        .map(|(f, _, r)| HotWrite::Sent(f.clone(), r.id.clone()))
        .collect();
    store.commit_batch(sent).await?;
    Ok(())
}

/// Message `i` and its reply, shaped like the pipeline's.
fn row(
    fences: &[Fence],
    contacts: u32,
    i: usize,
) -> anyhow::Result<(Fence, InboundMessage, OutboundText)> {
    let fence = &fences[i % fences.len()];
    let contact = u32::try_from((i / fences.len()) % contacts as usize)?;
    let from = contact_of(&fence.number, contact);
    let id = MessageId::parse(&format!("3A{i:018X}")).context("message id")?;
    let msg = InboundMessage {
        id: id.clone(),
        chat: from.jid(),
        sender: from.jid(),
        sender_alt: Some(switchboard_actors::Jid::lid(&format!(
            "{}",
            700_000_000 + i
        ))?),
        is_from_me: false,
        text: "hello, what are your hours?".into(),
        media: None,
        timestamp_ms: 1_767_225_600_000,
        offline: false,
    };
    let reply = OutboundText {
        id: MessageId::derived(&fence.number, &msg.chat, &msg.sender, &id, 0),
        to: msg.chat.clone(),
        text: "We are open 9:00 to 18:00, Monday to Friday.".into(),
        reply_to: Some(id),
        reply_to_sender: None,
    };
    Ok((fence.clone(), msg, reply))
}
