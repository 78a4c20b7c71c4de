//! The host agent: owns the VMs on its host, its journal, and the migrations
//! it sources. It serves the Console and Peer gRPC services, runs the
//! protocol's state machines with real IO (one task per attempt), retries
//! pending rollbacks, and on SIGINT, SIGTERM or SIGHUP aborts what has not
//! committed before it exits.

mod destination;
pub mod evacuation;
pub mod journal;
mod operations;
mod peers;
mod rollbacks;
mod service;
mod source;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::{AgentConfig, Inventory};
use crate::features::registry::FeatureRegistry;
use crate::hypervisor::qemu::{QemuHypervisor, QemuSettings};
use crate::hypervisor::sim::{SimHypervisor, SimSettings};
use crate::hypervisor::{GuestState, Hypervisor};
use crate::proto;
use crate::protocol::Timing;
use crate::protocol::record::MigrationRecord;

use journal::Journal;

/// Milliseconds since the unix epoch: the clock the agent passes to the
/// protocol's state machines.
/// The agent's exit code when its journal cannot be written (EX_IOERR).
pub const JOURNAL_FAILED_EXIT: i32 = 74;

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The next command for an attempt task: from its channel, or `timer()` once
/// the state machine's deadline (unix ms) has passed.
async fn next_command<C>(
    rx: &mut mpsc::UnboundedReceiver<C>,
    deadline: Option<u64>,
    timer: impl FnOnce() -> C,
) -> Option<C> {
    let Some(at) = deadline else {
        return rx.recv().await;
    };
    let wait = Duration::from_millis(at.saturating_sub(now_ms()));
    tokio::select! {
        c = rx.recv() => c,
        _ = tokio::time::sleep(wait) => Some(timer()),
    }
}

/// Everything one agent owns. Shared by the gRPC services and attempt tasks.
pub struct Agent {
    pub name: String,
    pub address: String,
    pub inventory: Inventory,
    pub timing: Timing,
    pub rollback_retry_ms: u64,
    /// Migrations this host sources, and receives, at once.
    pub max_outgoing: u32,
    pub max_incoming: u32,
    pub hypervisor: Arc<dyn Hypervisor>,
    pub features: FeatureRegistry,
    journal: Mutex<Journal>,
    events: broadcast::Sender<proto::Event>,
    state: Mutex<State>,
    peers: peers::Peers,
    /// Set once the agent is stopping: no new attempts start.
    stopping: watch::Sender<bool>,
}

#[derive(Default)]
struct State {
    /// The latest attempt of every migration this host sourced.
    migrations: BTreeMap<String, MigrationRecord>,
    /// Live source attempts, by migration id.
    sources: HashMap<String, source::Handle>,
    /// Live destination attempts, by attempt id.
    destinations: HashMap<String, destination::Handle>,
    /// VM name -> migration id holding its lock (one attempt per VM).
    locks: HashMap<String, String>,
    /// Attempts aborted here before their Prepare arrived: refuse it later.
    tombstones: HashSet<String>,
    /// Peer calls that must reach the other side before the agent exits.
    notifications: Vec<JoinHandle<()>>,
    /// Every evacuation of this host, journaled.
    evacuations: BTreeMap<String, evacuation::job::Evacuation>,
    /// Wakes a running evacuation's task after an operator changed it.
    evacuation_wakers: HashMap<String, Arc<tokio::sync::Notify>>,
    /// No incoming migrations (set by an evacuation, cleared by undrain).
    draining: bool,
    /// Hosts that did not answer `Capacity` lately: not asked again for a while.
    unanswered: evacuation::Unanswered,
}

