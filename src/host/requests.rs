//! What consoles and peers ask of the host, with every admission check: an
//! operator's request, a peer's Prepare, Finish, Abort, Resolve, Heartbeat
//! and Capacity. A refusal says what was wrong and changes nothing.

use prost::Message;

use super::admission::{Ready, cookie_refusal, first_refusal, prepare_refusal};

use crate::protocol::completion::{Completion, CompletionRequest};

use super::{
    Destination, Entry, HostCore, Level, Op, PeerCall, PeerResponse, Refusal, ReqId, Request,
    Response, Source,
};
use crate::hypervisor::Guest;
use crate::proto;
use crate::protocol::bounds::{self, BoundsError, IdKind};
use crate::protocol::cookies;
use crate::protocol::destination::{
    Answer, DestinationAttempt, DestinationInput, forgotten_commit, unknown_attempt,
};
use crate::protocol::record::MigrationRecord;
use crate::protocol::source::{AttemptParams, SourceAttempt, SourceInput};
use crate::protocol::{Cause, Mode, Outcome, RunOn};

/// The names and ids in a request, checked by the rules every host applies
/// ([`bounds`]) before anything is looked up. Cookies are checked when they
/// are decoded ([`cookies::decode`]).
fn check_request(request: &Request) -> Result<(), BoundsError> {
    use bounds::{MAX_EXCLUDED_HOSTS, MAX_HEARTBEAT_IDS, MAX_TEXT_LEN, check_count, check_text};
    use bounds::{check_id, check_name};
    match request {
        Request::StartMigration {
            vm, destination, ..
        } => {
            check_name("StartMigrationRequest.vm", vm)?;
            check_name("StartMigrationRequest.destination", destination)
        }
        Request::Retry {
            id, destination, ..
        } => {
            check_id("RetryRequest.id", id, IdKind::Migration)?;
            match destination {
                Some(d) => check_name("RetryRequest.destination", d),
                None => Ok(()),
            }
        }
        Request::Abort { id } => check_id("MigrationRef.id", id, IdKind::Migration),
        Request::Force { id, .. } => check_id("ForceResolveRequest.id", id, IdKind::Migration),
        Request::RunPending { migration_id } | Request::ForgetPending { migration_id } => {
            check_id("MigrationRef.id", migration_id, IdKind::Migration)
        }
        Request::Evacuate { request, .. } => {
            check_count(
                "EvacuateRequest.exclude",
                request.exclude.len(),
                MAX_EXCLUDED_HOSTS,
            )?;
            for (i, host) in request.exclude.iter().enumerate() {
                check_name(&format!("EvacuateRequest.exclude[{i}]"), host)?;
            }
            Ok(())
        }
        Request::ControlEvacuation { id, .. } => {
            check_id("ControlEvacuationRequest.id", id, IdKind::Evacuation)
        }
        Request::Undrain => Ok(()),
        Request::Repair { vm, feature, who } => {
            check_name("RepairRequest.vm", vm)?;
            if let Some(feature) = feature {
                check_name("RepairRequest.feature", feature)?;
            }
            check_text("who", who, MAX_TEXT_LEN)
        }
        Request::Peer { call, .. } => match call {
            PeerCall::Prepare(_) | PeerCall::Finish(_) | PeerCall::Capacity(_) => Ok(()),
            PeerCall::Abort(r) => {
                check_id(
                    "PeerAbortRequest.attempt_id",
                    &r.attempt_id,
                    IdKind::Attempt,
                )?;
                check_name("PeerAbortRequest.from_host", &r.from_host)?;
                check_text("PeerAbortRequest.reason", &r.reason, MAX_TEXT_LEN)
            }
            PeerCall::Resolve(r) => {
                check_id("ResolveRequest.attempt_id", &r.attempt_id, IdKind::Attempt)
            }
            PeerCall::Recover(r) => {
                check_id("RecoverRequest.attempt_id", &r.attempt_id, IdKind::Attempt)
            }
            PeerCall::Repair(r) => {
                check_id(
                    "PeerRepairRequest.attempt_id",
                    &r.attempt_id,
                    IdKind::Attempt,
                )?;
                check_id(
                    "PeerRepairRequest.migration_id",
                    &r.migration_id,
                    IdKind::Migration,
                )?;
                check_name("PeerRepairRequest.vm", &r.vm)?;
                check_count(
                    "PeerRepairRequest.features",
                    r.features.len(),
                    bounds::MAX_FEATURES,
                )?;
                for (i, f) in r.features.iter().enumerate() {
                    check_name(
                        &format!("PeerRepairRequest.features[{i}].feature"),
                        &f.feature,
                    )?;
                    check_count(
                        &format!("PeerRepairRequest.features[{i}].stages"),
                        f.stages.len(),
                        2,
                    )?;
                }
                Ok(())
            }
            PeerCall::Heartbeat(r) => {
                check_name("HeartbeatRequest.from_host", &r.from_host)?;
                check_count(
                    "HeartbeatRequest.attempt_ids",
                    r.attempt_ids.len(),
                    MAX_HEARTBEAT_IDS,
                )?;
                for (i, id) in r.attempt_ids.iter().enumerate() {
                    check_id(
                        &format!("HeartbeatRequest.attempt_ids[{i}]"),
                        id,
                        IdKind::Attempt,
                    )?;
                }
                Ok(())
            }
        },
    }
}

