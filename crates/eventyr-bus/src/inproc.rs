//! [`InProcBus`]: the embedded mode's bus. There is no broker and no relay: a
//! consumer group reads the producer's store itself, from a checkpoint kept in the
//! consumer's own database. The producer's committed log *is* the outbox, so nothing
//! is published before it is committed, and a restart resumes from the checkpoint
//! (events after it are delivered again and recognised by the inbox).
//!
//! Instances of one consumer share a group: a read-ahead window of the producer's
//! public events, of which each instance takes what it asks for. A stream with a
//! message out (delivered, not acknowledged) or waiting to be delivered again gives
//! out nothing more until it is settled, so each stream is handled in order by the
//! group as a whole. The checkpoint is the position below the oldest unsettled
//! message.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use eventyr_core::{Position, RecordedEvent};
use eventyr_store::EventStore;
use eventyr_store::ReadAll;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::error::BusError;
use crate::message::{ConsumerName, Message, PublicEvents, ServiceName};
use crate::transport::{
    Acker, Body, Checkpoints, Delivery, SubscribeRequest, Subscription, Transport,
};

/// Events a group reads ahead of the ones it has handed out, at least.
const READ_AHEAD_MIN: usize = 256;
/// The checkpoint is saved after this many acknowledgements, or when idle.
const SAVE_EVERY: u64 = 256;

/// The in-process bus. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct InProcBus {
    inner: Arc<BusInner>,
}

#[derive(Debug, Default)]
struct BusInner {
    producers: Mutex<HashMap<ServiceName, Producer>>,
    groups: Mutex<HashMap<ConsumerName, Arc<Group>>>,
}

#[derive(Clone)]
struct Producer {
    store: Arc<dyn EventStore>,
    public: PublicEvents,
}

impl fmt::Debug for Producer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Producer")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl InProcBus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `service`'s public events available to consumers: its store is its outbox.
    pub fn register(&self, service: ServiceName, store: Arc<dyn EventStore>, public: PublicEvents) {
        lock(&self.inner.producers).insert(service, Producer { store, public });
    }
}

#[async_trait]
impl Transport for InProcBus {
    fn name(&self) -> &'static str {
        "inproc"
    }

    async fn subscribe(
        &self,
        request: SubscribeRequest,
    ) -> Result<Box<dyn Subscription>, BusError> {
        let producer = lock(&self.inner.producers)
            .get(&request.source)
            .cloned()
            .ok_or_else(|| BusError::NotFound {
                what: format!("service {} on the in-process bus", request.source),
            })?;
        let group = {
            let mut groups = lock(&self.inner.groups);
            let group = groups.entry(request.consumer.clone()).or_insert_with(|| {
                Arc::new(Group {
                    source: request.source.clone(),
                    producer,
                    checkpoints: Arc::clone(&request.checkpoints),
                    event_types: request.event_types.clone(),
                    read_ahead: READ_AHEAD_MIN.max(request.max_in_flight * 4),
                    state: Mutex::new(GroupState::default()),
                    changed: Notify::new(),
                })
            });
            if group.source != request.source {
                return Err(BusError::Invalid {
                    message: format!(
                        "consumer {} already consumes {}, not {}",
                        request.consumer, group.source, request.source
                    ),
                });
            }
            Arc::clone(group)
        };
        group.load().await?;
        Ok(Box::new(InProcSubscription { group }))
    }
}

/// One consumer group: the shared window over the producer's log.
#[derive(Debug)]
struct Group {
    source: ServiceName,
    producer: Producer,
    checkpoints: Arc<dyn Checkpoints>,
    /// The event types the consumer acts on (`None`: every public one); the rest are
    /// left out as if private.
    event_types: Option<std::collections::BTreeSet<String>>,
    read_ahead: usize,
    state: Mutex<GroupState>,
    /// Rings when a message is settled (a stream may be free, or one is back).
    changed: Notify,
}

#[derive(Debug, Default)]
struct GroupState {
    loaded: bool,
    /// The next position to read from the producer.
    next: Position,
    /// Read and not acknowledged, by position.
    window: BTreeMap<Position, Entry>,
    /// Streams with a message out.
    out: HashSet<String>,
    /// A read of the producer is under way (one at a time).
    reading: bool,
    saved: Position,
    acks_since_save: u64,
}

#[derive(Debug)]
struct Entry {
    event: RecordedEvent,
    out: bool,
    not_before: Option<Instant>,
    deliveries: u64,
}

impl GroupState {
    /// Every position below this one is done.
    fn checkpoint(&self) -> Position {
        let below = self.window.keys().next().copied().unwrap_or(self.next);
        Position(below.0.saturating_sub(1))
    }
}

impl Group {
    async fn load(&self) -> Result<(), BusError> {
        if lock(&self.state).loaded {
            return Ok(());
        }
        let checkpoint = self.checkpoints.load(&self.source).await?;
        let mut state = lock(&self.state);
        if !state.loaded {
            state.loaded = true;
            state.next = checkpoint.next();
            state.saved = checkpoint;
        }
        Ok(())
    }

