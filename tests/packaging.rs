//! What a package installs beside the binary works where it is installed:
//! the completion scripts load in their shells, the man pages render with
//! `man`, and the agent's systemd unit passes `systemd-analyze verify`.
//!
//! A missing tool (bash, zsh, fish, man, systemd-analyze) skips its test with
//! a note, unless `TERN_REQUIRE_PACKAGING=1` (`.ci/run` installs bash, man-db
//! and systemd and sets it): then a missing bash, man or systemd-analyze fails.
//! zsh and fish are optional everywhere: without them only the script's shape
//! is checked.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const TERN: &str = env!("CARGO_BIN_EXE_tern");
const UNIT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/systemd/tern-agent.service"
);

fn tern(args: &[&str]) -> Output {
    let out = Command::new(TERN)
        .args(args)
        .env_remove("TERN_INVENTORY")
        .env_remove("TERN_IDENTITY")
        .output()
        .expect("run tern");
    assert!(
        out.status.success(),
        "tern {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn found(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether a required tool is there; skip (print why) or, under
/// `TERN_REQUIRE_PACKAGING=1`, fail.
fn have(test: &str, tool: &str) -> bool {
    if found(tool) {
        return true;
    }
    assert!(
        std::env::var("TERN_REQUIRE_PACKAGING").as_deref() != Ok("1"),
        "{test}: {tool} is not installed and TERN_REQUIRE_PACKAGING=1"
    );
    eprintln!("{test}: skipped: {tool} not found (TERN_REQUIRE_PACKAGING=1 fails instead)");
    false
}

fn write_temp(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn man_pages(dir: &Path) -> PathBuf {
    let man1 = dir.join("man1");
    tern(&["man", "--dir", man1.to_str().unwrap()]);
    man1
}

#[test]
fn bash_completion_loads_and_completes_subcommands_and_values() {
    if !have("bash completion", "bash") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script = write_temp(
        dir.path(),
        "tern.bash",
        &tern(&["completions", "bash"]).stdout,
    );
    // Load it, then ask it what it would offer, as bash does on <tab>.
    let complete = |words: &str| -> String {
        let program = format!(
            "source {} && complete -p tern && COMP_WORDS=({words}) && \
             COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)) && \
             COMP_LINE=\"${{COMP_WORDS[*]}}\" && COMP_POINT=${{#COMP_LINE}} && \
             _tern tern \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\" && \
             printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            script.display()
        );
        let out = Command::new("bash")
            .args(["--norc", "--noprofile", "-c", &program])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let top = complete("tern mi");
    assert!(top.starts_with("complete "), "{top}");
    assert!(top.lines().any(|l| l == "migrate"), "{top}");
    let modes = complete("tern migrate web-01 --mode ''");
    assert!(
        modes.lines().any(|l| l == "fast") && modes.lines().any(|l| l == "safe"),
        "{modes}"
    );
}

#[test]
fn zsh_completion_is_a_compdef_for_tern() {
    let script = tern(&["completions", "zsh"]).stdout;
    let text = String::from_utf8(script.clone()).unwrap();
    assert!(text.starts_with("#compdef tern\n"), "{text:.200}");
    assert!(text.contains("'migrate:"), "names the subcommands");
    if !found("zsh") {
        eprintln!("zsh completion: zsh not found, only its shape checked");
        return;
    }
    parses(&["zsh", "-n"], "_tern", &script);
}

#[test]
fn fish_completion_completes_tern() {
    let script = tern(&["completions", "fish"]).stdout;
    let text = String::from_utf8(script.clone()).unwrap();
    assert!(
        text.lines().all(|l| l.is_empty()
            || l.starts_with("complete -c tern ")
            || !l.starts_with("complete")),
        "{text:.400}"
    );
    assert!(text.contains("-a \"migrate\""), "names the subcommands");
    if !found("fish") {
        eprintln!("fish completion: fish not found, only its shape checked");
        return;
    }
    parses(&["fish", "--no-execute"], "tern.fish", &script);
}

/// `script`, written as `name`, parses in the shell `check` runs (its
/// syntax-only mode), which says nothing.
fn parses(check: &[&str], name: &str, script: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_temp(dir.path(), name, script);
    let out = Command::new(check[0])
        .args(&check[1..])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn man_page_renders_with_its_subcommands_and_exit_codes() {
    if !have("man page", "man") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let page = write_temp(dir.path(), "tern.1", &tern(&["man"]).stdout);
    let out = Command::new("man")
        .arg("-l")
        .arg(&page)
        .env("MANWIDTH", "80")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "NAME",
        "tern-migrate(1)",
        "tern-evacuate(1)",
        "EXIT STATUS",
        "77     The identity's role",
    ] {
        assert!(text.contains(expected), "{expected:?} in:\n{text}");
    }
}

#[test]
fn man_dir_pages_each_render_and_are_found_by_name() {
    if !have("man pages", "man") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let man1 = man_pages(dir.path());
    let mut pages: Vec<_> = std::fs::read_dir(&man1)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    pages.sort();
    for page in [
        "tern.1",
        "tern-agent.1",
        "tern-migrate.1",
        "tern-ca-issue.1",
    ] {
        assert!(pages.iter().any(|p| p == page), "{page} in {pages:?}");
    }
    assert!(!pages.iter().any(|p| p == "tern-help.1"));
    // As installed: found through MANPATH by its name, like `man tern-migrate`.
    let out = Command::new("man")
        .arg("tern-migrate")
        .env("MANPATH", dir.path())
        .env("MANWIDTH", "80")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("--to <HOST>") && text.contains("EXIT STATUS"),
        "{text}"
    );
}

#[test]
fn the_agent_unit_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(UNIT).unwrap();
    for line in [
        "ExecStart=/usr/bin/tern agent --config /etc/tern/agent.toml",
        "ConditionPathExists=/etc/tern/agent.toml",
        "Restart=always",
        "KillMode=process",
        "StateDirectory=tern",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "DeviceAllow=/dev/kvm rw",
        "DeviceAllow=/dev/net/tun rw",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
    ] {
        assert!(unit.lines().any(|l| l == line), "{line:?} in the unit");
    }
    if !have("systemd unit", "systemd-analyze") || !have("systemd unit", "man") {
        return;
    }
    // verify checks that ExecStart's binary exists and that the
    // Documentation= pages open with man: point it at the binary built here
    // and the pages it writes.
    let dir = tempfile::tempdir().unwrap();
    man_pages(dir.path());
    let copy = write_temp(
        dir.path(),
        "tern-agent.service",
        unit.replace("ExecStart=/usr/bin/tern ", &format!("ExecStart={TERN} "))
            .as_bytes(),
    );
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .env("MANPATH", dir.path())
        .output()
        .unwrap();
    // An unknown key or a bad value is only a warning (exit 0): any output
    // at all is a finding.
    assert!(
        out.status.success() && out.stderr.is_empty() && out.stdout.is_empty(),
        "systemd-analyze verify:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
