//! The source side of one attempt: Begin, Perform and Confirm, and driving the
//! destination's Prepare and Finish.
//!
//! ```text
//!  begin ──► Preparing ──C2──► Transferring ──done──► FinishSent ──C4──► Confirming ──► Done
//!               │                  │                     │    ▲            (kill, release
//!               │  abort, peer     │ abort, peer lost,   │    │ Resolve     or resume)
//!               ▼  lost, refused   ▼ stall, error        ▼    │ answers
//!             Aborting ─(cancel, resume)─► Done       Unresolved (never resumes on its own)
//! ```
//!
//! Before Finish is sent every failure ends with the guest resumed here. Once
//! it is sent, only the destination's answer (Finish's reply, Resolve, or its
//! own abort carrying C4) or the operator's forced decision moves the attempt
//! on. Every hypervisor call the attempt asks for (cancel the transfer,
//! resume, kill) is waited for: the attempt only ends once the guest is where
//! its record says, and a call that fails is recorded, never taken for done.

use serde::{Deserialize, Serialize};

use super::address::check_incoming;
use super::completion::{self, Completion, DEFAULT_DOWNTIME_LIMIT_MS, Postcopy, Step};
use super::convergence::{Convergence, ConvergenceView, record_remaining};
use super::cookies::{self, read_stage_result};
use super::mutations::{Mutation, planted};
use super::policy::is_blocking;
use super::record::{FeatureRecord, MigrationRecord, PhaseRecord, RecoveryView};
use super::recovery::{SourceRecovery, source_recovery};
use super::{
    Cause, GuestCondition, GuestOpError, GuestOpResult, KillResult, Millis, Mode, Outcome,
    PROTOCOL_VERSION, PeerError, PendingWork, Phase, RunOn, Side, Stage, StageOutcome, StepStatus,
    Timing, TransferStage, TransferStats, VmSpec,
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
    /// Post-copy was decided: C3 asked the destination to run its finish
    /// stages while pre-copy goes on. Still before the commit point.
    SwitchRequested {
        address: String,
    },
    /// The destination is ready: the hypervisor is switching to post-copy.
    /// Journaled first: from here the guest never runs here again unless
    /// the destination says the switchover never reached it.
    Switching,
    /// Ending before the commit point: stop the transfer, then resume here.
    Aborting {
        outcome: Outcome,
        #[serde(default)]
        step: AbortStep,
    },
    /// C3 sent: the destination may commit at any moment.
    FinishSent,
    /// Finish got no answer: asking the destination with Resolve.
    Unresolved,
    /// Confirm: kill here and release (committed) or resume here.
    Confirming {
        committed: bool,
        #[serde(default)]
        step: ConfirmStep,
    },
    Done,
}

/// Where an attempt that ends before the commit point is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AbortStep {
    /// Waiting for the transfer to have stopped.
    #[default]
    Cancelling,
    /// Waiting for the guest to run again.
    Resuming,
}

/// Where Confirm is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConfirmStep {
    /// Killing (committed) or resuming (not committed) the guest here.
    #[default]
    Guest,
    /// Committed in post-copy: the destination still pulls pages from this
    /// copy; it is killed once the last one has gone.
    Draining,
    /// Running the features' release stages (committed).
    Releasing,
}

/// What the destination says about an attempt it was asked to resolve.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolution {
    Committed(proto::Cookie4),
    NotCommitted(proto::Cookie4),
    /// Committed, but the destination can no longer run the guest.
    Lost(proto::Cookie4),
    Pending,
}

/// The destination's answer to Recover.
#[derive(Debug, Clone, PartialEq)]
pub struct RecoverAnswer {
    /// Where to resume the transfer.
    pub address: String,
    /// The guest is gone there: nothing to recover.
    pub lost: bool,
    pub detail: String,
}

/// Post-copy paused by a broken link: the recovery in progress.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Recovery {
    tries: u32,
    due: Millis,
    in_flight: bool,
    error: Option<String>,
}

/// The longest wait between two tries of a post-copy recovery.
pub const RECOVERY_BACKOFF_MAX_MS: Millis = 10_000;
/// The first wait.
pub const RECOVERY_BACKOFF_MS: Millis = 500;

