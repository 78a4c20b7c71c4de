//! Post-copy against plain pre-copy, on a real QEMU guest that pre-copy
//! cannot finish: `guest/tern-guest.S` with R MiB of RAM, every page
//! written, rewriting a working set many times a second, behind a
//! `max-bandwidth` cap of B MiB/s. Two `tern agent` processes on loopback
//! (QEMU as root: post-copy needs userfaultfd) are asked over the Console
//! API (StartMigration, then WaitMigration), as `benches/qemu_migration.rs`
//! does, side by side in one run:
//!
//! - (a) Tern with `--postcopy auto` (fast mode's default, budget 150 s per
//!   GiB): the time to completion, against the target 1.3 × R/B + setup,
//!   where setup is what the attempt spends outside QEMU's transfer (wall
//!   time minus QEMU's total-time: Begin, Prepare, the RPCs, Confirm);
//! - (b) plain pre-copy as QEMU does it by default: no post-copy, no budget
//!   (`--postcopy never --completion-timeout-per-gib 0`) and, unless
//!   `TERN_BENCH_AUTO_CONVERGE=1`, no auto-converge (QEMU's default; Tern's
//!   hosts default to it on). It must not complete within 10 × R/B; it is
//!   aborted then (the guest goes on on the source) and reported as "did
//!   not complete in X s", with what QEMU said at that point;
//! - (c) for reference, `--postcopy now`: the switch at once, so the time
//!   post-copy itself takes on this link, whatever the policy decides.
//!
//! The guest's downtime, both ways it can be read:
//! - `transfer.downtime_ms` from the record: QEMU's `downtime`, which in
//!   post-copy runs from stopping the source to sending the device state,
//!   not until the guest runs again on the destination;
//! - the guest's own view: it prints its counter on the serial port every
//!   100 ms of its running time (TSC), and its clock moves with it, so the
//!   silence on the serial files across the move (the last line on the
//!   source to the first on the destination, both files read every 5 ms)
//!   less one print interval is how long it made no progress: stopped at
//!   the switchover, then waiting for its first pages on the destination.
//!
//! Pre-copy that never completes has no downtime; the report gives QEMU's
//! expected downtime at the abort, what a stop-and-copy would have cost.
//!
//! ```sh
//! cargo bench --bench postcopy
//! TERN_BENCH_ROUNDS=3 TERN_BENCH_MEMORY_MIB=256 cargo bench --bench postcopy
//! ```
//!
//! Environment: `TERN_BENCH_ROUNDS` (2 runs each of (a) and (c); (b) runs
//! once), `TERN_BENCH_MEMORY_MIB` (128), `TERN_BENCH_WS_MIB` (16),
//! `TERN_BENCH_BANDWIDTH_MIB_S` (16), `TERN_BENCH_DOWNTIME_LIMIT_MS` (300),
//! `TERN_BENCH_AUTO_CONVERGE` (0), `TERN_BENCH_PRECOPY_LIMIT` (10: (b) is
//! stopped at this many times R/B), `TERN_BENCH_ACCEL` (tcg: nested KVM is
//! slow here, and the tests of post-copy use TCG), `TERN_BENCH_KEEP` (set:
//! keep the folder with the agents' logs). Run without `--bench` (`cargo
//! test --benches`) it does one run of each, with (b) stopped at 2 × R/B,
//! as a smoke test. Without `qemu-system-x86_64` it says so and skips, and
//! so it does when QEMU could not use userfaultfd (neither root nor
//! `vm.unprivileged_userfaultfd` = 1).
//!
//! Nothing is left running: agents and QEMU processes (found by the
//! pidfiles in each agent's `state_dir/qemu/`) are killed at the end, on a
//! panic, and on SIGINT, SIGTERM or SIGHUP.

// Its Watchdog is for scripts this benchmark does not run.
#[allow(dead_code)]
mod common;
#[path = "../tests/common/guest.rs"]
mod guest;

