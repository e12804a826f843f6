//! The load balancers of a cluster. Each picks among the healthy endpoints, avoiding
//! the ones a retry names (a request that failed to connect goes once to another).
//!
//! - round robin: in turn;
//! - weighted round robin: nginx's smooth algorithm, deterministic — weights 5, 1, 1
//!   give a a b a c a a, never a burst of five a's;
//! - least request: the fewest requests under way, ties in turn;
//! - peak EWMA (Finagle's and linkerd's): two endpoints at random, the one whose
//!   latency estimate × (requests under way + 1) is lower; the estimate jumps up to
//!   any slower answer at once and decays towards faster ones over ~10 s, so a
//!   slowing endpoint sheds load before its average shows it;
//! - Maglev consistent hashing (Google's): a 65 537-slot table in which each endpoint
//!   takes slots by its own permutation; a key's slot gives its endpoint. Keys spread
//!   evenly, and when an endpoint leaves only its own keys move.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::config::{BalanceKind, OutlierConfig};

/// The Maglev table size: a prime well above 100 × the endpoints of any cluster.
pub const MAGLEV_SLOTS: usize = 65_537;

/// How fast the peak-EWMA estimate forgets.
const DECAY: Duration = Duration::from_secs(10);

/// The estimate of an endpoint not measured yet: low enough to be tried soon.
const DEFAULT_RTT: Duration = Duration::from_millis(1);

/// One endpoint of a cluster and what the balancers track of it.
#[derive(Debug)]
pub struct Endpoint {
    /// `host:port`.
    pub address: String,
    pub weight: u32,
    outstanding: AtomicU64,
    healthy: AtomicBool,
    /// (estimate in nanoseconds, when it was last updated).
    ewma: Mutex<(f64, Instant)>,
    /// Failed answers in a row (5xx, no connection).
    failures: AtomicU32,
    /// Times ejected so far, and until when it is out now.
    ejection: Mutex<(u32, Option<Instant>)>,
}

