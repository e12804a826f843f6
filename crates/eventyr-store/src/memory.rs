//! [`MemoryStore`]: the in-memory backend. Same contract as the durable ones (it runs
//! the same planner and passes the same conformance suite), minus durability. For
//! tests and for benchmarks that need a baseline without storage.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use eventyr_core::{
    Clock, EventId, Limits, Position, RecordedEvent, StreamId, StreamVersion, SystemClock,
};
use tokio::sync::watch;

use crate::error::StoreError;
use crate::group::advance_head;
use crate::plan::{Plan, StreamState, WriteOp, WriteOutcome, touched};
use crate::store::{EventStore, validate_appends, validate_snapshot};
use crate::types::{
    AllSlice, AppendResult, Direction, ExpectedVersion, NewSnapshot, ReadAll, ReadStream, Snapshot,
    StreamAppend, StreamSlice,
};

/// An event store held in memory. Clones, and stores made with
/// [`MemoryStore::sharing`], see the same events.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    shared: Arc<Shared>,
    limits: Limits,
    clock: Arc<dyn Clock>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    head: watch::Sender<Position>,
}

#[derive(Debug)]
struct State {
    events: BTreeMap<Position, RecordedEvent>,
    streams: HashMap<StreamId, (StreamState, BTreeMap<StreamVersion, Position>)>,
    by_id: HashMap<EventId, Position>,
    snapshots: HashMap<StreamId, Snapshot>,
    next_position: Position,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new(Limits::default(), Arc::new(SystemClock))
    }
}

impl MemoryStore {
    pub fn new(limits: Limits, clock: Arc<dyn Clock>) -> Self {
        let state = State {
            events: BTreeMap::new(),
            streams: HashMap::new(),
            by_id: HashMap::new(),
            snapshots: HashMap::new(),
            next_position: Position::FIRST,
        };
        let (head, _) = watch::channel(Position::ZERO);
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                head,
            }),
            limits,
            clock,
        }
    }

    /// Another store on the same events, with its own limits and clock: what a second
    /// process on the same database is for the durable backends.
    pub fn sharing(other: &Self, limits: Limits, clock: Arc<dyn Clock>) -> Self {
        Self {
            shared: Arc::clone(&other.shared),
            limits,
            clock,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-written: writes
        // are applied only after the planner has decided, without any fallible step.
        self.shared
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self, op: WriteOp) -> Result<WriteOutcome, StoreError> {
        let mut state = self.lock();
        let touched = touched([&op]);
        let streams = touched
            .streams
            .iter()
            .filter_map(|s| state.streams.get(s).map(|(st, _)| (s.clone(), *st)))
            .collect();
        let stored: Vec<RecordedEvent> = touched
            .event_ids
            .iter()
            .filter_map(|id| {
                state
                    .by_id
                    .get(id)
                    .and_then(|p| state.events.get(p))
                    .cloned()
            })
            .collect();
        let mut plan = Plan::new(state.next_position, self.clock.now(), streams, stored);
        let outcome = plan.apply(op)?;
        let writes = plan.into_writes();
        for event in writes.events {
            let entry = state.streams.entry(event.stream_id.clone()).or_default();
            entry.1.insert(event.version, event.position);
            state.by_id.insert(event.id, event.position);
            state.events.insert(event.position, event);
        }
        for (stream, stream_state) in writes.streams {
            state.streams.entry(stream).or_default().0 = stream_state;
        }
        for snapshot in writes.snapshots {
            let newer = state
                .snapshots
                .get(&snapshot.stream)
                .is_none_or(|stored| stored.version <= snapshot.version);
            if newer {
                state.snapshots.insert(snapshot.stream.clone(), snapshot);
            }
        }
        for erasure in writes.erasures {
            if erasure.before.is_none() {
                state.snapshots.remove(&erasure.stream);
            }
            let Some((_, versions)) = state.streams.get_mut(&erasure.stream) else {
                continue;
            };
            let erased: Vec<Position> = match erasure.before {
                None => std::mem::take(versions).into_values().collect(),
                Some(before) => {
                    let kept = versions.split_off(&before);
                    std::mem::replace(versions, kept).into_values().collect()
                }
            };
            for position in erased {
                if let Some(event) = state.events.remove(&position) {
                    state.by_id.remove(&event.id);
                }
            }
        }
        state.next_position = writes.next_position;
        let head = Position(state.next_position.0 - 1);
        drop(state);
        advance_head(&self.shared.head, head);
        Ok(outcome)
    }
}

