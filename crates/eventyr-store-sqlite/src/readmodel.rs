//! Read models in SQLite: one file per projection generation, and a catalog.
//!
//! `<dir>/catalog.db` records each projection's generations and which one serves
//! queries; `<dir>/<projection>.<generation>.db` holds a generation's tables and its
//! checkpoint row. Read models are derived data: they run with `synchronous = NORMAL`
//! (a power cut may drop the last batches, never half of one, and the checkpoint goes
//! back with them, so they are applied again). State that cannot be derived again (a
//! consumer's inbox) opens its directory with [`SqliteReadModels::open_durable`]:
//! `synchronous = FULL`, every commit flushed before it returns.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use eventyr_core::Position;
use eventyr_store::StoreError;
use eventyr_store::readmodel::{
    Generation, ReadModelInfo, ReadModels, check_projection_name, generation_not_found,
    group_generations, is_unit_error,
};
use eventyr_store::sql::{SqlRow, SqlStatement, SqlValue, question_mark_placeholders};
use rusqlite::types::{ToSqlOutput, Value, ValueRef};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params, params_from_iter};

use crate::{error, schema};

const CATALOG: &str = "
CREATE TABLE IF NOT EXISTS generations (
    projection TEXT NOT NULL,
    generation INTEGER NOT NULL,
    PRIMARY KEY (projection, generation)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS current (
    projection TEXT PRIMARY KEY,
    generation INTEGER NOT NULL
) WITHOUT ROWID;
";

const CHECKPOINT: &str = "
CREATE TABLE eventyr_checkpoint (id INTEGER PRIMARY KEY CHECK (id = 1), position INTEGER NOT NULL);
INSERT INTO eventyr_checkpoint (id, position) VALUES (1, 0);
";

const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Projection read models in a directory of SQLite files. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SqliteReadModels {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    /// Commits are flushed before they return (`synchronous = FULL`).
    durable: bool,
    catalog: Mutex<Connection>,
    /// Open generations, by projection and generation.
    open: Mutex<HashMap<(String, Generation), Shared>>,
}

/// A connection shared by the operations on one generation.
type Shared = Arc<Mutex<Connection>>;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl SqliteReadModels {
    /// Opens (creating) the read models kept in `dir`: derived data, commits not
    /// flushed one by one.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        Self::open_with(dir.into(), false)
    }

    /// Opens (creating) models kept in `dir` whose every commit is flushed before it
    /// returns: for state that cannot be derived again, such as inboxes.
    pub fn open_durable(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        Self::open_with(dir.into(), true)
    }

    fn open_with(dir: PathBuf, durable: bool) -> Result<Self, StoreError> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| StoreError::unavailable(format!("cannot create {}", dir.display()), e))?;
        let catalog = connect(&dir.join("catalog.db"), durable)?;
        catalog.execute_batch(CATALOG).map_err(error::sqlite)?;
        Ok(Self {
            inner: Arc::new(Inner {
                dir,
                durable,
                catalog: Mutex::new(catalog),
                open: Mutex::new(HashMap::new()),
            }),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || work(&inner))
            .await
            .map_err(|e| StoreError::unavailable("a read-model task failed", e))?
    }
}

fn connect(path: &Path, durable: bool) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(error::sqlite)?;
    schema::configure(&conn, BUSY_TIMEOUT)?;
    conn.execute_batch(if durable {
        "PRAGMA synchronous = FULL;"
    } else {
        "PRAGMA synchronous = NORMAL;"
    })
    .map_err(error::sqlite)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// A database error caused by the statement (bad SQL, a broken constraint, a wrong
/// parameter) rather than by the database being unavailable.
fn statement_error(error: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode::{ConstraintViolation, TypeMismatch, Unknown};
    let caused_by_statement = matches!(
        error.sqlite_error_code(),
        Some(ConstraintViolation | TypeMismatch | Unknown)
    ) || matches!(
        error,
        rusqlite::Error::InvalidParameterCount(..)
            | rusqlite::Error::InvalidParameterName(_)
            | rusqlite::Error::ToSqlConversionFailure(_)
            | rusqlite::Error::MultipleStatement
            | rusqlite::Error::SqlInputError { .. }
    );
    if caused_by_statement {
        StoreError::Statement {
            message: error.to_string(),
        }
    } else {
        error::sqlite(error)
    }
}

fn param(value: &SqlValue) -> ToSqlOutput<'_> {
    ToSqlOutput::Borrowed(match value {
        SqlValue::Null => ValueRef::Null,
        SqlValue::Int(v) => ValueRef::Integer(*v),
        SqlValue::Float(v) => ValueRef::Real(*v),
        SqlValue::Text(v) => ValueRef::Text(v.as_bytes()),
        SqlValue::Bytes(v) => ValueRef::Blob(v),
    })
}

