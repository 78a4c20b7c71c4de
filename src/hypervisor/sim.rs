//! The simulated hypervisor: Tern's embedded default for the demo and the
//! tests. It owns the guests of one simulated host, their persisted state in
//! `state_dir/sim-guests.json`, and a pre-copy transfer model that runs in
//! simulated time.
//!
//! The guests are kept on disk so that they outlive an agent crash the way
//! QEMU processes outlive their management daemon: a restarted agent finds
//! its paused or incoming guests where it left them. One `SimHypervisor` owns
//! a state directory at a time.
//!
//! # The transfer model
//!
//! Pre-copy as QEMU does it, on a link that is always saturated:
//!
//! - iteration 1 sends all memory; every later iteration sends what the guest
//!   dirtied during the previous one (at most all of its memory);
//! - an iteration whose bytes fit in the downtime limit at link speed is the
//!   stop-and-copy: the guest is paused first, and its duration is the
//!   downtime;
//! - a guest that dirties memory as fast as the link carries it never
//!   converges; its iteration [`MAX_ITERATIONS`] is a stop-and-copy whatever
//!   its size, standing in for QEMU's auto-converge throttling. Its downtime
//!   then exceeds the limit, as it would on a real host.
//!
//! Simulated time runs `speed` times faster than real time and advances in
//! ticks of at most [`TICK`] of real time; progress is reported after every
//! tick. In [`TransferStats`]:
//!
//! - `bytes_remaining` is what is still to send now: the rest of this
//!   iteration plus what the guest dirtied during it so far (at most its
//!   memory);
//! - `bytes_total` is `bytes_transferred + bytes_remaining`: memory plus every
//!   page dirtied since, so it grows while pages are re-sent;
//! - `dirty_rate_bytes_s` is zero during the stop-and-copy, the guest being
//!   paused;
//! - `expected_downtime_ms` is `bytes_remaining` at link speed, except in the
//!   final stats, where it is the downtime the stop-and-copy took;
//! - `elapsed_ms` is simulated time.
//!
//! # Fault injection
//!
//! `[hypervisor.faults]` in the agent config ([`SimFaults`]) makes chosen
//! calls ([`SimCall`]) fail with an error ending in "(injected fault)", or
//! never answer, in both cases without changing anything; `fail_times`
//! limits that to the first calls of each kind. `start_incoming` can also be
//! made slow, as a QEMU that takes seconds to start. The counts are kept in
//! memory: a restarted agent starts them again.

use std::collections::{BTreeMap, HashMap};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc};

use super::{Guest, GuestState, HostCapacity, Hypervisor, HypervisorError, TransferPlan};
use crate::config::{HypervisorConfig, SimCall};
use crate::protocol::machine::MachineError;
use crate::protocol::{TransferStage, TransferStats, VmSpec};

const MIB: u64 = 1024 * 1024;

/// Name of the guest state file inside the state directory.
pub const STATE_FILE: &str = "sim-guests.json";

/// The iteration that is forced to be the stop-and-copy when a guest never
/// converges.
pub const MAX_ITERATIONS: u32 = 30;

/// The longest real-time step of a transfer: bounds how stale progress gets.
/// Cancellation does not wait for it.
pub const TICK: Duration = Duration::from_millis(50);

const ADDRESS_SCHEME: &str = "sim://";

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimSettings {
    pub bandwidth_mib_s: u64,
    /// How many times faster than real time a transfer runs.
    pub speed: f64,
    pub downtime_limit_ms: u64,
    pub capacity: HostCapacity,
    pub faults: SimFaults,
}

impl SimSettings {
    /// Settings from a checked config: fault names config validation did not
    /// let through cannot reach here.
    pub fn from_config(config: &HypervisorConfig) -> Self {
        let calls = |names: &[String]| {
            names
                .iter()
                .filter_map(|n| SimCall::parse(n))
                .fold(SimCalls::default(), SimCalls::with)
        };
        SimSettings {
            bandwidth_mib_s: config.bandwidth_mib_s,
            speed: config.speed,
            downtime_limit_ms: config.downtime_limit_ms,
            capacity: HostCapacity {
                memory_mib: config.memory_mib,
                vcpus: config.vcpus,
            },
            faults: SimFaults {
                fail: calls(&config.faults.fail),
                hang: calls(&config.faults.hang),
                fail_times: config.faults.fail_times,
                start_incoming_latency_ms: config.faults.start_incoming_latency_ms,
            },
        }
    }
}

/// A set of [`SimCall`]s.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimCalls(u8);

impl SimCalls {
    pub fn with(self, call: SimCall) -> SimCalls {
        SimCalls(self.0 | 1 << call.index())
    }

    pub fn contains(self, call: SimCall) -> bool {
        self.0 & 1 << call.index() != 0
    }
}

/// What the simulated host does wrong on purpose (`[hypervisor.faults]`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimFaults {
    /// Calls that fail and change nothing.
    pub fail: SimCalls,
    /// Calls that never answer and change nothing: their future stays
    /// pending until the caller drops it.
    pub hang: SimCalls,
    /// Only the first N calls of each kind in `fail` or `hang` misbehave;
    /// 0 means every one.
    pub fail_times: u32,
    /// How long `start_incoming` takes; the guest exists from its start.
    pub start_incoming_latency_ms: u64,
}

pub struct SimHypervisor {
    /// The host this hypervisor runs on: its incoming addresses name it
    /// (`sim://HOST/ATTEMPT/VM`), as a QEMU's name its IP address.
    host: String,
    settings: SimSettings,
    /// `None` for an in-memory hypervisor.
    state_file: Option<PathBuf>,
    inner: Mutex<Inner>,
}

struct Inner {
    guests: BTreeMap<String, Guest>,
    /// Each incoming guest's address, for its link.
    incoming: HashMap<String, String>,
    /// Guests whose last post-copy-enabled transfer completed.
    completed: std::collections::HashSet<String>,
    /// The transfer running for each VM, to cancel it.
    transfers: HashMap<String, Arc<TransferControl>>,
    /// Calls of each [`SimCall`] kind that fault injection has seen.
    calls: [u32; SimCall::ALL.len()],
}

#[derive(Default)]
struct TransferControl {
    /// The truth; `wake` only cuts the current tick short.
    cancelled: AtomicBool,
    wake: Notify,
    /// Post-copy was enabled for this transfer.
    postcopy_allowed: bool,
    /// `start_postcopy` asked for the switch.
    switch_requested: AtomicBool,
    /// The transfer switched: the guest is stopped here and the rest of its
    /// memory goes to the destination, which runs it.
    switched: AtomicBool,
    switched_notify: Notify,
}

/// The simulated migration link between two sim hypervisors on one
/// machine (the demo's agents, the tests'): a file per transfer that the
/// source writes its progress into and the destination reads, as a real
/// destination learns from its incoming stream that the switchover came.
mod link {
    use std::path::PathBuf;

    pub const PRECOPY: &str = "precopy";
    pub const POSTCOPY: &str = "postcopy";
    pub const COMPLETED: &str = "completed";
    /// Completed after a switchover.
    pub const COMPLETED_SWITCHED: &str = "completed after the switchover";
    pub const FAILED: &str = "failed";

    /// The file of the transfer to `address` (`sim://HOST/ATTEMPT/VM`;
    /// names are checked, so they make a safe file name).
    pub fn path(address: &str) -> PathBuf {
        let name: String = address
            .trim_start_matches(super::ADDRESS_SCHEME)
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        std::env::temp_dir().join("tern-sim-links").join(name)
    }

    pub fn write(address: &str, state: &str) {
        let path = path(address);
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = std::fs::write(path, state);
    }

    pub fn read(address: &str) -> Option<String> {
        std::fs::read_to_string(path(address)).ok()
    }

