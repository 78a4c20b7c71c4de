//! The core's task: feeds the [`HostCore`] its inputs one at a time and
//! carries out its actions. Journal writes happen here, in order, before
//! anything after them; every other action that waits on something (a peer,
//! the hypervisor, a driver) runs in a task of its own and comes back as an
//! input. Queued inputs always go before a due timer (`biased`), so a
//! heartbeat that arrived is heard before the peer is declared lost.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tracing::Instrument;

use super::journal::Journal;
use super::{Agent, JOURNAL_FAILED_EXIT, Msg, now_ms};
use crate::features::{GuestNet, GuestNetwork, NicPort};
use crate::host::{
    Action, Entry, Event, HostCore, Input, JournalImage, Level, Op, OpError, OpId, OpOutput,
};
use crate::hypervisor::{Hypervisor, HypervisorError};
use crate::proto;

/// How often the agent applies retention (besides when it starts).
const PRUNE_INTERVAL: Duration = Duration::from_secs(600);

pub(super) fn spawn(
    agent: Arc<Agent>,
    core: HostCore,
    journal: Journal,
    image: JournalImage,
    rx: mpsc::UnboundedReceiver<Msg>,
) {
    // Everything the agent's tasks log is in its span: the agent's log
    // layer writes it to this agent's files (the demo runs several agents
    // in one process).
    let span = tracing::info_span!("agent", host = %agent.name);
    let (publish, publish_rx) = mpsc::unbounded_channel();
    let publisher = tokio::spawn(publisher(agent.clone(), publish_rx).instrument(span.clone()));
    // Retention is the core's decision; when to look again is the shell's.
    let tick = agent.core.clone();
    tokio::spawn(async move {
        let mut every =
            tokio::time::interval_at(tokio::time::Instant::now() + PRUNE_INTERVAL, PRUNE_INTERVAL);
        loop {
            every.tick().await;
            if tick.send(Msg::Input(Input::Prune)).is_err() {
                return;
            }
        }
    });
    let shell = Shell {
        span: span.clone(),
        states: HashMap::new(),
        agent,
        core,
        journal,
        replies: HashMap::new(),
        ops: HashMap::new(),
        publish,
        publisher,
    };
    tokio::spawn(shell.run(image, rx).instrument(span));
}

struct Shell {
    /// The agent's log span; each attempt's work runs in a child span
    /// naming the attempt.
    span: tracing::Span,
    /// Each attempt's last journaled state, to log it when it changes.
    states: HashMap<String, String>,
    agent: Arc<Agent>,
    core: HostCore,
    journal: Journal,
    replies: HashMap<u64, oneshot::Sender<crate::host::Reply>>,
    /// Ops running, to drop one the core gave up on.
    ops: HashMap<OpId, AbortHandle>,
    publish: mpsc::UnboundedSender<Event>,
    publisher: tokio::task::JoinHandle<()>,
}

impl Shell {
    async fn run(mut self, image: JournalImage, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let actions = self.core.recover(now_ms(), image);
        if self.execute(actions) {
            return self.exited(rx).await;
        }
        self.check_recovered();
        loop {
            let deadline = self.core.poll_timeout();
            let msg = match deadline {
                Some(at) => {
                    let wait = Duration::from_millis(at.saturating_sub(now_ms()));
                    tokio::select! {
                        biased;
                        msg = rx.recv() => msg.map(Some),
                        _ = tokio::time::sleep(wait) => Some(None),
                    }
                }
                None => rx.recv().await.map(Some),
            };
            let actions = match msg {
                None => return self.exited(rx).await,
                Some(None) => self.core.handle(now_ms(), Input::Timer),
                Some(Some(Msg::Input(input))) => {
                    if let Input::OpDone { op, .. } = &input {
                        self.ops.remove(op);
                    }
                    self.core.handle(now_ms(), input)
                }
                Some(Some(Msg::Request { request, reply })) => {
                    let req = self.agent.next_req();
                    self.replies.insert(req, reply);
                    self.core.handle(now_ms(), Input::Request { req, request })
                }
                Some(Some(Msg::Query(read))) => {
                    read(&self.core);
                    Vec::new()
                }
            };
            if self.execute(actions) {
                return self.exited(rx).await;
            }
            self.check_recovered();
        }
    }

    /// Tell the health service once recovery has settled what the journal
    /// left open (asked of the core only until then).
    fn check_recovered(&mut self) {
        if *self.agent.ready.borrow() || self.core.recovering() {
            return;
        }
        tracing::info!("recovery finished: serving");
        self.agent.ready.send_replace(true);
    }

