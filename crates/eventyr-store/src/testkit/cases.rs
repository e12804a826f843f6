//! Conformance cases for the single-threaded parts of the contract: expectations,
//! atomicity, idempotency, reads, deletion, truncation, limits, Unicode, bad input and
//! reopening.

use eventyr_core::{
    EventType, Json, Limits, Metadata, NewEvent, Position, StreamId, StreamVersion, ValidationError,
};

use super::{Backend, counted};
use crate::error::StoreError;
use crate::store::EventStore;
use crate::types::{ExpectedVersion, Filter, NewSnapshot, ReadAll, ReadStream, StreamAppend};

pub(crate) fn stream(name: &str) -> StreamId {
    StreamId::new(name).expect("test stream names are valid")
}

pub(crate) async fn open(backend: &dyn Backend) -> std::sync::Arc<dyn EventStore> {
    backend.location(Limits::default()).await.open().await
}

pub(crate) async fn append(
    store: &dyn EventStore,
    name: &str,
    expected: ExpectedVersion,
    events: Vec<NewEvent>,
) -> Result<crate::types::AppendResult, StoreError> {
    store
        .append(StreamAppend::new(stream(name), expected, events))
        .await
}

async fn all_positions(store: &dyn EventStore) -> Vec<u64> {
    let slice = store
        .read_all(&ReadAll::from(Position::ZERO))
        .await
        .expect("read $all");
    slice.events.iter().map(|e| e.position.0).collect()
}

fn versions(events: &[eventyr_core::RecordedEvent]) -> Vec<u64> {
    events.iter().map(|e| e.version.0).collect()
}

pub async fn append_and_read_back(backend: &dyn Backend) {
    let store = open(backend).await;
    let metadata = Metadata {
        correlation_id: Some("corr-1".into()),
        causation_id: Some("cmd-1".into()),
        traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        user_id: Some("alice".into()),
    };
    let events: Vec<NewEvent> = (0..3)
        .map(|n| {
            counted(n)
                .with_schema_version(2)
                .with_metadata(metadata.clone())
        })
        .collect();
    let result = append(
        &*store,
        "order-1",
        ExpectedVersion::NoStream,
        events.clone(),
    )
    .await
    .expect("append");
    assert_eq!(
        (result.first_version, result.last_version),
        (StreamVersion(0), StreamVersion(2))
    );
    assert_eq!(
        (result.first_position, result.last_position),
        (Position(1), Position(3))
    );
    assert_eq!(store.head().await.expect("head"), Position(3));

    let slice = store
        .read_stream(&stream("order-1"), ReadStream::forwards(StreamVersion(0)))
        .await
        .expect("read stream");
    assert_eq!(slice.stream_version, Some(StreamVersion(2)));
    assert!(slice.is_end);
    assert_eq!(slice.events.len(), 3);
    for (i, (read, written)) in slice.events.iter().zip(&events).enumerate() {
        assert!(
            written.same_content_as(read),
            "event {i} came back different: {read:?}"
        );
        assert_eq!(read.stream_id, stream("order-1"));
        assert_eq!(read.version, StreamVersion(i as u64));
        assert_eq!(read.position, Position(i as u64 + 1));
        assert!(
            read.recorded_at.unix_micros() > 0,
            "the store stamps the time"
        );
    }
    let all = store
        .read_all(&ReadAll::from(Position::ZERO))
        .await
        .expect("read $all");
    assert_eq!(all.events, slice.events);
    assert_eq!(all.head, Position(3));
    assert!(all.is_end());
}

