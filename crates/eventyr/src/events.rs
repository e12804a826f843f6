//! `eventyr events append|read|tail`.

use std::io::Read as _;

use anyhow::Context;
use eventyr_core::{
    EventId, EventType, Json, Metadata, NewEvent, Position, StreamId, StreamVersion,
};
use eventyr_store::{
    EventStore, Filter, READ_LIMIT_MAX, ReadAll, ReadStream, StoreError, StreamAppend,
    SubscriptionOptions, subscribe_all, subscribe_stream,
};
use futures::StreamExt;

use crate::cli::{AppendArgs, FilterArgs, ReadArgs, TailArgs};
use crate::config::Config;
use crate::output::Lines;
use crate::stores;

pub async fn append(config: &Config, args: AppendArgs) -> anyhow::Result<()> {
    let data = if args.data == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read the event data from standard input")?;
        text
    } else {
        args.data
    };
    let stream = StreamId::new(args.stream).map_err(StoreError::from)?;
    let mut event = NewEvent::new(
        EventType::new(args.event_type).map_err(StoreError::from)?,
        Json::from_slice(data.into_bytes()).map_err(StoreError::from)?,
    )
    .with_schema_version(args.schema_version)
    .with_metadata(Metadata {
        correlation_id: args.correlation_id,
        causation_id: args.causation_id,
        traceparent: None,
        user_id: args.user_id,
    });
    if let Some(id) = args.id {
        event = event.with_id(EventId::parse(&id).map_err(StoreError::from)?);
    }
    let store = stores::open(config).await?;
    let result = store
        .append(StreamAppend::new(
            stream,
            args.expected_version,
            vec![event],
        ))
        .await?;
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

fn filter(args: FilterArgs) -> Filter {
    Filter {
        event_type_prefix: args.type_prefix,
        stream_prefix: args.stream_prefix,
    }
}

pub async fn read(config: &Config, args: ReadArgs) -> anyhow::Result<()> {
    let store = stores::open(config).await?;
    let mut lines = Lines::new(&args.format, false);
    let mut remaining = args.limit.unwrap_or(u64::MAX);
    match args.stream {
        Some(stream) => {
            let stream = StreamId::new(stream).map_err(StoreError::from)?;
            let mut read = match (args.backwards, args.from) {
                (false, from) => ReadStream::forwards(StreamVersion(from.unwrap_or(0))),
                (true, from) => ReadStream::backwards(StreamVersion(from.unwrap_or(u64::MAX))),
            };
            while remaining > 0 {
                read.limit = page(remaining);
                let slice = store.read_stream(&stream, read).await?;
                for event in &slice.events {
                    if !lines.event(event)? {
                        return Ok(());
                    }
                }
                remaining -= slice.events.len() as u64;
                let Some(last) = slice.events.last().filter(|_| !slice.is_end) else {
                    break;
                };
                read.from = if args.backwards {
                    StreamVersion(last.version.0.saturating_sub(1))
                } else {
                    last.version.next()
                };
            }
        }
        None => {
            let mut read =
                ReadAll::from(Position(args.from.unwrap_or(0))).filter(filter(args.filter));
            while remaining > 0 {
                read.limit = page(remaining);
                let slice = store.read_all(&read).await?;
                for event in &slice.events {
                    if !lines.event(event)? {
                        return Ok(());
                    }
                }
                remaining -= slice.events.len() as u64;
                read.from = slice.next;
                if slice.is_end() {
                    break;
                }
            }
        }
    }
    lines.finish()
}

fn page(remaining: u64) -> usize {
    usize::try_from(remaining)
        .unwrap_or(usize::MAX)
        .min(READ_LIMIT_MAX)
}

pub async fn tail(config: &Config, args: TailArgs) -> anyhow::Result<()> {
    let store = stores::open(config).await?;
    let options = SubscriptionOptions::default();
    let mut events = match args.stream {
        Some(stream) => {
            let stream = StreamId::new(stream).map_err(StoreError::from)?;
            let from = match args.from {
                Some(version) => StreamVersion(version),
                None => end_of(&*store, &stream).await?,
            };
            subscribe_stream(store, stream, from, options).boxed()
        }
        None => {
            let from = match args.from {
                Some(position) => Position(position),
                None => store.head().await?.next(),
            };
            subscribe_all(store, from, filter(args.filter), options).boxed()
        }
    };
    let mut lines = Lines::new(&args.format, true);
    loop {
        tokio::select! {
            next = events.next() => match next {
                Some(event) => {
                    if !lines.event(&event?)? {
                        return Ok(());
                    }
                }
                None => return lines.finish(),
            },
            interrupted = tokio::signal::ctrl_c() => {
                interrupted.context("cannot listen for Ctrl-C")?;
                return lines.finish();
            }
        }
    }
}

/// The version after a stream's last event: where following it starts.
async fn end_of(store: &dyn EventStore, stream: &StreamId) -> anyhow::Result<StreamVersion> {
    let slice = store
        .read_stream(stream, ReadStream::backwards_from_end().limit(1))
        .await?;
    Ok(slice
        .stream_version
        .map_or(StreamVersion(0), StreamVersion::next))
}
