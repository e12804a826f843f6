//! The syncer: one thread that makes the writer's commits durable.
//!
//! The writer commits each group with `synchronous = NORMAL` (WAL frames written, not
//! flushed) and hands it here. The syncer takes every group waiting, runs one
//! `fdatasync` on the WAL file, and only then answers the group's callers and
//! announces the new head. While it flushes, the writer already builds and writes the
//! next group, so SQLite work and disk flushes overlap, and one flush covers every
//! group committed before it.
//!
//! Why this is as durable as `synchronous = FULL`: a transaction is durable once its
//! WAL frames are on disk, and the frames of a WAL are replayed in order up to the
//! last valid commit. One `fdatasync` of the WAL file after the commit covers its
//! frames and everything before them. Checkpoints keep their own flushes (SQLite syncs
//! the WAL before and the database after each checkpoint in NORMAL mode).

use std::fs::File;
use std::sync::Arc;
use std::sync::mpsc::Receiver;

use eventyr_core::Position;
use eventyr_store::StoreError;
use eventyr_store::group::{Outcomes, advance_head, answer};
use eventyr_store::plan::WriteOutcome;
use tokio::sync::{oneshot, watch};

use crate::durability::Durability;

/// A committed group waiting for its flush.
#[derive(Debug)]
pub struct Committed {
    pub replies: Vec<oneshot::Sender<Result<WriteOutcome, StoreError>>>,
    pub outcomes: Outcomes,
    pub head: Position,
}

#[derive(Debug)]
pub struct Syncer {
    /// The WAL file. The writer's connection keeps the WAL from being deleted while
    /// this store is open, so this handle always names the live file.
    pub wal: File,
    pub groups: Receiver<Committed>,
    pub durability: Arc<Durability>,
    pub head: Arc<watch::Sender<Position>>,
}

impl Syncer {
    /// Serves groups until the writer is gone.
    pub fn run(self) {
        while let Ok(first) = self.groups.recv() {
            let mut groups = vec![first];
            groups.extend(self.groups.try_iter());
            let head = groups.iter().map(|g| g.head).max().unwrap_or_default();
            match self.wal.sync_data() {
                Ok(()) => {
                    self.durability.synced(head);
                    advance_head(&self.head, head);
                    for group in groups {
                        answer(group.replies, Ok(group.outcomes));
                    }
                }
                Err(error) => {
                    // After a failed flush the kernel may have dropped the dirty pages:
                    // nothing committed since the last good flush can be promised, and
                    // nothing more is accepted (as PostgreSQL does).
                    let failure = StoreError::Unavailable {
                        message: format!(
                            "the event store could not flush its log ({error}); restart it"
                        ),
                        ambiguous: true,
                        source: Some(Arc::new(error)),
                    };
                    self.durability.fail(failure.clone());
                    for group in groups {
                        answer(group.replies, Err(failure.clone()));
                    }
                }
            }
        }
    }
}