    pub fn remove(address: &str) {
        let _ = std::fs::remove_file(path(address));
    }
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    guests: Vec<Guest>,
}

impl SimHypervisor {
    /// Open the simulated host whose guests live in `state_dir`. The first
    /// open creates the `seed` guests, running; later opens restore what the
    /// state file holds and ignore `seed`, as a restarted agent finds the
    /// QEMU processes it left behind.
    pub fn open(
        state_dir: &Path,
        host: &str,
        settings: SimSettings,
        seed: &[VmSpec],
    ) -> Result<Self, HypervisorError> {
        let path = state_dir.join(STATE_FILE);
        let guests = match std::fs::read(&path) {
            Ok(bytes) => parse_state_file(&path, &bytes)?,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                std::fs::create_dir_all(state_dir).map_err(|e| {
                    HypervisorError::Failed(format!(
                        "cannot create state directory {}: {e}",
                        state_dir.display()
                    ))
                })?;
                let guests = seed_guests(seed)?;
                // Written now so that the next open knows the seed was applied,
                // even if nothing changes before then.
                write_state_file(&path, &guests)?;
                guests
            }
            Err(e) => {
                return Err(HypervisorError::Failed(format!(
                    "cannot read sim guest state {}: {e}",
                    path.display()
                )));
            }
        };
        Ok(SimHypervisor::new(host, settings, Some(path), guests))
    }

    /// A simulated host that keeps nothing on disk, for unit tests and
    /// benchmarks. The `seed` guests start running.
    pub fn in_memory(
        host: &str,
        settings: SimSettings,
        seed: &[VmSpec],
    ) -> Result<Self, HypervisorError> {
        Ok(SimHypervisor::new(host, settings, None, seed_guests(seed)?))
    }

    pub fn settings(&self) -> &SimSettings {
        &self.settings
    }

    fn new(
        host: &str,
        settings: SimSettings,
        state_file: Option<PathBuf>,
        guests: BTreeMap<String, Guest>,
    ) -> Self {
        SimHypervisor {
            host: host.to_string(),
            settings,
            state_file,
            inner: Mutex::new(Inner {
                guests,
                incoming: HashMap::new(),
                completed: Default::default(),
                transfers: HashMap::new(),
                calls: [0; SimCall::ALL.len()],
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The guest map is replaced whole (see `change`), so a panic elsewhere
        // cannot have left it half updated.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Apply `f` to a copy of the guests and, if it changed them, persist the
    /// copy before it becomes the state: memory never runs ahead of the file,
    /// and a failed write changes nothing. The lock is held across the write
    /// so that the file sees changes in the order they happened.
    fn change<R>(
        &self,
        f: impl FnOnce(&mut BTreeMap<String, Guest>) -> Result<R, HypervisorError>,
    ) -> Result<R, HypervisorError> {
        let mut inner = self.lock();
        let mut next = inner.guests.clone();
        let result = f(&mut next)?;
        if next != inner.guests {
            if let Some(path) = &self.state_file {
                write_state_file(path, &next)?;
            }
            inner.guests = next;
        }
        Ok(result)
    }

    fn set_state(
        &self,
        vm: &str,
        decide: impl FnOnce(GuestState) -> Result<GuestState, HypervisorError>,
    ) -> Result<(), HypervisorError> {
        self.change(|guests| {
            let guest = guests
                .get_mut(vm)
                .ok_or_else(|| HypervisorError::NoSuchGuest(vm.to_string()))?;
            guest.state = decide(guest.state)?;
            Ok(())
        })
    }

    /// Count a call and misbehave as `[hypervisor.faults]` says: fail, or
    /// never answer. Before the call changes anything.
    async fn inject(&self, call: SimCall, vm: &str) -> Result<(), HypervisorError> {
        let faults = self.settings.faults;
        if !(faults.fail.contains(call) || faults.hang.contains(call)) {
            return Ok(());
        }
        let nth = {
            let mut inner = self.lock();
            let count = &mut inner.calls[call.index()];
            *count = count.saturating_add(1);
            *count
        };
        if faults.fail_times != 0 && nth > faults.fail_times {
            return Ok(());
        }
        if faults.hang.contains(call) {
            tracing::warn!(
                vm,
                call = call.as_str(),
                "injected fault: the call never answers"
            );
            return std::future::pending().await;
        }
        tracing::warn!(vm, call = call.as_str(), "injected fault: the call fails");
        Err(HypervisorError::Failed(format!(
            "{} {vm} failed (injected fault)",
            call.as_str()
        )))
    }

    fn guest_exists(&self, vm: &str) -> bool {
        self.lock().guests.contains_key(vm)
    }

    /// Sleep one tick of real time, or less if the transfer is cancelled.
    /// Wait until `until` (or a cancel), then say whether to go on.
    async fn tick(
        &self,
        vm: &str,
        control: &TransferControl,
        until: tokio::time::Instant,
    ) -> Result<(), HypervisorError> {
        if until > tokio::time::Instant::now() {
            tokio::select! {
                biased;
                () = control.wake.notified() => {}
                () = tokio::time::sleep_until(until) => {}
            }
        } else {
            // Behind schedule: catch up, but let other tasks run.
            tokio::task::yield_now().await;
        }
        if control.cancelled.load(Ordering::Acquire) {
            return Err(HypervisorError::Cancelled(vm.to_string()));
        }
        Ok(())
    }
}

fn seed_guests(seed: &[VmSpec]) -> Result<BTreeMap<String, Guest>, HypervisorError> {
    let mut guests = BTreeMap::new();
    for spec in seed {
        let guest = Guest {
            spec: spec.clone(),
            state: GuestState::Running,
        };
        if guests.insert(spec.name.clone(), guest).is_some() {
            return Err(HypervisorError::AlreadyExists(spec.name.clone()));
        }
    }
    Ok(guests)
}

fn parse_state_file(path: &Path, bytes: &[u8]) -> Result<BTreeMap<String, Guest>, HypervisorError> {
    let file: StateFile = serde_json::from_slice(bytes).map_err(|e| {
        HypervisorError::Failed(format!("corrupt sim guest state {}: {e}", path.display()))
    })?;
    let mut guests = BTreeMap::new();
    for guest in file.guests {
        let name = guest.spec.name.clone();
        if guests.insert(name.clone(), guest).is_some() {
            return Err(HypervisorError::Failed(format!(
                "corrupt sim guest state {}: guest {name} is listed twice",
                path.display()
            )));
        }
    }
    Ok(guests)
}

/// Write to a temporary file and rename it over the old one, so that a crash
/// mid-write leaves the previous state rather than a torn file. No fsync: the
/// guests are meant to survive the agent process, and a host crash takes
/// them down anyway.
fn write_state_file(path: &Path, guests: &BTreeMap<String, Guest>) -> Result<(), HypervisorError> {
    let file = StateFile {
        guests: guests.values().cloned().collect(),
    };
    let failed = |e: &dyn std::fmt::Display| {
        HypervisorError::Failed(format!(
            "cannot save sim guest state to {}: {e}",
            path.display()
        ))
    };
    let bytes = serde_json::to_vec_pretty(&file).map_err(|e| failed(&e))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, bytes).map_err(|e| failed(&e))?;
    std::fs::rename(&tmp, path).map_err(|e| failed(&e))
}

fn state_word(state: GuestState) -> &'static str {
    match state {
        GuestState::Running => "running",
        GuestState::Paused => "paused",
        GuestState::Incoming => "incoming",
    }
}

/// Removes the VM's transfer from the registry however `transfer_out` ends,
/// cancellation and dropped futures included.
struct TransferRegistration<'a> {
    hypervisor: &'a SimHypervisor,
    vm: &'a str,
    control: Arc<TransferControl>,
}

