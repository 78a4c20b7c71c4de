//! Executes a source attempt: one task per attempt owns its
//! [`SourceAttempt`], feeds it inputs (peer replies, transfer progress, stage
//! results, timers, operator commands) and carries out its actions.

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::peers::{peer_error, with_deadline};
use super::{Agent, now_ms};
use crate::proto;
use crate::proto::peer_client::PeerClient;
use crate::protocol::cookies;
use crate::protocol::source::{Resolution, SourceAction, SourceAttempt, SourceInput};
use crate::protocol::{Millis, PeerError, RunOn};
use tonic::transport::Channel;

enum Command {
    Input(SourceInput),
    Abort {
        reason: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Force {
        run_on: RunOn,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// How the agent reaches a live source attempt.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::UnboundedSender<Command>,
    done: watch::Receiver<bool>,
    pub attempt_id: String,
}

impl Handle {
    pub async fn abort(&self, reason: &str) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Abort {
                reason: reason.to_string(),
                reply,
            })
            .map_err(|_| "the attempt has already ended".to_string())?;
        rx.await
            .unwrap_or_else(|_| Err("the attempt has already ended".to_string()))
    }

    pub async fn force(&self, run_on: RunOn) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Force { run_on, reply })
            .map_err(|_| "the attempt has already ended".to_string())?;
        rx.await
            .unwrap_or_else(|_| Err("the attempt has already ended".to_string()))
    }

    /// The destination told us it aborted this attempt.
    pub fn peer_aborted(&self, reason: &str) {
        let _ = self.tx.send(Command::Input(SourceInput::PeerAborted {
            reason: reason.to_string(),
        }));
    }

    /// Resolves once the attempt task has ended.
    pub fn done(&self) -> impl std::future::Future<Output = ()> + use<> {
        let mut done = self.done.clone();
        async move {
            let _ = done.wait_for(|d| *d).await;
        }
    }
}

/// Start the task for a new attempt (after Begin) with Begin's actions.
pub fn start(agent: &Arc<Agent>, attempt: SourceAttempt, actions: Vec<SourceAction>) -> Handle {
    let (tx, rx) = mpsc::unbounded_channel();
    let (done_tx, done) = watch::channel(false);
    let handle = Handle {
        tx: tx.clone(),
        done,
        attempt_id: attempt.attempt_id.clone(),
    };
    {
        let mut state = agent.state();
        state
            .sources
            .insert(attempt.migration_id.clone(), handle.clone());
        state
            .locks
            .insert(attempt.vm.name.clone(), attempt.migration_id.clone());
        state
            .migrations
            .insert(attempt.migration_id.clone(), attempt.record.clone());
    }
    let executor = Executor {
        agent: agent.clone(),
        tx,
        transfer: None,
        last_progress_event: 0,
    };
    let span = tracing::info_span!("attempt", id = %attempt.attempt_id, vm = %attempt.vm.name);
    tokio::spawn(executor.run(attempt, actions, rx, done_tx).instrument(span));
    handle
}

/// Recover an attempt the journal left open.
pub fn recover(agent: &Arc<Agent>, mut attempt: SourceAttempt, now: Millis) {
    let actions = attempt.recover(now);
    start(agent, attempt, actions);
}

struct Executor {
    agent: Arc<Agent>,
    tx: mpsc::UnboundedSender<Command>,
    transfer: Option<JoinHandle<()>>,
    last_progress_event: Millis,
}

