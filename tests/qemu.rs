//! Real QEMU guests migrated by real agents: the test guest
//! (guest/tern-guest.S) fills its RAM and keeps rewriting a working set,
//! printing its page counter to the serial port (`state_dir/qemu/VM.serial`)
//! about ten times a second. The counter advances only where the guest's
//! CPUs run, so a test tells which copy is alive by watching both files.
//!
//! The guest is a typed machine: its kernel by name in the hosts'
//! `kernel_dir`, a raw disk in storage `images` (one folder both hosts
//! share), and, run as root, QEMU drops to `nobody`. Every QEMU runs in its
//! seccomp sandbox.
//!
//! Two tests watch the migration stream on loopback with tcpdump, to show
//! that with `[tls]` it is TLS on the wire (and, as the control, that the
//! same capture sees a plaintext one).
//!
//! Four tests move a busy guest that pre-copy cannot finish (its working
//! set is dirty again at every pass over a slow link): a spent budget
//! without post-copy, post-copy `auto`, a finish failure before a
//! switchover, and a destination whose QEMU may not use userfaultfd (run as
//! nobody). Post-copy needs userfaultfd, which is root's only unless
//! `vm.unprivileged_userfaultfd` is 1, so the post-copy tests run QEMU as
//! the tests' own user (root), not as nobody.
//!
//! Without `qemu-system-x86_64` (or tcpdump, for those two) these tests
//! print that they were skipped; with `TERN_REQUIRE_QEMU=1` (as in CI) a
//! missing QEMU or tcpdump is a failure.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::qemu::*;
use common::{Cluster, guest, wait_until};
use tern::protocol::cookies;
use tern::protocol::machine::{Disk, DiskFormat, Nic, QemuMachine};
use tern::protocol::{Mode, VmSpec};

/// What `nobody` is called as a uid, from /etc/passwd.
fn nobody_uid() -> u32 {
    std::fs::read_to_string("/etc/passwd")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("nobody:x:"))
        .and_then(|rest| rest.split(':').next())
        .and_then(|uid| uid.parse().ok())
        .expect("a nobody user")
}

/// The destination built its own QEMU: the test guest's kernel from its
/// kernel_dir, the disk from its storage (open, so QEMU read it), in the
/// seccomp sandbox, and as `nobody` when run as root.
fn assert_built_by_its_host(cluster: &Cluster, host: &str, vm: &str) {
    let qemu = qemu_process(cluster, host);
    let args = qemu.argv.join(" ");
    let kernel = guest_elf().canonicalize().unwrap();
    assert!(
        args.contains(&format!("-kernel {}", kernel.display())),
        "{args}"
    );
    assert!(args.contains("-sandbox on,obsolete=deny,"), "{args}");
    assert!(args.contains("spawn=deny,resourcecontrol=deny"), "{args}");
    let image = disk_image(vm).canonicalize().unwrap();
    assert!(
        qemu.open.contains(&image),
        "{host}'s QEMU does not hold {} open: {:?}",
        image.display(),
        qemu.open
    );
    if run_as().is_some() {
        assert!(args.contains("-runas nobody"), "{args}");
        assert_eq!(qemu.uid, nobody_uid(), "{host}'s QEMU runs as nobody");
    }
}

/// The guests each host's agent reports: (host, state).
fn guests(cluster: &Cluster, vm: &str) -> Vec<(String, String)> {
    cluster.guests_of(vm)
}

#[test]
fn migration_moves_the_running_guest_and_its_memory() {
    let Some(_turn) = qemu_or_skip("migration_moves_the_running_guest_and_its_memory") else {
        return;
    };
    let cluster = two_hosts(1024, "", "");
    wait_ready(&cluster, "qa", "g1");
    assert_runs_on(&cluster, "qa", "g1");
    let (code, record) = cluster.tern_json(&["migrate", "g1", "--to", "qb", "--json"]);
    assert_eq!(code, 0, "{record}");
    assert_eq!(record["outcome"], "succeeded", "{record}");
    let transfer = &record["transfer"];
    // The guest wrote every page above 2 MiB: its RAM crossed the wire.
    assert!(
        transfer["bytes_transferred"].as_u64().unwrap() >= (GUEST_MIB - 2) << 20,
        "{record}"
    );
    assert!(transfer["iteration"].as_u64().unwrap() >= 1, "{record}");
    assert!(transfer["downtime_ms"].as_u64().unwrap() > 0, "{record}");
    assert_eq!(guests(&cluster, "g1"), [("qb".into(), "running".into())]);
    assert_runs_on(&cluster, "qb", "g1");
    assert_built_by_its_host(&cluster, "qb", "g1");
    // The source's copy stopped where the destination's went on, and its
    // QEMU is gone.
    assert_still_on(&cluster, "qa", "g1");
    assert!(counter(&cluster, "qb", "g1") > counter(&cluster, "qa", "g1"));
    assert!(qemu_pids(&cluster, "qa").is_empty());
}

#[test]
fn safe_mode_finish_failure_resumes_the_source() {
    let Some(_turn) = qemu_or_skip("safe_mode_finish_failure_resumes_the_source") else {
        return;
    };
    let cluster = two_hosts(1024, "", "fail = [\"finish\"]");
    wait_ready(&cluster, "qa", "g1");
    let (code, record) =
        cluster.tern_json(&["migrate", "g1", "--to", "qb", "--mode", "safe", "--json"]);
    assert_eq!(code, 1, "{record}");
    assert_eq!(record["outcome"], "failed", "{record}");
    assert_eq!(record["running_on"], "qa", "{record}");
    // The memory moved, then Finish failed: the source resumed.
    assert!(record["transfer"]["bytes_transferred"].as_u64().unwrap() >= (GUEST_MIB - 2) << 20);
    assert_eq!(guests(&cluster, "g1"), [("qa".into(), "running".into())]);
    assert_runs_on(&cluster, "qa", "g1");
    // The incoming QEMU was killed.
    wait_until(Duration::from_secs(5), "qb's QEMU to exit", || {
        qemu_pids(&cluster, "qb").is_empty()
    });
}