use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tern::proto;
use tern::proto::console_client::ConsoleClient;
use tern::protocol::completion::{CompletionRequest, Postcopy};
use tern::protocol::record::completion_request_to_proto;
use tonic::transport::Channel;

use common::{Folder, env_u64, free_port, kill_everything, live};

const TERN: &str = env!("CARGO_BIN_EXE_tern");
const QEMU: &str = "qemu-system-x86_64";
const VM: &str = "busy-01";
const HOSTS: [&str; 2] = ["qa", "qb"];
/// The target for post-copy `auto`: at most this × R/B, plus setup.
const TARGET_RATIO: f64 = 1.3;
/// How long a guest runs on its host before it moves again: its first
/// seconds there show how fast it runs after the move, its last ones its
/// usual speed and print interval (see [`GuestView`]).
const SETTLE: Duration = Duration::from_secs(3);
/// How often the serial files are read.
const SERIAL_POLL: Duration = Duration::from_millis(5);

struct Settings {
    bench: bool,
    rounds: usize,
    memory_mib: u64,
    working_set_mib: u64,
    bandwidth_mib_s: u64,
    downtime_limit_ms: u64,
    auto_converge: bool,
    /// (b) is stopped at this many times R/B.
    precopy_limit: u64,
    accel: String,
}

impl Settings {
    fn from_env(bench: bool) -> Settings {
        Settings {
            bench,
            rounds: if bench {
                env_u64("TERN_BENCH_ROUNDS", 2).max(1) as usize
            } else {
                1
            },
            memory_mib: env_u64("TERN_BENCH_MEMORY_MIB", 128),
            working_set_mib: env_u64("TERN_BENCH_WS_MIB", 16),
            bandwidth_mib_s: env_u64("TERN_BENCH_BANDWIDTH_MIB_S", 16).max(1),
            downtime_limit_ms: env_u64("TERN_BENCH_DOWNTIME_LIMIT_MS", 300),
            auto_converge: env_u64("TERN_BENCH_AUTO_CONVERGE", 0) != 0,
            precopy_limit: env_u64("TERN_BENCH_PRECOPY_LIMIT", if bench { 10 } else { 2 }),
            accel: std::env::var("TERN_BENCH_ACCEL").unwrap_or_else(|_| "tcg".into()),
        }
    }

    /// R / B: how long the guest's memory takes to cross the link once.
    fn one_pass(&self) -> Duration {
        Duration::from_secs_f64(self.memory_mib as f64 / self.bandwidth_mib_s as f64)
    }
}

// ---- cleanup: QEMU outlives its agent ---------------------------------------

// ---- the guest's serial output ----------------------------------------------

/// One counter line the guest printed, when this process read it.
#[derive(Clone, Copy)]
struct Print {
    at: Instant,
    host: usize,
    count: u64,
}

/// Reads each host's `VM.serial` every [`SERIAL_POLL`] from a thread and
/// keeps every counter line with the time it was read. A file that is new
/// (another inode: a new QEMU) or shorter is read from its start.
struct SerialWatch {
    prints: Arc<Mutex<Vec<Print>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SerialWatch {
    fn start(files: Vec<PathBuf>) -> SerialWatch {
        let prints = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (prints, stop) = (prints.clone(), stop.clone());
            std::thread::spawn(move || {
                // Per file: (inode, offset read up to, an unfinished line).
                let mut read: Vec<(u64, u64, String)> = vec![(0, 0, String::new()); files.len()];
                while !stop.load(Ordering::Relaxed) {
                    for (host, path) in files.iter().enumerate() {
                        let new = tail(path, &mut read[host]);
                        let at = Instant::now();
                        let mut prints = prints.lock().unwrap();
                        prints.extend(new.into_iter().map(|count| Print { at, host, count }));
                    }
                    std::thread::sleep(SERIAL_POLL);
                }
            })
        };
        SerialWatch {
            prints,
            stop,
            thread: Some(thread),
        }
    }

