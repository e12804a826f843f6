//! The writer: one task and one connection per store instance, turning its queue into
//! group commits.
//!
//! Every group is one transaction that first locks the single row of
//! `position`. Writers in other processes wait on that lock until this transaction has
//! committed and become visible, so global positions are assigned in commit order and a
//! rolled-back transaction leaves no gap: the counter update rolls back with it. That
//! is the whole defence against the "skipped event" bug of sequence-based stores, where
//! a reader sees position 11 committed while 10 is still in flight.
//!
//! A group costs three round trips, each pipelined: (BEGIN, lock, load streams, load
//! events), (write streams, events, erasures, counter, NOTIFY), (COMMIT). COMMIT is
//! sent on its own so that it never runs after a statement that failed to be sent.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use eventyr_core::{Clock, EventId, Position, RecordedEvent, StreamId, StreamVersion};
use eventyr_store::Snapshot;
use eventyr_store::StoreError;
use eventyr_store::group::{GroupBounds, Outcomes, WriteRequest, advance_head, answer, take_group};
use eventyr_store::plan::{Erasure, Plan, StreamState, WriteOp, Writes, touched};
use tokio::sync::{mpsc, watch};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Config, NoTls, Statement};
use uuid::Uuid;

use crate::error;
use crate::row::{self, EVENT_COLUMN_COUNT, EVENT_COLUMNS};

/// Statement parameters, bound to locals so that pipelined futures can borrow them.
type Params<'a, const N: usize> = [&'a (dyn ToSql + Sync); N];

/// The writer's statements, prepared once per connection.
#[derive(Debug)]
struct Statements {
    begin: Statement,
    commit: Statement,
    lock: Statement,
    streams: Statement,
    events: Statement,
    upsert_streams: Statement,
    insert_events: Statement,
    erase: Statement,
    save_snapshots: Statement,
    erase_snapshots: Statement,
    set_position: Statement,
    notify: Statement,
}

#[derive(Debug)]
struct Connection {
    client: Client,
    statements: Statements,
}

#[derive(Debug)]
pub struct Writer {
    pub config: Config,
    pub schema: String,
    pub channel: String,
    pub clock: Arc<dyn Clock>,
    pub head: Arc<watch::Sender<Position>>,
    pub requests: mpsc::Receiver<WriteRequest>,
    pub bounds: GroupBounds,
    connection: Option<Connection>,
}

impl Writer {
    #[allow(clippy::too_many_arguments)] // plain data, named at the one call site
    pub fn new(
        config: Config,
        schema: String,
        channel: String,
        clock: Arc<dyn Clock>,
        head: Arc<watch::Sender<Position>>,
        requests: mpsc::Receiver<WriteRequest>,
        bounds: GroupBounds,
    ) -> Self {
        Self {
            config,
            schema,
            channel,
            clock,
            head,
            requests,
            bounds,
            connection: None,
        }
    }

    /// Connects now, so that a store that cannot write fails when it is opened.
    pub async fn connect(&mut self) -> Result<(), StoreError> {
        let (client, connection) = self.config.connect(NoTls).await.map_err(error::postgres)?;
        tokio::spawn(async move {
            // The connection ends with the client; its error surfaces on the next call.
            let _ = connection.await;
        });
        let statements = prepare(&client, &self.schema).await?;
        self.connection = Some(Connection { client, statements });
        Ok(())
    }

    /// Serves requests until every sender is gone.
    pub async fn run(mut self) {
        while let Some(first) = self.requests.recv().await {
            let (ops, replies) = take_group(first, &mut self.requests, self.bounds);
            let result = self.write(ops).await;
            if let Ok((_, head)) = &result {
                advance_head(&self.head, *head);
            }
            answer(replies, result.map(|(outcomes, _)| outcomes));
        }
    }

    async fn write(&mut self, ops: Vec<WriteOp>) -> Result<(Outcomes, Position), StoreError> {
        if self
            .connection
            .as_ref()
            .is_none_or(|c| c.client.is_closed())
        {
            self.connect().await?;
        }
        let Some(connection) = &self.connection else {
            return Err(StoreError::Closed);
        };
        let result = write_group(connection, &self.channel, self.clock.now(), ops).await;
        if result.is_err() && !connection.client.is_closed() {
            // Whatever failed, leave no transaction open on this connection.
            let _ = connection.client.batch_execute("ROLLBACK").await;
        }
        result
    }
}

