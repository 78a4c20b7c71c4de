//! `tern doctor` against real agents: a healthy pair, a host whose agent
//! is down, an expired certificate, a QEMU host whose QEMU is missing, and
//! the migration link measured between two hosts — each with its findings
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
    // Links are measured between hosts named only, not across the inventory.
    assert!(
        findings
            .iter()
            .all(|f| !f["check"].as_str().unwrap().starts_with("link to ")),
        "{findings:?}"
    );
    assert!(
        finding(&findings, "hv-a", "clock")["detail"]
            .as_str()
            .unwrap()
            .starts_with("its clock is "),
        "{findings:?}"
    );

    // Piped into a reader that has gone (`| head`): it ends quietly, with
    // the shell's code for a closed pipe, instead of a panic's backtrace.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = std::process::Command::new(common::TERN)
        .args(["doctor", "--json"])
        .env("TERN_INVENTORY", &cluster.inventory)
        .stdout(writer)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(141), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");

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

/// Between the hosts named, each agent sends to the other's migration
/// address for a bounded time and the finding holds the throughput against
/// the host's bandwidth cap: one no link misses (1 MiB/s) is ok, one no
/// loopback reaches (1 TiB/s) a warning naming the cap to set; a host whose
/// sink is not where the inventory says is an error naming the address.
#[test]
fn the_link_between_two_named_hosts_is_measured_and_held_to_the_cap() {
    let cluster = Cluster::start(vec![
        host("hv-a", link(1)),
        host("hv-b", link(1 << 20)),
        // Its incoming migrations listen on 127.0.0.2, and the inventory
        // (which lists 127.0.0.1) says nothing of it.
        host(
            "hv-c",
            "[hypervisor]\nkind = \"sim\"\nmigration_address = \"127.0.0.2\"\n".to_string(),
        ),
    ]);
    cluster.wait_connected();
    let (code, findings) = doctor(&cluster, &["hv-a", "hv-b", "--link-seconds", "1"]);
    assert_eq!(code, 0, "{findings:?}");
    let a_to_b = finding(&findings, "hv-a", "link to hv-b");
    assert_eq!(a_to_b["verdict"], "ok", "{a_to_b}");
    let mib_s = a_to_b["mib_s"].as_f64().expect("a throughput");
    assert!(mib_s > 1.0, "{a_to_b}");
    let detail = a_to_b["detail"].as_str().unwrap();
    assert!(
        detail.contains(" MiB/s (") && detail.contains(" s to 127.0.0.1:"),
        "{detail}"
    );
    assert!(
        detail.ends_with("bandwidth_mib_s = 1 uses 0% of it"),
        "{detail}"
    );
    let b_to_a = finding(&findings, "hv-b", "link to hv-a");
    assert_eq!(b_to_a["verdict"], "warning", "{b_to_a}");
    assert!(
        b_to_a["detail"]
            .as_str()
            .unwrap()
            .contains("less than bandwidth_mib_s = 1048576"),
        "{b_to_a}"
    );
    assert!(
        b_to_a["fix"]
            .as_str()
            .unwrap()
            .starts_with("set [hypervisor] bandwidth_mib_s = "),
        "{b_to_a}"
    );
    // Both measured (one pair at a time), nothing between a host and itself.
    let links: Vec<_> = findings
        .iter()
        .filter(|f| f["check"].as_str().unwrap().starts_with("link to "))
        .collect();
    assert_eq!(links.len(), 2, "{links:?}");

    // A single host measures nothing.
    let (_, findings) = doctor(&cluster, &["hv-a"]);
    assert!(
        findings
            .iter()
            .all(|f| !f["check"].as_str().unwrap().starts_with("link to ")),
        "{findings:?}"
    );

    // hv-c's sink listens where the inventory does not send.
    let (code, findings) = doctor(&cluster, &["hv-a", "hv-c", "--link-seconds", "1"]);
    assert_eq!(code, 1, "{findings:?}");
    let a_to_c = finding(&findings, "hv-a", "link to hv-c");
    assert_eq!(a_to_c["verdict"], "error", "{a_to_c}");
    let detail = a_to_c["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("cannot connect to 127.0.0.1:")
            && detail.ends_with("(hv-c's migration address in the inventory)"),
        "{detail}"
    );
    assert!(
        a_to_c["fix"]
            .as_str()
            .unwrap()
            .contains("correct hv-c's migration_address in the inventory"),
        "{a_to_c}"
    );
    // The other way works: hv-a's sink is where the inventory says.
    assert_eq!(finding(&findings, "hv-c", "link to hv-a")["verdict"], "ok");

    // The text shows the measurement under its host.
    let out = cluster.tern(&["doctor", "hv-a", "hv-b", "--link-seconds", "1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("ok       link to hv-b"), "{text}");
    // Out of range: a usage error, nothing measured.
    let out = cluster.tern(&["doctor", "hv-a", "hv-b", "--link-seconds", "11"]);
    assert_eq!(out.status.code(), Some(64), "a usage error");
}

/// Replace `name`'s agent certificate with one valid from `from` to `to`
/// (days from now), signed by the cluster's CA with the same names.
fn reissue(cluster: &Cluster, name: &str, from_days: i64, to_days: i64) {
    let tls = cluster.tls.as_ref().unwrap();
    std::fs::remove_dir_all(tls.identities.join(name)).unwrap();
    let now = time::OffsetDateTime::now_utc();
    tern::trust::ca::issue_between(
        &tls.ca,
        &tern::trust::ca::IssueRequest {
            name: name.into(),
            role: tern::trust::Role::Agent,
            sans: vec!["127.0.0.1".into()],
            days: 0,
        },
        &tls.identities,
        now + time::Duration::days(from_days),
        now + time::Duration::days(to_days),
    )
    .unwrap();
}

/// A certificate expiring within 30 days is a warning naming the day; an
/// expired one is an error: the caller's TLS refuses the agent, and the
/// finding says so with the command that issues a new one.
#[test]
fn an_expiring_certificate_is_a_warning_and_an_expired_one_an_error() {
    let mut cluster = Cluster::start_tls(vec![host("hv-a", link(1024)), host("hv-b", link(1024))]);
    cluster.wait_connected();
    let (code, findings) = doctor(&cluster, &[]);
    assert_eq!(code, 0, "{findings:?}");
    assert_eq!(finding(&findings, "hv-a", "certificate")["verdict"], "ok");

    reissue(&cluster, "hv-a", -1, 10);
    cluster.kill("hv-a");
    cluster.start_agent("hv-a");
    let (code, findings) = doctor(&cluster, &[]);
    assert_eq!(code, 0, "a warning is not an error: {findings:?}");
    let soon = finding(&findings, "hv-a", "certificate");
    assert_eq!(soon["verdict"], "warning", "{soon}");
    assert!(
        soon["detail"].as_str().unwrap().contains("expires"),
        "{soon}"
    );
    assert!(
        soon["fix"].as_str().unwrap().contains("tern ca issue"),
        "{soon}"
    );

    reissue(&cluster, "hv-b", -3, -1);
    cluster.kill("hv-b");
    cluster.start_agent("hv-b");
    let (code, findings) = doctor(&cluster, &[]);
    assert_eq!(code, 1, "{findings:?}");
    let expired = finding(&findings, "hv-b", "reachable");
    assert_eq!(expired["verdict"], "error", "{expired}");
    let detail = expired["detail"].as_str().unwrap();
    assert!(detail.contains("expired"), "{detail}");
    assert!(
        expired["fix"]
            .as_str()
            .unwrap()
            .contains("tern ca issue --role agent hv-b"),
        "{expired}"
    );
    // hv-a cannot reach it either, for the same reason.
    let peers = finding(&findings, "hv-a", "peers");
    assert_eq!(peers["verdict"], "error", "{peers}");
    assert!(
        peers["detail"].as_str().unwrap().contains("expired"),
        "{peers}"
    );
}

/// A QEMU host: its machine types are looked up in its QEMU (`q35` names
/// the versioned type it stands for; one QEMU lacks is an error naming who
/// wanted it), and KVM, where it opens, is measured with a guest of the
/// agent's own.
#[test]
fn a_qemu_hosts_machine_types_are_looked_up_and_its_kvm_measured() {
    let Some((qemu, _turn)) = common::qemu::qemu_or_skip("doctor machine types") else {
        return;
    };
    let config = |machine: &str| {
        format!(
            "[hypervisor]\nkind = \"qemu\"\nbinary = {:?}\naccel = \"auto\"\nmachine = \"{machine}\"\n",
            qemu.display()
        )
    };
    let cluster = Cluster::start(vec![
        host("qa", config("q35")),
        host("qb", config("pc-i440fx-99.0")),
    ]);
    cluster.wait_connected();
    let (code, findings) = doctor(&cluster, &[]);
    assert_eq!(code, 1, "{findings:?}");
    let fine = finding(&findings, "qa", "machine");
    assert_eq!(fine["verdict"], "ok", "{fine}");
    assert!(
        fine["detail"].as_str().unwrap().starts_with("q35 (pc-q35-"),
        "{fine}"
    );
    let missing = finding(&findings, "qb", "machine");
    assert_eq!(missing["verdict"], "error", "{missing}");
    assert!(
        missing["detail"]
            .as_str()
            .unwrap()
            .ends_with("has no machine type pc-i440fx-99.0 (for [hypervisor] machine)"),
        "{missing}"
    );
    assert!(missing["fix"].as_str().unwrap().contains("-machine help"));

    let kvm = finding(&findings, "qa", "kvm");
    let opens = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if opens {
        assert_ne!(kvm["verdict"], "error", "{kvm}");
        assert!(
            kvm["detail"]
                .as_str()
                .unwrap()
                .contains("a guest exit takes "),
            "measured: {kvm}"
        );
    } else {
        assert_eq!(kvm["verdict"], "ok", "auto falls back to TCG: {kvm}");
    }
}
