//! The SQL store: one implementation of the [`Store`] port over SQLite (the embedded default) and
//! PostgreSQL (the cluster choice), with identical behaviour.
//!
//! - [`SqlStore::connect`] opens the pool (SQLite: a file, WAL mode, one writer connection;
//!   PostgreSQL: pooled) and applies the migrations of its dialect (`migrations/sqlite`,
//!   `migrations/postgres`), embedded in the binary.
//! - `batch`: the group-commit batcher. Hot-path writes (inbound, completions, sent marks) queue
//!   to one task per store, which commits them together on N rows or T ms.
//! - `path`: the message path of the port (inbound log, outbox, checkpoints, sessions,
//!   dead letters) and the tokens of the embedded [`Coordinator`] ([`LocalCoordinator`]).
//! - `admin`: tenants, numbers, contacts, conversations, flows, AI jobs.
//! - `events`: the event outbox for webhooks, and the audit log.
//! - `cipher`: AES-256-GCM for session blobs, keys by id so they can rotate.
//! - `retention`: the job that prunes processed inbound and sent outbox rows, in batches.
//! - `protocol`: the WhatsApp client's protocol state per number (whatsapp-rust's store traits),
//!   one table keyed by number, space and key; secrets sealed, every write fenced.
//! - `text`: message texts stored faithfully (NUL, which PostgreSQL cannot hold, encoded).
//!
//! Every write that belongs to a number checks its fencing token in the same transaction:
//! `fences` keeps the highest token seen per number and a lower one fails with
//! [`StoreError::Fenced`]. SQL lives in this module only. Times are Unix milliseconds.

mod admin;
mod batch;
mod cipher;
mod claim;
mod events;
mod health;
mod path;
mod protocol;
mod retention;
mod text;
mod tokens;

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyPool, Row, Transaction};
use switchboard_actors::coordinator::{Coordinator, LocalCoordinator};
use switchboard_actors::store::{Fence, OutageKind, Store, StoreError};

pub use admin::{AiJobRecord, AiJobStatus};
pub use admin::{ConversationRecord, FlowRecord, FlowStatus, NumberRecord, OptIn, TenantRecord};
pub use batch::{BATCH_ROWS, COMMIT_SECONDS};
pub use cipher::{CipherError, SessionCipher};
pub use claim::{Claim, ClaimError};
pub use events::{AuditEntry, EventRecord};
pub use protocol::{Entry, Footprint, Key, Merge, ProtocolState, Select, Space, StateRow};
pub use retention::{PRUNE_BATCH, Pruned};
pub use tokens::{AuditRow, Change, Role, TokenRecord};

/// Texts are kept as a preview of this many characters once processed, unless the tenant keeps
/// full transcripts.
pub const PREVIEW_CHARS: usize = 100;

/// Which SQL dialect a store speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// SQLite: embedded, one file.
    Sqlite,
    /// PostgreSQL: the cluster store.
    Postgres,
}

impl Dialect {
    /// The dialect of a database URL.
    pub fn of_url(url: &str) -> Option<Self> {
        if url.starts_with("sqlite:") {
            Some(Self::Sqlite)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Some(Self::Postgres)
        } else {
            None
        }
    }

    /// The label used in config, metrics and benchmarks.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        }
    }
}

/// How to open a store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// `sqlite://path?mode=rwc` or `postgres://…`.
    pub url: String,
    /// Pool size (PostgreSQL; SQLite has one writer connection).
    pub max_connections: u32,
    /// A batch is committed when it holds this many writes…
    pub batch_max: usize,
    /// …or when its first write has waited this long.
    pub batch_wait: Duration,
    /// Encrypts session blobs.
    pub cipher: Arc<SessionCipher>,
}

/// The SQL store. Cheap to clone.
#[derive(Clone)]
pub struct SqlStore {
    pool: AnyPool,
    dialect: Dialect,
    cipher: Arc<SessionCipher>,
    batch: batch::Handle,
    /// Whether the database is up, and the probe that finds out when it is back.
    watch: health::Watch,
    /// The database URL (secret: may hold a password; never printed), for the claim's own
    /// connection and the SQLite file's path.
    url: String,
}

impl std::fmt::Debug for SqlStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlStore")
            .field("dialect", &self.dialect)
            .finish_non_exhaustive()
    }
}

