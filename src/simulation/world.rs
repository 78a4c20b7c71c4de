//! The simulated cluster: hosts with their agent process (its live attempts,
//! locks and tombstones, lost on a crash), their durable journal, and what
//! outlives the agent (guests in the hypervisor, ports on the switch); the
//! network between them; the operator; and the event queue on one clock.
//!
//! The agent model mirrors `src/agent/` (operations.rs for what each RPC
//! answers, source.rs and destination.rs for how actions are carried out,
//! rollbacks.rs for pending rollbacks) with the same protocol machines inside.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::Report;
use super::scenario::{CHAOS_MS, HostSpec, Scenario, stage_index};
use crate::proto;
use crate::protocol::cookies::{self, check_cookie1};
use crate::protocol::destination::{
    DestinationAction, DestinationAttempt, DestinationInput, DestinationState, FreeCapacity, Known,
    Leftover, busy_with, check_new_attempt, resolve_from_journal,
};
use crate::protocol::policy::retry_backoff;
use crate::protocol::record::MigrationRecord;
use crate::protocol::source::{
    AttemptParams, Resolution, SourceAction, SourceAttempt, SourceInput, SourceState,
};
use crate::protocol::{Millis, Mode, Outcome, PeerError, RunOn, Stage, Timing, VmSpec};

/// The simulated time after which a run that has not settled is a violation.
const SETTLE_LIMIT_MS: Millis = CHAOS_MS + 2 * 3_600_000;
/// A run longer than this many steps is a violation (a livelock).
const MAX_STEPS: u64 = 400_000;
/// The agent retries pending rollbacks on this grid (rollbacks.rs polls every 500 ms).
const PENDING_POLL_MS: Millis = 500;
/// First wait before a failed rollback is retried (the agent's rollback_retry_ms).
const ROLLBACK_RETRY_MS: Millis = 1_000;
/// How long a stopping agent waits for its aborts before it exits.
const STOP_GRACE_MS: Millis = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum GuestState {
    Running,
    Paused,
    /// Started by Prepare, paused, waiting for the transfer.
    Incoming,
}

#[derive(Debug, Clone)]
pub(super) struct Guest {
    pub spec: VmSpec,
    pub state: GuestState,
}

#[derive(Debug, Clone)]
pub(super) struct Pending {
    pub attempt_id: String,
    pub migration_id: String,
    pub vm: String,
    pub feature: String,
    pub stage: Stage,
    pub tries: u32,
    pub next_try: Millis,
}

/// What survives an agent crash: the SQLite journal.
#[derive(Debug, Clone, Default)]
pub(super) struct Journal {
    pub sources: BTreeMap<String, SourceAttempt>,
    pub destinations: BTreeMap<String, DestinationAttempt>,
    pub pending: BTreeMap<(String, String, Stage), Pending>,
}

/// One incarnation of the agent process: everything here dies with it.
#[derive(Debug, Default)]
pub(super) struct Agent {
    pub epoch: u32,
    pub stopping: bool,
    /// Live source attempts by migration id.
    pub sources: BTreeMap<String, SourceAttempt>,
    /// Live destination attempts by attempt id.
    pub destinations: BTreeMap<String, DestinationAttempt>,
    pub locks: BTreeMap<String, String>,
    pub tombstones: BTreeSet<String>,
    /// The latest record of every migration this host is the source of.
    pub migrations: BTreeMap<String, MigrationRecord>,
    prepare_waiter: BTreeMap<String, u64>,
    finish_waiters: BTreeMap<String, Vec<u64>>,
    abort_waiters: BTreeMap<String, Vec<u64>>,
    /// Abort notifications sent and not yet answered (shutdown waits for them).
    notifications: BTreeSet<u64>,
}

pub(super) struct Host {
    pub name: String,
    /// Capacity, known features and how its switch misbehaves.
    pub spec: HostSpec,
    /// `None` while the agent process is not running.
    pub agent: Option<Agent>,
    next_epoch: u32,
    pub journal: Journal,
    pub guests: BTreeMap<String, Guest>,
    /// Ports on this host's switch: (VM, feature).
    pub switch: BTreeSet<(String, String)>,
    /// SIGSTOPped until then: what it would do waits.
    frozen_until: Millis,
    /// Lost for good: no agent, no guests, never restarted.
    pub lost: bool,
}

#[derive(Debug, Clone)]
enum Request {
    Prepare(Vec<u8>),
    Finish(Vec<u8>),
    Abort {
        attempt_id: String,
        reason: String,
        cookie4: Vec<u8>,
    },
    Resolve {
        attempt_id: String,
    },
    Heartbeat {
        attempt_id: String,
    },
}

#[derive(Debug, Clone)]
enum Reply {
    Prepare(Result<proto::Cookie2, PeerError>),
    Finish(Result<proto::Cookie4, PeerError>),
    Resolve(Result<Resolution, PeerError>),
    Heartbeat(Result<bool, PeerError>),
    /// Only a destination's answer carries its rollback results.
    Abort(Option<proto::Cookie4>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Prepare,
    Finish,
    Resolve,
    Heartbeat,
    Abort,
}

impl Kind {
    fn of(request: &Request) -> Kind {
        match request {
            Request::Prepare(_) => Kind::Prepare,
            Request::Finish(_) => Kind::Finish,
            Request::Abort { .. } => Kind::Abort,
            Request::Resolve { .. } => Kind::Resolve,
            Request::Heartbeat { .. } => Kind::Heartbeat,
        }
    }

    fn failed(self, error: PeerError) -> Reply {
        match self {
            Kind::Prepare => Reply::Prepare(Err(error)),
            Kind::Finish => Reply::Finish(Err(error)),
            Kind::Resolve => Reply::Resolve(Err(error)),
            Kind::Heartbeat => Reply::Heartbeat(Err(error)),
            Kind::Abort => Reply::Abort(None),
        }
    }

    /// The agent calls these with a deadline of peer_timeout (peers.rs);
    /// Prepare and Finish have none (heartbeats watch the peer instead).
    fn has_deadline(self) -> bool {
        matches!(self, Kind::Resolve | Kind::Heartbeat | Kind::Abort)
    }
}

/// An RPC in flight: who waits for it, and whether it was answered.
#[derive(Debug)]
struct Call {
    caller: usize,
    epoch: u32,
    callee: usize,
    attempt_id: String,
    kind: Kind,
    answered: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Source,
    Destination,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TransferState {
    Active,
    Completed,
    Stopped,
}

#[derive(Debug)]
struct Transfer {
    vm: String,
    from: usize,
    to: usize,
    epoch: u32,
    migration_id: String,
    attempt_id: String,
    steps: u32,
    done: u32,
    tick: Millis,
    stalls: bool,
    fails_at: Option<u32>,
    state: TransferState,
}

#[derive(Debug)]
enum Event {
    Deliver {
        rpc: u64,
        to_epoch: u32,
        request: Request,
    },
    Reply {
        rpc: u64,
        reply: Reply,
    },
    Deadline {
        rpc: u64,
    },
    /// A stage, an incoming guest or a transfer finished on a host; the
    /// effect happened whether or not the agent that asked is still there.
    Stage {
        host: usize,
        epoch: u32,
        side: Side,
        id: String,
        vm: String,
        feature: usize,
        name: String,
        stage: Stage,
        result: Result<String, String>,
    },
    IncomingStarted {
        host: usize,
        epoch: u32,
        attempt_id: String,
        result: Result<String, String>,
    },
    IncomingCompleted {
        host: usize,
        epoch: u32,
        attempt_id: String,
        result: Result<(), String>,
    },
    TransferTick {
        transfer: u64,
    },
    TransferEnded {
        host: usize,
        epoch: u32,
        migration_id: String,
        result: Result<crate::protocol::TransferStats, String>,
    },
    /// A PeerAbort on a destination waits (bounded) for the rollback.
    AbortReplyDeadline {
        host: usize,
        epoch: u32,
        attempt_id: String,
    },
    Operator,
    Kill {
        host: usize,
    },
    Freeze {
        host: usize,
        ms: Millis,
    },
    Lose {
        host: usize,
    },
    /// The operator forces every unresolved attempt whose destination was
    /// lost (`tern resolve ID`): back to its source, or, if the VM runs on
    /// another host already, to the destination side (the stale paused copy
    /// on the source is discarded).
    ForceLost,
    Stop {
        host: usize,
    },
    StopDeadline {
        host: usize,
        epoch: u32,
    },
    Restart {
        host: usize,
    },
    Partition {
        a: usize,
        b: usize,
        ms: Millis,
    },
    Heal {
        a: usize,
        b: usize,
    },
}

pub struct World {
    pub(super) scenario: Scenario,
    rng: StdRng,
    pub(super) now: Millis,
    seq: u64,
    queue: BTreeMap<(Millis, u64), Event>,
    pub(super) hosts: Vec<Host>,
    calls: BTreeMap<u64, Call>,
    next_rpc: u64,
    transfers: BTreeMap<u64, Transfer>,
    partitions: BTreeMap<(usize, usize), u32>,
    timing: Timing,
    next_migration: u64,
    write_crashes: u32,
    /// Attempts the destination answered "not committed" (Resolve or Finish).
    pub(super) said_not_committed: BTreeSet<String>,
    /// Attempts whose source sent Finish (the commit point is out of its hands).
    finish_sent: BTreeSet<String>,
    /// Attempts the operator forced to run on their source.
    forced: BTreeSet<String>,
    /// VMs that were running on a host when it was lost for good.
    pub(super) lost_vms: BTreeSet<String>,
    /// Every attempt Begin accepted, in order: (source host, vm, attempt id).
    pub(super) begun: Vec<(usize, String, String)>,
    pub(super) steps: u64,
    pub(super) faults: u64,
    pub(super) violations: Vec<String>,
    tracing: bool,
    pub(super) trace: Vec<String>,
}

fn unreachable(why: &str) -> PeerError {
    PeerError::Unreachable(why.to_string())
}

impl World {
    pub fn new(scenario: Scenario, tracing: bool) -> World {
        let hosts = scenario
            .hosts
            .iter()
            .map(|h| Host {
                name: h.name.clone(),
                spec: h.clone(),
                agent: None,
                next_epoch: 0,
                journal: Journal::default(),
                guests: BTreeMap::new(),
                switch: BTreeSet::new(),
                frozen_until: 0,
                lost: false,
            })
            .collect();
        let mut world = World {
            rng: StdRng::seed_from_u64(scenario.seed),
            scenario,
            now: 0,
            seq: 0,
            queue: BTreeMap::new(),
            hosts,
            calls: BTreeMap::new(),
            next_rpc: 0,
            transfers: BTreeMap::new(),
            partitions: BTreeMap::new(),
            timing: Timing::default(),
            next_migration: 0,
            write_crashes: 0,
            said_not_committed: BTreeSet::new(),
            finish_sent: BTreeSet::new(),
            forced: BTreeSet::new(),
            lost_vms: BTreeSet::new(),
            begun: Vec::new(),
            steps: 0,
            faults: 0,
            violations: Vec::new(),
            tracing,
            trace: Vec::new(),
        };
        for (vm, host) in world.scenario.vms.clone() {
            let h = &mut world.hosts[host];
            for f in &vm.features {
                h.switch.insert((vm.name.clone(), f.name.clone()));
            }
            h.guests.insert(
                vm.name.clone(),
                Guest {
                    spec: vm,
                    state: GuestState::Running,
                },
            );
        }
        for host in 0..world.hosts.len() {
            world.start_agent(host);
        }
        world.schedule_chaos();
        world
    }

