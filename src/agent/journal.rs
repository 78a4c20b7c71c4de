//! The write-ahead journal: the host core's [`Entry`]s, written before the
//! agent acts on them, so a restarted agent recovers every open attempt by
//! the recovery table. SQLite in `state_dir/journal.db`, WAL mode.
//!
//! A write survives a crash of the agent process once [`Journal::write`]
//! returns. A `durable` write also survives a power loss of the host: it is
//! committed with `synchronous=FULL`, which syncs the WAL, and with it every
//! write before it. The core marks durable exactly the decisions another
//! host acts on, so most writes skip the sync.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use crate::host::{Entry, Evacuation, JournalImage, Pending, Pruned, Retention, Work};
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

pub struct Journal {
    db: Connection,
    /// Whether the connection is in `synchronous=FULL` now.
    full: bool,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS attempt (
    id TEXT NOT NULL,
    side TEXT NOT NULL,
    migration_id TEXT NOT NULL,
    open INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (id, side)
);
CREATE INDEX IF NOT EXISTS attempt_open ON attempt(open);
CREATE INDEX IF NOT EXISTS attempt_migration ON attempt(migration_id);
CREATE TABLE IF NOT EXISTS pending (
    attempt_id TEXT NOT NULL,
    feature TEXT NOT NULL,
    stage TEXT NOT NULL,
    migration_id TEXT NOT NULL,
    vm TEXT NOT NULL,
    error TEXT NOT NULL,
    tries INTEGER NOT NULL,
    next_try_ms INTEGER NOT NULL,
    since_ms INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (attempt_id, feature, stage)
);
CREATE TABLE IF NOT EXISTS tombstone (
    attempt_id TEXT PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS committed (
    attempt_id TEXT PRIMARY KEY
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

/// A journal table the host core does not hold in memory, whose closed rows
/// retention prunes by [`crate::host::retention::beyond`], the rule the core
/// applies to its own records.
#[derive(Debug, Clone, Copy)]
pub struct Retained {
    pub table: &'static str,
    /// The column holding when a row closed, in unix milliseconds.
    pub closed_at: &'static str,
    /// Which rows are closed (an SQL condition); `1` for all.
    pub closed: &'static str,
}

/// The journal's own tables under retention (an audit table goes here).
pub const RETAINED: &[Retained] = &[];

/// Apply `retention` at `now` to the closed rows of `table`.
pub fn retain(
    db: &Connection,
    table: &Retained,
    retention: Retention,
    now: u64,
) -> Result<usize, JournalError> {
    let mut stmt = db.prepare(&format!(
        "SELECT {at}, rowid FROM {t} WHERE {closed}",
        at = table.closed_at,
        t = table.table,
        closed = table.closed
    ))?;
    let closed = stmt
        .query_map([], |r| {
            Ok((r.get::<_, i64>(0)?.max(0) as u64, r.get::<_, i64>(1)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let doomed = crate::host::retention::beyond(retention, now, closed);
    let mut delete = db.prepare(&format!("DELETE FROM {} WHERE rowid = ?1", table.table))?;
    for rowid in &doomed {
        delete.execute([rowid])?;
    }
    Ok(doomed.len())
}

/// How long a write waits for a lock held by another process.
pub const JOURNAL_BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

impl Journal {
    pub fn open(state_dir: &Path) -> Result<Journal, JournalError> {
        let db = Connection::open(state_dir.join("journal.db"))?;
        super::make_private(&state_dir.join("journal.db"));
        // Another process reading the journal (a backup, an operator's
        // sqlite3) may hold a lock for a moment; a write that still fails
        // after this stops the agent (the shell's journal_failed).
        db.busy_timeout(JOURNAL_BUSY_TIMEOUT)?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "NORMAL")?;
        migrate_attempt_key(&db)?;
        db.execute_batch(SCHEMA)?;
        add_pending_since(&db)?;
        Ok(Journal { db, full: false })
    }

    /// Carry out one journal write of the host core.
    pub fn write(&mut self, entry: &Entry, durable: bool) -> Result<(), JournalError> {
        if durable != self.full {
            let mode = if durable { "FULL" } else { "NORMAL" };
            self.db.pragma_update(None, "synchronous", mode)?;
            self.full = durable;
        }
        match entry {
            Entry::Source(a) => self.put_source(a),
            Entry::Destination(a) => self.put_destination(a),
            Entry::Pending(p) => self.put_pending(p),
            Entry::PendingDone {
                attempt_id,
                feature,
                work,
            } => {
                self.db.execute(
                    "DELETE FROM pending WHERE attempt_id = ?1 AND feature = ?2 AND stage = ?3",
                    params![attempt_id, feature, work],
                )?;
                Ok(())
            }
            Entry::Tombstone(id) => {
                self.db.execute(
                    "INSERT OR IGNORE INTO tombstone (attempt_id) VALUES (?1)",
                    [id],
                )?;
                Ok(())
            }
            Entry::Evacuation(job) => self.put_evacuation(job),
            Entry::Draining(d) => self.set_flag("draining", *d),
            Entry::Prune(p) => self.prune(p),
        }
    }

    /// Forget what retention forgot, in one transaction: a received
    /// attempt's row becomes a tombstone or a commit marker at the same
    /// instant. Then the journal's own tables ([`RETAINED`]) get the same
    /// rule, and the WAL is checkpointed and truncated, so the file shrinks
    /// back instead of holding the deleted rows' pages.
    fn prune(&mut self, p: &Pruned) -> Result<(), JournalError> {
        let tx = self.db.transaction()?;
        for id in &p.migrations {
            tx.execute(
                "DELETE FROM attempt WHERE side = 'source' AND migration_id = ?1",
                [id],
            )?;
        }
        for (ids, marker) in [(&p.rolled_back, "tombstone"), (&p.committed, "committed")] {
            for id in ids {
                tx.execute(
                    "DELETE FROM attempt WHERE side = 'destination' AND id = ?1",
                    [id],
                )?;
                tx.execute(
                    &format!("INSERT OR IGNORE INTO {marker} (attempt_id) VALUES (?1)"),
                    [id],
                )?;
            }
        }
        for id in &p.evacuations {
            tx.execute("DELETE FROM evacuation WHERE id = ?1", [id])?;
        }
        for table in RETAINED {
            retain(&tx, table, p.retention, p.now)?;
        }
        tx.commit()?;
        self.checkpoint()
    }

    /// Write the WAL into the database and truncate it to nothing.
    pub fn checkpoint(&self) -> Result<(), JournalError> {
        self.db
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        Ok(())
    }

    fn put_source(&self, attempt: &SourceAttempt) -> Result<(), JournalError> {
        let body = serde_json::to_string(attempt).expect("attempts serialize");
        self.db.execute(
            "INSERT INTO attempt (id, side, migration_id, open, body) VALUES (?1, 'source', ?2, ?3, ?4)
             ON CONFLICT(id, side) DO UPDATE SET open = excluded.open, body = excluded.body",
            params![attempt.attempt_id, attempt.migration_id, !attempt.is_done(), body],
        )?;
        Ok(())
    }

    fn put_destination(&self, attempt: &DestinationAttempt) -> Result<(), JournalError> {
        let body = serde_json::to_string(attempt).expect("attempts serialize");
        self.db.execute(
            "INSERT INTO attempt (id, side, migration_id, open, body) VALUES (?1, 'destination', ?2, ?3, ?4)
             ON CONFLICT(id, side) DO UPDATE SET open = excluded.open, body = excluded.body",
            params![attempt.attempt_id, attempt.migration_id, !attempt.is_finished(), body],
        )?;
        Ok(())
    }

    fn put_pending(&self, p: &Pending) -> Result<(), JournalError> {
        self.db.execute(
            "INSERT INTO pending (attempt_id, feature, stage, migration_id, vm, error, tries, next_try_ms, since_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
             ON CONFLICT(attempt_id, feature, stage) DO UPDATE SET error = excluded.error,
                 tries = excluded.tries, next_try_ms = excluded.next_try_ms",
            params![
                p.attempt_id,
                p.feature,
                p.work.as_str(),
                p.migration_id,
                p.vm,
                p.error,
                p.tries,
                p.next_try_ms,
                p.since_ms
            ],
        )?;
        Ok(())
    }

    fn put_evacuation(&self, job: &Evacuation) -> Result<(), JournalError> {
        let body = serde_json::to_string(job).expect("evacuations serialize");
        self.db.execute(
            "INSERT INTO evacuation (id, open, body) VALUES (?1, ?2, ?3)
             ON CONFLICT(id) DO UPDATE SET open = excluded.open, body = excluded.body",
            params![job.id, !job.state.is_over(), body],
        )?;
        Ok(())
    }

    fn set_flag(&self, name: &str, value: bool) -> Result<(), JournalError> {
        self.db.execute(
            "INSERT INTO flag (name, value) VALUES (?1, ?2)
             ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            params![name, value],
        )?;
        Ok(())
    }

    fn flag(&self, name: &str) -> Result<bool, JournalError> {
        Ok(self
            .db
            .query_row("SELECT value FROM flag WHERE name = ?1", [name], |r| {
                r.get::<_, bool>(0)
            })
            .optional()?
            .unwrap_or(false))
    }

    /// Whether this host's configured guests were booted once already: a
    /// hypervisor that lost its list of guests must not boot them again
    /// (they may have moved away since).
    pub fn booted(&self) -> Result<bool, JournalError> {
        // A journal written before the flag existed, with attempts in it,
        // belongs to a host that booted its guests long ago.
        let used: bool = self
            .db
            .query_row("SELECT EXISTS (SELECT 1 FROM attempt)", [], |r| r.get(0))?;
        Ok(used || self.flag("booted")?)
    }

    pub fn set_booted(&self) -> Result<(), JournalError> {
        self.set_flag("booted", true)
    }

    /// Everything the host core starts from. A row that cannot be read is
    /// skipped and named in `unreadable`, so one bad row does not keep the
    /// agent from starting; a journal that cannot be read at all is an error.
    pub fn load(&self) -> Result<JournalImage, JournalError> {
        let mut image = JournalImage::default();
        for (side, id, body) in self.rows("SELECT side, id, body FROM attempt ORDER BY rowid")? {
            match side.as_str() {
                "source" => match serde_json::from_str::<SourceAttempt>(&body) {
                    Ok(a) => image.sources.push(a),
                    Err(e) => image.unreadable.push(format!("source attempt {id}: {e}")),
                },
                "destination" => match serde_json::from_str::<DestinationAttempt>(&body) {
                    Ok(a) => image.destinations.push(a),
                    Err(e) => image
                        .unreadable
                        .push(format!("destination attempt {id}: {e}")),
                },
                other => image
                    .unreadable
                    .push(format!("attempt {id} of unknown side {other:?}")),
            }
        }
        for (id, _, body) in self.rows("SELECT id, '', body FROM evacuation ORDER BY rowid")? {
            match serde_json::from_str::<Evacuation>(&body) {
                Ok(job) => image.evacuations.push(job),
                Err(e) => image.unreadable.push(format!("evacuation {id}: {e}")),
            }
        }
        let (pending, unreadable) = self.pending_rows()?;
        image.pending = pending;
        image.unreadable.extend(unreadable);
        let mut stmt = self.db.prepare("SELECT rowid, attempt_id FROM tombstone")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1))))?;
        for row in rows {
            match row? {
                (_, Ok(id)) => image.tombstones.push(id),
                (rowid, Err(e)) => image.unreadable.push(format!("tombstone row {rowid}: {e}")),
            }
        }
        let mut stmt = self.db.prepare("SELECT attempt_id FROM committed")?;
        for id in stmt.query_map([], |r| r.get::<_, String>(0))? {
            image.committed.push(id?);
        }
        image.draining = match self.flag("draining") {
            Ok(d) => d,
            Err(e) => {
                image.unreadable.push(format!("the draining flag: {e}"));
                false
            }
        };
        Ok(image)
    }

    fn rows(&self, sql: &str) -> Result<Vec<(String, String, String)>, JournalError> {
        let mut stmt = self.db.prepare(sql)?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Pending work, and the rows that could not be read. A row naming
    /// work this build does not know is kept as a rollback (the oldest
    /// meaning of the table).
    fn pending_rows(&self) -> Result<(Vec<Pending>, Vec<String>), JournalError> {
        let mut stmt = self.db.prepare(
            "SELECT rowid, attempt_id, migration_id, vm, feature, stage, error, tries, next_try_ms, since_ms FROM pending ORDER BY rowid",
        )?;
        let rows = stmt.query_map([], |r| {
            let rowid: i64 = r.get(0)?;
            let read = || -> rusqlite::Result<Pending> {
                let stage: String = r.get(5)?;
                Ok(Pending {
                    attempt_id: r.get(1)?,
                    migration_id: r.get(2)?,
                    vm: r.get(3)?,
                    feature: r.get(4)?,
                    work: Work::parse(&stage)
                        .unwrap_or(Work::Stage(crate::protocol::Stage::Rollback)),
                    error: r.get(6)?,
                    tries: r.get(7)?,
                    next_try_ms: r.get(8)?,
                    since_ms: r.get(9)?,
                })
            };
            let what = r
                .get::<_, String>(1)
                .map(|attempt| format!("pending work of attempt {attempt} (row {rowid})"))
                .unwrap_or_else(|_| format!("pending row {rowid}"));
            Ok(read().map_err(|e| format!("{what}: {e}")))
        })?;
        let (mut pending, mut unreadable) = (Vec::new(), Vec::new());
        for row in rows {
            match row? {
                Ok(p) => pending.push(p),
                Err(e) => unreadable.push(e),
            }
        }
        Ok((pending, unreadable))
    }

    /// Destination attempts this host has not finished.
    pub fn open_destination_attempts(&self) -> Result<Vec<DestinationAttempt>, JournalError> {
        self.load_side(
            "destination",
            "SELECT id, body FROM attempt WHERE side = 'destination' AND open = 1 ORDER BY rowid",
        )
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

    fn load_side<T: serde::de::DeserializeOwned>(
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
}

/// Journals written before pending work kept when it was first left:
/// its rows get 0 ("before this journal said"), which the metrics read as
/// the time the agent found them.
fn add_pending_since(db: &Connection) -> Result<(), JournalError> {
    let has: bool = db
        .prepare("SELECT 1 FROM pragma_table_info('pending') WHERE name = 'since_ms'")?
        .exists([])?;
    if !has {
        db.execute_batch("ALTER TABLE pending ADD COLUMN since_ms INTEGER NOT NULL DEFAULT 0")?;
    }
    Ok(())
}

/// Journals written before the source and destination rows of an attempt
/// had a key each (`PRIMARY KEY (id)`): copy them into the new table, so a
/// Prepare reusing a finished source attempt's id cannot overwrite it.
fn migrate_attempt_key(db: &Connection) -> Result<(), JournalError> {
    let sql: Option<String> = db
        .query_row(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'attempt'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    let Some(sql) = sql else {
        return Ok(());
    };
    if sql.contains("PRIMARY KEY (id, side)") {
        return Ok(());
    }
    db.execute_batch(
        "BEGIN;
         ALTER TABLE attempt RENAME TO attempt_v1;
         DROP INDEX IF EXISTS attempt_open;
         CREATE TABLE attempt (
             id TEXT NOT NULL,
             side TEXT NOT NULL,
             migration_id TEXT NOT NULL,
             open INTEGER NOT NULL,
             body TEXT NOT NULL,
             PRIMARY KEY (id, side)
         );
         INSERT INTO attempt (id, side, migration_id, open, body)
             SELECT id, side, migration_id, open, body FROM attempt_v1 ORDER BY rowid;
         DROP TABLE attempt_v1;
         COMMIT;",
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreadable_row_is_skipped_and_named_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        journal
            .db
            .execute(
                "INSERT INTO attempt (id, side, migration_id, open, body) VALUES ('m-1.1', 'source', 'm-1', 1, '{not json')",
                [],
            )
            .unwrap();
        let image = journal.load().unwrap();
        assert!(image.sources.is_empty());
        assert_eq!(image.unreadable.len(), 1);
        assert!(
            image.unreadable[0].starts_with("source attempt m-1.1: "),
            "{:?}",
            image.unreadable
        );
    }

    /// A row written before machines were typed (`qemu = { kernel, append,
    /// args }`) loads: its attempt is recovered like any other, and Begin
    /// refuses to migrate such a VM again (`QemuMachine::check`).
    #[test]
    fn a_row_with_an_untyped_qemu_machine_still_loads() {
        use crate::protocol::source::{AttemptParams, SourceAttempt};
        use crate::protocol::{Mode, Timing, VmSpec};
        let vm = VmSpec {
            name: "web-01".into(),
            memory_mib: 512,
            vcpus: 1,
            dirty_rate_mib_s: 0,
            features: vec![],
            qemu: None,
        };
        let params = AttemptParams {
            migration_id: "m-1".into(),
            attempt: 1,
            host: "hv-a".into(),
            destination: "hv-b".into(),
            incoming_host: "hv-b".into(),
            vm,
            mode: Mode::Safe,
            completion: Default::default(),
            timing: Timing::default(),
            started_at_ms: 1,
        };
        let (attempt, _) = SourceAttempt::begin(params, 1);
        let mut body = serde_json::to_value(&attempt).unwrap();
        body["vm"]["qemu"] = serde_json::json!({
            "kernel": "/tmp/tern-guest.elf", "append": "ws=32", "args": ["-drive", "file=/x.img"]
        });
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        journal
            .db
            .execute(
                "INSERT INTO attempt (id, side, migration_id, open, body) VALUES ('m-1.1', 'source', 'm-1', 1, ?1)",
                [body.to_string()],
            )
            .unwrap();
        let image = journal.load().unwrap();
        assert!(image.unreadable.is_empty(), "{:?}", image.unreadable);
        let machine = image.sources[0].vm.qemu.as_ref().unwrap();
        assert_eq!(machine.legacy_args, ["-drive", "file=/x.img"]);
    }

    #[test]
    fn source_and_destination_rows_of_one_id_are_kept_apart() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        for side in ["source", "destination"] {
            journal
                .db
                .execute(
                    "INSERT INTO attempt (id, side, migration_id, open, body) VALUES ('m-1.1', ?1, 'm-1', 0, ?2)",
                    params![side, format!("{side} body")],
                )
                .unwrap();
        }
        let n: i64 = journal
            .db
            .query_row("SELECT count(*) FROM attempt", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 2, "a destination row must not overwrite the source row");
    }

    #[test]
    fn an_old_journal_gets_the_two_part_key_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Connection::open(dir.path().join("journal.db")).unwrap();
            db.execute_batch(
                "CREATE TABLE attempt (id TEXT PRIMARY KEY, side TEXT NOT NULL, migration_id TEXT NOT NULL,
                     open INTEGER NOT NULL, body TEXT NOT NULL);
                 INSERT INTO attempt VALUES ('m-1.1', 'source', 'm-1', 0, 'old');",
            )
            .unwrap();
        }
        let journal = Journal::open(dir.path()).unwrap();
        let body: String = journal
            .db
            .query_row(
                "SELECT body FROM attempt WHERE id = 'm-1.1' AND side = 'source'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(body, "old");
        journal
            .db
            .execute(
                "INSERT INTO attempt (id, side, migration_id, open, body) VALUES ('m-1.1', 'destination', 'm-1', 0, 'new')",
                [],
            )
            .unwrap();
    }

    #[test]
    fn tombstones_and_pending_work_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut journal = Journal::open(dir.path()).unwrap();
            journal
                .write(&Entry::Tombstone("m-9.1".into()), true)
                .unwrap();
            let pending = Pending {
                attempt_id: "m-2.1".into(),
                migration_id: "m-2".into(),
                vm: "web-01".into(),
                feature: String::new(),
                work: Work::Resume,
                error: "QEMU said no".into(),
                tries: 1,
                next_try_ms: 5,
                since_ms: 3,
            };
            journal.write(&Entry::Pending(pending), true).unwrap();
        }
        let image = Journal::open(dir.path()).unwrap().load().unwrap();
        assert_eq!(image.tombstones, ["m-9.1"]);
        assert_eq!(image.pending.len(), 1);
        assert_eq!(image.pending[0].work, Work::Resume);
        assert_eq!(image.pending[0].since_ms, 3, "when it was first left");
    }

    /// A journal from before pending work kept its first time: the column
    /// is added, its rows read as 0, and new rows keep theirs.
    #[test]
    fn pending_rows_of_an_older_journal_get_a_since_of_zero() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Connection::open(dir.path().join("journal.db")).unwrap();
            db.execute_batch(
                "CREATE TABLE pending (attempt_id TEXT NOT NULL, feature TEXT NOT NULL,
                     stage TEXT NOT NULL, migration_id TEXT NOT NULL, vm TEXT NOT NULL,
                     error TEXT NOT NULL, tries INTEGER NOT NULL, next_try_ms INTEGER NOT NULL,
                     PRIMARY KEY (attempt_id, feature, stage));
                 INSERT INTO pending VALUES ('m-1.1', 'net', 'rollback', 'm-1', 'web-01', 'no', 2, 9);",
            )
            .unwrap();
        }
        let image = Journal::open(dir.path()).unwrap().load().unwrap();
        assert_eq!(image.pending.len(), 1);
        assert_eq!((image.pending[0].tries, image.pending[0].since_ms), (2, 0));
        // Opening it again finds the column there.
        assert!(Journal::open(dir.path()).is_ok());
    }

    fn rows_of(journal: &Journal, sql: &str) -> i64 {
        journal.db.query_row(sql, [], |r| r.get(0)).unwrap()
    }

    #[test]
    fn a_prune_forgets_rows_keeps_markers_and_truncates_the_wal() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(dir.path()).unwrap();
        for (id, side, migration) in [
            ("m-000000000001.1", "source", "m-000000000001"),
            ("m-000000000001.2", "source", "m-000000000001"),
            ("m-000000000002.1", "source", "m-000000000002"),
            ("m-000000000009.1", "destination", "m-000000000009"),
            ("m-00000000000a.1", "destination", "m-00000000000a"),
        ] {
            journal
                .db
                .execute(
                    "INSERT INTO attempt (id, side, migration_id, open, body) VALUES (?1, ?2, ?3, 0, ?4)",
                    params![id, side, migration, "x".repeat(100_000)],
                )
                .unwrap();
        }
        let wal = dir.path().join("journal.db-wal");
        assert!(std::fs::metadata(&wal).unwrap().len() > 0);
        let pruned = Pruned {
            migrations: vec!["m-000000000001".into()],
            rolled_back: vec!["m-000000000009.1".into()],
            committed: vec!["m-00000000000a.1".into()],
            ..Pruned::default()
        };
        journal
            .write(&Entry::Prune(Box::new(pruned)), false)
            .unwrap();
        // Both attempts of the pruned migration go; the other stays.
        let left: Vec<String> = journal
            .db
            .prepare("SELECT id FROM attempt ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(left, ["m-000000000002.1"]);
        let image = journal.load().unwrap();
        assert_eq!(image.tombstones, ["m-000000000009.1"]);
        assert_eq!(image.committed, ["m-00000000000a.1"]);
        assert_eq!(
            std::fs::metadata(&wal).unwrap().len(),
            0,
            "the WAL is truncated"
        );
    }

    #[test]
    fn retention_applies_to_a_table_of_the_journal_the_core_does_not_hold() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        journal
            .db
            .execute_batch("CREATE TABLE audit (at_ms INTEGER NOT NULL, open INTEGER NOT NULL);")
            .unwrap();
        for (at, open) in [(100, 0), (200, 0), (300, 0), (400, 0), (50, 1)] {
            journal
                .db
                .execute("INSERT INTO audit VALUES (?1, ?2)", [at, open])
                .unwrap();
        }
        let table = Retained {
            table: "audit",
            closed_at: "at_ms",
            closed: "open = 0",
        };
        let keep_two = Retention {
            closed: 2,
            max_age_ms: 1_000,
        };
        assert_eq!(retain(&journal.db, &table, keep_two, 1_000).unwrap(), 2);
        let rows = |sql| rows_of(&journal, sql);
        assert_eq!(
            rows("SELECT count(*) FROM audit WHERE open = 0 AND at_ms >= 300"),
            2
        );
        assert_eq!(rows("SELECT count(*) FROM audit"), 3, "an open row is kept");
        // Later, the age limit takes the two kept ones too.
        assert_eq!(retain(&journal.db, &table, keep_two, 1_401).unwrap(), 2);
        assert_eq!(rows("SELECT count(*) FROM audit"), 1);
    }
}
