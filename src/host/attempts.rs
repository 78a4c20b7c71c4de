//! Carrying out the attempts' actions: each protocol action becomes a
//! journal write, a peer call, a hypervisor call or stage (with its
//! deadline), an answer or an event; each answer, or a missed deadline, is
//! routed back to the attempt that waits for it.

use crate::protocol::completion::Postcopy;
use prost::Message;

use super::{
    Action, CallKind, Entry, Event, HostCore, Internal, Level, Op, OpEntry, OpError, OpId, OpKind,
    OpOutput, Owner, PeerCall, PeerResponse, Response,
};
use crate::features::{NicPort, StageContext};
use crate::hypervisor::GuestState;
use crate::proto;
use crate::protocol::destination::{
    DestinationAction, DestinationAttempt, DestinationInput, DestinationState,
};
use crate::protocol::mutations::{Mutation, planted};
use crate::protocol::source::{SourceAction, SourceInput, SourceState};
use crate::protocol::{
    GuestOpError, GuestProbe, Millis, Outcome, Stage, TransferStats, VmSpec, cookies,
};

/// At most one progress event per attempt this often.
const PROGRESS_EVERY_MS: Millis = 200;

impl HostCore {
    // ---- source ---------------------------------------------------------------

    pub(super) fn source_input(&mut self, id: &str, input: SourceInput) {
        let now = self.now;
        let Some(s) = self.sources.get_mut(id) else {
            return;
        };
        let actions = s.attempt.handle(now, input);
        if !actions.is_empty() {
            self.source_actions(id, actions);
        }
    }

    pub(super) fn source_actions(&mut self, id: &str, actions: Vec<SourceAction>) {
        for action in actions {
            let Some(s) = self.sources.get(id) else {
                return;
            };
            let a = &s.attempt;
            let (attempt_id, migration_id) = (a.attempt_id.clone(), a.migration_id.clone());
            let (vm, peer) = (a.vm.clone(), a.destination.clone());
            let owner = Owner::Source(id.to_string(), attempt_id.clone());
            let peer_timeout = self.cfg.timing.peer_timeout_ms;
            let guest_op = self.cfg.deadlines.guest_op_ms;
            match action {
                SourceAction::Journal(snapshot) => {
                    // Past Finish the destination may commit; a forced
                    // decision is the operator's and must not be lost.
                    // The switch to post-copy, too: a restart must never
                    // take it for an attempt that can still resume here.
                    let durable = snapshot.state == SourceState::FinishSent
                        || snapshot.state == SourceState::Switching
                        || (snapshot.forced().is_some()
                            && matches!(snapshot.state, SourceState::Confirming { .. }));
                    self.journal(Entry::Source(snapshot), durable);
                }
                SourceAction::SendPrepare(c1) => {
                    // Prepare runs every prepare stage: no deadline, the
                    // heartbeats watch the peer instead.
                    let request = PeerCall::Prepare(proto::PrepareRequest {
                        cookie1: c1.encode_to_vec(),
                    });
                    self.call(owner, CallKind::Prepare, &peer, request, None);
                }
                SourceAction::StartTransfer { address } => {
                    let completion = a.record.completion;
                    let what = Op::TransferOut {
                        vm: vm.name.clone(),
                        destination: peer.clone(),
                        address,
                        plan: crate::hypervisor::TransferPlan {
                            postcopy: completion.postcopy != Postcopy::Never,
                            downtime_limit_ms: completion.downtime_limit_ms,
                        },
                    };
                    let op = self.run(owner, OpKind::TransferOut, what, None);
                    if let Some(s) = self.sources.get_mut(id) {
                        s.transfer = Some(op);
                    }
                    self.emit(Event::Vm(vm.name.clone()));
                }
                SourceAction::WatchTransfer => {
                    let what = Op::WatchTransfer {
                        vm: vm.name.clone(),
                        destination: peer.clone(),
                    };
                    let op = self.run(owner, OpKind::TransferOut, what, None);
                    if let Some(s) = self.sources.get_mut(id) {
                        s.transfer = Some(op);
                    }
                }
                SourceAction::SendRecover => {
                    let request = PeerCall::Recover(proto::RecoverRequest { attempt_id });
                    self.call(owner, CallKind::Recover, &peer, request, Some(peer_timeout));
                }
                SourceAction::PausePostcopy => {
                    let what = Op::PausePostcopy {
                        vm: vm.name.clone(),
                    };
                    self.log(
                        Level::Warn,
                        id,
                        format!(
                            "the post-copy of {} made no progress: breaking it off to recover it",
                            vm.name
                        ),
                    );
                    self.run(owner, OpKind::PausePostcopy, what, Some(guest_op));
                }
                SourceAction::ResumePostcopy { address } => {
                    let what = Op::ResumePostcopy {
                        vm: vm.name.clone(),
                        address,
                    };
                    self.run(owner, OpKind::ResumePostcopy, what, Some(guest_op));
                }
                SourceAction::StartPostcopy => {
                    let what = Op::StartPostcopy {
                        vm: vm.name.clone(),
                    };
                    self.run(owner, OpKind::StartPostcopy, what, Some(guest_op));
                }
                SourceAction::CancelTransfer => {
                    let what = Op::CancelTransfer {
                        vm: vm.name.clone(),
                    };
                    let op = self.run(owner, OpKind::CancelTransfer, what, Some(guest_op));
                    let transfer = self.sources.get_mut(id).and_then(|s| {
                        s.cancel = Some(op);
                        s.transfer
                    });
                    // The transfer must end within the same deadline.
                    if let Some(t) = transfer.and_then(|t| self.ops.get_mut(&t)) {
                        t.deadline = Some(self.now + guest_op);
                    }
                }
                SourceAction::SendFinish(c3) => {
                    let request = PeerCall::Finish(proto::FinishRequest {
                        cookie3: c3.encode_to_vec(),
                    });
                    let deadline = self.finish_deadline(vm.features.len());
                    self.call(owner, CallKind::Finish, &peer, request, Some(deadline));
                }
                SourceAction::SendAbort { reason } => {
                    let request = PeerCall::Abort(proto::PeerAbortRequest {
                        attempt_id,
                        reason,
                        from_host: self.cfg.name.clone(),
                        cookie4: Vec::new(),
                        cause: String::new(),
                    });
                    self.call(owner, CallKind::Abort, &peer, request, Some(peer_timeout));
                }
                SourceAction::SendResolve => {
                    let request = PeerCall::Resolve(proto::ResolveRequest { attempt_id });
                    self.call(owner, CallKind::Resolve, &peer, request, Some(peer_timeout));
                }
                SourceAction::SendHeartbeat => {
                    let request = PeerCall::Heartbeat(proto::HeartbeatRequest {
                        from_host: self.cfg.name.clone(),
                        attempt_ids: vec![attempt_id],
                    });
                    self.call(
                        owner,
                        CallKind::Heartbeat,
                        &peer,
                        request,
                        Some(peer_timeout),
                    );
                }
                SourceAction::ResumeGuest => {
                    let what = Op::Resume {
                        vm: vm.name.clone(),
                    };
                    self.run(owner, OpKind::Resume, what, Some(guest_op));
                }
                SourceAction::KillGuest => {
                    let what = Op::Kill {
                        vm: vm.name.clone(),
                    };
                    self.run(owner, OpKind::Kill, what, Some(guest_op));
                }
                SourceAction::RunStage { feature, stage } => {
                    self.run_stage(owner, &vm, feature, stage, &attempt_id, &migration_id);
                }
                SourceAction::RecordPending { work, error } => {
                    self.record_pending(&vm, &attempt_id, &migration_id, work, error);
                }
                SourceAction::Finished(outcome) => self.source_finished(id, outcome),
            }
        }
        self.source_settled(id);
    }

