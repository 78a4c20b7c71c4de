//! Scenario tests of the protocol core: one [`SourceAttempt`] and one
//! [`DestinationAttempt`] coupled by a small, pure test driver (the [`World`])
//! that executes their actions the way an agent would, with a fault plan, a
//! guest model, a feature-state model, injected aborts, partitions, dead
//! agents and crash + restart from the last journal snapshot. The unit tests
//! pin one behaviour each; the property test checks the invariants of
//! DESIGN.md §2 over modes, required flags, failing stages, aborts and crashes.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Write as _;

use proptest::prelude::*;
use prost::Message;

use super::cookies::{self, check_cookie1};
use super::destination::{
    DestinationAction, DestinationAttempt, DestinationInput, DestinationState, FreeCapacity,
};
use super::policy::is_blocking;
use super::source::{
    AttemptParams, Resolution, SourceAction, SourceAttempt, SourceInput, SourceState,
};
use super::{
    FeatureSpec, Millis, Mode, Outcome, PROTOCOL_VERSION, PeerError, Phase, RunOn, Stage,
    StepStatus, Timing, TransferStats, VmSpec,
};
use crate::proto;

const SRC: &str = "hv-a";
const DST: &str = "hv-b";
const START: Millis = 1_000;
/// Latency of every message between the agents.
const NET_MS: Millis = 1;
const MAX_STEPS: usize = 20_000;
/// Simulated time after which a run counts as "never settles".
const MAX_TIME: Millis = START + 3_600_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Side {
    Source,
    Destination,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Guest {
    Running,
    Paused,
    Absent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transfer {
    /// `steps` progress reports `tick_ms` apart, then completion.
    Steps { steps: u32, tick_ms: Millis },
    /// Never progresses, never completes.
    Stall,
    /// Fails after a few milliseconds.
    Fails,
}

/// What the destination's hypervisor does with the incoming guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Incoming {
    Ok,
    StartFails,
    CompleteFails,
}

/// Moments a test can hook: partition the network, kill an agent for good,
/// or pause the run there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// The source executed SendPrepare.
    PrepareSent,
    /// The destination executed ReplyPrepare.
    PrepareReplied,
    /// The source executed StartTransfer.
    TransferStarted,
    /// The source executed SendFinish.
    FinishSent,
    /// Finish reached the destination (before it acts on it).
    FinishArrived,
}

#[derive(Debug, Clone)]
struct Scenario {
    mode: Mode,
    required: Vec<bool>,
    /// Stages that fail: `(feature, Prepare | Finish | Rollback | Release)`.
    fail: HashSet<(usize, Stage)>,
    transfer: Transfer,
    incoming: Incoming,
    stage_latency_ms: Millis,
    /// Abort on this side just before step `k` (1-based) of the run.
    abort_at: Option<(usize, Side)>,
    /// Crash this side right after its `k`-th journal write (1-based), then
    /// restart it from that snapshot.
    crash_at: Option<(Side, usize)>,
    /// Cut the network just before step `k`, for `ms` milliseconds.
    partition_at: Option<(usize, Millis)>,
    free: FreeCapacity,
}

impl Scenario {
    fn new(mode: Mode, required: &[bool]) -> Self {
        Scenario {
            mode,
            required: required.to_vec(),
            fail: HashSet::new(),
            transfer: Transfer::Steps {
                steps: 2,
                tick_ms: 5,
            },
            incoming: Incoming::Ok,
            stage_latency_ms: 1,
            abort_at: None,
            crash_at: None,
            partition_at: None,
            free: FreeCapacity {
                memory_mib: 65_536,
                vcpus: 64,
            },
        }
    }

    fn failing(mut self, feature: usize, stage: Stage) -> Self {
        self.fail.insert((feature, stage));
        self
    }

    fn vm(&self) -> VmSpec {
        VmSpec {
            name: "web-01".into(),
            memory_mib: 2048,
            vcpus: 2,
            dirty_rate_mib_s: 50,
            features: self
                .required
                .iter()
                .enumerate()
                .map(|(i, &required)| FeatureSpec {
                    name: format!("feat-{i}"),
                    driver: String::new(),
                    required,
                })
                .collect(),
            qemu: None,
        }
    }
}

#[derive(Debug)]
enum Request {
    Prepare(proto::Cookie1),
    Finish(proto::Cookie3),
    Abort(String),
    Resolve,
    Heartbeat,
}

#[derive(Debug)]
enum Event {
    /// An input for the source machine (a reply, a transfer report, a stage result).
    Source { epoch: u32, input: SourceInput },
    /// An input for the destination machine from its own executor.
    Destination { epoch: u32, input: DestinationInput },
    /// A source-to-destination RPC; `from` is the source incarnation that waits for the reply.
    Request { from: u32, request: Request },
    /// The network partition ends.
    Heal,
}

#[derive(Debug, Clone)]
enum Recovered {
    Source {
        from: SourceState,
        actions: Vec<SourceAction>,
    },
    Destination {
        from: DestinationState,
        actions: Vec<DestinationAction>,
    },
}

struct World {
    sc: Scenario,
    now: Millis,
    seq: u64,
    queue: BTreeMap<(Millis, u64), Event>,
    src: SourceAttempt,
    dst: Option<DestinationAttempt>,
    /// Incarnations: bumped by a crash, so replies to a dead process are lost.
    src_epoch: u32,
    dst_epoch: u32,
    /// The destination was told to abort before C1 arrived: it refuses it.
    tombstone: bool,
    /// Outstanding Prepare / Finish RPCs: the source incarnation waiting.
    prepare_rpc: Option<u32>,
    finish_rpc: Option<u32>,
    src_guest: Guest,
    dst_guest: Guest,
    transfer_active: bool,
    src_features: BTreeSet<usize>,
    dst_features: BTreeSet<usize>,
    pending: BTreeSet<(Side, usize)>,
    src_journal: Option<SourceAttempt>,
    dst_journal: Option<DestinationAttempt>,
    journal_writes: [usize; 2],
    src_log: Vec<SourceAction>,
    dst_log: Vec<DestinationAction>,
    /// Stages as they completed: (side, feature, stage, ok).
    stage_log: Vec<(Side, usize, Stage, bool)>,
    recoveries: Vec<Recovered>,
    violations: Vec<String>,
    steps: usize,
    src_timer_fires: usize,
    crashed: Option<Side>,
    /// The injected abort: on which side, the source state it met, and
    /// `Ok(accepted)` or the refusal.
    abort_result: Option<(Side, SourceState, Result<bool, String>)>,
    partitioned: bool,
    partitioned_at: Option<Millis>,
    heal_after: Option<Millis>,
    dead: Option<Side>,
    partition_on: Option<Trigger>,
    kill_on: Option<(Trigger, Side)>,
    pause_on: Option<Trigger>,
    paused: bool,
    triggered: Vec<(Trigger, usize, Millis)>,
    src_finished: Option<Outcome>,
    dst_finished: Option<bool>,
    /// Begin's actions, executed by the first step (so hooks set after
    /// `new` see them).
    begin: Option<Vec<SourceAction>>,
}

fn unreachable_peer() -> PeerError {
    PeerError::Unreachable("connection refused".into())
}

impl World {
    fn new(sc: Scenario) -> World {
        let n = sc.required.len();
        let params = AttemptParams {
            migration_id: "m1".into(),
            attempt: 1,
            host: SRC.into(),
            destination: DST.into(),
            vm: sc.vm(),
            mode: sc.mode,
            timing: Timing::default(),
            started_at_ms: START,
        };
        let (src, actions) = SourceAttempt::begin(params, START);
        World {
            sc,
            now: START,
            seq: 0,
            queue: BTreeMap::new(),
            src,
            dst: None,
            src_epoch: 0,
            dst_epoch: 0,
            tombstone: false,
            prepare_rpc: None,
            finish_rpc: None,
            src_guest: Guest::Running,
            dst_guest: Guest::Absent,
            transfer_active: false,
            src_features: (0..n).collect(),
            dst_features: BTreeSet::new(),
            pending: BTreeSet::new(),
            src_journal: None,
            dst_journal: None,
            journal_writes: [0, 0],
            src_log: Vec::new(),
            dst_log: Vec::new(),
            stage_log: Vec::new(),
            recoveries: Vec::new(),
            violations: Vec::new(),
            steps: 0,
            src_timer_fires: 0,
            crashed: None,
            abort_result: None,
            partitioned: false,
            partitioned_at: None,
            heal_after: None,
            dead: None,
            partition_on: None,
            kill_on: None,
            pause_on: None,
            paused: false,
            triggered: Vec::new(),
            src_finished: None,
            dst_finished: None,
            begin: Some(actions),
        }
    }

    fn start(&mut self) {
        if let Some(actions) = self.begin.take() {
            self.exec_source(actions);
        }
    }

    // ---- scheduling --------------------------------------------------------

    fn push(&mut self, delay: Millis, event: Event) {
        self.seq += 1;
        self.queue.insert((self.now + delay, self.seq), event);
    }

    fn send_to_source(&mut self, epoch: u32, input: SourceInput) {
        self.push(NET_MS, Event::Source { epoch, input });
    }

    fn request(&mut self, request: Request) {
        let from = self.src_epoch;
        self.push(NET_MS, Event::Request { from, request });
    }

    fn next_timer(&self) -> Option<(Millis, Side)> {
        let src = (self.dead != Some(Side::Source))
            .then(|| self.src.poll_timeout())
            .flatten();
        let dst = (self.dead != Some(Side::Destination))
            .then(|| self.dst.as_ref().and_then(DestinationAttempt::poll_timeout))
            .flatten();
        match (src, dst) {
            (Some(s), Some(d)) if d < s => Some((d, Side::Destination)),
            (Some(s), _) => Some((s, Side::Source)),
            (None, Some(d)) => Some((d, Side::Destination)),
            (None, None) => None,
        }
    }

    fn next_time(&self) -> Option<Millis> {
        let event = self.queue.keys().next().map(|&(t, _)| t);
        let timer = self.next_timer().map(|(t, _)| t);
        match (event, timer) {
            (Some(e), Some(t)) => Some(e.min(t)),
            (e, t) => e.or(t),
        }
    }

    fn trigger(&mut self, t: Trigger) {
        self.triggered.push((t, self.steps, self.now));
        if self.partition_on == Some(t) {
            self.partition_on = None;
            self.partitioned = true;
            self.partitioned_at = Some(self.now);
            if let Some(after) = self.heal_after {
                self.push(after, Event::Heal);
            }
        }
        if let Some((kill, side)) = self.kill_on
            && kill == t
        {
            self.kill_on = None;
            self.dead = Some(side);
        }
        if self.pause_on == Some(t) {
            self.pause_on = None;
            self.paused = true;
        }
    }

    // ---- running -----------------------------------------------------------

