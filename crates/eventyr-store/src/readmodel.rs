//! [`ReadModels`]: where projections keep their read models, in SQL, with their
//! checkpoints beside them.
//!
//! Each projection has *generations*: a generation is a private database (a SQLite
//! file, a PostgreSQL schema) holding the projection's tables and its checkpoint.
//! One generation serves queries; a rebuild fills a new one from position 0 while the
//! old one keeps serving, then [`ReadModels::promote`] swaps them. A batch of
//! statements and the move of the checkpoint commit together
//! ([`ReadModels::apply`]), so a crash can neither skip nor repeat an event.

use std::fmt;

use async_trait::async_trait;
use eventyr_core::{Position, ValidationError};
use serde::{Deserialize, Serialize};

use crate::error::StoreError;
use crate::sql::{SqlRow, SqlStatement};

/// The longest projection name.
const PROJECTION_NAME_LEN_MAX: usize = 40;

/// One generation of a projection's read model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Generation(pub u64);

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What a read-model store knows of a projection without its code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadModelInfo {
    pub projection: String,
    /// The generation serving queries, if one was promoted.
    pub current: Option<Generation>,
    /// Every generation with its checkpoint, oldest first.
    pub generations: Vec<(Generation, Position)>,
}

/// Groups catalog rows `(projection, generation, current, checkpoint)`, ordered by
/// projection then generation, into one [`ReadModelInfo`] per projection.
pub fn group_generations(
    rows: impl IntoIterator<Item = (String, Generation, Option<Generation>, Position)>,
) -> Vec<ReadModelInfo> {
    let mut infos: Vec<ReadModelInfo> = Vec::new();
    for (projection, generation, current, checkpoint) in rows {
        match infos
            .last_mut()
            .filter(|info| info.projection == projection)
        {
            Some(info) => info.generations.push((generation, checkpoint)),
            None => infos.push(ReadModelInfo {
                projection,
                current,
                generations: vec![(generation, checkpoint)],
            }),
        }
    }
    infos
}

/// The error for a generation the catalog does not hold (never created, or dropped
/// when a newer one was promoted).
pub fn generation_not_found(projection: &str, generation: Generation) -> StoreError {
    StoreError::ReadModelNotFound {
        projection: format!("{projection} (generation {generation})"),
    }
}

/// Whether a unit's error is its own doing (a refused statement or an unmet row
/// expectation), so that [`ReadModels::execute`] rolls back that unit alone; any other
/// error aborts the whole transaction.
pub fn is_unit_error(error: &StoreError) -> bool {
    matches!(
        error,
        StoreError::Statement { .. } | StoreError::UnexpectedRowCount { .. }
    )
}

/// Checks a projection name: a lowercase letter, then lowercase letters, digits and
/// `_`, at most 40 in all. It names files and schemas, so nothing else is allowed.
pub fn check_projection_name(name: &str) -> Result<(), ValidationError> {
    if name.is_empty() {
        return Err(ValidationError::Empty {
            field: "projection",
        });
    }
    if name.len() > PROJECTION_NAME_LEN_MAX {
        return Err(ValidationError::TooLong {
            field: "projection",
            len: name.len(),
            max: PROJECTION_NAME_LEN_MAX,
        });
    }
    let valid = name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !valid {
        return Err(ValidationError::InvalidId {
            field: "projection",
            message: format!("{name:?} must be a lowercase letter then [a-z0-9_]"),
        });
    }
    Ok(())
}

/// A store of projection read models. Backends: SQLite files, PostgreSQL schemas.
#[async_trait]
pub trait ReadModels: Send + Sync + fmt::Debug {
    /// The generation serving queries of `projection`, if any.
    async fn current(&self, projection: &str) -> Result<Option<Generation>, StoreError>;

    /// Creates an empty generation: runs `schema` (the projection's DDL) in it and sets
    /// its checkpoint to 0. It serves no query until promoted.
    async fn create(&self, projection: &str, schema: &[String]) -> Result<Generation, StoreError>;

    /// Makes `generation` serve queries and drops every older generation. A generation
    /// older than the one serving was dropped when that one was promoted, so promoting
    /// it fails with [`StoreError::ReadModelNotFound`].
    async fn promote(&self, projection: &str, generation: Generation) -> Result<(), StoreError>;

    /// Makes `generation` serve queries if no generation serves yet, and returns the
    /// one that serves. It drops nothing: when two instances create a first generation
    /// at once, both adopt the same one and the other discards its own.
    async fn adopt(
        &self,
        projection: &str,
        generation: Generation,
    ) -> Result<Generation, StoreError>;

    /// Drops a generation that will not be promoted.
    async fn discard(&self, projection: &str, generation: Generation) -> Result<(), StoreError>;

    /// The position up to which a generation has applied events.
    async fn checkpoint(
        &self,
        projection: &str,
        generation: Generation,
    ) -> Result<Position, StoreError>;

    /// Runs `statements` and moves the checkpoint from `from` to `to`, in one
    /// transaction. If the checkpoint is not at `from` (another runner moved it),
    /// nothing is applied and the error is [`StoreError::CheckpointConflict`].
    async fn apply(
        &self,
        projection: &str,
        generation: Generation,
        statements: Vec<SqlStatement>,
        from: Position,
        to: Position,
    ) -> Result<(), StoreError>;

    /// Runs units of statements in one transaction, each unit under its own savepoint:
    /// a unit whose statement fails or changes another number of rows than it expects
    /// ([`SqlStatement::expect_rows`]) is rolled back alone and its error returned in
    /// its place; the others commit together (one flush for all). The checkpoint does
    /// not move. The outer error means nothing was committed.
    async fn execute(
        &self,
        projection: &str,
        generation: Generation,
        units: Vec<Vec<SqlStatement>>,
    ) -> Result<Vec<Result<(), StoreError>>, StoreError>;

    /// Runs a query on the generation serving `projection`.
    async fn query(
        &self,
        projection: &str,
        statement: SqlStatement,
    ) -> Result<Vec<SqlRow>, StoreError>;

    /// Every projection this store holds, with its generations and checkpoints.
    async fn list(&self) -> Result<Vec<ReadModelInfo>, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projection_names_name_files_and_schemas_safely() {
        assert!(check_projection_name("account_balances2").is_ok());
        for bad in [
            "",
            "Accounts",
            "2fast",
            "a-b",
            "a b",
            "a;drop",
            &"x".repeat(41),
        ] {
            assert!(check_projection_name(bad).is_err(), "{bad:?}");
        }
    }
}
