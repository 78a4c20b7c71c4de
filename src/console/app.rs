//! The console's state and `update`: messages and key presses in, commands
//! out. Pure: views draw an [`App`], the terminal loop carries out the
//! [`Command`]s; nothing here does IO.

use std::collections::BTreeSet;

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use super::keymap::{Action, action_for};
use super::msg::{Command, Msg};
use super::state::{ClusterState, Link, LogEntry, MigrationView};
use crate::cli::output::phase_name;
use crate::proto;
use crate::protocol::record::{mode_from_proto, outcome_from_proto, phase_from_proto};
use crate::protocol::{Mode, Outcome};

#[derive(Debug, Clone, PartialEq)]
pub enum View {
    /// Hosts above, migrations below.
    Overview,
    Vms,
    Events,
    /// One migration, by id.
    Detail(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Focus {
    Hosts,
    Migrations,
}

/// A destination offered by the picker, and why it cannot be chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub host: String,
    pub refusal: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Dialog {
    /// A dangerous action waits for `y` (or enter); `m` switches the mode
    /// when the action has one.
    Confirm {
        title: String,
        lines: Vec<String>,
        commands: Vec<Command>,
        mode: Option<Mode>,
    },
    /// Where to retry (or start) a migration: every host, with why not.
    Picker {
        title: String,
        vm: String,
        /// The migration to retry, or `None` for a new one from `from`.
        retry: Option<String>,
        from: String,
        choices: Vec<Choice>,
        selected: usize,
        mode: Mode,
    },
    /// Which VM a new migration moves.
    ChooseVm {
        vms: Vec<(String, String)>,
        selected: usize,
    },
    Help,
    Message(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    Filter,
    Command,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Input {
    pub kind: InputKind,
    pub text: String,
}

pub struct App {
    /// Always current.
    pub live: ClusterState,
    /// What is shown while frozen (`f`).
    pub frozen: Option<ClusterState>,
    pub view: View,
    pub focus: Focus,
    pub host_row: usize,
    pub migration_row: usize,
    pub marked: BTreeSet<String>,
    pub filter: String,
    pub input: Option<Input>,
    pub dialog: Option<Dialog>,
    /// The mode new actions start with.
    pub default_mode: Mode,
    pub read_only: bool,
    pub theme: String,
    /// Where the console logs, for the help screen (read once at start,
    /// not on every frame).
    pub log_path: String,
    /// The last command's result, or a refusal, for the status line.
    pub status: Option<(String, bool)>,
    /// Rows a half page moves (set by the terminal loop from the table height).
    pub page_rows: usize,
    pub quit: bool,
    /// Something changed since the last frame.
    pub dirty: bool,
}

impl App {
    pub fn new(state: ClusterState, read_only: bool, theme: &str) -> App {
        App {
            live: state,
            frozen: None,
            view: View::Overview,
            focus: Focus::Migrations,
            host_row: 0,
            migration_row: 0,
            marked: BTreeSet::new(),
            filter: String::new(),
            input: None,
            dialog: None,
            default_mode: Mode::Safe,
            read_only,
            theme: theme.to_string(),
            log_path: String::new(),
            status: None,
            page_rows: 10,
            quit: false,
            dirty: true,
        }
    }

    /// What the views draw: the frozen copy while frozen.
    pub fn state(&self) -> &ClusterState {
        self.frozen.as_ref().unwrap_or(&self.live)
    }

    /// The migrations table's rows, filtered.
    pub fn rows(&self) -> Vec<&MigrationView> {
        let filter = Filter::parse(&self.filter);
        self.state()
            .ordered_migrations()
            .into_iter()
            .filter(|m| filter.matches(m))
            .collect()
    }

    /// How many rows the migrations table has.
    pub fn row_count(&self) -> usize {
        if self.filter.is_empty() {
            self.state().migrations.len()
        } else {
            self.rows().len()
        }
    }

    /// The rows in `range`: without a filter only those are looked at, so a
    /// frame costs a screenful whatever the number of migrations.
    pub fn rows_in(&self, range: std::ops::Range<usize>) -> Vec<&MigrationView> {
        if self.filter.is_empty() {
            return self
                .state()
                .ordered()
                .skip(range.start)
                .take(range.len())
                .collect();
        }
        let rows = self.rows();
        rows[range.start.min(rows.len())..range.end.min(rows.len())].to_vec()
    }

    pub fn selected_migration(&self) -> Option<&MigrationView> {
        if let View::Detail(id) = &self.view {
            return self.state().migrations.get(id);
        }
        let row = self.migration_row;
        self.rows_in(row..row + 1).into_iter().next()
    }

    pub fn selected_host(&self) -> Option<&str> {
        self.state()
            .hosts
            .get(self.host_row)
            .map(|h| h.name.as_str())
    }

    fn say(&mut self, text: impl Into<String>, error: bool) {
        self.status = Some((text.into(), error));
    }
}

/// Fold one message into the app; what it asks the agents to do comes back.
pub fn update(app: &mut App, msg: Msg) -> Vec<Command> {
    match msg {
        Msg::Event(event) => {
            app.live.apply(event);
            app.dirty |= app.frozen.is_none();
            Vec::new()
        }
        Msg::Connected { host } => {
            app.live.connected(&host);
            app.dirty |= app.frozen.is_none();
            Vec::new()
        }
        Msg::Lost {
            host,
            since_ms,
            error,
        } => {
            app.live.lost(&host, since_ms, &error);
            app.dirty |= app.frozen.is_none();
            Vec::new()
        }
        Msg::Tick { now_ms } => {
            app.live.now_ms = now_ms;
            app.dirty |= app.frozen.is_none();
            Vec::new()
        }
        Msg::Resize => {
            app.dirty = true;
            Vec::new()
        }
        Msg::Done { what, result } => {
            let (text, error) = match result {
                Ok(detail) => (format!("{what}: {detail}"), false),
                Err(e) => (format!("{what} failed: {e}"), true),
            };
            app.live.events.push_back(LogEntry {
                host: "console".into(),
                line: proto::LogLine {
                    at_ms: app.live.now_ms,
                    level: if error { "error" } else { "info" }.into(),
                    migration_id: String::new(),
                    text: text.clone(),
                },
            });
            app.say(text, error);
            app.dirty = true;
            Vec::new()
        }
        Msg::Key(key) => {
            app.dirty = true;
            on_key(app, key)
        }
    }
}

fn on_key(app: &mut App, key: KeyEvent) -> Vec<Command> {
    if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
        app.quit = true;
        return vec![Command::Quit];
    }
    if app.input.is_some() {
        return on_input(app, key);
    }
    if app.dialog.is_some() {
        return on_dialog(app, key);
    }
    let Some(action) = action_for(key, app.read_only) else {
        return Vec::new();
    };
    on_action(app, action)
}

fn on_action(app: &mut App, action: Action) -> Vec<Command> {
    match action {
        Action::Quit => {
            app.quit = true;
            return vec![Command::Quit];
        }
        Action::Help => app.dialog = Some(Dialog::Help),
        Action::Back => match app.view {
            View::Overview => {
                app.marked.clear();
                app.filter.clear();
            }
            _ => app.view = View::Overview,
        },
        Action::Freeze => {
            app.frozen = match app.frozen.take() {
                Some(_) => None,
                None => Some(app.live.clone()),
            };
        }
        Action::ToggleMode => {
            app.default_mode = other_mode(app.default_mode);
            app.say(
                format!("new actions default to {} mode", app.default_mode.as_str()),
                false,
            );
        }
        Action::Filter => {
            app.input = Some(Input {
                kind: InputKind::Filter,
                text: app.filter.clone(),
            })
        }
        Action::CommandLine => {
            app.input = Some(Input {
                kind: InputKind::Command,
                text: String::new(),
            })
        }
        Action::FocusNext | Action::FocusPrev => {
            app.focus = match app.focus {
                Focus::Hosts => Focus::Migrations,
                Focus::Migrations => Focus::Hosts,
            };
            app.view = View::Overview;
        }
        Action::Down => move_by(app, 1),
        Action::Up => move_by(app, -1),
        Action::PageDown => move_by(app, (app.page_rows / 2).max(1) as isize),
        Action::PageUp => move_by(app, -((app.page_rows / 2).max(1) as isize)),
        Action::Top => move_by(app, isize::MIN / 2),
        Action::Bottom => move_by(app, isize::MAX / 2),
        Action::Open => {
            if let Some(m) = app.selected_migration() {
                app.view = View::Detail(m.record.id.clone());
            }
        }
        Action::Mark => {
            if let Some(id) = app.selected_migration().map(|m| m.record.id.clone()) {
                if !app.marked.remove(&id) {
                    app.marked.insert(id);
                }
                move_by(app, 1);
            }
        }
        Action::Abort => abort(app),
        Action::Retry => retry(app),
        Action::RetryElsewhere => pick_destination(app),
        Action::Rollback => rollback(app),
        Action::NewMigration => new_migration(app),
        Action::Evacuate => {
            let host = app.selected_host().unwrap_or("this host").to_string();
            app.dialog = Some(Dialog::Message(format!(
                "Evacuating {host} needs agents that run evacuations as jobs, which come with a later \
                 release. Until then, move its VMs one by one with n (new migration)."
            )));
        }
    }
    Vec::new()
}

fn other_mode(mode: Mode) -> Mode {
    match mode {
        Mode::Fast => Mode::Safe,
        Mode::Safe => Mode::Fast,
    }
}

fn move_by(app: &mut App, delta: isize) {
    let (row, len) = match (&app.view, app.focus) {
        (View::Overview, Focus::Hosts) => (&mut app.host_row, app.live.hosts.len()),
        _ => {
            let len = app.row_count();
            (&mut app.migration_row, len)
        }
    };
    if len == 0 {
        *row = 0;
        return;
    }
    let next = (*row as isize)
        .saturating_add(delta)
        .clamp(0, len as isize - 1);
    *row = next as usize;
}

/// The marked migrations, or else the selected one.
fn targets(app: &App) -> Vec<proto::MigrationRecord> {
    let state = app.state();
    if !app.marked.is_empty() {
        return app
            .marked
            .iter()
            .filter_map(|id| state.migrations.get(id))
            .map(|m| m.record.clone())
            .collect();
    }
    app.selected_migration()
        .map(|m| vec![m.record.clone()])
        .unwrap_or_default()
}

fn outcome(record: &proto::MigrationRecord) -> proto::Outcome {
    proto::Outcome::try_from(record.outcome).unwrap_or(proto::Outcome::None)
}

/// The phase a migration is in (or ended in), lower case.
pub fn current_phase(record: &proto::MigrationRecord) -> &'static str {
    let running = record
        .phases
        .iter()
        .find(|p| p.status == proto::StepStatus::Running as i32)
        .or_else(|| {
            record
                .phases
                .iter()
                .find(|p| p.status == proto::StepStatus::Failed as i32)
        });
    phase_name(phase_from_proto(running.map_or(0, |p| p.phase)))
}

/// A proto record's mode, as the operator reads it (unspecified reads safe,
/// the default).
pub fn mode_of(record: &proto::MigrationRecord) -> &'static str {
    mode_from_proto(record.mode).unwrap_or(Mode::Safe).as_str()
}

fn abort(app: &mut App) {
    let running: Vec<_> = targets(app)
        .into_iter()
        .filter(|r| outcome(r) == proto::Outcome::None)
        .collect();
    if running.is_empty() {
        app.say("nothing to abort: select a running migration", true);
        return;
    }
    let lines = running
        .iter()
        .map(|r| {
            let phase = current_phase(r);
            let what = if r.committed || phase == "confirm" {
                format!("past the commit point: {} will refuse", r.source)
            } else if phase == "finish" {
                "Finish may already be on the destination: the abort may be refused".to_string()
            } else {
                format!(
                    "{} keeps running on {}; {} rolls back",
                    r.vm, r.source, r.destination
                )
            };
            format!(
                "{} {} → {} in {phase}: {what}",
                r.vm, r.source, r.destination
            )
        })
        .collect();
    let commands = running
        .iter()
        .map(|r| Command::Abort {
            host: r.source.clone(),
            id: r.id.clone(),
        })
        .collect();
    app.dialog = Some(Dialog::Confirm {
        title: format!("Abort {} migration(s)?", running.len()),
        lines,
        commands,
        mode: None,
    });
}

/// A retry starts from the migration's source; if the VM has since moved
/// (another migration took it), say so instead of sending a doomed request.
fn moved_since(state: &ClusterState, record: &proto::MigrationRecord) -> Option<String> {
    let now = state.vm_host(&record.vm)?;
    (now != record.source).then(|| {
        format!(
            "{} now runs on {now}, not on {} where {} started: start a new migration (n) instead",
            record.vm, record.source, record.id
        )
    })
}

fn retry(app: &mut App) {
    let failed: Vec<_> = targets(app)
        .into_iter()
        .filter(|r| matches!(outcome(r), proto::Outcome::Failed | proto::Outcome::Aborted))
        .collect();
    if let Some(moved) = failed.iter().find_map(|r| moved_since(app.state(), r)) {
        app.say(moved, true);
        return;
    }
    if failed.is_empty() {
        app.say(
            "nothing to retry: select a failed or aborted migration",
            true,
        );
        return;
    }
    let mode = app.default_mode;
    let lines = failed
        .iter()
        .map(|r| {
            format!(
                "{} {} → {} again (attempt {}); last error: {}",
                r.vm,
                r.source,
                r.destination,
                r.attempt + 1,
                if r.error.is_empty() { "none" } else { &r.error }
            )
        })
        .collect();
    let commands = failed
        .iter()
        .map(|r| Command::Retry {
            host: r.source.clone(),
            id: r.id.clone(),
            destination: None,
            mode,
        })
        .collect();
    app.dialog = Some(Dialog::Confirm {
        title: format!("Retry {} migration(s) on the same host?", failed.len()),
        lines,
        commands,
        mode: Some(mode),
    });
}

/// Every host, and why it cannot take `vm` now (none: it can).
pub fn destinations(state: &ClusterState, vm: &str, required: &[String]) -> Vec<Choice> {
    let memory = state
        .vms
        .iter()
        .find(|((_, name), _)| name == vm)
        .map(|(_, v)| (v.memory_mib, v.vcpus))
        .unwrap_or_default();
    let runs_on = state.vm_host(vm);
    state
        .hosts
        .iter()
        .map(|h| {
            let refusal = if runs_on == Some(h.name.as_str()) {
                Some(format!("{vm} runs here"))
            } else if !matches!(h.link, Link::Connected) {
                Some("not connected".to_string())
            } else {
                match &h.info {
                    None => Some("no report from its agent yet".to_string()),
                    Some(info) if info.draining => Some("draining".to_string()),
                    Some(info) => {
                        let free = info.memory_total_mib.saturating_sub(info.memory_used_mib);
                        let free_cpus = info.vcpus_total.saturating_sub(info.vcpus_used);
                        let missing: Vec<&str> = required
                            .iter()
                            .filter(|f| !info.features.contains(f))
                            .map(String::as_str)
                            .collect();
                        if free < memory.0 {
                            Some(format!("{} MiB free, {vm} needs {}", free, memory.0))
                        } else if free_cpus < memory.1 {
                            Some(format!("{free_cpus} vCPUs free, {vm} needs {}", memory.1))
                        } else if !missing.is_empty() {
                            Some(format!("lacks required {}", missing.join(", ")))
                        } else {
                            None
                        }
                    }
                }
            };
            Choice {
                host: h.name.clone(),
                refusal,
            }
        })
        .collect()
}

/// Offer every host; the cursor starts on the first eligible one that is
/// not where the last attempt failed (`avoid`).
fn picker(
    app: &mut App,
    title: String,
    vm: String,
    retry: Option<String>,
    from: String,
    required: Vec<String>,
    avoid: Option<&str>,
) {
    let choices = destinations(app.state(), &vm, &required);
    let eligible = |c: &&Choice| c.refusal.is_none();
    let selected = choices
        .iter()
        .position(|c| eligible(&c) && Some(c.host.as_str()) != avoid)
        .or_else(|| choices.iter().position(|c| eligible(&c)))
        .unwrap_or(0);
    app.dialog = Some(Dialog::Picker {
        title,
        vm,
        retry,
        from,
        choices,
        selected,
        mode: app.default_mode,
    });
}

fn pick_destination(app: &mut App) {
    let Some(record) = app.selected_migration().map(|m| m.record.clone()) else {
        app.say("select a failed migration first", true);
        return;
    };
    if !matches!(
        outcome(&record),
        proto::Outcome::Failed | proto::Outcome::Aborted
    ) {
        app.say(
            format!(
                "{} has not failed: only a failed or aborted migration can be retried",
                record.id
            ),
            true,
        );
        return;
    }
    if let Some(moved) = moved_since(app.state(), &record) {
        app.say(moved, true);
        return;
    }
    let required = record
        .features
        .iter()
        .filter(|f| f.required)
        .map(|f| f.name.clone())
        .collect();
    picker(
        app,
        format!("Retry {} ({}) on another host", record.id, record.vm),
        record.vm.clone(),
        Some(record.id.clone()),
        record.source.clone(),
        required,
        Some(&record.destination),
    );
}

fn rollback(app: &mut App) {
    let Some(record) = app.selected_migration().map(|m| m.record.clone()) else {
        app.say("select a migration with pending rollbacks first", true);
        return;
    };
    let hosts: Vec<String> = app
        .state()
        .hosts
        .iter()
        .filter(|h| {
            h.info.as_ref().is_some_and(|i| {
                i.pending_rollbacks
                    .iter()
                    .any(|p| p.migration_id == record.id)
            })
        })
        .map(|h| h.name.clone())
        .collect();
    if hosts.is_empty() {
        app.say(format!("{} has no pending rollbacks", record.id), true);
        return;
    }
    app.dialog = Some(Dialog::Confirm {
        title: format!("Run the pending rollbacks of {} now?", record.id),
        lines: hosts
            .iter()
            .map(|h| format!("on {h}: undo what {} left there", record.vm))
            .collect(),
        commands: hosts
            .into_iter()
            .map(|host| Command::Rollback {
                host,
                id: record.id.clone(),
            })
            .collect(),
        mode: None,
    });
}

fn new_migration(app: &mut App) {
    let mut vms: Vec<(String, String)> = app
        .state()
        .vms
        .iter()
        .filter(|(_, v)| v.state == proto::GuestState::Running as i32)
        .map(|((host, name), _)| (name.clone(), host.clone()))
        .collect();
    vms.sort();
    if vms.is_empty() {
        app.say("no running VM to migrate", true);
        return;
    }
    app.dialog = Some(Dialog::ChooseVm { vms, selected: 0 });
}

fn on_dialog(app: &mut App, key: KeyEvent) -> Vec<Command> {
    let Some(dialog) = app.dialog.take() else {
        return Vec::new();
    };
    match dialog {
        Dialog::Help | Dialog::Message(_) => {
            if key.code == KeyCode::Char('q') {
                app.quit = true;
                return vec![Command::Quit];
            }
            Vec::new()
        }
        Dialog::Confirm {
            title,
            lines,
            mut commands,
            mode,
        } => match key.code {
            KeyCode::Char('y') | KeyCode::Enter => {
                for c in &mut commands {
                    if let (
                        Command::Retry { mode: m, .. } | Command::Start { mode: m, .. },
                        Some(chosen),
                    ) = (c, mode)
                    {
                        *m = chosen;
                    }
                }
                app.marked.clear();
                app.say(format!("sent: {}", describe_all(&commands)), false);
                commands
            }
            KeyCode::Char('m') if mode.is_some() => {
                app.dialog = Some(Dialog::Confirm {
                    title,
                    lines,
                    commands,
                    mode: mode.map(other_mode),
                });
                Vec::new()
            }
            KeyCode::Char('n') | KeyCode::Esc => Vec::new(),
            _ => {
                app.dialog = Some(Dialog::Confirm {
                    title,
                    lines,
                    commands,
                    mode,
                });
                Vec::new()
            }
        },
        Dialog::Picker {
            title,
            vm,
            retry,
            from,
            choices,
            mut selected,
            mut mode,
        } => {
            match key.code {
                KeyCode::Esc | KeyCode::Char('q') => return Vec::new(),
                KeyCode::Char('j') | KeyCode::Down => {
                    selected = (selected + 1).min(choices.len().saturating_sub(1))
                }
                KeyCode::Char('k') | KeyCode::Up => selected = selected.saturating_sub(1),
                KeyCode::Char('m') => mode = other_mode(mode),
                KeyCode::Enter => match choices.get(selected) {
                    Some(Choice {
                        host,
                        refusal: None,
                    }) => {
                        let command = match retry {
                            Some(id) => Command::Retry {
                                host: from,
                                id,
                                destination: Some(host.clone()),
                                mode,
                            },
                            None => Command::Start {
                                host: from,
                                vm,
                                destination: host.clone(),
                                mode,
                            },
                        };
                        app.say(format!("sent: {}", command.describe()), false);
                        return vec![command];
                    }
                    Some(Choice {
                        host,
                        refusal: Some(why),
                    }) => app.say(format!("{host} cannot take {vm}: {why}"), true),
                    None => {}
                },
                _ => {}
            }
            app.dialog = Some(Dialog::Picker {
                title,
                vm,
                retry,
                from,
                choices,
                selected,
                mode,
            });
            Vec::new()
        }
        Dialog::ChooseVm { vms, mut selected } => {
            match key.code {
                KeyCode::Esc | KeyCode::Char('q') => return Vec::new(),
                KeyCode::Char('j') | KeyCode::Down => {
                    selected = (selected + 1).min(vms.len().saturating_sub(1))
                }
                KeyCode::Char('k') | KeyCode::Up => selected = selected.saturating_sub(1),
                KeyCode::Enter => {
                    if let Some((vm, host)) = vms.get(selected).cloned() {
                        let required = app
                            .state()
                            .vms
                            .get(&(host.clone(), vm.clone()))
                            .map(|v| {
                                v.features
                                    .iter()
                                    .filter(|f| f.required)
                                    .map(|f| f.name.clone())
                                    .collect()
                            })
                            .unwrap_or_default();
                        picker(
                            app,
                            format!("Migrate {vm} from {host} to"),
                            vm,
                            None,
                            host,
                            required,
                            None,
                        );
                        return Vec::new();
                    }
                }
                _ => {}
            }
            app.dialog = Some(Dialog::ChooseVm { vms, selected });
            Vec::new()
        }
    }
}

fn describe_all(commands: &[Command]) -> String {
    commands
        .iter()
        .map(Command::describe)
        .collect::<Vec<_>>()
        .join(", ")
}

fn on_input(app: &mut App, key: KeyEvent) -> Vec<Command> {
    let Some(mut input) = app.input.take() else {
        return Vec::new();
    };
    match key.code {
        KeyCode::Esc => {
            if input.kind == InputKind::Filter {
                app.filter.clear();
            }
        }
        KeyCode::Enter => match input.kind {
            InputKind::Filter => {
                app.filter = input.text.trim().to_string();
                app.migration_row = 0;
            }
            InputKind::Command => return run_command(app, input.text.trim()),
        },
        KeyCode::Backspace => {
            input.text.pop();
            app.input = Some(input);
        }
        KeyCode::Char(c) => {
            input.text.push(c);
            if input.kind == InputKind::Filter {
                // Live filtering as the operator types.
                app.filter = input.text.trim().to_string();
                app.migration_row = 0;
            }
            app.input = Some(input);
        }
        _ => app.input = Some(input),
    }
    Vec::new()
}

fn run_command(app: &mut App, line: &str) -> Vec<Command> {
    let mut words = line.split_whitespace();
    match (words.next(), words.next()) {
        (Some("q" | "quit"), _) => {
            app.quit = true;
            return vec![Command::Quit];
        }
        (Some("hosts"), _) => {
            app.view = View::Overview;
            app.focus = Focus::Hosts;
        }
        (Some("migrations" | "m"), _) => {
            app.view = View::Overview;
            app.focus = Focus::Migrations;
        }
        (Some("vms"), _) => app.view = View::Vms,
        (Some("events"), _) => app.view = View::Events,
        (Some("theme"), Some(name)) => app.theme = name.to_string(),
        (Some("theme"), None) => app.say(":theme needs a name", true),
        (Some(other), _) => app.say(
            format!(
                "unknown command :{other} (try :hosts :migrations :vms :events :theme NAME :q)"
            ),
            true,
        ),
        (None, _) => {}
    }
    Vec::new()
}

/// `/` filters: words match anywhere; `field:value` matches a field
/// (`state`, `host`, `vm`, `mode`, `id`).
#[derive(Debug, Default)]
pub struct Filter {
    terms: Vec<(Option<String>, String)>,
}

impl Filter {
    pub fn parse(text: &str) -> Filter {
        Filter {
            terms: text
                .split_whitespace()
                .map(|w| match w.split_once(':') {
                    Some((field, value)) if !field.is_empty() => {
                        (Some(field.to_lowercase()), value.to_lowercase())
                    }
                    _ => (None, w.to_lowercase()),
                })
                .collect(),
        }
    }