    fn schedule_chaos(&mut self) {
        let sc = self.scenario.clone();
        let n = self.hosts.len();
        for _ in 0..sc.operator_actions {
            let at = self.rng.random_range(0..CHAOS_MS);
            self.push_at(at, Event::Operator);
        }
        for _ in 0..sc.kills {
            let at = self.rng.random_range(0..CHAOS_MS);
            let host = self.rng.random_range(0..n);
            self.push_at(at, Event::Kill { host });
        }
        for _ in 0..sc.stops {
            let at = self.rng.random_range(0..CHAOS_MS);
            let host = self.rng.random_range(0..n);
            self.push_at(at, Event::Stop { host });
        }
        for _ in 0..sc.freezes {
            let at = self.rng.random_range(0..CHAOS_MS);
            let host = self.rng.random_range(0..n);
            let ms = self.rng.random_range(500..20_000);
            self.push_at(at, Event::Freeze { host, ms });
        }
        if let Some(host) = sc.lose_host {
            if !sc.lose_on_finish {
                let at = self.rng.random_range(0..CHAOS_MS);
                self.push_at(at, Event::Lose { host });
            }
            self.push_at(CHAOS_MS + 30_000, Event::ForceLost);
            self.push_at(CHAOS_MS + 90_000, Event::ForceLost);
        }
        for _ in 0..sc.partitions {
            let at = self.rng.random_range(0..CHAOS_MS);
            let a = self.rng.random_range(0..n);
            let b = (a + self.rng.random_range(1..n)) % n;
            let ms = self.rng.random_range(100..15_000);
            self.push_at(at, Event::Partition { a, b, ms });
        }
    }

    // ---- the loop ------------------------------------------------------------

    pub fn run(&mut self) {
        loop {
            if self.steps >= MAX_STEPS || self.now > SETTLE_LIMIT_MS {
                self.violation(format!(
                    "the cluster did not settle ({} steps, t={} ms)",
                    self.steps, self.now
                ));
                break;
            }
            if !self.step() {
                break;
            }
        }
        self.check_settled();
    }

    /// One event or one timer; `false` when nothing is left to happen.
    fn step(&mut self) -> bool {
        let event_at = self.queue.keys().next().map(|&(t, _)| t);
        let timer = self.next_timer();
        let fire_timer = match (&timer, event_at) {
            (None, None) => return false,
            (Some((t, _)), Some(e)) => *t <= e,
            (Some(_), None) => true,
            (None, Some(_)) => false,
        };
        self.steps += 1;
        if fire_timer {
            let (t, which) = timer.expect("a timer");
            self.now = self.now.max(t);
            self.fire_timer(which);
        } else {
            let ((t, _), event) = self.queue.pop_first().expect("an event");
            self.now = self.now.max(t);
            match self.target(&event) {
                // A frozen process does nothing until it is thawed.
                Some(h) if self.hosts[h].frozen_until > self.now => {
                    let at = self.hosts[h].frozen_until;
                    self.push_at(at, event);
                }
                _ => self.handle_event(event),
            }
        }
        self.check_step();
        true
    }

    /// The agent process an event needs to run, if any.
    fn target(&self, event: &Event) -> Option<usize> {
        match event {
            Event::Deliver { rpc, .. } => self.calls.get(rpc).map(|c| c.callee),
            Event::Reply { rpc, .. } | Event::Deadline { rpc } => {
                self.calls.get(rpc).map(|c| c.caller)
            }
            Event::Stage { host, .. }
            | Event::IncomingStarted { host, .. }
            | Event::IncomingCompleted { host, .. }
            | Event::TransferEnded { host, .. }
            | Event::AbortReplyDeadline { host, .. }
            | Event::Stop { host }
            | Event::StopDeadline { host, .. } => Some(*host),
            // The embedded hypervisor runs inside the agent; QEMU does not.
            Event::TransferTick { transfer } if !self.scenario.transfers_survive_crash => {
                self.transfers.get(transfer).map(|t| t.from)
            }
            Event::TransferTick { .. }
            | Event::Operator
            | Event::Kill { .. }
            | Event::Freeze { .. }
            | Event::Lose { .. }
            | Event::ForceLost
            | Event::Restart { .. }
            | Event::Partition { .. }
            | Event::Heal { .. } => None,
        }
    }

    fn push_at(&mut self, at: Millis, event: Event) {
        self.seq += 1;
        self.queue.insert((at, self.seq), event);
    }

    fn push(&mut self, delay: Millis, event: Event) {
        self.push_at(self.now + delay, event);
    }

    pub(super) fn violation(&mut self, what: String) {
        let line = format!("t={} step={}: {what}", self.now, self.steps);
        self.note(format!("VIOLATION {what}"));
        self.violations.push(line);
    }

    fn note(&mut self, line: String) {
        if self.tracing {
            self.trace
                .push(format!("{:>8} {:>6}  {line}", self.now, self.steps));
        }
    }

    fn fault(&mut self, what: impl FnOnce() -> String) {
        self.faults += 1;
        if self.tracing {
            let line = format!("FAULT {}", what());
            self.note(line);
        }
    }

    fn chaos(&self) -> bool {
        self.now < CHAOS_MS
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.rng.random_bool(p.min(1.0))
    }

    // ---- timers --------------------------------------------------------------

    /// The earliest timer of a running agent: an attempt's `poll_timeout`, or
    /// the pending-rollback retry.
    fn next_timer(&self) -> Option<(Millis, Timer)> {
        let mut best: Option<(Millis, Timer)> = None;
        let mut consider = |t: Millis, which: Timer| {
            if best.as_ref().is_none_or(|(b, _)| t < *b) {
                best = Some((t, which));
            }
        };
        for (h, host) in self.hosts.iter().enumerate() {
            let Some(agent) = &host.agent else { continue };
            // A frozen agent's timers fire when it is thawed.
            let thaw = host.frozen_until;
            for (id, a) in &agent.sources {
                if let Some(t) = a.poll_timeout() {
                    consider(t.max(thaw), Timer::Source(h, id.clone()));
                }
            }
            for (id, a) in &agent.destinations {
                if let Some(t) = a.poll_timeout() {
                    consider(t.max(thaw), Timer::Destination(h, id.clone()));
                }
            }
            if !agent.stopping
                && let Some(t) = host.journal.pending.values().map(|p| p.next_try).min()
            {
                let t = t.div_ceil(PENDING_POLL_MS) * PENDING_POLL_MS;
                consider(t.max(thaw), Timer::Pending(h));
            }
        }
        best
    }

    fn fire_timer(&mut self, which: Timer) {
        match which {
            Timer::Source(h, id) => {
                let now = self.now;
                let Some(a) = self.source_mut(h, &id) else {
                    return;
                };
                let actions = a.handle(now, SourceInput::Timer);
                let idle = actions.is_empty();
                self.exec_source(h, &id, actions);
                let after = self
                    .source_mut(h, &id)
                    .map(|a| (a.poll_timeout(), format!("{:?}", a.state)));
                self.check_timer_moved(idle, h, &id, after);
            }
            Timer::Destination(h, id) => {
                let now = self.now;
                let Some(a) = self.destination_mut(h, &id) else {
                    return;
                };
                let actions = a.handle(now, DestinationInput::Timer);
                let idle = actions.is_empty();
                self.exec_destination(h, &id, actions);
                let after = self
                    .destination_mut(h, &id)
                    .map(|a| (a.poll_timeout(), format!("{:?}", a.state)));
                self.check_timer_moved(idle, h, &id, after);
            }
            Timer::Pending(h) => {
                let now = self.now;
                self.retry_pending_where(h, |p| p.next_try <= now);
            }
        }
    }

    /// A timer that fired and did nothing must have moved its deadline on,
    /// or it would fire again at once, for ever. Such an agent is taken out
    /// of the run once the violation is recorded.
    fn check_timer_moved(
        &mut self,
        idle: bool,
        h: usize,
        id: &str,
        after: Option<(Option<Millis>, String)>,
    ) {
        let Some((Some(deadline), state)) = after else {
            return;
        };
        if idle && deadline <= self.now {
            self.violation(format!(
                "the timer of {id} on {} spins in {state}",
                self.hosts[h].name
            ));
            self.hosts[h].agent = None;
        }
    }

    // ---- agents: start, crash, stop ------------------------------------------