pub async fn expected_versions(backend: &dyn Backend) {
    let store = open(backend).await;
    let store = &*store;
    let conflict = |r: Result<_, StoreError>, want_actual: Option<u64>| match r {
        Err(StoreError::WrongExpectedVersion { actual, .. }) => {
            assert_eq!(actual, want_actual.map(StreamVersion))
        }
        other => panic!("expected a version conflict, got {other:?}"),
    };
    conflict(
        append(store, "s", ExpectedVersion::StreamExists, vec![counted(0)]).await,
        None,
    );
    conflict(
        append(
            store,
            "s",
            ExpectedVersion::Exact(StreamVersion(0)),
            vec![counted(0)],
        )
        .await,
        None,
    );
    append(store, "s", ExpectedVersion::NoStream, vec![counted(0)])
        .await
        .expect("no stream");
    conflict(
        append(store, "s", ExpectedVersion::NoStream, vec![counted(1)]).await,
        Some(0),
    );
    conflict(
        append(
            store,
            "s",
            ExpectedVersion::Exact(StreamVersion(1)),
            vec![counted(1)],
        )
        .await,
        Some(0),
    );
    append(
        store,
        "s",
        ExpectedVersion::Exact(StreamVersion(0)),
        vec![counted(1)],
    )
    .await
    .expect("exact");
    append(store, "s", ExpectedVersion::StreamExists, vec![counted(2)])
        .await
        .expect("exists");
    let r = append(store, "s", ExpectedVersion::Any, vec![counted(3)])
        .await
        .expect("any");
    assert_eq!(r.last_version, StreamVersion(3));
    assert_eq!(
        all_positions(store).await,
        vec![1, 2, 3, 4],
        "failed appends take no position"
    );
    let err = append(store, "s", ExpectedVersion::NoStream, vec![counted(9)])
        .await
        .expect_err("the operation must fail");
    assert_eq!(err.code(), "wrong_expected_version");
    assert!(!err.is_retryable());
}

pub async fn atomic_append_across_streams(backend: &dyn Backend) {
    let store = open(backend).await;
    append(&*store, "b", ExpectedVersion::Any, vec![counted(0)])
        .await
        .expect("seed b");
    let results = store
        .append_atomic(vec![
            StreamAppend::new(
                stream("a"),
                ExpectedVersion::NoStream,
                vec![counted(1), counted(2)],
            ),
            StreamAppend::new(
                stream("b"),
                ExpectedVersion::Exact(StreamVersion(0)),
                vec![counted(3)],
            ),
        ])
        .await
        .expect("atomic append");
    assert_eq!(results.len(), 2);
    assert_eq!(results[0].stream, stream("a"));
    assert_eq!(
        (results[0].first_position, results[0].last_position),
        (Position(2), Position(3))
    );
    assert_eq!(
        (results[1].first_version, results[1].first_position),
        (StreamVersion(1), Position(4))
    );

    let failed = store
        .append_atomic(vec![
            StreamAppend::new(stream("c"), ExpectedVersion::NoStream, vec![counted(4)]),
            StreamAppend::new(
                stream("a"),
                ExpectedVersion::Exact(StreamVersion(0)),
                vec![counted(5)],
            ),
        ])
        .await;
    match failed {
        Err(StoreError::WrongExpectedVersion {
            stream: s, actual, ..
        }) => {
            assert_eq!(s, stream("a"));
            assert_eq!(actual, Some(StreamVersion(1)));
        }
        other => panic!("expected a conflict on stream a, got {other:?}"),
    }
    let c = store
        .read_stream(&stream("c"), ReadStream::forwards(StreamVersion(0)))
        .await
        .expect("read c");
    assert_eq!(
        c.stream_version, None,
        "nothing of the failed atomic append was written"
    );
    assert_eq!(store.head().await.expect("head"), Position(4));

    store
        .delete_stream(&stream("d"), ExpectedVersion::Any)
        .await
        .expect("tombstone d");
    let failed = store
        .append_atomic(vec![
            StreamAppend::new(stream("c"), ExpectedVersion::Any, vec![counted(6)]),
            StreamAppend::new(stream("d"), ExpectedVersion::Any, vec![counted(7)]),
        ])
        .await;
    assert!(
        matches!(failed, Err(StoreError::StreamDeleted { .. })),
        "{failed:?}"
    );
    assert_eq!(all_positions(&*store).await, vec![1, 2, 3, 4]);
}

