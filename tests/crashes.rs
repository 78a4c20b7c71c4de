//! Agent crashes and signals in the middle of a migration, through real
//! agents and the CLI's JSON: every attempt ends in an outcome, the VM runs
//! on exactly one host once things settle, and no feature state is left
//! where the VM does not run.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;

/// hv-a sources web-01 (4 GiB over 256 MiB/s: a ~16 s Perform); hv-b receives.
fn slow_pair(destination_port_profile: &str) -> Cluster {
    pair(4096, destination_port_profile)
}

/// hv-a sources web-01 of `memory_mib` over a 256 MiB/s link; hv-b receives.
fn pair(memory_mib: u64, destination_port_profile: &str) -> Cluster {
    Cluster::start(vec![
        host(
            "hv-a",
            format!(
                "{}{}{}",
                port_profile(""),
                vm("web-01", memory_mib),
                link(256)
            ),
        ),
        host("hv-b", port_profile(destination_port_profile)),
    ])
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Wait until the VM has settled on exactly one host, `on`, with no other
/// guest (incoming, paused) of it anywhere.
fn wait_settled(cluster: &Cluster, vm: &str, on: &str) {
    let mut last = Vec::new();
    let settled = wait_for(Duration::from_secs(10), || {
        last = cluster.guests_of(vm);
        last == vec![(on.to_string(), "running".to_string())]
    });
    assert!(
        settled,
        "{vm} did not settle running on {on} alone; guests: {last:?}\nstatus: {}",
        cluster.status()
    );
}

fn wait_for(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn migration_in(status: &serde_json::Value, id: &str) -> serde_json::Value {
    status["migrations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("no migration {id}: {status}"))
}

fn assert_destination_clean(cluster: &Cluster, host: &str, vm: &str) {
    let guests: Vec<_> = cluster
        .guests_of(vm)
        .into_iter()
        .filter(|(h, _)| h == host)
        .collect();
    assert!(
        guests.is_empty(),
        "{host} still holds a guest of {vm}: {guests:?}"
    );
    let state = cluster.feature_state(host, vm);
    assert!(
        state.is_empty(),
        "{host} still holds feature state for {vm}: {state:?}"
    );
}

#[test]
fn source_killed_during_perform_recovers_to_the_source_and_aborts() {
    let mut cluster = slow_pair("");
    let id = cluster.start_migration("web-01", "hv-b", "safe");
    cluster.wait_phase(&id, "perform");

    cluster.kill("hv-a");
    cluster.start_agent("hv-a");

    let record = cluster.wait_outcome(&id);
    assert_eq!(record["outcome"], "aborted", "{record}");
    assert_eq!(record["running_on"], "hv-a", "{record}");
    wait_settled(&cluster, "web-01", "hv-a");
    wait_until(
        Duration::from_secs(5),
        "hv-b to drop its feature state",
        || cluster.feature_state("hv-b", "web-01").is_empty(),
    );
    assert_destination_clean(&cluster, "hv-b", "web-01");
    assert!(
        !cluster.feature_state("hv-a", "web-01").is_empty(),
        "hv-a lost its association for the VM it runs"
    );
}

#[test]
fn destination_killed_during_perform_and_restarted_leaves_the_vm_on_the_source() {
    let mut cluster = slow_pair("");
    let id = cluster.start_migration("web-01", "hv-b", "safe");
    cluster.wait_phase(&id, "perform");

    cluster.kill("hv-b");
    cluster.start_agent("hv-b");

    let record = cluster.wait_outcome(&id);
    assert!(
        record["outcome"] == "aborted" || record["outcome"] == "failed",
        "an attempt whose destination crashed before Finish must abort or fail: {record}"
    );
    assert_eq!(record["running_on"], "hv-a", "{record}");
    cluster.wait_connected();
    wait_settled(&cluster, "web-01", "hv-a");
    wait_until(
        Duration::from_secs(5),
        "hv-b to drop its feature state",
        || cluster.feature_state("hv-b", "web-01").is_empty(),
    );
    assert_destination_clean(&cluster, "hv-b", "web-01");
}

#[test]
fn source_killed_after_finish_was_sent_stays_unresolved_until_the_destination_answers() {
    // A 1 s Perform: the destination's 3 s switch latency also slows Prepare.
    let mut cluster = pair(256, "latency_ms = 3000");
    let id = cluster.start_migration("web-01", "hv-b", "safe");
    cluster.wait_phase(&id, "finish");

    cluster.kill("hv-a");
    // The destination is stopped mid-Finish: it cannot answer Resolve.
    cluster.signal("hv-b", libc::SIGSTOP);
    cluster.start_agent("hv-a");

    // The source cannot know whether the destination committed: it keeps
    // its guest paused and shows the attempt unresolved, and never resumes
    // it on its own. (Each `tern status` waits the CLI's 1 s answer deadline
    // for hv-b while it is stopped, so look at few snapshots.)
    std::thread::sleep(Duration::from_millis(3000));
    let mut status = cluster.status();
    for _ in 0..2 {
        if migration_in(&status, &id)["outcome"] == "unresolved" {
            break;
        }
        status = cluster.status();
    }
    let record = migration_in(&status, &id);
    assert_eq!(record["outcome"], "unresolved", "{status}");
    assert_eq!(
        guests(&status, "web-01", "paused"),
        vec!["hv-a"],
        "{status}"
    );
    assert!(
        guests(&status, "web-01", "running").is_empty(),
        "web-01 runs somewhere while unresolved: {status}"
    );
    assert_eq!(host_of(&status, "hv-b")["connected"], false, "{status}");

    // The destination goes on: it commits, Resolve answers "committed".
    cluster.signal("hv-b", libc::SIGCONT);
    let mut record = serde_json::Value::Null;
    let resolved = wait_for(Duration::from_secs(15), || {
        record = cluster.migration(&id);
        record["outcome"] == "succeeded" || record["outcome"] == "degraded"
    });
    assert!(
        resolved,
        "migration not resolved after the destination came back: {record}\n{}",
        cluster.log("hv-a")
    );
    assert_eq!(record["running_on"], "hv-b", "{record}");
    wait_settled(&cluster, "web-01", "hv-b");
    wait_until(
        Duration::from_secs(5),
        "hv-a to release its association",
        || cluster.feature_state("hv-a", "web-01").is_empty(),
    );
}

#[test]
fn sigint_to_the_source_during_perform_cleans_the_destination_before_exit() {
    let mut cluster = slow_pair("");
    let id = cluster.start_migration("web-01", "hv-b", "safe");
    cluster.wait_phase(&id, "perform");

    cluster.signal("hv-a", libc::SIGINT);
    let status = cluster.wait_exit("hv-a", Duration::from_secs(15));
    assert_eq!(
        status.code(),
        Some(0),
        "source agent exit: {status:?}\n{}",
        cluster.log("hv-a")
    );
    // No waiting: the source told the destination before it exited.
    assert_destination_clean(&cluster, "hv-b", "web-01");

    cluster.start_agent("hv-a");
    let record = cluster.wait_outcome(&id);
    assert_eq!(record["outcome"], "aborted", "{record}");
    assert_eq!(record["running_on"], "hv-a", "{record}");
    wait_settled(&cluster, "web-01", "hv-a");
    assert_destination_clean(&cluster, "hv-b", "web-01");
}

#[test]
fn destination_lost_during_perform_resumes_the_source_within_the_peer_timeout() {
    let mut cluster = slow_pair("");
    let id = cluster.start_migration("web-01", "hv-b", "safe");
    cluster.wait_phase(&id, "perform");

    let killed_at = unix_ms();
    cluster.kill("hv-b");

    let record = cluster.wait_outcome(&id);
    assert_eq!(record["outcome"], "failed", "{record}");
    let error = record["error"].as_str().unwrap_or_default().to_lowercase();
    assert!(
        error.contains("lost contact"),
        "error does not say contact was lost: {record}"
    );
    assert_eq!(record["running_on"], "hv-a", "{record}");
    assert_eq!(cluster.running_on("web-01"), vec!["hv-a"]);
    assert_eq!(
        cluster.guests_of("web-01"),
        vec![("hv-a".to_string(), "running".to_string())]
    );

    // peer_timeout_ms (1500) + one heartbeat_interval_ms (200), plus a
    // generous 1500 ms margin for scheduling on a loaded 2-core CI machine.
    let took = record["updated_at_ms"]
        .as_u64()
        .unwrap()
        .saturating_sub(killed_at);
    eprintln!("outcome {took} ms after the destination was killed");
    assert!(
        took <= 1500 + 200 + 1500,
        "outcome {took} ms after the destination was killed: {record}"
    );
}

/// The destination is gone for good after Finish was sent and the source
/// restarted: the attempt stays unresolved, and only the operator's forced
/// decision (`tern resolve --run-on source`) runs the guest again.
#[test]
fn operator_forces_an_unresolved_attempt_back_to_the_source_when_the_destination_is_gone() {
    let mut cluster = pair(256, "latency_ms = 3000");
    let id = cluster.start_migration("web-01", "hv-b", "safe");
    cluster.wait_phase(&id, "finish");
    cluster.kill("hv-a");
    cluster.kill("hv-b");
    cluster.start_agent("hv-a");
    wait_until(
        Duration::from_secs(20),
        "the attempt to be unresolved",
        || cluster.migration(&id)["outcome"] == "unresolved",
    );
    // Unresolved never resumes on its own.
    assert_eq!(
        cluster.guests_of("web-01"),
        vec![("hv-a".to_string(), "paused".to_string())]
    );

    // Without --yes and with no terminal, the CLI refuses and changes nothing.
    let refused = cluster.tern(&["resolve", &id, "--run-on", "source"]);
    assert_eq!(refused.status.code(), Some(64));
    assert_eq!(cluster.migration(&id)["outcome"], "unresolved");

    let forced = cluster.tern(&["resolve", &id, "--run-on", "source", "--yes"]);
    let stderr = String::from_utf8_lossy(&forced.stderr);
    assert_eq!(forced.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("two hosts at once"),
        "the warning must say what can go wrong: {stderr}"
    );
    let record = cluster.migration(&id);
    assert_eq!(record["outcome"], "failed", "{record}");
    assert_eq!(record["running_on"], "hv-a");
    assert!(
        record["error"]
            .as_str()
            .unwrap()
            .contains("operator forced"),
        "{record}"
    );
    assert_eq!(cluster.running_on("web-01"), vec!["hv-a"]);
}

/// Found by the simulator: a hook started by an agent that then died could
/// finish after the restarted agent had rolled its stage back, redoing what
/// the rollback undid. A hook now dies with its agent.
#[test]
fn a_hook_still_running_when_its_agent_is_killed_dies_with_it() {
    let markers = tempfile::tempdir().unwrap();
    let dir = markers.path().display();
    let hook = format!(
        "[features.slow-hook]\ndriver = \"exec\"\ntimeout_ms = 60000\ncommand = [\"/bin/sh\", \"-c\", \"touch {dir}/started-$TERN_STAGE; sleep 3; touch {dir}/finished-$TERN_STAGE\"]\n\n"
    );
    let mut cluster = Cluster::start(vec![
        host(
            "hv-a",
            format!(
                "{hook}[[vm]]\nname = \"web-01\"\nmemory_mib = 256\nvcpus = 1\nfeatures = [{{ name = \"slow-hook\", required = false }}]\n\n"
            ),
        ),
        host("hv-b", hook.clone()),
    ]);
    let id = cluster.start_migration("web-01", "hv-b", "fast");
    let started = markers.path().join("started-prepare");
    wait_until(
        Duration::from_secs(20),
        "the prepare hook to start on hv-b",
        || started.exists(),
    );
    cluster.kill("hv-b");
    // Longer than the hook's own sleep: a surviving hook would have finished.
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        !markers.path().join("finished-prepare").exists(),
        "the hook outlived the agent that ran it"
    );
    cluster.start_agent("hv-b");
    let record = cluster.wait_outcome(&id);
    assert_eq!(record["running_on"], "hv-a", "{record}");
    assert_eq!(
        cluster.guests_of("web-01"),
        vec![("hv-a".to_string(), "running".to_string())]
    );
}

/// Found modelling the journal for the simulator: an agent that could not
/// write its journal logged it and carried on, so it could resume a guest
/// after a commit it had not recorded. It now stops at once, as if it had
/// crashed before the write (exit 74), and recovers after a restart.
#[test]
fn an_agent_that_cannot_write_its_journal_stops_instead_of_acting() {
    let mut cluster = pair(256, "");
    // An agent listens before it has opened its journal: wait until it
    // answers, so the lock below meets a migration, not the agent's start.
    cluster.wait_connected();
    let journal = cluster.path().join("hv-b-state").join("journal.db");
    let lock = rusqlite::Connection::open(&journal).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();

    let (code, record) = cluster.tern_json(&[
        "migrate", "web-01", "--to", "hv-b", "--mode", "safe", "--json",
    ]);
    assert_eq!(code, 1, "{record}");
    assert_eq!(record["outcome"], "failed", "{record}");
    assert_eq!(record["running_on"], "hv-a", "{record}");
    let status = cluster.wait_exit("hv-b", Duration::from_secs(20));
    assert_eq!(
        status.code(),
        Some(74),
        "hv-b exited with {status:?}; its log:\n{}",
        cluster.log("hv-b")
    );
    assert!(
        cluster.log("hv-b").contains("cannot write the journal"),
        "{}",
        cluster.log("hv-b")
    );

    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);
    cluster.start_agent("hv-b");
    assert_eq!(
        cluster.guests_of("web-01"),
        vec![("hv-a".to_string(), "running".to_string())]
    );
    assert!(cluster.feature_state("hv-b", "web-01").is_empty());
    assert!(cluster.pending_rollbacks("hv-b").is_empty());
}
