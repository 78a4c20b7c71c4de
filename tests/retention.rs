//! A long-lived host: thousands of finished migrations in its journal.
//! Watch, `tern status` and the console's client keep working (the snapshot
//! carries the open migrations and only the recent closed ones; lists come
//! in pages), and retention forgets what is beyond `retain_closed`.
//!
//! Driving 10,000 migrations through the protocol would take too long: one
//! real migration is run, its journal row is copied 10,000 times under new
//! ids, and a real agent is started on that journal.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use prost::Message;
use serde_json::Value;
use tern::console::msg::Msg;
use tern::proto;
use tern::proto::console_client::ConsoleClient;

const SEEDED: usize = 10_000;

fn state_dir(cluster: &Cluster, name: &str) -> PathBuf {
    cluster.path().join(format!("{name}-state"))
}

/// Two hosts; hv-a keeps `retain_closed` closed migrations. One migration
/// of web-01 from hv-a to hv-b has run to its end; then hv-a is stopped
/// and its journal holds `SEEDED` more finished migrations, older than
/// the real one, one second apart. Returns the real migration's id.
fn a_host_with_a_long_history(retain_closed: usize) -> (Cluster, String) {
    let mut cluster = Cluster::start(vec![
        host(
            "hv-a",
            format!(
                "retain_closed = {retain_closed}\n{}{}",
                port_profile(""),
                vm("web-01", 256)
            ),
        ),
        host("hv-b", port_profile("")),
    ]);
    let (code, record) = cluster.tern_json(&["migrate", "web-01", "--to", "hv-b", "--json"]);
    assert_eq!(code, 0, "{record}");
    let real = record["id"].as_str().unwrap().to_string();
    cluster.signal("hv-a", libc::SIGINT);
    assert!(cluster.wait_exit("hv-a", Duration::from_secs(15)).success());
    let journal =
        rusqlite::Connection::open(state_dir(&cluster, "hv-a").join("journal.db")).unwrap();
    let (body, updated): (String, u64) = {
        let body: String = journal
            .query_row(
                "SELECT body FROM attempt WHERE side = 'source' AND migration_id = ?1",
                [&real],
                |r| r.get(0),
            )
            .unwrap();
        let value: Value = serde_json::from_str(&body).unwrap();
        let updated = value["record"]["updated_at_ms"].as_u64().unwrap();
        (body, updated)
    };
    let template: Value = serde_json::from_str(&body).unwrap();
    let tx = journal.unchecked_transaction().unwrap();
    {
        let mut insert = tx
            .prepare(
                "INSERT INTO attempt (id, side, migration_id, open, body) VALUES (?1, 'source', ?2, 0, ?3)",
            )
            .unwrap();
        for i in 0..SEEDED {
            let id = format!("m-{:012x}", 0x00a0_0000_0000_u64 + i as u64);
            let attempt = format!("{id}.1");
            let at = updated - 1_000 * (i as u64 + 1);
            let mut row = template.clone();
            row["attempt_id"] = attempt.clone().into();
            row["migration_id"] = id.clone().into();
            row["record"]["id"] = id.clone().into();
            row["record"]["attempt_id"] = attempt.clone().into();
            row["record"]["started_at_ms"] = (at - 500).into();
            row["record"]["updated_at_ms"] = at.into();
            insert
                .execute(rusqlite::params![attempt, id, row.to_string()])
                .unwrap();
        }
    }
    tx.commit().unwrap();
    drop(journal);
    cluster.start_agent("hv-a");
    (cluster, real)
}

/// hv-a's Watch stream through a client with tonic's default limits (4 MiB),
/// what any gRPC client gets: its first event.
fn first_watch_event(cluster: &Cluster) -> proto::Event {
    block_on(async {
        let mut client = ConsoleClient::connect(cluster.address("hv-a"))
            .await
            .unwrap();
        let mut stream = client
            .watch(proto::WatchRequest {})
            .await
            .expect("Watch opens")
            .into_inner();
        tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("the snapshot within 30 s")
            .expect("the snapshot decodes within the default 4 MiB")
            .expect("a first event")
    })
}