impl HostCore {
    pub(super) fn on_request(&mut self, req: ReqId, request: Request) {
        if let Err(e) = check_request(&request) {
            self.reply(req, Err(Refusal::InvalidArgument(e.to_string())));
            return;
        }
        match request {
            Request::StartMigration {
                vm,
                destination,
                mode,
                completion,
                guests,
            } => {
                let completion = completion.over(Completion::for_mode(mode));
                let reply = self
                    .begin(&vm, &destination, mode, completion, None, &guests)
                    .map(|r| Response::Migration(Box::new(r)));
                self.reply(req, reply);
            }
            Request::Retry {
                id,
                destination,
                mode,
                completion,
                guests,
            } => {
                let reply = self
                    .retry(&id, destination.as_deref(), mode, completion, &guests)
                    .map(|r| Response::Migration(Box::new(r)));
                self.reply(req, reply);
            }
            Request::Abort { id } => self.operator_abort(req, &id),
            Request::Force { id, run_on } => self.force(req, &id, run_on),
            Request::RunPending { migration_id } => self.run_pending_now(req, &migration_id),
            Request::ForgetPending { migration_id } => {
                let reply = self.forget_pending(&migration_id);
                self.reply(req, reply);
            }
            Request::Evacuate { request, guests } => {
                let reply = self.evacuate(request, &guests).map(Response::Evacuation);
                self.reply(req, reply);
            }
            Request::ControlEvacuation { id, control } => {
                let reply = self
                    .control_evacuation(&id, control)
                    .map(Response::Evacuation);
                self.reply(req, reply);
            }
            Request::Undrain => {
                let reply = self.undrain().map(|()| Response::Undrained);
                self.reply(req, reply);
            }
            Request::Repair { vm, feature, who } => self.repair(req, &vm, feature.as_deref(), &who),
            Request::Peer { call, guests, from } => {
                if let Err(refusal) = self.check_peer(&call, from.as_deref()) {
                    return self.reply(req, Err(refusal));
                }
                match call {
                    PeerCall::Prepare(r) => self.prepare(req, &r.cookie1, &guests, from),
                    PeerCall::Finish(r) => self.finish(req, &r.cookie3),
                    PeerCall::Abort(r) => self.peer_abort(req, r),
                    PeerCall::Resolve(r) => self.resolve(req, &r.attempt_id),
                    PeerCall::Heartbeat(r) => self.heartbeat(req, &r.attempt_ids),
                    PeerCall::Capacity(_) => {
                        let reply = self.capacity(&guests);
                        self.reply(req, Ok(Response::Peer(PeerResponse::Capacity(reply))));
                    }
                    PeerCall::Recover(r) => self.recover_incoming(req, &r.attempt_id, &guests),
                    PeerCall::Repair(r) => self.repair_here(req, r, &guests),
                }
            }
        }
    }

