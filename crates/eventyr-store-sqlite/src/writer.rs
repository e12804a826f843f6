//! The writer: one thread that owns the only write connection of this store instance
//! and turns its queue into group commits. It commits without flushing; the syncer
//! (see [`crate::syncer`]) flushes and answers.
//!
//! It blocks for the first request, then takes whatever else is already queued (up to
//! the batch bounds) and runs it all in one `BEGIN IMMEDIATE` transaction, with one
//! fsync at commit. While that fsync runs, new requests queue up and form the next
//! group, so the group size follows the load without any timer. Inside the transaction
//! the shared planner decides each request in order; a request that fails (a version
//! conflict) changes nothing and is answered alone, the others commit.

use std::collections::HashMap;
use std::sync::Arc;

use eventyr_core::{Clock, Position, StreamId, StreamVersion};
use eventyr_store::Snapshot;
use eventyr_store::StoreError;
use eventyr_store::group::{GroupBounds, Outcomes, WriteRequest, answer, take_group};
use eventyr_store::plan::{Plan, StreamState, WriteOp, Writes, touched};
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};
use std::sync::mpsc::{SendError, SyncSender};
use tokio::sync::mpsc;

use crate::durability::Durability;
use crate::error;
use crate::row::{self, EVENT_COLUMNS};
use crate::schema::STREAM_VERSION;
use crate::syncer::Committed;

#[derive(Debug)]
pub struct Writer {
    pub conn: Connection,
    pub clock: Arc<dyn Clock>,
    pub requests: mpsc::Receiver<WriteRequest>,
    pub bounds: GroupBounds,
    pub durability: Arc<Durability>,
    /// Committed groups go to the syncer, which answers them once they are durable.
    pub syncer: SyncSender<Committed>,
}

impl Writer {
    /// Serves requests until every sender is gone, then returns.
    pub fn run(mut self) {
        while let Some(first) = self.requests.blocking_recv() {
            let (ops, replies) = take_group(first, &mut self.requests, self.bounds);
            let written = self.durability.check().and_then(|()| self.write(ops));
            match written {
                Ok((outcomes, head)) => {
                    let group = Committed {
                        replies,
                        outcomes,
                        head,
                    };
                    if let Err(SendError(group)) = self.syncer.send(group) {
                        answer(group.replies, Err(StoreError::Closed));
                    }
                }
                Err(error) => answer(replies, Err(error)),
            }
        }
    }

    /// Runs one group in one transaction; returns each op's outcome and the new head.
    ///
    /// The group is first planned as if none of its event ids were stored, which saves
    /// one index probe per event. A retried append then shows up in one of two ways:
    /// its insert hits the unique index on `event_id`, or (with a stale expectation) it
    /// is refused as a version conflict. Either way the attempt is dropped and the group
    /// planned again with the stored events loaded, so the planner decides every case.
    fn write(&mut self, ops: Vec<WriteOp>) -> Result<(Outcomes, Position), StoreError> {
        match self.write_with(ops.clone(), Lookups::Skip) {
            Err(Attempt::IdAlreadyStored) => self.write_with(ops, Lookups::Load),
            other => other,
        }
        .map_err(|attempt| match attempt {
            Attempt::IdAlreadyStored => {
                StoreError::corrupt("an event id collided after it was looked up")
            }
            Attempt::Failed(error) => error,
        })
    }

    fn write_with(
        &mut self,
        ops: Vec<WriteOp>,
        lookups: Lookups,
    ) -> Result<(Outcomes, Position), Attempt> {
        let now = self.clock.now();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(error::sqlite)?;
        let next_position: i64 = tx
            .prepare_cached("SELECT value FROM meta WHERE key = 'next_position'")
            .and_then(|mut s| s.query_row([], |r| r.get(0)))
            .map_err(error::sqlite)?;
        let touched = touched(&ops);
        let mut rows = load_streams(&tx, &touched.streams)?;
        let states = rows
            .iter()
            .map(|(s, (_, state))| (s.clone(), *state))
            .collect();
        let stored = match lookups {
            Lookups::Load => load_events(&tx, &touched.event_ids)?,
            Lookups::Skip => Vec::new(),
        };
        let next_position = Position(u64::try_from(next_position).unwrap_or(1));
        let mut plan = Plan::new(next_position, now, states, stored);
        let outcomes: Outcomes = ops.into_iter().map(|op| plan.apply(op)).collect();
        let conflicted = outcomes
            .iter()
            .any(|o| matches!(o, Err(StoreError::WrongExpectedVersion { .. })));
        if matches!(lookups, Lookups::Skip) && conflicted {
            return Err(Attempt::IdAlreadyStored);
        }
        let writes = plan.into_writes();
        let head = Position(writes.next_position.0 - 1);
        if !writes.is_empty() {
            store(&tx, writes, &mut rows)?;
        }
        // Readers must know before the commit makes these positions visible that they
        // are not durable yet.
        let previous = self.durability.committing(head);
        tx.commit().map_err(|e| {
            self.durability.commit_failed(previous);
            error::sqlite(e)
        })?;
        Ok((outcomes, head))
    }
}

