//! `tern evacuate`, `tern evacuation pause|resume|cancel` and `tern
//! undrain`: evacuations are jobs of the evacuated host's agent; the CLI
//! starts one, follows it, and prints what became of each VM.

use std::time::Duration;

use super::client::Access;
use super::client::{Agent, Cluster, Link, reachable};
use super::{CliError, CliResult, exit};
use crate::host::evacuation::job::{Control, Evacuation, JobState, VmState};
use crate::proto;
use crate::protocol::Mode;
use crate::protocol::completion::{Completion, CompletionRequest};
use crate::protocol::record::{completion_request_to_proto, mode_to_proto};

/// How often a waiting `tern evacuate` asks for progress.
const POLL: Duration = Duration::from_millis(300);

/// What `tern evacuate` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvacuateArgs {
    pub host: String,
    pub mode: Mode,
    /// Over the mode's default.
    pub completion: CompletionRequest,
    /// `None`: the host's max_outgoing.
    pub concurrency: Option<u32>,
    pub max_attempts: u32,
    pub exclude: Vec<String>,
    pub wait: bool,
    pub json: bool,
}

async fn connect(cluster: &Cluster, host: &str) -> Result<Agent, CliError> {
    let entry = cluster.check_host(host)?;
    cluster.connect(entry).await
}

/// `tern evacuate HOST`: start the job, then (unless `--no-wait`) print
/// each VM as it settles, and the whole evacuation at the end.
pub async fn evacuate(access: &Access, args: EvacuateArgs) -> CliResult {
    // 0 means "the default" on the wire; typed by an operator it is a mistake.
    if args.concurrency == Some(0) {
        return Err(CliError::usage(
            "concurrency 0: must be at least 1 (leave it out for the host's max_outgoing)",
        ));
    }
    if args.max_attempts == 0 {
        return Err(CliError::usage(
            "max attempts 0: must be at least 1 (the default is 3)",
        ));
    }
    args.completion
        .over(Completion::for_mode(args.mode))
        .check()
        .map_err(CliError::usage)?;
    let cluster = Cluster::load(access)?;
    for host in &args.exclude {
        cluster.check_host(host)?;
    }
    if args.exclude.contains(&args.host) {
        return Err(CliError::usage(format!(
            "{} is the host being evacuated; excluding it changes nothing",
            args.host
        )));
    }
    let agent = connect(&cluster, &args.host).await?;
    let request = proto::EvacuateRequest {
        mode: mode_to_proto(args.mode) as i32,
        concurrency: args.concurrency.unwrap_or(0),
        max_attempts: args.max_attempts,
        exclude: args.exclude.clone(),
        completion: completion_request_to_proto(&args.completion),
    };
    let started = agent
        .call(|mut c| async move { c.evacuate(request).await })
        .await?;
    let job = Evacuation::from(&started);
    eprintln!("{}", job.started_line());
    if !args.wait {
        print_job(&job, args.json)?;
        return Ok(exit::SUCCEEDED);
    }
    let finished = tokio::select! {
        finished = follow(&agent, &job) => finished?,
        _ = tokio::signal::ctrl_c() => {
            return Err(CliError::new(
                exit::INTERRUPTED,
                format!(
                    "stopped following; evacuation {} goes on (`tern evacuation cancel {}` stops it)",
                    job.id, job.id
                ),
            ));
        }
    };
    print_job(&finished, args.json)?;
    Ok(exit_code(&finished))
}

/// Poll the evacuation until it ends, printing every VM that settles.
async fn follow(agent: &Agent, started: &Evacuation) -> Result<Evacuation, CliError> {
    let mut seen = started.clone();
    loop {
        tokio::time::sleep(POLL).await;
        let request = proto::EvacuationRef {
            id: started.id.clone(),
        };
        let job = Evacuation::from(
            &agent
                .call(|mut c| async move { c.get_evacuation(request).await })
                .await?,
        );
        for line in progress_lines(&seen, &job) {
            eprintln!("{line}");
        }
        seen = job;
        if seen.state.is_over() {
            return Ok(seen);
        }
    }
}

