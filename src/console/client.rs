//! The console's agent clients: one task per inventory host that turns the
//! agent's Watch stream into [`Msg`]s (reconnecting with backoff when it
//! breaks), and [`execute`], which carries out one [`Command`] as an RPC.
//! Like gitui's `asyncgit`, this is where all slow work happens: the UI only
//! receives messages and never waits on the network.
//!
//! Watch sends a snapshot of the host first, then every change; the agent
//! subscribes to changes before it takes the snapshot, so a reconnected
//! stream's snapshot is complete and replaces what the console knew of the
//! host. What happened during the outage is not replayed, only its result.

use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;

use super::msg::{Command, Msg};
use crate::agent::now_ms;
use crate::cli::Cluster;
use crate::cli::client::{Agent, WatchStream, status_error};
use crate::cli::output::{pending_rollback_line, started_line, state_summary};
use crate::config::HostEntry;
use crate::host::evacuation::job::{Evacuation, JobState};
use crate::proto;
use crate::protocol::completion::{Completion, CompletionRequest};
use crate::protocol::record::{MigrationRecord, completion_request_to_proto, mode_to_proto};

/// The wait before the first reconnect; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// An operator looking at a lost host should see it back within seconds.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A stream that stayed up this long was a real connection, and its loss
/// starts the backoff afresh; one that broke sooner (an agent crash-looping
/// on start) keeps doubling, so such an agent is not hammered.
const STEADY: Duration = MAX_BACKOFF;

/// Follow every inventory host's Watch stream, one task each, until `tx` is
/// closed (the console quit).
pub fn spawn_watchers(agents: &Cluster, tx: UnboundedSender<Msg>) -> Vec<JoinHandle<()>> {
    agents
        .inventory
        .host
        .iter()
        .map(|entry| tokio::spawn(watch_host(agents.clone(), entry.clone(), tx.clone())))
        .collect()
}

