//! [`Consumer`]: one instance of a named consumer of a service's events. It takes
//! deliveries from a [`Transport`], keeps each stream in order, runs the [`Handler`],
//! commits the effect with the inbox record and only then acknowledges; retries
//! transient failures with backoff and moves what cannot be handled to the dead
//! letters; replays dead letters an operator queued.
//!
//! Per delivery:
//! 1. decode (a message that cannot be decoded goes to the dead letters at once);
//! 2. wait behind an earlier message of the same stream held by this instance;
//! 3. ask the inbox: done already → acknowledge; its stream's previous message not
//!    done (another instance has it, or it is being retried) → deliver again later;
//! 4. handle, commit the statements with the inbox record, acknowledge.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::num::NonZeroUsize;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use eventyr_core::{Clock, RetryPolicy, StreamVersion, SystemClock};
use eventyr_store::StoreError;
use eventyr_store::readmodel::{ReadModels, is_unit_error};
use eventyr_store::sql::SqlStatement;
use eventyr_telemetry::names;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt as _, StreamExt as _};
use lru::LruCache;
use tokio::sync::watch;
use tracing::Instrument as _;

use crate::error::BusError;
use crate::inbox::{DeadLetter, DeadLetterStatus, Gate, Inbox, NewDeadLetter};
use crate::message::{ConsumerName, Message, ServiceName};
use crate::transport::{Body, Delivery, SubscribeRequest, Subscription, Transport};

/// Streams whose last committed version an instance remembers.
const DONE_CACHE: NonZeroUsize = NonZeroUsize::new(100_000).expect("non-zero");

/// How handlers are retried by default: 3 retries after the first attempt, from 1 s,
/// doubling, at most 300 s, plus up to 10 % jitter.
pub const HANDLER_RETRY: RetryPolicy = RetryPolicy {
    attempts_max: 4,
    initial_delay: Duration::from_secs(1),
    multiplier: 2.0,
    delay_max: Duration::from_secs(300),
    jitter_ratio: 0.1,
};

/// How a consumer waits for a broker that cannot take its subscription yet: from
/// 100 ms, doubling, at most 5 s, for as long as it runs.
const SUBSCRIBE_RETRY: RetryPolicy = RetryPolicy {
    attempts_max: u32::MAX,
    initial_delay: Duration::from_millis(100),
    multiplier: 2.0,
    delay_max: Duration::from_secs(5),
    jitter_ratio: 0.1,
};

/// Why a handler did not produce an effect.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandlerError {
    /// It may work later (a peer is down, a timeout): retried with backoff, then dead
    /// letters.
    #[error("transient: {0}")]
    Transient(String),
    /// It will never work as it is (invalid content, an unknown newer schema, a broken
    /// rule): dead letters at once.
    #[error("permanent: {0}")]
    Permanent(String),
}

/// What a consumer does with a message.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// The handler's own tables (DDL in the portable dialect of
    /// [`eventyr_store::sql`]), created with its inbox on first start.
    fn schema(&self) -> Vec<String> {
        Vec::new()
    }

    /// The event types the handler acts on (`None`, the default: any). The transport
    /// may then leave the others out (see `SubscribeRequest::event_types`); the
    /// handler must still ignore any it gets.
    fn event_types(&self) -> Option<BTreeSet<String>> {
        None
    }

    /// Decides the effect of `message`: statements committed in one transaction with
    /// the inbox record, so that they happen once. Anything else the handler does
    /// (a command to its service's aggregates) must be idempotent by the event id,
    /// e.g. a command id derived from it. Messages the handler does not care about
    /// return no statements.
    async fn handle(&self, message: &Message) -> Result<Vec<SqlStatement>, HandlerError>;
}