    // ---- Begin ------------------------------------------------------------------

    /// Begin: validate the VM and the destination, lock the VM, snapshot its
    /// spec and start the attempt. `existing`: a retry of that migration.
    pub(super) fn begin(
        &mut self,
        vm: &str,
        destination: &str,
        mode: Mode,
        completion: Completion,
        existing: Option<&MigrationRecord>,
        guests: &[Guest],
    ) -> Result<MigrationRecord, Refusal> {
        let name = self.cfg.name.clone();
        completion.check().map_err(Refusal::InvalidArgument)?;
        let admission = self.source_admission(vm, destination, guests)?;
        if let Some(refusal) = first_refusal(&admission.checks) {
            return Err(refusal);
        }
        let incoming_host = admission.incoming_host;
        let spec = self.with_drivers(&admission.guest.spec);
        let now = self.now;
        let (migration_id, attempt, started_at_ms) = match existing {
            Some(record) => (record.id.clone(), record.attempt + 1, record.started_at_ms),
            None => {
                let sources = &self.sources;
                let taken: Vec<String> = sources.keys().cloned().collect();
                let id = self.new_id(IdKind::Migration, |id| taken.iter().any(|t| t == id));
                (id, 1, now)
            }
        };
        let params = AttemptParams {
            migration_id: migration_id.clone(),
            attempt,
            host: name.clone(),
            destination: destination.to_string(),
            incoming_host,
            vm: spec,
            mode,
            completion,
            timing: self.cfg.timing,
            started_at_ms,
        };
        let (attempt, actions) = SourceAttempt::begin(params, now);
        let record = attempt.record.clone();
        self.locks.insert(vm.to_string(), migration_id.clone());
        self.sources.insert(
            migration_id.clone(),
            Source {
                attempt,
                live: true,
                transfer: None,
                cancel: None,
                transfer_completed: false,
                waiters: Vec::new(),
                last_progress_event: 0,
            },
        );
        self.log(
            Level::Info,
            &migration_id,
            format!(
                "{vm} {name} -> {destination} ({}, attempt {})",
                mode.as_str(),
                record.attempt
            ),
        );
        self.source_actions(&migration_id, actions);
        Ok(record)
    }

    /// A new attempt of a migration that failed or was aborted.
    fn retry(
        &mut self,
        id: &str,
        destination: Option<&str>,
        mode: Option<Mode>,
        completion: CompletionRequest,
        guests: &[Guest],
    ) -> Result<MigrationRecord, Refusal> {
        let record = self
            .migration(id)
            .cloned()
            .ok_or_else(|| Refusal::NotFound(format!("no migration {id} on {}", self.cfg.name)))?;
        match record.outcome {
            Some(Outcome::Failed) | Some(Outcome::Aborted)
                if self.sources.get(id).is_some_and(|s| !s.live) => {}
            Some(Outcome::Failed) | Some(Outcome::Aborted) | None => {
                return Err(Refusal::FailedPrecondition(format!(
                    "migration {id} is still running"
                )));
            }
            Some(other) => {
                return Err(Refusal::FailedPrecondition(format!(
                    "migration {id} ended {}: only a failed or aborted migration can be retried",
                    other.as_str()
                )));
            }
        }
        let destination = destination.unwrap_or(&record.destination).to_string();
        let new_mode = mode.unwrap_or(record.mode);
        let base = Completion::base(new_mode, Some((record.mode, record.completion)));
        let completion = completion.over(base);
        let mode = mode.unwrap_or(record.mode);
        self.begin(
            &record.vm,
            &destination,
            mode,
            completion,
            Some(&record),
            guests,
        )
    }

