//! A deterministic simulator of a Tern cluster, in the style of FoundationDB's
//! and TigerBeetle's: one thread, one seeded RNG, no tokio, no clock reads.
//!
//! Each host runs the very [`HostCore`](crate::host::HostCore) the agent
//! runs, with the same protocol machines inside; the simulator only carries
//! the core's actions out with simulated IO (a network, a disk, a
//! hypervisor, a switch, a clock) and injects the faults. It holds no
//! decision of the agent's. Faults come from the seed:
//!
//! - the network delays, loses, duplicates and reorders messages, and
//!   partitions hosts for a while;
//! - agents crash at a journal write (before or after it) or at any moment,
//!   are stopped by SIGTERM or frozen by SIGSTOP, and restart through the
//!   recovery path; hosts lose their power (the journal loses what was not
//!   synced, the guests die) or are lost for good;
//! - the hypervisor's calls fail or never answer (start incoming, resume,
//!   kill, cancel), an incoming guest takes longer to start than the peer
//!   timeout; feature stages fail, are slow or never answer, rollbacks fail
//!   (and are retried); transfers stall or fail;
//! - an operator starts migrations (fast or safe), aborts, retries on the
//!   same or another host, re-runs pending work, evacuates hosts (and
//!   pauses, resumes, cancels and undrains) and forces attempts that cannot
//!   resolve by themselves.
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
    /// The kinds of fault this seed injected.
    pub fault_kinds: std::collections::BTreeSet<&'static str>,
    /// Evacuations its operator started (and the hosts journaled).
    pub evacuations: u64,
    /// Paused post-copy transfers its sources resumed.
    pub recoveries: u64,
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