/// The destination's QEMU dies after the guest has arrived and the features
/// finished, right before the commit's `cont`: a hook on qb's finish stage
/// kills it. The resume fails, so the guest's CPUs never started there:
/// the destination says "not committed" and the source resumes its own
/// copy, which goes on counting. Before, the failed resume was only
/// logged, the destination answered "committed", and the source killed
/// the only copy left.
#[test]
fn the_destination_qemu_dying_before_cont_leaves_the_guest_running_on_the_source() {
    let Some(_turn) = qemu_or_skip(
        "the_destination_qemu_dying_before_cont_leaves_the_guest_running_on_the_source",
    ) else {
        return;
    };
    // The hook finds qb's QEMU of the VM by its pidfile's path on its
    // command line; on qa it does nothing.
    let killer = r#"[ "$TERN_STAGE" = finish ] || exit 0
for p in /proc/[0-9]*; do
  if grep -aq "qb-state/qemu/$TERN_VM.pid" "$p/cmdline" 2>/dev/null; then kill -9 "${p#/proc/}"; fi
done
echo "killed the QEMU of $TERN_VM""#;
    let hook = |script: &str| {
        format!(
            "[features.stop-qemu]\ndriver = \"exec\"\ncommand = [\"/bin/sh\", \"-c\", {script:?}]\n\n"
        )
    };
    let g1 = guest_vm("g1", GUEST_MIB, 8).replace(
        "features = [{ name = \"port-profile\", required = true }]",
        "features = [{ name = \"port-profile\", required = true }, { name = \"stop-qemu\" }]",
    );
    let cluster = QemuCluster(Cluster::start(vec![
        qemu_host("qa", 1024, "", &(g1 + &port_profile("") + &hook("exit 0"))),
        qemu_host("qb", 1024, "", &(port_profile("") + &hook(killer))),
    ]));
    wait_ready(&cluster, "qa", "g1");
    let (code, record) =
        cluster.tern_json(&["migrate", "g1", "--to", "qb", "--mode", "fast", "--json"]);
    assert_eq!(code, 1, "the move did not happen: {record}");
    assert_eq!(record["outcome"], "failed", "{record}");
    assert_eq!(record["running_on"], "qa", "{record}");
    assert_eq!(record["committed"], false, "{record}");
    let error = record["error"].as_str().unwrap_or("");
    assert!(
        error.contains("could not start the guest's CPUs on qb"),
        "the record names the failed resume: {record}"
    );
    // The memory had crossed: the failure came at the commit point.
    assert!(record["transfer"]["bytes_transferred"].as_u64().unwrap() >= (GUEST_MIB - 2) << 20);
    assert_eq!(guests(&cluster, "g1"), [("qa".into(), "running".into())]);
    assert_runs_on(&cluster, "qa", "g1");
    assert!(qemu_pids(&cluster, "qb").is_empty());
    let qb = common::host_of(&cluster.status(), "qb").clone();
    assert!(
        qb["feature_state"].as_array().unwrap().is_empty(),
        "qb undid what it set up: {qb}"
    );
}

/// A migration slow enough to act on in the middle of Perform: 128 MiB at
/// 8 MiB/s lasts about 16 s.
fn slow_pair() -> (QemuCluster, String) {
    let cluster = two_hosts(8, "", "");
    let id = migrate_g1_until_data_flows(&cluster);
    (cluster, id)
}

/// Once g1 filled its RAM, start moving it qa → qb and return when the
/// first MiBs have crossed.
fn migrate_g1_until_data_flows(cluster: &Cluster) -> String {
    wait_ready(cluster, "qa", "g1");
    let id = cluster.start_migration("g1", "qb", "safe");
    cluster.wait_phase(&id, "perform");
    wait_until(Duration::from_secs(10), "bytes to move", || {
        cluster.migration(&id)["transfer"]["bytes_transferred"]
            .as_u64()
            .unwrap_or(0)
            > 4 << 20
    });
    id
}

#[test]
fn abort_in_perform_cancels_and_resumes_the_source() {
    let Some(_turn) = qemu_or_skip("abort_in_perform_cancels_and_resumes_the_source") else {
        return;
    };
    let (cluster, id) = slow_pair();
    let record = cluster.abort_and_wait(&id);
    assert_eq!(record["outcome"], "aborted", "{record}");
    assert_eq!(guests(&cluster, "g1"), [("qa".into(), "running".into())]);
    assert_runs_on(&cluster, "qa", "g1");
    wait_until(Duration::from_secs(5), "qb's QEMU to exit", || {
        qemu_pids(&cluster, "qb").is_empty()
    });
}

#[test]
fn destination_qemu_killed_in_perform_fails_and_resumes_the_source() {
    let Some(_turn) =
        qemu_or_skip("destination_qemu_killed_in_perform_fails_and_resumes_the_source")
    else {
        return;
    };
    let (cluster, id) = slow_pair();
    let pids = qemu_pids(&cluster, "qb");
    assert_eq!(pids.len(), 1, "one incoming QEMU on qb");
    unsafe {
        libc::kill(pids[0], libc::SIGKILL);
    }
    let record = cluster.wait_outcome(&id);
    assert_eq!(record["outcome"], "failed", "{record}");
    assert_eq!(record["running_on"], "qa", "{record}");
    let error = record["error"].as_str().unwrap_or("");
    assert!(error.contains("transfer failed"), "{record}");
    assert_eq!(guests(&cluster, "g1"), [("qa".into(), "running".into())]);
    assert_runs_on(&cluster, "qa", "g1");
}

#[test]
fn destination_agent_killed_in_perform_resumes_the_source() {
    let Some(_turn) = qemu_or_skip("destination_agent_killed_in_perform_resumes_the_source") else {
        return;
    };
    let (mut cluster, id) = slow_pair();
    cluster.kill("qb");
    // The source gives the silent peer up (peer_timeout 1.5 s) and resumes.
    let record = cluster.wait_outcome(&id);
    assert!(
        ["failed", "aborted"].contains(&record["outcome"].as_str().unwrap()),
        "{record}"
    );
    assert_eq!(record["running_on"], "qa", "{record}");
    assert_runs_on(&cluster, "qa", "g1");
    // The restarted destination agent finds its incoming QEMU and drops it.
    cluster.start_agent("qb");
    wait_until(Duration::from_secs(15), "qb's incoming QEMU to go", || {
        qemu_pids(&cluster, "qb").is_empty()
    });
    assert_eq!(guests(&cluster, "g1"), [("qa".into(), "running".into())]);
}

#[test]
fn a_restarted_agent_re_attaches_to_its_running_guests() {
    let Some(_turn) = qemu_or_skip("a_restarted_agent_re_attaches_to_its_running_guests") else {
        return;
    };
    let mut cluster = two_hosts(1024, "", "");
    wait_ready(&cluster, "qa", "g1");
    let before = qemu_pids(&cluster, "qa");
    assert_eq!(before.len(), 1);
    cluster.kill("qa");
    // The guest keeps running without its agent.
    assert_runs_on(&cluster, "qa", "g1");
    cluster.start_agent("qa");
    assert_eq!(qemu_pids(&cluster, "qa"), before, "the same QEMU process");
    assert_eq!(guests(&cluster, "g1"), [("qa".into(), "running".into())]);
    assert!(cluster.log("qa").contains("re-attached to QEMU"));
    // And it is fully usable: it migrates.
    let (code, record) = cluster.tern_json(&["migrate", "g1", "--to", "qb", "--json"]);
    assert_eq!(code, 0, "{record}");
    assert_runs_on(&cluster, "qb", "g1");
}

// ---- the link cut between two network namespaces ----------------------------

/// Two namespaces joined by a veth pair, removed on drop.
struct Namespaces {
    names: [String; 2],
}

impl Namespaces {
    /// `tern-qa-PID` at 10.201.0.1/24 and `tern-qb-PID` at 10.201.0.2/24.
    fn create() -> Result<Namespaces, String> {
        let pid = std::process::id();
        let names = [format!("tern-qa-{pid}"), format!("tern-qb-{pid}")];
        let ns = Namespaces { names };
        let [a, b] = &ns.names;
        let (va, vb) = (
            format!("tqa{}", pid % 100_000),
            format!("tqb{}", pid % 100_000),
        );
        ip(&["netns", "add", a])?;
        ip(&["netns", "add", b])?;
        ip(&[
            "link", "add", &va, "netns", a, "type", "veth", "peer", "name", &vb, "netns", b,
        ])?;
        ip(&["-n", a, "addr", "add", "10.201.0.1/24", "dev", &va])?;
        ip(&["-n", b, "addr", "add", "10.201.0.2/24", "dev", &vb])?;
        for (n, v) in [(a, &va), (b, &vb)] {
            ip(&["-n", n, "link", "set", v, "up"])?;
            ip(&["-n", n, "link", "set", "lo", "up"])?;
        }
        Ok(ns)
    }