pub async fn idempotent_appends(backend: &dyn Backend) {
    let store = open(backend).await;
    let store = &*store;
    let events = vec![counted(1), counted(2)];
    let first = append(store, "s", ExpectedVersion::NoStream, events.clone())
        .await
        .expect("first");
    append(store, "other", ExpectedVersion::Any, vec![counted(3)])
        .await
        .expect("other");
    // A retry after a lost answer: same ids, same content, stale expectation.
    let again = append(store, "s", ExpectedVersion::NoStream, events.clone())
        .await
        .expect("retry");
    assert_eq!(again, first);
    let again = append(store, "s", ExpectedVersion::Any, events.clone())
        .await
        .expect("retry with any");
    assert_eq!(again, first);
    assert_eq!(
        store.head().await.expect("head"),
        Position(3),
        "a retry writes nothing"
    );

    let mut changed = events.clone();
    changed[1].data = Json::encode(&"something else").expect("json");
    let err = append(store, "s", ExpectedVersion::Any, changed)
        .await
        .expect_err("the operation must fail");
    assert!(
        matches!(err, StoreError::IdempotencyConflict { event_id, .. } if event_id == events[1].id)
    );
    assert_eq!(err.code(), "idempotency_conflict");

    let partial = vec![events[0].clone(), counted(4)];
    assert!(matches!(
        append(store, "s", ExpectedVersion::Any, partial).await,
        Err(StoreError::IdempotencyConflict { .. })
    ));
    assert!(matches!(
        append(store, "elsewhere", ExpectedVersion::Any, events.clone()).await,
        Err(StoreError::IdempotencyConflict { .. })
    ));
    let mut other_metadata = events.clone();
    other_metadata[0].metadata.user_id = Some("mallory".into());
    assert!(matches!(
        append(store, "s", ExpectedVersion::Any, other_metadata).await,
        Err(StoreError::IdempotencyConflict { .. })
    ));

    let unit = vec![
        StreamAppend::new(stream("x"), ExpectedVersion::NoStream, vec![counted(5)]),
        StreamAppend::new(stream("y"), ExpectedVersion::NoStream, vec![counted(6)]),
    ];
    let first = store.append_atomic(unit.clone()).await.expect("atomic");
    assert_eq!(
        store.append_atomic(unit).await.expect("atomic retry"),
        first
    );
    assert_eq!(store.head().await.expect("head"), Position(5));
}

pub async fn reads_forwards_and_backwards(backend: &dyn Backend) {
    let store = open(backend).await;
    append(
        &*store,
        "s",
        ExpectedVersion::Any,
        (0..10).map(counted).collect(),
    )
    .await
    .expect("append");
    let s = stream("s");
    let read = |r: ReadStream| {
        let store = store.clone();
        let s = s.clone();
        async move { store.read_stream(&s, r).await.expect("read") }
    };
    let slice = read(ReadStream::forwards(StreamVersion(3)).limit(4)).await;
    assert_eq!(versions(&slice.events), vec![3, 4, 5, 6]);
    assert!(!slice.is_end);
    let slice = read(ReadStream::forwards(StreamVersion(6)).limit(4)).await;
    assert_eq!(versions(&slice.events), vec![6, 7, 8, 9]);
    assert!(slice.is_end, "the read reached the last event");
    let slice = read(ReadStream::backwards_from_end().limit(3)).await;
    assert_eq!(versions(&slice.events), vec![9, 8, 7]);
    assert!(!slice.is_end);
    let slice = read(ReadStream::backwards(StreamVersion(2)).limit(5)).await;
    assert_eq!(versions(&slice.events), vec![2, 1, 0]);
    assert!(slice.is_end);
    let slice = read(ReadStream::forwards(StreamVersion(20))).await;
    assert!(slice.events.is_empty() && slice.is_end);
    assert_eq!(slice.stream_version, Some(StreamVersion(9)));
    let slice = read(ReadStream::forwards(StreamVersion(0)).limit(0)).await;
    assert_eq!(slice.events.len(), 1, "a zero limit reads one event");

    let missing = store
        .read_stream(&stream("missing"), ReadStream::forwards(StreamVersion(0)))
        .await
        .expect("read missing");
    assert!(missing.events.is_empty() && missing.is_end);
    assert_eq!(missing.stream_version, None);
}

