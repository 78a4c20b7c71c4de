//! The hypervisor a host agent drives: start an incoming guest paused,
//! transfer a guest out with progress, cancel, pause, resume, kill.
//!
//! `sim` is the embedded default (the demo and the tests); its guests outlive
//! an agent crash the way QEMU processes do, because their state is kept in
//! the agent's `state_dir`. `qemu` runs real guests, one QEMU process each,
//! over QMP (`qemu::qmp`).

pub mod qemu;
pub mod sim;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::protocol::machine::{MachineError, NicPort};
use crate::protocol::{TransferStats, VmSpec};

/// What a migration's completion policy asks of the hypervisor for one
/// transfer (the rest comes from the host's config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TransferPlan {
    /// The transfer may be switched to post-copy ([`Hypervisor::start_postcopy`]):
    /// both ends enable it before it begins.
    pub postcopy: bool,
    /// The longest pause of the final pre-copy pass, in ms; 0: the host's config.
    pub downtime_limit_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestState {
    Running,
    Paused,
    /// Started paused on the destination, receiving or holding a transfer.
    Incoming,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Guest {
    pub spec: VmSpec,
    pub state: GuestState,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HypervisorError {
    #[error("no guest named {0} on this host")]
    NoSuchGuest(String),
    #[error("a guest named {0} already exists on this host")]
    AlreadyExists(String),
    #[error("the transfer of {0} was cancelled")]
    Cancelled(String),
    #[error("{0}")]
    Failed(String),
    /// The call was made and no answer came back (the hypervisor died on
    /// it): whether it took effect is unknown.
    #[error("{0} (whether it took effect is unknown)")]
    Unknown(String),
}

/// What a QEMU guest runs as: its versioned machine type
/// (`pc-i440fx-7.2`, never the alias `pc`) and its CPU model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub machine_type: String,
    pub cpu_model: String,
}

/// Capacity of the host, for Prepare's check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostCapacity {
    pub memory_mib: u64,
    pub vcpus: u32,
}

/// One finding of `tern doctor` on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCheck {
    pub name: String,
    pub verdict: Verdict,
    pub detail: String,
    /// What to do about it; empty when ok.
    pub fix: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Warning,
    Error,
}

impl HostCheck {
    pub fn ok(name: &str, detail: impl Into<String>) -> HostCheck {
        HostCheck {
            name: name.into(),
            verdict: Verdict::Ok,
            detail: detail.into(),
            fix: String::new(),
        }
    }

    pub fn warning(name: &str, detail: impl Into<String>, fix: impl Into<String>) -> HostCheck {
        HostCheck {
            name: name.into(),
            verdict: Verdict::Warning,
            detail: detail.into(),
            fix: fix.into(),
        }
    }

    pub fn error(name: &str, detail: impl Into<String>, fix: impl Into<String>) -> HostCheck {
        HostCheck {
            name: name.into(),
            verdict: Verdict::Error,
            detail: detail.into(),
            fix: fix.into(),
        }
    }
}

#[async_trait]
pub trait Hypervisor: Send + Sync {
    /// "sim" or "qemu".
    fn kind(&self) -> &'static str;

    fn capacity(&self) -> HostCapacity;

    /// Destination, Prepare, before anything starts: whether this host can
    /// run `spec`'s machine as its own config allows (its kernels, storage
    /// and networks). A refusal names the field. It reads the host's
    /// folders, which is why the agent asks it and not the sans-IO core.
    fn check_spec(&self, spec: &VmSpec) -> Result<(), MachineError>;

    /// The versioned machine type and CPU model `spec` runs as here, which
    /// two hosts must share for its guest to migrate (`tern check`
    /// compares them); `None` where the hypervisor has no such thing.
    fn platform(&self, _spec: &VmSpec) -> Option<Result<Platform, String>> {
        None
    }

    /// Where a guest's NIC is on this host: the bridge its network is and
    /// the tap its QEMU opens. A simulated guest has neither.
    fn place_nic(&self, _vm: &str, _nic: &mut NicPort) {}

    /// Every tap a guest named `vm` may have here (whether or not it
    /// exists), for a driver that undoes a NIC without knowing the spec.
    fn taps(&self, _vm: &str) -> Vec<String> {
        Vec::new()
    }

    /// Have a guest's NICs announce themselves (gratuitous ARP/RARP); a
    /// paused guest's leave when it resumes. Nothing for a simulated one.
    async fn announce(&self, _vm: &str) -> Result<(), HypervisorError> {
        Ok(())
    }

    /// What `tern doctor` checks of this hypervisor on this host: (name,
    /// verdict, what was found, the fix). It may block (it runs programs).
    fn doctor(&self) -> Vec<HostCheck> {
        vec![HostCheck::ok(
            "hypervisor",
            "simulated: guests live in the agent (the demo and tests)",
        )]
    }

