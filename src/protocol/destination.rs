//! The destination side of one attempt: Prepare and Finish, and the
//! rollback that undoes them.
//!
//! ```text
//!  C1 ──► Starting ──► Preparing ──► Prepared ──C3──► Finishing ──► Committed
//!            │            │             │                 │
//!            └────────────┴─── abort, ──┴── blocking ─────┘
//!                              peer lost,   failure
//!                                   ▼
//!                              RollingBack ──► RolledBack
//! ```
//!
//! The destination journals `Committed` before it resumes the guest; from then
//! on it answers Resolve with "committed". Once Finish has arrived it carries
//! it through to a decision whether or not the source is still there.

use serde::{Deserialize, Serialize};

use super::bounds::{MAX_TEXT_LEN, clip};
use super::cookies::{Incoming, stage_result};
use super::mutations::{Mutation, planted};
use super::policy::{is_blocking, rollback_set};
use super::record::{FeatureRecord, stats_from_proto};
use super::recovery::{DestinationRecovery, destination_recovery};
use super::{
    GuestOpError, GuestOpResult, GuestProbe, KillResult, Millis, Mode, PROTOCOL_VERSION,
    PendingWork, Stage, StageOutcome, StepStatus, Timing, TransferStats, VmSpec,
};
use crate::proto;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DestinationState {
    /// The incoming guest is being started paused.
    Starting,
    /// Running feature `next`'s prepare stage.
    Preparing {
        next: usize,
    },
    /// C2 sent; waiting for Finish.
    Prepared,
    /// Finish arrived: waiting for the transfer, then feature `next`'s finish.
    /// For post-copy the finish stages run first, while pre-copy goes on.
    Finishing {
        next: usize,
    },
    /// Post-copy: every blocking finish stage succeeded and the source was
    /// told it may switch over. Waiting for the hypervisor to say whether
    /// the switchover arrived (commit) or the transfer ended without it
    /// (roll back). Never aborted on this host's own account: the source
    /// may have switched already, and then only this host can run the guest.
    SwitchoverReady,
    /// The commit point is journaled; the guest's CPUs start next. Until
    /// the hypervisor says they run, nobody is told "committed".
    Committed,
    /// Undoing the features in `queue` (front first), after killing the guest.
    RollingBack {
        queue: Vec<usize>,
    },
    RolledBack,
}

/// Which RPC is waiting for this attempt's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Waiter {
    Prepare,
    Finish,
    Nobody,
}

/// The hypervisor call on the guest whose answer the attempt waits for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Awaiting {
    #[default]
    Nothing,
    Resume,
    Status,
    /// A kill before the commit is abandoned (the CPUs never ran).
    KillAbandoning,
    /// A kill before the rollback stages run.
    KillRollingBack,
}

#[derive(Debug, Clone, PartialEq)]
pub enum DestinationInput {
    IncomingStarted(Result<String, GuestOpError>),
    IncomingCompleted(Result<(), String>),
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
    GuestResumed(GuestOpResult),
    GuestKilled(GuestOpResult),
    GuestStatus(GuestProbe),
    /// Post-copy: the switchover arrived (`Ok(true)`), the whole guest
    /// arrived by pre-copy (`Ok(false)`), or the transfer ended without
    /// either (`Err`).
    SwitchoverArrived(Result<bool, String>),
    Finish(proto::Cookie3),
    Heartbeat,
    Timer,
}

#[derive(Debug, Clone, PartialEq)]
pub enum DestinationAction {
    Journal(Box<DestinationAttempt>),
    StartIncoming,
    /// Wait for the transfer C3 describes to have arrived.
    CompleteIncoming(TransferStats),
    /// Post-copy: wait for the switchover; `SwitchoverArrived` follows.
    AwaitSwitchover,
    RunStage {
        feature: usize,
        stage: Stage,
    },
    /// `GuestResumed` follows.
    ResumeGuest,
    /// `GuestKilled` follows.
    KillGuest,
    /// Ask the hypervisor whether the guest runs; `GuestStatus` follows.
    QueryGuest,
    /// Something failed that leaves work on this host (a rollback, a kill):
    /// it stays listed and is retried until it succeeds.
    RecordPending {
        work: PendingWork,
        error: String,
    },
    ReplyPrepare(proto::Cookie2),
    ReplyFinish(proto::Cookie4),
    /// We aborted on our own (source lost, agent stopping): tell the source.
    NotifySource {
        reason: String,
    },
    /// Committed, but the guest cannot be run here and may have run: only an
    /// operator can decide now.
    GuestLost {
        reason: String,
    },
    Finished {
        committed: bool,
    },
}

/// Why Prepare was refused before anything was started.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrepareRefusal {
    #[error("{0}")]
    NoCapacity(String),
    #[error("{0}")]
    AlreadyHere(String),
    /// The source aborted the attempt before its C1 arrived.
    #[error("{0}")]
    Aborted(String),
    /// An earlier attempt's feature state for this VM is still being undone
    /// here; a new attempt now would have its state undone behind its back.
    #[error("{0}")]
    Busy(String),
}

/// What this host already knows of an attempt whose C1 arrives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Known {
    /// Its source told us it aborted before C1 arrived.
    pub aborted: bool,
    /// It is running here now.
    pub running: bool,
    /// It is in the journal: it ran here before (and has ended).
    pub journaled: bool,
}

/// A C1 is only ever prepared once: a late or repeated Prepare of an attempt
/// that was aborted, is running, or already ended here is refused (preparing
/// it again would overwrite its journaled decision, and a late Finish could
/// then commit a guest whose source already resumed).
pub fn check_new_attempt(attempt_id: &str, host: &str, known: Known) -> Result<(), PrepareRefusal> {
    if known.aborted {
        return Err(PrepareRefusal::Aborted(format!(
            "attempt {attempt_id} was aborted"
        )));
    }
    if known.running {
        return Err(PrepareRefusal::AlreadyHere(format!(
            "attempt {attempt_id} is already here"
        )));
    }
    if known.journaled {
        return Err(PrepareRefusal::AlreadyHere(format!(
            "attempt {attempt_id} already ran on {host} and has ended; a repeated Prepare is refused"
        )));
    }
    Ok(())
}

