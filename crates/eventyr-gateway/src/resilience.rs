//! A cluster's guards: a circuit breaker (closed → open when the error rate over a
//! sliding window passes a threshold with enough requests → half-open after a while,
//! letting a few probes through → closed when they succeed, open again when one
//! fails) and a bulkhead (at most so many requests at once; beyond, shed at once).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// A cluster's circuit breaker settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Share of failed answers (5xx, no connection, timeouts) that opens it. Default 0.5.
    #[serde(default = "half")]
    pub error_rate: f64,
    /// The window the rate is measured over. Default 10 s.
    #[serde(default = "ten_seconds", with = "crate::config::humantime_serde_lite")]
    pub window: Duration,
    /// Requests in the window below which it never opens. Default 20.
    #[serde(default = "twenty")]
    pub min_requests: u32,
    /// How long it stays open before probing. Default 30 s.
    #[serde(
        default = "thirty_seconds",
        with = "crate::config::humantime_serde_lite"
    )]
    pub open_for: Duration,
    /// Probes let through half-open; all must succeed to close. Default 3.
    #[serde(default = "three")]
    pub probes: u32,
}

fn half() -> f64 {
    0.5
}
fn ten_seconds() -> Duration {
    Duration::from_secs(10)
}
fn thirty_seconds() -> Duration {
    Duration::from_secs(30)
}
fn twenty() -> u32 {
    20
}
fn three() -> u32 {
    3
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            error_rate: half(),
            window: ten_seconds(),
            min_requests: twenty(),
            open_for: thirty_seconds(),
            probes: three(),
        }
    }
}

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

/// Buckets the window is cut into.
const BUCKETS: usize = 10;

#[derive(Debug)]
struct Inner {
    state: BreakerState,
    /// (bucket start, requests, failures), oldest first.
    buckets: Vec<(Instant, u32, u32)>,
    opened_at: Instant,
    /// Half-open: probes let through, and how many answered well.
    probes_out: u32,
    probes_ok: u32,
}

/// A circuit breaker.
#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    inner: Mutex<Inner>,
    /// The cluster it guards, for its metrics.
    cluster: String,
}