    /// After a batch of actions: whether the attempt is live, its lock, and
    /// its record published.
    fn source_settled(&mut self, id: &str) {
        let Some(s) = self.sources.get_mut(id) else {
            return;
        };
        s.live = !s.attempt.is_done();
        let record = s.attempt.record.clone();
        if s.live {
            // An attempt brought back to life (a wrong forced decision)
            // takes its VM's lock again, if nobody holds it.
            let vm = s.attempt.vm.name.clone();
            self.locks.entry(vm).or_insert_with(|| id.to_string());
        }
        self.emit(Event::Migration(Box::new(record)));
    }

    fn source_finished(&mut self, id: &str, outcome: Outcome) {
        let Some(s) = self.sources.get_mut(id) else {
            return;
        };
        let waiters = std::mem::take(&mut s.waiters);
        let a = &s.attempt;
        let (vm, destination) = (a.vm.name.clone(), a.destination.clone());
        let record = a.record.clone();
        if self.locks.get(&vm).is_some_and(|m| m == id) {
            self.locks.remove(&vm);
        }
        let level = match outcome {
            Outcome::Succeeded => Level::Info,
            Outcome::Degraded | Outcome::Aborted => Level::Warn,
            _ => Level::Error,
        };
        let error = record
            .error
            .as_deref()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        let text = format!(
            "{vm} {} -> {destination} {}{error}",
            self.cfg.name,
            outcome.as_str()
        );
        self.log(level, id, text);
        self.emit(Event::Vm(vm));
        self.emit(Event::Host);
        for req in waiters {
            self.reply(req, Ok(Response::Migration(Box::new(record.clone()))));
        }
        self.evacuations_wake();
    }

    /// How long Finish may take on the destination: the transfer arriving,
    /// each finish stage, the resume and, if it fails, a kill and a status.
    fn finish_deadline(&self, features: usize) -> Millis {
        let d = &self.cfg.deadlines;
        self.cfg.timing.peer_timeout_ms
            + d.incoming_complete_ms
            + d.stage_ms * (features as Millis + 1)
            + 3 * d.guest_op_ms
    }

    // ---- destination -------------------------------------------------------------

    pub(super) fn destination_input(&mut self, id: &str, input: DestinationInput) {
        let now = self.now;
        let Some(d) = self.destinations.get_mut(id) else {
            return;
        };
        let actions = d.attempt.handle(now, input);
        self.destination_actions(id, actions);
    }

