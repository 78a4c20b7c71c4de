//! What the Console and Peer services ask of the agent, with the checks an
//! operator's request must pass. Errors say exactly what was wrong and change
//! nothing.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use super::{Agent, destination, now_ms, source};
use crate::hypervisor::GuestState;
use crate::proto;
use crate::protocol::cookies::{self, CookieError};
use crate::protocol::destination::{
    DestinationAttempt, FreeCapacity, Known, Leftover, PrepareRefusal, busy_with,
    check_new_attempt, resolve_from_journal,
};
use crate::protocol::record::MigrationRecord;
use crate::protocol::source::{AttemptParams, SourceAttempt};
use crate::protocol::{Mode, Outcome, RunOn, Stage};

/// A request the agent turned down, by gRPC status kind.
#[derive(Debug, thiserror::Error)]
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
    #[error("{0}")]
    Unavailable(String),
}

impl From<Refusal> for tonic::Status {
    fn from(r: Refusal) -> tonic::Status {
        match r {
            Refusal::InvalidArgument(m) => tonic::Status::invalid_argument(m),
            Refusal::NotFound(m) => tonic::Status::not_found(m),
            Refusal::AlreadyExists(m) => tonic::Status::already_exists(m),
            Refusal::FailedPrecondition(m) => tonic::Status::failed_precondition(m),
            Refusal::ResourceExhausted(m) => tonic::Status::resource_exhausted(m),
            Refusal::Unavailable(m) => tonic::Status::unavailable(m),
        }
    }
}