    fn prints(&self) -> Vec<Print> {
        self.prints.lock().unwrap().clone()
    }
}

impl Drop for SerialWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The counters in what was appended to `path` since the last call.
fn tail(path: &Path, (inode, offset, partial): &mut (u64, u64, String)) -> Vec<u64> {
    use std::os::unix::fs::MetadataExt;
    let Ok(mut file) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let Ok(meta) = file.metadata() else {
        return Vec::new();
    };
    if meta.ino() != *inode || meta.len() < *offset {
        (*inode, *offset) = (meta.ino(), 0);
        partial.clear();
    }
    let mut bytes = Vec::new();
    if file.seek(SeekFrom::Start(*offset)).is_err() || file.read_to_end(&mut bytes).is_err() {
        return Vec::new();
    }
    *offset += bytes.len() as u64;
    partial.push_str(&String::from_utf8_lossy(&bytes));
    let Some(end) = partial.rfind('\n') else {
        return Vec::new();
    };
    let whole: String = partial.drain(..=end).collect();
    whole
        .lines()
        .filter_map(|l| l.strip_prefix(guest::COUNT_LINE_PREFIX))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect()
}

/// What the serial files show of one move from host `from` to `to`
/// that started at `started`.
struct GuestView {
    /// From the last line on `from` to the first on `to`.
    silence: Duration,
    /// The guest's usual interval between two lines: the median on `from`
    /// in the 3 s before the move started.
    interval: Duration,
    /// Whether the first count on `to` was at least the last on `from`.
    continued: bool,
    /// From the first line on `to` until the guest counted at half its
    /// usual speed or more between two lines there (its speed on `from` in
    /// those 3 s); `Err`: not by the last line read, this long after.
    slow_for: Result<Duration, Duration>,
}

impl GuestView {
    fn of(prints: &[Print], from: usize, to: usize, started: Instant) -> Option<GuestView> {
        let first_to = prints
            .iter()
            .position(|p| p.host == to && p.at >= started)?;
        let on_to: Vec<&Print> = prints[first_to..].iter().filter(|p| p.host == to).collect();
        let last_from = prints[..first_to].iter().rfind(|p| p.host == from)?;
        let usual: Vec<&Print> = prints[..first_to]
            .iter()
            .filter(|p| {
                p.host == from && p.at <= started && started - p.at <= Duration::from_secs(3)
            })
            .collect();
        let mut gaps: Vec<f64> = usual
            .windows(2)
            .map(|w| (w[1].at - w[0].at).as_secs_f64())
            .collect();
        gaps.sort_by(f64::total_cmp);
        let interval = Duration::from_secs_f64(*gaps.get(gaps.len() / 2)?);
        let speed = |a: &Print, b: &Print| {
            let secs = (b.at - a.at).as_secs_f64();
            b.count.saturating_sub(a.count) as f64 / secs
        };
        let usual_speed = speed(usual.first()?, usual.last()?);
        let slow_for = on_to
            .windows(2)
            .find(|w| speed(w[0], w[1]) >= usual_speed / 2.0)
            .map(|w| w[0].at - on_to[0].at)
            .ok_or_else(|| on_to[on_to.len() - 1].at - on_to[0].at);
        Some(GuestView {
            silence: on_to[0].at - last_from.at,
            interval,
            continued: on_to[0].count >= last_from.count,
            slow_for,
        })
    }

    /// The silence less one print interval: how long the guest made no
    /// progress.
    fn pause(&self) -> Duration {
        self.silence.saturating_sub(self.interval)
    }
}

// ---- the Tern cluster -------------------------------------------------------

struct Cluster {
    dir: Folder,
    agents: Vec<(String, Child, u16)>,
    runtime: tokio::runtime::Runtime,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        kill_everything();
        for (_, child, _) in &mut self.agents {
            let _ = child.wait();
        }
    }
}