impl Drop for TransferRegistration<'_> {
    fn drop(&mut self) {
        let mut inner = self.hypervisor.lock();
        if inner
            .transfers
            .get(self.vm)
            .is_some_and(|c| Arc::ptr_eq(c, &self.control))
        {
            inner.transfers.remove(self.vm);
        }
    }
}

/// Where a pre-copy transfer stands, in bytes; time is derived from bytes
/// because the link is always saturated.
struct PreCopy {
    memory: u64,
    dirty_rate: u64,
    bandwidth: u64,
    downtime_limit_bytes: u64,
    iteration: u32,
    /// Bytes this iteration sends.
    iteration_bytes: u64,
    sent_in_iteration: u64,
    transferred: u64,
    stop_and_copy: bool,
}

impl PreCopy {
    fn new(spec: &VmSpec, settings: &SimSettings) -> Self {
        let bandwidth = settings.bandwidth_mib_s.saturating_mul(MIB);
        let memory = spec.memory_mib.saturating_mul(MIB);
        PreCopy {
            memory,
            dirty_rate: spec.dirty_rate_mib_s.saturating_mul(MIB),
            bandwidth,
            downtime_limit_bytes: scale(bandwidth, settings.downtime_limit_ms, 1000),
            iteration: 1,
            iteration_bytes: memory,
            sent_in_iteration: 0,
            transferred: 0,
            stop_and_copy: false,
        }
    }

    fn should_stop_and_copy(&self) -> bool {
        self.iteration_bytes <= self.downtime_limit_bytes || self.iteration >= MAX_ITERATIONS
    }

    fn left_in_iteration(&self) -> u64 {
        self.iteration_bytes - self.sent_in_iteration
    }

    fn send(&mut self, bytes: u64) {
        self.sent_in_iteration += bytes;
        self.transferred += bytes;
    }

    fn next_iteration(&mut self) {
        self.iteration_bytes = self.dirtied_in_iteration();
        self.sent_in_iteration = 0;
        self.iteration += 1;
    }

    /// What the guest dirtied while this iteration has been sending.
    fn dirtied_in_iteration(&self) -> u64 {
        if self.stop_and_copy {
            return 0;
        }
        scale(self.dirty_rate, self.sent_in_iteration, self.bandwidth).min(self.memory)
    }

    fn remaining(&self) -> u64 {
        self.left_in_iteration()
            .saturating_add(self.dirtied_in_iteration())
            .min(self.memory)
    }

    fn millis_at_link_speed(&self, bytes: u64) -> u64 {
        scale_up(bytes, 1000, self.bandwidth)
    }

    fn stats(&self) -> TransferStats {
        let remaining = self.remaining();
        TransferStats {
            bytes_total: self.transferred.saturating_add(remaining),
            bytes_transferred: self.transferred,
            bytes_remaining: remaining,
            rate_bytes_s: self.bandwidth,
            dirty_rate_bytes_s: if self.stop_and_copy {
                0
            } else {
                self.dirty_rate
            },
            iteration: self.iteration,
            expected_downtime_ms: self.millis_at_link_speed(remaining),
            elapsed_ms: scale(self.transferred, 1000, self.bandwidth),
            setup_time_ms: 0,
            downtime_ms: 0,
            ..TransferStats::default()
        }
    }
}

/// How long [`SimHypervisor::transfer_out`] takes to move `spec` in
/// simulated time, computed from the same pre-copy model without sleeping:
/// every byte it sends, iterations and stop-and-copy included, at link
/// speed. Divide by `settings.speed` for real time (which a running transfer
/// only exceeds by its sleeps' overshoot). `None` when the transfer would
/// fail for want of bandwidth.
pub fn transfer_duration(spec: &VmSpec, settings: &SimSettings) -> Option<Duration> {
    let mut copy = PreCopy::new(spec, settings);
    if copy.bandwidth == 0 && copy.memory > 0 {
        return None;
    }
    loop {
        if copy.should_stop_and_copy() {
            copy.stop_and_copy = true;
        }
        copy.send(copy.left_in_iteration());
        if copy.stop_and_copy {
            break;
        }
        copy.next_iteration();
    }
    if copy.transferred == 0 {
        return Some(Duration::ZERO);
    }
    Some(Duration::from_secs_f64(
        copy.transferred as f64 / copy.bandwidth as f64,
    ))
}

/// `value * mul / div` without overflow, rounded down; zero if `div` is zero.
fn scale(value: u64, mul: u64, div: u64) -> u64 {
    if div == 0 {
        return 0;
    }
    u64::try_from(u128::from(value) * u128::from(mul) / u128::from(div)).unwrap_or(u64::MAX)
}

/// `value * mul / div` rounded up, so a non-zero downtime never shows as 0 ms.
fn scale_up(value: u64, mul: u64, div: u64) -> u64 {
    if div == 0 {
        return 0;
    }
    u64::try_from((u128::from(value) * u128::from(mul)).div_ceil(u128::from(div)))
        .unwrap_or(u64::MAX)
}