    /// Take qa's end of the link down (or up again).
    fn link(&self, up: bool) {
        let v = format!("tqa{}", std::process::id() % 100_000);
        ip(&[
            "-n",
            &self.names[0],
            "link",
            "set",
            &v,
            if up { "up" } else { "down" },
        ])
        .unwrap();
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = ip(&["netns", "del", n]);
        }
    }
}

#[test]
fn a_cut_link_stalls_the_transfer_and_the_source_resumes() {
    let test = "a_cut_link_stalls_the_transfer_and_the_source_resumes";
    let Some(_turn) = qemu_or_skip(test) else {
        return;
    };
    let ns = match Namespaces::create() {
        Ok(ns) => ns,
        Err(e) => {
            assert!(
                std::env::var("TERN_REQUIRE_QEMU").as_deref() != Ok("1"),
                "{test}: cannot create network namespaces: {e}"
            );
            eprintln!("{test}: skipped: cannot create network namespaces: {e}");
            return;
        }
    };
    // Heartbeats would also notice the cut; a long peer timeout leaves it to
    // the stall detector, which is what this test is about.
    let top = "stall_timeout_ms = 2000\n";
    let cluster = QemuCluster(Cluster::start_in_namespaces(
        vec![
            qemu_host(
                "qa",
                8,
                top,
                &(guest_vm("g1", GUEST_MIB, 8) + &port_profile("")),
            ),
            qemu_host("qb", 8, top, &port_profile("")),
        ],
        &[
            (ns.names[0].as_str(), "10.201.0.1"),
            (ns.names[1].as_str(), "10.201.0.2"),
        ],
        // Plaintext on the namespaces' addresses: these agents have no [tls].
        "insecure = true\nheartbeat_interval_ms = 200\npeer_timeout_ms = 60000\nrollback_retry_ms = 600000\n",
    ));
    // Plaintext on a network address is said loudly: in the log and in
    // every `tern status`.
    let status = cluster.status();
    for host in ["qa", "qb"] {
        let h = common::host_of(&status, host);
        assert_eq!(h["security"], "insecure", "{h}");
        assert!(
            h["warnings"][0]
                .as_str()
                .unwrap_or("")
                .starts_with("INSECURE"),
            "{h}"
        );
        assert!(
            cluster.log(host).contains("INSECURE"),
            "{}",
            cluster.log(host)
        );
    }
    let id = migrate_g1_until_data_flows(&cluster);
    ns.link(false);
    let record = cluster.wait_outcome(&id);
    assert_eq!(record["outcome"], "failed", "{record}");
    assert_eq!(record["running_on"], "qa", "{record}");
    let error = record["error"].as_str().unwrap_or("");
    assert!(error.contains("no progress"), "{record}");
    assert_runs_on(&cluster, "qa", "g1");
    ns.link(true);
}

// ---- what a destination does not allow ---------------------------------------

/// The processes whose command line names guest `vm`'s QEMU (`guest=VM`).
fn qemu_processes_of(vm: &str) -> Vec<i32> {
    let needle = format!("guest={vm}");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).split('\0').any(|a| a == needle))
                .unwrap_or(false)
        })
        .collect()
}

/// A C1 for guest `intruder` from qa, with `machine` as its qemu table.
fn c1_with(machine: QemuMachine, attempt: &str) -> tern::proto::Cookie1 {
    let vm = VmSpec {
        name: "intruder".into(),
        memory_mib: 64,
        vcpus: 1,
        dirty_rate_mib_s: 0,
        features: vec![],
        qemu: Some(machine),
    };
    let (migration, _) = attempt.split_once('.').unwrap();
    cookies::cookie1(attempt, migration, "qa", &vm, Mode::Fast)
}

fn raw_disk(storage: &str, path: &str) -> Disk {
    Disk {
        storage: storage.into(),
        path: path.into(),
        format: DiskFormat::Raw,
        readonly: false,
    }
}

/// A raw `Peer.Prepare`, as a compromised or mistaken source could send it,
/// whose machine names what qb does not allow: each is refused as
/// InvalidArgument naming the field, and no QEMU starts (no process, no
/// file in qb's QEMU folder, no attempt). The same C1 with what qb does
/// allow starts one, so the check, and nothing else, is what kept it out.
#[test]
fn prepare_refuses_a_machine_the_destination_does_not_allow_and_starts_no_qemu() {
    let Some(_turn) =
        qemu_or_skip("prepare_refuses_a_machine_the_destination_does_not_allow_and_starts_no_qemu")
    else {
        return;
    };
    let cluster = two_hosts(1024, "", "");
    let kernel = kernel_name();
    let cases = [
        (
            QemuMachine {
                kernel: kernel.clone(),
                disks: vec![raw_disk("scratch", "intruder.img")],
                ..QemuMachine::default()
            },
            "vm intruder: qemu.disks[0].storage \"scratch\" is not a storage of qb (it has: images)",
        ),
        (
            QemuMachine {
                kernel: "../../etc/shadow".into(),
                ..QemuMachine::default()
            },
            "vm intruder: qemu.kernel \"../../etc/shadow\" is a path",
        ),
        (
            QemuMachine {
                kernel: kernel.clone(),
                disks: vec![raw_disk("images", "../../../../etc/shadow")],
                ..QemuMachine::default()
            },
            "vm intruder: qemu.disks[0].path \"../../../../etc/shadow\" leaves its storage",
        ),
        (
            QemuMachine {
                kernel: "bzImage".into(),
                ..QemuMachine::default()
            },
            "vm intruder: qemu.kernel \"bzImage\" is not a kernel of qb",
        ),
        (
            QemuMachine {
                kernel: kernel.clone(),
                nics: vec![Nic {
                    mac: "52:54:00:00:00:01".into(),
                    network: "dmz".into(),
                    vlan: None,
                    vsi: None,
                }],
                ..QemuMachine::default()
            },
            "vm intruder: qemu.nics[0].network \"dmz\" is not a network of qb (it has none)",
        ),
    ];
    for (i, (machine, expected)) in cases.into_iter().enumerate() {
        let status = common::call_prepare(
            &cluster,
            "qb",
            &c1_with(machine, &format!("m-00000000000a.{}", i + 1)),
        )
        .expect_err("qb accepted a machine it does not allow");
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().starts_with(expected),
            "expected {expected:?}, got {:?}",
            status.message()
        );
    }
    let leftovers: Vec<String> = std::fs::read_dir(qemu_dir(&cluster, "qb"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("intruder."))
        .collect();
    assert!(leftovers.is_empty(), "qb made {leftovers:?}");
    assert!(qemu_pids(&cluster, "qb").is_empty());
    assert!(qemu_processes_of("intruder").is_empty());
    assert!(
        cluster.status()["migrations"]
            .as_array()
            .unwrap()
            .is_empty(),
        "a refused Prepare left an attempt: {}",
        cluster.status()
    );

    // The control: what qb allows does start a QEMU (which qb drops again
    // when no source heartbeats reach it).
    disk_image("intruder");
    let allowed = QemuMachine {
        kernel,
        append: guest::cmdline(8),
        disks: vec![raw_disk("images", "intruder.img")],
        ..QemuMachine::default()
    };
    common::call_prepare(&cluster, "qb", &c1_with(allowed, "m-00000000000b.1"))
        .expect("qb refused a machine it allows");
    assert_eq!(qemu_processes_of("intruder").len(), 1);
    wait_until(
        Duration::from_secs(15),
        "qb to drop the sourceless guest",
        || qemu_processes_of("intruder").is_empty(),
    );
}

