//! Mapping SQLite failures onto [`StoreError`].

use eventyr_store::StoreError;
use rusqlite::ErrorCode;

/// A SQLite error as a store error. Disk, lock and I/O trouble is `Unavailable`
/// (a retry may help); a failed commit may have reached the disk, so it is ambiguous.
pub fn sqlite(error: rusqlite::Error) -> StoreError {
    let code = error.sqlite_error_code();
    let undecodable = matches!(
        error,
        rusqlite::Error::FromSqlConversionFailure(..) | rusqlite::Error::InvalidColumnType(..)
    );
    let corrupt = undecodable
        || matches!(
            code,
            Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
        );
    if corrupt {
        return StoreError::corrupt(error.to_string());
    }
    let ambiguous = matches!(code, Some(ErrorCode::SystemIoFailure));
    StoreError::Unavailable {
        message: format!("sqlite: {error}"),
        ambiguous,
        source: Some(std::sync::Arc::new(error)),
    }
}