    /// One event or one timer. `false` when nothing is left to happen.
    fn step(&mut self) -> bool {
        self.start();
        let timer = self.next_timer();
        let event_time = self.queue.keys().next().map(|&(t, _)| t);
        let fire_timer = match (timer, event_time) {
            (None, None) => return false,
            (Some((t, _)), Some(e)) => t <= e,
            (Some(_), None) => true,
            (None, Some(_)) => false,
        };
        self.steps += 1;
        if let Some((k, side)) = self.sc.abort_at
            && k == self.steps
        {
            self.inject_abort(side);
        }
        if let Some((k, ms)) = self.sc.partition_at
            && k == self.steps
        {
            self.partitioned = true;
            self.partitioned_at = Some(self.now);
            self.push(ms, Event::Heal);
        }
        if fire_timer {
            let (t, side) = timer.expect("a timer");
            self.now = self.now.max(t);
            self.fire_timer(side);
        } else {
            let ((t, _), event) = self.queue.pop_first().expect("an event");
            self.now = self.now.max(t);
            self.deliver(event);
        }
        self.check_guests();
        true
    }

    fn fire_timer(&mut self, side: Side) {
        match side {
            Side::Source => {
                self.src_timer_fires += 1;
                let actions = self.src.handle(self.now, SourceInput::Timer);
                let idle = actions.is_empty();
                self.exec_source(actions);
                // A timer that does nothing must move its deadline on.
                if idle
                    && self.dead != Some(Side::Source)
                    && let Some(t) = self.src.poll_timeout()
                    && t <= self.now
                {
                    self.violation(format!(
                        "source timer spins: deadline {t} <= now {} in {:?}",
                        self.now, self.src.state
                    ));
                }
            }
            Side::Destination => {
                let Some(dst) = self.dst.as_mut() else { return };
                let actions = dst.handle(self.now, DestinationInput::Timer);
                let idle = actions.is_empty();
                self.exec_destination(actions);
                if idle
                    && self.dead != Some(Side::Destination)
                    && let Some(dst) = &self.dst
                    && let Some(t) = dst.poll_timeout()
                    && t <= self.now
                {
                    let state = dst.state.clone();
                    self.violation(format!(
                        "destination timer spins: deadline {t} <= now {} in {state:?}",
                        self.now
                    ));
                }
            }
        }
    }

    /// Run until nothing is left to happen (`true`), a pause trigger fired or
    /// the step/time cap was hit (`false`).
    fn run(&mut self) -> bool {
        self.paused = false;
        loop {
            if self.paused || self.steps >= MAX_STEPS || self.now > MAX_TIME {
                return false;
            }
            if !self.step() {
                return true;
            }
        }
    }

    fn run_until(&mut self, deadline: Millis) {
        self.start();
        self.paused = false;
        while !self.paused
            && self.steps < MAX_STEPS
            && self.next_time().is_some_and(|t| t <= deadline)
        {
            self.step();
        }
        self.now = self.now.max(deadline);
    }

    fn inject_abort(&mut self, side: Side) {
        let state = self.src.state.clone();
        match side {
            Side::Source => {
                if self.dead == Some(Side::Source) {
                    return;
                }
                let result = self.src.abort(self.now, "operator abort");
                let accepted = result.as_ref().is_ok_and(|a| !a.is_empty());
                self.abort_result = Some((side, state, result.clone().map(|_| accepted)));
                if let Ok(actions) = result {
                    self.exec_source(actions);
                }
            }
            Side::Destination => {
                if self.dead == Some(Side::Destination) {
                    return;
                }
                let Some(dst) = self.dst.as_mut() else { return };
                let result = dst.abort(self.now, "agent on hv-b is stopping (SIGTERM)", true);
                let accepted = result.as_ref().is_ok_and(|a| !a.is_empty());
                self.abort_result = Some((side, state, result.clone().map(|_| accepted)));
                if let Ok(actions) = result {
                    self.exec_destination(actions);
                }
            }
        }
    }

    fn violation(&mut self, what: String) {
        self.violations
            .push(format!("t={} step={}: {what}", self.now, self.steps));
    }

    fn check_guests(&mut self) {
        if self.src_guest == Guest::Running && self.dst_guest == Guest::Running {
            self.violation("the guest runs on both hosts".into());
        }
    }

    fn stage_result(&self, feature: usize, stage: Stage) -> Result<String, String> {
        if self.sc.fail.contains(&(feature, stage)) {
            Err(format!("switch refused {stage} of feat-{feature}"))
        } else {
            Ok(format!("{stage} done"))
        }
    }

    // ---- delivering --------------------------------------------------------

    fn deliver(&mut self, event: Event) {
        match event {
            Event::Heal => self.partitioned = false,
            Event::Source { epoch, input } => {
                // What the hypervisor and the drivers did happened whether or
                // not the agent process that asked is still there.
                match &input {
                    SourceInput::TransferDone(Ok(_)) if self.transfer_active => {
                        self.transfer_active = false;
                        if self.src_guest == Guest::Running {
                            self.src_guest = Guest::Paused;
                        }
                    }
                    SourceInput::StageDone {
                        feature,
                        stage,
                        result,
                    } => {
                        self.stage_log
                            .push((Side::Source, *feature, *stage, result.is_ok()));
                        if *stage == Stage::Release && result.is_ok() {
                            self.src_features.remove(feature);
                        }
                    }
                    _ => {}
                }
                if self.dead == Some(Side::Source) || epoch != self.src_epoch {
                    return;
                }
                let actions = self.src.handle(self.now, input);
                self.exec_source(actions);
            }
            Event::Destination { epoch, input } => {
                if let DestinationInput::IncomingStarted(Err(_)) = &input {
                    self.dst_guest = Guest::Absent;
                }
                if let DestinationInput::StageDone {
                    feature,
                    stage,
                    result,
                } = &input
                {
                    self.stage_log
                        .push((Side::Destination, *feature, *stage, result.is_ok()));
                    if result.is_ok() {
                        match stage {
                            Stage::Prepare | Stage::Finish => {
                                self.dst_features.insert(*feature);
                            }
                            Stage::Rollback => {
                                self.dst_features.remove(feature);
                            }
                            Stage::Release => {}
                        }
                    }
                }
                if self.dead == Some(Side::Destination) || epoch != self.dst_epoch {
                    return;
                }
                let Some(dst) = self.dst.as_mut() else { return };
                let actions = dst.handle(self.now, input);
                self.exec_destination(actions);
            }
            Event::Request { from, request } => self.on_request(from, request),
        }
    }

    fn on_request(&mut self, from: u32, request: Request) {
        if self.partitioned || self.dead == Some(Side::Destination) {
            let reply = match request {
                Request::Prepare(_) => SourceInput::PrepareReplied(Err(unreachable_peer())),
                Request::Finish(_) => SourceInput::FinishReplied(Err(unreachable_peer())),
                Request::Resolve => SourceInput::ResolveReplied(Err(unreachable_peer())),
                Request::Heartbeat => SourceInput::HeartbeatReplied(Err(unreachable_peer())),
                Request::Abort(_) => return,
            };
            self.send_to_source(from, reply);
            return;
        }
        match request {
            Request::Prepare(c1) => {
                if self.tombstone {
                    let refusal =
                        PeerError::Refused("the attempt was aborted before Prepare arrived".into());
                    self.send_to_source(from, SourceInput::PrepareReplied(Err(refusal)));
                    return;
                }
                if self.dst.is_some() {
                    return;
                }
                let c1: proto::Cookie1 =
                    cookies::decode("C1", &c1.encode_to_vec()).expect("C1 decodes");
                let incoming = check_cookie1(&c1, |_| true).expect("C1 is well formed");
                match DestinationAttempt::prepare(
                    incoming,
                    DST,
                    self.sc.free,
                    false,
                    None,
                    Timing::default(),
                    self.now,
                ) {
                    Ok((attempt, actions)) => {
                        self.dst = Some(attempt);
                        self.prepare_rpc = Some(from);
                        self.exec_destination(actions);
                    }
                    Err(refusal) => {
                        let refusal = PeerError::Refused(refusal.to_string());
                        self.send_to_source(from, SourceInput::PrepareReplied(Err(refusal)));
                    }
                }
            }
            Request::Finish(c3) => {
                let c3: proto::Cookie3 =
                    cookies::decode("C3", &c3.encode_to_vec()).expect("C3 decodes");
                if self.dst.is_none() {
                    let refusal = PeerError::Refused("unknown attempt".into());
                    self.send_to_source(from, SourceInput::FinishReplied(Err(refusal)));
                    return;
                }
                self.finish_rpc = Some(from);
                self.trigger(Trigger::FinishArrived);
                let dst = self.dst.as_mut().expect("destination");
                let actions = dst.handle(self.now, DestinationInput::Finish(c3));
                self.exec_destination(actions);
            }
            Request::Abort(reason) => match self.dst.as_mut() {
                None => self.tombstone = true,
                Some(dst) => {
                    if let Ok(actions) = dst.abort(self.now, &reason, false) {
                        self.exec_destination(actions);
                    }
                }
            },
            Request::Resolve => {
                let Some(dst) = self.dst.as_mut() else {
                    self.tombstone = true;
                    let c4 = proto::Cookie4 {
                        protocol_version: PROTOCOL_VERSION,
                        attempt_id: self.src.attempt_id.clone(),
                        committed: false,
                        error: "unknown attempt".into(),
                        ..Default::default()
                    };
                    self.send_to_source(
                        from,
                        SourceInput::ResolveReplied(Ok(Resolution::NotCommitted(c4))),
                    );
                    return;
                };
                let (answer, actions) = dst.resolve(self.now);
                if self.exec_destination(actions) {
                    self.send_to_source(from, SourceInput::ResolveReplied(Err(unreachable_peer())));
                    return;
                }
                let c4 = self.dst.as_ref().expect("destination").cookie4();
                let resolution = match answer {
                    Some(true) => Resolution::Committed(c4),
                    Some(false) => Resolution::NotCommitted(c4),
                    None => Resolution::Pending,
                };
                self.send_to_source(from, SourceInput::ResolveReplied(Ok(resolution)));
            }
            Request::Heartbeat => {
                let known = match self.dst.as_mut() {
                    None => false,
                    Some(dst) => {
                        let actions = dst.handle(self.now, DestinationInput::Heartbeat);
                        let known = !matches!(
                            dst.state,
                            DestinationState::RollingBack { .. } | DestinationState::RolledBack
                        );
                        self.exec_destination(actions);
                        known
                    }
                };
                self.send_to_source(from, SourceInput::HeartbeatReplied(Ok(known)));
            }
        }
    }

    // ---- executing ---------------------------------------------------------

