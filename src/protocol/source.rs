//! The source side of one attempt: Begin, Perform and Confirm, and driving the
//! destination's Prepare and Finish.
//!
//! ```text
//!  begin ──► Preparing ──C2──► Transferring ──done──► FinishSent ──C4──► Confirming ──► Done
//!               │                  │                     │    ▲
//!               │  abort, peer     │ abort, peer lost,   │    │ Resolve answers
//!               ▼  lost, refused   ▼ stall, error        ▼    │
//!             Aborting ─────────────────► Done       Unresolved (never resumes on its own)
//! ```
//!
//! Before Finish is sent every failure ends with the guest resumed here. Once
//! it is sent, only the destination's answer (Finish's reply or Resolve) or the
//! operator's forced decision moves the attempt on.

use serde::{Deserialize, Serialize};

use super::cookies::{self, read_stage_result};
use super::mutations::{Mutation, planted};
use super::record::{FeatureRecord, MigrationRecord, PhaseRecord};
use super::recovery::{SourceRecovery, source_recovery};
use super::{
    Millis, Mode, Outcome, PROTOCOL_VERSION, PeerError, Phase, RunOn, Stage, StageOutcome,
    StepStatus, Timing, TransferStats, VmSpec,
};
use crate::proto;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SourceState {
    /// C1 sent; waiting for the destination's Prepare.
    Preparing,
    /// Perform: the hypervisor is transferring the guest.
    Transferring {
        address: String,
    },
    /// Ending before the commit point: cancel, resume here, tell the peer.
    Aborting {
        outcome: Outcome,
    },
    /// C3 sent: the destination may commit at any moment.
    FinishSent,
    /// Finish got no answer: asking the destination with Resolve.
    Unresolved,
    /// Confirm: kill here and release (committed) or resume here.
    Confirming {
        committed: bool,
    },
    Done,
}

