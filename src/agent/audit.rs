//! The audit trail: every changing request an agent was asked, who asked
//! (the certificate's name and role), on what, when, and what came of it,
//! refusals included. SQLite in `state_dir/audit.db`, apart from the
//! journal so that a busy trail never holds up a migration's durable
//! writes. Entries beyond the agent's `retain_audit` or older than its
//! `retain_days` are pruned (at start and every [`PRUNE_EVERY`] writes),
//! and the WAL checkpointed after.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, params};

use crate::proto;

/// What the trail keeps.
#[derive(Debug, Clone, Copy)]
pub struct Keep {
    /// The newest this many entries...
    pub entries: u64,
    /// ...none older than this.
    pub max_age_ms: u64,
}

/// Writes between two prunes.
pub const PRUNE_EVERY: u64 = 1000;
/// How many entries a list returns when the caller sets no limit.
pub const DEFAULT_LIMIT: u32 = 1000;

pub struct AuditLog {
    db: Mutex<Connection>,
    keep: Keep,
    /// Entries written since the last prune.
    since_prune: Mutex<u64>,
}

impl AuditLog {
    pub fn open(state_dir: &Path, keep: Keep, now_ms: u64) -> Result<AuditLog, rusqlite::Error> {
        let db = Connection::open(state_dir.join("audit.db"))?;
        super::make_private(&state_dir.join("audit.db"));
        db.busy_timeout(std::time::Duration::from_secs(2))?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "NORMAL")?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS audit (
                at_ms INTEGER NOT NULL,
                who TEXT NOT NULL,
                role TEXT NOT NULL,
                action TEXT NOT NULL,
                target TEXT NOT NULL,
                ok INTEGER NOT NULL,
                result TEXT NOT NULL
            );
            CREATE INDEX IF NOT EXISTS audit_at ON audit(at_ms);
            CREATE INDEX IF NOT EXISTS audit_target ON audit(target);",
        )?;
        prune(&db, keep, now_ms)?;
        Ok(AuditLog {
            db: Mutex::new(db),
            keep,
            since_prune: Mutex::new(0),
        })
    }

    /// Write one entry. A trail that cannot be written is logged, not
    /// fatal: the request it describes has already been answered.
    pub fn record(&self, entry: &proto::AuditEntry) {
        let db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        let written = db.execute(
            "INSERT INTO audit (at_ms, who, role, action, target, ok, result) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                entry.at_ms as i64,
                entry.who,
                entry.role,
                entry.action,
                entry.target,
                entry.ok,
                entry.result
            ],
        );
        if let Err(e) = written {
            tracing::error!(
                "audit trail: cannot write {} {}: {e}",
                entry.action,
                entry.target
            );
            return;
        }
        let mut since = self.since_prune.lock().unwrap_or_else(|p| p.into_inner());
        *since += 1;
        if *since >= PRUNE_EVERY {
            *since = 0;
            if let Err(e) = prune(&db, self.keep, entry.at_ms) {
                tracing::error!("audit trail: cannot prune: {e}");
            }
        }
    }

    /// The newest `limit` entries at or after `since_ms` (about `target`
    /// if it is not empty), oldest first.
    pub fn list(
        &self,
        host: &str,
        since_ms: u64,
        limit: u32,
        target: &str,
    ) -> Result<Vec<proto::AuditEntry>, rusqlite::Error> {
        let limit = if limit == 0 { DEFAULT_LIMIT } else { limit };
        let db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        let mut stmt = db.prepare(
            "SELECT at_ms, who, role, action, target, ok, result FROM audit
             WHERE at_ms >= ?1 AND (?2 = '' OR target = ?2)
             ORDER BY rowid DESC LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![since_ms as i64, target, limit], |row| {
            Ok(proto::AuditEntry {
                at_ms: row.get::<_, i64>(0)? as u64,
                host: host.to_string(),
                who: row.get(1)?,
                role: row.get(2)?,
                action: row.get(3)?,
                target: row.get(4)?,
                ok: row.get(5)?,
                result: row.get(6)?,
            })
        })?;
        let mut entries = rows.collect::<Result<Vec<_>, _>>()?;
        entries.reverse();
        Ok(entries)
    }
}

/// Keep the newest `keep.entries` entries, none older than
/// `keep.max_age_ms`; give the space back to the file system.
fn prune(db: &Connection, keep: Keep, now_ms: u64) -> Result<(), rusqlite::Error> {
    let oldest = now_ms.saturating_sub(keep.max_age_ms) as i64;
    let dropped = db.execute(
        "DELETE FROM audit WHERE rowid <= (SELECT MAX(rowid) FROM audit) - ?1 OR at_ms < ?2",
        params![keep.entries as i64, oldest],
    )?;
    if dropped > 0 {
        db.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(at_ms: u64, target: &str, ok: bool) -> proto::AuditEntry {
        proto::AuditEntry {
            at_ms,
            host: String::new(),
            who: "ana".into(),
            role: "operator".into(),
            action: "abort".into(),
            target: target.into(),
            ok,
            result: if ok {
                "aborted".into()
            } else {
                "refused".into()
            },
        }
    }

    #[test]
    fn entries_come_back_oldest_first_filtered_and_limited() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), KEEP_ALL, 0).unwrap();
        for (at, target) in [(10, "m-1"), (20, "m-2"), (30, "m-1"), (40, "m-3")] {
            log.record(&entry(at, target, at != 30));
        }
        let all = log.list("hv-a", 0, 0, "").unwrap();
        assert_eq!(
            all.iter().map(|e| e.at_ms).collect::<Vec<_>>(),
            [10, 20, 30, 40]
        );
        assert!(all.iter().all(|e| e.host == "hv-a"));
        assert!(!all[2].ok);
        let since = log.list("hv-a", 20, 0, "").unwrap();
        assert_eq!(since.len(), 3);
        let newest = log.list("hv-a", 0, 2, "").unwrap();
        assert_eq!(newest.iter().map(|e| e.at_ms).collect::<Vec<_>>(), [30, 40]);
        let about = log.list("hv-a", 0, 0, "m-1").unwrap();
        assert_eq!(about.iter().map(|e| e.at_ms).collect::<Vec<_>>(), [10, 30]);
    }

    const KEEP_ALL: Keep = Keep {
        entries: u64::MAX >> 1,
        max_age_ms: u64::MAX,
    };

    #[test]
    fn pruning_keeps_the_newest_entries_and_none_too_old() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), KEEP_ALL, 0).unwrap();
        for at in 0..50 {
            log.record(&entry(at, "m", true));
        }
        let by_count = Keep {
            entries: 5,
            max_age_ms: u64::MAX,
        };
        prune(&log.db.lock().unwrap(), by_count, 49).unwrap();
        let kept = log.list("hv-a", 0, 100, "").unwrap();
        assert_eq!(
            kept.iter().map(|e| e.at_ms).collect::<Vec<_>>(),
            [45, 46, 47, 48, 49]
        );
        // Reopened a while later: the entries past their age are gone.
        drop(log);
        let by_age = Keep {
            entries: 1000,
            max_age_ms: 100,
        };
        let log = AuditLog::open(dir.path(), by_age, 148).unwrap();
        let kept = log.list("hv-a", 0, 100, "").unwrap();
        assert_eq!(kept.iter().map(|e| e.at_ms).collect::<Vec<_>>(), [48, 49]);
    }
}
