//! The saga state machine, scenario by scenario: given a log, when an input comes,
//! then these events.

use std::time::Duration;

use eventyr_core::{RetryPolicy, Timestamp};
use eventyr_saga::machine::{
    self, Effect, Failure, Input, SagaEvent, SagaState, SagaStatus, TimerKind,
};
use eventyr_saga::{SagaDefinition, SagaError, Step};
use serde_json::{Value, json};

const ONE_TRY: RetryPolicy = RetryPolicy {
    attempts_max: 1,
    initial_delay: Duration::from_secs(1),
    multiplier: 2.0,
    delay_max: Duration::from_secs(1),
    jitter_ratio: 0.0,
};

fn trip() -> SagaDefinition {
    SagaDefinition::new("trip")
        .step(Step::compensable("flight"))
        .step(Step::compensable("hotel").skip_if(|d| d["hotel"] == json!(false)))
        .step(Step::compensable("car").compensation(Duration::from_secs(5), ONE_TRY))
        .step(Step::pivot("payment").retry(ONE_TRY))
        .step(Step::retriable_only("email").retry(ONE_TRY))
        .validate()
        .expect("valid")
}

fn at(seconds: i64) -> Timestamp {
    Timestamp::from_unix_micros(seconds * 1_000_000)
}

struct Saga {
    definition: SagaDefinition,
    state: SagaState,
    now: i64,
}

impl Saga {
    fn start(data: Value) -> Self {
        let definition = trip();
        let events = machine::start(&definition, "s1", data, None, None, at(0));
        let state = SagaState::replay("s1", &events);
        Self {
            definition,
            state,
            now: 0,
        }
    }

    fn input(&mut self, input: Input) -> Result<Vec<SagaEvent>, SagaError> {
        self.now += 1;
        let events = machine::decide(&self.definition, &self.state, &input, at(self.now), 0.5)?;
        for event in &events {
            self.state.evolve(event);
        }
        Ok(events)
    }

    fn reply(
        &mut self,
        step: &str,
        compensation: bool,
        outcome: Result<Value, Failure>,
    ) -> Vec<String> {
        let attempt = attempt(&self.state, step, compensation);
        let input = Input::Reply {
            step: step.into(),
            attempt,
            compensation,
            outcome,
        };
        names(&self.input(input).expect("accepted"))
    }
}

fn attempt(state: &SagaState, step: &str, compensation: bool) -> u32 {
    use eventyr_saga::machine::{Backward, Forward};
    let step = state.step(step).expect("step");
    match (compensation, step.forward, step.backward) {
        (false, Forward::Requested { attempt, .. } | Forward::Waiting { attempt, .. }, _) => {
            attempt
        }
        (true, _, Backward::Requested { attempt, .. } | Backward::Waiting { attempt, .. }) => {
            attempt
        }
        _ => 1,
    }
}

fn names(events: &[SagaEvent]) -> Vec<String> {
    events
        .iter()
        .map(|e| match e {
            SagaEvent::StepRequested { step, .. }
            | SagaEvent::StepSucceeded { step, .. }
            | SagaEvent::StepSkipped { step, .. }
            | SagaEvent::StepFailed { step, .. }
            | SagaEvent::CompensationRequested { step, .. }
            | SagaEvent::CompensationSucceeded { step, .. }
            | SagaEvent::CompensationFailed { step, .. } => format!("{} {step}", e.type_name()),
            SagaEvent::SagaFinished { status, .. } => format!("SagaFinished {}", status.as_str()),
            other => other.type_name().to_owned(),
        })
        .collect()
}

#[test]
fn a_saga_runs_its_steps_in_order_and_skips_optional_ones() {
    let mut saga = Saga::start(json!({ "hotel": false }));
    assert_eq!(saga.state.status, SagaStatus::InProgress);
    assert_eq!(
        saga.reply("flight", false, Ok(json!({"pnr": "X1"}))),
        [
            "StepSucceeded flight",
            "StepSkipped hotel",
            "StepRequested car"
        ]
    );
    saga.reply("car", false, Ok(json!({})));
    saga.reply("payment", false, Ok(json!({})));
    assert_eq!(
        saga.reply("email", false, Ok(json!({}))),
        ["StepSucceeded email", "SagaFinished COMPLETED"]
    );
    assert_eq!(
        saga.state.data["results"]["flight"]["pnr"], "X1",
        "results feed later steps"
    );
}

#[test]
fn a_failure_compensates_the_completed_steps_in_reverse_order() {
    let mut saga = Saga::start(json!({}));
    saga.reply("flight", false, Ok(json!({})));
    saga.reply("hotel", false, Ok(json!({})));
    saga.reply("car", false, Ok(json!({})));
    assert_eq!(
        saga.reply("payment", false, Err(Failure::permanent("card declined"))),
        [
            "StepFailed payment",
            "CompensationStarted",
            "CompensationRequested car"
        ]
    );
    assert_eq!(
        saga.reply("car", true, Ok(json!({}))),
        ["CompensationSucceeded car", "CompensationRequested hotel"]
    );
    saga.reply("hotel", true, Ok(json!({})));
    assert_eq!(
        saga.reply("flight", true, Ok(json!({}))),
        ["CompensationSucceeded flight", "SagaFinished COMPENSATED"]
    );
}