    fn start_agent(&mut self, h: usize) {
        self.hosts[h].frozen_until = 0;
        let epoch = self.hosts[h].next_epoch;
        self.hosts[h].next_epoch += 1;
        self.hosts[h].agent = Some(Agent {
            epoch,
            ..Agent::default()
        });
        if epoch > 0 {
            self.note(format!(
                "{} agent restarts (epoch {epoch})",
                self.hosts[h].name
            ));
        }
        // Agent::recover: done source attempts give the records; open ones
        // are recovered by the table.
        let journal = self.hosts[h].journal.clone();
        let now = self.now;
        for (_, attempt) in journal.sources {
            if self.epoch(h) != Some(epoch) {
                return; // crashed again while recovering
            }
            if attempt.is_done() {
                self.agent_mut(h)
                    .migrations
                    .insert(attempt.migration_id.clone(), attempt.record.clone());
                continue;
            }
            let mut attempt = attempt;
            let from = attempt.state.clone();
            let actions = attempt.recover(now);
            self.note(format!(
                "{} recovers source {} from {from:?}",
                self.hosts[h].name, attempt.attempt_id
            ));
            self.start_source(h, attempt, actions);
        }
        for (_, attempt) in journal.destinations {
            if self.epoch(h) != Some(epoch) {
                return;
            }
            if attempt.is_finished() {
                continue;
            }
            let mut attempt = attempt;
            let from = attempt.state.clone();
            let actions = attempt.recover(now);
            self.note(format!(
                "{} recovers destination {} from {from:?}",
                self.hosts[h].name, attempt.attempt_id
            ));
            self.start_destination(h, attempt, actions);
        }
    }

    /// The agent process dies: its memory, its in-process transfers and the
    /// connections it was serving go with it.
    fn crash(&mut self, h: usize, why: &str) {
        if self.hosts[h].agent.is_some() {
            let name = self.hosts[h].name.clone();
            self.fault(|| format!("{name} agent dies: {why}"));
        }
        self.end_process(h);
    }

    /// The agent process is gone (a crash, or an exit after SIGTERM).
    fn end_process(&mut self, h: usize) {
        let Some(agent) = self.hosts[h].agent.take() else {
            return;
        };
        // Stages in flight die with the agent (the simulated switch runs in
        // it; exec hooks get SIGKILL with their parent): each either reached
        // the switch before the crash or never will.
        let in_flight: Vec<(Millis, u64)> = self
            .queue
            .iter()
            .filter(|(_, e)| matches!(e, Event::Stage { host, epoch, .. } if *host == h && *epoch == agent.epoch))
            .map(|(k, _)| *k)
            .collect();
        for key in in_flight {
            let Some(Event::Stage {
                vm,
                name: feature,
                stage,
                result,
                ..
            }) = self.queue.remove(&key)
            else {
                continue;
            };
            if result.is_ok() && self.rng.random_bool(0.5) {
                self.apply_stage(h, vm, feature, stage);
            }
        }
        if !self.scenario.transfers_survive_crash {
            for t in self.transfers.values_mut() {
                if t.from == h && t.state == TransferState::Active {
                    t.state = TransferState::Stopped;
                }
            }
        }
        // Calls to this process break at once.
        let calls: Vec<u64> = self
            .calls
            .iter()
            .filter(|(_, c)| c.callee == h && !c.answered)
            .map(|(&id, _)| id)
            .collect();
        for rpc in calls {
            self.connection_reset(rpc);
        }
        let delay = self.rng.random_range(50..5_000);
        self.push(delay, Event::Restart { host: h });
    }

    /// The host is gone for good, with its guests; nothing of it answers.
    fn lose(&mut self, h: usize) {
        if self.hosts[h].lost {
            return;
        }
        let name = self.hosts[h].name.clone();
        self.fault(|| format!("{name} is lost for good, with its guests"));
        self.end_process(h);
        let host = &mut self.hosts[h];
        host.lost = true;
        // A running or paused copy was the VM (an incoming one was not yet).
        for (vm, g) in std::mem::take(&mut host.guests) {
            if g.state != GuestState::Incoming {
                self.lost_vms.insert(vm);
            }
        }
        for t in self.transfers.values_mut() {
            if (t.from == h || t.to == h) && t.state == TransferState::Active {
                t.state = TransferState::Stopped;
            }
        }
    }

    /// What an operator does once a host is known to be gone: force each
    /// attempt left unresolved towards it to run on its source, unless the
    /// VM already runs elsewhere.
    fn force_lost(&mut self) {
        let now = self.now;
        for h in 0..self.hosts.len() {
            let Some(agent) = self.answering(h) else {
                continue;
            };
            let stuck: Vec<String> = agent
                .sources
                .iter()
                .filter(|(_, a)| a.state == SourceState::Unresolved)
                .filter(|(_, a)| {
                    self.host_index(&a.destination)
                        .is_some_and(|d| self.hosts[d].lost)
                })
                .map(|(m, _)| m.clone())
                .collect();
            for m in stuck {
                let Some(a) = self.source_mut(h, &m) else {
                    continue;
                };
                let vm = a.vm.name.clone();
                // `tern resolve --run-on source` refuses while the VM runs on
                // another reachable host (the destination committed and the
                // VM moved on): the stale paused copy is discarded instead.
                let elsewhere = (0..self.hosts.len()).any(|o| {
                    o != h
                        && self.answering(o).is_some()
                        && self.hosts[o]
                            .guests
                            .get(&vm)
                            .is_some_and(|g| g.state == GuestState::Running)
                });
                let run_on = if elsewhere {
                    RunOn::Destination
                } else {
                    RunOn::Source
                };
                let Some(a) = self.source_mut(h, &m) else {
                    continue;
                };
                let id = a.attempt_id.clone();
                match a.force_resolve(now, run_on) {
                    Ok(actions) => {
                        self.note(format!("operator: resolve {m} --run-on {run_on:?}"));
                        self.forced.insert(id);
                        self.exec_source(h, &m, actions);
                    }
                    Err(e) => self.violation(format!("forcing {m} was refused: {e}")),
                }
            }
        }
    }

    fn connection_reset(&mut self, rpc: u64) {
        let Some(call) = self.calls.get(&rpc) else {
            return;
        };
        let reply = call.kind.failed(unreachable("connection reset"));
        self.push(1, Event::Reply { rpc, reply });
    }

    /// SIGTERM: abort every uncommitted attempt both ways, tell the peers,
    /// wait (bounded) and exit (Agent::shut_down).
    fn stop(&mut self, h: usize) {
        let Some(agent) = self.hosts[h].agent.as_mut() else {
            return;
        };
        if agent.stopping {
            return;
        }
        agent.stopping = true;
        let epoch = agent.epoch;
        let name = self.hosts[h].name.clone();
        self.fault(|| format!("{name} agent gets SIGTERM"));
        let reason = format!("agent {name} is shutting down");
        let (sources, destinations): (Vec<String>, Vec<String>) = {
            let agent = self.agent_mut(h);
            (
                agent.sources.keys().cloned().collect(),
                agent.destinations.keys().cloned().collect(),
            )
        };
        let now = self.now;
        for id in sources {
            if let Some(a) = self.source_mut(h, &id)
                && let Ok(actions) = a.abort(now, &reason)
            {
                self.exec_source(h, &id, actions);
            }
        }
        for id in destinations {
            if let Some(a) = self.destination_mut(h, &id)
                && let Ok(actions) = a.abort(now, &reason, true)
            {
                self.exec_destination(h, &id, actions);
            }
        }
        if self.epoch(h) != Some(epoch) {
            return;
        }
        self.push(STOP_GRACE_MS, Event::StopDeadline { host: h, epoch });
        self.maybe_exit(h);
    }

    /// A stopping agent exits once its aborts are done and its peers told.
    fn maybe_exit(&mut self, h: usize) {
        let Some(agent) = &self.hosts[h].agent else {
            return;
        };
        if !agent.stopping {
            return;
        }
        let aborting = agent.sources.values().any(|a| {
            matches!(
                a.state,
                SourceState::Preparing
                    | SourceState::Transferring { .. }
                    | SourceState::Aborting { .. }
            )
        }) || !agent.destinations.is_empty();
        if !aborting && agent.notifications.is_empty() {
            self.exit(h);
        }
    }

    fn exit(&mut self, h: usize) {
        let name = self.hosts[h].name.clone();
        self.note(format!("{name} agent exits"));
        // Attempts past the commit point are left to recovery after a restart.
        self.end_process(h);
    }

    // ---- accessors -----------------------------------------------------------

    fn agent_mut(&mut self, h: usize) -> &mut Agent {
        self.hosts[h].agent.as_mut().expect("a running agent")
    }

    fn source_mut(&mut self, h: usize, migration_id: &str) -> Option<&mut SourceAttempt> {
        self.hosts[h].agent.as_mut()?.sources.get_mut(migration_id)
    }

    fn destination_mut(&mut self, h: usize, attempt_id: &str) -> Option<&mut DestinationAttempt> {
        self.hosts[h]
            .agent
            .as_mut()?
            .destinations
            .get_mut(attempt_id)
    }

    /// The agent, if it is running and not frozen: what an operator's
    /// command can reach.
    fn answering(&self, h: usize) -> Option<&Agent> {
        let host = &self.hosts[h];
        (host.frozen_until <= self.now)
            .then_some(host.agent.as_ref())
            .flatten()
    }

    fn epoch(&self, h: usize) -> Option<u32> {
        self.hosts[h].agent.as_ref().map(|a| a.epoch)
    }

    fn host_index(&self, name: &str) -> Option<usize> {
        self.hosts.iter().position(|h| h.name == name)
    }

    fn partitioned(&self, a: usize, b: usize) -> bool {
        self.partitions.contains_key(&(a.min(b), a.max(b)))
    }

    // ---- events --------------------------------------------------------------

