//! Evacuations: durable jobs that move every VM off this host, run by the
//! host core. The source host owns each one: it is journaled after every
//! change, survives restarts and console disconnects, and is published to
//! every console.
//!
//! A running evacuation makes passes. A pass takes the outcomes of the
//! attempts in flight (retrying a failed VM on another host, a busy
//! destination on the same one), aborts what is in flight when cancelled
//! with abort, then, while the evacuation's concurrency and the host's
//! `max_outgoing` allow, lists this host's guests and asks every other host
//! for its capacity at once; once all have answered (or missed the
//! deadline) it starts the next VMs, largest first, on the hosts
//! [`placement`] picks. A pass is made again when one of this host's
//! attempts ends, an operator changes the job, or a second after a pass
//! left a VM waiting for room.

pub mod job;
pub mod placement;

use crate::protocol::completion::CompletionRequest;
use std::collections::{BTreeMap, BTreeSet};

use super::{
    CallKind, Entry, Event, HostCore, Level, Op, OpKind, Owner, PeerCall, PeerResponse, Refusal,
};
use crate::hypervisor::{Guest, GuestState};
use crate::proto;
use crate::protocol::bounds::IdKind;
use crate::protocol::{Cause, Millis, Mode, Outcome, PeerError};
use job::{Control, Evacuation, JobState, JobVm, Verdict, VmState};
use placement::{Candidate, Unfit};

/// How often VMs that wait for room are looked at again.
const RECHECK_MS: Millis = 1000;
/// How long a host that did not answer `Capacity` within its deadline is
/// not asked again: a host that is down without refusing connections would
/// otherwise hold every pass for the whole deadline.
const UNANSWERED_FOR_MS: Millis = 5000;
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
const MAX_MAX_ATTEMPTS: u32 = 100;
const MAX_CONCURRENCY: u32 = 256;

/// An evacuation request as an operator made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub mode: Mode,
    /// Over the mode's default.
    pub completion: CompletionRequest,
    /// 0: the host's `max_outgoing`.
    pub concurrency: u32,
    /// 0: [`DEFAULT_MAX_ATTEMPTS`].
    pub max_attempts: u32,
    pub exclude: Vec<String>,
}

/// Every evacuation of this host, and the passes of the running ones.
#[derive(Debug, Default)]
pub(super) struct Runs {
    jobs: BTreeMap<String, Evacuation>,
    runs: BTreeMap<String, Run>,
    unanswered: Unanswered,
}

/// A running evacuation between passes.
#[derive(Debug, Default)]
struct Run {
    /// When the next pass is due.
    due: Option<Millis>,
    /// A pass gathering this host's guests and the other hosts' capacity.
    gathering: Option<Gather>,
    /// Migrations already told to abort (cancel with abort).
    aborted: BTreeSet<String>,
}

#[derive(Debug, Default)]
struct Gather {
    /// This host's guests; `Err` if they could not be listed (the pass
    /// then starts nothing: a VM it cannot see is not taken as gone).
    guests: Option<Result<Vec<Guest>, ()>>,
    /// By host, in the inventory's order once complete.
    answers: BTreeMap<String, Candidate>,
    waiting: usize,
    /// When the guests were asked for.
    asked_at: Millis,
}

impl Runs {
    pub(super) fn job(&self, id: &str) -> Option<&Evacuation> {
        self.jobs.get(id)
    }

    pub(super) fn jobs(&self) -> Vec<&Evacuation> {
        let mut all: Vec<&Evacuation> = self.jobs.values().collect();
        all.sort_by(|a, b| a.started_at_ms.cmp(&b.started_at_ms).then(a.id.cmp(&b.id)));
        all
    }

    /// At most `limit` jobs after the id `after`, by id.
    pub(super) fn jobs_after(&self, after: Option<&str>, limit: usize) -> Vec<&Evacuation> {
        use std::ops::Bound;
        let from = after.map_or(Bound::Unbounded, |a| Bound::Excluded(a.to_string()));
        self.jobs
            .range((from, Bound::Unbounded))
            .take(limit)
            .map(|(_, job)| job)
            .collect()
    }