// ---- the migration stream on the wire ----------------------------------------

/// The first eight bytes of QEMU's plaintext migration stream: its magic
/// `QEVM` (QEMU_VM_FILE_MAGIC) and format version 3. Eight bytes, because
/// four random ones turn up in 128 MiB of ciphertext about once in thirty
/// runs, and eight never do.
const STREAM_HEADER: [u8; 8] = [0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3];

/// What the test guest leaves in a page above its working set: every
/// dword holds the page's address. Four of them, little-endian, for the
/// page at 100 MiB: the guest's memory as plaintext would carry it.
fn guest_page_bytes() -> Vec<u8> {
    (100u32 << 20).to_le_bytes().repeat(4)
}

/// tcpdump, or None (after saying so) when the test must skip; with
/// `TERN_REQUIRE_QEMU=1` (CI, whose `.ci/run` installs it) a missing
/// tcpdump is a failure.
fn tcpdump_or_skip(test: &str) -> Option<PathBuf> {
    let found = ["/usr/bin/tcpdump", "/usr/sbin/tcpdump", "/sbin/tcpdump"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var("TERN_REQUIRE_QEMU").as_deref() != Ok("1"),
            "{test}: tcpdump is not installed and TERN_REQUIRE_QEMU=1 (apt-get install -y tcpdump)"
        );
        eprintln!("{test}: skipped: tcpdump not found (set TERN_REQUIRE_QEMU=1 to fail instead)");
    }
    found
}

/// tcpdump writing every TCP packet on loopback, whole, into a file.
struct Capture {
    child: std::process::Child,
    pcap: PathBuf,
    log: PathBuf,
}

impl Capture {
    fn start(tcpdump: &Path, dir: &Path) -> Capture {
        let (pcap, log) = (dir.join("lo.pcap"), dir.join("tcpdump.log"));
        let child = Command::new(tcpdump)
            .args(["-i", "lo", "-n", "-s", "0", "-B", "65536", "-U", "-w"])
            .arg(&pcap)
            .arg("tcp")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let capture = Capture { child, pcap, log };
        wait_until(Duration::from_secs(10), "tcpdump to listen", || {
            capture.said().contains("listening on lo")
        });
        capture
    }

    fn said(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stop it (tcpdump flushes on SIGINT) and read back what it saw:
    /// every direction of every TCP connection, and what tcpdump said.
    fn finish(mut self) -> (Vec<Flow>, String) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGINT);
        }
        self.child.wait().unwrap();
        let flows = flows(&std::fs::read(&self.pcap).unwrap());
        (flows, self.said())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One direction of one TCP connection: its payload in sequence order.
struct Flow {
    from_port: u16,
    to_port: u16,
    bytes: Vec<u8>,
    /// Stretches of the sequence space the capture does not hold.
    holes: usize,
}

impl Flow {
    fn contains(&self, needle: &[u8]) -> bool {
        self.bytes.windows(needle.len()).any(|w| w == needle)
    }
}

/// The TCP flows of a pcap file of loopback (Ethernet frames, IPv4).
fn flows(pcap: &[u8]) -> Vec<Flow> {
    let u32_at = |b: &[u8], i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
    let be16 = |b: &[u8], i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
    let be32 = |b: &[u8], i: usize| u32::from_be_bytes(b[i..i + 4].try_into().unwrap());
    assert!(
        matches!(u32_at(pcap, 0), 0xa1b2c3d4 | 0xa1b23c4d),
        "not a little-endian pcap file"
    );
    assert_eq!(u32_at(pcap, 20), 1, "loopback is captured as Ethernet");
    // (from, to) ports → first sequence number, and payload by offset.
    type Key = (u16, u16);
    let mut start: std::collections::HashMap<Key, u32> = Default::default();
    let mut segments: std::collections::HashMap<Key, std::collections::BTreeMap<u32, &[u8]>> =
        Default::default();
    let mut at = 24;
    while at + 16 <= pcap.len() {
        let (caught, sent) = (
            u32_at(pcap, at + 8) as usize,
            u32_at(pcap, at + 12) as usize,
        );
        let frame = &pcap[at + 16..at + 16 + caught];
        at += 16 + caught;
        assert_eq!(caught, sent, "tcpdump cut a packet short");
        if be16(frame, 12) != 0x0800 || frame[14 + 9] != 6 {
            continue; // not IPv4, or not TCP
        }
        let ip = &frame[14..];
        let ip_header = usize::from(ip[0] & 0x0f) * 4;
        let ip_len = usize::from(be16(ip, 2));
        let tcp = &ip[ip_header..ip_len];
        let key = (be16(tcp, 0), be16(tcp, 2));
        let seq = be32(tcp, 4);
        let syn = tcp[13] & 0x02 != 0;
        let payload = &tcp[usize::from(tcp[12] >> 4) * 4..];
        let first = *start
            .entry(key)
            .or_insert(if syn { seq.wrapping_add(1) } else { seq });
        if !payload.is_empty() {
            segments
                .entry(key)
                .or_default()
                .entry(seq.wrapping_sub(first))
                .or_insert(payload);
        }
    }
    segments
        .into_iter()
        .map(|((from_port, to_port), parts)| {
            let (mut bytes, mut holes) = (Vec::new(), 0);
            for (offset, part) in parts {
                let offset = offset as usize;
                if offset > bytes.len() {
                    holes += 1;
                    bytes.resize(offset, 0);
                }
                let skip = bytes.len() - offset;
                if skip < part.len() {
                    bytes.extend_from_slice(&part[skip..]);
                }
            }
            Flow {
                from_port,
                to_port,
                bytes,
                holes,
            }
        })
        .collect()
}

