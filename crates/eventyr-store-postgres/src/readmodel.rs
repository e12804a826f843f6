//! Read models in PostgreSQL: one schema per projection generation, and a catalog.
//!
//! The catalog schema (e.g. `eventyr_read`) records each projection's generations and
//! the one serving queries; generation N of projection P lives in the schema
//! `<catalog>_<P>_<N>` with its tables and its checkpoint row. DDL is transactional in
//! PostgreSQL, so creating, promoting (and dropping the older generations) and
//! discarding are each one transaction. Statements run with `SET LOCAL search_path` to
//! the generation's schema, so projections write plain table names.

use std::error::Error as StdError;
use std::sync::Arc;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use eventyr_core::Position;
use eventyr_store::StoreError;
use eventyr_store::readmodel::{
    Generation, ReadModelInfo, ReadModels, check_projection_name, generation_not_found,
    group_generations, is_unit_error,
};
use eventyr_store::sql::{SqlRow, SqlStatement, SqlValue};
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::{Config, NoTls, Row};

use crate::{error, schema};

/// Projection read models in PostgreSQL schemas. Cheap to clone.
#[derive(Debug, Clone)]
pub struct PostgresReadModels {
    pool: Pool,
    catalog: Arc<str>,
}

impl PostgresReadModels {
    /// Connects and creates the catalog schema `catalog` if needed.
    pub async fn connect(url: &str, catalog: &str) -> Result<Self, StoreError> {
        schema::check_name(catalog)?;
        if catalog.len() > 16 {
            return Err(StoreError::Statement {
                message: format!(
                    "read-model catalog name {catalog:?} is longer than 16 characters"
                ),
            });
        }
        let config: Config = url.parse().map_err(|e| StoreError::Statement {
            message: format!("invalid postgres url: {e}"),
        })?;
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool =
            Pool::builder(manager)
                .max_size(8)
                .build()
                .map_err(|e| StoreError::Statement {
                    message: format!("postgres pool: {e}"),
                })?;
        let mut client = pool.get().await.map_err(error::pool)?;
        let tx = client.transaction().await.map_err(error::postgres)?;
        tx.batch_execute(&format!(
            "SELECT pg_advisory_xact_lock(hashtext('eventyr.read.migrate'));
             CREATE SCHEMA IF NOT EXISTS {catalog};
             CREATE TABLE IF NOT EXISTS {catalog}.generations (
                 projection text NOT NULL, generation bigint NOT NULL,
                 PRIMARY KEY (projection, generation));
             CREATE TABLE IF NOT EXISTS {catalog}.current (
                 projection text PRIMARY KEY, generation bigint NOT NULL);"
        ))
        .await
        .map_err(error::postgres)?;
        tx.commit().await.map_err(error::postgres)?;
        Ok(Self {
            pool,
            catalog: catalog.into(),
        })
    }

    /// The schema of a generation.
    fn schema(&self, projection: &str, generation: Generation) -> String {
        format!("{}_{projection}_{generation}", self.catalog)
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(error::pool)
    }

    async fn known(
        &self,
        client: &impl deadpool_postgres::GenericClient,
        projection: &str,
        generation: Generation,
    ) -> Result<(), StoreError> {
        let sql = format!(
            "SELECT 1 FROM {}.generations WHERE projection = $1 AND generation = $2",
            self.catalog
        );
        let found = client
            .query_opt(&sql, &[&projection, &counter(generation.0)])
            .await
            .map_err(error::postgres)?;
        match found {
            Some(_) => Ok(()),
            None => Err(generation_not_found(projection, generation)),
        }
    }
}

fn counter(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// A database error caused by the statement (SQLSTATE classes 22 data, 23 integrity,
/// 42 syntax or access, or a parameter of the wrong type) rather than by the database.
fn statement_error(e: tokio_postgres::Error) -> StoreError {
    let statement_class = e.as_db_error().is_some_and(|db| {
        ["22", "23", "42"]
            .iter()
            .any(|class| db.code().code().starts_with(class))
    });
    // The driver's error kinds are private; its message for a parameter that cannot be
    // encoded is stable ("error serializing parameter N").
    let bad_parameter =
        e.as_db_error().is_none() && e.to_string().starts_with("error serializing parameter");
    if statement_class || bad_parameter {
        let message = match e.as_db_error() {
            Some(db) => format!("{} ({})", db.message(), db.code().code()),
            None => e.to_string(),
        };
        StoreError::Statement { message }
    } else {
        error::postgres(e)
    }
}

/// Binds a [`SqlValue`] to whatever type PostgreSQL inferred for its placeholder.
#[derive(Debug)]
struct Param<'a>(&'a SqlValue);

