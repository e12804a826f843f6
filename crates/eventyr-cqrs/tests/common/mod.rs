//! Shared by the cqrs tests: the bank-account domain and throwaway stores on every
//! backend (memory, SQLite, PostgreSQL on the run's real server).
#![allow(dead_code)] // each test file uses a different part

pub mod bank;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use eventyr_store::{EventStore, MemoryStore};
use eventyr_store_postgres::{PostgresOptions, PostgresStore};
use eventyr_store_sqlite::{SqliteOptions, SqliteStore};

/// A store and whatever must live as long as it.
pub struct Fixture {
    pub store: Arc<dyn EventStore>,
    pub dir: Option<tempfile::TempDir>,
    pub postgres_schema: Option<(String, String)>,
}

pub fn memory() -> Fixture {
    Fixture {
        store: Arc::new(MemoryStore::default()),
        dir: None,
        postgres_schema: None,
    }
}

pub fn sqlite() -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let store =
        SqliteStore::open(SqliteOptions::new(dir.path().join("events.db"))).expect("open sqlite");
    Fixture {
        store: Arc::new(store),
        dir: Some(dir),
        postgres_schema: None,
    }
}

pub async fn postgres() -> Fixture {
    let url = eventyr_testkit::test_postgres_url();
    let schema = unique_schema("cqrs");
    let mut options = PostgresOptions::new(&url);
    options.schema = schema.clone();
    options.readers_max = 4;
    let store = PostgresStore::connect(options)
        .await
        .expect("connect postgres");
    Fixture {
        store: Arc::new(store),
        dir: None,
        postgres_schema: Some((url, schema)),
    }
}

/// A schema name no other test of this run uses.
pub fn unique_schema(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}_{}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        fastrand::u32(..)
    )
}

/// Expands to one `#[tokio::test]` per backend for each scenario, an async fn taking
/// `Arc<dyn EventStore>`.
#[macro_export]
macro_rules! on_every_backend {
    ($($scenario:ident),* $(,)?) => {
        mod memory {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() {
                let fixture = $crate::common::memory();
                super::$scenario(fixture.store.clone()).await;
            })*
        }
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() {
                let fixture = $crate::common::sqlite();
                super::$scenario(fixture.store.clone()).await;
            })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() {
                let fixture = $crate::common::postgres().await;
                super::$scenario(fixture.store.clone()).await;
            })*
        }
    };
}

/// An event store and a read-model store of the same technology.
pub struct Pair {
    pub store: Arc<dyn EventStore>,
    pub read_models: Arc<dyn eventyr_store::readmodel::ReadModels>,
    pub dir: Option<tempfile::TempDir>,
}

pub fn sqlite_pair() -> Pair {
    let dir = tempfile::tempdir().expect("temp dir");
    let store =
        SqliteStore::open(SqliteOptions::new(dir.path().join("events.db"))).expect("open sqlite");
    let read_models =
        eventyr_store_sqlite::SqliteReadModels::open(dir.path().join("read")).expect("read models");
    Pair {
        store: Arc::new(store),
        read_models: Arc::new(read_models),
        dir: Some(dir),
    }
}

pub async fn postgres_pair() -> Pair {
    let fixture = postgres().await;
    let url = eventyr_testkit::test_postgres_url();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let catalog = format!(
        "p{}_{}",
        std::process::id() % 100_000,
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let read_models = eventyr_store_postgres::PostgresReadModels::connect(&url, &catalog)
        .await
        .expect("read models");
    Pair {
        store: fixture.store,
        read_models: Arc::new(read_models),
        dir: None,
    }
}

/// Expands to one `#[tokio::test]` per read-model backend for each scenario, an async
/// fn taking `(Arc<dyn EventStore>, Arc<dyn ReadModels>)`.
#[macro_export]
macro_rules! on_both_read_models {
    ($($scenario:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() {
                let pair = $crate::common::sqlite_pair();
                super::$scenario(pair.store.clone(), pair.read_models.clone()).await;
            })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() {
                let pair = $crate::common::postgres_pair().await;
                super::$scenario(pair.store.clone(), pair.read_models.clone()).await;
            })*
        }
    };
}