/// How a consumer instance runs.
#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    /// Deliveries held by this instance and not yet acknowledged, at most. Default 10.
    pub max_in_flight: usize,
    /// How long one fetch waits for messages. Default 500 ms.
    pub fetch_wait: Duration,
    /// How long the broker waits for an acknowledgement before delivering again
    /// (work in progress is reported meanwhile). Default 30 s.
    pub ack_wait: Duration,
    /// Retries of transient handler failures. Default [`HANDLER_RETRY`].
    pub retry: RetryPolicy,
    /// The first delay before a message whose predecessor is not done is delivered
    /// again; it grows to 1 s. Default 50 ms.
    pub order_wait: Duration,
    /// After this many deliveries still waiting for its predecessor, a message is
    /// handled anyway (the predecessor is gone: expired from the broker, or published
    /// before this consumer existed) and `eventyr_bus_order_gaps_total` rises.
    /// Default 600 (about 10 minutes).
    pub order_deliveries_max: u64,
    /// How often to look for dead letters queued for replay, and count them.
    /// Default 1 s.
    pub housekeeping: Duration,
    /// How long a shutdown waits for handlers in progress. Default 10 s.
    pub shutdown_grace: Duration,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        Self {
            max_in_flight: 10,
            fetch_wait: Duration::from_millis(500),
            ack_wait: Duration::from_secs(30),
            retry: HANDLER_RETRY,
            order_wait: Duration::from_millis(50),
            order_deliveries_max: 600,
            housekeeping: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// A point where tests inject a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// A consumer committed an effect and has not acknowledged it.
    EffectCommitted,
    /// A relay's batch is stored by the broker and its checkpoint has not moved.
    Published,
}

/// Called at each [`FaultPoint`]; an error stops the component at once, as a crash
/// would: nothing after the point happens.
pub type FaultHook = Arc<dyn Fn(FaultPoint) -> Result<(), BusError> + Send + Sync>;

/// Called after a message's effect has committed, before it is acknowledged
/// (instrumentation: benchmarks, tests).
pub type EffectObserver = Arc<dyn Fn(&Message) + Send + Sync>;

/// One instance of a named consumer.
pub struct Consumer {
    name: ConsumerName,
    source: ServiceName,
    transport: Arc<dyn Transport>,
    models: Arc<dyn ReadModels>,
    handler: Arc<dyn Handler>,
    options: ConsumerOptions,
    clock: Arc<dyn Clock>,
    faults: Option<FaultHook>,
    observer: Option<EffectObserver>,
}

impl Consumer {
    /// Consumer `name` of `source`'s events, with its inbox in `models` (opened
    /// durably: see `SqliteReadModels::open_durable`).
    pub fn new(
        name: ConsumerName,
        source: ServiceName,
        transport: Arc<dyn Transport>,
        models: Arc<dyn ReadModels>,
        handler: Arc<dyn Handler>,
    ) -> Self {
        Self {
            name,
            source,
            transport,
            models,
            handler,
            options: ConsumerOptions::default(),
            clock: Arc::new(SystemClock),
            faults: None,
            observer: None,
        }
    }

    pub fn options(mut self, options: ConsumerOptions) -> Self {
        self.options = options;
        self
    }

    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Injects crashes (tests).
    pub fn faults(mut self, faults: FaultHook) -> Self {
        self.faults = Some(faults);
        self
    }

