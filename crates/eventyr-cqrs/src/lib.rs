//! CQRS on the event store.
//!
//! Write side: [`Aggregate`]s decide purely; the [`CommandHandler`] loads them
//! (snapshot + later events, upcast), decides, appends with the exact expected version,
//! and retries on conflicts. A command's id becomes its events' ids, so handling it
//! twice changes nothing. [`testing`] has the given/when/then helpers.

mod aggregate;
mod command;
mod event;
mod handler;
pub mod testing;
mod upcast;

pub use crate::aggregate::Aggregate;
pub use crate::command::{Command, CommandError, CommandId, CommandOutcome};
pub use crate::event::{AdjacentlyTagged, CodecError, DomainEvent};
pub use crate::handler::{CommandHandler, HandlerOptions, Loaded};
pub use crate::upcast::{UpcastError, UpcastStep, Upcasters};