/// Durable commits (WAL, fsync per commit: the batcher makes commits rare), foreign keys on.
/// A page cache of 256 KiB (SQLite's default is 2 MiB) holds the hot interior pages; the rest
/// are read from the operating system's cache, which a burst does not leave in the process.
const SQLITE_PRAGMAS: [&str; 5] = [
    "PRAGMA cache_size = -256",
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = FULL",
    "PRAGMA foreign_keys = ON",
    "PRAGMA busy_timeout = 5000",
];

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

impl SqlStore {
    /// Opens the database, applies pending migrations and starts the batcher.
    pub async fn connect(opts: StoreOptions) -> Result<Self, StoreError> {
        let pool = open_pool(&opts.url, opts.max_connections).await?;
        let dialect = Dialect::of_url(&opts.url)
            .ok_or_else(|| StoreError::Setup("unsupported database URL".into()))?;
        migrate_pool(&pool, dialect).await?;
        let watch = health::Watch::new(pool.clone());
        let batch = batch::Handle::spawn(
            pool.clone(),
            dialect,
            opts.batch_max,
            opts.batch_wait,
            watch.clone(),
        );
        Ok(Self {
            pool,
            dialect,
            cipher: opts.cipher,
            batch,
            watch,
            url: opts.url,
        })
    }

    /// The dialect.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// The pool, for tests and benchmarks that check what is really stored.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// This store as the ports the actors use.
    /// The coordinator is the embedded one, with tokens from this store.
    pub fn ports(&self) -> (Arc<dyn Store>, Arc<dyn Coordinator>) {
        let me = Arc::new(self.clone());
        (me.clone(), Arc::new(LocalCoordinator::new(me)))
    }

    /// Commits `writes` as one batch right now, bypassing the batcher's queue: the same
    /// statements and transaction as a group commit. For benchmarks (the write ceiling).
    pub async fn commit_batch(&self, writes: Vec<HotWrite>) -> Result<(), StoreError> {
        use tokio::sync::oneshot::channel;
        let (mut recorded, mut completed, mut sent) = (Vec::new(), Vec::new(), Vec::new());
        let ops = writes
            .into_iter()
            .map(|w| match w {
                HotWrite::Inbound(fence, msg) => {
                    let (reply, rx) = channel();
                    recorded.push(rx);
                    batch::Op::Inbound { fence, msg, reply }
                }
                HotWrite::Complete(fence, done) => {
                    let (reply, rx) = channel();
                    completed.push(rx);
                    batch::Op::Complete {
                        fence,
                        done,
                        unlogged: None,
                        reply,
                    }
                }
                HotWrite::Sent(fence, id) => {
                    let (reply, rx) = channel();
                    sent.push(rx);
                    batch::Op::Sent { fence, id, reply }
                }
            })
            .collect();
        let _ = batch::flush(&self.pool, self.dialect, ops).await;
        for rx in recorded {
            rx.await.unwrap_or(Err(StoreError::Closed))?;
        }
        for rx in completed {
            rx.await.unwrap_or(Err(StoreError::Closed))?;
        }
        for rx in sent {
            rx.await.unwrap_or(Err(StoreError::Closed))?;
        }
        Ok(())
    }

    /// Commits what is queued and closes the pool.
    pub async fn close(&self) {
        self.batch.close().await;
        self.pool.close().await;
    }

    /// Opens a transaction that has checked `fence`: the token is at least the highest seen for
    /// the number, and is now the highest.
    async fn fenced(&self, fence: &Fence) -> Result<Transaction<'static, Any>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let tokens = [(fence.number.as_str(), fence.token.get())];
        let highest = lock_fences(&mut tx, self.dialect, &tokens).await?;
        check_fence(fence, &highest)?;
        Ok(tx)
    }
}

/// A hot-path write, for [`SqlStore::commit_batch`].
#[derive(Debug, Clone)]
pub enum HotWrite {
    /// Record an inbound message.
    Inbound(Fence, switchboard_actors::transport::InboundMessage),
    /// Complete a processed message.
    Complete(Fence, switchboard_actors::store::Completion),
    /// Mark a reply sent.
    Sent(Fence, switchboard_actors::transport::MessageId),
}

/// Applies pending migrations to the database at `url` (the `switchboard migrate` command).
/// Returns the dialect and how many migrations were applied.
pub async fn migrate(url: &str) -> Result<(Dialect, usize), StoreError> {
    let dialect =
        Dialect::of_url(url).ok_or_else(|| StoreError::Setup("unsupported database URL".into()))?;
    let pool = open_pool(url, 1).await?;
    let before = applied(&pool).await;
    migrate_pool(&pool, dialect).await?;
    let after = applied(&pool).await;
    pool.close().await;
    Ok((dialect, after.saturating_sub(before)))
}

