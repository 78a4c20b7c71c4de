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

use crate::protocol::machine::MachineError;
use crate::protocol::{TransferStats, VmSpec};

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

/// Capacity of the host, for Prepare's check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostCapacity {
    pub memory_mib: u64,
    pub vcpus: u32,
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

    /// Every guest on this host, incoming ones included.
    async fn guests(&self) -> Vec<Guest>;

    /// Destination, Prepare: create the guest paused, ready to receive.
    /// Returns the address the source transfers to.
    async fn start_incoming(
        &self,
        spec: &VmSpec,
        attempt_id: &str,
    ) -> Result<String, HypervisorError>;

    /// Source, Perform: transfer the guest to `address` on host
    /// `destination`, sending progress on `progress`. On success the guest
    /// is left paused here.
    async fn transfer_out(
        &self,
        vm: &str,
        destination: &str,
        address: &str,
        progress: mpsc::Sender<TransferStats>,
    ) -> Result<TransferStats, HypervisorError>;

    /// Stop a transfer in progress; `transfer_out` then returns `Cancelled`.
    /// The guest is left as it was (running, or paused if the transfer had
    /// completed). Idempotent.
    async fn cancel_transfer(&self, vm: &str) -> Result<(), HypervisorError>;

    /// Destination, Finish: wait until the incoming transfer described by
    /// `stats` has arrived. The guest stays paused.
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
