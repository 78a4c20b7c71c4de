//! Features: host-side resources a VM needs wherever it runs, and the drivers
//! that implement their four stages.
//!
//! | stage      | when                              | where       |
//! |------------|-----------------------------------|-------------|
//! | `prepare`  | Prepare                           | destination |
//! | `finish`   | Finish, before the guest resumes  | destination |
//! | `rollback` | failure or abort before commit    | destination |
//! | `release`  | Confirm after commit              | source      |
//! | `verify`   | after the guest resumed           | destination |
//!
//! Every stage is idempotent: running it twice leaves the same state as once,
//! which is what lets recovery re-run a stage whose result was lost in a crash.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use std::sync::Arc;

pub use crate::protocol::machine::NicPort;
use crate::protocol::{FeatureSpec, Stage, StageOutcome};

pub mod bridge;
pub mod exec;
pub mod faults;
pub mod links;
pub mod lldpad;
pub mod port_profile;
pub mod registry;
mod settings;
pub mod vdp;

pub use faults::FaultInjector;
pub use registry::FeatureRegistry;

/// Everything a driver knows about the stage it runs.
#[derive(Debug, Clone)]
pub struct StageContext {
    /// This host.
    pub host: String,
    pub vm: String,
    pub feature: FeatureSpec,
    pub stage: Stage,
    pub attempt_id: String,
    pub migration_id: String,
    /// The VM's NICs as this host resolves them (empty for a guest without).
    pub nics: Vec<NicPort>,
    /// The hypervisor's hand on the guest's network, where it has one.
    pub guest: Option<GuestNet>,
}

/// What a driver may ask of the hypervisor about a guest's network.
#[async_trait]
pub trait GuestNetwork: Send + Sync {
    /// Have the guest's NICs announced on the wire (gratuitous ARP/RARP),
    /// so that switches learn their MACs on the ports they are on now. A
    /// paused guest's announcement leaves when it resumes.
    async fn announce(&self, vm: &str) -> Result<(), String>;
    /// Every tap a guest of this name may have on this host, whether or
    /// not it exists: what a rollback or release that no longer knows the
    /// VM's NICs removes.
    fn taps(&self, vm: &str) -> Vec<String>;
}

/// A shared [`GuestNetwork`], printable in a [`StageContext`].
#[derive(Clone)]
pub struct GuestNet(pub Arc<dyn GuestNetwork>);

impl std::fmt::Debug for GuestNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GuestNet")
    }
}

/// Feature state a host holds for a VM (e.g. a port-profile association):
/// what status shows and what the invariant checks look for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldState {
    pub feature: String,
    pub vm: String,
    pub state: String,
}

/// Fault injection for the simulated drivers, from `[features.NAME]` in the
/// agent config or changed at run time (`tern fault`, the console).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    /// Stages that always fail on this host.
    #[serde(default)]
    pub fail: Vec<Stage>,
    /// Probability in [0, 1] that a prepare or finish stage fails (a flaky rack).
    #[serde(default)]
    pub fail_rate: f64,
    /// Added to every stage.
    #[serde(default)]
    pub latency_ms: u64,
    /// Rollback and release fail: their state is left behind as a pending rollback.
    #[serde(default)]
    pub fail_rollback: bool,
}

/// A feature driver. One instance serves every VM on the host.
#[async_trait]
pub trait Feature: Send + Sync {
    /// The feature's name as VM specs refer to it, e.g. "port-profile".
    fn name(&self) -> &str;
    /// The driver kind, e.g. "port-profile" or "exec".
    fn driver(&self) -> &str;

    async fn prepare(&self, ctx: &StageContext) -> StageOutcome;
    async fn finish(&self, ctx: &StageContext) -> StageOutcome;
    async fn rollback(&self, ctx: &StageContext) -> StageOutcome;
    async fn release(&self, ctx: &StageContext) -> StageOutcome;

    /// Whether this driver checks its work after the guest resumed.
    fn verifies(&self) -> bool {
        false
    }

    /// Check, after the guest resumed on this host, that what prepare and
    /// finish set up is in place and working. Only called where
    /// [`Feature::verifies`]; a failure makes the outcome degraded.
    async fn verify(&self, _ctx: &StageContext) -> StageOutcome {
        Ok("nothing to verify".into())
    }

    /// Whether prepare would find what it needs on this host, checked now
    /// without changing anything (`tern check`). None: this driver cannot
    /// tell before it tries.
    async fn check(&self, _ctx: &StageContext) -> Option<StageOutcome> {
        None
    }

    /// State this host holds for VMs through this feature.
    fn held_state(&self) -> Vec<HeldState> {
        Vec::new()
    }

    /// Mark a VM that starts on this host (from the config, or after recovery)
    /// as holding this feature's state here, as if prepare and finish ran.
    /// `nics` are the VM's NICs as this host places them. An error is
    /// logged: the guest runs anyway.
    async fn adopt(&self, _vm: &str, _nics: &[NicPort]) -> Result<(), String> {
        Ok(())
    }

    /// The fault injection in force, for drivers that support it.
    fn faults(&self) -> Option<Faults> {
        None
    }

    /// Replace the fault injection. Errors for drivers without it.
    fn set_faults(&self, _faults: Faults) -> Result<(), String> {
        Err(format!(
            "feature {} does not support fault injection",
            self.name()
        ))
    }
}

/// Run one stage of a feature.
pub async fn run_stage(feature: &dyn Feature, ctx: &StageContext) -> StageOutcome {
    match ctx.stage {
        Stage::Prepare => feature.prepare(ctx).await,
        Stage::Finish => feature.finish(ctx).await,
        Stage::Rollback => feature.rollback(ctx).await,
        Stage::Release => feature.release(ctx).await,
        Stage::Verify => feature.verify(ctx).await,
    }
}
