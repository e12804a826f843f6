//! Rows to envelopes.

use std::time::SystemTime;

use eventyr_core::{
    EventId, EventType, Json, Metadata, Position, RecordedEvent, StreamId, StreamVersion, Timestamp,
};
use eventyr_store::StoreError;
use tokio_postgres::Row;

/// The event columns every read selects, in the order [`event`] decodes them.
pub const EVENT_COLUMNS: &str = "e.position, e.event_id, e.version, e.type, e.schema_version, e.data, \
     e.correlation_id, e.causation_id, e.traceparent, e.user_id, e.recorded_at";

/// How many columns [`EVENT_COLUMNS`] has.
pub const EVENT_COLUMN_COUNT: usize = 11;

fn corrupt(error: impl std::fmt::Display) -> StoreError {
    StoreError::corrupt(format!("undecodable event row: {error}"))
}

/// Decodes the event whose columns start at `at` in `row`.
pub fn event(row: &Row, at: usize, stream_id: StreamId) -> Result<RecordedEvent, StoreError> {
    let get_counter = |index: usize| -> Result<u64, StoreError> {
        let value: i64 = row.try_get(at + index).map_err(corrupt)?;
        u64::try_from(value).map_err(corrupt)
    };
    let text = |index: usize| -> Result<Option<String>, StoreError> {
        row.try_get(at + index).map_err(corrupt)
    };
    let schema_version = u32::try_from(get_counter(4)?).map_err(corrupt)?;
    let recorded_at: SystemTime = row.try_get(at + 10).map_err(corrupt)?;
    Ok(RecordedEvent {
        id: EventId::from_uuid(row.try_get(at + 1).map_err(corrupt)?).map_err(corrupt)?,
        stream_id,
        version: StreamVersion(get_counter(2)?),
        position: Position(get_counter(0)?),
        event_type: EventType::from_stored(row.try_get(at + 3).map_err(corrupt)?),
        schema_version,
        data: Json::from_stored(row.try_get::<_, Vec<u8>>(at + 5).map_err(corrupt)?),
        metadata: Metadata {
            correlation_id: text(6)?,
            causation_id: text(7)?,
            traceparent: text(8)?,
            user_id: text(9)?,
        },
        recorded_at: Timestamp::from_system_time(recorded_at),
    })
}

/// A counter as a PostgreSQL bigint. Counters beyond `i64::MAX` cannot be stored.
pub fn int(value: u64) -> Result<i64, StoreError> {
    i64::try_from(value)
        .map_err(|_| StoreError::corrupt(format!("counter {value} exceeds the storable range")))
}

/// A bound for a query, saturated into the bigint range.
pub fn bound(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}