    /// Execute the source's actions; `true` if the source crashed doing so
    /// (the rest of the batch is lost).
    fn exec_source(&mut self, actions: Vec<SourceAction>) -> bool {
        for action in actions {
            if self.dead == Some(Side::Source) {
                return true;
            }
            self.src_log.push(action.clone());
            match action {
                SourceAction::Journal(snapshot) => {
                    self.src_journal = Some(*snapshot);
                    self.journal_writes[0] += 1;
                    if self.crashed.is_none()
                        && self.sc.crash_at == Some((Side::Source, self.journal_writes[0]))
                    {
                        self.crash(Side::Source);
                        return true;
                    }
                }
                SourceAction::SendPrepare(c1) => {
                    self.request(Request::Prepare(c1));
                    self.trigger(Trigger::PrepareSent);
                }
                SourceAction::StartTransfer { address } => {
                    if address.is_empty() {
                        self.violation("StartTransfer without an address".into());
                    }
                    self.transfer_active = true;
                    let epoch = self.src_epoch;
                    if self.sc.transfer == Transfer::Fails {
                        let input = SourceInput::TransferDone(Err(
                            "the destination closed the stream".into(),
                        ));
                        self.push(5, Event::Source { epoch, input });
                    }
                    if let Transfer::Steps { steps, tick_ms } = self.sc.transfer {
                        let total = 2048 * 1024 * 1024;
                        for i in 1..=steps as u64 {
                            let done = total * i / (steps as u64 + 1);
                            let stats = TransferStats {
                                bytes_total: total,
                                bytes_transferred: done,
                                bytes_remaining: total - done,
                                iteration: i as u32,
                                ..Default::default()
                            };
                            self.push(
                                i * tick_ms,
                                Event::Source {
                                    epoch,
                                    input: SourceInput::TransferProgress(stats),
                                },
                            );
                        }
                        let stats = TransferStats {
                            bytes_total: total,
                            bytes_transferred: total,
                            ..Default::default()
                        };
                        let input = SourceInput::TransferDone(Ok(stats));
                        self.push((steps as u64 + 1) * tick_ms, Event::Source { epoch, input });
                    }
                    self.trigger(Trigger::TransferStarted);
                }
                SourceAction::CancelTransfer => self.transfer_active = false,
                SourceAction::SendFinish(c3) => {
                    self.request(Request::Finish(c3));
                    self.trigger(Trigger::FinishSent);
                }
                SourceAction::SendAbort { .. } => {
                    let reason = "aborted by the source".to_string();
                    self.request(Request::Abort(reason));
                }
                SourceAction::SendResolve => self.request(Request::Resolve),
                SourceAction::SendHeartbeat => self.request(Request::Heartbeat),
                SourceAction::ResumeGuest => {
                    if self.src_guest == Guest::Absent {
                        self.violation("the source resumed a guest it had killed".into());
                    } else {
                        self.src_guest = Guest::Running;
                    }
                    self.check_guests();
                }
                SourceAction::KillGuest => self.src_guest = Guest::Absent,
                SourceAction::RunStage { feature, stage } => {
                    if stage != Stage::Release {
                        self.violation(format!("the source ran {stage} of feat-{feature}"));
                    }
                    let result = self.stage_result(feature, stage);
                    let epoch = self.src_epoch;
                    let input = SourceInput::StageDone {
                        feature,
                        stage,
                        result,
                    };
                    self.push(self.sc.stage_latency_ms, Event::Source { epoch, input });
                }
                SourceAction::RecordPending { feature, stage, .. } => {
                    if stage != Stage::Release {
                        self.violation(format!("the source recorded a pending {stage}"));
                    }
                    self.pending.insert((Side::Source, feature));
                }
                SourceAction::Finished(outcome) => self.src_finished = Some(outcome),
            }
        }
        false
    }

    /// Execute the destination's actions; `true` if it crashed doing so.
    fn exec_destination(&mut self, actions: Vec<DestinationAction>) -> bool {
        for action in actions {
            if self.dead == Some(Side::Destination) {
                return true;
            }
            self.dst_log.push(action.clone());
            match action {
                DestinationAction::Journal(snapshot) => {
                    self.dst_journal = Some(*snapshot);
                    self.journal_writes[1] += 1;
                    if self.crashed.is_none()
                        && self.sc.crash_at == Some((Side::Destination, self.journal_writes[1]))
                    {
                        self.crash(Side::Destination);
                        return true;
                    }
                }
                DestinationAction::StartIncoming => {
                    if self.dst_guest != Guest::Absent {
                        self.violation("StartIncoming with a guest already there".into());
                    }
                    self.dst_guest = Guest::Paused;
                    let epoch = self.dst_epoch;
                    let input = DestinationInput::IncomingStarted(match self.sc.incoming {
                        Incoming::StartFails => Err("qemu exited: no such bridge".into()),
                        _ => Ok(format!("sim://{DST}/incoming")),
                    });
                    self.push(NET_MS, Event::Destination { epoch, input });
                }
                DestinationAction::CompleteIncoming(_) => {
                    let epoch = self.dst_epoch;
                    let input = DestinationInput::IncomingCompleted(match self.sc.incoming {
                        Incoming::CompleteFails => Err("incoming migration failed".into()),
                        _ => Ok(()),
                    });
                    self.push(NET_MS, Event::Destination { epoch, input });
                }
                DestinationAction::RunStage { feature, stage } => {
                    if stage == Stage::Release {
                        self.violation(format!("the destination ran release of feat-{feature}"));
                    }
                    let result = self.stage_result(feature, stage);
                    let epoch = self.dst_epoch;
                    let input = DestinationInput::StageDone {
                        feature,
                        stage,
                        result,
                    };
                    self.push(
                        self.sc.stage_latency_ms,
                        Event::Destination { epoch, input },
                    );
                }
                DestinationAction::ResumeGuest => {
                    if self.dst_guest == Guest::Absent {
                        self.violation("the destination resumed a guest that is not there".into());
                    } else {
                        self.dst_guest = Guest::Running;
                    }
                    self.check_guests();
                }
                DestinationAction::KillGuest => self.dst_guest = Guest::Absent,
                DestinationAction::RecordPending { feature, stage, .. } => {
                    if stage != Stage::Rollback {
                        self.violation(format!("the destination recorded a pending {stage}"));
                    }
                    self.pending.insert((Side::Destination, feature));
                }
                DestinationAction::ReplyPrepare(c2) => {
                    if let Some(epoch) = self.prepare_rpc.take() {
                        let c2: proto::Cookie2 =
                            cookies::decode("C2", &c2.encode_to_vec()).expect("C2 decodes");
                        let reply = if self.partitioned {
                            Err(unreachable_peer())
                        } else {
                            Ok(c2)
                        };
                        self.send_to_source(epoch, SourceInput::PrepareReplied(reply));
                    }
                    self.trigger(Trigger::PrepareReplied);
                }
                DestinationAction::ReplyFinish(c4) => {
                    if let Some(epoch) = self.finish_rpc.take() {
                        let c4: proto::Cookie4 =
                            cookies::decode("C4", &c4.encode_to_vec()).expect("C4 decodes");
                        let reply = if self.partitioned {
                            Err(unreachable_peer())
                        } else {
                            Ok(c4)
                        };
                        self.send_to_source(epoch, SourceInput::FinishReplied(reply));
                    }
                }
                DestinationAction::NotifySource { reason } => {
                    if !self.partitioned {
                        let epoch = self.src_epoch;
                        self.send_to_source(epoch, SourceInput::PeerAborted { reason });
                    }
                }
                DestinationAction::Finished { committed } => self.dst_finished = Some(committed),
            }
        }
        false
    }

    /// The agent on `side` dies right after a journal write and restarts from
    /// its journal: the rest of the batch, replies to the old process and its
    /// executor's pending results are lost; the guest and the drivers' state
    /// survive.
    fn crash(&mut self, side: Side) {
        self.crashed = Some(side);
        match side {
            Side::Source => {
                self.src_epoch += 1;
                let mut src = self.src_journal.clone().expect("a journaled source");
                let from = src.state.clone();
                let actions = src.recover(self.now);
                self.recoveries.push(Recovered::Source {
                    from,
                    actions: actions.clone(),
                });
                self.src = src;
                self.exec_source(actions);
            }
            Side::Destination => {
                self.dst_epoch += 1;
                if let Some(epoch) = self.prepare_rpc.take() {
                    self.send_to_source(
                        epoch,
                        SourceInput::PrepareReplied(Err(unreachable_peer())),
                    );
                }
                if let Some(epoch) = self.finish_rpc.take() {
                    self.send_to_source(epoch, SourceInput::FinishReplied(Err(unreachable_peer())));
                }
                let mut dst = self.dst_journal.clone().expect("a journaled destination");
                let from = dst.state.clone();
                let actions = dst.recover(self.now);
                self.recoveries.push(Recovered::Destination {
                    from,
                    actions: actions.clone(),
                });
                self.dst = Some(dst);
                self.exec_destination(actions);
            }
        }
    }

    // ---- observing ---------------------------------------------------------

    fn moved(&self) -> bool {
        self.dst_guest == Guest::Running
    }

    fn dst_state(&self) -> Option<&DestinationState> {
        self.dst.as_ref().map(|d| &d.state)
    }

    fn dst_rollbacks(&self) -> Vec<usize> {
        self.dst_log
            .iter()
            .filter_map(|a| match a {
                DestinationAction::RunStage {
                    feature,
                    stage: Stage::Rollback,
                } => Some(*feature),
                _ => None,
            })
            .collect()
    }

    fn src_did(&self, pred: impl Fn(&SourceAction) -> bool) -> bool {
        self.src_log.iter().any(pred)
    }

    fn dst_did(&self, pred: impl Fn(&DestinationAction) -> bool) -> bool {
        self.dst_log.iter().any(pred)
    }

    /// Destination prepare/finish stages that ran and failed.
    fn failed_stages(&self) -> Vec<(usize, Stage)> {
        self.stage_log
            .iter()
            .filter(|(side, _, stage, ok)| {
                *side == Side::Destination && matches!(stage, Stage::Prepare | Stage::Finish) && !ok
            })
            .map(|&(_, f, stage, _)| (f, stage))
            .collect()
    }

    fn abort_accepted(&self) -> bool {
        matches!(self.abort_result, Some((_, _, Ok(true))))
    }

