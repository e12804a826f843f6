//! Rows to envelopes, and the integer conversions between SQLite and our counters.

use eventyr_core::{
    EventId, EventType, Json, Metadata, Position, RecordedEvent, StreamId, StreamVersion, Timestamp,
};
use eventyr_store::StoreError;
use rusqlite::Row;
use rusqlite::types::Type;

/// The event columns every read selects, in the order [`event`] decodes them.
pub const EVENT_COLUMNS: &str = "e.position, e.event_id, e.version, e.type, e.schema_version, e.data, \
     e.correlation_id, e.causation_id, e.traceparent, e.user_id, e.recorded_at";

/// The column after [`EVENT_COLUMNS`] where a read puts the stream's row id or name.
pub const STREAM_COLUMN: usize = 11;

/// A text column, borrowed from the row.
pub fn text<'r>(row: &'r Row<'_>, index: usize) -> rusqlite::Result<&'r str> {
    row.get_ref(index)?.as_str().map_err(rusqlite::Error::from)
}

/// Decodes an event row whose stream and type the caller resolved.
pub fn event(
    row: &Row<'_>,
    stream_id: StreamId,
    event_type: EventType,
) -> rusqlite::Result<RecordedEvent> {
    let id: [u8; 16] = row.get(1)?;
    let id = EventId::from_bytes(&id)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(1, Type::Blob, Box::new(e)))?;
    Ok(RecordedEvent {
        id,
        stream_id,
        version: StreamVersion(counter(row, 2)?),
        position: Position(counter(row, 0)?),
        event_type,
        schema_version: row.get(4)?,
        data: Json::from_stored(row.get::<_, Vec<u8>>(5)?),
        metadata: Metadata {
            correlation_id: row.get(6)?,
            causation_id: row.get(7)?,
            traceparent: row.get(8)?,
            user_id: row.get(9)?,
        },
        recorded_at: Timestamp::from_unix_micros(row.get(10)?),
    })
}

/// Decodes an event row that carries its stream's name at [`STREAM_COLUMN`].
pub fn event_with_stream(row: &Row<'_>) -> rusqlite::Result<RecordedEvent> {
    let stream = StreamId::from_stored(text(row, STREAM_COLUMN)?);
    event(row, stream, EventType::from_stored(text(row, 3)?))
}

/// Reads a non-negative integer column as a counter.
pub fn counter(row: &Row<'_>, index: usize) -> rusqlite::Result<u64> {
    let value: i64 = row.get(index)?;
    u64::try_from(value)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(index, Type::Integer, Box::new(e)))
}

/// Reads a stream version where -1 (or NULL) means "no events".
pub fn version(row: &Row<'_>, index: usize) -> rusqlite::Result<Option<StreamVersion>> {
    let value: Option<i64> = row.get(index)?;
    Ok(value.and_then(|v| u64::try_from(v).ok()).map(StreamVersion))
}

/// A counter as a SQLite integer. Counters beyond `i64::MAX` cannot be stored.
pub fn int(value: u64) -> Result<i64, StoreError> {
    i64::try_from(value)
        .map_err(|_| StoreError::corrupt(format!("counter {value} exceeds the storable range")))
}

/// A bound for a query, saturated into the SQLite integer range.
pub fn bound(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}