impl State {
    /// Every VM lock and every live source attempt task, but unresolved
    /// attempts (their guest is paused, nothing moves). Locks alone miss
    /// one: a VM's lock goes before its outcome is published, and a retry's
    /// lock points at the last attempt's ended record until the new one is
    /// published; tasks alone miss an attempt being started, whose task is
    /// registered after its lock.
    fn outgoing(&self) -> usize {
        self.locks
            .values()
            .chain(self.sources.keys())
            .filter(|m| {
                self.migrations
                    .get(*m)
                    .is_none_or(|r| r.outcome != Some(crate::protocol::Outcome::Unresolved))
            })
            .collect::<HashSet<_>>()
            .len()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
    #[error("cannot create state_dir {path}: {source}")]
    StateDir {
        path: String,
        source: std::io::Error,
    },
    #[error("hypervisor: {0}")]
    Hypervisor(String),
}

impl Agent {
    /// Open the journal and the hypervisor, and build the feature drivers.
    pub async fn open(
        config: &AgentConfig,
        inventory: Inventory,
    ) -> Result<Arc<Agent>, StartError> {
        std::fs::create_dir_all(&config.state_dir).map_err(|source| StartError::StateDir {
            path: config.state_dir.display().to_string(),
            source,
        })?;
        let address = inventory
            .host(&config.name)
            .map(|h| h.address.clone())
            .ok_or_else(|| {
                StartError::Config(format!(
                    "host {} is not listed in the inventory",
                    config.name
                ))
            })?;
        let features = FeatureRegistry::from_config(&config.name, &config.features)
            .map_err(StartError::Config)?;
        let hypervisor: Arc<dyn Hypervisor> = match config.hypervisor.kind.as_str() {
            "qemu" => Arc::new(
                QemuHypervisor::open(
                    &config.state_dir,
                    QemuSettings::from_config(config),
                    &config.vm,
                )
                .await
                .map_err(|e| StartError::Hypervisor(e.to_string()))?,
            ),
            _ => Arc::new(
                SimHypervisor::open(
                    &config.state_dir,
                    SimSettings::from_config(&config.hypervisor),
                    &config.vm,
                )
                .map_err(|e| StartError::Hypervisor(e.to_string()))?,
            ),
        };
        let journal = Journal::open(&config.state_dir)?;
        let (events, _) = broadcast::channel(8192);
        let (stopping, _) = watch::channel(false);
        let agent = Arc::new(Agent {
            name: config.name.clone(),
            address,
            timing: config.timing(),
            rollback_retry_ms: config.rollback_retry_ms,
            max_outgoing: config.max_outgoing,
            max_incoming: config.max_incoming,
            hypervisor,
            features,
            journal: Mutex::new(journal),
            events,
            state: Mutex::new(State::default()),
            peers: peers::Peers::new(inventory.clone()),
            inventory,
            stopping,
        });
        agent.adopt_guests().await;
        Ok(agent)
    }

    /// Guests running here hold their features here (a VM that booted on
    /// this host, or one that moved in before a restart).
    async fn adopt_guests(&self) {
        for guest in self.hypervisor.guests().await {
            if guest.state == GuestState::Incoming {
                continue;
            }
            for feature in &guest.spec.features {
                if let Some(driver) = self.features.get(&feature.name) {
                    driver.adopt(&guest.spec.name).await;
                }
            }
        }
    }

    fn journal(&self) -> std::sync::MutexGuard<'_, Journal> {
        self.journal.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<proto::Event> {
        self.events.subscribe()
    }

    fn emit(&self, kind: proto::event::Kind) {
        let _ = self.events.send(proto::Event {
            host: self.name.clone(),
            kind: Some(kind),
        });
    }

    fn log(&self, level: &str, migration_id: &str, text: String) {
        match level {
            "error" => tracing::error!(migration = migration_id, "{text}"),
            "warn" => tracing::warn!(migration = migration_id, "{text}"),
            _ => tracing::info!(migration = migration_id, "{text}"),
        }
        self.emit(proto::event::Kind::Log(proto::LogLine {
            at_ms: now_ms(),
            level: level.to_string(),
            migration_id: migration_id.to_string(),
            text,
        }));
    }

    /// Publish a VM's current state (or its removal) after the hypervisor changed it.
    async fn publish_vm(&self, vm: &str) {
        match self.vm_info(vm).await {
            Some(info) => self.emit(proto::event::Kind::Vm(info)),
            None => self.emit(proto::event::Kind::VmRemoved(vm.to_string())),
        }
        self.emit(proto::event::Kind::HostChanged(self.host_info().await));
    }

