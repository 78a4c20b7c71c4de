//! `tern check VM --to HOST`: every admission check of Begin (on the VM's
//! source) and Prepare (on the destination), through real agent processes
//! on loopback and the CLI. Each refusal reason fails its check in the
//! words the phase itself refuses with (a real `tern migrate` is refused
//! the same way), a check starts, locks and journals nothing, and the exit
//! codes are 0 (all pass), 1 (a check fails), 64 (bad usage, an unknown VM
//! or host), 69 (the VM's agent unreachable) and 77 (a viewer).

mod common;

use std::time::{Duration, Instant};

use common::*;
use prost::Message;
use serde_json::Value;
use tern::proto;

/// `tern check ARGS --json`: the exit code and the answer.
fn check_json(cluster: &Cluster, args: &[&str]) -> (i32, Value) {
    let mut all = vec!["check"];
    all.extend_from_slice(args);
    all.push("--json");
    cluster.tern_json(&all)
}

/// `tern check ARGS` in words: exit code, stdout, stderr.
fn check_text(cluster: &Cluster, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["check"];
    all.extend_from_slice(args);
    let out = cluster.tern(&all);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The check named `name` on `host`; fails the test if there is none.
#[track_caller]
fn named<'a>(answer: &'a Value, host: &str, name: &str) -> &'a Value {
    answer["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["host"] == host && c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} on {host} in {answer:#}"))
}