    /// Calls `observer` after each effect commits.
    pub fn observe(mut self, observer: EffectObserver) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Consumes until `shutdown` completes, then returns in-flight work to the broker
    /// (handlers in progress get `shutdown_grace` to finish). A broker that is not
    /// available yet is waited for. Errors: the inbox cannot be opened, the
    /// subscription is refused for good, or an injected crash.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), BusError> {
        let inbox = Inbox::open(
            Arc::clone(&self.models),
            &self.name,
            &self.handler.schema(),
            Arc::clone(&self.clock),
        )
        .await?;
        let options = self.options.clone();
        let max_in_flight = options.max_in_flight.max(1);
        let mut shutdown = std::pin::pin!(shutdown);
        // A broker that cannot take the subscription yet (starting, restarting, slow to
        // create the durable consumer) is waited for, with backoff, until shutdown.
        let mut attempt = 0;
        let subscription = loop {
            let request = SubscribeRequest {
                consumer: self.name.clone(),
                source: self.source.clone(),
                max_in_flight,
                ack_wait: options.ack_wait,
                checkpoints: Arc::new(inbox.clone()),
                event_types: self.handler.event_types(),
            };
            match self.transport.subscribe(request).await {
                Ok(subscription) => break subscription,
                Err(error) if error.is_retryable() => {
                    attempt += 1;
                    let delay = SUBSCRIBE_RETRY.delay(attempt, fastrand::f64());
                    tracing::warn!(consumer = %self.name, %error, ?delay, "cannot subscribe yet; retrying");
                    tokio::select! {
                        () = &mut shutdown => return Ok(()),
                        () = tokio::time::sleep(delay) => {}
                    }
                }
                Err(error) => return Err(error),
            }
        };
        let (stopping_tx, stopping) = watch::channel(false);
        let ctx = Arc::new(Ctx {
            inbox,
            handler: Arc::clone(&self.handler),
            options,
            label: self.name.to_string(),
            clock: Arc::clone(&self.clock),
            stopping,
            faults: self.faults.clone(),
            observer: self.observer.clone(),
            source: self.source.clone(),
            done: Mutex::new(LruCache::new(DONE_CACHE)),
        });
        let mut lanes = Lanes::default();
        let mut running: FuturesUnordered<BoxFuture<'static, Finished>> = FuturesUnordered::new();
        let mut idle: Option<Box<dyn Subscription>> = Some(subscription);
        let mut fetching: Option<BoxFuture<'static, Fetched>> = None;
        let mut housekeeping = tokio::time::interval(ctx.options.housekeeping);
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut housekeeping_busy = false;
        let mut fetch_failures = 0u32;
        let mut last_lag = tokio::time::Instant::now();

        loop {
            let held = lanes.held + running.len();
            if fetching.is_none()
                && held < max_in_flight
                && let Some(subscription) = idle.take()
            {
                let lag_due = last_lag.elapsed() >= ctx.options.housekeeping;
                if lag_due {
                    last_lag = tokio::time::Instant::now();
                }
                fetching = Some(fetch(
                    subscription,
                    max_in_flight - held,
                    ctx.options.fetch_wait,
                    fetch_failures,
                    lag_due,
                ));
            }
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                Some(finished) = running.next(), if !running.is_empty() => {
                    match finished {
                        Finished::Message(key, result) => {
                            result?;
                            if let Some((delivery, message)) = lanes.release(&key) {
                                running.push(process(Arc::clone(&ctx), key, delivery, message));
                            }
                        }
                        Finished::Poison(result) => result?,
                        Finished::Housekeeping => housekeeping_busy = false,
                    }
                }
                fetched = async { fetching.as_mut().expect("guarded").await }, if fetching.is_some() => {
                    fetching = None;
                    let Fetched { subscription, deliveries, pending } = fetched;
                    idle = Some(subscription);
                    if let Some(pending) = pending {
                        metrics::gauge!(names::BUS_CONSUMER_LAG_MESSAGES, names::LABEL_CONSUMER => ctx.label.clone())
                            .set(pending as f64);
                    }
                    match deliveries {
                        Ok(deliveries) => {
                            fetch_failures = 0;
                            for delivery in deliveries {
                                if let Some(work) = dispatch(&ctx, &mut lanes, delivery) {
                                    running.push(work);
                                }
                            }
                        }
                        Err(error) => {
                            fetch_failures = fetch_failures.saturating_add(1);
                            tracing::warn!(consumer = %ctx.label, %error, "fetching messages failed; retrying");
                        }
                    }
                }
                _ = housekeeping.tick(), if !housekeeping_busy => {
                    housekeeping_busy = true;
                    running.push(housekeep(Arc::clone(&ctx)));
                }
            }
        }

        // Shut down: return what is not started, let what runs finish or return. The
        // fetch under way and the work that runs are driven together: a fetch saving
        // its checkpoint may wait for a commit that a running message holds.
        let _ = stopping_tx.send(true);
        for (delivery, _) in lanes.drain() {
            let _ = delivery.acker.nak(Duration::ZERO).await;
        }
        let give_back = async {
            if let Some(fetching) = fetching.take() {
                for delivery in fetching.await.deliveries.unwrap_or_default() {
                    let _ = delivery.acker.nak(Duration::ZERO).await;
                }
            }
        };
        let finish = async {
            let mut outcome = Ok(());
            while let Some(finished) = running.next().await {
                if let Finished::Message(_, Err(error)) | Finished::Poison(Err(error)) = finished {
                    outcome = outcome.and(Err(error));
                }
            }
            outcome
        };
        // Work still running at the end of the grace is dropped unacknowledged: the
        // broker delivers it again and the inbox recognises what did commit.
        tokio::time::timeout(ctx.options.shutdown_grace, async {
            futures::join!(give_back, finish).1
        })
        .await
        .unwrap_or(Ok(()))
    }
}

