//! Crash test: a child process appends under load to a SQLite store and is killed with
//! SIGKILL at a random moment, several rounds on the same file. After each kill the
//! store is reopened and checked:
//! - every append the child saw acknowledged is present, at the positions it was told;
//! - no group is partly visible: every atomic append is there whole or not at all;
//! - positions are gapless from 1 to the head, and every stream's versions from 0.
//!
//! The binary is its own child: with `EVENTYR_CRASH_CHILD` set it runs the writers and
//! prints one line per acknowledged append; otherwise it is the parent. A failure
//! prints the seed; `EVENTYR_CRASH_SEED=<seed>` replays the kill schedule.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventyr_core::{Metadata, NewEvent, Position, StreamId};
use eventyr_store::{EventStore, ExpectedVersion, ReadAll, StreamAppend};
use eventyr_store_sqlite::{SqliteOptions, SqliteStore};

const CHILD_ENV: &str = "EVENTYR_CRASH_CHILD";
const ROUNDS: usize = 6;
const WRITERS: usize = 16;

fn main() {
    match std::env::var(CHILD_ENV) {
        Ok(path) => child(&path),
        Err(_) => parent(),
    }
}

/// An acknowledged append unit as the child reports it: per stream, the ids and the
/// first position.
#[derive(serde::Serialize, serde::Deserialize)]
struct Ack {
    unit: String,
    appends: Vec<(String, Vec<String>, u64)>,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn child(path: &str) {
    let store =
        Arc::new(SqliteStore::open(SqliteOptions::new(path)).expect("child opens the store"));
    let stdout = Arc::new(Mutex::new(std::io::stdout()));
    runtime().block_on(async move {
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (store, stdout) = (Arc::clone(&store), Arc::clone(&stdout));
                tokio::spawn(async move { write_forever(w, store, stdout).await })
            })
            .collect();
        for writer in writers {
            writer.await.expect("writer");
        }
    });
}

async fn write_forever(
    writer: usize,
    store: Arc<SqliteStore>,
    stdout: Arc<Mutex<std::io::Stdout>>,
) {
    let mut rng = fastrand::Rng::new();
    for n in 0.. {
        let unit = format!("{}-{writer}-{n}", std::process::id());
        let streams = if rng.u8(..4) == 0 { 2 } else { 1 };
        let mut appends = Vec::new();
        for s in 0..streams {
            let size = rng.usize(1..=5);
            let stream =
                StreamId::new(format!("stream-{}", rng.u32(..50) * 2 + s)).expect("stream");
            let events = (0..size)
                .map(|i| {
                    let data = serde_json::json!({ "unit": unit, "events": size, "i": i, "pad": "x".repeat(200) });
                    NewEvent::json("Written", &data).expect("event").with_metadata(Metadata {
                        correlation_id: Some(unit.clone()),
                        ..Metadata::default()
                    })
                })
                .collect();
            appends.push(StreamAppend::new(stream, ExpectedVersion::Any, events));
        }
        let ids: Vec<Vec<String>> = appends
            .iter()
            .map(|a| a.events.iter().map(|e| e.id.to_string()).collect())
            .collect();
        let results = store.append_atomic(appends).await.expect("append");
        let ack = Ack {
            unit,
            appends: results
                .into_iter()
                .zip(ids)
                .map(|(r, ids)| (r.stream.to_string(), ids, r.first_position.0))
                .collect(),
        };
        let line = serde_json::to_string(&ack).expect("ack");
        let mut out = stdout.lock().expect("stdout");
        writeln!(out, "{line}")
            .and_then(|()| out.flush())
            .expect("report ack");
    }
}