/// How a migration ended, as this benchmark saw it.
struct Run {
    /// StartMigration until WaitMigration answered, or until it was
    /// given up (then aborted).
    wall: Duration,
    /// The final record (as JSON), or, for a migration that was stopped,
    /// the record when it was.
    record: Value,
    /// Stopped (aborted) at the limit instead of completing.
    stopped: bool,
    started: Instant,
}

impl Cluster {
    /// Agents qa (running the guest) and qb, QEMU as the benchmark's user.
    fn start(settings: &Settings, elf: &Path) -> Cluster {
        let dir = Folder::create("postcopy", "tern-bench-postcopy-");
        let hosts = HOSTS.map(|name| (name, free_port()));
        common::write_inventory(&dir.path().join("cluster.toml"), &hosts);
        let mut cluster = Cluster {
            dir,
            agents: Vec::new(),
            runtime: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("a tokio runtime"),
        };
        for (name, port) in hosts {
            let vm = if name == "qa" {
                format!(
                    "[[vm]]\nname = \"{VM}\"\nmemory_mib = {}\nvcpus = 1\n\
                     qemu = {{ kernel = \"{}\", append = \"{}\" }}\n",
                    settings.memory_mib,
                    elf.file_name().unwrap().to_string_lossy(),
                    guest::cmdline(settings.working_set_mib)
                )
            } else {
                String::new()
            };
            let config = format!(
                "name = \"{name}\"\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"{name}-state\"\n\
                 inventory = \"cluster.toml\"\n\n[hypervisor]\nkind = \"qemu\"\nbinary = \"{QEMU}\"\n\
                 accel = \"{}\"\nbandwidth_mib_s = {}\ndowntime_limit_ms = {}\nauto_converge = {}\n\
                 memory_mib = 8192\nvcpus = 8\nkernel_dir = {:?}\n\n{vm}",
                settings.accel,
                settings.bandwidth_mib_s,
                settings.downtime_limit_ms,
                settings.auto_converge,
                elf.parent().unwrap(),
            );
            std::fs::write(cluster.path().join(format!("{name}.toml")), config).unwrap();
            let child = common::start_agent(Command::new(TERN), cluster.dir.path(), name);
            cluster.agents.push((name.to_string(), child, port));
            let (_, child, _) = cluster.agents.last_mut().unwrap();
            common::wait_listening(name, port, child, cluster.dir.path());
        }
        cluster
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn serial(&self, host: &str) -> PathBuf {
        self.path()
            .join(format!("{host}-state"))
            .join("qemu")
            .join(format!("{VM}.serial"))
    }

    fn log(&self, name: &str) -> String {
        common::agent_log(self.path(), name)
    }

    /// Until the guest on `host` prints its counter (it has written all
    /// its RAM, or arrived and runs).
    fn wait_counting(&self, host: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let text = std::fs::read_to_string(self.serial(host)).unwrap_or_default();
            if text.contains(guest::COUNT_LINE_PREFIX) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{VM} on {host} did not count within 120 s; serial: {text:?}\n{}",
                self.log(host)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    async fn client(&self, name: &str) -> ConsoleClient<Channel> {
        let port = self
            .agents
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, _, port)| *port)
            .expect("a known agent");
        ConsoleClient::connect(format!("http://127.0.0.1:{port}"))
            .await
            .unwrap_or_else(|e| panic!("connecting to agent {name}: {e}"))
    }

