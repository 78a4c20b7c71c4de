//! `tern doctor` on this host: what it needs to take part in migrations,
//! checked now — its hypervisor (QEMU, KVM, userfaultfd), the disk under
//! `state_dir`, the journal's integrity, its certificate's validity, work
//! left pending. The caller adds what only it can see: whether the host
//! answers at all, and its clock against the others'.

use std::path::Path;
use std::sync::Arc;

use super::{Agent, now_ms};
use crate::hypervisor::HostCheck;

/// Free space under `state_dir` below which journal writes are at risk.
const LOW_DISK_BYTES: u64 = 1 << 30;
/// A certificate expiring sooner than this is a warning.
const EXPIRY_WARNING_DAYS: i64 = 30;

/// Every check, in a stable order.
pub async fn examine(agent: &Arc<Agent>) -> Vec<HostCheck> {
    let hypervisor = agent.hypervisor.clone();
    let state_dir = agent
        .log
        .dir()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let blocking = tokio::task::spawn_blocking(move || {
        let mut checks = hypervisor.doctor();
        checks.push(disk(&state_dir));
        checks.push(journal(&state_dir.join("journal.db")));
        checks
    })
    .await
    .unwrap_or_else(|e| vec![HostCheck::error("checks", format!("{e}"), "")]);
    let mut checks = blocking;
    checks.push(certificate(agent));
    checks.push(peers(agent).await);
    let pending = agent.query(|core| core.pending().count()).await;
    checks.push(match pending {
        Some(0) => HostCheck::ok("pending", "no rollback, release or kill waits for a retry"),
        Some(n) => HostCheck::warning(
            "pending",
            format!("{n} rollback(s), release(s) or kill(s) failed here and wait for a retry"),
            "`tern status` names them; `tern rollback MIGRATION` re-runs them once the cause is fixed",
        ),
        None => HostCheck::error("pending", "the agent's core does not answer", "restart the agent"),
    });
    checks
}

/// How long each peer has to answer this host.
const PEER_DEADLINE: std::time::Duration = std::time::Duration::from_secs(2);

/// The other hosts of the inventory, reached from this one (the caller
/// reached this one: together, both ways).
async fn peers(agent: &Arc<Agent>) -> HostCheck {
    let others: Vec<String> = agent
        .hosts
        .iter()
        .filter(|h| **h != agent.name)
        .cloned()
        .collect();
    if others.is_empty() {
        return HostCheck::ok("peers", "the inventory names no other host");
    }
    let answers = futures::future::join_all(others.iter().map(|host| async move {
        let call = crate::host::PeerCall::Capacity(crate::proto::CapacityRequest {});
        (
            host,
            agent.peers.call(host, call, Some(PEER_DEADLINE)).await,
        )
    }))
    .await;
    let failed: Vec<String> = answers
        .iter()
        .filter_map(|(host, answer)| {
            answer
                .as_ref()
                .err()
                .map(|e| format!("{host}: {}", e.message()))
        })
        .collect();
    if failed.is_empty() {
        HostCheck::ok("peers", format!("reaches {}", others.join(", ")))
    } else {
        HostCheck::error(
            "peers",
            format!("cannot reach {}", failed.join("; ")),
            "check that agent, the inventory's address of it, the network and the firewall between the hosts",
        )
    }
}

/// How long the other host has to open its sink.
const SINK_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// A sink on this host's migration address for another host's measurement.
pub async fn open_sink(agent: &Agent) -> Result<super::link::Sink, String> {
    super::link::open_sink(&agent.migration_address)
        .await
        .map_err(|e| format!("{} on {}", e, agent.name))
}

