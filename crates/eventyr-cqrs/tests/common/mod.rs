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