/// What every piece of work of one consumer instance shares.
struct Ctx {
    inbox: Inbox,
    handler: Arc<dyn Handler>,
    options: ConsumerOptions,
    label: String,
    clock: Arc<dyn Clock>,
    stopping: watch::Receiver<bool>,
    faults: Option<FaultHook>,
    observer: Option<EffectObserver>,
    /// The producer this consumer consumes.
    source: ServiceName,
    /// The last version this instance committed, per stream.
    done: Mutex<LruCache<Key, u64>>,
}

impl Ctx {
    fn fault(&self, point: FaultPoint) -> Result<(), BusError> {
        self.faults.as_ref().map_or(Ok(()), |hook| hook(point))
    }

    /// What this instance's own commits say of `message`, when that is enough: done
    /// already (versions only grow), or ready (its predecessor done). A ready guess
    /// may be stale (another instance went further): the commit's guarded record
    /// then fails and the inbox decides. Anything else asks the inbox.
    fn cached_gate(&self, message: &Message) -> Option<Gate> {
        let done = *lock(&self.done).get(&message.key())?;
        match Gate::decide(
            Some(StreamVersion(done)),
            message.event.version,
            message.previous,
        ) {
            Gate::Waiting => None,
            gate => Some(gate),
        }
    }

    fn remember(&self, message: &Message) {
        let mut done = lock(&self.done);
        let version = message.event.version.0;
        let key = message.key();
        if done.peek(&key).is_none_or(|d| *d < version) {
            done.put(key, version);
        }
    }

    fn count(&self, name: &'static str) {
        metrics::counter!(name, names::LABEL_CONSUMER => self.label.clone()).increment(1);
    }

    /// Waits `delay` while keeping the delivery's acknowledgement timer alive; false
    /// if the consumer is stopping (the delivery should be returned).
    async fn wait_working(&self, delay: Duration, delivery: Option<&Delivery>) -> bool {
        let beat = (self.options.ack_wait / 3).max(Duration::from_millis(100));
        let deadline = tokio::time::Instant::now() + delay;
        let mut stopping = self.stopping.clone();
        loop {
            if *stopping.borrow() {
                return false;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return true;
            }
            let until = deadline.min(now + beat);
            tokio::select! {
                () = tokio::time::sleep_until(until) => {
                    if let Some(delivery) = delivery {
                        let _ = delivery.acker.in_progress().await;
                    }
                }
                _ = stopping.changed() => return false,
            }
        }
    }

