//! The host core: everything one host decides around its attempts, as a
//! sans-IO state machine in the style of quinn-proto. It owns admission
//! (locks, limits, capacity, tombstones, drain), the sequencing of each
//! attempt's actions and of the hypervisor's and drivers' answers (with a
//! deadline on every one of them), pending work, shutdown, recovery from
//! the journal, and the evacuation jobs.
//!
//! Inputs go in through [`HostCore::handle`] (a request from a console or a
//! peer, a peer's reply, the end of a hypervisor call or stage, a timer, a
//! signal) with the time as a parameter; [`Action`]s come out (write the
//! journal, call a peer, answer a request, run a hypervisor call or a
//! stage, publish an event, exit). [`HostCore::poll_timeout`] says when the
//! next timer is due.
//!
//! Two drivers carry the actions out: the tokio agent (`crate::agent`), with
//! gRPC, SQLite, the hypervisor and the feature drivers; and the
//! deterministic simulator (`crate::simulation`), with a simulated network,
//! disk, hypervisor and switch. Both run this code, so what the simulator
//! proves is what the agent runs.
//!
//! Journal writes come in order and are executed in order, before whatever
//! follows them. A write marked `durable` must survive a power loss of the
//! host before anything after it is done: those are the decisions another
//! host acts on (a commit, a "never commits", a tombstone, pending work) and
//! the write before a feature stage touches something outside this host.
//! The others may be lost with the host's power; recovery is right either
//! way.

pub mod admission;
mod attempts;
pub mod evacuation;
mod pending;
mod repair;
mod requests;
pub mod retention;
#[cfg(test)]
mod tests;

use crate::protocol::completion::CompletionRequest;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::config::AgentConfig;
use crate::features::StageContext;
use crate::hypervisor::{Guest, HostCapacity};
use crate::proto;
use crate::protocol::bounds::IdKind;
use crate::protocol::destination::{Answer, DestinationAttempt};
use crate::protocol::record::MigrationRecord;
use crate::protocol::source::SourceAttempt;
use crate::protocol::{Millis, Mode, RunOn, Stage, Timing, TransferStats, VmSpec};

pub use admission::Check;
pub use evacuation::Request as EvacuationRequest;
pub use evacuation::job::{Control, Evacuation};
pub use pending::{Pending, Work};
pub use retention::{Pruned, Retention};

/// A request's id, chosen by the driver; its answer is an [`Action::Reply`]
/// with the same id.
pub type ReqId = u64;

/// A hypervisor call or stage the core asked for ([`Action::Run`]).
pub type OpId = u64;

/// A call to another agent the core asked for ([`Action::Call`]).
pub type CallId = u64;

/// How long the core waits for each kind of answer before it takes the call
/// as failed with an unknown effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deadlines {
    /// A feature stage.
    pub stage_ms: Millis,
    /// Resume, kill, pause, status, cancel of a transfer.
    pub guest_op_ms: Millis,
    /// Starting the incoming guest (QEMU may take 15 s).
    pub incoming_start_ms: Millis,
    /// The incoming transfer arriving, once the source says it is complete.
    pub incoming_complete_ms: Millis,
    /// A host's answer to `Capacity` during an evacuation pass.
    pub capacity_ms: Millis,
    /// How long a stopping agent waits for its attempts before it exits.
    pub stop_grace_ms: Millis,
}

impl Deadlines {
    /// The deadlines an agent's configuration asks for; the Capacity
    /// deadline of an evacuation pass is not configurable.
    pub fn from_config(config: &AgentConfig) -> Deadlines {
        Deadlines {
            stage_ms: config.stage_timeout_ms,
            guest_op_ms: config.guest_op_timeout_ms,
            incoming_start_ms: config.incoming_start_timeout_ms,
            incoming_complete_ms: config.incoming_complete_timeout_ms,
            stop_grace_ms: config.stop_grace_ms,
            ..Deadlines::default()
        }
    }
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines {
            stage_ms: 60_000,
            guest_op_ms: 30_000,
            incoming_start_ms: 60_000,
            incoming_complete_ms: 60_000,
            capacity_ms: 1_000,
            stop_grace_ms: 10_000,
        }
    }
}

/// What a host core is configured with.
#[derive(Debug, Clone)]
pub struct Config {
    pub name: String,
    /// Every host of the inventory, in its order.
    pub hosts: Vec<String>,
    /// host → the host (normalised, `protocol::address`) its incoming
    /// addresses must name: the inventory's `migration_address`, or the
    /// host's name on the simulated hypervisor. A source sends a guest to
    /// no other.
    pub migration_hosts: BTreeMap<String, String>,
    /// The features this host has drivers for: name → driver.
    pub features: BTreeMap<String, String>,
    /// The features whose drivers check their work after a guest resumed
    /// here (`Feature::verifies`).
    pub verifying: BTreeSet<String>,
    pub capacity: HostCapacity,
    pub timing: Timing,
    pub deadlines: Deadlines,
    pub max_outgoing: u32,
    pub max_incoming: u32,
    /// First wait before failed pending work is retried; doubles up to 5 min.
    pub rollback_retry_ms: Millis,
    /// Mixed into the ids this host makes, so that hosts, and restarts of
    /// one host, do not make the same ones (the agent draws it at random;
    /// the simulator from its seed).
    pub id_salt: u64,
    /// How many closed records are kept, and how long ([`retention`]).
    pub retention: Retention,
    /// Whether this host's hypervisor can receive by post-copy; why not.
    pub postcopy: Result<(), String>,
}

