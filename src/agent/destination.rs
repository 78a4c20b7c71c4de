//! Executes a destination attempt: one task per attempt owns its
//! [`DestinationAttempt`] and carries out its actions; the Prepare and Finish
//! RPCs wait on it for their cookies.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument;

use super::{Agent, now_ms};
use crate::proto;
use crate::protocol::Millis;
use crate::protocol::destination::{DestinationAction, DestinationAttempt, DestinationInput};

enum Command {
    Input(DestinationInput),
    Abort {
        reason: String,
        notify_source: bool,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Resolve {
        reply: oneshot::Sender<(Option<bool>, proto::Cookie4)>,
    },
    Finish {
        c3: proto::Cookie3,
        reply: oneshot::Sender<proto::Cookie4>,
    },
}

#[derive(Clone)]
pub struct Handle {
    tx: mpsc::UnboundedSender<Command>,
    done: watch::Receiver<bool>,
    /// The VM arriving: a new attempt of it waits until this one has ended.
    pub vm: String,
}

const ENDED: &str = "the attempt has already ended";

impl Handle {
    pub async fn abort(&self, reason: &str, notify_source: bool) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Abort {
                reason: reason.to_string(),
                notify_source,
                reply,
            })
            .map_err(|_| ENDED.to_string())?;
        rx.await.unwrap_or_else(|_| Err(ENDED.to_string()))
    }

    /// `None` while Finish is still being carried out.
    pub async fn resolve(&self) -> Option<(Option<bool>, proto::Cookie4)> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Resolve { reply }).ok()?;
        rx.await.ok()
    }

    pub async fn finish(&self, c3: proto::Cookie3) -> Option<proto::Cookie4> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Finish { c3, reply }).ok()?;
        rx.await.ok()
    }

    pub fn heartbeat(&self) -> bool {
        self.tx
            .send(Command::Input(DestinationInput::Heartbeat))
            .is_ok()
    }

    pub fn done(&self) -> impl std::future::Future<Output = ()> + use<> {
        let mut done = self.done.clone();
        async move {
            let _ = done.wait_for(|d| *d).await;
        }
    }
}

/// Start the task of a new attempt; `prepared` receives C2.
/// Register the attempt and run it. With `limit`, an attempt that would
/// make more than `limit` arriving at once is not: `Err(arriving)`. The
/// count and the registration are one step, so Prepares that arrive
/// together cannot all pass.
pub fn start(
    agent: &Arc<Agent>,
    attempt: DestinationAttempt,
    actions: Vec<DestinationAction>,
    prepared: Option<oneshot::Sender<proto::Cookie2>>,
    limit: Option<usize>,
) -> Result<Handle, usize> {
    let (tx, rx) = mpsc::unbounded_channel();
    let (done_tx, done) = watch::channel(false);
    let handle = Handle {
        tx: tx.clone(),
        done,
        vm: attempt.vm.name.clone(),
    };
    {
        let mut state = agent.state();
        let arriving = state.destinations.len();
        if limit.is_some_and(|limit| arriving >= limit) {
            return Err(arriving);
        }
        state
            .destinations
            .insert(attempt.attempt_id.clone(), handle.clone());
    }
    let executor = Executor {
        agent: agent.clone(),
        tx,
        prepared,
        finished: Vec::new(),
    };
    let span = tracing::info_span!("incoming", id = %attempt.attempt_id, vm = %attempt.vm.name);
    tokio::spawn(executor.run(attempt, actions, rx, done_tx).instrument(span));
    Ok(handle)
}

pub fn recover(agent: &Arc<Agent>, mut attempt: DestinationAttempt, now: Millis) {
    let actions = attempt.recover(now);
    // Recovered attempts were admitted before the restart.
    let _ = start(agent, attempt, actions, None, None);
}

struct Executor {
    agent: Arc<Agent>,
    tx: mpsc::UnboundedSender<Command>,
    prepared: Option<oneshot::Sender<proto::Cookie2>>,
    finished: Vec<oneshot::Sender<proto::Cookie4>>,
}