/// Migrate g1 from qa to qb while tcpdump watches loopback: the stream
/// from qa's QEMU (the one flow that carried the guest's memory), the
/// other flows (qb's answers on that connection among them, if it sent
/// any), and what tcpdump said.
fn capture_migration(cluster: &Cluster, tcpdump: &Path) -> (Flow, Vec<Flow>, String) {
    wait_ready(cluster, "qa", "g1");
    let capture = Capture::start(tcpdump, cluster.path());
    let (code, record) = cluster.tern_json(&["migrate", "g1", "--to", "qb", "--json"]);
    let (mut flows, said) = capture.finish();
    assert_eq!(code, 0, "{record}");
    assert_runs_on(cluster, "qb", "g1");
    let memory = (GUEST_MIB - 2) << 20;
    let big: Vec<usize> = (0..flows.len())
        .filter(|&i| flows[i].bytes.len() as u64 >= memory)
        .collect();
    assert_eq!(big.len(), 1, "one flow carried the guest; tcpdump: {said}");
    let stream = flows.swap_remove(big[0]);
    // It went to the port qb named in C2.
    let c2 = record["cookies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "C2")
        .and_then(|c| c["summary"].as_str())
        .unwrap_or_default();
    let port = c2
        .split_whitespace()
        .find_map(|word| word.trim_end_matches(';').strip_prefix("tcp:127.0.0.1:"))
        .and_then(|port| port.parse::<u16>().ok());
    assert_eq!(port, Some(stream.to_port), "C2: {c2}");
    assert_eq!(
        stream.holes, 0,
        "the capture missed part of the migration; tcpdump: {said}"
    );
    (stream, flows, said)
}

/// The control for the test below: the same capture of a migration
/// without `[tls]` does see QEMU's stream header at its start and the
/// guest's memory in it, so that test can fail.
#[test]
fn without_tls_the_capture_sees_the_plaintext_stream_and_the_guests_memory() {
    let test = "without_tls_the_capture_sees_the_plaintext_stream_and_the_guests_memory";
    let Some(_turn) = qemu_or_skip(test) else {
        return;
    };
    let Some(tcpdump) = tcpdump_or_skip(test) else {
        return;
    };
    let cluster = two_hosts(64, "", "");
    let (stream, _, _) = capture_migration(&cluster, &tcpdump);
    assert!(
        stream.bytes.starts_with(&STREAM_HEADER),
        "{:02x?}",
        &stream.bytes[..16]
    );
    assert!(stream.contains(&guest_page_bytes()));
}

/// Two agents with identities from the cluster CA (`Cluster::start_tls`)
/// migrate the test guest over QEMU's TLS: on the wire, both directions of
/// the migration connection begin with a TLS handshake record (0x16 0x03),
/// and no flow on loopback carries QEMU's stream header or the guest's
/// memory in the clear. QEMU runs as nobody, reading its copy of the
/// host's identity, which nobody else can read.
#[test]
fn with_tls_the_migration_stream_is_tls_on_the_wire() {
    let test = "with_tls_the_migration_stream_is_tls_on_the_wire";
    let Some(_turn) = qemu_or_skip(test) else {
        return;
    };
    let Some(tcpdump) = tcpdump_or_skip(test) else {
        return;
    };
    let cluster = QemuCluster(Cluster::start_tls(vec![
        qemu_host(
            "qa",
            64,
            "",
            &(guest_vm("g1", GUEST_MIB, 8) + &port_profile("")),
        ),
        qemu_host("qb", 64, "", &port_profile("")),
    ]));
    let (stream, others, said) = capture_migration(&cluster, &tcpdump);
    // TLS makes qb's QEMU talk back on the connection (a plaintext
    // destination sends nothing).
    let answer = others
        .iter()
        .find(|f| (f.from_port, f.to_port) == (stream.to_port, stream.from_port))
        .expect("qb's QEMU answered on the migration connection");
    for (flow, side) in [(&stream, "qa's QEMU"), (answer, "qb's QEMU")] {
        assert_eq!(
            flow.bytes.get(..2),
            Some(&[0x16, 0x03][..]),
            "{side} began with {:02x?}, not a TLS handshake record",
            &flow.bytes[..flow.bytes.len().min(16)]
        );
    }
    for flow in others.iter().chain([&stream]) {
        assert!(
            !flow.contains(&STREAM_HEADER),
            "port {} -> {} carries QEMU's plaintext stream header; tcpdump: {said}",
            flow.from_port,
            flow.to_port
        );
        assert!(
            !flow.contains(&guest_page_bytes()),
            "port {} -> {} carries the guest's memory in the clear",
            flow.from_port,
            flow.to_port
        );
    }
    // Not even QEMU's four-byte magic where the plaintext stream starts.
    assert!(!stream.bytes[..64 << 10].windows(4).any(|w| w == b"QEVM"));
    // QEMU's copy of the identity: the folder and files are its user's alone.
    for host in ["qa", "qb"] {
        let tls = qemu_dir(&cluster, host).join("tls");
        for file in ["ca-cert.pem", "server-key.pem", "client-key.pem"] {
            use std::os::unix::fs::MetadataExt;
            let meta = std::fs::metadata(tls.join(file)).unwrap();
            assert_eq!(meta.mode() & 0o777, 0o400, "{host} {file}");
            if run_as().is_some() {
                assert_eq!(meta.uid(), nobody_uid(), "{host} {file}");
            }
        }
    }
}

/// qa's inventory says qb's migration address is 127.0.0.2, but qb's QEMU
/// listens on 127.0.0.1: qa refuses qb's C2 before sending anything, says
/// which two addresses disagree, and qb, told to abort, drops its incoming
/// QEMU. The guest never stopped running on qa.
#[test]
fn a_destination_naming_an_address_outside_its_migration_address_gets_nothing() {
    let test = "a_destination_naming_an_address_outside_its_migration_address_gets_nothing";
    let Some(_turn) = qemu_or_skip(test) else {
        return;
    };
    let mut cluster = two_hosts(1024, "", "");
    wait_ready(&cluster, "qa", "g1");
    // qa reads the inventory at start: restart it on one that says so. Its
    // QEMU outlives it and is re-attached.
    let inventory = std::fs::read_to_string(&cluster.inventory).unwrap();
    let qb = format!("name = \"qb\"\naddress = \"{}\"\n", cluster.address("qb"));
    assert!(inventory.contains(&qb), "{inventory}");
    let moved = inventory.replace(&qb, &format!("{qb}migration_address = \"127.0.0.2\"\n"));
    cluster.kill("qa");
    std::fs::write(&cluster.inventory, moved).unwrap();
    cluster.start_agent("qa");
    assert_runs_on(&cluster, "qa", "g1");

    let (code, record) = cluster.tern_json(&["migrate", "g1", "--to", "qb", "--json"]);
    assert_eq!(code, 1, "{record}");
    assert_eq!(record["outcome"], "failed", "{record}");
    let error = record["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("tcp:127.0.0.1:") && error.contains("127.0.0.2"),
        "the error names both addresses: {error}"
    );
    assert_eq!(
        common::phase(&record, "prepare")["status"],
        "failed",
        "{record}"
    );
    assert_eq!(
        common::phase(&record, "perform")["status"],
        "skipped",
        "{record}"
    );
    assert!(record["transfer"].is_null(), "nothing was sent: {record}");
    wait_until(
        Duration::from_secs(10),
        "qb to drop its incoming QEMU",
        || qemu_pids(&cluster, "qb").is_empty(),
    );
    assert_eq!(guests(&cluster, "g1"), [("qa".into(), "running".into())]);
    assert_runs_on(&cluster, "qa", "g1");
}

// ---- completion: a guest that pre-copy cannot finish ------------------------

/// The busy guest: 64 MiB, rewriting a 16 MiB working set many times a
/// second (a pass over it takes the TCG vCPU about 10 ms), behind a
/// 16 MiB/s cap. Pre-copy's first pass takes about 4 s; every later pass
/// finds the whole working set dirty again, far more than the 4.8 MiB the
/// 300 ms downtime limit lets the final pass carry.
const BUSY_MIB: u64 = 64;
const BUSY_WS_MIB: u64 = 16;
const BUSY_BANDWIDTH_MIB_S: u64 = 16;

/// Two QEMU hosts with QEMU run as `run_as`, qa running the busy guest
/// `g1`; qb's port-profile takes `qb_features`.
fn busy_hosts(run_as: Option<&str>, qb_features: &str) -> QemuCluster {
    QemuCluster(Cluster::start(vec![
        qemu_host_as(
            "qa",
            run_as,
            BUSY_BANDWIDTH_MIB_S,
            "",
            "",
            &(guest_vm("g1", BUSY_MIB, BUSY_WS_MIB) + &port_profile("")),
        ),
        qemu_host_as(
            "qb",
            run_as,
            BUSY_BANDWIDTH_MIB_S,
            "",
            "",
            &port_profile(qb_features),
        ),
    ]))
}

/// Post-copy needs userfaultfd in the destination's QEMU: as root it has
/// it; as another user only with `vm.unprivileged_userfaultfd` = 1. When
/// neither holds, the post-copy tests skip (fail with
/// `TERN_REQUIRE_QEMU=1`).
fn userfaultfd_or_skip(test: &str) -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    if root || unprivileged_userfaultfd() {
        return true;
    }
    assert!(
        std::env::var("TERN_REQUIRE_QEMU").as_deref() != Ok("1"),
        "{test}: post-copy needs root or vm.unprivileged_userfaultfd = 1"
    );
    eprintln!("{test}: skipped: post-copy needs root or vm.unprivileged_userfaultfd = 1");
    false
}

