//! The write planner: the rules of writing, decided once for every backend.
//!
//! A backend's writer takes a batch of [`WriteOp`]s (a group commit), loads the state
//! they touch ([`touched`]: the streams' current [`StreamState`]s and any stored events
//! with the batch's event ids) inside its write transaction, and hands it to a
//! [`Plan`]. The plan decides each op in arrival order, exactly as if they ran one
//! after another, and returns per op its outcome or its error. A failed op changes
//! nothing, so a conflicting append in a group fails alone. At the end,
//! [`Plan::into_writes`] says what to store: new events with their positions, new
//! stream states, and erasures. The backend writes them in that order and commits.
//!
//! The planner does no IO and reads no clock ("now" is given), so it is tested here
//! directly and the backends cannot drift apart on the rules.

use std::collections::{HashMap, HashSet};

use eventyr_core::{
    EventId, NewEvent, Position, RecordedEvent, StreamId, StreamVersion, Timestamp, ValidationError,
};

use crate::error::StoreError;
use crate::types::{AppendResult, ExpectedVersion, NewSnapshot, Snapshot, StreamAppend};

/// One write, as a backend's writer queue carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    /// Appends to one or more streams, all or nothing.
    Append(Vec<StreamAppend>),
    Delete {
        stream: StreamId,
        expected: ExpectedVersion,
    },
    Truncate {
        stream: StreamId,
        before: StreamVersion,
    },
    /// Saves a snapshot of an existing stream, unless a newer one is stored.
    SaveSnapshot(NewSnapshot),
}

impl WriteOp {
    pub fn delete(stream: &StreamId, expected: ExpectedVersion) -> Self {
        Self::Delete {
            stream: stream.clone(),
            expected,
        }
    }

    pub fn truncate(stream: &StreamId, before: StreamVersion) -> Self {
        Self::Truncate {
            stream: stream.clone(),
            before,
        }
    }
}

/// What a successful [`WriteOp`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    Appended(Vec<AppendResult>),
    Deleted,
    Truncated,
    SnapshotSaved,
}

impl WriteOutcome {
    /// The results of an append op. Any other outcome means a backend answered an
    /// append with the outcome of another op, which breaks an invariant.
    pub fn into_appended(self) -> Result<Vec<AppendResult>, StoreError> {
        match self {
            Self::Appended(results) => Ok(results),
            other => Err(StoreError::corrupt(format!(
                "an append was answered with {other:?}"
            ))),
        }
    }
}

/// A stream's bookkeeping. A stream that was never written has the default state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamState {
    /// The version of its last event; `None` when it has none yet.
    pub version: Option<StreamVersion>,
    /// Events below this version were erased.
    pub truncate_before: StreamVersion,
    /// Tombstoned: no reads, no appends, forever.
    pub deleted: bool,
}

/// Events a backend must erase: those of `stream` below `before`, or all of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Erasure {
    pub stream: StreamId,
    pub before: Option<StreamVersion>,
}

/// What a batch changes, to be written by the backend in this order: stream states and
/// events, then snapshots, then erasures, then the next position.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Writes {
    pub events: Vec<RecordedEvent>,
    pub streams: Vec<(StreamId, StreamState)>,
    pub erasures: Vec<Erasure>,
    /// Snapshots to store, each replacing an older one of its stream (never a newer one).
    /// Erasing a stream whole also erases its snapshot.
    pub snapshots: Vec<Snapshot>,
    /// The position the next event will get.
    pub next_position: Position,
}

impl Writes {
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
            && self.streams.is_empty()
            && self.erasures.is_empty()
            && self.snapshots.is_empty()
    }
}

/// The streams and event ids a batch touches, each once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Touched {
    pub streams: Vec<StreamId>,
    pub event_ids: Vec<EventId>,
}