#[async_trait]
impl Hypervisor for SimHypervisor {
    fn kind(&self) -> &'static str {
        "sim"
    }

    fn capacity(&self) -> HostCapacity {
        self.settings.capacity
    }

    /// The simulated hypervisor runs no machine: any spec will do.
    fn check_spec(&self, _spec: &VmSpec) -> Result<(), MachineError> {
        Ok(())
    }

    async fn guests(&self) -> Vec<Guest> {
        self.lock().guests.values().cloned().collect()
    }

    async fn start_incoming(
        &self,
        spec: &VmSpec,
        attempt_id: &str,
        postcopy: bool,
    ) -> Result<String, HypervisorError> {
        self.inject(SimCall::StartIncoming, &spec.name).await?;
        let address = format!("{ADDRESS_SCHEME}{}/{attempt_id}/{}", self.host, spec.name);
        self.change(|guests| {
            if guests.contains_key(&spec.name) {
                return Err(HypervisorError::AlreadyExists(spec.name.clone()));
            }
            let guest = Guest {
                spec: spec.clone(),
                state: GuestState::Incoming,
            };
            guests.insert(spec.name.clone(), guest);
            Ok(())
        })?;
        if postcopy {
            link::remove(&address);
            self.lock()
                .incoming
                .insert(spec.name.clone(), address.clone());
        }
        let latency = self.settings.faults.start_incoming_latency_ms;
        if latency > 0 {
            // A slow start, as QEMU's can be: the guest is there already.
            tokio::time::sleep(Duration::from_millis(latency)).await;
        }
        Ok(address)
    }

    async fn transfer_out(
        &self,
        vm: &str,
        _destination: &str,
        address: &str,
        plan: TransferPlan,
        progress: mpsc::Sender<TransferStats>,
    ) -> Result<TransferStats, HypervisorError> {
        self.lock().completed.remove(vm);
        let result = self.run_transfer(vm, address, plan, progress).await;
        if plan.postcopy {
            // What the destination's end of the link sees: before the
            // switchover it rolls back; after it, the rest of the guest's
            // memory is gone with the link.
            match &result {
                Ok(stats) => {
                    let state = if stats.stage == TransferStage::Postcopy {
                        link::COMPLETED_SWITCHED
                    } else {
                        link::COMPLETED
                    };
                    link::write(address, state);
                    // A switch asked from now finds the transfer done.
                    self.lock().completed.insert(vm.to_string());
                }
                Err(_) => link::write(address, link::FAILED),
            }
        }
        result
    }

    /// The simulated transfer runs inside the agent: it ends with it. Only
    /// one that completed before is found again.
    async fn watch_transfer(
        &self,
        vm: &str,
        _destination: &str,
        _progress: mpsc::Sender<TransferStats>,
    ) -> Result<TransferStats, HypervisorError> {
        if self.lock().completed.contains(vm) {
            return Ok(TransferStats {
                stage: TransferStage::Postcopy,
                ..TransferStats::default()
            });
        }
        Err(HypervisorError::Failed(format!(
            "the transfer of {vm} ran inside the agent and ended with it"
        )))
    }

    async fn cancel_transfer(&self, vm: &str) -> Result<(), HypervisorError> {
        self.inject(SimCall::CancelTransfer, vm).await?;
        if let Some(control) = self.lock().transfers.get(vm) {
            if control.switched.load(Ordering::Acquire) {
                return Err(HypervisorError::Failed(format!(
                    "the transfer of {vm} is in post-copy: it cannot be cancelled (the guest runs on the destination)"
                )));
            }
            control.cancelled.store(true, Ordering::Release);
            // `notify_one` keeps a permit if the transfer is between two
            // sleeps, so the wake-up cannot be lost.
            control.wake.notify_one();
        }
        Ok(())
    }

    async fn start_postcopy(&self, vm: &str) -> Result<(), HypervisorError> {
        if self.lock().completed.contains(vm) {
            // The whole guest went by pre-copy: nothing is left to switch,
            // and the guest must not run here again all the same.
            return Ok(());
        }
        let control = self.lock().transfers.get(vm).cloned().ok_or_else(|| {
            HypervisorError::Failed(format!(
                "no transfer of {vm} is running to switch to post-copy"
            ))
        })?;
        if !control.postcopy_allowed {
            return Err(HypervisorError::Failed(format!(
                "the transfer of {vm} was started without post-copy"
            )));
        }
        let switched = control.switched_notify.notified();
        control.switch_requested.store(true, Ordering::Release);
        control.wake.notify_one();
        if !control.switched.load(Ordering::Acquire) {
            switched.await;
        }
        Ok(())
    }

    async fn await_switchover(&self, vm: &str) -> Result<bool, HypervisorError> {
        let address = self.lock().incoming.get(vm).cloned().ok_or_else(|| {
            HypervisorError::Failed(format!("{vm} was not started ready for post-copy here"))
        })?;
        loop {
            if !self.guest_exists(vm) {
                return Err(HypervisorError::NoSuchGuest(vm.to_string()));
            }
            match link::read(&address).as_deref() {
                Some(link::POSTCOPY) => return Ok(true),
                Some(link::COMPLETED_SWITCHED) => return Ok(true),
                Some(link::COMPLETED) => return Ok(false),
                Some(link::FAILED) => {
                    link::remove(&address);
                    return Err(HypervisorError::Failed(format!(
                        "the transfer of {vm} ended before the switchover"
                    )));
                }
                _ => tokio::time::sleep(TICK).await,
            }
        }
    }

    async fn recover_incoming(
        &self,
        vm: &str,
        _attempt_id: &str,
    ) -> Result<String, HypervisorError> {
        Err(HypervisorError::Failed(format!(
            "the sim link of {vm} never breaks: nothing to recover"
        )))
    }

    async fn resume_postcopy(&self, vm: &str, _address: &str) -> Result<(), HypervisorError> {
        Err(HypervisorError::Failed(format!(
            "the sim link of {vm} never breaks: nothing to resume"
        )))
    }
    async fn complete_incoming(
        &self,
        vm: &str,
        _stats: &TransferStats,
    ) -> Result<(), HypervisorError> {
        self.inject(SimCall::CompleteIncoming, vm).await?;
        // The simulated transfer arrives the instant the source reports it
        // complete; nothing is left to wait for, and its link is done with.
        self.end_incoming(vm);
        match self.lock().guests.get(vm) {
            None => Err(HypervisorError::NoSuchGuest(vm.to_string())),
            Some(guest) if guest.state == GuestState::Incoming => Ok(()),
            Some(guest) => Err(HypervisorError::Failed(format!(
                "guest {vm} is {}, not incoming",
                state_word(guest.state)
            ))),
        }
    }
    async fn pause(&self, vm: &str) -> Result<(), HypervisorError> {
        // An incoming guest is already paused and stays incoming.
        self.set_state(vm, |state| {
            Ok(match state {
                GuestState::Running => GuestState::Paused,
                other => other,
            })
        })
    }

    async fn resume(&self, vm: &str) -> Result<(), HypervisorError> {
        self.inject(SimCall::Resume, vm).await?;
        self.set_state(vm, |_| Ok(GuestState::Running))
    }

    async fn kill(&self, vm: &str) -> Result<(), HypervisorError> {
        self.inject(SimCall::Kill, vm).await?;
        self.end_incoming(vm);
        self.change(|guests| {
            guests.remove(vm);
            Ok(())
        })
    }

    async fn status(&self, vm: &str) -> Option<GuestState> {
        self.lock().guests.get(vm).map(|guest| guest.state)
    }
}

impl SimHypervisor {
    /// The destination's end of a post-copy link is done with (the guest
    /// completed or went): its file goes, which the source wrote its last
    /// state into before it reported the transfer's end.
    fn end_incoming(&self, vm: &str) {
        if let Some(address) = self.lock().incoming.remove(vm) {
            link::remove(&address);
        }
    }

