//! Human-readable rendering: a migration record, rollback replies, tables.
//! Pure functions from data to text, so they can be tested.

use std::fmt::Write as _;

use crate::proto;
use crate::protocol::convergence::Verdict;
use crate::protocol::record::{MigrationRecord, RecoveryView};
use crate::protocol::{Outcome, Phase, StepStatus, TransferStage, TransferStats};

pub fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Begin => "begin",
        Phase::Prepare => "prepare",
        Phase::Perform => "perform",
        Phase::Finish => "finish",
        Phase::Confirm => "confirm",
    }
}

/// The line `migrate` and `retry` print to stderr once the agent accepted.
pub fn started_line(record: &MigrationRecord) -> String {
    let mut line = format!(
        "migration {}: {} {} -> {} ({})",
        record.id,
        record.vm,
        record.source,
        record.destination,
        record.mode.as_str()
    );
    if record.attempt > 1 {
        let _ = write!(line, ", attempt {}", record.attempt);
    }
    line
}

/// Where a migration stands in a few words: its outcome (`LOST` in
/// capitals: the guest is gone), or where its transfer is: the running
/// phase with its progress and the verdict on pre-copy, or post-copy, or a
/// paused post-copy being recovered.
pub fn state_summary(record: &MigrationRecord) -> String {
    match record.outcome {
        Some(Outcome::Lost) => "LOST".to_string(),
        Some(outcome) => outcome.as_str().to_string(),
        None => {
            if let Some(recovery) = &record.recovery {
                return recovering_text(recovery.tries);
            }
            let phase = record
                .running_phase()
                .unwrap_or_else(|| record.current_phase());
            match (phase, &record.transfer) {
                (_, Some(stats)) if stats.stage == TransferStage::PostcopyPaused => {
                    stats.stage.as_str().to_string()
                }
                (_, Some(stats)) if stats.stage == TransferStage::Postcopy => {
                    format!("{} {}%", stats.stage.as_str(), stats.percent_done())
                }
                (Phase::Perform, Some(stats)) if stats.bytes_total > 0 => {
                    let mut text = format!("{} {}%", phase_name(phase), stats.percent_done());
                    if let Some(c) = &record.convergence {
                        let _ = write!(text, ", {}", verdict_label(c.verdict));
                    }
                    text
                }
                _ => phase_name(phase).to_string(),
            }
        }
    }
}

/// A verdict as an operator scans for it: the one that means pre-copy
/// will never finish in capitals. The console and the CLI both say it so.
pub fn verdict_label(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Converging => "converging",
        Verdict::Slow => "slow",
        Verdict::NotConverging => "NOT CONVERGING",
        Verdict::Stalled => "stalled",
    }
}

/// Post-copy stopped by a broken link while the agents recover it: "post-copy
/// paused — recovering, try 3", counting the try under way or next
/// (`tries` were made before it).
pub fn recovering_text(tries: u32) -> String {
    format!(
        "{} — recovering, try {}",
        TransferStage::PostcopyPaused.as_str(),
        tries.saturating_add(1)
    )
}

/// The rest of a recovery: "2 tries failed, the last: connection refused;
/// next try at 10:32:05"; `clock` shows a unix time in ms.
pub fn recovery_detail(recovery: &RecoveryView, clock: impl Fn(u64) -> String) -> String {
    let mut text = match recovery.tries {
        0 => "first try under way".to_string(),
        1 => "1 try failed".to_string(),
        n => format!("{n} tries failed"),
    };
    if let Some(error) = &recovery.error {
        let _ = write!(text, ", the last: {error}");
    }
    if recovery.next_at_ms > 0 {
        let _ = write!(text, "; next try {}", clock(recovery.next_at_ms));
    }
    text
}

/// After a few failed recovery tries, the way out if the destination will
/// never come back (recovery would try forever).
pub fn recovery_way_out(id: &str, destination: &str, tries: u32) -> Option<String> {
    (tries >= RECOVERY_TRIES_BEFORE_WAY_OUT)
        .then(|| format!("if {destination} is gone for good: tern resolve {id} --lost"))
}

/// Failed recovery tries before [`recovery_way_out`] is shown.
pub const RECOVERY_TRIES_BEFORE_WAY_OUT: u32 = 3;

/// What the outcome `lost` means, in so many words.
pub fn lost_text(destination: &str) -> String {
    format!(
        "LOST: the destination {destination} died during post-copy; no host holds the whole guest"
    )
}

