//! What this store instance has committed versus made durable, shared by the writer
//! (which commits without flushing), the syncer (which flushes) and the readers (which
//! must not return an event of ours before it is durable).

use std::sync::{Mutex, MutexGuard};

use eventyr_core::Position;
use eventyr_store::StoreError;
use tokio::sync::watch;

#[derive(Debug, Default)]
struct State {
    /// The last position this instance has committed (visible in the database).
    committed: Position,
    /// The last position this instance has made durable.
    durable: Position,
    /// Set when a flush failed: nothing more is acknowledged.
    failed: Option<StoreError>,
}

#[derive(Debug)]
pub struct Durability {
    state: Mutex<State>,
    changed: watch::Sender<()>,
}

impl Durability {
    /// Starts with everything up to `head` durable (it was read from disk).
    pub fn new(head: Position) -> Self {
        Self {
            state: Mutex::new(State {
                committed: head,
                durable: head,
                failed: None,
            }),
            changed: watch::Sender::new(()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Called by the writer just before a commit makes positions up to `head` visible.
    /// Returns the previous value, to restore if the commit fails.
    pub fn committing(&self, head: Position) -> Position {
        let mut state = self.lock();
        let previous = state.committed;
        state.committed = state.committed.max(head);
        previous
    }

    /// Called by the writer when a commit announced with [`Self::committing`] failed.
    pub fn commit_failed(&self, previous: Position) {
        let mut state = self.lock();
        state.committed = previous.max(state.durable);
        drop(state);
        self.changed.send_replace(());
    }

    /// Called by the syncer after a flush made everything up to `head` durable.
    pub fn synced(&self, head: Position) {
        let mut state = self.lock();
        state.durable = state.durable.max(head);
        drop(state);
        self.changed.send_replace(());
    }

    /// Called by the syncer when a flush failed: from now on nothing is acknowledged.
    pub fn fail(&self, error: StoreError) {
        self.lock().failed.get_or_insert(error);
        self.changed.send_replace(());
    }

    /// Refuses new writes once a flush has failed.
    pub fn check(&self) -> Result<(), StoreError> {
        match &self.lock().failed {
            Some(error) => Err(error.clone()),
            None => Ok(()),
        }
    }

    /// Waits until no event of this instance at or below `position` is still waiting
    /// for its flush. Positions written by other processes never wait here.
    pub async fn wait_for(&self, position: Position) -> Result<(), StoreError> {
        let mut changed = self.changed.subscribe();
        loop {
            {
                let state = self.lock();
                if state.durable >= position.min(state.committed) {
                    return Ok(());
                }
                if let Some(error) = &state.failed {
                    return Err(error.clone());
                }
            }
            if changed.changed().await.is_err() {
                return Err(StoreError::Closed);
            }
        }
    }
}
