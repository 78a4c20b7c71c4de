//! What the benchmarks that run real `tern agent` processes on loopback
//! share: the registry of what must not outlive them and the cleanup that
//! kills it, a watchdog for one child, the benchmark's temporary folder, and
//! starting agents (free ports, the inventory, waiting for them to listen).
//!
//! Every pid and process group a benchmark starts goes into [`live`] at
//! once; [`kill_everything`] SIGKILLs them (and whatever [`Live::strays`]
//! finds in the folder). A benchmark calls it from its cluster's `Drop`, so
//! at the end and on a panic, and [`handle_signals`] calls it on SIGINT,
//! SIGTERM or SIGHUP, then removes the folder and exits.
//!
//! Each benchmark includes it with `mod common;` (`benches/common/mod.rs`):
//! a folder under `benches/` without a `main.rs` is no bench target of its
//! own.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A whole number from the environment, or `default` when unset.
pub fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text:?}: expected a whole number")),
        Err(_) => default,
    }
}

// ---- cleanup: at the end, on a panic, on a signal ---------------------------

/// What must not outlive the benchmark.
pub struct Live {
    /// Processes: the agents, and commands while they run.
    pub pids: Vec<i32>,
    /// Process groups of running scripts (with the processes they started).
    pub groups: Vec<i32>,
    /// The benchmark's folder while it exists.
    pub dir: Option<PathBuf>,
    /// Further processes, found in the folder once the others are killed
    /// (none unless a benchmark sets it).
    pub strays: fn(&Path) -> Vec<i32>,
}

fn no_strays(_: &Path) -> Vec<i32> {
    Vec::new()
}

static LIVE: Mutex<Live> = Mutex::new(Live {
    pids: Vec::new(),
    groups: Vec::new(),
    dir: None,
    strays: no_strays,
});

pub fn live() -> MutexGuard<'static, Live> {
    LIVE.lock().unwrap_or_else(|p| p.into_inner())
}

/// SIGKILL the processes, the process groups, then the strays in the folder.
pub fn kill_everything() {
    let mut live = live();
    for pid in live.pids.drain(..) {
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
    for group in live.groups.drain(..) {
        unsafe {
            libc::kill(-group, libc::SIGKILL);
        }
    }
    if let Some(dir) = &live.dir {
        for pid in (live.strays)(dir) {
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

static SIGNALLED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(signal: libc::c_int) {
    SIGNALLED.store(signal, Ordering::SeqCst);
}

/// On SIGINT, SIGTERM or SIGHUP: kill everything, remove the folder, exit
/// (saying so as `bench`).
pub fn handle_signals(bench: &'static str) {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        unsafe {
            libc::signal(signal, on_signal as *const () as libc::sighandler_t);
        }
    }
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(Duration::from_millis(50));
            let signal = SIGNALLED.load(Ordering::SeqCst);
            if signal != 0 {
                eprintln!("{bench}: signal {signal}: stopping everything");
                kill_everything();
                if let Some(dir) = live().dir.take() {
                    let _ = std::fs::remove_dir_all(dir);
                }
                std::process::exit(128 + signal);
            }
        }
    });
}

/// Kills a process (or, given a negative pid, a process group) unless
/// stopped within its timeout.
pub struct Watchdog {
    done: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<bool>,
}

impl Watchdog {
    pub fn start(target: i32, timeout: Duration) -> Watchdog {
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let expired = wait.recv_timeout(timeout).is_err();
            if expired {
                unsafe {
                    libc::kill(target, libc::SIGKILL);
                }
            }
            expired
        });
        Watchdog { done, thread }
    }

    /// Whether it had expired.
    pub fn stop(self) -> bool {
        let _ = self.done.send(());
        self.thread.join().unwrap()
    }
}

/// The benchmark's temporary folder, in [`Live::dir`] while it exists.
/// Dropped, it is removed, unless `TERN_BENCH_KEEP` is set: then it is kept
/// and named. Kill what runs in it first.
pub struct Folder {
    dir: tempfile::TempDir,
    bench: &'static str,
}

impl Folder {
    /// A new folder named `prefix…`; `bench` names the benchmark when kept.
    pub fn create(bench: &'static str, prefix: &str) -> Folder {
        let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
        live().dir = Some(dir.path().to_path_buf());
        Folder { dir, bench }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Folder {
    fn drop(&mut self) {
        live().dir = None;
        if std::env::var_os("TERN_BENCH_KEEP").is_some() {
            self.dir.disable_cleanup(true);
            println!("{}: kept {}", self.bench, self.dir.path().display());
        }
    }
}

// ---- agents on loopback -----------------------------------------------------

/// A port for an agent, below the ephemeral range (the tests' rule).
pub use ports::agent_port as free_port;

#[path = "../../tests/common/ports.rs"]
mod ports;

/// An inventory of `hosts` (name, port) on loopback, written to `path`.
pub fn write_inventory<S: AsRef<str>>(path: &Path, hosts: &[(S, u16)]) {
    let text: String = hosts
        .iter()
        .map(|(name, port)| {
            let name = name.as_ref();
            format!("[[host]]\nname = \"{name}\"\naddress = \"http://127.0.0.1:{port}\"\n\n")
        })
        .collect();
    std::fs::write(path, text).unwrap();
}

/// `command` (a `tern` binary) as agent `name` with `dir/NAME.toml`, logging
/// to `dir/NAME.log`, in [`Live::pids`].
pub fn start_agent(mut command: Command, dir: &Path, name: &str) -> Child {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let child = command
        .args(["agent", "--config"])
        .arg(dir.join(format!("{name}.toml")))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start agent {name}: {e}"));
    live().pids.push(child.id() as i32);
    child
}

/// What agent `name` has logged to `dir/NAME.log`.
pub fn agent_log(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default()
}

/// Until agent `name` (`child`, started by [`start_agent`] in `dir`) accepts
/// connections on `port`; panics with its log if it exits or takes 30 s.
pub fn wait_listening(name: &str, port: u16, child: &mut Child, dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("agent {name} exited ({status}):\n{}", agent_log(dir, name));
        }
        assert!(
            Instant::now() < deadline,
            "agent {name} did not listen within 30 s:\n{}",
            agent_log(dir, name)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---- QEMU outlives its agent --------------------------------------------------

/// Live QEMU processes whose pidfile is in `dir/*/` or `dir/*/qemu/`.
#[allow(dead_code)] // not every benchmark runs QEMU
pub fn qemu_pids(dir: &Path) -> Vec<i32> {
    let mut folders = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        folders.push(entry.path().join("qemu"));
        folders.push(entry.path());
    }
    folders
        .iter()
        .flat_map(|f| std::fs::read_dir(f).into_iter().flatten().flatten())
        .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|t| t.trim().parse().ok())
        .filter(|&pid| is_qemu(pid))
        .collect()
}

/// Whether `pid` runs QEMU (so a recycled pid is never signalled).
#[allow(dead_code)]
pub fn is_qemu(pid: i32) -> bool {
    pid > 1
        && std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .and_then(|exe| exe.file_name().map(|f| f.to_string_lossy().into_owned()))
            .is_some_and(|name| name.starts_with("qemu-system"))
}
