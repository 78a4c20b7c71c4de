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
//!
//! Post-copy, when a transfer's plan allows it: both ends enable
//! `postcopy-ram` before it begins; `migrate-start-postcopy` stops the guest
//! on the source and sends its device state; the destination (still
//! paused: `-S` holds through the switchover) runs it on `cont` and pulls
//! the pages it touches. A broken link pauses both ends ("postcopy-paused");
//! `migrate-recover` on the destination and `migrate` with `resume` on the
//! source reconnect them. Once a source has switched it never runs again:
//! `resume` and `cancel_transfer` refuse it, because QEMU 7.2 itself would
//! cancel a post-copy migration and leave the guest stopped on the source
//! with part of its memory on the destination.
//!
//! What a guest boots and its disks and NICs come from its typed machine,
//! resolved against this host's config (`machine`), and every QEMU runs in
//! QEMU's seccomp sandbox, as `run_as` when that is set.
//!
//! With `[tls]` the migration stream is TLS too: both ends load the host's
//! own certificate into a `tls-creds-x509` object (the destination as the
//! server, verifying its peer against the cluster CA; the source as the
//! client, checking that the destination's certificate names the
//! destination host) and name it in the `tls-creds` migration parameter.
//! QEMU reads those files after it dropped to `run_as`, so it reads a copy
//! in `state_dir/qemu/tls` that only that user can read ([`write_tls_dir`]).

pub mod kvm_speed;
pub mod machine;
pub mod platform;
pub mod qmp;

/// The test guest of tests/qemu.rs, for the tests of post-copy: it fills
/// its RAM, then keeps rewriting a working set, counting pages where its
/// CPUs run.
#[cfg(test)]
#[path = "../../../tests/common/guest.rs"]
mod test_guest;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;

use self::machine::Resolved;
use self::qmp::{MigrationInfo, Qmp, QmpError};
use super::{
    Guest, GuestState, HostCapacity, HostCheck, Hypervisor, HypervisorError, Platform, TransferPlan,
};
use crate::config::{AgentConfig, MachineAllowList, TlsConfig};
use crate::protocol::machine::{MAX_DEVICES, MachineError, NicPort};
use crate::protocol::{TransferStage, TransferStats, VmSpec};

/// How often a transfer's progress is read from QEMU.
const POLL: Duration = Duration::from_millis(100);
/// How long a starting QEMU may take to open its QMP socket.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the incoming side may take to load what the source sent after
/// the source reported the transfer complete.
const INCOMING_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the switch to post-copy may take once QEMU took the request:
/// its migration thread switches at its next iteration, 7 to 120 ms here.
const SWITCHOVER_TIMEOUT: Duration = Duration::from_secs(5);
/// `query-migrate` states after a switchover to post-copy, until
/// "completed": the guest's memory is split between the two ends.
const POSTCOPY: [&str; 3] = ["postcopy-active", "postcopy-paused", "postcopy-recover"];
/// `query-migrate` states of a migration still under way.
const MIGRATING: [&str; 6] = [
    "setup",
    "active",
    "pre-switchover",
    "device",
    "postcopy-active",
    "wait-unplug",
];
/// How long `quit` may take before the process is killed.
const QUIT_TIMEOUT: Duration = Duration::from_secs(3);
/// QEMU's TLS credentials objects: incoming migrations listen as the TLS
/// server, outgoing ones connect as the client.
const TLS_INCOMING: &str = "tern-tls-incoming";
const TLS_OUTGOING: &str = "tern-tls-outgoing";
/// The folder of QEMU's copy of the host's identity, in `state_dir/qemu`.
const TLS_DIR: &str = "tls";

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
    /// The kernels, storage and networks a guest's machine may use here.
    pub allowed: MachineAllowList,
    /// The user QEMU runs as once it has opened its files.
    pub run_as: Option<String>,
    /// The host's identity (`[tls]`): with it the migration stream is TLS,
    /// each end proving itself with the host's own certificate.
    pub tls: Option<TlsConfig>,
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
            allowed: MachineAllowList::from_config(config),
            run_as: h.run_as.clone(),
            tls: config.tls.clone(),
        }
    }

    /// QEMU's seccomp filter: no obsolete system calls, no new processes
    /// (so no network scripts), no resource control, and no set*id calls
    /// unless `-runas` must make the one that drops root: QEMU 7.2 installs
    /// the filter before it changes user, and `elevateprivileges=deny` kills
    /// it there (LXD passes `allow` for the same reason).
    fn sandbox(&self) -> String {
        let elevate = if self.run_as.is_some() {
            "allow"
        } else {
            "deny"
        };
        format!("on,obsolete=deny,elevateprivileges={elevate},spawn=deny,resourcecontrol=deny")
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
    /// The taps made for its NICs, removed once it is gone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    taps: Vec<String>,
    /// As a source: its transfer switched to post-copy, or was asked to and
    /// QEMU has not shown that it did not. This copy must never run again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    postcopy: bool,
}

struct Instance {
    held: Held,
    qmp: Qmp,
    state: GuestState,
    /// Set when the QMP connection closes: QEMU exited (the guest powered
    /// off, crashed, or someone killed it) without us killing it.
    gone: Arc<AtomicBool>,
}

