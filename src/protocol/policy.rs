//! The two rules every feature stage is judged by: whether its failure blocks
//! the attempt, and which features a rollback must undo.

use super::mutations::{Mutation, planted};
use super::{Millis, Mode, StepStatus};
use crate::protocol::record::FeatureRecord;

/// A stage is blocking when the mode is safe and the feature is required.
/// Fast mode blocks on nothing.
pub fn is_blocking(mode: Mode, required: bool) -> bool {
    mode == Mode::Safe && required
}

/// The features a rollback must undo: exactly those with a stage that
/// succeeded, in reverse order of initialisation (features initialise in spec
/// order). A stage whose effect is unknown also counts, since stages are
/// idempotent and undoing it is the only safe choice: one that did not answer
/// within its deadline (`uncertain`), and, with `include_in_flight`, one that
/// was running when the agent died.
pub fn rollback_set(features: &[FeatureRecord], include_in_flight: bool) -> Vec<usize> {
    let counts =
        |s: StepStatus| s == StepStatus::Ok || (include_in_flight && s == StepStatus::Running);
    (0..features.len())
        .rev()
        .filter(|&i| {
            counts(features[i].prepare) || counts(features[i].finish) || features[i].uncertain
        })
        .filter(|&i| features[i].rollback != StepStatus::Ok)
        .collect::<Vec<_>>()
        .into_iter()
        .filter(|&i| !(planted(Mutation::RollbackOneTooFew) && i == 0))
        .collect()
}

/// The longest wait between two automatic retries of a pending rollback.
pub const MAX_RETRY_BACKOFF_MS: Millis = 5 * 60 * 1000;

/// How long to wait before retrying a pending rollback that has failed
/// `tries` times: doubling from `base`, capped at five minutes.
pub fn retry_backoff(base: Millis, tries: u32) -> Millis {
    base.saturating_mul(1 << tries.min(16))
        .min(MAX_RETRY_BACKOFF_MS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feature(prepare: StepStatus, finish: StepStatus) -> FeatureRecord {
        let mut f = FeatureRecord::new("f", true);
        f.prepare = prepare;
        f.finish = finish;
        f
    }

    #[test]
    fn only_safe_and_required_blocks() {
        assert!(is_blocking(Mode::Safe, true));
        assert!(!is_blocking(Mode::Safe, false));
        assert!(!is_blocking(Mode::Fast, true));
        assert!(!is_blocking(Mode::Fast, false));
    }

    #[test]
    fn rollback_set_is_succeeded_features_in_reverse_order() {
        use StepStatus::*;
        let features = vec![
            feature(Ok, Ok),
            feature(Failed, Skipped),
            feature(Ok, Failed),
            feature(Ok, Pending),
        ];
        assert_eq!(rollback_set(&features, false), vec![3, 2, 0]);
    }

    #[test]
    fn rollback_set_skips_features_whose_prepare_failed() {
        use StepStatus::*;
        let features = vec![feature(Failed, Skipped)];
        assert!(rollback_set(&features, false).is_empty());
    }

    #[test]
    fn in_flight_stage_counts_only_when_recovering() {
        use StepStatus::*;
        let features = vec![feature(Ok, Pending), feature(Running, Pending)];
        assert_eq!(rollback_set(&features, false), vec![0]);
        assert_eq!(rollback_set(&features, true), vec![1, 0]);
    }

    #[test]
    fn a_stage_that_timed_out_is_undone_too() {
        use StepStatus::*;
        let mut timed_out = feature(Failed, Skipped);
        timed_out.uncertain = true;
        assert_eq!(
            rollback_set(
                &[feature(Ok, Ok), timed_out, feature(Failed, Skipped)],
                false
            ),
            vec![1, 0]
        );
    }

    #[test]
    fn features_already_rolled_back_are_not_undone_twice() {
        use StepStatus::*;
        let mut done = feature(Ok, Ok);
        done.rollback = Ok;
        assert_eq!(rollback_set(&[done, feature(Ok, Ok)], false), vec![1]);
    }
}
