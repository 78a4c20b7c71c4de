//! Repairing a degraded VM, both ends. The source of the migration holds its
//! record: it checks the request, journals the intent (a running repair
//! entry) before anything runs, and asks the host the VM runs on (Peer
//! `Repair`). That host runs the stages with the same driver calls as a
//! migration, one after another, and answers their results; the source
//! journals them into the record and publishes it. What a repair re-runs
//! and what its results make of the record is decided in
//! [`crate::protocol::repair`].

use super::{CallKind, Entry, Event, HostCore, Level, Owner, PeerCall, PeerResponse};
use super::{Refusal, ReqId, Response};
use crate::hypervisor::{Guest, GuestState};
use crate::proto;
use crate::protocol::repair::{self, PlanError, StageRun};
use crate::protocol::{PeerError, Stage, VmSpec};

/// A repair this host runs for a VM that runs here.
#[derive(Debug, Clone)]
pub(super) struct RepairHere {
    req: ReqId,
    spec: VmSpec,
    attempt_id: String,
    migration_id: String,
    /// The stages still to run, in order: (feature index, name, stage).
    queue: Vec<(usize, String, Stage)>,
    results: Vec<proto::RepairStageResult>,
}

impl HostCore {
    // ---- the source: the record's owner ----------------------------------------

    /// `tern repair VM [--feature F]`: the VM's latest migration sourced here
    /// must be degraded, with a failed stage in the feature(s) asked for.
    pub(super) fn repair(&mut self, req: ReqId, vm: &str, feature: Option<&str>, who: &str) {
        match self.start_repair(vm, feature, who) {
            Ok(id) => {
                self.repair_waiters.insert(id, req);
            }
            Err(refusal) => self.reply(req, Err(refusal)),
        }
    }

    fn start_repair(
        &mut self,
        vm: &str,
        feature: Option<&str>,
        who: &str,
    ) -> Result<String, Refusal> {
        let name = self.cfg.name.clone();
        if self.stopping.is_some() {
            return Err(Refusal::Unavailable(format!(
                "agent {name} is shutting down"
            )));
        }
        let id = self
            .sources
            .values()
            .filter(|s| s.attempt.vm.name == vm)
            .max_by_key(|s| (s.attempt.record.started_at_ms, s.attempt.record.id.clone()))
            .map(|s| s.attempt.migration_id.clone())
            .ok_or_else(|| Refusal::NotFound(format!("{name} holds no migration of {vm}")))?;
        if let Some(holder) = self.lock_of(vm) {
            return Err(Refusal::FailedPrecondition(format!(
                "{vm} is migrating ({holder}): repair it once that migration has ended"
            )));
        }
        let s = self.sources.get_mut(&id).expect("found above");
        let plans = repair::plan(&s.attempt.record, feature).map_err(|e| match e {
            PlanError::UnknownFeature(m) => Refusal::InvalidArgument(m),
            PlanError::Running(m) => Refusal::AlreadyExists(m),
            PlanError::NotDegraded(m) | PlanError::NothingFailed(m) => {
                Refusal::FailedPrecondition(m)
            }
        })?;
        let host = s.attempt.record.running_on.clone();
        let attempt_id = s.attempt.attempt_id.clone();
        repair::begin(&mut s.attempt.record, &plans, who, self.now);
        let snapshot = Box::new(s.attempt.clone());
        let record = s.attempt.record.clone();
        // The intent is durable before the stages run on the other host: a
        // restart finds it and says the answer was never heard.
        self.journal(Entry::Source(snapshot), true);
        self.emit(Event::Migration(Box::new(record)));
        let what: Vec<String> = plans
            .iter()
            .map(|p| {
                let stages: Vec<&str> = p.stages.iter().map(|s| s.as_str()).collect();
                format!("{} {}", p.feature, stages.join("+"))
            })
            .collect();
        self.log(
            Level::Info,
            &id,
            format!("{who} repairs {vm} on {host}: {}", what.join(", ")),
        );
        let request = proto::PeerRepairRequest {
            attempt_id,
            migration_id: id.clone(),
            vm: vm.to_string(),
            features: plans
                .iter()
                .map(|p| proto::RepairStages {
                    feature: p.feature.clone(),
                    stages: p.stages.iter().map(|s| s.as_str().to_string()).collect(),
                })
                .collect(),
        };
        let stages = plans.iter().map(|p| p.stages.len() as u64).sum::<u64>();
        // Each stage has its deadline on the other host; the call waits for
        // all of them and a little more.
        let deadline = self.cfg.deadlines.stage_ms.saturating_mul(stages) + 5_000;
        self.call(
            Owner::Repair(id.clone()),
            CallKind::Repair,
            &host,
            PeerCall::Repair(request),
            Some(deadline),
        );
        Ok(id)
    }

