//! Mode × feature-failure outcomes, through real agents and the CLI's JSON.

mod common;

use common::*;

fn two_hosts(destination_port_profile: &str) -> Cluster {
    Cluster::start(vec![
        host("hv-a", format!("{}{}", port_profile(""), vm("web-01", 256))),
        // `tern fault` drills change hv-b's switch at run time.
        host(
            "hv-b",
            format!(
                "allow_fault_injection = true\n{}",
                port_profile(destination_port_profile)
            ),
        ),
    ])
}

#[test]
fn safe_mode_resumes_source_when_associate_fails_in_finish() {
    let cluster = two_hosts("fail = [\"finish\"]");
    let (code, record) = cluster.tern_json(&[
        "migrate", "web-01", "--to", "hv-b", "--mode", "safe", "--json",
    ]);
    assert_eq!(code, 1, "{record}");
    assert_eq!(record["outcome"], "failed");
    assert_eq!(record["running_on"], "hv-a");
    assert_eq!(phase(&record, "finish")["status"], "failed");
    let pp = feature(&record, "port-profile");
    assert_eq!(pp["prepare"], "ok");
    assert_eq!(pp["finish"], "failed");
    assert_eq!(pp["rollback"], "ok");
    assert!(
        record["error"].as_str().unwrap().contains("ASSOCIATE"),
        "{record}"
    );
    assert_eq!(cluster.running_on("web-01"), vec!["hv-a"]);
    assert!(
        cluster.feature_state("hv-b", "web-01").is_empty(),
        "association left on hv-b"
    );
    assert_eq!(
        cluster.guests_of("web-01"),
        vec![("hv-a".to_string(), "running".to_string())]
    );
}

#[test]
fn fast_mode_moves_vm_despite_failed_associate_and_reports_degraded() {
    let cluster = two_hosts("fail = [\"finish\"]");
    let (code, record) = cluster.tern_json(&[
        "migrate", "web-01", "--to", "hv-b", "--mode", "fast", "--json",
    ]);
    assert_eq!(code, 2, "{record}");
    assert_eq!(record["outcome"], "degraded");
    assert_eq!(record["running_on"], "hv-b");
    assert_eq!(feature(&record, "port-profile")["finish"], "failed");
    // Why it is degraded, structured: the feature and stage on hv-b.
    let cause = &record["cause"];
    assert_eq!(cause["kind"], "feature", "{record}");
    assert_eq!(cause["side"], "destination", "{record}");
    assert_eq!(cause["host"], "hv-b", "{record}");
    assert_eq!(cause["feature"], "port-profile", "{record}");
    assert_eq!(cause["stage"], "finish", "{record}");
    assert!(
        cause["text"]
            .as_str()
            .unwrap_or_default()
            .contains("ASSOCIATE"),
        "{record}"
    );
    assert_eq!(cluster.running_on("web-01"), vec!["hv-b"]);
    assert!(
        cluster.feature_state("hv-a", "web-01").is_empty(),
        "source kept its association after release"
    );
}

/// A `[[vm]]` whose port-profile is not required.
fn vm_optional_port_profile(name: &str, memory_mib: u64) -> String {
    format!(
        "[[vm]]\nname = \"{name}\"\nmemory_mib = {memory_mib}\nvcpus = 2\ndirty_rate_mib_s = 10\nfeatures = [{{ name = \"port-profile\", required = false }}]\n\n"
    )
}

