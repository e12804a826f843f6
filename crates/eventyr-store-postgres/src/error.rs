//! Mapping PostgreSQL failures onto [`StoreError`].

use std::sync::Arc;

use eventyr_store::StoreError;

/// A driver error as a store error: `Unavailable` (a retry may help).
pub fn postgres(error: tokio_postgres::Error) -> StoreError {
    StoreError::Unavailable {
        message: format!("postgres: {}", describe(&error)),
        ambiguous: false,
        source: Some(Arc::new(error)),
    }
}

/// A failure of a commit whose answer did not arrive: it may have taken effect.
pub fn ambiguous(error: tokio_postgres::Error) -> StoreError {
    let db_error = error.as_db_error().is_some();
    StoreError::Unavailable {
        message: format!("postgres: {}", describe(&error)),
        ambiguous: !db_error,
        source: Some(Arc::new(error)),
    }
}

pub fn pool(error: deadpool_postgres::PoolError) -> StoreError {
    StoreError::unavailable("postgres connection pool", error)
}

/// The server's message when there is one; the driver's `Display` alone says only
/// "db error".
fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => error.to_string(),
    }
}