impl Executor {
    async fn run(
        mut self,
        mut attempt: SourceAttempt,
        mut actions: Vec<SourceAction>,
        mut rx: mpsc::UnboundedReceiver<Command>,
        done: watch::Sender<bool>,
    ) {
        loop {
            for action in std::mem::take(&mut actions) {
                self.execute(&attempt, action).await;
            }
            self.agent.publish_migration(&attempt.record);
            if attempt.is_done() {
                break;
            }
            let timer = || Command::Input(SourceInput::Timer);
            let command = super::next_command(&mut rx, attempt.poll_timeout(), timer).await;
            let Some(command) = command else { break };
            let now = now_ms();
            match command {
                Command::Input(SourceInput::TransferProgress(stats)) => {
                    attempt.handle(now, SourceInput::TransferProgress(stats));
                    // At most one progress event every 200 ms per attempt.
                    if now >= self.last_progress_event + 200 {
                        self.last_progress_event = now;
                        self.agent
                            .emit(proto::event::Kind::Progress(proto::Progress {
                                migration_id: attempt.migration_id.clone(),
                                attempt_id: attempt.attempt_id.clone(),
                                stats: Some(crate::protocol::record::stats_to_proto(&stats)),
                            }));
                        self.agent
                            .state()
                            .migrations
                            .insert(attempt.migration_id.clone(), attempt.record.clone());
                    }
                    continue;
                }
                Command::Input(input) => actions = attempt.handle(now, input),
                Command::Abort { reason, reply } => match attempt.abort(now, &reason) {
                    Ok(a) => {
                        self.agent.log(
                            "warn",
                            &attempt.migration_id,
                            format!("abort of {}: {reason}", attempt.vm.name),
                        );
                        actions = a;
                        let _ = reply.send(Ok(()));
                    }
                    Err(refusal) => {
                        let _ = reply.send(Err(refusal));
                    }
                },
                Command::Force { run_on, reply } => match attempt.force_resolve(now, run_on) {
                    Ok(a) => {
                        actions = a;
                        let _ = reply.send(Ok(()));
                    }
                    Err(refusal) => {
                        let _ = reply.send(Err(refusal));
                    }
                },
            }
        }
        {
            let mut state = self.agent.state();
            if state
                .sources
                .get(&attempt.migration_id)
                .is_some_and(|h| h.attempt_id == attempt.attempt_id)
            {
                state.sources.remove(&attempt.migration_id);
            }
        }
        let _ = done.send(true);
    }

    fn peer_deadline(&self) -> Duration {
        Duration::from_millis(self.agent.timing.peer_timeout_ms)
    }

    /// Call the destination in the background and feed its answer (or why
    /// there was none) back to the attempt as `input(reply)`.
    fn call_peer<T, F, Fut>(
        &self,
        peer: &str,
        input: fn(Result<T, PeerError>) -> SourceInput,
        call: F,
    ) where
        T: Send + 'static,
        F: FnOnce(PeerClient<Channel>, String) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T, PeerError>> + Send,
    {
        let (client, tx, peer) = (
            self.agent.peers.client(peer),
            self.tx.clone(),
            peer.to_string(),
        );
        tokio::spawn(async move {
            let reply = match client {
                Ok(client) => call(client, peer).await,
                Err(e) => Err(e),
            };
            let _ = tx.send(Command::Input(input(reply)));
        });
    }

