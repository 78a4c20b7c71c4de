//! Both hosts' logs of a migration: each agent keeps its own log files in
//! `state_dir/logs` with the attempt id on every line of an attempt, answers
//! AttemptLogs for its own host, and `tern logs ID` merges the source's and
//! the destination's lines in time order. Real agent processes, real gRPC.

mod common;

use std::process::Output;

use common::*;

/// hv-a holds web-01; hv-b's switch rejects ASSOCIATE (the finish stage).
fn failing_finish() -> Vec<HostSpec> {
    vec![
        host("hv-a", format!("{}{}", port_profile(""), vm("web-01", 256))),
        host("hv-b", port_profile("fail = [\"finish\"]")),
    ]
}

/// A safe-mode migration of web-01 to hv-b that fails in Finish; its id.
fn failed_migration(cluster: &Cluster) -> String {
    let (code, record) = cluster.tern_json(&[
        "migrate", "web-01", "--to", "hv-b", "--mode", "safe", "--json",
    ]);
    assert_eq!(code, 1, "{record}");
    assert_eq!(record["outcome"], "failed", "{record}");
    record["id"].as_str().expect("an id").to_string()
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// One printed line: `HH:MM:SS.mmm HOST LEVEL ATTEMPT TEXT`.
#[derive(Debug)]
struct Printed {
    ms_of_day: u64,
    host: String,
    level: String,
    attempt: String,
    text: String,
}

fn parse(line: &str) -> Printed {
    let mut parts = line.split_whitespace();
    let time = parts.next().expect("a time");
    let (hms, ms) = time.split_once('.').expect("HH:MM:SS.mmm");
    let hms: Vec<u64> = hms
        .split(':')
        .map(|p| p.parse().expect("a number"))
        .collect();
    assert_eq!(hms.len(), 3, "{line}");
    let ms_of_day = ((hms[0] * 60 + hms[1]) * 60 + hms[2]) * 1000 + ms.parse::<u64>().unwrap();
    let host = parts.next().expect("a host").to_string();
    let level = parts.next().expect("a level").to_string();
    let attempt = parts.next().expect("an attempt").to_string();
    let text = parts.collect::<Vec<_>>().join(" ");
    Printed {
        ms_of_day,
        host,
        level,
        attempt,
        text,
    }
}

#[test]
fn tern_logs_prints_both_hosts_lines_in_time_order_with_the_destinations_failing_stage() {
    let cluster = Cluster::start(failing_finish());
    let id = failed_migration(&cluster);
    let attempt = format!("{id}.1");

    let out = cluster.tern(&["logs", &id]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    let lines: Vec<Printed> = stdout.lines().map(parse).collect();
    assert!(lines.len() >= 2, "{stdout}");
    for line in &lines {
        assert_eq!(
            line.attempt, attempt,
            "every line names the attempt: {line:?}"
        );
        assert!(
            ["INFO", "WARN", "ERROR"].contains(&line.level.as_str()),
            "{line:?}"
        );
    }
    // Both hosts, each named, merged by time.
    assert!(lines.iter().any(|l| l.host == "hv-a"), "{stdout}");
    assert!(lines.iter().any(|l| l.host == "hv-b"), "{stdout}");
    assert!(
        lines.windows(2).all(|w| w[0].ms_of_day <= w[1].ms_of_day),
        "in time order:\n{stdout}"
    );
    // The destination says which stage failed, and rolled back; the source
    // says how the attempt ended, after the destination's failure.
    let stage = lines
        .iter()
        .position(|l| l.host == "hv-b" && l.text.contains("port-profile finish failed on hv-b"))
        .unwrap_or_else(|| panic!("hv-b's line about the failing stage:\n{stdout}"));
    assert_eq!(lines[stage].level, "WARN");
    assert!(
        lines
            .iter()
            .any(|l| l.host == "hv-b" && l.text.contains("rolled back on hv-b")),
        "{stdout}"
    );
    let ended = lines
        .iter()
        .position(|l| l.host == "hv-a" && l.text.contains("web-01 hv-a -> hv-b failed"))
        .unwrap_or_else(|| panic!("hv-a's line about the outcome:\n{stdout}"));
    assert!(stage < ended, "{stdout}");

    // An attempt id asks for that attempt's lines: the same here. One the
    // migration never had is bad input.
    let out = cluster.tern(&["logs", &attempt]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(text(&out).0, stdout);
    let out = cluster.tern(&["logs", &format!("{id}.2")]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        text(&out)
            .1
            .contains(&format!("migration {id} has no attempt 2: its latest is 1")),
        "{}",
        text(&out).1
    );

    // --json: one object a line, the same lines.
    let out = cluster.tern(&["logs", &id, "--json"]);
    let (json, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let objects: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(objects.len(), lines.len());
    assert!(
        objects
            .windows(2)
            .all(|w| w[0]["at_ms"].as_u64() <= w[1]["at_ms"].as_u64())
    );
    assert!(
        objects
            .iter()
            .any(|o| o["host"] == "hv-b" && o["text"].as_str().unwrap().contains("finish failed"))
    );

    // Each agent wrote its own files in its state_dir/logs, one JSON
    // object a line, the attempt id on the attempt's lines.
    for name in ["hv-a", "hv-b"] {
        let dir = cluster.path().join(format!("{name}-state")).join("logs");
        let files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 1, "one file today: {files:?}");
        let name_of = files[0].file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name_of.starts_with("agent.") && name_of.ends_with(".jsonl"),
            "{name_of}"
        );
        let written = std::fs::read_to_string(&files[0]).unwrap();
        let ours: Vec<serde_json::Value> = written
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON lines"))
            .filter(|l| l["attempt"] == attempt.as_str())
            .collect();
        assert!(!ours.is_empty(), "{name}'s file:\n{written}");
        assert!(ours.iter().all(|l| l["host"] == name && l["t"].is_u64()));
        // And nothing of hv-a's is in hv-b's file, or the other way round.
        assert!(
            !written.contains(&format!(
                "\"host\":\"{}\"",
                if name == "hv-a" { "hv-b" } else { "hv-a" }
            )),
            "{written}"
        );
    }
}

#[test]
fn a_bad_or_unknown_id_is_refused_as_bad_input() {
    let cluster = Cluster::start(failing_finish());

    let out = cluster.tern(&["logs", "web-01"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(64), "{stdout}{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains("neither a migration id"), "{stderr}");

    let out = cluster.tern(&["logs", "m-000000000000"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(64), "{stdout}{stderr}");
    assert!(
        stderr.contains("no migration m-000000000000 on any agent"),
        "{stderr}"
    );

    let out = cluster.tern(&["logs", "m-000000000000.0"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(text(&out).1.contains("attempt ID"), "{}", text(&out).1);
}

#[test]
fn a_destination_that_does_not_answer_is_named_and_the_sources_lines_still_print() {
    let mut cluster = Cluster::start(failing_finish());
    let id = failed_migration(&cluster);
    cluster.signal("hv-b", libc::SIGSTOP);

    let started = std::time::Instant::now();
    let out = cluster.tern(&["--answer-deadline-ms", "1000", "logs", &id]);
    let took = started.elapsed();
    cluster.signal("hv-b", libc::SIGCONT);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(69), "{stdout}{stderr}");
    assert!(stderr.contains("hv-b: no answer in 1 s"), "{stderr}");
    let lines: Vec<Printed> = stdout.lines().map(parse).collect();
    assert!(!lines.is_empty(), "hv-a's lines print: {stderr}");
    assert!(lines.iter().all(|l| l.host == "hv-a"), "{stdout}");
    assert!(
        lines
            .iter()
            .any(|l| l.text.contains("web-01 hv-a -> hv-b failed")),
        "{stdout}"
    );
    // The hung host costs the deadline a few times over, never the 15 s
    // request timeout.
    assert!(took < std::time::Duration::from_secs(8), "took {took:?}");
}

#[test]
fn a_viewer_may_read_the_logs_over_mutual_tls() {
    let cluster = Cluster::start_tls(failing_finish());
    let id = failed_migration(&cluster);
    let tls = cluster.tls.as_ref().expect("TLS");
    let viewer = tls.issue("vera", "viewer", &[]);

    let out = cluster.tern_as(Some(&viewer), &["logs", &id]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    let lines: Vec<Printed> = stdout.lines().map(parse).collect();
    assert!(lines.iter().any(|l| l.host == "hv-a"), "{stdout}");
    assert!(
        lines
            .iter()
            .any(|l| l.host == "hv-b" && l.text.contains("finish failed")),
        "{stdout}"
    );
}

#[test]
fn attempt_logs_over_grpc_refuses_bad_ids_and_serves_only_the_ids_lines_within_max_lines() {
    use tern::proto::console_client::ConsoleClient;
    let cluster = Cluster::start(failing_finish());
    let first = failed_migration(&cluster);
    let second = failed_migration(&cluster);
    block_on(async {
        let mut client = ConsoleClient::connect(cluster.address("hv-a"))
            .await
            .expect("connect to hv-a");
        for bad in [
            "",
            "web-01",
            "m-0123",
            "m-0123456789ab.0",
            "../../etc/passwd",
        ] {
            let status = client
                .attempt_logs(tern::proto::AttemptLogsRequest {
                    id: bad.into(),
                    max_lines: 0,
                })
                .await
                .expect_err(bad);
            assert_eq!(
                status.code(),
                tonic::Code::InvalidArgument,
                "{bad}: {status}"
            );
            assert!(
                status.message().contains("AttemptLogsRequest.id"),
                "{status}"
            );
        }
        let all = client
            .attempt_logs(tern::proto::AttemptLogsRequest {
                id: first.clone(),
                max_lines: 0,
            })
            .await
            .expect("the first migration's lines")
            .into_inner();
        assert_eq!(all.host, "hv-a");
        assert!(all.lines.len() > 2, "{all:?}");
        assert!(!all.truncated);
        assert!(
            all.lines
                .iter()
                .all(|l| l.attempt_id == format!("{first}.1") && l.host == "hv-a"),
            "only the first migration's lines: {all:?}"
        );
        assert!(all.lines.iter().all(|l| !l.text.contains(&second)));
        // Bounded: the newest kept, and the answer says older ones were left out.
        let two = client
            .attempt_logs(tern::proto::AttemptLogsRequest {
                id: first.clone(),
                max_lines: 2,
            })
            .await
            .expect("two lines")
            .into_inner();
        assert!(two.truncated);
        assert_eq!(two.lines, all.lines[all.lines.len() - 2..]);
        // An id the agent has no lines of: none, not an error.
        let none = client
            .attempt_logs(tern::proto::AttemptLogsRequest {
                id: "m-000000000000".into(),
                max_lines: 0,
            })
            .await
            .expect("no lines")
            .into_inner();
        assert!(none.lines.is_empty());
    });
}