    fn handle_event(&mut self, event: Event) {
        match event {
            Event::Deliver {
                rpc,
                to_epoch,
                request,
            } => self.deliver(rpc, to_epoch, request),
            Event::Reply { rpc, reply } => self.on_reply(rpc, reply),
            Event::Deadline { rpc } => {
                if let Some(call) = self.calls.get(&rpc)
                    && !call.answered
                {
                    let reply = call.kind.failed(unreachable("deadline exceeded"));
                    self.on_reply(rpc, reply);
                }
            }
            Event::Stage {
                host,
                epoch,
                side,
                id,
                vm,
                feature,
                name,
                stage,
                result,
            } => {
                if result.is_ok() {
                    self.apply_stage(host, vm, name, stage);
                }
                if self.epoch(host) != Some(epoch) {
                    return;
                }
                match side {
                    Side::Source => {
                        let input = SourceInput::StageDone {
                            feature,
                            stage,
                            result,
                        };
                        self.source_input(host, &id, input);
                    }
                    Side::Destination => {
                        let input = DestinationInput::StageDone {
                            feature,
                            stage,
                            result,
                        };
                        self.destination_input(host, &id, input);
                    }
                }
            }
            Event::IncomingStarted {
                host,
                epoch,
                attempt_id,
                result,
            } => {
                if self.epoch(host) == Some(epoch) {
                    let input = DestinationInput::IncomingStarted(result);
                    self.destination_input(host, &attempt_id, input);
                }
            }
            Event::IncomingCompleted {
                host,
                epoch,
                attempt_id,
                result,
            } => {
                if self.epoch(host) == Some(epoch) {
                    let input = DestinationInput::IncomingCompleted(result);
                    self.destination_input(host, &attempt_id, input);
                }
            }
            Event::TransferTick { transfer } => self.transfer_tick(transfer),
            Event::TransferEnded {
                host,
                epoch,
                migration_id,
                result,
            } => {
                if self.epoch(host) == Some(epoch) {
                    self.source_input(host, &migration_id, SourceInput::TransferDone(result));
                }
            }
            Event::AbortReplyDeadline {
                host,
                epoch,
                attempt_id,
            } => {
                if self.epoch(host) == Some(epoch) {
                    let waiters = self
                        .agent_mut(host)
                        .abort_waiters
                        .remove(&attempt_id)
                        .unwrap_or_default();
                    for rpc in waiters {
                        self.send_reply(rpc, Reply::Abort(None));
                    }
                }
            }
            Event::Operator => self.operator(),
            Event::Kill { host } => self.crash(host, "SIGKILL"),
            Event::Freeze { host, ms } => {
                if self.hosts[host].agent.is_some() && self.hosts[host].frozen_until <= self.now {
                    let name = self.hosts[host].name.clone();
                    self.fault(|| format!("{name} agent frozen (SIGSTOP) for {ms} ms"));
                    self.hosts[host].frozen_until = self.now + ms;
                }
            }
            Event::Stop { host } => self.stop(host),
            Event::StopDeadline { host, epoch } => {
                if self.epoch(host) == Some(epoch) {
                    self.exit(host);
                }
            }
            Event::Lose { host } => self.lose(host),
            Event::ForceLost => self.force_lost(),
            Event::Restart { host } => {
                if self.hosts[host].agent.is_none() && !self.hosts[host].lost {
                    self.start_agent(host);
                }
            }
            Event::Partition { a, b, ms } => {
                let (na, nb) = (self.hosts[a].name.clone(), self.hosts[b].name.clone());
                self.fault(|| format!("partition {na} | {nb} for {ms} ms"));
                *self.partitions.entry((a.min(b), a.max(b))).or_default() += 1;
                self.push(ms, Event::Heal { a, b });
            }
            Event::Heal { a, b } => {
                let key = (a.min(b), a.max(b));
                if let Some(n) = self.partitions.get_mut(&key) {
                    *n -= 1;
                    if *n == 0 {
                        self.partitions.remove(&key);
                        let (na, nb) = (self.hosts[a].name.clone(), self.hosts[b].name.clone());
                        self.note(format!("partition {na} | {nb} heals"));
                    }
                }
            }
        }
    }

    /// What a stage that succeeded did to the host's switch.
    fn apply_stage(&mut self, h: usize, vm: String, feature: String, stage: Stage) {
        let port = (vm, feature);
        match stage {
            Stage::Prepare | Stage::Finish => {
                self.hosts[h].switch.insert(port);
            }
            Stage::Rollback | Stage::Release => {
                self.hosts[h].switch.remove(&port);
            }
        }
    }

    fn source_input(&mut self, h: usize, migration_id: &str, input: SourceInput) {
        let now = self.now;
        let Some(a) = self.source_mut(h, migration_id) else {
            return;
        };
        let actions = a.handle(now, input);
        self.exec_source(h, migration_id, actions);
    }

    fn destination_input(&mut self, h: usize, attempt_id: &str, input: DestinationInput) {
        let now = self.now;
        let Some(a) = self.destination_mut(h, attempt_id) else {
            return;
        };
        let actions = a.handle(now, input);
        self.exec_destination(h, attempt_id, actions);
    }

    // ---- the network ---------------------------------------------------------

    fn delay(&mut self) -> Millis {
        let (lo, hi) = self.scenario.net.delay;
        self.rng.random_range(lo..=hi)
    }

    /// Whether a message is lost on the way (a broken connection): the
    /// caller gets an error, the message never arrives.
    fn lost(&mut self, from: usize, to: usize) -> bool {
        if self.partitioned(from, to) {
            return true;
        }
        if self.chaos() && self.chance(self.scenario.net.loss) {
            let (a, b) = (self.hosts[from].name.clone(), self.hosts[to].name.clone());
            self.fault(|| format!("message {a} -> {b} lost (connection reset)"));
            return true;
        }
        false
    }

    fn call(&mut self, caller: usize, callee: usize, attempt_id: &str, request: Request) {
        let rpc = self.next_rpc;
        self.next_rpc += 1;
        let kind = Kind::of(&request);
        let attempt_id = attempt_id.to_string();
        let epoch = self.epoch(caller).expect("a running caller");
        self.calls.insert(
            rpc,
            Call {
                caller,
                epoch,
                callee,
                attempt_id,
                kind,
                answered: false,
            },
        );
        if kind == Kind::Abort {
            self.agent_mut(caller).notifications.insert(rpc);
        }
        if kind.has_deadline() {
            let timeout = self.timing.peer_timeout_ms;
            self.push(timeout, Event::Deadline { rpc });
        }
        let Some(to_epoch) = self.epoch(callee) else {
            let reply = kind.failed(unreachable("connection refused"));
            self.push(1, Event::Reply { rpc, reply });
            return;
        };
        if self.lost(caller, callee) {
            let after = self.rng.random_range(1..3_000);
            let reply = kind.failed(unreachable("connection reset"));
            self.push(after, Event::Reply { rpc, reply });
            return;
        }
        let d = self.delay();
        self.push(
            d,
            Event::Deliver {
                rpc,
                to_epoch,
                request: request.clone(),
            },
        );
        if self.chaos() && self.chance(self.scenario.net.duplicate) {
            self.fault(|| format!("request {rpc} ({kind:?}) duplicated"));
            let d = self.delay();
            self.push(
                d,
                Event::Deliver {
                    rpc,
                    to_epoch,
                    request,
                },
            );
        }
    }

    fn send_reply(&mut self, rpc: u64, reply: Reply) {
        let Some(call) = self.calls.get(&rpc) else {
            return;
        };
        let (caller, callee, kind) = (call.caller, call.callee, call.kind);
        if self.lost(callee, caller) {
            let after = self.rng.random_range(1..3_000);
            let reply = kind.failed(unreachable("connection reset"));
            self.push(after, Event::Reply { rpc, reply });
            return;
        }
        let d = self.delay();
        self.push(d, Event::Reply { rpc, reply });
    }

    fn on_reply(&mut self, rpc: u64, reply: Reply) {
        let Some(call) = self.calls.get_mut(&rpc) else {
            return;
        };
        if call.answered {
            return;
        }
        call.answered = true;
        let (caller, epoch, attempt_id) = (call.caller, call.epoch, call.attempt_id.clone());
        if self.epoch(caller) != Some(epoch) {
            return;
        }
        if let Reply::Abort(c4) = reply {
            self.agent_mut(caller).notifications.remove(&rpc);
            if let Some(c4) = c4 {
                self.record_peer_rollback(caller, &c4);
            }
            self.maybe_exit(caller);
            return;
        }
        // The attempt that made the call, if it is still running.
        let migration_id = self.hosts[caller].agent.as_ref().and_then(|a| {
            a.sources
                .iter()
                .find(|(_, s)| s.attempt_id == attempt_id)
                .map(|(m, _)| m.clone())
        });
        let Some(migration_id) = migration_id else {
            return;
        };
        let input = match reply {
            Reply::Prepare(r) => SourceInput::PrepareReplied(r),
            Reply::Finish(r) => SourceInput::FinishReplied(r),
            Reply::Resolve(r) => SourceInput::ResolveReplied(r),
            Reply::Heartbeat(r) => SourceInput::HeartbeatReplied(r),
            Reply::Abort(_) => unreachable!("handled above"),
        };
        self.source_input(caller, &migration_id, input);
        self.maybe_exit(caller);
    }

    /// A request reaches a host.
    fn deliver(&mut self, rpc: u64, to_epoch: u32, request: Request) {
        let Some(call) = self.calls.get(&rpc) else {
            return;
        };
        let to = call.callee;
        if self.epoch(to) != Some(to_epoch) {
            // The process the connection went to is gone.
            return;
        }
        match request {
            Request::Prepare(bytes) => self.serve_prepare(to, rpc, &bytes),
            Request::Finish(bytes) => self.serve_finish(to, rpc, &bytes),
            Request::Abort {
                attempt_id,
                reason,
                cookie4,
            } => self.serve_abort(to, rpc, &attempt_id, &reason, &cookie4),
            Request::Resolve { attempt_id } => self.serve_resolve(to, rpc, &attempt_id),
            Request::Heartbeat { attempt_id } => {
                // Agent::heartbeat: known while a live attempt task has it.
                let now = self.now;
                let known = match self.destination_mut(to, &attempt_id) {
                    Some(a) => {
                        let actions = a.handle(now, DestinationInput::Heartbeat);
                        self.exec_destination(to, &attempt_id, actions);
                        true
                    }
                    None => false,
                };
                self.send_reply(rpc, Reply::Heartbeat(Ok(known)));
            }
        }
    }