pub async fn reads_all_with_limits_and_filters(backend: &dyn Backend) {
    let store = open(backend).await;
    let typed = |t: &str, n: u64| NewEvent::json(t, &n).expect("event");
    for (name, t) in [
        ("order-1", "OrderPlaced"),
        ("cart-1", "CartOpened"),
        ("order-2", "OrderPlaced"),
        ("order-1", "OrderShipped"),
        ("cart-1", "CartClosed"),
        ("order-10", "OrderPlaced"),
    ] {
        append(&*store, name, ExpectedVersion::Any, vec![typed(t, 0)])
            .await
            .expect("append");
    }
    // Paging without a filter visits every position once, in order.
    let mut seen = Vec::new();
    let mut from = Position::ZERO;
    loop {
        let slice = store
            .read_all(&ReadAll::from(from).limit(4))
            .await
            .expect("page");
        assert!(slice.events.len() <= 4);
        seen.extend(slice.events.iter().map(|e| e.position.0));
        from = slice.next;
        if slice.is_end() {
            break;
        }
    }
    assert_eq!(seen, vec![1, 2, 3, 4, 5, 6]);

    let filtered = |filter: Filter, limit: usize| {
        let store = store.clone();
        async move {
            let mut seen = Vec::new();
            let mut from = Position::ZERO;
            loop {
                let read = ReadAll::from(from).limit(limit).filter(filter.clone());
                let slice = store.read_all(&read).await.expect("filtered page");
                assert!(slice.events.iter().all(|e| filter.matches(e)));
                seen.extend(slice.events.iter().map(|e| e.position.0));
                assert!(slice.next > from, "a read always makes progress");
                from = slice.next;
                if slice.is_end() {
                    return (seen, slice);
                }
            }
        }
    };
    assert_eq!(
        filtered(Filter::event_type_prefix("Order"), 1).await.0,
        vec![1, 3, 4, 6]
    );
    assert_eq!(
        filtered(Filter::event_type_prefix("OrderPlaced"), 10)
            .await
            .0,
        vec![1, 3, 6]
    );
    assert_eq!(
        filtered(Filter::stream_prefix("order-1"), 2).await.0,
        vec![1, 4, 6]
    );
    assert_eq!(
        filtered(Filter::stream_prefix("cart-"), 10).await.0,
        vec![2, 5]
    );
    let both = Filter {
        event_type_prefix: Some("OrderPlaced".into()),
        stream_prefix: Some("order-1".into()),
    };
    assert_eq!(filtered(both, 10).await.0, vec![1, 6]);
    let (none, last) = filtered(Filter::event_type_prefix("order"), 10).await;
    assert!(none.is_empty(), "prefixes are case-sensitive");
    assert_eq!((last.next, last.head), (Position(7), Position(6)));
    let (none, _) = filtered(Filter::event_type_prefix("%"), 10).await;
    assert!(
        none.is_empty(),
        "prefix characters are literal, not patterns"
    );

    let past = store
        .read_all(&ReadAll::from(Position(100)))
        .await
        .expect("read past the head");
    assert!(past.events.is_empty() && past.is_end());
    let huge = store
        .read_all(&ReadAll::from(Position::ZERO).limit(usize::MAX))
        .await
        .expect("huge limit");
    assert_eq!(huge.events.len(), 6);
}