/// What a destination answers when asked whether an attempt committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The guest runs here.
    Committed,
    /// Durably decided: it never commits here.
    NotCommitted,
    /// Committed, but the guest cannot run here and may have run.
    Lost,
    /// Finish is still being carried out: ask again.
    Pending,
}

/// Resolve for an attempt this host has no record of: it never committed
/// here, and never will (the caller tombstones it, durably, so a late C1 is
/// refused).
pub fn unknown_attempt(host: &str, attempt_id: &str) -> proto::Cookie4 {
    proto::Cookie4 {
        protocol_version: PROTOCOL_VERSION,
        attempt_id: attempt_id.to_string(),
        committed: false,
        error: format!("{host} has no record of attempt {attempt_id}"),
        ..Default::default()
    }
}

/// Resolve, Finish or Abort for an attempt that committed here and whose
/// record retention has since forgotten (only the fact of the commit is
/// kept): it committed. The stages' results are gone with the record.
pub fn forgotten_commit(attempt_id: &str) -> proto::Cookie4 {
    proto::Cookie4 {
        protocol_version: PROTOCOL_VERSION,
        attempt_id: attempt_id.to_string(),
        committed: true,
        ..Default::default()
    }
}

/// What an earlier attempt of a VM still has on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leftover<'a> {
    /// A rollback or release that failed and waits for a retry.
    Pending {
        attempt_id: &'a str,
        feature: &'a str,
        stage: Stage,
    },
    /// An attempt still running here: rolling back as a destination, or
    /// releasing as a source.
    Running { attempt_id: &'a str },
    /// A copy of the guest here still to kill (or to resume): it would take
    /// the new attempt's guest with it.
    Guest { attempt_id: &'a str, work: &'a str },
}

