//! Evacuations through real agents: the source agent moves every VM off its
//! host onto the others, retries what a broken switch refused elsewhere,
//! stays within every host's migration limits, survives its own restart,
//! and obeys an operator's pause, resume and cancel.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::Value;
use tern::host::evacuation::job::{Evacuation, JobState, VmState};
use tern::proto;
use tern::proto::console_client::ConsoleClient;
use tern::protocol::Outcome;
use tonic::transport::Channel;

/// Every wait in this file is bounded by this.
const PATIENCE: Duration = Duration::from_secs(30);

/// `[hypervisor]`: a simulated link of `bandwidth_mib_s`, with simulated
/// time running `speed` times faster than real time, so a VM of N MiB takes
/// about N / bandwidth / speed seconds to move.
fn sim(bandwidth_mib_s: u64, speed: f64) -> String {
    format!(
        "[hypervisor]\nkind = \"sim\"\nbandwidth_mib_s = {bandwidth_mib_s}\nspeed = {speed:?}\n\n"
    )
}

/// A `[[vm]]` of a given size with a required port-profile.
fn sized_vm(name: &str, memory_mib: u64, vcpus: u32) -> String {
    format!(
        "[[vm]]\nname = \"{name}\"\nmemory_mib = {memory_mib}\nvcpus = {vcpus}\ndirty_rate_mib_s = 10\nfeatures = [{{ name = \"port-profile\", required = true }}]\n\n"
    )
}

/// `count` VMs named `vm-00`…, all `memory_mib` large.
fn vms(count: usize, memory_mib: u64) -> (String, Vec<String>) {
    let names: Vec<String> = (0..count).map(|i| format!("vm-{i:02}")).collect();
    let config = names.iter().map(|n| sized_vm(n, memory_mib, 1)).collect();
    (config, names)
}

/// A host's config: its migration limits (top-level keys, so first), then
/// the rest.
fn limited(max_outgoing: u32, max_incoming: u32, rest: &str) -> String {
    format!("max_outgoing = {max_outgoing}\nmax_incoming = {max_incoming}\n{rest}")
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

// ---- Talking to agents directly ------------------------------------------

async fn console(cluster: &Cluster, host: &str) -> ConsoleClient<Channel> {
    let address = cluster.address(host);
    ConsoleClient::connect(address.clone())
        .await
        .unwrap_or_else(|e| panic!("cannot reach agent {host} at {address}: {e}"))
}

/// An evacuation as its agent reports it (GetEvacuation).
fn evacuation(cluster: &Cluster, host: &str, id: &str) -> Evacuation {
    let record = block_on(async {
        console(cluster, host)
            .await
            .get_evacuation(proto::EvacuationRef { id: id.to_string() })
            .await
    })
    .unwrap_or_else(|e| panic!("GetEvacuation {id} on {host}: {e}"))
    .into_inner();
    Evacuation::from(&record)
}

/// Poll an evacuation until `done` holds; the last report.
fn wait_evacuation(
    cluster: &Cluster,
    host: &str,
    id: &str,
    what: &str,
    mut done: impl FnMut(&Evacuation) -> bool,
) -> Evacuation {
    let mut last = None;
    wait_until(PATIENCE, &format!("evacuation {id}: {what}"), || {
        let job = evacuation(cluster, host, id);
        let ok = done(&job);
        last = Some(job);
        ok
    });
    last.unwrap()
}

fn wait_evacuation_over(cluster: &Cluster, host: &str, id: &str) -> Evacuation {
    wait_evacuation(cluster, host, id, "to end", |j| j.state.is_over())
}

// ---- Driving the CLI -------------------------------------------------------

/// `tern ARGS`: exit code, stdout, stderr.
fn run(cluster: &Cluster, args: &[&str]) -> (i32, String, String) {
    let out = cluster.tern(args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `tern evacuate ARGS --json` and wait for it: exit code, the evacuation it
/// printed, and its progress lines (stderr).
fn evacuate(cluster: &Cluster, args: &[&str]) -> (i32, Evacuation, String) {
    let mut full = vec!["evacuate"];
    full.extend_from_slice(args);
    full.push("--json");
    let (code, stdout, stderr) = run(cluster, &full);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| {
            panic!(
                "tern {full:?} printed no JSON (exit {code})\nstdout: {stdout}\nstderr: {stderr}"
            )
        });
    let job: Evacuation = serde_json::from_str(line).unwrap_or_else(|e| {
        panic!("tern {full:?} printed an evacuation that does not parse: {e}\n{line}")
    });
    (code, job, stderr)
}

/// Start an evacuation of `host` without waiting; its id.
fn start_evacuation(cluster: &Cluster, host: &str, extra: &[&str]) -> String {
    let mut args = vec![host, "--no-wait"];
    args.extend_from_slice(extra);
    let (code, job, stderr) = evacuate(cluster, &args);
    assert_eq!(code, 0, "evacuate {host} --no-wait: {stderr}");
    assert_eq!(job.host, host);
    job.id
}

/// Every VM's guests, host by host, as `tern status --json` reports them.
fn placements(status: &Value) -> BTreeMap<String, Vec<(String, String)>> {
    let mut out: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for vm in status["vms"].as_array().unwrap() {
        out.entry(vm["name"].as_str().unwrap().to_string())
            .or_default()
            .push((
                vm["host"].as_str().unwrap().to_string(),
                vm["state"].as_str().unwrap().to_string(),
            ));
    }
    out
}

/// Each of `names` runs on exactly one host, and nothing else of it exists
/// anywhere; where each runs.
fn assert_each_runs_once(status: &Value, names: &[String]) -> BTreeMap<String, String> {
    let placed = placements(status);
    names
        .iter()
        .map(|name| {
            let guests = placed.get(name).cloned().unwrap_or_default();
            assert!(
                guests.len() == 1 && guests[0].1 == "running",
                "{name} should run on exactly one host and exist nowhere else: {guests:?}"
            );
            (name.clone(), guests[0].0.clone())
        })
        .collect()
}

fn migration_record<'a>(status: &'a Value, id: &str) -> &'a Value {
    status["migrations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == id)
        .unwrap_or_else(|| panic!("migration {id} not in status"))
}

fn migrations_from(status: &Value, source: &str) -> usize {
    status["migrations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["source"] == source)
        .count()
}

fn vm_of<'a>(job: &'a Evacuation, name: &str) -> &'a tern::host::evacuation::job::JobVm {
    job.vms
        .iter()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("{name} not in evacuation {}", job.id))
}

