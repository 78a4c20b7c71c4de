//! The five-phase migration protocol as sans-IO state machines.
//!
//! [`source::SourceAttempt`] and [`destination::DestinationAttempt`] each take
//! inputs (a peer replied, a stage finished, a timer fired, the operator
//! aborted) and return actions (call the peer, run a stage, write the journal,
//! resume or kill a guest). Time is a parameter: milliseconds on the caller's
//! clock (agents pass unix time, the simulator its own). Nothing in here does
//! IO, reads a clock or knows about tokio, tonic or SQLite.
//!
//! | phase   | runs on     | module            |
//! |---------|-------------|-------------------|
//! | Begin   | source      | [`source`]        |
//! | Prepare | destination | [`destination`]   |
//! | Perform | source      | [`source`]        |
//! | Finish  | destination | [`destination`]   |
//! | Confirm | source      | [`source`]        |
//!
//! With post-copy ([`completion`]) the phases map so: Perform is pre-copy
//! until the completion policy says switch; Finish then starts while the
//! transfer still runs (C3 `SWITCHOVER_REQUESTED`: the destination runs its
//! finish stages and answers ready), goes on through the switchover (the
//! source journals `Switching`, QEMU switches, C3 `SWITCHED_OVER`) and ends
//! with the destination's commit (journaled before the guest's CPUs
//! start); Confirm waits for the last page to reach the destination before
//! it kills the source's copy (`Draining`), and a link broken meanwhile is
//! recovered (Peer RPC `Recover`).

pub mod address;
pub mod bounds;
pub mod completion;
pub mod convergence;
pub mod cookies;
pub mod destination;
pub mod machine;
pub mod mutations;
pub mod policy;
pub mod record;
pub mod recovery;
pub mod repair;
pub mod source;
#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

pub use machine::QemuMachine;

/// Milliseconds on the caller's clock.
pub type Millis = u64;

/// The protocol version this build speaks. A peer with another major version
/// is rejected in Prepare. 2: a QEMU guest's machine is typed (kernel by
/// name, disks by storage, NICs by network) and C1 carries no free QEMU
/// arguments; a version-1 destination would have read the kernel's name as
/// a path and dropped the disks.
pub const PROTOCOL_VERSION: u32 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Nothing a feature does can fail the migration.
    Fast,
    /// A required feature that fails on the destination fails the migration.
    Safe,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Fast => "fast",
            Mode::Safe => "safe",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Begin,
    Prepare,
    Perform,
    Finish,
    Confirm,
}

impl Phase {
    pub const ALL: [Phase; 5] = [
        Phase::Begin,
        Phase::Prepare,
        Phase::Perform,
        Phase::Finish,
        Phase::Confirm,
    ];
}

/// A feature stage. `Prepare`, `Finish` and `Rollback` run on the destination,
/// `Release` on the source after commit. `Verify` runs on the destination
/// after the guest resumed there, for drivers that can check their work
/// (a failed verification makes the outcome degraded, in either mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Prepare,
    Finish,
    Rollback,
    Release,
    Verify,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Prepare => "prepare",
            Stage::Finish => "finish",
            Stage::Rollback => "rollback",
            Stage::Release => "release",
            Stage::Verify => "verify",
        }
    }

    pub fn parse(s: &str) -> Option<Stage> {
        match s {
            "prepare" => Some(Stage::Prepare),
            "finish" => Some(Stage::Finish),
            "rollback" => Some(Stage::Rollback),
            "release" => Some(Stage::Release),
            "verify" => Some(Stage::Verify),
            _ => None,
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Status of a phase or a feature stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepStatus {
    #[default]
    Pending,
    Running,
    Ok,
    Failed,
    Skipped,
}

impl StepStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Pending => "pending",
            StepStatus::Running => "running",
            StepStatus::Ok => "ok",
            StepStatus::Failed => "failed",
            StepStatus::Skipped => "skipped",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Succeeded,
    /// The VM moved, but a non-blocking feature failed on the destination.
    Degraded,
    Failed,
    Aborted,
    /// The source cannot yet learn whether the destination committed.
    Unresolved,
    /// The destination died during post-copy: no host holds the whole guest.
    Lost,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Degraded => "degraded",
            Outcome::Failed => "failed",
            Outcome::Aborted => "aborted",
            Outcome::Unresolved => "unresolved",
            Outcome::Lost => "lost",
        }
    }
}

