//! One migration: its phases, the feature × stage matrix, the transfer
//! (its stage, remaining bytes over time and rate sparklines), the cookies,
//! the completion policy with the outlook it gives, its attempts and its
//! events, and the lines its hosts logged about it.

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::Modifier;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row, Sparkline, Table, Wrap};

use super::super::app::{App, current_phase, mode_of};
use super::super::state::{MigrationLogs, MigrationView};
use super::super::theme::Theme;
use super::outlook::{convergence, resample, verdict};
use super::{bytes, duration, hanging, outcome, step};
use crate::cli::logs::clock_ms;
use crate::cli::output::{
    downtime_text, lost_text, phase_name, recovering_text, recovery_detail, recovery_way_out,
    repair_line, stage_text,
};
use crate::proto;
use crate::protocol::convergence::ConvergenceView;
use crate::protocol::record::{
    MigrationRecord, completion_from_record, phase_from_proto, stats_from_proto,
};
use crate::protocol::repair::RepairResult;
use crate::protocol::{Outcome, TransferStage};

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
    if r.outcome == proto::Outcome::Lost as i32 {
        head.push(Line::styled(
            format!(" {} ", lost_text(&r.destination)),
            theme.outcome(Outcome::Lost),
        ));
    }
    if let Some(cause) = super::failure(r) {
        head.push(Line::from(vec![
            Span::styled(" cause: ", theme.error),
            Span::styled(cause.summary(), theme.error.add_modifier(Modifier::BOLD)),
        ]));
    }
    if !r.error.is_empty() {
        head.push(Line::styled(format!(" error: {}", r.error), theme.error));
    }
    // The repairs, newest last: the two latest (the full history is in
    // `tern status --json`).
    let repairs = MigrationRecord::from(r).repairs;
    let skipped = repairs.len().saturating_sub(2);
    for entry in repairs.iter().skip(skipped) {
        let style = match entry.result {
            RepairResult::Ok => theme.dim,
            RepairResult::Running => theme.warning,
            RepairResult::Failed | RepairResult::Interrupted => theme.error,
        };
        let earlier = if skipped > 0 {
            format!(" ({skipped} earlier)")
        } else {
            String::new()
        };
        head.push(Line::styled(
            format!(" repair: {}{earlier}", repair_line(entry)),
            style,
        ));
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
    // The phases need 5 rows and borders; the features a header too.
    let matrix = (r.features.len() as u16 + 3).max(7);
    // The logs take what the transfer leaves, up to a third of the screen.
    // A running transfer keeps its figures, chart and outlook (12 rows)
    // first, and on a short screen the logs wait until it ends; an ended
    // one gives up all but 5 rows, and the logs get 3 at least (a line
    // and borders).
    let rest = area.height.saturating_sub(summary_height + matrix);
    let running = r.outcome == proto::Outcome::None as i32;
    let keep = if running { 12 } else { 5 };
    let logs_height = match rest.saturating_sub(keep) {
        spare if spare >= 3 => spare.min((area.height / 3).max(3)),
        _ if running => 0,
        _ => rest.min(3),
    };
    let [summary, middle, bottom, logs_area] = Layout::vertical([
        Constraint::Length(summary_height),
        Constraint::Length(matrix),
        Constraint::Min(0),
        Constraint::Length(logs_height),
    ])
    .areas(area);
    if logs_height > 0 {
        logs_panel(frame, logs_area, app, theme, m);
    }
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
            cell(f.verify),
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
    // Names whole; on a narrow screen short headers ("REQ", "PREP") rather
    // than cut ones.
    let name_width = r
        .features
        .iter()
        .map(|f| Span::raw(f.name.as_str()).width() as u16)
        .max()
        .unwrap_or(0)
        .clamp(7, 20);
    let narrow = features_area.width < name_width + 67;
    let headers: [(&str, u16); 6] = if narrow {
        [
            ("REQ", 3),
            ("PREP", 4),
            ("FIN", 3),
            ("VER", 3),
            ("RBK", 3),
            ("REL", 3),
        ]
    } else {
        [
            ("REQUIRED", 8),
            ("PREPARE", 7),
            ("FINISH", 6),
            ("VERIFY", 6),
            ("ROLLBACK", 8),
            ("RELEASE", 7),
        ]
    };
    let mut widths = vec![Constraint::Length(name_width)];
    widths.extend(headers.iter().map(|(_, w)| Constraint::Length(*w)));
    widths.push(Constraint::Min(5));
    let mut titles = vec!["FEATURE"];
    titles.extend(headers.iter().map(|(h, _)| *h));
    titles.push("ERROR");
    frame.render_widget(
        Table::new(feature_rows, widths)
            .header(Row::new(titles).style(theme.header))
            .block(
                Block::default()
                    .borders(Borders::ALL)
                    .border_style(theme.border)
                    .title(Span::styled(" features ", theme.title)),
            ),
        features_area,
    );

    let [transfer_area, side] =
        Layout::horizontal([Constraint::Percentage(55), Constraint::Percentage(45)]).areas(bottom);
    transfer(frame, transfer_area, m, theme);
    let inner = usize::from(side.width.saturating_sub(2));
    let completion_lines = completion_lines(app, r, theme, inner);
    // As tall as its text, leaving the attempts a line at least.
    let completion_height = (completion_lines.len() as u16 + 2)
        .min(side.height.saturating_sub(3))
        .max(3.min(side.height));
    let completion = Paragraph::new(completion_lines).block(
        Block::default()
            .borders(Borders::ALL)
            .border_style(theme.border)
            .title(Span::styled(" completion ", theme.title)),
    );
    let [completion_area, history_area] =
        Layout::vertical([Constraint::Length(completion_height), Constraint::Min(0)]).areas(side);
    frame.render_widget(completion, completion_area);
    let mut lines: Vec<Line> = m
        .history
        .iter()
        .chain(std::iter::once(r))
        .flat_map(|h| {
            let (style, symbol, label) = outcome(theme, h.outcome);
            hanging(
                Span::styled(format!(" {symbol} #{} {label} ", h.attempt), style),
                vec![
                    Span::raw(format!("→ {} ", h.destination)),
                    Span::styled(
                        super::failure(h)
                            .map(|c| format!("{} ", c.headline()))
                            .unwrap_or_default(),
                        style,
                    ),
                    Span::styled(h.error.clone(), theme.dim),
                ],
                inner,
            )
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
            .flat_map(|e| {
                hanging(
                    Span::raw(" "),
                    vec![Span::styled(
                        format!("{}: {}", e.host, e.line.text),
                        theme.dim,
                    )],
                    inner,
                )
            }),
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

/// The lines the migration's hosts logged about it, merged in time order,
/// the newest that fit: `16:48:03.106 hv-b WARN  #1 port-profile finish
/// failed …`. A host that did not answer is named first, in red. When not
/// every line fits, the newest warnings and errors are kept first, then the
/// newest INFO lines (the title says how many were left out): on a short
/// screen the failing stage stays.
fn logs_panel(frame: &mut Frame, area: Rect, app: &App, theme: &Theme, m: &MigrationView) {
    let width = usize::from(area.width.saturating_sub(2));
    let rows = usize::from(area.height.saturating_sub(2));
    let hosts = MigrationLogs::hosts_of(m);
    let logs = app.logs.as_ref().filter(|l| l.id == m.record.id);
    let mut shown: Vec<Line> = Vec::new();
    let mut left_out = 0;
    match logs {
        Some(logs) if logs.fetched_ms.is_some() => {
            for missing in &logs.missing {
                shown.push(Line::styled(format!(" ✗ {missing}"), theme.error));
            }
            let host_width = logs.lines.iter().map(|l| l.host.len()).max().unwrap_or(0);
            // Each log line as the rows it wraps to, and whether it is INFO.
            let mut entries: Vec<(bool, Vec<Line>)> = logs
                .lines
                .iter()
                .map(|l| {
                    let attempt = l
                        .attempt_id
                        .rsplit_once('.')
                        .map(|(_, n)| format!("#{n}"))
                        .unwrap_or_else(|| "-".to_string());
                    // INFO reads as plain text under a dim label; a warning
                    // or an error is coloured whole.
                    let (label_style, style, info) = match l.level.as_str() {
                        "ERROR" => (theme.error, theme.error, false),
                        "WARN" => (theme.warning, theme.warning, false),
                        _ => (theme.dim, ratatui::style::Style::default(), true),
                    };
                    let label = Span::styled(
                        format!(
                            " {} {:<host_width$} {:<5} {attempt:<2} ",
                            clock_ms(l.at_ms),
                            l.host,
                            l.level
                        ),
                        label_style,
                    );
                    let text = vec![Span::styled(l.text.clone(), style)];
                    (info, hanging(label, text, width))
                })
                .collect();
            let room = rows.saturating_sub(shown.len());
            let all: usize = entries.iter().map(|(_, e)| e.len()).sum();
            // What fits: every entry; else the newest warnings and errors
            // first, then the newest INFO lines in the rows left.
            let mut keep = vec![all <= room; entries.len()];
            if all > room {
                let mut used = 0;
                for info_pass in [false, true] {
                    for (i, (info, entry)) in entries.iter_mut().enumerate().rev() {
                        if *info != info_pass {
                            continue;
                        }
                        // The newest warning or error is never left out for
                        // its length: it keeps the rows there are.
                        if !info_pass && used == 0 && entry.len() > room && room > 0 {
                            entry.truncate(room);
                        }
                        if used + entry.len() <= room {
                            used += entry.len();
                            keep[i] = true;
                        }
                    }
                }
                left_out = entries.len() - keep.iter().filter(|k| **k).count();
            }
            shown.extend(
                entries
                    .into_iter()
                    .zip(keep)
                    .filter(|(_, keep)| *keep)
                    .flat_map(|((_, entry), _)| entry),
            );
            if logs.lines.is_empty() && logs.missing.len() < hosts.len() {
                shown.push(Line::styled(" no lines yet", theme.dim));
            }
        }
        _ => shown.push(Line::styled(
            format!(" reading the logs of {}…", hosts.join(", ")),
            theme.dim,
        )),
    }
    let title = if left_out > 0 {
        let lines = if left_out == 1 { "line" } else { "lines" };
        format!(
            " logs of {} · {left_out} older {lines} left out ",
            hosts.join(", ")
        )
    } else {
        format!(" logs of {} ", hosts.join(", "))
    };
    frame.render_widget(
        Paragraph::new(shown).block(
            Block::default()
                .borders(Borders::ALL)
                .border_style(theme.border)
                .title(Span::styled(title, theme.title)),
        ),
        area,
    );
}

/// The transfer, what matters most first where rows are short: its figures
/// and stage, the remaining bytes over time, the rate and dirty-rate
/// sparklines, then the cookies.
fn transfer(frame: &mut Frame, area: Rect, m: &MigrationView, theme: &Theme) {
    let r = &m.record;
    let t = r
        .transfer
        .as_ref()
        .map(stats_from_proto)
        .unwrap_or_default();
    let width = usize::from(area.width);
    let mut stats = hanging(
        Span::raw(" "),
        vec![Span::raw(format!(
            "moved {}, {} of {} left, iteration {}",
            bytes(t.bytes_transferred),
            bytes(t.bytes_remaining),
            bytes(t.bytes_total),
            t.iteration,
        ))],
        width,
    );
    stats.extend(hanging(
        Span::raw(" "),
        vec![Span::styled(
            format!(
                "rate {}/s, dirtying {}/s, {}",
                bytes(t.rate_bytes_s),
                bytes(t.dirty_rate_bytes_s),
                downtime_text(t.downtime_ms, t.expected_downtime_ms, duration)
            ),
            theme.dim,
        )],
        width,
    ));
    if t.stage.is_postcopy() || t.postcopy_requests > 0 {
        let style = match t.stage {
            TransferStage::PostcopyPaused => theme.error,
            _ => theme.warning,
        };
        stats.extend(hanging(
            Span::styled(" stage: ", style),
            vec![Span::styled(stage_text(&t), style)],
            width,
        ));
    }
    let stats_height = stats.len() as u16;
    let stats = Paragraph::new(stats);
    let outlook = convergence(r).filter(|c| !c.remaining.is_empty());
    // Rows in order of importance; what does not fit is left out.
    let mut left = area.height;
    let mut take = |want: u16, least: u16| {
        let got = if left >= least { want.min(left) } else { 0 };
        left -= got;
        got
    };
    let stats_rows = take(stats_height, 1);
    let chart_rows = take(if outlook.is_some() { 4 } else { 0 }, 3);
    let rate_rows = take(3, 3);
    let dirty_rows = take(3, 3);
    let [stats_area, chart_area, rate_area, dirty_area, cookies_area] = Layout::vertical([
        Constraint::Length(stats_rows),
        Constraint::Length(chart_rows),
        Constraint::Length(rate_rows),
        Constraint::Length(dirty_rows),
        Constraint::Min(0),
    ])
    .areas(area);
    frame.render_widget(stats, stats_area);
    if let Some(outlook) = &outlook {
        remaining_chart(frame, chart_area, outlook, theme);
    }
    let rate_data: Vec<u64> = m.rate.iter().copied().collect();
    let dirty_data: Vec<u64> = m.dirty.iter().copied().collect();
    frame.render_widget(
        Sparkline::default()
            .block(Block::default().title(Span::styled(" rate ", theme.dim)))
            .data(&rate_data)
            .style(theme.sparkline_rate),
        rate_area,
    );
    frame.render_widget(
        Sparkline::default()
            .block(Block::default().title(Span::styled(" dirty rate ", theme.dim)))
            .data(&dirty_data)
            .style(theme.sparkline_dirty),
        dirty_area,
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
}

/// Remaining bytes over the transfer's time, with its axes: the largest
/// value above, the first and the newest instant below.
///
/// ```text
///  remaining, max 2.0 GiB, now 800.0 MiB
///  ▇▇▇▆▆▅▅▄▄▃▃▂
///  ▇▇▇▆▆▅▅▄▄▃▃▂
///  0s                           45s
/// ```
fn remaining_chart(frame: &mut Frame, area: Rect, outlook: &ConvergenceView, theme: &Theme) {
    let points = &outlook.remaining;
    let (Some(first), Some(last)) = (points.first(), points.last()) else {
        return;
    };
    let max = points.iter().map(|p| p[1]).max().unwrap_or(0);
    let columns = usize::from(area.width.saturating_sub(2)).max(1);
    let data = resample(points, columns);
    let bars = area.height.saturating_sub(2);
    let [title, chart, axis] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(bars),
        Constraint::Length(1),
    ])
    .areas(area);
    frame.render_widget(
        Paragraph::new(Line::from(vec![
            Span::styled(" remaining", theme.dim),
            Span::raw(format!(", max {}, now {}", bytes(max), bytes(last[1]))),
        ])),
        title,
    );
    let [_, bars_area, _] = Layout::horizontal([
        Constraint::Length(1),
        Constraint::Length(columns as u16),
        Constraint::Min(0),
    ])
    .areas(chart);
    frame.render_widget(
        Sparkline::default()
            .data(&data)
            .max(max.max(1))
            .style(theme.sparkline_rate),
        bars_area,
    );
    let axis_label = |ms: u64| match ms {
        0 => "0s".to_string(),
        ms => duration(ms),
    };
    let (start, end) = (axis_label(first[0]), axis_label(last[0]));
    let gap = columns.saturating_sub(start.len() + end.len());
    frame.render_widget(
        Paragraph::new(Line::styled(format!(" {start}{:gap$}{end}", ""), theme.dim)),
        axis,
    );
}

/// The completion policy and what it says of the transfer: the outlook
/// (verdict, ETA while it runs, reason), the note of what the policy did,
/// and a post-copy being recovered, in red; laid out in `width` columns.
fn completion_lines<'a>(
    app: &App,
    r: &proto::MigrationRecord,
    theme: &Theme,
    width: usize,
) -> Vec<Line<'a>> {
    let label = |text: &str| Span::styled(format!(" {text:<8}"), theme.dim);
    // What needs the operator first: on a short screen the last lines go.
    let mut lines = Vec::new();
    if let Some(recovery) = MigrationRecord::from(r).recovery {
        let now = app.state().now_ms;
        let when = |at: u64| match at.checked_sub(now) {
            Some(wait) if wait > 0 => format!("in {}", duration(wait)),
            _ => "now".to_string(),
        };
        let way_out = recovery_way_out(&r.id, &r.destination, recovery.tries)
            .map(|w| format!("; {w}"))
            .unwrap_or_default();
        lines.extend(hanging(
            Span::styled(format!(" {} ", theme.symbols.failed), theme.error),
            vec![Span::styled(
                format!(
                    "{}: {} (b tries now){way_out}",
                    recovering_text(recovery.tries),
                    recovery_detail(&recovery, when)
                ),
                theme.error,
            )],
            width,
        ));
    }
    let running = r.outcome == proto::Outcome::None as i32;
    let precopy = r
        .transfer
        .as_ref()
        .is_none_or(|t| !stats_from_proto(t).stage.is_postcopy());
    let in_perform = running && precopy && current_phase(r) == "perform";
    match convergence(r) {
        Some(outlook) => {
            let said = verdict(&outlook, theme);
            // The ETA only while pre-copy runs; after it, the verdict it ended on.
            let text = if in_perform {
                said.wordings[0].clone()
            } else {
                said.wordings.last().cloned().unwrap_or_default()
            };
            lines.extend(hanging(
                label(if in_perform { "outlook" } else { "last" }),
                vec![
                    Span::styled(text, said.style),
                    Span::styled(format!(": {}", outlook.reason), theme.dim),
                ],
                width,
            ));
        }
        None if in_perform => lines.extend(hanging(
            label("outlook"),
            vec![Span::styled(
                "none yet: it takes two progress samples",
                theme.dim,
            )],
            width,
        )),
        None => {}
    }
    if !r.completion_note.is_empty() {
        lines.extend(hanging(
            label("note"),
            vec![Span::styled(r.completion_note.clone(), theme.warning)],
            width,
        ));
    }
    let policy = completion_from_record(r.completion.as_ref());
    lines.extend(hanging(
        label("policy"),
        vec![Span::raw(policy.describe())],
        width,
    ));
    lines
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
