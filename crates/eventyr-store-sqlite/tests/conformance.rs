//! The conformance suite against the SQLite backend. Each location is a fresh file;
//! each `open` is a separate store instance (its own writer thread and connections),
//! as a second process would be.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use eventyr_core::Limits;
use eventyr_store::EventStore;
use eventyr_store::testkit::{Backend, Location};
use eventyr_store_sqlite::{SqliteOptions, SqliteStore};

/// Keeps every temporary directory it made until the test case ends.
#[derive(Default)]
struct Sqlite {
    dirs: Mutex<Vec<tempfile::TempDir>>,
}

struct File {
    options: SqliteOptions,
}

#[async_trait]
impl Backend for Sqlite {
    async fn location(&self, limits: Limits) -> Box<dyn Location> {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut options = SqliteOptions::new(dir.path().join("events.db"));
        options.limits = limits;
        self.dirs.lock().expect("lock").push(dir);
        Box::new(File { options })
    }
}

#[async_trait]
impl Location for File {
    async fn open(&self) -> Arc<dyn EventStore> {
        Arc::new(SqliteStore::open(self.options.clone()).expect("open sqlite store"))
    }
}

eventyr_store::conformance_suite!(Sqlite::default());