/// One feature of a VM spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureSpec {
    pub name: String,
    /// The driver that implements the stages; defaults to the name.
    #[serde(default)]
    pub driver: String,
    #[serde(default)]
    pub required: bool,
}

impl FeatureSpec {
    pub fn driver(&self) -> &str {
        if self.driver.is_empty() {
            &self.name
        } else {
            &self.driver
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub name: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    #[serde(default)]
    pub dirty_rate_mib_s: u64,
    #[serde(default)]
    pub features: Vec<FeatureSpec>,
    /// The machine the qemu backend runs this guest as: the same on every
    /// host, by names each host resolves in its own config, so it travels
    /// in C1 with the rest of the spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu: Option<QemuMachine>,
}

/// Transfer progress as the hypervisor reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TransferStats {
    pub bytes_total: u64,
    pub bytes_transferred: u64,
    pub bytes_remaining: u64,
    pub rate_bytes_s: u64,
    pub dirty_rate_bytes_s: u64,
    pub iteration: u32,
    pub expected_downtime_ms: u64,
    pub elapsed_ms: u64,
    /// Time before the first byte moved (QEMU's setup-time); 0 if unknown.
    #[serde(default)]
    pub setup_time_ms: u64,
    /// How long the guest was really paused, once the transfer completed; 0 if unknown.
    #[serde(default)]
    pub downtime_ms: u64,
    /// Pre-copy, post-copy, or post-copy paused by a broken link.
    #[serde(default)]
    pub stage: TransferStage,
    /// Post-copy: the pages the destination asked for because its guest
    /// touched them before they arrived.
    #[serde(default)]
    pub postcopy_requests: u64,
}

impl TransferStats {
    /// How much of the guest is no longer left to send, in percent (0 when
    /// nothing is known). Not sent over total: QEMU's total is the guest's
    /// RAM, and a busy guest's passes send several times that.
    pub fn percent_done(&self) -> u64 {
        let done = self.bytes_total.saturating_sub(self.bytes_remaining);
        (done.saturating_mul(100) / self.bytes_total.max(1)).min(100)
    }
}

/// Where a transfer is. Pre-copy copies memory while the guest runs on the
/// source; after the switchover (post-copy) the guest runs on the
/// destination and pulls the pages still on the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferStage {
    #[default]
    Precopy,
    Postcopy,
    /// The link broke after the switchover: both sides wait, the guest
    /// stopped, until the transfer is recovered.
    PostcopyPaused,
}

impl TransferStage {
    pub fn as_str(self) -> &'static str {
        match self {
            TransferStage::Precopy => "pre-copy",
            TransferStage::Postcopy => "post-copy",
            TransferStage::PostcopyPaused => "post-copy paused",
        }
    }

    pub fn is_postcopy(self) -> bool {
        self != TransferStage::Precopy
    }
}

/// How the operator forced an unresolved attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunOn {
    Source,
    Destination,
    /// Declared lost: a post-copy whose destination is gone for good (the
    /// guest ran there since the switchover, so the source's copy is stale).
    Nowhere,
}

/// Timers of one attempt, from the agent config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timing {
    pub heartbeat_interval_ms: Millis,
    pub peer_timeout_ms: Millis,
    /// First wait between two Resolve calls; doubles up to `resolve_backoff_max_ms`.
    pub resolve_backoff_ms: Millis,
    pub resolve_backoff_max_ms: Millis,
    /// A transfer with no progress for this long is aborted.
    pub stall_timeout_ms: Millis,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            heartbeat_interval_ms: 1000,
            peer_timeout_ms: 5000,
            resolve_backoff_ms: 500,
            resolve_backoff_max_ms: 10_000,
            stall_timeout_ms: 10_000,
        }
    }
}

/// A peer call that did not produce a reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerError {
    /// The peer answered and said no: the request definitely had no effect
    /// beyond what the peer reports.
    Refused(String),
    /// The peer answered and said "not now": it is at its limit, or still
    /// undoing an earlier attempt of the VM. Trying again later may work.
    Busy(String),
    /// The peer answered that it has not the memory or vCPUs the guest
    /// needs: a refusal, for good on this host until something leaves it.
    Full(String),
    /// No answer (unreachable, timed out, cut): the outcome is unknown.
    Unreachable(String),
}