fn unprivileged_userfaultfd() -> bool {
    std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd").is_ok_and(|v| v.trim() == "1")
}

/// Start a fast-mode migration of `vm` to `to` that switches to post-copy at
/// once; its id.
fn postcopy_now(cluster: &Cluster, vm: &str, to: &str) -> String {
    let (code, started) = cluster.tern_json(&[
        "migrate",
        vm,
        "--to",
        to,
        "--mode",
        "fast",
        "--postcopy",
        "now",
        "--no-wait",
        "--json",
    ]);
    assert_eq!(code, 0, "{started}");
    started["id"].as_str().unwrap().to_string()
}

/// The guest's counter goes on on `to` from where it stood on `from`: the
/// first count `to` printed is at least the last one `from` did (its memory
/// came along, the counter with it), and it keeps going up.
fn assert_counts_on_from_where_it_was(cluster: &Cluster, from: &str, to: &str, vm: &str) {
    assert_runs_on(cluster, to, vm);
    let (before, after) = (counts(cluster, from, vm), counts(cluster, to, vm));
    let (last, first) = (before.last().copied(), after.first().copied());
    assert!(
        last.is_some() && first >= last,
        "{vm} printed {last:?} last on {from} and {first:?} first on {to}"
    );
    assert!(
        after.windows(2).all(|w| w[0] <= w[1]),
        "{vm}'s counter went back on {to}: {after:?}"
    );
}

/// Nothing ran on `host`, and nothing is left there: no count printed, no
/// QEMU, no port-profile association.
fn assert_never_ran_on(cluster: &Cluster, host: &str, vm: &str) {
    wait_until(
        Duration::from_secs(10),
        &format!("{host}'s QEMU to exit and its port-profile to be undone"),
        || qemu_pids(cluster, host).is_empty() && cluster.feature_state(host, vm).is_empty(),
    );
    assert_eq!(counts(cluster, host, vm), [0u64; 0], "{vm} ran on {host}");
}

/// Pre-copy only, with a budget of 8 s (128 s per GiB of 64 MiB): the
/// working set is dirty again at every pass, the budget runs out, and the
/// attempt fails as a transfer failure naming it. The guest goes on
/// running on the source; nothing ran on the destination.
#[test]
fn postcopy_never_with_a_spent_budget_fails_and_the_guest_keeps_running_on_the_source() {
    let test = "postcopy_never_with_a_spent_budget_fails_and_the_guest_keeps_running_on_the_source";
    let Some(_turn) = qemu_or_skip(test) else {
        return;
    };
    let cluster = busy_hosts(run_as(), "");
    wait_ready(&cluster, "qa", "g1");
    let (code, record) = cluster.tern_json(&[
        "migrate",
        "g1",
        "--to",
        "qb",
        "--mode",
        "fast",
        "--postcopy",
        "never",
        "--completion-timeout-per-gib",
        "128",
        "--json",
    ]);
    assert_eq!(code, 1, "{record}");
    assert_eq!(record["outcome"], "failed", "{record}");
    assert_eq!(record["cause"]["kind"], "stall", "{record}");
    assert_eq!(record["cause"]["side"], "source", "{record}");
    assert_eq!(record["running_on"], "qa", "{record}");
    assert_eq!(record["completion"]["postcopy"], "never", "{record}");
    let error = record["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("not done within its budget of 8 s (128 s per GiB of 64 MiB)"),
        "the error names the budget: {error}"
    );
    // It gave up in Perform, in pre-copy, after the first pass.
    assert_eq!(
        common::phase(&record, "perform")["status"],
        "failed",
        "{record}"
    );
    let transfer = &record["transfer"];
    assert_eq!(transfer["stage"], "precopy", "{record}");
    assert!(transfer["iteration"].as_u64().unwrap() >= 2, "{record}");
    assert!(
        transfer["bytes_transferred"].as_u64().unwrap() > (BUSY_MIB - 2) << 20,
        "{record}"
    );
    assert_eq!(guests(&cluster, "g1"), [("qa".into(), "running".into())]);
    assert_runs_on(&cluster, "qa", "g1");
    assert_never_ran_on(&cluster, "qb", "g1");
}

/// Fast mode's post-copy `auto` finishes the move pre-copy cannot: the
/// source switches over (the note says after how long and why), the guest
/// runs on the destination from where it stood, and the source's QEMU is
/// gone once the last page has followed. QEMU runs as root here:
/// userfaultfd is root's only.
#[test]
fn postcopy_auto_moves_a_guest_pre_copy_cannot_and_it_goes_on_from_where_it_was() {
    let test = "postcopy_auto_moves_a_guest_pre_copy_cannot_and_it_goes_on_from_where_it_was";
    let Some(_turn) = qemu_or_skip(test) else {
        return;
    };
    if !userfaultfd_or_skip(test) {
        return;
    }
    let cluster = busy_hosts(None, "");
    wait_ready(&cluster, "qa", "g1");
    assert_runs_on(&cluster, "qa", "g1");
    let (code, record) = cluster.tern_json(&[
        "migrate",
        "g1",
        "--to",
        "qb",
        "--mode",
        "fast",
        "--postcopy",
        "auto",
        "--json",
    ]);
    assert_eq!(code, 0, "{record}");
    assert_eq!(record["outcome"], "succeeded", "{record}");
    assert_eq!(record["running_on"], "qb", "{record}");
    assert_eq!(record["committed"], true, "{record}");
    assert_eq!(record["completion"]["postcopy"], "auto", "{record}");
    let transfer = &record["transfer"];
    assert_eq!(transfer["stage"], "postcopy", "{record}");
    assert_eq!(transfer["bytes_remaining"], 0, "{record}");
    // The guest ran on qb before all of it had arrived: it asked for pages.
    assert!(
        transfer["postcopy_requests"].as_u64().unwrap() > 0,
        "{record}"
    );
    // Why it switched: the convergence model's verdict, or the budget
    // (150 s per GiB of 64 MiB: 9.4 s). QEMU measures the dirty rate as the
    // pages found dirty again at each bitmap sync, which cannot outrun what
    // the link carried between two syncs: with this guest both rates come
    // out equal, and the model mostly says "slow" (net progress a few
    // KiB/s) rather than "not converging", so the budget decides.
    let note = record["completion_note"].as_str().unwrap_or_default();
    assert!(note.starts_with("post-copy after "), "{record}");
    assert!(
        note.contains("pre-copy cannot converge: ")
            || note.contains("not done within its budget of 9.4 s (150 s per GiB of 64 MiB)"),
        "the note says why: {note}"
    );
    assert!(
        ["not_converging", "slow"].contains(&record["convergence"]["verdict"].as_str().unwrap()),
        "{record}"
    );
    // The features finished on qb before the switch and were released on qa.
    let pp = common::feature(&record, "port-profile");
    assert_eq!(pp["finish"], "ok", "{record}");
    assert_eq!(pp["release"], "ok", "{record}");
    assert_eq!(guests(&cluster, "g1"), [("qb".into(), "running".into())]);
    assert_counts_on_from_where_it_was(&cluster, "qa", "qb", "g1");
    assert!(qemu_pids(&cluster, "qa").is_empty(), "qa's QEMU is gone");
    assert_still_on(&cluster, "qa", "g1");
}

