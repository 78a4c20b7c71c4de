//! The console's agent clients against real agents serving real gRPC on
//! loopback. Each agent runs on its own tokio runtime in its own thread, so
//! killing one (dropping its runtime) closes its sockets the way a killed
//! process would, and it can be started again on the same address.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tern::agent;
use tern::config::{AgentConfig, Inventory};
use tern::console::client::{execute, spawn_watchers};
use tern::console::{Command, Msg};
use tern::proto;
use tern::proto::event::Kind;
use tern::protocol::Mode;
use tern::protocol::completion::{Completion, Postcopy, WhenSpent};
use tern::protocol::record::completion_from_record;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

#[path = "common/ports.rs"]
mod ports;

/// Every wait is bounded by this, with a message saying what never came.
const PATIENCE: Duration = Duration::from_secs(10);

struct Host {
    name: String,
    addr: SocketAddr,
    config_path: PathBuf,
    running: Option<Running>,
}

struct Running {
    kill: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

struct Cluster {
    _dir: tempfile::TempDir,
    inventory: Inventory,
    hosts: Vec<Host>,
}

/// What a host of a test cluster is for.
#[derive(Clone, Copy, PartialEq)]
enum Role {
    /// Runs web-01 when started.
    Source,
    /// Runs no VM when started.
    Spare,
    /// Listed in the inventory, never started: its address is port 1, which
    /// no test binds, so it refuses for the whole test.
    Down,
}

const VM: &str = "[[vm]]\nname = \"web-01\"\nmemory_mib = 64\nvcpus = 1\ndirty_rate_mib_s = 0\n\
                  features = [{ name = \"port-profile\", required = true }]\n";

impl Cluster {
    /// Write the inventory and agent configs for `hosts`; start none of them.
    fn new(hosts: &[(&str, Role)]) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let addrs: Vec<SocketAddr> = hosts
            .iter()
            .map(|(_, role)| match role {
                Role::Down => SocketAddr::from(([127, 0, 0, 1], 1)),
                _ => SocketAddr::from(([127, 0, 0, 1], ports::agent_port())),
            })
            .collect();
        let inventory_text: String = hosts
            .iter()
            .zip(&addrs)
            .map(|((name, _), addr)| {
                format!("[[host]]\nname = \"{name}\"\naddress = \"http://{addr}\"\n")
            })
            .collect();
        let inventory_path = dir.path().join("cluster.toml");
        std::fs::write(&inventory_path, inventory_text).expect("write the inventory");
        let inventory = Inventory::load(&inventory_path).expect("a valid inventory");
        let hosts = hosts
            .iter()
            .zip(addrs)
            .map(|((name, role), addr)| {
                let config = format!(
                    "name = \"{name}\"\nlisten = \"{addr}\"\nstate_dir = \"{name}\"\ninventory = \"cluster.toml\"\n\
                     heartbeat_interval_ms = 200\npeer_timeout_ms = 1500\n\
                     [hypervisor]\nkind = \"sim\"\nbandwidth_mib_s = 1024\n\
                     [features.port-profile]\nswitch = \"sim\"\n{}",
                    if *role == Role::Source { VM } else { "" }
                );
                let config_path = dir.path().join(format!("{name}.toml"));
                std::fs::write(&config_path, config).expect("write an agent config");
                Host {
                    name: name.to_string(),
                    addr,
                    config_path,
                    running: None,
                }
            })
            .collect();
        Cluster {
            _dir: dir,
            inventory,
            hosts,
        }
    }

    /// The agents as the console reaches them (plaintext on loopback).
    fn agents(&self) -> tern::cli::Cluster {
        tern::cli::Cluster {
            path: PathBuf::from("cluster.toml"),
            inventory: self.inventory.clone(),
            tls: None,
            answer_deadline: tern::cli::client::ANSWER_DEADLINE,
        }
    }

