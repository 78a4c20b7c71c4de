//! Drawing only: every function here reads an [`App`] and writes a frame.
//! Tables build rows for the visible window only, so ten thousand
//! migrations cost what a screenful does.

mod detail;
mod dialogs;
mod evacuations;
mod outlook;
mod pulse;

pub use pulse::Pulse;
mod tables;
pub use tables::feature_summary;
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
            let [pulse_line, body] =
                Layout::vertical([Constraint::Length(1), Constraint::Min(3)]).areas(body);
            let said = {
                let state = app.state();
                let mut cached = app.pulse.borrow_mut();
                let fresh = cached.as_ref().is_some_and(|(at, n, _)| {
                    *n == state.migrations.len() && state.now_ms.saturating_sub(*at) < 1_000
                });
                if !fresh {
                    *cached = Some((state.now_ms, state.migrations.len(), pulse::pulse(state)));
                }
                let figures = &cached.as_ref().expect("just computed").2;
                pulse::line(figures, theme, usize::from(pulse_line.width))
            };
            frame.render_widget(Paragraph::new(said), pulse_line);
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
    // One slot per proto outcome, `none` (running) included.
    let mut counts = [0usize; proto::Outcome::Lost as usize + 1];
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
    if counts[proto::Outcome::Lost as usize] > 0 {
        // A guest is gone: the loudest thing on the bar.
        spans.push(Span::styled(
            format!(
                "  {} LOST {} ",
                sym.guest_lost,
                counts[proto::Outcome::Lost as usize]
            ),
            bold.add_modifier(ratatui::style::Modifier::REVERSED),
        ));
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
    let mut hints: Vec<_> =
        keymap::hints(app.read_only, app.context(), app.shown_outcome()).collect();
    hints.sort_by_key(first);
    // Whole hints only, in the keymap's order of importance: one cut in the
    // middle ("E eva") tells the operator nothing; `?` lists them all.
    let mut room = usize::from(area.width);
    for b in hints {
        let (key, hint) = (format!(" {} ", b.shown), format!("{} ", b.hint));
        let width = Span::raw(key.as_str()).width() + Span::raw(hint.as_str()).width();
        if width > room {
            continue;
        }
        room -= width;
        spans.push(Span::styled(key, theme.key));
        spans.push(Span::styled(hint, theme.hint));
    }
    frame.render_widget(Paragraph::new(Line::from(spans)), area);
}

pub use crate::cli::output::bytes;

/// Text laid out in `width` columns after `label`, every line after the
/// first indented as far as the label, so a wrapped text stays in its
/// column instead of running back under the label. Breaks only at spaces
/// (text that touches across spans stays together); a word longer than a
/// line gets a line of its own and is cut by the widget.
pub fn hanging<'a>(label: Span<'a>, text: Vec<Span<'a>>, width: usize) -> Vec<Line<'a>> {
    // The units a line may start with: runs of (word, style) with no
    // space between them.
    let mut units: Vec<Vec<(String, Style)>> = Vec::new();
    let mut space_before = true;
    for span in text {
        let mut word = String::new();
        let mut flush = |word: &mut String, space_before: &mut bool| {
            if word.is_empty() {
                return;
            }
            let piece = (std::mem::take(word), span.style);
            match units.last_mut() {
                Some(unit) if !*space_before => unit.push(piece),
                _ => units.push(vec![piece]),
            }
            *space_before = false;
        };
        for c in span.content.chars() {
            if c == ' ' {
                flush(&mut word, &mut space_before);
                space_before = true;
            } else {
                word.push(c);
            }
        }
        flush(&mut word, &mut space_before);
    }
    let indent = label.width();
    let room = width.saturating_sub(indent).max(1);
    let unit_width = |unit: &[(String, Style)]| {
        unit.iter()
            .map(|(w, _)| Span::raw(w.as_str()).width())
            .sum()
    };
    let mut lines: Vec<Vec<Span<'a>>> = vec![vec![label]];
    let mut used = 0usize;
    for unit in units {
        let w: usize = unit_width(&unit);
        if used > 0 && used + 1 + w > room {
            lines.push(vec![Span::raw(" ".repeat(indent))]);
            used = 0;
        }
        let line = lines.last_mut().expect("one line at least");
        if used > 0 {
            line.push(Span::raw(" "));
            used += 1;
        }
        for (word, style) in unit {
            line.push(Span::styled(word, style));
        }
        used += w;
    }
    lines.into_iter().map(Line::from).collect()
}

/// A duration in ms as `850ms`, `12s`, `3m05s`, `2h10m`.
/// Why a record failed, aborted, was lost or ended degraded, as its agent
/// said (`None` while it runs and after it succeeded).
pub fn failure(r: &proto::MigrationRecord) -> Option<crate::protocol::FailureCause> {
    r.failure
        .as_ref()
        .and_then(crate::protocol::record::failure_from_proto)
}

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
/// still running).
pub fn outcome(theme: &Theme, outcome: i32) -> (Style, &'static str, &'static str) {
    outcome_look(theme, outcome_from_proto(outcome))
}

/// The same for an outcome already read: the one place the console decides
/// how an outcome looks. Unresolved and lost are spelled in capitals: one
/// needs an operator, the other means the guest is gone.
pub fn outcome_look(
    theme: &Theme,
    outcome: Option<Outcome>,
) -> (Style, &'static str, &'static str) {
    match outcome {
        Some(o) => (
            theme.outcome(o),
            theme.symbols.outcome(o),
            match o {
                Outcome::Unresolved => "UNRESOLVED",
                Outcome::Lost => "LOST",
                o => o.as_str(),
            },
        ),
        None => (theme.running, theme.symbols.running, "running"),
    }
}

#[cfg(test)]
mod layout_tests {
    use super::*;

    fn text(lines: &[Line]) -> Vec<String> {
        lines.iter().map(|l| l.to_string()).collect()
    }

    #[test]
    fn wrapped_text_hangs_under_its_first_line_and_breaks_only_at_spaces() {
        let lines = hanging(
            Span::raw(" policy "),
            vec![
                Span::raw("converging · 12s"),
                Span::raw(": dirtying 128.0 MiB/s"),
            ],
            24,
        );
        assert_eq!(
            text(&lines),
            [
                " policy converging ·",
                "        12s: dirtying",
                "        128.0 MiB/s"
            ]
        );
        assert_eq!(
            text(&hanging(Span::raw(" "), vec![Span::raw("short")], 24)),
            [" short"]
        );
    }
}
