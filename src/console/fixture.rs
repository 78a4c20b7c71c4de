//! A small cluster in known states, shared by the console's update tests
//! and view snapshots: five hosts (hv-d lost, hv-e draining), a migration in
//! Perform (converging), a safe-mode failure with a pending rollback, a
//! success, and two evacuations: hv-e's running (some VMs moved, one in
//! flight, one failed on port-profile, some pending) and an older
//! cancelled one of hv-c. [`transfers`] adds one migration per way a
//! transfer can go (not converging, stalled, post-copy, post-copy being
//! recovered, lost).

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use super::app::{App, update};
use super::msg::Msg;
use super::state::ClusterState;
use crate::proto;
use crate::proto::event::Kind;

pub fn key(c: char) -> Msg {
    Msg::Key(KeyEvent::new(KeyCode::Char(c), KeyModifiers::NONE))
}

pub fn code(code: KeyCode) -> Msg {
    Msg::Key(KeyEvent::new(code, KeyModifiers::NONE))
}

pub fn ctrl(c: char) -> Msg {
    Msg::Key(KeyEvent::new(KeyCode::Char(c), KeyModifiers::CONTROL))
}

pub fn phases(running: usize, failed: bool) -> Vec<proto::PhaseRecord> {
    (0..5)
        .map(|i| proto::PhaseRecord {
            phase: i as i32,
            status: if i < running {
                proto::StepStatus::Ok
            } else if i == running && failed {
                proto::StepStatus::Failed
            } else if i == running {
                proto::StepStatus::Running
            } else {
                proto::StepStatus::Pending
            } as i32,
            duration_ms: 0,
        })
        .collect()
}

pub fn host(name: &str, draining: bool, memory_used: u64, features: &[&str]) -> proto::Host {
    proto::Host {
        name: name.into(),
        memory_total_mib: 65_536,
        memory_used_mib: memory_used,
        vcpus_total: 64,
        features: features.iter().map(|f| f.to_string()).collect(),
        draining,
        max_outgoing: 2,
        max_incoming: 2,
        ..Default::default()
    }
}

pub fn vm(name: &str) -> proto::Vm {
    proto::Vm {
        name: name.into(),
        state: proto::GuestState::Running as i32,
        memory_mib: 2048,
        vcpus: 2,
        features: vec![proto::FeatureRef {
            name: "port-profile".into(),
            required: true,
            ..Default::default()
        }],
        ..Default::default()
    }
}

pub fn migration(
    id: &str,
    vm: &str,
    src: &str,
    dst: &str,
    outcome: proto::Outcome,
) -> proto::MigrationRecord {
    let running = outcome == proto::Outcome::None;
    let record = proto::MigrationRecord {
        completion: Some(crate::protocol::record::completion_to_proto(
            &crate::protocol::completion::Completion::for_mode(crate::protocol::Mode::Safe),
        )),
        id: id.into(),
        vm: vm.into(),
        source: src.into(),
        destination: dst.into(),
        attempt: 1,
        attempt_id: format!("{id}.1"),
        outcome: outcome as i32,
        mode: proto::Mode::Safe as i32,
        phases: if running {
            phases(2, false)
        } else if outcome == proto::Outcome::Failed {
            phases(3, true)
        } else {
            phases(5, false)
        },
        features: vec![proto::FeatureRecord {
            name: "port-profile".into(),
            required: true,
            prepare: proto::StepStatus::Ok as i32,
            finish: if outcome == proto::Outcome::Failed {
                proto::StepStatus::Failed
            } else {
                proto::StepStatus::Ok
            } as i32,
            error: if outcome == proto::Outcome::Failed {
                format!("finish: ASSOCIATE {vm} rejected by switch tor-{dst}: port busy")
            } else {
                String::new()
            },
            ..Default::default()
        }],
        error: if outcome == proto::Outcome::Failed {
            format!("required feature port-profile failed finish on {dst}")
        } else {
            String::new()
        },
        started_at_ms: 1_000,
        cookies: cookies(id, vm, src, dst, outcome),
        running_on: if outcome == proto::Outcome::Succeeded {
            dst.into()
        } else {
            src.into()
        },
        cause: if outcome == proto::Outcome::Failed {
            proto::Cause::Feature as i32
        } else {
            0
        },
        ..Default::default()
    };
    with_failure(record)
}

