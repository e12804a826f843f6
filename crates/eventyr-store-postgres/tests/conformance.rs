//! The conformance suite against the PostgreSQL backend, on a real server (the run's
//! shared throwaway cluster, or one started for this process). Each location is a
//! fresh schema; each `open` is a separate store instance with its own writer and
//! connections, as a second process would be.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use eventyr_core::Limits;
use eventyr_store::EventStore;
use eventyr_store::testkit::{Backend, Location};
use eventyr_store_postgres::{PostgresOptions, PostgresStore};

struct Postgres;

struct Schema {
    options: PostgresOptions,
}

#[async_trait]
impl Backend for Postgres {
    async fn location(&self, limits: Limits) -> Box<dyn Location> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let schema = format!(
            "t{}_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            fastrand::u32(..)
        );
        let mut options = PostgresOptions::new(eventyr_testkit::test_postgres_url());
        options.schema = schema;
        options.limits = limits;
        options.readers_max = 4;
        Box::new(Schema { options })
    }
}

#[async_trait]
impl Location for Schema {
    async fn open(&self) -> Arc<dyn EventStore> {
        Arc::new(
            PostgresStore::connect(self.options.clone())
                .await
                .expect("connect to postgres"),
        )
    }
}

eventyr_store::conformance_suite!(Postgres);
