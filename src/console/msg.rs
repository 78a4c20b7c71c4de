//! What flows into the console's `update` (messages) and out of it
//! (commands): the only contract between the agent clients, the pure state
//! and the terminal loop.

use ratatui::crossterm::event::KeyEvent;

use crate::proto;
use crate::protocol::Mode;
use crate::protocol::completion::Completion;

/// Something that happened: from an agent, the keyboard or the clock.
// Each message is moved once through a channel: boxing the big variant
// would cost an allocation per agent event for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Msg {
    /// An agent's Watch stream delivered an event (its `host` says whose).
    Event(proto::Event),
    /// The Watch stream to `host` is up (first connect or a reconnect).
    Connected {
        host: String,
    },
    /// The stream to `host` broke or could not be opened. `since_ms` (unix
    /// ms) is when it was last up, or when the console first tried.
    Lost {
        host: String,
        since_ms: u64,
        error: String,
    },
    /// `host`'s stream is open but its agent did not answer a short question
    /// within `deadline_ms`: hung or stopped. `Connected` once it answers.
    Silent {
        host: String,
        since_ms: u64,
        deadline_ms: u64,
    },
    Key(KeyEvent),
    /// The terminal changed size.
    Resize,
    /// Once a second: elapsed times and "lost for N s" move on.
    Tick {
        now_ms: u64,
    },
    /// A command finished: what it was, and the agent's answer or error.
    Done {
        what: String,
        result: Result<String, String>,
    },
    /// The audit entries of a migration an agent keeps (who started,
    /// aborted, retried or forced it).
    Actions(Vec<proto::AuditEntry>),
    /// `source`'s answer to [`Command::Check`]: every admission check of
    /// moving `vm` to `destination` in `mode`, or why there is none.
    Checked {
        source: String,
        vm: String,
        destination: String,
        mode: Mode,
        answer: Result<proto::CheckReply, String>,
    },
    /// `tern doctor HOST`'s findings, the caller's own (reachable, clock)
    /// first.
    Doctor {
        host: String,
        findings: Vec<crate::cli::doctor::Finding>,
    },
    /// Migration `id`'s log lines from its hosts, merged in time order, and
    /// what is missing from them ("hv-b: no answer in 1 s").
    Logs {
        id: String,
        lines: Vec<proto::AttemptLogLine>,
        missing: Vec<String>,
    },
}

/// Something `update` asks to be done: an RPC to an agent, or quitting.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Abort {
        host: String,
        id: String,
    },
    Retry {
        host: String,
        id: String,
        /// `None`: the same destination as the last attempt.
        destination: Option<String>,
        mode: Mode,
        /// The policy the operator confirmed, sent whole.
        completion: Completion,
    },
    Rollback {
        host: String,
        id: String,
    },
    Start {
        host: String,
        vm: String,
        destination: String,
        mode: Mode,
        completion: Completion,
    },
    /// Move every VM off `host`: a job its agent owns.
    Evacuate {
        host: String,
        mode: Mode,
        /// For every VM it moves.
        completion: Completion,
        /// 0: the host's `max_outgoing`.
        concurrency: u32,
        max_attempts: u32,
        exclude: Vec<String>,
    },
    /// Pause, resume or cancel evacuation `id` of `host`.
    ControlEvacuation {
        host: String,
        id: String,
        control: proto::EvacuationControl,
    },
    /// `host` accepts incoming migrations again.
    Undrain {
        host: String,
    },
    /// Re-run the failed feature stages of `vm`'s degraded migration, asking
    /// `host`, which holds its record (the source).
    Repair {
        host: String,
        vm: String,
        /// `None`: every feature with a failed stage.
        feature: Option<String>,
    },
    /// Read who acted on migration `id` from `host`'s audit trail.
    LoadActions {
        host: String,
        id: String,
    },
    /// Ask `host`, where `vm` runs, whether it could move to `destination`
    /// in `mode` (`tern check`): the picker's eligibility.
    Check {
        host: String,
        vm: String,
        destination: String,
        mode: Mode,
    },
    /// Examine `host` as `tern doctor HOST` does.
    Doctor {
        host: String,
    },
    /// Read migration `id`'s lines from the logs of `hosts` (its source
    /// and every destination of its attempts).
    LoadLogs {
        id: String,
        hosts: Vec<String>,
    },
    Quit,
}

impl Command {
    /// Whether carrying it out changes anything on an agent.
    pub fn changes_anything(&self) -> bool {
        !matches!(
            self,
            Command::LoadActions { .. }
                | Command::Check { .. }
                | Command::Doctor { .. }
                | Command::LoadLogs { .. }
                | Command::Quit
        )
    }

    /// How the event log names it.
    pub fn describe(&self) -> String {
        match self {
            Command::Abort { id, .. } => format!("abort {id}"),
            Command::Retry {
                id,
                destination,
                mode,
                completion,
                ..
            } => match destination {
                Some(d) => format!("retry {id} on {d} ({})", policy_text(*mode, completion)),
                None => format!("retry {id} ({})", policy_text(*mode, completion)),
            },
            Command::Rollback { id, host } => format!("rollback {id} on {host}"),
            Command::Start {
                vm,
                destination,
                mode,
                completion,
                ..
            } => format!(
                "migrate {vm} to {destination} ({})",
                policy_text(*mode, completion)
            ),
            Command::Evacuate {
                host,
                mode,
                completion,
                concurrency,
                max_attempts,
                exclude,
            } => {
                let mut line = format!("evacuate {host} ({}", policy_text(*mode, completion));
                if *concurrency > 0 {
                    line.push_str(&format!(", {concurrency} at a time"));
                }
                line.push_str(&format!(", {max_attempts} attempts"));
                if !exclude.is_empty() {
                    line.push_str(&format!(", not to {}", exclude.join(" ")));
                }
                line.push(')');
                line
            }
            Command::ControlEvacuation { id, control, .. } => match control {
                proto::EvacuationControl::Pause => format!("pause evacuation {id}"),
                proto::EvacuationControl::Resume => format!("resume evacuation {id}"),
                proto::EvacuationControl::Cancel => {
                    format!("cancel evacuation {id} (attempts in flight finish)")
                }
                proto::EvacuationControl::CancelAbort => {
                    format!("cancel evacuation {id} (aborting attempts in flight)")
                }
                proto::EvacuationControl::Unspecified => format!("change evacuation {id}"),
            },
            Command::Undrain { host } => format!("undrain {host}"),
            Command::Repair { vm, feature, .. } => match feature {
                Some(f) => format!("repair {vm} ({f})"),
                None => format!("repair {vm}"),
            },
            Command::LoadActions { host, id } => format!("read who acted on {id} from {host}"),
            Command::Check {
                vm,
                destination,
                mode,
                ..
            } => format!("check {vm} to {destination} ({})", mode.as_str()),
            Command::Doctor { host } => format!("doctor {host}"),
            Command::LoadLogs { id, hosts } => {
                format!("read the logs of {id} from {}", hosts.join(", "))
            }
            Command::Quit => "quit".into(),
        }
    }
}

/// A mode and a policy as the console names them: "safe; post-copy never,
/// 150 s/GiB, then abort".
pub fn policy_text(mode: Mode, completion: &Completion) -> String {
    format!("{}; {}", mode.as_str(), completion.describe())
}