/// Whether a group is planned with the stored events its ids name.
#[derive(Debug, Clone, Copy)]
enum Lookups {
    Skip,
    Load,
}

/// Why one attempt at a group did not commit.
#[derive(Debug)]
enum Attempt {
    /// An event id of the group may already be stored: plan again with lookups.
    IdAlreadyStored,
    Failed(StoreError),
}

impl From<StoreError> for Attempt {
    fn from(error: StoreError) -> Self {
        Self::Failed(error)
    }
}

/// Whether an insert failed on the unique index of event ids.
fn is_duplicate_id(error: &rusqlite::Error) -> bool {
    matches!(
        error,
        rusqlite::Error::SqliteFailure(e, Some(message))
            if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE && message.contains("events.event_id")
    )
}

/// The stored row id and state of each touched stream that exists.
type StreamRows = HashMap<StreamId, (i64, StreamState)>;

fn load_streams(tx: &Transaction<'_>, streams: &[StreamId]) -> Result<StreamRows, StoreError> {
    let sql = format!(
        "SELECT s.id, {STREAM_VERSION}, s.truncate_before, s.deleted FROM streams s WHERE s.name = ?1"
    );
    let mut stmt = tx.prepare_cached(&sql).map_err(error::sqlite)?;
    let mut rows = HashMap::with_capacity(streams.len());
    for stream in streams {
        let found = stmt
            .query_row([stream.as_str()], |r| {
                let state = StreamState {
                    version: row::version(r, 1)?,
                    truncate_before: StreamVersion(row::counter(r, 2)?),
                    deleted: r.get(3)?,
                };
                Ok((r.get::<_, i64>(0)?, state))
            })
            .optional()
            .map_err(error::sqlite)?;
        if let Some(found) = found {
            rows.insert(stream.clone(), found);
        }
    }
    Ok(rows)
}

fn load_events(
    tx: &Transaction<'_>,
    ids: &[eventyr_core::EventId],
) -> Result<Vec<eventyr_core::RecordedEvent>, StoreError> {
    let sql = format!(
        "SELECT {EVENT_COLUMNS}, s.name FROM events e JOIN streams s ON s.id = e.stream WHERE e.event_id = ?1"
    );
    let mut stmt = tx.prepare_cached(&sql).map_err(error::sqlite)?;
    let mut stored = Vec::new();
    for id in ids {
        let found = stmt
            .query_row([&id.as_bytes()[..]], row::event_with_stream)
            .optional()
            .map_err(error::sqlite)?;
        stored.extend(found);
    }
    Ok(stored)
}

