//! The CQRS metrics as Prometheus renders them: commands by aggregate, command and
//! outcome, their latency histogram; events applied and lag by projection.

mod common;

use std::sync::Arc;

use common::bank::{Account, AccountCommand, Balances, upcasters};
use eventyr_cqrs::{
    Command, CommandHandler, HandlerOptions, Projection, RunnerOptions, projections,
};
use eventyr_store::readmodel::ReadModels;
use eventyr_store::{EventStore, MemoryStore};
use eventyr_store_sqlite::SqliteReadModels;

#[tokio::test]
async fn commands_are_counted_by_outcome_with_bounded_labels() {
    let metrics = eventyr_telemetry::install_prometheus().expect("install the recorder");
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::default());
    let accounts = CommandHandler::<Account>::new(
        Arc::clone(&store),
        Arc::new(upcasters()),
        HandlerOptions::default(),
    );
    let open = AccountCommand::Open {
        id: "m".into(),
        owner: "ann".into(),
    };
    let open = Command::new("m", open);
    accounts.execute(open.clone()).await.expect("open");
    accounts.execute(open).await.expect("a duplicate");
    accounts
        .execute(Command::new("m", AccountCommand::Deposit { amount: 5 }))
        .await
        .expect("deposit");
    let _ = accounts
        .execute(Command::new("m", AccountCommand::Withdraw { amount: 50 }))
        .await;

    // A projection over those events: applied events and lag, by projection.
    let dir = tempfile::tempdir().expect("temp dir");
    let models: Arc<dyn ReadModels> =
        Arc::new(SqliteReadModels::open(dir.path()).expect("read models"));
    let list: Vec<Arc<dyn Projection>> = vec![Arc::new(Balances)];
    let (runner, handle) = projections(
        Arc::clone(&store),
        models,
        Arc::new(upcasters()),
        list,
        RunnerOptions::default(),
    );
    let head = store.head().await.expect("head");
    runner
        .run(async {
            let mut changes = handle.watch();
            while handle.status()[0].checkpoint < head {
                changes.changed().await.expect("runner alive");
            }
        })
        .await;

    let text = metrics.render();
    for line in [
        r#"eventyr_commands_total{aggregate="account",command="open",outcome="ok"} 1"#,
        r#"eventyr_commands_total{aggregate="account",command="open",outcome="duplicate"} 1"#,
        r#"eventyr_commands_total{aggregate="account",command="deposit",outcome="ok"} 1"#,
        r#"eventyr_commands_total{aggregate="account",command="withdraw",outcome="rejected"} 1"#,
        r#"eventyr_command_duration_seconds_count{aggregate="account",command="deposit"} 1"#,
        r#"eventyr_projection_events_applied_total{projection="balances"} 2"#,
        r#"eventyr_projection_lag_events{projection="balances"} 0"#,
        r#"eventyr_projection_lag_seconds{projection="balances"} 0"#,
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    assert!(
        text.contains("# HELP eventyr_commands_total"),
        "metrics are described"
    );
    assert!(!text.contains("aggregate_id"), "no unbounded labels");
}
