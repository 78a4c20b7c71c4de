//! What the console knows of the cluster, folded from the agents' Watch
//! streams: hosts and whether they are reachable, VMs, migrations with
//! their transfer history, and the event log. Pure: no IO, no clock reads.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::host::evacuation::job::Evacuation;
use crate::proto;

/// How many events the log keeps.
pub const EVENT_LOG: usize = 2_000;
/// How many transfer samples a migration keeps for its sparklines.
pub const SAMPLES: usize = 120;

#[derive(Debug, Clone, PartialEq)]
pub enum Link {
    Connecting,
    Connected,
    /// Unreachable since `since_ms` (unix ms).
    Lost {
        since_ms: u64,
        error: String,
    },
    /// Connected, but its agent has not answered within `deadline_ms` since
    /// `since_ms`: the host hangs (stopped, or its agent's core is stuck).
    Silent {
        since_ms: u64,
        deadline_ms: u64,
    },
}

#[derive(Debug, Clone)]
pub struct HostView {
    pub name: String,
    pub link: Link,
    /// The agent's last GetHost-style report, once connected.
    pub info: Option<proto::Host>,
}

#[derive(Debug, Clone, Default)]
pub struct MigrationView {
    pub record: proto::MigrationRecord,
    /// Earlier attempts of the same migration, oldest first.
    pub history: Vec<proto::MigrationRecord>,
    /// Transfer rate samples, bytes/s.
    pub rate: VecDeque<u64>,
    /// Dirty-page rate samples, bytes/s.
    pub dirty: VecDeque<u64>,
    /// (unix ms, bytes transferred) of the last progress report.
    last_sample: Option<(u64, u64)>,
}

/// A migration's lines from its hosts' own logs, as the detail's logs
/// panel shows them: fetched when the detail opens and again every few
/// seconds while it is open, never waited for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MigrationLogs {
    pub id: String,
    /// Every host's lines, merged in time order (terminal-safe).
    pub lines: Vec<proto::AttemptLogLine>,
    /// What is missing from them, one note per host ("hv-b: no answer in 1 s").
    pub missing: Vec<String>,
    /// When the last answer came (the cluster's clock); `None`: none yet.
    pub fetched_ms: Option<u64>,
    /// A fetch is out.
    pub loading: bool,
}

impl MigrationLogs {
    /// The hosts whose logs hold lines of `m`: its source, then every
    /// destination of its attempts, the latest first.
    pub fn hosts_of(m: &MigrationView) -> Vec<String> {
        let mut hosts: Vec<String> = Vec::new();
        let named = std::iter::once(&m.record.source)
            .chain(std::iter::once(&m.record.destination))
            .chain(m.history.iter().rev().map(|r| &r.destination));
        for host in named {
            if !host.is_empty() && !hosts.contains(host) {
                hosts.push(host.clone());
            }
        }
        hosts
    }
}

#[derive(Debug, Clone)]
pub struct LogEntry {
    pub host: String,
    pub line: proto::LogLine,
}

/// Operators' actions kept per migration (the newest).
const ACTIONS_KEPT: usize = 16;

#[derive(Debug, Clone, Default)]
pub struct ClusterState {
    pub cluster: String,
    /// In inventory order.
    pub hosts: Vec<HostView>,
    /// Every guest each host reports, by (host, VM).
    pub vms: BTreeMap<(String, String), proto::Vm>,
    pub migrations: BTreeMap<String, MigrationView>,
    /// Every evacuation the agents report, by id.
    /// Converted once, as they arrive: views read them every frame.
    pub evacuations: BTreeMap<String, Evacuation>,
    /// The table's order, kept as records change (progress does not move a
    /// row), so a frame reads only the rows it shows.
    order: BTreeSet<OrderKey>,
    pub events: VecDeque<LogEntry>,
    /// Who started, aborted, retried or forced each migration, from the
    /// agents' audit trails, oldest first.
    pub actions: BTreeMap<String, Vec<proto::AuditEntry>>,
    pub now_ms: u64,
}

impl ClusterState {
    pub fn new(cluster: &str, hosts: &[String]) -> ClusterState {
        ClusterState {
            cluster: cluster.to_string(),
            hosts: hosts
                .iter()
                .map(|name| HostView {
                    name: name.clone(),
                    link: Link::Connecting,
                    info: None,
                })
                .collect(),
            ..ClusterState::default()
        }
    }

