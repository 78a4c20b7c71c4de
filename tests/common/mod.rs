//! A cluster of real `tern agent` processes on loopback, driven through the
//! `tern` command line the way an operator would.
#![allow(dead_code)]

/// The test guest for real QEMU migrations (guest/tern-guest.S).
pub mod guest;
/// A real 802.1Qbg link: lldpad in station and bridge role (tests/vdp.rs).
pub mod lldpad;
mod ports;
/// Real QEMU hosts (tests/qemu.rs, tests/network.rs).
pub mod qemu;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub use ports::agent_port;

pub const TERN: &str = env!("CARGO_BIN_EXE_tern");

/// One host of a test cluster: its name and the TOML appended to its agent
/// config (VMs, `[features.*]`, `[hypervisor]`).
pub struct HostSpec {
    pub name: &'static str,
    pub config: String,
}

pub fn host(name: &'static str, config: impl Into<String>) -> HostSpec {
    HostSpec {
        name,
        config: config.into(),
    }
}

pub struct Host {
    pub name: String,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    pub port: u16,
    pub child: Option<Child>,
    /// The child leads a process group of its own (a wrapper such as strace
    /// and the agent it runs): signals go to the whole group.
    pub group: bool,
    /// The network namespace the agent runs in, if not the test's own.
    pub netns: Option<String>,
    pub ip: String,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub inventory: PathBuf,
    pub hosts: Vec<Host>,
    /// Where `tern` commands run: the first host's namespace, if any.
    pub cli_netns: Option<String>,
    /// With mutual TLS: the cluster CA's folder and the identity `tern`
    /// commands use (an admin's).
    pub tls: Option<Tls>,
}

pub struct Tls {
    pub ca: PathBuf,
    /// Where `tern ca issue` writes identities: `identities/NAME`.
    pub identities: PathBuf,
    pub admin: PathBuf,
}

/// Settings every test agent shares: short heartbeats so lost peers are
/// noticed in about a second.
pub const TIMING: &str =
    "heartbeat_interval_ms = 200\npeer_timeout_ms = 1500\nrollback_retry_ms = 600000\n";

impl Cluster {
    pub fn start(specs: Vec<HostSpec>) -> Cluster {
        Cluster::start_with(specs, &[], TIMING, false)
    }

    /// A cluster on mutual TLS: a CA made with `tern ca init`, an agent
    /// identity per host and an admin identity for `tern` commands, all
    /// issued with `tern ca issue`; the inventory's addresses are https://.
    pub fn start_tls(specs: Vec<HostSpec>) -> Cluster {
        Cluster::start_with(specs, &[], TIMING, true)
    }

    /// A cluster whose agents share `timing` instead of [`TIMING`] (which
    /// sets `rollback_retry_ms` too long for a retry to be seen).
    pub fn start_timed(specs: Vec<HostSpec>, timing: &str) -> Cluster {
        Cluster::start_with(specs, &[], timing, false)
    }

