//! Pending work: what an ended attempt left on this host because a call
//! failed: a feature's rollback (destination) or release (source), or the
//! guest itself to resume (paused after a failed resume) or to kill (a copy
//! that must not run). Each is journaled, shown in status and the console,
//! retried with backoff, and run again on request; none disappears until a
//! run succeeds.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{
    CallKind, Entry, Event, HostCore, Level, Op, OpKind, Owner, PeerCall, PeerResponse, ReqId,
    Response,
};
use crate::features::StageContext;
use crate::proto;
use crate::protocol::policy::retry_backoff;
use crate::protocol::{FeatureSpec, Millis, PendingWork, Stage, VmSpec};

/// What is left to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Work {
    /// A feature's rollback or release.
    Stage(Stage),
    /// Resume the guest, paused here.
    Resume,
    /// Kill a copy of the guest that must not run.
    Kill,
    /// Tell the destination (named in `feature`) that the operator forced
    /// the guest to run on this host.
    Notify,
}

impl Work {
    /// As the journal and the Console API write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Work::Stage(stage) => stage.as_str(),
            Work::Resume => "resume",
            Work::Kill => "kill",
            Work::Notify => "notify",
        }
    }

    pub fn parse(s: &str) -> Option<Work> {
        match s {
            "resume" => Some(Work::Resume),
            "kill" => Some(Work::Kill),
            "notify" => Some(Work::Notify),
            other => Stage::parse(other).map(Work::Stage),
        }
    }

    pub fn stage(self) -> Option<Stage> {
        match self {
            Work::Stage(stage) => Some(stage),
            _ => None,
        }
    }
}

/// One piece of pending work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub attempt_id: String,
    pub migration_id: String,
    pub vm: String,
    /// The feature; for `Notify`, the host to tell; empty for work on the
    /// guest itself.
    pub feature: String,
    pub work: Work,
    pub error: String,
    pub tries: u32,
    pub next_try_ms: Millis,
    /// When the work was first left pending (0: before journals said).
    pub since_ms: Millis,
}

/// attempt id, feature, work.
pub(super) type Key = (String, String, String);

impl Pending {
    pub(super) fn key(&self) -> Key {
        (
            self.attempt_id.clone(),
            self.feature.clone(),
            self.work.as_str().to_string(),
        )
    }

    /// Whether this can hold state a new attempt of the VM would clash
    /// with: work on the guest, or a stage of a feature with a driver here.
    pub(super) fn holds_state(&self, features: &BTreeMap<String, String>) -> bool {
        match self.work {
            Work::Stage(_) => features.contains_key(&self.feature),
            Work::Resume | Work::Kill => true,
            Work::Notify => false,
        }
    }
}

/// A run of pending work an operator asked for.
#[derive(Debug, Clone)]
pub(super) struct Batch {
    req: ReqId,
    left: usize,
    done: Vec<Pending>,
    still: Vec<Pending>,
}

impl HostCore {
    /// Something failed and left work here: journal it (durably: another
    /// host's next Prepare of the VM depends on it), say so, retry later.
    pub(super) fn record_pending(
        &mut self,
        vm: &VmSpec,
        attempt_id: &str,
        migration_id: &str,
        work: PendingWork,
        error: String,
    ) {
        let (feature, work) = match work {
            PendingWork::Stage { feature, stage } => (
                vm.features
                    .get(feature)
                    .map(|f| f.name.clone())
                    .unwrap_or_default(),
                Work::Stage(stage),
            ),
            PendingWork::Resume => (String::new(), Work::Resume),
            PendingWork::Kill => (String::new(), Work::Kill),
            PendingWork::Notify => {
                let destination = self
                    .sources
                    .get(migration_id)
                    .map(|s| s.attempt.destination.clone())
                    .unwrap_or_default();
                (destination, Work::Notify)
            }
        };
        let mut pending = Pending {
            attempt_id: attempt_id.to_string(),
            migration_id: migration_id.to_string(),
            vm: vm.name.clone(),
            feature: feature.clone(),
            work,
            error: error.clone(),
            tries: 1,
            next_try_ms: self.now + self.cfg.rollback_retry_ms,
            since_ms: self.now,
        };
        if let Some(old) = self.pending.get(&pending.key()) {
            pending.tries = old.tries;
            pending.since_ms = old.since_ms;
        }
        self.pending.insert(pending.key(), pending.clone());
        self.journal(Entry::Pending(pending), true);
        let what = match work {
            Work::Notify => format!("telling {feature} that {} runs here", vm.name),
            _ if feature.is_empty() => format!("{} of {}", work.as_str(), vm.name),
            _ => format!("{feature} {} for {}", work.as_str(), vm.name),
        };
        self.log(
            Level::Error,
            migration_id,
            format!("{what} failed on {}; left pending: {error}", self.cfg.name),
        );
        self.emit(Event::Host);
    }