    /// The host the VM runs on answered (or could not be reached).
    pub(super) fn repair_replied(&mut self, id: &str, reply: Result<PeerResponse, PeerError>) {
        let waiter = self.repair_waiters.remove(id);
        let Some(s) = self.sources.get_mut(id) else {
            // Forgotten meanwhile (retention): nothing to write it into.
            if let Some(req) = waiter {
                let gone = format!("{} no longer keeps migration {id}", self.cfg.name);
                self.reply(req, Err(Refusal::NotFound(gone)));
            }
            return;
        };
        let host = s.attempt.record.running_on.clone();
        let answer = match reply {
            Ok(PeerResponse::Repair(r)) => {
                let runs: Vec<StageRun> = r
                    .results
                    .iter()
                    .filter_map(|r| {
                        Some(StageRun {
                            feature: r.feature.clone(),
                            stage: Stage::parse(&r.stage)?,
                            result: if r.ok {
                                Ok(r.detail.clone())
                            } else {
                                Err(r.detail.clone())
                            },
                        })
                    })
                    .collect();
                repair::apply(&mut s.attempt.record, &runs, self.now);
                Ok(())
            }
            Ok(other) => {
                let e = format!("{host} answered Repair with {}", peer_answer_name(&other));
                repair::fail(&mut s.attempt.record, &e, self.now);
                Err(Refusal::Unavailable(e))
            }
            // The host refused (the VM no longer runs there, say): the
            // record says why; the answer is the record, still degraded.
            Err(PeerError::Refused(e) | PeerError::Busy(e) | PeerError::Full(e)) => {
                repair::fail(&mut s.attempt.record, &format!("{host}: {e}"), self.now);
                Ok(())
            }
            Err(PeerError::Unreachable(e)) => {
                let e = format!("{host} did not answer: {e}");
                repair::fail(&mut s.attempt.record, &e, self.now);
                Err(Refusal::Unavailable(e))
            }
        };
        let snapshot = Box::new(s.attempt.clone());
        let record = s.attempt.record.clone();
        self.journal(Entry::Source(snapshot), true);
        self.emit(Event::Migration(Box::new(record.clone())));
        if record.outcome == Some(crate::protocol::Outcome::Succeeded) {
            self.evacuated_vm_repaired(id);
        }
        let level = if record.outcome == Some(crate::protocol::Outcome::Succeeded) {
            Level::Info
        } else {
            Level::Warn
        };
        let text = format!(
            "repair of {} on {host}: {}",
            record.vm,
            record.outcome.map(|o| o.as_str()).unwrap_or("running")
        );
        self.log(level, id, text);
        if let Some(req) = waiter {
            let reply = answer.map(|()| Response::Migration(Box::new(record)));
            self.reply(req, reply);
        }
    }

    // ---- the host the VM runs on --------------------------------------------------

    /// Peer `Repair`: run the stages asked for a VM that runs here, one after
    /// another; a failed stage ends its feature's run.
    pub(super) fn repair_here(
        &mut self,
        req: ReqId,
        r: proto::PeerRepairRequest,
        guests: &[Guest],
    ) {
        let vm = r.vm.clone();
        match self.start_repair_here(req, r, guests) {
            Ok(()) => self.next_repair_stage(&vm, None),
            Err(refusal) => self.reply(req, Err(refusal)),
        }
    }