    fn dump(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "scenario: {:?}", self.sc);
        let _ = writeln!(
            s,
            "now={} steps={} crashed={:?} abort={:?}",
            self.now, self.steps, self.crashed, self.abort_result
        );
        let _ = writeln!(
            s,
            "source: {:?} outcome={:?} running_on={} committed={} error={:?}",
            self.src.state,
            self.src.record.outcome,
            self.src.record.running_on,
            self.src.record.committed,
            self.src.record.error
        );
        let _ = writeln!(
            s,
            "destination: {:?} error={:?}",
            self.dst_state(),
            self.dst.as_ref().and_then(|d| d.error.clone())
        );
        let _ = writeln!(
            s,
            "guests: src={:?} dst={:?}; features: src={:?} dst={:?} pending={:?}",
            self.src_guest, self.dst_guest, self.src_features, self.dst_features, self.pending
        );
        let _ = writeln!(s, "stages: {:?}", self.stage_log);
        let short = |d: String| d.chars().take(60).collect::<String>();
        let src: Vec<String> = self
            .src_log
            .iter()
            .map(|a| match a {
                SourceAction::Journal(j) => format!("Journal({:?})", j.state),
                other => short(format!("{other:?}")),
            })
            .collect();
        let dst: Vec<String> = self
            .dst_log
            .iter()
            .map(|a| match a {
                DestinationAction::Journal(j) => format!("Journal({:?})", j.state),
                other => short(format!("{other:?}")),
            })
            .collect();
        for (title, lines) in [("source actions", src), ("destination actions", dst)] {
            let _ = writeln!(s, "{title}:");
            let mut i = 0;
            while i < lines.len() {
                let run = lines[i..].iter().take_while(|l| **l == lines[i]).count();
                let _ = writeln!(
                    s,
                    "  {}{}",
                    lines[i],
                    if run > 1 {
                        format!(" x{run}")
                    } else {
                        String::new()
                    }
                );
                i += run;
            }
        }
        let _ = writeln!(
            s,
            "recoveries: {:?}",
            self.recoveries
                .iter()
                .map(recovered_from)
                .collect::<Vec<_>>()
        );
        s
    }

    /// The invariants of DESIGN.md §2 on a settled run.
    fn invariant_failures(&self, settled: bool) -> Vec<String> {
        let mut f = self.violations.clone();
        if !settled {
            f.push("the run did not settle".into());
        }
        let outcome = self.src.record.outcome;
        let unresolved = outcome == Some(Outcome::Unresolved);
        // (1) runs on exactly one host once settled (or unresolved: paused at
        // the source, nowhere else).
        match (self.src_guest, self.dst_guest) {
            (Guest::Running, Guest::Running) => f.push("runs on both hosts".into()),
            (Guest::Running, _) | (_, Guest::Running) => {}
            (src, _) => {
                if !(unresolved && src == Guest::Paused && self.crashed.is_some()) {
                    f.push("the guest runs nowhere".into());
                }
            }
        }
        // (2) no feature state where the VM does not run, unless pending.
        if self.src_guest == Guest::Running {
            for &i in &self.dst_features {
                if !self.pending.contains(&(Side::Destination, i)) {
                    f.push(format!(
                        "feat-{i} left on the destination without a pending rollback"
                    ));
                }
            }
        }
        if self.dst_guest == Guest::Running {
            for &i in &self.src_features {
                if !self.pending.contains(&(Side::Source, i)) {
                    f.push(format!(
                        "feat-{i} left on the source without a pending release"
                    ));
                }
            }
        }
        // (3) an outcome, and a finished attempt on both sides.
        if outcome.is_none() {
            f.push("the source record has no outcome".into());
        }
        if !unresolved {
            if !self.src.is_done() {
                f.push(format!("the source is not done: {:?}", self.src.state));
            }
            // A crash right after the final journal write loses the
            // announcement; the restarted agent reads the outcome instead.
            let lost = self.crashed == Some(Side::Source) && self.src_finished.is_none();
            if self.src_finished != outcome && !lost {
                f.push(format!(
                    "Finished({:?}) was not announced (got {:?})",
                    outcome, self.src_finished
                ));
            }
        }
        if let Some(dst) = &self.dst
            && !dst.is_finished()
        {
            f.push(format!("the destination is not finished: {:?}", dst.state));
        }
        // (4) the outcome agrees with the destination and the guest.
        if !unresolved {
            let moved = self.moved();
            let committed = self
                .dst
                .as_ref()
                .is_some_and(DestinationAttempt::is_committed);
            let succeeded = matches!(outcome, Some(Outcome::Succeeded | Outcome::Degraded));
            let on_dst = self.src.record.running_on == DST;
            if !(moved == committed
                && moved == succeeded
                && moved == on_dst
                && moved == self.src.record.committed)
            {
                f.push(format!(
                    "disagreement: guest moved={moved} destination committed={committed} outcome={outcome:?} \
                     running_on={} record.committed={}",
                    self.src.record.running_on, self.src.record.committed
                ));
            }
        }
        // The journals hold the final word.
        if let Some(j) = &self.src_journal
            && (j.state != self.src.state || j.record.outcome != outcome)
        {
            f.push(format!(
                "source journal {:?}/{:?} differs from the attempt",
                j.state, j.record.outcome
            ));
        }
        if let (Some(j), Some(d)) = (&self.dst_journal, &self.dst)
            && j.state != d.state
        {
            f.push(format!(
                "destination journal {:?} differs from the attempt {:?}",
                j.state, d.state
            ));
        }
        f
    }

    /// The feature policy: blocking failures, fast mode, degraded, rollback set.
    fn policy_failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        let sc = &self.sc;
        let moved = self.moved();
        let outcome = self.src.record.outcome;
        let disturbed = self.crashed.is_some() || self.abort_accepted();
        // Faults outside the feature plan: the network, a dead agent, a
        // stalled transfer, a refused Prepare, an operator's forced decision.
        let forced = self
            .src
            .record
            .error
            .as_deref()
            .is_some_and(|e| e.contains("operator forced"));
        let outside = disturbed
            || self.partitioned_at.is_some()
            || self.dead.is_some()
            || !matches!(sc.transfer, Transfer::Steps { .. })
            || sc.incoming != Incoming::Ok
            || self.dst.is_none()
            || forced;
        let failed = self.failed_stages();
        let blocking = failed
            .iter()
            .any(|&(i, _)| is_blocking(sc.mode, sc.required[i]));
        if blocking {
            if moved {
                f.push("moved although a blocking stage failed".into());
            }
            if !disturbed && outcome != Some(Outcome::Failed) {
                f.push(format!(
                    "a blocking stage failed but the outcome is {outcome:?}"
                ));
            }
        }
        if sc.mode == Mode::Fast && !outside && !moved {
            f.push("fast mode without abort or crash did not move".into());
        }
        if outcome != Some(Outcome::Unresolved) {
            let degraded = outcome == Some(Outcome::Degraded);
            if !forced && degraded != (moved && !failed.is_empty()) {
                f.push(format!(
                    "degraded={degraded} but moved={moved} with failed stages {failed:?}"
                ));
            }
        }
        if !outside && failed.is_empty() && outcome != Some(Outcome::Succeeded) {
            f.push(format!(
                "nothing failed, nothing aborted, yet the outcome is {outcome:?}"
            ));
        }
        if let Some((side, _, Ok(true))) = &self.abort_result {
            if moved {
                f.push("an accepted abort still moved the guest".into());
            }
            if *side == Side::Source && self.crashed.is_none() && outcome != Some(Outcome::Aborted)
            {
                f.push(format!("an accepted operator abort ended {outcome:?}"));
            }
        }
        if let Some((Side::Source, state, Err(msg))) = &self.abort_result
            && !matches!(
                state,
                SourceState::FinishSent
                    | SourceState::Unresolved
                    | SourceState::Confirming { .. }
                    | SourceState::Done
            )
        {
            f.push(format!("abort refused in {state:?}: {msg}"));
        }
        if self.crashed.is_none() {
            // Exactly the features with a succeeded stage, last first.
            let succeeded = |i: usize| {
                self.stage_log.iter().any(|&(side, g, stage, ok)| {
                    side == Side::Destination
                        && g == i
                        && ok
                        && matches!(stage, Stage::Prepare | Stage::Finish)
                })
            };
            let expected: Vec<usize> = if moved {
                Vec::new()
            } else {
                (0..sc.required.len())
                    .rev()
                    .filter(|&i| succeeded(i))
                    .collect()
            };
            let actual = self.dst_rollbacks();
            if actual != expected {
                f.push(format!("rollback order {actual:?}, expected {expected:?}"));
            }
            // Release on the source exactly when the guest moved.
            let released: BTreeSet<usize> = self
                .src_log
                .iter()
                .filter_map(|a| match a {
                    SourceAction::RunStage {
                        feature,
                        stage: Stage::Release,
                    } => Some(*feature),
                    _ => None,
                })
                .collect();
            let all: BTreeSet<usize> = if moved {
                (0..sc.required.len()).collect()
            } else {
                BTreeSet::new()
            };
            if released != all {
                f.push(format!("released {released:?} but moved={moved}"));
            }
        }
        f
    }

    #[track_caller]
    fn assert_ok(&self, settled: bool) {
        let mut failures = self.invariant_failures(settled);
        failures.extend(self.policy_failures());
        assert!(failures.is_empty(), "{failures:#?}\n{}", self.dump());
    }
}

fn recovered_from(r: &Recovered) -> String {
    match r {
        Recovered::Source { from, .. } => format!("source {}", state_name(&format!("{from:?}"))),
        Recovered::Destination { from, .. } => {
            format!("destination {}", state_name(&format!("{from:?}")))
        }
    }
}

/// `Transferring { address: .. }` → `Transferring`; `Confirming { committed: true }` kept whole.
fn state_name(debug: &str) -> String {
    if debug.starts_with("Confirming") {
        return debug.to_string();
    }
    debug
        .split([' ', '{', '('])
        .next()
        .unwrap_or(debug)
        .to_string()
}

fn run(sc: Scenario) -> World {
    let mut w = World::new(sc);
    let settled = w.run();
    w.assert_ok(settled);
    w
}

fn feature_record(w: &World, i: usize) -> &super::record::FeatureRecord {
    &w.src.record.features[i]
}

fn c3() -> proto::Cookie3 {
    proto::Cookie3 {
        protocol_version: PROTOCOL_VERSION,
        attempt_id: "m1.1".into(),
        status: proto::TransferStatus::Completed as i32,
        stats: None,
    }
}

// ---- the happy path and the feature policy -----------------------------------

#[test]
fn happy_path_moves_the_guest_and_releases_the_source() {
    let w = run(Scenario::new(Mode::Safe, &[true, false]));
    assert_eq!(w.src.record.outcome, Some(Outcome::Succeeded));
    assert_eq!(w.src.record.running_on, DST);
    assert_eq!((w.src_guest, w.dst_guest), (Guest::Absent, Guest::Running));
    assert!(w.src_features.is_empty());
    assert_eq!(w.dst_features, BTreeSet::from([0, 1]));
    assert!(
        w.src
            .record
            .phases
            .iter()
            .all(|p| p.status == StepStatus::Ok),
        "{:?}",
        w.src.record.phases
    );
    for i in 0..2 {
        let f = feature_record(&w, i);
        assert_eq!(
            (f.prepare, f.finish, f.release),
            (StepStatus::Ok, StepStatus::Ok, StepStatus::Ok),
            "{f:?}"
        );
    }
    assert!(w.dst_rollbacks().is_empty());
    assert_eq!(w.dst_finished, Some(true));
}

#[test]
fn safe_mode_resumes_source_when_associate_fails_in_finish() {
    let w = run(Scenario::new(Mode::Safe, &[true]).failing(0, Stage::Finish));
    assert_eq!(w.src.record.outcome, Some(Outcome::Failed));
    assert_eq!(w.src.record.running_on, SRC);
    assert_eq!((w.src_guest, w.dst_guest), (Guest::Running, Guest::Absent));
    // The guest was transferred and paused, then resumed by Confirm.
    assert!(w.src_did(|a| matches!(a, SourceAction::SendFinish(_))));
    assert!(w.src_did(|a| matches!(a, SourceAction::ResumeGuest)));
    let f = feature_record(&w, 0);
    assert_eq!(
        (f.prepare, f.finish, f.rollback),
        (StepStatus::Ok, StepStatus::Failed, StepStatus::Ok),
        "{f:?}"
    );
    assert!(
        w.src
            .record
            .error
            .as_deref()
            .unwrap_or("")
            .contains("feat-0"),
        "{:?}",
        w.src.record.error
    );
    assert_eq!(w.src.record.phase(Phase::Finish).status, StepStatus::Failed);
    assert_eq!(w.dst_rollbacks(), vec![0]);
    assert!(w.dst_features.is_empty());
    assert_eq!(w.src_features, BTreeSet::from([0]));
}

