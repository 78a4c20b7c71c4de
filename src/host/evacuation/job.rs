//! An evacuation's state, and every decision about it that does not need
//! IO: which VM goes next, what an attempt's outcome means for its VM, what
//! pause, resume and cancel do. The runner (`super`) gathers capacity,
//! starts migrations and journals this after every change.

use crate::protocol::completion::Completion;
use crate::protocol::record::completion_to_proto;
use serde::{Deserialize, Serialize};

use super::placement::Need;
use crate::proto;
use crate::protocol::record::{
    MigrationRecord, failure_from_proto, failure_to_proto, mode_to_proto, outcome_to_proto,
};
use crate::protocol::{Cause, FailureCause, Millis, Mode, Outcome, StepStatus};

/// How long a VM waits before trying a busy destination again.
pub const BUSY_RETRY_MS: u64 = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Running,
    /// No new attempts; the ones in flight go on.
    Paused,
    /// No new attempts; waiting for the ones in flight to end.
    Cancelling,
    Cancelled,
    /// Every VM moved or failed for good.
    Done,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Paused => "paused",
            JobState::Cancelling => "cancelling",
            JobState::Cancelled => "cancelled",
            JobState::Done => "done",
        }
    }

    pub fn is_over(self) -> bool {
        matches!(self, JobState::Cancelled | JobState::Done)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Pending,
    InFlight,
    Moved,
    /// Out of attempts, nowhere left to go, or unresolved.
    Failed,
    /// The evacuation was cancelled before it moved.
    Cancelled,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Pending => "pending",
            VmState::InFlight => "in_flight",
            VmState::Moved => "moved",
            VmState::Failed => "failed",
            VmState::Cancelled => "cancelled",
        }
    }
}

/// One attempt to move one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptEntry {
    /// The migration's attempt number.
    pub attempt: u32,
    pub destination: String,
    pub outcome: Option<Outcome>,
    pub failed_feature: Option<String>,
    pub error: Option<String>,
    /// Refused as busy: waited out, not counted against max_attempts.
    pub busy: bool,
    /// Cut short by the source agent's own stop or restart: the VM and the
    /// destination had nothing to do with it, so it is not counted either.
    #[serde(default)]
    pub interrupted: bool,
    pub started_at_ms: Millis,
    pub ended_at_ms: Option<Millis>,
    /// A migration someone else started, which the evacuation follows
    /// rather than placed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adopted: bool,
    /// Why it failed or ended degraded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<FailureCause>,
}

