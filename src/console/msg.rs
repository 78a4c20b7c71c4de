//! What flows into the console's `update` (messages) and out of it
//! (commands): the only contract between the agent clients, the pure state
//! and the terminal loop.

use ratatui::crossterm::event::KeyEvent;

use crate::proto;
use crate::protocol::Mode;

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
    },
    Quit,
}

impl Command {
    /// How the event log names it.
    pub fn describe(&self) -> String {
        match self {
            Command::Abort { id, .. } => format!("abort {id}"),
            Command::Retry {
                id,
                destination,
                mode,
                ..
            } => match destination {
                Some(d) => format!("retry {id} on {d} ({})", mode.as_str()),
                None => format!("retry {id} ({})", mode.as_str()),
            },
            Command::Rollback { id, host } => format!("rollback {id} on {host}"),
            Command::Start {
                vm,
                destination,
                mode,
                ..
            } => format!("migrate {vm} to {destination} ({})", mode.as_str()),
            Command::Quit => "quit".into(),
        }
    }
}
