//! Evacuation makespan against its bandwidth-bound lower bound: 50 VMs of
//! mixed sizes on one host, evacuated to 5 destinations with room, by real
//! `tern agent` processes on loopback with the simulated hypervisor, timed
//! by the evacuation's own record (`tern evacuate HOST --json`: from the job
//! starting to its last VM settling). Target: makespan ≤ 1.10 × the bound,
//! median over the runs.
//!
//! # The bound
//!
//! The simulated hypervisor gives every migration its own link of
//! `bandwidth_mib_s`, so a transfer lasts as long however many others run:
//! VM *i* takes `t_i` = its pre-copy model's simulated duration
//! ([`tern::hypervisor::sim::transfer_duration`]: memory, then what the
//! guest dirtied meanwhile, down to the stop-and-copy) divided by `speed`.
//! What limits an evacuation is how many transfers run at once: at most
//! `L = min(concurrency, max_outgoing of the source, Σ max_incoming of the
//! destinations)` (here 4, 4 and 5 × 2 = 10: the source binds).
//!
//! Over a makespan `M` the source offers `L × M` slot-seconds, and every VM
//! needs `t_i` of them, so `L × M ≥ Σ t_i`; no VM finishes before its own
//! transfer, so `M ≥ max t_i`. Hence
//!
//! ```text
//! M ≥ B = max(Σ t_i / L, max t_i)
//! ```
//!
//! with zero control plane: no phase but Perform, no time between one
//! migration ending and the next starting, and perfectly divisible work.
//! The report also gives the zero-overhead list schedule of the runner's own
//! order (largest first onto the first free slot), which is what no
//! control-plane speed can beat with whole VMs.
//!
//! # Where the gap goes
//!
//! Each run accounts for all `L × M` slot-milliseconds, from the job's
//! record (when the runner started and saw the end of each attempt) and the
//! migration records (phase durations, outcome time):
//!
//! - `transfer`: Σ `t_i`, the model;
//! - `transfer overshoot`: Perform beyond `t_i`. Most of it is the
//!   simulator's: each 50 ms tick sleeps for its share relative to when the
//!   previous one woke, so the timer's rounding and wake-up latency (about
//!   1.5 ms a tick here) add up to some 3 % of every transfer; sleeping
//!   until absolute deadlines instead took it to 0.1 % in a trial;
//! - `control plane`: the rest of each attempt: Begin, Prepare, Finish,
//!   Confirm (journal writes, peer RPCs, feature stages);
//! - `outcome to runner`: from the migration's outcome to the runner
//!   recording it (its wake-up on the outcome event);
//! - `retried attempts`: whole attempts that did not move their VM;
//! - idle slots: before the first start, `between` (a slot free while VMs
//!   wait: the runner's pass from noticing an outcome to starting the next
//!   VM, including its `Capacity` round-trips), and `tail` (after the last
//!   start, nothing left to start).
//!
//! Each is shown divided by `L` (its share of the makespan) and as a
//! fraction of the bound. All times are the agents' wall-clock milliseconds.
//!
//! ```sh
//! cargo bench --bench evacuation
//! TERN_BENCH_RUNS=5 cargo bench --bench evacuation
//! ```
//!
//! Environment: `TERN_BENCH_RUNS` (3), `TERN_BENCH_VMS` (50),
//! `TERN_BENCH_SPEED` (2: simulated seconds per real second),
//! `TERN_BENCH_BANDWIDTH_MIB_S` (1024), `TERN_BENCH_CONCURRENCY` (4),
//! `TERN_BENCH_MAX_OUTGOING` (4), `TERN_BENCH_MAX_INCOMING` (2),
//! `TERN_BENCH_KEEP` (set: keep each run's folder with the agents' logs).
//! With these a run takes about 15 s. Run without `--bench` (`cargo test
//! --benches`) it does one quick round of 10 VMs, as a smoke test.
//!
//! Nothing is left running: the agents and the CLI are killed at the end,
//! on a panic, on SIGINT, SIGTERM or SIGHUP, and (by `PR_SET_PDEATHSIG`)
//! when this process dies any other way.

