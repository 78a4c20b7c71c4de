//! Bad input gets a precise error (exit 64 and a message naming the problem,
//! or over gRPC a status code and a short message naming the field) and
//! changes nothing: garbage bytes, 4 MiB strings, names and ids outside the
//! rules, zero sizes, unknown sources, stale ids, a Prepare reusing the other
//! side's attempt id, one VM name on two hosts, one Watch stream too many.

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

// ---- bounds: straight over gRPC, each refused precisely, nothing changed ----

use tern::proto::console_client::ConsoleClient;
use tonic::transport::Channel;

async fn console(cluster: &Cluster, host: &str) -> ConsoleClient<Channel> {
    ConsoleClient::connect(cluster.address(host))
        .await
        .expect("connect to the agent")
        .max_encoding_message_size(64 << 20)
}

async fn peer(cluster: &Cluster, host: &str) -> PeerClient<Channel> {
    PeerClient::connect(cluster.address(host))
        .await
        .expect("connect to the agent")
        .max_encoding_message_size(64 << 20)
}

/// What must not change when a request is refused: the VMs and migrations
/// every agent reports, and each host's pending work and feature state.
fn visible_state(cluster: &Cluster) -> serde_json::Value {
    let status = cluster.status();
    let hosts: Vec<serde_json::Value> = status["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            serde_json::json!({
                "name": h["name"],
                "pending": h["pending_rollbacks"],
                "feature_state": h["feature_state"],
                "incoming": h["incoming"],
                "outgoing": h["outgoing"],
            })
        })
        .collect();
    serde_json::json!({
        "vms": status["vms"],
        "migrations": status["migrations"],
        "hosts": hosts,
    })
}

/// `refused` must fail with `code`, a message containing each of `phrases`,
/// short and free of terminal escapes.
#[track_caller]
fn assert_status(
    result: Result<impl std::fmt::Debug, tonic::Status>,
    code: tonic::Code,
    phrases: &[&str],
) {
    let status = match result {
        Ok(reply) => panic!("accepted: {reply:?}"),
        Err(status) => status,
    };
    assert_eq!(status.code(), code, "{status:?}");
    for phrase in phrases {
        assert!(
            status.message().contains(phrase),
            "{:?} does not mention {phrase:?}",
            status.message()
        );
    }
    assert!(
        status.message().len() < 1024,
        "{} bytes",
        status.message().len()
    );
    assert!(
        !status.message().contains('\u{1b}'),
        "{:?}",
        status.message()
    );
}

/// A codec that sends bytes as they are: what a broken or hostile client
/// puts on the wire.
#[derive(Debug, Clone, Default)]
struct RawCodec;
struct RawEncoder;
struct RawDecoder;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use prost::bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use prost::bytes::Buf;
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

