//! Decisions reach the disk before another host hears of them, seen in the
//! system calls of real agent processes: both agents of a migration run
//! under `strace`, and the test reads, in the order they happened, each
//! write to the SQLite journal's WAL, each sync of it, and each write to a
//! socket. A power loss loses what was written but not synced; what a peer
//! was told must not be in that tail (DESIGN §2: the destination's commit,
//! the source's "Finish sent").
//!
//! Needs `strace`; `.ci/run` installs it and sets `TERN_REQUIRE_STRACE=1`,
//! which makes its absence a failure instead of a skip.

mod common;

use std::path::Path;

use common::*;

/// Skip (or, with `TERN_REQUIRE_STRACE=1`, fail) without strace.
fn strace_present(test: &str) -> bool {
    let found = std::process::Command::new("strace")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("TERN_REQUIRE_STRACE").as_deref() != Ok("1"),
            "{test}: strace is not installed and TERN_REQUIRE_STRACE=1 \
             (apt-get install -y strace)"
        );
        eprintln!("{test}: skipped: strace not found (set TERN_REQUIRE_STRACE=1 to fail instead)");
    }
    found
}

/// What one traced agent did, in order.
#[derive(Debug, PartialEq)]
enum Event {
    /// A write to the journal's WAL, and the bytes written.
    Journaled(Vec<u8>),
    /// A sync of the WAL returned: everything journaled before it is on disk.
    Synced,
    /// A write to a socket began, and the bytes written.
    Sent(Vec<u8>),
}

