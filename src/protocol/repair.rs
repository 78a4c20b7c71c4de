//! Repairing a degraded VM (`tern repair`, `R` in the console): which
//! feature stages to re-run on the host where the VM now runs, and what
//! their results make of its migration record. A fast migration that moved
//! a VM without its network ends `degraded`; once the cause is fixed (the
//! switch accepts it again), the operator re-runs the stages that failed,
//! with the same driver calls (stages are idempotent), and the record says
//! so. Pure like the rest of the protocol: the host core decides with these
//! functions, the agent carries the stages out.

use serde::{Deserialize, Serialize};

use super::bounds::MAX_REPAIRS;
use super::record::{FeatureRecord, MigrationRecord};
use super::{Millis, Outcome, Stage, StepStatus};

/// Where a repair of one feature stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RepairResult {
    /// Journaled before the stages ran; their answer is awaited.
    Running,
    Ok,
    Failed,
    /// The source agent stopped before the answer came: whether the stages
    /// took effect is unknown (they are idempotent: repair again).
    Interrupted,
}

impl RepairResult {
    pub fn as_str(self) -> &'static str {
        match self {
            RepairResult::Running => "running",
            RepairResult::Ok => "ok",
            RepairResult::Failed => "failed",
            RepairResult::Interrupted => "interrupted",
        }
    }

    pub fn parse(s: &str) -> RepairResult {
        match s {
            "ok" => RepairResult::Ok,
            "failed" => RepairResult::Failed,
            "running" => RepairResult::Running,
            _ => RepairResult::Interrupted,
        }
    }
}

/// One repair of one feature, in the migration record's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairEntry {
    /// When it was asked, on the source's clock.
    pub at_ms: Millis,
    pub feature: String,
    /// The stages re-run, in order.
    pub stages: Vec<Stage>,
    /// Where they ran: the host the VM runs on.
    pub host: String,
    pub result: RepairResult,
    /// Why it failed: the driver's reason, or why the host did not answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Who asked: the caller's certificate name and role.
    pub who: String,
}

/// The stages to re-run for one feature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeaturePlan {
    pub feature: String,
    pub stages: Vec<Stage>,
}

/// Why a repair cannot start. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// The record is not degraded (or has not ended).
    #[error("{0}")]
    NotDegraded(String),
    /// The operator named a feature the VM does not have.
    #[error("{0}")]
    UnknownFeature(String),
    /// Nothing failed in the feature (or in any feature) asked for.
    #[error("{0}")]
    NothingFailed(String),
    /// A repair of this migration is already running.
    #[error("{0}")]
    Running(String),
}

/// The stages a feature needs re-run: a failed prepare and the finish it
/// held up, or a failed finish, or the finish whose work a verification
/// did not find in place; each then verified again (where its driver
/// verifies: the host running them skips the check otherwise). Empty when
/// nothing failed.
pub fn failed_stages(feature: &FeatureRecord) -> Vec<Stage> {
    if feature.prepare == StepStatus::Failed {
        vec![Stage::Prepare, Stage::Finish, Stage::Verify]
    } else if feature.finish == StepStatus::Failed || feature.verify == StepStatus::Failed {
        vec![Stage::Finish, Stage::Verify]
    } else {
        Vec::new()
    }
}

/// What a repair of `record` re-runs: every feature with a failed stage,
/// or only `feature`.
pub fn plan(
    record: &MigrationRecord,
    feature: Option<&str>,
) -> Result<Vec<FeaturePlan>, PlanError> {
    let (vm, id) = (&record.vm, &record.id);
    match record.outcome {
        Some(Outcome::Degraded) => {}
        None => {
            return Err(PlanError::NotDegraded(format!(
                "{vm}'s migration {id} is still running: nothing to repair yet"
            )));
        }
        Some(other) => {
            return Err(PlanError::NotDegraded(format!(
                "{vm}'s latest migration {id} ended {}, not degraded: nothing to repair",
                other.as_str()
            )));
        }
    }
    if record
        .repairs
        .iter()
        .any(|r| r.result == RepairResult::Running)
    {
        return Err(PlanError::Running(format!(
            "a repair of {vm} (migration {id}) is running already"
        )));
    }
    let plans: Vec<FeaturePlan> = record
        .features
        .iter()
        .filter(|f| feature.is_none_or(|name| f.name == name))
        .map(|f| FeaturePlan {
            feature: f.name.clone(),
            stages: failed_stages(f),
        })
        .collect();
    if let Some(name) = feature {
        let Some(plan) = plans.first() else {
            let names: Vec<&str> = record.features.iter().map(|f| f.name.as_str()).collect();
            return Err(PlanError::UnknownFeature(format!(
                "{vm} has no feature {name} (it has: {})",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            )));
        };
        if plan.stages.is_empty() {
            return Err(PlanError::NothingFailed(format!(
                "{name} of {vm} has no failed stage to re-run on {}",
                record.running_on
            )));
        }
    }
    let plans: Vec<FeaturePlan> = plans.into_iter().filter(|p| !p.stages.is_empty()).collect();
    if plans.is_empty() {
        return Err(PlanError::NothingFailed(format!(
            "no feature of {vm} has a failed stage to re-run (degraded because: {})",
            record.error.as_deref().unwrap_or("unknown")
        )));
    }
    Ok(plans)
}

