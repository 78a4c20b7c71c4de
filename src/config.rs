//! The two TOML files: the cluster inventory (`cluster.toml`, shared by agents
//! and consoles) and an agent's own config. Parsing is strict: an unknown key,
//! a duplicate name or a dangling reference is an error that names the file
//! and the offending entry, and nothing is started.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::protocol::address::{AddressError, normal_host, url_host};
use crate::protocol::bounds::{self, MAX_MEMORY_MIB, MAX_VCPUS};
use crate::protocol::machine::{MAX_NAME, MachineError, QemuMachine};
use crate::protocol::{FeatureSpec, Timing, VmSpec};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid: {message}")]
    Invalid { path: PathBuf, message: String },
}

fn invalid(path: &Path, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn parse<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| invalid(path, e.to_string().trim_end().to_string()))
}

/// `cluster.toml`: every host and where its agent listens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    #[serde(default)]
    pub host: Vec<HostEntry>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostEntry {
    pub name: String,
    /// e.g. `http://127.0.0.1:7701`
    pub address: String,
    /// The IP address this host's incoming migrations listen on (its
    /// agent's `[hypervisor] migration_address`), when it is not the host
    /// of `address`. A source sends a guest's memory nowhere else.
    #[serde(default)]
    pub migration_address: Option<String>,
}

impl HostEntry {
    /// The host an incoming address of this host must name, normalised
    /// (`protocol::address`): `migration_address`, else the host of
    /// `address`.
    pub fn migration_host(&self) -> Result<String, AddressError> {
        match &self.migration_address {
            Some(address) => normal_host(address),
            None => url_host(&self.address),
        }
    }
}

impl Inventory {
    pub fn load(path: &Path) -> Result<Inventory, ConfigError> {
        Inventory::parse(path, &read(path)?)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Inventory, ConfigError> {
        let inventory: Inventory = parse(path, text)?;
        if inventory.host.is_empty() {
            return Err(invalid(path, "it lists no [[host]]"));
        }
        let mut seen = HashSet::new();
        for host in &inventory.host {
            if host.name.trim().is_empty() {
                return Err(invalid(path, "a [[host]] has an empty name"));
            }
            check_name(path, "[[host]] name", &host.name)?;
            if host.address.len() > bounds::MAX_ADDRESS_LEN {
                return Err(invalid(
                    path,
                    format!(
                        "host {}: address is {} bytes, at most {}",
                        host.name,
                        host.address.len(),
                        bounds::MAX_ADDRESS_LEN
                    ),
                ));
            }
            if !seen.insert(host.name.as_str()) {
                return Err(invalid(path, format!("host {} is listed twice", host.name)));
            }
            if !(host.address.starts_with("http://") || host.address.starts_with("https://")) {
                return Err(invalid(
                    path,
                    format!(
                        "host {}: address {:?} must start with http:// or https://",
                        host.name, host.address
                    ),
                ));
            }
            if let Err(e) = url_host(&host.address) {
                return Err(invalid(path, format!("host {}: address {e}", host.name)));
            }
            if let Some(address) = &host.migration_address {
                let ip = normal_host(address).map(|h| h.parse::<std::net::IpAddr>());
                if !matches!(ip, Ok(Ok(_))) {
                    return Err(invalid(
                        path,
                        format!(
                            "host {}: migration_address = {address:?} is not an IP address",
                            host.name
                        ),
                    ));
                }
            }
        }
        Ok(inventory)
    }

    pub fn host(&self, name: &str) -> Option<&HostEntry> {
        self.host.iter().find(|h| h.name == name)
    }
}

/// An agent's config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub name: String,
    pub listen: String,
    pub state_dir: PathBuf,
    /// Relative paths are relative to the config file.
    pub inventory: PathBuf,
    #[serde(default = "default_heartbeat")]
    pub heartbeat_interval_ms: u64,
    #[serde(default = "default_peer_timeout")]
    pub peer_timeout_ms: u64,
    /// A transfer with no progress for this long is aborted and the source resumed.
    #[serde(default = "default_stall_timeout")]
    pub stall_timeout_ms: u64,
    /// First wait before a failed rollback is retried; doubles up to 5 minutes.
    #[serde(default = "default_rollback_retry")]
    pub rollback_retry_ms: u64,
    /// Migrations this host sources at once (evacuations and operators'
    /// alike); one more is refused. oVirt's vdsm defaults to 2.
    #[serde(default = "default_limit")]
    pub max_outgoing: u32,
    /// Migrations this host receives at once; one more is refused as
    /// "destination busy", which an evacuation waits out.
    #[serde(default = "default_limit")]
    pub max_incoming: u32,
    /// Retention: the newest this many closed migrations (and, each
    /// counted apart, received attempts and evacuations) are kept...
    #[serde(default = "default_retain_closed")]
    pub retain_closed: u32,
    /// ...and none older than this many days (audit entries neither).
    #[serde(default = "default_retain_days")]
    pub retain_days: u32,
    /// The newest this many audit entries are kept.
    #[serde(default = "default_retain_audit")]
    pub retain_audit: u32,
    /// The agent's own log, in `state_dir/logs`: one file a day (UTC), the
    /// newest this many kept.
    #[serde(default = "default_log_files")]
    pub log_files: u32,
    /// Watch streams (consoles, `tern watch`) this agent serves at once;
    /// one more is refused as ResourceExhausted.
    #[serde(default = "default_max_watchers")]
    pub max_watchers: u32,
    /// Where Prometheus scrapes `GET /metrics` (plain HTTP, read-only
    /// numbers); none: no metrics endpoint.
    #[serde(default)]
    pub metrics_listen: Option<String>,
    /// How long a feature stage may take before its effect is taken as
    /// unknown (it fails, and a rollback undoes it too).
    #[serde(default = "default_stage_timeout")]
    pub stage_timeout_ms: u64,
    /// How long resume, kill, status and cancelling a transfer may take.
    #[serde(default = "default_guest_op_timeout")]
    pub guest_op_timeout_ms: u64,
    /// How long starting the incoming guest may take (QEMU can take 15 s).
    #[serde(default = "default_incoming_timeout")]
    pub incoming_start_timeout_ms: u64,
    /// How long the incoming transfer may take to arrive once the source
    /// reports it complete.
    #[serde(default = "default_incoming_timeout")]
    pub incoming_complete_timeout_ms: u64,
    /// How long a stopping agent waits for attempts past Finish to end
    /// before it exits (the rest is journaled; its next start finishes it).
    #[serde(default = "default_stop_grace")]
    pub stop_grace_ms: u64,
    /// `[tls]`: this agent's identity from the cluster CA. Without it the
    /// agent serves plaintext, and only on loopback unless `insecure`.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Serve plaintext on a non-loopback address: anyone who reaches the
    /// port may do anything. Said loudly in the log and in `tern status`.
    #[serde(default)]
    pub insecure: bool,
    /// Whether an admin may change fault injection (`SetFaults`) here.
    #[serde(default)]
    pub allow_fault_injection: bool,
    #[serde(default)]
    pub hypervisor: HypervisorConfig,
    #[serde(default)]
    pub vm: Vec<VmSpec>,
    /// `[features.NAME]`: driver settings on this host, parsed by the driver.
    #[serde(default)]
    pub features: BTreeMap<String, toml::Table>,
}