    fn start_repair_here(
        &mut self,
        req: ReqId,
        r: proto::PeerRepairRequest,
        guests: &[Guest],
    ) -> Result<(), Refusal> {
        let name = self.cfg.name.clone();
        let vm = r.vm.clone();
        if self.stopping.is_some() {
            return Err(Refusal::Unavailable(format!(
                "agent {name} is shutting down"
            )));
        }
        let guest = guests
            .iter()
            .find(|g| g.spec.name == vm && g.state == GuestState::Running)
            .ok_or_else(|| Refusal::FailedPrecondition(format!("{vm} does not run on {name}")))?;
        if let Some(holder) = self.lock_of(&vm) {
            return Err(Refusal::FailedPrecondition(format!(
                "{vm} is migrating from {name} ({holder})"
            )));
        }
        if self.repairs_here.contains_key(&vm) {
            return Err(Refusal::AlreadyExists(format!(
                "a repair of {vm} is running on {name} already"
            )));
        }
        let mut queue = Vec::new();
        for f in &r.features {
            let index = guest
                .spec
                .features
                .iter()
                .position(|spec| spec.name == f.feature)
                .ok_or_else(|| {
                    Refusal::InvalidArgument(format!("{vm} on {name} has no feature {}", f.feature))
                })?;
            for stage in &f.stages {
                let stage = Stage::parse(stage)
                    .filter(|s| matches!(s, Stage::Prepare | Stage::Finish | Stage::Verify))
                    .ok_or_else(|| {
                        Refusal::InvalidArgument(format!(
                            "a repair re-runs prepare, finish or verify, not {stage:?}"
                        ))
                    })?;
                // A driver that does not verify is not asked to.
                if stage == Stage::Verify && !self.cfg.verifying.contains(&f.feature) {
                    continue;
                }
                queue.push((index, f.feature.clone(), stage));
            }
        }
        self.repairs_here.insert(
            vm.clone(),
            RepairHere {
                req,
                spec: guest.spec.clone(),
                attempt_id: r.attempt_id,
                migration_id: r.migration_id,
                queue,
                results: Vec::new(),
            },
        );
        Ok(())
    }

    /// A stage of the repair of `vm` here ended (`done`), or the run starts
    /// (`None`): record it, then run the next stage or answer.
    pub(super) fn next_repair_stage(&mut self, vm: &str, done: Option<Result<String, String>>) {
        let vm = vm.to_string();
        let Some(run) = self.repairs_here.get_mut(&vm) else {
            return;
        };
        if let Some(result) = done {
            let (_, feature, stage) = run.queue.remove(0);
            let ok = result.is_ok();
            run.results.push(proto::RepairStageResult {
                feature: feature.clone(),
                stage: stage.as_str().to_string(),
                ok,
                detail: result.unwrap_or_else(|e| e),
            });
            if !ok {
                // What follows a failed stage of the same feature has
                // nothing to build on.
                run.queue.retain(|(_, f, _)| *f != feature);
            }
        }
        if let Some(&(index, _, stage)) = run.queue.first() {
            let spec = run.spec.clone();
            let (attempt_id, migration_id) = (run.attempt_id.clone(), run.migration_id.clone());
            self.run_stage(
                Owner::RepairHere(vm.clone()),
                &spec,
                index,
                stage,
                &attempt_id,
                &migration_id,
            );
            return;
        }
        let run = self.repairs_here.remove(&vm).expect("looked up above");
        let failed = run.results.iter().filter(|r| !r.ok).count();
        let text = format!(
            "repaired {vm} here: {} stage(s) run, {failed} failed",
            run.results.len()
        );
        let level = if failed == 0 {
            Level::Info
        } else {
            Level::Warn
        };
        self.log(level, &run.migration_id, text);
        // The host's feature state changed.
        self.emit(Event::Host);
        self.reply(
            run.req,
            Ok(Response::Peer(PeerResponse::Repair(
                proto::PeerRepairReply {
                    results: run.results,
                },
            ))),
        );
    }

    /// Whether a repair of `vm` runs here now (a migration of it waits).
    pub(super) fn is_repairing(&self, vm: &str) -> bool {
        self.repairs_here.contains_key(vm)
    }

    /// Recovery: repairs journaled as running never heard their answer.
    pub(super) fn interrupt_repairs(&mut self) {
        let ids: Vec<String> = self
            .sources
            .iter()
            .filter(|(_, s)| {
                s.attempt
                    .record
                    .repairs
                    .iter()
                    .any(|r| r.result == repair::RepairResult::Running)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            let Some(s) = self.sources.get_mut(&id) else {
                continue;
            };
            repair::interrupt(&mut s.attempt.record);
            let snapshot = Box::new(s.attempt.clone());
            let vm = s.attempt.vm.name.clone();
            self.journal(Entry::Source(snapshot), false);
            self.log(
                Level::Warn,
                &id,
                format!("a repair of {vm} was cut short by a restart: repair again"),
            );
        }
    }
}

fn peer_answer_name(r: &PeerResponse) -> &'static str {
    match r {
        PeerResponse::Prepare(_) => "Prepare",
        PeerResponse::Finish(_) => "Finish",
        PeerResponse::Abort(_) => "Abort",
        PeerResponse::Resolve(_) => "Resolve",
        PeerResponse::Heartbeat(_) => "Heartbeat",
        PeerResponse::Capacity(_) => "Capacity",
        PeerResponse::Recover(_) => "Recover",
        PeerResponse::Repair(_) => "Repair",
    }
}
