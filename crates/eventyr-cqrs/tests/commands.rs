//! The write side on the bank domain: its rules as given/when/then tests, then the
//! command handler on every backend — conflicts and retries, idempotent commands,
//! causation and correlation, snapshots, upcasting, metrics.

#[macro_use]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use common::bank::{Account, AccountCommand, AccountError, AccountEvent, upcasters};
use eventyr_core::{
    EventId, Json, Limits, NewEvent, Position, RecordedEvent, RetryPolicy, StreamId, StreamVersion,
};
use eventyr_cqrs::testing::given;
use eventyr_cqrs::{Command, CommandError, CommandHandler, CommandId, HandlerOptions, UpcastError};
use eventyr_store::{
    AllSlice, AppendResult, EventStore, ExpectedVersion, NewSnapshot, ReadAll, ReadStream,
    Snapshot, StoreError, StreamAppend, StreamSlice,
};
use tokio::sync::watch;

use AccountCommand::{Deposit, Open, Transfer, Withdraw};

fn opened(id: &str) -> AccountEvent {
    AccountEvent::Opened {
        id: id.into(),
        owner: "ann".into(),
        currency: "EUR".into(),
    }
}

#[test]
fn accounts_open_once_and_only_open_accounts_move_money() {
    given::<Account>([])
        .when(Open {
            id: "a".into(),
            owner: "ann".into(),
        })
        .then([opened("a")]);
    given::<Account>([opened("a")])
        .when(Open {
            id: "a".into(),
            owner: "bob".into(),
        })
        .then_error(|e| *e == AccountError::AlreadyOpen);
    given::<Account>([])
        .when(Deposit { amount: 5 })
        .then_error(|e| *e == AccountError::NotOpen);
}

#[test]
fn amounts_are_positive_and_balances_never_negative() {
    let state = given::<Account>([opened("a")])
        .when(Deposit { amount: 500 })
        .then([AccountEvent::Deposited {
            amount: 500,
            balance: 500,
        }]);
    assert_eq!(state.balance, 500);
    for amount in [0, -1] {
        given::<Account>([opened("a")])
            .when(Deposit { amount })
            .then_error(|e| *e == AccountError::NonPositiveAmount(amount));
    }
    let funded = [
        opened("a"),
        AccountEvent::Deposited {
            amount: 100,
            balance: 100,
        },
    ];
    given::<Account>(funded.clone())
        .when(Withdraw { amount: 101 })
        .then_error(|e| {
            matches!(
                e,
                AccountError::InsufficientFunds {
                    balance: 100,
                    amount: 101
                }
            )
        });
    given::<Account>(funded.clone())
        .when(Withdraw { amount: 100 })
        .then([AccountEvent::Withdrawn {
            amount: 100,
            balance: 0,
        }]);
    given::<Account>(funded.clone())
        .when(Transfer {
            to: "b".into(),
            amount: 40,
        })
        .then([AccountEvent::TransferredOut {
            to: "b".into(),
            amount: 40,
            balance: 60,
        }]);
    given::<Account>(funded)
        .when(Transfer {
            to: "a".into(),
            amount: 40,
        })
        .then_error(|e| *e == AccountError::SelfTransfer);
}

fn fast_retries(attempts_max: u32) -> HandlerOptions {
    HandlerOptions {
        retry: RetryPolicy {
            attempts_max,
            initial_delay: Duration::from_millis(1),
            ..RetryPolicy::COMMANDS
        },
        rng_seed: Some(7),
        ..HandlerOptions::default()
    }
}

fn handler(store: &Arc<dyn EventStore>, options: HandlerOptions) -> CommandHandler<Account> {
    CommandHandler::new(Arc::clone(store), Arc::new(upcasters()), options)
}

async fn open_account(handler: &CommandHandler<Account>, id: &str) {
    handler
        .execute(Command::new(
            id,
            Open {
                id: id.into(),
                owner: "ann".into(),
            },
        ))
        .await
        .expect("open");
}

