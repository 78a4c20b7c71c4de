//! `tern doctor [HOST…] [--json]`: before a migration fails at 3 a.m., what
//! each host needs to take part in one, checked now. Each agent checks its
//! own hypervisor, disk, journal, certificate and pending work (the Doctor
//! RPC); this command adds what only the caller sees — whether the host
//! answers at all, and its clock against this one's. Exit 0 when nothing is
//! an error (warnings included), 1 when something is.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::join_all;
use serde::Serialize;

use super::client::Access;
use super::client::{Cluster, no_answer};
use super::{CliError, CliResult, exit};
use crate::proto;

/// A clock further off than this is a warning; than [`SKEW_ERROR_MS`], an
/// error (journal times, heartbeats and certificates all read clocks).
const SKEW_WARNING_MS: i64 = 1_000;
const SKEW_ERROR_MS: i64 = 30_000;
/// How long a link measurement may take beyond its transfer (the agents
/// bound each of its steps to 5 s).
const LINK_MARGIN: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Finding {
    pub host: String,
    pub check: String,
    /// "ok", "warning" or "error".
    pub verdict: &'static str,
    pub detail: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub fix: String,
    /// A link measurement's throughput, in MiB/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mib_s: Option<f64>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

fn verdict(finding: i32) -> &'static str {
    match proto::Finding::try_from(finding).unwrap_or(proto::Finding::Error) {
        proto::Finding::Ok => "ok",
        proto::Finding::Warning => "warning",
        proto::Finding::Error => "error",
    }
}

/// The findings of one host: its agent's checks and the caller's own.
pub async fn examine(cluster: &Cluster, host: &str, deadline: Duration) -> Vec<Finding> {
    let finding = |check: &str, verdict: &'static str, detail: String, fix: &str| Finding {
        host: host.to_string(),
        check: check.into(),
        verdict,
        detail,
        fix: fix.into(),
        mib_s: None,
    };
    let asked_at = now_ms();
    let reply = async {
        let entry = cluster.check_host(host)?;
        let agent = match tokio::time::timeout(deadline, cluster.connect(entry)).await {
            Ok(agent) => agent?.within(deadline),
            Err(_) => return Err(no_answer(host, deadline)),
        };
        agent.asked(agent.doctor()).await
    }
    .await;
    let answered_at = now_ms();
    let reply = match reply {
        Ok(reply) => reply,
        Err(e) => {
            let fix = unreachable_fix(host, &e.message);
            return vec![finding("reachable", "error", e.message, &fix)];
        }
    };
    let mut found = vec![finding(
        "reachable",
        "ok",
        format!("answered in {} ms", answered_at - asked_at),
        "",
    )];
    // Its clock against the middle of the call.
    let skew = reply.now_ms as i64 - (asked_at + answered_at) / 2;
    let said = format!("its clock is {skew:+} ms from this one's");
    found.push(if skew.abs() > SKEW_ERROR_MS {
        finding(
            "clock",
            "error",
            said,
            "synchronise the clocks (chrony, systemd-timesyncd)",
        )
    } else if skew.abs() > SKEW_WARNING_MS {
        finding(
            "clock",
            "warning",
            said,
            "synchronise the clocks (chrony, systemd-timesyncd)",
        )
    } else {
        finding("clock", "ok", said, "")
    });
    found.extend(reply.checks.into_iter().map(|c| from_check(host, c)));
    found
}

/// What to do about a host that did not answer, from why: TLS refusing
/// its certificate is not fixed by starting the agent.
fn unreachable_fix(host: &str, why: &str) -> String {
    if why.contains("certificate expired") {
        format!(
            "issue it a new one (tern ca issue --role agent {host}, with its address in --san), \
             install it as the agent's [tls] cert and key, and restart the agent"
        )
    } else if why.contains("invalid peer certificate") {
        format!(
            "its certificate is not one this cluster's CA issued to {host} for the inventory's \
             address: issue one with tern ca issue --role agent {host}"
        )
    } else {
        "start its agent (systemctl start tern-agent), or check the address in the inventory and the network".into()
    }
}

