//! Tern against plain QMP: the same live migration of a real QEMU guest,
//! driven once by Tern (two `tern agent` processes on loopback, asked over
//! the Console API: StartMigration, then WaitMigration) and once directly
//! over QMP by `benches/qmp-migrate.py`, with the same QEMU command line,
//! capabilities and parameters. Target: Tern's median wall time at most
//! 1.05 × the direct one.
//!
//! Both are timed from inside an already connected client: the script from
//! starting the destination QEMU to the source QEMU's exit, Tern from
//! StartMigration (the source agent's Begin) to WaitMigration's answer,
//! which comes once Confirm has quit the source QEMU. What the `tern
//! migrate` command adds as a process (start-up, connecting to every
//! agent, finding the VM's host: 10–20 ms on loopback) is left out, as the
//! script's own start-up and QMP connection are.
//!
//! The guest is `guest/tern-guest.S` with 512 MiB of RAM, all of it written,
//! rewriting a 64 MiB working set as fast as its vCPU can. Each round runs,
//! in turn: Tern qa → qb, the script, Tern qb → qa, the script, so both
//! methods get the same number of samples and share the machine's noise.
//!
//! Both methods migrate a guest with the same history, which matters more
//! than what is measured here:
//!
//! - it arrived by migration: Tern's first migration is an untimed warm-up,
//!   and the script (`--warm-up 1`) migrates its freshly booted guest once,
//!   untimed, before the timed hop. Without that the script's migrations
//!   took 3.4 times as long as Tern's (QEMU's total-time p50 3.1 s against
//!   0.9 s), mostly because of the host effect below;
//! - it was then stopped for a second or two: the script's guest boots,
//!   fills its RAM and makes its warm-up hop while Tern's runs; from then
//!   until the script ends (its timed migration) Tern's guest is stopped
//!   (SIGSTOP) so that it does not compete for the CPUs. A guest stopped for
//!   seconds migrates more slowly afterwards (total-time p50 499 ms against
//!   435 ms after a 3 s stop here), so the script stops its own guest as
//!   long after the warm-up hop (`--stop-ms`: how long Tern's was stopped
//!   during the previous run);
//! - then it ran for half a second, and the last QEMU to exit (freeing its
//!   RAM) did so about half a second before the measured migration.
//!
//! On a nested-KVM host with a free-page-reporting balloon (the Firecracker
//! VMs this was written on) memory freed more than ~2 s before a QEMU
//! allocates it has been handed back to the outer host and costs much more
//! to get again: the same migration took 1.3–1.7 s instead of 0.4–0.5 s
//! when the destination started 5 s after the previous QEMU exited instead
//! of 0.5 s. Each measured migration here starts about half a second after
//! the previous QEMU exited, for both methods alike; keep it that way when
//! changing the order.
//!
//! The report gives, per method, the wall time, QEMU's total-time, and
//! their difference: what the method adds around QEMU's own migration
//! (starting the destination, connecting, polling, switching over, the
//! source's exit; for Tern also gRPC, the peer RPCs and the journal). The
//! transfer itself depends on CPU contention and varies by seconds between
//! samples on a loaded machine, so the overhead is the steadier comparison:
//! the report also gives the ratio Tern would have if both transfers took
//! direct's median total-time.
//!
//! ```sh
//! cargo bench --bench qemu_migration
//! TERN_BENCH_ROUNDS=10 cargo bench --bench qemu_migration
//! ```
//!
//! Environment: `TERN_BENCH_ROUNDS` (5), `TERN_BENCH_WS_MIB` (64),
//! `TERN_BENCH_BANDWIDTH_MIB_S` (1024), `TERN_BENCH_DOWNTIME_LIMIT_MS` (300),
//! `TERN_BENCH_AUTO_CONVERGE` (1), `TERN_BENCH_MULTIFD_CHANNELS` (0),
//! `TERN_BENCH_ACCEL` (kvm when /dev/kvm opens, else tcg), `TERN_BENCH_KEEP`
//! (set: keep the folder with the agents' logs and configs). Run without
//! `--bench` (`cargo test --benches`) it does one round, as a smoke test.
//! Without `qemu-system-x86_64` or `python3` it says so and skips.
//!
//! Nothing is left running: agents, Tern's QEMU processes (found by the
//! pidfiles in each agent's `state_dir/qemu/`: QEMU outlives its agent by
//! design) and the script's process group are killed at the end, on a panic,
//! and on SIGINT, SIGTERM or SIGHUP.