/// The record with its whole failure, derived by the agents' own code.
pub fn with_failure(mut record: proto::MigrationRecord) -> proto::MigrationRecord {
    record.failure = crate::protocol::record::MigrationRecord::from(&record)
        .failure()
        .as_ref()
        .map(crate::protocol::record::failure_to_proto);
    record
}

/// The cookies an attempt with this outcome exchanged, built and described
/// by the protocol's own code.
fn cookies(
    id: &str,
    vm: &str,
    src: &str,
    dst: &str,
    outcome: proto::Outcome,
) -> Vec<proto::CookieRecord> {
    use crate::protocol::cookies::{cookie1, describe, stage_result};
    use crate::protocol::{FeatureSpec, Mode, PROTOCOL_VERSION, StepStatus, VmSpec};
    let spec = VmSpec {
        name: vm.into(),
        memory_mib: 2048,
        vcpus: 2,
        dirty_rate_mib_s: 50,
        features: vec![FeatureSpec {
            name: "port-profile".into(),
            driver: String::new(),
            required: true,
        }],
        qemu: None,
    };
    let attempt_id = format!("{id}.1");
    let failed = outcome == proto::Outcome::Failed;
    let mut out = vec![describe(&cookie1(&attempt_id, id, src, &spec, Mode::Safe))];
    if outcome != proto::Outcome::None {
        out.push(describe(&proto::Cookie2 {
            protocol_version: PROTOCOL_VERSION,
            attempt_id: attempt_id.clone(),
            incoming_address: format!("{dst}:49152"),
            prepare: vec![stage_result("port-profile", StepStatus::Ok, "")],
            accepted: true,
            ..Default::default()
        }));
        out.push(describe(&proto::Cookie3 {
            protocol_version: PROTOCOL_VERSION,
            attempt_id: attempt_id.clone(),
            status: proto::TransferStatus::Completed as i32,
            stats: Some(proto::TransferStats {
                bytes_transferred: 2_300 << 20,
                iteration: 4,
                expected_downtime_ms: 21,
                ..Default::default()
            }),
        }));
        out.push(describe(&proto::Cookie4 {
            ready_for_switchover: false,
            verify: Vec::new(),
            protocol_version: PROTOCOL_VERSION,
            attempt_id,
            committed: !failed,
            finish: vec![stage_result(
                "port-profile",
                if failed {
                    StepStatus::Failed
                } else {
                    StepStatus::Ok
                },
                "",
            )],
            rollback: if failed {
                vec![stage_result("port-profile", StepStatus::Failed, "")]
            } else {
                vec![]
            },
            error: if failed {
                format!("required feature port-profile failed finish on {dst}")
            } else {
                String::new()
            },
            lost: false,
        }));
    }
    out.iter().map(proto::CookieRecord::from).collect()
}

fn attempt(
    n: u32,
    destination: &str,
    outcome: proto::Outcome,
    failed_feature: &str,
    error: &str,
) -> proto::EvacuationAttempt {
    proto::EvacuationAttempt {
        attempt: n,
        destination: destination.into(),
        outcome: outcome as i32,
        failed_feature: failed_feature.into(),
        error: error.into(),
        busy: false,
        interrupted: false,
        adopted: false,
        cause: (!failed_feature.is_empty()).then(|| proto::FailureCause {
            kind: proto::Cause::Feature as i32,
            side: proto::Side::Destination as i32,
            host: destination.into(),
            feature: failed_feature.into(),
            stage: "finish".into(),
            text: error.into(),
        }),
        started_at_ms: 2_000 + u64::from(n) * 1_000,
        ended_at_ms: if outcome == proto::Outcome::None {
            0
        } else {
            2_500 + u64::from(n) * 1_000
        },
    }
}

fn evacuation_vm(
    name: &str,
    memory_mib: u64,
    state: proto::EvacuationVmState,
    host: &str,
    attempts: Vec<proto::EvacuationAttempt>,
    waiting: &str,
) -> proto::EvacuationVm {
    proto::EvacuationVm {
        vm: name.into(),
        memory_mib,
        vcpus: 2,
        state: state as i32,
        migration_id: if attempts.is_empty() {
            String::new()
        } else {
            format!("m-{name}")
        },
        host: host.into(),
        degraded: false,
        waiting: waiting.into(),
        attempts,
        required: vec!["port-profile".into()],
    }
}

