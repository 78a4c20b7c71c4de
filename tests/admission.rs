//! Admission and restart defects of the agent, each fixed in the host core
//! (`src/host/`) or the journal (`src/agent/journal.rs`) and proved here with
//! real `tern agent` processes on loopback, driven by the `tern` CLI and, for
//! what only a peer can say, by a Peer gRPC client from the test.
//!
//! A host "without the driver" of a feature is one whose config has no
//! `[features.NAME]` for it. A `[[vm]]` needing such a feature is refused by
//! config validation, so every VM here boots on a host that has the driver
//! (hv-a) and reaches the driverless host (hv-b) by migrating.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use serde_json::Value;
use tern::proto;
use tern::protocol::{FeatureSpec, Mode, VmSpec};

/// hv-a has the port-profile driver and boots web-01 (required port-profile);
/// hv-b has no driver at all.
fn driver_only_on_hv_a() -> Cluster {
    Cluster::start(vec![
        host("hv-a", format!("{}{}", port_profile(""), vm("web-01", 256))),
        host("hv-b", ""),
    ])
}

/// hv-a boots web-01; both hosts have the port-profile driver.
fn driver_on_both() -> Cluster {
    Cluster::start(vec![
        host("hv-a", format!("{}{}", port_profile(""), vm("web-01", 256))),
        host("hv-b", port_profile("")),
    ])
}

/// `tern migrate VM --to HOST --mode MODE --json`, waiting for the outcome.
fn migrate(cluster: &Cluster, vm: &str, to: &str, mode: &str) -> (i32, Value) {
    cluster.tern_json(&["migrate", vm, "--to", to, "--mode", mode, "--json"])
}

#[track_caller]
fn running_alone_on(cluster: &Cluster, vm: &str, on: &str) {
    assert_eq!(
        cluster.guests_of(vm),
        vec![(on.to_string(), "running".to_string())],
        "expected {vm} running on {on} and nowhere else"
    );
}

/// SIGINT an agent and wait for it to exit cleanly.
#[track_caller]
fn stop_agent(cluster: &mut Cluster, name: &str) {
    cluster.signal(name, libc::SIGINT);
    let status = cluster.wait_exit(name, Duration::from_secs(15));
    assert!(
        status.success(),
        "agent {name} exited with {status} after SIGINT\nlog:\n{}",
        cluster.log(name)
    );
}

/// Start a stopped agent again; if it does not come up, say why from its log.
#[track_caller]
fn start_again(cluster: &mut Cluster, name: &str) {
    let started =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cluster.start_agent(name)));
    if let Err(panic) = started {
        let why = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        panic!(
            "agent {name} did not start again ({why})\nlog:\n{}",
            cluster.log(name)
        );
    }
    cluster.wait_connected();
}

fn state_dir(cluster: &Cluster, name: &str) -> PathBuf {
    cluster.path().join(format!("{name}-state"))
}

/// The journal of a stopped agent.
fn open_journal(cluster: &Cluster, name: &str) -> rusqlite::Connection {
    rusqlite::Connection::open(state_dir(cluster, name).join("journal.db")).unwrap()
}

fn call_resolve(cluster: &Cluster, host: &str, attempt_id: &str) -> proto::ResolveReply {
    block_on(async {
        let mut client = peer_client(cluster, host).await;
        let request = proto::ResolveRequest {
            attempt_id: attempt_id.to_string(),
        };
        tokio::time::timeout(ANSWER_WITHIN, client.resolve(request))
            .await
            .expect("Resolve did not answer within 10 s")
            .unwrap_or_else(|s| panic!("Resolve {attempt_id} on {host} refused: {s:?}"))
            .into_inner()
    })
}