    /// When the next pending work is due (none runs while it is in flight).
    pub(super) fn pending_due(&self) -> Option<Millis> {
        self.pending
            .iter()
            .filter(|(k, _)| !self.pending_in_flight(k))
            .map(|(_, p)| p.next_try_ms)
            .min()
    }

    fn pending_in_flight(&self, key: &Key) -> bool {
        let mine = |o: &Owner| matches!(o, Owner::Pending { key: k, .. } if k == key);
        self.ops.values().any(|o| mine(&o.owner))
            || self.calls.values().any(|c| mine(&c.owner))
            || self
                .internal
                .iter()
                .any(|(o, _)| matches!(o, Owner::Pending { key: k, .. } if k == key))
    }

    pub(super) fn retry_due_pending(&mut self) {
        let now = self.now;
        let due: Vec<Key> = self
            .pending
            .iter()
            .filter(|(k, p)| p.next_try_ms <= now && !self.pending_in_flight(k))
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            self.run_pending(key, None);
        }
    }

    /// `tern rollback ID`: run this migration's pending work here now, and
    /// answer once every run has ended.
    pub(super) fn run_pending_now(&mut self, req: ReqId, migration_id: &str) {
        // A post-copy paused by a broken link is tried again now too.
        let now = self.now;
        if let Some(s) = self.sources.get_mut(migration_id)
            && s.live
            && s.attempt.recover_now(now)
        {
            let vm = s.attempt.vm.name.clone();
            self.log(
                Level::Info,
                migration_id,
                format!("recovery of {vm}'s post-copy: trying now, as the operator asked"),
            );
        }
        let keys: Vec<Key> = self
            .pending
            .iter()
            .filter(|(k, p)| p.migration_id == migration_id && !self.pending_in_flight(k))
            .map(|(k, _)| k.clone())
            .collect();
        if keys.is_empty() {
            // Nothing to run: fine for a migration this host knows, an
            // error for one it has never heard of (a typo must not look
            // like "all done").
            let reply = if self.knows_migration(migration_id) {
                Ok(Response::Pending {
                    done: Vec::new(),
                    still: Vec::new(),
                })
            } else {
                Err(super::Refusal::NotFound(format!(
                    "no migration {migration_id} on {}",
                    self.cfg.name
                )))
            };
            self.reply(req, reply);
            return;
        }
        let batch = self.next_id();
        self.batches.insert(
            batch,
            Batch {
                req,
                left: keys.len(),
                done: Vec::new(),
                still: Vec::new(),
            },
        );
        for key in keys {
            self.run_pending(key, Some(batch));
        }
    }

    /// The operator drops a migration's pending work here: what it would
    /// have undone stays as it is, knowingly. Refused while a run of it is
    /// in flight.
    pub(super) fn forget_pending(&mut self, migration_id: &str) -> super::Reply {
        let keys: Vec<Key> = self
            .pending
            .iter()
            .filter(|(_, p)| p.migration_id == migration_id)
            .map(|(k, _)| k.clone())
            .collect();
        if keys.is_empty() {
            return Err(super::Refusal::NotFound(format!(
                "no pending work of migration {migration_id} on {}",
                self.cfg.name
            )));
        }
        if keys.iter().any(|k| self.pending_in_flight(k)) {
            return Err(super::Refusal::FailedPrecondition(format!(
                "pending work of migration {migration_id} is running now; try again when it has answered"
            )));
        }
        let mut forgotten = Vec::new();
        for key in keys {
            if let Some(p) = self.pending.remove(&key) {
                self.journal(
                    Entry::PendingDone {
                        attempt_id: p.attempt_id.clone(),
                        feature: p.feature.clone(),
                        work: p.work.as_str().to_string(),
                    },
                    true,
                );
                self.log(
                    Level::Warn,
                    migration_id,
                    format!(
                        "pending {} {}of {} forgotten on {} by the operator (last error: {})",
                        p.work.as_str(),
                        if p.feature.is_empty() {
                            String::new()
                        } else {
                            format!("{} ", p.feature)
                        },
                        p.vm,
                        self.cfg.name,
                        p.error
                    ),
                );
                forgotten.push(p);
            }
        }
        self.emit(Event::Host);
        Ok(Response::Pending {
            done: forgotten,
            still: Vec::new(),
        })
    }

    /// The VM of pending work as its attempt carried it: the destination's
    /// record (live or ended) or the source's, kept while the work is.
    fn pending_vm(&self, p: &Pending) -> Option<&VmSpec> {
        self.destinations
            .get(&p.attempt_id)
            .map(|d| &d.attempt.vm)
            .or_else(|| self.ended.get(&p.attempt_id).map(|a| &a.vm))
            .or_else(|| {
                self.sources
                    .get(&p.migration_id)
                    .filter(|s| s.attempt.attempt_id == p.attempt_id)
                    .map(|s| &s.attempt.vm)
            })
            .filter(|vm| vm.name == p.vm)
    }

    fn run_pending(&mut self, key: Key, batch: Option<u64>) {
        let Some(p) = self.pending.get(&key).cloned() else {
            return;
        };
        let owner = Owner::Pending {
            key: key.clone(),
            batch,
        };
        let deadlines = self.cfg.deadlines;
        match p.work {
            Work::Stage(stage) => {
                if !self.cfg.features.contains_key(&p.feature) {
                    let result = Ok(format!(
                        "nothing to undo: {} has no driver on {}",
                        p.feature, self.cfg.name
                    ));
                    self.internal.push_back((
                        owner,
                        super::Internal::Stage {
                            feature: 0,
                            stage,
                            result,
                        },
                    ));
                    return;
                }
                let ctx = StageContext {
                    host: self.cfg.name.clone(),
                    vm: p.vm.clone(),
                    feature: FeatureSpec {
                        name: p.feature.clone(),
                        driver: self
                            .cfg
                            .features
                            .get(&p.feature)
                            .cloned()
                            .unwrap_or_default(),
                        required: false,
                    },
                    stage,
                    attempt_id: p.attempt_id.clone(),
                    migration_id: p.migration_id.clone(),
                    // The NICs its attempt carried, whose record is kept
                    // while work of it is pending (after a restart too);
                    // drivers also undo by the VM's name where it is gone
                    // (GuestNetwork::taps, the VSIs a vdp driver holds).
                    nics: self
                        .pending_vm(&p)
                        .map(crate::protocol::machine::NicPort::of)
                        .unwrap_or_default(),
                    guest: None,
                };
                self.run(
                    owner,
                    OpKind::Stage { feature: 0, stage },
                    Op::Stage(ctx),
                    Some(deadlines.stage_ms),
                );
            }
            Work::Resume => {
                let what = Op::Resume { vm: p.vm.clone() };
                self.run(owner, OpKind::Resume, what, Some(deadlines.guest_op_ms));
            }
            Work::Kill => {
                let what = Op::Kill { vm: p.vm.clone() };
                self.run(owner, OpKind::Kill, what, Some(deadlines.guest_op_ms));
            }
            Work::Notify => {
                let request = PeerCall::Abort(proto::PeerAbortRequest {
                    attempt_id: p.attempt_id.clone(),
                    reason: format!("the operator forced {} to run on {}", p.vm, self.cfg.name),
                    from_host: self.cfg.name.clone(),
                    cookie4: Vec::new(),
                    cause: crate::protocol::Cause::Operator.as_str().to_string(),
                });
                let timeout = self.cfg.timing.peer_timeout_ms;
                self.call(owner, CallKind::Abort, &p.feature, request, Some(timeout));
            }
        }
    }

    /// The destination answered a pending notification of a forced decision.
    pub(super) fn notified(
        &mut self,
        key: &Key,
        batch: Option<u64>,
        reply: Result<PeerResponse, crate::protocol::PeerError>,
    ) {
        let result = match reply {
            Ok(PeerResponse::Abort(r)) => {
                if r.committed
                    && let Some(id) = self
                        .sources
                        .iter()
                        .find(|(_, s)| s.attempt.attempt_id == key.0)
                        .map(|(id, _)| id.clone())
                {
                    // It had committed: the guest ran on both hosts. The
                    // source attempt stops its copy and says so.
                    let answer = crate::protocol::source::AbortAnswer {
                        aborted: false,
                        committed: true,
                        detail: r.detail.clone(),
                        c4: None,
                    };
                    self.source_input(
                        &id,
                        crate::protocol::source::SourceInput::AbortReplied(Ok(answer)),
                    );
                }
                Ok(if r.committed {
                    format!("it had committed: {}", r.detail)
                } else {
                    "it dropped its copy".to_string()
                })
            }
            Ok(other) => Err(format!("unexpected answer {other:?}")),
            Err(e) => Err(e.message().to_string()),
        };
        self.pending_done(key, batch, result);
    }

    /// A run of pending work ended.
    pub(super) fn pending_done(
        &mut self,
        key: &Key,
        batch: Option<u64>,
        result: Result<String, String>,
    ) {
        let Some(mut p) = self.pending.get(key).cloned() else {
            return;
        };
        match result {
            Ok(detail) => {
                self.pending.remove(key);
                self.journal(
                    Entry::PendingDone {
                        attempt_id: p.attempt_id.clone(),
                        feature: p.feature.clone(),
                        work: p.work.as_str().to_string(),
                    },
                    false,
                );
                let what = if p.feature.is_empty() {
                    format!("{} of {}", p.work.as_str(), p.vm)
                } else {
                    format!("{} of {} for {}", p.work.as_str(), p.feature, p.vm)
                };
                self.log(
                    Level::Info,
                    &p.migration_id.clone(),
                    format!("pending {what} done on {}: {detail}", self.cfg.name),
                );
                if p.work == Work::Resume {
                    self.guest_resumed_later(&p);
                }
                if let Work::Resume | Work::Kill = p.work {
                    self.emit(Event::Vm(p.vm.clone()));
                }
                if let Some(b) = batch.and_then(|b| self.batches.get_mut(&b)) {
                    b.done.push(p);
                }
            }
            Err(error) => {
                p.tries += 1;
                p.next_try_ms = self.now + retry_backoff(self.cfg.rollback_retry_ms, p.tries);
                p.error = error;
                self.pending.insert(key.clone(), p.clone());
                self.journal(Entry::Pending(p.clone()), false);
                if let Some(b) = batch.and_then(|b| self.batches.get_mut(&b)) {
                    b.still.push(p);
                }
            }
        }
        self.emit(Event::Host);
        if let Some(id) = batch {
            let finished = self.batches.get_mut(&id).is_some_and(|b| {
                b.left -= 1;
                b.left == 0
            });
            if finished && let Some(b) = self.batches.remove(&id) {
                self.reply(
                    b.req,
                    Ok(Response::Pending {
                        done: b.done,
                        still: b.still,
                    }),
                );
            }
        }
    }

    /// Pending work on a guest the hypervisor no longer has: a kill is done;
    /// a resume can never be, and is dropped, loudly.
    pub(super) fn pending_guest_gone(&mut self, key: &Key, batch: Option<u64>, error: String) {
        let Some(p) = self.pending.get(key).cloned() else {
            return;
        };
        if p.work == Work::Resume {
            self.log(
                Level::Error,
                &p.migration_id,
                format!(
                    "{} cannot be resumed on {}: the guest is gone ({error}); nothing left to retry",
                    p.vm, self.cfg.name
                ),
            );
            if let Some(s) = self.sources.get_mut(&p.migration_id)
                && s.attempt.attempt_id == p.attempt_id
            {
                s.attempt.guest_gone(self.now);
                let snapshot = Box::new(s.attempt.clone());
                let record = s.attempt.record.clone();
                self.journal(Entry::Source(snapshot), false);
                self.emit(Event::Migration(Box::new(record)));
            }
        }
        self.pending_done(key, batch, Ok(format!("the guest is gone: {error}")));
    }

    /// A guest left paused by a failed resume runs again: its record says so.
    fn guest_resumed_later(&mut self, p: &Pending) {
        let Some(s) = self.sources.get_mut(&p.migration_id) else {
            return;
        };
        if s.attempt.attempt_id != p.attempt_id {
            return;
        }
        s.attempt.guest_runs_again(self.now);
        let snapshot = Box::new(s.attempt.clone());
        let record = s.attempt.record.clone();
        self.journal(Entry::Source(snapshot), false);
        self.emit(Event::Migration(Box::new(record)));
    }
}