// ---- 1 and 2: a broken switch on one of four destinations -------------------

const HEALTHY: [&str; 3] = ["hv-b", "hv-c", "hv-d"];
const BROKEN: &str = "hv-e";

/// hv-a runs 30 VMs of mixed sizes; hv-b, hv-c and hv-d are healthy; hv-e's
/// switch refuses ASSOCIATE (the port-profile's finish stage).
fn broken_switch_cluster() -> (Cluster, Vec<String>) {
    const SIZES: [(u64, u32); 6] = [(1024, 4), (512, 2), (256, 2), (128, 1), (768, 3), (64, 1)];
    let names: Vec<String> = (0..30).map(|i| format!("vm-{i:02}")).collect();
    let vm_config: String = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let (memory, vcpus) = SIZES[i % SIZES.len()];
            sized_vm(n, memory, vcpus)
        })
        .collect();
    // Fast links: a 1 GiB VM moves in about 25 ms.
    let link = sim(4096, 10.0);
    let mut hosts = vec![host(
        "hv-a",
        limited(4, 2, &format!("{link}{}{vm_config}", port_profile(""))),
    )];
    for name in HEALTHY {
        hosts.push(host(name, format!("{link}{}", port_profile(""))));
    }
    hosts.push(host(
        BROKEN,
        format!("{link}{}", port_profile("fail = [\"finish\"]")),
    ));
    (Cluster::start(hosts), names)
}

#[test]
fn safe_evacuation_retries_vms_the_broken_switch_refused_on_healthy_hosts() {
    let (cluster, names) = broken_switch_cluster();
    let (code, job, progress) = evacuate(&cluster, &["hv-a", "--mode", "safe"]);
    assert_eq!(code, 0, "every VM moved cleanly, so exit 0\n{progress}");
    assert_eq!(job.state, JobState::Done, "{job:?}");
    let c = job.counts();
    assert_eq!(
        (c.total, c.moved, c.failed),
        (30, 30, 0),
        "30 moved, 0 failed: {job:?}"
    );

    let status = cluster.status();
    let running_on = assert_each_runs_once(&status, &names);
    for (name, host) in &running_on {
        assert!(
            HEALTHY.contains(&host.as_str()),
            "{name} runs on {host}, not on a healthy host"
        );
        let vm = vm_of(&job, name);
        assert_eq!(&vm.host, host, "the evacuation says {name} is elsewhere");
        assert!(!vm.degraded, "safe mode never degrades: {vm:?}");
        let record = migration_record(&status, vm.migration_id.as_deref().unwrap());
        assert_eq!(record["outcome"], "succeeded", "{record}");
        assert_eq!(record["attempt"], vm.attempts.len(), "{record}");
    }

    // The broken host keeps nothing of the VMs it refused.
    let broken = host_of(&status, BROKEN);
    let left: Vec<&Value> = broken["feature_state"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| names.iter().any(|n| s["vm"] == n.as_str()))
        .collect();
    assert!(left.is_empty(), "{BROKEN} kept feature state: {left:?}");
    assert_eq!(
        broken["pending_rollbacks"],
        Value::Array(vec![]),
        "{BROKEN} has pending rollbacks"
    );

    // Every VM tried on the broken host failed there in port-profile, and
    // then moved on its next attempt elsewhere.
    let tried: Vec<_> = job
        .vms
        .iter()
        .filter(|v| v.attempts.iter().any(|a| a.destination == BROKEN))
        .collect();
    assert!(
        !tried.is_empty(),
        "placement never tried {BROKEN}: the test proves nothing ({job:?})"
    );
    for vm in &job.vms {
        let history: Vec<String> = vm
            .attempts
            .iter()
            .map(|a| format!("{}:{:?}", a.destination, a.outcome))
            .collect();
        if tried.iter().any(|t| t.name == vm.name) {
            assert_eq!(vm.attempts.len(), 2, "{}: {history:?}", vm.name);
            let (failed, moved) = (&vm.attempts[0], &vm.attempts[1]);
            assert_eq!(failed.destination, BROKEN, "{}: {history:?}", vm.name);
            assert_eq!(
                failed.outcome,
                Some(Outcome::Failed),
                "{}: {failed:?}",
                vm.name
            );
            assert_eq!(
                failed.failed_feature.as_deref(),
                Some("port-profile"),
                "{}: {failed:?}",
                vm.name
            );
            // The report says why, structured: a feature stage on BROKEN.
            let cause = failed.cause.as_ref().expect("a failed attempt has a cause");
            assert_eq!(cause.kind, tern::protocol::Cause::Feature, "{cause:?}");
            assert_eq!(cause.host, BROKEN, "{cause:?}");
            assert_eq!(cause.feature.as_deref(), Some("port-profile"), "{cause:?}");
            assert_eq!(
                cause.stage,
                Some(tern::protocol::Stage::Finish),
                "{cause:?}"
            );
            assert!(!failed.busy, "{}: {failed:?}", vm.name);
            assert!(
                failed
                    .error
                    .as_deref()
                    .is_some_and(|e| e.contains("ASSOCIATE")),
                "{}: the failed attempt should say ASSOCIATE failed: {failed:?}",
                vm.name
            );
            assert_eq!(
                moved.outcome,
                Some(Outcome::Succeeded),
                "{}: {history:?}",
                vm.name
            );
            assert!(HEALTHY.contains(&moved.destination.as_str()), "{history:?}");
            assert_eq!(
                moved.attempt,
                failed.attempt + 1,
                "{}: {history:?}",
                vm.name
            );
        } else {
            assert_eq!(vm.attempts.len(), 1, "{}: {history:?}", vm.name);
            assert_eq!(vm.attempts[0].outcome, Some(Outcome::Succeeded));
        }
    }
    assert!(
        progress.contains(&format!("(feature·{BROKEN} port-profile ✗ finish)")),
        "the progress lines should name the failed feature:\n{progress}"
    );

    assert_eq!(
        host_of(&status, "hv-a")["draining"],
        true,
        "the evacuated host should stay draining"
    );
    assert!(
        placements(&status)
            .values()
            .flatten()
            .all(|(h, _)| h != "hv-a"),
        "hv-a still holds guests"
    );
}

