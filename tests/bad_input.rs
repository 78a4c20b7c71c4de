//! Bad input gets a precise error (exit 64 and a message naming the problem)
//! and changes nothing.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use prost::Message;
use tern::proto;
use tern::proto::peer_client::PeerClient;
use tern::protocol::{FeatureSpec, Mode, VmSpec};

fn two_hosts() -> Cluster {
    Cluster::start(vec![
        host("hv-a", format!("{}{}", port_profile(""), vm("web-01", 256))),
        host("hv-b", port_profile("")),
    ])
}

/// `tern ARGS`: exit code and stderr.
fn run(cluster: &Cluster, args: &[&str]) -> (i32, String) {
    let out = cluster.tern(args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Run `tern ARGS`, expect exit 64 with `phrase` in stderr, and no change to
/// the VMs or migrations the cluster reports.
fn assert_refused_without_change(cluster: &Cluster, args: &[&str], phrases: &[&str]) {
    let before = cluster.status();
    let (code, stderr) = run(cluster, args);
    assert_eq!(code, 64, "tern {args:?} exit code; stderr: {stderr}");
    for phrase in phrases {
        assert!(
            stderr.contains(phrase),
            "tern {args:?}: stderr does not mention {phrase:?}: {stderr}"
        );
    }
    let after = cluster.status();
    assert_eq!(before["vms"], after["vms"], "tern {args:?} changed the VMs");
    assert_eq!(
        before["migrations"], after["migrations"],
        "tern {args:?} changed the migrations"
    );
}

#[test]
fn migrating_an_unknown_vm_is_refused_by_name() {
    let cluster = two_hosts();
    assert_refused_without_change(
        &cluster,
        &["migrate", "nope-vm", "--to", "hv-b", "--json"],
        &["nope-vm", "no VM"],
    );
}

#[test]
fn migrating_to_an_unknown_host_is_refused_and_lists_the_hosts() {
    let cluster = two_hosts();
    assert_refused_without_change(
        &cluster,
        &["migrate", "web-01", "--to", "nope", "--json"],
        &["nope", "hv-a", "hv-b"],
    );
}

#[test]
fn migrating_to_the_host_the_vm_already_runs_on_is_refused() {
    let cluster = two_hosts();
    assert_refused_without_change(
        &cluster,
        &["migrate", "web-01", "--to", "hv-a", "--json"],
        &["already runs on hv-a"],
    );
}

#[test]
fn a_second_migration_of_a_migrating_vm_is_refused() {
    let cluster = Cluster::start(vec![
        host(
            "hv-a",
            format!("{}{}{}", port_profile(""), link(256), vm("web-01", 4096)),
        ),
        host("hv-b", format!("{}{}", port_profile(""), link(256))),
        host("hv-c", format!("{}{}", port_profile(""), link(256))),
    ]);
    let id = cluster.start_migration("web-01", "hv-b", "safe");
    cluster.wait_phase(&id, "perform");
    let ids = |c: &Cluster| -> Vec<String> {
        c.status()["migrations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    };
    let before = ids(&cluster);
    for to in ["hv-b", "hv-c"] {
        let (code, stderr) = run(&cluster, &["migrate", "web-01", "--to", to, "--json"]);
        assert_eq!(code, 64, "second migration to {to}: {stderr}");
        assert!(stderr.contains("already migrating"), "{stderr}");
        assert!(
            stderr.contains(&id),
            "the refusal should name the running migration {id}: {stderr}"
        );
    }
    assert_eq!(ids(&cluster), before, "a refused migration left a record");
    assert!(
        cluster.guests_of("web-01").iter().all(|(h, _)| h != "hv-c"),
        "{:?}",
        cluster.guests_of("web-01")
    );
    // The first migration is untouched by the refusals.
    let record = cluster.migration(&id);
    assert!(record["outcome"].is_null(), "{record}");
    assert_eq!(phase(&record, "perform")["status"], "running", "{record}");
    let (code, stderr) = run(&cluster, &["abort", &id]);
    assert_eq!(code, 0, "{stderr}");
}

// ---- Peer.Prepare with a bad C1, straight over gRPC -----------------------

fn incoming_vm(name: &str) -> VmSpec {
    VmSpec {
        name: name.to_string(),
        memory_mib: 256,
        vcpus: 2,
        dirty_rate_mib_s: 10,
        features: vec![FeatureSpec {
            name: "port-profile".into(),
            driver: String::new(),
            required: true,
        }],
        qemu: None,
    }
}

fn call_prepare(
    cluster: &Cluster,
    host: &str,
    c1: &proto::Cookie1,
) -> Result<proto::PrepareReply, tonic::Status> {
    let address = format!("http://127.0.0.1:{}", cluster.host(host).port);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut client = PeerClient::connect(address)
            .await
            .expect("connect to the destination");
        let request = proto::PrepareRequest {
            cookie1: c1.encode_to_vec(),
        };
        tokio::time::timeout(Duration::from_secs(10), client.prepare(request))
            .await
            .expect("Prepare did not answer within 10 s")
            .map(|r| r.into_inner())
    })
}

fn assert_nothing_incoming(cluster: &Cluster, host: &str, vm: &str) {
    assert!(
        cluster.guests_of(vm).is_empty(),
        "a guest was created: {:?}",
        cluster.guests_of(vm)
    );
    assert!(
        cluster.feature_state(host, vm).is_empty(),
        "feature state on {host}: {:?}",
        cluster.feature_state(host, vm)
    );
    assert!(cluster.pending_rollbacks(host).is_empty());
}

#[test]
fn prepare_with_an_unknown_mandatory_feature_is_invalid_argument_naming_it() {
    let cluster = two_hosts();
    let before = cluster.status();
    let mut c1 = tern::protocol::cookies::cookie1(
        "m-000000bad001.1",
        "m-000000bad001",
        "hv-a",
        &incoming_vm("db-09"),
        Mode::Safe,
    );
    c1.mandatory_features.push("vtpm".into());
    let status = call_prepare(&cluster, "hv-b", &c1)
        .expect_err("Prepare accepted an unknown mandatory feature");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("vtpm"), "{status:?}");
    assert_nothing_incoming(&cluster, "hv-b", "db-09");
    assert_eq!(before["vms"], cluster.status()["vms"]);
}

#[test]
fn prepare_with_another_protocol_version_is_failed_precondition_naming_both() {
    let cluster = two_hosts();
    let before = cluster.status();
    let mut c1 = tern::protocol::cookies::cookie1(
        "m-000000bad002.1",
        "m-000000bad002",
        "hv-a",
        &incoming_vm("db-09"),
        Mode::Safe,
    );
    c1.protocol_version = 99;
    let status =
        call_prepare(&cluster, "hv-b", &c1).expect_err("Prepare accepted protocol version 99");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("99"), "{status:?}");
    assert!(
        status
            .message()
            .contains(&tern::protocol::PROTOCOL_VERSION.to_string()),
        "{status:?}"
    );
    assert_nothing_incoming(&cluster, "hv-b", "db-09");
    assert_eq!(before["vms"], cluster.status()["vms"]);
}

