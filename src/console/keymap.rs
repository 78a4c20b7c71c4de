//! Every key the console answers to, declared once. The same table drives
//! the key handler, the hint bar, the help screen and read-only mode (which
//! drops every dangerous action), so they can never disagree (k9s does the
//! same).

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use crate::protocol::Outcome;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Abort,
    Retry,
    RetryElsewhere,
    Rollback,
    Repair,
    MoveBack,
    ToggleMode,
    NewMigration,
    Evacuate,
    Undrain,
    Doctor,
    Evacuations,
    PauseResume,
    CancelEvacuation,
    Filter,
    CommandLine,
    FocusNext,
    FocusPrev,
    Down,
    Up,
    Top,
    Bottom,
    PageDown,
    PageUp,
    Open,
    Back,
    Freeze,
    Mark,
    Help,
    Quit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    pub code: KeyCode,
    pub ctrl: bool,
}

const fn ch(c: char) -> Key {
    Key {
        code: KeyCode::Char(c),
        ctrl: false,
    }
}

const fn ctrl(c: char) -> Key {
    Key {
        code: KeyCode::Char(c),
        ctrl: true,
    }
}

const fn code(code: KeyCode) -> Key {
    Key { code, ctrl: false }
}

/// What the operator is looking at, for the hint bar: it offers the keys
/// that act on what is there (every key works everywhere; one that has
/// nothing to act on says so).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    /// The migrations table, or one migration's detail.
    Migrations,
    /// The hosts table.
    Hosts,
    /// The evacuations view.
    Evacuations,
    /// The VMs or events list.
    Lists,
}

use Context::{Evacuations, Hosts, Lists, Migrations};

/// In the hint bar wherever it is.
const EVERYWHERE: &[Context] = &[Migrations, Hosts, Evacuations, Lists];

pub struct Binding {
    pub keys: &'static [Key],
    /// How the hint bar and help show the keys.
    pub shown: &'static str,
    pub action: Action,
    /// A word for the hint bar (empty: not in the hint bar).
    pub hint: &'static str,
    /// Where the hint bar offers it.
    pub hint_in: &'static [Context],
    pub help: &'static str,
    /// Changes something on an agent: gone in read-only mode.
    pub dangerous: bool,
    /// The outcomes of the migration shown (the selected row, or the
    /// detail's) for which the hint bar offers it; [`ANY`]: whatever is
    /// shown. For the keys that only act on a migration that moved its VM.
    pub offered_for: &'static [Outcome],
}

/// A hint offered whatever migration is shown.
const ANY: &[Outcome] = &[];