#[test]
fn fast_evacuation_reports_the_vms_on_the_broken_switch_degraded() {
    let (cluster, names) = broken_switch_cluster();
    let (code, job, progress) = evacuate(&cluster, &["hv-a", "--mode", "fast"]);
    assert_eq!(code, 2, "some VMs moved degraded, so exit 2\n{progress}");
    assert_eq!(job.state, JobState::Done, "{job:?}");
    let c = job.counts();
    assert_eq!((c.total, c.moved, c.failed), (30, 30, 0), "{job:?}");

    let status = cluster.status();
    let running_on = assert_each_runs_once(&status, &names);
    let degraded: Vec<&String> = running_on
        .iter()
        .filter(|(_, h)| h.as_str() == BROKEN)
        .map(|(n, _)| n)
        .collect();
    assert!(
        !degraded.is_empty(),
        "placement never used {BROKEN}: the test proves nothing ({job:?})"
    );
    for (name, host) in &running_on {
        let vm = vm_of(&job, name);
        assert_eq!(&vm.host, host, "{vm:?}");
        // Fast mode: one attempt each, wherever it went.
        assert_eq!(vm.attempts.len(), 1, "{vm:?}");
        let attempt = &vm.attempts[0];
        let record = migration_record(&status, vm.migration_id.as_deref().unwrap());
        if host == BROKEN {
            assert!(vm.degraded, "{name} on {BROKEN} should be degraded: {vm:?}");
            assert_eq!(attempt.outcome, Some(Outcome::Degraded), "{vm:?}");
            assert_eq!(attempt.failed_feature.as_deref(), Some("port-profile"));
            assert_eq!(record["outcome"], "degraded", "{record}");
            assert!(
                progress.contains(&format!(
                    "{name} degraded on {BROKEN} (feature·{BROKEN} port-profile ✗ finish)"
                )),
                "the CLI should list {name} as degraded:\n{progress}"
            );
        } else {
            assert!(!vm.degraded, "{vm:?}");
            assert_eq!(attempt.outcome, Some(Outcome::Succeeded), "{vm:?}");
            assert_eq!(record["outcome"], "succeeded", "{record}");
        }
    }
    assert_eq!(host_of(&status, "hv-a")["draining"], true);
}

// ---- 3: limits, from the event streams ---------------------------------------

