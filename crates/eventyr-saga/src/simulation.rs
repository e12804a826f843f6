//! Deterministic simulation: the saga machine, recorded and recovered the way the
//! engine does it, against simulated participants and network on a simulated clock,
//! with faults drawn from one seed. A failure names its seed; the seed replays it.
//!
//! Faults: requests and replies lost, slow replies (after the deadline), duplicated
//! replies, transient failures before and after the effect, business refusals, broken
//! compensations (until an operator fixes them and retries), operator aborts, and
//! engine crashes before or after a decision is recorded (the engine then restarts and
//! recovers every unfinished saga from the log).
//!
//! Invariants, per saga, once nothing is left to happen: the saga is terminal; every
//! action and compensation took effect at most once; COMPLETED ⇒ every step that was
//! not skipped took effect once (a retriable-only step may be abandoned instead) and
//! nothing was compensated; COMPENSATED ⇒ every action that took effect was undone,
//! once, in reverse step order; FAILED ⇒ flagged for manual intervention, and after the
//! operator fixes the broken compensation and retries, COMPENSATED.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::time::Duration;

use eventyr_core::{RetryPolicy, Timestamp};
use serde_json::{Value, json};

use crate::definition::{SagaDefinition, Step, StepKind};
use crate::machine::{
    self, Effect, Failure, Forward, Input, SagaEvent, SagaState, SagaStatus, StepCall,
};

/// Fault rates, each a probability per occasion.
#[derive(Debug, Clone, Copy)]
pub struct Faults {
    pub request_lost: f64,
    pub reply_lost: f64,
    pub reply_slow: f64,
    pub reply_duplicated: f64,
    pub transient_before_effect: f64,
    pub transient_after_effect: f64,
    /// Per saga: one of its steps refuses.
    pub refusal: f64,
    /// Per saga: one of its compensations fails until an operator fixes it.
    pub broken_compensation: f64,
    pub compensation_transient: f64,
    /// Per saga: an operator aborts it at a random moment.
    pub abort: f64,
    /// Per decision: the engine crashes before, or after, recording it.
    pub crash: f64,
}

impl Faults {
    /// No faults at all.
    pub fn none() -> Self {
        Self {
            request_lost: 0.0,
            reply_lost: 0.0,
            reply_slow: 0.0,
            reply_duplicated: 0.0,
            transient_before_effect: 0.0,
            transient_after_effect: 0.0,
            refusal: 0.0,
            broken_compensation: 0.0,
            compensation_transient: 0.0,
            abort: 0.0,
            crash: 0.0,
        }
    }
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            request_lost: 0.05,
            reply_lost: 0.05,
            reply_slow: 0.03,
            reply_duplicated: 0.05,
            transient_before_effect: 0.05,
            transient_after_effect: 0.03,
            refusal: 0.25,
            broken_compensation: 0.05,
            compensation_transient: 0.1,
            abort: 0.05,
            crash: 0.01,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SimOptions {
    pub sagas: usize,
    pub faults: Faults,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            sagas: 20,
            faults: Faults::default(),
        }
    }
}

/// What one seed did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimReport {
    pub completed: usize,
    pub compensated: usize,
    /// FAILED before the operator's retry.
    pub failed: usize,
    pub crashes: usize,
    pub events_recorded: usize,
    pub virtual_seconds: u64,
}

/// The saga the simulation runs: three compensable steps (the third optional), a pivot
/// and a retriable-only step.
pub fn definition() -> SagaDefinition {
    let retry = RetryPolicy {
        attempts_max: 4,
        initial_delay: Duration::from_secs(1),
        multiplier: 2.0,
        delay_max: Duration::from_secs(30),
        jitter_ratio: 0.1,
    };
    let step = |s: Step| {
        s.timeout(Duration::from_secs(5))
            .retry(retry)
            .compensation(Duration::from_secs(5), retry)
    };
    SagaDefinition::new("simulated")
        .step(step(Step::compensable("reserve")))
        .step(step(Step::compensable("charge")))
        .step(
            step(Step::compensable("points"))
                .skip_if(|data| data.get("points").and_then(Value::as_u64) == Some(0)),
        )
        .step(
            Step::pivot("ship")
                .timeout(Duration::from_secs(5))
                .retry(retry),
        )
        .step(
            Step::retriable_only("notify")
                .timeout(Duration::from_secs(5))
                .retry(RetryPolicy {
                    attempts_max: 6,
                    ..retry
                }),
        )
        .validate()
        .expect("the simulated saga is valid")
}

#[derive(Debug, Clone)]
enum Event {
    Start(usize),
    Deliver(StepCall, u64),
    Reply {
        call: StepCall,
        outcome: Result<Value, Failure>,
        incarnation: u64,
    },
    Timer {
        saga: String,
        input: Input,
        incarnation: u64,
    },
    Operator(String, Input),
    Restart,
}

