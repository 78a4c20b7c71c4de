//! Real host networking: QEMU guests with a NIC, moved by real agents with
//! the `bridge` driver between two "hosts" that are network namespaces.
//!
//! ```text
//!   namespace na (host qa)                 namespace nb (host qb)
//!   10.202.0.1 ── mgmt veth (gRPC, migration stream) ── 10.202.0.2
//!   br-vm0 ── tap of g1                                  br-vm0
//!     └──────────────── uplink veth ──────────────────────┘
//! ```
//!
//! After a move the tap is on the destination's bridge (and only there),
//! open, and a capture on that bridge saw the guest's MAC announced (QEMU's
//! gratuitous RARP); the source's bridge learned it behind the uplink. A
//! safe-mode move to a host whose bridge is missing fails and leaves the
//! source's port as it was; an abort mid-Perform leaves no tap behind.
//!
//! Needs root, `ip`, tcpdump and QEMU: without them the tests say they were
//! skipped, and with `TERN_REQUIRE_QEMU=1` (CI, whose `.ci/run` installs
//! them) that is a failure.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::qemu::*;
use common::{Cluster, wait_until};
use serde_json::Value;
use tern::hypervisor::qemu::machine::tap_name;

const MAC: &str = "52:54:00:12:34:56";

/// Two namespaces as two hosts: a management link with addresses, and a
/// bridge `br-vm0` in each joined by an uplink. Removed on drop, with every
/// link in them.
struct Hosts {
    names: [String; 2],
    /// This test's turn at QEMU, given back only once the namespaces are
    /// gone (fields drop after `Drop::drop`).
    _turn: std::sync::MutexGuard<'static, ()>,
}

/// Tells one test's namespaces and links from another's.
static HOSTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Hosts {
    fn create(
        bridge_on_b: bool,
        turn: std::sync::MutexGuard<'static, ()>,
    ) -> Result<Hosts, String> {
        let pid = std::process::id();
        let n = HOSTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let hosts = Hosts {
            names: [format!("tern-na-{pid}-{n}"), format!("tern-nb-{pid}-{n}")],
            _turn: turn,
        };
        let [a, b] = &hosts.names;
        let id = (pid % 10_000) * 10 + n as u32 % 10;
        let (ma, mb, ua, ub) = (
            format!("nma{id}"),
            format!("nmb{id}"),
            format!("nua{id}"),
            format!("nub{id}"),
        );
        ip(&["netns", "add", a])?;
        ip(&["netns", "add", b])?;
        for (x, y) in [(&ma, &mb), (&ua, &ub)] {
            ip(&[
                "link", "add", x, "netns", a, "type", "veth", "peer", "name", y, "netns", b,
            ])?;
        }
        ip(&["-n", a, "addr", "add", "10.202.0.1/24", "dev", &ma])?;
        ip(&["-n", b, "addr", "add", "10.202.0.2/24", "dev", &mb])?;
        for (n, m, u, bridge) in [(a, &ma, &ua, true), (b, &mb, &ub, bridge_on_b)] {
            for link in ["lo", m.as_str(), u.as_str()] {
                ip(&["-n", n, "link", "set", link, "up"])?;
            }
            if bridge {
                ip(&["-n", n, "link", "add", "br-vm0", "type", "bridge"])?;
                ip(&["-n", n, "link", "set", u, "master", "br-vm0"])?;
                ip(&["-n", n, "link", "set", "br-vm0", "up"])?;
            }
        }
        Ok(hosts)
    }

    fn ns(&self, host: &str) -> &str {
        match host {
            "qa" => &self.names[0],
            "qb" => &self.names[1],
            other => panic!("no host {other}"),
        }
    }

    /// Link `name` in `host`'s namespace as `ip -d -j link show` reports
    /// it, or None when there is none.
    fn link(&self, host: &str, name: &str) -> Option<Value> {
        let out = Command::new("ip")
            .args(["-n", self.ns(host), "-d", "-j", "link", "show", "dev", name])
            .output()
            .unwrap();
        if !out.status.success() {
            return None;
        }
        let links: Value = serde_json::from_slice(&out.stdout).unwrap();
        links.get(0).cloned()
    }

    /// The names of the taps in `host`'s namespace.
    fn taps(&self, host: &str) -> Vec<String> {
        let out = Command::new("ip")
            .args(["-n", self.ns(host), "-j", "link", "show", "type", "tun"])
            .output()
            .unwrap();
        let links: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        links
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l["ifname"].as_str().map(str::to_string))
            .collect()
    }

    /// The forwarding-table lines of `host`'s br-vm0 (`bridge fdb show`).
    fn fdb(&self, host: &str) -> String {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                self.ns(host),
                "bridge",
                "fdb",
                "show",
                "br",
                "br-vm0",
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = ip(&["netns", "del", n]);
        }
    }
}