    // ---- the destination agent's RPCs (operations.rs) ------------------------

    fn serve_prepare(&mut self, h: usize, rpc: u64, bytes: &[u8]) {
        let refuse = |w: &mut World, why: String| {
            w.send_reply(rpc, Reply::Prepare(Err(PeerError::Refused(why))));
        };
        if self.agent_mut(h).stopping {
            let name = self.hosts[h].name.clone();
            let reply = Reply::Prepare(Err(unreachable(&format!("agent {name} is shutting down"))));
            self.send_reply(rpc, reply);
            return;
        }
        let c1 = match cookies::decode::<proto::Cookie1>("C1", bytes) {
            Ok(c1) => c1,
            Err(e) => return refuse(self, e.to_string()),
        };
        let knows = self.hosts[h].spec.knows.clone();
        let incoming = match check_cookie1(&c1, |f| knows.contains(&f)) {
            Ok(i) => i,
            Err(e) => return refuse(self, e.to_string()),
        };
        let host = &self.hosts[h];
        let used_memory: u64 = host.guests.values().map(|g| g.spec.memory_mib).sum();
        let used_vcpus: u32 = host.guests.values().map(|g| g.spec.vcpus).sum();
        let free = FreeCapacity {
            memory_mib: host.spec.memory_mib.saturating_sub(used_memory),
            vcpus: host.spec.vcpus.saturating_sub(used_vcpus),
        };
        let already_here = host.guests.contains_key(&incoming.vm.name);
        let agent = self.agent_mut(h);
        let known = Known {
            aborted: agent.tombstones.contains(&incoming.attempt_id),
            running: agent.destinations.contains_key(&incoming.attempt_id),
            journaled: self.hosts[h]
                .journal
                .destinations
                .contains_key(&incoming.attempt_id),
        };
        if let Err(refusal) = check_new_attempt(&incoming.attempt_id, &self.hosts[h].name, known) {
            return refuse(self, refusal.to_string());
        }
        let name = self.hosts[h].name.clone();
        let running: Vec<String> = self.hosts[h]
            .agent
            .as_ref()
            .map(|a| {
                let releasing = a
                    .locks
                    .get(&incoming.vm.name)
                    .and_then(|m| a.sources.get(m))
                    .map(|s| s.attempt_id.clone());
                a.destinations
                    .values()
                    .filter(|d| d.vm.name == incoming.vm.name)
                    .map(|d| d.attempt_id.clone())
                    .chain(releasing)
                    .collect()
            })
            .unwrap_or_default();
        let leftovers: Vec<Leftover> = self.hosts[h]
            .journal
            .pending
            .values()
            .filter(|p| p.vm == incoming.vm.name)
            .map(|p| Leftover::Pending {
                attempt_id: &p.attempt_id,
                feature: &p.feature,
                stage: p.stage,
            })
            .chain(
                running
                    .iter()
                    .map(|id| Leftover::Running { attempt_id: id }),
            )
            .collect();
        let busy = busy_with(&incoming.vm.name, &name, &leftovers);
        let (timing, now) = (self.timing, self.now);
        match DestinationAttempt::prepare(incoming, &name, free, already_here, busy, timing, now) {
            Ok((attempt, actions)) => {
                let id = attempt.attempt_id.clone();
                self.agent_mut(h).prepare_waiter.insert(id, rpc);
                self.start_destination(h, attempt, actions);
            }
            Err(refusal) => refuse(self, refusal.to_string()),
        }
    }

    fn serve_finish(&mut self, h: usize, rpc: u64, bytes: &[u8]) {
        let c3 = match cookies::decode::<proto::Cookie3>("C3", bytes) {
            Ok(c3) => c3,
            Err(e) => {
                let reply = Reply::Finish(Err(PeerError::Refused(e.to_string())));
                return self.send_reply(rpc, reply);
            }
        };
        let id = c3.attempt_id.clone();
        if self.scenario.lose_on_finish && self.scenario.lose_host == Some(h) && self.chaos() {
            // Lost while carrying Finish out: it may commit first, or not.
            let after = self.rng.random_range(0..100);
            self.push(after, Event::Lose { host: h });
        }
        if self.destination_mut(h, &id).is_some() {
            self.agent_mut(h)
                .finish_waiters
                .entry(id.clone())
                .or_default()
                .push(rpc);
            self.destination_input(h, &id, DestinationInput::Finish(c3));
            return;
        }
        // Already decided (or never here): answer from the journal.
        let reply = match self.hosts[h].journal.destinations.get(&id) {
            Some(a) => Ok(a.cookie4()),
            None => Err(PeerError::Refused(format!(
                "no attempt {id} on {}",
                self.hosts[h].name
            ))),
        };
        if let Ok(c4) = &reply
            && !c4.committed
        {
            self.said_not_committed.insert(id);
        }
        self.send_reply(rpc, Reply::Finish(reply));
    }

    fn serve_abort(&mut self, h: usize, rpc: u64, attempt_id: &str, reason: &str, cookie4: &[u8]) {
        let now = self.now;
        // This host is the source of the attempt: its peer aborted.
        let source = self.hosts[h].agent.as_ref().and_then(|a| {
            a.sources
                .iter()
                .find(|(_, s)| s.attempt_id == attempt_id)
                .map(|(m, _)| m.clone())
        });
        let is_source = source.is_some() || self.hosts[h].journal.sources.contains_key(attempt_id);
        if is_source {
            if let Some(m) = source {
                let input = SourceInput::PeerAborted {
                    reason: reason.to_string(),
                };
                self.source_input(h, &m, input);
            }
            if let Ok(c4) = cookies::decode::<proto::Cookie4>("C4", cookie4) {
                self.record_peer_rollback(h, &c4);
            }
            self.send_reply(rpc, Reply::Abort(None));
            return;
        }
        if let Some(a) = self.destination_mut(h, attempt_id) {
            match a.abort(now, reason, false) {
                Ok(actions) => {
                    self.agent_mut(h)
                        .abort_waiters
                        .entry(attempt_id.to_string())
                        .or_default()
                        .push(rpc);
                    let epoch = self.epoch(h).expect("running");
                    self.push(
                        self.timing.peer_timeout_ms * 2,
                        Event::AbortReplyDeadline {
                            host: h,
                            epoch,
                            attempt_id: attempt_id.to_string(),
                        },
                    );
                    self.exec_destination(h, attempt_id, actions);
                }
                Err(_) => self.send_reply(rpc, Reply::Abort(None)),
            }
            return;
        }
        let journaled = self.hosts[h].journal.destinations.get(attempt_id).cloned();
        match journaled {
            Some(a) if a.is_committed() => self.send_reply(rpc, Reply::Abort(None)),
            Some(a) => self.send_reply(rpc, Reply::Abort(Some(a.cookie4()))),
            None => {
                // Prepare may still be on its way: make sure it is refused.
                self.agent_mut(h).tombstones.insert(attempt_id.to_string());
                self.send_reply(rpc, Reply::Abort(None));
            }
        }
    }

    fn serve_resolve(&mut self, h: usize, rpc: u64, attempt_id: &str) {
        let now = self.now;
        let answer = if let Some(a) = self.destination_mut(h, attempt_id) {
            let (answer, actions) = a.resolve(now);
            // The decision is journaled before the answer leaves.
            let crashed = self.exec_destination(h, attempt_id, actions);
            if crashed {
                return;
            }
            let c4 = self
                .destination_mut(h, attempt_id)
                .map(|a| a.cookie4())
                .or_else(|| {
                    let j = self.hosts[h].journal.destinations.get(attempt_id);
                    j.map(DestinationAttempt::cookie4)
                })
                .expect("a destination attempt");
            (answer, c4)
        } else {
            let journaled = self.hosts[h].journal.destinations.get(attempt_id).cloned();
            if journaled.is_none() {
                self.agent_mut(h).tombstones.insert(attempt_id.to_string());
            }
            let name = &self.hosts[h].name;
            let (committed, c4) = resolve_from_journal(name, attempt_id, journaled.as_ref());
            (Some(committed), c4)
        };
        let resolution = match answer {
            (Some(true), c4) => Resolution::Committed(c4),
            (Some(false), c4) => {
                self.said_not_committed.insert(attempt_id.to_string());
                Resolution::NotCommitted(c4)
            }
            (None, _) => Resolution::Pending,
        };
        self.note(format!(
            "{} answers Resolve {attempt_id}: {}",
            self.hosts[h].name,
            match &resolution {
                Resolution::Committed(_) => "committed",
                Resolution::NotCommitted(_) => "not committed",
                Resolution::Pending => "pending",
            }
        ));
        self.send_reply(rpc, Reply::Resolve(Ok(resolution)));
    }

    /// Agent::record_peer_rollback: the destination's rollback results go
    /// into the source's journaled record.
    fn record_peer_rollback(&mut self, h: usize, c4: &proto::Cookie4) {
        let live = self.hosts[h]
            .agent
            .as_ref()
            .is_some_and(|a| a.sources.values().any(|s| s.attempt_id == c4.attempt_id));
        if live {
            return;
        }
        let Some(attempt) = self.hosts[h].journal.sources.get_mut(&c4.attempt_id) else {
            return;
        };
        attempt.apply_peer_rollback(c4);
        let record = attempt.record.clone();
        if let Some(agent) = self.hosts[h].agent.as_mut()
            && agent
                .migrations
                .get(&record.id)
                .is_some_and(|r| r.attempt_id == record.attempt_id)
        {
            agent.migrations.insert(record.id.clone(), record);
        }
    }

    // ---- carrying out actions (source.rs, destination.rs) --------------------

    fn start_source(&mut self, h: usize, attempt: SourceAttempt, actions: Vec<SourceAction>) {
        let id = attempt.migration_id.clone();
        let agent = self.agent_mut(h);
        agent
            .locks
            .insert(attempt.vm.name.clone(), attempt.migration_id.clone());
        agent.migrations.insert(id.clone(), attempt.record.clone());
        agent.sources.insert(id.clone(), attempt);
        self.exec_source(h, &id, actions);
    }

