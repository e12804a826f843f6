//! CQRS on the event store.
//!
//! Write side: [`Aggregate`]s decide purely; the [`CommandHandler`] loads them
//! (snapshot + later events, upcast), decides, appends with the exact expected version,
//! and retries on conflicts. A command's id becomes its events' ids, so handling it
//! twice changes nothing. [`testing`] has the given/when/then helpers.
//!
//! Read side: a [`Projection`] turns events into SQL statements; the runner
//! ([`projections`]) applies them to read models (`eventyr_store::readmodel`) in
//! batches, each batch with its checkpoint in one transaction, and rebuilds read models
//! beside the live ones. [`fetch_page`] queries them with keyset paging.

mod aggregate;
mod command;
mod event;
mod handler;
mod projection;
mod query;
mod runner;
pub mod testing;
mod upcast;

pub use crate::aggregate::Aggregate;
pub use crate::command::{Command, CommandError, CommandId, CommandOutcome};
pub use crate::event::{AdjacentlyTagged, CodecError, DomainEvent};
pub use crate::handler::{CommandHandler, HandlerOptions, Loaded};
pub use crate::projection::{Projection, ProjectionError};
pub use crate::query::{PAGE_LIMIT_MAX, Page, PagedQuery, QueryError, fetch_page};
pub use crate::runner::{
    ProjectionRunner, ProjectionState, ProjectionStatus, ProjectionsError, ProjectionsHandle,
    RunnerOptions, projections,
};
pub use crate::upcast::{UpcastError, UpcastStep, Upcasters};
