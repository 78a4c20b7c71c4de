//! The commands that start or act on one migration: `migrate`, `abort`,
//! `retry`, `rollback` and `resolve`.

use std::io::{BufRead, IsTerminal, Write};

use futures::future::join_all;

use super::client::Access;
use super::client::{
    Agent, Cluster, Link, WatchStream, find_migration, find_vm_host, reachable, running_elsewhere,
};
use super::output::{
    pending_rollback_line, progress_line, record_summary, rollback_reply, started_line,
};
use super::{CliError, CliResult, check_id, exit, exit_code_for_outcome};
use crate::proto;
use crate::proto::event::Kind;
use crate::protocol::bounds::IdKind;
use crate::protocol::completion::{Completion, CompletionRequest};
use crate::protocol::record::{
    MigrationRecord, completion_request_to_proto, convergence_from_proto, mode_to_proto,
    stats_from_proto,
};
use crate::protocol::{Mode, RunOn};

/// How `migrate` and `retry` report: wait for the outcome or not, JSON or
/// human text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    pub wait: bool,
    pub json: bool,
}

/// `tern migrate VM --to HOST`.
pub async fn migrate(
    access: &Access,
    vm: &str,
    to: &str,
    mode: Mode,
    completion: CompletionRequest,
    report: Report,
) -> CliResult {
    crate::protocol::bounds::check_name("VM", vm).map_err(|e| CliError::usage(e.to_string()))?;
    let cluster = Cluster::load(access)?;
    cluster.check_host(to)?;
    let links = cluster.connect_all().await;
    let source_name = find_vm_host(&cluster, &links, vm).await?;
    completion
        .over(Completion::for_mode(mode))
        .check()
        .map_err(CliError::usage)?;
    if source_name == to {
        return Err(CliError::usage(format!("VM {vm} already runs on {to}")));
    }
    let source = agent_named(&links, &source_name)?;
    let request = proto::StartMigrationRequest {
        vm: vm.to_string(),
        destination: to.to_string(),
        mode: mode_to_proto(mode) as i32,
        completion: completion_request_to_proto(&completion),
    };
    let record = source
        .call(|mut c| async move { c.start_migration(request).await })
        .await?;
    follow(source, &record, report).await
}

/// `tern retry ID [--to HOST] [--mode M]`: a new attempt, then like `migrate`.
pub async fn retry(
    access: &Access,
    id: &str,
    to: Option<&str>,
    mode: Option<Mode>,
    completion: CompletionRequest,
    report: Report,
) -> CliResult {
    check_id("migration ID", id, IdKind::Migration)?;
    let cluster = Cluster::load(access)?;
    if let Some(to) = to {
        cluster.check_host(to)?;
    }
    let links = cluster.connect_all().await;
    let (owner, _) = find_migration(&links, id).await?;
    let request = proto::RetryRequest {
        id: id.to_string(),
        destination: to.unwrap_or_default().to_string(),
        mode: mode.map(mode_to_proto).unwrap_or(proto::Mode::Unspecified) as i32,
        completion: completion_request_to_proto(&completion),
    };
    let record = owner
        .call(|mut c| async move { c.retry(request).await })
        .await?;
    follow(owner, &record, report).await
}