    fn start_destination(
        &mut self,
        h: usize,
        attempt: DestinationAttempt,
        actions: Vec<DestinationAction>,
    ) {
        let id = attempt.attempt_id.clone();
        self.agent_mut(h).destinations.insert(id.clone(), attempt);
        self.exec_destination(h, &id, actions);
    }

    /// A journal write, which may be where the agent crashes: before the
    /// write is durable (it is lost; this is also what a write that fails
    /// does, since the agent then exits: Agent::journal_failed) or just
    /// after. `true` if it crashed.
    fn journal_write(&mut self, h: usize, write: impl FnOnce(&mut Journal)) -> bool {
        let crash = self.chaos()
            && self.write_crashes < self.scenario.max_write_crashes
            && self.chance(self.scenario.crash_per_write);
        if !crash {
            write(&mut self.hosts[h].journal);
            return false;
        }
        self.write_crashes += 1;
        let durable = self.rng.random_bool(0.5);
        if durable {
            write(&mut self.hosts[h].journal);
        }
        let why = if durable {
            "crash just after a journal write"
        } else {
            "crash during a journal write (not durable)"
        };
        self.crash(h, why);
        true
    }

    fn stage_result(&mut self, h: usize, feature: &str, stage: Stage) -> Result<String, String> {
        let host = &self.hosts[h];
        let name = host.name.clone();
        if stage == Stage::Finish && host.spec.broken == Some(feature) {
            self.fault(|| format!("{name} switch rejects {feature} finish"));
            return Err(format!("switch on {name} rejected ASSOCIATE of {feature}"));
        }
        let mut p = host.spec.fail[stage_index(stage)];
        // After the chaos window rollbacks and releases work, so pending
        // ones can clear and the cluster settles.
        if !self.chaos() && matches!(stage, Stage::Rollback | Stage::Release) {
            p = 0.0;
        }
        if self.chance(p) {
            self.fault(|| format!("{feature} {stage} fails on {name}"));
            return Err(format!("{feature} {stage} failed on {name}"));
        }
        Ok(format!("{stage} done"))
    }

