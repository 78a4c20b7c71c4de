//! Drawing only: every function here reads an [`App`] and writes a frame.
//! Tables build rows for the visible window only, so ten thousand
//! migrations cost what a screenful does.

mod detail;
mod dialogs;
mod evacuations;
mod tables;
#[cfg(test)]
mod tests;

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::Style;
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;

use super::app::{App, InputKind, View};
use super::keymap;
use super::state::Link;
use super::theme::Theme;
use crate::cli::output::phase_name;
use crate::proto;
use crate::protocol::record::{outcome_from_proto, status_from_proto};
use crate::protocol::{Outcome, Phase};

pub fn draw(frame: &mut Frame, app: &App, theme: &Theme) {
    // A theme with its own background (light) paints the whole screen.
    frame.render_widget(
        ratatui::widgets::Block::default().style(theme.base),
        frame.area(),
    );
    let [header, body, status, hints] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(3),
        Constraint::Length(1),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    draw_header(frame, header, app, theme);
    match &app.view {
        View::Overview => {
            let hosts = (app.state().hosts.len() as u16 + 3)
                .min(body.height / 3)
                .max(4);
            let [top, bottom] =
                Layout::vertical([Constraint::Length(hosts), Constraint::Min(3)]).areas(body);
            tables::hosts(frame, top, app, theme);
            tables::migrations(frame, bottom, app, theme);
        }
        View::Vms => tables::vms(frame, body, app, theme),
        View::Events => tables::events(frame, body, app, theme),
        View::Detail(id) => detail::draw(frame, body, app, theme, id),
        View::Evacuations => evacuations::draw(frame, body, app, theme),
    }
    draw_status(frame, status, app, theme);
    draw_hints(frame, hints, app, theme);
    dialogs::draw(frame, app, theme);
}

fn draw_header(frame: &mut Frame, area: Rect, app: &App, theme: &Theme) {
    let state = app.state();
    let connected = state
        .hosts
        .iter()
        .filter(|h| h.link == Link::Connected)
        .count();
    let mut counts = [0usize; 6];
    let mut phases = [0usize; 5];
    for m in state.migrations.values() {
        let o = proto::Outcome::try_from(m.record.outcome).unwrap_or(proto::Outcome::None);
        counts[o as usize] += 1;
        if o == proto::Outcome::None
            && let Some(p) = m
                .record
                .phases
                .iter()
                .find(|p| p.status == proto::StepStatus::Running as i32)
        {
            phases[(p.phase as usize).min(4)] += 1;
        }
    }
    // Everything on the header bar keeps its colours (readable on it in
    // every theme); states stand out by symbol and weight.
    let bold = theme.header.add_modifier(ratatui::style::Modifier::BOLD);
    let sym = &theme.symbols;
    let all_up = connected == state.hosts.len();
    let mut spans = vec![
        Span::styled(format!(" tern · {} ", state.cluster), bold),
        Span::styled(
            format!(
                " {} agents {connected}/{} ",
                if all_up { sym.connected } else { sym.lost },
                state.hosts.len()
            ),
            if all_up { theme.header } else { bold },
        ),
    ];
    for (phase, n) in Phase::ALL.into_iter().zip(phases) {
        let name = phase_name(phase);
        if n > 0 {
            spans.push(Span::styled(
                format!(" {} {name} {n}", sym.running),
                theme.header,
            ));
        }
    }
    for (i, symbol, label, loud) in [
        (
            proto::Outcome::Unresolved as usize,
            sym.unresolved,
            "unresolved",
            true,
        ),
        (proto::Outcome::Failed as usize, sym.failed, "failed", true),
        (
            proto::Outcome::Degraded as usize,
            sym.degraded,
            "degraded",
            false,
        ),
        (
            proto::Outcome::Aborted as usize,
            sym.aborted,
            "aborted",
            false,
        ),
        (
            proto::Outcome::Succeeded as usize,
            sym.succeeded,
            "ok",
            false,
        ),
    ] {
        if counts[i] > 0 {
            spans.push(Span::styled(
                format!("  {symbol} {label} {}", counts[i]),
                if loud { bold } else { theme.header },
            ));
        }
    }
    spans.push(Span::styled(
        format!("   mode: {} ", app.default_mode.as_str()),
        bold,
    ));
    if app.frozen.is_some() {
        spans.push(Span::styled(
            format!(" {} FROZEN (f) ", theme.symbols.frozen),
            theme.frozen,
        ));
    }
    if let Some(identity) = &app.identity {
        spans.push(Span::styled(format!("  {identity} "), theme.header));
    }
    if app.read_only {
        spans.push(Span::styled(" read-only ", bold));
    }
    frame.render_widget(Paragraph::new(Line::from(spans)).style(theme.header), area);
}

fn draw_status(frame: &mut Frame, area: Rect, app: &App, theme: &Theme) {
    let line = if let Some(input) = &app.input {
        let prompt = match input.kind {
            InputKind::Filter => "/",
            InputKind::Command => ":",
        };
        Line::from(vec![
            Span::styled(prompt, theme.key),
            Span::raw(input.text.clone()),
            Span::styled("█", theme.dim),
        ])
    } else if let Some((text, error)) = &app.status {
        Line::styled(text.clone(), if *error { theme.error } else { theme.hint })
    } else if !app.filter.is_empty() {
        Line::from(vec![
            Span::styled("filter: ", theme.dim),
            Span::raw(app.filter.clone()),
            Span::styled("  (esc clears)", theme.dim),
        ])
    } else {
        Line::default()
    };
    frame.render_widget(Paragraph::new(line), area);
}

fn draw_hints(frame: &mut Frame, area: Rect, app: &App, theme: &Theme) {
    let mut spans = Vec::new();
    // Help and quit first: on a narrow terminal the end of the bar is cut.
    let first =
        |b: &&keymap::Binding| !matches!(b.action, keymap::Action::Help | keymap::Action::Quit);
    let mut hints: Vec<_> = keymap::hints(app.read_only, app.context()).collect();
    hints.sort_by_key(first);
    for b in hints {
        spans.push(Span::styled(format!(" {} ", b.shown), theme.key));
        spans.push(Span::styled(format!("{} ", b.hint), theme.hint));
    }
    frame.render_widget(Paragraph::new(Line::from(spans)), area);
}

pub use crate::cli::output::bytes;

/// A duration in ms as `850ms`, `12s`, `3m05s`, `2h10m`.
pub fn duration(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{}s", ms / 1000),
        60_000..3_600_000 => format!("{}m{:02}s", ms / 60_000, ms / 1000 % 60),
        _ => format!("{}h{:02}m", ms / 3_600_000, ms / 60_000 % 60),
    }
}

/// The style and symbol of a step's status (a proto `StepStatus`).
pub fn step(theme: &Theme, status: i32) -> (Style, &'static str) {
    let status = status_from_proto(status);
    (theme.step(status), theme.symbols.step(status))
}

/// The style, symbol and name of an outcome (a proto `Outcome`; none:
/// still running). Unresolved is spelled in capitals: it needs an operator.
pub fn outcome(theme: &Theme, outcome: i32) -> (Style, &'static str, &'static str) {
    match outcome_from_proto(outcome) {
        Some(Outcome::Unresolved) => (theme.unresolved, theme.symbols.unresolved, "UNRESOLVED"),
        Some(o) => (theme.outcome(o), theme.symbols.outcome(o), o.as_str()),
        None => (theme.running, theme.symbols.running, "running"),
    }
}