async fn raw_call(
    cluster: &Cluster,
    host: &str,
    path: &'static str,
    body: Vec<u8>,
) -> Result<Vec<u8>, tonic::Status> {
    let channel = Channel::from_shared(cluster.address(host))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    grpc.unary(
        tonic::Request::new(body),
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(tonic::Response::into_inner)
}

#[test]
fn undecodable_bytes_over_grpc_are_refused_and_change_nothing() {
    let cluster = two_hosts();
    let before = visible_state(&cluster);
    block_on(async {
        // Not protobuf at all: tonic refuses it before any service runs
        // (INTERNAL, as gRPC's status code guide has it for parse errors).
        let garbage = vec![0xff, 0xff, 0xff, 0xff, 0x0f];
        for path in [
            "/tern.v1.Peer/Prepare",
            "/tern.v1.Peer/Abort",
            "/tern.v1.Console/StartMigration",
            "/tern.v1.Console/Rollback",
        ] {
            let result = raw_call(&cluster, "hv-b", path, garbage.clone()).await;
            assert_status(
                result,
                tonic::Code::Internal,
                &["failed to decode Protobuf message"],
            );
        }
        // Protobuf, but its C1 is not: the cookie check says so.
        let result = raw_call(
            &cluster,
            "hv-b",
            "/tern.v1.Peer/Prepare",
            proto::PrepareRequest { cookie1: garbage }.encode_to_vec(),
        )
        .await;
        assert_status(result, tonic::Code::InvalidArgument, &["malformed C1"]);
    });
    assert_eq!(before, visible_state(&cluster));
}

#[test]
fn four_mib_strings_are_refused_by_size_and_long_ones_by_field() {
    let cluster = two_hosts();
    let before = visible_state(&cluster);
    let four_mib = "a".repeat(4 << 20);
    let one_mib = "a".repeat(1 << 20);
    block_on(async {
        // Past the agent's message limit: refused before decoding.
        let result = console(&cluster, "hv-a")
            .await
            .start_migration(proto::StartMigrationRequest {
                completion: None,
                vm: four_mib.clone(),
                destination: "hv-b".into(),
                mode: 0,
            })
            .await;
        let status = result.expect_err("a 4 MiB request was accepted");
        assert!(
            status.message().contains("message length too large"),
            "{status:?}"
        );
        let mut c1 = tern::protocol::cookies::cookie1(
            "m-0000000000c1.1",
            "m-0000000000c1",
            "hv-a",
            &incoming_vm("db-09"),
            Mode::Safe,
        );
        c1.vm.as_mut().unwrap().name = four_mib.clone();
        let status = peer(&cluster, "hv-b")
            .await
            .prepare(proto::PrepareRequest {
                cookie1: c1.encode_to_vec(),
            })
            .await
            .expect_err("a 4 MiB C1 was accepted");
        assert!(
            status.message().contains("message length too large"),
            "{status:?}"
        );

        // Within the limit, but no name is a megabyte long: the field is named.
        let result = console(&cluster, "hv-a")
            .await
            .start_migration(proto::StartMigrationRequest {
                completion: None,
                vm: one_mib.clone(),
                destination: "hv-b".into(),
                mode: 0,
            })
            .await;
        assert_status(
            result,
            tonic::Code::InvalidArgument,
            &["StartMigrationRequest.vm", "(1048576 bytes)"],
        );
        c1.vm.as_mut().unwrap().name = one_mib.clone();
        let result = peer(&cluster, "hv-b")
            .await
            .prepare(proto::PrepareRequest {
                cookie1: c1.encode_to_vec(),
            })
            .await;
        assert_status(
            result,
            tonic::Code::InvalidArgument,
            &["C1.vm.name", "(1048576 bytes)"],
        );
        let result = peer(&cluster, "hv-b")
            .await
            .abort(proto::PeerAbortRequest {
                attempt_id: "m-0000000000c1.1".into(),
                reason: one_mib.clone(),
                from_host: "hv-a".into(),
                cookie4: Vec::new(),
                cause: String::new(),
            })
            .await;
        assert_status(
            result,
            tonic::Code::InvalidArgument,
            &["PeerAbortRequest.reason is 1048576 bytes"],
        );
        // A name with a terminal escape comes back escaped, not raw.
        let result = console(&cluster, "hv-a")
            .await
            .start_migration(proto::StartMigrationRequest {
                completion: None,
                vm: "web\u{1b}]0;owned\u{7}".into(),
                destination: "hv-b".into(),
                mode: 0,
            })
            .await;
        assert_status(
            result,
            tonic::Code::InvalidArgument,
            &["StartMigrationRequest.vm \"web\\u{1b}]0;owned\\u{7}\""],
        );
    });
    assert_eq!(before, visible_state(&cluster));
}

#[test]
fn zero_sizes_are_refused_in_c1_and_in_config() {
    let cluster = two_hosts();
    let before = visible_state(&cluster);
    for (memory, vcpus, field) in [
        (0, 2, "C1.vm.memory_mib is 0"),
        (256, 0, "C1.vm.vcpus is 0"),
    ] {
        let mut spec = incoming_vm("db-09");
        spec.memory_mib = memory;
        spec.vcpus = vcpus;
        let c1 = tern::protocol::cookies::cookie1(
            "m-0000000000c2.1",
            "m-0000000000c2",
            "hv-a",
            &spec,
            Mode::Safe,
        );
        assert_status(
            call_prepare(&cluster, "hv-b", &c1),
            tonic::Code::InvalidArgument,
            &[field],
        );
    }
    assert_nothing_incoming(&cluster, "hv-b", "db-09");
    assert_eq!(before, visible_state(&cluster));

    let dir = config_dir();
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "zero-memory.toml",
            format!(
                "{CONFIG_HEAD}{}[[vm]]\nname = \"web-01\"\nmemory_mib = 0\nvcpus = 2\n",
                port_profile("")
            ),
            vec!["[[vm]] web-01.memory_mib is 0"],
        ),
        (
            "bad-vm-name.toml",
            format!(
                "{CONFIG_HEAD}{}[[vm]]\nname = \"web 01\"\nmemory_mib = 256\nvcpus = 2\n",
                port_profile("")
            ),
            vec!["[[vm]] name \"web 01\" must be"],
        ),
    ];
    assert_configs_refused(dir.path(), cases);
}

