//! The read side on the bank domain, on SQLite and PostgreSQL read models: catch-up
//! then live, upcasting, a failing projection isolated from the others, a rebuild that
//! keeps queries working, two runners on one read model, and paged queries.

#[macro_use]
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::bank::{Account, AccountCommand, Balances, upcasters};
use eventyr_core::{NewEvent, RecordedEvent, RetryPolicy, StreamId};
use eventyr_cqrs::{
    Command, CommandHandler, HandlerOptions, PagedQuery, Projection, ProjectionError,
    ProjectionState, ProjectionStatus, ProjectionsHandle, QueryError, RunnerOptions, fetch_page,
    projections,
};
use eventyr_store::readmodel::{Generation, ReadModels};
use eventyr_store::sql::{SqlStatement, SqlValue};
use eventyr_store::{EventStore, ExpectedVersion, StreamAppend};
use tokio::sync::oneshot;

const WAIT: Duration = Duration::from_secs(30);

fn fast_options() -> RunnerOptions {
    RunnerOptions {
        batch_size: 7,
        retry: RetryPolicy {
            attempts_max: 3,
            initial_delay: Duration::from_millis(5),
            ..RunnerOptions::default().retry
        },
        idle_poll: Duration::from_millis(50),
    }
}

/// A running runner; dropping it stops the runner.
struct Running {
    handle: ProjectionsHandle,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    fn start(
        store: &Arc<dyn EventStore>,
        read_models: &Arc<dyn ReadModels>,
        list: Vec<Arc<dyn Projection>>,
        options: RunnerOptions,
    ) -> Self {
        let (runner, handle) = projections(
            Arc::clone(store),
            Arc::clone(read_models),
            Arc::new(upcasters()),
            list,
            options,
        );
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(runner.run(async {
            let _ = stopped.await;
        }));
        Self {
            handle,
            stop: Some(stop),
            task,
        }
    }

    async fn until(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&ProjectionStatus) -> bool,
    ) -> ProjectionStatus {
        let mut changes = self.handle.watch();
        let waited = tokio::time::timeout(WAIT, async {
            loop {
                let status = self
                    .handle
                    .status()
                    .into_iter()
                    .find(|s| s.name == name)
                    .expect("status");
                if check(&status) {
                    return status;
                }
                changes.changed().await.expect("runner alive");
            }
        })
        .await;
        waited.unwrap_or_else(|_| panic!("{name} never got {what}: {:?}", self.handle.status()))
    }

    async fn caught_up(&self, name: &str, store: &Arc<dyn EventStore>) -> ProjectionStatus {
        let head = store.head().await.expect("head");
        self.until(name, "caught up", |s| s.checkpoint >= head)
            .await
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("runner stops")
            .expect("runner task");
    }
}

async fn bank(store: &Arc<dyn EventStore>, accounts: &[(&str, &[i64])]) {
    let handler = CommandHandler::<Account>::new(
        Arc::clone(store),
        Arc::new(upcasters()),
        HandlerOptions::default(),
    );
    for (id, deposits) in accounts {
        let open = AccountCommand::Open {
            id: (*id).into(),
            owner: format!("owner of {id}"),
        };
        handler
            .execute(Command::new(*id, open))
            .await
            .expect("open");
        for amount in *deposits {
            handler
                .execute(Command::new(
                    *id,
                    AccountCommand::Deposit { amount: *amount },
                ))
                .await
                .expect("deposit");
        }
    }
}

async fn balances(read_models: &Arc<dyn ReadModels>) -> Vec<(String, i64, i64)> {
    let rows = read_models
        .query(
            "balances",
            SqlStatement::new("SELECT id, balance, movements FROM accounts ORDER BY id"),
        )
        .await
        .expect("query");
    rows.iter()
        .map(|r| {
            (
                r.text("id").expect("id").to_owned(),
                r.int("balance").expect("balance"),
                r.int("movements").expect("n"),
            )
        })
        .collect()
}

