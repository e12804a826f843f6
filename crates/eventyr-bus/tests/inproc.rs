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

/// A handler that names its event types gets only those from the in-process bus: the
/// others are neither delivered nor recorded in its inbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_gets_only_the_event_types_it_names() {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use eventyr_bus::{Consumer, ConsumerName, Handler, HandlerError, Message};
    use eventyr_core::{NewEvent, StreamId};
    use eventyr_store::sql::SqlStatement;
    use eventyr_store::{ExpectedVersion, MemoryStore, StreamAppend};

    struct Wants(Arc<Mutex<Vec<String>>>);

    #[async_trait]
    impl Handler for Wants {
        fn event_types(&self) -> Option<BTreeSet<String>> {
            Some(BTreeSet::from(["Wanted".to_owned()]))
        }

        async fn handle(&self, message: &Message) -> Result<Vec<SqlStatement>, HandlerError> {
            let seen = message.event.event_type.to_string();
            self.0.lock().expect("lock").push(seen);
            Ok(Vec::new())
        }
    }

    let dir = tempfile::tempdir().expect("temp dir");
    let inboxes: Arc<dyn ReadModels> =
        Arc::new(SqliteReadModels::open(dir.path().join("inbox")).expect("inboxes"));
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::default());
    let source = ServiceName::new("producer").expect("name");
    let bus = InProcBus::new();
    bus.register(source.clone(), Arc::clone(&store), PublicEvents::All);
    let types = ["Wanted", "Other", "Wanted", "Wanted", "Other"];
    let events = types
        .iter()
        .map(|t| NewEvent::json(t, &serde_json::json!({})).expect("event"))
        .collect();
    store
        .append(StreamAppend::new(
            StreamId::new("s-1").expect("stream"),
            ExpectedVersion::NoStream,
            events,
        ))
        .await
        .expect("append");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let name = ConsumerName::new("picky").expect("name");
    let consumer = Consumer::new(
        name.clone(),
        source,
        Arc::new(bus),
        Arc::clone(&inboxes),
        Arc::new(Wants(Arc::clone(&seen))),
    )
    .options(eventyr_bus::testkit::fast_options());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(consumer.run(async move {
        let _ = stopped.await;
    }));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while seen.lock().expect("lock").len() < 3 {
        assert!(tokio::time::Instant::now() < deadline, "{seen:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = stop.send(());
    running.await.expect("join").expect("consumer");
    assert_eq!(*seen.lock().expect("lock"), ["Wanted", "Wanted", "Wanted"]);
    let inbox = eventyr_bus::Inbox::existing(inboxes, &name, Arc::new(eventyr_core::SystemClock))
        .await
        .expect("inbox");
    let recorded = inbox
        .query(SqlStatement::new("SELECT version FROM eventyr_inbox"))
        .await
        .expect("query");
    // The stream's last event ("Other", version 4, from 0) was never its business.
    assert_eq!(
        recorded[0].int("version"),
        Some(3),
        "only what it handled is recorded"
    );
}
