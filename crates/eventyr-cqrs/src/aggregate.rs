//! [`Aggregate`]: a consistency boundary whose decisions are pure functions.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::event::DomainEvent;

/// The state of one aggregate (one stream) and the rules that change it.
///
/// `handle` decides: given the current state and a command, the events to record, or a
/// domain error. `apply` evolves the state by one event. Both are pure: no IO, no
/// clock, no randomness (time a decision needs comes in the command). The state is
/// serialisable so that it can be snapshotted.
pub trait Aggregate: Default + Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The aggregate's kind: its streams are named `{KIND}-{id}`.
    const KIND: &'static str;
    /// The version of the state's serialised shape. Raise it when the shape changes:
    /// snapshots of another version are ignored and the state is rebuilt from events.
    const SNAPSHOT_SCHEMA: u32 = 1;

    type Command: Send + Sync;
    type Event: DomainEvent;
    type Error: std::error::Error + Send + Sync + 'static;

    /// Decides what a command means for this state.
    fn handle(&self, command: &Self::Command) -> Result<Vec<Self::Event>, Self::Error>;

    /// Applies one event to the state.
    fn apply(&mut self, event: &Self::Event);

    /// A short, fixed name of a command, for metrics labels.
    fn command_name(_command: &Self::Command) -> &'static str {
        "command"
    }
}