/// Every event of some agents' Watch streams, in each agent's order, from a
/// thread of its own.
struct EventLog {
    events: Arc<Mutex<Vec<proto::Event>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EventLog {
    /// Subscribe to each host's Watch stream; returns once every stream
    /// has delivered its snapshot.
    fn start(cluster: &Cluster, hosts: &[&str]) -> EventLog {
        let addresses: Vec<String> = hosts.iter().map(|h| cluster.address(h)).collect();
        let events = Arc::new(Mutex::new(Vec::new()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let sink = events.clone();
        let thread = std::thread::spawn(move || {
            block_on(async move {
                for address in addresses {
                    let sink = sink.clone();
                    tokio::spawn(async move {
                        let Ok(mut client) = ConsoleClient::connect(address).await else {
                            return;
                        };
                        let Ok(reply) = client.watch(proto::WatchRequest {}).await else {
                            return;
                        };
                        let mut stream = reply.into_inner();
                        while let Ok(Some(event)) = stream.message().await {
                            sink.lock().unwrap().push(event);
                        }
                    });
                }
                let _ = stopped.await;
            })
        });
        let log = EventLog {
            events,
            stop: Some(stop),
            thread: Some(thread),
        };
        wait_until(
            Duration::from_secs(10),
            "every Watch stream's snapshot",
            || {
                let events = log.events.lock().unwrap();
                hosts.iter().all(|h| {
                    events.iter().any(|e| {
                        e.host == *h && matches!(e.kind, Some(proto::event::Kind::Snapshot(_)))
                    })
                })
            },
        );
        log
    }

    fn stop(mut self) -> Vec<proto::Event> {
        let _ = self.stop.take().unwrap().send(());
        self.thread.take().unwrap().join().unwrap();
        std::mem::take(&mut *self.events.lock().unwrap())
    }
}

/// Whether a migration record holds one of its hosts' slots: until its
/// guest's fate is decided (Confirm starts, or it ends or is unresolved).
fn holds_a_slot(m: &proto::MigrationRecord) -> bool {
    m.outcome == proto::Outcome::None as i32
        && m.phases.iter().any(|p| {
            p.phase == proto::Phase::Confirm as i32 && p.status == proto::StepStatus::Pending as i32
        })
}

/// The most migrations in flight at once, from one source agent's stream of
/// migration records ([`holds_a_slot`]): overall, and per destination.
/// Attempts refused as busy at Prepare are left out: the destination never
/// received them.
fn peak_concurrency(events: &[proto::Event], source: &str) -> (usize, BTreeMap<String, usize>) {
    use proto::event::Kind;
    let refused: HashSet<(String, u32)> = events
        .iter()
        .filter(|e| e.host == source)
        .filter_map(|e| match &e.kind {
            Some(Kind::Migration(m)) if m.error.contains("destination busy") => {
                Some((m.id.clone(), m.attempt))
            }
            _ => None,
        })
        .collect();
    let mut in_flight: HashMap<(String, u32), String> = HashMap::new();
    let mut peak_out = 0;
    let mut peak_in: BTreeMap<String, usize> = BTreeMap::new();
    for event in events.iter().filter(|e| e.host == source) {
        match &event.kind {
            Some(Kind::Snapshot(s)) => {
                in_flight = s
                    .migrations
                    .iter()
                    .filter(|m| holds_a_slot(m) && m.source == source)
                    .map(|m| ((m.id.clone(), m.attempt), m.destination.clone()))
                    .collect();
            }
            Some(Kind::Migration(m)) if m.source == source => {
                let key = (m.id.clone(), m.attempt);
                if holds_a_slot(m) && !refused.contains(&key) {
                    in_flight.insert(key, m.destination.clone());
                } else {
                    in_flight.remove(&key);
                }
            }
            _ => continue,
        }
        peak_out = peak_out.max(in_flight.len());
        let mut per_destination: HashMap<&str, usize> = HashMap::new();
        for destination in in_flight.values() {
            *per_destination.entry(destination).or_default() += 1;
        }
        for (destination, n) in per_destination {
            let peak = peak_in.entry(destination.to_string()).or_default();
            *peak = (*peak).max(n);
        }
    }
    (peak_out, peak_in)
}

/// The most guests a host held in the `incoming` state at once, from its
/// own stream (snapshot, then VM events).
fn peak_incoming_guests(events: &[proto::Event], host: &str) -> usize {
    use proto::event::Kind;
    let incoming = proto::GuestState::Incoming as i32;
    let mut arriving: HashSet<String> = HashSet::new();
    let mut peak = 0;
    for event in events.iter().filter(|e| e.host == host) {
        match &event.kind {
            Some(Kind::Snapshot(s)) => {
                arriving = s
                    .vms
                    .iter()
                    .filter(|v| v.state == incoming)
                    .map(|v| v.name.clone())
                    .collect();
            }
            Some(Kind::Vm(v)) if v.state == incoming => {
                arriving.insert(v.name.clone());
            }
            Some(Kind::Vm(v)) => {
                arriving.remove(&v.name);
            }
            Some(Kind::VmRemoved(name)) => {
                arriving.remove(name);
            }
            _ => continue,
        }
        peak = peak.max(arriving.len());
    }
    peak
}

#[test]
fn evacuation_stays_within_max_outgoing_and_max_incoming() {
    const MAX_OUTGOING: usize = 3;
    const MAX_INCOMING: usize = 2;
    let (vm_config, names) = vms(12, 256);
    // About a quarter of a second per VM: long enough to overlap.
    let link = sim(1024, 1.0);
    // hv-c is three-quarters full, so placement prefers the empty hv-b
    // even with a migration arriving there: only hv-b's max_incoming sends
    // the third VM in flight to hv-c.
    let load: String = (0..3)
        .map(|i| sized_vm(&format!("load-{i}"), 4096, 8))
        .collect();
    let cluster = Cluster::start(vec![
        host(
            "hv-a",
            limited(
                MAX_OUTGOING as u32,
                2,
                &format!("{link}{}{vm_config}", port_profile("")),
            ),
        ),
        host(
            "hv-b",
            limited(
                2,
                MAX_INCOMING as u32,
                &format!("{link}{}", port_profile("")),
            ),
        ),
        host(
            "hv-c",
            limited(
                2,
                MAX_INCOMING as u32,
                &format!(
                    "{}\nmemory_mib = 16384\nvcpus = 32\n\n{}{load}",
                    link.trim_end(),
                    port_profile("")
                ),
            ),
        ),
    ]);
    let hosts = ["hv-a", "hv-b", "hv-c"];
    let log = EventLog::start(&cluster, &hosts);
    // More at once than hv-a may source: its max_outgoing must hold.
    let (code, job, progress) = evacuate(&cluster, &["hv-a", "--concurrency", "4"]);
    let events = log.stop();
    assert_eq!(code, 0, "{progress}");
    assert_eq!(job.counts().moved, names.len(), "{job:?}");
    assert_each_runs_once(&cluster.status(), &names);

    let (peak_out, peak_in) = peak_concurrency(&events, "hv-a");
    assert!(
        peak_out <= MAX_OUTGOING,
        "hv-a sourced {peak_out} migrations at once (max_outgoing = {MAX_OUTGOING})"
    );
    assert_eq!(
        peak_out, MAX_OUTGOING,
        "the outgoing limit was never reached: the check proves nothing"
    );
    for (destination, peak) in &peak_in {
        assert!(
            *peak <= MAX_INCOMING,
            "{destination} received {peak} migrations at once (max_incoming = {MAX_INCOMING}): {peak_in:?}"
        );
    }
    assert!(
        peak_in.values().any(|p| *p == MAX_INCOMING),
        "no destination reached its incoming limit: the check proves nothing ({peak_in:?})"
    );

    // What the hosts say of themselves agrees.
    for event in &events {
        if let Some(proto::event::Kind::HostChanged(h)) = &event.kind {
            assert!(
                h.outgoing <= h.max_outgoing && h.incoming <= h.max_incoming,
                "{} reported {} out / {} in (limits {} / {})",
                h.name,
                h.outgoing,
                h.incoming,
                h.max_outgoing,
                h.max_incoming
            );
        }
    }
    for destination in ["hv-b", "hv-c"] {
        let peak = peak_incoming_guests(&events, destination);
        assert!(
            peak <= MAX_INCOMING,
            "{destination} held {peak} incoming guests at once"
        );
    }
}

/// Prepares that arrive together (the test speaks the Peer protocol as many
/// sources at once): exactly max_incoming are accepted, and the rest are
/// refused as ResourceExhausted with "destination busy", the mark an
/// evacuation waits out and retries on the same host without counting.
#[test]
fn simultaneous_prepares_never_exceed_max_incoming() {
    use prost::Message;
    use tern::proto::peer_client::PeerClient;
    use tern::protocol::{FeatureSpec, Mode, VmSpec};

    const MAX_INCOMING: usize = 2;
    const PREPARES: usize = 16;
    let cluster = Cluster::start(vec![
        host("hv-a", port_profile("")),
        host("hv-b", limited(2, MAX_INCOMING as u32, &port_profile(""))),
    ]);
    let address = cluster.address("hv-b");
    let replies: Vec<Result<(), tonic::Status>> = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let channel = tonic::transport::Endpoint::new(address)
                .unwrap()
                .connect()
                .await
                .expect("connect to hv-b");
            let calls = (0..PREPARES).map(|i| {
                let mut client = PeerClient::new(channel.clone());
                let vm = VmSpec {
                    name: format!("ghost-{i:02}"),
                    memory_mib: 64,
                    vcpus: 1,
                    dirty_rate_mib_s: 0,
                    features: vec![FeatureSpec {
                        name: "port-profile".into(),
                        driver: String::new(),
                        required: true,
                    }],
                    qemu: None,
                };
                let migration = format!("m-0000000000{i:02x}");
                let c1 = tern::protocol::cookies::cookie1(
                    &format!("{migration}.1"),
                    &migration,
                    "hv-a",
                    &vm,
                    Mode::Safe,
                );
                tokio::spawn(async move {
                    client
                        .prepare(proto::PrepareRequest {
                            cookie1: c1.encode_to_vec(),
                        })
                        .await
                        .map(|_| ())
                })
            });
            let mut replies = Vec::new();
            for call in futures::future::join_all(calls).await {
                replies.push(call.unwrap());
            }
            replies
        });
    let accepted = replies.iter().filter(|r| r.is_ok()).count();
    assert_eq!(
        accepted, MAX_INCOMING,
        "hv-b accepted {accepted} of {PREPARES} simultaneous Prepares (max_incoming = {MAX_INCOMING}): {replies:?}"
    );
    for refusal in replies.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(
            refusal.code(),
            tonic::Code::ResourceExhausted,
            "{refusal:?}"
        );
        assert!(
            refusal.message().contains("destination busy"),
            "{refusal:?}"
        );
    }
}