    async fn run_transfer(
        &self,
        vm: &str,
        address: &str,
        plan: TransferPlan,
        progress: mpsc::Sender<TransferStats>,
    ) -> Result<TransferStats, HypervisorError> {
        if !address.starts_with(ADDRESS_SCHEME) {
            return Err(HypervisorError::Failed(format!(
                "the sim hypervisor cannot transfer {vm} to {address}: not a {ADDRESS_SCHEME} address"
            )));
        }
        let speed = self.settings.speed;
        if !(speed.is_finite() && speed > 0.0) {
            return Err(HypervisorError::Failed(format!(
                "sim speed must be a positive number, not {speed}"
            )));
        }
        let (spec, registration) = {
            let mut inner = self.lock();
            let guest = inner
                .guests
                .get(vm)
                .ok_or_else(|| HypervisorError::NoSuchGuest(vm.to_string()))?;
            if guest.state != GuestState::Running {
                return Err(HypervisorError::Failed(format!(
                    "guest {vm} is {}, not running",
                    state_word(guest.state)
                )));
            }
            let spec = guest.spec.clone();
            if inner.transfers.contains_key(vm) {
                return Err(HypervisorError::Failed(format!(
                    "a transfer of {vm} is already running"
                )));
            }
            let control = Arc::new(TransferControl {
                postcopy_allowed: plan.postcopy,
                ..TransferControl::default()
            });
            inner.transfers.insert(vm.to_string(), control.clone());
            (
                spec,
                TransferRegistration {
                    hypervisor: self,
                    vm,
                    control,
                },
            )
        };
        let control = &registration.control;
        if plan.postcopy {
            link::write(address, link::PRECOPY);
        }
        let mut settings = self.settings;
        if plan.downtime_limit_ms > 0 {
            settings.downtime_limit_ms = plan.downtime_limit_ms;
        }
        let mut copy = PreCopy::new(&spec, &settings);
        let mut stage = TransferStage::Precopy;
        if copy.bandwidth == 0 && copy.memory > 0 {
            return Err(HypervisorError::Failed(format!(
                "cannot transfer {vm}: the sim link has no bandwidth"
            )));
        }
        // Bytes one tick of real time carries; at least one so a transfer
        // always moves.
        let tick_bytes =
            (copy.bandwidth as f64 * speed * TICK.as_millis() as f64 / 1000.0).max(1.0) as u64;
        let mut downtime_bytes = 0;
        // Ticks sleep until a deadline that advances by each tick's share of
        // real time, so timer slack does not pile up over a transfer (it
        // made transfers about 3 % longer than the model says).
        let mut deadline = tokio::time::Instant::now();
        loop {
            if !copy.stop_and_copy && copy.should_stop_and_copy() {
                if control.cancelled.load(Ordering::Acquire) {
                    return Err(HypervisorError::Cancelled(vm.to_string()));
                }
                if copy.iteration >= MAX_ITERATIONS
                    && copy.iteration_bytes > copy.downtime_limit_bytes
                {
                    tracing::warn!(
                        vm,
                        iteration = copy.iteration,
                        "transfer does not converge; forcing the stop-and-copy"
                    );
                }
                self.set_state(vm, |_| Ok(GuestState::Paused))?;
                copy.stop_and_copy = true;
                downtime_bytes = copy.iteration_bytes;
            }
            while copy.left_in_iteration() > 0 {
                let chunk = copy.left_in_iteration().min(tick_bytes);
                deadline += Duration::from_secs_f64(chunk as f64 / copy.bandwidth as f64 / speed);
                self.tick(vm, control, deadline).await?;
                if !self.guest_exists(vm) {
                    return Err(HypervisorError::Failed(format!(
                        "guest {vm} was killed during its transfer"
                    )));
                }
                copy.send(chunk);
                if stage == TransferStage::Precopy
                    && control.switch_requested.load(Ordering::Acquire)
                {
                    // The switchover: the guest stops here, its device
                    // state goes, and what is still dirty or unsent is
                    // pulled by the destination, which runs it from now.
                    self.set_state(vm, |_| Ok(GuestState::Paused))?;
                    let rest = copy.remaining();
                    copy.stop_and_copy = true;
                    copy.iteration_bytes = copy.sent_in_iteration + rest;
                    downtime_bytes = 0;
                    stage = TransferStage::Postcopy;
                    link::write(address, link::POSTCOPY);
                    control.switched.store(true, Ordering::Release);
                    control.switched_notify.notify_waiters();
                }
                // A full or closed channel is the watcher's problem, never the
                // transfer's.
                let _ = progress.try_send(TransferStats {
                    stage,
                    ..copy.stats()
                });
            }
            if copy.stop_and_copy {
                // The simulated guest was paused for exactly the final copy.
                let downtime_ms = copy.millis_at_link_speed(downtime_bytes);
                let done = TransferStats {
                    expected_downtime_ms: downtime_ms,
                    downtime_ms,
                    stage,
                    ..copy.stats()
                };
                if stage == TransferStage::Precopy {
                    // A switch asked during the final pass finds it done.
                    control.switched.store(true, Ordering::Release);
                    control.switched_notify.notify_waiters();
                }
                let _ = progress.try_send(done);
                return Ok(done);
            }
            copy.next_iteration();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn settings(bandwidth_mib_s: u64, downtime_limit_ms: u64) -> SimSettings {
        SimSettings {
            bandwidth_mib_s,
            speed: 1000.0,
            downtime_limit_ms,
            capacity: HostCapacity {
                memory_mib: 65_536,
                vcpus: 64,
            },
            faults: SimFaults::default(),
        }
    }

    fn vm(name: &str, memory_mib: u64, dirty_rate_mib_s: u64) -> VmSpec {
        VmSpec {
            name: name.to_string(),
            memory_mib,
            vcpus: 2,
            dirty_rate_mib_s,
            features: Vec::new(),
            qemu: None,
        }
    }

    fn sim(settings: SimSettings, seed: &[VmSpec]) -> SimHypervisor {
        SimHypervisor::in_memory("hv-test", settings, seed).expect("seed has unique names")
    }

    async fn transfer(
        hv: &SimHypervisor,
        name: &str,
    ) -> (Result<TransferStats, HypervisorError>, Vec<TransferStats>) {
        let (tx, mut rx) = mpsc::channel(1024);
        let result = hv
            .transfer_out(
                name,
                "hv-b",
                &format!("sim://hv-b/a1/{name}"),
                TransferPlan::default(),
                tx,
            )
            .await;
        let mut reports = Vec::new();
        while let Ok(stats) = rx.try_recv() {
            reports.push(stats);
        }
        (result, reports)
    }

    #[tokio::test]
    async fn transfer_converges_and_leaves_guest_paused() {
        // 256 MiB at 1 GiB/s dirties 16 MiB, which fits in 30 ms: two iterations.
        let hv = sim(settings(1024, 30), &[vm("web", 256, 64)]);
        let (result, _) = transfer(&hv, "web").await;
        let stats = result.expect("transfer converges");
        assert_eq!(stats.iteration, 2);
        assert_eq!(stats.bytes_transferred, (256 + 16) * MIB);
        assert_eq!(stats.bytes_total, stats.bytes_transferred);
        assert_eq!(stats.bytes_remaining, 0);
        assert_eq!(stats.expected_downtime_ms, 16); // 15.625 ms, rounded up
        assert_eq!(stats.elapsed_ms, 265);
        assert_eq!(hv.status("web").await, Some(GuestState::Paused));
    }

    #[tokio::test]
    async fn zero_memory_transfer_completes_immediately() {
        // Slowest possible clock: any sleep would show.
        let hv = sim(
            SimSettings {
                speed: 1e-6,
                ..settings(1024, 300)
            },
            &[vm("empty", 0, 100)],
        );
        let started = Instant::now();
        let (result, _) = transfer(&hv, "empty").await;
        let stats = result.expect("nothing to send");
        assert!(started.elapsed() < Duration::from_millis(20));
        assert_eq!(stats.iteration, 1);
        assert_eq!(stats.bytes_transferred, 0);
        assert_eq!(stats.elapsed_ms, 0);
        assert_eq!(hv.status("empty").await, Some(GuestState::Paused));
    }

    #[tokio::test]
    async fn high_dirty_rate_forces_completion_after_iteration_cap() {
        let hv = sim(settings(1024, 10), &[vm("db", 64, 2048)]);
        let (result, reports) = transfer(&hv, "db").await;
        let stats = result.expect("forced to complete");
        assert_eq!(stats.iteration, MAX_ITERATIONS);
        // Every iteration re-sends all memory, the forced one included.
        assert_eq!(
            stats.bytes_transferred,
            u64::from(MAX_ITERATIONS) * 64 * MIB
        );
        assert_eq!(stats.expected_downtime_ms, 63); // far beyond the 10 ms limit
        assert!(reports.iter().all(|r| r.iteration <= MAX_ITERATIONS));
        assert_eq!(hv.status("db").await, Some(GuestState::Paused));
    }

    #[tokio::test]
    async fn transfer_duration_matches_what_the_transfer_takes() {
        // 256 MiB, then the 16 MiB it dirtied: 272 MiB at 1 GiB/s.
        assert_eq!(
            transfer_duration(&vm("web", 256, 64), &settings(1024, 30)),
            Some(Duration::from_micros(265_625))
        );
        assert_eq!(
            transfer_duration(&vm("empty", 0, 100), &settings(0, 30)),
            Some(Duration::ZERO)
        );
        assert_eq!(
            transfer_duration(&vm("web", 256, 0), &settings(0, 30)),
            None
        );
        // Converging in one, several or the forced last iteration: the same
        // bytes and simulated time as the transfer itself.
        for (memory_mib, dirty_rate_mib_s, downtime_limit_ms) in [
            (512, 0, 300),
            (8192, 64, 300),
            (3000, 700, 50),
            (64, 2048, 10),
        ] {
            let settings = settings(1024, downtime_limit_ms);
            let spec = vm("web", memory_mib, dirty_rate_mib_s);
            let hv = sim(settings, std::slice::from_ref(&spec));
            let (result, _) = transfer(&hv, "web").await;
            let stats = result.expect("transfer completes");
            let expected = transfer_duration(&spec, &settings).expect("bandwidth");
            assert_eq!(
                expected.as_millis(),
                u128::from(stats.elapsed_ms),
                "{spec:?}"
            );
            let bytes = expected.as_secs_f64() * (1024 * MIB) as f64;
            assert!(
                (bytes - stats.bytes_transferred as f64).abs() < 2.0,
                "{spec:?}"
            );
        }
    }

    #[tokio::test]
    async fn transfer_lasts_its_duration_divided_by_speed() {
        // 256 MiB at 1 GiB/s and 2x: 125 ms of real time.
        let settings = SimSettings {
            speed: 2.0,
            ..settings(1024, 300)
        };
        let spec = vm("web", 256, 0);
        let hv = sim(settings, std::slice::from_ref(&spec));
        let started = Instant::now();
        transfer(&hv, "web").await.0.expect("transfer completes");
        let took = started.elapsed();
        let expected = transfer_duration(&spec, &settings)
            .expect("bandwidth")
            .div_f64(settings.speed);
        assert_eq!(expected, Duration::from_millis(125));
        assert!(took >= expected, "{took:?} < {expected:?}");
        assert!(took < expected * 2, "{took:?}");
    }

    /// Source and destination sim hypervisors of one post-copy transfer of
    /// a guest that dirties memory faster than the link carries it.
    fn postcopy_pair(attempt: &str) -> (Arc<SimHypervisor>, SimHypervisor, String) {
        let slow = SimSettings {
            speed: 1.0,
            ..settings(256, 30)
        };
        let src =
            Arc::new(SimHypervisor::in_memory("hv-a", slow, &[vm("web", 1024, 512)]).unwrap());
        let dst = SimHypervisor::in_memory("hv-b", slow, &[]).unwrap();
        (src, dst, attempt.to_string())
    }

    #[tokio::test]
    async fn a_switch_to_post_copy_stops_the_guest_here_and_the_destination_sees_it() {
        let (src, dst, attempt) = postcopy_pair("m-pc1.1");
        let address = dst
            .start_incoming(&vm("web", 1024, 512), &attempt, true)
            .await
            .expect("incoming");
        let (tx, mut rx) = mpsc::channel(1024);
        let plan = TransferPlan {
            postcopy: true,
            downtime_limit_ms: 0,
        };
        let running = {
            let (src, address) = (src.clone(), address.clone());
            tokio::spawn(async move { src.transfer_out("web", "hv-b", &address, plan, tx).await })
        };
        let first = rx.recv().await.expect("progress");
        assert_eq!(first.stage, TransferStage::Precopy);
        // Nothing switched yet: the destination waits.
        let waiting =
            tokio::time::timeout(Duration::from_millis(150), dst.await_switchover("web")).await;
        assert!(
            waiting.is_err(),
            "the destination must wait for the switchover"
        );
        src.start_postcopy("web").await.expect("switched");
        assert_eq!(src.status("web").await, Some(GuestState::Paused));
        dst.await_switchover("web")
            .await
            .expect("the switchover arrived");
        let refused = src.cancel_transfer("web").await.unwrap_err();
        assert!(refused.to_string().contains("post-copy"), "{refused}");
        let done = running.await.unwrap().expect("the last page went");
        assert_eq!(done.stage, TransferStage::Postcopy);
        let mut seen = Vec::new();
        while let Ok(s) = rx.try_recv() {
            seen.push(s.stage);
        }
        assert!(seen.contains(&TransferStage::Postcopy), "{seen:?}");
        // The destination completes the guest: the link's file goes (they
        // piled up in the temp folder, one a post-copy-capable move).
        assert!(link::path(&address).exists());
        dst.complete_incoming("web", &done)
            .await
            .expect("completes");
        assert!(!link::path(&address).exists(), "the link's file is left");
    }

    #[tokio::test]
    async fn a_transfer_that_ends_before_the_switchover_tells_the_destination() {
        let (src, dst, attempt) = postcopy_pair("m-pc2.1");
        let address = dst
            .start_incoming(&vm("web", 1024, 512), &attempt, true)
            .await
            .expect("incoming");
        let (tx, mut rx) = mpsc::channel(1024);
        let plan = TransferPlan {
            postcopy: true,
            downtime_limit_ms: 0,
        };
        let running = {
            let (src, address) = (src.clone(), address.clone());
            tokio::spawn(async move { src.transfer_out("web", "hv-b", &address, plan, tx).await })
        };
        rx.recv().await.expect("progress");
        src.cancel_transfer("web")
            .await
            .expect("cancel before the switchover");
        assert!(matches!(
            running.await.unwrap(),
            Err(HypervisorError::Cancelled(_))
        ));
        assert_eq!(src.status("web").await, Some(GuestState::Running));
        let err = dst.await_switchover("web").await.unwrap_err();
        assert!(err.to_string().contains("before the switchover"), "{err}");
        // And without post-copy enabled there is nothing to switch.
        let (tx, _rx) = mpsc::channel(1024);
        let running = {
            let src = src.clone();
            tokio::spawn(async move {
                src.transfer_out(
                    "web",
                    "hv-b",
                    "sim://hv-b/m-pc2.2/web",
                    TransferPlan::default(),
                    tx,
                )
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let refused = src.start_postcopy("web").await.unwrap_err();
        assert!(
            refused.to_string().contains("without post-copy"),
            "{refused}"
        );
        src.cancel_transfer("web").await.unwrap();
        let _ = running.await;
    }

    #[tokio::test]
    async fn cancel_stops_transfer_and_leaves_guest_running() {
        // Real time: 4 GiB at 1 GiB/s would take four seconds.
        let hv = Arc::new(sim(
            SimSettings {
                speed: 1.0,
                ..settings(1024, 30)
            },
            &[vm("web", 4096, 0)],
        ));
        let (tx, mut rx) = mpsc::channel(16);
        let running = {
            let hv = hv.clone();
            tokio::spawn(async move {
                hv.transfer_out(
                    "web",
                    "hv-b",
                    "sim://hv-b/a1/web",
                    TransferPlan::default(),
                    tx,
                )
                .await
            })
        };
        let first = rx.recv().await.expect("a first progress report");
        assert_eq!(first.iteration, 1);
        let cancelled_at = Instant::now();
        hv.cancel_transfer("web").await.expect("cancel");
        let result = running.await.expect("transfer task");
        let latency = cancelled_at.elapsed();
        assert_eq!(result, Err(HypervisorError::Cancelled("web".into())));
        assert!(
            latency < Duration::from_millis(30),
            "cancel took {latency:?}"
        );
        assert_eq!(hv.status("web").await, Some(GuestState::Running));
        // Nothing runs any more, and the guest can be transferred again.
        hv.cancel_transfer("web").await.expect("idempotent");
        assert!(hv.lock().transfers.is_empty());
    }

    #[tokio::test]
    async fn cancel_during_stop_and_copy_leaves_guest_paused() {
        // 1 GiB fits in the 2 s limit: iteration 1 is the stop-and-copy.
        let hv = Arc::new(sim(
            SimSettings {
                speed: 1.0,
                ..settings(1024, 2000)
            },
            &[vm("web", 1024, 0)],
        ));
        let (tx, mut rx) = mpsc::channel(16);
        let running = {
            let hv = hv.clone();
            tokio::spawn(async move {
                hv.transfer_out(
                    "web",
                    "hv-b",
                    "sim://hv-b/a1/web",
                    TransferPlan::default(),
                    tx,
                )
                .await
            })
        };
        rx.recv().await.expect("a first progress report");
        hv.cancel_transfer("web").await.expect("cancel");
        let result = running.await.expect("transfer task");
        assert_eq!(result, Err(HypervisorError::Cancelled("web".into())));
        // The caller decides whether to resume it.
        assert_eq!(hv.status("web").await, Some(GuestState::Paused));
    }

    #[tokio::test]
    async fn cancel_without_transfer_is_ok() {
        let hv = sim(settings(1024, 30), &[vm("web", 256, 0)]);
        hv.cancel_transfer("web").await.expect("nothing to cancel");
        hv.cancel_transfer("absent")
            .await
            .expect("nothing to cancel");
        let (result, _) = transfer(&hv, "web").await;
        assert!(
            result.is_ok(),
            "an earlier cancel must not stick: {result:?}"
        );
    }

    #[tokio::test]
    async fn progress_reports_iterations_and_remaining_bytes() {
        // 256 -> 64 -> 16 -> 4 -> 1 MiB; 1 MiB fits in 1 ms at 1 GiB/s.
        let hv = sim(settings(1024, 1), &[vm("web", 256, 256)]);
        let (result, reports) = transfer(&hv, "web").await;
        let stats = result.expect("converges");
        assert_eq!(stats.iteration, 5);

        let first = reports.first().expect("progress was reported");
        assert_eq!(first.iteration, 1);
        assert_eq!(first.bytes_transferred, 256 * MIB);
        assert_eq!(first.bytes_remaining, 64 * MIB);
        assert_eq!(first.bytes_total, 320 * MIB);
        assert_eq!(first.rate_bytes_s, 1024 * MIB);
        assert_eq!(first.dirty_rate_bytes_s, 256 * MIB);
        assert_eq!(first.expected_downtime_ms, 63);
        assert_eq!(first.elapsed_ms, 250);

        let iterations: Vec<u32> = reports.iter().map(|r| r.iteration).collect();
        assert!(
            iterations.windows(2).all(|w| w[0] <= w[1]),
            "{iterations:?}"
        );
        assert_eq!(iterations.first(), Some(&1));
        assert_eq!(iterations.last(), Some(&5));
        for r in &reports {
            assert_eq!(r.bytes_total, r.bytes_transferred + r.bytes_remaining);
        }
        let remaining: Vec<u64> = reports.iter().map(|r| r.bytes_remaining / MIB).collect();
        assert_eq!(remaining, [64, 16, 4, 1, 0, 0]);
        let last = reports.last().expect("final report");
        assert_eq!(*last, stats);
        assert_eq!(last.dirty_rate_bytes_s, 0, "paused guests dirty nothing");
    }

    #[tokio::test]
    async fn progress_is_reported_every_tick_within_an_iteration() {
        // At 5x a tick carries 250 ms of a 1 GiB/s link: 1 GiB takes four.
        let hv = sim(
            SimSettings {
                speed: 5.0,
                ..settings(1024, 30)
            },
            &[vm("web", 1024, 0)],
        );
        let (result, reports) = transfer(&hv, "web").await;
        result.expect("converges");
        let remaining: Vec<u64> = reports
            .iter()
            .filter(|r| r.iteration == 1)
            .map(|r| r.bytes_remaining / MIB)
            .collect();
        assert_eq!(remaining, [768, 512, 256, 0]);
    }

    #[tokio::test]
    async fn transfer_of_paused_guest_is_refused() {
        let hv = sim(settings(1024, 30), &[vm("web", 256, 0)]);
        hv.pause("web").await.expect("pause");
        let (result, reports) = transfer(&hv, "web").await;
        assert_eq!(
            result,
            Err(HypervisorError::Failed(
                "guest web is paused, not running".into()
            ))
        );
        assert!(reports.is_empty());
        let (result, _) = transfer(&hv, "absent").await;
        assert_eq!(result, Err(HypervisorError::NoSuchGuest("absent".into())));
    }

    #[tokio::test]
    async fn start_incoming_refuses_existing_guest() {
        let hv = sim(settings(1024, 30), &[vm("web", 256, 0)]);
        assert_eq!(
            hv.start_incoming(&vm("web", 256, 0), "a1", false).await,
            Err(HypervisorError::AlreadyExists("web".into()))
        );
        assert_eq!(hv.status("web").await, Some(GuestState::Running));

        let address = hv
            .start_incoming(&vm("db", 512, 0), "a1", false)
            .await
            .expect("new guest");
        assert_eq!(address, "sim://hv-test/a1/db");
        assert_eq!(hv.status("db").await, Some(GuestState::Incoming));
    }

    #[tokio::test]
    async fn incoming_guest_stays_paused_until_resumed() {
        let hv = sim(settings(1024, 30), &[]);
        hv.start_incoming(&vm("db", 512, 0), "a1", false)
            .await
            .expect("start");
        hv.complete_incoming("db", &TransferStats::default())
            .await
            .expect("arrived");
        assert_eq!(hv.status("db").await, Some(GuestState::Incoming));
        hv.resume("db").await.expect("resume");
        hv.resume("db").await.expect("idempotent");
        assert_eq!(hv.status("db").await, Some(GuestState::Running));
        assert!(matches!(
            hv.complete_incoming("db", &TransferStats::default()).await,
            Err(HypervisorError::Failed(_))
        ));
    }

    #[tokio::test]
    async fn kill_is_idempotent() {
        let hv = sim(settings(1024, 30), &[vm("web", 256, 0)]);
        hv.kill("web").await.expect("kill");
        assert_eq!(hv.status("web").await, None);
        hv.kill("web").await.expect("second kill");
        hv.kill("never-existed").await.expect("absent guest");
        assert!(hv.guests().await.is_empty());
    }

    #[tokio::test]
    async fn guests_survive_reopen_from_state_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let hv = SimHypervisor::open(
                dir.path(),
                "hv-test",
                settings(1024, 30),
                &[vm("web", 256, 0), vm("db", 512, 0)],
            )
            .expect("first open");
            hv.pause("web").await.expect("pause");
            hv.start_incoming(&vm("cache", 128, 0), "a1", false)
                .await
                .expect("incoming");
        }
        let hv =
            SimHypervisor::open(dir.path(), "hv-test", settings(1024, 30), &[]).expect("reopen");
        let states: Vec<(String, GuestState)> = hv
            .guests()
            .await
            .into_iter()
            .map(|g| (g.spec.name, g.state))
            .collect();
        assert_eq!(
            states,
            [
                ("cache".to_string(), GuestState::Incoming),
                ("db".to_string(), GuestState::Running),
                ("web".to_string(), GuestState::Paused),
            ]
        );
        assert_eq!(hv.guests().await[0].spec, vm("cache", 128, 0));
    }

    #[tokio::test]
    async fn transfer_pause_is_persisted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hv = SimHypervisor::open(
            dir.path(),
            "hv-test",
            settings(1024, 30),
            &[vm("web", 64, 0)],
        )
        .expect("open");
        let (result, _) = transfer(&hv, "web").await;
        result.expect("converges");
        drop(hv);
        let hv =
            SimHypervisor::open(dir.path(), "hv-test", settings(1024, 30), &[]).expect("reopen");
        assert_eq!(hv.status("web").await, Some(GuestState::Paused));
    }

    #[tokio::test]
    async fn seed_is_ignored_after_first_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let hv = SimHypervisor::open(
                dir.path(),
                "hv-test",
                settings(1024, 30),
                &[vm("web", 256, 0)],
            )
            .expect("first open");
            hv.kill("web").await.expect("kill");
        }
        let hv = SimHypervisor::open(
            dir.path(),
            "hv-test",
            settings(1024, 30),
            &[vm("web", 256, 0), vm("db", 512, 0)],
        )
        .expect("reopen");
        assert!(hv.guests().await.is_empty());
    }