impl PeerError {
    pub fn message(&self) -> &str {
        match self {
            PeerError::Refused(m)
            | PeerError::Busy(m)
            | PeerError::Full(m)
            | PeerError::Unreachable(m) => m,
        }
    }
}

/// Why a hypervisor call on a guest (start, resume, kill, cancel) did not
/// succeed. The difference matters at the commit point: a call that failed
/// did nothing, one that did not answer may still take effect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestOpError {
    /// The hypervisor answered with an error: the call had no effect.
    Failed(String),
    /// No answer within its deadline: the effect is unknown.
    Unknown(String),
    /// The hypervisor has no such guest (it died, or was never there).
    Gone(String),
}

impl GuestOpError {
    pub fn message(&self) -> &str {
        match self {
            GuestOpError::Failed(m) | GuestOpError::Unknown(m) | GuestOpError::Gone(m) => m,
        }
    }
}

impl std::fmt::Display for GuestOpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

/// Work an ended attempt left on a host: a stage to undo, or the guest
/// itself to resume or kill. It stays listed (journaled, in status and the
/// console) and is retried until it succeeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PendingWork {
    /// A rollback (destination) or release (source) of feature `feature`.
    Stage { feature: usize, stage: Stage },
    /// The guest is paused here and must run again.
    Resume,
    /// A copy of the guest that must not run is still here.
    Kill,
    /// The destination has not heard that the operator forced the guest
    /// to run on the source: it must, and say whether it had committed.
    Notify,
}

/// What the hypervisor says of a guest when asked after a call on it did
/// not give a clear answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestProbe {
    /// Its CPUs run.
    Running,
    /// It is there, its CPUs stopped.
    Stopped,
    /// There is no such guest on the host.
    Gone,
    /// The hypervisor did not say.
    Unknown(String),
}

/// The result of a hypervisor call on a guest.
pub type GuestOpResult = Result<(), GuestOpError>;

/// For a kill: a guest that is gone is killed.
pub trait KillResult {
    fn filter_gone(self) -> GuestOpResult;
}

impl KillResult for GuestOpResult {
    fn filter_gone(self) -> GuestOpResult {
        match self {
            Err(GuestOpError::Gone(_)) => Ok(()),
            other => other,
        }
    }
}

/// The kind of reason an attempt ended the way it did, for clients that act
/// on it (an evacuation retries a busy destination on the same host without
/// counting the attempt) and for the console's pulse line. Texts are for
/// people, this is for code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// The destination was at its limit or still undoing an earlier attempt:
    /// trying again later may work.
    DestinationBusy,
    /// The source agent's restart cut the attempt short.
    Interrupted,
    /// The destination refused Prepare for good.
    Refused,
    /// The other agent stopped answering.
    PeerLost,
    /// A blocking feature stage failed.
    Feature,
    /// The transfer failed.
    Transfer,
    /// An operator aborted or forced it.
    Operator,
    /// The hypervisor could not start, resume or kill the guest (after the
    /// commit point: the guest may be paused or gone).
    #[serde(alias = "guest")]
    Hypervisor,
    /// The transfer made no progress, or could not converge within its
    /// budget.
    Stall,
    /// The destination has not the memory or vCPUs the guest needs.
    Capacity,
    /// The source agent was told to stop (SIGINT, SIGTERM, SIGHUP).
    Signal,
}

impl Cause {
    pub const ALL: [Cause; 11] = [
        Cause::Feature,
        Cause::Transfer,
        Cause::Stall,
        Cause::PeerLost,
        Cause::Capacity,
        Cause::DestinationBusy,
        Cause::Refused,
        Cause::Operator,
        Cause::Signal,
        Cause::Interrupted,
        Cause::Hypervisor,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Cause::DestinationBusy => "destination_busy",
            Cause::Interrupted => "interrupted",
            Cause::Refused => "refused",
            Cause::PeerLost => "peer_lost",
            Cause::Feature => "feature",
            Cause::Transfer => "transfer",
            Cause::Operator => "operator",
            Cause::Hypervisor => "hypervisor",
            Cause::Stall => "stall",
            Cause::Capacity => "capacity",
            Cause::Signal => "signal",
        }
    }

    pub fn parse(s: &str) -> Option<Cause> {
        Cause::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// A short word for people: the console's row and pulse line.
    pub fn label(self) -> &'static str {
        match self {
            Cause::DestinationBusy => "busy",
            Cause::Interrupted => "restart",
            Cause::Refused => "refused",
            Cause::PeerLost => "peer lost",
            Cause::Feature => "feature",
            Cause::Transfer => "transfer",
            Cause::Operator => "operator",
            Cause::Hypervisor => "hypervisor",
            Cause::Stall => "stall",
            Cause::Capacity => "capacity",
            Cause::Signal => "signal",
        }
    }
}