#[test]
fn the_record_keeps_each_cookie_the_source_sent_or_received() {
    let names = |w: &World| -> Vec<String> {
        w.src
            .record
            .cookies
            .iter()
            .map(|c| c.name.clone())
            .collect()
    };
    let w = run(Scenario::new(Mode::Safe, &[true]));
    assert_eq!(names(&w), ["C1", "C2", "C3", "C4"]);
    let c = &w.src.record.cookies;
    assert!(
        c.iter()
            .all(|c| c.version == PROTOCOL_VERSION && c.bytes > 0),
        "{c:?}"
    );
    // C1 names what the destination must know; the others start with their verdict.
    assert!(
        c[0].summary.ends_with("safe, mandatory feat-0"),
        "{}",
        c[0].summary
    );
    for (cookie, start) in [
        (&c[1], "accepted, incoming "),
        (&c[2], "transfer completed"),
        (&c[3], "committed; finish feat-0 ok"),
    ] {
        assert!(cookie.summary.starts_with(start), "{cookie:?}");
    }

    // A finish failure: C4 says why the destination did not commit.
    let w = run(Scenario::new(Mode::Safe, &[true]).failing(0, Stage::Finish));
    assert_eq!(names(&w), ["C1", "C2", "C3", "C4"]);
    let c4 = &w.src.record.cookies[3].summary;
    assert!(c4.starts_with("not committed: "), "{c4}");
    assert!(c4.contains("finish feat-0 failed"), "{c4}");
    assert!(c4.contains("rollback feat-0 ok"), "{c4}");

    // A prepare failure ends at C2.
    let w = run(Scenario::new(Mode::Safe, &[true]).failing(0, Stage::Prepare));
    assert_eq!(names(&w), ["C1", "C2"]);
    assert!(w.src.record.cookies[1].summary.starts_with("refused"));
}

#[test]
fn fast_mode_commits_despite_failed_finish_and_reports_degraded() {
    let w = run(Scenario::new(Mode::Fast, &[true, false]).failing(0, Stage::Finish));
    assert_eq!(w.src.record.outcome, Some(Outcome::Degraded));
    assert_eq!(w.src.record.running_on, DST);
    assert_eq!((w.src_guest, w.dst_guest), (Guest::Absent, Guest::Running));
    assert_eq!(feature_record(&w, 0).finish, StepStatus::Failed);
    assert_eq!(feature_record(&w, 1).finish, StepStatus::Ok);
    let error = w.src.record.error.clone().unwrap_or_default();
    assert!(
        error.contains("feat-0"),
        "the degraded record names the feature: {error:?}"
    );
    assert_eq!(
        feature_record(&w, 0).error.as_deref(),
        Some("finish: switch refused finish of feat-0")
    );
    assert!(w.dst_rollbacks().is_empty());
}

#[test]
fn safe_mode_required_prepare_failure_fails_in_prepare_without_transfer() {
    let w = run(Scenario::new(Mode::Safe, &[true, true, false]).failing(1, Stage::Prepare));
    assert_eq!(w.src.record.outcome, Some(Outcome::Failed));
    assert!(
        !w.src_did(|a| matches!(a, SourceAction::StartTransfer { .. })),
        "nothing is transferred"
    );
    assert!(!w.src_did(|a| matches!(a, SourceAction::SendFinish(_))));
    assert_eq!(
        w.src.record.phase(Phase::Prepare).status,
        StepStatus::Failed
    );
    assert_eq!(
        w.src.record.phase(Phase::Perform).status,
        StepStatus::Skipped
    );
    // feat-2's prepare never ran; feat-0's is undone.
    assert!(!w.stage_log.iter().any(|&(_, f, _, _)| f == 2));
    assert_eq!(w.dst_rollbacks(), vec![0]);
    assert_eq!(feature_record(&w, 1).prepare, StepStatus::Failed);
    assert_eq!(
        feature_record(&w, 0).rollback,
        StepStatus::Ok,
        "C2 carries the rollback results"
    );
    assert_eq!(w.src_guest, Guest::Running);
    assert!(
        w.src
            .record
            .error
            .as_deref()
            .unwrap_or("")
            .contains("feat-1"),
        "{:?}",
        w.src.record.error
    );
}

#[test]
fn non_required_failure_in_safe_mode_is_degraded() {
    for stage in [Stage::Prepare, Stage::Finish] {
        let w = run(Scenario::new(Mode::Safe, &[true, false]).failing(1, stage));
        assert_eq!(w.src.record.outcome, Some(Outcome::Degraded), "{stage}");
        assert_eq!(w.src.record.running_on, DST);
        assert_eq!(feature_record(&w, 1).stage(stage), StepStatus::Failed);
        if stage == Stage::Prepare {
            assert_eq!(
                feature_record(&w, 1).finish,
                StepStatus::Skipped,
                "nothing to finish after a failed prepare"
            );
        }
    }
}

#[test]
fn fast_mode_blocks_on_nothing_even_a_required_prepare() {
    let w = run(Scenario::new(Mode::Fast, &[true]).failing(0, Stage::Prepare));
    assert_eq!(w.src.record.outcome, Some(Outcome::Degraded));
    assert_eq!(feature_record(&w, 0).finish, StepStatus::Skipped);
}

#[test]
fn rollback_undoes_exactly_the_succeeded_features_in_reverse_order() {
    // feat-0 ok; feat-1 (not required) fails prepare: nothing to undo;
    // feat-2 ok; feat-3 (required) prepares, then fails finish: undone.
    let sc = Scenario::new(Mode::Safe, &[true, false, true, true])
        .failing(1, Stage::Prepare)
        .failing(3, Stage::Finish);
    let w = run(sc);
    assert_eq!(w.src.record.outcome, Some(Outcome::Failed));
    assert_eq!(w.dst_rollbacks(), vec![3, 2, 0]);
    assert_eq!(
        feature_record(&w, 1).rollback,
        StepStatus::Skipped,
        "never initialised, never rolled back"
    );
    // The rollback starts after the incoming guest is killed.
    let kill = w
        .dst_log
        .iter()
        .position(|a| matches!(a, DestinationAction::KillGuest))
        .expect("killed");
    let first = w.dst_log.iter().position(|a| {
        matches!(
            a,
            DestinationAction::RunStage {
                stage: Stage::Rollback,
                ..
            }
        )
    });
    assert!(first.is_some_and(|r| r > kill));
}

#[test]
fn rollback_of_a_blocking_prepare_failure_skips_the_failed_feature() {
    let w = run(Scenario::new(Mode::Safe, &[false, true, true]).failing(2, Stage::Prepare));
    assert_eq!(w.dst_rollbacks(), vec![1, 0]);
    assert!(w.dst_features.is_empty());
}

#[test]
fn failed_rollback_is_recorded_pending() {
    let sc = Scenario::new(Mode::Safe, &[true, false])
        .failing(0, Stage::Finish)
        .failing(0, Stage::Rollback);
    let w = run(sc);
    assert_eq!(w.src.record.outcome, Some(Outcome::Failed));
    assert_eq!(w.dst_rollbacks(), vec![1, 0]);
    assert!(w.dst_did(|a| matches!(
        a,
        DestinationAction::RecordPending {
            feature: 0,
            stage: Stage::Rollback,
            ..
        }
    )));
    assert_eq!(w.pending, BTreeSet::from([(Side::Destination, 0)]));
    assert_eq!(
        w.dst_features,
        BTreeSet::from([0]),
        "its state stays until a retry works"
    );
    assert_eq!(
        feature_record(&w, 0).rollback,
        StepStatus::Failed,
        "the source record shows it"
    );
    assert_eq!(feature_record(&w, 1).rollback, StepStatus::Ok);
    // Recovery of the journaled destination retries it.
    let mut journaled = w.dst_journal.clone().expect("journaled");
    journaled.state = DestinationState::RollingBack { queue: vec![0] };
    let actions = journaled.recover(w.now);
    assert!(
        actions.contains(&DestinationAction::RunStage {
            feature: 0,
            stage: Stage::Rollback
        }),
        "{actions:?}"
    );
}

#[test]
fn failed_release_is_recorded_pending_on_the_source() {
    let w = run(Scenario::new(Mode::Safe, &[true, true]).failing(1, Stage::Release));
    assert_eq!(w.src.record.outcome, Some(Outcome::Succeeded));
    assert!(w.src_did(|a| matches!(
        a,
        SourceAction::RecordPending {
            feature: 1,
            stage: Stage::Release,
            ..
        }
    )));
    assert_eq!(w.pending, BTreeSet::from([(Side::Source, 1)]));
    assert_eq!(feature_record(&w, 1).release, StepStatus::Failed);
}

#[test]
fn no_capacity_refuses_prepare_and_keeps_the_guest_home() {
    let mut sc = Scenario::new(Mode::Safe, &[true]);
    sc.free = FreeCapacity {
        memory_mib: 1024,
        vcpus: 64,
    };
    let w = run(sc);
    assert_eq!(w.src.record.outcome, Some(Outcome::Failed));
    assert!(w.dst.is_none());
    assert!(
        w.src.record.error.as_deref().unwrap_or("").contains("MiB"),
        "{:?}",
        w.src.record.error
    );
    assert!(
        !w.src_did(|a| matches!(a, SourceAction::SendAbort { .. })),
        "a refusal had no effect to undo"
    );
}

// ---- abort -------------------------------------------------------------------

#[test]
fn abort_during_prepare_perform_leaves_destination_clean() {
    let mut states = BTreeSet::new();
    let mut dst_states = BTreeSet::new();
    for k in 1..200 {
        let mut sc = Scenario::new(Mode::Safe, &[true, false, true]);
        sc.abort_at = Some((k, Side::Source));
        sc.transfer = Transfer::Steps {
            steps: 3,
            tick_ms: 20,
        };
        let mut w = World::new(sc);
        // Note the destination's state when the abort lands.
        let settled = loop {
            if w.steps + 1 == k {
                dst_states.insert(
                    w.dst_state()
                        .map(|d| state_name(&format!("{d:?}")))
                        .unwrap_or_default(),
                );
            }
            if !w.step() {
                break true;
            }
            if w.steps >= MAX_STEPS {
                break false;
            }
        };
        w.assert_ok(settled);
        match &w.abort_result {
            Some((_, state, Ok(true))) => {
                states.insert(state_name(&format!("{state:?}")));
                assert_eq!(w.src.record.outcome, Some(Outcome::Aborted), "{}", w.dump());
                assert_eq!((w.src_guest, w.dst_guest), (Guest::Running, Guest::Absent));
                assert!(w.dst_features.is_empty(), "{}", w.dump());
                assert!(
                    w.dst
                        .as_ref()
                        .is_none_or(|d| d.state == DestinationState::RolledBack),
                    "{}",
                    w.dump()
                );
                assert!(
                    w.src
                        .record
                        .error
                        .as_deref()
                        .unwrap_or("")
                        .contains("operator abort")
                );
            }
            Some((_, _, Err(_))) => break,
            other => panic!("abort at step {k}: {other:?}\n{}", w.dump()),
        }
    }
    assert!(
        states.contains("Preparing") && states.contains("Transferring"),
        "{states:?}"
    );
    for s in ["Starting", "Preparing", "Prepared"] {
        assert!(
            dst_states.iter().any(|d| d.contains(s)),
            "no abort landed while the destination was {s}: {dst_states:?}"
        );
    }
}

