//! Rollbacks that fail are kept as pending rollbacks, shown in the status,
//! and re-run by `tern rollback ID`, through real agents and the CLI.

mod common;

use common::*;
use serde_json::Value;

/// hv-b's port-profile fails ASSOCIATE (finish) and DISASSOCIATE (rollback).
fn failing_rollback_pair() -> Cluster {
    Cluster::start(vec![
        host("hv-a", format!("{}{}", port_profile(""), vm("web-01", 256))),
        // The tests repair hv-b's switch with `tern fault`.
        host(
            "hv-b",
            format!(
                "allow_fault_injection = true\n{}",
                port_profile("fail = [\"finish\"]\nfail_rollback = true")
            ),
        ),
    ])
}

/// A safe-mode migration whose Finish fails and whose rollback on hv-b fails too.
fn migrate_with_failed_rollback(cluster: &Cluster) -> String {
    let (code, record) = cluster.tern_json(&[
        "migrate", "web-01", "--to", "hv-b", "--mode", "safe", "--json",
    ]);
    assert_eq!(code, 1, "{record}");
    assert_eq!(record["outcome"], "failed", "{record}");
    assert_eq!(record["running_on"], "hv-a", "{record}");
    assert_eq!(
        feature(&record, "port-profile")["rollback"],
        "failed",
        "{record}"
    );
    assert_eq!(
        cluster.guests_of("web-01"),
        vec![("hv-a".to_string(), "running".to_string())]
    );
    record["id"].as_str().unwrap().to_string()
}

fn pending_for<'a>(pending: &'a [Value], id: &str) -> Vec<&'a Value> {
    pending.iter().filter(|p| p["migration_id"] == id).collect()
}

/// Change hv-b's port-profile faults at run time over the Console's SetFaults.
fn set_port_profile_faults(cluster: &Cluster, host: &str, fail: Vec<String>, fail_rollback: bool) {
    let addr = format!("http://127.0.0.1:{}", cluster.host(host).port);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let mut client = tern::proto::console_client::ConsoleClient::connect(addr)
            .await
            .unwrap();
        client
            .set_faults(tern::proto::SetFaultsRequest {
                faults: Some(tern::proto::FaultSettings {
                    feature: "port-profile".into(),
                    fail,
                    fail_rate: 0.0,
                    latency_ms: 0,
                    fail_rollback,
                }),
            })
            .await
            .unwrap();
    });
}

fn tern_rollback(cluster: &Cluster, id: &str) -> (i32, String) {
    let out = cluster.tern(&["rollback", id]);
    let text = format!(
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn failed_rollback_is_listed_as_pending_and_operator_rollback_clears_it_once_the_switch_works() {
    let cluster = failing_rollback_pair();
    let id = migrate_with_failed_rollback(&cluster);

    let pending = cluster.pending_rollbacks("hv-b");
    let ours = pending_for(&pending, &id);
    assert_eq!(
        ours.len(),
        1,
        "expected one pending rollback for {id} on hv-b: {pending:?}"
    );
    assert_eq!(ours[0]["feature"], "port-profile");
    assert_eq!(ours[0]["stage"], "rollback");
    assert_eq!(ours[0]["vm"], "web-01");
    assert!(
        !ours[0]["error"].as_str().unwrap().is_empty(),
        "{pending:?}"
    );
    assert!(
        cluster.pending_rollbacks("hv-a").is_empty(),
        "{:?}",
        cluster.pending_rollbacks("hv-a")
    );
    let leftover = cluster.feature_state("hv-b", "web-01");
    assert_eq!(
        leftover.len(),
        1,
        "the failed DISASSOCIATE should leave the association visible on hv-b: {leftover:?}"
    );
    assert_eq!(leftover[0]["feature"], "port-profile");

    set_port_profile_faults(&cluster, "hv-b", vec![], false);
    let (code, text) = tern_rollback(&cluster, &id);
    assert_eq!(code, 0, "tern rollback {id}: {text}");

    assert!(
        pending_for(&cluster.pending_rollbacks("hv-b"), &id).is_empty(),
        "{:?}",
        cluster.pending_rollbacks("hv-b")
    );
    assert!(
        cluster.feature_state("hv-b", "web-01").is_empty(),
        "association left on hv-b after the rollback"
    );
    assert_eq!(
        cluster.guests_of("web-01"),
        vec![("hv-a".to_string(), "running".to_string())]
    );
    assert!(
        !cluster.feature_state("hv-a", "web-01").is_empty(),
        "hv-a lost the association of the VM it runs"
    );
}

#[test]
fn operator_rollback_while_the_fault_persists_exits_1_and_keeps_the_entry_with_more_tries() {
    let cluster = failing_rollback_pair();
    let id = migrate_with_failed_rollback(&cluster);

    let before = cluster.pending_rollbacks("hv-b");
    let before = pending_for(&before, &id);
    assert_eq!(before.len(), 1, "{before:?}");
    let tries_before = before[0]["tries"].as_u64().unwrap();

    let (code, text) = tern_rollback(&cluster, &id);
    assert_eq!(code, 1, "tern rollback {id}: {text}");
    assert!(text.contains("still pending"), "{text}");

    let after = cluster.pending_rollbacks("hv-b");
    let after = pending_for(&after, &id);
    assert_eq!(after.len(), 1, "the entry must stay pending: {after:?}");
    assert_eq!(after[0]["stage"], "rollback");
    assert!(
        after[0]["tries"].as_u64().unwrap() > tries_before,
        "tries did not increase: {tries_before} -> {after:?}"
    );
    assert_eq!(
        cluster.feature_state("hv-b", "web-01").len(),
        1,
        "the association is still there"
    );
}

/// Found by the simulator: a pending rollback left by an earlier attempt ran
/// after a later attempt had brought the VM to the same host, and tore down
/// the later attempt's port. Prepare now waits until the pending rollback is
/// gone, and says so.
#[test]
fn migrating_to_a_host_with_a_pending_rollback_of_the_vm_is_refused_until_it_is_cleared() {
    let cluster = failing_rollback_pair();
    let id = migrate_with_failed_rollback(&cluster);
    // The switch works again for new attempts, but the old entry is still pending.
    set_port_profile_faults(&cluster, "hv-b", vec![], false);

    let (code, record) = cluster.tern_json(&["retry", &id, "--mode", "fast", "--json"]);
    assert_eq!(code, 1, "{record}");
    assert_eq!(record["outcome"], "failed", "{record}");
    assert_eq!(record["running_on"], "hv-a", "{record}");
    let error = record["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("pending rollback of port-profile") && error.contains("tern rollback"),
        "the refusal should name the pending rollback and the fix: {error}"
    );
    assert_eq!(
        cluster.guests_of("web-01"),
        vec![("hv-a".to_string(), "running".to_string())]
    );

    let (code, text) = tern_rollback(&cluster, &id);
    assert_eq!(code, 0, "tern rollback {id}: {text}");
    let (code, record) = cluster.tern_json(&["retry", &id, "--mode", "fast", "--json"]);
    assert_eq!(code, 0, "{record}");
    assert_eq!(record["outcome"], "succeeded", "{record}");
    assert_eq!(
        cluster.guests_of("web-01"),
        vec![("hv-b".to_string(), "running".to_string())]
    );
    assert_eq!(
        cluster.feature_state("hv-b", "web-01").len(),
        1,
        "the new attempt's association must be in place on hv-b"
    );
    assert!(cluster.pending_rollbacks("hv-b").is_empty());
}