mod common;

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;
use tern::config::AgentConfig;
use tern::host::evacuation::job::{Evacuation, VmState};
use tern::hypervisor::sim::{SimSettings, transfer_duration};
use tern::protocol::Phase;
use tern::protocol::record::MigrationRecord;

use common::{Folder, Watchdog, env_u64, free_port, kill_everything, live};

const TERN: &str = env!("CARGO_BIN_EXE_tern");
const TARGET_RATIO: f64 = 1.10;
const SOURCE: &str = "hv-src";
const DESTINATIONS: usize = 5;
/// Memory sizes, MiB, dealt out in turn: 512 MiB to 8 GiB, small ones most.
const SIZES: [u64; 10] = [512, 1024, 512, 2048, 768, 4096, 1536, 8192, 1024, 3072];

struct Settings {
    runs: usize,
    vms: usize,
    speed: f64,
    bandwidth_mib_s: u64,
    concurrency: u32,
    max_outgoing: u32,
    max_incoming: u32,
}

impl Settings {
    fn from_env(bench: bool) -> Settings {
        let mut settings = Settings {
            runs: env_u64("TERN_BENCH_RUNS", 3).max(1) as usize,
            vms: env_u64("TERN_BENCH_VMS", 50).max(1) as usize,
            speed: env_f64("TERN_BENCH_SPEED", 2.0),
            bandwidth_mib_s: env_u64("TERN_BENCH_BANDWIDTH_MIB_S", 1024),
            concurrency: env_u64("TERN_BENCH_CONCURRENCY", 4) as u32,
            max_outgoing: env_u64("TERN_BENCH_MAX_OUTGOING", 4) as u32,
            max_incoming: env_u64("TERN_BENCH_MAX_INCOMING", 2) as u32,
        };
        if !bench {
            // The smoke test: one quick round, a few seconds.
            settings.runs = 1;
            settings.vms = 10;
            settings.speed = 8.0;
        }
        settings
    }
}

fn env_f64(name: &str, default: f64) -> f64 {
    match std::env::var(name) {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text:?}: expected a number")),
        Err(_) => default,
    }
}

// ---- commands that die with this process ------------------------------------

/// A `tern` command that dies with this process, however it dies.
fn tern_command() -> Command {
    let mut command = Command::new(TERN);
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
}

// ---- the cluster ------------------------------------------------------------

/// One simulated VM of the evacuated host.
struct VmMix {
    name: String,
    memory_mib: u64,
    vcpus: u32,
    dirty_rate_mib_s: u64,
}

/// `n` VMs of mixed sizes, the same every run: names do not follow sizes,
/// dirty rates from 4 to 63 MiB/s.
fn vm_mix(n: usize) -> Vec<VmMix> {
    (0..n)
        .map(|i| {
            let memory_mib = SIZES[(i * 7) % SIZES.len()];
            VmMix {
                name: format!("vm-{:02}", i + 1),
                memory_mib,
                vcpus: match memory_mib {
                    0..=1024 => 1,
                    1025..=3072 => 2,
                    _ => 4,
                },
                dirty_rate_mib_s: 4 + (i as u64 * 13) % 60,
            }
        })
        .collect()
}

