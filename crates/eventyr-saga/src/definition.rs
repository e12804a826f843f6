//! What a saga is: its ordered steps and how each one is run, retried, timed out,
//! skipped and undone. Plain data and pure functions; checked once by
//! [`SagaDefinition::validate`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use eventyr_core::RetryPolicy;
use serde_json::Value;

use crate::machine::Failure;

/// How a step relates to the rest of the saga (Garcia-Molina & Salem's kinds, as
/// Chris Richardson names them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    /// Has a compensation; its failure (or timeout) undoes the steps before it.
    Compensable,
    /// The point of no return: not compensable itself; once it succeeded, only
    /// retriable-only steps may follow. Its failure undoes the steps before it.
    Pivot,
    /// Retried until it succeeds or its attempts run out, never compensated and never a
    /// reason to compensate (for example "send a notification").
    RetriableOnly,
}

/// A pure function of the saga's data (its input and the results of earlier steps).
pub type DataFn<T> = Arc<dyn Fn(&Value) -> T + Send + Sync>;

/// Decides whether a failure may be retried.
pub type FailureFn = Arc<dyn Fn(&Failure) -> bool + Send + Sync>;

/// How a compensation is run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Compensation {
    /// How long one attempt may take.
    pub timeout: Duration,
    /// Compensations are retried on any failure, with backoff.
    pub retry: RetryPolicy,
}

/// One step of a saga.
#[derive(Clone)]
pub struct Step {
    pub name: String,
    pub kind: StepKind,
    /// How long one attempt may take before it counts as failed with an unknown outcome.
    pub timeout: Duration,
    pub retry: RetryPolicy,
    /// Whether a failure may be retried. By default the failure's own verdict:
    /// transient for network errors, timeouts and 5xx, permanent for a refusal.
    pub retryable: Option<FailureFn>,
    pub compensation: Option<Compensation>,
    /// Skips the step when it returns true (for example "deduct points" when none are
    /// used).
    pub skip_if: Option<DataFn<bool>>,
    /// Builds the request body from the saga's data; by default the data itself.
    pub request: Option<DataFn<Value>>,
    /// Builds the compensation's body; by default as `request`.
    pub compensation_request: Option<DataFn<Value>>,
}

impl fmt::Debug for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Step")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("timeout", &self.timeout)
            .field("retry", &self.retry)
            .field("compensation", &self.compensation)
            .field("optional", &self.skip_if.is_some())
            .finish_non_exhaustive()
    }
}

/// The retry policy of a step unless told otherwise: 3 retries from 1 s, doubling, up
/// to 300 s, with 10 % jitter.
pub const STEP_RETRY: RetryPolicy = RetryPolicy {
    attempts_max: 4,
    initial_delay: Duration::from_secs(1),
    multiplier: 2.0,
    delay_max: Duration::from_secs(300),
    jitter_ratio: 0.1,
};

/// The timeout of a step or compensation attempt unless told otherwise.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);

impl Step {
    fn new(name: impl Into<String>, kind: StepKind) -> Self {
        Self {
            name: name.into(),
            kind,
            timeout: STEP_TIMEOUT,
            retry: STEP_RETRY,
            retryable: None,
            compensation: None,
            skip_if: None,
            request: None,
            compensation_request: None,
        }
    }

    /// A step undone by its compensation (same timeout and retry policy by default).
    pub fn compensable(name: impl Into<String>) -> Self {
        let mut step = Self::new(name, StepKind::Compensable);
        step.compensation = Some(Compensation {
            timeout: STEP_TIMEOUT,
            retry: STEP_RETRY,
        });
        step
    }

    /// The point of no return.
    pub fn pivot(name: impl Into<String>) -> Self {
        Self::new(name, StepKind::Pivot)
    }