    pub(super) fn destination_actions(&mut self, id: &str, actions: Vec<DestinationAction>) {
        for action in actions {
            let Some(d) = self.destinations.get(id) else {
                return;
            };
            let a = &d.attempt;
            let (vm, migration_id, source) =
                (a.vm.clone(), a.migration_id.clone(), a.source.clone());
            let owner = Owner::Destination(id.to_string());
            let deadlines = self.cfg.deadlines;
            match action {
                DestinationAction::Journal(snapshot) => {
                    let durable = destination_durable(&snapshot);
                    self.journal(Entry::Destination(snapshot), durable);
                }
                DestinationAction::StartIncoming => {
                    let what = Op::StartIncoming {
                        spec: vm.clone(),
                        attempt_id: id.to_string(),
                        postcopy: d.attempt.postcopy,
                    };
                    self.run(
                        owner,
                        OpKind::StartIncoming,
                        what,
                        Some(deadlines.incoming_start_ms),
                    );
                }
                DestinationAction::CompleteIncoming(stats) => {
                    let what = Op::CompleteIncoming {
                        vm: vm.name.clone(),
                        stats,
                    };
                    self.run(
                        owner,
                        OpKind::CompleteIncoming,
                        what,
                        Some(deadlines.incoming_complete_ms),
                    );
                }
                DestinationAction::AwaitSwitchover => {
                    // No deadline: only the transfer's end decides.
                    let what = Op::AwaitSwitchover {
                        vm: vm.name.clone(),
                    };
                    self.run(owner, OpKind::AwaitSwitchover, what, None);
                }
                DestinationAction::RunStage { feature, stage } => {
                    self.run_stage(owner, &vm, feature, stage, id, &migration_id);
                }
                DestinationAction::ResumeGuest => {
                    let what = Op::Resume {
                        vm: vm.name.clone(),
                    };
                    self.run(owner, OpKind::Resume, what, Some(deadlines.guest_op_ms));
                    let committed = self
                        .destinations
                        .get(id)
                        .is_some_and(|d| d.attempt.is_committed());
                    if planted(Mutation::ReplyCommittedBeforeResume) && committed {
                        self.reply_finish_waiters(id);
                    }
                }
                DestinationAction::KillGuest => {
                    let what = Op::Kill {
                        vm: vm.name.clone(),
                    };
                    self.run(owner, OpKind::Kill, what, Some(deadlines.guest_op_ms));
                }
                DestinationAction::QueryGuest => {
                    let what = Op::Status {
                        vm: vm.name.clone(),
                    };
                    self.run(owner, OpKind::Status, what, Some(deadlines.guest_op_ms));
                }
                DestinationAction::RecordPending { work, error } => {
                    self.record_pending(&vm, id, &migration_id, work, error);
                }
                DestinationAction::ReplyPrepare(c2) => {
                    let waiter = self
                        .destinations
                        .get_mut(id)
                        .and_then(|d| d.prepare_waiter.take());
                    if let Some(req) = waiter {
                        let reply = proto::PrepareReply {
                            cookie2: c2.encode_to_vec(),
                        };
                        self.reply(req, Ok(Response::Peer(PeerResponse::Prepare(reply))));
                    }
                }
                DestinationAction::ReplyFinish(c4) => {
                    let waiters = self
                        .destinations
                        .get_mut(id)
                        .map(|d| std::mem::take(&mut d.finish_waiters))
                        .unwrap_or_default();
                    for req in waiters {
                        let reply = proto::FinishReply {
                            cookie4: c4.encode_to_vec(),
                        };
                        self.reply(req, Ok(Response::Peer(PeerResponse::Finish(reply))));
                    }
                }
                DestinationAction::NotifySource { reason } => {
                    let cookie4 = self
                        .destinations
                        .get(id)
                        .map(|d| d.attempt.cookie4().encode_to_vec())
                        .unwrap_or_default();
                    // This host's own reasons: it stops, or its source
                    // went silent.
                    let cause = if self.stopping.is_some() {
                        crate::protocol::Cause::Signal
                    } else {
                        crate::protocol::Cause::PeerLost
                    };
                    let request = PeerCall::Abort(proto::PeerAbortRequest {
                        attempt_id: id.to_string(),
                        reason,
                        from_host: self.cfg.name.clone(),
                        cookie4,
                        cause: cause.as_str().to_string(),
                    });
                    let timeout = self.cfg.timing.peer_timeout_ms;
                    self.call(owner, CallKind::Abort, &source, request, Some(timeout));
                }
                DestinationAction::GuestLost { reason } => {
                    let text = format!(
                        "{} committed on {} but its guest is lost: {reason}. Its source keeps its copy paused; \
                         an operator decides (tern resolve {migration_id} on {source})",
                        vm.name, self.cfg.name
                    );
                    self.log(Level::Error, &migration_id, text);
                    self.emit(Event::Vm(vm.name.clone()));
                }
                DestinationAction::Finished { committed } => {
                    let error = self
                        .destinations
                        .get(id)
                        .and_then(|d| d.attempt.error.clone());
                    let (level, text) = if committed {
                        (
                            Level::Info,
                            format!(
                                "{} committed on {}: the guest runs here",
                                vm.name, self.cfg.name
                            ),
                        )
                    } else {
                        (
                            Level::Warn,
                            format!(
                                "{} rolled back on {}: {}",
                                vm.name,
                                self.cfg.name,
                                error.as_deref().unwrap_or("not committed")
                            ),
                        )
                    };
                    self.log(level, &migration_id, text);
                    self.emit(Event::Vm(vm.name.clone()));
                }
            }
        }
        let finished = self
            .destinations
            .get(id)
            .is_some_and(|d| d.attempt.is_finished());
        if finished {
            self.end_destination(id);
        }
    }

