//! The bus conformance suite on the in-process bus, with SQLite inboxes.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use eventyr_bus::testkit::{BusBackend, World};
use eventyr_bus::{InProcBus, PublicEvents, Relay, ServiceName, Transport};
use eventyr_store::EventStore;
use eventyr_store::readmodel::ReadModels;
use eventyr_store_sqlite::SqliteReadModels;

struct InProc;

type Producer = (ServiceName, Arc<dyn EventStore>, PublicEvents);

struct InProcWorld {
    _dir: tempfile::TempDir,
    inboxes: Arc<dyn ReadModels>,
    producers: Mutex<Vec<Producer>>,
    buses: Mutex<Vec<InProcBus>>,
}

#[async_trait]
impl BusBackend for InProc {
    async fn world(&self) -> Arc<dyn World> {
        let dir = tempfile::tempdir().expect("temp dir");
        let inboxes =
            Arc::new(SqliteReadModels::open_durable(dir.path().join("inbox")).expect("inboxes"));
        Arc::new(InProcWorld {
            _dir: dir,
            inboxes,
            producers: Mutex::new(Vec::new()),
            buses: Mutex::new(Vec::new()),
        })
    }
}

#[async_trait]
impl World for InProcWorld {
    /// A new process: a new bus, with every producer registered on it.
    async fn connect(&self) -> Arc<dyn Transport> {
        let bus = InProcBus::new();
        for (service, store, public) in self.producers.lock().expect("lock").iter() {
            bus.register(service.clone(), Arc::clone(store), public.clone());
        }
        self.buses.lock().expect("lock").push(bus.clone());
        Arc::new(bus)
    }

    async fn produce(
        &self,
        service: &ServiceName,
        store: Arc<dyn EventStore>,
        public: PublicEvents,
    ) -> Option<Relay> {
        for bus in self.buses.lock().expect("lock").iter() {
            bus.register(service.clone(), Arc::clone(&store), public.clone());
        }
        self.producers
            .lock()
            .expect("lock")
            .push((service.clone(), store, public));
        None
    }

    async fn publish_raw(&self, _service: &ServiceName, _payload: Bytes) -> bool {
        false
    }

    fn inbox_models(&self) -> Arc<dyn ReadModels> {
        Arc::clone(&self.inboxes) as Arc<dyn ReadModels>
    }
}

eventyr_bus::bus_suite!(InProc);
