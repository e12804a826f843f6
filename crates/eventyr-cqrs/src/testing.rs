//! Given/when/then tests for aggregates: given these past events, when this command,
//! then these new events (or this error). Pure: no store involved.
//!
//! ```text
//! given::<Account>([Opened { owner: "ann".into() }])
//!     .when(Deposit { amount: 5 })
//!     .then([Deposited { amount: 5 }]);
//! ```
//!
//! Every event, given or produced, also goes through its stored form and back, so a
//! serde mistake shows up here rather than in production.

use std::fmt::Debug;

use crate::aggregate::Aggregate;
use crate::event::DomainEvent;

/// Starts a test from the state these events build.
pub fn given<A: Aggregate>(events: impl IntoIterator<Item = A::Event>) -> Given<A> {
    let mut state = A::default();
    for event in events {
        state.apply(&round_trip(&event));
    }
    Given { state }
}

/// A state built from past events.
#[derive(Debug)]
pub struct Given<A> {
    state: A,
}

impl<A: Aggregate> Given<A> {
    /// Decides `command` on the given state.
    pub fn when(self, command: A::Command) -> Then<A> {
        let result = self
            .state
            .handle(&command)
            .map(|events| events.iter().map(round_trip).collect());
        Then {
            state: self.state,
            result,
        }
    }

    /// The state the given events built.
    pub fn state(&self) -> &A {
        &self.state
    }
}

/// The decision, ready to be checked.
#[derive(Debug)]
pub struct Then<A: Aggregate> {
    state: A,
    result: Result<Vec<A::Event>, A::Error>,
}

impl<A: Aggregate> Then<A>
where
    A::Event: PartialEq + Debug,
    A::Error: Debug,
{
    /// Asserts the command recorded exactly these events; returns the state after them.
    #[track_caller]
    pub fn then(self, expected: impl IntoIterator<Item = A::Event>) -> A {
        let expected: Vec<A::Event> = expected.into_iter().collect();
        match self.result {
            Ok(events) => {
                assert_eq!(events, expected, "the command recorded other events");
                let mut state = self.state;
                for event in &events {
                    state.apply(event);
                }
                state
            }
            Err(error) => {
                panic!("expected events {expected:?}, the command was rejected: {error:?}")
            }
        }
    }

    /// Asserts the command was rejected with an error that `check` accepts.
    #[track_caller]
    pub fn then_error(self, check: impl FnOnce(&A::Error) -> bool) {
        match self.result {
            Ok(events) => panic!("expected a rejection, the command recorded {events:?}"),
            Err(error) => assert!(
                check(&error),
                "the command was rejected with an unexpected error: {error:?}"
            ),
        }
    }
}

/// The event after a trip through its stored form.
#[track_caller]
fn round_trip<E: DomainEvent>(event: &E) -> E {
    let (event_type, data) = match event.to_stored() {
        Ok(stored) => stored,
        Err(error) => panic!("an event cannot be encoded: {error}"),
    };
    match E::from_stored(&event_type, &data) {
        Ok(back) => back,
        Err(error) => panic!("event {event_type} cannot be decoded from {data:?}: {error}"),
    }
}