/// Seconds as a person reads a wait: `850 ms`, `12 s`, `3 min 05 s`,
/// `2 h 10 min`.
pub fn seconds_text(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..60_000 => format!("{} s", ms / 1000),
        60_000..3_600_000 => format!("{} min {:02} s", ms / 60_000, ms / 1000 % 60),
        _ => format!("{} h {:02} min", ms / 3_600_000, ms / 60_000 % 60),
    }
}

/// An ETA to the second at best: the model's milliseconds mean nothing.
fn eta_text(ms: u64) -> String {
    if ms < 1_000 {
        "<1 s".to_string()
    } else {
        seconds_text(ms)
    }
}

/// The one line `tern migrate` and `tern retry` keep updated on a terminal
/// while they wait: phase, bytes sent of the total, rate, and where the
/// transfer is heading (the verdict and its ETA; post-copy with what is
/// left to pull; a paused post-copy being recovered).
pub fn progress_line(record: &MigrationRecord) -> String {
    let phase = record
        .running_phase()
        .unwrap_or_else(|| record.current_phase());
    let stats = record.transfer.filter(|t| t.bytes_total > 0);
    let mut parts: Vec<String> = Vec::new();
    match (&record.recovery, stats.map(|t| t.stage)) {
        (Some(recovery), _) => parts.push(recovering_text(recovery.tries)),
        (None, Some(stage)) if stage.is_postcopy() => parts.push(stage.as_str().to_string()),
        _ => parts.push(phase_name(phase).to_string()),
    }
    if let Some(t) = stats {
        parts.push(format!("{} sent", bytes(t.bytes_transferred)));
        if t.rate_bytes_s > 0 {
            parts.push(format!("{}/s", bytes(t.rate_bytes_s)));
        }
        match t.stage {
            TransferStage::Postcopy | TransferStage::PostcopyPaused => {
                parts.push(format!("{} to pull", bytes(t.bytes_remaining)));
            }
            TransferStage::Precopy if phase == Phase::Perform => {
                if let Some(c) = &record.convergence {
                    parts.push(match c.eta_ms {
                        Some(eta)
                            if c.verdict == Verdict::Converging || c.verdict == Verdict::Slow =>
                        {
                            format!("{}, ETA {}", verdict_label(c.verdict), eta_text(eta))
                        }
                        _ => verdict_label(c.verdict).to_string(),
                    });
                }
            }
            TransferStage::Precopy => {}
        }
    }
    parts.join(" · ")
}

pub use crate::protocol::convergence::bytes;

pub fn transfer_line(stats: &TransferStats) -> String {
    let mut line = format!(
        "{} sent, {} of {} left, {}/s, iteration {}, {}, {} ms elapsed",
        bytes(stats.bytes_transferred),
        bytes(stats.bytes_remaining),
        bytes(stats.bytes_total),
        bytes(stats.rate_bytes_s),
        stats.iteration,
        downtime_text(stats.downtime_ms, stats.expected_downtime_ms, |ms| {
            format!("{ms} ms")
        }),
        stats.elapsed_ms
    );
    if stats.stage.is_postcopy() || stats.postcopy_requests > 0 {
        let _ = write!(line, ", {}", stage_text(stats));
    }
    line
}

/// "post-copy, 1234 pages requested by the destination".
pub fn stage_text(stats: &TransferStats) -> String {
    match stats.postcopy_requests {
        0 => stats.stage.as_str().to_string(),
        n => format!(
            "{}, {n} page{} requested by the destination",
            stats.stage.as_str(),
            if n == 1 { "" } else { "s" }
        ),
    }
}

/// "downtime 46 ms" once the hypervisor measured it, else "expected
/// downtime 300 ms"; `show` formats a duration.
pub fn downtime_text(downtime_ms: u64, expected_ms: u64, show: impl Fn(u64) -> String) -> String {
    if downtime_ms > 0 {
        format!("downtime {}", show(downtime_ms))
    } else {
        format!("expected downtime {}", show(expected_ms))
    }
}

