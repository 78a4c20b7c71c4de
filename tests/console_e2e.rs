//! The real `tern console` in a pseudo-terminal against real agent
//! processes: an operator aborts a running migration and retries a failed
//! one on another host by keystrokes, and both the screen and the agents'
//! state say it worked.

mod common;

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portable_pty::{CommandBuilder, PtySize, native_pty_system};

use common::*;

const COLS: u16 = 120;
const ROWS: u16 = 40;

/// The console in a pty; a thread feeds its output to a terminal emulator.
struct Screen {
    parser: Arc<Mutex<vt100::Parser>>,
    writer: Box<dyn Write + Send>,
    child: Box<dyn portable_pty::Child + Send + Sync>,
    _state: tempfile::TempDir,
}

impl Screen {
    fn open(cluster: &Cluster) -> Screen {
        let inventory = cluster.inventory.to_string_lossy().to_string();
        Screen::run(&["console", "--inventory", &inventory], &[])
    }

    /// `tern ARGS` in a pty, with `env` besides its own state folder.
    fn run(args: &[&str], env: &[(&str, &std::path::Path)]) -> Screen {
        let pty = native_pty_system()
            .openpty(PtySize {
                rows: ROWS,
                cols: COLS,
                pixel_width: 0,
                pixel_height: 0,
            })
            .expect("a pseudo-terminal");
        let state = tempfile::tempdir().unwrap();
        let mut command = CommandBuilder::new(TERN);
        command.args(args);
        command.env("XDG_STATE_HOME", state.path());
        command.env("TERM", "xterm-256color");
        for (name, value) in env {
            command.env(name, value);
        }
        let child = pty.slave.spawn_command(command).expect("tern starts");
        drop(pty.slave);
        let mut reader = pty.master.try_clone_reader().unwrap();
        let writer = pty.master.take_writer().unwrap();
        let parser = Arc::new(Mutex::new(vt100::Parser::new(ROWS, COLS, 0)));
        let feed = parser.clone();
        std::thread::spawn(move || {
            let _master = pty.master;
            let mut buf = [0u8; 8192];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                feed.lock().unwrap().process(&buf[..n]);
            }
        });
        Screen {
            parser,
            writer,
            child,
            _state: state,
        }
    }

    fn text(&self) -> String {
        self.parser.lock().unwrap().screen().contents()
    }

    fn wait_for(&self, what: &str, mut ok: impl FnMut(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = self.text();
            if ok(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; the screen:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn keys(&mut self, keys: &str) {
        self.writer.write_all(keys.as_bytes()).unwrap();
        self.writer.flush().unwrap();
        // Let the console fold each batch before the next.
        std::thread::sleep(Duration::from_millis(200));
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

/// hv-a runs web-01 (4 GiB over a 256 MiB/s link: a long Perform) and
/// db-01; hv-b's switch rejects ASSOCIATE; hv-c is healthy.
fn cluster() -> Cluster {
    Cluster::start(vec![
        host(
            "hv-a",
            format!(
                "{}{}{}{}",
                port_profile(""),
                vm("web-01", 4096),
                vm("db-01", 256),
                link(256)
            ),
        ),
        host("hv-b", port_profile("fail = [\"finish\"]")),
        host("hv-c", port_profile("")),
    ])
}

#[test]
fn an_operator_aborts_and_retries_elsewhere_by_keystrokes() {
    let cluster = cluster();
    // A safe-mode failure to retry, and a long migration to abort.
    let (code, failed) = cluster.tern_json(&[
        "migrate", "db-01", "--to", "hv-b", "--mode", "safe", "--json",
    ]);
    assert_eq!(code, 1, "{failed}");
    let failed_id = failed["id"].as_str().unwrap().to_string();
    let running_id = cluster.start_migration("web-01", "hv-c", "fast");
    cluster.wait_phase(&running_id, "perform");

    let mut screen = Screen::open(&cluster);
    let text = screen.wait_for("both migrations on screen", |t| {
        t.contains("web-01") && t.contains("perform") && t.contains("port-profile ✗ finish")
    });
    assert!(text.contains("agents 3/3"), "{text}");

    // Running migrations come first: web-01's row is selected. a, then y.
    screen.keys("a");
    screen.wait_for("the abort confirmation", |t| {
        t.contains("Abort 1 migration(s)?") && t.contains("web-01 keeps running on hv-a")
    });
    screen.keys("y");
    let record = cluster.wait_outcome(&running_id);
    assert_eq!(record["outcome"], "aborted", "{record}");
    assert_eq!(cluster.running_on("web-01"), vec!["hv-a".to_string()]);
    screen.wait_for("the abort's result in the status line", |t| {
        t.contains(&format!("abort {running_id}"))
    });

    // The failed row is now first (failed before aborted). d, then enter:
    // the picker starts on hv-c, not hv-b where the attempt failed, and
    // says what db-01's source answers for each host (`tern check`).
    screen.keys("g");
    screen.keys("d");
    screen.wait_for("the destination picker, answered", |t| {
        t.contains("on another host")
            && t.contains("db-01 runs here")
            && t.lines()
                .any(|l| l.contains("hv-c") && l.contains("eligible"))
            && t.lines()
                .any(|l| l.contains("hv-b") && l.contains("eligible · failed here"))
    });
    screen.keys("\r");
    screen.wait_for("the retry's result", |t| {
        t.contains(&format!("retry {failed_id} on hv-c"))
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let record = cluster.migration(&failed_id);
        if record["outcome"] == "succeeded" {
            assert_eq!(record["attempt"], 2, "{record}");
            assert_eq!(record["destination"], "hv-c", "{record}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the retry did not succeed: {record}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(cluster.running_on("db-01"), vec!["hv-c".to_string()]);
    assert!(cluster.feature_state("hv-b", "db-01").is_empty());
    screen.wait_for("the succeeded retry on screen", |t| {
        t.lines()
            .any(|l| l.contains("db-01") && l.contains("hv-a → hv-c"))
    });

    // q quits and gives the terminal back.
    screen.keys("q");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = screen.child.try_wait().unwrap() {
            assert!(status.success(), "tern console exited with {status:?}");
            break;
        }
        assert!(Instant::now() < deadline, "q did not quit the console");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// On a busy cluster the cursor stays on the failed migration the operator
/// chose: migrations start above it (running rows sort first) and end below
/// it for several seconds, and `enter` still opens the failed one.
#[test]
fn the_cursor_stays_on_the_chosen_failed_migration_while_others_start_and_end() {
    let cluster = Cluster::start(vec![
        host(
            "hv-a",
            format!(
                "{}{}{}{}{}{}{}",
                port_profile(""),
                vm("db-01", 256),
                vm("app-01", 256),
                vm("app-02", 256),
                vm("app-03", 256),
                vm("app-04", 256),
                link(256)
            ),
        ),
        host("hv-b", port_profile("fail = [\"finish\"]")),
        host("hv-c", port_profile("")),
    ]);
    let (code, failed) = cluster.tern_json(&[
        "migrate", "db-01", "--to", "hv-b", "--mode", "safe", "--json",
    ]);
    assert_eq!(code, 1, "{failed}");
    let failed_id = failed["id"].as_str().unwrap().to_string();

    let mut screen = Screen::open(&cluster);
    screen.wait_for("the failed migration on screen", |t| {
        t.contains("db-01") && t.contains("port-profile ✗ finish")
    });
    // The only row: the cursor is on it.
    screen.keys("g");
    // Others start above it and end below it, one after another.
    let mut started = Vec::new();
    for app in ["app-01", "app-02", "app-03", "app-04"] {
        started.push(cluster.start_migration(app, "hv-c", "fast"));
        std::thread::sleep(Duration::from_millis(700));
    }
    screen.wait_for("the others to run and end on screen", |t| {
        t.lines().filter(|l| l.contains("hv-a → hv-c")).count() == 4
    });
    screen.keys("\r");
    let text = screen.wait_for("a migration's detail", |t| t.contains(" id m-"));
    assert!(
        text.contains(&format!("id {failed_id}")) && text.contains("db-01 hv-a → hv-b"),
        "enter opened another migration than the failed one it was on:\n{text}"
    );
    for id in started {
        cluster.wait_outcome(&id);
    }
}

/// A fast migration left db-01 on hv-b without its network (degraded).
/// Once hv-b's switch accepts again, `R` and `y` repair it where it runs;
/// then `B` and `y` move it back to hv-a, where it came from.
#[test]
fn an_operator_repairs_a_degraded_vm_then_moves_it_back_by_keystrokes() {
    let cluster = Cluster::start(vec![
        host("hv-a", format!("{}{}", port_profile(""), vm("db-01", 256))),
        host(
            "hv-b",
            format!(
                "allow_fault_injection = true\n{}",
                port_profile("fail = [\"finish\"]")
            ),
        ),
    ]);
    let (code, moved) = cluster.tern_json(&[
        "migrate", "db-01", "--to", "hv-b", "--mode", "fast", "--json",
    ]);
    assert_eq!(code, 2, "{moved}");
    let id = moved["id"].as_str().unwrap().to_string();
    let out = cluster.tern(&["fault", "hv-b", "port-profile"]);
    assert!(out.status.success());

    let mut screen = Screen::open(&cluster);
    screen.wait_for("the degraded row, with R offered", |t| {
        t.contains("db-01") && t.contains("port-profile ✗ finish") && t.contains("R repair")
    });
    screen.keys("R");
    screen.wait_for("the repair confirmation", |t| {
        t.contains("Repair db-01 on hv-b?")
            && t.contains("re-run port-profile finish then verify on hv-b")
    });
    screen.keys("y");
    screen.wait_for("the repair's result in the status line", |t| {
        t.contains("db-01 repaired on hv-b: no longer degraded")
    });
    let record = cluster.migration(&id);
    assert_eq!(record["outcome"], "succeeded", "{record}");
    assert_eq!(record["repairs"][0]["result"], "ok", "{record}");
    assert_eq!(
        cluster.feature_state("hv-b", "db-01")[0]["state"],
        "associated"
    );
    // The console saw the repaired record: the row is no longer degraded.
    screen.wait_for("the repaired row", |t| {
        t.lines()
            .any(|l| l.contains("db-01") && l.contains("✓") && !l.contains("✗ finish"))
    });

    // B on the same row: back to hv-a, in the default (safe) mode.
    screen.keys("B");
    screen.wait_for("the move-back confirmation", |t| {
        t.contains("Move db-01 back to hv-a?") && t.contains("db-01 hv-b → hv-a")
    });
    screen.keys("y");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = cluster.status();
        let back =
            status["migrations"].as_array().unwrap().iter().find(|m| {
                m["vm"] == "db-01" && m["source"] == "hv-b" && m["destination"] == "hv-a"
            });
        if let Some(back) = back
            && back["outcome"] == "succeeded"
        {
            assert_eq!(back["mode"], "safe", "{back}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "db-01 did not move back: {status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(cluster.running_on("db-01"), vec!["hv-a".to_string()]);
    assert!(cluster.feature_state("hv-b", "db-01").is_empty());
}

/// `tern` (the demo and its console) in a pty, hung up as when its terminal
/// window closes: the hangup ends it as `q` does, and the demo stops its
/// agents and removes its folder (journals, CA, keys). (With the terminal
/// really gone, restoring it fails too; that path was seen in tmux.)
#[test]
fn a_hangup_stops_the_demo_cleanly_and_leaves_no_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let mut screen = Screen::run(&["demo", "--seed", "1"], &[("TMPDIR", tmp.path())]);
    let folders = || {
        std::fs::read_dir(tmp.path())
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("tern-demo-"))
            .count()
    };
    screen.wait_for("the demo's console", |text| text.contains("agents 4/4"));
    assert_eq!(folders(), 1, "the demo keeps its state in one folder");
    // What the kernel sends when the terminal goes away.
    let pid = screen.child.process_id().expect("the child's pid") as i32;
    unsafe {
        libc::kill(pid, libc::SIGHUP);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = screen.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "tern did not end on the hangup");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    assert_eq!(folders(), 0, "the demo's folder outlived it");
}