    fn operator_abort(&mut self, req: ReqId, id: &str) {
        let now = self.now;
        let name = self.cfg.name.clone();
        let Some(s) = self.sources.get_mut(id) else {
            self.reply(
                req,
                Err(Refusal::NotFound(format!("no migration {id} on {name}"))),
            );
            return;
        };
        if !s.live {
            let outcome = s.attempt.record.outcome.map(Outcome::as_str);
            self.reply(
                req,
                Err(Refusal::FailedPrecondition(format!(
                    "migration {id} has already ended ({}); nothing to abort",
                    outcome.unwrap_or("ending")
                ))),
            );
            return;
        }
        match s
            .attempt
            .abort(now, "aborted by the operator", Cause::Operator)
        {
            Ok(actions) => {
                s.waiters.push(req);
                let vm = s.attempt.vm.name.clone();
                self.log(
                    Level::Warn,
                    id,
                    format!("abort of {vm}: aborted by the operator"),
                );
                self.source_actions(id, actions);
            }
            Err(refusal) => self.reply(req, Err(Refusal::FailedPrecondition(refusal))),
        }
    }

    fn force(&mut self, req: ReqId, id: &str, run_on: RunOn) {
        let now = self.now;
        let name = self.cfg.name.clone();
        let Some(s) = self.sources.get_mut(id) else {
            self.reply(
                req,
                Err(Refusal::NotFound(format!("no migration {id} on {name}"))),
            );
            return;
        };
        match s.attempt.force_resolve(now, run_on) {
            Ok(actions) => {
                s.waiters.push(req);
                let vm = &s.attempt.vm.name;
                let text = match run_on {
                    RunOn::Source => format!(
                        "operator forces migration {id} of {vm}: the guest runs on {}",
                        s.attempt.host
                    ),
                    RunOn::Destination => format!(
                        "operator forces migration {id} of {vm}: the guest runs on {}",
                        s.attempt.destination
                    ),
                    RunOn::Nowhere => format!(
                        "operator declares the guest of migration {id} of {vm} lost (post-copy to {} cannot finish)",
                        s.attempt.destination
                    ),
                };
                self.log(Level::Warn, id, text);
                self.source_actions(id, actions);
            }
            Err(refusal) => self.reply(req, Err(Refusal::FailedPrecondition(refusal))),
        }
    }

    // ---- the Peer service, destination side ------------------------------------

    /// Prepare: decode and check C1, count and register the attempt in one
    /// step, then run it until it has prepared (or refused).
    fn prepare(&mut self, req: ReqId, cookie1: &[u8], guests: &[Guest], from: Option<String>) {
        match self.admit(cookie1, guests, from.as_deref()) {
            Ok((attempt, actions)) => {
                let id = attempt.attempt_id.clone();
                self.destinations
                    .insert(id.clone(), Destination::new(attempt, Some(req)));
                self.emit(super::Event::Host);
                self.destination_actions(&id, actions);
            }
            Err(refusal) => self.reply(req, Err(refusal)),
        }
    }

    fn admit(
        &mut self,
        cookie1: &[u8],
        guests: &[Guest],
        from: Option<&str>,
    ) -> Result<
        (
            DestinationAttempt,
            Vec<crate::protocol::destination::DestinationAction>,
        ),
        Refusal,
    > {
        let name = self.cfg.name.clone();
        let admission = self.prepare_admission(cookie1, guests, from, None)?;
        if let Some(refusal) = first_refusal(&admission.checks) {
            return Err(refusal);
        }
        let Some(Ready {
            incoming,
            free,
            already_here,
            busy,
        }) = admission.ready
        else {
            return Err(Refusal::InvalidArgument(format!(
                "C1 could not be read on {name}"
            )));
        };
        let verifiers = incoming
            .vm
            .features
            .iter()
            .map(|f| self.cfg.verifying.contains(&f.name))
            .collect();
        DestinationAttempt::prepare(
            incoming,
            &name,
            free,
            already_here,
            busy,
            self.cfg.timing,
            self.now,
        )
        .map(|(mut attempt, actions)| {
            attempt.set_verifiers(verifiers);
            (attempt, actions)
        })
        .map_err(prepare_refusal)
    }

