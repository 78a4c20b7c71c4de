//! The simulated cluster: for each host, the host core of its agent process
//! (gone while the process is down), its disk (the journal, with the part
//! not yet synced), and what outlives the agent (guests in the hypervisor,
//! ports on the switch); the network between hosts; the operator; and the
//! event queue on one clock.
//!
//! Everything the agent decides, the world gets from [`HostCore`]: it only
//! carries the core's actions out with simulated IO, the way
//! `crate::agent` does with real IO, and injects the faults.

use crate::protocol::completion::{CompletionRequest, Postcopy};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::Report;
use super::scenario::{CHAOS_MS, HostSpec, Scenario, stage_index};
use crate::host::{
    self, Action, Control, Entry, Evacuation, EvacuationRequest, HostCore, Input, JournalImage, Op,
    OpError, OpId, OpOutput, PeerCall, PeerResponse, Pending, Refusal, Request, Response,
};
use crate::hypervisor::{self, HostCapacity};
use crate::proto;
use crate::protocol::destination::DestinationAttempt;
use crate::protocol::source::SourceAttempt;
use crate::protocol::{
    Millis, Mode, Outcome, PeerError, RunOn, Stage, Timing, TransferStats, VmSpec,
};

/// The simulated time after which a run that has not settled is a violation.
const SETTLE_LIMIT_MS: Millis = CHAOS_MS + 2 * 3_600_000;
/// A run longer than this many steps is a violation (a livelock).
const MAX_STEPS: u64 = 400_000;
/// First wait before failed pending work is retried (the agent's rollback_retry_ms).
const ROLLBACK_RETRY_MS: Millis = 1_000;
/// When the operator cancels every evacuation still running, so the
/// cluster can settle.
/// How often a paused post-copy's source reports that it is paused.
const PAUSED_TICK_MS: Millis = 500;
const CANCEL_EVACUATIONS_AT: Millis = CHAOS_MS + 20_000;

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
    /// Which version of the guest's memory this copy holds; 0 for an
    /// incoming guest nothing arrived in yet. A copy that runs becomes a
    /// new version: resuming one that is not the latest is a split brain.
    pub copy: u64,
}

/// The journal on a host's disk: what was synced, and what was written
/// after the last sync (lost with the power, kept by a process crash).
#[derive(Debug, Clone, Default)]
pub(super) struct Disk {
    pub synced: Image,
    pub tail: Vec<Entry>,
}

#[derive(Debug, Clone, Default)]
pub(super) struct Image {
    pub sources: BTreeMap<String, SourceAttempt>,
    pub destinations: BTreeMap<String, DestinationAttempt>,
    pub pending: BTreeMap<(String, String, String), Pending>,
    pub tombstones: BTreeSet<String>,
    pub committed: BTreeSet<String>,
    pub evacuations: BTreeMap<String, Evacuation>,
    pub draining: bool,
}

impl Image {
    fn apply(&mut self, entry: &Entry) {
        match entry {
            Entry::Source(a) => {
                self.sources.insert(a.attempt_id.clone(), (**a).clone());
            }
            Entry::Destination(a) => {
                self.destinations
                    .insert(a.attempt_id.clone(), (**a).clone());
            }
            Entry::Pending(p) => {
                let key = (
                    p.attempt_id.clone(),
                    p.feature.clone(),
                    p.work.as_str().to_string(),
                );
                self.pending.insert(key, p.clone());
            }
            Entry::PendingDone {
                attempt_id,
                feature,
                work,
            } => {
                self.pending
                    .remove(&(attempt_id.clone(), feature.clone(), work.clone()));
            }
            Entry::Tombstone(id) => {
                self.tombstones.insert(id.clone());
            }
            Entry::Evacuation(job) => {
                self.evacuations.insert(job.id.clone(), (**job).clone());
            }
            Entry::Draining(d) => self.draining = *d,
            Entry::Prune(p) => {
                self.sources
                    .retain(|_, a| !p.migrations.contains(&a.migration_id));
                for id in p.rolled_back.iter().chain(&p.committed) {
                    self.destinations.remove(id);
                }
                self.tombstones.extend(p.rolled_back.iter().cloned());
                self.committed.extend(p.committed.iter().cloned());
                for id in &p.evacuations {
                    self.evacuations.remove(id);
                }
            }
        }
    }

    fn to_journal(&self) -> JournalImage {
        JournalImage {
            sources: self.sources.values().cloned().collect(),
            destinations: self.destinations.values().cloned().collect(),
            pending: self.pending.values().cloned().collect(),
            tombstones: self.tombstones.iter().cloned().collect(),
            committed: self.committed.iter().cloned().collect(),
            evacuations: self.evacuations.values().cloned().collect(),
            draining: self.draining,
            unreadable: Vec::new(),
        }
    }
}

impl Disk {
    fn write(&mut self, entry: Entry, durable: bool) {
        self.tail.push(entry);
        if durable {
            self.sync();
        }
    }

    /// A sync writes the WAL out: every write so far is durable.
    fn sync(&mut self) {
        for entry in std::mem::take(&mut self.tail) {
            self.synced.apply(&entry);
        }
    }

    /// What a process reading the journal sees.
    pub fn view(&self) -> Image {
        let mut image = self.synced.clone();
        for entry in &self.tail {
            image.apply(entry);
        }
        image
    }

    /// The power goes: writes after the last sync are lost, but for a
    /// prefix the OS happened to write out.
    fn power_loss(&mut self, kept: usize) {
        let tail = std::mem::take(&mut self.tail);
        for entry in tail.into_iter().take(kept) {
            self.synced.apply(&entry);
        }
    }
}

/// Where a request a core is answering came from.
#[derive(Debug, Clone)]
enum Inbound {
    Rpc(u64),
    Operator(String),
}

pub(super) struct Host {
    pub name: String,
    /// Capacity, known features and how its switch misbehaves.
    pub spec: HostSpec,
    /// The agent process's core; `None` while it is not running.
    pub core: Option<HostCore>,
    pub epoch: u32,
    next_epoch: u32,
    stopping: bool,
    pub disk: Disk,
    pub guests: BTreeMap<String, Guest>,
    /// Ports on this host's switch: (VM, feature). The switch is outside
    /// the host: it outlives the host's power.
    pub switch: BTreeSet<(String, String)>,
    /// SIGSTOPped until then: what it would do waits.
    frozen_until: Millis,
    /// Lost for good: no agent, no guests, never restarted.
    pub lost: bool,
    /// Lost its power at least once.
    pub powered_off: bool,
    /// Requests the core is answering.
    inbound: BTreeMap<host::ReqId, Inbound>,
    /// Calls the core made: its call id → the network's rpc.
    calls: BTreeMap<host::CallId, u64>,
    /// Answers of running ops, scheduled: op → queue key.
    ops: BTreeMap<OpId, (Millis, u64)>,
}