pub const KEYMAP: &[Binding] = &[
    Binding {
        keys: &[ch('a')],
        shown: "a",
        action: Action::Abort,
        hint: "abort",
        hint_in: &[Migrations],
        help: "abort the selected (or marked) migrations, after a confirmation",
        dangerous: true,
        offered_for: ANY,
    },
    Binding {
        keys: &[ch('r')],
        shown: "r",
        action: Action::Retry,
        hint: "retry",
        hint_in: &[Migrations],
        help: "retry the selected (or marked) failed migrations on the same host",
        dangerous: true,
        offered_for: ANY,
    },
    Binding {
        keys: &[ch('d')],
        shown: "d",
        action: Action::RetryElsewhere,
        hint: "elsewhere",
        hint_in: &[Migrations],
        help: "retry the selected failed migration on another destination (a picker)",
        dangerous: true,
        offered_for: ANY,
    },
    Binding {
        keys: &[ch('b')],
        shown: "b",
        action: Action::Rollback,
        hint: "rollback",
        hint_in: &[Migrations],
        help: "run the selected migration's pending rollbacks now",
        dangerous: true,
        offered_for: ANY,
    },
    Binding {
        keys: &[ch('R')],
        shown: "R",
        action: Action::Repair,
        hint: "repair",
        hint_in: &[Migrations],
        help: "repair the selected degraded VM: re-run its failed feature stages where it runs",
        dangerous: true,
        offered_for: &[Outcome::Degraded],
    },
    Binding {
        keys: &[ch('B')],
        shown: "B",
        action: Action::MoveBack,
        hint: "move back",
        hint_in: &[Migrations],
        help: "move the selected moved (succeeded or degraded) VM back to where it came from",
        dangerous: true,
        offered_for: &[Outcome::Succeeded, Outcome::Degraded],
    },
    Binding {
        keys: &[ch('m')],
        shown: "m",
        action: Action::ToggleMode,
        hint: "mode",
        hint_in: &[Migrations, Hosts],
        help: "switch the default mode for new actions between fast and safe",
        dangerous: false,
        offered_for: ANY,
    },
    Binding {
        keys: &[ch('n')],
        shown: "n",
        action: Action::NewMigration,
        hint: "new",
        hint_in: &[Migrations, Hosts],
        help: "start a new migration (VM, destination, mode)",
        dangerous: true,
        offered_for: ANY,
    },
    Binding {
        keys: &[ch('e')],
        shown: "e",
        action: Action::Evacuate,
        hint: "evacuate",
        hint_in: &[Hosts],
        help: "evacuate the selected host: mode, concurrency, attempts, hosts to leave out",
        dangerous: true,
        offered_for: ANY,
    },
    Binding {
        keys: &[ch('u')],
        shown: "u",
        action: Action::Undrain,
        hint: "undrain",
        hint_in: &[Hosts, Evacuations],
        help: "let the selected draining host (or the evacuated one) take migrations again",
        dangerous: true,
        offered_for: ANY,
    },
    Binding {
        keys: &[ch('D')],
        shown: "D",
        action: Action::Doctor,
        hint: "doctor",
        hint_in: &[Hosts],
        help: "check the selected host as tern doctor does (QEMU, KVM, disk, journal, certificate, peers, clock): each finding with its fix",
        dangerous: false,
        offered_for: ANY,
    },
    Binding {
        keys: &[ch('E')],
        shown: "E",
        action: Action::Evacuations,
        hint: "evacuations",
        hint_in: &[Migrations, Hosts, Lists],
        help: "the evacuations: progress, every VM's attempts, why one waits or failed",
        dangerous: false,
        offered_for: ANY,
    },
    Binding {
        keys: &[ch('p')],
        shown: "p",
        action: Action::PauseResume,
        hint: "pause/resume",
        hint_in: &[Evacuations],
        help: "pause the selected evacuation, or resume it (attempts in flight go on)",
        dangerous: true,
        offered_for: ANY,
    },
    Binding {
        keys: &[ch('c')],
        shown: "c",
        action: Action::CancelEvacuation,
        hint: "cancel",
        hint_in: &[Evacuations],
        help: "cancel the selected evacuation: let attempts in flight finish, or abort them",
        dangerous: true,
        offered_for: ANY,
    },
    Binding {
        keys: &[ch('/')],
        shown: "/",
        action: Action::Filter,
        hint: "filter",
        hint_in: &[Migrations],
        help: "filter rows: text, or field:value (state:failed host:hv-b vm:web mode:safe)",
        dangerous: false,
        offered_for: ANY,
    },
    Binding {
        keys: &[ch(':')],
        shown: ":",
        action: Action::CommandLine,
        hint: "",
        hint_in: EVERYWHERE,
        help: "a command: :hosts :migrations :vms :events :evacuations :theme NAME :q",
        dangerous: false,
        offered_for: ANY,
    },
    Binding {
        keys: &[code(KeyCode::Tab)],
        shown: "tab",
        action: Action::FocusNext,
        hint: "",
        hint_in: EVERYWHERE,
        help: "focus the next panel",
        dangerous: false,
        offered_for: ANY,
    },
    Binding {
        keys: &[code(KeyCode::BackTab)],
        shown: "shift-tab",
        action: Action::FocusPrev,
        hint: "",
        hint_in: EVERYWHERE,
        help: "focus the previous panel",
        dangerous: false,
        offered_for: ANY,
    },
    Binding {
        keys: &[ch('j'), code(KeyCode::Down)],
        shown: "j/↓",
        action: Action::Down,
        hint: "",
        hint_in: EVERYWHERE,
        help: "down",
        dangerous: false,
        offered_for: ANY,
    },
    Binding {
        keys: &[ch('k'), code(KeyCode::Up)],
        shown: "k/↑",
        action: Action::Up,
        hint: "",
        hint_in: EVERYWHERE,
        help: "up",
        dangerous: false,
        offered_for: ANY,
    },
    Binding {
        keys: &[ch('g'), code(KeyCode::Home)],
        shown: "g",
        action: Action::Top,
        hint: "",
        hint_in: EVERYWHERE,
        help: "first row",
        dangerous: false,
        offered_for: ANY,
    },
    Binding {
        keys: &[ch('G'), code(KeyCode::End)],
        shown: "G",
        action: Action::Bottom,
        hint: "",
        hint_in: EVERYWHERE,
        help: "last row",
        dangerous: false,
        offered_for: ANY,
    },
    Binding {
        keys: &[ctrl('d'), code(KeyCode::PageDown)],
        shown: "ctrl-d",
        action: Action::PageDown,
        hint: "",
        hint_in: EVERYWHERE,
        help: "half a page down",
        dangerous: false,
        offered_for: ANY,
    },
    Binding {
        keys: &[ctrl('u'), code(KeyCode::PageUp)],
        shown: "ctrl-u",
        action: Action::PageUp,
        hint: "",
        hint_in: EVERYWHERE,
        help: "half a page up",
        dangerous: false,
        offered_for: ANY,
    },
    Binding {
        keys: &[code(KeyCode::Enter)],
        shown: "enter",
        action: Action::Open,
        hint: "open",
        hint_in: &[Migrations, Evacuations],
        help: "open the selected migration (in evacuations: the selected VM's)",
        dangerous: false,
        offered_for: ANY,
    },
    Binding {
        keys: &[code(KeyCode::Esc)],
        shown: "esc",
        action: Action::Back,
        hint: "back",
        hint_in: &[Evacuations, Lists],
        help: "back (never quits)",
        dangerous: false,
        offered_for: ANY,
    },
    Binding {
        keys: &[ch('f')],
        shown: "f",
        action: Action::Freeze,
        hint: "freeze",
        hint_in: EVERYWHERE,
        help: "freeze the live view (agents keep running; unfreeze to catch up)",
        dangerous: false,
        offered_for: ANY,
    },
    Binding {
        keys: &[ch(' ')],
        shown: "space",
        action: Action::Mark,
        hint: "mark",
        hint_in: &[Migrations],
        help: "mark the row for a bulk abort or retry",
        dangerous: false,
        offered_for: ANY,
    },
    Binding {
        keys: &[ch('?')],
        shown: "?",
        action: Action::Help,
        hint: "help",
        hint_in: EVERYWHERE,
        help: "this help",
        dangerous: false,
        offered_for: ANY,
    },
    Binding {
        keys: &[ch('q')],
        shown: "q",
        action: Action::Quit,
        hint: "quit",
        hint_in: EVERYWHERE,
        help: "quit the console (agents keep running)",
        dangerous: false,
        offered_for: ANY,
    },
];