pub async fn deleted_streams(backend: &dyn Backend) {
    let store = open(backend).await;
    let store = &*store;
    append(store, "keep", ExpectedVersion::Any, vec![counted(0)])
        .await
        .expect("keep");
    append(
        store,
        "gone",
        ExpectedVersion::Any,
        vec![counted(1), counted(2)],
    )
    .await
    .expect("gone");
    let wrong = store
        .delete_stream(&stream("gone"), ExpectedVersion::Exact(StreamVersion(0)))
        .await;
    assert!(matches!(
        wrong,
        Err(StoreError::WrongExpectedVersion {
            actual: Some(StreamVersion(1)),
            ..
        })
    ));
    store
        .delete_stream(&stream("gone"), ExpectedVersion::Exact(StreamVersion(1)))
        .await
        .expect("delete");
    let read = store
        .read_stream(&stream("gone"), ReadStream::forwards(StreamVersion(0)))
        .await;
    assert!(
        matches!(read, Err(StoreError::StreamDeleted { .. })),
        "{read:?}"
    );
    let err = append(store, "gone", ExpectedVersion::Any, vec![counted(3)])
        .await
        .expect_err("the operation must fail");
    assert!(matches!(err, StoreError::StreamDeleted { .. }));
    assert_eq!(err.code(), "stream_deleted");
    store
        .delete_stream(&stream("gone"), ExpectedVersion::Any)
        .await
        .expect("deleting twice is fine");
    assert_eq!(
        all_positions(store).await,
        vec![1],
        "the deleted stream's events are erased"
    );

    // A stream that never existed can be tombstoned, so it can never be created.
    store
        .delete_stream(&stream("never"), ExpectedVersion::NoStream)
        .await
        .expect("tombstone");
    assert!(matches!(
        append(store, "never", ExpectedVersion::NoStream, vec![counted(4)]).await,
        Err(StoreError::StreamDeleted { .. })
    ));
    // Positions are never reused, even after the last events were erased.
    let next = append(store, "keep", ExpectedVersion::Any, vec![counted(5)])
        .await
        .expect("keep again");
    assert_eq!(next.first_position, Position(4));
    assert_eq!(store.head().await.expect("head"), Position(4));
}

pub async fn truncated_streams(backend: &dyn Backend) {
    let store = open(backend).await;
    let store = &*store;
    let s = stream("s");
    append(
        store,
        "s",
        ExpectedVersion::Any,
        (0..5).map(counted).collect(),
    )
    .await
    .expect("append");
    store
        .truncate_stream(&s, StreamVersion(3))
        .await
        .expect("truncate");
    let forwards = store
        .read_stream(&s, ReadStream::forwards(StreamVersion(0)))
        .await
        .expect("read");
    assert_eq!(versions(&forwards.events), vec![3, 4]);
    assert_eq!(forwards.stream_version, Some(StreamVersion(4)));
    let backwards = store
        .read_stream(&s, ReadStream::backwards_from_end())
        .await
        .expect("read");
    assert_eq!(versions(&backwards.events), vec![4, 3]);
    assert_eq!(all_positions(store).await, vec![4, 5]);

    store
        .truncate_stream(&s, StreamVersion(1))
        .await
        .expect("a lower truncation changes nothing");
    assert_eq!(all_positions(store).await, vec![4, 5]);
    let next = append(
        store,
        "s",
        ExpectedVersion::Exact(StreamVersion(4)),
        vec![counted(5)],
    )
    .await
    .expect("append");
    assert_eq!(next.first_version, StreamVersion(5));
    store
        .truncate_stream(&s, StreamVersion(1000))
        .await
        .expect("truncate everything");
    let empty = store
        .read_stream(&s, ReadStream::forwards(StreamVersion(0)))
        .await
        .expect("read");
    assert!(empty.events.is_empty());
    assert_eq!(
        empty.stream_version,
        Some(StreamVersion(5)),
        "the stream keeps its version"
    );
    let missing = store
        .truncate_stream(&stream("missing"), StreamVersion(1))
        .await;
    assert!(
        matches!(missing, Err(StoreError::StreamNotFound { .. })),
        "{missing:?}"
    );
}