fn value(value: Value) -> SqlValue {
    match value {
        Value::Null => SqlValue::Null,
        Value::Integer(v) => SqlValue::Int(v),
        Value::Real(v) => SqlValue::Float(v),
        Value::Text(v) => SqlValue::Text(v),
        Value::Blob(v) => SqlValue::Bytes(v),
    }
}

impl Inner {
    fn file(&self, projection: &str, generation: Generation) -> PathBuf {
        self.dir.join(format!("{projection}.{generation}.db"))
    }

    /// The (cached) connection to a generation the catalog knows.
    fn generation(&self, projection: &str, generation: Generation) -> Result<Shared, StoreError> {
        let key = (projection.to_owned(), generation);
        if let Some(conn) = lock(&self.open).get(&key) {
            return Ok(Arc::clone(conn));
        }
        known(&lock(&self.catalog), projection, generation)?;
        let conn = Arc::new(Mutex::new(connect(
            &self.file(projection, generation),
            self.durable,
        )?));
        lock(&self.open).insert(key, Arc::clone(&conn));
        Ok(conn)
    }

    fn current(&self, projection: &str) -> Result<Option<Generation>, StoreError> {
        let current: Option<i64> = lock(&self.catalog)
            .query_row(
                "SELECT generation FROM current WHERE projection = ?1",
                [projection],
                |r| r.get(0),
            )
            .optional()
            .map_err(error::sqlite)?;
        Ok(current.map(|g| Generation(g.unsigned_abs())))
    }

    fn create(&self, projection: &str, schema: &[String]) -> Result<Generation, StoreError> {
        let generation = {
            let mut catalog = lock(&self.catalog);
            let tx = catalog
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(error::sqlite)?;
            let last: i64 = tx
                .query_row(
                    "SELECT coalesce(max(generation), 0) FROM generations WHERE projection = ?1",
                    [projection],
                    |r| r.get(0),
                )
                .map_err(error::sqlite)?;
            tx.execute(
                "INSERT INTO generations (projection, generation) VALUES (?1, ?2)",
                params![projection, last + 1],
            )
            .map_err(error::sqlite)?;
            tx.commit().map_err(error::sqlite)?;
            Generation(last.unsigned_abs() + 1)
        };
        let path = self.file(projection, generation);
        remove_files(&path);
        let built = connect(&path, self.durable).and_then(|mut conn| {
            let tx = conn.transaction().map_err(error::sqlite)?;
            for statement in schema {
                tx.execute_batch(statement).map_err(statement_error)?;
            }
            tx.execute_batch(CHECKPOINT).map_err(error::sqlite)?;
            tx.commit().map_err(error::sqlite)
        });
        if let Err(failure) = built {
            let _ = self.forget(projection, generation);
            return Err(failure);
        }
        Ok(generation)
    }

    fn promote(&self, projection: &str, generation: Generation) -> Result<(), StoreError> {
        let dropped: Vec<i64> = {
            let mut catalog = lock(&self.catalog);
            let tx = catalog
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(error::sqlite)?;
            // Checked under the catalog's write lock: a concurrent promote of a newer
            // generation has either dropped this one already or waits for us.
            known(&tx, projection, generation)?;
            let older = tx
                .prepare(
                    "SELECT generation FROM generations WHERE projection = ?1 AND generation < ?2",
                )
                .and_then(|mut s| {
                    s.query_map(params![projection, counter(generation.0)], |r| r.get(0))?
                        .collect::<Result<Vec<i64>, _>>()
                })
                .map_err(error::sqlite)?;
            tx.execute(
                "INSERT INTO current (projection, generation) VALUES (?1, ?2) \
                 ON CONFLICT (projection) DO UPDATE SET generation = excluded.generation",
                params![projection, counter(generation.0)],
            )
            .map_err(error::sqlite)?;
            tx.execute(
                "DELETE FROM generations WHERE projection = ?1 AND generation < ?2",
                params![projection, counter(generation.0)],
            )
            .map_err(error::sqlite)?;
            tx.commit().map_err(error::sqlite)?;
            older
        };
        for old in dropped {
            let old = Generation(old.unsigned_abs());
            lock(&self.open).remove(&(projection.to_owned(), old));
            remove_files(&self.file(projection, old));
        }
        Ok(())
    }