/// What the backend must load before planning `ops`.
pub fn touched<'a>(ops: impl IntoIterator<Item = &'a WriteOp>) -> Touched {
    let mut seen = HashSet::new();
    let mut touched = Touched::default();
    let mut add_stream = |touched: &mut Touched, stream: &StreamId| {
        if seen.insert(stream.clone()) {
            touched.streams.push(stream.clone());
        }
    };
    for op in ops {
        match op {
            WriteOp::Append(appends) => {
                for append in appends {
                    add_stream(&mut touched, &append.stream);
                    touched.event_ids.extend(append.events.iter().map(|e| e.id));
                }
            }
            WriteOp::Delete { stream, .. } | WriteOp::Truncate { stream, .. } => {
                add_stream(&mut touched, stream)
            }
            WriteOp::SaveSnapshot(snapshot) => add_stream(&mut touched, &snapshot.stream),
        }
    }
    let mut ids = HashSet::with_capacity(touched.event_ids.len());
    touched.event_ids.retain(|id| ids.insert(*id));
    touched
}

/// An event id the plan knows: stored before the batch, or planned in it.
#[derive(Debug)]
enum Known {
    Stored(Box<RecordedEvent>),
    Planned(usize),
}

/// Decides a batch of writes against the state loaded for it. See the module docs.
#[derive(Debug)]
pub struct Plan {
    now: Timestamp,
    next_position: Position,
    streams: HashMap<StreamId, StreamState>,
    /// Streams whose state the batch changed, in first-change order.
    changed: Vec<StreamId>,
    changed_set: HashSet<StreamId>,
    known: HashMap<EventId, Known>,
    events: Vec<RecordedEvent>,
    erasures: Vec<Erasure>,
    snapshots: Vec<Snapshot>,
}

impl Plan {
    /// `streams` holds the state of every touched stream that exists (others are new);
    /// `stored` holds the stored events whose ids the batch carries.
    pub fn new(
        next_position: Position,
        now: Timestamp,
        streams: HashMap<StreamId, StreamState>,
        stored: impl IntoIterator<Item = RecordedEvent>,
    ) -> Self {
        let known = stored
            .into_iter()
            .map(|e| (e.id, Known::Stored(Box::new(e))))
            .collect();
        Self {
            now,
            next_position,
            streams,
            changed: Vec::new(),
            changed_set: HashSet::new(),
            known,
            events: Vec::new(),
            erasures: Vec::new(),
            snapshots: Vec::new(),
        }
    }

    /// Decides one op. On error the plan is unchanged.
    pub fn apply(&mut self, op: WriteOp) -> Result<WriteOutcome, StoreError> {
        match op {
            WriteOp::Append(appends) => self.append(appends).map(WriteOutcome::Appended),
            WriteOp::Delete { stream, expected } => self
                .delete(stream, expected)
                .map(|()| WriteOutcome::Deleted),
            WriteOp::Truncate { stream, before } => self
                .truncate(stream, before)
                .map(|()| WriteOutcome::Truncated),
            WriteOp::SaveSnapshot(snapshot) => self
                .save_snapshot(snapshot)
                .map(|()| WriteOutcome::SnapshotSaved),
        }
    }

    /// Everything the applied ops change.
    pub fn into_writes(self) -> Writes {
        let streams = self
            .changed
            .into_iter()
            .map(|stream| {
                let state = self.streams.get(&stream).copied().unwrap_or_default();
                (stream, state)
            })
            .collect();
        Writes {
            events: self.events,
            streams,
            erasures: self.erasures,
            snapshots: self.snapshots,
            next_position: self.next_position,
        }
    }

    fn state(&self, stream: &StreamId) -> StreamState {
        self.streams.get(stream).copied().unwrap_or_default()
    }

    fn set_state(&mut self, stream: StreamId, state: StreamState) {
        self.streams.insert(stream.clone(), state);
        if self.changed_set.insert(stream.clone()) {
            self.changed.push(stream);
        }
    }