    /// Wait until `tern status` reaches every host (after a restart, say).
    pub fn wait_connected(&self) {
        wait_until(
            Duration::from_secs(10),
            "every host to answer tern status",
            || {
                self.status()["hosts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|h| h["connected"] == true)
            },
        );
    }

    /// Agents in network namespaces the test created: host i runs in
    /// `namespaces[i].0` and listens on `namespaces[i].1`; `tern` commands
    /// run in the first. `timing` replaces [`TIMING`].
    pub fn start_in_namespaces(
        specs: Vec<HostSpec>,
        namespaces: &[(&str, &str)],
        timing: &str,
    ) -> Cluster {
        assert_eq!(specs.len(), namespaces.len(), "one namespace per host");
        Cluster::start_with(specs, namespaces, timing, false)
    }

    fn start_with(
        specs: Vec<HostSpec>,
        namespaces: &[(&str, &str)],
        timing: &str,
        tls: bool,
    ) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        // Searchable, not listable: a QEMU that dropped root (tests/qemu.rs
        // runs it as nobody) reads its migration TLS credentials from the
        // agent's state_dir in here, and every folder above must let it in.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let inventory = dir.path().join("cluster.toml");
        let tls = tls.then(|| {
            let tls = Tls {
                ca: dir.path().join("ca"),
                identities: dir.path().join("identities"),
                admin: dir.path().join("identities").join("admin"),
            };
            ca(&["init", "--dir", tls.ca.to_str().unwrap()]);
            tls.issue("admin", "admin", &[]);
            tls
        });
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut hosts = Vec::new();
        let mut text = String::new();
        for (i, spec) in specs.iter().enumerate() {
            let (netns, ip) = match namespaces.get(i) {
                Some((ns, ip)) => (Some(ns.to_string()), ip.to_string()),
                None => (None, "127.0.0.1".to_string()),
            };
            let port = agent_port();
            text.push_str(&format!(
                "[[host]]\nname = \"{}\"\naddress = \"{scheme}://{ip}:{port}\"\n\n",
                spec.name
            ));
            let config_path = dir.path().join(format!("{}.toml", spec.name));
            let mut config = format!(
                "name = \"{name}\"\nlisten = \"{ip}:{port}\"\nstate_dir = \"{name}-state\"\ninventory = \"cluster.toml\"\n{timing}\n{}\n",
                spec.config,
                name = spec.name
            );
            if let Some(tls) = &tls {
                let own = tls.issue(spec.name, "agent", &[&ip]);
                config.push_str(&format!(
                    "\n[tls]\nca = \"{0}/ca.pem\"\ncert = \"{0}/cert.pem\"\nkey = \"{0}/key.pem\"\n",
                    own.display()
                ));
            }
            std::fs::write(&config_path, config).unwrap();
            hosts.push(Host {
                name: spec.name.to_string(),
                log_path: dir.path().join(format!("{}.log", spec.name)),
                config_path,
                port,
                child: None,
                group: false,
                netns,
                ip,
            });
        }
        std::fs::write(&inventory, text).unwrap();
        let mut cluster = Cluster {
            dir,
            inventory,
            cli_netns: hosts.first().and_then(|h| h.netns.clone()),
            hosts,
            tls,
        };
        for name in specs.iter().map(|s| s.name) {
            cluster.start_agent(name);
        }
        cluster
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    fn host_mut(&mut self, name: &str) -> &mut Host {
        self.hosts
            .iter_mut()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name}"))
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name}"))
    }

    /// Start (or restart) a host's agent and wait until it serves (its journal
    /// open, its guests booted).
    pub fn start_agent(&mut self, name: &str) {
        self.start_agent_under(name, &[]);
    }

    /// Start a host's agent as the last argument of `wrapper` (`strace -f …`,
    /// say; nothing: the agent itself) and wait until it accepts connections.
    pub fn start_agent_under(&mut self, name: &str, wrapper: &[&str]) {
        let host = self.host_mut(name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&host.log_path)
            .unwrap();
        let listening_before = std::fs::read_to_string(&host.log_path)
            .unwrap_or_default()
            .matches("agent listening")
            .count();
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                // In a group of its own, so the agent dies with its wrapper
                // (a SIGKILLed strace leaves its tracee running).
                let mut command = in_netns(host.netns.as_deref(), program);
                command.args(args).arg(TERN).process_group(0);
                command
            }
            None => in_netns(host.netns.as_deref(), TERN),
        };
        host.group = !wrapper.is_empty();
        let child = command
            .args(["agent", "--config"])
            .arg(&host.config_path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        host.child = Some(child);
        let port = host.port;
        let in_namespace = host.netns.is_some();
        let log_path = host.log_path.clone();
        let child = host.child.as_mut().expect("just started");
        wait_until(
            Duration::from_secs(20),
            &format!("agent {name} to listen"),
            || {
                // An agent that refused to start says why in its log.
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "agent {name} exited ({status}) before it listened; its log:\n{}",
                        std::fs::read_to_string(&log_path).unwrap_or_default()
                    );
                }
                // The agent binds its port before it opens its journal and
                // boots its guests; its log says when it serves.
                let serving = std::fs::read_to_string(&log_path)
                    .unwrap_or_default()
                    .matches("agent listening")
                    .count()
                    > listening_before;
                // In a namespace it is not reachable from here.
                serving
                    && (in_namespace || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
            },
        );
    }

    /// Send a signal to a host's agent (`libc::SIGKILL`, `SIGINT`, `SIGSTOP`, …).
    pub fn signal(&mut self, name: &str, signal: i32) {
        let host = self.host_mut(name);
        let child = host
            .child
            .as_ref()
            .unwrap_or_else(|| panic!("agent {name} is not running"));
        let pid = child.id() as i32;
        let target = if host.group { -pid } else { pid };
        unsafe {
            libc::kill(target, signal);
        }
    }

    /// SIGKILL a host's agent and reap it.
    pub fn kill(&mut self, name: &str) {
        self.signal(name, libc::SIGKILL);
        let mut child = self.host_mut(name).child.take().unwrap();
        child.wait().unwrap();
    }

    /// Wait for an agent to exit on its own (after SIGINT, say); returns its exit status.
    pub fn wait_exit(&mut self, name: &str, timeout: Duration) -> std::process::ExitStatus {
        let host = self.host_mut(name);
        let mut child = host
            .child
            .take()
            .unwrap_or_else(|| panic!("agent {name} is not running"));
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("agent {name} did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The gRPC address of a host's agent, as the inventory lists it.
    pub fn address(&self, name: &str) -> String {
        let host = self.host(name);
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:{}", host.ip, host.port)
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(&self.host(name).log_path).unwrap_or_default()
    }

    /// Run `tern ARGS` against this cluster's inventory (as its admin,
    /// on TLS).
    pub fn tern(&self, args: &[&str]) -> Output {
        self.tern_as(self.tls.as_ref().map(|t| t.admin.as_path()), args)
    }

    /// Run `tern ARGS` with `identity` (a folder `tern ca issue` wrote).
    pub fn tern_as(&self, identity: Option<&Path>, args: &[&str]) -> Output {
        let mut command = in_netns(self.cli_netns.as_deref(), TERN);
        command
            .args(args)
            .env("TERN_INVENTORY", &self.inventory)
            .env_remove("TERN_IDENTITY")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null());
        if let Some(identity) = identity {
            command.env("TERN_IDENTITY", identity);
        }
        command.output().unwrap()
    }

    /// Run `tern ARGS` (which must include `--json`): exit code and the last
    /// JSON line of stdout.
    pub fn tern_json(&self, args: &[&str]) -> (i32, Value) {
        last_json(args, &self.tern(args))
    }

    pub fn status(&self) -> Value {
        self.tern_json(&["status", "--json"]).1
    }

    /// Start a migration without waiting; returns its id.
    pub fn start_migration(&self, vm: &str, to: &str, mode: &str) -> String {
        let (code, record) = self.tern_json(&[
            "migrate",
            vm,
            "--to",
            to,
            "--mode",
            mode,
            "--no-wait",
            "--json",
        ]);
        assert_eq!(code, 0, "migrate --no-wait failed: {record}");
        record["id"].as_str().unwrap().to_string()
    }

    pub fn migration(&self, id: &str) -> Value {
        let status = self.status();
        status["migrations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("migration {id} not in status: {status}"))
    }

    /// Wait until the migration's running phase is `phase` (e.g. "perform").
    pub fn wait_phase(&self, id: &str, phase: &str) {
        wait_until(
            Duration::from_secs(20),
            &format!("migration {id} to reach {phase}"),
            || {
                let m = self.migration(id);
                m["phases"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["phase"] == phase && p["status"] == "running")
            },
        );
    }

    /// `tern abort ID`, which must be accepted, then the migration's record
    /// once it has ended.
    pub fn abort_and_wait(&self, id: &str) -> Value {
        let out = self.tern(&["abort", id]);
        assert!(
            out.status.success(),
            "tern abort {id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.wait_outcome(id)
    }

    pub fn wait_outcome(&self, id: &str) -> Value {
        let mut record = Value::Null;
        wait_until(
            Duration::from_secs(30),
            &format!("migration {id} to end"),
            || {
                record = self.migration(id);
                !record["outcome"].is_null()
            },
        );
        record
    }

    /// Hosts on which a VM's guest is running (not paused, not incoming).
    pub fn running_on(&self, vm: &str) -> Vec<String> {
        guests(&self.status(), vm, "running")
    }

    /// Every host that holds any guest (any state) of a VM.
    pub fn guests_of(&self, vm: &str) -> Vec<(String, String)> {
        let status = self.status();
        status["vms"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["name"] == vm)
            .map(|v| {
                (
                    v["host"].as_str().unwrap().to_string(),
                    v["state"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    /// Feature state a host holds for a VM (e.g. port-profile associations).
    pub fn feature_state(&self, host: &str, vm: &str) -> Vec<Value> {
        let status = self.status();
        host_of(&status, host)["feature_state"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["vm"] == vm)
            .cloned()
            .collect()
    }

    pub fn pending_rollbacks(&self, host: &str) -> Vec<Value> {
        let status = self.status();
        host_of(&status, host)["pending_rollbacks"]
            .as_array()
            .unwrap()
            .clone()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for host in &mut self.hosts {
            if let Some(mut child) = host.child.take() {
                if host.group {
                    unsafe {
                        libc::kill(-(child.id() as i32), libc::SIGKILL);
                    }
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

pub fn host_of<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == name)
        .unwrap_or_else(|| panic!("no host {name} in status"))
}

pub fn guests(status: &Value, vm: &str, state: &str) -> Vec<String> {
    status["vms"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["name"] == vm && v["state"] == state)
        .map(|v| v["host"].as_str().unwrap().to_string())
        .collect()
}

pub fn feature<'a>(record: &'a Value, name: &str) -> &'a Value {
    record["features"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == name)
        .unwrap_or_else(|| panic!("no feature {name} in {record}"))
}

pub fn phase<'a>(record: &'a Value, name: &str) -> &'a Value {
    record["phases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["phase"] == name)
        .unwrap()
}

/// `program`, run in network namespace `netns` when there is one (`ip
/// netns exec` execs it, so the child's pid is the program's).
pub fn in_netns(netns: Option<&str>, program: &str) -> Command {
    match netns {
        Some(ns) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", ns, program]);
            command
        }
        None => Command::new(program),
    }
}

pub fn wait_until(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `[[vm]]` entry with a required port-profile.
pub fn vm(name: &str, memory_mib: u64) -> String {
    format!(
        "[[vm]]\nname = \"{name}\"\nmemory_mib = {memory_mib}\nvcpus = 2\ndirty_rate_mib_s = 10\nfeatures = [{{ name = \"port-profile\", required = true }}]\n\n"
    )
}

/// `[hypervisor]` with a given link speed, so a transfer of N MiB lasts N/bw seconds.
pub fn link(bandwidth_mib_s: u64) -> String {
    format!("[hypervisor]\nkind = \"sim\"\nbandwidth_mib_s = {bandwidth_mib_s}\n\n")
}

/// `[features.port-profile]` on the simulated switch with extra settings.
pub fn port_profile(extra: &str) -> String {
    format!("[features.port-profile]\nswitch = \"sim\"\n{extra}\n\n")
}

/// Run `future` to its end on a runtime of its own (for tests that talk
/// gRPC to agents directly).
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(future)
}

/// A Peer client to `host`'s agent, as another agent would call it.
pub async fn peer_client(
    cluster: &Cluster,
    host: &str,
) -> tern::proto::peer_client::PeerClient<tonic::transport::Channel> {
    let address = cluster.address(host);
    tern::proto::peer_client::PeerClient::connect(address.clone())
        .await
        .unwrap_or_else(|e| panic!("connect to {host} at {address}: {e}"))
}

/// How long a raw Peer call may take to be answered.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// A raw `Peer.Prepare` of `c1` to `host`, as a source would send it.
pub fn call_prepare(
    cluster: &Cluster,
    host: &str,
    c1: &tern::proto::Cookie1,
) -> Result<tern::proto::PrepareReply, tonic::Status> {
    use prost::Message;
    block_on(async {
        let mut client = peer_client(cluster, host).await;
        let request = tern::proto::PrepareRequest {
            cookie1: c1.encode_to_vec(),
        };
        tokio::time::timeout(ANSWER_WITHIN, client.prepare(request))
            .await
            .expect("Prepare did not answer within 10 s")
            .map(|r| r.into_inner())
    })
}

/// The exit code of `tern ARGS` and the last JSON line it printed; fails the
/// test, showing what it printed, if there is none.
pub fn last_json(args: &[&str], out: &Output) -> (i32, Value) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .unwrap_or_else(|| {
            panic!(
                "tern {args:?} printed no JSON (exit {:?})\nstdout: {stdout}\nstderr: {}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            )
        });
    (
        out.status.code().unwrap_or(-1),
        serde_json::from_str(line).unwrap(),
    )
}

/// Run `tern ca ARGS`; it must succeed.
pub fn ca(args: &[&str]) -> Output {
    let output = Command::new(TERN).arg("ca").args(args).output().unwrap();
    assert!(
        output.status.success(),
        "tern ca {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

impl Tls {
    /// Issue an identity with `tern ca issue`; returns its folder.
    pub fn issue(&self, name: &str, role: &str, sans: &[&str]) -> PathBuf {
        let mut args = vec![
            "issue",
            "--dir",
            self.ca.to_str().unwrap(),
            "--out",
            self.identities.to_str().unwrap(),
            "--role",
            role,
            name,
        ];
        let sans = sans.join(",");
        if !sans.is_empty() {
            args.extend(["--san", sans.as_str()]);
        }
        ca(&args);
        self.identities.join(name)
    }
}
