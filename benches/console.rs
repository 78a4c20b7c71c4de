//! Console benchmarks, on a cluster of 1,000 connected hosts, ~20,000 VMs
//! and 10,000 migrations in every state, built through the public `update`:
//!
//! - `frame_200x60`: one 200×60 overview frame drawn on ratatui's
//!   `TestBackend` (target p50 < 2 ms);
//! - `rows`: `App::rows()` alone, the sorted and filtered migration list
//!   the migrations table asks for on every frame (a diagnostic: what part
//!   of the frame is spent ordering);
//! - `ingest_1m_events`: 1,000,000 agent events (mostly transfer progress,
//!   then migration records, VM changes and log lines) folded through
//!   `update` (target ≥ 1,000,000 events/s).
//!
//! Criterion reports the mean; the p50 and p99 of every measured frame, and
//! the ingest rate at the median fold, are printed at the end of each group.

use std::hint::black_box;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use tern::console::Msg;
use tern::console::app::{App, update};
use tern::console::state::ClusterState;
use tern::console::theme::Theme;
use tern::console::views;
use tern::proto;

const HOSTS: usize = 1_000;
const MIGRATIONS: usize = 10_000;
/// VMs each host runs; running migrations add their incoming copies, for
/// about 20,000 in all.
const VMS_PER_HOST: usize = 17;
const EVENTS: usize = 1_000_000;
const START_MS: u64 = 1_750_000_000_000;

fn host_name(i: usize) -> String {
    format!("hv-{i:04}")
}

fn vm_name(host: usize, k: usize) -> String {
    format!("vm-{host:04}-{k:02}")
}

fn migration_id(i: usize) -> String {
    format!("m-{:012x}", 0x1000_0000_0000_u64 + i as u64 * 7_919)
}

fn event(host: &str, kind: proto::event::Kind) -> Msg {
    Msg::Event(proto::Event {
        host: host.to_string(),
        kind: Some(kind),
    })
}

/// What a migration `i` looks like, by state.
#[derive(Clone, Copy, PartialEq)]
enum Shape {
    Running,
    Failed,
    Degraded,
    Aborted,
    Unresolved,
    Succeeded,
}

fn shape(i: usize) -> Shape {
    if i % 500 == 13 {
        return Shape::Unresolved;
    }
    match i % 20 {
        0..=5 => Shape::Running,
        6 | 7 => Shape::Failed,
        8 => Shape::Degraded,
        9 => Shape::Aborted,
        _ => Shape::Succeeded,
    }
}

/// Migration `i` moves the VM `k = i / HOSTS` of host `i % HOSTS`: every
/// migration has a VM of its own.
fn endpoints(i: usize) -> (usize, usize, usize) {
    let source = i % HOSTS;
    let destination = (source + 1 + (i * 7) % (HOSTS - 1)) % HOSTS;
    (source, destination, i / HOSTS)
}

fn transfer(total: u64, done_per_mille: u64) -> proto::TransferStats {
    let transferred = total / 1_000 * done_per_mille;
    proto::TransferStats {
        bytes_total: total,
        bytes_transferred: transferred,
        bytes_remaining: total - transferred,
        rate_bytes_s: 900 << 20,
        dirty_rate_bytes_s: 40 << 20,
        iteration: 1 + (done_per_mille / 400) as u32,
        expected_downtime_ms: 120,
        elapsed_ms: done_per_mille * 10,
        ..Default::default()
    }
}

