//! The disk's own commit latency, watched while the latency phase runs.
//!
//! Every durable commit waits for an `fdatasync` of the database's log. When the disk itself
//! stalls (a virtual disk shared with other machines can hold a flush for hundreds of
//! milliseconds), every message in flight waits with it, whatever Switchboard does. The probe
//! writes one 4 KiB block and `fdatasync`s it every few milliseconds in a file of its own on the
//! same filesystem, so the report can tell the disk's stalls from Switchboard's.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A flush slower than this is a stall (the latency target's own bound).
pub const STALL_MS: u64 = 25;

/// Pause between two probes: frequent enough to see every stall of a few tens of ms, light
/// enough (about 150 flushes a second) not to load the disk it watches.
const PAUSE: Duration = Duration::from_millis(5);

/// One `fdatasync`: when it started (unix ms) and how long it took (µs).
#[derive(Debug, Clone, Copy)]
pub struct Flush {
    pub at_ms: u64,
    pub micros: u64,
}

/// A running probe; [`Probe::stop`] returns what it saw.
pub struct Probe {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<std::io::Result<Vec<Flush>>>,
    path: PathBuf,
}

impl Probe {
    /// Starts probing with a file in `dir`.
    pub fn start(dir: &Path) -> std::io::Result<Self> {
        let path = dir.join(format!("switchboard-disk-probe-{}", std::process::id()));
        let mut file = File::create(&path)?;
        file.write_all(&[0; 4096])?;
        file.sync_all()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || probe(&file, &flag));
        Ok(Self { stop, thread, path })
    }

    /// Stops probing and returns every flush seen.
    pub fn stop(self) -> std::io::Result<Vec<Flush>> {
        self.stop.store(true, Ordering::Relaxed);
        let flushes = self
            .thread
            .join()
            .map_err(|_| std::io::Error::other("disk probe panicked"))?;
        let _ = std::fs::remove_file(&self.path);
        flushes
    }
}

fn probe(file: &File, stop: &AtomicBool) -> std::io::Result<Vec<Flush>> {
    let block = [7u8; 4096];
    let mut flushes = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let at_ms = unix_ms();
        let started = std::time::Instant::now();
        file.write_all_at(&block, 0)?;
        file.sync_data()?;
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        flushes.push(Flush { at_ms, micros });
        std::thread::sleep(PAUSE);
    }
    Ok(flushes)
}

/// Now, in unix milliseconds.
pub fn unix_ms() -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(now.as_millis()).unwrap_or(u64::MAX)
}

/// What the probe saw over one phase.
#[derive(Debug, Default)]
pub struct Report {
    /// Flushes made.
    pub flushes: usize,
    /// Median flush, ms.
    pub p50_ms: f64,
    /// Slowest flush, ms.
    pub max_ms: f64,
    /// Flushes slower than [`STALL_MS`], as (start, end) in unix ms.
    pub stalls: Vec<(u64, u64)>,
}

impl Report {
    /// Summarises `flushes`.
    pub fn of(mut flushes: Vec<Flush>) -> Self {
        let stalls = flushes
            .iter()
            .filter(|f| f.micros > STALL_MS * 1000)
            .map(|f| (f.at_ms, f.at_ms + f.micros.div_ceil(1000)))
            .collect();
        flushes.sort_unstable_by_key(|f| f.micros);
        let ms = |f: Option<&Flush>| f.map_or(0.0, |f| f.micros as f64 / 1000.0);
        Self {
            flushes: flushes.len(),
            p50_ms: ms(flushes.get(flushes.len() / 2)),
            max_ms: ms(flushes.last()),
            stalls,
        }
    }

    /// Total time the disk spent in stalls, ms.
    pub fn stalled_ms(&self) -> u64 {
        self.stalls.iter().map(|(start, end)| end - start).sum()
    }

    /// The longest stall overlapping `[from, to]` (unix ms), in ms.
    pub fn worst_within(&self, from: u64, to: u64) -> Option<u64> {
        self.stalls
            .iter()
            .filter(|(start, end)| *start <= to && *end >= from)
            .map(|(start, end)| end - start)
            .max()
    }
}
