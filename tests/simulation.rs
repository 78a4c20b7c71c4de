//! The deterministic simulator (src/simulation/) over 10,000 seeds: every seed
//! is a cluster of 3–5 hosts and 2–6 VMs, each host running the agent's own
//! host core, under network faults, agent crashes at journal writes,
//! SIGKILLs, SIGTERMs and SIGSTOPs, power losses that drop the journal's
//! unsynced tail, hypervisor calls and stages that fail or never answer,
//! slow incoming starts, destinations naming another host's incoming
//! address, and an operator migrating, aborting, retrying,
//! rolling back and evacuating at random. The invariants of DESIGN.md §2 and
//! the evacuations' are checked after every step and at the end.
//!
//! The integration tests are built with the `mutations` feature (see
//! Cargo.toml), so the last test can plant known mistakes and prove the
//! simulator catches each of them.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tern::protocol::mutations::Mutation;
use tern::simulation::{Report, run_seed, run_seed_with};

const SEEDS: u64 = 10_000;

/// Run `seeds` in parallel, stopping early at the first failure when `stop`.
fn campaign(
    seeds: std::ops::Range<u64>,
    mutation: Option<Mutation>,
    stop: bool,
) -> (Vec<Report>, Vec<Report>) {
    let next = AtomicU64::new(seeds.start);
    let reports = Mutex::new((Vec::new(), Vec::new()));
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let failed_any = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    if stop && failed_any.load(Ordering::Relaxed) {
                        return;
                    }
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed >= seeds.end {
                        return;
                    }
                    let report = run_seed_with(seed, false, mutation)
                        .expect("the integration tests are built with the mutations feature");
                    let mut r = reports.lock().unwrap();
                    if report.ok() {
                        r.0.push(report);
                    } else {
                        failed_any.store(true, Ordering::Relaxed);
                        r.1.push(report);
                    }
                }
            });
        }
    });
    reports.into_inner().unwrap()
}

#[test]
fn ten_thousand_fault_schedules_keep_the_invariants() {
    let (passed, mut failed) = campaign(0..SEEDS, None, false);
    if !failed.is_empty() {
        failed.sort_by_key(|r| r.seed);
        let first = run_seed(failed[0].seed, true);
        let seeds: Vec<u64> = failed.iter().map(|r| r.seed).collect();
        panic!(
            "{} of {SEEDS} seeds broke an invariant: {seeds:?}\n\ntrace of seed {}:\n{}\n\nviolations:\n{}\n\
             rerun: cargo run --release --example simulate -- --seed {}",
            failed.len(),
            first.seed,
            first.trace.join("\n"),
            first.violations.join("\n"),
            first.seed
        );
    }
    // The schedules must actually be hostile and busy, or passing means nothing.
    let seeds = passed.len() as u64;
    let steps: u64 = passed.iter().map(|r| r.steps).sum();
    let faults: u64 = passed.iter().map(|r| r.faults).sum();
    let attempts: u64 = passed.iter().map(|r| r.attempts).sum();
    let mut outcomes = std::collections::BTreeMap::new();
    for r in &passed {
        for (k, v) in &r.outcomes {
            *outcomes.entry(*k).or_insert(0u64) += v;
        }
    }
    let mut kinds: std::collections::BTreeMap<&str, u64> = std::collections::BTreeMap::new();
    for r in &passed {
        for k in &r.fault_kinds {
            *kinds.entry(k).or_insert(0) += 1;
        }
    }
    let evacuating = passed.iter().filter(|r| r.evacuations > 0).count() as u64;
    println!(
        "seeds: {seeds}, steps: {steps}, faults: {faults}, attempts: {attempts}, outcomes: {outcomes:?}"
    );
    println!("seeds with each kind of fault: {kinds:?}; seeds with evacuations: {evacuating}");
    assert_eq!(seeds, SEEDS);
    assert!(faults >= 5 * seeds, "only {faults} faults in {seeds} seeds");
    assert!(
        attempts >= 3 * seeds,
        "only {attempts} attempts in {seeds} seeds"
    );
    for outcome in ["succeeded", "degraded", "failed", "aborted"] {
        assert!(
            outcomes.get(outcome).copied().unwrap_or(0) > 100,
            "the seeds hardly produce {outcome:?} outcomes: {outcomes:?}"
        );
    }
    // The agent's own edges are reached in a good share of the seeds.
    for kind in [
        "power loss",
        "resume fails",
        "kill fails",
        "hypervisor or stage hangs",
        "slow incoming start",
        "freeze",
        "wrong incoming address",
    ] {
        let n = kinds.get(kind).copied().unwrap_or(0);
        assert!(
            n * 20 >= seeds,
            "only {n} of {seeds} seeds include {kind:?}: {kinds:?}"
        );
    }
    assert!(
        evacuating * 5 >= seeds,
        "only {evacuating} of {seeds} seeds evacuate a host"
    );
}

#[test]
fn a_seed_replays_identically() {
    for seed in [3, 1_234, 987_654_321] {
        let a = run_seed(seed, true);
        let b = run_seed(seed, true);
        assert!(a.steps > 0 && !a.trace.is_empty());
        assert_eq!(a.trace, b.trace, "seed {seed} did not replay identically");
        assert_eq!((a.steps, a.faults), (b.steps, b.faults));
        // Tracing does not change the run.
        let quiet = run_seed(seed, false);
        assert_eq!((quiet.steps, quiet.faults), (a.steps, a.faults));
    }
}

#[test]
fn a_failing_seed_prints_a_readable_trace() {
    // Plant a mistake to get a failing seed, then check what an operator of
    // the simulator would read.
    let (_, failed) = campaign(0..5_000, Some(Mutation::RollbackOneTooFew), true);
    let seed = failed.first().expect("the planted mistake is caught").seed;
    let report = run_seed_with(seed, true, Some(Mutation::RollbackOneTooFew)).unwrap();
    let trace = report.trace.join("\n");
    assert!(!report.violations.is_empty());
    assert!(trace.contains("VIOLATION"), "{trace}");
    assert!(trace.contains("operator: migrate"), "{trace}");
    assert!(trace.contains("journal"), "{trace}");
    assert!(trace.contains("scenario:"), "{trace}");
}

#[test]
fn every_planted_mistake_is_caught_within_5000_seeds() {
    for mutation in Mutation::ALL {
        let (_, failed) = campaign(0..5_000, Some(mutation), true);
        assert!(
            !failed.is_empty(),
            "the simulator did not catch the planted mistake {}",
            mutation.name()
        );
        let report = &failed[0];
        println!(
            "{}: caught by seed {}: {}",
            mutation.name(),
            report.seed,
            report.violations[0]
        );
    }
    // And the mistakes are only there when planted.
    let (_, failed) = campaign(0..200, None, true);
    assert!(failed.is_empty(), "seed {} fails unplanted", failed[0].seed);
}