/// The action a key press asks for; dangerous ones are gone in read-only mode.
pub fn action_for(key: KeyEvent, read_only: bool) -> Option<Action> {
    let pressed = Key {
        code: key.code,
        ctrl: key.modifiers.contains(KeyModifiers::CONTROL),
    };
    KEYMAP
        .iter()
        .filter(|b| !(read_only && b.dangerous))
        .find(|b| b.keys.contains(&pressed))
        .map(|b| b.action)
}

/// The bindings the hint bar offers in `context`, in table order, with
/// `shown` the outcome of the migration on screen (`None` while it runs,
/// or when none is).
pub fn hints(
    read_only: bool,
    context: Context,
    shown: Option<Outcome>,
) -> impl Iterator<Item = &'static Binding> {
    KEYMAP.iter().filter(move |b| {
        !(b.hint.is_empty() || read_only && b.dangerous)
            && b.hint_in.contains(&context)
            && (b.offered_for.is_empty() || shown.is_some_and(|o| b.offered_for.contains(&o)))
    })
}

/// Every binding, for the help screen.
pub fn help(read_only: bool) -> impl Iterator<Item = &'static Binding> {
    KEYMAP.iter().filter(move |b| !(read_only && b.dangerous))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(c: char) -> KeyEvent {
        KeyEvent::new(KeyCode::Char(c), KeyModifiers::NONE)
    }

    #[test]
    fn no_key_is_bound_twice() {
        let mut seen = Vec::new();
        for b in KEYMAP {
            for k in b.keys {
                assert!(!seen.contains(k), "{k:?} is bound twice");
                seen.push(*k);
            }
        }
    }

    #[test]
    fn read_only_mode_drops_every_dangerous_action_from_keys_hints_and_help() {
        for b in KEYMAP.iter().filter(|b| b.dangerous) {
            for k in b.keys {
                let event = KeyEvent::new(
                    k.code,
                    if k.ctrl {
                        KeyModifiers::CONTROL
                    } else {
                        KeyModifiers::NONE
                    },
                );
                assert_eq!(action_for(event, false), Some(b.action));
                assert_eq!(action_for(event, true), None, "{:?}", b.action);
            }
            for context in EVERYWHERE {
                assert!(
                    !hints(true, *context, Some(Outcome::Degraded)).any(|h| h.action == b.action)
                );
            }
            assert!(!help(true).any(|h| h.action == b.action));
        }
        assert_eq!(action_for(key('q'), true), Some(Action::Quit));
        assert_eq!(action_for(key('?'), true), Some(Action::Help));
    }

    #[test]
    fn repair_and_move_back_are_offered_only_for_a_migration_they_act_on() {
        let offered = |shown| {
            hints(false, Migrations, shown)
                .map(|b| b.action)
                .collect::<Vec<_>>()
        };
        let degraded = offered(Some(Outcome::Degraded));
        assert!(degraded.contains(&Action::Repair) && degraded.contains(&Action::MoveBack));
        let succeeded = offered(Some(Outcome::Succeeded));
        assert!(!succeeded.contains(&Action::Repair) && succeeded.contains(&Action::MoveBack));
        for shown in [None, Some(Outcome::Failed), Some(Outcome::Aborted)] {
            let other = offered(shown);
            assert!(!other.contains(&Action::Repair) && !other.contains(&Action::MoveBack));
            // The keys themselves still answer (and say why they cannot act).
        }
        assert_eq!(action_for(key('R'), false), Some(Action::Repair));
        assert_eq!(action_for(key('B'), false), Some(Action::MoveBack));
    }

    #[test]
    fn ctrl_d_pages_down_and_d_retries_elsewhere() {
        assert_eq!(
            action_for(
                KeyEvent::new(KeyCode::Char('d'), KeyModifiers::CONTROL),
                false
            ),
            Some(Action::PageDown)
        );
        assert_eq!(action_for(key('d'), false), Some(Action::RetryElsewhere));
    }

    #[test]
    fn every_key_with_a_hint_is_offered_somewhere_and_help_and_quit_everywhere() {
        for b in KEYMAP.iter().filter(|b| !b.hint.is_empty()) {
            assert!(!b.hint_in.is_empty(), "{:?} is never offered", b.action);
        }
        for context in EVERYWHERE {
            let offered: Vec<Action> = hints(false, *context, None).map(|b| b.action).collect();
            assert!(offered.contains(&Action::Help) && offered.contains(&Action::Quit));
        }
        let evacuations: Vec<Action> = hints(false, Evacuations, None).map(|b| b.action).collect();
        assert!(evacuations.contains(&Action::PauseResume));
        assert!(evacuations.contains(&Action::CancelEvacuation));
        let hosts: Vec<Action> = hints(false, Hosts, None).map(|b| b.action).collect();
        assert!(hosts.contains(&Action::Evacuate) && hosts.contains(&Action::Undrain));
    }
}
