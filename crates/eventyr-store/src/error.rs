//! [`StoreError`]: every way an event store operation can fail, with a stable code and
//! whether a retry can help.

use std::sync::Arc;

use eventyr_core::{EventId, StreamId, StreamVersion, ValidationError};

use crate::types::ExpectedVersion;

/// Why an event store operation failed. Cheap to clone, because one failed group commit
/// answers every append in the group.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The stream is not at the version the writer expected. `actual` is `None` when the
    /// stream does not exist.
    #[error("wrong expected version for stream {stream}: expected {expected}, actual {}", display_version(*.actual))]
    WrongExpectedVersion {
        stream: StreamId,
        expected: ExpectedVersion,
        actual: Option<StreamVersion>,
    },
    /// The stream was deleted: it can be neither read nor appended to.
    #[error("stream {stream} is deleted")]
    StreamDeleted { stream: StreamId },
    /// The operation needs an existing stream.
    #[error("stream {stream} does not exist")]
    StreamNotFound { stream: StreamId },
    /// An event id is already stored with other content, or a retried append matches
    /// only part of what was stored.
    #[error("event {event_id} conflicts with a stored event: {message}")]
    IdempotencyConflict { event_id: EventId, message: String },
    /// The input breaks a rule; nothing was written.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The backend could not be reached or failed to write; the operation may or may not
    /// have taken effect only if `ambiguous` is true (a commit whose answer was lost).
    #[error("event store unavailable: {message}")]
    Unavailable {
        message: String,
        ambiguous: bool,
        #[source]
        source: Option<Arc<dyn std::error::Error + Send + Sync>>,
    },
    /// A read model's checkpoint was not where the writer expected: another runner
    /// applied those events. Nothing was applied.
    #[error("projection {projection}: checkpoint is at {actual}, expected {expected}")]
    CheckpointConflict {
        projection: String,
        expected: eventyr_core::Position,
        actual: eventyr_core::Position,
    },
    /// The projection has no read model serving queries yet.
    #[error("projection {projection} has no read model yet")]
    ReadModelNotFound { projection: String },
    /// The database refused a statement (bad SQL, a broken constraint): a retry will
    /// not help.
    #[error("statement failed: {message}")]
    Statement { message: String },
    /// A statement changed another number of rows than it expected
    /// ([`SqlStatement::expect_rows`](crate::sql::SqlStatement::expect_rows)); its unit
    /// was rolled back.
    #[error("expected {expected} rows changed, not {actual}, by: {sql}")]
    UnexpectedRowCount {
        sql: String,
        expected: u64,
        actual: u64,
    },
    /// The store was closed.
    #[error("event store is closed")]
    Closed,
    /// Stored data breaks an invariant; a person must look.
    #[error("event store data is corrupt: {message}")]
    Corrupt { message: String },
}

fn display_version(version: Option<StreamVersion>) -> String {
    version.map_or_else(|| "no stream".to_owned(), |v| v.to_string())
}

impl StoreError {
    /// A stable, machine-readable code for error bodies and metrics labels.
    pub fn code(&self) -> &'static str {
        match self {
            Self::WrongExpectedVersion { .. } => "wrong_expected_version",
            Self::StreamDeleted { .. } => "stream_deleted",
            Self::StreamNotFound { .. } => "stream_not_found",
            Self::IdempotencyConflict { .. } => "idempotency_conflict",
            Self::Invalid(
                ValidationError::EventTooLarge { .. }
                | ValidationError::AppendTooLarge { .. }
                | ValidationError::SnapshotTooLarge { .. },
            ) => "payload_too_large",
            Self::Invalid(_) => "invalid_input",
            Self::Unavailable { .. } => "unavailable",
            Self::CheckpointConflict { .. } => "checkpoint_conflict",
            Self::ReadModelNotFound { .. } => "not_found",
            Self::Statement { .. } => "statement_failed",
            Self::UnexpectedRowCount { .. } => "unexpected_row_count",
            Self::Closed => "closed",
            Self::Corrupt { .. } => "corrupt",
        }
    }

    /// Whether the same request may succeed later. An append that failed with
    /// [`StoreError::WrongExpectedVersion`] can succeed after reloading, which is the
    /// caller's decision, so it is not "retryable" in this sense.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }

    pub fn unavailable(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Unavailable {
            message: message.into(),
            ambiguous: false,
            source: Some(Arc::new(source)),
        }
    }

    pub fn corrupt(message: impl Into<String>) -> Self {
        Self::Corrupt {
            message: message.into(),
        }
    }
}