/// hv-e's evacuation, running in safe mode, leaving out the lost hv-d: two
/// VMs moved, cache-02 in flight to hv-a after port-profile failed it on
/// hv-c, db-03 out of attempts, three pending.
pub fn evacuation() -> proto::EvacuationRecord {
    use proto::EvacuationVmState::{Failed, InFlight, Moved, Pending};
    use proto::Outcome::{Failed as Fail, None as Running, Succeeded};
    let finish = |h: &str| format!("required feature port-profile failed finish on {h}");
    proto::EvacuationRecord {
        completion: None,
        id: "e-run".into(),
        host: "hv-e".into(),
        mode: proto::Mode::Safe as i32,
        concurrency: 2,
        max_attempts: 2,
        exclude: vec!["hv-d".into()],
        state: proto::EvacuationState::Running as i32,
        vms: vec![
            evacuation_vm(
                "db-07",
                8192,
                Moved,
                "hv-a",
                vec![attempt(1, "hv-a", Succeeded, "", "")],
                "",
            ),
            evacuation_vm(
                "db-03",
                6144,
                Failed,
                "hv-e",
                vec![
                    attempt(1, "hv-c", Fail, "port-profile", &finish("hv-c")),
                    attempt(2, "hv-b", Fail, "port-profile", &finish("hv-b")),
                ],
                "",
            ),
            evacuation_vm(
                "cache-02",
                4096,
                InFlight,
                "hv-a",
                vec![
                    attempt(1, "hv-c", Fail, "port-profile", &finish("hv-c")),
                    attempt(2, "hv-a", Running, "", ""),
                ],
                "",
            ),
            evacuation_vm(
                "web-04",
                2048,
                Pending,
                "hv-e",
                vec![],
                "no host can take it now: hv-a at its incoming limit (2); hv-b has 1024 MiB \
                 free, needs 2048; hv-c has 1536 MiB free, needs 2048; hv-d excluded",
            ),
            evacuation_vm("web-08", 2048, Pending, "hv-e", vec![], ""),
            evacuation_vm(
                "batch-01",
                1024,
                Moved,
                "hv-b",
                vec![attempt(1, "hv-b", Succeeded, "", "")],
                "",
            ),
            evacuation_vm("batch-05", 1024, Pending, "hv-e", vec![], ""),
        ],
        started_at_ms: 2_000,
        updated_at_ms: 5_000,
        ended_at_ms: 0,
        abort_in_flight: false,
    }
}

/// An older evacuation of hv-c, cancelled before it was done.
pub fn cancelled_evacuation() -> proto::EvacuationRecord {
    use proto::EvacuationVmState::{Cancelled, Moved};
    proto::EvacuationRecord {
        completion: None,
        id: "e-old".into(),
        host: "hv-c".into(),
        mode: proto::Mode::Fast as i32,
        concurrency: 1,
        max_attempts: 3,
        exclude: vec![],
        state: proto::EvacuationState::Cancelled as i32,
        vms: vec![
            evacuation_vm(
                "app-03",
                2048,
                Moved,
                "hv-b",
                vec![attempt(1, "hv-b", proto::Outcome::Succeeded, "", "")],
                "",
            ),
            evacuation_vm("app-02", 1024, Cancelled, "hv-c", vec![], ""),
        ],
        started_at_ms: 500,
        updated_at_ms: 900,
        ended_at_ms: 900,
        abort_in_flight: false,
    }
}

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// A 2 GiB guest 45 s into pre-copy: 1.2 GiB sent, 800 MiB left.
pub fn precopy_stats() -> proto::TransferStats {
    proto::TransferStats {
        bytes_total: 2 * GIB,
        bytes_transferred: 1229 * MIB,
        bytes_remaining: 800 * MIB,
        rate_bytes_s: 512 * MIB,
        dirty_rate_bytes_s: 128 * MIB,
        iteration: 3,
        expected_downtime_ms: 300,
        elapsed_ms: 45_000,
        ..Default::default()
    }
}

