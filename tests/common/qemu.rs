//! Real QEMU hosts for the tests that run guests: the test guest, the
//! hosts' `[hypervisor]` config, a cluster that kills its QEMUs when dropped,
//! and reading which copy of a guest runs (its serial counter).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use super::{Cluster, HostSpec, guest, host, wait_until};

/// Run `ip ARGS` (tests build their networks with it; the product does not):
/// its stderr on failure.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e} (is iproute2 installed?)"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

pub const QEMU: &str = "qemu-system-x86_64";

/// One test at a time: each runs two busy guests, and two cores shared by
/// several would starve the agents' timers.
pub static SERIAL: Mutex<()> = Mutex::new(());

/// The QEMU binary and this test's turn, or None (after saying so) when the
/// tests must skip.
pub fn qemu_or_skip(test: &str) -> Option<(PathBuf, MutexGuard<'static, ()>)> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(QEMU))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var("TERN_REQUIRE_QEMU").as_deref() != Ok("1"),
            "{test}: {QEMU} is not installed and TERN_REQUIRE_QEMU=1 \
             (apt-get install -y qemu-system-x86)"
        );
        eprintln!("{test}: skipped: {QEMU} not found (set TERN_REQUIRE_QEMU=1 to fail instead)");
    }
    let turn = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    found.map(|qemu| (qemu, turn))
}

/// TCG unless `TERN_TEST_ACCEL` says otherwise: under nested KVM (as on CI
/// machines) every first touch of a guest page is an expensive exit, and the
/// guest's RAM fill runs at a few MiB/s, while TCG fills it in a second.
pub fn accel() -> String {
    std::env::var("TERN_TEST_ACCEL").unwrap_or_else(|_| "tcg".into())
}

/// The test guest, assembled once per test binary.
pub fn guest_elf() -> &'static Path {
    static ELF: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, elf) = ELF.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let elf = guest::build(dir.path()).unwrap_or_else(|e| panic!("building the guest: {e}"));
        (dir, elf)
    });
    elf
}

/// The folder of storage `images`, shared by every host of every test (the
/// guest never writes its disk).
pub fn storage() -> &'static Path {
    static STORAGE: OnceLock<tempfile::TempDir> = OnceLock::new();
    STORAGE.get_or_init(|| tempfile::tempdir().unwrap()).path()
}

/// Who QEMU runs as: `nobody` when the tests run as root (QEMU's -runas
/// needs root to drop it), else the tests' own user.
pub fn run_as() -> Option<&'static str> {
    (unsafe { libc::geteuid() } == 0).then_some("nobody")
}

/// A QEMU host's config: top-level timers, then `[hypervisor]` (the test
/// guest's kernel folder, storage `images` and `networks`), then `extra`
/// (VMs, features).
pub fn qemu_host_with(
    name: &'static str,
    bandwidth_mib_s: u64,
    top: &str,
    networks: &str,
    extra: &str,
) -> HostSpec {
    qemu_host_as(name, run_as(), bandwidth_mib_s, top, networks, extra)
}

/// [`qemu_host_with`] with QEMU run as `run_as` (`None`: as the tests' own
/// user, root included).
pub fn qemu_host_as(
    name: &'static str,
    run_as: Option<&str>,
    bandwidth_mib_s: u64,
    top: &str,
    networks: &str,
    extra: &str,
) -> HostSpec {
    let run_as = run_as
        .map(|user| format!("run_as = \"{user}\"\n"))
        .unwrap_or_default();
    host(
        name,
        format!(
            "{top}\n[hypervisor]\nkind = \"qemu\"\naccel = \"{}\"\nbandwidth_mib_s = {bandwidth_mib_s}\n\
             downtime_limit_ms = 300\nmemory_mib = 8192\nvcpus = 8\nkernel_dir = {:?}\n{run_as}\
             [hypervisor.storage]\nimages = {:?}\n[hypervisor.networks]\n{networks}\n{extra}",
            accel(),
            guest_elf().parent().unwrap(),
            storage(),
        ),
    )
}

pub fn qemu_host(name: &'static str, bandwidth_mib_s: u64, top: &str, extra: &str) -> HostSpec {
    qemu_host_with(name, bandwidth_mib_s, top, "", extra)
}

/// The file name of the test guest's kernel in `kernel_dir`.
pub fn kernel_name() -> String {
    guest_elf()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// The raw image of `vm`'s disk in storage `images` (made if missing).
pub fn disk_image(vm: &str) -> PathBuf {
    let image = storage().join(format!("{vm}.img"));
    if !image.exists() {
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(16 << 20))
            .unwrap();
    }
    image
}

/// A `[[vm]]` running the test guest, with a disk and a required
/// port-profile, and `more` in its machine (NICs, say).
pub fn guest_vm_with(name: &str, memory_mib: u64, working_set_mib: u64, more: &str) -> String {
    guest_vm_featuring(
        name,
        memory_mib,
        working_set_mib,
        "{ name = \"port-profile\", required = true }",
        more,
    )
}

/// A `[[vm]]` running the test guest with `features` (TOML list items) and
/// `more` lines of its `[vm.qemu]` table (e.g. `nics = …`).
pub fn guest_vm_featuring(
    name: &str,
    memory_mib: u64,
    working_set_mib: u64,
    features: &str,
    more: &str,
) -> String {
    disk_image(name);
    format!(
        "[[vm]]\nname = \"{name}\"\nmemory_mib = {memory_mib}\nvcpus = 1\n\
         features = [{features}]\n\
         [vm.qemu]\nkernel = \"{}\"\nappend = \"{}\"\n\
         disks = [{{ storage = \"images\", path = \"{name}.img\" }}]\n{more}\n",
        kernel_name(),
        guest::cmdline(working_set_mib)
    )
}

