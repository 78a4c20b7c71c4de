//! Real agents called by a gRPC client written by others: Python's grpcio,
//! grpcio-health-checking and grpcio-reflection (tests/python/tern_client.py)
//! in a venv under the target directory. Without python3 and pip these tests
//! print that they are skipped, unless TERN_REQUIRE_PYTHON=1 (CI).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

const CLIENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/tern_client.py");

/// The venv's python, made once per test run; `None` (skipped) without
/// python3 or pip, unless TERN_REQUIRE_PYTHON=1.
fn python() -> Option<&'static Path> {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let made = PYTHON.get_or_init(|| {
        let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("pyvenv");
        let python = venv.join("bin/python");
        let ready = || {
            Command::new(&python)
                .args(["-c", "import grpc, grpc_health.v1, grpc_reflection.v1alpha"])
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if ready() {
            return Ok(python);
        }
        let run = |program: &Path, args: &[&str]| -> Result<(), String> {
            let out = Command::new(program)
                .args(args)
                .output()
                .map_err(|e| format!("{}: {e}", program.display()))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "{} {args:?}: {}",
                    program.display(),
                    String::from_utf8_lossy(&out.stderr)
                ))
            }
        };
        run(
            Path::new("python3"),
            &["-m", "venv", venv.to_str().unwrap()],
        )?;
        run(
            &python,
            &[
                "-m",
                "pip",
                "install",
                "--quiet",
                "grpcio",
                "grpcio-health-checking",
                "grpcio-reflection",
            ],
        )?;
        if ready() {
            Ok(python)
        } else {
            Err("grpcio installed but does not import".into())
        }
    });
    match made {
        Ok(python) => Some(python),
        Err(e) if std::env::var("TERN_REQUIRE_PYTHON").as_deref() == Ok("1") => {
            panic!("TERN_REQUIRE_PYTHON=1 but no Python gRPC client: {e}")
        }
        Err(e) => {
            eprintln!("skipped: no Python gRPC client ({e})");
            None
        }
    }
}

/// `tern_client.py` against `host`'s agent, as `identity` with TLS: its
/// one line of answer.
fn client(
    python: &Path,
    cluster: &Cluster,
    host: &str,
    identity: Option<&Path>,
    args: &[&str],
) -> String {
    let mut command = Command::new(python);
    command.arg(CLIENT);
    if let Some(dir) = identity {
        command.arg("--tls").arg(dir);
    }
    let out = command
        .arg(target(cluster, host))
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        !stdout.is_empty(),
        "tern_client.py {args:?} said nothing: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// host:port, as a gRPC client other than Tern's names an agent.
fn target(cluster: &Cluster, host: &str) -> String {
    let address = cluster.address(host);
    address
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .to_string()
}

fn health(python: &Path, cluster: &Cluster, host: &str, service: &str) -> String {
    client(python, cluster, host, None, &["health", service])
}

#[test]
fn health_is_not_serving_while_recovery_holds_an_attempt_and_serving_once_it_settles() {
    let Some(python) = python() else { return };
    let gate = tempfile::tempdir().unwrap();
    let dir = gate.path().display();
    // The destination's rollback waits for the test to let it go: a
    // recovery that lasts exactly as long as the test wants.
    let hook = format!(
        "[features.gate]\ndriver = \"exec\"\ntimeout_ms = 120000\ncommand = [\"/bin/sh\", \"-c\", \"if [ $TERN_STAGE = rollback ]; then touch {dir}/rolling-back; while [ ! -e {dir}/release ]; do sleep 0.05; done; fi\"]\n\n"
    );
    let mut cluster = Cluster::start(vec![
        host(
            "hv-a",
            format!(
                "{hook}{}{}",
                "[[vm]]\nname = \"web-01\"\nmemory_mib = 4096\nvcpus = 1\nfeatures = [{ name = \"gate\", required = false }]\n\n",
                link(256)
            ),
        ),
        host("hv-b", hook.clone()),
    ]);
    // Nothing to recover: serving from the start.
    for host in ["hv-a", "hv-b"] {
        assert_eq!(health(python, &cluster, host, ""), "SERVING");
    }
    let id = cluster.start_migration("web-01", "hv-b", "fast");
    cluster.wait_phase(&id, "perform");
    // hv-b dies holding a prepared attempt; its restart must roll it back.
    cluster.kill("hv-b");
    cluster.start_agent("hv-b");
    wait_until(
        Duration::from_secs(20),
        "hv-b's recovery to run the rollback hook",
        || gate.path().join("rolling-back").exists(),
    );
    for service in ["", "tern.v1.Console", "tern.v1.Peer"] {
        assert_eq!(
            health(python, &cluster, "hv-b", service),
            "NOT_SERVING",
            "{service:?} while recovering"
        );
    }
    // hv-a, with nothing of its own to recover, serves throughout.
    assert_eq!(health(python, &cluster, "hv-a", ""), "SERVING");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(health(python, &cluster, "hv-b", ""), "NOT_SERVING", "held");
    std::fs::write(gate.path().join("release"), "").unwrap();
    wait_until(Duration::from_secs(20), "hv-b to serve", || {
        health(python, &cluster, "hv-b", "") == "SERVING"
    });
    for service in ["tern.v1.Console", "tern.v1.Peer"] {
        assert_eq!(health(python, &cluster, "hv-b", service), "SERVING");
    }
    assert!(
        health(python, &cluster, "hv-b", "tern.v1.Nothing").starts_with("error NOT_FOUND"),
        "an unknown service is not found"
    );
    let record = cluster.wait_outcome(&id);
    assert_eq!(record["running_on"], "hv-a", "{record}");
}

fn pair() -> Cluster {
    Cluster::start(vec![
        host(
            "hv-a",
            format!("{}{}{}", port_profile(""), vm("web-01", 256), link(1024)),
        ),
        host("hv-b", port_profile("")),
    ])
}

#[test]
fn reflection_lists_the_console_and_describes_its_methods_not_the_peer_service() {
    let Some(python) = python() else { return };
    let cluster = pair();
    let services = client(python, &cluster, "hv-a", None, &["services"]);
    let services: Vec<&str> = services.split(' ').collect();
    for listed in [
        "tern.v1.Console",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(services.contains(&listed), "{listed} in {services:?}");
    }
    assert!(!services.contains(&"tern.v1.Peer"), "{services:?}");
    let described: serde_json::Value = serde_json::from_str(&client(
        python,
        &cluster,
        "hv-a",
        None,
        &["describe", "tern.v1.Console.Watch"],
    ))
    .unwrap();
    assert_eq!(
        described,
        serde_json::json!({
            "method": "tern.v1.Console.Watch",
            "input": "tern.v1.WatchRequest",
            "output": "tern.v1.Event",
            "server_streaming": true,
        })
    );
}

#[test]
fn a_python_watch_stream_delivers_a_migration_started_with_the_cli() {
    let Some(python) = python() else { return };
    let cluster = pair();
    let mut watcher = Command::new(python)
        .arg(CLIENT)
        .arg(target(&cluster, "hv-a"))
        .arg("watch")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel::<serde_json::Value>();
    let stdout = watcher.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            let event = serde_json::from_str(&line).expect("a JSON event a line");
            if tx.send(event).is_err() {
                return;
            }
        }
    });
    let next = |until: Instant| rx.recv_timeout(until.saturating_duration_since(Instant::now()));
    let deadline = Instant::now() + Duration::from_secs(20);
    // The stream opens with a snapshot; migrate only once it is open.
    let first = next(deadline).expect("the watch stream's first event");
    assert!(first.get("snapshot").is_some(), "{first}");
    let id = cluster.start_migration("web-01", "hv-b", "safe");
    let mut outcomes = Vec::new();
    while let Ok(event) = next(deadline) {
        let Some(record) = event.get("migration") else {
            continue;
        };
        if record["id"] == id.as_str() {
            let outcome = record["outcome"]
                .as_str()
                .unwrap_or("OUTCOME_NONE")
                .to_string();
            let done = outcome != "OUTCOME_NONE";
            outcomes.push(outcome);
            if done {
                break;
            }
        }
    }
    let _ = watcher.kill();
    let _ = watcher.wait();
    assert_eq!(
        outcomes.last().map(String::as_str),
        Some("OUTCOME_SUCCEEDED"),
        "the migration's records as Python saw them: {outcomes:?}"
    );
    assert!(
        outcomes.len() > 1,
        "updates before the outcome: {outcomes:?}"
    );
    assert_eq!(cluster.wait_outcome(&id)["outcome"], "succeeded");
}