/// The destination's answer to an Abort this side sent.
#[derive(Debug, Clone, PartialEq)]
pub struct AbortAnswer {
    pub aborted: bool,
    /// With `aborted` false: the attempt committed there.
    pub committed: bool,
    pub detail: String,
    /// Its rollback results, once it has rolled back.
    pub c4: Option<proto::Cookie4>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SourceInput {
    PrepareReplied(Result<proto::Cookie2, PeerError>),
    TransferProgress(TransferStats),
    TransferDone(Result<TransferStats, String>),
    /// The hypervisor answered the switch to post-copy.
    PostcopyStarted(GuestOpResult),
    /// The destination answered Recover.
    RecoverReplied(Result<RecoverAnswer, PeerError>),
    /// The hypervisor answered the resume of a paused post-copy transfer.
    PostcopyResumed(GuestOpResult),
    /// A transfer this attempt cancelled has stopped; `completed`: it had
    /// moved the whole guest first (or whether it had is unknown).
    TransferStopped {
        completed: bool,
    },
    FinishReplied(Result<proto::Cookie4, PeerError>),
    ResolveReplied(Result<Resolution, PeerError>),
    /// `Ok(known)`: the destination answered, and still knows the attempt.
    HeartbeatReplied(Result<bool, PeerError>),
    AbortReplied(Result<AbortAnswer, PeerError>),
    GuestResumed(GuestOpResult),
    GuestKilled(GuestOpResult),
    StageDone {
        feature: usize,
        stage: Stage,
        result: StageOutcome,
    },
    /// A stage did not answer within its deadline: its effect is unknown.
    StageTimedOut {
        feature: usize,
        stage: Stage,
        after_ms: Millis,
    },
    /// The destination told us it aborted the attempt; with C4, it has
    /// durably decided never to commit and rolled back.
    PeerAborted {
        reason: String,
        /// Why it aborted, when it said.
        cause: Option<Cause>,
        c4: Option<proto::Cookie4>,
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
    /// Stop the transfer; `TransferStopped` follows once it has stopped.
    CancelTransfer,
    /// Switch the transfer to post-copy; `PostcopyStarted` follows.
    StartPostcopy,
    /// Post-copy paused: ask the destination to listen again; answered
    /// with `RecoverReplied`.
    SendRecover,
    /// Post-copy makes no progress (a dead link TCP has not given up on):
    /// break it off so that it pauses and can be recovered.
    PausePostcopy,
    /// Resume the paused post-copy transfer to `address`;
    /// `PostcopyResumed` follows.
    ResumePostcopy {
        address: String,
    },
    /// After a restart: follow the transfer the hypervisor still runs (a
    /// switched one: the destination pulls pages from here); progress and
    /// `TransferDone` follow as for `StartTransfer`.
    WatchTransfer,
    SendFinish(proto::Cookie3),
    SendAbort {
        reason: String,
    },
    SendResolve,
    SendHeartbeat,
    /// `GuestResumed` follows.
    ResumeGuest,
    /// `GuestKilled` follows.
    KillGuest,
    RunStage {
        feature: usize,
        stage: Stage,
    },
    /// Something failed that leaves work on this host (a release, a resume,
    /// a kill): it stays listed and is retried until it succeeds.
    RecordPending {
        work: PendingWork,
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
    /// The host the destination's incoming address must name (normalised,
    /// see [`super::address`]): its migration address in the inventory.
    /// Empty in attempts journaled before it existed, which no address
    /// matches.
    #[serde(default)]
    pub incoming_host: String,
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
    /// The operator's forced decision, if the attempt was forced.
    #[serde(default)]
    forced: Option<RunOn>,
    /// Ending because the destination said it aborted: should the transfer
    /// turn out to have completed, the destination is asked before the
    /// guest runs here again (a forged abort must not make two copies run).
    #[serde(default)]
    aborted_by_peer: bool,
    /// When the transfer was started (Perform), for the completion budget.
    #[serde(default)]
    transfer_started_at: Millis,
    /// The budget is spent and the policy said go on: said once.
    #[serde(default)]
    overrun_noted: bool,
    /// The transfer's newest progress samples; rebuilt from new ones after
    /// a restart.
    #[serde(skip)]
    convergence: Convergence,
    /// Remaining bytes over time, for the record.
    #[serde(default)]
    history: Vec<[u64; 2]>,
    /// The switch to post-copy was asked of the hypervisor: this copy may
    /// be stale from then on and never runs again on this side's word.
    #[serde(default)]
    switched: bool,
    /// After the switchover: the last page has gone (`Ok`) or the transfer
    /// failed, leaving the destination without the rest (`Err`).
    #[serde(default)]
    drained: Option<Result<(), String>>,
    /// The guest was lost: the outcome is `lost` whatever else happens.
    #[serde(default)]
    lost: bool,
    /// Post-copy paused by a broken link: the recovery in progress.
    #[serde(default)]
    recovery: Option<Recovery>,
    /// A post-copy that made no progress was asked to pause.
    #[serde(default)]
    pause_asked: bool,
}

/// Who is starting an attempt, and of what.
#[derive(Debug, Clone)]
pub struct AttemptParams {
    pub migration_id: String,
    pub attempt: u32,
    pub host: String,
    pub destination: String,
    /// The host the destination's incoming address must name, normalised
    /// ([`super::address::normal_host`]).
    pub incoming_host: String,
    pub vm: VmSpec,
    pub mode: Mode,
    pub completion: Completion,
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
            cause: None,
            guest: GuestCondition::Running,
            completion: params.completion,
            convergence: None,
            completion_note: None,
            recovery: None,
            repairs: Vec::new(),
        };
        let mut attempt = SourceAttempt {
            attempt_id,
            migration_id: params.migration_id,
            host: params.host,
            destination: params.destination,
            incoming_host: params.incoming_host,
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
            forced: None,
            aborted_by_peer: false,
            transfer_started_at: now,
            overrun_noted: false,
            convergence: Convergence::default(),
            history: Vec::new(),
            switched: false,
            drained: None,
            lost: false,
            recovery: None,
            pause_asked: false,
        };
        attempt.record.start_phase(Phase::Begin, now);
        attempt.record.end_phase(Phase::Begin, StepStatus::Ok, now);
        attempt.record.start_phase(Phase::Prepare, now);
        let mut c1 = cookies::cookie1(
            &attempt.attempt_id,
            &attempt.migration_id,
            &attempt.host,
            &attempt.vm,
            attempt.mode,
        );
        c1.postcopy = attempt.record.completion.postcopy != Postcopy::Never;
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

    /// The operator's forced decision, if any.
    pub fn forced(&self) -> Option<RunOn> {
        self.forced
    }

    /// The guest this attempt left paused is gone from the hypervisor.
    pub fn guest_gone(&mut self, now: Millis) {
        self.record.guest = GuestCondition::Unknown;
        self.record.updated_at_ms = now;
    }

    /// A resume that failed at the end of this attempt worked on a later
    /// try: the guest runs here again.
    pub fn guest_runs_again(&mut self, now: Millis) {
        if self.record.guest == GuestCondition::Paused {
            self.record.guest = GuestCondition::Running;
            if let Some(error) = &mut self.record.error {
                error.push_str(" (the guest was resumed later)");
            }
            self.record.updated_at_ms = now;
        }
    }

    /// Before the commit point, the operator (or a shutting-down agent) may
    /// abort; afterwards the refusal says why and what to do instead.
    pub fn abort(
        &mut self,
        now: Millis,
        reason: &str,
        cause: Cause,
    ) -> Result<Vec<SourceAction>, String> {
        match &self.state {
            SourceState::Preparing
            | SourceState::Transferring { .. }
            | SourceState::SwitchRequested { .. } => {
                self.record.blame(cause, Side::Source);
                Ok(self.end_before_commit(now, Outcome::Aborted, reason.to_string(), true))
            }
            SourceState::Switching => Err(format!(
                "cannot abort migration {} of {}: it is switching to post-copy, after which the guest runs on {} \
                 (the commit point). Migrate the VM back instead.",
                self.migration_id, self.vm.name, self.destination
            )),
            SourceState::Aborting { .. } => Ok(Vec::new()),
            SourceState::FinishSent | SourceState::Unresolved if self.switched => Err(format!(
                "cannot abort migration {} of {}: it switched to post-copy, so the guest runs on {} \
                 (the commit point). Migrate the VM back instead.",
                self.migration_id, self.vm.name, self.destination
            )),
            SourceState::FinishSent | SourceState::Unresolved => Err(format!(
                "cannot abort migration {} of {}: Finish was sent to {}, which may already have resumed the guest \
                 (the commit point). Migrate the VM back instead.",
                self.migration_id, self.vm.name, self.destination
            )),
            SourceState::Confirming {
                committed: true, ..
            } => Err(format!(
                "cannot abort migration {} of {}: {} committed and the guest runs there. Migrate the VM back instead.",
                self.migration_id, self.vm.name, self.destination
            )),
            SourceState::Confirming {
                committed: false, ..
            }
            | SourceState::Done => Err(format!(
                "migration {} of {} has already ended ({})",
                self.migration_id,
                self.vm.name,
                self.record.outcome.map(Outcome::as_str).unwrap_or("ending")
            )),
        }
    }

    /// The operator's forced decision for an unresolved attempt, or the
    /// declaration that a post-copy's guest is lost.
    pub fn force_resolve(
        &mut self,
        now: Millis,
        run_on: RunOn,
    ) -> Result<Vec<SourceAction>, String> {
        if run_on == RunOn::Nowhere {
            return self.declare_lost(now);
        }
        if self.state != SourceState::Unresolved {
            return Err(format!(
                "migration {} is not unresolved: only an attempt whose destination cannot answer Resolve can be forced",
                self.migration_id
            ));
        }
        let note = match run_on {
            RunOn::Source => format!("operator forced the guest to run on {}", self.host),
            RunOn::Destination | RunOn::Nowhere => {
                format!("operator forced the guest to run on {}", self.destination)
            }
        };
        self.forced = Some(run_on);
        self.record.blame(Cause::Operator, Side::Source);
        self.record.error = Some(format!(
            "{note}; {}'s own record of the attempt was never read",
            self.destination
        ));
        Ok(match run_on {
            RunOn::Source => {
                // Tell the destination first: it must drop its copy.
                let mut actions = vec![SourceAction::SendAbort { reason: note }];
                actions.extend(self.confirm_not_committed(now, None));
                actions
            }
            RunOn::Destination | RunOn::Nowhere => self.confirm_committed(now, None),
        })
    }

    /// The operator's word that a post-copy cannot be finished: its
    /// destination is gone for good (recovery would try forever), or it
    /// never ran the guest but the switch was asked here. The copy here is
    /// stale or partial and must never run: it is killed, the features
    /// released, the outcome `lost`.
    fn declare_lost(&mut self, now: Millis) -> Result<Vec<SourceAction>, String> {
        let pulling = self.switched
            && !matches!(self.drained, Some(Ok(())))
            && matches!(
                self.state,
                SourceState::FinishSent
                    | SourceState::Unresolved
                    | SourceState::Confirming {
                        committed: true,
                        step: ConfirmStep::Draining,
                    }
            );
        if !pulling {
            let why = if !self.switched {
                "it never switched to post-copy, so its source still holds the whole guest (use --run-on)"
            } else if matches!(self.drained, Some(Ok(()))) {
                "its last page has gone: the destination holds the whole guest"
            } else {
                "it is not waiting on its destination"
            };
            return Err(format!(
                "migration {} of {} cannot be declared lost: {why}",
                self.migration_id, self.vm.name
            ));
        }
        let last = self
            .recovery
            .as_ref()
            .and_then(|r| r.error.clone())
            .map(|e| format!(" (last recovery try: {e})"))
            .unwrap_or_default();
        self.recovery = None;
        self.show_recovery();
        self.forced = Some(RunOn::Nowhere);
        let actions = self.end_lost(
            now,
            format!(
                "LOST: declared lost by the operator: the post-copy transfer to {} could not be finished{last}; \
                 the stale copy on {} was killed",
                self.destination, self.host
            ),
        );
        self.record.blame(Cause::Operator, Side::Source);
        Ok(actions)
    }

    /// The next instant `handle(Timer)` has something to do.
    pub fn poll_timeout(&self) -> Option<Millis> {
        let state = self.state_timeout();
        let recovery = self
            .recovery
            .as_ref()
            .filter(|r| !r.in_flight && self.transfer_runs())
            .map(|r| r.due)
            .or_else(|| self.postcopy_stall_due());
        match (state, recovery) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// When a post-copy that stopped moving is to be broken off: the link
    /// may be dead without TCP having said so, and only a paused transfer
    /// can be recovered.
    fn postcopy_stall_due(&self) -> Option<Millis> {
        (self.switched
            && self.transfer_runs()
            && self.recovery.is_none()
            && !self.pause_asked
            && self.state != SourceState::Switching)
            .then(|| self.last_progress_at + self.timing.stall_timeout_ms)
    }

    fn state_timeout(&self) -> Option<Millis> {
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
            SourceState::Preparing
            | SourceState::FinishSent
            | SourceState::SwitchRequested { .. } => Some(liveness()),
            SourceState::Transferring { .. } => Some(
                liveness()
                    .min(self.last_progress_at + self.timing.stall_timeout_ms)
                    .min(self.budget_due()),
            ),
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
                    self.observe(stats);
                    return self.apply_policy(now);
                }
                if self.transfer_runs() {
                    // Pre-copy while the destination gets ready, then the
                    // pages still to pull after the switchover.
                    self.record.transfer = Some(stats);
                    self.record.updated_at_ms = now;
                    if !self.switched {
                        self.observe(stats);
                    } else {
                        if stats.bytes_transferred != self.last_progress_bytes {
                            self.last_progress_bytes = stats.bytes_transferred;
                            self.last_progress_at = now;
                            self.pause_asked = false;
                        }
                        self.watch_postcopy(now, stats.stage);
                    }
                }
                Vec::new()
            }
            SourceInput::TransferDone(result) => self.on_transfer_done(now, result),
            SourceInput::PostcopyStarted(result) => self.on_postcopy_started(now, result),
            SourceInput::RecoverReplied(reply) => self.on_recover_replied(now, reply),
            SourceInput::PostcopyResumed(result) => self.on_postcopy_resumed(now, result),
            SourceInput::TransferStopped { completed } => match self.state {
                SourceState::Aborting {
                    step: AbortStep::Cancelling,
                    ..
                } if completed && self.aborted_by_peer => self.become_unresolved(
                    now,
                    format!(
                        "{} said it aborted the attempt, but the transfer had already completed: \
                         asking it whether it committed before the guest runs here again",
                        self.destination
                    ),
                ),
                SourceState::Aborting {
                    outcome,
                    step: AbortStep::Cancelling,
                } => {
                    self.state = SourceState::Aborting {
                        outcome,
                        step: AbortStep::Resuming,
                    };
                    vec![SourceAction::ResumeGuest]
                }
                _ => Vec::new(),
            },
            SourceInput::FinishReplied(reply) => self.on_finish_replied(now, reply),
            SourceInput::ResolveReplied(reply) => self.on_resolve_replied(now, reply),
            SourceInput::HeartbeatReplied(reply) => self.on_heartbeat_replied(now, reply),
            SourceInput::AbortReplied(reply) => self.on_abort_replied(now, reply),
            SourceInput::GuestResumed(result) => self.on_guest_resumed(now, result),
            SourceInput::GuestKilled(result) => self.on_guest_killed(now, result),
            SourceInput::StageDone {
                feature,
                stage,
                result,
            } => self.on_stage_done(now, feature, stage, result),
            SourceInput::StageTimedOut {
                feature,
                stage,
                after_ms,
            } => {
                if self.expects_release(feature, stage)
                    && let Some(record) = self.record.features.get_mut(feature)
                {
                    record.uncertain = true;
                }
                let result = Err(format!(
                    "did not answer within {after_ms} ms; its effect is unknown"
                ));
                self.on_stage_done(now, feature, stage, result)
            }
            SourceInput::PeerAborted { reason, cause, c4 } => {
                self.on_peer_aborted(now, reason, cause, c4)
            }
            SourceInput::Timer => self.on_timer(now),
        }
    }

