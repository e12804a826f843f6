//! The [`EventStore`] trait and the input checks every backend runs before writing.

use std::collections::HashSet;
use std::fmt;

use async_trait::async_trait;
use eventyr_core::{
    EventId, Limits, Position, RecordedEvent, StreamId, StreamVersion, ValidationError,
};
use tokio::sync::watch;

use crate::error::StoreError;
use crate::types::{
    AllSlice, AppendResult, ExpectedVersion, NewSnapshot, ReadAll, ReadStream, Snapshot,
    StreamAppend, StreamSlice,
};

/// An append-only log of events, organised in streams, with one global order (`$all`).
///
/// Guarantees every backend keeps (the conformance suite checks them):
/// - An acknowledged append is durable and all of it is visible, or none of it.
/// - Global positions are gapless and follow commit order: a reader that has seen
///   position N never later meets a newly committed event below N.
/// - An append whose event ids are already stored with the same content returns the
///   original result and writes nothing.
#[async_trait]
pub trait EventStore: Send + Sync + fmt::Debug {
    /// Appends to several streams at once, each with its own expectation: all appends
    /// take effect or none does. Results come in the order of `appends`.
    async fn append_atomic(
        &self,
        appends: Vec<StreamAppend>,
    ) -> Result<Vec<AppendResult>, StoreError>;

    /// Appends events to one stream if `append.expected` holds.
    async fn append(&self, append: StreamAppend) -> Result<AppendResult, StoreError> {
        let mut results = self.append_atomic(vec![append]).await?;
        results
            .pop()
            .ok_or_else(|| StoreError::corrupt("an append returned no result"))
    }

    /// Reads events of one stream. A stream that does not exist reads as empty with
    /// `stream_version: None`; a deleted stream fails with [`StoreError::StreamDeleted`].
    async fn read_stream(
        &self,
        stream: &StreamId,
        read: ReadStream,
    ) -> Result<StreamSlice, StoreError>;

    /// Reads `$all` in position order.
    async fn read_all(&self, read: &ReadAll) -> Result<AllSlice, StoreError>;

    /// Tombstones a stream: its events are erased, reads say it is deleted and appends
    /// are refused, forever. Deleting a deleted stream succeeds (the effect is the same).
    async fn delete_stream(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
    ) -> Result<(), StoreError>;

    /// Erases the stream's events below version `before` (retention, erasure). The
    /// stream keeps its version; appends continue after it.
    async fn truncate_stream(
        &self,
        stream: &StreamId,
        before: StreamVersion,
    ) -> Result<(), StoreError>;

    /// The event with this id, if it is stored (events of deleted or truncated ranges
    /// are not).
    async fn read_event(&self, id: EventId) -> Result<Option<RecordedEvent>, StoreError>;

    /// Saves a snapshot of an existing stream, durably, unless a newer one is stored.
    /// Deleting the stream erases its snapshot too.
    async fn save_snapshot(&self, snapshot: NewSnapshot) -> Result<(), StoreError>;

    /// The newest snapshot of a stream, if any. A deleted stream has none.
    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, StoreError>;

    /// The last committed position (0 when the store is empty).
    async fn head(&self) -> Result<Position, StoreError>;

    /// Announces new heads as this instance learns of them. Another process's commits
    /// may be announced late or not at all, so subscribers also poll when idle.
    fn watch_head(&self) -> watch::Receiver<Position>;

    /// The bounds this store enforces.
    fn limits(&self) -> &Limits;

    /// Whether this instance still takes writes: an error once its writer has
    /// stopped for good (a failed flush, the writer gone) — what readiness reports.
    fn writable(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Checks a snapshot before it reaches a writer: its size.
pub fn validate_snapshot(snapshot: &NewSnapshot, limits: &Limits) -> Result<(), StoreError> {
    let size = snapshot.data.len();
    if size > limits.snapshot_size_max_bytes {
        return Err(ValidationError::SnapshotTooLarge {
            size,
            max: limits.snapshot_size_max_bytes,
        }
        .into());
    }
    Ok(())
}

/// Checks an atomic append before it reaches a writer: at least one stream, no stream
/// twice, no empty append, no event id twice, every event valid, and the count and size
/// limits.
pub fn validate_appends(appends: &[StreamAppend], limits: &Limits) -> Result<(), StoreError> {
    if appends.is_empty() {
        return Err(ValidationError::NothingToAppend.into());
    }
    let mut streams: HashSet<&StreamId> = HashSet::with_capacity(appends.len());
    let mut ids = HashSet::new();
    let (mut count, mut size) = (0usize, 0usize);
    for append in appends {
        if !streams.insert(&append.stream) {
            return Err(ValidationError::DuplicateStream {
                stream: append.stream.clone(),
            }
            .into());
        }
        if append.events.is_empty() {
            return Err(ValidationError::EmptyAppend {
                stream: append.stream.clone(),
            }
            .into());
        }
        for event in &append.events {
            event.validate(limits)?;
            if !ids.insert(event.id) {
                return Err(ValidationError::DuplicateEventId { event_id: event.id }.into());
            }
            count += 1;
            size += event.size_bytes();
        }
    }
    if count > limits.append_events_max {
        return Err(ValidationError::TooManyEvents {
            count,
            max: limits.append_events_max,
        }
        .into());
    }
    if size > limits.append_size_max_bytes {
        return Err(ValidationError::AppendTooLarge {
            size,
            max: limits.append_size_max_bytes,
        }
        .into());
    }
    Ok(())
}
