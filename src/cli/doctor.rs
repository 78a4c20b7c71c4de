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
use super::client::Cluster;
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
    /// A clock finding's host clock against this machine's, in ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skew_ms: Option<i64>,
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
        skew_ms: None,
    };
    let asked_at = now_ms();
    let reply = async {
        let entry = cluster.check_host(host)?;
        let agent = cluster
            .connect_within(entry, deadline)
            .await?
            .within(deadline);
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
    let (verdict, fix) = clock_verdict(skew);
    let mut clock = finding(
        "clock",
        verdict,
        format!("its clock is {skew:+} ms from this one's"),
        fix,
    );
    clock.skew_ms = Some(skew);
    found.push(clock);
    found.extend(reply.checks.into_iter().map(|c| from_check(host, c)));
    found
}

fn clock_verdict(skew_ms: i64) -> (&'static str, &'static str) {
    const FIX: &str = "synchronise the clocks (chrony, systemd-timesyncd)";
    if skew_ms.abs() > SKEW_ERROR_MS {
        ("error", FIX)
    } else if skew_ms.abs() > SKEW_WARNING_MS {
        ("warning", FIX)
    } else {
        ("ok", "")
    }
}

/// With two agents or more, each clock is held to the agents' median
/// rather than to this machine's, which may be the one that is off; this
/// machine gets a finding of its own when the agents agree it is.
fn judge_clocks(findings: &mut Vec<Finding>) {
    let mut skews: Vec<i64> = findings.iter().filter_map(|f| f.skew_ms).collect();
    if skews.len() < 2 {
        return;
    }
    skews.sort_unstable();
    let median = skews[skews.len() / 2];
    for f in findings.iter_mut() {
        let Some(skew) = f.skew_ms else { continue };
        let off = skew - median;
        let (verdict, fix) = clock_verdict(off);
        f.verdict = verdict;
        f.fix = fix.into();
        f.detail = format!(
            "its clock is {off:+} ms from the agents' median ({skew:+} ms from this machine's)"
        );
    }
    let (verdict, _) = clock_verdict(median);
    if verdict != "ok" {
        findings.insert(
            0,
            Finding {
                host: "(this machine)".into(),
                check: "clock".into(),
                verdict,
                detail: format!(
                    "the agents' median clock is {median:+} ms from this machine's, whose TLS \
                     checks the agents' certificates by it"
                ),
                fix: "synchronise this machine's clock (chrony, systemd-timesyncd)".into(),
                mib_s: None,
                skew_ms: Some(-median),
            },
        );
    }
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
        skew_ms: None,
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
        skew_ms: None,
    };
    // The transfer itself, and the agent's own bounds on the rest: the
    // other host opening its sink, the connection, the sink's answer.
    let deadline = Duration::from_secs(u64::from(seconds)) + LINK_MARGIN;
    let reply = async {
        let entry = cluster.check_host(from)?;
        let agent = cluster
            .connect_within(entry, cluster.answer_deadline)
            .await?
            .within(deadline);
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
    // Links are measured only between hosts named: never across a fleet.
    let named = hosts.len();
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
    let deadline = cluster.answer_deadline;
    let mut findings: Vec<Finding> = join_all(hosts.iter().map(|h| examine(&cluster, h, deadline)))
        .await
        .into_iter()
        .flatten()
        .collect();
    judge_clocks(&mut findings);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn clock(host: &str, skew: i64) -> Finding {
        let (verdict, fix) = clock_verdict(skew);
        Finding {
            host: host.into(),
            check: "clock".into(),
            verdict,
            detail: format!("its clock is {skew:+} ms from this one's"),
            fix: fix.into(),
            mib_s: None,
            skew_ms: Some(skew),
        }
    }

    #[test]
    fn the_agent_whose_clock_is_off_is_named_not_the_others() {
        let mut found = vec![clock("hv-a", 5), clock("hv-b", 12), clock("hv-c", 45_000)];
        judge_clocks(&mut found);
        let verdicts: Vec<&str> = found.iter().map(|f| f.verdict).collect();
        assert_eq!(verdicts, ["ok", "ok", "error"]);
        assert_eq!(
            found[2].detail,
            "its clock is +44988 ms from the agents' median (+45000 ms from this machine's)"
        );
        assert!(found[2].fix.contains("chrony"));
    }

    #[test]
    fn agents_that_agree_with_each_other_are_fine_and_this_machine_is_named() {
        // This machine is a minute behind every agent.
        let mut found = vec![
            clock("hv-a", 60_010),
            clock("hv-b", 60_000),
            clock("hv-c", 60_020),
        ];
        judge_clocks(&mut found);
        assert_eq!(found.len(), 4);
        assert_eq!(
            (found[0].host.as_str(), found[0].verdict),
            ("(this machine)", "error")
        );
        assert!(
            found[0]
                .detail
                .starts_with("the agents' median clock is +60010 ms from this machine's"),
            "{}",
            found[0].detail
        );
        assert!(found[1..].iter().all(|f| f.verdict == "ok"), "{found:?}");
    }

    #[test]
    fn one_agent_is_held_to_this_machine() {
        let mut found = vec![clock("hv-a", 2_000)];
        judge_clocks(&mut found);
        assert_eq!(found, vec![clock("hv-a", 2_000)]);
        assert_eq!(found[0].verdict, "warning");
    }
}