#[test]
fn ten_thousand_finished_migrations_leave_watch_status_and_the_console_working() {
    let (cluster, real) = a_host_with_a_long_history(20_000);

    // tern status follows ListMigrations's pages: every record is there.
    let started = Instant::now();
    let (code, status) = cluster.tern_json(&["status", "--json"]);
    assert_eq!(code, 0, "{status}");
    let migrations = status["migrations"].as_array().unwrap();
    assert_eq!(
        migrations.len(),
        SEEDED + 1,
        "every kept migration is listed"
    );
    assert!(migrations.iter().any(|m| m["id"] == real.as_str()));
    assert!(
        status["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["connected"] == true),
        "{}",
        status["hosts"]
    );
    eprintln!(
        "tern status with {} migrations: {:?}",
        SEEDED + 1,
        started.elapsed()
    );

    // What made Watch break before: all of them are far more than one
    // gRPC message may carry by default.
    let pages = block_on(async {
        let mut client = ConsoleClient::connect(cluster.address("hv-a"))
            .await
            .unwrap();
        let mut token = String::new();
        let mut pages = Vec::new();
        loop {
            let reply = client
                .list_migrations(proto::ListMigrationsRequest {
                    page_size: 0,
                    page_token: token,
                })
                .await
                .expect("a page")
                .into_inner();
            token = reply.next_page_token.clone();
            pages.push(reply);
            if token.is_empty() {
                return pages;
            }
        }
    });
    let total: usize = pages
        .iter()
        .flat_map(|p| &p.migrations)
        .map(|m| m.encoded_len())
        .sum();
    assert!(
        total > 4 << 20,
        "the history is {total} bytes: the test needs more than 4 MiB"
    );
    assert_eq!(pages.len(), (SEEDED + 1).div_ceil(500), "pages of 500");
    assert_eq!(
        pages.iter().map(|p| p.migrations.len()).sum::<usize>(),
        SEEDED + 1
    );

    // Watch: the snapshot holds the 500 most recent, the real one first among
    // them, and fits a default client.
    let event = first_watch_event(&cluster);
    let size = event.encoded_len();
    let Some(proto::event::Kind::Snapshot(snapshot)) = event.kind else {
        panic!("the first event is a snapshot: {event:?}");
    };
    assert_eq!(snapshot.migrations.len(), 500, "{size} bytes");
    assert!(size < 4 << 20, "{size} bytes");
    assert!(snapshot.migrations.iter().any(|m| m.id == real));
    let oldest_shown = snapshot
        .migrations
        .iter()
        .map(|m| m.updated_at_ms)
        .min()
        .unwrap();
    let newer_than_shown = pages
        .iter()
        .flat_map(|p| &p.migrations)
        .filter(|m| m.updated_at_ms > oldest_shown)
        .count();
    assert_eq!(newer_than_shown, 499, "the snapshot shows the newest ones");

    // The console's own client connects, gets that snapshot, and stays.
    block_on(async {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let agents =
            tern::cli::Cluster::load(&tern::cli::Access::new(&cluster.inventory, None)).unwrap();
        let _watchers = tern::console::client::spawn_watchers(&agents, tx);
        let mut connected = false;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let msg = tokio::time::timeout_at(deadline, rx.recv())
                .await
                .expect("hv-a's snapshot reaches the console within 30 s")
                .expect("the watchers run");
            match msg {
                Msg::Lost { host, error, .. } if host == "hv-a" => {
                    panic!("the console lost hv-a: {error}")
                }
                Msg::Connected { host } if host == "hv-a" => connected = true,
                Msg::Event(proto::Event {
                    host,
                    kind: Some(proto::event::Kind::Snapshot(s)),
                }) if host == "hv-a" => {
                    assert!(connected);
                    assert_eq!(s.migrations.len(), 500);
                    break;
                }
                _ => {}
            }
        }
        // And it is still connected a moment later (no Lost for hv-a).
        let until = tokio::time::Instant::now() + Duration::from_millis(500);
        while let Ok(Some(msg)) = tokio::time::timeout_at(until, rx.recv()).await {
            assert!(
                !matches!(&msg, Msg::Lost { host, .. } if host == "hv-a"),
                "{msg:?}"
            );
        }
    });
}

#[test]
fn retention_forgets_all_but_the_newest_closed_migrations_and_shrinks_the_wal() {
    let (cluster, real) = a_host_with_a_long_history(1000);
    let status = cluster.status();
    let migrations = status["migrations"].as_array().unwrap();
    assert_eq!(migrations.len(), 1000, "retain_closed = 1000");
    // The newest are kept: the real one and the 999 seeded after it.
    assert!(migrations.iter().any(|m| m["id"] == real.as_str()));
    let oldest_kept = format!("m-{:012x}", 0x00a0_0000_0000_u64 + 998);
    let first_dropped = format!("m-{:012x}", 0x00a0_0000_0000_u64 + 999);
    assert!(migrations.iter().any(|m| m["id"] == oldest_kept.as_str()));
    assert!(migrations.iter().all(|m| m["id"] != first_dropped.as_str()));
    assert!(
        cluster
            .log("hv-a")
            .contains("retention: forgot 9001 closed migrations"),
        "{}",
        cluster.log("hv-a")
    );
    // Gone from the journal too, and the WAL that deleted them truncated.
    let dir = state_dir(&cluster, "hv-a");
    let journal = rusqlite::Connection::open(dir.join("journal.db")).unwrap();
    let rows: i64 = journal
        .query_row(
            "SELECT count(DISTINCT migration_id) FROM attempt WHERE side = 'source'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(rows, 1000);
    let wal = std::fs::metadata(dir.join("journal.db-wal"))
        .map(|m| m.len())
        .unwrap_or(0);
    assert!(wal < 1 << 20, "the WAL holds {wal} bytes after the prune");
}
