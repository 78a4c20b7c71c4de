//! The hosts, migrations, VMs and events tables.

use ratatui::Frame;
use ratatui::layout::{Constraint, Rect};
use ratatui::style::Style;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Row, Table, TableState};

use super::super::app::{App, Focus, mode_of};
use super::super::state::{Link, MigrationView};
use super::super::theme::Theme;
use super::outlook::{fit, running};
use super::{bytes, duration, outcome, step};
use crate::host::evacuation::job::JobState;
use crate::proto;

/// The first row to show so that `selected` is visible in `height` rows.
pub fn window(selected: usize, len: usize, height: usize) -> std::ops::Range<usize> {
    let height = height.max(1);
    let start = selected
        .saturating_sub(height - 1)
        .min(len.saturating_sub(height));
    start..(start + height).min(len)
}

/// A bordered panel, its border brighter when it has the focus.
pub(super) fn block<'a>(title: String, focused: bool, theme: &Theme) -> Block<'a> {
    Block::default()
        .borders(Borders::ALL)
        .border_style(if focused {
            theme.border_focused
        } else {
            theme.border
        })
        .title(Span::styled(title, theme.title))
}

pub fn hosts(frame: &mut Frame, area: Rect, app: &App, theme: &Theme) {
    let state = app.state();
    let focused = app.focus == Focus::Hosts;
    let height = area.height.saturating_sub(3) as usize;
    let range = window(app.host_row, state.hosts.len(), height);
    let moving = state.moving();
    let narrow = area.width < WIDE;
    let names = state.hosts[range.clone()]
        .iter()
        .map(|h| Span::raw(h.name.as_str()).width() as u16)
        .max()
        .unwrap_or(0)
        .clamp(4, 16);
    // An empty ROLLBACKS column gives its room to the evacuation's.
    let rollbacks = state.hosts[range.clone()]
        .iter()
        .filter_map(|h| h.info.as_ref())
        .any(|i| !i.pending_rollbacks.is_empty());
    let pending_width = match (rollbacks, narrow) {
        (false, _) => 0,
        (true, true) => 11,
        (true, false) => 13,
    };
    let widths = if narrow {
        [names, 12, 4, 14, 10, pending_width]
    } else {
        [names.max(12), 16, 4, 22, 10, pending_width]
    };
    // What the last column gets (borders, one column between columns).
    let last = usize::from(area.width.saturating_sub(widths.iter().sum::<u16>() + 8));
    let rows = state.hosts[range.clone()].iter().map(|h| {
        let (link_style, link) = match &h.link {
            Link::Connected => (
                theme.connected,
                format!("{} connected", theme.symbols.connected),
            ),
            Link::Connecting => (
                theme.connecting,
                format!("{} connecting", theme.symbols.connecting),
            ),
            Link::Lost { since_ms, .. } => (
                theme.lost,
                format!(
                    "{} lost {}",
                    theme.symbols.lost,
                    duration(state.now_ms.saturating_sub(*since_ms))
                ),
            ),
            Link::Silent { since_ms, .. } => (
                theme.lost,
                format!(
                    "{} no answer {}",
                    theme.symbols.lost,
                    duration(state.now_ms.saturating_sub(*since_ms))
                ),
            ),
        };
        let vms = state.vm_count(&h.name);
        // In flight from the migrations the console follows (a host's own
        // counts only move with its next report); the limits are the host's.
        let (moving_out, moving_in) = moving.get(h.name.as_str()).copied().unwrap_or_default();
        let limit = |n: u32| {
            if n > 0 {
                format!("/{n}")
            } else {
                String::new()
            }
        };
        let (memory, pending, draining, limits) = match &h.info {
            Some(i) => (
                memory_text(i.memory_used_mib, i.memory_total_mib),
                i.pending_rollbacks.len(),
                i.draining,
                (limit(i.max_outgoing), limit(i.max_incoming)),
            ),
            None => ("?".into(), 0, false, Default::default()),
        };
        // Longest first; the column takes the longest that fits.
        let mut drain: Vec<String> = Vec::new();
        let head = if draining { "draining · " } else { "" };
        if let Some(e) = state.active_evacuation(&h.name) {
            let c = e.counts();
            let what = match e.state {
                JobState::Paused => "evacuation paused",
                JobState::Cancelling => "cancelling",
                _ => "evacuating",
            };
            drain.push(format!("{head}{what} {} of {}", c.moved, c.total));
            drain.push(format!("{head}{} of {}", c.moved, c.total));
        }
        if draining {
            drain.push("draining".to_string());
        }
        Row::new(vec![
            Cell::from(h.name.clone()),
            Cell::from(Span::styled(link, link_style)),
            Cell::from(vms.to_string()),
            Cell::from(memory),
            Cell::from(format!(
                "↑{moving_out}{} ↓{moving_in}{}",
                limits.0, limits.1
            )),
            Cell::from(if pending > 0 {
                Span::styled(format!("⚠ {pending} pending"), theme.warning)
            } else {
                Span::raw("")
            }),
            Cell::from(Span::styled(fit(&drain, last), theme.draining)),
        ])
    });
    let mut constraints: Vec<Constraint> = widths.iter().map(|w| Constraint::Length(*w)).collect();
    constraints.push(Constraint::Min(8));
    let table = Table::new(rows, constraints)
        .header(
            Row::new([
                "HOST",
                "AGENT",
                "VMS",
                "MEMORY",
                "OUT IN",
                if rollbacks { "ROLLBACKS" } else { "" },
                "",
            ])
            .style(theme.header),
        )
        .block(block(
            format!(" hosts ({}) ", state.hosts.len()),
            focused,
            theme,
        ))
        .row_highlight_style(cursor_style(focused, theme));
    let mut table_state = TableState::default();
    if !state.hosts.is_empty() {
        table_state.select(Some(app.host_row - range.start));
    }
    frame.render_stateful_widget(table, area, &mut table_state);
}

