//! The read side: a bounded pool of read connections, used on the blocking pool. In
//! WAL mode readers see committed data only and never wait for the writer.
//!
//! Each connection keeps a cache of the names it has met: stream row ids to stream ids
//! and type texts to event types. Stream rows are never deleted or renamed, so an id
//! names one stream forever; with the cache an unfiltered `$all` read needs no join and
//! repeated names cost a reference count instead of an allocation.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventyr_core::{
    EventId, EventType, Json, Position, RecordedEvent, StreamId, StreamVersion, Timestamp,
};
use eventyr_store::{AllSlice, Direction, ReadAll, ReadStream, Snapshot, StoreError, StreamSlice};
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params};
use tokio::sync::Semaphore;

use crate::error;
use crate::row::{self, EVENT_COLUMNS, STREAM_COLUMN};
use crate::schema::{self, STREAM_VERSION};

/// How many names one connection remembers before it starts over.
const NAMES_MAX: usize = 65_536;

/// A pooled read connection and the names it has met.
#[derive(Debug)]
pub struct ReadConnection {
    conn: Connection,
    names: Names,
}

#[derive(Debug, Default)]
struct Names {
    streams: HashMap<i64, StreamId>,
    types: HashMap<Box<str>, EventType>,
}

impl Names {
    fn event_type(&mut self, text: &str) -> EventType {
        if let Some(known) = self.types.get(text) {
            return known.clone();
        }
        if self.types.len() >= NAMES_MAX {
            self.types.clear();
        }
        let event_type = EventType::from_stored(text);
        self.types.insert(text.into(), event_type.clone());
        event_type
    }

    fn stream(&mut self, conn: &Connection, id: i64) -> rusqlite::Result<StreamId> {
        if let Some(known) = self.streams.get(&id) {
            return Ok(known.clone());
        }
        let name: String = conn
            .prepare_cached("SELECT name FROM streams WHERE id = ?1")?
            .query_row([id], |r| r.get(0))?;
        if self.streams.len() >= NAMES_MAX {
            self.streams.clear();
        }
        let stream = StreamId::from_stored(&name);
        self.streams.insert(id, stream.clone());
        Ok(stream)
    }

    /// Decodes an event row that carries its stream's row id at [`STREAM_COLUMN`].
    fn event(&mut self, conn: &Connection, r: &Row<'_>) -> rusqlite::Result<RecordedEvent> {
        let stream = self.stream(conn, r.get(STREAM_COLUMN)?)?;
        let event_type = self.event_type(row::text(r, 3)?);
        row::event(r, stream, event_type)
    }
}

#[derive(Debug)]
pub struct Readers {
    path: PathBuf,
    busy_timeout: Duration,
    idle: Mutex<Vec<ReadConnection>>,
    permits: Arc<Semaphore>,
}

impl Readers {
    pub fn new(path: PathBuf, busy_timeout: Duration, readers_max: usize) -> Self {
        Self {
            path,
            busy_timeout,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(readers_max)),
        }
    }

    /// Runs `read` on a pooled connection on the blocking pool. At most `readers_max`
    /// reads run at once; the others wait here.
    pub async fn run<T, F>(self: &Arc<Self>, read: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut ReadConnection) -> Result<T, StoreError> + Send + 'static,
    {
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Closed)?;
        let this = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let mut conn = match this.take() {
                Some(conn) => conn,
                None => this.connect()?,
            };
            let result = read(&mut conn);
            this.give_back(conn);
            result
        })
        .await
        .map_err(|e| StoreError::unavailable("a read task failed", e))?
    }

    fn take(&self) -> Option<ReadConnection> {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop()
    }

    fn give_back(&self, conn: ReadConnection) {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(conn);
    }

    fn connect(&self) -> Result<ReadConnection, StoreError> {
        // Read-write without create plus `query_only`: a read-only open of a WAL file
        // fails when the -shm file is missing or not writable. No `mmap_size`: while
        // writers grow the file SQLite remaps it, and the unmaps cost TLB shootdowns
        // on every core (measured: commands 6.8k/s with mmap, 8.4k/s without).
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(&self.path, flags).map_err(error::sqlite)?;
        schema::configure(&conn, self.busy_timeout)?;
        conn.execute_batch("PRAGMA query_only = 1;")
            .map_err(error::sqlite)?;
        conn.set_prepared_statement_cache_capacity(32);
        Ok(ReadConnection {
            conn,
            names: Names::default(),
        })
    }
}

/// Reads one stream inside one read transaction, so the stream row and its events come
/// from the same snapshot.
pub fn read_stream(
    read_conn: &mut ReadConnection,
    stream: &StreamId,
    read: ReadStream,
) -> Result<StreamSlice, StoreError> {
    let ReadConnection { conn, names } = read_conn;
    let tx = conn.transaction().map_err(error::sqlite)?;
    let sql = format!("SELECT s.id, {STREAM_VERSION}, s.deleted FROM streams s WHERE s.name = ?1");
    let found = tx
        .prepare_cached(&sql)
        .and_then(|mut s| {
            s.query_row([stream.as_str()], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    row::version(r, 1)?,
                    r.get::<_, bool>(2)?,
                ))
            })
            .optional()
        })
        .map_err(error::sqlite)?;
    let Some((id, version, deleted)) = found else {
        return Ok(StreamSlice {
            events: Vec::new(),
            stream_version: None,
            is_end: true,
        });
    };
    if deleted {
        return Err(StoreError::StreamDeleted {
            stream: stream.clone(),
        });
    }
    let limit = read.effective_limit();
    let order = match read.direction {
        Direction::Forwards => "e.version >= ?2 ORDER BY e.version ASC",
        Direction::Backwards => "e.version <= ?2 ORDER BY e.version DESC",
    };
    let sql =
        format!("SELECT {EVENT_COLUMNS} FROM events e WHERE e.stream = ?1 AND {order} LIMIT ?3");
    let mut stmt = tx.prepare_cached(&sql).map_err(error::sqlite)?;
    let fetch = i64::try_from(limit + 1).unwrap_or(i64::MAX);
    let mut rows = stmt
        .query(params![id, row::bound(read.from.0), fetch])
        .map_err(error::sqlite)?;
    let mut events = Vec::new();
    while let Some(r) = rows.next().map_err(error::sqlite)? {
        let event_type = names.event_type(row::text(r, 3).map_err(error::sqlite)?);
        events.push(row::event(r, stream.clone(), event_type).map_err(error::sqlite)?);
    }
    let is_end = events.len() <= limit;
    events.truncate(limit);
    Ok(StreamSlice {
        events,
        stream_version: version,
        is_end,
    })
}

