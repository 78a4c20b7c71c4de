//! Evacuations: durable jobs that move every VM off this host. The source
//! agent owns each one: it is journaled after every change, survives agent
//! restarts and console disconnects, and is published to every console.
//!
//! One task per running evacuation makes passes: it takes the outcomes of
//! the attempts in flight (retrying a failed VM on another host, a busy
//! destination on the same one), then, while the evacuation's concurrency
//! and the host's `max_outgoing` allow, asks every other host for its
//! capacity and starts the next VMs, largest first, on the hosts
//! [`placement`] picks. It sleeps until one of this host's migrations ends,
//! an operator pauses, resumes or cancels it, or a second passes while a VM
//! waits for room.

pub mod job;
pub mod placement;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use super::operations::Refusal;
use super::{Agent, now_ms};
use crate::proto;
use crate::protocol::Mode;
use job::{Control, Evacuation, JobState, JobVm, Verdict, VmState};
use placement::{Candidate, Unfit};

/// The longest a pass waits for a host's `Capacity`: a host slower than
/// this counts as unreachable for the pass.
const CAPACITY_DEADLINE: Duration = Duration::from_secs(1);
/// How often VMs that wait for room are looked at again.
const RECHECK: Duration = Duration::from_secs(1);
/// How soon a pass is made again when this host's `max_outgoing` stopped
/// it: an attempt that just published its outcome leaves the count a
/// moment later, without an event of its own.
const RECHECK_OUTGOING: Duration = Duration::from_millis(20);
/// How long a host that did not answer `Capacity` within its deadline is
/// not asked again: a host that is down without refusing connections would
/// otherwise hold every pass for [`CAPACITY_DEADLINE`].
const UNANSWERED_FOR_MS: u64 = 5000;
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
const MAX_MAX_ATTEMPTS: u32 = 100;
const MAX_CONCURRENCY: u32 = 256;

fn new_evacuation_id() -> String {
    format!("e-{:08x}", rand::random::<u32>())
}

/// An evacuation request as an operator made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub mode: Mode,
    /// 0: the host's `max_outgoing`.
    pub concurrency: u32,
    /// 0: [`DEFAULT_MAX_ATTEMPTS`].
    pub max_attempts: u32,
    pub exclude: Vec<String>,
}

impl Agent {
    pub fn evacuation(&self, id: &str) -> Option<Evacuation> {
        self.state().evacuations.get(id).cloned()
    }

    /// Oldest first.
    pub fn evacuations(&self) -> Vec<Evacuation> {
        let mut all: Vec<Evacuation> = self.state().evacuations.values().cloned().collect();
        all.sort_by(|a, b| a.started_at_ms.cmp(&b.started_at_ms).then(a.id.cmp(&b.id)));
        all
    }

    pub fn is_draining(&self) -> bool {
        self.state().draining
    }