/// Safe mode asks for post-copy at once, but qb's port-profile fails its
/// finish stage, which runs before the switchover: the source never
/// switches, the destination rolls back, and the guest, never stopped,
/// goes on counting on qa. Nothing ran on qb.
#[test]
fn postcopy_now_with_a_failing_finish_never_switches_and_the_guest_stays_on_the_source() {
    let test =
        "postcopy_now_with_a_failing_finish_never_switches_and_the_guest_stays_on_the_source";
    let Some(_turn) = qemu_or_skip(test) else {
        return;
    };
    if !userfaultfd_or_skip(test) {
        return;
    }
    let cluster = busy_hosts(None, "fail = [\"finish\"]");
    wait_ready(&cluster, "qa", "g1");
    let (code, record) = cluster.tern_json(&[
        "migrate",
        "g1",
        "--to",
        "qb",
        "--mode",
        "safe",
        "--postcopy",
        "now",
        "--json",
    ]);
    assert_eq!(code, 1, "{record}");
    assert_eq!(record["outcome"], "failed", "{record}");
    // A "peer_lost ... no longer knows this attempt" here is a race in the
    // source: qb's answer to a heartbeat, sent after its rollback, can
    // reach qa before qb's C4 does, and qa then ends the attempt on the
    // heartbeat while its switchover request is still unanswered.
    assert_eq!(
        record["cause"]["kind"], "feature",
        "the cause is qb's failed finish, from its C4: {record}"
    );
    assert_eq!(record["running_on"], "qa", "{record}");
    assert_eq!(record["committed"], false, "{record}");
    let pp = common::feature(&record, "port-profile");
    assert_eq!(pp["finish"], "failed", "{record}");
    assert_eq!(pp["rollback"], "ok", "{record}");
    // It asked for the switch, and it never happened.
    let note = record["completion_note"].as_str().unwrap_or_default();
    assert!(
        note.contains("post-copy was asked for from the start"),
        "{record}"
    );
    assert_ne!(
        record["transfer"]["stage"], "postcopy",
        "never switched: {record}"
    );
    assert_eq!(guests(&cluster, "g1"), [("qa".into(), "running".into())]);
    assert_runs_on(&cluster, "qa", "g1");
    assert_never_ran_on(&cluster, "qb", "g1");
}

/// QEMU as `nobody` without `vm.unprivileged_userfaultfd`: qb says in C2
/// that it cannot receive by post-copy, and fast mode goes on by pre-copy
/// alone under the same budget (150 s per GiB of 64 MiB: 9.4 s) instead of
/// failing in Prepare. The busy guest does not converge, so the budget
/// ends it, with the guest still running on qa.
#[test]
fn without_userfaultfd_fast_mode_notes_it_and_runs_pre_copy_alone() {
    let test = "without_userfaultfd_fast_mode_notes_it_and_runs_pre_copy_alone";
    let Some(_turn) = qemu_or_skip(test) else {
        return;
    };
    let Some(user) = run_as() else {
        eprintln!("{test}: skipped: QEMU runs as the tests' own user only when they run as root");
        return;
    };
    if unprivileged_userfaultfd() {
        eprintln!("{test}: skipped: vm.unprivileged_userfaultfd is 1, so {user} may use post-copy");
        return;
    }
    let cluster = busy_hosts(Some(user), "");
    wait_ready(&cluster, "qa", "g1");
    let (code, record) =
        cluster.tern_json(&["migrate", "g1", "--to", "qb", "--mode", "fast", "--json"]);
    // Not refused in Prepare: qb started its incoming QEMU without
    // post-copy and said why, and the transfer ran.
    assert_eq!(
        common::phase(&record, "prepare")["status"],
        "ok",
        "{record}"
    );
    let note = record["completion_note"].as_str().unwrap_or_default();
    assert!(
        note.starts_with(&format!(
            "post-copy is not available on qb (QEMU runs as {user}"
        )) && note.contains("vm.unprivileged_userfaultfd")
            && note.ends_with("pre-copy only"),
        "{record}"
    );
    assert_eq!(record["mode"], "fast", "{record}");
    assert_eq!(record["completion"]["postcopy"], "never", "{record}");
    assert_eq!(record["transfer"]["stage"], "precopy", "{record}");
    // And pre-copy alone did not finish it: the budget did.
    assert_eq!(code, 1, "{record}");
    assert_eq!(record["outcome"], "failed", "{record}");
    assert_eq!(record["cause"]["kind"], "stall", "{record}");
    let error = record["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("not done within its budget of 9.4 s (150 s per GiB of 64 MiB)"),
        "{error}"
    );
    assert_eq!(guests(&cluster, "g1"), [("qa".into(), "running".into())]);
    assert_runs_on(&cluster, "qa", "g1");
    assert_never_ran_on(&cluster, "qb", "g1");
}