#[test]
fn abort_after_finish_sent_is_refused_with_reason() {
    let mut w = World::new(Scenario::new(Mode::Safe, &[true]));
    w.pause_on = Some(Trigger::FinishSent);
    assert!(!w.run());
    assert_eq!(w.src.state, SourceState::FinishSent);
    let err = w.src.abort(w.now, "operator").unwrap_err();
    assert!(
        err.contains("Finish was sent") && err.contains("hv-b"),
        "{err}"
    );
    assert!(err.contains("Migrate the VM back"), "{err}");
    // The destination refuses too once Finish is being carried out.
    w.step();
    assert!(
        matches!(w.dst_state(), Some(DestinationState::Finishing { .. })),
        "{:?}",
        w.dst_state()
    );
    let err = w
        .dst
        .as_mut()
        .expect("destination")
        .abort(w.now, "signal", true)
        .unwrap_err();
    assert!(err.contains("Finish"), "{err}");
    let settled = w.run();
    w.assert_ok(settled);
    assert_eq!(w.src.record.outcome, Some(Outcome::Succeeded));
    let err = w.src.abort(w.now, "operator").unwrap_err();
    assert!(err.contains("already ended (succeeded)"), "{err}");
    let err = w
        .dst
        .as_mut()
        .expect("destination")
        .abort(w.now, "signal", true)
        .unwrap_err();
    assert!(err.contains("committed"), "{err}");
}

#[test]
fn abort_while_committed_but_releasing_is_refused() {
    let mut sc = Scenario::new(Mode::Safe, &[true]);
    sc.stage_latency_ms = 50;
    let mut w = World::new(sc);
    while !matches!(w.src.state, SourceState::Confirming { committed: true }) {
        assert!(w.step(), "{}", w.dump());
    }
    let err = w.src.abort(w.now, "operator").unwrap_err();
    assert!(
        err.contains("committed") && err.contains("Migrate the VM back"),
        "{err}"
    );
}

// ---- liveness -------------------------------------------------------------------

#[test]
fn destination_aborts_when_source_heartbeats_stop_before_finish() {
    let mut w = World::new(Scenario::new(Mode::Safe, &[true, false]));
    w.kill_on = Some((Trigger::PrepareReplied, Side::Source));
    assert!(w.run());
    let dst = w.dst.as_ref().expect("destination");
    assert_eq!(dst.state, DestinationState::RolledBack);
    assert!(
        dst.error.as_deref().unwrap_or("").contains("lost contact"),
        "{:?}",
        dst.error
    );
    assert_eq!(w.dst_guest, Guest::Absent);
    assert!(w.dst_features.is_empty());
    assert_eq!(w.dst_rollbacks(), vec![1, 0]);
    assert!(w.dst_did(|a| matches!(a, DestinationAction::NotifySource { .. })));
    let replied = w
        .triggered
        .iter()
        .find(|t| t.0 == Trigger::PrepareReplied)
        .expect("replied")
        .2;
    let peer_timeout = Timing::default().peer_timeout_ms;
    assert!(
        w.now >= replied + peer_timeout && w.now <= replied + peer_timeout + 100,
        "gave up at {}",
        w.now
    );
    assert_eq!(
        w.src_guest,
        Guest::Running,
        "the dead source never paused its guest"
    );
}

#[test]
fn destination_timer_does_not_spin_while_a_stage_is_in_flight() {
    // The source dies while a slow prepare stage runs: the destination
    // decides to abort at the peer timeout, waits for the stage, rolls back.
    let mut sc = Scenario::new(Mode::Safe, &[true]);
    sc.stage_latency_ms = 8_000;
    let mut w = World::new(sc);
    w.kill_on = Some((Trigger::PrepareSent, Side::Source));
    let settled = w.run();
    assert!(w.violations.is_empty(), "{:#?}", w.violations);
    assert!(settled, "{}", w.dump());
    assert_eq!(
        w.dst_state(),
        Some(&DestinationState::RolledBack),
        "{}",
        w.dump()
    );
    assert!(w.dst_features.is_empty());
    assert_eq!(w.dst_rollbacks(), vec![0]);
}

#[test]
fn destination_carries_finish_through_without_source() {
    // Finish stages slower than the peer timeout, and the source gone.
    let mut sc = Scenario::new(Mode::Safe, &[true, true]);
    sc.stage_latency_ms = 3_000;
    let mut w = World::new(sc);
    w.kill_on = Some((Trigger::FinishSent, Side::Source));
    assert!(w.run());
    assert!(w.violations.is_empty(), "{:#?}", w.violations);
    let dst = w.dst.as_ref().expect("destination");
    assert_eq!(dst.state, DestinationState::Committed, "{}", w.dump());
    assert_eq!(w.dst_guest, Guest::Running);
    assert_eq!(w.src_guest, Guest::Paused);
    let sent = w
        .triggered
        .iter()
        .find(|t| t.0 == Trigger::FinishSent)
        .expect("sent")
        .2;
    assert!(
        w.now - sent > Timing::default().peer_timeout_ms,
        "Finish took longer than the peer timeout"
    );
}

#[test]
fn source_resumes_when_destination_silent_for_peer_timeout() {
    let mut sc = Scenario::new(Mode::Safe, &[true]);
    sc.transfer = Transfer::Steps {
        steps: 30,
        tick_ms: 1_000,
    };
    let mut w = World::new(sc);
    w.partition_on = Some(Trigger::TransferStarted);
    let settled = w.run();
    w.assert_ok(settled);
    assert_eq!(w.src.record.outcome, Some(Outcome::Failed));
    assert!(
        w.src
            .record
            .error
            .as_deref()
            .unwrap_or("")
            .contains("lost contact"),
        "{:?}",
        w.src.record.error
    );
    assert!(w.src_did(|a| matches!(a, SourceAction::CancelTransfer)));
    let gave_up = w
        .src_log
        .iter()
        .position(|a| matches!(a, SourceAction::CancelTransfer))
        .expect("cancelled");
    assert!(
        w.src_log[gave_up..]
            .iter()
            .any(|a| matches!(a, SourceAction::ResumeGuest))
    );
    assert_eq!(w.src_guest, Guest::Running);
    assert_eq!(
        w.dst_state(),
        Some(&DestinationState::RolledBack),
        "the destination gave up on its own"
    );
    assert!(w.dst_features.is_empty());
    let ended = w
        .src
        .record
        .phases
        .iter()
        .map(|p| p.duration_ms)
        .sum::<u64>();
    assert!(
        ended <= Timing::default().peer_timeout_ms + 1_100,
        "gave up after {ended} ms"
    );
}

#[test]
fn heartbeats_keep_a_long_transfer_alive() {
    let mut sc = Scenario::new(Mode::Safe, &[true]);
    sc.transfer = Transfer::Steps {
        steps: 30,
        tick_ms: 1_000,
    };
    let w = run(sc);
    assert_eq!(w.src.record.outcome, Some(Outcome::Succeeded));
    assert!(w.src_did(|a| matches!(a, SourceAction::SendHeartbeat)));
}

#[test]
fn transfer_stall_aborts_and_resumes_source() {
    let mut sc = Scenario::new(Mode::Safe, &[true, false]);
    sc.transfer = Transfer::Stall;
    let w = run(sc);
    assert_eq!(w.src.record.outcome, Some(Outcome::Failed));
    let error = w.src.record.error.clone().unwrap_or_default();
    assert!(error.contains("no progress"), "{error}");
    assert!(w.src_did(|a| matches!(a, SourceAction::CancelTransfer)));
    assert!(w.src_did(|a| matches!(a, SourceAction::SendAbort { .. })));
    assert!(
        w.src_did(|a| matches!(a, SourceAction::SendHeartbeat)),
        "the peer was alive all along"
    );
    assert_eq!((w.src_guest, w.dst_guest), (Guest::Running, Guest::Absent));
    assert_eq!(w.dst_state(), Some(&DestinationState::RolledBack));
    assert_eq!(
        w.src.record.phase(Phase::Perform).status,
        StepStatus::Failed
    );
    let started = w
        .triggered
        .iter()
        .find(|t| t.0 == Trigger::TransferStarted)
        .expect("started")
        .2;
    let stall = Timing::default().stall_timeout_ms;
    assert!(w.src.record.phase(Phase::Perform).duration_ms >= stall);
    assert!(w.now >= started + stall);
}

// ---- the unknown outcome ---------------------------------------------------------

#[test]
fn lost_finish_reply_makes_attempt_unresolved_and_never_resumes_source() {
    let mut w = World::new(Scenario::new(Mode::Safe, &[true]));
    // Finish reaches the destination, which commits; its answer is lost and
    // the destination cannot be reached for a minute.
    w.partition_on = Some(Trigger::FinishArrived);
    w.run_until(START + 60_000);
    assert_eq!(w.src.state, SourceState::Unresolved, "{}", w.dump());
    assert_eq!(w.src.record.outcome, Some(Outcome::Unresolved));
    assert_eq!(w.src_guest, Guest::Paused);
    assert_eq!(
        w.dst_guest,
        Guest::Running,
        "the destination carried Finish through"
    );
    assert!(!w.src_did(|a| matches!(a, SourceAction::ResumeGuest)));
    assert!(
        !w.src_did(|a| matches!(a, SourceAction::Finished(_))),
        "an unresolved attempt stays locked"
    );
    let resolves = w
        .src_log
        .iter()
        .filter(|a| matches!(a, SourceAction::SendResolve))
        .count();
    assert!(
        (5..60).contains(&resolves),
        "Resolve is retried with backoff: {resolves}"
    );
    assert!(w.src_timer_fires >= resolves);
    assert!(
        w.src
            .record
            .error
            .as_deref()
            .unwrap_or("")
            .contains("paused"),
        "{:?}",
        w.src.record.error
    );
    // Timers that fire on their own, at any time, change nothing.
    for i in 0..50 {
        let actions = w.src.handle(w.now + i * 777, SourceInput::Timer);
        assert!(
            actions
                .iter()
                .all(|a| matches!(a, SourceAction::SendResolve)),
            "{actions:?}"
        );
        w.src.handle(
            w.now + i * 777 + 1,
            SourceInput::ResolveReplied(Err(unreachable_peer())),
        );
    }
    // Neither a recovery nor an abort resumes it.
    let mut journaled = w.src_journal.clone().expect("journaled");
    assert!(
        !journaled
            .recover(w.now)
            .iter()
            .any(|a| matches!(a, SourceAction::ResumeGuest))
    );
    assert!(w.src.abort(w.now, "operator").is_err());
    // The partition heals: Resolve learns it committed.
    w.partitioned = false;
    let settled = w.run();
    w.assert_ok(settled);
    assert_eq!(w.src.record.outcome, Some(Outcome::Succeeded));
    assert_eq!(w.src_guest, Guest::Absent);
}

#[test]
fn lost_finish_request_stays_unresolved_until_destination_answers_not_committed() {
    let mut w = World::new(Scenario::new(Mode::Safe, &[true]));
    // Finish never arrives: the destination gives up on its own and rolls
    // back, but the source cannot know that and must not guess.
    w.partition_on = Some(Trigger::FinishSent);
    w.run_until(START + 60_000);
    assert_eq!(w.src.record.outcome, Some(Outcome::Unresolved));
    assert_eq!(w.dst_state(), Some(&DestinationState::RolledBack));
    assert_eq!((w.src_guest, w.dst_guest), (Guest::Paused, Guest::Absent));
    assert!(!w.src_did(|a| matches!(a, SourceAction::ResumeGuest)));
    w.partitioned = false;
    let settled = w.run();
    w.assert_ok(settled);
    assert_eq!(w.src.record.outcome, Some(Outcome::Failed));
    assert_eq!(w.src_guest, Guest::Running);
}