    fn finish(&mut self, req: ReqId, cookie3: &[u8]) {
        let c3: proto::Cookie3 = match cookies::decode("C3", cookie3) {
            Ok(c3) => c3,
            Err(e) => return self.reply(req, Err(cookie_refusal(e))),
        };
        let id = c3.attempt_id.clone();
        if let Some(d) = self.destinations.get_mut(&id) {
            d.finish_waiters.push(req);
            self.destination_input(&id, DestinationInput::Finish(c3));
            return;
        }
        // Already decided (or never here): answer from what ended here.
        match self.ended.get(&id) {
            Some(a) => {
                let reply = proto::FinishReply {
                    cookie4: a.cookie4().encode_to_vec(),
                };
                self.reply(req, Ok(Response::Peer(PeerResponse::Finish(reply))));
            }
            None if self.committed.contains(&id) => {
                let reply = proto::FinishReply {
                    cookie4: forgotten_commit(&id).encode_to_vec(),
                };
                self.reply(req, Ok(Response::Peer(PeerResponse::Finish(reply))));
            }
            None => {
                let text = format!("no attempt {id} on {}", self.cfg.name);
                self.reply(req, Err(Refusal::NotFound(text)));
            }
        }
    }

    /// Either side telling this one that an attempt is over. On the
    /// destination, the answer waits (bounded) until the rollback is done,
    /// so a stopping source knows its peer is clean before it exits.
    fn peer_abort(&mut self, req: ReqId, r: proto::PeerAbortRequest) {
        let c4 = match (!r.cookie4.is_empty())
            .then(|| cookies::decode::<proto::Cookie4>("C4", &r.cookie4))
            .transpose()
        {
            Ok(c4) => c4,
            Err(e) => return self.reply(req, Err(cookie_refusal(e))),
        };
        // An attempt this host is (or was) the source of: the destination
        // aborted it, and may report its rollback and its decision. Who
        // sent it says which side it is for, should this host hold both
        // sides of one attempt id.
        let for_arriving = self
            .destinations
            .get(&r.attempt_id)
            .is_some_and(|d| d.attempt.source == r.from_host);
        let source = self
            .sources
            .iter()
            .find(|(_, s)| s.attempt.attempt_id == r.attempt_id)
            .filter(|_| !for_arriving)
            .map(|(id, _)| id.clone());
        if let Some(id) = source {
            let input = SourceInput::PeerAborted {
                reason: r.reason.clone(),
                cause: Cause::parse(&r.cause),
                c4,
            };
            self.source_input(&id, input);
            let reply = proto::PeerAbortReply {
                aborted: true,
                detail: String::new(),
                cookie4: Vec::new(),
                committed: false,
            };
            self.reply(req, Ok(Response::Peer(PeerResponse::Abort(reply))));
            return;
        }
        let now = self.now;
        if let Some(d) = self.destinations.get_mut(&r.attempt_id) {
            match d.attempt.abort(now, &r.reason, false) {
                Ok(actions) => {
                    d.abort_waiters.push(req);
                    let wait = 2 * self.cfg.timing.peer_timeout_ms;
                    d.abort_deadline.get_or_insert(now + wait);
                    self.destination_actions(&r.attempt_id, actions);
                }
                Err(detail) => {
                    let committed = d.attempt.is_committed();
                    let reply = proto::PeerAbortReply {
                        aborted: false,
                        detail,
                        cookie4: Vec::new(),
                        committed,
                    };
                    self.reply(req, Ok(Response::Peer(PeerResponse::Abort(reply))));
                }
            }
            return;
        }
        // A commit whose guest was lost: the operator decided it runs on
        // its source after all, so what it set up here goes.
        if self
            .ended
            .get(&r.attempt_id)
            .is_some_and(|a| a.lost().is_some())
            && let Some(attempt) = self.ended.remove(&r.attempt_id)
        {
            self.destinations
                .insert(r.attempt_id.clone(), Destination::new(attempt, None));
            return self.peer_abort(req, r);
        }
        if let Some(a) = self.ended.get(&r.attempt_id) {
            let reply = self.abort_reply_of(a);
            self.reply(req, Ok(Response::Peer(PeerResponse::Abort(reply))));
            return;
        }
        if self.committed.contains(&r.attempt_id) {
            let reply = proto::PeerAbortReply {
                aborted: false,
                detail: format!(
                    "attempt {} committed on {}: the guest runs here",
                    r.attempt_id, self.cfg.name
                ),
                cookie4: forgotten_commit(&r.attempt_id).encode_to_vec(),
                committed: true,
            };
            self.reply(req, Ok(Response::Peer(PeerResponse::Abort(reply))));
            return;
        }
        // Prepare may still be on its way: make sure it is refused, for good.
        self.tombstone(&r.attempt_id);
        let reply = proto::PeerAbortReply {
            aborted: true,
            detail: "not known here".into(),
            cookie4: Vec::new(),
            committed: false,
        };
        self.reply(req, Ok(Response::Peer(PeerResponse::Abort(reply))));
    }

