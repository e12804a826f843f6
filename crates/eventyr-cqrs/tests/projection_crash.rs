//! Crash test for exactly-once projections: a child process runs the projection runner
//! and is killed with SIGKILL at random moments while it applies batches, several
//! rounds, with new events between rounds; then it runs to the end. The read model
//! must then equal a from-scratch rebuild: no event skipped, none applied twice (the
//! projection's balance updates are not idempotent and its movements are keyed by
//! position). On SQLite and on PostgreSQL read models.
//!
//! The binary is its own child: with `EVENTYR_PROJECTION_CHILD` set it runs the
//! runner until caught up and prints progress; otherwise it is the parent. A failure
//! prints the seed; `EVENTYR_CRASH_SEED=<seed>` replays the kill schedule.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::bank::{Balances, upcasters};
use eventyr_core::NewEvent;
use eventyr_cqrs::{Projection, RunnerOptions, projections};
use eventyr_store::readmodel::ReadModels;
use eventyr_store::sql::{SqlRow, SqlStatement};
use eventyr_store::{EventStore, ExpectedVersion, StreamAppend};
use eventyr_store_postgres::{PostgresOptions, PostgresReadModels, PostgresStore};
use eventyr_store_sqlite::{SqliteOptions, SqliteReadModels, SqliteStore};

const CHILD_ENV: &str = "EVENTYR_PROJECTION_CHILD";
const ROUNDS: usize = 5;
const ACCOUNTS_PER_ROUND: usize = 20;
const DEPOSITS_PER_ACCOUNT: i64 = 60;

/// Where one backend keeps the events and the read models.
#[derive(Debug, Clone)]
enum Place {
    Sqlite {
        dir: String,
    },
    Postgres {
        url: String,
        schema: String,
        catalog: String,
    },
}

impl Place {
    fn to_env(&self) -> String {
        match self {
            Self::Sqlite { dir } => format!("sqlite|{dir}"),
            Self::Postgres {
                url,
                schema,
                catalog,
            } => format!("postgres|{url}|{schema}|{catalog}"),
        }
    }

    fn from_env(text: &str) -> Self {
        let parts: Vec<&str> = text.split('|').collect();
        match parts.as_slice() {
            ["sqlite", dir] => Self::Sqlite { dir: (*dir).into() },
            ["postgres", url, schema, catalog] => Self::Postgres {
                url: (*url).into(),
                schema: (*schema).into(),
                catalog: (*catalog).into(),
            },
            _ => panic!("bad child place {text:?}"),
        }
    }

    /// The event store and the read models of this place; `catalog` names the
    /// read-model location (the child's, or a reference one).
    async fn open(&self, catalog: &str) -> (Arc<dyn EventStore>, Arc<dyn ReadModels>) {
        match self {
            Self::Sqlite { dir } => {
                let store = SqliteStore::open(SqliteOptions::new(format!("{dir}/events.db")))
                    .expect("open store");
                let models =
                    SqliteReadModels::open(format!("{dir}/{catalog}")).expect("open read models");
                (Arc::new(store), Arc::new(models))
            }
            Self::Postgres { url, schema, .. } => {
                let mut options = PostgresOptions::new(url);
                options.schema = schema.clone();
                let store = PostgresStore::connect(options)
                    .await
                    .expect("connect store");
                let models = PostgresReadModels::connect(url, catalog)
                    .await
                    .expect("connect read models");
                (Arc::new(store), Arc::new(models))
            }
        }
    }