impl Executor {
    async fn run(
        mut self,
        mut attempt: DestinationAttempt,
        mut actions: Vec<DestinationAction>,
        mut rx: mpsc::UnboundedReceiver<Command>,
        done: watch::Sender<bool>,
    ) {
        loop {
            for action in std::mem::take(&mut actions) {
                self.execute(&attempt, action).await;
            }
            if attempt.is_finished() {
                break;
            }
            let timer = || Command::Input(DestinationInput::Timer);
            let command = super::next_command(&mut rx, attempt.poll_timeout(), timer).await;
            let Some(command) = command else { break };
            let now = now_ms();
            match command {
                Command::Input(input) => actions = attempt.handle(now, input),
                Command::Abort {
                    reason,
                    notify_source,
                    reply,
                } => match attempt.abort(now, &reason, notify_source) {
                    Ok(a) => {
                        actions = a;
                        let _ = reply.send(Ok(()));
                    }
                    Err(refusal) => {
                        let _ = reply.send(Err(refusal));
                    }
                },
                Command::Resolve { reply } => {
                    let (answer, a) = attempt.resolve(now);
                    // The decision is journaled before the answer leaves.
                    for action in a {
                        self.execute(&attempt, action).await;
                    }
                    let _ = reply.send((answer, attempt.cookie4()));
                }
                Command::Finish { c3, reply } => {
                    self.finished.push(reply);
                    actions = attempt.handle(now, DestinationInput::Finish(c3));
                }
            }
        }
        // Answer anyone still waiting with the final state.
        if let Some(prepared) = self.prepared.take() {
            let _ = prepared.send(attempt.cookie2(false));
        }
        for waiter in self.finished.drain(..) {
            let _ = waiter.send(attempt.cookie4());
        }
        self.agent.state().destinations.remove(&attempt.attempt_id);
        let _ = done.send(true);
    }

    async fn execute(&mut self, attempt: &DestinationAttempt, action: DestinationAction) {
        let agent = &self.agent;
        let vm = attempt.vm.name.clone();
        match action {
            DestinationAction::Journal(snapshot) => {
                if let Err(e) = agent.journal().put_destination(&snapshot) {
                    agent.journal_failed(&attempt.migration_id, e);
                }
            }
            DestinationAction::StartIncoming => {
                let result = agent
                    .hypervisor
                    .start_incoming(&attempt.vm, &attempt.attempt_id)
                    .await
                    .map_err(|e| e.to_string());
                agent.publish_vm(&vm).await;
                let _ = self
                    .tx
                    .send(Command::Input(DestinationInput::IncomingStarted(result)));
            }
            DestinationAction::CompleteIncoming(stats) => {
                let (hypervisor, tx) = (agent.hypervisor.clone(), self.tx.clone());
                tokio::spawn(async move {
                    let result = hypervisor
                        .complete_incoming(&vm, &stats)
                        .await
                        .map_err(|e| e.to_string());
                    let _ = tx.send(Command::Input(DestinationInput::IncomingCompleted(result)));
                });
            }
            DestinationAction::RunStage { feature, stage } => {
                let tx = self.tx.clone();
                agent.spawn_stage(
                    &attempt.vm,
                    feature,
                    stage,
                    &attempt.attempt_id,
                    &attempt.migration_id,
                    move |result| {
                        let _ = tx.send(Command::Input(DestinationInput::StageDone {
                            feature,
                            stage,
                            result,
                        }));
                    },
                );
            }
            DestinationAction::ResumeGuest => {
                agent.guest_action(&vm, &attempt.migration_id, true).await
            }
            DestinationAction::KillGuest => {
                agent.guest_action(&vm, &attempt.migration_id, false).await
            }
            DestinationAction::RecordPending {
                feature,
                stage,
                error,
            } => {
                agent.record_pending(
                    &attempt.vm,
                    feature,
                    stage,
                    &attempt.attempt_id,
                    &attempt.migration_id,
                    error,
                );
                agent.emit(proto::event::Kind::HostChanged(agent.host_info().await));
            }
            DestinationAction::ReplyPrepare(c2) => {
                if let Some(prepared) = self.prepared.take() {
                    let _ = prepared.send(c2);
                }
            }
            DestinationAction::ReplyFinish(c4) => {
                for waiter in self.finished.drain(..) {
                    let _ = waiter.send(c4.clone());
                }
            }
            DestinationAction::NotifySource { reason } => {
                let request = proto::PeerAbortRequest {
                    attempt_id: attempt.attempt_id.clone(),
                    reason,
                    from_host: agent.name.clone(),
                    cookie4: prost::Message::encode_to_vec(&attempt.cookie4()),
                };
                agent.notify_abort(attempt.source.clone(), request);
            }
            DestinationAction::Finished { committed } => {
                let text = if committed {
                    format!("{vm} committed on {}: the guest runs here", agent.name)
                } else {
                    format!(
                        "{vm} rolled back on {}: {}",
                        agent.name,
                        attempt.error.as_deref().unwrap_or("not committed")
                    )
                };
                agent.log(
                    if committed { "info" } else { "warn" },
                    &attempt.migration_id,
                    text,
                );
                agent.publish_vm(&vm).await;
            }
        }
    }
}