    pub fn matches(&self, m: &MigrationView) -> bool {
        let r = &m.record;
        let state = outcome_from_proto(r.outcome).map_or("running", Outcome::as_str);
        let mode = mode_of(r);
        self.terms.iter().all(|(field, value)| {
            let has = |s: &str| s.to_lowercase().contains(value.as_str());
            match field.as_deref() {
                Some("state" | "outcome" | "s") => state.starts_with(value.as_str()),
                Some("host" | "h") => has(&r.source) || has(&r.destination),
                Some("src" | "source") => has(&r.source),
                Some("dst" | "destination") => has(&r.destination),
                Some("vm") => has(&r.vm),
                Some("mode") => mode == value,
                Some("id") => has(&r.id),
                _ => {
                    has(&r.id)
                        || has(&r.vm)
                        || has(&r.source)
                        || has(&r.destination)
                        || has(&r.error)
                        || state.contains(value.as_str())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::fixture::*;
    use proto::event::Kind;

    fn press(app: &mut App, keys: &[Msg]) -> Vec<Command> {
        keys.iter().flat_map(|k| update(app, k.clone())).collect()
    }

    fn select(app: &mut App, id: &str) {
        app.migration_row = app
            .rows()
            .iter()
            .position(|m| m.record.id == id)
            .expect("in the table");
    }

    #[test]
    fn rows_are_running_then_failed_then_the_rest() {
        let app = fixture();
        let ids: Vec<&str> = app.rows().iter().map(|m| m.record.id.as_str()).collect();
        assert_eq!(ids, ["m-run", "m-fail", "m-ok"]);
    }

    #[test]
    fn a_confirms_an_abort_naming_the_vm_the_phase_and_what_happens() {
        let mut app = fixture();
        assert!(press(&mut app, &[key('a')]).is_empty());
        let Some(Dialog::Confirm { lines, .. }) = &app.dialog else {
            panic!("{:?}", app.dialog)
        };
        assert!(lines[0].contains("web-01"), "{lines:?}");
        assert!(lines[0].contains("perform"), "{lines:?}");
        assert!(lines[0].contains("keeps running on hv-a"), "{lines:?}");
        assert_eq!(
            press(&mut app, &[key('y')]),
            [Command::Abort {
                host: "hv-a".into(),
                id: "m-run".into()
            }]
        );
        assert!(app.dialog.is_none());
    }

    #[test]
    fn n_or_esc_cancels_a_confirmation_and_sends_nothing() {
        let mut app = fixture();
        assert!(press(&mut app, &[key('a'), key('n')]).is_empty());
        assert!(app.dialog.is_none());
        assert!(press(&mut app, &[key('a'), code(KeyCode::Esc)]).is_empty());
        assert!(app.dialog.is_none());
    }

    #[test]
    fn r_retries_on_the_same_host_in_the_mode_chosen_in_the_dialog() {
        let mut app = fixture();
        select(&mut app, "m-fail");
        let commands = press(&mut app, &[key('r'), key('m'), key('y')]);
        assert_eq!(
            commands,
            [Command::Retry {
                host: "hv-b".into(),
                id: "m-fail".into(),
                destination: None,
                mode: Mode::Fast,
            }]
        );
    }

    #[test]
    fn retry_on_another_host_takes_two_keys_from_the_failed_row() {
        let mut app = fixture();
        select(&mut app, "m-fail");
        let commands = press(&mut app, &[key('d'), code(KeyCode::Enter)]);
        assert_eq!(
            commands,
            [Command::Retry {
                host: "hv-b".into(),
                id: "m-fail".into(),
                destination: Some("hv-a".into()),
                mode: Mode::Safe,
            }]
        );
    }

    #[test]
    fn the_picker_says_why_each_ineligible_host_cannot_take_the_vm() {
        let mut app = fixture();
        select(&mut app, "m-fail");
        press(&mut app, &[key('d')]);
        let Some(Dialog::Picker {
            choices, selected, ..
        }) = &app.dialog
        else {
            panic!("{:?}", app.dialog)
        };
        let why = |h: &str| {
            choices
                .iter()
                .find(|c| c.host == h)
                .and_then(|c| c.refusal.clone())
        };
        assert_eq!(why("hv-a"), None);
        assert_eq!(why("hv-b").as_deref(), Some("db-01 runs here"));
        assert_eq!(why("hv-d").as_deref(), Some("not connected"));
        assert_eq!(why("hv-e").as_deref(), Some("draining"));
        assert_eq!(
            choices[*selected].host, "hv-a",
            "the first eligible host is preselected"
        );
        // Moving onto an ineligible host and pressing enter sends nothing and says why.
        let commands = press(&mut app, &[key('j'), code(KeyCode::Enter)]);
        assert!(commands.is_empty());
        assert!(
            app.status
                .as_ref()
                .is_some_and(|(s, e)| *e && s.contains("runs here"))
        );
    }

    #[test]
    fn the_picker_does_not_start_on_the_host_where_the_attempt_just_failed() {
        let mut app = fixture();
        let failed = app.live.migrations.get_mut("m-fail").unwrap();
        failed.record.destination = "hv-a".into();
        select(&mut app, "m-fail");
        let commands = press(&mut app, &[key('d'), code(KeyCode::Enter)]);
        assert!(
            matches!(&commands[..], [Command::Retry { destination: Some(d), .. }] if d == "hv-c"),
            "{commands:?}"
        );
    }

    #[test]
    fn a_retry_of_a_vm_that_has_moved_on_since_says_so_and_sends_nothing() {
        let mut app = fixture();
        // db-01 failed hv-b → hv-c, and has since moved to hv-a.
        let vm = app
            .live
            .vms
            .remove(&("hv-b".into(), "db-01".into()))
            .unwrap();
        app.live.vms.insert(("hv-a".into(), "db-01".into()), vm);
        select(&mut app, "m-fail");
        for k in ['r', 'd'] {
            assert!(press(&mut app, &[key(k), key('y'), code(KeyCode::Enter)]).is_empty());
            assert_eq!(app.dialog, None);
            assert!(
                app.status
                    .as_ref()
                    .is_some_and(|(s, e)| *e && s.contains("db-01 now runs on hv-a")),
                "{:?}",
                app.status
            );
        }
    }

    #[test]
    fn a_host_without_room_or_a_required_feature_is_not_eligible() {
        let mut app = fixture();
        let hosts = &mut app.live.hosts;
        let c = hosts.iter_mut().find(|h| h.name == "hv-c").unwrap();
        c.info.as_mut().unwrap().memory_used_mib = 65_000;
        let a = hosts.iter_mut().find(|h| h.name == "hv-a").unwrap();
        a.info.as_mut().unwrap().features.clear();
        let choices = destinations(&app.live, "db-01", &["port-profile".into()]);
        let why = |h: &str| {
            choices
                .iter()
                .find(|c| c.host == h)
                .unwrap()
                .refusal
                .clone()
        };
        assert_eq!(why("hv-a").as_deref(), Some("lacks required port-profile"));
        assert_eq!(
            why("hv-c").as_deref(),
            Some("536 MiB free, db-01 needs 2048")
        );
    }

    #[test]
    fn b_runs_the_pending_rollbacks_on_the_hosts_that_list_them() {
        let mut app = fixture();
        select(&mut app, "m-fail");
        assert_eq!(
            press(&mut app, &[key('b'), key('y')]),
            [Command::Rollback {
                host: "hv-c".into(),
                id: "m-fail".into()
            }]
        );
        select(&mut app, "m-ok");
        assert!(press(&mut app, &[key('b')]).is_empty());
        assert!(app.dialog.is_none(), "nothing pending: no dialog");
    }

    #[test]
    fn m_switches_the_default_mode_for_new_actions() {
        let mut app = fixture();
        assert_eq!(app.default_mode, Mode::Safe);
        press(&mut app, &[key('m')]);
        assert_eq!(app.default_mode, Mode::Fast);
        select(&mut app, "m-fail");
        let commands = press(&mut app, &[key('r'), key('y')]);
        assert!(matches!(
            &commands[0],
            Command::Retry {
                mode: Mode::Fast,
                ..
            }
        ));
    }

    #[test]
    fn n_starts_a_new_migration_choosing_vm_then_destination() {
        let mut app = fixture();
        // VMs sorted by name: app-01 (hv-c), db-01 (hv-b), web-01 (hv-a).
        let commands = press(
            &mut app,
            &[
                key('n'),
                key('j'),
                code(KeyCode::Enter),
                code(KeyCode::Enter),
            ],
        );
        assert_eq!(
            commands,
            [Command::Start {
                host: "hv-b".into(),
                vm: "db-01".into(),
                destination: "hv-a".into(),
                mode: Mode::Safe,
            }]
        );
    }

    #[test]
    fn e_says_evacuations_come_later() {
        let mut app = fixture();
        assert!(press(&mut app, &[key('e')]).is_empty());
        assert!(matches!(&app.dialog, Some(Dialog::Message(m)) if m.contains("later")));
    }

    #[test]
    fn slash_filters_by_text_and_field_value_and_esc_clears() {
        let mut app = fixture();
        let typed: Vec<Msg> = "state:failed".chars().map(key).collect();
        press(&mut app, &[key('/')]);
        press(&mut app, &typed);
        press(&mut app, &[code(KeyCode::Enter)]);
        let ids: Vec<String> = app.rows().iter().map(|m| m.record.id.clone()).collect();
        assert_eq!(ids, ["m-fail"]);
        app.filter = "host:hv-a web".into();
        let ids: Vec<String> = app.rows().iter().map(|m| m.record.id.clone()).collect();
        assert_eq!(ids, ["m-run"]);
        press(&mut app, &[code(KeyCode::Esc)]);
        assert!(app.filter.is_empty());
        assert_eq!(app.rows().len(), 3);
    }

    #[test]
    fn colon_commands_switch_views_and_themes_and_quit() {
        let mut app = fixture();
        let run = |app: &mut App, line: &str| {
            let mut keys = vec![key(':')];
            keys.extend(line.chars().map(key));
            keys.push(code(KeyCode::Enter));
            press(app, &keys)
        };
        run(&mut app, "vms");
        assert_eq!(app.view, View::Vms);
        run(&mut app, "events");
        assert_eq!(app.view, View::Events);
        run(&mut app, "hosts");
        assert_eq!(
            (app.view.clone(), app.focus),
            (View::Overview, Focus::Hosts)
        );
        run(&mut app, "theme light");
        assert_eq!(app.theme, "light");
        run(&mut app, "nonsense");
        assert!(
            app.status
                .as_ref()
                .is_some_and(|(s, e)| *e && s.contains(":nonsense"))
        );
        assert_eq!(run(&mut app, "q"), [Command::Quit]);
        assert!(app.quit);
    }

    #[test]
    fn navigation_keys_move_within_the_focused_table() {
        let mut app = fixture();
        press(&mut app, &[key('j')]);
        assert_eq!(app.migration_row, 1);
        press(&mut app, &[code(KeyCode::Down), code(KeyCode::Down)]);
        assert_eq!(app.migration_row, 2, "stops at the last row");
        press(&mut app, &[key('k')]);
        assert_eq!(app.migration_row, 1);
        press(&mut app, &[key('g')]);
        assert_eq!(app.migration_row, 0);
        press(&mut app, &[key('G')]);
        assert_eq!(app.migration_row, 2);
        app.page_rows = 4;
        press(&mut app, &[ctrl('u')]);
        assert_eq!(app.migration_row, 0);
        press(&mut app, &[ctrl('d')]);
        assert_eq!(app.migration_row, 2);
        press(&mut app, &[code(KeyCode::Tab), key('j'), key('j')]);
        assert_eq!((app.focus, app.host_row), (Focus::Hosts, 2));
        press(&mut app, &[code(KeyCode::BackTab)]);
        assert_eq!(app.focus, Focus::Migrations);
    }

    #[test]
    fn enter_opens_the_detail_and_esc_goes_back_without_quitting() {
        let mut app = fixture();
        select(&mut app, "m-fail");
        press(&mut app, &[code(KeyCode::Enter)]);
        assert_eq!(app.view, View::Detail("m-fail".into()));
        assert!(press(&mut app, &[code(KeyCode::Esc)]).is_empty());
        assert_eq!(app.view, View::Overview);
        assert!(!app.quit);
    }

    #[test]
    fn f_freezes_what_is_shown_while_the_live_state_moves_on() {
        let mut app = fixture();
        press(&mut app, &[key('f')]);
        let late = migration("m-late", "web-01", "hv-a", "hv-c", proto::Outcome::None);
        update(
            &mut app,
            Msg::Event(proto::Event {
                host: "hv-a".into(),
                kind: Some(Kind::Migration(late)),
            }),
        );
        assert!(!app.state().migrations.contains_key("m-late"));
        assert!(app.live.migrations.contains_key("m-late"));
        press(&mut app, &[key('f')]);
        assert!(app.state().migrations.contains_key("m-late"));
    }

    #[test]
    fn space_marks_rows_for_a_bulk_abort_or_retry() {
        let mut app = fixture();
        let late = migration("m-two", "db-01", "hv-b", "hv-a", proto::Outcome::None);
        update(
            &mut app,
            Msg::Event(proto::Event {
                host: "hv-b".into(),
                kind: Some(Kind::Migration(late)),
            }),
        );
        press(&mut app, &[key(' '), key(' ')]);
        assert_eq!(app.marked.len(), 2);
        let commands = press(&mut app, &[key('a'), key('y')]);
        assert_eq!(commands.len(), 2, "{commands:?}");
        assert!(app.marked.is_empty(), "a sent bulk action clears the marks");
    }

    #[test]
    fn q_quits_and_question_mark_opens_help() {
        let mut app = fixture();
        press(&mut app, &[key('?')]);
        assert_eq!(app.dialog, Some(Dialog::Help));
        press(&mut app, &[code(KeyCode::Esc)]);
        assert_eq!(app.dialog, None);
        assert_eq!(press(&mut app, &[key('q')]), [Command::Quit]);
        assert!(app.quit);
    }

    #[test]
    fn read_only_mode_sends_nothing_that_changes_an_agent() {
        let mut app = fixture();
        app.read_only = true;
        select(&mut app, "m-fail");
        for c in ['a', 'r', 'd', 'b', 'n', 'e'] {
            assert!(press(&mut app, &[key(c), key('y'), code(KeyCode::Enter)]).is_empty());
            assert_eq!(app.dialog, None, "{c} opened a dialog in read-only mode");
        }
    }

    #[test]
    fn a_finished_command_lands_in_the_status_line_and_the_event_log() {
        let mut app = fixture();
        update(
            &mut app,
            Msg::Done {
                what: "abort m-run".into(),
                result: Err("past the commit point".into()),
            },
        );
        assert_eq!(
            app.status,
            Some(("abort m-run failed: past the commit point".into(), true))
        );
        assert!(
            app.live
                .events
                .back()
                .is_some_and(|e| e.line.level == "error")
        );
    }
}