    fn adopt(&self, projection: &str, generation: Generation) -> Result<Generation, StoreError> {
        let mut catalog = lock(&self.catalog);
        let tx = catalog
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(error::sqlite)?;
        known(&tx, projection, generation)?;
        tx.execute(
            "INSERT INTO current (projection, generation) VALUES (?1, ?2) \
             ON CONFLICT (projection) DO NOTHING",
            params![projection, counter(generation.0)],
        )
        .map_err(error::sqlite)?;
        let serving: i64 = tx
            .query_row(
                "SELECT generation FROM current WHERE projection = ?1",
                [projection],
                |r| r.get(0),
            )
            .map_err(error::sqlite)?;
        tx.commit().map_err(error::sqlite)?;
        Ok(Generation(serving.unsigned_abs()))
    }

    /// Removes a generation from the catalog and its files.
    fn forget(&self, projection: &str, generation: Generation) -> Result<(), StoreError> {
        lock(&self.catalog)
            .execute(
                "DELETE FROM generations WHERE projection = ?1 AND generation = ?2",
                params![projection, counter(generation.0)],
            )
            .map_err(error::sqlite)?;
        lock(&self.open).remove(&(projection.to_owned(), generation));
        remove_files(&self.file(projection, generation));
        Ok(())
    }

    fn checkpoint(&self, projection: &str, generation: Generation) -> Result<Position, StoreError> {
        let conn = self.generation(projection, generation)?;
        let position: i64 = lock(&conn)
            .query_row(
                "SELECT position FROM eventyr_checkpoint WHERE id = 1",
                [],
                |r| r.get(0),
            )
            .map_err(error::sqlite)?;
        Ok(Position(position.unsigned_abs()))
    }

    fn apply(
        &self,
        projection: &str,
        generation: Generation,
        statements: &[SqlStatement],
        from: Position,
        to: Position,
    ) -> Result<(), StoreError> {
        let conn = self.generation(projection, generation)?;
        let mut conn = lock(&conn);
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(error::sqlite)?;
        let at: i64 = tx
            .query_row(
                "SELECT position FROM eventyr_checkpoint WHERE id = 1",
                [],
                |r| r.get(0),
            )
            .map_err(error::sqlite)?;
        if at.unsigned_abs() != from.0 {
            return Err(StoreError::CheckpointConflict {
                projection: projection.to_owned(),
                expected: from,
                actual: Position(at.unsigned_abs()),
            });
        }
        run(&tx, statements)?;
        tx.execute(
            "UPDATE eventyr_checkpoint SET position = ?1 WHERE id = 1",
            [counter(to.0)],
        )
        .map_err(error::sqlite)?;
        tx.commit().map_err(error::sqlite)
    }

    fn execute(
        &self,
        projection: &str,
        generation: Generation,
        units: &[Vec<SqlStatement>],
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        let conn = self.generation(projection, generation)?;
        let mut conn = lock(&conn);
        let mut tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(error::sqlite)?;
        let mut results = Vec::with_capacity(units.len());
        for unit in units {
            let savepoint = tx.savepoint().map_err(error::sqlite)?;
            match run(&savepoint, unit) {
                Ok(()) => {
                    savepoint.commit().map_err(error::sqlite)?;
                    results.push(Ok(()));
                }
                Err(error) if is_unit_error(&error) => {
                    // Dropping the savepoint rolls it back.
                    drop(savepoint);
                    results.push(Err(error));
                }
                Err(error) => return Err(error),
            }
        }
        tx.commit().map_err(error::sqlite)?;
        Ok(results)
    }

    fn query(&self, projection: &str, statement: &SqlStatement) -> Result<Vec<SqlRow>, StoreError> {
        let generation =
            self.current(projection)?
                .ok_or_else(|| StoreError::ReadModelNotFound {
                    projection: projection.to_owned(),
                })?;
        let conn = self.generation(projection, generation)?;
        let conn = lock(&conn);
        let mut prepared = conn
            .prepare_cached(&question_mark_placeholders(&statement.sql))
            .map_err(statement_error)?;
        let columns: Arc<[String]> = prepared.column_names().map(str::to_owned).collect();
        let width = columns.len();
        let mut rows = prepared
            .query(params_from_iter(statement.params.iter().map(param)))
            .map_err(statement_error)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(statement_error)? {
            let values = (0..width)
                .map(|i| row.get::<_, Value>(i).map(value))
                .collect::<Result<Vec<_>, _>>()
                .map_err(error::sqlite)?;
            out.push(SqlRow::new(Arc::clone(&columns), values));
        }
        Ok(out)
    }