    fn stage_latency(&mut self) -> Millis {
        if self.chance(self.scenario.slow_stage) {
            self.fault(|| "slow stage".into());
            self.rng.random_range(1_000..8_000)
        } else {
            self.rng.random_range(1..50)
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn run_stage(
        &mut self,
        h: usize,
        side: Side,
        id: &str,
        vm: &VmSpec,
        feature: usize,
        stage: Stage,
    ) {
        let Some(spec) = vm.features.get(feature) else {
            self.violation(format!(
                "{stage} of feature #{feature}, which {} lacks",
                vm.name
            ));
            return;
        };
        let name = spec.name.clone();
        let result = self.stage_result(h, &name, stage);
        let delay = self.stage_latency();
        let epoch = self.epoch(h).expect("running");
        self.push(
            delay,
            Event::Stage {
                host: h,
                epoch,
                side,
                id: id.to_string(),
                vm: vm.name.clone(),
                feature,
                name,
                stage,
                result,
            },
        );
    }

    fn record_pending(
        &mut self,
        h: usize,
        attempt_id: &str,
        migration_id: &str,
        vm: &VmSpec,
        feature: usize,
        stage: Stage,
    ) -> bool {
        let name = vm
            .features
            .get(feature)
            .map(|f| f.name.clone())
            .unwrap_or_default();
        let pending = Pending {
            attempt_id: attempt_id.to_string(),
            migration_id: migration_id.to_string(),
            vm: vm.name.clone(),
            feature: name.clone(),
            stage,
            tries: 1,
            next_try: self.now + ROLLBACK_RETRY_MS,
        };
        let key = (attempt_id.to_string(), name, stage);
        self.journal_write(h, |j| {
            j.pending.insert(key, pending);
        })
    }

    /// Run each of a host's pending entries that `which` picks once, unless
    /// the agent dies on the way.
    fn retry_pending_where(&mut self, h: usize, which: impl Fn(&Pending) -> bool) {
        let keys: Vec<_> = self.hosts[h]
            .journal
            .pending
            .iter()
            .filter(|(_, p)| which(p))
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            if self.hosts[h].agent.is_none() {
                return;
            }
            self.retry_pending(h, &key);
        }
    }

    /// rollbacks.rs: run one pending rollback or release again.
    fn retry_pending(&mut self, h: usize, key: &(String, String, Stage)) {
        let Some(p) = self.hosts[h].journal.pending.get(key).cloned() else {
            return;
        };
        let result = self.stage_result(h, &p.feature, p.stage);
        match result {
            Ok(_) => {
                self.hosts[h]
                    .switch
                    .remove(&(p.vm.clone(), p.feature.clone()));
                self.note(format!(
                    "{} pending {} of {} for {} done",
                    self.hosts[h].name, p.stage, p.feature, p.vm
                ));
                let key = key.clone();
                self.journal_write(h, |j| {
                    j.pending.remove(&key);
                });
            }
            Err(_) => {
                let tries = p.tries + 1;
                let next_try = self.now + retry_backoff(ROLLBACK_RETRY_MS, tries);
                let key = key.clone();
                self.journal_write(h, |j| {
                    if let Some(p) = j.pending.get_mut(&key) {
                        p.tries = tries;
                        p.next_try = next_try;
                    }
                });
            }
        }
    }

    /// Execute a source attempt's actions; `true` if the agent crashed.
    fn exec_source(&mut self, h: usize, migration_id: &str, actions: Vec<SourceAction>) -> bool {
        for action in actions {
            let Some(attempt) = self.source_mut(h, migration_id) else {
                return true;
            };
            let (vm, attempt_id, destination) = (
                attempt.vm.clone(),
                attempt.attempt_id.clone(),
                attempt.destination.clone(),
            );
            let dst = self.host_index(&destination).expect("a known destination");
            if self.tracing {
                let text = match &action {
                    SourceAction::Journal(s) => format!("journal {:?}", s.state),
                    other => short(other),
                };
                let line = format!("{} src {attempt_id}: {text}", self.hosts[h].name);
                self.note(line);
            }
            match action {
                SourceAction::Journal(snapshot) => {
                    let id = attempt_id.clone();
                    if self.journal_write(h, |j| {
                        j.sources.insert(id, *snapshot);
                    }) {
                        return true;
                    }
                }
                SourceAction::SendPrepare(c1) => {
                    self.call(h, dst, &attempt_id, Request::Prepare(c1.encode_to_vec()));
                }
                SourceAction::StartTransfer { address } => {
                    if address.is_empty() {
                        self.violation(format!("{attempt_id}: StartTransfer without an address"));
                    }
                    self.start_transfer(h, dst, &vm, migration_id, &attempt_id);
                }
                SourceAction::CancelTransfer => {
                    let epoch = self.epoch(h).expect("running");
                    for t in self.transfers.values_mut() {
                        if t.attempt_id == attempt_id && t.state == TransferState::Active {
                            t.state = TransferState::Stopped;
                        }
                    }
                    // transfer_out returns once the transfer has stopped.
                    self.push(
                        1,
                        Event::TransferEnded {
                            host: h,
                            epoch,
                            migration_id: migration_id.to_string(),
                            result: Err("cancelled".into()),
                        },
                    );
                }
                SourceAction::SendFinish(c3) => {
                    self.finish_sent.insert(attempt_id.clone());
                    self.call(h, dst, &attempt_id, Request::Finish(c3.encode_to_vec()));
                }
                SourceAction::SendAbort { reason } => {
                    let request = Request::Abort {
                        attempt_id: attempt_id.clone(),
                        reason,
                        cookie4: Vec::new(),
                    };
                    self.call(h, dst, &attempt_id, request);
                }
                SourceAction::SendResolve => {
                    let request = Request::Resolve {
                        attempt_id: attempt_id.clone(),
                    };
                    self.call(h, dst, &attempt_id, request);
                }
                SourceAction::SendHeartbeat => {
                    let request = Request::Heartbeat {
                        attempt_id: attempt_id.clone(),
                    };
                    self.call(h, dst, &attempt_id, request);
                }
                SourceAction::ResumeGuest => self.resume_on_source(h, &vm.name, &attempt_id),
                SourceAction::KillGuest => {
                    self.hosts[h].guests.remove(&vm.name);
                }
                SourceAction::RunStage { feature, stage } => {
                    if stage != Stage::Release {
                        self.violation(format!("the source ran {stage} for {attempt_id}"));
                    }
                    self.run_stage(h, Side::Source, migration_id, &vm, feature, stage);
                }
                SourceAction::RecordPending { feature, stage, .. } => {
                    if self.record_pending(h, &attempt_id, migration_id, &vm, feature, stage) {
                        return true;
                    }
                }
                SourceAction::Finished(outcome) => {
                    let agent = self.agent_mut(h);
                    agent.locks.remove(&vm.name);
                    self.note(format!("{attempt_id} ends {}", outcome.as_str()));
                }
            }
        }
        // The task ends with its attempt.
        let done = self
            .source_mut(h, migration_id)
            .is_some_and(|a| a.is_done());
        if let Some(a) = self.source_mut(h, migration_id) {
            let record = a.record.clone();
            self.agent_mut(h)
                .migrations
                .insert(migration_id.to_string(), record);
        }
        if done {
            self.agent_mut(h).sources.remove(migration_id);
            self.maybe_exit(h);
        }
        false
    }

    /// ResumeGuest on the source. After Finish was sent, only the
    /// destination's durable "never commits" (or an operator's forced
    /// decision, which the simulator does not take) allows it.
    fn resume_on_source(&mut self, h: usize, vm: &str, attempt_id: &str) {
        if self.finish_sent.contains(attempt_id) && !self.forced.contains(attempt_id) {
            let dst = self.hosts[h]
                .journal
                .sources
                .get(attempt_id)
                .map(|a| a.destination.clone())
                .unwrap_or_default();
            let decided = self
                .host_index(&dst)
                .and_then(|d| self.hosts[d].journal.destinations.get(attempt_id))
                .map(|a| a.state.clone());
            if !matches!(
                decided,
                Some(DestinationState::RollingBack { .. } | DestinationState::RolledBack)
            ) {
                self.violation(format!(
                    "{} resumed {vm} for {attempt_id} after Finish was sent, but {dst}'s journal says {decided:?}",
                    self.hosts[h].name
                ));
            }
        }
        match self.hosts[h].guests.get_mut(vm) {
            Some(g) => g.state = GuestState::Running,
            None => self.violation(format!(
                "{} resumed {vm}, which it had killed",
                self.hosts[h].name
            )),
        }
    }

    fn start_transfer(
        &mut self,
        from: usize,
        to: usize,
        vm: &VmSpec,
        migration_id: &str,
        attempt_id: &str,
    ) {
        let id = self.seq;
        self.seq += 1;
        let steps = self.rng.random_range(2..=12);
        let stalls = self.chaos() && self.chance(self.scenario.stall);
        let fails_at = (self.chaos() && self.chance(self.scenario.transfer_fails))
            .then(|| self.rng.random_range(1..=steps));
        if stalls {
            self.fault(|| format!("transfer of {attempt_id} stalls"));
        }
        if fails_at.is_some() {
            self.fault(|| format!("transfer of {attempt_id} will fail"));
        }
        let tick = self.rng.random_range(20..400);
        let epoch = self.epoch(from).expect("running");
        self.transfers.insert(
            id,
            Transfer {
                vm: vm.name.clone(),
                from,
                to,
                epoch,
                migration_id: migration_id.to_string(),
                attempt_id: attempt_id.to_string(),
                steps,
                done: 0,
                tick,
                stalls,
                fails_at,
                state: TransferState::Active,
            },
        );
        self.push(tick, Event::TransferTick { transfer: id });
    }

    fn transfer_tick(&mut self, id: u64) {
        let Some(t) = self.transfers.get(&id) else {
            return;
        };
        if t.state != TransferState::Active {
            return;
        }
        let (from, to, tick) = (t.from, t.to, t.tick);
        let (vm, migration_id, epoch) = (t.vm.clone(), t.migration_id.clone(), t.epoch);
        let incoming = self.hosts[to]
            .guests
            .get(&vm)
            .is_some_and(|g| g.state == GuestState::Incoming);
        let end = |w: &mut World, result| {
            w.push(
                1,
                Event::TransferEnded {
                    host: from,
                    epoch,
                    migration_id: migration_id.clone(),
                    result,
                },
            );
        };
        if !incoming || t.fails_at == Some(t.done + 1) {
            self.transfers.get_mut(&id).expect("transfer").state = TransferState::Stopped;
            end(
                self,
                Err("the destination closed the migration stream".into()),
            );
            return;
        }
        if t.stalls || self.partitioned(from, to) {
            self.push(tick, Event::TransferTick { transfer: id });
            return;
        }
        let t = self.transfers.get_mut(&id).expect("transfer");
        t.done += 1;
        let total = 1u64 << 30;
        let stats = crate::protocol::TransferStats {
            bytes_total: total,
            bytes_transferred: total * t.done as u64 / t.steps as u64,
            bytes_remaining: total - total * t.done as u64 / t.steps as u64,
            iteration: t.done,
            ..Default::default()
        };
        if t.done < t.steps {
            self.push(tick, Event::TransferTick { transfer: id });
            if self.epoch(from) == Some(epoch) {
                self.source_input(from, &migration_id, SourceInput::TransferProgress(stats));
            }
            return;
        }
        // Pre-copy converged: the source guest stops, the last pages go.
        t.state = TransferState::Completed;
        if let Some(g) = self.hosts[from].guests.get_mut(&vm)
            && g.state == GuestState::Running
        {
            g.state = GuestState::Paused;
        }
        end(self, Ok(stats));
    }

    /// Execute a destination attempt's actions; `true` if the agent crashed.
    fn exec_destination(
        &mut self,
        h: usize,
        attempt_id: &str,
        actions: Vec<DestinationAction>,
    ) -> bool {
        for action in actions {
            let Some(attempt) = self.destination_mut(h, attempt_id) else {
                return true;
            };
            let (vm, source) = (attempt.vm.clone(), attempt.source.clone());
            let migration_id = attempt.migration_id.clone();
            let epoch = self.epoch(h).expect("running");
            if self.tracing {
                let text = match &action {
                    DestinationAction::Journal(s) => format!("journal {:?}", s.state),
                    other => short(other),
                };
                let line = format!("{} dst {attempt_id}: {text}", self.hosts[h].name);
                self.note(line);
            }
            match action {
                DestinationAction::Journal(snapshot) => {
                    if snapshot.state == DestinationState::Committed
                        && self.said_not_committed.contains(attempt_id)
                    {
                        self.violation(format!(
                            "{} commits {attempt_id} after answering \"not committed\"",
                            self.hosts[h].name
                        ));
                    }
                    let id = attempt_id.to_string();
                    if self.journal_write(h, |j| {
                        j.destinations.insert(id, *snapshot);
                    }) {
                        return true;
                    }
                }
                DestinationAction::StartIncoming => {
                    let fails = self.chaos() && self.chance(self.scenario.incoming_fails);
                    let result = if fails {
                        self.fault(|| format!("incoming guest of {attempt_id} fails to start"));
                        Err("qemu exited: could not set up the incoming guest".to_string())
                    } else if self.hosts[h].guests.contains_key(&vm.name) {
                        Err(format!("a guest named {} already exists", vm.name))
                    } else {
                        self.hosts[h].guests.insert(
                            vm.name.clone(),
                            Guest {
                                spec: vm.clone(),
                                state: GuestState::Incoming,
                            },
                        );
                        Ok(format!("sim://{}/{attempt_id}", self.hosts[h].name))
                    };
                    self.push(
                        1,
                        Event::IncomingStarted {
                            host: h,
                            epoch,
                            attempt_id: attempt_id.to_string(),
                            result,
                        },
                    );
                }
                DestinationAction::CompleteIncoming(_) => {
                    let arrived = self.transfers.values().any(|t| {
                        t.attempt_id == attempt_id
                            && t.to == h
                            && t.state == TransferState::Completed
                    }) && self.hosts[h]
                        .guests
                        .get(&vm.name)
                        .is_some_and(|g| g.state == GuestState::Incoming);
                    let result = if arrived {
                        Ok(())
                    } else {
                        Err(format!("no complete transfer of {} arrived", vm.name))
                    };
                    self.push(
                        1,
                        Event::IncomingCompleted {
                            host: h,
                            epoch,
                            attempt_id: attempt_id.to_string(),
                            result,
                        },
                    );
                }
                DestinationAction::RunStage { feature, stage } => {
                    if stage == Stage::Release {
                        self.violation(format!("the destination ran release for {attempt_id}"));
                    }
                    self.run_stage(h, Side::Destination, attempt_id, &vm, feature, stage);
                }
                DestinationAction::ResumeGuest => match self.hosts[h].guests.get_mut(&vm.name) {
                    Some(g) => g.state = GuestState::Running,
                    None => self.violation(format!(
                        "{} resumed {} for {attempt_id} but has no such guest",
                        self.hosts[h].name, vm.name
                    )),
                },
                DestinationAction::KillGuest => {
                    let guest = self.hosts[h].guests.get(&vm.name).map(|g| g.state);
                    if guest == Some(GuestState::Running) {
                        self.violation(format!(
                            "{} killed the running guest {} while rolling back {attempt_id}",
                            self.hosts[h].name, vm.name
                        ));
                    }
                    if guest == Some(GuestState::Incoming) {
                        self.hosts[h].guests.remove(&vm.name);
                    }
                }
                DestinationAction::RecordPending { feature, stage, .. } => {
                    if self.record_pending(h, attempt_id, &migration_id, &vm, feature, stage) {
                        return true;
                    }
                }
                DestinationAction::ReplyPrepare(c2) => {
                    if let Some(rpc) = self.agent_mut(h).prepare_waiter.remove(attempt_id) {
                        self.send_reply(rpc, Reply::Prepare(Ok(c2)));
                    }
                }
                DestinationAction::ReplyFinish(c4) => {
                    let waiters = self
                        .agent_mut(h)
                        .finish_waiters
                        .remove(attempt_id)
                        .unwrap_or_default();
                    if !c4.committed && !waiters.is_empty() {
                        self.said_not_committed.insert(attempt_id.to_string());
                    }
                    for rpc in waiters {
                        self.send_reply(rpc, Reply::Finish(Ok(c4.clone())));
                    }
                }
                DestinationAction::NotifySource { reason } => {
                    let Some(s) = self.host_index(&source) else {
                        continue;
                    };
                    let cookie4 = self
                        .destination_mut(h, attempt_id)
                        .map(|a| a.cookie4().encode_to_vec())
                        .unwrap_or_default();
                    let request = Request::Abort {
                        attempt_id: attempt_id.to_string(),
                        reason,
                        cookie4,
                    };
                    self.call(h, s, attempt_id, request);
                }
                DestinationAction::Finished { committed } => {
                    self.note(format!(
                        "{attempt_id} {} on {}",
                        if committed {
                            "committed"
                        } else {
                            "rolled back"
                        },
                        self.hosts[h].name
                    ));
                }
            }
        }
        let finished = self
            .destination_mut(h, attempt_id)
            .is_some_and(|a| a.is_finished());
        if finished {
            // The task ends: answer whoever still waits with the final state.
            let attempt = self
                .agent_mut(h)
                .destinations
                .remove(attempt_id)
                .expect("a live attempt");
            let agent = self.agent_mut(h);
            let prepare = agent.prepare_waiter.remove(attempt_id);
            let finish = agent.finish_waiters.remove(attempt_id).unwrap_or_default();
            let aborts = agent.abort_waiters.remove(attempt_id).unwrap_or_default();
            if let Some(rpc) = prepare {
                self.send_reply(rpc, Reply::Prepare(Ok(attempt.cookie2(false))));
            }
            if !finish.is_empty() && !attempt.is_committed() {
                self.said_not_committed.insert(attempt_id.to_string());
            }
            for rpc in finish {
                self.send_reply(rpc, Reply::Finish(Ok(attempt.cookie4())));
            }
            for rpc in aborts {
                let c4 = (!attempt.is_committed()).then(|| attempt.cookie4());
                self.send_reply(rpc, Reply::Abort(c4));
            }
            self.maybe_exit(h);
        }
        false
    }

    // ---- the operator ----------------------------------------------------------

    fn operator(&mut self) {
        let roll = self.rng.random_range(0..100);
        match roll {
            0..50 => {
                let n = self.rng.random_range(1..=3);
                for _ in 0..n {
                    self.operator_migrate();
                }
            }
            50..65 => self.operator_abort(),
            65..90 => self.operator_retry(),
            _ => self.operator_rollback(),
        }
    }

    fn mode(&mut self) -> Mode {
        if self.rng.random_bool(0.5) {
            Mode::Safe
        } else {
            Mode::Fast
        }
    }

    fn operator_migrate(&mut self) {
        let vms = self.scenario.vms.len();
        let vm = self.scenario.vms[self.rng.random_range(0..vms)]
            .0
            .name
            .clone();
        // Usually the host the VM runs on; now and then a wrong one.
        let n = self.hosts.len();
        let on = (0..n).find(|&h| {
            self.hosts[h]
                .guests
                .get(&vm)
                .is_some_and(|g| g.state != GuestState::Incoming)
        });
        let h = match on {
            Some(h) if self.rng.random_bool(0.9) => h,
            _ => self.rng.random_range(0..n),
        };
        let to = (h + self.rng.random_range(1..n)) % n;
        let mode = self.mode();
        let destination = self.hosts[to].name.clone();
        self.note(format!(
            "operator: migrate {vm} {} -> {destination} ({mode:?})",
            self.hosts[h].name
        ));
        if let Err(e) = self.start_migration(h, &vm, &destination, mode, None) {
            self.note(format!("operator: refused: {e}"));
        }
    }

    fn operator_abort(&mut self) {
        let live: Vec<(usize, String)> = self
            .hosts
            .iter()
            .enumerate()
            .filter_map(|(h, _)| self.answering(h).map(|a| (h, a)))
            .flat_map(|(h, a)| a.sources.keys().map(move |m| (h, m.clone())))
            .collect();
        if live.is_empty() {
            return;
        }
        let (h, m) = live[self.rng.random_range(0..live.len())].clone();
        let now = self.now;
        let Some(a) = self.source_mut(h, &m) else {
            return;
        };
        let state = a.state.clone();
        match a.abort(now, "aborted by the operator") {
            Ok(actions) => {
                self.note(format!("operator: abort {m} in {state:?}"));
                self.exec_source(h, &m, actions);
            }
            Err(why) => self.note(format!("operator: abort {m} refused: {why}")),
        }
    }

    fn operator_retry(&mut self) {
        let candidates: Vec<(usize, MigrationRecord)> = self
            .hosts
            .iter()
            .enumerate()
            .filter_map(|(h, _)| self.answering(h).map(|a| (h, a)))
            .flat_map(|(h, a)| a.migrations.values().map(move |r| (h, r.clone())))
            .filter(|(_, r)| matches!(r.outcome, Some(Outcome::Failed | Outcome::Aborted)))
            .collect();
        if candidates.is_empty() {
            return;
        }
        let (h, record) = candidates[self.rng.random_range(0..candidates.len())].clone();
        let destination = if self.rng.random_bool(0.5) {
            record.destination.clone()
        } else {
            let n = self.hosts.len();
            let to = (h + self.rng.random_range(1..n)) % n;
            self.hosts[to].name.clone()
        };
        let mode = self.mode();
        self.note(format!(
            "operator: retry {} on {destination} ({mode:?})",
            record.id
        ));
        if let Err(e) = self.start_migration(h, &record.vm, &destination, mode, Some(&record)) {
            self.note(format!("operator: refused: {e}"));
        }
    }

    /// `tern rollback MIGRATION`: re-run that migration's pending rollbacks
    /// on a host now (rollbacks::run_for_migration).
    fn operator_rollback(&mut self) {
        let pending: Vec<(usize, String)> = (0..self.hosts.len())
            .filter(|&h| self.answering(h).is_some())
            .flat_map(|h| {
                self.hosts[h]
                    .journal
                    .pending
                    .values()
                    .map(move |p| (h, p.migration_id.clone()))
            })
            .collect();
        if pending.is_empty() {
            return;
        }
        let (h, migration_id) = pending[self.rng.random_range(0..pending.len())].clone();
        self.note(format!(
            "operator: rollback {migration_id} on {}",
            self.hosts[h].name
        ));
        self.retry_pending_where(h, |p| p.migration_id == migration_id);
    }

    /// Agent::start_migration (and retry, with `existing`).
    fn start_migration(
        &mut self,
        h: usize,
        vm: &str,
        destination: &str,
        mode: Mode,
        existing: Option<&MigrationRecord>,
    ) -> Result<String, String> {
        let Some(agent) = self.answering(h) else {
            return Err(format!("{} is not answering", self.hosts[h].name));
        };
        if agent.stopping {
            return Err("shutting down".into());
        }
        if destination == self.hosts[h].name {
            return Err("already there".into());
        }
        let Some(guest) = self.hosts[h].guests.get(vm) else {
            return Err(format!("no VM named {vm} here"));
        };
        if guest.state == GuestState::Incoming {
            return Err(format!("{vm} is arriving, not running here"));
        }
        if let Some(holder) = agent.locks.get(vm) {
            return Err(format!("{vm} is already migrating ({holder})"));
        }
        let spec = guest.spec.clone();
        let (migration_id, attempt, started_at_ms) = match existing {
            Some(r) => (r.id.clone(), r.attempt + 1, r.started_at_ms),
            None => {
                self.next_migration += 1;
                (format!("m-{:04}", self.next_migration), 1, self.now)
            }
        };
        let params = AttemptParams {
            migration_id,
            attempt,
            host: self.hosts[h].name.clone(),
            destination: destination.to_string(),
            vm: spec,
            mode,
            timing: self.timing,
            started_at_ms,
        };
        let (attempt, actions) = SourceAttempt::begin(params, self.now);
        let id = attempt.attempt_id.clone();
        self.begun.push((h, vm.to_string(), id.clone()));
        self.start_source(h, attempt, actions);
        Ok(id)
    }

    // ---- the report ------------------------------------------------------------

    pub fn report(&self) -> Report {
        let mut outcomes = BTreeMap::new();
        for host in &self.hosts {
            for a in host.journal.sources.values() {
                // A lost source's journal went with it: its last word is moot.
                let name = match a.record.outcome {
                    _ if host.lost => "lost with its source",
                    Some(outcome) => outcome.as_str(),
                    None => "none",
                };
                *outcomes.entry(name).or_insert(0) += 1;
            }
        }
        let mut trace = self.trace.clone();
        if self.tracing {
            trace.push(self.describe());
        }
        Report {
            seed: self.scenario.seed,
            steps: self.steps,
            faults: self.faults,
            attempts: self.begun.len() as u64,
            outcomes,
            violations: self.violations.clone(),
            trace,
        }
    }

    /// The scenario and the final state of every host, for a trace.
    fn describe(&self) -> String {
        let mut s = String::new();
        let sc = &self.scenario;
        let _ = writeln!(
            s,
            "scenario: {} hosts, {} VMs, loss {} dup {} delay {:?}, crash/write {} (max {}), kills {}, stops {}, partitions {}, transfers survive crash: {}",
            sc.hosts.len(),
            sc.vms.len(),
            sc.net.loss,
            sc.net.duplicate,
            sc.net.delay,
            sc.crash_per_write,
            sc.max_write_crashes,
            sc.kills,
            sc.stops,
            sc.partitions,
            sc.transfers_survive_crash
        );
        for (vm, h) in &sc.vms {
            let features: Vec<String> = vm
                .features
                .iter()
                .map(|f| format!("{}{}", f.name, if f.required { "*" } else { "" }))
                .collect();
            let _ = writeln!(
                s,
                "  {} ({} MiB) boots on {}; features {}",
                vm.name,
                vm.memory_mib,
                self.hosts[*h].name,
                features.join(",")
            );
        }
        for host in &self.hosts {
            let _ = writeln!(
                s,
                "{}: agent {} fail {:?} broken {:?} knows {:?}",
                host.name,
                match (host.lost, host.agent.is_some()) {
                    (true, _) => "lost for good",
                    (false, true) => "up",
                    (false, false) => "down",
                },
                host.spec.fail,
                host.spec.broken,
                host.spec.knows
            );
            for (name, g) in &host.guests {
                let _ = writeln!(s, "  guest {name}: {:?}", g.state);
            }
            for (vm, f) in &host.switch {
                let _ = writeln!(s, "  port {vm}/{f}");
            }
            for p in host.journal.pending.values() {
                let _ = writeln!(
                    s,
                    "  pending {} of {} for {} ({})",
                    p.stage, p.feature, p.vm, p.attempt_id
                );
            }
            for a in host.journal.sources.values() {
                let _ = writeln!(
                    s,
                    "  source {} {} -> {}: {:?} {:?} running_on={} error={:?}",
                    a.attempt_id,
                    a.vm.name,
                    a.destination,
                    a.state,
                    a.record.outcome,
                    a.record.running_on,
                    a.record.error
                );
            }
            for a in host.journal.destinations.values() {
                let _ = writeln!(
                    s,
                    "  destination {} {} from {}: {:?} error={:?}",
                    a.attempt_id, a.vm.name, a.source, a.state, a.error
                );
            }
        }
        s
    }
}

/// Which live timer is due.
#[derive(Debug, Clone)]
enum Timer {
    Source(usize, String),
    Destination(usize, String),
    Pending(usize),
}

fn short(action: &impl std::fmt::Debug) -> String {
    let text = format!("{action:?}");
    if text.len() > 90 {
        let mut end = 90;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &text[..end])
    } else {
        text
    }
}
