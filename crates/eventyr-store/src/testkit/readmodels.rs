//! Conformance cases for [`ReadModels`] backends: generations, atomic apply with the
//! checkpoint, value types, placeholders, errors, persistence.

use std::sync::Arc;

use async_trait::async_trait;
use eventyr_core::Position;

use crate::error::StoreError;
use crate::readmodel::{Generation, ReadModels};
use crate::sql::{SqlStatement, SqlValue};

/// A read-model technology under test.
#[async_trait]
pub trait ReadModelBackend: Send + Sync {
    /// A new, empty location; it stays usable as long as the backend value lives.
    async fn location(&self) -> Box<dyn ReadModelLocation>;
}

#[async_trait]
pub trait ReadModelLocation: Send + Sync {
    /// Opens another instance on this location, as another process would.
    async fn open(&self) -> Arc<dyn ReadModels>;
}

fn schema() -> Vec<String> {
    vec![
        "CREATE TABLE items (id TEXT PRIMARY KEY, n BIGINT NOT NULL, score DOUBLE PRECISION, \
         note TEXT, raw BYTEA)"
            .into(),
    ]
}

fn insert(id: &str, n: i64) -> SqlStatement {
    SqlStatement::new("INSERT INTO items (id, n) VALUES ($1, $2)")
        .bind(id)
        .bind(n)
}

async fn ids(models: &dyn ReadModels, projection: &str) -> Vec<String> {
    let rows = models
        .query(
            projection,
            SqlStatement::new("SELECT id FROM items ORDER BY id"),
        )
        .await
        .expect("query");
    rows.iter()
        .map(|r| r.text("id").expect("id").to_owned())
        .collect()
}

pub async fn generations_are_created_promoted_and_dropped(backend: &dyn ReadModelBackend) {
    let models = backend.location().await.open().await;
    let models = &*models;
    assert_eq!(models.current("items").await.expect("current"), None);
    let missing = models.query("items", SqlStatement::new("SELECT 1")).await;
    assert!(
        matches!(missing, Err(StoreError::ReadModelNotFound { .. })),
        "{missing:?}"
    );

    let first = models.create("items", &schema()).await.expect("create");
    assert_eq!(
        models.checkpoint("items", first).await.expect("checkpoint"),
        Position::ZERO
    );
    assert_eq!(
        models.current("items").await.expect("current"),
        None,
        "not serving until promoted"
    );
    models
        .apply(
            "items",
            first,
            vec![insert("a", 1)],
            Position::ZERO,
            Position(3),
        )
        .await
        .expect("apply");
    models.promote("items", first).await.expect("promote");
    assert_eq!(models.current("items").await.expect("current"), Some(first));
    assert_eq!(ids(models, "items").await, vec!["a"]);

    let second = models
        .create("items", &schema())
        .await
        .expect("create a rebuild");
    assert!(second > first);
    models
        .apply(
            "items",
            second,
            vec![insert("b", 2)],
            Position::ZERO,
            Position(7),
        )
        .await
        .expect("apply");
    assert_eq!(
        ids(models, "items").await,
        vec!["a"],
        "the old generation serves during a rebuild"
    );
    models.promote("items", second).await.expect("promote");
    assert_eq!(ids(models, "items").await, vec!["b"]);
    let listed = models.list().await.expect("list");
    let info = listed
        .iter()
        .find(|i| i.projection == "items")
        .expect("listed");
    assert_eq!(info.current, Some(second));
    assert_eq!(
        info.generations,
        vec![(second, Position(7))],
        "older generations are dropped"
    );

    let stale = models.promote("items", first).await;
    assert!(
        matches!(stale, Err(StoreError::ReadModelNotFound { .. })),
        "a dropped generation: {stale:?}"
    );
    let third = models.create("items", &schema()).await.expect("create");
    let fourth = models.create("items", &schema()).await.expect("create");
    models
        .promote("items", fourth)
        .await
        .expect("promote the newest");
    let backwards = models.promote("items", third).await;
    assert!(
        matches!(backwards, Err(StoreError::ReadModelNotFound { .. })),
        "never back in time: {backwards:?}"
    );
    assert_eq!(
        models.current("items").await.expect("current"),
        Some(fourth)
    );
    let abandoned = models.create("items", &schema()).await.expect("create");
    models.discard("items", abandoned).await.expect("discard");
    let listed = models.list().await.expect("list");
    let info = listed
        .iter()
        .find(|i| i.projection == "items")
        .expect("listed");
    assert_eq!(info.generations.len(), 1);
    let bad = models.create("Items!", &schema()).await;
    assert!(matches!(bad, Err(StoreError::Invalid(_))), "{bad:?}");
}