    /// Forget an evacuation that is over (retention).
    pub(super) fn forget(&mut self, id: &str) {
        self.jobs.remove(id);
        self.runs.remove(id);
    }

    /// The pass of evacuation `id` that is gathering answers, if any.
    fn gathering(&mut self, id: &str) -> Option<&mut Gather> {
        self.runs.get_mut(id).and_then(|r| r.gathering.as_mut())
    }

    pub(super) fn next_due(&self) -> Option<Millis> {
        self.runs
            .values()
            .filter(|r| r.gathering.is_none())
            .filter_map(|r| r.due)
            .min()
    }
}

impl HostCore {
    /// Start evacuating this host: check the request, mark the host
    /// draining, journal the job, make its first pass.
    pub(super) fn evacuate(
        &mut self,
        request: Request,
        guests: &[Guest],
    ) -> Result<Evacuation, Refusal> {
        let name = self.cfg.name.clone();
        if self.stopping.is_some() {
            return Err(Refusal::Unavailable(format!(
                "agent {name} is shutting down"
            )));
        }
        let max_attempts = match request.max_attempts {
            0 => DEFAULT_MAX_ATTEMPTS,
            n if n > MAX_MAX_ATTEMPTS => {
                return Err(Refusal::InvalidArgument(format!(
                    "max attempts {n}: must be between 1 and {MAX_MAX_ATTEMPTS}"
                )));
            }
            n => n,
        };
        let concurrency = match request.concurrency {
            0 => self.cfg.max_outgoing,
            n if n > MAX_CONCURRENCY => {
                return Err(Refusal::InvalidArgument(format!(
                    "concurrency {n}: must be between 1 and {MAX_CONCURRENCY}"
                )));
            }
            n => n,
        };
        let mut exclude = Vec::new();
        for host in request.exclude {
            if !self.cfg.hosts.contains(&host) {
                return Err(Refusal::NotFound(format!(
                    "cannot exclude {host:?}: no such host in the inventory (hosts: {})",
                    self.cfg.hosts.join(", ")
                )));
            }
            if !exclude.contains(&host) {
                exclude.push(host);
            }
        }
        if let Some(active) = self.evacuations.jobs.values().find(|e| !e.state.is_over()) {
            let c = active.counts();
            return Err(Refusal::AlreadyExists(format!(
                "{name} is already being evacuated by {} ({}, {} of {} moved); cancel it first",
                active.id,
                active.state.as_str(),
                c.moved,
                c.total
            )));
        }
        let vms: Vec<JobVm> = guests
            .iter()
            .filter(|g| g.state != GuestState::Incoming)
            .map(|g| {
                let required = g
                    .spec
                    .features
                    .iter()
                    .filter(|f| f.required)
                    .map(|f| f.name.clone())
                    .collect();
                JobVm::new(
                    &g.spec.name,
                    g.spec.memory_mib,
                    g.spec.vcpus,
                    required,
                    &name,
                )
            })
            .collect();
        let taken: Vec<String> = self.evacuations.jobs.keys().cloned().collect();
        let id = self.new_id(IdKind::Evacuation, |id| taken.iter().any(|t| t == id));
        let mut job = Evacuation::new(
            id.clone(),
            &name,
            request.mode,
            concurrency,
            max_attempts,
            exclude,
            vms,
            self.now,
        );
        job.completion = request.completion.over(job.completion);
        job.completion.check().map_err(Refusal::InvalidArgument)?;
        // Drain first: from here no migration comes in.
        self.draining = true;
        self.journal(Entry::Draining(true), true);
        self.journal(Entry::Evacuation(Box::new(job.clone())), false);
        self.evacuations.jobs.insert(id.clone(), job.clone());
        self.log(Level::Info, "", job.started_line());
        self.emit(Event::Evacuation(job.clone()));
        self.emit(Event::Host);
        self.evacuations.runs.insert(
            id,
            Run {
                due: Some(self.now),
                ..Run::default()
            },
        );
        Ok(job)
    }