/// What a console, the CLI or a peer asks of this host.
#[derive(Debug, Clone)]
pub enum Request {
    StartMigration {
        vm: String,
        destination: String,
        mode: Mode,
        /// Over the mode's default.
        completion: CompletionRequest,
        /// The hypervisor's guests as they are now.
        guests: Vec<Guest>,
    },
    Retry {
        id: String,
        destination: Option<String>,
        mode: Option<Mode>,
        /// Over the last attempt's (the new mode's default if the mode changes).
        completion: CompletionRequest,
        guests: Vec<Guest>,
    },
    Abort {
        id: String,
    },
    Force {
        id: String,
        run_on: RunOn,
    },
    /// Run the migration's pending work on this host now.
    RunPending {
        migration_id: String,
    },
    /// Drop the migration's pending work on this host, on the operator's
    /// word (a destination gone for good will never hear a notification;
    /// a driver removed will never undo its state).
    ForgetPending {
        migration_id: String,
    },
    Evacuate {
        request: EvacuationRequest,
        guests: Vec<Guest>,
    },
    ControlEvacuation {
        id: String,
        control: Control,
    },
    Undrain,
    /// Re-run the failed feature stages of the VM's latest migration sourced
    /// here, which must be degraded, where the VM runs. `who`: the caller,
    /// as the record's history names it.
    Repair {
        vm: String,
        feature: Option<String>,
        who: String,
    },
    /// A call of the Peer service. Prepare, Capacity and Recover carry the
    /// hypervisor's guests as they are now. `from`: the host the caller's
    /// verified certificate names; `None` on a plaintext agent, where any
    /// caller is trusted as it was before identities.
    Peer {
        call: PeerCall,
        guests: Vec<Guest>,
        from: Option<String>,
    },
}

/// The answer to a [`Request`].
#[derive(Debug, Clone)]
pub enum Response {
    Migration(Box<MigrationRecord>),
    Pending {
        done: Vec<Pending>,
        still: Vec<Pending>,
    },
    Evacuation(Evacuation),
    Undrained,
    Peer(PeerResponse),
}

pub type Reply = Result<Response, Refusal>;

/// A request this host turned down, by kind. Texts say exactly what was wrong
/// and what to do; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    /// Not now: at a limit, or still undoing an earlier attempt. A later
    /// try may work (peers see it as [`crate::protocol::PeerError::Busy`]).
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Unavailable(String),
    /// The caller may not do this: another host's attempt, a role short.
    #[error("{0}")]
    PermissionDenied(String),
}

/// A Peer service call, as it goes over the wire.
#[derive(Debug, Clone, PartialEq)]
pub enum PeerCall {
    Prepare(proto::PrepareRequest),
    Finish(proto::FinishRequest),
    Abort(proto::PeerAbortRequest),
    Resolve(proto::ResolveRequest),
    Heartbeat(proto::HeartbeatRequest),
    Capacity(proto::CapacityRequest),
    Recover(proto::RecoverRequest),
    Repair(proto::PeerRepairRequest),
}

impl PeerCall {
    pub fn name(&self) -> &'static str {
        match self {
            PeerCall::Prepare(_) => "Prepare",
            PeerCall::Finish(_) => "Finish",
            PeerCall::Abort(_) => "Abort",
            PeerCall::Resolve(_) => "Resolve",
            PeerCall::Heartbeat(_) => "Heartbeat",
            PeerCall::Capacity(_) => "Capacity",
            PeerCall::Recover(_) => "Recover",
            PeerCall::Repair(_) => "Repair",
        }
    }
}

/// A Peer service answer, as it goes over the wire.
#[derive(Debug, Clone, PartialEq)]
pub enum PeerResponse {
    Prepare(proto::PrepareReply),
    Finish(proto::FinishReply),
    Abort(proto::PeerAbortReply),
    Resolve(proto::ResolveReply),
    Heartbeat(proto::HeartbeatReply),
    Capacity(proto::CapacityReply),
    Recover(proto::RecoverReply),
    Repair(proto::PeerRepairReply),
}

/// A hypervisor call or a feature stage.
#[derive(Debug, Clone)]
pub enum Op {
    StartIncoming {
        spec: VmSpec,
        attempt_id: String,
        /// Ready for a switchover to post-copy.
        postcopy: bool,
    },
    /// Destination: wait for the switchover to post-copy.
    AwaitSwitchover {
        vm: String,
    },
    /// Destination, post-copy paused: listen for the source again.
    RecoverIncoming {
        vm: String,
        attempt_id: String,
    },
    /// Source, post-copy stuck on a dead link: break it off to recover it.
    PausePostcopy {
        vm: String,
    },
    /// Source, post-copy paused: resume the transfer to `address`.
    ResumePostcopy {
        vm: String,
        address: String,
    },
    /// Source: switch the transfer in progress to post-copy.
    StartPostcopy {
        vm: String,
    },
    CompleteIncoming {
        vm: String,
        stats: TransferStats,
    },
    /// Progress comes as [`Input::Progress`] until the end.
    TransferOut {
        vm: String,
        /// The destination host: with TLS, its certificate must name it.
        destination: String,
        address: String,
        plan: crate::hypervisor::TransferPlan,
    },
    /// After a restart, follow the transfer the hypervisor still runs;
    /// answered like `TransferOut`.
    WatchTransfer {
        vm: String,
        destination: String,
    },
    CancelTransfer {
        vm: String,
    },
    Resume {
        vm: String,
    },
    Kill {
        vm: String,
    },
    Status {
        vm: String,
    },
    Stage(StageContext),
    ListGuests,
}

