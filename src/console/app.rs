//! The console's state and `update`: messages and key presses in, commands
//! out. Pure: views draw an [`App`], the terminal loop carries out the
//! [`Command`]s; nothing here does IO.

use std::collections::BTreeSet;

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use super::completion::{CompletionChoice, base};
use super::keymap::{Action, Context, action_for};
use super::msg::{Command, Msg};
use super::state::{ClusterState, Link, MigrationLogs, MigrationView};
use crate::cli::output::phase_name;
use crate::host::evacuation::DEFAULT_MAX_ATTEMPTS;
use crate::host::evacuation::job::{Evacuation, JobState, JobVm};
use crate::proto;
use crate::protocol::completion::Completion;
use crate::protocol::record::{
    MigrationRecord, completion_from_record, mode_from_proto, outcome_from_proto, phase_from_proto,
};
use crate::protocol::{Mode, Outcome};

#[derive(Debug, Clone, PartialEq)]
pub enum View {
    /// Hosts above, migrations below.
    Overview,
    Vms,
    Events,
    /// One migration, by id.
    Detail(String),
    /// Evacuations, newest first, and the selected one's VMs.
    Evacuations,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Focus {
    Hosts,
    Migrations,
}

/// A destination offered by the picker, and whether it can take the VM,
/// as the VM's source agent answers (`tern check`): the console does not
/// judge eligibility itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub host: String,
    pub eligibility: Eligibility,
    /// The VM's latest failed or aborted attempt to this host, said:
    /// "failed here 40 s ago: port-profile ✗ finish". Eligible or not, the
    /// operator should know before sending it there again.
    pub failed_here: Option<String>,
}

/// What the VM's source agent said of one destination.
#[derive(Debug, Clone, PartialEq)]
pub enum Eligibility {
    /// The VM runs there: nothing to ask.
    RunsHere,
    /// Asked; no answer yet.
    Checking,
    /// Every admission check of Begin and Prepare passes.
    Eligible,
    /// The first check that fails, said: "capacity: hv-b has 512 MiB …".
    Refused(String),
    /// The source's agent, or the destination's through it, did not answer.
    NoAnswer(String),
}

impl Eligibility {
    /// From a Check answer for `destination`.
    pub fn of(answer: Result<&proto::CheckReply, &str>, destination: &str) -> Eligibility {
        let reply = match answer {
            Ok(reply) => reply,
            Err(e) => return Eligibility::NoAnswer(e.to_string()),
        };
        match reply.checks.iter().find(|c| !c.ok) {
            None if reply.checks.is_empty() => {
                Eligibility::NoAnswer("the answer had no checks".to_string())
            }
            None => Eligibility::Eligible,
            Some(c) if c.name == "reachable" => Eligibility::NoAnswer(c.detail.clone()),
            Some(c) if c.host == destination => {
                Eligibility::Refused(format!("{}: {}", c.name, c.detail))
            }
            Some(c) => Eligibility::Refused(format!("{} {}: {}", c.host, c.name, c.detail)),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Dialog {
    /// A dangerous action waits for `y` (or enter).
    Confirm {
        title: String,
        lines: Vec<String>,
        commands: Vec<Command>,
    },
    /// Retry failed migrations on the same host: `y` (or enter) with the
    /// mode and completion policy shown, which `m`, `p`, `b` and `w` change.
    Retry(RetryForm),
    /// Where to retry (or start) a migration: every host, with why not,
    /// and the mode and completion policy, as in the retry dialog.
    Picker {
        title: String,
        vm: String,
        /// The migration to retry, or `None` for a new one from `from`.
        retry: Option<String>,
        from: String,
        choices: Vec<Choice>,
        selected: usize,
        mode: Mode,
        completion: CompletionChoice,
        /// Retrying: the last attempt's mode and policy.
        last: Option<(Mode, Completion)>,
    },
    /// Which VM a new migration moves.
    ChooseVm {
        vms: Vec<(String, String)>,
        selected: usize,
    },
    /// The choices of `tern evacuate HOST`.
    Evacuate(EvacuateForm),
    /// How to cancel an evacuation: let its attempts in flight finish, or
    /// abort them.
    /// The attempts in flight are counted when drawn, from the evacuation
    /// as it is then.
    CancelEvacuation {
        host: String,
        id: String,
        /// Already cancelling (letting attempts finish): only aborting is left.
        cancelling: bool,
    },
    Help,
    Message(String),
    /// `tern doctor HOST` in the console: `None` while its agent checks.
    Doctor {
        host: String,
        findings: Option<Vec<crate::cli::doctor::Finding>>,
    },
}

/// The retry dialog: the attempts it retries, and the mode and policy the
/// new attempts get.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryForm {
    pub targets: Vec<RetryTarget>,
    pub mode: Mode,
    pub completion: CompletionChoice,
}

/// One failed or aborted migration to retry on the same host.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryTarget {
    pub id: String,
    pub vm: String,
    pub source: String,
    pub destination: String,
    pub attempt: u32,
    pub error: String,
    /// The last attempt's mode and policy: a retry in the same mode keeps
    /// the policy unless the operator changes it, as `tern retry` does.
    pub last: (Mode, Completion),
}

impl RetryForm {
    /// The policy the dialog shows and its keys change: the first
    /// target's (a bulk retry of attempts with different policies lists
    /// each).
    pub fn base(&self) -> Completion {
        base(self.mode, self.targets.first().map(|t| t.last))
    }

    /// Each target's policy, in order.
    pub fn policies(&self) -> Vec<Completion> {
        self.targets
            .iter()
            .map(|t| self.completion.over(base(self.mode, Some(t.last))))
            .collect()
    }

    pub fn commands(&self) -> Vec<Command> {
        self.targets
            .iter()
            .zip(self.policies())
            .map(|(t, completion)| Command::Retry {
                host: t.source.clone(),
                id: t.id.clone(),
                destination: None,
                mode: self.mode,
                completion,
            })
            .collect()
    }
}

/// A record's mode and completion policy.
pub fn policy_of(record: &proto::MigrationRecord) -> (Mode, Completion) {
    (
        mode_from_proto(record.mode).unwrap_or(Mode::Safe),
        completion_from_record(record.completion.as_ref()),
    )
}

/// The evacuate dialog: one row per choice, the hosts to leave out last.
#[derive(Debug, Clone, PartialEq)]
pub struct EvacuateForm {
    pub host: String,
    /// VMs on the host now (what the evacuation will move).
    pub vms: usize,
    pub mode: Mode,
    /// Over the mode's default, for every VM.
    pub completion: CompletionChoice,
    /// 0: the host's `max_outgoing`.
    pub concurrency: u32,
    /// The host's `max_outgoing`, when its agent has reported it.
    pub max_outgoing: Option<u32>,
    pub max_attempts: u32,
    pub exclude: Vec<Exclusion>,
    /// The cursor: [`EvacuateForm::MODE`], the completion rows,
    /// [`EvacuateForm::CONCURRENCY`], [`EvacuateForm::MAX_ATTEMPTS`], then
    /// one row per other host.
    pub row: usize,
    /// Digits are being typed on the cursor's row (a key other than a digit
    /// or backspace ends that).
    pub typing: bool,
}

/// Another host, whether the evacuation must leave it out, and what the
/// console knows against it.
#[derive(Debug, Clone, PartialEq)]
pub struct Exclusion {
    pub host: String,
    pub excluded: bool,
    pub note: Option<String>,
}

/// The agent's own bounds (src/agent/evacuation): asking for more is refused.
const MAX_CONCURRENCY: u32 = 256;
const MAX_ATTEMPTS: u32 = 100;

impl EvacuateForm {
    pub const MODE: usize = 0;
    pub const POSTCOPY: usize = 1;
    pub const BUDGET: usize = 2;
    pub const WHEN_SPENT: usize = 3;
    pub const CONCURRENCY: usize = 4;
    pub const MAX_ATTEMPTS: usize = 5;
    /// The first host row.
    pub const HOSTS: usize = 6;

    fn rows(&self) -> usize {
        Self::HOSTS + self.exclude.len()
    }

    /// The mode's default policy, under the operator's picks.
    pub fn base(&self) -> Completion {
        base(self.mode, None)
    }

    /// The policy every VM's migration gets.
    pub fn policy(&self) -> Completion {
        self.completion.over(self.base())
    }

    /// Left (`-1`) or right (`+1`) on the cursor's row; an error says why a
    /// choice is not on offer.
    fn adjust(&mut self, by: i64) -> Result<(), String> {
        let base = self.base();
        match self.row {
            Self::MODE => self.mode = other_mode(self.mode),
            Self::POSTCOPY => self.completion.next_postcopy(base),
            Self::BUDGET => self.completion.step_budget(base, by > 0),
            Self::WHEN_SPENT => return self.completion.toggle_when_spent(base),
            Self::CONCURRENCY => {
                self.concurrency =
                    (i64::from(self.concurrency) + by).clamp(0, i64::from(MAX_CONCURRENCY)) as u32
            }
            Self::MAX_ATTEMPTS => {
                self.max_attempts =
                    (i64::from(self.max_attempts) + by).clamp(1, i64::from(MAX_ATTEMPTS)) as u32
            }
            _ => return self.toggle(),
        }
        Ok(())
    }

