//! Trust: real agents on mutual TLS with identities from `tern ca`. Only a
//! certificate of the cluster CA gets in, each role may do what the table
//! says and no more, a host may act only on its own attempts, and every
//! changing request, refused or not, is in the audit trail.

mod common;

use std::path::Path;

use common::*;
use prost::Message;
use serde_json::Value;
use tern::config::HostEntry;
use tern::proto;
use tern::proto::console_client::ConsoleClient;
use tern::proto::peer_client::PeerClient;
use tern::trust::tls::{IdentityFiles, endpoint};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

fn two_hosts() -> Cluster {
    Cluster::start_tls(vec![
        host("hv-a", format!("{}{}", port_profile(""), vm("web-01", 256))),
        host("hv-b", port_profile("")),
    ])
}

fn tls(cluster: &Cluster) -> &Tls {
    cluster.tls.as_ref().expect("a TLS cluster")
}

fn entry(cluster: &Cluster, name: &str) -> HostEntry {
    HostEntry {
        name: name.into(),
        address: cluster.address(name),
        migration_address: None,
    }
}

/// A channel to `host`'s agent as the identity in `dir`.
async fn channel_as(cluster: &Cluster, host: &str, dir: &Path) -> Result<Channel, String> {
    let identity = IdentityFiles::load_dir(dir)?;
    endpoint(&entry(cluster, host), Some(&identity))?
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

fn code_and_stderr(out: &std::process::Output) -> (i32, String) {
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every audit entry of the cluster, as the admin reads them.
fn audit(cluster: &Cluster) -> Vec<Value> {
    let out = cluster.tern(&["audit", "--json"]);
    assert!(
        out.status.success(),
        "tern audit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON entry per line"))
        .collect()
}

fn find_audit<'a>(entries: &'a [Value], who: &str, action: &str) -> Vec<&'a Value> {
    entries
        .iter()
        .filter(|e| e["who"] == who && e["action"] == action)
        .collect()
}

/// Ask an agent for its host over `endpoint`: whether it answered.
fn answers(endpoint: Endpoint) -> Result<(), String> {
    block_on(async {
        let channel = endpoint.connect().await.map_err(|e| format!("{e:?}"))?;
        ConsoleClient::new(channel)
            .get_host(proto::GetHostRequest {})
            .await
            .map(|_| ())
            .map_err(|s| format!("{s:?}"))
    })
}

#[test]
fn only_a_certificate_of_the_cluster_ca_gets_in() {
    let cluster = two_hosts();
    let ours = tls(&cluster);
    let ours_pem = std::fs::read_to_string(ours.admin.join("ca.pem")).unwrap();
    let checking_the_agent = || {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&ours_pem))
            .domain_name("hv-a")
    };
    let to_hv_a = || Endpoint::from_shared(cluster.address("hv-a")).unwrap();
    // No client certificate: the agent checked, nothing presented.
    let anonymous = answers(to_hv_a().tls_config(checking_the_agent()).unwrap());
    assert!(
        anonymous.is_err(),
        "an agent answered a client without a certificate"
    );

    // A certificate from another CA, presented with our CA to check the agent.
    let other = cluster.path().join("other-ca");
    ca(&["init", "--dir", other.to_str().unwrap()]);
    let other_ids = cluster.path().join("other-ids");
    ca(&[
        "issue",
        "--dir",
        other.to_str().unwrap(),
        "--out",
        other_ids.to_str().unwrap(),
        "--role",
        "admin",
        "mallory",
    ]);
    let mallory = other_ids.join("mallory");
    let cert = std::fs::read_to_string(mallory.join("cert.pem")).unwrap();
    let key = std::fs::read_to_string(mallory.join("key.pem")).unwrap();
    let foreign = answers(
        to_hv_a()
            .tls_config(
                checking_the_agent().identity(tonic::transport::Identity::from_pem(cert, key)),
            )
            .unwrap(),
    );
    assert!(
        foreign.is_err(),
        "an agent answered a certificate from another CA"
    );
    // The CLI says it could not reach any agent.
    std::fs::copy(ours.admin.join("ca.pem"), mallory.join("ca.pem")).unwrap();
    let (code, stderr) = code_and_stderr(&cluster.tern_as(Some(&mallory), &["status"]));
    assert_eq!(code, 69, "{stderr}");
    assert!(stderr.contains("no agent"), "{stderr}");

    // Plaintext to a TLS agent gets nothing either.
    let plain = answers(
        Endpoint::from_shared(cluster.address("hv-a").replace("https://", "http://")).unwrap(),
    );
    assert!(plain.is_err(), "a TLS agent answered plaintext");
    // And the cluster's own identity works.
    assert!(
        answers(
            endpoint(
                &entry(&cluster, "hv-a"),
                Some(&IdentityFiles::load_dir(&ours.admin).unwrap())
            )
            .unwrap()
        )
        .is_ok()
    );
    assert_eq!(cluster.status()["hosts"][0]["security"], "tls");
}

