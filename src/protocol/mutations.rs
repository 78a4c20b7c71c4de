//! Known mistakes that can be planted in the protocol core and the host core,
//! to prove that the simulator catches them (`--features mutations`; see
//! `src/simulation/`).
//!
//! Without the feature, [`planted`] is a constant `false` and every planted
//! branch compiles away. With it, a mistake is planted per thread, so one
//! test can run a mutated simulation while others run the real protocol.

/// A mistake the simulator must be able to catch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutation {
    /// Rollback undoes one feature too few (the first one initialised):
    /// libvirt's old off-by-one.
    RollbackOneTooFew,
    /// The source resumes its guest when Finish got no answer, instead of
    /// becoming unresolved and asking Resolve.
    ResumeOnUnknownOutcome,
    /// The destination answers Resolve "not committed" without journaling
    /// the decision, and may still commit afterwards.
    CommitAfterNotCommitted,
    /// Neither side acts on a lost peer: no peer timeout.
    IgnoreLostPeer,
    /// The host core takes a failed resume of a committed guest for a
    /// success (the agent once only logged it).
    IgnoreFailedResume,
    /// The host core answers Finish "committed" as soon as the commit is
    /// journaled, before the hypervisor says the guest's CPUs run.
    ReplyCommittedBeforeResume,
    /// The host core lets a decision leave the host (a reply, a call, a
    /// resume) before the journal write that records it is durable.
    ReplyBeforeDurable,
    /// The source transfers the guest to whatever address C2 names, not
    /// only to the destination's own migration address.
    AcceptAnyIncomingAddress,
    /// The source takes the switch to post-copy for one that failed, and
    /// resumes its copy after the switchover.
    ResumeAfterSwitchover,
    /// The source reads C4's finish results but not its verifications, so
    /// a move whose network did not come along reads "succeeded".
    IgnoreVerification,
}

impl Mutation {
    pub const ALL: [Mutation; 10] = [
        Mutation::RollbackOneTooFew,
        Mutation::ResumeOnUnknownOutcome,
        Mutation::CommitAfterNotCommitted,
        Mutation::IgnoreLostPeer,
        Mutation::IgnoreFailedResume,
        Mutation::ReplyCommittedBeforeResume,
        Mutation::ReplyBeforeDurable,
        Mutation::AcceptAnyIncomingAddress,
        Mutation::ResumeAfterSwitchover,
        Mutation::IgnoreVerification,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mutation::RollbackOneTooFew => "rollback-one-too-few",
            Mutation::ResumeOnUnknownOutcome => "resume-on-unknown-outcome",
            Mutation::CommitAfterNotCommitted => "commit-after-not-committed",
            Mutation::IgnoreLostPeer => "ignore-lost-peer",
            Mutation::IgnoreFailedResume => "ignore-failed-resume",
            Mutation::ReplyCommittedBeforeResume => "reply-committed-before-resume",
            Mutation::ReplyBeforeDurable => "reply-before-durable",
            Mutation::AcceptAnyIncomingAddress => "accept-any-incoming-address",
            Mutation::ResumeAfterSwitchover => "resume-after-switchover",
            Mutation::IgnoreVerification => "ignore-verification",
        }
    }

    pub fn parse(name: &str) -> Option<Mutation> {
        Mutation::ALL.into_iter().find(|m| m.name() == name)
    }
}

#[cfg(feature = "mutations")]
thread_local! {
    static PLANTED: std::cell::Cell<Option<Mutation>> = const { std::cell::Cell::new(None) };
}

/// Plant `mutation` (or none) in the protocol code run by this thread.
#[cfg(feature = "mutations")]
pub fn plant(mutation: Option<Mutation>) {
    PLANTED.with(|p| p.set(mutation));
}

/// Whether `mutation` is planted in this thread.
#[cfg(feature = "mutations")]
pub fn planted(mutation: Mutation) -> bool {
    PLANTED.with(|p| p.get()) == Some(mutation)
}

#[cfg(not(feature = "mutations"))]
#[inline(always)]
pub fn planted(_mutation: Mutation) -> bool {
    false
}
