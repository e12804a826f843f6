//! The conformance suite: one set of cases that every [`EventStore`] backend passes.
//!
//! A backend's test file implements [`Backend`] and calls
//! [`conformance_suite!`](crate::conformance_suite), which expands to one
//! `#[tokio::test]` per case, so a failure names its case. The cases use only the
//! public trait, so a backend either keeps the contract or visibly does not.

mod cases;
mod concurrency;
pub mod readmodels;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use eventyr_core::{Limits, NewEvent};

pub use self::cases::*;
pub use self::concurrency::*;
use crate::store::EventStore;

/// A storage technology under test. One value lives for one test case.
#[async_trait]
pub trait Backend: Send + Sync {
    /// A new, empty storage location with these limits. The storage must stay usable
    /// as long as the backend value lives, even after the [`Location`] is dropped.
    async fn location(&self, limits: Limits) -> Box<dyn Location>;
}

/// One storage location (a database, a file, a shared memory state).
#[async_trait]
pub trait Location: Send + Sync {
    /// Opens another store instance on this location, as a separate process would:
    /// its own connections and writer, the same events.
    async fn open(&self) -> Arc<dyn EventStore>;
}

/// How long a case waits for something that should happen, before failing.
pub const WAIT: Duration = Duration::from_secs(30);

/// An event of type `Counted` with data `{"n": n}`.
pub fn counted(n: u64) -> NewEvent {
    NewEvent::json("Counted", &serde_json::json!({ "n": n })).expect("static event is valid")
}

/// Expands to one test per conformance case for the backend built by `$backend`.
#[macro_export]
macro_rules! conformance_suite {
    ($backend:expr) => {
        $crate::conformance_suite!(@cases $backend;
            append_and_read_back,
            expected_versions,
            atomic_append_across_streams,
            idempotent_appends,
            reads_forwards_and_backwards,
            reads_all_with_limits_and_filters,
            deleted_streams,
            truncated_streams,
            size_limits,
            unicode_round_trips,
            bad_input_is_refused_with_typed_errors,
            reopen_keeps_everything,
            events_are_found_by_id,
            snapshots_live_beside_their_stream,
            concurrent_conflicting_appends_one_wins,
            subscription_catches_up_then_goes_live,
            stream_subscription_waits_and_follows,
            positions_are_gapless_in_commit_order_under_concurrency,
        );
    };
    (@cases $backend:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let backend = $backend;
                $crate::testkit::$case(&backend).await;
            }
        )*
    };
}