impl Endpoint {
    pub fn outstanding(&self) -> u64 {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// Healthy by the active checks (or without them).
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Taken out by outlier ejection until then.
    pub fn ejected_until(&self) -> Option<Instant> {
        lock(&self.ejection)
            .1
            .filter(|until| *until > Instant::now())
    }

    fn available(&self, now: Instant) -> bool {
        self.healthy() && lock(&self.ejection).1.is_none_or(|until| until <= now)
    }

    /// The peak-EWMA latency estimate now.
    pub fn latency_estimate(&self) -> Duration {
        let (estimate, at) = *lock(&self.ewma);
        Duration::from_nanos(decayed(estimate, at.elapsed(), 0.0) as u64)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The estimate `elapsed` after it was `estimate`, moved towards `sample`.
fn decayed(estimate: f64, elapsed: Duration, sample: f64) -> f64 {
    let w = (-elapsed.as_secs_f64() / DECAY.as_secs_f64()).exp();
    estimate * w + sample * (1.0 - w)
}

/// A cluster's endpoints and its balancing state.
#[derive(Debug)]
pub struct Balancer {
    kind: BalanceKind,
    endpoints: Vec<Endpoint>,
    turn: AtomicUsize,
    /// Smooth weighted round robin: each endpoint's current weight.
    current: Mutex<Vec<i64>>,
    /// Maglev: the table for the last set of candidates it was built for.
    maglev: Mutex<Option<(Vec<usize>, Vec<u32>)>>,
    outlier: OutlierConfig,
}

/// A request under way at an endpoint: finish it with its latency (or drop it, for a
/// request that ended without one).
#[derive(Debug)]
pub struct InFlight<'a> {
    endpoint: &'a Endpoint,
    started: Instant,
    finished: bool,
}

impl InFlight<'_> {
    /// Records the answer's latency (peak EWMA) and ends the request.
    pub fn finish(mut self) {
        let rtt = self.started.elapsed().as_nanos() as f64;
        let mut ewma = lock(&self.endpoint.ewma);
        let (estimate, at) = *ewma;
        let now = Instant::now();
        // A slower answer is taken at once; a faster one pulls the estimate down slowly.
        let next = if rtt > estimate {
            rtt
        } else {
            decayed(estimate, now.duration_since(at), rtt)
        };
        *ewma = (next, now);
        drop(ewma);
        self.finished = true;
        self.endpoint.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.endpoint.outstanding.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Balancer {
    /// `endpoints` are (address, weight); all start healthy.
    pub fn new(kind: BalanceKind, endpoints: &[(String, u32)]) -> Self {
        let now = Instant::now();
        Self {
            kind,
            endpoints: endpoints
                .iter()
                .map(|(address, weight)| Endpoint {
                    address: address.clone(),
                    weight: (*weight).max(1),
                    outstanding: AtomicU64::new(0),
                    healthy: AtomicBool::new(true),
                    ewma: Mutex::new((DEFAULT_RTT.as_nanos() as f64, now)),
                    failures: AtomicU32::new(0),
                    ejection: Mutex::new((0, None)),
                })
                .collect(),
            turn: AtomicUsize::new(0),
            current: Mutex::new(vec![0; endpoints.len()]),
            maglev: Mutex::new(None),
            outlier: OutlierConfig {
                consecutive_failures: 0,
                ..OutlierConfig::default()
            },
        }
    }

    /// Ejects endpoints whose answers keep failing (off until set).
    pub fn with_outlier(mut self, outlier: OutlierConfig) -> Self {
        self.outlier = outlier;
        self
    }

    /// Records how an endpoint answered: `ok` false for a 5xx or no connection.
    /// Returns the ejection's end when this answer ejects it.
    pub fn report(&self, i: usize, ok: bool) -> Option<Instant> {
        let endpoint = self.endpoints.get(i)?;
        if ok {
            endpoint.failures.store(0, Ordering::Relaxed);
            return None;
        }
        let failures = endpoint.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let policy = &self.outlier;
        if policy.consecutive_failures == 0 || failures < policy.consecutive_failures {
            return None;
        }
        let now = Instant::now();
        let out_now = self
            .endpoints
            .iter()
            .filter(|e| lock(&e.ejection).1.is_some_and(|until| until > now))
            .count();
        let allowed = (self.endpoints.len() * policy.max_ejected_percent as usize / 100).max(1);
        let mut ejection = lock(&endpoint.ejection);
        if ejection.1.is_some_and(|until| until > now) || out_now >= allowed {
            return None;
        }
        ejection.0 += 1;
        let time = policy
            .base_ejection
            .saturating_mul(ejection.0)
            .min(policy.max_ejection);
        let until = now + time;
        ejection.1 = Some(until);
        endpoint.failures.store(0, Ordering::Relaxed);
        tracing::warn!(endpoint = %endpoint.address, ejected_for = ?time, times = ejection.0, "endpoint ejected: its answers keep failing");
        Some(until)
    }

    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    pub fn set_healthy(&self, i: usize, healthy: bool) {
        if let Some(endpoint) = self.endpoints.get(i) {
            endpoint.healthy.store(healthy, Ordering::Relaxed);
        }
    }

    /// Marks a request under way at endpoint `i`.
    pub fn start(&self, i: usize) -> Option<InFlight<'_>> {
        let endpoint = self.endpoints.get(i)?;
        endpoint.outstanding.fetch_add(1, Ordering::Relaxed);
        Some(InFlight {
            endpoint,
            started: Instant::now(),
            finished: false,
        })
    }

    /// An endpoint for a request: `key` is what the hashing balancers hash (a header's
    /// value, the client's address); `avoid` the endpoints already tried. None: no
    /// healthy endpoint is left.
    pub fn pick(&self, key: Option<&str>, avoid: &[usize]) -> Option<usize> {
        let now = Instant::now();
        let mut candidates: Vec<usize> = (0..self.endpoints.len())
            .filter(|i| self.endpoints[*i].available(now) && !avoid.contains(i))
            .collect();
        // Panic routing (Envoy's panic threshold, at its limit): when no endpoint at
        // all is healthy and in, health and ejection are set aside and every endpoint
        // may be tried — a cluster whose checks all fail, or whose only endpoint was
        // ejected, may still answer; refusing everything surely does not.
        if candidates.is_empty() && !self.endpoints.iter().any(|e| e.available(now)) {
            candidates = (0..self.endpoints.len())
                .filter(|i| !avoid.contains(i))
                .collect();
        }
        if candidates.is_empty() {
            return None;
        }
        Some(match self.kind {
            BalanceKind::RoundRobin => self.in_turn(&candidates),
            BalanceKind::WeightedRoundRobin => self.smooth(&candidates),
            BalanceKind::LeastRequest => {
                let least = candidates
                    .iter()
                    .map(|i| self.endpoints[*i].outstanding())
                    .min()
                    .unwrap_or(0);
                let tied: Vec<usize> = candidates
                    .into_iter()
                    .filter(|i| self.endpoints[*i].outstanding() == least)
                    .collect();
                self.in_turn(&tied)
            }
            BalanceKind::PeakEwma => self.two_choices(&candidates),
            BalanceKind::HashHeader | BalanceKind::HashClientIp => match key {
                Some(key) => self.maglev(&candidates, key),
                None => self.in_turn(&candidates),
            },
        })
    }

    fn in_turn(&self, candidates: &[usize]) -> usize {
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        candidates[turn % candidates.len()]
    }

    /// nginx's smooth weighted round robin over the candidates.
    fn smooth(&self, candidates: &[usize]) -> usize {
        let mut current = lock(&self.current);
        let mut total = 0;
        let mut best = candidates[0];
        for &i in candidates {
            let weight = i64::from(self.endpoints[i].weight);
            current[i] += weight;
            total += weight;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        best
    }

    fn two_choices(&self, candidates: &[usize]) -> usize {
        if candidates.len() == 1 {
            return candidates[0];
        }
        let a = fastrand::usize(..candidates.len());
        let mut b = fastrand::usize(..candidates.len() - 1);
        if b >= a {
            b += 1;
        }
        let cost = |i: usize| {
            let endpoint = &self.endpoints[i];
            endpoint.latency_estimate().as_nanos() as f64 * (endpoint.outstanding() + 1) as f64
        };
        let (a, b) = (candidates[a], candidates[b]);
        if cost(a) <= cost(b) { a } else { b }
    }

    fn maglev(&self, candidates: &[usize], key: &str) -> usize {
        let slot = (hash(key.as_bytes(), 0) % MAGLEV_SLOTS as u64) as usize;
        let mut cached = lock(&self.maglev);
        let table = match &mut *cached {
            Some((built_for, table)) if built_for == candidates => table,
            stale => {
                let names: Vec<&str> = candidates
                    .iter()
                    .map(|i| self.endpoints[*i].address.as_str())
                    .collect();
                &mut stale.insert((candidates.to_vec(), maglev_table(&names))).1
            }
        };
        candidates[table[slot] as usize]
    }
}

/// The Maglev lookup table of `names`: slot → index into `names`.
pub fn maglev_table(names: &[&str]) -> Vec<u32> {
    let m = MAGLEV_SLOTS as u64;
    let permutations: Vec<(u64, u64)> = names
        .iter()
        .map(|name| {
            let offset = hash(name.as_bytes(), 1) % m;
            let skip = hash(name.as_bytes(), 2) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; names.len()];
    let mut table = vec![u32::MAX; MAGLEV_SLOTS];
    let mut filled = 0;
    'fill: loop {
        for (i, (offset, skip)) in permutations.iter().enumerate() {
            let mut slot = ((offset + next[i] * skip) % m) as usize;
            while table[slot] != u32::MAX {
                next[i] += 1;
                slot = ((offset + next[i] * skip) % m) as usize;
            }
            table[slot] = u32::try_from(i).unwrap_or(u32::MAX);
            next[i] += 1;
            filled += 1;
            if filled == MAGLEV_SLOTS {
                break 'fill;
            }
        }
    }
    table
}

/// FNV-1a with a seed, through splitmix64's finaliser (FNV alone barely moves for
/// names that differ in one character, as endpoint addresses do).
fn hash(bytes: &[u8], seed: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn balancer(kind: BalanceKind, weights: &[u32]) -> Balancer {
        let endpoints: Vec<(String, u32)> = weights
            .iter()
            .enumerate()
            .map(|(i, w)| (format!("10.0.0.{}:80", i + 1), *w))
            .collect();
        Balancer::new(kind, &endpoints)
    }

    #[test]
    fn round_robin_takes_turns_and_skips_the_unhealthy_and_the_tried() {
        let b = balancer(BalanceKind::RoundRobin, &[1, 1, 1]);
        let picks: Vec<usize> = (0..6).filter_map(|_| b.pick(None, &[])).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        b.set_healthy(1, false);
        let picks: Vec<usize> = (0..4).filter_map(|_| b.pick(None, &[])).collect();
        assert!(picks.iter().all(|p| *p != 1), "{picks:?}");
        assert!(b.pick(None, &[0]).is_some_and(|p| p == 2));
        assert_eq!(b.pick(None, &[0, 2]), None, "nothing healthy left to try");
    }

    #[test]
    fn with_nothing_healthy_every_endpoint_may_be_tried() {
        let b = balancer(BalanceKind::RoundRobin, &[1, 1]);
        b.set_healthy(0, false);
        b.set_healthy(1, false);
        let picks: Vec<usize> = (0..4).filter_map(|_| b.pick(None, &[])).collect();
        assert_eq!(picks.len(), 4, "panic routing: {picks:?}");
        assert_eq!(b.pick(None, &[0]), Some(1), "still another one to try");
        assert_eq!(b.pick(None, &[0, 1]), None, "both tried");
    }

    #[test]
    fn weighted_round_robin_is_smooth_and_deterministic() {
        let b = balancer(BalanceKind::WeightedRoundRobin, &[5, 1, 1]);
        let picks: Vec<usize> = (0..14).filter_map(|_| b.pick(None, &[])).collect();
        // nginx's sequence for weights 5, 1, 1: a a b a c a a, twice.
        assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0, 0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn least_request_prefers_the_idle_endpoint() {
        let b = balancer(BalanceKind::LeastRequest, &[1, 1, 1]);
        let busy = [b.start(0), b.start(0), b.start(1)];
        assert_eq!(b.pick(None, &[]), Some(2));
        let also = b.start(2);
        let picks: Vec<Option<usize>> = (0..4).map(|_| b.pick(None, &[])).collect();
        assert!(
            picks.iter().all(|p| matches!(p, Some(1 | 2))),
            "1 and 2 have one each, 0 has two: {picks:?}"
        );
        drop((busy, also));
        assert_eq!(
            b.endpoints()[0].outstanding(),
            0,
            "ended requests are counted out"
        );
    }

    #[test]
    fn peak_ewma_takes_a_slow_answer_at_once_and_sends_less_there() {
        let b = balancer(BalanceKind::PeakEwma, &[1, 1]);
        // Endpoint 1 answered in 50 ms, endpoint 0 in about nothing.
        let slow = b.start(1).expect("endpoint");
        std::thread::sleep(Duration::from_millis(50));
        slow.finish();
        b.start(0).expect("endpoint").finish();
        assert!(b.endpoints()[1].latency_estimate() >= Duration::from_millis(45));
        let to_slow = (0..1_000).filter(|_| b.pick(None, &[]) == Some(1)).count();
        assert_eq!(to_slow, 0, "with two endpoints both are always compared");
    }

    #[test]
    fn maglev_spreads_keys_evenly_keeps_them_and_moves_only_a_leavers_keys() {
        let b = balancer(BalanceKind::HashHeader, &[1, 1, 1, 1, 1]);
        let keys: Vec<String> = (0..20_000).map(|i| format!("user-{i}")).collect();
        let before: Vec<usize> = keys
            .iter()
            .map(|k| b.pick(Some(k), &[]).expect("pick"))
            .collect();
        for endpoint in 0..5 {
            let share = before.iter().filter(|e| **e == endpoint).count();
            assert!(
                (3_600..=4_400).contains(&share),
                "endpoint {endpoint}: {share}"
            );
        }
        let again: Vec<usize> = keys
            .iter()
            .map(|k| b.pick(Some(k), &[]).expect("pick"))
            .collect();
        assert_eq!(before, again, "the same key, the same endpoint");
        b.set_healthy(2, false);
        let after: Vec<usize> = keys
            .iter()
            .map(|k| b.pick(Some(k), &[]).expect("pick"))
            .collect();
        let moved = before
            .iter()
            .zip(&after)
            .filter(|(was, now)| **was != 2 && was != now)
            .count();
        assert!(after.iter().all(|e| *e != 2));
        // Maglev's promise is minimal, not zero, disruption: a few percent at most.
        assert!(
            moved < keys.len() / 20,
            "{moved} keys of staying endpoints moved"
        );
    }

    #[test]
    fn failing_endpoints_are_ejected_for_growing_times_within_the_cap() {
        let outlier = OutlierConfig {
            consecutive_failures: 3,
            base_ejection: Duration::from_millis(60),
            max_ejection: Duration::from_millis(100),
            max_ejected_percent: 50,
        };
        let b = balancer(BalanceKind::RoundRobin, &[1, 1, 1]).with_outlier(outlier);
        assert_eq!(b.report(0, false), None);
        b.report(0, true);
        assert_eq!(b.report(0, false), None, "a success starts the count again");
        assert_eq!(b.report(0, false), None);
        let until = b
            .report(0, false)
            .expect("ejected on the third failure in a row");
        assert!(until > Instant::now() + Duration::from_millis(40));
        assert!((0..6).all(|_| b.pick(None, &[]) != Some(0)));
        for _ in 0..3 {
            b.report(1, false);
        }
        assert_eq!(
            b.endpoints()[1].ejected_until(),
            None,
            "at most half of three: one"
        );
        std::thread::sleep(Duration::from_millis(70));
        assert!(
            (0..6).any(|_| b.pick(None, &[]) == Some(0)),
            "back after its time"
        );
        for _ in 0..2 {
            b.report(0, false);
        }
        let second = b.report(0, false).expect("ejected again");
        let time = second.duration_since(Instant::now());
        assert!(
            time > Duration::from_millis(80),
            "longer the second time: {time:?}"
        );
        assert!(
            time <= Duration::from_millis(100),
            "never above the maximum: {time:?}"
        );
    }
}