async fn commands_change_state_and_carry_their_context(store: Arc<dyn EventStore>) {
    let accounts = handler(&store, HandlerOptions::default());
    open_account(&accounts, "a").await;
    let deposit = Command::new("a", Deposit { amount: 250 })
        .with_correlation_id("checkout-9")
        .with_user_id("ann");
    let done = accounts.execute(deposit.clone()).await.expect("deposit");
    assert_eq!(
        (done.events, done.stream_version, done.duplicate),
        (1, Some(StreamVersion(1)), false)
    );
    let rejected = accounts
        .execute(Command::new("a", Withdraw { amount: 1_000 }))
        .await;
    assert!(matches!(
        rejected,
        Err(CommandError::Rejected(
            AccountError::InsufficientFunds { .. }
        ))
    ));
    assert_eq!(rejected.map_err(|e| e.code()).err(), Some("rejected"));
    let loaded = accounts.load("a").await.expect("load");
    assert_eq!(
        (loaded.state.balance, loaded.version),
        (250, Some(StreamVersion(1)))
    );

    let stream = StreamId::new("account-a").expect("stream");
    let events = store
        .read_stream(&stream, ReadStream::forwards(StreamVersion(0)))
        .await
        .expect("read");
    assert_eq!(events.events.len(), 2, "a rejected command appends nothing");
    let recorded = &events.events[1];
    assert_eq!(
        recorded.id,
        deposit.id.event_id(0),
        "the command id names its events"
    );
    assert_eq!(
        recorded.metadata.causation_id.as_deref(),
        Some(deposit.id.as_str())
    );
    assert_eq!(
        recorded.metadata.correlation_id.as_deref(),
        Some("checkout-9")
    );
    assert_eq!(recorded.metadata.user_id.as_deref(), Some("ann"));
    let first = &events.events[0];
    assert_eq!(
        first.metadata.correlation_id, first.metadata.causation_id,
        "a new flow correlates with itself"
    );
    let bad = accounts
        .execute(Command::new("", Deposit { amount: 1 }))
        .await;
    assert!(
        matches!(bad, Err(CommandError::Invalid(_))),
        "an empty aggregate id is invalid input"
    );
}

async fn a_repeated_command_has_its_effect_once(store: Arc<dyn EventStore>) {
    let accounts = handler(&store, HandlerOptions::default());
    open_account(&accounts, "a").await;
    let deposit =
        Command::new("a", Deposit { amount: 100 }).with_id(CommandId::new("req-42").expect("id"));
    let first = accounts.execute(deposit.clone()).await.expect("first");
    accounts
        .execute(Command::new("a", Deposit { amount: 1 }))
        .await
        .expect("another");
    let again = accounts.execute(deposit.clone()).await.expect("again");
    assert!(again.duplicate);
    assert_eq!(
        (again.positions, again.events),
        (first.positions, first.events),
        "the original outcome"
    );
    assert_eq!(
        accounts.load("a").await.expect("load").state.balance,
        101,
        "deposited once"
    );
    // With snapshots, the original events lie before the snapshot and loading never
    // meets them: a repeated command must still answer with its first outcome.
    let options = HandlerOptions {
        snapshot_every: Some(2),
        ..HandlerOptions::default()
    };
    let snapshotting = handler(&store, options);
    let open = Command::new(
        "s",
        Open {
            id: "s".into(),
            owner: "ann".into(),
        },
    );
    let opened = snapshotting.execute(open.clone()).await.expect("open");
    let repeat = Command::new("s", Deposit { amount: 1 });
    let first = snapshotting.execute(repeat.clone()).await.expect("deposit");
    for amount in 1..=5 {
        snapshotting
            .execute(Command::new("s", Deposit { amount }))
            .await
            .expect("deposit");
    }
    assert!(
        snapshotting
            .load("s")
            .await
            .expect("load")
            .snapshot
            .is_some()
    );
    let again = snapshotting
        .execute(open)
        .await
        .expect("not rejected as already open");
    assert!(
        again.duplicate && again.positions == opened.positions,
        "{again:?}"
    );
    let again = snapshotting.execute(repeat).await.expect("repeat");
    assert!(
        again.duplicate && again.positions == first.positions,
        "the re-decided event differs, the id tells"
    );
    assert_eq!(
        snapshotting.load("s").await.expect("load").state.balance,
        1 + 15
    );

    open_account(&accounts, "b").await;
    let reused = accounts
        .execute(Command::new("b", Deposit { amount: 5 }).with_id(deposit.id.clone()))
        .await;
    assert!(
        matches!(reused, Err(CommandError::CommandIdReused { .. })),
        "{reused:?}"
    );
}