/// A participant's record of one key.
#[derive(Debug, Default, Clone)]
struct Effects {
    keys: BTreeSet<String>,
    done: u32,
    undone: u32,
    tombstone: bool,
}

struct World<'a> {
    definition: &'a SagaDefinition,
    faults: Faults,
    rng: fastrand::Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    pending: BTreeMap<u64, Event>,
    // The engine: its volatile states and its durable log.
    up: bool,
    incarnation: u64,
    states: BTreeMap<String, SagaState>,
    log: BTreeMap<String, Vec<SagaEvent>>,
    // Participants.
    effects: BTreeMap<(String, usize), Effects>,
    undo_order: BTreeMap<String, Vec<usize>>,
    refuses: BTreeMap<String, usize>,
    broken: BTreeMap<String, usize>,
    report: SimReport,
}

const STEP_COUNT: usize = 5;

fn saga_id(i: usize) -> String {
    format!("sim-{i:04}")
}

impl World<'_> {
    fn at(&mut self, delay: Duration, event: Event) {
        let when = self.now + u64::try_from(delay.as_micros()).unwrap_or(u64::MAX / 2);
        self.seq += 1;
        self.queue.push(Reverse((when, self.seq)));
        self.pending.insert(self.seq, event);
    }

    fn chance(&mut self, p: f64) -> bool {
        self.rng.f64() < p
    }

    fn latency(&mut self) -> Duration {
        Duration::from_millis(self.rng.u64(1..20))
    }

    fn timestamp(&self) -> Timestamp {
        Timestamp::from_unix_micros(i64::try_from(self.now).unwrap_or(i64::MAX))
    }

    fn run(&mut self, steps_max: usize) -> Result<(), String> {
        for _ in 0..steps_max {
            let Some(Reverse((when, seq))) = self.queue.pop() else {
                return Ok(());
            };
            self.now = when;
            let event = self.pending.remove(&seq).ok_or("a lost queue entry")?;
            self.step(event)?;
        }
        Err(format!("no quiescence after {steps_max} events"))
    }

    fn step(&mut self, event: Event) -> Result<(), String> {
        match event {
            Event::Start(i) => self.start(i),
            Event::Deliver(call, incarnation) => {
                self.deliver(call, incarnation);
                Ok(())
            }
            Event::Reply {
                call,
                outcome,
                incarnation,
            } => {
                if incarnation != self.incarnation {
                    return Ok(()); // A reply to a process that is gone.
                }
                let input = Input::Reply {
                    step: call.step.clone(),
                    attempt: call.attempt,
                    compensation: call.compensation,
                    outcome,
                };
                self.handle(&call.saga_id, &input)
            }
            Event::Timer {
                saga,
                input,
                incarnation,
            } => {
                if incarnation != self.incarnation {
                    return Ok(()); // Timers live in the process; recovery re-arms them.
                }
                self.handle(&saga, &input)
            }
            Event::Operator(saga, input) => {
                if !self.up {
                    let later = Duration::from_secs(1);
                    self.at(later, Event::Operator(saga, input));
                    return Ok(());
                }
                self.handle(&saga, &input)
            }
            Event::Restart => {
                self.restart();
                Ok(())
            }
        }
    }

    fn start(&mut self, i: usize) -> Result<(), String> {
        let id = saga_id(i);
        if !self.up {
            // The client retries its start.
            self.at(Duration::from_secs(1), Event::Start(i));
            return Ok(());
        }
        if self.log.contains_key(&id) {
            return Ok(());
        }
        let points = if self.chance(0.3) { 0 } else { 10 };
        let data = json!({ "order": i, "points": points });
        let events = machine::start(self.definition, &id, data, None, None, self.timestamp());
        if self.crash_now() {
            self.at(Duration::from_secs(1), Event::Start(i));
            return Ok(());
        }
        self.record(&id, SagaState::empty(&id), events)
    }

    fn crash_now(&mut self) -> bool {
        if !self.chance(self.faults.crash) {
            return false;
        }
        self.up = false;
        self.incarnation += 1;
        self.states.clear();
        self.report.crashes += 1;
        let down = Duration::from_millis(self.rng.u64(100..5_000));
        self.at(down, Event::Restart);
        true
    }

    fn restart(&mut self) {
        self.up = true;
        let logs: Vec<(String, Vec<SagaEvent>)> = self
            .log
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (id, events) in logs {
            let state = SagaState::replay(&id, &events);
            let effects = machine::recovery_effects(self.definition, &state);
            self.states.insert(id.clone(), state);
            self.carry_out(&id, effects);
        }
    }

    /// The engine's turn: decide, crash maybe, record, crash maybe, act.
    fn handle(&mut self, id: &str, input: &Input) -> Result<(), String> {
        let Some(state) = self.states.get(id).cloned() else {
            return Ok(());
        };
        let random = self.rng.f64();
        let events = match machine::decide(self.definition, &state, input, self.timestamp(), random)
        {
            Ok(events) => events,
            Err(_) => return Ok(()), // An operator's request refused.
        };
        if events.is_empty() || self.crash_now() {
            return Ok(());
        }
        self.record(id, state, events)
    }

    fn record(
        &mut self,
        id: &str,
        mut state: SagaState,
        events: Vec<SagaEvent>,
    ) -> Result<(), String> {
        for event in &events {
            state.evolve(event);
        }
        self.report.events_recorded += events.len();
        self.log
            .entry(id.to_owned())
            .or_default()
            .extend(events.iter().cloned());
        let effects = machine::effects(self.definition, &state, &events);
        self.states.insert(id.to_owned(), state);
        if self.crash_now() {
            return Ok(()); // Recorded, not carried out: recovery must do it.
        }
        self.carry_out(id, effects);
        Ok(())
    }

    fn carry_out(&mut self, id: &str, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Call(call) => {
                    if !self.chance(self.faults.request_lost) {
                        let latency = self.latency();
                        self.at(latency, Event::Deliver(call, self.incarnation));
                    }
                }
                Effect::Timer {
                    step,
                    attempt,
                    compensation,
                    kind,
                    at,
                } => {
                    let delay = machine::until(self.timestamp(), at);
                    let input = Input::Timer {
                        step,
                        attempt,
                        compensation,
                        kind,
                    };
                    let timer = Event::Timer {
                        saga: id.to_owned(),
                        input,
                        incarnation: self.incarnation,
                    };
                    self.at(delay, timer);
                }
                Effect::Finished { .. } => {}
            }
        }
    }

    /// A participant handles a call, idempotently by its key.
    fn deliver(&mut self, call: StepCall, incarnation: u64) {
        let Some(i) = self.definition.position(&call.step) else {
            return;
        };
        let outcome = if call.compensation {
            self.compensate(&call, i)
        } else {
            self.act(&call, i)
        };
        if self.chance(self.faults.reply_lost) {
            return;
        }
        let copies = if self.chance(self.faults.reply_duplicated) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let latency = if self.chance(self.faults.reply_slow) {
                Duration::from_secs(self.rng.u64(5..12))
            } else {
                self.latency()
            };
            let reply = Event::Reply {
                call: call.clone(),
                outcome: outcome.clone(),
                incarnation,
            };
            self.at(latency, reply);
        }
    }

    fn act(&mut self, call: &StepCall, i: usize) -> Result<Value, Failure> {
        if self.chance(self.faults.transient_before_effect) {
            return Err(Failure::transient("503 before the effect"));
        }
        let refuses = self.refuses.get(&call.saga_id) == Some(&i);
        let effects = self.effects.entry((call.saga_id.clone(), i)).or_default();
        if effects.tombstone {
            return Err(Failure::permanent("compensated already"));
        }
        if refuses {
            return Err(Failure::permanent("refused"));
        }
        // The participant's own check is by idempotency key: were the engine to use a
        // new key on a retry, the effect would count twice.
        if effects.keys.insert(call.idempotency_key.clone()) {
            effects.done += 1;
        }
        if self.chance(self.faults.transient_after_effect) {
            return Err(Failure::transient("503 after the effect"));
        }
        Ok(json!({ "id": format!("{}-{}", call.step, call.saga_id) }))
    }

    fn compensate(&mut self, call: &StepCall, i: usize) -> Result<Value, Failure> {
        if self.broken.get(&call.saga_id) == Some(&i) {
            return Err(Failure::transient("the compensation is broken"));
        }
        if self.chance(self.faults.compensation_transient) {
            return Err(Failure::transient("503"));
        }
        let effects = self.effects.entry((call.saga_id.clone(), i)).or_default();
        effects.tombstone = true;
        if effects.done > 0 && effects.undone == 0 {
            effects.undone = 1;
            self.undo_order
                .entry(call.saga_id.clone())
                .or_default()
                .push(i);
        }
        Ok(json!({}))
    }
}