#[async_trait]
impl EventStore for MemoryStore {
    async fn append_atomic(
        &self,
        appends: Vec<StreamAppend>,
    ) -> Result<Vec<AppendResult>, StoreError> {
        validate_appends(&appends, &self.limits)?;
        self.write(WriteOp::Append(appends))?.into_appended()
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        read: ReadStream,
    ) -> Result<StreamSlice, StoreError> {
        let state = self.lock();
        let Some((stream_state, versions)) = state.streams.get(stream) else {
            return Ok(StreamSlice {
                events: Vec::new(),
                stream_version: None,
                is_end: true,
            });
        };
        if stream_state.deleted {
            return Err(StoreError::StreamDeleted {
                stream: stream.clone(),
            });
        }
        let limit = read.effective_limit();
        let positions: Vec<Position> = match read.direction {
            Direction::Forwards => versions
                .range(read.from..)
                .map(|(_, p)| *p)
                .take(limit + 1)
                .collect(),
            Direction::Backwards => versions
                .range(..=read.from)
                .rev()
                .map(|(_, p)| *p)
                .take(limit + 1)
                .collect(),
        };
        let is_end = positions.len() <= limit;
        let events = positions
            .iter()
            .take(limit)
            .filter_map(|p| state.events.get(p).cloned())
            .collect();
        Ok(StreamSlice {
            events,
            stream_version: stream_state.version,
            is_end,
        })
    }

    async fn read_all(&self, read: &ReadAll) -> Result<AllSlice, StoreError> {
        let state = self.lock();
        let head = Position(state.next_position.0 - 1);
        let limit = read.effective_limit();
        let mut events = Vec::new();
        let mut next = read.from.max(Position::FIRST);
        if next > head {
            return Ok(AllSlice { events, next, head });
        }
        for (position, event) in state
            .events
            .range((Bound::Included(next), Bound::Included(head)))
        {
            if events.len() == limit {
                break;
            }
            next = position.next();
            if read.filter.matches(event) {
                events.push(event.clone());
            }
        }
        if events.len() < limit {
            next = next.max(head.next());
        }
        Ok(AllSlice { events, next, head })
    }

    async fn delete_stream(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
    ) -> Result<(), StoreError> {
        self.write(WriteOp::delete(stream, expected)).map(drop)
    }

    async fn truncate_stream(
        &self,
        stream: &StreamId,
        before: StreamVersion,
    ) -> Result<(), StoreError> {
        self.write(WriteOp::truncate(stream, before)).map(drop)
    }

    async fn read_event(&self, id: EventId) -> Result<Option<RecordedEvent>, StoreError> {
        let state = self.lock();
        Ok(state
            .by_id
            .get(&id)
            .and_then(|p| state.events.get(p))
            .cloned())
    }

    async fn save_snapshot(&self, snapshot: NewSnapshot) -> Result<(), StoreError> {
        validate_snapshot(&snapshot, &self.limits)?;
        self.write(WriteOp::SaveSnapshot(snapshot)).map(drop)
    }

    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, StoreError> {
        Ok(self.lock().snapshots.get(stream).cloned())
    }

    async fn head(&self) -> Result<Position, StoreError> {
        Ok(Position(self.lock().next_position.0 - 1))
    }

    fn watch_head(&self) -> watch::Receiver<Position> {
        self.shared.head.subscribe()
    }

    fn limits(&self) -> &Limits {
        &self.limits
    }
}