    fn list(&self) -> Result<Vec<ReadModelInfo>, StoreError> {
        let rows: Vec<(String, i64, Option<i64>)> = lock(&self.catalog)
            .prepare(
                "SELECT g.projection, g.generation, c.generation FROM generations g \
                 LEFT JOIN current c ON c.projection = g.projection ORDER BY g.projection, g.generation",
            )
            .and_then(|mut s| {
                s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect::<Result<Vec<_>, _>>()
            })
            .map_err(error::sqlite)?;
        let mut grouped = Vec::with_capacity(rows.len());
        for (projection, generation, current) in rows {
            let generation = Generation(generation.unsigned_abs());
            let current = current.map(|g| Generation(g.unsigned_abs()));
            // A generation the catalog holds but whose file was never finished (the
            // process died in `create`, between the catalog and the file) is listed at
            // the start; the next promotion drops it. The current one must read.
            let checkpoint = match self.checkpoint(&projection, generation) {
                Ok(checkpoint) => checkpoint,
                Err(_) if current != Some(generation) => Position(0),
                Err(error) => return Err(error),
            };
            grouped.push((projection, generation, current, checkpoint));
        }
        Ok(group_generations(grouped))
    }
}

/// Fails unless the catalog holds this generation.
fn known(catalog: &Connection, projection: &str, generation: Generation) -> Result<(), StoreError> {
    let found: Option<i64> = catalog
        .query_row(
            "SELECT generation FROM generations WHERE projection = ?1 AND generation = ?2",
            params![projection, counter(generation.0)],
            |r| r.get(0),
        )
        .optional()
        .map_err(error::sqlite)?;
    found
        .map(drop)
        .ok_or_else(|| generation_not_found(projection, generation))
}

/// Runs statements in order, checking each one's row expectation.
fn run(conn: &Connection, statements: &[SqlStatement]) -> Result<(), StoreError> {
    for statement in statements {
        let mut prepared = conn
            .prepare_cached(&question_mark_placeholders(&statement.sql))
            .map_err(statement_error)?;
        let rows = prepared
            .execute(params_from_iter(statement.params.iter().map(param)))
            .map_err(statement_error)?;
        statement.check_rows(rows as u64)?;
    }
    Ok(())
}

fn counter(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn remove_files(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        let _ = std::fs::remove_file(file);
    }
}

#[async_trait]
impl ReadModels for SqliteReadModels {
    async fn current(&self, projection: &str) -> Result<Option<Generation>, StoreError> {
        check_projection_name(projection)?;
        let projection = projection.to_owned();
        self.blocking(move |inner| inner.current(&projection)).await
    }

    async fn create(&self, projection: &str, schema: &[String]) -> Result<Generation, StoreError> {
        check_projection_name(projection)?;
        let (projection, schema) = (projection.to_owned(), schema.to_vec());
        self.blocking(move |inner| inner.create(&projection, &schema))
            .await
    }

    async fn promote(&self, projection: &str, generation: Generation) -> Result<(), StoreError> {
        check_projection_name(projection)?;
        let projection = projection.to_owned();
        self.blocking(move |inner| inner.promote(&projection, generation))
            .await
    }

    async fn adopt(
        &self,
        projection: &str,
        generation: Generation,
    ) -> Result<Generation, StoreError> {
        check_projection_name(projection)?;
        let projection = projection.to_owned();
        self.blocking(move |inner| inner.adopt(&projection, generation))
            .await
    }

    async fn discard(&self, projection: &str, generation: Generation) -> Result<(), StoreError> {
        check_projection_name(projection)?;
        let projection = projection.to_owned();
        self.blocking(move |inner| {
            if inner.current(&projection)? == Some(generation) {
                return Err(StoreError::Statement {
                    message: format!("generation {generation} of {projection} serves queries; promote another first"),
                });
            }
            inner.forget(&projection, generation)
        })
        .await
    }

    async fn checkpoint(
        &self,
        projection: &str,
        generation: Generation,
    ) -> Result<Position, StoreError> {
        check_projection_name(projection)?;
        let projection = projection.to_owned();
        self.blocking(move |inner| inner.checkpoint(&projection, generation))
            .await
    }

    async fn apply(
        &self,
        projection: &str,
        generation: Generation,
        statements: Vec<SqlStatement>,
        from: Position,
        to: Position,
    ) -> Result<(), StoreError> {
        check_projection_name(projection)?;
        let projection = projection.to_owned();
        self.blocking(move |inner| inner.apply(&projection, generation, &statements, from, to))
            .await
    }

    async fn execute(
        &self,
        projection: &str,
        generation: Generation,
        units: Vec<Vec<SqlStatement>>,
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        check_projection_name(projection)?;
        let projection = projection.to_owned();
        self.blocking(move |inner| inner.execute(&projection, generation, &units))
            .await
    }

    async fn query(
        &self,
        projection: &str,
        statement: SqlStatement,
    ) -> Result<Vec<SqlRow>, StoreError> {
        check_projection_name(projection)?;
        let projection = projection.to_owned();
        self.blocking(move |inner| inner.query(&projection, &statement))
            .await
    }

    async fn list(&self) -> Result<Vec<ReadModelInfo>, StoreError> {
        self.blocking(Inner::list).await
    }
}
