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
    let now = (now_ms() / 1000) as i64;
    match tls.not_after() {
        Err(e) => HostCheck::error(
            "certificate",
            e,
            "issue a new identity with `tern ca issue`",
        ),
        Ok(end) if end <= now => HostCheck::error(
            "certificate",
            format!(
                "{} expired {} day(s) ago",
                tls.identity,
                (now - end) / 86_400
            ),
            "issue a new identity with `tern ca issue` and restart the agent",
        ),
        Ok(end) if end - now < EXPIRY_WARNING_DAYS * 86_400 => HostCheck::warning(
            "certificate",
            format!(
                "{} expires in {} day(s)",
                tls.identity,
                (end - now) / 86_400
            ),
            "issue a new identity with `tern ca issue` before then",
        ),
        Ok(end) => HostCheck::ok(
            "certificate",
            format!(
                "{} valid for {} more days",
                tls.identity,
                (end - now) / 86_400
            ),
        ),
    }
}