    fn lag(&self, message: &Message) {
        let age = self.clock.now().unix_micros() - message.event.recorded_at.unix_micros();
        metrics::gauge!(names::BUS_CONSUMER_LAG_SECONDS, names::LABEL_CONSUMER => self.label.clone())
            .set(age.max(0) as f64 / 1e6);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Ordering within one instance: a message waits behind an earlier one of its stream.
#[derive(Default)]
struct Lanes {
    busy: HashSet<Key>,
    waiting: HashMap<Key, VecDeque<(Delivery, Message)>>,
    held: usize,
}

type Key = (ServiceName, String);

impl Lanes {
    /// Takes the lane of `key` for `message`, or queues it behind the one running.
    fn enter(
        &mut self,
        key: &Key,
        delivery: Delivery,
        message: Message,
    ) -> Option<(Delivery, Message)> {
        if self.busy.insert(key.clone()) {
            return Some((delivery, message));
        }
        self.waiting
            .entry(key.clone())
            .or_default()
            .push_back((delivery, message));
        self.held += 1;
        None
    }

    /// The message of `key` that finished leaves its lane: the next one queued, if any.
    fn release(&mut self, key: &Key) -> Option<(Delivery, Message)> {
        let next = self.waiting.get_mut(key).and_then(VecDeque::pop_front);
        match next {
            Some(next) => {
                self.held -= 1;
                if self.waiting.get(key).is_some_and(VecDeque::is_empty) {
                    self.waiting.remove(key);
                }
                Some(next)
            }
            None => {
                self.busy.remove(key);
                None
            }
        }
    }

    fn drain(&mut self) -> Vec<(Delivery, Message)> {
        self.held = 0;
        self.waiting.drain().flat_map(|(_, queue)| queue).collect()
    }
}

enum Finished {
    Message(Key, Result<(), BusError>),
    Poison(Result<(), BusError>),
    Housekeeping,
}

struct Fetched {
    subscription: Box<dyn Subscription>,
    deliveries: Result<Vec<Delivery>, BusError>,
    pending: Option<u64>,
}

/// Fetches deliveries; also asks how many messages wait when `lag_due` or when
/// nothing came (the lag gauge).
fn fetch(
    mut subscription: Box<dyn Subscription>,
    max: usize,
    wait: Duration,
    failures: u32,
    lag_due: bool,
) -> BoxFuture<'static, Fetched> {
    async move {
        if failures > 0 {
            // A broker that is down: back off up to 2 s between attempts.
            let backoff = Duration::from_millis(50 << failures.min(5)).min(Duration::from_secs(2));
            tokio::time::sleep(backoff).await;
        }
        let deliveries = subscription.fetch(max, wait).await;
        let pending = match &deliveries {
            Ok(found) if lag_due || found.is_empty() => subscription.pending().await.ok().flatten(),
            _ => None,
        };
        Fetched {
            subscription,
            deliveries,
            pending,
        }
    }
    .boxed()
}

/// The message as it arrived (or encoded, for a transport that hands over events).
fn payload(delivery: &Delivery) -> bytes::Bytes {
    match &delivery.body {
        Body::Encoded(bytes) => bytes.clone(),
        Body::Decoded(message) => message.encode(),
    }
}

/// Decodes a delivery and starts its work, or queues it behind its stream.
fn dispatch(
    ctx: &Arc<Ctx>,
    lanes: &mut Lanes,
    delivery: Delivery,
) -> Option<BoxFuture<'static, Finished>> {
    ctx.count(names::BUS_DELIVERED_TOTAL);
    if delivery.deliveries > 1 {
        ctx.count(names::BUS_REDELIVERED_TOTAL);
    }
    let message = match &delivery.body {
        Body::Decoded(message) => (**message).clone(),
        Body::Encoded(bytes) => match Message::decode(bytes) {
            Ok(message) => message,
            Err(error) => {
                let letter = NewDeadLetter {
                    message: None,
                    payload: bytes.clone(),
                    error: error.to_string(),
                    attempts: 1,
                };
                let ctx = Arc::clone(ctx);
                return Some(
                    async move { Finished::Poison(dead_letter(&ctx, &delivery, letter, false).await) }
                        .boxed(),
                );
            }
        },
    };
    if message.source != ctx.source {
        // Not from the producer this consumer subscribed to: never trusted, never
        // recorded under another producer's streams.
        let letter = NewDeadLetter {
            error: format!(
                "the message claims source {:?}, but {} consumes {}",
                message.source.as_str(),
                ctx.label,
                ctx.source
            ),
            payload: payload(&delivery),
            message: None,
            attempts: 1,
        };
        let ctx = Arc::clone(ctx);
        return Some(
            async move { Finished::Poison(dead_letter(&ctx, &delivery, letter, false).await) }
                .boxed(),
        );
    }
    let key = message.key();
    let (delivery, message) = lanes.enter(&key, delivery, message)?;
    Some(process(Arc::clone(ctx), key, delivery, message))
}