    fn reply_finish_waiters(&mut self, id: &str) {
        let Some(d) = self.destinations.get_mut(id) else {
            return;
        };
        let c4 = d.attempt.cookie4();
        for req in std::mem::take(&mut d.finish_waiters) {
            let reply = proto::FinishReply {
                cookie4: c4.encode_to_vec(),
            };
            self.out.push(Action::Reply {
                req,
                reply: Ok(Response::Peer(PeerResponse::Finish(reply))),
            });
        }
    }

    /// The attempt ended here: answer whoever still waits with its final
    /// state, and keep it for later questions.
    fn end_destination(&mut self, id: &str) {
        let Some(d) = self.destinations.remove(id) else {
            return;
        };
        let a = d.attempt;
        if let Some(req) = d.prepare_waiter {
            let reply = proto::PrepareReply {
                cookie2: a.cookie2(false).encode_to_vec(),
            };
            self.reply(req, Ok(Response::Peer(PeerResponse::Prepare(reply))));
        }
        for req in d.finish_waiters {
            let reply = proto::FinishReply {
                cookie4: a.cookie4().encode_to_vec(),
            };
            self.reply(req, Ok(Response::Peer(PeerResponse::Finish(reply))));
        }
        for req in d.abort_waiters {
            let reply = self.abort_reply_of(&a);
            self.reply(req, Ok(Response::Peer(PeerResponse::Abort(reply))));
        }
        self.ended.insert(id.to_string(), a);
        self.emit(Event::Host);
        self.evacuations_wake();
    }

    /// What an abort of an attempt that is over here is answered.
    pub(super) fn abort_reply_of(&self, a: &DestinationAttempt) -> proto::PeerAbortReply {
        if a.is_committed() {
            proto::PeerAbortReply {
                aborted: false,
                detail: format!(
                    "attempt {} has committed on {}",
                    a.attempt_id, self.cfg.name
                ),
                cookie4: Vec::new(),
                committed: true,
            }
        } else {
            proto::PeerAbortReply {
                aborted: true,
                detail: "rolled back".into(),
                cookie4: a.cookie4().encode_to_vec(),
                committed: false,
            }
        }
    }

    /// Peer aborts waited long enough for the rollback: answer them now,
    /// without its results.
    pub(super) fn abort_waiters_out_of_time(&mut self, id: &str) {
        let Some(d) = self.destinations.get_mut(id) else {
            return;
        };
        d.abort_deadline = None;
        for req in std::mem::take(&mut d.abort_waiters) {
            let reply = proto::PeerAbortReply {
                aborted: true,
                detail: "rolling back".into(),
                cookie4: Vec::new(),
                committed: false,
            };
            self.out.push(Action::Reply {
                req,
                reply: Ok(Response::Peer(PeerResponse::Abort(reply))),
            });
        }
    }

    // ---- stages ---------------------------------------------------------------

    /// Run a feature stage, or answer it here when this host has no driver
    /// for the feature: prepare and finish fail (in fast mode that is
    /// recorded, not fatal), and rollback and release have nothing to undo.
    pub(super) fn run_stage(
        &mut self,
        owner: Owner,
        vm: &VmSpec,
        feature: usize,
        stage: Stage,
        attempt_id: &str,
        migration_id: &str,
    ) {
        let Some(spec) = vm.features.get(feature) else {
            let result = Err(format!("VM {} has no feature #{feature}", vm.name));
            self.internal.push_back((
                owner,
                Internal::Stage {
                    feature,
                    stage,
                    result,
                },
            ));
            return;
        };
        if !self.cfg.features.contains_key(&spec.name) {
            let host = &self.cfg.name;
            let result = match stage {
                Stage::Prepare | Stage::Finish => {
                    Err(format!("feature {} is not configured on {host}", spec.name))
                }
                Stage::Rollback | Stage::Release => Ok(format!(
                    "nothing to undo: {} has no driver on {host}",
                    spec.name
                )),
                Stage::Verify => Ok(format!(
                    "nothing to verify: {} has no driver on {host}",
                    spec.name
                )),
            };
            self.internal.push_back((
                owner,
                Internal::Stage {
                    feature,
                    stage,
                    result,
                },
            ));
            return;
        }
        let ctx = StageContext {
            host: self.cfg.name.clone(),
            vm: vm.name.clone(),
            feature: spec.clone(),
            stage,
            attempt_id: attempt_id.to_string(),
            migration_id: migration_id.to_string(),
            nics: NicPort::of(vm),
            guest: None,
        };
        let deadline = self.cfg.deadlines.stage_ms;
        self.run(
            owner,
            OpKind::Stage { feature, stage },
            Op::Stage(ctx),
            Some(deadline),
        );
    }

