//! The real hypervisor: one `qemu-system-x86_64` process per guest, driven
//! over QMP the way Proxmox VE drives it.
//!
//! Every guest lives in `state_dir/qemu/`: `NAME.qmp` (its QMP socket),
//! `NAME.pid`, `NAME.log` (QEMU's stdout and stderr, followed into the
//! agent's log) and `NAME.serial` (kept as `.prev` once the guest leaves). `guests.json` lists the guests this host
//! holds with their specs. QEMU runs in its own process group and outlives
//! the agent: a restarted agent re-attaches to the sockets that still answer
//! instead of starting or killing anything, and the journal's recovery then
//! decides what each guest becomes.
//!
//! The phases: Prepare starts the incoming guest with `-incoming defer -S`
//! and `migrate-incoming` on port 0 of the migration address; Perform runs
//! `migrate` with the capabilities and parameters from config and turns
//! `query-migrate` into progress; Finish waits for the incoming side to
//! complete, and the guest's CPUs start only on `resume` (`cont`). Abort is
//! `migrate_cancel`, resume the source, kill the incoming QEMU.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;

use super::qmp::{MigrationInfo, Qmp, QmpError};
use super::{Guest, GuestState, HostCapacity, Hypervisor, HypervisorError};
use crate::config::AgentConfig;
use crate::protocol::{TransferStats, VmSpec};

/// How often a transfer's progress is read from QEMU.
const POLL: Duration = Duration::from_millis(100);
/// How long a starting QEMU may take to open its QMP socket.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the incoming side may take to load what the source sent after
/// the source reported the transfer complete.
const INCOMING_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `quit` may take before the process is killed.
const QUIT_TIMEOUT: Duration = Duration::from_secs(3);

/// The qemu settings of an agent config.
#[derive(Debug, Clone)]
pub struct QemuSettings {
    pub binary: String,
    /// "kvm" or "tcg", already resolved from "auto".
    pub accel: String,
    pub machine: String,
    pub migration_address: String,
    pub max_bandwidth_bytes_s: u64,
    pub downtime_limit_ms: u64,
    pub auto_converge: bool,
    pub multifd_channels: u32,
    pub capacity: HostCapacity,
}

impl QemuSettings {
    pub fn from_config(config: &AgentConfig) -> QemuSettings {
        let h = &config.hypervisor;
        QemuSettings {
            binary: h.binary.clone(),
            accel: resolve_accel(&h.accel),
            machine: h.machine.clone(),
            migration_address: config.migration_address(),
            max_bandwidth_bytes_s: h.bandwidth_mib_s.saturating_mul(1 << 20),
            downtime_limit_ms: h.downtime_limit_ms,
            auto_converge: h.auto_converge,
            multifd_channels: h.multifd_channels,
            capacity: HostCapacity {
                memory_mib: h.memory_mib,
                vcpus: h.vcpus,
            },
        }
    }
}

/// "auto" is KVM when /dev/kvm opens for reading and writing, TCG otherwise.
pub fn resolve_accel(accel: &str) -> String {
    match accel {
        "auto" => {
            let kvm = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_ok();
            if kvm { "kvm" } else { "tcg" }.to_string()
        }
        other => other.to_string(),
    }
}

/// A guest this host holds, as `guests.json` keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Held {
    spec: VmSpec,
    /// Started paused for an incoming migration and not resumed since.
    incoming: bool,
}

struct Instance {
    held: Held,
    qmp: Qmp,
    state: GuestState,
}

pub struct QemuHypervisor {
    settings: QemuSettings,
    dir: PathBuf,
    guests: Mutex<BTreeMap<String, Instance>>,
    /// Serialises changes to `guests.json`.
    file: Mutex<()>,
}