/// An RPC on the network.
#[derive(Debug)]
struct Rpc {
    caller: usize,
    epoch: u32,
    call: host::CallId,
    callee: usize,
    name: &'static str,
    answered: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TransferState {
    Active,
    /// Post-copy broken off (a dead link, `migrate-pause`, its destination
    /// gone): both ends wait for a recovery; the source's copy stays
    /// stale, the destination's waits for its pages.
    Paused,
    Completed,
    Stopped,
}

#[derive(Debug)]
struct Transfer {
    vm: String,
    from: usize,
    to: usize,
    epoch: u32,
    op: OpId,
    steps: u32,
    done: u32,
    tick: Millis,
    stalls: bool,
    fails_at: Option<u32>,
    state: TransferState,
    /// Post-copy was enabled for it (the plan).
    postcopy: bool,
    /// It switched to post-copy: the guest's CPUs may run at the
    /// destination, which pulls the rest from the source. The source's
    /// copy (this version) must never run again.
    switched: Option<u64>,
    /// Paused: the address the destination listens on for the source to
    /// resume it (`migrate-recover`), once asked.
    listening: Option<String>,
    /// Recoveries asked of the destination (each gets a fresh address).
    recoveries: u32,
}

impl Transfer {
    /// Still under way: moving, or paused in post-copy waiting to recover.
    fn runs(&self) -> bool {
        matches!(self.state, TransferState::Active | TransferState::Paused)
    }
}

/// What a finished op changes on the host when its answer comes.
#[derive(Debug, Clone)]
struct StageEffect {
    vm: String,
    feature: String,
    stage: Stage,
}

#[derive(Debug)]
enum Event {
    Deliver {
        rpc: u64,
        to_epoch: u32,
        call: PeerCall,
    },
    Reply {
        rpc: u64,
        reply: Result<PeerResponse, PeerError>,
    },
    Deadline {
        rpc: u64,
    },
    /// An op's answer reaches the core that asked (a stage's effect on the
    /// switch happens then too).
    OpDone {
        host: usize,
        epoch: u32,
        op: OpId,
        result: Result<OpOutput, OpError>,
        effect: Option<StageEffect>,
    },
    Progress {
        host: usize,
        epoch: u32,
        op: OpId,
        stats: TransferStats,
    },
    TransferTick {
        transfer: u64,
    },
    Operator,
    /// Evacuate a host, or change an evacuation.
    Evacuation,
    CancelEvacuations,
    Kill {
        host: usize,
    },
    PowerLoss {
        host: usize,
    },
    Freeze {
        host: usize,
        ms: Millis,
    },
    Lose {
        host: usize,
    },
    /// The operator forces every unresolved attempt that cannot resolve by
    /// itself (its destination lost for good, or it lost the guest).
    ForceStuck,
    Stop {
        host: usize,
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
    rpcs: BTreeMap<u64, Rpc>,
    next_rpc: u64,
    next_req: u64,
    transfers: BTreeMap<u64, Transfer>,
    partitions: BTreeMap<(usize, usize), u32>,
    timing: Timing,
    write_crashes: u32,
    /// Attempts a destination answered "not committed" (Resolve or Finish).
    pub(super) said_not_committed: BTreeSet<String>,
    /// VMs the operator forced back to their source: that resume may be of
    /// a stale copy, knowingly.
    forced_back: BTreeSet<String>,
    /// The newest version of each VM's memory that ran.
    latest_copy: BTreeMap<String, u64>,
    next_copy: u64,
    /// VMs whose only running copy died: with a host lost for good, or a
    /// power loss.
    pub(super) lost_vms: BTreeSet<String>,
    /// Destinations' `AwaitSwitchover` calls not answered yet: host, epoch,
    /// op, VM.
    switch_waiters: Vec<(usize, u32, OpId, String)>,
    /// Every attempt a source journaled, in order: (source host, vm, attempt id).
    pub(super) begun: Vec<(usize, String, String)>,
    begun_ids: BTreeSet<String>,
    /// Every `Capacity` answer a core took in: (asker, host, when, said
    /// it drains), for the placement invariant.
    pub(super) capacity_answers: Vec<(usize, usize, Millis, bool)>,
    /// Which kinds of fault this seed actually injected.
    pub(super) fault_kinds: BTreeSet<&'static str>,
    /// Paused post-copy transfers a source resumed (recovered).
    recoveries: u64,
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
                core: None,
                epoch: 0,
                next_epoch: 0,
                stopping: false,
                disk: Disk::default(),
                guests: BTreeMap::new(),
                switch: BTreeSet::new(),
                frozen_until: 0,
                lost: false,
                powered_off: false,
                inbound: BTreeMap::new(),
                calls: BTreeMap::new(),
                ops: BTreeMap::new(),
            })
            .collect();
        let mut world = World {
            rng: StdRng::seed_from_u64(scenario.seed),
            scenario,
            now: 0,
            seq: 0,
            queue: BTreeMap::new(),
            hosts,
            rpcs: BTreeMap::new(),
            next_rpc: 0,
            next_req: 0,
            transfers: BTreeMap::new(),
            partitions: BTreeMap::new(),
            timing: Timing::default(),
            write_crashes: 0,
            said_not_committed: BTreeSet::new(),
            forced_back: BTreeSet::new(),
            latest_copy: BTreeMap::new(),
            next_copy: 0,
            lost_vms: BTreeSet::new(),
            switch_waiters: Vec::new(),
            begun: Vec::new(),
            begun_ids: BTreeSet::new(),
            capacity_answers: Vec::new(),
            fault_kinds: BTreeSet::new(),
            recoveries: 0,
            steps: 0,
            faults: 0,
            violations: Vec::new(),
            tracing,
            trace: Vec::new(),
        };
        for (vm, host) in world.scenario.vms.clone() {
            let copy = world.fresh_copy(&vm.name);
            let h = &mut world.hosts[host];
            // A feature holds state only where a driver sets it up.
            for f in vm
                .features
                .iter()
                .filter(|f| h.spec.knows.contains(&f.name.as_str()))
            {
                h.switch.insert((vm.name.clone(), f.name.clone()));
            }
            h.guests.insert(
                vm.name.clone(),
                Guest {
                    spec: vm,
                    state: GuestState::Running,
                    copy,
                },
            );
        }
        for host in 0..world.hosts.len() {
            world.start_agent(host);
        }
        world.schedule_chaos();
        world
    }

    fn fresh_copy(&mut self, vm: &str) -> u64 {
        self.next_copy += 1;
        self.latest_copy.insert(vm.to_string(), self.next_copy);
        self.next_copy
    }

    fn schedule_chaos(&mut self) {
        let sc = self.scenario.clone();
        let n = self.hosts.len();
        for _ in 0..sc.operator_actions {
            let at = self.rng.random_range(0..CHAOS_MS);
            self.push_at(at, Event::Operator);
        }
        for _ in 0..sc.evacuations {
            let at = self.rng.random_range(0..CHAOS_MS);
            self.push_at(at, Event::Evacuation);
            // Pauses, resumes, cancels and undrains around it.
            for _ in 0..3 {
                let later = self.rng.random_range(at..CHAOS_MS);
                self.push_at(later, Event::Evacuation);
            }
        }
        if sc.evacuations > 0 {
            self.push_at(CANCEL_EVACUATIONS_AT, Event::CancelEvacuations);
        }
        for _ in 0..sc.kills {
            let at = self.rng.random_range(0..CHAOS_MS);
            let host = self.rng.random_range(0..n);
            self.push_at(at, Event::Kill { host });
        }
        for _ in 0..sc.power_losses {
            let at = self.rng.random_range(0..CHAOS_MS);
            let host = self.rng.random_range(0..n);
            self.push_at(at, Event::PowerLoss { host });
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
        if let Some(host) = sc.lose_host
            && !sc.lose_on_finish
        {
            let at = self.rng.random_range(0..CHAOS_MS);
            self.push_at(at, Event::Lose { host });
        }
        self.push_at(CHAOS_MS + 30_000, Event::ForceStuck);
        self.push_at(CHAOS_MS + 90_000, Event::ForceStuck);
        // Once more: a decision forced in the pass before may have left a
        // notification for a host lost for good, which only this drops.
        self.push_at(CHAOS_MS + 150_000, Event::ForceStuck);
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
    /// At equal times events go first: a message that arrived is handled
    /// before a timer fires (the agent's loop is biased the same way).
    fn step(&mut self) -> bool {
        let event_at = self.queue.keys().next().map(|&(t, _)| t);
        let timer = self.next_timer();
        let fire_timer = match (timer, event_at) {
            (None, None) => return false,
            (Some((t, _)), Some(e)) => t < e,
            (Some(_), None) => true,
            (None, Some(_)) => false,
        };
        self.steps += 1;
        if fire_timer {
            let (t, h) = timer.expect("a timer");
            self.now = self.now.max(t);
            self.fire_timer(h);
        } else {
            let ((t, _), event) = self.queue.pop_first().expect("an event");
            self.now = self.now.max(t);
            match self.target(&event) {
                // A frozen process does nothing until it is thawed.
                Some(h) if self.hosts[h].frozen_until > self.now => {
                    let at = self.hosts[h].frozen_until;
                    let op = match &event {
                        Event::OpDone { op, epoch, .. } if *epoch == self.hosts[h].epoch => {
                            Some(*op)
                        }
                        _ => None,
                    };
                    let key = self.push_at(at, event);
                    // Still the op's answer: a crash or a cancel must find it.
                    if let Some(op) = op
                        && let Some(k) = self.hosts[h].ops.get_mut(&op)
                    {
                        *k = key;
                    }
                }
                _ => self.handle_event(event),
            }
        }
        self.answer_switch_waiters();
        self.check_step();
        true
    }

    /// What a destination waiting for the switchover of `vm` learns now:
    /// it came (or the whole guest did), the transfer ended without it, or
    /// nothing yet.
    fn switchover_state(&self, to: usize, vm: &str) -> Option<Result<bool, String>> {
        let Some(t) = self
            .transfers
            .values()
            .rev()
            .find(|t| t.to == to && t.vm == vm)
        else {
            return Some(Err(format!("no transfer of {vm} came")));
        };
        if t.switched.is_some() {
            return Some(Ok(true));
        }
        if t.state == TransferState::Completed {
            return Some(Ok(false));
        }
        match t.state {
            TransferState::Active => None,
            _ => Some(Err(format!(
                "the transfer of {vm} ended before the switchover"
            ))),
        }
    }

    fn answer_switch_waiters(&mut self) {
        if self.switch_waiters.is_empty() {
            return;
        }
        let waiters = std::mem::take(&mut self.switch_waiters);
        for (h, epoch, op, vm) in waiters {
            if self.hosts[h].epoch != epoch || self.hosts[h].core.is_none() {
                continue; // the process that asked is gone
            }
            match self.switchover_state(h, &vm) {
                Some(result) => {
                    let result = result.map(OpOutput::Arrived).map_err(OpError::Failed);
                    self.op_done(h, op, 1, result, None);
                }
                None => self.switch_waiters.push((h, epoch, op, vm)),
            }
        }
    }

    /// A switched transfer stopped before the last page went: the guest at
    /// the destination cannot get the rest of its memory. It is lost.
    fn postcopy_broken(&mut self, id: u64) {
        let Some(t) = self.transfers.get(&id) else {
            return;
        };
        if t.switched.is_none() || t.state == TransferState::Completed {
            return;
        }
        let (vm, to) = (t.vm.clone(), t.to);
        let name = self.hosts[to].name.clone();
        self.fault("post-copy broken", || {
            format!("the post-copy transfer of {vm} to {name} broke: the guest is lost")
        });
        self.hosts[to].guests.remove(&vm);
        self.lost_vms.insert(vm);
    }

    /// The agent process an event needs to run, if any.
    fn target(&self, event: &Event) -> Option<usize> {
        match event {
            Event::Deliver { rpc, .. } => self.rpcs.get(rpc).map(|c| c.callee),
            Event::Reply { rpc, .. } | Event::Deadline { rpc } => {
                self.rpcs.get(rpc).map(|c| c.caller)
            }
            Event::OpDone { host, .. } | Event::Progress { host, .. } | Event::Stop { host } => {
                Some(*host)
            }
            // The embedded hypervisor runs inside the agent; QEMU does not.
            Event::TransferTick { transfer } if !self.scenario.transfers_survive_crash => {
                self.transfers.get(transfer).map(|t| t.from)
            }
            _ => None,
        }
    }

    fn push_at(&mut self, at: Millis, event: Event) -> (Millis, u64) {
        self.seq += 1;
        self.queue.insert((at, self.seq), event);
        (at, self.seq)
    }

    fn push(&mut self, delay: Millis, event: Event) -> (Millis, u64) {
        self.push_at(self.now + delay, event)
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

    fn fault(&mut self, kind: &'static str, what: impl FnOnce() -> String) {
        self.faults += 1;
        self.fault_kinds.insert(kind);
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

    /// The earliest timer of a running agent (a frozen one's fire when it
    /// is thawed).
    fn next_timer(&self) -> Option<(Millis, usize)> {
        self.hosts
            .iter()
            .enumerate()
            .filter_map(|(h, host)| {
                let t = host.core.as_ref()?.poll_timeout()?;
                Some((t.max(host.frozen_until), h))
            })
            .min()
    }

    fn fire_timer(&mut self, h: usize) {
        let now = self.now;
        let Some(core) = self.hosts[h].core.as_mut() else {
            return;
        };
        let actions = core.handle(now, Input::Timer);
        let idle = actions.is_empty();
        self.execute(h, actions);
        // A timer that fired and did nothing must have moved its deadline
        // on, or it would fire again at once, for ever. Such an agent is
        // taken out of the run once the violation is recorded.
        let after = self.hosts[h].core.as_ref().and_then(|c| c.poll_timeout());
        if idle && after.is_some_and(|t| t <= self.now) {
            self.violation(format!("the timer of {} spins", self.hosts[h].name));
            self.hosts[h].core = None;
        }
    }

    // ---- agents: start, crash, stop ------------------------------------------

    fn core_config(&self, h: usize, epoch: u32) -> host::Config {
        let spec = &self.hosts[h].spec;
        host::Config {
            name: spec.name.clone(),
            hosts: self.hosts.iter().map(|x| x.name.clone()).collect(),
            // The simulated hypervisor's addresses name the host.
            migration_hosts: self
                .hosts
                .iter()
                .map(|x| (x.name.clone(), x.name.clone()))
                .collect(),
            features: spec
                .knows
                .iter()
                .map(|f| (f.to_string(), "sim".to_string()))
                .collect(),
            verifying: spec.knows.iter().map(|f| f.to_string()).collect(),
            capacity: HostCapacity {
                memory_mib: spec.memory_mib,
                vcpus: spec.vcpus,
            },
            timing: self.timing,
            deadlines: host::Deadlines::default(),
            max_outgoing: self.scenario.max_outgoing,
            max_incoming: self.scenario.max_incoming,
            rollback_retry_ms: ROLLBACK_RETRY_MS,
            id_salt: self.scenario.seed ^ ((h as u64) << 48) ^ ((epoch as u64) << 32),
            retention: host::Retention::default(),
            postcopy: Ok(()),
        }
    }

    fn start_agent(&mut self, h: usize) {
        let epoch = self.hosts[h].next_epoch;
        let config = self.core_config(h, epoch);
        let host = &mut self.hosts[h];
        host.frozen_until = 0;
        host.next_epoch += 1;
        host.epoch = epoch;
        host.stopping = false;
        let image = host.disk.view().to_journal();
        let mut core = HostCore::new(config);
        let actions = core.recover(self.now, image);
        host.core = Some(core);
        if epoch > 0 {
            self.note(format!(
                "{} agent starts (epoch {epoch})",
                self.hosts[h].name
            ));
        }
        self.execute(h, actions);
    }

    /// The agent process dies: its memory, its in-process transfers, its
    /// stages and the connections it was serving go with it.
    fn crash(&mut self, h: usize, why: &str) {
        if self.hosts[h].core.is_some() {
            let name = self.hosts[h].name.clone();
            self.fault("agent crash", || format!("{name} agent dies: {why}"));
        }
        self.end_process(h);
    }

    /// The agent process is gone (a crash, or an exit after SIGTERM).
    fn end_process(&mut self, h: usize) {
        if self.hosts[h].core.take().is_none() {
            return;
        }
        let host = &mut self.hosts[h];
        host.inbound.clear();
        host.calls.clear();
        // Stages in flight die with the agent (the simulated switch runs in
        // it; exec hooks get SIGKILL with their parent): each either reached
        // the switch before the crash or never will. Hypervisor calls have
        // already done what they do.
        let ops: Vec<(Millis, u64)> = std::mem::take(&mut host.ops).into_values().collect();
        for key in ops {
            if let Some(Event::OpDone {
                result: Ok(_),
                effect: Some(effect),
                ..
            }) = self.queue.remove(&key)
                && self.rng.random_bool(0.5)
            {
                self.apply_stage(h, &effect);
            }
        }
        if !self.scenario.transfers_survive_crash {
            let stopped: Vec<u64> = self
                .transfers
                .iter()
                .filter(|(_, t)| t.from == h && t.runs())
                .map(|(&id, _)| id)
                .collect();
            for id in stopped {
                self.postcopy_broken(id);
                if let Some(t) = self.transfers.get_mut(&id) {
                    t.state = TransferState::Stopped;
                }
            }
        }
        // Calls to this process break at once.
        let calls: Vec<u64> = self
            .rpcs
            .iter()
            .filter(|(_, c)| c.callee == h && !c.answered)
            .map(|(&id, _)| id)
            .collect();
        for rpc in calls {
            self.connection_reset(rpc);
        }
        if !self.hosts[h].lost {
            let delay = self.rng.random_range(50..5_000);
            self.push(delay, Event::Restart { host: h });
        }
    }

    /// The power goes: the agent and every guest die, the journal loses
    /// what was not synced; the host comes back.
    fn power_loss(&mut self, h: usize) {
        if self.hosts[h].lost || self.hosts[h].core.is_none() {
            return;
        }
        let name = self.hosts[h].name.clone();
        self.fault("power loss", || format!("{name} loses its power"));
        self.end_process(h);
        let kept = {
            let n = self.hosts[h].disk.tail.len();
            self.rng.random_range(0..=n)
        };
        let host = &mut self.hosts[h];
        host.powered_off = true;
        host.disk.power_loss(kept);
        self.guests_die(h);
    }

    /// Every guest of the host dies, and the transfers to and from it stop.
    fn guests_die(&mut self, h: usize) {
        // A running or paused copy was the VM (an incoming one was not yet).
        for (vm, g) in std::mem::take(&mut self.hosts[h].guests) {
            // After a switchover an incoming copy is the VM too; so is one
            // that received the whole newest version when no other host
            // holds that version outside an incoming guest (its source
            // killed its copy after the commit, the resume here failed).
            let switched_here = self
                .transfers
                .values()
                .any(|t| t.to == h && t.vm == vm && t.switched.is_some());
            let only_copy = g.copy != 0
                && self.latest_copy.get(&vm) == Some(&g.copy)
                && !self.hosts.iter().any(|o| {
                    o.guests
                        .get(&vm)
                        .is_some_and(|x| x.copy == g.copy && x.state != GuestState::Incoming)
                });
            if g.state != GuestState::Incoming || switched_here || only_copy {
                self.lost_vms.insert(vm);
            }
        }
        let stopped: Vec<u64> = self
            .transfers
            .iter()
            .filter(|(_, t)| (t.from == h || t.to == h) && t.runs())
            .map(|(&id, _)| id)
            .collect();
        for id in stopped {
            // QEMU: a post-copy whose destination died pauses at the source,
            // and recovery finds the guest gone there (the destination's
            // agent says `lost`). The embedded hypervisor's transfer fails.
            if self.scenario.transfers_survive_crash
                && let Some(t) = self.transfers.get_mut(&id)
                && t.to == h
                && t.switched.is_some()
            {
                t.state = TransferState::Paused;
                t.listening = None;
                continue;
            }
            self.postcopy_broken(id);
            let Some(t) = self.transfers.get_mut(&id) else {
                continue;
            };
            t.state = TransferState::Stopped;
            // A source whose post-copy transfer lost its destination hears
            // of it (the embedded hypervisor's transfer fails; QEMU's
            // pauses, and recovery finds the destination gone).
            let (from, epoch, op, switched) = (t.from, t.epoch, t.op, t.switched.is_some());
            if switched && from != h {
                let error = Err(OpError::Failed(
                    "the destination went away during post-copy".into(),
                ));
                self.transfer_ended(from, epoch, op, error);
            }
        }
    }

    /// The host is gone for good, with its guests; nothing of it answers.
    fn lose(&mut self, h: usize) {
        if self.hosts[h].lost {
            return;
        }
        let name = self.hosts[h].name.clone();
        self.fault("host lost", || {
            format!("{name} is lost for good, with its guests")
        });
        self.hosts[h].lost = true;
        self.end_process(h);
        self.guests_die(h);
    }

    /// SIGTERM: the core aborts, tells the peers and exits when it says so.
    fn stop(&mut self, h: usize) {
        if self.hosts[h].core.is_none() || self.hosts[h].stopping {
            return;
        }
        let name = self.hosts[h].name.clone();
        self.fault("stop", || format!("{name} agent gets SIGTERM"));
        self.hosts[h].stopping = true;
        self.input(h, Input::Stop);
    }

    fn connection_reset(&mut self, rpc: u64) {
        let reply = Err(unreachable("connection reset"));
        self.push(1, Event::Reply { rpc, reply });
    }

    // ---- accessors -----------------------------------------------------------

    /// The core, if the agent runs and is not frozen: what an operator's
    /// command can reach.
    pub(super) fn answering(&self, h: usize) -> Option<&HostCore> {
        let host = &self.hosts[h];
        (host.frozen_until <= self.now)
            .then_some(host.core.as_ref())
            .flatten()
    }

    fn host_index(&self, name: &str) -> Option<usize> {
        self.hosts.iter().position(|h| h.name == name)
    }

    fn partitioned(&self, a: usize, b: usize) -> bool {
        self.partitions.contains_key(&(a.min(b), a.max(b)))
    }

    fn guests_of(&self, h: usize) -> Vec<hypervisor::Guest> {
        self.hosts[h]
            .guests
            .values()
            .map(|g| hypervisor::Guest {
                spec: g.spec.clone(),
                state: match g.state {
                    GuestState::Running => hypervisor::GuestState::Running,
                    GuestState::Paused => hypervisor::GuestState::Paused,
                    GuestState::Incoming => hypervisor::GuestState::Incoming,
                },
            })
            .collect()
    }

    /// Hand an input to a host's core and carry out what it says.
    fn input(&mut self, h: usize, input: Input) {
        let now = self.now;
        let Some(core) = self.hosts[h].core.as_mut() else {
            return;
        };
        let actions = core.handle(now, input);
        self.execute(h, actions);
    }

    // ---- events --------------------------------------------------------------

    fn handle_event(&mut self, event: Event) {
        match event {
            Event::Deliver {
                rpc,
                to_epoch,
                call,
            } => self.deliver(rpc, to_epoch, call),
            Event::Reply { rpc, reply } => self.on_reply(rpc, reply),
            Event::Deadline { rpc } => {
                if let Some(c) = self.rpcs.get(&rpc).filter(|c| !c.answered) {
                    let text = format!(
                        "{} did not answer {} within the deadline",
                        self.hosts[c.callee].name, c.name
                    );
                    self.on_reply(rpc, Err(unreachable(&text)));
                }
            }
            Event::OpDone {
                host,
                epoch,
                op,
                result,
                effect,
            } => {
                if result.is_ok()
                    && let Some(effect) = &effect
                {
                    self.apply_stage(host, effect);
                }
                if self.hosts[host].epoch == epoch && self.hosts[host].core.is_some() {
                    self.hosts[host].ops.remove(&op);
                    self.input(host, Input::OpDone { op, result });
                }
            }
            Event::Progress {
                host,
                epoch,
                op,
                stats,
            } => {
                if self.hosts[host].epoch == epoch {
                    self.input(host, Input::Progress { op, stats });
                }
            }
            Event::TransferTick { transfer } => self.transfer_tick(transfer),
            Event::Operator => self.operator(),
            Event::Evacuation => self.operator_evacuation(),
            Event::CancelEvacuations => self.cancel_evacuations(),
            Event::Kill { host } => self.crash(host, "SIGKILL"),
            Event::PowerLoss { host } => self.power_loss(host),
            Event::Freeze { host, ms } => {
                if self.hosts[host].core.is_some() && self.hosts[host].frozen_until <= self.now {
                    let name = self.hosts[host].name.clone();
                    self.fault("freeze", || {
                        format!("{name} agent frozen (SIGSTOP) for {ms} ms")
                    });
                    self.hosts[host].frozen_until = self.now + ms;
                }
            }
            Event::Stop { host } => self.stop(host),
            Event::Lose { host } => self.lose(host),
            Event::ForceStuck => self.force_stuck(),
            Event::Restart { host } => {
                if self.hosts[host].core.is_none() && !self.hosts[host].lost {
                    self.start_agent(host);
                }
            }
            Event::Partition { a, b, ms } => {
                let (na, nb) = (self.hosts[a].name.clone(), self.hosts[b].name.clone());
                self.fault("partition", || format!("partition {na} | {nb} for {ms} ms"));
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
    fn apply_stage(&mut self, h: usize, effect: &StageEffect) {
        let port = (effect.vm.clone(), effect.feature.clone());
        match effect.stage {
            Stage::Prepare | Stage::Finish => {
                self.hosts[h].switch.insert(port);
            }
            Stage::Rollback | Stage::Release => {
                self.hosts[h].switch.remove(&port);
            }
            Stage::Verify => {}
        }
    }

    // ---- carrying out a core's actions (the agent's shell) -------------------

    fn execute(&mut self, h: usize, actions: Vec<Action>) {
        let Some(epoch) = self.hosts[h].core.as_ref().map(|_| self.hosts[h].epoch) else {
            return;
        };
        for action in actions {
            if self.hosts[h].epoch != epoch || self.hosts[h].core.is_none() {
                return; // it crashed on the way
            }
            if self.tracing && !matches!(action, Action::Emit(_)) {
                let text = describe_action(&action);
                let line = format!("{} {text}", self.hosts[h].name);
                self.note(line);
            }
            match action {
                Action::Journal { entry, durable } => {
                    if self.journal_write(h, entry, durable) {
                        return;
                    }
                }
                Action::Call {
                    call,
                    peer,
                    request,
                    deadline_ms,
                } => self.send(h, call, &peer, request, deadline_ms),
                Action::Reply { req, reply } => self.answer(h, req, reply),
                Action::Run { op, what } => self.run_op(h, op, what),
                Action::Cancel { op } => {
                    if let Some(key) = self.hosts[h].ops.remove(&op)
                        && let Some(Event::OpDone {
                            result: Ok(_),
                            effect: Some(effect),
                            ..
                        }) = self.queue.remove(&key)
                        && self.rng.random_bool(0.5)
                    {
                        // A stage given up on reached the switch, or not.
                        self.apply_stage(h, &effect);
                    }
                }
                Action::Emit(event) => {
                    if self.tracing
                        && let host::Event::Log { level, text, .. } = &event
                    {
                        let line = format!("{} log {}: {text}", self.hosts[h].name, level.as_str());
                        self.note(line);
                    }
                }
                Action::Exit => {
                    let name = self.hosts[h].name.clone();
                    self.note(format!("{name} agent exits"));
                    self.end_process(h);
                    return;
                }
            }
        }
    }

    /// A journal write, which may be where the agent crashes: before the
    /// write (it is lost; this is also what a write that fails does, since
    /// the agent then exits) or just after. `true` if it crashed.
    fn journal_write(&mut self, h: usize, entry: Entry, durable: bool) -> bool {
        let crash = self.chaos()
            && self.write_crashes < self.scenario.max_write_crashes
            && self.chance(self.scenario.crash_per_write);
        if !crash {
            self.watch_journal(h, &entry);
            self.hosts[h].disk.write(entry, durable);
            return false;
        }
        self.write_crashes += 1;
        let written = self.rng.random_bool(0.5);
        if written {
            self.watch_journal(h, &entry);
            self.hosts[h].disk.write(entry, durable);
        }
        let why = if written {
            "crash just after a journal write"
        } else {
            "crash during a journal write (not written)"
        };
        self.crash(h, why);
        true
    }

    /// What the invariants learn from a journal write.
    fn watch_journal(&mut self, h: usize, entry: &Entry) {
        match entry {
            Entry::Source(a) if self.begun_ids.insert(a.attempt_id.clone()) => {
                self.begun
                    .push((h, a.vm.name.clone(), a.attempt_id.clone()));
            }
            Entry::Destination(a)
                if a.is_committed() && self.said_not_committed.contains(&a.attempt_id) =>
            {
                self.violation(format!(
                    "{} commits {} after answering \"not committed\"",
                    self.hosts[h].name, a.attempt_id
                ));
            }
            _ => {}
        }
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
            self.fault("message lost", || {
                format!("message {a} -> {b} lost (connection reset)")
            });
            return true;
        }
        false
    }

    fn send(
        &mut self,
        caller: usize,
        call: host::CallId,
        peer: &str,
        request: PeerCall,
        deadline_ms: Option<Millis>,
    ) {
        let rpc = self.next_rpc;
        self.next_rpc += 1;
        let callee = self.host_index(peer).expect("a host of the inventory");
        let name = request.name();
        self.rpcs.insert(
            rpc,
            Rpc {
                caller,
                epoch: self.hosts[caller].epoch,
                call,
                callee,
                name,
                answered: false,
            },
        );
        self.hosts[caller].calls.insert(call, rpc);
        if let Some(ms) = deadline_ms {
            self.push(ms, Event::Deadline { rpc });
        }
        if self.hosts[callee].core.is_none() {
            let reply = Err(unreachable("connection refused"));
            self.push(1, Event::Reply { rpc, reply });
            return;
        }
        if self.lost(caller, callee) {
            let after = self.rng.random_range(1..3_000);
            let reply = Err(unreachable("connection reset"));
            self.push(after, Event::Reply { rpc, reply });
            return;
        }
        let to_epoch = self.hosts[callee].epoch;
        let d = self.delay();
        let duplicate = self.chaos() && self.chance(self.scenario.net.duplicate);
        if duplicate {
            self.fault("message duplicated", || {
                format!("request {rpc} ({name}) duplicated")
            });
            let d2 = self.delay();
            self.push(
                d2,
                Event::Deliver {
                    rpc,
                    to_epoch,
                    call: request.clone(),
                },
            );
        }
        self.push(
            d,
            Event::Deliver {
                rpc,
                to_epoch,
                call: request,
            },
        );
    }

    /// A request reaches a host's core.
    fn deliver(&mut self, rpc: u64, to_epoch: u32, call: PeerCall) {
        let Some(c) = self.rpcs.get(&rpc) else {
            return;
        };
        let (to, caller) = (c.callee, c.caller);
        if self.hosts[to].epoch != to_epoch || self.hosts[to].core.is_none() {
            return; // the process the connection went to is gone
        }
        if self.scenario.lose_on_finish
            && self.scenario.lose_host == Some(to)
            && matches!(call, PeerCall::Finish(_))
            && self.chaos()
        {
            // Lost while carrying Finish out: it may commit first, or not.
            let after = self.rng.random_range(0..100);
            self.push(after, Event::Lose { host: to });
        }
        let guests = match call {
            // As the agent does: the calls whose answer depends on them.
            PeerCall::Prepare(_)
            | PeerCall::Capacity(_)
            | PeerCall::Recover(_)
            | PeerCall::Repair(_) => self.guests_of(to),
            _ => Vec::new(),
        };
        self.next_req += 1;
        let req = self.next_req;
        self.hosts[to].inbound.insert(req, Inbound::Rpc(rpc));
        self.input(
            to,
            Input::Request {
                req,
                request: Request::Peer {
                    call,
                    guests,
                    from: Some(self.hosts[caller].name.clone()),
                },
            },
        );
    }

    /// A core answers a request: over the network, or to the operator.
    fn answer(&mut self, h: usize, req: host::ReqId, reply: host::Reply) {
        let Some(inbound) = self.hosts[h].inbound.remove(&req) else {
            return;
        };
        match inbound {
            Inbound::Operator(what) => {
                let text = match &reply {
                    Ok(_) => format!("operator: {what}: done"),
                    Err(e) => format!("operator: {what}: refused: {e}"),
                };
                self.note(text);
            }
            Inbound::Rpc(rpc) => {
                let reply = match reply {
                    Ok(Response::Peer(r)) => {
                        self.watch_answer(&r);
                        Ok(r)
                    }
                    Ok(other) => Err(PeerError::Refused(format!("not a peer answer: {other:?}"))),
                    Err(Refusal::Busy(m)) => Err(PeerError::Busy(m)),
                    Err(Refusal::Unavailable(m)) => Err(unreachable(&m)),
                    Err(other) => Err(PeerError::Refused(other.to_string())),
                };
                let Some(c) = self.rpcs.get(&rpc) else {
                    return;
                };
                let (caller, callee) = (c.caller, c.callee);
                if self.lost(callee, caller) {
                    let after = self.rng.random_range(1..3_000);
                    let reply = Err(unreachable("connection reset"));
                    self.push(after, Event::Reply { rpc, reply });
                    return;
                }
                let d = self.delay();
                self.push(d, Event::Reply { rpc, reply });
            }
        }
    }

    /// What the invariants learn from a destination's answer.
    fn watch_answer(&mut self, r: &PeerResponse) {
        let c4 = match r {
            PeerResponse::Finish(f) => {
                crate::protocol::cookies::decode::<proto::Cookie4>("C4", &f.cookie4).ok()
            }
            PeerResponse::Resolve(r) if r.resolution == proto::Resolution::NotCommitted as i32 => {
                crate::protocol::cookies::decode::<proto::Cookie4>("C4", &r.cookie4).ok()
            }
            _ => None,
        };
        // "Ready for the switchover" is no decision.
        if let Some(c4) = c4
            && !c4.committed
            && !c4.ready_for_switchover
        {
            self.said_not_committed.insert(c4.attempt_id);
        }
    }

    fn on_reply(&mut self, rpc: u64, reply: Result<PeerResponse, PeerError>) {
        let Some(c) = self.rpcs.get_mut(&rpc) else {
            return;
        };
        if c.answered {
            return;
        }
        c.answered = true;
        let (caller, epoch, call) = (c.caller, c.epoch, c.call);
        if self.hosts[caller].epoch != epoch || self.hosts[caller].core.is_none() {
            return;
        }
        self.hosts[caller].calls.remove(&call);
        if let Ok(PeerResponse::Capacity(c)) = &reply
            && let Some(callee) = self.host_index(&c.host)
        {
            self.capacity_answers
                .push((caller, callee, self.now, c.draining));
        }
        self.input(caller, Input::PeerReplied { call, reply });
    }

    // ---- the simulated hypervisor and drivers --------------------------------

    fn op_done(
        &mut self,
        h: usize,
        op: OpId,
        delay: Millis,
        result: Result<OpOutput, OpError>,
        effect: Option<StageEffect>,
    ) {
        let epoch = self.hosts[h].epoch;
        let key = self.push(
            delay,
            Event::OpDone {
                host: h,
                epoch,
                op,
                result,
                effect,
            },
        );
        self.hosts[h].ops.insert(op, key);
    }

    /// The call never answers: the core's deadline has to end the wait.
    fn hang(&mut self, h: usize, what: &str) {
        let name = self.hosts[h].name.clone();
        self.fault("hypervisor or stage hangs", || {
            format!("{what} on {name} never answers")
        });
    }

    fn run_op(&mut self, h: usize, op: OpId, what: Op) {
        let g = self.scenario.guest;
        let chaos = self.chaos();
        let quick = self.rng.random_range(1..20);
        match what {
            Op::StartIncoming {
                spec, attempt_id, ..
            } => {
                let result = if chaos && self.chance(self.scenario.incoming_fails) {
                    let id = attempt_id.clone();
                    self.fault("incoming start fails", || {
                        format!("incoming guest of {id} fails to start")
                    });
                    Err("qemu exited: could not set up the incoming guest".to_string())
                } else if self.hosts[h].guests.contains_key(&spec.name) {
                    Err(format!("a guest named {} already exists", spec.name))
                } else {
                    self.hosts[h].guests.insert(
                        spec.name.clone(),
                        Guest {
                            spec: spec.clone(),
                            state: GuestState::Incoming,
                            copy: 0,
                        },
                    );
                    let mut named = h;
                    if chaos && self.chance(self.scenario.wrong_address) {
                        named = (h + self.rng.random_range(1..self.hosts.len())) % self.hosts.len();
                        let (id, other) = (attempt_id.clone(), self.hosts[named].name.clone());
                        self.fault("wrong incoming address", || {
                            format!("the incoming guest of {id} names {other}'s address")
                        });
                    }
                    Ok(OpOutput::Address(format!(
                        "sim://{}/{attempt_id}",
                        self.hosts[named].name
                    )))
                };
                if chaos && self.chance(g.incoming_hangs) {
                    return self.hang(h, &format!("starting the incoming guest of {attempt_id}"));
                }
                let mut delay = quick;
                if chaos && self.chance(g.incoming_slow) {
                    delay = self.rng.random_range(6_000..20_000);
                    let id = attempt_id.clone();
                    self.fault("slow incoming start", || {
                        format!("the incoming guest of {id} takes {delay} ms to start")
                    });
                }
                let result = match result {
                    Ok(_) if chaos && self.chance(g.incoming_fails_late) => {
                        // QEMU exits after it started: the guest is gone.
                        self.hosts[h].guests.remove(&spec.name);
                        Err("qemu exited before the incoming migration was set up".into())
                    }
                    other => other,
                };
                self.op_done(h, op, delay, result.map_err(OpError::Failed), None);
            }
            Op::CompleteIncoming { vm, .. } => {
                let arrived = self
                    .transfers
                    .values()
                    .any(|t| t.vm == vm && t.to == h && t.state == TransferState::Completed)
                    && self.hosts[h]
                        .guests
                        .get(&vm)
                        .is_some_and(|g| g.state == GuestState::Incoming && g.copy != 0);
                let result = if arrived {
                    Ok(OpOutput::Done)
                } else {
                    Err(format!("no complete transfer of {vm} arrived"))
                };
                self.op_done(h, op, 1, result.map_err(OpError::Failed), None);
            }
            Op::TransferOut {
                vm,
                destination,
                address,
                plan,
            } => self.start_transfer(h, op, &vm, &destination, &address, plan.postcopy),
            Op::WatchTransfer { vm, .. } => {
                let epoch = self.hosts[h].epoch;
                let latest = self
                    .transfers
                    .values_mut()
                    .rev()
                    .find(|t| t.from == h && t.vm == vm);
                match latest {
                    Some(t) if t.runs() => {
                        // Its end and progress go to this process now.
                        t.op = op;
                        t.epoch = epoch;
                    }
                    Some(t) if t.state == TransferState::Completed => {
                        let done = TransferStats {
                            stage: crate::protocol::TransferStage::Postcopy,
                            ..TransferStats::default()
                        };
                        self.op_done(h, op, 1, Ok(OpOutput::Transferred(done)), None);
                    }
                    _ => {
                        let error = OpError::Failed(format!("no transfer of {vm} runs"));
                        self.op_done(h, op, 1, Err(error), None);
                    }
                }
            }
            Op::RecoverIncoming { vm, attempt_id } => {
                let fails = chaos && self.chance(g.resume_fails);
                let result = match fails {
                    true => self.qemu_fails("recover-incoming fails", "migrate-recover", &vm),
                    false => self.recover_incoming(h, &vm, &attempt_id),
                };
                self.op_done(h, op, quick, result, None);
            }
            Op::ResumePostcopy { vm, address } => {
                let fails = chaos && self.chance(g.resume_fails);
                let result = match fails {
                    true => self.qemu_fails("post-copy resume fails", "migrate resume", &vm),
                    false => self.resume_postcopy(h, &vm, &address),
                };
                self.op_done(h, op, quick, result, None);
            }
            Op::PausePostcopy { vm } => {
                let result = match self.switched_transfer(|t| t.from == h && t.vm == vm) {
                    Some(id) if self.transfers[&id].state == TransferState::Active => {
                        self.pause_postcopy(id, "migrate-pause");
                        Ok(OpOutput::Done)
                    }
                    _ => Err(OpError::Failed(format!(
                        "the transfer of {vm} is not in post-copy"
                    ))),
                };
                self.op_done(h, op, quick, result, None);
            }
            Op::AwaitSwitchover { vm } => {
                if !self.hosts[h].guests.contains_key(&vm) {
                    let error = OpError::NoSuchGuest(format!("no guest {vm} here"));
                    return self.op_done(h, op, 1, Err(error), None);
                }
                let epoch = self.hosts[h].epoch;
                self.switch_waiters.push((h, epoch, op, vm));
            }
            Op::StartPostcopy { vm } => {
                if chaos && self.chance(self.scenario.switch_fails) {
                    self.fault("switch fails", || {
                        format!("switching {vm} to post-copy fails")
                    });
                    let error = OpError::Failed("QEMU: migrate-start-postcopy failed".into());
                    return self.op_done(h, op, quick, Err(error), None);
                }
                if chaos && self.chance(self.scenario.switch_hangs) {
                    if self.rng.random_bool(0.5) {
                        let _ = self.switch_to_postcopy(h, &vm);
                    }
                    return self.hang(h, &format!("switching {vm} to post-copy"));
                }
                let result = self.switch_to_postcopy(h, &vm);
                self.op_done(h, op, quick, result, None);
            }
            Op::CancelTransfer { vm } => {
                for t in self.transfers.values_mut() {
                    if t.vm == vm && t.from == h && t.state == TransferState::Active {
                        t.state = TransferState::Stopped;
                        let (host, epoch, op) = (t.from, t.epoch, t.op);
                        let key = self.queue_push_transfer_end(host, epoch, op);
                        self.hosts[h].ops.insert(op, key);
                        break;
                    }
                }
                if chaos && self.chance(g.cancel_hangs) {
                    return self.hang(h, &format!("cancelling the transfer of {vm}"));
                }
                self.op_done(h, op, 1, Ok(OpOutput::Done), None);
            }
            Op::Resume { vm } => {
                if chaos && self.chance(g.resume_fails) {
                    self.fault("resume fails", || format!("resume of {vm} fails"));
                    return self.op_done(h, op, quick, Err("QEMU: cont failed".into()), None);
                }
                if chaos && self.chance(g.resume_hangs) {
                    if self.rng.random_bool(0.5) {
                        let _ = self.resume_guest(h, &vm);
                    }
                    return self.hang(h, &format!("resuming {vm}"));
                }
                let result = self.resume_guest(h, &vm);
                self.op_done(h, op, quick, result, None);
            }
            Op::Kill { vm } => {
                if chaos && self.chance(g.kill_fails) {
                    self.fault("kill fails", || format!("kill of {vm} fails"));
                    return self.op_done(h, op, quick, Err("QEMU did not quit".into()), None);
                }
                if chaos && self.chance(g.kill_hangs) {
                    if self.rng.random_bool(0.5) {
                        self.kill_guest(h, &vm);
                    }
                    return self.hang(h, &format!("killing {vm}"));
                }
                self.kill_guest(h, &vm);
                self.op_done(h, op, quick, Ok(OpOutput::Done), None);
            }
            Op::Status { vm } => {
                let state = self.hosts[h].guests.get(&vm).map(|g| match g.state {
                    GuestState::Running => hypervisor::GuestState::Running,
                    GuestState::Paused => hypervisor::GuestState::Paused,
                    GuestState::Incoming => hypervisor::GuestState::Incoming,
                });
                self.op_done(h, op, 1, Ok(OpOutput::Status(state)), None);
            }
            Op::Stage(ctx) => {
                let result = self.stage_result(h, &ctx.feature.name, ctx.stage);
                let effect = StageEffect {
                    vm: ctx.vm.clone(),
                    feature: ctx.feature.name.clone(),
                    stage: ctx.stage,
                };
                if chaos && self.chance(g.stage_hangs) {
                    if result.is_ok() && self.rng.random_bool(0.5) {
                        self.apply_stage(h, &effect);
                    }
                    return self.hang(
                        h,
                        &format!("{} {} of {}", ctx.feature.name, ctx.stage, ctx.vm),
                    );
                }
                let delay = self.stage_latency();
                self.op_done(
                    h,
                    op,
                    delay,
                    result.map(OpOutput::Stage).map_err(OpError::Failed),
                    Some(effect),
                );
            }
            Op::ListGuests => {
                let guests = self.guests_of(h);
                self.op_done(h, op, 1, Ok(OpOutput::Guests(guests)), None);
            }
        }
    }

    /// The guest's CPUs start. Resuming a copy older than one that ran
    /// since, or an incoming guest nothing arrived in, is a split brain.
    fn resume_guest(&mut self, h: usize, vm: &str) -> Result<OpOutput, OpError> {
        let Some(guest) = self.hosts[h].guests.get(vm).cloned() else {
            return Err(OpError::NoSuchGuest(format!(
                "no guest named {vm} on {}",
                self.hosts[h].name
            )));
        };
        if guest.state == GuestState::Running {
            return Ok(OpOutput::Done);
        }
        let forced = self.forced_back.remove(vm);
        let switched_away = self
            .transfers
            .values()
            .any(|t| t.from == h && t.vm == vm && t.switched == Some(guest.copy));
        if switched_away && !forced {
            self.violation(format!(
                "{} resumed its copy of {vm} after the switchover to post-copy",
                self.hosts[h].name
            ));
        }
        if guest.copy == 0 {
            self.violation(format!(
                "{} resumed the incoming guest {vm}, which never received the transfer",
                self.hosts[h].name
            ));
        } else if self.latest_copy.get(vm) != Some(&guest.copy) && !forced {
            self.violation(format!(
                "{} resumed a stale copy of {vm}: another copy ran after it was made",
                self.hosts[h].name
            ));
        }
        let copy = self.fresh_copy(vm);
        if let Some(g) = self.hosts[h].guests.get_mut(vm) {
            g.state = GuestState::Running;
            g.copy = copy;
        }
        Ok(OpOutput::Done)
    }

    fn stage_result(&mut self, h: usize, feature: &str, stage: Stage) -> Result<String, String> {
        let host = &self.hosts[h];
        let name = host.name.clone();
        if stage == Stage::Finish && host.spec.broken == Some(feature) {
            self.fault("switch rejects", || {
                format!("{name} switch rejects {feature} finish")
            });
            return Err(format!("switch on {name} rejected ASSOCIATE of {feature}"));
        }
        let mut p = host.spec.fail[stage_index(stage)];
        // After the chaos window rollbacks and releases work, so pending
        // ones can clear and the cluster settles.
        if !self.chaos() && matches!(stage, Stage::Rollback | Stage::Release) {
            p = 0.0;
        }
        if self.chance(p) {
            self.fault("stage fails", || {
                format!("{feature} {stage} fails on {name}")
            });
            return Err(format!("{feature} {stage} failed on {name}"));
        }
        Ok(format!("{stage} done"))
    }

    fn stage_latency(&mut self) -> Millis {
        if self.chance(self.scenario.slow_stage) {
            self.fault("slow stage", || "slow stage".into());
            self.rng.random_range(1_000..8_000)
        } else {
            self.rng.random_range(1..50)
        }
    }

    fn queue_push_transfer_end(&mut self, host: usize, epoch: u32, op: OpId) -> (Millis, u64) {
        self.push(
            1,
            Event::OpDone {
                host,
                epoch,
                op,
                result: Err("the transfer was cancelled".into()),
                effect: None,
            },
        )
    }

    /// `migrate-start-postcopy`: the guest stops here, its device state
    /// goes, and the destination holds this version of it (the pages it
    /// lacks it pulls from here).
    fn switch_to_postcopy(&mut self, h: usize, vm: &str) -> Result<OpOutput, OpError> {
        let latest = self
            .transfers
            .iter()
            .rev()
            .find(|(_, t)| t.from == h && t.vm == vm)
            .map(|(&id, _)| id);
        let Some(id) = latest else {
            return Err(OpError::Failed(format!("no transfer of {vm} to switch")));
        };
        let t = &self.transfers[&id];
        match t.state {
            // The whole guest went by pre-copy: nothing left to switch.
            TransferState::Completed => return Ok(OpOutput::Done),
            TransferState::Active if !t.postcopy => {
                return Err(OpError::Failed(format!(
                    "the transfer of {vm} was started without post-copy"
                )));
            }
            TransferState::Active if t.switched.is_some() => return Ok(OpOutput::Done),
            TransferState::Active => {}
            _ => return Err(OpError::Failed(format!("the transfer of {vm} is over"))),
        }
        let to = t.to;
        let copy = match self.hosts[h].guests.get_mut(vm) {
            Some(g) => {
                if g.state == GuestState::Running {
                    g.state = GuestState::Paused;
                }
                g.copy
            }
            None => return Err(OpError::NoSuchGuest(format!("no guest {vm} here"))),
        };
        if let Some(g) = self.hosts[to].guests.get_mut(vm) {
            g.copy = copy;
        }
        self.transfers.get_mut(&id).expect("transfer").switched = Some(copy);
        Ok(OpOutput::Done)
    }

    /// A QEMU command of a recovery fails (a fault of kind `kind`).
    fn qemu_fails(
        &mut self,
        kind: &'static str,
        command: &str,
        vm: &str,
    ) -> Result<OpOutput, OpError> {
        self.fault(kind, || format!("{command} of {vm} fails"));
        Err(OpError::Failed(format!("QEMU: {command} failed")))
    }

    /// The latest transfer matching `which` that switched to post-copy and
    /// still runs (moving or paused).
    fn switched_transfer(&self, which: impl Fn(&Transfer) -> bool) -> Option<u64> {
        self.transfers
            .iter()
            .rev()
            .find(|(_, t)| which(t))
            .filter(|(_, t)| t.switched.is_some() && t.runs())
            .map(|(&id, _)| id)
    }

    /// A guest is killed. A source's copy that a post-copy destination
    /// still pulls pages from is the rest of the guest: killing it while
    /// the destination still holds the guest loses a VM that was whole.
    fn kill_guest(&mut self, h: usize, vm: &str) {
        if let Some(id) = self.switched_transfer(|t| t.from == h && t.vm == vm) {
            let to = self.transfers[&id].to;
            if self.hosts[to].guests.contains_key(vm) && !self.lost_vms.contains(vm) {
                let (source, destination) =
                    (self.hosts[h].name.clone(), self.hosts[to].name.clone());
                self.violation(format!(
                    "{source} kills its copy of {vm} while {destination} still pulls its pages by post-copy"
                ));
            }
        }
        self.hosts[h].guests.remove(vm);
    }

    /// A post-copy breaks off: both ends pause and keep what they have. Its
    /// ticks go on (one chain per transfer), reporting the pause.
    fn pause_postcopy(&mut self, id: u64, why: &str) {
        let Some(t) = self.transfers.get_mut(&id) else {
            return;
        };
        if t.state != TransferState::Active || t.switched.is_none() {
            return;
        }
        t.state = TransferState::Paused;
        t.listening = None;
        let vm = t.vm.clone();
        self.fault("post-copy paused", || {
            format!("the post-copy of {vm} pauses ({why})")
        });
    }

    /// `migrate-recover` on the destination: it listens again on a fresh
    /// address (pausing its end first if it had not noticed the break).
    fn recover_incoming(
        &mut self,
        h: usize,
        vm: &str,
        attempt_id: &str,
    ) -> Result<OpOutput, OpError> {
        if !self.hosts[h].guests.contains_key(vm) {
            return Err(OpError::NoSuchGuest(format!(
                "no guest {vm} on {}",
                self.hosts[h].name
            )));
        }
        let Some(id) = self.switched_transfer(|t| t.to == h && t.vm == vm) else {
            return Err(OpError::Failed(format!(
                "{vm} receives nothing by post-copy on {}",
                self.hosts[h].name
            )));
        };
        self.pause_postcopy(id, "the destination's migrate-recover");
        // A hypervisor may name an address that is not this host's (a
        // wrong `migration_address`): the source must check it.
        let mut named = h;
        // (Recoveries are rare: a third of them, in a scenario that names
        // wrong addresses at all.)
        if self.chaos() && self.scenario.wrong_address > 0.0 && self.chance(0.3) {
            named = (h + self.rng.random_range(1..self.hosts.len())) % self.hosts.len();
            let other = self.hosts[named].name.clone();
            self.fault("wrong recovery address", || {
                format!("the recovery of {vm} names {other}'s address")
            });
        }
        let name = self.hosts[named].name.clone();
        let t = self.transfers.get_mut(&id).expect("transfer");
        t.recoveries += 1;
        let address = format!("sim://{name}/{attempt_id}/recover-{}", t.recoveries);
        t.listening = Some(address.clone());
        Ok(OpOutput::Address(address))
    }

    /// `migrate resume=true` on the source: the paused post-copy goes on
    /// to the address its destination listens on. Recovery must never
    /// feed a copy other than the one switched over to, nor run two.
    fn resume_postcopy(&mut self, h: usize, vm: &str, address: &str) -> Result<OpOutput, OpError> {
        let Some(id) = self.switched_transfer(|t| t.from == h && t.vm == vm) else {
            return Err(OpError::Failed(format!("no post-copy of {vm} to resume")));
        };
        let (state, to, listening) = {
            let t = &self.transfers[&id];
            (t.state, t.to, t.listening.clone())
        };
        if state != TransferState::Paused {
            return Err(OpError::Failed(format!(
                "the post-copy of {vm} is not paused"
            )));
        }
        let named = address
            .strip_prefix("sim://")
            .and_then(|rest| rest.split('/').next())
            .and_then(|name| self.host_index(name));
        if named.is_some_and(|n| n != to) {
            let (source, other) = (self.hosts[h].name.clone(), self.hosts[to].name.clone());
            self.violation(format!(
                "{source} resumes the post-copy of {vm} at {address}, not at its destination {other}"
            ));
        }
        if self.hosts[h]
            .guests
            .get(vm)
            .is_some_and(|g| g.state == GuestState::Running)
        {
            let source = self.hosts[h].name.clone();
            self.violation(format!(
                "{source} resumes the post-copy of {vm} while its own copy runs: two copies"
            ));
        }
        if listening.as_deref() != Some(address) {
            return Err(OpError::Failed(format!("nobody listens at {address}")));
        }
        if self.partitioned(h, to) {
            return Err(OpError::Failed(format!(
                "connecting to {address}: connection timed out"
            )));
        }
        let t = self.transfers.get_mut(&id).expect("transfer");
        t.state = TransferState::Active;
        t.listening = None;
        self.recoveries += 1;
        let vm = vm.to_string();
        self.note(format!("the post-copy of {vm} runs again (recovered)"));
        Ok(OpOutput::Done)
    }

    fn start_transfer(
        &mut self,
        from: usize,
        op: OpId,
        vm: &str,
        destination: &str,
        address: &str,
        postcopy: bool,
    ) {
        let to = address
            .strip_prefix("sim://")
            .and_then(|rest| rest.split('/').next())
            .and_then(|name| self.host_index(name));
        if let Some(to) = to.filter(|&to| self.hosts[to].name != destination) {
            let (source, other) = (self.hosts[from].name.clone(), self.hosts[to].name.clone());
            self.violation(format!(
                "{source} sends the memory of {vm} to {other} ({address}), not to its destination {destination}"
            ));
            let error = Err(OpError::Failed(format!("{address} is not {destination}")));
            return self.op_done(from, op, 1, error, None);
        }
        let running = self.hosts[from]
            .guests
            .get(vm)
            .is_some_and(|g| g.state == GuestState::Running);
        // QEMU: a guest still pulling its pages by post-copy cannot be
        // migrated on ("a migration is in progress").
        let pulling = self
            .transfers
            .values()
            .any(|t| t.to == from && t.vm == vm && t.switched.is_some() && t.runs());
        if running && pulling {
            let error = format!("{vm} still receives its memory by post-copy");
            return self.op_done(from, op, 1, Err(OpError::Failed(error)), None);
        }
        let Some(to) = to.filter(|_| running) else {
            let error = if running {
                format!("no host at {address}")
            } else {
                format!("guest {vm} is not running")
            };
            return self.op_done(from, op, 1, Err(OpError::Failed(error)), None);
        };
        let id = self.seq;
        self.seq += 1;
        let steps = self.rng.random_range(2..=12);
        let stalls = self.chaos() && self.chance(self.scenario.stall);
        let fails_at = (self.chaos() && self.chance(self.scenario.transfer_fails))
            .then(|| self.rng.random_range(1..=steps));
        if stalls {
            self.fault("transfer stalls", || format!("transfer of {vm} stalls"));
        }
        if fails_at.is_some() {
            self.fault("transfer fails", || format!("transfer of {vm} will fail"));
        }
        let tick = self.rng.random_range(20..400);
        let epoch = self.hosts[from].epoch;
        self.transfers.insert(
            id,
            Transfer {
                vm: vm.to_string(),
                from,
                to,
                epoch,
                op,
                steps,
                done: 0,
                tick,
                stalls,
                fails_at,
                state: TransferState::Active,
                postcopy,
                switched: None,
                listening: None,
                recoveries: 0,
            },
        );
        self.push(tick, Event::TransferTick { transfer: id });
    }

    fn transfer_tick(&mut self, id: u64) {
        let Some(t) = self.transfers.get(&id) else {
            return;
        };
        if t.state == TransferState::Paused {
            return self.paused_tick(id);
        }
        if t.state != TransferState::Active {
            return;
        }
        let (from, to, tick, op, epoch) = (t.from, t.to, t.tick, t.op, t.epoch);
        let vm = t.vm.clone();
        let switched = t.switched.is_some();
        // After the switchover the destination's copy may run: it pulls
        // pages as long as it is there.
        let receiving = self.hosts[to]
            .guests
            .get(&vm)
            .is_some_and(|g| switched || g.state == GuestState::Incoming);
        // A source guest that died takes the rest of its memory with it.
        let sending = self.hosts[from].guests.contains_key(&vm);
        let fails = t.fails_at == Some(t.done + 1);
        let stalls = t.stalls;
        // QEMU: a post-copy stream that breaks pauses both ends (so does a
        // link that stays cut); only the source's copy dying loses it.
        if switched && sending && self.scenario.transfers_survive_crash {
            let why = if fails {
                self.transfers.get_mut(&id).expect("transfer").fails_at = None;
                Some("its stream broke")
            } else if !receiving {
                Some("its destination went away")
            } else if self.partitioned(from, to) && self.rng.random_bool(0.3) {
                Some("the link is cut")
            } else {
                None
            };
            if let Some(why) = why {
                self.pause_postcopy(id, why);
                self.push(tick, Event::TransferTick { transfer: id });
                return;
            }
        }
        if !receiving || !sending || fails {
            self.postcopy_broken(id);
            self.transfers.get_mut(&id).expect("transfer").state = TransferState::Stopped;
            let error = Err(OpError::Failed(
                "the destination closed the migration stream".to_string(),
            ));
            self.transfer_ended(from, epoch, op, error);
            return;
        }
        // A stalled link comes back once the chaos ends (a post-copy
        // transfer has no deadline to end it otherwise).
        if (stalls && self.chaos()) || self.partitioned(from, to) {
            self.push(tick, Event::TransferTick { transfer: id });
            // QEMU still says "postcopy-active", with no more bytes sent.
            if switched {
                self.report_progress(id);
            }
            return;
        }
        let t = self.transfers.get_mut(&id).expect("transfer");
        t.done += 1;
        let stats = self.transfer_stats(id);
        let t = self.transfers.get_mut(&id).expect("transfer");
        if t.done < t.steps {
            self.push(tick, Event::TransferTick { transfer: id });
            self.report_progress(id);
            return;
        }
        t.state = TransferState::Completed;
        if switched {
            // The last page went: the destination's copy (which may have
            // run since) is whole.
            self.transfer_ended(from, epoch, op, Ok(OpOutput::Transferred(stats)));
            return;
        }
        // Pre-copy converged: the source guest stops, the last pages go, and
        // the destination holds the same copy.
        let copy = match self.hosts[from].guests.get_mut(&vm) {
            Some(g) => {
                if g.state == GuestState::Running {
                    g.state = GuestState::Paused;
                }
                g.copy
            }
            None => 0,
        };
        if let Some(g) = self.hosts[to].guests.get_mut(&vm) {
            g.copy = copy;
        }
        self.transfer_ended(from, epoch, op, Ok(OpOutput::Transferred(stats)));
    }

    /// What the source's hypervisor reports of a transfer now.
    fn transfer_stats(&self, id: u64) -> TransferStats {
        let t = &self.transfers[&id];
        let total = 1u64 << 30;
        let sent = total * t.done as u64 / t.steps as u64;
        TransferStats {
            bytes_total: total,
            bytes_transferred: sent,
            bytes_remaining: total - sent,
            iteration: t.done,
            stage: match (t.state, t.switched) {
                (TransferState::Paused, _) => crate::protocol::TransferStage::PostcopyPaused,
                (_, Some(_)) => crate::protocol::TransferStage::Postcopy,
                (_, None) => crate::protocol::TransferStage::Precopy,
            },
            ..Default::default()
        }
    }

    /// The source's process hears how its transfer is doing, now.
    fn report_progress(&mut self, id: u64) {
        let t = &self.transfers[&id];
        let (host, epoch, op) = (t.from, t.epoch, t.op);
        let stats = self.transfer_stats(id);
        self.push(
            0,
            Event::Progress {
                host,
                epoch,
                op,
                stats,
            },
        );
    }

    /// A paused post-copy: the source's QEMU says so in its progress; the
    /// source's copy dying now loses the guest. One the operator forced
    /// back to run on the source is over (its pages are no longer sent).
    fn paused_tick(&mut self, id: u64) {
        let t = &self.transfers[&id];
        let (from, op, epoch, vm) = (t.from, t.op, t.epoch, t.vm.clone());
        if self.hosts[from]
            .guests
            .get(&vm)
            .is_some_and(|g| g.state == GuestState::Running)
        {
            self.transfers.get_mut(&id).expect("transfer").state = TransferState::Stopped;
            let error = Err(OpError::Failed("the source's guest runs again".to_string()));
            return self.transfer_ended(from, epoch, op, error);
        }
        if !self.hosts[from].guests.contains_key(&vm) {
            self.postcopy_broken(id);
            self.transfers.get_mut(&id).expect("transfer").state = TransferState::Stopped;
            let error = Err(OpError::Failed(
                "the source's guest went away during post-copy".to_string(),
            ));
            return self.transfer_ended(from, epoch, op, error);
        }
        self.report_progress(id);
        self.push(PAUSED_TICK_MS, Event::TransferTick { transfer: id });
    }

    fn transfer_ended(
        &mut self,
        from: usize,
        epoch: u32,
        op: OpId,
        result: Result<OpOutput, OpError>,
    ) {
        let key = self.push(
            1,
            Event::OpDone {
                host: from,
                epoch,
                op,
                result,
                effect: None,
            },
        );
        if self.hosts[from].epoch == epoch {
            self.hosts[from].ops.insert(op, key);
        }
    }

    // ---- the operator --------------------------------------------------------

    /// Hand an operator's request to a host's core.
    fn ask(&mut self, h: usize, what: String, request: Request) {
        if self.answering(h).is_none() {
            self.note(format!(
                "operator: {what}: {} is not answering",
                self.hosts[h].name
            ));
            return;
        }
        self.note(format!("operator: {what}"));
        self.next_req += 1;
        let req = self.next_req;
        self.hosts[h].inbound.insert(req, Inbound::Operator(what));
        self.input(h, Input::Request { req, request });
    }

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

    /// The completion policy an operator asks for: mostly the mode's, now
    /// and then post-copy at once, auto or pre-copy only with a budget
    /// short enough to run out (a second per GiB).
    fn completion(&mut self) -> CompletionRequest {
        if !self.chance(self.scenario.postcopy) {
            return CompletionRequest::default();
        }
        let postcopy = match self.rng.random_range(0..3) {
            0 => Postcopy::Now,
            1 => Postcopy::Auto,
            _ => Postcopy::Never,
        };
        CompletionRequest {
            postcopy: Some(postcopy),
            timeout_per_gib_s: Some(1),
            ..CompletionRequest::default()
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
        let completion = self.completion();
        let destination = self.hosts[to].name.clone();
        let guests = self.guests_of(h);
        let what = format!(
            "migrate {vm} {} -> {destination} ({}{})",
            self.hosts[h].name,
            mode.as_str(),
            describe_completion(&completion)
        );
        self.ask(
            h,
            what,
            Request::StartMigration {
                vm,
                destination,
                mode,
                completion,
                guests,
            },
        );
    }

    fn operator_abort(&mut self) {
        let live: Vec<(usize, String)> = (0..self.hosts.len())
            .filter_map(|h| self.answering(h).map(|c| (h, c)))
            .flat_map(|(h, c)| {
                c.migrations()
                    .filter(|r| r.outcome.is_none())
                    .map(move |r| (h, r.id.clone()))
            })
            .collect();
        if live.is_empty() {
            return;
        }
        let (h, id) = live[self.rng.random_range(0..live.len())].clone();
        self.ask(h, format!("abort {id}"), Request::Abort { id });
    }

    fn operator_retry(&mut self) {
        let candidates: Vec<(usize, String, String)> = (0..self.hosts.len())
            .filter_map(|h| self.answering(h).map(|c| (h, c)))
            .flat_map(|(h, c)| {
                c.migrations()
                    .filter(|r| matches!(r.outcome, Some(Outcome::Failed | Outcome::Aborted)))
                    .map(move |r| (h, r.id.clone(), r.destination.clone()))
            })
            .collect();
        if candidates.is_empty() {
            return;
        }
        let (h, id, last) = candidates[self.rng.random_range(0..candidates.len())].clone();
        let destination = if self.rng.random_bool(0.5) {
            last
        } else {
            let n = self.hosts.len();
            let to = (h + self.rng.random_range(1..n)) % n;
            self.hosts[to].name.clone()
        };
        let mode = self.mode();
        let completion = self.completion();
        let guests = self.guests_of(h);
        self.ask(
            h,
            format!(
                "retry {id} on {destination} ({}{})",
                mode.as_str(),
                describe_completion(&completion)
            ),
            Request::Retry {
                id,
                destination: Some(destination),
                mode: Some(mode),
                completion,
                guests,
            },
        );
    }

    /// `tern rollback MIGRATION`: run that migration's pending work on a host now.
    fn operator_rollback(&mut self) {
        let pending: Vec<(usize, String)> = (0..self.hosts.len())
            .filter_map(|h| self.answering(h).map(|c| (h, c)))
            .flat_map(|(h, c)| c.pending().map(move |p| (h, p.migration_id.clone())))
            .collect();
        if pending.is_empty() {
            // Nothing to roll back: repair a degraded VM instead, if any
            // (no draw of its own, so the seeds' other choices stay put).
            return self.operator_repair();
        }
        let (h, migration_id) = pending[self.rng.random_range(0..pending.len())].clone();
        let what = format!("rollback {migration_id} on {}", self.hosts[h].name);
        self.ask(h, what, Request::RunPending { migration_id });
    }

    /// `tern repair VM`: re-run the failed stages of the first degraded
    /// migration a host sourced, where its VM runs.
    fn operator_repair(&mut self) {
        let degraded = (0..self.hosts.len()).find_map(|h| {
            let core = self.answering(h)?;
            core.migrations()
                .find(|r| crate::protocol::repair::plan(r, None).is_ok())
                .map(|r| (h, r.vm.clone(), r.id.clone()))
        });
        let Some((h, vm, id)) = degraded else {
            return;
        };
        let what = format!("repair {vm} ({id}) from {}", self.hosts[h].name);
        self.ask(
            h,
            what,
            Request::Repair {
                vm,
                feature: None,
                who: "operator".into(),
            },
        );
    }

    /// Evacuate a host, or pause, resume, cancel an evacuation, or undrain.
    fn operator_evacuation(&mut self) {
        let n = self.hosts.len();
        let h = self.rng.random_range(0..n);
        let Some(core) = self.answering(h) else {
            return;
        };
        let active = core
            .evacuations()
            .into_iter()
            .find(|e| !e.state.is_over())
            .map(|e| e.id.clone());
        let draining = core.is_draining();
        match active {
            None if draining && self.rng.random_bool(0.5) => {
                self.ask(
                    h,
                    format!("undrain {}", self.hosts[h].name),
                    Request::Undrain,
                );
            }
            None => {
                let mode = self.mode();
                let exclude = if self.rng.random_bool(0.3) {
                    vec![self.hosts[(h + 1) % n].name.clone()]
                } else {
                    Vec::new()
                };
                let request = EvacuationRequest {
                    mode,
                    completion: Default::default(),
                    concurrency: self.rng.random_range(0..=3),
                    max_attempts: self.rng.random_range(1..=3),
                    exclude,
                };
                let guests = self.guests_of(h);
                self.ask(
                    h,
                    format!("evacuate {} ({})", self.hosts[h].name, mode.as_str()),
                    Request::Evacuate { request, guests },
                );
            }
            Some(id) => {
                let control = match self.rng.random_range(0..4) {
                    0 => Control::Pause,
                    1 => Control::Resume,
                    2 => Control::Cancel,
                    _ => Control::CancelAbort,
                };
                self.ask(
                    h,
                    format!("evacuation {control:?} {id}"),
                    Request::ControlEvacuation { id, control },
                );
            }
        }
    }

    /// After the chaos, whatever still evacuates is cancelled (an operator
    /// would, once nothing can take the VMs), so the cluster settles.
    fn cancel_evacuations(&mut self) {
        for h in 0..self.hosts.len() {
            let Some(core) = self.answering(h) else {
                continue;
            };
            let running: Vec<String> = core
                .evacuations()
                .into_iter()
                .filter(|e| !e.state.is_over())
                .map(|e| e.id.clone())
                .collect();
            for id in running {
                self.ask(
                    h,
                    format!("evacuation cancel {id} (after the chaos)"),
                    Request::ControlEvacuation {
                        id,
                        control: Control::Cancel,
                    },
                );
            }
        }
        if (0..self.hosts.len()).any(|h| {
            self.hosts[h].core.is_none() && !self.hosts[h].lost
                || self
                    .answering(h)
                    .is_some_and(|c| c.evacuations().iter().any(|e| !e.state.is_over()))
        }) {
            self.push(10_000, Event::CancelEvacuations);
        }
    }

    /// What an operator does once an attempt cannot resolve by itself (its
    /// destination is lost for good, or lost the guest): force it to run on
    /// its source, unless the VM already runs elsewhere.
    fn force_stuck(&mut self) {
        for h in 0..self.hosts.len() {
            let Some(core) = self.answering(h) else {
                continue;
            };
            // Telling a host lost for good that the guest runs here is
            // pointless: the operator drops that.
            let unheard: Vec<String> = core
                .pending()
                .filter(|p| p.work == host::Work::Notify)
                .filter(|p| {
                    self.host_index(&p.feature)
                        .is_some_and(|d| self.hosts[d].lost)
                })
                .map(|p| p.migration_id.clone())
                .collect();
            for migration_id in unheard {
                let what = format!("rollback {migration_id} --forget (its destination is gone)");
                self.ask(h, what, Request::ForgetPending { migration_id });
            }
            let Some(core) = self.answering(h) else {
                continue;
            };
            let stuck: Vec<(String, String, String, String)> = core
                .migrations()
                .filter(|r| r.outcome == Some(Outcome::Unresolved))
                .filter(|r| {
                    let lost_host = self
                        .host_index(&r.destination)
                        .is_some_and(|d| self.hosts[d].lost);
                    lost_host || r.guest == crate::protocol::GuestCondition::Unknown
                })
                .map(|r| {
                    let attempt = r.attempt_id.clone();
                    (r.id.clone(), attempt, r.vm.clone(), r.destination.clone())
                })
                .collect();
            for (id, attempt, vm, destination) in stuck {
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
                    // Knowingly: the copy here may be stale. The VM may
                    // have moved on since and its copy there died (a power
                    // loss): this decision is then the latest word on
                    // where it runs, whatever attempts came after.
                    self.forced_back.insert(vm.clone());
                    if let Some(at) = self.begun.iter().position(|(_, _, a)| *a == attempt) {
                        let entry = self.begun.remove(at);
                        self.begun.push(entry);
                    }
                    RunOn::Source
                };
                let what =
                    format!("resolve {id} --run-on {run_on:?} ({destination} cannot answer)");
                self.ask(h, what, Request::Force { id, run_on });
            }
            // A post-copy recovering towards a host lost for good would try
            // forever: the operator declares its guest lost.
            let Some(core) = self.answering(h) else {
                continue;
            };
            let hopeless: Vec<(String, String)> = core
                .migrations()
                .filter(|r| r.outcome.is_none() && r.recovery.is_some())
                .filter(|r| {
                    self.host_index(&r.destination)
                        .is_some_and(|d| self.hosts[d].lost)
                })
                .map(|r| (r.id.clone(), r.destination.clone()))
                .collect();
            for (id, destination) in hopeless {
                let what = format!("resolve {id} --lost ({destination} is gone for good)");
                let run_on = RunOn::Nowhere;
                self.ask(h, what, Request::Force { id, run_on });
            }
        }
    }

    // ---- the report ------------------------------------------------------------

    pub fn report(&self) -> Report {
        let mut outcomes = BTreeMap::new();
        for host in &self.hosts {
            for a in host.disk.view().sources.values() {
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
        let evacuations = self
            .hosts
            .iter()
            .map(|h| h.disk.view().evacuations.len() as u64)
            .sum();
        Report {
            seed: self.scenario.seed,
            steps: self.steps,
            faults: self.faults,
            fault_kinds: self.fault_kinds.clone(),
            evacuations,
            recoveries: self.recoveries,
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
            "scenario: {} hosts, {} VMs, loss {} dup {} delay {:?}, crash/write {} (max {}), kills {}, stops {}, \
             power losses {}, partitions {}, evacuations {}, limits out {} in {}, transfers survive crash: {}, guest faults {:?}",
            sc.hosts.len(),
            sc.vms.len(),
            sc.net.loss,
            sc.net.duplicate,
            sc.net.delay,
            sc.crash_per_write,
            sc.max_write_crashes,
            sc.kills,
            sc.stops,
            sc.power_losses,
            sc.partitions,
            sc.evacuations,
            sc.max_outgoing,
            sc.max_incoming,
            sc.transfers_survive_crash,
            sc.guest
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
                match (host.lost, host.core.is_some()) {
                    (true, _) => "lost for good",
                    (false, true) => "up",
                    (false, false) => "down",
                },
                host.spec.fail,
                host.spec.broken,
                host.spec.knows
            );
            for (name, g) in &host.guests {
                let _ = writeln!(s, "  guest {name}: {:?} (copy {})", g.state, g.copy);
            }
            for (vm, f) in &host.switch {
                let _ = writeln!(s, "  port {vm}/{f}");
            }
            let view = host.disk.view();
            for p in view.pending.values() {
                let _ = writeln!(
                    s,
                    "  pending {} of {:?} for {} ({})",
                    p.work.as_str(),
                    p.feature,
                    p.vm,
                    p.attempt_id
                );
            }
            for a in view.sources.values() {
                let _ = writeln!(
                    s,
                    "  source {} {} -> {}: {:?} {:?} running_on={} guest={} error={:?}",
                    a.attempt_id,
                    a.vm.name,
                    a.destination,
                    a.state,
                    a.record.outcome,
                    a.record.running_on,
                    a.record.guest.as_str(),
                    a.record.error
                );
            }
            for a in view.destinations.values() {
                let _ = writeln!(
                    s,
                    "  destination {} {} from {}: {:?} lost={:?} error={:?}",
                    a.attempt_id,
                    a.vm.name,
                    a.source,
                    a.state,
                    a.lost(),
                    a.error
                );
            }
            for e in view.evacuations.values() {
                let _ = writeln!(s, "  evacuation {}: {}", e.id, e.headline());
            }
        }
        s
    }
}

fn describe_action(action: &Action) -> String {
    match action {
        Action::Journal { entry, durable } => {
            let what = match entry {
                Entry::Source(a) => format!("source {} {:?}", a.attempt_id, a.state),
                Entry::Destination(a) => format!("destination {} {:?}", a.attempt_id, a.state),
                Entry::Pending(p) => {
                    format!("pending {} {} of {}", p.work.as_str(), p.feature, p.vm)
                }
                Entry::PendingDone {
                    attempt_id, work, ..
                } => {
                    format!("pending {work} of {attempt_id} done")
                }
                Entry::Tombstone(id) => format!("tombstone {id}"),
                Entry::Evacuation(e) => format!("evacuation {} {}", e.id, e.state.as_str()),
                Entry::Draining(d) => format!("draining {d}"),
                Entry::Prune(p) => format!(
                    "prune {} migrations, {} attempts, {} evacuations",
                    p.migrations.len(),
                    p.rolled_back.len() + p.committed.len(),
                    p.evacuations.len()
                ),
            };
            format!("journal{} {what}", if *durable { " (sync)" } else { "" })
        }
        Action::Call { peer, request, .. } => format!("call {peer} {}", request.name()),
        Action::Reply { reply, .. } => match reply {
            Ok(r) => format!("reply {}", short(r)),
            Err(e) => format!("refuse: {e}"),
        },
        Action::Run { op, what } => format!("run #{op} {}", short(what)),
        Action::Cancel { op } => format!("give up on #{op}"),
        Action::Emit(_) => "emit".into(),
        Action::Exit => "exit".into(),
    }
}

fn short(value: &impl std::fmt::Debug) -> String {
    let text = format!("{value:?}");
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

/// ", post-copy now" and the like, for the trace.
fn describe_completion(c: &CompletionRequest) -> String {
    match c.postcopy {
        Some(p) => format!(", post-copy {}, 1 s/GiB", p.as_str()),
        None => String::new(),
    }
}