/// `[tls]`: the files `tern ca issue --role agent` wrote for this host.
/// Relative paths are relative to the config file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The longest timer an agent config may set, in milliseconds: one day.
const MAX_TIMER_MS: u64 = 86_400_000;
/// How much faster (or slower) than real time the simulated hypervisor may run.
const MIN_SPEED: f64 = 0.001;
const MAX_SPEED: f64 = 1_000_000.0;

fn default_heartbeat() -> u64 {
    1000
}
fn default_peer_timeout() -> u64 {
    5000
}
fn default_stall_timeout() -> u64 {
    10_000
}
fn default_rollback_retry() -> u64 {
    2000
}
fn default_limit() -> u32 {
    2
}
fn default_retain_closed() -> u32 {
    1000
}
fn default_retain_days() -> u32 {
    30
}
fn default_retain_audit() -> u32 {
    100_000
}
fn default_log_files() -> u32 {
    7
}
/// The most daily log files a host may be configured to keep: ten years.
const MAX_LOG_FILES: u32 = 3650;
/// The most closed records of each kind a host may be configured to keep.
const MAX_RETAIN_CLOSED: u32 = 1_000_000;
/// The longest a host may be configured to keep them: a hundred years.
const MAX_RETAIN_DAYS: u32 = 36_500;
fn default_max_watchers() -> u32 {
    64
}
/// The most Watch streams an agent may be configured to serve at once.
const MAX_WATCHERS: u32 = 4096;
fn default_stage_timeout() -> u64 {
    60_000
}
fn default_guest_op_timeout() -> u64 {
    30_000
}
fn default_incoming_timeout() -> u64 {
    60_000
}
fn default_stop_grace() -> u64 {
    10_000
}
/// The most concurrent migrations a host may be configured to source or receive.
const MAX_LIMIT: u32 = 256;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HypervisorConfig {
    #[serde(default = "default_kind")]
    pub kind: String,
    /// sim: link speed. qemu: the migration's max-bandwidth.
    #[serde(default = "default_bandwidth")]
    pub bandwidth_mib_s: u64,
    /// sim: how many times faster than real time a transfer runs.
    #[serde(default = "default_speed")]
    pub speed: f64,
    /// The longest pause the final pre-copy iteration may cause.
    #[serde(default = "default_downtime")]
    pub downtime_limit_ms: u64,
    /// Host capacity offered to guests.
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    /// qemu: the emulator to run.
    #[serde(default = "default_qemu_binary")]
    pub binary: String,
    /// qemu: "auto" (KVM when /dev/kvm opens, TCG otherwise), "kvm" or "tcg".
    #[serde(default = "default_accel")]
    pub accel: String,
    /// qemu: the machine type, the same on every host of the cluster.
    #[serde(default = "default_machine")]
    pub machine: String,
    /// qemu: the address incoming migrations listen on, which sources must
    /// reach. Defaults to the IP of `listen`.
    #[serde(default)]
    pub migration_address: Option<String>,
    /// qemu: the auto-converge capability (throttle a guest that dirties
    /// memory faster than the link carries it).
    #[serde(default = "default_true")]
    pub auto_converge: bool,
    /// qemu: parallel migration channels; 0 keeps one stream (multifd off).
    #[serde(default)]
    pub multifd_channels: u32,
    /// qemu: the folder of the kernels a guest may boot, by file name.
    /// Relative to the config file.
    #[serde(default)]
    pub kernel_dir: Option<PathBuf>,
    /// qemu: `[hypervisor.storage]`, storage id → the folder its disk paths
    /// are relative to. Relative to the config file.
    #[serde(default)]
    pub storage: BTreeMap<String, PathBuf>,
    /// qemu: `[hypervisor.networks]`, network name → the Linux bridge a
    /// NIC's tap is attached to.
    #[serde(default)]
    pub networks: BTreeMap<String, String>,
    /// qemu: the user QEMU runs as (`-runas`) once it has opened its files.
    #[serde(default)]
    pub run_as: Option<String>,
    /// sim: `[hypervisor.faults]`, calls that fail, hang or are slow.
    #[serde(default)]
    pub faults: SimFaultsConfig,
}

/// A hypervisor call that fault injection can make fail or hang.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimCall {
    StartIncoming,
    Resume,
    Kill,
    CancelTransfer,
    CompleteIncoming,
}

impl SimCall {
    pub const ALL: [SimCall; 5] = [
        SimCall::StartIncoming,
        SimCall::Resume,
        SimCall::Kill,
        SimCall::CancelTransfer,
        SimCall::CompleteIncoming,
    ];

    /// As `[hypervisor.faults]` names it.
    pub fn as_str(self) -> &'static str {
        match self {
            SimCall::StartIncoming => "start_incoming",
            SimCall::Resume => "resume",
            SimCall::Kill => "kill",
            SimCall::CancelTransfer => "cancel_transfer",
            SimCall::CompleteIncoming => "complete_incoming",
        }
    }

    pub fn parse(name: &str) -> Option<SimCall> {
        SimCall::ALL.into_iter().find(|c| c.as_str() == name)
    }

    /// Its place in [`SimCall::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// `[hypervisor.faults]`: fault injection in the simulated hypervisor, for
/// drills and tests. Call names are those of [`SimCall`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimFaultsConfig {
    /// Calls that fail, changing nothing.
    #[serde(default)]
    pub fail: Vec<String>,
    /// Only the first N calls of each kind in `fail` or `hang` misbehave;
    /// 0 means every one.
    #[serde(default)]
    pub fail_times: u32,
    /// Calls that never answer, changing nothing.
    #[serde(default)]
    pub hang: Vec<String>,
    /// How long `start_incoming` takes; the guest exists from its start.
    #[serde(default)]
    pub start_incoming_latency_ms: u64,
}

fn default_kind() -> String {
    "sim".into()
}
fn default_bandwidth() -> u64 {
    1024
}
fn default_speed() -> f64 {
    1.0
}
fn default_downtime() -> u64 {
    300
}
fn default_memory() -> u64 {
    262_144
}
fn default_vcpus() -> u32 {
    256
}
fn default_qemu_binary() -> String {
    "qemu-system-x86_64".into()
}
fn default_accel() -> String {
    "auto".into()
}
fn default_machine() -> String {
    "pc".into()
}
fn default_true() -> bool {
    true
}

impl Default for HypervisorConfig {
    fn default() -> Self {
        HypervisorConfig {
            kind: default_kind(),
            bandwidth_mib_s: default_bandwidth(),
            speed: default_speed(),
            downtime_limit_ms: default_downtime(),
            memory_mib: default_memory(),
            vcpus: default_vcpus(),
            binary: default_qemu_binary(),
            accel: default_accel(),
            machine: default_machine(),
            migration_address: None,
            auto_converge: true,
            multifd_channels: 0,
            kernel_dir: None,
            storage: BTreeMap::new(),
            networks: BTreeMap::new(),
            run_as: None,
            faults: SimFaultsConfig::default(),
        }
    }
}