    /// Whether this host can take part in post-copy (as a destination
    /// above all: QEMU needs userfaultfd there); `Err` says why not. A
    /// migration that may switch to post-copy then runs by pre-copy alone.
    fn postcopy_support(&self) -> Result<(), String> {
        Ok(())
    }

    /// Every guest on this host, incoming ones included.
    async fn guests(&self) -> Vec<Guest>;

    /// Destination, Prepare: create the guest paused, ready to receive
    /// (with `postcopy`, ready for a switchover to post-copy too). Returns
    /// the address the source transfers to.
    async fn start_incoming(
        &self,
        spec: &VmSpec,
        attempt_id: &str,
        postcopy: bool,
    ) -> Result<String, HypervisorError>;

    /// Source, Perform: transfer the guest to `address` on host
    /// `destination`, sending progress on `progress`. On success the guest
    /// is left paused here. After a switchover to post-copy it returns
    /// once the last page has gone; while post-copy is paused by a broken
    /// link it waits (its progress says so) for [`Self::resume_postcopy`].
    async fn transfer_out(
        &self,
        vm: &str,
        destination: &str,
        address: &str,
        plan: TransferPlan,
        progress: mpsc::Sender<TransferStats>,
    ) -> Result<TransferStats, HypervisorError>;

    /// Source: switch the transfer in progress to post-copy. Returns once
    /// the guest is stopped here and its device state has gone: from then
    /// the destination can run it, and this copy must never run again.
    /// `Failed`: it did not switch (the guest still runs here); `Unknown`:
    /// whether it did is unknown.
    async fn start_postcopy(&self, vm: &str) -> Result<(), HypervisorError>;

    /// Destination: wait until the incoming guest can run here: the source
    /// switched its transfer to post-copy (`true`), or the whole guest
    /// arrived by pre-copy (`false`: the source can still take it back,
    /// so the destination commits only on the source's word). An error: the
    /// transfer ended before either (cancelled, or the source went away),
    /// so the guest never ran anywhere but on the source.
    async fn await_switchover(&self, vm: &str) -> Result<bool, HypervisorError>;

    /// Destination, post-copy paused by a broken link: listen for the
    /// source again. Returns the fresh address to resume the transfer to.
    async fn recover_incoming(&self, vm: &str, attempt_id: &str)
    -> Result<String, HypervisorError>;

    /// Source, post-copy that makes no progress (a dead link TCP has not
    /// given up on yet): break the transfer off so that it can be
    /// recovered (QEMU's `migrate-pause`; progress then says paused).
    async fn pause_postcopy(&self, vm: &str) -> Result<(), HypervisorError> {
        Err(HypervisorError::Failed(format!(
            "the {} hypervisor cannot pause the post-copy of {vm}",
            self.kind()
        )))
    }

    /// Source, post-copy paused: resume the transfer to the destination's
    /// fresh `address`. Returns once the hypervisor took the request; the
    /// progress of `transfer_out` shows post-copy running again.
    async fn resume_postcopy(&self, vm: &str, address: &str) -> Result<(), HypervisorError>;

    /// Source, after an agent restart: follow the outgoing transfer of `vm`
    /// that its hypervisor still runs (or just finished) to its end, as
    /// `transfer_out` would have. An error: there is none, or it failed.
    async fn watch_transfer(
        &self,
        vm: &str,
        destination: &str,
        progress: mpsc::Sender<TransferStats>,
    ) -> Result<TransferStats, HypervisorError>;

    /// Stop a transfer in progress; `transfer_out` then returns `Cancelled`.
    /// The guest is left as it was (running, or paused if the transfer had
    /// completed). Idempotent.
    async fn cancel_transfer(&self, vm: &str) -> Result<(), HypervisorError>;

    /// Destination, Finish: wait until the incoming transfer described by
    /// `stats` has arrived. The guest stays paused. After a switchover to
    /// post-copy (the guest may run): wait until the last page has arrived;
    /// an error then means the guest cannot get the rest of its memory.
    async fn complete_incoming(
        &self,
        vm: &str,
        stats: &TransferStats,
    ) -> Result<(), HypervisorError>;

    async fn pause(&self, vm: &str) -> Result<(), HypervisorError>;
    /// Start the guest's CPUs. Idempotent on a running guest.
    async fn resume(&self, vm: &str) -> Result<(), HypervisorError>;
    /// Destroy the guest. Idempotent: killing an absent guest is not an error.
    async fn kill(&self, vm: &str) -> Result<(), HypervisorError>;

    async fn status(&self, vm: &str) -> Option<GuestState>;
}
