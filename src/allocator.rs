//! The process's allocator and its options. Part of the binary (`main.rs`), and included by
//! the benchmarks that run the node in-process, so that they measure what runs; not part of
//! the library.
//!
//! jemalloc: the message path allocates many small, short-lived buffers across threads; with
//! the system allocator a third of the CPU went to malloc/free, and allocators that return
//! memory to the OS at once spend it on page faults instead (measured with the pipeline
//! benchmark). jemalloc keeps freed pages for a while before returning them.

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at its start (`_RJEM_MALLOC_CONF` in the environment overrides
/// them):
/// - Freed pages go back to the operating system one second after the traffic that used them,
///   by a background thread, so a node that has just absorbed a burst returns to its idle size
///   even while idle (jemalloc otherwise purges only when the program allocates, and holds the
///   pages 10 s). `muzzy_decay_ms:0` returns them outright: pages handed back lazily
///   (`MADV_FREE`) still count in the process's RSS until the kernel wants them.
#[allow(unsafe_code)] // Unsafe only in name: an exported constant the allocator reads.
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: &[u8; 60] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

/// The runtime the node runs on: tokio's multi-threaded one, whose workers give their
/// allocation caches back when they go idle ([`release_thread_cache`]).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(release_thread_cache)
        .build()
}

/// How often, at most, a thread gives its cache back.
const RELEASE_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Gives the calling thread's cache of freed blocks (jemalloc's tcache) back to the shared
/// arenas, at most every [`RELEASE_EVERY`]; called as a worker is about to park. jemalloc
/// trims a thread's cache only as that thread allocates, so a worker that goes idle after a
/// burst would otherwise keep up to a few hundred KiB of blocks out of reach of the purge
/// (measured with the overload benchmark: most of what stayed resident after a flood).
fn release_thread_cache() {
    use std::cell::Cell;
    use std::time::Instant;
    thread_local! {
        static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
    }
    let now = Instant::now();
    let due = LAST.with(|last| {
        let due = last
            .get()
            .is_none_or(|t| now.duration_since(t) >= RELEASE_EVERY);
        if due {
            last.set(Some(now));
        }
        due
    });
    if due {
        // SAFETY: `thread.tcache.flush` reads and writes nothing; jemalloc documents null
        // pointers and zero lengths for such a control.
        #[allow(unsafe_code)]
        unsafe {
            tikv_jemalloc_sys::mallctl(
                c"thread.tcache.flush".as_ptr(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            );
        }
    }
}