    /// The core is done: what it said last is published (the attempt that
    /// ended as the agent stopped is logged and watchers see its record)
    /// before anyone is told the agent can go.
    async fn exited(self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let Shell {
            agent,
            core,
            publish,
            mut publisher,
            ..
        } = self;
        drop(publish);
        // The publisher reads the core's state for what it publishes.
        let give_up = tokio::time::sleep(Duration::from_secs(2));
        tokio::pin!(give_up);
        loop {
            tokio::select! {
                _ = &mut publisher => break,
                _ = &mut give_up => break,
                msg = rx.recv() => match msg {
                    Some(Msg::Query(read)) => read(&core),
                    Some(Msg::Request { reply, .. }) => {
                        let _ = reply.send(Err(crate::host::Refusal::Unavailable(format!(
                            "agent {} is stopping",
                            agent.name
                        ))));
                    }
                    Some(Msg::Input(_)) => {}
                    None => break,
                },
            }
        }
        agent.exited.send_replace(true);
    }

    /// Carry out the core's actions in order; true once it exited.
    fn execute(&mut self, actions: Vec<Action>) -> bool {
        let mut exit = false;
        for action in actions {
            match action {
                Action::Journal { entry, durable } => {
                    // A durable write waits for the disk's sync; a lazy
                    // one takes microseconds and is not worth handing off.
                    let journal = &mut self.journal;
                    let started = std::time::Instant::now();
                    let written = if durable {
                        blocking(|| journal.write(&entry, durable))
                    } else {
                        journal.write(&entry, durable)
                    };
                    self.agent.metrics.journal_write(durable, started.elapsed());
                    if let Err(e) = written {
                        self.journal_failed(&entry, e);
                    }
                    self.log_state(&entry);
                }
                Action::Call {
                    call,
                    peer,
                    request,
                    deadline_ms,
                } => {
                    let agent = self.agent.clone();
                    let span = self.attempt_span(self.core.call_attempt(call));
                    let task = async move {
                        let deadline = deadline_ms.map(Duration::from_millis);
                        let reply = agent.peers.call(&peer, request, deadline).await;
                        let _ = agent
                            .core
                            .send(Msg::Input(Input::PeerReplied { call, reply }));
                    };
                    tokio::spawn(task.instrument(span));
                }
                Action::Reply { req, reply } => {
                    if let Some(tx) = self.replies.remove(&req) {
                        let _ = tx.send(reply);
                    }
                }
                Action::Run { op, what } => {
                    let span = self.attempt_span(self.core.op_attempt(op));
                    let handle =
                        tokio::spawn(run_op(self.agent.clone(), op, what).instrument(span));
                    self.ops.insert(op, handle.abort_handle());
                }
                Action::Cancel { op } => {
                    if let Some(handle) = self.ops.remove(&op) {
                        handle.abort();
                    }
                }
                Action::Emit(event) => {
                    let _ = self.publish.send(event);
                }
                Action::Exit => exit = true,
            }
        }
        exit
    }

    /// An attempt's journaled state, in its log, each time it changes:
    /// the agent's log then shows the phases an attempt went through here.
    fn log_state(&mut self, entry: &Entry) {
        let (side, attempt, state) = match entry {
            Entry::Source(a) => ("source", &a.attempt_id, state_name(&a.state)),
            Entry::Destination(a) => ("destination", &a.attempt_id, state_name(&a.state)),
            _ => return,
        };
        if self.states.get(attempt) == Some(&state) {
            return;
        }
        let _span = self.attempt_span(Some(attempt)).entered();
        tracing::info!("{side}: {state}");
        // Bounded: an attempt long ended is not logged again anyway.
        if self.states.len() >= STATES_KEPT {
            self.states.clear();
        }
        self.states.insert(attempt.clone(), state);
    }

    /// The span of work for `attempt` (the agent's own span for work of
    /// no attempt): every line logged in it carries the attempt id.
    fn attempt_span(&self, attempt: Option<&str>) -> tracing::Span {
        match attempt {
            Some(attempt) => tracing::info_span!(parent: &self.span, "attempt", attempt),
            None => self.span.clone(),
        }
    }

    /// A journal write failed: the agent stops at once, as if it had
    /// crashed before the write, instead of acting on a decision it could
    /// not record. Its supervisor restarts it, and recovery carries on from
    /// the last record that was written.
    fn journal_failed(&self, entry: &Entry, error: super::journal::JournalError) -> ! {
        let text = format!(
            "cannot write the journal ({error}) while recording {}: stopping {} now; restart it to recover its attempts",
            entry_name(entry),
            self.agent.name
        );
        self.agent.ready.send_replace(false);
        tracing::error!("{text}");
        eprintln!("tern agent {}: {text}", self.agent.name);
        std::process::exit(JOURNAL_FAILED_EXIT);
    }
}