async fn conflicts_are_retried_then_reported(store: Arc<dyn EventStore>) {
    let setup = handler(&store, HandlerOptions::default());
    open_account(&setup, "a").await;
    // Another writer slips an event in before each of the first two appends.
    let racy: Arc<dyn EventStore> = Arc::new(Interfering::new(Arc::clone(&store), 2));
    let accounts = handler(&racy, fast_retries(3));
    let done = accounts
        .execute(Command::new("a", Deposit { amount: 10 }))
        .await
        .expect("third attempt");
    assert_eq!(done.attempts, 3);
    assert_eq!(
        accounts.load("a").await.expect("load").state.balance,
        10 + 2,
        "decided on the newest state"
    );

    let racy: Arc<dyn EventStore> = Arc::new(Interfering::new(Arc::clone(&store), 5));
    let accounts = handler(&racy, fast_retries(3));
    let failed = accounts
        .execute(Command::new("a", Deposit { amount: 10 }))
        .await;
    assert!(
        matches!(failed, Err(CommandError::Conflict { attempts: 3, .. })),
        "{failed:?}"
    );

    // Many clients on one account: every deposit lands once.
    let accounts = Arc::new(handler(&store, fast_retries(50)));
    let before = accounts.load("a").await.expect("load").state.balance;
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let accounts = Arc::clone(&accounts);
            tokio::spawn(async move {
                accounts
                    .execute(Command::new("a", Deposit { amount: 1 }))
                    .await
            })
        })
        .collect();
    for client in clients {
        client.await.expect("task").expect("deposit");
    }
    assert_eq!(
        accounts.load("a").await.expect("load").state.balance,
        before + 8
    );
}

async fn snapshots_shorten_loading_without_changing_state(store: Arc<dyn EventStore>) {
    let options = HandlerOptions {
        snapshot_every: Some(10),
        ..HandlerOptions::default()
    };
    let with_snapshots = handler(&store, options);
    let without = handler(&store, HandlerOptions::default());
    open_account(&with_snapshots, "a").await;
    for amount in 1..=24 {
        with_snapshots
            .execute(Command::new("a", Deposit { amount }))
            .await
            .expect("deposit");
    }
    let fast = with_snapshots.load("a").await.expect("load with snapshot");
    let slow = without.load("a").await.expect("load without");
    assert_eq!(fast.state, slow.state);
    assert_eq!(fast.version, slow.version);
    assert_eq!(
        fast.snapshot,
        Some(StreamVersion(19)),
        "the newest multiple of 10 events"
    );
    assert_eq!((fast.replayed, slow.replayed), (5, 25));

    // A snapshot of another schema version is ignored: the state comes from events.
    let stream = StreamId::new("account-a").expect("stream");
    let stale = NewSnapshot {
        stream,
        version: StreamVersion(24),
        schema_version: 99,
        data: Json::encode(&serde_json::json!({ "not": "an account" })).expect("json"),
    };
    store.save_snapshot(stale).await.expect("save");
    let rebuilt = with_snapshots.load("a").await.expect("load");
    assert_eq!((rebuilt.snapshot, rebuilt.state), (None, slow.state));
}