    fn on_peer_aborted(
        &mut self,
        now: Millis,
        reason: String,
        cause: Option<Cause>,
        c4: Option<proto::Cookie4>,
    ) -> Vec<SourceAction> {
        match self.state {
            SourceState::Preparing | SourceState::Transferring { .. } => {
                if let Some(c4) = &c4 {
                    self.apply_peer_rollback(c4);
                }
                self.aborted_by_peer = true;
                self.record
                    .blame(cause.unwrap_or(Cause::PeerLost), Side::Destination);
                self.end_before_commit(
                    now,
                    Outcome::Failed,
                    format!("{} aborted the attempt: {reason}", self.destination),
                    false,
                )
            }
            // After Finish was sent only the destination's durable "never
            // commits" lets the guest resume here: its abort carries it as C4.
            SourceState::FinishSent | SourceState::Unresolved => match c4 {
                Some(c4) if c4.attempt_id == self.attempt_id && !c4.committed && !c4.lost => {
                    self.last_peer_contact = now;
                    self.apply_cookie4(now, c4)
                }
                _ => Vec::new(),
            },
            _ => {
                if let Some(c4) = &c4 {
                    self.apply_peer_rollback(c4);
                    return vec![self.journal()];
                }
                Vec::new()
            }
        }
    }

    /// Feed a progress sample to the convergence model and show its outlook.
    fn observe(&mut self, stats: TransferStats) {
        self.convergence.observe(stats);
        let limit = match self.record.completion.downtime_limit_ms {
            0 => DEFAULT_DOWNTIME_LIMIT_MS,
            ms => ms,
        };
        record_remaining(&mut self.history, stats.elapsed_ms, stats.bytes_remaining);
        if let Some(o) = self.convergence.outlook(limit) {
            self.record.convergence = Some(ConvergenceView {
                verdict: o.verdict,
                eta_ms: o.eta_ms,
                reason: o.reason,
                remaining: self.history.clone(),
            });
        } else if let Some(view) = &mut self.record.convergence {
            view.remaining = self.history.clone();
        }
    }