pub struct QemuHypervisor {
    settings: QemuSettings,
    dir: PathBuf,
    /// QEMU's copy of the host's identity, with `[tls]`.
    tls_dir: Option<PathBuf>,
    guests: Mutex<BTreeMap<String, Instance>>,
    /// Serialises changes to `guests.json`.
    file: Mutex<()>,
    /// The machine types and CPU models the binary offers, asked once.
    offered: std::sync::OnceLock<Result<platform::Offered, String>>,
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
        let tls_dir = match &settings.tls {
            Some(files) => Some(write_tls_dir(&dir, files, settings.run_as.as_deref())?),
            None => None,
        };
        let hypervisor = QemuHypervisor {
            settings,
            dir,
            tls_dir,
            guests: Mutex::new(BTreeMap::new()),
            file: Mutex::new(()),
            offered: std::sync::OnceLock::new(),
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

    /// Whether `vm` holds an incoming guest, and whether, as a source, it
    /// switched to post-copy (see [`Held::postcopy`]).
    fn roles(&self, vm: &str) -> Result<(bool, bool), HypervisorError> {
        self.lock()
            .get(vm)
            .map(|i| (i.held.incoming, i.held.postcopy))
            .ok_or_else(|| HypervisorError::NoSuchGuest(vm.to_string()))
    }

    /// Record (durably: a restarted agent must refuse to run it too) that
    /// `vm`'s transfer switched to post-copy from here, or may have.
    fn set_postcopy(&self, vm: &str, postcopy: bool) {
        let changed = {
            let mut guests = self.lock();
            let Some(instance) = guests.get_mut(vm) else {
                return;
            };
            let changed = instance.held.postcopy != postcopy;
            instance.held.postcopy = postcopy;
            changed
        };
        if changed && let Err(e) = self.save() {
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
                    let gone = watch_exit(&name, &qmp);
                    self.lock().insert(
                        name,
                        Instance {
                            held,
                            qmp,
                            state,
                            gone,
                        },
                    );
                }
                Err(e) => {
                    tracing::warn!(
                        vm = name,
                        "the QEMU of {name} is gone ({e}); it no longer runs on this host"
                    );
                    self.remove_files(&name, &held.taps);
                }
            }
        }
        self.save()
    }

    /// `spec`'s machine on this host, as its config allows it.
    fn resolve(&self, spec: &VmSpec) -> Result<Resolved, MachineError> {
        let s = &self.settings;
        let seed = self.dir.display().to_string();
        machine::resolve(&s.allowed, &s.machine, &seed, spec)
    }

    /// Start a QEMU for `spec`: running, or paused for an incoming migration.
    /// Its machine is resolved (and refused) before anything is made.
    async fn launch(&self, spec: &VmSpec, incoming: bool) -> Result<Qmp, HypervisorError> {
        let name = &spec.name;
        if name.is_empty() || name.contains(['/', '\0']) || name.starts_with('.') {
            return Err(failed(format!("{name:?} cannot name a QEMU guest")));
        }
        let resolved = self
            .resolve(spec)
            .map_err(|e| failed(format!("vm {name}: {e}")))?;
        let taps = resolved.taps();
        let socket = self.path(name, "qmp");
        let log = self.path(name, "log");
        let _ = std::fs::remove_file(&socket);
        let mut command = tokio::process::Command::new(&self.settings.binary);
        command.args(self.arguments(spec, &resolved, incoming));
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
        // `ip` runs a few processes: off the async workers.
        let nics = resolved.nics.clone();
        tokio::task::spawn_blocking(move || machine::create_taps(&nics))
            .await
            .map_err(|e| failed(format!("vm {name}: creating its taps: {e}")))?
            .map_err(|e| failed(format!("vm {name}: {e}")))?;
        let mut child = command.spawn().map_err(|e| {
            machine::remove_taps(taps.iter().map(String::as_str));
            failed(format!(
                "cannot start {} for {name}: {e}",
                self.settings.binary
            ))
        })?;
        self.follow_log(name, false);
        // Reap it when it exits; while the agent runs nothing else waits on it.
        let (exit_tx, mut exited) = tokio::sync::watch::channel(None);
        {
            let vm = name.clone();
            tokio::spawn(async move {
                if let Ok(status) = child.wait().await {
                    tracing::info!(vm, "QEMU exited: {status}");
                    let _ = exit_tx.send(Some(status));
                }
            });
        }
        // QEMU may fail before it opens its socket, or just after (a missing
        // kernel): whichever comes first, its exit or QMP, decides.
        let connected = tokio::select! {
            connected = Qmp::connect_within(&socket, START_TIMEOUT) => connected,
            _ = exited.wait_for(|status| status.is_some()) => Err(QmpError::Closed),
        };
        let qmp = match connected {
            Ok(qmp) => qmp,
            Err(e) => {
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    exited.wait_for(|status| status.is_some()),
                )
                .await;
                let _ = self.kill_by_pidfile(name);
                let status = *exited.borrow();
                let why = last_lines(&log, 3);
                self.remove_files(name, &taps);
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
                    taps,
                    postcopy: false,
                },
                qmp: qmp.clone(),
                state,
                gone: watch_exit(name, &qmp),
            },
        );
        Ok(qmp)
    }

    /// QEMU's command line for `spec`, its machine resolved on this host.
    fn arguments(&self, spec: &VmSpec, machine: &Resolved, incoming: bool) -> Vec<String> {
        let s = &self.settings;
        let name = &spec.name;
        let path = |ext: &str| self.path(name, ext).display().to_string();
        let mut args: Vec<String> = vec![
            "-name".into(),
            format!("guest={name}"),
            "-machine".into(),
            format!("{},accel={}", machine.machine_type, s.accel),
            "-m".into(),
            spec.memory_mib.to_string(),
            "-smp".into(),
            spec.vcpus.max(1).to_string(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-sandbox".into(),
            s.sandbox(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", path("qmp")),
            "-pidfile".into(),
            path("pid"),
            "-serial".into(),
            format!("file:{}", path("serial")),
        ];
        if let Some(user) = &s.run_as {
            args.extend(["-runas".into(), user.clone()]);
        }
        args.extend(machine.arguments());
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

    /// Forget the guests whose QEMU exited on its own: they no longer run here.
    fn prune(&self) {
        let gone: Vec<(String, Vec<String>)> = {
            let mut guests = self.lock();
            let names: Vec<String> = guests
                .iter()
                .filter(|(_, i)| i.gone.load(Ordering::Acquire))
                .map(|(name, _)| name.clone())
                .collect();
            names
                .into_iter()
                .filter_map(|name| guests.remove(&name).map(|i| (name, i.held.taps)))
                .collect()
        };
        for (vm, taps) in &gone {
            tracing::warn!(
                vm,
                "the QEMU of {vm} exited; it no longer runs on this host"
            );
            self.remove_files(vm, taps);
        }
        if !gone.is_empty()
            && let Err(e) = self.save()
        {
            tracing::error!("{e}");
        }
    }

    /// Poll an outgoing migration to its end, reporting progress: the
    /// transfer `transfer_out` started, or after an agent restart the one
    /// its QEMU still runs (`switched`: it had switched to post-copy).
    async fn follow_transfer(
        &self,
        vm: &str,
        destination: &str,
        qmp: &Qmp,
        switched: bool,
        progress: mpsc::Sender<TransferStats>,
    ) -> Result<TransferStats, HypervisorError> {
        let started = Instant::now();
        let mut ticker = tokio::time::interval(POLL);
        let mut switched = switched;
        loop {
            ticker.tick().await;
            let info = match qmp.query_migrate().await {
                Ok(info) => info,
                Err(QmpError::Closed) => {
                    return Err(failed(format!(
                        "the QEMU of {vm} exited during the transfer{}",
                        if switched { ", in post-copy" } else { "" }
                    )));
                }
                Err(e) => return Err(qemu_error(e)),
            };
            let mut info = info;
            if info.status.as_deref() == Some("completed") {
                info = qmp.settled_completion(info).await;
            }
            let mut stats = transfer_stats(&info);
            if stats.elapsed_ms == 0 {
                stats.elapsed_ms = started.elapsed().as_millis() as u64;
            }
            let status = info.status.as_deref().unwrap_or("none");
            if POSTCOPY.contains(&status) && !switched {
                // Whoever asked for it: the guest stopped here for good.
                switched = true;
                self.set_postcopy(vm, true);
                self.set_state(vm, GuestState::Paused);
            }
            match status {
                "completed" => {
                    if switched {
                        stats.stage = TransferStage::Postcopy;
                    }
                    self.set_state(vm, GuestState::Paused);
                    let _ = progress.try_send(stats);
                    return Ok(stats);
                }
                "failed" => {
                    let why = info
                        .error_desc
                        .unwrap_or_else(|| "QEMU gave no reason".into());
                    let when = if switched {
                        " after the switchover"
                    } else {
                        ""
                    };
                    return Err(failed(format!("QEMU: migration failed{when}: {why}")));
                }
                "cancelled" if switched => {
                    return Err(failed(format!(
                        "the transfer of {vm} was cancelled after its switchover to post-copy: \
                         the guest is stopped here and part of its memory is on {destination}"
                    )));
                }
                "cancelled" => return Err(HypervisorError::Cancelled(vm.to_string())),
                // QEMU pauses the guest for the final pass.
                "device" | "pre-switchover" => self.set_state(vm, GuestState::Paused),
                // Post-copy, paused included: it waits for resume_postcopy.
                _ => {}
            }
            // A full or closed channel is the watcher's problem, never the
            // transfer's.
            let _ = progress.try_send(stats);
        }
    }

    /// Remove a gone guest's socket, pidfile and taps; its log and serial
    /// output are kept as `NAME.log.prev` and `NAME.serial.prev` for a
    /// post-mortem.
    fn remove_files(&self, vm: &str, taps: &[String]) {
        machine::remove_taps(taps.iter().map(String::as_str));
        for ext in ["qmp", "pid"] {
            let _ = std::fs::remove_file(self.path(vm, ext));
        }
        for ext in ["log", "serial"] {
            let _ = std::fs::rename(self.path(vm, ext), self.path(vm, &format!("{ext}.prev")));
        }
    }

    /// Capabilities and parameters from config and the transfer's `plan`,
    /// set on both ends (multifd and post-copy must be on both), and the
    /// stream's TLS: with `[tls]` this end's credentials, loaded afresh,
    /// without it none (a QEMU that an earlier run gave credentials must
    /// not keep using them). Post-copy is set either way, since a QEMU can
    /// be reused, and only before `migrate-incoming` or `migrate`.
    async fn configure_migration(
        &self,
        qmp: &Qmp,
        end: End<'_>,
        plan: TransferPlan,
    ) -> Result<(), HypervisorError> {
        let s = &self.settings;
        qmp.migrate_set_capabilities(&[
            ("auto-converge", s.auto_converge),
            ("multifd", s.multifd_channels > 0),
            ("events", true),
            ("postcopy-ram", plan.postcopy),
        ])
        .await
        .map_err(|e| self.capability_error(e, plan))?;
        let downtime_limit = if plan.downtime_limit_ms > 0 {
            plan.downtime_limit_ms
        } else {
            s.downtime_limit_ms
        };
        let mut parameters = json!({
            "max-bandwidth": s.max_bandwidth_bytes_s,
            // QEMU drops `max-bandwidth` at the switchover to post-copy and
            // sends the rest as fast as the link goes (0: no limit; 650 Mbit/s
            // against a 32 Mbit/s cap, measured): the host's cap holds for the
            // whole transfer. The pages the destination asks for go first
            // whatever the limit.
            "max-postcopy-bandwidth": s.max_bandwidth_bytes_s,
            "downtime-limit": downtime_limit,
        });
        if s.multifd_channels > 0 {
            parameters["multifd-channels"] = json!(s.multifd_channels);
        }
        let (creds, hostname) = match &self.tls_dir {
            Some(dir) => (self.load_tls(qmp, dir, &end).await?, end.hostname()),
            None => ("", ""),
        };
        parameters["tls-creds"] = json!(creds);
        parameters["tls-hostname"] = json!(hostname);
        qmp.migrate_set_parameters(parameters)
            .await
            .map_err(qemu_error)
    }

    /// QEMU's refusal of the capabilities, with what it needs for post-copy:
    /// the destination checks that it may use userfaultfd, which this
    /// kernel allows only to root unless `vm.unprivileged_userfaultfd` is 1.
    fn capability_error(&self, e: QmpError, plan: TransferPlan) -> HypervisorError {
        match e {
            QmpError::Qemu { desc, .. }
                if plan.postcopy && desc.contains("Postcopy is not supported") =>
            {
                let who = match &self.settings.run_as {
                    Some(user) => format!(
                        "QEMU runs as {user}, and userfaultfd is for root only unless the \
                         sysctl vm.unprivileged_userfaultfd is 1"
                    ),
                    None => "post-copy needs userfaultfd from the kernel".into(),
                };
                failed(format!(
                    "QEMU cannot take part in post-copy: {desc} ({who})"
                ))
            }
            e => qemu_error(e),
        }
    }

    /// Listen on port 0 of the host's migration address: for a transfer
    /// (`migrate-incoming`), or to recover a paused post-copy one
    /// (`migrate-recover`). Returns the address with the port QEMU chose.
    async fn listen(&self, qmp: &Qmp, recover: bool) -> Result<String, HypervisorError> {
        let address = &self.settings.migration_address;
        let host = if address.contains(':') {
            format!("[{address}]")
        } else {
            address.clone()
        };
        let uri = format!("tcp:{host}:0");
        if recover {
            qmp.migrate_recover(&uri).await
        } else {
            qmp.migrate_incoming(&uri).await
        }
        .map_err(qemu_error)?;
        // QEMU lists the addresses it listens on newest first (it prepends
        // each one); after migrate-recover 7.2 lists only the new one.
        let info = qmp.query_migrate().await.map_err(qemu_error)?;
        let port = info
            .socket_address
            .unwrap_or_default()
            .into_iter()
            .find_map(|a| a.port)
            .ok_or_else(|| failed("QEMU did not say which port it listens on".into()))?;
        Ok(format!("tcp:{host}:{port}"))
    }

    /// Cancel an outgoing migration still under way, so it cannot complete
    /// later and pause the guest. Refused if it switched to post-copy, even
    /// just before the cancel landed: QEMU 7.2 cancels that too.
    async fn cancel_outgoing(&self, vm: &str, qmp: &Qmp) -> Result<(), HypervisorError> {
        // MIGRATION events reach this receiver before the reply that
        // follows them: a switch between two questions is not missed.
        let mut events = qmp.events();
        let mut cancelled = false;
        let deadline = Instant::now() + QUIT_TIMEOUT;
        loop {
            let info = qmp.query_migrate().await.map_err(qemu_error)?;
            let status = info.status.unwrap_or_default();
            if POSTCOPY.contains(&status.as_str()) || switched_in(&mut events) {
                self.set_postcopy(vm, true);
                return Err(never_again(vm));
            }
            if !MIGRATING.contains(&status.as_str()) && status != "cancelling" {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(failed(format!(
                    "the migration of {vm} is still {status} after migrate_cancel"
                )));
            }
            if !cancelled && status != "cancelling" {
                tracing::warn!(vm, "cancelling an outgoing migration ({status}) to resume");
                qmp.migrate_cancel().await.map_err(qemu_error)?;
                cancelled = true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// (Re)create this end's `tls-creds-x509` object from `dir`; returns
    /// its id. The destination verifies the source's certificate against
    /// the cluster CA (`verify-peer`); a client always verifies the server.
    async fn load_tls(
        &self,
        qmp: &Qmp,
        dir: &Path,
        end: &End<'_>,
    ) -> Result<&'static str, HypervisorError> {
        let (id, endpoint) = match end {
            End::Incoming => (TLS_INCOMING, "server"),
            End::Outgoing { .. } => (TLS_OUTGOING, "client"),
        };
        // An earlier migration of this QEMU left its object; the files may
        // have been renewed since.
        if let Err(QmpError::Closed) = qmp.object_del(id).await {
            return Err(qemu_error(QmpError::Closed));
        }
        qmp.object_add(json!({
            "qom-type": "tls-creds-x509",
            "id": id,
            "dir": dir.display().to_string(),
            "endpoint": endpoint,
            "verify-peer": true,
        }))
        .await
        .map_err(|e| {
            let user = self.settings.run_as.as_deref().unwrap_or("root");
            failed(format!(
                "QEMU (running as {user}) cannot load the migration TLS credentials in {}: {e}",
                dir.display()
            ))
        })?;
        Ok(id)
    }
}

/// Which end of a migration a QEMU is being set up as.
enum End<'a> {
    Incoming,
    /// Sending to host `destination`, whose certificate must name it.
    Outgoing {
        destination: &'a str,
    },
}

impl End<'_> {
    /// `tls-hostname`: the name the destination's certificate must carry.
    fn hostname(&self) -> &str {
        match self {
            End::Incoming => "",
            End::Outgoing { destination } => destination,
        }
    }
}

/// The file names QEMU's `tls-creds-x509` reads in its `dir`.
const TLS_FILES: [&str; 5] = [
    "ca-cert.pem",
    "server-cert.pem",
    "server-key.pem",
    "client-cert.pem",
    "client-key.pem",
];

/// Write QEMU's copy of the host's identity into `qemu_dir/tls`: the
/// cluster CA, and the host's certificate and key as both the server's and
/// the client's (an agent's certificate is issued for both). The folder
/// (0700) and its files (0400) belong to `run_as`, or to root: the key is
/// never readable by anyone else. Rewritten at every start, so a renewed
/// certificate is used. With `run_as`, QEMU reads these files after it
/// dropped root, so every folder above must let that user through; an
/// agent whose migrations would all fail on that refuses to start.
fn write_tls_dir(
    qemu_dir: &Path,
    files: &TlsConfig,
    run_as: Option<&str>,
) -> Result<PathBuf, HypervisorError> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};

    let user = run_as.map(UserIds::of).transpose().map_err(failed)?;
    let read = |path: &Path| {
        std::fs::read(path)
            .map_err(|e| failed(format!("[tls]: cannot read {}: {e}", path.display())))
    };
    let (ca, cert, key) = (read(&files.ca)?, read(&files.cert)?, read(&files.key)?);
    let contents: [&[u8]; 5] = [&ca, &cert, &key, &cert, &key];
    let dir = qemu_dir.join(TLS_DIR);
    let staging = qemu_dir.join(format!("{TLS_DIR}.new"));
    let write = || -> std::io::Result<()> {
        match std::fs::remove_dir_all(&staging) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        std::fs::DirBuilder::new().mode(0o700).create(&staging)?;
        for (name, content) in TLS_FILES.iter().zip(contents) {
            let path = staging.join(name);
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o400)
                .open(&path)?;
            file.write_all(content)?;
            file.sync_all()?;
            if let Some(u) = &user {
                std::os::unix::fs::chown(&path, Some(u.uid), Some(u.gid))?;
            }
        }
        if let Some(u) = &user {
            std::os::unix::fs::chown(&staging, Some(u.uid), Some(u.gid))?;
        }
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        std::fs::rename(&staging, &dir)
    };
    write().map_err(|e| failed(format!("cannot write {}: {e}", dir.display())))?;
    if let (Some(name), Some(u)) = (run_as, &user)
        && let Some(blocked) = u.blocked_on(&dir)
    {
        return Err(failed(format!(
            "QEMU runs as {name} and reads its migration TLS credentials from {}, but {name} \
             cannot enter {}: let it through (chmod o+x), or put state_dir where it can",
            dir.display(),
            blocked.display()
        )));
    }
    Ok(dir)
}