    /// Answers the core gave itself, in order, until none is left.
    pub(super) fn drain_internal(&mut self) {
        while let Some((owner, internal)) = self.internal.pop_front() {
            let Internal::Stage {
                feature,
                stage,
                result,
            } = internal;
            match owner {
                Owner::Source(id, attempt_id) => {
                    if self.is_current_source(&id, &attempt_id) {
                        let input = SourceInput::StageDone {
                            feature,
                            stage,
                            result,
                        };
                        self.source_input(&id, input);
                    }
                }
                Owner::Destination(id) => {
                    let input = DestinationInput::StageDone {
                        feature,
                        stage,
                        result,
                    };
                    self.destination_input(&id, input);
                }
                Owner::Pending { key, batch } => self.pending_done(&key, batch, result),
                Owner::RepairHere(vm) => self.next_repair_stage(&vm, Some(result)),
                Owner::Evacuation(_) | Owner::Recover(_) | Owner::Repair(_) => {}
            }
        }
    }

    fn is_current_source(&self, id: &str, attempt_id: &str) -> bool {
        self.sources
            .get(id)
            .is_some_and(|s| s.attempt.attempt_id == attempt_id)
    }

    // ---- answers from the hypervisor and the drivers -----------------------

    pub(super) fn on_op_done(&mut self, op: OpId, result: Result<OpOutput, OpError>) {
        let Some(entry) = self.ops.remove(&op) else {
            // Timed out already, or never ours: too late.
            return;
        };
        self.op_answered(op, entry, Answered::Result(result));
    }

    pub(super) fn op_timed_out(&mut self, op: OpId, entry: OpEntry) {
        self.op_answered(op, entry, Answered::TimedOut);
    }

    fn op_answered(&mut self, op: OpId, entry: OpEntry, answer: Answered) {
        // A call that missed its deadline is reported against the limit it
        // had, not the moment the timer happened to run.
        let after = match (&answer, entry.deadline) {
            (Answered::TimedOut, Some(deadline)) => deadline.saturating_sub(entry.started),
            _ => self.now.saturating_sub(entry.started),
        };
        if let OpKind::Stage { feature, stage } = entry.kind {
            self.log_stage_failure(&entry.owner, feature, stage, &answer, after);
        }
        let late = || format!("did not answer within {after} ms");
        match entry.owner.clone() {
            Owner::Source(id, attempt_id) => {
                if !self.is_current_source(&id, &attempt_id) {
                    return;
                }
                self.source_op_answered(&id, op, entry.kind, answer, after);
            }
            Owner::Destination(id) => {
                let input = match (entry.kind, answer) {
                    (OpKind::StartIncoming, Answered::Result(Ok(OpOutput::Address(a)))) => {
                        DestinationInput::IncomingStarted(Ok(a))
                    }
                    (OpKind::StartIncoming, Answered::Result(Ok(other))) => {
                        DestinationInput::IncomingStarted(Err(GuestOpError::Failed(format!(
                            "the hypervisor gave no address ({other:?})"
                        ))))
                    }
                    (OpKind::StartIncoming, Answered::Result(Err(e))) => {
                        DestinationInput::IncomingStarted(Err(GuestOpError::Failed(e.to_string())))
                    }
                    (OpKind::StartIncoming, Answered::TimedOut) => {
                        DestinationInput::IncomingStarted(Err(GuestOpError::Unknown(late())))
                    }
                    (OpKind::CompleteIncoming, Answered::Result(r)) => {
                        DestinationInput::IncomingCompleted(
                            r.map(|_| ()).map_err(|e| e.to_string()),
                        )
                    }
                    (OpKind::CompleteIncoming, Answered::TimedOut) => {
                        DestinationInput::IncomingCompleted(Err(late()))
                    }
                    (OpKind::AwaitSwitchover, Answered::Result(r)) => {
                        DestinationInput::SwitchoverArrived(
                            r.map(|out| matches!(out, OpOutput::Arrived(true)))
                                .map_err(|e| e.to_string()),
                        )
                    }
                    (OpKind::AwaitSwitchover, Answered::TimedOut) => {
                        DestinationInput::SwitchoverArrived(Err(late()))
                    }
                    (OpKind::Resume, answer) => {
                        let result = guest_op_result(answer, after);
                        self.emit_vm_of_destination(&id);
                        if planted(Mutation::IgnoreFailedResume) {
                            DestinationInput::GuestResumed(Ok(()))
                        } else {
                            DestinationInput::GuestResumed(result)
                        }
                    }
                    (OpKind::Kill, answer) => {
                        self.emit_vm_of_destination(&id);
                        DestinationInput::GuestKilled(guest_op_result(answer, after))
                    }
                    (OpKind::Status, answer) => DestinationInput::GuestStatus(match answer {
                        Answered::Result(Ok(OpOutput::Status(Some(GuestState::Running)))) => {
                            GuestProbe::Running
                        }
                        Answered::Result(Ok(OpOutput::Status(Some(_)))) => GuestProbe::Stopped,
                        Answered::Result(Ok(OpOutput::Status(None))) => GuestProbe::Gone,
                        Answered::Result(Ok(other)) => {
                            GuestProbe::Unknown(format!("unexpected answer {other:?}"))
                        }
                        Answered::Result(Err(OpError::NoSuchGuest(_))) => GuestProbe::Gone,
                        Answered::Result(Err(e)) => GuestProbe::Unknown(e.to_string()),
                        Answered::TimedOut => GuestProbe::Unknown(late()),
                    }),
                    (OpKind::Stage { feature, stage }, Answered::Result(r)) => {
                        DestinationInput::StageDone {
                            feature,
                            stage,
                            result: r.map(stage_detail).map_err(|e| e.to_string()),
                        }
                    }
                    (OpKind::Stage { feature, stage }, Answered::TimedOut) => {
                        DestinationInput::StageTimedOut {
                            feature,
                            stage,
                            after_ms: after,
                        }
                    }
                    _ => return,
                };
                self.destination_input(&id, input);
            }
            Owner::Pending { key, batch } => {
                let result = match answer {
                    Answered::Result(Ok(out)) => Ok(stage_detail(out)),
                    Answered::Result(Err(OpError::NoSuchGuest(e))) => {
                        return self.pending_guest_gone(&key, batch, e);
                    }
                    Answered::Result(Err(e)) => Err(e.to_string()),
                    Answered::TimedOut => Err(late()),
                };
                self.pending_done(&key, batch, result);
            }
            Owner::Evacuation(id) => {
                let guests = match answer {
                    Answered::Result(Ok(OpOutput::Guests(g))) => Some(g),
                    _ => None,
                };
                self.evacuation_guests(&id, guests);
            }
            Owner::RepairHere(vm) => {
                let result = match answer {
                    Answered::Result(Ok(out)) => Ok(stage_detail(out)),
                    Answered::Result(Err(e)) => Err(e.to_string()),
                    Answered::TimedOut => Err(late()),
                };
                self.next_repair_stage(&vm, Some(result));
            }
            Owner::Repair(_) => {}
            // The destination's end of a paused post-copy listens again.
            Owner::Recover(req) => {
                let reply = match answer {
                    Answered::Result(Ok(OpOutput::Address(address))) => Ok(proto::RecoverReply {
                        address,
                        lost: false,
                        detail: String::new(),
                    }),
                    Answered::Result(Err(OpError::NoSuchGuest(e))) => Ok(proto::RecoverReply {
                        address: String::new(),
                        lost: true,
                        detail: e,
                    }),
                    Answered::Result(Ok(other)) => Err(super::Refusal::Unavailable(format!(
                        "the hypervisor gave no address ({other:?})"
                    ))),
                    Answered::Result(Err(e)) => Err(super::Refusal::Unavailable(format!(
                        "could not listen for the source again: {e}"
                    ))),
                    Answered::TimedOut => Err(super::Refusal::Unavailable(late())),
                };
                self.reply(
                    req,
                    reply.map(|r| super::Response::Peer(PeerResponse::Recover(r))),
                );
            }
        }
    }

