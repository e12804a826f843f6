//! The bus conformance suite: the same cases for every backend (in-process, NATS
//! JetStream). A backend's test file implements [`BusBackend`] and calls
//! [`bus_suite!`](crate::bus_suite), which expands to one test per case.
//!
//! Every case counts effects in the consumer's own tables: each public event must
//! take effect exactly once, each stream in order, whatever fails on the way.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use eventyr_core::{EventId, Limits, NewEvent, RetryPolicy, StreamId, SystemClock};
use eventyr_store::readmodel::ReadModels;
use eventyr_store::sql::SqlStatement;
use eventyr_store::{EventStore, ExpectedVersion, MemoryStore, StreamAppend};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::{
    BusError, ConsumerName, ConsumerOptions, DeadLetterStatus, FaultHook, FaultPoint, Handler,
    HandlerError, Inbox, Message, PublicEvents, Relay, ServiceName, Transport,
};

/// How long a case waits for what should happen.
pub const WAIT: Duration = Duration::from_secs(60);

/// A bus technology under test.
#[async_trait]
pub trait BusBackend: Send + Sync {
    /// A fresh world: a broker if the backend has one, and empty databases.
    async fn world(&self) -> Arc<dyn World>;
}

/// One bus with its databases.
#[async_trait]
pub trait World: Send + Sync {
    /// A new connection to the bus, as a new process would make it.
    async fn connect(&self) -> Arc<dyn Transport>;
    /// Hooks a producer up: registers it (in-process) or returns its relay (brokers).
    async fn produce(
        &self,
        service: &ServiceName,
        store: Arc<dyn EventStore>,
        public: PublicEvents,
    ) -> Option<Relay>;
    /// Puts raw bytes on a service's wire; false if the backend has no wire.
    async fn publish_raw(&self, service: &ServiceName, payload: Bytes) -> bool;
    /// The consumers' databases (durable read models).
    fn inbox_models(&self) -> Arc<dyn ReadModels>;
}

/// A handler that records effects in its own tables and fails on request.
#[derive(Debug, Default)]
pub struct TestHandler {
    /// Transient failures still to give, by event id.
    pub transient: Mutex<HashMap<EventId, u32>>,
    /// Event types that fail permanently (until removed: "the fix").
    pub permanent_types: Mutex<HashSet<String>>,
    /// Every event type fails transiently while set.
    pub always_transient: AtomicBool,
    /// Attempts by event id.
    pub attempts: Mutex<HashMap<EventId, u32>>,
    /// Time each attempt takes.
    pub delay: Mutex<Duration>,
    running: AtomicUsize,
    /// The most attempts running at once.
    pub max_running: AtomicUsize,
}

