//! Saga monitoring: live figures folded from the saga log — counts by status (the same
//! fold as [`crate::SagaHandle::list`], so the two agree), success rate, average and
//! p95 duration and throughput over a window, compensations and failed compensations,
//! sagas running past their deadline, and the most recent sagas.
//!
//! [`SagaMonitor::run`] follows the store's saga streams from the first event (so the
//! figures cover the whole log after a restart) and keeps following; [`SagaMonitor::figures`]
//! is a snapshot, cheap enough to take every second.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use eventyr_core::Timestamp;
use eventyr_store::{EventStore, Filter, SubscriptionOptions, subscribe_all};
use eventyr_telemetry::names;
use futures::StreamExt as _;
use serde::Serialize;

use crate::definition::SagaDefinition;
use crate::engine::{STREAM_PREFIX, SagaSummary};
use crate::machine::{SagaEvent, SagaStatus};

/// Finished sagas kept for the windowed figures (durations, outcomes).
const FINISHED_KEPT: usize = 50_000;
/// Sagas in the "recent" table.
const RECENT: usize = 100;
/// Per-minute counts kept: seven days.
const MINUTES_KEPT: i64 = 7 * 24 * 60;
/// Per-minute counts in a snapshot: the last hour.
const MINUTES_SHOWN: i64 = 60;
/// How often the stuck sagas are counted for the `eventyr_saga_stuck` gauge.
const STUCK_EVERY: Duration = Duration::from_secs(10);

/// Every status, in the order of a saga's life.
const STATUSES: [SagaStatus; 6] = [
    SagaStatus::Started,
    SagaStatus::InProgress,
    SagaStatus::Completed,
    SagaStatus::Compensating,
    SagaStatus::Compensated,
    SagaStatus::Failed,
];

/// The longest a saga of `definition` may take going forward: each step's timeout
/// times its attempts. A saga unfinished after it is stuck.
pub fn deadline(definition: &SagaDefinition) -> Duration {
    definition
        .steps
        .iter()
        .map(|step| step.timeout.saturating_mul(step.retry.attempts_max.max(1)))
        .sum()
}

/// Live saga figures; see the module documentation.
pub struct SagaMonitor {
    deadlines: HashMap<String, Duration>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    sagas: HashMap<String, SagaSummary>,
    /// (finished at, duration, completed?) of the latest finished sagas.
    finished: VecDeque<(Timestamp, Duration, bool)>,
    /// Per minute since the epoch: [started, completed, not completed].
    minutes: BTreeMap<i64, [u32; 3]>,
    compensations: u64,
    compensations_failed: u64,
    /// Events folded in.
    events: u64,
}

/// One saga in a table: its summary, and how long it has taken.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SagaLine {
    #[serde(flatten)]
    pub saga: SagaSummary,
    /// From start to now (running) or to its end (finished).
    pub duration_ms: u64,
}

/// Sagas started and finished in one minute.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Minute {
    pub at: Timestamp,
    pub started: u32,
    pub completed: u32,
    /// Finished other than COMPLETED (compensated or failed).
    pub failed: u32,
}

/// A snapshot of the figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SagaFigures {
    pub total: usize,
    /// Sagas by current status (every status present).
    pub by_status: BTreeMap<&'static str, usize>,
    /// FAILED sagas flagged for manual intervention.
    pub flagged: usize,
    /// The window of the figures below, seconds.
    pub window_s: u64,
    /// Sagas finished in the window, and how many of them completed.
    pub finished: usize,
    pub completed: usize,
    /// completed / finished in the window (none without a finished saga).
    pub success_rate: Option<f64>,
    pub duration_avg_ms: Option<f64>,
    pub duration_p95_ms: Option<f64>,
    /// Finished sagas per minute over the window.
    pub throughput_per_minute: f64,
    /// The last hour, a minute each, oldest first.
    pub per_minute: Vec<Minute>,
    /// Compensations done, and compensations given up on (manual intervention), ever.
    pub compensations: u64,
    pub compensations_failed: u64,
    /// Running past their saga type's deadline, oldest first.
    pub stuck: Vec<SagaLine>,
    /// The newest sagas, newest first.
    pub recent: Vec<SagaLine>,
    /// Saga events folded in (how far the monitor has read).
    pub events: u64,
}