struct Cluster {
    dir: Folder,
    inventory: PathBuf,
    source_config: PathBuf,
    agents: Vec<Child>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        kill_everything();
        for child in &mut self.agents {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Cluster {
    /// The source with every VM of the mix and the destinations, empty.
    fn start(settings: &Settings, vms: &[VmMix]) -> Cluster {
        let dir = Folder::create("evacuation", "tern-bench-evacuation-");
        let mut hosts = vec![(SOURCE.to_string(), free_port())];
        for d in 1..=DESTINATIONS {
            hosts.push((format!("hv-d{d}"), free_port()));
        }
        let inventory = dir.path().join("cluster.toml");
        common::write_inventory(&inventory, &hosts);
        let mut cluster = Cluster {
            source_config: dir.path().join(format!("{SOURCE}.toml")),
            dir,
            inventory,
            agents: Vec::new(),
        };
        for (name, port) in &hosts {
            let guests: String = if name == SOURCE {
                vms.iter()
                    .map(|vm| {
                        format!(
                            "[[vm]]\nname = \"{}\"\nmemory_mib = {}\nvcpus = {}\ndirty_rate_mib_s = {}\n\
                             features = [{{ name = \"port-profile\", required = true }}]\n\n",
                            vm.name, vm.memory_mib, vm.vcpus, vm.dirty_rate_mib_s
                        )
                    })
                    .collect()
            } else {
                String::new()
            };
            let config = format!(
                "name = \"{name}\"\nlisten = \"127.0.0.1:{port}\"\nstate_dir = \"{name}-state\"\n\
                 inventory = \"cluster.toml\"\nmax_outgoing = {}\nmax_incoming = {}\n\n\
                 [hypervisor]\nkind = \"sim\"\nbandwidth_mib_s = {}\nspeed = {:?}\n\n\
                 [features.port-profile]\nswitch = \"sim\"\n\n{guests}",
                settings.max_outgoing,
                settings.max_incoming,
                settings.bandwidth_mib_s,
                settings.speed
            );
            std::fs::write(cluster.path().join(format!("{name}.toml")), config).unwrap();
            let child = common::start_agent(tern_command(), cluster.dir.path(), name);
            cluster.agents.push(child);
        }
        for ((name, port), child) in hosts.iter().zip(&mut cluster.agents) {
            common::wait_listening(name, *port, child, cluster.dir.path());
        }
        cluster
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Run `tern ARGS` against this cluster, killing it after `timeout`.
    fn tern(&self, args: &[&str], timeout: Duration) -> Output {
        let child = tern_command()
            .args(args)
            .env("TERN_INVENTORY", &self.inventory)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        live().pids.push(pid);
        let watchdog = Watchdog::start(pid, timeout);
        let output = child.wait_with_output().unwrap();
        let expired = watchdog.stop();
        live().pids.retain(|p| *p != pid);
        assert!(!expired, "tern {args:?} did not finish within {timeout:?}");
        output
    }

    /// The last JSON line `tern ARGS` printed.
    fn tern_json(&self, args: &[&str], timeout: Duration) -> Value {
        let out = self.tern(args, timeout);
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
        serde_json::from_str(line).unwrap()
    }
}

// ---- one run ----------------------------------------------------------------

/// One attempt as the runner saw it, in agent milliseconds.
struct Span {
    start: u64,
    end: u64,
}

/// Slot-milliseconds of one run, by where they went; they add up to L × M.
#[derive(Default, Clone, Copy)]
struct Breakdown {
    transfer: f64,
    overshoot: f64,
    control: f64,
    notice: f64,
    retried: f64,
    idle_start: f64,
    idle_between: f64,
    idle_tail: f64,
}

impl Breakdown {
    fn rows(&self) -> [(&'static str, f64); 8] {
        [
            ("transfer (model, Σ t_i)", self.transfer),
            ("transfer overshoot (Perform − t_i)", self.overshoot),
            (
                "control plane (Begin, Prepare, Finish, Confirm)",
                self.control,
            ),
            ("outcome to runner", self.notice),
            ("retried attempts", self.retried),
            ("idle: before the first start", self.idle_start),
            ("idle: between an end and the next start", self.idle_between),
            ("idle: tail, nothing left to start", self.idle_tail),
        ]
    }

    fn total(&self) -> f64 {
        self.rows().iter().map(|(_, v)| v).sum()
    }

    fn add(&mut self, other: &Breakdown) {
        self.transfer += other.transfer;
        self.overshoot += other.overshoot;
        self.control += other.control;
        self.notice += other.notice;
        self.retried += other.retried;
        self.idle_start += other.idle_start;
        self.idle_between += other.idle_between;
        self.idle_tail += other.idle_tail;
    }
}

struct Sample {
    makespan_ms: f64,
    bound_ms: f64,
    /// The runner's order on `L` slots with no overhead.
    list_schedule_ms: f64,
    sum_ms: f64,
    max_ms: f64,
    slots: u32,
    attempts: usize,
    busy: usize,
    breakdown: Breakdown,
    /// Per final attempt, ms.
    phases: HashMap<Phase, Vec<f64>>,
    control: Vec<f64>,
    notice: Vec<f64>,
    /// From the latest end the runner saw to each start that followed.
    handover: Vec<f64>,
}

impl Sample {
    fn ratio(&self) -> f64 {
        self.makespan_ms / self.bound_ms
    }
}

fn run(settings: &Settings, number: usize) -> Sample {
    let vms = vm_mix(settings.vms);
    let cluster = Cluster::start(settings, &vms);

    // The model, from the source's own config: what its agent runs.
    let config = AgentConfig::load(&cluster.source_config).unwrap();
    let sim = SimSettings::from_config(&config.hypervisor);
    let model: HashMap<String, f64> = config
        .vm
        .iter()
        .map(|spec| {
            let simulated = transfer_duration(spec, &sim).expect("the link has bandwidth");
            (spec.name.clone(), simulated.as_secs_f64() * 1e3 / sim.speed)
        })
        .collect();
    let memory: u64 = config.vm.iter().map(|v| v.memory_mib).sum();
    assert!(
        memory <= sim.capacity.memory_mib * DESTINATIONS as u64,
        "the destinations have no room for {memory} MiB"
    );
    let sum_ms: f64 = model.values().sum();
    let max_ms = model.values().cloned().fold(0.0, f64::max);
    let timeout = Duration::from_secs_f64(sum_ms / 1e3 * 3.0 + 60.0);

    let concurrency = settings.concurrency.to_string();
    let job = cluster.tern_json(
        &[
            "evacuate",
            SOURCE,
            "--mode",
            "safe",
            "--concurrency",
            &concurrency,
            "--json",
        ],
        timeout,
    );
    let job: Evacuation = serde_json::from_value(job).unwrap();
    let status = cluster.tern_json(&["status", "--json"], Duration::from_secs(30));
    let migrations: HashMap<String, MigrationRecord> = status["migrations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let record: MigrationRecord = serde_json::from_value(m.clone()).unwrap();
            (record.id.clone(), record)
        })
        .collect();
    let stuck: Vec<String> = job
        .vms
        .iter()
        .filter(|v| v.state != VmState::Moved)
        .map(|v| format!("{} {}: {:?}", v.name, v.state.as_str(), v.waiting))
        .collect();
    assert!(
        stuck.is_empty(),
        "run {number}: evacuation {} ended {} with VMs not moved: {stuck:?}",
        job.id,
        job.state.as_str()
    );
    drop(cluster);

    // The source's limit, the evacuation's and the destinations' together.
    let slots = job
        .concurrency
        .min(settings.max_outgoing)
        .min(settings.max_incoming * DESTINATIONS as u32);
    let l = f64::from(slots);
    let bound_ms = (sum_ms / l).max(max_ms);
    let job_start = job.started_at_ms;
    let job_end = job.ended_at_ms.expect("the evacuation ended");
    let makespan_ms = (job_end - job_start) as f64;

    let mut sample = Sample {
        makespan_ms,
        bound_ms,
        list_schedule_ms: list_schedule(
            job.vms.iter().map(|v| model[&v.name]).collect(),
            slots as usize,
        ),
        sum_ms,
        max_ms,
        slots,
        attempts: 0,
        busy: 0,
        breakdown: Breakdown::default(),
        phases: HashMap::new(),
        control: Vec::new(),
        notice: Vec::new(),
        handover: Vec::new(),
    };
    let mut spans = Vec::new();
    let b = &mut sample.breakdown;
    for vm in &job.vms {
        let t = model[&vm.name];
        for (k, attempt) in vm.attempts.iter().enumerate() {
            let span = Span {
                start: attempt.started_at_ms,
                end: attempt.ended_at_ms.expect("every attempt ended"),
            };
            let occupied = (span.end - span.start) as f64;
            sample.attempts += 1;
            sample.busy += usize::from(attempt.busy);
            if k + 1 < vm.attempts.len() {
                b.retried += occupied;
            } else {
                let record = vm
                    .migration_id
                    .as_ref()
                    .and_then(|id| migrations.get(id))
                    .unwrap_or_else(|| panic!("no migration record for {}", vm.name));
                let perform = record.phase(Phase::Perform).duration_ms as f64;
                let notice = span.end.saturating_sub(record.updated_at_ms) as f64;
                let control = occupied - perform - notice;
                b.transfer += t;
                b.overshoot += perform - t;
                b.control += control;
                b.notice += notice;
                for phase in Phase::ALL {
                    sample
                        .phases
                        .entry(phase)
                        .or_default()
                        .push(record.phase(phase).duration_ms as f64);
                }
                sample.control.push(control);
                sample.notice.push(notice);
            }
            spans.push(span);
        }
    }
    let (start, between, tail) = idle(&spans, slots, job_start, job_end);
    b.idle_start = start;
    b.idle_between = between;
    b.idle_tail = tail;
    sample.handover = handovers(&spans, slots as usize);
    let accounted = b.total();
    assert!(
        (accounted - l * makespan_ms).abs() < 1.0 + 1e-6 * accounted,
        "run {number}: slot time does not add up: {accounted} vs {}",
        l * makespan_ms
    );
    sample
}

/// The runner's order (largest first) onto `slots` slots, each VM on the
/// first free one, with nothing but the transfers: the best makespan whole
/// VMs in this order allow.
fn list_schedule(transfers: Vec<f64>, slots: usize) -> f64 {
    let mut free = vec![0.0f64; slots.max(1)];
    for t in transfers {
        let first = free
            .iter_mut()
            .min_by(|a, b| a.total_cmp(b))
            .expect("at least one slot");
        *first += t;
    }
    free.into_iter().fold(0.0, f64::max)
}

/// Free slot-milliseconds before the first start, between it and the last
/// start, and after the last start.
fn idle(spans: &[Span], slots: u32, job_start: u64, job_end: u64) -> (f64, f64, f64) {
    let first = spans.iter().map(|s| s.start).min().unwrap_or(job_start);
    let last = spans.iter().map(|s| s.start).max().unwrap_or(job_start);
    let mut changes: Vec<(u64, i64)> = Vec::new();
    for s in spans {
        changes.push((s.start, 1));
        changes.push((s.end, -1));
    }
    changes.sort();
    // The free slots of a step function, integrated over [from, to).
    let free_between = |from: u64, to: u64| -> f64 {
        let overlap = |a: u64, b: u64| b.min(to).saturating_sub(a.max(from)) as f64;
        let (mut busy, mut since, mut free) = (0i64, 0u64, 0.0);
        for &(time, delta) in &changes {
            free += (i64::from(slots) - busy) as f64 * overlap(since, time);
            busy += delta;
            since = time;
        }
        free + (i64::from(slots) - busy) as f64 * overlap(since, u64::MAX)
    };
    (
        free_between(job_start, first),
        free_between(first, last),
        free_between(last, job_end),
    )
}

/// For every start after the first `slots`: how long after the latest end
/// the runner had seen.
fn handovers(spans: &[Span], slots: usize) -> Vec<f64> {
    let mut starts: Vec<u64> = spans.iter().map(|s| s.start).collect();
    starts.sort();
    let mut ends: Vec<u64> = spans.iter().map(|s| s.end).collect();
    ends.sort();
    starts
        .into_iter()
        .skip(slots)
        .filter_map(|s| {
            let before = ends.partition_point(|&e| e <= s);
            (before > 0).then(|| (s - ends[before - 1]) as f64)
        })
        .collect()
}

// ---- the report -------------------------------------------------------------

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn max(values: &[f64]) -> f64 {
    values.iter().cloned().fold(f64::NAN, f64::max)
}

fn report(settings: &Settings, samples: &[Sample]) {
    let first = &samples[0];
    println!(
        "{} VMs, {} to {}, L = min(concurrency {}, max_outgoing {}, {DESTINATIONS} × max_incoming {}) = {}; \
         link {} MiB/s per migration at {}× real time",
        settings.vms,
        SOURCE,
        DESTINATIONS,
        settings.concurrency,
        settings.max_outgoing,
        settings.max_incoming,
        first.slots,
        settings.bandwidth_mib_s,
        settings.speed
    );
    println!(
        "model: Σ t_i = {:.0} ms, max t_i = {:.0} ms; bound B = max(Σ t_i / L, max t_i) = {:.0} ms; \
         list schedule of the runner's order, no overhead: {:.0} ms ({:.3} × B)",
        first.sum_ms,
        first.max_ms,
        first.bound_ms,
        first.list_schedule_ms,
        first.list_schedule_ms / first.bound_ms
    );
    let ratio = median(samples.iter().map(Sample::ratio).collect());
    let makespan = median(samples.iter().map(|s| s.makespan_ms).collect());
    println!(
        "makespan p50 {:.0} ms over {} runs; ratio p50 {ratio:.3} (target ≤ {TARGET_RATIO}): {}",
        makespan,
        samples.len(),
        if ratio <= TARGET_RATIO {
            "met"
        } else {
            "MISSED"
        }
    );

    let n = samples.len() as f64;
    let mut mean = Breakdown::default();
    for s in samples {
        mean.add(&s.breakdown);
    }
    let l = f64::from(first.slots);
    println!(
        "where the makespan goes (mean of {} runs; slot-ms / L = ms of makespan; % of B):",
        samples.len()
    );
    for (what, slot_ms) in mean.rows() {
        let ms = slot_ms / n / l;
        println!(
            "  {what:<48} {ms:>9.0} ms  {:>6.1} %",
            ms / first.bound_ms * 100.0
        );
    }
    println!(
        "  {:<48} {:>9.0} ms  {:>6.1} %",
        "= makespan",
        mean.total() / n / l,
        mean.total() / n / l / first.bound_ms * 100.0
    );

    let all = |f: fn(&Sample) -> &Vec<f64>| -> Vec<f64> {
        samples.iter().flat_map(|s| f(s).iter().cloned()).collect()
    };
    let control = all(|s| &s.control);
    let notice = all(|s| &s.notice);
    let handover = all(|s| &s.handover);
    println!(
        "per attempt: control plane p50 {:.0} ms, max {:.0} ms; outcome to runner p50 {:.0} ms, max {:.0} ms; \
         end to next start p50 {:.0} ms, max {:.0} ms",
        median(control.clone()),
        max(&control),
        median(notice.clone()),
        max(&notice),
        median(handover.clone()),
        max(&handover)
    );
    let phases: Vec<String> = Phase::ALL
        .iter()
        .map(|phase| {
            let values: Vec<f64> = samples
                .iter()
                .flat_map(|s| s.phases.get(phase).cloned().unwrap_or_default())
                .collect();
            format!(
                "{} {:.0}/{:.0}",
                format!("{phase:?}").to_lowercase(),
                median(values.clone()),
                max(&values)
            )
        })
        .collect();
    println!("phases p50/max ms: {}", phases.join(", "));
    let (attempts, busy): (usize, usize) = samples
        .iter()
        .fold((0, 0), |(a, b), s| (a + s.attempts, b + s.busy));
    println!(
        "attempts: {attempts} for {} VMs ({busy} refused as busy)",
        settings.vms * samples.len()
    );
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    common::handle_signals("evacuation");
    let settings = Settings::from_env(bench);
    let mut samples = Vec::new();
    for number in 1..=settings.runs {
        let sample = run(&settings, number);
        println!(
            "run {number}: makespan {:.0} ms, bound {:.0} ms, ratio {:.3}",
            sample.makespan_ms,
            sample.bound_ms,
            sample.ratio()
        );
        samples.push(sample);
    }
    report(&settings, &samples);
}