impl TestHandler {
    pub fn attempts_of(&self, id: EventId) -> u32 {
        lock(&self.attempts).get(&id).copied().unwrap_or(0)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[async_trait]
impl Handler for TestHandler {
    fn schema(&self) -> Vec<String> {
        vec![
            "CREATE TABLE effects (event_id TEXT PRIMARY KEY, n BIGINT NOT NULL)".into(),
            "CREATE TABLE stream_order (stream TEXT PRIMARY KEY, last BIGINT NOT NULL, \
             violations BIGINT NOT NULL)"
                .into(),
        ]
    }

    async fn handle(&self, message: &Message) -> Result<Vec<SqlStatement>, HandlerError> {
        let event = &message.event;
        *lock(&self.attempts).entry(event.id).or_default() += 1;
        let running = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(running, Ordering::SeqCst);
        let delay = *lock(&self.delay);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        self.running.fetch_sub(1, Ordering::SeqCst);
        if self.always_transient.load(Ordering::SeqCst) {
            return Err(HandlerError::Transient("peer down".into()));
        }
        if let Some(left) = lock(&self.transient).get_mut(&event.id).filter(|n| **n > 0) {
            *left -= 1;
            return Err(HandlerError::Transient("flaky peer".into()));
        }
        if lock(&self.permanent_types).contains(event.event_type.as_str()) {
            return Err(HandlerError::Permanent(format!(
                "{} is not supported",
                event.event_type
            )));
        }
        let version = i64::try_from(event.version.0).unwrap_or(i64::MAX);
        Ok(vec![
            SqlStatement::new(
                "INSERT INTO effects (event_id, n) VALUES ($1, 1) \
                 ON CONFLICT (event_id) DO UPDATE SET n = effects.n + 1",
            )
            .bind(event.id.to_string()),
            SqlStatement::new(
                "INSERT INTO stream_order (stream, last, violations) VALUES ($1, $2, 0) \
                 ON CONFLICT (stream) DO UPDATE SET \
                 violations = stream_order.violations + \
                 CASE WHEN excluded.last > stream_order.last THEN 0 ELSE 1 END, \
                 last = excluded.last",
            )
            .bind(event.stream_id.as_str())
            .bind(version),
        ])
    }
}

/// A producer, its store, the bus and the running pieces of one case.
pub struct Fixture {
    pub world: Arc<dyn World>,
    pub service: ServiceName,
    pub store: Arc<dyn EventStore>,
    relay: Option<Running>,
}

/// A spawned component and its stop switch.
pub struct Running {
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), BusError>>,
}

impl Running {
    pub fn spawn<F>(run: impl FnOnce(futures::future::BoxFuture<'static, ()>) -> F) -> Self
    where
        F: Future<Output = Result<(), BusError>> + Send + 'static,
    {
        let (stop, mut stopped) = watch::channel(false);
        let shutdown = Box::pin(async move {
            let _ = stopped.wait_for(|s| *s).await;
        });
        Self {
            stop,
            task: tokio::spawn(run(shutdown)),
        }
    }

    /// Asks it to stop and waits for its result.
    pub async fn stop(self) -> Result<(), BusError> {
        let _ = self.stop.send(true);
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the component stops when asked")
            .unwrap_or(Err(BusError::Closed))
    }

    /// Waits for it to end by itself (a crash).
    pub async fn ended(self) -> Result<(), BusError> {
        let _ = self.stop;
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the component ends")
            .unwrap_or(Err(BusError::Closed))
    }
}

/// A fault hook that fails at `point` the first `times` times it is reached.
pub fn crash_at(point: FaultPoint, times: usize) -> FaultHook {
    let left = Arc::new(AtomicUsize::new(times));
    Arc::new(move |at| {
        if at == point
            && left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            return Err(BusError::Unavailable {
                message: format!("injected crash at {at:?}"),
                source: None,
            });
        }
        Ok(())
    })
}

/// Consumer options for tests: fast retries and a short acknowledgement timeout.
pub fn fast_options() -> ConsumerOptions {
    ConsumerOptions {
        max_in_flight: 10,
        fetch_wait: Duration::from_millis(200),
        ack_wait: Duration::from_secs(2),
        retry: RetryPolicy {
            attempts_max: 4,
            initial_delay: Duration::from_millis(20),
            multiplier: 2.0,
            delay_max: Duration::from_millis(200),
            jitter_ratio: 0.1,
        },
        order_wait: Duration::from_millis(10),
        order_deliveries_max: 10_000,
        housekeeping: Duration::from_millis(100),
        shutdown_grace: Duration::from_secs(5),
    }
}

pub fn consumer_name(name: &str) -> ConsumerName {
    ConsumerName::new(name).expect("valid consumer name")
}

impl Fixture {
    /// A producer `order` whose public events are `public`, and its relay (if any).
    pub async fn new(backend: &dyn BusBackend, public: PublicEvents) -> Self {
        Self::with_relay_faults(backend, public, None).await
    }

    pub async fn with_relay_faults(
        backend: &dyn BusBackend,
        public: PublicEvents,
        faults: Option<FaultHook>,
    ) -> Self {
        Self::in_world(backend.world().await, public, faults).await
    }

    /// A fixture in a world the caller keeps a hand on (to restart its broker).
    pub async fn in_world(
        world: Arc<dyn World>,
        public: PublicEvents,
        faults: Option<FaultHook>,
    ) -> Self {
        let service = ServiceName::new("order").expect("service");
        let store: Arc<dyn EventStore> =
            Arc::new(MemoryStore::new(Limits::default(), Arc::new(SystemClock)));
        let mut fixture = Self {
            world,
            service,
            store,
            relay: None,
        };
        fixture.start_relay(public, faults).await;
        fixture
    }

    /// Starts the relay (brokers only), replacing one that ended.
    pub async fn start_relay(&mut self, public: PublicEvents, faults: Option<FaultHook>) {
        let relay = self
            .world
            .produce(&self.service, Arc::clone(&self.store), public)
            .await;
        self.relay = relay.map(|relay| {
            let relay = match faults {
                Some(faults) => relay.faults(faults),
                None => relay,
            };
            Running::spawn(move |shutdown| relay.run(shutdown))
        });
    }