    fn tombstone(&mut self, attempt_id: &str) {
        if self.tombstones.insert(attempt_id.to_string()) {
            self.journal(Entry::Tombstone(attempt_id.to_string()), true);
        }
    }

    /// Resolve: did this attempt commit here? "Not committed" leaves only
    /// once that decision is durable here.
    fn resolve(&mut self, req: ReqId, attempt_id: &str) {
        let now = self.now;
        let (answer, c4) = if let Some(d) = self.destinations.get_mut(attempt_id) {
            let (answer, actions) = d.attempt.resolve(now);
            self.destination_actions(attempt_id, actions);
            let c4 = self
                .destination_attempt(attempt_id)
                .map(DestinationAttempt::cookie4)
                .unwrap_or_default();
            (answer, c4)
        } else if let Some(a) = self.ended.get(attempt_id) {
            (a.answer(), a.cookie4())
        } else if self.committed.contains(attempt_id) {
            (Answer::Committed, forgotten_commit(attempt_id))
        } else {
            self.tombstone(attempt_id);
            (
                Answer::NotCommitted,
                unknown_attempt(&self.cfg.name, attempt_id),
            )
        };
        let resolution = match answer {
            Answer::Committed => proto::Resolution::Committed,
            Answer::NotCommitted => proto::Resolution::NotCommitted,
            Answer::Lost => proto::Resolution::Lost,
            Answer::Pending => proto::Resolution::Pending,
        };
        let reply = proto::ResolveReply {
            resolution: resolution as i32,
            cookie4: c4.encode_to_vec(),
        };
        self.reply(req, Ok(Response::Peer(PeerResponse::Resolve(reply))));
    }

    /// A heartbeat from the source of some attempts: each live one hears
    /// from its source; the others are gone.
    fn heartbeat(&mut self, req: ReqId, attempt_ids: &[String]) {
        let mut gone = Vec::new();
        for id in attempt_ids {
            if self.destinations.contains_key(id) {
                self.destination_input(id, DestinationInput::Heartbeat);
            } else {
                gone.push(id.clone());
            }
        }
        let reply = proto::HeartbeatReply {
            host: self.cfg.name.clone(),
            gone,
        };
        self.reply(req, Ok(Response::Peer(PeerResponse::Heartbeat(reply))));
    }

    /// Recover: a post-copy transfer to this host paused on a broken link.
    /// Only an attempt committed here after a switchover can be recovered;
    /// one whose guest is gone is lost, and the answer says so.
    fn recover_incoming(&mut self, req: ReqId, attempt_id: &str, guests: &[Guest]) {
        let attempt = self
            .destinations
            .get(attempt_id)
            .map(|d| &d.attempt)
            .or_else(|| self.ended.get(attempt_id));
        let Some(attempt) = attempt else {
            return self.reply(
                req,
                Err(Refusal::NotFound(format!(
                    "no attempt {attempt_id} arrived on {}",
                    self.cfg.name
                ))),
            );
        };
        if !attempt.committed_in_postcopy() {
            return self.reply(
                req,
                Err(Refusal::FailedPrecondition(format!(
                    "attempt {attempt_id} on {} is not committed in post-copy: nothing to recover",
                    self.cfg.name
                ))),
            );
        }
        let vm = attempt.vm.name.clone();
        if !guests.iter().any(|g| g.spec.name == vm) {
            let reply = proto::RecoverReply {
                address: String::new(),
                lost: true,
                detail: format!(
                    "the guest {vm} is gone from {} (its hypervisor lost it)",
                    self.cfg.name
                ),
            };
            return self.reply(req, Ok(Response::Peer(PeerResponse::Recover(reply))));
        }
        let what = Op::RecoverIncoming {
            vm,
            attempt_id: attempt_id.to_string(),
        };
        let deadline = self.cfg.deadlines.guest_op_ms;
        self.run(
            super::Owner::Recover(req),
            super::OpKind::RecoverIncoming,
            what,
            Some(deadline),
        );
    }