/// Which of an attempt's two hosts something happened on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Source,
    Destination,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Source => "source",
            Side::Destination => "destination",
        }
    }
}

/// Why an attempt failed, aborted, was lost or ended degraded: its kind, the
/// host it happened on, the feature and stage where there is one, and the
/// text an operator reads. An older journal holds only the kind (a string);
/// it still loads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailureCause {
    pub kind: Cause,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub side: Option<Side>,
    /// The host `side` names.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub host: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feature: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<Stage>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub text: String,
}

impl FailureCause {
    pub fn new(kind: Cause, side: Side, host: &str) -> FailureCause {
        FailureCause {
            kind,
            side: Some(side),
            host: host.to_string(),
            feature: None,
            stage: None,
            text: String::new(),
        }
    }

    /// Only the kind: what an older journal or a client knows.
    pub fn kind_only(kind: Cause) -> FailureCause {
        FailureCause {
            kind,
            side: None,
            host: String::new(),
            feature: None,
            stage: None,
            text: String::new(),
        }
    }

    /// `feature on hv-b (destination): port-profile ✗ finish`: the kind,
    /// where, and the feature and stage where there is one.
    pub fn summary(&self) -> String {
        let mut text = self.kind.label().to_string();
        if !self.host.is_empty() {
            text.push_str(" on ");
            text.push_str(&self.host);
        }
        if let Some(side) = self.side {
            text.push_str(&format!(" ({})", side.as_str()));
        }
        if let Some(feature) = &self.feature {
            text.push_str(&format!(": {feature}"));
            if let Some(stage) = self.stage {
                text.push_str(&format!(" ✗ {stage}"));
            }
        }
        text
    }

    /// `feature·hv-b port-profile ✗ finish`: the headline and, where there
    /// is one, the feature and stage.
    pub fn brief(&self) -> String {
        match (&self.feature, self.stage) {
            (Some(feature), Some(stage)) => format!("{} {feature} ✗ {stage}", self.headline()),
            (Some(feature), None) => format!("{} {feature}", self.headline()),
            _ => self.headline(),
        }
    }

    /// `feature·hv-b`: the kind and where, for the console's row.
    pub fn headline(&self) -> String {
        if self.host.is_empty() {
            self.kind.label().to_string()
        } else {
            format!("{}·{}", self.kind.label(), self.host)
        }
    }
}

impl<'de> Deserialize<'de> for FailureCause {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Full {
            kind: Cause,
            #[serde(default)]
            side: Option<Side>,
            #[serde(default)]
            host: String,
            #[serde(default)]
            feature: Option<String>,
            #[serde(default)]
            stage: Option<Stage>,
            #[serde(default)]
            text: String,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Kind(Cause),
            Full(Full),
        }
        Ok(match Either::deserialize(d)? {
            Either::Kind(kind) => FailureCause::kind_only(kind),
            Either::Full(f) => FailureCause {
                kind: f.kind,
                side: f.side,
                host: f.host,
                feature: f.feature,
                stage: f.stage,
                text: f.text,
            },
        })
    }
}

/// What the guest is doing on the host a record's `running_on` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestCondition {
    #[default]
    Running,
    /// A resume failed: the guest is paused there (a retry is pending).
    Paused,
    /// No host can say it runs the guest (its destination lost it).
    Unknown,
}

impl GuestCondition {
    pub fn as_str(self) -> &'static str {
        match self {
            GuestCondition::Running => "running",
            GuestCondition::Paused => "paused",
            GuestCondition::Unknown => "unknown",
        }
    }

    pub fn is_running(&self) -> bool {
        *self == GuestCondition::Running
    }
}

/// The outcome of one feature stage as the driver reports it: a detail an
/// operator can read either way.
pub type StageOutcome = Result<String, String>;