impl AgentConfig {
    /// Read and check an agent config; the inventory path is resolved
    /// against the config file's folder.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let mut config = AgentConfig::parse(path, &read(path)?)?;
        if config.inventory.is_relative() {
            let dir = path.parent().unwrap_or(Path::new("."));
            config.inventory = dir.join(&config.inventory);
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        if config.state_dir.is_relative() {
            config.state_dir = dir.join(&config.state_dir);
        }
        let h = &mut config.hypervisor;
        for folder in h.kernel_dir.iter_mut().chain(h.storage.values_mut()) {
            if folder.is_relative() {
                *folder = dir.join(&*folder);
            }
        }
        if let Some(tls) = &mut config.tls {
            for file in [&mut tls.ca, &mut tls.cert, &mut tls.key] {
                if file.is_relative() {
                    *file = dir.join(&*file);
                }
            }
        }
        // A hook's program given as a relative path with a folder in it
        // ("hooks/x.sh") is relative to this file, like every other path here.
        for table in config.features.values_mut() {
            if let Some(toml::Value::Array(command)) = table.get_mut("command")
                && let Some(toml::Value::String(program)) = command.first_mut()
                && program.contains('/')
                && Path::new(program.as_str()).is_relative()
            {
                *program = dir.join(program.as_str()).display().to_string();
            }
        }
        Ok(config)
    }

    pub fn parse(path: &Path, text: &str) -> Result<AgentConfig, ConfigError> {
        let config: AgentConfig = parse(path, text)?;
        if config.name.trim().is_empty() {
            return Err(invalid(path, "name is empty"));
        }
        check_name(path, "name", &config.name)?;
        if config.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                path,
                format!("listen = {:?} is not an address:port", config.listen),
            ));
        }
        if let Some(metrics) = &config.metrics_listen
            && metrics.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(invalid(
                path,
                format!("metrics_listen = {metrics:?} is not an address:port"),
            ));
        }
        let listen: std::net::SocketAddr = config.listen.parse().expect("checked above");
        if config.tls.is_none() && !config.insecure && !listen.ip().is_loopback() {
            return Err(invalid(
                path,
                format!(
                    "listen = {:?} is not loopback and there is no [tls]: anyone who reaches \
                     the port could do anything. Give the agent an identity \
                     (tern ca issue --role agent {}) in [tls], or set insecure = true",
                    config.listen, config.name
                ),
            ));
        }
        if config.heartbeat_interval_ms == 0 {
            return Err(invalid(
                path,
                "heartbeat_interval_ms must be greater than 0",
            ));
        }
        if config.peer_timeout_ms <= config.heartbeat_interval_ms {
            return Err(invalid(
                path,
                format!(
                    "peer_timeout_ms ({}) must be greater than heartbeat_interval_ms ({})",
                    config.peer_timeout_ms, config.heartbeat_interval_ms
                ),
            ));
        }
        // The agent adds these to the clock and doubles some: an absurd value
        // would overflow at run time instead of being refused here.
        for (key, value) in [
            ("heartbeat_interval_ms", config.heartbeat_interval_ms),
            ("peer_timeout_ms", config.peer_timeout_ms),
            ("stall_timeout_ms", config.stall_timeout_ms),
            ("rollback_retry_ms", config.rollback_retry_ms),
            ("stage_timeout_ms", config.stage_timeout_ms),
            ("guest_op_timeout_ms", config.guest_op_timeout_ms),
            (
                "incoming_start_timeout_ms",
                config.incoming_start_timeout_ms,
            ),
            (
                "incoming_complete_timeout_ms",
                config.incoming_complete_timeout_ms,
            ),
            ("stop_grace_ms", config.stop_grace_ms),
        ] {
            if value == 0 && key != "rollback_retry_ms" && key != "stall_timeout_ms" {
                return Err(invalid(path, format!("{key} must be greater than 0")));
            }
            if value > MAX_TIMER_MS {
                return Err(invalid(
                    path,
                    format!("{key} = {value}: must be at most {MAX_TIMER_MS} (one day)"),
                ));
            }
        }
        for (key, value, max) in [
            ("retain_closed", config.retain_closed, MAX_RETAIN_CLOSED),
            ("retain_days", config.retain_days, MAX_RETAIN_DAYS),
            ("retain_audit", config.retain_audit, MAX_RETAIN_CLOSED * 10),
        ] {
            if !(1..=max).contains(&value) {
                return Err(invalid(
                    path,
                    format!("{key} = {value}: must be between 1 and {max}"),
                ));
            }
        }
        // At least 2: tracing-appender prunes to one file fewer than it
        // keeps before it opens today's, so with 1 an agent restarted
        // during the day would delete the day's lines so far.
        if !(2..=MAX_LOG_FILES).contains(&config.log_files) {
            return Err(invalid(
                path,
                format!(
                    "log_files = {}: must be between 2 and {MAX_LOG_FILES}",
                    config.log_files
                ),
            ));
        }
        if !(1..=MAX_WATCHERS).contains(&config.max_watchers) {
            return Err(invalid(
                path,
                format!(
                    "max_watchers = {}: must be between 1 and {MAX_WATCHERS}",
                    config.max_watchers
                ),
            ));
        }
        for (key, value) in [
            ("max_outgoing", config.max_outgoing),
            ("max_incoming", config.max_incoming),
        ] {
            if !(1..=MAX_LIMIT).contains(&value) {
                return Err(invalid(
                    path,
                    format!("{key} = {value}: must be between 1 and {MAX_LIMIT}"),
                ));
            }
        }
        match config.hypervisor.kind.as_str() {
            "sim" => check_sim_faults(path, &config.hypervisor.faults)?,
            "qemu" => check_qemu(path, &config)?,
            other => {
                return Err(invalid(
                    path,
                    format!("[hypervisor] kind = {other:?}: expected \"sim\" or \"qemu\""),
                ));
            }
        }
        if config.hypervisor.bandwidth_mib_s == 0 {
            return Err(invalid(
                path,
                "[hypervisor] bandwidth_mib_s must be greater than 0",
            ));
        }
        if !(MIN_SPEED..=MAX_SPEED).contains(&config.hypervisor.speed) {
            return Err(invalid(
                path,
                format!(
                    "[hypervisor] speed = {}: must be between {MIN_SPEED} and {MAX_SPEED}",
                    config.hypervisor.speed
                ),
            ));
        }
        if config.hypervisor.memory_mib > MAX_MEMORY_MIB || config.hypervisor.vcpus > MAX_VCPUS {
            return Err(invalid(
                path,
                format!("[hypervisor] offers at most {MAX_MEMORY_MIB} MiB and {MAX_VCPUS} vCPUs"),
            ));
        }
        for name in config.features.keys() {
            check_name(path, "[features.NAME]", name)?;
        }
        // Driver settings are checked now, so a typo stops the agent before
        // it creates anything.
        crate::features::FeatureRegistry::from_config(&config.name, &config.features)
            .map_err(|e| invalid(path, e))?;
        let allowed = MachineAllowList::from_config(&config);
        let mut names = HashSet::new();
        for vm in &config.vm {
            check_vm(path, vm, &config.features)?;
            if let Some(machine) = &vm.qemu {
                let checked = match config.hypervisor.kind.as_str() {
                    "qemu" => allowed.check(machine),
                    _ => machine.check(),
                };
                checked.map_err(|e| invalid(path, format!("[[vm]] {}: {e}", vm.name)))?;
                if config.hypervisor.kind == "qemu" && !machine.nics.is_empty() {
                    check_plugged(path, vm, &config.features)?;
                }
            }
            if !names.insert(vm.name.as_str()) {
                return Err(invalid(
                    path,
                    format!("[[vm]] {} is defined twice", vm.name),
                ));
            }
        }
        Ok(config)
    }

    pub fn timing(&self) -> Timing {
        Timing {
            heartbeat_interval_ms: self.heartbeat_interval_ms,
            peer_timeout_ms: self.peer_timeout_ms,
            stall_timeout_ms: self.stall_timeout_ms,
            ..Timing::default()
        }
    }
}

