//! The Prometheus endpoint of a real agent (`metrics_listen`): after a
//! failed and a succeeded migration both are counted with their outcome
//! (and the failure with its cause), the gauges say what `tern status`
//! says, and the text parses as Prometheus's exposition format.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::{Cluster, agent_port, host, link, port_profile, vm};

/// `GET PATH` on the agent's metrics address: status line and body.
fn get(port: u16, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    // In pieces, as clients may send it.
    for piece in ["GET ", path, " HTTP/1.1\r\n", "Host: 127.0.0.1\r\n\r\n"] {
        stream.write_all(piece.as_bytes()).unwrap();
    }
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// The value of the sample `name` whose labels include `labels`.
fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(k).is_some_and(|x| x == *v))
        })
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(ref buckets) => {
                buckets.last().map(|b| b.count).unwrap_or_default()
            }
            _ => f64::NAN,
        })
}

#[test]
fn a_failed_and_a_succeeded_migration_are_counted_by_outcome_and_the_text_parses() {
    let metrics = agent_port();
    let cluster = Cluster::start(vec![
        host(
            "hv-a",
            format!(
                "metrics_listen = \"127.0.0.1:{metrics}\"\n{}{}{}{}",
                link(1024),
                vm("web-01", 1024),
                vm("web-02", 1024),
                port_profile("")
            ),
        ),
        host("hv-b", link(1024) + &port_profile("fail = [\"finish\"]")),
        host("hv-c", link(1024) + &port_profile("")),
    ]);
    cluster.wait_connected();
    let (code, failed) = cluster.tern_json(&[
        "migrate", "web-01", "--to", "hv-b", "--mode", "safe", "--json",
    ]);
    assert_ne!(code, 0, "{failed}");
    assert_eq!(failed["outcome"], "failed", "{failed}");
    let (code, moved) = cluster.tern_json(&[
        "migrate", "web-02", "--to", "hv-c", "--mode", "safe", "--json",
    ]);
    assert_eq!(code, 0, "{moved}");

    // An evacuation of hv-a: web-01 leaves for hv-c.
    let (code, evacuation) = cluster.tern_json(&[
        "evacuate",
        "hv-a",
        "--mode",
        "safe",
        "--exclude",
        "hv-b",
        "--json",
    ]);
    assert_eq!(code, 0, "{evacuation}");

    let (status, text) = get(metrics, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK", "{text}");
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text format");
    let attempts = "tern_migration_attempts_total";
    assert_eq!(
        sample(
            &scrape,
            attempts,
            &[
                ("outcome", "failed"),
                ("cause", "feature"),
                ("host", "hv-a")
            ]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &scrape,
            attempts,
            &[("outcome", "succeeded"), ("cause", "")]
        ),
        // web-02 to hv-c, then web-01 in the evacuation.
        Some(2.0),
        "{text}"
    );
    let moved = sample(&scrape, "tern_evacuation_vms", &[("state", "moved")]);
    assert_eq!(moved, Some(1.0), "{text}");
    // The Perform of each of the three attempts.
    assert_eq!(
        sample(
            &scrape,
            "tern_migration_phase_duration_seconds_count",
            &[("phase", "perform")]
        ),
        Some(3.0),
        "{text}"
    );
    let bytes = sample(&scrape, "tern_migration_transferred_bytes_total", &[]).unwrap();
    assert!(bytes >= 3.0 * 1024.0 * 1024.0 * 1024.0, "{text}");
    for direction in ["out", "in"] {
        assert_eq!(
            sample(
                &scrape,
                "tern_migrations_in_flight",
                &[("direction", direction)]
            ),
            Some(0.0)
        );
        assert_eq!(
            sample(
                &scrape,
                "tern_migrations_limit",
                &[("direction", direction)]
            ),
            Some(2.0)
        );
    }
    assert_eq!(sample(&scrape, "tern_pending_rollbacks", &[]), Some(0.0));
    assert_eq!(sample(&scrape, "tern_unresolved_attempts", &[]), Some(0.0));
    assert!(
        sample(
            &scrape,
            "tern_journal_write_seconds_count",
            &[("durable", "true")]
        )
        .unwrap()
            > 0.0,
        "{text}"
    );

    // Every metric the example dashboard and alert rules ask for exists.
    for file in ["grafana-dashboard.json", "tern-alerts.yml"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("examples/monitoring")
            .join(file);
        let used = std::fs::read_to_string(&path).unwrap();
        let names: std::collections::BTreeSet<&str> = used
            .match_indices("tern_")
            .map(|(at, _)| {
                let rest = &used[at..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                &rest[..end]
            })
            .collect();
        assert!(!names.is_empty(), "{file} uses no tern_ metric");
        for name in names {
            // A histogram's series are its name with _bucket, _sum, _count.
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            assert!(
                scrape.samples.iter().any(|s| s.metric == name)
                    || text.contains(&format!("# TYPE {name} "))
                    || text.contains(&format!("# TYPE {base} histogram")),
                "{file} uses {name}, which the agent does not serve:\n{text}"
            );
        }
    }

    // Scraped again, nothing is counted twice.
    let (_, again) = get(metrics, "/metrics");
    let again = prometheus_parse::Scrape::parse(again.lines().map(|l| Ok(l.to_string()))).unwrap();
    assert_eq!(
        sample(
            &again,
            attempts,
            &[("outcome", "failed"), ("cause", "feature")]
        ),
        Some(1.0)
    );
    // Only /metrics, only GET.
    assert_eq!(get(metrics, "/").0, "HTTP/1.1 404 Not Found");
    let mut stream = TcpStream::connect(("127.0.0.1", metrics)).unwrap();
    write!(stream, "DELETE /metrics HTTP/1.1\r\n\r\n").unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 405"), "{reply}");
}

#[test]
fn a_metrics_address_that_cannot_be_bound_stops_the_agent_naming_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let agent = agent_port();
    std::fs::write(
        dir.path().join("cluster.toml"),
        format!("[[host]]\nname = \"hv-a\"\naddress = \"http://127.0.0.1:{agent}\"\n"),
    )
    .unwrap();
    let config = dir.path().join("hv-a.toml");
    std::fs::write(
        &config,
        format!(
            "name = \"hv-a\"\nlisten = \"127.0.0.1:{agent}\"\nstate_dir = \"state\"\n\
             inventory = \"cluster.toml\"\nmetrics_listen = \"127.0.0.1:{port}\"\n"
        ),
    )
    .unwrap();
    let out = std::process::Command::new(common::TERN)
        .args(["agent", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot listen for metrics on 127.0.0.1:{port}")),
        "{err}"
    );
    drop(taken);
}

/// The example alert rules load in Prometheus's own checker, and their
/// unit tests (examples/monitoring/tern-alerts.test.yml) pass: a rollback
/// pending for more than ten minutes fires, rollbacks that come and go do
/// not, an attempt unresolved for a minute fires.
#[test]
fn the_alert_rules_load_and_pass_their_unit_tests_in_promtool() {
    let found = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| dir.join("promtool").is_file())
    });
    if !found {
        assert!(
            std::env::var("TERN_REQUIRE_PROMTOOL").as_deref() != Ok("1"),
            "promtool is not on PATH and TERN_REQUIRE_PROMTOOL=1 (.ci/run unpacks it from Debian's prometheus package)"
        );
        eprintln!("skipped: promtool not found (set TERN_REQUIRE_PROMTOOL=1 to fail instead)");
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/monitoring");
    for args in [
        ["check", "rules", "tern-alerts.yml"],
        ["test", "rules", "tern-alerts.test.yml"],
    ] {
        let out = std::process::Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("run promtool");
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