/// One host's watcher: open the stream, pass its events on, and when it
/// breaks say so once and reopen it with backoff.
async fn watch_host(agents: Cluster, entry: HostEntry, tx: UnboundedSender<Msg>) {
    let mut link = Link::new(&entry.name, now_ms());
    let mut backoff = FIRST_BACKOFF;
    loop {
        let opened = tokio::select! {
            _ = tx.closed() => return,
            opened = open_watch(&agents, &entry) => opened,
        };
        let lost = match opened {
            Err(error) => link.reconnect_failed(now_ms(), error),
            Ok((agent, mut stream)) => {
                link.connected();
                if tx
                    .send(Msg::Connected {
                        host: entry.name.clone(),
                    })
                    .is_err()
                {
                    return;
                }
                let opened_at = Instant::now();
                // A hung host (stopped, or its agent's core stuck) keeps the
                // stream open and says nothing: it is asked a short question
                // every answer deadline, and named within about one.
                let deadline = agents.answer_deadline;
                let mut probe = Box::pin(probe(agent.clone(), deadline));
                let mut silent = false;
                let error = loop {
                    let next = tokio::select! {
                        _ = tx.closed() => return,
                        next = stream.message() => next,
                        answered = &mut probe => {
                            probe = Box::pin(self::probe(agent.clone(), deadline));
                            let news = match (answered, silent) {
                                (false, false) => Some(Msg::Silent {
                                    host: entry.name.clone(),
                                    since_ms: now_ms().saturating_sub(deadline.as_millis() as u64),
                                    deadline_ms: deadline.as_millis() as u64,
                                }),
                                (true, true) => Some(Msg::Connected {
                                    host: entry.name.clone(),
                                }),
                                _ => None,
                            };
                            silent = !answered;
                            if let Some(news) = news
                                && tx.send(news).is_err()
                            {
                                return;
                            }
                            continue;
                        }
                    };
                    match next {
                        Ok(Some(mut event)) => {
                            if event.host.is_empty() {
                                event.host = entry.name.clone();
                            }
                            if tx.send(Msg::Event(event)).is_err() {
                                return;
                            }
                        }
                        Ok(None) => break format!("agent {} ended the watch stream", entry.name),
                        Err(status) => {
                            break status_error(&entry.name, &entry.address, &status).message;
                        }
                    }
                };
                if opened_at.elapsed() >= STEADY {
                    backoff = FIRST_BACKOFF;
                }
                Some(link.stream_broke(now_ms(), error))
            }
        };
        if let Some(lost) = lost
            && tx.send(lost).is_err()
        {
            return;
        }
        tokio::select! {
            _ = tx.closed() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Connect to `entry`'s agent and open its Watch stream. Opening is bounded
/// like any short call (the agent answers at once and streams afterwards);
/// the stream itself is not, and the channel's keep-alive pings notice a host
/// that vanished.
async fn open_watch(agents: &Cluster, entry: &HostEntry) -> Result<(Agent, WatchStream), String> {
    let agent = agents.connect(entry).await.map_err(|e| e.message)?;
    let stream = agent.watch().await.map_err(|e| e.message)?;
    Ok((agent, stream))
}

/// After `deadline`, ask the agent for its host (a question its core must
/// answer, and not audited) and say whether it answered within `deadline`.
/// Any answer counts, a refusal too: the agent is alive.
async fn probe(agent: Agent, deadline: Duration) -> bool {
    tokio::time::sleep(deadline).await;
    let question = agent.call(|mut c| async move { c.get_host(proto::GetHostRequest {}).await });
    tokio::time::timeout(deadline, question).await.is_ok()
}

/// What a watcher has told the console about its host's connection, so that
/// each outage is reported once and not once per retry.
#[derive(Debug)]
struct Link {
    host: String,
    /// `None` while the stream is up.
    outage: Option<Outage>,
}

#[derive(Debug)]
struct Outage {
    /// When the stream was last up, or when the watcher first tried.
    since_ms: u64,
    /// Whether the console has been told of this outage.
    reported: bool,
    /// Why the latest reconnect failed; `None` until one has.
    retry_error: Option<String>,
}

impl Link {
    /// Before the first try the console has not seen the host at all: an
    /// outage since `first_try_ms`, not yet reported.
    fn new(host: &str, first_try_ms: u64) -> Link {
        Link {
            host: host.to_string(),
            outage: Some(Outage {
                since_ms: first_try_ms,
                reported: false,
                retry_error: None,
            }),
        }
    }

    fn connected(&mut self) {
        self.outage = None;
    }

    /// An open stream ended: the outage starts now, and is news.
    fn stream_broke(&mut self, now_ms: u64, error: String) -> Msg {
        self.outage = Some(Outage {
            since_ms: now_ms,
            reported: true,
            retry_error: None,
        });
        self.lost(now_ms, error)
    }

    /// A (re)connect failed. The `Lost` when nothing was reported yet; after
    /// that only when retries start failing for a different reason (refused
    /// → timed out: the host itself went away). The first failure after a
    /// broken stream is what a stopped agent looks like, and not news.
    fn reconnect_failed(&mut self, now_ms: u64, error: String) -> Option<Msg> {
        let outage = self.outage.get_or_insert(Outage {
            since_ms: now_ms,
            reported: false,
            retry_error: None,
        });
        let news = !outage.reported
            || outage
                .retry_error
                .as_ref()
                .is_some_and(|previous| *previous != error);
        outage.reported = true;
        outage.retry_error = Some(error.clone());
        let since_ms = outage.since_ms;
        news.then(|| self.lost(since_ms, error))
    }

    fn lost(&self, since_ms: u64, error: String) -> Msg {
        Msg::Lost {
            host: self.host.clone(),
            since_ms,
            error,
        }
    }
}

/// Carry out `command` against its host's agent and say how it went: the
/// agent's answer in a line, or its error message, which agents write for
/// operators. Connecting and the call are each bounded
/// ([`crate::cli::client::CONNECT_TIMEOUT`], [`crate::cli::client::REQUEST_TIMEOUT`]),
/// so the console never waits for ever.
pub async fn execute(agents: &Cluster, command: Command) -> Msg {
    if let Command::LoadActions { host, id } = &command {
        return load_actions(agents, host, id).await;
    }
    if let Command::Check {
        host,
        vm,
        destination,
        mode,
    } = command
    {
        let answer = check(agents, &host, &vm, &destination, mode).await;
        return Msg::Checked {
            source: host,
            vm,
            destination,
            mode,
            answer,
        };
    }
    if let Command::Doctor { host } = command {
        let findings = crate::cli::doctor::examine(agents, &host, agents.answer_deadline).await;
        return Msg::Doctor { host, findings };
    }
    if let Command::LoadLogs { id, hosts } = command {
        let answers = crate::cli::logs::ask_hosts(agents, &hosts, &id).await;
        return Msg::Logs {
            lines: crate::cli::logs::merge(&answers),
            missing: crate::cli::logs::missing(&answers),
            id,
        };
    }
    Msg::Done {
        what: command.describe(),
        result: run(agents, command).await,
    }
}

async fn run(agents: &Cluster, command: Command) -> Result<String, String> {
    match command {
        Command::Quit => Ok("quit".into()),
        Command::LoadActions { .. }
        | Command::Check { .. }
        | Command::Doctor { .. }
        | Command::LoadLogs { .. } => Ok(String::new()),
        Command::Abort { host, id } => {
            let agent = connect(agents, &host).await?;
            let request = proto::MigrationRef { id };
            let record = agent
                .call(|mut c| async move { c.abort(request).await })
                .await
                .map_err(|e| e.message)?;
            Ok(aborted_line(&MigrationRecord::from(&record)))
        }
        Command::Retry {
            host,
            id,
            destination,
            mode,
            completion,
        } => {
            let agent = connect(agents, &host).await?;
            let request = proto::RetryRequest {
                id,
                destination: destination.unwrap_or_default(),
                mode: mode_to_proto(mode) as i32,
                completion: whole(&completion),
            };
            let record = agent
                .call(|mut c| async move { c.retry(request).await })
                .await
                .map_err(|e| e.message)?;
            Ok(format!(
                "{} started",
                started_line(&MigrationRecord::from(&record))
            ))
        }
        Command::Rollback { host, id } => {
            let agent = connect(agents, &host).await?;
            let reply = agent.rollback(&id).await.map_err(|e| e.message)?;
            rollback_result(&agent.name, &id, &reply)
        }
        Command::Start {
            host,
            vm,
            destination,
            mode,
            completion,
        } => {
            let agent = connect(agents, &host).await?;
            let request = proto::StartMigrationRequest {
                vm,
                destination,
                mode: mode_to_proto(mode) as i32,
                completion: whole(&completion),
            };
            let record = agent
                .call(|mut c| async move { c.start_migration(request).await })
                .await
                .map_err(|e| e.message)?;
            Ok(format!(
                "{} started",
                started_line(&MigrationRecord::from(&record))
            ))
        }
        Command::Evacuate {
            host,
            mode,
            completion,
            concurrency,
            max_attempts,
            exclude,
        } => {
            let agent = connect(agents, &host).await?;
            let request = proto::EvacuateRequest {
                mode: mode_to_proto(mode) as i32,
                concurrency,
                max_attempts,
                exclude,
                completion: whole(&completion),
            };
            let record = agent
                .call(|mut c| async move { c.evacuate(request).await })
                .await
                .map_err(|e| e.message)?;
            Ok(Evacuation::from(&record).started_line())
        }
        Command::ControlEvacuation { host, id, control } => {
            let agent = connect(agents, &host).await?;
            let request = proto::ControlEvacuationRequest {
                id,
                control: control as i32,
            };
            let record = agent
                .call(|mut c| async move { c.control_evacuation(request).await })
                .await
                .map_err(|e| e.message)?;
            Ok(evacuation_line(&Evacuation::from(&record)))
        }
        Command::Repair { host, vm, feature } => {
            let agent = connect(agents, &host).await?;
            let request = proto::RepairRequest {
                vm,
                feature: feature.unwrap_or_default(),
            };
            // The stages run on another host, each within its deadline.
            let record = agent
                .call_long(|mut c| async move { c.repair(request).await })
                .await
                .map_err(|e| e.message)?;
            repair_result(&MigrationRecord::from(&record))
        }
        Command::Undrain { host } => {
            let agent = connect(agents, &host).await?;
            agent
                .call(|mut c| async move { c.undrain(proto::UndrainRequest {}).await })
                .await
                .map_err(|e| e.message)?;
            Ok(format!("{host} accepts incoming migrations again"))
        }
    }
}

/// `source`'s admission checks of moving `vm` to `destination`: the
/// destination's part within the answer deadline, and the whole within
/// twice that and a second, so a hung source is said too.
async fn check(
    agents: &Cluster,
    source: &str,
    vm: &str,
    destination: &str,
    mode: crate::protocol::Mode,
) -> Result<proto::CheckReply, String> {
    let deadline = agents.answer_deadline;
    let ask = async {
        let agent = connect(agents, source).await?;
        let request = proto::CheckRequest {
            vm: vm.to_string(),
            destination: destination.to_string(),
            mode: mode_to_proto(mode) as i32,
            answer_deadline_ms: u32::try_from(deadline.as_millis()).unwrap_or(u32::MAX),
        };
        agent
            .call(|mut c| async move { c.check(request).await })
            .await
            .map_err(|e| e.message)
    };
    match tokio::time::timeout(deadline * 2 + std::time::Duration::from_secs(1), ask).await {
        Ok(answer) => answer,
        Err(_) => Err(crate::cli::client::no_answer(source, deadline * 2).message),
    }
}

/// A repair's answer for the status line: repaired, or still degraded
/// with the driver's reason (an error, shown in red).
fn repair_result(record: &MigrationRecord) -> Result<String, String> {
    match record.outcome {
        Some(crate::protocol::Outcome::Degraded) => {
            let reasons = crate::protocol::repair::latest_failures(record);
            Err(format!(
                "{} is still degraded on {}: {}",
                record.vm,
                record.running_on,
                if reasons.is_empty() {
                    record.error.clone().unwrap_or_default()
                } else {
                    reasons.join("; ")
                }
            ))
        }
        _ => Ok(format!(
            "{} repaired on {}: no longer degraded",
            record.vm, record.running_on
        )),
    }
}

/// Migration `id`'s audit entries on `host`. Nothing to show is no news:
/// an agent that cannot say (unreachable, older) leaves the detail as it is.
async fn load_actions(agents: &Cluster, host: &str, id: &str) -> Msg {
    let entries = async {
        let agent = connect(agents, host).await?;
        let request = proto::ListAuditRequest {
            since_ms: 0,
            limit: 100,
            target: id.to_string(),
        };
        agent
            .call(|mut c| async move { c.list_audit(request).await })
            .await
            .map(|r| r.entries)
            .map_err(|e| e.message)
    }
    .await;
    if let Err(e) = &entries {
        tracing::info!("who acted on {id}: {e}");
    }
    Msg::Actions(entries.unwrap_or_default())
}

/// An evacuation's state and counts in a line.
fn evacuation_line(job: &Evacuation) -> String {
    let mut line = job.headline();
    if job.state == JobState::Cancelling && job.in_flight() > 0 {
        line.push_str(if job.abort_in_flight {
            "; aborting the attempts in flight"
        } else {
            "; the attempts in flight may finish"
        });
    }
    line
}

/// The policy the operator confirmed, every field explicit: what the
/// dialog named is what the agent runs, whatever its defaults. (A downtime
/// limit of 0, the host's own, reads as "not asked" there: the same.)
fn whole(policy: &Completion) -> Option<proto::Completion> {
    completion_request_to_proto(&CompletionRequest {
        timeout_per_gib_s: Some(policy.timeout_per_gib_s),
        postcopy: Some(policy.postcopy),
        downtime_limit_ms: Some(policy.downtime_limit_ms),
        when_spent: Some(policy.when_spent),
    })
}

/// A fresh connection per command: commands come at the operator's pace,
/// and a connection kept from an earlier one may have gone stale since.
async fn connect(agents: &Cluster, host: &str) -> Result<Agent, String> {
    let entry = agents.inventory.host(host).ok_or_else(|| {
        let known: Vec<&str> = agents
            .inventory
            .host
            .iter()
            .map(|h| h.name.as_str())
            .collect();
        format!(
            "no host named {host} in the inventory; hosts: {}",
            known.join(", ")
        )
    })?;
    agents.connect(entry).await.map_err(|e| e.message)
}

/// Abort answers once the attempt has ended: say how, and where the VM runs.
fn aborted_line(record: &MigrationRecord) -> String {
    let mut line = format!("migration {}: {}", record.id, state_summary(record));
    if !record.running_on.is_empty() {
        line.push_str(&format!("; {} runs on {}", record.vm, record.running_on));
    }
    line
}

/// A host's Rollback answer in a line. Rollbacks that are still pending after
/// the run are a failure, as for `tern rollback` (exit 1): the operator asked
/// for them to be done, and the first one's error says why they are not.
fn rollback_result(host: &str, id: &str, reply: &proto::RollbackReply) -> Result<String, String> {
    let done = reply.done.len();
    match reply.still_pending.first() {
        None if done == 0 => Ok(format!("{host}: nothing pending for {id}")),
        None => Ok(format!("{host}: {done} rollback(s) of {id} done")),
        Some(first) => Err(format!(
            "{host}: {done} rollback(s) of {id} done, {} still pending: {}",
            reply.still_pending.len(),
            pending_rollback_line(first)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repair_answer_is_success_when_repaired_and_the_drivers_reason_when_still_degraded() {
        let mut record = MigrationRecord::from(&crate::console::fixture::degraded_migration(
            "m-deg", "app-02", "hv-a", "hv-c",
        ));
        record.repairs.push(crate::protocol::repair::RepairEntry {
            at_ms: 5,
            feature: "port-profile".into(),
            stages: vec![crate::protocol::Stage::Finish],
            host: "hv-c".into(),
            result: crate::protocol::repair::RepairResult::Failed,
            error: Some("finish: port busy".into()),
            who: "ana (operator)".into(),
        });
        assert_eq!(
            repair_result(&record),
            Err("app-02 is still degraded on hv-c: port-profile finish: port busy".into())
        );
        record.outcome = Some(crate::protocol::Outcome::Succeeded);
        assert_eq!(
            repair_result(&record),
            Ok("app-02 repaired on hv-c: no longer degraded".into())
        );
    }

    fn lost(msg: Option<Msg>) -> Option<(u64, String)> {
        match msg {
            Some(Msg::Lost {
                host,
                since_ms,
                error,
            }) => {
                assert_eq!(host, "hv-a");
                Some((since_ms, error))
            }
            None => None,
            Some(other) => panic!("expected Lost, got {other:?}"),
        }
    }

    #[test]
    fn a_host_that_never_answered_is_lost_since_the_first_try_and_said_once() {
        let mut link = Link::new("hv-a", 100);
        assert_eq!(
            lost(link.reconnect_failed(150, "refused".into())),
            Some((100, "refused".into()))
        );
        assert_eq!(lost(link.reconnect_failed(400, "refused".into())), None);
        assert_eq!(lost(link.reconnect_failed(800, "refused".into())), None);
    }

    #[test]
    fn a_broken_stream_is_said_at_once_and_not_again_for_each_retry() {
        let mut link = Link::new("hv-a", 100);
        link.connected();
        assert_eq!(
            lost(Some(link.stream_broke(5000, "reset".into()))),
            Some((5000, "reset".into()))
        );
        // The agent is down: its port refuses, again and again.
        assert_eq!(lost(link.reconnect_failed(5200, "refused".into())), None);
        assert_eq!(lost(link.reconnect_failed(5600, "refused".into())), None);
    }

    #[test]
    fn retries_failing_for_a_new_reason_are_said_with_the_same_since() {
        let mut link = Link::new("hv-a", 100);
        link.connected();
        lost(Some(link.stream_broke(5000, "reset".into())));
        assert_eq!(lost(link.reconnect_failed(5200, "refused".into())), None);
        assert_eq!(
            lost(link.reconnect_failed(5600, "timed out".into())),
            Some((5000, "timed out".into()))
        );
        assert_eq!(lost(link.reconnect_failed(6400, "timed out".into())), None);
    }

    #[test]
    fn a_reconnect_ends_the_outage_and_the_next_one_is_said_again() {
        let mut link = Link::new("hv-a", 100);
        assert!(lost(link.reconnect_failed(150, "refused".into())).is_some());
        link.connected();
        assert_eq!(
            lost(Some(link.stream_broke(9000, "reset".into()))),
            Some((9000, "reset".into()))
        );
    }

    #[test]
    fn a_policy_is_sent_whole_so_the_agent_runs_what_the_dialog_named() {
        use crate::protocol::Mode;
        use crate::protocol::completion::{Postcopy, WhenSpent};
        use crate::protocol::record::completion_request_from_proto;
        let other = Completion {
            timeout_per_gib_s: 999,
            postcopy: Postcopy::Now,
            downtime_limit_ms: 0,
            when_spent: WhenSpent::Abort,
        };
        for policy in [
            Completion::for_mode(Mode::Safe),
            Completion::for_mode(Mode::Fast),
            Completion {
                timeout_per_gib_s: 0,
                postcopy: Postcopy::Never,
                downtime_limit_ms: 0,
                when_spent: WhenSpent::Abort,
            },
            Completion {
                timeout_per_gib_s: 40,
                postcopy: Postcopy::Never,
                downtime_limit_ms: 0,
                when_spent: WhenSpent::Continue,
            },
        ] {
            let sent = whole(&policy);
            // Whatever the agent's base (the mode's default, the last
            // attempt's policy), nothing of it shows through.
            assert_eq!(
                completion_request_from_proto(sent.as_ref()).over(other),
                policy,
                "{sent:?}"
            );
        }
    }

    #[test]
    fn still_pending_rollbacks_are_a_failure_that_names_the_first() {
        let pending = proto::PendingRollback {
            attempt_id: "a-1".into(),
            migration_id: "m-1".into(),
            vm: "web-01".into(),
            feature: "port-profile".into(),
            stage: "rollback".into(),
            error: "switch timed out".into(),
            tries: 2,
            next_try_at_ms: 0,
        };
        let reply = proto::RollbackReply {
            done: vec![],
            still_pending: vec![pending.clone()],
        };
        assert_eq!(
            rollback_result("hv-b", "m-1", &reply),
            Err("hv-b: 0 rollback(s) of m-1 done, 1 still pending: port-profile rollback for web-01 \
                 (migration m-1, attempt a-1), 2 tries: switch timed out"
                .into())
        );
        let reply = proto::RollbackReply {
            done: vec![pending],
            still_pending: vec![],
        };
        assert_eq!(
            rollback_result("hv-b", "m-1", &reply),
            Ok("hv-b: 1 rollback(s) of m-1 done".into())
        );
        assert_eq!(
            rollback_result("hv-b", "m-1", &proto::RollbackReply::default()),
            Ok("hv-b: nothing pending for m-1".into())
        );
    }
}