    fn lookup(&self, id: EventId) -> Option<&RecordedEvent> {
        match self.known.get(&id)? {
            Known::Stored(event) => Some(event),
            Known::Planned(index) => self.events.get(*index),
        }
    }

    fn append(&mut self, appends: Vec<StreamAppend>) -> Result<Vec<AppendResult>, StoreError> {
        // Stage everything first: the op is all or nothing.
        let mut staged_events = Vec::new();
        let mut staged_streams = Vec::with_capacity(appends.len());
        let mut results = Vec::with_capacity(appends.len());
        let mut next = self.next_position;
        for append in appends {
            let state = self.state(&append.stream);
            if state.deleted {
                return Err(StoreError::StreamDeleted {
                    stream: append.stream,
                });
            }
            if let Some(original) = self.replay(&append)? {
                results.push(original);
                continue;
            }
            if !append.expected.is_met_by(state.version) {
                return Err(StoreError::WrongExpectedVersion {
                    stream: append.stream,
                    expected: append.expected,
                    actual: state.version,
                });
            }
            let first_version = state
                .version
                .map_or(StreamVersion::FIRST, StreamVersion::next);
            let first_position = next;
            let mut version = first_version;
            for event in append.events {
                staged_events.push(event.record(append.stream.clone(), version, next, self.now));
                version = version.next();
                next = next.next();
            }
            let last_version = StreamVersion(version.0 - 1);
            results.push(AppendResult {
                stream: append.stream.clone(),
                first_version,
                last_version,
                first_position,
                last_position: Position(next.0 - 1),
            });
            staged_streams.push((
                append.stream,
                StreamState {
                    version: Some(last_version),
                    ..state
                },
            ));
        }
        self.next_position = next;
        for (stream, state) in staged_streams {
            self.set_state(stream, state);
        }
        for event in staged_events {
            self.known
                .insert(event.id, Known::Planned(self.events.len()));
            self.events.push(event);
        }
        Ok(results)
    }

    /// If the append's events are already stored (a retry), the original result.
    fn replay(&self, append: &StreamAppend) -> Result<Option<AppendResult>, StoreError> {
        let stored: Vec<Option<&RecordedEvent>> =
            append.events.iter().map(|e| self.lookup(e.id)).collect();
        let Some(first) = stored.iter().flatten().next() else {
            return Ok(None);
        };
        let conflict = |event: &NewEvent, message: String| StoreError::IdempotencyConflict {
            event_id: event.id,
            message,
        };
        let mut last = *first;
        for (offset, (event, stored)) in append.events.iter().zip(&stored).enumerate() {
            let Some(stored) = stored else {
                return Err(conflict(
                    event,
                    "other events of this append are already stored".into(),
                ));
            };
            if stored.stream_id != append.stream {
                return Err(conflict(
                    event,
                    format!("it is stored in stream {}", stored.stream_id),
                ));
            }
            if !event.same_content_as(stored) {
                return Err(conflict(
                    event,
                    "it is stored with different content".into(),
                ));
            }
            if stored.version.0 != first.version.0 + offset as u64 {
                return Err(conflict(
                    event,
                    "it was stored by a different append".into(),
                ));
            }
            last = stored;
        }
        Ok(Some(AppendResult {
            stream: append.stream.clone(),
            first_version: first.version,
            last_version: last.version,
            first_position: first.position,
            last_position: last.position,
        }))
    }

    fn delete(&mut self, stream: StreamId, expected: ExpectedVersion) -> Result<(), StoreError> {
        let state = self.state(&stream);
        if state.deleted {
            return Ok(());
        }
        if !expected.is_met_by(state.version) {
            return Err(StoreError::WrongExpectedVersion {
                stream,
                expected,
                actual: state.version,
            });
        }
        self.set_state(
            stream.clone(),
            StreamState {
                deleted: true,
                ..state
            },
        );
        self.erase(stream, None);
        Ok(())
    }

