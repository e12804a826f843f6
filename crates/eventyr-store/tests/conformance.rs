//! The conformance suite against the in-memory backend.

use std::sync::Arc;

use async_trait::async_trait;
use eventyr_store::core::{Limits, SystemClock};
use eventyr_store::testkit::{Backend, Location};
use eventyr_store::{EventStore, MemoryStore};

struct Memory;

struct SharedMemory {
    limits: Limits,
    origin: MemoryStore,
}

#[async_trait]
impl Backend for Memory {
    async fn location(&self, limits: Limits) -> Box<dyn Location> {
        let origin = MemoryStore::new(limits, Arc::new(SystemClock));
        Box::new(SharedMemory { limits, origin })
    }
}

#[async_trait]
impl Location for SharedMemory {
    async fn open(&self) -> Arc<dyn EventStore> {
        Arc::new(MemoryStore::sharing(
            &self.origin,
            self.limits,
            Arc::new(SystemClock),
        ))
    }
}

eventyr_store::conformance_suite!(Memory);