    /// Takes the running relay (to stop it or wait for its crash).
    pub fn take_relay(&mut self) -> Option<Running> {
        self.relay.take()
    }

    /// Appends one event of `event_type` to each of `streams`, `rounds` times.
    pub async fn append(
        &self,
        streams: &[String],
        event_type: &str,
        rounds: usize,
    ) -> Vec<EventId> {
        let mut ids = Vec::new();
        for round in 0..rounds {
            for stream in streams {
                let event = NewEvent::json(event_type, &serde_json::json!({ "round": round }))
                    .expect("event");
                ids.push(event.id);
                self.store
                    .append(StreamAppend::new(
                        StreamId::new(stream.clone()).expect("stream"),
                        ExpectedVersion::Any,
                        vec![event],
                    ))
                    .await
                    .expect("append");
            }
        }
        ids
    }

    /// Starts an instance of consumer `name` on a new connection.
    pub async fn consumer(
        &self,
        name: &str,
        handler: Arc<TestHandler>,
        options: ConsumerOptions,
        faults: Option<FaultHook>,
    ) -> Running {
        let transport = self.world.connect().await;
        let consumer = crate::Consumer::new(
            consumer_name(name),
            self.service.clone(),
            transport,
            self.world.inbox_models(),
            handler,
        )
        .options(options);
        let consumer = match faults {
            Some(faults) => consumer.faults(faults),
            None => consumer,
        };
        Running::spawn(move |shutdown| consumer.run(shutdown))
    }