async fn applied(pool: &AnyPool) -> usize {
    sqlx::query("SELECT COUNT(*) FROM _sqlx_migrations")
        .fetch_one(pool)
        .await
        .and_then(|row| row.try_get::<i64, _>(0))
        .map_or(0, |n| usize::try_from(n).unwrap_or(0))
}

async fn open_pool(url: &str, max_connections: u32) -> Result<AnyPool, StoreError> {
    sqlx::any::install_default_drivers();
    let dialect = Dialect::of_url(url).ok_or_else(|| {
        StoreError::Setup("database URL must start with sqlite: or postgres:".into())
    })?;
    if dialect == Dialect::Sqlite {
        create_sqlite_dir(url)?;
    }
    let options = AnyConnectOptions::from_str(url).map_err(db)?;
    let pool = match dialect {
        // One connection: SQLite has one writer at a time, and a single connection never fails a
        // write with SQLITE_BUSY under contention.
        Dialect::Sqlite => AnyPoolOptions::new()
            .max_connections(1)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    for pragma in SQLITE_PRAGMAS {
                        sqlx::Executor::execute(&mut *conn, pragma).await?;
                    }
                    Ok(())
                })
            }),
        Dialect::Postgres => AnyPoolOptions::new().max_connections(max_connections.max(2)),
    };
    pool.acquire_timeout(Duration::from_secs(10))
        // A connection in steady use is not pinged before each batch (a round trip, and a
        // database wake-up, on every message's way); one that sat idle is, so a database
        // restart in the meantime costs a new connection rather than a failed write.
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_IDLE_AFTER {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
        .connect_with(options)
        .await
        .map_err(db)
}

/// How long a pooled connection may sit idle before it is pinged on its next use.
const PING_IDLE_AFTER: Duration = Duration::from_secs(1);

/// The file of a SQLite URL; `None` for an in-memory database.
fn sqlite_path(url: &str) -> Option<&str> {
    let path = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:");
    let path = path.split('?').next().unwrap_or_default();
    (!path.is_empty() && path != ":memory:").then_some(path)
}

fn create_sqlite_dir(url: &str) -> Result<(), StoreError> {
    let Some(path) = sqlite_path(url) else {
        return Ok(());
    };
    if let Some(dir) = std::path::Path::new(path).parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Setup(format!("creating {}: {e}", dir.display())))?;
    }
    Ok(())
}

async fn migrate_pool(pool: &AnyPool, dialect: Dialect) -> Result<(), StoreError> {
    let migrator = match dialect {
        Dialect::Sqlite => &SQLITE_MIGRATIONS,
        Dialect::Postgres => &POSTGRES_MIGRATIONS,
    };
    migrator
        .run(pool)
        .await
        .map_err(|e| StoreError::Setup(format!("migrations: {e}")))
}

/// Locks the fences of `tokens`' numbers for this transaction, raising stored tokens where a
/// higher one is given, and returns the highest token now stored per *registered* number (a
/// number missing from the map is not registered). PostgreSQL takes shared locks (concurrent
/// writers of a number share them; [`Coordinator::acquire`] and removing the number wait for
/// them), exclusive only to raise; SQLite has a single writer.
async fn lock_fences(
    tx: &mut Transaction<'static, Any>,
    dialect: Dialect,
    tokens: &[(&str, u64)],
) -> Result<HashMap<String, u64>, StoreError> {
    if dialect == Dialect::Sqlite {
        raise_fences(tx, tokens).await?;
        return registered_fences(tx, dialect, tokens).await;
    }
    let mut highest = registered_fences(tx, dialect, tokens).await?;
    let raise: Vec<(&str, u64)> = tokens
        .iter()
        .filter(|(n, t)| highest.get(*n).is_none_or(|h| t > h))
        .copied()
        .collect();
    if !raise.is_empty() {
        raise_fences(tx, &raise).await?;
        highest.extend(registered_fences(tx, dialect, &raise).await?);
    }
    Ok(highest)
}