/// A user as `-runas` makes QEMU: its uid, primary gid and groups.
struct UserIds {
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
}

impl UserIds {
    fn of(user: &str) -> Result<UserIds, String> {
        let unknown = || format!("[hypervisor] run_as = {user:?}: no such user on this host");
        let name = std::ffi::CString::new(user).map_err(|_| unknown())?;
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: getpwnam_r writes into `pwd` and `buf`, both alive and
        // of the sizes given, and sets `found` to `&pwd` or null.
        let rc = unsafe {
            libc::getpwnam_r(
                name.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &mut found,
            )
        };
        if rc != 0 || found.is_null() {
            return Err(unknown());
        }
        let (uid, gid) = (pwd.pw_uid, pwd.pw_gid);
        let mut groups: Vec<libc::gid_t> = vec![0; 64];
        loop {
            let mut n = groups.len() as libc::c_int;
            // SAFETY: `groups` holds `n` entries; getgrouplist writes at
            // most that many and sets `n` to how many the user has.
            let rc = unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
            let n = n.max(0) as usize;
            if rc >= 0 {
                groups.truncate(n);
                break;
            }
            if n <= groups.len() {
                // Not a size problem: only the primary group is known.
                groups = vec![gid];
                break;
            }
            groups.resize(n, 0);
        }
        Ok(UserIds { uid, gid, groups })
    }

    /// The first folder above `path` this user may not enter, if any.
    fn blocked_on(&self, path: &Path) -> Option<PathBuf> {
        use std::os::unix::fs::MetadataExt;
        path.ancestors().skip(1).find_map(|folder| {
            let meta = std::fs::metadata(folder).ok()?;
            let mode = meta.mode();
            let through = if meta.uid() == self.uid {
                mode & 0o100 != 0
            } else if self.groups.contains(&meta.gid()) {
                mode & 0o010 != 0
            } else {
                mode & 0o001 != 0
            };
            (!through).then(|| folder.to_path_buf())
        })
    }
}

/// A flag set once `qmp` closes, i.e. once QEMU exited.
fn watch_exit(vm: &str, qmp: &Qmp) -> Arc<AtomicBool> {
    let gone = Arc::new(AtomicBool::new(false));
    let mut events = qmp.events();
    let (flag, vm) = (gone.clone(), vm.to_string());
    tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(event) if event.event == "SHUTDOWN" => {
                    tracing::info!(vm, "QEMU is shutting down: {}", event.data);
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
        flag.store(true, Ordering::Release);
    });
    gone
}

/// Whether a MIGRATION event waiting in `events` says post-copy: the
/// migration switched, whatever `query-migrate` says now.
fn switched_in(events: &mut tokio::sync::broadcast::Receiver<qmp::QmpEvent>) -> bool {
    use tokio::sync::broadcast::error::TryRecvError;
    let mut switched = false;
    loop {
        match events.try_recv() {
            Ok(event) => switched |= is_switch(&event),
            Err(TryRecvError::Lagged(_)) => {}
            Err(TryRecvError::Empty | TryRecvError::Closed) => return switched,
        }
    }
}

fn is_switch(event: &qmp::QmpEvent) -> bool {
    event.event == "MIGRATION"
        && event.data["status"]
            .as_str()
            .is_some_and(|status| POSTCOPY.contains(&status))
}

/// Whether this QEMU's CPUs may be waiting for pages that cannot come: a
/// destination resumed in post-copy whose link broke. (A source in
/// post-copy never runs.) Asked briefly: an unanswered question is a no.
async fn waits_for_pages(qmp: &Qmp) -> bool {
    let ask = async {
        let info = qmp.query_migrate().await.ok()?;
        let paused = matches!(
            info.status.as_deref(),
            Some("postcopy-paused" | "postcopy-recover")
        );
        Some(paused && qmp.query_status().await.ok()?.running)
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), ask).await,
        Ok(Some(true))
    )
}