mod common;
#[path = "../tests/common/guest.rs"]
mod guest;

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;
use tern::proto::console_client::ConsoleClient;
use tonic::transport::Channel;

use common::{Folder, Watchdog, env_u64, free_port, kill_everything, live};

const TERN: &str = env!("CARGO_BIN_EXE_tern");
const QEMU: &str = "qemu-system-x86_64";
const VM: &str = "bench-01";
const MEMORY_MIB: u64 = 512;
const TARGET_RATIO: f64 = 1.05;
/// How long a guest runs before each measured migration.
const SETTLE: Duration = Duration::from_millis(500);
/// The longest one migration (or one run of the script) may take.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(180);
const PHASES: [&str; 5] = ["begin", "prepare", "perform", "finish", "confirm"];
const STEPS: [&str; 5] = [
    "start_destination",
    "listen_and_configure",
    "transfer",
    "incoming_complete",
    "cont_and_quit",
];

/// The migration settings both methods use.
struct Settings {
    rounds: usize,
    working_set_mib: u64,
    bandwidth_mib_s: u64,
    downtime_limit_ms: u64,
    auto_converge: bool,
    multifd_channels: u32,
    accel: String,
}

impl Settings {
    fn from_env(bench: bool) -> Settings {
        // The agents' own rule for "auto": KVM when /dev/kvm opens.
        let accel = std::env::var("TERN_BENCH_ACCEL")
            .unwrap_or_else(|_| tern::hypervisor::qemu::resolve_accel("auto"));
        Settings {
            rounds: if bench {
                env_u64("TERN_BENCH_ROUNDS", 5).max(1) as usize
            } else {
                1
            },
            working_set_mib: env_u64("TERN_BENCH_WS_MIB", 64),
            bandwidth_mib_s: env_u64("TERN_BENCH_BANDWIDTH_MIB_S", 1024),
            downtime_limit_ms: env_u64("TERN_BENCH_DOWNTIME_LIMIT_MS", 300),
            auto_converge: env_u64("TERN_BENCH_AUTO_CONVERGE", 1) != 0,
            multifd_channels: env_u64("TERN_BENCH_MULTIFD_CHANNELS", 0) as u32,
            accel,
        }
    }
}

// ---- cleanup: QEMU outlives its agent ---------------------------------------

// ---- the Tern cluster -------------------------------------------------------

struct Cluster {
    dir: Folder,
    agents: Vec<(String, Child, u16)>,
    runtime: tokio::runtime::Runtime,
    /// One open Console connection per agent, made on first use.
    clients: Mutex<std::collections::HashMap<String, ConsoleClient<Channel>>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        kill_everything();
        for (_, child, _) in &mut self.agents {
            let _ = child.wait();
        }
    }
}