    pub fn host(&self, name: &str) -> Option<&HostView> {
        self.hosts.iter().find(|h| h.name == name)
    }

    fn host_mut(&mut self, name: &str) -> &mut HostView {
        if let Some(i) = self.hosts.iter().position(|h| h.name == name) {
            return &mut self.hosts[i];
        }
        self.hosts.push(HostView {
            name: name.to_string(),
            link: Link::Connecting,
            info: None,
        });
        self.hosts.last_mut().expect("just pushed")
    }

    pub fn connected(&mut self, host: &str) {
        self.host_mut(host).link = Link::Connected;
    }

    pub fn silent(&mut self, host: &str, since_ms: u64, deadline_ms: u64) {
        self.host_mut(host).link = Link::Silent {
            since_ms,
            deadline_ms,
        };
    }

    pub fn lost(&mut self, host: &str, since_ms: u64, error: &str) {
        self.host_mut(host).link = Link::Lost {
            since_ms,
            error: error.to_string(),
        };
    }

    /// Fold one agent event in.
    pub fn apply(&mut self, event: proto::Event) {
        let host = event.host.clone();
        let Some(kind) = event.kind else { return };
        use proto::event::Kind;
        match kind {
            Kind::Snapshot(snapshot) => {
                self.host_mut(&host).info = snapshot.host;
                self.vms.retain(|(h, _), _| h != &host);
                for vm in snapshot.vms {
                    self.vms.insert((host.clone(), vm.name.clone()), vm);
                }
                for record in snapshot.migrations {
                    self.record(record);
                }
                for evacuation in &snapshot.evacuations {
                    self.evacuations
                        .insert(evacuation.id.clone(), Evacuation::from(evacuation));
                }
            }
            Kind::Migration(record) => self.record(record),
            Kind::Evacuation(evacuation) => {
                self.evacuations
                    .insert(evacuation.id.clone(), Evacuation::from(&evacuation));
            }
            Kind::Progress(progress) => {
                let Some(m) = self.migrations.get_mut(&progress.migration_id) else {
                    return;
                };
                if m.record.attempt_id != progress.attempt_id {
                    return;
                }
                if let Some(stats) = progress.stats {
                    m.sample(self.now_ms, &stats);
                    m.record.transfer = Some(stats);
                }
                // The source's outlook moves with its samples; a sample
                // without one keeps the last (the model needs two samples).
                if progress.convergence.is_some() {
                    m.record.convergence = progress.convergence;
                }
            }
            Kind::HostChanged(info) => self.host_mut(&host).info = Some(info),
            Kind::Vm(vm) => {
                self.vms.insert((host, vm.name.clone()), vm);
            }
            Kind::VmRemoved(name) => {
                self.vms.remove(&(host, name));
            }
            Kind::Log(line) => self.log(host, line),
            Kind::Audit(entry) => {
                self.log(host, audit_line(&entry));
                self.add_actions(vec![entry]);
            }
        }
    }

    /// Operators' actions on migrations (their audit entries that were
    /// carried out), each kept once, oldest first, a few per migration.
    pub fn add_actions(&mut self, entries: Vec<proto::AuditEntry>) {
        for entry in entries {
            if !entry.ok || !entry.target.starts_with("m-") || entry.role == "agent" {
                continue;
            }
            let list = self.actions.entry(entry.target.clone()).or_default();
            if list.contains(&entry) {
                continue;
            }
            list.push(entry);
            list.sort_by_key(|e| e.at_ms);
            if list.len() > ACTIONS_KEPT {
                list.remove(0);
            }
        }
    }

    /// Append to the event log, which keeps the last [`EVENT_LOG`] lines.
    pub fn log(&mut self, host: String, line: proto::LogLine) {
        if self.events.len() == EVENT_LOG {
            self.events.pop_front();
        }
        self.events.push_back(LogEntry { host, line });
    }

    /// A migration's latest record: a new attempt pushes the last one into
    /// the history.
    fn record(&mut self, record: proto::MigrationRecord) {
        let id = record.id.clone();
        let before = self.migrations.get(&id).map(|m| order_key(&m.record));
        self.replace_record(record);
        let after = self.migrations.get(&id).map(|m| order_key(&m.record));
        if before != after {
            if let Some(k) = before {
                self.order.remove(&k);
            }
            if let Some(k) = after {
                self.order.insert(k);
            }
        }
    }