/// With mutual TLS any cluster certificate may ask for health (a load
/// balancer's probe), but reflection, which describes what a viewer may
/// call, asks for the viewer role like Console's reads.
#[test]
fn with_tls_health_answers_any_cluster_identity_and_reflection_needs_a_viewer() {
    let Some(python) = python() else { return };
    let cluster = Cluster::start_tls(vec![host("hv-a", ""), host("hv-b", "")]);
    let tls = cluster.tls.as_ref().unwrap();
    let agent = tls.identities.join("hv-b");
    let viewer = tls.issue("lb-probe", "viewer", &[]);
    for identity in [&agent, &viewer, &tls.admin] {
        assert_eq!(
            client(python, &cluster, "hv-a", Some(identity), &["health"]),
            "SERVING",
            "{}",
            identity.display()
        );
    }
    let refused = client(python, &cluster, "hv-a", Some(&agent), &["services"]);
    assert!(
        refused.starts_with("error PERMISSION_DENIED") && refused.contains("viewer"),
        "{refused}"
    );
    let listed = client(python, &cluster, "hv-a", Some(&viewer), &["services"]);
    assert!(listed.contains("tern.v1.Console"), "{listed}");
}

#[test]
fn an_agent_with_log_format_json_writes_json_objects_to_stderr() {
    let mut cluster = Cluster::start(vec![host("hv-a", "")]);
    cluster.kill("hv-a");
    let before = std::fs::read_to_string(&cluster.host("hv-a").log_path).unwrap();
    cluster.start_agent_under(
        "hv-a",
        &["/bin/sh", "-c", "exec \"$0\" \"$@\" --log-format json"],
    );
    let log = std::fs::read_to_string(&cluster.host("hv-a").log_path).unwrap();
    let lines: Vec<serde_json::Value> = log[before.len()..]
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    let listening = lines
        .iter()
        .find(|l| l["message"] == "agent listening")
        .unwrap_or_else(|| panic!("no 'agent listening' line: {lines:?}"));
    assert_eq!(listening["level"], "INFO", "{listening}");
    assert_eq!(listening["host"], "hv-a", "{listening}");
    assert!(listening["timestamp"].is_string(), "{listening}");
}