fn process(
    ctx: Arc<Ctx>,
    key: Key,
    delivery: Delivery,
    message: Message,
) -> BoxFuture<'static, Finished> {
    async move {
        let result = handle_delivery(&ctx, &delivery, &message).await;
        Finished::Message(key, result)
    }
    .boxed()
}

/// How an attempt failed.
enum Failure {
    Transient(String),
    Permanent(String),
}

/// Runs the handler, catching a panic as a permanent failure. A delivery's broker
/// hears that work is in progress while a slow handler runs.
async fn decide(
    ctx: &Ctx,
    message: &Message,
    delivery: Option<&Delivery>,
) -> Result<Vec<SqlStatement>, Failure> {
    // Each attempt is a span that continues the trace of the event it handles.
    let span = eventyr_telemetry::trace::consumer(
        &ctx.label,
        message.event.event_type.as_str(),
        message.event.metadata.traceparent.as_deref(),
    );
    let handled = AssertUnwindSafe(ctx.handler.handle(message).instrument(span)).catch_unwind();
    let mut handled = std::pin::pin!(handled);
    let beat = (ctx.options.ack_wait / 3).max(Duration::from_millis(100));
    let outcome = loop {
        tokio::select! {
            outcome = &mut handled => break outcome,
            () = tokio::time::sleep(beat) => {
                if let Some(delivery) = delivery {
                    let _ = delivery.acker.in_progress().await;
                }
            }
        }
    };
    match outcome {
        Ok(Ok(statements)) => Ok(statements),
        Ok(Err(HandlerError::Transient(error))) => Err(Failure::Transient(error)),
        Ok(Err(HandlerError::Permanent(error))) => Err(Failure::Permanent(error)),
        Err(_) => Err(Failure::Permanent("the handler panicked".into())),
    }
}

/// Maps a failed effect commit: a refused statement will be refused again.
fn commit_failure(error: &StoreError) -> Failure {
    if is_unit_error(error) {
        Failure::Permanent(format!("the effect was refused: {error}"))
    } else {
        Failure::Transient(format!("the inbox is unavailable: {error}"))
    }
}