    fn catalog(&self) -> String {
        match self {
            Self::Sqlite { .. } => "read".into(),
            Self::Postgres { catalog, .. } => catalog.clone(),
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn main() {
    if let Ok(place) = std::env::var(CHILD_ENV) {
        runtime().block_on(child(Place::from_env(&place)));
        return;
    }
    let seed: u64 = std::env::var("EVENTYR_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    println!("projection crash test, seed {seed}");
    let dir = tempfile::tempdir().expect("temp dir");
    let sqlite = Place::Sqlite {
        dir: dir.path().display().to_string(),
    };
    parent(&sqlite, seed);
    let url = eventyr_testkit::test_postgres_url();
    let unique = format!("{}_{}", std::process::id() % 100_000, fastrand::u16(..));
    let postgres = Place::Postgres {
        url,
        schema: format!("crash_{unique}"),
        catalog: format!("c{unique}"),
    };
    parent(&postgres, seed);
    println!("projection crash test passed on sqlite and postgres");
}

/// Runs the projection until it has caught up with the head it saw at start, printing
/// each checkpoint it reaches.
async fn child(place: Place) {
    let (store, models) = place.open(&place.catalog()).await;
    let head = store.head().await.expect("head");
    let options = RunnerOptions {
        batch_size: 100,
        ..RunnerOptions::default()
    };
    let list: Vec<Arc<dyn Projection>> = vec![Arc::new(Balances)];
    let (runner, handle) = projections(
        Arc::clone(&store),
        models,
        Arc::new(upcasters()),
        list,
        options,
    );
    let watching = async {
        let mut changes = handle.watch();
        loop {
            let status = &handle.status()[0];
            println!("checkpoint {}", status.checkpoint);
            if status.checkpoint >= head {
                return;
            }
            assert!(
                !matches!(status.state, eventyr_cqrs::ProjectionState::Failed { .. }),
                "{status:?}"
            );
            changes.changed().await.expect("runner alive");
        }
    };
    runner.run(watching).await;
}

fn parent(place: &Place, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut kills_mid_run = 0;
    for round in 0..ROUNDS {
        runtime().block_on(append_round(place, round));
        // A round is about 12 batches: kill after one of the first six, while the
        // runner applies the next.
        let kill = Kill {
            after_batches: rng.usize(1..=6),
            delay: Duration::from_micros(rng.u64(0..3000)),
        };
        let (lines, finished) = run_child(place, Some(kill));
        let progressed = lines.iter().filter(|l| l.starts_with("checkpoint")).count();
        if !finished {
            kills_mid_run += 1;
        }
        println!(
            "{place:?} round {round}: {kill:?}, {progressed} checkpoints seen, finished: {finished}"
        );
    }
    let (_, finished) = run_child(place, None);
    assert!(finished, "the last run catches up (seed {seed})");
    assert!(
        kills_mid_run > 0,
        "at least one kill landed before the runner caught up (seed {seed})"
    );
    runtime().block_on(compare_with_rebuild(place, seed));
}

/// When to SIGKILL the child: after it reports this many applied batches, plus a delay.
#[derive(Debug, Clone, Copy)]
struct Kill {
    after_batches: usize,
    delay: Duration,
}

/// Appends accounts with deposits: events whose projection is not idempotent.
async fn append_round(place: &Place, round: usize) {
    let (store, _) = place.open(&place.catalog()).await;
    for a in 0..ACCOUNTS_PER_ROUND {
        let id = format!("r{round}a{a}");
        let opened = serde_json::json!({ "id": id, "owner": "ann", "currency": "EUR" });
        let mut events = vec![
            NewEvent::json("Opened", &opened)
                .expect("event")
                .with_schema_version(3),
        ];
        let mut balance = 0;
        for amount in 1..=DEPOSITS_PER_ACCOUNT {
            balance += amount;
            events.push(
                NewEvent::json(
                    "Deposited",
                    &serde_json::json!({ "amount": amount, "balance": balance }),
                )
                .expect("event"),
            );
        }
        let stream = eventyr_core::StreamId::new(format!("account-{id}")).expect("stream");
        store
            .append(StreamAppend::new(stream, ExpectedVersion::NoStream, events))
            .await
            .expect("append");
    }
}

/// Runs the child; kills it as `kill` says, unless it finishes first. Returns its
/// output lines and whether it finished by itself.
fn run_child(place: &Place, kill: Option<Kill>) -> (Vec<String>, bool) {
    let mut child = Command::new(std::env::current_exe().expect("exe"))
        .env(CHILD_ENV, place.to_env())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("stdout");
    let (progress, reports) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = progress.send(());
            lines.push(line);
        }
        lines
    });
    let finished = match kill {
        Some(kill) => {
            // The first line is the starting checkpoint; each later one is a batch.
            let mut batches_seen = 0;
            let mut ended = false;
            while batches_seen <= kill.after_batches {
                if reports.recv_timeout(Duration::from_secs(60)).is_err() {
                    ended = true; // the child closed its output: it has exited
                    break;
                }
                batches_seen += 1;
            }
            if !ended {
                std::thread::sleep(kill.delay);
            }
            match child.try_wait().expect("poll child") {
                Some(status) => status.success(),
                None => {
                    child.kill().expect("SIGKILL");
                    child.wait().expect("reap");
                    false
                }
            }
        }
        None => child.wait().expect("wait").success(),
    };
    (reader.join().expect("reader"), finished)
}

/// Rebuilds the read model from scratch in a fresh location and compares every row.
async fn compare_with_rebuild(place: &Place, seed: u64) {
    let (store, crashed) = place.open(&place.catalog()).await;
    let reference_catalog = format!("{}x", place.catalog());
    let (_, reference) = place.open(&reference_catalog).await;
    let list: Vec<Arc<dyn Projection>> = vec![Arc::new(Balances)];
    let (runner, handle) = projections(
        Arc::clone(&store),
        Arc::clone(&reference),
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
    for table in [
        "SELECT id, owner, currency, balance, movements FROM accounts ORDER BY id",
        "SELECT position, account, amount FROM movements ORDER BY position",
    ] {
        let crashed_rows = rows(&*crashed, table).await;
        let reference_rows = rows(&*reference, table).await;
        assert!(!reference_rows.is_empty());
        assert_eq!(
            crashed_rows.len(),
            reference_rows.len(),
            "{table} (seed {seed})"
        );
        assert!(
            crashed_rows == reference_rows,
            "{table} differs from a rebuild (seed {seed})"
        );
    }
    let movements = rows(&*crashed, "SELECT position FROM movements")
        .await
        .len();
    assert_eq!(
        movements,
        ROUNDS * ACCOUNTS_PER_ROUND * DEPOSITS_PER_ACCOUNT as usize,
        "every deposit once (seed {seed})"
    );
}

async fn rows(models: &dyn ReadModels, sql: &str) -> Vec<SqlRow> {
    models
        .query("balances", SqlStatement::new(sql))
        .await
        .expect("query")
}
