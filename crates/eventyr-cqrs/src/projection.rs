//! [`Projection`]: how events become rows in a read model. Pure: a projection turns an
//! event into SQL statements and never touches a database itself; the runner applies a
//! batch of statements and the checkpoint in one transaction.

use eventyr_core::RecordedEvent;
use eventyr_store::sql::SqlStatement;

/// A projection failed to turn an event into statements (a bug, or data it cannot
/// read). The runner retries the batch with backoff, then reports it in the status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ProjectionError(pub String);

impl ProjectionError {
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

/// A read model fed by events.
///
/// The SQL follows the portable rules of [`eventyr_store::sql`] so the projection
/// runs on SQLite and PostgreSQL alike. Statements may be non-idempotent
/// (`SET n = n + 1`): each event is applied exactly once.
pub trait Projection: Send + Sync + 'static {
    /// A stable name: a lowercase letter, then `[a-z0-9_]`. It names the read model.
    fn name(&self) -> &str;

    /// The event types it consumes; empty for all. Other events only move its
    /// checkpoint.
    fn event_types(&self) -> &[&str];

    /// The statements creating its tables in a new, empty read model.
    fn schema(&self) -> Vec<String>;

    /// The statements that apply one event (already at its current schema version).
    fn apply(&self, event: &RecordedEvent) -> Result<Vec<SqlStatement>, ProjectionError>;

    /// Whether it consumes events of this type.
    fn consumes(&self, event_type: &str) -> bool {
        let types = self.event_types();
        types.is_empty() || types.contains(&event_type)
    }
}