    /// When the completion budget is spent, if the policy still has to act
    /// on it then.
    fn budget_due(&self) -> Millis {
        let policy = &self.record.completion;
        match policy.budget_ms(self.vm.memory_mib) {
            Some(budget) if !self.overrun_noted => self.transfer_started_at.saturating_add(budget),
            _ => Millis::MAX,
        }
    }

    /// What the completion policy says of the transfer now.
    fn apply_policy(&mut self, now: Millis) -> Vec<SourceAction> {
        let outlook = self
            .convergence
            .outlook(match self.record.completion.downtime_limit_ms {
                0 => DEFAULT_DOWNTIME_LIMIT_MS,
                ms => ms,
            });
        let step = completion::judge(
            &self.record.completion,
            self.vm.memory_mib,
            now.saturating_sub(self.transfer_started_at),
            outlook.as_ref(),
            self.overrun_noted,
        );
        match step {
            Step::Keep => Vec::new(),
            Step::Overrun(note) => {
                self.overrun_noted = true;
                self.record.completion_note = Some(note);
                self.record.updated_at_ms = now;
                vec![self.journal()]
            }
            Step::GiveUp(why) => {
                self.record.blame(Cause::Stall, Side::Source);
                self.end_before_commit(now, Outcome::Failed, why, true)
            }
            Step::Switch(why) => self.request_switchover(now, why),
        }
    }

    /// Whether the transfer this attempt started still runs (as far as
    /// this side knows): in pre-copy before the commit point, or, after a
    /// switchover, until the last page has gone.
    pub fn transfer_runs(&self) -> bool {
        match self.state {
            SourceState::Transferring { .. }
            | SourceState::SwitchRequested { .. }
            | SourceState::Switching => true,
            SourceState::FinishSent
            | SourceState::Unresolved
            | SourceState::Confirming {
                committed: true,
                step: ConfirmStep::Draining,
            } => self.switched && self.drained.is_none(),
            _ => false,
        }
    }

    /// Post-copy: before the switchover every blocking finish stage must
    /// succeed on the destination, so C3 asks for them now, while pre-copy
    /// goes on. Until the destination is ready this is still before the
    /// commit point: any failure ends with the guest running here.
    fn request_switchover(&mut self, now: Millis, why: String) -> Vec<SourceAction> {
        let SourceState::Transferring { address } = &self.state else {
            return Vec::new();
        };
        let address = address.clone();
        let after = now.saturating_sub(self.transfer_started_at);
        self.record.completion_note = Some(format!(
            "post-copy after {:.1} s: {why}",
            after as f64 / 1000.0
        ));
        self.record.end_phase(Phase::Perform, StepStatus::Ok, now);
        self.record.start_phase(Phase::Finish, now);
        self.state = SourceState::SwitchRequested { address };
        self.last_peer_contact = now;
        let c3 = self.cookie3(proto::TransferStatus::SwitchoverRequested);
        self.record.cookies.push(cookies::describe(&c3));
        vec![self.journal(), SourceAction::SendFinish(c3)]
    }

    fn cookie3(&self, status: proto::TransferStatus) -> proto::Cookie3 {
        proto::Cookie3 {
            protocol_version: PROTOCOL_VERSION,
            attempt_id: self.attempt_id.clone(),
            status: status as i32,
            stats: Some(super::record::stats_to_proto(
                &self.record.transfer.unwrap_or_default(),
            )),
        }
    }

    /// The destination answered the request for a switchover.
    fn on_switchover_answer(
        &mut self,
        now: Millis,
        reply: Result<proto::Cookie4, PeerError>,
    ) -> Vec<SourceAction> {
        self.last_peer_contact = now;
        let c4 = match reply {
            Ok(c4) if c4.attempt_id == self.attempt_id => c4,
            Ok(c4) => {
                self.record.blame(Cause::Refused, Side::Destination);
                let error = format!(
                    "{} answered the switchover for attempt {:?}, not {}",
                    self.destination, c4.attempt_id, self.attempt_id
                );
                return self.end_before_commit(now, Outcome::Failed, error, true);
            }
            Err(e) => {
                self.record.blame(Cause::PeerLost, Side::Destination);
                let error = format!(
                    "no answer from {} before the switchover to post-copy: {}",
                    self.destination,
                    e.message()
                );
                return self.end_before_commit(now, Outcome::Failed, error, true);
            }
        };
        if c4.committed || c4.lost {
            // Pre-copy completed meanwhile and the destination decided.
            return self.apply_cookie4(now, c4);
        }
        self.record.cookies.push(cookies::describe(&c4));
        self.apply_stage_results(Stage::Finish, &c4.finish);
        self.apply_stage_results(Stage::Rollback, &c4.rollback);
        if !c4.ready_for_switchover {
            // A blocking finish stage failed there (it rolled back): the
            // guest never left; it runs here again.
            let error = if c4.error.is_empty() {
                format!("{} is not ready for the switchover", self.destination)
            } else {
                c4.error
            };
            self.record.blame(Cause::Feature, Side::Destination);
            return self.end_before_commit(now, Outcome::Failed, error, false);
        }
        // Journaled before the hypervisor is asked: from the switchover on
        // this copy must never run again.
        self.state = SourceState::Switching;
        self.switched = true;
        self.record.updated_at_ms = now;
        vec![self.journal(), SourceAction::StartPostcopy]
    }

    /// After the switchover: a transfer paused by a broken link is
    /// recovered, with backoff, until it runs again.
    fn watch_postcopy(&mut self, now: Millis, stage: TransferStage) {
        match (stage, &mut self.recovery) {
            (TransferStage::PostcopyPaused, None) => {
                self.recovery = Some(Recovery {
                    due: now,
                    ..Recovery::default()
                });
            }
            (TransferStage::Postcopy, Some(r)) if !r.in_flight => {
                if r.tries > 0 {
                    self.record.completion_note = Some(format!(
                        "post-copy was paused by a broken link and recovered after {} {}",
                        r.tries,
                        if r.tries == 1 { "try" } else { "tries" }
                    ));
                }
                self.recovery = None;
            }
            _ => {}
        }
        self.show_recovery();
    }

