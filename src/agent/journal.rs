//! The write-ahead journal: every attempt's state is written here before the
//! agent acts on it, so a restarted agent can recover each open attempt by the
//! recovery table. SQLite in `state_dir/journal.db`, WAL mode: a write is
//! durable against a crash of the agent process once `put_*` returns.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use super::evacuation::job::Evacuation;
use crate::protocol::destination::DestinationAttempt;
use crate::protocol::source::SourceAttempt;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("journal: corrupt {what} record {id}: {source}")]
    Corrupt {
        what: &'static str,
        id: String,
        source: serde_json::Error,
    },
}

/// A failed rollback or release whose feature state is still on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub attempt_id: String,
    pub migration_id: String,
    pub vm: String,
    pub feature: String,
    pub stage: String,
    pub error: String,
    pub tries: u32,
    pub next_try_ms: u64,
}

pub struct Journal {
    db: Connection,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS attempt (
    id TEXT PRIMARY KEY,
    side TEXT NOT NULL,
    migration_id TEXT NOT NULL,
    open INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS attempt_open ON attempt(open);
CREATE TABLE IF NOT EXISTS pending (
    attempt_id TEXT NOT NULL,
    feature TEXT NOT NULL,
    stage TEXT NOT NULL,
    migration_id TEXT NOT NULL,
    vm TEXT NOT NULL,
    error TEXT NOT NULL,
    tries INTEGER NOT NULL,
    next_try_ms INTEGER NOT NULL,
    PRIMARY KEY (attempt_id, feature, stage)
);
CREATE TABLE IF NOT EXISTS evacuation (
    id TEXT PRIMARY KEY,
    open INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS flag (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
";

/// How long a write waits for a lock held by another process.
pub const JOURNAL_BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

impl Journal {
    pub fn open(state_dir: &Path) -> Result<Journal, JournalError> {
        let db = Connection::open(state_dir.join("journal.db"))?;
        // Another process reading the journal (a backup, an operator's
        // sqlite3) may hold a lock for a moment; a write that still fails
        // after this stops the agent (Agent::journal_failed).
        db.busy_timeout(JOURNAL_BUSY_TIMEOUT)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        // NORMAL in WAL mode survives a crash of the process (not of the OS),
        // which is the failure the recovery table is about.
        db.pragma_update(None, "synchronous", "NORMAL")?;
        db.execute_batch(SCHEMA)?;
        Ok(Journal { db })
    }

    pub fn put_source(&self, attempt: &SourceAttempt) -> Result<(), JournalError> {
        let body = serde_json::to_string(attempt).expect("attempts serialize");
        self.db.execute(
            "INSERT INTO attempt (id, side, migration_id, open, body) VALUES (?1, 'source', ?2, ?3, ?4)
             ON CONFLICT(id) DO UPDATE SET open = excluded.open, body = excluded.body",
            params![attempt.attempt_id, attempt.migration_id, !attempt.is_done(), body],
        )?;
        Ok(())
    }

    pub fn put_destination(&self, attempt: &DestinationAttempt) -> Result<(), JournalError> {
        let body = serde_json::to_string(attempt).expect("attempts serialize");
        self.db.execute(
            "INSERT INTO attempt (id, side, migration_id, open, body) VALUES (?1, 'destination', ?2, ?3, ?4)
             ON CONFLICT(id) DO UPDATE SET open = excluded.open, body = excluded.body",
            params![attempt.attempt_id, attempt.migration_id, !attempt.is_finished(), body],
        )?;
        Ok(())
    }

    /// Every source attempt, oldest first (for migration records and recovery).
    pub fn source_attempts(&self) -> Result<Vec<SourceAttempt>, JournalError> {
        self.load(
            "source",
            "SELECT id, body FROM attempt WHERE side = 'source' ORDER BY rowid",
        )
    }

    pub fn open_destination_attempts(&self) -> Result<Vec<DestinationAttempt>, JournalError> {
        self.load(
            "destination",
            "SELECT id, body FROM attempt WHERE side = 'destination' AND open = 1 ORDER BY rowid",
        )
    }

    pub fn source_attempt(&self, id: &str) -> Result<Option<SourceAttempt>, JournalError> {
        let body: Option<String> = self
            .db
            .query_row(
                "SELECT body FROM attempt WHERE id = ?1 AND side = 'source'",
                [id],
                |r| r.get(0),
            )
            .optional()?;
        body.map(|b| {
            serde_json::from_str(&b).map_err(|source| JournalError::Corrupt {
                what: "source",
                id: id.into(),
                source,
            })
        })
        .transpose()
    }

    pub fn destination_attempt(
        &self,
        id: &str,
    ) -> Result<Option<DestinationAttempt>, JournalError> {
        let body: Option<String> = self
            .db
            .query_row(
                "SELECT body FROM attempt WHERE id = ?1 AND side = 'destination'",
                [id],
                |r| r.get(0),
            )
            .optional()?;
        body.map(|b| {
            serde_json::from_str(&b).map_err(|source| JournalError::Corrupt {
                what: "destination",
                id: id.into(),
                source,
            })
        })
        .transpose()
    }

    fn load<T: serde::de::DeserializeOwned>(
        &self,
        what: &'static str,
        sql: &str,
    ) -> Result<Vec<T>, JournalError> {
        let mut stmt = self.db.prepare(sql)?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, body) = row?;
            out.push(
                serde_json::from_str(&body).map_err(|source| JournalError::Corrupt {
                    what,
                    id,
                    source,
                })?,
            );
        }
        Ok(out)
    }

    /// Record (or refresh) a pending rollback; a repeated failure keeps its tries.
    pub fn put_pending(&self, p: &Pending) -> Result<(), JournalError> {
        self.db.execute(
            "INSERT INTO pending (attempt_id, feature, stage, migration_id, vm, error, tries, next_try_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT(attempt_id, feature, stage) DO UPDATE SET error = excluded.error,
                 tries = excluded.tries, next_try_ms = excluded.next_try_ms",
            params![p.attempt_id, p.feature, p.stage, p.migration_id, p.vm, p.error, p.tries, p.next_try_ms],
        )?;
        Ok(())
    }

    pub fn remove_pending(
        &self,
        attempt_id: &str,
        feature: &str,
        stage: &str,
    ) -> Result<(), JournalError> {
        self.db.execute(
            "DELETE FROM pending WHERE attempt_id = ?1 AND feature = ?2 AND stage = ?3",
            params![attempt_id, feature, stage],
        )?;
        Ok(())
    }

    pub fn pending(&self) -> Result<Vec<Pending>, JournalError> {
        let mut stmt = self.db.prepare(
            "SELECT attempt_id, migration_id, vm, feature, stage, error, tries, next_try_ms FROM pending ORDER BY rowid",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(Pending {
                attempt_id: r.get(0)?,
                migration_id: r.get(1)?,
                vm: r.get(2)?,
                feature: r.get(3)?,
                stage: r.get(4)?,
                error: r.get(5)?,
                tries: r.get(6)?,
                next_try_ms: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn put_evacuation(&self, job: &Evacuation) -> Result<(), JournalError> {
        let body = serde_json::to_string(job).expect("evacuations serialize");
        self.db.execute(
            "INSERT INTO evacuation (id, open, body) VALUES (?1, ?2, ?3)
             ON CONFLICT(id) DO UPDATE SET open = excluded.open, body = excluded.body",
            params![job.id, !job.state.is_over(), body],
        )?;
        Ok(())
    }

    /// Every evacuation of this host, oldest first.
    pub fn evacuations(&self) -> Result<Vec<Evacuation>, JournalError> {
        self.load(
            "evacuation",
            "SELECT id, body FROM evacuation ORDER BY rowid",
        )
    }

    pub fn set_draining(&self, draining: bool) -> Result<(), JournalError> {
        self.db.execute(
            "INSERT INTO flag (name, value) VALUES ('draining', ?1)
             ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            params![draining],
        )?;
        Ok(())
    }

    pub fn draining(&self) -> Result<bool, JournalError> {
        Ok(self
            .db
            .query_row("SELECT value FROM flag WHERE name = 'draining'", [], |r| {
                r.get::<_, bool>(0)
            })
            .optional()?
            .unwrap_or(false))
    }
}