fn parent() {
    let seed: u64 = std::env::var("EVENTYR_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    println!("sqlite crash test, seed {seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("events.db");
    let mut acknowledged: Vec<Ack> = Vec::new();
    for round in 1..=ROUNDS {
        let kill_after = Duration::from_millis(rng.u64(20..400));
        let acks = run_child_until_killed(&path, kill_after);
        println!(
            "round {round}: killed after {kill_after:?} with {} acknowledged appends",
            acks.len()
        );
        assert!(
            !acks.is_empty(),
            "round {round}: the child acknowledged nothing (seed {seed})"
        );
        acknowledged.extend(acks);
        check(&path, &acknowledged, seed);
    }
    println!(
        "sqlite crash test passed: {ROUNDS} rounds, {} acknowledged appends",
        acknowledged.len()
    );
}

/// Starts the child, waits for its first acknowledgement, lets it run for `kill_after`,
/// kills it with SIGKILL and returns the acknowledgements it printed in full.
fn run_child_until_killed(path: &std::path::Path, kill_after: Duration) -> Vec<Ack> {
    let exe = std::env::current_exe().expect("current exe");
    let mut child = Command::new(exe)
        .env(CHILD_ENV, path)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("child stdout");
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let (first_tx, first_rx) = std::sync::mpsc::channel();
    let reader = {
        let lines = Arc::clone(&lines);
        std::thread::spawn(move || {
            // `lines()` yields a final line without its newline too: keep only lines
            // that ended with one, since a cut-off report acknowledges nothing.
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                if line.ends_with('\n') {
                    lines
                        .lock()
                        .expect("lines")
                        .push(line.trim_end().to_owned());
                    let _ = first_tx.send(());
                }
                line.clear();
            }
        })
    };
    first_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the child acknowledged its first append");
    let started = Instant::now();
    while started.elapsed() < kill_after {
        std::thread::park_timeout(kill_after - started.elapsed());
    }
    child.kill().expect("SIGKILL the child");
    child.wait().expect("reap the child");
    reader.join().expect("reader thread");
    let lines = std::mem::take(&mut *lines.lock().expect("lines"));
    lines
        .iter()
        .map(|l| serde_json::from_str(l).expect("a complete ack line parses"))
        .collect()
}

fn check(path: &std::path::Path, acknowledged: &[Ack], seed: u64) {
    runtime().block_on(async {
        let store = SqliteStore::open(SqliteOptions::new(path)).expect("reopen after the kill");
        let mut events = Vec::new();
        let mut from = Position::ZERO;
        loop {
            let slice = store
                .read_all(&ReadAll::from(from))
                .await
                .expect("read $all");
            let done = slice.is_end();
            from = slice.next;
            events.extend(slice.events);
            if done {
                break;
            }
        }
        let head = store.head().await.expect("head");
        assert_eq!(
            events.len() as u64,
            head.0,
            "positions 1..=head are all present (seed {seed})"
        );
        for (i, event) in events.iter().enumerate() {
            assert_eq!(
                event.position.0,
                i as u64 + 1,
                "gapless positions (seed {seed})"
            );
        }
        let by_id: HashMap<String, u64> = events
            .iter()
            .map(|e| (e.id.to_string(), e.position.0))
            .collect();
        for ack in acknowledged {
            for (_, ids, first) in &ack.appends {
                for (offset, id) in ids.iter().enumerate() {
                    assert_eq!(
                        by_id.get(id),
                        Some(&(first + offset as u64)),
                        "acknowledged event {id} of unit {} is lost or moved (seed {seed})",
                        ack.unit
                    );
                }
            }
        }
        // Whole units only: every unit present has all its events.
        let mut per_unit: HashMap<String, (usize, usize)> = HashMap::new();
        let mut versions: HashMap<String, u64> = HashMap::new();
        for event in &events {
            let data: serde_json::Value = event.data.to_value().expect("json");
            let unit = data["unit"].as_str().expect("unit").to_owned();
            let entry = per_unit.entry(unit).or_default();
            entry.0 += 1;
            entry.1 +=
                usize::from(data["i"] == 0) * data["events"].as_u64().expect("size") as usize;
            let next = versions.entry(event.stream_id.to_string()).or_default();
            assert_eq!(
                event.version.0, *next,
                "stream versions are contiguous (seed {seed})"
            );
            *next += 1;
        }
        for (unit, (seen, expected)) in &per_unit {
            assert_eq!(
                seen, expected,
                "unit {unit} is only partly visible (seed {seed})"
            );
        }
        let units: HashSet<&str> = acknowledged.iter().map(|a| a.unit.as_str()).collect();
        assert!(units.iter().all(|u| per_unit.contains_key(*u)));
    });
}