async fn catches_up_then_follows_live(
    store: Arc<dyn EventStore>,
    read_models: Arc<dyn ReadModels>,
) {
    bank(&store, &[("a", &[10, 20]), ("b", &[5])]).await;
    let running = Running::start(
        &store,
        &read_models,
        vec![Arc::new(Balances)],
        fast_options(),
    );
    running.caught_up("balances", &store).await;
    assert_eq!(
        balances(&read_models).await,
        vec![("a".into(), 30, 2), ("b".into(), 5, 1)]
    );
    bank(&store, &[("c", &[1, 2, 3])]).await;
    let status = running.caught_up("balances", &store).await;
    assert_eq!(balances(&read_models).await.len(), 3);
    assert_eq!(
        (status.state, status.lag_events, status.events_applied),
        (ProjectionState::Running, 0, 9)
    );
    assert_eq!(status.generation, Some(Generation(1)));
    running.stop().await;
}

async fn old_events_reach_projections_at_the_current_schema(
    store: Arc<dyn EventStore>,
    read_models: Arc<dyn ReadModels>,
) {
    let v1 = NewEvent::json("Opened", &serde_json::json!({ "id": "old", "name": "Ada" }))
        .expect("event");
    let stream = StreamId::new("account-old").expect("stream");
    store
        .append(StreamAppend::new(
            stream,
            ExpectedVersion::NoStream,
            vec![v1],
        ))
        .await
        .expect("append v1");
    let running = Running::start(
        &store,
        &read_models,
        vec![Arc::new(Balances)],
        fast_options(),
    );
    running.caught_up("balances", &store).await;
    let rows = read_models
        .query(
            "balances",
            SqlStatement::new("SELECT owner, currency FROM accounts WHERE id = $1").bind("old"),
        )
        .await
        .expect("query");
    assert_eq!(
        (rows[0].text("owner"), rows[0].text("currency")),
        (Some("Ada"), Some("EUR"))
    );
    running.stop().await;
}

/// Fails on every deposit of 13 cents: a projection bug.
struct Unlucky;

impl Projection for Unlucky {
    fn name(&self) -> &str {
        "unlucky"
    }
    fn event_types(&self) -> &[&str] {
        &["Deposited"]
    }
    fn schema(&self) -> Vec<String> {
        vec!["CREATE TABLE seen (position BIGINT PRIMARY KEY)".into()]
    }
    fn apply(&self, event: &RecordedEvent) -> Result<Vec<SqlStatement>, ProjectionError> {
        let data: serde_json::Value = event
            .data
            .to_value()
            .map_err(|e| ProjectionError::new(e.to_string()))?;
        if data["amount"] == 13 {
            return Err(ProjectionError::new("13 is unlucky"));
        }
        Ok(vec![
            SqlStatement::new("INSERT INTO seen (position) VALUES ($1)")
                .bind(event.position.0 as i64),
        ])
    }
}

async fn a_failing_projection_stops_alone(
    store: Arc<dyn EventStore>,
    read_models: Arc<dyn ReadModels>,
) {
    bank(&store, &[("a", &[1, 13, 2])]).await;
    let list: Vec<Arc<dyn Projection>> = vec![Arc::new(Unlucky), Arc::new(Balances)];
    let running = Running::start(&store, &read_models, list, fast_options());
    let failed = running
        .until("unlucky", "failed", |s| {
            matches!(s.state, ProjectionState::Failed { .. })
        })
        .await;
    let ProjectionState::Failed { error } = failed.state else {
        unreachable!()
    };
    assert!(
        error.contains("13 is unlucky"),
        "the error is visible: {error}"
    );
    bank(&store, &[("b", &[4])]).await;
    running.caught_up("balances", &store).await;
    assert_eq!(
        balances(&read_models).await,
        vec![("a".into(), 16, 3), ("b".into(), 4, 1)],
        "the others go on"
    );
    running.stop().await;
}

