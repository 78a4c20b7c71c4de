//! `tern audit`: who asked the agents for what, across the cluster, oldest
//! first; and the JSON form of one entry, which `tern watch` prints too.

use futures::future::join_all;
use serde::{Deserialize, Serialize};

use super::client::{Access, Cluster, reachable};
use super::{CliError, CliResult, exit};
use crate::proto;

/// One audit entry as `--json` and `tern watch --json` print it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditJson {
    pub at_ms: u64,
    pub host: String,
    pub who: String,
    pub role: String,
    pub action: String,
    pub target: String,
    pub ok: bool,
    pub result: String,
}

impl From<&proto::AuditEntry> for AuditJson {
    fn from(e: &proto::AuditEntry) -> Self {
        AuditJson {
            at_ms: e.at_ms,
            host: e.host.clone(),
            who: e.who.clone(),
            role: e.role.clone(),
            action: e.action.clone(),
            target: e.target.clone(),
            ok: e.ok,
            result: e.result.clone(),
        }
    }
}

impl AuditJson {
    /// `ana (operator) abort m-1a2b on hv-a: migration m-1a2b attempt 1`,
    /// with "refused" before a refusal's reason.
    pub fn line(&self) -> String {
        let refused = if self.ok { "" } else { "REFUSED: " };
        format!(
            "{} ({}) {} {} on {}: {refused}{}",
            self.who, self.role, self.action, self.target, self.host, self.result
        )
    }
}

/// What `tern audit` was asked for.
#[derive(Debug, Clone, Default)]
pub struct AuditArgs {
    /// Only entries this recent.
    pub since_ms: Option<u64>,
    /// Only this host's agent.
    pub host: Option<String>,
    pub json: bool,
}

/// Parse `--since`: a number and a unit, `s`, `m`, `h` or `d` (`90m`, `2d`).
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: expected a number and a unit (30s, 10m, 2h, 7d)"))?;
    let unit_ms = match unit {
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!(
                "{text:?}: the unit must be s, m, h or d (30s, 10m, 2h, 7d)"
            ));
        }
    };
    n.checked_mul(unit_ms)
        .ok_or_else(|| format!("{text:?}: too long"))
}

/// `tern audit [--since D] [--host H] [--json]`: every agent's trail (or
/// one host's), merged oldest first. Exits 0 when every agent asked
/// answered; an agent that could not be reached is named and the command
/// exits 69 after printing what the others said.
pub async fn audit(access: &Access, args: AuditArgs) -> CliResult {
    let cluster = Cluster::load(access)?;
    if let Some(host) = &args.host {
        cluster.check_host(host)?;
    }
    let since_ms = args
        .since_ms
        .map(|d| crate::agent::now_ms().saturating_sub(d))
        .unwrap_or(0);
    let links = cluster.connect_all().await;
    let asked: Vec<_> = reachable(&links)
        .filter(|a| args.host.as_ref().is_none_or(|h| *h == a.name))
        .collect();
    let answers = join_all(asked.iter().map(|agent| async move {
        let request = proto::ListAuditRequest {
            since_ms,
            limit: 0,
            target: String::new(),
        };
        agent
            .call(|mut c| async move { c.list_audit(request).await })
            .await
    }))
    .await;
    let mut entries = Vec::new();
    let mut failure: Option<CliError> = links
        .iter()
        .filter(|l| args.host.as_ref().is_none_or(|h| *h == l.entry.name))
        .find_map(|l| l.agent.as_ref().err().cloned());
    for answer in answers {
        match answer {
            Ok(reply) => entries.extend(reply.entries.iter().map(AuditJson::from)),
            Err(e) => {
                failure.get_or_insert(e);
            }
        }
    }
    entries.sort_by(|a, b| (a.at_ms, &a.host).cmp(&(b.at_ms, &b.host)));
    for entry in &entries {
        if args.json {
            println!(
                "{}",
                serde_json::to_string(entry).expect("plain fields serialize")
            );
        } else {
            println!("{}  {}", format_time(entry.at_ms), entry.line());
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(exit::SUCCEEDED),
    }
}

/// `2026-12-05 08:12:03` (UTC) for a time in milliseconds since the epoch.
fn format_time(at_ms: u64) -> String {
    let at = utc(at_ms);
    format!(
        "{:04}-{:02}-{:02} {}",
        at.year(),
        u8::from(at.month()),
        at.day(),
        clock(at_ms)
    )
}

/// `08:12:03` (UTC), the time of day of a time in milliseconds since the epoch.
pub fn clock(at_ms: u64) -> String {
    let at = utc(at_ms);
    format!("{:02}:{:02}:{:02}", at.hour(), at.minute(), at.second())
}

fn utc(at_ms: u64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp((at_ms / 1000) as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_a_number_and_a_unit() {
        assert_eq!(parse_duration("30s"), Ok(30_000));
        assert_eq!(parse_duration("10m"), Ok(600_000));
        assert_eq!(parse_duration("2h"), Ok(7_200_000));
        assert_eq!(parse_duration("7d"), Ok(604_800_000));
        assert!(parse_duration("10").unwrap_err().contains("unit"));
        assert!(parse_duration("m").unwrap_err().contains("a number"));
        assert!(parse_duration("5w").unwrap_err().contains("unit"));
        assert!(
            parse_duration("99999999999999999d")
                .unwrap_err()
                .contains("too long")
        );
    }

    #[test]
    fn a_refusal_reads_as_one() {
        let mut entry = AuditJson {
            at_ms: 0,
            host: "hv-a".into(),
            who: "ana".into(),
            role: "viewer".into(),
            action: "migrate".into(),
            target: "web-01 to hv-b".into(),
            ok: false,
            result: "PermissionDenied: ana is a viewer: this needs the operator role".into(),
        };
        assert_eq!(
            entry.line(),
            "ana (viewer) migrate web-01 to hv-b on hv-a: REFUSED: PermissionDenied: ana is a viewer: this needs the operator role"
        );
        entry.ok = true;
        assert!(!entry.line().contains("REFUSED"));
        assert_eq!(format_time(86_400_000 + 3_723_000), "1970-01-02 01:02:03");
    }
}