/// The cursor's row: highlighted in the focused table, underlined in the
/// other, so the row a key would act on is always on screen (a migration
/// key works with the hosts table focused, and the other way round).
fn cursor_style(focused: bool, theme: &Theme) -> Style {
    if focused {
        theme.selected
    } else {
        Style::default().add_modifier(ratatui::style::Modifier::UNDERLINED)
    }
}

/// A host's memory, used of total: `33.2/64.0 GiB`, the unit said once
/// when both share it.
fn memory_text(used_mib: u64, total_mib: u64) -> String {
    let (used, total) = (bytes(used_mib << 20), bytes(total_mib << 20));
    match (used.rsplit_once(' '), total.rsplit_once(' ')) {
        (Some((u, unit)), Some((t, total_unit))) if unit == total_unit => {
            format!("{u}/{t} {unit}")
        }
        _ => format!("{used}/{total}"),
    }
}

/// `port-profile ✗ finish` for the first failing feature, else a count.
pub fn feature_summary(record: &proto::MigrationRecord) -> (String, bool) {
    for f in &record.features {
        for (stage, status) in [
            ("prepare", f.prepare),
            ("finish", f.finish),
            ("verify", f.verify),
            ("rollback", f.rollback),
            ("release", f.release),
        ] {
            if status == proto::StepStatus::Failed as i32 {
                return (format!("{} ✗ {stage}", f.name), true);
            }
        }
    }
    match record.features.len() {
        0 => ("no features".into(), false),
        n => (
            format!("{n} feature{}", if n == 1 { "" } else { "s" }),
            false,
        ),
    }
}

fn pipeline<'a>(record: &proto::MigrationRecord, theme: &Theme) -> Line<'a> {
    let mut spans = Vec::new();
    for phase in 0..5 {
        let status = record
            .phases
            .iter()
            .find(|p| p.phase == phase)
            .map_or(proto::StepStatus::Pending as i32, |p| p.status);
        let (style, symbol) = step(theme, status);
        spans.push(Span::styled(symbol, style));
    }
    Line::from(spans)
}

/// Below this width the table drops mode, progress, rate and time, so the
/// route, the failing feature and where the transfer is heading stay
/// readable.
const WIDE: u16 = 110;
/// The features column at most (a failing feature and stage fit).
const FEATURES_MAX: u16 = 24;

/// What the visible rows need of the columns whose text varies, in cells.
#[derive(Default)]
struct Needs {
    vm: u16,
    route: u16,
    features: u16,
}