/// Why Prepare of `vm` must wait, if anything is left here from an earlier
/// attempt of it: a pending rollback that ran after a new attempt set the VM
/// up here would silently tear down the new attempt's state.
pub fn busy_with(vm: &str, host: &str, leftovers: &[Leftover<'_>]) -> Option<String> {
    let first = leftovers.first()?;
    Some(match *first {
        Leftover::Pending {
            attempt_id,
            feature,
            stage,
        } => format!(
            "{vm} still has a pending {stage} of {feature} on {host} from attempt {attempt_id}; \
             run `tern rollback` for it (or wait for its retry), then migrate again"
        ),
        Leftover::Guest { attempt_id, work } => format!(
            "{vm} still has a pending {work} of an old copy on {host} from attempt {attempt_id}; \
             run `tern rollback` for it (or wait for its retry), then migrate again"
        ),
        Leftover::Running { attempt_id } => format!(
            "attempt {attempt_id} of {vm} is still undoing or releasing its features on {host}; \
             migrate again once it has ended"
        ),
    })
}

/// Prepare's own admission of a C1's VM on this host, each check named,
/// in the order Prepare applies them (it refuses at the first that fails):
/// what an earlier attempt of the VM still holds here (`busy`, from
/// [`busy_with`]), a guest of the same name, and capacity. `tern check`
/// shows all three from the same code, so the two cannot disagree.
pub fn admission(
    vm: &VmSpec,
    host: &str,
    free: FreeCapacity,
    already_here: bool,
    busy: Option<&str>,
) -> [(&'static str, Result<String, PrepareRefusal>); 3] {
    let name = &vm.name;
    let pending = match busy {
        Some(busy) => Err(PrepareRefusal::Busy(busy.to_string())),
        None => Ok(format!("nothing of {name} is left or undone on {host}")),
    };
    let guest = match already_here {
        true => Err(PrepareRefusal::AlreadyHere(format!(
            "a guest named {name} already exists on {host}"
        ))),
        false => Ok(format!("no guest named {name} on {host}")),
    };
    let capacity = if vm.memory_mib > free.memory_mib || vm.vcpus > free.vcpus {
        Err(PrepareRefusal::NoCapacity(format!(
            "{host} has {} MiB and {} vCPUs free; {name} needs {} MiB and {} vCPUs",
            free.memory_mib, free.vcpus, vm.memory_mib, vm.vcpus
        )))
    } else {
        Ok(format!(
            "{} and {} vCPUs free, needs {} and {}",
            gib(free.memory_mib),
            free.vcpus,
            gib(vm.memory_mib),
            vm.vcpus
        ))
    };
    [
        ("pending state", pending),
        ("guest", guest),
        ("capacity", capacity),
    ]
}

/// Memory as an operator reads it: "6.0 GiB".
fn gib(mib: u64) -> String {
    format!("{:.1} GiB", mib as f64 / 1024.0)
}

/// Free capacity on the destination when C1 arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreeCapacity {
    pub memory_mib: u64,
    pub vcpus: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DestinationAttempt {
    pub attempt_id: String,
    pub migration_id: String,
    pub host: String,
    pub source: String,
    pub vm: VmSpec,
    pub mode: Mode,
    pub state: DestinationState,
    pub features: Vec<FeatureRecord>,
    pub incoming_address: String,
    pub error: Option<String>,
    pub waiter: Waiter,
    timing: Timing,
    last_source_contact: Millis,
    /// An abort that arrived while a stage was in flight.
    abort_requested: Option<String>,
    /// Whether the source must be told when the rollback ends.
    notify_source: bool,
    /// Committed and the guest's CPUs were started: only then is the attempt
    /// closed in the journal. A crash between the commit and the resume
    /// leaves it open, and recovery resumes the guest.
    #[serde(default)]
    guest_resumed: bool,
    /// The guest's CPUs may have started although no resume was seen to
    /// succeed (a resume that did not answer, or a restart after the
    /// commit): from then on the attempt can never be abandoned on the
    /// word of a failed resume alone.
    #[serde(default)]
    ran_maybe: bool,
    /// Committed, but the guest cannot be run here and may have run.
    #[serde(default)]
    lost: Option<String>,
    /// C1 said the source may switch to post-copy: the incoming guest is
    /// started ready for it.
    #[serde(default)]
    pub postcopy: bool,
    /// C1 announced post-copy but this host cannot take part in it: why.
    #[serde(default)]
    postcopy_unavailable: Option<String>,
    /// This Finish is a post-copy one: the finish stages run before the
    /// switchover, and the commit waits for it.
    #[serde(default)]
    switchover: bool,
    /// Ready for the switchover, the whole guest arrived by pre-copy
    /// instead: the source can still take it back, so the commit waits
    /// for its word (Finish, or Resolve once it cannot).
    #[serde(default)]
    arrived_whole: bool,
    /// The switchover reached this host: the source can never take the
    /// guest back, whatever happens to its CPUs here.
    #[serde(default)]
    switched_over: bool,
    /// This incarnation recovered the attempt from the journal: whatever the
    /// guest's state now, it may have run before the restart.
    #[serde(skip)]
    recovered: bool,
    #[serde(skip)]
    awaiting: Awaiting,
    /// Per feature: its driver on this host checks its work after the
    /// guest resumed ([`DestinationAttempt::set_verifiers`]).
    #[serde(default)]
    verifiers: Vec<bool>,
    /// The feature whose verify stage runs.
    #[serde(default)]
    verifying: Option<usize>,
}

impl DestinationAttempt {
    /// Prepare: check capacity, then start the incoming guest paused.
    /// `incoming` was already decoded and checked ([`super::cookies::check_cookie1`]).
    pub fn prepare(
        incoming: Incoming,
        host: &str,
        free: FreeCapacity,
        already_here: bool,
        busy: Option<String>,
        timing: Timing,
        now: Millis,
    ) -> Result<(DestinationAttempt, Vec<DestinationAction>), PrepareRefusal> {
        let vm = incoming.vm;
        for (_, verdict) in admission(&vm, host, free, already_here, busy.as_deref()) {
            verdict?;
        }
        let attempt = DestinationAttempt {
            attempt_id: incoming.attempt_id,
            migration_id: incoming.migration_id,
            host: host.to_string(),
            source: incoming.source,
            features: vm
                .features
                .iter()
                .map(|f| FeatureRecord::new(&f.name, f.required))
                .collect(),
            vm,
            mode: incoming.mode,
            state: DestinationState::Starting,
            incoming_address: String::new(),
            error: None,
            waiter: Waiter::Prepare,
            timing,
            last_source_contact: now,
            abort_requested: None,
            notify_source: false,
            guest_resumed: false,
            ran_maybe: false,
            lost: None,
            postcopy: incoming.postcopy,
            postcopy_unavailable: incoming.postcopy_unavailable,
            switchover: false,
            arrived_whole: false,
            switched_over: false,
            recovered: false,
            awaiting: Awaiting::Nothing,
            verifiers: Vec::new(),
            verifying: None,
        };
        let actions = vec![attempt.journal(), DestinationAction::StartIncoming];
        Ok((attempt, actions))
    }

    fn journal(&self) -> DestinationAction {
        DestinationAction::Journal(Box::new(self.clone()))
    }

    pub fn is_committed(&self) -> bool {
        self.state == DestinationState::Committed
    }

    /// Committed after a switchover to post-copy: the guest's pages still
    /// come from the source until the transfer ends.
    pub fn committed_in_postcopy(&self) -> bool {
        self.is_committed() && self.switched_over
    }

    /// The guest runs here: the commit is carried out.
    pub fn guest_runs(&self) -> bool {
        self.is_committed() && self.guest_resumed
    }

    /// It will never commit here: an abort is decided, or it rolls back.
    pub fn decided_not_to_commit(&self) -> bool {
        self.abort_requested.is_some()
            || matches!(
                self.state,
                DestinationState::RollingBack { .. } | DestinationState::RolledBack
            )
    }

    /// When this host last heard from the attempt's source (Prepare, a
    /// heartbeat, Finish): for a finished attempt, about when it ended.
    pub fn last_heard_ms(&self) -> Millis {
        self.last_source_contact
    }

    /// Committed, but the guest was lost: why.
    pub fn lost(&self) -> Option<&str> {
        self.lost.as_deref()
    }

    /// Nothing is left to do: rolled back, committed with the guest
    /// running, or committed and lost (only an operator's forced decision,
    /// an abort from its source, changes that: it rolls the attempt back).
    pub fn is_finished(&self) -> bool {
        match self.state {
            DestinationState::Committed => {
                self.resumed_and_verified()
                    || (self.lost.is_some() && self.awaiting == Awaiting::Nothing)
            }
            DestinationState::RolledBack => true,
            _ => false,
        }
    }

    /// A stage is in flight and its result must be awaited before rolling back.
    fn stage_in_flight(&self) -> bool {
        matches!(
            self.state,
            DestinationState::Starting | DestinationState::Preparing { .. }
        )
    }

    pub fn poll_timeout(&self) -> Option<Millis> {
        // An abort is already decided and waits for the stage in flight:
        // there is nothing left to time out (a past deadline would make the
        // caller's timer fire in a busy loop).
        if self.abort_requested.is_some() || planted(Mutation::IgnoreLostPeer) {
            return None;
        }
        match self.state {
            DestinationState::Starting
            | DestinationState::Preparing { .. }
            | DestinationState::Prepared => {
                Some(self.last_source_contact + self.timing.peer_timeout_ms)
            }
            // The whole guest arrived without a switchover: as before
            // Finish, a source that went silent is given up on.
            DestinationState::SwitchoverReady if self.arrived_whole => {
                Some(self.last_source_contact + self.timing.peer_timeout_ms)
            }
            _ => None,
        }
    }

    /// Abort before Finish arrived. `Err` once Finish is being carried out or
    /// has committed: the destination decides then, not the source. A lost
    /// commit can still be abandoned: the guest does not run here.
    pub fn abort(
        &mut self,
        now: Millis,
        reason: &str,
        notify_source: bool,
    ) -> Result<Vec<DestinationAction>, String> {
        let _ = now;
        match self.state {
            DestinationState::Finishing { .. } => Err(format!(
                "{} is carrying out Finish for attempt {}; it cannot be aborted now",
                self.host, self.attempt_id
            )),
            // The source aborts only before it switches over: its abort is
            // safe. This host's own reasons are not: the source may have
            // switched already, and then only this host can run the guest.
            DestinationState::SwitchoverReady if notify_source && !self.arrived_whole => {
                Err(format!(
                    "{} waits for the switchover of attempt {} to post-copy: the source may have switched \
                 already, so only the transfer's end decides",
                    self.host, self.attempt_id
                ))
            }
            DestinationState::SwitchoverReady => {
                self.notify_source = false;
                Ok(self.roll_back(format!("aborted: {reason}"), true))
            }
            // Only the source's operator abandons a lost commit (its forced
            // decision arrives as the source's abort); this host's own
            // reasons (it stops, it lost its source) do not.
            DestinationState::Committed if self.lost.is_some() && notify_source => Err(format!(
                "attempt {} committed on {} and lost its guest: only the operator's forced decision on {} ends it",
                self.attempt_id, self.host, self.source
            )),
            DestinationState::Committed
                if self.lost.is_some() && self.awaiting == Awaiting::Nothing =>
            {
                self.notify_source = notify_source;
                let lost = self.lost.take().unwrap_or_default();
                Ok(self.roll_back(
                    format!("aborted: {reason} (the guest was lost here: {lost})"),
                    true,
                ))
            }
            DestinationState::Committed => Err(format!(
                "attempt {} has committed on {}: the guest runs here",
                self.attempt_id, self.host
            )),
            DestinationState::RollingBack { .. } | DestinationState::RolledBack => Ok(Vec::new()),
            _ if self.stage_in_flight() => {
                if self.abort_requested.is_none() {
                    self.abort_requested = Some(reason.to_string());
                    self.notify_source = notify_source;
                    self.error = Some(format!("aborted: {reason}"));
                    // Journal the decision: a Resolve or a restart must see it.
                    return Ok(vec![self.journal()]);
                }
                Ok(Vec::new())
            }
            _ => {
                self.notify_source = notify_source;
                Ok(self.roll_back(format!("aborted: {reason}"), true))
            }
        }
    }

    /// What this attempt answers Resolve now, as it stands.
    pub fn answer(&self) -> Answer {
        match self.state {
            DestinationState::Committed if self.lost.is_some() => Answer::Lost,
            DestinationState::Committed if self.resumed_and_verified() => Answer::Committed,
            // The CPUs are being started, the drivers verify their work (the
            // answer's C4 carries the verdict), or the switchover is
            // awaited: the answer is not known yet.
            DestinationState::Committed
            | DestinationState::Finishing { .. }
            | DestinationState::SwitchoverReady => Answer::Pending,
            DestinationState::RollingBack { .. } | DestinationState::RolledBack => {
                Answer::NotCommitted
            }
            _ if self.abort_requested.is_some() => Answer::NotCommitted,
            _ => Answer::Pending,
        }
    }

    /// Resolve: did this attempt commit? "Not committed" is only answered
    /// after the decision never to commit is journaled (the returned actions
    /// start with that journal write).
    pub fn resolve(&mut self, now: Millis) -> (Answer, Vec<DestinationAction>) {
        match self.state {
            DestinationState::Finishing { .. } if planted(Mutation::CommitAfterNotCommitted) => {
                (Answer::NotCommitted, Vec::new())
            }
            // The source asks once it may have switched: a whole guest
            // that arrived is committed now.
            DestinationState::SwitchoverReady if self.arrived_whole => {
                let actions = self.commit();
                (Answer::Pending, actions)
            }
            DestinationState::Committed
            | DestinationState::Finishing { .. }
            | DestinationState::SwitchoverReady
            | DestinationState::RollingBack { .. }
            | DestinationState::RolledBack => (self.answer(), Vec::new()),
            _ if planted(Mutation::CommitAfterNotCommitted) => (Answer::NotCommitted, Vec::new()),
            _ => {
                let actions = self
                    .abort(
                        now,
                        "the source asked to resolve before Finish arrived",
                        false,
                    )
                    .unwrap_or_default();
                (Answer::NotCommitted, actions)
            }
        }
    }

    pub fn handle(&mut self, now: Millis, input: DestinationInput) -> Vec<DestinationAction> {
        match input {
            DestinationInput::IncomingStarted(result) => {
                if self.state != DestinationState::Starting {
                    return Vec::new();
                }
                match result {
                    Ok(address) => {
                        self.incoming_address = address;
                        self.state = DestinationState::Preparing { next: 0 };
                        if let Some(reason) = self.abort_requested.clone() {
                            return self.roll_back(format!("aborted: {reason}"), true);
                        }
                        self.next_prepare()
                    }
                    Err(e) => {
                        let error =
                            format!("could not start the incoming guest on {}: {e}", self.host);
                        // A start that failed made nothing; one that did not
                        // answer may have made a guest, which must go.
                        let kill = matches!(e, GuestOpError::Unknown(_));
                        self.roll_back(error, kill)
                    }
                }
            }
            DestinationInput::StageDone {
                feature,
                stage,
                result,
            } => self.on_stage_done(feature, stage, result),
            DestinationInput::StageTimedOut {
                feature,
                stage,
                after_ms,
            } => {
                if self.expects_stage(feature, stage) {
                    self.features[feature].uncertain = true;
                }
                let result = Err(format!(
                    "did not answer within {after_ms} ms; its effect is unknown"
                ));
                self.on_stage_done(feature, stage, result)
            }
            DestinationInput::Finish(c3) => self.on_finish(now, c3),
            DestinationInput::IncomingCompleted(result) => {
                if self.state != (DestinationState::Finishing { next: 0 })
                    || self
                        .features
                        .first()
                        .is_some_and(|f| f.finish != StepStatus::Pending)
                {
                    return Vec::new();
                }
                match result {
                    Ok(()) => self.next_finish(0),
                    Err(e) => self.roll_back(
                        format!("the transfer did not arrive on {}: {e}", self.host),
                        true,
                    ),
                }
            }
            DestinationInput::GuestResumed(result) => self.on_resumed(result),
            DestinationInput::GuestKilled(result) => self.on_killed(result),
            DestinationInput::GuestStatus(probe) => self.on_status(probe),
            DestinationInput::SwitchoverArrived(result) => {
                if self.state != DestinationState::SwitchoverReady {
                    return Vec::new();
                }
                match result {
                    Ok(true) => {
                        self.switched_over = true;
                        self.commit()
                    }
                    // Committed only on the source's word: Finish (it
                    // switched, or saw the transfer complete) or Resolve.
                    Ok(false) if self.waiter == Waiter::Finish => self.commit(),
                    Ok(false) => {
                        self.arrived_whole = true;
                        vec![self.journal()]
                    }
                    Err(e) => self.roll_back(
                        format!(
                            "the switchover to post-copy did not arrive on {}: {e}",
                            self.host
                        ),
                        true,
                    ),
                }
            }
            DestinationInput::Heartbeat => {
                self.last_source_contact = now;
                Vec::new()
            }
            DestinationInput::Timer => {
                let Some(deadline) = self.poll_timeout() else {
                    return Vec::new();
                };
                if now < deadline
                    || self.abort_requested.is_some()
                    || planted(Mutation::IgnoreLostPeer)
                {
                    return Vec::new();
                }
                let reason = format!(
                    "lost contact with source {}: no heartbeat for {} ms",
                    self.source,
                    now - self.last_source_contact
                );
                self.abort(now, &reason, true).unwrap_or_default()
            }
        }
    }

    fn on_finish(&mut self, now: Millis, c3: proto::Cookie3) -> Vec<DestinationAction> {
        self.last_source_contact = now;
        let requested = c3.status == proto::TransferStatus::SwitchoverRequested as i32;
        match self.state {
            DestinationState::Prepared if requested => {
                if !self.postcopy {
                    self.waiter = Waiter::Finish;
                    self.state = DestinationState::Finishing { next: 0 };
                    return self.roll_back(
                        "the source asked for a switchover to post-copy, which its C1 had not announced"
                            .into(),
                        true,
                    );
                }
                // Post-copy: the finish stages run now, before the
                // switchover; the transfer goes on meanwhile.
                self.waiter = Waiter::Finish;
                self.switchover = true;
                self.state = DestinationState::Finishing { next: 0 };
                let mut actions = vec![self.journal()];
                actions.extend(self.next_finish(0));
                return actions;
            }
            // Ready, and asked again: the same answer.
            DestinationState::SwitchoverReady if requested => {
                return vec![DestinationAction::ReplyFinish(self.cookie4())];
            }
            // The source switched over (or its transfer completed): answered
            // once the switchover's outcome is known.
            DestinationState::SwitchoverReady => {
                self.waiter = Waiter::Finish;
                if self.arrived_whole {
                    return self.commit();
                }
                return Vec::new();
            }
            DestinationState::Prepared => {}
            // A repeated Finish gets the answer already given.
            DestinationState::Committed if self.resumed_and_verified() || self.lost.is_some() => {
                return vec![DestinationAction::ReplyFinish(self.cookie4())];
            }
            DestinationState::RolledBack => {
                return vec![DestinationAction::ReplyFinish(self.cookie4())];
            }
            // The CPUs are being started, or the drivers verify their
            // work: answered once they run (or not), with the verdicts.
            DestinationState::Committed => {
                self.waiter = Waiter::Finish;
                return Vec::new();
            }
            // Finish crossed our own abort: we will never commit. Answer it
            // when the rollback ends, or the source waits for ever.
            DestinationState::RollingBack { .. } if self.waiter == Waiter::Nobody => {
                self.waiter = Waiter::Finish;
                return Vec::new();
            }
            _ => return Vec::new(),
        }
        self.waiter = Waiter::Finish;
        self.state = DestinationState::Finishing { next: 0 };
        let mut actions = vec![self.journal()];
        if c3.status != proto::TransferStatus::Completed as i32 {
            actions.extend(self.roll_back(
                format!(
                    "the source reported the transfer did not complete (status {})",
                    c3.status
                ),
                true,
            ));
            return actions;
        }
        let stats = c3.stats.as_ref().map(stats_from_proto).unwrap_or_default();
        actions.push(DestinationAction::CompleteIncoming(stats));
        actions
    }

    fn expects_stage(&self, feature: usize, stage: Stage) -> bool {
        match (&self.state, stage) {
            (DestinationState::Preparing { next }, Stage::Prepare) => *next == feature,
            (DestinationState::Finishing { next }, Stage::Finish) => {
                *next == feature && self.features[feature].finish == StepStatus::Running
            }
            (DestinationState::RollingBack { queue }, Stage::Rollback) => {
                self.awaiting == Awaiting::Nothing && queue.first() == Some(&feature)
            }
            (DestinationState::Committed, Stage::Verify) => self.verifying == Some(feature),
            _ => false,
        }
    }

    fn on_stage_done(
        &mut self,
        feature: usize,
        stage: Stage,
        result: StageOutcome,
    ) -> Vec<DestinationAction> {
        if !self.expects_stage(feature, stage) {
            return Vec::new();
        }
        let spec_required = self.vm.features[feature].required;
        let name = self.vm.features[feature].name.clone();
        self.features[feature].record(stage, &result);
        match stage {
            Stage::Prepare => {
                if let Some(reason) = self.abort_requested.clone() {
                    return self.roll_back(format!("aborted: {reason}"), true);
                }
                if let Err(detail) = &result
                    && is_blocking(self.mode, spec_required)
                {
                    let error = format!(
                        "required feature {name} failed prepare on {}: {detail}",
                        self.host
                    );
                    return self.roll_back(error, true);
                }
                self.state = DestinationState::Preparing { next: feature + 1 };
                self.next_prepare()
            }
            Stage::Finish => {
                if let Err(detail) = &result
                    && is_blocking(self.mode, spec_required)
                {
                    let error = format!(
                        "required feature {name} failed finish on {}: {detail}",
                        self.host
                    );
                    return self.roll_back(error, true);
                }
                self.next_finish(feature + 1)
            }
            Stage::Rollback => {
                let mut actions = Vec::new();
                if let Err(error) = result {
                    actions.push(DestinationAction::RecordPending {
                        work: PendingWork::Stage {
                            feature,
                            stage: Stage::Rollback,
                        },
                        error,
                    });
                }
                if let DestinationState::RollingBack { queue } = &mut self.state {
                    queue.remove(0);
                }
                actions.extend(self.roll_back_next());
                actions
            }
            Stage::Release => Vec::new(),
            // A failed check is recorded, never undone: the guest runs here
            // now, and the outcome is degraded.
            Stage::Verify => self.verify_from(feature + 1),
        }
    }

    fn next_prepare(&mut self) -> Vec<DestinationAction> {
        let DestinationState::Preparing { next } = self.state else {
            return Vec::new();
        };
        if next < self.features.len() {
            self.features[next].prepare = StepStatus::Running;
            return vec![
                self.journal(),
                DestinationAction::RunStage {
                    feature: next,
                    stage: Stage::Prepare,
                },
            ];
        }
        self.state = DestinationState::Prepared;
        self.waiter = Waiter::Nobody;
        vec![
            self.journal(),
            DestinationAction::ReplyPrepare(self.cookie2(true)),
        ]
    }

    fn next_finish(&mut self, from: usize) -> Vec<DestinationAction> {
        // A feature whose prepare did not succeed has nothing to finish.
        let mut next = from;
        while next < self.features.len() && self.features[next].prepare != StepStatus::Ok {
            self.features[next].finish = StepStatus::Skipped;
            next += 1;
        }
        if next < self.features.len() {
            self.features[next].finish = StepStatus::Running;
            self.state = DestinationState::Finishing { next };
            return vec![
                self.journal(),
                DestinationAction::RunStage {
                    feature: next,
                    stage: Stage::Finish,
                },
            ];
        }
        if self.switchover {
            // Post-copy: every blocking finish stage succeeded. The source
            // may switch over now; the commit waits for the switchover.
            self.state = DestinationState::SwitchoverReady;
            let mut actions = vec![self.journal()];
            if self.waiter == Waiter::Finish {
                actions.push(DestinationAction::ReplyFinish(self.cookie4()));
            }
            self.waiter = Waiter::Nobody;
            actions.push(DestinationAction::AwaitSwitchover);
            return actions;
        }
        self.commit()
    }

    /// The commit point: journal it, then start the guest's CPUs. The
    /// answer waits until the hypervisor says they run.
    fn commit(&mut self) -> Vec<DestinationAction> {
        self.state = DestinationState::Committed;
        self.guest_resumed = false;
        self.awaiting = Awaiting::Resume;
        vec![self.journal(), DestinationAction::ResumeGuest]
    }

    /// Committed, the guest's CPUs run here and its drivers have checked
    /// their work: only then is the commit answered and the attempt closed.
    fn resumed_and_verified(&self) -> bool {
        self.guest_resumed && self.verifying.is_none()
    }

    /// Which features' drivers on this host verify their work after the
    /// guest resumed (in the order of the VM's features); none by default.
    pub fn set_verifiers(&mut self, verifiers: Vec<bool>) {
        self.verifiers = verifiers;
    }

    /// The guest runs here: close the attempt, verify, and answer.
    fn commit_done(&mut self) -> Vec<DestinationAction> {
        self.guest_resumed = true;
        self.awaiting = Awaiting::Nothing;
        // Journaled with the verification it starts: a restart meanwhile
        // resumes (a no-op) and verifies again.
        let then = self.verify_from(0);
        let mut actions = vec![self.journal()];
        actions.extend(then);
        actions
    }

    /// Run the next verify stage from feature `from` on: only of features
    /// whose driver verifies and whose prepare and finish succeeded here
    /// (there is nothing of the others to check). Then answer.
    fn verify_from(&mut self, from: usize) -> Vec<DestinationAction> {
        let next = (from..self.features.len()).find(|&i| {
            self.verifiers.get(i).copied().unwrap_or(false)
                && self.features[i].prepare == StepStatus::Ok
                && self.features[i].finish == StepStatus::Ok
        });
        if let Some(feature) = next {
            self.verifying = Some(feature);
            self.features[feature].verify = StepStatus::Running;
            return vec![DestinationAction::RunStage {
                feature,
                stage: Stage::Verify,
            }];
        }
        self.verifying = None;
        for f in &mut self.features {
            if f.verify == StepStatus::Pending {
                f.verify = StepStatus::Skipped;
            }
        }
        let mut actions = Vec::new();
        if from > 0 {
            actions.push(self.journal());
        }
        if self.waiter == Waiter::Finish {
            actions.push(DestinationAction::ReplyFinish(self.cookie4()));
        }
        self.waiter = Waiter::Nobody;
        actions.push(DestinationAction::Finished { committed: true });
        actions
    }

    fn on_resumed(&mut self, result: GuestOpResult) -> Vec<DestinationAction> {
        if self.state != DestinationState::Committed || self.awaiting != Awaiting::Resume {
            return Vec::new();
        }
        match result {
            Ok(()) => self.commit_done(),
            // After a switchover the source can never take the guest back:
            // is it here, stopped? Then it stays, paused, and the resume is
            // retried; gone, it is lost.
            Err(GuestOpError::Failed(e)) if self.switched_over => {
                self.error = Some(format!("resuming the guest on {}: {e}", self.host));
                self.awaiting = Awaiting::Status;
                vec![DestinationAction::QueryGuest]
            }
            // Gone after the switchover: neither host holds the whole guest.
            Err(GuestOpError::Gone(e)) if self.switched_over => self.become_lost(format!(
                "the guest is gone from {} after the switchover to post-copy: {e}",
                self.host
            )),
            // The hypervisor refused: the CPUs never started. The guest
            // goes, and the source resumes its copy: nothing ran here.
            Err(GuestOpError::Failed(e) | GuestOpError::Gone(e)) if !self.ran_maybe => {
                self.error = Some(format!(
                    "could not start the guest's CPUs on {}: {e}; the guest was killed there and runs on {} again",
                    self.host, self.source
                ));
                self.awaiting = Awaiting::KillAbandoning;
                vec![DestinationAction::KillGuest]
            }
            // No clear answer: ask whether the CPUs run.
            Err(e) => {
                if matches!(e, GuestOpError::Unknown(_)) {
                    self.ran_maybe = true;
                }
                self.error = Some(format!("resuming the guest on {}: {e}", self.host));
                self.awaiting = Awaiting::Status;
                vec![DestinationAction::QueryGuest]
            }
        }
    }

    fn on_status(&mut self, probe: GuestProbe) -> Vec<DestinationAction> {
        if self.state != DestinationState::Committed || self.awaiting != Awaiting::Status {
            return Vec::new();
        }
        match probe {
            GuestProbe::Running => {
                self.error = None;
                self.commit_done()
            }
            GuestProbe::Stopped if self.switched_over => {
                let before = self.error.take().unwrap_or_default();
                self.paused_after_switchover(before)
            }
            // There and stopped, after a restart: it may have run before the
            // agent died (and been stopped since). Never abandoned on that.
            GuestProbe::Stopped if self.recovered => self.become_lost(
                "after a restart its guest is there but stopped, and may have run before".into(),
            ),
            // There and stopped: once killed, nothing of it can run.
            GuestProbe::Stopped => {
                let before = self.error.take().unwrap_or_default();
                self.error = Some(format!(
                    "{before}; its CPUs did not start, so it was killed and runs on {} again",
                    self.source
                ));
                self.awaiting = Awaiting::KillAbandoning;
                vec![DestinationAction::KillGuest]
            }
            GuestProbe::Gone => self.become_lost("the guest is gone from this host".into()),
            GuestProbe::Unknown(e) => {
                self.become_lost(format!("the hypervisor cannot say whether it runs: {e}"))
            }
        }
    }

    fn on_killed(&mut self, result: GuestOpResult) -> Vec<DestinationAction> {
        let result = result.filter_gone();
        match self.awaiting {
            Awaiting::KillAbandoning if self.state == DestinationState::Committed => {
                self.awaiting = Awaiting::Nothing;
                match result {
                    Ok(()) => {
                        let error = self.error.clone().unwrap_or_default();
                        self.roll_back(error, false)
                    }
                    Err(e) if self.ran_maybe => {
                        self.become_lost(format!("it could not be killed either: {e}"))
                    }
                    // Its CPUs never ran and nothing will start them: the
                    // copy is only in the way, listed until a kill works.
                    Err(e) => {
                        let error = self.error.clone().unwrap_or_default();
                        let mut actions = self.roll_back(error, false);
                        actions.insert(
                            1,
                            DestinationAction::RecordPending {
                                work: PendingWork::Kill,
                                error: e.message().to_string(),
                            },
                        );
                        actions
                    }
                }
            }
            Awaiting::KillRollingBack
                if matches!(self.state, DestinationState::RollingBack { .. }) =>
            {
                self.awaiting = Awaiting::Nothing;
                let mut actions = Vec::new();
                if let Err(e) = result {
                    actions.push(DestinationAction::RecordPending {
                        work: PendingWork::Kill,
                        error: e.message().to_string(),
                    });
                }
                actions.extend(self.roll_back_next());
                actions
            }
            _ => Vec::new(),
        }
    }

    /// Post-copy, committed, and the guest's CPUs would not start: it is
    /// here and only here (the source cannot take it back), so it stays,
    /// paused, and the resume is retried as pending work until it runs.
    fn paused_after_switchover(&mut self, why: String) -> Vec<DestinationAction> {
        self.error = Some(format!(
            "could not start the guest's CPUs on {} after the switchover to post-copy ({why}); \
             it stays paused there, where alone it can run, and the resume is retried",
            self.host
        ));
        // The retry is on record before the attempt is closed: a crash in
        // between leaves the resume to do either way.
        let mut actions = vec![DestinationAction::RecordPending {
            work: PendingWork::Resume,
            error: why,
        }];
        actions.extend(self.commit_done());
        actions
    }

    /// Committed, and the guest cannot be run here: it may have run, so the
    /// source must keep its copy paused until an operator decides.
    fn become_lost(&mut self, why: String) -> Vec<DestinationAction> {
        let before = self.error.take();
        let reason = match before {
            Some(b) if !b.is_empty() => format!("{b}; {why}"),
            _ => why,
        };
        self.lost = Some(reason.clone());
        self.error = Some(reason.clone());
        self.awaiting = Awaiting::Nothing;
        let mut actions = vec![self.journal(), DestinationAction::GuestLost { reason }];
        if self.waiter == Waiter::Finish {
            actions.push(DestinationAction::ReplyFinish(self.cookie4()));
        }
        self.waiter = Waiter::Nobody;
        actions
    }

    /// Decide never to commit: journal it, kill the incoming guest (unless
    /// nothing was started, or it is already gone), and undo exactly the
    /// features whose stages succeeded, last first.
    fn roll_back(&mut self, error: String, kill: bool) -> Vec<DestinationAction> {
        if self.error.is_none() || !error.starts_with("aborted") {
            self.error = Some(error);
        }
        for f in &mut self.features {
            if f.finish == StepStatus::Pending {
                f.finish = StepStatus::Skipped;
            }
            if f.prepare == StepStatus::Pending {
                f.prepare = StepStatus::Skipped;
            }
        }
        let queue = rollback_set(&self.features, false);
        for &i in &queue {
            self.features[i].rollback = StepStatus::Pending;
        }
        self.state = DestinationState::RollingBack { queue };
        let mut actions = vec![self.journal()];
        if kill {
            self.awaiting = Awaiting::KillRollingBack;
            actions.push(DestinationAction::KillGuest);
        } else {
            self.awaiting = Awaiting::Nothing;
            actions.extend(self.roll_back_next());
        }
        actions
    }

    fn roll_back_next(&mut self) -> Vec<DestinationAction> {
        let DestinationState::RollingBack { queue } = &self.state else {
            return Vec::new();
        };
        if let Some(&feature) = queue.first() {
            self.features[feature].rollback = StepStatus::Running;
            return vec![DestinationAction::RunStage {
                feature,
                stage: Stage::Rollback,
            }];
        }
        self.state = DestinationState::RolledBack;
        let mut actions = vec![self.journal()];
        match self.waiter {
            Waiter::Prepare => actions.push(DestinationAction::ReplyPrepare(self.cookie2(false))),
            Waiter::Finish => actions.push(DestinationAction::ReplyFinish(self.cookie4())),
            Waiter::Nobody => {}
        }
        self.waiter = Waiter::Nobody;
        if self.notify_source {
            let reason = self.error.clone().unwrap_or_else(|| "aborted".into());
            actions.push(DestinationAction::NotifySource { reason });
        }
        actions.push(DestinationAction::Finished { committed: false });
        actions
    }

    fn results(&self, stage: Stage) -> Vec<proto::StageResult> {
        self.features
            .iter()
            .filter(|f| f.stage(stage) != StepStatus::Pending)
            .map(|f| stage_result(&f.name, f.stage(stage), f.error.as_deref().unwrap_or("")))
            .collect()
    }

    pub fn cookie2(&self, accepted: bool) -> proto::Cookie2 {
        proto::Cookie2 {
            protocol_version: PROTOCOL_VERSION,
            attempt_id: self.attempt_id.clone(),
            incoming_address: self.incoming_address.clone(),
            prepare: self.results(Stage::Prepare),
            accepted,
            error: if accepted {
                String::new()
            } else {
                clip(self.error.as_deref().unwrap_or_default(), MAX_TEXT_LEN)
            },
            rollback: self.results(Stage::Rollback),
            postcopy: self.postcopy,
            postcopy_unavailable: clip(
                self.postcopy_unavailable.as_deref().unwrap_or_default(),
                MAX_TEXT_LEN,
            ),
        }
    }

    pub fn cookie4(&self) -> proto::Cookie4 {
        let committed = self.state == DestinationState::Committed;
        proto::Cookie4 {
            protocol_version: PROTOCOL_VERSION,
            attempt_id: self.attempt_id.clone(),
            committed,
            finish: self.results(Stage::Finish),
            rollback: self.results(Stage::Rollback),
            verify: self.results(Stage::Verify),
            error: if committed && self.lost.is_none() {
                String::new()
            } else {
                clip(self.error.as_deref().unwrap_or_default(), MAX_TEXT_LEN)
            },
            lost: self.lost.is_some(),
            ready_for_switchover: self.state == DestinationState::SwitchoverReady,
        }
    }

    /// Carry out the recovery table after an agent restart.
    pub fn recover(&mut self, now: Millis) -> Vec<DestinationAction> {
        self.last_source_contact = now;
        self.waiter = Waiter::Nobody;
        self.awaiting = Awaiting::Nothing;
        match destination_recovery(&self.state) {
            DestinationRecovery::KillAndRollBack => {
                // A stage that was running when the agent died may have taken
                // effect: undo it too (stages are idempotent).
                for f in &mut self.features {
                    if f.prepare == StepStatus::Running {
                        f.prepare = StepStatus::Ok;
                    }
                    if f.finish == StepStatus::Running {
                        f.finish = StepStatus::Ok;
                    }
                }
                self.notify_source = true;
                self.roll_back(
                    format!("{} restarted before the commit point", self.host),
                    true,
                )
            }
            DestinationRecovery::ContinueRollback => {
                let queue = rollback_set(&self.features, true);
                self.state = DestinationState::RollingBack { queue };
                self.awaiting = Awaiting::KillRollingBack;
                vec![DestinationAction::KillGuest]
            }
            // The switchover may have arrived while this agent was down:
            // the hypervisor still knows.
            DestinationRecovery::AwaitSwitchover => vec![DestinationAction::AwaitSwitchover],
            DestinationRecovery::KeepRunning if self.lost.is_some() => Vec::new(),
            DestinationRecovery::KeepRunning => {
                // The CPUs may have started before the restart: from here a
                // failed resume can only make the guest lost, never abandoned.
                self.ran_maybe = true;
                self.recovered = true;
                self.awaiting = Awaiting::Resume;
                vec![DestinationAction::ResumeGuest]
            }
            DestinationRecovery::Nothing => Vec::new(),
        }
    }
}