async fn handle_delivery(
    ctx: &Ctx,
    delivery: &Delivery,
    message: &Message,
) -> Result<(), BusError> {
    let mut attempt = 1u32;
    let mut inbox_failures = 0u32;
    let mut trust_cache = true;
    loop {
        let cached = if trust_cache {
            ctx.cached_gate(message)
        } else {
            None
        };
        trust_cache = false;
        let gate = match cached {
            Some(gate) => Ok(gate),
            None => ctx.inbox.gate(message).await,
        };
        let gate = match gate {
            Ok(gate) => gate,
            Err(error) => {
                // The inbox is down: nothing can be decided; wait and ask again.
                inbox_failures = inbox_failures.saturating_add(1);
                tracing::warn!(consumer = %ctx.label, %error, "the inbox is unavailable");
                let delay = ctx
                    .options
                    .retry
                    .delay(inbox_failures.min(8), fastrand::f64());
                if !ctx.wait_working(delay, Some(delivery)).await {
                    let _ = delivery.acker.nak(Duration::ZERO).await;
                    return Ok(());
                }
                continue;
            }
        };
        let forced = match gate {
            Gate::Duplicate => {
                ctx.count(names::BUS_DUPLICATES_TOTAL);
                return acknowledge(ctx, delivery).await;
            }
            Gate::Waiting if delivery.deliveries < ctx.options.order_deliveries_max => {
                let factor = u32::try_from(delivery.deliveries.min(20)).unwrap_or(20);
                let delay = (ctx.options.order_wait * factor).min(Duration::from_secs(1));
                let _ = delivery.acker.nak(delay).await;
                return Ok(());
            }
            Gate::Waiting => {
                ctx.count(names::BUS_ORDER_GAPS_TOTAL);
                tracing::warn!(
                    consumer = %ctx.label,
                    stream = %message.event.stream_id,
                    version = %message.event.version,
                    "the stream's previous message never came; handling this one anyway"
                );
                true
            }
            Gate::Ready => false,
        };
        let failure = match decide(ctx, message, Some(delivery)).await {
            Ok(statements) => {
                let mut unit = Vec::with_capacity(statements.len() + 1);
                unit.push(ctx.inbox.record(message, forced));
                unit.extend(statements);
                match ctx.inbox.commit(unit).await {
                    Ok(()) => {
                        ctx.remember(message);
                        ctx.lag(message);
                        if let Some(observer) = &ctx.observer {
                            observer(message);
                        }
                        ctx.fault(FaultPoint::EffectCommitted)?;
                        return acknowledge(ctx, delivery).await;
                    }
                    // The inbox record or one of the handler's statements changed
                    // another number of rows than expected: ask the gate which.
                    Err(StoreError::UnexpectedRowCount { .. }) => {
                        match ctx.inbox.gate(message).await {
                            Ok(Gate::Duplicate) => {
                                // Another instance committed it meanwhile.
                                ctx.count(names::BUS_DUPLICATES_TOTAL);
                                return acknowledge(ctx, delivery).await;
                            }
                            Ok(Gate::Waiting) if !forced => {
                                let _ = delivery.acker.nak(ctx.options.order_wait).await;
                                return Ok(());
                            }
                            Ok(_) => Failure::Permanent(
                                "the handler's statements changed other rows than they expected"
                                    .into(),
                            ),
                            Err(error) => Failure::Transient(error.to_string()),
                        }
                    }
                    Err(error) => commit_failure(&error),
                }
            }
            Err(failure) => failure,
        };
        match failure {
            Failure::Transient(error) if ctx.options.retry.allows(attempt + 1) => {
                ctx.count(names::BUS_RETRIES_TOTAL);
                tracing::debug!(consumer = %ctx.label, attempt, %error, "handler failed; retrying");
                let delay = ctx.options.retry.delay(attempt, fastrand::f64());
                if !ctx.wait_working(delay, Some(delivery)).await {
                    let _ = delivery.acker.nak(Duration::ZERO).await;
                    return Ok(());
                }
                attempt += 1;
            }
            Failure::Transient(error) | Failure::Permanent(error) => {
                let letter = NewDeadLetter {
                    message: Some(message.clone()),
                    payload: payload(delivery),
                    error,
                    attempts: attempt,
                };
                return dead_letter(ctx, delivery, letter, forced).await;
            }
        }
    }
}

async fn acknowledge(ctx: &Ctx, delivery: &Delivery) -> Result<(), BusError> {
    if let Err(error) = delivery.acker.ack().await {
        // Delivered again later, and then recognised as done.
        tracing::debug!(consumer = %ctx.label, %error, "an acknowledgement failed");
    } else {
        ctx.count(names::BUS_ACKNOWLEDGED_TOTAL);
    }
    Ok(())
}