    /// A stage that failed or did not answer: said in the log, with the VM.
    fn log_stage_failure(
        &mut self,
        owner: &Owner,
        feature: usize,
        stage: Stage,
        answer: &Answered,
        after: Millis,
    ) {
        let detail = match answer {
            Answered::Result(Err(e)) => e.to_string(),
            Answered::TimedOut => format!("did not answer within {after} ms"),
            Answered::Result(Ok(_)) => return,
        };
        let (vm, migration) = match owner {
            Owner::Source(id, _) => match self.sources.get(id) {
                Some(s) => (&s.attempt.vm, id.clone()),
                None => return,
            },
            Owner::Destination(id) => match self.destinations.get(id) {
                Some(d) => (&d.attempt.vm, d.attempt.migration_id.clone()),
                None => return,
            },
            _ => return,
        };
        let name = vm.features.get(feature).map_or("?", |f| f.name.as_str());
        let text = format!(
            "{name} {stage} failed on {} for {}: {detail}",
            self.cfg.name, vm.name
        );
        self.log(Level::Warn, &migration, text);
    }

    fn source_op_answered(
        &mut self,
        id: &str,
        op: OpId,
        kind: OpKind,
        answer: Answered,
        after: Millis,
    ) {
        let input = match (kind, answer) {
            (OpKind::TransferOut, answer) => {
                let Some(s) = self.sources.get_mut(id) else {
                    return;
                };
                if s.transfer == Some(op) {
                    s.transfer = None;
                }
                if matches!(
                    answer,
                    Answered::Result(Ok(OpOutput::Transferred(_))) | Answered::TimedOut
                ) {
                    s.transfer_completed = true;
                }
                if s.attempt.transfer_runs() {
                    let result = match answer {
                        Answered::Result(Ok(OpOutput::Transferred(stats))) => Ok(stats),
                        Answered::Result(Ok(_)) => Ok(TransferStats::default()),
                        Answered::Result(Err(e)) => Err(e.to_string()),
                        Answered::TimedOut => {
                            Err(format!("the transfer did not end within {after} ms"))
                        }
                    };
                    SourceInput::TransferDone(result)
                } else {
                    return self.maybe_transfer_stopped(id);
                }
            }
            (OpKind::CancelTransfer, answer) => {
                if let Answered::Result(Err(e)) = &answer {
                    let migration = id.to_string();
                    self.log(
                        Level::Warn,
                        &migration,
                        format!("cancelling the transfer: {e}"),
                    );
                }
                let Some(s) = self.sources.get_mut(id) else {
                    return;
                };
                s.cancel = None;
                if matches!(answer, Answered::TimedOut)
                    && let Some(transfer) = s.transfer.take()
                {
                    // The transfer did not stop in time: stop waiting for
                    // it, not knowing whether it completed.
                    s.transfer_completed = true;
                    self.ops.remove(&transfer);
                    self.out.push(Action::Cancel { op: transfer });
                }
                return self.maybe_transfer_stopped(id);
            }
            (OpKind::Resume, answer) => {
                self.emit_vm_of_source(id);
                SourceInput::GuestResumed(guest_op_result(answer, after))
            }
            (OpKind::PausePostcopy, answer) => {
                if let Err(e) = guest_op_result(answer, after) {
                    let migration = id.to_string();
                    self.log(
                        Level::Warn,
                        &migration,
                        format!("could not pause the stuck post-copy: {e}"),
                    );
                }
                return;
            }
            (OpKind::ResumePostcopy, answer) => {
                SourceInput::PostcopyResumed(guest_op_result(answer, after))
            }
            (OpKind::StartPostcopy, answer) => {
                self.emit_vm_of_source(id);
                SourceInput::PostcopyStarted(guest_op_result(answer, after))
            }
            (OpKind::Kill, answer) => {
                self.emit_vm_of_source(id);
                SourceInput::GuestKilled(guest_op_result(answer, after))
            }
            (OpKind::Stage { feature, stage }, Answered::Result(r)) => SourceInput::StageDone {
                feature,
                stage,
                result: r.map(stage_detail).map_err(|e| e.to_string()),
            },
            (OpKind::Stage { feature, stage }, Answered::TimedOut) => SourceInput::StageTimedOut {
                feature,
                stage,
                after_ms: after,
            },
            _ => return,
        };
        self.source_input(id, input);
    }