/// The full human summary of a record: outcome, where the VM runs, every
/// phase with its status and duration, every feature with its stages.
pub fn record_summary(record: &MigrationRecord) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "migration {}: {} {} -> {} ({}), attempt {}",
        record.id,
        record.vm,
        record.source,
        record.destination,
        record.mode.as_str(),
        record.attempt
    );
    let running_on = if record.running_on.is_empty() {
        "-"
    } else {
        record.running_on.as_str()
    };
    let commit = if record.committed { ", committed" } else { "" };
    let running_on = match record.guest {
        crate::protocol::GuestCondition::Running => running_on.to_string(),
        crate::protocol::GuestCondition::Paused => {
            format!("{running_on} (the guest is PAUSED there: a resume failed)")
        }
        crate::protocol::GuestCondition::Unknown => {
            format!("{running_on}? (no host can say it runs the guest)")
        }
    };
    let outcome = match record.outcome {
        Some(Outcome::Lost) => lost_text(&record.destination),
        Some(outcome) => outcome.as_str().to_string(),
        None => format!("none yet, running {}", state_summary(record)),
    };
    let _ = writeln!(out, "  outcome:    {outcome}{commit}");
    let _ = writeln!(out, "  running on: {running_on}");
    if let Some(cause) = record.failure() {
        let _ = writeln!(out, "  cause:      {}", cause.summary());
    }
    if let Some(error) = &record.error {
        let _ = writeln!(out, "  error:      {error}");
    }
    let _ = writeln!(out, "  policy:     {}", record.completion.describe());
    if let Some(c) = &record.convergence {
        // An ETA means something only while the transfer runs.
        let eta = match (record.outcome, c.eta_ms) {
            (None, Some(eta)) => format!(", ETA {}", eta_text(eta)),
            _ => String::new(),
        };
        // Once it has ended, what pre-copy was doing when it last looked.
        let label = if record.outcome.is_some() {
            "pre-copy:"
        } else {
            "outlook:"
        };
        let _ = writeln!(
            out,
            "  {label:<11} {}{eta}: {}",
            verdict_label(c.verdict),
            c.reason
        );
    }
    if let Some(note) = &record.completion_note {
        let _ = writeln!(out, "  note:       {note}");
    }
    if let Some(recovery) = &record.recovery {
        let _ = writeln!(
            out,
            "  recovery:   {}: {}",
            recovering_text(recovery.tries),
            recovery_detail(recovery, |ms| format!("at {} UTC", super::audit::clock(ms)))
        );
        if let Some(way_out) = recovery_way_out(&record.id, &record.destination, recovery.tries) {
            let _ = writeln!(out, "              {way_out}");
        }
    }
    if let Some(stats) = &record.transfer {
        let _ = writeln!(out, "  transfer:   {}", transfer_line(stats));
    }
    let _ = writeln!(out, "  phases:");
    let rows: Vec<Vec<String>> = record
        .phases
        .iter()
        .map(|p| {
            let duration = match p.status {
                StepStatus::Pending | StepStatus::Skipped => String::new(),
                _ => format!("{} ms", p.duration_ms),
            };
            vec![
                phase_name(p.phase).to_string(),
                p.status.as_str().to_string(),
                duration,
            ]
        })
        .collect();
    out.push_str(&indent(&table(&[], &rows), "    "));
    if !record.features.is_empty() {
        let _ = writeln!(out, "  features:");
        for f in &record.features {
            let required = if f.required { "required" } else { "optional" };
            let _ = writeln!(
                out,
                "    {} ({required}): prepare {}, finish {}, verify {}, rollback {}, release {}",
                f.name,
                f.prepare.as_str(),
                f.finish.as_str(),
                f.verify.as_str(),
                f.rollback.as_str(),
                f.release.as_str()
            );
            if let Some(error) = &f.error {
                let _ = writeln!(out, "      error: {error}");
            }
        }
    }
    if !record.repairs.is_empty() {
        let _ = writeln!(out, "  repairs:");
        for entry in &record.repairs {
            let _ = writeln!(out, "    {}", repair_line(entry));
        }
    }
    out
}

/// One repair of the record's history, with its time of day:
/// `16:40:12 UTC port-profile finish on hv-b: ok · by ana (operator)`.
pub fn repair_line(entry: &crate::protocol::repair::RepairEntry) -> String {
    format!(
        "{} UTC {}",
        super::audit::clock(entry.at_ms),
        crate::protocol::repair::describe(entry)
    )
}