    /// Takes up to `max` deliverable messages: not out, not waiting out a delay, and
    /// first of their stream in the window. Also says when the next delayed one is due.
    fn take(self: &Arc<Self>, max: usize) -> (Vec<Delivery>, Option<Instant>) {
        let now = Instant::now();
        let mut state = lock(&self.state);
        let GroupState { window, out, .. } = &mut *state;
        let mut blocked: HashSet<String> = HashSet::new();
        let mut taken = Vec::new();
        let mut due: Option<Instant> = None;
        for (position, entry) in window.iter_mut() {
            if taken.len() >= max {
                break;
            }
            let stream = entry.event.stream_id.as_str();
            if entry.out || out.contains(stream) || blocked.contains(stream) {
                blocked.insert(stream.to_owned());
                continue;
            }
            if let Some(at) = entry.not_before.filter(|at| *at > now) {
                due = Some(due.map_or(at, |d| d.min(at)));
                blocked.insert(stream.to_owned());
                continue;
            }
            entry.out = true;
            entry.not_before = None;
            entry.deliveries += 1;
            out.insert(stream.to_owned());
            blocked.insert(stream.to_owned());
            taken.push(Delivery {
                body: Body::Decoded(Box::new(Message {
                    source: self.source.clone(),
                    event: entry.event.clone(),
                    previous: None,
                })),
                deliveries: entry.deliveries,
                acker: Box::new(InProcAcker {
                    group: Arc::clone(self),
                    position: *position,
                    settled: std::sync::atomic::AtomicBool::new(false),
                }),
            });
        }
        (taken, due)
    }

    /// Reads more of the producer's public events into the window, if it has room.
    /// Returns whether the producer may have more right now.
    async fn fill(&self) -> Result<bool, BusError> {
        let (from, room) = {
            let mut state = lock(&self.state);
            let room = self.read_ahead.saturating_sub(state.window.len());
            if state.reading || room == 0 {
                return Ok(false);
            }
            state.reading = true;
            (state.next, room)
        };
        // Whatever happens to this read (an error, a cancelled fetch), the next one may go.
        let reading = Reading(self);
        let read = self
            .producer
            .store
            .read_all(&ReadAll::from(from).limit(room))
            .await;
        let mut state = lock(&self.state);
        // Ended under the lock, so the next read starts after this one's events.
        state.reading = false;
        std::mem::forget(reading);
        let slice = read?;
        let more = !slice.is_end();
        let before = state.window.len();
        for event in slice.events {
            let wanted = self.producer.public.contains(&event.event_type)
                && self
                    .event_types
                    .as_ref()
                    .is_none_or(|types| types.contains(event.event_type.as_str()));
            if event.position >= state.next && wanted {
                state.window.insert(
                    event.position,
                    Entry {
                        event,
                        out: false,
                        not_before: None,
                        deliveries: 0,
                    },
                );
            }
        }
        state.next = state.next.max(slice.next);
        let found = state.window.len() > before;
        drop(state);
        if found {
            // Instances that found the read under way wait for its events.
            self.changed.notify_waiters();
        }
        Ok(more)
    }

    fn settle(&self, position: Position, again_after: Option<Duration>) {
        let mut state = lock(&self.state);
        let stream = match again_after {
            None => {
                state.acks_since_save += 1;
                state.window.remove(&position).map(|e| e.event.stream_id)
            }
            Some(delay) => state.window.get_mut(&position).map(|entry| {
                entry.out = false;
                entry.not_before = Some(Instant::now() + delay);
                entry.event.stream_id.clone()
            }),
        };
        if let Some(stream) = stream {
            state.out.remove(stream.as_str());
        }
        drop(state);
        self.changed.notify_waiters();
    }

    /// Saves the checkpoint if it moved and enough was acknowledged (or `idle`).
    async fn save(&self, idle: bool) -> Result<(), BusError> {
        let checkpoint = {
            let mut state = lock(&self.state);
            let checkpoint = state.checkpoint();
            let due = idle || state.acks_since_save >= SAVE_EVERY;
            if checkpoint <= state.saved || !due {
                return Ok(());
            }
            state.saved = checkpoint;
            state.acks_since_save = 0;
            checkpoint
        };
        self.checkpoints.save(&self.source, checkpoint).await
    }
}

/// A read of the producer under way; ends when dropped.
struct Reading<'a>(&'a Group);

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        lock(&self.0.state).reading = false;
    }
}

struct InProcSubscription {
    group: Arc<Group>,
}

#[async_trait]
impl Subscription for InProcSubscription {
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>, BusError> {
        let group = &self.group;
        let deadline = Instant::now() + wait;
        let mut heads = group.producer.store.watch_head();
        loop {
            let changed = group.changed.notified();
            let more = group.fill().await?;
            let (taken, due) = group.take(max.max(1));
            if !taken.is_empty() {
                group.save(false).await?;
                return Ok(taken);
            }
            if more {
                continue;
            }
            group.save(true).await?;
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let until = due.map_or(deadline, |d| d.min(deadline));
            tokio::select! {
                () = changed => {}
                _ = heads.changed() => {}
                () = tokio::time::sleep_until(until) => {}
            }
        }
    }

    async fn pending(&mut self) -> Result<Option<u64>, BusError> {
        let head = self.group.producer.store.head().await?;
        let checkpoint = lock(&self.group.state).checkpoint();
        Ok(Some(head.0.saturating_sub(checkpoint.0)))
    }
}

struct InProcAcker {
    group: Arc<Group>,
    position: Position,
    settled: std::sync::atomic::AtomicBool,
}

impl InProcAcker {
    fn settle(&self, again_after: Option<Duration>) {
        use std::sync::atomic::Ordering;
        if !self.settled.swap(true, Ordering::AcqRel) {
            self.group.settle(self.position, again_after);
        }
    }
}

#[async_trait]
impl Acker for InProcAcker {
    async fn ack(&self) -> Result<(), BusError> {
        self.settle(None);
        Ok(())
    }

    async fn nak(&self, delay: Duration) -> Result<(), BusError> {
        self.settle(Some(delay));
        Ok(())
    }

    async fn in_progress(&self) -> Result<(), BusError> {
        Ok(())
    }
}

impl Drop for InProcAcker {
    /// A delivery dropped unsettled (its instance stopped or crashed) goes back to the
    /// group at once, as a broker would after its acknowledgement timeout.
    fn drop(&mut self) {
        self.settle(Some(Duration::ZERO));
    }
}