/// The link between the two hosts' network namespaces is cut while the
/// guest runs on qb by post-copy, and restored 3 s later: the agents break
/// the stuck transfer off, recover it (migrate-recover on qb, migrate
/// resume on qa) and it completes; the counter goes on on qb, never on qa.
#[test]
fn a_link_cut_during_post_copy_is_recovered_and_the_guest_goes_on_on_the_destination() {
    let test = "a_link_cut_during_post_copy_is_recovered_and_the_guest_goes_on_on_the_destination";
    let Some(_turn) = qemu_or_skip(test) else {
        return;
    };
    if !userfaultfd_or_skip(test) {
        return;
    }
    let ns = match Namespaces::create() {
        Ok(ns) => ns,
        Err(e) => {
            assert!(
                std::env::var("TERN_REQUIRE_QEMU").as_deref() != Ok("1"),
                "{test}: cannot create network namespaces: {e}"
            );
            eprintln!("{test}: skipped: cannot create network namespaces: {e}");
            return;
        }
    };
    // A post-copy that moves nothing for 1 s is broken off for recovery;
    // a long peer timeout keeps the agents' own liveness out of it.
    let top = "stall_timeout_ms = 1000\n";
    let cluster = QemuCluster(Cluster::start_in_namespaces(
        vec![
            qemu_host_as(
                "qa",
                None,
                8,
                top,
                "",
                &(guest_vm("g1", 128, BUSY_WS_MIB) + &port_profile("")),
            ),
            qemu_host_as("qb", None, 8, top, "", &port_profile("")),
        ],
        &[
            (ns.names[0].as_str(), "10.201.0.1"),
            (ns.names[1].as_str(), "10.201.0.2"),
        ],
        "insecure = true\nheartbeat_interval_ms = 200\npeer_timeout_ms = 60000\nrollback_retry_ms = 600000\n",
    ));
    wait_ready(&cluster, "qa", "g1");
    let id = postcopy_now(&cluster, "g1", "qb");
    // Cut once the guest runs on qb: a cut between the source's switch and
    // the destination's start of the guest (QEMU's POSTCOPY_RUN) fails the
    // incoming side instead of pausing it, which is not what this is about.
    wait_until(Duration::from_secs(30), "the guest to run on qb", || {
        cluster.migration(&id)["transfer"]["stage"] == "postcopy"
            && !counts(&cluster, "qb", "g1").is_empty()
    });
    ns.link(false);
    wait_until(Duration::from_secs(20), "post-copy to pause", || {
        cluster.migration(&id)["transfer"]["stage"] == "postcopy_paused"
    });
    let paused = cluster.migration(&id);
    assert!(paused["recovery"].is_object(), "{paused}");
    std::thread::sleep(Duration::from_secs(3));
    ns.link(true);
    // Unresolved while the link was down (Finish's answer may have been
    // cut off too): the migration ends once qb answers and the pages came.
    let deadline = Instant::now() + Duration::from_secs(60);
    let record = loop {
        let record = cluster.migration(&id);
        if !record["outcome"].is_null() && record["outcome"] != "unresolved" {
            break record;
        }
        assert!(
            Instant::now() < deadline,
            "the migration did not end within 60 s of the link coming back: {record}\n--- qa's log:\n{}\n--- qb's log:\n{}",
            cluster.log("qa"),
            cluster.log("qb")
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(record["outcome"], "succeeded", "{record}");
    assert_eq!(record["running_on"], "qb", "{record}");
    let note = record["completion_note"].as_str().unwrap_or_default();
    assert!(note.contains("recovered after"), "{record}");
    assert_eq!(guests(&cluster, "g1"), [("qb".into(), "running".into())]);
    assert_counts_on_from_where_it_was(&cluster, "qa", "qb", "g1");
    assert!(qemu_pids(&cluster, "qa").is_empty(), "qa's QEMU is gone");
}

/// The destination dies for good during post-copy (its agent and its QEMU
/// killed, never restarted): the source's QEMU pauses, recovery cannot
/// reach it and keeps trying; the source's copy is never resumed. The
/// operator's `tern resolve --lost` ends it `lost` and kills the stale copy.
#[test]
fn a_post_copy_whose_destination_dies_for_good_is_declared_lost_and_never_resumed_on_the_source() {
    let test = "a_post_copy_whose_destination_dies_for_good_is_declared_lost_and_never_resumed_on_the_source";
    let Some(_turn) = qemu_or_skip(test) else {
        return;
    };
    if !userfaultfd_or_skip(test) {
        return;
    }
    let top = "stall_timeout_ms = 1000\n";
    let mut cluster = QemuCluster(Cluster::start(vec![
        qemu_host_as(
            "qa",
            None,
            8,
            top,
            "",
            &(guest_vm("g1", 128, BUSY_WS_MIB) + &port_profile("")),
        ),
        qemu_host_as("qb", None, 8, top, "", &port_profile("")),
    ]));
    wait_ready(&cluster, "qa", "g1");
    let id = postcopy_now(&cluster, "g1", "qb");
    wait_until(Duration::from_secs(30), "the switchover", || {
        cluster.migration(&id)["transfer"]["stage"] == "postcopy"
    });
    // Stopped at the switchover: whatever qa printed by now is all it may
    // ever print.
    std::thread::sleep(Duration::from_millis(500));
    let before = counts(&cluster, "qa", "g1");
    // qb dies for good: its agent, then its QEMU.
    cluster.kill("qb");
    for pid in qemu_pids(&cluster, "qb") {
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
    wait_until(Duration::from_secs(20), "recovery to try and fail", || {
        let record = cluster.migration(&id);
        record["transfer"]["stage"] == "postcopy_paused"
            && record["recovery"]["error"]
                .as_str()
                .is_some_and(|e| !e.is_empty())
    });
    let recovering = cluster.migration(&id);
    assert!(recovering["outcome"].is_null(), "{recovering}");
    // Before the switchover this would be refused; here it is the way out.
    let out = cluster.tern(&["resolve", &id, "--lost", "--yes"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("Only do this if qb is gone for good"),
        "{stderr}"
    );
    let mut record = serde_json::Value::Null;
    wait_until(Duration::from_secs(20), "the migration to end", || {
        record = cluster.migration(&id);
        !record["outcome"].is_null()
    });
    assert_eq!(record["outcome"], "lost", "{record}");
    assert_eq!(record["cause"]["kind"], "operator", "{record}");
    let error = record["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("LOST: declared lost by the operator")
            && error.contains("last recovery try"),
        "{record}"
    );
    wait_until(
        Duration::from_secs(10),
        "qa's stale copy to be killed",
        || qemu_pids(&cluster, "qa").is_empty(),
    );
    assert_eq!(
        counts(&cluster, "qa", "g1"),
        before,
        "g1 ran on qa after the switchover"
    );
    // Said again: the migration has ended.
    let again = cluster.tern(&["resolve", &id, "--lost", "--yes"]);
    assert!(!again.status.success());
}

/// `tern check` with real QEMU: both hosts' QEMU must give the guest the
/// same versioned machine type and CPU model. qc's QEMU starts a guest
/// without a machine of its own as qa's does (`pc`); qb's default is `q35`,
/// so it would start g1 as another machine, which no migration survives.
#[test]
fn check_compares_the_machine_type_and_cpu_model_both_qemus_give_the_guest() {
    let Some(_turn) =
        qemu_or_skip("check_compares_the_machine_type_and_cpu_model_both_qemus_give_the_guest")
    else {
        return;
    };
    let mut qb = qemu_host("qb", 1024, "", &port_profile(""));
    qb.config = qb.config.replacen(
        "kind = \"qemu\"\n",
        "kind = \"qemu\"\nmachine = \"q35\"\n",
        1,
    );
    let cluster = QemuCluster(Cluster::start(vec![
        qemu_host(
            "qa",
            1024,
            "",
            &(guest_vm("g1", GUEST_MIB, 8) + &port_profile("")),
        ),
        qb,
        qemu_host("qc", 1024, "", &port_profile("")),
    ]));
    wait_ready(&cluster, "qa", "g1");
    let machine_type = |answer: &serde_json::Value, host: &str| {
        answer["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["host"] == host && c["name"] == "machine type")
            .cloned()
            .unwrap_or_else(|| panic!("no machine type check on {host}: {answer:#}"))
    };
    let (code, answer) = cluster.tern_json(&["check", "g1", "--to", "qc", "--json"]);
    assert_eq!(code, 0, "{answer:#}");
    let source = machine_type(&answer, "qa");
    let detail = source["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("g1 runs as machine type pc-i440fx-")
            && detail.ends_with("with CPU model qemu64"),
        "{detail}"
    );
    let here = machine_type(&answer, "qc");
    assert_eq!(here["ok"], true, "{answer:#}");
    assert!(
        here["detail"]
            .as_str()
            .unwrap()
            .ends_with("and CPU model qemu64 on both"),
        "{here}"
    );

    let (code, answer) = cluster.tern_json(&["check", "g1", "--to", "qb", "--json"]);
    assert_eq!(code, 1, "{answer:#}");
    let there = machine_type(&answer, "qb");
    assert_eq!(there["ok"], false, "{answer:#}");
    let why = there["detail"].as_str().unwrap();
    assert!(
        why.contains("g1 runs as machine type pc-i440fx-")
            && why.contains("qb's QEMU would start it as pc-q35-")
            && why.contains("qemu.machine"),
        "{why}"
    );
    // The only check that fails: everything else about qb is fine.
    let failing: Vec<&serde_json::Value> = answer["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ok"] == false)
        .collect();
    assert_eq!(failing.len(), 1, "{answer:#}");
    // Nothing was started for either check.
    assert!(qemu_pids(&cluster, "qb").is_empty());
    assert!(qemu_pids(&cluster, "qc").is_empty());
}