    fn save_snapshot(&mut self, snapshot: NewSnapshot) -> Result<(), StoreError> {
        let state = self.state(&snapshot.stream);
        if state.deleted {
            return Err(StoreError::StreamDeleted {
                stream: snapshot.stream,
            });
        }
        let Some(version) = state.version else {
            return Err(StoreError::StreamNotFound {
                stream: snapshot.stream,
            });
        };
        if snapshot.version > version {
            return Err(ValidationError::SnapshotAhead {
                snapshot: snapshot.version.0,
                stream: version.0,
            }
            .into());
        }
        // One snapshot per stream and batch: the newest.
        let earlier = self
            .snapshots
            .iter()
            .position(|s| s.stream == snapshot.stream);
        if let Some(index) = earlier {
            if self.snapshots[index].version > snapshot.version {
                return Ok(());
            }
            self.snapshots.swap_remove(index);
        }
        self.snapshots.push(Snapshot {
            stream: snapshot.stream,
            version: snapshot.version,
            schema_version: snapshot.schema_version,
            data: snapshot.data,
            taken_at: self.now,
        });
        Ok(())
    }

    fn truncate(&mut self, stream: StreamId, before: StreamVersion) -> Result<(), StoreError> {
        let state = self.state(&stream);
        if state.deleted {
            return Err(StoreError::StreamDeleted { stream });
        }
        let Some(version) = state.version else {
            return Err(StoreError::StreamNotFound { stream });
        };
        let before = before.min(version.next());
        if before > state.truncate_before {
            self.set_state(
                stream.clone(),
                StreamState {
                    truncate_before: before,
                    ..state
                },
            );
            self.erase(stream, Some(before));
        }
        Ok(())
    }

    /// Records an erasure and forgets the erased events, so that a later op in the
    /// batch cannot replay against them.
    fn erase(&mut self, stream: StreamId, before: Option<StreamVersion>) {
        let events = &self.events;
        self.known.retain(|_, known| {
            let event = match known {
                Known::Stored(event) => event,
                Known::Planned(index) => &events[*index],
            };
            event.stream_id != stream || before.is_some_and(|b| event.version >= b)
        });
        if before.is_none() {
            self.snapshots.retain(|s| s.stream != stream);
        }
        self.erasures.push(Erasure { stream, before });
    }
}

#[cfg(test)]
mod tests {
    use eventyr_core::NewEvent;

    use super::*;

    fn stream(name: &str) -> StreamId {
        StreamId::new(name).unwrap()
    }

    fn event(n: u32) -> NewEvent {
        NewEvent::json("Counted", &n).unwrap()
    }

    fn append(name: &str, expected: ExpectedVersion, events: Vec<NewEvent>) -> WriteOp {
        WriteOp::Append(vec![StreamAppend::new(stream(name), expected, events)])
    }

    fn empty_plan() -> Plan {
        Plan::new(
            Position::FIRST,
            Timestamp::from_unix_micros(5),
            HashMap::new(),
            [],
        )
    }

    #[test]
    fn a_conflicting_append_fails_alone_and_leaves_no_gap() {
        let mut plan = empty_plan();
        assert!(
            plan.apply(append("a", ExpectedVersion::NoStream, vec![event(1)]))
                .is_ok()
        );
        let conflict = plan.apply(append("a", ExpectedVersion::NoStream, vec![event(2)]));
        assert!(matches!(
            conflict,
            Err(StoreError::WrongExpectedVersion {
                actual: Some(StreamVersion(0)),
                ..
            })
        ));
        let ok = plan
            .apply(append("b", ExpectedVersion::Any, vec![event(3)]))
            .unwrap();
        let WriteOutcome::Appended(results) = ok else {
            panic!("not an append")
        };
        assert_eq!(
            results[0].first_position,
            Position(2),
            "the failed append took no position"
        );
        let writes = plan.into_writes();
        assert_eq!(writes.events.len(), 2);
        assert_eq!(writes.next_position, Position(3));
    }