fn call_abort(
    cluster: &Cluster,
    host: &str,
    attempt_id: &str,
    from: &str,
) -> proto::PeerAbortReply {
    block_on(async {
        let mut client = peer_client(cluster, host).await;
        let request = proto::PeerAbortRequest {
            attempt_id: attempt_id.to_string(),
            reason: "the source gave up before sending C1".into(),
            from_host: from.to_string(),
            cookie4: Vec::new(),
            cause: String::new(),
        };
        tokio::time::timeout(ANSWER_WITHIN, client.abort(request))
            .await
            .expect("Abort did not answer within 10 s")
            .unwrap_or_else(|s| panic!("Abort {attempt_id} on {host} refused: {s:?}"))
            .into_inner()
    })
}

/// A VM spec as a source would put it in C1: a required port-profile.
fn incoming_vm(name: &str) -> VmSpec {
    VmSpec {
        name: name.to_string(),
        memory_mib: 256,
        vcpus: 2,
        dirty_rate_mib_s: 10,
        features: vec![FeatureSpec {
            name: "port-profile".into(),
            driver: "port-profile".into(),
            required: true,
        }],
        qemu: None,
    }
}

fn pending_of<'a>(pending: &'a [Value], migration_id: &str) -> Vec<&'a Value> {
    pending
        .iter()
        .filter(|p| p["migration_id"] == migration_id)
        .collect()
}

// ---- 1. a release that could never succeed ----------------------------------

/// Before: hv-b, without a port-profile driver, could never DISASSOCIATE the
/// port of a VM that left it, so the release stayed pending for ever and
/// every later Prepare of the VM on hv-b was refused because of it.
#[test]
fn a_release_with_no_driver_on_the_old_host_leaves_nothing_pending_and_the_vm_can_come_back() {
    let cluster = driver_only_on_hv_a();

    let (code, there) = migrate(&cluster, "web-01", "hv-b", "fast");
    assert_eq!(code, 2, "fast move to the driverless hv-b: {there}");
    assert_eq!(there["outcome"], "degraded", "{there}");
    running_alone_on(&cluster, "web-01", "hv-b");

    // Back to hv-a: hv-b sources it, and its Confirm releases port-profile,
    // for which it has no driver.
    let (code, back) = migrate(&cluster, "web-01", "hv-a", "safe");
    assert_eq!(code, 0, "move back to hv-a: {back}");
    assert_eq!(back["outcome"], "succeeded", "{back}");
    assert_eq!(back["source"], "hv-b", "{back}");
    let release = &feature(&back, "port-profile")["release"];
    assert_eq!(
        release, "ok",
        "a release with no driver should have nothing to undo, not fail: {back}"
    );
    running_alone_on(&cluster, "web-01", "hv-a");
    let pending = cluster.pending_rollbacks("hv-b");
    assert!(
        pending.is_empty(),
        "hv-b should keep no pending work for a feature it has no driver for: {pending:?}"
    );
    assert!(
        !cluster.feature_state("hv-a", "web-01").is_empty(),
        "hv-a should hold web-01's port again"
    );

    // The VM can come back to hv-b.
    let (code, again) = migrate(&cluster, "web-01", "hv-b", "fast");
    assert_eq!(
        code, 2,
        "a second fast move to hv-b should be accepted and end degraded: {again}"
    );
    assert_eq!(again["outcome"], "degraded", "{again}");
    assert_eq!(again["running_on"], "hv-b", "{again}");
    running_alone_on(&cluster, "web-01", "hv-b");
}