    /// Pause, resume or cancel an evacuation of this host.
    pub(super) fn control_evacuation(
        &mut self,
        id: &str,
        control: Control,
    ) -> Result<Evacuation, Refusal> {
        let job = self.update_evacuation(id, |job, now| job.control(control, now))?;
        self.log(
            Level::Info,
            "",
            format!(
                "evacuation {id}: {} by the operator",
                match control {
                    Control::Pause => "paused",
                    Control::Resume => "resumed",
                    Control::Cancel => "cancelled (letting attempts in flight finish)",
                    Control::CancelAbort => "cancelled (aborting attempts in flight)",
                }
            ),
        );
        if let Some(run) = self.evacuations.runs.get_mut(id) {
            run.due = Some(self.now);
        }
        Ok(job)
    }

    /// Accept incoming migrations again.
    pub(super) fn undrain(&mut self) -> Result<(), Refusal> {
        let name = self.cfg.name.clone();
        if let Some(active) = self.evacuations.jobs.values().find(|e| !e.state.is_over()) {
            return Err(Refusal::FailedPrecondition(format!(
                "{name} is still being evacuated by {} ({}); cancel it before undraining",
                active.id,
                active.state.as_str()
            )));
        }
        if !self.draining {
            return Err(Refusal::FailedPrecondition(format!(
                "{name} is not draining"
            )));
        }
        self.draining = false;
        self.journal(Entry::Draining(false), true);
        self.log(
            Level::Info,
            "",
            format!("{name} accepts incoming migrations again"),
        );
        self.emit(Event::Host);
        Ok(())
    }

    /// The journaled evacuations: each one that had not ended goes on.
    pub(super) fn recover_evacuations(&mut self, jobs: Vec<Evacuation>) {
        for job in jobs {
            if !job.state.is_over() {
                self.log(Level::Warn, "", format!("resuming evacuation {}", job.id));
                self.evacuations.runs.insert(
                    job.id.clone(),
                    Run {
                        due: Some(self.now),
                        ..Run::default()
                    },
                );
            }
            self.evacuations.jobs.insert(job.id.clone(), job);
        }
    }

    /// One of this host's attempts ended (or a host's count changed): every
    /// running evacuation looks again.
    pub(super) fn evacuations_wake(&mut self) {
        let now = self.now;
        for run in self.evacuations.runs.values_mut() {
            run.due = Some(run.due.map_or(now, |d| d.min(now)));
        }
    }