pub async fn size_limits(backend: &dyn Backend) {
    let limits = Limits {
        event_size_max_bytes: 1024,
        append_events_max: 10,
        append_size_max_bytes: 4096,
        ..Limits::default()
    };
    let store = backend.location(limits).await.open().await;
    let store = &*store;
    assert_eq!(store.limits(), &limits);
    let sized = |bytes: usize| {
        let text = "x".repeat(bytes - 2);
        NewEvent::new(
            EventType::new("Sized").expect("type"),
            Json::from_slice(format!("\"{text}\"")).expect("json"),
        )
    };
    append(store, "s", ExpectedVersion::Any, vec![sized(1024)])
        .await
        .expect("exactly at the limit");
    let err = append(store, "s", ExpectedVersion::Any, vec![sized(1025)])
        .await
        .expect_err("the operation must fail");
    assert!(matches!(
        err,
        StoreError::Invalid(ValidationError::EventTooLarge {
            size: 1025,
            max: 1024,
            ..
        })
    ));
    assert_eq!(err.code(), "payload_too_large");
    let err = append(
        store,
        "s",
        ExpectedVersion::Any,
        (0..11).map(counted).collect(),
    )
    .await
    .expect_err("the operation must fail");
    assert!(matches!(
        err,
        StoreError::Invalid(ValidationError::TooManyEvents { count: 11, max: 10 })
    ));
    let err = append(
        store,
        "s",
        ExpectedVersion::Any,
        (0..5).map(|_| sized(1000)).collect(),
    )
    .await
    .expect_err("the operation must fail");
    assert!(matches!(
        err,
        StoreError::Invalid(ValidationError::AppendTooLarge {
            size: 5000,
            max: 4096
        })
    ));
    assert_eq!(
        store.head().await.expect("head"),
        Position(1),
        "nothing refused was written"
    );
}

pub async fn unicode_round_trips(backend: &dyn Backend) {
    let store = open(backend).await;
    let data = serde_json::json!({ "名前": "Ærøskøbing ✓", "emoji": "🦀🚀", "rtl": "مرحبا", "nul": "a\u{0}b" });
    let event = NewEvent::new(
        EventType::new("Bestellung✓Aufgegeben").expect("type"),
        Json::encode(&data).expect("json"),
    )
    .with_metadata(Metadata {
        user_id: Some("ユーザー".into()),
        correlation_id: Some("κ-1".into()),
        ..Metadata::default()
    });
    append(
        &*store,
        "заказ-🚀-1",
        ExpectedVersion::NoStream,
        vec![event.clone()],
    )
    .await
    .expect("append");
    append(
        &*store,
        "заказ-2",
        ExpectedVersion::NoStream,
        vec![counted(1)],
    )
    .await
    .expect("append");
    let slice = store
        .read_stream(
            &stream("заказ-🚀-1"),
            ReadStream::forwards(StreamVersion(0)),
        )
        .await
        .expect("read");
    assert!(event.same_content_as(&slice.events[0]));
    assert_eq!(slice.events[0].data.to_value().expect("json"), data);
    let by_stream = store
        .read_all(&ReadAll::from(Position::ZERO).filter(Filter::stream_prefix("заказ-🚀")))
        .await
        .expect("read");
    assert_eq!(by_stream.events.len(), 1);
    let by_type = store
        .read_all(&ReadAll::from(Position::ZERO).filter(Filter::event_type_prefix("Bestellung✓")))
        .await
        .expect("read");
    assert_eq!(by_type.events.len(), 1);
}