    async fn execute(&mut self, attempt: &SourceAttempt, action: SourceAction) {
        let agent = &self.agent;
        let vm = attempt.vm.name.clone();
        let peer = attempt.destination.clone();
        match action {
            SourceAction::Journal(snapshot) => {
                if let Err(e) = agent.journal().put_source(&snapshot) {
                    agent.journal_failed(&attempt.migration_id, e);
                }
            }
            SourceAction::SendPrepare(c1) => {
                let request = proto::PrepareRequest {
                    cookie1: c1.encode_to_vec(),
                };
                // Prepare runs every feature's prepare stage: no deadline,
                // heartbeats notice a lost peer instead.
                self.call_peer(
                    &peer,
                    SourceInput::PrepareReplied,
                    move |mut client, peer| async move {
                        let reply = client
                            .prepare(request)
                            .await
                            .map_err(|s| peer_error(&peer, s))?;
                        cookies::decode::<proto::Cookie2>("C2", &reply.into_inner().cookie2)
                            .map_err(|e| PeerError::Refused(e.to_string()))
                    },
                );
            }
            SourceAction::StartTransfer { address } => {
                let (progress_tx, mut progress_rx) = mpsc::channel(64);
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    while let Some(stats) = progress_rx.recv().await {
                        let _ = tx.send(Command::Input(SourceInput::TransferProgress(stats)));
                    }
                });
                let (hypervisor, tx) = (agent.hypervisor.clone(), self.tx.clone());
                let vm = vm.clone();
                self.transfer = Some(tokio::spawn(async move {
                    let result = hypervisor
                        .transfer_out(&vm, &address, progress_tx)
                        .await
                        .map_err(|e| e.to_string());
                    let _ = tx.send(Command::Input(SourceInput::TransferDone(result)));
                }));
                agent.publish_vm(&attempt.vm.name).await;
            }
            SourceAction::CancelTransfer => {
                if let Err(e) = agent.hypervisor.cancel_transfer(&vm).await {
                    agent.log(
                        "warn",
                        &attempt.migration_id,
                        format!("cancelling the transfer of {vm}: {e}"),
                    );
                }
                // The guest is only resumed once the transfer has really stopped.
                if let Some(transfer) = self.transfer.take() {
                    let _ = tokio::time::timeout(Duration::from_secs(5), transfer).await;
                }
            }
            SourceAction::SendFinish(c3) => {
                let request = proto::FinishRequest {
                    cookie3: c3.encode_to_vec(),
                };
                // Finish runs every feature's finish stage: no deadline; a
                // lost peer makes the attempt unresolved instead.
                self.call_peer(
                    &peer,
                    SourceInput::FinishReplied,
                    move |mut client, peer| async move {
                        let reply = client
                            .finish(request)
                            .await
                            .map_err(|s| peer_error(&peer, s))?;
                        cookies::decode::<proto::Cookie4>("C4", &reply.into_inner().cookie4)
                            .map_err(|e| PeerError::Unreachable(e.to_string()))
                    },
                );
            }
            SourceAction::SendAbort { reason } => {
                let request = proto::PeerAbortRequest {
                    attempt_id: attempt.attempt_id.clone(),
                    reason,
                    from_host: agent.name.clone(),
                    cookie4: Vec::new(),
                };
                agent.notify_abort(peer, request);
            }
            SourceAction::SendResolve => {
                let request = proto::ResolveRequest {
                    attempt_id: attempt.attempt_id.clone(),
                };
                let deadline = self.peer_deadline();
                self.call_peer(
                    &peer,
                    SourceInput::ResolveReplied,
                    move |mut client, peer| async move {
                        with_deadline(&peer, deadline, client.resolve(request))
                            .await
                            .and_then(resolution)
                    },
                );
            }
            SourceAction::SendHeartbeat => {
                let attempt_id = attempt.attempt_id.clone();
                let request = proto::HeartbeatRequest {
                    from_host: agent.name.clone(),
                    attempt_ids: vec![attempt_id.clone()],
                };
                let deadline = self.peer_deadline();
                self.call_peer(
                    &peer,
                    SourceInput::HeartbeatReplied,
                    move |mut client, peer| async move {
                        let reply =
                            with_deadline(&peer, deadline, client.heartbeat(request)).await?;
                        Ok(!reply.gone.contains(&attempt_id))
                    },
                );
            }
            SourceAction::ResumeGuest => agent.guest_action(&vm, &attempt.migration_id, true).await,
            SourceAction::KillGuest => agent.guest_action(&vm, &attempt.migration_id, false).await,
            SourceAction::RunStage { feature, stage } => {
                let tx = self.tx.clone();
                agent.spawn_stage(
                    &attempt.vm,
                    feature,
                    stage,
                    &attempt.attempt_id,
                    &attempt.migration_id,
                    move |result| {
                        let _ = tx.send(Command::Input(SourceInput::StageDone {
                            feature,
                            stage,
                            result,
                        }));
                    },
                );
            }
            SourceAction::RecordPending {
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
            }
            SourceAction::Finished(outcome) => {
                agent.state().locks.remove(&vm);
                let level = match outcome {
                    crate::protocol::Outcome::Succeeded => "info",
                    crate::protocol::Outcome::Degraded | crate::protocol::Outcome::Aborted => {
                        "warn"
                    }
                    _ => "error",
                };
                let error = attempt
                    .record
                    .error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default();
                agent.log(
                    level,
                    &attempt.migration_id,
                    format!(
                        "{vm} {} -> {} {}{error}",
                        agent.name,
                        attempt.destination,
                        outcome.as_str()
                    ),
                );
                agent.publish_vm(&vm).await;
            }
        }
    }
}

fn resolution(reply: proto::ResolveReply) -> Result<Resolution, PeerError> {
    let c4 = || {
        cookies::decode::<proto::Cookie4>("C4", &reply.cookie4)
            .map_err(|e| PeerError::Unreachable(e.to_string()))
    };
    match proto::Resolution::try_from(reply.resolution) {
        Ok(proto::Resolution::Committed) => Ok(Resolution::Committed(c4()?)),
        Ok(proto::Resolution::NotCommitted) => Ok(Resolution::NotCommitted(c4()?)),
        Ok(proto::Resolution::Pending) => Ok(Resolution::Pending),
        _ => Err(PeerError::Unreachable("unknown resolution".into())),
    }
}
