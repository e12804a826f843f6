//! Conformance cases with concurrency: conflicting writers, subscriptions while writers
//! run, and the gapless, commit-ordered global position under many writers in several
//! store instances (separate "processes" on one storage location).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use eventyr_core::{EventId, Limits, Position, RecordedEvent, StreamVersion};
use futures::{Stream, StreamExt};

use super::cases::{append, open, stream};
use super::{Backend, WAIT, counted};
use crate::error::StoreError;
use crate::store::EventStore;
use crate::subscription::{SubscriptionOptions, subscribe_all, subscribe_stream};
use crate::types::{ExpectedVersion, Filter, ReadAll, ReadStream};

const FAST_POLL: SubscriptionOptions = SubscriptionOptions {
    batch_size: 7,
    idle_poll: Duration::from_millis(50),
};

async fn take<S>(subscription: &mut S, count: usize) -> Vec<RecordedEvent>
where
    S: Stream<Item = Result<RecordedEvent, StoreError>> + Unpin,
{
    let mut events = Vec::with_capacity(count);
    while events.len() < count {
        match tokio::time::timeout(WAIT, subscription.next()).await {
            Ok(Some(Ok(event))) => events.push(event),
            Ok(Some(Err(e))) => panic!("subscription failed after {} events: {e}", events.len()),
            Ok(None) => panic!("subscription ended after {} events", events.len()),
            Err(_) => panic!(
                "subscription stalled after {} of {count} events",
                events.len()
            ),
        }
    }
    events
}

pub async fn concurrent_conflicting_appends_one_wins(backend: &dyn Backend) {
    let location = backend.location(Limits::default()).await;
    let stores = [location.open().await, location.open().await];
    append(
        &*stores[0],
        "s",
        ExpectedVersion::NoStream,
        vec![counted(0)],
    )
    .await
    .expect("seed");
    let tasks: Vec<_> = (0..16u64)
        .map(|n| {
            let store = Arc::clone(&stores[n as usize % 2]);
            tokio::spawn(async move {
                append(
                    &*store,
                    "s",
                    ExpectedVersion::Exact(StreamVersion(0)),
                    vec![counted(n)],
                )
                .await
            })
        })
        .collect();
    let mut wins = 0;
    for task in tasks {
        match task.await.expect("task") {
            Ok(result) => {
                wins += 1;
                assert_eq!(result.first_version, StreamVersion(1));
            }
            Err(StoreError::WrongExpectedVersion { actual, .. }) => {
                assert_eq!(actual, Some(StreamVersion(1)))
            }
            Err(other) => panic!("unexpected error {other}"),
        }
    }
    assert_eq!(wins, 1, "exactly one writer wins the race");
    assert_eq!(
        stores[1].head().await.expect("head"),
        Position(2),
        "losers take no position"
    );
}

pub async fn subscription_catches_up_then_goes_live(backend: &dyn Backend) {
    let location = backend.location(Limits::default()).await;
    let store = location.open().await;
    for n in 0..10 {
        let name = if n % 2 == 0 { "even-1" } else { "odd-1" };
        append(
            &*store,
            name,
            ExpectedVersion::Any,
            (0..5).map(|i| counted(n * 5 + i)).collect(),
        )
        .await
        .expect("seed");
    }
    let mut everything = Box::pin(subscribe_all(
        store.clone(),
        Position::ZERO,
        Filter::default(),
        FAST_POLL,
    ));
    let mut evens = Box::pin(subscribe_all(
        store.clone(),
        Position(3),
        Filter::stream_prefix("even-"),
        FAST_POLL,
    ));
    let first = take(&mut everything, 20).await;
    // A second instance writes while the subscriptions are between catching up and live.
    let writer = location.open().await;
    let writing = tokio::spawn(async move {
        for n in 10..40 {
            let name = if n % 2 == 0 { "even-2" } else { "odd-2" };
            append(
                &*writer,
                name,
                ExpectedVersion::Any,
                (0..5).map(|i| counted(n * 5 + i)).collect(),
            )
            .await
            .expect("live append");
        }
    });
    let rest = take(&mut everything, 180).await;
    writing.await.expect("writer");
    let positions: Vec<u64> = first.iter().chain(&rest).map(|e| e.position.0).collect();
    assert_eq!(
        positions,
        (1..=200).collect::<Vec<_>>(),
        "no gap and no duplicate"
    );

    let even = take(&mut evens, 98).await;
    assert!(
        even.iter()
            .all(|e| e.stream_id.as_str().starts_with("even-"))
    );
    assert_eq!(even[0].position, Position(3), "from position 3 on");
    assert!(even.windows(2).all(|w| w[0].position < w[1].position));

    append(&*store, "odd-3", ExpectedVersion::Any, vec![counted(1000)])
        .await
        .expect("one more");
    assert_eq!(take(&mut everything, 1).await[0].position, Position(201));
}