impl ToSql for Param<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        match (self.0, ty) {
            (SqlValue::Null, _) => Ok(IsNull::Yes),
            (SqlValue::Int(v), &Type::INT8) => v.to_sql(ty, out),
            (SqlValue::Int(v), &Type::INT4) => i32::try_from(*v)?.to_sql(ty, out),
            (SqlValue::Int(v), &Type::INT2) => i16::try_from(*v)?.to_sql(ty, out),
            (SqlValue::Int(v), &Type::BOOL) => (*v != 0).to_sql(ty, out),
            (SqlValue::Int(v), &Type::FLOAT8) => (*v as f64).to_sql(ty, out),
            (SqlValue::Float(v), &Type::FLOAT8) => v.to_sql(ty, out),
            (SqlValue::Float(v), &Type::FLOAT4) => (*v as f32).to_sql(ty, out),
            (SqlValue::Text(v), _) if <&str as ToSql>::accepts(ty) => v.as_str().to_sql(ty, out),
            (SqlValue::Bytes(v), &Type::BYTEA) => v.as_slice().to_sql(ty, out),
            (value, ty) => Err(format!("cannot bind {value:?} to a {ty} parameter").into()),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

fn value(row: &Row, index: usize) -> Result<SqlValue, StoreError> {
    let ty = row.columns()[index].type_().clone();
    let get = |e: tokio_postgres::Error| statement_error(e);
    Ok(match ty {
        Type::INT8 => row.try_get::<_, Option<i64>>(index).map_err(get)?.into(),
        Type::INT4 => row.try_get::<_, Option<i32>>(index).map_err(get)?.into(),
        Type::INT2 => row.try_get::<_, Option<i16>>(index).map_err(get)?.into(),
        Type::BOOL => row.try_get::<_, Option<bool>>(index).map_err(get)?.into(),
        Type::FLOAT8 => row.try_get::<_, Option<f64>>(index).map_err(get)?.into(),
        Type::FLOAT4 => row
            .try_get::<_, Option<f32>>(index)
            .map_err(get)?
            .map(f64::from)
            .into(),
        Type::BYTEA => row
            .try_get::<_, Option<Vec<u8>>>(index)
            .map_err(get)?
            .into(),
        ty if <String as tokio_postgres::types::FromSql>::accepts(&ty) => {
            row.try_get::<_, Option<String>>(index).map_err(get)?.into()
        }
        ty => {
            return Err(StoreError::Statement {
                message: format!(
                    "column {} has type {ty}, which read models do not support",
                    row.columns()[index].name()
                ),
            });
        }
    })
}

fn rows(rows: &[Row]) -> Result<Vec<SqlRow>, StoreError> {
    let Some(first) = rows.first() else {
        return Ok(Vec::new());
    };
    let columns: Arc<[String]> = first
        .columns()
        .iter()
        .map(|c| c.name().to_owned())
        .collect();
    rows.iter()
        .map(|row| {
            let values = (0..columns.len())
                .map(|i| value(row, i))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(SqlRow::new(Arc::clone(&columns), values))
        })
        .collect()
}

/// Runs `statements` in the current transaction, each prepared once per connection.
async fn run(
    client: &deadpool_postgres::Client,
    statements: &[SqlStatement],
) -> Result<(), StoreError> {
    for statement in statements {
        let prepared = client
            .prepare_cached(&statement.sql)
            .await
            .map_err(statement_error)?;
        let params: Vec<Param<'_>> = statement.params.iter().map(Param).collect();
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
        let rows = client
            .execute(&prepared, &refs)
            .await
            .map_err(statement_error)?;
        statement.check_rows(rows)?;
    }
    Ok(())
}

#[async_trait]
impl ReadModels for PostgresReadModels {
    async fn current(&self, projection: &str) -> Result<Option<Generation>, StoreError> {
        check_projection_name(projection)?;
        let sql = format!(
            "SELECT generation FROM {}.current WHERE projection = $1",
            self.catalog
        );
        let row = self
            .client()
            .await?
            .query_opt(&sql, &[&projection])
            .await
            .map_err(error::postgres)?;
        Ok(row.map(|r| Generation(r.get::<_, i64>(0).unsigned_abs())))
    }

