//! `tern logs ID`: a migration's lines from the logs of every host it
//! touched, merged in time order. Each agent keeps its own log
//! (`crate::agent::logs`) and answers AttemptLogs for its own host; the
//! console's detail asks the same way ([`ask_hosts`], [`merge`]).

use futures::future::join_all;
use serde::Serialize;

use super::client::{Access, Cluster, find_migration};
use super::{CliError, CliResult, check_id, exit};
use crate::proto;
use crate::protocol::bounds::{self, IdKind};

/// One host's answer to AttemptLogs, or why there is none.
#[derive(Debug, Clone)]
pub struct HostLogs {
    pub host: String,
    pub answer: Result<proto::AttemptLogsReply, CliError>,
}

/// Ask each of `hosts` for its lines of `id` (a migration or an attempt id),
/// all at once, each within the cluster's answer deadline: a host that does
/// not answer in time is named ("hv-b: no answer in 1 s") and holds nothing
/// up. Answers come in the order of `hosts`; their text is terminal-safe.
pub async fn ask_hosts(cluster: &Cluster, hosts: &[String], id: &str) -> Vec<HostLogs> {
    let deadline = cluster.answer_deadline;
    join_all(hosts.iter().map(|host| async move {
        let answer = async {
            let entry = cluster.check_host(host)?;
            let agent = cluster
                .connect_within(entry, deadline)
                .await?
                .within(deadline);
            agent.asked(agent.attempt_logs(id, 0)).await
        }
        .await;
        HostLogs {
            host: host.clone(),
            answer,
        }
    }))
    .await
}

/// Every answered line, in time order; lines of the same millisecond keep
/// the order of the answers, then each host's own order.
pub fn merge(answers: &[HostLogs]) -> Vec<proto::AttemptLogLine> {
    let mut lines: Vec<proto::AttemptLogLine> = answers
        .iter()
        .filter_map(|a| a.answer.as_ref().ok())
        .flat_map(|reply| reply.lines.iter().cloned())
        .collect();
    lines.sort_by_key(|l| l.at_ms);
    lines
}

/// What is missing from the merged lines, one note per host: no answer,
/// or only its newest lines.
pub fn missing(answers: &[HostLogs]) -> Vec<String> {
    answers
        .iter()
        .filter_map(|a| match &a.answer {
            Err(e) => Some(e.message.clone()),
            Ok(reply) if reply.truncated => Some(format!(
                "{}: only its newest {} lines are shown",
                a.host,
                reply.lines.len()
            )),
            Ok(_) => None,
        })
        .collect()
}

/// `08:12:03.042` (UTC), the time of day with milliseconds.
pub fn clock_ms(at_ms: u64) -> String {
    format!("{}.{:03}", super::audit::clock(at_ms), at_ms % 1000)
}

/// `08:12:03.042 hv-a INFO  m-0123456789ab.1 port-profile finish failed …`,
/// the host padded to `host_width`. A line of no attempt shows `-`.
pub fn format_line(line: &proto::AttemptLogLine, host_width: usize) -> String {
    let attempt = if line.attempt_id.is_empty() {
        "-"
    } else {
        line.attempt_id.as_str()
    };
    format!(
        "{} {:<host_width$} {:<5} {attempt} {}",
        clock_ms(line.at_ms),
        line.host,
        line.level,
        line.text
    )
}

/// One line as `tern logs --json` prints it (one object a line).
#[derive(Debug, Serialize)]
struct LineJson<'a> {
    at_ms: u64,
    host: &'a str,
    level: &'a str,
    attempt_id: &'a str,
    text: &'a str,
}

