//! Subscriptions: catch-up from a position, then live, as a `futures::Stream`.
//!
//! There is no separate "live" path that could race with the catch-up reads: a
//! subscription only ever reads the log by position, in batches. When a read comes back
//! empty it waits for the store to announce a new head (or for `idle_poll` to pass, to
//! see other processes' commits) and reads again from where it stopped. Because
//! positions are gapless and follow commit order, reading from "the position after the
//! last one seen" can neither skip nor repeat an event, at the switch or anywhere else.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use eventyr_core::{Position, RecordedEvent, StreamId, StreamVersion};
use futures::Stream;
use tokio::sync::watch;

use crate::error::StoreError;
use crate::store::EventStore;
use crate::types::{Filter, ReadAll, ReadStream};

/// How a subscription reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionOptions {
    /// Events per read. Default 512.
    pub batch_size: usize,
    /// How long to wait for a head announcement before reading anyway, so that commits
    /// by other processes are seen. Default 500 ms.
    pub idle_poll: Duration,
}

impl Default for SubscriptionOptions {
    fn default() -> Self {
        Self {
            batch_size: 512,
            idle_poll: Duration::from_millis(500),
        }
    }
}

/// Where a subscription is in its log.
#[derive(Debug, Clone)]
enum Cursor {
    All {
        next: Position,
        filter: Filter,
    },
    Stream {
        stream: StreamId,
        next: StreamVersion,
    },
}

struct State {
    store: Arc<dyn EventStore>,
    cursor: Cursor,
    options: SubscriptionOptions,
    buffer: VecDeque<RecordedEvent>,
    heads: watch::Receiver<Position>,
    failed: bool,
}

/// Every event of `$all` matching `filter` from position `from` on, then each new one
/// as it is committed. The stream ends after yielding an error; resubscribe from the
/// position after the last event seen.
pub fn subscribe_all(
    store: Arc<dyn EventStore>,
    from: Position,
    filter: Filter,
    options: SubscriptionOptions,
) -> impl Stream<Item = Result<RecordedEvent, StoreError>> + Send + 'static {
    subscribe(store, Cursor::All { next: from, filter }, options)
}

/// Every event of `stream` from version `from` on, then each new one as it is
/// committed. A stream that does not exist yet is waited for; a deleted one ends the
/// subscription with [`StoreError::StreamDeleted`].
pub fn subscribe_stream(
    store: Arc<dyn EventStore>,
    stream: StreamId,
    from: StreamVersion,
    options: SubscriptionOptions,
) -> impl Stream<Item = Result<RecordedEvent, StoreError>> + Send + 'static {
    subscribe(store, Cursor::Stream { stream, next: from }, options)
}

fn subscribe(
    store: Arc<dyn EventStore>,
    cursor: Cursor,
    options: SubscriptionOptions,
) -> impl Stream<Item = Result<RecordedEvent, StoreError>> + Send + 'static {
    let heads = store.watch_head();
    let state = State {
        store,
        cursor,
        options,
        buffer: VecDeque::new(),
        heads,
        failed: false,
    };
    futures::stream::unfold(state, |mut state| async move {
        loop {
            if let Some(event) = state.buffer.pop_front() {
                return Some((Ok(event), state));
            }
            if state.failed {
                return None;
            }
            // Mark the current head as seen before reading: a commit that lands during
            // the read then wakes the wait below instead of being missed.
            state.heads.borrow_and_update();
            match state.fill().await {
                Ok(true) => {}
                Ok(false) => state.wait().await,
                Err(error) => {
                    state.failed = true;
                    return Some((Err(error), state));
                }
            }
        }
    })
}

impl State {
    /// Reads the next batch into the buffer. `Ok(false)` when caught up.
    async fn fill(&mut self) -> Result<bool, StoreError> {
        let batch = self.options.batch_size.max(1);
        match &mut self.cursor {
            Cursor::All { next, filter } => {
                let read = ReadAll {
                    from: *next,
                    limit: batch,
                    filter: filter.clone(),
                };
                let slice = self.store.read_all(&read).await?;
                *next = slice.next;
                let caught_up = slice.is_end();
                self.buffer.extend(slice.events);
                Ok(!caught_up || !self.buffer.is_empty())
            }
            Cursor::Stream { stream, next } => {
                let slice = self
                    .store
                    .read_stream(stream, ReadStream::forwards(*next).limit(batch))
                    .await?;
                if let Some(last) = slice.events.last() {
                    *next = last.version.next();
                }
                let found = !slice.events.is_empty();
                self.buffer.extend(slice.events);
                Ok(found)
            }
        }
    }

    async fn wait(&mut self) {
        // A closed sender (store dropped) makes `changed` return at once; sleep then, so
        // the loop polls instead of spinning.
        let idle_poll = self.options.idle_poll;
        tokio::select! {
            changed = self.heads.changed() => {
                if changed.is_err() {
                    tokio::time::sleep(idle_poll).await;
                }
            }
            () = tokio::time::sleep(idle_poll) => {}
        }
    }
}