impl AttemptEntry {
    /// Whether it counts against max_attempts (once it has an outcome):
    /// neither a busy destination's refusal nor this host's own stop does.
    pub fn counts(&self) -> bool {
        !self.busy && !self.interrupted
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobVm {
    pub name: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    /// Features the VM cannot run without: its destination must know them.
    pub required: Vec<String>,
    pub state: VmState,
    /// One migration per VM; every attempt is an attempt of it.
    pub migration_id: Option<String>,
    /// Where it runs; its destination while in flight.
    pub host: String,
    pub degraded: bool,
    /// Why a pending VM has not started.
    pub waiting: Option<String>,
    pub attempts: Vec<AttemptEntry>,
    /// A busy destination to try again, and not before when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_host: Option<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub not_before_ms: Millis,
}

fn is_zero(n: &Millis) -> bool {
    *n == 0
}

impl JobVm {
    pub fn new(name: &str, memory_mib: u64, vcpus: u32, required: Vec<String>, host: &str) -> Self {
        JobVm {
            name: name.to_string(),
            memory_mib,
            vcpus,
            required,
            state: VmState::Pending,
            migration_id: None,
            host: host.to_string(),
            degraded: false,
            waiting: None,
            attempts: Vec::new(),
            retry_host: None,
            not_before_ms: 0,
        }
    }

    pub fn need(&self) -> Need {
        Need {
            vm: self.name.clone(),
            memory_mib: self.memory_mib,
            vcpus: self.vcpus,
            required: self.required.clone(),
            preferred: Vec::new(),
        }
    }

    /// Attempts that count against max_attempts.
    pub fn counted_attempts(&self) -> u32 {
        self.attempts
            .iter()
            .filter(|a| a.counts() && a.outcome.is_some())
            .count() as u32
    }

    /// Hosts that already failed this VM: never tried again.
    pub fn failed_hosts(&self) -> Vec<String> {
        let mut hosts: Vec<String> = self
            .attempts
            .iter()
            .filter(|a| a.counts() && matches!(a.outcome, Some(Outcome::Failed | Outcome::Aborted)))
            .map(|a| a.destination.clone())
            .collect();
        hosts.dedup();
        hosts
    }

    fn is_settled(&self) -> bool {
        matches!(
            self.state,
            VmState::Moved | VmState::Failed | VmState::Cancelled
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    pub moved: usize,
    pub in_flight: usize,
    pub failed: usize,
    pub pending: usize,
    pub cancelled: usize,
    pub total: usize,
}

/// What an operator asks of a running evacuation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Pause,
    Resume,
    /// Let the attempts in flight finish.
    Cancel,
    /// Abort the attempts in flight that have not committed.
    CancelAbort,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evacuation {
    pub id: String,
    pub host: String,
    pub mode: Mode,
    pub concurrency: u32,
    pub max_attempts: u32,
    pub exclude: Vec<String>,
    pub state: JobState,
    /// Largest first: big transfers start early, so the small ones fill
    /// the gaps at the end (longest-processing-time-first).
    pub vms: Vec<JobVm>,
    pub abort_in_flight: bool,
    pub started_at_ms: Millis,
    pub updated_at_ms: Millis,
    pub ended_at_ms: Option<Millis>,
    /// The completion policy of every VM's migration.
    #[serde(default)]
    pub completion: Completion,
}

/// What became of an attempt, for the runner to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Moved {
        degraded: bool,
    },
    /// Busy destination: try it again after [`BUSY_RETRY_MS`].
    RetrySameHost,
    /// Tried again on another host.
    RetryElsewhere,
    Failed(String),
    Cancelled,
}

impl Evacuation {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: String,
        host: &str,
        mode: Mode,
        concurrency: u32,
        max_attempts: u32,
        exclude: Vec<String>,
        mut vms: Vec<JobVm>,
        now: Millis,
    ) -> Evacuation {
        vms.sort_by(|a, b| {
            b.memory_mib
                .cmp(&a.memory_mib)
                .then(b.vcpus.cmp(&a.vcpus))
                .then(a.name.cmp(&b.name))
        });
        let mut job = Evacuation {
            id,
            host: host.to_string(),
            mode,
            concurrency,
            max_attempts,
            exclude,
            state: JobState::Running,
            vms,
            abort_in_flight: false,
            started_at_ms: now,
            updated_at_ms: now,
            ended_at_ms: None,
            completion: Completion::for_mode(mode),
        };
        job.settle(now);
        job
    }

    pub fn counts(&self) -> Counts {
        let mut c = Counts {
            total: self.vms.len(),
            ..Counts::default()
        };
        for vm in &self.vms {
            match vm.state {
                VmState::Pending => c.pending += 1,
                VmState::InFlight => c.in_flight += 1,
                VmState::Moved => c.moved += 1,
                VmState::Failed => c.failed += 1,
                VmState::Cancelled => c.cancelled += 1,
            }
        }
        c
    }

    /// What an agent took on, in a line.
    pub fn started_line(&self) -> String {
        format!(
            "evacuation {} of {} started: {} VMs, {} mode, {} at a time, up to {} attempts each; {} is draining",
            self.id,
            self.host,
            self.vms.len(),
            self.mode.as_str(),
            self.concurrency,
            self.max_attempts,
            self.host
        )
    }

    /// "evacuation e-1 of hv-a running: 3 moved, 2 in flight, 0 failed,
    /// 5 pending of 10": what the CLI, `tern watch` and the console say.
    pub fn headline(&self) -> String {
        let c = self.counts();
        let cancelled = if c.cancelled > 0 {
            format!(", {} cancelled", c.cancelled)
        } else {
            String::new()
        };
        format!(
            "evacuation {} of {} {}: {} moved, {} in flight, {} failed, {} pending{cancelled} of {}",
            self.id,
            self.host,
            self.state.as_str(),
            c.moved,
            c.in_flight,
            c.failed,
            c.pending,
            c.total
        )
    }

    pub fn in_flight(&self) -> usize {
        self.vms
            .iter()
            .filter(|v| v.state == VmState::InFlight)
            .count()
    }

    /// Whether new attempts may start now.
    pub fn may_start(&self) -> bool {
        self.state == JobState::Running && self.in_flight() < self.concurrency as usize
    }

    /// Pending VMs that may start now, in order.
    pub fn ready(&self, now: Millis) -> Vec<usize> {
        self.vms
            .iter()
            .enumerate()
            .filter(|(_, v)| v.state == VmState::Pending && v.not_before_ms <= now)
            .map(|(i, _)| i)
            .collect()
    }

    /// Hosts this VM must not go to: the operator's exclusions, the hosts
    /// that failed it, and this host.
    pub fn avoid(&self, vm: usize) -> Vec<String> {
        let mut avoid = self.exclude.clone();
        avoid.extend(self.vms[vm].failed_hosts());
        avoid.push(self.host.clone());
        avoid
    }

    /// A migration attempt started for a VM.
    pub fn started(
        &mut self,
        vm: usize,
        migration_id: &str,
        attempt: u32,
        destination: &str,
        now: Millis,
    ) {
        let v = &mut self.vms[vm];
        v.state = VmState::InFlight;
        v.migration_id = Some(migration_id.to_string());
        v.host = destination.to_string();
        v.waiting = None;
        v.retry_host = None;
        v.attempts.push(AttemptEntry {
            attempt,
            destination: destination.to_string(),
            outcome: None,
            failed_feature: None,
            error: None,
            busy: false,
            interrupted: false,
            started_at_ms: now,
            ended_at_ms: None,
            adopted: false,
            cause: None,
        });
        self.updated_at_ms = now;
    }

    /// A migration started otherwise holds the VM: the evacuation follows it.
    pub fn adopted(
        &mut self,
        vm: usize,
        migration_id: &str,
        attempt: u32,
        destination: &str,
        now: Millis,
    ) {
        self.started(vm, migration_id, attempt, destination, now);
        if let Some(entry) = self.vms[vm].attempts.last_mut() {
            entry.adopted = true;
        }
    }

    /// A pending VM cannot start now, for `why`; it is looked at again on
    /// the next pass.
    pub fn waiting(&mut self, vm: usize, why: String, now: Millis) {
        if self.vms[vm].waiting.as_deref() != Some(why.as_str()) {
            self.vms[vm].waiting = Some(why);
            self.updated_at_ms = now;
        }
    }

    /// A pending VM can never start: nowhere left to go.
    pub fn give_up(&mut self, vm: usize, why: String, now: Millis) {
        let v = &mut self.vms[vm];
        v.state = VmState::Failed;
        v.waiting = Some(why);
        self.updated_at_ms = now;
        self.settle(now);
    }

    /// The VM left this host by a migration the evacuation did not start.
    pub fn left_otherwise(&mut self, vm: usize, host: &str, now: Millis) {
        let v = &mut self.vms[vm];
        v.state = VmState::Moved;
        v.host = host.to_string();
        v.waiting = Some("moved by another migration".into());
        self.updated_at_ms = now;
        self.settle(now);
    }

    /// Someone retried the VM's migration by hand while the evacuation
    /// followed it: the attempt it followed ended (failed, or it could not
    /// have been retried) and the newer one is followed instead.
    pub fn follow_retry(&mut self, vm: usize, record: &MigrationRecord, now: Millis) -> bool {
        let v = &mut self.vms[vm];
        if v.state != VmState::InFlight || v.migration_id.as_deref() != Some(record.id.as_str()) {
            return false;
        }
        let Some(entry) = v.attempts.last_mut() else {
            return false;
        };
        if entry.attempt >= record.attempt {
            return false;
        }
        entry.outcome = Some(Outcome::Failed);
        entry.ended_at_ms = Some(now);
        entry.error = Some(format!(
            "retried by hand as attempt {} of migration {}",
            record.attempt, record.id
        ));
        self.adopted(vm, &record.id, record.attempt, &record.destination, now);
        true
    }

    /// The VM's in-flight attempt has an outcome (its migration record).
    /// Records of another attempt, or without an outcome, change nothing.
    pub fn attempt_ended(
        &mut self,
        vm: usize,
        record: &MigrationRecord,
        now: Millis,
    ) -> Option<Verdict> {
        let mode_cancelling = self.state == JobState::Cancelling;
        let max_attempts = self.max_attempts;
        let source = self.host.clone();
        let v = &mut self.vms[vm];
        let outcome = record.outcome?;
        if v.state != VmState::InFlight || v.migration_id.as_deref() != Some(record.id.as_str()) {
            return None;
        }
        let entry = v.attempts.last_mut()?;
        if entry.attempt != record.attempt {
            return None;
        }
        entry.outcome = Some(outcome);
        entry.ended_at_ms = Some(now);
        entry.error = record.error.clone();
        entry.failed_feature = record
            .features
            .iter()
            .find(|f| [f.prepare, f.finish, f.rollback, f.release].contains(&StepStatus::Failed))
            .map(|f| f.name.clone());
        // A busy destination, or this host's own stop or restart: neither
        // is the VM's or the destination's fault.
        let kind = record.cause.as_ref().map(|c| c.kind);
        entry.busy = matches!(outcome, Outcome::Failed) && kind == Some(Cause::DestinationBusy);
        entry.interrupted = matches!(outcome, Outcome::Aborted | Outcome::Failed)
            && matches!(kind, Some(Cause::Interrupted | Cause::Signal));
        entry.cause = record.failure();
        let verdict = match outcome {
            Outcome::Succeeded | Outcome::Degraded => {
                v.state = VmState::Moved;
                v.host = record.destination.clone();
                v.degraded = outcome == Outcome::Degraded;
                Verdict::Moved {
                    degraded: v.degraded,
                }
            }
            Outcome::Lost => {
                // Never retried: no host holds the whole guest.
                v.state = VmState::Failed;
                v.host = String::new();
                Verdict::Failed(format!(
                    "{} lost: its destination {} died during post-copy (migration {})",
                    v.name, record.destination, record.id
                ))
            }
            Outcome::Unresolved => {
                // Never retried: the guest may be on either host until an
                // operator resolves it.
                v.state = VmState::Failed;
                v.host = String::new();
                Verdict::Failed(format!(
                    "{} unresolved: resolve migration {} first",
                    v.name, record.id
                ))
            }
            Outcome::Failed | Outcome::Aborted => {
                v.host = source.clone();
                if mode_cancelling {
                    v.state = VmState::Cancelled;
                    Verdict::Cancelled
                } else if entry.interrupted {
                    v.state = VmState::Pending;
                    v.waiting = Some(format!("{source} stopped during the attempt; trying again"));
                    Verdict::RetryElsewhere
                } else if entry.busy {
                    v.state = VmState::Pending;
                    v.retry_host = Some(record.destination.clone());
                    v.not_before_ms = now + BUSY_RETRY_MS;
                    v.waiting = Some(format!("{} busy, trying it again", record.destination));
                    Verdict::RetrySameHost
                } else if v.counted_attempts() >= max_attempts {
                    v.state = VmState::Failed;
                    Verdict::Failed(format!(
                        "{} failed {} attempts; last: {}",
                        v.name,
                        v.counted_attempts(),
                        record.error.as_deref().unwrap_or("no reason given")
                    ))
                } else {
                    v.state = VmState::Pending;
                    Verdict::RetryElsewhere
                }
            }
        };
        self.updated_at_ms = now;
        self.settle(now);
        Some(verdict)
    }

    /// Pause, resume or cancel. Refusals say why and change nothing.
    pub fn control(&mut self, control: Control, now: Millis) -> Result<(), String> {
        let id = &self.id;
        match (control, self.state) {
            (_, state) if state.is_over() => {
                return Err(format!(
                    "evacuation {id} has ended ({}); nothing to change",
                    state.as_str()
                ));
            }
            (Control::Pause, JobState::Running) => self.state = JobState::Paused,
            (Control::Resume, JobState::Paused) => self.state = JobState::Running,
            (Control::Pause | Control::Resume, JobState::Cancelling) => {
                return Err(format!("evacuation {id} is being cancelled"));
            }
            (Control::Pause, _) => return Err(format!("evacuation {id} is already paused")),
            (Control::Resume, _) => return Err(format!("evacuation {id} is not paused")),
            (Control::Cancel | Control::CancelAbort, _) => {
                if self.state == JobState::Cancelling
                    && (self.abort_in_flight || control == Control::Cancel)
                {
                    return Err(format!("evacuation {id} is already being cancelled"));
                }
                self.state = JobState::Cancelling;
                self.abort_in_flight = control == Control::CancelAbort;
            }
        }
        self.updated_at_ms = now;
        self.settle(now);
        Ok(())
    }

    /// Move to Done or Cancelled once nothing is left to wait for.
    pub fn settle(&mut self, now: Millis) {
        match self.state {
            JobState::Cancelling if self.in_flight() == 0 => {
                for v in &mut self.vms {
                    if v.state == VmState::Pending {
                        v.state = VmState::Cancelled;
                        v.retry_host = None;
                    }
                }
                self.state = JobState::Cancelled;
                self.ended_at_ms = Some(now);
            }
            JobState::Running | JobState::Paused if self.vms.iter().all(JobVm::is_settled) => {
                self.state = JobState::Done;
                self.ended_at_ms = Some(now);
            }
            _ => {}
        }
    }

    pub fn to_proto(&self) -> proto::EvacuationRecord {
        proto::EvacuationRecord {
            id: self.id.clone(),
            host: self.host.clone(),
            mode: mode_to_proto(self.mode) as i32,
            concurrency: self.concurrency,
            max_attempts: self.max_attempts,
            exclude: self.exclude.clone(),
            state: match self.state {
                JobState::Running => proto::EvacuationState::Running,
                JobState::Paused => proto::EvacuationState::Paused,
                JobState::Cancelling => proto::EvacuationState::Cancelling,
                JobState::Cancelled => proto::EvacuationState::Cancelled,
                JobState::Done => proto::EvacuationState::Done,
            } as i32,
            vms: self.vms.iter().map(vm_to_proto).collect(),
            started_at_ms: self.started_at_ms,
            updated_at_ms: self.updated_at_ms,
            ended_at_ms: self.ended_at_ms.unwrap_or(0),
            abort_in_flight: self.abort_in_flight,
            completion: Some(completion_to_proto(&self.completion)),
        }
    }
}

fn vm_to_proto(v: &JobVm) -> proto::EvacuationVm {
    proto::EvacuationVm {
        vm: v.name.clone(),
        memory_mib: v.memory_mib,
        vcpus: v.vcpus,
        state: match v.state {
            VmState::Pending => proto::EvacuationVmState::Pending,
            VmState::InFlight => proto::EvacuationVmState::InFlight,
            VmState::Moved => proto::EvacuationVmState::Moved,
            VmState::Failed => proto::EvacuationVmState::Failed,
            VmState::Cancelled => proto::EvacuationVmState::Cancelled,
        } as i32,
        migration_id: v.migration_id.clone().unwrap_or_default(),
        host: v.host.clone(),
        degraded: v.degraded,
        waiting: v.waiting.clone().unwrap_or_default(),
        required: v.required.clone(),
        attempts: v
            .attempts
            .iter()
            .map(|a| proto::EvacuationAttempt {
                attempt: a.attempt,
                destination: a.destination.clone(),
                outcome: outcome_to_proto(a.outcome) as i32,
                failed_feature: a.failed_feature.clone().unwrap_or_default(),
                error: a.error.clone().unwrap_or_default(),
                busy: a.busy,
                started_at_ms: a.started_at_ms,
                ended_at_ms: a.ended_at_ms.unwrap_or(0),
                interrupted: a.interrupted,
                adopted: a.adopted,
                cause: a.cause.as_ref().map(failure_to_proto),
            })
            .collect(),
    }
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

impl From<&proto::EvacuationRecord> for Evacuation {
    /// An evacuation as an agent reported it (CLI, console).
    fn from(r: &proto::EvacuationRecord) -> Self {
        use crate::protocol::record::{mode_from_proto, outcome_from_proto};
        let state = match proto::EvacuationState::try_from(r.state) {
            Ok(proto::EvacuationState::Paused) => JobState::Paused,
            Ok(proto::EvacuationState::Cancelling) => JobState::Cancelling,
            Ok(proto::EvacuationState::Cancelled) => JobState::Cancelled,
            Ok(proto::EvacuationState::Done) => JobState::Done,
            _ => JobState::Running,
        };
        Evacuation {
            id: r.id.clone(),
            host: r.host.clone(),
            mode: mode_from_proto(r.mode).unwrap_or(Mode::Safe),
            concurrency: r.concurrency,
            max_attempts: r.max_attempts,
            exclude: r.exclude.clone(),
            state,
            completion: crate::protocol::record::completion_from_record(r.completion.as_ref()),
            vms: r
                .vms
                .iter()
                .map(|v| JobVm {
                    name: v.vm.clone(),
                    memory_mib: v.memory_mib,
                    vcpus: v.vcpus,
                    required: v.required.clone(),
                    state: match proto::EvacuationVmState::try_from(v.state) {
                        Ok(proto::EvacuationVmState::InFlight) => VmState::InFlight,
                        Ok(proto::EvacuationVmState::Moved) => VmState::Moved,
                        Ok(proto::EvacuationVmState::Failed) => VmState::Failed,
                        Ok(proto::EvacuationVmState::Cancelled) => VmState::Cancelled,
                        _ => VmState::Pending,
                    },
                    migration_id: non_empty(&v.migration_id),
                    host: v.host.clone(),
                    degraded: v.degraded,
                    waiting: non_empty(&v.waiting),
                    attempts: v
                        .attempts
                        .iter()
                        .map(|a| AttemptEntry {
                            attempt: a.attempt,
                            destination: a.destination.clone(),
                            outcome: outcome_from_proto(a.outcome),
                            failed_feature: non_empty(&a.failed_feature),
                            error: non_empty(&a.error),
                            busy: a.busy,
                            interrupted: a.interrupted,
                            adopted: a.adopted,
                            started_at_ms: a.started_at_ms,
                            ended_at_ms: (a.ended_at_ms != 0).then_some(a.ended_at_ms),
                            cause: a.cause.as_ref().and_then(failure_from_proto),
                        })
                        .collect(),
                    retry_host: None,
                    not_before_ms: 0,
                })
                .collect(),
            abort_in_flight: r.abort_in_flight,
            started_at_ms: r.started_at_ms,
            updated_at_ms: r.updated_at_ms,
            ended_at_ms: (r.ended_at_ms != 0).then_some(r.ended_at_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(vms: &[(&str, u64)], concurrency: u32, max_attempts: u32) -> Evacuation {
        Evacuation::new(
            "e-1".into(),
            "hv-a",
            Mode::Safe,
            concurrency,
            max_attempts,
            vec![],
            vms.iter()
                .map(|(n, m)| JobVm::new(n, *m, 2, vec!["port-profile".into()], "hv-a"))
                .collect(),
            1000,
        )
    }

    /// The record of attempt `attempt` of migration `id` ending `outcome`
    /// on `to`, with `failed` as its failing feature.
    fn ended(
        id: &str,
        attempt: u32,
        to: &str,
        outcome: Outcome,
        failed: Option<&str>,
        error: &str,
    ) -> MigrationRecord {
        let mut record = MigrationRecord::from(&proto::MigrationRecord {
            id: id.into(),
            vm: "x".into(),
            source: "hv-a".into(),
            destination: to.into(),
            attempt,
            outcome: outcome_to_proto(Some(outcome)) as i32,
            error: error.into(),
            ..Default::default()
        });
        record.features = vec![crate::protocol::record::FeatureRecord::new(
            "port-profile",
            true,
        )];
        // What the source's (hv-a's) record says, as a kind.
        record.cause = if error.contains("busy") {
            Some(FailureCause::kind_only(Cause::DestinationBusy))
        } else if error.contains("hv-a is shutting down") {
            Some(FailureCause::kind_only(Cause::Signal))
        } else if error.contains("hv-a restarted") {
            Some(FailureCause::kind_only(Cause::Interrupted))
        } else {
            None
        };
        if failed.is_some() {
            record.features[0].finish = StepStatus::Failed;
        }
        record
    }

    fn index(job: &Evacuation, name: &str) -> usize {
        job.vms.iter().position(|v| v.name == name).unwrap()
    }

    #[test]
    fn largest_vms_go_first() {
        let j = job(&[("small", 512), ("big", 8192), ("mid", 2048)], 2, 3);
        let order: Vec<&str> = j.vms.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(order, ["big", "mid", "small"]);
        assert_eq!(j.ready(1000), [0, 1, 2]);
        assert!(j.may_start());
    }

    #[test]
    fn an_empty_host_is_done_at_once() {
        let j = job(&[], 2, 3);
        assert_eq!(j.state, JobState::Done);
        assert_eq!(j.ended_at_ms, Some(1000));
    }

    #[test]
    fn concurrency_caps_attempts_in_flight() {
        let mut j = job(&[("a", 1024), ("b", 1024), ("c", 1024)], 2, 3);
        j.started(0, "m-a", 1, "hv-b", 1001);
        assert!(j.may_start());
        j.started(1, "m-b", 1, "hv-c", 1002);
        assert!(!j.may_start());
        assert_eq!(j.counts().in_flight, 2);
        assert_eq!(j.ready(1003), [2]);
    }

    #[test]
    fn a_failed_attempt_is_retried_elsewhere_then_gives_up() {
        let mut j = job(&[("a", 1024)], 2, 2);
        j.started(0, "m-a", 1, "hv-b", 1001);
        let v = j.attempt_ended(
            0,
            &ended(
                "m-a",
                1,
                "hv-b",
                Outcome::Failed,
                Some("port-profile"),
                "ASSOCIATE rejected",
            ),
            1100,
        );
        assert_eq!(v, Some(Verdict::RetryElsewhere));
        let vm = &j.vms[0];
        assert_eq!(vm.state, VmState::Pending);
        assert_eq!(vm.host, "hv-a", "it runs on the source again");
        assert_eq!(
            vm.attempts[0].failed_feature.as_deref(),
            Some("port-profile")
        );
        assert_eq!(vm.attempts[0].error.as_deref(), Some("ASSOCIATE rejected"));
        assert!(j.avoid(0).contains(&"hv-b".to_string()), "{:?}", j.avoid(0));
        assert!(j.avoid(0).contains(&"hv-a".to_string()));
        j.started(0, "m-a", 2, "hv-c", 1200);
        let v = j.attempt_ended(
            0,
            &ended("m-a", 2, "hv-c", Outcome::Aborted, None, "stalled"),
            1300,
        );
        assert!(
            matches!(v, Some(Verdict::Failed(ref why)) if why.contains("failed 2 attempts")),
            "{v:?}"
        );
        assert_eq!(j.vms[0].state, VmState::Failed);
        assert_eq!(j.state, JobState::Done);
        assert_eq!(j.counts().failed, 1);
    }

    #[test]
    fn a_busy_destination_is_tried_again_without_counting() {
        let mut j = job(&[("a", 1024)], 2, 1);
        j.started(0, "m-a", 1, "hv-b", 1001);
        let busy = ended(
            "m-a",
            1,
            "hv-b",
            Outcome::Failed,
            None,
            "hv-b refused Prepare: destination busy: hv-b already receives 2",
        );
        assert_eq!(
            j.attempt_ended(0, &busy, 1100),
            Some(Verdict::RetrySameHost)
        );
        let vm = &j.vms[0];
        assert_eq!(vm.state, VmState::Pending);
        assert_eq!(vm.retry_host.as_deref(), Some("hv-b"));
        assert_eq!(vm.counted_attempts(), 0);
        assert!(!j.avoid(0).contains(&"hv-b".to_string()));
        assert!(
            j.ready(1100 + BUSY_RETRY_MS - 1).is_empty(),
            "it waits first"
        );
        assert_eq!(j.ready(1100 + BUSY_RETRY_MS), [0]);
        j.started(0, "m-a", 2, "hv-b", 2200);
        assert_eq!(j.vms[0].retry_host, None);
        let ok = ended("m-a", 2, "hv-b", Outcome::Succeeded, None, "");
        assert_eq!(
            j.attempt_ended(0, &ok, 2300),
            Some(Verdict::Moved { degraded: false })
        );
        assert_eq!(
            j.vms[0].attempts.len(),
            2,
            "the busy attempt stays in the history"
        );
        assert!(j.vms[0].attempts[0].busy);
        assert_eq!(j.state, JobState::Done);
    }

    #[test]
    fn an_attempt_cut_short_by_the_sources_own_stop_is_not_counted() {
        let mut j = job(&[("a", 1024)], 2, 1);
        j.started(0, "m-a", 1, "hv-b", 1001);
        let stopped = ended(
            "m-a",
            1,
            "hv-b",
            Outcome::Aborted,
            None,
            "agent hv-a is shutting down",
        );
        assert_eq!(
            j.attempt_ended(0, &stopped, 1100),
            Some(Verdict::RetryElsewhere)
        );
        assert!(j.vms[0].attempts[0].interrupted);
        assert_eq!(j.vms[0].counted_attempts(), 0);
        assert!(
            !j.avoid(0).contains(&"hv-b".to_string()),
            "hv-b did nothing wrong"
        );
        j.started(0, "m-a", 2, "hv-b", 1200);
        let restarted = ended(
            "m-a",
            2,
            "hv-b",
            Outcome::Aborted,
            None,
            "hv-a restarted during Perform",
        );
        assert_eq!(
            j.attempt_ended(0, &restarted, 1300),
            Some(Verdict::RetryElsewhere)
        );
        // Another host's stop is the destination's failure, and counts.
        j.started(0, "m-a", 3, "hv-b", 1400);
        let theirs = ended(
            "m-a",
            3,
            "hv-b",
            Outcome::Aborted,
            None,
            "agent hv-b is shutting down",
        );
        assert!(matches!(
            j.attempt_ended(0, &theirs, 1500),
            Some(Verdict::Failed(_))
        ));
    }

    #[test]
    fn degraded_moves_are_moved_and_marked() {
        let mut j = job(&[("a", 1024)], 2, 3);
        j.started(0, "m-a", 1, "hv-b", 1001);
        let v = j.attempt_ended(
            0,
            &ended(
                "m-a",
                1,
                "hv-b",
                Outcome::Degraded,
                Some("port-profile"),
                "",
            ),
            1100,
        );
        assert_eq!(v, Some(Verdict::Moved { degraded: true }));
        assert!(j.vms[0].degraded);
        assert_eq!(j.vms[0].host, "hv-b");
        assert_eq!(j.counts().moved, 1);
    }

    #[test]
    fn unresolved_is_never_retried() {
        let mut j = job(&[("a", 1024)], 2, 3);
        j.started(0, "m-a", 1, "hv-b", 1001);
        let v = j.attempt_ended(
            0,
            &ended("m-a", 1, "hv-b", Outcome::Unresolved, None, "no answer"),
            1100,
        );
        assert!(
            matches!(v, Some(Verdict::Failed(ref why)) if why.contains("unresolved")),
            "{v:?}"
        );
        assert_eq!(j.vms[0].state, VmState::Failed);
    }

    #[test]
    fn records_of_another_attempt_or_still_running_change_nothing() {
        let mut j = job(&[("a", 1024)], 2, 3);
        j.started(0, "m-a", 2, "hv-b", 1001);
        let before = j.clone();
        assert_eq!(
            j.attempt_ended(0, &ended("m-a", 1, "hv-b", Outcome::Failed, None, ""), 1100),
            None
        );
        assert_eq!(
            j.attempt_ended(
                0,
                &ended("m-other", 2, "hv-b", Outcome::Failed, None, ""),
                1100
            ),
            None
        );
        let mut running = ended("m-a", 2, "hv-b", Outcome::Failed, None, "");
        running.outcome = None;
        assert_eq!(j.attempt_ended(0, &running, 1100), None);
        assert_eq!(j, before);
    }

    #[test]
    fn pause_holds_new_attempts_and_resume_releases_them() {
        let mut j = job(&[("a", 1024), ("b", 1024)], 2, 3);
        j.started(0, "m-a", 1, "hv-b", 1001);
        j.control(Control::Pause, 1002).unwrap();
        assert_eq!(j.state, JobState::Paused);
        assert!(!j.may_start());
        assert!(
            j.control(Control::Pause, 1003)
                .unwrap_err()
                .contains("already paused")
        );
        // The attempt in flight goes on and its outcome counts.
        j.attempt_ended(
            0,
            &ended("m-a", 1, "hv-b", Outcome::Succeeded, None, ""),
            1004,
        );
        assert_eq!(j.counts().moved, 1);
        assert_eq!(j.state, JobState::Paused);
        j.control(Control::Resume, 1005).unwrap();
        assert!(j.may_start());
        assert!(
            j.control(Control::Resume, 1006)
                .unwrap_err()
                .contains("not paused")
        );
    }

    #[test]
    fn cancel_lets_attempts_in_flight_end_then_cancels_the_rest() {
        let mut j = job(&[("a", 1024), ("b", 1024), ("c", 1024)], 2, 3);
        j.started(0, "m-a", 1, "hv-b", 1001);
        j.started(1, "m-b", 1, "hv-c", 1001);
        j.control(Control::Cancel, 1002).unwrap();
        assert_eq!(j.state, JobState::Cancelling);
        assert!(!j.abort_in_flight);
        assert!(!j.may_start());
        j.attempt_ended(
            0,
            &ended("m-a", 1, "hv-b", Outcome::Succeeded, None, ""),
            1003,
        );
        assert_eq!(j.state, JobState::Cancelling, "b is still in flight");
        // Failing now is not retried.
        let v = j.attempt_ended(
            1,
            &ended("m-b", 1, "hv-c", Outcome::Aborted, None, "aborted"),
            1004,
        );
        assert_eq!(v, Some(Verdict::Cancelled));
        assert_eq!(j.state, JobState::Cancelled);
        assert_eq!(j.ended_at_ms, Some(1004));
        let c = j.counts();
        assert_eq!((c.moved, c.cancelled, c.pending, c.in_flight), (1, 2, 0, 0));
        assert!(
            j.control(Control::Resume, 1005)
                .unwrap_err()
                .contains("has ended")
        );
    }

    #[test]
    fn cancel_can_be_escalated_to_abort_once() {
        let mut j = job(&[("a", 1024)], 2, 3);
        j.started(0, "m-a", 1, "hv-b", 1001);
        j.control(Control::Cancel, 1002).unwrap();
        assert!(j.control(Control::Cancel, 1003).is_err());
        j.control(Control::CancelAbort, 1004).unwrap();
        assert!(j.abort_in_flight);
        assert!(j.control(Control::CancelAbort, 1005).is_err());
        assert!(
            j.control(Control::Pause, 1005)
                .unwrap_err()
                .contains("being cancelled")
        );
    }

    #[test]
    fn giving_up_and_leaving_otherwise_settle_the_vm() {
        let mut j = job(&[("a", 1024), ("b", 512)], 2, 3);
        let (a, b) = (index(&j, "a"), index(&j, "b"));
        j.give_up(a, "nowhere left to go".into(), 1001);
        j.left_otherwise(b, "hv-d", 1002);
        assert_eq!(j.vms[b].host, "hv-d");
        assert_eq!(j.state, JobState::Done);
        let c = j.counts();
        assert_eq!((c.failed, c.moved), (1, 1));
    }

    #[test]
    fn the_proto_form_round_trips() {
        let mut j = job(&[("a", 1024), ("b", 512)], 2, 3);
        j.exclude = vec!["hv-x".into()];
        j.started(0, "m-a", 1, "hv-b", 1001);
        j.attempt_ended(
            0,
            &ended(
                "m-a",
                1,
                "hv-b",
                Outcome::Failed,
                Some("port-profile"),
                "boom",
            ),
            1100,
        );
        j.waiting(1, "no host can take it now".into(), 1101);
        j.control(Control::Pause, 1102).unwrap();
        let mut back = Evacuation::from(&j.to_proto());
        // Scheduling hints stay in the journal only.
        for v in &mut back.vms {
            v.not_before_ms = 0;
        }
        let mut expected = j.clone();
        for v in &mut expected.vms {
            v.not_before_ms = 0;
            v.retry_host = None;
        }
        assert_eq!(back, expected);
    }
}