fn record(i: usize, attempt: u32) -> proto::MigrationRecord {
    use proto::StepStatus::{Failed, Ok, Pending, Running};
    let (source, destination, k) = endpoints(i);
    let id = migration_id(i);
    let shape = shape(i);
    let phases: [proto::StepStatus; 5] = match shape {
        Shape::Running => [Ok, Ok, Running, Pending, Pending],
        Shape::Succeeded | Shape::Degraded => [Ok; 5],
        Shape::Failed => [Ok, Ok, Ok, Failed, Pending],
        Shape::Aborted => [Ok, Ok, Failed, Pending, Pending],
        Shape::Unresolved => [Ok, Ok, Ok, Running, Pending],
    };
    let feature_finish = match shape {
        Shape::Running => Pending,
        Shape::Failed | Shape::Degraded => Failed,
        _ => Ok,
    };
    let (outcome, error) = match shape {
        Shape::Running => (proto::Outcome::None, ""),
        Shape::Succeeded => (proto::Outcome::Succeeded, ""),
        Shape::Degraded => (
            proto::Outcome::Degraded,
            "port-profile: switch rejected ASSOCIATE (recorded, fast mode)",
        ),
        Shape::Failed => (
            proto::Outcome::Failed,
            "port-profile: switch rejected ASSOCIATE",
        ),
        Shape::Aborted => (proto::Outcome::Aborted, "aborted by the operator"),
        Shape::Unresolved => (
            proto::Outcome::Unresolved,
            "destination unreachable after Finish",
        ),
    };
    let total = (4_096 + (i as u64 % 8) * 4_096) << 20;
    let started = START_MS + i as u64 * 250;
    proto::MigrationRecord {
        cookies: Vec::new(),
        cause: 0,
        failure: None,
        guest: 0,
        completion: None,
        convergence: None,
        completion_note: String::new(),
        recovery: None,
        repairs: Vec::new(),
        id: id.clone(),
        vm: vm_name(source, k),
        source: host_name(source),
        destination: host_name(destination),
        mode: if shape == Shape::Degraded || i.is_multiple_of(3) {
            proto::Mode::Fast
        } else {
            proto::Mode::Safe
        } as i32,
        attempt,
        outcome: outcome as i32,
        running_on: host_name(source),
        error: error.to_string(),
        phases: phases
            .iter()
            .enumerate()
            .map(|(phase, status)| proto::PhaseRecord {
                phase: phase as i32,
                status: *status as i32,
                duration_ms: if *status == Ok { 40 } else { 0 },
            })
            .collect(),
        features: vec![
            proto::FeatureRecord {
                name: "port-profile".into(),
                required: true,
                prepare: Ok as i32,
                finish: feature_finish as i32,
                error: if feature_finish == Failed {
                    "ASSOCIATE rejected".into()
                } else {
                    String::new()
                },
                ..Default::default()
            },
            proto::FeatureRecord {
                name: "tap".into(),
                required: false,
                prepare: Ok as i32,
                finish: if shape == Shape::Running { Pending } else { Ok } as i32,
                ..Default::default()
            },
        ],
        transfer: Some(transfer(
            total,
            match shape {
                Shape::Running => (i as u64 * 37) % 1_000,
                Shape::Aborted => 300,
                _ => 1_000,
            },
        )),
        attempt_id: format!("{id}.{attempt}"),
        started_at_ms: started,
        updated_at_ms: started + 30_000,
        committed: matches!(shape, Shape::Succeeded | Shape::Degraded),
    }
}

fn vm(host: usize, name: String, state: proto::GuestState, migration: String) -> proto::Vm {
    proto::Vm {
        name,
        host: host_name(host),
        state: state as i32,
        memory_mib: 4_096 << (host % 3),
        vcpus: 2 << (host % 3),
        features: vec![
            proto::FeatureRef {
                name: "port-profile".into(),
                driver: "port-profile".into(),
                required: true,
            },
            proto::FeatureRef {
                name: "tap".into(),
                driver: "exec".into(),
                required: false,
            },
        ],
        migration_id: migration,
    }
}

fn host_info(i: usize) -> proto::Host {
    proto::Host {
        name: host_name(i),
        address: format!("http://10.{}.{}.10:7701", i / 256, i % 256),
        memory_total_mib: 512 << 10,
        memory_used_mib: (96 + (i as u64 % 300)) << 10,
        vcpus_total: 128,
        vcpus_used: 40 + (i as u32 % 60),
        features: vec!["port-profile".into(), "tap".into()],
        feature_state: (0..3)
            .map(|k| proto::FeatureState {
                feature: "port-profile".into(),
                vm: vm_name(i, k),
                state: "associated".into(),
            })
            .collect(),
        pending_rollbacks: if i.is_multiple_of(50) {
            vec![proto::PendingRollback {
                attempt_id: format!("{}.1", migration_id(i)),
                migration_id: migration_id(i),
                vm: vm_name(i, 0),
                feature: "port-profile".into(),
                stage: "rollback".into(),
                error: "switch timed out".into(),
                tries: 3,
                next_try_at_ms: START_MS + 60_000,
            }]
        } else {
            Vec::new()
        },
        faults: Vec::new(),
        draining: i % 100 == 7,
        hypervisor: "sim".into(),
        ..Default::default()
    }
}

