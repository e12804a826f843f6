//! The PostgreSQL schema and its migrations, applied by the store itself on connect.
//!
//! Everything lives in one schema (default `eventyr`), so several stores can share a
//! database. `position` is a single-row table holding the next global position: every
//! write transaction locks that row first, which serialises writers across processes
//! and makes position order equal commit order (see the crate docs).

use tokio_postgres::Client;

use crate::error;
use eventyr_store::StoreError;

/// Migrations in order; the index + 1 is the schema version they bring.
const MIGRATIONS: &[&str] = &[
    "
CREATE TABLE {schema}.position (
    id            integer PRIMARY KEY CHECK (id = 1),
    next_position bigint NOT NULL
);
INSERT INTO {schema}.position (id, next_position) VALUES (1, 1);

CREATE TABLE {schema}.streams (
    id              bigserial PRIMARY KEY,
    name            text NOT NULL UNIQUE,
    version         bigint,
    truncate_before bigint NOT NULL DEFAULT 0,
    deleted         boolean NOT NULL DEFAULT false
);

CREATE TABLE {schema}.events (
    position       bigint PRIMARY KEY,
    event_id       uuid NOT NULL UNIQUE,
    stream_id      bigint NOT NULL,
    version        bigint NOT NULL,
    type           text NOT NULL,
    schema_version bigint NOT NULL,
    data           bytea NOT NULL,
    correlation_id text,
    causation_id   text,
    traceparent    text,
    user_id        text,
    recorded_at    timestamptz NOT NULL,
    UNIQUE (stream_id, version)
);
",
    "
CREATE TABLE {schema}.snapshots (
    stream_id      bigint PRIMARY KEY,
    version        bigint NOT NULL,
    schema_version bigint NOT NULL,
    data           bytea NOT NULL,
    taken_at       timestamptz NOT NULL
);
",
];

/// The schema version this code writes and reads.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// Checks a schema name: lowercase letters, digits and `_`, starting with a letter or
/// `_`, at most 48 bytes (the notification channel adds a prefix within PostgreSQL's
/// 63-byte identifier limit).
pub fn check_name(schema: &str) -> Result<(), StoreError> {
    let valid = !schema.is_empty()
        && schema.len() <= 48
        && schema.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && schema
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(StoreError::Unavailable {
            message: format!("postgres schema name {schema:?} must match [a-z_][a-z0-9_]{{0,47}}"),
            ambiguous: false,
            source: None,
        })
    }
}

/// Brings `schema` to [`SCHEMA_VERSION`] in one transaction, under an advisory lock so
/// that processes starting together migrate once.
pub async fn migrate(client: &mut Client, schema: &str) -> Result<(), StoreError> {
    let tx = client.transaction().await.map_err(error::postgres)?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('eventyr.migrate'))",
        &[],
    )
    .await
    .map_err(error::postgres)?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         CREATE TABLE IF NOT EXISTS {schema}.migrations (
             version    integer PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         );"
    ))
    .await
    .map_err(error::postgres)?;
    let row = tx
        .query_one(
            &format!("SELECT coalesce(max(version), 0) FROM {schema}.migrations"),
            &[],
        )
        .await
        .map_err(error::postgres)?;
    let current: i32 = row.get(0);
    if current > SCHEMA_VERSION {
        return Err(StoreError::corrupt(format!(
            "schema {schema} is at version {current}; this eventyr understands up to {SCHEMA_VERSION}"
        )));
    }
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        tx.batch_execute(&migration.replace("{schema}", schema))
            .await
            .map_err(error::postgres)?;
        tx.execute(
            &format!("INSERT INTO {schema}.migrations (version) VALUES ($1)"),
            &[&(index as i32 + 1)],
        )
        .await
        .map_err(error::postgres)?;
    }
    tx.commit().await.map_err(error::postgres)
}