/// Journal the intent: one running entry per feature, before any stage
/// runs. The record keeps the newest [`MAX_REPAIRS`] entries.
pub fn begin(record: &mut MigrationRecord, plans: &[FeaturePlan], who: &str, now: Millis) {
    for plan in plans {
        record.repairs.push(RepairEntry {
            at_ms: now,
            feature: plan.feature.clone(),
            stages: plan.stages.clone(),
            host: record.running_on.clone(),
            result: RepairResult::Running,
            error: None,
            who: who.to_string(),
        });
    }
    let excess = record.repairs.len().saturating_sub(MAX_REPAIRS);
    record.repairs.drain(..excess);
    record.updated_at_ms = now;
}

/// One stage's result from the host the VM runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageRun {
    pub feature: String,
    pub stage: Stage,
    /// The driver's detail, or why it failed.
    pub result: Result<String, String>,
}

/// The stages answered: each running entry ends ok (every stage ran and
/// succeeded) or failed (with the first failure's reason), the features'
/// stages take the new results, and the outcome is `succeeded` once no
/// feature has a failed stage left and nothing else made it degraded.
pub fn apply(record: &mut MigrationRecord, runs: &[StageRun], now: Millis) {
    let mut repaired = Vec::new();
    for entry in record
        .repairs
        .iter_mut()
        .filter(|r| r.result == RepairResult::Running)
    {
        let mine: Vec<&StageRun> = runs.iter().filter(|r| r.feature == entry.feature).collect();
        let failure = mine.iter().find_map(|r| match &r.result {
            Err(e) => Some(format!("{}: {e}", r.stage)),
            Ok(_) => None,
        });
        // Verify is asked of every feature, and skipped by the host for
        // drivers that have no check.
        let all_ran = entry
            .stages
            .iter()
            .filter(|s| **s != Stage::Verify)
            .all(|s| mine.iter().any(|r| r.stage == *s && r.result.is_ok()));
        // The history says what ran.
        if !mine.iter().any(|r| r.stage == Stage::Verify) {
            entry.stages.retain(|s| *s != Stage::Verify);
        }
        (entry.result, entry.error) = match failure {
            Some(e) => (RepairResult::Failed, Some(e)),
            None if all_ran => (RepairResult::Ok, None),
            None => (
                RepairResult::Failed,
                Some(format!("{} did not run every stage asked", entry.host)),
            ),
        };
        repaired.push(entry.feature.clone());
    }
    for run in runs {
        let Some(feature) = record.feature_mut(&run.feature) else {
            continue;
        };
        match &run.result {
            Ok(_) => feature.set_stage(run.stage, StepStatus::Ok),
            Err(e) => {
                feature.set_stage(run.stage, StepStatus::Failed);
                feature.error = Some(format!("{}: {e}", run.stage));
            }
        }
    }
    // A feature repaired whole has no error left to show.
    for feature in record.features.iter_mut() {
        if repaired.contains(&feature.name) && failed_stages(feature).is_empty() {
            feature.error = None;
        }
    }
    // The record's error was a repaired feature's (how a degraded record
    // is written): it follows the features now.
    let feature_error = record.error.as_deref().is_none_or(|e| {
        repaired
            .iter()
            .any(|name| e.starts_with(&format!("{name} ")))
    });
    if feature_error {
        record.error = record
            .features
            .iter()
            .filter(|f| !failed_stages(f).is_empty())
            .find_map(|f| f.error.as_ref().map(|e| format!("{} {e}", f.name)));
        if record.error.is_none() && !record.has_failed_feature_stage() {
            record.outcome = Some(Outcome::Succeeded);
        }
    }
    record.updated_at_ms = now;
}