/// The cluster, built the way the console builds it: each agent connects
/// and sends its snapshot, then a few seconds of transfer progress so the
/// running migrations have rates.
fn cluster() -> App {
    let hosts: Vec<String> = (0..HOSTS).map(host_name).collect();
    let mut app = App::new(ClusterState::new("bench", &hosts), false, "default");
    update(&mut app, Msg::Tick { now_ms: START_MS });
    let records: Vec<proto::MigrationRecord> = (0..MIGRATIONS).map(|i| record(i, 1)).collect();
    for (h, name) in hosts.iter().enumerate() {
        update(&mut app, Msg::Connected { host: name.clone() });
        let mut vms: Vec<proto::Vm> = (0..VMS_PER_HOST)
            .map(|k| {
                let i = k * HOSTS + h;
                let migration = if i < MIGRATIONS && shape(i) == Shape::Running {
                    migration_id(i)
                } else {
                    String::new()
                };
                vm(h, vm_name(h, k), proto::GuestState::Running, migration)
            })
            .collect();
        // Incoming copies, and every migration this host is part of.
        let mut migrations = Vec::new();
        for (i, r) in records.iter().enumerate() {
            let (source, destination, k) = endpoints(i);
            if destination == h && r.outcome == proto::Outcome::None as i32 {
                vms.push(vm(
                    h,
                    vm_name(source, k),
                    proto::GuestState::Incoming,
                    r.id.clone(),
                ));
            }
            if source == h || destination == h {
                migrations.push(r.clone());
            }
        }
        update(
            &mut app,
            event(
                name,
                proto::event::Kind::Snapshot(proto::Snapshot {
                    host: Some(host_info(h)),
                    vms,
                    migrations,
                    evacuations: Vec::new(),
                }),
            ),
        );
    }
    for second in 1..=5u64 {
        update(
            &mut app,
            Msg::Tick {
                now_ms: START_MS + second * 1_000,
            },
        );
        for r in records.iter().filter(|r| r.outcome == 0) {
            let mut stats = r.transfer.unwrap_or_default();
            stats.rate_bytes_s = (800 + second * 20) << 20;
            update(
                &mut app,
                event(
                    &r.source,
                    proto::event::Kind::Progress(proto::Progress {
                        convergence: None,
                        migration_id: r.id.clone(),
                        attempt_id: r.attempt_id.clone(),
                        stats: Some(stats),
                    }),
                ),
            );
        }
    }
    app
}

/// A realistic second-by-second stream, `EVENTS` long: 85 % transfer
/// progress for running migrations, 6 % record updates of running ones, 1 %
/// new migrations, 5 % VM changes, 3 % log lines.
fn stream() -> Vec<Msg> {
    let running: Vec<proto::MigrationRecord> = (0..MIGRATIONS)
        .filter(|i| shape(*i) == Shape::Running)
        .map(|i| record(i, 1))
        .collect();
    let mut next_migration = MIGRATIONS;
    (0..EVENTS)
        .map(|j| {
            let r = &running[(j * 7_919) % running.len()];
            match j % 100 {
                0..85 => {
                    let mut stats = r.transfer.unwrap_or_default();
                    stats.bytes_transferred =
                        (stats.bytes_transferred + (j as u64) * 4_096).min(stats.bytes_total);
                    stats.bytes_remaining = stats.bytes_total - stats.bytes_transferred;
                    stats.rate_bytes_s = (700 + (j as u64 % 300)) << 20;
                    event(
                        &r.source,
                        proto::event::Kind::Progress(proto::Progress {
                            convergence: None,
                            migration_id: r.id.clone(),
                            attempt_id: r.attempt_id.clone(),
                            stats: Some(stats),
                        }),
                    )
                }
                85..91 => {
                    let mut update = r.clone();
                    update.updated_at_ms += j as u64;
                    event(&r.source, proto::event::Kind::Migration(update))
                }
                91 => {
                    next_migration += 1;
                    let mut new = record(next_migration % MIGRATIONS, 1);
                    new.id = migration_id(next_migration);
                    new.attempt_id = format!("{}.1", new.id);
                    new.started_at_ms = START_MS + next_migration as u64 * 250;
                    let source = new.source.clone();
                    event(&source, proto::event::Kind::Migration(new))
                }
                92..97 => {
                    let (host, k) = (j % HOSTS, j % VMS_PER_HOST);
                    let state = if j % 2 == 0 {
                        proto::GuestState::Paused
                    } else {
                        proto::GuestState::Running
                    };
                    event(
                        &host_name(host),
                        proto::event::Kind::Vm(vm(host, vm_name(host, k), state, String::new())),
                    )
                }
                _ => event(
                    &r.source,
                    proto::event::Kind::Log(proto::LogLine {
                        at_ms: START_MS + j as u64,
                        level: if j % 7 == 0 { "warn" } else { "info" }.into(),
                        migration_id: r.id.clone(),
                        text: format!("{}: perform iteration {} done", r.vm, j % 5 + 1),
                    }),
                ),
            }
        })
        .collect()
}

