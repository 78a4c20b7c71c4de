//! The client side of the command line: `migrate`, `abort`, `retry`,
//! `rollback`, `resolve`, `status` and `watch` talk to the agents named in the
//! inventory over the Console gRPC service and print what they answer.
//!
//! This module owns the exit codes and how a gRPC status becomes one; `main`
//! only parses arguments and calls in here.
//!
//! - [`client`]: the inventory, connections to agents, finding a VM or a migration
//! - [`commands`]: the commands that act on one migration
//! - [`status`]: `tern status` and the JSON form of hosts and VMs
//! - [`watch`]: `tern watch`, the merged event stream of every agent
//! - [`logs`]: `tern logs`, a migration's lines from its hosts' own logs
//! - [`manual`]: `tern completions` and `tern man`, made from the clap definition
//! - [`output`]: human-readable rendering
//! - [`sanitize`]: text from agents made safe for a terminal

pub mod audit;
pub mod check;
pub mod client;
pub mod commands;
pub mod doctor;
pub mod evacuate;
pub mod logs;
pub mod manual;
pub mod output;
pub mod sanitize;
pub mod status;
pub mod watch;

use std::fmt;

use tonic::Code;

use crate::protocol::Outcome;

pub use client::{Access, Cluster};
pub use commands::{Report, abort, fault, forget, migrate, repair, resolve, retry, rollback};
pub use status::status;
pub use watch::watch;

/// Process exit codes. `migrate` and `retry` exit with their outcome's code;
/// the other commands exit 0 when they did what was asked. 64 and 69 are the
/// BSD `sysexits.h` codes `EX_USAGE` and `EX_UNAVAILABLE`.
pub mod exit {
    /// The migration succeeded, or the command did what was asked.
    pub const SUCCEEDED: u8 = 0;
    /// The migration failed or was aborted; the VM runs on the source. Also:
    /// rollbacks are still pending, or an agent reported an internal error.
    pub const FAILED: u8 = 1;
    /// The VM moved, but a non-required feature failed on the destination.
    pub const DEGRADED: u8 = 2;
    /// The source cannot yet learn whether the destination committed.
    pub const UNRESOLVED: u8 = 3;
    /// Bad usage or input: an unknown VM, host or migration, a refused
    /// request (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition,
    /// OutOfRange), or a bad inventory or identity.
    pub const USAGE: u8 = 64;
    /// The identity may not do this: the agent answered PermissionDenied
    /// (`EX_NOPERM`).
    pub const NOPERM: u8 = 77;
    /// An agent could not be reached or did not answer in time.
    pub const UNAVAILABLE: u8 = 69;
    /// The operator pressed Ctrl-C while the CLI waited (128 + SIGINT).
    pub const INTERRUPTED: u8 = 130;
}

/// A command that could not do what was asked: the message for the operator
/// (printed as `tern: <message>`) and the exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError {
    pub code: u8,
    pub message: String,
}

impl CliError {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        CliError {
            code,
            message: message.into(),
        }
    }

    pub fn usage(message: impl Into<String>) -> Self {
        CliError::new(exit::USAGE, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        CliError::new(exit::UNAVAILABLE, message)
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CliError {}

/// What a command returns: the exit code when it ran to the end.
pub type CliResult = Result<u8, CliError>;

/// The exit code of `migrate` and `retry` for a finished migration.
pub fn exit_code_for_outcome(outcome: Outcome) -> u8 {
    match outcome {
        Outcome::Succeeded => exit::SUCCEEDED,
        Outcome::Degraded => exit::DEGRADED,
        Outcome::Failed | Outcome::Aborted | Outcome::Lost => exit::FAILED,
        Outcome::Unresolved => exit::UNRESOLVED,
    }
}

/// The exit code for a gRPC status an agent answered with.
pub fn exit_code_for_status(code: Code) -> u8 {
    match code {
        Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::FailedPrecondition
        | Code::OutOfRange => exit::USAGE,
        Code::PermissionDenied | Code::Unauthenticated => exit::NOPERM,
        // A cancelled call is one whose connection went away under it.
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => exit::UNAVAILABLE,
        _ => exit::FAILED,
    }
}

/// An id the operator typed, checked by the rule agents check it by, so a
/// typo is bad usage before any agent is asked.
pub fn check_id(
    what: &str,
    id: &str,
    kind: crate::protocol::bounds::IdKind,
) -> Result<(), CliError> {
    crate::protocol::bounds::check_id(what, id, kind).map_err(|e| CliError::usage(e.to_string()))
}

/// The error chain of `err`, outermost first, joined with ": " (tonic's
/// transport errors say only "transport error" at the top).
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    with_causes(err.to_string(), err.source())
}

/// `text` followed by every error in the chain from `cause` that it does not
/// already say (wrappers often repeat their source's message).
pub(crate) fn with_causes(text: String, mut cause: Option<&dyn std::error::Error>) -> String {
    let mut out = text;
    while let Some(e) = cause {
        let part = e.to_string();
        if !out.contains(&part) {
            out.push_str(": ");
            out.push_str(&part);
        }
        cause = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_map_to_the_documented_exit_codes() {
        assert_eq!(exit_code_for_outcome(Outcome::Succeeded), 0);
        assert_eq!(exit_code_for_outcome(Outcome::Degraded), 2);
        assert_eq!(exit_code_for_outcome(Outcome::Failed), 1);
        assert_eq!(exit_code_for_outcome(Outcome::Aborted), 1);
        assert_eq!(exit_code_for_outcome(Outcome::Unresolved), 3);
    }

    #[test]
    fn refusals_by_an_agent_are_bad_usage() {
        for code in [
            Code::InvalidArgument,
            Code::NotFound,
            Code::AlreadyExists,
            Code::FailedPrecondition,
        ] {
            assert_eq!(exit_code_for_status(code), 64, "{code:?}");
        }
    }

    #[test]
    fn a_request_the_identity_may_not_make_exits_77() {
        assert_eq!(exit_code_for_status(Code::PermissionDenied), exit::NOPERM);
        assert_eq!(exit_code_for_status(Code::Unauthenticated), 77);
    }

    #[test]
    fn unreachable_or_slow_agents_exit_69() {
        for code in [Code::Unavailable, Code::DeadlineExceeded, Code::Cancelled] {
            assert_eq!(exit_code_for_status(code), 69, "{code:?}");
        }
    }

    #[test]
    fn internal_agent_errors_exit_1() {
        for code in [
            Code::Internal,
            Code::Unknown,
            Code::Unimplemented,
            Code::DataLoss,
        ] {
            assert_eq!(exit_code_for_status(code), 1, "{code:?}");
        }
    }

    #[test]
    fn error_chain_joins_sources_without_repeating_them() {
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl fmt::Display for Outer {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("transport error")
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let err = Outer(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connection refused",
        ));
        assert_eq!(error_chain(&err), "transport error: connection refused");
    }

    #[test]
    fn causes_a_message_already_repeats_are_not_repeated() {
        let cause = std::io::Error::other("error reading a body from connection");
        let text = with_causes(
            "h2 protocol error: error reading a body from connection".into(),
            Some(&cause),
        );
        assert_eq!(
            text,
            "h2 protocol error: error reading a body from connection"
        );
    }
}