    async fn create(&self, projection: &str, ddl: &[String]) -> Result<Generation, StoreError> {
        check_projection_name(projection)?;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(error::postgres)?;
        let catalog = &self.catalog;
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1))",
            &[&format!("{catalog}.{projection}")],
        )
        .await
        .map_err(error::postgres)?;
        let last: i64 = tx
            .query_one(&format!("SELECT coalesce(max(generation), 0) FROM {catalog}.generations WHERE projection = $1"), &[&projection])
            .await
            .map_err(error::postgres)?
            .get(0);
        let generation = Generation(last.unsigned_abs() + 1);
        let schema = self.schema(projection, generation);
        if schema.len() > 63 {
            return Err(StoreError::Statement {
                message: format!("the schema name {schema} is longer than PostgreSQL allows"),
            });
        }
        tx.execute(
            &format!("INSERT INTO {catalog}.generations (projection, generation) VALUES ($1, $2)"),
            &[&projection, &(last + 1)],
        )
        .await
        .map_err(error::postgres)?;
        tx.batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}; SET LOCAL search_path TO {schema};
             CREATE TABLE eventyr_checkpoint (id integer PRIMARY KEY CHECK (id = 1), position bigint NOT NULL);
             INSERT INTO eventyr_checkpoint (id, position) VALUES (1, 0);"
        ))
        .await
        .map_err(error::postgres)?;
        for statement in ddl {
            tx.batch_execute(statement).await.map_err(statement_error)?;
        }
        tx.commit().await.map_err(error::postgres)?;
        Ok(generation)
    }

    async fn promote(&self, projection: &str, generation: Generation) -> Result<(), StoreError> {
        check_projection_name(projection)?;
        let mut client = self.client().await?;
        let catalog = &self.catalog;
        let tx = client.transaction().await.map_err(error::postgres)?;
        let g = counter(generation.0);
        // Checked under the projection's lock: a concurrent promote of a newer
        // generation has either dropped this one already or waits for us.
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1))",
            &[&format!("{catalog}.{projection}")],
        )
        .await
        .map_err(error::postgres)?;
        self.known(&tx, projection, generation).await?;
        let older = tx
            .query(&format!("SELECT generation FROM {catalog}.generations WHERE projection = $1 AND generation < $2"), &[&projection, &g])
            .await
            .map_err(error::postgres)?;
        tx.execute(
            &format!(
                "INSERT INTO {catalog}.current (projection, generation) VALUES ($1, $2) \
                 ON CONFLICT (projection) DO UPDATE SET generation = EXCLUDED.generation"
            ),
            &[&projection, &g],
        )
        .await
        .map_err(error::postgres)?;
        tx.execute(
            &format!("DELETE FROM {catalog}.generations WHERE projection = $1 AND generation < $2"),
            &[&projection, &g],
        )
        .await
        .map_err(error::postgres)?;
        for row in older {
            let old = Generation(row.get::<_, i64>(0).unsigned_abs());
            tx.batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {} CASCADE",
                self.schema(projection, old)
            ))
            .await
            .map_err(error::postgres)?;
        }
        tx.commit().await.map_err(error::postgres)
    }

    async fn adopt(
        &self,
        projection: &str,
        generation: Generation,
    ) -> Result<Generation, StoreError> {
        check_projection_name(projection)?;
        let mut client = self.client().await?;
        let catalog = &self.catalog;
        let tx = client.transaction().await.map_err(error::postgres)?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1))",
            &[&format!("{catalog}.{projection}")],
        )
        .await
        .map_err(error::postgres)?;
        self.known(&tx, projection, generation).await?;
        tx.execute(
            &format!(
                "INSERT INTO {catalog}.current (projection, generation) VALUES ($1, $2) \
                 ON CONFLICT (projection) DO NOTHING"
            ),
            &[&projection, &counter(generation.0)],
        )
        .await
        .map_err(error::postgres)?;
        let serving: i64 = tx
            .query_one(
                &format!("SELECT generation FROM {catalog}.current WHERE projection = $1"),
                &[&projection],
            )
            .await
            .map_err(error::postgres)?
            .get(0);
        tx.commit().await.map_err(error::postgres)?;
        Ok(Generation(serving.unsigned_abs()))
    }

    async fn discard(&self, projection: &str, generation: Generation) -> Result<(), StoreError> {
        if self.current(projection).await? == Some(generation) {
            return Err(StoreError::Statement {
                message: format!(
                    "generation {generation} of {projection} serves queries; promote another first"
                ),
            });
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(error::postgres)?;
        tx.execute(
            &format!(
                "DELETE FROM {}.generations WHERE projection = $1 AND generation = $2",
                self.catalog
            ),
            &[&projection, &counter(generation.0)],
        )
        .await
        .map_err(error::postgres)?;
        tx.batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            self.schema(projection, generation)
        ))
        .await
        .map_err(error::postgres)?;
        tx.commit().await.map_err(error::postgres)
    }

    async fn checkpoint(
        &self,
        projection: &str,
        generation: Generation,
    ) -> Result<Position, StoreError> {
        check_projection_name(projection)?;
        let client = self.client().await?;
        self.known(&client, projection, generation).await?;
        let sql = format!(
            "SELECT position FROM {}.eventyr_checkpoint WHERE id = 1",
            self.schema(projection, generation)
        );
        let row = client.query_one(&sql, &[]).await.map_err(error::postgres)?;
        Ok(Position(row.get::<_, i64>(0).unsigned_abs()))
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
        let client = self.client().await?;
        let schema = self.schema(projection, generation);
        client
            .batch_execute(&format!("BEGIN; SET LOCAL search_path TO {schema}"))
            .await
            .map_err(error::postgres)?;
        let applied = async {
            let at: i64 = client
                .query_one(
                    "SELECT position FROM eventyr_checkpoint WHERE id = 1 FOR UPDATE",
                    &[],
                )
                .await
                .map_err(statement_error)?
                .get(0);
            if at.unsigned_abs() != from.0 {
                return Err(StoreError::CheckpointConflict {
                    projection: projection.to_owned(),
                    expected: from,
                    actual: Position(at.unsigned_abs()),
                });
            }
            run(&client, &statements).await?;
            client
                .execute(
                    "UPDATE eventyr_checkpoint SET position = $1 WHERE id = 1",
                    &[&counter(to.0)],
                )
                .await
                .map_err(error::postgres)?;
            client
                .batch_execute("COMMIT")
                .await
                .map_err(error::ambiguous)
        }
        .await;
        if applied.is_err() && !client.is_closed() {
            let _ = client.batch_execute("ROLLBACK").await;
        }
        applied
    }

    async fn execute(
        &self,
        projection: &str,
        generation: Generation,
        units: Vec<Vec<SqlStatement>>,
    ) -> Result<Vec<Result<(), StoreError>>, StoreError> {
        check_projection_name(projection)?;
        let client = self.client().await?;
        let schema = self.schema(projection, generation);
        self.known(&client, projection, generation).await?;
        client
            .batch_execute(&format!("BEGIN; SET LOCAL search_path TO {schema}"))
            .await
            .map_err(error::postgres)?;
        let executed = async {
            let mut results = Vec::with_capacity(units.len());
            for unit in &units {
                client
                    .batch_execute("SAVEPOINT unit")
                    .await
                    .map_err(error::postgres)?;
                match run(&client, unit).await {
                    Ok(()) => {
                        client
                            .batch_execute("RELEASE SAVEPOINT unit")
                            .await
                            .map_err(error::postgres)?;
                        results.push(Ok(()));
                    }
                    Err(error) if is_unit_error(&error) => {
                        client
                            .batch_execute("ROLLBACK TO SAVEPOINT unit; RELEASE SAVEPOINT unit")
                            .await
                            .map_err(error::postgres)?;
                        results.push(Err(error));
                    }
                    Err(error) => return Err(error),
                }
            }
            client
                .batch_execute("COMMIT")
                .await
                .map_err(error::ambiguous)?;
            Ok(results)
        }
        .await;
        if executed.is_err() && !client.is_closed() {
            let _ = client.batch_execute("ROLLBACK").await;
        }
        executed
    }

    async fn query(
        &self,
        projection: &str,
        statement: SqlStatement,
    ) -> Result<Vec<SqlRow>, StoreError> {
        let generation =
            self.current(projection)
                .await?
                .ok_or_else(|| StoreError::ReadModelNotFound {
                    projection: projection.to_owned(),
                })?;
        let client = self.client().await?;
        let schema = self.schema(projection, generation);
        client
            .batch_execute(&format!(
                "BEGIN READ ONLY; SET LOCAL search_path TO {schema}"
            ))
            .await
            .map_err(error::postgres)?;
        let result = async {
            let prepared = client
                .prepare_cached(&statement.sql)
                .await
                .map_err(statement_error)?;
            let params: Vec<Param<'_>> = statement.params.iter().map(Param).collect();
            let refs: Vec<&(dyn ToSql + Sync)> =
                params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
            let found = client
                .query(&prepared, &refs)
                .await
                .map_err(statement_error)?;
            rows(&found)
        }
        .await;
        let _ = client
            .batch_execute(if result.is_ok() { "COMMIT" } else { "ROLLBACK" })
            .await;
        result
    }

    async fn list(&self) -> Result<Vec<ReadModelInfo>, StoreError> {
        let catalog = &self.catalog;
        let found = self
            .client()
            .await?
            .query(
                &format!(
                    "SELECT g.projection, g.generation, c.generation FROM {catalog}.generations g \
                     LEFT JOIN {catalog}.current c ON c.projection = g.projection ORDER BY g.projection, g.generation"
                ),
                &[],
            )
            .await
            .map_err(error::postgres)?;
        let mut grouped = Vec::with_capacity(found.len());
        for row in found {
            let projection: String = row.get(0);
            let generation = Generation(row.get::<_, i64>(1).unsigned_abs());
            let current: Option<i64> = row.get(2);
            let checkpoint = self.checkpoint(&projection, generation).await?;
            grouped.push((
                projection,
                generation,
                current.map(|g| Generation(g.unsigned_abs())),
                checkpoint,
            ));
        }
        Ok(group_generations(grouped))
    }
}