async fn prepare(client: &Client, schema: &str) -> Result<Statements, StoreError> {
    let s = schema;
    let sql = [
        "BEGIN".to_owned(),
        "COMMIT".to_owned(),
        format!("SELECT next_position FROM {s}.position WHERE id = 1 FOR UPDATE"),
        format!(
            "SELECT name, id, version, truncate_before, deleted FROM {s}.streams WHERE name = ANY($1)"
        ),
        format!(
            "SELECT {EVENT_COLUMNS}, s.name FROM {s}.events e JOIN {s}.streams s ON s.id = e.stream_id \
             WHERE e.event_id = ANY($1)"
        ),
        format!(
            "INSERT INTO {s}.streams (name, version, truncate_before, deleted) \
             SELECT * FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::bool[]) \
             ON CONFLICT (name) DO UPDATE SET version = EXCLUDED.version, \
             truncate_before = EXCLUDED.truncate_before, deleted = EXCLUDED.deleted"
        ),
        format!(
            "INSERT INTO {s}.events (position, event_id, stream_id, version, type, schema_version, data, \
             correlation_id, causation_id, traceparent, user_id, recorded_at) \
             SELECT u.position, u.event_id, st.id, u.version, u.type, u.schema_version, u.data, \
             u.correlation_id, u.causation_id, u.traceparent, u.user_id, u.recorded_at \
             FROM UNNEST($1::int8[], $2::uuid[], $3::text[], $4::int8[], $5::text[], $6::int8[], $7::bytea[], \
             $8::text[], $9::text[], $10::text[], $11::text[], $12::timestamptz[]) \
             AS u(position, event_id, stream, version, type, schema_version, data, \
             correlation_id, causation_id, traceparent, user_id, recorded_at) \
             JOIN {s}.streams st ON st.name = u.stream"
        ),
        format!(
            "DELETE FROM {s}.events e USING {s}.streams st, UNNEST($1::text[], $2::int8[]) AS u(stream, before) \
             WHERE st.name = u.stream AND e.stream_id = st.id AND e.version < u.before"
        ),
        format!(
            "INSERT INTO {s}.snapshots (stream_id, version, schema_version, data, taken_at) \
             SELECT st.id, u.version, u.schema_version, u.data, u.taken_at \
             FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::bytea[], $5::timestamptz[]) \
             AS u(stream, version, schema_version, data, taken_at) \
             JOIN {s}.streams st ON st.name = u.stream \
             ON CONFLICT (stream_id) DO UPDATE SET version = EXCLUDED.version, \
             schema_version = EXCLUDED.schema_version, data = EXCLUDED.data, taken_at = EXCLUDED.taken_at \
             WHERE EXCLUDED.version >= {s}.snapshots.version"
        ),
        format!(
            "DELETE FROM {s}.snapshots sn USING {s}.streams st, UNNEST($1::text[]) AS u(stream) \
             WHERE st.name = u.stream AND sn.stream_id = st.id"
        ),
        format!("UPDATE {s}.position SET next_position = $1 WHERE id = 1"),
        "SELECT pg_notify($1, $2)".to_owned(),
    ];
    let prepared = futures::future::try_join_all(sql.iter().map(|q| client.prepare(q)))
        .await
        .map_err(error::postgres)?;
    let [
        begin,
        commit,
        lock,
        streams,
        events,
        upsert_streams,
        insert_events,
        erase,
        save_snapshots,
        erase_snapshots,
        set_position,
        notify,
    ] = <[Statement; 12]>::try_from(prepared)
        .map_err(|_| StoreError::corrupt("statement count"))?;
    Ok(Statements {
        begin,
        commit,
        lock,
        streams,
        events,
        upsert_streams,
        insert_events,
        erase,
        save_snapshots,
        erase_snapshots,
        set_position,
        notify,
    })
}