    fn replace_record(&mut self, record: proto::MigrationRecord) {
        let m = self.migrations.entry(record.id.clone()).or_default();
        if !m.record.attempt_id.is_empty() && m.record.attempt_id != record.attempt_id {
            if record.attempt < m.record.attempt {
                // An older attempt reported late: history only.
                if !m.history.iter().any(|h| h.attempt_id == record.attempt_id) {
                    m.history.push(record);
                    m.history.sort_by_key(|h| h.attempt);
                }
                return;
            }
            let previous = std::mem::take(&mut m.record);
            m.history.push(previous);
            m.rate.clear();
            m.dirty.clear();
            m.last_sample = None;
        }
        m.record = record;
    }

    /// How many guests `host` reports.
    pub fn vm_count(&self, host: &str) -> usize {
        self.vms
            .range((host.to_string(), String::new())..)
            .take_while(|((h, _), _)| h == host)
            .count()
    }

    /// Running migrations out of and into each host, in one pass.
    pub fn moving(&self) -> BTreeMap<&str, (usize, usize)> {
        let mut moving: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
        for m in self.migrations.values().filter(|m| m.record.outcome == 0) {
            moving.entry(&m.record.source).or_default().0 += 1;
            moving.entry(&m.record.destination).or_default().1 += 1;
        }
        moving
    }

    /// Where a VM runs (or is paused): the host whose copy is not incoming.
    pub fn vm_host(&self, vm: &str) -> Option<&str> {
        self.vms
            .iter()
            .find(|((_, name), v)| {
                name == vm
                    && matches!(
                        proto::GuestState::try_from(v.state),
                        Ok(proto::GuestState::Running | proto::GuestState::Paused)
                    )
            })
            .map(|((host, _), _)| host.as_str())
    }

    /// Evacuations newest first (a handful per host at most: sorted per
    /// call).
    pub fn ordered_evacuations(&self) -> Vec<&Evacuation> {
        let mut all: Vec<&Evacuation> = self.evacuations.values().collect();
        all.sort_by(|a, b| {
            b.started_at_ms
                .cmp(&a.started_at_ms)
                .then_with(|| a.id.cmp(&b.id))
        });
        all
    }

    /// The evacuation of `host` that has not ended, if any (an agent runs
    /// one at a time).
    pub fn active_evacuation(&self, host: &str) -> Option<&Evacuation> {
        self.evacuations
            .values()
            .find(|e| e.host == host && !e.state.is_over())
    }

    /// Migrations in the order the table shows them: running first, then
    /// unresolved, failed, and the rest; newest first within each.
    pub fn ordered_migrations(&self) -> Vec<&MigrationView> {
        self.ordered().collect()
    }

    /// Where migration `id` sits in that order.
    pub fn position(&self, id: &str) -> Option<usize> {
        let key = order_key(&self.migrations.get(id)?.record);
        Some(self.order.range(..key).count())
    }

    /// The same order, lazily: a frame takes only the rows it shows.
    pub fn ordered(&self) -> impl Iterator<Item = &MigrationView> {
        self.order.iter().filter_map(|k| self.migrations.get(&k.2))
    }

    #[cfg(test)]
    fn ordered_by_sorting(&self) -> Vec<&MigrationView> {
        // Keys computed once and borrowed: cloning the id per comparison
        // was half a frame with 10,000 migrations (benches/console.rs).
        let mut keyed: Vec<(u8, std::cmp::Reverse<u64>, &str, &MigrationView)> = self
            .migrations
            .values()
            .map(|m| {
                (
                    outcome_rank(m.record.outcome),
                    std::cmp::Reverse(m.record.started_at_ms),
                    m.record.id.as_str(),
                    m,
                )
            })
            .collect();
        keyed.sort_unstable_by(|a, b| (a.0, a.1, a.2).cmp(&(b.0, b.1, b.2)));
        keyed.into_iter().map(|(_, _, _, m)| m).collect()
    }
}

/// Where a migration sorts: outcome rank, newest first, then id.
type OrderKey = (u8, Reverse<u64>, String);

fn order_key(r: &proto::MigrationRecord) -> OrderKey {
    (
        outcome_rank(r.outcome),
        Reverse(r.started_at_ms),
        r.id.clone(),
    )
}