    /// The consumer's inbox, once it exists.
    pub async fn inbox(&self, name: &str) -> Inbox {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match Inbox::existing(
                self.world.inbox_models(),
                &consumer_name(name),
                Arc::new(SystemClock),
            )
            .await
            {
                Ok(inbox) => return inbox,
                Err(error) if tokio::time::Instant::now() > deadline => {
                    panic!("consumer {name} never opened its inbox: {error}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// Effects by event id.
    pub async fn effects(&self, name: &str) -> HashMap<String, i64> {
        let rows = self
            .inbox(name)
            .await
            .query(SqlStatement::new("SELECT event_id, n FROM effects"))
            .await
            .expect("effects");
        rows.iter()
            .map(|r| {
                (
                    r.text("event_id").expect("id").to_owned(),
                    r.int("n").expect("n"),
                )
            })
            .collect()
    }

    /// Order violations summed over streams.
    pub async fn violations(&self, name: &str) -> i64 {
        let rows = self
            .inbox(name)
            .await
            .query(SqlStatement::new(
                "SELECT coalesce(sum(violations), 0) AS v FROM stream_order",
            ))
            .await
            .expect("violations");
        rows.first().and_then(|r| r.int("v")).unwrap_or(0)
    }

    /// Waits until each of `ids` has taken effect, then checks it did exactly once
    /// and that nothing else did.
    pub async fn expect_exactly_once(&self, name: &str, ids: &[EventId]) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let effects = self.effects(name).await;
            let done = ids
                .iter()
                .filter(|id| effects.contains_key(&id.to_string()))
                .count();
            if done == ids.len() {
                let twice: Vec<_> = effects.iter().filter(|(_, n)| **n != 1).collect();
                assert!(twice.is_empty(), "effects not exactly once: {twice:?}");
                assert_eq!(effects.len(), ids.len(), "effects of unexpected events");
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                let missing: Vec<EventId> = ids
                    .iter()
                    .filter(|id| !effects.contains_key(&id.to_string()))
                    .copied()
                    .collect();
                let mut detail = Vec::new();
                for id in missing.iter().take(5) {
                    let event = self.store.read_event(*id).await.ok().flatten();
                    detail.push(format!(
                        "{id} = {:?}",
                        event.map(|e| (e.stream_id.to_string(), e.version.0, e.position.0))
                    ));
                }
                let inbox = self
                    .inbox(name)
                    .await
                    .query(SqlStatement::new(
                        "SELECT stream, version FROM eventyr_inbox ORDER BY stream",
                    ))
                    .await
                    .map(|rows| format!("{rows:?}"))
                    .unwrap_or_default();
                panic!(
                    "only {done} of {} events took effect; missing {}: {detail:?}; inbox: {inbox}",
                    ids.len(),
                    missing.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until `check` holds of the consumer's dead letters.
    pub async fn wait_dead_letters(
        &self,
        name: &str,
        check: impl Fn(&[crate::DeadLetter]) -> bool,
    ) -> Vec<crate::DeadLetter> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let letters = self
                .inbox(name)
                .await
                .dead_letters(None, 1000)
                .await
                .expect("dead letters");
            if check(&letters) {
                return letters;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "dead letters never as expected: {letters:?}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn stop(mut self) {
        if let Some(relay) = self.relay.take() {
            relay.stop().await.expect("the relay stops cleanly");
        }
    }
}

fn streams(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("order-{i}")).collect()
}

/// Every public event takes effect once, in stream order, shared by two competing
/// instances; private events stay private.
pub async fn competing_instances_share_the_work_in_order(backend: &dyn BusBackend) {
    let fixture = Fixture::new(backend, PublicEvents::only(["OrderPlaced", "OrderPaid"])).await;
    let (first, second) = (
        Arc::new(TestHandler::default()),
        Arc::new(TestHandler::default()),
    );
    *lock(&first.delay) = Duration::from_millis(1);
    *lock(&second.delay) = Duration::from_millis(2);
    let one = fixture
        .consumer("billing", Arc::clone(&first), fast_options(), None)
        .await;
    let two = fixture
        .consumer("billing", Arc::clone(&second), fast_options(), None)
        .await;
    let streams = streams(12);
    let mut ids = Vec::new();
    let took_part = |h: &TestHandler| !lock(&h.attempts).is_empty();
    let deadline = tokio::time::Instant::now() + WAIT;
    // Waves of events until both instances have taken part (one may start later).
    while ids.len() < 120 || !(took_part(&first) && took_part(&second)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "both instances take part"
        );
        ids.extend(fixture.append(&streams, "OrderPlaced", 1).await);
        fixture.append(&streams[..3], "InternalNote", 1).await;
        ids.extend(fixture.append(&streams, "OrderPaid", 1).await);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    fixture.expect_exactly_once("billing", &ids).await;
    assert_eq!(fixture.violations("billing").await, 0, "stream order kept");
    one.stop().await.expect("stops");
    two.stop().await.expect("stops");
    fixture.stop().await;
}

/// A consumer killed after its effect committed and before its acknowledgement gets
/// the message again and recognises it: no second effect. A restart resumes.
pub async fn redelivery_after_a_crash_has_no_second_effect(backend: &dyn BusBackend) {
    let fixture = Fixture::new(backend, PublicEvents::All).await;
    let handler = Arc::new(TestHandler::default());
    let ids = fixture.append(&streams(4), "OrderPlaced", 5).await;
    let crashing = fixture
        .consumer(
            "shipping",
            Arc::clone(&handler),
            fast_options(),
            Some(crash_at(FaultPoint::EffectCommitted, 1)),
        )
        .await;
    assert!(
        crashing.ended().await.is_err(),
        "the injected crash stops it"
    );
    let effects = fixture.effects("shipping").await;
    assert!(!effects.is_empty(), "an effect committed before the crash");
    let restarted = fixture
        .consumer("shipping", Arc::clone(&handler), fast_options(), None)
        .await;
    fixture.expect_exactly_once("shipping", &ids).await;
    assert_eq!(fixture.violations("shipping").await, 0);
    restarted.stop().await.expect("stops");
    fixture.stop().await;
}

/// A handler failing transiently twice succeeds on the third attempt: one effect,
/// no dead letter.
pub async fn transient_failures_are_retried(backend: &dyn BusBackend) {
    let fixture = Fixture::new(backend, PublicEvents::All).await;
    let handler = Arc::new(TestHandler::default());
    let ids = fixture.append(&streams(3), "OrderPlaced", 2).await;
    lock(&handler.transient).insert(ids[1], 2);
    let consumer = fixture
        .consumer("points", Arc::clone(&handler), fast_options(), None)
        .await;
    fixture.expect_exactly_once("points", &ids).await;
    assert_eq!(handler.attempts_of(ids[1]), 3, "two failures, then success");
    let letters = fixture
        .inbox("points")
        .await
        .dead_letters(None, 10)
        .await
        .expect("dlq");
    assert!(letters.is_empty(), "{letters:?}");
    assert_eq!(fixture.violations("points").await, 0);
    consumer.stop().await.expect("stops");
    fixture.stop().await;
}

/// A message that keeps failing goes to the dead letters with its error, attempts
/// and payload, without blocking other streams (its own stream goes on after it);
/// after the fix, a replay gives it its one effect.
pub async fn failures_go_to_dead_letters_and_replay(backend: &dyn BusBackend) {
    let fixture = Fixture::new(backend, PublicEvents::All).await;
    let handler = Arc::new(TestHandler::default());
    lock(&handler.permanent_types).insert("OrderDisputed".into());
    let streams = streams(3);
    let mut ids = fixture.append(&streams, "OrderPlaced", 2).await;
    let poisoned = fixture.append(&streams[..1], "OrderDisputed", 1).await;
    let flaky = fixture.append(&streams[1..2], "OrderFlaky", 1).await;
    lock(&handler.transient).insert(flaky[0], u32::MAX);
    ids.extend(fixture.append(&streams, "OrderPaid", 2).await);
    let consumer = fixture
        .consumer("audit", Arc::clone(&handler), fast_options(), None)
        .await;
    fixture.expect_exactly_once("audit", &ids).await;
    let letters = fixture
        .wait_dead_letters("audit", |letters| letters.len() == 2)
        .await;
    let permanent = letters
        .iter()
        .find(|l| l.event_id == Some(poisoned[0]))
        .expect("the permanent failure is a dead letter");
    assert_eq!(permanent.attempts, 1, "permanent: no retries");
    assert!(permanent.error.contains("not supported"), "{permanent:?}");
    assert_eq!(permanent.status, DeadLetterStatus::Dead);
    let decoded = Message::decode(&permanent.payload).expect("the original payload is kept");
    assert_eq!(decoded.event.id, poisoned[0]);
    let exhausted = letters
        .iter()
        .find(|l| l.event_id == Some(flaky[0]))
        .expect("the exhausted retries are a dead letter");
    assert_eq!(exhausted.attempts, 4, "1 attempt + 3 retries");
    assert_eq!(fixture.violations("audit").await, 0);

    // The fix, then the replay of everything dead.
    lock(&handler.permanent_types).clear();
    lock(&handler.transient).clear();
    let inbox = fixture.inbox("audit").await;
    assert_eq!(inbox.request_replay(None).await.expect("replay"), 2);
    ids.extend(poisoned);
    ids.extend(flaky);
    fixture.expect_exactly_once("audit", &ids).await;
    fixture
        .wait_dead_letters("audit", |letters| {
            letters
                .iter()
                .all(|l| l.status == DeadLetterStatus::Replayed)
        })
        .await;
    assert!(
        inbox.request_replay(Some("no-such-id")).await.is_err(),
        "an unknown id is an error"
    );
    consumer.stop().await.expect("stops");
    fixture.stop().await;
}

/// A message that cannot be decoded goes to the dead letters at once and does not
/// block the others (backends with a wire only).
pub async fn poison_messages_go_to_dead_letters_at_once(backend: &dyn BusBackend) {
    let fixture = Fixture::new(backend, PublicEvents::All).await;
    let handler = Arc::new(TestHandler::default());
    let mut ids = fixture.append(&streams(2), "OrderPlaced", 1).await;
    if !fixture
        .world
        .publish_raw(&fixture.service, Bytes::from_static(b"{not json"))
        .await
    {
        // No wire: nothing can arrive undecoded. (The in-process bus hands over
        // events from the store, which are decoded by construction.)
        fixture.stop().await;
        return;
    }
    // A well-formed event that claims to come from another service.
    let impostor = Message {
        source: ServiceName::new("payment").expect("service"),
        event: fixture
            .store
            .read_event(ids[0])
            .await
            .expect("read")
            .expect("stored"),
        previous: None,
    };
    fixture
        .world
        .publish_raw(&fixture.service, impostor.encode())
        .await;
    ids.extend(fixture.append(&streams(2), "OrderPaid", 1).await);
    let consumer = fixture
        .consumer("mailer", Arc::clone(&handler), fast_options(), None)
        .await;
    fixture.expect_exactly_once("mailer", &ids).await;
    let letters = fixture
        .wait_dead_letters("mailer", |letters| letters.len() == 2)
        .await;
    let garbage = letters
        .iter()
        .find(|l| &l.payload[..] == b"{not json")
        .expect("the garbage is a dead letter");
    assert_eq!(garbage.event_id, None);
    assert_eq!(garbage.attempts, 1, "at once");
    assert!(garbage.error.contains("undecodable"), "{garbage:?}");
    let stranger = letters
        .iter()
        .find(|l| l.error.contains("claims source"))
        .expect("the impostor is a dead letter");
    assert_eq!(stranger.payload, impostor.encode());
    consumer.stop().await.expect("stops");
    fixture.stop().await;
}

/// An instance holds at most its in-flight bound of messages at a time.
pub async fn in_flight_messages_are_bounded(backend: &dyn BusBackend) {
    let fixture = Fixture::new(backend, PublicEvents::All).await;
    let handler = Arc::new(TestHandler::default());
    *lock(&handler.delay) = Duration::from_millis(20);
    let ids = fixture.append(&streams(40), "OrderPlaced", 2).await;
    let options = ConsumerOptions {
        max_in_flight: 3,
        ..fast_options()
    };
    let consumer = fixture
        .consumer("bounded", Arc::clone(&handler), options, None)
        .await;
    fixture.expect_exactly_once("bounded", &ids).await;
    let most = handler.max_running.load(Ordering::SeqCst);
    assert!(
        (2..=3).contains(&most),
        "at most 3 at once, and more than 1: {most}"
    );
    consumer.stop().await.expect("stops");
    fixture.stop().await;
}

/// A shutdown returns unfinished work; the next instance finishes it, once.
pub async fn shutdown_returns_unfinished_work(backend: &dyn BusBackend) {
    let fixture = Fixture::new(backend, PublicEvents::All).await;
    let handler = Arc::new(TestHandler::default());
    *lock(&handler.delay) = Duration::from_millis(30);
    let ids = fixture.append(&streams(10), "OrderPlaced", 4).await;
    let first = fixture
        .consumer("stocker", Arc::clone(&handler), fast_options(), None)
        .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while fixture.effects("stocker").await.len() < 5 {
        assert!(tokio::time::Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.stop().await.expect("a clean stop");
    assert!(
        fixture.effects("stocker").await.len() < ids.len(),
        "stopped before the end"
    );
    *lock(&handler.delay) = Duration::ZERO;
    let second = fixture
        .consumer("stocker", Arc::clone(&handler), fast_options(), None)
        .await;
    fixture.expect_exactly_once("stocker", &ids).await;
    assert_eq!(fixture.violations("stocker").await, 0);
    second.stop().await.expect("stops");
    fixture.stop().await;
}

/// Two consumers of the same producer each get every event (fan-out).
pub async fn every_consumer_gets_every_event(backend: &dyn BusBackend) {
    let fixture = Fixture::new(backend, PublicEvents::All).await;
    let ids = fixture.append(&streams(5), "OrderPlaced", 3).await;
    let a = fixture
        .consumer(
            "alpha",
            Arc::new(TestHandler::default()),
            fast_options(),
            None,
        )
        .await;
    let b = fixture
        .consumer(
            "beta",
            Arc::new(TestHandler::default()),
            fast_options(),
            None,
        )
        .await;
    fixture.expect_exactly_once("alpha", &ids).await;
    fixture.expect_exactly_once("beta", &ids).await;
    a.stop().await.expect("stops");
    b.stop().await.expect("stops");
    fixture.stop().await;
}

/// Expands to one test per bus conformance case for the backend built by `$backend`.
#[macro_export]
macro_rules! bus_suite {
    ($backend:expr) => {
        $crate::bus_suite!(@cases $backend;
            competing_instances_share_the_work_in_order,
            redelivery_after_a_crash_has_no_second_effect,
            transient_failures_are_retried,
            failures_go_to_dead_letters_and_replay,
            poison_messages_go_to_dead_letters_at_once,
            in_flight_messages_are_bounded,
            shutdown_returns_unfinished_work,
            every_consumer_gets_every_event,
        );
    };
    (@cases $backend:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let backend = $backend;
                // A hang fails the case instead of the whole run.
                tokio::time::timeout(
                    $crate::testkit::WAIT * 4,
                    $crate::testkit::$case(&backend),
                )
                .await
                .expect("the case ends in time");
            }
        )*
    };
}
