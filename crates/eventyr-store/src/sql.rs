//! Portable SQL as data: statements with typed parameters, and result rows.
//!
//! Read models live in SQLite (embedded) or PostgreSQL (distributed). Projections do
//! not touch a database: they return [`SqlStatement`]s, and the read-model backend
//! runs them. Written within these rules, one statement runs on both:
//! - placeholders are `$1`, `$2`, … (SQLite gets them as `?1`, `?2`, …);
//! - column types are `BIGINT`, `DOUBLE PRECISION`, `TEXT` and `BYTEA` (booleans as
//!   `BIGINT` 0/1);
//! - upserts use `INSERT … ON CONFLICT (…) DO UPDATE SET x = excluded.x`.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// A value bound to a placeholder or read from a column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SqlValue {
    Null,
    Int(i64),
    Float(f64),
    Text(String),
    Bytes(Vec<u8>),
}

impl SqlValue {
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Self::Int(value) => Some(*value),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Self::Float(value) => Some(*value),
            Self::Int(value) => Some(*value as f64),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::Text(value) => Some(value),
            _ => None,
        }
    }

    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Self::Bytes(value) => Some(value),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Self::Null)
    }
}

macro_rules! from_int {
    ($($t:ty),*) => {$(
        impl From<$t> for SqlValue {
            fn from(value: $t) -> Self {
                Self::Int(i64::from(value))
            }
        }
    )*};
}
from_int!(i64, i32, u32, i16, u16, u8, bool);

impl From<f64> for SqlValue {
    fn from(value: f64) -> Self {
        Self::Float(value)
    }
}

impl From<String> for SqlValue {
    fn from(value: String) -> Self {
        Self::Text(value)
    }
}

impl From<&str> for SqlValue {
    fn from(value: &str) -> Self {
        Self::Text(value.to_owned())
    }
}

impl From<Vec<u8>> for SqlValue {
    fn from(value: Vec<u8>) -> Self {
        Self::Bytes(value)
    }
}

impl<T: Into<SqlValue>> From<Option<T>> for SqlValue {
    fn from(value: Option<T>) -> Self {
        value.map_or(Self::Null, Into::into)
    }
}

/// One statement with its parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct SqlStatement {
    pub sql: String,
    pub params: Vec<SqlValue>,
    /// How many rows the statement must change; any other count rolls back its unit
    /// with [`StoreError::UnexpectedRowCount`](crate::StoreError::UnexpectedRowCount).
    /// A conditional write (`UPDATE … WHERE version = $1`, `INSERT … ON CONFLICT DO
    /// NOTHING`) becomes a check inside the transaction.
    pub expect_rows: Option<u64>,
}

impl SqlStatement {
    pub fn new(sql: impl Into<String>) -> Self {
        Self::with_params(sql, Vec::new())
    }

    pub fn with_params(sql: impl Into<String>, params: Vec<SqlValue>) -> Self {
        Self {
            sql: sql.into(),
            params,
            expect_rows: None,
        }
    }

    /// Requires the statement to change exactly `rows` rows.
    pub fn expect_rows(mut self, rows: u64) -> Self {
        self.expect_rows = Some(rows);
        self
    }

    /// Checks the number of rows the statement changed against its expectation.
    pub fn check_rows(&self, rows: u64) -> Result<(), crate::StoreError> {
        match self.expect_rows {
            Some(expected) if expected != rows => Err(crate::StoreError::UnexpectedRowCount {
                sql: self.sql.clone(),
                expected,
                actual: rows,
            }),
            _ => Ok(()),
        }
    }

    /// Binds the next placeholder.
    pub fn bind(mut self, value: impl Into<SqlValue>) -> Self {
        self.params.push(value.into());
        self
    }
}

/// A result row: values by column.
#[derive(Clone, PartialEq)]
pub struct SqlRow {
    columns: Arc<[String]>,
    values: Vec<SqlValue>,
}

impl SqlRow {
    pub fn new(columns: Arc<[String]>, values: Vec<SqlValue>) -> Self {
        Self { columns, values }
    }

    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    pub fn values(&self) -> &[SqlValue] {
        &self.values
    }

    /// The value of `column`, `None` if the row has no such column.
    pub fn get(&self, column: &str) -> Option<&SqlValue> {
        let index = self.columns.iter().position(|c| c == column)?;
        self.values.get(index)
    }

    pub fn int(&self, column: &str) -> Option<i64> {
        self.get(column).and_then(SqlValue::as_i64)
    }

    pub fn text(&self, column: &str) -> Option<&str> {
        self.get(column).and_then(SqlValue::as_str)
    }
}

impl fmt::Debug for SqlRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.columns.iter().zip(&self.values))
            .finish()
    }
}

/// Rewrites `$N` placeholders as `?N` (for SQLite), outside quoted strings and
/// identifiers. SQLite would otherwise take `$2` as a *named* parameter and number it
/// by first appearance, binding `$2 … $1` in the wrong order.
pub fn question_mark_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut quote: Option<char> = None;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '\'' || c == '"' => quote = Some(c),
            None if c == '$' && chars.peek().is_some_and(char::is_ascii_digit) => {
                out.push('?');
                continue;
            }
            None => {}
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_rewritten_outside_quotes_only() {
        assert_eq!(
            question_mark_placeholders(
                r#"UPDATE t SET a = $2, "b$1" = 'x$1' WHERE id = $1 AND c = $10"#
            ),
            r#"UPDATE t SET a = ?2, "b$1" = 'x$1' WHERE id = ?1 AND c = ?10"#
        );
        assert_eq!(
            question_mark_placeholders("SELECT '$' || $1"),
            "SELECT '$' || ?1"
        );
    }

    #[test]
    fn rows_find_values_by_column() {
        let row = SqlRow::new(
            Arc::from(vec!["id".to_owned(), "n".to_owned()]),
            vec![SqlValue::from("a"), SqlValue::from(5)],
        );
        assert_eq!(
            (row.text("id"), row.int("n"), row.get("missing")),
            (Some("a"), Some(5), None)
        );
        assert_eq!(SqlValue::from(Option::<i64>::None), SqlValue::Null);
        assert_eq!(SqlValue::from(true), SqlValue::Int(1));
    }
}