/// The source's outlook on it: remaining bytes over 45 s, going up at each
/// new pass before they go down.
pub fn outlook(verdict: proto::Verdict, eta_ms: Option<u64>, reason: &str) -> proto::Convergence {
    let remaining = [
        (0, 2048),
        (5_000, 1800),
        (10_000, 1500),
        (15_000, 1300),
        (20_000, 1450),
        (25_000, 1200),
        (30_000, 1000),
        (35_000, 1100),
        (40_000, 900),
        (45_000, 800),
    ];
    proto::Convergence {
        verdict: verdict as i32,
        has_eta: eta_ms.is_some(),
        eta_ms: eta_ms.unwrap_or(0),
        reason: reason.into(),
        remaining: remaining
            .iter()
            .map(|&(elapsed_ms, mib)| proto::RemainingSample {
                elapsed_ms,
                bytes: mib * MIB,
            })
            .collect(),
    }
}

/// The reason the fixture's converging transfer gives.
pub const CONVERGING: &str =
    "dirtying 128.0 MiB/s, link 512.0 MiB/s: 800.0 MiB left, net 384.0 MiB/s";

/// A running migration of `vm` whose transfer is in `stage`.
fn transfer(id: &str, vm: &str, src: &str, dst: &str) -> proto::MigrationRecord {
    let mut r = migration(id, vm, src, dst, proto::Outcome::None);
    r.mode = proto::Mode::Fast as i32;
    r.completion = Some(crate::protocol::record::completion_to_proto(
        &crate::protocol::completion::Completion::for_mode(crate::protocol::Mode::Fast),
    ));
    r.transfer = Some(precopy_stats());
    r
}

/// One migration per way a transfer can go, besides the fixture's
/// converging one: api-01 not converging, cache-01 stalled, db-02 in
/// post-copy, db-03 in post-copy paused and being recovered (2 tries
/// failed), and log-01 lost (hv-c died during post-copy).
pub fn transfers() -> Vec<proto::MigrationRecord> {
    let mut not_converging = transfer("m-slow", "api-01", "hv-a", "hv-c");
    not_converging.convergence = Some(outlook(
        proto::Verdict::NotConverging,
        None,
        "dirtying 1.4 GiB/s, link 1.1 GiB/s: each pass leaves as much to send as the last",
    ));
    let mut stalled = transfer("m-stall", "cache-01", "hv-a", "hv-b");
    stalled.convergence = Some(outlook(
        proto::Verdict::Stalled,
        None,
        "nothing sent for 4 s (800.0 MiB left)",
    ));
    let mut postcopy = transfer("m-pc", "db-02", "hv-b", "hv-a");
    postcopy.committed = true;
    postcopy.completion_note =
        "switched to post-copy after 12.3 s: pre-copy cannot converge: dirtying 1.4 GiB/s, link 1.1 GiB/s".into();
    postcopy.transfer = Some(proto::TransferStats {
        stage: proto::TransferStage::Postcopy as i32,
        bytes_remaining: 312 * MIB,
        postcopy_requests: 1234,
        ..precopy_stats()
    });
    let mut paused = transfer("m-rec", "db-03", "hv-b", "hv-c");
    paused.committed = true;
    paused.transfer = Some(proto::TransferStats {
        stage: proto::TransferStage::PostcopyPaused as i32,
        bytes_remaining: 600 * MIB,
        postcopy_requests: 40,
        ..precopy_stats()
    });
    paused.recovery = Some(proto::PostcopyRecovery {
        tries: 2,
        error: "connection refused".into(),
        next_at_ms: 15_000,
    });
    let mut lost = migration("m-lost", "log-01", "hv-a", "hv-c", proto::Outcome::Lost);
    lost.committed = true;
    lost.running_on = String::new();
    lost.error = "hv-c stopped answering during post-copy".into();
    vec![not_converging, stalled, postcopy, paused, lost]
}

/// The fixture with [`transfers`] reported by their sources.
pub fn fixture_with_transfers() -> App {
    let mut app = fixture();
    for r in transfers() {
        update(
            &mut app,
            Msg::Event(proto::Event {
                host: r.source.clone(),
                kind: Some(Kind::Migration(r)),
            }),
        );
    }
    app
}