#[test]
fn the_same_c1_is_accepted_when_valid() {
    // Control for the two refusals above: the hand-built C1 itself is fine.
    let cluster = two_hosts();
    let c1 = tern::protocol::cookies::cookie1(
        "m-0000000600d1.1",
        "m-0000000600d1",
        "hv-a",
        &incoming_vm("db-09"),
        Mode::Safe,
    );
    let reply = call_prepare(&cluster, "hv-b", &c1).expect("a valid C1 was refused");
    let c2 = proto::Cookie2::decode(reply.cookie2.as_slice()).unwrap();
    assert_eq!(c2.attempt_id, "m-0000000600d1.1");
    assert!(
        cluster.guests_of("db-09").iter().any(|(h, _)| h == "hv-b"),
        "{:?}",
        cluster.guests_of("db-09")
    );
}

// ---- malformed files --------------------------------------------------------

/// Run `tern agent --config FILE` on a config file; returns exit code and stderr.
fn agent_with_config(dir: &Path, file: &str, text: &str) -> (i32, String, std::path::PathBuf) {
    let path = dir.join(file);
    std::fs::write(&path, text).unwrap();
    let mut child = Command::new(TERN)
        .args(["agent", "--config"])
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tern agent with {file} kept running: it accepted a malformed config");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        path,
    )
}