/// 48 random bits: ids are made by every source independently, and an
/// attempt id seen twice by a destination is refused (a repeated Prepare),
/// so they must not collide over a cluster's life (about 0.2 % chance of
/// any collision in a million migrations).
fn new_migration_id() -> String {
    format!("m-{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

impl Agent {
    /// Begin: validate the VM and the destination, lock the VM, snapshot its
    /// spec and start the attempt.
    pub async fn start_migration(
        self: &Arc<Self>,
        vm: &str,
        destination: &str,
        mode: Mode,
        existing: Option<&MigrationRecord>,
    ) -> Result<MigrationRecord, Refusal> {
        if self.is_stopping() {
            return Err(Refusal::Unavailable(format!(
                "agent {} is shutting down",
                self.name
            )));
        }
        if vm.is_empty() {
            return Err(Refusal::InvalidArgument(
                "no VM named in the request".into(),
            ));
        }
        if self.inventory.host(destination).is_none() {
            let hosts: Vec<&str> = self
                .inventory
                .host
                .iter()
                .map(|h| h.name.as_str())
                .collect();
            return Err(Refusal::NotFound(format!(
                "no host named {destination:?} in the inventory (hosts: {})",
                hosts.join(", ")
            )));
        }
        if destination == self.name {
            return Err(Refusal::InvalidArgument(format!(
                "VM {vm} already runs on {destination}"
            )));
        }
        let guest = self
            .hypervisor
            .guests()
            .await
            .into_iter()
            .find(|g| g.spec.name == vm);
        let Some(guest) = guest else {
            return Err(Refusal::NotFound(format!(
                "no VM named {vm} on {}",
                self.name
            )));
        };
        if guest.state == GuestState::Incoming {
            return Err(Refusal::FailedPrecondition(format!(
                "VM {vm} is arriving on {}, not running here",
                self.name
            )));
        }
        let mut spec = guest.spec;
        for feature in &mut spec.features {
            if let Some(driver) = self.features.get(&feature.name) {
                feature.driver = driver.driver().to_string();
            }
        }
        let (migration_id, attempt, started_at_ms) = match existing {
            Some(record) => (record.id.clone(), record.attempt + 1, record.started_at_ms),
            None => {
                let mut id = new_migration_id();
                while self.migration(&id).is_some() {
                    id = new_migration_id();
                }
                (id, 1, now_ms())
            }
        };
        let now = now_ms();
        let (attempt, actions) = {
            // The lock check and the lock are one step: one attempt per VM.
            let mut state = self.state();
            if let Some(holder) = state.locks.get(vm) {
                let phase = state
                    .migrations
                    .get(holder)
                    .map(|r| format!("{:?}", r.current_phase()).to_lowercase())
                    .unwrap_or_default();
                return Err(Refusal::AlreadyExists(format!(
                    "VM {vm} is already migrating (migration {holder}, in {phase}); abort it or wait for its outcome"
                )));
            }
            let outgoing = state.outgoing();
            if outgoing >= self.max_outgoing as usize {
                return Err(Refusal::ResourceExhausted(format!(
                    "{} already sources {outgoing} migrations (max_outgoing = {}); wait for one to end",
                    self.name, self.max_outgoing
                )));
            }
            let params = AttemptParams {
                migration_id: migration_id.clone(),
                attempt,
                host: self.name.clone(),
                destination: destination.to_string(),
                vm: spec,
                mode,
                timing: self.timing,
                started_at_ms,
            };
            let (attempt, actions) = SourceAttempt::begin(params, now);
            state.locks.insert(vm.to_string(), migration_id.clone());
            (attempt, actions)
        };
        let record = attempt.record.clone();
        self.log(
            "info",
            &migration_id,
            format!(
                "{vm} {} -> {destination} ({:?}, attempt {})",
                self.name, mode, record.attempt
            )
            .to_lowercase(),
        );
        source::start(self, attempt, actions);
        Ok(record)
    }

    /// A new attempt of a migration that failed or was aborted.
    pub async fn retry(
        self: &Arc<Self>,
        id: &str,
        destination: Option<&str>,
        mode: Option<Mode>,
    ) -> Result<MigrationRecord, Refusal> {
        let record = self
            .migration(id)
            .ok_or_else(|| Refusal::NotFound(format!("no migration {id} on {}", self.name)))?;
        match record.outcome {
            Some(Outcome::Failed) | Some(Outcome::Aborted) => {}
            Some(other) => {
                return Err(Refusal::FailedPrecondition(format!(
                    "migration {id} ended {}: only a failed or aborted migration can be retried",
                    other.as_str()
                )));
            }
            None => {
                return Err(Refusal::FailedPrecondition(format!(
                    "migration {id} is still running"
                )));
            }
        }
        let destination = destination.unwrap_or(&record.destination).to_string();
        let mode = mode.unwrap_or(record.mode);
        self.start_migration(&record.vm, &destination, mode, Some(&record))
            .await
    }

    pub async fn abort(&self, id: &str) -> Result<MigrationRecord, Refusal> {
        let handle = self.state().sources.get(id).cloned();
        match handle {
            Some(handle) => {
                handle
                    .abort("aborted by the operator")
                    .await
                    .map_err(Refusal::FailedPrecondition)?;
                handle.done().await;
                self.migration(id)
                    .ok_or_else(|| Refusal::NotFound(format!("no migration {id}")))
            }
            None => match self.migration(id) {
                Some(record) => Err(Refusal::FailedPrecondition(format!(
                    "migration {id} has already ended ({}); nothing to abort",
                    record.outcome.map(Outcome::as_str).unwrap_or("ending")
                ))),
                None => Err(Refusal::NotFound(format!(
                    "no migration {id} on {}",
                    self.name
                ))),
            },
        }
    }

    pub async fn force_resolve(&self, id: &str, run_on: RunOn) -> Result<MigrationRecord, Refusal> {
        let handle = self.state().sources.get(id).cloned();
        let Some(handle) = handle else {
            return Err(match self.migration(id) {
                Some(_) => Refusal::FailedPrecondition(format!("migration {id} is not unresolved")),
                None => Refusal::NotFound(format!("no migration {id} on {}", self.name)),
            });
        };
        handle
            .force(run_on)
            .await
            .map_err(Refusal::FailedPrecondition)?;
        handle.done().await;
        self.migration(id)
            .ok_or_else(|| Refusal::NotFound(format!("no migration {id}")))
    }

    /// Wait until the migration's latest attempt has an outcome.
    pub async fn wait_migration(&self, id: &str) -> Result<MigrationRecord, Refusal> {
        self.wait_until(|| {
            let record = self
                .migration(id)
                .ok_or_else(|| Refusal::NotFound(format!("no migration {id} on {}", self.name)))?;
            Ok(record.outcome.is_some().then_some(record))
        })
        .await
    }

    /// Look again after every event until `ready` has an answer.
    pub(super) async fn wait_until<T>(
        &self,
        mut ready: impl FnMut() -> Result<Option<T>, Refusal>,
    ) -> Result<T, Refusal> {
        let mut events = self.subscribe();
        loop {
            if let Some(answer) = ready()? {
                return Ok(answer);
            }
            match events.recv().await {
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    return Err(Refusal::Unavailable(format!(
                        "agent {} is stopping",
                        self.name
                    )));
                }
            }
        }
    }

    // ---- Peer side --------------------------------------------------------

    /// Prepare: decode and check C1, then run the destination attempt until
    /// it has prepared (or refused).
    pub async fn prepare(self: &Arc<Self>, cookie1: &[u8]) -> Result<proto::Cookie2, Refusal> {
        if self.is_stopping() {
            return Err(Refusal::Unavailable(format!(
                "agent {} is shutting down",
                self.name
            )));
        }
        if self.is_draining() {
            return Err(Refusal::FailedPrecondition(format!(
                "{} is draining and accepts no incoming migrations (`tern undrain {}` ends that)",
                self.name, self.name
            )));
        }
        let c1: proto::Cookie1 = cookies::decode("C1", cookie1).map_err(cookie_refusal)?;
        let incoming =
            cookies::check_cookie1(&c1, |f| self.features.knows(f)).map_err(cookie_refusal)?;
        let guests = self.hypervisor.guests().await;
        let capacity = self.hypervisor.capacity();
        let free = FreeCapacity {
            memory_mib: capacity
                .memory_mib
                .saturating_sub(guests.iter().map(|g| g.spec.memory_mib).sum()),
            vcpus: capacity
                .vcpus
                .saturating_sub(guests.iter().map(|g| g.spec.vcpus).sum()),
        };
        let already_here = guests.iter().any(|g| g.spec.name == incoming.vm.name);
        let (tx, rx) = oneshot::channel();
        let journaled = self.journaled_destination(&incoming.attempt_id)?.is_some();
        let known = {
            let state = self.state();
            Known {
                aborted: state.tombstones.contains(&incoming.attempt_id),
                running: state.destinations.contains_key(&incoming.attempt_id),
                journaled,
            }
        };
        check_new_attempt(&incoming.attempt_id, &self.name, known).map_err(prepare_refusal)?;
        let pending = self.journal().pending().unwrap_or_default();
        let running: Vec<String> = {
            let state = self.state();
            let releasing = state
                .locks
                .get(&incoming.vm.name)
                .and_then(|m| state.sources.get(m))
                .map(|h| h.attempt_id.clone());
            state
                .destinations
                .iter()
                .filter(|(_, h)| h.vm == incoming.vm.name)
                .map(|(id, _)| id.clone())
                .chain(releasing)
                .collect()
        };
        let leftovers: Vec<Leftover> = pending
            .iter()
            .filter(|p| p.vm == incoming.vm.name)
            .filter_map(|p| {
                Some(Leftover::Pending {
                    attempt_id: &p.attempt_id,
                    feature: &p.feature,
                    stage: Stage::parse(&p.stage)?,
                })
            })
            .chain(
                running
                    .iter()
                    .map(|id| Leftover::Running { attempt_id: id }),
            )
            .collect();
        let busy = busy_with(&incoming.vm.name, &self.name, &leftovers);
        let (attempt, actions) = DestinationAttempt::prepare(
            incoming,
            &self.name,
            free,
            already_here,
            busy,
            self.timing,
            now_ms(),
        )
        .map_err(prepare_refusal)?;
        // Counted and registered in one step (`start`): Prepares arriving
        // together cannot all pass.
        destination::start(
            self,
            attempt,
            actions,
            Some(tx),
            Some(self.max_incoming as usize),
        )
        .map_err(|receiving| {
            Refusal::ResourceExhausted(format!(
                "{}: {} already receives {receiving} migrations (max_incoming = {})",
                super::evacuation::job::BUSY,
                self.name,
                self.max_incoming
            ))
        })?;
        rx.await
            .map_err(|_| Refusal::Unavailable(format!("agent {} dropped the attempt", self.name)))
    }

    pub async fn finish(&self, cookie3: &[u8]) -> Result<proto::Cookie4, Refusal> {
        let c3: proto::Cookie3 = cookies::decode("C3", cookie3).map_err(cookie_refusal)?;
        let handle = self.state().destinations.get(&c3.attempt_id).cloned();
        if let Some(handle) = handle
            && let Some(c4) = handle.finish(c3.clone()).await
        {
            return Ok(c4);
        }
        // Already decided (or never here): answer from the journal.
        let journaled = self.journaled_destination(&c3.attempt_id)?;
        match journaled {
            Some(attempt) => Ok(attempt.cookie4()),
            None => Err(Refusal::NotFound(format!(
                "no attempt {} on {}",
                c3.attempt_id, self.name
            ))),
        }
    }

    /// Either side telling this one that an attempt is over. On the
    /// destination, the reply waits until the rollback is done (bounded), so
    /// a stopping source knows its peer is clean before it exits.
    pub async fn peer_abort(
        self: &Arc<Self>,
        attempt_id: &str,
        reason: &str,
        cookie4: &[u8],
    ) -> proto::PeerAbortReply {
        let source = self
            .state()
            .sources
            .values()
            .find(|h| h.attempt_id == attempt_id)
            .cloned();
        // An attempt this host is (or was) the source of: the destination
        // aborted it, and reports how it rolled back.
        let ended_here = source.is_none()
            && self
                .journal()
                .source_attempt(attempt_id)
                .ok()
                .flatten()
                .is_some();
        if source.is_some() || ended_here {
            if let Some(handle) = source {
                handle.peer_aborted(reason);
            }
            if let Ok(c4) = cookies::decode::<proto::Cookie4>("C4", cookie4) {
                let agent = self.clone();
                tokio::spawn(async move { agent.record_peer_rollback(c4).await });
            }
            return proto::PeerAbortReply {
                aborted: true,
                detail: String::new(),
                cookie4: Vec::new(),
            };
        }
        let destination = self.state().destinations.get(attempt_id).cloned();
        match destination {
            Some(handle) => match handle.abort(reason, false).await {
                Ok(()) => {
                    let _ = tokio::time::timeout(
                        Duration::from_millis(self.timing.peer_timeout_ms * 2),
                        handle.done(),
                    )
                    .await;
                    let cookie4 = self
                        .journaled_destination(attempt_id)
                        .ok()
                        .flatten()
                        .filter(|a| a.is_finished())
                        .map(|a| prost::Message::encode_to_vec(&a.cookie4()))
                        .unwrap_or_default();
                    proto::PeerAbortReply {
                        aborted: true,
                        detail: String::new(),
                        cookie4,
                    }
                }
                Err(detail) => proto::PeerAbortReply {
                    aborted: false,
                    detail,
                    cookie4: Vec::new(),
                },
            },
            None => {
                match self.journaled_destination(attempt_id) {
                    Err(e) => proto::PeerAbortReply {
                        aborted: false,
                        detail: e.to_string(),
                        cookie4: Vec::new(),
                    },
                    Ok(Some(a)) if a.is_committed() => proto::PeerAbortReply {
                        aborted: false,
                        detail: format!("attempt {attempt_id} has committed on {}", self.name),
                        cookie4: Vec::new(),
                    },
                    Ok(Some(a)) => proto::PeerAbortReply {
                        aborted: true,
                        detail: "already rolled back".into(),
                        cookie4: prost::Message::encode_to_vec(&a.cookie4()),
                    },
                    Ok(None) => {
                        // Prepare may still be on its way: make sure it is refused.
                        self.state().tombstones.insert(attempt_id.to_string());
                        proto::PeerAbortReply {
                            aborted: true,
                            detail: "not known here".into(),
                            cookie4: Vec::new(),
                        }
                    }
                }
            }
        }
    }

    /// The destination reported how it rolled back an attempt this host
    /// aborted (or it aborted): once the attempt task is over, put the
    /// results in its journaled record and publish it.
    pub async fn record_peer_rollback(&self, c4: proto::Cookie4) {
        let live = self
            .state()
            .sources
            .values()
            .find(|h| h.attempt_id == c4.attempt_id)
            .cloned();
        if let Some(handle) = live {
            handle.done().await;
        }
        let Ok(Some(mut attempt)) = self.journal().source_attempt(&c4.attempt_id) else {
            return;
        };
        attempt.apply_peer_rollback(&c4);
        if let Err(e) = self.journal().put_source(&attempt) {
            tracing::error!("cannot record the peer's rollback: {e}");
            return;
        }
        let latest = self
            .migration(&attempt.migration_id)
            .is_some_and(|r| r.attempt_id == attempt.attempt_id);
        if latest {
            self.publish_migration(&attempt.record);
        }
    }

    pub async fn resolve(&self, attempt_id: &str) -> proto::ResolveReply {
        let handle = self.state().destinations.get(attempt_id).cloned();
        let answer = match handle {
            Some(handle) => handle.resolve().await,
            None => None,
        };
        let (committed, c4) = match answer {
            Some(answer) => answer,
            None => match self.journaled_destination(attempt_id) {
                Ok(journaled) => {
                    if journaled.is_none() {
                        self.state().tombstones.insert(attempt_id.to_string());
                    }
                    let (committed, c4) =
                        resolve_from_journal(&self.name, attempt_id, journaled.as_ref());
                    (Some(committed), c4)
                }
                // Unknown: the source asks again later.
                Err(e) => {
                    tracing::error!("Resolve of {attempt_id}: {e}");
                    (None, proto::Cookie4::default())
                }
            },
        };
        let resolution = match committed {
            Some(true) => proto::Resolution::Committed,
            Some(false) => proto::Resolution::NotCommitted,
            None => proto::Resolution::Pending,
        };
        proto::ResolveReply {
            resolution: resolution as i32,
            cookie4: prost::Message::encode_to_vec(&c4),
        }
    }

    /// This host's journaled record of a destination attempt. A journal
    /// that cannot be read is an error, never "not here": answering "not
    /// committed" for an attempt that did commit would run the guest twice.
    fn journaled_destination(
        &self,
        attempt_id: &str,
    ) -> Result<Option<DestinationAttempt>, Refusal> {
        self.journal().destination_attempt(attempt_id).map_err(|e| {
            Refusal::Unavailable(format!("{} cannot read its journal: {e}", self.name))
        })
    }

    pub fn heartbeat(&self, attempt_ids: &[String]) -> proto::HeartbeatReply {
        let state = self.state();
        let gone = attempt_ids
            .iter()
            .filter(|id| !state.destinations.get(*id).is_some_and(|h| h.heartbeat()))
            .cloned()
            .collect();
        proto::HeartbeatReply {
            host: self.name.clone(),
            gone,
        }
    }
}

fn prepare_refusal(r: PrepareRefusal) -> Refusal {
    match r {
        PrepareRefusal::NoCapacity(m) => Refusal::ResourceExhausted(m),
        PrepareRefusal::AlreadyHere(m) => Refusal::AlreadyExists(m),
        PrepareRefusal::Aborted(m) | PrepareRefusal::Busy(m) => Refusal::FailedPrecondition(m),
    }
}

fn cookie_refusal(e: CookieError) -> Refusal {
    match e {
        CookieError::IncompatibleVersion { .. } => Refusal::FailedPrecondition(e.to_string()),
        _ => Refusal::InvalidArgument(e.to_string()),
    }
}