#[test]
fn a_c1_from_an_unknown_source_or_from_the_host_itself_is_refused() {
    let cluster = two_hosts();
    let before = visible_state(&cluster);
    for (source, phrases) in [
        (
            "hv-zz",
            vec!["C1.source: no host named hv-zz", "hv-a, hv-b"],
        ),
        ("hv-b", vec!["C1.source is hv-b itself"]),
    ] {
        let c1 = tern::protocol::cookies::cookie1(
            "m-0000000000c3.1",
            "m-0000000000c3",
            source,
            &incoming_vm("db-09"),
            Mode::Safe,
        );
        assert_status(
            call_prepare(&cluster, "hv-b", &c1),
            tonic::Code::InvalidArgument,
            &phrases,
        );
    }
    assert_nothing_incoming(&cluster, "hv-b", "db-09");
    assert_eq!(before, visible_state(&cluster));
}

#[test]
fn stale_and_malformed_ids_get_precise_answers_from_finish_abort_resolve_and_heartbeat() {
    let cluster = two_hosts();
    // An attempt that ran and ended: its id is stale from then on.
    let (code, record) = cluster.tern_json(&["migrate", "web-01", "--to", "hv-b", "--json"]);
    assert_eq!(code, 0, "{record}");
    let ended = record["attempt_id"].as_str().unwrap().to_string();
    let never = "m-0000000000c4.1".to_string();
    let before = visible_state(&cluster);
    block_on(async {
        let mut b = peer(&cluster, "hv-b").await;
        let c3 = |id: &str| proto::Cookie3 {
            protocol_version: tern::protocol::PROTOCOL_VERSION,
            attempt_id: id.into(),
            status: proto::TransferStatus::Completed as i32,
            stats: None,
        };
        // Finish: the ended attempt is answered from its record (committed);
        // one never seen here is NotFound.
        let reply = b
            .finish(proto::FinishRequest {
                cookie3: c3(&ended).encode_to_vec(),
            })
            .await
            .expect("Finish of an ended attempt is answered")
            .into_inner();
        let c4 = proto::Cookie4::decode(reply.cookie4.as_slice()).unwrap();
        assert!(c4.committed, "{c4:?}");
        let result = b
            .finish(proto::FinishRequest {
                cookie3: c3(&never).encode_to_vec(),
            })
            .await;
        assert_status(
            result,
            tonic::Code::NotFound,
            &[&format!("no attempt {never} on hv-b")],
        );
        // Abort: too late for the committed one; "not known" for the other.
        let abort = |id: &str| proto::PeerAbortRequest {
            attempt_id: id.into(),
            reason: "stale".into(),
            from_host: "hv-a".into(),
            cookie4: Vec::new(),
            cause: String::new(),
        };
        let reply = b.abort(abort(&ended)).await.unwrap().into_inner();
        assert!(!reply.aborted && reply.committed, "{reply:?}");
        let reply = b.abort(abort(&never)).await.unwrap().into_inner();
        assert!(
            reply.aborted && reply.detail == "not known here",
            "{reply:?}"
        );
        // Resolve: committed, and "not committed" for the one never seen.
        let resolve = |id: &str| proto::ResolveRequest {
            attempt_id: id.into(),
        };
        let reply = b.resolve(resolve(&ended)).await.unwrap().into_inner();
        assert_eq!(reply.resolution, proto::Resolution::Committed as i32);
        let reply = b.resolve(resolve(&never)).await.unwrap().into_inner();
        assert_eq!(reply.resolution, proto::Resolution::NotCommitted as i32);
        // Heartbeat: neither is live here.
        let reply = b
            .heartbeat(proto::HeartbeatRequest {
                from_host: "hv-a".into(),
                attempt_ids: vec![ended.clone(), never.clone()],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.gone, [ended.clone(), never.clone()]);

        // Ids that are no ids at all: InvalidArgument naming the field.
        let bad = "m-1; DROP TABLE attempt";
        let result = b
            .finish(proto::FinishRequest {
                cookie3: c3(bad).encode_to_vec(),
            })
            .await;
        assert_status(result, tonic::Code::InvalidArgument, &["C3.attempt_id"]);
        assert_status(
            b.abort(abort(bad)).await,
            tonic::Code::InvalidArgument,
            &["PeerAbortRequest.attempt_id"],
        );
        assert_status(
            b.resolve(resolve(bad)).await,
            tonic::Code::InvalidArgument,
            &["ResolveRequest.attempt_id"],
        );
        let result = b
            .heartbeat(proto::HeartbeatRequest {
                from_host: "hv-a".into(),
                attempt_ids: vec![never.clone(), bad.into()],
            })
            .await;
        assert_status(
            result,
            tonic::Code::InvalidArgument,
            &["HeartbeatRequest.attempt_ids[1]"],
        );
    });
    assert_eq!(before, visible_state(&cluster));
    assert_eq!(cluster.running_on("web-01"), ["hv-b"]);
}

#[test]
fn rollback_of_an_unknown_migration_is_not_found_not_an_empty_ok() {
    let cluster = two_hosts();
    let (code, record) = cluster.tern_json(&["migrate", "web-01", "--to", "hv-b", "--json"]);
    assert_eq!(code, 0, "{record}");
    let known = record["id"].as_str().unwrap().to_string();
    let before = visible_state(&cluster);
    block_on(async {
        let mut a = console(&cluster, "hv-a").await;
        let unknown = "m-00000000dead";
        let result = a.rollback(proto::MigrationRef { id: unknown.into() }).await;
        assert_status(
            result,
            tonic::Code::NotFound,
            &[&format!("no migration {unknown} on hv-a")],
        );
        let result = a.rollback(proto::MigrationRef { id: "nope".into() }).await;
        assert_status(
            result,
            tonic::Code::InvalidArgument,
            &["MigrationRef.id \"nope\""],
        );
        // A migration the host knows, with nothing pending: an empty answer.
        let reply = a
            .rollback(proto::MigrationRef { id: known.clone() })
            .await
            .expect("a known migration")
            .into_inner();
        assert!(reply.done.is_empty() && reply.still_pending.is_empty());
    });
    let (code, stderr) = run(&cluster, &["rollback", "m-00000000dead"]);
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("no migration m-00000000dead on any agent"),
        "{stderr}"
    );
    let (code, stderr) = run(&cluster, &["rollback", "nope"]);
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("migration ID \"nope\" is not a migration id"),
        "{stderr}"
    );
    assert_eq!(before, visible_state(&cluster));
}