#[test]
fn each_role_may_do_what_the_table_says_and_a_refusal_exits_77_changing_nothing() {
    let cluster = two_hosts();
    let ids = tls(&cluster);
    let vera = ids.issue("vera", "viewer", &[]);
    let olga = ids.issue("olga", "operator", &[]);

    // A viewer sees everything...
    let out = cluster.tern_as(Some(&vera), &["status", "--json"]);
    let (code, status) = last_json(&["status"], &out);
    assert_eq!(code, 0);
    assert_eq!(status["vms"].as_array().unwrap().len(), 1);
    // ...and changes nothing.
    let before = cluster.status();
    let out = cluster.tern_as(Some(&vera), &["migrate", "web-01", "--to", "hv-b"]);
    let (code, stderr) = code_and_stderr(&out);
    assert_eq!(code, 77, "{stderr}");
    assert!(
        stderr.contains("vera is a viewer: this needs the operator role"),
        "{stderr}"
    );
    let after = cluster.status();
    assert_eq!(before["vms"], after["vms"]);
    assert_eq!(before["migrations"], after["migrations"]);

    // An operator migrates...
    let out = cluster.tern_as(
        Some(&olga),
        &["migrate", "web-01", "--to", "hv-b", "--json"],
    );
    let (code, record) = last_json(&["migrate"], &out);
    assert_eq!(code, 0, "{record}");
    assert_eq!(record["outcome"], "succeeded", "{record}");
    assert_eq!(cluster.running_on("web-01"), vec!["hv-b"]);
    let id = record["id"].as_str().unwrap().to_string();
    // ...but may not force a decision (an admin's) nor inject faults.
    // (Asked directly: the CLI's own checks would stop a resolve of a
    // migration that succeeded before the agent is asked.)
    let status = block_on(async {
        let channel = channel_as(&cluster, "hv-a", &olga).await.unwrap();
        ConsoleClient::new(channel)
            .resolve(proto::ForceResolveRequest {
                id: id.clone(),
                run_on: proto::RunOn::Source as i32,
            })
            .await
            .unwrap_err()
    });
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("needs the admin role"),
        "{status:?}"
    );
    let (code, stderr) = code_and_stderr(&cluster.tern_as(
        Some(&olga),
        &["fault", "hv-a", "port-profile", "--fail", "prepare"],
    ));
    assert_eq!(code, 77, "{stderr}");
    assert!(stderr.contains("needs the admin role"), "{stderr}");

    // An admin may, only where the agent's config allows fault injection.
    let (code, stderr) =
        code_and_stderr(&cluster.tern(&["fault", "hv-a", "port-profile", "--fail", "prepare"]));
    assert_eq!(code, 77, "{stderr}");
    assert!(stderr.contains("allow_fault_injection = true"), "{stderr}");

    // The trail has all of it, with who and the result.
    let entries = audit(&cluster);
    let refused = find_audit(&entries, "vera", "migrate");
    assert_eq!(refused.len(), 1, "{entries:#?}");
    assert_eq!(refused[0]["role"], "viewer");
    assert_eq!(refused[0]["ok"], false);
    assert_eq!(refused[0]["target"], "web-01 to hv-b");
    let done = find_audit(&entries, "olga", "migrate");
    assert_eq!(done.len(), 1, "{entries:#?}");
    assert_eq!(done[0]["ok"], true);
    assert!(
        done[0]["result"].as_str().unwrap().contains(&id),
        "{:?}",
        done[0]
    );
    assert_eq!(find_audit(&entries, "olga", "resolve")[0]["ok"], false);
    assert_eq!(find_audit(&entries, "olga", "set faults")[0]["ok"], false);
    assert_eq!(find_audit(&entries, "admin", "set faults")[0]["ok"], false);
    // A viewer may read the trail; the destination's peer calls are in it.
    let out = cluster.tern_as(Some(&vera), &["audit", "--host", "hv-b", "--json"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("\"who\":\"hv-a\"") && text.contains("peer prepare"),
        "{text}"
    );
}