/// How many attempts' last logged states the shell remembers.
const STATES_KEPT: usize = 4096;

/// A state's name, without its fields: `Preparing`, `FinishSent`.
fn state_name(state: &impl std::fmt::Debug) -> String {
    let text = format!("{state:?}");
    let end = text.find([' ', '{', '(']).unwrap_or(text.len());
    text[..end].to_string()
}

fn entry_name(entry: &Entry) -> String {
    match entry {
        Entry::Source(a) => format!("source attempt {}", a.attempt_id),
        Entry::Destination(a) => format!("destination attempt {}", a.attempt_id),
        Entry::Pending(p) => format!("pending {} of {}", p.work.as_str(), p.vm),
        Entry::PendingDone { attempt_id, .. } => format!("pending work of {attempt_id} done"),
        Entry::Tombstone(id) => format!("tombstone of {id}"),
        Entry::Evacuation(job) => format!("evacuation {}", job.id),
        Entry::Draining(d) => format!("draining = {d}"),
        Entry::Prune(p) => format!(
            "retention of {} migrations, {} attempts, {} evacuations",
            p.migrations.len(),
            p.rolled_back.len() + p.committed.len(),
            p.evacuations.len()
        ),
    }
}

/// Carry out one hypervisor call or stage and hand its answer to the core.
async fn run_op(agent: Arc<Agent>, op: OpId, what: Op) {
    let hv = agent.hypervisor.clone();
    let result: Result<OpOutput, OpError> = match what {
        Op::StartIncoming {
            spec,
            attempt_id,
            postcopy,
        } => hv
            .start_incoming(&spec, &attempt_id, postcopy)
            .await
            .map(OpOutput::Address)
            .map_err(op_error),
        Op::CompleteIncoming { vm, stats } => hv
            .complete_incoming(&vm, &stats)
            .await
            .map(|()| OpOutput::Done)
            .map_err(op_error),
        Op::AwaitSwitchover { vm } => hv
            .await_switchover(&vm)
            .await
            .map(OpOutput::Arrived)
            .map_err(op_error),
        Op::RecoverIncoming { vm, attempt_id } => hv
            .recover_incoming(&vm, &attempt_id)
            .await
            .map(OpOutput::Address)
            .map_err(op_error),
        Op::PausePostcopy { vm } => hv
            .pause_postcopy(&vm)
            .await
            .map(|()| OpOutput::Done)
            .map_err(op_error),
        Op::ResumePostcopy { vm, address } => hv
            .resume_postcopy(&vm, &address)
            .await
            .map(|()| OpOutput::Done)
            .map_err(op_error),
        Op::StartPostcopy { vm } => hv
            .start_postcopy(&vm)
            .await
            .map(|()| OpOutput::Done)
            .map_err(op_error),
        Op::TransferOut {
            vm,
            destination,
            address,
            plan,
        } => {
            with_progress(&agent, op, |tx| {
                let hv = hv.clone();
                async move { hv.transfer_out(&vm, &destination, &address, plan, tx).await }
            })
            .await
        }
        Op::WatchTransfer { vm, destination } => {
            with_progress(&agent, op, |tx| {
                let hv = hv.clone();
                async move { hv.watch_transfer(&vm, &destination, tx).await }
            })
            .await
        }
        Op::CancelTransfer { vm } => hv
            .cancel_transfer(&vm)
            .await
            .map(|()| OpOutput::Done)
            .map_err(op_error),
        Op::Resume { vm } => hv
            .resume(&vm)
            .await
            .map(|()| OpOutput::Done)
            .map_err(op_error),
        Op::Kill { vm } => hv
            .kill(&vm)
            .await
            .map(|()| OpOutput::Done)
            .map_err(op_error),
        Op::Status { vm } => Ok(OpOutput::Status(hv.status(&vm).await)),
        Op::Stage(mut ctx) => match agent.features.get(&ctx.feature.name) {
            Some(driver) => {
                place_nics(hv.as_ref(), &ctx.vm, &mut ctx.nics);
                ctx.guest = Some(GuestNet(Arc::new(HypervisorNet(hv.clone()))));
                crate::features::run_stage(driver.as_ref(), &ctx)
                    .await
                    .map(OpOutput::Stage)
                    .map_err(OpError::Failed)
            }
            None => Err(OpError::Failed(format!(
                "feature {} is not configured on {}",
                ctx.feature.name, agent.name
            ))),
        },
        Op::ListGuests => Ok(OpOutput::Guests(hv.guests().await)),
    };
    let _ = agent.core.send(Msg::Input(Input::OpDone { op, result }));
}