/// The strace arguments that trace an agent into `file`: every thread, file
/// names beside descriptors, whole 4 KiB pages.
fn strace(file: &Path) -> Vec<String> {
    [
        "strace",
        "-f",
        "-qq",
        "-y",
        "-x",
        "-s",
        "8192",
        "-e",
        "trace=write,pwrite64,writev,sendmsg,sendto,fsync,fdatasync",
        "-o",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([file.to_str().unwrap().to_string()])
    .collect()
}

/// The C-style string literals of an strace line, decoded, concatenated.
fn strings(line: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chars = line.char_indices().peekable();
    let mut inside = false;
    while let Some((i, c)) = chars.next() {
        match (inside, c) {
            (false, '"') => inside = true,
            (false, _) => {}
            (true, '"') => inside = false,
            (true, '\\') => match chars.next().map(|(_, c)| c) {
                Some('x') => {
                    let hex = &line[i + 2..i + 4];
                    out.push(u8::from_str_radix(hex, 16).expect("strace hex escape"));
                    chars.next();
                    chars.next();
                }
                Some('n') => out.push(b'\n'),
                Some('t') => out.push(b'\t'),
                Some('r') => out.push(b'\r'),
                Some('v') => out.push(0x0b),
                Some('f') => out.push(0x0c),
                Some(other) => out.push(other as u8),
                None => {}
            },
            (true, _) => {
                let mut buf = [0; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out
}

/// Read a trace: journal writes and sockets writes where they begin, WAL
/// syncs where they return (a sync strace shows `<unfinished ...>` returns
/// at its `<... resumed>` line, possibly after other threads' lines).
fn events(trace: &str) -> Vec<Event> {
    let mut syncing = std::collections::HashSet::new();
    let mut events = Vec::new();
    for line in trace.lines() {
        let Some((pid, call)) = line.split_once(' ') else {
            continue;
        };
        let call = call.trim_start();
        if call.starts_with("<... fsync resumed>") || call.starts_with("<... fdatasync resumed>") {
            if syncing.remove(pid) && call.ends_with("= 0") {
                events.push(Event::Synced);
            }
            continue;
        }
        let name = call.split('(').next().unwrap_or_default();
        let fd = call
            .split_once('<')
            .and_then(|(_, rest)| rest.split_once('>'))
            .map(|(path, _)| path)
            .unwrap_or_default();
        let unfinished = call.ends_with("<unfinished ...>");
        match name {
            "fsync" | "fdatasync" if fd.ends_with("journal.db-wal") => {
                if unfinished {
                    syncing.insert(pid.to_string());
                } else if call.ends_with("= 0") {
                    events.push(Event::Synced);
                }
            }
            "pwrite64" | "write" if fd.ends_with("journal.db-wal") => {
                events.push(Event::Journaled(strings(call)));
            }
            "write" | "writev" | "sendmsg" | "sendto"
                if fd.starts_with("socket:") || fd.starts_with("TCP") =>
            {
                events.push(Event::Sent(strings(call)));
            }
            _ => {}
        }
    }
    events
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// Check that the first journal write of `attempt_id` in `state` was synced
/// before anything naming the attempt went out on a socket after it, and
/// that something did (the answer or call that carries the decision).
fn synced_before_told(events: &[Event], attempt_id: &str, state: &str) -> Result<(), String> {
    let row = format!("\"attempt_id\":\"{attempt_id}\"");
    let written = events
        .iter()
        .position(|e| matches!(e, Event::Journaled(b) if contains(b, &row) && contains(b, state)))
        .ok_or_else(|| format!("no journal write of {attempt_id} with {state}"))?;
    let told = events[written..]
        .iter()
        .position(|e| matches!(e, Event::Sent(b) if contains(b, attempt_id)))
        .map(|i| written + i)
        .ok_or_else(|| format!("nothing naming {attempt_id} was sent after {state}"))?;
    if events[written..told].contains(&Event::Synced) {
        Ok(())
    } else {
        Err(format!(
            "{attempt_id} was sent to a peer after its journal write with {state} \
             and before any sync of the journal"
        ))
    }
}

/// hv-a with web-01 behind a link of `bandwidth_mib_s`, hv-b to receive it,
/// both agents restarted under strace; the paths of their traces.
fn traced_pair(bandwidth_mib_s: u64) -> (Cluster, [std::path::PathBuf; 2]) {
    let mut cluster = Cluster::start(vec![
        host(
            "hv-a",
            format!(
                "{}{}{}",
                link(bandwidth_mib_s),
                port_profile(""),
                vm("web-01", 256)
            ),
        ),
        host("hv-b", port_profile("")),
    ]);
    let traces = ["hv-a", "hv-b"].map(|name| {
        cluster.kill(name);
        let trace = cluster.path().join(format!("{name}.strace"));
        let wrapper = strace(&trace);
        let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
        cluster.start_agent_under(name, &wrapper);
        trace
    });
    (cluster, traces)
}

/// Stop both agents and read what each did.
fn stop_and_read(mut cluster: Cluster, traces: &[std::path::PathBuf; 2]) -> [Vec<Event>; 2] {
    for name in ["hv-a", "hv-b"] {
        // Kill the agent, not strace: strace then writes out what it holds
        // and exits on its own.
        let strace = cluster.host(name).child.as_ref().unwrap().id();
        let children = std::fs::read_to_string(format!("/proc/{strace}/task/{strace}/children"))
            .unwrap_or_default();
        for agent in children.split_whitespace() {
            unsafe {
                libc::kill(agent.parse().unwrap(), libc::SIGKILL);
            }
        }
        let status = cluster.wait_exit(name, std::time::Duration::from_secs(10));
        assert!(
            !children.is_empty(),
            "strace of {name} ran no agent ({status})"
        );
    }
    traces
        .clone()
        .map(|trace| events(&std::fs::read_to_string(trace).unwrap()))
}

#[test]
fn the_commit_and_the_finish_are_on_disk_before_the_peer_hears_of_them() {
    if !strace_present("the_commit_and_the_finish_are_on_disk_before_the_peer_hears_of_them") {
        return;
    }
    let (cluster, traces) = traced_pair(1024);
    let (code, record) = cluster.tern_json(&[
        "migrate", "web-01", "--to", "hv-b", "--mode", "safe", "--json",
    ]);
    assert_eq!(code, 0, "{record}");
    assert_eq!(record["outcome"], "succeeded", "{record}");
    let attempt_id = record["attempt_id"].as_str().unwrap().to_string();
    let [source, destination] = stop_and_read(cluster, &traces);

    // The source journals FinishSent before Finish goes out: once the
    // destination may commit, a restarted source must ask before resuming.
    // The destination's commit is synced before its answer to Finish tells
    // the source to kill its copy.
    let broken: Vec<String> = [
        ("source", &source, "\"state\":\"FinishSent\""),
        ("destination", &destination, "\"state\":\"Committed\""),
    ]
    .into_iter()
    .filter_map(|(side, events, state)| {
        synced_before_told(events, &attempt_id, state)
            .err()
            .map(|e| format!("{side}: {e}"))
    })
    .collect();
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

#[test]
fn an_aborted_destination_rolls_back_on_disk_before_it_answers() {
    if !strace_present("an_aborted_destination_rolls_back_on_disk_before_it_answers") {
        return;
    }
    // 256 MiB at 64 MiB/s: Perform lasts four seconds.
    let (cluster, traces) = traced_pair(64);
    let id = cluster.start_migration("web-01", "hv-b", "safe");
    cluster.wait_phase(&id, "perform");
    let record = cluster.abort_and_wait(&id);
    assert_eq!(record["outcome"], "aborted", "{record}");
    let attempt_id = record["attempt_id"].as_str().unwrap().to_string();
    let rolling_back = "\"state\":{\"RollingBack\"";
    // The source reports the abort once it has told the destination, which
    // answers after it rolled back: its answer must be in the trace before
    // the agents are stopped (seen missing on a loaded machine).
    common::wait_until(
        std::time::Duration::from_secs(10),
        "hv-b's trace to show it answered the abort",
        || {
            let traced = events(&std::fs::read_to_string(&traces[1]).unwrap_or_default());
            match synced_before_told(&traced, &attempt_id, rolling_back) {
                Ok(()) => true,
                Err(e) => !e.starts_with("nothing naming") && !e.starts_with("no journal write"),
            }
        },
    );
    let [_, destination] = stop_and_read(cluster, &traces);

    // Once the destination has said it rolls back, a restarted destination
    // must never commit the attempt (its tombstone and rollback survive).
    synced_before_told(&destination, &attempt_id, rolling_back)
        .unwrap_or_else(|e| panic!("destination: {e}"));
}

#[test]
fn a_send_between_a_journal_write_and_its_sync_is_caught() {
    // The check above on a made-up trace, so it is known to fail when the
    // order is wrong (a test that cannot fail proves nothing).
    let wal = "</s/journal.db-wal>";
    let sock = "<socket:[7]>";
    let row = r#"{\"attempt_id\":\"m-1.1\",\"state\":\"Committed\"}"#;
    let write = format!("1 pwrite64(12{wal}, \"{row}\", 40, 0) = 40");
    let send = format!("2 writev(15{sock}, [{{iov_base=\"\\x00m-1.1\", iov_len=6}}], 1) = 6");
    let sync = format!("1 fdatasync(12{wal}) = 0");
    let unfinished = format!("1 fsync(12{wal} <unfinished ...>");
    let resumed = "1 <... fsync resumed>) = 0".to_string();
    let state = "\"state\":\"Committed\"";

    let good = [write.clone(), sync.clone(), send.clone()].join("\n");
    assert_eq!(synced_before_told(&events(&good), "m-1.1", state), Ok(()));
    // A sync that returns only after the send began does not count.
    let late = [write.clone(), unfinished, send.clone(), resumed].join("\n");
    assert!(synced_before_told(&events(&late), "m-1.1", state).is_err());
    let unsynced = [write.clone(), send.clone(), sync].join("\n");
    let error = synced_before_told(&events(&unsynced), "m-1.1", state).unwrap_err();
    assert!(error.contains("before any sync"), "{error}");
    let never_sent = write.clone();
    assert!(synced_before_told(&events(&never_sent), "m-1.1", state).is_err());
    assert!(synced_before_told(&events(&send), "m-1.1", state).is_err());
}