async fn old_events_are_read_at_the_current_schema(store: Arc<dyn EventStore>) {
    let stream = StreamId::new("account-old").expect("stream");
    let v1 = NewEvent::json("Opened", &serde_json::json!({ "id": "old", "name": "Ada" }))
        .expect("event");
    let deposit = NewEvent::json(
        "Deposited",
        &serde_json::json!({ "amount": 7, "balance": 7 }),
    )
    .expect("event");
    store
        .append(StreamAppend::new(
            stream.clone(),
            ExpectedVersion::NoStream,
            vec![v1, deposit],
        ))
        .await
        .expect("append v1 history");
    // The aggregate path.
    let accounts = handler(&store, HandlerOptions::default());
    let loaded = accounts.load("old").await.expect("load");
    assert_eq!(
        (
            loaded.state.owner.as_str(),
            loaded.state.currency.as_str(),
            loaded.state.balance
        ),
        ("Ada", "EUR", 7)
    );
    // The projection path: the same registry over the same stored event.
    let stored = store
        .read_stream(&stream, ReadStream::forwards(StreamVersion(0)))
        .await
        .expect("read");
    let current = upcasters()
        .upcast(stored.events[0].clone())
        .expect("upcast");
    assert_eq!(current.schema_version, 3);
    assert_eq!(
        current.data.to_value().expect("json"),
        serde_json::json!({ "id": "old", "owner": "Ada", "currency": "EUR" })
    );
    // New events are written at the current version.
    accounts
        .execute(Command::new("old", Deposit { amount: 1 }))
        .await
        .expect("deposit");
    open_account(&accounts, "new").await;
    let fresh = store
        .read_stream(
            &StreamId::new("account-new").expect("stream"),
            ReadStream::forwards(StreamVersion(0)),
        )
        .await
        .expect("read");
    assert_eq!(fresh.events[0].schema_version, 3);
    // A version from the future is a clear error, not a silent drop.
    let future = NewEvent::json("Opened", &serde_json::json!({}))
        .expect("event")
        .with_schema_version(4);
    store
        .append(StreamAppend::new(
            StreamId::new("account-future").expect("stream"),
            ExpectedVersion::Any,
            vec![future],
        ))
        .await
        .expect("append");
    let error = accounts
        .load("future")
        .await
        .expect_err("unknown newer version");
    assert!(matches!(
        error,
        CommandError::Upcast(UpcastError::NewerThanKnown {
            version: 4,
            current: 3,
            ..
        })
    ));
    assert_eq!(error.code(), "unreadable_event");
}

on_every_backend!(
    commands_change_state_and_carry_their_context,
    a_repeated_command_has_its_effect_once,
    conflicts_are_retried_then_reported,
    snapshots_shorten_loading_without_changing_state,
    old_events_are_read_at_the_current_schema,
);

/// A real store with a fault: before each of the first `times` appends, another writer
/// appends a deposit of 1 to the same stream, so the append meets a version conflict.
#[derive(Debug)]
struct Interfering {
    inner: Arc<dyn EventStore>,
    remaining: AtomicU32,
}

impl Interfering {
    fn new(inner: Arc<dyn EventStore>, times: u32) -> Self {
        Self {
            inner,
            remaining: AtomicU32::new(times),
        }
    }
}

#[async_trait]
impl EventStore for Interfering {
    async fn append_atomic(
        &self,
        appends: Vec<StreamAppend>,
    ) -> Result<Vec<AppendResult>, StoreError> {
        let interfere = self
            .remaining
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if interfere {
            let stream = appends[0].stream.clone();
            let current = self
                .inner
                .read_stream(&stream, ReadStream::backwards_from_end().limit(1))
                .await?;
            let balance = current
                .events
                .first()
                .and_then(|e| e.data.decode::<serde_json::Value>().ok())
                .and_then(|d| d["balance"].as_i64())
                .unwrap_or(0);
            let deposit = NewEvent::json(
                "Deposited",
                &serde_json::json!({ "amount": 1, "balance": balance + 1 }),
            )?;
            self.inner
                .append(StreamAppend::new(
                    stream,
                    ExpectedVersion::Any,
                    vec![deposit],
                ))
                .await?;
        }
        self.inner.append_atomic(appends).await
    }
    async fn read_stream(
        &self,
        stream: &StreamId,
        read: ReadStream,
    ) -> Result<StreamSlice, StoreError> {
        self.inner.read_stream(stream, read).await
    }
    async fn read_all(&self, read: &ReadAll) -> Result<AllSlice, StoreError> {
        self.inner.read_all(read).await
    }
    async fn delete_stream(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
    ) -> Result<(), StoreError> {
        self.inner.delete_stream(stream, expected).await
    }
    async fn truncate_stream(
        &self,
        stream: &StreamId,
        before: StreamVersion,
    ) -> Result<(), StoreError> {
        self.inner.truncate_stream(stream, before).await
    }
    async fn read_event(&self, id: EventId) -> Result<Option<RecordedEvent>, StoreError> {
        self.inner.read_event(id).await
    }
    async fn save_snapshot(&self, snapshot: NewSnapshot) -> Result<(), StoreError> {
        self.inner.save_snapshot(snapshot).await
    }
    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, StoreError> {
        self.inner.load_snapshot(stream).await
    }
    async fn head(&self) -> Result<Position, StoreError> {
        self.inner.head().await
    }
    fn watch_head(&self) -> watch::Receiver<Position> {
        self.inner.watch_head()
    }
    fn limits(&self) -> &Limits {
        self.inner.limits()
    }
}