    /// Move the guest from `from` to `to` with this completion policy over
    /// the Console API; if it has not ended within `limit`, abort it and
    /// return the record as it was then.
    fn migrate(&self, from: &str, to: &str, completion: CompletionRequest, limit: Duration) -> Run {
        self.runtime.block_on(async {
            let mut client = self.client(from).await;
            let started = Instant::now();
            let record = client
                .start_migration(proto::StartMigrationRequest {
                    vm: VM.into(),
                    destination: to.into(),
                    mode: proto::Mode::Fast as i32,
                    completion: completion_request_to_proto(&completion),
                })
                .await
                .unwrap_or_else(|e| panic!("StartMigration {VM} to {to}: {}", e.message()))
                .into_inner();
            let id = proto::MigrationRef { id: record.id };
            let waited = tokio::time::timeout(limit, client.wait_migration(id.clone())).await;
            let (record, stopped, ended) = match waited {
                Ok(finished) => (
                    finished
                        .unwrap_or_else(|e| panic!("WaitMigration: {}", e.message()))
                        .into_inner(),
                    false,
                    Instant::now(),
                ),
                Err(_) => {
                    let ended = Instant::now();
                    let then = client
                        .get_migration(id.clone())
                        .await
                        .unwrap_or_else(|e| panic!("GetMigration: {}", e.message()))
                        .into_inner();
                    client
                        .abort(id.clone())
                        .await
                        .unwrap_or_else(|e| panic!("Abort: {}", e.message()));
                    let aborted =
                        tokio::time::timeout(Duration::from_secs(60), client.wait_migration(id))
                            .await
                            .expect("the aborted migration ended within 60 s")
                            .unwrap_or_else(|e| panic!("WaitMigration: {}", e.message()))
                            .into_inner();
                    assert_eq!(
                        aborted.outcome,
                        proto::Outcome::Aborted as i32,
                        "the stopped migration was aborted: {aborted:?}"
                    );
                    (then, true, ended)
                }
            };
            let record =
                serde_json::to_value(tern::protocol::record::MigrationRecord::from(&record))
                    .expect("records serialize");
            Run {
                wall: ended - started,
                record,
                stopped,
                started,
            }
        })
    }
}

// ---- the report -------------------------------------------------------------

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / f64::from(1 << 20))
}

/// A post-copy move: how it ended, its transfer's time over R/B, and what
/// the serial files showed of it.
struct Moved {
    run: Run,
    ratio: f64,
    view: Option<GuestView>,
}

/// One post-copy run, checked and described: its lines, and its transfer's
/// time over R/B.
fn postcopy_line(
    label: &str,
    settings: &Settings,
    run: &Run,
    view: Option<&GuestView>,
) -> (String, f64) {
    let r = &run.record;
    let t = &r["transfer"];
    assert_eq!(r["outcome"], "succeeded", "{label}: {r}");
    assert_eq!(t["stage"], "postcopy", "{label}: {r}");
    let transfer = Duration::from_millis(t["elapsed_ms"].as_u64().unwrap_or(0));
    let setup = run.wall.saturating_sub(transfer);
    let pass = settings.one_pass();
    let limit = pass.mul_f64(TARGET_RATIO) + setup;
    let note = r["completion_note"].as_str().unwrap_or("");
    let ratio = transfer.as_secs_f64() / pass.as_secs_f64();
    let mut line = format!(
        "{label}: completed in {} (QEMU's transfer {} = {ratio:.2} × R/B, setup {}); \
         limit 1.3 × R/B + setup = {}: {}\n    {note}\n    sent {} in {} passes, {} pages asked \
         for by the destination; downtime: QEMU's {} ms",
        secs(run.wall),
        secs(transfer),
        ms(setup),
        secs(limit),
        if run.wall <= limit { "met" } else { "NOT MET" },
        mib(t["bytes_transferred"].as_u64().unwrap_or(0)),
        t["iteration"],
        t["postcopy_requests"],
        t["downtime_ms"],
    );
    let downtime = t["downtime_ms"].as_u64().unwrap_or(0);
    if downtime > transfer.as_millis() as u64 {
        line.push_str(" (impossible: longer than the transfer)");
    }
    match view {
        Some(v) => line.push_str(&format!(
            ", the guest's {} (serial silent {}, prints every {}{}); then below half its usual \
             speed for {}",
            ms(v.pause()),
            ms(v.silence),
            ms(v.interval),
            if v.continued {
                ""
            } else {
                "; ITS COUNTER WENT BACK"
            },
            match v.slow_for {
                Ok(d) => ms(d),
                Err(d) => format!("more than {} (all that was watched)", ms(d)),
            },
        )),
        None => line.push_str(", the guest's unknown (no serial lines to compare)"),
    }
    (line, ratio)
}