    fn publish_migration(&self, record: &MigrationRecord) {
        self.state()
            .migrations
            .insert(record.id.clone(), record.clone());
        self.emit(proto::event::Kind::Migration(record.into()));
    }

    pub fn migration(&self, id: &str) -> Option<MigrationRecord> {
        self.state().migrations.get(id).cloned()
    }

    pub fn migrations(&self) -> Vec<MigrationRecord> {
        self.state().migrations.values().cloned().collect()
    }

    /// Migrations this host sources now: what `max_outgoing` limits.
    pub fn outgoing(&self) -> usize {
        self.state().outgoing()
    }

    /// Migrations this host receives that have not ended here.
    pub fn incoming(&self) -> usize {
        self.state().destinations.len()
    }

    async fn vm_info(&self, name: &str) -> Option<proto::Vm> {
        let guests = self.hypervisor.guests().await;
        let guest = guests.into_iter().find(|g| g.spec.name == name)?;
        Some(self.to_vm(guest))
    }

    fn to_vm(&self, guest: crate::hypervisor::Guest) -> proto::Vm {
        let migration_id = self
            .state()
            .locks
            .get(&guest.spec.name)
            .cloned()
            .unwrap_or_default();
        proto::Vm {
            name: guest.spec.name.clone(),
            host: self.name.clone(),
            state: match guest.state {
                GuestState::Running => proto::GuestState::Running,
                GuestState::Paused => proto::GuestState::Paused,
                GuestState::Incoming => proto::GuestState::Incoming,
            } as i32,
            memory_mib: guest.spec.memory_mib,
            vcpus: guest.spec.vcpus,
            features: crate::protocol::cookies::vm_to_proto(&guest.spec).features,
            migration_id,
        }
    }

    pub async fn vms(&self) -> Vec<proto::Vm> {
        let guests = self.hypervisor.guests().await;
        guests.into_iter().map(|g| self.to_vm(g)).collect()
    }

    pub async fn host_info(&self) -> proto::Host {
        let capacity = self.hypervisor.capacity();
        let guests = self.hypervisor.guests().await;
        let pending = self.journal().pending().unwrap_or_default();
        proto::Host {
            name: self.name.clone(),
            address: self.address.clone(),
            memory_total_mib: capacity.memory_mib,
            memory_used_mib: guests.iter().map(|g| g.spec.memory_mib).sum(),
            vcpus_total: capacity.vcpus,
            vcpus_used: guests.iter().map(|g| g.spec.vcpus).sum(),
            features: self.features.names(),
            feature_state: self
                .features
                .held_state()
                .into_iter()
                .map(|s| proto::FeatureState {
                    feature: s.feature,
                    vm: s.vm,
                    state: s.state,
                })
                .collect(),
            pending_rollbacks: pending.into_iter().map(rollbacks::to_proto).collect(),
            faults: self
                .features
                .faults()
                .into_iter()
                .map(|(feature, f)| proto::FaultSettings {
                    feature,
                    fail: f.fail.iter().map(|s| s.as_str().to_string()).collect(),
                    fail_rate: f.fail_rate,
                    latency_ms: f.latency_ms,
                    fail_rollback: f.fail_rollback,
                })
                .collect(),
            draining: self.is_draining(),
            hypervisor: self.hypervisor.kind().to_string(),
            max_outgoing: self.max_outgoing,
            max_incoming: self.max_incoming,
            outgoing: self.outgoing() as u32,
            incoming: self.incoming() as u32,
        }
    }

    /// Recover every attempt the journal left open, by the recovery table.
    fn recover(self: &Arc<Self>) -> Result<(), journal::JournalError> {
        let sources = self.journal().source_attempts()?;
        let destinations = self.journal().open_destination_attempts()?;
        let now = now_ms();
        for attempt in sources {
            let record = attempt.record.clone();
            if attempt.is_done() {
                self.state().migrations.insert(record.id.clone(), record);
                continue;
            }
            tracing::warn!(attempt = %attempt.attempt_id, state = ?attempt.state, "recovering source attempt");
            source::recover(self, attempt, now);
        }
        for attempt in destinations {
            tracing::warn!(attempt = %attempt.attempt_id, state = ?attempt.state, "recovering destination attempt");
            destination::recover(self, attempt, now);
        }
        self.recover_evacuations()
    }

