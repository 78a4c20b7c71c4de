//! An operator's forced decision that turns out wrong is noticed.
//!
//! The source sent Finish, the destination committed, and its answer never
//! came back (the link between the agents broke), so the source is left
//! unresolved with its guest paused. While the destination's agent is down,
//! the operator forces the guest back to the source. The source
//! keeps telling the destination, and when it can finally answer, it says
//! it had committed: the source kills its own, stale, copy at once and the
//! record says, in red, what happened and what to check.
//!
//! Before, the destination's "has committed" answer was ignored and the VM
//! ran on both hosts with no alarm.

mod common;
#[path = "common/proxy.rs"]
mod proxy;

use std::time::Duration;

use common::*;
use proxy::{Mode, Proxy};

/// hv-a and hv-b with each one's calls to the other through `proxy`
/// (links "hv-a->hv-b" and "hv-b->hv-a"); the CLI reaches both directly.
/// The destination's finish stage is slow, so the link can break while it
/// runs; failed notifications are retried every 300 ms.
fn cluster(proxy: &mut Proxy) -> Cluster {
    let hosts = [
        (
            "hv-a",
            format!("{}{}{}", link(1024), port_profile(""), vm("web-01", 256)),
        ),
        (
            "hv-b",
            format!("{}{}", link(1024), port_profile("latency_ms = 1500")),
        ),
    ];
    proxy::cluster_behind(
        proxy,
        &hosts,
        "heartbeat_interval_ms = 200\npeer_timeout_ms = 1500\nrollback_retry_ms = 300\n",
    )
}

#[test]
fn a_wrong_forced_run_on_source_is_noticed_and_the_stale_copy_killed() {
    let mut proxy = Proxy::new();
    let mut cluster = cluster(&mut proxy);
    wait_until(Duration::from_secs(10), "both agents to answer", || {
        cluster.tern(&["status", "--json"]).status.code() == Some(0)
    });
    let id = cluster.start_migration("web-01", "hv-b", "safe");
    cluster.wait_phase(&id, "finish");
    // Finish reached hv-b, which commits; its answer never comes back.
    proxy.set_all(Mode::Refuse);
    proxy.cut_all();
    wait_until(
        Duration::from_secs(15),
        "the source to be unresolved",
        || cluster.migration(&id)["outcome"] == "unresolved",
    );
    wait_until(Duration::from_secs(15), "hv-b to run the guest", || {
        cluster.running_on("web-01") == ["hv-b"]
    });

    // hv-b's agent dies (its guest keeps running: it outlives its agent,
    // as QEMU does). The operator cannot reach it either, and forces the
    // guest back to the source.
    cluster.kill("hv-b");
    let out = cluster.tern(&["resolve", &id, "--run-on", "source", "--yes"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "the forced decision is taken: {stderr}\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr.contains("keeps telling hv-b"),
        "the warning says the destination will be told: {stderr}"
    );
    let hv_a = host_of(&cluster.status(), "hv-a").clone();
    assert!(
        hv_a["pending_rollbacks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["stage"] == "notify" && p["feature"] == "hv-b"),
        "telling hv-b is listed as pending work on hv-a: {hv_a}"
    );

    // hv-b's agent comes back and the link heals; the operator does not
    // wait for the next retry. hv-b says it had committed.
    proxy.set_all(Mode::Pass);
    cluster.start_agent("hv-b");
    wait_until(Duration::from_secs(10), "hv-b to answer again", || {
        host_of(&cluster.status(), "hv-b")["connected"] == true
    });
    let out = cluster.tern(&["rollback", &id]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("done: telling hv-b that web-01 runs here"),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut record = serde_json::Value::Null;
    wait_until(
        Duration::from_secs(20),
        "the source to notice the wrong decision",
        || {
            record = cluster.migration(&id);
            record["error"]
                .as_str()
                .is_some_and(|e| e.contains("WRONG FORCED DECISION"))
                && !record["outcome"].is_null()
        },
    );
    assert_eq!(record["running_on"], "hv-b", "{record}");
    assert_eq!(record["committed"], true, "{record}");
    assert_eq!(record["outcome"], "degraded", "never succeeded: {record}");
    let error = record["error"].as_str().unwrap();
    assert!(
        error.contains("ran on both hv-a and hv-b") && error.contains("Check the guest's disks"),
        "the record says what happened and what to check: {error}"
    );
    wait_until(
        Duration::from_secs(10),
        "the stale copy to be gone from hv-a",
        || cluster.guests_of("web-01") == [("hv-b".to_string(), "running".to_string())],
    );
    wait_until(
        Duration::from_secs(10),
        "the notification to be done",
        || cluster.pending_rollbacks("hv-a").is_empty(),
    );
    assert!(
        cluster.log("hv-a").contains("WRONG FORCED DECISION"),
        "hv-a's log says it at error level"
    );
}