/// Runs one seed; an invariant broken is an error that names the seed.
pub fn simulate(seed: u64, options: &SimOptions) -> Result<SimReport, String> {
    let definition = definition();
    let mut world = World {
        definition: &definition,
        faults: options.faults,
        rng: fastrand::Rng::with_seed(seed),
        now: 1_700_000_000_000_000,
        seq: 0,
        queue: BinaryHeap::new(),
        pending: BTreeMap::new(),
        up: true,
        incarnation: 0,
        states: BTreeMap::new(),
        log: BTreeMap::new(),
        effects: BTreeMap::new(),
        undo_order: BTreeMap::new(),
        refuses: BTreeMap::new(),
        broken: BTreeMap::new(),
        report: SimReport::default(),
    };
    let began = world.now;
    for i in 0..options.sagas {
        let id = saga_id(i);
        if world.chance(options.faults.refusal) {
            let step = world.rng.usize(0..STEP_COUNT);
            world.refuses.insert(id.clone(), step);
        }
        if world.chance(options.faults.broken_compensation) {
            let step = world.rng.usize(0..3);
            world.broken.insert(id.clone(), step);
        }
        let start = Duration::from_millis(world.rng.u64(0..2_000));
        world.at(start, Event::Start(i));
        if world.chance(options.faults.abort) {
            let when = Duration::from_millis(world.rng.u64(0..10_000));
            let abort = Input::Abort {
                reason: "operator".into(),
            };
            world.at(when, Event::Operator(id, abort));
        }
    }
    let fail = |why: String| format!("seed {seed}: {why}");
    world.run(2_000_000).map_err(fail)?;
    for i in 0..options.sagas {
        check(&world, &saga_id(i), false).map_err(fail)?;
    }
    // Calm returns: the operator fixes the broken compensations and retries the FAILED
    // sagas.
    world.broken.clear();
    world.faults = Faults::none();
    let failed: Vec<String> = world
        .log
        .keys()
        .filter(|id| {
            world
                .states
                .get(*id)
                .is_some_and(|s| s.status == SagaStatus::Failed)
        })
        .cloned()
        .collect();
    world.report.failed = failed.len();
    for id in failed {
        world.at(Duration::from_secs(1), Event::Operator(id, Input::Retry));
    }
    world.run(2_000_000).map_err(fail)?;
    for i in 0..options.sagas {
        check(&world, &saga_id(i), true).map_err(fail)?;
        match world.states.get(&saga_id(i)).map(|s| s.status) {
            Some(SagaStatus::Completed) => world.report.completed += 1,
            Some(SagaStatus::Compensated) => world.report.compensated += 1,
            _ => {}
        }
    }
    world.report.virtual_seconds = (world.now - began) / 1_000_000;
    Ok(world.report)
}