pub async fn stream_subscription_waits_and_follows(backend: &dyn Backend) {
    let store = open(backend).await;
    let mut followed = Box::pin(subscribe_stream(
        store.clone(),
        stream("s"),
        StreamVersion(0),
        FAST_POLL,
    ));
    let writer = store.clone();
    let writing = tokio::spawn(async move {
        for n in 0..5 {
            append(
                &*writer,
                "other",
                ExpectedVersion::Any,
                vec![counted(100 + n)],
            )
            .await
            .expect("other");
            append(&*writer, "s", ExpectedVersion::Any, vec![counted(n)])
                .await
                .expect("s");
        }
    });
    let events = take(&mut followed, 5).await;
    writing.await.expect("writer");
    assert!(events.iter().all(|e| e.stream_id == stream("s")));
    assert_eq!(
        events.iter().map(|e| e.version.0).collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4]
    );
    store
        .delete_stream(&stream("s"), ExpectedVersion::Any)
        .await
        .expect("delete");
    match tokio::time::timeout(WAIT, followed.next()).await {
        Ok(Some(Err(StoreError::StreamDeleted { .. }))) => {}
        other => panic!("a deleted stream ends its subscription with StreamDeleted, got {other:?}"),
    }
    assert!(followed.next().await.is_none());
}

/// The property the PostgreSQL-backed stores of other projects break: under many
/// concurrent writers in several processes, a reader following `$all` must see every
/// position in order, with no gap that is filled later.
pub async fn positions_are_gapless_in_commit_order_under_concurrency(backend: &dyn Backend) {
    const INSTANCES: usize = 3;
    const WRITERS_PER_INSTANCE: usize = 4;
    const APPENDS_PER_WRITER: usize = 40;
    const STREAMS: u64 = 12;
    let seed = fastrand::u64(..);
    eprintln!("gapless-positions seed: {seed}");

    let location = backend.location(Limits::default()).await;
    let mut instances = Vec::new();
    for _ in 0..INSTANCES {
        instances.push(location.open().await);
    }
    let done = Arc::new(AtomicBool::new(false));
    let reader = tokio::spawn(follow_all(Arc::clone(&instances[0]), Arc::clone(&done)));

    let mut writers = Vec::new();
    for (w, store) in (0..INSTANCES * WRITERS_PER_INSTANCE).zip(instances.iter().cycle()) {
        let store = Arc::clone(store);
        writers.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(seed ^ w as u64);
            let mut acknowledged: Vec<(EventId, Position)> = Vec::new();
            for _ in 0..APPENDS_PER_WRITER {
                let name = format!("stream-{}", rng.u64(..STREAMS));
                let events: Vec<_> = (0..rng.u64(1..=3)).map(|_| counted(rng.u64(..))).collect();
                // Some writers expect a version they just read, so conflicts happen
                // inside groups and must fail alone.
                let expected = if rng.bool() {
                    let slice = store
                        .read_stream(&stream(&name), ReadStream::backwards_from_end().limit(1))
                        .await
                        .expect("read");
                    slice
                        .stream_version
                        .map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact)
                } else {
                    ExpectedVersion::Any
                };
                match append(&*store, &name, expected, events.clone()).await {
                    Ok(result) => {
                        let positions =
                            (result.first_position.0..=result.last_position.0).map(Position);
                        acknowledged.extend(events.iter().map(|e| e.id).zip(positions));
                    }
                    Err(StoreError::WrongExpectedVersion { .. }) => {}
                    Err(other) => panic!("writer {w} failed: {other}"),
                }
            }
            acknowledged
        }));
    }
    let mut acknowledged: HashMap<EventId, Position> = HashMap::new();
    for writer in writers {
        acknowledged.extend(writer.await.expect("writer task"));
    }
    done.store(true, Ordering::SeqCst);
    let followed = reader.await.expect("reader task");

    let head = instances[1].head().await.expect("head");
    assert_eq!(
        head.0 as usize,
        acknowledged.len(),
        "every position belongs to an acknowledged event"
    );
    assert_eq!(
        followed.len(),
        acknowledged.len(),
        "the follower saw every event (seed {seed})"
    );
    for event in &followed {
        assert_eq!(
            acknowledged.get(&event.id),
            Some(&event.position),
            "acknowledged where it is (seed {seed})"
        );
    }
    let stored = instances[2]
        .read_all(&ReadAll::from(Position::ZERO))
        .await
        .expect("read");
    assert_eq!(
        stored.events, followed,
        "a late reader sees exactly what the follower saw"
    );
}

/// Follows `$all` until `done` is set and the head is reached, checking on every read
/// that the first new event is exactly the next position.
async fn follow_all(store: Arc<dyn EventStore>, done: Arc<AtomicBool>) -> Vec<RecordedEvent> {
    let mut heads = store.watch_head();
    let mut followed: Vec<RecordedEvent> = Vec::new();
    let mut next = Position::FIRST;
    loop {
        let finished = done.load(Ordering::SeqCst);
        heads.borrow_and_update();
        let slice = store
            .read_all(&ReadAll::from(next).limit(64))
            .await
            .expect("follower read");
        for event in slice.events {
            assert_eq!(
                event.position, next,
                "the follower expected position {next} and met {}: a gap or a reorder",
                event.position
            );
            next = next.next();
            followed.push(event);
        }
        if finished && slice.next > slice.head {
            return followed;
        }
        // Another instance's commits are not announced here: wait for a local
        // announcement, at most a millisecond.
        let _ = tokio::time::timeout(Duration::from_millis(1), heads.changed()).await;
    }
}