fn precopy_line(settings: &Settings, run: &Run) -> String {
    let r = &run.record;
    let t = &r["transfer"];
    let c = &r["convergence"];
    let pass = settings.one_pass();
    if !run.stopped {
        return format!(
            "(b) pre-copy only, no budget: COMPLETED in {} ({:.2} × R/B), outcome {}, downtime {} ms: \
             this guest did not defeat pre-copy here\n    {r}",
            secs(run.wall),
            run.wall.as_secs_f64() / pass.as_secs_f64(),
            r["outcome"],
            t["downtime_ms"],
        );
    }
    format!(
        "(b) pre-copy only, no budget: did not complete in {} ({} × R/B); stopped (aborted, the \
         guest runs on the source)\n    by then: {} sent in {} passes ({:.1} × the guest's RAM), \
         {} left; QEMU's expected downtime for a stop-and-copy then {} ms\n    the model said \
         {}{}: {}",
        secs(run.wall),
        settings.precopy_limit,
        mib(t["bytes_transferred"].as_u64().unwrap_or(0)),
        t["iteration"],
        t["bytes_transferred"].as_u64().unwrap_or(0) as f64 / (settings.memory_mib << 20) as f64,
        mib(t["bytes_remaining"].as_u64().unwrap_or(0)),
        t["expected_downtime_ms"],
        c["verdict"].as_str().unwrap_or("nothing"),
        c["eta_ms"]
            .as_u64()
            .map(|eta| format!(" (ETA {})", secs(Duration::from_millis(eta))))
            .unwrap_or_default(),
        c["reason"].as_str().unwrap_or(""),
    )
}

fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn available(program: &str) -> bool {
    match Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(_) => true,
        Err(e) if e.kind() == ErrorKind::NotFound => false,
        Err(e) => panic!("cannot run {program}: {e}"),
    }
}