/// What changed between two reports of an evacuation, one line per VM
/// attempt that started or ended and per change of the job's state.
pub fn progress_lines(before: &Evacuation, after: &Evacuation) -> Vec<String> {
    let mut lines = Vec::new();
    for vm in &after.vms {
        let old = before.vms.iter().find(|v| v.name == vm.name);
        let old_attempts = old.map(|v| v.attempts.as_slice()).unwrap_or_default();
        for (i, a) in vm.attempts.iter().enumerate() {
            let was = old_attempts.get(i);
            if was.is_none() {
                lines.push(format!(
                    "  {} -> {} (attempt {})",
                    vm.name, a.destination, a.attempt
                ));
            }
            if let Some(outcome) = a.outcome
                && was.is_none_or(|w| w.outcome.is_none())
            {
                let mut line = format!("  {} {} on {}", vm.name, outcome.as_str(), a.destination);
                if a.busy {
                    line.push_str(" (busy, trying it again)");
                } else if a.interrupted {
                    line.push_str(" (cut short by this host's stop; not counted)");
                } else if let Some(cause) = &a.cause {
                    line.push_str(&format!(" ({})", cause.brief()));
                } else if let Some(feature) = &a.failed_feature {
                    line.push_str(&format!(" ({feature})"));
                }
                if let Some(error) = a.error.as_deref().filter(|_| !outcome_ok(outcome)) {
                    line.push_str(&format!(": {error}"));
                }
                lines.push(line);
            }
        }
        if vm.state == VmState::Failed && old.is_none_or(|v| v.state != VmState::Failed) {
            lines.push(format!(
                "  {} gives up: {}",
                vm.name,
                vm.waiting.as_deref().unwrap_or("out of attempts")
            ));
        }
    }
    // The end is said by the summary that follows.
    if before.state != after.state && !after.state.is_over() {
        lines.push(after.headline());
    }
    lines
}

fn outcome_ok(outcome: crate::protocol::Outcome) -> bool {
    matches!(outcome, crate::protocol::Outcome::Succeeded)
}

/// 0: every VM moved cleanly; 2: every VM moved, some degraded; 1: some
/// VM failed or was left by a cancel.
pub fn exit_code(job: &Evacuation) -> u8 {
    let c = job.counts();
    if c.failed > 0 || c.cancelled > 0 || c.pending > 0 || c.in_flight > 0 {
        exit::FAILED
    } else if job.vms.iter().any(|v| v.degraded) {
        exit::DEGRADED
    } else {
        exit::SUCCEEDED
    }
}

fn print_job(job: &Evacuation, json: bool) -> Result<(), CliError> {
    if json {
        let line = serde_json::to_string(job)
            .map_err(|e| CliError::new(exit::FAILED, format!("cannot print JSON: {e}")))?;
        println!("{line}");
    } else {
        println!("{}", summary(job));
    }
    Ok(())
}

