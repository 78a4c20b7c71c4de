//! `tern doctor` against real agents: a healthy pair, a host whose agent
//! is down, and a QEMU host whose QEMU is missing — each with its findings
//! and the exit code (0: nothing is an error; 1: something is).

mod common;

use common::{Cluster, host, link, port_profile};
use serde_json::Value;

/// The findings of `tern doctor --json ARGS`, and the exit code.
fn doctor(cluster: &Cluster, args: &[&str]) -> (i32, Vec<Value>) {
    let mut all = vec!["doctor", "--json"];
    all.extend_from_slice(args);
    let out = cluster.tern(&all);
    let findings: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor --json: {e}\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (
        out.status.code().unwrap_or(-1),
        findings.as_array().unwrap().clone(),
    )
}

fn finding<'a>(findings: &'a [Value], host: &str, check: &str) -> &'a Value {
    findings
        .iter()
        .find(|f| f["host"] == host && f["check"] == check)
        .unwrap_or_else(|| panic!("no {check} finding for {host}: {findings:?}"))
}

#[test]
fn a_healthy_pair_passes_and_a_host_whose_agent_is_down_is_an_error() {
    let mut cluster = Cluster::start(vec![
        host(
            "hv-a",
            link(1024) + &common::vm("web-01", 1024) + &port_profile(""),
        ),
        host("hv-b", link(1024) + &port_profile("")),
    ]);
    cluster.wait_connected();
    let (code, findings) = doctor(&cluster, &[]);
    assert_eq!(code, 0, "{findings:?}");
    for h in ["hv-a", "hv-b"] {
        for check in [
            "reachable",
            "clock",
            "hypervisor",
            "journal",
            "certificate",
            "pending",
            "peers",
        ] {
            assert_eq!(
                finding(&findings, h, check)["verdict"],
                "ok",
                "{h} {check}: {findings:?}"
            );
        }
        // The disk is whatever this machine has: never unchecked.
        assert_ne!(finding(&findings, h, "disk")["verdict"], "", "{findings:?}");
    }
    assert!(
        finding(&findings, "hv-a", "clock")["detail"]
            .as_str()
            .unwrap()
            .starts_with("its clock is "),
        "{findings:?}"
    );

    // Only the hosts asked for.
    let (code, findings) = doctor(&cluster, &["hv-b"]);
    assert_eq!(code, 0);
    assert!(findings.iter().all(|f| f["host"] == "hv-b"), "{findings:?}");
    let out = cluster.tern(&["doctor", "hv-z"]);
    assert_eq!(
        out.status.code(),
        Some(64),
        "an unknown host is a usage error"
    );

    cluster.kill("hv-b");
    let (code, findings) = doctor(&cluster, &[]);
    assert_eq!(code, 1, "{findings:?}");
    let down = finding(&findings, "hv-b", "reachable");
    assert_eq!(down["verdict"], "error", "{findings:?}");
    assert!(down["detail"].as_str().unwrap().contains("hv-b"), "{down}");
    assert!(
        down["fix"].as_str().unwrap().contains("start its agent"),
        "{down}"
    );
    // hv-a is examined all the same, and cannot reach hv-b either.
    assert_eq!(finding(&findings, "hv-a", "journal")["verdict"], "ok");
    let peers = finding(&findings, "hv-a", "peers");
    assert_eq!(peers["verdict"], "error", "{peers}");
    assert!(
        peers["detail"]
            .as_str()
            .unwrap()
            .starts_with("cannot reach hv-b: "),
        "{peers}"
    );
    // And the text says it too.
    let out = cluster.tern(&["doctor"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("error    reachable"), "{text}");
    assert!(text.contains("fix: start its agent"), "{text}");
}

#[test]
fn a_qemu_host_without_its_qemu_is_an_error_naming_the_binary() {
    let cluster = Cluster::start(vec![host(
        "qa",
        "[hypervisor]\nkind = \"qemu\"\nbinary = \"/nonexistent/qemu-system-x86_64\"\naccel = \"tcg\"\n",
    )]);
    cluster.wait_connected();
    let (code, findings) = doctor(&cluster, &[]);
    assert_eq!(code, 1, "{findings:?}");
    let qemu = finding(&findings, "qa", "qemu");
    assert_eq!(qemu["verdict"], "error", "{qemu}");
    assert!(
        qemu["detail"]
            .as_str()
            .unwrap()
            .contains("cannot run /nonexistent/qemu-system-x86_64"),
        "{qemu}"
    );
    assert!(
        qemu["fix"]
            .as_str()
            .unwrap()
            .contains("apt-get install -y qemu-system-x86")
    );
    // KVM is not needed with accel = "tcg"; the other checks still run.
    assert_eq!(
        finding(&findings, "qa", "kvm")["verdict"],
        "ok",
        "{findings:?}"
    );
    assert_eq!(finding(&findings, "qa", "journal")["verdict"], "ok");
}