/// Permission to send a request; report its outcome with [`Breaker::record`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    probe: bool,
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Self {
        Self::named(config, "")
    }

    /// A breaker whose transitions are counted (and its state shown) under `cluster`.
    pub fn named(config: BreakerConfig, cluster: &str) -> Self {
        let now = Instant::now();
        Self {
            cluster: cluster.to_owned(),
            config,
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                buckets: Vec::new(),
                opened_at: now,
                probes_out: 0,
                probes_ok: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn state(&self) -> BreakerState {
        let mut inner = self.lock();
        self.advance(&mut inner, Instant::now());
        inner.state
    }

    /// Open long enough: half-open.
    fn advance(&self, inner: &mut Inner, now: Instant) {
        if inner.state == BreakerState::Open
            && now.duration_since(inner.opened_at) >= self.config.open_for
        {
            self.enter(inner, BreakerState::HalfOpen);
            inner.probes_out = 0;
            inner.probes_ok = 0;
        }
    }

    /// Whether a request may go now.
    pub fn admit(&self) -> Option<Admitted> {
        let now = Instant::now();
        let mut inner = self.lock();
        self.advance(&mut inner, now);
        match inner.state {
            BreakerState::Closed => Some(Admitted { probe: false }),
            BreakerState::Open => None,
            BreakerState::HalfOpen if inner.probes_out < self.config.probes.max(1) => {
                inner.probes_out += 1;
                Some(Admitted { probe: true })
            }
            BreakerState::HalfOpen => None,
        }
    }

    /// Records an admitted request's outcome; returns the state after it.
    pub fn record(&self, admitted: Admitted, ok: bool) -> BreakerState {
        let now = Instant::now();
        let mut inner = self.lock();
        if admitted.probe {
            if inner.state == BreakerState::HalfOpen {
                if !ok {
                    self.open(&mut inner, now);
                } else {
                    inner.probes_ok += 1;
                    if inner.probes_ok >= self.config.probes.max(1) {
                        self.enter(&mut inner, BreakerState::Closed);
                        inner.buckets.clear();
                    }
                }
            }
            return inner.state;
        }
        let width = self.config.window / BUCKETS as u32;
        inner
            .buckets
            .retain(|(start, _, _)| now.duration_since(*start) < self.config.window);
        match inner.buckets.last_mut() {
            Some((start, requests, failures)) if now.duration_since(*start) < width => {
                *requests += 1;
                *failures += u32::from(!ok);
            }
            _ => inner.buckets.push((now, 1, u32::from(!ok))),
        }
        let (requests, failures) = inner
            .buckets
            .iter()
            .fold((0u32, 0u32), |(r, f), (_, br, bf)| (r + br, f + bf));
        let rate = f64::from(failures) / f64::from(requests.max(1));
        if inner.state == BreakerState::Closed
            && requests >= self.config.min_requests
            && rate >= self.config.error_rate
        {
            self.open(&mut inner, now);
        }
        inner.state
    }

    /// Moves to `state`, counting the transition and showing the state
    /// (`eventyr_gateway_circuit_open`: 0 closed, 0.5 half-open, 1 open).
    fn enter(&self, inner: &mut Inner, state: BreakerState) {
        use eventyr_telemetry::names;
        inner.state = state;
        if self.cluster.is_empty() {
            return;
        }
        let (name, open) = match state {
            BreakerState::Closed => ("closed", 0.0),
            BreakerState::HalfOpen => ("half_open", 0.5),
            BreakerState::Open => ("open", 1.0),
        };
        metrics::counter!(
            names::GATEWAY_CIRCUIT_TRANSITIONS_TOTAL,
            names::LABEL_CLUSTER => self.cluster.clone(),
            names::LABEL_STATE => name
        )
        .increment(1);
        metrics::gauge!(names::GATEWAY_CIRCUIT_OPEN, names::LABEL_CLUSTER => self.cluster.clone())
            .set(open);
        match state {
            BreakerState::Open => {
                tracing::warn!(cluster = %self.cluster, "circuit breaker open: the cluster's upstreams keep failing");
            }
            _ => tracing::info!(cluster = %self.cluster, state = name, "circuit breaker"),
        }
    }

    fn open(&self, inner: &mut Inner, now: Instant) {
        self.enter(inner, BreakerState::Open);
        inner.opened_at = now;
        inner.buckets.clear();
    }
}

/// A cluster's retry budget over a sliding 10 s window.
#[derive(Debug)]
pub struct RetryBudget {
    config: crate::config::BudgetConfig,
    /// (bucket start, requests, retries), oldest first; one bucket a second.
    buckets: Mutex<Vec<(Instant, u64, u64)>>,
}

/// The budget's window.
const BUDGET_WINDOW: Duration = Duration::from_secs(10);

impl RetryBudget {
    pub fn new(config: crate::config::BudgetConfig) -> Self {
        Self {
            config,
            buckets: Mutex::new(Vec::new()),
        }
    }

    fn with_bucket<T>(&self, f: impl FnOnce(&mut (Instant, u64, u64), u64, u64) -> T) -> T {
        let now = Instant::now();
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        buckets.retain(|(start, _, _)| now.duration_since(*start) < BUDGET_WINDOW);
        if buckets
            .last()
            .is_none_or(|(start, _, _)| now.duration_since(*start) >= Duration::from_secs(1))
        {
            buckets.push((now, 0, 0));
        }
        let (requests, retries) = buckets
            .iter()
            .fold((0, 0), |(r, t), (_, br, bt)| (r + br, t + bt));
        let last = buckets.len() - 1;
        f(&mut buckets[last], requests, retries)
    }

    /// A request arrives (it earns a share of a retry).
    pub fn deposit(&self) {
        self.with_bucket(|bucket, _, _| bucket.1 += 1);
    }

    /// Takes one retry if the budget has it.
    pub fn withdraw(&self) -> bool {
        let (ratio, floor) = (
            self.config.ratio,
            u64::from(self.config.min_per_second) * BUDGET_WINDOW.as_secs(),
        );
        self.with_bucket(|bucket, requests, retries| {
            let allowed = floor + (ratio * requests as f64) as u64;
            let ok = retries < allowed;
            if ok {
                bucket.2 += 1;
            }
            ok
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(BreakerConfig {
            error_rate: 0.5,
            window: Duration::from_secs(10),
            min_requests: 10,
            open_for: Duration::from_millis(50),
            probes: 2,
        })
    }

    fn send(b: &Breaker, ok: bool) -> Option<BreakerState> {
        b.admit().map(|admitted| b.record(admitted, ok))
    }

    #[test]
    fn it_opens_on_the_error_rate_with_enough_requests_then_probes_and_closes() {
        let b = breaker();
        for _ in 0..9 {
            assert_eq!(
                send(&b, false),
                Some(BreakerState::Closed),
                "below min_requests"
            );
        }
        assert_eq!(send(&b, false), Some(BreakerState::Open));
        assert_eq!(b.admit(), None, "open: shed at once");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        let (first, second) = (b.admit().expect("probe"), b.admit().expect("probe"));
        assert_eq!(b.admit(), None, "only the probes go");
        assert_eq!(b.record(first, true), BreakerState::HalfOpen);
        assert_eq!(b.record(second, true), BreakerState::Closed);
        assert!(b.admit().is_some());
    }

    #[test]
    fn the_retry_budget_allows_a_floor_plus_a_share_of_the_requests() {
        let budget = RetryBudget::new(crate::config::BudgetConfig {
            ratio: 0.2,
            min_per_second: 1,
        });
        let floor = (0..100).take_while(|_| budget.withdraw()).count();
        assert_eq!(floor, 10, "1/s over 10 s with no requests");
        for _ in 0..50 {
            budget.deposit();
        }
        let more = (0..100).take_while(|_| budget.withdraw()).count();
        assert_eq!(more, 10, "and 20 % of 50 requests");
    }

    #[test]
    fn a_failed_probe_opens_it_again_and_a_healthy_rate_keeps_it_closed() {
        let b = breaker();
        for i in 0..20 {
            assert_eq!(
                send(&b, i % 3 != 0),
                Some(BreakerState::Closed),
                "a third fail"
            );
        }
        for _ in 0..20 {
            send(&b, false);
        }
        assert_eq!(b.state(), BreakerState::Open);
        std::thread::sleep(Duration::from_millis(60));
        let probe = b.admit().expect("probe");
        assert_eq!(b.record(probe, false), BreakerState::Open);
        assert_eq!(b.admit(), None);
    }
}