    /// Start evacuating this host: check the request, mark the host
    /// draining, journal the job, start its task.
    pub async fn evacuate(self: &Arc<Self>, request: Request) -> Result<Evacuation, Refusal> {
        if self.is_stopping() {
            return Err(Refusal::Unavailable(format!(
                "agent {} is shutting down",
                self.name
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
            0 => self.max_outgoing,
            n if n > MAX_CONCURRENCY => {
                return Err(Refusal::InvalidArgument(format!(
                    "concurrency {n}: must be between 1 and {MAX_CONCURRENCY}"
                )));
            }
            n => n,
        };
        let mut exclude = Vec::new();
        for host in request.exclude {
            if self.inventory.host(&host).is_none() {
                return Err(Refusal::NotFound(format!(
                    "cannot exclude {host:?}: no such host in the inventory (hosts: {})",
                    self.inventory
                        .host
                        .iter()
                        .map(|h| h.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            if !exclude.contains(&host) {
                exclude.push(host);
            }
        }
        let vms: Vec<JobVm> = self
            .hypervisor
            .guests()
            .await
            .into_iter()
            .filter(|g| g.state != crate::hypervisor::GuestState::Incoming)
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
                    &self.name,
                )
            })
            .collect();
        let now = now_ms();
        let job = {
            let mut state = self.state();
            if let Some(active) = state.evacuations.values().find(|e| !e.state.is_over()) {
                let c = active.counts();
                return Err(Refusal::AlreadyExists(format!(
                    "{} is already being evacuated by {} ({}, {} of {} moved); cancel it first",
                    self.name,
                    active.id,
                    active.state.as_str(),
                    c.moved,
                    c.total
                )));
            }
            let mut id = new_evacuation_id();
            while state.evacuations.contains_key(&id) {
                id = new_evacuation_id();
            }
            let job = Evacuation::new(
                id,
                &self.name,
                request.mode,
                concurrency,
                max_attempts,
                exclude,
                vms,
                now,
            );
            // Drain first: from here no migration comes in.
            state.draining = true;
            state.evacuations.insert(job.id.clone(), job.clone());
            job
        };
        let journaled = {
            let journal = self.journal();
            journal
                .set_draining(true)
                .and_then(|()| journal.put_evacuation(&job))
        };
        if let Err(e) = journaled {
            self.journal_failed("", e);
        }
        let c = job.counts();
        self.log(
            "info",
            "",
            format!(
                "evacuation {} of {} started: {} VMs, {} mode, {} at a time, {} attempts each{}",
                job.id,
                self.name,
                c.total,
                job.mode.as_str(),
                job.concurrency,
                job.max_attempts,
                if job.exclude.is_empty() {
                    String::new()
                } else {
                    format!(", never to {}", job.exclude.join(", "))
                }
            ),
        );
        self.emit(proto::event::Kind::Evacuation(job.to_proto()));
        self.emit(proto::event::Kind::HostChanged(self.host_info().await));
        self.spawn_evacuation(&job.id);
        Ok(job)
    }

    /// Pause, resume or cancel an evacuation of this host.
    pub fn control_evacuation(&self, id: &str, control: Control) -> Result<Evacuation, Refusal> {
        let job = self.update_evacuation(id, |job, now| job.control(control, now))?;
        self.log(
            "info",
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
        if let Some(wake) = self.state().evacuation_wakers.get(id) {
            wake.notify_one();
        }
        Ok(job)
    }

    /// Wait until an evacuation has ended.
    pub async fn wait_evacuation(&self, id: &str) -> Result<Evacuation, Refusal> {
        self.wait_until(|| {
            let job = self
                .evacuation(id)
                .ok_or_else(|| not_found(&self.name, id))?;
            Ok(job.state.is_over().then_some(job))
        })
        .await
    }

    /// Accept incoming migrations again.
    pub async fn undrain(&self) -> Result<proto::Host, Refusal> {
        {
            let mut state = self.state();
            if let Some(active) = state.evacuations.values().find(|e| !e.state.is_over()) {
                return Err(Refusal::FailedPrecondition(format!(
                    "{} is still being evacuated by {} ({}); cancel it before undraining",
                    self.name,
                    active.id,
                    active.state.as_str()
                )));
            }
            if !state.draining {
                return Err(Refusal::FailedPrecondition(format!(
                    "{} is not draining",
                    self.name
                )));
            }
            state.draining = false;
        }
        if let Err(e) = self.journal().set_draining(false) {
            self.journal_failed("", e);
        }
        self.log(
            "info",
            "",
            format!("{} accepts incoming migrations again", self.name),
        );
        let host = self.host_info().await;
        self.emit(proto::event::Kind::HostChanged(host.clone()));
        Ok(host)
    }

    /// Load the journaled evacuations and the drain flag, and start a task
    /// for each evacuation that had not ended.
    pub(super) fn recover_evacuations(
        self: &Arc<Self>,
    ) -> Result<(), super::journal::JournalError> {
        let (jobs, draining) = {
            let journal = self.journal();
            (journal.evacuations()?, journal.draining()?)
        };
        let mut open = Vec::new();
        {
            let mut state = self.state();
            // An evacuation started before recovery ran (an in-process
            // agent, the demo) is already here, draining and running.
            state.draining |= draining;
            for job in jobs {
                if state.evacuations.contains_key(&job.id) {
                    continue;
                }
                if !job.state.is_over() {
                    open.push(job.id.clone());
                }
                state.evacuations.insert(job.id.clone(), job);
            }
        }
        for id in open {
            tracing::warn!(evacuation = %id, "resuming evacuation");
            self.spawn_evacuation(&id);
        }
        Ok(())
    }

    /// Change a journaled evacuation: under the state lock, then journal and
    /// publish it. `change` refusing changes nothing.
    fn update_evacuation(
        &self,
        id: &str,
        change: impl FnOnce(&mut Evacuation, u64) -> Result<(), String>,
    ) -> Result<Evacuation, Refusal> {
        let job = {
            let mut state = self.state();
            let job = state
                .evacuations
                .get_mut(id)
                .ok_or_else(|| not_found(&self.name, id))?;
            let mut changed = job.clone();
            change(&mut changed, now_ms()).map_err(Refusal::FailedPrecondition)?;
            if changed == *job {
                return Ok(changed);
            }
            *job = changed.clone();
            changed
        };
        if let Err(e) = self.journal().put_evacuation(&job) {
            self.journal_failed("", e);
        }
        self.emit(proto::event::Kind::Evacuation(job.to_proto()));
        Ok(job)
    }

    fn spawn_evacuation(self: &Arc<Self>, id: &str) {
        let wake = Arc::new(Notify::new());
        self.state()
            .evacuation_wakers
            .insert(id.to_string(), wake.clone());
        let agent = self.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            agent.run_evacuation(&id, wake).await;
            agent.state().evacuation_wakers.remove(&id);
        });
    }

    async fn run_evacuation(self: &Arc<Self>, id: &str, wake: Arc<Notify>) {
        let mut events = self.subscribe();
        let mut stopping = self.stopping.subscribe();
        let mut aborted = HashSet::new();
        loop {
            if self.is_stopping() {
                // Journaled as it is: the next start of the agent resumes it.
                return;
            }
            let blocked = self.evacuation_pass(id, &mut aborted).await;
            let Some(job) = self.evacuation(id) else {
                return;
            };
            if job.state.is_over() {
                let degraded = job.vms.iter().filter(|v| v.degraded).count();
                self.log(
                    if job.counts().failed > 0 {
                        "warn"
                    } else {
                        "info"
                    },
                    "",
                    format!("{}; {degraded} degraded", job.headline()),
                );
                return;
            }
            let waiting = job.state == JobState::Running
                && job.vms.iter().any(|v| v.state == VmState::Pending);
            let recheck = async {
                if waiting {
                    tokio::time::sleep(if blocked { RECHECK_OUTGOING } else { RECHECK }).await
                } else {
                    std::future::pending().await
                }
            };
            tokio::pin!(recheck);
            // Until something that can change a decision happens.
            loop {
                tokio::select! {
                    _ = wake.notified() => break,
                    _ = &mut recheck => break,
                    _ = stopping.changed() => break,
                    event = events.recv() => match event {
                        Ok(proto::Event { kind: Some(proto::event::Kind::Migration(m)), .. })
                            if m.outcome != proto::Outcome::None as i32 => break,
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                }
            }
        }
    }

    /// One pass: outcomes, aborts, then new attempts. True when this host's `max_outgoing` kept a ready VM from starting.
    async fn evacuation_pass(self: &Arc<Self>, id: &str, aborted: &mut HashSet<String>) -> bool {
        let Some(job) = self.evacuation(id) else {
            return false;
        };
        // The outcomes of the attempts in flight.
        for (i, vm) in job.vms.iter().enumerate() {
            let Some(migration) = vm.migration_id.as_deref() else {
                continue;
            };
            if vm.state != VmState::InFlight {
                continue;
            }
            let Some(record) = self.migration(migration).filter(|r| r.outcome.is_some()) else {
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
        let Some(job) = self.evacuation(id) else {
            return false;
        };
        if job.state == JobState::Cancelling && job.abort_in_flight {
            for vm in job.vms.iter().filter(|v| v.state == VmState::InFlight) {
                let Some(migration) = vm.migration_id.clone() else {
                    continue;
                };
                if aborted.insert(migration.clone()) {
                    let agent = self.clone();
                    tokio::spawn(async move {
                        if let Err(e) = agent.abort(&migration).await {
                            agent.log(
                                "warn",
                                &migration,
                                format!("cancelling the evacuation could not abort it: {e}"),
                            );
                        }
                    });
                }
            }
        }
        if job.may_start() && !job.ready(now_ms()).is_empty() {
            return self.start_next(id).await;
        }
        false
    }

    fn log_verdict(
        &self,
        id: &str,
        vm: &str,
        record: &crate::protocol::record::MigrationRecord,
        verdict: Verdict,
    ) {
        let (level, text) = match verdict {
            Verdict::Moved { degraded: false } => {
                ("info", format!("{vm} moved to {}", record.destination))
            }
            Verdict::Moved { degraded: true } => (
                "warn",
                format!("{vm} moved to {}, degraded", record.destination),
            ),
            Verdict::RetrySameHost => (
                "info",
                format!("{} busy; {vm} tries it again shortly", record.destination),
            ),
            Verdict::RetryElsewhere => (
                "warn",
                format!("{vm} failed on {}; trying another host", record.destination),
            ),
            Verdict::Failed(why) => ("error", why),
            Verdict::Cancelled => ("info", format!("{vm} stays: the evacuation was cancelled")),
        };
        self.log(level, &record.id, format!("evacuation {id}: {text}"));
    }

    /// Start attempts for the ready VMs while the limits allow.
    /// True when this host's `max_outgoing` stopped it.
    async fn start_next(self: &Arc<Self>, id: &str) -> bool {
        if self.outgoing() >= self.max_outgoing as usize {
            return true;
        }
        let mut hosts = self.candidates().await;
        // This host's own attempts occupy their destination until their
        // outcome is published, whatever the destination answered: it may
        // not have seen Prepare yet, or may have ended its part before
        // Confirm. Counting only its answer started one more than
        // max_incoming from here.
        let mut own: HashMap<String, u32> = HashMap::new();
        {
            let state = self.state();
            for migration in state.sources.keys() {
                if let Some(r) = state.migrations.get(migration)
                    && r.outcome != Some(crate::protocol::Outcome::Unresolved)
                {
                    *own.entry(r.destination.clone()).or_default() += 1;
                }
            }
        }
        for host in &mut hosts {
            let sent = own.get(&host.name).copied().unwrap_or(0);
            host.incoming = host.incoming.max(sent);
        }
        let here: HashSet<String> = self
            .hypervisor
            .guests()
            .await
            .into_iter()
            .map(|g| g.spec.name)
            .collect();
        let Some(job) = self.evacuation(id) else {
            return false;
        };
        for i in job.ready(now_ms()) {
            // Re-read: an operator may have paused it meanwhile.
            let Some(job) = self.evacuation(id) else {
                return false;
            };
            if !job.may_start() {
                return false;
            }
            if self.outgoing() >= self.max_outgoing as usize {
                return true;
            }
            let vm = &job.vms[i];
            // Not in the `if let`: its guard would be held through the block.
            let holder = self.state().locks.get(&vm.name).cloned();
            if let Some(holder) = holder {
                self.adopt_or_wait(id, i, &holder, job.started_at_ms);
                continue;
            }
            if !here.contains(&vm.name) {
                let host = self
                    .migrations()
                    .into_iter()
                    .filter(|r| r.vm == vm.name && r.running_on != self.name)
                    .max_by_key(|r| r.updated_at_ms)
                    .map(|r| r.running_on)
                    .unwrap_or_default();
                let _ = self.update_evacuation(id, |job, now| {
                    job.left_otherwise(i, &host, now);
                    Ok(())
                });
                continue;
            }
            let need = vm.need();
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
                None => match placement::place(&need, &hosts, &avoid) {
                    Ok(at) => at,
                    Err(none) if none.never => {
                        let why = format!("{}: nowhere left to go ({})", vm.name, none.why);
                        self.log("error", "", format!("evacuation {id}: {why}"));
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
            let existing = vm.migration_id.as_deref().and_then(|m| self.migration(m));
            match self
                .start_migration(&vm.name, &destination, job.mode, existing.as_ref())
                .await
            {
                Ok(record) => {
                    hosts[chosen].reserve(&need);
                    let _ = self.update_evacuation(id, |job, now| {
                        job.started(i, &record.id, record.attempt, &destination, now);
                        Ok(())
                    });
                }
                // The host's outgoing limit, reached by someone else's migration.
                Err(Refusal::ResourceExhausted(_)) => return true,
                Err(Refusal::AlreadyExists(why))
                | Err(Refusal::FailedPrecondition(why))
                | Err(Refusal::NotFound(why))
                | Err(Refusal::InvalidArgument(why)) => {
                    let _ = self.update_evacuation(id, |job, now| {
                        job.waiting(i, why, now);
                        Ok(())
                    });
                }
                Err(Refusal::Unavailable(_)) => return false,
            }
        }
        false
    }

    /// A pending VM is locked by a migration: ours if it started after the
    /// evacuation (the agent stopped between starting it and journaling
    /// it, or an operator moved the VM by hand meanwhile), so the
    /// evacuation follows it; otherwise the VM waits for it to end.
    fn adopt_or_wait(&self, id: &str, vm: usize, holder: &str, since: u64) {
        let record = self.migration(holder);
        let _ = self.update_evacuation(id, |job, now| {
            match record {
                Some(r)
                    if r.started_at_ms >= since
                        || job.vms[vm].migration_id.as_deref() == Some(holder) =>
                {
                    job.started(vm, &r.id, r.attempt, &r.destination, now);
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

    /// Every other host's capacity, asked at once; a host that does not
    /// answer within [`CAPACITY_DEADLINE`] is unreachable, and is not asked
    /// again for [`UNANSWERED_FOR_MS`].
    async fn candidates(&self) -> Vec<Candidate> {
        let now = now_ms();
        let asks = self
            .inventory
            .host
            .iter()
            .filter(|h| h.name != self.name)
            .map(|h| async move {
                let skip = self.state().unanswered.skip(&h.name, now);
                let reply = match (skip, self.peers.client(&h.name)) {
                    (Some(why), _) => Err(crate::protocol::PeerError::Unreachable(why)),
                    (None, Err(e)) => Err(e),
                    (None, Ok(mut client)) => {
                        let asked = std::time::Instant::now();
                        let reply = super::peers::with_deadline(
                            &h.name,
                            CAPACITY_DEADLINE,
                            client.capacity(proto::CapacityRequest {}),
                        )
                        .await;
                        // Only silence is remembered: a refused connection
                        // costs nothing to try again next pass.
                        let answer = match &reply {
                            Err(e) if asked.elapsed() >= CAPACITY_DEADLINE => Err(e.message()),
                            _ => Ok(()),
                        };
                        self.state().unanswered.record(&h.name, answer, now_ms());
                        reply
                    }
                };
                match reply {
                    Ok(c) => Candidate {
                        name: h.name.clone(),
                        reachable: Ok(()),
                        draining: c.draining,
                        memory_total_mib: c.memory_total_mib,
                        memory_free_mib: c.memory_total_mib.saturating_sub(c.memory_used_mib),
                        vcpus_total: c.vcpus_total,
                        vcpus_free: c.vcpus_total.saturating_sub(c.vcpus_used),
                        features: c.features,
                        incoming: c.incoming,
                        max_incoming: c.max_incoming.max(1),
                    },
                    Err(e) => Candidate {
                        name: h.name.clone(),
                        reachable: Err(e.message().to_string()),
                        draining: false,
                        memory_total_mib: 0,
                        memory_free_mib: 0,
                        vcpus_total: 0,
                        vcpus_free: 0,
                        features: Vec::new(),
                        incoming: 0,
                        max_incoming: 1,
                    },
                }
            });
        futures::future::join_all(asks).await
    }
}

/// Hosts that did not answer `Capacity` lately: until when (unix ms) they
/// are taken as unreachable without asking, and why.
#[derive(Debug, Default)]
pub struct Unanswered(HashMap<String, (u64, String)>);

impl Unanswered {
    /// Why `host` is not asked at `now`, if it is not.
    fn skip(&self, host: &str, now: u64) -> Option<String> {
        let (until, why) = self.0.get(host)?;
        (now < *until).then(|| {
            format!(
                "{why}; not asked again for {} s",
                (until - now).div_ceil(1000)
            )
        })
    }

    /// What `host` answered at `now`.
    fn record(&mut self, host: &str, answer: Result<(), &str>, now: u64) {
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
