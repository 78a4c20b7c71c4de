//! The host agent: a thin shell that carries out the host core's actions
//! with real IO. One task owns the [`HostCore`] and the SQLite journal and
//! feeds the core its inputs in order: requests from the gRPC services,
//! answers of peers, of the hypervisor and of the feature drivers, timers
//! and the stop signal. Every call the core asks for runs in its own task
//! and comes back as an input, so the core never waits on IO: a slow QEMU
//! start does not keep a heartbeat from being heard.

pub mod audit;
pub mod doctor;
pub mod journal;
pub mod link;
pub mod logs;
pub mod metrics;
mod peers;
mod service;
mod shell;

use crate::protocol::completion::CompletionRequest;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::config::{AgentConfig, Inventory, TlsConfig};
use crate::features::NicPort;
use crate::features::registry::FeatureRegistry;
use crate::host::{
    self, Control, Evacuation, EvacuationRequest, HostCore, PeerCall, PeerResponse, Refusal,
    Request, Response,
};
use crate::hypervisor::qemu::{QemuHypervisor, QemuSettings};
use crate::hypervisor::sim::{SimHypervisor, SimSettings};
use crate::hypervisor::{GuestState, Hypervisor};
use crate::proto;
use crate::protocol::address;
use crate::protocol::bounds::{self, IdKind};
use crate::protocol::record::MigrationRecord;
use crate::protocol::{Mode, RunOn};
use crate::trust::Role;
use crate::trust::tls::IdentityFiles;

pub use peers::{BUSY, REFUSAL_KEY};

/// The agent's exit code when its journal cannot be written (EX_IOERR).
pub const JOURNAL_FAILED_EXIT: i32 = 74;

/// Milliseconds since the unix epoch: the clock the agent gives the core.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What the core's task takes in.
enum Msg {
    Input(host::Input),
    Request {
        request: Request,
        reply: oneshot::Sender<host::Reply>,
    },
    /// Read the core's state (status, snapshots); never changes it.
    Query(Box<dyn FnOnce(&HostCore) + Send>),
}

/// A host's traffic now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    pub draining: bool,
    pub outgoing: usize,
    pub incoming: usize,
}