pub async fn statements_and_checkpoint_commit_together(backend: &dyn ReadModelBackend) {
    let models = backend.location().await.open().await;
    let models = &*models;
    let g = models.create("items", &schema()).await.expect("create");
    models.promote("items", g).await.expect("promote");
    models
        .apply(
            "items",
            g,
            vec![insert("a", 1), insert("b", 2)],
            Position::ZERO,
            Position(5),
        )
        .await
        .expect("apply");
    assert_eq!(
        models.checkpoint("items", g).await.expect("checkpoint"),
        Position(5)
    );

    let stale = models
        .apply(
            "items",
            g,
            vec![insert("c", 3)],
            Position::ZERO,
            Position(9),
        )
        .await;
    match stale {
        Err(StoreError::CheckpointConflict {
            expected, actual, ..
        }) => {
            assert_eq!((expected, actual), (Position::ZERO, Position(5)));
        }
        other => panic!("expected a checkpoint conflict, got {other:?}"),
    }
    let broken = vec![insert("c", 3), insert("a", 9)]; // "a" exists: a constraint violation
    let failed = models
        .apply("items", g, broken, Position(5), Position(9))
        .await;
    assert!(
        matches!(failed, Err(StoreError::Statement { .. })),
        "{failed:?}"
    );
    let bad_sql = models
        .apply(
            "items",
            g,
            vec![SqlStatement::new("INSERT INTO nowhere VALUES (1)")],
            Position(5),
            Position(9),
        )
        .await;
    assert!(
        matches!(bad_sql, Err(StoreError::Statement { .. })),
        "{bad_sql:?}"
    );
    assert_eq!(
        ids(models, "items").await,
        vec!["a", "b"],
        "a failed batch applies nothing"
    );
    assert_eq!(
        models.checkpoint("items", g).await.expect("checkpoint"),
        Position(5)
    );
    models
        .apply("items", g, vec![], Position(5), Position(6))
        .await
        .expect("a batch with no statements moves the checkpoint");
    assert_eq!(
        models.checkpoint("items", g).await.expect("checkpoint"),
        Position(6)
    );
}

pub async fn values_and_placeholders_round_trip(backend: &dyn ReadModelBackend) {
    let models = backend.location().await.open().await;
    let models = &*models;
    let g = models.create("values", &schema()).await.expect("create");
    models.promote("values", g).await.expect("promote");
    let rows = [
        (
            "min",
            i64::MIN,
            Some(-1.5),
            Some("Ærø ✓ 🦀"),
            Some(vec![0u8, 255, 10]),
        ),
        ("max", i64::MAX, None, None, None),
    ];
    let statements = rows
        .iter()
        .map(|(id, n, score, note, raw)| {
            // Placeholders out of order: $5 first.
            SqlStatement::new(
                "INSERT INTO items (raw, note, score, n, id) VALUES ($5, $4, $3, $2, $1)",
            )
            .bind(*id)
            .bind(*n)
            .bind(*score)
            .bind(*note)
            .bind(raw.clone())
        })
        .collect();
    models
        .apply("values", g, statements, Position::ZERO, Position(1))
        .await
        .expect("apply");
    let upsert = SqlStatement::new(
        "INSERT INTO items (id, n) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET n = items.n + excluded.n",
    )
    .bind("max")
    .bind(-1);
    models
        .apply("values", g, vec![upsert], Position(1), Position(2))
        .await
        .expect("upsert");
    let rows = models
        .query(
            "values",
            SqlStatement::new("SELECT id, n, score, note, raw FROM items WHERE n <> $1 ORDER BY n")
                .bind(0),
        )
        .await
        .expect("query");
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].text("id"), Some("min"));
    assert_eq!(rows[0].int("n"), Some(i64::MIN));
    assert_eq!(rows[0].get("score"), Some(&SqlValue::Float(-1.5)));
    assert_eq!(rows[0].text("note"), Some("Ærø ✓ 🦀"));
    assert_eq!(rows[0].get("raw"), Some(&SqlValue::Bytes(vec![0, 255, 10])));
    assert_eq!(rows[1].int("n"), Some(i64::MAX - 1));
    assert_eq!(
        (rows[1].get("score"), rows[1].get("note")),
        (Some(&SqlValue::Null), Some(&SqlValue::Null))
    );
    let bad = models
        .query("values", SqlStatement::new("SELEKT nonsense"))
        .await;
    assert!(matches!(bad, Err(StoreError::Statement { .. })), "{bad:?}");
}

