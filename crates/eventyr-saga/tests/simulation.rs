//! The saga machine under simulated faults, over many seeds. `EVENTYR_SAGA_SEEDS=N`
//! runs N seeds (default 300) from `EVENTYR_SAGA_SEED_FROM` (default 0); a failure
//! prints the seed, and `EVENTYR_SAGA_SEEDS=1 EVENTYR_SAGA_SEED_FROM=<seed>` replays it.

use eventyr_saga::simulation::{SimOptions, SimReport, simulate};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn every_seed_keeps_the_invariants() {
    let seeds = env("EVENTYR_SAGA_SEEDS", 300);
    let from = env("EVENTYR_SAGA_SEED_FROM", 0);
    let options = SimOptions::default();
    let mut total = SimReport::default();
    for seed in from..from + seeds {
        let report = simulate(seed, &options).unwrap_or_else(|violation| panic!("{violation}"));
        total.completed += report.completed;
        total.compensated += report.compensated;
        total.failed += report.failed;
        total.crashes += report.crashes;
        total.events_recorded += report.events_recorded;
    }
    eprintln!("{seeds} seeds: {total:?}");
    // The faults must have reached every outcome, or the run proves little.
    assert!(total.completed > 0 && total.compensated > 0, "{total:?}");
    assert!(total.failed > 0 && total.crashes > 0, "{total:?}");
}

#[test]
fn a_seed_replays_exactly() {
    let options = SimOptions::default();
    assert_eq!(simulate(42, &options), simulate(42, &options));
}