    pub(super) fn run_due_evacuations(&mut self) {
        let now = self.now;
        let due: Vec<String> = self
            .evacuations
            .runs
            .iter()
            .filter(|(_, r)| r.gathering.is_none() && r.due.is_some_and(|d| d <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            if let Some(run) = self.evacuations.runs.get_mut(&id) {
                run.due = None;
            }
            self.evacuation_pass(&id);
        }
    }

    /// A VM an evacuation moved degraded was repaired since (`tern repair`
    /// on migration `migration_id`): the evacuation no longer counts it
    /// degraded.
    pub(super) fn evacuated_vm_repaired(&mut self, migration_id: &str) {
        let ids: Vec<String> = self
            .evacuations
            .jobs
            .iter()
            .filter(|(_, job)| {
                job.vms
                    .iter()
                    .any(|v| v.degraded && v.migration_id.as_deref() == Some(migration_id))
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            let _ = self.update_evacuation(&id, |job, _| {
                for v in &mut job.vms {
                    if v.migration_id.as_deref() == Some(migration_id) {
                        v.degraded = false;
                    }
                }
                Ok(())
            });
        }
    }

    /// Change a journaled evacuation, then journal and publish it.
    /// `change` refusing changes nothing.
    fn update_evacuation(
        &mut self,
        id: &str,
        change: impl FnOnce(&mut Evacuation, Millis) -> Result<(), String>,
    ) -> Result<Evacuation, Refusal> {
        let now = self.now;
        let name = self.cfg.name.clone();
        let job = self
            .evacuations
            .jobs
            .get_mut(id)
            .ok_or_else(|| not_found(&name, id))?;
        let mut changed = job.clone();
        change(&mut changed, now).map_err(Refusal::FailedPrecondition)?;
        if changed == *job {
            return Ok(changed);
        }
        *job = changed.clone();
        self.journal(Entry::Evacuation(Box::new(changed.clone())), false);
        self.emit(Event::Evacuation(changed.clone()));
        Ok(changed)
    }

    /// One pass: outcomes, aborts, then (through a gathering) new attempts.
    fn evacuation_pass(&mut self, id: &str) {
        let Some(job) = self.evacuations.jobs.get(id).cloned() else {
            return;
        };
        // The outcomes of the attempts in flight.
        for (i, vm) in job.vms.iter().enumerate() {
            if vm.state != VmState::InFlight {
                continue;
            }
            let Some(migration) = vm.migration_id.as_deref() else {
                continue;
            };
            if let Some(latest) = self.migration(migration).cloned() {
                let _ = self.update_evacuation(id, |job, now| {
                    job.follow_retry(i, &latest, now);
                    Ok(())
                });
            }
            let Some(record) = self
                .sources
                .get(migration)
                .filter(|s| !s.live || s.attempt.record.outcome == Some(Outcome::Unresolved))
                .map(|s| s.attempt.record.clone())
                .filter(|r| r.outcome.is_some())
            else {
                continue;
            };
            let mut verdict = None;
            let _ = self.update_evacuation(id, |job, now| {
                verdict = job.attempt_ended(i, &record, now);
                Ok(())
            });
            if let Some(verdict) = verdict {
                self.log_verdict(id, &vm.name, &record, verdict);
            }
        }
        let Some(job) = self.evacuations.jobs.get(id).cloned() else {
            return;
        };
        if job.state == JobState::Cancelling && job.abort_in_flight {
            for vm in job.vms.iter().filter(|v| v.state == VmState::InFlight) {
                let Some(migration) = vm.migration_id.clone() else {
                    continue;
                };
                let first = self
                    .evacuations
                    .runs
                    .get_mut(id)
                    .is_some_and(|r| r.aborted.insert(migration.clone()));
                if first {
                    self.abort_for_evacuation(&migration);
                }
            }
        }
        let Some(job) = self.evacuations.jobs.get(id).cloned() else {
            return;
        };
        if job.state.is_over() {
            let degraded = job.vms.iter().filter(|v| v.degraded).count();
            let level = if job.counts().failed > 0 {
                Level::Warn
            } else {
                Level::Info
            };
            self.log(
                level,
                "",
                format!("{}; {degraded} degraded", job.headline()),
            );
            self.evacuations.runs.remove(id);
            return;
        }
        if job.may_start() && !job.ready(self.now).is_empty() {
            if self.outgoing() >= self.cfg.max_outgoing as usize {
                // One of this host's attempts ending wakes it.
                return;
            }
            self.gather(id);
            return;
        }
        self.recheck_if_waiting(id);
    }

    fn recheck_if_waiting(&mut self, id: &str) {
        let waiting = self.evacuations.jobs.get(id).is_some_and(|job| {
            job.state == JobState::Running && job.vms.iter().any(|v| v.state == VmState::Pending)
        });
        if let Some(run) = self.evacuations.runs.get_mut(id)
            && waiting
        {
            let at = self.now + RECHECK_MS;
            run.due = Some(run.due.map_or(at, |d| d.min(at)));
        }
    }

    /// Cancel with abort: abort one migration in flight.
    fn abort_for_evacuation(&mut self, migration: &str) {
        let now = self.now;
        let Some(s) = self.sources.get_mut(migration) else {
            return;
        };
        if !s.live {
            return;
        }
        match s
            .attempt
            .abort(now, "the evacuation was cancelled", Cause::Operator)
        {
            Ok(actions) => self.source_actions(migration, actions),
            Err(e) => self.log(
                Level::Warn,
                migration,
                format!("cancelling the evacuation could not abort it: {e}"),
            ),
        }
    }

    /// Ask for this host's guests and every other host's capacity at once.
    fn gather(&mut self, id: &str) {
        let now = self.now;
        let others: Vec<String> = self
            .cfg
            .hosts
            .iter()
            .filter(|h| **h != self.cfg.name)
            .cloned()
            .collect();
        let owner = Owner::Evacuation(id.to_string());
        let deadline = self.cfg.deadlines.capacity_ms;
        let mut gather = Gather {
            asked_at: now,
            ..Gather::default()
        };
        let mut asks = Vec::new();
        for host in others {
            match self.evacuations.unanswered.skip(&host, now) {
                Some(why) => {
                    gather.answers.insert(host.clone(), unreachable(&host, why));
                }
                None => {
                    gather.waiting += 1;
                    asks.push(host);
                }
            }
        }
        gather.waiting += 1; // this host's guests
        if let Some(run) = self.evacuations.runs.get_mut(id) {
            run.gathering = Some(gather);
        }
        self.run(
            owner.clone(),
            OpKind::ListGuests,
            Op::ListGuests,
            Some(deadline),
        );
        for host in asks {
            self.call(
                owner.clone(),
                CallKind::Capacity {
                    deadline: now + deadline,
                },
                &host,
                PeerCall::Capacity(proto::CapacityRequest {}),
                Some(deadline),
            );
        }
    }

    pub(super) fn evacuation_guests(&mut self, id: &str, guests: Option<Vec<Guest>>) {
        let Some(g) = self.evacuations.gathering(id) else {
            return;
        };
        g.guests = Some(guests.ok_or(()));
        g.waiting = g.waiting.saturating_sub(1);
        self.maybe_place(id);
    }

    pub(super) fn evacuation_capacity(
        &mut self,
        id: &str,
        host: &str,
        deadline: Millis,
        reply: Result<PeerResponse, PeerError>,
    ) {
        let now = self.now;
        let candidate = match reply {
            Ok(PeerResponse::Capacity(c)) => {
                self.evacuations.unanswered.record(host, Ok(()), now);
                Candidate {
                    name: host.to_string(),
                    reachable: Ok(()),
                    draining: c.draining,
                    memory_total_mib: c.memory_total_mib,
                    memory_free_mib: c.memory_total_mib.saturating_sub(c.memory_used_mib),
                    vcpus_total: c.vcpus_total,
                    vcpus_free: c.vcpus_total.saturating_sub(c.vcpus_used),
                    features: c.features,
                    incoming: c.incoming,
                    max_incoming: c.max_incoming.max(1),
                }
            }
            Ok(other) => unreachable(host, format!("unexpected answer {other:?}")),
            Err(e) => {
                // Only silence is remembered: a refused connection costs
                // nothing to try again next pass.
                let answer = if now >= deadline {
                    Err(e.message())
                } else {
                    Ok(())
                };
                self.evacuations.unanswered.record(host, answer, now);
                unreachable(host, e.message().to_string())
            }
        };
        let Some(g) = self.evacuations.gathering(id) else {
            return;
        };
        g.answers.insert(host.to_string(), candidate);
        g.waiting = g.waiting.saturating_sub(1);
        self.maybe_place(id);
    }

    fn maybe_place(&mut self, id: &str) {
        let complete = self
            .evacuations
            .runs
            .get(id)
            .and_then(|r| r.gathering.as_ref())
            .is_some_and(|g| g.waiting == 0);
        if !complete {
            return;
        }
        let Some(gather) = self
            .evacuations
            .runs
            .get_mut(id)
            .and_then(|r| r.gathering.take())
        else {
            return;
        };
        let mut hosts: Vec<Candidate> = self
            .cfg
            .hosts
            .iter()
            .filter_map(|h| gather.answers.get(h).cloned())
            .collect();
        match gather.guests {
            Some(Ok(mut guests)) => {
                // A VM this host moved away since the guests were listed is
                // not here any more, whatever the list says.
                let since = gather.asked_at;
                guests.retain(|g| {
                    !self.sources.values().any(|s| {
                        !s.live
                            && s.attempt.vm.name == g.spec.name
                            && s.attempt.record.committed
                            && s.attempt.record.updated_at_ms >= since
                    })
                });
                self.place(id, &mut hosts, guests)
            }
            _ => self.log(
                Level::Warn,
                "",
                format!("evacuation {id}: could not list this host's guests; trying again"),
            ),
        }
        self.recheck_if_waiting(id);
    }

    /// Start attempts for the ready VMs while the limits allow.
    fn place(&mut self, id: &str, hosts: &mut [Candidate], guests: Vec<Guest>) {
        // This host's own attempts occupy their destination until they end,
        // whatever the destination answered: it may not have seen Prepare
        // yet, or may have ended its part before Confirm.
        let mut own: BTreeMap<String, u32> = BTreeMap::new();
        for s in self
            .sources
            .values()
            .filter(|s| s.live && s.attempt.record.outcome != Some(Outcome::Unresolved))
        {
            *own.entry(s.attempt.destination.clone()).or_default() += 1;
        }
        for host in hosts.iter_mut() {
            let sent = own.get(&host.name).copied().unwrap_or(0);
            host.incoming = host.incoming.max(sent);
        }
        let Some(job) = self.evacuations.jobs.get(id).cloned() else {
            return;
        };
        for i in job.ready(self.now) {
            // Read again: an earlier start may have changed it.
            let Some(job) = self.evacuations.jobs.get(id).cloned() else {
                return;
            };
            if !job.may_start() || self.stopping.is_some() {
                return;
            }
            if self.outgoing() >= self.cfg.max_outgoing as usize {
                return;
            }
            let vm = &job.vms[i];
            if let Some(holder) = self.locks.get(&vm.name).cloned() {
                self.adopt_or_wait(id, i, &holder, job.started_at_ms);
                continue;
            }
            if !guests.iter().any(|g| g.spec.name == vm.name) {
                let host = self
                    .sources
                    .values()
                    .map(|s| &s.attempt.record)
                    .filter(|r| r.vm == vm.name && r.running_on != self.cfg.name)
                    .max_by_key(|r| r.updated_at_ms)
                    .map(|r| r.running_on.clone())
                    .unwrap_or_default();
                let _ = self.update_evacuation(id, |job, now| {
                    job.left_otherwise(i, &host, now);
                    Ok(())
                });
                continue;
            }
            let need = vm.need().in_mode(job.mode);
            let avoid = job.avoid(i);
            // A busy destination is tried again while it can take the VM.
            let retry = vm.retry_host.as_ref().and_then(|name| {
                let at = hosts.iter().position(|h| &h.name == name)?;
                match placement::fit(&need, &hosts[at], &avoid) {
                    Ok(()) => Some(Ok(at)),
                    Err(Unfit::NotNow(why)) => Some(Err(why)),
                    Err(Unfit::Never(_)) => None,
                }
            });
            let chosen = match retry {
                Some(Ok(at)) => at,
                Some(Err(why)) => {
                    let _ = self.update_evacuation(id, |job, now| {
                        job.waiting(i, format!("waiting for {why}"), now);
                        Ok(())
                    });
                    continue;
                }
                None => match placement::place(&need, hosts, &avoid) {
                    Ok(at) => at,
                    Err(none) if none.never => {
                        let why = format!("{}: nowhere left to go ({})", vm.name, none.why);
                        self.log(Level::Error, "", format!("evacuation {id}: {why}"));
                        let _ = self.update_evacuation(id, |job, now| {
                            job.give_up(i, why, now);
                            Ok(())
                        });
                        continue;
                    }
                    Err(none) => {
                        let _ = self.update_evacuation(id, |job, now| {
                            job.waiting(i, format!("no host can take it now: {}", none.why), now);
                            Ok(())
                        });
                        continue;
                    }
                },
            };
            let destination = hosts[chosen].name.clone();
            let existing = vm
                .migration_id
                .as_deref()
                .and_then(|m| self.migration(m))
                .cloned();
            let name = vm.name.clone();
            match self.begin(
                &name,
                &destination,
                job.mode,
                job.completion,
                existing.as_ref(),
                &guests,
            ) {
                Ok(record) => {
                    hosts[chosen].reserve(&need);
                    let _ = self.update_evacuation(id, |job, now| {
                        job.started(i, &record.id, record.attempt, &destination, now);
                        Ok(())
                    });
                }
                // The host's outgoing limit, reached by someone else's migration.
                Err(Refusal::ResourceExhausted(_)) => return,
                Err(Refusal::Unavailable(_)) => return,
                Err(refusal) => {
                    let why = refusal.to_string();
                    let _ = self.update_evacuation(id, |job, now| {
                        job.waiting(i, why, now);
                        Ok(())
                    });
                }
            }
        }
    }

    /// A pending VM is locked by a migration: ours if it started after the
    /// evacuation (the agent stopped between starting it and journaling
    /// it, or an operator moved the VM by hand meanwhile), so the
    /// evacuation follows it; otherwise the VM waits for it to end.
    fn adopt_or_wait(&mut self, id: &str, vm: usize, holder: &str, since: Millis) {
        let record = self.migration(holder).cloned();
        let _ = self.update_evacuation(id, |job, now| {
            match record {
                Some(r)
                    if r.started_at_ms >= since
                        || job.vms[vm].migration_id.as_deref() == Some(holder) =>
                {
                    job.adopted(vm, &r.id, r.attempt, &r.destination, now);
                }
                _ => job.waiting(
                    vm,
                    format!("already migrating (migration {holder}); waiting for it to end"),
                    now,
                ),
            }
            Ok(())
        });
    }

    fn log_verdict(
        &mut self,
        id: &str,
        vm: &str,
        record: &crate::protocol::record::MigrationRecord,
        verdict: Verdict,
    ) {
        let (level, text) = match verdict {
            Verdict::Moved { degraded: false } => {
                (Level::Info, format!("{vm} moved to {}", record.destination))
            }
            Verdict::Moved { degraded: true } => (
                Level::Warn,
                format!("{vm} moved to {}, degraded", record.destination),
            ),
            Verdict::RetrySameHost => (
                Level::Info,
                format!("{} busy; {vm} tries it again shortly", record.destination),
            ),
            Verdict::RetryElsewhere => (
                Level::Warn,
                format!("{vm} failed on {}; trying another host", record.destination),
            ),
            Verdict::Failed(why) => (Level::Error, why),
            Verdict::Cancelled => (
                Level::Info,
                format!("{vm} stays: the evacuation was cancelled"),
            ),
        };
        self.log(level, &record.id, format!("evacuation {id}: {text}"));
    }
}

fn unreachable(host: &str, why: String) -> Candidate {
    Candidate {
        name: host.to_string(),
        reachable: Err(why),
        draining: false,
        memory_total_mib: 0,
        memory_free_mib: 0,
        vcpus_total: 0,
        vcpus_free: 0,
        features: Vec::new(),
        incoming: 0,
        max_incoming: 1,
    }
}

/// Hosts that did not answer `Capacity` lately: until when they are taken
/// as unreachable without asking, and why.
#[derive(Debug, Default)]
pub(super) struct Unanswered(BTreeMap<String, (Millis, String)>);

impl Unanswered {
    /// Why `host` is not asked at `now`, if it is not.
    fn skip(&self, host: &str, now: Millis) -> Option<String> {
        let (until, why) = self.0.get(host)?;
        (now < *until).then(|| {
            format!(
                "{why}; not asked again for {} s",
                (until - now).div_ceil(1000)
            )
        })
    }

    /// What `host` answered at `now`.
    fn record(&mut self, host: &str, answer: Result<(), &str>, now: Millis) {
        match answer {
            Ok(()) => {
                self.0.remove(host);
            }
            Err(why) => {
                self.0
                    .insert(host.to_string(), (now + UNANSWERED_FOR_MS, why.to_string()));
            }
        }
    }
}

fn not_found(host: &str, id: &str) -> Refusal {
    Refusal::NotFound(format!("no evacuation {id} on {host}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_that_did_not_answer_is_not_asked_again_for_a_while() {
        let mut quiet = Unanswered::default();
        assert_eq!(quiet.skip("hv-c", 1000), None);
        quiet.record("hv-c", Err("hv-c did not answer within 1000 ms"), 1000);
        assert_eq!(
            quiet.skip("hv-c", 1500).as_deref(),
            Some("hv-c did not answer within 1000 ms; not asked again for 5 s")
        );
        assert_eq!(
            quiet.skip("hv-b", 1500),
            None,
            "only the host that was silent"
        );
        assert_eq!(
            quiet.skip("hv-c", 1000 + UNANSWERED_FOR_MS),
            None,
            "asked again later"
        );
        quiet.record("hv-c", Err("refused"), 2000);
        quiet.record("hv-c", Ok(()), 2100);
        assert_eq!(quiet.skip("hv-c", 2200), None, "an answer clears it");
    }
}
