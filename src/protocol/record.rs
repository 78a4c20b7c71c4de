//! The migration record: what an operator sees of one migration (its latest
//! attempt), in the JSON schema of `tern migrate --json` and `tern status
//! --json`, and its protobuf twin for the Console service.

use serde::{Deserialize, Serialize};

use super::completion::{Completion, CompletionRequest, Postcopy, WhenSpent};
use super::convergence::{ConvergenceView, Verdict};
use super::repair::{RepairEntry, RepairResult};
use super::{
    Cause, FailureCause, GuestCondition, Millis, Mode, Outcome, Phase, Side, Stage, StepStatus,
    TransferStats,
};
use crate::proto;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseRecord {
    pub phase: Phase,
    pub status: StepStatus,
    pub duration_ms: u64,
    /// When the phase started running, on the source's clock; not shown.
    #[serde(skip)]
    pub started_at: Option<Millis>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureRecord {
    pub name: String,
    pub required: bool,
    pub prepare: StepStatus,
    pub finish: StepStatus,
    pub rollback: StepStatus,
    pub release: StepStatus,
    /// The driver's check after the guest resumed on the destination;
    /// skipped for drivers that have none.
    #[serde(default = "skipped")]
    pub verify: StepStatus,
    /// The first failure's detail, for an operator.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A stage of it did not answer within its deadline: whether it took
    /// effect is unknown, so a rollback undoes it too (stages are idempotent).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub uncertain: bool,
}

impl FeatureRecord {
    pub fn new(name: &str, required: bool) -> Self {
        FeatureRecord {
            name: name.to_string(),
            required,
            prepare: StepStatus::Pending,
            finish: StepStatus::Pending,
            rollback: StepStatus::Pending,
            release: StepStatus::Pending,
            verify: StepStatus::Pending,
            error: None,
            uncertain: false,
        }
    }

    pub fn stage(&self, stage: Stage) -> StepStatus {
        match stage {
            Stage::Prepare => self.prepare,
            Stage::Finish => self.finish,
            Stage::Rollback => self.rollback,
            Stage::Release => self.release,
            Stage::Verify => self.verify,
        }
    }

    pub fn set_stage(&mut self, stage: Stage, status: StepStatus) {
        let slot = match stage {
            Stage::Prepare => &mut self.prepare,
            Stage::Finish => &mut self.finish,
            Stage::Rollback => &mut self.rollback,
            Stage::Release => &mut self.release,
            Stage::Verify => &mut self.verify,
        };
        *slot = status;
    }

    /// The attempt ended: stages that never ran are skipped. A rollback
    /// stays pending where `rollback_awaited` (the destination has yet to
    /// report it).
    pub fn skip_unrun(&mut self, rollback_awaited: bool) {
        for stage in [Stage::Prepare, Stage::Finish, Stage::Release, Stage::Verify] {
            if matches!(self.stage(stage), StepStatus::Pending | StepStatus::Running) {
                self.set_stage(stage, StepStatus::Skipped);
            }
        }
        if self.rollback == StepStatus::Pending && !rollback_awaited {
            self.rollback = StepStatus::Skipped;
        }
    }

    /// Record a stage's result; the first failure's detail becomes `error`.
    pub fn record(&mut self, stage: Stage, result: &Result<String, String>) {
        match result {
            Ok(_) => self.set_stage(stage, StepStatus::Ok),
            Err(detail) => {
                self.set_stage(stage, StepStatus::Failed);
                if self.error.is_none() {
                    self.error = Some(format!("{stage}: {detail}"));
                }
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationRecord {
    pub id: String,
    pub vm: String,
    pub source: String,
    pub destination: String,
    pub mode: Mode,
    pub attempt: u32,
    pub attempt_id: String,
    /// `null` while the attempt runs.
    pub outcome: Option<Outcome>,
    pub running_on: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The destination passed the commit point: abort is no longer possible.
    pub committed: bool,
    pub phases: Vec<PhaseRecord>,
    pub features: Vec<FeatureRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transfer: Option<TransferStats>,
    pub started_at_ms: Millis,
    pub updated_at_ms: Millis,
    /// The cookies this attempt exchanged so far, C1 first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cookies: Vec<CookieRecord>,
    /// Why it failed, aborted, was lost or ended degraded: the kind and the
    /// host the agent knew when it ended it; [`MigrationRecord::failure`]
    /// adds the feature, stage and text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<FailureCause>,
    /// The guest on `running_on`: running, or paused after a resume failed.
    #[serde(
        default,
        rename = "guest_state",
        skip_serializing_if = "GuestCondition::is_running"
    )]
    pub guest: GuestCondition,
    /// The completion policy this attempt runs under.
    #[serde(default)]
    pub completion: Completion,
    /// Will pre-copy finish, and when: from the transfer's progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub convergence: Option<ConvergenceView>,
    /// What the completion policy did: "switched to post-copy after 12.3 s:
    /// …", or that the budget is spent and the transfer goes on as asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_note: Option<String>,
    /// Post-copy paused by a broken link: the agents recovering it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery: Option<RecoveryView>,
    /// Operators' repairs of a degraded VM's features, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repairs: Vec<RepairEntry>,
}

/// Post-copy paused by a broken link, as an operator sees the recovery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryView {
    /// Recoveries tried so far.
    pub tries: u32,
    /// Why the last one failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When the next try is due (the source's clock).
    pub next_at_ms: Millis,
}

/// One cookie of an attempt, decoded for an operator
/// ([`super::cookies::describe`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CookieRecord {
    /// "C1" .. "C4".
    pub name: String,
    pub version: u32,
    /// Its size on the wire.
    pub bytes: u64,
    /// What it says, in one line.
    pub summary: String,
}

impl From<&CookieRecord> for proto::CookieRecord {
    fn from(c: &CookieRecord) -> Self {
        proto::CookieRecord {
            name: c.name.clone(),
            version: c.version,
            bytes: c.bytes,
            summary: c.summary.clone(),
        }
    }
}

impl MigrationRecord {
    pub fn phase(&self, phase: Phase) -> &PhaseRecord {
        &self.phases[phase as usize]
    }

    pub fn phase_mut(&mut self, phase: Phase) -> &mut PhaseRecord {
        &mut self.phases[phase as usize]
    }

    /// Record why it ends: the kind and the side it happened on (the
    /// feature, stage and text are added by [`MigrationRecord::failure`]).
    pub fn blame(&mut self, kind: Cause, side: Side) {
        let host = match side {
            Side::Source => &self.source,
            Side::Destination => &self.destination,
        };
        self.cause = Some(FailureCause::new(kind, side, host));
    }

    /// The first feature stage that failed: the feature and the stage.
    pub fn first_failed_stage(&self) -> Option<(&FeatureRecord, Stage)> {
        self.features.iter().find_map(|f| {
            [
                Stage::Prepare,
                Stage::Finish,
                Stage::Verify,
                Stage::Rollback,
                Stage::Release,
            ]
            .into_iter()
            .find(|&stage| f.stage(stage) == StepStatus::Failed)
            .map(|stage| (f, stage))
        })
    }

    /// Why it failed, aborted, was lost or ended degraded, whole: the kind
    /// and host the agent recorded, the feature and stage that failed (on a
    /// feature failure or a degraded end), and the text an operator reads.
    /// `None` while it runs and after it succeeded.
    pub fn failure(&self) -> Option<FailureCause> {
        let outcome = self.outcome?;
        if outcome == Outcome::Succeeded {
            return None;
        }
        let failed = self.first_failed_stage();
        let mut cause = match (&self.cause, failed) {
            (Some(cause), _) => cause.clone(),
            (None, Some(_)) => FailureCause::kind_only(Cause::Feature),
            (None, None) => return None,
        };
        if let Some((feature, stage)) = failed
            && (cause.kind == Cause::Feature || outcome == Outcome::Degraded)
            && cause.feature.is_none()
        {
            // Features run on the destination; only release (after the
            // commit) runs on the source.
            let side = if stage == Stage::Release {
                Side::Source
            } else {
                Side::Destination
            };
            if cause.kind == Cause::Feature {
                cause.side = Some(side);
                cause.host = match side {
                    Side::Source => self.source.clone(),
                    Side::Destination => self.destination.clone(),
                };
            }
            cause.feature = Some(feature.name.clone());
            cause.stage = Some(stage);
            if cause.text.is_empty() && outcome == Outcome::Degraded {
                cause.text = feature.error.clone().unwrap_or_default();
            }
        }
        if cause.text.is_empty() {
            cause.text = self.error.clone().unwrap_or_default();
        }
        Some(cause)
    }

    /// The phase that is running, or the last one that ran.
    pub fn current_phase(&self) -> Phase {
        self.phases
            .iter()
            .rev()
            .find(|p| p.status != StepStatus::Pending && p.status != StepStatus::Skipped)
            .map(|p| p.phase)
            .unwrap_or(Phase::Begin)
    }

    pub fn feature_mut(&mut self, name: &str) -> Option<&mut FeatureRecord> {
        self.features.iter_mut().find(|f| f.name == name)
    }

    /// Mark `phase` running at `now`.
    pub fn start_phase(&mut self, phase: Phase, now: Millis) {
        let p = self.phase_mut(phase);
        p.status = StepStatus::Running;
        p.started_at = Some(now);
        self.updated_at_ms = now;
    }

    /// End `phase` with `status` at `now`, recording its duration.
    pub fn end_phase(&mut self, phase: Phase, status: StepStatus, now: Millis) {
        let p = self.phase_mut(phase);
        p.duration_ms = p.started_at.map(|s| now.saturating_sub(s)).unwrap_or(0);
        p.status = status;
        self.updated_at_ms = now;
    }

    /// End the running phase as failed and mark every later pending one skipped.
    pub fn fail_from(&mut self, phase: Phase, now: Millis) {
        self.end_phase(phase, StepStatus::Failed, now);
        for p in self.phases.iter_mut().filter(|p| p.phase > phase) {
            if p.status == StepStatus::Pending || p.status == StepStatus::Running {
                p.status = StepStatus::Skipped;
            }
        }
    }

    /// The running phase, if any.
    pub fn running_phase(&self) -> Option<Phase> {
        self.phases
            .iter()
            .find(|p| p.status == StepStatus::Running)
            .map(|p| p.phase)
    }

    /// A feature failed its prepare or finish stage: what makes a moved VM
    /// degraded (with an error the agent recorded).
    pub fn has_failed_feature_stage(&self) -> bool {
        self.features.iter().any(|f| {
            f.prepare == StepStatus::Failed
                || f.finish == StepStatus::Failed
                || f.verify == StepStatus::Failed
        })
    }

    pub fn is_finished(&self) -> bool {
        matches!(self.outcome, Some(o) if o != Outcome::Unresolved)
    }
}

/// A stage that records from before it existed did not run.
fn skipped() -> StepStatus {
    StepStatus::Skipped
}

// ---- protobuf conversions -------------------------------------------------

pub fn mode_to_proto(mode: Mode) -> proto::Mode {
    match mode {
        Mode::Fast => proto::Mode::Fast,
        Mode::Safe => proto::Mode::Safe,
    }
}

pub fn mode_from_proto(mode: i32) -> Option<Mode> {
    match proto::Mode::try_from(mode).ok()? {
        proto::Mode::Fast => Some(Mode::Fast),
        proto::Mode::Safe => Some(Mode::Safe),
        proto::Mode::Unspecified => None,
    }
}

pub fn status_to_proto(s: StepStatus) -> proto::StepStatus {
    match s {
        StepStatus::Pending => proto::StepStatus::Pending,
        StepStatus::Running => proto::StepStatus::Running,
        StepStatus::Ok => proto::StepStatus::Ok,
        StepStatus::Failed => proto::StepStatus::Failed,
        StepStatus::Skipped => proto::StepStatus::Skipped,
    }
}

pub fn status_from_proto(s: i32) -> StepStatus {
    match proto::StepStatus::try_from(s).unwrap_or(proto::StepStatus::Pending) {
        proto::StepStatus::Pending => StepStatus::Pending,
        proto::StepStatus::Running => StepStatus::Running,
        proto::StepStatus::Ok => StepStatus::Ok,
        proto::StepStatus::Failed => StepStatus::Failed,
        proto::StepStatus::Skipped => StepStatus::Skipped,
    }
}

pub fn outcome_to_proto(o: Option<Outcome>) -> proto::Outcome {
    match o {
        None => proto::Outcome::None,
        Some(Outcome::Succeeded) => proto::Outcome::Succeeded,
        Some(Outcome::Degraded) => proto::Outcome::Degraded,
        Some(Outcome::Failed) => proto::Outcome::Failed,
        Some(Outcome::Aborted) => proto::Outcome::Aborted,
        Some(Outcome::Unresolved) => proto::Outcome::Unresolved,
        Some(Outcome::Lost) => proto::Outcome::Lost,
    }
}

pub fn outcome_from_proto(o: i32) -> Option<Outcome> {
    match proto::Outcome::try_from(o).unwrap_or(proto::Outcome::None) {
        proto::Outcome::None => None,
        proto::Outcome::Succeeded => Some(Outcome::Succeeded),
        proto::Outcome::Degraded => Some(Outcome::Degraded),
        proto::Outcome::Failed => Some(Outcome::Failed),
        proto::Outcome::Aborted => Some(Outcome::Aborted),
        proto::Outcome::Unresolved => Some(Outcome::Unresolved),
        proto::Outcome::Lost => Some(Outcome::Lost),
    }
}

pub fn cause_to_proto(c: Option<Cause>) -> proto::Cause {
    match c {
        None => proto::Cause::None,
        Some(Cause::DestinationBusy) => proto::Cause::DestinationBusy,
        Some(Cause::Interrupted) => proto::Cause::Interrupted,
        Some(Cause::Refused) => proto::Cause::Refused,
        Some(Cause::PeerLost) => proto::Cause::PeerLost,
        Some(Cause::Feature) => proto::Cause::Feature,
        Some(Cause::Transfer) => proto::Cause::Transfer,
        Some(Cause::Operator) => proto::Cause::Operator,
        Some(Cause::Hypervisor) => proto::Cause::Hypervisor,
        Some(Cause::Stall) => proto::Cause::Stall,
        Some(Cause::Capacity) => proto::Cause::Capacity,
        Some(Cause::Signal) => proto::Cause::Signal,
    }
}

pub fn cause_from_proto(c: i32) -> Option<Cause> {
    match proto::Cause::try_from(c).unwrap_or(proto::Cause::None) {
        proto::Cause::None => None,
        proto::Cause::DestinationBusy => Some(Cause::DestinationBusy),
        proto::Cause::Interrupted => Some(Cause::Interrupted),
        proto::Cause::Refused => Some(Cause::Refused),
        proto::Cause::PeerLost => Some(Cause::PeerLost),
        proto::Cause::Feature => Some(Cause::Feature),
        proto::Cause::Transfer => Some(Cause::Transfer),
        proto::Cause::Operator => Some(Cause::Operator),
        proto::Cause::Hypervisor => Some(Cause::Hypervisor),
        proto::Cause::Stall => Some(Cause::Stall),
        proto::Cause::Capacity => Some(Cause::Capacity),
        proto::Cause::Signal => Some(Cause::Signal),
    }
}

pub fn failure_to_proto(c: &FailureCause) -> proto::FailureCause {
    proto::FailureCause {
        kind: cause_to_proto(Some(c.kind)) as i32,
        side: match c.side {
            None => proto::Side::Unspecified,
            Some(Side::Source) => proto::Side::Source,
            Some(Side::Destination) => proto::Side::Destination,
        } as i32,
        host: c.host.clone(),
        feature: c.feature.clone().unwrap_or_default(),
        stage: c.stage.map(|s| s.as_str().to_string()).unwrap_or_default(),
        text: c.text.clone(),
    }
}

/// A failure as an agent sent it; `None` for one without a kind.
pub fn failure_from_proto(c: &proto::FailureCause) -> Option<FailureCause> {
    Some(FailureCause {
        kind: cause_from_proto(c.kind)?,
        side: match proto::Side::try_from(c.side).unwrap_or(proto::Side::Unspecified) {
            proto::Side::Unspecified => None,
            proto::Side::Source => Some(Side::Source),
            proto::Side::Destination => Some(Side::Destination),
        },
        host: c.host.clone(),
        feature: (!c.feature.is_empty()).then(|| c.feature.clone()),
        stage: Stage::parse(&c.stage),
        text: c.text.clone(),
    })
}

pub fn guest_to_proto(g: GuestCondition) -> proto::GuestCondition {
    match g {
        GuestCondition::Running => proto::GuestCondition::Running,
        GuestCondition::Paused => proto::GuestCondition::Paused,
        GuestCondition::Unknown => proto::GuestCondition::Unknown,
    }
}

pub fn guest_from_proto(g: i32) -> GuestCondition {
    match proto::GuestCondition::try_from(g).unwrap_or(proto::GuestCondition::Running) {
        proto::GuestCondition::Running => GuestCondition::Running,
        proto::GuestCondition::Paused => GuestCondition::Paused,
        proto::GuestCondition::Unknown => GuestCondition::Unknown,
    }
}

pub fn phase_from_proto(p: i32) -> Phase {
    match proto::Phase::try_from(p).unwrap_or(proto::Phase::Begin) {
        proto::Phase::Begin => Phase::Begin,
        proto::Phase::Prepare => Phase::Prepare,
        proto::Phase::Perform => Phase::Perform,
        proto::Phase::Finish => Phase::Finish,
        proto::Phase::Confirm => Phase::Confirm,
    }
}

pub fn stats_to_proto(s: &TransferStats) -> proto::TransferStats {
    proto::TransferStats {
        bytes_total: s.bytes_total,
        bytes_transferred: s.bytes_transferred,
        bytes_remaining: s.bytes_remaining,
        rate_bytes_s: s.rate_bytes_s,
        dirty_rate_bytes_s: s.dirty_rate_bytes_s,
        iteration: s.iteration,
        expected_downtime_ms: s.expected_downtime_ms,
        elapsed_ms: s.elapsed_ms,
        setup_time_ms: s.setup_time_ms,
        downtime_ms: s.downtime_ms,
        stage: match s.stage {
            super::TransferStage::Precopy => proto::TransferStage::Precopy,
            super::TransferStage::Postcopy => proto::TransferStage::Postcopy,
            super::TransferStage::PostcopyPaused => proto::TransferStage::PostcopyPaused,
        } as i32,
        postcopy_requests: s.postcopy_requests,
    }
}

pub fn stats_from_proto(s: &proto::TransferStats) -> TransferStats {
    TransferStats {
        bytes_total: s.bytes_total,
        bytes_transferred: s.bytes_transferred,
        bytes_remaining: s.bytes_remaining,
        rate_bytes_s: s.rate_bytes_s,
        dirty_rate_bytes_s: s.dirty_rate_bytes_s,
        iteration: s.iteration,
        expected_downtime_ms: s.expected_downtime_ms,
        elapsed_ms: s.elapsed_ms,
        setup_time_ms: s.setup_time_ms,
        downtime_ms: s.downtime_ms,
        stage: match proto::TransferStage::try_from(s.stage) {
            Ok(proto::TransferStage::Postcopy) => super::TransferStage::Postcopy,
            Ok(proto::TransferStage::PostcopyPaused) => super::TransferStage::PostcopyPaused,
            _ => super::TransferStage::Precopy,
        },
        postcopy_requests: s.postcopy_requests,
    }
}

impl From<&MigrationRecord> for proto::MigrationRecord {
    fn from(r: &MigrationRecord) -> Self {
        proto::MigrationRecord {
            id: r.id.clone(),
            vm: r.vm.clone(),
            source: r.source.clone(),
            destination: r.destination.clone(),
            mode: mode_to_proto(r.mode) as i32,
            attempt: r.attempt,
            outcome: outcome_to_proto(r.outcome) as i32,
            running_on: r.running_on.clone(),
            error: r.error.clone().unwrap_or_default(),
            phases: r
                .phases
                .iter()
                .map(|p| proto::PhaseRecord {
                    phase: p.phase as i32,
                    status: status_to_proto(p.status) as i32,
                    duration_ms: p.duration_ms,
                })
                .collect(),
            features: r
                .features
                .iter()
                .map(|f| proto::FeatureRecord {
                    name: f.name.clone(),
                    required: f.required,
                    prepare: status_to_proto(f.prepare) as i32,
                    finish: status_to_proto(f.finish) as i32,
                    rollback: status_to_proto(f.rollback) as i32,
                    release: status_to_proto(f.release) as i32,
                    verify: status_to_proto(f.verify) as i32,
                    error: f.error.clone().unwrap_or_default(),
                    detail: String::new(),
                })
                .collect(),
            transfer: r.transfer.as_ref().map(stats_to_proto),
            attempt_id: r.attempt_id.clone(),
            started_at_ms: r.started_at_ms,
            updated_at_ms: r.updated_at_ms,
            committed: r.committed,
            cookies: r.cookies.iter().map(proto::CookieRecord::from).collect(),
            cause: cause_to_proto(r.cause.as_ref().map(|c| c.kind)) as i32,
            failure: r.failure().as_ref().map(failure_to_proto),
            guest: guest_to_proto(r.guest) as i32,
            completion: Some(completion_to_proto(&r.completion)),
            convergence: r.convergence.as_ref().map(convergence_to_proto),
            completion_note: r.completion_note.clone().unwrap_or_default(),
            recovery: r.recovery.as_ref().map(|v| proto::PostcopyRecovery {
                tries: v.tries,
                error: v.error.clone().unwrap_or_default(),
                next_at_ms: v.next_at_ms,
            }),
            repairs: r.repairs.iter().map(repair_to_proto).collect(),
        }
    }
}

pub fn repair_to_proto(r: &RepairEntry) -> proto::RepairRecord {
    proto::RepairRecord {
        at_ms: r.at_ms,
        feature: r.feature.clone(),
        stages: r.stages.iter().map(|s| s.as_str().to_string()).collect(),
        host: r.host.clone(),
        result: r.result.as_str().to_string(),
        error: r.error.clone().unwrap_or_default(),
        who: r.who.clone(),
    }
}

pub fn repair_from_proto(r: &proto::RepairRecord) -> RepairEntry {
    RepairEntry {
        at_ms: r.at_ms,
        feature: r.feature.clone(),
        stages: r.stages.iter().filter_map(|s| Stage::parse(s)).collect(),
        host: r.host.clone(),
        result: RepairResult::parse(&r.result),
        error: (!r.error.is_empty()).then(|| r.error.clone()),
        who: r.who.clone(),
    }
}

impl From<&proto::MigrationRecord> for MigrationRecord {
    fn from(r: &proto::MigrationRecord) -> Self {
        let mut phases: Vec<PhaseRecord> = Phase::ALL
            .iter()
            .map(|&phase| PhaseRecord {
                phase,
                status: StepStatus::Pending,
                duration_ms: 0,
                started_at: None,
            })
            .collect();
        for p in &r.phases {
            let phase = phase_from_proto(p.phase);
            phases[phase as usize].status = status_from_proto(p.status);
            phases[phase as usize].duration_ms = p.duration_ms;
        }
        let mut record = MigrationRecord {
            id: r.id.clone(),
            vm: r.vm.clone(),
            source: r.source.clone(),
            destination: r.destination.clone(),
            mode: mode_from_proto(r.mode).unwrap_or(Mode::Safe),
            attempt: r.attempt,
            attempt_id: r.attempt_id.clone(),
            outcome: outcome_from_proto(r.outcome),
            running_on: r.running_on.clone(),
            error: (!r.error.is_empty()).then(|| r.error.clone()),
            committed: r.committed,
            phases,
            features: r
                .features
                .iter()
                .map(|f| FeatureRecord {
                    name: f.name.clone(),
                    required: f.required,
                    prepare: status_from_proto(f.prepare),
                    finish: status_from_proto(f.finish),
                    rollback: status_from_proto(f.rollback),
                    release: status_from_proto(f.release),
                    verify: status_from_proto(f.verify),
                    error: (!f.error.is_empty()).then(|| f.error.clone()),
                    uncertain: false,
                })
                .collect(),
            transfer: r.transfer.as_ref().map(stats_from_proto),
            started_at_ms: r.started_at_ms,
            updated_at_ms: r.updated_at_ms,
            cookies: r
                .cookies
                .iter()
                .map(|c| CookieRecord {
                    name: c.name.clone(),
                    version: c.version,
                    bytes: c.bytes,
                    summary: c.summary.clone(),
                })
                .collect(),
            cause: r
                .failure
                .as_ref()
                .and_then(failure_from_proto)
                .or_else(|| cause_from_proto(r.cause).map(FailureCause::kind_only)),
            guest: guest_from_proto(r.guest),
            completion: completion_from_record(r.completion.as_ref()),
            convergence: r.convergence.as_ref().and_then(convergence_from_proto),
            completion_note: (!r.completion_note.is_empty()).then(|| r.completion_note.clone()),
            recovery: r.recovery.as_ref().map(|v| RecoveryView {
                tries: v.tries,
                error: (!v.error.is_empty()).then(|| v.error.clone()),
                next_at_ms: v.next_at_ms,
            }),
            repairs: r.repairs.iter().map(repair_from_proto).collect(),
        };
        // Whole as a client reads it (`--json`, watch): what an older agent
        // or a degraded record leaves to derive is derived here, once, so a
        // record reads the same after any number of round trips.
        record.cause = record.failure();
        record
    }
}

pub fn completion_to_proto(c: &Completion) -> proto::Completion {
    proto::Completion {
        timeout_per_gib_s: c.timeout_per_gib_s,
        postcopy: match c.postcopy {
            Postcopy::Never => proto::Postcopy::Never,
            Postcopy::Auto => proto::Postcopy::Auto,
            Postcopy::Now => proto::Postcopy::Now,
        } as i32,
        downtime_limit_ms: c.downtime_limit_ms,
        when_spent: match c.when_spent {
            WhenSpent::Abort => proto::WhenSpent::Abort,
            WhenSpent::Continue => proto::WhenSpent::Continue,
        } as i32,
        no_budget: c.timeout_per_gib_s == 0,
    }
}

/// A record's policy as an agent sent it (every field explicit there);
/// absent in a record from before policies: the default.
pub fn completion_from_record(c: Option<&proto::Completion>) -> Completion {
    c.map(completion_in_record).unwrap_or_default()
}

fn completion_in_record(c: &proto::Completion) -> Completion {
    completion_request_from_proto(Some(c)).over(Completion {
        timeout_per_gib_s: 0,
        ..Completion::default()
    })
}

/// A request's policy: what it leaves out stays open
/// ([`CompletionRequest::over`]).
pub fn completion_request_from_proto(c: Option<&proto::Completion>) -> CompletionRequest {
    let Some(c) = c else {
        return CompletionRequest::default();
    };
    CompletionRequest {
        timeout_per_gib_s: if c.no_budget {
            Some(0)
        } else {
            (c.timeout_per_gib_s > 0).then_some(c.timeout_per_gib_s)
        },
        postcopy: match proto::Postcopy::try_from(c.postcopy) {
            Ok(proto::Postcopy::Never) => Some(Postcopy::Never),
            Ok(proto::Postcopy::Auto) => Some(Postcopy::Auto),
            Ok(proto::Postcopy::Now) => Some(Postcopy::Now),
            _ => None,
        },
        downtime_limit_ms: (c.downtime_limit_ms > 0).then_some(c.downtime_limit_ms),
        when_spent: match proto::WhenSpent::try_from(c.when_spent) {
            Ok(proto::WhenSpent::Abort) => Some(WhenSpent::Abort),
            Ok(proto::WhenSpent::Continue) => Some(WhenSpent::Continue),
            _ => None,
        },
    }
}

/// The request a client sends; `None` when it asks for nothing.
pub fn completion_request_to_proto(c: &CompletionRequest) -> Option<proto::Completion> {
    (!c.is_empty()).then(|| proto::Completion {
        timeout_per_gib_s: c.timeout_per_gib_s.unwrap_or(0),
        no_budget: c.timeout_per_gib_s == Some(0),
        postcopy: match c.postcopy {
            None => proto::Postcopy::Unspecified,
            Some(Postcopy::Never) => proto::Postcopy::Never,
            Some(Postcopy::Auto) => proto::Postcopy::Auto,
            Some(Postcopy::Now) => proto::Postcopy::Now,
        } as i32,
        downtime_limit_ms: c.downtime_limit_ms.unwrap_or(0),
        when_spent: match c.when_spent {
            None => proto::WhenSpent::Unspecified,
            Some(WhenSpent::Abort) => proto::WhenSpent::Abort,
            Some(WhenSpent::Continue) => proto::WhenSpent::Continue,
        } as i32,
    })
}

fn verdict_to_proto(v: Verdict) -> proto::Verdict {
    match v {
        Verdict::Converging => proto::Verdict::Converging,
        Verdict::Slow => proto::Verdict::Slow,
        Verdict::NotConverging => proto::Verdict::NotConverging,
        Verdict::Stalled => proto::Verdict::Stalled,
    }
}

pub fn convergence_to_proto(c: &ConvergenceView) -> proto::Convergence {
    proto::Convergence {
        verdict: verdict_to_proto(c.verdict) as i32,
        has_eta: c.eta_ms.is_some(),
        eta_ms: c.eta_ms.unwrap_or(0),
        reason: c.reason.clone(),
        remaining: c
            .remaining
            .iter()
            .map(|&[elapsed_ms, bytes]| proto::RemainingSample { elapsed_ms, bytes })
            .collect(),
    }
}

pub fn convergence_from_proto(c: &proto::Convergence) -> Option<ConvergenceView> {
    let verdict = match proto::Verdict::try_from(c.verdict).ok()? {
        proto::Verdict::Unspecified => return None,
        proto::Verdict::Converging => Verdict::Converging,
        proto::Verdict::Slow => Verdict::Slow,
        proto::Verdict::NotConverging => Verdict::NotConverging,
        proto::Verdict::Stalled => Verdict::Stalled,
    };
    Some(ConvergenceView {
        verdict,
        eta_ms: c.has_eta.then_some(c.eta_ms),
        reason: c.reason.clone(),
        remaining: c
            .remaining
            .iter()
            .map(|s| [s.elapsed_ms, s.bytes])
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_journaled_as_a_bare_kind_still_loads_and_a_whole_one_round_trips() {
        // Journals written before causes were structured hold the kind alone;
        // "guest" was the hypervisor's kind then.
        for (old, kind) in [
            ("\"transfer\"", Cause::Transfer),
            ("\"guest\"", Cause::Hypervisor),
            ("\"destination_busy\"", Cause::DestinationBusy),
        ] {
            let cause: FailureCause = serde_json::from_str(old).expect(old);
            assert_eq!(cause, FailureCause::kind_only(kind), "{old}");
        }
        let whole = FailureCause {
            kind: Cause::Feature,
            side: Some(Side::Destination),
            host: "hv-b".into(),
            feature: Some("port-profile".into()),
            stage: Some(Stage::Finish),
            text: "finish: ASSOCIATE rejected".into(),
        };
        let json = serde_json::to_string(&whole).unwrap();
        assert_eq!(serde_json::from_str::<FailureCause>(&json).unwrap(), whole);
        assert!(serde_json::from_str::<FailureCause>("\"no_such_kind\"").is_err());
        assert!(serde_json::from_str::<FailureCause>("{\"side\":\"source\"}").is_err());
    }

    #[test]
    fn a_failure_names_the_first_failed_feature_stage_and_the_text_and_travels_whole() {
        let mut record = MigrationRecord::from(&proto::MigrationRecord {
            id: "m-1".into(),
            vm: "web-01".into(),
            source: "hv-a".into(),
            destination: "hv-b".into(),
            outcome: proto::Outcome::Degraded as i32,
            ..Default::default()
        });
        let mut pp = FeatureRecord::new("port-profile", true);
        pp.finish = StepStatus::Failed;
        pp.error = Some("finish: ASSOCIATE rejected".into());
        record.features = vec![FeatureRecord::new("disk", false), pp];
        // Degraded with no kind recorded: a feature, on the destination.
        let failure = record.failure().expect("degraded says why");
        assert_eq!(failure.kind, Cause::Feature);
        assert_eq!(failure.side, Some(Side::Destination));
        assert_eq!(failure.host, "hv-b");
        assert_eq!(failure.feature.as_deref(), Some("port-profile"));
        assert_eq!(failure.stage, Some(Stage::Finish));
        assert_eq!(failure.text, "finish: ASSOCIATE rejected");
        // Through the Console service and back, as the CLI prints it.
        let back = MigrationRecord::from(&proto::MigrationRecord::from(&record));
        assert_eq!(back.cause, Some(failure));
        // A success has none, whatever was recorded before.
        record.outcome = Some(Outcome::Succeeded);
        assert_eq!(record.failure(), None);
        // An operator's abort on the source: the agent's text.
        record.outcome = Some(Outcome::Aborted);
        record.features.clear();
        record.error = Some("aborted by the operator".into());
        record.blame(Cause::Operator, Side::Source);
        let failure = record.failure().unwrap();
        assert_eq!(
            (failure.kind, failure.host.as_str()),
            (Cause::Operator, "hv-a")
        );
        assert_eq!(failure.text, "aborted by the operator");
        assert_eq!(
            failure.summary(),
            "operator on hv-a (source)",
            "{failure:?}"
        );
    }
}