    /// A cancelled transfer has stopped once the cancel call answered and
    /// the transfer itself ended (or was given up on).
    fn maybe_transfer_stopped(&mut self, id: &str) {
        let Some(s) = self.sources.get(id) else {
            return;
        };
        let cancelling = matches!(
            s.attempt.state,
            SourceState::Aborting {
                step: crate::protocol::source::AbortStep::Cancelling,
                ..
            }
        );
        if cancelling && s.cancel.is_none() && s.transfer.is_none() {
            let completed = s.transfer_completed;
            self.source_input(id, SourceInput::TransferStopped { completed });
        }
    }

    pub(super) fn on_progress(&mut self, op: OpId, stats: TransferStats) {
        let now = self.now;
        let Some((id, _)) = self
            .sources
            .iter()
            .find(|(_, s)| s.live && s.transfer == Some(op))
        else {
            return;
        };
        let id = id.clone();
        let Some(s) = self.sources.get_mut(&id) else {
            return;
        };
        let actions = s.attempt.handle(now, SourceInput::TransferProgress(stats));
        if now >= s.last_progress_event + PROGRESS_EVERY_MS {
            s.last_progress_event = now;
            let event = Event::Progress {
                migration_id: id.clone(),
                attempt_id: s.attempt.attempt_id.clone(),
                stats,
                convergence: s.attempt.record.convergence.clone(),
            };
            self.emit(event);
        }
        // The completion policy may act on a sample (abort, switch over).
        self.source_actions(&id, actions);
    }

    fn emit_vm_of_source(&mut self, id: &str) {
        if let Some(s) = self.sources.get(id) {
            let vm = s.attempt.vm.name.clone();
            self.emit(Event::Vm(vm));
        }
    }

    fn emit_vm_of_destination(&mut self, id: &str) {
        if let Some(d) = self.destinations.get(id) {
            let vm = d.attempt.vm.name.clone();
            self.emit(Event::Vm(vm));
        }
    }

    // ---- answers from peers ------------------------------------------------------