fn check(world: &World<'_>, id: &str, retried: bool) -> Result<(), String> {
    let events = world
        .log
        .get(id)
        .ok_or_else(|| format!("{id} never started"))?;
    let state = SagaState::replay(id, events);
    if world.up && world.states.get(id) != Some(&state) {
        return Err(format!("{id}: the engine's state differs from its log"));
    }
    let effect = |i: usize| {
        world
            .effects
            .get(&(id.to_owned(), i))
            .cloned()
            .unwrap_or_default()
    };
    let kinds: Vec<StepKind> = world.definition.steps.iter().map(|s| s.kind).collect();
    let undo_order = world.undo_order.get(id).cloned().unwrap_or_default();
    // A compensation given up on is retried later, by the operator, out of order.
    let gave_up = events
        .iter()
        .any(|e| matches!(e, SagaEvent::CompensationFailed { retry_at: None, .. }));
    if !gave_up && !undo_order.windows(2).all(|w| w[0] > w[1]) {
        return Err(format!(
            "{id}: compensations out of reverse order: {undo_order:?}"
        ));
    }
    match state.status {
        SagaStatus::Completed => {
            for (i, kind) in kinds.iter().enumerate() {
                let (e, step) = (effect(i), &state.steps[i]);
                let expected_done = match step.forward {
                    Forward::Skipped => e.done == 0,
                    Forward::Abandoned => *kind == StepKind::RetriableOnly,
                    Forward::Succeeded => e.done == 1,
                    _ => false,
                };
                if !expected_done || e.undone != 0 {
                    return Err(format!(
                        "{id}: COMPLETED but step {i} is {step:?} with {e:?}"
                    ));
                }
            }
        }
        SagaStatus::Compensated => {
            for (i, kind) in kinds.iter().enumerate() {
                let e = effect(i);
                let ok = match kind {
                    StepKind::Compensable => e.done == e.undone,
                    StepKind::Pivot | StepKind::RetriableOnly => e.done == 0,
                };
                if !ok {
                    return Err(format!("{id}: COMPENSATED but step {i} has {e:?}"));
                }
            }
        }
        SagaStatus::Failed => {
            if !state.flagged {
                return Err(format!("{id}: FAILED and not flagged"));
            }
            let broken = world.broken.contains_key(id);
            let pivot_unknown = state.reason.as_deref().is_some_and(|r| r.contains("pivot"));
            if retried && !broken && !pivot_unknown {
                return Err(format!(
                    "{id}: still FAILED after the fix and retry: {state:?}"
                ));
            }
            for i in 0..kinds.len() {
                let e = effect(i);
                if e.undone > e.done {
                    return Err(format!("{id}: step {i} undone without effect"));
                }
            }
        }
        status => return Err(format!("{id}: not terminal: {status:?}")),
    }
    Ok(())
}