// ---- 4: the source agent restarts mid-evacuation ---------------------------

/// hv-a evacuates six VMs of about a second each to hv-b, hv-c and hv-d, is
/// stopped by `signal` once two have moved, and starts again.
fn restarted_source_resumes_its_evacuation(signal: i32) {
    let (vm_config, names) = vms(6, 256);
    let link = sim(256, 1.0);
    let destination = format!("{link}{}", port_profile(""));
    let mut cluster = Cluster::start(vec![
        host("hv-a", format!("{link}{}{vm_config}", port_profile(""))),
        host("hv-b", destination.clone()),
        host("hv-c", destination.clone()),
        host("hv-d", destination),
    ]);
    let id = start_evacuation(&cluster, "hv-a", &[]);
    let before = wait_evacuation(&cluster, "hv-a", &id, "two VMs moved, one in flight", |j| {
        let c = j.counts();
        c.moved >= 2 && c.in_flight >= 1
    });

    assert!(
        before.counts().pending > 0,
        "nothing left for the restarted agent to do: {before:?}"
    );
    if signal == libc::SIGKILL {
        cluster.kill("hv-a");
    } else {
        cluster.signal("hv-a", signal);
        let exit = cluster.wait_exit("hv-a", Duration::from_secs(15));
        assert!(
            exit.code().is_some(),
            "hv-a did not exit on its own: {exit:?}"
        );
    }
    let restarted_at = now_ms();
    cluster.start_agent("hv-a");

    let after = wait_evacuation_over(&cluster, "hv-a", &id);
    assert_eq!(after.id, id);
    assert_eq!(after.state, JobState::Done, "{after:?}");
    let c = after.counts();
    assert_eq!((c.moved, c.failed), (names.len(), 0), "{after:?}");
    assert!(
        cluster.log("hv-a").contains("resuming evacuation"),
        "the restarted agent should say it resumes the evacuation"
    );

    // What happened before the restart is still in the history.
    for old in &before.vms {
        let new = vm_of(&after, &old.name);
        assert!(
            new.attempts.len() >= old.attempts.len(),
            "{} lost attempts: before {:?}, after {:?}",
            old.name,
            old.attempts,
            new.attempts
        );
        for (was, is) in old.attempts.iter().zip(&new.attempts) {
            assert_eq!(
                (was.attempt, &was.destination, was.started_at_ms),
                (is.attempt, &is.destination, is.started_at_ms),
                "{}: attempt rewritten",
                old.name
            );
            if was.outcome.is_some() {
                assert_eq!(was.outcome, is.outcome, "{}: outcome rewritten", old.name);
            }
        }
        if old.state == VmState::Moved {
            assert_eq!(old.attempts.len(), new.attempts.len(), "{}", old.name);
            assert_eq!(old.host, new.host, "{} moved again", old.name);
        }
    }

    // The restarted agent moved VMs itself: at least the ones still pending.
    let moved_after_restart = after
        .vms
        .iter()
        .filter(|v| {
            v.attempts.last().is_some_and(|a| {
                a.started_at_ms >= restarted_at && a.outcome == Some(Outcome::Succeeded)
            })
        })
        .count();
    assert!(
        moved_after_restart >= 1,
        "no VM moved by an attempt of the restarted agent: {after:?}"
    );

    let status = cluster.status();
    let running_on = assert_each_runs_once(&status, &names);
    for (name, host) in &running_on {
        assert_ne!(host, "hv-a", "{name} is still on hv-a");
        assert_eq!(&vm_of(&after, name).host, host, "{name}");
    }
    assert!(
        status["migrations"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["outcome"] != "unresolved"),
        "{status}"
    );
    assert_eq!(host_of(&status, "hv-a")["draining"], true);
}

