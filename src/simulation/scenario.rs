//! A seed's cluster and fault profile: how many hosts and VMs, which features
//! each VM needs, how hostile the network is, how often agents crash, which
//! switch misbehaves. Every number is drawn from the seed.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::protocol::{FeatureSpec, Millis, Stage, VmSpec};

/// The feature names a simulated VM may need (drivers do not matter here:
/// every simulated feature is a port on the host's simulated switch).
pub const FEATURES: [&str; 4] = ["port-profile", "tap", "disk", "hook"];

/// When faults and operator actions stop, and the cluster must settle.
pub const CHAOS_MS: Millis = 60_000;

#[derive(Debug, Clone)]
pub struct Scenario {
    pub seed: u64,
    pub hosts: Vec<HostSpec>,
    /// Each VM and the host it boots on.
    pub vms: Vec<(VmSpec, usize)>,
    pub net: NetFaults,
    /// Chance that an agent crashes at one journal write.
    pub crash_per_write: f64,
    /// At most this many crashes at journal writes.
    pub max_write_crashes: u32,
    /// SIGKILLs at random moments during the chaos window.
    pub kills: u32,
    /// SIGTERMs (graceful stops) at random moments.
    pub stops: u32,
    /// SIGSTOPs: the agent freezes (its connections stay open, nothing it
    /// does moves) for a while, then carries on as if nothing happened.
    pub freezes: u32,
    pub partitions: u32,
    /// A host lost for good (power, hardware) at some moment of the chaos:
    /// its agent and its guests are gone and never come back, and after the
    /// chaos the operator forces its unresolved attempts back to their
    /// sources.
    pub lose_host: Option<usize>,
    /// Lose it the first time a Finish reaches it (the worst moment: the
    /// source cannot know whether it committed) rather than at random.
    pub lose_on_finish: bool,
    /// Operator actions during the chaos window.
    pub operator_actions: u32,
    /// Whether a transfer outlives the agent that started it (QEMU does; the
    /// embedded simulated hypervisor runs inside the agent and does not).
    pub transfers_survive_crash: bool,
    /// Chance that a transfer stalls (no progress, never completes).
    pub stall: f64,
    /// Chance that a transfer fails part way.
    pub transfer_fails: f64,
    /// Chance that an incoming guest does not start.
    pub incoming_fails: f64,
    /// Chance that a destination names another host's address in C2 (a
    /// confused or forged destination): the source must send nothing.
    pub wrong_address: f64,
    /// Chance that a stage takes seconds instead of milliseconds.
    pub slow_stage: f64,
    /// How the hypervisor and the drivers misbehave (calls that fail or
    /// never answer).
    pub guest: GuestFaults,
    /// Power losses during the chaos: the host's agent and guests die, and
    /// its journal loses what was not synced.
    pub power_losses: u32,
    /// Evacuations the operator starts during the chaos (and pauses,
    /// resumes, cancels, undrains).
    pub evacuations: u32,
    pub max_outgoing: u32,
    pub max_incoming: u32,
    /// Chance that an operator's migration asks for post-copy (now, or
    /// auto with a short budget) or for pre-copy with a short budget.
    pub postcopy: f64,
    /// Chance that the switch to post-copy fails (nothing happens).
    pub switch_fails: f64,
    /// Chance that it never answers (and switched or not).
    pub switch_hangs: f64,
}

/// Chances, per call, that a hypervisor call or a stage fails (the
/// hypervisor answers an error: nothing happened) or never answers (the
/// host core's deadline must end the wait; what it did is unknown).
#[derive(Debug, Clone, Copy, Default)]
pub struct GuestFaults {
    pub resume_fails: f64,
    pub resume_hangs: f64,
    pub kill_fails: f64,
    pub kill_hangs: f64,
    pub cancel_hangs: f64,
    pub incoming_fails_late: f64,
    pub incoming_hangs: f64,
    /// Starting the incoming guest takes longer than the peer timeout
    /// (QEMU can take 15 s) while heartbeats and aborts arrive.
    pub incoming_slow: f64,
    pub stage_hangs: f64,
}

impl GuestFaults {
    pub fn any(&self) -> bool {
        self.resume_fails
            + self.resume_hangs
            + self.kill_fails
            + self.kill_hangs
            + self.cancel_hangs
            + self.incoming_fails_late
            + self.incoming_hangs
            + self.incoming_slow
            + self.stage_hangs
            > 0.0
    }
}

#[derive(Debug, Clone)]
pub struct HostSpec {
    pub name: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    /// Features this host knows (a VM with a mandatory unknown one is refused).
    pub knows: Vec<&'static str>,
    /// Chance per feature stage of failing, by stage: prepare, finish,
    /// rollback, release, verify (every simulated driver verifies).
    pub fail: [f64; 5],
    /// A feature whose finish stage always fails here (a switch that rejects
    /// ASSOCIATE), if any.
    pub broken: Option<&'static str>,
}

#[derive(Debug, Clone)]
pub struct NetFaults {
    pub loss: f64,
    pub duplicate: f64,
    /// One-way delay: uniform in `min..=max` ms (so messages reorder).
    pub delay: (Millis, Millis),
}

pub fn stage_index(stage: Stage) -> usize {
    match stage {
        Stage::Prepare => 0,
        Stage::Finish => 1,
        Stage::Rollback => 2,
        Stage::Release => 3,
        Stage::Verify => 4,
    }
}

fn pick<T: Copy>(rng: &mut StdRng, xs: &[T]) -> T {
    xs[rng.random_range(0..xs.len())]
}