/// What a finished [`Op`] gave.
#[derive(Debug, Clone, PartialEq)]
pub enum OpOutput {
    Done,
    /// StartIncoming: where the source sends the guest.
    Address(String),
    /// TransferOut: the final statistics.
    Transferred(TransferStats),
    /// AwaitSwitchover: `true` switched to post-copy, `false` the whole
    /// guest arrived by pre-copy.
    Arrived(bool),
    /// Status: the guest's state, or `None` if there is no such guest.
    Status(Option<crate::hypervisor::GuestState>),
    /// A stage's detail.
    Stage(String),
    Guests(Vec<Guest>),
}

/// Why an [`Op`] did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpError {
    /// It failed and had no effect.
    Failed(String),
    /// The hypervisor has no such guest.
    NoSuchGuest(String),
    /// The call was made and no answer came back: its effect is unknown.
    Unknown(String),
}

impl std::fmt::Display for OpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpError::Failed(m) | OpError::NoSuchGuest(m) | OpError::Unknown(m) => f.write_str(m),
        }
    }
}

impl From<String> for OpError {
    fn from(m: String) -> OpError {
        OpError::Failed(m)
    }
}

impl From<&str> for OpError {
    fn from(m: &str) -> OpError {
        OpError::Failed(m.to_string())
    }
}

/// A journal record.
#[derive(Debug, Clone)]
pub enum Entry {
    Source(Box<SourceAttempt>),
    Destination(Box<DestinationAttempt>),
    Pending(Pending),
    PendingDone {
        attempt_id: String,
        feature: String,
        work: String,
    },
    /// An attempt this host will never prepare (aborted, or answered "not
    /// committed" before its C1 arrived).
    Tombstone(String),
    Evacuation(Box<Evacuation>),
    Draining(bool),
    /// Closed records retention forgot ([`retention`]).
    Prune(Box<Pruned>),
}

/// Everything the journal held when the agent started.
#[derive(Debug, Clone, Default)]
pub struct JournalImage {
    /// Oldest first.
    pub sources: Vec<SourceAttempt>,
    pub destinations: Vec<DestinationAttempt>,
    pub pending: Vec<Pending>,
    pub tombstones: Vec<String>,
    /// Received attempts that committed, whose records retention forgot.
    pub committed: Vec<String>,
    pub evacuations: Vec<Evacuation>,
    pub draining: bool,
    /// Rows the journal could not read: kept aside, and reported.
    pub unreadable: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Info,
    Warn,
    Error,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }
}

/// Something consoles should hear about.
#[derive(Debug, Clone)]
pub enum Event {
    Migration(Box<MigrationRecord>),
    Progress {
        migration_id: String,
        attempt_id: String,
        stats: TransferStats,
        convergence: Option<crate::protocol::convergence::ConvergenceView>,
    },
    Log {
        level: Level,
        migration_id: String,
        /// The attempt the line is about, when it is about one (the
        /// agent's log files carry it on every line of an attempt).
        attempt_id: String,
        text: String,
    },
    /// A guest of this host changed (or left).
    Vm(String),
    /// The host's own state changed (pending work, drain, limits).
    Host,
    Evacuation(Evacuation),
}

/// What the core asks its driver to do, in order.
#[derive(Debug, Clone)]
pub enum Action {
    Journal {
        entry: Entry,
        durable: bool,
    },
    Call {
        call: CallId,
        peer: String,
        request: PeerCall,
        /// The call fails as unreachable if no answer comes by then.
        deadline_ms: Option<Millis>,
    },
    Reply {
        req: ReqId,
        reply: Reply,
    },
    Run {
        op: OpId,
        what: Op,
    },
    /// Give up on an op that missed its deadline: its answer is no longer
    /// wanted (drop the future; a late answer is ignored anyway).
    Cancel {
        op: OpId,
    },
    Emit(Event),
    /// A stopping agent has nothing left to wait for.
    Exit,
}

/// What comes in.
#[derive(Debug, Clone)]
pub enum Input {
    Request {
        req: ReqId,
        request: Request,
    },
    /// The answer to [`Action::Call`], or why there was none.
    PeerReplied {
        call: CallId,
        reply: Result<PeerResponse, crate::protocol::PeerError>,
    },
    OpDone {
        op: OpId,
        result: Result<OpOutput, OpError>,
    },
    Progress {
        op: OpId,
        stats: TransferStats,
    },
    /// A timer from [`HostCore::poll_timeout`] is due.
    Timer,
    /// Time to forget the closed records beyond retention (the agent sends
    /// it every ten minutes; it is no timer of the core's, so a simulated
    /// cluster still settles).
    Prune,
    /// SIGINT, SIGTERM or SIGHUP.
    Stop,
}