pub async fn bad_input_is_refused_with_typed_errors(backend: &dyn Backend) {
    let store = open(backend).await;
    let store = &*store;
    fn invalid<T: std::fmt::Debug>(r: Result<T, StoreError>) -> ValidationError {
        match r {
            Err(StoreError::Invalid(e)) => e,
            other => panic!("expected invalid input, got {other:?}"),
        }
    }
    assert_eq!(
        invalid(store.append_atomic(vec![]).await),
        ValidationError::NothingToAppend
    );
    assert!(matches!(
        invalid(append(store, "s", ExpectedVersion::Any, vec![]).await),
        ValidationError::EmptyAppend { .. }
    ));
    let e = counted(1);
    assert!(matches!(
        invalid(append(store, "s", ExpectedVersion::Any, vec![e.clone(), e.clone()]).await),
        ValidationError::DuplicateEventId { .. }
    ));
    let twice = vec![
        StreamAppend::new(stream("s"), ExpectedVersion::Any, vec![counted(2)]),
        StreamAppend::new(stream("s"), ExpectedVersion::Any, vec![counted(3)]),
    ];
    assert!(matches!(
        invalid(store.append_atomic(twice).await),
        ValidationError::DuplicateStream { .. }
    ));
    assert_eq!(
        invalid(
            append(
                store,
                "s",
                ExpectedVersion::Any,
                vec![counted(4).with_schema_version(0)]
            )
            .await
        ),
        ValidationError::InvalidSchemaVersion
    );
    let mut bad_trace = counted(5);
    bad_trace.metadata.traceparent = Some("00-xyz".into());
    assert!(matches!(
        invalid(append(store, "s", ExpectedVersion::Any, vec![bad_trace]).await),
        ValidationError::InvalidTraceparent { .. }
    ));
    let mut control = counted(6);
    control.metadata.user_id = Some("bob\u{1b}[31m".into());
    assert!(matches!(
        invalid(append(store, "s", ExpectedVersion::Any, vec![control]).await),
        ValidationError::NotPrintable {
            field: "metadata.user_id",
            ..
        }
    ));
    let mut long = counted(7);
    long.metadata.correlation_id = Some("c".repeat(300));
    assert!(matches!(
        invalid(append(store, "s", ExpectedVersion::Any, vec![long]).await),
        ValidationError::TooLong { .. }
    ));
    // Names are checked where they are made, before any store sees them.
    assert!(
        StreamId::new("").is_err()
            && StreamId::new("$all").is_err()
            && EventType::new("a\tb").is_err()
    );
    assert!(Json::from_slice(&b"{not json"[..]).is_err());
    assert_eq!(
        store.head().await.expect("head"),
        Position::ZERO,
        "nothing was written"
    );
}

pub async fn reopen_keeps_everything(backend: &dyn Backend) {
    let location = backend.location(Limits::default()).await;
    let first = location.open().await;
    append(
        &*first,
        "s",
        ExpectedVersion::Any,
        (0..3).map(counted).collect(),
    )
    .await
    .expect("append");
    first
        .delete_stream(&stream("t"), ExpectedVersion::Any)
        .await
        .expect("tombstone");
    let before = first
        .read_all(&ReadAll::from(Position::ZERO))
        .await
        .expect("read");
    drop(first);
    let second = location.open().await;
    let after = second
        .read_all(&ReadAll::from(Position::ZERO))
        .await
        .expect("read");
    assert_eq!(after.events, before.events);
    let next = append(
        &*second,
        "s",
        ExpectedVersion::Exact(StreamVersion(2)),
        vec![counted(3)],
    )
    .await
    .expect("append after reopening");
    assert_eq!(next.first_position, Position(4));
    assert!(matches!(
        append(&*second, "t", ExpectedVersion::Any, vec![counted(4)]).await,
        Err(StoreError::StreamDeleted { .. })
    ));
}