    /// Abort every attempt that has not committed, tell the peers, wait for
    /// the source guests to run again and the peers to have heard.
    pub async fn shut_down(self: &Arc<Self>) {
        self.stopping.send_replace(true);
        let reason = format!("agent {} is shutting down", self.name);
        let (sources, destinations): (Vec<_>, Vec<_>) = {
            let state = self.state();
            (
                state.sources.values().cloned().collect(),
                state.destinations.values().cloned().collect(),
            )
        };
        // Attempts past the commit point are carried through (and recovered
        // by Resolve after a restart); wait a bounded time for the rest.
        let mut aborted = Vec::new();
        for handle in &sources {
            if handle.abort(&reason).await.is_ok() {
                aborted.push(handle.done());
            }
        }
        for handle in &destinations {
            let _ = handle.abort(&reason, true).await;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        for done in aborted {
            let _ = tokio::time::timeout_at(deadline, done).await;
        }
        for handle in &destinations {
            let _ = tokio::time::timeout_at(deadline, handle.done()).await;
        }
        let notifications = std::mem::take(&mut self.state().notifications);
        for n in notifications {
            let _ = tokio::time::timeout_at(deadline, n).await;
        }
    }
}

/// Run an agent until it is told to stop (SIGINT, SIGTERM, SIGHUP).
pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    let inventory = Inventory::load(&config.inventory)?;
    let listen: SocketAddr = config.listen.parse()?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    let agent = Agent::open(&config, inventory).await?;
    let (stop_tx, stop_rx) = mpsc::channel::<()>(1);
    tokio::spawn(async move {
        wait_for_signal().await;
        let _ = stop_tx.send(()).await;
    });
    serve(agent, listener, stop_rx).await
}

/// Serve an agent on `listener` until `stop` yields, then shut it down.
pub async fn serve(
    agent: Arc<Agent>,
    listener: tokio::net::TcpListener,
    mut stop: mpsc::Receiver<()>,
) -> anyhow::Result<()> {
    agent.recover()?;
    rollbacks::spawn_retry_loop(&agent);
    let addr = listener.local_addr()?;
    tracing::info!(host = %agent.name, %addr, "agent listening");
    let (server_stop_tx, server_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(service::serve(agent.clone(), listener, server_stop_rx));
    let _ = stop.recv().await;
    tracing::info!(host = %agent.name, "stopping: aborting uncommitted attempts");
    agent.shut_down().await;
    let _ = server_stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    tracing::info!(host = %agent.name, "stopped");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
        _ = hup.recv() => {}
    }
}

impl Agent {
    /// Run one feature stage for a VM on this host.
    async fn run_stage(
        &self,
        vm: &crate::protocol::VmSpec,
        feature: usize,
        stage: crate::protocol::Stage,
        attempt_id: &str,
        migration_id: &str,
    ) -> crate::protocol::StageOutcome {
        let Some(spec) = vm.features.get(feature) else {
            return Err(format!("VM {} has no feature #{feature}", vm.name));
        };
        let Some(driver) = self.features.get(&spec.name) else {
            return Err(format!(
                "feature {} is not configured on {}",
                spec.name, self.name
            ));
        };
        let ctx = crate::features::StageContext {
            host: self.name.clone(),
            vm: vm.name.clone(),
            feature: spec.clone(),
            stage,
            attempt_id: attempt_id.to_string(),
            migration_id: migration_id.to_string(),
        };
        let result = crate::features::run_stage(driver.as_ref(), &ctx).await;
        if let Err(detail) = &result {
            self.log(
                "warn",
                migration_id,
                format!(
                    "{} {stage} failed on {} for {}: {detail}",
                    spec.name, self.name, vm.name
                ),
            );
        }
        result
    }

