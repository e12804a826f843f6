//! The read side: a bounded pool of read-only connections, used on the blocking thread
//! pool. In WAL mode readers see committed data only and never wait for the writer.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventyr_core::{Position, StreamId};
use eventyr_store::{AllSlice, Direction, ReadAll, ReadStream, StoreError, StreamSlice};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::Semaphore;

use crate::error;
use crate::row::{self, EVENT_COLUMNS};
use crate::schema::{self, STREAM_VERSION};

#[derive(Debug)]
pub struct Readers {
    path: PathBuf,
    busy_timeout: Duration,
    idle: Mutex<Vec<Connection>>,
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
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
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

    fn take(&self) -> Option<Connection> {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop()
    }

    fn give_back(&self, conn: Connection) {
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(conn);
    }

    fn connect(&self) -> Result<Connection, StoreError> {
        // Read-write without create plus `query_only`: a read-only open of a WAL file
        // fails when the -shm file is missing or not writable.
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(&self.path, flags).map_err(error::sqlite)?;
        schema::configure(&conn, self.busy_timeout)?;
        conn.execute_batch("PRAGMA query_only = 1; PRAGMA mmap_size = 268435456;")
            .map_err(error::sqlite)?;
        conn.set_prepared_statement_cache_capacity(32);
        Ok(conn)
    }
}

/// Reads one stream inside one read transaction, so the stream row and its events come
/// from the same snapshot.
pub fn read_stream(
    conn: &mut Connection,
    stream: &StreamId,
    read: ReadStream,
) -> Result<StreamSlice, StoreError> {
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
    let mut events = stmt
        .query_map(params![id, row::bound(read.from.0), fetch], |r| {
            row::event(r, stream.clone())
        })
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(error::sqlite)?;
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
pub fn read_all(conn: &mut Connection, read: &ReadAll) -> Result<AllSlice, StoreError> {
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
    let base = format!(
        "SELECT {EVENT_COLUMNS}, s.name FROM events e JOIN streams s ON s.id = e.stream \
         WHERE e.position >= ?1 AND e.position <= ?2"
    );
    let events = if read.filter.is_empty() {
        let sql = format!("{base} ORDER BY e.position LIMIT ?3");
        let mut stmt = conn.prepare_cached(&sql).map_err(error::sqlite)?;
        stmt.query_map(params![from_i, head_i, fetch], row::event_with_stream)
            .and_then(Iterator::collect::<Result<Vec<_>, _>>)
    } else {
        // Prefixes compare as text, never as patterns (no LIKE/GLOB escaping needed).
        let sql = format!(
            "{base} AND (?4 IS NULL OR substr(e.type, 1, length(?4)) = ?4) \
             AND (?5 IS NULL OR substr(s.name, 1, length(?5)) = ?5) ORDER BY e.position LIMIT ?3"
        );
        let mut stmt = conn.prepare_cached(&sql).map_err(error::sqlite)?;
        let filter = &read.filter;
        let type_prefix = filter
            .event_type_prefix
            .as_deref()
            .filter(|p| !p.is_empty());
        let stream_prefix = filter.stream_prefix.as_deref().filter(|p| !p.is_empty());
        stmt.query_map(
            params![from_i, head_i, fetch, type_prefix, stream_prefix],
            row::event_with_stream,
        )
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
    }
    .map_err(error::sqlite)?;
    let next = match events.last() {
        Some(last) if events.len() == limit => last.position.next(),
        _ => head.next(),
    };
    Ok(AllSlice { events, next, head })
}
