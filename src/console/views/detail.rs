//! One migration: its phases, the feature × stage matrix, the transfer with
//! sparklines, the cookies, its attempts and its events.

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row, Sparkline, Table, Wrap};

use super::super::app::{App, mode_of};
use super::super::theme::Theme;
use super::{bytes, duration, outcome, step};
use crate::cli::output::{downtime_text, phase_name};
use crate::protocol::record::phase_from_proto;

pub fn draw(frame: &mut Frame, area: Rect, app: &App, theme: &Theme, id: &str) {
    let Some(m) = app.state().migrations.get(id) else {
        frame.render_widget(
            Paragraph::new(format!("no migration {id} (esc to go back)")).style(theme.error),
            area,
        );
        return;
    };
    let r = &m.record;
    // Phases and features take what they need; the transfer and the
    // attempts get the rest.
    let (style, symbol, label) = outcome(theme, r.outcome);
    let mut spans = vec![
        Span::styled(format!(" {symbol} {label} "), style),
        Span::styled(format!(" {} ", r.vm), theme.title),
        Span::raw(format!(
            "{} → {}  {}  attempt {}  id {}  running on {}",
            r.source,
            r.destination,
            mode_of(r),
            r.attempt,
            r.id,
            r.running_on
        )),
    ];
    // Where the guest is not simply running, say so in red.
    match crate::protocol::record::guest_from_proto(r.guest) {
        crate::protocol::GuestCondition::Running => {}
        crate::protocol::GuestCondition::Paused => {
            spans.push(Span::styled(" ✗ guest PAUSED (resume failed)", theme.error));
        }
        crate::protocol::GuestCondition::Unknown => {
            spans.push(Span::styled(" ✗ guest state unknown", theme.error));
        }
    }
    let mut head = vec![Line::from(spans)];
    if !r.error.is_empty() {
        head.push(Line::styled(format!(" cause: {}", r.error), theme.error));
    }
    if let Some(actions) = app.state().actions.get(id)
        && !actions.is_empty()
    {
        let who: Vec<String> = actions.iter().map(action_text).collect();
        head.push(Line::styled(format!(" by: {}", who.join("; ")), theme.dim));
    }
    let head = Paragraph::new(head).wrap(Wrap { trim: true }).block(
        Block::default()
            .borders(Borders::BOTTOM)
            .border_style(theme.border),
    );
    // The summary gets every line its wrapped text needs, so a long cause
    // is never cut off on a narrow terminal (up to a third of the screen).
    let summary_height = (head.line_count(area.width) as u16).clamp(2, (area.height / 3).max(4));
    let matrix = (r.features.len().max(5) as u16) + 3;
    let [summary, middle, bottom] = Layout::vertical([
        Constraint::Length(summary_height),
        Constraint::Length(matrix),
        Constraint::Min(8),
    ])
    .areas(area);
    frame.render_widget(head, summary);

    let [phases_area, features_area] =
        Layout::horizontal([Constraint::Length(24), Constraint::Min(40)]).areas(middle);
    let phase_rows = r.phases.iter().map(|p| {
        let (style, symbol) = step(theme, p.status);
        Row::new(vec![
            Cell::from(Span::styled(symbol, style)),
            Cell::from(phase_name(phase_from_proto(p.phase))),
            Cell::from(if p.duration_ms > 0 {
                duration(p.duration_ms)
            } else {
                String::new()
            }),
        ])
    });
    frame.render_widget(
        Table::new(
            phase_rows,
            [
                Constraint::Length(2),
                Constraint::Length(9),
                Constraint::Length(8),
            ],
        )
        .block(
            Block::default()
                .borders(Borders::ALL)
                .border_style(theme.border)
                .title(Span::styled(" phases ", theme.title)),
        ),
        phases_area,
    );
    let feature_rows = r.features.iter().map(|f| {
        let cell = |status: i32| {
            let (style, symbol) = step(theme, status);
            Cell::from(Span::styled(symbol, style))
        };
        Row::new(vec![
            Cell::from(f.name.clone()),
            Cell::from(if f.required { "yes" } else { "no" }),
            cell(f.prepare),
            cell(f.finish),
            cell(f.rollback),
            cell(f.release),
            Cell::from(Span::styled(
                if f.error.is_empty() {
                    f.detail.clone()
                } else {
                    f.error.clone()
                },
                if f.error.is_empty() {
                    theme.dim
                } else {
                    theme.error
                },
            )),
        ])
    });
    frame.render_widget(
        Table::new(
            feature_rows,
            [
                Constraint::Length(14),
                Constraint::Length(8),
                Constraint::Length(8),
                Constraint::Length(7),
                Constraint::Length(9),
                Constraint::Length(8),
                Constraint::Min(10),
            ],
        )
        .header(
            Row::new([
                "FEATURE", "REQUIRED", "PREPARE", "FINISH", "ROLLBACK", "RELEASE", "ERROR",
            ])
            .style(theme.header),
        )
        .block(
            Block::default()
                .borders(Borders::ALL)
                .border_style(theme.border)
                .title(Span::styled(" features ", theme.title)),
        ),
        features_area,
    );

    let [transfer_area, history_area] =
        Layout::horizontal([Constraint::Percentage(55), Constraint::Percentage(45)]).areas(bottom);
    let t = r.transfer.unwrap_or_default();
    let [stats, rate, dirty, cookies_area] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Length(3),
        Constraint::Length(3),
        Constraint::Min(0),
    ])
    .areas(transfer_area);
    frame.render_widget(
        Paragraph::new(vec![
            Line::raw(format!(
                " moved {} of {}, {} left, iteration {}",
                bytes(t.bytes_transferred),
                bytes(t.bytes_total),
                bytes(t.bytes_remaining),
                t.iteration,
            )),
            Line::styled(
                format!(
                    " rate {}/s, dirtying {}/s, {}",
                    bytes(t.rate_bytes_s),
                    bytes(t.dirty_rate_bytes_s),
                    downtime_text(t.downtime_ms, t.expected_downtime_ms, duration)
                ),
                theme.dim,
            ),
        ]),
        stats,
    );
    let rate_data: Vec<u64> = m.rate.iter().copied().collect();
    let dirty_data: Vec<u64> = m.dirty.iter().copied().collect();
    frame.render_widget(
        Sparkline::default()
            .block(Block::default().title(Span::styled(" rate ", theme.dim)))
            .data(&rate_data)
            .style(theme.sparkline_rate),
        rate,
    );
    frame.render_widget(
        Sparkline::default()
            .block(Block::default().title(Span::styled(" dirty rate ", theme.dim)))
            .data(&dirty_data)
            .style(theme.sparkline_dirty),
        dirty,
    );
    // The cookies as the source saw them: what each phase told the next.
    let cookie_lines: Vec<Line> = r
        .cookies
        .iter()
        .map(|c| {
            Line::from(vec![
                Span::styled(format!(" {} ", c.name), theme.title),
                Span::styled(format!("v{} {:>5} ", c.version, bytes(c.bytes)), theme.dim),
                Span::raw(c.summary.clone()),
            ])
        })
        .collect();
    frame.render_widget(
        Paragraph::new(if cookie_lines.is_empty() {
            vec![Line::styled(" none yet", theme.dim)]
        } else {
            cookie_lines
        })
        .wrap(Wrap { trim: false })
        .block(
            Block::default()
                .borders(Borders::TOP)
                .border_style(theme.border)
                .title(Span::styled(" cookies ", theme.title)),
        ),
        cookies_area,
    );
    let mut lines: Vec<Line> = m
        .history
        .iter()
        .chain(std::iter::once(r))
        .map(|h| {
            let (style, symbol, label) = outcome(theme, h.outcome);
            Line::from(vec![
                Span::styled(format!(" {symbol} #{} {label} ", h.attempt), style),
                Span::raw(format!("→ {} ", h.destination)),
                Span::styled(h.error.clone(), theme.dim),
            ])
        })
        .collect();
    lines.push(Line::default());
    lines.extend(
        app.state()
            .events
            .iter()
            .rev()
            .filter(|e| e.line.migration_id == r.id)
            .take(4)
            .map(|e| Line::styled(format!(" {}: {}", e.host, e.line.text), theme.dim)),
    );
    frame.render_widget(
        Paragraph::new(lines).block(
            Block::default()
                .borders(Borders::ALL)
                .border_style(theme.border)
                .title(Span::styled(" attempts and events ", theme.title)),
        ),
        history_area,
    );
}

/// "started by ana (operator) at 08:12:03" from an audit entry.
fn action_text(entry: &crate::proto::AuditEntry) -> String {
    let verb = match entry.action.as_str() {
        "migrate" => "started",
        "abort" => "aborted",
        "retry" => "retried",
        "resolve" => "forced",
        "rollback" => "rolled back",
        "forget" => "forgot pending work",
        other => other,
    };
    format!(
        "{verb} by {} ({}) at {}",
        entry.who,
        entry.role,
        crate::cli::audit::clock(entry.at_ms)
    )
}