/// Who waits for an op or a call's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Owner {
    /// A source attempt: migration id, attempt id.
    Source(String, String),
    Destination(String),
    Pending {
        key: pending::Key,
        batch: Option<u64>,
    },
    Evacuation(String),
    /// A peer's Recover, answered with the op's address.
    Recover(ReqId),
    /// A repair this host's record asked for: the migration id.
    Repair(String),
    /// A repair run here for a VM that runs here: the VM.
    RepairHere(String),
}

impl Owner {
    /// The attempt this work is for, if it is for one.
    fn attempt(&self) -> Option<&str> {
        match self {
            Owner::Source(_, attempt) | Owner::Destination(attempt) => Some(attempt),
            Owner::Pending { key, .. } => Some(&key.0),
            Owner::Evacuation(_) | Owner::Recover(_) | Owner::Repair(_) | Owner::RepairHere(_) => {
                None
            }
        }
    }
}

/// What an op is, for routing its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpKind {
    StartIncoming,
    CompleteIncoming,
    AwaitSwitchover,
    StartPostcopy,
    RecoverIncoming,
    ResumePostcopy,
    PausePostcopy,
    TransferOut,
    CancelTransfer,
    Resume,
    Kill,
    Status,
    Stage { feature: usize, stage: Stage },
    ListGuests,
}

#[derive(Debug, Clone)]
struct OpEntry {
    owner: Owner,
    kind: OpKind,
    started: Millis,
    deadline: Option<Millis>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallKind {
    Prepare,
    Finish,
    Abort,
    Resolve,
    Heartbeat,
    Capacity { deadline: Millis },
    Recover,
    Repair,
}

#[derive(Debug, Clone)]
struct CallEntry {
    owner: Owner,
    kind: CallKind,
    peer: String,
}

/// A source attempt: the latest of its migration, live or ended.
#[derive(Debug, Clone)]
struct Source {
    attempt: SourceAttempt,
    live: bool,
    transfer: Option<OpId>,
    /// Cancelling: the cancel call and the transfer's own end, both awaited.
    cancel: Option<OpId>,
    /// Cancelling: the transfer ended having moved the whole guest, or was
    /// given up on without an answer (so it may have).
    transfer_completed: bool,
    /// Console requests (abort, force) answered when the attempt ends.
    waiters: Vec<ReqId>,
    last_progress_event: Millis,
}

/// A live destination attempt.
#[derive(Debug, Clone)]
struct Destination {
    attempt: DestinationAttempt,
    prepare_waiter: Option<ReqId>,
    finish_waiters: Vec<ReqId>,
    /// Peer aborts waiting for the rollback, until the deadline.
    abort_waiters: Vec<ReqId>,
    abort_deadline: Option<Millis>,
}

impl Destination {
    fn new(attempt: DestinationAttempt, prepare_waiter: Option<ReqId>) -> Destination {
        Destination {
            attempt,
            prepare_waiter,
            finish_waiters: Vec::new(),
            abort_waiters: Vec::new(),
            abort_deadline: None,
        }
    }
}

/// A stopping agent.
#[derive(Debug, Clone, Copy)]
struct Stopping {
    deadline: Millis,
    exited: bool,
}

/// One host's decisions, with everything it remembers.
pub struct HostCore {
    cfg: Config,
    /// Every migration this host sourced: its latest attempt.
    sources: BTreeMap<String, Source>,
    /// Live destination attempts, by attempt id.
    destinations: BTreeMap<String, Destination>,
    /// Destination attempts that ended here, by attempt id (Resolve, a late
    /// Finish or Abort is answered from them).
    ended: BTreeMap<String, DestinationAttempt>,
    /// VM → the migration holding its lock (one attempt per VM).
    locks: BTreeMap<String, String>,
    tombstones: BTreeSet<String>,
    /// Received attempts that committed, whose records were forgotten: still
    /// answered as committed.
    committed: BTreeSet<String>,
    pending: BTreeMap<pending::Key, Pending>,
    /// Runs of pending work an operator asked for: what is left, who waits.
    batches: BTreeMap<u64, pending::Batch>,
    evacuations: evacuation::Runs,
    draining: bool,
    ops: BTreeMap<OpId, OpEntry>,
    calls: BTreeMap<CallId, CallEntry>,
    next_id: u64,
    stopping: Option<Stopping>,
    warnings: Vec<String>,
    /// Attempts the journal left open that recovery has not settled yet:
    /// source migrations by migration id, destination attempts by attempt id.
    recovering_sources: Vec<String>,
    recovering_destinations: Vec<String>,
    /// Repairs this host's records asked for: migration id → the request
    /// answered when the host the VM runs on has.
    repair_waiters: BTreeMap<String, ReqId>,
    /// Repairs run here, by VM.
    repairs_here: BTreeMap<String, repair::RepairHere>,
    /// Inputs the core gives itself (a stage it answers without running
    /// it), handled after the current ones.
    internal: VecDeque<(Owner, Internal)>,
    out: Vec<Action>,
    now: Millis,
}

/// An answer the core makes itself, routed like an op's.
#[derive(Debug, Clone)]
enum Internal {
    Stage {
        feature: usize,
        stage: Stage,
        result: Result<String, String>,
    },
}

/// What a host can take now, for `Capacity` and status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Load {
    pub memory_used_mib: u64,
    pub vcpus_used: u32,
    pub outgoing: u32,
    pub incoming: u32,
}