#[test]
fn a_transient_failure_is_retried_with_the_same_key_after_a_backoff() {
    let mut saga = Saga::start(json!({}));
    let events = saga
        .input(Input::Reply {
            step: "flight".into(),
            attempt: 1,
            compensation: false,
            outcome: Err(Failure::transient("503")),
        })
        .expect("accepted");
    let effects = machine::effects(&saga.definition, &saga.state, &events);
    let Some(Effect::Timer {
        kind: TimerKind::Retry,
        at: when,
        ..
    }) = effects.first()
    else {
        panic!("a retry timer: {effects:?}");
    };
    assert!(*when > at(1), "after a backoff");
    saga.now = 100;
    let events = saga
        .input(Input::Timer {
            step: "flight".into(),
            attempt: 1,
            compensation: false,
            kind: TimerKind::Retry,
        })
        .expect("accepted");
    let effects = machine::effects(&saga.definition, &saga.state, &events);
    let Some(Effect::Call(call)) = effects.first() else {
        panic!("a call: {effects:?}")
    };
    assert_eq!(
        (call.attempt, call.idempotency_key.as_str()),
        (2, "s1/flight")
    );
}

#[test]
fn a_compensation_that_keeps_failing_flags_the_saga_and_the_rest_still_run() {
    let mut saga = Saga::start(json!({}));
    saga.reply("flight", false, Ok(json!({})));
    saga.reply("hotel", false, Ok(json!({})));
    // Aborted while the car is being booked: its outcome is unknown, so it is undone.
    saga.input(Input::Abort {
        reason: "customer".into(),
    })
    .expect("abort");
    assert_eq!(
        saga.reply("car", true, Err(Failure::transient("down"))),
        ["CompensationFailed car", "CompensationRequested hotel"]
    );
    saga.reply("hotel", true, Ok(json!({})));
    saga.reply("flight", true, Ok(json!({})));
    assert_eq!(
        (saga.state.status, saga.state.flagged),
        (SagaStatus::Failed, true)
    );
    // After a fix, the operator retries: only the failed compensation runs again.
    assert_eq!(
        names(&saga.input(Input::Retry).expect("retry")),
        ["RetryRequested", "CompensationRequested car"]
    );
    assert_eq!(
        saga.reply("car", true, Ok(json!({}))),
        ["CompensationSucceeded car", "SagaFinished COMPENSATED"]
    );
}

#[test]
fn a_timeout_of_the_last_attempt_compensates_the_step_too() {
    let mut saga = Saga::start(json!({}));
    saga.reply("flight", false, Ok(json!({})));
    saga.reply("hotel", false, Ok(json!({})));
    saga.now = 10_000;
    for attempt in 1..=4 {
        let events = saga
            .input(Input::Timer {
                step: "car".into(),
                attempt,
                compensation: false,
                kind: TimerKind::Deadline,
            })
            .expect("accepted");
        if attempt < 4 {
            saga.now += 60;
            saga.input(Input::Timer {
                step: "car".into(),
                attempt,
                compensation: false,
                kind: TimerKind::Retry,
            })
            .expect("accepted");
            saga.now += 10_000;
        } else {
            assert_eq!(
                names(&events),
                [
                    "StepTimedOut",
                    "CompensationStarted",
                    "CompensationRequested car"
                ],
                "its outcome is unknown: it is compensated"
            );
        }
    }
}

#[test]
fn stale_and_duplicate_replies_change_nothing_and_late_aborts_are_refused() {
    let mut saga = Saga::start(json!({}));
    saga.reply("flight", false, Ok(json!({})));
    let duplicate = Input::Reply {
        step: "flight".into(),
        attempt: 1,
        compensation: false,
        outcome: Ok(json!({})),
    };
    assert!(saga.input(duplicate).expect("accepted").is_empty());
    saga.reply("hotel", false, Ok(json!({})));
    saga.reply("car", false, Ok(json!({})));
    assert_eq!(
        saga.input(Input::Abort {
            reason: "in flight".into()
        }),
        Err(SagaError::PastPivot("payment".into())),
        "the pivot's outcome is not known yet"
    );
    saga.reply("payment", false, Ok(json!({})));
    assert_eq!(
        saga.input(Input::Abort {
            reason: "late".into()
        }),
        Err(SagaError::PastPivot("payment".into()))
    );
    assert_eq!(
        saga.reply("email", false, Err(Failure::transient("smtp down"))),
        ["StepFailed email", "SagaFinished COMPLETED"],
        "a retriable-only step out of attempts is given up, never compensated"
    );
}