async fn write_group(
    connection: &Connection,
    channel: &str,
    now: eventyr_core::Timestamp,
    ops: Vec<WriteOp>,
) -> Result<(Outcomes, Position), StoreError> {
    let (client, st) = (&connection.client, &connection.statements);
    let touched = touched(&ops);
    let names: Vec<&str> = touched.streams.iter().map(StreamId::as_str).collect();
    let ids: Vec<Uuid> = touched.event_ids.iter().map(EventId::as_uuid).collect();
    let (names, ids): (Params<'_, 1>, Params<'_, 1>) = ([&names], [&ids]);
    let (_, lock, stream_rows, event_rows) = futures::try_join!(
        client.execute(&st.begin, &[]),
        client.query_one(&st.lock, &[]),
        client.query(&st.streams, &names),
        client.query(&st.events, &ids),
    )
    .map_err(error::postgres)?;
    let next_position: i64 = lock.try_get(0).map_err(error::postgres)?;
    let mut states = HashMap::with_capacity(stream_rows.len());
    for r in &stream_rows {
        let name: String = r.try_get(0).map_err(error::postgres)?;
        let version: Option<i64> = r.try_get(2).map_err(error::postgres)?;
        let truncate_before: i64 = r.try_get(3).map_err(error::postgres)?;
        let state = StreamState {
            version: version.map(|v| StreamVersion(u64::try_from(v).unwrap_or_default())),
            truncate_before: StreamVersion(u64::try_from(truncate_before).unwrap_or_default()),
            deleted: r.try_get(4).map_err(error::postgres)?,
        };
        states.insert(StreamId::from_stored(&name), state);
    }
    let stored = event_rows
        .iter()
        .map(|r| {
            let name: String = r.try_get(EVENT_COLUMN_COUNT).map_err(error::postgres)?;
            row::event(r, 0, StreamId::from_stored(&name))
        })
        .collect::<Result<Vec<RecordedEvent>, StoreError>>()?;

    let next_position = Position(u64::try_from(next_position).unwrap_or(1));
    let mut plan = Plan::new(next_position, now, states, stored);
    let outcomes: Outcomes = ops.into_iter().map(|op| plan.apply(op)).collect();
    let writes = plan.into_writes();
    let head = Position(writes.next_position.0 - 1);
    if !writes.is_empty() {
        store(client, st, channel, &writes).await?;
    }
    client
        .execute(&st.commit, &[])
        .await
        .map_err(error::ambiguous)?;
    Ok((outcomes, head))
}