async fn a_rebuild_keeps_queries_working(
    store: Arc<dyn EventStore>,
    read_models: Arc<dyn ReadModels>,
) {
    let many: Vec<i64> = (1..=60).collect();
    bank(&store, &[("a", &many), ("b", &[7])]).await;
    let running = Running::start(
        &store,
        &read_models,
        vec![Arc::new(Balances)],
        fast_options(),
    );
    running.caught_up("balances", &store).await;
    let before = balances(&read_models).await;
    let head_before = store.head().await.expect("head");
    running.handle.rebuild("balances").await.expect("rebuild");
    // Queries answer from the live generation while the new one fills, and more
    // commands keep arriving.
    running
        .until("balances", "rebuilding", |s| {
            matches!(s.state, ProjectionState::Rebuilding { .. })
        })
        .await;
    assert_eq!(
        balances(&read_models).await,
        before,
        "the live read model still serves"
    );
    bank(&store, &[("c", &[3])]).await;
    let done = running
        .until("balances", "the rebuilt generation", |s| {
            s.generation == Some(Generation(2)) && s.state == ProjectionState::Running
        })
        .await;
    assert_eq!(done.generation, Some(Generation(2)));
    assert!(
        done.checkpoint >= head_before,
        "promoted only once caught up: {done:?}"
    );
    running.caught_up("balances", &store).await;
    let mut expected = before;
    expected.push(("c".into(), 3, 1));
    assert_eq!(balances(&read_models).await, expected);
    let info = read_models.list().await.expect("list");
    assert_eq!(
        info[0].generations.len(),
        1,
        "the old generation is dropped"
    );
    assert!(matches!(
        running.handle.rebuild("nope").await,
        Err(eventyr_cqrs::ProjectionsError::Unknown(_))
    ));
    running.stop().await;
}

async fn two_runners_on_one_read_model_apply_each_event_once(
    store: Arc<dyn EventStore>,
    read_models: Arc<dyn ReadModels>,
) {
    let first = Running::start(
        &store,
        &read_models,
        vec![Arc::new(Balances)],
        fast_options(),
    );
    let second = Running::start(
        &store,
        &read_models,
        vec![Arc::new(Balances)],
        fast_options(),
    );
    let deposits: Vec<i64> = (1..=40).collect();
    bank(&store, &[("a", &deposits), ("b", &deposits)]).await;
    first.caught_up("balances", &store).await;
    second.caught_up("balances", &store).await;
    let total: i64 = deposits.iter().sum();
    assert_eq!(
        balances(&read_models).await,
        vec![("a".into(), total, 40), ("b".into(), total, 40)]
    );
    first.stop().await;
    second.stop().await;
}

async fn queries_page_with_an_opaque_cursor(
    store: Arc<dyn EventStore>,
    read_models: Arc<dyn ReadModels>,
) {
    bank(
        &store,
        &[
            ("a", &[1]),
            ("b", &[2]),
            ("c", &[3]),
            ("d", &[4]),
            ("e", &[5]),
        ],
    )
    .await;
    let running = Running::start(
        &store,
        &read_models,
        vec![Arc::new(Balances)],
        fast_options(),
    );
    running.caught_up("balances", &store).await;
    let query = |cursor: Option<String>, limit: usize| PagedQuery {
        projection: "balances".into(),
        select: "SELECT id, balance FROM accounts".into(),
        filter: Some(("balance >= $1".into(), vec![SqlValue::Int(2)])),
        key: "id".into(),
        limit,
        cursor,
    };
    let decode = |row: &eventyr_store::sql::SqlRow| -> Result<String, QueryError> {
        row.text("id")
            .map(str::to_owned)
            .ok_or_else(|| QueryError::Row("no id".into()))
    };
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = fetch_page(&*read_models, query(cursor, 2), decode)
            .await
            .expect("page");
        assert!(page.items.len() <= 2);
        seen.extend(page.items);
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, vec!["b", "c", "d", "e"]);
    let bad = fetch_page(&*read_models, query(Some("garbage".into()), 2), decode).await;
    assert!(matches!(bad, Err(QueryError::InvalidCursor)));
    let bad = fetch_page(&*read_models, query(None, 0), decode).await;
    assert_eq!(bad.map_err(|e| e.code()).err(), Some("invalid_input"));
    running.stop().await;
}

on_both_read_models!(
    catches_up_then_follows_live,
    old_events_reach_projections_at_the_current_schema,
    a_failing_projection_stops_alone,
    a_rebuild_keeps_queries_working,
    two_runners_on_one_read_model_apply_each_event_once,
    queries_page_with_an_opaque_cursor,
);