    /// Run a feature stage in the background and hand its result to `report`
    /// (which feeds it back to the attempt's state machine).
    fn spawn_stage(
        self: &Arc<Self>,
        vm: &crate::protocol::VmSpec,
        feature: usize,
        stage: crate::protocol::Stage,
        attempt_id: &str,
        migration_id: &str,
        report: impl FnOnce(crate::protocol::StageOutcome) + Send + 'static,
    ) {
        let agent = self.clone();
        let (vm, attempt_id, migration_id) =
            (vm.clone(), attempt_id.to_string(), migration_id.to_string());
        tokio::spawn(async move {
            report(
                agent
                    .run_stage(&vm, feature, stage, &attempt_id, &migration_id)
                    .await,
            );
        });
    }

    /// A rollback or release failed: keep it, visible, until a retry works.
    fn record_pending(
        &self,
        vm: &crate::protocol::VmSpec,
        feature: usize,
        stage: crate::protocol::Stage,
        attempt_id: &str,
        migration_id: &str,
        error: String,
    ) {
        let name = vm
            .features
            .get(feature)
            .map(|f| f.name.clone())
            .unwrap_or_default();
        let pending = journal::Pending {
            attempt_id: attempt_id.to_string(),
            migration_id: migration_id.to_string(),
            vm: vm.name.clone(),
            feature: name.clone(),
            stage: stage.as_str().to_string(),
            error: error.clone(),
            tries: 1,
            next_try_ms: now_ms() + self.rollback_retry_ms,
        };
        if let Err(e) = self.journal().put_pending(&pending) {
            self.journal_failed(migration_id, e);
        }
        self.log(
            "error",
            migration_id,
            format!(
                "{name} {stage} failed on {} for {}; left pending: {error}",
                self.name, vm.name
            ),
        );
    }

    /// A journal write failed: the agent stops at once, as if it had crashed
    /// before the write, instead of acting on a decision it could not
    /// record (a commit it cannot prove after a restart, a rollback that
    /// would vanish). Its supervisor restarts it, and recovery carries on
    /// from the last record that was written.
    fn journal_failed(&self, migration_id: &str, error: journal::JournalError) -> ! {
        let text = format!(
            "cannot write the journal ({error}): stopping {} now; restart it to recover its attempts",
            self.name
        );
        self.log("error", migration_id, text.clone());
        eprintln!("tern agent {}: {text}", self.name);
        std::process::exit(JOURNAL_FAILED_EXIT);
    }

    /// Resume or kill a guest for an attempt, logging a failure and
    /// publishing the VM's new state either way.
    async fn guest_action(&self, vm: &str, migration_id: &str, resume: bool) {
        let (verb, result) = if resume {
            ("resume", self.hypervisor.resume(vm).await)
        } else {
            ("kill", self.hypervisor.kill(vm).await)
        };
        if let Err(e) = result {
            self.log(
                "error",
                migration_id,
                format!("cannot {verb} {vm} on {}: {e}", self.name),
            );
        }
        self.publish_vm(vm).await;
    }

    /// Tell a peer that an attempt is aborted, in the background but tracked
    /// so that shutdown waits for it. A destination answers once it has
    /// rolled back, with its rollback results, which go into our record.
    fn notify_abort(self: &Arc<Self>, peer: String, request: proto::PeerAbortRequest) {
        let agent = self.clone();
        self.track(tokio::spawn(async move {
            let Ok(mut client) = agent.peers.client(&peer) else {
                return;
            };
            let deadline = Duration::from_millis(agent.timing.peer_timeout_ms);
            match peers::with_deadline(&peer, deadline, client.abort(request)).await {
                Ok(reply) => {
                    if let Ok(c4) =
                        crate::protocol::cookies::decode::<proto::Cookie4>("C4", &reply.cookie4)
                    {
                        agent.record_peer_rollback(c4).await;
                    }
                }
                Err(e) => tracing::warn!("telling {peer} about the abort: {}", e.message()),
            }
        }));
    }

    /// Keep a peer notification running past the attempt; shutdown waits for it.
    fn track(&self, task: JoinHandle<()>) {
        let mut state = self.state();
        state.notifications.retain(|t| !t.is_finished());
        state.notifications.push(task);
    }
}
