//! Mode × feature-failure outcomes, through real agents and the CLI's JSON.

mod common;

use common::*;

fn two_hosts(destination_port_profile: &str) -> Cluster {
    Cluster::start(vec![
        host("hv-a", format!("{}{}", port_profile(""), vm("web-01", 256))),
        host("hv-b", port_profile(destination_port_profile)),
    ])
}

#[test]
fn safe_mode_resumes_source_when_associate_fails_in_finish() {
    let cluster = two_hosts("fail = [\"finish\"]");
    let (code, record) = cluster.tern_json(&["migrate", "web-01", "--to", "hv-b", "--mode", "safe", "--json"]);
    assert_eq!(code, 1, "{record}");
    assert_eq!(record["outcome"], "failed");
    assert_eq!(record["running_on"], "hv-a");
    assert_eq!(phase(&record, "finish")["status"], "failed");
    let pp = feature(&record, "port-profile");
    assert_eq!(pp["prepare"], "ok");
    assert_eq!(pp["finish"], "failed");
    assert_eq!(pp["rollback"], "ok");
    assert!(record["error"].as_str().unwrap().contains("ASSOCIATE"), "{record}");
    assert_eq!(cluster.running_on("web-01"), vec!["hv-a"]);
    assert!(cluster.feature_state("hv-b", "web-01").is_empty(), "association left on hv-b");
    assert_eq!(cluster.guests_of("web-01"), vec![("hv-a".to_string(), "running".to_string())]);
}

#[test]
fn fast_mode_moves_vm_despite_failed_associate_and_reports_degraded() {
    let cluster = two_hosts("fail = [\"finish\"]");
    let (code, record) = cluster.tern_json(&["migrate", "web-01", "--to", "hv-b", "--mode", "fast", "--json"]);
    assert_eq!(code, 2, "{record}");
    assert_eq!(record["outcome"], "degraded");
    assert_eq!(record["running_on"], "hv-b");
    assert_eq!(feature(&record, "port-profile")["finish"], "failed");
    assert_eq!(cluster.running_on("web-01"), vec!["hv-b"]);
    assert!(cluster.feature_state("hv-a", "web-01").is_empty(), "source kept its association after release");
}