/// Everything one agent owns. Shared by the gRPC services and the tasks
/// that carry out the core's calls.
pub struct Agent {
    pub name: String,
    pub address: String,
    /// Migrations this host sources, and receives, at once.
    pub max_outgoing: u32,
    pub max_incoming: u32,
    pub hypervisor: Arc<dyn Hypervisor>,
    pub features: FeatureRegistry,
    events: broadcast::Sender<proto::Event>,
    core: mpsc::UnboundedSender<Msg>,
    /// Set once the agent is told to stop.
    stopping: watch::Sender<bool>,
    /// Set once the core has nothing left to wait for.
    exited: watch::Sender<bool>,
    /// Set once recovery has settled what the journal left open; cleared
    /// when the journal fails. The health service reports it.
    ready: watch::Sender<bool>,
    peers: peers::Peers,
    next_req: AtomicU64,
    /// This agent's identity, when it serves TLS (`[tls]`).
    pub tls: Option<IdentityFiles>,
    /// Plaintext on a non-loopback address, as the config allowed.
    pub insecure: bool,
    /// Whether an admin may change fault injection here.
    pub allow_fault_injection: bool,
    /// Who asked for what: every changing request, refusals included.
    pub audit: audit::AuditLog,
    /// The hosts of the inventory: the only names an agent certificate
    /// calling the Peer service may carry.
    pub hosts: Vec<String>,
    /// Watch streams served now, at most `max_watchers`: each holds a permit.
    watchers: Arc<tokio::sync::Semaphore>,
    pub max_watchers: u32,
    /// This agent's own log files (`state_dir/logs`).
    pub log: Arc<logs::HostLog>,
    /// What `metrics_listen` serves.
    pub metrics: metrics::Metrics,
    /// The link measurement's ends (`tern doctor A B`): host → the address
    /// the inventory gives its migrations, and this host's own.
    link_hosts: BTreeMap<String, String>,
    migration_address: String,
    /// `[hypervisor] bandwidth_mib_s`, which a measured link is held to.
    bandwidth_mib_s: u64,
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
    /// Open the journal and the hypervisor, build the feature drivers, and
    /// start the core's task, which first recovers what the journal left
    /// open. Requests made before `serve` wait for that.
    pub async fn open(
        config: &AgentConfig,
        inventory: Inventory,
    ) -> Result<Arc<Agent>, StartError> {
        // QEMU running as another user reads its migration TLS credentials
        // under state_dir after it dropped root: it must be let through
        // (not let list it). Every file of the agent's own is 0600.
        let qemu_reads_tls = config.hypervisor.kind == "qemu"
            && config.hypervisor.run_as.is_some()
            && config.tls.is_some();
        let mode = if qemu_reads_tls { 0o711 } else { 0o700 };
        create_state_dir(&config.state_dir, mode).map_err(|source| StartError::StateDir {
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
        let tls = match &config.tls {
            Some(files) => Some(own_identity(&config.name, files)?),
            None => None,
        };
        if tls.is_some() != address.starts_with("https://") {
            return Err(StartError::Config(format!(
                "the inventory lists {} at {address}, but the agent {}: peers and consoles \
                 would not reach it. Use https:// with [tls], http:// without",
                config.name,
                if tls.is_some() {
                    "serves TLS ([tls] is set)"
                } else {
                    "serves plaintext (no [tls])"
                }
            )));
        }
        if config.insecure && tls.is_none() {
            tracing::warn!(
                host = %config.name,
                listen = %config.listen,
                "INSECURE: serving plaintext without identities (insecure = true): \
                 anyone who reaches this port may do anything, and the migration stream is not encrypted"
            );
        }
        let log_dir = config.state_dir.join("logs");
        let log =
            logs::HostLog::open(&config.name, &log_dir, config.log_files).map_err(|source| {
                StartError::StateDir {
                    path: log_dir.display().to_string(),
                    source,
                }
            })?;
        let features = FeatureRegistry::from_config(&config.name, &config.features)
            .map_err(StartError::Config)?;
        let journal = journal::Journal::open(&config.state_dir)?;
        let audit = audit::AuditLog::open(
            &config.state_dir,
            audit::Keep {
                entries: u64::from(config.retain_audit),
                max_age_ms: u64::from(config.retain_days) * crate::host::retention::DAY_MS,
            },
            now_ms(),
        )
        .map_err(|e| StartError::Config(format!("audit trail: {e}")))?;
        // The configured guests are booted once in the host's life: a
        // hypervisor that lost its list must not boot them again.
        let seed: &[crate::protocol::VmSpec] = if journal.booted()? { &[] } else { &config.vm };
        let hypervisor: Arc<dyn Hypervisor> = match config.hypervisor.kind.as_str() {
            "qemu" => Arc::new(
                QemuHypervisor::open(&config.state_dir, QemuSettings::from_config(config), seed)
                    .await
                    .map_err(|e| StartError::Hypervisor(e.to_string()))?,
            ),
            _ => Arc::new(
                SimHypervisor::open(
                    &config.state_dir,
                    &config.name,
                    SimSettings::from_config(&config.hypervisor),
                    seed,
                )
                .map_err(|e| StartError::Hypervisor(e.to_string()))?,
            ),
        };
        journal.set_booted()?;
        let image = journal.load()?;
        let capacity = hypervisor.capacity();
        let core = HostCore::new(host::Config {
            name: config.name.clone(),
            hosts: inventory.host.iter().map(|h| h.name.clone()).collect(),
            migration_hosts: migration_hosts(&inventory, hypervisor.kind()),
            verifying: features
                .names()
                .into_iter()
                .filter(|n| features.get(n).is_some_and(|d| d.verifies()))
                .collect(),
            features: features
                .names()
                .into_iter()
                .map(|n| {
                    let driver = features
                        .get(&n)
                        .map(|d| d.driver().to_string())
                        .unwrap_or_default();
                    (n, driver)
                })
                .collect(),
            capacity,
            timing: config.timing(),
            deadlines: host::Deadlines::from_config(config),
            max_outgoing: config.max_outgoing,
            max_incoming: config.max_incoming,
            rollback_retry_ms: config.rollback_retry_ms,
            id_salt: rand::random(),
            retention: host::Retention::from_config(config),
            postcopy: hypervisor.postcopy_support(),
        });
        let (events, _) = broadcast::channel(8192);
        let (stopping, _) = watch::channel(false);
        let (exited, _) = watch::channel(false);
        let (ready, _) = watch::channel(false);
        let (tx, rx) = mpsc::unbounded_channel();
        let agent = Arc::new(Agent {
            name: config.name.clone(),
            address,
            max_outgoing: config.max_outgoing,
            max_incoming: config.max_incoming,
            hypervisor,
            features,
            events,
            core: tx,
            stopping,
            exited,
            ready,
            hosts: inventory.host.iter().map(|h| h.name.clone()).collect(),
            link_hosts: inventory
                .host
                .iter()
                .map(|h| (h.name.clone(), h.migration_host().unwrap_or_default()))
                .collect(),
            migration_address: config.migration_address(),
            bandwidth_mib_s: config.hypervisor.bandwidth_mib_s,
            audit,
            peers: peers::Peers::new(inventory, tls.clone()),
            next_req: AtomicU64::new(1),
            tls,
            insecure: config.insecure && config.tls.is_none(),
            allow_fault_injection: config.allow_fault_injection,
            watchers: Arc::new(tokio::sync::Semaphore::new(config.max_watchers as usize)),
            max_watchers: config.max_watchers,
            log,
            metrics: metrics::Metrics::new(&config.name),
        });
        agent.adopt_guests().await;
        shell::spawn(agent.clone(), core, journal, image, rx);
        Ok(agent)
    }

    /// Guests running here hold their features here (a VM that booted on
    /// this host, or one that moved in before a restart).
    async fn adopt_guests(&self) {
        for guest in self.hypervisor.guests().await {
            if guest.state == GuestState::Incoming {
                continue;
            }
            let mut nics = NicPort::of(&guest.spec);
            shell::place_nics(self.hypervisor.as_ref(), &guest.spec.name, &mut nics);
            for feature in &guest.spec.features {
                if let Some(driver) = self.features.get(&feature.name)
                    && let Err(e) = driver.adopt(&guest.spec.name, &nics).await
                {
                    tracing::warn!(
                        vm = guest.spec.name,
                        feature = feature.name,
                        "the guest runs here, but its feature is not in place: {e}"
                    );
                }
            }
        }
    }

    pub fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    /// A slot for one more Watch stream, held until the stream ends; `None`
    /// when `max_watchers` streams are served already.
    pub fn watcher_slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.watchers.clone().try_acquire_owned().ok()
    }

    /// Watch streams served now.
    pub fn watch_subscribers(&self) -> u32 {
        self.max_watchers
            .saturating_sub(self.watchers.available_permits() as u32)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<proto::Event> {
        self.events.subscribe()
    }

    /// Write one changing request into the audit trail and tell watchers.
    pub fn record_audit(&self, entry: proto::AuditEntry) {
        shell::blocking(|| self.audit.record(&entry));
        self.emit(proto::event::Kind::Audit(entry));
    }

    /// How callers reach this agent, as `Host.security` says it.
    pub fn security(&self) -> &'static str {
        if self.tls.is_some() {
            "tls"
        } else if self.insecure {
            "insecure"
        } else {
            "loopback"
        }
    }

    fn emit(&self, kind: proto::event::Kind) {
        let _ = self.events.send(proto::Event {
            host: self.name.clone(),
            kind: Some(kind),
        });
    }

    /// Hand a request to the core and wait for its answer.
    pub async fn request(&self, request: Request) -> host::Reply {
        let (reply, rx) = oneshot::channel();
        let stopped = || Refusal::Unavailable(format!("agent {} has stopped", self.name));
        self.core
            .send(Msg::Request { request, reply })
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    /// Read the core's state.
    pub async fn query<T: Send + 'static>(
        &self,
        read: impl FnOnce(&HostCore) -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        let read = Box::new(move |core: &HostCore| {
            let _ = tx.send(read(core));
        });
        self.core.send(Msg::Query(read)).ok()?;
        rx.await.ok()
    }

    fn next_req(&self) -> u64 {
        self.next_req.fetch_add(1, Ordering::Relaxed)
    }

    async fn guests(&self) -> Vec<crate::hypervisor::Guest> {
        self.hypervisor.guests().await
    }

    // ---- what the Console service asks ---------------------------------------

    pub async fn start_migration(
        &self,
        vm: &str,
        destination: &str,
        mode: Mode,
        completion: CompletionRequest,
    ) -> Result<MigrationRecord, Refusal> {
        let guests = self.guests().await;
        migration(
            self.request(Request::StartMigration {
                vm: vm.to_string(),
                destination: destination.to_string(),
                mode,
                completion,
                guests,
            })
            .await,
        )
    }

    pub async fn retry(
        &self,
        id: &str,
        destination: Option<&str>,
        mode: Option<Mode>,
        completion: CompletionRequest,
    ) -> Result<MigrationRecord, Refusal> {
        let guests = self.guests().await;
        migration(
            self.request(Request::Retry {
                id: id.to_string(),
                destination: destination.map(str::to_string),
                mode,
                completion,
                guests,
            })
            .await,
        )
    }

    pub async fn abort(&self, id: &str) -> Result<MigrationRecord, Refusal> {
        migration(self.request(Request::Abort { id: id.to_string() }).await)
    }

    pub async fn force_resolve(&self, id: &str, run_on: RunOn) -> Result<MigrationRecord, Refusal> {
        migration(
            self.request(Request::Force {
                id: id.to_string(),
                run_on,
            })
            .await,
        )
    }

    /// Run a migration's pending work on this host now: (done, still pending).
    pub async fn run_pending(
        &self,
        migration_id: &str,
    ) -> Result<(Vec<host::Pending>, Vec<host::Pending>), Refusal> {
        match self
            .request(Request::RunPending {
                migration_id: migration_id.to_string(),
            })
            .await?
        {
            Response::Pending { done, still } => Ok((done, still)),
            other => Err(unexpected(other)),
        }
    }

    /// Drop a migration's pending work on this host, on the operator's word.
    pub async fn forget_pending(
        &self,
        migration_id: &str,
    ) -> Result<(Vec<host::Pending>, Vec<host::Pending>), Refusal> {
        match self
            .request(Request::ForgetPending {
                migration_id: migration_id.to_string(),
            })
            .await?
        {
            Response::Pending { done, still } => Ok((done, still)),
            other => Err(unexpected(other)),
        }
    }

    pub async fn evacuate(&self, request: EvacuationRequest) -> Result<Evacuation, Refusal> {
        let guests = self.guests().await;
        evacuation(self.request(Request::Evacuate { request, guests }).await)
    }

    pub async fn control_evacuation(
        &self,
        id: &str,
        control: Control,
    ) -> Result<Evacuation, Refusal> {
        evacuation(
            self.request(Request::ControlEvacuation {
                id: id.to_string(),
                control,
            })
            .await,
        )
    }

    /// Re-run the failed feature stages of `vm`'s degraded migration where
    /// the VM runs; the record once that host has answered.
    pub async fn repair(
        &self,
        vm: &str,
        feature: Option<&str>,
        who: &str,
    ) -> Result<MigrationRecord, Refusal> {
        migration(
            self.request(Request::Repair {
                vm: vm.to_string(),
                feature: feature.map(str::to_string),
                who: who.to_string(),
            })
            .await,
        )
    }

    pub async fn undrain(&self) -> Result<proto::Host, Refusal> {
        self.request(Request::Undrain).await?;
        Ok(self.host_info().await)
    }

    /// A Peer service call from `from` (the host its certificate names;
    /// `None` for plaintext), answered by the core. A Prepare naming a
    /// machine this host does not allow is refused before the core sees it.
    pub async fn peer(
        &self,
        call: PeerCall,
        from: Option<String>,
    ) -> Result<PeerResponse, Refusal> {
        if let PeerCall::Prepare(r) = &call {
            self.check_machine(&r.cookie1)?;
        }
        let guests = match call {
            PeerCall::Prepare(_)
            | PeerCall::Capacity(_)
            | PeerCall::Recover(_)
            | PeerCall::Repair(_) => self.guests().await,
            _ => Vec::new(),
        };
        match self.request(Request::Peer { call, guests, from }).await? {
            Response::Peer(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// Prepare, before the core admits anything: a C1 whose machine this
    /// host's hypervisor does not allow is refused naming the field, and
    /// nothing is journaled or started. The check reads this host's kernel
    /// and storage folders, so it runs here and not in the sans-IO core. A
    /// C1 that does not decode is left to the core, which refuses it.
    fn check_machine(&self, cookie1: &[u8]) -> Result<(), Refusal> {
        let Ok(c1) = crate::protocol::cookies::decode::<proto::Cookie1>("C1", cookie1) else {
            return Ok(());
        };
        let Some(Ok(spec)) = c1.vm.as_ref().map(crate::protocol::cookies::vm_from_proto) else {
            return Ok(());
        };
        self.hypervisor.check_spec(&spec).map_err(|e| {
            tracing::warn!(
                vm = spec.name,
                attempt = c1.attempt_id,
                "Prepare refused: {e}"
            );
            Refusal::InvalidArgument(format!("vm {}: {e}", spec.name))
        })
    }

    /// `tern check`, asked of the VM's source: every admission check of
    /// Begin here and of Prepare on `destination` (asked over the Peer
    /// service, within `deadline`), without starting, reserving,
    /// journaling or locking anything. A destination that does not answer
    /// in time is a failed check, named as such.
    pub async fn check(
        &self,
        vm: &str,
        destination: &str,
        mode: Mode,
        deadline: Duration,
    ) -> Result<proto::CheckReply, Refusal> {
        let invalid = |e: bounds::BoundsError| Refusal::InvalidArgument(e.to_string());
        bounds::check_name("CheckRequest.vm", vm).map_err(invalid)?;
        bounds::check_name("CheckRequest.destination", destination).map_err(invalid)?;
        let guests = self.guests().await;
        let postcopy = crate::protocol::completion::Completion::for_mode(mode).postcopy
            != crate::protocol::completion::Postcopy::Never;
        let (v, d) = (vm.to_string(), destination.to_string());
        let (checks, c1) = self
            .query(move |core| core.check_source(&v, &d, mode, postcopy, &guests))
            .await
            .ok_or_else(|| Refusal::Unavailable(format!("agent {} has stopped", self.name)))??;
        let mut checks: Vec<proto::AdmissionCheck> =
            checks.iter().map(host::Check::to_proto).collect();
        // What the guest runs as here, which the destination must match.
        let platform = match c1
            .vm
            .as_ref()
            .and_then(|vm| crate::protocol::cookies::vm_from_proto(vm).ok())
        {
            Some(spec) => self.platform_of(spec).await,
            None => None,
        };
        if let Some(platform) = &platform {
            checks.push(proto::AdmissionCheck {
                name: "machine type".into(),
                host: self.name.clone(),
                ok: platform.is_ok(),
                detail: match platform {
                    Ok(p) => format!(
                        "{vm} runs as machine type {} with CPU model {}",
                        p.machine_type, p.cpu_model
                    ),
                    Err(e) => format!("{vm} on {}: {e}", self.name),
                },
            });
        }
        // A VM "moved" to its own host is refused above; there is no
        // destination to ask.
        if destination != self.name {
            let (machine_type, cpu_model) = match platform {
                Some(Ok(p)) => (p.machine_type, p.cpu_model),
                _ => Default::default(),
            };
            let request = proto::CheckPrepareRequest {
                cookie1: prost::Message::encode_to_vec(&c1),
                machine_type,
                cpu_model,
            };
            let unanswered = |name: &str, detail: String| proto::AdmissionCheck {
                name: name.to_string(),
                host: destination.to_string(),
                ok: false,
                detail,
            };
            match self
                .peers
                .check_prepare(destination, request, deadline)
                .await
            {
                Ok(reply) => checks.extend(reply.checks),
                Err(crate::protocol::PeerError::Unreachable(why)) => {
                    checks.push(unanswered("reachable", why))
                }
                Err(
                    crate::protocol::PeerError::Refused(why)
                    | crate::protocol::PeerError::Busy(why)
                    | crate::protocol::PeerError::Full(why),
                ) => checks.push(unanswered(
                    "answer",
                    format!("{destination} refused the check: {why}"),
                )),
            }
        }
        Ok(proto::CheckReply {
            vm: vm.to_string(),
            source: self.name.clone(),
            destination: destination.to_string(),
            mode: crate::protocol::record::mode_to_proto(mode) as i32,
            checks,
        })
    }

    /// What `spec` runs as on this host's hypervisor (QEMU: its versioned
    /// machine type and CPU model). The first answer runs the QEMU binary
    /// (`-machine help`, `-cpu help`): off the async threads.
    async fn platform_of(
        &self,
        spec: crate::protocol::VmSpec,
    ) -> Option<Result<crate::hypervisor::Platform, String>> {
        let hypervisor = self.hypervisor.clone();
        tokio::task::spawn_blocking(move || hypervisor.platform(&spec))
            .await
            .unwrap_or_else(|e| Some(Err(format!("the platform probe failed: {e}"))))
    }

    /// Peer `CheckPrepare`: every check Prepare would apply to this C1, from
    /// the same code (the machine check included), changing nothing.
    ///
    /// With the source's machine type and CPU model (QEMU), this host's
    /// must be the same: a check Prepare cannot make, since C1 does not
    /// carry them, and the transfer would fail late without it.
    pub async fn check_prepare(
        &self,
        request: proto::CheckPrepareRequest,
        from: Option<String>,
    ) -> Result<proto::CheckPrepareReply, Refusal> {
        let cookie1 = request.cookie1;
        let c1 = crate::protocol::cookies::decode::<proto::Cookie1>("C1", &cookie1).ok();
        let source_host = c1.as_ref().map(|c1| c1.source.clone()).unwrap_or_default();
        let mode = c1
            .as_ref()
            .and_then(|c1| crate::protocol::record::mode_from_proto(c1.mode));
        let spec = c1
            .and_then(|c1| c1.vm)
            .and_then(|vm| crate::protocol::cookies::vm_from_proto(&vm).ok());
        let feature_checks = match (&spec, mode) {
            (Some(spec), Some(mode)) => self.feature_checks(spec, mode).await,
            _ => Vec::new(),
        };
        let machine = self.check_machine(&cookie1).map(|()| {
            let vm = spec.as_ref().map_or("the VM", |s| s.name.as_str());
            format!(
                "{} can run the machine of {vm} ({} hypervisor)",
                self.name,
                self.hypervisor.kind()
            )
        });
        let guests = self.guests().await;
        let checks = self
            .query(move |core| core.check_prepare(&cookie1, &guests, from.as_deref(), machine))
            .await
            .ok_or_else(|| Refusal::Unavailable(format!("agent {} has stopped", self.name)))??;
        let mut checks: Vec<proto::AdmissionCheck> =
            checks.iter().map(host::Check::to_proto).collect();
        if let Some(spec) = spec.filter(|_| !request.machine_type.is_empty()) {
            let source = crate::hypervisor::Platform {
                machine_type: request.machine_type,
                cpu_model: request.cpu_model,
            };
            let verdict = match self.platform_of(spec.clone()).await {
                None => Err(format!(
                    "{} runs no QEMU ({} hypervisor): it cannot receive {}'s QEMU guest",
                    self.name,
                    self.hypervisor.kind(),
                    spec.name
                )),
                Some(Err(e)) => Err(format!("{}: {e}", self.name)),
                Some(Ok(here)) => crate::hypervisor::qemu::platform::compare(
                    &spec.name,
                    &source_host,
                    &source,
                    &self.name,
                    &here,
                ),
            };
            let at = checks
                .iter()
                .position(|c| c.name == "machine")
                .map_or(checks.len(), |i| i + 1);
            checks.insert(
                at,
                proto::AdmissionCheck {
                    name: "machine type".into(),
                    host: self.name.clone(),
                    ok: verdict.is_ok(),
                    detail: verdict.unwrap_or_else(|e| e),
                },
            );
        }
        checks.extend(feature_checks);
        Ok(proto::CheckPrepareReply { checks })
    }

    /// What each feature's driver here can tell before it tries
    /// (`Feature::check`, a bridge that does not exist, say): blocking for
    /// a required feature in safe mode, noted otherwise, as Prepare would.
    async fn feature_checks(
        &self,
        spec: &crate::protocol::VmSpec,
        mode: Mode,
    ) -> Vec<proto::AdmissionCheck> {
        let mut nics = NicPort::of(spec);
        shell::place_nics(self.hypervisor.as_ref(), &spec.name, &mut nics);
        let mut checks = Vec::new();
        for feature in &spec.features {
            let Some(driver) = self.features.get(&feature.name) else {
                continue;
            };
            let ctx = crate::features::StageContext {
                host: self.name.clone(),
                vm: spec.name.clone(),
                feature: feature.clone(),
                stage: crate::protocol::Stage::Prepare,
                attempt_id: String::new(),
                migration_id: String::new(),
                nics: nics.clone(),
                guest: None,
            };
            let Some(result) = driver.check(&ctx).await else {
                continue;
            };
            let blocking = crate::protocol::policy::is_blocking(mode, feature.required);
            checks.push(proto::AdmissionCheck {
                name: format!("feature {}", feature.name),
                host: self.name.clone(),
                ok: result.is_ok() || !blocking,
                detail: match result {
                    Ok(detail) => detail,
                    Err(e) if blocking => e,
                    Err(e) => format!(
                        "{e} (not blocking: {} is {} in {} mode, so the move would go on without it, degraded)",
                        feature.name,
                        if feature.required { "required" } else { "optional" },
                        mode.as_str()
                    ),
                },
            });
        }
        checks
    }

    /// Whether this host drains, and its migrations out and in now.
    pub async fn traffic(&self) -> Traffic {
        self.query(|core| Traffic {
            draining: core.is_draining(),
            outgoing: core.outgoing(),
            incoming: core.incoming(),
        })
        .await
        .unwrap_or_default()
    }

    pub async fn migration(&self, id: &str) -> Option<MigrationRecord> {
        let id = id.to_string();
        self.query(move |core| core.migration(&id).cloned())
            .await
            .flatten()
    }

    pub async fn evacuation(&self, id: &str) -> Option<Evacuation> {
        let id = id.to_string();
        self.query(move |core| core.evacuation(&id).cloned())
            .await
            .flatten()
    }

    /// Wait until the migration's latest attempt has ended: an outcome, and
    /// nothing left running for it here (the guest's resume or kill has
    /// answered, so the record says where the guest is), or unresolved.
    pub async fn wait_migration(&self, id: &str) -> Result<MigrationRecord, Refusal> {
        bounds::check_id("MigrationRef.id", id, IdKind::Migration)
            .map_err(|e| Refusal::InvalidArgument(e.to_string()))?;
        self.wait_until(|| async {
            let key = id.to_string();
            let (record, live) = self
                .query(move |core| {
                    let record = core.migration(&key).cloned();
                    let live = record.as_ref().is_some_and(|r| core.is_live(&r.attempt_id));
                    (record, live)
                })
                .await
                .unwrap_or((None, false));
            let record = record
                .ok_or_else(|| Refusal::NotFound(format!("no migration {id} on {}", self.name)))?;
            let ended = match record.outcome {
                Some(crate::protocol::Outcome::Unresolved) => true,
                Some(_) => !live,
                None => false,
            };
            Ok(ended.then_some(record))
        })
        .await
    }

    /// Wait until an evacuation has ended.
    pub async fn wait_evacuation(&self, id: &str) -> Result<Evacuation, Refusal> {
        bounds::check_id("EvacuationRef.id", id, IdKind::Evacuation)
            .map_err(|e| Refusal::InvalidArgument(e.to_string()))?;
        self.wait_until(|| async {
            let job = self
                .evacuation(id)
                .await
                .ok_or_else(|| Refusal::NotFound(format!("no evacuation {id} on {}", self.name)))?;
            Ok(job.state.is_over().then_some(job))
        })
        .await
    }

    /// Look again after every event until `ready` has an answer.
    async fn wait_until<T, F, Fut>(&self, mut ready: F) -> Result<T, Refusal>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Option<T>, Refusal>>,
    {
        let mut events = self.subscribe();
        loop {
            if let Some(answer) = ready().await? {
                return Ok(answer);
            }
            match events.recv().await {
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => {
                    return Err(Refusal::Unavailable(format!(
                        "agent {} is stopping",
                        self.name
                    )));
                }
            }
        }
    }

    /// A page of this host's migrations, by id (ListMigrations).
    pub async fn migrations_page(
        &self,
        size: u32,
        token: &str,
    ) -> Result<(Vec<proto::MigrationRecord>, String), Refusal> {
        let after = page_token("ListMigrationsRequest.page_token", token, |t| {
            bounds::check_id("ListMigrationsRequest.page_token", t, IdKind::Migration)
        })?;
        let size = page_size(size);
        let records = self
            .query(move |core| {
                core.migrations_after(after.as_deref(), size + 1)
                    .into_iter()
                    .map(|r| (r.id.clone(), proto::MigrationRecord::from(r)))
                    .collect::<Vec<_>>()
            })
            .await
            .unwrap_or_default();
        Ok(page(records, size))
    }

    /// A page of this host's evacuations, by id (ListEvacuations).
    pub async fn evacuations_page(
        &self,
        size: u32,
        token: &str,
    ) -> Result<(Vec<proto::EvacuationRecord>, String), Refusal> {
        let after = page_token("ListEvacuationsRequest.page_token", token, |t| {
            bounds::check_id("ListEvacuationsRequest.page_token", t, IdKind::Evacuation)
        })?;
        let size = page_size(size);
        let jobs = self
            .query(move |core| {
                core.evacuations_after(after.as_deref(), size + 1)
                    .into_iter()
                    .map(|job| (job.id.clone(), job.to_proto()))
                    .collect::<Vec<_>>()
            })
            .await
            .unwrap_or_default();
        Ok(page(jobs, size))
    }

    /// A page of this host's guests, by name (ListVms).
    pub async fn vms_page(
        &self,
        size: u32,
        token: &str,
    ) -> Result<(Vec<proto::Vm>, String), Refusal> {
        let after = page_token("ListVmsRequest.page_token", token, |t| {
            bounds::check_name("ListVmsRequest.page_token", t)
        })?;
        let size = page_size(size);
        let mut vms = self.vms().await;
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        let vms = vms
            .into_iter()
            .filter(|v| after.as_ref().is_none_or(|a| v.name > *a))
            .take(size + 1)
            .map(|v| (v.name.clone(), v))
            .collect();
        Ok(page(vms, size))
    }

    /// The first event of a Watch stream: the host, its VMs, its open
    /// migrations and evacuations and the most recent closed ones, so that
    /// it stays the same size however long the host has lived.
    pub async fn snapshot(&self) -> proto::Snapshot {
        let (migrations, evacuations) = self
            .query(|core| {
                let open = |r: &&MigrationRecord| core.is_live(&r.attempt_id);
                let migrations: Vec<(bool, proto::MigrationRecord)> = core
                    .recent_migrations(SNAPSHOT_CLOSED_MIGRATIONS)
                    .into_iter()
                    .map(|r| (open(&r), proto::MigrationRecord::from(r)))
                    .collect();
                let evacuations: Vec<(bool, proto::EvacuationRecord)> = core
                    .recent_evacuations(SNAPSHOT_CLOSED_EVACUATIONS)
                    .into_iter()
                    .map(|job| (!job.state.is_over(), job.to_proto()))
                    .collect();
                (migrations, evacuations)
            })
            .await
            .unwrap_or_default();
        proto::Snapshot {
            host: Some(self.host_info().await),
            vms: self.vms().await,
            migrations: within_budget(migrations),
            evacuations: within_budget(evacuations),
        }
    }

    pub async fn vms(&self) -> Vec<proto::Vm> {
        let guests = self.guests().await;
        let names: Vec<String> = guests.iter().map(|g| g.spec.name.clone()).collect();
        let locks = self
            .query(move |core| {
                names
                    .iter()
                    .map(|n| core.lock_of(n).unwrap_or_default().to_string())
                    .collect::<Vec<_>>()
            })
            .await
            .unwrap_or_default();
        guests
            .into_iter()
            .enumerate()
            .map(|(i, g)| self.to_vm(g, locks.get(i).cloned().unwrap_or_default()))
            .collect()
    }

    fn to_vm(&self, guest: crate::hypervisor::Guest, migration_id: String) -> proto::Vm {
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

    pub async fn host_info(&self) -> proto::Host {
        let capacity = self.hypervisor.capacity();
        let guests = self.guests().await;
        let memory_used_mib = guests.iter().map(|g| g.spec.memory_mib).sum();
        let vcpus_used = guests.iter().map(|g| g.spec.vcpus).sum();
        let state = self
            .query(|core| {
                (
                    core.pending().cloned().collect::<Vec<_>>(),
                    core.is_draining(),
                    core.outgoing() as u32,
                    core.incoming() as u32,
                    core.warnings().to_vec(),
                )
            })
            .await;
        let (pending, draining, outgoing, incoming, mut warnings) = state.unwrap_or_default();
        if self.insecure {
            warnings.insert(
                0,
                "INSECURE: plaintext without identities on a network address (insecure = true): \
                 anyone who reaches this agent may do anything"
                    .to_string(),
            );
        }
        proto::Host {
            security: self.security().to_string(),
            name: self.name.clone(),
            address: self.address.clone(),
            memory_total_mib: capacity.memory_mib,
            memory_used_mib,
            vcpus_total: capacity.vcpus,
            vcpus_used,
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
            pending_rollbacks: pending.into_iter().map(pending_to_proto).collect(),
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
            draining,
            hypervisor: self.hypervisor.kind().to_string(),
            max_outgoing: self.max_outgoing,
            max_incoming: self.max_incoming,
            outgoing,
            incoming,
            warnings,
        }
    }

    /// Tell the core to stop (abort what has not committed, tell the peers,
    /// wait bounded for the rest) and wait until it has.
    pub async fn shut_down(&self) {
        self.stopping.send_replace(true);
        let _ = self.core.send(Msg::Input(host::Input::Stop));
        let mut exited = self.exited.subscribe();
        let _ = exited.wait_for(|e| *e).await.map(|_| ());
    }
}

/// host → the host its incoming addresses must name (see
/// `protocol::address`): the inventory's migration address on QEMU; on the
/// simulated hypervisor, whose addresses are `sim://HOST/…`, the host's name.
fn migration_hosts(inventory: &Inventory, kind: &str) -> BTreeMap<String, String> {
    inventory
        .host
        .iter()
        .map(|h| {
            let expected = match kind {
                "sim" => address::normal_host(&h.name),
                _ => h.migration_host(),
            };
            // An inventory that parsed has a host in every address; a name
            // no address can carry leaves a host no address matches.
            (h.name.clone(), expected.unwrap_or_default())
        })
        .collect()
}

/// Read the agent's `[tls]` files: the certificate must be an agent's,
/// issued to this host.
fn own_identity(name: &str, files: &TlsConfig) -> Result<IdentityFiles, StartError> {
    let loaded =
        IdentityFiles::load(files).map_err(|e| StartError::Config(format!("[tls]: {e}")))?;
    let id = &loaded.identity;
    if id.role != Role::Agent || id.name != name {
        return Err(StartError::Config(format!(
            "[tls] cert {} belongs to {id}; this agent needs one issued to {name} with the agent role \
             (tern ca issue --role agent {name})",
            files.cert.display()
        )));
    }
    Ok(loaded)
}

/// The state directory holds the journal and the guests' files: only the
/// agent's user may read it. Created with mode 0700 (0711 when QEMU, as
/// another user, must pass through it); one that exists otherwise is set so.
fn create_state_dir(path: &std::path::Path, wanted: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(wanted)
        .create(path)?;
    let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
    if mode != wanted {
        tracing::warn!(
            "state_dir {} had mode {mode:o}; setting it to {wanted:o}",
            path.display()
        );
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(wanted))?;
    }
    Ok(())
}

/// Make a SQLite database of the agent's own, and its -wal and -shm files,
/// readable by its user alone: SQLite creates them by the umask.
pub fn make_private(db: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    for suffix in ["", "-wal", "-shm"] {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        let path = std::path::PathBuf::from(name);
        if !path.exists() {
            continue;
        }
        if let Err(e) = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)) {
            tracing::warn!("cannot make {} private: {e}", path.display());
        }
    }
}

/// Closed migrations a Watch snapshot carries besides the open ones.
pub const SNAPSHOT_CLOSED_MIGRATIONS: usize = 500;
/// Closed evacuations a Watch snapshot carries besides the running ones.
pub const SNAPSHOT_CLOSED_EVACUATIONS: usize = 20;
/// The page size of a List call that asks for none, and the most it gets.
pub const DEFAULT_PAGE_SIZE: u32 = 500;
pub const MAX_PAGE_SIZE: u32 = 1000;

fn page_size(asked: u32) -> usize {
    let size = match asked {
        0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    };
    size as usize
}

/// A page token: empty for the first page, else the key the last page
/// ended at, checked by the rule of its keys.
fn page_token(
    field: &str,
    token: &str,
    check: impl Fn(&str) -> Result<(), bounds::BoundsError>,
) -> Result<Option<String>, Refusal> {
    if token.is_empty() {
        return Ok(None);
    }
    check(token).map_err(|e| {
        Refusal::InvalidArgument(format!("{e} ({field} is the next_page_token of a page)"))
    })?;
    Ok(Some(token.to_string()))
}

/// One page of a List answer from up to `size + 1` keyed items in key
/// order: at most `size`, and no more than [`bounds::MAX_PAGE_BYTES`]
/// encoded (one item at least). The token is the last key when more follow.
fn page<T: prost::Message>(items: Vec<(String, T)>, size: usize) -> (Vec<T>, String) {
    let more = items.len() > size;
    let mut out = Vec::new();
    let mut bytes = 0;
    let mut last = String::new();
    for (key, item) in items.into_iter().take(size) {
        let len = item.encoded_len();
        if !out.is_empty() && bytes + len > bounds::MAX_PAGE_BYTES {
            return (out, last);
        }
        bytes += len;
        last = key;
        out.push(item);
    }
    (out, if more { last } else { String::new() })
}

/// What a snapshot keeps of `(open, item)`s: every open one, and the closed
/// ones in the order given (newest first) until the first that would pass
/// [`bounds::MAX_PAGE_BYTES`], so no older one shows where a newer is left out.
fn within_budget<T: prost::Message>(items: Vec<(bool, T)>) -> Vec<T> {
    let mut bytes = 0;
    let mut full = false;
    items
        .into_iter()
        .filter(|(open, item)| {
            if *open {
                return true;
            }
            bytes += item.encoded_len();
            full |= bytes > bounds::MAX_PAGE_BYTES;
            !full
        })
        .map(|(_, item)| item)
        .collect()
}

pub fn pending_to_proto(p: host::Pending) -> proto::PendingRollback {
    proto::PendingRollback {
        attempt_id: p.attempt_id,
        migration_id: p.migration_id,
        vm: p.vm,
        feature: p.feature,
        stage: p.work.as_str().to_string(),
        error: p.error,
        tries: p.tries,
        next_try_at_ms: p.next_try_ms,
    }
}

fn unexpected(r: Response) -> Refusal {
    Refusal::Unavailable(format!("unexpected answer from the host core: {r:?}"))
}

fn migration(reply: host::Reply) -> Result<MigrationRecord, Refusal> {
    match reply? {
        Response::Migration(record) => Ok(*record),
        other => Err(unexpected(other)),
    }
}

fn evacuation(reply: host::Reply) -> Result<Evacuation, Refusal> {
    match reply? {
        Response::Evacuation(job) => Ok(job),
        other => Err(unexpected(other)),
    }
}

/// Run an agent until it is told to stop (SIGINT, SIGTERM, SIGHUP).
pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    // Signals are caught before anything else: one that comes while the
    // agent starts is an orderly stop as soon as it has started.
    let (stop_tx, stop_rx) = mpsc::channel::<()>(1);
    let signals = listen_for_signals()?;
    tokio::spawn(async move {
        wait_for_signal(signals).await;
        let _ = stop_tx.send(()).await;
    });
    let inventory = Inventory::load(&config.inventory)?;
    let listen: SocketAddr = config.listen.parse()?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    let metrics = match &config.metrics_listen {
        Some(addr) => Some(metrics::bind(addr).await?),
        None => None,
    };
    let agent = Agent::open(&config, inventory).await?;
    if let Some(listener) = metrics {
        tracing::info!(host = %agent.name, addr = %listener.local_addr()?, "serving metrics at /metrics");
        tokio::spawn(metrics::serve(agent.clone(), listener));
    }
    serve(agent, listener, stop_rx).await
}

/// Serve an agent on `listener` until `stop` yields, then shut it down.
pub async fn serve(
    agent: Arc<Agent>,
    listener: tokio::net::TcpListener,
    mut stop: mpsc::Receiver<()>,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(host = %agent.name, %addr, "agent listening");
    let (server_stop_tx, server_stop_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(service::serve(agent.clone(), listener, server_stop_rx));
    let mut exited = agent.exited.subscribe();
    let core_gone = async move {
        let _ = exited.wait_for(|e| *e).await;
    };
    let told = tokio::select! {
        _ = stop.recv() => true,
        // The core ended on its own: a server without a core only refuses.
        () = core_gone => false,
    };
    if told {
        tracing::info!(host = %agent.name, "stopping: aborting uncommitted attempts");
        agent.shut_down().await;
    }
    let _ = server_stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    tracing::info!(host = %agent.name, "stopped");
    Ok(())
}

type Signals = [tokio::signal::unix::Signal; 3];

/// Install the handlers of SIGINT, SIGTERM and SIGHUP.
fn listen_for_signals() -> anyhow::Result<Signals> {
    use tokio::signal::unix::{SignalKind, signal};
    let install =
        |kind| signal(kind).map_err(|e| anyhow::anyhow!("cannot install a signal handler: {e}"));
    Ok([
        install(SignalKind::interrupt())?,
        install(SignalKind::terminate())?,
        install(SignalKind::hangup())?,
    ])
}

async fn wait_for_signal(signals: Signals) {
    let [mut int, mut term, mut hup] = signals;
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
        _ = hup.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, bytes: usize) -> (String, proto::Vm) {
        let vm = proto::Vm {
            name: name.into(),
            migration_id: "x".repeat(bytes),
            ..Default::default()
        };
        (name.into(), vm)
    }

    fn names(vms: &[proto::Vm]) -> Vec<&str> {
        vms.iter().map(|v| v.name.as_str()).collect()
    }

    #[test]
    fn a_page_stops_at_its_size_or_its_bytes_and_says_where_to_go_on() {
        // Three asked for, four fetched: more follow, from the third.
        let items = vec![vm("a", 10), vm("b", 10), vm("c", 10), vm("d", 10)];
        let (page_, next) = page(items, 3);
        assert_eq!((names(&page_), next.as_str()), (vec!["a", "b", "c"], "c"));
        // The last page: no token.
        let (page_, next) = page(vec![vm("a", 10), vm("b", 10)], 3);
        assert_eq!((names(&page_), next.as_str()), (vec!["a", "b"], ""));
        // Bytes end a page early, and its token goes on after what it holds.
        let big = bounds::MAX_PAGE_BYTES / 2;
        let items = vec![vm("a", big), vm("b", big), vm("c", 10)];
        let (page_, next) = page(items, 10);
        assert_eq!((names(&page_), next.as_str()), (vec!["a"], "a"));
        // One item too large for a page still goes, alone.
        let (page_, next) = page(vec![vm("a", 2 * big), vm("b", 10)], 10);
        assert_eq!((names(&page_), next.as_str()), (vec!["a"], "a"));
    }

    #[test]
    fn a_snapshot_keeps_every_open_item_and_closed_ones_within_its_budget() {
        let big = bounds::MAX_PAGE_BYTES / 2;
        let items = vec![
            (true, vm("open-1", big).1),
            (false, vm("closed-1", big).1),
            (false, vm("closed-2", big).1),
            (false, vm("closed-3", 10).1),
            (true, vm("open-2", big).1),
        ];
        // The open ones cost nothing against the budget.
        assert_eq!(
            names(&within_budget(items)),
            ["open-1", "closed-1", "open-2"]
        );
    }

    #[test]
    fn page_sizes_default_and_cap() {
        assert_eq!(page_size(0), DEFAULT_PAGE_SIZE as usize);
        assert_eq!(page_size(7), 7);
        assert_eq!(page_size(1_000_000), MAX_PAGE_SIZE as usize);
    }
}