/// One piece of pending work, e.g. `port-profile rollback for web-01
/// (migration m-1, attempt a-1), 3 tries: switch timed out`, `resume of
/// web-01 (…)`, `telling hv-b that web-01 runs here (…)`.
pub fn pending_rollback_line(p: &proto::PendingRollback) -> String {
    let what = match p.stage.as_str() {
        "notify" => format!("telling {} that {} runs here", p.feature, p.vm),
        stage if p.feature.is_empty() => format!("{stage} of {}", p.vm),
        stage => format!("{} {stage} for {}", p.feature, p.vm),
    };
    let mut line = format!(
        "{what} (migration {}, attempt {})",
        p.migration_id, p.attempt_id
    );
    if p.tries > 0 {
        let _ = write!(
            line,
            ", {} {}",
            p.tries,
            if p.tries == 1 { "try" } else { "tries" }
        );
    }
    if !p.error.is_empty() {
        let _ = write!(line, ": {}", p.error);
    }
    line
}

/// A host's answer to Rollback: what ran now and what is still pending.
pub fn rollback_reply(host: &str, reply: &proto::RollbackReply) -> String {
    let mut out = String::new();
    if reply.done.is_empty() && reply.still_pending.is_empty() {
        let _ = writeln!(out, "{host}: nothing pending");
    }
    for p in &reply.done {
        // The old error no longer applies: the run just succeeded.
        let done = proto::PendingRollback {
            error: String::new(),
            ..p.clone()
        };
        let _ = writeln!(out, "{host}: done: {}", pending_rollback_line(&done));
    }
    for p in &reply.still_pending {
        let _ = writeln!(out, "{host}: still pending: {}", pending_rollback_line(p));
    }
    out
}