    /// A step that is retried and never compensated.
    pub fn retriable_only(name: impl Into<String>) -> Self {
        Self::new(name, StepKind::RetriableOnly)
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Decides which failures are retried.
    pub fn retryable(mut self, decide: impl Fn(&Failure) -> bool + Send + Sync + 'static) -> Self {
        self.retryable = Some(Arc::new(decide));
        self
    }

    /// How the compensation runs (compensable steps only).
    pub fn compensation(mut self, timeout: Duration, retry: RetryPolicy) -> Self {
        self.compensation = Some(Compensation { timeout, retry });
        self
    }

    pub fn skip_if(mut self, skip: impl Fn(&Value) -> bool + Send + Sync + 'static) -> Self {
        self.skip_if = Some(Arc::new(skip));
        self
    }

    pub fn request(mut self, build: impl Fn(&Value) -> Value + Send + Sync + 'static) -> Self {
        self.request = Some(Arc::new(build));
        self
    }

    /// Builds the compensation's body (the saga's data carries `saga_reason` then).
    pub fn compensation_request(
        mut self,
        build: impl Fn(&Value) -> Value + Send + Sync + 'static,
    ) -> Self {
        self.compensation_request = Some(Arc::new(build));
        self
    }
}

/// A saga type: its name and ordered steps.
#[derive(Debug, Clone)]
pub struct SagaDefinition {
    pub saga_type: String,
    pub steps: Vec<Step>,
}

/// Why a definition cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DefinitionError {
    #[error("a saga type or step name must be 1 to 64 of a-z, A-Z, 0-9, '-' and '_': {0:?}")]
    BadName(String),
    #[error("saga {0} has no steps")]
    NoSteps(String),
    #[error("step {0} appears twice")]
    DuplicateStep(String),
    #[error("step {0} is compensable and has no compensation")]
    MissingCompensation(String),
    #[error("step {0} is a pivot or retriable-only and cannot have a compensation")]
    UnexpectedCompensation(String),
    #[error("step {step} follows the pivot {pivot} and is not retriable-only")]
    AfterPivot { step: String, pivot: String },
    #[error("step {0} needs at least one attempt and a non-zero timeout")]
    NoAttempt(String),
    #[error("step {0} has no service in the chain")]
    NoService(String),
    #[error("the chain names step {0}, which the saga does not have")]
    UnknownStep(String),
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl SagaDefinition {
    pub fn new(saga_type: impl Into<String>) -> Self {
        Self {
            saga_type: saga_type.into(),
            steps: Vec::new(),
        }
    }

    pub fn step(mut self, step: Step) -> Self {
        self.steps.push(step);
        self
    }

    /// Checks the definition: names, compensations by kind, nothing but retriable-only
    /// steps after a pivot, and at least one attempt per step.
    pub fn validate(self) -> Result<Self, DefinitionError> {
        if !valid_name(&self.saga_type) {
            return Err(DefinitionError::BadName(self.saga_type));
        }
        if self.steps.is_empty() {
            return Err(DefinitionError::NoSteps(self.saga_type));
        }
        let mut pivot: Option<&str> = None;
        for (i, step) in self.steps.iter().enumerate() {
            let name = step.name.clone();
            if !valid_name(&step.name) {
                return Err(DefinitionError::BadName(name));
            }
            if self.steps[..i].iter().any(|s| s.name == step.name) {
                return Err(DefinitionError::DuplicateStep(name));
            }
            let zero = |retry: &RetryPolicy, timeout: Duration| {
                retry.attempts_max == 0 || timeout.is_zero()
            };
            if zero(&step.retry, step.timeout)
                || step.compensation.is_some_and(|c| zero(&c.retry, c.timeout))
            {
                return Err(DefinitionError::NoAttempt(name));
            }
            match (step.kind, step.compensation.is_some()) {
                (StepKind::Compensable, false) => {
                    return Err(DefinitionError::MissingCompensation(name));
                }
                (StepKind::Pivot | StepKind::RetriableOnly, true) => {
                    return Err(DefinitionError::UnexpectedCompensation(name));
                }
                _ => {}
            }
            if let Some(pivot) = pivot
                && step.kind != StepKind::RetriableOnly
            {
                return Err(DefinitionError::AfterPivot {
                    step: name,
                    pivot: pivot.to_owned(),
                });
            }
            if step.kind == StepKind::Pivot {
                pivot = Some(&step.name);
            }
        }
        Ok(self)
    }

    /// The index of the step called `name`.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definitions_are_checked() {
        let ok = SagaDefinition::new("trip")
            .step(Step::compensable("flight"))
            .step(Step::pivot("payment"))
            .step(Step::retriable_only("email"))
            .validate();
        assert!(ok.is_ok(), "{ok:?}");
        let after_pivot = SagaDefinition::new("trip")
            .step(Step::pivot("payment"))
            .step(Step::compensable("hotel"))
            .validate();
        assert!(matches!(
            after_pivot,
            Err(DefinitionError::AfterPivot { .. })
        ));
        let twice = SagaDefinition::new("trip")
            .step(Step::compensable("a"))
            .step(Step::compensable("a"))
            .validate();
        assert!(matches!(twice, Err(DefinitionError::DuplicateStep(_))));
        assert!(matches!(
            SagaDefinition::new("bad name").validate(),
            Err(DefinitionError::BadName(_))
        ));
        assert!(matches!(
            SagaDefinition::new("empty").validate(),
            Err(DefinitionError::NoSteps(_))
        ));
    }
}