/// Send to `to`'s migration address for `duration`, and hold what
/// arrived to this host's bandwidth cap (`[hypervisor] bandwidth_mib_s`).
pub async fn measure_link(
    agent: &Agent,
    to: &str,
    duration: std::time::Duration,
) -> (HostCheck, Option<super::link::Measured>) {
    let name = format!("link to {to}");
    let host = agent.link_hosts.get(to).cloned().unwrap_or_default();
    let sink = match agent.peers.link_sink(to, SINK_DEADLINE).await {
        Ok(reply) => reply,
        Err(e) => {
            return (
                HostCheck::error(
                    &name,
                    format!("{to} opened no sink to measure with: {}", e.message()),
                    "check that agent with `tern doctor` on it alone",
                ),
                None,
            );
        }
    };
    let Ok(token) = <[u8; super::link::TOKEN_BYTES]>::try_from(sink.token.as_slice()) else {
        return (
            HostCheck::error(&name, format!("{to} answered a malformed token"), ""),
            None,
        );
    };
    let sink = super::link::Sink {
        port: u16::try_from(sink.port).unwrap_or_default(),
        token,
    };
    match super::link::send(&host, &sink, duration).await {
        Ok(measured) => (
            link_verdict(&name, to, &measured, agent.bandwidth_mib_s),
            Some(measured),
        ),
        Err(e) => (
            HostCheck::error(
                &name,
                format!("{e} ({to}'s migration address in the inventory)"),
                format!(
                    "let TCP through from {} to {host} on any port (incoming migrations listen on a \
                     free one), or correct {to}'s migration_address in the inventory",
                    agent.name
                ),
            ),
            None,
        ),
    }
}

/// A link slower than the cap makes migrations slower than their
/// estimates; one faster leaves room the cap may give.
fn link_verdict(
    name: &str,
    to: &str,
    measured: &super::link::Measured,
    cap_mib_s: u64,
) -> HostCheck {
    let rate = measured.mib_s();
    let said = format!(
        "{rate:.0} MiB/s ({} MiB in {:.1} s to {})",
        measured.bytes >> 20,
        measured.elapsed.as_secs_f64(),
        measured.address
    );
    if rate < cap_mib_s as f64 {
        HostCheck::warning(
            name,
            format!(
                "{said}, less than bandwidth_mib_s = {cap_mib_s}: moves to {to} take longer, and stop their guests longer, than planned"
            ),
            format!(
                "set [hypervisor] bandwidth_mib_s = {} (80% of the measured link, leaving room for other traffic)",
                (rate * 0.8).floor().max(1.0)
            ),
        )
    } else {
        HostCheck::ok(
            name,
            format!(
                "{said}; bandwidth_mib_s = {cap_mib_s} uses {:.0}% of it",
                cap_mib_s as f64 * 100.0 / rate
            ),
        )
    }
}

fn disk(state_dir: &Path) -> HostCheck {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(state_dir.as_os_str().as_bytes()) else {
        return HostCheck::error("disk", "state_dir is not a path", "");
    };
    // SAFETY: a zeroed statvfs is a valid out-parameter; `path` is a C string.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut stats) } != 0 {
        let e = std::io::Error::last_os_error();
        return HostCheck::error(
            "disk",
            format!(
                "cannot read the file system of {}: {e}",
                state_dir.display()
            ),
            "",
        );
    }
    let free = stats.f_bavail as u64 * stats.f_frsize as u64;
    let total = stats.f_blocks as u64 * stats.f_frsize as u64;
    let gib = |b: u64| format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64);
    let what = format!(
        "{} free of {} under {}",
        gib(free),
        gib(total),
        state_dir.display()
    );
    if free < LOW_DISK_BYTES {
        HostCheck::error(
            "disk",
            what,
            "free space there: a journal write that fails stops the agent",
        )
    } else if total > 0 && free * 10 < total {
        HostCheck::warning("disk", what, "less than a tenth is free: make room")
    } else {
        HostCheck::ok("disk", what)
    }
}

fn journal(db: &Path) -> HostCheck {
    let opened = rusqlite::Connection::open_with_flags(
        db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    );
    let verdict =
        opened.and_then(|c| c.query_row("PRAGMA quick_check", [], |row| row.get::<_, String>(0)));
    match verdict {
        Ok(v) if v == "ok" => HostCheck::ok("journal", format!("{}: quick_check ok", db.display())),
        Ok(v) => HostCheck::error(
            "journal",
            format!("{}: quick_check says {v}", db.display()),
            "stop the agent and restore the journal from a backup; do not delete it (it knows where guests run)",
        ),
        Err(e) => HostCheck::error(
            "journal",
            format!("cannot read {}: {e}", db.display()),
            "check state_dir's permissions and disk",
        ),
    }
}