    fn show_recovery(&mut self) {
        // Tries whose outcome is known; one in flight is "try tries + 1".
        self.record.recovery = self.recovery.as_ref().map(|r| RecoveryView {
            tries: r.tries.saturating_sub(u32::from(r.in_flight)),
            error: r.error.clone(),
            next_at_ms: r.due,
        });
    }

    fn recovery_failed(&mut self, now: Millis, error: String) -> Vec<SourceAction> {
        if let Some(r) = &mut self.recovery {
            r.in_flight = false;
            let backoff = RECOVERY_BACKOFF_MS
                .saturating_mul(1 << r.tries.min(8))
                .min(RECOVERY_BACKOFF_MAX_MS);
            r.due = now + backoff;
            r.error = Some(error);
        }
        self.show_recovery();
        self.record.updated_at_ms = now;
        Vec::new()
    }

    fn on_recover_replied(
        &mut self,
        now: Millis,
        reply: Result<RecoverAnswer, PeerError>,
    ) -> Vec<SourceAction> {
        if !self.recovery.as_ref().is_some_and(|r| r.in_flight) || !self.transfer_runs() {
            return Vec::new();
        }
        match reply {
            Ok(answer) if answer.lost => {
                self.recovery = None;
                self.show_recovery();
                let error = format!(
                    "LOST: post-copy to {} broke and the guest is gone there: {}",
                    self.destination, answer.detail
                );
                self.end_lost(now, error)
            }
            Ok(answer) => {
                // The rest of the guest's memory goes only to the
                // destination's own migration address, as in Prepare.
                if let Err(error) =
                    check_incoming(&answer.address, &self.destination, &self.incoming_host)
                    && !planted(Mutation::AcceptAnyIncomingAddress)
                {
                    return self.recovery_failed(now, error);
                }
                vec![SourceAction::ResumePostcopy {
                    address: answer.address,
                }]
            }
            Err(e) => self.recovery_failed(
                now,
                format!("{} did not recover: {}", self.destination, e.message()),
            ),
        }
    }

    fn on_postcopy_resumed(&mut self, now: Millis, result: GuestOpResult) -> Vec<SourceAction> {
        if !self.recovery.as_ref().is_some_and(|r| r.in_flight) {
            return Vec::new();
        }
        match result {
            // Taken: the progress says when it runs again; if it pauses
            // again, the next try comes after the backoff.
            Ok(()) => self.recovery_failed(now, "resumed; waiting for the transfer to run".into()),
            Err(e) => self.recovery_failed(now, format!("the resume failed: {}", e.message())),
        }
    }

    /// The operator's "try now": the next recovery try is due at once.
    pub fn recover_now(&mut self, now: Millis) -> bool {
        match &mut self.recovery {
            Some(r) if !r.in_flight => {
                r.due = now;
                self.show_recovery();
                true
            }
            _ => false,
        }
    }

    fn on_postcopy_started(&mut self, now: Millis, result: GuestOpResult) -> Vec<SourceAction> {
        if self.state != SourceState::Switching {
            return Vec::new();
        }
        // A transfer that completed meanwhile has the whole guest at the
        // destination, whatever the switch says: ask for the commit.
        let completed = matches!(self.drained, Some(Ok(())));
        let result = match result {
            Ok(()) if planted(Mutation::ResumeAfterSwitchover) => {
                Err(GuestOpError::Failed("planted".into()))
            }
            other => other,
        };
        match result {
            _ if completed => {
                self.state = SourceState::FinishSent;
                self.last_peer_contact = now;
                let c3 = self.cookie3(proto::TransferStatus::Completed);
                self.record.cookies.push(cookies::describe(&c3));
                vec![self.journal(), SourceAction::SendFinish(c3)]
            }
            Ok(()) => {
                self.state = SourceState::FinishSent;
                self.last_peer_contact = now;
                self.last_progress_at = now;
                let c3 = self.cookie3(proto::TransferStatus::SwitchedOver);
                self.record.cookies.push(cookies::describe(&c3));
                vec![self.journal(), SourceAction::SendFinish(c3)]
            }
            // It did not switch: the guest still runs here, the destination
            // is told to drop what it holds.
            Err(GuestOpError::Failed(e)) => {
                self.switched = false;
                self.record.blame(Cause::Transfer, Side::Source);
                self.end_before_commit(
                    now,
                    Outcome::Failed,
                    format!("could not switch to post-copy: {e}"),
                    true,
                )
            }
            // Whether it switched is unknown: only the destination can say
            // whether the guest reached it.
            Err(e) => {
                self.record.blame(Cause::Hypervisor, Side::Source);
                self.become_unresolved(
                    now,
                    format!("switching to post-copy did not answer: {}", e.message()),
                )
            }
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
                let (cause, error) = match &e {
                    PeerError::Refused(why) => (
                        Cause::Refused,
                        format!("{} refused Prepare: {why}", self.destination),
                    ),
                    PeerError::Busy(why) => (
                        Cause::DestinationBusy,
                        format!("{} refused Prepare: {why}", self.destination),
                    ),
                    PeerError::Full(why) => (
                        Cause::Capacity,
                        format!("{} refused Prepare: {why}", self.destination),
                    ),
                    PeerError::Unreachable(why) => (
                        Cause::PeerLost,
                        format!("no answer to Prepare from {}: {why}", self.destination),
                    ),
                };
                self.record.blame(cause, Side::Destination);
                return self.end_before_commit(now, Outcome::Failed, error, tell);
            }
        };
        if c2.attempt_id != self.attempt_id {
            self.record.blame(Cause::Refused, Side::Destination);
            let error = format!(
                "{} answered Prepare for attempt {:?}, not {}",
                self.destination, c2.attempt_id, self.attempt_id
            );
            return self.end_before_commit(now, Outcome::Failed, error, true);
        }
        self.record.cookies.push(cookies::describe(&c2));
        self.apply_stage_results(Stage::Prepare, &c2.prepare);
        self.apply_stage_results(Stage::Rollback, &c2.rollback);
        if !c2.accepted {
            let error = if c2.error.is_empty() {
                format!("{} did not prepare", self.destination)
            } else {
                c2.error
            };
            let feature_failed = self
                .record
                .features
                .iter()
                .any(|f| f.prepare == StepStatus::Failed);
            let kind = if feature_failed {
                Cause::Feature
            } else {
                Cause::Hypervisor
            };
            self.record.blame(kind, Side::Destination);
            return self.end_before_commit(now, Outcome::Failed, error, false);
        }
        // The guest's memory goes only to the destination's own migration
        // address: a forged or confused C2 is refused before anything is
        // sent, and the destination is told to drop what it prepared.
        if let Err(error) =
            check_incoming(&c2.incoming_address, &self.destination, &self.incoming_host)
            && !planted(Mutation::AcceptAnyIncomingAddress)
        {
            self.record.blame(Cause::Refused, Side::Destination);
            return self.end_before_commit(now, Outcome::Failed, error, true);
        }
        if self.record.completion.postcopy != Postcopy::Never && !c2.postcopy {
            // The destination cannot take a switchover: pre-copy alone,
            // under the same budget.
            let why = if c2.postcopy_unavailable.is_empty() {
                "it did not say why".to_string()
            } else {
                c2.postcopy_unavailable.clone()
            };
            self.record.completion_note = Some(format!(
                "post-copy is not available on {} ({why}): pre-copy only",
                self.destination
            ));
            self.record.completion.postcopy = Postcopy::Never;
        }
        self.record.end_phase(Phase::Prepare, StepStatus::Ok, now);
        self.record.start_phase(Phase::Perform, now);
        self.last_progress_at = now;
        self.transfer_started_at = now;
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
        if let Ok(stats) = &result
            && self.transfer_runs()
        {
            self.record.transfer = Some(*stats);
        }
        match self.state {
            SourceState::Transferring { .. } => {}
            // Pre-copy completed while the destination got ready: the guest
            // is paused here, and the destination commits on its own once
            // it sees the whole guest. From here it may commit at any moment.
            SourceState::SwitchRequested { .. } => {
                return match result {
                    Ok(_) => {
                        self.state = SourceState::FinishSent;
                        self.last_peer_contact = now;
                        vec![self.journal()]
                    }
                    Err(e) => {
                        self.record.blame(Cause::Transfer, Side::Source);
                        self.end_before_commit(
                            now,
                            Outcome::Failed,
                            format!("transfer failed: {e}"),
                            true,
                        )
                    }
                };
            }
            _ if self.switched && self.drained.is_none() => {
                self.drained = Some(result.map(|_| ()));
                // Nothing is left to recover; a late answer changes nothing.
                self.recovery = None;
                self.show_recovery();
                self.record.updated_at_ms = now;
                if self.state
                    == (SourceState::Confirming {
                        committed: true,
                        step: ConfirmStep::Draining,
                    })
                {
                    return self.after_drain(now);
                }
                return vec![self.journal()];
            }
            _ => return Vec::new(),
        }
        match result {
            Err(e) => {
                self.record.blame(Cause::Transfer, Side::Source);
                self.end_before_commit(now, Outcome::Failed, format!("transfer failed: {e}"), true)
            }
            Ok(stats) => {
                // The guest is paused here now. From the moment C3 leaves, the
                // destination may commit: journal that first.
                self.record.transfer = Some(stats);
                self.record.end_phase(Phase::Perform, StepStatus::Ok, now);
                self.record.start_phase(Phase::Finish, now);
                self.state = SourceState::FinishSent;
                self.last_peer_contact = now;
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
        if matches!(self.state, SourceState::SwitchRequested { .. }) {
            return self.on_switchover_answer(now, reply);
        }
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
            Ok(Resolution::Committed(c4))
            | Ok(Resolution::NotCommitted(c4))
            | Ok(Resolution::Lost(c4)) => self.apply_cookie4(now, c4),
            Ok(Resolution::Pending) | Err(_) => {
                self.back_off_resolve(now);
                Vec::new()
            }
        }
    }