/// hv-a..hv-e: hv-d is lost, hv-e draining. web-01 migrates hv-a → hv-b,
/// 45 s into pre-copy and converging; db-01 failed hv-b → hv-c with a
/// pending rollback on hv-c; app-01 moved.
/// A fast migration of `vm` that moved it to `dst` without its network:
/// port-profile's ASSOCIATE failed there (degraded).
pub fn degraded_migration(id: &str, vm: &str, src: &str, dst: &str) -> proto::MigrationRecord {
    let mut record = migration(id, vm, src, dst, proto::Outcome::Succeeded);
    record.outcome = proto::Outcome::Degraded as i32;
    record.mode = proto::Mode::Fast as i32;
    record.committed = true;
    let reason = format!("finish: ASSOCIATE {vm} rejected by switch tor-{dst}: port busy");
    record.features[0].finish = proto::StepStatus::Failed as i32;
    record.features[0].error = reason.clone();
    record.error = format!("port-profile {reason}");
    record
}

/// The fixture with `m-deg` added: app-02 moved hv-a → hv-c degraded, and
/// runs on hv-c; the cursor on it.
pub fn fixture_with_degraded() -> App {
    let mut app = fixture();
    update(
        &mut app,
        Msg::Event(proto::Event {
            host: "hv-a".into(),
            kind: Some(Kind::Migration(degraded_migration(
                "m-deg", "app-02", "hv-a", "hv-c",
            ))),
        }),
    );
    let mut app_02 = vm("app-02");
    app_02.host = "hv-c".into();
    update(
        &mut app,
        Msg::Event(proto::Event {
            host: "hv-c".into(),
            kind: Some(Kind::Vm(app_02)),
        }),
    );
    let row = app
        .rows()
        .iter()
        .position(|m| m.record.id == "m-deg")
        .expect("m-deg in the table");
    app.select_row(row);
    app
}

pub fn fixture() -> App {
    let names: Vec<String> = ["hv-a", "hv-b", "hv-c", "hv-d", "hv-e"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut app = App::new(ClusterState::new("test", &names), false, "default");
    app.log_path = "/var/lib/tern-test/console.log".into();
    let snapshot = |h: proto::Host, vms: Vec<proto::Vm>, migrations, evacuations| {
        Msg::Event(proto::Event {
            host: h.name.clone(),
            kind: Some(Kind::Snapshot(proto::Snapshot {
                host: Some(h),
                vms,
                migrations,
                evacuations,
            })),
        })
    };
    let mut hv_c = host("hv-c", false, 0, &["port-profile"]);
    hv_c.pending_rollbacks.push(proto::PendingRollback {
        migration_id: "m-fail".into(),
        vm: "db-01".into(),
        feature: "port-profile".into(),
        stage: "rollback".into(),
        ..Default::default()
    });
    let mut running = migration("m-run", "web-01", "hv-a", "hv-b", proto::Outcome::None);
    running.transfer = Some(precopy_stats());
    running.convergence = Some(outlook(
        proto::Verdict::Converging,
        Some(12_000),
        CONVERGING,
    ));
    for msg in [
        snapshot(
            host("hv-a", false, 0, &["port-profile"]),
            vec![vm("web-01")],
            vec![
                running,
                migration("m-ok", "app-01", "hv-a", "hv-c", proto::Outcome::Succeeded),
            ],
            vec![],
        ),
        snapshot(
            host("hv-b", false, 0, &["port-profile"]),
            vec![vm("db-01")],
            vec![migration(
                "m-fail",
                "db-01",
                "hv-b",
                "hv-c",
                proto::Outcome::Failed,
            )],
            vec![],
        ),
        snapshot(
            hv_c,
            vec![vm("app-01")],
            vec![],
            vec![cancelled_evacuation()],
        ),
        snapshot(
            host("hv-e", true, 0, &["port-profile"]),
            vec![],
            vec![],
            vec![evacuation()],
        ),
    ] {
        update(&mut app, msg);
    }
    for h in ["hv-a", "hv-b", "hv-c", "hv-e"] {
        update(&mut app, Msg::Connected { host: h.into() });
    }
    update(
        &mut app,
        Msg::Lost {
            host: "hv-d".into(),
            since_ms: 0,
            error: "connection refused".into(),
        },
    );
    app
}
