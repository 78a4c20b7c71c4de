//! Chaos: three real agents on loopback whose peer traffic goes through a TCP
//! fault proxy (delay, blackhole, refuse, cut), a bounded run of random
//! migrations while agents are SIGKILLed, SIGINTed and restarted and links
//! misbehave; then, with the network healed and every agent up, the cluster
//! must settle into the invariants of DESIGN.md §2:
//!
//! - every VM runs on exactly one host, and nothing else of it (paused,
//!   incoming) is left anywhere;
//! - no switch holds port-profile state for a VM that does not run on its
//!   host, unless that host lists it as a pending rollback;
//! - every migration the CLI accepted has an outcome, and none is left
//!   `unresolved` (the source asks Resolve with backoff until it knows);
//! - where each VM ends up is what its latest migration record says, and a
//!   VM with a port-profile is associated there (unless the move that brought
//!   it could not ASSOCIATE);
//! - every agent stops cleanly on SIGINT (exit 0), and the destinations'
//!   journals agree with the sources' records: an attempt committed on its
//!   destination exactly when its outcome is succeeded or degraded.
//!
//! During the chaos a VM seen running on two hosts in two snapshots in a row
//! (with no command in between) fails the test at once. Failed rollbacks are
//! retried every 300 ms (doubling) rather than after TIMING's 10 minutes, so
//! that retries run while VMs come and go.
//!
//! The run is driven by a seeded RNG: the seed is printed at the start and
//! `TERN_CHAOS_SEED=N` replays the same choices (the timing of processes and
//! the network cannot be replayed exactly). `TERN_CHAOS_ROUNDS=N` runs N
//! rounds on fresh clusters with the seed, the seed + 1, … (a longer soak
//! by hand), each printing its seed first.

mod common;
#[path = "common/proxy.rs"]
mod proxy;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use common::*;
use proxy::{Mode, Proxy, link_name};
use tern::agent::journal::Journal;

/// How many random actions one run takes; `TERN_CHAOS_ACTIONS=N` changes it
/// (a longer soak by hand).
const ACTIONS: usize = 40;
/// The bound on settling once the chaos has stopped. Resolve backs off up to
/// 10 s, so an attempt left unresolved during the chaos may need that long.
const SETTLE: Duration = Duration::from_secs(45);

const HOSTS: [&str; 3] = ["hv-a", "hv-b", "hv-c"];

/// A `[[vm]]` with no features.
fn plain_vm(name: &str, memory_mib: u64) -> String {
    format!(
        "[[vm]]\nname = \"{name}\"\nmemory_mib = {memory_mib}\nvcpus = 1\ndirty_rate_mib_s = 20\nfeatures = []\n\n"
    )
}

/// A `[[vm]]` whose port-profile is optional (never blocks a migration).
fn optional_vm(name: &str, memory_mib: u64) -> String {
    format!(
        "[[vm]]\nname = \"{name}\"\nmemory_mib = {memory_mib}\nvcpus = 1\ndirty_rate_mib_s = 10\nfeatures = [{{ name = \"port-profile\", required = false }}]\n\n"
    )
}

/// Per host: the port-profile fault settings it starts with (and goes back
/// to), and its VMs. Transfers last 0.1–1.5 s at 512 MiB/s.
fn host_specs() -> Vec<(&'static str, &'static str, String)> {
    vec![
        (
            "hv-a",
            "",
            format!("{}{}", vm("web-01", 256), plain_vm("batch-01", 768)),
        ),
        (
            "hv-b",
            "fail_rate = 0.1",
            format!("{}{}", vm("db-01", 512), optional_vm("cache-01", 128)),
        ),
        (
            "hv-c",
            "latency_ms = 150",
            format!("{}{}", vm("app-01", 384), plain_vm("log-01", 64)),
        ),
    ]
}

/// `tern fault` flags equal to a host's configured port-profile faults.
fn baseline_fault_flags(host: &str) -> Vec<&'static str> {
    match host {
        "hv-b" => vec!["--fail-rate", "0.1"],
        "hv-c" => vec!["--latency-ms", "150"],
        _ => vec![],
    }
}

