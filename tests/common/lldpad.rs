//! A real 802.1Qbg link for tests: two network namespaces joined by a
//! veth, an lldpad in station role on one end (`eth1`, where Tern's vdp
//! driver talks to it) and one in bridge role on the other (`swp1`). Each
//! lldpad gets its own /run and /dev/shm (it refuses a second instance
//! otherwise) and logs at `-V 7`, line-buffered, to a file the tests read.
//!
//! Needs root and Debian's `lldpad`; without them [`VdpLink::start`]
//! returns `None` after printing why, unless `TERN_REQUIRE_NETNS=1` makes
//! that a failure. Everything is removed on drop, also after a failure.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The station's interface facing the bridge.
pub const STATION_IF: &str = "eth1";
/// The bridge's port facing the station.
pub const BRIDGE_IF: &str = "swp1";

pub struct VdpLink {
    pub station: String,
    pub bridge: String,
    dir: tempfile::TempDir,
    station_lldpad: Option<Child>,
    bridge_lldpad: Option<Child>,
}

static LINKS: AtomicUsize = AtomicUsize::new(0);

/// Skip (print why) or, under `TERN_REQUIRE_NETNS=1`, fail.
fn skip(why: &str) -> Option<VdpLink> {
    assert!(
        std::env::var("TERN_REQUIRE_NETNS").as_deref() != Ok("1"),
        "an lldpad link is needed (TERN_REQUIRE_NETNS=1): {why}"
    );
    eprintln!("skipped: {why}");
    None
}

fn run(program: &str, args: &[&str]) -> std::process::Output {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} {args:?}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// lldpad's config: LLDP on, and the EVB role set before lldpad starts
/// (the VDP role is fixed when the EVB module first starts; set later with
/// lldptool it does not take).
fn config(ifname: &str, role: &str) -> String {
    format!(
        "lldp : {{ {ifname} : {{ adminStatus = 3; }}; }};\n\
         nearest_customer_bridge : {{ {ifname} : {{ adminStatus = 3; \
         tlvid0080c20d : {{ evbmode = \"{role}\"; enableTx = true; }}; }}; }};\n"
    )
}

impl VdpLink {
    /// Both ends, EVB negotiated and VDP ready on the station.
    pub fn start() -> Option<VdpLink> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return skip("not root (network namespaces and lldpad need it)");
        }
        if !Path::new("/usr/sbin/lldpad").exists() {
            return skip("lldpad is not installed (apt-get install -y lldpad)");
        }
        let n = LINKS.fetch_add(1, Ordering::Relaxed);
        let base = format!("tern-vdp-{}-{n}", std::process::id());
        let mut link = VdpLink {
            station: format!("{base}-st"),
            bridge: format!("{base}-br"),
            dir: tempfile::tempdir().unwrap(),
            station_lldpad: None,
            bridge_lldpad: None,
        };
        run("ip", &["netns", "add", &link.station]);
        run("ip", &["netns", "add", &link.bridge]);
        run(
            "ip",
            &[
                "-n",
                &link.station,
                "link",
                "add",
                STATION_IF,
                "type",
                "veth",
                "peer",
                "name",
                BRIDGE_IF,
                "netns",
                &link.bridge,
            ],
        );
        for (ns, ifname) in [(&link.station, STATION_IF), (&link.bridge, BRIDGE_IF)] {
            run("ip", &["-n", ns, "link", "set", "lo", "up"]);
            run("ip", &["-n", ns, "link", "set", ifname, "up"]);
        }
        link.station_lldpad = Some(link.lldpad("station", STATION_IF));
        link.bridge_lldpad = Some(link.lldpad("bridge", BRIDGE_IF));
        // VDP answers once EVB is exchanged: each end's vdp22 module logs
        // `evb:1` then. A station request the bridge gets before its own
        // VDP is on comes back disassociated.
        for (role, ifname) in [("station", STATION_IF), ("bridge", BRIDGE_IF)] {
            link.wait_for_log(role, Duration::from_secs(20), |log| {
                log.lines()
                    .any(|l| l.contains(&format!("data_from_evb:{ifname}")) && l.contains("evb:1"))
            });
        }
        Some(link)
    }

    fn lldpad(&self, role: &str, ifname: &str) -> Child {
        let ns = if role == "station" {
            &self.station
        } else {
            &self.bridge
        };
        let conf = self.dir.path().join(format!("{role}.conf"));
        std::fs::write(&conf, config(ifname, role)).unwrap();
        let log = std::fs::File::create(self.log_path(role)).unwrap();
        Command::new("ip")
            .args([
                "netns", "exec", ns, "unshare", "--ipc", "--mount", "sh", "-c",
            ])
            .arg(
                "mount -t tmpfs none /run && mount -t tmpfs none /dev/shm && \
                 exec stdbuf -oL -eL lldpad -V 7 -f \"$1\"",
            )
            .arg("sh")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start lldpad")
    }

    fn log_path(&self, role: &str) -> PathBuf {
        self.dir.path().join(format!("{role}.log"))
    }

    /// Everything lldpad `role` ("station" or "bridge") logged so far.
    pub fn log(&self, role: &str) -> String {
        std::fs::read_to_string(self.log_path(role)).unwrap_or_default()
    }

    pub fn wait_for_log(&self, role: &str, timeout: Duration, what: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + timeout;
        while !what(&self.log(role)) {
            assert!(
                Instant::now() < deadline,
                "lldpad {role} did not log what was expected within {timeout:?}; its log ends:\n{}",
                tail(&self.log(role))
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stop the bridge-role lldpad: nothing answers the station any more.
    pub fn stop_bridge(&mut self) {
        if let Some(mut child) = self.bridge_lldpad.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `vdptool ARGS` in the station's namespace, its stdout.
    pub fn station_vdptool(&self, args: &[&str]) -> String {
        let output = Command::new("ip")
            .args(["netns", "exec", &self.station, "vdptool"])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Run `body` on a thread inside the station's network namespace (where
    /// lldpad's client socket is), on a runtime of that thread.
    pub fn in_station<F, Fut, T>(&self, body: F) -> T
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T>,
        T: Send + 'static,
    {
        let path = format!("/run/netns/{}", self.station);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap();
            // SAFETY: setns moves only this thread into the namespace `ns`
            // names; the file stays open for the call.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(body())
        })
        .join()
        .expect("the station thread")
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

impl Drop for VdpLink {
    fn drop(&mut self) {
        for child in [self.station_lldpad.take(), self.bridge_lldpad.take()]
            .into_iter()
            .flatten()
        {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in [&self.station, &self.bridge] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}