fn from_check(host: &str, c: proto::DoctorCheck) -> Finding {
    Finding {
        host: host.to_string(),
        check: c.name,
        verdict: verdict(c.finding),
        detail: c.detail,
        fix: c.fix,
        mib_s: None,
    }
}

/// The migration link from `from` to `to`, measured by `from`'s agent.
async fn link(cluster: &Cluster, from: &str, to: &str, seconds: u32) -> Finding {
    let failed = |detail: String| Finding {
        host: from.into(),
        check: format!("link to {to}"),
        verdict: "error",
        detail,
        fix: String::new(),
        mib_s: None,
    };
    // The transfer itself, and the agent's own bounds on the rest: the
    // other host opening its sink, the connection, the sink's answer.
    let deadline = Duration::from_secs(u64::from(seconds)) + LINK_MARGIN;
    let reply = async {
        let entry = cluster.check_host(from)?;
        let agent =
            match tokio::time::timeout(cluster.answer_deadline, cluster.connect(entry)).await {
                Ok(agent) => agent?.within(deadline),
                Err(_) => return Err(no_answer(from, cluster.answer_deadline)),
            };
        agent.asked(agent.measure_link(to, seconds * 1000)).await
    }
    .await;
    match reply {
        Ok(reply) => {
            let mut found = match reply.check {
                Some(check) => from_check(from, check),
                None => failed("the agent answered no verdict".into()),
            };
            if reply.bytes > 0 && reply.elapsed_us > 0 {
                let mib_s =
                    reply.bytes as f64 / f64::from(1u32 << 20) / (reply.elapsed_us as f64 / 1e6);
                found.mib_s = Some((mib_s * 10.0).round() / 10.0);
            }
            found
        }
        Err(e) => failed(format!("not measured: {}", e.message)),
    }
}

pub async fn doctor(access: &Access, hosts: &[String], link_seconds: u32, json: bool) -> CliResult {
    let cluster = Cluster::load(access)?;
    let hosts: Vec<String> = if hosts.is_empty() {
        cluster
            .host_names()
            .into_iter()
            .map(str::to_string)
            .collect()
    } else {
        for host in hosts {
            cluster.check_host(host)?;
        }
        hosts.to_vec()
    };
    let named = hosts.len();
    let deadline = cluster.answer_deadline;
    let mut findings: Vec<Finding> = join_all(hosts.iter().map(|h| examine(&cluster, h, deadline)))
        .await
        .into_iter()
        .flatten()
        .collect();
    // Between the hosts named, one pair at a time: transfers at once would
    // share links and measure each other.
    if named >= 2 {
        for from in &hosts {
            for to in hosts.iter().filter(|to| *to != from) {
                let found = link(&cluster, from, to, link_seconds).await;
                let at = findings
                    .iter()
                    .rposition(|f| f.host == *from)
                    .map_or(findings.len(), |i| i + 1);
                findings.insert(at, found);
            }
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&findings)
                .map_err(|e| CliError::new(exit::FAILED, e.to_string()))?
        );
    } else {
        print!("{}", text(&findings));
    }
    Ok(if findings.iter().any(|f| f.verdict == "error") {
        exit::FAILED
    } else {
        exit::SUCCEEDED
    })
}

/// Host by host, a line a check, the fix under what is not ok.
pub fn text(findings: &[Finding]) -> String {
    use std::fmt::Write;
    let width = findings.iter().map(|f| f.check.len()).max().unwrap_or(0);
    let mut out = String::new();
    let mut host = "";
    for f in findings {
        if f.host != host {
            host = &f.host;
            let _ = writeln!(out, "{host}");
        }
        let _ = writeln!(out, "  {:<7}  {:<width$}  {}", f.verdict, f.check, f.detail);
        if !f.fix.is_empty() {
            let _ = writeln!(out, "  {:<7}  {:<width$}  fix: {}", "", "", f.fix);
        }
    }
    let (errors, warnings) = (
        findings.iter().filter(|f| f.verdict == "error").count(),
        findings.iter().filter(|f| f.verdict == "warning").count(),
    );
    let _ = writeln!(out, "{errors} error(s), {warnings} warning(s)");
    out
}
