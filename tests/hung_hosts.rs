//! A host that hangs (its agent SIGSTOPped: the kernel still accepts its
//! connections, nothing answers) must not hold up commands about the others:
//! they ask every agent with a short deadline, go on with what answered and
//! name the host that did not.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn cluster() -> Cluster {
    Cluster::start(vec![
        host(
            "hv-a",
            format!("{}{}{}", port_profile(""), vm("web-01", 256), link(1024)),
        ),
        host("hv-b", port_profile("")),
        host("hv-c", port_profile("")),
    ])
}

/// Run `tern ARGS` with a 500 ms answer deadline; its output and how long it took.
fn timed(cluster: &Cluster, args: &[&str]) -> (std::process::Output, Duration) {
    let mut all = vec!["--answer-deadline-ms", "500"];
    all.extend_from_slice(args);
    let started = Instant::now();
    let out = cluster.tern(&all);
    (out, started.elapsed())
}

#[test]
fn status_names_the_hung_host_and_a_migration_between_the_others_is_not_held_up() {
    let mut cluster = cluster();
    cluster.signal("hv-c", libc::SIGSTOP);

    // Before, a hung host cost every command its 15 s request timeout; the
    // bound here is 8 x the deadline, far from either.
    let (out, took) = timed(&cluster, &["status"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(took < Duration::from_secs(4), "tern status took {took:?}");
    assert!(stdout.contains("hv-c: no answer in 0.5 s"), "{stdout}");
    assert!(
        stdout.contains("web-01"),
        "what hv-a answered is shown: {stdout}"
    );

    let (out, took) = timed(&cluster, &["status", "--json"]);
    assert!(out.status.success());
    assert!(
        took < Duration::from_secs(4),
        "tern status --json took {took:?}"
    );
    let status: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).expect("JSON");
    let hung = status["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == "hv-c")
        .expect("hv-c listed");
    assert_eq!(hung["connected"], false, "{hung}");
    assert!(
        hung["error"]
            .as_str()
            .is_some_and(|e| e.contains("no answer in 0.5 s")),
        "{hung}"
    );

    // A VM whose host answered moves; the hung host costs it at most the
    // deadline while the VM is looked for.
    let (out, took) = timed(
        &cluster,
        &[
            "migrate",
            "web-01",
            "--to",
            "hv-b",
            "--mode",
            "safe",
            "--no-wait",
            "--json",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(took < Duration::from_secs(4), "tern migrate took {took:?}");
    let started: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default(),
    )
    .expect("JSON");
    let id = started["id"].as_str().unwrap().to_string();
    let record = cluster.wait_outcome(&id);
    assert_eq!(record["outcome"], "succeeded", "{record}");

    cluster.signal("hv-c", libc::SIGCONT);
    let (out, _) = timed(&cluster, &["status"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("no answer"),
        "hv-c answers again: {stdout}"
    );
}

/// The console's watchers on the cluster's agents, answering within `deadline`.
fn console_agents(cluster: &Cluster, deadline: Duration) -> tern::cli::Cluster {
    let mut access = tern::cli::client::Access::new(
        &cluster.inventory,
        cluster.tls.as_ref().map(|t| t.admin.clone()),
    );
    access.answer_deadline = Some(deadline);
    tern::cli::Cluster::load(&access).expect("the inventory loads")
}

#[test]
fn the_console_names_a_hung_host_within_about_its_answer_deadline_and_sees_it_come_back() {
    use tern::console::msg::Msg;
    let mut cluster = cluster();
    let deadline = Duration::from_millis(500);
    let agents = console_agents(&cluster, deadline);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let _watchers = runtime.block_on(async { tern::console::client::spawn_watchers(&agents, tx) });
    // Every watcher's stream is up first.
    let mut connected = std::collections::BTreeSet::new();
    let within = |rx: &mut tokio::sync::mpsc::UnboundedReceiver<Msg>, limit: Duration| {
        runtime.block_on(async { tokio::time::timeout(limit, rx.recv()).await.ok().flatten() })
    };
    while connected.len() < 3 {
        match within(&mut rx, Duration::from_secs(20)) {
            Some(Msg::Connected { host }) => {
                connected.insert(host);
            }
            Some(_) => {}
            None => panic!("the watchers did not connect: {connected:?}"),
        }
    }

    cluster.signal("hv-c", libc::SIGSTOP);
    let stopped = Instant::now();
    // Named within a few deadlines (a probe waits one and gives one more to
    // answer), long before the 5 s keep-alive would notice.
    let silent = loop {
        match within(&mut rx, Duration::from_secs(4)) {
            Some(Msg::Silent {
                host, deadline_ms, ..
            }) if host == "hv-c" => break deadline_ms,
            Some(Msg::Lost { host, error, .. }) if host == "hv-c" => {
                panic!("hv-c reported lost, not silent: {error}")
            }
            Some(Msg::Silent { host, .. }) => panic!("{host} is not hung"),
            Some(_) => {}
            None => panic!("hv-c was not named within 4 s of its SIGSTOP"),
        }
    };
    assert_eq!(silent, 500, "named after {:?}", stopped.elapsed());

    cluster.signal("hv-c", libc::SIGCONT);
    loop {
        match within(&mut rx, Duration::from_secs(4)) {
            Some(Msg::Connected { host }) if host == "hv-c" => break,
            Some(Msg::Silent { host, .. }) => panic!("{host} named silent again"),
            Some(_) => {}
            None => panic!("hv-c not seen answering again within 4 s of its SIGCONT"),
        }
    }
}