/// `[hypervisor.faults]` of the sim backend: every call named must be one
/// the simulated hypervisor knows, and fail or hang, not both.
fn check_sim_faults(path: &Path, faults: &SimFaultsConfig) -> Result<(), ConfigError> {
    let known = || {
        SimCall::ALL
            .iter()
            .map(|c| c.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (key, names) in [("fail", &faults.fail), ("hang", &faults.hang)] {
        if let Some(unknown) = names.iter().find(|n| SimCall::parse(n).is_none()) {
            return Err(invalid(
                path,
                format!(
                    "[hypervisor.faults] {key}: unknown call {unknown:?}; known calls: {}",
                    known()
                ),
            ));
        }
    }
    if let Some(both) = faults.fail.iter().find(|n| faults.hang.contains(n)) {
        return Err(invalid(
            path,
            format!(
                "[hypervisor.faults] {both:?} is in both fail and hang: a call either fails or never answers"
            ),
        ));
    }
    if faults.start_incoming_latency_ms > MAX_TIMER_MS {
        return Err(invalid(
            path,
            format!(
                "[hypervisor.faults] start_incoming_latency_ms = {}: must be at most {MAX_TIMER_MS} (one day)",
                faults.start_incoming_latency_ms
            ),
        ));
    }
    Ok(())
}

/// The qemu backend's settings, checked before the agent starts anything.
fn check_qemu(path: &Path, config: &AgentConfig) -> Result<(), ConfigError> {
    let h = &config.hypervisor;
    if h.faults != SimFaultsConfig::default() {
        return Err(invalid(
            path,
            "[hypervisor.faults] is fault injection of the simulated hypervisor: remove it, or set kind = \"sim\"",
        ));
    }
    if !["auto", "kvm", "tcg"].contains(&h.accel.as_str()) {
        return Err(invalid(
            path,
            format!(
                "[hypervisor] accel = {:?}: expected \"auto\", \"kvm\" or \"tcg\"",
                h.accel
            ),
        ));
    }
    if h.binary.trim().is_empty() || h.machine.trim().is_empty() {
        return Err(invalid(
            path,
            "[hypervisor] binary and machine must not be empty",
        ));
    }
    if h.multifd_channels > 255 {
        return Err(invalid(
            path,
            format!(
                "[hypervisor] multifd_channels = {}: must be at most 255",
                h.multifd_channels
            ),
        ));
    }
    if h.downtime_limit_ms > 2_000_000 {
        return Err(invalid(
            path,
            "[hypervisor] downtime_limit_ms must be at most 2000000 (QEMU's limit)",
        ));
    }
    check_allow_lists(path, h)?;
    match &h.migration_address {
        Some(address) => {
            if address.parse::<std::net::IpAddr>().is_err() {
                return Err(invalid(
                    path,
                    format!("[hypervisor] migration_address = {address:?} is not an IP address"),
                ));
            }
        }
        None => {
            // `listen` was checked to be an address:port already.
            let ip = config
                .listen
                .parse::<std::net::SocketAddr>()
                .map(|a| a.ip())
                .map_err(|_| invalid(path, "listen is not an address:port"))?;
            if ip.is_unspecified() {
                return Err(invalid(
                    path,
                    format!(
                        "listen = {:?} does not say which address sources reach this host's \
                         migrations on: set [hypervisor] migration_address",
                        config.listen
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// `kernel_dir`, `[hypervisor.storage]`, `[hypervisor.networks]` and
/// `run_as`: names a machine can use, and folders, bridges and a user this
/// host's QEMU is given.
fn check_allow_lists(path: &Path, h: &HypervisorConfig) -> Result<(), ConfigError> {
    let plain = |name: &str| {
        !name.is_empty()
            && name.len() <= MAX_NAME
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    };
    for (table, names) in [
        ("storage", h.storage.keys().collect::<Vec<_>>()),
        ("networks", h.networks.keys().collect()),
    ] {
        if let Some(bad) = names.into_iter().find(|n| !plain(n)) {
            return Err(invalid(
                path,
                format!(
                    "[hypervisor.{table}] {bad:?}: a name is 1 to {MAX_NAME} letters, digits, '.', '_' or '-'"
                ),
            ));
        }
    }
    for (name, bridge) in &h.networks {
        // IFNAMSIZ - 1; `ip` and the kernel read nothing else in a name.
        let ok = !bridge.is_empty()
            && bridge.len() <= 15
            && !bridge.contains(['/', ':'])
            && !bridge.chars().any(|c| c.is_whitespace() || c.is_control());
        if !ok {
            return Err(invalid(
                path,
                format!("[hypervisor.networks] {name} = {bridge:?} is not a Linux bridge's name"),
            ));
        }
    }
    if let Some(user) = &h.run_as {
        let ok = !user.is_empty()
            && !user.starts_with('-')
            && user
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !ok {
            return Err(invalid(
                path,
                format!("[hypervisor] run_as = {user:?} is not a user name"),
            ));
        }
    }
    Ok(())
}

/// What a qemu host lets a guest's machine use, from its `[hypervisor]`:
/// the kernels of `kernel_dir`, the storage and the networks it names. The
/// source checks its own `[[vm]]`s against it when its config loads, a
/// destination every C1 in Prepare before anything starts; a machine that
/// names anything else is refused naming the field.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MachineAllowList {
    /// This host's name, for the refusals.
    pub host: String,
    pub kernel_dir: Option<PathBuf>,
    pub storage: BTreeMap<String, PathBuf>,
    pub networks: BTreeMap<String, String>,
}

impl MachineAllowList {
    pub fn from_config(config: &AgentConfig) -> MachineAllowList {
        let h = &config.hypervisor;
        MachineAllowList {
            host: config.name.clone(),
            kernel_dir: h.kernel_dir.clone(),
            storage: h.storage.clone(),
            networks: h.networks.clone(),
        }
    }

    /// The machine's shape and the names it uses. Whether the kernel exists
    /// and where a disk's path leads once symlinks are followed is read from
    /// the disk, by the qemu hypervisor (`hypervisor::qemu::machine`).
    pub fn check(&self, machine: &QemuMachine) -> Result<(), MachineError> {
        machine.check()?;
        let host = &self.host;
        if !machine.kernel.is_empty() && self.kernel_dir.is_none() {
            return Err(MachineError::new(
                "qemu.kernel",
                &machine.kernel,
                format!("cannot be booted on {host}: it has no [hypervisor] kernel_dir"),
            ));
        }
        for (i, disk) in machine.disks.iter().enumerate() {
            if !self.storage.contains_key(&disk.storage) {
                return Err(MachineError::new(
                    format!("qemu.disks[{i}].storage"),
                    &disk.storage,
                    format!("is not a storage of {host} ({})", has(self.storage.keys())),
                ));
            }
        }
        for (i, nic) in machine.nics.iter().enumerate() {
            if !self.networks.contains_key(&nic.network) {
                return Err(MachineError::new(
                    format!("qemu.nics[{i}].network"),
                    &nic.network,
                    format!("is not a network of {host} ({})", has(self.networks.keys())),
                ));
            }
        }
        Ok(())
    }
}

/// "it has: a, b", or "it has none".
fn has<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let names: Vec<&str> = names.map(String::as_str).collect();
    if names.is_empty() {
        "it has none".into()
    } else {
        format!("it has: {}", names.join(", "))
    }
}

impl AgentConfig {
    /// The address incoming QEMU migrations listen on.
    pub fn migration_address(&self) -> String {
        match &self.hypervisor.migration_address {
            Some(address) => address.clone(),
            None => self
                .listen
                .parse::<std::net::SocketAddr>()
                .map(|a| a.ip().to_string())
                .unwrap_or_else(|_| "127.0.0.1".into()),
        }
    }
}

/// A QEMU guest's NICs are taps on no bridge until a `bridge` feature
/// plugs them: a VM with NICs and no such feature would boot, and move,
/// without a network.
fn check_plugged(
    path: &Path,
    vm: &VmSpec,
    features: &BTreeMap<String, toml::Table>,
) -> Result<(), ConfigError> {
    let driver_of = |name: &str| {
        features
            .get(name)
            .and_then(|t| t.get("driver"))
            .and_then(|d| d.as_str())
            .unwrap_or(name)
            .to_string()
    };
    if vm
        .features
        .iter()
        .any(|f| driver_of(&f.name) == crate::features::bridge::DRIVER)
    {
        return Ok(());
    }
    Err(invalid(
        path,
        format!(
            "[[vm]] {}: qemu.nics needs a feature with driver = \"bridge\" to put its taps on \
             their networks' bridges (e.g. [features.net] driver = \"bridge\", and \
             features = [{{ name = \"net\", required = true }}])",
            vm.name
        ),
    ))
}

fn check_vm(
    path: &Path,
    vm: &VmSpec,
    features: &BTreeMap<String, toml::Table>,
) -> Result<(), ConfigError> {
    if vm.name.trim().is_empty() {
        return Err(invalid(path, "a [[vm]] has an empty name"));
    }
    check_name(path, "[[vm]] name", &vm.name)?;
    // Zero is refused; capacity is summed over guests: an absurd size
    // would overflow.
    bounds::check_guest_size(&format!("[[vm]] {}", vm.name), vm.memory_mib, vm.vcpus)
        .map_err(|e| invalid(path, e.to_string()))?;
    bounds::check_count(
        &format!("[[vm]] {}: features", vm.name),
        vm.features.len(),
        bounds::MAX_FEATURES,
    )
    .map_err(|e| invalid(path, e.to_string()))?;
    let mut seen = HashSet::new();
    for feature in &vm.features {
        check_name(
            path,
            &format!("[[vm]] {}: feature name", vm.name),
            &feature.name,
        )?;
        if !feature.driver.is_empty() {
            check_name(
                path,
                &format!("[[vm]] {}: feature driver", vm.name),
                &feature.driver,
            )?;
        }
        check_feature_ref(path, vm, feature, features)?;
        if !seen.insert(feature.name.as_str()) {
            return Err(invalid(
                path,
                format!(
                    "[[vm]] {}: feature {} is listed twice",
                    vm.name, feature.name
                ),
            ));
        }
    }
    Ok(())
}

/// The name rule ([`bounds::check_name`]) for a name in `path`.
fn check_name(path: &Path, field: &str, value: &str) -> Result<(), ConfigError> {
    bounds::check_name(field, value).map_err(|e| invalid(path, e.to_string()))
}

fn check_feature_ref(
    path: &Path,
    vm: &VmSpec,
    feature: &FeatureSpec,
    features: &BTreeMap<String, toml::Table>,
) -> Result<(), ConfigError> {
    if !features.contains_key(&feature.name) {
        return Err(invalid(
            path,
            format!(
                "[[vm]] {} needs feature {:?}, but this host has no [features.{}] section",
                vm.name, feature.name, feature.name
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const QEMU_AGENT: &str = "name = \"hv-a\"\nlisten = \"10.0.0.1:7701\"\ninsecure = true\n\
        state_dir = \"s\"\ninventory = \"cluster.toml\"\n[hypervisor]\nkind = \"qemu\"\n";

    fn inventory(text: &str) -> Result<Inventory, String> {
        Inventory::parse(Path::new("cluster.toml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn a_hosts_migration_address_defaults_to_the_host_of_its_address() {
        let inv = inventory(
            "[[host]]\nname = \"hv-a\"\naddress = \"https://HV-A.example:7701\"\n\
             [[host]]\nname = \"hv-b\"\naddress = \"https://10.0.0.2:7701\"\n\
             migration_address = \"10.9.0.2\"\n\
             [[host]]\nname = \"hv-c\"\naddress = \"http://[::1]:7703\"\n\
             [[host]]\nname = \"hv-d\"\naddress = \"https://hv-d:7704\"\n\
             migration_address = \"[fd00::0:4]\"\n",
        )
        .unwrap();
        let hosts: Vec<String> = inv
            .host
            .iter()
            .map(|h| h.migration_host().unwrap())
            .collect();
        assert_eq!(hosts, ["hv-a.example", "10.9.0.2", "::1", "fd00::4"]);
    }

    #[test]
    fn a_migration_address_that_is_not_an_ip_address_is_refused() {
        let host = "[[host]]\nname = \"hv-b\"\naddress = \"https://10.0.0.2:7701\"\n";
        for bad in ["hv-b", "10.0.0.2:4444", "[10.0.0.2]", "", "tcp:10.0.0.2:1"] {
            let err = inventory(&format!("{host}migration_address = {bad:?}\n")).unwrap_err();
            assert!(
                err.contains(&format!(
                    "host hv-b: migration_address = {bad:?} is not an IP address"
                )),
                "{bad:?}: {err}"
            );
        }
        let err =
            inventory("[[host]]\nname = \"hv-b\"\naddress = \"https://:7701\"\n").unwrap_err();
        assert!(
            err.contains("host hv-b: address \"https://:7701\" is not a URL"),
            "{err}"
        );
    }

    #[test]
    fn a_network_listen_needs_tls_or_says_insecure() {
        let plain = "name = \"hv-a\"\nlisten = \"10.0.0.1:7701\"\nstate_dir = \"s\"\ninventory = \"c.toml\"\n";
        let err = parse(plain).unwrap_err();
        assert!(
            err.contains("is not loopback and there is no [tls]"),
            "{err}"
        );
        assert!(err.contains("tern ca issue --role agent hv-a"), "{err}");
        assert!(parse(&plain.replace("10.0.0.1", "127.0.0.1")).is_ok());
        assert!(parse(&plain.replace("10.0.0.1", "[::1]")).is_ok());
        assert!(
            parse(&format!("{plain}insecure = true\n"))
                .unwrap()
                .insecure
        );
        let tls = parse(&format!(
            "{plain}[tls]\nca = \"id/ca.pem\"\ncert = \"id/cert.pem\"\nkey = \"id/key.pem\"\n"
        ))
        .unwrap();
        assert_eq!(tls.tls.unwrap().cert, PathBuf::from("id/cert.pem"));
        let missing = parse(&format!("{plain}[tls]\nca = \"id/ca.pem\"\n")).unwrap_err();
        assert!(missing.contains("missing field `cert`"), "{missing}");
    }

    #[test]
    fn tls_paths_are_relative_to_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hv-a.toml");
        std::fs::write(
            &file,
            "name = \"hv-a\"\nlisten = \"10.0.0.1:7701\"\nstate_dir = \"s\"\ninventory = \"c.toml\"\n\
             [tls]\nca = \"id/ca.pem\"\ncert = \"/etc/tern/cert.pem\"\nkey = \"id/key.pem\"\n",
        )
        .unwrap();
        let tls = AgentConfig::load(&file).unwrap().tls.unwrap();
        assert_eq!(tls.ca, dir.path().join("id/ca.pem"));
        assert_eq!(tls.cert, PathBuf::from("/etc/tern/cert.pem"));
        assert_eq!(tls.key, dir.path().join("id/key.pem"));
    }

    fn parse(text: &str) -> Result<AgentConfig, String> {
        AgentConfig::parse(Path::new("hv-a.toml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn every_example_config_loads() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        for file in [
            "hv-a.toml",
            "hv-b.toml",
            "qemu/qemu-a.toml",
            "qemu/qemu-b.toml",
        ] {
            let path = root.join(file);
            let config = AgentConfig::load(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
            Inventory::load(&config.inventory).unwrap_or_else(|e| panic!("{file}: {e}"));
        }
        let qemu = AgentConfig::load(&root.join("qemu/qemu-a.toml")).unwrap();
        assert_eq!(qemu.hypervisor.kind, "qemu");
        let guest = qemu.vm[0]
            .qemu
            .as_ref()
            .expect("the example VM boots a kernel");
        assert_eq!(
            (guest.kernel.as_str(), guest.append.as_str()),
            ("tern-guest.elf", "ws=32")
        );
    }

    #[test]
    fn qemu_defaults_and_migration_address() {
        let config = parse(QEMU_AGENT).unwrap();
        let h = &config.hypervisor;
        assert_eq!(
            (h.binary.as_str(), h.accel.as_str(), h.machine.as_str()),
            ("qemu-system-x86_64", "auto", "pc")
        );
        assert!(h.auto_converge);
        assert_eq!(h.multifd_channels, 0);
        // Incoming migrations listen where the agent does, unless told.
        assert_eq!(config.migration_address(), "10.0.0.1");
        let config = parse(&format!("{QEMU_AGENT}migration_address = \"10.9.0.1\"\n")).unwrap();
        assert_eq!(config.migration_address(), "10.9.0.1");
    }

    #[test]
    fn bad_qemu_settings_are_refused_by_name() {
        let cases = [
            ("accel = \"xen\"\n", "accel = \"xen\": expected"),
            (
                "migration_address = \"hv-b\"\n",
                "migration_address = \"hv-b\" is not an IP",
            ),
            (
                "multifd_channels = 300\n",
                "multifd_channels = 300: must be at most 255",
            ),
            ("binary = \"\"\n", "binary and machine must not be empty"),
        ];
        for (setting, expected) in cases {
            let err = parse(&format!("{QEMU_AGENT}{setting}")).unwrap_err();
            assert!(err.starts_with("hv-a.toml is not valid: "), "{err}");
            assert!(err.contains(expected), "{setting}: {err}");
        }
        // Listening on every address does not say where sources connect.
        let err = parse(&QEMU_AGENT.replace("10.0.0.1:7701", "0.0.0.0:7701")).unwrap_err();
        assert!(err.contains("set [hypervisor] migration_address"), "{err}");
    }

    #[test]
    fn migration_limits_default_to_two_and_refuse_zero() {
        let sim = QEMU_AGENT.replace("kind = \"qemu\"", "kind = \"sim\"");
        let config = parse(&sim).unwrap();
        assert_eq!((config.max_outgoing, config.max_incoming), (2, 2));
        let top = sim.replace(
            "[hypervisor]",
            "max_outgoing = 5\nmax_incoming = 1\n[hypervisor]",
        );
        let config = parse(&top).unwrap();
        assert_eq!((config.max_outgoing, config.max_incoming), (5, 1));
        for (key, value) in [
            ("max_outgoing", 0),
            ("max_incoming", 0),
            ("max_incoming", 1000),
        ] {
            let text = sim.replace("[hypervisor]", &format!("{key} = {value}\n[hypervisor]"));
            let err = parse(&text).unwrap_err();
            assert!(
                err.contains(&format!("{key} = {value}: must be between 1 and 256")),
                "{err}"
            );
        }
    }

    #[test]
    fn the_agents_log_keeps_seven_daily_files_unless_told_and_never_fewer_than_two() {
        let sim = QEMU_AGENT.replace("kind = \"qemu\"", "kind = \"sim\"");
        assert_eq!(parse(&sim).unwrap().log_files, 7);
        let text = sim.replace("[hypervisor]", "log_files = 30\n[hypervisor]");
        assert_eq!(parse(&text).unwrap().log_files, 30);
        for value in [0, 1, 3651] {
            let text = sim.replace(
                "[hypervisor]",
                &format!("log_files = {value}\n[hypervisor]"),
            );
            let err = parse(&text).unwrap_err();
            assert!(
                err.contains(&format!("log_files = {value}: must be between 2 and 3650")),
                "{err}"
            );
        }
    }

    #[test]
    fn sim_faults_are_read_from_the_hypervisor_faults_table() {
        let sim = QEMU_AGENT.replace("kind = \"qemu\"", "kind = \"sim\"");
        let config = parse(&sim).unwrap();
        assert_eq!(config.hypervisor.faults, SimFaultsConfig::default());
        let text = format!(
            "{sim}[hypervisor.faults]\nfail = [\"resume\", \"kill\"]\nfail_times = 2\n\
             hang = [\"complete_incoming\"]\nstart_incoming_latency_ms = 4500\n"
        );
        let faults = parse(&text).unwrap().hypervisor.faults;
        assert_eq!(
            faults,
            SimFaultsConfig {
                fail: vec!["resume".into(), "kill".into()],
                fail_times: 2,
                hang: vec!["complete_incoming".into()],
                start_incoming_latency_ms: 4500,
            }
        );
    }

    #[test]
    fn unknown_sim_fault_calls_are_refused_naming_the_key_and_the_known_calls() {
        let sim = QEMU_AGENT.replace("kind = \"qemu\"", "kind = \"sim\"");
        let known = "known calls: start_incoming, resume, kill, cancel_transfer, complete_incoming";
        for (setting, expected) in [
            (
                "fail = [\"resume\", \"reboot\"]",
                "[hypervisor.faults] fail: unknown call \"reboot\"",
            ),
            (
                "hang = [\"Resume\"]",
                "[hypervisor.faults] hang: unknown call \"Resume\"",
            ),
        ] {
            let err = parse(&format!("{sim}[hypervisor.faults]\n{setting}\n")).unwrap_err();
            assert!(err.starts_with("hv-a.toml is not valid: "), "{err}");
            assert!(err.contains(expected), "{setting}: {err}");
            assert!(err.contains(known), "{setting}: {err}");
        }
        let cases = [
            (
                "fail = [\"kill\"]\nhang = [\"kill\"]",
                "\"kill\" is in both fail and hang",
            ),
            (
                "start_incoming_latency_ms = 86400001",
                "start_incoming_latency_ms = 86400001: must be at most 86400000",
            ),
            ("fail_rate = 0.5", "unknown field `fail_rate`"),
        ];
        for (setting, expected) in cases {
            let err = parse(&format!("{sim}[hypervisor.faults]\n{setting}\n")).unwrap_err();
            assert!(err.contains(expected), "{setting}: {err}");
        }
        // The real hypervisor cannot be told to misbehave.
        let err = parse(&format!(
            "{QEMU_AGENT}[hypervisor.faults]\nfail = [\"resume\"]\n"
        ))
        .unwrap_err();
        assert!(
            err.contains("[hypervisor.faults] is fault injection of the simulated hypervisor"),
            "{err}"
        );
    }

    /// A qemu host with a kernel folder, two storages and a network.
    const QEMU_HOST: &str = "name = \"hv-b\"\nlisten = \"10.0.0.2:7701\"\ninsecure = true\n\
        state_dir = \"s\"\ninventory = \"cluster.toml\"\n[hypervisor]\nkind = \"qemu\"\n\
        kernel_dir = \"/srv/kernels\"\nrun_as = \"tern-qemu\"\n\
        [hypervisor.storage]\nimages = \"/srv/images\"\niso = \"/srv/iso\"\n\
        [hypervisor.networks]\nlan = \"br0\"\n";

    fn with_vm(host: &str, qemu: &str) -> String {
        format!("{host}[[vm]]\nname = \"web-01\"\nmemory_mib = 64\nvcpus = 1\nqemu = {qemu}\n")
    }

    /// [`with_vm`] whose VM lists feature `net`, the host's bridge driver.
    fn with_plugged_vm(host: &str, qemu: &str) -> String {
        with_vm(
            &format!("{host}[features.net]\ndriver = \"bridge\"\n"),
            qemu,
        )
        .replace(
            "vcpus = 1\n",
            "vcpus = 1\nfeatures = [{ name = \"net\", required = true }]\n",
        )
    }

    #[test]
    fn a_vm_boots_what_its_qemu_table_says() {
        let text = with_plugged_vm(
            QEMU_HOST,
            "{ kernel = \"vmlinuz\", append = \"console=ttyS0\", machine = \"q35\", \
             disks = [{ storage = \"images\", path = \"web-01/root.qcow2\", format = \"qcow2\" }, \
                      { storage = \"iso\", path = \"debian.iso\", readonly = true }], \
             nics = [{ mac = \"52:54:00:12:34:56\", network = \"lan\", vlan = 100 }] }",
        );
        let config = parse(&text).unwrap();
        let h = &config.hypervisor;
        assert_eq!(h.kernel_dir.as_deref(), Some(Path::new("/srv/kernels")));
        assert_eq!(h.storage["iso"], Path::new("/srv/iso"));
        assert_eq!(h.networks["lan"], "br0");
        assert_eq!(h.run_as.as_deref(), Some("tern-qemu"));
        let q = config.vm[0].qemu.clone().unwrap();
        assert_eq!(
            (q.kernel.as_str(), q.append.as_str(), q.machine.as_str()),
            ("vmlinuz", "console=ttyS0", "q35")
        );
        assert_eq!(
            q.disks[0].format,
            crate::protocol::machine::DiskFormat::Qcow2
        );
        // Raw and writable unless said otherwise.
        assert_eq!(q.disks[1].format, crate::protocol::machine::DiskFormat::Raw);
        assert_eq!((q.disks[0].readonly, q.disks[1].readonly), (false, true));
        assert_eq!(
            (q.nics[0].network.as_str(), q.nics[0].vlan),
            ("lan", Some(100))
        );
        let err = parse(&text.replace("append", "apend")).unwrap_err();
        assert!(err.contains("apend"), "{err}");
    }

    #[test]
    fn metrics_listen_is_an_address_or_nothing() {
        let agent = QEMU_AGENT.replace("[hypervisor]\nkind = \"qemu\"\n", "");
        assert_eq!(parse(&agent).unwrap().metrics_listen, None);
        let config = parse(&format!("{agent}metrics_listen = \"127.0.0.1:9701\"\n")).unwrap();
        assert_eq!(config.metrics_listen.as_deref(), Some("127.0.0.1:9701"));
        let err = parse(&format!("{agent}metrics_listen = \"localhost\"\n")).unwrap_err();
        assert!(
            err.contains("metrics_listen = \"localhost\" is not an address:port"),
            "{err}"
        );
    }

    #[test]
    fn a_qemu_vm_with_nics_and_no_bridge_feature_is_refused() {
        let nic = "{ nics = [{ mac = \"52:54:00:12:34:56\", network = \"lan\" }] }";
        let err = parse(&with_vm(QEMU_HOST, nic)).unwrap_err();
        assert!(
            err.contains("[[vm]] web-01: qemu.nics needs a feature with driver = \"bridge\""),
            "{err}"
        );
        parse(&with_plugged_vm(QEMU_HOST, nic)).unwrap();
        // Without NICs nothing is needed.
        parse(&with_vm(QEMU_HOST, "{ kernel = \"vmlinuz\" }")).unwrap();
        // A VSI whose instance is no UUID, a VLAN out of range: by field.
        let bad = "{ nics = [{ mac = \"52:54:00:12:34:56\", network = \"lan\", \
                   vsi = { type_id = 5, instance = \"not-a-uuid\" } }] }";
        let err = parse(&with_plugged_vm(QEMU_HOST, bad)).unwrap_err();
        assert!(
            err.contains("qemu.nics[0].vsi.instance \"not-a-uuid\" is not a UUID"),
            "{err}"
        );
        let bad = "{ nics = [{ mac = \"52:54:00:12:34:56\", network = \"lan\", vlan = 4095 }] }";
        let err = parse(&with_plugged_vm(QEMU_HOST, bad)).unwrap_err();
        assert!(
            err.contains("qemu.nics[0].vlan \"4095\" is not a VLAN id (1 to 4094)"),
            "{err}"
        );
    }

    #[test]
    fn a_vm_naming_what_its_host_lacks_is_refused_by_field() {
        let cases = [
            (
                "{ disks = [{ storage = \"images\", path = \"a.img\" }, { storage = \"scratch\", path = \"b.img\" }] }",
                "[[vm]] web-01: qemu.disks[1].storage \"scratch\" is not a storage of hv-b (it has: images, iso)",
            ),
            (
                "{ nics = [{ mac = \"52:54:00:12:34:56\", network = \"dmz\" }] }",
                "[[vm]] web-01: qemu.nics[0].network \"dmz\" is not a network of hv-b (it has: lan)",
            ),
            (
                "{ kernel = \"../../etc/shadow\" }",
                "[[vm]] web-01: qemu.kernel \"../../etc/shadow\" is a path",
            ),
            (
                "{ disks = [{ storage = \"images\", path = \"/etc/shadow\" }] }",
                "[[vm]] web-01: qemu.disks[0].path \"/etc/shadow\" is absolute",
            ),
            (
                "{ disks = [{ storage = \"images\", path = \"a.img\", format = \"vmdk\" }] }",
                "unknown variant `vmdk`, expected `raw` or `qcow2`",
            ),
            (
                "{ kernel = \"vmlinuz\", args = [\"-drive\", \"file=/dev/sda\"] }",
                "[[vm]] web-01: qemu.args \"-drive file=/dev/sda\" are free QEMU arguments, which no host runs",
            ),
        ];
        for (qemu, expected) in cases {
            let err = parse(&with_vm(QEMU_HOST, qemu)).unwrap_err();
            assert!(err.starts_with("hv-a.toml is not valid: "), "{err}");
            assert!(err.contains(expected), "{qemu}: {err}");
        }
        // A host without a kernel folder boots no kernel.
        let err = parse(&with_vm(QEMU_AGENT, "{ kernel = \"vmlinuz\" }")).unwrap_err();
        assert!(
            err.contains("qemu.kernel \"vmlinuz\" cannot be booted on hv-a: it has no [hypervisor] kernel_dir"),
            "{err}"
        );
        let err = parse(&with_vm(
            QEMU_AGENT,
            "{ disks = [{ storage = \"images\", path = \"a.img\" }] }",
        ))
        .unwrap_err();
        assert!(
            err.contains("is not a storage of hv-a (it has none)"),
            "{err}"
        );
        // A sim host runs no machine, but its shape is still checked.
        let sim = QEMU_AGENT.replace("kind = \"qemu\"", "kind = \"sim\"");
        assert!(parse(&with_vm(&sim, "{ kernel = \"vmlinuz\" }")).is_ok());
        let err = parse(&with_vm(&sim, "{ kernel = \"/boot/vmlinuz\" }")).unwrap_err();
        assert!(
            err.contains("qemu.kernel \"/boot/vmlinuz\" is a path"),
            "{err}"
        );
    }

    #[test]
    fn bad_storage_networks_and_run_as_are_refused_by_name() {
        let cases = [
            (
                "[hypervisor.storage]\n\"my images\" = \"/srv\"\n",
                "[hypervisor.storage] \"my images\": a name is",
            ),
            (
                "[hypervisor.networks]\nlan = \"a-bridge-name-too-long\"\n",
                "[hypervisor.networks] lan = \"a-bridge-name-too-long\" is not a Linux bridge's name",
            ),
            (
                "[hypervisor.networks]\nlan = \"br0 up\"\n",
                "is not a Linux bridge's name",
            ),
        ];
        for (table, expected) in cases {
            let err = parse(&format!("{QEMU_AGENT}{table}")).unwrap_err();
            assert!(err.contains(expected), "{table}: {err}");
        }
        let err = parse(&format!("{QEMU_AGENT}run_as = \"-x\"\n")).unwrap_err();
        assert!(err.contains("run_as = \"-x\" is not a user name"), "{err}");
    }

    #[test]
    fn the_readmes_machine_example_is_a_config_its_host_accepts() {
        let readme = include_str!("../README.md");
        let block = |marker: &str| {
            readme
                .split("```toml\n")
                .skip(1)
                .filter_map(|b| b.split("```").next())
                .find(|b| b.contains(marker))
                .unwrap_or_else(|| panic!("no toml block with {marker} in README.md"))
        };
        let host = block("[hypervisor.storage]").replace("kind = \"qemu\"\n", "");
        let text = format!(
            "{QEMU_AGENT}{}{}",
            host.trim_start_matches("[hypervisor]\n"),
            block("[vm.qemu]")
        );
        let config = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let q = config.vm[0].qemu.as_ref().unwrap();
        assert_eq!((q.disks.len(), q.nics.len()), (2, 1));
    }

    #[test]
    fn kernel_and_storage_folders_are_relative_to_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hv-b.toml");
        let text = QEMU_HOST
            .replace("\"/srv/kernels\"", "\"kernels\"")
            .replace("\"/srv/images\"", "\"images\"");
        std::fs::write(&path, text).unwrap();
        let config = AgentConfig::load(&path).unwrap();
        let h = &config.hypervisor;
        assert_eq!(h.kernel_dir, Some(dir.path().join("kernels")));
        assert_eq!(h.storage["images"], dir.path().join("images"));
        assert_eq!(h.storage["iso"], Path::new("/srv/iso"));
    }

    #[test]
    fn names_and_sizes_outside_the_rules_are_refused_by_key() {
        let sim = "name = \"hv-a\"\nlisten = \"127.0.0.1:7701\"\nstate_dir = \"s\"\n\
                   inventory = \"cluster.toml\"\n";
        let vm = |name: &str, memory: u64, vcpus: u32| {
            format!(
                "{sim}[features.pp]\ndriver = \"port-profile\"\nswitch = \"sim\"\n\
                 [[vm]]\nname = \"{name}\"\nmemory_mib = {memory}\nvcpus = {vcpus}\n\
                 features = [{{ name = \"pp\" }}]\n"
            )
        };
        assert!(parse(&vm("web-01", 256, 2)).is_ok());
        for (text, expected) in [
            (
                vm("web 01", 256, 2),
                "[[vm]] name \"web 01\" must be 1 to 64 characters",
            ),
            (vm("-web", 256, 2), "[[vm]] name \"-web\""),
            (vm("web-01", 0, 2), "[[vm]] web-01.memory_mib is 0"),
            (vm("web-01", 256, 0), "[[vm]] web-01.vcpus is 0"),
            (
                sim.replace("name = \"hv-a\"", "name = \"hv a\""),
                "name \"hv a\" must be",
            ),
            (
                format!("{sim}[features.\"p p\"]\ndriver = \"port-profile\"\n"),
                "[features.NAME] \"p p\" must be",
            ),
        ] {
            let err = parse(&text).unwrap_err();
            assert!(err.starts_with("hv-a.toml is not valid: "), "{err}");
            assert!(err.contains(expected), "expected {expected:?} in {err}");
        }
    }

    #[test]
    fn inventory_host_names_follow_the_name_rule() {
        let path = Path::new("cluster.toml");
        let ok = "[[host]]\nname = \"hv-a\"\naddress = \"http://127.0.0.1:1\"\n";
        assert!(Inventory::parse(path, ok).is_ok());
        let err = Inventory::parse(path, &ok.replace("hv-a", "hv-a\\u001b[31m"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("[[host]] name \"hv-a\\u{1b}[31m\" must be"),
            "{err}"
        );
        assert!(!err.contains('\u{1b}'), "{err}");
    }
}
