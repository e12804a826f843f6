//! [`BusError`]: how the bus's own machinery fails (a handler's failures are
//! [`HandlerError`](crate::HandlerError)s, decided by the handler).

use std::sync::Arc;

use eventyr_store::StoreError;

/// Why a bus operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BusError {
    /// The broker or a database could not be reached, or did not answer in time; the
    /// operation may be retried.
    #[error("bus unavailable: {message}")]
    Unavailable {
        message: String,
        #[source]
        source: Option<Arc<dyn std::error::Error + Send + Sync>>,
    },
    /// A store or an inbox failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A name, option or request breaks a rule.
    #[error("{message}")]
    Invalid { message: String },
    /// No such dead letter, consumer or stream.
    #[error("{what} not found")]
    NotFound { what: String },
    /// The component was shut down.
    #[error("the bus is closed")]
    Closed,
}

impl BusError {
    pub fn unavailable(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Unavailable {
            message: message.into(),
            source: Some(Arc::new(source)),
        }
    }

    /// A stable, machine-readable code for error bodies and logs.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unavailable { .. } => "unavailable",
            Self::Store(error) => error.code(),
            Self::Invalid { .. } => "invalid_input",
            Self::NotFound { .. } => "not_found",
            Self::Closed => "closed",
        }
    }

    /// Whether the same operation may succeed later.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Unavailable { .. } => true,
            Self::Store(error) => error.is_retryable(),
            _ => false,
        }
    }
}