#[test]
fn resolve_not_committed_is_journaled_before_answer() {
    // Prepared: the answer is journaled as a rollback first.
    let mut w = World::new(Scenario::new(Mode::Safe, &[true, false]));
    w.pause_on = Some(Trigger::PrepareReplied);
    assert!(!w.run());
    assert_eq!(w.dst_state(), Some(&DestinationState::Prepared));
    let now = w.now;
    let dst = w.dst.as_mut().expect("destination");
    let (answer, actions) = dst.resolve(now);
    assert_eq!(answer, Some(false));
    let Some(DestinationAction::Journal(snapshot)) = actions.first() else {
        panic!("{actions:?}")
    };
    assert!(
        matches!(snapshot.state, DestinationState::RollingBack { .. }),
        "{:?}",
        snapshot.state
    );
    let mut restarted = (**snapshot).clone();
    assert!(
        !restarted
            .recover(now)
            .contains(&DestinationAction::ResumeGuest)
    );
    // It never commits afterwards, even when Finish arrives.
    let reply = dst.handle(now, DestinationInput::Finish(c3()));
    assert!(
        !reply
            .iter()
            .any(|a| matches!(a, DestinationAction::ResumeGuest)),
        "{reply:?}"
    );
    assert!(!dst.is_committed());
    assert_eq!(dst.resolve(now).0, Some(false));

    // A stage in flight: the decision is journaled at once, acted on later.
    let sc = Scenario::new(Mode::Safe, &[true]);
    let c1 = cookies::cookie1("m1.1", "m1", SRC, &sc.vm(), Mode::Safe);
    let incoming = check_cookie1(&c1, |_| true).expect("C1");
    let (mut dst, _) = DestinationAttempt::prepare(
        incoming,
        DST,
        sc.free,
        false,
        None,
        Timing::default(),
        START,
    )
    .expect("prepared");
    dst.handle(
        START,
        DestinationInput::IncomingStarted(Ok("sim://x".into())),
    );
    assert_eq!(dst.state, DestinationState::Preparing { next: 0 });
    let (answer, actions) = dst.resolve(START + 1);
    assert_eq!(answer, Some(false));
    let Some(DestinationAction::Journal(snapshot)) = actions.first() else {
        panic!("{actions:?}")
    };
    let mut restarted = (**snapshot).clone();
    let recovered = restarted.recover(START + 2);
    assert!(
        recovered.contains(&DestinationAction::KillGuest)
            && !recovered.contains(&DestinationAction::ResumeGuest)
    );
    let actions = dst.handle(
        START + 3,
        DestinationInput::StageDone {
            feature: 0,
            stage: Stage::Prepare,
            result: Ok("ok".into()),
        },
    );
    assert!(
        actions.contains(&DestinationAction::RunStage {
            feature: 0,
            stage: Stage::Rollback
        }),
        "{actions:?}"
    );
    assert!(actions.contains(&DestinationAction::KillGuest));
    let actions = dst.handle(START + 4, DestinationInput::Finish(c3()));
    assert!(!actions.contains(&DestinationAction::ResumeGuest));
    assert_eq!(dst.resolve(START + 5).0, Some(false));
}

#[test]
fn resolve_while_finishing_is_pending_and_after_commit_is_committed() {
    let mut w = World::new(Scenario::new(Mode::Safe, &[true]));
    w.pause_on = Some(Trigger::FinishArrived);
    w.run();
    w.step();
    let now = w.now;
    let dst = w.dst.as_mut().expect("destination");
    assert!(matches!(dst.state, DestinationState::Finishing { .. }));
    assert_eq!(dst.resolve(now), (None, Vec::new()));
    let settled = w.run();
    w.assert_ok(settled);
    let now = w.now;
    assert_eq!(
        w.dst.as_mut().expect("destination").resolve(now),
        (Some(true), Vec::new())
    );
}

#[test]
fn finish_arriving_during_a_rollback_is_answered() {
    // The destination's agent stops (SIGTERM) while Finish is on its way:
    // the rollback must end with an answer to Finish, or the source waits
    // for it forever.
    let mut sc = Scenario::new(Mode::Safe, &[true, true]);
    sc.stage_latency_ms = 20;
    let mut w = World::new(sc);
    w.pause_on = Some(Trigger::FinishSent);
    assert!(!w.run());
    w.inject_abort(Side::Destination);
    assert!(w.abort_accepted());
    let settled = w.run();
    w.assert_ok(settled);
    assert_eq!(w.src.record.outcome, Some(Outcome::Failed));
    assert_eq!(w.src_guest, Guest::Running);
    assert!(
        w.now < START + 1_000,
        "answered at once, not after a timeout: {}",
        w.now
    );
}

#[test]
fn force_resolve_to_source_resumes_source() {
    let mut w = World::new(Scenario::new(Mode::Safe, &[true]));
    assert!(
        w.src.force_resolve(w.now, RunOn::Source).is_err(),
        "only an unresolved attempt can be forced"
    );
    w.partition_on = Some(Trigger::FinishSent);
    w.run_until(START + 30_000);
    assert_eq!(w.src.state, SourceState::Unresolved);
    let actions = w.src.force_resolve(w.now, RunOn::Source).expect("forced");
    assert!(actions.contains(&SourceAction::ResumeGuest), "{actions:?}");
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, SourceAction::SendAbort { .. }))
    );
    assert!(actions.contains(&SourceAction::Finished(Outcome::Failed)));
    assert!(
        matches!(actions.first(), Some(SourceAction::Journal(_))),
        "journaled first: {actions:?}"
    );
    w.exec_source(actions);
    assert_eq!(w.src_guest, Guest::Running);
    assert_eq!(w.src.record.running_on, SRC);
    let error = w.src.record.error.clone().unwrap_or_default();
    assert!(
        error.contains("operator forced") && error.contains("never read"),
        "{error}"
    );
    w.partitioned = false;
    let settled = w.run();
    w.assert_ok(settled);
}

#[test]
fn force_resolve_to_destination_kills_and_releases_here() {
    let mut w = World::new(Scenario::new(Mode::Safe, &[true, false]));
    w.partition_on = Some(Trigger::FinishArrived);
    w.run_until(START + 30_000);
    assert_eq!(w.src.state, SourceState::Unresolved);
    let actions = w
        .src
        .force_resolve(w.now, RunOn::Destination)
        .expect("forced");
    assert!(actions.contains(&SourceAction::KillGuest), "{actions:?}");
    assert!(!actions.contains(&SourceAction::ResumeGuest));
    w.exec_source(actions);
    w.partitioned = false;
    let settled = w.run();
    w.assert_ok(settled);
    assert_eq!(w.src.record.running_on, DST);
    assert_eq!(
        w.src.record.outcome,
        Some(Outcome::Degraded),
        "a forced decision is never a clean success"
    );
}

// ---- recovery ------------------------------------------------------------------

fn check_recovery_table(r: &Recovered) {
    match r {
        Recovered::Source { from, actions } => {
            let has = |p: &dyn Fn(&SourceAction) -> bool| actions.iter().any(p);
            let resumes = has(&|a| matches!(a, SourceAction::ResumeGuest));
            let kills = has(&|a| matches!(a, SourceAction::KillGuest));
            match from {
                SourceState::Preparing => {
                    assert!(
                        has(&|a| matches!(a, SourceAction::SendAbort { .. })),
                        "{actions:?}"
                    );
                    assert!(
                        has(&|a| matches!(a, SourceAction::Finished(Outcome::Aborted))),
                        "{actions:?}"
                    );
                    assert!(!kills, "{actions:?}");
                }
                SourceState::Transferring { .. } | SourceState::Aborting { .. } => {
                    assert!(
                        has(&|a| matches!(a, SourceAction::CancelTransfer)),
                        "{actions:?}"
                    );
                    assert!(resumes && !kills, "{actions:?}");
                    assert!(
                        has(&|a| matches!(a, SourceAction::SendAbort { .. })),
                        "{actions:?}"
                    );
                    assert!(
                        has(&|a| matches!(a, SourceAction::Finished(_))),
                        "{actions:?}"
                    );
                }
                SourceState::FinishSent | SourceState::Unresolved => {
                    assert!(!resumes && !kills, "never resumes on its own: {actions:?}");
                    assert!(
                        matches!(actions.as_slice(), [SourceAction::Journal(j)] if j.state == SourceState::Unresolved),
                        "{actions:?}"
                    );
                }
                SourceState::Confirming { committed: true } => {
                    assert!(kills && !resumes, "{actions:?}");
                    assert!(
                        has(&|a| matches!(
                            a,
                            SourceAction::RunStage {
                                stage: Stage::Release,
                                ..
                            }
                        )),
                        "{actions:?}"
                    );
                }
                SourceState::Confirming { committed: false } => {
                    assert!(resumes && !kills, "{actions:?}");
                    assert!(
                        has(&|a| matches!(a, SourceAction::Finished(Outcome::Failed))),
                        "{actions:?}"
                    );
                }
                SourceState::Done => assert!(actions.is_empty(), "{actions:?}"),
            }
        }
        Recovered::Destination { from, actions } => {
            let resumes = actions.contains(&DestinationAction::ResumeGuest);
            let kills = actions.contains(&DestinationAction::KillGuest);
            match from {
                DestinationState::Starting
                | DestinationState::Preparing { .. }
                | DestinationState::Prepared
                | DestinationState::Finishing { .. } => {
                    assert!(kills && !resumes, "{actions:?}");
                    assert!(
                        matches!(actions.first(), Some(DestinationAction::Journal(j)) if matches!(j.state, DestinationState::RollingBack { .. })),
                        "the decision is journaled first: {actions:?}"
                    );
                }
                DestinationState::RollingBack { .. } => assert!(kills && !resumes, "{actions:?}"),
                DestinationState::Committed => {
                    assert!(
                        matches!(
                            actions.as_slice(),
                            [
                                DestinationAction::ResumeGuest,
                                DestinationAction::Journal(j),
                                DestinationAction::Finished { committed: true }
                            ] if j.is_finished()
                        ),
                        "{actions:?}"
                    )
                }
                DestinationState::RolledBack => assert!(actions.is_empty(), "{actions:?}"),
            }
        }
    }
}