/// Reads `$all`. The head is read first and events are read only up to it: positions
/// are gapless and follow commit order, so every position up to a committed head is
/// already visible to the second statement.
pub fn read_all(read_conn: &mut ReadConnection, read: &ReadAll) -> Result<AllSlice, StoreError> {
    let ReadConnection { conn, names } = read_conn;
    let next_position: i64 = conn
        .prepare_cached("SELECT value FROM meta WHERE key = 'next_position'")
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .map_err(error::sqlite)?;
    let head = Position(u64::try_from(next_position - 1).unwrap_or_default());
    let from = read.from.max(Position::FIRST);
    if from > head {
        return Ok(AllSlice {
            events: Vec::new(),
            next: from,
            head,
        });
    }
    let limit = read.effective_limit();
    let fetch = i64::try_from(limit).unwrap_or(i64::MAX);
    let (from_i, head_i) = (row::bound(from.0), row::bound(head.0));
    let type_prefix = read.filter.active_type_prefix();
    let stream_prefix = read.filter.active_stream_prefix();
    let mut events =
        Vec::with_capacity(limit.min(usize::try_from(head.0 - from.0 + 1).unwrap_or(limit)));
    let mut push = |r: &Row<'_>| -> rusqlite::Result<()> {
        events.push(names.event(conn, r)?);
        Ok(())
    };
    let scanned = if read.filter.is_empty() {
        let sql = format!(
            "SELECT {EVENT_COLUMNS}, e.stream FROM events e \
             WHERE e.position >= ?1 AND e.position <= ?2 ORDER BY e.position LIMIT ?3"
        );
        let mut stmt = conn.prepare_cached(&sql).map_err(error::sqlite)?;
        let mut rows = stmt
            .query(params![from_i, head_i, fetch])
            .map_err(error::sqlite)?;
        each(&mut rows, &mut push)
    } else {
        // Prefixes compare as text, never as patterns (no LIKE/GLOB escaping needed).
        let sql = format!(
            "SELECT {EVENT_COLUMNS}, e.stream FROM events e JOIN streams s ON s.id = e.stream \
             WHERE e.position >= ?1 AND e.position <= ?2 \
             AND (?4 IS NULL OR substr(e.type, 1, length(?4)) = ?4) \
             AND (?5 IS NULL OR substr(s.name, 1, length(?5)) = ?5) ORDER BY e.position LIMIT ?3"
        );
        let mut stmt = conn.prepare_cached(&sql).map_err(error::sqlite)?;
        let mut rows = stmt
            .query(params![from_i, head_i, fetch, type_prefix, stream_prefix])
            .map_err(error::sqlite)?;
        each(&mut rows, &mut push)
    };
    scanned.map_err(error::sqlite)?;
    let next = match events.last() {
        Some(last) if events.len() == limit => last.position.next(),
        _ => head.next(),
    };
    Ok(AllSlice { events, next, head })
}

fn each(
    rows: &mut rusqlite::Rows<'_>,
    f: &mut impl FnMut(&Row<'_>) -> rusqlite::Result<()>,
) -> rusqlite::Result<()> {
    while let Some(r) = rows.next()? {
        f(r)?;
    }
    Ok(())
}

/// The event with this id, if stored.
pub fn read_event(
    read_conn: &mut ReadConnection,
    id: EventId,
) -> Result<Option<RecordedEvent>, StoreError> {
    let ReadConnection { conn, names } = read_conn;
    let sql = format!("SELECT {EVENT_COLUMNS}, e.stream FROM events e WHERE e.event_id = ?1");
    let mut stmt = conn.prepare_cached(&sql).map_err(error::sqlite)?;
    let mut rows = stmt.query([&id.as_bytes()[..]]).map_err(error::sqlite)?;
    match rows.next().map_err(error::sqlite)? {
        Some(r) => names.event(conn, r).map(Some).map_err(error::sqlite),
        None => Ok(None),
    }
}

/// The snapshot of a stream, if any.
pub fn load_snapshot(
    read_conn: &mut ReadConnection,
    stream: &StreamId,
) -> Result<Option<Snapshot>, StoreError> {
    read_conn
        .conn
        .prepare_cached(
            "SELECT sn.version, sn.schema_version, sn.data, sn.taken_at FROM snapshots sn \
             JOIN streams s ON s.id = sn.stream WHERE s.name = ?1",
        )
        .and_then(|mut stmt| {
            stmt.query_row([stream.as_str()], |r| {
                Ok(Snapshot {
                    stream: stream.clone(),
                    version: StreamVersion(row::counter(r, 0)?),
                    schema_version: r.get(1)?,
                    data: Json::from_stored(r.get::<_, Vec<u8>>(2)?),
                    taken_at: Timestamp::from_unix_micros(r.get(3)?),
                })
            })
            .optional()
        })
        .map_err(error::sqlite)
}