/// The tests' timers, except that failed rollbacks are retried soon (300 ms,
/// doubling), so that retries run while VMs come and go.
fn chaos_timing() -> String {
    let mut timing: String = TIMING
        .lines()
        .filter(|l| !l.starts_with("rollback_retry_ms"))
        .map(|l| format!("{l}\n"))
        .collect();
    timing.push_str("rollback_retry_ms = 300\n");
    // The drills change the switches' faults with `tern fault`.
    timing.push_str("allow_fault_injection = true\n");
    timing
}

/// The cluster with every agent→agent connection going through `proxy`.
fn start_cluster(proxy: &mut Proxy) -> Cluster {
    let hosts: Vec<(&str, String)> = host_specs()
        .into_iter()
        .map(|(name, faults, vms)| (name, format!("{}{}{vms}", port_profile(faults), link(512))))
        .collect();
    proxy::cluster_behind(proxy, &hosts, &chaos_timing())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Agent {
    Up,
    /// SIGINT sent: aborting what has not committed, then exiting.
    Stopping,
    Down,
}

struct Chaos {
    cluster: Cluster,
    proxy: Proxy,
    rng: StdRng,
    seed: u64,
    began: Instant,
    agents: BTreeMap<&'static str, Agent>,
    /// Step at which each host went down or was told to stop.
    down_since: BTreeMap<&'static str, usize>,
    /// Links in a fault mode, and the step at which they heal.
    heal_at: BTreeMap<String, usize>,
    /// Hosts whose port-profile rollbacks and releases are made to fail, and
    /// the step at which they work again.
    failing_rollbacks: BTreeMap<&'static str, usize>,
    /// Every migration the CLI accepted, in order: (id, "vm src -> dst mode").
    started: Vec<(String, String)>,
    refused: usize,
    background: Vec<Child>,
    step: usize,
    last_status: Value,
    /// Migrations some snapshot showed `unresolved`.
    seen_unresolved: BTreeSet<String>,
    /// Pending rollbacks and releases some snapshot showed: (attempt, stage).
    seen_pending: BTreeSet<(String, String)>,
}

impl Chaos {
    fn say(&self, text: impl AsRef<str>) {
        eprintln!(
            "[{:7.3}s] #{:02} {}",
            self.began.elapsed().as_secs_f64(),
            self.step,
            text.as_ref()
        );
    }

    fn up_hosts(&self) -> Vec<&'static str> {
        HOSTS
            .iter()
            .copied()
            .filter(|h| self.agents[h] == Agent::Up)
            .collect()
    }

    fn not_up_hosts(&self) -> Vec<&'static str> {
        HOSTS
            .iter()
            .copied()
            .filter(|h| self.agents[h] != Agent::Up)
            .collect()
    }

    /// The last lines of every agent's log (all its runs), the status JSON
    /// and the seed: what a failure message needs.
    fn diagnostics(&self, status: &Value) -> String {
        let mut text = format!(
            "seed {} (rerun: TERN_CHAOS_SEED={} cargo test --test chaos)\nstatus: {status}\n",
            self.seed, self.seed
        );
        for host in HOSTS {
            let log = strip_colours(&self.cluster.log(host));
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            text.push_str(&format!(
                "---- {host} log (last {} lines) ----\n{}\n",
                tail.len(),
                tail.join("\n")
            ));
        }
        text
    }

    fn fail(&self, what: &str) -> ! {
        let status = self.cluster.status();
        panic!("{what}\n{}", self.diagnostics(&status));
    }

    /// Start (or restart) an agent and wait until it answers the Console,
    /// so that its signal handlers are in place before it is signalled.
    fn start(&mut self, host: &'static str) {
        if self.agents[host] == Agent::Stopping {
            self.reap_stopping(host);
        }
        self.cluster.start_agent(host);
        self.wait_answering(host);
        self.agents.insert(host, Agent::Up);
        self.down_since.remove(host);
        self.failing_rollbacks.remove(host);
    }

    fn wait_answering(&self, host: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status = self.cluster.status();
            if host_of(&status, host)["connected"] == true {
                return;
            }
            if Instant::now() > deadline {
                self.fail(&format!(
                    "agent {host} did not answer within 20 s of its start"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait for an agent told to stop to exit: it must, within a bound, with 0.
    fn reap_stopping(&mut self, host: &'static str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let exit = loop {
            let child = self
                .cluster
                .hosts
                .iter_mut()
                .find(|h| h.name == host)
                .and_then(|h| h.child.as_mut())
                .expect("a stopping agent has a process");
            if let Some(exit) = child.try_wait().unwrap() {
                break exit;
            }
            if Instant::now() > deadline {
                self.fail(&format!("agent {host} did not exit within 20 s of SIGINT"));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Some(h) = self.cluster.hosts.iter_mut().find(|h| h.name == host) {
            h.child = None;
        }
        self.say(format!("{host} exited after SIGINT: {exit}"));
        if exit.code() != Some(0) {
            self.fail(&format!("agent {host} exited {exit} after SIGINT, not 0"));
        }
        self.agents.insert(host, Agent::Down);
    }

    /// One random action.
    fn act(&mut self) {
        let roll = self.rng.random_range(0..100);
        let not_up = self.not_up_hosts();
        // A host down for a few steps comes back first, so that most of the
        // run has two or three agents to migrate between.
        if let Some(host) = not_up
            .iter()
            .copied()
            .find(|h| self.step >= self.down_since[h] + 4)
        {
            return self.restart(host);
        }
        match roll {
            0..27 => self.migrate(),
            27..35 => self.migrate_again(),
            35..45 if not_up.len() < 2 => self.kill(),
            45..52 if not_up.len() < 2 => self.interrupt(),
            35..60 if !not_up.is_empty() => {
                let host = *not_up.choose(&mut self.rng).unwrap();
                self.restart(host)
            }
            60..80 => self.network(),
            80..85 => self.abort(),
            85..97 => self.fail_rollbacks(),
            _ => self.migrate(),
        }
    }

    fn migrate(&mut self) {
        let count = self.rng.random_range(1..=3);
        for vm in all_vms().choose_multiple(&mut self.rng, count) {
            let on: Vec<String> = guests(&self.last_status, vm, "running");
            let from = on.first().cloned();
            let to = *HOSTS
                .iter()
                .filter(|h| Some(h.to_string()) != from)
                .collect::<Vec<_>>()
                .choose(&mut self.rng)
                .unwrap();
            let mode = *["fast", "safe"].choose(&mut self.rng).unwrap();
            self.start_migration(vm, from.as_deref().unwrap_or("?"), to, mode);
        }
    }

    /// What an operator does after a failure: the same move again, to the
    /// host that has just rolled the VM back (and may have failed to).
    fn migrate_again(&mut self) {
        let mut failed: Vec<&Value> = self.last_status["migrations"]
            .as_array()
            .map(|all| {
                all.iter()
                    .filter(|m| m["outcome"] == "failed" || m["outcome"] == "aborted")
                    .collect()
            })
            .unwrap_or_default();
        failed.sort_by_key(|m| std::cmp::Reverse(m["updated_at_ms"].as_u64()));
        let recent = &failed[..failed.len().min(3)];
        let Some(m) = recent.choose(&mut self.rng).copied() else {
            return self.migrate();
        };
        let field = |k: &str| m[k].as_str().unwrap_or_default().to_string();
        let (vm, from, to, mode) = (
            field("vm"),
            field("source"),
            field("destination"),
            field("mode"),
        );
        self.start_migration(&vm, &from, &to, &mode);
    }

    /// `tern migrate VM --to TO --no-wait`; a refusal is fine (the VM is
    /// busy, its host or the destination is down): it is counted and shown.
    fn start_migration(&mut self, vm: &str, from: &str, to: &str, mode: &str) {
        let out = self.cluster.tern(&[
            "migrate",
            vm,
            "--to",
            to,
            "--mode",
            mode,
            "--no-wait",
            "--json",
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let record: Option<Value> = stdout
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))
            .and_then(|l| serde_json::from_str(l).ok());
        let what = format!("{vm} {from} -> {to} {mode}");
        match (out.status.code(), record) {
            (Some(0), Some(record)) => {
                let id = record["id"].as_str().unwrap().to_string();
                self.say(format!("migrate {what}: started {id}"));
                self.started.push((id, what));
            }
            (code, _) => {
                self.refused += 1;
                let stderr = String::from_utf8_lossy(&out.stderr);
                self.say(format!(
                    "migrate {what}: refused (exit {code:?}): {}",
                    stderr.lines().last().unwrap_or_default()
                ));
            }
        }
    }

    fn kill(&mut self) {
        let candidates: Vec<&'static str> = HOSTS
            .iter()
            .copied()
            .filter(|h| self.agents[h] != Agent::Down)
            .collect();
        let Some(&host) = candidates.choose(&mut self.rng) else {
            return self.migrate();
        };
        self.cluster.kill(host);
        self.say(format!("SIGKILL {host}"));
        self.agents.insert(host, Agent::Down);
        self.down_since.entry(host).or_insert(self.step);
        self.failing_rollbacks.remove(host);
    }

    fn interrupt(&mut self) {
        let up = self.up_hosts();
        let Some(&host) = up.choose(&mut self.rng) else {
            return self.migrate();
        };
        self.cluster.signal(host, libc::SIGINT);
        self.say(format!("SIGINT {host}"));
        self.agents.insert(host, Agent::Stopping);
        self.down_since.insert(host, self.step);
        // Run-time faults go with the process: a restarted agent has its config's.
        self.failing_rollbacks.remove(host);
    }

    fn restart(&mut self, host: &'static str) {
        self.start(host);
        self.say(format!("restarted {host}"));
    }

    fn network(&mut self) {
        let from = *HOSTS.choose(&mut self.rng).unwrap();
        let to = *HOSTS
            .iter()
            .filter(|h| **h != from)
            .collect::<Vec<_>>()
            .choose(&mut self.rng)
            .unwrap();
        let scope_roll = self.rng.random_range(0..100);
        let (scope, links): (String, Vec<String>) = match scope_roll {
            0..50 => (link_name(from, to), vec![link_name(from, to)]),
            50..85 => (
                format!("{from}<->{to}"),
                vec![link_name(from, to), link_name(to, from)],
            ),
            _ => ("every link".to_string(), self.proxy.names()),
        };
        let lasts = self.rng.random_range(1..=4);
        let mode = match self.rng.random_range(0..100) {
            0..30 => Mode::Delay(self.rng.random_range(20..=200)),
            30..55 => Mode::Blackhole,
            55..75 => Mode::Refuse,
            75..90 => {
                for l in &links {
                    self.proxy.cut(l);
                }
                return self.say(format!("cut {scope}"));
            }
            _ => {
                for l in &links {
                    self.proxy.set(l, Mode::Pass);
                    self.heal_at.remove(l);
                }
                return self.say(format!("{scope}: healed"));
            }
        };
        for l in &links {
            self.proxy.set(l, mode);
            self.heal_at.insert(l.clone(), self.step + lasts);
        }
        self.say(format!("{scope}: {mode:?} for {lasts} steps"));
    }

    /// Heal the links, and the switches, whose fault has run its course.
    fn heal_due(&mut self) {
        let due: Vec<&'static str> = self
            .failing_rollbacks
            .iter()
            .filter(|(_, at)| **at <= self.step)
            .map(|(h, _)| *h)
            .collect();
        for host in due {
            self.restore_faults(host);
        }
        let due: Vec<String> = self
            .heal_at
            .iter()
            .filter(|(_, at)| **at <= self.step)
            .map(|(l, _)| l.clone())
            .collect();
        for l in due {
            self.proxy.set(&l, Mode::Pass);
            self.heal_at.remove(&l);
            self.say(format!("{l}: healed"));
        }
    }

    /// `tern abort` of one of the last migrations started, in the
    /// background: it waits for the attempt to end, which may take a peer
    /// timeout.
    fn abort(&mut self) {
        let recent = &self.started[self.started.len().saturating_sub(3)..];
        let Some((id, _)) = recent.choose(&mut self.rng).cloned() else {
            return self.migrate();
        };
        let child = Command::new(TERN)
            .args(["abort", &id])
            .env("TERN_INVENTORY", &self.cluster.inventory)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.background.push(child);
        self.say(format!("abort {id} (in the background)"));
    }

    /// Make a host's port-profile rollbacks and releases fail for a few
    /// steps: they are left pending, and retried once the switch works again.
    fn fail_rollbacks(&mut self) {
        let up: Vec<&'static str> = self
            .up_hosts()
            .into_iter()
            .filter(|h| !self.failing_rollbacks.contains_key(h))
            .collect();
        let Some(&host) = up.choose(&mut self.rng) else {
            return self.migrate();
        };
        let lasts = self.rng.random_range(5..=15);
        let mut args = vec!["fault", host, "port-profile"];
        args.extend(baseline_fault_flags(host));
        args.push("--fail-rollback");
        let out = self.cluster.tern(&args);
        if out.status.success() {
            self.failing_rollbacks.insert(host, self.step + lasts);
        }
        self.say(format!(
            "{host} port-profile rollbacks fail for {lasts} steps: exit {:?}",
            out.status.code()
        ));
    }

    /// Give a host its configured port-profile faults back.
    fn restore_faults(&mut self, host: &'static str) {
        self.failing_rollbacks.remove(host);
        let mut args = vec!["fault", host, "port-profile"];
        args.extend(baseline_fault_flags(host));
        let out = self.cluster.tern(&args);
        assert!(
            out.status.success(),
            "restoring {host}'s faults: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.say(format!("{host} port-profile rollbacks work again"));
    }

    /// Invariant 1 while things move: no VM runs on two hosts. Snapshots are
    /// not atomic across hosts (a VM that just moved can show running on the
    /// old host, answered first, and the new one, answered later), so only a
    /// second snapshot with no command in between that shows it too counts.
    fn check_running_once(&mut self) {
        let status = self.cluster.status();
        for m in status["migrations"].as_array().unwrap() {
            if m["outcome"] == "unresolved" {
                self.seen_unresolved
                    .insert(m["id"].as_str().unwrap().to_string());
            }
        }
        for h in status["hosts"].as_array().unwrap() {
            for p in h["pending_rollbacks"].as_array().unwrap() {
                self.seen_pending.insert((
                    p["attempt_id"].as_str().unwrap().to_string(),
                    p["stage"].as_str().unwrap().to_string(),
                ));
            }
        }
        if doubly_running(&status).is_empty() {
            self.last_status = status;
            return;
        }
        let again = self.cluster.status();
        let twice = doubly_running(&again);
        if !twice.is_empty() {
            self.fail(&format!(
                "VM(s) running on two hosts at once: {twice:?} (first snapshot: {status})"
            ));
        }
        self.last_status = again;
    }

    /// Stop the chaos: heal the network, bring every agent back, put the
    /// faults back, let the background commands end.
    fn calm_down(&mut self) {
        self.proxy.set_all(Mode::Pass);
        self.heal_at.clear();
        self.say("network healed");
        for host in self.not_up_hosts() {
            self.restart(host);
        }
        let failing: Vec<&'static str> = self.failing_rollbacks.keys().copied().collect();
        for host in failing {
            self.restore_faults(host);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        for mut child in std::mem::take(&mut self.background) {
            while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Where each VM ends up is what its latest migration says; a VM with a
    /// port-profile holds its association where it runs, unless the move
    /// that brought it there could not ASSOCIATE (a degraded move).
    fn assert_where_vms_run(&self, status: &Value) {
        let migrations = status["migrations"].as_array().unwrap();
        for vm in all_vms() {
            let on = guests(status, &vm, "running");
            let latest = migrations
                .iter()
                .filter(|m| m["vm"] == vm.as_str())
                .max_by_key(|m| m["started_at_ms"].as_u64().unwrap());
            if let Some(m) = latest {
                assert_eq!(
                    on,
                    vec![m["running_on"].as_str().unwrap().to_string()],
                    "{vm} does not run where its latest migration says\n{}",
                    self.diagnostics(status)
                );
            }
        }
        for m in migrations {
            assert!(
                m["running_on"] == m["source"] || m["running_on"] == m["destination"],
                "a migration that runs its VM neither on its source nor its destination: {m}"
            );
        }

        // A VM with a port-profile holds its association where it runs, unless
        // the move that brought it there could not ASSOCIATE (a degraded move).
        for v in status["vms"].as_array().unwrap() {
            let (vm, host) = (v["name"].as_str().unwrap(), v["host"].as_str().unwrap());
            if !v["features"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["name"] == "port-profile")
            {
                continue;
            }
            let arrival = migrations
                .iter()
                .filter(|m| m["vm"] == vm && m["running_on"] == m["destination"])
                .max_by_key(|m| m["started_at_ms"].as_u64().unwrap());
            if let Some(m) = arrival
                && feature(m, "port-profile")["finish"] != "ok"
            {
                continue;
            }
            let held: Vec<&Value> = host_of(status, host)["feature_state"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|s| s["vm"] == vm && s["feature"] == "port-profile")
                .collect();
            assert!(
                held.len() == 1 && held[0]["state"] == "associated",
                "{vm} runs on {host} without its port-profile association (held there: {held:?}; the move that brought it: {})\n{}",
                arrival
                    .map(|m| m.to_string())
                    .unwrap_or_else(|| "none, it booted there".into()),
                self.diagnostics(status)
            );
        }
    }

    /// Source and destination journals agree on every attempt: a migration
    /// that succeeded (or degraded) committed on its destination, one that
    /// failed or was aborted did not; no destination attempt is left open.
    fn journals_agree(&self, status: &Value) {
        let journals: BTreeMap<&str, Journal> = HOSTS
            .iter()
            .map(|h| {
                let dir = self.cluster.path().join(format!("{h}-state"));
                (*h, Journal::open(&dir).expect("open a journal"))
            })
            .collect();
        for (host, journal) in &journals {
            let open = journal.open_destination_attempts().unwrap();
            assert!(
                open.is_empty(),
                "{host}'s journal has open destination attempts after settling: {:?}",
                open.iter().map(|a| &a.attempt_id).collect::<Vec<_>>()
            );
        }
        for m in status["migrations"].as_array().unwrap() {
            let attempt = m["attempt_id"].as_str().unwrap();
            let destination = m["destination"].as_str().unwrap();
            let committed = journals[destination]
                .destination_attempt(attempt)
                .unwrap()
                .is_some_and(|a| a.is_committed());
            let moved = m["outcome"] == "succeeded" || m["outcome"] == "degraded";
            assert_eq!(
                committed,
                moved,
                "the source's record and {destination}'s journal disagree on attempt {attempt}: {m}\n{}",
                self.diagnostics(status)
            );
        }
    }

    /// Everything that must hold once the cluster has settled; empty when it has.
    fn unsettled(&self, status: &Value) -> Vec<String> {
        let mut problems = Vec::new();
        for h in status["hosts"].as_array().unwrap() {
            if h["connected"] != true {
                problems.push(format!(
                    "host {} not connected: {}",
                    text(&h["name"]),
                    text(&h["error"])
                ));
            }
        }
        let records: BTreeMap<&str, &Value> = status["migrations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (m["id"].as_str().unwrap(), m))
            .collect();
        for m in records.values() {
            if m["outcome"].is_null() || m["outcome"] == "unresolved" {
                problems.push(format!(
                    "migration {} ({} -> {}) has no final outcome: {}",
                    text(&m["id"]),
                    text(&m["source"]),
                    text(&m["destination"]),
                    m["outcome"]
                ));
            }
        }
        for (id, what) in &self.started {
            if !records.contains_key(id.as_str()) {
                problems.push(format!(
                    "migration {id} ({what}) was accepted but is not in the status"
                ));
            }
        }
        let vms = status["vms"].as_array().unwrap();
        for name in all_vms() {
            let copies: Vec<String> = vms
                .iter()
                .filter(|v| v["name"] == name.as_str())
                .map(|v| format!("{} {}", text(&v["state"]), text(&v["host"])))
                .collect();
            let running = guests(status, &name, "running");
            if running.len() != 1 || copies.len() != 1 {
                problems.push(format!(
                    "{name} must run on exactly one host and nowhere else: {}",
                    copies.join(", ")
                ));
            }
        }
        for v in vms {
            if !v["migration_id"].is_null() {
                problems.push(format!(
                    "{} on {} still locked by {}",
                    text(&v["name"]),
                    text(&v["host"]),
                    text(&v["migration_id"])
                ));
            }
        }
        for h in status["hosts"].as_array().unwrap() {
            let host = h["name"].as_str().unwrap();
            for s in h["feature_state"].as_array().unwrap() {
                let vm = s["vm"].as_str().unwrap();
                if guests(status, vm, "running").iter().any(|r| r == host) {
                    continue;
                }
                let pending = h["pending_rollbacks"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["vm"] == vm && p["feature"] == s["feature"]);
                if !pending {
                    problems.push(format!(
                        "{host} holds {} state {} for {vm}, which does not run there, and lists no pending rollback for it",
                        text(&s["feature"]),
                        text(&s["state"])
                    ));
                }
            }
        }
        problems
    }
}

/// A JSON string as plain text ("" for anything else).
fn text(value: &Value) -> &str {
    value.as_str().unwrap_or_default()
}

/// The agents log with ANSI colours; a panic message reads better without.
fn strip_colours(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ parameters… final letter
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn all_vms() -> Vec<String> {
    [
        "web-01", "batch-01", "db-01", "cache-01", "app-01", "log-01",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The VMs a status shows running on more than one host, with those hosts.
fn doubly_running(status: &Value) -> Vec<(String, Vec<String>)> {
    all_vms()
        .into_iter()
        .map(|vm| {
            let on = guests(status, &vm, "running");
            (vm, on)
        })
        .filter(|(_, on)| on.len() > 1)
        .collect()
}

fn seed() -> u64 {
    match std::env::var("TERN_CHAOS_SEED") {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("TERN_CHAOS_SEED={text:?} is not a u64")),
        Err(_) => rand::random(),
    }
}

/// How many rounds to run, each on a fresh cluster with the next seed:
/// `TERN_CHAOS_ROUNDS=N` makes a longer soak by hand.
fn rounds() -> u64 {
    match std::env::var("TERN_CHAOS_ROUNDS") {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("TERN_CHAOS_ROUNDS={text:?} is not a number")),
        Err(_) => 1,
    }
}

#[test]
fn random_migrations_under_crashes_signals_and_a_faulty_network_settle_into_the_invariants() {
    let first = seed();
    let rounds = rounds();
    for round in 0..rounds {
        let seed = first.wrapping_add(round);
        eprintln!(
            "chaos round {} of {rounds}, seed: {seed} (rerun with TERN_CHAOS_SEED={seed})",
            round + 1
        );
        chaos_round(seed);
    }
}

/// One round on a fresh cluster: the chaos, then the cluster must settle
/// into the invariants.
fn chaos_round(seed: u64) {
    let began = Instant::now();
    let mut proxy = Proxy::new();
    let cluster = start_cluster(&mut proxy);
    let mut chaos = Chaos {
        cluster,
        proxy,
        rng: StdRng::seed_from_u64(seed),
        seed,
        began,
        agents: HOSTS.iter().map(|h| (*h, Agent::Up)).collect(),
        down_since: BTreeMap::new(),
        heal_at: BTreeMap::new(),
        failing_rollbacks: BTreeMap::new(),
        started: Vec::new(),
        refused: 0,
        background: Vec::new(),
        step: 0,
        last_status: Value::Null,
        seen_unresolved: BTreeSet::new(),
        seen_pending: BTreeSet::new(),
    };
    // Each agent must answer before anything happens to it.
    for host in HOSTS {
        chaos.wait_answering(host);
    }
    chaos.check_running_once();
    chaos.say("cluster up");

    let actions = match std::env::var("TERN_CHAOS_ACTIONS") {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("TERN_CHAOS_ACTIONS={text:?} is not a number")),
        Err(_) => ACTIONS,
    };
    for step in 1..=actions {
        chaos.step = step;
        chaos.heal_due();
        chaos.act();
        let pause = chaos.rng.random_range(0..250);
        std::thread::sleep(Duration::from_millis(pause));
        chaos.check_running_once();
    }
    let chaos_ended = began.elapsed();

    chaos.step += 1;
    chaos.calm_down();
    let calm = Instant::now();
    let mut status;
    let mut problems;
    loop {
        status = chaos.cluster.status();
        problems = chaos.unsettled(&status);
        if problems.is_empty() {
            break;
        }
        if calm.elapsed() > SETTLE {
            panic!(
                "the cluster did not settle within {SETTLE:?} of the chaos stopping:\n- {}\n{}",
                problems.join("\n- "),
                chaos.diagnostics(&status)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let settled_after = calm.elapsed();
    chaos.say(format!("settled after {settled_after:?}"));

    chaos.assert_where_vms_run(&status);

    // Invariant 4, from the journals themselves: stop every agent (which must
    // go cleanly) and read each destination's journal.
    for host in HOSTS {
        chaos.cluster.signal(host, libc::SIGINT);
        chaos.agents.insert(host, Agent::Stopping);
    }
    for host in HOSTS {
        chaos.reap_stopping(host);
    }
    chaos.journals_agree(&status);

    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    for m in status["migrations"].as_array().unwrap() {
        eprintln!(
            "{} {} {} -> {} {}: {}{}",
            m["id"].as_str().unwrap(),
            m["vm"].as_str().unwrap(),
            m["source"].as_str().unwrap(),
            m["destination"].as_str().unwrap(),
            m["mode"].as_str().unwrap_or_default(),
            m["outcome"].as_str().unwrap_or_default(),
            m["error"]
                .as_str()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        );
        *outcomes
            .entry(m["outcome"].as_str().unwrap_or("none").to_string())
            .or_default() += 1;
    }
    let pending: usize = status["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["pending_rollbacks"].as_array().unwrap().len())
        .sum();
    let (mut connections, mut bytes, mut resets) = (0, 0, 0);
    for l in chaos.proxy.names() {
        let (c, b, r) = chaos.proxy.stats(&l);
        eprintln!("proxy {l}: {c} connections, {b} bytes, {r} resets");
        connections += c;
        bytes += b;
        resets += r;
    }
    assert!(
        connections > 0 && bytes > 0,
        "no peer traffic went through the fault proxy: the agents bypass it"
    );
    eprintln!(
        "chaos seed {seed}: {} migrations started, {} refused, outcomes {outcomes:?} ({} seen unresolved during the chaos); {} rollbacks or releases seen pending, {pending} still pending; proxy: {connections} connections, {bytes} bytes, {resets} resets; chaos {chaos_ended:?}, settled {settled_after:?} later, total {:?}",
        chaos.started.len(),
        chaos.refused,
        chaos.seen_unresolved.len(),
        chaos.seen_pending.len(),
        began.elapsed()
    );
}