impl SagaMonitor {
    /// A monitor that knows the deadlines of `definitions`' saga types (a saga of another
    /// type is never counted stuck).
    pub fn new<'a>(definitions: impl IntoIterator<Item = &'a SagaDefinition>) -> Arc<Self> {
        Arc::new(Self {
            deadlines: definitions
                .into_iter()
                .map(|d| (d.saga_type.clone(), deadline(d)))
                .collect(),
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Follows the saga streams of `store` until `shutdown`; a failed read is retried by
    /// the subscription.
    pub async fn run(
        self: Arc<Self>,
        store: Arc<dyn EventStore>,
        shutdown: impl Future<Output = ()> + Send,
    ) {
        let events = subscribe_all(
            store,
            eventyr_core::Position::FIRST,
            Filter::stream_prefix(STREAM_PREFIX),
            SubscriptionOptions::default(),
        );
        let mut events = std::pin::pin!(events);
        let mut shutdown = std::pin::pin!(shutdown);
        let mut look = tokio::time::interval(STUCK_EVERY);
        look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                _ = look.tick() => self.publish_stuck(Timestamp::from_system_time(std::time::SystemTime::now())),
                next = events.next() => match next {
                    None => return,
                    Some(Err(error)) => {
                        tracing::warn!(%error, "the saga monitor cannot read the saga log; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Some(Ok(event)) => {
                        let Some(id) = event.stream_id.as_str().strip_prefix(STREAM_PREFIX) else {
                            continue;
                        };
                        match event.data.decode::<SagaEvent>() {
                            Ok(decoded) => self.observe(id, &decoded),
                            Err(error) => {
                                tracing::warn!(saga = %id, %error, "the saga monitor skips an event it cannot read");
                            }
                        }
                    }
                },
            }
        }
    }

    /// Sets the `eventyr_saga_stuck` gauge of each known saga type as of `now`.
    fn publish_stuck(&self, now: Timestamp) {
        let mut stuck: HashMap<String, usize> =
            self.deadlines.keys().map(|t| (t.clone(), 0)).collect();
        for saga in self.lock().sagas.values() {
            // Only a known type can be stuck: the label stays bounded.
            if self.is_stuck(saga, now) {
                *stuck.entry(saga.saga_type.clone()).or_default() += 1;
            }
        }
        for (saga_type, count) in stuck {
            metrics::gauge!(names::SAGA_STUCK, names::LABEL_SAGA_TYPE => saga_type)
                .set(count as f64);
        }
    }

    fn is_stuck(&self, saga: &SagaSummary, now: Timestamp) -> bool {
        !saga.status.is_terminal()
            && self
                .deadlines
                .get(&saga.saga_type)
                .is_some_and(|deadline| now.duration_since(saga.started_at) > *deadline)
    }

    /// Folds one event of saga `id` in.
    pub fn observe(&self, id: &str, event: &SagaEvent) {
        let mut state = self.lock();
        state.events += 1;
        let summary = state
            .sagas
            .entry(id.to_owned())
            .or_insert_with(|| SagaSummary::empty(id));
        summary.apply(event);
        let started_at = summary.started_at;
        match event {
            SagaEvent::SagaStarted { at, .. } => state.count(*at, 0),
            SagaEvent::SagaFinished { status, at, .. } => {
                let completed = *status == SagaStatus::Completed;
                state.count(*at, if completed { 1 } else { 2 });
                if state.finished.len() == FINISHED_KEPT {
                    state.finished.pop_front();
                }
                state
                    .finished
                    .push_back((*at, at.duration_since(started_at), completed));
            }
            SagaEvent::CompensationSucceeded { .. } => state.compensations += 1,
            SagaEvent::CompensationFailed { retry_at: None, .. } => {
                state.compensations_failed += 1;
            }
            _ => {}
        }
    }

    /// The figures as of `now`, over the `window` before it.
    pub fn figures(&self, now: Timestamp, window: Duration) -> SagaFigures {
        let state = self.lock();
        let mut by_status: BTreeMap<&'static str, usize> =
            STATUSES.iter().map(|s| (s.as_str(), 0)).collect();
        let mut flagged = 0;
        let mut stuck = Vec::new();
        for saga in state.sagas.values() {
            *by_status.entry(saga.status.as_str()).or_default() += 1;
            flagged += usize::from(saga.flagged);
            if self.is_stuck(saga, now) {
                stuck.push(line(saga, now));
            }
        }
        stuck.sort_by_key(|s| s.saga.started_at);
        let mut recent: Vec<&SagaSummary> = state.sagas.values().collect();
        recent.sort_unstable_by(|a, b| b.started_at.cmp(&a.started_at).then(b.id.cmp(&a.id)));
        let recent = recent
            .into_iter()
            .take(RECENT)
            .map(|s| line(s, now))
            .collect();

        let since = Timestamp::from_unix_micros(
            now.unix_micros()
                .saturating_sub(i64::try_from(window.as_micros()).unwrap_or(i64::MAX)),
        );
        let mut durations: Vec<Duration> = Vec::new();
        let mut completed = 0;
        for (at, duration, done) in state.finished.iter().rev() {
            if *at < since {
                break;
            }
            durations.push(*duration);
            completed += usize::from(*done);
        }
        let finished = durations.len();
        durations.sort_unstable();
        let millis = |d: Duration| d.as_secs_f64() * 1000.0;
        let duration_avg_ms = (finished > 0)
            .then(|| durations.iter().map(|d| millis(*d)).sum::<f64>() / finished as f64);
        // Nearest rank.
        let duration_p95_ms = (finished > 0).then(|| {
            let rank = (finished as f64 * 0.95).ceil() as usize;
            millis(durations[rank.clamp(1, finished) - 1])
        });
        let minutes = (window.as_secs_f64() / 60.0).max(1.0 / 60.0);

        let this_minute = now.unix_micros().div_euclid(60_000_000);
        let per_minute = (this_minute - MINUTES_SHOWN + 1..=this_minute)
            .map(|minute| {
                let [started, completed, failed] =
                    state.minutes.get(&minute).copied().unwrap_or_default();
                Minute {
                    at: Timestamp::from_unix_micros(minute * 60_000_000),
                    started,
                    completed,
                    failed,
                }
            })
            .collect();
        SagaFigures {
            total: state.sagas.len(),
            by_status,
            flagged,
            window_s: window.as_secs(),
            finished,
            completed,
            success_rate: (finished > 0).then(|| completed as f64 / finished as f64),
            duration_avg_ms,
            duration_p95_ms,
            throughput_per_minute: finished as f64 / minutes,
            per_minute,
            compensations: state.compensations,
            compensations_failed: state.compensations_failed,
            stuck,
            recent,
            events: state.events,
        }
    }
}

impl State {
    /// Counts an event in its minute (slot 0 started, 1 completed, 2 not completed)
    /// and forgets minutes older than a week before it.
    fn count(&mut self, at: Timestamp, slot: usize) {
        let minute = at.unix_micros().div_euclid(60_000_000);
        self.minutes.entry(minute).or_default()[slot] += 1;
        while let Some(entry) = self.minutes.first_entry() {
            if *entry.key() > minute - MINUTES_KEPT {
                break;
            }
            entry.remove();
        }
    }
}

fn line(saga: &SagaSummary, now: Timestamp) -> SagaLine {
    let end = if saga.status.is_terminal() {
        saga.updated_at
    } else {
        now
    };
    SagaLine {
        saga: saga.clone(),
        duration_ms: u64::try_from(end.duration_since(saga.started_at).as_millis())
            .unwrap_or(u64::MAX),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::definition::{SagaDefinition, Step};

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_unix_micros(1_700_000_000_000_000 + seconds * 1_000_000)
    }

    fn started(saga_type: &str, seconds: i64) -> SagaEvent {
        SagaEvent::SagaStarted {
            saga_type: saga_type.into(),
            data: json!({}),
            correlation_id: None,
            traceparent: None,
            steps: vec!["a".into()],
            at: at(seconds),
        }
    }

    fn finished(status: SagaStatus, seconds: i64) -> SagaEvent {
        SagaEvent::SagaFinished {
            status,
            reason: None,
            flagged: status == SagaStatus::Failed,
            at: at(seconds),
        }
    }

    #[test]
    fn figures_count_statuses_and_measure_the_window() {
        let definition = SagaDefinition {
            saga_type: "order".into(),
            steps: vec![Step::retriable_only("a").timeout(Duration::from_secs(10))],
        };
        let monitor = SagaMonitor::new([&definition]);
        // Twenty sagas completed in 1..20 s, one compensated in 40 s, one failed.
        for i in 0..20 {
            monitor.observe(&format!("c{i}"), &started("order", 0));
            monitor.observe(&format!("c{i}"), &finished(SagaStatus::Completed, i + 1));
        }
        monitor.observe("x", &started("order", 0));
        monitor.observe("x", &finished(SagaStatus::Compensated, 40));
        monitor.observe("f", &started("order", 0));
        monitor.observe("f", &finished(SagaStatus::Failed, 50));
        // One running for 100 s: past its deadline (its attempts of 10 s); one young.
        monitor.observe("late", &started("order", 0));
        monitor.observe("young", &started("order", 95));

        let figures = monitor.figures(at(100), Duration::from_secs(3600));
        assert_eq!(figures.total, 24);
        assert_eq!(figures.by_status["COMPLETED"], 20);
        assert_eq!(figures.by_status["COMPENSATED"], 1);
        assert_eq!(figures.by_status["FAILED"], 1);
        assert_eq!(figures.by_status["STARTED"], 2);
        assert_eq!(figures.by_status["IN_PROGRESS"], 0);
        assert_eq!(figures.flagged, 1);
        assert_eq!((figures.finished, figures.completed), (22, 20));
        assert_eq!(figures.success_rate, Some(20.0 / 22.0));
        // 1..=20 s, 40 s and 50 s.
        let sum: f64 = (1..=20).map(f64::from).sum::<f64>() + 90.0;
        assert_eq!(figures.duration_avg_ms, Some(sum / 22.0 * 1000.0));
        // The 21st of 22 sorted durations.
        assert_eq!(figures.duration_p95_ms, Some(40_000.0));
        let stuck: Vec<&str> = figures.stuck.iter().map(|s| s.saga.id.as_str()).collect();
        assert_eq!(stuck, ["late"]);
        assert_eq!(figures.recent[0].saga.id, "young");
        assert_eq!(figures.recent.len(), 24);
        assert_eq!(figures.per_minute.len(), 60);
        let counted: u32 = figures.per_minute.iter().map(|m| m.started).sum();
        assert_eq!(counted, 24);

        // A window of 45 s before 100 s sees none of them finish (the last at 50 s).
        let recent = monitor.figures(at(100), Duration::from_secs(45));
        assert_eq!(recent.finished, 0);
        assert_eq!(recent.success_rate, None);
    }
}