/// The host the VM runs on could not run the stages (unreachable, or it
/// refused): every running entry failed with `error`; the features' stages
/// stay as they were.
pub fn fail(record: &mut MigrationRecord, error: &str, now: Millis) {
    for entry in record
        .repairs
        .iter_mut()
        .filter(|r| r.result == RepairResult::Running)
    {
        entry.result = RepairResult::Failed;
        entry.error = Some(error.to_string());
    }
    record.updated_at_ms = now;
}

/// Recovery: a repair journaled as running when the agent stopped never
/// heard its answer.
pub fn interrupt(record: &mut MigrationRecord) -> bool {
    let mut any = false;
    for entry in record
        .repairs
        .iter_mut()
        .filter(|r| r.result == RepairResult::Running)
    {
        entry.result = RepairResult::Interrupted;
        entry.error = Some(format!(
            "the agent stopped before {} answered; the stages may have run: repair again",
            entry.host
        ));
        any = true;
    }
    any
}

/// Why the latest repair of `record` did not make it whole: each failed
/// entry of that run (`port-profile finish: ASSOCIATE … rejected`), or
/// the record's own error when the run left nothing failed.
pub fn latest_failures(record: &MigrationRecord) -> Vec<String> {
    let Some(at) = record.repairs.last().map(|r| r.at_ms) else {
        return Vec::new();
    };
    record
        .repairs
        .iter()
        .filter(|r| r.at_ms == at)
        .filter_map(|r| r.error.as_ref().map(|e| format!("{} {e}", r.feature)))
        .collect()
}

