//! The read-model conformance suite against PostgreSQL schemas on a real server.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use eventyr_store::readmodel::ReadModels;
use eventyr_store::testkit::readmodels::{ReadModelBackend, ReadModelLocation};
use eventyr_store_postgres::PostgresReadModels;

struct Postgres;

struct Catalog(String);

#[async_trait]
impl ReadModelBackend for Postgres {
    async fn location(&self) -> Box<dyn ReadModelLocation> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let catalog = format!(
            "r{}_{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        Box::new(Catalog(catalog))
    }
}

#[async_trait]
impl ReadModelLocation for Catalog {
    async fn open(&self) -> Arc<dyn ReadModels> {
        let url = eventyr_testkit::test_postgres_url();
        Arc::new(
            PostgresReadModels::connect(&url, &self.0)
                .await
                .expect("connect read models"),
        )
    }
}

eventyr_store::read_model_suite!(Postgres);