pub async fn events_are_found_by_id(backend: &dyn Backend) {
    let store = open(backend).await;
    let store = &*store;
    let events = vec![counted(1), counted(2), counted(3)];
    append(store, "s", ExpectedVersion::Any, events.clone())
        .await
        .expect("append");
    let found = store
        .read_event(events[1].id)
        .await
        .expect("read by id")
        .expect("the event is found");
    assert!(events[1].same_content_as(&found));
    assert_eq!(
        (found.stream_id.clone(), found.version, found.position),
        (stream("s"), StreamVersion(1), Position(2))
    );
    let unknown = eventyr_core::EventId::new();
    assert_eq!(store.read_event(unknown).await.expect("read"), None);
    store
        .truncate_stream(&stream("s"), StreamVersion(1))
        .await
        .expect("truncate");
    assert_eq!(store.read_event(events[0].id).await.expect("read"), None);
    store
        .delete_stream(&stream("s"), ExpectedVersion::Any)
        .await
        .expect("delete");
    assert_eq!(store.read_event(events[2].id).await.expect("read"), None);
}

pub async fn snapshots_live_beside_their_stream(backend: &dyn Backend) {
    let limits = Limits {
        snapshot_size_max_bytes: 64,
        ..Limits::default()
    };
    let location = backend.location(limits).await;
    let store = location.open().await;
    let s = stream("acct-1");
    let snapshot = |version: u64, state: &str| NewSnapshot {
        stream: s.clone(),
        version: StreamVersion(version),
        schema_version: 2,
        data: Json::encode(&serde_json::json!({ "state": state })).expect("json"),
    };
    let missing = store.save_snapshot(snapshot(0, "a")).await;
    assert!(
        matches!(missing, Err(StoreError::StreamNotFound { .. })),
        "{missing:?}"
    );
    assert_eq!(store.load_snapshot(&s).await.expect("load"), None);

    append(
        &*store,
        "acct-1",
        ExpectedVersion::Any,
        (0..5).map(counted).collect(),
    )
    .await
    .expect("append");
    store
        .save_snapshot(snapshot(2, "at 2"))
        .await
        .expect("save");
    let loaded = store
        .load_snapshot(&s)
        .await
        .expect("load")
        .expect("a snapshot");
    assert_eq!(
        (loaded.stream.clone(), loaded.version, loaded.schema_version),
        (s.clone(), StreamVersion(2), 2)
    );
    assert_eq!(loaded.data, snapshot(2, "at 2").data);
    assert!(
        loaded.taken_at.unix_micros() > 0,
        "the store stamps the time"
    );

    store
        .save_snapshot(snapshot(4, "at 4"))
        .await
        .expect("save newer");
    store
        .save_snapshot(snapshot(3, "at 3"))
        .await
        .expect("an older save is accepted");
    let loaded = store
        .load_snapshot(&s)
        .await
        .expect("load")
        .expect("a snapshot");
    assert_eq!(
        loaded.version,
        StreamVersion(4),
        "the newest snapshot stays"
    );

    let ahead = store.save_snapshot(snapshot(9, "ahead")).await;
    assert!(
        matches!(
            ahead,
            Err(StoreError::Invalid(ValidationError::SnapshotAhead { .. }))
        ),
        "{ahead:?}"
    );
    let big = store.save_snapshot(snapshot(4, &"x".repeat(100))).await;
    assert!(
        matches!(
            big,
            Err(StoreError::Invalid(
                ValidationError::SnapshotTooLarge { .. }
            ))
        ),
        "{big:?}"
    );

    let reopened = location.open().await;
    assert_eq!(
        reopened
            .load_snapshot(&s)
            .await
            .expect("load")
            .map(|l| l.version),
        Some(StreamVersion(4))
    );
    reopened
        .truncate_stream(&s, StreamVersion(3))
        .await
        .expect("truncate");
    assert!(
        reopened.load_snapshot(&s).await.expect("load").is_some(),
        "truncation keeps the snapshot"
    );
    reopened
        .delete_stream(&s, ExpectedVersion::Any)
        .await
        .expect("delete");
    assert_eq!(
        reopened.load_snapshot(&s).await.expect("load"),
        None,
        "deletion erases the snapshot"
    );
    let deleted = reopened.save_snapshot(snapshot(4, "again")).await;
    assert!(
        matches!(deleted, Err(StoreError::StreamDeleted { .. })),
        "{deleted:?}"
    );
}