#[test]
fn source_killed_mid_evacuation_resumes_it_after_restart() {
    restarted_source_resumes_its_evacuation(libc::SIGKILL);
}

#[test]
fn source_stopped_by_sigterm_mid_evacuation_resumes_it_after_restart() {
    restarted_source_resumes_its_evacuation(libc::SIGTERM);
}

// ---- 5: pause, resume, cancel, undrain -------------------------------------

/// hv-a with six VMs of `seconds` each (at most two at once), hv-b and hv-c.
fn slow_cluster(seconds: f64) -> (Cluster, Vec<String>) {
    let (vm_config, names) = vms(6, 256);
    let link = sim(256, 1.0 / seconds);
    let destination = format!("{link}{}", port_profile(""));
    let cluster = Cluster::start(vec![
        host("hv-a", format!("{link}{}{vm_config}", port_profile(""))),
        host("hv-b", destination.clone()),
        host("hv-c", destination),
    ]);
    (cluster, names)
}

#[test]
fn pause_stops_new_attempts_and_resume_carries_on() {
    let (cluster, names) = slow_cluster(0.8);
    let id = start_evacuation(&cluster, "hv-a", &[]);
    wait_evacuation(&cluster, "hv-a", &id, "two VMs in flight", |j| {
        j.in_flight() == 2
    });

    let (code, _, stderr) = run(&cluster, &["evacuation", "pause", &id]);
    assert_eq!(code, 0, "{stderr}");
    let paused = evacuation(&cluster, "hv-a", &id);
    assert_eq!(paused.state, JobState::Paused);
    let at_pause = paused.counts();
    assert!(at_pause.pending > 0, "{paused:?}");

    // A running evacuation keeps its host draining.
    let (code, _, stderr) = run(&cluster, &["undrain", "hv-a"]);
    assert_eq!(code, 64, "undrain during an evacuation: {stderr}");
    assert!(
        stderr.contains(&id) && stderr.contains("cancel it"),
        "the refusal should name the evacuation and the way out: {stderr}"
    );

    // The attempts in flight finish; nothing new starts.
    let settled = wait_evacuation(&cluster, "hv-a", &id, "in-flight attempts to end", |j| {
        j.in_flight() == 0
    });
    let c = settled.counts();
    assert_eq!(c.moved, at_pause.moved + at_pause.in_flight, "{settled:?}");
    assert_eq!(c.pending, at_pause.pending, "{settled:?}");
    let migrations = migrations_from(&cluster.status(), "hv-a");
    // Longer than the runner's one-second recheck.
    std::thread::sleep(Duration::from_millis(1500));
    let still = evacuation(&cluster, "hv-a", &id);
    assert_eq!(still.state, JobState::Paused);
    assert_eq!(still.counts(), c, "a paused evacuation changed: {still:?}");
    assert_eq!(
        migrations_from(&cluster.status(), "hv-a"),
        migrations,
        "a paused evacuation started a migration"
    );

    let (code, _, stderr) = run(&cluster, &["evacuation", "resume", &id]);
    assert_eq!(code, 0, "{stderr}");
    let done = wait_evacuation_over(&cluster, "hv-a", &id);
    assert_eq!(done.state, JobState::Done, "{done:?}");
    assert_eq!(done.counts().moved, names.len(), "{done:?}");
    let running_on = assert_each_runs_once(&cluster.status(), &names);
    assert!(running_on.values().all(|h| h != "hv-a"), "{running_on:?}");

    // Drained: no migration comes back until the operator undrains it.
    let back = &names[0];
    let from = &running_on[back];
    let (code, record) = cluster.tern_json(&["migrate", back, "--to", "hv-a", "--json"]);
    assert_eq!(
        code, 1,
        "a migration to a draining host should fail: {record}"
    );
    let error = record["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("hv-a is draining") && error.contains("tern undrain hv-a"),
        "the refusal should say hv-a is draining and how to end it: {record}"
    );
    assert_eq!(cluster.running_on(back), vec![from.clone()]);

    let (code, stdout, stderr) = run(&cluster, &["undrain", "hv-a"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("hv-a accepts incoming migrations again"),
        "{stdout}"
    );
    assert_eq!(host_of(&cluster.status(), "hv-a")["draining"], false);
    let (code, record) = cluster.tern_json(&["migrate", back, "--to", "hv-a", "--json"]);
    assert_eq!(
        code, 0,
        "after undrain the host takes migrations again: {record}"
    );
    assert_eq!(cluster.running_on(back), vec!["hv-a"]);
}

#[test]
fn cancel_lets_attempts_in_flight_finish_and_leaves_the_rest_on_the_source() {
    let (cluster, names) = slow_cluster(0.8);
    let id = start_evacuation(&cluster, "hv-a", &[]);
    let started = wait_evacuation(&cluster, "hv-a", &id, "two VMs in flight", |j| {
        j.in_flight() == 2 && j.counts().moved == 0
    });

    let (code, _, stderr) = run(&cluster, &["evacuation", "cancel", &id]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("may finish"), "{stderr}");
    let over = wait_evacuation_over(&cluster, "hv-a", &id);
    assert_eq!(over.state, JobState::Cancelled, "{over:?}");

    let flying: Vec<&str> = started
        .vms
        .iter()
        .filter(|v| v.state == VmState::InFlight)
        .map(|v| v.name.as_str())
        .collect();
    let status = cluster.status();
    let running_on = assert_each_runs_once(&status, &names);
    for vm in &over.vms {
        if flying.contains(&vm.name.as_str()) {
            assert_eq!(vm.state, VmState::Moved, "{vm:?}");
            assert_ne!(running_on[&vm.name], "hv-a", "{vm:?}");
        } else {
            assert_eq!(vm.state, VmState::Cancelled, "{vm:?}");
            assert!(vm.attempts.is_empty(), "a cancelled VM was tried: {vm:?}");
            assert_eq!(running_on[&vm.name], "hv-a", "{vm:?}");
        }
    }
    assert_eq!(over.counts().moved, flying.len(), "{over:?}");

    let (code, _, stderr) = run(&cluster, &["evacuation", "cancel", &id]);
    assert_eq!(code, 64, "cancelling an ended evacuation: {stderr}");
    assert!(stderr.contains("has ended"), "{stderr}");
    // Cancelled, the host still drains until the operator says otherwise.
    assert_eq!(host_of(&status, "hv-a")["draining"], true);
    let (code, _, stderr) = run(&cluster, &["undrain", "hv-a"]);
    assert_eq!(code, 0, "undrain after a cancel: {stderr}");
}

#[test]
fn cancel_with_abort_aborts_attempts_in_flight_and_every_vm_stays_on_the_source() {
    // Long transfers: the abort lands in Perform.
    let (cluster, names) = slow_cluster(4.0);
    let id = start_evacuation(&cluster, "hv-a", &[]);
    let started = wait_evacuation(&cluster, "hv-a", &id, "two VMs in flight", |j| {
        j.in_flight() == 2
    });
    let flying: Vec<(String, String)> = started
        .vms
        .iter()
        .filter(|v| v.state == VmState::InFlight)
        .map(|v| (v.name.clone(), v.migration_id.clone().unwrap()))
        .collect();
    for (_, migration) in &flying {
        cluster.wait_phase(migration, "perform");
    }

    let (code, _, stderr) = run(&cluster, &["evacuation", "cancel", "--abort", &id]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("are being aborted"), "{stderr}");
    let over = wait_evacuation_over(&cluster, "hv-a", &id);
    assert_eq!(over.state, JobState::Cancelled, "{over:?}");
    assert!(over.abort_in_flight, "{over:?}");
    assert!(
        over.vms.iter().all(|v| v.state == VmState::Cancelled),
        "every VM should be cancelled: {over:?}"
    );

    let status = cluster.status();
    let running_on = assert_each_runs_once(&status, &names);
    assert!(
        running_on.values().all(|h| h == "hv-a"),
        "every VM should still run on hv-a: {running_on:?}"
    );
    for (vm, migration) in &flying {
        let record = migration_record(&status, migration);
        assert_eq!(record["outcome"], "aborted", "{record}");
        let attempts = &vm_of(&over, vm).attempts;
        assert_eq!(attempts.len(), 1, "{vm}: {attempts:?}");
        assert_eq!(
            attempts[0].outcome,
            Some(Outcome::Aborted),
            "{vm}: {attempts:?}"
        );
    }
    // The source records the abort as soon as its guest runs again; each
    // destination rolls back what it prepared on its own, just after.
    for destination in ["hv-b", "hv-c"] {
        wait_until(
            Duration::from_secs(10),
            &format!("{destination} to roll back its feature state after the abort"),
            || {
                host_of(&cluster.status(), destination)["feature_state"]
                    .as_array()
                    .is_some_and(|s| s.is_empty())
            },
        );
    }
}

// ---- 6: bad input ----------------------------------------------------------

/// The ids of every evacuation `tern status --json` lists.
fn evacuation_ids(status: &Value) -> Vec<String> {
    status["evacuations"]
        .as_array()
        .unwrap_or_else(|| panic!("no evacuations in status: {status}"))
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect()
}

/// `tern ARGS` exits 64 naming every phrase, and starts no evacuation.
fn assert_refused(cluster: &Cluster, args: &[&str], phrases: &[&str]) {
    let before = evacuation_ids(&cluster.status());
    let (code, _, stderr) = run(cluster, args);
    assert_eq!(code, 64, "tern {args:?}: stderr: {stderr}");
    for phrase in phrases {
        assert!(
            stderr.contains(phrase),
            "tern {args:?}: stderr does not mention {phrase:?}: {stderr}"
        );
    }
    assert_eq!(
        evacuation_ids(&cluster.status()),
        before,
        "tern {args:?} started an evacuation"
    );
}

/// `tern ARGS` exits 64 naming every phrase, and changes no VM, migration,
/// evacuation or drain flag.
fn assert_refused_without_change(cluster: &Cluster, args: &[&str], phrases: &[&str]) {
    let before = cluster.status();
    assert_refused(cluster, args, phrases);
    let after = cluster.status();
    assert_eq!(
        before["evacuations"], after["evacuations"],
        "tern {args:?} changed an evacuation"
    );
    assert_eq!(before["vms"], after["vms"], "tern {args:?} changed the VMs");
    assert_eq!(
        before["migrations"], after["migrations"],
        "tern {args:?} changed the migrations"
    );
    for (was, is) in before["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .zip(after["hosts"].as_array().unwrap())
    {
        assert_eq!(
            was["draining"], is["draining"],
            "tern {args:?} changed {}",
            is["name"]
        );
    }
}

#[test]
fn bad_evacuation_requests_are_refused_and_change_nothing() {
    let (cluster, _) = slow_cluster(2.0);
    let refused =
        |args: &[&str], phrases: &[&str]| assert_refused_without_change(&cluster, args, phrases);
    refused(&["evacuate", "hv-nope"], &["hv-nope"]);
    refused(
        &["evacuate", "hv-a", "--exclude", "hv-b,hv-nope"],
        &["hv-nope"],
    );
    refused(
        &["evacuate", "hv-a", "--exclude", "hv-a"],
        &["hv-a is the host being evacuated"],
    );
    refused(
        &["evacuate", "hv-a", "--max-attempts", "1000"],
        &["max attempts 1000", "between 1 and"],
    );
    refused(
        &["evacuate", "hv-a", "--concurrency", "100000"],
        &["concurrency 100000", "between 1 and"],
    );
    refused(&["evacuation", "pause", "e-nope"], &["e-nope"]);
    refused(
        &["evacuation", "pause", "e-nope", "--abort"],
        &["--abort goes with cancel only"],
    );
    refused(&["undrain", "hv-b"], &["hv-b is not draining"]);
    assert!(
        cluster.status()["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["draining"] == false),
        "a refused request drained a host"
    );

    // The agent checks exclusions itself, whoever asks.
    let status = block_on(async {
        console(&cluster, "hv-a")
            .await
            .evacuate(proto::EvacuateRequest {
                completion: None,
                mode: proto::Mode::Safe as i32,
                concurrency: 0,
                max_attempts: 0,
                exclude: vec!["hv-nope".into()],
            })
            .await
    })
    .expect_err("an unknown host excluded");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    assert!(status.message().contains("hv-nope"), "{status:?}");
    assert_eq!(host_of(&cluster.status(), "hv-a")["draining"], false);

    // One evacuation of a host at a time.
    let id = start_evacuation(&cluster, "hv-a", &[]);
    let before = evacuation(&cluster, "hv-a", &id);
    assert_refused(
        &cluster,
        &["evacuate", "hv-a", "--exclude", "hv-c"],
        &["already being evacuated", &id],
    );
    let second = block_on(async {
        console(&cluster, "hv-a")
            .await
            .evacuate(proto::EvacuateRequest::default())
            .await
    })
    .expect_err("a second evacuation of the same host");
    assert_eq!(second.code(), tonic::Code::AlreadyExists, "{second:?}");

    // Controls that make no sense for it now.
    let (code, _, stderr) = run(&cluster, &["evacuation", "pause", &id, "--abort"]);
    assert_eq!(
        (code, stderr.contains("--abort goes with cancel only")),
        (64, true),
        "{stderr}"
    );
    let (code, _, stderr) = run(&cluster, &["evacuation", "resume", &id]);
    assert_eq!(
        (code, stderr.contains("not paused")),
        (64, true),
        "{stderr}"
    );
    let now = evacuation(&cluster, "hv-a", &id);
    assert_eq!(now.state, JobState::Running, "{now:?}");
    assert_eq!(now.exclude, before.exclude);
    assert_eq!(now.max_attempts, before.max_attempts);

    let (code, _, stderr) = run(&cluster, &["evacuation", "cancel", "--abort", &id]);
    assert_eq!(code, 0, "{stderr}");
    wait_evacuation_over(&cluster, "hv-a", &id);
}

#[test]
fn evacuate_with_zero_max_attempts_or_concurrency_is_refused() {
    let (cluster, _) = slow_cluster(2.0);
    assert_refused_without_change(
        &cluster,
        &["evacuate", "hv-a", "--max-attempts", "0"],
        &["max attempts 0"],
    );
    assert_refused_without_change(
        &cluster,
        &["evacuate", "hv-a", "--concurrency", "0"],
        &["concurrency 0"],
    );
}

/// A host that is down without refusing connections (its port accepts and
/// never answers, like a hung machine) neither receives a VM nor holds the
/// evacuation up: it is unreachable for placement, and not asked again
/// for a while after it did not answer.
#[test]
fn a_host_that_never_answers_neither_receives_vms_nor_stops_the_evacuation() {
    let (mut cluster, names) = slow_cluster(0.2);
    let port = cluster.host("hv-c").port;
    cluster.kill("hv-c");
    // Connections complete in the listen backlog; nothing ever speaks.
    let _blackhole = std::net::TcpListener::bind(("127.0.0.1", port)).expect("hv-c's port");
    let (code, job, progress) = evacuate(&cluster, &["hv-a"]);
    assert_eq!(code, 0, "every VM moved cleanly\n{progress}");
    let c = job.counts();
    assert_eq!(
        (c.total, c.moved, c.failed),
        (names.len(), names.len(), 0),
        "{job:?}"
    );
    for vm in &job.vms {
        assert_eq!(vm.host, "hv-b", "{vm:?}");
        assert_eq!(vm.attempts.len(), 1, "never tried on hv-c: {vm:?}");
    }
}
