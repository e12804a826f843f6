//! Opening the configured event store: the one place that picks a storage adapter.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use eventyr_store::EventStore;
use eventyr_store::readmodel::ReadModels;
use eventyr_store_postgres::{PostgresOptions, PostgresReadModels, PostgresStore};
use eventyr_store_sqlite::{SqliteOptions, SqliteReadModels, SqliteStore};

use crate::cli::StoreKind;
use crate::config::Config;

/// The SQLite file of the event store, under the data directory.
pub const SQLITE_FILE: &str = "eventyr.db";

/// The directory of the SQLite read models, under the data directory.
pub const READ_MODELS_DIR: &str = "read";

pub async fn open(config: &Config) -> anyhow::Result<Arc<dyn EventStore>> {
    let store = &config.store;
    match store.backend {
        StoreKind::Sqlite => open_sqlite(&config.data_dir.join(SQLITE_FILE), config),
        StoreKind::Postgres => {
            let url = store.database_url.clone().context(
                "the postgres store needs a database URL: --database-url, EVENTYR_DATABASE_URL or \
                 store.database_url in eventyr.toml",
            )?;
            let mut options = PostgresOptions::new(url);
            options.schema = store.schema.clone();
            options.limits = store.limits;
            let store = PostgresStore::connect(options)
                .await
                .context("cannot open the postgres event store")?;
            Ok(Arc::new(store))
        }
    }
}

pub fn open_sqlite(path: &Path, config: &Config) -> anyhow::Result<Arc<dyn EventStore>> {
    let mut options = SqliteOptions::new(path);
    options.limits = config.store.limits;
    let store = SqliteStore::open(options)
        .with_context(|| format!("cannot open the event store {}", path.display()))?;
    Ok(Arc::new(store))
}

/// The directory of the SQLite consumer inboxes, under the data directory.
pub const INBOX_DIR: &str = "inbox";

/// Opens the consumers' databases (inboxes, dead letters): durable read models of the
/// configured backend.
pub async fn open_inboxes(config: &Config) -> anyhow::Result<Arc<dyn ReadModels>> {
    let catalog = &config.store.inbox_catalog;
    open_models(config, INBOX_DIR, true, catalog, "inboxes").await
}

/// Opens the read models of the configured backend.
pub async fn open_read_models(config: &Config) -> anyhow::Result<Arc<dyn ReadModels>> {
    let catalog = &config.store.read_catalog;
    open_models(config, READ_MODELS_DIR, false, catalog, "read models").await
}

/// Read models under `<data-dir>/<dir>` (SQLite; flushed on every commit when
/// `durable`) or in the PostgreSQL schema `catalog`.
async fn open_models(
    config: &Config,
    dir: &str,
    durable: bool,
    catalog: &str,
    what: &str,
) -> anyhow::Result<Arc<dyn ReadModels>> {
    match config.store.backend {
        StoreKind::Sqlite => {
            let dir = config.data_dir.join(dir);
            let models = if durable {
                SqliteReadModels::open_durable(&dir)
            } else {
                SqliteReadModels::open(&dir)
            }
            .with_context(|| format!("cannot open the {what} in {}", dir.display()))?;
            Ok(Arc::new(models))
        }
        StoreKind::Postgres => {
            let url = config
                .store
                .database_url
                .as_deref()
                .with_context(|| format!("the postgres {what} need a database URL"))?;
            let models = PostgresReadModels::connect(url, catalog)
                .await
                .with_context(|| format!("cannot open the postgres {what}"))?;
            Ok(Arc::new(models))
        }
    }
}
