//! The read-model conformance suite against SQLite files.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use eventyr_store::readmodel::ReadModels;
use eventyr_store::testkit::readmodels::{ReadModelBackend, ReadModelLocation};
use eventyr_store_sqlite::SqliteReadModels;

#[derive(Default)]
struct Sqlite {
    dirs: Mutex<Vec<tempfile::TempDir>>,
}

struct Dir(std::path::PathBuf);

#[async_trait]
impl ReadModelBackend for Sqlite {
    async fn location(&self) -> Box<dyn ReadModelLocation> {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("read");
        self.dirs.lock().expect("lock").push(dir);
        Box::new(Dir(path))
    }
}

#[async_trait]
impl ReadModelLocation for Dir {
    async fn open(&self) -> Arc<dyn ReadModels> {
        Arc::new(SqliteReadModels::open(&self.0).expect("open read models"))
    }
}

eventyr_store::read_model_suite!(Sqlite::default());