/// Where this host puts each of a guest's NICs (its bridge, its tap).
pub(crate) fn place_nics(hv: &dyn Hypervisor, vm: &str, nics: &mut [NicPort]) {
    for nic in nics {
        hv.place_nic(vm, nic);
    }
}

/// The hypervisor as the feature drivers see a guest's network.
pub(crate) struct HypervisorNet(pub Arc<dyn Hypervisor>);

#[async_trait::async_trait]
impl GuestNetwork for HypervisorNet {
    async fn announce(&self, vm: &str) -> Result<(), String> {
        self.0.announce(vm).await.map_err(|e| e.to_string())
    }

    fn taps(&self, vm: &str) -> Vec<String> {
        self.0.taps(vm)
    }
}

/// Run a transfer (`run` gets the progress channel), forwarding its
/// progress to the core, every report before the end.
async fn with_progress<F, Fut>(agent: &Arc<Agent>, op: OpId, run: F) -> Result<OpOutput, OpError>
where
    F: FnOnce(mpsc::Sender<crate::protocol::TransferStats>) -> Fut,
    Fut: std::future::Future<Output = Result<crate::protocol::TransferStats, HypervisorError>>,
{
    let (progress_tx, mut progress_rx) = mpsc::channel(64);
    let forward = {
        let core = agent.core.clone();
        tokio::spawn(async move {
            while let Some(stats) = progress_rx.recv().await {
                let _ = core.send(Msg::Input(Input::Progress { op, stats }));
            }
        })
    };
    let result = run(progress_tx)
        .await
        .map(OpOutput::Transferred)
        .map_err(op_error);
    // Progress before the end, never after it.
    let _ = forward.await;
    result
}

fn op_error(e: HypervisorError) -> OpError {
    match e {
        HypervisorError::NoSuchGuest(_) => OpError::NoSuchGuest(e.to_string()),
        HypervisorError::Unknown(_) => OpError::Unknown(e.to_string()),
        other => OpError::Failed(other.to_string()),
    }
}

/// Run `f`, which blocks (a synced journal write waits for the disk), without
/// holding up the other tasks of this worker thread: on a multi-threaded
/// runtime they move to another while `f` runs. The core task waits for
/// it either way: its next action may depend on the write.
pub(super) fn blocking<R>(f: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Publishes the core's events to watchers, in the order they came.
async fn publisher(agent: Arc<Agent>, mut rx: mpsc::UnboundedReceiver<Event>) {
    use proto::event::Kind;
    while let Some(event) = rx.recv().await {
        match event {
            Event::Migration(record) => {
                if record.source == agent.name {
                    agent.metrics.record(&record);
                }
                agent.emit(Kind::Migration((&*record).into()))
            }
            Event::Progress {
                migration_id,
                attempt_id,
                stats,
                convergence,
            } => agent.emit(Kind::Progress(proto::Progress {
                migration_id,
                attempt_id,
                stats: Some(crate::protocol::record::stats_to_proto(&stats)),
                convergence: convergence
                    .as_ref()
                    .map(crate::protocol::record::convergence_to_proto),
            })),
            Event::Log {
                level,
                migration_id,
                attempt_id,
                text,
            } => {
                let (migration, attempt) = (migration_id.as_str(), attempt_id.as_str());
                match level {
                    Level::Error => tracing::error!(migration, attempt, "{text}"),
                    Level::Warn => tracing::warn!(migration, attempt, "{text}"),
                    Level::Info => tracing::info!(migration, attempt, "{text}"),
                }
                agent.emit(Kind::Log(proto::LogLine {
                    at_ms: now_ms(),
                    level: level.as_str().to_string(),
                    migration_id,
                    text,
                }));
            }
            Event::Vm(name) => {
                let guest = agent
                    .hypervisor
                    .guests()
                    .await
                    .into_iter()
                    .find(|g| g.spec.name == name);
                match guest {
                    Some(guest) => {
                        let vm = name.clone();
                        let lock = agent
                            .query(move |core| core.lock_of(&vm).unwrap_or_default().to_string())
                            .await
                            .unwrap_or_default();
                        agent.emit(Kind::Vm(agent.to_vm(guest, lock)));
                    }
                    None => agent.emit(Kind::VmRemoved(name)),
                }
                agent.emit(Kind::HostChanged(agent.host_info().await));
            }
            Event::Host => agent.emit(Kind::HostChanged(agent.host_info().await)),
            Event::Evacuation(job) => agent.emit(Kind::Evacuation(job.to_proto())),
        }
    }
}