/// After StartMigration or Retry: say what started, then wait for the
/// outcome (unless `--no-wait`) and print the record. While it waits on a
/// terminal, one line on stderr follows the transfer, from the source's
/// Watch stream; anywhere else (a pipe, a log, `--json`) nothing more is
/// printed and no stream is opened.
async fn follow(source: &Agent, started: &proto::MigrationRecord, report: Report) -> CliResult {
    let record = MigrationRecord::from(started);
    eprintln!("{}", started_line(&record));
    if !report.wait {
        print_record(&record, report.json)?;
        return Ok(exit::SUCCEEDED);
    }
    let mut live = LiveLine::new(
        std::io::stderr(),
        wants_live_line(std::io::stderr().is_terminal(), report),
    );
    // Opened before the wait starts, so no sample is missed. Without it
    // (an older agent, a refusal) the wait goes on without the line.
    let mut watch = match live.is_on() {
        true => source.watch().await.ok(),
        false => None,
    };
    let mut followed = Followed::new(started);
    let request = proto::MigrationRef {
        id: record.id.clone(),
    };
    let wait = source.call_long(|mut c| async move { c.wait_migration(request).await });
    tokio::pin!(wait);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let finished = loop {
        tokio::select! {
            finished = &mut wait => break finished,
            _ = &mut ctrl_c => {
                live.clear();
                return Err(CliError::new(
                    exit::INTERRUPTED,
                    format!("stopped waiting; migration {} goes on (tern abort {} stops it)", record.id, record.id),
                ));
            }
            event = next_event(&mut watch) => match event {
                Some(event) => {
                    if followed.apply(&event) {
                        live.show(&progress_line(&followed.record), terminal_width());
                    }
                }
                // The stream ended: the wait goes on without the line.
                None => watch = None,
            },
        }
    };
    live.clear();
    let finished = finished.map_err(|e| {
        CliError::new(
            e.code,
            format!(
                "{}; migration {} may still be running (tern status shows it)",
                e.message, record.id
            ),
        )
    })?;
    let finished = MigrationRecord::from(&finished);
    print_record(&finished, report.json)?;
    match finished.outcome {
        Some(outcome) => Ok(exit_code_for_outcome(outcome)),
        None => Err(CliError::new(
            exit::FAILED,
            format!(
                "agent {} answered WaitMigration before migration {} had an outcome",
                source.name, finished.id
            ),
        )),
    }
}

/// Whether `migrate` and `retry` keep a live line: only when they wait,
/// print for a person, and stderr is a terminal.
pub fn wants_live_line(stderr_is_terminal: bool, report: Report) -> bool {
    stderr_is_terminal && report.wait && !report.json
}

/// One line kept up to date in place on a terminal (carriage return, then
/// erase the line), and erased before anything else is printed. Off, it
/// writes nothing at all.
pub struct LiveLine<W: Write> {
    out: Option<W>,
    shown: bool,
}

/// Go back to the start of the line and erase it.
const ERASE_LINE: &str = "\r\x1b[2K";

impl<W: Write> LiveLine<W> {
    pub fn new(out: W, on: bool) -> Self {
        LiveLine {
            out: on.then_some(out),
            shown: false,
        }
    }

    pub fn is_on(&self) -> bool {
        self.out.is_some()
    }

    /// Replace the line with `text`, cut to fit `width` columns (a line
    /// that wrapped could no longer be erased).
    pub fn show(&mut self, text: &str, width: usize) {
        let Some(out) = &mut self.out else { return };
        let room = width.saturating_sub(1).max(1);
        let text: String = if text.chars().count() > room {
            let cut: String = text.chars().take(room.saturating_sub(1)).collect();
            format!("{}…", cut.trim_end())
        } else {
            text.to_string()
        };
        // A terminal that went away only loses the line.
        let _ = write!(out, "{ERASE_LINE}{text}");
        let _ = out.flush();
        self.shown = true;
    }

    /// Erase the line, if one is shown.
    pub fn clear(&mut self) {
        let Some(out) = &mut self.out else { return };
        if std::mem::take(&mut self.shown) {
            let _ = write!(out, "{ERASE_LINE}");
            let _ = out.flush();
        }
    }
}

/// The terminal's width, for the live line (80 if it cannot be asked).
fn terminal_width() -> usize {
    ratatui::crossterm::terminal::size()
        .map(|(columns, _)| usize::from(columns))
        .unwrap_or(80)
}

/// The next event of the watch stream, if there is one; a broken stream
/// ends it (`None`), and no stream never answers.
async fn next_event(watch: &mut Option<WatchStream>) -> Option<proto::Event> {
    match watch {
        Some(stream) => stream.message().await.ok().flatten(),
        None => std::future::pending().await,
    }
}

/// The attempt `migrate` or `retry` waits for, as its source's Watch
/// stream tells of it.
pub struct Followed {
    pub record: MigrationRecord,
}

impl Followed {
    pub fn new(started: &proto::MigrationRecord) -> Self {
        Followed {
            record: MigrationRecord::from(started),
        }
    }

    fn is_it(&self, id: &str, attempt_id: &str) -> bool {
        id == self.record.id && attempt_id == self.record.attempt_id
    }

