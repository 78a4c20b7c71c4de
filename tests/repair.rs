//! `tern repair VM`: a fast migration that left a VM without its network
//! (degraded), repaired where the VM now runs once the cause is fixed; and
//! the move back of a moved VM to its source. Real agents, real gRPC, the
//! command line as an operator uses it.

mod common;

use common::*;
use serde_json::Value;

/// hv-a boots web-01 (port-profile required) and db-01 (no features);
/// hv-b's switch rejects ASSOCIATE until `tern fault` clears it.
fn cluster() -> Cluster {
    Cluster::start(vec![
        host(
            "hv-a",
            format!(
                "{}{}[[vm]]\nname = \"db-01\"\nmemory_mib = 128\nvcpus = 1\n\n",
                port_profile(""),
                vm("web-01", 256)
            ),
        ),
        host(
            "hv-b",
            format!(
                "allow_fault_injection = true\n{}",
                port_profile("fail = [\"finish\"]")
            ),
        ),
    ])
}

/// A fast migration of web-01 to hv-b, degraded by the failed ASSOCIATE.
fn degraded(cluster: &Cluster) -> Value {
    let (code, record) = cluster.tern_json(&[
        "migrate", "web-01", "--to", "hv-b", "--mode", "fast", "--json",
    ]);
    assert_eq!(code, 2, "{record}");
    assert_eq!(record["outcome"], "degraded", "{record}");
    assert_eq!(feature(&record, "port-profile")["finish"], "failed");
    record
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn association(cluster: &Cluster, host: &str, vm: &str) -> Option<String> {
    cluster
        .feature_state(host, vm)
        .first()
        .map(|s| s["state"].as_str().unwrap_or_default().to_string())
}

#[test]
fn repair_after_the_fault_is_cleared_re_runs_the_failed_finish_and_the_record_says_repaired() {
    let cluster = cluster();
    let moved = degraded(&cluster);
    let id = moved["id"].as_str().unwrap().to_string();
    assert_eq!(
        association(&cluster, "hv-b", "web-01").as_deref(),
        Some("preassociated"),
        "the failed ASSOCIATE left only the reservation"
    );

    // The switch accepts again.
    let out = cluster.tern(&["fault", "hv-b", "port-profile"]);
    assert!(out.status.success(), "{}", stderr(&out));

    let (code, record) = cluster.tern_json(&["repair", "web-01", "--json"]);
    assert_eq!(code, 0, "{record}");
    assert_eq!(record["id"], id.as_str());
    assert_eq!(record["outcome"], "succeeded", "{record}");
    assert!(record["error"].is_null(), "{record}");
    assert_eq!(feature(&record, "port-profile")["finish"], "ok");
    let repairs = record["repairs"].as_array().expect("a repair history");
    assert_eq!(repairs.len(), 1, "{record}");
    let entry = &repairs[0];
    assert_eq!(entry["feature"], "port-profile");
    assert_eq!(entry["stages"], serde_json::json!(["finish", "verify"]));
    assert_eq!(entry["host"], "hv-b");
    assert_eq!(entry["result"], "ok");
    assert!(entry["at_ms"].as_u64().unwrap() >= moved["updated_at_ms"].as_u64().unwrap());
    assert_eq!(entry["who"], "(plaintext)");

    // The switch holds the association now, where the VM runs.
    assert_eq!(
        association(&cluster, "hv-b", "web-01").as_deref(),
        Some("associated")
    );
    assert_eq!(cluster.running_on("web-01"), vec!["hv-b"]);
    // `tern status` shows the same record, and its text the repair line.
    let status = cluster.migration(&id);
    assert_eq!(status["outcome"], "succeeded");
    assert_eq!(status["repairs"][0]["result"], "ok");
    let text = String::from_utf8_lossy(&cluster.tern(&["status"]).stdout).into_owned();
    assert!(
        text.contains("web-01: repair port-profile finish+verify on hv-b: ok"),
        "{text}"
    );
    // A second repair has nothing to do: clear error, nothing changed.
    let out = cluster.tern(&["repair", "web-01"]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("not degraded"), "{}", stderr(&out));
    assert_eq!(
        cluster.migration(&id)["repairs"].as_array().unwrap().len(),
        1
    );
    // The audit trail names it.
    let trail =
        String::from_utf8_lossy(&cluster.tern(&["audit", "--host", "hv-a"]).stdout).into_owned();
    assert!(trail.contains("repair"), "{trail}");
}

#[test]
fn a_repair_that_fails_again_keeps_the_vm_degraded_and_exits_non_zero_with_the_drivers_reason() {
    let cluster = cluster();
    let moved = degraded(&cluster);
    let id = moved["id"].as_str().unwrap().to_string();
    // The fault is not cleared: the switch still rejects ASSOCIATE.
    let out = cluster.tern(&["repair", "web-01", "--feature", "port-profile", "--json"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("still degraded") && err.contains("ASSOCIATE"),
        "{err}"
    );
    let record = cluster.migration(&id);
    assert_eq!(record["outcome"], "degraded", "{record}");
    let entry = &record["repairs"][0];
    assert_eq!(entry["result"], "failed", "{record}");
    assert!(
        entry["error"]
            .as_str()
            .unwrap()
            .contains("ASSOCIATE web-01"),
        "{record}"
    );
    assert_eq!(feature(&record, "port-profile")["finish"], "failed");
    assert_eq!(
        association(&cluster, "hv-b", "web-01").as_deref(),
        Some("preassociated")
    );
    assert_eq!(cluster.running_on("web-01"), vec!["hv-b"]);

    // Fixed, then repaired: the history keeps both.
    assert!(
        cluster
            .tern(&["fault", "hv-b", "port-profile"])
            .status
            .success()
    );
    // As a person reads it: the record, its repair history last.
    let out = cluster.tern(&["repair", "web-01"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{}{text}", stderr(&out));
    assert!(text.contains("outcome:    succeeded"), "{text}");
    let history = text
        .split("  repairs:\n")
        .nth(1)
        .expect("a repairs section");
    let lines: Vec<&str> = history.lines().collect();
    assert!(
        lines[0].contains("port-profile finish on hv-b: failed — finish: ASSOCIATE web-01"),
        "{text}"
    );
    assert!(
        lines[1].ends_with("port-profile finish+verify on hv-b: ok · by (plaintext)"),
        "{text}"
    );
    let record = cluster.migration(&id);
    let results: Vec<&str> = record["repairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["result"].as_str().unwrap())
        .collect();
    assert_eq!(results, ["failed", "ok"]);
}

#[test]
fn bad_repairs_are_refused_clearly_and_change_nothing() {
    let cluster = cluster();
    // Never migrated, and unknown.
    let out = cluster.tern(&["repair", "db-01"]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("never been migrated"),
        "{}",
        stderr(&out)
    );
    let out = cluster.tern(&["repair", "no-such-vm"]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no VM no-such-vm in the cluster"),
        "{}",
        stderr(&out)
    );
    let out = cluster.tern(&["repair", "bad name!"]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));

    let moved = degraded(&cluster);
    let id = moved["id"].as_str().unwrap().to_string();
    let before = cluster.migration(&id);
    // An unknown feature.
    let out = cluster.tern(&["repair", "web-01", "--feature", "disk"]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("web-01 has no feature disk (it has: port-profile)"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        cluster.migration(&id),
        before,
        "a refused repair changed the record"
    );

    // A VM that is not degraded: db-01 moved cleanly.
    let (code, record) = cluster.tern_json(&["migrate", "db-01", "--to", "hv-b", "--json"]);
    assert_eq!(code, 0, "{record}");
    let out = cluster.tern(&["repair", "db-01"]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("ended succeeded, not degraded"),
        "{}",
        stderr(&out)
    );
    assert!(cluster.migration(record["id"].as_str().unwrap())["repairs"].is_null());
    assert_eq!(cluster.migration(&id), before);
}

#[test]
fn a_viewer_may_not_repair() {
    let cluster = Cluster::start_tls(vec![
        host("hv-a", format!("{}{}", port_profile(""), vm("web-01", 256))),
        host(
            "hv-b",
            format!(
                "allow_fault_injection = true\n{}",
                port_profile("fail = [\"finish\"]")
            ),
        ),
    ]);
    let tls = cluster.tls.as_ref().unwrap();
    let vera = tls.issue("vera", "viewer", &[]);
    let olga = tls.issue("olga", "operator", &[]);
    let (code, record) = cluster.tern_json(&[
        "migrate", "web-01", "--to", "hv-b", "--mode", "fast", "--json",
    ]);
    assert_eq!(code, 2, "{record}");
    let id = record["id"].as_str().unwrap().to_string();
    assert!(
        cluster
            .tern(&["fault", "hv-b", "port-profile"])
            .status
            .success()
    );
    let out = cluster.tern_as(Some(&vera), &["repair", "web-01"]);
    assert_eq!(out.status.code(), Some(77), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("vera is a viewer: this needs the operator role"),
        "{}",
        stderr(&out)
    );
    assert!(cluster.migration(&id)["repairs"].is_null());
    // An operator may; the history names who.
    let out = cluster.tern_as(Some(&olga), &["repair", "web-01", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let record = cluster.migration(&id);
    assert_eq!(record["repairs"][0]["who"], "olga (operator)");
    assert_eq!(record["outcome"], "succeeded");
}

#[test]
fn a_degraded_vm_moves_back_to_its_source_with_migrate_to_source() {
    let mut cluster = cluster();
    let moved = degraded(&cluster);
    let id = moved["id"].as_str().unwrap().to_string();
    // Moving back is a migration to where it came from; hv-a's switch accepts.
    let (code, back) = cluster.tern_json(&[
        "migrate", "web-01", "--to", "hv-a", "--mode", "safe", "--json",
    ]);
    assert_eq!(code, 0, "{back}");
    assert_eq!(back["source"], "hv-b");
    assert_eq!(back["destination"], "hv-a");
    assert_eq!(back["outcome"], "succeeded");
    assert_eq!(cluster.running_on("web-01"), vec!["hv-a"]);
    assert_eq!(
        association(&cluster, "hv-a", "web-01").as_deref(),
        Some("associated")
    );
    assert!(
        cluster.feature_state("hv-b", "web-01").is_empty(),
        "hv-b kept the reservation after the VM left"
    );
    // The old degraded record is not the VM's latest any more: a repair
    // goes to the newest record, which is not degraded.
    let out = cluster.tern(&["repair", "web-01"]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(stderr(&out).contains("not degraded"), "{}", stderr(&out));

    // With hv-b (which holds the newer record) down, hv-a's degraded record
    // looks like the latest; it is not repaired where the VM no longer runs.
    let before = cluster.migration(&id);
    cluster.kill("hv-b");
    let out = cluster.tern(&["repair", "web-01"]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("web-01 runs on hv-a, not on hv-b"),
        "{}",
        stderr(&out)
    );
    assert_eq!(cluster.migration(&id), before, "nothing changed");
}

#[test]
fn a_repair_while_the_vms_host_is_unreachable_exits_69_and_changes_nothing() {
    let mut cluster = cluster();
    let moved = degraded(&cluster);
    let id = moved["id"].as_str().unwrap().to_string();
    let before = cluster.migration(&id);
    cluster.kill("hv-b");
    let out = cluster.tern(&["repair", "web-01"]);
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot tell where web-01 runs now") && stderr(&out).contains("hv-b"),
        "{}",
        stderr(&out)
    );
    assert_eq!(cluster.migration(&id), before, "nothing changed");
}

#[test]
fn a_repair_cut_short_by_the_record_owners_crash_reads_interrupted_and_can_be_run_again() {
    let mut cluster = cluster();
    let moved = degraded(&cluster);
    let id = moved["id"].as_str().unwrap().to_string();
    // The switch accepts again, slowly: the repair's ASSOCIATE takes 3 s.
    let out = cluster.tern(&["fault", "hv-b", "port-profile", "--latency-ms", "3000"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut repair = std::process::Command::new(TERN)
        .args(["repair", "web-01"])
        .env("TERN_INVENTORY", &cluster.inventory)
        .env_remove("TERN_IDENTITY")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The intent is journaled before hv-b runs the stage.
    wait_until(
        std::time::Duration::from_secs(10),
        "the repair to be journaled as running",
        || cluster.migration(&id)["repairs"][0]["result"] == "running",
    );
    cluster.kill("hv-a");
    cluster.start_agent("hv-a");
    let code = repair.wait().unwrap().code();
    assert_ne!(code, Some(0), "the repair's caller lost its answer");
    let record = cluster.migration(&id);
    assert_eq!(record["repairs"][0]["result"], "interrupted", "{record}");
    assert!(
        record["repairs"][0]["error"]
            .as_str()
            .unwrap()
            .contains("repair again"),
        "{record}"
    );
    assert_eq!(record["outcome"], "degraded", "{record}");
    // hv-b's stage ran on after hv-a died: the switch has it, the record
    // cannot know. Run again once hv-b is done (stages are idempotent).
    wait_until(
        std::time::Duration::from_secs(10),
        "hv-b's ASSOCIATE to land",
        || association(&cluster, "hv-b", "web-01").as_deref() == Some("associated"),
    );
    // Then its check of the association (as slow) ends the repair there.
    wait_until(
        std::time::Duration::from_secs(10),
        "hv-b to end the repair it ran",
        || cluster.log("hv-b").contains("repaired web-01 here"),
    );
    let out = cluster.tern(&["fault", "hv-b", "port-profile"]);
    assert!(out.status.success());
    let (code, record) = cluster.tern_json(&["repair", "web-01", "--json"]);
    assert_eq!(code, 0, "{record}");
    let results: Vec<&str> = record["repairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["result"].as_str().unwrap())
        .collect();
    assert_eq!(results, ["interrupted", "ok"]);
    assert_eq!(
        association(&cluster, "hv-b", "web-01").as_deref(),
        Some("associated")
    );
}

/// An evacuation that moved a VM degraded stops counting it degraded once
/// `tern repair` made it whole (it said "1 degraded" for ever before).
#[test]
fn a_repaired_vm_is_no_longer_counted_degraded_by_its_evacuation() {
    let cluster = cluster();
    let out = cluster.tern(&["evacuate", "hv-a", "--mode", "fast", "--json"]);
    let evacuation = |cluster: &Cluster| -> Value {
        cluster.status()["evacuations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["host"] == "hv-a")
            .cloned()
            .unwrap_or_else(|| panic!("no evacuation of hv-a: {}", stderr(&out)))
    };
    let web = |job: &Value| -> Value {
        job["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "web-01")
            .cloned()
            .unwrap_or_else(|| panic!("web-01 is not in {job}"))
    };
    let job = evacuation(&cluster);
    assert_eq!(web(&job)["degraded"], true, "{job}");
    assert_eq!(cluster.running_on("web-01"), vec!["hv-b"]);

    let out = cluster.tern(&["fault", "hv-b", "port-profile"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (code, record) = cluster.tern_json(&["repair", "web-01", "--json"]);
    assert_eq!(
        (code, &record["outcome"]),
        (0, &Value::from("succeeded")),
        "{record}"
    );
    let job = evacuation(&cluster);
    assert_eq!(web(&job)["degraded"], false, "{job}");
    // The text says so too: nothing degraded left in its line.
    let text = String::from_utf8_lossy(&cluster.tern(&["status"]).stdout).into_owned();
    assert!(!text.contains("1 degraded"), "{text}");
}
