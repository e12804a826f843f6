//! Sagas: a business transaction across services, run as steps with compensations.
//!
//! - [`definition`]: what a saga is: ordered steps, each with a kind (compensable,
//!   pivot, retriable-only), a timeout, a retry policy, a compensation and an optional
//!   skip condition. Data and pure functions only.
//! - [`machine`]: the state machine. `decide(definition, state, input, now, random)`
//!   returns the events to record; `evolve` folds them into the state; the effects to
//!   carry out (calls to participants, timers) follow from the recorded events. It
//!   reads no clock and does no IO.
//! - [`engine`]: the durable orchestrator over an event store, with
//!   [`participants`] to reach the services.
//! - [`simulation`]: the machine against simulated participants, network and crashes,
//!   on a simulated clock from a seed, with the invariants checked.
//! - [`bus`]: steps as commands and replies over the bus; [`http`]: steps as HTTP
//!   calls (or in process through a service's router), and the admin API.
//! - [`chain`]: the same definition run as a choreography, each service reacting to
//!   its neighbours' events; [`choreography`]: reactions and the tracker of such flows.

pub mod admin;
pub mod bus;
pub mod chain;
pub mod choreography;
pub mod definition;
pub mod engine;
pub mod http;
pub mod machine;
pub mod monitor;
pub mod participants;
pub mod simulation;

pub use admin::{Action, SagaAdmin};
pub use bus::{BusParticipants, CommandHandler, ReplyHandler};
pub use definition::{DefinitionError, SagaDefinition, Step, StepKind};
pub use engine::{EngineError, EngineOptions, SagaEngine, SagaHandle, SagaSummary};
pub use http::{HttpParticipants, admin_router, local_step};
pub use machine::{
    Effect, Failure, Input, SagaError, SagaEvent, SagaState, SagaStatus, StepCall, TimerKind,
};
pub use monitor::{SagaFigures, SagaMonitor};
pub use participants::{InProcess, Participants, Routed, Sent, StepHandler};