impl Cluster {
    /// Agents qa (running the guest) and qb, with the benchmark's settings.
    fn start(settings: &Settings, elf: &Path) -> Cluster {
        let dir = Folder::create("qemu_migration", "tern-bench-qemu-");
        let hosts = [("qa", free_port()), ("qb", free_port())];
        common::write_inventory(&dir.path().join("cluster.toml"), &hosts);
        let mut cluster = Cluster {
            dir,
            agents: Vec::new(),
            runtime: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("a tokio runtime"),
            clients: Mutex::new(std::collections::HashMap::new()),
        };
        for (name, port) in hosts {
            let vm = if name == "qa" {
                format!(
                    "[[vm]]\nname = \"{VM}\"\nmemory_mib = {MEMORY_MIB}\nvcpus = 1\n\
                     qemu = {{ kernel = \"{}\", append = \"{}\" }}\n",
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
                 multifd_channels = {}\nmemory_mib = 8192\nvcpus = 8\nkernel_dir = {:?}\n\n{vm}",
                settings.accel,
                settings.bandwidth_mib_s,
                settings.downtime_limit_ms,
                settings.auto_converge,
                settings.multifd_channels,
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

    async fn client(&self, name: &str, port: u16) -> ConsoleClient<Channel> {
        if let Some(client) = self.clients.lock().unwrap().get(name) {
            return client.clone();
        }
        let client = ConsoleClient::connect(format!("http://127.0.0.1:{port}"))
            .await
            .unwrap_or_else(|e| panic!("connecting to agent {name}: {e}"));
        self.clients
            .lock()
            .unwrap()
            .insert(name.to_string(), client.clone());
        client
    }

    fn log(&self, name: &str) -> String {
        common::agent_log(self.path(), name)
    }

    fn qemu_file(&self, host: &str, ext: &str) -> PathBuf {
        self.path()
            .join(format!("{host}-state"))
            .join("qemu")
            .join(format!("{VM}.{ext}"))
    }

    /// Until the guest on `host` has written all its RAM.
    fn wait_ready(&self, host: &str) {
        let serial = self.qemu_file(host, "serial");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let text = std::fs::read_to_string(&serial).unwrap_or_default();
            if text.contains("ready") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{VM} on {host} did not fill its RAM within 120 s; serial: {text:?}\n{}",
                self.log(host)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGSTOP or SIGCONT the guest's QEMU on `host`.
    fn signal_guest(&self, host: &str, signal: i32) {
        let pid = std::fs::read_to_string(self.qemu_file(host, "pid"))
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok())
            .filter(|&pid| common::is_qemu(pid))
            .unwrap_or_else(|| panic!("no QEMU for {VM} on {host}"));
        unsafe {
            libc::kill(pid, signal);
        }
    }

    /// A migration to `to` over the Console API, timed in this process like
    /// the script times itself: from StartMigration (the source agent's
    /// Begin) until WaitMigration answers, which is after Confirm has quit
    /// the source QEMU. The connection to the agent is already open, as the
    /// script's QMP connection to its source is; what `tern migrate` adds
    /// as a process (start-up, connecting, finding the VM's host) is left
    /// out for both.
    fn migrate(&self, to: &str) -> Sample {
        use tern::proto;
        let from = self
            .agents
            .iter()
            .find(|(name, _, _)| name != to)
            .map(|(name, _, port)| (name.clone(), *port))
            .expect("two agents");
        let (wall, record) = self.runtime.block_on(async {
            let mut client = self.client(&from.0, from.1).await;
            let started = Instant::now();
            let record = client
                .start_migration(proto::StartMigrationRequest {
                    completion: None,
                    vm: VM.into(),
                    destination: to.into(),
                    mode: proto::Mode::Safe as i32,
                })
                .await
                .unwrap_or_else(|e| panic!("StartMigration {VM} to {to}: {}", e.message()))
                .into_inner();
            let finished = tokio::time::timeout(
                MIGRATION_TIMEOUT,
                client.wait_migration(proto::MigrationRef { id: record.id }),
            )
            .await
            .unwrap_or_else(|_| {
                panic!("the migration to {to} did not end within {MIGRATION_TIMEOUT:?}")
            })
            .unwrap_or_else(|e| panic!("WaitMigration: {}", e.message()))
            .into_inner();
            (started.elapsed(), finished)
        });
        let record = serde_json::to_value(tern::protocol::record::MigrationRecord::from(&record))
            .expect("records serialize");
        assert!(
            record["outcome"] == "succeeded",
            "the migration to {to} did not succeed: {record}"
        );
        let transfer = &record["transfer"];
        let phase = |name: &str| {
            record["phases"]
                .as_array()
                .and_then(|p| p.iter().find(|p| p["phase"] == name))
                .and_then(|p| p["duration_ms"].as_f64())
                .unwrap_or(f64::NAN)
        };
        Sample {
            wall_ms: wall.as_secs_f64() * 1000.0,
            total_time_ms: transfer["elapsed_ms"].as_u64().unwrap_or(0),
            downtime_ms: transfer["downtime_ms"].as_u64().unwrap_or(0),
            setup_time_ms: transfer["setup_time_ms"].as_u64().unwrap_or(0),
            bytes: transfer["bytes_transferred"].as_u64().unwrap_or(0),
            passes: transfer["iteration"].as_u64().unwrap_or(0),
            steps: PHASES.iter().map(|p| phase(p)).collect(),
        }
    }
}

// ---- the direct QMP script --------------------------------------------------

/// One run of the script. Its fresh guest boots, fills its RAM, makes its
/// warm-up hop and is stopped for `stop` while Tern's guest still runs;
/// `on_ready` is called just before the script goes on to its timed
/// migration.
fn direct(
    settings: &Settings,
    elf: &Path,
    dir: &Path,
    stop: Duration,
    on_ready: impl FnOnce(),
) -> Sample {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/qmp-migrate.py");
    let mut command = Command::new("python3");
    command
        .arg(&script)
        .args(["--qemu", QEMU, "--kernel"])
        .arg(elf)
        .args(["--memory-mib", &MEMORY_MIB.to_string()])
        .args(["--ws-mib", &settings.working_set_mib.to_string()])
        .args([
            "--vcpus",
            "1",
            "--machine",
            "pc",
            "--accel",
            &settings.accel,
        ])
        .args([
            "--max-bandwidth",
            &(settings.bandwidth_mib_s << 20).to_string(),
        ])
        .args(["--downtime-limit", &settings.downtime_limit_ms.to_string()])
        .args([
            "--auto-converge",
            if settings.auto_converge { "1" } else { "0" },
        ])
        .args(["--multifd-channels", &settings.multifd_channels.to_string()])
        .args([
            "--settle-ms",
            &SETTLE.as_millis().to_string(),
            "--warm-up",
            "1",
            "--go-on-stdin",
            "--stop-ms",
            &stop.as_millis().to_string(),
        ])
        .arg("--dir")
        .arg(dir);
    std::fs::create_dir_all(dir).unwrap();
    let errors = dir.join("script.err");
    // Its own process group, with the QEMU processes it starts: killing the
    // group leaves nothing behind.
    let mut child = std::os::unix::process::CommandExt::process_group(&mut command, 0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&errors).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run python3 {}: {e}", script.display()));
    let group = child.id() as i32;
    live().groups.push(group);
    let watchdog = Watchdog::start(-group, MIGRATION_TIMEOUT);
    let mut stdin = child.stdin.take().unwrap();
    let mut on_ready = Some(on_ready);
    let mut lines = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap_or_default();
        if line.contains("\"ready\"")
            && let Some(on_ready) = on_ready.take()
        {
            on_ready();
            let _ = writeln!(stdin, "go");
        }
        lines.push(line);
    }
    drop(stdin);
    let status = child.wait().unwrap();
    let expired = watchdog.stop();
    unsafe {
        libc::kill(-group, libc::SIGKILL);
    }
    live().groups.retain(|&g| g != group);
    assert!(
        !expired,
        "qmp-migrate.py did not finish within {MIGRATION_TIMEOUT:?}"
    );
    let result: Value = lines
        .iter()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| status.success() && v.get("wall_ms").is_some())
        .unwrap_or_else(|| {
            panic!(
                "qmp-migrate.py failed ({status})\nstdout: {}\nstderr: {}",
                lines.join("\n"),
                std::fs::read_to_string(&errors).unwrap_or_default()
            )
        });
    let number = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    Sample {
        wall_ms: number(&result["wall_ms"]),
        total_time_ms: result["total_time_ms"].as_u64().unwrap_or(0),
        downtime_ms: result["downtime_ms"].as_u64().unwrap_or(0),
        setup_time_ms: result["setup_time_ms"].as_u64().unwrap_or(0),
        bytes: result["bytes_transferred"].as_u64().unwrap_or(0),
        passes: result["dirty_sync_count"].as_u64().unwrap_or(0),
        steps: STEPS
            .iter()
            .map(|s| number(&result["steps_ms"][s]))
            .collect(),
    }
}

// ---- samples and the report -------------------------------------------------

struct Sample {
    wall_ms: f64,
    /// QEMU's total-time (Tern: transfer.elapsed_ms).
    total_time_ms: u64,
    /// 0: QEMU did not say.
    downtime_ms: u64,
    setup_time_ms: u64,
    bytes: u64,
    /// QEMU's dirty-sync-count: passes over RAM.
    passes: u64,
    /// Tern: PHASES; direct: STEPS.
    steps: Vec<f64>,
}

impl Sample {
    fn line(&self, label: &str, names: &[&str]) -> String {
        let steps: Vec<String> = names
            .iter()
            .zip(&self.steps)
            .map(|(n, v)| format!("{n} {v:.0}"))
            .collect();
        format!(
            "{label:<22} wall {:>6.0} ms  qemu total {:>5} ms  downtime {:>4} ms  {:>4} MiB  {:>2} passes  [{}]",
            self.wall_ms,
            self.total_time_ms,
            self.downtime_ms,
            self.bytes >> 20,
            self.passes,
            steps.join(", ")
        )
    }
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

fn min(values: impl IntoIterator<Item = f64>) -> f64 {
    values.into_iter().fold(f64::INFINITY, f64::min)
}

struct Summary {
    wall_p50: f64,
    wall_min: f64,
    total_p50: f64,
    overhead_p50: f64,
    downtime_p50: f64,
    downtime_unknown: usize,
    setup_p50: f64,
    bytes_p50: f64,
}

fn summarise(samples: &[Sample]) -> Summary {
    let known: Vec<f64> = samples
        .iter()
        .filter(|s| s.downtime_ms > 0)
        .map(|s| s.downtime_ms as f64)
        .collect();
    Summary {
        wall_p50: median(samples.iter().map(|s| s.wall_ms)),
        wall_min: min(samples.iter().map(|s| s.wall_ms)),
        total_p50: median(samples.iter().map(|s| s.total_time_ms as f64)),
        overhead_p50: median(samples.iter().map(|s| s.wall_ms - s.total_time_ms as f64)),
        downtime_p50: median(known.iter().copied()),
        downtime_unknown: samples.len() - known.len(),
        setup_p50: median(samples.iter().map(|s| s.setup_time_ms as f64)),
        bytes_p50: median(samples.iter().map(|s| s.bytes as f64)),
    }
}

fn report(settings: &Settings, tern: &[Sample], direct: &[Sample]) {
    let (t, d) = (summarise(tern), summarise(direct));
    println!();
    println!(
        "qemu_migration: {MEMORY_MIB} MiB guest, working set {} MiB, {}, max-bandwidth {} MiB/s, \
         downtime-limit {} ms, auto-converge {}, multifd {}; {} rounds",
        settings.working_set_mib,
        settings.accel,
        settings.bandwidth_mib_s,
        settings.downtime_limit_ms,
        if settings.auto_converge { "on" } else { "off" },
        match settings.multifd_channels {
            0 => "off".to_string(),
            n => format!("{n} channels"),
        },
        settings.rounds
    );
    println!(
        "{:<14} {:>7} {:>10} {:>10} {:>15} {:>15} {:>13} {:>11} {:>10}",
        "method",
        "samples",
        "wall p50",
        "wall min",
        "qemu total p50",
        "wall-total p50",
        "downtime p50",
        "setup p50",
        "bytes p50"
    );
    for (name, n, s) in [("tern", tern.len(), &t), ("direct (QMP)", direct.len(), &d)] {
        let downtime = if s.downtime_unknown > 0 {
            format!("{:.0} ms ({}×0)", s.downtime_p50, s.downtime_unknown)
        } else {
            format!("{:.0} ms", s.downtime_p50)
        };
        println!(
            "{name:<14} {n:>7} {:>7.0} ms {:>7.0} ms {:>12.0} ms {:>12.0} ms {downtime:>13} {:>8.0} ms {:>6.0} MiB",
            s.wall_p50,
            s.wall_min,
            s.total_p50,
            s.overhead_p50,
            s.setup_p50,
            s.bytes_p50 / f64::from(1 << 20),
        );
    }
    let ratio = t.wall_p50 / d.wall_p50;
    println!(
        "ratio tern/direct, wall p50: {ratio:.3} (target ≤ {TARGET_RATIO}): {}   [wall min: {:.3}]",
        if ratio <= TARGET_RATIO {
            "met"
        } else {
            "NOT MET"
        },
        t.wall_min / d.wall_min
    );
    // Both drive the same QEMU migration: with the same transfer, the ratio
    // is set by what each adds around it.
    let adjusted = (d.total_p50 + t.overhead_p50) / (d.total_p50 + d.overhead_p50);
    println!(
        "overhead around QEMU's migration (wall - total-time) p50: tern {:.0} ms, direct {:.0} ms \
         (tern {:+.0} ms); ratio at direct's median total-time: {adjusted:.3} ({})",
        t.overhead_p50,
        d.overhead_p50,
        t.overhead_p50 - d.overhead_p50,
        if adjusted <= TARGET_RATIO {
            "met"
        } else {
            "NOT MET"
        },
    );
    let unattributed = median(tern.iter().map(|s| s.wall_ms - s.steps.iter().sum::<f64>()));
    let phases: Vec<String> = PHASES
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{p} {:.0}", median(tern.iter().map(|s| s.steps[i]))))
        .collect();
    println!(
        "tern phases p50 (ms): {}; outside the phases {unattributed:.0} \
         (the RPCs, and the source QEMU's exit in Confirm)",
        phases.join(", ")
    );
    let steps: Vec<String> = STEPS
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{p} {:.1}", median(direct.iter().map(|s| s.steps[i]))))
        .collect();
    println!("direct steps p50 (ms): {}", steps.join(", "));
    if t.downtime_unknown + d.downtime_unknown > 0 {
        println!(
            "(k×0: k samples reported downtime 0, i.e. unknown; they are left out of the median)"
        );
    }
}

fn available(program: &str, arg: &str) -> bool {
    match Command::new(program)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(_) => true,
        Err(e) if e.kind() == ErrorKind::NotFound => false,
        Err(e) => panic!("cannot run {program}: {e}"),
    }
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    for (program, package) in [(QEMU, "qemu-system-x86"), ("python3", "python3")] {
        if !available(program, "--version") {
            println!("qemu_migration: skipped: {program} not found (apt-get install {package})");
            return;
        }
    }
    live().strays = common::qemu_pids;
    common::handle_signals("qemu_migration");
    let settings = Settings::from_env(bench);
    let build = tempfile::tempdir().unwrap();
    let elf = guest::build(build.path()).unwrap_or_else(|e| panic!("building the guest: {e}"));
    let cluster = Cluster::start(&settings, &elf);
    cluster.wait_ready("qa");
    // Untimed: every measured migration then starts from a guest that
    // arrived by migration (the script's too, with --warm-up).
    std::thread::sleep(SETTLE);
    let warm_up = cluster.migrate("qb");
    println!(
        "{} (not counted)",
        warm_up.line("warm-up tern qa→qb", &PHASES)
    );
    let mut on = "qb";
    let (mut tern, mut direct_samples) = (Vec::new(), Vec::new());
    let mut runs = 0;
    // How long Tern's guest was stopped during the script's last run; the
    // script stops its own guest as long, so that both have the same history.
    let mut stopped = Duration::from_millis(1500);
    let mut stops = Vec::new();
    for round in 1..=settings.rounds {
        for _ in 0..2 {
            let to = if on == "qa" { "qb" } else { "qa" };
            std::thread::sleep(SETTLE);
            let sample = cluster.migrate(to);
            println!(
                "{}",
                sample.line(&format!("round {round} tern {on}→{to}"), &PHASES)
            );
            tern.push(sample);
            on = to;

            // Tern's guest sits still while the script's migrates.
            runs += 1;
            let dir = cluster.path().join(format!("direct-{runs}"));
            let since = std::cell::Cell::new(None);
            let sample = direct(&settings, &elf, &dir, stopped, || {
                cluster.signal_guest(on, libc::SIGSTOP);
                since.set(Some(Instant::now()));
            });
            cluster.signal_guest(on, libc::SIGCONT);
            if let Some(since) = since.get() {
                stopped = since.elapsed();
                stops.push(stopped.as_secs_f64() * 1000.0);
            }
            println!("{}", sample.line(&format!("round {round} direct"), &STEPS));
            direct_samples.push(sample);
        }
    }
    report(&settings, &tern, &direct_samples);
    println!(
        "Tern's guest was stopped while the script ran: p50 {:.0} ms; the script's guest as long (the previous run's)",
        median(stops)
    );
    drop(cluster);
}