/// Moves a message to the dead letters (recording it done, so that its stream goes
/// on), then acknowledges it.
async fn dead_letter(
    ctx: &Ctx,
    delivery: &Delivery,
    letter: NewDeadLetter,
    forced: bool,
) -> Result<(), BusError> {
    let mut unit = Vec::with_capacity(2);
    if let Some(message) = &letter.message {
        unit.push(ctx.inbox.record(message, forced));
    }
    unit.push(ctx.inbox.dead_letter(&letter));
    match ctx.inbox.commit(unit).await {
        Ok(()) => {
            if let Some(message) = &letter.message {
                ctx.remember(message);
            }
            ctx.count(names::BUS_DEAD_LETTERED_TOTAL);
            tracing::warn!(consumer = %ctx.label, id = %letter.id(), error = %letter.error, "message moved to the dead letters");
            ctx.fault(FaultPoint::EffectCommitted)?;
            acknowledge(ctx, delivery).await
        }
        Err(StoreError::UnexpectedRowCount { .. }) => {
            // Done meanwhile by another instance (or its predecessor is not): let the
            // broker deliver it again and the gate decide.
            let _ = delivery.acker.nak(ctx.options.order_wait).await;
            Ok(())
        }
        Err(error) => {
            tracing::warn!(consumer = %ctx.label, %error, "cannot write a dead letter; the message comes again");
            let _ = delivery.acker.nak(Duration::from_secs(1)).await;
            Ok(())
        }
    }
}

/// Counts the dead letters (the alert gauge) and replays those an operator queued.
fn housekeep(ctx: Arc<Ctx>) -> BoxFuture<'static, Finished> {
    async move {
        match ctx.inbox.unresolved().await {
            Ok(count) => {
                metrics::gauge!(names::BUS_DEAD_LETTERS, names::LABEL_CONSUMER => ctx.label.clone())
                    .set(count as f64);
            }
            Err(error) => {
                tracing::debug!(consumer = %ctx.label, %error, "cannot count dead letters")
            }
        }
        match ctx
            .inbox
            .dead_letters(Some(DeadLetterStatus::Replay), 100)
            .await
        {
            Ok(letters) => {
                for letter in letters {
                    if *ctx.stopping.borrow() {
                        break;
                    }
                    replay(&ctx, &letter).await;
                }
            }
            Err(error) => {
                tracing::debug!(consumer = %ctx.label, %error, "cannot read dead letters")
            }
        }
        Finished::Housekeeping
    }
    .boxed()
}

/// Handles a dead letter again, outside the stream's order (an operator asked).
async fn replay(ctx: &Ctx, letter: &DeadLetter) {
    let message = match Message::decode(&letter.payload) {
        Ok(message) => message,
        Err(error) => {
            let _ = ctx
                .inbox
                .replay_failed(&letter.id, &error.to_string(), 1)
                .await;
            return;
        }
    };
    let mut attempt = 1u32;
    loop {
        let failure = match decide(ctx, &message, None).await {
            Ok(statements) => {
                let mut unit = vec![ctx.inbox.replayed(&letter.id)];
                unit.extend(statements);
                match ctx.inbox.commit(unit).await {
                    Ok(()) => {
                        tracing::info!(consumer = %ctx.label, id = %letter.id, "dead letter replayed");
                        return;
                    }
                    // Replayed by another instance.
                    Err(StoreError::UnexpectedRowCount { .. })
                        if letter_done(ctx, &letter.id).await =>
                    {
                        return;
                    }
                    Err(error) => commit_failure(&error),
                }
            }
            Err(failure) => failure,
        };
        match failure {
            Failure::Transient(_) if ctx.options.retry.allows(attempt + 1) => {
                let delay = ctx.options.retry.delay(attempt, fastrand::f64());
                if !ctx.wait_working(delay, None).await {
                    return;
                }
                attempt += 1;
            }
            Failure::Transient(error) | Failure::Permanent(error) => {
                let _ = ctx.inbox.replay_failed(&letter.id, &error, attempt).await;
                return;
            }
        }
    }
}

async fn letter_done(ctx: &Ctx, id: &str) -> bool {
    let rows = ctx
        .inbox
        .query(SqlStatement::new("SELECT status FROM eventyr_dead_letters WHERE id = $1").bind(id))
        .await;
    rows.ok()
        .and_then(|rows| {
            rows.first()
                .and_then(|r| r.text("status").map(str::to_owned))
        })
        .is_none_or(|status| status != DeadLetterStatus::Replay.as_str())
}