/// Running, then what needs an operator (a lost guest first), then the rest.
pub fn outcome_rank(outcome: i32) -> u8 {
    match proto::Outcome::try_from(outcome) {
        Ok(proto::Outcome::None) => 0,
        Ok(proto::Outcome::Lost) => 1,
        Ok(proto::Outcome::Unresolved) => 2,
        Ok(proto::Outcome::Failed) => 3,
        Ok(proto::Outcome::Degraded) => 4,
        Ok(proto::Outcome::Aborted) => 5,
        _ => 6,
    }
}

impl MigrationView {
    /// The hypervisor reports its own rates; a report with none (0) is
    /// measured from the bytes moved since the last one.
    fn sample(&mut self, now_ms: u64, stats: &proto::TransferStats) {
        let measured = self.last_sample.and_then(|(at, transferred)| {
            (now_ms > at).then(|| {
                let dt = (now_ms - at) as f64 / 1000.0;
                (stats.bytes_transferred.saturating_sub(transferred) as f64 / dt) as u64
            })
        });
        let rate = match stats.rate_bytes_s {
            0 => measured,
            r => Some(r),
        };
        if let Some(rate) = rate {
            push_capped(&mut self.rate, rate);
            push_capped(&mut self.dirty, stats.dirty_rate_bytes_s);
        }
        self.last_sample = Some((now_ms, stats.bytes_transferred));
    }

    /// The latest transfer rate, bytes/s.
    pub fn current_rate(&self) -> Option<u64> {
        self.rate.back().copied()
    }
}

fn push_capped(samples: &mut VecDeque<u64>, value: u64) {
    if samples.len() == SAMPLES {
        samples.pop_front();
    }
    samples.push_back(value);
}