#[test]
fn recovery_of_each_journaled_state_follows_the_table() {
    let mut scenarios = vec![
        (Scenario::new(Mode::Safe, &[true, false]), None),
        (
            Scenario::new(Mode::Safe, &[true]).failing(0, Stage::Finish),
            None,
        ),
        (
            Scenario::new(Mode::Fast, &[true, false])
                .failing(1, Stage::Prepare)
                .failing(0, Stage::Finish),
            None,
        ),
        (
            Scenario::new(Mode::Safe, &[true, true]).failing(1, Stage::Prepare),
            None,
        ),
        (
            Scenario::new(Mode::Safe, &[true, false])
                .failing(0, Stage::Finish)
                .failing(1, Stage::Rollback),
            None,
        ),
        (
            Scenario::new(Mode::Safe, &[true]).failing(0, Stage::Release),
            None,
        ),
        // Finish's answer lost for 30 s: the source journals Unresolved.
        (
            Scenario::new(Mode::Safe, &[true]),
            Some(Trigger::FinishArrived),
        ),
    ];
    // An operator abort during the transfer: the source journals Aborting.
    let mut abort = Scenario::new(Mode::Safe, &[true]);
    abort.transfer = Transfer::Steps {
        steps: 3,
        tick_ms: 50,
    };
    let baseline = run(abort.clone());
    let started = baseline
        .triggered
        .iter()
        .find(|t| t.0 == Trigger::TransferStarted)
        .expect("started")
        .1;
    abort.abort_at = Some((started + 2, Side::Source));
    scenarios.push((abort, None));

    let mut covered = BTreeSet::new();
    for (sc, partition) in scenarios {
        let mut baseline = World::new(sc.clone());
        baseline.partition_on = partition;
        baseline.heal_after = Some(30_000);
        let settled = baseline.run();
        baseline.assert_ok(settled);
        for side in [Side::Source, Side::Destination] {
            let writes = baseline.journal_writes[side as usize];
            assert!(writes > 0);
            for k in 1..=writes {
                let mut sc = sc.clone();
                sc.crash_at = Some((side, k));
                let mut w = World::new(sc);
                w.partition_on = partition;
                w.heal_after = Some(30_000);
                let settled = w.run();
                w.assert_ok(settled);
                assert_eq!(w.recoveries.len(), 1, "{}", w.dump());
                for r in &w.recoveries {
                    check_recovery_table(r);
                    covered.insert(recovered_from(r));
                }
            }
        }
    }
    for state in [
        "source Preparing",
        "source Transferring",
        "source Aborting",
        "source FinishSent",
        "source Unresolved",
        "source Confirming { committed: true }",
        "source Confirming { committed: false }",
        "source Done",
        "destination Starting",
        "destination Preparing",
        "destination Prepared",
        "destination Finishing",
        "destination RollingBack",
        "destination Committed",
        "destination RolledBack",
    ] {
        assert!(
            covered.contains(state),
            "no crash recovered from {state}: {covered:?}"
        );
    }
}

#[test]
fn destination_restart_while_rolling_back_redoes_the_rollback() {
    // Crash right after the RollingBack journal write: nothing was undone yet.
    let sc = Scenario::new(Mode::Safe, &[true, true]).failing(1, Stage::Finish);
    let baseline = run(sc.clone());
    let k = baseline
        .dst_log
        .iter()
        .filter(|a| matches!(a, DestinationAction::Journal(_)))
        .position(|a| matches!(a, DestinationAction::Journal(j) if matches!(j.state, DestinationState::RollingBack { .. })))
        .expect("rolled back")
        + 1;
    let mut sc = sc;
    sc.crash_at = Some((Side::Destination, k));
    let w = run(sc);
    assert!(w.dst_features.is_empty(), "{}", w.dump());
    assert_eq!(w.src.record.outcome, Some(Outcome::Failed));
}

// ---- the property ----------------------------------------------------------------

fn side() -> impl Strategy<Value = Side> {
    prop_oneof![Just(Side::Source), Just(Side::Destination)]
}

fn scenario() -> impl Strategy<Value = Scenario> {
    let feature = (any::<bool>(), [prop::bool::weighted(0.25); 4]);
    (
        prop_oneof![Just(Mode::Fast), Just(Mode::Safe)],
        prop::collection::vec(feature, 1..=3),
        prop_oneof![2 => Just(None), 1 => (1usize..60, side()).prop_map(Some)],
        prop_oneof![2 => Just(None), 1 => (side(), 1usize..16).prop_map(|(s, k)| Some((s, k)))],
        prop_oneof![
            3 => Just(None),
            1 => (1usize..60, prop_oneof![Just(2_000u64), Just(8_000u64), Just(40_000u64)]).prop_map(Some)
        ],
        prop_oneof![
            8 => (0u32..4).prop_map(|steps| Transfer::Steps { steps, tick_ms: 3 }),
            1 => Just(Transfer::Fails),
            1 => Just(Transfer::Stall),
        ],
        prop_oneof![8 => Just(Incoming::Ok), 1 => Just(Incoming::StartFails), 1 => Just(Incoming::CompleteFails)],
        prop_oneof![3 => Just(1u64), 1 => Just(7u64), 1 => Just(3_000u64)],
    )
        .prop_map(|(mode, features, abort_at, crash_at, partition_at, transfer, incoming, stage_latency_ms)| {
            let mut sc = Scenario::new(mode, &features.iter().map(|f| f.0).collect::<Vec<_>>());
            for (i, (_, fails)) in features.iter().enumerate() {
                for (stage, fail) in [Stage::Prepare, Stage::Finish, Stage::Rollback, Stage::Release].into_iter().zip(fails) {
                    if *fail {
                        sc.fail.insert((i, stage));
                    }
                }
            }
            sc.abort_at = abort_at;
            sc.crash_at = crash_at;
            sc.partition_at = partition_at;
            sc.transfer = transfer;
            sc.incoming = incoming;
            sc.stage_latency_ms = stage_latency_ms;
            sc
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn every_fault_schedule_keeps_the_invariants(sc in scenario()) {
        let mut w = World::new(sc);
        let settled = w.run();
        let mut failures = w.invariant_failures(settled);
        failures.extend(w.policy_failures());
        for r in &w.recoveries {
            check_recovery_table(r);
        }
        prop_assert!(failures.is_empty(), "{:#?}\n{}", failures, w.dump());
    }
}

#[test]
fn failed_transfer_resumes_the_source_and_rolls_back() {
    let mut sc = Scenario::new(Mode::Safe, &[true, false]);
    sc.transfer = Transfer::Fails;
    let w = run(sc);
    assert_eq!(w.src.record.outcome, Some(Outcome::Failed));
    assert!(
        w.src
            .record
            .error
            .as_deref()
            .unwrap_or("")
            .contains("transfer failed")
    );
    assert_eq!(
        w.src.record.phase(Phase::Perform).status,
        StepStatus::Failed
    );
    assert_eq!(w.dst_rollbacks(), vec![1, 0]);
}

#[test]
fn incoming_guest_that_cannot_start_refuses_prepare() {
    let mut sc = Scenario::new(Mode::Fast, &[true]);
    sc.incoming = Incoming::StartFails;
    let w = run(sc);
    assert_eq!(w.src.record.outcome, Some(Outcome::Failed));
    assert!(
        w.src
            .record
            .error
            .as_deref()
            .unwrap_or("")
            .contains("could not start"),
        "{:?}",
        w.src.record.error
    );
    assert!(w.stage_log.is_empty(), "no feature was touched");
    assert!(!w.src_did(|a| matches!(a, SourceAction::StartTransfer { .. })));
}

#[test]
fn incoming_transfer_that_does_not_arrive_fails_in_finish_even_in_fast_mode() {
    let mut sc = Scenario::new(Mode::Fast, &[true, false]);
    sc.incoming = Incoming::CompleteFails;
    let w = run(sc);
    assert_eq!(w.src.record.outcome, Some(Outcome::Failed));
    assert_eq!(w.src.record.phase(Phase::Finish).status, StepStatus::Failed);
    assert_eq!(w.dst_rollbacks(), vec![1, 0]);
    assert_eq!(w.src_guest, Guest::Running);
}

// ---- found by the simulator (src/simulation/) -------------------------------------

/// The destination journaled `Committed` and died before starting the
/// guest's CPUs: the journal row must stay open and recovery must resume it.
#[test]
fn committed_destination_that_died_before_resuming_resumes_the_guest_after_restart() {
    let w = run(Scenario::new(Mode::Safe, &[true]));
    let committed = w
        .dst_log
        .iter()
        .find_map(|a| match a {
            DestinationAction::Journal(j) if j.state == DestinationState::Committed => {
                Some(j.clone())
            }
            _ => None,
        })
        .expect("a commit was journaled");
    assert!(
        !committed.is_finished(),
        "the commit snapshot written before ResumeGuest must stay open in the journal"
    );
    let mut recovered = *committed;
    let actions = recovered.recover(START + 10_000);
    assert!(
        matches!(actions.first(), Some(DestinationAction::ResumeGuest)),
        "{actions:?}"
    );
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, DestinationAction::Journal(j) if j.is_finished())),
        "the attempt is closed once the guest runs: {actions:?}"
    );
    assert!(recovered.is_finished());
    // And the normal path closes it right after the resume.
    let resume = w
        .dst_log
        .iter()
        .position(|a| matches!(a, DestinationAction::ResumeGuest))
        .expect("resumed");
    assert!(
        matches!(&w.dst_log[resume + 1], DestinationAction::Journal(j) if j.is_finished()),
        "{:?}",
        &w.dst_log[resume..]
    );
}

/// A pending rollback or release of a VM on a host, or an attempt of it still
/// undoing its features there, makes a new Prepare of that VM wait: the old
/// rollback would otherwise tear down the new attempt's state.
#[test]
fn prepare_is_refused_while_an_earlier_attempt_of_the_vm_still_has_state_to_undo_here() {
    use super::destination::{Leftover, PrepareRefusal, busy_with};
    let leftovers = [Leftover::Pending {
        attempt_id: "m-1.1",
        feature: "port-profile",
        stage: Stage::Rollback,
    }];
    let busy = busy_with("web-01", DST, &leftovers).expect("busy");
    assert!(busy.contains("pending rollback of port-profile"), "{busy}");
    assert!(busy.contains("tern rollback"), "{busy}");
    let running = [Leftover::Running {
        attempt_id: "m-1.1",
    }];
    let busy_running = busy_with("web-01", DST, &running).expect("busy");
    assert!(busy_running.contains("m-1.1"), "{busy_running}");
    assert_eq!(busy_with("web-01", DST, &[]), None);

    let sc = Scenario::new(Mode::Safe, &[true]);
    let c1 = super::cookies::cookie1("m-2.1", "m-2", SRC, &sc.vm(), Mode::Safe);
    let incoming = check_cookie1(&c1, |_| true).expect("C1");
    let refused = DestinationAttempt::prepare(
        incoming,
        DST,
        sc.free,
        false,
        Some(busy.clone()),
        Timing::default(),
        START,
    );
    assert_eq!(refused.err(), Some(PrepareRefusal::Busy(busy)));
}

/// A duplicated Prepare that arrived after its attempt had rolled back
/// started the attempt again and overwrote its journaled decision; a late
/// Finish could then have committed it behind the resumed source's back.
#[test]
fn a_repeated_prepare_of_an_attempt_that_ended_here_is_refused() {
    use super::destination::{Known, PrepareRefusal, check_new_attempt};
    assert_eq!(check_new_attempt("m-1.1", DST, Known::default()), Ok(()));
    let ended = Known {
        journaled: true,
        ..Known::default()
    };
    match check_new_attempt("m-1.1", DST, ended) {
        Err(PrepareRefusal::AlreadyHere(m)) => assert!(m.contains("already ran"), "{m}"),
        other => panic!("{other:?}"),
    }
    let running = Known {
        running: true,
        ..Known::default()
    };
    assert!(matches!(
        check_new_attempt("m-1.1", DST, running),
        Err(PrepareRefusal::AlreadyHere(_))
    ));
    let aborted = Known {
        aborted: true,
        journaled: true,
        ..Known::default()
    };
    assert!(matches!(
        check_new_attempt("m-1.1", DST, aborted),
        Err(PrepareRefusal::Aborted(_))
    ));
}