/// The evacuation as a table: one row per VM, its last attempt's story.
pub fn summary(job: &Evacuation) -> String {
    let mut out = job.headline();
    out.push('\n');
    let rows: Vec<Vec<String>> =
        job.vms
            .iter()
            .map(|v| {
                let last = v.attempts.last();
                let note = match v.state {
                    VmState::Pending | VmState::Failed | VmState::Cancelled => {
                        v.waiting.clone().unwrap_or_default()
                    }
                    _ => last
                        .and_then(|a| {
                            a.cause.as_ref().map(|c| c.summary()).or_else(|| {
                                a.failed_feature.as_ref().map(|f| format!("{f} failed"))
                            })
                        })
                        .unwrap_or_default(),
                };
                vec![
                    v.name.clone(),
                    format!(
                        "{}{}",
                        v.state.as_str(),
                        if v.degraded { " (degraded)" } else { "" }
                    ),
                    v.host.clone(),
                    v.attempts.len().to_string(),
                    v.attempts
                        .iter()
                        .map(|a| {
                            format!(
                                "{}:{}",
                                a.destination,
                                a.outcome.map(|o| o.as_str()).unwrap_or("running")
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(" "),
                    note,
                ]
            })
            .collect();
    out.push_str(&super::output::table(
        &["VM", "STATE", "HOST", "ATTEMPTS", "HISTORY", "NOTE"],
        &rows,
    ));
    out.trim_end().to_string()
}

/// `tern evacuation pause|resume|cancel ID`: sent to the agent that owns it.
pub async fn control(access: &Access, id: &str, control: Control) -> CliResult {
    super::check_id(
        "evacuation ID",
        id,
        crate::protocol::bounds::IdKind::Evacuation,
    )?;
    let cluster = Cluster::load(access)?;
    let links = cluster.connect_all().await;
    let owner = find_evacuation(&links, id).await?;
    let request = proto::ControlEvacuationRequest {
        id: id.to_string(),
        control: match control {
            Control::Pause => proto::EvacuationControl::Pause,
            Control::Resume => proto::EvacuationControl::Resume,
            Control::Cancel => proto::EvacuationControl::Cancel,
            Control::CancelAbort => proto::EvacuationControl::CancelAbort,
        } as i32,
    };
    let job = Evacuation::from(
        &owner
            .call(|mut c| async move { c.control_evacuation(request).await })
            .await?,
    );
    println!("{}", summary(&job));
    if job.state == JobState::Cancelling {
        eprintln!(
            "evacuation {id} is cancelling: {} attempts in flight {}",
            job.in_flight(),
            if job.abort_in_flight {
                "are being aborted"
            } else {
                "may finish"
            }
        );
    }
    Ok(exit::SUCCEEDED)
}

async fn find_evacuation<'a>(links: &'a [Link], id: &str) -> Result<&'a Agent, CliError> {
    for agent in reachable(links) {
        let request = proto::EvacuationRef { id: id.to_string() };
        if agent
            .call(|mut c| async move { c.get_evacuation(request).await })
            .await
            .is_ok()
        {
            return Ok(agent);
        }
    }
    match super::client::first_unreachable(links) {
        Some(e) => Err(CliError::unavailable(format!(
            "no reachable agent knows evacuation {id}, and {}",
            e.message
        ))),
        None => Err(CliError::usage(format!("no agent knows evacuation {id}"))),
    }
}

/// `tern undrain HOST`.
pub async fn undrain(access: &Access, host: &str) -> CliResult {
    let cluster = Cluster::load(access)?;
    let agent = connect(&cluster, host).await?;
    agent
        .call(|mut c| async move { c.undrain(proto::UndrainRequest {}).await })
        .await?;
    println!("{host} accepts incoming migrations again");
    Ok(exit::SUCCEEDED)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::evacuation::job::JobVm;
    use crate::protocol::Outcome;
    use crate::protocol::record::MigrationRecord;

    fn job() -> Evacuation {
        Evacuation::new(
            "e-1".into(),
            "hv-a",
            Mode::Safe,
            2,
            3,
            vec![],
            vec![
                JobVm::new("web-01", 2048, 2, vec!["port-profile".into()], "hv-a"),
                JobVm::new("db-01", 4096, 4, vec!["port-profile".into()], "hv-a"),
            ],
            1000,
        )
    }

    fn ended(id: &str, to: &str, outcome: Outcome, error: &str) -> MigrationRecord {
        let mut r = MigrationRecord::from(&proto::MigrationRecord {
            id: id.into(),
            destination: to.into(),
            attempt: 1,
            ..Default::default()
        });
        r.outcome = Some(outcome);
        r.error = (!error.is_empty()).then(|| error.to_string());
        r
    }

    #[test]
    fn progress_names_each_start_and_outcome_once() {
        let before = job();
        let mut after = before.clone();
        let db = after.vms.iter().position(|v| v.name == "db-01").unwrap();
        after.started(db, "m-1", 1, "hv-c", 1001);
        assert_eq!(
            progress_lines(&before, &after),
            ["  db-01 -> hv-c (attempt 1)"]
        );
        let mut later = after.clone();
        later.attempt_ended(
            db,
            &ended("m-1", "hv-c", Outcome::Failed, "ASSOCIATE rejected"),
            1002,
        );
        assert_eq!(
            progress_lines(&after, &later),
            ["  db-01 failed on hv-c: ASSOCIATE rejected"]
        );
        assert!(progress_lines(&later, &later).is_empty());
    }

    #[test]
    fn exit_codes_say_how_it_ended() {
        let mut j = job();
        let (web, db) = (1, 0);
        j.started(db, "m-1", 1, "hv-c", 1001);
        j.attempt_ended(db, &ended("m-1", "hv-c", Outcome::Succeeded, ""), 1002);
        j.started(web, "m-2", 1, "hv-b", 1003);
        let mut degraded = j.clone();
        degraded.attempt_ended(web, &ended("m-2", "hv-b", Outcome::Degraded, ""), 1004);
        assert_eq!(degraded.state, JobState::Done);
        assert_eq!(exit_code(&degraded), exit::DEGRADED);
        let mut clean = j.clone();
        clean.attempt_ended(web, &ended("m-2", "hv-b", Outcome::Succeeded, ""), 1004);
        assert_eq!(exit_code(&clean), exit::SUCCEEDED);
        let mut cancelled = j.clone();
        cancelled.control(Control::Cancel, 1004).unwrap();
        cancelled.attempt_ended(web, &ended("m-2", "hv-b", Outcome::Aborted, ""), 1005);
        assert_eq!(cancelled.state, JobState::Cancelled);
        assert_eq!(exit_code(&cancelled), exit::FAILED);
        assert!(
            summary(&cancelled).starts_with(
                "evacuation e-1 of hv-a cancelled: 1 moved, 0 in flight, 0 failed, 0 pending, \
                 1 cancelled of 2\n"
            ),
            "{}",
            summary(&cancelled)
        );
    }
}