pub async fn read_models_survive_reopening(backend: &dyn ReadModelBackend) {
    let location = backend.location().await;
    let first = location.open().await;
    let g = first.create("items", &schema()).await.expect("create");
    first
        .apply(
            "items",
            g,
            vec![insert("kept", 1)],
            Position::ZERO,
            Position(4),
        )
        .await
        .expect("apply");
    first.promote("items", g).await.expect("promote");
    drop(first);
    let second = location.open().await;
    assert_eq!(second.current("items").await.expect("current"), Some(g));
    assert_eq!(
        second.checkpoint("items", g).await.expect("checkpoint"),
        Position(4)
    );
    assert_eq!(ids(&*second, "items").await, vec!["kept"]);
    let next = second.create("items", &schema()).await.expect("create");
    assert_eq!(next, Generation(g.0 + 1));
}

pub async fn units_commit_together_and_fail_alone(backend: &dyn ReadModelBackend) {
    let models = backend.location().await.open().await;
    let g = models.create("items", &schema()).await.expect("create");
    models.promote("items", g).await.expect("promote");
    let bump = |id: &str, from: i64| {
        SqlStatement::new("UPDATE items SET n = n + 1 WHERE id = $1 AND n = $2")
            .bind(id)
            .bind(from)
            .expect_rows(1)
    };
    let results = models
        .execute(
            "items",
            g,
            vec![
                vec![insert("a", 1), insert("b", 1)],
                vec![insert("c", 1), bump("a", 7)],
                vec![SqlStatement::new("INSERT INTO nowhere VALUES (1)")],
                vec![bump("a", 1), insert("d", 1)],
            ],
        )
        .await
        .expect("execute");
    assert!(results[0].is_ok(), "{:?}", results[0]);
    assert!(
        matches!(
            results[1],
            Err(StoreError::UnexpectedRowCount {
                expected: 1,
                actual: 0,
                ..
            })
        ),
        "an unmet expectation: {:?}",
        results[1]
    );
    assert!(
        matches!(results[2], Err(StoreError::Statement { .. })),
        "a refused statement: {:?}",
        results[2]
    );
    assert!(results[3].is_ok(), "{:?}", results[3]);
    assert_eq!(
        ids(&*models, "items").await,
        vec!["a", "b", "d"],
        "failed units leave nothing behind, the others commit"
    );
    let rows = models
        .query(
            "items",
            SqlStatement::new("SELECT n FROM items WHERE id = $1").bind("a"),
        )
        .await
        .expect("query");
    assert_eq!(rows[0].int("n"), Some(2));
    assert_eq!(
        models.checkpoint("items", g).await.expect("checkpoint"),
        Position::ZERO,
        "execute does not move the checkpoint"
    );
    let missing = models
        .execute("items", Generation(g.0 + 9), vec![vec![insert("x", 1)]])
        .await;
    assert!(
        matches!(missing, Err(StoreError::ReadModelNotFound { .. })),
        "{missing:?}"
    );
}

pub async fn the_first_generation_is_adopted_once(backend: &dyn ReadModelBackend) {
    let location = backend.location().await;
    let (one, two) = (location.open().await, location.open().await);
    let mine = one.create("items", &schema()).await.expect("create");
    let theirs = two.create("items", &schema()).await.expect("create");
    let serving = two.adopt("items", theirs).await.expect("adopt");
    assert_eq!(serving, theirs, "nothing served: adopted");
    assert_eq!(
        one.adopt("items", mine).await.expect("adopt"),
        theirs,
        "something serves already: that one is returned"
    );
    one.discard("items", mine).await.expect("discard the loser");
    assert_eq!(one.current("items").await.expect("current"), Some(theirs));
    let listed = one.list().await.expect("list");
    assert_eq!(listed[0].generations.len(), 1, "{listed:?}");
}

/// Expands to one test per read-model conformance case.
#[macro_export]
macro_rules! read_model_suite {
    ($backend:expr) => {
        $crate::read_model_suite!(@cases $backend;
            generations_are_created_promoted_and_dropped,
            statements_and_checkpoint_commit_together,
            values_and_placeholders_round_trip,
            read_models_survive_reopening,
            units_commit_together_and_fail_alone,
            the_first_generation_is_adopted_once,
        );
    };
    (@cases $backend:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let backend = $backend;
                $crate::testkit::readmodels::$case(&backend).await;
            }
        )*
    };
}