    pub(super) fn on_peer_replied(
        &mut self,
        call: super::CallId,
        reply: Result<PeerResponse, crate::protocol::PeerError>,
    ) {
        use crate::protocol::PeerError;
        use crate::protocol::source::{AbortAnswer, Resolution};
        let Some(entry) = self.calls.remove(&call) else {
            return;
        };
        match entry.owner {
            Owner::Source(id, attempt_id) => {
                if !self.is_current_source(&id, &attempt_id) {
                    return;
                }
                let input = match (entry.kind, reply) {
                    (CallKind::Prepare, reply) => {
                        SourceInput::PrepareReplied(reply.and_then(|r| {
                            match r {
                                PeerResponse::Prepare(r) => {
                                    cookies::decode::<proto::Cookie2>("C2", &r.cookie2)
                                        .map_err(|e| PeerError::Refused(e.to_string()))
                                }
                                other => Err(PeerError::Refused(format!(
                                    "unexpected answer to Prepare: {other:?}"
                                ))),
                            }
                        }))
                    }
                    (CallKind::Finish, reply) => SourceInput::FinishReplied(reply.and_then(|r| {
                        match r {
                            // A C4 that does not decode says nothing: unknown.
                            PeerResponse::Finish(r) => {
                                cookies::decode::<proto::Cookie4>("C4", &r.cookie4)
                                    .map_err(|e| PeerError::Unreachable(e.to_string()))
                            }
                            other => Err(PeerError::Unreachable(format!(
                                "unexpected answer to Finish: {other:?}"
                            ))),
                        }
                    })),
                    (CallKind::Resolve, reply) => {
                        SourceInput::ResolveReplied(reply.and_then(|r| {
                            let PeerResponse::Resolve(r) = r else {
                                return Err(PeerError::Unreachable(
                                    "unexpected answer to Resolve".into(),
                                ));
                            };
                            let c4 = || {
                                cookies::decode::<proto::Cookie4>("C4", &r.cookie4)
                                    .map_err(|e| PeerError::Unreachable(e.to_string()))
                            };
                            match proto::Resolution::try_from(r.resolution) {
                                Ok(proto::Resolution::Committed) => {
                                    Ok(Resolution::Committed(c4()?))
                                }
                                Ok(proto::Resolution::NotCommitted) => {
                                    Ok(Resolution::NotCommitted(c4()?))
                                }
                                Ok(proto::Resolution::Lost) => Ok(Resolution::Lost(c4()?)),
                                Ok(proto::Resolution::Pending) => Ok(Resolution::Pending),
                                _ => Err(PeerError::Unreachable("unknown resolution".into())),
                            }
                        }))
                    }
                    (CallKind::Heartbeat, reply) => {
                        SourceInput::HeartbeatReplied(reply.and_then(|r| match r {
                            PeerResponse::Heartbeat(r) => Ok(!r.gone.contains(&attempt_id)),
                            _ => Err(PeerError::Unreachable(
                                "unexpected answer to Heartbeat".into(),
                            )),
                        }))
                    }
                    (CallKind::Abort, reply) => SourceInput::AbortReplied(reply.and_then(|r| {
                        let PeerResponse::Abort(r) = r else {
                            return Err(PeerError::Unreachable(
                                "unexpected answer to Abort".into(),
                            ));
                        };
                        let c4 = (!r.cookie4.is_empty())
                            .then(|| cookies::decode::<proto::Cookie4>("C4", &r.cookie4).ok())
                            .flatten();
                        Ok(AbortAnswer {
                            aborted: r.aborted,
                            committed: r.committed,
                            detail: r.detail,
                            c4,
                        })
                    })),
                    (CallKind::Recover, reply) => {
                        SourceInput::RecoverReplied(reply.and_then(|r| {
                            let PeerResponse::Recover(r) = r else {
                                return Err(PeerError::Unreachable(
                                    "unexpected answer to Recover".into(),
                                ));
                            };
                            Ok(crate::protocol::source::RecoverAnswer {
                                address: r.address,
                                lost: r.lost,
                                detail: r.detail,
                            })
                        }))
                    }
                    (CallKind::Capacity { .. } | CallKind::Repair, _) => return,
                };
                self.source_input(&id, input);
            }
            Owner::Pending { key, batch } => self.notified(&key, batch, reply),
            Owner::Repair(id) => self.repair_replied(&id, reply),
            // The source of an attempt this host rolled back has heard.
            Owner::Destination(_) | Owner::Recover(_) | Owner::RepairHere(_) => {}
            Owner::Evacuation(id) => {
                let CallKind::Capacity { deadline } = entry.kind else {
                    return;
                };
                self.evacuation_capacity(&id, &entry.peer, deadline, reply);
            }
        }
    }
}

/// An op's answer, or the absence of one by its deadline.
enum Answered {
    Result(Result<OpOutput, OpError>),
    TimedOut,
}

fn guest_op_result(answer: Answered, after: Millis) -> Result<(), GuestOpError> {
    match answer {
        Answered::Result(Ok(_)) => Ok(()),
        Answered::Result(Err(OpError::NoSuchGuest(e))) => Err(GuestOpError::Gone(e)),
        Answered::Result(Err(OpError::Failed(e))) => Err(GuestOpError::Failed(e)),
        Answered::Result(Err(OpError::Unknown(e))) => Err(GuestOpError::Unknown(e)),
        Answered::TimedOut => Err(GuestOpError::Unknown(format!(
            "did not answer within {after} ms"
        ))),
    }
}

fn stage_detail(out: OpOutput) -> String {
    match out {
        OpOutput::Stage(detail) => detail,
        _ => "done".to_string(),
    }
}

/// Which destination journal writes must survive a power loss before what
/// follows them: the write before a prepare stage reaches outside the host,
/// every "never commits" decision, and the commit until the guest is seen
/// to run.
fn destination_durable(snapshot: &DestinationAttempt) -> bool {
    match snapshot.state {
        DestinationState::Preparing { .. }
        | DestinationState::RollingBack { .. }
        | DestinationState::RolledBack => true,
        DestinationState::Committed => !snapshot.guest_runs(),
        // Ready for the switchover: the source switches on the strength of
        // it, and a restart must wait for the switchover, never roll back.
        DestinationState::SwitchoverReady => true,
        DestinationState::Starting
        | DestinationState::Prepared
        | DestinationState::Finishing { .. } => snapshot.decided_not_to_commit(),
    }
}