    fn back_off_resolve(&mut self, now: Millis) {
        self.resolve_due = now + self.resolve_backoff;
        self.resolve_backoff = (self.resolve_backoff * 2).min(self.timing.resolve_backoff_max_ms);
    }

    fn apply_cookie4(&mut self, now: Millis, c4: proto::Cookie4) -> Vec<SourceAction> {
        // An answer about another attempt decides nothing about this one.
        if c4.attempt_id != self.attempt_id {
            return match self.state {
                SourceState::FinishSent => self.become_unresolved(
                    now,
                    format!(
                        "{} answered Finish for attempt {:?}, not {}",
                        self.destination, c4.attempt_id, self.attempt_id
                    ),
                ),
                _ => {
                    self.back_off_resolve(now);
                    Vec::new()
                }
            };
        }
        if c4.lost && self.switched {
            // After the switchover our copy is stale for sure: the guest is
            // lost, and nobody needs to decide anything.
            let error = format!(
                "LOST: {} committed in post-copy, then lost the guest: {}",
                self.destination,
                if c4.error.is_empty() {
                    "no reason given"
                } else {
                    &c4.error
                }
            );
            return self.end_lost(now, error);
        }
        if c4.lost {
            // Committed there, but its guest is gone and may have run: our
            // copy may be stale. Neither side decides alone any more.
            let error = format!(
                "{} committed but lost the guest: {}",
                self.destination,
                if c4.error.is_empty() {
                    "no reason given"
                } else {
                    &c4.error
                }
            );
            let first = self.record.guest != GuestCondition::Unknown;
            self.record.guest = GuestCondition::Unknown;
            if self.state == SourceState::FinishSent {
                return self.become_unresolved(now, error);
            }
            self.record.error = Some(format!(
                "{error}. The guest stays paused on {}; only an operator can decide (tern resolve).",
                self.host
            ));
            self.back_off_resolve(now);
            return if first {
                vec![self.journal()]
            } else {
                Vec::new()
            };
        }
        if c4.ready_for_switchover && !c4.committed {
            // Ready for a switchover that was not needed: pre-copy completed
            // meanwhile. Ask again for its decision.
            self.apply_stage_results(Stage::Finish, &c4.finish);
            return match self.state {
                SourceState::FinishSent => {
                    let c3 = self.cookie3(proto::TransferStatus::Completed);
                    self.record.cookies.push(cookies::describe(&c3));
                    vec![SourceAction::SendFinish(c3)]
                }
                _ => {
                    self.back_off_resolve(now);
                    Vec::new()
                }
            };
        }
        self.record.cookies.push(cookies::describe(&c4));
        self.apply_stage_results(Stage::Finish, &c4.finish);
        self.apply_stage_results(Stage::Rollback, &c4.rollback);
        if !planted(Mutation::IgnoreVerification) {
            self.apply_stage_results(Stage::Verify, &c4.verify);
        }
        if c4.committed {
            self.record.error = None;
            self.record.cause = None;
            self.confirm_committed(now, None)
        } else {
            let error = if c4.error.is_empty() {
                format!("{} did not commit", self.destination)
            } else {
                c4.error
            };
            if self.switched {
                // The destination never ran the guest, but the switch to
                // post-copy was asked here: this copy may no longer be
                // whole, and never runs again on this side's word.
                let first = self.record.guest != GuestCondition::Unknown;
                self.record.guest = GuestCondition::Unknown;
                self.record.error = Some(format!(
                    "{error}. The switch to post-copy was asked of the hypervisor here, so the guest's copy on {} \
                     stays paused: only an operator can decide (tern resolve {} --run-on source tries to resume it; \
                     the hypervisor refuses if the switch happened).",
                    self.host, self.migration_id
                ));
                if self.state == SourceState::FinishSent {
                    self.state = SourceState::Unresolved;
                    self.record.outcome = Some(Outcome::Unresolved);
                }
                if self.record.cause.is_none() {
                    self.record.blame(Cause::Hypervisor, Side::Source);
                }
                self.back_off_resolve(now);
                return if first {
                    vec![self.journal()]
                } else {
                    Vec::new()
                };
            }
            if self
                .record
                .features
                .iter()
                .any(|f| f.finish == StepStatus::Failed && is_blocking(self.mode, f.required))
            {
                self.record.blame(Cause::Feature, Side::Destination);
            } else if self.record.cause.is_none() {
                // Not a feature: its hypervisor could not start the guest.
                self.record.blame(Cause::Hypervisor, Side::Destination);
            }
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
                // Waiting for the answer to a switchover request the
                // destination may already have rolled back (its C4 says
                // so): only that answer, or silence, decides.
                if !known && matches!(self.state, SourceState::Transferring { .. }) {
                    let error = format!(
                        "{} no longer knows this attempt (it aborted it)",
                        self.destination
                    );
                    self.record.blame(Cause::PeerLost, Side::Destination);
                    return self.end_before_commit(now, Outcome::Failed, error, false);
                }
                Vec::new()
            }
            Err(_) => Vec::new(),
        }
    }

    /// The destination answered the Abort this side sent.
    fn on_abort_replied(
        &mut self,
        now: Millis,
        reply: Result<AbortAnswer, PeerError>,
    ) -> Vec<SourceAction> {
        let answer = match reply {
            Ok(answer) => answer,
            // A forced decision the destination has not heard of: it may
            // still hold a copy it thinks it runs. Keep telling it.
            Err(e) if self.forced == Some(RunOn::Source) && !self.record.committed => {
                return vec![SourceAction::RecordPending {
                    work: PendingWork::Notify,
                    error: e.message().to_string(),
                }];
            }
            Err(_) => return Vec::new(),
        };
        if answer.committed && self.forced == Some(RunOn::Source) && !self.record.committed {
            // The operator forced the guest back here, but the destination had
            // committed: the guest now runs on both hosts. Stop ours at once
            // and say so, in red, with what to check.
            let ran_here = self.host.clone();
            let error = format!(
                "WRONG FORCED DECISION: {} had committed attempt {} ({}), so the guest ran on both {} and {}; \
                 the copy on {ran_here} was killed at once. Check the guest's disks for writes made from {ran_here}.",
                self.destination, self.attempt_id, answer.detail, self.host, self.destination
            );
            self.record.blame(Cause::Operator, Side::Source);
            return self.confirm_committed(now, Some(error));
        }
        if let Some(c4) = &answer.c4 {
            self.apply_peer_rollback(c4);
            return vec![self.journal()];
        }
        Vec::new()
    }

    fn on_guest_resumed(&mut self, now: Millis, result: GuestOpResult) -> Vec<SourceAction> {
        let outcome = match self.state {
            SourceState::Aborting {
                outcome,
                step: AbortStep::Resuming,
            } => outcome,
            SourceState::Confirming {
                committed: false,
                step: ConfirmStep::Guest,
            } => Outcome::Failed,
            _ => return Vec::new(),
        };
        let mut actions = Vec::new();
        if let Err(GuestOpError::Gone(e)) = &result {
            // Nothing to resume: the guest died (its host lost power, or
            // its QEMU exited). The record says so; no retry can help.
            self.record.guest = GuestCondition::Unknown;
            if self.record.cause.is_none() {
                self.record.blame(Cause::Hypervisor, Side::Source);
            }
            let what = format!("{} is gone from {}: {e}", self.vm.name, self.host);
            self.record.error = Some(match self.record.error.take() {
                Some(before) => format!("{before}; {what}"),
                None => what,
            });
        } else if let Err(e) = &result {
            self.record.guest = GuestCondition::Paused;
            if self.record.cause.is_none() {
                self.record.blame(Cause::Hypervisor, Side::Source);
            }
            let what = format!(
                "could not resume {} on {}: {e}. The guest is paused there; the resume is retried (tern rollback {} runs it now)",
                self.vm.name, self.host, self.migration_id
            );
            self.record.error = Some(match self.record.error.take() {
                Some(before) => format!("{before}; {what}"),
                None => what,
            });
            actions.push(SourceAction::RecordPending {
                work: PendingWork::Resume,
                error: e.message().to_string(),
            });
        }
        if result.is_ok() {
            // Running here again (a forced decision resumes a copy whose
            // state was unknown).
            self.record.guest = GuestCondition::Running;
        }
        self.record.updated_at_ms = now;
        self.state = SourceState::Done;
        actions.push(self.journal());
        actions.push(SourceAction::Finished(outcome));
        actions
    }

    fn on_guest_killed(&mut self, now: Millis, result: GuestOpResult) -> Vec<SourceAction> {
        if self.state
            != (SourceState::Confirming {
                committed: true,
                step: ConfirmStep::Guest,
            })
        {
            return Vec::new();
        }
        let mut actions = Vec::new();
        // A copy that is gone is as good as killed.
        if let Err(e) = result.filter_gone() {
            // The stale copy stays here, paused: the move still happened,
            // but the record must not say all is well.
            let what = format!(
                "could not kill the old copy of {} on {}: {e}; it is paused and listed as pending",
                self.vm.name, self.host
            );
            if self.record.cause.is_none() {
                self.record.blame(Cause::Hypervisor, Side::Source);
            }
            self.record.error = Some(match self.record.error.take() {
                Some(before) => format!("{before}; {what}"),
                None => what,
            });
            actions.push(SourceAction::RecordPending {
                work: PendingWork::Kill,
                error: e.message().to_string(),
            });
        }
        self.state = SourceState::Confirming {
            committed: true,
            step: ConfirmStep::Releasing,
        };
        actions.extend(self.next_release(now));
        actions
    }

    fn expects_release(&self, feature: usize, stage: Stage) -> bool {
        self.state
            == SourceState::Confirming {
                committed: true,
                step: ConfirmStep::Releasing,
            }
            && stage == Stage::Release
            && feature == self.release_next
    }

    fn on_stage_done(
        &mut self,
        now: Millis,
        feature: usize,
        stage: Stage,
        result: StageOutcome,
    ) -> Vec<SourceAction> {
        if !self.expects_release(feature, stage) {
            return Vec::new();
        }
        let mut actions = Vec::new();
        if let Some(record) = self.record.features.get_mut(feature) {
            record.record(Stage::Release, &result);
        }
        if let Err(error) = result {
            actions.push(SourceAction::RecordPending {
                work: PendingWork::Stage {
                    feature,
                    stage: Stage::Release,
                },
                error,
            });
        }
        self.release_next += 1;
        actions.extend(self.next_release(now));
        actions
    }

    fn on_timer(&mut self, now: Millis) -> Vec<SourceAction> {
        let mut actions = Vec::new();
        if self.postcopy_stall_due().is_some_and(|due| now >= due) {
            self.pause_asked = true;
            actions.push(SourceAction::PausePostcopy);
        }
        let runs = self.transfer_runs();
        if let Some(r) = &mut self.recovery
            && runs
            && !r.in_flight
            && now >= r.due
        {
            r.in_flight = true;
            r.tries += 1;
            self.show_recovery();
            actions.push(SourceAction::SendRecover);
        }
        match self.state {
            SourceState::Preparing
            | SourceState::Transferring { .. }
            | SourceState::SwitchRequested { .. }
            | SourceState::FinishSent => {
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
                        self.record.blame(Cause::PeerLost, Side::Destination);
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
                    self.record.blame(Cause::Stall, Side::Source);
                    return self.end_before_commit(now, Outcome::Failed, error, true);
                }
                if matches!(self.state, SourceState::Transferring { .. })
                    && now >= self.budget_due()
                {
                    let acted = self.apply_policy(now);
                    if !acted.is_empty() {
                        return acted;
                    }
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

    /// Every way an attempt ends before the commit point: the peer is told at
    /// once, the transfer stopped, and the attempt ends once the guest runs
    /// here again (or its resume failed, which the record then says).
    fn end_before_commit(
        &mut self,
        now: Millis,
        outcome: Outcome,
        error: String,
        tell_peer: bool,
    ) -> Vec<SourceAction> {
        let transferring = matches!(
            self.state,
            SourceState::Transferring { .. }
                | SourceState::SwitchRequested { .. }
                | SourceState::Switching
        );
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
        let step = if transferring {
            AbortStep::Cancelling
        } else {
            AbortStep::Resuming
        };
        self.state = SourceState::Aborting { outcome, step };
        let mut actions = vec![self.journal()];
        if tell_peer {
            actions.push(SourceAction::SendAbort { reason: error });
        }
        actions.push(if transferring {
            SourceAction::CancelTransfer
        } else {
            SourceAction::ResumeGuest
        });
        actions
    }

    fn become_unresolved(&mut self, now: Millis, error: String) -> Vec<SourceAction> {
        if self.state == SourceState::Unresolved {
            return Vec::new();
        }
        self.state = SourceState::Unresolved;
        self.record.outcome = Some(Outcome::Unresolved);
        if self.record.cause.is_none() {
            // Only the destination can say whether it committed, and it
            // has not.
            self.record.blame(Cause::PeerLost, Side::Destination);
        }
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
        self.record.outcome = None;
        self.record.guest = GuestCondition::Running;
        if self.record.phase(Phase::Finish).status == StepStatus::Running {
            self.record.end_phase(Phase::Finish, StepStatus::Ok, now);
        }
        self.record.start_phase(Phase::Confirm, now);
        self.record.running_on = self.destination.clone();
        if error.is_some() {
            self.record.error = error;
        }
        self.release_next = 0;
        if self.switched && self.drained.is_none() {
            // The destination still pulls pages from this copy.
            self.state = SourceState::Confirming {
                committed: true,
                step: ConfirmStep::Draining,
            };
            return vec![self.journal()];
        }
        if self.switched {
            return self.after_drain(now);
        }
        self.state = SourceState::Confirming {
            committed: true,
            step: ConfirmStep::Guest,
        };
        vec![self.journal(), SourceAction::KillGuest]
    }

    /// Post-copy, committed, the transfer over: kill this copy and release,
    /// or, if the transfer failed, the destination cannot get the rest of
    /// the guest's memory: it is lost.
    fn after_drain(&mut self, now: Millis) -> Vec<SourceAction> {
        if let Some(Err(e)) = self.drained.clone() {
            let actions = self.end_lost(
                now,
                format!(
                    "LOST: the post-copy transfer to {} failed after the switchover ({e}): \
                     the guest there cannot get the rest of its memory",
                    self.destination
                ),
            );
            self.record.blame(Cause::Transfer, Side::Source);
            return actions;
        }
        self.state = SourceState::Confirming {
            committed: true,
            step: ConfirmStep::Guest,
        };
        vec![self.journal(), SourceAction::KillGuest]
    }

    /// The guest is lost: no host holds all of it. The stale copy here is
    /// killed (it must never run) and the features released; the outcome
    /// stays `lost`.
    fn end_lost(&mut self, now: Millis, error: String) -> Vec<SourceAction> {
        self.lost = true;
        self.record.committed = true;
        self.record.guest = GuestCondition::Unknown;
        self.record.running_on = self.destination.clone();
        self.record.error = Some(error);
        self.record.blame(Cause::Hypervisor, Side::Destination);
        for phase in [Phase::Perform, Phase::Finish] {
            if self.record.phase(phase).status == StepStatus::Running {
                self.record.end_phase(phase, StepStatus::Failed, now);
            }
        }
        if self.record.phase(Phase::Confirm).status == StepStatus::Pending {
            self.record.start_phase(Phase::Confirm, now);
        }
        self.release_next = 0;
        self.state = SourceState::Confirming {
            committed: true,
            step: ConfirmStep::Guest,
        };
        vec![self.journal(), SourceAction::KillGuest]
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
        let degraded = self.record.has_failed_feature_stage() || self.record.error.is_some();
        let outcome = if self.lost {
            Outcome::Lost
        } else if degraded {
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
        self.record.start_phase(Phase::Confirm, now);
        self.record.end_phase(Phase::Confirm, StepStatus::Ok, now);
        self.record.running_on = self.host.clone();
        self.record.outcome = Some(Outcome::Failed);
        for f in &mut self.record.features {
            f.skip_unrun(false);
        }
        self.state = SourceState::Confirming {
            committed: false,
            step: ConfirmStep::Guest,
        };
        vec![self.journal(), SourceAction::ResumeGuest]
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
        if self.is_done() {
            for f in &mut self.record.features {
                f.skip_unrun(false);
            }
        }
    }

    /// Carry out the recovery table for this attempt after an agent restart.
    pub fn recover(&mut self, now: Millis) -> Vec<SourceAction> {
        self.heartbeat_in_flight = false;
        self.resolve_in_flight = false;
        self.last_peer_contact = now;
        self.heartbeat_due = now;
        self.last_progress_at = now;
        // A recovery try in flight when the process died never answers
        // this one, and the transfer may have finished or resumed since:
        // the hypervisor's next progress says whether it is paused.
        self.recovery = None;
        self.show_recovery();
        let mut actions = self.recover_state(now);
        // After a switchover the destination may still pull pages from
        // here: follow the transfer again, and never kill before its end.
        if self.switched && self.drained.is_none() {
            actions.push(SourceAction::WatchTransfer);
        }
        actions
    }

    fn recover_state(&mut self, now: Millis) -> Vec<SourceAction> {
        match source_recovery(&self.state) {
            SourceRecovery::Forget => {
                self.record.blame(Cause::Interrupted, Side::Source);
                self.end_before_commit(
                    now,
                    Outcome::Aborted,
                    format!("{} restarted before Prepare completed", self.host),
                    true,
                )
            }
            SourceRecovery::CancelAndResume => {
                let outcome = match self.state {
                    SourceState::Aborting { outcome, .. } => outcome,
                    _ => {
                        self.record.blame(Cause::Interrupted, Side::Source);
                        Outcome::Aborted
                    }
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
                self.record.blame(Cause::Interrupted, Side::Source);
                self.become_unresolved(
                    now,
                    format!(
                        "{} restarted after sending Finish to {}",
                        self.host, self.destination
                    ),
                )
            }
            SourceRecovery::FinishConfirm => match self.state {
                SourceState::Confirming {
                    committed: true,
                    step: ConfirmStep::Draining,
                } => Vec::new(),
                SourceState::Confirming {
                    committed: true, ..
                } => {
                    // Kill again (idempotent), then the releases not done yet.
                    self.state = SourceState::Confirming {
                        committed: true,
                        step: ConfirmStep::Guest,
                    };
                    vec![SourceAction::KillGuest]
                }
                _ => {
                    self.state = SourceState::Confirming {
                        committed: false,
                        step: ConfirmStep::Guest,
                    };
                    vec![SourceAction::ResumeGuest]
                }
            },
            SourceRecovery::Nothing => Vec::new(),
        }
    }
}