    /// Fold in an event; whether it was about this attempt.
    pub fn apply(&mut self, event: &proto::Event) -> bool {
        match &event.kind {
            Some(Kind::Snapshot(snapshot)) => {
                let Some(m) = snapshot
                    .migrations
                    .iter()
                    .find(|m| self.is_it(&m.id, &m.attempt_id))
                else {
                    return false;
                };
                self.record = MigrationRecord::from(m);
                true
            }
            Some(Kind::Migration(m)) if self.is_it(&m.id, &m.attempt_id) => {
                self.record = MigrationRecord::from(m);
                true
            }
            Some(Kind::Progress(p)) if self.is_it(&p.migration_id, &p.attempt_id) => {
                if let Some(stats) = &p.stats {
                    self.record.transfer = Some(stats_from_proto(stats));
                }
                if let Some(outlook) = p.convergence.as_ref().and_then(convergence_from_proto) {
                    self.record.convergence = Some(outlook);
                }
                true
            }
            _ => false,
        }
    }
}

fn print_record(record: &MigrationRecord, json: bool) -> Result<(), CliError> {
    if json {
        let line = serde_json::to_string(record).map_err(|e| {
            CliError::new(
                exit::FAILED,
                format!("cannot encode the migration record: {e}"),
            )
        })?;
        println!("{line}");
    } else {
        print!("{}", record_summary(record));
    }
    Ok(())
}

/// `tern repair VM [--feature F]`: re-run the failed feature stages of the
/// VM's degraded migration where the VM runs. Asked of the agent holding
/// the VM's latest migration record (its source). Exit 0 when the VM is no
/// longer degraded, 2 when it still is (with the driver's reason).
pub async fn repair(access: &Access, vm: &str, feature: Option<&str>, json: bool) -> CliResult {
    use crate::protocol::bounds::check_name;
    check_name("VM", vm).map_err(|e| CliError::usage(e.to_string()))?;
    if let Some(feature) = feature {
        check_name("--feature", feature).map_err(|e| CliError::usage(e.to_string()))?;
    }
    let cluster = Cluster::load(access)?;
    let links = cluster.connect_all().await;
    let answers = join_all(reachable(&links).map(|agent| async move {
        let migrations = agent.asked(agent.list_migrations()).await;
        let vms = agent.asked(agent.list_vms()).await;
        (agent, migrations, vms)
    }))
    .await;
    let mut latest: Option<(&Agent, proto::MigrationRecord)> = None;
    let mut known = false;
    let mut runs_on: Vec<String> = Vec::new();
    let mut failure: Option<CliError> = None;
    for (agent, migrations, vms) in answers {
        match vms {
            Ok(vms) => {
                known |= vms.iter().any(|v| v.name == vm);
                let running = vms.iter().any(|v| {
                    v.name == vm
                        && proto::GuestState::try_from(v.state) == Ok(proto::GuestState::Running)
                });
                if running {
                    runs_on.push(agent.name.clone());
                }
            }
            Err(e) => {
                failure.get_or_insert(e);
            }
        }
        match migrations {
            Ok(migrations) => {
                // A record counts where it is owned: on its source.
                for record in migrations
                    .into_iter()
                    .filter(|r| r.vm == vm && r.source == agent.name)
                {
                    known = true;
                    let newer = latest.as_ref().is_none_or(|(_, l)| {
                        (record.started_at_ms, &record.id) > (l.started_at_ms, &l.id)
                    });
                    if newer {
                        latest = Some((agent, record));
                    }
                }
            }
            Err(e) => {
                failure.get_or_insert(e);
            }
        }
    }
    let failure = failure.or_else(|| super::client::first_unreachable(&links).cloned());
    let Some((owner, record)) = latest else {
        return Err(match (failure, known) {
            (Some(e), _) => CliError::new(
                e.code,
                format!(
                    "no migration of {vm} on the agents that answered, and {}",
                    e.message
                ),
            ),
            (None, true) => {
                CliError::usage(format!("{vm} has never been migrated: nothing to repair"))
            }
            (None, false) => CliError::usage(format!("no VM {vm} in the cluster")),
        });
    };
    // The record found must be where the VM is now: a newer migration may
    // sit on a host that did not answer.
    if !runs_on.contains(&record.running_on) {
        return Err(match (runs_on.first(), failure) {
            (Some(now), _) => CliError::usage(format!(
                "{vm} runs on {now}, not on {} where its latest known migration {} left it: \
                 nothing of that migration to repair there",
                record.running_on, record.id
            )),
            (None, Some(e)) => CliError::new(
                e.code,
                format!("cannot tell where {vm} runs now: {}", e.message),
            ),
            (None, None) => CliError::usage(format!(
                "{vm} does not run on {} (nor anywhere): nothing to repair",
                record.running_on
            )),
        });
    }
    let request = proto::RepairRequest {
        vm: vm.to_string(),
        feature: feature.unwrap_or_default().to_string(),
    };
    eprintln!(
        "repairing {vm} on {} (migration {}, record on {})",
        record.running_on, record.id, owner.name
    );
    let repaired = owner
        .call_long(|mut c| async move { c.repair(request).await })
        .await?;
    let repaired = MigrationRecord::from(&repaired);
    print_record(&repaired, json)?;
    match repaired.outcome {
        Some(crate::protocol::Outcome::Degraded) => {
            let reasons = crate::protocol::repair::latest_failures(&repaired);
            eprintln!(
                "tern: {vm} is still degraded: {}",
                if reasons.is_empty() {
                    repaired.error.clone().unwrap_or_default()
                } else {
                    reasons.join("; ")
                }
            );
            Ok(exit::DEGRADED)
        }
        Some(outcome) => Ok(exit_code_for_outcome(outcome)),
        None => Ok(exit::FAILED),
    }
}

