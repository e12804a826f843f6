//! The command handler's metrics, as Prometheus renders them: commands by aggregate,
//! command and outcome, their latency histogram, conflicts and retries.

mod common;

use std::sync::Arc;

use common::bank::{Account, AccountCommand, upcasters};
use eventyr_cqrs::{Command, CommandHandler, HandlerOptions};
use eventyr_store::{EventStore, MemoryStore};

#[tokio::test]
async fn commands_are_counted_by_outcome_with_bounded_labels() {
    let metrics = eventyr_telemetry::install_prometheus().expect("install the recorder");
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::default());
    let accounts =
        CommandHandler::<Account>::new(store, Arc::new(upcasters()), HandlerOptions::default());
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

    let text = metrics.render();
    for line in [
        r#"eventyr_commands_total{aggregate="account",command="open",outcome="ok"} 1"#,
        r#"eventyr_commands_total{aggregate="account",command="open",outcome="duplicate"} 1"#,
        r#"eventyr_commands_total{aggregate="account",command="deposit",outcome="ok"} 1"#,
        r#"eventyr_commands_total{aggregate="account",command="withdraw",outcome="rejected"} 1"#,
        r#"eventyr_command_duration_seconds_count{aggregate="account",command="deposit"} 1"#,
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    assert!(
        text.contains("# HELP eventyr_commands_total"),
        "metrics are described"
    );
    assert!(!text.contains("aggregate_id"), "no unbounded labels");
}