/// Sends every write of the group as one pipeline of array-parameter statements.
async fn store(
    client: &Client,
    st: &Statements,
    channel: &str,
    writes: &Writes,
) -> Result<(), StoreError> {
    let stream_names: Vec<&str> = writes.streams.iter().map(|(s, _)| s.as_str()).collect();
    let stream_versions: Vec<Option<i64>> = writes
        .streams
        .iter()
        .map(|(_, s)| s.version.map(|v| row::int(v.0)).transpose())
        .collect::<Result<_, _>>()?;
    let truncations: Vec<i64> = writes
        .streams
        .iter()
        .map(|(_, s)| row::int(s.truncate_before.0))
        .collect::<Result<_, _>>()?;
    let deleted: Vec<bool> = writes.streams.iter().map(|(_, s)| s.deleted).collect();

    let events = &writes.events;
    let positions: Vec<i64> = events
        .iter()
        .map(|e| row::int(e.position.0))
        .collect::<Result<_, _>>()?;
    let event_ids: Vec<Uuid> = events.iter().map(|e| e.id.as_uuid()).collect();
    let streams: Vec<&str> = events.iter().map(|e| e.stream_id.as_str()).collect();
    let versions: Vec<i64> = events
        .iter()
        .map(|e| row::int(e.version.0))
        .collect::<Result<_, _>>()?;
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    let schema_versions: Vec<i64> = events.iter().map(|e| i64::from(e.schema_version)).collect();
    let data: Vec<&[u8]> = events.iter().map(|e| e.data.as_bytes()).collect();
    let meta = |get: fn(&RecordedEvent) -> &Option<String>| -> Vec<Option<&str>> {
        events.iter().map(|e| get(e).as_deref()).collect()
    };
    let correlation = meta(|e| &e.metadata.correlation_id);
    let causation = meta(|e| &e.metadata.causation_id);
    let traceparent = meta(|e| &e.metadata.traceparent);
    let user = meta(|e| &e.metadata.user_id);
    let recorded: Vec<SystemTime> = events
        .iter()
        .map(|e| e.recorded_at.to_system_time())
        .collect();

    let (erased_streams, erased_before, erased_whole) = erasure_params(&writes.erasures);
    let (snapshot_streams, snapshot_versions, snapshot_schemas, snapshot_data, snapshot_times) =
        snapshot_params(&writes.snapshots)?;
    let next_position = row::int(writes.next_position.0)?;
    let head = (writes.next_position.0 - 1).to_string();

    let upsert: Params<'_, 4> = [&stream_names, &stream_versions, &truncations, &deleted];
    let insert: Params<'_, 12> = [
        &positions,
        &event_ids,
        &streams,
        &versions,
        &types,
        &schema_versions,
        &data,
        &correlation,
        &causation,
        &traceparent,
        &user,
        &recorded,
    ];
    let erase: Params<'_, 2> = [&erased_streams, &erased_before];
    let erase_whole: Params<'_, 1> = [&erased_whole];
    let snapshots: Params<'_, 5> = [
        &snapshot_streams,
        &snapshot_versions,
        &snapshot_schemas,
        &snapshot_data,
        &snapshot_times,
    ];
    let position: Params<'_, 1> = [&next_position];
    let notify: Params<'_, 2> = [&channel, &head];
    // Only the statements this group needs, sent as one pipeline in this order.
    let mut pipeline: Vec<(&Statement, &[&(dyn ToSql + Sync)])> = Vec::with_capacity(7);
    if !writes.streams.is_empty() {
        pipeline.push((&st.upsert_streams, &upsert));
    }
    if !writes.events.is_empty() {
        pipeline.push((&st.insert_events, &insert));
    }
    if !writes.snapshots.is_empty() {
        pipeline.push((&st.save_snapshots, &snapshots));
    }
    if !writes.erasures.is_empty() {
        pipeline.push((&st.erase, &erase));
        pipeline.push((&st.erase_snapshots, &erase_whole));
    }
    pipeline.push((&st.set_position, &position));
    pipeline.push((&st.notify, &notify));
    futures::future::try_join_all(
        pipeline
            .into_iter()
            .map(|(statement, params)| client.execute(statement, params)),
    )
    .await
    .map_err(error::postgres)?;
    Ok(())
}

type ErasureParams<'a> = (Vec<&'a str>, Vec<i64>, Vec<&'a str>);

/// Erasures as arrays: every erased stream with its bound, and the streams erased whole
/// (whose snapshots go too).
fn erasure_params(erasures: &[Erasure]) -> ErasureParams<'_> {
    let streams = erasures.iter().map(|e| e.stream.as_str()).collect();
    let before = erasures
        .iter()
        .map(|e| e.before.map_or(i64::MAX, |v| row::bound(v.0)))
        .collect();
    let whole = erasures
        .iter()
        .filter(|e| e.before.is_none())
        .map(|e| e.stream.as_str())
        .collect();
    (streams, before, whole)
}

type SnapshotParams<'a> = (
    Vec<&'a str>,
    Vec<i64>,
    Vec<i64>,
    Vec<&'a [u8]>,
    Vec<SystemTime>,
);

fn snapshot_params(snapshots: &[Snapshot]) -> Result<SnapshotParams<'_>, StoreError> {
    Ok((
        snapshots.iter().map(|s| s.stream.as_str()).collect(),
        snapshots
            .iter()
            .map(|s| row::int(s.version.0))
            .collect::<Result<_, _>>()?,
        snapshots
            .iter()
            .map(|s| i64::from(s.schema_version))
            .collect(),
        snapshots.iter().map(|s| s.data.as_bytes()).collect(),
        snapshots
            .iter()
            .map(|s| s.taken_at.to_system_time())
            .collect(),
    ))
}