impl QemuHypervisor {
    /// Re-attach to the guests of an earlier run, or on the very first run
    /// start the configured ones.
    pub async fn open(
        state_dir: &Path,
        settings: QemuSettings,
        seed: &[VmSpec],
    ) -> Result<QemuHypervisor, HypervisorError> {
        let dir = state_dir.join("qemu");
        std::fs::create_dir_all(&dir)
            .map_err(|e| failed(format!("cannot create {}: {e}", dir.display())))?;
        let hypervisor = QemuHypervisor {
            settings,
            dir,
            guests: Mutex::new(BTreeMap::new()),
            file: Mutex::new(()),
        };
        let list = hypervisor.list_path();
        if list.exists() {
            hypervisor.reattach().await?;
        } else {
            for spec in seed {
                hypervisor.launch(spec, false).await?;
            }
            hypervisor.save()?;
        }
        Ok(hypervisor)
    }

    fn list_path(&self) -> PathBuf {
        self.dir.join("guests.json")
    }

    fn path(&self, vm: &str, ext: &str) -> PathBuf {
        self.dir.join(format!("{vm}.{ext}"))
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Instance>> {
        self.guests.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn qmp(&self, vm: &str) -> Result<Qmp, HypervisorError> {
        self.lock()
            .get(vm)
            .map(|i| i.qmp.clone())
            .ok_or_else(|| HypervisorError::NoSuchGuest(vm.to_string()))
    }

    fn set_state(&self, vm: &str, state: GuestState) {
        let incoming_changed = {
            let mut guests = self.lock();
            let Some(instance) = guests.get_mut(vm) else {
                return;
            };
            instance.state = state;
            let incoming = state == GuestState::Incoming;
            let changed = instance.held.incoming != incoming;
            instance.held.incoming = incoming;
            changed
        };
        if incoming_changed && let Err(e) = self.save() {
            tracing::error!(vm, "{e}");
        }
    }

    /// Write `guests.json` atomically (write, fsync, rename).
    fn save(&self) -> Result<(), HypervisorError> {
        let _file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let held: BTreeMap<String, Held> = self
            .lock()
            .iter()
            .map(|(name, i)| (name.clone(), i.held.clone()))
            .collect();
        let path = self.list_path();
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(&held).map_err(|e| failed(e.to_string()))?;
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|e| failed(format!("cannot write {}: {e}", path.display())))
    }

    /// The guests of an earlier run whose QEMU still answers; the others are
    /// gone (the host rebooted, or QEMU died) and are dropped with a warning.
    async fn reattach(&self) -> Result<(), HypervisorError> {
        let path = self.list_path();
        let text = std::fs::read(&path)
            .map_err(|e| failed(format!("cannot read {}: {e}", path.display())))?;
        let held: BTreeMap<String, Held> = serde_json::from_slice(&text)
            .map_err(|e| failed(format!("{} is corrupt: {e}", path.display())))?;
        for (name, held) in held {
            let socket = self.path(&name, "qmp");
            let attached = match Qmp::connect(&socket).await {
                Ok(qmp) => qmp.query_status().await.map(|s| (qmp, s)),
                Err(e) => Err(e),
            };
            match attached {
                Ok((qmp, status)) => {
                    let state = guest_state(&status.status, held.incoming);
                    tracing::info!(vm = name, status = status.status, "re-attached to QEMU");
                    self.follow_log(&name, true);
                    self.lock().insert(name, Instance { held, qmp, state });
                }
                Err(e) => {
                    tracing::warn!(
                        vm = name,
                        "the QEMU of {name} is gone ({e}); it no longer runs on this host"
                    );
                    self.remove_files(&name);
                }
            }
        }
        self.save()
    }

    /// Start a QEMU for `spec`: running, or paused for an incoming migration.
    async fn launch(&self, spec: &VmSpec, incoming: bool) -> Result<Qmp, HypervisorError> {
        let name = &spec.name;
        if name.is_empty() || name.contains(['/', '\0']) || name.starts_with('.') {
            return Err(failed(format!("{name:?} cannot name a QEMU guest")));
        }
        let socket = self.path(name, "qmp");
        let log = self.path(name, "log");
        let _ = std::fs::remove_file(&socket);
        let mut command = tokio::process::Command::new(&self.settings.binary);
        command.args(self.arguments(spec, incoming));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| failed(format!("cannot open {}: {e}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(|e| failed(format!("cannot open {}: {e}", log.display())))?;
        command
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err)
            // Its own process group: a ^C meant for the agent, or the
            // agent's death, must not take the guests with it.
            .process_group(0);
        let mut child = command.spawn().map_err(|e| {
            failed(format!(
                "cannot start {} for {name}: {e}",
                self.settings.binary
            ))
        })?;
        self.follow_log(name, false);
        // Reap it when it exits; while the agent runs nothing else waits on it.
        let exited = Arc::new(Mutex::new(None));
        {
            let exited = exited.clone();
            let vm = name.clone();
            tokio::spawn(async move {
                if let Ok(status) = child.wait().await {
                    tracing::info!(vm, "QEMU exited: {status}");
                    *exited.lock().unwrap_or_else(|p| p.into_inner()) = Some(status);
                }
            });
        }
        let qmp = match Qmp::connect_within(&socket, START_TIMEOUT).await {
            Ok(qmp) => qmp,
            Err(e) => {
                let _ = self.kill_by_pidfile(name);
                let status = *exited.lock().unwrap_or_else(|p| p.into_inner());
                let why = last_lines(&log, 3);
                return Err(failed(match status {
                    Some(status) => format!("QEMU for {name} exited at start ({status}): {why}"),
                    None => format!("QEMU for {name} did not open QMP: {e}; {why}"),
                }));
            }
        };
        let state = if incoming {
            GuestState::Incoming
        } else {
            GuestState::Running
        };
        self.lock().insert(
            name.clone(),
            Instance {
                held: Held {
                    spec: spec.clone(),
                    incoming,
                },
                qmp: qmp.clone(),
                state,
            },
        );
        Ok(qmp)
    }

    /// QEMU's command line for `spec`.
    fn arguments(&self, spec: &VmSpec, incoming: bool) -> Vec<String> {
        let s = &self.settings;
        let name = &spec.name;
        let path = |ext: &str| self.path(name, ext).display().to_string();
        let mut args: Vec<String> = vec![
            "-name".into(),
            format!("guest={name}"),
            "-machine".into(),
            format!("{},accel={}", s.machine, s.accel),
            "-m".into(),
            spec.memory_mib.to_string(),
            "-smp".into(),
            spec.vcpus.max(1).to_string(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", path("qmp")),
            "-pidfile".into(),
            path("pid"),
            "-serial".into(),
            format!("file:{}", path("serial")),
        ];
        if let Some(q) = &spec.qemu {
            if !q.kernel.is_empty() {
                args.extend(["-kernel".into(), q.kernel.clone()]);
                if !q.append.is_empty() {
                    args.extend(["-append".into(), q.append.clone()]);
                }
            }
            args.extend(q.args.iter().cloned());
        }
        if incoming {
            args.extend(["-incoming".into(), "defer".into(), "-S".into()]);
        }
        args
    }

    /// Follow `NAME.log` into the agent's log, from its end when
    /// re-attaching (what is there was logged by the earlier run).
    fn follow_log(&self, vm: &str, from_end: bool) {
        let path = self.path(vm, "log");
        let vm = vm.to_string();
        tokio::spawn(async move {
            let Ok(mut file) = tokio::fs::File::open(&path).await else {
                return;
            };
            if from_end {
                let _ = file.seek(std::io::SeekFrom::End(0)).await;
            }
            let mut pending = Vec::new();
            let mut buf = vec![0u8; 4096];
            let mut idle = 0u32;
            loop {
                match file.read(&mut buf).await {
                    Ok(0) => {
                        // The file is renamed when the guest goes; stop then.
                        idle += 1;
                        if idle.is_multiple_of(20) && !path.exists() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    Ok(n) => {
                        idle = 0;
                        pending.extend_from_slice(&buf[..n]);
                        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                            let line: Vec<u8> = pending.drain(..=end).collect();
                            let line = String::from_utf8_lossy(&line);
                            let line = line.trim_end();
                            if !line.is_empty() {
                                tracing::warn!(vm, "qemu: {line}");
                            }
                        }
                    }
                    Err(_) => return,
                }
            }
        });
    }

    fn kill_by_pidfile(&self, vm: &str) -> Result<(), HypervisorError> {
        let pidfile = self.path(vm, "pid");
        let Ok(text) = std::fs::read_to_string(&pidfile) else {
            return Ok(());
        };
        let Ok(pid) = text.trim().parse::<i32>() else {
            return Ok(());
        };
        if pid > 1 && is_qemu(pid, &self.settings.binary) {
            // SAFETY: kill(2) with a pid read from QEMU's own pidfile and
            // checked to still be a QEMU process.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        Ok(())
    }

    /// Remove a gone guest's socket and pidfile; its log and serial output
    /// are kept as `NAME.log.prev` and `NAME.serial.prev` for a post-mortem.
    fn remove_files(&self, vm: &str) {
        for ext in ["qmp", "pid"] {
            let _ = std::fs::remove_file(self.path(vm, ext));
        }
        for ext in ["log", "serial"] {
            let _ = std::fs::rename(self.path(vm, ext), self.path(vm, &format!("{ext}.prev")));
        }
    }

    /// Capabilities and parameters from config, set on both ends (multifd
    /// must be on both).
    async fn configure_migration(&self, qmp: &Qmp) -> Result<(), HypervisorError> {
        let s = &self.settings;
        qmp.migrate_set_capabilities(&[
            ("auto-converge", s.auto_converge),
            ("multifd", s.multifd_channels > 0),
            ("events", true),
        ])
        .await
        .map_err(qemu_error)?;
        let mut parameters = json!({
            "max-bandwidth": s.max_bandwidth_bytes_s,
            "downtime-limit": s.downtime_limit_ms,
        });
        if s.multifd_channels > 0 {
            parameters["multifd-channels"] = json!(s.multifd_channels);
        }
        qmp.migrate_set_parameters(parameters)
            .await
            .map_err(qemu_error)
    }
}

/// Our guest state from QEMU's run state.
fn guest_state(status: &str, incoming: bool) -> GuestState {
    match status {
        "running" => GuestState::Running,
        "inmigrate" => GuestState::Incoming,
        _ if incoming => GuestState::Incoming,
        _ => GuestState::Paused,
    }
}

/// Progress as the protocol reports it, from `query-migrate`.
pub fn transfer_stats(info: &MigrationInfo) -> TransferStats {
    let ram = info.ram.clone().unwrap_or_default();
    let page = if ram.page_size == 0 {
        4096
    } else {
        ram.page_size
    };
    TransferStats {
        bytes_total: ram.total,
        bytes_transferred: ram.transferred,
        bytes_remaining: ram.remaining,
        rate_bytes_s: (ram.mbps * 1_000_000.0 / 8.0) as u64,
        dirty_rate_bytes_s: ram.dirty_pages_rate.saturating_mul(page),
        iteration: ram.dirty_sync_count.min(u32::MAX as u64) as u32,
        expected_downtime_ms: info.expected_downtime.or(info.downtime).unwrap_or(0),
        elapsed_ms: info.total_time.unwrap_or(0),
        setup_time_ms: info.setup_time.unwrap_or(0),
        downtime_ms: info.downtime.unwrap_or(0),
    }
}

fn failed(text: String) -> HypervisorError {
    HypervisorError::Failed(text)
}

/// QEMU's own words reach the operator.
fn qemu_error(e: QmpError) -> HypervisorError {
    HypervisorError::Failed(e.to_string())
}

/// The last `n` non-empty lines of a log, joined, for an error message.
fn last_lines(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return "it printed nothing".into();
    }
    lines[lines.len().saturating_sub(n)..].join(" / ")
}

/// Whether `pid` runs the QEMU binary (so a recycled pid is never killed).
fn is_qemu(pid: i32, binary: &str) -> bool {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    let base = Path::new(binary)
        .file_name()
        .map(|b| b.to_string_lossy().to_string())
        .unwrap_or_default();
    exe.file_name()
        .is_some_and(|f| f.to_string_lossy().starts_with(&base))
}

#[async_trait]
impl Hypervisor for QemuHypervisor {
    fn kind(&self) -> &'static str {
        "qemu"
    }

    fn capacity(&self) -> HostCapacity {
        self.settings.capacity
    }

    async fn guests(&self) -> Vec<Guest> {
        self.lock()
            .values()
            .map(|i| Guest {
                spec: i.held.spec.clone(),
                state: i.state,
            })
            .collect()
    }

    async fn start_incoming(
        &self,
        spec: &VmSpec,
        _attempt_id: &str,
    ) -> Result<String, HypervisorError> {
        if self.lock().contains_key(&spec.name) {
            return Err(HypervisorError::AlreadyExists(spec.name.clone()));
        }
        let qmp = self.launch(spec, true).await?;
        self.save()?;
        let listen = async {
            self.configure_migration(&qmp).await?;
            let address = &self.settings.migration_address;
            let host = if address.contains(':') {
                format!("[{address}]")
            } else {
                address.clone()
            };
            qmp.migrate_incoming(&format!("tcp:{host}:0"))
                .await
                .map_err(qemu_error)?;
            let info = qmp.query_migrate().await.map_err(qemu_error)?;
            let port = info
                .socket_address
                .unwrap_or_default()
                .into_iter()
                .find_map(|a| a.port)
                .ok_or_else(|| failed("QEMU did not say which port it listens on".into()))?;
            Ok(format!("tcp:{host}:{port}"))
        };
        match listen.await {
            Ok(uri) => Ok(uri),
            Err(e) => {
                let _ = self.kill(&spec.name).await;
                Err(e)
            }
        }
    }

    async fn transfer_out(
        &self,
        vm: &str,
        address: &str,
        progress: mpsc::Sender<TransferStats>,
    ) -> Result<TransferStats, HypervisorError> {
        if !address.starts_with("tcp:") {
            return Err(failed(format!(
                "QEMU cannot migrate {vm} to {address}: not a tcp: address"
            )));
        }
        let qmp = self.qmp(vm)?;
        let status = qmp.query_status().await.map_err(qemu_error)?;
        if status.status != "running" {
            return Err(failed(format!(
                "guest {vm} is {}, not running",
                status.status
            )));
        }
        self.configure_migration(&qmp).await?;
        qmp.migrate(address).await.map_err(qemu_error)?;
        let started = Instant::now();
        let mut ticker = tokio::time::interval(POLL);
        loop {
            ticker.tick().await;
            let info = match qmp.query_migrate().await {
                Ok(info) => info,
                Err(QmpError::Closed) => {
                    return Err(failed(format!(
                        "the QEMU of {vm} exited during the transfer"
                    )));
                }
                Err(e) => return Err(qemu_error(e)),
            };
            let mut stats = transfer_stats(&info);
            if stats.elapsed_ms == 0 {
                stats.elapsed_ms = started.elapsed().as_millis() as u64;
            }
            match info.status.as_deref().unwrap_or("none") {
                "completed" => {
                    self.set_state(vm, GuestState::Paused);
                    let _ = progress.try_send(stats);
                    return Ok(stats);
                }
                "failed" => {
                    let why = info
                        .error_desc
                        .unwrap_or_else(|| "QEMU gave no reason".into());
                    return Err(failed(format!("QEMU: migration failed: {why}")));
                }
                "cancelled" => return Err(HypervisorError::Cancelled(vm.to_string())),
                // QEMU pauses the guest for the final pass.
                "device" | "pre-switchover" => self.set_state(vm, GuestState::Paused),
                _ => {}
            }
            // A full or closed channel is the watcher's problem, never the
            // transfer's.
            let _ = progress.try_send(stats);
        }
    }

    async fn cancel_transfer(&self, vm: &str) -> Result<(), HypervisorError> {
        let qmp = self.qmp(vm)?;
        match qmp.migrate_cancel().await {
            Ok(()) => Ok(()),
            Err(QmpError::Closed) => Ok(()),
            Err(e) => Err(qemu_error(e)),
        }
    }

    async fn complete_incoming(
        &self,
        vm: &str,
        _stats: &TransferStats,
    ) -> Result<(), HypervisorError> {
        let qmp = self.qmp(vm)?;
        let deadline = Instant::now() + INCOMING_TIMEOUT;
        loop {
            let info = qmp.query_migrate().await.map_err(|e| match e {
                QmpError::Closed => failed(format!("the incoming QEMU of {vm} exited")),
                e => qemu_error(e),
            })?;
            match info.status.as_deref().unwrap_or("none") {
                "completed" => return Ok(()),
                "failed" | "cancelled" => {
                    let why = info
                        .error_desc
                        .unwrap_or_else(|| "QEMU gave no reason".into());
                    return Err(failed(format!("QEMU: incoming migration failed: {why}")));
                }
                _ if Instant::now() > deadline => {
                    return Err(failed(format!(
                        "the incoming QEMU of {vm} did not complete within {} s",
                        INCOMING_TIMEOUT.as_secs()
                    )));
                }
                _ => tokio::time::sleep(POLL / 2).await,
            }
        }
    }

    async fn pause(&self, vm: &str) -> Result<(), HypervisorError> {
        let qmp = self.qmp(vm)?;
        qmp.stop().await.map_err(qemu_error)?;
        // An incoming guest is already paused and stays incoming.
        let incoming = self.status(vm).await == Some(GuestState::Incoming);
        if !incoming {
            self.set_state(vm, GuestState::Paused);
        }
        Ok(())
    }

    async fn resume(&self, vm: &str) -> Result<(), HypervisorError> {
        let qmp = self.qmp(vm)?;
        let status = qmp.query_status().await.map_err(qemu_error)?;
        if status.status != "running" {
            qmp.cont().await.map_err(qemu_error)?;
        }
        self.set_state(vm, GuestState::Running);
        Ok(())
    }

    async fn kill(&self, vm: &str) -> Result<(), HypervisorError> {
        let Some(instance) = self.lock().remove(vm) else {
            return Ok(());
        };
        let quit = tokio::time::timeout(QUIT_TIMEOUT, instance.qmp.quit()).await;
        if !matches!(quit, Ok(Ok(()))) {
            tracing::warn!(vm, "QEMU did not quit; killing it");
        }
        // Whether it quit or not, make sure: the pid is checked to be QEMU.
        let deadline = Instant::now() + QUIT_TIMEOUT;
        while !instance.qmp.is_closed() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.kill_by_pidfile(vm)?;
        self.remove_files(vm);
        self.save()
    }

    async fn status(&self, vm: &str) -> Option<GuestState> {
        let (qmp, incoming, cached) = {
            let guests = self.lock();
            let i = guests.get(vm)?;
            (i.qmp.clone(), i.held.incoming, i.state)
        };
        match qmp.query_status().await {
            Ok(status) => Some(guest_state(&status.status, incoming)),
            Err(QmpError::Closed) => {
                // Gone: the process died under us.
                tracing::warn!(vm, "the QEMU of {vm} is gone");
                self.lock().remove(vm);
                self.remove_files(vm);
                if let Err(e) = self.save() {
                    tracing::error!(vm, "{e}");
                }
                None
            }
            Err(_) => Some(cached),
        }
    }
}
