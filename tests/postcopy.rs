//! The completion policy and post-copy through real agents on the simulated
//! hypervisor: a guest that dirties memory faster than the link carries it
//! never converges by pre-copy; `auto` switches it to post-copy and it
//! lands on the destination, `never` with a budget gives up and leaves it
//! running on the source, and a blocking finish failure before the
//! switchover resumes the source.

mod common;

use std::time::Duration;

use common::*;

/// A VM of `memory_mib` dirtying 400 MiB/s, with a required port-profile.
fn busy_vm(name: &str, memory_mib: u64) -> String {
    format!(
        "[[vm]]\nname = \"{name}\"\nmemory_mib = {memory_mib}\nvcpus = 2\ndirty_rate_mib_s = 400\nfeatures = [{{ name = \"port-profile\", required = true }}]\n\n"
    )
}

/// hv-a holds a busy guest behind a 200 MiB/s link; hv-b's switch takes
/// `destination_port_profile`.
fn busy_pair(memory_mib: u64, destination_port_profile: &str) -> Cluster {
    Cluster::start(vec![
        host(
            "hv-a",
            format!(
                "{}{}{}",
                link(200),
                port_profile(""),
                busy_vm("db-01", memory_mib)
            ),
        ),
        host(
            "hv-b",
            format!("{}{}", link(200), port_profile(destination_port_profile)),
        ),
    ])
}

#[test]
fn auto_switches_a_guest_that_cannot_converge_and_it_runs_on_the_destination() {
    let cluster = busy_pair(512, "");
    let (code, record) = cluster.tern_json(&[
        "migrate", "db-01", "--to", "hv-b", "--mode", "fast", "--json",
    ]);
    assert_eq!(code, 0, "{record}");
    assert_eq!(record["outcome"], "succeeded", "{record}");
    assert_eq!(record["running_on"], "hv-b");
    assert_eq!(record["completion"]["postcopy"], "auto", "{record}");
    let note = record["completion_note"].as_str().unwrap_or_default();
    assert!(
        note.contains("post-copy after") && note.contains("cannot converge"),
        "{record}"
    );
    assert_eq!(record["transfer"]["stage"], "postcopy", "{record}");
    assert_eq!(
        record["convergence"]["verdict"], "not_converging",
        "{record}"
    );
    assert_eq!(
        cluster.guests_of("db-01"),
        vec![("hv-b".to_string(), "running".to_string())]
    );
    // The port moved with it: associated on hv-b, released on hv-a.
    assert!(cluster.feature_state("hv-a", "db-01").is_empty());
    assert!(!cluster.feature_state("hv-b", "db-01").is_empty());
}

#[test]
fn never_with_a_spent_budget_aborts_and_the_guest_keeps_running_on_the_source() {
    let cluster = busy_pair(512, "");
    // 4 s per GiB of 512 MiB: a 2 s budget.
    let (code, record) = cluster.tern_json(&[
        "migrate",
        "db-01",
        "--to",
        "hv-b",
        "--mode",
        "safe",
        "--postcopy",
        "never",
        "--completion-timeout-per-gib",
        "4",
        "--json",
    ]);
    assert_eq!(code, 1, "{record}");
    assert_eq!(record["outcome"], "failed", "{record}");
    assert_eq!(record["cause"]["kind"], "stall", "{record}");
    let error = record["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("budget of 2 s") && error.contains("not converging"),
        "the error names the budget and why: {error}"
    );
    assert_eq!(record["running_on"], "hv-a");
    wait_until(
        Duration::from_secs(10),
        "hv-b to drop its incoming guest",
        || cluster.guests_of("db-01").iter().all(|(h, _)| h != "hv-b"),
    );
    assert_eq!(
        cluster.guests_of("db-01"),
        vec![("hv-a".to_string(), "running".to_string())]
    );
}

#[test]
fn a_safe_mode_finish_failure_before_the_switchover_resumes_the_source() {
    let cluster = busy_pair(512, "fail = [\"finish\"]");
    let (code, record) = cluster.tern_json(&[
        "migrate",
        "db-01",
        "--to",
        "hv-b",
        "--mode",
        "safe",
        "--postcopy",
        "now",
        "--json",
    ]);
    assert_eq!(code, 1, "{record}");
    assert_eq!(record["outcome"], "failed", "{record}");
    assert_eq!(record["cause"]["kind"], "feature", "{record}");
    // The structured cause: where, which feature, which stage.
    assert_eq!(record["cause"]["side"], "destination", "{record}");
    assert_eq!(record["cause"]["host"], "hv-b", "{record}");
    assert_eq!(record["cause"]["feature"], "port-profile", "{record}");
    assert_eq!(record["cause"]["stage"], "finish", "{record}");
    assert_eq!(record["cause"]["text"], record["error"], "{record}");
    assert_eq!(record["running_on"], "hv-a");
    let pp = feature(&record, "port-profile");
    assert_eq!(pp["finish"], "failed", "{record}");
    assert_eq!(pp["rollback"], "ok", "{record}");
    assert_ne!(
        record["transfer"]["stage"], "postcopy",
        "never switched: {record}"
    );
    wait_until(
        Duration::from_secs(10),
        "the guest to run on hv-a only",
        || cluster.guests_of("db-01") == vec![("hv-a".to_string(), "running".to_string())],
    );
}

#[test]
fn abort_is_refused_once_the_guest_switched_to_the_destination() {
    // 2 GiB at 200 MiB/s: the pages take about ten seconds to follow.
    let cluster = busy_pair(2048, "");
    let (code, started) = cluster.tern_json(&[
        "migrate",
        "db-01",
        "--to",
        "hv-b",
        "--mode",
        "fast",
        "--postcopy",
        "now",
        "--no-wait",
        "--json",
    ]);
    assert_eq!(code, 0, "{started}");
    let id = started["id"].as_str().unwrap().to_string();
    wait_until(Duration::from_secs(20), "the switchover", || {
        cluster.migration(&id)["transfer"]["stage"] == "postcopy"
    });
    let out = cluster.tern(&["abort", &id]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "an abort after the switchover: {stderr}"
    );
    assert!(
        stderr.contains("post-copy"),
        "the refusal says why: {stderr}"
    );
    let record = cluster.wait_outcome(&id);
    assert_eq!(record["outcome"], "succeeded", "{record}");
    assert_eq!(
        cluster.guests_of("db-01"),
        vec![("hv-b".to_string(), "running".to_string())]
    );
}