#[test]
fn a_prepare_reusing_an_attempt_id_of_the_other_side_is_refused() {
    let cluster = two_hosts();
    let (code, record) = cluster.tern_json(&["migrate", "web-01", "--to", "hv-b", "--json"]);
    assert_eq!(code, 0, "{record}");
    let attempt = record["attempt_id"].as_str().unwrap().to_string();
    let migration = record["id"].as_str().unwrap().to_string();
    let before = visible_state(&cluster);
    let c1 = tern::protocol::cookies::cookie1(
        &attempt,
        &migration,
        "hv-b",
        &incoming_vm("db-09"),
        Mode::Safe,
    );
    // hv-a sourced this attempt: it never receives it.
    assert_status(
        call_prepare(&cluster, "hv-a", &c1),
        tonic::Code::AlreadyExists,
        &[&attempt, "which hv-a sources"],
    );
    // hv-b received it already: a repeated Prepare is refused.
    let c1 = tern::protocol::cookies::cookie1(
        &attempt,
        &migration,
        "hv-a",
        &incoming_vm("db-09"),
        Mode::Safe,
    );
    assert_status(
        call_prepare(&cluster, "hv-b", &c1),
        tonic::Code::AlreadyExists,
        &[&attempt, "already ran on hv-b"],
    );
    assert!(cluster.guests_of("db-09").is_empty());
    assert_eq!(before, visible_state(&cluster));
}

