//! The recovery table: what an agent does, on restart, with each attempt its
//! journal left open. The state machines carry the plans out
//! ([`super::source::SourceAttempt::recover`],
//! [`super::destination::DestinationAttempt::recover`]).
//!
//! | side        | journaled state              | recovery                                                    |
//! |-------------|------------------------------|-------------------------------------------------------------|
//! | source      | begun (Prepare outstanding)  | forget; unlock the VM; tell the destination to abort        |
//! | source      | prepared / transferring      | cancel the transfer, resume the guest, tell the destination |
//! | source      | Finish sent / unresolved     | Resolve with the destination; until then `unresolved`       |
//! | source      | confirming                   | finish Confirm (kill or resume as journaled)                |
//! | destination | preparing / prepared         | kill the incoming guest, roll back the prepared features    |
//! | destination | finishing (not committed)    | the same: without `committed` in the journal it never ran   |
//! | destination | rolling back                 | finish the rollback                                         |
//! | destination | committed                    | keep the guest running                                      |
//! | either      | pending rollbacks            | retry them (the agent, with backoff)                        |

use super::destination::DestinationState;
use super::source::SourceState;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceRecovery {
    /// Nothing was paused or transferred: end the attempt, unlock the VM, and
    /// tell the destination to drop whatever it prepared.
    Forget,
    /// Cancel the transfer, resume the guest here, tell the destination.
    CancelAndResume,
    /// Finish may have reached the destination: ask it (Resolve) and never
    /// resume on our own.
    Resolve,
    /// Redo Confirm as journaled.
    FinishConfirm,
    Nothing,
}

pub fn source_recovery(state: &SourceState) -> SourceRecovery {
    match state {
        SourceState::Preparing => SourceRecovery::Forget,
        // Never switched: the guest still runs here (or can again).
        SourceState::Transferring { .. }
        | SourceState::SwitchRequested { .. }
        | SourceState::Aborting { .. } => SourceRecovery::CancelAndResume,
        // Switching may have switched: only the destination can say.
        SourceState::Switching | SourceState::FinishSent | SourceState::Unresolved => {
            SourceRecovery::Resolve
        }
        SourceState::Confirming { .. } => SourceRecovery::FinishConfirm,
        SourceState::Done => SourceRecovery::Nothing,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestinationRecovery {
    /// Kill the incoming guest and roll back every feature whose stage
    /// succeeded or was in flight; tell the source.
    KillAndRollBack,
    /// Post-copy, ready for the switchover: ask the hypervisor whether it
    /// arrived (commit) or the transfer ended without it (roll back). Never
    /// killed blindly: the source may have switched over.
    AwaitSwitchover,
    /// Carry on rolling back what is not rolled back yet.
    ContinueRollback,
    /// Committed: make sure the guest runs.
    KeepRunning,
    Nothing,
}

pub fn destination_recovery(state: &DestinationState) -> DestinationRecovery {
    match state {
        DestinationState::Starting
        | DestinationState::Preparing { .. }
        | DestinationState::Prepared
        | DestinationState::Finishing { .. } => DestinationRecovery::KillAndRollBack,
        DestinationState::SwitchoverReady => DestinationRecovery::AwaitSwitchover,
        DestinationState::RollingBack { .. } => DestinationRecovery::ContinueRollback,
        DestinationState::Committed => DestinationRecovery::KeepRunning,
        DestinationState::RolledBack => DestinationRecovery::Nothing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Outcome;

    #[test]
    fn source_after_finish_sent_resolves_and_never_resumes_on_its_own() {
        assert_eq!(
            source_recovery(&SourceState::FinishSent),
            SourceRecovery::Resolve
        );
        assert_eq!(
            source_recovery(&SourceState::Unresolved),
            SourceRecovery::Resolve
        );
    }

    #[test]
    fn source_before_finish_resumes_or_forgets() {
        assert_eq!(
            source_recovery(&SourceState::Preparing),
            SourceRecovery::Forget
        );
        assert_eq!(
            source_recovery(&SourceState::Transferring {
                address: "sim://x".into()
            }),
            SourceRecovery::CancelAndResume
        );
        assert_eq!(
            source_recovery(&SourceState::Aborting {
                outcome: Outcome::Aborted,
                step: crate::protocol::source::AbortStep::Resuming,
            }),
            SourceRecovery::CancelAndResume
        );
    }

    #[test]
    fn source_confirm_is_redone() {
        assert_eq!(
            source_recovery(&SourceState::Confirming {
                committed: true,
                step: crate::protocol::source::ConfirmStep::Releasing,
            }),
            SourceRecovery::FinishConfirm
        );
        assert_eq!(source_recovery(&SourceState::Done), SourceRecovery::Nothing);
    }

    #[test]
    fn destination_without_commit_in_journal_rolls_back() {
        for state in [
            DestinationState::Starting,
            DestinationState::Preparing { next: 0 },
            DestinationState::Prepared,
            DestinationState::Finishing { next: 1 },
        ] {
            assert_eq!(
                destination_recovery(&state),
                DestinationRecovery::KillAndRollBack,
                "{state:?}"
            );
        }
    }

    #[test]
    fn destination_committed_keeps_running() {
        assert_eq!(
            destination_recovery(&DestinationState::Committed),
            DestinationRecovery::KeepRunning
        );
        assert_eq!(
            destination_recovery(&DestinationState::RolledBack),
            DestinationRecovery::Nothing
        );
    }
}