/// A `[[vm]]` running the test guest, with a disk and a required port-profile.
pub fn guest_vm(name: &str, memory_mib: u64, working_set_mib: u64) -> String {
    guest_vm_with(name, memory_mib, working_set_mib, "")
}

pub fn port_profile(extra: &str) -> String {
    format!("[features.port-profile]\nswitch = \"sim\"\n{extra}\n\n")
}

/// The test VM's memory: every page of it is written before it migrates.
pub const GUEST_MIB: u64 = 128;

/// Two QEMU hosts, qa running `g1` (128 MiB, 8 MiB working set).
pub fn two_hosts(bandwidth_mib_s: u64, top: &str, qb_features: &str) -> QemuCluster {
    QemuCluster(Cluster::start(vec![
        qemu_host(
            "qa",
            bandwidth_mib_s,
            top,
            &(guest_vm("g1", GUEST_MIB, 8) + &port_profile("")),
        ),
        qemu_host("qb", bandwidth_mib_s, top, &port_profile(qb_features)),
    ]))
}

/// A cluster whose QEMU processes are killed with it: they outlive their
/// agents by design.
pub struct QemuCluster(pub Cluster);

impl std::ops::Deref for QemuCluster {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.0
    }
}

impl std::ops::DerefMut for QemuCluster {
    fn deref_mut(&mut self) -> &mut Cluster {
        &mut self.0
    }
}

impl Drop for QemuCluster {
    fn drop(&mut self) {
        for h in &self.0.hosts {
            for pid in qemu_pids(&self.0, &h.name) {
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            // The taps the agent made for its guests' NICs outlive them too.
            let list = qemu_dir(&self.0, &h.name).join("guests.json");
            let held: serde_json::Value = std::fs::read(list)
                .ok()
                .and_then(|text| serde_json::from_slice(&text).ok())
                .unwrap_or_default();
            let taps = held
                .as_object()
                .into_iter()
                .flat_map(|guests| guests.values())
                .filter_map(|guest| guest["taps"].as_array())
                .flatten()
                .filter_map(|tap| tap.as_str());
            for tap in taps {
                let _ = ip(&["link", "del", tap]);
            }
        }
    }
}

pub fn qemu_dir(cluster: &Cluster, host: &str) -> PathBuf {
    cluster.path().join(format!("{host}-state")).join("qemu")
}

/// The pids of QEMU processes whose pidfile is in this host's state_dir.
pub fn qemu_pids(cluster: &Cluster, host: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir(qemu_dir(cluster, host)) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|t| t.trim().parse().ok())
        .filter(|pid| Path::new(&format!("/proc/{pid}")).exists())
        .collect()
}

/// The last counter the guest printed on this host's serial file, if any.
pub fn counter(cluster: &Cluster, host: &str, vm: &str) -> Option<u64> {
    counts(cluster, host, vm).last().copied()
}

/// Every counter the guest printed on this host's serial file, oldest
/// first. A guest that left the host keeps its output as `VM.serial.prev`.
pub fn counts(cluster: &Cluster, host: &str, vm: &str) -> Vec<u64> {
    let dir = qemu_dir(cluster, host);
    let text = std::fs::read_to_string(dir.join(format!("{vm}.serial")))
        .or_else(|_| std::fs::read_to_string(dir.join(format!("{vm}.serial.prev"))))
        .unwrap_or_default();
    text.lines()
        .filter_map(|l| l.strip_prefix(guest::COUNT_LINE_PREFIX))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect()
}

/// The guest's counter advances on `host` (it runs there).
pub fn assert_runs_on(cluster: &Cluster, host: &str, vm: &str) {
    let before = counter(cluster, host, vm);
    wait_until(
        Duration::from_secs(10),
        &format!("{vm}'s counter to advance on {host} (from {before:?})"),
        || {
            let now = counter(cluster, host, vm);
            now.is_some() && now > before
        },
    );
}

/// The guest's counter stands still on `host` (its CPUs do not run there).
pub fn assert_still_on(cluster: &Cluster, host: &str, vm: &str) {
    let before = counter(cluster, host, vm);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        counter(cluster, host, vm),
        before,
        "{vm}'s counter moved on {host}, where it should not run"
    );
}

/// Wait until the guest has filled its RAM, so a migration carries it all.
pub fn wait_ready(cluster: &Cluster, host: &str, vm: &str) {
    wait_until(
        Duration::from_secs(60),
        &format!("{vm} on {host} to fill its RAM"),
        || counter(cluster, host, vm).is_some(),
    );
}

/// A host's one QEMU process as the kernel sees it.
pub struct QemuProcess {
    pub argv: Vec<String>,
    /// The files it holds open.
    pub open: Vec<PathBuf>,
    /// Its real user id.
    pub uid: u32,
}

pub fn qemu_process(cluster: &Cluster, host: &str) -> QemuProcess {
    // An agent accepts connections before it has booted its guests: give
    // a starting QEMU the time to write its pid file.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while qemu_pids(cluster, host).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let pids = qemu_pids(cluster, host);
    assert_eq!(
        pids.len(),
        1,
        "one QEMU on {host}: {pids:?}; its agent's log:\n{}",
        cluster.log(host)
    );
    let proc = PathBuf::from(format!("/proc/{}", pids[0]));
    let argv = std::fs::read(proc.join("cmdline"))
        .unwrap()
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let open = std::fs::read_dir(proc.join("fd"))
        .unwrap()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .collect();
    let status = std::fs::read_to_string(proc.join("status")).unwrap();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().next())
        .and_then(|uid| uid.parse().ok())
        .expect("a Uid line");
    QemuProcess { argv, open, uid }
}