#[test]
fn the_same_vm_name_on_two_hosts_is_refused_by_the_cli_and_by_prepare() {
    let cluster = Cluster::start(vec![
        host("hv-a", format!("{}{}", port_profile(""), vm("web-01", 256))),
        host("hv-b", format!("{}{}", port_profile(""), vm("web-01", 256))),
        host("hv-c", port_profile("")),
    ]);
    let before = visible_state(&cluster);
    assert_refused_without_change(
        &cluster,
        &["migrate", "web-01", "--to", "hv-c", "--json"],
        &["web-01 runs on several hosts (hv-a, hv-b)"],
    );
    // hv-a's agent asked directly: hv-b refuses a second web-01.
    let c1 = tern::protocol::cookies::cookie1(
        "m-0000000000c5.1",
        "m-0000000000c5",
        "hv-a",
        &incoming_vm("web-01"),
        Mode::Safe,
    );
    assert_status(
        call_prepare(&cluster, "hv-b", &c1),
        tonic::Code::AlreadyExists,
        &["a guest named web-01 already exists on hv-b"],
    );
    assert_eq!(before, visible_state(&cluster));
}

#[test]
fn one_watch_stream_past_max_watchers_is_resource_exhausted_and_a_closed_one_frees_its_slot() {
    let cluster = Cluster::start(vec![host(
        "hv-a",
        format!(
            "max_watchers = 2\n{}{}",
            port_profile(""),
            vm("web-01", 256)
        ),
    )]);
    block_on(async {
        let open = || async {
            console(&cluster, "hv-a")
                .await
                .watch(proto::WatchRequest {})
                .await
        };
        let first = open().await.expect("the first stream");
        let _second = open().await.expect("the second stream");
        assert_status(
            open().await.map(|_| ()),
            tonic::Code::ResourceExhausted,
            &["hv-a already serves 2 Watch streams"],
        );
        drop(first);
        // The slot comes back once the agent sees the stream gone.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match open().await {
                Ok(_third) => break,
                Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the slot never came back"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(status) => panic!("{status:?}"),
            }
        }
    });
}

#[test]
fn fault_latency_is_clamped_and_the_state_dir_is_private() {
    let cluster = Cluster::start(vec![
        host(
            "hv-a",
            format!(
                "allow_fault_injection = true\n{}{}",
                port_profile(""),
                vm("web-01", 256)
            ),
        ),
        host("hv-b", port_profile("")),
    ]);
    let out = cluster.tern(&["fault", "hv-a", "port-profile", "--latency-ms", "86400000"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("latency_ms 86400000 clamped to 60000"),
        "{stderr}"
    );
    let status = cluster.status();
    let faults = &host_of(&status, "hv-a")["faults"];
    let latency = faults
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["feature"] == "port-profile")
        .map(|f| f["latency_ms"].clone());
    assert_eq!(latency, Some(serde_json::json!(60000)), "{faults}");

    use std::os::unix::fs::PermissionsExt;
    let dir = cluster.path().join("hv-a-state");
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "{} has mode {mode:o}", dir.display());
    // Its databases are its user's alone too, whatever the umask.
    for file in ["journal.db", "journal.db-wal", "audit.db", "audit.db-wal"] {
        let path = dir.join(file);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} has mode {mode:o}", path.display());
    }
}

#[test]
fn a_required_feature_left_out_of_the_mandatory_list_is_still_refused() {
    let cluster = two_hosts();
    let before = visible_state(&cluster);
    let mut spec = incoming_vm("db-09");
    spec.features.push(FeatureSpec {
        name: "vtpm".into(),
        driver: String::new(),
        required: true,
    });
    let mut c1 = tern::protocol::cookies::cookie1(
        "m-0000000000c6.1",
        "m-0000000000c6",
        "hv-a",
        &spec,
        Mode::Safe,
    );
    // A source that does not say vtpm is mandatory: hv-b works it out.
    c1.mandatory_features.clear();
    assert_status(
        call_prepare(&cluster, "hv-b", &c1),
        tonic::Code::InvalidArgument,
        &["mandatory feature \"vtpm\" is not known"],
    );
    assert_nothing_incoming(&cluster, "hv-b", "db-09");
    assert_eq!(before, visible_state(&cluster));
}