/// Columns padded to their widest cell, two spaces apart; the last column is
/// not padded. No header line when `headers` is empty.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let columns = rows
        .iter()
        .map(Vec::len)
        .chain([headers.len()])
        .max()
        .unwrap_or(0);
    let mut widths = vec![0; columns];
    let header_row: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    let all = (!headers.is_empty())
        .then_some(&header_row)
        .into_iter()
        .chain(rows);
    for row in all.clone() {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in all {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}  ", width = widths[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn indent(text: &str, prefix: &str) -> String {
    text.lines().map(|l| format!("{prefix}{l}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::completion::Completion;
    use crate::protocol::convergence::ConvergenceView;
    use crate::protocol::record::FeatureRecord;

    fn failed_record() -> MigrationRecord {
        let proto_record = proto::MigrationRecord {
            id: "m-1".into(),
            vm: "web-01".into(),
            source: "hv-a".into(),
            destination: "hv-b".into(),
            mode: proto::Mode::Safe as i32,
            attempt: 1,
            outcome: proto::Outcome::Failed as i32,
            running_on: "hv-a".into(),
            error: "port-profile failed to finish on hv-b".into(),
            phases: vec![
                proto::PhaseRecord {
                    phase: proto::Phase::Begin as i32,
                    status: proto::StepStatus::Ok as i32,
                    duration_ms: 3,
                },
                proto::PhaseRecord {
                    phase: proto::Phase::Prepare as i32,
                    status: proto::StepStatus::Ok as i32,
                    duration_ms: 25,
                },
                proto::PhaseRecord {
                    phase: proto::Phase::Perform as i32,
                    status: proto::StepStatus::Ok as i32,
                    duration_ms: 1203,
                },
                proto::PhaseRecord {
                    phase: proto::Phase::Finish as i32,
                    status: proto::StepStatus::Failed as i32,
                    duration_ms: 40,
                },
                proto::PhaseRecord {
                    phase: proto::Phase::Confirm as i32,
                    status: proto::StepStatus::Ok as i32,
                    duration_ms: 2,
                },
            ],
            features: vec![proto::FeatureRecord {
                name: "port-profile".into(),
                required: true,
                prepare: proto::StepStatus::Ok as i32,
                finish: proto::StepStatus::Failed as i32,
                rollback: proto::StepStatus::Ok as i32,
                release: proto::StepStatus::Pending as i32,
                verify: proto::StepStatus::Skipped as i32,
                error: "finish: switch refused".into(),
                detail: String::new(),
            }],
            ..Default::default()
        };
        MigrationRecord::from(&proto_record)
    }

    #[test]
    fn a_record_summary_shows_outcome_phases_and_features() {
        let text = record_summary(&failed_record());
        let expected = "\
migration m-1: web-01 hv-a -> hv-b (safe), attempt 1
  outcome:    failed
  running on: hv-a
  cause:      feature on hv-b (destination): port-profile ✗ finish
  error:      port-profile failed to finish on hv-b
  policy:     post-copy never, 150 s/GiB, then abort
  phases:
    begin    ok      3 ms
    prepare  ok      25 ms
    perform  ok      1203 ms
    finish   failed  40 ms
    confirm  ok      2 ms
  features:
    port-profile (required): prepare ok, finish failed, verify skipped, rollback ok, release pending
      error: finish: switch refused
";
        assert_eq!(text, expected);
    }

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    /// `failed_record` 45 s into pre-copy, converging.
    fn in_precopy() -> MigrationRecord {
        let mut record = failed_record();
        record.outcome = None;
        record.error = None;
        for p in &mut record.phases {
            p.status = StepStatus::Pending;
        }
        record.phase_mut(Phase::Begin).status = StepStatus::Ok;
        record.phase_mut(Phase::Prepare).status = StepStatus::Ok;
        record.phase_mut(Phase::Perform).status = StepStatus::Running;
        record.transfer = Some(TransferStats {
            bytes_total: 2 * GIB,
            bytes_transferred: 1229 * MIB,
            bytes_remaining: 800 * MIB,
            rate_bytes_s: 512 * MIB,
            ..TransferStats::default()
        });
        record.convergence = Some(ConvergenceView {
            verdict: Verdict::Converging,
            eta_ms: Some(12_000),
            reason: "dirtying 128.0 MiB/s, link 512.0 MiB/s: 800.0 MiB left, net 384.0 MiB/s"
                .into(),
            remaining: vec![[0, 2 * GIB], [45_000, 800 * MIB]],
        });
        record
    }

    #[test]
    fn the_progress_line_says_phase_bytes_rate_verdict_and_eta() {
        let mut record = in_precopy();
        assert_eq!(
            progress_line(&record),
            "perform · 1.2 GiB sent · 512.0 MiB/s · converging, ETA 12 s"
        );
        record.convergence.as_mut().unwrap().eta_ms = Some(850);
        assert!(
            progress_line(&record).ends_with("converging, ETA <1 s"),
            "{}",
            progress_line(&record)
        );
        record.convergence.as_mut().unwrap().verdict = Verdict::NotConverging;
        record.convergence.as_mut().unwrap().eta_ms = None;
        assert_eq!(
            progress_line(&record),
            "perform · 1.2 GiB sent · 512.0 MiB/s · NOT CONVERGING"
        );
        // After the switchover: post-copy, and what is left to pull.
        let stats = record.transfer.as_mut().unwrap();
        stats.stage = TransferStage::Postcopy;
        stats.bytes_remaining = 312 * MIB;
        assert_eq!(
            progress_line(&record),
            "post-copy · 1.2 GiB sent · 512.0 MiB/s · 312.0 MiB to pull"
        );
        record.transfer.as_mut().unwrap().stage = TransferStage::PostcopyPaused;
        record.transfer.as_mut().unwrap().rate_bytes_s = 0;
        record.recovery = Some(RecoveryView {
            tries: 2,
            error: Some("connection refused".into()),
            next_at_ms: 0,
        });
        assert_eq!(
            progress_line(&record),
            "post-copy paused — recovering, try 3 · 1.2 GiB sent · 312.0 MiB to pull"
        );
        // Before the transfer: the phase alone; after it, no stale verdict.
        let mut record = in_precopy();
        record.transfer = None;
        record.phase_mut(Phase::Perform).status = StepStatus::Pending;
        record.phase_mut(Phase::Prepare).status = StepStatus::Running;
        assert_eq!(progress_line(&record), "prepare");
        let mut record = in_precopy();
        record.phase_mut(Phase::Perform).status = StepStatus::Ok;
        record.phase_mut(Phase::Finish).status = StepStatus::Running;
        assert_eq!(
            progress_line(&record),
            "finish · 1.2 GiB sent · 512.0 MiB/s"
        );
    }

    #[test]
    fn a_record_summary_shows_the_policy_the_outlook_the_note_and_a_recovery() {
        let mut record = in_precopy();
        record.completion = Completion::for_mode(crate::protocol::Mode::Fast);
        record.completion_note =
            Some("switched to post-copy after 12.3 s: pre-copy cannot converge".into());
        record.recovery = Some(RecoveryView {
            tries: 2,
            error: Some("connection refused".into()),
            next_at_ms: 3_723_000,
        });
        let text = record_summary(&record);
        for line in [
            "  policy:     post-copy auto, 150 s/GiB\n",
            "  outlook:    converging, ETA 12 s: dirtying 128.0 MiB/s, link 512.0 MiB/s: 800.0 MiB left, net 384.0 MiB/s\n",
            "  note:       switched to post-copy after 12.3 s: pre-copy cannot converge\n",
            "  recovery:   post-copy paused — recovering, try 3: 2 tries failed, the last: connection refused; next try at 01:02:03 UTC\n",
        ] {
            assert!(text.contains(line), "no {line:?} in\n{text}");
        }
        // Two failed tries: too early to suggest giving up; three: the way out.
        assert!(!text.contains("--lost"), "{text}");
        record.recovery.as_mut().unwrap().tries = 3;
        let text = record_summary(&record);
        assert!(
            text.contains(&format!(
                "              if hv-b is gone for good: tern resolve {} --lost\n",
                record.id
            )),
            "{text}"
        );
        record.recovery.as_mut().unwrap().tries = 2;
        assert_eq!(
            state_summary(&record),
            "post-copy paused — recovering, try 3"
        );
        record.recovery = None;
        assert_eq!(state_summary(&record), "perform 60%, converging");
        // Once it ended, what pre-copy was doing last, without an ETA.
        record.outcome = Some(Outcome::Failed);
        assert!(
            record_summary(&record).contains("  pre-copy:   converging: dirtying"),
            "{}",
            record_summary(&record)
        );
    }

    #[test]
    fn a_lost_record_says_lost_and_what_it_means() {
        let mut record = failed_record();
        record.outcome = Some(Outcome::Lost);
        record.error = Some("hv-b stopped answering during post-copy".into());
        let text = record_summary(&record);
        assert!(
            text.contains(
                "  outcome:    LOST: the destination hv-b died during post-copy; no host holds the whole guest\n"
            ),
            "{text}"
        );
        assert_eq!(state_summary(&record), "LOST");
    }

    #[test]
    fn a_running_migration_shows_its_phase_and_transfer_progress() {
        let mut record = failed_record();
        record.outcome = None;
        for p in &mut record.phases {
            p.status = StepStatus::Pending;
        }
        record.phase_mut(Phase::Begin).status = StepStatus::Ok;
        record.phase_mut(Phase::Prepare).status = StepStatus::Ok;
        record.phase_mut(Phase::Perform).status = StepStatus::Running;
        record.transfer = Some(TransferStats {
            bytes_total: 1000,
            bytes_remaining: 580,
            ..TransferStats::default()
        });
        assert_eq!(state_summary(&record), "perform 42%");
        record.outcome = Some(Outcome::Succeeded);
        assert_eq!(state_summary(&record), "succeeded");
    }

    #[test]
    fn the_started_line_names_the_attempt_after_the_first() {
        let mut record = failed_record();
        assert_eq!(
            started_line(&record),
            "migration m-1: web-01 hv-a -> hv-b (safe)"
        );
        record.attempt = 2;
        record.features.push(FeatureRecord::new("tap", false));
        assert_eq!(
            started_line(&record),
            "migration m-1: web-01 hv-a -> hv-b (safe), attempt 2"
        );
    }

    #[test]
    fn rollback_replies_list_done_and_still_pending_entries() {
        let entry = proto::PendingRollback {
            attempt_id: "a-1".into(),
            migration_id: "m-1".into(),
            vm: "web-01".into(),
            feature: "port-profile".into(),
            stage: "rollback".into(),
            error: "switch timed out".into(),
            tries: 3,
            next_try_at_ms: 0,
        };
        let reply = proto::RollbackReply {
            done: vec![],
            still_pending: vec![entry],
        };
        assert_eq!(
            rollback_reply("hv-b", &reply),
            "hv-b: still pending: port-profile rollback for web-01 (migration m-1, attempt a-1), 3 tries: switch timed out\n"
        );
        assert_eq!(
            rollback_reply("hv-a", &proto::RollbackReply::default()),
            "hv-a: nothing pending\n"
        );
    }

    #[test]
    fn bytes_are_shown_in_binary_units() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 * 1024 * 1024 + 400 * 1024), "3.4 MiB");
        assert_eq!(bytes(2 * 1024 * 1024 * 1024), "2.0 GiB");
    }

    #[test]
    fn tables_pad_columns_to_the_widest_cell() {
        let rows = vec![
            vec!["hv-a".to_string(), "ok".to_string()],
            vec!["hv-bbb".to_string(), "x".to_string()],
        ];
        assert_eq!(
            table(&["HOST", "STATE"], &rows),
            "HOST    STATE\nhv-a    ok\nhv-bbb  x\n"
        );
    }
}