/// What the destination says about an attempt it was asked to resolve.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolution {
    Committed(proto::Cookie4),
    NotCommitted(proto::Cookie4),
    Pending,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SourceInput {
    PrepareReplied(Result<proto::Cookie2, PeerError>),
    TransferProgress(TransferStats),
    TransferDone(Result<TransferStats, String>),
    FinishReplied(Result<proto::Cookie4, PeerError>),
    ResolveReplied(Result<Resolution, PeerError>),
    /// `Ok(known)`: the destination answered, and still knows the attempt.
    HeartbeatReplied(Result<bool, PeerError>),
    StageDone {
        feature: usize,
        stage: Stage,
        result: StageOutcome,
    },
    /// The destination told us it aborted the attempt.
    PeerAborted {
        reason: String,
    },
    Timer,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SourceAction {
    /// Write this snapshot to the journal before doing what follows.
    Journal(Box<SourceAttempt>),
    SendPrepare(proto::Cookie1),
    StartTransfer {
        address: String,
    },
    /// Stop the transfer and wait until it has stopped.
    CancelTransfer,
    SendFinish(proto::Cookie3),
    SendAbort {
        reason: String,
    },
    SendResolve,
    SendHeartbeat,
    ResumeGuest,
    KillGuest,
    RunStage {
        feature: usize,
        stage: Stage,
    },
    /// A release failed: its state stays on this host until a retry succeeds.
    RecordPending {
        feature: usize,
        stage: Stage,
        error: String,
    },
    /// The attempt has an outcome: unlock the VM (not sent for `Unresolved`).
    Finished(Outcome),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceAttempt {
    pub attempt_id: String,
    pub migration_id: String,
    pub host: String,
    pub destination: String,
    pub vm: VmSpec,
    pub mode: Mode,
    pub state: SourceState,
    pub record: MigrationRecord,
    timing: Timing,
    last_peer_contact: Millis,
    heartbeat_due: Millis,
    heartbeat_in_flight: bool,
    resolve_due: Millis,
    resolve_backoff: Millis,
    resolve_in_flight: bool,
    last_progress_at: Millis,
    last_progress_bytes: u64,
    release_next: usize,
}

/// Who is starting an attempt, and of what.
#[derive(Debug, Clone)]
pub struct AttemptParams {
    pub migration_id: String,
    pub attempt: u32,
    pub host: String,
    pub destination: String,
    pub vm: VmSpec,
    pub mode: Mode,
    pub timing: Timing,
    /// When the migration was first started (unix ms), kept across attempts.
    pub started_at_ms: Millis,
}

pub fn attempt_id(migration_id: &str, attempt: u32) -> String {
    format!("{migration_id}.{attempt}")
}

impl SourceAttempt {
    /// Begin has validated and locked the VM; snapshot the spec and send C1.
    pub fn begin(params: AttemptParams, now: Millis) -> (SourceAttempt, Vec<SourceAction>) {
        let attempt_id = attempt_id(&params.migration_id, params.attempt);
        let record = MigrationRecord {
            id: params.migration_id.clone(),
            vm: params.vm.name.clone(),
            source: params.host.clone(),
            destination: params.destination.clone(),
            mode: params.mode,
            attempt: params.attempt,
            attempt_id: attempt_id.clone(),
            outcome: None,
            running_on: params.host.clone(),
            error: None,
            committed: false,
            phases: Phase::ALL
                .iter()
                .map(|&phase| PhaseRecord {
                    phase,
                    status: StepStatus::Pending,
                    duration_ms: 0,
                    started_at: None,
                })
                .collect(),
            features: params
                .vm
                .features
                .iter()
                .map(|f| FeatureRecord::new(&f.name, f.required))
                .collect(),
            transfer: None,
            started_at_ms: params.started_at_ms,
            updated_at_ms: now,
            cookies: Vec::new(),
        };
        let mut attempt = SourceAttempt {
            attempt_id,
            migration_id: params.migration_id,
            host: params.host,
            destination: params.destination,
            vm: params.vm,
            mode: params.mode,
            state: SourceState::Preparing,
            record,
            timing: params.timing,
            last_peer_contact: now,
            heartbeat_due: now + params.timing.heartbeat_interval_ms,
            heartbeat_in_flight: false,
            resolve_due: 0,
            resolve_backoff: params.timing.resolve_backoff_ms,
            resolve_in_flight: false,
            last_progress_at: now,
            last_progress_bytes: 0,
            release_next: 0,
        };
        attempt.record.start_phase(Phase::Begin, now);
        attempt.record.end_phase(Phase::Begin, StepStatus::Ok, now);
        attempt.record.start_phase(Phase::Prepare, now);
        let c1 = cookies::cookie1(
            &attempt.attempt_id,
            &attempt.migration_id,
            &attempt.host,
            &attempt.vm,
            attempt.mode,
        );
        attempt.record.cookies.push(cookies::describe(&c1));
        let actions = vec![attempt.journal(), SourceAction::SendPrepare(c1)];
        (attempt, actions)
    }

    fn journal(&self) -> SourceAction {
        SourceAction::Journal(Box::new(self.clone()))
    }

    pub fn is_done(&self) -> bool {
        self.state == SourceState::Done
    }

    /// Before the commit point, the operator (or a shutting-down agent) may
    /// abort; afterwards the refusal says why and what to do instead.
    pub fn abort(&mut self, now: Millis, reason: &str) -> Result<Vec<SourceAction>, String> {
        match &self.state {
            SourceState::Preparing | SourceState::Transferring { .. } => {
                Ok(self.end_before_commit(now, Outcome::Aborted, reason.to_string(), true))
            }
            SourceState::Aborting { .. } => Ok(Vec::new()),
            SourceState::FinishSent | SourceState::Unresolved => Err(format!(
                "cannot abort migration {} of {}: Finish was sent to {}, which may already have resumed the guest \
                 (the commit point). Migrate the VM back instead.",
                self.migration_id, self.vm.name, self.destination
            )),
            SourceState::Confirming { committed: true } => Err(format!(
                "cannot abort migration {} of {}: {} committed and the guest runs there. Migrate the VM back instead.",
                self.migration_id, self.vm.name, self.destination
            )),
            SourceState::Confirming { committed: false } | SourceState::Done => Err(format!(
                "migration {} of {} has already ended ({})",
                self.migration_id,
                self.vm.name,
                self.record.outcome.map(Outcome::as_str).unwrap_or("ending")
            )),
        }
    }

    /// The operator's forced decision for an unresolved attempt.
    pub fn force_resolve(
        &mut self,
        now: Millis,
        run_on: RunOn,
    ) -> Result<Vec<SourceAction>, String> {
        if self.state != SourceState::Unresolved {
            return Err(format!(
                "migration {} is not unresolved: only an attempt whose destination cannot answer Resolve can be forced",
                self.migration_id
            ));
        }
        let note = match run_on {
            RunOn::Source => format!("operator forced the guest to run on {}", self.host),
            RunOn::Destination => {
                format!("operator forced the guest to run on {}", self.destination)
            }
        };
        self.record.error = Some(format!(
            "{note}; {}'s own record of the attempt was never read",
            self.destination
        ));
        Ok(match run_on {
            RunOn::Source => {
                let mut actions = self.confirm_not_committed(now, None);
                actions.push(SourceAction::SendAbort { reason: note });
                actions
            }
            RunOn::Destination => self.confirm_committed(now, None),
        })
    }

    /// The next instant `handle(Timer)` has something to do.
    pub fn poll_timeout(&self) -> Option<Millis> {
        let liveness = || {
            let hb = if self.heartbeat_in_flight {
                Millis::MAX
            } else {
                self.heartbeat_due
            };
            let lost = if planted(Mutation::IgnoreLostPeer) {
                Millis::MAX
            } else {
                self.last_peer_contact + self.timing.peer_timeout_ms
            };
            hb.min(lost)
        };
        match &self.state {
            SourceState::Preparing | SourceState::FinishSent => Some(liveness()),
            SourceState::Transferring { .. } => {
                Some(liveness().min(self.last_progress_at + self.timing.stall_timeout_ms))
            }
            SourceState::Unresolved if !self.resolve_in_flight => Some(self.resolve_due),
            _ => None,
        }
    }

    pub fn handle(&mut self, now: Millis, input: SourceInput) -> Vec<SourceAction> {
        match input {
            SourceInput::PrepareReplied(reply) => self.on_prepare_replied(now, reply),
            SourceInput::TransferProgress(stats) => {
                if matches!(self.state, SourceState::Transferring { .. }) {
                    if stats.bytes_transferred != self.last_progress_bytes {
                        self.last_progress_bytes = stats.bytes_transferred;
                        self.last_progress_at = now;
                    }
                    self.record.transfer = Some(stats);
                    self.record.updated_at_ms = now;
                }
                Vec::new()
            }
            SourceInput::TransferDone(result) => self.on_transfer_done(now, result),
            SourceInput::FinishReplied(reply) => self.on_finish_replied(now, reply),
            SourceInput::ResolveReplied(reply) => self.on_resolve_replied(now, reply),
            SourceInput::HeartbeatReplied(reply) => self.on_heartbeat_replied(now, reply),
            SourceInput::StageDone {
                feature,
                stage,
                result,
            } => self.on_stage_done(now, feature, stage, result),
            SourceInput::PeerAborted { reason } => match self.state {
                SourceState::Preparing | SourceState::Transferring { .. } => self
                    .end_before_commit(
                        now,
                        Outcome::Failed,
                        format!("{} aborted the attempt: {reason}", self.destination),
                        false,
                    ),
                _ => Vec::new(),
            },
            SourceInput::Timer => self.on_timer(now),
        }
    }

    fn on_prepare_replied(
        &mut self,
        now: Millis,
        reply: Result<proto::Cookie2, PeerError>,
    ) -> Vec<SourceAction> {
        if self.state != SourceState::Preparing {
            return Vec::new();
        }
        self.last_peer_contact = now;
        let c2 = match reply {
            Ok(c2) => c2,
            Err(e) => {
                // Unreachable: the destination may have prepared something; the
                // Abort tells it to drop it (or it drops it when heartbeats stop).
                let tell = matches!(e, PeerError::Unreachable(_));
                let error = match &e {
                    PeerError::Refused(why) => {
                        format!("{} refused Prepare: {why}", self.destination)
                    }
                    PeerError::Unreachable(why) => {
                        format!("no answer to Prepare from {}: {why}", self.destination)
                    }
                };
                return self.end_before_commit(now, Outcome::Failed, error, tell);
            }
        };
        self.record.cookies.push(cookies::describe(&c2));
        self.apply_stage_results(Stage::Prepare, &c2.prepare);
        self.apply_stage_results(Stage::Rollback, &c2.rollback);
        if !c2.accepted {
            let error = if c2.error.is_empty() {
                format!("{} did not prepare", self.destination)
            } else {
                c2.error
            };
            return self.end_before_commit(now, Outcome::Failed, error, false);
        }
        self.record.end_phase(Phase::Prepare, StepStatus::Ok, now);
        self.record.start_phase(Phase::Perform, now);
        self.last_progress_at = now;
        let address = c2.incoming_address;
        self.state = SourceState::Transferring {
            address: address.clone(),
        };
        vec![self.journal(), SourceAction::StartTransfer { address }]
    }

    fn on_transfer_done(
        &mut self,
        now: Millis,
        result: Result<TransferStats, String>,
    ) -> Vec<SourceAction> {
        if !matches!(self.state, SourceState::Transferring { .. }) {
            return Vec::new();
        }
        match result {
            Err(e) => {
                self.end_before_commit(now, Outcome::Failed, format!("transfer failed: {e}"), true)
            }
            Ok(stats) => {
                // The guest is paused here now. From the moment C3 leaves, the
                // destination may commit: journal that first.
                self.record.transfer = Some(stats);
                self.record.end_phase(Phase::Perform, StepStatus::Ok, now);
                self.record.start_phase(Phase::Finish, now);
                self.state = SourceState::FinishSent;
                let c3 = proto::Cookie3 {
                    protocol_version: PROTOCOL_VERSION,
                    attempt_id: self.attempt_id.clone(),
                    status: proto::TransferStatus::Completed as i32,
                    stats: Some(super::record::stats_to_proto(&stats)),
                };
                self.record.cookies.push(cookies::describe(&c3));
                vec![self.journal(), SourceAction::SendFinish(c3)]
            }
        }
    }

    fn on_finish_replied(
        &mut self,
        now: Millis,
        reply: Result<proto::Cookie4, PeerError>,
    ) -> Vec<SourceAction> {
        if !matches!(
            self.state,
            SourceState::FinishSent | SourceState::Unresolved
        ) {
            return Vec::new();
        }
        match reply {
            Ok(c4) => {
                self.last_peer_contact = now;
                self.apply_cookie4(now, c4)
            }
            Err(e) if planted(Mutation::ResumeOnUnknownOutcome) => {
                self.confirm_not_committed(now, Some(e.message().to_string()))
            }
            Err(e) => self.become_unresolved(
                now,
                format!(
                    "no answer to Finish from {}: {}",
                    self.destination,
                    e.message()
                ),
            ),
        }
    }

    fn on_resolve_replied(
        &mut self,
        now: Millis,
        reply: Result<Resolution, PeerError>,
    ) -> Vec<SourceAction> {
        if self.state != SourceState::Unresolved {
            return Vec::new();
        }
        self.resolve_in_flight = false;
        match reply {
            Ok(Resolution::Committed(c4)) | Ok(Resolution::NotCommitted(c4)) => {
                self.apply_cookie4(now, c4)
            }
            Ok(Resolution::Pending) | Err(_) => {
                self.resolve_due = now + self.resolve_backoff;
                self.resolve_backoff =
                    (self.resolve_backoff * 2).min(self.timing.resolve_backoff_max_ms);
                Vec::new()
            }
        }
    }

    fn apply_cookie4(&mut self, now: Millis, c4: proto::Cookie4) -> Vec<SourceAction> {
        self.record.cookies.push(cookies::describe(&c4));
        self.apply_stage_results(Stage::Finish, &c4.finish);
        self.apply_stage_results(Stage::Rollback, &c4.rollback);
        if c4.committed {
            self.record.error = None;
            self.confirm_committed(now, None)
        } else {
            let error = if c4.error.is_empty() {
                format!("{} did not commit", self.destination)
            } else {
                c4.error
            };
            self.confirm_not_committed(now, Some(error))
        }
    }

    fn on_heartbeat_replied(
        &mut self,
        now: Millis,
        reply: Result<bool, PeerError>,
    ) -> Vec<SourceAction> {
        self.heartbeat_in_flight = false;
        match reply {
            Ok(known) => {
                self.last_peer_contact = now;
                // Before Prepare has replied the destination may not have seen C1
                // yet, so only a transferring attempt can be "gone".
                if !known && matches!(self.state, SourceState::Transferring { .. }) {
                    let error = format!(
                        "{} no longer knows this attempt (it aborted it)",
                        self.destination
                    );
                    return self.end_before_commit(now, Outcome::Failed, error, false);
                }
                Vec::new()
            }
            Err(_) => Vec::new(),
        }
    }

    fn on_stage_done(
        &mut self,
        now: Millis,
        feature: usize,
        stage: Stage,
        result: StageOutcome,
    ) -> Vec<SourceAction> {
        let SourceState::Confirming { committed: true } = self.state else {
            return Vec::new();
        };
        if stage != Stage::Release || feature != self.release_next {
            return Vec::new();
        }
        let mut actions = Vec::new();
        if let Some(record) = self.record.features.get_mut(feature) {
            record.record(Stage::Release, &result);
        }
        if let Err(error) = result {
            actions.push(SourceAction::RecordPending {
                feature,
                stage: Stage::Release,
                error,
            });
        }
        self.release_next += 1;
        actions.extend(self.next_release(now));
        actions
    }

    fn on_timer(&mut self, now: Millis) -> Vec<SourceAction> {
        let mut actions = Vec::new();
        match self.state {
            SourceState::Preparing | SourceState::Transferring { .. } | SourceState::FinishSent => {
                if now >= self.last_peer_contact + self.timing.peer_timeout_ms
                    && !planted(Mutation::IgnoreLostPeer)
                {
                    let silence = now - self.last_peer_contact;
                    let error = format!(
                        "lost contact with {}: no answer for {silence} ms",
                        self.destination
                    );
                    return if self.state == SourceState::FinishSent {
                        self.become_unresolved(now, error)
                    } else {
                        self.end_before_commit(now, Outcome::Failed, error, true)
                    };
                }
                if let SourceState::Transferring { .. } = self.state
                    && now >= self.last_progress_at + self.timing.stall_timeout_ms
                {
                    let error = format!(
                        "transfer made no progress for {} ms",
                        now - self.last_progress_at
                    );
                    return self.end_before_commit(now, Outcome::Failed, error, true);
                }
                if !self.heartbeat_in_flight && now >= self.heartbeat_due {
                    self.heartbeat_in_flight = true;
                    self.heartbeat_due = now + self.timing.heartbeat_interval_ms;
                    actions.push(SourceAction::SendHeartbeat);
                }
            }
            SourceState::Unresolved if !self.resolve_in_flight && now >= self.resolve_due => {
                self.resolve_in_flight = true;
                actions.push(SourceAction::SendResolve);
            }
            _ => {}
        }
        actions
    }

    /// Every way an attempt ends before the commit point: the guest runs here.
    fn end_before_commit(
        &mut self,
        now: Millis,
        outcome: Outcome,
        error: String,
        tell_peer: bool,
    ) -> Vec<SourceAction> {
        let transferring = matches!(self.state, SourceState::Transferring { .. });
        let phase = self.record.running_phase().unwrap_or(Phase::Prepare);
        self.record.fail_from(phase, now);
        self.record.outcome = Some(outcome);
        self.record.error = Some(error.clone());
        self.record.running_on = self.host.clone();
        for f in &mut self.record.features {
            // What the destination prepared (or may have) it rolls back and reports.
            let awaited = matches!(f.prepare, StepStatus::Ok | StepStatus::Running);
            f.skip_unrun(awaited);
        }
        self.state = SourceState::Aborting { outcome };
        let mut actions = vec![self.journal()];
        if transferring {
            actions.push(SourceAction::CancelTransfer);
        }
        actions.push(SourceAction::ResumeGuest);
        if tell_peer {
            actions.push(SourceAction::SendAbort { reason: error });
        }
        self.state = SourceState::Done;
        actions.push(self.journal());
        actions.push(SourceAction::Finished(outcome));
        actions
    }

    fn become_unresolved(&mut self, now: Millis, error: String) -> Vec<SourceAction> {
        if self.state == SourceState::Unresolved {
            return Vec::new();
        }
        self.state = SourceState::Unresolved;
        self.record.outcome = Some(Outcome::Unresolved);
        self.record.error = Some(format!(
            "{error}. The guest stays paused on {} until {} answers whether it committed.",
            self.host, self.destination
        ));
        self.resolve_due = now;
        self.resolve_in_flight = false;
        self.resolve_backoff = self.timing.resolve_backoff_ms;
        self.record.updated_at_ms = now;
        vec![self.journal()]
    }

    fn confirm_committed(&mut self, now: Millis, error: Option<String>) -> Vec<SourceAction> {
        self.record.committed = true;
        if self.record.phase(Phase::Finish).status == StepStatus::Running {
            self.record.end_phase(Phase::Finish, StepStatus::Ok, now);
        }
        self.record.start_phase(Phase::Confirm, now);
        self.record.running_on = self.destination.clone();
        if error.is_some() {
            self.record.error = error;
        }
        self.state = SourceState::Confirming { committed: true };
        self.release_next = 0;
        let mut actions = vec![self.journal(), SourceAction::KillGuest];
        actions.extend(self.next_release(now));
        actions
    }

    fn next_release(&mut self, now: Millis) -> Vec<SourceAction> {
        if self.release_next < self.vm.features.len() {
            if let Some(record) = self.record.features.get_mut(self.release_next) {
                record.release = StepStatus::Running;
            }
            return vec![SourceAction::RunStage {
                feature: self.release_next,
                stage: Stage::Release,
            }];
        }
        let degraded = self
            .record
            .features
            .iter()
            .any(|f| f.prepare == StepStatus::Failed || f.finish == StepStatus::Failed)
            || self.record.error.is_some();
        let outcome = if degraded {
            Outcome::Degraded
        } else {
            Outcome::Succeeded
        };
        for f in &mut self.record.features {
            f.skip_unrun(false);
        }
        if degraded && self.record.error.is_none() {
            self.record.error = self.first_feature_error();
        }
        self.record.end_phase(Phase::Confirm, StepStatus::Ok, now);
        self.record.outcome = Some(outcome);
        self.state = SourceState::Done;
        vec![self.journal(), SourceAction::Finished(outcome)]
    }

    fn confirm_not_committed(&mut self, now: Millis, error: Option<String>) -> Vec<SourceAction> {
        if self.record.phase(Phase::Finish).status == StepStatus::Running {
            self.record.fail_from(Phase::Finish, now);
        }
        if error.is_some() {
            self.record.error = error;
        }
        self.state = SourceState::Confirming { committed: false };
        let journal = self.journal();
        self.record.start_phase(Phase::Confirm, now);
        self.record.end_phase(Phase::Confirm, StepStatus::Ok, now);
        self.record.running_on = self.host.clone();
        self.record.outcome = Some(Outcome::Failed);
        for f in &mut self.record.features {
            f.skip_unrun(false);
        }
        self.state = SourceState::Done;
        vec![
            journal,
            SourceAction::ResumeGuest,
            self.journal(),
            SourceAction::Finished(Outcome::Failed),
        ]
    }

    fn first_feature_error(&self) -> Option<String> {
        self.record
            .features
            .iter()
            .find_map(|f| f.error.as_ref().map(|e| format!("{} {e}", f.name)))
    }

    fn apply_stage_results(&mut self, stage: Stage, results: &[proto::StageResult]) {
        for result in results {
            let (status, detail) = read_stage_result(result);
            if let Some(record) = self.record.feature_mut(&result.feature) {
                record.set_stage(stage, status);
                // The destination's detail already names the stage.
                if status == StepStatus::Failed && record.error.is_none() {
                    record.error = Some(detail.to_string());
                }
            }
        }
    }

    /// The destination reported the rollback it did after this attempt was
    /// aborted: show it in the record (the attempt itself is over).
    pub fn apply_peer_rollback(&mut self, c4: &proto::Cookie4) {
        if c4.attempt_id != self.attempt_id || c4.committed {
            return;
        }
        self.apply_stage_results(Stage::Rollback, &c4.rollback);
        for f in &mut self.record.features {
            f.skip_unrun(false);
        }
    }

    /// Carry out the recovery table for this attempt after an agent restart.
    pub fn recover(&mut self, now: Millis) -> Vec<SourceAction> {
        self.heartbeat_in_flight = false;
        self.resolve_in_flight = false;
        self.last_peer_contact = now;
        self.heartbeat_due = now;
        match source_recovery(&self.state) {
            SourceRecovery::Forget => self.end_before_commit(
                now,
                Outcome::Aborted,
                format!("{} restarted before Prepare completed", self.host),
                true,
            ),
            SourceRecovery::CancelAndResume => {
                let outcome = match self.state {
                    SourceState::Aborting { outcome } => outcome,
                    _ => Outcome::Aborted,
                };
                let error = self
                    .record
                    .error
                    .clone()
                    .unwrap_or_else(|| format!("{} restarted during Perform", self.host));
                // Put the state back to transferring so the transfer is cancelled.
                self.state = SourceState::Transferring {
                    address: String::new(),
                };
                self.end_before_commit(now, outcome, error, true)
            }
            SourceRecovery::Resolve => {
                self.state = SourceState::FinishSent;
                self.become_unresolved(
                    now,
                    format!(
                        "{} restarted after sending Finish to {}",
                        self.host, self.destination
                    ),
                )
            }
            SourceRecovery::FinishConfirm => match self.state {
                SourceState::Confirming { committed: true } => {
                    let mut actions = vec![SourceAction::KillGuest];
                    actions.extend(self.next_release(now));
                    actions
                }
                _ => self.confirm_not_committed(now, None),
            },
            SourceRecovery::Nothing => Vec::new(),
        }
    }
}