fn agent_named<'a>(links: &'a [Link], name: &str) -> Result<&'a Agent, CliError> {
    let link = links.iter().find(|l| l.entry.name == name).ok_or_else(|| {
        CliError::new(
            exit::FAILED,
            format!("agent {name} reported a VM but is not in the inventory"),
        )
    })?;
    link.agent.as_ref().map_err(Clone::clone)
}

/// `tern abort ID`: stop a migration before its commit point.
pub async fn abort(access: &Access, id: &str) -> CliResult {
    check_id("migration ID", id, IdKind::Migration)?;
    let cluster = Cluster::load(access)?;
    let links = cluster.connect_all().await;
    let (owner, _) = find_migration(&links, id).await?;
    let request = proto::MigrationRef { id: id.to_string() };
    let record = owner
        .call(|mut c| async move { c.abort(request).await })
        .await?;
    print!("{}", record_summary(&MigrationRecord::from(&record)));
    Ok(exit::SUCCEEDED)
}

/// `tern rollback ID`: re-run the pending rollbacks of a migration on every
/// host now (they stay on the host where they failed). 0 when nothing is
/// pending any more, 1 when some still are.
pub async fn rollback(access: &Access, id: &str) -> CliResult {
    check_id("migration ID", id, IdKind::Migration)?;
    let cluster = Cluster::load(access)?;
    let links = cluster.connect_all().await;
    let replies =
        join_all(reachable(&links).map(|agent| async move { (agent, agent.rollback(id).await) }))
            .await;
    let mut known = false;
    let mut pending = false;
    // Hosts that could not be asked: they may hold pending rollbacks too.
    let mut failures: Vec<CliError> = links
        .iter()
        .filter_map(|l| l.agent.as_ref().err().cloned())
        .collect();
    for (agent, reply) in replies {
        match reply {
            Ok(reply) => {
                known |= !reply.done.is_empty() || !reply.still_pending.is_empty();
                pending |= !reply.still_pending.is_empty();
                print!("{}", rollback_reply(&agent.name, &reply));
            }
            Err(e) => failures.push(CliError::new(
                e.code,
                format!("{}: {}", agent.name, e.message),
            )),
        }
    }
    if pending {
        for e in &failures {
            eprintln!("tern: {e}");
        }
        return Ok(exit::FAILED);
    }
    if let Some(first) = failures.first() {
        let all: Vec<&str> = failures.iter().map(|e| e.message.as_str()).collect();
        return Err(CliError::new(
            first.code,
            format!("not every host could be asked: {}", all.join("; ")),
        ));
    }
    if !known {
        // Nothing was pending anywhere: fine if the migration exists.
        find_migration(&links, id).await?;
    }
    Ok(exit::SUCCEEDED)
}