/// The refusal to run a source after its switchover to post-copy.
fn never_again(vm: &str) -> HypervisorError {
    failed(format!(
        "the transfer of {vm} switched to post-copy from this host: only its destination may \
         run the guest now, and this copy must never run again"
    ))
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
    let stage = match info.status.as_deref() {
        Some("postcopy-active") => TransferStage::Postcopy,
        Some("postcopy-paused" | "postcopy-recover") => TransferStage::PostcopyPaused,
        // Completed after a switchover: pages went in post-copy.
        Some("completed") if ram.postcopy_bytes > 0 => TransferStage::Postcopy,
        _ => TransferStage::Precopy,
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
        // QEMU 7.2 reports its own clock as the downtime of a switch that
        // rounds to 0 ms: a pause longer than the whole transfer is unknown.
        downtime_ms: info
            .downtime
            .filter(|&d| info.total_time.is_none_or(|total| d <= total))
            .unwrap_or(0),
        stage,
        postcopy_requests: ram.postcopy_requests,
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

/// Ask `binary` which machine types and CPU models it has.
fn probe_offered(binary: &str) -> Result<platform::Offered, String> {
    let ask = |what: &str| {
        let out = std::process::Command::new(binary)
            .args([what, "help"])
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {binary} {what} help: {e}"))?;
        if !out.status.success() {
            return Err(format!("{binary} {what} help exited with {}", out.status));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    Ok(platform::Offered {
        machines: platform::parse_machines(&ask("-machine")?),
        cpus: platform::parse_cpus(&ask("-cpu")?),
    })
}

/// `tern doctor`'s checks that need more than one line.
impl QemuHypervisor {
    /// KVM opens, and how fast its guests exit and touch fresh memory.
    fn kvm_check(&self) -> HostCheck {
        let opens = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm");
        let tcg = self.settings.accel == "tcg";
        match (opens, tcg) {
            (Err(e), true) => HostCheck::ok(
                "kvm",
                format!("/dev/kvm does not open ({e}); accel = \"tcg\" does not need it"),
            ),
            (Err(e), false) => HostCheck::error(
                "kvm",
                format!("/dev/kvm does not open ({e}) and accel = \"kvm\": no guest starts here"),
                "load kvm_intel or kvm_amd and give the agent access to /dev/kvm, or set accel = \"tcg\"",
            ),
            (Ok(_), tcg) => match kvm_speed::measure() {
                Ok(speed) if tcg => HostCheck::ok(
                    "kvm",
                    format!("accel = \"tcg\" does not use it; {}", speed.describe()),
                ),
                Ok(speed) if speed.slow() => HostCheck::warning(
                    "kvm",
                    format!(
                        "{}: guests run and migrate slowly here, most after a move, as the \
                         destination's guest touches its pages",
                        speed.describe()
                    ),
                    "run the agent on bare metal, or on an outer hypervisor with nested paging \
                     (EPT/NPT) enabled; measure moves here before trusting their timing",
                ),
                Ok(speed) => {
                    HostCheck::ok("kvm", format!("guests run with KVM; {}", speed.describe()))
                }
                Err(e) if tcg => HostCheck::ok(
                    "kvm",
                    format!("accel = \"tcg\" does not use it; a KVM guest does not run: {e}"),
                ),
                Err(e) => HostCheck::error(
                    "kvm",
                    format!("/dev/kvm opens but runs no guest: {e}"),
                    "check that no other hypervisor holds the CPU's virtualisation, \
                     or set accel = \"tcg\"",
                ),
            },
        }
    }

    /// The machine types this host starts guests as: `[hypervisor]
    /// machine` for new guests, and each held guest's own, in the QEMU
    /// installed now (not the one the agent started with).
    fn machine_check(&self) -> HostCheck {
        let mut wanted: BTreeMap<String, Vec<String>> = BTreeMap::new();
        wanted
            .entry(self.settings.machine.clone())
            .or_default()
            .push("[hypervisor] machine".into());
        for instance in self.lock().values() {
            if let Some(machine) = instance
                .held
                .spec
                .qemu
                .as_ref()
                .map(|q| &q.machine)
                .filter(|m| !m.is_empty())
            {
                wanted
                    .entry(machine.clone())
                    .or_default()
                    .push(instance.held.spec.name.clone());
            }
        }
        let offered = match probe_offered(&self.settings.binary) {
            Ok(offered) => offered,
            Err(e) => {
                return HostCheck::error(
                    "machine",
                    e,
                    "reinstall QEMU (apt-get install -y qemu-system-x86)",
                );
            }
        };
        let mut found = Vec::new();
        let mut missing = Vec::new();
        for (machine, users) in &wanted {
            match offered.machines.iter().find(|m| &m.name == machine) {
                Some(m) => found.push(match &m.alias_of {
                    Some(versioned) => format!("{machine} ({versioned})"),
                    None => machine.clone(),
                }),
                None => missing.push(format!("{machine} (for {})", users.join(", "))),
            }
        }
        if missing.is_empty() {
            HostCheck::ok("machine", format!("{} available", found.join(", ")))
        } else {
            HostCheck::error(
                "machine",
                format!(
                    "{} has no machine type {}",
                    self.settings.binary,
                    missing.join(", ")
                ),
                "pick one `qemu-system-x86_64 -machine help` lists, or install the QEMU version that has it",
            )
        }
    }
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

    /// Whether a network's bridge exists here is the `bridge` driver's
    /// check, in its prepare stage: blocking in safe mode, recorded in fast.
    fn check_spec(&self, spec: &VmSpec) -> Result<(), MachineError> {
        self.resolve(spec).map(|_| ())
    }

    fn place_nic(&self, vm: &str, nic: &mut NicPort) {
        nic.bridge = self.settings.allowed.networks.get(&nic.network).cloned();
        nic.tap = Some(machine::tap_name(
            &self.dir.display().to_string(),
            vm,
            nic.index,
        ));
    }

    fn taps(&self, vm: &str) -> Vec<String> {
        let seed = self.dir.display().to_string();
        (0..MAX_DEVICES)
            .map(|i| machine::tap_name(&seed, vm, i))
            .collect()
    }

    async fn announce(&self, vm: &str) -> Result<(), HypervisorError> {
        let qmp = self.qmp(vm)?;
        qmp.announce_self().await.map_err(qemu_error)
    }

    fn platform(&self, spec: &VmSpec) -> Option<Result<Platform, String>> {
        let resolved = match self.resolve(spec) {
            Ok(resolved) => resolved,
            Err(e) => return Some(Err(e.to_string())),
        };
        let offered = self
            .offered
            .get_or_init(|| probe_offered(&self.settings.binary));
        Some(match offered {
            Ok(offered) => offered.platform(&resolved.machine_type, platform::DEFAULT_CPU_MODEL),
            Err(e) => Err(e.clone()),
        })
    }

    fn doctor(&self) -> Vec<HostCheck> {
        let binary = &self.settings.binary;
        let mut checks = Vec::new();
        match std::process::Command::new(binary).arg("--version").output() {
            Ok(out) if out.status.success() => {
                let text = String::from_utf8_lossy(&out.stdout);
                let version = text.lines().next().unwrap_or("").trim().to_string();
                checks.push(HostCheck::ok("qemu", format!("{binary}: {version}")));
            }
            Ok(out) => checks.push(HostCheck::error(
                "qemu",
                format!(
                    "{binary} --version failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                "reinstall QEMU (apt-get install -y qemu-system-x86)",
            )),
            Err(e) => checks.push(HostCheck::error(
                "qemu",
                format!("cannot run {binary}: {e}"),
                "install QEMU (apt-get install -y qemu-system-x86) or set [hypervisor] binary",
            )),
        }
        if checks
            .iter()
            .all(|c| c.verdict == crate::hypervisor::Verdict::Ok)
        {
            checks.push(self.machine_check());
        }
        checks.push(self.kvm_check());
        checks.push(match self.postcopy_support() {
            Ok(()) => HostCheck::ok("userfaultfd", "post-copy can run here"),
            Err(e) => HostCheck::warning(
                "userfaultfd",
                e,
                "sysctl vm.unprivileged_userfaultfd=1, or run QEMU as root (no run_as)",
            ),
        });
        checks
    }

    fn postcopy_support(&self) -> Result<(), String> {
        let root = unsafe { libc::geteuid() } == 0;
        let user = match self.settings.run_as.as_deref() {
            None if root => return Ok(()),
            None => "the agent's user (not root)",
            Some(user) => user,
        };
        let sysctl = "/proc/sys/vm/unprivileged_userfaultfd";
        match std::fs::read_to_string(sysctl) {
            Ok(v) if v.trim() == "1" => Ok(()),
            _ => Err(format!(
                "QEMU runs as {user}, and userfaultfd, which post-copy needs, is for root only \
                 unless the sysctl vm.unprivileged_userfaultfd is 1"
            )),
        }
    }

    async fn guests(&self) -> Vec<Guest> {
        self.prune();
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
        postcopy: bool,
    ) -> Result<String, HypervisorError> {
        if self.lock().contains_key(&spec.name) {
            return Err(HypervisorError::AlreadyExists(spec.name.clone()));
        }
        let qmp = self.launch(spec, true).await?;
        self.save()?;
        let plan = TransferPlan {
            postcopy,
            downtime_limit_ms: 0,
        };
        let listen = async {
            self.configure_migration(&qmp, End::Incoming, plan).await?;
            self.listen(&qmp, false).await
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
        destination: &str,
        address: &str,
        plan: TransferPlan,
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
        self.configure_migration(&qmp, End::Outgoing { destination }, plan)
            .await?;
        qmp.migrate(address).await.map_err(qemu_error)?;
        self.follow_transfer(vm, destination, &qmp, false, progress)
            .await
    }

    async fn watch_transfer(
        &self,
        vm: &str,
        destination: &str,
        progress: mpsc::Sender<TransferStats>,
    ) -> Result<TransferStats, HypervisorError> {
        let qmp = self.qmp(vm)?;
        let (_, switched) = self.roles(vm)?;
        let info = qmp.query_migrate().await.map_err(qemu_error)?;
        if info.status.is_none() || info.status.as_deref() == Some("none") {
            return Err(failed(format!(
                "no transfer of {vm} runs or ran in its QEMU"
            )));
        }
        self.follow_transfer(vm, destination, &qmp, switched, progress)
            .await
    }
    async fn cancel_transfer(&self, vm: &str) -> Result<(), HypervisorError> {
        let qmp = self.qmp(vm)?;
        let (_, switched) = self.roles(vm)?;
        let status = match qmp.query_migrate().await {
            Ok(info) => info.status.unwrap_or_default(),
            Err(QmpError::Closed) => return Ok(()),
            Err(e) => return Err(qemu_error(e)),
        };
        // QEMU 7.2 would cancel it, leaving the guest stopped here and part
        // of its memory on the destination.
        if switched || POSTCOPY.contains(&status.as_str()) {
            return Err(failed(format!(
                "the transfer of {vm} switched to post-copy: it cannot be cancelled, the \
                 guest's memory is split between the two hosts until it completes"
            )));
        }
        match qmp.migrate_cancel().await {
            Ok(()) => Ok(()),
            Err(QmpError::Closed) => Ok(()),
            Err(e) => Err(qemu_error(e)),
        }
    }

    async fn start_postcopy(&self, vm: &str) -> Result<(), HypervisorError> {
        let qmp = self.qmp(vm)?;
        // From the request on, this copy may have stopped for good: nothing
        // resumes or cancels it until QEMU shows it did not switch.
        self.set_postcopy(vm, true);
        let unknown = |e: QmpError| {
            HypervisorError::Unknown(format!("switching the transfer of {vm} to post-copy: {e}"))
        };
        match qmp.migrate_start_postcopy().await {
            Ok(()) => {}
            Err(QmpError::Qemu { desc, .. }) => {
                self.set_postcopy(vm, false);
                return Err(failed(format!(
                    "QEMU did not switch the transfer of {vm} to post-copy: {desc}"
                )));
            }
            Err(e) => return Err(unknown(e)),
        }
        let deadline = Instant::now() + SWITCHOVER_TIMEOUT;
        let mut switching = false;
        loop {
            let info = qmp.query_migrate().await.map_err(unknown)?;
            let status = info.status.as_deref().unwrap_or("none");
            match status {
                // Finished in pre-copy first: the guest is stopped here and
                // all of it has gone.
                "completed" => {
                    self.set_state(vm, GuestState::Paused);
                    return Ok(());
                }
                _ if POSTCOPY.contains(&status) && switching => {
                    self.set_state(vm, GuestState::Paused);
                    return Ok(());
                }
                _ if POSTCOPY.contains(&status) => {
                    // QEMU says postcopy-active before it stops the guest and
                    // sends the device state, which it does holding the lock
                    // every QMP command waits for: query-status answers after
                    // that. A stream that broke on the device state turns it
                    // "failed" just after; one more look, a poll later.
                    let run = qmp.query_status().await.map_err(unknown)?;
                    switching = run.status != "running";
                }
                "failed" | "cancelled" => {
                    // Before the switchover QEMU starts the guest again; after
                    // it, the guest stays stopped.
                    let run = qmp.query_status().await.map_err(unknown)?;
                    let why = info.error_desc.unwrap_or_else(|| status.to_string());
                    if run.status == "running" {
                        self.set_postcopy(vm, false);
                        return Err(failed(format!(
                            "the transfer of {vm} ended before its switchover to post-copy \
                             ({why}); the guest runs here"
                        )));
                    }
                    return Err(HypervisorError::Unknown(format!(
                        "the transfer of {vm} ended as it switched to post-copy ({why}); \
                         the guest is {} here",
                        run.status
                    )));
                }
                _ if Instant::now() > deadline => {
                    return Err(HypervisorError::Unknown(format!(
                        "QEMU took the request to switch the transfer of {vm} to post-copy but \
                         had not switched after {} s (it is {status}); it may still",
                        SWITCHOVER_TIMEOUT.as_secs()
                    )));
                }
                _ => {}
            }
            tokio::time::sleep(if switching { POLL } else { POLL / 5 }).await;
        }
    }

    async fn await_switchover(&self, vm: &str) -> Result<bool, HypervisorError> {
        let qmp = self.qmp(vm)?;
        // Each MIGRATION event, and QEMU's exit, ends a wait early.
        let mut events = qmp.events();
        let mut switched = false;
        loop {
            let info = match qmp.query_migrate().await {
                Ok(info) => info,
                Err(QmpError::Closed) => {
                    switched |= switched_in(&mut events);
                    return Err(failed(if switched {
                        format!(
                            "the incoming QEMU of {vm} exited just after the switchover to \
                             post-copy, before its guest ran"
                        )
                    } else {
                        format!(
                            "the incoming QEMU of {vm} exited before the switchover: the \
                             source cancelled the transfer or went away"
                        )
                    }));
                }
                Err(e) => return Err(qemu_error(e)),
            };
            let status = info.status.as_deref().unwrap_or("none");
            match status {
                "completed" => {
                    switched |= switched_in(&mut events);
                    return Ok(switched);
                }
                _ if POSTCOPY.contains(&status) => return Ok(true),
                "failed" | "cancelled" => {
                    let why = info.error_desc.unwrap_or_else(|| status.to_string());
                    return Err(failed(format!(
                        "the incoming transfer of {vm} ended before the switchover: {why}"
                    )));
                }
                _ => {}
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                event = events.recv() => {
                    switched |= event.is_ok_and(|e| is_switch(&e));
                }
            }
        }
    }

    async fn pause_postcopy(&self, vm: &str) -> Result<(), HypervisorError> {
        let qmp = self.qmp(vm)?;
        qmp.migrate_pause().await.map_err(qemu_error)
    }

    async fn recover_incoming(
        &self,
        vm: &str,
        _attempt_id: &str,
    ) -> Result<String, HypervisorError> {
        let qmp = self.qmp(vm)?;
        let info = qmp.query_migrate().await.map_err(qemu_error)?;
        let mut status = info.status.unwrap_or_else(|| "none".into());
        if status == "postcopy-active" {
            // The source broke its end off (a dead link): this end may not
            // have noticed yet, its socket waiting on TCP. Break it too.
            qmp.migrate_pause().await.map_err(qemu_error)?;
            let deadline = Instant::now() + Duration::from_secs(5);
            while status == "postcopy-active" && Instant::now() < deadline {
                tokio::time::sleep(POLL / 2).await;
                let info = qmp.query_migrate().await.map_err(qemu_error)?;
                status = info.status.unwrap_or_else(|| "none".into());
            }
        }
        if status != "postcopy-paused" {
            return Err(failed(format!(
                "cannot recover the incoming transfer of {vm}: it is {status}, not paused in \
                 post-copy"
            )));
        }
        self.listen(&qmp, true).await
    }

    async fn resume_postcopy(&self, vm: &str, address: &str) -> Result<(), HypervisorError> {
        if !address.starts_with("tcp:") {
            return Err(failed(format!(
                "QEMU cannot resume the transfer of {vm} to {address}: not a tcp: address"
            )));
        }
        let qmp = self.qmp(vm)?;
        let info = qmp.query_migrate().await.map_err(qemu_error)?;
        let status = info.status.as_deref().unwrap_or("none");
        if status != "postcopy-paused" {
            return Err(failed(format!(
                "cannot resume the transfer of {vm}: it is {status}, not paused in post-copy"
            )));
        }
        qmp.migrate_resume(address).await.map_err(|e| match e {
            QmpError::Closed => HypervisorError::Unknown(format!(
                "the QEMU of {vm} exited as it was asked to resume its transfer"
            )),
            e => qemu_error(e),
        })
    }

    async fn complete_incoming(
        &self,
        vm: &str,
        stats: &TransferStats,
    ) -> Result<(), HypervisorError> {
        let qmp = self.qmp(vm)?;
        // After a switchover the rest arrives at the link's pace, and a
        // paused post-copy waits for the link: no deadline then.
        let mut postcopy = stats.stage.is_postcopy();
        let deadline = Instant::now() + INCOMING_TIMEOUT;
        loop {
            let info = qmp.query_migrate().await.map_err(|e| match e {
                QmpError::Closed => failed(format!("the incoming QEMU of {vm} exited")),
                e => qemu_error(e),
            })?;
            let status = info.status.as_deref().unwrap_or("none");
            postcopy |= POSTCOPY.contains(&status);
            match status {
                "completed" => return Ok(()),
                "failed" | "cancelled" => {
                    let why = info
                        .error_desc
                        .unwrap_or_else(|| "QEMU gave no reason".into());
                    return Err(failed(format!("QEMU: incoming migration failed: {why}")));
                }
                _ if !postcopy && Instant::now() > deadline => {
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
        let (incoming, switched) = self.roles(vm)?;
        let status = qmp
            .query_migrate()
            .await
            .map_err(qemu_error)?
            .status
            .unwrap_or_default();
        let postcopy = POSTCOPY.contains(&status.as_str());
        if incoming {
            // Post-copy: the commit point; the guest runs here while its
            // last pages arrive. Pre-copy: only once all of it has.
            if MIGRATING.contains(&status.as_str()) && !postcopy {
                return Err(failed(format!(
                    "the incoming transfer of {vm} has not arrived yet (it is {status})"
                )));
            }
        } else if postcopy {
            // The destination of a post-copy transfer runs already; its
            // source never may.
            let run = qmp.query_status().await.map_err(qemu_error)?;
            if run.status != "running" {
                self.set_postcopy(vm, true);
                return Err(never_again(vm));
            }
        } else {
            // This copy is to run: an outgoing migration still going (one a
            // restarted agent's recovery found) must not complete and pause it.
            self.cancel_outgoing(vm, &qmp).await?;
        }
        let run = qmp.query_status().await.map_err(qemu_error)?;
        if run.status == "running" && switched {
            // QEMU starts a source again only if it never switched.
            self.set_postcopy(vm, false);
        }
        if run.status != "running" {
            if switched {
                return Err(never_again(vm));
            }
            // QEMU dying with `cont` sent leaves it unknown whether the
            // CPUs started: never to be taken for "did nothing".
            qmp.cont().await.map_err(|e| match e {
                QmpError::Closed => {
                    HypervisorError::Unknown(format!("QEMU of {vm} exited while starting its CPUs"))
                }
                other => qemu_error(other),
            })?;
        }
        self.set_state(vm, GuestState::Running);
        Ok(())
    }

    async fn kill(&self, vm: &str) -> Result<(), HypervisorError> {
        let Some(instance) = self.lock().remove(vm) else {
            return Ok(());
        };
        if waits_for_pages(&instance.qmp).await {
            // QEMU stops the CPUs to quit, and one waiting for a page that
            // cannot come waits forever: `quit` never answers, and SIGTERM
            // does nothing either (QEMU 7.2).
            tracing::warn!(
                vm,
                "QEMU's post-copy is paused with its CPUs started; killing it"
            );
            self.kill_by_pidfile(vm)?;
        } else {
            let quit = tokio::time::timeout(QUIT_TIMEOUT, instance.qmp.quit()).await;
            if !matches!(quit, Ok(Ok(()))) {
                tracing::warn!(vm, "QEMU did not quit; killing it");
            }
        }
        // Whether it quit or not, make sure: the pid is checked to be QEMU.
        let _ = tokio::time::timeout(QUIT_TIMEOUT, instance.qmp.closed()).await;
        self.kill_by_pidfile(vm)?;
        self.remove_files(vm, &instance.held.taps);
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
                // Gone: the process died under us. The exit watcher has
                // flagged it, or is about to.
                if let Some(i) = self.lock().get(vm) {
                    i.gone.store(true, Ordering::Release);
                }
                self.prune();
                None
            }
            Err(_) => Some(cached),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::qmp::qemu_binary_for_tests;
    use super::*;
    use crate::protocol::QemuMachine;

    fn settings(binary: &Path) -> QemuSettings {
        QemuSettings {
            binary: binary.display().to_string(),
            accel: resolve_accel("auto"),
            machine: "pc".into(),
            migration_address: "127.0.0.1".into(),
            max_bandwidth_bytes_s: 1 << 30,
            downtime_limit_ms: 300,
            auto_converge: true,
            multifd_channels: 0,
            capacity: HostCapacity {
                memory_mib: 4096,
                vcpus: 8,
            },
            allowed: MachineAllowList {
                host: "hv-test".into(),
                ..MachineAllowList::default()
            },
            run_as: None,
            tls: None,
        }
    }

    fn spec(name: &str) -> VmSpec {
        VmSpec {
            name: name.into(),
            memory_mib: 64,
            vcpus: 1,
            dirty_rate_mib_s: 0,
            features: vec![],
            qemu: None,
        }
    }

    /// Kills every QEMU a test started, whatever happens to the test.
    struct Reaper(Vec<PathBuf>);

    impl Drop for Reaper {
        fn drop(&mut self) {
            for dir in &self.0 {
                let Ok(entries) = std::fs::read_dir(dir.join("qemu")) else {
                    continue;
                };
                for e in entries.flatten() {
                    if e.path().extension().is_some_and(|x| x == "pid")
                        && let Ok(pid) = std::fs::read_to_string(e.path())
                        && let Ok(pid) = pid.trim().parse::<i32>()
                    {
                        unsafe {
                            libc::kill(pid, libc::SIGKILL);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn query_migrate_becomes_transfer_stats() {
        // What QEMU 7.2 answered mid-migration on this machine.
        let info: MigrationInfo = serde_json::from_str(
            r#"{"expected-downtime": 3904, "status": "active", "setup-time": 4,
                "total-time": 4013, "ram": {"total": 67641344, "dirty-sync-count": 2,
                "page-size": 4096, "remaining": 57475072, "mbps": 134.28432,
                "transferred": 68823617, "dirty-pages-rate": 4082, "normal": 16768}}"#,
        )
        .unwrap();
        let s = transfer_stats(&info);
        assert_eq!(
            (s.bytes_total, s.bytes_transferred, s.bytes_remaining),
            (67_641_344, 68_823_617, 57_475_072)
        );
        assert_eq!(s.rate_bytes_s, 16_785_540); // 134.28432 Mbit/s
        assert_eq!(s.dirty_rate_bytes_s, 4082 * 4096);
        assert_eq!(s.iteration, 2);
        assert_eq!(
            (s.expected_downtime_ms, s.elapsed_ms, s.setup_time_ms),
            (3904, 4013, 4)
        );
        assert_eq!(s.downtime_ms, 0, "not known until completed");
        // Completed: the real downtime.
        let done: MigrationInfo = serde_json::from_str(
            r#"{"status": "completed", "setup-time": 4, "downtime": 46, "total-time": 4985,
                "ram": {"remaining": 0, "transferred": 190499081, "total": 67641344}}"#,
        )
        .unwrap();
        let s = transfer_stats(&done);
        assert_eq!(
            (s.downtime_ms, s.expected_downtime_ms, s.bytes_remaining),
            (46, 46, 0)
        );
        // A fresh guest answers {}.
        assert_eq!(
            transfer_stats(&MigrationInfo::default()),
            TransferStats::default()
        );
    }

    #[test]
    fn run_states_map_to_guest_states() {
        assert_eq!(guest_state("running", false), GuestState::Running);
        assert_eq!(guest_state("inmigrate", true), GuestState::Incoming);
        assert_eq!(guest_state("postmigrate", false), GuestState::Paused);
        assert_eq!(guest_state("paused", false), GuestState::Paused);
        // Arrived but not resumed yet: still the incoming copy.
        assert_eq!(guest_state("paused", true), GuestState::Incoming);
    }

    #[test]
    fn post_copy_states_become_transfer_stages() {
        // What QEMU 7.2 answered on the source during post-copy here.
        let active: MigrationInfo = serde_json::from_str(
            r#"{"expected-downtime": 31695, "status": "postcopy-active", "total-time": 1828,
                "ram": {"total": 134750208, "postcopy-requests": 1, "remaining": 130990080,
                "postcopy-bytes": 1674471, "transferred": 8015449, "page-size": 4096}}"#,
        )
        .unwrap();
        let s = transfer_stats(&active);
        assert_eq!(s.stage, TransferStage::Postcopy);
        assert_eq!(s.postcopy_requests, 1);
        assert_eq!(s.bytes_remaining, 130_990_080);
        for status in ["postcopy-paused", "postcopy-recover"] {
            let paused: MigrationInfo = serde_json::from_value(json!({
                "status": status,
                "ram": {"postcopy-requests": 7, "postcopy-bytes": 406311, "remaining": 132255744},
            }))
            .unwrap();
            let s = transfer_stats(&paused);
            assert_eq!(s.stage, TransferStage::PostcopyPaused, "{status}");
            assert_eq!(s.postcopy_requests, 7, "{status}");
        }
        // Completed: after a switchover if pages went in post-copy.
        let done: MigrationInfo = serde_json::from_str(
            r#"{"status": "completed", "downtime": 1, "ram": {"postcopy-requests": 40,
                "postcopy-bytes": 132595339, "remaining": 0}}"#,
        )
        .unwrap();
        let s = transfer_stats(&done);
        assert_eq!(
            (s.stage, s.postcopy_requests),
            (TransferStage::Postcopy, 40)
        );
        for status in ["setup", "active", "device", "completed", "failed"] {
            let info: MigrationInfo =
                serde_json::from_value(json!({"status": status, "ram": {"remaining": 5}})).unwrap();
            assert_eq!(
                transfer_stats(&info).stage,
                TransferStage::Precopy,
                "{status}"
            );
        }
    }

    /// A QMP server scripted by `answer`: each command gets `Some(reply)`
    /// (`{"error": …}` for an error, anything else as the return value), or
    /// `None` to close the connection without replying. Every command is
    /// kept, in order.
    async fn fake_qemu(
        dir: &Path,
        answer: impl Fn(&serde_json::Value) -> Option<serde_json::Value> + Send + 'static,
    ) -> (Qmp, Arc<Mutex<Vec<serde_json::Value>>>) {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let path = dir.join("fake.qmp");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            let greeting =
                json!({"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}}});
            write
                .write_all(format!("{greeting}\n").as_bytes())
                .await
                .unwrap();
            while let Ok(Some(line)) = lines.next_line().await {
                let command: serde_json::Value = serde_json::from_str(&line).unwrap();
                let reply = if command["execute"] == "qmp_capabilities" {
                    Some(json!({}))
                } else {
                    log.lock().unwrap().push(command.clone());
                    answer(&command)
                };
                let Some(reply) = reply else { return };
                let message = match reply.get("error") {
                    Some(_) => json!({"error": reply["error"], "id": command["id"]}),
                    None => json!({"return": reply, "id": command["id"]}),
                };
                write
                    .write_all(format!("{message}\n").as_bytes())
                    .await
                    .unwrap();
            }
        });
        (Qmp::connect(&path).await.unwrap(), seen)
    }

    /// A hypervisor holding guest "g" (incoming or not) behind `qmp`.
    fn holding(dir: &Path, qmp: Qmp, incoming: bool) -> QemuHypervisor {
        let h = hypervisor(settings(Path::new("/nonexistent/qemu")), dir);
        let gone = Arc::new(AtomicBool::new(false));
        h.lock().insert(
            "g".into(),
            Instance {
                held: Held {
                    spec: spec("g"),
                    incoming,
                    taps: vec![],
                    postcopy: false,
                },
                qmp,
                state: if incoming {
                    GuestState::Incoming
                } else {
                    GuestState::Running
                },
                gone,
            },
        );
        h
    }

    fn names(seen: &Mutex<Vec<serde_json::Value>>) -> Vec<String> {
        seen.lock()
            .unwrap()
            .iter()
            .map(|c| c["execute"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    fn capability(command: &serde_json::Value, name: &str) -> Option<bool> {
        command["arguments"]["capabilities"]
            .as_array()?
            .iter()
            .find(|c| c["capability"] == name)?["state"]
            .as_bool()
    }

    #[tokio::test]
    async fn post_copy_is_enabled_only_when_asked_and_the_plan_sets_the_downtime() {
        let dir = tempfile::tempdir().unwrap();
        let (qmp, seen) = fake_qemu(dir.path(), |_| Some(json!({}))).await;
        let h = hypervisor(settings(Path::new("/nonexistent/qemu")), dir.path());
        let plans = [
            TransferPlan {
                postcopy: true,
                downtime_limit_ms: 0,
            },
            TransferPlan {
                postcopy: false,
                downtime_limit_ms: 1200,
            },
        ];
        for plan in plans {
            h.configure_migration(
                &qmp,
                End::Outgoing {
                    destination: "hv-b",
                },
                plan,
            )
            .await
            .unwrap();
        }
        h.configure_migration(&qmp, End::Incoming, TransferPlan::default())
            .await
            .unwrap();
        let seen = seen.lock().unwrap().clone();
        let commands: Vec<&serde_json::Value> = seen
            .iter()
            .filter(|c| c["execute"] != "object-del")
            .collect();
        assert_eq!(commands.len(), 6, "{commands:#?}");
        let (caps, params): (Vec<&serde_json::Value>, Vec<&serde_json::Value>) = commands
            .into_iter()
            .partition(|c| c["execute"] == "migrate-set-capabilities");
        assert_eq!(
            caps.iter()
                .map(|c| capability(c, "postcopy-ram"))
                .collect::<Vec<_>>(),
            [Some(true), Some(false), Some(false)],
            "set, and cleared on a reused QEMU"
        );
        assert!(caps.iter().all(|c| capability(c, "events") == Some(true)));
        let downtime: Vec<_> = params
            .iter()
            .map(|p| p["arguments"]["downtime-limit"].as_u64())
            .collect();
        assert_eq!(
            downtime,
            [Some(300), Some(1200), Some(300)],
            "0: the config's"
        );
        for p in &params {
            assert_eq!(
                p["arguments"]["max-postcopy-bandwidth"], p["arguments"]["max-bandwidth"],
                "the host's cap holds after a switchover"
            );
        }
    }

    #[tokio::test]
    async fn a_destination_that_cannot_do_post_copy_says_what_it_needs() {
        let dir = tempfile::tempdir().unwrap();
        let (qmp, _seen) = fake_qemu(dir.path(), |command| {
            Some(match capability(command, "postcopy-ram") {
                Some(true) => {
                    json!({"error": {"class": "GenericError", "desc": "Postcopy is not supported"}})
                }
                _ => json!({}),
            })
        })
        .await;
        let mut s = settings(Path::new("/nonexistent/qemu"));
        s.run_as = Some("nobody".into());
        let h = hypervisor(s, dir.path());
        let plan = TransferPlan {
            postcopy: true,
            downtime_limit_ms: 0,
        };
        let err = h
            .configure_migration(&qmp, End::Incoming, plan)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("Postcopy is not supported"), "{err}");
        assert!(err.contains("vm.unprivileged_userfaultfd"), "{err}");
        h.configure_migration(&qmp, End::Incoming, TransferPlan::default())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn resume_postcopy_reconnects_with_resume_only_when_paused() {
        let dir = tempfile::tempdir().unwrap();
        let status = Arc::new(Mutex::new("postcopy-paused"));
        let now = status.clone();
        let (qmp, seen) = fake_qemu(dir.path(), move |command| {
            Some(match command["execute"].as_str() {
                Some("query-migrate") => json!({"status": *now.lock().unwrap()}),
                _ => json!({}),
            })
        })
        .await;
        let h = holding(dir.path(), qmp, false);
        h.resume_postcopy("g", "tcp:127.0.0.1:40053").await.unwrap();
        let migrate = seen.lock().unwrap().last().cloned().unwrap();
        assert_eq!(migrate["execute"], "migrate");
        assert_eq!(
            migrate["arguments"],
            json!({"uri": "tcp:127.0.0.1:40053", "resume": true})
        );

        let err = h.resume_postcopy("g", "unix:/x").await.unwrap_err();
        assert!(err.to_string().contains("not a tcp: address"), "{err}");
        for state in ["postcopy-active", "active", "completed"] {
            *status.lock().unwrap() = state;
            seen.lock().unwrap().clear();
            let err = h
                .resume_postcopy("g", "tcp:127.0.0.1:40053")
                .await
                .unwrap_err();
            assert!(
                matches!(&err, HypervisorError::Failed(t) if t.contains(&format!("it is {state}, not paused"))),
                "{err:?}"
            );
            assert_eq!(names(&seen), ["query-migrate"], "no migrate sent");
        }
    }

    #[tokio::test]
    async fn a_switch_qemu_refuses_did_not_happen_and_one_without_answer_is_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let (qmp, _seen) = fake_qemu(dir.path(), |command| {
            Some(match command["execute"].as_str() {
                Some("migrate-start-postcopy") => json!({"error": {"class": "GenericError",
                    "desc": "Enable postcopy with migrate_set_capability before the start of migration"}}),
                _ => json!({}),
            })
        })
        .await;
        let h = holding(dir.path(), qmp, false);
        let err = h.start_postcopy("g").await.unwrap_err();
        assert!(
            matches!(&err, HypervisorError::Failed(t) if t.contains("Enable postcopy")),
            "{err:?}"
        );
        assert_eq!(h.roles("g").unwrap(), (false, false), "free to run again");

        let dir = tempfile::tempdir().unwrap();
        let (qmp, seen) = fake_qemu(dir.path(), |command| {
            (command["execute"] != "migrate-start-postcopy").then(|| json!({}))
        })
        .await;
        let h = holding(dir.path(), qmp, false);
        let err = h.start_postcopy("g").await.unwrap_err();
        assert!(matches!(err, HypervisorError::Unknown(_)), "{err:?}");
        assert_eq!(names(&seen), ["migrate-start-postcopy"]);
        assert_eq!(h.roles("g").unwrap(), (false, true), "may have switched");
    }

    #[tokio::test]
    async fn a_transfer_in_post_copy_is_neither_cancelled_nor_resumed_at_its_source() {
        let dir = tempfile::tempdir().unwrap();
        let (qmp, seen) = fake_qemu(dir.path(), |command| {
            Some(match command["execute"].as_str() {
                Some("query-migrate") => json!({"status": "postcopy-active"}),
                Some("query-status") => json!({"status": "finish-migrate", "running": false}),
                _ => json!({}),
            })
        })
        .await;
        let h = holding(dir.path(), qmp, false);
        let err = h.cancel_transfer("g").await.unwrap_err().to_string();
        assert!(err.contains("cannot be cancelled"), "{err}");
        let err = h.resume("g").await.unwrap_err().to_string();
        assert!(err.contains("must never run again"), "{err}");
        let sent = names(&seen);
        assert!(
            !sent.iter().any(|c| c == "migrate_cancel" || c == "cont"),
            "{sent:?}"
        );
        // Recorded in guests.json: a restarted agent refuses it too.
        let list = std::fs::read_to_string(dir.path().join("guests.json")).unwrap();
        assert!(list.contains("\"postcopy\": true"), "{list}");
    }

    /// Settings whose kernel_dir is `dir/kernels`, holding `k.elf`.
    fn with_kernels(binary: &Path, dir: &Path) -> QemuSettings {
        let kernels = dir.join("kernels");
        std::fs::create_dir_all(&kernels).unwrap();
        std::fs::write(kernels.join("k.elf"), b"not really a kernel").unwrap();
        let mut s = settings(binary);
        s.allowed.kernel_dir = Some(kernels);
        s
    }

    fn hypervisor(settings: QemuSettings, dir: &Path) -> QemuHypervisor {
        QemuHypervisor {
            settings,
            dir: dir.to_path_buf(),
            tls_dir: None,
            guests: Mutex::new(BTreeMap::new()),
            file: Mutex::new(()),
            offered: std::sync::OnceLock::new(),
        }
    }

    #[test]
    fn the_command_line_carries_the_spec_the_sandbox_and_the_incoming_flags() {
        let dir = tempfile::tempdir().unwrap();
        let h = hypervisor(
            with_kernels(Path::new("/usr/bin/qemu-system-x86_64"), dir.path()),
            dir.path(),
        );
        let mut vm = spec("web-01");
        vm.vcpus = 2;
        vm.qemu = Some(QemuMachine {
            kernel: "k.elf".into(),
            append: "ws=8 quiet".into(),
            ..QemuMachine::default()
        });
        let resolved = h.resolve(&vm).unwrap();
        let argv = h.arguments(&vm, &resolved, false);
        let args = argv.join(" ");
        assert!(args.contains("-machine pc,accel="), "{args}");
        assert!(args.contains("-m 64 -smp 2"), "{args}");
        let kernel = dir.path().canonicalize().unwrap().join("kernels/k.elf");
        assert!(
            args.ends_with(&format!("-kernel {} -append ws=8 quiet", kernel.display())),
            "{args}"
        );
        // The kernel's command line is one argument, spaces and all.
        assert!(argv.contains(&"ws=8 quiet".to_string()), "{argv:?}");
        assert!(
            args.contains(
                "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
            ),
            "{args}"
        );
        assert!(!args.contains("-runas"), "{args}");
        assert!(!args.contains("-incoming"), "{args}");
        let args = h.arguments(&vm, &resolved, true).join(" ");
        assert!(args.ends_with("-incoming defer -S"), "{args}");
        // The guest's own machine type wins over the host's.
        vm.qemu.as_mut().unwrap().machine = "q35".into();
        let args = h.arguments(&vm, &h.resolve(&vm).unwrap(), false).join(" ");
        assert!(args.contains("-machine q35,accel="), "{args}");
    }

    #[test]
    fn run_as_adds_runas_and_lets_qemu_make_its_one_setuid() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = settings(Path::new("/usr/bin/qemu-system-x86_64"));
        s.run_as = Some("tern-qemu".into());
        let h = hypervisor(s, dir.path());
        let vm = spec("g");
        let args = h.arguments(&vm, &h.resolve(&vm).unwrap(), false).join(" ");
        assert!(
            args.contains(
                "-sandbox on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny \
                 -qmp"
            ),
            "{args}"
        );
        assert!(args.contains("-runas tern-qemu"), "{args}");
    }

    #[tokio::test]
    async fn a_refused_machine_starts_no_qemu() {
        let dir = tempfile::tempdir().unwrap();
        // A binary that would leave a mark if it ever ran.
        let marker = dir.path().join("ran");
        let fake = dir.path().join("qemu-system-x86_64");
        std::fs::write(&fake, format!("#!/bin/sh\ntouch {}\n", marker.display())).unwrap();
        let mut perms = std::fs::metadata(&fake).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&fake, perms).unwrap();
        let h = QemuHypervisor::open(dir.path(), with_kernels(&fake, dir.path()), &[])
            .await
            .unwrap();
        let mut vm = spec("g");
        vm.qemu = Some(QemuMachine {
            kernel: "../../etc/shadow".into(),
            ..QemuMachine::default()
        });
        let refusal = h.check_spec(&vm).unwrap_err();
        assert_eq!(refusal.field, "qemu.kernel");
        let err = h
            .start_incoming(&vm, "m1.1", false)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("vm g: qemu.kernel \"../../etc/shadow\" is a path"),
            "{err}"
        );
        assert!(!marker.exists(), "QEMU was started");
        assert!(!dir.path().join("qemu/g.log").exists(), "{err}");
        assert!(h.guests().await.is_empty());
    }

    #[tokio::test]
    async fn a_guest_migrates_between_two_hosts_and_a_restart_re_attaches() {
        let Some(binary) = qemu_binary_for_tests() else {
            return;
        };
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let _reaper = Reaper(vec![a.path().into(), b.path().into()]);
        let src = QemuHypervisor::open(a.path(), settings(&binary), &[spec("g")])
            .await
            .unwrap();
        let dst = QemuHypervisor::open(b.path(), settings(&binary), &[])
            .await
            .unwrap();
        assert_eq!(src.status("g").await, Some(GuestState::Running));

        let address = dst.start_incoming(&spec("g"), "m1.1", false).await.unwrap();
        assert!(address.starts_with("tcp:127.0.0.1:"), "{address}");
        assert_eq!(dst.status("g").await, Some(GuestState::Incoming));
        // A second incoming copy of the same guest is refused.
        assert_eq!(
            dst.start_incoming(&spec("g"), "m1.2", false).await,
            Err(HypervisorError::AlreadyExists("g".into()))
        );

        let (tx, mut rx) = mpsc::channel(64);
        let stats = src
            .transfer_out("g", "hv-b", &address, TransferPlan::default(), tx)
            .await
            .unwrap();
        assert!(stats.bytes_total >= 64 << 20, "{stats:?}");
        assert_eq!(stats.bytes_remaining, 0);
        assert!(rx.recv().await.is_some(), "progress was reported");
        assert_eq!(src.status("g").await, Some(GuestState::Paused));

        dst.complete_incoming("g", &stats).await.unwrap();
        assert_eq!(dst.status("g").await, Some(GuestState::Incoming));
        dst.resume("g").await.unwrap();
        assert_eq!(dst.status("g").await, Some(GuestState::Running));
        src.kill("g").await.unwrap();
        assert_eq!(src.status("g").await, None);
        src.kill("g").await.unwrap(); // idempotent

        // The agent goes away; QEMU stays; a new one re-attaches.
        let pid = std::fs::read_to_string(b.path().join("qemu/g.pid")).unwrap();
        drop(dst);
        let dst = QemuHypervisor::open(b.path(), settings(&binary), &[spec("seed-ignored")])
            .await
            .unwrap();
        let guests = dst.guests().await;
        assert_eq!(guests.len(), 1, "{guests:?}");
        assert_eq!(
            (guests[0].spec.name.as_str(), guests[0].state),
            ("g", GuestState::Running)
        );
        assert_eq!(
            std::fs::read_to_string(b.path().join("qemu/g.pid")).unwrap(),
            pid
        );
        dst.kill("g").await.unwrap();
        assert!(dst.guests().await.is_empty());
    }

    /// `[tls]` files of agent `name`, issued by the CA in `dir/ca` (made
    /// on first use) with 127.0.0.1 among its names.
    fn identity(dir: &Path, name: &str) -> TlsConfig {
        use crate::trust::ca;
        let ca_dir = dir.join("ca");
        if !ca_dir.join(ca::CA_CERT).exists() {
            ca::init(&ca_dir).unwrap();
        }
        let request = ca::IssueRequest {
            name: name.into(),
            role: crate::trust::Role::Agent,
            sans: vec!["127.0.0.1".into()],
            days: 30,
        };
        let folder = ca::issue(&ca_dir, &request, &dir.join("ids")).unwrap();
        TlsConfig {
            ca: folder.join(ca::IDENTITY_CA),
            cert: folder.join(ca::IDENTITY_CERT),
            key: folder.join(ca::IDENTITY_KEY),
        }
    }

    #[test]
    fn qemus_copy_of_the_identity_is_readable_by_its_user_alone() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let files = identity(dir.path(), "hv-a");
        let qemu_dir = dir.path().join("state/qemu");
        std::fs::create_dir_all(&qemu_dir).unwrap();
        let root = unsafe { libc::geteuid() } == 0;
        let run_as = root.then_some("nobody");
        if root {
            // The folders above must let nobody through.
            for d in [dir.path(), &dir.path().join("state"), &qemu_dir] {
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711)).unwrap();
            }
        }
        let tls = write_tls_dir(&qemu_dir, &files, run_as).unwrap();
        assert_eq!(tls, qemu_dir.join("tls"));
        let owner = run_as.map(|u| UserIds::of(u).unwrap().uid);
        let meta = std::fs::metadata(&tls).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o700);
        if let Some(uid) = owner {
            assert_eq!(meta.uid(), uid);
        }
        let cert = std::fs::read(&files.cert).unwrap();
        let key = std::fs::read(&files.key).unwrap();
        for (name, content) in [
            ("ca-cert.pem", std::fs::read(&files.ca).unwrap()),
            ("server-cert.pem", cert.clone()),
            ("server-key.pem", key.clone()),
            ("client-cert.pem", cert),
            ("client-key.pem", key),
        ] {
            let path = tls.join(name);
            assert_eq!(std::fs::read(&path).unwrap(), content, "{name}");
            let meta = std::fs::metadata(&path).unwrap();
            assert_eq!(meta.mode() & 0o777, 0o400, "{name} is not world-readable");
            if let Some(uid) = owner {
                assert_eq!(meta.uid(), uid, "{name} belongs to QEMU's user");
            }
        }
        // A second start rewrites it (a renewed certificate is used).
        std::fs::write(tls.join("stale"), b"x").unwrap();
        write_tls_dir(&qemu_dir, &files, run_as).unwrap();
        assert!(!tls.join("stale").exists());
        assert!(!qemu_dir.join("tls.new").exists());
    }

    #[test]
    fn a_run_as_user_that_cannot_reach_the_credentials_stops_the_start() {
        use std::os::unix::fs::PermissionsExt;
        if unsafe { libc::geteuid() } != 0 {
            return; // only root can make QEMU another user
        }
        let dir = tempfile::tempdir().unwrap();
        let files = identity(dir.path(), "hv-a");
        let state = dir.path().join("state");
        let qemu_dir = state.join("qemu");
        std::fs::create_dir_all(&qemu_dir).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
        let err = write_tls_dir(&qemu_dir, &files, Some("nobody"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("nobody cannot enter {}", state.display())),
            "{err}"
        );
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o711)).unwrap();
        write_tls_dir(&qemu_dir, &files, Some("nobody")).unwrap();
        let err = write_tls_dir(&qemu_dir, &files, Some("no-such-user-here"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no such user"), "{err}");
    }

    #[tokio::test]
    async fn with_tls_a_guest_goes_only_to_a_tls_destination_whose_certificate_names_it() {
        let Some(binary) = qemu_binary_for_tests() else {
            return;
        };
        let (a, b, ids) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        let _reaper = Reaper(vec![a.path().into(), b.path().into()]);
        let with_tls = |name: &str| QemuSettings {
            tls: Some(identity(ids.path(), name)),
            ..settings(&binary)
        };
        let src = QemuHypervisor::open(a.path(), with_tls("hv-a"), &[spec("g")])
            .await
            .unwrap();
        let dst = QemuHypervisor::open(b.path(), with_tls("hv-b"), &[])
            .await
            .unwrap();
        let address = dst.start_incoming(&spec("g"), "m1.1", false).await.unwrap();
        let qmp = dst.qmp("g").unwrap();
        let params: serde_json::Value =
            qmp.execute("query-migrate-parameters", None).await.unwrap();
        assert_eq!(params["tls-creds"], TLS_INCOMING, "{params}");

        // A certificate that does not name the host the source meant is
        // refused: hv-b's is not hv-c's.
        let (tx, _rx) = mpsc::channel(64);
        let err = src
            .transfer_out("g", "hv-c", &address, TransferPlan::default(), tx)
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("Certificate does not match the hostname hv-c"),
            "{err}"
        );
        assert_eq!(src.status("g").await, Some(GuestState::Running));
        dst.kill("g").await.unwrap();

        let address = dst.start_incoming(&spec("g"), "m1.2", false).await.unwrap();
        let (tx, _rx) = mpsc::channel(64);
        let stats = src
            .transfer_out("g", "hv-b", &address, TransferPlan::default(), tx)
            .await
            .unwrap();
        assert!(stats.bytes_total >= 64 << 20, "{stats:?}");
        let params: serde_json::Value = src
            .qmp("g")
            .unwrap()
            .execute("query-migrate-parameters", None)
            .await
            .unwrap();
        assert_eq!(
            (&params["tls-creds"], &params["tls-hostname"]),
            (&json!(TLS_OUTGOING), &json!("hv-b")),
            "{params}"
        );
        dst.complete_incoming("g", &stats).await.unwrap();
        dst.resume("g").await.unwrap();
        assert_eq!(dst.status("g").await, Some(GuestState::Running));
        src.kill("g").await.unwrap();

        // A destination without TLS gets nothing from a source with it.
        let plain = tempfile::tempdir().unwrap();
        let _reaper = Reaper(vec![plain.path().into()]);
        let back = QemuHypervisor::open(plain.path(), settings(&binary), &[])
            .await
            .unwrap();
        let address = back
            .start_incoming(&spec("g"), "m2.1", false)
            .await
            .unwrap();
        let (tx, _rx) = mpsc::channel(64);
        let err = dst
            .transfer_out("g", "hv-a", &address, TransferPlan::default(), tx)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("TLS handshake failed"), "{err}");
        assert_eq!(dst.status("g").await, Some(GuestState::Running));
        back.kill("g").await.unwrap();
        dst.kill("g").await.unwrap();
    }

    #[tokio::test]
    async fn a_cancelled_transfer_leaves_the_source_running() {
        let Some(binary) = qemu_binary_for_tests() else {
            return;
        };
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let _reaper = Reaper(vec![a.path().into(), b.path().into()]);
        // The guest's RAM is untouched: its zero pages go as a few bytes
        // each, about 400 KB for 64 MiB. At 32 KiB/s that still takes over
        // ten seconds, long enough to cancel in the middle (at 4 MiB/s it
        // sometimes completed before the cancel arrived).
        let slow = QemuSettings {
            max_bandwidth_bytes_s: 32 << 10,
            ..settings(&binary)
        };
        let src = Arc::new(
            QemuHypervisor::open(a.path(), slow, &[spec("g")])
                .await
                .unwrap(),
        );
        let dst = QemuHypervisor::open(b.path(), settings(&binary), &[])
            .await
            .unwrap();
        let address = dst.start_incoming(&spec("g"), "m1.1", false).await.unwrap();
        let (tx, mut rx) = mpsc::channel(64);
        let transfer = {
            let src = src.clone();
            tokio::spawn(async move {
                src.transfer_out("g", "hv-b", &address, TransferPlan::default(), tx)
                    .await
            })
        };
        rx.recv().await.expect("progress before the cancel");
        src.cancel_transfer("g").await.unwrap();
        assert_eq!(
            transfer.await.unwrap(),
            Err(HypervisorError::Cancelled("g".into()))
        );
        assert_eq!(src.status("g").await, Some(GuestState::Running));
        dst.kill("g").await.unwrap();

        // A migration left running by an agent that went away (its transfer
        // task is gone) is cancelled by resume, so it cannot complete later
        // and pause the guest.
        let address = dst.start_incoming(&spec("g"), "m1.2", false).await.unwrap();
        let (tx, mut rx) = mpsc::channel(64);
        let abandoned = {
            let src = src.clone();
            tokio::spawn(async move {
                src.transfer_out("g", "hv-b", &address, TransferPlan::default(), tx)
                    .await
            })
        };
        rx.recv().await.expect("progress");
        abandoned.abort();
        src.resume("g").await.unwrap();
        let info = src.qmp("g").unwrap().query_migrate().await.unwrap();
        assert_eq!(info.status.as_deref(), Some("cancelled"), "{info:?}");
        assert_eq!(src.status("g").await, Some(GuestState::Running));
        dst.kill("g").await.unwrap();
    }

    #[tokio::test]
    async fn a_qemu_that_dies_on_its_own_is_no_longer_listed() {
        let Some(binary) = qemu_binary_for_tests() else {
            return;
        };
        let a = tempfile::tempdir().unwrap();
        let _reaper = Reaper(vec![a.path().into()]);
        let h = QemuHypervisor::open(a.path(), settings(&binary), &[spec("g"), spec("h")])
            .await
            .unwrap();
        let pid: i32 = std::fs::read_to_string(a.path().join("qemu/g.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while h.guests().await.len() != 1 {
            assert!(
                Instant::now() < deadline,
                "g still listed: {:?}",
                h.guests().await
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(h.guests().await[0].spec.name, "h");
        assert_eq!(h.status("g").await, None);
        assert!(!a.path().join("qemu/g.qmp").exists());
        assert!(a.path().join("qemu/g.log.prev").exists(), "its log is kept");
        // The list on disk agrees: a restart does not look for it.
        let list = std::fs::read_to_string(a.path().join("qemu/guests.json")).unwrap();
        assert!(!list.contains("\"g\""), "{list}");
        h.kill("h").await.unwrap();
    }

    #[tokio::test]
    async fn a_qemu_that_cannot_start_says_why() {
        let Some(binary) = qemu_binary_for_tests() else {
            return;
        };
        let a = tempfile::tempdir().unwrap();
        let _reaper = Reaper(vec![a.path().into()]);
        // A kernel the allow-list admits but QEMU cannot load.
        let mut bad = spec("g");
        bad.qemu = Some(QemuMachine {
            kernel: "k.elf".into(),
            ..QemuMachine::default()
        });
        let settings = with_kernels(&binary, a.path());
        let err = match QemuHypervisor::open(a.path(), settings, &[bad]).await {
            Ok(_) => panic!("a kernel QEMU cannot load must stop the start"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("QEMU for g exited at start"), "{err}");
        assert!(
            err.contains("invalid kernel header"),
            "QEMU's own words: {err}"
        );
    }

    use super::test_guest as guest;

    /// One post-copy test at a time: each runs a busy TCG guest on each end
    /// of a slow link, and two cores shared by more would stretch them.
    static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    /// Two hosts on loopback for the test guest (64 MiB, rewriting
    /// `working_set_mib`), its kernel in each one's kernel_dir, under TCG
    /// (nested KVM is slow here) and a 16 MiB/s cap so a transfer lasts
    /// seconds, post-copy included. The source runs "g", filled and ready.
    struct Pair {
        src: Arc<QemuHypervisor>,
        dst: Arc<QemuHypervisor>,
        spec: VmSpec,
        // Before the folders it reads the pidfiles in (fields drop in order).
        _reaper: Reaper,
        _dirs: (tempfile::TempDir, tempfile::TempDir),
    }

    async fn pair(binary: &Path, working_set_mib: u64) -> Pair {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let reaper = Reaper(vec![a.path().into(), b.path().into()]);
        let host = |dir: &Path| {
            let kernels = dir.join("kernels");
            std::fs::create_dir_all(&kernels).unwrap();
            guest::build(&kernels).unwrap_or_else(|e| panic!("building the test guest: {e}"));
            let mut s = settings(binary);
            s.allowed.kernel_dir = Some(kernels);
            s.accel = "tcg".into();
            s.max_bandwidth_bytes_s = 16 << 20;
            s
        };
        let mut spec = spec("g");
        spec.qemu = Some(QemuMachine {
            kernel: "tern-guest.elf".into(),
            append: guest::cmdline(working_set_mib),
            ..QemuMachine::default()
        });
        let src = QemuHypervisor::open(a.path(), host(a.path()), std::slice::from_ref(&spec))
            .await
            .unwrap();
        let dst = QemuHypervisor::open(b.path(), host(b.path()), &[])
            .await
            .unwrap();
        let qmp = src.qmp("g").unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while read_u64(&qmp, guest::READY_ADDR).await != 1 {
            assert!(Instant::now() < deadline, "the test guest never got ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Pair {
            src: Arc::new(src),
            dst: Arc::new(dst),
            spec,
            _reaper: reaper,
            _dirs: (a, b),
        }
    }

    async fn read_u64(qmp: &Qmp, address: u64) -> u64 {
        let reply = qmp
            .human_monitor_command(&format!("xp /1gx {address:#x}"))
            .await
            .unwrap();
        guest::parse_xp(&reply).unwrap_or_else(|| panic!("xp said {reply:?}"))
    }

    /// Whether the guest's page counter moves on this QEMU.
    async fn guest_runs(qmp: &Qmp) -> bool {
        let before = read_u64(qmp, guest::COUNTER_ADDR).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        read_u64(qmp, guest::COUNTER_ADDR).await != before
    }

    async fn run_state(qmp: &Qmp) -> String {
        qmp.query_status().await.unwrap().status
    }

    async fn migration_status(qmp: &Qmp) -> String {
        qmp.query_migrate()
            .await
            .unwrap()
            .status
            .unwrap_or_default()
    }

    /// Wait (up to 10 s) until `qmp`'s migration is `status`.
    async fn until_status(qmp: &Qmp, status: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = migration_status(qmp).await;
            if now == status {
                return;
            }
            assert!(Instant::now() < deadline, "still {now}, never {status}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The next progress report at `stage` with bytes sent and bytes to go
    /// (up to 10 s).
    async fn progress_at(
        rx: &mut mpsc::Receiver<TransferStats>,
        stage: TransferStage,
    ) -> TransferStats {
        let wait = async {
            loop {
                let stats = rx.recv().await.expect("the transfer reports");
                if stats.stage == stage && stats.bytes_transferred > 0 && stats.bytes_remaining > 0
                {
                    return stats;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .unwrap_or_else(|_| panic!("no progress at {stage:?}"))
    }

    const POSTCOPY_PLAN: TransferPlan = TransferPlan {
        postcopy: true,
        downtime_limit_ms: 0,
    };

    type Transfer = tokio::task::JoinHandle<Result<TransferStats, HypervisorError>>;

    /// Start a post-copy transfer of "g" and switch it once under way.
    /// Returns the transfer and its progress.
    async fn switched(p: &Pair) -> (Transfer, mpsc::Receiver<TransferStats>) {
        let address = p.dst.start_incoming(&p.spec, "m1.1", true).await.unwrap();
        let (tx, mut rx) = mpsc::channel(1024);
        let transfer = {
            let (src, address) = (p.src.clone(), address.clone());
            tokio::spawn(async move {
                src.transfer_out("g", "hv-b", &address, POSTCOPY_PLAN, tx)
                    .await
            })
        };
        progress_at(&mut rx, TransferStage::Precopy).await;
        let waiting = {
            let dst = p.dst.clone();
            tokio::spawn(async move {
                dst.await_switchover("g")
                    .await
                    .map(|switched| (switched, Instant::now()))
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiting.is_finished(), "no switchover yet");
        let asked = Instant::now();
        p.src.start_postcopy("g").await.unwrap();
        println!("start_postcopy returned in {:?}", asked.elapsed());
        // The source stopped for good.
        let src = p.src.qmp("g").unwrap();
        let state = run_state(&src).await;
        assert!(
            state == "finish-migrate" || state == "postmigrate",
            "the source is {state}"
        );
        assert_eq!(p.src.status("g").await, Some(GuestState::Paused));
        let (switched, seen) = tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("the destination saw the switchover")
            .unwrap()
            .unwrap();
        assert!(switched, "a switchover, not a whole pre-copy");
        println!(
            "await_switchover returned {:?} after the request",
            seen - asked
        );
        (transfer, rx)
    }

    /// The commit point: after the switchover the destination still holds
    /// the guest paused (`-S`) until `resume`, which works in post-copy.
    async fn commit(p: &Pair) {
        let dst = p.dst.qmp("g").unwrap();
        assert_eq!(migration_status(&dst).await, "postcopy-active");
        for _ in 0..3 {
            let state = run_state(&dst).await;
            println!("destination after the switchover: {state}");
            assert!(
                state == "paused" || state == "postmigrate",
                "QEMU started the CPUs on its own: {state}"
            );
            assert_eq!(p.dst.status("g").await, Some(GuestState::Incoming));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        p.dst.resume("g").await.unwrap();
        assert_eq!(run_state(&dst).await, "running");
        assert_eq!(migration_status(&dst).await, "postcopy-active");
        assert!(guest_runs(&dst).await, "the guest runs on the destination");
    }

    #[tokio::test]
    async fn a_transfer_switched_to_post_copy_completes_on_the_destination() {
        let Some(binary) = qemu_binary_for_tests() else {
            return;
        };
        let _turn = TURN.lock().await;
        let p = pair(&binary, 16).await;
        let (transfer, mut rx) = switched(&p).await;
        // The source refuses what would strand the guest.
        let err = p.src.cancel_transfer("g").await.unwrap_err().to_string();
        assert!(err.contains("cannot be cancelled"), "{err}");
        let err = p.src.resume("g").await.unwrap_err().to_string();
        assert!(err.contains("must never run again"), "{err}");
        let src = p.src.qmp("g").unwrap();
        assert_eq!(migration_status(&src).await, "postcopy-active");
        progress_at(&mut rx, TransferStage::Postcopy).await;

        commit(&p).await;
        let finished = Instant::now();
        let stats = transfer.await.unwrap().unwrap();
        println!(
            "post-copy finished {:?} after the resume: {stats:?}",
            finished.elapsed()
        );
        assert_eq!(stats.stage, TransferStage::Postcopy);
        assert_eq!(stats.bytes_remaining, 0);
        p.dst.complete_incoming("g", &stats).await.unwrap();
        let dst = p.dst.qmp("g").unwrap();
        assert!(guest_runs(&dst).await, "the guest runs on the destination");
        assert!(!guest_runs(&src).await, "and not on the source");
        assert_eq!(p.dst.status("g").await, Some(GuestState::Running));
        // The completed source still must not run.
        let err = p.src.resume("g").await.unwrap_err().to_string();
        assert!(err.contains("must never run again"), "{err}");
        p.src.kill("g").await.unwrap();
        p.dst.kill("g").await.unwrap();
    }

    #[tokio::test]
    async fn a_broken_link_in_post_copy_is_recovered_and_the_transfer_completes() {
        let Some(binary) = qemu_binary_for_tests() else {
            return;
        };
        let _turn = TURN.lock().await;
        let p = pair(&binary, 16).await;
        let (transfer, mut rx) = switched(&p).await;
        commit(&p).await;
        let (src, dst) = (p.src.qmp("g").unwrap(), p.dst.qmp("g").unwrap());
        // Nothing to resume while the link holds. (A Recover then breaks
        // the destination's end off first: the source asks only once its
        // own end is paused, and the other may not have noticed.)
        let err = p
            .src
            .resume_postcopy("g", "tcp:127.0.0.1:1")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not paused"), "{err}");

        let broken = Instant::now();
        src.migrate_pause().await.unwrap();
        until_status(&src, "postcopy-paused").await;
        until_status(&dst, "postcopy-paused").await;
        println!(
            "both ends paused {:?} after migrate-pause",
            broken.elapsed()
        );
        progress_at(&mut rx, TransferStage::PostcopyPaused).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!transfer.is_finished(), "transfer_out waits while paused");
        println!(
            "the destination's run state while paused: {}, its guest runs: {}",
            run_state(&dst).await,
            guest_runs(&dst).await
        );

        let address = p.dst.recover_incoming("g", "m1.1").await.unwrap();
        let port = address.strip_prefix("tcp:127.0.0.1:").expect(&address);
        assert!(port.parse::<u16>().is_ok_and(|p| p > 0), "{address}");
        println!("migrate-recover listens at {address}");
        let resumed = Instant::now();
        p.src.resume_postcopy("g", &address).await.unwrap();
        progress_at(&mut rx, TransferStage::Postcopy).await;
        println!(
            "post-copy running again {:?} after resume",
            resumed.elapsed()
        );
        let stats = transfer.await.unwrap().unwrap();
        println!("completed {:?} after resume: {stats:?}", resumed.elapsed());
        assert_eq!(stats.stage, TransferStage::Postcopy);
        p.dst.complete_incoming("g", &stats).await.unwrap();
        assert!(guest_runs(&dst).await, "the guest runs on the destination");
        assert!(!guest_runs(&src).await, "and not on the source");
        p.src.kill("g").await.unwrap();
        p.dst.kill("g").await.unwrap();
    }

    #[tokio::test]
    async fn a_source_killed_in_post_copy_dies_and_its_stranded_destination_is_killed_at_once() {
        let Some(binary) = qemu_binary_for_tests() else {
            return;
        };
        let _turn = TURN.lock().await;
        let p = pair(&binary, 16).await;
        let (transfer, _rx) = switched(&p).await;
        commit(&p).await;
        let killing = Instant::now();
        p.src.kill("g").await.unwrap();
        println!("source killed in {:?}", killing.elapsed());
        assert_eq!(p.src.status("g").await, None);
        let err = transfer.await.unwrap().unwrap_err().to_string();
        assert!(
            err.contains("exited during the transfer, in post-copy"),
            "{err}"
        );
        let dst = p.dst.qmp("g").unwrap();
        until_status(&dst, "postcopy-paused").await;
        // Its CPUs wait for pages that cannot come: QEMU cannot quit.
        let killing = Instant::now();
        p.dst.kill("g").await.unwrap();
        let took = killing.elapsed();
        println!("stranded destination killed in {took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
        assert!(dst.is_closed());
        assert_eq!(p.dst.status("g").await, None);
    }

    #[tokio::test]
    async fn without_post_copy_a_transfer_migrates_as_before_and_cannot_switch() {
        let Some(binary) = qemu_binary_for_tests() else {
            return;
        };
        let _turn = TURN.lock().await;
        // A small working set: pre-copy converges at 16 MiB/s.
        let p = pair(&binary, 1).await;
        let address = p.dst.start_incoming(&p.spec, "m1.1", false).await.unwrap();
        let (tx, mut rx) = mpsc::channel(1024);
        let transfer = {
            let (src, address) = (p.src.clone(), address.clone());
            tokio::spawn(async move {
                src.transfer_out("g", "hv-b", &address, TransferPlan::default(), tx)
                    .await
            })
        };
        progress_at(&mut rx, TransferStage::Precopy).await;
        let src = p.src.qmp("g").unwrap();
        let caps: serde_json::Value = src
            .execute("query-migrate-capabilities", None)
            .await
            .unwrap();
        assert!(
            caps.as_array()
                .unwrap()
                .contains(&json!({"capability": "postcopy-ram", "state": false})),
            "{caps}"
        );
        let err = p.src.start_postcopy("g").await.unwrap_err();
        assert!(
            matches!(&err, HypervisorError::Failed(t) if t.contains("Enable postcopy")),
            "{err:?}"
        );
        assert_eq!(migration_status(&src).await, "active");
        assert!(guest_runs(&src).await, "the guest still runs on the source");
        assert_eq!(p.src.status("g").await, Some(GuestState::Running));
        // The destination sees no switchover: the transfer just completes.
        let stats = transfer.await.unwrap().unwrap();
        assert_eq!(stats.stage, TransferStage::Precopy);
        p.dst.await_switchover("g").await.unwrap();
        p.dst.complete_incoming("g", &stats).await.unwrap();
        let dst = p.dst.qmp("g").unwrap();
        assert_eq!(run_state(&dst).await, "paused");
        // Pre-copy: the source may still be resumed (a rollback).
        p.src.resume("g").await.unwrap();
        assert!(guest_runs(&src).await);
        p.src.kill("g").await.unwrap();
        p.dst.resume("g").await.unwrap();
        assert!(guest_runs(&dst).await, "the guest runs on the destination");
        p.dst.kill("g").await.unwrap();
    }

    #[tokio::test]
    async fn a_destination_whose_source_went_away_fails_its_wait_for_the_switchover() {
        let Some(binary) = qemu_binary_for_tests() else {
            return;
        };
        let _turn = TURN.lock().await;
        let p = pair(&binary, 16).await;
        let address = p.dst.start_incoming(&p.spec, "m1.1", true).await.unwrap();
        let waiting = {
            let dst = p.dst.clone();
            tokio::spawn(async move { dst.await_switchover("g").await })
        };
        let (tx, mut rx) = mpsc::channel(1024);
        let transfer = {
            let src = p.src.clone();
            tokio::spawn(async move {
                src.transfer_out("g", "hv-b", &address, POSTCOPY_PLAN, tx)
                    .await
            })
        };
        progress_at(&mut rx, TransferStage::Precopy).await;
        assert!(!waiting.is_finished());
        p.src.cancel_transfer("g").await.unwrap();
        assert_eq!(
            transfer.await.unwrap(),
            Err(HypervisorError::Cancelled("g".into()))
        );
        let err = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the wait ends with the incoming QEMU")
            .unwrap()
            .unwrap_err();
        assert!(
            err.to_string().contains("exited before the switchover"),
            "{err}"
        );
        assert!(guest_runs(&p.src.qmp("g").unwrap()).await);
        p.src.kill("g").await.unwrap();
        p.dst.kill("g").await.unwrap();
    }
}