impl Needs {
    fn of(rows: &[&MigrationView]) -> Needs {
        let width = |text: &str| Span::raw(text).width() as u16;
        rows.iter().fold(Needs::default(), |n, m| {
            let r = &m.record;
            Needs {
                vm: n.vm.max(width(&r.vm)),
                route: n.route.max(width(&r.source) + width(&r.destination) + 3),
                features: n.features.max(width(&feature_summary(r).0)),
            }
        })
    }
}

/// The migrations table's columns at a width: the VM, route and features
/// columns as wide as the visible rows need (within bounds), the others
/// fixed, then the state column, which takes what is left. Row text is
/// fitted to what it gets.
struct Columns {
    wide: bool,
    widths: Vec<u16>,
    state: usize,
}

impl Columns {
    fn new(area_width: u16, needs: &Needs) -> Columns {
        let wide = area_width >= WIDE;
        let vm = needs.vm.clamp(6, if wide { 16 } else { 12 });
        let route = needs.route.clamp(9, if wide { 27 } else { 19 });
        // Narrow, what goes first is what an operator can do without (mode,
        // rate, time); the progress stays: it is the number watched.
        let mut widths = if wide {
            vec![3, vm, route, 4, 6, 5, 11, 7]
        } else {
            vec![3, vm, route, 6, 4]
        };
        widths.push(needs.features.clamp(8, FEATURES_MAX - u16::from(!wide)));
        // Borders, and one column of spacing between columns (the state
        // column is the last of widths.len() + 1).
        let used: u16 = widths.iter().sum::<u16>() + widths.len() as u16 + 2;
        let state = usize::from(area_width.saturating_sub(used));
        Columns {
            wide,
            widths,
            state,
        }
    }

    fn constraints(&self) -> Vec<Constraint> {
        let mut all: Vec<Constraint> = self.widths.iter().map(|w| Constraint::Length(*w)).collect();
        all.push(Constraint::Min(8));
        all
    }

    fn header(&self) -> Vec<&'static str> {
        if self.wide {
            vec![
                "",
                "VM",
                "FROM → TO",
                "MODE",
                "PHASES",
                "DONE",
                "RATE",
                "TIME",
                "FEATURES",
                "",
            ]
        } else {
            vec!["", "VM", "FROM → TO", "PHASES", "DONE", "FEATURES", ""]
        }
    }
}

fn migration_row<'a>(app: &App, m: &MigrationView, theme: &Theme, columns: &Columns) -> Row<'a> {
    let r = &m.record;
    let (style, symbol, _) = outcome(theme, r.outcome);
    let mark = if app.marked.contains(&r.id) {
        theme.symbols.marked
    } else {
        " "
    };
    let progress = r
        .transfer
        .filter(|t| t.bytes_total > 0)
        .map_or(String::new(), |t| {
            format!(
                "{:>3}%",
                crate::protocol::record::stats_from_proto(&t).percent_done()
            )
        });
    let rate = m
        .current_rate()
        .filter(|_| r.outcome == 0)
        .map_or(String::new(), |b| format!("{}/s", bytes(b)));
    let elapsed = if r.started_at_ms > 0 {
        let end = if r.outcome == 0 {
            app.state().now_ms.max(r.updated_at_ms)
        } else {
            r.updated_at_ms
        };
        duration(end.saturating_sub(r.started_at_ms))
    } else {
        String::new()
    };
    let (features, failing) = feature_summary(r);
    let mode = mode_of(r);
    let mut cells = vec![
        Cell::from(Span::styled(format!("{mark}{symbol}"), style)),
        Cell::from(r.vm.clone()),
        Cell::from(format!("{} → {}", r.source, r.destination)),
    ];
    if columns.wide {
        cells.push(Cell::from(mode));
    }
    cells.push(Cell::from(pipeline(r, theme)));
    if columns.wide {
        cells.extend([Cell::from(progress), Cell::from(rate), Cell::from(elapsed)]);
    } else {
        cells.push(Cell::from(progress));
    }
    cells.extend([
        Cell::from(Span::styled(
            features,
            if failing { theme.failed } else { theme.dim },
        )),
        Cell::from(state_line(r, theme, columns.state)),
    ]);
    Row::new(cells).style(if app.marked.contains(&r.id) {
        theme.marked
    } else {
        Style::default()
    })
}