/// `tern rollback ID --forget`: drop a migration's pending work on every
/// host, after a warning and the VM name as confirmation (unless `--yes`).
pub async fn forget(access: &Access, id: &str, yes: bool) -> CliResult {
    check_id("migration ID", id, IdKind::Migration)?;
    let cluster = Cluster::load(access)?;
    let links = cluster.connect_all().await;
    let (_, record) = find_migration(&links, id).await?;
    eprintln!(
        "Forgetting the pending work of migration {id} ({}): what it would have undone stays as it is \
         (a port left associated, a paused copy left running nowhere, a destination never told). Only do this \
         when the work can never succeed: its host or driver is gone for good.",
        record.vm
    );
    if !yes {
        confirm_vm_name(&record.vm).await?;
    }
    let replies =
        join_all(reachable(&links).map(|agent| async move { (agent, agent.forget(id).await) }))
            .await;
    let mut forgotten = 0;
    let mut failures = Vec::new();
    for (agent, reply) in replies {
        match reply {
            Ok(reply) => {
                for p in &reply.done {
                    forgotten += 1;
                    println!("{}: forgotten: {}", agent.name, pending_rollback_line(p));
                }
            }
            Err(e) => failures.push(format!("{}: {}", agent.name, e.message)),
        }
    }
    failures.extend(
        links
            .iter()
            .filter_map(|l| l.agent.as_ref().err().map(|e| e.message.clone())),
    );
    if !failures.is_empty() {
        return Err(CliError::new(
            exit::UNAVAILABLE,
            format!("not every host could be asked: {}", failures.join("; ")),
        ));
    }
    if forgotten == 0 {
        println!("nothing pending for migration {id}");
    }
    Ok(exit::SUCCEEDED)
}

/// `tern resolve ID --run-on source|destination`: the operator's forced
/// decision for an unresolved attempt; `tern resolve ID --lost`: the word that
/// a post-copy cannot finish. It warns what a wrong choice does and asks for
/// the VM name unless `--yes`.
pub async fn resolve(access: &Access, id: &str, run_on: RunOn, yes: bool) -> CliResult {
    check_id("migration ID", id, IdKind::Migration)?;
    let cluster = Cluster::load(access)?;
    let links = cluster.connect_all().await;
    let (owner, record) = find_migration(&links, id).await?;
    if run_on == RunOn::Source {
        // The destination may have committed and the VM moved on since: its
        // running copy is the VM, and the paused one on the source is stale.
        let elsewhere = running_elsewhere(&links, &record.vm, &record.source).await;
        if let Some(refusal) = refuse_forcing_to_source(id, &record, &elsewhere) {
            return Err(CliError::new(exit::FAILED, refusal));
        }
    }
    eprintln!(
        "{}",
        resolve_warning(id, run_on, &record.source, &record.destination)
    );
    if !yes {
        confirm_vm_name(&record.vm).await?;
    }
    let request = proto::ForceResolveRequest {
        id: id.to_string(),
        run_on: match run_on {
            RunOn::Source => proto::RunOn::Source,
            RunOn::Destination => proto::RunOn::Destination,
            RunOn::Nowhere => proto::RunOn::Nowhere,
        } as i32,
    };
    let record = owner
        .call(|mut c| async move { c.resolve(request).await })
        .await?;
    print!("{}", record_summary(&MigrationRecord::from(&record)));
    Ok(exit::SUCCEEDED)
}

/// Forcing an unresolved attempt back to its source while the VM runs on
/// another host would run it twice: say so, and what to do instead.
pub fn refuse_forcing_to_source(
    id: &str,
    record: &proto::MigrationRecord,
    running_on: &[String],
) -> Option<String> {
    if running_on.is_empty() {
        return None;
    }
    Some(format!(
        "refusing: {vm} is running on {hosts}, so {dst} committed and the VM has moved on; forcing it to run on \
         {src} would run it twice. To discard the stale paused copy on {src}: tern resolve {id} --run-on destination",
        vm = record.vm,
        hosts = running_on.join(", "),
        dst = record.destination,
        src = record.source,
    ))
}

/// What can go wrong when forcing `run_on`, in the operator's terms.
pub fn resolve_warning(id: &str, run_on: RunOn, source: &str, destination: &str) -> String {
    match run_on {
        RunOn::Source => format!(
            "Forcing migration {id} to run on {source}. Only do this if the destination {destination} is gone for \
             good: if its copy of the guest has already resumed, the guest will run on two hosts at once and its \
             disk and network state will diverge. {source} keeps telling {destination} until it hears; if \
             {destination} had committed, the copy on {source} is killed the moment it answers."
        ),
        RunOn::Destination => format!(
            "Forcing migration {id} to run on {destination}. Only do this if you have checked that {destination} \
             resumed the guest: if it did not, the paused copy on the source {source} is discarded and the guest \
             runs nowhere."
        ),
        RunOn::Nowhere => format!(
            "Declaring the guest of migration {id} lost. Only do this if {destination} is gone for good: the copy \
             on {source} is stale (the guest ran on {destination} since the switch to post-copy) and is killed, and \
             if {destination} still holds the guest, it can never pull the pages it lacks. Restore the VM from \
             its disk and a backup afterwards."
        ),
    }
}