fn percentiles(name: &str, samples: &Mutex<Vec<Duration>>) -> Option<(Duration, Duration)> {
    let mut s = samples.lock().unwrap().clone();
    if s.is_empty() {
        return None;
    }
    s.sort();
    let at = |q: f64| s[((s.len() - 1) as f64 * q).round() as usize];
    println!(
        "{name}: n = {}, p50 = {:.3} ms, p99 = {:.3} ms",
        s.len(),
        at(0.50).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3
    );
    Some((at(0.50), at(0.99)))
}

fn frame(c: &mut Criterion) {
    let app = cluster();
    let state = app.state();
    let vms = state.vms.len();
    let running = state
        .migrations
        .values()
        .filter(|m| m.record.outcome == 0)
        .count();
    assert_eq!(state.hosts.len(), HOSTS);
    assert_eq!(state.migrations.len(), MIGRATIONS);
    println!(
        "cluster: {} hosts, {vms} VMs, {} migrations ({running} running)",
        state.hosts.len(),
        state.migrations.len()
    );
    let theme = Theme::named("default").expect("the built-in default theme");
    let mut terminal = Terminal::new(TestBackend::new(200, 60)).expect("a test terminal");
    // The frame is the whole cluster's: make sure it shows it (checked
    // before measuring, so a filter that skips this bench still works).
    terminal
        .draw(|f| views::draw(f, &app, &theme))
        .expect("TestBackend never fails");
    let screen = format!("{:?}", terminal.backend().buffer());
    assert!(screen.contains("migrations (10000)"), "{screen}");
    assert!(screen.contains("hosts (1000)"), "{screen}");
    let samples = Mutex::new(Vec::new());
    c.bench_function("frame_200x60", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t0 = Instant::now();
                terminal
                    .draw(|f| views::draw(f, &app, &theme))
                    .expect("TestBackend never fails");
                let took = t0.elapsed();
                total += took;
                samples.lock().unwrap().push(took);
            }
            total
        })
    });
    percentiles("frame_200x60", &samples);

    let samples = Mutex::new(Vec::new());
    c.bench_function("rows", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t0 = Instant::now();
                black_box(app.rows().len());
                let took = t0.elapsed();
                total += took;
                samples.lock().unwrap().push(took);
            }
            total
        })
    });
    percentiles("rows", &samples);
}

fn ingest(c: &mut Criterion) {
    let state = cluster().live;
    let events = stream();
    let samples = Mutex::new(Vec::new());
    let mut group = c.benchmark_group("ingest");
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);
    group.measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Elements(EVENTS as u64));
    group.bench_function("ingest_1m_events", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut app = App::new(state.clone(), false, "default");
                let batch = events.clone();
                let t0 = Instant::now();
                for msg in batch {
                    black_box(update(&mut app, msg));
                }
                let took = t0.elapsed();
                total += took;
                samples.lock().unwrap().push(took);
                drop(black_box(app));
            }
            total
        })
    });
    group.finish();
    if let Some((p50, p99)) = percentiles("ingest_1m_events", &samples) {
        println!(
            "ingest_1m_events: {:.2} M events/s at p50 ({:.2} M events/s at p99)",
            EVENTS as f64 / p50.as_secs_f64() / 1e6,
            EVENTS as f64 / p99.as_secs_f64() / 1e6
        );
    }
}

fn config() -> Criterion {
    Criterion::default()
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1))
}

criterion_group! { name = benches; config = config(); targets = frame, ingest }
criterion_main!(benches);