/// `tern logs ID [--json]`: the lines of migration ID (or of one attempt,
/// given its attempt id) from its source and destination, merged in time
/// order. Hosts that may hold lines of an earlier attempt (any other) are
/// asked too. Exits 0 when the migration's hosts answered; one that did not
/// is named and the command exits 69 after printing what the others said.
pub async fn logs(access: &Access, id: &str, json: bool) -> CliResult {
    let migration_id = match id.split_once('.') {
        Some(_) => {
            check_id("attempt ID", id, IdKind::Attempt)?;
            id.split_once('.').map(|(m, _)| m).unwrap_or(id)
        }
        None => {
            check_id("migration ID", id, IdKind::Migration).map_err(|_| {
                CliError::usage(format!(
                    "{} is neither a migration id (m- and 12 hex digits, e.g. m-0123456789ab) \
                     nor an attempt id (e.g. m-0123456789ab.1)",
                    bounds::shown(id)
                ))
            })?;
            id
        }
    };
    let cluster = Cluster::load(access)?;
    let links = cluster.connect_all().await;
    let (_, record) = find_migration(&links, migration_id).await?;
    if let Some(n) = id
        .split_once('.')
        .and_then(|(_, n)| n.parse::<u32>().ok())
        .filter(|n| *n > record.attempt)
    {
        return Err(CliError::usage(format!(
            "migration {migration_id} has no attempt {n}: its latest is {}",
            record.attempt
        )));
    }
    // The source and the latest destination first: theirs are the lines
    // that must be there. Every other host may have been the destination
    // of an earlier attempt.
    let mut hosts = vec![record.source.clone()];
    if !record.destination.is_empty() && record.destination != record.source {
        hosts.push(record.destination.clone());
    }
    let involved = hosts.len();
    for name in cluster.host_names() {
        if !hosts.iter().any(|h| h == name) {
            hosts.push(name.to_string());
        }
    }
    let answers = ask_hosts(&cluster, &hosts, id).await;
    let lines = merge(&answers);
    let width = lines.iter().map(|l| l.host.len()).max().unwrap_or(0);
    for line in &lines {
        if json {
            let shown = LineJson {
                at_ms: line.at_ms,
                host: &line.host,
                level: &line.level,
                attempt_id: &line.attempt_id,
                text: &line.text,
            };
            println!(
                "{}",
                serde_json::to_string(&shown).expect("plain fields serialize")
            );
        } else {
            println!("{}", format_line(line, width));
        }
    }
    // Only the migration's own hosts make the answer incomplete; another
    // host that did not answer is mentioned in passing.
    let mut failure: Option<CliError> = None;
    for (i, answer) in answers.iter().enumerate() {
        match &answer.answer {
            Err(e) if i < involved => {
                eprintln!("tern: {}", e.message);
                failure.get_or_insert_with(|| e.clone());
            }
            Err(e) => eprintln!(
                "tern: {} (it may hold lines of an earlier attempt)",
                e.message
            ),
            Ok(reply) if reply.truncated => eprintln!(
                "tern: {}: only its newest {} lines are shown",
                answer.host,
                reply.lines.len()
            ),
            Ok(_) => {}
        }
    }
    if lines.is_empty() && failure.is_none() {
        eprintln!("tern: no host has log lines of {id}");
    }
    match failure {
        // Already printed above, with the others.
        Some(e) => Ok(e.code),
        None => Ok(exit::SUCCEEDED),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::client::no_answer;

    fn line(at_ms: u64, host: &str, level: &str, text: &str) -> proto::AttemptLogLine {
        proto::AttemptLogLine {
            at_ms,
            level: level.into(),
            host: host.into(),
            attempt_id: "m-0123456789ab.1".into(),
            text: text.into(),
        }
    }

    fn answered(host: &str, lines: Vec<proto::AttemptLogLine>) -> HostLogs {
        HostLogs {
            host: host.into(),
            answer: Ok(proto::AttemptLogsReply {
                host: host.into(),
                lines,
                truncated: false,
            }),
        }
    }

    #[test]
    fn both_hosts_lines_are_merged_in_time_order() {
        let answers = vec![
            answered(
                "hv-a",
                vec![
                    line(1_000, "hv-a", "INFO", "begun"),
                    line(3_000, "hv-a", "INFO", "performed"),
                    line(5_000, "hv-a", "ERROR", "failed"),
                ],
            ),
            answered(
                "hv-b",
                vec![
                    line(2_000, "hv-b", "INFO", "prepared"),
                    line(3_000, "hv-b", "WARN", "same millisecond"),
                    line(4_000, "hv-b", "WARN", "finish failed"),
                ],
            ),
        ];
        let merged = merge(&answers);
        let merged: Vec<&str> = merged.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(
            merged,
            [
                "begun",
                "prepared",
                "performed",
                "same millisecond",
                "finish failed",
                "failed"
            ]
        );
    }

    #[test]
    fn a_host_that_did_not_answer_is_named_and_the_others_lines_kept() {
        let answers = vec![
            answered("hv-a", vec![line(1_000, "hv-a", "INFO", "begun")]),
            HostLogs {
                host: "hv-b".into(),
                answer: Err(no_answer("hv-b", std::time::Duration::from_secs(1))),
            },
            HostLogs {
                host: "hv-c".into(),
                answer: Ok(proto::AttemptLogsReply {
                    host: "hv-c".into(),
                    lines: vec![line(2_000, "hv-c", "INFO", "x")],
                    truncated: true,
                }),
            },
        ];
        assert_eq!(merge(&answers).len(), 2);
        assert_eq!(
            missing(&answers),
            [
                "hv-b: no answer in 1 s",
                "hv-c: only its newest 1 lines are shown"
            ]
        );
    }

    #[test]
    fn a_line_shows_time_host_level_attempt_and_text() {
        // 2026-12-05 08:12:03.042 UTC
        let at = 1_764_922_323_042;
        assert_eq!(
            format_line(&line(at, "hv-a", "INFO", "begun"), 5),
            "08:12:03.042 hv-a  INFO  m-0123456789ab.1 begun"
        );
        let mut none = line(at, "hv-b", "WARN", "x");
        none.attempt_id.clear();
        assert_eq!(format_line(&none, 4), "08:12:03.042 hv-b WARN  - x");
    }
}