/// Writes what the plan decided: stream rows first (new streams need their ids before
/// their events), then events, then erasures, then the position counter.
///
/// A stream's version is derived from its last event (see [`STREAM_VERSION`]), so an
/// append to an existing stream leaves its row alone: one random page fewer per append.
/// The row changes only when the stream is created, truncated or deleted, and then
/// records the version too, for when no event is left to derive it from.
fn store(tx: &Transaction<'_>, writes: Writes, rows: &mut StreamRows) -> Result<(), Attempt> {
    {
        let mut update = tx
            .prepare_cached(
                "UPDATE streams SET version = ?2, truncate_before = ?3, deleted = ?4 WHERE id = ?1",
            )
            .map_err(error::sqlite)?;
        let mut insert = tx
            .prepare_cached(
                "INSERT INTO streams (name, version, truncate_before, deleted) VALUES (?1, ?2, ?3, ?4) RETURNING id",
            )
            .map_err(error::sqlite)?;
        for (stream, state) in &writes.streams {
            let version = state.version.map(|v| row::int(v.0)).transpose()?;
            let truncate_before = row::int(state.truncate_before.0)?;
            match rows.get(stream) {
                Some((_, loaded))
                    if loaded.truncate_before == state.truncate_before
                        && loaded.deleted == state.deleted =>
                {
                    Ok(())
                }
                Some((id, _)) => update
                    .execute(params![id, version, truncate_before, state.deleted])
                    .map(drop),
                None => insert
                    .query_row(
                        params![stream.as_str(), version, truncate_before, state.deleted],
                        |r| r.get(0),
                    )
                    .map(|id| {
                        rows.insert(stream.clone(), (id, *state));
                    }),
            }
            .map_err(error::sqlite)?;
        }
    }
    {
        let mut insert = tx
            .prepare_cached(
                "INSERT INTO events (position, event_id, stream, version, type, schema_version, data, \
                 correlation_id, causation_id, traceparent, user_id, recorded_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            )
            .map_err(error::sqlite)?;
        for event in &writes.events {
            let (stream, _) = rows.get(&event.stream_id).ok_or_else(|| {
                StoreError::corrupt(format!("no row for stream {}", event.stream_id))
            })?;
            insert
                .execute(params![
                    row::int(event.position.0)?,
                    &event.id.as_bytes()[..],
                    stream,
                    row::int(event.version.0)?,
                    event.event_type.as_str(),
                    event.schema_version,
                    event.data.as_bytes(),
                    event.metadata.correlation_id,
                    event.metadata.causation_id,
                    event.metadata.traceparent,
                    event.metadata.user_id,
                    event.recorded_at.unix_micros(),
                ])
                .map_err(|e| {
                    if is_duplicate_id(&e) {
                        Attempt::IdAlreadyStored
                    } else {
                        Attempt::Failed(error::sqlite(e))
                    }
                })?;
        }
    }
    store_snapshots(tx, &writes.snapshots, rows)?;
    let mut erase = tx
        .prepare_cached("DELETE FROM events WHERE stream = ?1 AND version < ?2")
        .map_err(error::sqlite)?;
    let mut erase_snapshot = tx
        .prepare_cached("DELETE FROM snapshots WHERE stream = ?1")
        .map_err(error::sqlite)?;
    for erasure in &writes.erasures {
        let Some((stream, _)) = rows.get(&erasure.stream) else {
            continue; // A stream without a row has no events to erase.
        };
        let before = erasure.before.map_or(i64::MAX, |v| row::bound(v.0));
        erase
            .execute(params![stream, before])
            .map_err(error::sqlite)?;
        if erasure.before.is_none() {
            erase_snapshot.execute([stream]).map_err(error::sqlite)?;
        }
    }
    tx.prepare_cached("UPDATE meta SET value = ?1 WHERE key = 'next_position'")
        .and_then(|mut s| s.execute([row::bound(writes.next_position.0)]))
        .map_err(error::sqlite)?;
    Ok(())
}

/// Stores snapshots, each replacing its stream's older one but never a newer one.
fn store_snapshots(
    tx: &Transaction<'_>,
    snapshots: &[Snapshot],
    rows: &StreamRows,
) -> Result<(), Attempt> {
    if snapshots.is_empty() {
        return Ok(());
    }
    let mut upsert = tx
        .prepare_cached(
            "INSERT INTO snapshots (stream, version, schema_version, data, taken_at) \
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (stream) DO UPDATE SET \
             version = excluded.version, schema_version = excluded.schema_version, \
             data = excluded.data, taken_at = excluded.taken_at \
             WHERE excluded.version >= snapshots.version",
        )
        .map_err(error::sqlite)?;
    for snapshot in snapshots {
        let (stream, _) = rows
            .get(&snapshot.stream)
            .ok_or_else(|| StoreError::corrupt(format!("no row for stream {}", snapshot.stream)))?;
        upsert
            .execute(params![
                stream,
                row::int(snapshot.version.0)?,
                snapshot.schema_version,
                snapshot.data.as_bytes(),
                snapshot.taken_at.unix_micros(),
            ])
            .map_err(error::sqlite)?;
    }
    Ok(())
}
