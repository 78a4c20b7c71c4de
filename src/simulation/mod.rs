//! A deterministic simulator of a Tern cluster, in the style of FoundationDB's
//! and TigerBeetle's: one thread, one seeded RNG, no tokio, no clock reads.
//!
//! It drives the real sans-IO [`SourceAttempt`](crate::protocol::source::SourceAttempt)
//! and [`DestinationAttempt`](crate::protocol::destination::DestinationAttempt)
//! machines and their recovery code, and around them models what the agent
//! does with their actions (journal writes, peer RPCs, hypervisor and switch
//! calls) on several hosts with several VMs. Faults come from the seed:
//!
//! - the network delays, loses, duplicates and reorders messages, and
//!   partitions hosts for a while;
//! - agents crash at a journal write (before or after it is durable) or at
//!   any moment, are stopped by SIGTERM, and restart through the recovery path;
//! - feature stages fail, are slow, rollbacks fail (and are retried);
//!   transfers stall or fail; incoming guests fail to start;
//! - an operator starts migrations (fast or safe), aborts, retries on the same
//!   or another host, and re-runs pending rollbacks at random moments.
//!
//! After every step and at quiescence the [`invariants`] of DESIGN.md §2 are
//! checked. The same seed always gives the same run, so a failing seed is
//! rerun with a trace to see the steps, the faults and the broken invariant.

mod invariants;
mod scenario;
mod world;

pub use scenario::Scenario;
pub use world::World;

use crate::protocol::mutations::Mutation;

/// What one seed did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub seed: u64,
    pub steps: u64,
    pub faults: u64,
    /// Attempts started (Begin accepted).
    pub attempts: u64,
    /// Outcomes of the attempts, by name.
    pub outcomes: std::collections::BTreeMap<&'static str, u64>,
    pub violations: Vec<String>,
    /// The run step by step (only when asked for).
    pub trace: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Run one seed. With `trace`, the report carries every step.
pub fn run_seed(seed: u64, trace: bool) -> Report {
    let scenario = Scenario::from_seed(seed);
    let mut world = World::new(scenario, trace);
    world.run();
    world.report()
}

/// Run one seed with a mistake planted in the protocol code (needs the
/// `mutations` feature; without it nothing is planted and `None` is returned).
pub fn run_seed_with(seed: u64, trace: bool, mutation: Option<Mutation>) -> Option<Report> {
    #[cfg(feature = "mutations")]
    {
        crate::protocol::mutations::plant(mutation);
        let report = run_seed(seed, trace);
        crate::protocol::mutations::plant(None);
        Some(report)
    }
    #[cfg(not(feature = "mutations"))]
    {
        let _ = (seed, trace);
        match mutation {
            Some(_) => None,
            None => Some(run_seed(seed, trace)),
        }
    }
}
