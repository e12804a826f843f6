//! Queries over read models, with keyset paging: a limit, and an opaque cursor that
//! says where the next page starts (stable while rows are added, unlike an offset).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use eventyr_store::StoreError;
use eventyr_store::readmodel::ReadModels;
use eventyr_store::sql::{SqlRow, SqlStatement, SqlValue};

/// The most rows one page may hold.
pub const PAGE_LIMIT_MAX: usize = 1000;

/// Why a query failed.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("the cursor is not one this query handed out")]
    InvalidCursor,
    #[error("the limit must be between 1 and {PAGE_LIMIT_MAX}")]
    InvalidLimit,
    #[error("a row could not be read: {0}")]
    Row(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl QueryError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidCursor | Self::InvalidLimit => "invalid_input",
            Self::Row(_) => "unreadable_row",
            Self::Store(error) => error.code(),
        }
    }
}

/// A page of items, and the cursor of the next page if there may be one.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// A query paged by a unique, ordered key column.
#[derive(Debug, Clone)]
pub struct PagedQuery {
    pub projection: String,
    /// `SELECT … FROM …`, without `WHERE`, `ORDER BY` or `LIMIT`.
    pub select: String,
    /// An optional condition with its parameters, as `$1`, `$2`, ….
    pub filter: Option<(String, Vec<SqlValue>)>,
    /// The column that orders and pages the results; unique.
    pub key: String,
    pub limit: usize,
    /// From the previous page's `next_cursor`.
    pub cursor: Option<String>,
}

/// Fetches one page and decodes its rows with `decode`.
pub async fn fetch_page<T>(
    read_models: &dyn ReadModels,
    query: PagedQuery,
    decode: impl Fn(&SqlRow) -> Result<T, QueryError>,
) -> Result<Page<T>, QueryError> {
    if !(1..=PAGE_LIMIT_MAX).contains(&query.limit) {
        return Err(QueryError::InvalidLimit);
    }
    let (mut conditions, mut params) = match query.filter {
        Some((condition, params)) => (vec![format!("({condition})")], params),
        None => (Vec::new(), Vec::new()),
    };
    if let Some(cursor) = &query.cursor {
        params.push(decode_cursor(cursor)?);
        conditions.push(format!("{} > ${}", query.key, params.len()));
    }
    let filter = if conditions.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conditions.join(" AND "))
    };
    let sql = format!(
        "{}{filter} ORDER BY {} LIMIT {}",
        query.select,
        query.key,
        query.limit + 1
    );
    let mut rows = read_models
        .query(&query.projection, SqlStatement::with_params(sql, params))
        .await?;
    let more = rows.len() > query.limit;
    rows.truncate(query.limit);
    let next_cursor = match rows.last() {
        Some(last) if more => {
            let key = last
                .get(&query.key)
                .ok_or_else(|| QueryError::Row(format!("no column {}", query.key)))?;
            Some(encode_cursor(key))
        }
        _ => None,
    };
    let items = rows.iter().map(decode).collect::<Result<Vec<_>, _>>()?;
    Ok(Page { items, next_cursor })
}

fn encode_cursor(key: &SqlValue) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(key).unwrap_or_default())
}

fn decode_cursor(cursor: &str) -> Result<SqlValue, QueryError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(cursor)
        .map_err(|_| QueryError::InvalidCursor)?;
    match serde_json::from_slice(&bytes) {
        Ok(value @ (SqlValue::Int(_) | SqlValue::Text(_))) => Ok(value),
        _ => Err(QueryError::InvalidCursor),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        for key in [SqlValue::Int(-4), SqlValue::Text("acct-7 ✓".into())] {
            assert_eq!(decode_cursor(&encode_cursor(&key)).unwrap(), key);
        }
        for garbage in [
            "",
            "!!!",
            &URL_SAFE_NO_PAD.encode(b"{\"x\":1}"),
            &URL_SAFE_NO_PAD.encode(b"1.5"),
        ] {
            assert!(
                matches!(decode_cursor(garbage), Err(QueryError::InvalidCursor)),
                "{garbage:?}"
            );
        }
    }
}