/// The stored token of each of `tokens`' numbers that is registered; PostgreSQL locks the fence
/// `FOR SHARE` and the number `FOR KEY SHARE` (so the number cannot be removed under a write).
async fn registered_fences(
    tx: &mut Transaction<'static, Any>,
    dialect: Dialect,
    tokens: &[(&str, u64)],
) -> Result<HashMap<String, u64>, StoreError> {
    let mut wanted: Vec<&str> = tokens.iter().map(|(n, _)| *n).collect();
    wanted.sort_unstable();
    wanted.dedup();
    let locks = match dialect {
        Dialect::Postgres => " FOR SHARE OF f FOR KEY SHARE OF n",
        Dialect::Sqlite => "",
    };
    let mut highest = HashMap::new();
    for chunk in wanted.chunks(MAX_STATEMENT_ROWS) {
        let sql = format!(
            "SELECT f.number, f.token FROM fences f JOIN numbers n ON n.number = f.number \
             WHERE f.number IN {} ORDER BY f.number{locks}",
            values(1, chunk.len())
        );
        let mut q = sqlx::query(&sql);
        for number in chunk {
            q = q.bind(*number);
        }
        for row in q.fetch_all(&mut **tx).await.map_err(db)? {
            let number: String = row.try_get(0).map_err(db)?;
            let token: i64 = row.try_get(1).map_err(db)?;
            highest.insert(number, u64::try_from(token).unwrap_or(0));
        }
    }
    Ok(highest)
}

/// Raises the stored token of each number to the highest given (never lowers it). Locks those
/// rows until the transaction ends.
async fn raise_fences(
    tx: &mut Transaction<'static, Any>,
    tokens: &[(&str, u64)],
) -> Result<(), StoreError> {
    let mut highest: HashMap<&str, u64> = HashMap::new();
    for (number, token) in tokens {
        let t = highest.entry(number).or_insert(0);
        *t = (*t).max(*token);
    }
    let mut rows: Vec<(&str, u64)> = highest.into_iter().collect();
    // One lock order for every transaction: concurrent writers never deadlock on fences.
    rows.sort_unstable();
    for chunk in rows.chunks(MAX_STATEMENT_ROWS) {
        let sql = format!(
            "INSERT INTO fences (number, token) VALUES {} ON CONFLICT (number) DO UPDATE SET \
             token = CASE WHEN excluded.token > fences.token THEN excluded.token \
             ELSE fences.token END",
            values(chunk.len(), 2)
        );
        let mut q = sqlx::query(&sql);
        for (number, token) in chunk {
            q = q.bind(*number).bind(to_i64(*token));
        }
        q.execute(&mut **tx).await.map_err(db)?;
    }
    Ok(())
}

/// Fails with [`StoreError::Fenced`] if a higher token than the fence's is stored, and with
/// [`StoreError::NotFound`] if the number is not registered (not in `highest`).
fn check_fence(fence: &Fence, highest: &HashMap<String, u64>) -> Result<(), StoreError> {
    let Some(&stored) = highest.get(fence.number.as_str()) else {
        return Err(StoreError::NotFound(format!("number {}", fence.number)));
    };
    if fence.token.get() < stored {
        return Err(StoreError::Fenced {
            number: fence.number.clone(),
            token: fence.token.get(),
            highest: stored,
        });
    }
    Ok(())
}

/// Rows per multi-row fence statement: well under both dialects' bind-parameter limits.
const MAX_STATEMENT_ROWS: usize = 256;

/// A query on either dialect.
type AnyQuery<'q> = sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>>;

/// Binds an inbound row in column order: number, chat, sender, message_id, sender_alt, body,
/// preview, sent_at, received_at (= `now`), from_me.
fn bind_inbound_row<'q>(
    q: AnyQuery<'q>,
    fence: &'q Fence,
    msg: &'q switchboard_actors::transport::InboundMessage,
    now: i64,
) -> AnyQuery<'q> {
    let q = q
        .bind(fence.number.as_str())
        .bind(msg.chat.to_string())
        .bind(msg.sender.to_string())
        .bind(msg.id.as_str())
        .bind(msg.sender_alt.as_ref().map(ToString::to_string));
    bind_text(q, &msg.text)
        .bind(text::preview(&msg.text))
        .bind(to_i64(msg.timestamp_ms))
        .bind(now)
        .bind(msg.is_from_me)
}

/// Binds `t` in the form the databases store (see `text`), without a copy when it needs none.
fn bind_text<'q>(q: AnyQuery<'q>, t: &'q str) -> AnyQuery<'q> {
    match text::encode(t) {
        std::borrow::Cow::Borrowed(t) => q.bind(t),
        std::borrow::Cow::Owned(t) => q.bind(t),
    }
}

/// `($1, $2), ($3, $4)…`: placeholders for `rows` rows of `cols` columns.
fn values(rows: usize, cols: usize) -> String {
    values_from(1, rows, cols)
}