/// QEMU runs as this process's user: post-copy needs root, or the sysctl.
fn userfaultfd() -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    root || std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
        .is_ok_and(|v| v.trim() == "1")
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    if !available(QEMU) {
        println!("postcopy: skipped: {QEMU} not found (apt-get install qemu-system-x86)");
        return;
    }
    if !userfaultfd() {
        println!(
            "postcopy: skipped: QEMU would run as this user, who may not use userfaultfd \
             (run as root, or set vm.unprivileged_userfaultfd = 1)"
        );
        return;
    }
    live().strays = common::qemu_pids;
    common::handle_signals("postcopy");
    let settings = Settings::from_env(bench);
    let build = tempfile::tempdir().unwrap();
    let elf = guest::build(build.path()).unwrap_or_else(|e| panic!("building the guest: {e}"));
    let pass = settings.one_pass();
    println!(
        "postcopy: R = {} MiB guest rewriting a {} MiB working set, {}, B = {} MiB/s \
         (max-bandwidth and max-postcopy-bandwidth), downtime-limit {} ms, auto-converge {}; \
         R/B = {}{}",
        settings.memory_mib,
        settings.working_set_mib,
        settings.accel,
        settings.bandwidth_mib_s,
        settings.downtime_limit_ms,
        if settings.auto_converge { "on" } else { "off" },
        secs(pass),
        if settings.bench {
            ""
        } else {
            " (smoke test: one run each)"
        },
    );
    let cluster = Cluster::start(&settings, &elf);
    let watch = SerialWatch::start(HOSTS.iter().map(|h| cluster.serial(h)).collect());
    cluster.wait_counting("qa");
    std::thread::sleep(SETTLE);
    let mut on = 0;
    let policy = |postcopy: Postcopy, timeout_per_gib_s: Option<u64>| CompletionRequest {
        postcopy: Some(postcopy),
        timeout_per_gib_s,
        ..CompletionRequest::default()
    };
    // Post-copy completes or the benchmark fails: a generous limit.
    let completes = pass * 30 + Duration::from_secs(60);
    let (mut auto, mut now) = (Vec::new(), Vec::new());
    for round in 1..=settings.rounds {
        for (label, postcopy, moves) in [
            ("(a) --postcopy auto", Postcopy::Auto, &mut auto),
            ("(c) --postcopy now ", Postcopy::Now, &mut now),
        ] {
            let to = 1 - on;
            let run = cluster.migrate(HOSTS[on], HOSTS[to], policy(postcopy, None), completes);
            assert!(!run.stopped, "{label}: not done within {}", secs(completes));
            cluster.wait_counting(HOSTS[to]);
            std::thread::sleep(SETTLE);
            let view = GuestView::of(&watch.prints(), on, to, run.started);
            let label = format!("round {round} {label} {}→{}", HOSTS[on], HOSTS[to]);
            let (line, ratio) = postcopy_line(&label, &settings, &run, view.as_ref());
            println!("{line}");
            moves.push(Moved { run, ratio, view });
            on = to;
        }
    }
    // (b): the same guest, pre-copy only, no budget, stopped at the limit.
    let limit = pass * settings.precopy_limit as u32;
    let to = 1 - on;
    let run = cluster.migrate(
        HOSTS[on],
        HOSTS[to],
        policy(Postcopy::Never, Some(0)),
        limit,
    );
    println!("{}", precopy_line(&settings, &run));
    if run.stopped {
        // The guest goes on where it was.
        let before = watch.prints().iter().filter(|p| p.host == on).count();
        std::thread::sleep(Duration::from_millis(500));
        let after = watch.prints().iter().filter(|p| p.host == on).count();
        assert!(
            after > before,
            "the guest runs on {} after the abort",
            HOSTS[on]
        );
    }
    let precopy = run;

    println!();
    println!(
        "summary (R/B = {}, {} run(s) each of (a) and (c)):",
        secs(pass),
        auto.len()
    );
    for (name, runs, target) in [
        ("(a) post-copy auto", &auto, true),
        ("(c) post-copy now", &now, false),
    ] {
        let p50 = |f: &dyn Fn(&Moved) -> Option<f64>| median(runs.iter().filter_map(f));
        let wall = p50(&|m| Some(m.run.wall.as_secs_f64()));
        let ratio = p50(&|m| Some(m.ratio));
        let met = runs.iter().filter(|m| m.ratio <= TARGET_RATIO).count();
        let pause = p50(&|m| m.view.as_ref().map(|v| v.pause().as_secs_f64() * 1000.0));
        // QEMU 7.2's post-copy downtime can be its clock (see the lines above).
        let qemu = p50(&|m| {
            let t = &m.run.record["transfer"];
            let downtime = t["downtime_ms"].as_u64()?;
            (downtime <= t["elapsed_ms"].as_u64()?).then_some(downtime as f64)
        });
        let target = if target {
            format!(" (target ≤ {TARGET_RATIO}: met in {met} of {})", runs.len())
        } else {
            String::new()
        };
        println!(
            "  {name:<20} completed: wall p50 {wall:.1} s, QEMU's transfer p50 {ratio:.2} × R/B{target}; \
             guest paused p50 {pause:.0} ms (QEMU's downtime p50 {qemu:.0} ms)"
        );
    }
    let t = &precopy.record["transfer"];
    if precopy.stopped {
        println!(
            "  {:<20} did not complete in {} ({} × R/B); never paused; a stop-and-copy would have \
             paused it about {} ms (QEMU's expected downtime)",
            "(b) pre-copy only",
            secs(precopy.wall),
            settings.precopy_limit,
            t["expected_downtime_ms"],
        );
    } else {
        println!(
            "  {:<20} COMPLETED in {}; downtime {} ms",
            "(b) pre-copy only",
            secs(precopy.wall),
            t["downtime_ms"]
        );
    }
    drop(watch);
    drop(cluster);
}