    /// A peer call is accepted only from the host its attempt is with: an
    /// attempt's Finish, Resolve, Heartbeat and abort come from its source;
    /// an abort of an attempt this host sources, from its destination. A
    /// host names itself in Abort and Heartbeat: that must be the host its
    /// certificate names. Without `from` (plaintext) every call is taken.
    fn check_peer(&self, call: &PeerCall, from: Option<&str>) -> Result<(), Refusal> {
        let Some(from) = from else {
            return Ok(());
        };
        let claims = |claimed: &str| {
            if claimed == from {
                Ok(())
            } else {
                Err(Refusal::PermissionDenied(format!(
                    "the call says it is from {claimed:?}, but its certificate names {from}"
                )))
            }
        };
        let arriving_from = |id: &str| -> Result<(), Refusal> {
            let source = self
                .destinations
                .get(id)
                .map(|d| &d.attempt.source)
                .or_else(|| self.ended.get(id).map(|a| &a.source));
            match source {
                Some(source) if source != from => Err(Refusal::PermissionDenied(format!(
                    "attempt {id} on {} is {source}'s: {from} may not act on it",
                    self.cfg.name
                ))),
                _ => Ok(()),
            }
        };
        match call {
            PeerCall::Prepare(_) | PeerCall::Capacity(_) => Ok(()),
            PeerCall::Finish(r) => {
                let c3: proto::Cookie3 =
                    cookies::decode("C3", &r.cookie3).map_err(cookie_refusal)?;
                arriving_from(&c3.attempt_id)
            }
            PeerCall::Resolve(r) => arriving_from(&r.attempt_id),
            PeerCall::Recover(r) => arriving_from(&r.attempt_id),
            // Only the source of the attempt that brought the VM here.
            PeerCall::Repair(r) => arriving_from(&r.attempt_id),
            PeerCall::Heartbeat(r) => {
                claims(&r.from_host)?;
                r.attempt_ids.iter().try_for_each(|id| arriving_from(id))
            }
            PeerCall::Abort(r) => {
                claims(&r.from_host)?;
                let arriving = self
                    .destinations
                    .get(&r.attempt_id)
                    .is_some_and(|d| d.attempt.source == from);
                let sourced_with = self
                    .sources
                    .values()
                    .find(|s| s.attempt.attempt_id == r.attempt_id)
                    .map(|s| s.attempt.destination.as_str());
                match sourced_with {
                    Some(destination) if !arriving && destination != from => {
                        Err(Refusal::PermissionDenied(format!(
                            "attempt {} from {} goes to {destination}: {from} may not abort it",
                            r.attempt_id, self.cfg.name
                        )))
                    }
                    Some(_) => Ok(()),
                    None => arriving_from(&r.attempt_id),
                }
            }
        }
    }

    /// This host's answer to `Capacity`.
    pub fn capacity(&self, guests: &[Guest]) -> proto::CapacityReply {
        let load = self.load(guests);
        proto::CapacityReply {
            host: self.cfg.name.clone(),
            memory_total_mib: self.cfg.capacity.memory_mib,
            memory_used_mib: load.memory_used_mib,
            vcpus_total: self.cfg.capacity.vcpus,
            vcpus_used: load.vcpus_used,
            features: self.cfg.features.keys().cloned().collect(),
            draining: self.draining,
            incoming: load.incoming,
            max_incoming: self.cfg.max_incoming,
        }
    }
}
