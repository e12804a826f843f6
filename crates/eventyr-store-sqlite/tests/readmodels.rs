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

/// A process killed inside `create` (the catalog holds the generation, its file was
/// never finished) leaves the models listable, and the next creation and promotion go
/// on and drop the unfinished one.
#[tokio::test]
async fn a_generation_left_unfinished_by_a_crash_does_not_break_the_catalog() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("read");
    let models = SqliteReadModels::open(&path).expect("open");
    let schema = ["CREATE TABLE t (id TEXT PRIMARY KEY)".to_owned()];
    let unfinished = models.create("inbox_x", &schema).await.expect("create");
    drop(models);
    // What the crash left: the catalog row, and an empty file.
    let file = path.join(format!("inbox_x.{unfinished}.db"));
    std::fs::remove_file(&file).expect("remove");
    std::fs::write(&file, b"").expect("empty file");

    let models = SqliteReadModels::open(&path).expect("open again");
    let listed = models.list().await.expect("listable");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].current, None);
    let next = models
        .create("inbox_x", &schema)
        .await
        .expect("create again");
    models.promote("inbox_x", next).await.expect("promote");
    let listed = models.list().await.expect("listable");
    assert_eq!(listed[0].current, Some(next));
    assert_eq!(listed[0].generations.len(), 1, "{listed:?}");
}
