//! Retention: what a host forgets. Closed records (migrations it sourced,
//! attempts it received, evacuations) beyond `retain_closed` or older than
//! `retain_days` are dropped from memory and from the journal, so neither
//! grows with the host's age, and nothing an agent sends grows with it
//! either. The rule is [`beyond`], one function for every kind of record
//! (the journal applies it to tables the core does not hold, too).
//!
//! Forgetting never changes an answer another host may still need. A
//! received attempt that rolled back becomes a tombstone: asked again, it
//! did not commit, and a late Prepare of it is refused. One that committed
//! becomes a commit marker: Resolve, Finish and Abort still answer that it
//! committed (a source may have been down for longer than `retain_days`).
//! Attempts whose guest was lost, and records with pending work or followed
//! by a running evacuation, are kept.
//!
//! Pruning runs when the host core recovers and whenever its driver sends
//! [`super::Input::Prune`] (the agent: every ten minutes).

use std::collections::BTreeSet;

use super::{Entry, HostCore, Level};
use crate::protocol::Millis;
use crate::protocol::destination::Answer;

/// How many closed records of each kind a host keeps, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// The newest this many closed records of each kind are kept.
    pub closed: usize,
    /// Closed records older than this are dropped whatever their number.
    pub max_age_ms: Millis,
}

pub const DAY_MS: Millis = 24 * 60 * 60 * 1000;

impl Retention {
    /// `retain_closed` and `retain_days` of an agent's config.
    pub fn from_config(config: &crate::config::AgentConfig) -> Retention {
        Retention {
            closed: config.retain_closed as usize,
            max_age_ms: u64::from(config.retain_days) * DAY_MS,
        }
    }
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            closed: 1000,
            max_age_ms: 30 * DAY_MS,
        }
    }
}

/// The keys of `closed` records (each with when it closed) that are beyond
/// `retention` at `now`: all but the newest `retention.closed`, and every one
/// that closed before `now - max_age_ms`. Oldest first.
pub fn beyond<K: Ord>(retention: Retention, now: Millis, mut closed: Vec<(Millis, K)>) -> Vec<K> {
    let horizon = now.saturating_sub(retention.max_age_ms);
    // Newest first; equal times by key, so the choice is deterministic.
    closed.sort_by(|a, b| b.cmp(a));
    let mut out: Vec<K> = closed
        .into_iter()
        .enumerate()
        .filter(|(i, (at, _))| *i >= retention.closed || *at < horizon)
        .map(|(_, (_, key))| key)
        .collect();
    out.reverse();
    out
}

/// What one prune forgot, for the journal to forget too.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Migrations this host sourced: every attempt row of each goes.
    pub migrations: Vec<String>,
    /// Received attempts that rolled back: their rows become tombstones.
    pub rolled_back: Vec<String>,
    /// Received attempts that committed: their rows become commit markers.
    pub committed: Vec<String>,
    pub evacuations: Vec<String>,
    /// The rule and the time it was applied at, for the journal's own
    /// tables the core does not hold.
    pub retention: Retention,
    pub now: Millis,
}

impl Pruned {
    pub fn is_empty(&self) -> bool {
        self.migrations.is_empty()
            && self.rolled_back.is_empty()
            && self.committed.is_empty()
            && self.evacuations.is_empty()
    }
}

impl HostCore {
    /// Forget the closed records beyond retention now.
    pub(super) fn prune(&mut self) {
        let retention = self.cfg.retention;
        let now = self.now;
        // Migrations something still refers to.
        let mut held: BTreeSet<&str> = self
            .pending
            .values()
            .map(|p| p.migration_id.as_str())
            .collect();
        for job in self.evacuations.jobs() {
            if !job.state.is_over() {
                held.extend(job.vms.iter().filter_map(|v| v.migration_id.as_deref()));
            }
        }
        let pending_attempts: BTreeSet<&str> = self
            .pending
            .values()
            .map(|p| p.attempt_id.as_str())
            .collect();
        let migrations = beyond(
            retention,
            now,
            self.sources
                .iter()
                .filter(|(id, s)| !s.live && !held.contains(id.as_str()))
                .map(|(id, s)| (s.attempt.record.updated_at_ms, id.clone()))
                .collect(),
        );
        let ended = beyond(
            retention,
            now,
            self.ended
                .iter()
                .filter(|(id, a)| a.lost().is_none() && !pending_attempts.contains(id.as_str()))
                .map(|(id, a)| (a.last_heard_ms(), id.clone()))
                .collect(),
        );
        let evacuations = beyond(
            retention,
            now,
            self.evacuations
                .jobs()
                .into_iter()
                .filter(|job| job.state.is_over())
                .map(|job| (job.ended_at_ms.unwrap_or(job.updated_at_ms), job.id.clone()))
                .collect(),
        );
        let mut pruned = Pruned {
            retention,
            now,
            ..Pruned::default()
        };
        for id in migrations {
            self.sources.remove(&id);
            pruned.migrations.push(id);
        }
        for id in ended {
            let Some(attempt) = self.ended.remove(&id) else {
                continue;
            };
            if attempt.answer() == Answer::Committed {
                self.committed.insert(id.clone());
                pruned.committed.push(id);
            } else {
                self.tombstones.insert(id.clone());
                pruned.rolled_back.push(id);
            }
        }
        for id in evacuations {
            self.evacuations.forget(&id);
            pruned.evacuations.push(id);
        }
        if pruned.is_empty() {
            return;
        }
        let text = format!(
            "retention: forgot {} closed migrations, {} ended incoming attempts and {} evacuations \
             (retain_closed = {}, retain_days = {})",
            pruned.migrations.len(),
            pruned.rolled_back.len() + pruned.committed.len(),
            pruned.evacuations.len(),
            retention.closed,
            retention.max_age_ms / DAY_MS
        );
        self.journal(Entry::Prune(Box::new(pruned)), false);
        self.log(Level::Info, "", text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beyond_keeps_the_newest_by_count_and_drops_the_old_by_age() {
        let r = Retention {
            closed: 2,
            max_age_ms: 500,
        };
        let closed = vec![(500, "c"), (900, "e"), (100, "a"), (700, "d"), (300, "b")];
        // The newest two stay; the rest go, oldest first.
        assert_eq!(beyond(r, 1000, closed.clone()), ["a", "b", "c"]);
        // d is among the newest two, but closed before 1250 - 500.
        assert_eq!(beyond(r, 1250, closed.clone()), ["a", "b", "c", "d"]);
        let all = Retention {
            closed: 10,
            max_age_ms: 10_000,
        };
        assert!(beyond(all, 1000, closed).is_empty());
    }
}