impl Scenario {
    pub fn from_seed(seed: u64) -> Scenario {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x7e57_5eed);
        let n_hosts = rng.random_range(3..=5);
        let hosts = (0..n_hosts)
            .map(|i| {
                let mut knows: Vec<&'static str> = FEATURES.to_vec();
                // Now and then a host lacks a feature some VM may require.
                if rng.random_bool(0.1) {
                    knows.retain(|f| *f != "disk");
                }
                let fail_rate = pick(&mut rng, &[0.0, 0.0, 0.05, 0.2, 0.5]);
                HostSpec {
                    name: format!("hv-{}", (b'a' + i as u8) as char),
                    // Sometimes too small for the bigger VMs.
                    memory_mib: pick(&mut rng, &[65_536, 65_536, 65_536, 6_144]),
                    vcpus: 64,
                    knows,
                    fail: [
                        fail_rate,
                        fail_rate,
                        pick(&mut rng, &[0.0, 0.1, 0.5]),
                        pick(&mut rng, &[0.0, 0.1, 0.5]),
                        pick(&mut rng, &[0.0, 0.0, 0.1, 0.3]),
                    ],
                    broken: rng
                        .random_bool(0.25)
                        .then(|| pick(&mut rng, &FEATURES[..2])),
                }
            })
            .collect::<Vec<_>>();
        let n_vms = rng.random_range(2..=6);
        let vms = (0..n_vms)
            .map(|i| {
                let n_features = rng.random_range(0..=3);
                let mut names = FEATURES.to_vec();
                let features = (0..n_features)
                    .map(|_| {
                        let name = names.remove(rng.random_range(0..names.len()));
                        FeatureSpec {
                            name: name.to_string(),
                            driver: "sim".into(),
                            required: rng.random_bool(0.6),
                        }
                    })
                    .collect();
                let vm = VmSpec {
                    name: format!("vm-{i:02}"),
                    memory_mib: pick(&mut rng, &[512, 2048, 4096, 8192]),
                    vcpus: rng.random_range(1..=4),
                    dirty_rate_mib_s: 0,
                    features,
                    qemu: None,
                };
                (vm, rng.random_range(0..n_hosts))
            })
            .collect();
        let calm = rng.random_bool(0.1);
        let net = if calm {
            NetFaults {
                loss: 0.0,
                duplicate: 0.0,
                delay: (1, 2),
            }
        } else {
            NetFaults {
                loss: pick(&mut rng, &[0.0, 0.01, 0.03, 0.1]),
                duplicate: pick(&mut rng, &[0.0, 0.01, 0.05]),
                delay: (1, pick(&mut rng, &[5, 50, 300, 1500])),
            }
        };
        Scenario {
            seed,
            hosts,
            vms,
            net,
            crash_per_write: if calm {
                0.0
            } else {
                pick(&mut rng, &[0.0, 0.005, 0.02, 0.05])
            },
            max_write_crashes: rng.random_range(1..=4),
            kills: if calm { 0 } else { rng.random_range(0..=2) },
            stops: if calm { 0 } else { rng.random_range(0..=1) },
            freezes: if calm { 0 } else { rng.random_range(0..=2) },
            partitions: if calm { 0 } else { rng.random_range(0..=3) },
            lose_host: (!calm && rng.random_bool(0.1)).then(|| rng.random_range(0..n_hosts)),
            lose_on_finish: rng.random_bool(0.5),
            operator_actions: rng.random_range(8..=30),
            transfers_survive_crash: rng.random_bool(0.5),
            stall: pick(&mut rng, &[0.0, 0.0, 0.05]),
            transfer_fails: pick(&mut rng, &[0.0, 0.0, 0.05]),
            incoming_fails: pick(&mut rng, &[0.0, 0.0, 0.05]),
            slow_stage: pick(&mut rng, &[0.0, 0.02, 0.1]),
            guest: if !calm && rng.random_bool(0.5) {
                GuestFaults {
                    resume_fails: pick(&mut rng, &[0.0, 0.05, 0.2]),
                    resume_hangs: pick(&mut rng, &[0.0, 0.02, 0.1]),
                    kill_fails: pick(&mut rng, &[0.0, 0.05, 0.2]),
                    kill_hangs: pick(&mut rng, &[0.0, 0.02]),
                    cancel_hangs: pick(&mut rng, &[0.0, 0.05]),
                    incoming_fails_late: pick(&mut rng, &[0.0, 0.05]),
                    incoming_hangs: pick(&mut rng, &[0.0, 0.02]),
                    incoming_slow: pick(&mut rng, &[0.0, 0.1, 0.3]),
                    stage_hangs: pick(&mut rng, &[0.0, 0.01, 0.05]),
                }
            } else {
                GuestFaults::default()
            },
            power_losses: if calm || !rng.random_bool(0.3) {
                0
            } else {
                rng.random_range(1..=2)
            },
            evacuations: if rng.random_bool(0.4) {
                rng.random_range(1..=2)
            } else {
                0
            },
            max_outgoing: rng.random_range(1..=3),
            max_incoming: rng.random_range(1..=3),
            // Drawn last, so the schedules of every other fault stay as
            // they were before it existed.
            wrong_address: pick(&mut rng, &[0.0, 0.0, 0.05]),
            postcopy: pick(&mut rng, &[0.0, 0.3, 0.6]),
            switch_fails: pick(&mut rng, &[0.0, 0.0, 0.1]),
            switch_hangs: pick(&mut rng, &[0.0, 0.0, 0.05]),
        }
    }
}
