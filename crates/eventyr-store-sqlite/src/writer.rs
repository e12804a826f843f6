//! The writer: one thread that owns the only write connection of this store instance
//! and turns its queue into group commits.
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
use eventyr_store::StoreError;
use eventyr_store::group::{GroupBounds, Outcomes, WriteRequest, advance_head, answer, take_group};
use eventyr_store::plan::{Plan, StreamState, WriteOp, Writes, touched};
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};
use tokio::sync::{mpsc, watch};

use crate::error;
use crate::row::{self, EVENT_COLUMNS};

#[derive(Debug)]
pub struct Writer {
    pub conn: Connection,
    pub clock: Arc<dyn Clock>,
    pub head: Arc<watch::Sender<Position>>,
    pub requests: mpsc::Receiver<WriteRequest>,
    pub bounds: GroupBounds,
}

impl Writer {
    /// Serves requests until every sender is gone, then returns.
    pub fn run(mut self) {
        while let Some(first) = self.requests.blocking_recv() {
            let (ops, replies) = take_group(first, &mut self.requests, self.bounds);
            let result = self.write(ops).map(|(outcomes, head)| {
                advance_head(&self.head, head);
                outcomes
            });
            answer(replies, result);
        }
    }

    /// Runs one group in one transaction; returns each op's outcome and the new head.
    fn write(&mut self, ops: Vec<WriteOp>) -> Result<(Outcomes, Position), StoreError> {
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
        let (mut stream_ids, states) = load_streams(&tx, &touched.streams)?;
        let stored = load_events(&tx, &touched.event_ids)?;
        let next_position = Position(u64::try_from(next_position).unwrap_or(1));
        let mut plan = Plan::new(next_position, now, states, stored);
        let outcomes: Outcomes = ops.into_iter().map(|op| plan.apply(op)).collect();
        let writes = plan.into_writes();
        let head = Position(writes.next_position.0 - 1);
        if !writes.is_empty() {
            store(&tx, writes, &mut stream_ids)?;
        }
        tx.commit().map_err(error::sqlite)?;
        Ok((outcomes, head))
    }
}

type StreamRows = (HashMap<StreamId, i64>, HashMap<StreamId, StreamState>);

fn load_streams(tx: &Transaction<'_>, streams: &[StreamId]) -> Result<StreamRows, StoreError> {
    let mut stmt = tx
        .prepare_cached("SELECT id, version, truncate_before, deleted FROM streams WHERE name = ?1")
        .map_err(error::sqlite)?;
    let mut ids = HashMap::with_capacity(streams.len());
    let mut states = HashMap::with_capacity(streams.len());
    for stream in streams {
        let found = stmt
            .query_row([stream.as_str()], |r| {
                let version: Option<i64> = r.get(1)?;
                let state = StreamState {
                    version: version.map(|v| StreamVersion(u64::try_from(v).unwrap_or_default())),
                    truncate_before: StreamVersion(row::counter(r, 2)?),
                    deleted: r.get(3)?,
                };
                Ok((r.get::<_, i64>(0)?, state))
            })
            .optional()
            .map_err(error::sqlite)?;
        if let Some((id, state)) = found {
            ids.insert(stream.clone(), id);
            states.insert(stream.clone(), state);
        }
    }
    Ok((ids, states))
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
fn store(
    tx: &Transaction<'_>,
    writes: Writes,
    stream_ids: &mut HashMap<StreamId, i64>,
) -> Result<(), StoreError> {
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
            match stream_ids.get(stream) {
                Some(id) => update
                    .execute(params![id, version, truncate_before, state.deleted])
                    .map(drop),
                None => insert
                    .query_row(
                        params![stream.as_str(), version, truncate_before, state.deleted],
                        |r| r.get(0),
                    )
                    .map(|id| {
                        stream_ids.insert(stream.clone(), id);
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
            let stream = stream_ids.get(&event.stream_id).ok_or_else(|| {
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
                .map_err(error::sqlite)?;
        }
    }
    let mut erase = tx
        .prepare_cached("DELETE FROM events WHERE stream = ?1 AND version < ?2")
        .map_err(error::sqlite)?;
    for erasure in &writes.erasures {
        let Some(stream) = stream_ids.get(&erasure.stream) else {
            continue; // A stream without a row has no events to erase.
        };
        let before = erasure.before.map_or(i64::MAX, |v| row::bound(v.0));
        erase
            .execute(params![stream, before])
            .map_err(error::sqlite)?;
    }
    tx.prepare_cached("UPDATE meta SET value = ?1 WHERE key = 'next_position'")
        .and_then(|mut s| s.execute([row::bound(writes.next_position.0)]))
        .map_err(error::sqlite)?;
    Ok(())
}