    fn host_mut(&mut self, name: &str) -> &mut Host {
        self.hosts
            .iter_mut()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name} in the test cluster"))
    }

    /// Start `name`'s agent on its address and return once it listens.
    fn start(&mut self, name: &str) {
        let inventory = self.inventory.clone();
        let host = self.host_mut(name);
        assert!(host.running.is_none(), "{name} is already running");
        let (addr, config_path) = (host.addr, host.config_path.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (kill, killed) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("an agent runtime");
            let stop = runtime.block_on(async move {
                let listener = bind(addr).await;
                let config = AgentConfig::load(&config_path).expect("a valid agent config");
                let agent = agent::Agent::open(&config, inventory)
                    .await
                    .expect("the agent opens");
                let (stop, stop_rx) = tokio::sync::mpsc::channel(1);
                tokio::spawn(agent::serve(agent, listener, stop_rx));
                let _ = ready_tx.send(());
                let _ = killed.await;
                stop
            });
            // Every task and socket of this agent goes at once, as when its
            // process is killed; `stop` outlives them so no graceful
            // shutdown starts first.
            drop(runtime);
            drop(stop);
        });
        // Blocking waits leave the test's runtime free to run the watchers.
        tokio::task::block_in_place(|| ready_rx.recv_timeout(PATIENCE))
            .unwrap_or_else(|_| panic!("agent {name} did not start"));
        self.host_mut(name).running = Some(Running { kill, thread });
    }

    fn kill(&mut self, name: &str) {
        let running = self
            .host_mut(name)
            .running
            .take()
            .unwrap_or_else(|| panic!("{name} is not running"));
        let _ = running.kill.send(());
        tokio::task::block_in_place(|| running.thread.join()).expect("the agent thread ends");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for host in &mut self.hosts {
            if let Some(running) = host.running.take() {
                let _ = running.kill.send(());
                let _ = running.thread.join();
            }
        }
    }
}

/// Bind `addr`, which a killed agent may have held a moment ago.
async fn bind(addr: SocketAddr) -> tokio::net::TcpListener {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => return listener,
            Err(e) if tokio::time::Instant::now() >= deadline => panic!("cannot bind {addr}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

async fn next(rx: &mut UnboundedReceiver<Msg>, what: &str) -> Msg {
    tokio::time::timeout(PATIENCE, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("no message within {PATIENCE:?} while waiting for {what}"))
        .unwrap_or_else(|| panic!("the channel closed while waiting for {what}"))
}

/// Skip messages until one `wanted` arrives; return it and what was skipped.
async fn wait_for(
    rx: &mut UnboundedReceiver<Msg>,
    what: &str,
    wanted: impl Fn(&Msg) -> bool,
) -> (Msg, Vec<Msg>) {
    let mut skipped = Vec::new();
    loop {
        let msg = next(rx, what).await;
        if wanted(&msg) {
            return (msg, skipped);
        }
        skipped.push(msg);
    }
}

/// Wait until each of `wanted` has matched some message, in any order.
async fn wait_all(rx: &mut UnboundedReceiver<Msg>, what: &str, wanted: &[&dyn Fn(&Msg) -> bool]) {
    let mut seen = vec![false; wanted.len()];
    while seen.contains(&false) {
        let msg = next(rx, what).await;
        for (seen, wanted) in seen.iter_mut().zip(wanted) {
            *seen |= wanted(&msg);
        }
    }
}

fn is_connected(msg: &Msg, name: &str) -> bool {
    matches!(msg, Msg::Connected { host } if host == name)
}

fn is_lost(msg: &Msg, name: &str) -> bool {
    matches!(msg, Msg::Lost { host, .. } if host == name)
}

/// The snapshot an event carries, if it is `name`'s.
fn snapshot_of<'a>(msg: &'a Msg, name: &str) -> Option<&'a proto::Snapshot> {
    match msg {
        Msg::Event(proto::Event {
            host,
            kind: Some(Kind::Snapshot(snapshot)),
        }) if host == name => Some(snapshot),
        _ => None,
    }
}

/// The next message must be `name`'s snapshot, naming the host and web-01.
async fn expect_snapshot(rx: &mut UnboundedReceiver<Msg>, name: &str) {
    let msg = next(rx, &format!("{name}'s snapshot")).await;
    let snapshot = snapshot_of(&msg, name)
        .unwrap_or_else(|| panic!("expected {name}'s snapshot, got {msg:?}"));
    assert_eq!(snapshot.host.as_ref().map(|h| h.name.as_str()), Some(name));
    assert!(
        snapshot.vms.iter().any(|vm| vm.name == "web-01"),
        "{name}'s snapshot lacks web-01: {snapshot:?}"
    );
}