/// An audit entry as the event log shows it: who did what to what, and
/// what came of it. A refusal is a warning.
pub fn audit_line(entry: &proto::AuditEntry) -> proto::LogLine {
    let outcome = if entry.ok { "" } else { "refused: " };
    proto::LogLine {
        at_ms: entry.at_ms,
        level: if entry.ok { "info" } else { "warn" }.into(),
        migration_id: if entry.target.starts_with("m-") {
            entry.target.clone()
        } else {
            String::new()
        },
        text: format!(
            "{} ({}) {} {}: {outcome}{}",
            entry.who, entry.role, entry.action, entry.target, entry.result
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, attempt: u32, outcome: proto::Outcome) -> proto::MigrationRecord {
        proto::MigrationRecord {
            id: id.into(),
            vm: "web-01".into(),
            source: "hv-a".into(),
            destination: "hv-b".into(),
            attempt,
            attempt_id: format!("{id}.{attempt}"),
            outcome: outcome as i32,
            ..Default::default()
        }
    }

    fn event(host: &str, kind: proto::event::Kind) -> proto::Event {
        proto::Event {
            host: host.into(),
            kind: Some(kind),
        }
    }

    #[test]
    fn a_snapshot_replaces_what_the_host_reported_before() {
        let mut s = ClusterState::new("demo", &["hv-a".into(), "hv-b".into()]);
        let vm = |name: &str| proto::Vm {
            name: name.into(),
            state: proto::GuestState::Running as i32,
            ..Default::default()
        };
        s.apply(event(
            "hv-a",
            proto::event::Kind::Snapshot(proto::Snapshot {
                host: None,
                vms: vec![vm("web-01"), vm("db-01")],
                migrations: vec![],
                evacuations: vec![],
            }),
        ));
        s.apply(event(
            "hv-a",
            proto::event::Kind::Snapshot(proto::Snapshot {
                host: None,
                vms: vec![vm("db-01")],
                migrations: vec![],
                evacuations: vec![],
            }),
        ));
        assert_eq!(s.vm_host("db-01"), Some("hv-a"));
        assert_eq!(s.vm_host("web-01"), None);
    }

    #[test]
    fn a_new_attempt_keeps_the_previous_one_in_the_history() {
        let mut s = ClusterState::new("demo", &["hv-a".into()]);
        let m = |r| event("hv-a", proto::event::Kind::Migration(r));
        s.apply(m(record("m-1", 1, proto::Outcome::Failed)));
        s.apply(m(record("m-1", 2, proto::Outcome::None)));
        // A late report of attempt 1 does not replace attempt 2.
        s.apply(m(record("m-1", 1, proto::Outcome::Failed)));
        let view = &s.migrations["m-1"];
        assert_eq!(view.record.attempt, 2);
        assert_eq!(view.history.len(), 1);
        assert_eq!(view.history[0].attempt, 1);
    }

    #[test]
    fn running_migrations_come_first_then_lost_unresolved_and_failed() {
        let mut s = ClusterState::new("demo", &["hv-a".into()]);
        for (id, outcome) in [
            ("m-ok", proto::Outcome::Succeeded),
            ("m-failed", proto::Outcome::Failed),
            ("m-lost", proto::Outcome::Lost),
            ("m-running", proto::Outcome::None),
            ("m-unresolved", proto::Outcome::Unresolved),
        ] {
            s.apply(event(
                "hv-a",
                proto::event::Kind::Migration(record(id, 1, outcome)),
            ));
        }
        let order: Vec<&str> = s
            .ordered_migrations()
            .iter()
            .map(|m| m.record.id.as_str())
            .collect();
        assert_eq!(
            order,
            ["m-running", "m-lost", "m-unresolved", "m-failed", "m-ok"]
        );
    }

    #[test]
    fn the_kept_order_is_the_sorted_order_through_new_attempts_and_outcomes() {
        let mut s = ClusterState::new("demo", &["hv-a".into()]);
        let outcomes = [
            proto::Outcome::None,
            proto::Outcome::Failed,
            proto::Outcome::Succeeded,
            proto::Outcome::Unresolved,
            proto::Outcome::Aborted,
        ];
        for i in 0..200u32 {
            let mut r = record(
                &format!("m-{}", i % 37),
                1 + i / 37,
                outcomes[(i % 5) as usize],
            );
            r.started_at_ms = u64::from(i * 7 % 13);
            s.apply(event("hv-a", proto::event::Kind::Migration(r)));
            let kept: Vec<&str> = s.ordered().map(|m| m.record.id.as_str()).collect();
            let sorted: Vec<&str> = s
                .ordered_by_sorting()
                .iter()
                .map(|m| m.record.id.as_str())
                .collect();
            assert_eq!(kept, sorted, "after event {i}");
        }
    }

    #[test]
    fn progress_samples_the_transfer_rate() {
        let mut s = ClusterState::new("demo", &["hv-a".into()]);
        s.apply(event(
            "hv-a",
            proto::event::Kind::Migration(record("m-1", 1, proto::Outcome::None)),
        ));
        let progress = |transferred| {
            event(
                "hv-a",
                proto::event::Kind::Progress(proto::Progress {
                    convergence: None,
                    migration_id: "m-1".into(),
                    attempt_id: "m-1.1".into(),
                    stats: Some(proto::TransferStats {
                        bytes_transferred: transferred,
                        ..Default::default()
                    }),
                }),
            )
        };
        s.now_ms = 1_000;
        s.apply(progress(0));
        s.now_ms = 1_500;
        s.apply(progress(50_000_000));
        assert_eq!(s.migrations["m-1"].current_rate(), Some(100_000_000));
    }

    #[test]
    fn progress_brings_the_sources_outlook_and_keeps_it_through_a_sample_without_one() {
        let mut s = ClusterState::new("demo", &["hv-a".into()]);
        s.apply(event(
            "hv-a",
            proto::event::Kind::Migration(record("m-1", 1, proto::Outcome::None)),
        ));
        let progress = |convergence: Option<proto::Convergence>| {
            event(
                "hv-a",
                proto::event::Kind::Progress(proto::Progress {
                    convergence,
                    migration_id: "m-1".into(),
                    attempt_id: "m-1.1".into(),
                    stats: Some(proto::TransferStats::default()),
                }),
            )
        };
        let outlook = proto::Convergence {
            verdict: proto::Verdict::NotConverging as i32,
            reason: "dirtying 1.4 GiB/s, link 1.1 GiB/s".into(),
            ..Default::default()
        };
        s.apply(progress(Some(outlook.clone())));
        assert_eq!(
            s.migrations["m-1"].record.convergence,
            Some(outlook.clone())
        );
        s.apply(progress(None));
        assert_eq!(s.migrations["m-1"].record.convergence, Some(outlook));
    }

    #[test]
    fn the_event_log_is_bounded() {
        let mut s = ClusterState::new("demo", &["hv-a".into()]);
        for i in 0..EVENT_LOG + 10 {
            s.apply(event(
                "hv-a",
                proto::event::Kind::Log(proto::LogLine {
                    at_ms: i as u64,
                    ..Default::default()
                }),
            ));
        }
        assert_eq!(s.events.len(), EVENT_LOG);
        assert_eq!(s.events[0].line.at_ms, 10);
    }
}