/// Before: pending work on a feature without a driver on that host (as an
/// agent before the fix left it in its journal) counted as state a new
/// attempt of the VM would clash with, so Prepare refused the VM for good.
#[test]
fn a_pending_release_of_a_feature_without_a_driver_does_not_block_a_later_prepare() {
    let mut cluster = driver_only_on_hv_a();
    let (code, there) = migrate(&cluster, "web-01", "hv-b", "fast");
    assert_eq!(code, 2, "{there}");
    let (code, back) = migrate(&cluster, "web-01", "hv-a", "safe");
    assert_eq!(code, 0, "{back}");
    let back_id = back["id"].as_str().unwrap().to_string();

    // The release an agent before the fix would have left pending on hv-b.
    stop_agent(&mut cluster, "hv-b");
    let changed = open_journal(&cluster, "hv-b")
        .execute(
            "INSERT OR REPLACE INTO pending (attempt_id, feature, stage, migration_id, vm, error, tries, next_try_ms)
             VALUES (?1, 'port-profile', 'release', ?2, 'web-01', 'feature port-profile is not configured on hv-b', 1, ?3)",
            rusqlite::params![back["attempt_id"].as_str().unwrap(), back_id, i64::MAX / 2],
        )
        .unwrap();
    assert_eq!(changed, 1);
    start_again(&mut cluster, "hv-b");
    let pending = cluster.pending_rollbacks("hv-b");
    assert_eq!(
        pending_of(&pending, &back_id).len(),
        1,
        "the journaled release should be listed as pending on hv-b: {pending:?}"
    );

    let (code, again) = migrate(&cluster, "web-01", "hv-b", "fast");
    assert_eq!(
        code, 2,
        "a pending release of a driverless feature must not refuse the VM: {again}"
    );
    assert_eq!(again["outcome"], "degraded", "{again}");
    running_alone_on(&cluster, "web-01", "hv-b");

    // And running it has nothing to undo: it clears.
    let out = cluster.tern(&["rollback", &back_id]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "tern rollback {back_id}: stdout {} stderr {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let pending = cluster.pending_rollbacks("hv-b");
    assert!(
        pending_of(&pending, &back_id).is_empty(),
        "the release should be done after tern rollback: {pending:?}"
    );
}

// ---- 2. fast mode has no mandatory features ---------------------------------

/// Before: C1 listed required features as mandatory in fast mode too, so
/// an emergency fast move to a host without the driver was refused.
#[test]
fn a_fast_move_to_a_host_without_the_driver_is_accepted_degraded_and_a_safe_one_is_refused() {
    let cluster = driver_only_on_hv_a();

    let (code, safe) = migrate(&cluster, "web-01", "hv-b", "safe");
    assert_eq!(code, 1, "safe move to a host without the driver: {safe}");
    assert_eq!(safe["outcome"], "failed", "{safe}");
    assert_eq!(safe["running_on"], "hv-a", "{safe}");
    assert_eq!(phase(&safe, "prepare")["status"], "failed", "{safe}");
    assert_eq!(phase(&safe, "perform")["status"], "skipped", "{safe}");
    let error = safe["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("mandatory") && error.contains("port-profile"),
        "the refusal should name the mandatory feature: {error:?}"
    );
    running_alone_on(&cluster, "web-01", "hv-a");

    let (code, fast) = migrate(&cluster, "web-01", "hv-b", "fast");
    assert_eq!(code, 2, "fast move to a host without the driver: {fast}");
    assert_eq!(fast["outcome"], "degraded", "{fast}");
    assert_eq!(fast["running_on"], "hv-b", "{fast}");
    let pp = feature(&fast, "port-profile");
    assert_eq!(pp["prepare"], "failed", "{fast}");
    assert_ne!(pp["finish"], "ok", "{fast}");
    let detail = pp["error"].as_str().unwrap_or_default();
    assert!(
        detail.contains("not configured on hv-b"),
        "the feature's error should say hv-b has no driver: {fast}"
    );
    running_alone_on(&cluster, "web-01", "hv-b");
    assert!(
        cluster.feature_state("hv-a", "web-01").is_empty(),
        "hv-a kept web-01's port after it left"
    );
}

// ---- 3. a lost guest list ---------------------------------------------------

/// Before: an agent whose simulated hypervisor had lost its guest list
/// (`sim-guests.json`) booted its configured VMs again on restart, so a VM
/// that had moved away ran on two hosts.
#[test]
fn a_lost_guest_list_does_not_boot_a_vm_that_moved_away() {
    let mut cluster = driver_on_both();
    let (code, record) = migrate(&cluster, "web-01", "hv-b", "safe");
    assert_eq!(code, 0, "{record}");
    running_alone_on(&cluster, "web-01", "hv-b");

    stop_agent(&mut cluster, "hv-a");
    let guest_list = state_dir(&cluster, "hv-a").join("sim-guests.json");
    assert!(
        guest_list.exists(),
        "expected the simulated hypervisor's guest list at {}",
        guest_list.display()
    );
    std::fs::remove_file(&guest_list).unwrap();
    start_again(&mut cluster, "hv-a");

    running_alone_on(&cluster, "web-01", "hv-b");
    assert!(
        cluster.feature_state("hv-a", "web-01").is_empty(),
        "hv-a took web-01's port again: {:?}",
        cluster.feature_state("hv-a", "web-01")
    );
}

// ---- 4. an unreadable journal row -------------------------------------------

/// Before: one journal row that failed to parse made the agent refuse to
/// start at all.
#[test]
fn an_unreadable_journal_row_is_skipped_and_reported_and_the_agent_starts() {
    let mut cluster = driver_on_both();
    let (code, record) = migrate(&cluster, "web-01", "hv-b", "safe");
    assert_eq!(code, 0, "{record}");
    let attempt_id = record["attempt_id"].as_str().unwrap().to_string();

    stop_agent(&mut cluster, "hv-a");
    let changed = open_journal(&cluster, "hv-a")
        .execute(
            "UPDATE attempt SET body = '{\"attempt_id\": \"truncat' WHERE id = ?1 AND side = 'source'",
            [&attempt_id],
        )
        .unwrap();
    assert_eq!(
        changed, 1,
        "no source row for {attempt_id} in hv-a's journal"
    );
    start_again(&mut cluster, "hv-a");

    let status = cluster.status();
    let warnings: Vec<&str> = host_of(&status, "hv-a")["warnings"]
        .as_array()
        .map(|w| w.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert!(
        warnings.iter().any(|w| w.contains(&attempt_id)),
        "hv-a's warnings in tern status --json should name the unreadable row {attempt_id}: {warnings:?}"
    );
    let log = cluster.log("hv-a");
    assert!(
        log.lines()
            .any(|l| l.contains(&attempt_id) && l.contains("could not be read")),
        "hv-a's log should say the row {attempt_id} could not be read:\n{log}"
    );
    // It serves: web-01 can come back to it.
    let (code, back) = migrate(&cluster, "web-01", "hv-a", "safe");
    assert_eq!(code, 0, "{back}");
    running_alone_on(&cluster, "web-01", "hv-a");
}

// ---- 5. tombstones ----------------------------------------------------------

/// Before: "this attempt will never be prepared here" lived only in memory,
/// so after a restart a late C1 of an attempt the host had answered "not
/// committed" (Resolve) or "aborted" (Abort) for was prepared after all.
#[test]
fn a_tombstone_survives_a_restart_and_refuses_a_late_prepare() {
    let mut cluster = driver_on_both();

    let resolved = call_resolve(&cluster, "hv-b", "m-00000001a7e1.1");
    assert_eq!(
        resolved.resolution,
        proto::Resolution::NotCommitted as i32,
        "Resolve of an unknown attempt: {resolved:?}"
    );
    let aborted = call_abort(&cluster, "hv-b", "m-00000001a7e2.1", "hv-a");
    assert!(aborted.aborted, "Abort of an unknown attempt: {aborted:?}");

    // A crash, not a clean stop: the tombstones were durable before the answers.
    cluster.kill("hv-b");
    start_again(&mut cluster, "hv-b");

    for (attempt_id, migration_id) in [
        ("m-00000001a7e1.1", "m-00000001a7e1"),
        ("m-00000001a7e2.1", "m-00000001a7e2"),
    ] {
        let c1 = tern::protocol::cookies::cookie1(
            attempt_id,
            migration_id,
            "hv-a",
            &incoming_vm("db-09"),
            Mode::Safe,
        );
        let status = call_prepare(&cluster, "hv-b", &c1)
            .expect_err("a late Prepare of a tombstoned attempt was accepted after a restart");
        assert_eq!(
            status.code(),
            tonic::Code::FailedPrecondition,
            "{attempt_id}: {status:?}"
        );
        assert!(
            status.message().contains(attempt_id) && status.message().contains("was aborted"),
            "{attempt_id}: {status:?}"
        );
    }
    assert!(
        cluster.guests_of("db-09").is_empty(),
        "a refused Prepare started a guest: {:?}",
        cluster.guests_of("db-09")
    );
    assert!(cluster.feature_state("hv-b", "db-09").is_empty());

    // Control: the same C1 with an id hv-b never answered for is prepared.
    let c1 = tern::protocol::cookies::cookie1(
        "m-000000f7e5e1.1",
        "m-000000f7e5e1",
        "hv-a",
        &incoming_vm("db-09"),
        Mode::Safe,
    );
    call_prepare(&cluster, "hv-b", &c1).expect("a fresh attempt of the same VM was refused");
}

// ---- 6. source and destination rows of one attempt id -----------------------

/// hv-a sources web-01 to hv-b (attempt X), then a C1 saying X, as hv-b
/// sending web-01 back under the same id would carry, arrives at hv-a.
/// Returns the cluster, the record of X as hv-a sourced it, and Prepare's
/// answer.
fn a_c1_reusing_a_source_attempt_id() -> (Cluster, Value, Result<proto::PrepareReply, tonic::Status>)
{
    let cluster = driver_on_both();
    let (code, sourced) = migrate(&cluster, "web-01", "hv-b", "safe");
    assert_eq!(code, 0, "{sourced}");
    let c1 = tern::protocol::cookies::cookie1(
        sourced["attempt_id"].as_str().unwrap(),
        sourced["id"].as_str().unwrap(),
        "hv-b",
        &incoming_vm("web-01"),
        Mode::Safe,
    );
    let answer = call_prepare(&cluster, "hv-a", &c1);
    (cluster, sourced, answer)
}

/// The journal rows of an attempt id on a stopped agent: their sides.
fn journal_sides(cluster: &Cluster, name: &str, attempt_id: &str) -> Vec<String> {
    let journal = open_journal(cluster, name);
    let mut stmt = journal
        .prepare("SELECT side FROM attempt WHERE id = ?1 ORDER BY side")
        .unwrap();
    stmt.query_map([attempt_id], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Before: the journal keyed attempts by id alone, so a destination row of
/// attempt X overwrote the host's source row of X, and after a restart the
/// host no longer knew the migration it had sourced.
#[test]
fn a_prepare_reusing_a_source_attempt_id_does_not_overwrite_the_source_record() {
    let (mut cluster, sourced, answer) = a_c1_reusing_a_source_attempt_id();
    let migration_id = sourced["id"].as_str().unwrap().to_string();
    let attempt_id = sourced["attempt_id"].as_str().unwrap().to_string();
    // Refusing such a C1 would protect the record too; accepting it is what
    // writes a destination row of X next to the source row.
    let accepted = answer.is_ok();
    if accepted {
        // No source heartbeats it: hv-a gives the attempt up on its own.
        wait_until(
            Duration::from_secs(10),
            "hv-a to roll back the incoming attempt nobody drives",
            || cluster.guests_of("web-01").iter().all(|(h, _)| h != "hv-a"),
        );
        assert!(
            cluster.feature_state("hv-a", "web-01").is_empty(),
            "the rolled-back attempt left a port on hv-a: {:?}",
            cluster.feature_state("hv-a", "web-01")
        );
    } else {
        eprintln!("hv-a refused the C1 reusing {attempt_id}: {answer:?}");
    }

    stop_agent(&mut cluster, "hv-a");
    let sides = journal_sides(&cluster, "hv-a", &attempt_id);
    let expected: Vec<&str> = if accepted {
        vec!["destination", "source"]
    } else {
        vec!["source"]
    };
    assert_eq!(
        sides, expected,
        "hv-a's journal rows for {attempt_id} (Prepare accepted: {accepted})"
    );
    start_again(&mut cluster, "hv-a");

    let after = cluster.migration(&migration_id);
    for key in [
        "vm",
        "source",
        "destination",
        "mode",
        "attempt",
        "attempt_id",
        "outcome",
        "running_on",
        "committed",
        "phases",
        "features",
    ] {
        assert_eq!(
            after[key], sourced[key],
            "the source record of {attempt_id} changed in {key:?}:\nbefore: {sourced}\nafter: {after}"
        );
    }
    running_alone_on(&cluster, "web-01", "hv-b");
}

// ---- found while writing these tests, and fixed -----------------------------------

/// Found writing the test above: with a live incoming attempt X and an ended
/// source attempt X on one host, the Peer service's Abort looked for a
/// source attempt first, so an Abort from X's source never reached the
/// incoming attempt, yet was answered `aborted: true`. Who sends it decides.
#[test]
fn an_abort_of_a_reused_attempt_id_reaches_the_incoming_attempt() {
    let (cluster, sourced, answer) = a_c1_reusing_a_source_attempt_id();
    let attempt_id = sourced["attempt_id"].as_str().unwrap().to_string();
    if answer.is_err() {
        // Refusing the C1 is a fix as good as routing the Abort right.
        assert!(cluster.guests_of("web-01").iter().all(|(h, _)| h != "hv-a"));
        return;
    }
    let sent = std::time::Instant::now();
    let reply = call_abort(&cluster, "hv-a", &attempt_id, "hv-b");
    assert!(reply.aborted, "{reply:?}");
    // A peer timeout of 1.5 s would clean it up anyway; an Abort that
    // reached it does so at once.
    let on_hv_a = |guests: &[(String, String)]| guests.iter().any(|(h, _)| h == "hv-a");
    let guests = loop {
        let guests = cluster.guests_of("web-01");
        if !on_hv_a(&guests) || sent.elapsed() > Duration::from_secs(1) {
            break guests;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        !on_hv_a(&guests),
        "hv-a answered Abort of {attempt_id} with {reply:?} but still holds the incoming guest {:?} after {:?}\nlog:\n{}",
        guests,
        sent.elapsed(),
        cluster.log("hv-a")
    );
}

/// Found while reading the journal's load: attempt and evacuation rows that
/// did not parse were set aside, but the pending table was read with `?`, so
/// one bad pending row still kept the agent from starting.
#[test]
fn an_unreadable_pending_row_is_skipped_and_reported_and_the_agent_starts() {
    let mut cluster = driver_on_both();
    let (code, record) = migrate(&cluster, "web-01", "hv-b", "safe");
    assert_eq!(code, 0, "{record}");
    stop_agent(&mut cluster, "hv-b");
    open_journal(&cluster, "hv-b")
        .execute(
            "INSERT INTO pending (attempt_id, feature, stage, migration_id, vm, error, tries, next_try_ms)
             VALUES ('m-0ld000000001.1', 'port-profile', 'rollback', 'm-0ld000000001', 'db-09', 'DISASSOCIATE failed', 'many', 0)",
            [],
        )
        .unwrap();
    start_again(&mut cluster, "hv-b");
    let status = cluster.status();
    let warnings = &host_of(&status, "hv-b")["warnings"];
    assert!(
        warnings.to_string().contains("m-0ld000000001.1"),
        "hv-b's warnings should name the unreadable pending row: {warnings}"
    );
    running_alone_on(&cluster, "web-01", "hv-b");
}