    #[tokio::test]
    async fn corrupt_state_file_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(STATE_FILE);
        std::fs::write(&path, b"{\"guests\": [").expect("write");
        let error = match SimHypervisor::open(dir.path(), "hv-test", settings(1024, 30), &[]) {
            Ok(_) => panic!("a corrupt file must not open"),
            Err(error) => error.to_string(),
        };
        assert!(error.contains(&path.display().to_string()), "{error}");
    }

    fn faulty(faults: SimFaults, seed: &[VmSpec]) -> SimHypervisor {
        sim(
            SimSettings {
                faults,
                ..settings(1024, 30)
            },
            seed,
        )
    }

    fn calls(list: &[SimCall]) -> SimCalls {
        list.iter()
            .copied()
            .fold(SimCalls::default(), SimCalls::with)
    }

    fn injected(call: &str, vm: &str) -> Result<(), HypervisorError> {
        Err(HypervisorError::Failed(format!(
            "{call} {vm} failed (injected fault)"
        )))
    }

    #[test]
    fn settings_from_config_carry_the_faults() {
        let mut config = HypervisorConfig::default();
        config.faults.fail = vec!["resume".into(), "start_incoming".into()];
        config.faults.hang = vec!["kill".into()];
        config.faults.fail_times = 3;
        config.faults.start_incoming_latency_ms = 4500;
        let faults = SimSettings::from_config(&config).faults;
        assert_eq!(
            faults,
            SimFaults {
                fail: calls(&[SimCall::Resume, SimCall::StartIncoming]),
                hang: calls(&[SimCall::Kill]),
                fail_times: 3,
                start_incoming_latency_ms: 4500,
            }
        );
        assert_eq!(
            SimSettings::from_config(&HypervisorConfig::default()).faults,
            SimFaults::default()
        );
        for call in SimCall::ALL {
            assert_eq!(SimCall::parse(call.as_str()), Some(call));
        }
        assert_eq!(SimCall::parse("pause"), None);
    }

    #[tokio::test]
    async fn every_call_listed_in_fail_fails_and_changes_nothing() {
        // At 10x, 4 GiB at 1 GiB/s takes 400 ms: still running at the cancel.
        let hv = Arc::new(sim(
            SimSettings {
                speed: 10.0,
                faults: SimFaults {
                    fail: calls(&SimCall::ALL),
                    ..SimFaults::default()
                },
                ..settings(1024, 30)
            },
            &[vm("web", 4096, 0), vm("db", 256, 0)],
        ));
        hv.pause("db").await.expect("pause is not listed");

        assert_eq!(hv.resume("db").await, injected("resume", "db"));
        assert_eq!(hv.status("db").await, Some(GuestState::Paused));
        assert_eq!(hv.kill("db").await, injected("kill", "db"));
        assert_eq!(hv.status("db").await, Some(GuestState::Paused));
        assert_eq!(
            hv.start_incoming(&vm("cache", 128, 0), "a1", false).await,
            Err(HypervisorError::Failed(
                "start_incoming cache failed (injected fault)".into()
            ))
        );
        assert_eq!(hv.status("cache").await, None);
        assert_eq!(
            hv.complete_incoming("db", &TransferStats::default()).await,
            injected("complete_incoming", "db")
        );

        // A cancel that fails leaves the transfer running.
        let (tx, mut rx) = mpsc::channel(1024);
        let running = {
            let hv = hv.clone();
            tokio::spawn(async move {
                hv.transfer_out(
                    "web",
                    "hv-b",
                    "sim://hv-b/a1/web",
                    TransferPlan::default(),
                    tx,
                )
                .await
            })
        };
        let first = rx.recv().await.expect("a first progress report");
        assert!(first.bytes_remaining > 0);
        assert_eq!(
            hv.cancel_transfer("web").await,
            injected("cancel_transfer", "web")
        );
        let stats = running
            .await
            .expect("transfer task")
            .expect("the transfer was not cancelled");
        assert_eq!(stats.bytes_remaining, 0);
        assert_eq!(hv.status("web").await, Some(GuestState::Paused));
    }

    #[tokio::test]
    async fn fail_times_fails_only_the_first_calls_of_each_kind() {
        let hv = faulty(
            SimFaults {
                fail: calls(&[SimCall::Resume, SimCall::Kill]),
                fail_times: 2,
                ..SimFaults::default()
            },
            &[vm("web", 256, 0), vm("db", 256, 0)],
        );
        hv.pause("web").await.expect("pause");
        assert_eq!(hv.resume("web").await, injected("resume", "web"));
        assert_eq!(hv.resume("web").await, injected("resume", "web"));
        assert_eq!(hv.status("web").await, Some(GuestState::Paused));
        hv.resume("web").await.expect("the third resume works");
        assert_eq!(hv.status("web").await, Some(GuestState::Running));
        hv.resume("web").await.expect("and every later one");
        // Each kind is counted on its own: two resumes did not use up the kills.
        assert_eq!(hv.kill("db").await, injected("kill", "db"));
        assert_eq!(hv.kill("db").await, injected("kill", "db"));
        assert_eq!(hv.status("db").await, Some(GuestState::Running));
        hv.kill("db").await.expect("the third kill works");
        assert_eq!(hv.status("db").await, None);
        // Calls not listed are neither hurt nor counted.
        hv.start_incoming(&vm("cache", 128, 0), "a1", false)
            .await
            .expect("start_incoming is not listed");
    }

    #[tokio::test]
    async fn a_hanging_call_never_answers_and_changes_nothing() {
        let hv = faulty(
            SimFaults {
                hang: calls(&[SimCall::Resume, SimCall::StartIncoming]),
                fail_times: 1,
                ..SimFaults::default()
            },
            &[vm("web", 256, 0)],
        );
        hv.pause("web").await.expect("pause");
        let wait = Duration::from_millis(200);
        assert!(
            tokio::time::timeout(wait, hv.resume("web")).await.is_err(),
            "a hanging resume answered"
        );
        assert_eq!(hv.status("web").await, Some(GuestState::Paused));
        assert!(
            tokio::time::timeout(wait, hv.start_incoming(&vm("db", 128, 0), "a1", false))
                .await
                .is_err(),
            "a hanging start_incoming answered"
        );
        assert_eq!(hv.status("db").await, None);
        // The caller gave up and dropped them; with fail_times = 1 the next
        // calls answer.
        hv.resume("web").await.expect("the second resume answers");
        assert_eq!(hv.status("web").await, Some(GuestState::Running));
        hv.start_incoming(&vm("db", 128, 0), "a2", false)
            .await
            .expect("the second start answers");
    }

    #[tokio::test]
    async fn a_hang_without_fail_times_never_answers_however_often_it_is_called() {
        let hv = faulty(
            SimFaults {
                hang: calls(&[SimCall::Kill]),
                ..SimFaults::default()
            },
            &[vm("web", 256, 0)],
        );
        for _ in 0..3 {
            assert!(
                tokio::time::timeout(Duration::from_millis(50), hv.kill("web"))
                    .await
                    .is_err(),
                "a hanging kill answered"
            );
        }
        assert_eq!(hv.status("web").await, Some(GuestState::Running));
    }

    #[tokio::test]
    async fn a_slow_incoming_start_holds_the_guest_from_its_start() {
        let latency = Duration::from_millis(300);
        let hv = faulty(
            SimFaults {
                start_incoming_latency_ms: latency.as_millis() as u64,
                ..SimFaults::default()
            },
            &[],
        );
        let started = Instant::now();
        let address = hv
            .start_incoming(&vm("db", 128, 0), "a1", false)
            .await
            .expect("start");
        assert_eq!(address, "sim://hv-test/a1/db");
        assert!(started.elapsed() >= latency, "{:?}", started.elapsed());

        // Given up on before it answers, the guest is there anyway, as a
        // QEMU process would be.
        assert!(
            tokio::time::timeout(
                Duration::from_millis(50),
                hv.start_incoming(&vm("cache", 128, 0), "a2", false)
            )
            .await
            .is_err(),
            "the start answered before its latency"
        );
        assert_eq!(hv.status("cache").await, Some(GuestState::Incoming));
    }
}