/// The port of a tap as the test checks it: its bridge, and whether it is up.
fn port(hosts: &Hosts, host: &str, tap: &str) -> Option<(Option<String>, bool)> {
    let link = hosts.link(host, tap)?;
    let bridge = link["master"].as_str().map(str::to_string);
    let up = link["flags"]
        .as_array()
        .is_some_and(|f| f.iter().any(|x| x == "UP"));
    Some((bridge, up))
}

/// tcpdump on `host`'s br-vm0, until it saw one RARP from [`MAC`].
struct Capture {
    child: Child,
    out: PathBuf,
}

impl Capture {
    fn start(hosts: &Hosts, host: &str, dir: &Path) -> Capture {
        let out = dir.join(format!("{host}-rarp.txt"));
        let err = dir.join(format!("{host}-tcpdump.log"));
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                hosts.ns(host),
                "tcpdump",
                "-i",
                "br-vm0",
                "-n",
                "-e",
                "-l",
                "-c",
                "1",
                &format!("ether proto 0x8035 and ether src {MAC}"),
            ])
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        wait_until(Duration::from_secs(10), "tcpdump to listen", || {
            std::fs::read_to_string(&err).is_ok_and(|t| t.contains("listening on"))
        });
        Capture { child, out }
    }

    /// What it printed once it saw its packet.
    fn seen(&mut self) -> String {
        wait_until(
            Duration::from_secs(10),
            "tcpdump to see the guest's RARP",
            || matches!(self.child.try_wait(), Ok(Some(_))),
        );
        std::fs::read_to_string(&self.out).unwrap()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// QEMU, tcpdump and two namespaces (holding this test's turn at QEMU),
/// or None after saying why not.
fn setup(test: &str, bridge_on_b: bool) -> Option<Hosts> {
    let (_, turn) = qemu_or_skip(test)?;
    let tcpdump = ["/usr/bin/tcpdump", "/usr/sbin/tcpdump"]
        .iter()
        .any(|p| Path::new(p).is_file());
    let hosts = if tcpdump {
        Hosts::create(bridge_on_b, turn)
    } else {
        Err("tcpdump is not installed (apt-get install -y tcpdump)".into())
    };
    match hosts {
        Ok(hosts) => Some(hosts),
        Err(e) => {
            assert!(
                std::env::var("TERN_REQUIRE_QEMU").as_deref() != Ok("1"),
                "{test}: {e}"
            );
            eprintln!("{test}: skipped: {e}");
            None
        }
    }
}

/// qa running g1 (one NIC on network `lan`, feature `net` required) and
/// qb, whose `lan` is `qb_bridge`; both with the bridge driver.
fn cluster(hosts: &Hosts, bandwidth_mib_s: u64, qb_bridge: &str) -> QemuCluster {
    cluster_with(hosts, bandwidth_mib_s, qb_bridge, "")
}

/// [`cluster`] with more settings of the bridge driver.
fn cluster_with(
    hosts: &Hosts,
    bandwidth_mib_s: u64,
    qb_bridge: &str,
    settings: &str,
) -> QemuCluster {
    let net = &format!("[features.net]\ndriver = \"bridge\"\n{settings}\n");
    let vm = guest_vm_featuring(
        "g1",
        GUEST_MIB,
        8,
        "{ name = \"net\", required = true }",
        &format!("nics = [{{ mac = \"{MAC}\", network = \"lan\" }}]"),
    );
    QemuCluster(Cluster::start_in_namespaces(
        vec![
            qemu_host_with("qa", bandwidth_mib_s, "", "lan = \"br-vm0\"\n", &(vm + net)),
            qemu_host_with(
                "qb",
                bandwidth_mib_s,
                "",
                &format!("lan = \"{qb_bridge}\"\n"),
                net,
            ),
        ],
        &[
            (&hosts.names[0], "10.202.0.1"),
            (&hosts.names[1], "10.202.0.2"),
        ],
        "insecure = true\nheartbeat_interval_ms = 200\n",
    ))
}

/// The tap a host's agent makes for g1's NIC.
fn tap_of(cluster: &Cluster, host: &str) -> String {
    tap_name(&qemu_dir(cluster, host).display().to_string(), "g1", 0)
}

fn feature_net(record: &Value) -> &Value {
    common::feature(record, "net")
}

/// `tern check g1 --to qb --mode MODE --json`: its exit code and qb's
/// `feature net` check.
fn check_net(cluster: &Cluster, mode: &str) -> (i32, Value) {
    let (code, answer) =
        cluster.tern_json(&["check", "g1", "--to", "qb", "--mode", mode, "--json"]);
    let net = answer["checks"]
        .as_array()
        .unwrap_or_else(|| panic!("{answer}"))
        .iter()
        .find(|c| c["host"] == "qb" && c["name"] == "feature net")
        .cloned()
        .unwrap_or_else(|| panic!("no feature net check on qb: {answer:#}"));
    (code, net)
}

#[test]
fn a_guest_moves_with_its_port_and_the_destination_bridge_sees_it_announced() {
    let test = "a_guest_moves_with_its_port_and_the_destination_bridge_sees_it_announced";
    let Some(hosts) = setup(test, true) else {
        return;
    };
    let cluster = cluster(&hosts, 1024, "br-vm0");
    let (tap_a, tap_b) = (tap_of(&cluster, "qa"), tap_of(&cluster, "qb"));
    // The guest that booted on qa: its tap on qa's bridge, open.
    wait_until(Duration::from_secs(15), "g1's port on qa", || {
        port(&hosts, "qa", &tap_a) == Some((Some("br-vm0".into()), true))
    });
    let args = qemu_process(&cluster, "qa").argv.join(" ");
    assert!(
        args.contains(&format!(
            "-netdev tap,id=net0,ifname={tap_a},script=no,downscript=no"
        )),
        "{args}"
    );
    assert!(args.contains(&format!("\"mac\":\"{MAC}\"")), "{args}");
    wait_ready(&cluster, "qa", "g1");
    // `tern check` finds qb's bridge.
    let (code, net) = check_net(&cluster, "safe");
    assert_eq!((code, &net["ok"]), (0, &Value::Bool(true)), "{net}");
    assert_eq!(net["detail"], "br-vm0 on qb for g1's 1 NIC(s)", "{net}");

    let mut capture = Capture::start(&hosts, "qb", cluster.path());
    let (code, record) =
        cluster.tern_json(&["migrate", "g1", "--to", "qb", "--mode", "safe", "--json"]);
    assert_eq!(code, 0, "{record}");
    assert_eq!(record["outcome"], "succeeded", "{record}");
    let net = feature_net(&record);
    for stage in ["prepare", "finish", "verify", "release"] {
        assert_eq!(net[stage], "ok", "{stage}: {record}\n{}", cluster.log("qb"));
    }
    assert_runs_on(&cluster, "qb", "g1");

    // The tap exists only on the destination, on its bridge, open.
    assert_eq!(
        port(&hosts, "qb", &tap_b),
        Some((Some("br-vm0".into()), true))
    );
    assert_eq!(hosts.taps("qb"), std::slice::from_ref(&tap_b));
    assert!(hosts.taps("qa").is_empty(), "{:?}", hosts.taps("qa"));
    let args = qemu_process(&cluster, "qb").argv.join(" ");
    assert!(
        args.contains(&format!(
            "-netdev tap,id=net0,ifname={tap_b},script=no,downscript=no"
        )),
        "{args}"
    );

    // The announcement: seen on qb's bridge, and learned on both bridges
    // where the guest is now (qb: its tap; qa: the uplink towards qb).
    let seen = capture.seen();
    assert!(seen.contains(MAC) && seen.contains("Reverse ARP"), "{seen}");
    let fdb_b = hosts.fdb("qb");
    assert!(
        fdb_b
            .lines()
            .any(|l| l.starts_with(MAC) && l.contains(&format!("dev {tap_b}"))),
        "{fdb_b}"
    );
    let fdb_a = hosts.fdb("qa");
    assert!(
        fdb_a
            .lines()
            .any(|l| l.starts_with(MAC) && l.contains("dev nua")),
        "{fdb_a}"
    );
}

#[test]
fn a_safe_move_to_a_host_without_the_bridge_fails_and_changes_nothing() {
    let test = "a_safe_move_to_a_host_without_the_bridge_fails_and_changes_nothing";
    let Some(hosts) = setup(test, false) else {
        return;
    };
    let cluster = cluster(&hosts, 1024, "br-vm0");
    let tap_a = tap_of(&cluster, "qa");
    wait_until(Duration::from_secs(15), "g1's port on qa", || {
        port(&hosts, "qa", &tap_a) == Some((Some("br-vm0".into()), true))
    });
    wait_ready(&cluster, "qa", "g1");
    // `tern check` says so before anything moves: blocking in safe mode
    // (net is required), noted in fast mode.
    let (code, net) = check_net(&cluster, "safe");
    assert_ne!(code, 0, "{net}");
    assert_eq!(net["ok"], false, "{net}");
    let detail = net["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("bridge br-vm0 does not exist on qb (network lan of g1's NIC"),
        "{net}"
    );
    let (_, net) = check_net(&cluster, "fast");
    assert_eq!(net["ok"], true, "{net}");
    assert!(
        net["detail"]
            .as_str()
            .unwrap()
            .ends_with("(not blocking: net is required in fast mode, so the move would go on without it, degraded)"),
        "{net}"
    );
    let (code, record) =
        cluster.tern_json(&["migrate", "g1", "--to", "qb", "--mode", "safe", "--json"]);
    assert_ne!(code, 0, "{record}");
    assert_eq!(record["outcome"], "failed", "{record}");
    let cause = &record["cause"];
    assert_eq!(cause["kind"], "feature", "{record}");
    assert_eq!(cause["feature"], "net", "{record}");
    assert_eq!(cause["stage"], "prepare", "{record}");
    let error = record["error"].as_str().unwrap_or("");
    assert!(
        error.contains("bridge br-vm0 does not exist on qb"),
        "{record}"
    );
    // The source's port as it was; nothing of g1 left on qb.
    assert_eq!(
        port(&hosts, "qa", &tap_a),
        Some((Some("br-vm0".into()), true))
    );
    assert_runs_on(&cluster, "qa", "g1");
    wait_until(Duration::from_secs(10), "qb to have no tap", || {
        hosts.taps("qb").is_empty()
    });
}

#[test]
fn an_abort_mid_perform_leaves_no_tap_on_the_destination() {
    let test = "an_abort_mid_perform_leaves_no_tap_on_the_destination";
    let Some(hosts) = setup(test, true) else {
        return;
    };
    // 128 MiB at 8 MiB/s: Perform lasts long enough to abort it.
    let cluster = cluster(&hosts, 8, "br-vm0");
    let (tap_a, tap_b) = (tap_of(&cluster, "qa"), tap_of(&cluster, "qb"));
    wait_ready(&cluster, "qa", "g1");
    let id = cluster.start_migration("g1", "qb", "safe");
    cluster.wait_phase(&id, "perform");
    // The destination's port is there during the transfer, closed.
    assert_eq!(
        port(&hosts, "qb", &tap_b),
        Some((Some("br-vm0".into()), false))
    );
    let record = cluster.abort_and_wait(&id);
    assert_eq!(record["outcome"], "aborted", "{record}");
    wait_until(Duration::from_secs(10), "qb to have no tap", || {
        hosts.taps("qb").is_empty()
    });
    assert_eq!(
        port(&hosts, "qa", &tap_a),
        Some((Some("br-vm0".into()), true))
    );
    assert_runs_on(&cluster, "qa", "g1");
}

/// A bridge that learns nothing (ageing time 0: every entry expires at
/// once) cannot show that the announcement left the port: the move ends
/// degraded with that reason, even in safe mode, never "succeeded".
#[test]
fn a_port_whose_announcement_is_not_seen_makes_the_move_degraded() {
    let test = "a_port_whose_announcement_is_not_seen_makes_the_move_degraded";
    let Some(hosts) = setup(test, true) else {
        return;
    };
    ip(&[
        "-n",
        hosts.ns("qb"),
        "link",
        "set",
        "br-vm0",
        "type",
        "bridge",
        "ageing_time",
        "0",
    ])
    .unwrap();
    let cluster = cluster_with(&hosts, 1024, "br-vm0", "verify_timeout_ms = 500");
    let tap_b = tap_of(&cluster, "qb");
    wait_ready(&cluster, "qa", "g1");
    let (code, record) =
        cluster.tern_json(&["migrate", "g1", "--to", "qb", "--mode", "safe", "--json"]);
    assert_eq!(record["outcome"], "degraded", "{record}");
    assert_ne!(code, 0, "{record}");
    let net = feature_net(&record);
    assert_eq!(
        (&net["finish"], &net["verify"]),
        (&"ok".into(), &"failed".into()),
        "{record}"
    );
    let cause = &record["cause"];
    assert_eq!(
        (&cause["kind"], &cause["side"], &cause["stage"]),
        (&"feature".into(), &"destination".into(), &"verify".into()),
        "{record}"
    );
    let error = net["error"].as_str().unwrap_or("");
    assert!(
        error.contains(&format!(
            "br-vm0 has not learned {MAC} on {tap_b} within 500 ms"
        )),
        "{record}"
    );
    // It moved all the same: the guest runs on qb, its port open there.
    assert_runs_on(&cluster, "qb", "g1");
    assert_eq!(
        port(&hosts, "qb", &tap_b),
        Some((Some("br-vm0".into()), true))
    );
}