#[test]
fn malformed_agent_configs_are_refused_naming_file_and_key_and_start_nothing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("cluster.toml"),
        "[[host]]\nname = \"hv-a\"\naddress = \"http://127.0.0.1:1\"\n",
    )
    .unwrap();
    let head = |name: &str, listen: &str| {
        format!(
            "name = \"{name}\"\nlisten = \"{listen}\"\nstate_dir = \"state\"\ninventory = \"cluster.toml\"\n"
        )
    };
    let good_listen = "127.0.0.1:0";
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "unknown-key.toml",
            format!("{}bogus_key = 3\n", head("hv-a", good_listen)),
            vec!["bogus_key"],
        ),
        (
            "missing-name.toml",
            format!(
                "listen = \"{good_listen}\"\nstate_dir = \"state\"\ninventory = \"cluster.toml\"\n"
            ),
            vec!["missing field `name`"],
        ),
        (
            "bad-listen.toml",
            head("hv-a", "not-an-address"),
            vec!["listen", "not-an-address"],
        ),
        (
            "unconfigured-feature.toml",
            format!("{}\n{}", head("hv-a", good_listen), vm("web-01", 256)),
            vec!["web-01", "port-profile"],
        ),
        (
            "duplicate-vm.toml",
            format!(
                "{}\n{}{}{}",
                head("hv-a", good_listen),
                port_profile(""),
                vm("web-01", 256),
                vm("web-01", 512)
            ),
            vec!["web-01", "twice"],
        ),
    ];
    assert_configs_refused(dir.path(), cases);
}

fn config_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("cluster.toml"),
        "[[host]]\nname = \"hv-a\"\naddress = \"http://127.0.0.1:1\"\n",
    )
    .unwrap();
    dir
}

const CONFIG_HEAD: &str = "name = \"hv-a\"\nlisten = \"127.0.0.1:0\"\nstate_dir = \"state\"\ninventory = \"cluster.toml\"\n";

#[test]
fn unknown_keys_inside_vm_entries_are_refused() {
    let dir = config_dir();
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "unknown-vm-key.toml",
            format!(
                "{CONFIG_HEAD}{}[[vm]]\nname = \"web-01\"\nmemory_mib = 256\nvcpus = 2\nmemroy = 3\n",
                port_profile("")
            ),
            vec!["memroy"],
        ),
        (
            // A typo that would silently make a required feature optional.
            "unknown-feature-ref-key.toml",
            format!(
                "{CONFIG_HEAD}{}[[vm]]\nname = \"web-01\"\nmemory_mib = 256\nvcpus = 2\nfeatures = [{{ name = \"port-profile\", requird = true }}]\n",
                port_profile("")
            ),
            vec!["requird"],
        ),
    ];
    assert_configs_refused(dir.path(), cases);
}

#[test]
fn unknown_feature_settings_are_refused_as_bad_config_before_anything_is_created() {
    let dir = config_dir();
    let cases: Vec<(&str, String, Vec<&str>)> = vec![(
        "unknown-setting.toml",
        format!("{CONFIG_HEAD}{}", port_profile("latncy_ms = 5")),
        vec!["latncy_ms"],
    )];
    assert_configs_refused(dir.path(), cases);
}

