//! `tern check VM --to HOST`: every admission check of Begin (on the VM's
//! source) and Prepare (on the destination), asked of the source's agent,
//! which asks the destination's. Nothing is started: one line per check,
//! and exit 0 when all pass, 1 when one does not.

use serde_json::json;

use super::client::{Access, Cluster, find_vm_host};
use super::{CliError, CliResult, exit};
use crate::proto;
use crate::protocol::Mode;
use crate::protocol::record::mode_to_proto;

/// `tern check VM --to HOST [--mode M] [--json]`.
pub async fn check(access: &Access, vm: &str, to: &str, mode: Mode, json: bool) -> CliResult {
    crate::protocol::bounds::check_name("VM", vm).map_err(|e| CliError::usage(e.to_string()))?;
    let cluster = Cluster::load(access)?;
    cluster.check_host(to)?;
    let links = cluster.connect_all().await;
    let source_name = find_vm_host(&cluster, &links, vm).await?;
    let source = links
        .iter()
        .find(|l| l.entry.name == source_name)
        .map(|l| l.agent.as_ref().map_err(Clone::clone))
        .ok_or_else(|| {
            CliError::new(
                exit::FAILED,
                format!("agent {source_name} reported a VM but is not in the inventory"),
            )
        })??;
    let request = proto::CheckRequest {
        vm: vm.to_string(),
        destination: to.to_string(),
        mode: mode_to_proto(mode) as i32,
        answer_deadline_ms: u32::try_from(cluster.answer_deadline.as_millis()).unwrap_or(u32::MAX),
    };
    let reply = source
        .call(|mut c| async move { c.check(request).await })
        .await?;
    let passed = all_passed(&reply);
    if json {
        println!("{}", reply_json(&reply));
    } else {
        print!("{}", reply_text(&reply));
    }
    Ok(if passed {
        exit::SUCCEEDED
    } else {
        exit::FAILED
    })
}

/// Whether the VM could move: every check passed (and there were some).
pub fn all_passed(reply: &proto::CheckReply) -> bool {
    !reply.checks.is_empty() && reply.checks.iter().all(|c| c.ok)
}

/// One line per check, "ok  hv-b capacity: …" or "NO  hv-b drain: …",
/// then the verdict.
pub fn reply_text(reply: &proto::CheckReply) -> String {
    let mut text = String::new();
    for c in &reply.checks {
        text.push_str(&check_line(c));
        text.push('\n');
    }
    let failed = reply.checks.iter().filter(|c| !c.ok).count();
    let mode = mode_name(reply.mode);
    text.push_str(&match failed {
        0 => format!(
            "{} can move from {} to {} in {mode} mode: all {} checks pass\n",
            reply.vm,
            reply.source,
            reply.destination,
            reply.checks.len()
        ),
        n => format!(
            "{} cannot move from {} to {} in {mode} mode now: {n} of {} checks fail\n",
            reply.vm,
            reply.source,
            reply.destination,
            reply.checks.len()
        ),
    });
    text
}

/// "ok  hv-b capacity: 6.0 GiB and 8 vCPUs free, needs 2.0 GiB and 2".
pub fn check_line(c: &proto::AdmissionCheck) -> String {
    let verdict = if c.ok { "ok" } else { "NO" };
    format!("{verdict:<3} {} {}: {}", c.host, c.name, c.detail)
}

pub fn reply_json(reply: &proto::CheckReply) -> serde_json::Value {
    json!({
        "vm": reply.vm,
        "source": reply.source,
        "destination": reply.destination,
        "mode": mode_name(reply.mode),
        "ok": all_passed(reply),
        "checks": reply.checks.iter().map(|c| json!({
            "name": c.name,
            "host": c.host,
            "ok": c.ok,
            "detail": c.detail,
        })).collect::<Vec<_>>(),
    })
}

fn mode_name(mode: i32) -> &'static str {
    crate::protocol::record::mode_from_proto(mode)
        .unwrap_or(Mode::Safe)
        .as_str()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &str, host: &str, ok: bool, detail: &str) -> proto::AdmissionCheck {
        proto::AdmissionCheck {
            name: name.into(),
            host: host.into(),
            ok,
            detail: detail.into(),
        }
    }

    fn reply(checks: Vec<proto::AdmissionCheck>) -> proto::CheckReply {
        proto::CheckReply {
            vm: "web-01".into(),
            source: "hv-a".into(),
            destination: "hv-b".into(),
            mode: proto::Mode::Safe as i32,
            checks,
        }
    }

    #[test]
    fn each_check_is_one_line_with_its_verdict_host_and_detail() {
        let r = reply(vec![
            check("capacity", "hv-b", true, "6.0 GiB free"),
            check(
                "drain",
                "hv-b",
                false,
                "hv-b is draining (`tern undrain hv-b` ends that)",
            ),
        ]);
        let text = reply_text(&r);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "ok  hv-b capacity: 6.0 GiB free");
        assert_eq!(
            lines[1],
            "NO  hv-b drain: hv-b is draining (`tern undrain hv-b` ends that)"
        );
        assert_eq!(
            lines[2],
            "web-01 cannot move from hv-a to hv-b in safe mode now: 1 of 2 checks fail"
        );
        assert!(!all_passed(&r));
        assert_eq!(reply_json(&r)["ok"], false);
        assert_eq!(reply_json(&r)["checks"][1]["name"], "drain");
    }

    #[test]
    fn no_checks_at_all_is_not_a_pass() {
        assert!(!all_passed(&reply(Vec::new())));
        assert!(all_passed(&reply(vec![check("lock", "hv-a", true, "")])));
    }
}