/// One line for an operator: `port-profile finish on hv-b: ok · by ana (operator)`.
pub fn describe(entry: &RepairEntry) -> String {
    let stages: Vec<&str> = entry.stages.iter().map(|s| s.as_str()).collect();
    let mut line = format!(
        "{} {} on {}: {}",
        entry.feature,
        stages.join("+"),
        entry.host,
        entry.result.as_str()
    );
    if let Some(e) = &entry.error {
        line.push_str(&format!(" — {e}"));
    }
    line.push_str(&format!(" · by {}", entry.who));
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::record::PhaseRecord;
    use crate::protocol::{Mode, Phase};

    fn degraded() -> MigrationRecord {
        let mut pp = FeatureRecord::new("port-profile", true);
        pp.prepare = StepStatus::Ok;
        pp.finish = StepStatus::Failed;
        pp.error = Some("finish: ASSOCIATE web-01 rejected".into());
        let mut hook = FeatureRecord::new("hook", false);
        hook.prepare = StepStatus::Ok;
        hook.finish = StepStatus::Ok;
        MigrationRecord {
            id: "m-000000000001".into(),
            vm: "web-01".into(),
            source: "hv-a".into(),
            destination: "hv-b".into(),
            mode: Mode::Fast,
            attempt: 1,
            attempt_id: "m-000000000001.1".into(),
            outcome: Some(Outcome::Degraded),
            running_on: "hv-b".into(),
            error: Some("port-profile finish: ASSOCIATE web-01 rejected".into()),
            committed: true,
            phases: Phase::ALL
                .iter()
                .map(|&phase| PhaseRecord {
                    phase,
                    status: StepStatus::Ok,
                    duration_ms: 1,
                    started_at: None,
                })
                .collect(),
            features: vec![pp, hook],
            transfer: None,
            started_at_ms: 1,
            updated_at_ms: 2,
            cookies: Vec::new(),
            cause: None,
            guest: Default::default(),
            completion: Default::default(),
            convergence: None,
            completion_note: None,
            recovery: None,
            repairs: Vec::new(),
        }
    }

    fn run(feature: &str, stage: Stage, result: Result<&str, &str>) -> StageRun {
        StageRun {
            feature: feature.into(),
            stage,
            result: result.map(str::to_string).map_err(str::to_string),
        }
    }

    #[test]
    fn a_failed_finish_is_re_run_alone_and_a_failed_prepare_with_its_finish() {
        let mut record = degraded();
        let plans = plan(&record, None).unwrap();
        assert_eq!(
            plans,
            vec![FeaturePlan {
                feature: "port-profile".into(),
                stages: vec![Stage::Finish, Stage::Verify]
            }]
        );
        record.features[0].prepare = StepStatus::Failed;
        record.features[0].finish = StepStatus::Skipped;
        assert_eq!(
            plan(&record, Some("port-profile")).unwrap()[0].stages,
            vec![Stage::Prepare, Stage::Finish, Stage::Verify]
        );
        // A verification that failed: the finish again, and its check.
        record.features[0].prepare = StepStatus::Ok;
        record.features[0].finish = StepStatus::Ok;
        record.features[0].verify = StepStatus::Failed;
        assert_eq!(
            plan(&record, None).unwrap()[0].stages,
            vec![Stage::Finish, Stage::Verify]
        );
    }

    #[test]
    fn a_repair_is_refused_for_a_record_not_degraded_an_unknown_feature_or_one_that_did_not_fail() {
        let mut record = degraded();
        let e = plan(&record, Some("disk")).unwrap_err();
        assert!(
            matches!(&e, PlanError::UnknownFeature(m) if m.contains("port-profile, hook")),
            "{e}"
        );
        let e = plan(&record, Some("hook")).unwrap_err();
        assert!(matches!(e, PlanError::NothingFailed(_)), "{e}");
        record.outcome = Some(Outcome::Succeeded);
        let e = plan(&record, None).unwrap_err();
        assert!(
            matches!(&e, PlanError::NotDegraded(m) if m.contains("succeeded")),
            "{e}"
        );
    }

    #[test]
    fn a_second_repair_is_refused_while_one_runs() {
        let mut record = degraded();
        let plans = plan(&record, None).unwrap();
        begin(&mut record, &plans, "ana (operator)", 10);
        assert!(matches!(plan(&record, None), Err(PlanError::Running(_))));
    }

    #[test]
    fn a_repair_whose_stages_succeed_makes_the_record_succeeded_and_keeps_its_history() {
        let mut record = degraded();
        let plans = plan(&record, None).unwrap();
        begin(&mut record, &plans, "ana (operator)", 10);
        assert_eq!(record.repairs[0].result, RepairResult::Running);
        apply(
            &mut record,
            &[run("port-profile", Stage::Finish, Ok("ASSOCIATE ok"))],
            20,
        );
        assert_eq!(record.outcome, Some(Outcome::Succeeded));
        assert_eq!(record.error, None);
        assert_eq!(record.features[0].finish, StepStatus::Ok);
        assert_eq!(record.features[0].error, None);
        let entry = &record.repairs[0];
        assert_eq!(
            (
                entry.result,
                entry.at_ms,
                entry.who.as_str(),
                entry.host.as_str()
            ),
            (RepairResult::Ok, 10, "ana (operator)", "hv-b")
        );
        assert_eq!(
            describe(entry),
            "port-profile finish on hv-b: ok · by ana (operator)"
        );
    }

    #[test]
    fn a_repair_that_fails_again_keeps_the_record_degraded_with_the_drivers_reason() {
        let mut record = degraded();
        let plans = plan(&record, None).unwrap();
        begin(&mut record, &plans, "ana (operator)", 10);
        apply(
            &mut record,
            &[run(
                "port-profile",
                Stage::Finish,
                Err("switch still says no"),
            )],
            20,
        );
        assert_eq!(record.outcome, Some(Outcome::Degraded));
        assert_eq!(record.repairs[0].result, RepairResult::Failed);
        assert_eq!(
            record.repairs[0].error.as_deref(),
            Some("finish: switch still says no")
        );
        assert_eq!(
            record.error.as_deref(),
            Some("port-profile finish: switch still says no")
        );
    }

    #[test]
    fn an_unanswered_repair_fails_and_a_journaled_running_one_is_interrupted_at_recovery() {
        let mut record = degraded();
        let plans = plan(&record, None).unwrap();
        begin(&mut record, &plans, "x", 10);
        let mut crashed = record.clone();
        fail(&mut record, "hv-b unreachable", 20);
        assert_eq!(record.repairs[0].result, RepairResult::Failed);
        assert_eq!(record.features[0].finish, StepStatus::Failed);
        assert_eq!(record.outcome, Some(Outcome::Degraded));
        assert!(interrupt(&mut crashed));
        assert_eq!(crashed.repairs[0].result, RepairResult::Interrupted);
        assert!(!interrupt(&mut crashed), "only running entries change");
    }

    #[test]
    fn a_record_keeps_only_its_newest_repairs() {
        let mut record = degraded();
        for at in 0..(MAX_REPAIRS as u64 + 5) {
            let plans = plan(&record, None).unwrap();
            begin(&mut record, &plans, "x", at);
            fail(&mut record, "no", at);
        }
        assert_eq!(record.repairs.len(), MAX_REPAIRS);
        assert_eq!(record.repairs[0].at_ms, 5, "the oldest went first");
    }

    #[test]
    fn an_old_journal_row_without_repairs_still_loads() {
        let mut value = serde_json::to_value(degraded()).unwrap();
        value.as_object_mut().unwrap().remove("repairs");
        let record: MigrationRecord = serde_json::from_value(value).unwrap();
        assert!(record.repairs.is_empty());
    }
}