#[test]
fn safe_mode_required_feature_failing_in_prepare_fails_before_any_transfer() {
    let cluster = two_hosts("fail = [\"prepare\"]");
    let (code, record) = cluster.tern_json(&[
        "migrate", "web-01", "--to", "hv-b", "--mode", "safe", "--json",
    ]);
    assert_eq!(code, 1, "{record}");
    assert_eq!(record["outcome"], "failed", "{record}");
    assert_eq!(record["running_on"], "hv-a", "{record}");
    assert_eq!(phase(&record, "prepare")["status"], "failed", "{record}");
    assert_eq!(phase(&record, "perform")["status"], "skipped", "{record}");
    assert_eq!(phase(&record, "finish")["status"], "skipped", "{record}");
    let transferred = record["transfer"]["bytes_transferred"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(
        transferred, 0,
        "bytes moved although Prepare failed: {record}"
    );
    let pp = feature(&record, "port-profile");
    assert_eq!(pp["prepare"], "failed", "{record}");
    assert_ne!(pp["finish"], "ok", "{record}");
    assert_eq!(cluster.running_on("web-01"), vec!["hv-a"]);
    assert_eq!(
        cluster.guests_of("web-01"),
        vec![("hv-a".to_string(), "running".to_string())]
    );
    assert!(
        cluster.feature_state("hv-b", "web-01").is_empty(),
        "association left on hv-b"
    );
    assert!(
        !cluster.feature_state("hv-a", "web-01").is_empty(),
        "source lost its association"
    );
}

#[test]
fn safe_mode_moves_vm_when_non_required_feature_fails_in_finish_and_reports_degraded() {
    let cluster = Cluster::start(vec![
        host(
            "hv-a",
            format!(
                "{}{}",
                port_profile(""),
                vm_optional_port_profile("web-01", 256)
            ),
        ),
        host("hv-b", port_profile("fail = [\"finish\"]")),
    ]);
    let (code, record) = cluster.tern_json(&[
        "migrate", "web-01", "--to", "hv-b", "--mode", "safe", "--json",
    ]);
    assert_eq!(code, 2, "{record}");
    assert_eq!(record["outcome"], "degraded", "{record}");
    assert_eq!(record["running_on"], "hv-b", "{record}");
    let pp = feature(&record, "port-profile");
    assert_eq!(pp["required"], false, "{record}");
    assert_eq!(pp["prepare"], "ok", "{record}");
    assert_eq!(pp["finish"], "failed", "{record}");
    assert_eq!(cluster.running_on("web-01"), vec!["hv-b"]);
    assert_eq!(
        cluster.guests_of("web-01"),
        vec![("hv-b".to_string(), "running".to_string())]
    );
    assert!(
        cluster.feature_state("hv-a", "web-01").is_empty(),
        "source kept its association after release"
    );
}

#[test]
fn clean_migration_succeeds_and_moves_the_association_to_the_destination() {
    let cluster = two_hosts("");
    let before = cluster.feature_state("hv-a", "web-01");
    assert_eq!(
        before.len(),
        1,
        "source should hold the association before: {before:?}"
    );
    let (code, record) = cluster.tern_json(&[
        "migrate", "web-01", "--to", "hv-b", "--mode", "safe", "--json",
    ]);
    assert_eq!(code, 0, "{record}");
    assert_eq!(record["outcome"], "succeeded", "{record}");
    assert_eq!(record["running_on"], "hv-b", "{record}");
    for p in ["begin", "prepare", "perform", "finish", "confirm"] {
        assert_eq!(phase(&record, p)["status"], "ok", "phase {p}: {record}");
    }
    let pp = feature(&record, "port-profile");
    assert_eq!(pp["prepare"], "ok", "{record}");
    assert_eq!(pp["finish"], "ok", "{record}");
    assert_eq!(pp["release"], "ok", "{record}");
    let transfer = &record["transfer"];
    assert!(transfer["bytes_total"].as_u64().unwrap() > 0, "{record}");
    assert_eq!(
        transfer["bytes_transferred"], transfer["bytes_total"],
        "{record}"
    );
    // The four cookies as the source saw them, across the real gRPC hops.
    let cookies: Vec<&str> = record["cookies"]
        .as_array()
        .expect("cookies in the record")
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(cookies, ["C1", "C2", "C3", "C4"], "{record}");
    assert_eq!(
        record["cookies"][3]["summary"],
        "committed; finish port-profile ok; verify port-profile ok"
    );
    assert_eq!(
        cluster.guests_of("web-01"),
        vec![("hv-b".to_string(), "running".to_string())]
    );
    let on_b = cluster.feature_state("hv-b", "web-01");
    assert_eq!(on_b.len(), 1, "{on_b:?}");
    assert_eq!(on_b[0]["feature"], "port-profile");
    assert_eq!(on_b[0]["state"], "associated", "{on_b:?}");
    assert!(
        cluster.feature_state("hv-a", "web-01").is_empty(),
        "source kept its association"
    );
}

/// A failed migration is retried as a new attempt of the same migration,
/// first on the same host (still failing), then on another host.
#[test]
fn retry_on_the_same_host_and_then_another_host_are_new_attempts_of_one_migration() {
    let cluster = Cluster::start(vec![
        host("hv-a", format!("{}{}", port_profile(""), vm("web-01", 256))),
        host("hv-b", port_profile("fail = [\"finish\"]")),
        host("hv-c", port_profile("")),
    ]);
    let (code, first) = cluster.tern_json(&["migrate", "web-01", "--to", "hv-b", "--json"]);
    assert_eq!(code, 1, "{first}");
    let id = first["id"].as_str().unwrap();

    let (code, again) = cluster.tern_json(&["retry", id, "--json"]);
    assert_eq!(code, 1, "{again}");
    assert_eq!(again["id"], id);
    assert_eq!(again["attempt"], 2);
    assert_eq!(again["destination"], "hv-b");
    assert_eq!(again["running_on"], "hv-a");

    let (code, moved) = cluster.tern_json(&["retry", id, "--to", "hv-c", "--json"]);
    assert_eq!(code, 0, "{moved}");
    assert_eq!(moved["id"], id);
    assert_eq!(moved["attempt"], 3);
    assert_eq!(moved["destination"], "hv-c");
    assert_eq!(moved["outcome"], "succeeded");
    assert_eq!(cluster.running_on("web-01"), vec!["hv-c"]);
    assert!(cluster.feature_state("hv-b", "web-01").is_empty());
    assert!(cluster.feature_state("hv-a", "web-01").is_empty());

    // A migration that succeeded cannot be retried.
    let refused = cluster.tern(&["retry", id]);
    assert_eq!(refused.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("only a failed or aborted migration")
    );
}

/// `tern fault` changes a simulated driver's faults at run time: a drill
/// breaks the destination's switch, then repairs it.
#[test]
fn fault_command_breaks_and_repairs_a_switch_at_run_time() {
    let cluster = two_hosts("");
    let bad = cluster.tern(&["fault", "hv-b", "port-profile", "--fail", "bogus"]);
    assert_eq!(
        bad.status.code(),
        Some(64),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    assert!(String::from_utf8_lossy(&bad.stderr).contains("bogus"));
    let unknown = cluster.tern(&["fault", "hv-b", "vtpm", "--fail", "finish"]);
    assert_eq!(unknown.status.code(), Some(64));

    let broken = cluster.tern(&["fault", "hv-b", "port-profile", "--fail", "finish"]);
    assert_eq!(
        broken.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&broken.stderr)
    );
    let (code, failed) = cluster.tern_json(&["migrate", "web-01", "--to", "hv-b", "--json"]);
    assert_eq!(code, 1, "{failed}");

    let repaired = cluster.tern(&["fault", "hv-b", "port-profile"]);
    assert_eq!(repaired.status.code(), Some(0));
    let (code, moved) = cluster.tern_json(&["retry", failed["id"].as_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{moved}");
    assert_eq!(cluster.running_on("web-01"), vec!["hv-b"]);
}

/// Fault injection is a drill tool: an agent whose config does not allow it
/// refuses it, and its driver keeps its settings.
#[test]
fn an_agent_that_does_not_allow_fault_injection_refuses_it() {
    let cluster = Cluster::start(vec![
        host("hv-a", format!("{}{}", port_profile(""), vm("web-01", 256))),
        host("hv-b", port_profile("")),
    ]);
    let refused = cluster.tern(&["fault", "hv-a", "port-profile", "--fail", "finish"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(77), "{stderr}");
    assert!(
        stderr.contains(
            "fault injection is off on hv-a: its config must say allow_fault_injection = true"
        ),
        "{stderr}"
    );
    let faults = host_of(&cluster.status(), "hv-a")["faults"].clone();
    assert_eq!(
        faults[0]["fail"],
        serde_json::json!([]),
        "unchanged: {faults}"
    );
}

#[test]
fn a_destination_without_room_fails_the_migration_with_a_capacity_cause_on_that_host() {
    let cluster = Cluster::start(vec![
        host(
            "hv-a",
            format!("{}{}", port_profile(""), vm("web-01", 2048)),
        ),
        host(
            "hv-b",
            format!(
                "[hypervisor]\nkind = \"sim\"\nmemory_mib = 1024\n\n{}",
                port_profile("")
            ),
        ),
    ]);
    let (code, record) = cluster.tern_json(&[
        "migrate", "web-01", "--to", "hv-b", "--mode", "fast", "--json",
    ]);
    assert_eq!(code, 1, "{record}");
    assert_eq!(record["outcome"], "failed", "{record}");
    let cause = &record["cause"];
    assert_eq!(cause["kind"], "capacity", "{record}");
    assert_eq!(cause["side"], "destination", "{record}");
    assert_eq!(cause["host"], "hv-b", "{record}");
    assert!(cause.get("feature").is_none(), "{record}");
    assert!(
        cause["text"].as_str().unwrap_or_default().contains("MiB"),
        "{record}"
    );
    assert_eq!(cluster.running_on("web-01"), vec!["hv-a"]);
}
