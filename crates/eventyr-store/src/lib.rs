//! The event store's contract and what every backend shares.
//!
//! - [`EventStore`]: append with expectations (one stream or several atomically), read
//!   a stream or `$all`, delete and truncate streams, watch the head.
//! - [`plan`]: the pure write planner. Every backend loads the state a batch of writes
//!   touches, lets the planner decide each write, and stores what it returns; so the
//!   rules (expectations, idempotency, atomicity, tombstones) are written once.
//! - [`subscription`]: catch-up then live subscriptions, built on reads by position.
//! - [`group`]: the group-commit plumbing the durable backends' writers share.
//! - [`MemoryStore`]: the in-memory backend for tests.
//! - [`readmodel`] and [`sql`]: SQL read models for projections, by generation, with
//!   their checkpoints.
//! - `testkit` (feature): the conformance suite every backend passes.

mod error;
pub mod group;
mod memory;
pub mod plan;
pub mod readmodel;
pub mod sql;
mod store;
pub mod subscription;
#[cfg(feature = "testkit")]
pub mod testkit;
mod types;

pub use eventyr_core as core;

pub use crate::error::StoreError;
pub use crate::memory::MemoryStore;
pub use crate::store::{EventStore, validate_appends, validate_snapshot};
pub use crate::subscription::{SubscriptionOptions, subscribe_all, subscribe_stream};
pub use crate::types::{
    AllSlice, AppendResult, Direction, ExpectedVersion, Filter, NewSnapshot, READ_LIMIT_MAX,
    ReadAll, ReadStream, Snapshot, StreamAppend, StreamSlice,
};