fn unix_ms() -> u64 {
    tern::agent::now_ms()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_agent_is_reported_once_per_outage_and_its_return_brings_a_fresh_snapshot() {
    let mut cluster = Cluster::new(&[("hv-a", Role::Source)]);
    let (tx, mut rx) = unbounded_channel();
    let first_try = unix_ms();
    let _watchers = spawn_watchers(&cluster.agents(), tx);

    // Not started yet: lost since the watcher first tried, said once.
    match next(&mut rx, "hv-a lost before it started").await {
        Msg::Lost {
            host,
            since_ms,
            error,
        } => {
            assert_eq!(host, "hv-a");
            assert!(since_ms >= first_try, "{since_ms} < {first_try}");
            assert!(
                error.starts_with("agent hv-a at http://") && error.contains("unreachable"),
                "{error}"
            );
        }
        other => panic!("expected hv-a lost, got {other:?}"),
    }
    cluster.start("hv-a");
    let (_, skipped) = wait_for(&mut rx, "hv-a connected", |m| is_connected(m, "hv-a")).await;
    assert!(
        skipped.iter().all(|m| !is_lost(m, "hv-a")),
        "one Lost per outage, got more: {skipped:?}"
    );
    expect_snapshot(&mut rx, "hv-a").await;

    // Killed: one Lost, however many reconnects fail meanwhile.
    let killed_at = unix_ms();
    cluster.kill("hv-a");
    let (lost, _) = wait_for(&mut rx, "hv-a lost after the kill", |m| is_lost(m, "hv-a")).await;
    let Msg::Lost { since_ms, .. } = lost else {
        unreachable!()
    };
    assert!(since_ms >= killed_at, "{since_ms} < {killed_at}");
    // Long enough for two reconnects to fail (after 200 and 400 ms).
    tokio::time::sleep(Duration::from_millis(700)).await;

    // Back on the same address: connected again, and a new snapshot.
    cluster.start("hv-a");
    let (_, skipped) = wait_for(&mut rx, "hv-a connected again", |m| is_connected(m, "hv-a")).await;
    assert!(
        skipped.iter().all(|m| !is_lost(m, "hv-a")),
        "one Lost per outage, got more: {skipped:?}"
    );
    expect_snapshot(&mut rx, "hv-a").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_reach_the_agents_and_refusals_come_back_readable() {
    let mut cluster = Cluster::new(&[
        ("hv-a", Role::Source),
        ("hv-b", Role::Spare),
        ("hv-c", Role::Down),
    ]);
    cluster.start("hv-a");
    cluster.start("hv-b");
    let (tx, mut rx) = unbounded_channel();
    let _watchers = spawn_watchers(&cluster.agents(), tx);
    wait_all(
        &mut rx,
        "the snapshots of hv-a and hv-b",
        &[&|m: &Msg| snapshot_of(m, "hv-a").is_some(), &|m: &Msg| {
            snapshot_of(m, "hv-b").is_some()
        }],
    )
    .await;
    let inventory = &cluster.agents();

    // A policy other than safe's default, sent whole: the record says it.
    let policy = Completion {
        timeout_per_gib_s: 40,
        postcopy: Postcopy::Never,
        downtime_limit_ms: 0,
        when_spent: WhenSpent::Continue,
    };
    let start = Command::Start {
        host: "hv-a".into(),
        vm: "web-01".into(),
        destination: "hv-b".into(),
        mode: Mode::Safe,
        completion: policy,
    };
    let Msg::Done { what, result } = execute(inventory, start).await else {
        panic!("execute answers Done")
    };
    assert_eq!(
        what,
        "migrate web-01 to hv-b (safe; post-copy never, 40 s/GiB, then continue)"
    );
    let started = result.unwrap_or_else(|e| panic!("the migration did not start: {e}"));
    assert!(
        started.ends_with(": web-01 hv-a -> hv-b (safe) started"),
        "{started}"
    );
    let id = started
        .strip_prefix("migration ")
        .and_then(|rest| rest.split(':').next())
        .unwrap_or_else(|| panic!("no migration id in {started:?}"))
        .to_string();
    let (recorded, _) = wait_for(&mut rx, &format!("a migration event for {id}"), |m| {
        matches!(m, Msg::Event(proto::Event { host, kind: Some(Kind::Migration(record)) })
            if host == "hv-a" && record.id == id && record.vm == "web-01")
    })
    .await;
    let Msg::Event(proto::Event {
        kind: Some(Kind::Migration(record)),
        ..
    }) = recorded
    else {
        unreachable!("matched above")
    };
    assert_eq!(
        completion_from_record(record.completion.as_ref()),
        policy,
        "the agent runs the policy the console sent"
    );

    let done = |msg: Msg| match msg {
        Msg::Done { what, result } => (what, result),
        other => panic!("execute answers Done, got {other:?}"),
    };
    let abort = Command::Abort {
        host: "hv-a".into(),
        id: "m-00000000dead".into(),
    };
    assert_eq!(
        done(execute(inventory, abort).await),
        (
            "abort m-00000000dead".into(),
            Err("no migration m-00000000dead on hv-a".into())
        )
    );
    let retry = Command::Retry {
        host: "hv-z".into(),
        id: id.clone(),
        destination: None,
        mode: Mode::Fast,
        completion: Completion::for_mode(Mode::Fast),
    };
    assert_eq!(
        done(execute(inventory, retry).await).1,
        Err("no host named hv-z in the inventory; hosts: hv-a, hv-b, hv-c".into())
    );
    let rollback = Command::Rollback {
        host: "hv-c".into(),
        id: id.clone(),
    };
    let (what, result) = done(execute(inventory, rollback).await);
    assert_eq!(what, format!("rollback {id} on hv-c"));
    let error = result.expect_err("hv-c does not run");
    assert!(
        error.starts_with("agent hv-c at http://") && error.contains("is unreachable"),
        "{error}"
    );
    assert_eq!(
        done(execute(inventory, Command::Quit).await),
        ("quit".into(), Ok("quit".into()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_end_when_the_console_stops_listening() {
    let mut cluster = Cluster::new(&[("hv-a", Role::Source), ("hv-c", Role::Down)]);
    cluster.start("hv-a");
    let (tx, mut rx) = unbounded_channel();
    let watchers = spawn_watchers(&cluster.agents(), tx);
    // One watcher following a live stream, one waiting to retry.
    wait_all(
        &mut rx,
        "hv-a's snapshot and hv-c lost",
        &[&|m: &Msg| snapshot_of(m, "hv-a").is_some(), &|m: &Msg| {
            is_lost(m, "hv-c")
        }],
    )
    .await;
    drop(rx);
    for watcher in watchers {
        tokio::time::timeout(PATIENCE, watcher)
            .await
            .expect("a watcher went on after the console stopped listening")
            .expect("a watcher panicked");
    }
}

/// Route the in-process agents' lines to their own log files, as `tern
/// agent` and `tern demo` do (once for the whole test binary).
fn agent_log_files() {
    use tracing_subscriber::layer::SubscriberExt;
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let subscriber = tracing_subscriber::registry().with(tern::agent::logs::layer());
        let _ = tracing::subscriber::set_global_default(subscriber);
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_detail_reads_both_hosts_logs_merged_and_names_a_host_that_is_gone() {
    agent_log_files();
    let mut cluster = Cluster::new(&[("hv-a", Role::Source), ("hv-b", Role::Spare)]);
    cluster.start("hv-a");
    cluster.start("hv-b");
    let agents = cluster.agents();
    let start = Command::Start {
        host: "hv-a".into(),
        vm: "web-01".into(),
        destination: "hv-b".into(),
        mode: Mode::Safe,
        completion: Completion::default(),
    };
    let Msg::Done { result, .. } = execute(&agents, start).await else {
        panic!("execute answers Done")
    };
    let started = result.expect("the migration starts");
    let id = started
        .split_whitespace()
        .find(|w| w.starts_with("m-"))
        .unwrap_or_else(|| panic!("an id in {started:?}"))
        .trim_end_matches([':', ',', ')'])
        .to_string();
    let load = || Command::LoadLogs {
        id: id.clone(),
        hosts: vec!["hv-a".into(), "hv-b".into()],
    };
    // Both hosts' lines, merged by time, once the attempt has ended.
    let deadline = std::time::Instant::now() + PATIENCE;
    let lines = loop {
        let Msg::Logs {
            id: got,
            lines,
            missing,
        } = execute(&agents, load()).await
        else {
            panic!("LoadLogs answers Logs")
        };
        assert_eq!(got, id);
        assert!(missing.is_empty(), "{missing:?}");
        if lines.iter().any(|l| l.text.contains("succeeded")) {
            break lines;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no outcome in the logs: {lines:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(lines.iter().any(|l| l.host == "hv-a"), "{lines:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.host == "hv-b" && l.text.contains("committed on hv-b")),
        "{lines:?}"
    );
    assert!(lines.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
    assert!(lines.iter().all(|l| l.attempt_id == format!("{id}.1")));

    // hv-b gone: it is named, hv-a's lines still come.
    cluster.kill("hv-b");
    let Msg::Logs { lines, missing, .. } = execute(&agents, load()).await else {
        panic!("LoadLogs answers Logs")
    };
    assert_eq!(missing.len(), 1, "{missing:?}");
    assert!(missing[0].contains("hv-b"), "{missing:?}");
    assert!(!lines.is_empty());
    assert!(lines.iter().all(|l| l.host == "hv-a"), "{lines:?}");
}