#[test]
fn identities_may_use_only_their_own_service() {
    let cluster = two_hosts();
    let ids = tls(&cluster);
    let olga = ids.issue("olga", "operator", &[]);
    let stranger = ids.issue("hv-x", "agent", &["127.0.0.1"]);
    let hv_a = ids.identities.join("hv-a");
    block_on(async {
        // A person may not call the Peer service.
        let mut peer = PeerClient::new(channel_as(&cluster, "hv-b", &olga).await.unwrap());
        let status = peer.capacity(proto::CapacityRequest {}).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(
            status.message().contains("needs the agent role"),
            "{status:?}"
        );
        // An agent of a host the inventory does not list may not either.
        let mut peer = PeerClient::new(channel_as(&cluster, "hv-b", &stranger).await.unwrap());
        let status = peer.capacity(proto::CapacityRequest {}).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(
            status
                .message()
                .contains("hv-x is not a host of hv-b's inventory"),
            "{status:?}"
        );
        // An agent may not use the Console service.
        let mut console = ConsoleClient::new(channel_as(&cluster, "hv-a", &hv_a).await.unwrap());
        let status = console
            .start_migration(proto::StartMigrationRequest {
                completion: None,
                vm: "web-01".into(),
                destination: "hv-b".into(),
                mode: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains("hv-a is an agent"), "{status:?}");
    });
    assert_eq!(cluster.running_on("web-01"), vec!["hv-a"]);
    assert!(
        cluster.status()["migrations"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

/// A migration from hv-a to hv-b that lasts seconds (256 MiB at 32 MiB/s),
/// watched by hv-c, whose certificate is as good as theirs.
fn three_hosts() -> Cluster {
    Cluster::start_tls(vec![
        host(
            "hv-a",
            format!("{}{}{}", link(32), port_profile(""), vm("web-01", 256)),
        ),
        host("hv-b", format!("{}{}", link(32), port_profile(""))),
        host("hv-c", port_profile("")),
    ])
}

#[test]
fn another_host_may_not_finish_abort_resolve_or_heartbeat_an_attempt_between_two_others() {
    let cluster = three_hosts();
    let id = cluster.start_migration("web-01", "hv-b", "safe");
    cluster.wait_phase(&id, "perform");
    let attempt = cluster.migration(&id)["attempt_id"]
        .as_str()
        .unwrap()
        .to_string();
    let hv_c = tls(&cluster).identities.join("hv-c");
    block_on(async {
        let mut b = PeerClient::new(channel_as(&cluster, "hv-b", &hv_c).await.unwrap());
        let mut a = PeerClient::new(channel_as(&cluster, "hv-a", &hv_c).await.unwrap());
        let c3 = proto::Cookie3 {
            protocol_version: tern::protocol::PROTOCOL_VERSION,
            attempt_id: attempt.clone(),
            status: proto::TransferStatus::Completed as i32,
            stats: None,
        };
        // The forged pair: Finish to the destination (it would commit)
        // and an abort to the source (it would resume its copy).
        let finish = b
            .finish(proto::FinishRequest {
                cookie3: c3.encode_to_vec(),
            })
            .await
            .unwrap_err();
        assert_eq!(finish.code(), Code::PermissionDenied, "{finish:?}");
        assert!(
            finish.message().contains("hv-c may not act on it"),
            "{finish:?}"
        );
        let forged_abort = |claimed: &str| proto::PeerAbortRequest {
            attempt_id: attempt.clone(),
            reason: "forged".into(),
            from_host: claimed.into(),
            cookie4: Vec::new(),
            cause: String::new(),
        };
        for (on_source, claimed) in [(true, "hv-b"), (true, "hv-c"), (false, "hv-c")] {
            let to = if on_source { &mut a } else { &mut b };
            let abort = to.abort(forged_abort(claimed)).await.unwrap_err();
            assert_eq!(abort.code(), Code::PermissionDenied, "{claimed}: {abort:?}");
        }
        let heartbeat = b
            .heartbeat(proto::HeartbeatRequest {
                from_host: "hv-c".into(),
                attempt_ids: vec![attempt.clone()],
            })
            .await
            .unwrap_err();
        assert_eq!(heartbeat.code(), Code::PermissionDenied, "{heartbeat:?}");
        let resolve = b
            .resolve(proto::ResolveRequest {
                attempt_id: attempt.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(resolve.code(), Code::PermissionDenied, "{resolve:?}");
    });
    // Nothing changed: the migration goes on and ends on exactly one host.
    let record = cluster.wait_outcome(&id);
    assert_eq!(record["outcome"], "succeeded", "{record}");
    assert_eq!(cluster.running_on("web-01"), vec!["hv-b"]);
    assert_eq!(
        cluster.guests_of("web-01"),
        vec![("hv-b".into(), "running".into())]
    );
    // Each forgery is in the trail of the host it was tried on.
    let entries = audit(&cluster);
    for (host, action) in [
        ("hv-b", "peer finish"),
        ("hv-a", "peer abort"),
        ("hv-b", "peer abort"),
        ("hv-b", "peer heartbeat"),
        ("hv-b", "peer resolve"),
    ] {
        let tried: Vec<_> = find_audit(&entries, "hv-c", action)
            .into_iter()
            .filter(|e| e["host"] == host)
            .collect();
        assert!(!tried.is_empty(), "{action} on {host}: {entries:#?}");
        assert!(
            tried
                .iter()
                .all(|e| e["ok"] == false
                    && e["result"].as_str().unwrap().contains("PermissionDenied")),
            "{tried:?}"
        );
    }
}

#[test]
fn an_agent_on_a_network_address_without_tls_will_not_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("cluster.toml"),
        "[[host]]\nname = \"hv-a\"\naddress = \"http://192.0.2.1:7701\"\n",
    )
    .unwrap();
    let config = dir.path().join("hv-a.toml");
    std::fs::write(
        &config,
        "name = \"hv-a\"\nlisten = \"0.0.0.0:7701\"\nstate_dir = \"state\"\ninventory = \"cluster.toml\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(TERN)
        .args(["agent", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let (code, stderr) = code_and_stderr(&out);
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("is not loopback and there is no [tls]"),
        "{stderr}"
    );
    assert!(!dir.path().join("state").exists(), "it created nothing");
}

#[test]
fn an_agent_refuses_a_certificate_that_is_not_its_own() {
    let mut cluster = two_hosts();
    // hv-b's config pointed at hv-a's identity.
    let config = cluster.host("hv-b").config_path.clone();
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("identities/hv-b/", "identities/hv-a/");
    std::fs::write(&config, text).unwrap();
    cluster.kill("hv-b");
    let out = std::process::Command::new(TERN)
        .args(["agent", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let (code, stderr) = code_and_stderr(&out);
    assert_ne!(code, 0, "{stderr}");
    assert!(
        stderr.contains("belongs to hv-a (agent)") && stderr.contains("issued to hv-b"),
        "{stderr}"
    );
}

/// The genuine source may not put what the destination does not allow in
/// its C1 either: a typed machine naming a path is refused by field, and
/// nothing is admitted.
#[test]
fn a_c1_naming_what_the_destination_does_not_allow_is_refused_by_field() {
    use tern::protocol::{Mode, QemuMachine, VmSpec, cookies};
    let cluster = two_hosts();
    let hv_a = tls(&cluster).identities.join("hv-a");
    let vm = VmSpec {
        name: "intruder".into(),
        memory_mib: 64,
        vcpus: 1,
        dirty_rate_mib_s: 0,
        features: vec![],
        qemu: Some(QemuMachine {
            kernel: "../../etc/shadow".into(),
            ..QemuMachine::default()
        }),
    };
    let c1 = cookies::cookie1(
        "m-00000000000a.1",
        "m-00000000000a",
        "hv-a",
        &vm,
        Mode::Fast,
    );
    let before = cluster.status();
    let status = block_on(async {
        let mut b = PeerClient::new(channel_as(&cluster, "hv-b", &hv_a).await.unwrap());
        b.prepare(proto::PrepareRequest {
            cookie1: c1.encode_to_vec(),
        })
        .await
        .unwrap_err()
    });
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .contains("qemu.kernel \"../../etc/shadow\" is a path"),
        "{status:?}"
    );
    let after = cluster.status();
    assert_eq!(before["vms"], after["vms"]);
    assert_eq!(
        host_of(&before, "hv-b")["incoming"],
        host_of(&after, "hv-b")["incoming"]
    );
    let entries = audit(&cluster);
    let tried = find_audit(&entries, "hv-a", "peer prepare");
    assert!(
        tried
            .iter()
            .any(|e| e["ok"] == false && e["target"] == "m-00000000000a.1"),
        "{entries:#?}"
    );
}