fn certificate(agent: &Agent) -> HostCheck {
    let Some(tls) = &agent.tls else {
        return if agent.insecure {
            HostCheck::warning(
                "certificate",
                "no [tls]: plaintext on a network address",
                "issue this host an identity with `tern ca issue` and set [tls]",
            )
        } else {
            HostCheck::ok("certificate", "no [tls]: plaintext on loopback")
        };
    };
    match tls.not_after() {
        Err(e) => HostCheck::error(
            "certificate",
            e,
            "issue a new identity with `tern ca issue`",
        ),
        Ok(end) => validity(&tls.identity.to_string(), end, (now_ms() / 1000) as i64),
    }
}

/// The verdict on a certificate of `identity` valid until `end`, at `now`
/// (seconds since the epoch).
fn validity(identity: &str, end: i64, now: i64) -> HostCheck {
    if end <= now {
        HostCheck::error(
            "certificate",
            format!("{identity} expired {} day(s) ago", (now - end) / 86_400),
            "issue a new identity with `tern ca issue` and restart the agent",
        )
    } else if end - now < EXPIRY_WARNING_DAYS * 86_400 {
        HostCheck::warning(
            "certificate",
            format!("{identity} expires in {} day(s)", (end - now) / 86_400),
            "issue a new identity with `tern ca issue` before then",
        )
    } else {
        HostCheck::ok(
            "certificate",
            format!("{identity} valid for {} more days", (end - now) / 86_400),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::Verdict;

    const DAY: i64 = 86_400;

    fn measured(mib: u64, seconds: u64) -> crate::agent::link::Measured {
        crate::agent::link::Measured {
            address: "10.0.0.2:40000".into(),
            bytes: mib << 20,
            elapsed: std::time::Duration::from_secs(seconds),
        }
    }

    #[test]
    fn a_link_slower_than_the_cap_is_a_warning_with_the_cap_to_set() {
        let slow = link_verdict("link to hv-b", "hv-b", &measured(1000, 2), 1024);
        assert_eq!(slow.verdict, Verdict::Warning, "{slow:?}");
        assert!(
            slow.detail.starts_with(
                "500 MiB/s (1000 MiB in 2.0 s to 10.0.0.2:40000), less than bandwidth_mib_s = 1024"
            ),
            "{}",
            slow.detail
        );
        assert!(slow.fix.contains("bandwidth_mib_s = 400 "), "{}", slow.fix);
        let fine = link_verdict("link to hv-b", "hv-b", &measured(4096, 2), 1024);
        assert_eq!(fine.verdict, Verdict::Ok, "{fine:?}");
        assert!(
            fine.detail
                .ends_with("bandwidth_mib_s = 1024 uses 50% of it"),
            "{}",
            fine.detail
        );
    }

    #[test]
    fn an_expired_certificate_is_an_error_one_expiring_within_30_days_a_warning() {
        let now = 1_800_000_000;
        let expired = validity("hv-a (agent)", now - 3 * DAY, now);
        assert_eq!(expired.verdict, Verdict::Error);
        assert_eq!(expired.detail, "hv-a (agent) expired 3 day(s) ago");
        assert!(expired.fix.contains("tern ca issue"), "{expired:?}");
        assert_eq!(validity("hv-a (agent)", now, now).verdict, Verdict::Error);
        let soon = validity("hv-a (agent)", now + 10 * DAY + 5, now);
        assert_eq!(soon.verdict, Verdict::Warning);
        assert_eq!(soon.detail, "hv-a (agent) expires in 10 day(s)");
        let fine = validity("hv-a (agent)", now + 400 * DAY, now);
        assert_eq!((fine.verdict, fine.fix.as_str()), (Verdict::Ok, ""));
        assert_eq!(fine.detail, "hv-a (agent) valid for 400 more days");
    }

    #[test]
    fn a_journal_that_is_not_sqlite_is_an_error_and_a_healthy_one_ok() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("journal.db");
        std::fs::write(&db, b"not a database, but some bytes of a journal").unwrap();
        let broken = journal(&db);
        assert_eq!(broken.verdict, Verdict::Error, "{broken:?}");
        std::fs::remove_file(&db).unwrap();
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            .unwrap();
        drop(c);
        let healthy = journal(&db);
        assert_eq!(healthy.verdict, Verdict::Ok, "{healthy:?}");
        assert!(healthy.detail.ends_with("quick_check ok"), "{healthy:?}");
        let missing = journal(&dir.path().join("none.db"));
        assert_eq!(missing.verdict, Verdict::Error, "{missing:?}");
    }
}