/// The checks that failed, as (host, name).
fn failed(answer: &Value) -> Vec<(String, String)> {
    answer["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ok"] == false)
        .map(|c| {
            (
                c["host"].as_str().unwrap().to_string(),
                c["name"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn pair(host: &str, name: &str) -> (String, String) {
    (host.to_string(), name.to_string())
}

/// Migrations any agent knows of.
fn migrations(cluster: &Cluster) -> usize {
    cluster.status()["migrations"].as_array().unwrap().len()
}

/// A real migration of `vm` to `to` is refused: its error, checked to say
/// `words`.
#[track_caller]
fn migrate_refused(cluster: &Cluster, vm: &str, to: &str, mode: &str, words: &str) {
    let out = cluster.tern(&["migrate", vm, "--to", to, "--mode", mode, "--json"]);
    // A refused Begin is on stderr; a refused Prepare is the record's error.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let error = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|record| record["error"].as_str().map(str::to_string))
        .collect::<String>();
    let text = format!("{error}{}", String::from_utf8_lossy(&out.stderr));
    assert_ne!(
        out.status.code(),
        Some(0),
        "migrate {vm} to {to} worked: {text}"
    );
    assert!(
        text.contains(words),
        "migrate {vm} to {to} was refused, but not with {words:?}: {text}"
    );
}

#[test]
fn a_vm_that_can_move_passes_every_check_and_nothing_is_started_or_held() {
    let cluster = Cluster::start(vec![
        host("hv-a", format!("{}{}", port_profile(""), vm("web-01", 512))),
        host("hv-b", port_profile("")),
    ]);
    let (code, answer) = check_json(&cluster, &["web-01", "--to", "hv-b"]);
    assert_eq!(code, 0, "{answer:#}");
    assert_eq!(answer["ok"], true);
    assert_eq!(answer["source"], "hv-a");
    assert_eq!(answer["mode"], "safe");
    assert!(failed(&answer).is_empty(), "{answer:#}");
    for name in [
        "agent",
        "destination",
        "vm state",
        "definition",
        "lock",
        "repair",
        "limits",
    ] {
        named(&answer, "hv-a", name);
    }
    for name in [
        "agent",
        "drain",
        "protocol version",
        "features",
        "machine",
        "pending state",
        "limits",
        "guest",
        "capacity",
    ] {
        named(&answer, "hv-b", name);
    }
    let capacity = named(&answer, "hv-b", "capacity")["detail"]
        .as_str()
        .unwrap();
    assert!(
        capacity.contains("needs 0.5 GiB and 2"),
        "capacity says what the VM needs: {capacity}"
    );
    assert!(
        named(&answer, "hv-b", "features")["detail"]
            .as_str()
            .unwrap()
            .contains("port-profile (driver port-profile)"),
        "{answer:#}"
    );

    // In words: one line per check, then the verdict.
    let (code, stdout, stderr) = check_text(&cluster, &["web-01", "--to", "hv-b"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.lines().any(|l| l.starts_with("ok  hv-b capacity: ")),
        "{stdout}"
    );
    assert!(
        stdout.contains("web-01 can move from hv-a to hv-b in safe mode: all 16 checks pass"),
        "{stdout}"
    );

    // Nothing was started, locked, reserved or journaled: no migration
    // anywhere, the guest where it was, and a real migration (which needs
    // the lock, a slot on both sides and the capacity) goes through.
    assert_eq!(migrations(&cluster), 0);
    assert_eq!(
        cluster.guests_of("web-01"),
        vec![("hv-a".to_string(), "running".to_string())]
    );
    let (code, record) = cluster.tern_json(&["migrate", "web-01", "--to", "hv-b", "--json"]);
    assert_eq!(code, 0, "{record}");
    assert_eq!(record["attempt"], 1);

    // Now it runs on hv-b: checking a move to where it runs fails Begin's
    // destination check, exit 1.
    let (code, answer) = check_json(&cluster, &["web-01", "--to", "hv-b"]);
    assert_eq!(code, 1, "{answer:#}");
    assert_eq!(failed(&answer), vec![pair("hv-b", "destination")]);
    assert!(
        named(&answer, "hv-b", "destination")["detail"]
            .as_str()
            .unwrap()
            .contains("already runs on hv-b"),
        "{answer:#}"
    );
}

#[test]
fn bad_usage_an_unknown_vm_or_host_exits_64_and_asks_nobody_to_change_anything() {
    let cluster = Cluster::start(vec![
        host("hv-a", format!("{}{}", port_profile(""), vm("web-01", 256))),
        host("hv-b", port_profile("")),
    ]);
    for (args, words) in [
        (vec!["nope-01", "--to", "hv-b"], "no VM named nope-01"),
        (vec!["web-01", "--to", "hv-z"], "no host named hv-z"),
        (vec!["web 01", "--to", "hv-b"], "VM"),
        (vec!["web-01"], "--to"),
        (
            vec!["web-01", "--to", "hv-b", "--mode", "reckless"],
            "reckless",
        ),
    ] {
        let (code, stdout, stderr) = check_text(&cluster, &args);
        assert_eq!(code, 64, "tern check {args:?}: {stdout}{stderr}");
        assert!(
            stderr.contains(words),
            "tern check {args:?} should say {words:?}: {stderr}"
        );
    }
    assert_eq!(migrations(&cluster), 0);
}

#[test]
fn each_refusal_reason_fails_its_check_in_the_words_of_the_phase() {
    let cluster = Cluster::start(vec![
        host(
            "hv-a",
            format!(
                "{}{}{}",
                port_profile(""),
                vm("web-01", 512),
                vm("web-02", 256)
            ),
        ),
        // Drained by an evacuation of nothing.
        host("hv-b", port_profile("")),
        // No port-profile driver, and room for 384 MiB.
        host(
            "hv-c",
            "[hypervisor]\nkind = \"sim\"\nmemory_mib = 384\nvcpus = 8\n\n",
        ),
        // Fails ASSOCIATE and DISASSOCIATE: a failed safe migration leaves a
        // pending rollback of web-02 there.
        host(
            "hv-d",
            port_profile("fail = [\"finish\"]\nfail_rollback = true"),
        ),
    ]);

    // drain: with the fix.
    let (code, job) = cluster.tern_json(&["evacuate", "hv-b", "--json"]);
    assert_eq!(code, 0, "an evacuation of an empty host: {job}");
    let (code, answer) = check_json(&cluster, &["web-01", "--to", "hv-b"]);
    assert_eq!(code, 1, "{answer:#}");
    assert_eq!(failed(&answer), vec![pair("hv-b", "drain")]);
    let drain = named(&answer, "hv-b", "drain")["detail"].as_str().unwrap();
    assert!(drain.contains("`tern undrain hv-b`"), "{drain}");
    migrate_refused(&cluster, "web-01", "hv-b", "safe", drain);
    let (code, _, stderr) = check_text(&cluster, &["web-01", "--to", "hv-b"]);
    assert_eq!(code, 1, "{stderr}");
    let out = cluster.tern(&["undrain", "hv-b"]);
    assert!(out.status.success(), "{out:?}");
    let (code, answer) = check_json(&cluster, &["web-01", "--to", "hv-b"]);
    assert_eq!(code, 0, "undrained, hv-b takes it: {answer:#}");

    // features (safe mode: required is mandatory) and capacity, both on hv-c.
    let (code, answer) = check_json(&cluster, &["web-01", "--to", "hv-c"]);
    assert_eq!(code, 1, "{answer:#}");
    assert_eq!(
        failed(&answer),
        vec![pair("hv-c", "features"), pair("hv-c", "capacity")],
        "{answer:#}"
    );
    let features = named(&answer, "hv-c", "features")["detail"]
        .as_str()
        .unwrap();
    assert!(
        features.contains("\"port-profile\" is not known"),
        "{features}"
    );
    let capacity = named(&answer, "hv-c", "capacity")["detail"]
        .as_str()
        .unwrap();
    assert_eq!(
        capacity,
        "hv-c has 384 MiB and 8 vCPUs free; web-01 needs 512 MiB and 2 vCPUs"
    );
    // Prepare refuses at the first: the feature.
    migrate_refused(&cluster, "web-01", "hv-c", "safe", features);
    // Fast mode blocks on no feature: only capacity is left, and said.
    let (code, answer) = check_json(&cluster, &["web-01", "--to", "hv-c", "--mode", "fast"]);
    assert_eq!(code, 1, "{answer:#}");
    assert_eq!(failed(&answer), vec![pair("hv-c", "capacity")]);
    assert!(
        named(&answer, "hv-c", "features")["detail"]
            .as_str()
            .unwrap()
            .contains("fast mode goes on without it, degraded"),
        "{answer:#}"
    );
    migrate_refused(&cluster, "web-01", "hv-c", "fast", capacity);
    // web-02 fits in fast mode: every check passes.
    let (code, answer) = check_json(&cluster, &["web-02", "--to", "hv-c", "--mode", "fast"]);
    assert_eq!(code, 0, "{answer:#}");

    // pending state of the VM on the destination: a rollback that failed.
    let (code, record) = cluster.tern_json(&[
        "migrate", "web-02", "--to", "hv-d", "--mode", "safe", "--json",
    ]);
    assert_eq!(code, 1, "{record}");
    assert_eq!(feature(&record, "port-profile")["rollback"], "failed");
    let (code, answer) = check_json(&cluster, &["web-02", "--to", "hv-d"]);
    assert_eq!(code, 1, "{answer:#}");
    assert_eq!(failed(&answer), vec![pair("hv-d", "pending state")]);
    let pending = named(&answer, "hv-d", "pending state")["detail"]
        .as_str()
        .unwrap();
    assert!(
        pending.contains("pending rollback of port-profile on hv-d")
            && pending.contains("tern rollback"),
        "{pending}"
    );
    migrate_refused(&cluster, "web-02", "hv-d", "safe", pending);
    // Another VM has nothing pending there.
    let (code, answer) = check_json(&cluster, &["web-01", "--to", "hv-d"]);
    assert_eq!(code, 0, "{answer:#}");
}

#[test]
fn a_migration_in_flight_fails_the_lock_and_both_hosts_limits() {
    let cluster = Cluster::start(vec![
        // 512 MiB over 16 MiB/s: half a minute of transfer.
        host(
            "hv-a",
            format!(
                "max_outgoing = 1\n{}{}{}{}",
                link(16),
                port_profile(""),
                vm("web-01", 512),
                vm("web-02", 256)
            ),
        ),
        host("hv-b", format!("max_incoming = 1\n{}", port_profile(""))),
        host("hv-c", format!("{}{}", port_profile(""), vm("db-01", 256))),
    ]);
    let id = cluster.start_migration("web-01", "hv-b", "safe");
    cluster.wait_phase(&id, "perform");

    // The VM itself: locked on its source; its attempt still holds it on
    // the destination, which already has its incoming guest.
    let (code, answer) = check_json(&cluster, &["web-01", "--to", "hv-b"]);
    assert_eq!(code, 1, "{answer:#}");
    let failures = failed(&answer);
    assert!(failures.contains(&pair("hv-a", "lock")), "{answer:#}");
    assert!(
        failures.contains(&pair("hv-b", "pending state")),
        "{answer:#}"
    );
    let lock = named(&answer, "hv-a", "lock")["detail"].as_str().unwrap();
    assert!(
        lock.contains(&format!("already migrating (migration {id}")),
        "{lock}"
    );

    // Another VM of the same source: hv-a is at max_outgoing, hv-b at max_incoming.
    let (code, answer) = check_json(&cluster, &["web-02", "--to", "hv-b"]);
    assert_eq!(code, 1, "{answer:#}");
    assert_eq!(
        failed(&answer),
        vec![pair("hv-a", "limits"), pair("hv-b", "limits")],
        "{answer:#}"
    );
    let source_limit = named(&answer, "hv-a", "limits")["detail"].as_str().unwrap();
    assert!(source_limit.contains("max_outgoing = 1"), "{source_limit}");
    migrate_refused(&cluster, "web-02", "hv-b", "safe", source_limit);
    // From another source, only hv-b's limit is in the way.
    let (code, answer) = check_json(&cluster, &["db-01", "--to", "hv-b"]);
    assert_eq!(code, 1, "{answer:#}");
    assert_eq!(failed(&answer), vec![pair("hv-b", "limits")]);
    let dest_limit = named(&answer, "hv-b", "limits")["detail"].as_str().unwrap();
    assert!(
        dest_limit.contains("hv-b already receives 1 migrations (max_incoming = 1)"),
        "{dest_limit}"
    );
    migrate_refused(&cluster, "db-01", "hv-b", "safe", dest_limit);

    // The checks took nothing: once the migration is aborted, both go.
    let record = cluster.abort_and_wait(&id);
    assert_eq!(record["outcome"], "aborted", "{record}");
    wait_until(Duration::from_secs(10), "hv-b to take db-01 again", || {
        check_json(&cluster, &["db-01", "--to", "hv-b"]).0 == 0
    });
    let (code, answer) = check_json(&cluster, &["web-02", "--to", "hv-b"]);
    assert_eq!(code, 0, "{answer:#}");
}

#[test]
fn an_unanswering_destination_is_a_failed_check_and_an_unreachable_source_exits_69() {
    let mut cluster = Cluster::start(vec![
        host("hv-a", format!("{}{}", port_profile(""), vm("web-01", 256))),
        host("hv-b", port_profile("")),
    ]);
    // A hung destination: named, within the answer deadline.
    cluster.signal("hv-b", libc::SIGSTOP);
    let started = Instant::now();
    let (code, answer) = check_json(
        &cluster,
        &["web-01", "--to", "hv-b", "--answer-deadline-ms", "500"],
    );
    let took = started.elapsed();
    cluster.signal("hv-b", libc::SIGCONT);
    assert_eq!(code, 1, "{answer:#}");
    assert_eq!(
        failed(&answer),
        vec![pair("hv-b", "reachable")],
        "{answer:#}"
    );
    assert_eq!(
        named(&answer, "hv-b", "reachable")["detail"],
        "hv-b did not answer within 500 ms"
    );
    // Finding the VM (one deadline) and the check (another), with room.
    assert!(took < Duration::from_secs(5), "took {took:?}");

    // A dead destination: the same check, failed with why.
    cluster.kill("hv-b");
    let (code, answer) = check_json(&cluster, &["web-01", "--to", "hv-b"]);
    assert_eq!(code, 1, "{answer:#}");
    assert_eq!(
        failed(&answer),
        vec![pair("hv-b", "reachable")],
        "{answer:#}"
    );

    // The VM's own agent gone: 69, naming it.
    cluster.kill("hv-a");
    let (code, stdout, stderr) = check_text(&cluster, &["web-01", "--to", "hv-b"]);
    assert_eq!(code, 69, "{stdout}{stderr}");
    assert!(stderr.contains("hv-a"), "{stderr}");
}

/// `Peer.CheckPrepare` straight from the test, as a source would ask it:
/// what only a forged or foreign C1 can show.
fn check_prepare(cluster: &Cluster, host: &str, c1: &proto::Cookie1) -> Vec<proto::AdmissionCheck> {
    block_on(async {
        let mut client = peer_client(cluster, host).await;
        let request = proto::CheckPrepareRequest {
            cookie1: c1.encode_to_vec(),
            ..Default::default()
        };
        tokio::time::timeout(ANSWER_WITHIN, client.check_prepare(request))
            .await
            .expect("CheckPrepare did not answer within 10 s")
            .unwrap_or_else(|status| panic!("CheckPrepare refused: {status:?}"))
            .into_inner()
            .checks
    })
}

fn c1_for(vm_name: &str, source: &str) -> proto::Cookie1 {
    let spec = tern::protocol::VmSpec {
        name: vm_name.into(),
        memory_mib: 64,
        vcpus: 1,
        dirty_rate_mib_s: 0,
        features: Vec::new(),
        qemu: None,
    };
    tern::protocol::cookies::cookie1(
        tern::host::admission::CHECK_ATTEMPT_ID,
        tern::host::admission::CHECK_MIGRATION_ID,
        source,
        &spec,
        tern::protocol::Mode::Safe,
    )
}

#[test]
fn another_protocol_version_and_a_guest_of_the_same_name_fail_prepare_s_checks() {
    let cluster = Cluster::start(vec![
        host("hv-a", format!("{}{}", port_profile(""), vm("web-01", 256))),
        host("hv-b", port_profile("")),
    ]);
    // A C1 of another protocol version: said, and nothing after it is read.
    let mut c1 = c1_for("new-01", "hv-b");
    c1.protocol_version = tern::protocol::PROTOCOL_VERSION + 1;
    let checks = check_prepare(&cluster, "hv-a", &c1);
    let last = checks.last().unwrap();
    assert_eq!(
        (last.name.as_str(), last.ok),
        ("protocol version", false),
        "{checks:#?}"
    );
    assert!(last.detail.contains("not compatible"), "{}", last.detail);
    assert!(
        checks[..checks.len() - 1].iter().all(|c| c.ok),
        "{checks:#?}"
    );
    // The same C1 as a real Prepare is refused with the same words.
    let refused = call_prepare(&cluster, "hv-a", &c1).unwrap_err();
    assert_eq!(refused.message(), last.detail);

    // A VM of the name of one the destination runs.
    let checks = check_prepare(&cluster, "hv-a", &c1_for("web-01", "hv-b"));
    let bad: Vec<_> = checks.iter().filter(|c| !c.ok).collect();
    assert_eq!(bad.len(), 1, "{checks:#?}");
    assert_eq!(bad[0].name, "guest");
    assert_eq!(bad[0].detail, "a guest named web-01 already exists on hv-a");

    // A VM it does not have passes; nothing was started or journaled for
    // any of these.
    let checks = check_prepare(&cluster, "hv-a", &c1_for("new-01", "hv-b"));
    assert!(checks.iter().all(|c| c.ok), "{checks:#?}");
    assert_eq!(migrations(&cluster), 0);
    assert_eq!(cluster.guests_of("new-01"), Vec::new());
}

#[test]
fn a_viewer_may_not_check_and_an_operator_checks_across_mutual_tls() {
    let cluster = Cluster::start_tls(vec![
        host("hv-a", format!("{}{}", port_profile(""), vm("web-01", 256))),
        host("hv-b", port_profile("")),
    ]);
    let tls = cluster.tls.as_ref().unwrap();
    let viewer = tls.issue("vera", "viewer", &[]);
    let operator = tls.issue("otto", "operator", &[]);
    let out = cluster.tern_as(Some(&viewer), &["check", "web-01", "--to", "hv-b"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(77), "{stderr}");
    assert!(stderr.contains("operator role"), "{stderr}");
    let out = cluster.tern_as(
        Some(&operator),
        &["check", "web-01", "--to", "hv-b", "--json"],
    );
    let (code, answer) = last_json(&["check"], &out);
    assert_eq!(code, 0, "{answer:#}");
    named(&answer, "hv-b", "capacity");
}
