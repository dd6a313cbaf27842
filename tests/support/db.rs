//! Fresh databases for tests: a new PostgreSQL database or SQLite file per test, removed when
//! the test ends, so tests run in parallel. Include with `#[path = "support/db.rs"] mod db;`.
#![allow(dead_code, unused_macros, clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use sqlx::Connection;
use switchboard::store::{Dialect, SessionCipher, SqlStore, StoreOptions};

/// Runs each named `async fn name(db: &TestDb)` twice, as `sqlite::name` and `postgres::name`,
/// each on a fresh database. Include the module with `#[macro_use]`.
macro_rules! on_both_stores {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                let db = super::TestDb::new(switchboard::store::Dialect::Sqlite).await;
                super::$test(&db).await;
            })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                let db = super::TestDb::new(switchboard::store::Dialect::Postgres).await;
                super::$test(&db).await;
            })*
        }
    };
}

/// Where the test PostgreSQL lives (CI and this machine: trust auth on localhost).
pub fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A database that exists for one test.
pub struct TestDb {
    /// Its URL.
    pub url: String,
    pg_name: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    /// A new empty database of `dialect`.
    pub async fn new(dialect: Dialect) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        match dialect {
            Dialect::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let url = format!("sqlite://{}/store.db?mode=rwc", dir.path().display());
                Self {
                    url,
                    pg_name: None,
                    _dir: Some(dir),
                }
            }
            Dialect::Postgres => {
                let name = format!("sbt_{}_{n}_{}", std::process::id(), rand::random::<u32>());
                let mut conn = sqlx::PgConnection::connect(&admin_url()).await.unwrap();
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&mut conn)
                    .await
                    .unwrap();
                let base = admin_url();
                let root = base.rsplit_once('/').map_or(base.as_str(), |(r, _)| r);
                Self {
                    url: format!("{root}/{name}"),
                    pg_name: Some(name),
                    _dir: None,
                }
            }
        }
    }

    /// The PostgreSQL database's name.
    pub fn pg_name(&self) -> Option<&str> {
        self.pg_name.as_deref()
    }

    /// The `host:port` of this PostgreSQL database's server.
    pub fn pg_server(&self) -> String {
        let rest = self
            .url
            .split_once('@')
            .map_or(self.url.as_str(), |(_, r)| r);
        rest.split('/').next().unwrap_or(rest).to_owned()
    }

    /// This database's URL with its server replaced by `127.0.0.1:port` (a proxy).
    pub fn via(&self, port: u16) -> String {
        self.url
            .replacen(&self.pg_server(), &format!("127.0.0.1:{port}"), 1)
    }

    /// A store on this database with a fresh session key.
    pub async fn store(&self) -> SqlStore {
        self.store_with_keys(&SessionCipher::generate("test")).await
    }

    /// A store on this database with the given session keys.
    pub async fn store_with_keys(&self, keys: &str) -> SqlStore {
        connect_store(&self.url, keys).await
    }
}

/// A store on the database at `url` with the given session keys (a child process's view of
/// its parent's [`TestDb`]).
pub async fn connect_store(url: &str, keys: &str) -> SqlStore {
    SqlStore::connect(StoreOptions {
        url: url.to_owned(),
        max_connections: 8,
        batch_max: 2048,
        batch_wait: Duration::from_millis(2),
        cipher: Arc::new(SessionCipher::parse(keys).unwrap()),
    })
    .await
    .unwrap()
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(name) = self.pg_name.take() else {
            return;
        };
        // Dropped from a plain thread: the test's runtime may be shutting down.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(mut conn) = sqlx::PgConnection::connect(&admin_url()).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .execute(&mut conn)
                        .await;
                }
            });
        })
        .join();
    }
}
