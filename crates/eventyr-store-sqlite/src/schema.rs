//! The SQLite schema, its migrations, and the connection settings.
//!
//! `events.position` is the rowid, so `$all` reads walk the table in storage order.
//! Stream names live once in `streams`; events refer to them by integer id, which keeps
//! the `(stream, version)` index small. `meta.next_position` is the global position
//! counter: positions are never reused, even when the last events are erased.

use std::time::Duration;

use rusqlite::{Connection, TransactionBehavior};

use crate::error;
use eventyr_store::StoreError;

/// The schema version this code writes and reads (`PRAGMA user_version`).
pub const SCHEMA_VERSION: i64 = 2;

const SCHEMA_V1: &str = "
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO meta (key, value) VALUES ('next_position', 1);

CREATE TABLE streams (
    id              INTEGER PRIMARY KEY,
    name            TEXT NOT NULL UNIQUE,
    -- The version when the row last changed; see STREAM_VERSION.
    version         INTEGER,
    truncate_before INTEGER NOT NULL DEFAULT 0,
    deleted         INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE events (
    position       INTEGER PRIMARY KEY,
    event_id       BLOB NOT NULL,
    stream         INTEGER NOT NULL,
    version        INTEGER NOT NULL,
    type           TEXT NOT NULL,
    schema_version INTEGER NOT NULL,
    data           BLOB NOT NULL,
    correlation_id TEXT,
    causation_id   TEXT,
    traceparent    TEXT,
    user_id        TEXT,
    recorded_at    INTEGER NOT NULL
);
CREATE UNIQUE INDEX events_event_id ON events (event_id);
CREATE UNIQUE INDEX events_stream_version ON events (stream, version);
";

/// Version 2: aggregate snapshots, one per stream, beside the events.
const SCHEMA_V2: &str = "
CREATE TABLE snapshots (
    stream         INTEGER PRIMARY KEY,
    version        INTEGER NOT NULL,
    schema_version INTEGER NOT NULL,
    data           BLOB NOT NULL,
    taken_at       INTEGER NOT NULL
);
";

/// A stream's version, for a query over `streams s`: the version of its last event, or
/// the version its row recorded when events were erased, whichever is higher; -1 for
/// none. Appends do not touch the row (see the writer), so the index on
/// `(stream, version)` is the source of truth while events exist.
pub const STREAM_VERSION: &str = "max(coalesce(s.version, -1), \
     coalesce((SELECT max(e.version) FROM events e WHERE e.stream = s.id), -1))";

/// Settings for every connection: WAL so readers never block the writer, and a busy
/// timeout so another process's write lock is waited for rather than failed on.
pub fn configure(conn: &Connection, busy_timeout: Duration) -> Result<(), StoreError> {
    conn.busy_timeout(busy_timeout).map_err(error::sqlite)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA temp_store = MEMORY;
         PRAGMA cache_size = -32768;",
    )
    .map_err(error::sqlite)
}

/// Settings for the writer: commits write the WAL without flushing it; the syncer
/// flushes before anything is acknowledged (see [`crate::syncer`]). Checkpoints still
/// flush the WAL before and the database after.
pub fn configure_writer(conn: &Connection) -> Result<(), StoreError> {
    conn.execute_batch("PRAGMA synchronous = NORMAL;")
        .map_err(error::sqlite)
}

/// Brings the database to [`SCHEMA_VERSION`], under the write lock so that two
/// processes opening a new file at once do not both create it.
pub fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(error::sqlite)?;
    let version: i64 = tx
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(error::sqlite)?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::corrupt(format!(
            "the database has schema version {version}; this eventyr understands up to {SCHEMA_VERSION}"
        )));
    }
    for (target, migration) in [(1, SCHEMA_V1), (2, SCHEMA_V2)] {
        if version < target {
            tx.execute_batch(migration).map_err(error::sqlite)?;
        }
    }
    tx.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))
        .map_err(error::sqlite)?;
    tx.commit().map_err(error::sqlite)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_1_file_is_migrated_and_a_newer_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(dir.path().join("v1.db")).unwrap();
        conn.execute_batch(SCHEMA_V1).unwrap();
        conn.execute_batch("PRAGMA user_version = 1").unwrap();
        migrate(&mut conn).unwrap();
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let snapshots: i64 = conn
            .query_row("SELECT count(*) FROM snapshots", [], |r| r.get(0))
            .unwrap();
        assert_eq!(snapshots, 0);
        migrate(&mut conn).expect("migrating twice is a no-op");
        conn.execute_batch("PRAGMA user_version = 99").unwrap();
        let newer = migrate(&mut conn).unwrap_err();
        assert_eq!(newer.code(), "corrupt");
    }
}