    #[test]
    fn an_atomic_append_is_all_or_nothing() {
        let mut plan = empty_plan();
        plan.apply(append("b", ExpectedVersion::Any, vec![event(0)]))
            .unwrap();
        let unit = WriteOp::Append(vec![
            StreamAppend::new(stream("a"), ExpectedVersion::NoStream, vec![event(1)]),
            StreamAppend::new(stream("b"), ExpectedVersion::NoStream, vec![event(2)]),
        ]);
        assert!(plan.apply(unit).is_err());
        let writes = plan.into_writes();
        assert_eq!(writes.events.len(), 1);
        assert_eq!(
            writes.streams,
            vec![(
                stream("b"),
                StreamState {
                    version: Some(StreamVersion(0)),
                    ..Default::default()
                }
            )]
        );
    }

    #[test]
    fn a_retry_inside_the_same_batch_is_idempotent() {
        let mut plan = empty_plan();
        let events = vec![event(1), event(2)];
        let first = plan
            .apply(append("a", ExpectedVersion::NoStream, events.clone()))
            .unwrap();
        let again = plan
            .apply(append("a", ExpectedVersion::NoStream, events.clone()))
            .unwrap();
        assert_eq!(first, again);
        let mut changed = events.clone();
        changed[1].data = eventyr_core::Json::encode(&99).unwrap();
        assert!(matches!(
            plan.apply(append("a", ExpectedVersion::Any, changed)),
            Err(StoreError::IdempotencyConflict { .. })
        ));
        assert_eq!(plan.into_writes().events.len(), 2);
    }

    #[test]
    fn deletion_erases_and_forgets() {
        let mut plan = empty_plan();
        let e = event(1);
        plan.apply(append("a", ExpectedVersion::Any, vec![e.clone()]))
            .unwrap();
        plan.apply(WriteOp::Delete {
            stream: stream("a"),
            expected: ExpectedVersion::Exact(StreamVersion(0)),
        })
        .unwrap();
        assert!(matches!(
            plan.apply(append("a", ExpectedVersion::Any, vec![e])),
            Err(StoreError::StreamDeleted { .. })
        ));
        assert!(
            plan.apply(WriteOp::Delete {
                stream: stream("a"),
                expected: ExpectedVersion::NoStream
            })
            .is_ok()
        );
        let writes = plan.into_writes();
        assert_eq!(
            writes.erasures,
            vec![Erasure {
                stream: stream("a"),
                before: None
            }]
        );
        assert!(writes.streams[0].1.deleted);
    }

    #[test]
    fn truncation_is_clamped_and_needs_a_stream() {
        let mut plan = empty_plan();
        assert!(matches!(
            plan.apply(WriteOp::Truncate {
                stream: stream("a"),
                before: StreamVersion(1)
            }),
            Err(StoreError::StreamNotFound { .. })
        ));
        plan.apply(append("a", ExpectedVersion::Any, vec![event(1), event(2)]))
            .unwrap();
        plan.apply(WriteOp::Truncate {
            stream: stream("a"),
            before: StreamVersion(50),
        })
        .unwrap();
        let writes = plan.into_writes();
        assert_eq!(writes.erasures[0].before, Some(StreamVersion(2)));
        assert_eq!(writes.streams[0].1.truncate_before, StreamVersion(2));
        assert_eq!(writes.streams[0].1.version, Some(StreamVersion(1)));
    }

    #[test]
    fn touched_lists_each_stream_and_id_once() {
        let e = event(1);
        let ops = [
            append("a", ExpectedVersion::Any, vec![e.clone()]),
            append("a", ExpectedVersion::Any, vec![e.clone()]),
            WriteOp::Delete {
                stream: stream("b"),
                expected: ExpectedVersion::Any,
            },
        ];
        let touched = touched(&ops);
        assert_eq!(touched.streams, vec![stream("a"), stream("b")]);
        assert_eq!(touched.event_ids, vec![e.id]);
    }
}