/// Ask the operator to type the VM name; refuse when nobody can type.
async fn confirm_vm_name(vm: &str) -> Result<(), CliError> {
    if !std::io::stdin().is_terminal() {
        return Err(CliError::usage(
            "refusing to force without --yes when stdin is not a terminal",
        ));
    }
    eprint!("Type the VM name ({vm}) to confirm: ");
    let _ = std::io::stderr().flush();
    let typed = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).map(|_| line)
    })
    .await
    .map_err(|e| {
        CliError::new(
            exit::FAILED,
            format!("reading the confirmation failed: {e}"),
        )
    })?
    .map_err(|e| CliError::usage(format!("reading the confirmation failed: {e}")))?;
    check_confirmation(vm, &typed)
}

pub fn check_confirmation(vm: &str, typed: &str) -> Result<(), CliError> {
    if typed.trim() == vm {
        Ok(())
    } else {
        Err(CliError::usage(format!(
            "you typed {:?}, not {vm:?}; nothing was changed",
            typed.trim()
        )))
    }
}

/// `tern fault HOST FEATURE ...`: replace a simulated driver's fault injection.
pub async fn fault(access: &Access, host: &str, faults: proto::FaultSettings) -> CliResult {
    let cluster = Cluster::load(access)?;
    let entry = cluster.check_host(host)?;
    let agent = cluster.connect(entry).await?;
    let request = proto::SetFaultsRequest {
        faults: Some(faults.clone()),
    };
    let reply = agent
        .call(|mut c| async move { c.set_faults(request).await })
        .await?;
    let now = reply
        .faults
        .iter()
        .find(|f| f.feature == faults.feature)
        .unwrap_or(&faults);
    if now.latency_ms < faults.latency_ms {
        eprintln!(
            "{host}: latency_ms {} clamped to {}, the most fault injection adds",
            faults.latency_ms, now.latency_ms
        );
    }
    println!(
        "{host}: {} faults now: fail = [{}], fail_rate = {}, latency_ms = {}, fail_rollback = {}",
        now.feature,
        now.fail.join(", "),
        now.fail_rate,
        now.latency_ms,
        now.fail_rollback
    );
    Ok(exit::SUCCEEDED)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the simulator: an operator forcing an unresolved attempt
    /// back to its source after the destination had committed and the VM
    /// had moved on to a third host ran it twice.
    #[test]
    fn forcing_to_the_source_is_refused_while_the_vm_runs_on_another_host() {
        let record = proto::MigrationRecord {
            id: "m-1".into(),
            vm: "web-01".into(),
            source: "hv-a".into(),
            destination: "hv-b".into(),
            ..Default::default()
        };
        assert_eq!(refuse_forcing_to_source("m-1", &record, &[]), None);
        let refusal =
            refuse_forcing_to_source("m-1", &record, &["hv-c".to_string()]).expect("refused");
        assert!(refusal.contains("web-01 is running on hv-c"), "{refusal}");
        assert!(refusal.contains("would run it twice"), "{refusal}");
        assert!(
            refusal.contains("tern resolve m-1 --run-on destination"),
            "{refusal}"
        );
    }

    #[test]
    fn the_resolve_warning_for_the_source_says_the_guest_may_run_twice() {
        assert_eq!(
            resolve_warning("m-1", RunOn::Source, "hv-a", "hv-b"),
            "Forcing migration m-1 to run on hv-a. Only do this if the destination hv-b is gone for good: if its \
             copy of the guest has already resumed, the guest will run on two hosts at once and its disk and \
             network state will diverge. hv-a keeps telling hv-b until it hears; if hv-b had committed, the \
             copy on hv-a is killed the moment it answers."
        );
    }

    #[test]
    fn the_resolve_warning_for_the_destination_says_the_guest_may_run_nowhere() {
        let text = resolve_warning("m-1", RunOn::Destination, "hv-a", "hv-b");
        assert!(
            text.starts_with("Forcing migration m-1 to run on hv-b."),
            "{text}"
        );
        assert!(text.contains("runs nowhere"), "{text}");
    }

    const WAITING: Report = Report {
        wait: true,
        json: false,
    };

    #[test]
    fn the_live_line_is_only_for_a_person_waiting_at_a_terminal() {
        assert!(wants_live_line(true, WAITING));
        assert!(!wants_live_line(false, WAITING), "stderr is not a terminal");
        assert!(!wants_live_line(
            true,
            Report {
                json: true,
                ..WAITING
            }
        ));
        assert!(!wants_live_line(
            true,
            Report {
                wait: false,
                ..WAITING
            }
        ));
    }

    #[test]
    fn off_the_live_line_writes_nothing_at_all() {
        let mut out = Vec::new();
        let mut live = LiveLine::new(&mut out, wants_live_line(false, WAITING));
        assert!(!live.is_on());
        live.show("perform · 1.2 GiB / 2.0 GiB", 80);
        live.clear();
        assert!(out.is_empty(), "{:?}", String::from_utf8_lossy(&out));
    }

    #[test]
    fn on_a_terminal_the_line_is_rewritten_in_place_fitted_and_erased() {
        let mut out = Vec::new();
        let mut live = LiveLine::new(&mut out, true);
        live.clear();
        live.show("perform · 1.2 GiB / 2.0 GiB", 80);
        live.show("perform · 1.5 GiB / 2.0 GiB · converging, ETA 3 s", 20);
        live.clear();
        live.clear();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "\r\x1b[2Kperform · 1.2 GiB / 2.0 GiB\r\x1b[2Kperform · 1.5 GiB…\r\x1b[2K",
            "erase, write; a line cut to fit (a wrapped one could not be erased); erased once"
        );
    }

    fn started() -> proto::MigrationRecord {
        proto::MigrationRecord {
            id: "m-1".into(),
            attempt: 2,
            attempt_id: "m-1.2".into(),
            vm: "web-01".into(),
            ..Default::default()
        }
    }

    fn event(kind: Kind) -> proto::Event {
        proto::Event {
            host: "hv-a".into(),
            kind: Some(kind),
        }
    }

    fn progress(attempt_id: &str, transferred: u64) -> proto::Event {
        event(Kind::Progress(proto::Progress {
            migration_id: "m-1".into(),
            attempt_id: attempt_id.into(),
            stats: Some(proto::TransferStats {
                bytes_total: 100,
                bytes_transferred: transferred,
                ..Default::default()
            }),
            convergence: Some(proto::Convergence {
                verdict: proto::Verdict::Stalled as i32,
                reason: "nothing sent for 4 s".into(),
                ..Default::default()
            }),
        }))
    }

    #[test]
    fn the_live_line_follows_only_the_attempt_it_waits_for() {
        let mut followed = Followed::new(&started());
        // The first attempt's late progress, another migration's: not ours.
        assert!(!followed.apply(&progress("m-1.1", 10)));
        let mut other = progress("m-9.1", 10);
        if let Some(Kind::Progress(p)) = &mut other.kind {
            p.migration_id = "m-9".into();
        }
        assert!(!followed.apply(&other));
        assert_eq!(followed.record.transfer, None);
        assert!(followed.apply(&progress("m-1.2", 60)));
        let stats = followed.record.transfer.expect("the sample");
        assert_eq!(stats.bytes_transferred, 60);
        assert_eq!(
            followed.record.convergence.as_ref().map(|c| c.verdict),
            Some(crate::protocol::convergence::Verdict::Stalled)
        );
        // The snapshot that opens the stream, and record updates.
        let mut moved = started();
        moved.recovery = Some(proto::PostcopyRecovery {
            tries: 1,
            ..Default::default()
        });
        assert!(followed.apply(&event(Kind::Snapshot(proto::Snapshot {
            migrations: vec![moved.clone()],
            ..Default::default()
        }))));
        assert_eq!(followed.record.recovery.as_ref().map(|r| r.tries), Some(1));
        moved.recovery = None;
        assert!(followed.apply(&event(Kind::Migration(moved))));
        assert_eq!(followed.record.recovery, None);
        assert!(!followed.apply(&event(Kind::VmRemoved("web-01".into()))));
    }

    #[test]
    fn the_confirmation_must_be_the_vm_name() {
        assert!(check_confirmation("web-01", "web-01\n").is_ok());
        let err = check_confirmation("web-01", "yes\n").unwrap_err();
        assert_eq!(err.code, 64);
    }
}
