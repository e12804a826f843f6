//! Group-commit plumbing shared by the durable backends' writers: the request a caller
//! queues, how a writer takes a group from its queue, and how it answers the group.
//! The writer itself (a thread for SQLite, a task for PostgreSQL) runs the group in one
//! transaction with the [`crate::plan`] planner.

use eventyr_core::Position;
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::StoreError;
use crate::plan::{WriteOp, WriteOutcome};

/// One write waiting for its group, with the channel its answer goes back on.
#[derive(Debug)]
pub struct WriteRequest {
    pub op: WriteOp,
    pub reply: oneshot::Sender<Result<WriteOutcome, StoreError>>,
}

/// Each op's outcome, in the order of the group.
pub type Outcomes = Vec<Result<WriteOutcome, StoreError>>;

/// How large one group may grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupBounds {
    /// The most writes in one group.
    pub ops_max: usize,
    /// A group stops taking writes once it holds this many events.
    pub events_max: usize,
}

/// Queues `op` for the writer behind `queue` and waits for its answer.
pub async fn submit(
    queue: &mpsc::Sender<WriteRequest>,
    op: WriteOp,
) -> Result<WriteOutcome, StoreError> {
    let (reply, answer) = oneshot::channel();
    queue
        .send(WriteRequest { op, reply })
        .await
        .map_err(|_| StoreError::Closed)?;
    answer.await.map_err(|_| StoreError::Closed)?
}

/// The group that starts with `first`: it takes whatever is already queued behind it,
/// within `bounds`, without waiting for more.
pub fn take_group(
    first: WriteRequest,
    queue: &mut mpsc::Receiver<WriteRequest>,
    bounds: GroupBounds,
) -> (
    Vec<WriteOp>,
    Vec<oneshot::Sender<Result<WriteOutcome, StoreError>>>,
) {
    let mut events = event_count(&first.op);
    let mut ops = vec![first.op];
    let mut replies = vec![first.reply];
    while ops.len() < bounds.ops_max && events < bounds.events_max {
        let Ok(next) = queue.try_recv() else { break };
        events += event_count(&next.op);
        ops.push(next.op);
        replies.push(next.reply);
    }
    (ops, replies)
}

/// Answers every write of a group: each its own outcome, or all the group's failure.
pub fn answer(
    replies: Vec<oneshot::Sender<Result<WriteOutcome, StoreError>>>,
    result: Result<Outcomes, StoreError>,
) {
    match result {
        Ok(outcomes) => {
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                // A caller that stopped waiting is not an error of the write.
                let _ = reply.send(outcome);
            }
        }
        Err(failure) => {
            for reply in replies {
                let _ = reply.send(Err(failure.clone()));
            }
        }
    }
}

/// Moves the announced head forward to `to` (never back).
pub fn advance_head(head: &watch::Sender<Position>, to: Position) {
    head.send_if_modified(|current| {
        let moved = *current < to;
        *current = (*current).max(to);
        moved
    });
}

fn event_count(op: &WriteOp) -> usize {
    match op {
        WriteOp::Append(appends) => appends.iter().map(|a| a.events.len()).sum(),
        WriteOp::Delete { .. } | WriteOp::Truncate { .. } | WriteOp::SaveSnapshot(_) => 1,
    }
}