/// Like [`values`], numbering from `first`.
fn values_from(first: usize, rows: usize, cols: usize) -> String {
    let mut out = String::with_capacity(rows * cols * 5);
    for r in 0..rows {
        if r > 0 {
            out.push_str(", ");
        }
        out.push('(');
        for c in 0..cols {
            if c > 0 {
                out.push_str(", ");
            }
            out.push('$');
            out.push_str(&(first + r * cols + c).to_string());
        }
        out.push(')');
    }
    out
}

/// Maps a database error onto the port's error. Whether it is worth retrying is decided here,
/// once, by kind: unreachable, pool timeout, locked, read-only, disk full and lost races are
/// outages; what the database says about the statement itself is a refusal; unique and foreign
/// key violations are conflicts and missing rows.
fn db(e: sqlx::Error) -> StoreError {
    use OutageKind as K;
    match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => {
            StoreError::Conflict(d.message().to_owned())
        }
        sqlx::Error::Database(d) if d.is_foreign_key_violation() => {
            StoreError::NotFound(d.message().to_owned())
        }
        sqlx::Error::Database(d) => match d.code().and_then(|c| outage_of_code(&c)) {
            Some(kind) => StoreError::outage(kind, d.message()),
            None => StoreError::Refused(d.message().to_owned()),
        },
        sqlx::Error::PoolTimedOut => StoreError::outage(K::PoolTimeout, e.to_string()),
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => StoreError::outage(K::Unreachable, e.to_string()),
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
            StoreError::Corrupt(e.to_string())
        }
        sqlx::Error::RowNotFound => StoreError::NotFound(e.to_string()),
        sqlx::Error::PoolClosed => StoreError::Closed,
        _ => StoreError::outage(K::Other, e.to_string()),
    }
}

/// The outage a database error code stands for, if it is one: PostgreSQL's five-character
/// SQLSTATE, or SQLite's (extended) result code.
fn outage_of_code(code: &str) -> Option<OutageKind> {
    use OutageKind as K;
    if code.len() == 5 {
        return match code {
            "40P01" | "40001" => Some(K::Contention),
            "25006" => Some(K::ReadOnly),
            "53100" => Some(K::DiskFull),
            "55P03" => Some(K::Locked),
            "57014" | "58030" => Some(K::Other),
            c if c.starts_with("08") || c.starts_with("57P") => Some(K::Unreachable),
            c if c.starts_with("53") => Some(K::Other),
            _ => None,
        };
    }
    // SQLite: the primary code is the low byte of the extended one.
    match code.parse::<u32>().ok()? & 0xff {
        5 | 6 => Some(K::Locked),   // SQLITE_BUSY, SQLITE_LOCKED
        8 => Some(K::ReadOnly),     // SQLITE_READONLY
        13 => Some(K::DiskFull),    // SQLITE_FULL
        14 => Some(K::Unreachable), // SQLITE_CANTOPEN
        7 | 10 => Some(K::Other),   // SQLITE_NOMEM, SQLITE_IOERR
        _ => None,
    }
}

/// Reads a boolean column: PostgreSQL has booleans, SQLite stores 0 or 1.
fn flag(row: &AnyRow, col: &str) -> Result<bool, StoreError> {
    match row.try_get::<bool, _>(col) {
        Ok(b) => Ok(b),
        Err(_) => row.try_get::<i64, _>(col).map(|v| v != 0).map_err(db),
    }
}

/// Now, in Unix milliseconds.
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The first [`PREVIEW_CHARS`] characters of `text`.
pub fn preview(text: &str) -> String {
    text.chars().take(PREVIEW_CHARS).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_number_rows_in_order() {
        assert_eq!(values(2, 3), "($1, $2, $3), ($4, $5, $6)");
        assert_eq!(values_from(3, 1, 2), "($3, $4)");
    }

    #[test]
    fn previews_cut_on_characters_not_bytes() {
        let text = "é".repeat(150);
        assert_eq!(preview(&text).chars().count(), PREVIEW_CHARS);
        assert_eq!(preview("short"), "short");
    }

    #[test]
    fn dialects_follow_the_url_scheme() {
        assert_eq!(Dialect::of_url("sqlite://data/x.db"), Some(Dialect::Sqlite));
        assert_eq!(Dialect::of_url("postgres://h/db"), Some(Dialect::Postgres));
        assert_eq!(Dialect::of_url("mysql://h/db"), None);
    }
}