/// The row's last column, fitted to `width`: where the guest is when it is
/// not simply running (red), a lost guest (loudest), where a running
/// transfer is heading, or why it ended.
fn state_line<'a>(r: &proto::MigrationRecord, theme: &Theme, width: usize) -> Line<'a> {
    let fitted = |wordings: Vec<String>, style: Style| Line::styled(fit(&wordings, width), style);
    match crate::protocol::record::guest_from_proto(r.guest) {
        crate::protocol::GuestCondition::Paused => fitted(
            vec![
                format!("guest PAUSED on {}: {}", r.running_on, r.error),
                format!("guest PAUSED on {}", r.running_on),
            ],
            theme.error,
        ),
        crate::protocol::GuestCondition::Unknown => fitted(
            vec![
                format!("guest state unknown: {}", r.error),
                "guest state unknown".to_string(),
            ],
            theme.error,
        ),
        crate::protocol::GuestCondition::Running if r.outcome == proto::Outcome::Lost as i32 => {
            let lost = "LOST";
            let rest = fit(
                &[
                    format!("the guest is gone: {}", r.error),
                    "the guest is gone".into(),
                ],
                width.saturating_sub(lost.len() + 1),
            );
            Line::from(vec![
                Span::styled(lost, theme.outcome(crate::protocol::Outcome::Lost)),
                Span::styled(format!(" {rest}"), theme.error),
            ])
        }
        crate::protocol::GuestCondition::Running if r.outcome == 0 => {
            let said = running(r, theme);
            Line::styled(said.fit(width), said.style)
        }
        crate::protocol::GuestCondition::Running => match super::failure(r) {
            // The kind and host first: what an operator sorts by at a
            // glance; the text gets what is left.
            Some(cause) => {
                let headline = cause.headline();
                let style = if r.outcome == proto::Outcome::Degraded as i32 {
                    theme.warning
                } else {
                    theme.failed
                };
                // A feature's own error says what the driver met; the
                // record's repeats the feature and stage the row shows.
                let why = cause
                    .feature
                    .as_ref()
                    .and_then(|name| r.features.iter().find(|f| &f.name == name))
                    .map(|f| f.error.as_str())
                    .filter(|e| !e.is_empty())
                    .map(|e| {
                        // Less the stage, which the features column says.
                        cause
                            .stage
                            .and_then(|stage| e.strip_prefix(&format!("{stage}: ")))
                            .unwrap_or(e)
                    })
                    .unwrap_or(&r.error);
                let text = fit(&[format!("{headline} {why}")], width);
                match text.strip_prefix(&headline) {
                    Some(rest) => Line::from(vec![
                        Span::styled(headline.clone(), style),
                        Span::styled(rest.to_string(), theme.dim),
                    ]),
                    None => Line::styled(text, style),
                }
            }
            None => fitted(vec![r.error.clone()], theme.dim),
        },
    }
}

pub fn migrations(frame: &mut Frame, area: Rect, app: &App, theme: &Theme) {
    let count = app.row_count();
    let focused = app.focus == Focus::Migrations;
    let height = area.height.saturating_sub(3) as usize;
    let range = window(app.migration_row, count, height);
    let shown = app.rows_in(range.clone());
    let columns = Columns::new(area.width, &Needs::of(&shown));
    let visible = shown.iter().map(|m| migration_row(app, m, theme, &columns));
    let title = if app.filter.is_empty() {
        format!(" migrations ({count}) ")
    } else {
        format!(
            " migrations ({count} of {}, /{}) ",
            app.state().migrations.len(),
            app.filter
        )
    };
    let table = Table::new(visible, columns.constraints())
        .header(Row::new(columns.header()).style(theme.header))
        .block(block(title, focused, theme))
        .row_highlight_style(cursor_style(focused, theme));
    let mut table_state = TableState::default();
    if count > 0 {
        table_state.select(Some(app.migration_row.min(count - 1) - range.start));
    }
    frame.render_stateful_widget(table, area, &mut table_state);
}