impl HostCore {
    pub fn new(cfg: Config) -> HostCore {
        HostCore {
            cfg,
            sources: BTreeMap::new(),
            destinations: BTreeMap::new(),
            ended: BTreeMap::new(),
            locks: BTreeMap::new(),
            tombstones: BTreeSet::new(),
            committed: BTreeSet::new(),
            pending: BTreeMap::new(),
            batches: BTreeMap::new(),
            evacuations: evacuation::Runs::default(),
            draining: false,
            ops: BTreeMap::new(),
            calls: BTreeMap::new(),
            next_id: 0,
            stopping: None,
            warnings: Vec::new(),
            recovering_sources: Vec::new(),
            recovering_destinations: Vec::new(),
            repair_waiters: BTreeMap::new(),
            repairs_here: BTreeMap::new(),
            internal: VecDeque::new(),
            out: Vec::new(),
            now: 0,
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// Handle one input at `now`; the actions to carry out, in order.
    pub fn handle(&mut self, now: Millis, input: Input) -> Vec<Action> {
        self.now = self.now.max(now);
        match input {
            Input::Request { req, request } => self.on_request(req, request),
            Input::PeerReplied { call, reply } => self.on_peer_replied(call, reply),
            Input::OpDone { op, result } => self.on_op_done(op, result),
            Input::Progress { op, stats } => self.on_progress(op, stats),
            Input::Timer => self.on_timer(),
            Input::Prune => {
                if self.stopping.is_none() {
                    self.prune();
                }
            }
            Input::Stop => self.on_stop(),
        }
        self.drain_internal();
        self.check_exit();
        std::mem::take(&mut self.out)
    }

    /// The next instant [`Input::Timer`] has something to do.
    pub fn poll_timeout(&self) -> Option<Millis> {
        let mut next: Option<Millis> = None;
        let mut at = |t: Millis| next = Some(next.map_or(t, |n| n.min(t)));
        for s in self.sources.values().filter(|s| s.live) {
            if let Some(t) = s.attempt.poll_timeout() {
                at(t);
            }
        }
        for d in self.destinations.values() {
            if let Some(t) = d.attempt.poll_timeout() {
                at(t);
            }
            if let Some(t) = d.abort_deadline {
                at(t);
            }
        }
        for op in self.ops.values() {
            if let Some(t) = op.deadline {
                at(t);
            }
        }
        if self.stopping.is_none()
            && let Some(t) = self.pending_due()
        {
            at(t);
        }
        if self.stopping.is_none()
            && let Some(t) = self.evacuations.next_due()
        {
            at(t);
        }
        if let Some(s) = self.stopping
            && !s.exited
        {
            at(s.deadline);
        }
        next
    }

    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn emit(&mut self, event: Event) {
        self.out.push(Action::Emit(event));
    }

    fn log(&mut self, level: Level, migration_id: &str, text: String) {
        let attempt_id = self.attempt_of_migration(migration_id).unwrap_or_default();
        self.emit(Event::Log {
            level,
            migration_id: migration_id.to_string(),
            attempt_id,
            text,
        });
    }

    /// The attempt of `migration_id` this host works on: the latest one it
    /// sources, else the newest it received.
    fn attempt_of_migration(&self, migration_id: &str) -> Option<String> {
        if migration_id.is_empty() {
            return None;
        }
        if let Some(s) = self.sources.get(migration_id) {
            return Some(s.attempt.attempt_id.clone());
        }
        let received = self
            .destinations
            .values()
            .map(|d| &d.attempt)
            .chain(self.ended.values());
        received
            .filter(|a| a.migration_id == migration_id)
            .map(|a| a.attempt_id.clone())
            .max_by_key(|id| {
                id.rsplit_once('.')
                    .and_then(|(_, n)| n.parse::<u32>().ok())
                    .unwrap_or(0)
            })
    }

    /// The attempt an op runs for, if any: the agent runs it in that
    /// attempt's log span.
    pub fn op_attempt(&self, op: OpId) -> Option<&str> {
        self.ops.get(&op)?.owner.attempt()
    }

    /// The attempt a peer call is made for, if any.
    pub fn call_attempt(&self, call: CallId) -> Option<&str> {
        self.calls.get(&call)?.owner.attempt()
    }

    fn reply(&mut self, req: ReqId, reply: Reply) {
        self.out.push(Action::Reply { req, reply });
    }

    /// Write to the journal. `durable`: the write must survive a power loss
    /// before anything after it happens.
    fn journal(&mut self, entry: Entry, durable: bool) {
        let durable = durable
            && !crate::protocol::mutations::planted(
                crate::protocol::mutations::Mutation::ReplyBeforeDurable,
            );
        self.out.push(Action::Journal { entry, durable });
    }

    fn run(&mut self, owner: Owner, kind: OpKind, what: Op, deadline_ms: Option<Millis>) -> OpId {
        let op = self.next_id();
        self.ops.insert(
            op,
            OpEntry {
                owner,
                kind,
                started: self.now,
                deadline: deadline_ms.map(|d| self.now + d),
            },
        );
        self.out.push(Action::Run { op, what });
        op
    }

    fn call(
        &mut self,
        owner: Owner,
        kind: CallKind,
        peer: &str,
        request: PeerCall,
        deadline_ms: Option<Millis>,
    ) -> CallId {
        let call = self.next_id();
        self.calls.insert(
            call,
            CallEntry {
                owner,
                kind,
                peer: peer.to_string(),
            },
        );
        self.out.push(Action::Call {
            call,
            peer: peer.to_string(),
            request,
            deadline_ms,
        });
        call
    }

    /// A new id of `kind`, unique on this host: its prefix, `-`, then its
    /// number of hex digits (the format [`bounds::check_id`] checks).
    fn new_id(&mut self, kind: IdKind, taken: impl Fn(&str) -> bool) -> String {
        let (prefix, hex) = kind.format();
        loop {
            let n = self.next_id();
            let bits = splitmix(self.cfg.id_salt ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mask = if hex >= 16 {
                u64::MAX
            } else {
                (1u64 << (4 * hex)) - 1
            };
            let id = format!("{prefix}-{:0hex$x}", bits & mask);
            if !taken(&id) {
                return id;
            }
        }
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.is_some()
    }

    // ---- queries (read only, for status and the Watch snapshot) ------------

    /// The latest record of every migration this host sourced.
    pub fn migrations(&self) -> impl Iterator<Item = &MigrationRecord> {
        self.sources.values().map(|s| &s.attempt.record)
    }

    pub fn migration(&self, id: &str) -> Option<&MigrationRecord> {
        self.sources.get(id).map(|s| &s.attempt.record)
    }

    /// A page of [`HostCore::migrations`] in id order: at most `limit`
    /// records after the id `after`.
    pub fn migrations_after(&self, after: Option<&str>, limit: usize) -> Vec<&MigrationRecord> {
        use std::ops::Bound;
        let from = after.map_or(Bound::Unbounded, |a| Bound::Excluded(a.to_string()));
        self.sources
            .range((from, Bound::Unbounded))
            .take(limit)
            .map(|(_, s)| &s.attempt.record)
            .collect()
    }

    /// What a Watch snapshot shows: every migration still open here, then
    /// the `closed` most recently updated of the others, newest first.
    pub fn recent_migrations(&self, closed: usize) -> Vec<&MigrationRecord> {
        let (open, mut ended): (Vec<&Source>, Vec<&Source>) =
            self.sources.values().partition(|s| s.live);
        ended.sort_by(|a, b| {
            let key = |s: &Source| (s.attempt.record.updated_at_ms, s.attempt.record.id.clone());
            key(b).cmp(&key(a))
        });
        open.into_iter()
            .chain(ended.into_iter().take(closed))
            .map(|s| &s.attempt.record)
            .collect()
    }

    /// Whether this host has anything of migration `id`: its record as the
    /// source, an attempt as the destination, or pending work.
    pub fn knows_migration(&self, id: &str) -> bool {
        self.sources.contains_key(id)
            || self
                .destinations
                .values()
                .any(|d| d.attempt.migration_id == id)
            || self.ended.values().any(|a| a.migration_id == id)
            || self.pending.values().any(|p| p.migration_id == id)
    }

    /// The migration holding a VM's lock.
    pub fn lock_of(&self, vm: &str) -> Option<&str> {
        self.locks.get(vm).map(String::as_str)
    }

    pub fn pending(&self) -> impl Iterator<Item = &Pending> {
        self.pending.values()
    }

    pub fn evacuation(&self, id: &str) -> Option<&Evacuation> {
        self.evacuations.job(id)
    }

    /// Oldest first.
    pub fn evacuations(&self) -> Vec<&Evacuation> {
        self.evacuations.jobs()
    }

    /// A page of the evacuations, by id: at most `limit` after `after`.
    pub fn evacuations_after(&self, after: Option<&str>, limit: usize) -> Vec<&Evacuation> {
        self.evacuations.jobs_after(after, limit)
    }

    /// What a Watch snapshot shows: every evacuation not over, then the
    /// `closed` that ended last, newest first.
    pub fn recent_evacuations(&self, closed: usize) -> Vec<&Evacuation> {
        let (open, mut ended): (Vec<&Evacuation>, Vec<&Evacuation>) = self
            .evacuations
            .jobs()
            .into_iter()
            .partition(|job| !job.state.is_over());
        ended.sort_by_key(|job| {
            std::cmp::Reverse((job.ended_at_ms.unwrap_or(job.updated_at_ms), job.id.clone()))
        });
        open.into_iter()
            .chain(ended.into_iter().take(closed))
            .collect()
    }

    pub fn is_draining(&self) -> bool {
        self.draining
    }

    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Migrations this host sources now: what `max_outgoing` limits. An
    /// attempt holds a slot from Begin until its guest's fate is decided:
    /// Confirm only kills or resumes here and releases, and an unresolved
    /// one waits with its guest paused, so neither counts. A slot once
    /// freed is never taken back (an unresolved attempt resolves into
    /// Confirm), so a new attempt admitted into it never overshoots.
    pub fn outgoing(&self) -> usize {
        use crate::protocol::source::SourceState::*;
        self.sources
            .values()
            .filter(|s| {
                s.live
                    && matches!(
                        s.attempt.state,
                        Preparing
                            | Transferring { .. }
                            | SwitchRequested { .. }
                            | Switching
                            | FinishSent
                            | Aborting { .. }
                    )
            })
            .count()
    }

    /// Migrations this host receives now: what `max_incoming` limits. An
    /// attempt holds a slot from Prepare until it commits or rolls back;
    /// one rolling back or resuming its guest receives nothing more.
    pub fn incoming(&self) -> usize {
        use crate::protocol::destination::DestinationState::*;
        self.destinations
            .values()
            .filter(|d| {
                matches!(
                    d.attempt.state,
                    Starting | Preparing { .. } | Prepared | Finishing { .. } | SwitchoverReady
                )
            })
            .count()
    }

    /// Live destination attempts (attempt id, VM).
    pub fn arriving(&self) -> impl Iterator<Item = (&str, &str)> {
        self.destinations
            .iter()
            .map(|(id, d)| (id.as_str(), d.attempt.vm.name.as_str()))
    }

    /// What the guests use, with the guests still arriving counted as if
    /// they were there already.
    pub fn load(&self, guests: &[Guest]) -> Load {
        let mut memory: u64 = guests.iter().map(|g| g.spec.memory_mib).sum();
        let mut vcpus: u32 = guests.iter().map(|g| g.spec.vcpus).sum();
        for d in self.destinations.values() {
            if !guests.iter().any(|g| g.spec.name == d.attempt.vm.name) {
                memory += d.attempt.vm.memory_mib;
                vcpus += d.attempt.vm.vcpus;
            }
        }
        Load {
            memory_used_mib: memory,
            vcpus_used: vcpus,
            outgoing: self.outgoing() as u32,
            incoming: self.incoming() as u32,
        }
    }

    /// What the destination knows of an attempt, live or ended.
    pub fn destination_attempt(&self, attempt_id: &str) -> Option<&DestinationAttempt> {
        self.destinations
            .get(attempt_id)
            .map(|d| &d.attempt)
            .or_else(|| self.ended.get(attempt_id))
    }

    /// The source attempt with this id, if it is the latest of its migration.
    pub fn source_attempt(&self, attempt_id: &str) -> Option<&SourceAttempt> {
        self.sources
            .values()
            .map(|s| &s.attempt)
            .find(|a| a.attempt_id == attempt_id)
    }

    /// Whether this host still runs something for an attempt (either side).
    pub fn is_live(&self, attempt_id: &str) -> bool {
        self.destinations.contains_key(attempt_id)
            || self
                .sources
                .values()
                .any(|s| s.live && s.attempt.attempt_id == attempt_id)
    }

    /// Answer for Resolve, as things stand (for tests and the simulator).
    pub fn answer(&self, attempt_id: &str) -> Option<Answer> {
        self.destination_attempt(attempt_id).map(|a| a.answer())
    }

    // ---- recovery ---------------------------------------------------------

    /// Start from what the journal holds: every open attempt is recovered by
    /// the recovery table, pending work is retried, running evacuations go
    /// on. Call once, before any input.
    pub fn recover(&mut self, now: Millis, image: JournalImage) -> Vec<Action> {
        self.now = self.now.max(now);
        for row in image.unreadable {
            let text = format!("journal: a record could not be read and was set aside: {row}");
            self.log(Level::Error, "", text.clone());
            self.warnings.push(text);
        }
        self.tombstones.extend(image.tombstones);
        self.committed.extend(image.committed);
        for p in image.pending {
            self.pending.insert(p.key(), p);
        }
        self.draining = image.draining;
        let mut open_sources = Vec::new();
        for attempt in image.sources {
            let id = attempt.migration_id.clone();
            // The latest attempt of each migration is its record.
            let replace = self
                .sources
                .get(&id)
                .is_none_or(|s| s.attempt.record.attempt <= attempt.record.attempt);
            if replace {
                if !attempt.is_done() {
                    open_sources.push(id.clone());
                }
                self.sources.insert(
                    id,
                    Source {
                        attempt,
                        live: false,
                        transfer: None,
                        cancel: None,
                        transfer_completed: false,
                        waiters: Vec::new(),
                        last_progress_event: 0,
                    },
                );
            }
        }
        let mut open_destinations = Vec::new();
        for attempt in image.destinations {
            if attempt.is_finished() {
                self.ended.insert(attempt.attempt_id.clone(), attempt);
            } else {
                open_destinations.push(attempt);
            }
        }
        for id in open_sources {
            let Some(s) = self.sources.get_mut(&id) else {
                continue;
            };
            if s.attempt.is_done() {
                continue;
            }
            s.live = true;
            self.recovering_sources.push(id.clone());
            let from = format!("{:?}", s.attempt.state);
            let actions = s.attempt.recover(self.now);
            let vm = s.attempt.vm.name.clone();
            let attempt_id = s.attempt.attempt_id.clone();
            self.locks.insert(vm, id.clone());
            self.log(
                Level::Warn,
                &id,
                format!("recovering source attempt {attempt_id} from {from}"),
            );
            self.source_actions(&id, actions);
        }
        for attempt in open_destinations {
            let id = attempt.attempt_id.clone();
            let migration = attempt.migration_id.clone();
            let from = format!("{:?}", attempt.state);
            self.recovering_destinations.push(id.clone());
            self.destinations
                .insert(id.clone(), Destination::new(attempt, None));
            self.log(
                Level::Warn,
                &migration,
                format!("recovering destination attempt {id} from {from}"),
            );
            let now = self.now;
            let actions = match self.destinations.get_mut(&id) {
                Some(d) => d.attempt.recover(now),
                None => Vec::new(),
            };
            self.destination_actions(&id, actions);
        }
        self.interrupt_repairs();
        let jobs = image.evacuations;
        self.recover_evacuations(jobs);
        self.prune();
        self.drain_internal();
        self.emit(Event::Host);
        std::mem::take(&mut self.out)
    }

    /// Whether recovery is still settling an attempt the journal left
    /// open (the agent reports itself not ready meanwhile). A source
    /// attempt is settled once it ends or is `unresolved`: that one waits
    /// on its destination or an operator, who needs this agent to serve;
    /// a destination attempt once it ends or its guest is lost. Pending
    /// rollbacks and evacuations carry on afterwards and do not count.
    pub fn recovering(&mut self) -> bool {
        use crate::protocol::source::SourceState;
        let sources = &self.sources;
        self.recovering_sources.retain(|id| {
            sources
                .get(id)
                .is_some_and(|s| s.live && !matches!(s.attempt.state, SourceState::Unresolved))
        });
        let destinations = &self.destinations;
        self.recovering_destinations.retain(|id| {
            destinations
                .get(id)
                .is_some_and(|d| d.attempt.lost().is_none())
        });
        !self.recovering_sources.is_empty() || !self.recovering_destinations.is_empty()
    }

    // ---- shutdown -----------------------------------------------------------

    /// Abort what has not reached the commit point (both directions), tell
    /// the peers, and wait, bounded, for everything past Finish to end:
    /// every attempt ends, or stays journaled for the restart to finish.
    fn on_stop(&mut self) {
        if self.stopping.is_some() {
            return;
        }
        self.stopping = Some(Stopping {
            deadline: self.now + self.cfg.deadlines.stop_grace_ms,
            exited: false,
        });
        let reason = format!("agent {} is shutting down", self.cfg.name);
        self.log(
            Level::Info,
            "",
            format!("{}: stopping; aborting uncommitted attempts", self.cfg.name),
        );
        let live: Vec<String> = self
            .sources
            .iter()
            .filter(|(_, s)| s.live)
            .map(|(id, _)| id.clone())
            .collect();
        for id in live {
            let now = self.now;
            let Some(s) = self.sources.get_mut(&id) else {
                continue;
            };
            if let Ok(actions) = s
                .attempt
                .abort(now, &reason, crate::protocol::Cause::Signal)
            {
                self.source_actions(&id, actions);
            }
        }
        let arriving: Vec<String> = self.destinations.keys().cloned().collect();
        for id in arriving {
            let now = self.now;
            let Some(d) = self.destinations.get_mut(&id) else {
                continue;
            };
            if let Ok(actions) = d.attempt.abort(now, &reason, true) {
                self.destination_actions(&id, actions);
            }
        }
    }

    /// A stopping agent exits once nothing it waits for is left, or at its
    /// deadline: what is still open then is journaled, and its restart
    /// finishes it.
    fn check_exit(&mut self) {
        let Some(stopping) = self.stopping else {
            return;
        };
        if stopping.exited {
            return;
        }
        use crate::protocol::source::SourceState;
        let busy = self
            .sources
            .values()
            .any(|s| s.live && !matches!(s.attempt.state, SourceState::Unresolved))
            || self
                .destinations
                .values()
                .any(|d| d.attempt.lost().is_none())
            || self.calls.values().any(|c| c.kind == CallKind::Abort);
        if !busy || self.now >= stopping.deadline {
            if busy {
                self.log(
                    Level::Warn,
                    "",
                    format!(
                        "{}: exiting with attempts still open after {} ms; they are journaled and its next start finishes them",
                        self.cfg.name, self.cfg.deadlines.stop_grace_ms
                    ),
                );
            }
            self.stopping = Some(Stopping {
                exited: true,
                ..stopping
            });
            self.out.push(Action::Exit);
        }
    }

    // ---- timers -------------------------------------------------------------

    fn on_timer(&mut self) {
        let now = self.now;
        // Ops past their deadline: their answer is taken as unknown. Each
        // is cleared before it is handled, so it cannot fire twice.
        let expired: Vec<OpId> = self
            .ops
            .iter()
            .filter(|(_, o)| o.deadline.is_some_and(|d| d <= now))
            .map(|(&id, _)| id)
            .collect();
        for op in expired {
            if let Some(entry) = self.ops.remove(&op) {
                self.out.push(Action::Cancel { op });
                self.op_timed_out(op, entry);
            }
        }
        let sources: Vec<String> = self
            .sources
            .iter()
            .filter(|(_, s)| s.live && s.attempt.poll_timeout().is_some_and(|t| t <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in sources {
            self.source_input(&id, crate::protocol::source::SourceInput::Timer);
        }
        let destinations: Vec<String> = self
            .destinations
            .iter()
            .filter(|(_, d)| d.attempt.poll_timeout().is_some_and(|t| t <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in destinations {
            self.destination_input(&id, crate::protocol::destination::DestinationInput::Timer);
        }
        let abort_due: Vec<String> = self
            .destinations
            .iter()
            .filter(|(_, d)| d.abort_deadline.is_some_and(|t| t <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in abort_due {
            self.abort_waiters_out_of_time(&id);
        }
        if self.stopping.is_none() {
            self.retry_due_pending();
            self.run_due_evacuations();
        }
    }
}

/// A 64-bit mix (splitmix64's finaliser): ids from a counter that look random.
fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
