//! Operator aborts: before the commit point they put everything back on the
//! source; at or after it they are refused with a message saying why.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn vm_tuple(host: &str, state: &str) -> (String, String) {
    (host.to_string(), state.to_string())
}

/// `tern abort ID`: exit code, stdout, stderr.
fn abort(cluster: &Cluster, id: &str) -> (i32, String, String) {
    let out = cluster.tern(&["abort", id]);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// After an abort before the commit point: the VM runs on the source only,
/// the destination holds nothing of it, and the source keeps its association.
fn assert_put_back_on_source(cluster: &Cluster) {
    wait_until(
        Duration::from_secs(10),
        "hv-b to drop every guest of web-01",
        || cluster.guests_of("web-01").iter().all(|(h, _)| h != "hv-b"),
    );
    wait_until(
        Duration::from_secs(10),
        "hv-b to drop its feature state for web-01",
        || cluster.feature_state("hv-b", "web-01").is_empty(),
    );
    assert_eq!(
        cluster.guests_of("web-01"),
        vec![vm_tuple("hv-a", "running")]
    );
    assert_eq!(cluster.running_on("web-01"), vec!["hv-a"]);
    let on_a = cluster.feature_state("hv-a", "web-01");
    assert_eq!(on_a.len(), 1, "source lost its association: {on_a:?}");
    assert_eq!(on_a[0]["state"], "associated", "{on_a:?}");
    assert!(
        cluster.pending_rollbacks("hv-b").is_empty(),
        "{:?}",
        cluster.pending_rollbacks("hv-b")
    );
}

#[test]
fn abort_during_prepare_ends_aborted_before_any_transfer() {
    let cluster = Cluster::start(vec![
        host("hv-a", format!("{}{}", port_profile(""), vm("web-01", 256))),
        host("hv-b", port_profile("latency_ms = 3000")),
    ]);
    let id = cluster.start_migration("web-01", "hv-b", "safe");
    let started = Instant::now();
    let (code, stdout, stderr) = abort(&cluster, &id);
    assert_eq!(code, 0, "abort refused\nstdout: {stdout}\nstderr: {stderr}");
    // Prepare alone lasts 3 s here: the abort must not have waited for it
    // to run through Perform and Finish.
    let record = cluster.wait_outcome(&id);
    assert_eq!(record["outcome"], "aborted", "{record}");
    assert_eq!(record["running_on"], "hv-a", "{record}");
    let perform = phase(&record, "perform")["status"].clone();
    assert!(
        perform == "skipped" || perform == "pending",
        "abort landed after Prepare: {record}"
    );
    assert_ne!(phase(&record, "finish")["status"], "ok", "{record}");
    assert_eq!(
        record["transfer"]["bytes_transferred"]
            .as_u64()
            .unwrap_or(0),
        0,
        "{record}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "abort took {:?}",
        started.elapsed()
    );
    assert_put_back_on_source(&cluster);
}

#[test]
fn abort_during_perform_cancels_transfer_and_resumes_on_source() {
    let cluster = Cluster::start(vec![
        host(
            "hv-a",
            format!("{}{}{}", port_profile(""), link(256), vm("web-01", 4096)),
        ),
        host("hv-b", format!("{}{}", port_profile(""), link(256))),
    ]);
    let id = cluster.start_migration("web-01", "hv-b", "safe");
    cluster.wait_phase(&id, "perform");
    // While the transfer runs, the destination holds a paused/incoming guest.
    assert!(
        cluster.guests_of("web-01").iter().any(|(h, _)| h == "hv-b"),
        "{:?}",
        cluster.guests_of("web-01")
    );
    let (code, stdout, stderr) = abort(&cluster, &id);
    assert_eq!(code, 0, "abort refused\nstdout: {stdout}\nstderr: {stderr}");
    let record = cluster.wait_outcome(&id);
    assert_eq!(record["outcome"], "aborted", "{record}");
    assert_eq!(record["running_on"], "hv-a", "{record}");
    assert_eq!(phase(&record, "prepare")["status"], "ok", "{record}");
    assert_ne!(phase(&record, "perform")["status"], "ok", "{record}");
    assert_ne!(phase(&record, "finish")["status"], "ok", "{record}");
    let transfer = &record["transfer"];
    if !transfer.is_null() {
        assert!(
            transfer["bytes_transferred"].as_u64().unwrap()
                < transfer["bytes_total"].as_u64().unwrap(),
            "the transfer completed although it was aborted: {record}"
        );
    }
    assert_put_back_on_source(&cluster);
}

#[test]
fn aborted_attempt_record_shows_the_destination_rollback_and_no_pending_stages() {
    let cluster = Cluster::start(vec![
        host(
            "hv-a",
            format!("{}{}{}", port_profile(""), link(256), vm("web-01", 4096)),
        ),
        host("hv-b", format!("{}{}", port_profile(""), link(256))),
    ]);
    let id = cluster.start_migration("web-01", "hv-b", "safe");
    cluster.wait_phase(&id, "perform");
    let (code, _, stderr) = abort(&cluster, &id);
    assert_eq!(code, 0, "{stderr}");
    cluster.wait_outcome(&id);
    assert_put_back_on_source(&cluster);
    // Settled: the destination rolled the prepared port profile back.
    let record = cluster.migration(&id);
    // The operator aborted it, on the source's agent.
    assert_eq!(record["cause"]["kind"], "operator", "{record}");
    assert_eq!(record["cause"]["side"], "source", "{record}");
    assert_eq!(record["cause"]["host"], "hv-a", "{record}");
    assert_eq!(record["cause"]["text"], record["error"], "{record}");
    let pp = feature(&record, "port-profile");
    assert_eq!(pp["prepare"], "ok", "{record}");
    assert_eq!(
        pp["rollback"], "ok",
        "the destination's rollback is not reflected: {record}"
    );
    for stage in ["finish", "release"] {
        assert_ne!(
            pp[stage], "pending",
            "stage {stage} of an ended attempt is still pending: {record}"
        );
    }
}

#[test]
fn abort_after_migration_succeeded_is_refused_as_already_ended() {
    let cluster = Cluster::start(vec![
        host("hv-a", format!("{}{}", port_profile(""), vm("web-01", 256))),
        host("hv-b", port_profile("")),
    ]);
    let (code, record) = cluster.tern_json(&["migrate", "web-01", "--to", "hv-b", "--json"]);
    assert_eq!(code, 0, "{record}");
    let id = record["id"].as_str().unwrap().to_string();
    let status_before = cluster.status();
    let (code, stdout, stderr) = abort(&cluster, &id);
    assert_eq!(
        code, 64,
        "abort after success was not refused\nstdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stderr.contains("already ended"), "stderr: {stderr}");
    assert!(
        stderr.contains("succeeded"),
        "stderr should say how it ended: {stderr}"
    );
    let status_after = cluster.status();
    assert_eq!(status_before["vms"], status_after["vms"]);
    assert_eq!(status_before["migrations"], status_after["migrations"]);
    assert_eq!(cluster.migration(&id)["outcome"], "succeeded");
    assert_eq!(
        cluster.guests_of("web-01"),
        vec![vm_tuple("hv-b", "running")]
    );
}

#[test]
fn abort_once_finish_was_sent_is_refused_and_the_migration_completes() {
    let cluster = Cluster::start(vec![
        host("hv-a", format!("{}{}", port_profile(""), vm("web-01", 64))),
        host("hv-b", port_profile("latency_ms = 3000")),
    ]);
    let id = cluster.start_migration("web-01", "hv-b", "safe");
    cluster.wait_phase(&id, "finish");
    let (code, stdout, stderr) = abort(&cluster, &id);
    assert_eq!(
        code, 64,
        "abort after Finish was sent was not refused\nstdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stderr.contains("commit point"), "stderr: {stderr}");
    assert!(stderr.contains("Migrate the VM back"), "stderr: {stderr}");
    let record = cluster.wait_outcome(&id);
    assert_eq!(record["outcome"], "succeeded", "{record}");
    assert_eq!(record["running_on"], "hv-b", "{record}");
    assert_eq!(
        cluster.guests_of("web-01"),
        vec![vm_tuple("hv-b", "running")]
    );
    assert!(
        cluster.feature_state("hv-a", "web-01").is_empty(),
        "source kept its association"
    );
    let on_b = cluster.feature_state("hv-b", "web-01");
    assert_eq!(on_b.len(), 1, "{on_b:?}");
    assert_eq!(on_b[0]["state"], "associated", "{on_b:?}");
}