pub fn vms(frame: &mut Frame, area: Rect, app: &App, theme: &Theme) {
    let state = app.state();
    let height = area.height.saturating_sub(3) as usize;
    let all: Vec<_> = state.vms.iter().collect();
    let range = window(0, all.len(), height);
    let rows = all[range].iter().map(|((host, name), vm)| {
        let (style, label) = match proto::GuestState::try_from(vm.state) {
            Ok(proto::GuestState::Running) => (theme.done, "● running"),
            Ok(proto::GuestState::Paused) => (theme.warning, "‖ paused"),
            Ok(proto::GuestState::Incoming) => (theme.running, "↓ incoming"),
            _ => (theme.dim, "○ stopped"),
        };
        Row::new(vec![
            Cell::from(name.clone()),
            Cell::from(host.clone()),
            Cell::from(Span::styled(label, style)),
            Cell::from(bytes(vm.memory_mib << 20)),
            Cell::from(vm.vcpus.to_string()),
            Cell::from(
                vm.features
                    .iter()
                    .map(|f| format!("{}{}", f.name, if f.required { "*" } else { "" }))
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            Cell::from(vm.migration_id.clone()),
        ])
    });
    let table = Table::new(
        rows,
        [
            Constraint::Length(12),
            Constraint::Length(10),
            Constraint::Length(11),
            Constraint::Length(10),
            Constraint::Length(5),
            Constraint::Min(20),
            Constraint::Length(16),
        ],
    )
    .header(
        Row::new([
            "VM",
            "HOST",
            "STATE",
            "MEMORY",
            "VCPU",
            "FEATURES (* required)",
            "MIGRATION",
        ])
        .style(theme.header),
    )
    .block(block(format!(" vms ({}) ", all.len()), true, theme));
    frame.render_widget(table, area);
}

pub fn events(frame: &mut Frame, area: Rect, app: &App, theme: &Theme) {
    let state = app.state();
    let height = area.height.saturating_sub(2) as usize;
    let lines: Vec<Line> = state
        .events
        .iter()
        .rev()
        .take(height)
        .map(|e| {
            let style = match e.line.level.as_str() {
                "error" => theme.error,
                "warn" => theme.warning,
                _ => Style::default(),
            };
            Line::from(vec![
                Span::styled(format!("{:<8} ", e.host), theme.dim),
                Span::styled(format!("{:<14} ", e.line.migration_id), theme.dim),
                Span::styled(e.line.text.clone(), style),
            ])
        })
        .collect();
    let widget = ratatui::widgets::Paragraph::new(lines).block(block(
        format!(" events ({}, newest first) ", state.events.len()),
        true,
        theme,
    ));
    frame.render_widget(widget, area);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_keeps_the_selection_visible_and_builds_only_visible_rows() {
        assert_eq!(window(0, 10_000, 20), 0..20);
        assert_eq!(window(19, 10_000, 20), 0..20);
        assert_eq!(window(20, 10_000, 20), 1..21);
        assert_eq!(window(9_999, 10_000, 20), 9_980..10_000);
        assert_eq!(window(3, 5, 20), 0..5);
        assert_eq!(window(0, 0, 20), 0..0);
    }

    #[test]
    fn memory_says_its_unit_once_when_both_figures_share_it() {
        assert_eq!(memory_text(34_000, 65_536), "33.2/64.0 GiB");
        assert_eq!(memory_text(0, 65_536), "0 B/64.0 GiB");
        assert_eq!(memory_text(512, 2048), "512.0 MiB/2.0 GiB");
    }

    #[test]
    fn the_feature_summary_names_the_failing_feature_and_stage() {
        let record = proto::MigrationRecord {
            features: vec![
                proto::FeatureRecord {
                    name: "tap".into(),
                    prepare: proto::StepStatus::Ok as i32,
                    finish: proto::StepStatus::Ok as i32,
                    ..Default::default()
                },
                proto::FeatureRecord {
                    name: "port-profile".into(),
                    prepare: proto::StepStatus::Ok as i32,
                    finish: proto::StepStatus::Failed as i32,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        assert_eq!(
            feature_summary(&record),
            ("port-profile ✗ finish".to_string(), true)
        );
    }
}