    /// Space: switch the mode, post-copy or what a spent budget does, or
    /// leave a host out (or in).
    fn toggle(&mut self) -> Result<(), String> {
        match self.row {
            Self::MODE => self.mode = other_mode(self.mode),
            Self::POSTCOPY => self.completion.next_postcopy(self.base()),
            Self::WHEN_SPENT => return self.completion.toggle_when_spent(self.base()),
            row if row >= Self::HOSTS => {
                if let Some(e) = self.exclude.get_mut(row - Self::HOSTS) {
                    e.excluded = !e.excluded;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// A digit typed on a number row: the first replaces the number (typing
    /// 5 over 3 means 5, not 35), the next ones append; backspace takes the
    /// last one off.
    fn type_digit(&mut self, digit: Option<u32>) {
        let fresh = !self.typing;
        let edit = |n: u32, max: u32| -> u32 {
            match digit {
                Some(d) if fresh => d.min(max),
                Some(d) => n.saturating_mul(10).saturating_add(d).min(max),
                None => n / 10,
            }
        };
        match self.row {
            Self::CONCURRENCY => self.concurrency = edit(self.concurrency, MAX_CONCURRENCY),
            Self::MAX_ATTEMPTS => self.max_attempts = edit(self.max_attempts, MAX_ATTEMPTS),
            Self::BUDGET => {
                let base = self.base();
                return self.completion.type_budget(base, digit.map(u64::from));
            }
            _ => return,
        }
        self.typing = true;
    }

    /// What the request leaves out, in inventory order.
    pub fn excluded(&self) -> Vec<String> {
        self.exclude
            .iter()
            .filter(|e| e.excluded)
            .map(|e| e.host.clone())
            .collect()
    }

    /// The request, or why it cannot be sent.
    pub fn command(&self) -> Result<Command, String> {
        if !self.exclude.is_empty() && self.exclude.iter().all(|e| e.excluded) {
            return Err(format!(
                "every other host is left out: {}'s VMs would have nowhere to go",
                self.host
            ));
        }
        if self.max_attempts == 0 {
            return Err("max attempts must be at least 1".into());
        }
        Ok(Command::Evacuate {
            host: self.host.clone(),
            mode: self.mode,
            completion: self.policy(),
            concurrency: self.concurrency,
            max_attempts: self.max_attempts,
            exclude: self.excluded(),
        })
    }
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
    /// Where the migration the cursor is on sits in the table now; the
    /// cursor follows [`App::migration_id`], not the row.
    pub migration_row: usize,
    /// The migration the operator put the cursor on. The table re-sorts as
    /// migrations start and end and the filter changes: after every change
    /// the cursor finds it again, or, if it left the table, takes its
    /// neighbour and the status line says so. `None` until the operator
    /// moves the cursor: it stays on its row (the top).
    pub migration_id: Option<String>,
    /// The evacuation the evacuations view shows; `None`: the newest (pinned
    /// as soon as the view shows it, so a newer one does not replace it).
    pub evacuation: Option<String>,
    /// The cursor in that evacuation's VM table, and the VM it is on (the
    /// cursor follows the VM).
    pub evacuation_vm_row: usize,
    pub evacuation_vm: Option<String>,
    /// An evacuation the console just asked for (its host, and the
    /// evacuations known then): shown as soon as an agent reports it.
    pub awaited_evacuation: Option<(String, BTreeSet<String>)>,
    /// Whether the cursor is in the evacuations list (tab), not the VMs.
    pub evacuation_list_focused: bool,
    /// Where esc leaves a migration's detail for.
    pub detail_from: View,
    pub marked: BTreeSet<String>,
    pub filter: String,
    pub input: Option<Input>,
    pub dialog: Option<Dialog>,
    /// The mode new actions start with.
    pub default_mode: Mode,
    pub read_only: bool,
    /// Who the console is to the agents ("ana (operator)"); `None` on a
    /// plaintext cluster.
    pub identity: Option<String>,
    pub theme: String,
    /// Where the console logs, for the help screen (read once at start,
    /// not on every frame).
    pub log_path: String,
    /// The last command's result, or a refusal, for the status line.
    pub status: Option<(String, bool)>,
    /// The status line says the cursor left a migration that left the
    /// table: a command's answer arriving next keeps it in front.
    moved_notice: Option<String>,
    /// Rows a half page moves (set by the terminal loop from the table height).
    pub page_rows: usize,
    pub quit: bool,
    /// Something changed since the last frame.
    pub dirty: bool,
    /// A migration has just failed, become unresolved or lost: the terminal
    /// bell rings once (the loop clears it), unless `quiet`.
    pub bell: bool,
    pub quiet: bool,
    /// The pulse line's figures, computed at most once a second of the
    /// cluster's clock (they read every attempt): (at, attempts, figures).
    pub pulse: std::cell::RefCell<Option<(u64, usize, crate::console::views::Pulse)>>,
    /// The open detail's lines from its hosts' logs.
    pub logs: Option<MigrationLogs>,
}

/// How often an open detail asks its hosts for their log lines again.
pub const LOGS_REFRESH_MS: u64 = 3_000;

impl App {
    pub fn new(state: ClusterState, read_only: bool, theme: &str) -> App {
        App {
            live: state,
            frozen: None,
            view: View::Overview,
            focus: Focus::Migrations,
            host_row: 0,
            migration_row: 0,
            migration_id: None,
            evacuation: None,
            evacuation_vm_row: 0,
            evacuation_vm: None,
            awaited_evacuation: None,
            evacuation_list_focused: false,
            detail_from: View::Overview,
            marked: BTreeSet::new(),
            filter: String::new(),
            input: None,
            dialog: None,
            default_mode: Mode::Safe,
            read_only,
            identity: None,
            theme: theme.to_string(),
            log_path: String::new(),
            status: None,
            moved_notice: None,
            page_rows: 10,
            quit: false,
            dirty: true,
            bell: false,
            quiet: false,
            pulse: std::cell::RefCell::new(None),
            logs: None,
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
        if self.view == View::Evacuations {
            let vm = self.selected_evacuation_vm()?;
            return self.state().migrations.get(vm.migration_id.as_deref()?);
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

    /// The evacuation the evacuations view shows: the chosen one while it
    /// exists, else the newest.
    pub fn selected_evacuation(&self) -> Option<&Evacuation> {
        let state = self.state();
        self.evacuation
            .as_ref()
            .and_then(|id| state.evacuations.get(id))
            .or_else(|| state.ordered_evacuations().into_iter().next())
    }

    pub fn selected_evacuation_vm(&self) -> Option<&JobVm> {
        let vms = &self.selected_evacuation()?.vms;
        vms.get(self.evacuation_vm_row.min(vms.len().saturating_sub(1)))
    }

    /// What the hint bar offers keys for.
    pub fn context(&self) -> Context {
        match (&self.view, self.focus) {
            (View::Overview, Focus::Hosts) => Context::Hosts,
            (View::Overview | View::Detail(_), _) => Context::Migrations,
            (View::Evacuations, _) => Context::Evacuations,
            (View::Vms | View::Events, _) => Context::Lists,
        }
    }

    /// The outcome of the migration on screen: the detail's, or the
    /// selected row's in the migrations table. `None` while it runs or
    /// when no migration is shown (the hint bar offers by it).
    pub fn shown_outcome(&self) -> Option<Outcome> {
        let record = match (&self.view, self.focus) {
            (View::Detail(id), _) => self.state().migrations.get(id).map(|m| &m.record),
            (View::Overview, Focus::Migrations) => self.selected_migration().map(|m| &m.record),
            _ => None,
        };
        record.and_then(|r| outcome_from_proto(r.outcome))
    }

    fn say(&mut self, text: impl Into<String>, error: bool) {
        self.status = Some((text.into(), error));
        self.moved_notice = None;
    }

    /// The migration at `row` of the table (filtered), if any.
    fn migration_at(&self, row: usize) -> Option<String> {
        self.rows_in(row..row + 1)
            .first()
            .map(|m| m.record.id.clone())
    }

    /// Where migration `id` sits in the table now, if it is in it.
    fn row_of(&self, id: &str) -> Option<usize> {
        if self.filter.is_empty() {
            return self.state().position(id);
        }
        self.rows().iter().position(|m| m.record.id == id)
    }

    /// Put the migrations cursor on `row` (clamped), on the migration there.
    pub fn select_row(&mut self, row: usize) {
        self.migration_row = row.min(self.row_count().saturating_sub(1));
        self.migration_id = self.migration_at(self.migration_row);
    }

    /// After anything changed the tables: every cursor back on the object it
    /// was on.
    pub fn follow_selection(&mut self) {
        self.follow_migration();
        self.follow_evacuation();
    }

    fn follow_migration(&mut self) {
        let Some(id) = self.migration_id.clone() else {
            // Nothing chosen yet: the cursor stays on its row (the top of a
            // fresh console) until the operator moves it onto a migration.
            self.migration_row = self.migration_row.min(self.row_count().saturating_sub(1));
            return;
        };
        if let Some(row) = self.row_of(&id) {
            self.migration_row = row;
            return;
        }
        // It left the table: the row that now sits where it was takes the
        // cursor, and the operator is told (a keypress meant for it must
        // not silently act on another).
        let why = match self.state().migrations.get(&id) {
            Some(m) => format!("{id} ({}) is hidden by the filter", m.record.vm),
            None => format!("{id} is no longer reported"),
        };
        self.select_row(self.migration_row);
        let now = match self.selected_migration() {
            Some(m) => format!("the cursor is on {} ({})", m.record.id, m.record.vm),
            None => "the table is empty".to_string(),
        };
        let notice = format!("{why}: {now}");
        self.say(notice.clone(), false);
        self.moved_notice = Some(notice);
    }

    fn follow_evacuation(&mut self) {
        let state = self.frozen.as_ref().unwrap_or(&self.live);
        // The evacuation the console asked for, once an agent reports it.
        if let Some((host, known)) = &self.awaited_evacuation
            && let Some(e) = state
                .ordered_evacuations()
                .into_iter()
                .find(|e| &e.host == host && !known.contains(&e.id))
        {
            self.evacuation = Some(e.id.clone());
            self.evacuation_vm = None;
            self.evacuation_vm_row = 0;
            self.awaited_evacuation = None;
        }
        // Shown: pinned, so a newer evacuation does not take its place.
        if self.view == View::Evacuations
            && self.evacuation.is_none()
            && self.awaited_evacuation.is_none()
        {
            self.evacuation = self.selected_evacuation().map(|e| e.id.clone());
        }
        // Until the view has shown an evacuation there is no VM cursor to keep.
        if self.evacuation.is_none() {
            return;
        }
        // Looked up, not copied: this runs after every message.
        let Some((found, count, at_row)) = self.selected_evacuation().map(|e| {
            let found = self
                .evacuation_vm
                .as_ref()
                .and_then(|name| e.vms.iter().position(|vm| &vm.name == name));
            let row = self.evacuation_vm_row.min(e.vms.len().saturating_sub(1));
            (found, e.vms.len(), e.vms.get(row).map(|vm| vm.name.clone()))
        }) else {
            return;
        };
        match (found, &self.evacuation_vm) {
            (Some(row), _) => self.evacuation_vm_row = row,
            (None, Some(name)) => {
                let name = name.clone();
                self.evacuation_vm_row = self.evacuation_vm_row.min(count.saturating_sub(1));
                self.evacuation_vm = at_row;
                if self.view == View::Evacuations {
                    let now = self.evacuation_vm.as_deref().unwrap_or("nothing");
                    self.say(
                        format!("{name} left the evacuation's list: the cursor is on {now}"),
                        false,
                    );
                }
            }
            (None, None) => {
                self.evacuation_vm_row = self.evacuation_vm_row.min(count.saturating_sub(1));
                self.evacuation_vm = at_row;
            }
        }
    }
}

/// Fold one message into the app; what it asks the agents to do comes back.
pub fn update(app: &mut App, msg: Msg) -> Vec<Command> {
    let commands = apply_msg(app, msg);
    app.follow_selection();
    commands
}

fn apply_msg(app: &mut App, msg: Msg) -> Vec<Command> {
    match msg {
        Msg::Event(event) => {
            // A new failure, unresolved attempt or lost guest rings the bell:
            // the operator may be looking at another window.
            if let Some(proto::event::Kind::Migration(r)) = &event.kind
                && needs_an_operator(r.outcome)
                && app.live.migrations.get(&r.id).is_none_or(|m| {
                    m.record.attempt_id != r.attempt_id || m.record.outcome != r.outcome
                })
            {
                app.bell |= !app.quiet;
            }
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
        Msg::Silent {
            host,
            since_ms,
            deadline_ms,
        } => {
            let text = format!(
                "{host}: no answer in {}: connected, but its agent does not answer (hung or stopped?)",
                crate::cli::output::seconds_text(deadline_ms)
            );
            app.live.log(
                "console".into(),
                proto::LogLine {
                    at_ms: app.live.now_ms,
                    level: "error".into(),
                    migration_id: String::new(),
                    text: text.clone(),
                },
            );
            app.say(text, true);
            app.live.silent(&host, since_ms, deadline_ms);
            app.dirty |= app.frozen.is_none();
            Vec::new()
        }
        Msg::Tick { now_ms } => {
            app.live.now_ms = now_ms;
            app.dirty |= app.frozen.is_none();
            refresh_logs(app)
        }
        Msg::Logs { id, lines, missing } => {
            let now = app.live.now_ms;
            if let Some(logs) = app.logs.as_mut().filter(|l| l.id == id) {
                logs.lines = lines;
                logs.missing = missing;
                logs.fetched_ms = Some(now);
                logs.loading = false;
                app.dirty |= matches!(app.view, View::Detail(_));
            }
            Vec::new()
        }
        Msg::Resize => {
            app.dirty = true;
            Vec::new()
        }
        Msg::Actions(entries) => {
            app.live.add_actions(entries);
            app.dirty |= app.frozen.is_none();
            Vec::new()
        }
        Msg::Checked {
            source,
            vm,
            destination,
            mode,
            answer,
        } => {
            // Only the picker that asked takes it: the same VM, source and
            // mode (an answer for a mode since switched is stale).
            if let Some(Dialog::Picker {
                vm: asked_vm,
                from,
                mode: asked_mode,
                choices,
                ..
            }) = &mut app.dialog
                && *asked_vm == vm
                && *from == source
                && *asked_mode == mode
                && let Some(choice) = choices.iter_mut().find(|c| c.host == destination)
                && choice.eligibility == Eligibility::Checking
            {
                choice.eligibility =
                    Eligibility::of(answer.as_ref().map_err(String::as_str), &destination);
                app.dirty = true;
            }
            Vec::new()
        }
        Msg::Doctor { host, findings } => {
            // Shown if its dialog is still open; a closed one asked for
            // nothing more.
            if let Some(Dialog::Doctor {
                host: shown,
                findings: slot,
            }) = &mut app.dialog
                && *shown == host
            {
                *slot = Some(findings);
                app.dirty = true;
            }
            Vec::new()
        }
        Msg::Done { what, result } => {
            let (text, error) = match result {
                Ok(detail) => (format!("{what}: {detail}"), false),
                Err(e) => (format!("{what} failed: {e}"), true),
            };
            // Whether the cursor moved goes first: a keypress meant for the
            // migration that left must not land on its neighbour unawares.
            let shown = match app.moved_notice.take() {
                Some(notice) => format!("{notice} · {text}"),
                None => text.clone(),
            };
            app.live.log(
                "console".into(),
                proto::LogLine {
                    at_ms: app.live.now_ms,
                    level: if error { "error" } else { "info" }.into(),
                    migration_id: String::new(),
                    text,
                },
            );
            app.say(shown, error);
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

/// Whether `action` acts on the selected migration.
fn acts_on_a_row(action: Action) -> bool {
    matches!(
        action,
        Action::Abort
            | Action::Retry
            | Action::RetryElsewhere
            | Action::Rollback
            | Action::Repair
            | Action::MoveBack
            | Action::Open
            | Action::Mark
    )
}

fn on_action(app: &mut App, action: Action) -> Vec<Command> {
    // A key that acts on the row under a cursor nobody moved yet (it sits
    // on the top row): from now on the cursor stays on that migration, so
    // the highlight and the confirmation that follows name the same one
    // while the table re-sorts under them.
    if app.migration_id.is_none() && acts_on_a_row(action) {
        app.migration_id = app.migration_at(app.migration_row);
    }
    match action {
        Action::Quit => {
            app.quit = true;
            return vec![Command::Quit];
        }
        Action::Help => app.dialog = Some(Dialog::Help),
        Action::Back => match app.view {
            View::Overview => {
                app.marked.clear();
                clear_filter(app);
            }
            View::Detail(_) => {
                app.view = std::mem::replace(&mut app.detail_from, View::Overview);
                app.logs = None;
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
        Action::FocusNext | Action::FocusPrev if app.view == View::Evacuations => {
            app.evacuation_list_focused = !app.evacuation_list_focused;
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
        Action::Open if app.view == View::Evacuations && app.evacuation_list_focused => {
            app.evacuation_list_focused = false;
        }
        Action::Open => return open_detail(app),
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
        Action::RetryElsewhere => return pick_destination(app),
        Action::Rollback => rollback(app),
        Action::Repair => repair(app),
        Action::MoveBack => move_back(app),
        Action::NewMigration => new_migration(app),
        Action::Evacuate => evacuate(app),
        Action::Undrain => undrain(app),
        Action::Doctor => return doctor(app),
        Action::Evacuations => show_evacuations(app),
        Action::PauseResume => return pause_or_resume(app),
        Action::CancelEvacuation => cancel_evacuation(app),
    }
    Vec::new()
}

/// Drill into the selected migration; from the evacuations view, the
/// selected VM's, and esc comes back there.
fn open_detail(app: &mut App) -> Vec<Command> {
    let Some((id, source, hosts)) = app.selected_migration().map(|m| {
        (
            m.record.id.clone(),
            m.record.source.clone(),
            MigrationLogs::hosts_of(m),
        )
    }) else {
        if app.view == View::Evacuations
            && let Some(vm) = app.selected_evacuation_vm()
        {
            let why = vm
                .waiting
                .clone()
                .unwrap_or_else(|| "it has no migration yet".to_string());
            app.say(format!("{}: {why}", vm.name), false);
        }
        return Vec::new();
    };
    app.detail_from = match app.view {
        View::Evacuations => View::Evacuations,
        _ => View::Overview,
    };
    app.view = View::Detail(id.clone());
    app.logs = Some(MigrationLogs {
        id: id.clone(),
        loading: true,
        ..MigrationLogs::default()
    });
    // Who started, aborted, retried or forced it: the source's trail; and
    // what its hosts logged about it.
    vec![
        Command::LoadLogs {
            id: id.clone(),
            hosts,
        },
        Command::LoadActions { host: source, id },
    ]
}

/// While a detail is open (and the view not frozen), ask its hosts for
/// their log lines again every [`LOGS_REFRESH_MS`], one fetch at a time.
fn refresh_logs(app: &mut App) -> Vec<Command> {
    let View::Detail(id) = &app.view else {
        return Vec::new();
    };
    if app.frozen.is_some() {
        return Vec::new();
    }
    let now = app.live.now_ms;
    let hosts = match app.live.migrations.get(id) {
        Some(m) => MigrationLogs::hosts_of(m),
        None => return Vec::new(),
    };
    let Some(logs) = app.logs.as_mut().filter(|l| &l.id == id) else {
        return Vec::new();
    };
    let due = logs
        .fetched_ms
        .is_none_or(|at| now.saturating_sub(at) >= LOGS_REFRESH_MS);
    if logs.loading || !due {
        return Vec::new();
    }
    logs.loading = true;
    vec![Command::LoadLogs {
        id: id.clone(),
        hosts,
    }]
}

fn show_evacuations(app: &mut App) {
    app.view = View::Evacuations;
    app.evacuation_list_focused = false;
    if app.state().evacuations.is_empty() {
        app.say(
            "no evacuations yet: select a host (tab) and press e to start one",
            false,
        );
    }
}

/// Host actions act on the hosts table's cursor; anywhere else the cursor
/// may not be on screen, so the first press only shows the hosts.
fn host_for(app: &mut App, what: &str, key: char) -> Option<String> {
    if app.view == View::Overview && app.focus == Focus::Hosts {
        return app.selected_host().map(str::to_string);
    }
    app.view = View::Overview;
    app.focus = Focus::Hosts;
    app.say(
        format!("choose the host to {what} (j/k), then press {key} again"),
        false,
    );
    None
}

/// Examine the selected host as `tern doctor` does; the findings fill the
/// dialog when they come (a second or so: the agent measures KVM).
fn doctor(app: &mut App) -> Vec<Command> {
    let Some(host) = host_for(app, "check", 'D') else {
        return Vec::new();
    };
    app.dialog = Some(Dialog::Doctor {
        host: host.clone(),
        findings: None,
    });
    vec![Command::Doctor { host }]
}

fn evacuate(app: &mut App) {
    let Some(host) = host_for(app, "evacuate", 'e') else {
        return;
    };
    let state = app.state();
    let Some(view) = state.host(&host) else {
        return;
    };
    if let Link::Lost { error, .. } = &view.link {
        app.say(
            format!("cannot evacuate {host}: its agent is unreachable ({error})"),
            true,
        );
        return;
    }
    if let Link::Silent { deadline_ms, .. } = &view.link {
        app.say(
            format!(
                "cannot evacuate {host}: its agent does not answer (no answer in {})",
                crate::cli::output::seconds_text(*deadline_ms)
            ),
            true,
        );
        return;
    }
    if let Some(active) = state.active_evacuation(&host) {
        let c = active.counts();
        let text = format!(
            "{host} is already being evacuated by {} ({} of {} moved): E shows it",
            active.id, c.moved, c.total
        );
        app.say(text, true);
        return;
    }
    let vms = state
        .vms
        .iter()
        .filter(|((h, _), v)| *h == host && v.state != proto::GuestState::Incoming as i32)
        .count();
    let exclude = state
        .hosts
        .iter()
        .filter(|h| h.name != host)
        .map(|h| Exclusion {
            host: h.name.clone(),
            excluded: false,
            note: match (&h.link, &h.info) {
                (Link::Lost { .. }, _) => Some("unreachable".into()),
                (Link::Silent { .. }, _) => Some("not answering".into()),
                (Link::Connecting, _) | (_, None) => Some("not connected yet".into()),
                (_, Some(info)) if info.draining => Some("draining: takes nothing".into()),
                _ => None,
            },
        })
        .collect();
    let max_outgoing = view
        .info
        .as_ref()
        .map(|i| i.max_outgoing)
        .filter(|n| *n > 0);
    app.dialog = Some(Dialog::Evacuate(EvacuateForm {
        host,
        vms,
        mode: app.default_mode,
        completion: CompletionChoice::default(),
        concurrency: 0,
        max_outgoing,
        max_attempts: DEFAULT_MAX_ATTEMPTS,
        exclude,
        row: EvacuateForm::MODE,
        typing: false,
    }));
}

/// Undrain the host whose evacuation is shown, or the hosts table's.
fn undrain(app: &mut App) {
    let host = if app.view == View::Evacuations {
        app.selected_evacuation().map(|e| e.host.clone())
    } else {
        host_for(app, "undrain", 'u')
    };
    let Some(host) = host else {
        return;
    };
    let state = app.state();
    if let Some(active) = state.active_evacuation(&host) {
        let text = format!(
            "{host} is still being evacuated by {}: cancel it first (c in the evacuations view)",
            active.id
        );
        app.say(text, true);
        return;
    }
    let draining = state
        .host(&host)
        .and_then(|h| h.info.as_ref())
        .map(|i| i.draining);
    if draining == Some(false) {
        app.say(format!("{host} is not draining"), true);
        return;
    }
    app.dialog = Some(Dialog::Confirm {
        title: format!("Undrain {host}?"),
        lines: vec![format!(
            "{host} accepts incoming migrations again: new migrations and other hosts' evacuations may place VMs on it"
        )],
        commands: vec![Command::Undrain { host }],
    });
}

/// The evacuation `p` and `c` act on: the one the evacuations view shows.
fn evacuation_target(app: &mut App, key: char) -> Option<Evacuation> {
    if app.view != View::Evacuations {
        app.say(
            format!("{key} acts on the evacuation shown in the evacuations view: press E"),
            true,
        );
        return None;
    }
    let found = app.selected_evacuation().cloned();
    if found.is_none() {
        app.say("no evacuation to act on", true);
    }
    found
}

/// Pause a running evacuation, resume a paused one. The control is chosen
/// from what is shown: if that is stale, the agent refuses it and says why.
fn pause_or_resume(app: &mut App) -> Vec<Command> {
    let Some(e) = evacuation_target(app, 'p') else {
        return Vec::new();
    };
    let control = match e.state {
        JobState::Paused => proto::EvacuationControl::Resume,
        JobState::Running => proto::EvacuationControl::Pause,
        other => {
            app.say(
                format!(
                    "evacuation {} is {}: nothing to pause or resume",
                    e.id,
                    other.as_str()
                ),
                true,
            );
            return Vec::new();
        }
    };
    let command = Command::ControlEvacuation {
        host: e.host,
        id: e.id,
        control,
    };
    app.say(format!("sent: {}", command.describe()), false);
    vec![command]
}

fn cancel_evacuation(app: &mut App) {
    let Some(e) = evacuation_target(app, 'c') else {
        return;
    };
    if e.state.is_over() || (e.state == JobState::Cancelling && e.abort_in_flight) {
        app.say(
            format!(
                "evacuation {} is {}: nothing to cancel",
                e.id,
                e.state.as_str()
            ),
            true,
        );
        return;
    }
    app.dialog = Some(Dialog::CancelEvacuation {
        host: e.host,
        id: e.id,
        cancelling: e.state == JobState::Cancelling,
    });
}

fn other_mode(mode: Mode) -> Mode {
    match mode {
        Mode::Fast => Mode::Safe,
        Mode::Safe => Mode::Fast,
    }
}

fn move_by(app: &mut App, delta: isize) {
    if app.view == View::Evacuations && app.evacuation_list_focused {
        let ids: Vec<String> = app
            .state()
            .ordered_evacuations()
            .iter()
            .map(|e| e.id.clone())
            .collect();
        let current = app
            .selected_evacuation()
            .and_then(|e| ids.iter().position(|id| *id == e.id))
            .unwrap_or(0);
        let next = (current as isize)
            .saturating_add(delta)
            .clamp(0, ids.len().saturating_sub(1) as isize) as usize;
        if let Some(id) = ids.get(next)
            && next != current
        {
            app.evacuation = Some(id.clone());
            app.evacuation_vm_row = 0;
            app.evacuation_vm = None;
        }
        return;
    }
    let vm_count = app.selected_evacuation().map_or(0, |e| e.vms.len());
    let (row, len) = match (&app.view, app.focus) {
        (View::Evacuations, _) => (&mut app.evacuation_vm_row, vm_count),
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
    // The cursor is on what the operator moved it to, by id from now on.
    match (&app.view, app.focus) {
        (View::Evacuations, _) => {
            app.evacuation_vm = app.selected_evacuation_vm().map(|vm| vm.name.clone());
        }
        (View::Overview, Focus::Hosts) => {}
        _ => app.select_row(app.migration_row),
    }
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

/// Outcomes that ring the bell.
fn needs_an_operator(outcome: i32) -> bool {
    matches!(
        proto::Outcome::try_from(outcome),
        Ok(proto::Outcome::Failed | proto::Outcome::Unresolved | proto::Outcome::Lost)
    )
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
    let targets = failed
        .iter()
        .map(|r| RetryTarget {
            id: r.id.clone(),
            vm: r.vm.clone(),
            source: r.source.clone(),
            destination: r.destination.clone(),
            attempt: r.attempt,
            error: r.error.clone(),
            last: policy_of(r),
        })
        .collect();
    app.dialog = Some(Dialog::Retry(RetryForm {
        targets,
        mode: app.default_mode,
        completion: CompletionChoice::default(),
    }));
}

/// Every host, each to be asked about (the one `vm` runs on excepted),
/// with where `vm` failed before.
pub fn destinations(state: &ClusterState, vm: &str) -> Vec<Choice> {
    let runs_on = state.vm_host(vm);
    state
        .hosts
        .iter()
        .map(|h| Choice {
            host: h.name.clone(),
            eligibility: match runs_on == Some(h.name.as_str()) {
                true => Eligibility::RunsHere,
                false => Eligibility::Checking,
            },
            failed_here: failed_here(state, vm, &h.name),
        })
        .collect()
}

/// Why a host cannot be chosen, in the picker's words.
pub fn eligibility_text(vm: &str, eligibility: &Eligibility) -> String {
    match eligibility {
        Eligibility::RunsHere => format!("{vm} runs here"),
        Eligibility::Checking => "checking…".to_string(),
        Eligibility::Eligible => "eligible".to_string(),
        Eligibility::Refused(why) => why.clone(),
        Eligibility::NoAnswer(why) => format!("no answer: {why}"),
    }
}

/// Ask `from` about every choice still being checked.
fn checks(from: &str, vm: &str, mode: Mode, choices: &[Choice]) -> Vec<Command> {
    choices
        .iter()
        .filter(|c| c.eligibility == Eligibility::Checking)
        .map(|c| Command::Check {
            host: from.to_string(),
            vm: vm.to_string(),
            destination: c.host.clone(),
            mode,
        })
        .collect()
}

/// When `vm` last failed on `host` and why, from every attempt the console
/// knows of (each migration's latest and its earlier ones).
fn failed_here(state: &ClusterState, vm: &str, host: &str) -> Option<String> {
    let failed = |r: &&proto::MigrationRecord| {
        r.vm == vm
            && r.destination == host
            && matches!(
                proto::Outcome::try_from(r.outcome),
                Ok(proto::Outcome::Failed | proto::Outcome::Aborted)
            )
    };
    let last = state
        .migrations
        .values()
        .flat_map(|m| m.history.iter().chain(std::iter::once(&m.record)))
        .filter(failed)
        .max_by_key(|r| r.updated_at_ms)?;
    let ago = crate::cli::output::seconds_text(state.now_ms.saturating_sub(last.updated_at_ms));
    // The failing feature and stage as the migration's row says it.
    let why = Some(super::views::feature_summary(last))
        .filter(|(_, failing)| *failing)
        .map(|(summary, _)| summary)
        .unwrap_or_else(|| {
            let outcome = proto::Outcome::try_from(last.outcome)
                .map(|o| o.as_str_name().to_lowercase())
                .unwrap_or_default();
            let first: String = last.error.chars().take(48).collect();
            match first.is_empty() {
                true => outcome,
                false if last.error.chars().count() > 48 => format!("{first}…"),
                false => first,
            }
        });
    Some(format!("failed here {ago} ago: {why}"))
}

/// Offer every host and ask the VM's source about each; the cursor starts
/// on the first host the VM does not run on and did not fail on, else the
/// first that is not where the last attempt failed (`avoid`). It stays
/// where it is as answers come in.
#[allow(clippy::too_many_arguments)]
fn picker(
    app: &mut App,
    title: String,
    vm: String,
    retry: Option<String>,
    from: String,
    avoid: Option<&str>,
    last: Option<(Mode, Completion)>,
) -> Vec<Command> {
    let choices = destinations(app.state(), &vm);
    let elsewhere = |c: &&Choice| c.eligibility != Eligibility::RunsHere;
    let selected = choices
        .iter()
        .position(|c| elsewhere(&c) && c.failed_here.is_none())
        .or_else(|| {
            choices
                .iter()
                .position(|c| elsewhere(&c) && Some(c.host.as_str()) != avoid)
        })
        .or_else(|| choices.iter().position(|c| elsewhere(&c)))
        .unwrap_or(0);
    let mode = app.default_mode;
    let commands = checks(&from, &vm, mode, &choices);
    app.dialog = Some(Dialog::Picker {
        title,
        vm,
        retry,
        from,
        choices,
        selected,
        mode,
        completion: CompletionChoice::default(),
        last,
    });
    commands
}

fn pick_destination(app: &mut App) -> Vec<Command> {
    let Some(record) = app.selected_migration().map(|m| m.record.clone()) else {
        app.say("select a failed migration first", true);
        return Vec::new();
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
        return Vec::new();
    }
    if let Some(moved) = moved_since(app.state(), &record) {
        app.say(moved, true);
        return Vec::new();
    }
    picker(
        app,
        format!("Retry {} ({}) on another host", record.id, record.vm),
        record.vm.clone(),
        Some(record.id.clone()),
        record.source.clone(),
        Some(&record.destination),
        Some(policy_of(&record)),
    )
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
    });
}

/// `R`: repair the selected degraded VM where it runs, after a confirmation
/// that names the VM, the host and the stages it re-runs.
fn repair(app: &mut App) {
    let Some(record) = app.selected_migration().map(|m| m.record.clone()) else {
        app.say("select a degraded migration to repair", true);
        return;
    };
    let record = MigrationRecord::from(&record);
    if let Some(now) = app.state().vm_host(&record.vm)
        && now != record.running_on
    {
        app.say(
            format!(
                "{} now runs on {now}, not on {} where {} left it: nothing to repair there",
                record.vm, record.running_on, record.id
            ),
            true,
        );
        return;
    }
    let plans = match crate::protocol::repair::plan(&record, None) {
        Ok(plans) => plans,
        Err(e) => {
            app.say(e.to_string(), true);
            return;
        }
    };
    let mut lines: Vec<String> = plans
        .iter()
        .map(|p| {
            let stages: Vec<&str> = p.stages.iter().map(|s| s.as_str()).collect();
            let failed = record
                .features
                .iter()
                .find(|f| f.name == p.feature)
                .and_then(|f| f.error.clone())
                .map(|e| format!(" (failed: {e})"))
                .unwrap_or_default();
            format!(
                "re-run {} {} on {}{failed}",
                p.feature,
                stages.join(" then "),
                record.running_on
            )
        })
        .collect();
    lines.push(format!(
        "{} keeps running on {}; the result goes into {}'s record on {}",
        record.vm, record.running_on, record.id, record.source
    ));
    app.dialog = Some(Dialog::Confirm {
        title: format!("Repair {} on {}?", record.vm, record.running_on),
        lines,
        commands: vec![Command::Repair {
            host: record.source.clone(),
            vm: record.vm.clone(),
            feature: None,
        }],
    });
}

/// `B`: move a VM a migration moved (succeeded or degraded) back to where it
/// came from: a new migration from where it runs to the old source, in the
/// default mode (the answer DESIGN gives to "abort after commit").
fn move_back(app: &mut App) {
    let Some(record) = app.selected_migration().map(|m| m.record.clone()) else {
        app.say("select a moved migration to move its VM back", true);
        return;
    };
    if !matches!(
        outcome(&record),
        proto::Outcome::Succeeded | proto::Outcome::Degraded
    ) {
        app.say(
            format!(
                "{} did not move {} (it is {}): nothing to move back",
                record.id,
                record.vm,
                outcome_from_proto(record.outcome).map_or("running", |o| o.as_str())
            ),
            true,
        );
        return;
    }
    let (from, to) = (record.running_on.clone(), record.source.clone());
    if let Some(now) = app.state().vm_host(&record.vm)
        && now != from
    {
        app.say(
            format!(
                "{} now runs on {now}, not on {from} where {} left it: start a new migration (n) instead",
                record.vm, record.id
            ),
            true,
        );
        return;
    }
    let mode = app.default_mode;
    let completion = Completion::for_mode(mode);
    let safe = match mode {
        Mode::Safe => format!(
            "safe mode: if a required feature fails on {to}, {} stays on {from}",
            record.vm
        ),
        Mode::Fast => format!(
            "fast mode: {} moves even if a feature fails on {to} (then degraded)",
            record.vm
        ),
    };
    app.dialog = Some(Dialog::Confirm {
        title: format!("Move {} back to {to}?", record.vm),
        lines: vec![
            format!(
                "{} {from} → {to}, where {} brought it from",
                record.vm, record.id
            ),
            format!("{} ({})", safe, completion.describe()),
            format!("esc, m, B: in {} mode instead", other_mode(mode).as_str()),
        ],
        commands: vec![Command::Start {
            host: from,
            vm: record.vm.clone(),
            destination: to,
            mode,
            completion,
        }],
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
        Dialog::Help | Dialog::Message(_) | Dialog::Doctor { .. } => {
            if key.code == KeyCode::Char('q') {
                app.quit = true;
                return vec![Command::Quit];
            }
            Vec::new()
        }
        Dialog::Confirm {
            title,
            lines,
            commands,
        } => match key.code {
            KeyCode::Char('y') | KeyCode::Enter => {
                app.marked.clear();
                app.say(format!("sent: {}", describe_all(&commands)), false);
                commands
            }
            KeyCode::Char('n') | KeyCode::Esc => Vec::new(),
            _ => {
                app.dialog = Some(Dialog::Confirm {
                    title,
                    lines,
                    commands,
                });
                Vec::new()
            }
        },
        Dialog::Retry(mut form) => {
            match key.code {
                KeyCode::Char('y') | KeyCode::Enter => {
                    let commands = form.commands();
                    app.marked.clear();
                    app.say(format!("sent: {}", describe_all(&commands)), false);
                    return commands;
                }
                KeyCode::Char('n') | KeyCode::Esc => return Vec::new(),
                KeyCode::Char('m') => form.mode = other_mode(form.mode),
                code => {
                    let base = form.base();
                    completion_key(app, &mut form.completion, base, code);
                }
            }
            keep_typing(&mut form.completion, key.code);
            app.dialog = Some(Dialog::Retry(form));
            Vec::new()
        }
        Dialog::Picker {
            title,
            vm,
            retry,
            from,
            mut choices,
            mut selected,
            mut mode,
            mut completion,
            last,
        } => {
            let mut recheck = Vec::new();
            match key.code {
                KeyCode::Esc | KeyCode::Char('q') => return Vec::new(),
                KeyCode::Char('j') | KeyCode::Down => {
                    selected = (selected + 1).min(choices.len().saturating_sub(1))
                }
                KeyCode::Char('k') | KeyCode::Up => selected = selected.saturating_sub(1),
                // Another mode, other checks (which features are mandatory):
                // every host is asked again.
                KeyCode::Char('m') => {
                    mode = other_mode(mode);
                    for c in &mut choices {
                        if c.eligibility != Eligibility::RunsHere {
                            c.eligibility = Eligibility::Checking;
                        }
                    }
                    recheck = checks(&from, &vm, mode, &choices);
                }
                KeyCode::Enter => match choices.get(selected) {
                    Some(Choice {
                        host,
                        eligibility: Eligibility::Eligible,
                        ..
                    }) => {
                        let policy = completion.over(base(mode, last));
                        let command = match retry {
                            Some(id) => Command::Retry {
                                host: from,
                                id,
                                destination: Some(host.clone()),
                                mode,
                                completion: policy,
                            },
                            None => Command::Start {
                                host: from,
                                vm,
                                destination: host.clone(),
                                mode,
                                completion: policy,
                            },
                        };
                        app.say(format!("sent: {}", command.describe()), false);
                        return vec![command];
                    }
                    Some(Choice {
                        host,
                        eligibility: Eligibility::Checking,
                        ..
                    }) => app.say(
                        format!("{host}: still asking {from} whether it can take {vm}"),
                        true,
                    ),
                    Some(Choice {
                        host, eligibility, ..
                    }) => app.say(
                        format!(
                            "{host} cannot take {vm}: {}",
                            eligibility_text(vm.as_str(), eligibility)
                        ),
                        true,
                    ),
                    None => {}
                },
                code => {
                    completion_key(app, &mut completion, base(mode, last), code);
                }
            }
            keep_typing(&mut completion, key.code);
            app.dialog = Some(Dialog::Picker {
                title,
                vm,
                retry,
                from,
                choices,
                selected,
                mode,
                completion,
                last,
            });
            recheck
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
                        return picker(
                            app,
                            format!("Migrate {vm} from {host} to"),
                            vm,
                            None,
                            host,
                            None,
                            None,
                        );
                    }
                }
                _ => {}
            }
            app.dialog = Some(Dialog::ChooseVm { vms, selected });
            Vec::new()
        }
        Dialog::Evacuate(mut form) => {
            match key.code {
                KeyCode::Esc | KeyCode::Char('q') => return Vec::new(),
                KeyCode::Char('j') | KeyCode::Down | KeyCode::Tab => {
                    form.row = (form.row + 1).min(form.rows() - 1)
                }
                KeyCode::Char('k') | KeyCode::Up | KeyCode::BackTab => {
                    form.row = form.row.saturating_sub(1)
                }
                KeyCode::Char('h' | '-') | KeyCode::Left => {
                    if let Err(why) = form.adjust(-1) {
                        app.say(why, true);
                    }
                }
                KeyCode::Char('l' | '+') | KeyCode::Right => {
                    if let Err(why) = form.adjust(1) {
                        app.say(why, true);
                    }
                }
                KeyCode::Char(' ') => {
                    if let Err(why) = form.toggle() {
                        app.say(why, true);
                    }
                }
                KeyCode::Char('m') => form.mode = other_mode(form.mode),
                KeyCode::Char(c) if c.is_ascii_digit() => form.type_digit(c.to_digit(10)),
                KeyCode::Backspace => form.type_digit(None),
                code @ KeyCode::Char('p' | 'b' | 'w') => {
                    let base = form.base();
                    completion_key(app, &mut form.completion, base, code);
                }
                KeyCode::Enter | KeyCode::Char('y') => match form.command() {
                    Ok(command) => {
                        app.say(format!("sent: {}", command.describe()), false);
                        // Show it: the agent's first report of the new
                        // evacuation makes it the newest.
                        app.view = View::Evacuations;
                        let known = app.state().evacuations.keys().cloned().collect();
                        app.awaited_evacuation = Some((form.host.clone(), known));
                        app.evacuation_list_focused = false;
                        return vec![command];
                    }
                    Err(why) => app.say(why, true),
                },
                _ => {}
            }
            // Any key but a digit or backspace ends the typing of a number.
            if !matches!(key.code, KeyCode::Char('0'..='9') | KeyCode::Backspace) {
                form.typing = false;
            }
            keep_typing(&mut form.completion, key.code);
            app.dialog = Some(Dialog::Evacuate(form));
            Vec::new()
        }
        Dialog::CancelEvacuation {
            host,
            id,
            cancelling,
        } => {
            let control = match key.code {
                KeyCode::Esc | KeyCode::Char('n' | 'q') => return Vec::new(),
                KeyCode::Char('a') => Some(proto::EvacuationControl::CancelAbort),
                KeyCode::Char('f' | 'y') | KeyCode::Enter if !cancelling => {
                    Some(proto::EvacuationControl::Cancel)
                }
                _ => None,
            };
            let Some(control) = control else {
                app.dialog = Some(Dialog::CancelEvacuation {
                    host,
                    id,
                    cancelling,
                });
                return Vec::new();
            };
            let command = Command::ControlEvacuation { host, id, control };
            app.say(format!("sent: {}", command.describe()), false);
            vec![command]
        }
    }
}

/// `p`, `b`, `w`, digits and backspace on a dialog's completion choices
/// (see [`super::completion`]); other keys are not theirs. A choice that
/// is not on offer says why in the status line.
fn completion_key(app: &mut App, choice: &mut CompletionChoice, base: Completion, code: KeyCode) {
    match code {
        KeyCode::Char('p') => choice.next_postcopy(base),
        KeyCode::Char('b') => choice.next_budget(base),
        KeyCode::Char('w') => {
            if let Err(why) = choice.toggle_when_spent(base) {
                app.say(why, true);
            }
        }
        KeyCode::Char(c) if c.is_ascii_digit() => {
            choice.type_budget(base, c.to_digit(10).map(u64::from))
        }
        KeyCode::Backspace => choice.type_budget(base, None),
        _ => {}
    }
}

/// Any key but a digit or backspace ends the typing of a budget.
fn keep_typing(choice: &mut CompletionChoice, code: KeyCode) {
    if !matches!(code, KeyCode::Char('0'..='9') | KeyCode::Backspace) {
        choice.stop_typing();
    }
}

fn describe_all(commands: &[Command]) -> String {
    commands
        .iter()
        .map(Command::describe)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Show every migration again. A notice that a migration left the
/// filtered view no longer holds, and goes with the filter.
fn clear_filter(app: &mut App) {
    app.filter.clear();
    if app.moved_notice.take().is_some() {
        app.status = None;
    }
}

fn on_input(app: &mut App, key: KeyEvent) -> Vec<Command> {
    let Some(mut input) = app.input.take() else {
        return Vec::new();
    };
    match key.code {
        KeyCode::Esc => {
            if input.kind == InputKind::Filter {
                clear_filter(app);
            }
        }
        KeyCode::Enter => match input.kind {
            InputKind::Filter => app.filter = input.text.trim().to_string(),
            InputKind::Command => return run_command(app, input.text.trim()),
        },
        KeyCode::Backspace => {
            input.text.pop();
            app.input = Some(input);
        }
        KeyCode::Char(c) => {
            input.text.push(c);
            if input.kind == InputKind::Filter {
                // Live filtering as the operator types; the cursor stays on
                // its migration while the filter shows it.
                app.filter = input.text.trim().to_string();
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
        (Some("evacuations" | "evacuation" | "evac"), _) => show_evacuations(app),
        (Some("events"), _) => app.view = View::Events,
        (Some("theme"), Some(name)) => app.theme = name.to_string(),
        (Some("theme"), None) => app.say(":theme needs a name", true),
        (Some(other), _) => app.say(
            format!(
                "unknown command :{other} (try :hosts :migrations :vms :events :evacuations :theme NAME :q)"
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
    use crate::protocol::completion::{Postcopy, WhenSpent};
    use proto::event::Kind;

    fn press(app: &mut App, keys: &[Msg]) -> Vec<Command> {
        keys.iter().flat_map(|k| update(app, k.clone())).collect()
    }

    fn select(app: &mut App, id: &str) {
        let row = app
            .rows()
            .iter()
            .position(|m| m.record.id == id)
            .expect("in the table");
        app.select_row(row);
    }

    /// A Check answer from `source` about moving `vm` to `destination`: a
    /// check on each side that passed, and `failing` (host, name, detail).
    fn check_reply(
        vm: &str,
        source: &str,
        destination: &str,
        failing: Option<(&str, &str, &str)>,
    ) -> proto::CheckReply {
        let check = |host: &str, name: &str, ok: bool, detail: &str| proto::AdmissionCheck {
            name: name.into(),
            host: host.into(),
            ok,
            detail: detail.into(),
        };
        let mut checks = vec![
            check(source, "lock", true, "not migrating"),
            check(destination, "capacity", true, "room enough"),
        ];
        if let Some((host, name, detail)) = failing {
            checks.push(check(host, name, false, detail));
        }
        proto::CheckReply {
            vm: vm.into(),
            source: source.into(),
            destination: destination.into(),
            mode: 0,
            checks,
        }
    }

    /// The VM's source answers the open picker about every host still
    /// being checked: each can take the VM, but those `refused` (the
    /// destination, then the failing check's host, name and detail).
    fn answer_picker(app: &mut App, refused: &[(&str, (&str, &str, &str))]) {
        let Some(Dialog::Picker {
            vm,
            from,
            mode,
            choices,
            ..
        }) = &app.dialog
        else {
            panic!("no picker: {:?}", app.dialog)
        };
        let answers: Vec<Msg> = choices
            .iter()
            .filter(|c| c.eligibility == Eligibility::Checking)
            .map(|c| {
                let failing = refused.iter().find(|r| r.0 == c.host).map(|r| r.1);
                Msg::Checked {
                    source: from.clone(),
                    vm: vm.clone(),
                    destination: c.host.clone(),
                    mode: *mode,
                    answer: Ok(check_reply(vm, from, &c.host, failing)),
                }
            })
            .collect();
        for answer in answers {
            assert!(update(app, answer).is_empty());
        }
    }

    fn picker_choices(app: &App) -> &[Choice] {
        match &app.dialog {
            Some(Dialog::Picker { choices, .. }) => choices,
            other => panic!("no picker: {other:?}"),
        }
    }

    fn eligibility_of(app: &App, host: &str) -> Eligibility {
        picker_choices(app)
            .iter()
            .find(|c| c.host == host)
            .map(|c| c.eligibility.clone())
            .expect("offered")
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
                // The policy follows the mode the operator switched to.
                completion: Completion::for_mode(Mode::Fast),
            }]
        );
    }

    fn policy(postcopy: Postcopy, budget: u64, when_spent: WhenSpent) -> Completion {
        Completion {
            timeout_per_gib_s: budget,
            postcopy,
            downtime_limit_ms: 0,
            when_spent,
        }
    }

    #[test]
    fn the_retry_dialog_sends_the_completion_policy_chosen_in_it() {
        let mut app = fixture();
        select(&mut app, "m-fail");
        // Enter alone: the last attempt's policy (safe's default).
        assert_eq!(
            press(&mut app, &[key('r'), code(KeyCode::Enter)]),
            [Command::Retry {
                host: "hv-b".into(),
                id: "m-fail".into(),
                destination: None,
                mode: Mode::Safe,
                completion: policy(Postcopy::Never, 150, WhenSpent::Abort),
            }]
        );
        // Post-copy never, a budget of 40 s per GiB typed, continue once spent.
        let commands = press(
            &mut app,
            &[key('r'), key('4'), key('0'), key('w'), key('y')],
        );
        assert_eq!(
            commands,
            [Command::Retry {
                host: "hv-b".into(),
                id: "m-fail".into(),
                destination: None,
                mode: Mode::Safe,
                completion: policy(Postcopy::Never, 40, WhenSpent::Continue),
            }]
        );
        // Post-copy now, no budget (b steps 150 → 300 → 600 → none).
        let commands = press(
            &mut app,
            &[
                key('r'),
                key('p'),
                key('p'),
                key('b'),
                key('b'),
                key('b'),
                key('y'),
            ],
        );
        assert!(
            matches!(&commands[..], [Command::Retry { completion, .. }]
                if *completion == policy(Postcopy::Now, 0, WhenSpent::Abort)),
            "{commands:?}"
        );
    }

    #[test]
    fn the_retry_dialog_never_sends_continue_with_post_copy_and_says_why() {
        let mut app = fixture();
        select(&mut app, "m-fail");
        // Switch to fast: its default is post-copy auto, where continue is refused.
        press(&mut app, &[key('r'), key('m'), key('w')]);
        assert!(
            app.status
                .as_ref()
                .is_some_and(|(s, e)| *e && s.contains("only for post-copy never")),
            "{:?}",
            app.status
        );
        let commands = press(&mut app, &[key('y')]);
        let [Command::Retry { completion, .. }] = &commands[..] else {
            panic!("{commands:?}")
        };
        assert_eq!(*completion, Completion::for_mode(Mode::Fast));
        assert_eq!(completion.check(), Ok(()));
    }

    #[test]
    fn a_retry_keeps_the_last_attempts_policy_unless_the_mode_changes() {
        let mut app = fixture();
        let own = policy(Postcopy::Now, 20, WhenSpent::Abort);
        app.live
            .migrations
            .get_mut("m-fail")
            .unwrap()
            .record
            .completion = Some(crate::protocol::record::completion_to_proto(&own));
        select(&mut app, "m-fail");
        let same = press(&mut app, &[key('r'), key('y')]);
        assert!(
            matches!(&same[..], [Command::Retry { completion, .. }] if *completion == own),
            "{same:?}"
        );
        let fast = press(&mut app, &[key('r'), key('m'), key('y')]);
        assert!(
            matches!(&fast[..], [Command::Retry { completion, .. }]
                if *completion == Completion::for_mode(Mode::Fast)),
            "{fast:?}"
        );
        // On another host too.
        press(&mut app, &[key('d')]);
        answer_picker(&mut app, &[]);
        let elsewhere = press(&mut app, &[code(KeyCode::Enter)]);
        assert!(
            matches!(&elsewhere[..], [Command::Retry { completion, .. }] if *completion == own),
            "{elsewhere:?}"
        );
    }

    #[test]
    fn retry_on_another_host_takes_two_keys_from_the_failed_row() {
        let mut app = fixture();
        select(&mut app, "m-fail");
        press(&mut app, &[key('d')]);
        answer_picker(&mut app, &[]);
        let commands = press(&mut app, &[code(KeyCode::Enter)]);
        assert_eq!(
            commands,
            [Command::Retry {
                host: "hv-b".into(),
                id: "m-fail".into(),
                destination: Some("hv-a".into()),
                mode: Mode::Safe,
                completion: Completion::for_mode(Mode::Safe),
            }]
        );
    }

    #[test]
    fn the_picker_offers_the_completion_choices_and_a_picked_one_survives_the_mode() {
        let mut app = fixture();
        select(&mut app, "m-fail");
        // d asks db-01's source about every other host, in safe mode.
        let asked = press(&mut app, &[key('d')]);
        let check = |destination: &str, mode: Mode| Command::Check {
            host: "hv-b".into(),
            vm: "db-01".into(),
            destination: destination.into(),
            mode,
        };
        let every = |mode| {
            ["hv-a", "hv-c", "hv-d", "hv-e"]
                .into_iter()
                .map(|h| check(h, mode))
                .collect::<Vec<_>>()
        };
        assert_eq!(asked, every(Mode::Safe));
        answer_picker(&mut app, &[]);
        // b: 300 s per GiB; m: fast, whose default post-copy (auto) follows.
        // Another mode, other checks: every host is asked again.
        let asked = press(&mut app, &[key('b'), key('m')]);
        assert_eq!(asked, every(Mode::Fast));
        assert_eq!(eligibility_of(&app, "hv-a"), Eligibility::Checking);
        answer_picker(&mut app, &[]);
        let commands = press(&mut app, &[code(KeyCode::Enter)]);
        assert_eq!(
            commands,
            [Command::Retry {
                host: "hv-b".into(),
                id: "m-fail".into(),
                destination: Some("hv-a".into()),
                mode: Mode::Fast,
                completion: policy(Postcopy::Auto, 300, WhenSpent::Abort),
            }]
        );
    }

    #[test]
    fn the_picker_shows_what_the_source_answers_for_each_host_and_where_the_vm_failed() {
        let mut app = fixture();
        select(&mut app, "m-fail");
        press(&mut app, &[key('d')]);
        // Until the answers come: the VM's own host, and "checking…".
        assert_eq!(eligibility_of(&app, "hv-b"), Eligibility::RunsHere);
        for h in ["hv-a", "hv-c", "hv-d", "hv-e"] {
            assert_eq!(eligibility_of(&app, h), Eligibility::Checking, "{h}");
        }
        let Some(Dialog::Picker { selected, .. }) = &app.dialog else {
            panic!()
        };
        assert_eq!(
            picker_choices(&app)[*selected].host,
            "hv-a",
            "the first host db-01 neither runs on nor failed on is preselected"
        );
        // Enter before the answer sends nothing and says so.
        assert!(press(&mut app, &[code(KeyCode::Enter)]).is_empty());
        assert!(
            app.status
                .as_ref()
                .is_some_and(|(s, e)| *e && s.contains("hv-a: still asking hv-b")),
            "{:?}",
            app.status
        );
        answer_picker(
            &mut app,
            &[
                (
                    "hv-e",
                    (
                        "hv-e",
                        "drain",
                        "hv-e is draining (`tern undrain hv-e` ends that)",
                    ),
                ),
                (
                    "hv-a",
                    ("hv-b", "limits", "hv-b already sources 2 migrations"),
                ),
            ],
        );
        assert_eq!(
            eligibility_of(&app, "hv-e"),
            Eligibility::Refused("drain: hv-e is draining (`tern undrain hv-e` ends that)".into())
        );
        assert_eq!(
            eligibility_of(&app, "hv-a"),
            Eligibility::Refused("hv-b limits: hv-b already sources 2 migrations".into()),
            "a source-side refusal names its host"
        );
        // hv-c can take it, but db-01 failed there: the picker says when and why.
        assert_eq!(eligibility_of(&app, "hv-c"), Eligibility::Eligible);
        let failed = |h: &str| {
            picker_choices(&app)
                .iter()
                .find(|c| c.host == h)
                .and_then(|c| c.failed_here.clone())
        };
        let hv_c = failed("hv-c").expect("failed here");
        assert!(
            hv_c.starts_with("failed here ") && hv_c.ends_with(" ago: port-profile ✗ finish"),
            "{hv_c}"
        );
        assert_eq!(failed("hv-a"), None);
        // Enter on a refused host sends nothing and says why, whole.
        let commands = press(&mut app, &[code(KeyCode::Enter)]);
        assert!(commands.is_empty());
        assert!(
            app.status.as_ref().is_some_and(|(s, e)| *e
                && s == "hv-a cannot take db-01: hv-b limits: hv-b already sources 2 migrations"),
            "{:?}",
            app.status
        );
        let commands = press(&mut app, &[key('j'), code(KeyCode::Enter)]);
        assert!(commands.is_empty());
        assert!(
            app.status
                .as_ref()
                .is_some_and(|(s, e)| *e && s.contains("db-01 runs here"))
        );
    }

    #[test]
    fn stale_answers_are_ignored_and_a_host_that_does_not_answer_says_so() {
        let mut app = fixture();
        select(&mut app, "m-fail");
        press(&mut app, &[key('d')]);
        let answer = |destination: &str, mode: Mode, answer| Msg::Checked {
            source: "hv-b".into(),
            vm: "db-01".into(),
            destination: destination.into(),
            mode,
            answer,
        };
        // An answer for the other mode (switched since) changes nothing.
        let ok = Ok(check_reply("db-01", "hv-b", "hv-a", None));
        update(&mut app, answer("hv-a", Mode::Fast, ok.clone()));
        assert_eq!(eligibility_of(&app, "hv-a"), Eligibility::Checking);
        update(&mut app, answer("hv-a", Mode::Safe, ok));
        assert_eq!(eligibility_of(&app, "hv-a"), Eligibility::Eligible);
        // The source could not be asked.
        update(
            &mut app,
            answer("hv-c", Mode::Safe, Err("hv-b: no answer in 2 s".into())),
        );
        assert_eq!(
            eligibility_of(&app, "hv-c"),
            Eligibility::NoAnswer("hv-b: no answer in 2 s".into())
        );
        // The destination did not answer the source.
        let hung = check_reply(
            "db-01",
            "hv-b",
            "hv-d",
            Some(("hv-d", "reachable", "hv-d did not answer within 1000 ms")),
        );
        update(&mut app, answer("hv-d", Mode::Safe, Ok(hung)));
        assert_eq!(
            eligibility_of(&app, "hv-d"),
            Eligibility::NoAnswer("hv-d did not answer within 1000 ms".into())
        );
        assert_eq!(
            eligibility_text("db-01", &eligibility_of(&app, "hv-d")),
            "no answer: hv-d did not answer within 1000 ms"
        );
        // Once the picker is gone, an answer is nobody's.
        press(&mut app, &[code(KeyCode::Esc)]);
        let late = Ok(check_reply("db-01", "hv-b", "hv-e", None));
        assert!(update(&mut app, answer("hv-e", Mode::Safe, late)).is_empty());
        assert_eq!(app.dialog, None);
    }

    #[test]
    fn the_picker_does_not_start_on_the_host_where_the_attempt_just_failed() {
        let mut app = fixture();
        let failed = app.live.migrations.get_mut("m-fail").unwrap();
        failed.record.destination = "hv-a".into();
        select(&mut app, "m-fail");
        press(&mut app, &[key('d')]);
        answer_picker(&mut app, &[]);
        let commands = press(&mut app, &[code(KeyCode::Enter)]);
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
            let sent = press(&mut app, &[key(k), key('y'), code(KeyCode::Enter)]);
            assert!(!sent.iter().any(Command::changes_anything), "{sent:?}");
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
    fn big_r_repairs_a_degraded_vm_after_a_confirmation_naming_vm_host_and_stages() {
        let mut app = fixture_with_degraded();
        assert!(press(&mut app, &[key('R')]).is_empty(), "nothing before y");
        let Some(Dialog::Confirm { title, lines, .. }) = &app.dialog else {
            panic!("{:?}", app.dialog)
        };
        assert_eq!(title, "Repair app-02 on hv-c?");
        assert!(
            lines[0].starts_with("re-run port-profile finish then verify on hv-c")
                && lines[0].contains("ASSOCIATE app-02 rejected"),
            "{lines:?}"
        );
        assert!(lines[1].contains("m-deg's record on hv-a"), "{lines:?}");
        // The record's owner (the source) is asked; it asks hv-c.
        assert_eq!(
            press(&mut app, &[key('y')]),
            [Command::Repair {
                host: "hv-a".into(),
                vm: "app-02".into(),
                feature: None
            }]
        );
        assert!(app.dialog.is_none());
        // n or esc sends nothing.
        assert!(press(&mut app, &[key('R'), code(KeyCode::Esc)]).is_empty());
        assert!(app.dialog.is_none());
    }

    #[test]
    fn big_r_on_a_row_that_is_not_degraded_says_why_and_sends_nothing() {
        let mut app = fixture_with_degraded();
        for (id, why) in [
            ("m-ok", "ended succeeded, not degraded"),
            ("m-fail", "ended failed, not degraded"),
            ("m-run", "still running"),
        ] {
            select(&mut app, id);
            assert!(press(&mut app, &[key('R'), key('y')]).is_empty(), "{id}");
            assert_eq!(app.dialog, None, "{id}");
            assert!(
                app.status
                    .as_ref()
                    .is_some_and(|(s, error)| *error && s.contains(why)),
                "{id}: {:?}",
                app.status
            );
        }
        // A degraded VM that has moved on since is not repaired where it
        // no longer runs.
        let vm = app
            .live
            .vms
            .remove(&("hv-c".into(), "app-02".into()))
            .unwrap();
        app.live.vms.insert(("hv-b".into(), "app-02".into()), vm);
        select(&mut app, "m-deg");
        assert!(press(&mut app, &[key('R'), key('y')]).is_empty());
        assert!(
            app.status
                .as_ref()
                .is_some_and(|(s, _)| s.contains("app-02 now runs on hv-b")),
            "{:?}",
            app.status
        );
    }

    #[test]
    fn a_repair_that_fails_again_shows_its_cause_in_the_status_line() {
        let mut app = fixture_with_degraded();
        update(
            &mut app,
            Msg::Done {
                what: "repair app-02".into(),
                result: Err(
                    "app-02 is still degraded on hv-c: port-profile finish: port busy".into(),
                ),
            },
        );
        assert_eq!(
            app.status,
            Some((
                "repair app-02 failed: app-02 is still degraded on hv-c: port-profile finish: port busy"
                    .into(),
                true
            ))
        );
    }

    #[test]
    fn a_repaired_record_from_the_agent_replaces_the_degraded_row_and_the_cursor_stays() {
        let mut app = fixture_with_degraded();
        let mut repaired = degraded_migration("m-deg", "app-02", "hv-a", "hv-c");
        repaired.outcome = proto::Outcome::Succeeded as i32;
        repaired.features[0].finish = proto::StepStatus::Ok as i32;
        repaired.features[0].error.clear();
        repaired.error.clear();
        repaired.repairs.push(proto::RepairRecord {
            at_ms: 5_000,
            feature: "port-profile".into(),
            stages: vec!["finish".into()],
            host: "hv-c".into(),
            result: "ok".into(),
            error: String::new(),
            who: "ana (operator)".into(),
        });
        arrive(&mut app, "hv-a", repaired);
        assert_eq!(selected_id(&app).as_deref(), Some("m-deg"));
        let row = app.selected_migration().unwrap();
        assert_eq!(row.record.outcome, proto::Outcome::Succeeded as i32);
        assert_eq!(row.record.repairs.len(), 1);
        // Repaired, it is no longer offered a repair.
        press(&mut app, &[key('R')]);
        assert_eq!(app.dialog, None);
    }

    #[test]
    fn big_b_moves_a_moved_vm_back_to_its_source_after_a_confirmation() {
        let mut app = fixture_with_degraded();
        // A degraded one, in the default mode (safe).
        press(&mut app, &[key('B')]);
        let Some(Dialog::Confirm { title, lines, .. }) = &app.dialog else {
            panic!("{:?}", app.dialog)
        };
        assert_eq!(title, "Move app-02 back to hv-a?");
        assert!(lines[0].contains("app-02 hv-c → hv-a"), "{lines:?}");
        assert!(
            lines[1].starts_with("safe mode: if a required feature fails on hv-a"),
            "{lines:?}"
        );
        assert_eq!(
            press(&mut app, &[key('y')]),
            [Command::Start {
                host: "hv-c".into(),
                vm: "app-02".into(),
                destination: "hv-a".into(),
                mode: Mode::Safe,
                completion: Completion::for_mode(Mode::Safe),
            }]
        );
        // A succeeded one, in fast mode after m.
        select(&mut app, "m-ok");
        let sent = press(&mut app, &[key('m'), key('B'), key('y')]);
        assert_eq!(
            sent,
            [Command::Start {
                host: "hv-c".into(),
                vm: "app-01".into(),
                destination: "hv-a".into(),
                mode: Mode::Fast,
                completion: Completion::for_mode(Mode::Fast),
            }]
        );
        // The move back arrives as a new running migration, sorted above:
        // the cursor stays on the migration it was put on.
        arrive(
            &mut app,
            "hv-c",
            migration("m-back", "app-01", "hv-c", "hv-a", proto::Outcome::None),
        );
        assert_eq!(selected_id(&app).as_deref(), Some("m-ok"));
    }

    #[test]
    fn big_b_on_a_row_that_did_not_move_its_vm_or_whose_vm_moved_on_says_so() {
        let mut app = fixture_with_degraded();
        for id in ["m-fail", "m-run"] {
            select(&mut app, id);
            assert!(press(&mut app, &[key('B'), key('y')]).is_empty(), "{id}");
            assert_eq!(app.dialog, None);
            assert!(
                app.status
                    .as_ref()
                    .is_some_and(|(s, e)| *e && s.contains("nothing to move back")),
                "{id}: {:?}",
                app.status
            );
        }
        let vm = app
            .live
            .vms
            .remove(&("hv-c".into(), "app-01".into()))
            .unwrap();
        app.live.vms.insert(("hv-b".into(), "app-01".into()), vm);
        select(&mut app, "m-ok");
        assert!(press(&mut app, &[key('B'), key('y')]).is_empty());
        assert!(
            app.status
                .as_ref()
                .is_some_and(|(s, _)| s.contains("app-01 now runs on hv-b")),
            "{:?}",
            app.status
        );
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
        let asked = press(&mut app, &[key('n'), key('j'), code(KeyCode::Enter)]);
        assert!(
            asked
                .iter()
                .all(|c| matches!(c, Command::Check { host, vm, .. }
                if host == "hv-b" && vm == "db-01")),
            "{asked:?}"
        );
        answer_picker(&mut app, &[]);
        let commands = press(&mut app, &[code(KeyCode::Enter)]);
        assert_eq!(
            commands,
            [Command::Start {
                host: "hv-b".into(),
                vm: "db-01".into(),
                destination: "hv-a".into(),
                mode: Mode::Safe,
                completion: Completion::for_mode(Mode::Safe),
            }]
        );
        // A new migration's picker takes the same keys: post-copy auto.
        press(&mut app, &[key('n'), key('j'), code(KeyCode::Enter)]);
        answer_picker(&mut app, &[]);
        let commands = press(&mut app, &[key('p'), code(KeyCode::Enter)]);
        assert!(
            matches!(&commands[..], [Command::Start { completion, .. }]
                if *completion == policy(Postcopy::Auto, 150, WhenSpent::Abort)),
            "{commands:?}"
        );
    }

    fn evacuate_form(app: &App) -> &EvacuateForm {
        match &app.dialog {
            Some(Dialog::Evacuate(form)) => form,
            other => panic!("no evacuate dialog: {other:?}"),
        }
    }

    fn typed(text: &str) -> Vec<Msg> {
        text.chars().map(key).collect()
    }

    #[test]
    fn e_on_a_host_offers_the_cli_defaults_and_sends_them() {
        let mut app = fixture();
        assert!(press(&mut app, &[code(KeyCode::Tab), key('e')]).is_empty());
        let form = evacuate_form(&app);
        assert_eq!(form.host, "hv-a");
        assert_eq!(form.mode, Mode::Safe);
        assert_eq!(form.concurrency, 0, "0: the host's max_outgoing");
        assert_eq!(form.max_outgoing, Some(2), "shown as the number it means");
        assert_eq!(form.max_attempts, 3);
        let hosts: Vec<(&str, bool)> = form
            .exclude
            .iter()
            .map(|e| (e.host.as_str(), e.excluded))
            .collect();
        assert_eq!(
            hosts,
            [
                ("hv-b", false),
                ("hv-c", false),
                ("hv-d", false),
                ("hv-e", false)
            ]
        );
        assert_eq!(
            press(&mut app, &[code(KeyCode::Enter)]),
            [Command::Evacuate {
                host: "hv-a".into(),
                mode: Mode::Safe,
                completion: Completion::for_mode(Mode::Safe),
                concurrency: 0,
                max_attempts: 3,
                exclude: vec![],
            }]
        );
        assert_eq!(app.dialog, None);
        assert_eq!(
            app.view,
            View::Evacuations,
            "the view it will show up in opens at once"
        );
        assert_eq!(app.evacuation, None, "following the newest");
    }

    #[test]
    fn the_evacuate_dialog_choices_become_the_request() {
        let mut app = fixture();
        press(&mut app, &[code(KeyCode::Tab), key('e')]);
        // Mode: fast (post-copy auto follows). Post-copy: now. Budget: one
        // step up the ladder (300). When spent: nothing to choose with
        // post-copy, so down to concurrency: two to the right. Max
        // attempts: typed.
        press(
            &mut app,
            &[key('l'), key('j'), key('l'), key('j'), key('l')],
        );
        press(
            &mut app,
            &[key('j'), key('j'), key('l'), key('l'), key('j')],
        );
        press(&mut app, &typed("5"));
        // Leave out hv-b and hv-d.
        press(
            &mut app,
            &[key('j'), key(' '), key('j'), key('j'), key(' ')],
        );
        let form = evacuate_form(&app);
        assert_eq!(form.excluded(), ["hv-b", "hv-d"]);
        assert_eq!(
            press(&mut app, &[code(KeyCode::Enter)]),
            [Command::Evacuate {
                host: "hv-a".into(),
                mode: Mode::Fast,
                completion: policy(Postcopy::Now, 300, WhenSpent::Abort),
                concurrency: 2,
                max_attempts: 5,
                exclude: vec!["hv-b".into(), "hv-d".into()],
            }]
        );
    }

    #[test]
    fn the_evacuate_dialog_offers_continue_only_with_post_copy_never() {
        let mut app = fixture();
        // Safe: never. Down to "when spent", space: continue.
        press(
            &mut app,
            &[
                code(KeyCode::Tab),
                key('e'),
                key('j'),
                key('j'),
                key('j'),
                key(' '),
            ],
        );
        assert_eq!(
            evacuate_form(&app).policy(),
            policy(Postcopy::Never, 150, WhenSpent::Continue)
        );
        // p (anywhere in the form): auto. Continue goes; it cannot come back.
        press(&mut app, &[key('p'), key(' ')]);
        assert_eq!(
            evacuate_form(&app).policy(),
            policy(Postcopy::Auto, 150, WhenSpent::Abort)
        );
        assert!(
            app.status
                .as_ref()
                .is_some_and(|(s, e)| *e && s.contains("only for post-copy never")),
            "{:?}",
            app.status
        );
        // The budget row: typed, then 0 for none.
        press(&mut app, &[key('k')]);
        press(&mut app, &typed("45"));
        assert_eq!(evacuate_form(&app).policy().timeout_per_gib_s, 45);
        press(&mut app, &[key('j'), key('k')]);
        press(&mut app, &typed("0"));
        assert_eq!(evacuate_form(&app).policy().timeout_per_gib_s, 0);
        let [Command::Evacuate { completion, .. }] = &press(&mut app, &[code(KeyCode::Enter)])[..]
        else {
            panic!("no evacuation sent")
        };
        assert_eq!(*completion, policy(Postcopy::Auto, 0, WhenSpent::Abort));
        assert_eq!(completion.check(), Ok(()));
    }

    #[test]
    fn numbers_in_the_evacuate_dialog_stay_within_what_the_agent_accepts() {
        let mut app = fixture();
        press(
            &mut app,
            &[
                code(KeyCode::Tab),
                key('e'),
                key('j'),
                key('j'),
                key('j'),
                key('j'),
            ],
        );
        press(&mut app, &[key('h'), key('h')]);
        assert_eq!(evacuate_form(&app).concurrency, 0);
        press(&mut app, &typed("9999"));
        assert_eq!(evacuate_form(&app).concurrency, MAX_CONCURRENCY);
        press(
            &mut app,
            &[code(KeyCode::Backspace), code(KeyCode::Backspace)],
        );
        assert_eq!(evacuate_form(&app).concurrency, 2);
        press(
            &mut app,
            &[key('j'), key('h'), key('h'), key('h'), key('h')],
        );
        assert_eq!(evacuate_form(&app).max_attempts, 1);
        // Typed digits replace the number first, then append to it.
        press(&mut app, &typed("12"));
        assert_eq!(evacuate_form(&app).max_attempts, 12);
        press(&mut app, &[key('k'), key('j')]);
        press(&mut app, &typed("4"));
        assert_eq!(evacuate_form(&app).max_attempts, 4);
    }

    #[test]
    fn leaving_out_every_other_host_is_refused_in_the_dialog() {
        let mut app = fixture();
        press(&mut app, &[code(KeyCode::Tab), key('e')]);
        for _ in EvacuateForm::MODE..EvacuateForm::MAX_ATTEMPTS {
            press(&mut app, &[key('j')]);
        }
        for _ in 0..4 {
            press(&mut app, &[key('j'), key(' ')]);
        }
        assert!(press(&mut app, &[code(KeyCode::Enter)]).is_empty());
        assert!(
            matches!(app.dialog, Some(Dialog::Evacuate(_))),
            "still open"
        );
        assert!(
            app.status
                .as_ref()
                .is_some_and(|(s, e)| *e && s.contains("nowhere to go")),
            "{:?}",
            app.status
        );
    }

    #[test]
    fn e_outside_the_hosts_table_first_shows_the_hosts() {
        let mut app = fixture();
        assert!(press(&mut app, &[key('e')]).is_empty());
        assert_eq!(app.dialog, None);
        assert_eq!(
            (app.view.clone(), app.focus),
            (View::Overview, Focus::Hosts)
        );
        assert!(
            app.status
                .as_ref()
                .is_some_and(|(s, _)| s.contains("choose the host to evacuate"))
        );
    }

    #[test]
    fn e_on_a_host_that_is_being_evacuated_or_unreachable_says_so() {
        let mut app = fixture();
        press(&mut app, &[code(KeyCode::Tab), key('G'), key('e')]);
        assert_eq!(app.dialog, None);
        assert!(
            app.status
                .as_ref()
                .is_some_and(|(s, e)| *e && s.contains("already being evacuated by e-run")),
            "{:?}",
            app.status
        );
        press(&mut app, &[key('k'), key('e')]);
        assert_eq!(app.dialog, None);
        assert!(
            app.status
                .as_ref()
                .is_some_and(|(s, e)| *e && s.contains("hv-d: its agent is unreachable")),
            "{:?}",
            app.status
        );
    }

    #[test]
    fn big_e_shows_the_newest_evacuation_and_tab_moves_to_the_others() {
        let mut app = fixture();
        press(&mut app, &[key('E')]);
        assert_eq!(app.view, View::Evacuations);
        assert_eq!(
            app.selected_evacuation().map(|e| e.id.as_str()),
            Some("e-run")
        );
        press(&mut app, &[key('j'), key('j')]);
        assert_eq!(
            app.selected_evacuation_vm().map(|v| v.name.as_str()),
            Some("cache-02")
        );
        press(&mut app, &[code(KeyCode::Tab), key('j')]);
        assert_eq!(
            app.selected_evacuation().map(|e| e.id.as_str()),
            Some("e-old")
        );
        assert_eq!(
            app.evacuation_vm_row, 0,
            "a new evacuation starts at its top"
        );
        press(&mut app, &[code(KeyCode::Enter)]);
        assert!(!app.evacuation_list_focused, "enter goes into its VMs");
        press(&mut app, &[code(KeyCode::Esc)]);
        assert_eq!(app.view, View::Overview);
    }

    #[test]
    fn enter_on_an_evacuated_vm_opens_its_migration_and_esc_comes_back() {
        let mut app = fixture();
        let m = migration(
            "m-cache-02",
            "cache-02",
            "hv-e",
            "hv-a",
            proto::Outcome::None,
        );
        update(
            &mut app,
            Msg::Event(proto::Event {
                host: "hv-e".into(),
                kind: Some(Kind::Migration(m)),
            }),
        );
        press(
            &mut app,
            &[key('E'), key('j'), key('j'), code(KeyCode::Enter)],
        );
        assert_eq!(app.view, View::Detail("m-cache-02".into()));
        press(&mut app, &[code(KeyCode::Esc)]);
        assert_eq!(app.view, View::Evacuations);
        // A VM that has not started has nothing to open, and says why.
        press(&mut app, &[key('j'), code(KeyCode::Enter)]);
        assert_eq!(app.view, View::Evacuations);
        assert!(
            app.status
                .as_ref()
                .is_some_and(|(s, _)| s.starts_with("web-04: no host can take it now")),
            "{:?}",
            app.status
        );
    }

    #[test]
    fn p_pauses_a_running_evacuation_and_resumes_a_paused_one() {
        let mut app = fixture();
        assert_eq!(
            press(&mut app, &[key('E'), key('p')]),
            [Command::ControlEvacuation {
                host: "hv-e".into(),
                id: "e-run".into(),
                control: proto::EvacuationControl::Pause,
            }]
        );
        app.live.evacuations.get_mut("e-run").unwrap().state = JobState::Paused;
        assert_eq!(
            press(&mut app, &[key('p')]),
            [Command::ControlEvacuation {
                host: "hv-e".into(),
                id: "e-run".into(),
                control: proto::EvacuationControl::Resume,
            }]
        );
        // The cancelled one has nothing to pause.
        press(&mut app, &[code(KeyCode::Tab), key('j')]);
        assert!(press(&mut app, &[key('p')]).is_empty());
        assert!(
            app.status
                .as_ref()
                .is_some_and(|(s, e)| *e && s.contains("cancelled"))
        );
    }

    #[test]
    fn p_and_c_outside_the_evacuations_view_say_where_they_work() {
        let mut app = fixture();
        for k in ['p', 'c'] {
            assert!(press(&mut app, &[key(k)]).is_empty());
            assert_eq!(app.dialog, None);
            assert!(
                app.status
                    .as_ref()
                    .is_some_and(|(s, e)| *e && s.contains("press E"))
            );
        }
    }

    #[test]
    fn c_asks_whether_to_let_attempts_in_flight_finish_or_abort_them() {
        let mut app = fixture();
        press(&mut app, &[key('E'), key('c')]);
        assert_eq!(
            app.dialog,
            Some(Dialog::CancelEvacuation {
                host: "hv-e".into(),
                id: "e-run".into(),
                cancelling: false,
            })
        );
        // The dialog counts the attempt in flight when drawn (views/tests.rs).
        let control = |commands: Vec<Command>| match &commands[..] {
            [Command::ControlEvacuation { host, id, control }] => {
                assert_eq!((host.as_str(), id.as_str()), ("hv-e", "e-run"));
                *control
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(
            control(press(&mut app, &[key('f')])),
            proto::EvacuationControl::Cancel
        );
        assert_eq!(
            control(press(&mut app, &[key('c'), code(KeyCode::Enter)])),
            proto::EvacuationControl::Cancel
        );
        assert_eq!(
            control(press(&mut app, &[key('c'), key('a')])),
            proto::EvacuationControl::CancelAbort
        );
        assert!(press(&mut app, &[key('c'), code(KeyCode::Esc)]).is_empty());
        assert_eq!(app.dialog, None);
    }

    #[test]
    fn a_cancelling_evacuation_can_only_still_abort_its_attempts() {
        let mut app = fixture();
        app.live.evacuations.get_mut("e-run").unwrap().state = JobState::Cancelling;
        press(&mut app, &[key('E'), key('c')]);
        assert!(
            press(&mut app, &[code(KeyCode::Enter)]).is_empty(),
            "enter is not an answer here"
        );
        assert!(matches!(
            press(&mut app, &[key('a')])[..],
            [Command::ControlEvacuation {
                control: proto::EvacuationControl::CancelAbort,
                ..
            }]
        ));
    }

    #[test]
    fn u_undrains_a_drained_host_after_a_confirmation() {
        let mut app = fixture();
        // hv-e is still being evacuated: undraining it is refused here.
        press(&mut app, &[code(KeyCode::Tab), key('G'), key('u')]);
        assert_eq!(app.dialog, None);
        assert!(
            app.status
                .as_ref()
                .is_some_and(|(s, e)| *e && s.contains("still being evacuated by e-run"))
        );
        app.live.evacuations.get_mut("e-run").unwrap().state = JobState::Done;
        press(&mut app, &[key('u')]);
        assert!(
            matches!(&app.dialog, Some(Dialog::Confirm { title, .. }) if title == "Undrain hv-e?")
        );
        assert_eq!(
            press(&mut app, &[key('y')]),
            [Command::Undrain {
                host: "hv-e".into()
            }]
        );
        // From the evacuations view, u undrains the evacuated host.
        press(&mut app, &[key('E'), key('u')]);
        assert_eq!(
            press(&mut app, &[key('y')]),
            [Command::Undrain {
                host: "hv-e".into()
            }]
        );
    }

    #[test]
    fn u_on_a_host_that_is_not_draining_says_so() {
        let mut app = fixture();
        assert!(press(&mut app, &[code(KeyCode::Tab), key('u')]).is_empty());
        assert_eq!(app.dialog, None);
        assert_eq!(app.status, Some(("hv-a is not draining".into(), true)));
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
        run(&mut app, "evacuations");
        assert_eq!(app.view, View::Evacuations);
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

    fn arrive(app: &mut App, host: &str, record: proto::MigrationRecord) {
        update(
            app,
            Msg::Event(proto::Event {
                host: host.into(),
                kind: Some(Kind::Migration(record)),
            }),
        );
    }

    fn selected_id(app: &App) -> Option<String> {
        app.selected_migration().map(|m| m.record.id.clone())
    }

    #[test]
    fn the_cursor_stays_on_its_migration_when_others_start_above_it() {
        let mut app = fixture();
        select(&mut app, "m-fail");
        assert_eq!(app.migration_row, 1);
        // Two migrations start: running rows sort first, above m-fail.
        arrive(
            &mut app,
            "hv-a",
            migration("m-a1", "web-01", "hv-a", "hv-c", proto::Outcome::None),
        );
        arrive(
            &mut app,
            "hv-b",
            migration("m-a2", "db-02", "hv-b", "hv-c", proto::Outcome::None),
        );
        assert_eq!(selected_id(&app).as_deref(), Some("m-fail"));
        assert_eq!(app.migration_row, 3, "it moved down with its row");
        // enter opens it, d retries it: not whatever slid under the row.
        press(&mut app, &[code(KeyCode::Enter)]);
        assert_eq!(app.view, View::Detail("m-fail".into()));
        press(&mut app, &[code(KeyCode::Esc)]);
        // One of them ends (sorts below m-fail now): still on m-fail.
        arrive(
            &mut app,
            "hv-a",
            migration("m-a1", "web-01", "hv-a", "hv-c", proto::Outcome::Succeeded),
        );
        assert_eq!(selected_id(&app).as_deref(), Some("m-fail"));
        assert_eq!(app.migration_row, 2);
        assert!(app.status.is_none(), "nothing to say: {:?}", app.status);
    }

    #[test]
    fn a_cursor_nobody_moved_stays_at_the_top_as_migrations_arrive() {
        let mut app = fixture();
        assert_eq!(selected_id(&app).as_deref(), Some("m-run"));
        arrive(
            &mut app,
            "hv-a",
            migration("m-a1", "web-01", "hv-a", "hv-c", proto::Outcome::None),
        );
        assert_eq!(app.migration_row, 0);
        assert_eq!(selected_id(&app).as_deref(), Some("m-a1"), "the top row");
        // Once moved, it is on a migration, and stays on it.
        press(&mut app, &[key('j'), key('k')]);
        // (Rows that start together sort by id: m-a0 goes above m-a1.)
        arrive(
            &mut app,
            "hv-b",
            migration("m-a0", "db-02", "hv-b", "hv-c", proto::Outcome::None),
        );
        assert_eq!(selected_id(&app).as_deref(), Some("m-a1"));
        assert_eq!(app.migration_row, 1);
    }

    #[test]
    fn a_key_on_a_row_nobody_moved_to_keeps_the_cursor_on_that_migration_while_its_dialog_is_open()
    {
        let mut app = fixture();
        assert_eq!(selected_id(&app).as_deref(), Some("m-run"));
        // `a` on the top row, never moved to: the confirmation is m-run's.
        press(&mut app, &[key('a')]);
        assert!(
            matches!(&app.dialog, Some(Dialog::Confirm { .. })),
            "{:?}",
            app.dialog
        );
        // A migration starts and sorts above it while the question is
        // open: the highlight stays on m-run, the migration asked about.
        arrive(
            &mut app,
            "hv-a",
            migration("m-a0", "web-01", "hv-a", "hv-c", proto::Outcome::None),
        );
        assert_eq!(selected_id(&app).as_deref(), Some("m-run"));
        assert_eq!(app.migration_row, 1);
        // Moving, looking and filtering pin nothing: a fresh cursor stays
        // at the top.
        let mut app = fixture();
        press(&mut app, &[key('?'), code(KeyCode::Esc)]);
        arrive(
            &mut app,
            "hv-a",
            migration("m-a0", "web-01", "hv-a", "hv-c", proto::Outcome::None),
        );
        assert_eq!(selected_id(&app).as_deref(), Some("m-a0"), "the top row");
    }

    #[test]
    fn a_new_failure_rings_the_bell_once_unless_quiet() {
        let mut app = fixture();
        app.bell = false;
        arrive(
            &mut app,
            "hv-a",
            migration("m-a1", "web-01", "hv-a", "hv-c", proto::Outcome::None),
        );
        assert!(!app.bell, "a start rings nothing");
        arrive(
            &mut app,
            "hv-a",
            migration("m-a1", "web-01", "hv-a", "hv-c", proto::Outcome::Failed),
        );
        assert!(app.bell, "a failure rings");
        app.bell = false;
        // The same record again (a snapshot, a reconnect): no second ring.
        arrive(
            &mut app,
            "hv-a",
            migration("m-a1", "web-01", "hv-a", "hv-c", proto::Outcome::Failed),
        );
        assert!(!app.bell);
        arrive(
            &mut app,
            "hv-a",
            migration("m-a2", "db-02", "hv-b", "hv-c", proto::Outcome::Succeeded),
        );
        assert!(!app.bell, "a success rings nothing");
        app.quiet = true;
        arrive(
            &mut app,
            "hv-b",
            migration("m-a3", "db-03", "hv-b", "hv-c", proto::Outcome::Unresolved),
        );
        assert!(!app.bell, "--quiet");
    }

    #[test]
    fn the_cursor_follows_its_migration_when_it_ends_and_re_sorts() {
        let mut app = fixture();
        select(&mut app, "m-run");
        assert_eq!(app.migration_row, 0);
        let mut done = migration("m-run", "web-01", "hv-a", "hv-b", proto::Outcome::Succeeded);
        done.started_at_ms = 900;
        arrive(&mut app, "hv-a", done);
        assert_eq!(selected_id(&app).as_deref(), Some("m-run"));
        assert_eq!(
            app.migration_row, 2,
            "after the failed one and the newer success"
        );
        // Keys move from where it is now.
        press(&mut app, &[key('k')]);
        assert_eq!(selected_id(&app).as_deref(), Some("m-ok"));
    }

    #[test]
    fn a_filter_keeps_the_cursor_on_its_migration_or_says_where_it_went() {
        let mut app = fixture();
        select(&mut app, "m-ok");
        // A filter that still shows it: the cursor stays on it.
        press(&mut app, &[key('/'), key('a'), key('p'), key('p')]);
        assert_eq!(app.filter, "app");
        assert_eq!(selected_id(&app).as_deref(), Some("m-ok"));
        press(&mut app, &[code(KeyCode::Esc)]);
        assert_eq!(selected_id(&app).as_deref(), Some("m-ok"));
        // One that hides it: the neighbour takes the cursor, and the status
        // line says which migration left and which one the cursor is on now.
        select(&mut app, "m-fail");
        press(
            &mut app,
            &[key('/'), key('w'), key('e'), key('b'), code(KeyCode::Enter)],
        );
        assert_eq!(selected_id(&app).as_deref(), Some("m-run"));
        let (status, error) = app.status.clone().expect("said");
        assert!(!error);
        assert_eq!(
            status,
            "m-fail (db-01) is hidden by the filter: the cursor is on m-run (web-01)"
        );
    }

    /// The table filtered to `state:failed`, the cursor on m-fail, which
    /// then runs again (attempt 2): the filter hides it now.
    fn retried_out_of_the_failed_view() -> App {
        let mut app = fixture();
        let filter: Vec<_> = "/state:failed".chars().map(key).collect();
        press(&mut app, &filter);
        press(&mut app, &[code(KeyCode::Enter)]);
        select(&mut app, "m-fail");
        let mut again = migration("m-fail", "db-01", "hv-b", "hv-c", proto::Outcome::None);
        again.attempt = 2;
        arrive(&mut app, "hv-b", again);
        app
    }

    /// A retried migration leaves a "failed" view as it runs again; the
    /// retry's answer arrives after, and must not hide that the cursor
    /// moved.
    #[test]
    fn a_commands_answer_keeps_the_notice_that_the_cursor_moved() {
        let mut app = retried_out_of_the_failed_view();
        let (status, _) = app.status.clone().expect("said");
        assert!(
            status.starts_with("m-fail (db-01) is hidden by the filter"),
            "{status}"
        );
        update(
            &mut app,
            Msg::Done {
                what: "retry m-fail".into(),
                result: Ok("attempt 2 started".into()),
            },
        );
        let (status, error) = app.status.clone().expect("said");
        assert!(!error);
        assert!(
            status.starts_with("m-fail (db-01) is hidden by the filter: ")
                && status.ends_with(" · retry m-fail: attempt 2 started"),
            "{status}"
        );
        // The log has the answer alone; the next answer stands alone too.
        update(
            &mut app,
            Msg::Done {
                what: "abort m-run".into(),
                result: Ok("aborting".into()),
            },
        );
        assert_eq!(app.status.clone().unwrap().0, "abort m-run: aborting");
    }

    /// Once the filter goes, a notice that a migration left the filtered
    /// view goes too (it said "the table is empty" over a full table).
    #[test]
    fn clearing_the_filter_clears_the_notice_about_it() {
        let mut app = retried_out_of_the_failed_view();
        assert!(app.status.is_some());
        let filter: Vec<_> = "/state:failed".chars().map(key).collect();
        press(&mut app, &[code(KeyCode::Esc)]);
        assert!(app.filter.is_empty());
        assert_eq!(app.status, None, "the notice went with the filter");
        // Another message stays when the filter goes.
        press(&mut app, &filter);
        press(&mut app, &[code(KeyCode::Enter)]);
        app.say("abort m-run: aborting", false);
        press(&mut app, &[code(KeyCode::Esc)]);
        assert_eq!(app.status.clone().unwrap().0, "abort m-run: aborting");
    }

    #[test]
    fn marks_stay_on_their_migrations_through_re_sorts() {
        let mut app = fixture();
        select(&mut app, "m-fail");
        press(&mut app, &[key(' ')]);
        arrive(
            &mut app,
            "hv-a",
            migration("m-a1", "web-01", "hv-a", "hv-c", proto::Outcome::None),
        );
        let commands = press(&mut app, &[key('r'), key('y')]);
        assert_eq!(commands.len(), 1, "{commands:?}");
        assert!(
            format!("{:?}", commands[0]).contains("m-fail"),
            "{commands:?}"
        );
    }

    #[test]
    fn a_host_that_joins_does_not_move_the_hosts_cursor() {
        let mut app = fixture();
        press(&mut app, &[code(KeyCode::Tab), key('j'), key('j')]);
        assert_eq!(app.selected_host(), Some("hv-c"));
        update(
            &mut app,
            Msg::Connected {
                host: "hv-z".into(),
            },
        );
        assert_eq!(app.selected_host(), Some("hv-c"));
    }

    #[test]
    fn the_evacuation_shown_and_its_vm_stay_when_a_newer_one_starts() {
        let mut app = fixture();
        press(&mut app, &[key('E'), key('j'), key('j')]);
        assert_eq!(
            app.selected_evacuation().map(|e| e.id.as_str()),
            Some("e-run")
        );
        assert_eq!(
            app.selected_evacuation_vm().map(|v| v.name.as_str()),
            Some("cache-02")
        );
        // A newer evacuation (another operator's) appears.
        let mut newer = evacuation();
        newer.id = "e-new".into();
        newer.host = "hv-d".into();
        newer.started_at_ms = 9_000;
        update(
            &mut app,
            Msg::Event(proto::Event {
                host: "hv-d".into(),
                kind: Some(Kind::Evacuation(newer)),
            }),
        );
        assert_eq!(
            app.selected_evacuation().map(|e| e.id.as_str()),
            Some("e-run"),
            "the view stays on the evacuation the operator was looking at"
        );
        // Its VM list changes order: the cursor stays on cache-02.
        let mut changed = evacuation();
        changed.vms.swap(0, 2);
        update(
            &mut app,
            Msg::Event(proto::Event {
                host: "hv-e".into(),
                kind: Some(Kind::Evacuation(changed)),
            }),
        );
        assert_eq!(
            app.selected_evacuation_vm().map(|v| v.name.as_str()),
            Some("cache-02")
        );
        assert_eq!(app.evacuation_vm_row, 0);
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
        for c in ['a', 'r', 'd', 'b', 'R', 'B', 'n', 'e', 'u'] {
            // Enter opens the detail, which only reads.
            let sent = press(&mut app, &[key(c), key('y'), code(KeyCode::Enter)]);
            assert!(!sent.iter().any(Command::changes_anything), "{c}: {sent:?}");
            assert_eq!(app.dialog, None, "{c} opened a dialog in read-only mode");
        }
        press(&mut app, &[code(KeyCode::Tab), key('G')]);
        for c in ['e', 'u'] {
            let sent = press(&mut app, &[key(c), key('y'), code(KeyCode::Enter)]);
            assert!(!sent.iter().any(Command::changes_anything), "{c}: {sent:?}");
            assert_eq!(app.dialog, None, "{c} on a host in read-only mode");
        }
        // The evacuations view itself only reads: it opens.
        press(&mut app, &[key('E')]);
        assert_eq!(app.view, View::Evacuations);
        for c in ['p', 'c', 'u'] {
            assert!(
                press(&mut app, &[key(c), key('f'), key('a'), key('y')]).is_empty(),
                "{c} sent a command in read-only mode"
            );
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
