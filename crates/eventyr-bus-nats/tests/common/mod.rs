//! The NATS world of the bus tests: a real `nats-server -js` per test, on 127.0.0.1,
//! with SQLite inboxes and relay state. Each test binary uses a part of it.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use eventyr_bus::testkit::{BusBackend, World};
use eventyr_bus::{PublicEvents, Publisher, Relay, ServiceName, Transport, subject};
use eventyr_bus_nats::{NatsBus, NatsOptions};
use eventyr_core::EventType;
use eventyr_store::EventStore;
use eventyr_store::readmodel::ReadModels;
use eventyr_store_sqlite::SqliteReadModels;
use eventyr_testkit::NatsServer;

pub struct Nats;

pub struct NatsWorld {
    pub server: Mutex<NatsServer>,
    url: String,
    dir: tempfile::TempDir,
    inboxes: Arc<dyn ReadModels>,
}

impl NatsWorld {
    pub fn start() -> Arc<Self> {
        let server = NatsServer::start(&eventyr_testkit::NatsOptions::default())
            .unwrap_or_else(|e| panic!("this test needs nats-server: {e}"));
        let dir = tempfile::tempdir().expect("temp dir");
        let inboxes =
            Arc::new(SqliteReadModels::open_durable(dir.path().join("inbox")).expect("inboxes"));
        Arc::new(Self {
            url: server.url(),
            server: Mutex::new(server),
            dir,
            inboxes,
        })
    }

    pub async fn bus(&self) -> NatsBus {
        NatsBus::connect(NatsOptions::new(self.url.clone()))
            .await
            .expect("connect to nats")
    }

    pub fn server(&self) -> std::sync::MutexGuard<'_, NatsServer> {
        self.server.lock().expect("lock")
    }
}

#[async_trait]
impl BusBackend for Nats {
    async fn world(&self) -> Arc<dyn World> {
        NatsWorld::start()
    }
}

#[async_trait]
impl World for NatsWorld {
    async fn connect(&self) -> Arc<dyn Transport> {
        Arc::new(self.bus().await)
    }

    async fn produce(
        &self,
        service: &ServiceName,
        store: Arc<dyn EventStore>,
        public: PublicEvents,
    ) -> Option<Relay> {
        let models = Arc::new(
            SqliteReadModels::open(self.dir.path().join(format!("relay-{service}")))
                .expect("relay state"),
        );
        let publisher: Arc<dyn Publisher> = Arc::new(self.bus().await);
        Some(Relay::new(
            service.clone(),
            store,
            models,
            public,
            publisher,
        ))
    }

    async fn publish_raw(&self, service: &ServiceName, payload: Bytes) -> bool {
        let bus = self.bus().await;
        bus.ensure_stream(service).await.expect("stream");
        let subject = subject(service, &EventType::new("Garbage").expect("type"));
        bus.jetstream()
            .publish(subject, payload)
            .await
            .expect("publish")
            .await
            .expect("stored");
        true
    }

    fn inbox_models(&self) -> Arc<dyn ReadModels> {
        Arc::clone(&self.inboxes) as Arc<dyn ReadModels>
    }
}