fn assert_configs_refused(dir: &Path, cases: Vec<(&str, String, Vec<&str>)>) {
    for (i, (file, text, phrases)) in cases.into_iter().enumerate() {
        // A neutral file name, so the phrases cannot match the path.
        let (code, stderr, path) = agent_with_config(dir, &format!("agent-{i}.toml"), &text);
        assert_eq!(code, 64, "{file}: exit code; stderr: {stderr}");
        assert!(
            stderr.contains(&path.display().to_string()),
            "{file}: stderr does not name the file: {stderr}"
        );
        for phrase in phrases {
            assert!(
                stderr.contains(phrase),
                "{file}: stderr does not mention {phrase:?}: {stderr}"
            );
        }
        assert!(
            !dir.join("state").exists(),
            "{file}: state_dir was created for a refused config"
        );
    }
}

#[test]
fn malformed_inventory_makes_status_exit_64_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, &str, Vec<&str>)> = vec![
        ("not-toml.toml", "[[host]\nname = ", vec![]),
        (
            "unknown-key.toml",
            "[[host]]\nname = \"hv-a\"\naddress = \"http://127.0.0.1:1\"\nport = 7\n",
            vec!["port"],
        ),
        ("no-hosts.toml", "", vec!["no [[host]]"]),
        (
            "bad-address.toml",
            "[[host]]\nname = \"hv-a\"\naddress = \"127.0.0.1:7701\"\n",
            vec!["hv-a", "http://"],
        ),
        (
            "duplicate-host.toml",
            "[[host]]\nname = \"hv-a\"\naddress = \"http://127.0.0.1:1\"\n[[host]]\nname = \"hv-a\"\naddress = \"http://127.0.0.1:2\"\n",
            vec!["hv-a", "twice"],
        ),
    ];
    for (file, text, phrases) in cases {
        let path = dir.path().join(file);
        std::fs::write(&path, text).unwrap();
        for args in [
            vec!["status", "--json"],
            vec!["migrate", "web-01", "--to", "hv-a"],
        ] {
            let out = Command::new(TERN)
                .arg("--inventory")
                .arg(&path)
                .args(&args)
                .env_remove("TERN_INVENTORY")
                .stdin(Stdio::null())
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(64),
                "{file} {args:?}: stderr: {stderr}"
            );
            assert!(
                stderr.contains(&path.display().to_string()),
                "{file}: stderr does not name the file: {stderr}"
            );
            for phrase in &phrases {
                assert!(
                    stderr.contains(phrase),
                    "{file}: stderr does not mention {phrase:?}: {stderr}"
                );
            }
        }
    }
}

/// Found by the simulator: a Prepare repeated after its attempt had ended
/// prepared it a second time, overwriting the journaled rollback.
#[test]
fn a_repeated_prepare_after_the_attempt_rolled_back_is_refused_and_changes_nothing() {
    let cluster = two_hosts();
    let c1 = tern::protocol::cookies::cookie1(
        "m-00000000ec01.1",
        "m-00000000ec01",
        "hv-a",
        &incoming_vm("db-09"),
        Mode::Safe,
    );
    call_prepare(&cluster, "hv-b", &c1).expect("the first Prepare is accepted");
    // No source heartbeats this attempt: hv-b gives up after its peer timeout.
    wait_until(
        Duration::from_secs(20),
        "hv-b to roll back the orphaned attempt",
        || cluster.guests_of("db-09").is_empty(),
    );
    let status = call_prepare(&cluster, "hv-b", &c1)
        .expect_err("a repeated Prepare of an ended attempt was accepted");
    assert_eq!(status.code(), tonic::Code::AlreadyExists, "{status:?}");
    assert!(status.message().contains("m-00000000ec01.1"), "{status:?}");
    assert_nothing_incoming(&cluster, "hv-b", "db-09");
}
